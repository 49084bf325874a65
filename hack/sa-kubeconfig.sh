#!/usr/bin/env bash
# Prints a kubeconfig that authenticates as ServiceAccount $2 of namespace $1 with a fresh
# bound token (TokenRequest), against the cluster of the current KUBECONFIG.
set -euo pipefail
ns=$1 sa=$2 duration=${3:-4h}
token=$(kubectl -n "$ns" create token "$sa" --duration "$duration")
out=$(mktemp)
trap 'rm -f "$out"' EXIT
kubectl config view --raw --minify > "$out"
kubectl --kubeconfig "$out" config set-credentials "sa-$sa" --token "$token" >/dev/null
kubectl --kubeconfig "$out" config set-context --current --user "sa-$sa" >/dev/null
kubectl --kubeconfig "$out" config unset users.local-admin >/dev/null 2>&1 || true
cat "$out"
