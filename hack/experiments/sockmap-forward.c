// An experiment, not part of the product: a fixed-target TCP forwarder (like HAProxy `mode tcp`)
// whose data path is a BPF sockhash redirect (sk_skb verdict, bpf_sk_redirect_hash), so bytes go
// from one socket's receive path to the other's send path inside the kernel and never reach a
// pipe or user space. It measured about half of HAProxy's forced-splice throughput (docs/proxy-benchmark.md,
// "Not met: throughput"), so the proxy does not use it.
//
//   gcc -O2 -o /tmp/sockmap-forward hack/experiments/sockmap-forward.c -lpthread
//   BENCH_SOCKMAP=/tmp/sockmap-forward BENCH_PEERS=haproxy,spice-operator,sockmap make bench-proxy
//
// Needs root (CAP_BPF and CAP_NET_ADMIN). STREAM=1 attaches the program as a stream verdict
// instead of an skb verdict (measured the same). One thread per tunnel: fine for throughput.
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <linux/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>
#include <time.h>

static int map_fd;
static struct sockaddr_in target;
static long bpf(int cmd, union bpf_attr *a) { return syscall(__NR_bpf, cmd, a, sizeof(*a)); }

static int load(void) {
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.map_type = BPF_MAP_TYPE_SOCKHASH; a.key_size = 8; a.value_size = 4; a.max_entries = 65536;
  map_fd = bpf(BPF_MAP_CREATE, &a); if (map_fd < 0) { perror("map"); exit(1); }
  struct bpf_insn p[] = {
    { .code = BPF_ALU64|BPF_MOV|BPF_X, .dst_reg = 6, .src_reg = 1 },            // r6 = ctx
    { .code = BPF_JMP|BPF_CALL, .imm = BPF_FUNC_get_socket_cookie },           // r0 = cookie
    { .code = BPF_STX|BPF_MEM|BPF_DW, .dst_reg = 10, .src_reg = 0, .off = -8 },// *(fp-8) = r0
    { .code = BPF_ALU64|BPF_MOV|BPF_X, .dst_reg = 1, .src_reg = 6 },            // r1 = ctx
    { .code = BPF_LD|BPF_DW|BPF_IMM, .dst_reg = 2, .src_reg = BPF_PSEUDO_MAP_FD, .imm = map_fd },
    { 0 },
    { .code = BPF_ALU64|BPF_MOV|BPF_X, .dst_reg = 3, .src_reg = 10 },
    { .code = BPF_ALU64|BPF_ADD|BPF_K, .dst_reg = 3, .imm = -8 },
    { .code = BPF_ALU64|BPF_MOV|BPF_K, .dst_reg = 4, .imm = 0 },
    { .code = BPF_JMP|BPF_CALL, .imm = BPF_FUNC_sk_redirect_hash },
    { .code = BPF_JMP|BPF_EXIT },
  };
  static char log[65536];
  memset(&a, 0, sizeof a);
  a.prog_type = BPF_PROG_TYPE_SK_SKB; a.insns = (uint64_t)(uintptr_t)p; a.insn_cnt = sizeof p / sizeof p[0];
  a.license = (uint64_t)(uintptr_t)"GPL"; a.log_buf = (uint64_t)(uintptr_t)log; a.log_size = sizeof log; a.log_level = 1;
  int prog = bpf(BPF_PROG_LOAD, &a); if (prog < 0) { perror("prog"); fprintf(stderr, "%s\n", log); exit(1); }
  memset(&a, 0, sizeof a);
  a.target_fd = map_fd; a.attach_bpf_fd = prog; a.attach_type = getenv("STREAM") ? BPF_SK_SKB_STREAM_VERDICT : BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH, &a) < 0) { perror("attach"); exit(1); }
  return 0;
}

static uint64_t cookie(int fd) { uint64_t c; socklen_t l = sizeof c; if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l)) { perror("cookie"); exit(1);} return c; }
static int put(uint64_t key, int fd) {
  union bpf_attr a; memset(&a, 0, sizeof a); uint32_t v = fd;
  a.map_fd = map_fd; a.key = (uint64_t)(uintptr_t)&key; a.value = (uint64_t)(uintptr_t)&v; a.flags = BPF_ANY;
  return bpf(BPF_MAP_UPDATE_ELEM, &a);
}
static void del(uint64_t key) { union bpf_attr a; memset(&a, 0, sizeof a); a.map_fd = map_fd; a.key = (uint64_t)(uintptr_t)&key; bpf(BPF_MAP_DELETE_ELEM, &a); }

static uint64_t received(int fd) { struct tcp_info t; socklen_t l = sizeof t; getsockopt(fd, IPPROTO_TCP, TCP_INFO, &t, &l); return t.tcpi_bytes_received; }
static uint64_t written(int fd) { struct tcp_info t; socklen_t l = sizeof t; getsockopt(fd, IPPROTO_TCP, TCP_INFO, &t, &l); int q = 0; ioctl(fd, SIOCOUTQ, &q); return t.tcpi_bytes_acked + q; }
// The redirect queue in the kernel may still hold bytes for `to`: wait until `to` has taken all `from` received (the FIN counts one).
static void drained(int from, int to) { for (int i = 0; i < 100000; i++) { if (written(to) + 1 >= received(from)) return; struct timespec ts = {0, 100000}; nanosleep(&ts, 0); } fprintf(stderr, "drain timeout\n"); }
static void *tunnel(void *arg) {
  int c = (int)(intptr_t)arg;
  int u = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(u, (struct sockaddr *)&target, sizeof target)) { close(c); close(u); return 0; }
  uint64_t kc = cookie(c), ku = cookie(u);
  if (put(kc, u) || put(ku, c)) { del(kc); close(c); close(u); return 0; }
  // What the client sent before the redirect was in place waits in the receive queue, which the
  // verdict program never sees: forward it by hand (the benchmark's raw clients send at once).
  char b[4096]; ssize_t n; while ((n = recv(c, b, sizeof b, MSG_DONTWAIT)) > 0) if (write(u, b, n) != n) break;
  struct pollfd f[2] = {{c, POLLRDHUP, 0}, {u, POLLRDHUP, 0}};
  int open = 2;
  while (open) {
    if (poll(f, 2, -1) < 0) break;
    for (int i = 0; i < 2; i++) if (f[i].fd >= 0 && f[i].revents) {
      drained(i ? u : c, i ? c : u);
      shutdown(i ? c : u, SHUT_WR); f[i].fd = -1; open--;
      if (f[i].revents & (POLLERR|POLLHUP)) open = 0;
    }
  }
  del(kc); del(ku); close(c); close(u); return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: %s LISTEN_PORT TARGET_IPV4 TARGET_PORT\n", argv[0]); return 2; }
  load();
  target.sin_family = AF_INET; target.sin_port = htons(atoi(argv[3])); inet_pton(AF_INET, argv[2], &target.sin_addr);
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1; setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) }; inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) { perror("listen"); return 1; }
  for (;;) {
    int c = accept(l, 0, 0); if (c < 0) continue;
    pthread_t t; pthread_attr_t at; pthread_attr_init(&at); pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED); pthread_attr_setstacksize(&at, 65536);
    pthread_create(&t, &at, tunnel, (void *)(intptr_t)c);
  }
}
