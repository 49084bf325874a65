//! The WebSocket bridge against websockify (Debian's, what nova's spicehtml5proxy and oVirt
//! run), in one run on loopback (`make bench-bridge`): direct TCP (the limit), websockify and
//! ours. Measures 1- and 8-stream throughput in the display direction (server → browser),
//! bridge CPU seconds per GiB, connection setup rate and p99 (WebSocket handshake to first
//! byte from the server), 64-byte echo p99, and memory (PSS) per open connection with up to
//! 2,000 held open. Medians of 3 throughput runs.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

mod common;
use common::{StreamEnd, cpu_seconds, family_kib, free_port, median, own_cpu_seconds, target_server, wait_listening};

const GIB: u64 = 1 << 30;
const HELD: usize = 2000;

struct Peer {
    name: &'static str,
    /// None: plain TCP to the target (direct).
    url: Option<String>,
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

/// One connection, either plain TCP or a WebSocket through a bridge.
enum Conn {
    Tcp(TcpStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>),
}

impl Conn {
    async fn open(peer: &Peer, target: SocketAddr, cmd: u8, n: u64) -> Result<Conn, String> {
        let mut c = [0u8; 9];
        c[0] = cmd;
        c[1..].copy_from_slice(&n.to_le_bytes());
        match &peer.url {
            None => {
                let mut s = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                s.write_all(&c).await.map_err(|e| e.to_string())?;
                Ok(Conn::Tcp(s))
            }
            Some(url) => {
                let mut req = url.as_str().into_client_request().unwrap();
                req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
                let (mut ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| e.to_string())?;
                ws.send(Message::binary(c.to_vec())).await.map_err(|e| e.to_string())?;
                Ok(Conn::Ws(Box::new(ws)))
            }
        }
    }

    /// Reads until `want` bytes arrived (or the end); returns how many.
    async fn read_bytes(&mut self, want: u64) -> u64 {
        let mut got = 0u64;
        match self {
            Conn::Tcp(s) => {
                let mut buf = vec![0u8; 1 << 20];
                while got < want {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n as u64,
                    }
                }
            }
            Conn::Ws(ws) => {
                while got < want {
                    match ws.next().await {
                        Some(Ok(Message::Binary(d))) => got += d.len() as u64,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => {}
                    }
                }
            }
        }
        got
    }

    async fn send(&mut self, data: &[u8]) {
        match self {
            Conn::Tcp(s) => s.write_all(data).await.unwrap(),
            Conn::Ws(ws) => ws.send(Message::binary(data.to_vec())).await.unwrap(),
        }
    }
}

/// Proportional set size of the process and its children, KiB.
fn pss_kib(pid: u32) -> u64 {
    family_kib(pid, "smaps_rollup", "Pss:")
}

/// Gbit/s, the bridge's CPU seconds per GiB, and the load generator's and target's (the
/// browser's end and the hypervisor's: what the bridge's framing costs them, on the same CPUs).
async fn throughput(peer: &Peer, target: SocketAddr, streams: u64, total: u64) -> (f64, f64, f64) {
    let pid = peer.child.as_ref().map(|c| c.id());
    let (cpu0, own0) = (cpu_seconds(pid), own_cpu_seconds());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut c = Conn::open(peer, target, b'S', total / streams).await.expect("open");
        let want = total / streams;
        tasks.push(tokio::spawn(async move { c.read_bytes(want).await }));
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

async fn setup(peer: &Peer, target: SocketAddr) -> (f64, f64) {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let count = count.clone();
        let p = Peer { name: peer.name, url: peer.url.clone(), child: None };
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let Ok(mut c) = Conn::open(&p, target, b'G', 0).await else { continue };
                if c.read_bytes(1).await == 1 {
                    lat.push(t.elapsed().as_secs_f64());
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(3.0);
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (rate, all.get(all.len() * 99 / 100).copied().unwrap_or(f64::NAN) * 1000.0)
}

async fn echo_p99(peer: &Peer, target: SocketAddr) -> f64 {
    let mut c = Conn::open(peer, target, b'E', 0).await.expect("open");
    let msg = [7u8; 64];
    let mut lat = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        c.send(&msg).await;
        assert_eq!(c.read_bytes(64).await, 64);
        lat.push(t.elapsed().as_secs_f64());
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat[lat.len() * 99 / 100] * 1e6
}

/// Opens up to HELD connections (each greeted by the server); stops at the first failure.
async fn held(peer: &Peer, target: SocketAddr) -> Option<(usize, f64)> {
    let pid = peer.child.as_ref()?.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = pss_kib(pid);
    let mut open = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        match tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = Conn::open(peer, target, b'G', 0).await?;
            if c.read_bytes(1).await == 1 { Ok(c) } else { Err("no greeting".to_string()) }
        })
        .await
        {
            Ok(Ok(c)) => open.push(c),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = pss_kib(pid);
    let n = open.len();
    drop(open);
    Some((n, after.saturating_sub(before) as f64 / n.max(1) as f64))
}

fn spawn(name: &'static str, port: u16, url: String, cmd: &mut Command) -> Peer {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{name}: {e}"));
    wait_listening(port, name);
    Peer { name, url: Some(url), child: Some(child) }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let per_run: u64 = std::env::var("BENCH_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1) * GIB;
    let dir = tempfile::tempdir().unwrap();
    let target = target_server(TcpListener::bind("127.0.0.1:0").await.unwrap(), StreamEnd::HoldUntilClientCloses);
    let mut peers = vec![Peer { name: "direct (TCP)", url: None, child: None }];

    let p = free_port();
    peers.push(spawn("websockify", p, format!("ws://127.0.0.1:{p}/websockify"), Command::new("websockify").arg(format!("127.0.0.1:{p}")).arg(target.to_string())));

    let (p, admin, listen) = (free_port(), free_port(), free_port());
    let key = b"bench-key-bench-key-bench-key-32";
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/current"), key).unwrap();
    let cfg = dir.path().join("ours.json");
    std::fs::write(&cfg, serde_json::json!({
        "listen": format!("127.0.0.1:{listen}"), "adminListen": format!("127.0.0.1:{admin}"),
        "allowedTargets": [{"cidr": "127.0.0.1/32", "ports": [[target.port(), target.port()]]}],
        "authMode": "Ticket", "keysDir": dir.path().join("keys"),
        "limits": {"maxTunnels": 20000, "maxTunnelsPerClient": 20000, "idleTimeoutSeconds": 3600,
                   "connectTimeoutSeconds": 5, "handshakeTimeoutSeconds": 10, "drainSeconds": 0, "shutdownDelaySeconds": 0},
        "html5": {"listen": format!("127.0.0.1:{p}"), "staticDir": "/usr/share/spice-html5"}
    }).to_string()).unwrap();
    let claims = spice_operator::proxy::ticket::Claims { host: "127.0.0.1".into(), ports: vec![target.port()], expires: spice_operator::proxy::ticket::now() + 3600, subject: "bench".into() };
    let token = spice_operator::proxy::ticket::mint(key, &claims);
    let bin = std::env::var("SPICE_OPERATOR_BIN").unwrap_or_else(|_| "target/release/spice-operator".into());
    peers.push(spawn("spice-operator", p, format!("ws://127.0.0.1:{p}/websockify?token={token}"), Command::new(bin).args(["proxy", "--config"]).arg(&cfg)));

    println!("loopback, {} GiB per throughput run in the display direction, medians of 3\n", per_run / GIB);
    println!("| peer | 1 stream Gbit/s | 8 streams Gbit/s | CPU s/GiB | client CPU s/GiB | setups/s | p99 setup ms | echo p99 µs | connections held (of {HELD}) | PSS KiB per connection |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for peer in &peers {
        let (mut one, mut eight, mut cpu, mut client_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            for (streams, gbits) in [(1, &mut one), (8, &mut eight)] {
                let (g, c, own) = throughput(peer, target, streams, per_run).await;
                gbits.push(g);
                cpu.push(c);
                client_cpu.push(own);
            }
        }
        let (rate, p99) = setup(peer, target).await;
        let echo = echo_p99(peer, target).await;
        let (n, pss) = match held(peer, target).await {
            Some((n, pss)) => (n.to_string(), format!("{pss:.1}")),
            None => ("-".into(), "-".into()),
        };
        let cpu = if peer.child.is_some() { format!("{:.2}", median(cpu)) } else { "-".into() };
        println!("| {} | {:.1} | {:.1} | {} | {:.2} | {:.0} | {:.2} | {:.0} | {} | {} |", peer.name, median(one), median(eight), cpu, median(client_cpu), rate, p99, echo, n, pss);
    }
}
