#!/usr/bin/env bash
# Builds the real control-plane binaries the tests and the demo run, from their Go modules,
# into a cache outside the repo keyed by version. Rebuilds only what is missing.
#   hack/tools.sh            build everything, print the bin dir
#   hack/tools.sh bindir     print the bin dir only
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
# promtool checks and unit-tests the chart's alerting rules (the module's v0.316.0 is Prometheus 3.16.0).
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-v0.316.0}

CACHE=${SPICE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spice-operator-tools}
BIN="$CACHE/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
[[ "${1:-}" == bindir ]] && { echo "$BIN"; exit 0; }
mkdir -p "$BIN"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { echo "[tools] $*" >&2; }

# A throwaway module per tool: their k8s.io/* requirements differ.
new_module() { # dir module-path
  rm -rf "$1"; mkdir -p "$1"
  printf 'module %s\n\ngo 1.26\n' "$2" > "$1/go.mod"
}

build_kubernetes() {
  local dir="$CACHE/src/kubernetes-$KUBE_VERSION"
  new_module "$dir" spicetools/kubernetes
  cd "$dir"
  go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" > dl.json
  local gomod; gomod=$(sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p' dl.json)
  # Every staging module k8s.io/X => ./staging/src/k8s.io/X is pinned to the published k8s.io/X v0.Y.Z.
  local minor=${KUBE_VERSION#v1.}; local staging="v0.$minor"
  go mod edit -require="k8s.io/kubernetes@$KUBE_VERSION"
  grep -E '=>\s*\./staging/' "$gomod" | awk '{print $1}' | sort -u | while read -r m; do
    go mod edit -replace="$m=$m@$staging"
  done
  cat > tools.go <<'EOG'
//go:build tools
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubectl/pkg/cmd"
)
EOG
  go mod tidy >/dev/null 2>&1 || go mod tidy
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [[ -x "$BIN/$c" ]] && continue
    log "building $c $KUBE_VERSION (minutes on a cold cache)"
    go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION" -o "$BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$BIN/$c.tmp" "$BIN/$c"
  done
}

build_simple() { # name module-require package [stamped]
  local name=$1 req=$2 pkg=$3
  # The bin dir's name holds the versions of the first tools; one added later is "stamped":
  # a file beside it names its version, so a new version is built into the same dir.
  local stamp="$BIN/.$name-${req##*@}"
  [[ -x "$BIN/$name" ]] && { [[ -z ${4:-} ]] || [[ -e $stamp ]]; } && return 0
  local dir="$CACHE/src/$name-${req##*@}"
  new_module "$dir" "spicetools/$name"
  cd "$dir"
  go mod edit -require="$req"
  printf '//go:build tools\npackage tools\n\nimport _ "%s"\n' "$pkg" > tools.go
  go mod tidy >/dev/null 2>&1 || go mod tidy
  log "building $name ${req##*@}"
  go build -trimpath -ldflags "-s -w" -o "$BIN/$name.tmp" "$pkg"
  mv "$BIN/$name.tmp" "$BIN/$name"
  touch "$stamp"
}

# kwok simulates nothing without stages: take the upstream "fast" node and pod stages and
# the node heartbeat from the same module version.
kwok_stages() {
  [[ -s "$BIN/kwok-stages.yaml" ]] && return 0
  local src; src=$(cd "$CACHE/src/kwok-$KWOK_VERSION" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  for f in "$src"/kustomize/stage/node/fast/*.yaml "$src"/kustomize/stage/node/heartbeat/*.yaml "$src"/kustomize/stage/pod/fast/*.yaml; do
    [[ $(basename "$f") == kustomization.yaml ]] && continue
    echo "---"; cat "$f"
  done > "$BIN/kwok-stages.yaml.tmp"
  mv "$BIN/kwok-stages.yaml.tmp" "$BIN/kwok-stages.yaml"
}

need_k8s=0
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do [[ -x "$BIN/$c" ]] || need_k8s=1; done
build_simple etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION" go.etcd.io/etcd/server/v3
build_simple kwok "sigs.k8s.io/kwok@$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
kwok_stages
build_simple helm "helm.sh/helm/v3@$HELM_VERSION" helm.sh/helm/v3/cmd/helm
build_simple promtool "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" github.com/prometheus/prometheus/cmd/promtool stamped
[[ $need_k8s == 1 ]] && build_kubernetes
echo "$BIN"
