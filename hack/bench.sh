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
  [[ -n "$OP" ]] && kill "$OP" 2>/dev/null || true
  "$HACK_DIR/local-cluster.sh" stop "$DIR" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
"$HACK_DIR/local-cluster.sh" start "$DIR" 2>/dev/null
export KUBECONFIG="$DIR/kubeconfig"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established --timeout=60s -f crds/ >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn target/release/spice-operator controller --admin-addr "127.0.0.1:$PORT" > "$DIR/operator.log" 2>&1 &
OP=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
OPERATOR_PID=$OP OPERATOR_ADMIN="127.0.0.1:$PORT" cargo bench --quiet --bench policy_scale
