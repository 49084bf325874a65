// Experiment (docs/proxy-benchmark.md, "Not met: throughput"): a fixed-target forwarder in which every direction
// has two threads, one splicing socket -> pipe, the other pipe -> socket, so the pipe is a queue
// between them and reading the next bytes overlaps with sending the last ones. Not adopted: it
// costs more CPU per GiB than one thread doing both in turn and moves no more bytes.
//   gcc -O2 -pthread -o /tmp/split-forward hack/experiments/split-forward.c
//   BENCH_PEERS=haproxy,spice-operator,sockmap BENCH_SOCKMAP=/tmp/split-forward make bench-proxy
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

struct conn { int a, b; atomic_int refs; };
struct dir { struct conn *c; int src, dst, pr, pw; };

static void release(struct conn *c) {
    if (atomic_fetch_sub(&c->refs, 1) == 1) { close(c->a); close(c->b); free(c); }
}
// Every fd is non-blocking and each thread waits in poll(2): a blocking splice holds the pipe's
// lock while it waits for its socket, which would stall the other thread.
static void wait_for(int fd, short ev) {
    struct pollfd p = {fd, ev, 0};
    poll(&p, 1, -1);
}
static ssize_t move(int from, int to, int from_ev_fd, int to_ev_fd) {
    for (;;) {
        ssize_t n = splice(from, NULL, to, NULL, 1 << 20, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n >= 0 || errno != EAGAIN) return n;
        // Which side is not ready: try the source first.
        struct pollfd p[2] = {{from_ev_fd, POLLIN, 0}, {to_ev_fd, POLLOUT, 0}};
        poll(p, 2, -1);
        if (!(p[0].revents) ) wait_for(from_ev_fd, POLLIN);
        if (!(p[1].revents) ) wait_for(to_ev_fd, POLLOUT);
    }
}
static void *pump_in(void *p) {
    struct dir *d = p;
    while (move(d->src, d->pw, d->src, d->pw) > 0) {}
    struct conn *c = d->c; // pump_out frees d once the pipe's end is read
    close(d->pw);
    release(c);
    return NULL;
}
static void *pump_out(void *p) {
    struct dir *d = p;
    while (move(d->pr, d->dst, d->pr, d->dst) > 0) {}
    shutdown(d->dst, SHUT_WR);
    close(d->pr);
    release(d->c);
    free(d);
    return NULL;
}
static pthread_attr_t attr;
static void start(struct conn *c, int src, int dst) {
    struct dir *d = malloc(sizeof *d);
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK)) { perror("pipe"); exit(1); }
    fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    *d = (struct dir){c, src, dst, p[0], p[1]};
    pthread_t t;
    pthread_create(&t, &attr, pump_in, d);
    pthread_create(&t, &attr, pump_out, d);
}
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s port target-ip target-port\n", argv[0]); return 2; }
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &to.sin_addr);
    if (bind(l, (void *)&me, sizeof me) || listen(l, 4096)) { perror("listen"); return 1; }
    for (;;) {
        int a = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (a < 0) continue;
        int b = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(b, (void *)&to, sizeof to)) { close(a); close(b); continue; }
        fcntl(a, F_SETFL, O_NONBLOCK);
        fcntl(b, F_SETFL, O_NONBLOCK);
        struct conn *c = malloc(sizeof *c);
        *c = (struct conn){a, b, 4};
        start(c, a, b);
        start(c, b, a);
    }
}
