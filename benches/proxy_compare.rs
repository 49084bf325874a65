//! Side-by-side benchmark of the CONNECT proxy against its peers, in one run on loopback
//! (`make bench-proxy`, which installs haproxy, squid and tinyproxy from Debian):
//! direct (the limit), HAProxy 2.6 `mode tcp` with splice forced both ways to a fixed target,
//! squid, tinyproxy and ours. Measures 1- and 8-stream throughput in the display direction
//! (server → client), proxy CPU seconds per GiB (and the load generator's: what the peer's way of
//! moving bytes costs the two ends), tunnel setup rate, CPU per tunnel (the peer's,
//! and the load generator's with the targets, which is the same code for every peer: a
//! CONNECT exchange shows up there) and p99 setup latency, 64-byte echo p99, and RSS per idle
//! tunnel with 2,000 tunnels open. Medians of 3 runs (throughput, set-up and echo), taken in rounds
//! that visit every peer in turn, so a slow minute on a shared machine costs each peer one run
//! rather than all of one peer's runs. Each peer reaches the target at an address of its own
//! (127.0.0.1, .2, ...): set-up runs leave tens of thousands of TIME_WAIT entries, and the next
//! peer's connects to the same address and port would pay for searching past them.
//!
//! Run as root, it runs in a network namespace of its own (`BENCH_NETNS=0`: in the caller's),
//! so the set-up rates do not depend on what ran before. Every tunnel leaves TIME_WAIT entries,
//! and a connect may reuse a port whose entry towards the same address and port is older than
//! `tcp_tw_reuse_delay` (1 s); connect(2) tries even ports first, so the default range
//! (32768-60999) allows about 14,100 connects a second to one address and port, after which
//! every connect searches the whole range: with the default range direct loopback stops at
//! 14,600 set-ups a second at 130 µs of CPU each and HAProxy at 14,100, whatever they could do.
//! A table left full by an earlier run (its `tcp_max_tw_buckets`) has the opposite effect: no
//! new entries, no search. So the namespace starts with none and has the range widened to
//! 1024-65535, as the tuning guides of HAProxy and squid advise for a proxy's host. It inherits
//! the host's congestion control; `BENCH_CONGESTION=cubic` sets another in the namespace.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{StreamEnd, cpu_seconds, family_kib, free_port, median, own_cpu_seconds, target_server, wait_listening};

const GIB: u64 = 1 << 30;
const IDLE_TUNNELS: usize = 2000;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Raw,     // haproxy: a fixed target, no CONNECT
    Connect, // CONNECT host:port HTTP/1.0
}

struct Peer {
    name: &'static str,
    kind: Kind,
    addr: SocketAddr,
    /// The target's address for this peer's tunnels.
    target: SocketAddr,
    child: Option<Child>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The target on one port at `count` loopback addresses (127.0.0.1, .2, ...), one per peer.
async fn target_servers(count: u8) -> Vec<SocketAddr> {
    'port: loop {
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 2..=count {
            match TcpListener::bind(SocketAddr::from(([127, 0, 0, i], port))).await {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'port, // taken at one of the addresses: try another port
            }
        }
        return listeners.into_iter().map(|l| target_server(l, StreamEnd::Shutdown)).collect();
    }
}

async fn open(peer: &Peer, cmd: u8, n: u64) -> TcpStream {
    let target = peer.target;
    let addr = if peer.kind == Kind::Direct { target } else { peer.addr };
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    if peer.kind == Kind::Connect {
        s.write_all(format!("CONNECT {target} HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
        // The target says nothing before it gets the command below, so the reply head is all
        // there is to read: whole reads, not a byte at a time (the load generator shares the CPUs).
        let mut head = Vec::with_capacity(256);
        let mut b = [0u8; 512];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).await.expect("proxy reply");
            assert!(n > 0, "{} closed before replying", peer.name);
            head.extend_from_slice(&b[..n]);
        }
        assert!(head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"), "{} refused: {}", peer.name, String::from_utf8_lossy(&head));
    }
    let mut c = [0u8; 9];
    c[0] = cmd;
    c[1..].copy_from_slice(&n.to_le_bytes());
    s.write_all(&c).await.unwrap();
    s
}

fn rss_kib(pid: u32) -> u64 {
    family_kib(pid, "status", "VmRSS:")
}

/// Gbit/s, the peer's CPU seconds per GiB, and the load generator's and target's (sender and
/// receiver: what the peer's way of moving bytes costs the two ends, on the same CPUs).
async fn throughput(peer: &Peer, streams: u64, total: u64) -> (f64, f64, f64) {
    let pid = peer.child.as_ref().map(|c| c.id());
    let (cpu0, own0) = (cpu_seconds(pid), own_cpu_seconds());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut s = open(peer, b'S', total / streams).await;
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got += n as u64;
            }
        }));
    }
    let mut got = 0;
    for t in tasks {
        got += t.await.unwrap();
    }
    assert_eq!(got, total, "{}: bytes lost", peer.name);
    let secs = started.elapsed().as_secs_f64();
    let (cpu, own) = (cpu_seconds(pid) - cpu0, own_cpu_seconds() - own0);
    let gib = total as f64 / GIB as f64;
    (total as f64 * 8.0 / secs / 1e9, cpu / gib, own / gib)
}

/// Set-up rate, p99 set-up latency, the peer's CPU µs per tunnel, and the load generator's
/// and targets' CPU µs per tunnel, with `clients` opening tunnels at once.
async fn setup(peer: &Peer, clients: usize) -> (f64, f64, f64, f64) {
    let pid = peer.child.as_ref().map(|c| c.id());
    let (cpu0, own0) = (cpu_seconds(pid), own_cpu_seconds());
    let peer_kind = peer.kind;
    let (peer_addr, target) = (peer.addr, peer.target);
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let count = count.clone();
        let p = Peer { name: "setup", kind: peer_kind, addr: peer_addr, target, child: None };
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let mut s = open(&p, b'G', 0).await;
                let mut g = [0u8; 1];
                s.read_exact(&mut g).await.unwrap();
                lat.push(t.elapsed().as_secs_f64());
                count.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let done = count.load(Ordering::Relaxed) as f64;
    let rate = done / started.elapsed().as_secs_f64().max(3.0);
    let cpu_us = (cpu_seconds(pid) - cpu0) / done * 1e6;
    let own_us = (own_cpu_seconds() - own0) / done * 1e6;
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (rate, all[all.len() * 99 / 100] * 1000.0, cpu_us, own_us)
}

/// Round trips per echo figure. The p99 of 10,000 is the 100th-worst sample: a few samples of
/// 1-10 ms come on this machine with no proxy at all (the direct row; docs/proxy-benchmark.md),
/// and with 3,000 round trips they moved one run's p99 by tens of µs.
const ECHOES: usize = 10_000;

async fn echo_p99(peer: &Peer) -> f64 {
    let mut s = open(peer, b'E', 0).await;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut lat = Vec::with_capacity(ECHOES);
    for _ in 0..ECHOES {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        lat.push(t.elapsed().as_secs_f64());
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat[lat.len() * 99 / 100] * 1e6
}

async fn idle_rss(peer: &Peer) -> Option<f64> {
    let pid = peer.child.as_ref()?.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(IDLE_TUNNELS);
    for _ in 0..IDLE_TUNNELS {
        let mut s = open(peer, b'G', 0).await;
        let mut g = [0u8; 1];
        s.read_exact(&mut g).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    drop(held);
    Some(after.saturating_sub(before) as f64 / IDLE_TUNNELS as f64)
}

fn spawn(name: &'static str, kind: Kind, port: u16, target: SocketAddr, cmd: &mut Command) -> Peer {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{name}: {e}"));
    wait_listening(port, name);
    Peer { name, kind, addr: SocketAddr::from(([127, 0, 0, 1], port)), target, child: Some(child) }
}

/// The peers, in table order; `targets` has one address for each.
fn peers(dir: &std::path::Path, targets: &[SocketAddr]) -> Vec<Peer> {
    let mut out = vec![Peer { name: "direct", kind: Kind::Direct, addr: targets[0], target: targets[0], child: None }];

    let target = targets[1];
    let p = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, format!("global\n  maxconn 5000\n  tune.pipesize 1048576\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  option splice-request\n  option splice-response\nfrontend f\n  bind 127.0.0.1:{p}\n  default_backend b\nbackend b\n  server s {target}\n")).unwrap();
    out.push(spawn("haproxy (splice)", Kind::Raw, p, target, Command::new("haproxy").args(["-db", "-f"]).arg(&cfg)));

    let target = targets[2];
    let p = free_port();
    let sq = dir.join("squid");
    std::fs::create_dir_all(&sq).unwrap();
    let _ = Command::new("chmod").args(["777"]).arg(&sq).status();
    let cfg = sq.join("squid.conf");
    std::fs::write(&cfg, format!("http_port 127.0.0.1:{p}\nacl all src all\nhttp_access allow all\ncache deny all\naccess_log none\ncache_log {0}/cache.log\npid_filename {0}/squid.pid\ncoredump_dir {0}\nmax_filedescriptors 16384\nshutdown_lifetime 0 seconds\n", sq.display())).unwrap();
    out.push(spawn("squid", Kind::Connect, p, target, Command::new("squid").args(["-N", "-f"]).arg(&cfg)));

    let target = targets[3];
    let p = free_port();
    let cfg = dir.join("tinyproxy.conf");
    std::fs::write(&cfg, format!("Port {p}\nListen 127.0.0.1\nTimeout 3600\nMaxClients 4000\nAllow 127.0.0.1\nLogLevel Critical\n")).unwrap();
    out.push(spawn("tinyproxy", Kind::Connect, p, target, Command::new("tinyproxy").args(["-d", "-c"]).arg(&cfg)));

    let bin = std::env::var("SPICE_OPERATOR_BIN").unwrap_or_else(|_| "target/release/spice-operator".into());
    out.push(ours("spice-operator", &bin, targets[4], dir, serde_json::json!({})));
    let mut extra = targets[5..].iter();
    // A second build of ours in the same rounds: an A/B comparison that the noise between
    // separate runs cannot blur.
    if let Ok(bin) = std::env::var("BENCH_B_BIN") {
        // BENCH_B_CLIENT_SOCKET='{"congestionControl":"cubic"}': ours-b with other client sockets.
        let client_socket = std::env::var("BENCH_B_CLIENT_SOCKET").map(|v| serde_json::from_str(&v).expect("BENCH_B_CLIENT_SOCKET is JSON")).unwrap_or_else(|_| serde_json::json!({}));
        out.push(ours("ours-b", &bin, *extra.next().unwrap(), dir, client_socket));
    }
    if let Ok(proto) = std::env::var("BENCH_SOCKMAP") {
        let target = *extra.next().unwrap();
        let p = free_port();
        out.push(spawn("sockmap", Kind::Raw, p, target, Command::new(proto).arg(p.to_string()).arg(target.ip().to_string()).arg(target.port().to_string())));
    }
    out
}

/// Our proxy, configured as the operator renders it but with no authentication and limits no
/// benchmark reaches.
/// `client_socket`: the configuration's `clientSocket` (send buffer, congestion control).
fn ours(name: &'static str, bin: &str, target: SocketAddr, dir: &std::path::Path, client_socket: serde_json::Value) -> Peer {
    let p = free_port();
    let admin = free_port();
    let cfg = dir.join(format!("{name}.json"));
    std::fs::write(&cfg, serde_json::json!({
        // What the operator renders: both families on one socket (IPv4 clients as ::ffff:a.b.c.d).
        "listen": format!("[::]:{p}"), "adminListen": format!("127.0.0.1:{admin}"),
        "allowedTargets": [{"cidr": format!("{}/32", target.ip()), "ports": [[target.port(), target.port()]]}],
        "authMode": "None", "keysDir": null, "basicDir": null,
        "limits": {"maxTunnels": 20000, "maxTunnelsPerClient": 20000, "idleTimeoutSeconds": 3600,
                   "connectTimeoutSeconds": 5, "handshakeTimeoutSeconds": 10, "drainSeconds": 0, "shutdownDelaySeconds": 0},
        "clientSocket": client_socket
    }).to_string()).unwrap();
    spawn(name, Kind::Connect, p, target, Command::new(bin).args(["proxy", "--config"]).arg(&cfg))
}

/// What one peer measured; throughput and set-up figures hold one entry per round.
#[derive(Default)]
struct Figures {
    one: Vec<f64>,
    eight: Vec<f64>,
    cpu: Vec<f64>,
    client_cpu: Vec<f64>,
    rates: Vec<f64>,
    p99s: Vec<f64>,
    echoes: Vec<f64>,
    setup_cpus: Vec<f64>,
    client_cpus: Vec<f64>,
}

const ROUNDS: usize = 3;

/// Moves this process into a network namespace of its own (see the top of the file) and
/// describes the network the run had, for the table's heading.
fn own_network() -> String {
    // A sysctl's words joined by `sep` (a port range's two ends, a list of algorithms).
    let sysctl = |name: &str, sep: &str| std::fs::read_to_string(format!("/proc/sys/net/{name}")).map(|v| v.split_whitespace().collect::<Vec<_>>().join(sep)).unwrap_or_else(|_| "?".into());
    let entered = if std::env::var("BENCH_NETNS").as_deref() == Ok("0") {
        Err("BENCH_NETNS=0".to_string())
    } else {
        // Before any thread starts: unshare(2) moves only the calling thread, and every thread
        // and child started later is born where it is.
        // SAFETY: only the network namespace changes; no file table or memory is unshared.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.map_err(|e| format!("unshare: {e}, run as root for one"))
    };
    match entered {
        Ok(()) => {
            let lo = Command::new("ip").args(["link", "set", "lo", "up"]).status();
            assert!(lo.is_ok_and(|s| s.success()), "ip link set lo up failed in the benchmark's network namespace (needs iproute2)");
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").expect("widening the port range");
            if let Ok(cc) = std::env::var("BENCH_CONGESTION") {
                std::fs::write("/proc/sys/net/ipv4/tcp_congestion_control", &cc).unwrap_or_else(|e| panic!("BENCH_CONGESTION={cc}: {e} (the kernel offers {})", sysctl("ipv4/tcp_available_congestion_control", ", ")));
            }
            format!("a network namespace of its own, local ports {}, congestion control {}", sysctl("ipv4/ip_local_port_range", "-"), sysctl("ipv4/tcp_congestion_control", ""))
        }
        Err(why) => {
            assert!(std::env::var_os("BENCH_CONGESTION").is_none(), "BENCH_CONGESTION only applies in the benchmark's own network namespace ({why})");
            let tw = std::fs::read_to_string("/proc/net/sockstat").ok().and_then(|s| s.lines().find(|l| l.starts_with("TCP:")).and_then(|l| l.split_whitespace().skip_while(|w| *w != "tw").nth(1).map(str::to_string))).unwrap_or_else(|| "?".into());
            format!("the caller's network namespace ({why}): local ports {}, congestion control {}, {tw} TIME_WAIT entries at the start, so set-up rates depend on earlier runs", sysctl("ipv4/ip_local_port_range", "-"), sysctl("ipv4/tcp_congestion_control", ""))
        }
    }
}

fn main() {
    let network = own_network();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(run(&network));
}

async fn run(network: &str) {
    let per_run: u64 = std::env::var("BENCH_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2) * GIB;
    let dir = tempfile::tempdir().unwrap();
    // One target per peer, and one for each extra peer asked for (a second build, sockmap).
    let targets = target_servers(5 + ["BENCH_B_BIN", "BENCH_SOCKMAP"].iter().filter(|v| std::env::var_os(v).is_some()).count() as u8).await;
    // BENCH_PEERS=squid,spice-operator: only those (direct is always measured).
    let only: Option<Vec<String>> = std::env::var("BENCH_PEERS").ok().map(|v| v.split(',').map(str::to_string).collect());
    let peers: Vec<Peer> = peers(dir.path(), &targets)
        .into_iter()
        .filter(|p| p.kind == Kind::Direct || only.as_ref().is_none_or(|o| o.iter().any(|n| p.name.starts_with(n.as_str()))))
        .collect();
    let mut figures: Vec<Figures> = peers.iter().map(|_| Figures::default()).collect();
    // BENCH_GIB=0 skips the throughput runs (set-up, echo and memory only).
    for _ in 0..if per_run == 0 { 0 } else { ROUNDS } {
        for (peer, f) in peers.iter().zip(&mut figures) {
            let (g, c, own) = throughput(peer, 1, per_run).await;
            f.one.push(g);
            f.cpu.push(c);
            f.client_cpu.push(own);
            let (g, c, own) = throughput(peer, 8, per_run).await;
            f.eight.push(g);
            f.cpu.push(c);
            f.client_cpu.push(own);
        }
    }
    // A set-up rate is a capacity: measured with enough clients opening tunnels at once that
    // no peer leaves the CPUs idle (with 4, ours left 28 % of them idle, waiting on the hand-offs
    // of the CONNECT exchange). Latency is measured under a moderate load instead, where it
    // is what a user's console waits, not the length of a queue.
    let concurrency = |var: &str, default: usize| std::env::var(var).ok().map(|v| v.parse::<usize>().unwrap_or_else(|_| panic!("{var}={v}: not a number"))).unwrap_or(default);
    let (rate_clients, latency_clients) = (concurrency("BENCH_CONCURRENCY", 32), concurrency("BENCH_LATENCY_CONCURRENCY", 4));
    for _ in 0..ROUNDS {
        for (peer, f) in peers.iter().zip(&mut figures) {
            let (rate, _, cpu_us, own_us) = setup(peer, rate_clients).await;
            f.rates.push(rate);
            f.setup_cpus.push(cpu_us);
            f.client_cpus.push(own_us);
            let (_, p99, _, _) = setup(peer, latency_clients).await;
            f.p99s.push(p99);
            f.echoes.push(echo_p99(peer).await);
        }
    }
    println!("loopback in {network}; {} GiB per throughput run in the display direction; set-ups by {rate_clients} clients at once, their p99 latency by {latency_clients}; medians of {ROUNDS} rounds\n", per_run / GIB);
    println!("| peer | 1 stream Gbit/s | 8 streams Gbit/s | CPU s/GiB | client CPU s/GiB | setups/s | CPU µs/setup | client CPU µs/setup | p99 setup ms | echo p99 µs | RSS KiB per idle tunnel |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (peer, f) in peers.iter().zip(figures) {
        let echo = median(f.echoes);
        let rss = idle_rss(peer).await.map(|r| format!("{r:.1}")).unwrap_or_else(|| "-".into());
        let (cpu, setup_cpu) = match peer.child {
            Some(_) => (format!("{:.2}", median(f.cpu)), format!("{:.0}", median(f.setup_cpus))),
            None => ("-".into(), "-".into()),
        };
        let client_cpu = if f.client_cpu.is_empty() { "-".into() } else { format!("{:.2}", median(f.client_cpu)) };
        println!("| {} | {:.1} | {:.1} | {} | {} | {:.0} | {} | {:.0} | {:.2} | {:.0} | {} |", peer.name, median(f.one), median(f.eight), cpu, client_cpu, median(f.rates), setup_cpu, median(f.client_cpus), median(f.p99s), echo, rss);
    }
}
