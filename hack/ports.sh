#!/usr/bin/env bash
# Prints N (default 1) distinct ports on 127.0.0.1, free now, one per line, for processes a
# script starts a moment later. Taken at random below the kernel's ephemeral range
# (ip_local_port_range) rather than by binding port 0: every outgoing connection takes its
# source port from that range, and could take a port handed out that way before its process
# listens on it (tests/common/mod.rs `free_port` does the same, for the same reason).
set -euo pipefail
exec python3 - "${1:-1}" <<'PY'
import random, socket, sys
count = int(sys.argv[1])
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
ports = []
for _ in range(1000):
    if len(ports) == count:
        break
    port = random.randrange(20000, max(low, 20001))
    if port in ports:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    ports.append(port)
if len(ports) < count:
    sys.exit(f"ports.sh: found {len(ports)} of {count} free ports between 20000 and {low} in 1000 tries")
print("\n".join(map(str, ports)))
PY
