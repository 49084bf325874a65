#!/usr/bin/env bash
# Runs hack/experiments/echo-tail.rs: direct, HAProxy and ours in turn, ROUNDS times.
# Usage: hack/experiments/echo-tail.sh [rounds, default 3] [round trips, default 30000]
# Needs haproxy and target/release/spice-operator (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3} n=${2:-30000}
dir=$(mktemp -d)
rustc -O -o "$dir/echo-tail" hack/experiments/echo-tail.rs
read -r target haproxy ours admin < <(python3 -c 'import socket
s=[socket.socket() for _ in range(4)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
"$dir/echo-tail" serve "$target" & pids+=($!)
printf 'global\n  tune.pipesize 1048576\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  option splice-request\n  option splice-response\nfrontend f\n  bind 127.0.0.1:%s\n  default_backend b\nbackend b\n  server s 127.0.0.1:%s\n' "$haproxy" "$target" > "$dir/haproxy.cfg"
haproxy -db -f "$dir/haproxy.cfg" > /dev/null 2>&1 & pids+=($!)
cat > "$dir/ours.json" <<JSON
{"listen": "[::]:$ours", "adminListen": "127.0.0.1:$admin", "authMode": "None", "keysDir": null, "basicDir": null,
 "allowedTargets": [{"cidr": "127.0.0.1/32", "ports": [[$target, $target]]}],
 "limits": {"maxTunnels": 100, "maxTunnelsPerClient": 100, "idleTimeoutSeconds": 3600, "connectTimeoutSeconds": 5,
            "handshakeTimeoutSeconds": 10, "drainSeconds": 0, "shutdownDelaySeconds": 0}}
JSON
target/release/spice-operator proxy --config "$dir/ours.json" > /dev/null 2>&1 & pids+=($!)
sleep 1
for _ in $(seq "$rounds"); do
  echo "direct  $("$dir/echo-tail" run "127.0.0.1:$target" raw - "$n")"
  echo "haproxy $("$dir/echo-tail" run "127.0.0.1:$haproxy" raw - "$n")"
  echo "ours    $("$dir/echo-tail" run "127.0.0.1:$ours" connect "127.0.0.1:$target" "$n")"
done
