#!/usr/bin/env bash
# `make e2e-kind`: the end-to-end scenarios of tests/e2e/ against a kind cluster, with the
# operator and the proxies running from the image built here (Docker + kind required).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT_DIR"
for tool in docker kind; do
  command -v "$tool" >/dev/null || { echo "make e2e-kind needs $tool on PATH (no Docker here? make test runs the same scenarios on a local control plane)" >&2; exit 2; }
done
CLUSTER=${E2E_KIND_CLUSTER:-spice-operator-e2e}
IMAGE=spice-operator:e2e
KUBECONFIG=$(mktemp "${TMPDIR:-/tmp}/kind-kubeconfig.XXXXXX")
export KUBECONFIG
cleanup() {
  local rc=$?
  if [[ $rc != 0 ]]; then
    kubectl -n spice-operator-system logs deploy/spice-operator --all-containers --tail 200 || true
  fi
  kind delete cluster --name "$CLUSTER" || true
  rm -f "$KUBECONFIG"
  exit $rc
}
trap cleanup EXIT INT TERM

docker build -t "$IMAGE" .
kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s
kind load docker-image "$IMAGE" --name "$CLUSTER"
helm install spice-operator charts/spice-operator -n spice-operator-system --create-namespace \
  --set image.repository=spice-operator --set image.tag=e2e --set image.pullPolicy=Never --wait --timeout 5m
kubectl wait --for condition=Established --timeout=60s -f crds/
E2E_OPERATOR=in-cluster E2E_IMAGE="$IMAGE" cargo test --test e2e
