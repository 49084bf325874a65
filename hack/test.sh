#!/usr/bin/env bash
# `make test`: unit tests, then the integration tests against a real control plane on loopback.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT_DIR"

"$HACK_DIR/deps.sh"
echo "== unit tests, proxy tests on loopback, real SPICE peers"
cargo test --lib --test crd_drift --test proxy --test spice_e2e

CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/spice-test-cluster.XXXXXX")
cleanup() {
  local rc=$?
  [[ $rc != 0 ]] && { echo "== control-plane logs (tests failed)"; "$HACK_DIR/local-cluster.sh" dump "$CLUSTER_DIR" || true; }
  "$HACK_DIR/local-cluster.sh" stop "$CLUSTER_DIR" || true
  rm -rf "$CLUSTER_DIR"
  exit $rc
}
trap cleanup EXIT INT TERM

echo "== starting the local control plane"
"$HACK_DIR/local-cluster.sh" start "$CLUSTER_DIR"
export KUBECONFIG="$CLUSTER_DIR/kubeconfig"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established --timeout=60s -f crds/ >/dev/null

echo "== integration tests"
# Test binaries run one after another; tests inside one binary run in parallel, each in its own namespace.
cargo test --test spiceproxy --test policy --test restart
