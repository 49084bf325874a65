#!/usr/bin/env bash
# `make bench-bridge`: the browser path's WebSocket bridge against websockify (Debian's, what
# nova's spicehtml5proxy and oVirt run), in one run on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v websockify >/dev/null; then
  SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends websockify >/dev/null
fi
ulimit -n "$(ulimit -Hn)" || true
cargo build --release --quiet
cargo bench --quiet --bench bridge_compare
