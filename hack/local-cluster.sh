#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, as envtest does, plus kwok fake nodes so that
# Deployments really become Ready without a kubelet. Shared by `make test` and `make demo`.
#   hack/local-cluster.sh start DIR   start everything, write DIR/kubeconfig, wait until usable
#   hack/local-cluster.sh stop DIR    stop everything started in DIR
#   hack/local-cluster.sh dump DIR    print component logs (diagnostics after a failure)
set -euo pipefail
cmd=${1:?usage: local-cluster.sh start|stop|dump DIR}
DIR=${2:?usage: local-cluster.sh start|stop|dump DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "[local-cluster] $*" >&2; }

stop() {
  [[ -f "$DIR/pids" ]] || return 0
  # Reverse start order: clients first, etcd last.
  tac "$DIR/pids" | while read -r pid name; do
    kill "$pid" 2>/dev/null && log "stopped $name" || true
  done
  for _ in $(seq 50); do
    alive=0
    while read -r pid _; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$DIR/pids"
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  while read -r pid _; do kill -9 "$pid" 2>/dev/null || true; done < "$DIR/pids"
  rm -f "$DIR/pids"
}

dump() {
  for f in "$DIR"/logs/*.log; do
    [[ -f "$f" ]] || continue
    echo "===== $(basename "$f") (last 40 lines)"; tail -n 40 "$f"
  done
}

alive_or_die() { # name: fail fast with the logs when a component exited
  local pid; pid=$(awk -v n="$1" '$2==n {print $1}' "$DIR/pids")
  kill -0 "$pid" 2>/dev/null || { log "$1 exited"; dump; exit 1; }
}

start_bg() { # name cmd...
  local name=$1; shift
  "$@" > "$DIR/logs/$name.log" 2>&1 &
  echo "$! $name" >> "$DIR/pids"
}

certs() {
  local c="$DIR/pki"; mkdir -p "$c"; cd "$c"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=spice-local-ca" 2>/dev/null
  cat > san.cnf <<EOC
[req]
distinguished_name=dn
[dn]
[ext]
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EOC
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile san.cnf -extensions ext 2>/dev/null
  printf '[ext]\nextendedKeyUsage=clientAuth\n' > client.cnf
  openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=local-admin" 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.cnf -extensions ext 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cd - >/dev/null
}

kubeconfig() { # port
  local c="$DIR/pki"
  cat > "$DIR/kubeconfig" <<EOK
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$1
    certificate-authority-data: $(base64 -w0 "$c/ca.crt")
users:
- name: local-admin
  user:
    client-certificate-data: $(base64 -w0 "$c/admin.crt")
    client-key-data: $(base64 -w0 "$c/admin.key")
contexts:
- name: local
  context: {cluster: local, user: local-admin}
current-context: local
EOK
}

start() {
  local BIN; BIN=$("$HERE/tools.sh")
  stop
  rm -rf "$DIR/etcd" "$DIR/logs"; mkdir -p "$DIR/logs"
  [[ -f "$DIR/pki/sa.pub" ]] || certs
  local etcd_port peer_port api_port kwok_port
  { read -r etcd_port; read -r peer_port; read -r api_port; read -r kwok_port; } < <("$HERE/ports.sh" 4)
  local pki="$DIR/pki"
  start_bg etcd "$BIN/etcd" --data-dir "$DIR/etcd" --name local \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "local=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn
  start_bg kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" --cert-dir "$DIR/pki" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" --client-ca-file "$pki/ca.crt" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.0.0.0/24,fd00:10:96::/112 \
    --endpoint-reconciler-type none --authorization-mode RBAC --allow-privileged=false --enable-priority-and-fairness=false \
    --disable-admission-plugins ServiceAccount,TaintNodesByCondition --v 0
  kubeconfig "$api_port"
  export KUBECONFIG="$DIR/kubeconfig"
  local ok=0
  for _ in $(seq 300); do
    if kubectl get --raw /readyz >/dev/null 2>&1; then ok=1; break; fi
    alive_or_die kube-apiserver
    sleep 0.2
  done
  [[ $ok == 1 ]] || { log "kube-apiserver did not become ready"; dump; exit 1; }
  start_bg kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$DIR/kubeconfig" \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" --leader-elect=false \
    --secure-port 0 --controllers '*,-node-ipam-controller,-node-lifecycle-controller' --v 0
  start_bg kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$DIR/kubeconfig" --leader-elect=false --secure-port 0 --v 0
  start_bg kwok "$BIN/kwok" --config "$BIN/kwok-stages.yaml" --kubeconfig "$DIR/kubeconfig" --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake --cidr 10.244.0.0/16 \
    --node-ip 127.0.0.1 --server-address "127.0.0.1:$kwok_port"
  for n in 1 2; do
    kubectl apply -f - >/dev/null <<EON
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$n
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {kubernetes.io/hostname: kwok-node-$n, kubernetes.io/os: linux, type: kwok}
EON
    # Node status is a subresource: create ignores it. Both address types, because kwok's
    # node-initialize stage patches in whichever of InternalIP and Hostname is missing, and
    # a merge patch replaces the whole list: with only InternalIP here, kwok running after
    # this patch would leave the node with just a Hostname (a flaky "no node address").
    kubectl patch node "kwok-node-$n" --subresource=status --type=merge \
      -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.$((10 + n))\"},{\"type\":\"Hostname\",\"address\":\"kwok-node-$n\"}]}}" >/dev/null
  done
  for _ in $(seq 300); do
    ready=$(kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True || true)
    [[ "$ready" == 2 ]] && break
    sleep 0.2
  done
  [[ "$ready" == 2 ]] || { log "kwok nodes did not become Ready"; dump; exit 1; }
  # kwok initialises a node once; make sure the addresses tests expect survived it.
  for n in 1 2; do
    for _ in $(seq 50); do
      ip=$(kubectl get node "kwok-node-$n" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
      [[ "$ip" == "127.0.0.$((10 + n))" ]] && break
      kubectl patch node "kwok-node-$n" --subresource=status --type=merge \
        -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.$((10 + n))\"},{\"type\":\"Hostname\",\"address\":\"kwok-node-$n\"}]}}" >/dev/null
      sleep 0.2
    done
    [[ "$ip" == "127.0.0.$((10 + n))" ]] || { log "kwok-node-$n lost its InternalIP (has: ${ip:-none})"; dump; exit 1; }
  done
  log "ready: export KUBECONFIG=$DIR/kubeconfig"
}

case "$cmd" in
  start) mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd); start ;;
  stop) stop ;;
  dump) dump ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
