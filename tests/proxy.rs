//! The CONNECT proxy on loopback: every error answer, auth modes, tickets and key rotation,
//! the lockout of clients that guess credentials, the allow-list (with DNS), limits,
//! slowloris, half-close and its timeout, 1 GiB each way with checksums, a graceful drain,
//! peers that vanish without closing (in a network namespace of the test's own: that test
//! needs root), the PROXY protocol from a load balancer (Debian's HAProxy in front), and a
//! stdout nobody reads. No cluster needed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};
use spice_operator::crd::{AuthMode, ProxyLimits};
use spice_operator::proxy::config::{AllowedTarget, ProxyConfig};
use spice_operator::proxy::server::ProxyServer;
use spice_operator::proxy::ticket::{self, Claims};
use spice_operator::proxy::tunnel::DataPath;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod common;
use common::{EXPIRED, VALID};
use common::spice::{Kill, proxy_process, wait_port};
use common::{connect_from, free_port};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

struct TestProxy {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

fn base_config(dir: &std::path::Path) -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        allowed_targets: vec![AllowedTarget { cidr: "127.0.0.1/32".parse().unwrap(), ports: vec![(1024, 65535)] }],
        auth_mode: AuthMode::Ticket,
        keys_dir: Some(dir.join("keys").to_string_lossy().into()),
        basic_dir: None,
        // Stopped proxies close their listeners at once; the shutdown delay has its own test.
        limits: ProxyLimits { shutdown_delay_seconds: 0, ..ProxyLimits::default() },
        client_socket: Default::default(),
        data_path: DataPath::Splice,
        html5: None,
        // Two threads, whatever this machine has: tunnels spread over both listeners.
        workers: Some(2),
        proxy_protocol: None,
    }
}

async fn start(edit: impl FnOnce(&mut ProxyConfig, &std::path::Path)) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/current"), KEY).unwrap();
    let mut cfg = base_config(dir.path());
    edit(&mut cfg, dir.path());
    let server = ProxyServer::bind(cfg).await.expect("proxy starts");
    let (addr, admin) = (server.local_addr(), server.admin_addr());
    let (stop, rx) = watch::channel(false);
    let done = tokio::spawn(server.run(rx));
    TestProxy { addr, admin, stop, done, _dir: dir }
}

fn basic(user: &str, pass: &str) -> String {
    format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

/// Auth mode Basic with the credentials spice:s3cret.
fn basic_mode(c: &mut ProxyConfig, dir: &std::path::Path) {
        std::fs::create_dir_all(dir.join("basic")).unwrap();
        std::fs::write(dir.join("basic/username"), "spice").unwrap();
        std::fs::write(dir.join("basic/password"), "s3cret").unwrap();
        c.auth_mode = AuthMode::Basic;
        c.basic_dir = Some(dir.join("basic").to_string_lossy().into());
}

fn ticket_for(host: &str, ports: &[u16], ttl: i64, key: &[u8]) -> String {
    let expires = (ticket::now() as i64 + ttl) as u64;
    ticket::mint(key, &Claims { host: host.into(), ports: ports.to_vec(), expires, subject: "vm-test".into() })
}

fn spice_gtk_head(target: &str, auth: &str) -> String {
    format!("CONNECT {target} HTTP/1.0\r\nHost: {target}\r\nProxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n{auth}\r\n")
}

/// Sends a head; returns the stream, the status code and the whole response head.
async fn request(proxy: SocketAddr, head: &[u8]) -> (TcpStream, u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head).await.unwrap();
    let (status, text) = read_response(&mut s).await;
    (s, status, text)
}

async fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await.expect("response in time").unwrap();
        assert!(n == 1, "connection closed before a response: {:?}", String::from_utf8_lossy(&buf));
        buf.push(b[0]);
    }
    let text = String::from_utf8(buf).unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    (status, text)
}

async fn body(s: &mut TcpStream) -> String {
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut rest)).await;
    rest
}

/// An upstream that echoes everything back, then closes when the client does.
async fn echo_server() -> SocketAddr {
    echo_server_on("127.0.0.1:0").await
}

async fn echo_server_on(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.expect("echo in time").unwrap();
    assert_eq!(back, msg);
}

#[tokio::test]
async fn ticket_tunnel_replies_with_the_client_version_and_nothing_more() {
    let up = echo_server().await;
    let p = start(|_, _| {}).await;
    let t = ticket_for("127.0.0.1", &[up.port(), 5901], VALID, KEY);
    let (mut s, status, text) = request(p.addr, spice_gtk_head(&up.to_string(), &basic("alice", &t)).as_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(text, "HTTP/1.0 200 Connection established\r\n\r\n", "exactly a status line and a blank line");
    echo_roundtrip(&mut s, b"REDQ\x02\x00\x00\x00hello").await;
    // HTTP/1.1 clients get an HTTP/1.1 answer; the same ticket serves another channel.
    let head = format!("CONNECT {up} HTTP/1.1\r\nHost: {up}\r\n{}\r\n", basic("alice", &t));
    let (mut s2, status, text) = request(p.addr, head.as_bytes()).await;
    assert_eq!((status, text.as_str()), (200, "HTTP/1.1 200 Connection established\r\n\r\n"));
    echo_roundtrip(&mut s2, b"second channel").await;
}

#[tokio::test]
async fn every_error_answer_is_specific() {
    let up = echo_server().await;
    let p = start(|c, _| c.limits.connect_timeout_seconds = 1).await;
    let good = ticket_for("127.0.0.1", &[up.port()], VALID, KEY);

    let cases: Vec<(String, u16, &str)> = vec![
        ("NONSENSE\r\n\r\n".into(), 400, "malformed request"),
        ("CONNECT 127.0.0.1 HTTP/1.0\r\n\r\n".into(), 400, "no port"),
        ("GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".into(), 405, "only tunnels CONNECT"),
        (spice_gtk_head(&up.to_string(), ""), 407, "credentials required"),
        (spice_gtk_head(&up.to_string(), &basic("u", "v1.forged.sig")), 407, "ticket"),
        (spice_gtk_head(&up.to_string(), &basic("u", &ticket_for("127.0.0.1", &[up.port()], EXPIRED, KEY))), 407, "ticket expired"),
        (spice_gtk_head(&up.to_string(), &basic("u", &ticket_for("127.0.0.1", &[up.port()], VALID, b"another key"))), 407, "signature"),
        (spice_gtk_head("127.0.0.1:6000", &basic("u", &good)), 403, "another target"),
        (spice_gtk_head("10.0.0.9:5900", &basic("u", &ticket_for("10.0.0.9", &[5900], VALID, KEY))), 403, "not on the allow-list"),
        (spice_gtk_head("127.0.0.2:5900", &basic("u", &ticket_for("127.0.0.2", &[5900], VALID, KEY))), 403, "not on the allow-list"),
        (spice_gtk_head("127.0.0.1:80", &basic("u", &ticket_for("127.0.0.1", &[80], VALID, KEY))), 403, "not on the allow-list"),
    ];
    for (head, want, text) in cases {
        let (mut s, status, resp) = request(p.addr, head.as_bytes()).await;
        let b = body(&mut s).await;
        assert_eq!(status, want, "{head:?} → {resp}{b}");
        assert!(b.contains(text), "{head:?}: body {b:?} lacks {text:?}");
        assert_eq!(b.lines().count(), 1, "one-line body: {b:?}");
        assert!(!b.contains("v1."), "a token must never be echoed: {b:?}");
        if want == 407 {
            assert!(resp.contains("Proxy-Authenticate: Basic"), "{resp}");
        }
    }

    // 502: allowed, but nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let head = spice_gtk_head(&closed.to_string(), &basic("u", &ticket_for("127.0.0.1", &[closed.port()], VALID, KEY)));
    let (mut s, status, _) = request(p.addr, head.as_bytes()).await;
    assert_eq!(status, 502, "{}", body(&mut s).await);

    // 504: a listener whose accept queue is full drops SYNs, so the connect never completes.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    full.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full_addr)).await {
            fillers.push(c);
        }
    }
    let head = spice_gtk_head(&full_addr.to_string(), &basic("u", &ticket_for("127.0.0.1", &[full_addr.port()], VALID, KEY)));
    let started = Instant::now();
    let (mut s, status, _) = request(p.addr, head.as_bytes()).await;
    assert_eq!(status, 504, "{}", body(&mut s).await);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // 400: a head larger than 8 KiB.
    let huge = format!("CONNECT {up} HTTP/1.0\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000));
    let (mut s, status, _) = request(p.addr, huge.as_bytes()).await;
    assert_eq!(status, 400);
    assert!(body(&mut s).await.contains("larger than 8192"));
}

/// What the operator renders (`[::]`) takes IPv4 and IPv6 clients, and spice-gtk names an
/// IPv6 hypervisor bare (`CONNECT fd00::5:5900`): both reach an IPv6 hypervisor, an IPv4 client
/// is counted by its IPv4 address, and IPv6 loopback is refused until listed.
#[tokio::test]
async fn ipv6_hypervisors_and_clients_through_the_dual_stack_listener() {
    let up = echo_server_on("[::1]:0").await;
    let (port, ticket) = (up.port(), ticket_for("::1", &[up.port()], VALID, KEY));
    let p = start(|c, _| {
        c.listen = "[::]:0".into();
        c.allowed_targets.push(AllowedTarget { cidr: "::1/128".parse().unwrap(), ports: vec![(1024, 65535)] });
        c.limits.max_tunnels_per_client = 2;
    })
    .await;
    let via = |ip: &str| SocketAddr::new(ip.parse().unwrap(), p.addr.port());
    let mut open = Vec::new();
    // From IPv4 and IPv6 clients; the target bare as spice-gtk sends it, bracketed, or spelled
    // otherwise than the ticket (the same address).
    for (client, target) in [("127.0.0.1", format!("::1:{port}")), ("::1", format!("[::1]:{port}")), ("127.0.0.1", format!("0:0::1:{port}"))] {
        let (mut s, status, resp) = request(via(client), spice_gtk_head(&target, &basic("u", &ticket)).as_bytes()).await;
        assert_eq!(status, 200, "{client} → {target}: {resp}");
        echo_roundtrip(&mut s, format!("SPICE link from {client}").as_bytes()).await;
        open.push(s);
    }
    // Two tunnels from 127.0.0.1 are open: the third is refused, counted by its IPv4 address.
    // Counted as the ::ffff:127.0.0.1 the socket reports, it would fall in the /64 every IPv4
    // client shares.
    let (mut s, status, _) = request(via("127.0.0.1"), spice_gtk_head(&format!("::1:{port}"), &basic("u", &ticket)).as_bytes()).await;
    let b = body(&mut s).await;
    assert_eq!(status, 503, "{b}");
    assert!(b.contains("too many tunnels from your address") && !b.contains("/64"), "{b}");
    // The ::1 client still may.
    let (_s, status, _) = request(via("::1"), spice_gtk_head(&format!("::1:{port}"), &basic("u", &ticket)).as_bytes()).await;
    assert_eq!(status, 200);

    // IPv6 loopback is not reachable unless listed.
    let q = start(|c, _| c.listen = "[::]:0".into()).await;
    let (mut s, status, _) = request(q.addr, spice_gtk_head(&format!("::1:{port}"), &basic("u", &ticket)).as_bytes()).await;
    let b = body(&mut s).await;
    assert_eq!(status, 403, "{b}");
    assert!(b.contains(&format!("target [::1]:{port} (::1) is not on the allow-list")), "{b}");
}

/// The workers' listeners share their port with SO_REUSEPORT, which would also let another
/// process of the same user join it and silently take a share of the connections (a second
/// proxy started by mistake, an old one still running on the host network). A port another
/// process listens on is "address in use", as for any server.
#[tokio::test]
async fn a_port_another_proxy_listens_on_is_refused_not_shared() {
    let first = start(|_, _| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_config(dir.path());
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/current"), KEY).unwrap();
    cfg.listen = first.addr.to_string();
    let err = match ProxyServer::bind(cfg.clone()).await {
        Ok(_) => panic!("a second proxy joined {} beside the first", first.addr),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&format!("cannot listen on {}", first.addr)) && err.contains("in use"), "{err}");
    // Nor beside a listener that is not a proxy at all.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.listen = other.local_addr().unwrap().to_string();
    assert!(ProxyServer::bind(cfg.clone()).await.is_err());
    // Once that listener is closed the port binds, though a connection it accepted (closed on
    // its side first) is still in TIME_WAIT there, as after a proxy's restart.
    let client = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
    drop(other.accept().unwrap().0);
    drop(other);
    let mut byte = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut &client, &mut byte).unwrap(), 0, "the accepted connection is closed");
    drop(client);
    let time_wait = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{:04X} ", cfg.listen.rsplit(':').next().unwrap().parse::<u16>().unwrap());
    assert!(time_wait.lines().any(|l| l.contains(&port) && l.split_whitespace().nth(3) == Some("06")), "no TIME_WAIT on the port:\n{time_wait}");
    ProxyServer::bind(cfg).await.expect("binds beside a TIME_WAIT connection");
}

#[tokio::test]
async fn a_dns_name_resolving_outside_the_allow_list_is_refused() {
    let up = echo_server().await;
    // Only 127.0.0.2 is allowed; "localhost" resolves to 127.0.0.1 / ::1.
    let p = start(|c, _| {
        c.allowed_targets = vec![AllowedTarget { cidr: "127.0.0.2/32".parse().unwrap(), ports: vec![(1, 65535)] }];
        c.auth_mode = AuthMode::None;
    })
    .await;
    let head = spice_gtk_head(&format!("localhost:{}", up.port()), "");
    let (mut s, status, _) = request(p.addr, head.as_bytes()).await;
    let b = body(&mut s).await;
    assert_eq!(status, 403, "{b}");
    assert!(b.contains("127.0.0.1") && b.contains("not on the allow-list"), "{b}");
    // With the resolved address listed, the name works and the checked address is used.
    let p = start(|c, _| c.auth_mode = AuthMode::None).await;
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&format!("localhost:{}", up.port()), "").as_bytes()).await;
    assert_eq!(status, 200);
    echo_roundtrip(&mut s, b"via dns").await;
}

#[tokio::test]
async fn basic_and_none_modes() {
    let up = echo_server().await;
    let p = start(basic_mode).await;
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), &basic("spice", "s3cret")).as_bytes()).await;
    assert_eq!(status, 200);
    echo_roundtrip(&mut s, b"basic").await;
    for (u, pw) in [("spice", "wrong"), ("other", "s3cret"), ("spice", "s3cret2"), ("", "")] {
        let (_, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), &basic(u, pw)).as_bytes()).await;
        assert_eq!(status, 407, "{u}:{pw}");
    }
    let p = start(|c, _| c.auth_mode = AuthMode::None).await;
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    echo_roundtrip(&mut s, b"none").await;
    // None still enforces the allow-list.
    let (_, status, _) = request(p.addr, spice_gtk_head("127.0.0.1:80", "").as_bytes()).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn a_client_guessing_credentials_is_locked_out_and_no_one_else() {
    let up = echo_server().await;
    let p = start(|c, dir| {
        basic_mode(c, dir);
        c.limits.max_auth_failures_per_client = 3;
        // Long enough that a slow CI machine makes the three guesses within it.
        c.limits.auth_failure_window_seconds = 4;
    })
    .await;
    let right = spice_gtk_head(&up.to_string(), &basic("spice", "s3cret"));
    // Asking without credentials first is no guess: it never counts.
    for _ in 0..5 {
        let (_, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
        assert_eq!(status, 407);
    }
    for guess in ["123456", "password", "spice"] {
        let (_, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), &basic("spice", guess)).as_bytes()).await;
        assert_eq!(status, 407, "guess {guess:?} is refused as wrong credentials");
    }
    // The third failure locked the address: even the right password is refused now, with
    // when to come back.
    let (mut s, status, resp) = request(p.addr, right.as_bytes()).await;
    let b = body(&mut s).await;
    assert_eq!(status, 429, "{resp}{b}");
    assert!(resp.starts_with("HTTP/1.0 429 Too Many Requests\r\n"), "{resp}");
    let retry: u64 = resp.lines().find_map(|l| l.strip_prefix("Retry-After: ")).expect("Retry-After header").parse().unwrap();
    assert!((1..=4).contains(&retry), "Retry-After {retry}");
    assert!(b.contains("too many failed authentications from your address") && b.lines().count() == 1, "{b:?}");
    assert!(!resp.contains("Proxy-Authenticate"), "no new credentials are asked for while locked: {resp}");
    // Another client address is not affected.
    let mut other = connect_from("127.0.0.2", p.addr).unwrap();
    other.write_all(right.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut other).await.0, 200, "another client works during the lock");
    echo_roundtrip(&mut other, b"unaffected").await;
    let text = http_get(p.admin, "/metrics").await;
    assert_eq!(metric(&text, "spice_proxy_auth_lockouts_total"), 1, "{text}");
    assert_eq!(metric(&text, "spice_proxy_tunnels_total{outcome=\"429\"}"), 1);
    assert_eq!(metric(&text, "spice_proxy_tunnels_total{outcome=\"407\"}"), 8);
    // Once the lock has passed, the right password works again.
    tokio::time::sleep(Duration::from_secs(retry) + Duration::from_millis(100)).await;
    let (mut s, status, _) = request(p.addr, right.as_bytes()).await;
    assert_eq!(status, 200, "the lock ends after the window");
    echo_roundtrip(&mut s, b"back").await;
}

#[tokio::test]
async fn forged_tickets_count_as_guesses_and_expired_ones_do_not() {
    let up = echo_server().await;
    let p = start(|c, _| c.limits.max_auth_failures_per_client = 2).await;
    let target = up.to_string();
    let with = |t: &str| spice_gtk_head(&target, &basic("u", t));
    let good = ticket_for("127.0.0.1", &[up.port()], VALID, KEY);
    // A stale console file: signed by us, expired. However many, never a lock.
    let stale = ticket_for("127.0.0.1", &[up.port()], EXPIRED, KEY);
    for _ in 0..5 {
        let (mut s, status, _) = request(p.addr, with(&stale).as_bytes()).await;
        assert_eq!((status, body(&mut s).await.trim().to_string()), (407, "ticket expired".to_string()));
    }
    // A ticket for another target is refused (403) but is no guess either.
    for _ in 0..3 {
        let (_, status, _) = request(p.addr, spice_gtk_head("127.0.0.1:6000", &basic("u", &good)).as_bytes()).await;
        assert_eq!(status, 403);
    }
    assert_eq!(request(p.addr, with(&good).as_bytes()).await.1, 200);
    // Forged: another key's signature, then garbage.
    let forged = ticket_for("127.0.0.1", &[up.port()], VALID, b"a key the attacker made up");
    assert_eq!(request(p.addr, with(&forged).as_bytes()).await.1, 407);
    assert_eq!(request(p.addr, with("v1.garbage").as_bytes()).await.1, 407);
    let (mut s, status, resp) = request(p.addr, with(&good).as_bytes()).await;
    assert_eq!(status, 429, "{resp}{}", body(&mut s).await);
    assert!(resp.contains("Retry-After: 300\r\n"), "the default window, 300 s: {resp}");
}

#[tokio::test]
async fn key_rotation_accepts_current_previous_and_next_only() {
    let up = echo_server().await;
    let p = start(|_, dir| {
        std::fs::write(dir.join("keys/current"), b"new-key-new-key-new-key-new-key!").unwrap();
        std::fs::write(dir.join("keys/previous"), KEY).unwrap();
        std::fs::write(dir.join("keys/next"), b"staged-key-staged-key-staged-key").unwrap();
    })
    .await;
    for key in [&b"new-key-new-key-new-key-new-key!"[..], KEY, b"staged-key-staged-key-staged-key"] {
        let t = ticket_for("127.0.0.1", &[up.port()], 60, key);
        let (_, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), &basic("u", &t)).as_bytes()).await;
        assert_eq!(status, 200);
    }
    let t = ticket_for("127.0.0.1", &[up.port()], VALID, b"retired-key");
    let (_, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), &basic("u", &t)).as_bytes()).await;
    assert_eq!(status, 407);
}

/// Waits until `status` answers `want`, within a re-read of mounted files and some slack.
async fn answers_within_a_reread<F: std::future::Future<Output = u16>>(what: &str, want: u16, status: impl Fn() -> F) {
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let deadline = Instant::now() + within;
    loop {
        let got = status().await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {got} after {within:?}, not {want}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks that `status` answers `want` throughout a re-read of mounted files.
async fn answers_throughout_a_reread<T: PartialEq + std::fmt::Debug, F: std::future::Future<Output = T>>(what: &str, want: T, status: impl Fn() -> F) {
    let until = Instant::now() + spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(1);
    while Instant::now() < until {
        assert_eq!(status().await, want, "{what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Ticket keys come from a Secret volume the kubelet updates in place: a running proxy follows
/// `rotate-key`'s two steps (stage a next key, promote it keeping the previous one), then the
/// retirement of the old key, without a restart and without refusing a ticket signed with a
/// key that is meant to be accepted; a Secret left with no usable key changes nothing.
#[tokio::test]
async fn a_key_rotation_applies_to_a_running_proxy() {
    let up = echo_server().await;
    let (old, new) = (KEY, &b"a-new-key-a-new-key-a-new-key-32"[..]);
    let mut keys = std::path::PathBuf::new();
    let p = start(|c, dir| {
        keys = dir.join("keys-volume");
        std::fs::create_dir(&keys).unwrap();
        common::publish_volume(&keys, 1, &[("current", old)]).unwrap();
        c.keys_dir = Some(keys.to_string_lossy().into());
        // Tickets signed with a key not (or no longer) accepted are guesses: polling with them
        // must not lock the test out.
        c.limits.max_auth_failures_per_client = 0;
    })
    .await;
    let addr = p.addr;
    let status = |key: &'static [u8]| async move {
        let t = ticket_for("127.0.0.1", &[up.port()], VALID, key);
        request(addr, spice_gtk_head(&up.to_string(), &basic("u", &t)).as_bytes()).await.1
    };
    assert_eq!((status(old).await, status(new).await), (200, 407));

    common::publish_volume(&keys, 2, &[("current", old), ("next", new)]).unwrap();
    answers_within_a_reread("a staged key", 200, || status(new)).await;
    assert_eq!(status(old).await, 200);

    common::publish_volume(&keys, 3, &[("current", new), ("previous", old)]).unwrap();
    let both = || async { (status(new).await, status(old).await) };
    answers_throughout_a_reread("the promoted and the previous key", (200, 200), both).await;

    common::publish_volume(&keys, 4, &[("current", new)]).unwrap();
    answers_within_a_reread("a retired key", 407, || status(old)).await;
    assert_eq!(status(new).await, 200);

    // Auth mode Ticket with no key would refuse every console: the keys in use stay.
    common::publish_volume(&keys, 5, &[]).unwrap();
    answers_throughout_a_reread("the key in use and the retired one after an empty Secret", (200, 407), both).await;
}

/// Basic credentials come from a Secret volume too: a changed password applies to a running
/// proxy, and the old one is refused from then on.
#[tokio::test]
async fn changed_basic_credentials_apply_to_a_running_proxy() {
    let up = echo_server().await;
    let mut volume = std::path::PathBuf::new();
    let p = start(|c, dir| {
        volume = dir.join("basic-volume");
        std::fs::create_dir(&volume).unwrap();
        common::publish_volume(&volume, 1, &[("username", b"spice"), ("password", b"s3cret")]).unwrap();
        c.auth_mode = AuthMode::Basic;
        c.basic_dir = Some(volume.to_string_lossy().into());
        c.limits.max_auth_failures_per_client = 0;
    })
    .await;
    let addr = p.addr;
    let status = |password: &'static str| async move { request(addr, spice_gtk_head(&up.to_string(), &basic("spice", password)).as_bytes()).await.1 };
    assert_eq!((status("s3cret").await, status("n3w").await), (200, 407));
    common::publish_volume(&volume, 2, &[("username", b"spice"), ("password", b"n3w")]).unwrap();
    answers_within_a_reread("the new password", 200, || status("n3w")).await;
    assert_eq!(status("s3cret").await, 407);
}

#[tokio::test]
async fn slowloris_gets_408_and_limits_give_503() {
    let up = echo_server().await;
    let p = start(|c, _| {
        c.limits.handshake_timeout_seconds = 1;
        c.limits.max_tunnels = 3;
        c.limits.max_tunnels_per_client = 2;
        c.auth_mode = AuthMode::None;
    })
    .await;
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    slow.write_all(b"CONNECT 127.0.0.1:5900 HTTP/1.0\r\nHost: x").await.unwrap();
    let started = Instant::now();
    let (status, _) = read_response(&mut slow).await;
    assert_eq!(status, 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(slow);
    // A client that connects and says nothing: the listener defers it (TCP_DEFER_ACCEPT, as
    // long as the handshake timeout), then the handshake timeout applies; it is not held forever.
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let started = Instant::now();
    let (status, _) = read_response(&mut silent).await;
    assert_eq!(status, 408);
    assert!(started.elapsed() < Duration::from_secs(6), "silent client answered after {:?}", started.elapsed());
    drop(silent);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let head = spice_gtk_head(&up.to_string(), "");
    let (_a, s1, _) = request(p.addr, head.as_bytes()).await;
    let (_b, s2, _) = request(p.addr, head.as_bytes()).await;
    let (mut c, s3, _) = request(p.addr, head.as_bytes()).await;
    assert_eq!((s1, s2, s3), (200, 200, 503), "a third tunnel from one address is over the per-client limit");
    assert!(body(&mut c).await.contains("too many tunnels from your address"));
    // Another client address (127.0.0.2) may still open one: the global limit is 3.
    let mut third = connect_from("127.0.0.2", p.addr).unwrap();
    third.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut third).await.0, 200);
    // A third address is within its own limit, and over the global one.
    let mut d = connect_from("127.0.0.3", p.addr).unwrap();
    d.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut d).await.0, 503);
    assert!(body(&mut d).await.contains("tunnel limit"));
}

/// Connections that have not sent a request the proxy accepted hold no tunnel place, and when
/// as many wait as there are tunnel places, the one waiting longest is closed for a newcomer.
/// So a slowloris flood from many addresses (each within the per-client limit) neither takes
/// the consoles' places nor keeps out a client that sends its request with a ticket at once.
#[tokio::test]
async fn a_slow_request_flood_from_many_addresses_keeps_out_no_client_with_a_ticket() {
    let up = echo_server().await;
    let p = start(|c, _| {
        c.limits.max_tunnels = 4;
        c.limits.max_tunnels_per_client = 2;
    })
    .await;
    let counts = || async {
        let text = http_get(p.admin, "/metrics").await;
        (metric(&text, "spice_proxy_waiting_connections"), metric(&text, "spice_proxy_waiting_connections_closed_total"))
    };
    // 20 connections from 10 addresses, each sending half a request head and then nothing.
    let mut flood = Vec::new();
    for i in 0..20u64 {
        let mut slow = connect_from(&format!("127.0.0.{}", 10 + i / 2), p.addr).unwrap();
        slow.write_all(b"CONNECT 127.0.0.1:5900 HTTP/1.0\r\nHost: ").await.unwrap();
        flood.push(slow);
        // Taken in one at a time, so the order the proxy saw them in is the order sent.
        let want = ((i + 1).min(4), (i + 1).saturating_sub(4));
        let deadline = Instant::now() + Duration::from_secs(5);
        while counts().await != want {
            assert!(Instant::now() < deadline, "slow connection {i}: want (waiting, closed) {want:?}, have {:?}", counts().await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (status, text) = read_response(&mut flood[0]).await;
    let why = body(&mut flood[0]).await;
    assert!(status == 408 && why.contains("closed to make room") && why.contains("4 connections were waiting"), "{text}{why}");

    // Clients with tickets open as many tunnels as there are places, the flood notwithstanding.
    let ticket = format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(format!("vm:{}", ticket_for("127.0.0.1", &[up.port()], VALID, KEY))));
    let head = spice_gtk_head(&up.to_string(), &ticket);
    let mut tunnels = Vec::new();
    for from in ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"] {
        let mut s = connect_from(from, p.addr).unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut s).await.0, 200, "a client with a ticket from {from}");
        echo_roundtrip(&mut s, b"through the flood").await;
        tunnels.push(s);
    }
    // The first of them made room by closing the longest waiting of the flood; the others found
    // room, as each tunnel left the waiting connections.
    let (status, _) = read_response(&mut flood[16]).await;
    assert_eq!(status, 408, "the longest waiting connection made room");
    assert_eq!(counts().await, (3, 17));
    // The tunnel limit holds for tunnels: a fifth, with its ticket, is turned away once read.
    let mut fifth = connect_from("127.0.0.3", p.addr).unwrap();
    fifth.write_all(head.as_bytes()).await.unwrap();
    let (status, _) = read_response(&mut fifth).await;
    let why = body(&mut fifth).await;
    assert!(status == 503 && why.contains("tunnel limit"), "{status} {why}");
    let text = http_get(p.admin, "/metrics").await;
    assert_eq!(metric(&text, "spice_proxy_active_tunnels"), 4);
    assert_eq!(metric(&text, "spice_proxy_tunnels_total{outcome=\"408\"}"), 17);
    for (i, s) in tunnels.iter_mut().enumerate() {
        echo_roundtrip(s, format!("tunnel {i} still open").as_bytes()).await;
    }
}

/// A PROXY protocol v2 header for a TCP/IPv4 client (what HAProxy's send-proxy-v2 sends).
fn proxy_v2(client: SocketAddr, local: bool) -> Vec<u8> {
    let SocketAddr::V4(c) = client else { panic!("IPv4 only") };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[if local { 0x20 } else { 0x21 }, 0x11, 0, 12]);
    h.extend_from_slice(&c.ip().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&3128u16.to_be_bytes());
    h
}

#[tokio::test]
async fn behind_a_load_balancer_the_proxy_protocol_names_the_client_and_nobody_else_may_send_it() {
    let up = echo_server().await;
    let p = start(|c, _| {
        c.auth_mode = AuthMode::None;
        c.limits.max_tunnels_per_client = 1;
        c.limits.handshake_timeout_seconds = 2;
        c.proxy_protocol = Some(spice_operator::proxy::proxy_protocol::ProxyProtocolConfig { trusted: vec!["127.0.0.1/32".parse().unwrap()] });
    })
    .await;
    let head = spice_gtk_head(&up.to_string(), "");
    // v1, with the request in the same write (as a load balancer forwards it).
    let v1 = format!("PROXY TCP4 198.51.100.7 127.0.0.1 40000 3128\r\n{head}");
    let (mut first, status, _) = request(p.addr, v1.as_bytes()).await;
    assert_eq!(status, 200);
    echo_roundtrip(&mut first, b"through the balancer").await;
    // The per-client limit (1) counts the client the header names, not the balancer: the same
    // client again is over it, another one behind the same balancer is not.
    let mut again = [proxy_v2("198.51.100.7:40001".parse().unwrap(), false), head.clone().into_bytes()].concat();
    let (mut s, status, _) = request(p.addr, &again).await;
    assert_eq!(status, 503);
    assert!(body(&mut s).await.contains("too many tunnels from your address"));
    again[16..20].copy_from_slice(&[198, 51, 100, 8]);
    let (mut second, status, _) = request(p.addr, &again).await;
    assert_eq!(status, 200, "another client behind the balancer");
    echo_roundtrip(&mut second, b"v2").await;
    // The header and the request in separate writes, the header itself split in two.
    let mut split = TcpStream::connect(p.addr).await.unwrap();
    let v2 = proxy_v2("198.51.100.9:40000".parse().unwrap(), false);
    split.write_all(&v2[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    split.write_all(&v2[10..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    split.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut split).await.0, 200);
    echo_roundtrip(&mut split, b"split").await;
    // LOCAL (a health check) counts as the balancer itself, which has no tunnel yet.
    let local = [proxy_v2("0.0.0.0:0".parse().unwrap(), true), head.clone().into_bytes()].concat();
    assert_eq!(request(p.addr, &local).await.1, 200);

    // From the balancer without a header: a client that found a way around it, or a balancer
    // not set up to send one.
    let (mut s, status, _) = request(p.addr, head.as_bytes()).await;
    assert_eq!(status, 400);
    assert!(body(&mut s).await.contains("does not begin with a PROXY protocol header"));
    let (mut s, status, _) = request(p.addr, b"PROXY TCP4 198.51.100.999 127.0.0.1 1 2\r\n").await;
    assert_eq!(status, 400);
    assert!(body(&mut s).await.contains("malformed PROXY protocol header"));
    // From anywhere else, even with a header: 403.
    let mut stranger = connect_from("127.0.0.2", p.addr).unwrap();
    stranger.write_all(v1.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stranger).await.0, 403);
    assert!(body(&mut stranger).await.contains("127.0.0.2 is not a load balancer of this proxy"));
    // A balancer that sends half a header and stops: 408 within the handshake timeout.
    let mut stalled = TcpStream::connect(p.addr).await.unwrap();
    stalled.write_all(b"PROXY TCP4 198.51").await.unwrap();
    let started = Instant::now();
    assert_eq!(read_response(&mut stalled).await.0, 408);
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
}

/// HAProxy's path, from /usr/sbin when PATH lacks it (hack/deps.sh installs Debian's).
fn haproxy_bin() -> &'static str {
    if std::path::Path::new("/usr/sbin/haproxy").exists() { "/usr/sbin/haproxy" } else { "haproxy" }
}

#[tokio::test]
async fn haproxy_in_front_sends_the_proxy_protocol_and_audit_lines_name_its_clients() {
    let up = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_config(dir.path());
    cfg.auth_mode = AuthMode::None;
    cfg.proxy_protocol = Some(spice_operator::proxy::proxy_protocol::ProxyProtocolConfig { trusted: vec!["127.0.0.1/32".parse().unwrap()] });
    let (proxy_port, v1_port, v2_port) = (free_port(), free_port(), free_port());
    cfg.listen = format!("127.0.0.1:{proxy_port}");
    let path = dir.path().join("proxy.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let (_proxy, audit) = proxy_process(&path, proxy_port);
    // Awaited, not waited for: a blocking wait would stall this test's runtime, and with it the
    // upstream whose close ends the tunnel and writes the line.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || audit.iter().for_each(|line| drop(lines_tx.send(line))));
    // One frontend per version; HAProxy connects to the proxy from 127.0.0.1 (trusted).
    let haproxy_cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend v1\n  bind 127.0.0.1:{v1_port}\n  default_backend v1\nbackend v1\n  server s 127.0.0.1:{proxy_port} send-proxy\n\
         frontend v2\n  bind 127.0.0.1:{v2_port}\n  default_backend v2\nbackend v2\n  server s 127.0.0.1:{proxy_port} send-proxy-v2\n"
    )).unwrap();
    let haproxy = Kill(std::process::Command::new(haproxy_bin()).args(["-db", "-f"]).arg(&haproxy_cfg).spawn().expect("haproxy (Debian's, from hack/deps.sh)"));
    wait_port(haproxy.0.id(), v1_port, "haproxy");
    wait_port(haproxy.0.id(), v2_port, "haproxy");
    let head = spice_gtk_head(&up.to_string(), "");
    for (port, client_ip) in [(v1_port, "127.0.0.4"), (v2_port, "127.0.0.5")] {
        let mut s = connect_from(client_ip, format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
        let client = s.local_addr().unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut s).await.0, 200);
        echo_roundtrip(&mut s, b"spice link message").await;
        drop(s);
        let line = loop {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.recv()).await.expect("an audit line for the tunnel within 10 s").unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["event"] == "tunnel" && v["outcome"] == "ok" {
                break v;
            }
        };
        assert_eq!(line["client"], client.to_string(), "the client HAProxy passed on, not HAProxy: {line}");
        assert!(line["via"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
    }
}

/// `spice-operator proxy` as a process of its own (auth mode None, on free ports), started
/// with the open-files limits (soft, hard) given, as a container runtime would set them, and
/// taking tunnels. Its stdout and stderr are pipes this test reads, or leaves unread. It runs
/// until this is dropped: take fields out of it one by one, not by a pattern with `..`, which
/// would drop the rest at once.
struct ProxyProcess {
    proxy: SocketAddr,
    admin: SocketAddr,
    pid: u32,
    stdout: std::process::ChildStdout,
    stderr: std::process::ChildStderr,
    _kill: Kill,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// With no authentication, under the open-files limits `(soft, hard)` when given.
    fn start(open_files: Option<(u64, u64)>) -> ProxyProcess {
        ProxyProcess::configured(open_files, |c| c.auth_mode = AuthMode::None)
    }

    /// With the base configuration (tickets signed with `KEY`) as `edit` leaves it.
    fn configured(open_files: Option<(u64, u64)>, edit: impl FnOnce(&mut ProxyConfig)) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/current"), KEY).unwrap();
        let mut cfg = base_config(dir.path());
        edit(&mut cfg);
        let (proxy, admin) = (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
        (cfg.listen, cfg.admin_listen) = (proxy.to_string(), admin.to_string());
        let path = dir.path().join("proxy.json");
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spice-operator"));
        cmd.args(["proxy", "--config"]).arg(&path).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        if let Some(limit) = open_files {
            common::limit_open_files(&mut cmd, limit);
        }
        let mut child = cmd.spawn().unwrap();
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let pid = child.id();
        let kill = Kill(child);
        wait_port(pid, proxy.port(), "the proxy");
        ProxyProcess { proxy, admin, pid, stdout, stderr, _kill: kill, _dir: dir }
    }
}

/// The log on stderr is queued as the audit log is: a reader of stderr that stalls stops no
/// tunnel, and once it reads again every line is there.
#[tokio::test]
async fn a_stderr_nobody_reads_stops_no_tunnel_and_loses_no_log_line() {
    // One warning of about 150 bytes per locked-out client: about 120 KB, more than a pipe holds.
    const LOCKOUTS: usize = 800;
    let up = echo_server().await;
    // Its stderr is a pipe this test leaves unread until the end.
    let p = ProxyProcess::configured(None, |c| c.limits.max_auth_failures_per_client = 1);
    let (proxy, admin, stderr) = (p.proxy, p.admin, p.stderr);
    let forged = spice_gtk_head(&up.to_string(), &basic("vm", "not-a-ticket"));
    for i in 0..LOCKOUTS {
        // Each from an address of its own, so each locks out a client and logs it.
        let from = format!("127.1.{}.{}", i / 200, i % 200 + 1);
        let guess = async {
            let mut s = connect_from(&from, proxy).unwrap();
            s.write_all(forged.as_bytes()).await.unwrap();
            read_response(&mut s).await.0
        };
        let status = tokio::time::timeout(Duration::from_secs(4), guess).await.unwrap_or_else(|_| panic!("guess {i} not answered within 4 s: the proxy waits for its stderr"));
        assert_eq!(status, 407, "guess {i} from {from}");
    }
    assert_metric_reaches(admin, "spice_proxy_auth_lockouts_total", LOCKOUTS as u64).await;
    // Consoles with a real ticket still get through.
    let good = spice_gtk_head(&up.to_string(), &basic("vm", &ticket_for("127.0.0.1", &[up.port()], 60, KEY)));
    for _ in 0..4 {
        let (mut s, status, text) = request(proxy, good.as_bytes()).await;
        assert_eq!(status, 200, "{text}");
        echo_roundtrip(&mut s, b"spice").await;
    }
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_log_lines_dropped_total"), 0);
    // Now read: every lockout's warning was kept for the reader.
    let read = lines_read_within_10s(stderr, LOCKOUTS, |l| l.contains("WARN") && l.contains("locked out after 1 failed authentications")).await;
    assert_eq!(read, LOCKOUTS);
}

/// Reads `out` (a pipe left unread until now) and counts the lines `wanted` picks, up to `n`;
/// fails if that takes more than 10 s.
async fn lines_read_within_10s(out: impl std::io::Read + Send + 'static, n: usize, wanted: fn(&str) -> bool) -> usize {
    let reading = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out).lines().map_while(Result::ok).filter(|l| wanted(l)).take(n).count()
    });
    tokio::time::timeout(Duration::from_secs(10), reading).await.expect("every line within 10 s of reading").unwrap()
}

/// Opens `n` tunnels through `proxy` to `up` and keeps them open; each must answer 200 and
/// echo within 4 s (shorter than the helpers' own timeouts, so a stuck proxy fails here).
async fn open_tunnels(proxy: SocketAddr, up: SocketAddr, n: usize, why_stuck: &str) -> Vec<TcpStream> {
    let head = spice_gtk_head(&up.to_string(), "");
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let tunnel = async {
            let (mut s, status, text) = request(proxy, head.as_bytes()).await;
            assert_eq!(status, 200, "tunnel {i}: {text}");
            echo_roundtrip(&mut s, b"spice").await;
            s
        };
        open.push(tokio::time::timeout(Duration::from_secs(4), tunnel).await.unwrap_or_else(|_| panic!("tunnel {i} did not work within 4 s: {why_stuck}")));
    }
    open
}

/// The audit line of each tunnel goes to stdout. A reader of stdout that stalls (a container
/// runtime's log pipe) must not stop the proxy, and once it reads again every line is there.
#[tokio::test]
async fn a_stdout_nobody_reads_stops_no_tunnel_and_loses_no_audit_line() {
    // About 150 KB of audit lines: more than twice what a pipe holds (64 KiB).
    const TUNNELS: usize = 800;
    let up = echo_server().await;
    // Its stdout is a pipe this test leaves unread until every tunnel is done.
    let p = ProxyProcess::start(None);
    let (proxy, admin, stdout) = (p.proxy, p.admin, p.stdout);
    for _ in 0..TUNNELS {
        // One at a time, each closed before the next: its line is written as it ends.
        drop(open_tunnels(proxy, up, 1, "the proxy waits for its stdout").await);
    }
    assert_metric_reaches(admin, "spice_proxy_tunnels_total{outcome=\"ok\"}", TUNNELS as u64).await;
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_audit_lines_dropped_total"), 0);
    // Now read: every tunnel's line was kept for the reader.
    let read = lines_read_within_10s(stdout, TUNNELS, |l| l.contains("\"event\":\"tunnel\"") && l.contains("\"outcome\":\"ok\"")).await;
    assert_eq!(read, TUNNELS);
}

/// `Max open files` (soft, hard) from /proc/<pid>/limits.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (fields.next().unwrap().to_string(), fields.next().unwrap().to_string())
}

/// Container runtimes may start the proxy with a soft limit of 1024 open files (containerd 2):
/// the proxy raises it for its tunnel limit, up to the hard limit.
#[tokio::test]
async fn a_low_soft_open_files_limit_is_raised_for_the_tunnel_limit() {
    // 100 open tunnels hold 200 descriptors in the proxy: three times the soft limit of 64.
    const TUNNELS: usize = 100;
    let up = echo_server().await;
    // The hard limit this test runs under (only a privileged process may raise it).
    let hard = open_files_limits(std::process::id()).1.parse::<u64>().unwrap().min(65_536);
    let p = ProxyProcess::start(Some((64, hard)));
    let (proxy, admin, pid) = (p.proxy, p.admin, p.pid);
    // What the default maxTunnels (10,000) needs: 7 descriptors each (6 for the tunnel, 1 for a
    // connection waiting for its request), 64 for the process and 11 for each of its two
    // workers, as far as the hard limit allows.
    let raised = hard.min(10_000 * 7 + 64 + 2 * 11);
    assert_eq!(open_files_limits(pid), (raised.to_string(), hard.to_string()));
    let open = open_tunnels(proxy, up, TUNNELS, "the proxy ran out of file descriptors").await;
    let text = http_get(admin, "/metrics").await;
    assert_eq!(metric(&text, "spice_proxy_active_tunnels"), TUNNELS as u64);
    assert_eq!(metric(&text, "spice_proxy_tunnel_limit"), ((raised - 64 - 2 * 11) / 7).min(10_000));
    drop(open);
}

/// A hard limit too low for maxTunnels lowers the tunnel limit to what it holds, so clients
/// over it get the 503 of a full proxy (not a connection nobody answers), and the log says why.
#[tokio::test]
async fn a_hard_open_files_limit_below_max_tunnels_lowers_the_tunnel_limit() {
    let up = echo_server().await;
    let p = ProxyProcess::start(Some((256, 256)));
    let (proxy, admin, stderr) = (p.proxy, p.admin, p.stderr);
    // (256 - 64 - 2 × 11) / 7 descriptors.
    const FITS: usize = 24;
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_tunnel_limit"), FITS as u64);
    let open = open_tunnels(proxy, up, FITS, "the proxy ran out of file descriptors").await;
    let (mut s, status, _) = request(proxy, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 503);
    assert!(body(&mut s).await.contains("tunnel limit"));
    drop(open);
    let warning = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr).lines().map_while(Result::ok).find(|l| l.contains(&format!("open-files limit leaves descriptors for {FITS} tunnels only")))
    });
    let warning = tokio::time::timeout(Duration::from_secs(10), warning).await.expect("the warning on stderr").unwrap();
    let warning = warning.expect("the warning on stderr");
    assert!(warning.contains("LimitNOFILE") && warning.contains("hard_limit=256"), "{warning}");
    assert!(!warning.contains('\x1b'), "no colour codes in a log that is not a terminal: {warning:?}");
}

/// With a browser port, each tunnel place also has a browser connection waiting for its upgrade,
/// so the open-files limit is shared out with one more descriptor a tunnel, and the browser port
/// holds only as many connections as tunnels fit: under a hard limit of 256, (256 - 64 - 2 × 11)
/// / 8 = 21. One more browser connection does not meet EMFILE: the longest waiting one is
/// closed to make room for it, and it is served.
#[tokio::test]
async fn under_a_low_open_files_limit_the_browser_port_holds_as_many_connections_as_tunnels_fit() {
    use spice_operator::proxy::config::Html5Config;
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let p = ProxyProcess::configured(Some((256, 256)), |c| {
        let listen = web.to_string();
        c.html5 = Some(Html5Config { listen, static_dir: "/nonexistent".into(), allowed_origins: vec![], tls: None, upstream_tls: None });
    });
    const FITS: usize = 21;
    assert_eq!(metric(&http_get(p.admin, "/metrics").await, "spice_proxy_tunnel_limit"), FITS as u64);
    let mut waiting = Vec::new();
    for i in 0..FITS {
        waiting.push(TcpStream::connect(web).await.unwrap_or_else(|e| panic!("browser connection {i}: {e}")));
    }
    assert_metric_reaches(p.admin, "spice_proxy_html5_waiting_connections", FITS as u64).await;
    let mut one_more = TcpStream::connect(web).await.unwrap();
    one_more.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), one_more.read_to_string(&mut answer)).await.expect("answered within 5 s").unwrap();
    // No page directory: 404, from a server that had the descriptors to answer.
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let mut byte = [0u8; 1];
    let first = tokio::time::timeout(Duration::from_secs(5), waiting[0].read(&mut byte)).await.expect("the first connection closed within 5 s");
    assert!(matches!(first, Ok(0)), "the longest waiting connection was closed: {first:?}");
    assert_eq!(metric(&http_get(p.admin, "/metrics").await, "spice_proxy_html5_waiting_connections_closed_total"), 1);
}

/// The kubelet's probes must get through a flood of silent connections to the admin port: a
/// failed liveness probe restarts the pod and ends every console through it. Past its limit the
/// port closes the connection that has waited longest, and a probe, which sends its request at
/// once, is answered.
#[tokio::test]
async fn the_admin_port_closes_the_longest_waiting_connection_for_a_probe_past_its_limit() {
    let p = start(|c, _| c.auth_mode = AuthMode::None).await;
    let mut held = Vec::new();
    for i in 0..spice_operator::admin::MAX_CONNECTIONS {
        held.push(TcpStream::connect(p.admin).await.unwrap_or_else(|e| panic!("admin connection {i}: {e}")));
    }
    // Each is taken in by the accept loop before the probe below.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = tokio::time::timeout(Duration::from_secs(5), http_get(p.admin, "/healthz")).await.expect("answered within 5 s");
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
    let mut byte = [0u8; 1];
    let first = tokio::time::timeout(Duration::from_secs(5), held[0].read(&mut byte)).await.expect("the first connection closed within 5 s");
    assert!(matches!(first, Ok(0)), "the longest waiting connection was closed: {first:?}");
    let last = held.last_mut().unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), last.read(&mut byte)).await.is_err(), "the newest waiting connection was closed too");
    // The scrape made room too (for itself), one more if the probe's place was not given back yet.
    let scrape = http_get(p.admin, "/metrics").await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let closed = metric(&scrape, "spice_proxy_admin_connections_closed_total");
    assert!((1..=2).contains(&closed), "closed to make room: {closed}\n{scrape}");
    assert_eq!(metric(&scrape, "spice_proxy_admin_connections"), spice_operator::admin::MAX_CONNECTIONS as u64, "{scrape}");
}

#[tokio::test]
async fn half_close_propagates_both_ways() {
    // The upstream reads until EOF, then answers and closes: only works if our EOF reaches it.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    for mode in [DataPath::Splice, DataPath::Copy] {
        let p = start(|c, _| {
            c.auth_mode = AuthMode::None;
            c.data_path = mode;
        })
        .await;
        if mode == DataPath::Copy {
            break; // the single-shot upstream above served the splice run; copy is covered by the GiB test
        }
        let (mut s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
        assert_eq!(status, 200);
        s.write_all(&[7u8; 100_000]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await.expect("EOF reaches us").unwrap();
        assert_eq!(answer, "got 100000 bytes");
        assert_metric_reaches(p.admin, "spice_proxy_tunnel_ends_total{reason=\"finished\"}", 1).await;
    }
}

#[tokio::test]
async fn a_half_closed_tunnel_ends_once_quiet_for_the_half_closed_timeout() {
    // Upstreams that never close. The first reads to the client's EOF, then sends a tick
    // every 250 ms for 2 s and falls silent; the second says goodbye with its FIN at once and
    // then waits for EOF from us.
    const TICKS: usize = 8;
    let ticking = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ticking_addr, (eof_tx, eof_rx)) = (ticking.local_addr().unwrap(), tokio::sync::oneshot::channel());
    tokio::spawn(async move {
        let (mut s, _) = ticking.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        for _ in 0..TICKS {
            s.write_all(b"tick").await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await; // holds the socket open, says nothing
    });
    let leaving = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let leaving_addr = leaving.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = leaving.accept().await.unwrap();
        s.shutdown().await.unwrap();
        let fin_sent = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await; // EOF (or a reset) once the proxy closes
        let _ = eof_tx.send(fin_sent.elapsed());
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let p = start(|c, _| {
        c.auth_mode = AuthMode::None;
        c.limits.half_closed_timeout_seconds = 1;
    })
    .await;

    // Client half-closes; data still moving the other way keeps the tunnel open past 1 s.
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&ticking_addr.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let half_closed = Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await.expect("the half-closed tunnel ends long before the idle timeout").unwrap();
    let lasted = half_closed.elapsed();
    assert_eq!(got, b"tick".repeat(TICKS), "every tick sent while half-closed arrives");
    // The last tick comes about 1.75 s after the FIN; the tunnel ends 1 s after it. (Ticks
    // 250 ms apart leave a loaded machine 750 ms of slack before the timeout could cut in.)
    assert!(lasted > Duration::from_millis(2650) && lasted < Duration::from_millis(5000), "ended {lasted:?} after the client's FIN");

    // A tunnel quiet for longer than the timeout, then half-closed: it gets the full timeout
    // after the FIN, not an end at once for the quiet spell before it.
    let quiet = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let quiet_addr = quiet.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = quiet.accept().await.unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&quiet_addr.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.shutdown().await.unwrap();
    let half_closed = Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await.expect("the half-closed tunnel ends").unwrap();
    let lasted = half_closed.elapsed();
    assert!(lasted > Duration::from_millis(900) && lasted < Duration::from_millis(3000), "ended {lasted:?} after a FIN that followed 1.5 s of quiet");

    // Upstream half-closes and the client stays quiet: the tunnel ends 1 s later.
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&leaving_addr.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    let mut b = [0u8; 1];
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.expect("the upstream's FIN arrives").unwrap(), 0);
    let waited = tokio::time::timeout(Duration::from_secs(10), eof_rx).await.expect("the proxy closes the half-closed tunnel").unwrap();
    assert!(waited > Duration::from_millis(900) && waited < Duration::from_millis(3000), "ended {waited:?} after the upstream's FIN");
    assert_metric_reaches(p.admin, "spice_proxy_tunnel_ends_total{reason=\"half_closed\"}", 3).await;
    assert_eq!(metric(&http_get(p.admin, "/metrics").await, "spice_proxy_tunnel_ends_total{reason=\"idle\"}"), 0);
    drop(s);
}

/// A deterministic stream: chunk i is filled from a seed and carries its index, so loss,
/// duplication and reordering all change the checksum.
fn chunk(i: u64, seed: u8, buf: &mut [u8]) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = (j as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add(i as u8);
    }
    buf[..8].copy_from_slice(&i.to_le_bytes());
}

async fn send_and_hash(mut w: impl AsyncWriteExt + Unpin, total: u64, seed: u8) -> Vec<u8> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..total / buf.len() as u64 {
        chunk(i, seed, &mut buf);
        h.update(&buf);
        w.write_all(&buf).await.unwrap();
    }
    w.shutdown().await.unwrap();
    h.finalize().to_vec()
}

async fn receive_and_hash(mut r: impl AsyncReadExt + Unpin) -> (u64, Vec<u8>) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            return (n, h.finalize().to_vec());
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

async fn both_ways(mode: DataPath, total: u64) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (r, w) = s.into_split();
        let (sent, got) = tokio::join!(send_and_hash(w, total, 2), receive_and_hash(r));
        (sent, got)
    });
    let p = start(|c, _| {
        c.auth_mode = AuthMode::None;
        c.data_path = mode;
    })
    .await;
    let (s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    let (r, w) = s.into_split();
    let (sent_up, (n_down, got_down)) = tokio::join!(send_and_hash(w, total, 1), receive_and_hash(r));
    let (sent_down, (n_up, got_up)) = server.await.unwrap();
    assert_eq!((n_up, n_down), (total, total), "{mode:?}: byte counts");
    assert_eq!(got_up, sent_up, "{mode:?}: client → server checksum");
    assert_eq!(got_down, sent_down, "{mode:?}: server → client checksum");
    let metrics = http_get(p.admin, "/metrics").await;
    assert!(metrics.contains("spice_proxy_tunnels_total{outcome=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains(&format!("spice_proxy_bytes_total{{direction=\"up\"}} {total}")), "{metrics}");
    let spliced: u64 = metric(&metrics, "spice_proxy_spliced_bytes_total");
    match mode {
        // Bulk data switches to splice after its first large read: all but a few reads' worth.
        DataPath::Splice => assert!(spliced > 2 * total - (1 << 20), "{mode:?}: only {spliced} of {} bytes spliced", 2 * total),
        DataPath::Copy => assert_eq!(spliced, 0, "{mode:?}: copy mode must not splice"),
    }
}

#[tokio::test]
async fn small_messages_are_copied_and_bulk_data_is_spliced() {
    let up = echo_server().await;
    let p = start(|c, _| c.auth_mode = AuthMode::None).await;
    let spliced = || async { metric(&http_get(p.admin, "/metrics").await, "spice_proxy_spliced_bytes_total") };
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    for i in 0..50u8 {
        echo_roundtrip(&mut s, &[i; 64]).await; // the size of SPICE input and cursor messages
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(spliced().await, 0, "interactive messages are copied: no pipe for them");

    let (mut s, _, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    let bulk: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; bulk.len()];
    let (sent, got) = tokio::join!(w.write_all(&bulk), r.read_exact(&mut back));
    sent.unwrap();
    got.unwrap();
    assert!(back == bulk, "bytes changed on the way");
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let moved = 2 * bulk.len() as u64;
    let n = spliced().await;
    assert!(n > moved / 2 && n <= moved, "bulk data moves by splice once a read fills the copy threshold: {n} of {moved}");
}

#[tokio::test]
async fn bytes_spliced_by_a_tunnel_that_ends_mid_splice_are_counted() {
    // Both directions are still splicing when the idle timeout ends the tunnel, so neither
    // finishes on its own: what they spliced must be counted all the same.
    let up = echo_server().await;
    let p = start(|c, _| {
        c.auth_mode = AuthMode::None;
        c.limits.idle_timeout_seconds = 1; // a file may hold less than the CRD's 301
    })
    .await;
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    let bulk = vec![5u8; 4 << 20];
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; bulk.len()];
    let (sent, got) = tokio::join!(w.write_all(&bulk), r.read_exact(&mut back));
    sent.unwrap();
    got.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.expect("closed by the idle timeout").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let moved = 2 * bulk.len() as u64;
    let n = metric(&http_get(p.admin, "/metrics").await, "spice_proxy_spliced_bytes_total");
    assert!(n > moved / 2 && n <= moved, "spliced bytes of a tunnel ended by the idle timeout: {n} of {moved} counted");
}

#[tokio::test]
async fn a_paused_reader_then_a_small_late_message_arrive_in_full() {
    // While the client does not read, the proxy's output blocks and it stops listening to the
    // hypervisor side; afterwards a message of a few bytes on an open connection (a cursor
    // update, say) must still be delivered at once.
    const BULK: usize = 32 << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (tail_tx, tail_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&vec![9u8; BULK]).await.unwrap();
        tail_rx.await.unwrap();
        s.write_all(b"late cursor update").await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await; // open: no EOF to wake anyone
    });
    let p = start(|c, _| c.auth_mode = AuthMode::None).await;
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await; // the client is busy: buffers fill up
    let mut bulk = vec![0u8; BULK];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut bulk)).await.expect("bulk in time").unwrap();
    assert!(bulk.iter().all(|&b| b == 9));
    tail_tx.send(()).unwrap();
    let mut tail = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut tail)).await.expect("the late message is not held back").unwrap();
    assert_eq!(&tail, b"late cursor update");
}

/// The value of an unlabelled series in Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name} in {text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits (up to 2 s) for a series to reach `want`: a peer sees its socket close a moment
/// before the proxy counts the tunnel's end.
async fn assert_metric_reaches(admin: SocketAddr, name: &str, want: u64) {
    assert_metric_reaches_within(admin, name, want, Duration::from_secs(2)).await
}

async fn assert_metric_reaches_within(admin: SocketAddr, name: &str, want: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = metric(&http_get(admin, "/metrics").await, name);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {got}, expected {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pipe ends among process `pid`'s descriptors.
fn pipe_ends(pid: u32) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).filter(|target| target.to_string_lossy().starts_with("pipe:")).count()
}

/// A direction holds its pipe only while bytes are in it. Consoles whose display sent a burst
/// and went quiet hold none: each pipe counts 1 MiB against the user's pipe pages, past which an
/// unprivileged proxy's new pipes have 8 KiB.
#[tokio::test]
async fn quiet_tunnels_hold_no_pipe_after_a_burst() {
    const TUNNELS: usize = 40;
    let up = echo_server().await;
    let p = ProxyProcess::start(None);
    let (proxy, pid) = (p.proxy, p.pid);
    // Its stdout and stderr are pipes to this test.
    let before = pipe_ends(pid);
    let mut open = open_tunnels(proxy, up, TUNNELS, "the proxy is stuck").await;
    // 1 MiB each way through every tunnel: both directions splice.
    let burst: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for s in &mut open {
        echo_roundtrip(s, &burst).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // At most the spares of the proxy's two workers: 4 pipes of 2 ends each.
    let held = pipe_ends(pid) - before;
    assert!(held <= 2 * 4 * 2, "{TUNNELS} quiet tunnels hold {held} pipe ends");
    // The pipes they share move every byte again, in order.
    for s in &mut open {
        echo_roundtrip(s, &burst).await;
    }
}

/// Sets process `pid`'s soft limit on open files, keeping its hard limit.
fn set_open_files_soft_limit(pid: u32, soft: u64) {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    assert_eq!(unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) }, 0);
    let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
    assert_eq!(unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) }, 0, "{}", std::io::Error::last_os_error());
}

/// A tunnel whose proxy has no descriptor left for a pipe keeps working, copying.
#[tokio::test]
async fn a_tunnel_with_no_descriptors_left_for_its_pipes_copies_instead() {
    const TOTAL: u64 = 8 << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let p = ProxyProcess::start(None);
    let (proxy, admin, pid) = (p.proxy, p.admin, p.pid);
    let (s, status, _) = request(proxy, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    let (server, _) = l.accept().await.unwrap();
    // The lowest descriptor number the proxy could get next becomes its limit: every new
    // descriptor (a pipe's two) fails with EMFILE from here on.
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap()).collect();
    let lowest_free = (0..).find(|fd| !open.contains(fd)).unwrap();
    set_open_files_soft_limit(pid, lowest_free);
    let far_side = tokio::spawn(async move {
        let (r, w) = server.into_split();
        tokio::join!(send_and_hash(w, TOTAL, 2), receive_and_hash(r))
    });
    let (r, w) = s.into_split();
    let (sent_up, (n_down, got_down)) = tokio::join!(send_and_hash(w, TOTAL, 1), receive_and_hash(r));
    let (sent_down, (n_up, got_up)) = far_side.await.unwrap();
    assert_eq!((n_up, n_down), (TOTAL, TOTAL));
    assert_eq!((got_up, got_down), (sent_up, sent_down), "checksums each way");
    // The admin port needs a descriptor per scrape.
    set_open_files_soft_limit(pid, 1024);
    assert_metric_reaches(admin, "spice_proxy_tunnels_total{outcome=\"ok\"}", 1).await;
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_spliced_bytes_total"), 0, "nothing could be spliced");
}

#[tokio::test]
async fn one_gib_each_way_with_checksums_through_splice() {
    both_ways(DataPath::Splice, 1 << 30).await;
}

#[tokio::test]
async fn copy_fallback_moves_the_same_bytes() {
    both_ways(DataPath::Copy, 64 << 20).await;
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn drain_keeps_open_tunnels_working_then_closes_them_at_the_deadline() {
    let up = echo_server().await;
    let p = start(|c, _| {
        c.auth_mode = AuthMode::None;
        c.limits.drain_seconds = 2;
    })
    .await;
    assert!(http_get(p.admin, "/readyz").await.starts_with("HTTP/1.1 200"));
    let (mut s, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    p.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Draining: not ready, no new connections, but the open tunnel still works.
    let ready = http_get(p.admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("draining"), "{ready}");
    assert!(TcpStream::connect(p.addr).await.is_err(), "the listener must be closed while draining");
    echo_roundtrip(&mut s, b"still here during the drain").await;
    // At the deadline the proxy closes it and exits.
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.expect("closed at the deadline").ok();
    assert!(started.elapsed() < Duration::from_secs(4));
    tokio::time::timeout(Duration::from_secs(5), p.done).await.unwrap().unwrap().unwrap();
}

/// Kube-proxy and load balancers go on sending new connections to a stopping pod for a while:
/// for the shutdown delay they still get tunnels, though the pod reports not ready at once.
#[tokio::test]
async fn a_stopping_proxy_still_accepts_tunnels_for_the_shutdown_delay_while_not_ready() {
    let up = echo_server().await;
    let p = start(|c, _| {
        c.auth_mode = AuthMode::None;
        c.limits.shutdown_delay_seconds = 3;
        c.limits.drain_seconds = 30;
    })
    .await;
    let (mut before, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200);
    p.stop.send(true).unwrap();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = http_get(p.admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("draining"), "not ready from the stop signal on: {ready}");
    // A client sent here after the stop signal is served, as every tunnel open before it.
    let (mut during, status, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    assert_eq!(status, 200, "a tunnel asked for within the shutdown delay");
    echo_roundtrip(&mut during, b"opened after the stop signal").await;
    echo_roundtrip(&mut before, b"opened before it").await;
    assert!(stopped.elapsed() < Duration::from_secs(3), "the checks above took the whole delay: {:?}", stopped.elapsed());
    // After the delay the listener closes; the open tunnels drain.
    common::refuses_after_the_delay(p.addr, stopped, Duration::from_secs(3)).await;
    echo_roundtrip(&mut during, b"draining").await;
    echo_roundtrip(&mut before, b"draining too").await;
    drop((before, during));
    tokio::time::timeout(Duration::from_secs(5), p.done).await.expect("exits once the last tunnel closed").unwrap().unwrap();
}

#[tokio::test]
async fn the_proxy_binary_drains_on_sigterm_and_exits_at_once_on_a_second() {
    let up = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_config(dir.path());
    cfg.auth_mode = AuthMode::None;
    cfg.limits.drain_seconds = 60;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    cfg.listen = listen.to_string();
    let path = dir.path().join("proxy.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut proxy = std::process::Command::new(env!("CARGO_BIN_EXE_spice-operator"))
        .args(["proxy", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = proxy.id().to_string();
    let kill = |signal: &str| std::process::Command::new("kill").args(["-s", signal, &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        if let Ok(s) = TcpStream::connect(listen).await {
            break s;
        }
        assert!(Instant::now() < deadline, "the proxy did not listen within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    s.write_all(spice_gtk_head(&up.to_string(), "").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    kill("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    echo_roundtrip(&mut s, b"draining, still served").await;
    assert!(proxy.try_wait().unwrap().is_none(), "exited on the first SIGTERM with a tunnel open and 60 s of drain left");
    kill("TERM");
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = proxy.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(3), "still draining 3 s after a second SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1), "a second signal exits with status 1");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await.expect("the tunnel is closed with the process");
}

/// A proxy process (auth None, on free ports) whose configuration file is in a ConfigMap
/// volume, which the test updates as the kubelet does.
struct VolumeProxy {
    volume: std::path::PathBuf,
    addr: SocketAddr,
    admin: SocketAddr,
    audit: std::sync::mpsc::Receiver<String>,
    _proxy: Kill,
    _dir: tempfile::TempDir,
}

impl VolumeProxy {
    /// Starts with `base_config` as `edit` leaves it; returns the configuration to edit later.
    fn start(edit: impl FnOnce(&mut ProxyConfig)) -> (Self, ProxyConfig) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = base_config(dir.path());
        cfg.auth_mode = AuthMode::None;
        let (port, admin_port) = (free_port(), free_port());
        cfg.listen = format!("127.0.0.1:{port}");
        cfg.admin_listen = format!("127.0.0.1:{admin_port}");
        edit(&mut cfg);
        let volume = dir.path().join("config");
        std::fs::create_dir(&volume).unwrap();
        common::publish_config_volume(&volume, 1, &serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let (proxy, audit) = proxy_process(&volume.join("config.json"), port);
        let (addr, admin) = (SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from(([127, 0, 0, 1], admin_port)));
        (VolumeProxy { volume, addr, admin, audit, _proxy: proxy, _dir: dir }, cfg)
    }

    /// Publishes `cfg` as the volume's `version`th content.
    fn publish(&self, cfg: &ProxyConfig, version: u32) {
        common::publish_config_volume(&self.volume, version, &serde_json::to_string_pretty(cfg).unwrap()).unwrap();
    }
}

/// The kubelet updates a mounted ConfigMap in place. A changed allow-list applies without a
/// restart (a rollout would end every open console after the drain deadline), the tunnels to a
/// target it no longer lists are closed and audited, the others go on, and a file that cannot
/// be used changes nothing.
#[tokio::test]
async fn a_changed_allow_list_applies_without_a_restart_and_closes_tunnels_it_no_longer_lists() {
    let (dropped, kept, added) = (echo_server().await, echo_server().await, echo_server_on("127.0.0.2:0").await);
    let rule = |ip: &str, port: u16| AllowedTarget { cidr: format!("{ip}/32").parse().unwrap(), ports: vec![(port, port)] };
    let (p, mut cfg) = VolumeProxy::start(|cfg| cfg.allowed_targets = vec![rule("127.0.0.1", dropped.port()), rule("127.0.0.1", kept.port())]);
    let publish = |cfg: &ProxyConfig, version: u32| p.publish(cfg, version);
    let (addr, admin, audit) = (p.addr, p.admin, &p.audit);
    let open = |target: SocketAddr| async move { request(addr, spice_gtk_head(&target.to_string(), "").as_bytes()).await };

    let (mut to_dropped, status, _) = open(dropped).await;
    assert_eq!(status, 200);
    let (mut to_kept, status, _) = open(kept).await;
    assert_eq!(status, 200);
    let (mut s, status, _) = open(added).await;
    assert_eq!(status, 403, "{}", body(&mut s).await);
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_allow_list_rules"), 2);

    // A new hypervisor, one target gone; a setting read only at start changes too, which
    // the operator rolls the pods for: it changes nothing here.
    cfg.allowed_targets = vec![rule("127.0.0.1", kept.port()), rule("127.0.0.2", added.port())];
    cfg.limits.idle_timeout_seconds += 60;
    publish(&cfg, 2);
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let deadline = Instant::now() + within;
    let mut to_added = loop {
        let (mut s, status, _) = open(added).await;
        if status == 200 {
            break s;
        }
        let b = body(&mut s).await;
        assert!(status == 403 && Instant::now() < deadline, "the new allow-list was not in use within {within:?}: {status} {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    echo_roundtrip(&mut to_added, b"a target just added").await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), to_dropped.read_to_end(&mut rest)).await.expect("the tunnel to the target taken off is closed").unwrap();
    echo_roundtrip(&mut to_kept, b"a target still listed").await;
    let (mut s, status, _) = open(dropped).await;
    assert_eq!(status, 403, "{}", body(&mut s).await);
    assert_metric_reaches(admin, "spice_proxy_tunnel_ends_total{reason=\"revoked\"}", 1).await;
    let text = http_get(admin, "/metrics").await;
    assert_eq!(metric(&text, "spice_proxy_config_reloads_total{outcome=\"applied\"}"), 1);
    assert_eq!(metric(&text, "spice_proxy_allow_list_rules"), 2);
    let closed = std::iter::from_fn(|| audit.recv_timeout(Duration::from_secs(5)).ok())
        .map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap())
        .find(|l| l["close"] == "target taken off the allow-list")
        .expect("an audit line for the closed tunnel");
    assert_eq!(closed["target"], dropped.to_string());

    // An empty allow-list (the schema refuses one; a hand edit of the ConfigMap might not) is
    // refused: the list in use stays, and so do its tunnels.
    cfg.allowed_targets.clear();
    publish(&cfg, 3);
    assert_metric_reaches_within(admin, "spice_proxy_config_reloads_total{outcome=\"refused\"}", 1, within).await;
    let (mut s, status, _) = open(added).await;
    assert_eq!(status, 200);
    echo_roundtrip(&mut s, b"still allowed").await;
    echo_roundtrip(&mut to_added, b"still open").await;
    echo_roundtrip(&mut to_kept, b"still open too").await;
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_allow_list_rules"), 2);
}

/// A tunnel through `proxy` once it is no longer refused 503, trying until `within`.
async fn opened_within(proxy: SocketAddr, head: &[u8], within: Duration, what: &str) -> TcpStream {
    let deadline = Instant::now() + within;
    loop {
        let (mut s, status, _) = request(proxy, head).await;
        if status == 200 {
            return s;
        }
        let why = body(&mut s).await;
        assert!(status == 503 && Instant::now() < deadline, "{what}: not opened within {within:?}: {status} {why}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raising a full proxy's limits must not end every open console, so the live limits apply
/// without a restart as the allow-list does: to the tunnels opened from then on. A lowered
/// limit turns new tunnels away until enough have closed, and ends none; a lowered idle
/// timeout applies to open tunnels too.
#[tokio::test]
async fn changed_limits_apply_without_a_restart_and_a_lowered_one_ends_no_open_tunnel() {
    let up = echo_server().await;
    let (p, mut cfg) = VolumeProxy::start(|cfg| {
        cfg.limits.max_tunnels = 1;
        // The listener defers a connection without a request this long (TCP_DEFER_ACCEPT).
        cfg.limits.handshake_timeout_seconds = 2;
    });
    let publish = |cfg: &ProxyConfig, version: u32| p.publish(cfg, version);
    let (addr, admin, audit) = (p.addr, p.admin, &p.audit);
    let head_text = spice_gtk_head(&up.to_string(), "");
    let head = head_text.as_bytes();
    let open = || async { request(addr, head).await };
    let refused_for = |from: &'static str, why: &'static str| async move {
        let mut s = connect_from(from, addr).unwrap();
        s.write_all(head).await.unwrap();
        let status = read_response(&mut s).await.0;
        let b = body(&mut s).await;
        assert!(status == 503 && b.contains(why), "want 503 {why}: {status} {b}");
    };
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);

    let mut a = opened_within(addr, head, Duration::from_secs(5), "the first tunnel").await;
    refused_for("127.0.0.1", "tunnel limit").await;

    // Raised: the second tunnel opens once the replica has read the file; the per-client
    // limit, lowered in the same change, applies as well.
    cfg.limits.max_tunnels = 3;
    cfg.limits.max_tunnels_per_client = 2;
    publish(&cfg, 2);
    let mut b = opened_within(addr, head, within, "the raised limit").await;
    refused_for("127.0.0.1", "too many tunnels from your address").await;
    let text = http_get(admin, "/metrics").await;
    assert_eq!(metric(&text, "spice_proxy_tunnel_limit"), 3);
    assert_eq!(metric(&text, "spice_proxy_config_reloads_total{outcome=\"applied\"}"), 1);

    // Lowered below the tunnels open, with a short idle timeout: both stay open while busy,
    // past the new idle timeout too (a lowered limit ends no tunnel).
    cfg.limits.max_tunnels = 1;
    cfg.limits.idle_timeout_seconds = 2;
    publish(&cfg, 3);
    busy_until_applied(admin, 2, within, &mut [&mut a, &mut b]).await;
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_tunnel_limit"), 1);
    // From another address: 127.0.0.1 is at its own limit as well.
    refused_for("127.0.0.2", "tunnel limit").await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        echo_roundtrip(&mut a, b"open before the limit was lowered").await;
        echo_roundtrip(&mut b, b"and this one too").await;
    }
    // Quiet from now on, the open one idles out at the new timeout.
    let quiet = Instant::now();
    // One closed: one is still open, the limit's worth.
    drop(a);
    assert_metric_reaches(admin, "spice_proxy_active_tunnels", 1).await;
    refused_for("127.0.0.1", "tunnel limit").await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut rest)).await.expect("the open tunnel closed at the new idle timeout").unwrap();
    assert!(quiet.elapsed() >= Duration::from_millis(1900), "closed after {:?} of quiet, before the idle timeout", quiet.elapsed());
    assert_metric_reaches(admin, "spice_proxy_active_tunnels", 0).await;
    // A tunnel opened now has it as well.
    let (mut c, status, _) = open().await;
    assert_eq!(status, 200);
    let opened = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.expect("closed at the new idle timeout").unwrap();
    assert!(opened.elapsed() >= Duration::from_millis(1900), "closed after {:?}, before its idle timeout", opened.elapsed());
    let lines: Vec<serde_json::Value> = std::iter::from_fn(|| audit.recv_timeout(Duration::from_secs(2)).ok()).map(|l| serde_json::from_str(&l).unwrap()).collect();
    let closes: Vec<&str> = lines.iter().filter(|l| l["outcome"] == "ok").map(|l| l["close"].as_str().unwrap()).collect();
    assert_eq!(closes.iter().filter(|c| **c == "idle timeout").count(), 2, "the tunnel left quiet and the one opened after the change idle out: {closes:?}");
}

/// A load balancer replaced by one at another address must not end every open console with a
/// rollout: the balancers trusted to send the PROXY protocol apply to the next connections
/// without a restart, and a tunnel that came through the old one stays open.
#[tokio::test]
async fn a_new_load_balancer_is_trusted_without_a_restart_and_the_old_ones_tunnels_stay() {
    use spice_operator::proxy::proxy_protocol::ProxyProtocolConfig;
    let up = echo_server().await;
    let (p, mut cfg) = VolumeProxy::start(|cfg| cfg.proxy_protocol = Some(ProxyProtocolConfig { trusted: vec!["127.0.0.2/32".parse().unwrap()] }));
    let head = format!("PROXY TCP4 198.51.100.7 127.0.0.1 40000 3128\r\n{}", spice_gtk_head(&up.to_string(), ""));
    let through = |balancer: &'static str| {
        let head = head.clone();
        async move {
            let mut s = connect_from(balancer, p.addr).unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let status = read_response(&mut s).await.0;
            (s, status)
        }
    };
    let (mut old, status) = through("127.0.0.2").await;
    assert_eq!(status, 200);
    echo_roundtrip(&mut old, b"through the first balancer").await;
    let (mut s, status) = through("127.0.0.3").await;
    assert_eq!(status, 403);
    assert!(body(&mut s).await.contains("127.0.0.3 is not a load balancer of this proxy"));

    cfg.proxy_protocol = Some(ProxyProtocolConfig { trusted: vec!["127.0.0.3/32".parse().unwrap()] });
    p.publish(&cfg, 2);
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let deadline = Instant::now() + within;
    let mut new = loop {
        match through("127.0.0.3").await {
            (s, 200) => break s,
            (_, status) => assert!(status == 403 && Instant::now() < deadline, "the new balancer was not trusted within {within:?}: {status}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    echo_roundtrip(&mut new, b"through the new balancer").await;
    let (mut s, status) = through("127.0.0.2").await;
    assert_eq!(status, 403, "the old balancer is no longer trusted");
    assert!(body(&mut s).await.contains("127.0.0.2 is not a load balancer of this proxy"));
    echo_roundtrip(&mut old, b"opened through the old balancer, still open").await;
    assert_eq!(metric(&http_get(p.admin, "/metrics").await, "spice_proxy_config_reloads_total{outcome=\"applied\"}"), 1);

    // A hand-edited file that names no balancer (the schema refuses it) is refused whole: the
    // balancer in use stays trusted.
    cfg.proxy_protocol = Some(ProxyProtocolConfig { trusted: Vec::new() });
    p.publish(&cfg, 3);
    assert_metric_reaches_within(p.admin, "spice_proxy_config_reloads_total{outcome=\"refused\"}", 1, within).await;
    let (mut still, status) = through("127.0.0.3").await;
    assert_eq!(status, 200, "the refused file took the trusted balancer away");
    echo_roundtrip(&mut still, b"after a refused file").await;
}

/// Keeps `tunnels` (to echoing upstreams) busy until the replica has applied `files` changed
/// configuration files: a lowered idle timeout would end them when it is read.
async fn busy_until_applied(admin: SocketAddr, files: u64, within: Duration, tunnels: &mut [&mut TcpStream]) {
    let deadline = Instant::now() + within;
    while metric(&http_get(admin, "/metrics").await, "spice_proxy_config_reloads_total{outcome=\"applied\"}") < files {
        assert!(Instant::now() < deadline, "the changed file was not applied within {within:?}");
        for t in tunnels.iter_mut() {
            echo_roundtrip(t, b"busy").await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An admin who raises the idle timeout because consoles are being cut saves the consoles open
/// now, not only the next ones; a lowered half-closed timeout ends an open half-closed tunnel
/// quiet for longer, without a restart.
#[tokio::test]
async fn open_tunnels_follow_changed_idle_and_half_closed_timeouts() {
    let up = echo_server().await;
    // An upstream that echoes until our EOF and then holds its side open, saying nothing.
    let holding = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let holding_addr = holding.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = holding.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
    let (p, mut cfg) = VolumeProxy::start(|cfg| {
        cfg.limits.idle_timeout_seconds = 3;
        cfg.limits.half_closed_timeout_seconds = 3;
    });
    let (addr, admin) = (p.addr, p.admin);
    let applied = "spice_proxy_config_reloads_total{outcome=\"applied\"}";
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(5);
    let mut echoing = opened_within(addr, spice_gtk_head(&up.to_string(), "").as_bytes(), Duration::from_secs(5), "the echoing tunnel").await;
    let mut held = opened_within(addr, spice_gtk_head(&holding_addr.to_string(), "").as_bytes(), Duration::from_secs(5), "the held tunnel").await;

    // Raised: both are kept busy until the replica has read the file, then stay quiet for
    // twice the old idle timeout and are still open.
    cfg.limits.idle_timeout_seconds = 600;
    cfg.limits.half_closed_timeout_seconds = 600;
    p.publish(&cfg, 2);
    busy_until_applied(admin, 1, within, &mut [&mut echoing, &mut held]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    echo_roundtrip(&mut echoing, b"open past the old idle timeout").await;
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_active_tunnels"), 2);

    // Half-closed by the client, the held tunnel stays open for the raised half-closed
    // timeout; lowered below the time it has been quiet, it ends once the file is read.
    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    assert!(tokio::time::timeout(Duration::from_secs(4), held.read_to_end(&mut rest)).await.is_err(), "the half-closed tunnel ended before its raised timeout");
    cfg.limits.half_closed_timeout_seconds = 2;
    p.publish(&cfg, 3);
    tokio::time::timeout(within, held.read_to_end(&mut rest)).await.expect("the open half-closed tunnel ended at the lowered timeout").unwrap();
    assert_eq!(metric(&http_get(admin, "/metrics").await, applied), 2, "it ended when the replica read the lowered timeout");
    assert_metric_reaches(admin, "spice_proxy_tunnel_ends_total{reason=\"half_closed\"}", 1).await;
    // The other, not half-closed, keeps the raised idle timeout.
    echo_roundtrip(&mut echoing, b"still open").await;
    assert_eq!(metric(&http_get(admin, "/metrics").await, "spice_proxy_tunnel_ends_total{reason=\"idle\"}"), 0);
}

/// The error that ends the process is also written to the termination-message file Kubernetes
/// provides, so `kubectl describe pod` and the SpiceProxy's status quote it; a path that does not
/// exist (outside a container) is never created.
#[test]
fn a_fatal_error_is_the_termination_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_config(dir.path());
    cfg.allowed_targets.clear();
    let config = dir.path().join("proxy.json");
    std::fs::write(&config, serde_json::to_string(&cfg).unwrap()).unwrap();
    let run = |termination_log: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spice-operator"))
            .args(["proxy", "--config"])
            .arg(&config)
            .arg("--termination-log")
            .arg(termination_log)
            .output()
            .unwrap()
    };
    // The kubelet creates the file before the container starts.
    let provided = dir.path().join("termination-log");
    std::fs::write(&provided, "").unwrap();
    let out = run(&provided);
    assert_eq!(out.status.code(), Some(1));
    let sentence = "allowedTargets is empty: refusing to run an open proxy";
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("spice-operator: {sentence}")), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&provided).unwrap(), format!("{sentence}\n"));
    let absent = dir.path().join("absent-log");
    assert_eq!(run(&absent).status.code(), Some(1));
    assert!(!absent.exists(), "a termination-message file is never created");
}

#[tokio::test]
async fn drain_ends_early_when_the_last_tunnel_closes() {
    let up = echo_server().await;
    let p = start(|c, _| {
        c.auth_mode = AuthMode::None;
        c.limits.drain_seconds = 60;
    })
    .await;
    let (mut s, _, _) = request(p.addr, spice_gtk_head(&up.to_string(), "").as_bytes()).await;
    echo_roundtrip(&mut s, b"x").await;
    p.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), p.done).await.expect("exits once idle, long before 60 s").unwrap().unwrap();
}

/// A network namespace joined to this one by a veth pair with a /30 of its own (from the
/// benchmarking range 198.18.0.0/15, picked by process id), removed on drop. Needs root.
struct Netns {
    name: String,
    /// This side's address, and the namespace's.
    here: std::net::Ipv4Addr,
    there: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("iproute2's ip (Debian iproute2)");
    assert!(out.status.success(), "ip {}: {} (these tests need root for network namespaces)", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

impl Netns {
    fn new() -> Self {
        let pid = std::process::id();
        let block = pid % 16384;
        let (third, fourth) = ((block / 64) as u8, (block % 64 * 4) as u8);
        let n = Netns { name: format!("spxd{pid}"), here: [198, 18, third, fourth + 1].into(), there: [198, 18, third, fourth + 2].into() };
        let (a, b) = (n.link_here(), n.link_there());
        n.remove(); // what a killed earlier run with this process id may have left
        ip(&["netns", "add", &n.name]);
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &n.name]);
        ip(&["addr", "add", &format!("{}/30", n.here), "dev", &a]);
        ip(&["link", "set", &a, "up"]);
        ip(&["-n", &n.name, "addr", "add", &format!("{}/30", n.there), "dev", &b]);
        ip(&["-n", &n.name, "link", "set", &b, "up"]);
        n
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes live there for good.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            rustix::thread::move_into_link_name_space(std::os::fd::AsFd::as_fd(&ns), Some(rustix::thread::LinkNameSpaceType::Network)).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// The namespace's side of the link goes down: what it sent before is all anyone gets,
    /// and what reaches its link is dropped without an answer, as from a host that lost power.
    fn blackhole(&self) {
        ip(&["-n", &self.name, "link", "set", &self.link_there(), "down"]);
    }

    /// The veth pair's ends: this side's, and the namespace's.
    fn link_here(&self) -> String {
        format!("{}a", self.name)
    }
    fn link_there(&self) -> String {
        format!("{}b", self.name)
    }

    /// What the kernel says of the sockets that reach into the namespace, for failure messages.
    fn sockets(&self) -> String {
        match std::process::Command::new("ss").args(["-tnoie", "dst", &self.there.to_string()]).output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => format!("ss: {e}"),
        }
    }

    fn remove(&self) {
        let quiet = |args: &[&str]| std::process::Command::new("ip").args(args).stderr(std::process::Stdio::null()).status();
        let _ = quiet(&["link", "del", &self.link_here()]);
        let _ = quiet(&["netns", "del", &self.name]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}

#[tokio::test]
async fn a_peer_gone_without_closing_ends_its_tunnel_after_the_dead_peer_timeout() {
    let ns = Netns::new();
    let there = ns.there;
    let a_hypervisor = ns.run(move || std::net::TcpListener::bind((there, 5900)).unwrap());
    a_hypervisor.set_nonblocking(true).unwrap();
    let a_hypervisor = TcpListener::from_std(a_hypervisor).unwrap();
    let b_hypervisor = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let here = ns.here;
    let p = start(move |c, _| {
        c.listen = format!("{here}:0");
        c.auth_mode = AuthMode::None;
        c.allowed_targets.push(AllowedTarget { cidr: "198.18.0.0/15".parse().unwrap(), ports: vec![(5900, 5900)] });
        c.limits.dead_peer_timeout_seconds = 10;
    })
    .await;

    // A link message one way and the server's reply the other, as SPICE starts a channel.
    async fn link(client: &mut TcpStream, hypervisor: &mut TcpStream) {
        client.write_all(b"REDQ link").await.unwrap();
        let mut got = [0u8; 9];
        hypervisor.read_exact(&mut got).await.unwrap();
        hypervisor.write_all(b"REDQ reply").await.unwrap();
        let mut got = [0u8; 10];
        client.read_exact(&mut got).await.unwrap();
    }
    // A: a client here, its hypervisor in the namespace.
    let (mut a, status, _) = request(p.addr, spice_gtk_head(&format!("{there}:5900"), "").as_bytes()).await;
    assert_eq!(status, 200);
    let (mut a_upstream, _) = a_hypervisor.accept().await.unwrap();
    link(&mut a, &mut a_upstream).await;
    // B: a client in the namespace, its hypervisor here.
    let proxy = p.addr;
    let b = ns.run(move || std::net::TcpStream::connect(proxy).unwrap());
    b.set_nonblocking(true).unwrap();
    let mut b = TcpStream::from_std(b).unwrap();
    b.write_all(spice_gtk_head(&b_hypervisor.local_addr().unwrap().to_string(), "").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut b).await.0, 200);
    let (mut b_upstream, _) = b_hypervisor.accept().await.unwrap();
    link(&mut b, &mut b_upstream).await;
    assert_eq!(metric(&http_get(p.admin, "/metrics").await, "spice_proxy_active_tunnels"), 2);
    // Delayed ACKs land, so nothing is in flight when the namespace goes dark.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Both peers in the namespace vanish at once, neither closing: A's hypervisor, B's client.
    // A stays silent, so keepalive probes find its hypervisor gone. B's hypervisor sends a
    // display update that B's client never acknowledges: the user timeout ends that one.
    ns.blackhole();
    let gone = Instant::now();
    b_upstream.write_all(b"display update").await.unwrap();
    let mut rest = Vec::new();
    let a_end = tokio::time::timeout(Duration::from_secs(40), a.read_to_end(&mut rest)).await;
    let a_ended = gone.elapsed();
    assert!(a_end.is_ok(), "A's client still connected 40 s after its hypervisor vanished; sockets:\n{}", ns.sockets());
    let b_end = tokio::time::timeout(Duration::from_secs(40), b_upstream.read_to_end(&mut rest)).await;
    let b_ended = gone.elapsed();
    assert!(b_end.is_ok(), "B's hypervisor still connected 40 s after its client vanished; sockets:\n{}", ns.sockets());
    // The default idle timeout (an hour) would have kept both, and so would a tunnel that
    // waited for its other, silent side after one side failed.
    for (which, ended) in [("A (hypervisor gone)", a_ended), ("B (client gone)", b_ended)] {
        assert!(ended >= Duration::from_secs(8) && ended <= Duration::from_secs(20), "{which} ended {ended:?} after the peer vanished, not after about 10 s");
    }
    // Both ended by an error on one side.
    assert_metric_reaches(p.admin, "spice_proxy_tunnel_ends_total{reason=\"error\"}", 2).await;
    assert_eq!(metric(&http_get(p.admin, "/metrics").await, "spice_proxy_active_tunnels"), 0);
}
