//! The browser console in real headless Chromium (Debian's chromium + chromedriver, driven
//! over WebDriver): spice-html5's spice_auto.html served by our proxy, its WebSockets bridged
//! to a real qemu SPICE server with a ticket as token — the page's canvas shows the VM's
//! screen. An expired, forged or other-target token shows the page's error and no byte
//! reaches the server; a page on a foreign origin that opens the WebSocket is refused; the
//! served client encrypts its SPICE ticket to the full key length.
//! Needs chromium, chromium-driver and spice-html5 (hack/deps.sh installs them).
mod common;
use common::{EXPIRED, VALID};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::free_port;
use common::spice::{Kill, active_tunnels, artifact, proxy_process, qemu, qemu_with_password, wait_port};
use serde_json::{Value, json};
use spice_operator::engine::html5_console_url;
use spice_operator::proxy::ticket::{self, Claims};

const KEY: &[u8] = b"browser-test-key-0123456789abcde";

struct Proxy {
    _process: Kill,
    html5: u16,
    admin: u16,
    audit: std::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
    stderr: std::path::PathBuf,
}

impl Proxy {
    /// For a failure message: the audit lines not read yet and the proxy's log.
    fn diagnostics(&self) -> String {
        let audit: Vec<String> = std::iter::from_fn(|| self.audit.try_recv().ok()).collect();
        format!("audit lines: {audit:#?}\nproxy log:\n{}", std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }
}

fn proxy(spice_port: u16, tls: bool) -> Proxy {
    proxy_with(spice_port, tls, None, &[])
}

/// `upstream`: (CA PEM, host-subject) for TLS to the hypervisor's tls-port; `origins`:
/// `html5.allowedOrigins`.
fn proxy_with(spice_port: u16, tls: bool, upstream: Option<(String, Option<String>)>, origins: &[String]) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream.map(|(ca, subject)| {
        std::fs::write(dir.path().join("hv-ca.crt"), ca).unwrap();
        json!({"caFile": dir.path().join("hv-ca.crt"), "hostSubject": subject})
    });
    let tls = tls.then(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        json!({"certFile": dir.path().join("tls.crt"), "keyFile": dir.path().join("tls.key")})
    });
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/current"), KEY).unwrap();
    let (port, admin, html5) = (free_port(), free_port(), free_port());
    let cfg = json!({
        "listen": format!("127.0.0.1:{port}"), "adminListen": format!("127.0.0.1:{admin}"),
        "allowedTargets": [{"cidr": "127.0.0.1/32", "ports": [[spice_port, spice_port]]}],
        "authMode": "Ticket", "keysDir": dir.path().join("keys"),
        "limits": {"maxTunnels": 100, "maxTunnelsPerClient": 50, "idleTimeoutSeconds": 3600,
                   "connectTimeoutSeconds": 5, "handshakeTimeoutSeconds": 10, "drainSeconds": 1, "shutdownDelaySeconds": 0},
        "html5": {"listen": format!("127.0.0.1:{html5}"), "staticDir": "/usr/share/spice-html5", "tls": tls, "upstreamTls": upstream, "allowedOrigins": origins}
    });
    let file = dir.path().join("config.json");
    std::fs::write(&file, cfg.to_string()).unwrap();
    let (process, audit) = proxy_process(&file, port);
    wait_port(process.0.id(), html5, "the browser port");
    Proxy { _process: process, html5, admin, audit, stderr: file.with_extension("stderr"), _dir: dir }
}

fn token(host: &str, port: u16, ttl: i64, key: &[u8]) -> String {
    let expires = (ticket::now() as i64 + ttl) as u64;
    ticket::mint(key, &Claims { host: host.into(), ports: vec![port], expires, subject: "vm-browser".into() })
}

/// A minimal WebDriver client for chromedriver on loopback.
struct Browser {
    port: u16,
    session: String,
    _driver: Kill,
}

impl Browser {
    /// chromedriver on a free port with a new session. A port picked free may be taken before
    /// chromedriver binds it (the tests beside this one start proxies on free ports too), and a
    /// session request may then reach another server and be reset: up to three drivers are tried.
    fn start() -> Browser {
        Browser::start_with_prefs(json!({}))
    }

    /// With Chromium preferences, e.g. cookies blocked.
    fn start_with_prefs(prefs: Value) -> Browser {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Browser::try_start(&prefs) {
                Ok(b) => return b,
                Err(e) => {
                    eprintln!("chromedriver attempt failed, retrying: {e}");
                    failures.push(e.to_string());
                }
            }
        }
        panic!("no WebDriver session in three attempts: {failures:?}");
    }

    fn try_start(prefs: &Value) -> std::io::Result<Browser> {
        let port = free_port();
        let driver = Kill(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver must be installed (hack/deps.sh: chromium-driver)"),
        );
        wait_port(driver.0.id(), port, "chromedriver");
        let mut b = Browser { port, session: String::new(), _driver: driver };
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "prefs": prefs,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900",
                     // the wss case uses a throwaway self-signed certificate
                     "--ignore-certificate-errors"]
        },
        // The page's console (a failed WebSocket's net:: error is there), for failure messages.
        "goog:loggingPrefs": {"browser": "ALL"}}}});
        let r = b.try_call("POST", "/session", Some(caps))?;
        b.session = r["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {r}")).to_string();
        Ok(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> std::io::Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
        // Read the head, then exactly Content-Length bytes (chromedriver may keep the socket open).
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? != 1 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "chromedriver closed mid-response"));
            }
            raw.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)?;
        Ok(serde_json::from_slice(&body).unwrap_or_else(|_| panic!("WebDriver answered {head}{}", String::from_utf8_lossy(&body))))
    }

    fn open(&self, url: &str) {
        self.call("POST", &format!("/session/{}/url", self.session), Some(json!({"url": url})));
    }

    /// Makes the page's `index`th frame (None: the top page) the one scripts run in.
    fn frame(&self, index: Option<u32>) {
        self.call("POST", &format!("/session/{}/frame", self.session), Some(json!({"id": index})));
    }

    fn js(&self, script: &str) -> Value {
        self.call("POST", &format!("/session/{}/execute/sync", self.session), Some(json!({"script": script, "args": []})))["value"].clone()
    }

    /// The browser console's messages since the last call, for failure messages.
    fn console(&self) -> String {
        let log = self.try_call("POST", &format!("/session/{}/se/log", self.session), Some(json!({"type": "browser"})));
        match log {
            Ok(v) => v["value"].as_array().into_iter().flatten().map(|m| format!("{} {}\n", m["level"], m["message"])).collect(),
            Err(e) => format!("(no console log: {e})"),
        }
    }

    /// The text of the page's open prompt or alert, if one is open.
    fn prompt_text(&self) -> Option<String> {
        self.call("GET", &format!("/session/{}/alert/text", self.session), None)["value"].as_str().map(String::from)
    }

    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let v = self.call("GET", &format!("/session/{}/screenshot", self.session), None);
        let png = base64::engine::general_purpose::STANDARD.decode(v["value"].as_str().unwrap()).unwrap();
        let path = artifact(name);
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Polls a script until it returns something truthy for `check`.
    fn wait(&self, script: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script);
            if check(&v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(|| self.call("DELETE", &format!("/session/{}", self.session), None));
        }
    }
}

/// Lit pixels on the spice-html5 canvas (-1: no canvas yet). A blank screen has none.
const LIT_PIXELS: &str = r#"
    const c = document.querySelector('#spice-screen canvas');
    if (!c || !c.width) return -1;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let lit = 0;
    for (let i = 0; i < d.length; i += 4) { if (d[i] > 60 || d[i + 1] > 60 || d[i + 2] > 60) lit++; }
    return lit;
"#;
const MESSAGES: &str = "const m = document.getElementById('message-div'); return m ? m.innerText : '';";

/// A site of its own on a free loopback port, serving `page` to every request (a few).
fn serve_page(page: String) -> u16 {
    let site = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = site.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in site.incoming().flatten().take(4) {
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}", page.len());
        }
    });
    port
}

#[test]
fn browser_console_shows_the_vm_and_bad_tokens_show_the_error() {
    let (_qemu, spice) = qemu();
    let p = proxy(spice, false);
    let browser = Browser::start();

    // A valid ticket: the canvas fills with the VM's BIOS screen.
    let good = token("127.0.0.1", spice, VALID, KEY);
    browser.open(&format!("http://127.0.0.1:{}/spice_auto.html?token={good}", p.html5));
    let lit = browser.wait(LIT_PIXELS, Duration::from_secs(60), |v| v.as_i64().unwrap_or(-1) > 500);
    let shot = browser.screenshot("browser-console.png");
    assert!(lit.as_i64().unwrap_or(-1) > 500, "the canvas stayed blank ({lit} lit pixels; {}); page says: {}\nconsole: {}\n{}", shot.display(), browser.js(MESSAGES), browser.console(), p.diagnostics());
    let channels = active_tunnels(p.admin);
    assert!(channels >= 2, "spice-html5 opens one WebSocket per channel, saw {channels}");
    eprintln!("browser console screenshot: {} ({lit} lit pixels, {channels} channels)", shot.display());
    // Leave the page: every bridge closes and is audited with the bytes it moved.
    browser.open("about:blank");
    let deadline = Instant::now() + Duration::from_secs(20);
    while active_tunnels(p.admin) != 0 {
        assert!(Instant::now() < deadline, "bridges stayed open after the page was left");
        std::thread::sleep(Duration::from_millis(200));
    }
    let lines: Vec<Value> = std::iter::from_fn(|| p.audit.recv_timeout(Duration::from_secs(2)).ok()).map(|l| serde_json::from_str(&l).unwrap()).collect();
    let ok: Vec<&Value> = lines.iter().filter(|v| v["event"] == "websocket" && v["outcome"] == "ok").collect();
    assert!(ok.len() >= 2 && ok.iter().any(|v| v["bytesDown"].as_u64().unwrap_or(0) > 10_000), "{lines:#?}");
    assert!(lines.iter().all(|v| !v.to_string().contains(&good)), "a token reached the audit log");

    // Expired, forged and other-target tokens: the page reports the error, the server gets nothing.
    for (label, bad, status) in [
        ("expired", token("127.0.0.1", spice, EXPIRED, KEY), "401"),
        ("forged", token("127.0.0.1", spice, VALID, b"not-the-proxy-key-0123456789abcd"), "401"),
        ("other target", token("127.0.0.1", spice + 1, VALID, KEY), "403"),
    ] {
        browser.open(&format!("http://127.0.0.1:{}/spice_auto.html?token={bad}", p.html5));
        let msg = browser.wait(MESSAGES, Duration::from_secs(20), |v| v.as_str().is_some_and(|m| m.contains("WebSocket error")));
        assert!(msg.as_str().unwrap_or("").contains("WebSocket error"), "{label}: the page shows no error: {msg}");
        assert!(browser.js(LIT_PIXELS).as_i64().unwrap_or(-1) <= 0, "{label}: something was drawn");
        let line: Value = serde_json::from_str(&p.audit.recv_timeout(Duration::from_secs(10)).expect("the refusal is audited")).unwrap();
        assert_eq!(line["outcome"], status, "{label}: {line}");
        assert!(line.get("upstream").is_none() && line.get("bytesUp").is_none(), "{label}: bytes reached the server: {line}");
        assert_eq!(active_tunnels(p.admin), 0, "{label}");
        // The cookie spice_auto.html also sets: cleared, so each case rests on its URL's token only.
        browser.js("document.cookie = 'token=; expires=Thu, 01 Jan 1970 00:00:00 GMT; path=/'; return 0;");
    }

    // A page on another origin that opens the bridge with a valid token: refused (403).
    let evil_port = serve_page(format!(
        "<html><body><script>const ws = new WebSocket('ws://127.0.0.1:{}/websockify?token={good}', 'binary');\
         ws.onopen = () => document.title = 'OPEN'; ws.onerror = () => document.title = 'REFUSED';</script></body></html>",
        p.html5
    ));
    browser.open(&format!("http://127.0.0.1:{evil_port}/"));
    let title = browser.wait("return document.title;", Duration::from_secs(20), |v| v.as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(title, "REFUSED");
    let line: Value = serde_json::from_str(&p.audit.recv_timeout(Duration::from_secs(10)).expect("the refusal is audited")).unwrap();
    assert_eq!(line["outcome"], "403", "{line}");
    assert!(line["close"].as_str().unwrap().contains("cross-origin"), "{line}");
    assert_eq!(active_tunnels(p.admin), 0);
}

#[test]
fn browser_console_over_https_and_wss() {
    let (_qemu, spice) = qemu();
    let p = proxy(spice, true);
    let browser = Browser::start();
    let good = token("127.0.0.1", spice, VALID, KEY);
    // spice_auto.html on https:// opens wss:// to the same origin.
    browser.open(&format!("https://127.0.0.1:{}/spice_auto.html?token={good}", p.html5));
    let lit = browser.wait(LIT_PIXELS, Duration::from_secs(60), |v| v.as_i64().unwrap_or(-1) > 500);
    let shot = browser.screenshot("browser-console-wss.png");
    assert!(lit.as_i64().unwrap_or(-1) > 500, "the canvas stayed blank over wss ({lit}; {}); page says: {}\nconsole: {}\n{}", shot.display(), browser.js(MESSAGES), browser.console(), p.diagnostics());
    assert!(active_tunnels(p.admin) >= 2);
}

/// spice_auto.html hands the token to the bridge in a cookie, which a browser may store too late
/// for the first WebSocket (a run of this suite failed that way: 401, no token) or not at all (cookies blocked, or third-party in
/// a portal's iframe). The page the proxy serves puts it in the WebSocket URL too: with every
/// cookie blocked the console still opens, every channel with it.
#[test]
fn browser_console_opens_with_cookies_blocked() {
    let (_qemu, spice) = qemu();
    let p = proxy(spice, false);
    let browser = Browser::start_with_prefs(json!({"profile.default_content_setting_values.cookies": 2}));
    let good = token("127.0.0.1", spice, VALID, KEY);
    browser.open(&format!("http://127.0.0.1:{}/spice_auto.html?token={good}", p.html5));
    assert_eq!(browser.js("return document.cookie;"), "", "cookies are not blocked: the case is untested");
    let lit = browser.wait(LIT_PIXELS, Duration::from_secs(60), |v| v.as_i64().unwrap_or(-1) > 500);
    let shot = browser.screenshot("browser-console-no-cookies.png");
    assert!(lit.as_i64().unwrap_or(-1) > 500, "no screen without cookies ({lit}; {}); page says: {}\nconsole: {}\n{}", shot.display(), browser.js(MESSAGES), browser.console(), p.diagnostics());
    let channels = active_tunnels(p.admin);
    assert!(channels >= 2, "every channel, not only the main one, must find the token: {channels} open\n{}", p.diagnostics());
}

/// A portal listed in `allowedOrigins` shows the console in a frame, as OpenStack's Horizon
/// embeds nova's; the pages' Content-Security-Policy lets no other site frame it (clickjacking).
#[test]
fn a_listed_portal_frames_the_console_and_no_other_site_can() {
    let (_qemu, spice) = qemu();
    // A page that frames the URL after its `#`: the portal, and another site serving the same.
    let framing = || serve_page("<html><body><iframe id=\"c\" width=\"900\" height=\"700\"></iframe>\
        <script>c.src = decodeURIComponent(location.hash.slice(1));</script></body></html>".into());
    let (portal, other) = (framing(), framing());
    let p = proxy_with(spice, false, None, &[format!("http://127.0.0.1:{portal}")]);
    let console = format!("http://127.0.0.1:{}/spice_auto.html?token={}", p.html5, token("127.0.0.1", spice, VALID, KEY));
    let framed_by = |site: u16| format!("http://127.0.0.1:{site}/#{}", console.replace('%', "%25").replace('&', "%26"));

    let browser = Browser::start();
    browser.open(&framed_by(portal));
    browser.frame(Some(0));
    let lit = browser.wait(LIT_PIXELS, Duration::from_secs(60), |v| v.as_i64().unwrap_or(-1) > 500);
    browser.frame(None);
    let shot = browser.screenshot("browser-console-in-portal-frame.png");
    assert!(lit.as_i64().unwrap_or(-1) > 500, "no screen in the portal's frame ({lit}; {})\nconsole: {}\n{}", shot.display(), browser.console(), p.diagnostics());
    // (Chromium may keep a left page's frame and its WebSockets for going back: a browser of
    // its own for the other site, so its count starts at zero.)
    drop(browser);
    let deadline = Instant::now() + Duration::from_secs(20);
    while active_tunnels(p.admin) != 0 {
        assert!(Instant::now() < deadline, "bridges stayed open after the browser quit");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Any other site: the browser refuses to show the console in its frame; no console opens.
    let browser = Browser::start();
    browser.open(&framed_by(other));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    while !log.contains("frame-ancestors") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        log += &browser.console();
    }
    let refused = format!("Framing 'http://127.0.0.1:{}/' violates the following Content Security Policy directive: \\\"frame-ancestors http://127.0.0.1:{portal}\\\"", p.html5);
    assert!(log.contains(&refused), "no refusal to frame the console in the browser's log:\n{log}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(active_tunnels(p.admin), 0, "a console opened in another site's frame\n{}", p.diagnostics());
}

/// A VM whose SPICE server listens on a tls-port only, with a certificate from our own CA.
fn qemu_tls(dir: &std::path::Path) -> (Kill, u16, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test hypervisor CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "example");
    params.distinguished_name.push(rcgen::DnType::CommonName, "host1");
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    let port = free_port();
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "accel=tcg", "-m", "64", "-nodefaults", "-vga", "qxl", "-display", "none"])
        .args(["-spice", &format!("tls-port={port},addr=127.0.0.1,x509-dir={},disable-ticketing=on", dir.display())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let k = Kill(child);
    wait_port(k.0.id(), port, "qemu's SPICE tls-port");
    (k, port, ca.pem())
}

#[test]
fn browser_console_reaches_a_tls_only_spice_server_through_the_bridge() {
    let certs = tempfile::tempdir().unwrap();
    let (_qemu, tls_port, ca) = qemu_tls(certs.path());
    // The bridge checks the hypervisor against the CA and the host-subject.
    let p = proxy_with(tls_port, false, Some((ca.clone(), Some("O=example, CN=host1".into()))), &[]);
    let browser = Browser::start();
    let good = token("127.0.0.1", tls_port, VALID, KEY);
    browser.open(&format!("http://127.0.0.1:{}/spice_auto.html?token={good}", p.html5));
    let lit = browser.wait(LIT_PIXELS, Duration::from_secs(60), |v| v.as_i64().unwrap_or(-1) > 500);
    let shot = browser.screenshot("browser-console-upstream-tls.png");
    assert!(lit.as_i64().unwrap_or(-1) > 500, "no screen through TLS to the hypervisor ({lit}; {}); page says: {}\nconsole: {}\n{}", shot.display(), browser.js(MESSAGES), browser.console(), p.diagnostics());
    drop(browser);

    // The wrong subject: the bridge refuses the hypervisor (502) and the page shows the error.
    let q = proxy_with(tls_port, false, Some((ca, Some("O=example, CN=host2".into()))), &[]);
    let browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{}/spice_auto.html?token={good}", q.html5));
    let msg = browser.wait(MESSAGES, Duration::from_secs(20), |v| v.as_str().is_some_and(|m| m.contains("WebSocket error")));
    assert!(msg.as_str().unwrap_or("").contains("WebSocket error"), "{msg}");
    let line: Value = serde_json::from_str(&q.audit.recv_timeout(Duration::from_secs(10)).expect("audited")).unwrap();
    assert_eq!(line["outcome"], "502", "{line}");
    assert!(line["close"].as_str().unwrap().contains("TLS to the hypervisor failed"), "{line}");
}

/// spice-html5's own RSA code drops a leading zero byte of the encrypted ticket, and the SPICE
/// server then refuses about one channel link in 200 with "Permission denied" (it failed CI
/// once). The proxy serves `ticket.js` mended: every ticket the page's own `rsa_encrypt`
/// produces is as long as the key, including the ones that start with a zero byte.
#[test]
fn the_served_client_encrypts_every_ticket_to_the_full_key_length() {
    let p = proxy(free_port(), false);
    let browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{}/ticket.js", p.html5));
    // A 1024-bit modulus (SPICE's key size) whose top byte is 0xc1: a ciphertext starts with a
    // zero byte once in about 193, so 3,000 tickets hold some (none at all: about 1 in 5 million).
    let modulus = format!("c1{}b7", "5a".repeat(126));
    let script = format!(
        "return (async () => {{
            const {{ rsa_encrypt }} = await import('/ticket.js');
            const {{ RSAKey }} = await import('/thirdparty/rsa.js');
            const key = new RSAKey();
            key.setPublic('{modulus}', '10001');
            let short = 0, leadingZero = 0;
            for (let i = 0; i < 3000; i++) {{
                const t = rsa_encrypt(key, '\\0');
                if (t.length !== 128) short++;
                else if (t[0] === 0) leadingZero++;
            }}
            return {{ short, leadingZero }};
        }})();"
    );
    let counts = browser.js(&script);
    assert_eq!(counts["short"], 0, "tickets shorter than the key: {counts}");
    assert!(counts["leadingZero"].as_i64().is_some_and(|n| n > 0), "no ticket started with a zero byte, the case is untested: {counts}");
}

/// A VM whose console has a password (oVirt sets one on every VM): the URL the engine API hands
/// out carries it beside the token, spice-html5 sends it in the SPICE link, and the screen shows.
/// Without it, the same VM refuses the link and spice_auto.html asks the user for a password.
#[test]
fn browser_console_of_a_vm_with_a_spice_password() {
    let password = "one-time pw&+%";
    let (_qemu, spice) = qemu_with_password(password);
    let p = proxy(spice, false);
    let base = format!("http://127.0.0.1:{}/spice_auto.html", p.html5);
    let good = token("127.0.0.1", spice, VALID, KEY);

    let browser = Browser::start();
    browser.open(&html5_console_url(&base, &good, None));
    let deadline = Instant::now() + Duration::from_secs(30);
    let asked = loop {
        match browser.prompt_text() {
            Some(text) => break Some(text),
            None if Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    assert_eq!(asked.as_deref(), Some("Password"), "without the password the page should ask for it");
    drop(browser);

    let browser = Browser::start();
    browser.open(&html5_console_url(&base, &good, Some(password)));
    let lit = browser.wait(LIT_PIXELS, Duration::from_secs(60), |v| v.as_i64().unwrap_or(-1) > 500);
    let shot = browser.screenshot("browser-console-password.png");
    assert!(lit.as_i64().unwrap_or(-1) > 500, "no screen with the password ({lit}; {}); page says: {}\nconsole: {}\n{}", shot.display(), browser.js(MESSAGES), browser.console(), p.diagnostics());
    assert_eq!(browser.prompt_text(), None);
}
