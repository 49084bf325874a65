#!/usr/bin/env bash
# `make demo`: builds what is missing, starts the local control plane, installs the CRDs, runs
# the operator, applies examples/ and prints the resolved table. Ctrl-C stops everything.
# SPICE_DEMO_ONESHOT=1 stops right after printing (used by `make test` to keep this command honest).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT_DIR"
STATE=${SPICE_DEMO_DIR:-$ROOT_DIR/.local/demo}
mkdir -p "$STATE"

# SPICE_DEMO_PROFILE=debug runs the debug build (`make test` reuses the one its tests built).
PROFILE=${SPICE_DEMO_PROFILE:-release}
case "$PROFILE" in
  release) build=(cargo build --release --quiet) ;;
  debug) build=(cargo build --quiet) ;;
  *) echo "SPICE_DEMO_PROFILE must be release or debug, not '$PROFILE'" >&2; exit 2 ;;
esac
echo "== building the operator ($PROFILE)"
"${build[@]}"
OPERATOR_PID=
cleanup() {
  local rc=$?
  # A second Ctrl-C (or the TERM make passes on after the one the whole process group got)
  # must not cut the clean-up short and leave an API server behind.
  trap - EXIT
  trap '' INT TERM
  echo; echo "== stopping"
  [[ -n "$OPERATOR_PID" ]] && kill "$OPERATOR_PID" 2>/dev/null && wait "$OPERATOR_PID" 2>/dev/null || true
  "$HACK_DIR/local-cluster.sh" stop "$STATE" || true
  exit $rc
}
trap cleanup EXIT INT TERM

echo "== starting the local control plane in $STATE"
"$HACK_DIR/local-cluster.sh" start "$STATE"
export KUBECONFIG="$STATE/kubeconfig"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established --timeout=60s -f crds/ >/dev/null

{ read -r ADMIN_PORT; read -r API_PORT; } < <("$HACK_DIR/ports.sh" 2)
echo "== running the operator (log: $STATE/operator.log, metrics: http://127.0.0.1:$ADMIN_PORT/metrics, engine API: https://127.0.0.1:$API_PORT)"
"target/$PROFILE/spice-operator" controller --admin-addr "127.0.0.1:$ADMIN_PORT" --api-addr "127.0.0.1:$API_PORT" \
  --proxy-image "spice-operator:0.1.0" --shutdown-grace-seconds 5 > "$STATE/operator.log" 2>&1 &
OPERATOR_PID=$!

echo "== applying examples/"
kubectl apply -f examples/spiceproxy.yaml -f examples/clusterconsolepolicy.yaml
for _ in $(seq 300); do
  [[ "$(kubectl get ccp default -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]] && break
  sleep 0.1
done

echo; kubectl get spiceproxies -A; echo; kubectl get clusterconsolepolicies; echo
echo "Resolved console proxies (ClusterConsolePolicy default):"
TEMPLATE='KIND CLUSTER POOL/VM PROXY-URL SOURCE PROXY-CONFIGURED HTML5-URL ERROR
{{range .status.clusters}}cluster {{.name}} - {{or .proxyUrl "(none)"}} {{.source}} {{.proxyConfigured}} {{or .html5Url "-"}} {{or .error "-"}}
{{end}}{{range .status.pools}}pool {{.cluster}} {{.name}} {{or .proxyUrl "(none)"}} {{.source}} {{.proxyConfigured}} {{or .html5Url "-"}} {{or .error "-"}}
{{end}}{{range .status.vms}}vm {{.cluster}} {{.name}} {{or .proxyUrl "(none)"}} {{.source}} {{.proxyConfigured}} {{or .html5Url "-"}} {{or .error "-"}}
{{end}}'
kubectl get ccp default -o go-template="$TEMPLATE" | column -t
echo
[[ "$(kubectl get ccp default -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]] \
  || { echo "the example policy did not resolve; operator log:"; tail -20 "$STATE/operator.log"; exit 1; }

echo "KUBECONFIG=$KUBECONFIG"
echo "Try: KUBECONFIG=$KUBECONFIG kubectl get spx,ccp -A"
[[ "${SPICE_DEMO_ONESHOT:-}" == 1 ]] && exit 0
echo "Ctrl-C stops the operator and the control plane."
while kill -0 "$OPERATOR_PID" 2>/dev/null; do sleep 1; done
echo "the operator exited; log:"; tail -20 "$STATE/operator.log"; exit 1
