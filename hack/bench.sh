#!/usr/bin/env bash
# `make bench`: the scale benchmark of issue #2 on a fresh local control plane, with the
# release operator as its own process (so its RSS and API requests are its own).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT_DIR"
cargo build --release --quiet
cargo build --release --quiet --bench policy_scale
DIR=$(mktemp -d "${TMPDIR:-/tmp}/spice-bench.XXXXXX")
OP=
cleanup() {
  local rc=$?
  [[ -n "$OP" ]] && kill "$OP" 2>/dev/null || true
  # The operator's log outlives the run when it failed.
  [[ $rc != 0 && -f "$DIR/operator.log" ]] && cp "$DIR/operator.log" "${TMPDIR:-/tmp}/spice-bench-operator.log" \
    && echo "operator log: ${TMPDIR:-/tmp}/spice-bench-operator.log" >&2
  "$HACK_DIR/local-cluster.sh" stop "$DIR" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
"$HACK_DIR/local-cluster.sh" start "$DIR" 2>/dev/null
export KUBECONFIG="$DIR/kubeconfig"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established --timeout=60s -f crds/ >/dev/null
{ read -r PORT; read -r API_PORT; } < <("$HACK_DIR/ports.sh" 2)
RUST_LOG=warn target/release/spice-operator controller --admin-addr "127.0.0.1:$PORT" --api-addr "127.0.0.1:$API_PORT" > "$DIR/operator.log" 2>&1 &
OP=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
# The engine API's generated certificate, published for callers to trust.
for _ in $(seq 100); do kubectl -n default get configmap spice-operator-api-ca -o jsonpath='{.data.ca\.crt}' > "$DIR/api-ca.crt" 2>/dev/null && [[ -s "$DIR/api-ca.crt" ]] && break; sleep 0.1; done
OPERATOR_PID=$OP OPERATOR_ADMIN="127.0.0.1:$PORT" OPERATOR_API="localhost:$API_PORT" OPERATOR_API_CA="$DIR/api-ca.crt" \
  cargo bench --quiet --bench policy_scale
