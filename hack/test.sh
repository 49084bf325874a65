#!/usr/bin/env bash
# `make test`: unit tests, then the integration tests against a real control plane on loopback.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT_DIR"

# A CI clone is built once: incremental caches (as large as the build itself) would only use disk.
[[ "${CI:-}" == true ]] && export CARGO_INCREMENTAL=0
# A cold build with its test binaries takes about 6 GiB of target/ (5.5 GiB in CI, 2026-12-05);
# say so plainly rather than fail mid-link.
free_kib=$(df -Pk "$ROOT_DIR" | awk 'NR == 2 { print $4 }')
if (( free_kib < 8 * 1024 * 1024 )); then
  echo "warning: only $((free_kib / 1024 / 1024)) GiB free under $ROOT_DIR; a cold \`make test\` needs about 6 GiB" >&2
fi

"$HACK_DIR/deps.sh"
PATH="$PATH:$("$HACK_DIR/hadolint.sh")"
export PATH

echo "== unit tests, packaging (chart, Dockerfile), proxy tests on loopback, real SPICE peers"
cargo test --lib --test crd_drift --test packaging --test proxy --test websocket --test spice_e2e --test browser

echo "== the fuzz targets still build against the library (\`make fuzz\` runs them)"
cargo check --quiet --manifest-path fuzz/Cargo.toml

# The README promises the oldest Rust in Cargo.toml's `rust-version`; a promise nobody builds
# with breaks unnoticed the first time a newer feature slips in.
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
echo "== everything still builds with Rust $msrv (Cargo.toml's rust-version, the README's minimum)"
if command -v rustup >/dev/null; then
  rustup toolchain install "$msrv" --profile minimal --no-self-update >/dev/null
  CARGO_TARGET_DIR="$ROOT_DIR/target/msrv" cargo +"$msrv" check --quiet --locked --all-targets
elif [[ "${CI:-}" == true ]]; then
  echo "error: rustup is needed to check the minimum Rust $msrv" >&2; exit 1
else
  echo "skipped: no rustup to install Rust $msrv (CI runs this check)" >&2
fi

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

echo "== installing the chart (CRDs, ServiceAccount, RBAC); the operator under test runs as its ServiceAccount"
# replicaCount=0: no kubelet runs the image here; the tests run the operator themselves with
# a token of the chart's ServiceAccount, so they exercise exactly the chart's permissions.
helm install spice-operator charts/spice-operator -n spice-operator-system --create-namespace \
  --set replicaCount=0 --wait --timeout 2m >/dev/null
kubectl wait --for condition=Established --timeout=60s -f crds/ >/dev/null
export SPICE_TEST_OPERATOR_KUBECONFIG="$CLUSTER_DIR/operator.kubeconfig"
"$HACK_DIR/sa-kubeconfig.sh" spice-operator-system spice-operator > "$SPICE_TEST_OPERATOR_KUBECONFIG"

echo "== integration tests"
# Test binaries run one after another; tests inside one binary run in parallel, each in its own
# namespace. rbac and leader run operators of their own, so they are separate binaries.
cargo test --test spiceproxy --test policy --test restart --test e2e --test engine --test rbac --test leader

echo "== make demo, once: the README's main command still starts the operator and resolves examples/"
DEMO_DIR=$(mktemp -d "${TMPDIR:-/tmp}/spice-demo.XXXXXX")
SPICE_DEMO_ONESHOT=1 SPICE_DEMO_PROFILE=debug SPICE_DEMO_DIR="$DEMO_DIR" "$HACK_DIR/demo.sh"
rm -rf "$DEMO_DIR"
