//! The browser path of the proxy on loopback: the page server (no traversal, no redirects),
//! every handshake refusal with its status, the Origin check, and the bridge itself (binary
//! both ways, ping/pong, close codes, oversized frames, half-close, a client that never reads,
//! drain), the PROXY protocol from a load balancer, with a real WebSocket client
//! (tokio-tungstenite).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use spice_operator::crd::{AuthMode, ProxyLimits};
use spice_operator::proxy::config::{AllowedTarget, Html5Config, ProxyConfig, TlsFiles, UpstreamTls};
use spice_operator::proxy::tunnel::DataPath;
use spice_operator::proxy::server::ProxyServer;
use spice_operator::proxy::ticket::{self, Claims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

mod common;
use common::{EXPIRED, VALID};

const KEY: &[u8] = b"websocket-test-key-0123456789abc";

struct Bridge {
    web: SocketAddr,
    admin: SocketAddr,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    dir: tempfile::TempDir,
}

impl Bridge {
    /// The configuration file the proxy reads again as it changes.
    fn config(&self) -> ProxyConfig {
        serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("config.json")).unwrap()).unwrap()
    }

    /// Replaces that file in one step (a rename), as the kubelet swaps a ConfigMap volume's files.
    fn replace_config(&self, text: &str) {
        std::fs::write(self.dir.path().join("config.json.new"), text).unwrap();
        std::fs::rename(self.dir.path().join("config.json.new"), self.dir.path().join("config.json")).unwrap();
    }
}

async fn start(idle: i32, drain: i32) -> Bridge {
    start_with(idle, drain, None).await
}

async fn start_with(idle: i32, drain: i32, tls: Option<(String, String)>) -> Bridge {
    start_edited(idle, drain, tls, |_| {}).await
}

async fn start_edited(idle: i32, drain: i32, tls: Option<(String, String)>, edit: impl FnOnce(&mut ProxyConfig)) -> Bridge {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/current"), KEY).unwrap();
    let pages = dir.path().join("pages");
    std::fs::create_dir_all(pages.join("thirdparty")).unwrap();
    std::fs::write(pages.join("spice_auto.html"), "<html><title>spice console</title></html>").unwrap();
    std::fs::write(pages.join("thirdparty/jsbn.js"), "var x = 1;").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "not for you").unwrap();
    let tls = tls.map(|(cert, key)| {
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        TlsFiles { cert_file: dir.path().join("tls.crt").to_string_lossy().into(), key_file: dir.path().join("tls.key").to_string_lossy().into() }
    });
    let cfg = ProxyConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        allowed_targets: vec![AllowedTarget { cidr: "127.0.0.1/32".parse().unwrap(), ports: vec![(1024, 65535)] }],
        auth_mode: AuthMode::Ticket,
        keys_dir: Some(dir.path().join("keys").to_string_lossy().into()),
        basic_dir: None,
        // Stopped bridges close their listener at once; the shutdown delay has its own test.
        limits: ProxyLimits { idle_timeout_seconds: idle, drain_seconds: drain, shutdown_delay_seconds: 0, ..ProxyLimits::default() },
        client_socket: Default::default(),
        data_path: DataPath::Splice,
        html5: Some(Html5Config { listen: "127.0.0.1:0".into(), static_dir: pages.to_string_lossy().into(), allowed_origins: vec!["https://portal.example.com".into()], tls, upstream_tls: None }),
        workers: None,
        proxy_protocol: None,
    };
    let mut cfg = cfg;
    edit(&mut cfg);
    // As the proxy binary does: the allow-list is read again from the file as it changes.
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let server = ProxyServer::bind(cfg).await.unwrap().reloading_config_from(dir.path().join("config.json"));
    let (web, admin) = (server.html5_addr().unwrap(), server.admin_addr());
    let (stop, rx) = watch::channel(false);
    let done = tokio::spawn(server.run(rx));
    Bridge { web, admin, stop, done, dir }
}

fn token(port: u16, ttl: i64, key: &[u8]) -> String {
    token_for("127.0.0.1", port, ttl, key)
}

fn token_for(host: &str, port: u16, ttl: i64, key: &[u8]) -> String {
    let expires = (ticket::now() as i64 + ttl) as u64;
    ticket::mint(key, &Claims { host: host.into(), ports: vec![port, port + 1], expires, subject: "vm-ws".into() })
}

/// A raw HTTP exchange: the whole response as text.
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open(b: &Bridge, query: &str, origin: Option<&str>) -> Result<Ws, WsError> {
    open_at(b.web, query, origin).await
}

async fn open_at(web: SocketAddr, query: &str, origin: Option<&str>) -> Result<Ws, WsError> {
    let mut req = format!("ws://{web}/websockify{query}").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", HeaderValue::from_str(o).unwrap());
    }
    tokio_tungstenite::connect_async(req).await.map(|(ws, resp)| {
        assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "binary");
        ws
    })
}

fn refused_with(r: Result<Ws, WsError>) -> (u16, String) {
    match r {
        Err(WsError::Http(resp)) => (resp.status().as_u16(), String::from_utf8_lossy(resp.body().as_deref().unwrap_or(&[])).into_owned()),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the WebSocket opened"),
    }
}

/// A TCP echo server standing in for the hypervisor; reports what it saw on a channel.
async fn echo() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<&'static str>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send("connected");
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send("eof");
                            // Half-close: still able to answer after the client stopped sending.
                            let _ = s.write_all(b"bye").await;
                            let _ = s.shutdown().await;
                            return;
                        }
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A WebSocket opened through a "load balancer": `header` (PROXY protocol) first, from `source`.
async fn open_behind(b: &Bridge, source: &str, header: &[u8], query: &str) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, WsError> {
    let mut stream = common::connect_from(source, b.web).unwrap();
    stream.write_all(header).await.unwrap();
    let mut req = format!("ws://{}/websockify{query}", b.web).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
    tokio_tungstenite::client_async(req, stream).await.map(|(ws, _)| ws)
}

#[tokio::test]
async fn behind_a_load_balancer_the_proxy_protocol_names_the_browser() {
    let (up, _seen) = echo().await;
    let b = start_edited(3600, 0, None, |c| {
        c.limits.max_tunnels_per_client = 1;
        c.proxy_protocol = Some(spice_operator::proxy::proxy_protocol::ProxyProtocolConfig { trusted: vec!["127.0.0.1/32".parse().unwrap()] });
    })
    .await;
    let q = format!("?token={}", token(up.port(), VALID, KEY));
    let header = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 6082\r\n").into_bytes();
    let mut ws = open_behind(&b, "127.0.0.1", &header("198.51.100.7"), &q).await.expect("bridge through the balancer");
    ws.send(Message::Binary(b"REDQ".to_vec().into())).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), b"REDQ");
    // The per-client limit (1) counts the browser the header names, not the balancer.
    let (code, body) = refused_with(open_behind(&b, "127.0.0.1", &header("198.51.100.7"), &q).await.map(|_| unreachable_ws()));
    assert_eq!(code, 503, "{body}");
    let _other = open_behind(&b, "127.0.0.1", &header("198.51.100.8"), &q).await.expect("another browser behind the same balancer");
    // Pages too: the proxy reads exactly the header and leaves the request to the HTTP server.
    let mut page = TcpStream::connect(b.web).await.unwrap();
    page.write_all(&[header("198.51.100.9"), b"GET /spice_auto.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()].concat()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), page.read_to_string(&mut out)).await;
    assert_eq!(status(&out), 200, "{out}");
    assert!(out.contains("spice console"));
    // Without a header, or from anywhere but the balancer: refused with a sentence.
    let resp = raw(b.web, "GET /spice_auto.html HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&resp), 400, "{resp}");
    assert!(resp.contains("does not begin with a PROXY protocol header"), "{resp}");
    match open_behind(&b, "127.0.0.2", &header("198.51.100.10"), &q).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        other => panic!("expected 403 from an address that is not a balancer, got {:?}", other.map(|_| ())),
    }
}

/// A load balancer at a new address is trusted by the browser port too without a restart, and
/// a console that came through the old one goes on.
#[tokio::test]
async fn a_new_load_balancer_is_trusted_by_the_browser_port_without_a_restart() {
    use spice_operator::proxy::proxy_protocol::ProxyProtocolConfig;
    let (up, _seen) = echo().await;
    let b = start_edited(3600, 0, None, |c| c.proxy_protocol = Some(ProxyProtocolConfig { trusted: vec!["127.0.0.2/32".parse().unwrap()] })).await;
    let q = format!("?token={}", token(up.port(), VALID, KEY));
    let header = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 6082\r\n";
    let mut old = open_behind(&b, "127.0.0.2", header, &q).await.expect("a console through the first balancer");
    let refused = |r: Result<tokio_tungstenite::WebSocketStream<TcpStream>, WsError>| match r {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(refused(open_behind(&b, "127.0.0.3", header, &q).await), 403);
    let mut cfg = b.config();
    cfg.proxy_protocol = Some(ProxyProtocolConfig { trusted: vec!["127.0.0.3/32".parse().unwrap()] });
    b.replace_config(&serde_json::to_string(&cfg).unwrap());
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let deadline = Instant::now() + within;
    let _new = loop {
        match open_behind(&b, "127.0.0.3", header, &q).await {
            Ok(ws) => break ws,
            Err(e) => {
                let code = refused(Err(e));
                assert!(code == 403 && Instant::now() < deadline, "the new balancer was not trusted within {within:?}: {code}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(refused(open_behind(&b, "127.0.0.2", header, &q).await), 403, "the old balancer is no longer trusted");
    echoes(&mut old, b"through the old balancer").await;
    let _ = b.stop.send(true);
}

/// `refused_with` takes the `connect_async` result type; a refusal never reaches this.
fn unreachable_ws() -> Ws {
    unreachable!("the WebSocket opened")
}

#[tokio::test]
async fn pages_are_served_without_traversal_or_redirects() {
    let b = start(600, 1).await;
    let r = raw(b.web, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.contains("spice console") && r.to_ascii_lowercase().contains("referrer-policy: no-referrer"), "{r}");
    let r = raw(b.web, "GET /spice_auto.html?token=abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&r), 200);
    assert!(r.to_ascii_lowercase().contains("content-type: text/html"));
    assert_eq!(status(&raw(b.web, "GET /thirdparty/jsbn.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await), 200);
    for path in ["//evil.example.com", "//evil.example.com/%2F..", "/../secret.txt", "/%2e%2e/secret.txt", "/.hidden", "/nope.html", "/thirdparty/../../secret.txt"] {
        let r = raw(b.web, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!(status(&r), 404, "{path}: {r}");
        assert!(!r.to_ascii_lowercase().contains("location:") && !r.contains("not for you"), "{path}: {r}");
    }
    assert_eq!(status(&raw(b.web, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await), 405);
    let _ = b.stop.send(true);
}

/// Until the connection closes (EOF or an error), at most `limit`: how long that took.
async fn closed_within(s: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .ok()?;
    Some(started.elapsed())
}

/// The browser port is on the internet: a connection must send its request head within
/// handshakeTimeoutSeconds, as a CONNECT client must. One that sends nothing, one that sends its
/// head a header line at a time (slowloris) and one kept alive with no second request are closed
/// then, so they cannot pile up until the proxy runs out of descriptors; a request in time is answered.
#[tokio::test]
async fn connections_that_send_no_request_in_time_are_closed() {
    let b = start_edited(600, 1, None, |c| c.limits.handshake_timeout_seconds = 2).await;
    let mut silent = TcpStream::connect(b.web).await.unwrap();
    let mut kept = TcpStream::connect(b.web).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    while !String::from_utf8_lossy(&answer).contains("spice console") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf)).await.expect("an answer in time").unwrap();
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert_eq!(status(&String::from_utf8_lossy(&answer)), 200);
    let slow = TcpStream::connect(b.web).await.unwrap();
    let (mut slow_r, mut slow_w) = slow.into_split();
    let dripping = tokio::spawn(async move {
        let _ = slow_w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        for i in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow_w.write_all(format!("X-Drip-{i}: 1\r\n").as_bytes()).await.is_err() {
                return i;
            }
        }
        30
    });
    let limit = Duration::from_secs(8);
    let silent_closed = closed_within(&mut silent, limit).await.expect("a silent connection is closed");
    let kept_closed = closed_within(&mut kept, limit).await.expect("an idle kept-alive connection is closed");
    let slow_closed = closed_within(&mut slow_r, limit).await;
    assert!(slow_closed.is_some(), "a head sent a line at a time is cut off");
    let lines_sent = dripping.await.unwrap();
    assert!(lines_sent < 30, "the dripping client could write for 9 s");
    // Closed after the 2 s limit, not at once (silent was opened first, so it waited longest).
    assert!(silent_closed > Duration::from_millis(1000) && silent_closed < Duration::from_secs(5), "{silent_closed:?}");
    assert!(kept_closed < Duration::from_secs(5), "{kept_closed:?}");
    // A request made in time on a fresh connection is still served.
    assert_eq!(status(&raw(b.web, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await), 200);
    let _ = b.stop.send(true);
}

/// The browser port holds at most maxTunnels connections that have not become bridges. When one
/// more comes, the one that has waited longest is closed to make room, not the newcomer: slow or
/// silent connections cannot keep a console out.
#[tokio::test]
async fn a_browser_port_full_of_slow_connections_closes_the_oldest_for_a_console() {
    let b = start_edited(600, 1, None, |c| c.limits.max_tunnels = 2).await;
    let (up, _) = echo().await;
    let waiting = "spice_proxy_html5_waiting_connections";
    let closed = "spice_proxy_html5_waiting_connections_closed_total";
    let mut slow = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(b.web).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: ").await.unwrap();
        slow.push(s);
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(b.admin, waiting).await != i + 1 {
            assert!(Instant::now() < deadline, "slow connection {i} not taken in");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Full: a console opens all the same, at once, and the longest waiting connection is closed.
    let started = Instant::now();
    let mut ws = open(&b, &format!("?token={}", token(up.port(), VALID, KEY)), None).await.expect("a console through a full port");
    assert!(started.elapsed() < Duration::from_secs(1), "opened at once, not after a timeout: {:?}", started.elapsed());
    echoes(&mut ws, b"through a port full of slow connections").await;
    assert!(closed_within(&mut slow[0], Duration::from_secs(2)).await.is_some(), "the longest waiting connection was closed");
    assert!(closed_within(&mut slow[1], Duration::from_millis(300)).await.is_none(), "only as many as make room");
    assert_eq!((metric(b.admin, waiting).await, metric(b.admin, closed).await), (1, 1), "the bridge left the count");
    // A page request is served too, and the next longest waiting makes room for it.
    let mut page = TcpStream::connect(b.web).await.unwrap();
    let mut keep = TcpStream::connect(b.web).await.unwrap();
    keep.write_all(b"GET / HTTP/1.1\r\nHost: ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    page.write_all(b"GET /spice_auto.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), page.read_to_string(&mut answer)).await.expect("answered within 5 s").unwrap();
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(closed_within(&mut slow[1], Duration::from_secs(2)).await.is_some());
    assert_eq!(metric(b.admin, closed).await, 2);
    echoes(&mut ws, b"the console is untouched").await;
    let _ = b.stop.send(true);
}

/// A bridge with `maxTunnels: 1` and the connect timeout given, whose hypervisors speak TLS,
/// and a hypervisor tls-port that accepts and then says nothing: the bridge, the port, a token
/// for it, and the directory of the CA file (kept while the bridge runs).
async fn bridge_to_a_silent_tls_port(connect_timeout: i32) -> (Bridge, u16, String, tempfile::TempDir) {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            kept.push(s);
        }
    });
    let (ca, _) = hypervisor_ca("hypervisor CA", 2030);
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let b = start_edited(600, 1, None, |c| {
        c.limits.connect_timeout_seconds = connect_timeout;
        c.limits.max_tunnels = 1;
        c.html5.as_mut().unwrap().upstream_tls = Some(UpstreamTls { ca_file: ca_file.to_string_lossy().into(), host_subject: None });
    })
    .await;
    let expires = ticket::now() + VALID as u64;
    let tls_only = ticket::mint(KEY, &Claims { host: "127.0.0.1".into(), ports: vec![port], expires, subject: "vm-tls".into() });
    (b, port, tls_only, ca_dir)
}

/// A connection told to close while a request of its own is being answered finishes it first:
/// a console being opened (here a WebSocket handshake waiting for a hypervisor's TLS) is not cut
/// because slower connections came after it.
#[tokio::test]
async fn a_connection_closed_to_make_room_finishes_the_request_it_is_answering() {
    let (b, _, tls_only, _ca_dir) = bridge_to_a_silent_tls_port(2).await;
    let query = format!("?token={tls_only}");
    let web = b.web;
    let busy = tokio::spawn(async move { refused_with(open_at(web, &query, None).await) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The port is full with the handshake in progress: a page request makes room and is served.
    let page = raw(b.web, "GET /spice_auto.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&page), 200, "{page}");
    assert_eq!(metric(b.admin, "spice_proxy_html5_waiting_connections_closed_total").await, 1);
    // The handshake that made room still gets its answer: the hypervisor's TLS timed out.
    let (code, body) = busy.await.unwrap();
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("TLS handshake with the hypervisor"), "{body}");
    let _ = b.stop.send(true);
}

#[tokio::test]
async fn handshake_refusals_say_why() {
    let b = start(600, 1).await;
    let (up, _) = echo().await;
    let good = token(up.port(), VALID, KEY);
    // Not a WebSocket handshake.
    let r = raw(b.web, &format!("GET /websockify?token={good} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(r.contains("not a WebSocket handshake"), "{r}");
    let r = raw(b.web, &format!("GET /websockify?token={good} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(r.contains("Sec-WebSocket-Version"), "{r}");
    // Tokens.
    let (code, body) = refused_with(open(&b, "", None).await);
    assert_eq!(code, 401);
    assert!(body.contains("no token"), "{body}");
    let (code, body) = refused_with(open(&b, "?token=v1.forged.sig", None).await);
    assert_eq!(code, 401, "{body}");
    let (code, body) = refused_with(open(&b, &format!("?token={}", token(up.port(), EXPIRED, KEY)), None).await);
    assert_eq!(code, 401);
    assert!(body.contains("expired"), "{body}");
    let (code, _) = refused_with(open(&b, &format!("?token={}", token(up.port(), VALID, b"some other key 0123456789abcdefg")), None).await);
    assert_eq!(code, 401);
    // A valid token for a target this proxy does not allow.
    let (code, body) = refused_with(open(&b, &format!("?token={}", token_for("10.0.0.9", 5900, VALID, KEY)), None).await);
    assert_eq!(code, 403);
    assert!(body.contains("not on the allow-list"), "{body}");
    // Cross-site WebSocket hijacking: a foreign page, or the right host with the wrong scheme.
    let host = format!("http://{}", b.web);
    let (code, body) = refused_with(open(&b, &format!("?token={good}"), Some("http://evil.example.com")).await);
    assert_eq!(code, 403);
    assert!(body.contains("cross-origin"), "{body}");
    let (code, _) = refused_with(open(&b, &format!("?token={good}"), Some(&host.replace("http://", "https://"))).await);
    assert_eq!(code, 403);
    // Same origin, a listed origin, and the cookie spice_auto.html sets all work.
    if let Err(e) = open(&b, &format!("?token={good}"), Some(&host)).await {
        panic!("same origin refused: {:?}", refused_with(Err(e)));
    }
    if let Err(e) = open(&b, &format!("?token={good}"), Some("https://portal.example.com")).await {
        panic!("listed origin refused: {:?}", refused_with(Err(e)));
    }
    let mut req = format!("ws://{}/websockify", b.web).into_client_request().unwrap();
    req.headers_mut().insert("Cookie", HeaderValue::from_str(&format!("lang=en; token={good}")).unwrap());
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    let _ = b.stop.send(true);
}

/// A hypervisor tls-port that accepts and then says nothing: the bridge's TLS handshake gives
/// up after the connect timeout with 504, and the slot it held is free again.
#[tokio::test]
async fn a_silent_tls_port_is_a_504_after_the_connect_timeout() {
    let (b, port, tls_only, _ca_dir) = bridge_to_a_silent_tls_port(1).await;
    for attempt in 0..2 {
        let started = Instant::now();
        let (code, body) = refused_with(open(&b, &format!("?token={tls_only}"), None).await);
        let took = started.elapsed();
        assert_eq!(code, 504, "attempt {attempt}: {body}");
        assert!(body.contains(&format!("TLS handshake with the hypervisor 127.0.0.1:{port} timed out after 1s")), "{body}");
        assert!(took >= Duration::from_millis(950) && took < Duration::from_secs(5), "attempt {attempt} answered after {took:?}");
    }
    let _ = b.stop.send(true);
}

/// A CA (`name`, expiring on 1 January of `year`) and a certificate for the hypervisor at
/// 127.0.0.1 that it signed.
fn hypervisor_ca(name: &str, year: i32) -> (rcgen::Certificate, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, name);
    ca_params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let host = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key)).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![host.der().clone()], key)
        .unwrap();
    (ca, server)
}

/// oVirt rotates its CA by publishing the new one beside the old, then moving hypervisors to
/// certificates the new one signed. The bridge trusts them once the mounted CA Secret holds the
/// new CA, without a restart: before, a rotation broke every browser console until the proxy
/// pods were restarted by hand.
#[tokio::test]
async fn a_rotated_hypervisor_ca_is_trusted_without_a_restart() {
    let (old_ca, _) = hypervisor_ca("old hypervisor CA", 2030);
    let (new_ca, hypervisor_config) = hypervisor_ca("new hypervisor CA", 2031);
    // The hypervisor's tls-port, on a certificate of the new CA: it greets each connection with "REDQ".
    let tls_port = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tls_port.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(hypervisor_config));
    let _hypervisor = tokio::spawn(async move {
        while let Ok((tcp, _)) = tls_port.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"REDQ").await;
                    let _ = tls.flush().await;
                    let mut rest = Vec::new();
                    let _ = tls.read_to_end(&mut rest).await;
                }
            });
        }
    });
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("ca.crt");
    std::fs::write(&ca_file, old_ca.pem()).unwrap();
    let b = start_edited(600, 1, None, |c| {
        c.html5.as_mut().unwrap().upstream_tls = Some(UpstreamTls { ca_file: ca_file.to_string_lossy().into(), host_subject: None });
    })
    .await;
    let expires = ticket::now() + VALID as u64;
    let console = ticket::mint(KEY, &Claims { host: "127.0.0.1".into(), ports: vec![port], expires, subject: "vm-tls".into() });
    let (code, body) = refused_with(open(&b, &format!("?token={console}"), None).await);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("TLS to the hypervisor failed") && body.contains("UnknownIssuer"), "{body}");
    let expiry = || async {
        let text = raw(b.admin, "GET /metrics HTTP/1.0\r\n\r\n").await;
        text.lines().find_map(|l| l.strip_prefix("spice_proxy_hypervisor_ca_expiry_timestamp_seconds ")?.parse::<i64>().ok()).expect("the CA expiry gauge")
    };
    assert_eq!(expiry().await, 1_893_456_000, "2030-01-01T00:00:00Z");

    // The rotation: both CAs, the file replaced whole, as the kubelet updates a Secret volume.
    std::fs::write(ca_dir.path().join("ca.crt.next"), old_ca.pem() + &new_ca.pem()).unwrap();
    std::fs::rename(ca_dir.path().join("ca.crt.next"), &ca_file).unwrap();
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(10);
    let deadline = Instant::now() + within;
    let mut ws = loop {
        match open(&b, &format!("?token={console}"), None).await {
            Ok(ws) => break ws,
            Err(e) => {
                let (code, body) = refused_with(Err(e));
                assert!(code == 502 && body.contains("UnknownIssuer"), "{code}: {body}");
                assert!(Instant::now() < deadline, "the rotated CA was not trusted within {within:?} of the file changing");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Binary(d) => assert_eq!(&d[..], b"REDQ", "the hypervisor's greeting, through TLS"),
        other => panic!("unexpected {other:?}"),
    }
    // The later of the two CAs: the old one's end is expected during a rotation.
    assert_eq!(expiry().await, 1_924_992_000, "2031-01-01T00:00:00Z");
    let _ = b.stop.send(true);
}

#[tokio::test]
async fn a_browser_forging_tokens_is_locked_out_with_retry_after() {
    let b = start_edited(600, 1, None, |c| c.limits.max_auth_failures_per_client = 2).await;
    let (up, _) = echo().await;
    let good = token(up.port(), VALID, KEY);
    // Expired tokens (an old console tab) never count.
    for _ in 0..4 {
        assert_eq!(refused_with(open(&b, &format!("?token={}", token(up.port(), EXPIRED, KEY)), None).await).0, 401);
    }
    assert!(open(&b, &format!("?token={good}"), None).await.is_ok());
    for forged in ["v1.forged.sig", "v1.e30.AAAA"] {
        assert_eq!(refused_with(open(&b, &format!("?token={forged}"), None).await).0, 401);
    }
    match open(&b, &format!("?token={good}"), None).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("300"), "the default window");
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or(&[])).into_owned();
            assert!(body.contains("too many failed authentications"), "{body}");
        }
        other => panic!("expected 429, got {:?}", other.map(|_| "an open WebSocket")),
    }
    let _ = b.stop.send(true);
}

#[tokio::test]
async fn bridge_moves_binary_both_ways_and_propagates_close() {
    let b = start(600, 1).await;
    let (up, mut seen) = echo().await;
    let t = token(up.port(), VALID, KEY);
    let mut ws = open(&b, &format!("?token={t}"), None).await.unwrap();
    assert_eq!(seen.recv().await, Some("connected"));
    // Binary both ways, in order, large and small.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for payload in [b"REDQ".to_vec(), big.clone(), vec![0u8; 1]] {
        ws.send(Message::binary(payload.clone())).await.unwrap();
        let mut got = Vec::new();
        while got.len() < payload.len() {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap() {
                Message::Binary(d) => got.extend_from_slice(&d),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, payload);
    }
    // Ping is answered with the same payload.
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected pong, got {other:?}"),
    }
    // Client Close (1000) → the hypervisor sees EOF; the Close is answered (RFC 6455: no
    // data may follow a Close) and the connection ends cleanly.
    ws.send(Message::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))).await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap(), Some("eof"));
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match m {
            Message::Close(f) => code = f.map(|f| f.code),
            Message::Binary(d) => panic!("data after Close: {d:?}"),
            _ => {}
        }
    }
    assert_eq!(code, Some(CloseCode::Normal));

    // Text frames are not SPICE: Close 1003.
    let mut ws = open(&b, &format!("?token={t}"), None).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Message::Close(f) = m {
            code = f.map(|f| f.code);
        }
    }
    assert_eq!(code, Some(CloseCode::Unsupported));

    // An oversized frame (over 1 MiB) ends the connection instead of being buffered.
    let mut ws = open(&b, &format!("?token={t}"), None).await.unwrap();
    let _ = ws.send(Message::binary(vec![1u8; 2 << 20])).await;
    let mut ended = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
            Ok(None) | Ok(Some(Err(_))) => { ended = true; break }
            Ok(Some(Ok(Message::Close(f)))) => { assert_eq!(f.map(|f| f.code), Some(CloseCode::Size)); ended = true; break }
            _ => {}
        }
    }
    assert!(ended, "the oversized frame did not end the connection");

    // Audit lines name the target and the subject, never the token.
    let _ = b.stop.send(true);
    let _ = b.done.await;
}

// Multi-threaded: the test polls /metrics with a blocking curl while the proxy runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_close_reaches_the_browser_and_a_client_that_never_reads_is_dropped() {
    let b = start(2, 1).await;
    // A hypervisor that says something and hangs up.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"REDQ-reply").await.unwrap();
        s.shutdown().await.unwrap();
        // Second connection: floods a client that never reads; counts what it got out.
        let (mut s, _) = l.accept().await.unwrap();
        let chunk = vec![7u8; 65536];
        let mut sent = 0usize;
        while sent < 256 << 20 {
            match tokio::time::timeout(Duration::from_secs(10), s.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
        assert!(sent < 64 << 20, "the bridge buffered {sent} bytes for a client that never reads");
    });
    let t = token(port, VALID, KEY);
    let mut ws = open(&b, &format!("?token={t}"), None).await.unwrap();
    let mut got = Vec::new();
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match m {
            Message::Binary(d) => got.extend_from_slice(&d),
            Message::Close(f) => code = f.map(|f| f.code),
            _ => {}
        }
    }
    assert_eq!((got.as_slice(), code), (&b"REDQ-reply"[..], Some(CloseCode::Normal)));

    // Never read: the bridge stops reading upstream (bounded memory) and drops the client
    // once a send has been stuck for the idle timeout.
    let ws = open(&b, &format!("?token={t}"), None).await.unwrap();
    let started = Instant::now();
    let metrics = || {
        let text = std::process::Command::new("curl").args(["-s", &format!("http://{}/metrics", b.admin)]).output().unwrap().stdout;
        String::from_utf8_lossy(&text).to_string()
    };
    let active = |m: &str| m.lines().find(|l| l.starts_with("spice_proxy_active_tunnels ")).and_then(|l| l.split(' ').nth(1)?.parse::<u64>().ok()).unwrap_or(99);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(active(&metrics()), 1);
    while active(&metrics()) != 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "a client that never reads was kept open");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first bridge finished (the hypervisor closed), the second failed (a stalled client).
    let m = metrics();
    let ends = |reason: &str| m.lines().find(|l| l.starts_with(&format!("spice_proxy_tunnel_ends_total{{reason=\"{reason}\"}} "))).and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!((ends("finished"), ends("error"), ends("idle")), (Some(1), Some(1), Some(0)), "{m}");
    drop(ws);
    let _ = b.stop.send(true);
}

#[tokio::test]
async fn drain_keeps_open_bridges_until_the_deadline_then_closes_them_with_1001() {
    let b = start(600, 2).await;
    let (up, _) = echo().await;
    let t = token(up.port(), VALID, KEY);
    let mut ws = open(&b, &format!("?token={t}"), None).await.unwrap();
    let _ = b.stop.send(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still bridged during the drain...
    ws.send(Message::binary(b"during drain".to_vec())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Binary(d) => assert_eq!(&d[..], b"during drain"),
        other => panic!("{other:?}"),
    }
    // ...but no new ones are accepted.
    assert!(TcpStream::connect(b.web).await.is_err() || open(&b, &format!("?token={t}"), None).await.is_err());
    // At the deadline: Close 1001 (going away).
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Message::Close(f) = m {
            code = f.map(|f| f.code);
        }
    }
    assert_eq!(code, Some(CloseCode::Away));
    tokio::time::timeout(Duration::from_secs(10), b.done).await.unwrap().unwrap().unwrap();
}

/// One series from the admin port's /metrics.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let text = raw(admin, "GET /metrics HTTP/1.0\r\n\r\n").await;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// Sends `what` as one binary message and expects it back from the echoing hypervisor.
async fn echoes<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(ws: &mut tokio_tungstenite::WebSocketStream<S>, what: &[u8]) {
    ws.send(Message::binary(what.to_vec())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await.expect("an echo").unwrap().unwrap() {
        Message::Binary(d) => assert_eq!(&d[..], what),
        other => panic!("{other:?}"),
    }
}

/// Adding an engine portal's origin must not end every open console with a rollout: the
/// allowed origins apply to the next handshakes, and open bridges go on whatever the list.
#[tokio::test]
async fn a_changed_list_of_origins_applies_to_the_next_consoles_without_a_restart() {
    let b = start(600, 30).await;
    let (up, _) = echo().await;
    let console = format!("?token={}", token(up.port(), VALID, KEY));
    let (portal, engine) = ("https://portal.example.com", "https://engine.example.com");
    let mut ws = open(&b, &console, Some(portal)).await.unwrap();
    let (code, body) = refused_with(open(&b, &console, Some(engine)).await);
    assert_eq!(code, 403, "{body}");
    // The engine's origin in, the portal's out.
    let mut cfg = b.config();
    cfg.html5.as_mut().unwrap().allowed_origins = vec![engine.into()];
    b.replace_config(&serde_json::to_string(&cfg).unwrap());
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let deadline = Instant::now() + within;
    let _from_the_engine = loop {
        match open(&b, &console, Some(engine)).await {
            Ok(ws) => break ws,
            Err(e) => {
                let (code, body) = refused_with(Err(e));
                assert!(code == 403 && Instant::now() < deadline, "the new origins were not in use within {within:?}: {code} {body}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let (code, body) = refused_with(open(&b, &console, Some(portal)).await);
    assert!(code == 403 && body.contains("cross-origin"), "{code} {body}");
    assert_eq!(metric(b.admin, "spice_proxy_config_reloads_total{outcome=\"applied\"}").await, 1);
    // The console opened from the portal goes on.
    echoes(&mut ws, b"opened from an origin no longer listed").await;
    let _ = b.stop.send(true);
}

/// A changed idle timeout applies to open browser consoles as to CONNECT tunnels, counted from
/// their last message: raised, it keeps a console the old one would end; lowered below the
/// time a console has been quiet, it ends that console when the replica reads the file.
#[tokio::test]
async fn open_bridges_follow_a_changed_idle_timeout() {
    let b = start(3, 30).await;
    let (up, _) = echo().await;
    let mut ws = open(&b, &format!("?token={}", token(up.port(), VALID, KEY)), None).await.unwrap();
    let applied = "spice_proxy_config_reloads_total{outcome=\"applied\"}";
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let mut cfg = b.config();
    cfg.limits.idle_timeout_seconds = 600;
    b.replace_config(&serde_json::to_string(&cfg).unwrap());
    let deadline = Instant::now() + within;
    // Busy until the replica has read it: the old timeout would end a console quiet for 3 s.
    while metric(b.admin, applied).await == 0 {
        assert!(Instant::now() < deadline, "the raised idle timeout was not in use within {within:?}");
        echoes(&mut ws, b"busy").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    echoes(&mut ws, b"open past the old idle timeout").await;

    cfg.limits.idle_timeout_seconds = 2;
    b.replace_config(&serde_json::to_string(&cfg).unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Quiet for 3 s by the time the replica reads the file: it ends the console then.
    let mut closed = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(within, ws.next()).await {
        closed |= matches!(m, Message::Close(_));
    }
    assert!(closed, "the console was not closed at the lowered idle timeout");
    assert_eq!(metric(b.admin, applied).await, 2, "it was closed when the replica read the lowered timeout");
    assert_eq!(metric(b.admin, "spice_proxy_tunnel_ends_total{reason=\"idle\"}").await, 1);
    let _ = b.stop.send(true);
}

/// A new allow-list without a bridge's hypervisor ends the bridge with Close 1008 (policy),
/// as it ends a CONNECT tunnel; a file that cannot be parsed changes nothing.
#[tokio::test]
async fn a_bridge_to_a_target_taken_off_the_allow_list_is_closed_with_1008() {
    let b = start(600, 30).await;
    let (up, _) = echo().await;
    let mut ws = open(&b, &format!("?token={}", token(up.port(), VALID, KEY)), None).await.unwrap();
    let mut cfg = b.config();
    b.replace_config("{\"half\": \"written");
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let deadline = Instant::now() + within;
    while metric(b.admin, "spice_proxy_config_reloads_total{outcome=\"refused\"}").await == 0 {
        assert!(Instant::now() < deadline, "the changed file was not read within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    echoes(&mut ws, b"still allowed").await;
    cfg.allowed_targets = vec![AllowedTarget { cidr: "127.0.0.1/32".parse().unwrap(), ports: vec![(up.port() + 1, up.port() + 1)] }];
    b.replace_config(&serde_json::to_string(&cfg).unwrap());
    let mut close = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(within, ws.next()).await {
        if let Message::Close(f) = m {
            close = f.map(|f| (f.code, f.reason.to_string()));
        }
    }
    assert_eq!(close, Some((CloseCode::Policy, "target no longer allowed".to_string())));
    assert_eq!(metric(b.admin, "spice_proxy_tunnel_ends_total{reason=\"revoked\"}").await, 1);
    let (status, body) = refused_with(open(&b, &format!("?token={}", token(up.port(), VALID, KEY)), None).await);
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn a_stopping_bridge_still_accepts_browsers_for_the_shutdown_delay() {
    let b = start_edited(600, 30, None, |c| c.limits.shutdown_delay_seconds = 3).await;
    let (up, _) = echo().await;
    let t = token(up.port(), VALID, KEY);
    let _ = b.stop.send(true);
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ws = open(&b, &format!("?token={t}"), None).await.expect("a browser sent here within the shutdown delay is bridged");
    ws.send(Message::binary(b"after the stop signal".to_vec())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Binary(d) => assert_eq!(&d[..], b"after the stop signal"),
        other => panic!("{other:?}"),
    }
    assert!(stopped.elapsed() < Duration::from_secs(3), "the checks above took the whole delay: {:?}", stopped.elapsed());
    common::refuses_after_the_delay(b.web, stopped, Duration::from_secs(3)).await;
    // The bridge opened within the delay drains like any other.
    ws.send(Message::binary(b"draining".to_vec())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Binary(d) => assert_eq!(&d[..], b"draining"),
        other => panic!("{other:?}"),
    }
    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), b.done).await.expect("exits once the last bridge closed").unwrap().unwrap();
}

#[tokio::test]
async fn wss_with_a_certificate_and_the_https_origin() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    let b = start_with(600, 1, Some((cert.pem(), key.serialize_pem()))).await;
    let (up, _) = echo().await;
    let t = token(up.port(), VALID, KEY);
    let config = common::tls::trusting(&[&cert]);
    let wss = |origin: &'static str| {
        let config = config.clone();
        let t = t.clone();
        async move {
            let tcp = TcpStream::connect(b.web).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(config).connect("localhost".try_into().unwrap(), tcp).await.expect("TLS handshake with the bridge");
            let mut req = format!("wss://localhost:{}/websockify?token={t}", b.web.port()).into_client_request().unwrap();
            req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
            req.headers_mut().insert("Origin", HeaderValue::from_str(&origin.replace("PORT", &b.web.port().to_string())).unwrap());
            tokio_tungstenite::client_async(req, tls).await.map(|(ws, _)| ws)
        }
    };
    // wss:// from the console's own https:// page: bridged.
    let mut ws = wss("https://localhost:PORT").await.expect("wss handshake");
    ws.send(Message::binary(b"over tls".to_vec())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Binary(d) => assert_eq!(&d[..], b"over tls"),
        other => panic!("{other:?}"),
    }
    // Much more than the sockets hold, read only after a pause: the bridge's writes to the
    // browser block part-way, and every byte still arrives, in order (TLS records the session
    // still held after a write are flushed, not left until the next one).
    let sent: Vec<u8> = (0..8 << 20).map(|i: u32| (i * 13 % 251) as u8).collect();
    for part in sent.chunks(1 << 20) {
        ws.send(Message::binary(part.to_vec())).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::with_capacity(sent.len());
    while got.len() < sent.len() {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(d)))) => got.extend_from_slice(&d),
            other => panic!("after {} of {} bytes: {other:?}", got.len(), sent.len()),
        }
    }
    assert!(got == sent, "bytes changed or reordered on the way");
    // The same host and port over http:// is another origin.
    match wss("http://localhost:PORT").await {
        Err(WsError::Http(r)) => assert_eq!(r.status().as_u16(), 403),
        other => panic!("an http:// page opened a wss:// console: {:?}", other.map(|_| ())),
    }
    // Plain ws:// to the TLS port gets nowhere.
    assert!(open(&b, &format!("?token={t}"), None).await.is_err());
    let _ = b.stop.send(true);
}

/// A browser that cannot finish the TLS handshake sees only a failed connection; the proxy
/// counts (and audits) each by why: not TLS at all or refused by the client, closed before
/// finishing, or not finished within the handshake timeout.
#[tokio::test]
async fn failed_tls_handshakes_on_the_browser_port_are_counted_by_why() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    let b = start_edited(600, 1, Some((cert.pem(), key.serialize_pem())), |c| c.limits.handshake_timeout_seconds = 1).await;
    let counted = |outcome: &'static str, want: u64| {
        let admin = b.admin;
        async move {
            let series = format!("spice_proxy_tunnels_total{{outcome=\"{outcome}\"}}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let text = raw(admin, "GET /metrics HTTP/1.0\r\n\r\n").await;
                let n: u64 = text.lines().find_map(|l| l.strip_prefix(series.as_str())?.strip_prefix(' ')?.parse().ok()).unwrap_or(0);
                if n == want || tokio::time::Instant::now() > deadline {
                    assert_eq!(n, want, "{series}");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Plain HTTP to the TLS port.
    let answer = raw(b.web, "GET /spice_auto.html HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(!answer.starts_with("HTTP/"), "answered in plain HTTP: {answer}");
    counted("tls_failed", 1).await;
    // A client that does not trust the certificate ends the handshake with an alert.
    let tcp = TcpStream::connect(b.web).await.unwrap();
    let untrusting = common::tls::trusting(&[]);
    assert!(tokio_rustls::TlsConnector::from(untrusting).connect("localhost".try_into().unwrap(), tcp).await.is_err());
    counted("tls_failed", 2).await;
    // A connection closed before any byte (a probe): not a failure, no request.
    drop(TcpStream::connect(b.web).await.unwrap());
    counted("no_request", 1).await;
    // A silent one is closed after the handshake timeout (1 s).
    let mut silent = TcpStream::connect(b.web).await.unwrap();
    let closed = closed_within(&mut silent, Duration::from_secs(4)).await.expect("a silent connection stays open");
    assert!(closed >= Duration::from_millis(900), "closed after {closed:?}");
    counted("408", 1).await;
    assert_eq!(metric(b.admin, "spice_proxy_tunnels_total{outcome=\"tls_failed\"}").await, 2);
    let _ = b.stop.send(true);
}

/// cert-manager renews a kubernetes.io/tls Secret in place and the kubelet rewrites the mounted
/// files: new connections get the renewed certificate without a restart, open ones keep working,
/// and /metrics tells when the served one expires.
#[tokio::test]
async fn a_renewed_browser_certificate_is_served_without_a_restart() {
    use common::tls::{connect, localhost_cert, renew_in_place, served, trusting};
    let ((old, old_key), (renewed, renewed_key)) = (localhost_cert(2030), localhost_cert(2031));
    // The connection opened before the renewal sends its request after it, up to 20 s later:
    // longer than the default time a connection may wait before its request head.
    let b = start_edited(600, 1, Some((old.pem(), old_key.serialize_pem())), |c| c.limits.handshake_timeout_seconds = 60).await;
    let config = trusting(&[&old, &renewed]);
    let expiry = || async {
        let text = raw(b.admin, "GET /metrics HTTP/1.0\r\n\r\n").await;
        text.lines().find_map(|l| l.strip_prefix("spice_proxy_tls_certificate_expiry_timestamp_seconds ")?.parse::<i64>().ok()).expect("the expiry gauge")
    };
    let mut open = connect(b.web, &config).await.expect("TLS handshake with the bridge");
    assert_eq!(served(&open), *old.der());
    assert_eq!(expiry().await, 1_893_456_000, "2030-01-01T00:00:00Z");
    renew_in_place(b.dir.path(), &renewed, &renewed_key);
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(10);
    let deadline = Instant::now() + within;
    while served(&connect(b.web, &config).await.unwrap()) != *renewed.der() {
        assert!(Instant::now() < deadline, "the renewed certificate was not served within {within:?} of the files changing");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(expiry().await, 1_924_992_000, "2031-01-01T00:00:00Z");
    // The connection made before the renewal still answers.
    open.write_all(b"GET /spice_auto.html HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut page = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut page)).await.unwrap().unwrap();
    let page = String::from_utf8_lossy(&page);
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("spice console"), "{page}");
    let _ = b.stop.send(true);
}
