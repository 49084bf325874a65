#!/usr/bin/env bash
# `make bench-proxy`: the CONNECT proxy against HAProxy (forced splice), squid and tinyproxy,
# all from Debian, in one run on loopback (as root: in a network namespace of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for p in haproxy squid tinyproxy; do command -v "$p" >/dev/null || command -v "/usr/sbin/$p" >/dev/null || need+=("$p"); done
# `ip` brings up loopback in the benchmark's own network namespace.
command -v ip >/dev/null || command -v /usr/sbin/ip >/dev/null || need+=(iproute2)
if [[ ${#need[@]} -gt 0 ]]; then
  SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts them as services; the benchmark runs its own copies.
  for p in "${need[@]}"; do $SUDO service "$p" stop >/dev/null 2>&1 || true; done
fi
export PATH="/usr/sbin:$PATH"
ulimit -n "$(ulimit -Hn)" || true
cargo build --release --quiet
cargo bench --quiet --bench proxy_compare
