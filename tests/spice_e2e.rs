//! Real SPICE peers through the real proxy binary: qemu's SPICE server answers a link
//! message with its `REDQ` link reply in every auth mode, and remote-viewer under Xvfb shows
//! the VM's screen through the proxy with a ticket in a `.vv` file's `proxy=` key.
//! Needs qemu-system-x86, virt-viewer, xvfb and imagemagick (hack/deps.sh installs them).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;

mod common;

use common::free_port;
use common::spice::{Display, Kill, qemu, unique_colours};

/// Runs `spice-operator proxy` as users do; returns it, its port, admin port and its stdout (audit).
fn proxy(dir: &Path, mode: &str, spice_port: u16) -> (Kill, u16, u16, std::sync::mpsc::Receiver<String>) {
    let (port, admin) = (free_port(), free_port());
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/current"), b"e2e-key-e2e-key-e2e-key-e2e-key!").unwrap();
    std::fs::create_dir_all(dir.join("basic")).unwrap();
    std::fs::write(dir.join("basic/username"), "spice").unwrap();
    std::fs::write(dir.join("basic/password"), "pw").unwrap();
    let cfg = serde_json::json!({
        "listen": format!("127.0.0.1:{port}"), "adminListen": format!("127.0.0.1:{admin}"),
        "allowedTargets": [{"cidr": "127.0.0.1/32", "ports": [[spice_port, spice_port]]}],
        "authMode": mode, "keysDir": dir.join("keys"),
        "basicDir": if mode == "Basic" { Some(dir.join("basic")) } else { None },
        "limits": {"maxTunnels": 100, "maxTunnelsPerClient": 50, "idleTimeoutSeconds": 3600,
                   "connectTimeoutSeconds": 5, "handshakeTimeoutSeconds": 10, "drainSeconds": 1, "shutdownDelaySeconds": 0}
    });
    let file = dir.join(format!("{mode}.json"));
    std::fs::write(&file, cfg.to_string()).unwrap();
    let (child, rx) = common::spice::proxy_process(&file, port);
    (child, port, admin, rx)
}

fn ticket(dir: &Path, target: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_spice-operator"))
        .args(["ticket", "--target", target, "--ttl", "120", "--subject", "vm-e2e", "--key-file"])
        .arg(dir.join("keys/current"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// SpiceLinkHeader + SpiceLinkMess for the main channel (spice-protocol, little-endian).
fn link_message() -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(b"REDQ");
    m.extend_from_slice(&2u32.to_le_bytes()); // major
    m.extend_from_slice(&2u32.to_le_bytes()); // minor
    m.extend_from_slice(&18u32.to_le_bytes()); // size of what follows
    m.extend_from_slice(&0u32.to_le_bytes()); // connection id
    m.push(1); // channel type: main
    m.push(0); // channel id
    m.extend_from_slice(&0u32.to_le_bytes()); // common caps
    m.extend_from_slice(&0u32.to_le_bytes()); // channel caps
    m.extend_from_slice(&18u32.to_le_bytes()); // caps offset
    m
}

#[test]
fn spice_link_handshake_through_the_proxy_in_every_auth_mode() {
    let (mut qemu, spice) = qemu();
    for mode in ["Ticket", "Basic", "None"] {
        let dir = tempfile::tempdir().unwrap();
        let (proxy_proc, port, _admin, audit) = proxy(dir.path(), mode, spice);
        let secret = match mode {
            "Ticket" => Some(("alice".to_string(), ticket(dir.path(), &format!("127.0.0.1:{spice}")))),
            "Basic" => Some(("spice".to_string(), "pw".to_string())),
            _ => None,
        };
        let auth = secret
            .as_ref()
            .map(|(u, p)| format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))
            .unwrap_or_default();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "CONNECT 127.0.0.1:{spice} HTTP/1.0\r\nHost: 127.0.0.1:{spice}\r\nProxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n{auth}\r\n").unwrap();
        let mut reply = [0u8; 39];
        s.read_exact(&mut reply).unwrap();
        if &reply != b"HTTP/1.0 200 Connection established\r\n\r\n" {
            // A refusal closes the connection after its one-line body: show all of it.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            let qemu_state = match qemu.0.try_wait() {
                Ok(Some(status)) => format!("qemu has exited ({status})"),
                _ => format!("qemu still runs; listening on {spice}: {}", common::listens(qemu.0.id(), spice)),
            };
            panic!("{mode}: the proxy did not open the tunnel: {}{}\n{qemu_state}", String::from_utf8_lossy(&reply), String::from_utf8_lossy(&rest));
        }
        s.write_all(&link_message()).unwrap();
        let mut magic = [0u8; 16];
        s.read_exact(&mut magic).unwrap();
        assert_eq!(&magic[..4], b"REDQ", "{mode}: the SPICE server's link reply");
        assert_eq!(u32::from_le_bytes(magic[4..8].try_into().unwrap()), 2, "{mode}: protocol major version");
        // qemu keeps a half-linked channel open, so stop the proxy as Kubernetes does (SIGTERM):
        // it drains for drainSeconds (1 s here), closes the tunnel and writes its audit line.
        unsafe { libc::kill(proxy_proc.0.id() as i32, libc::SIGTERM) };
        let line = audit.recv_timeout(Duration::from_secs(10)).expect("an audit line per tunnel");
        drop(s);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!((v["outcome"].as_str(), v["target"].as_str()), (Some("ok"), Some(format!("127.0.0.1:{spice}").as_str())), "{line}");
        assert!(v["bytesDown"].as_u64().unwrap() >= 16 && v["durationMs"].is_u64(), "{line}");
        if let Some((user, pass)) = &secret {
            assert_eq!(v["user"].as_str(), Some(user.as_str()));
            assert!(!line.contains(pass.as_str()), "the audit line must never hold the secret: {line}");
        }
        if mode == "Ticket" {
            assert_eq!(v["subject"].as_str(), Some("vm-e2e"));
        }
    }
}

#[test]
fn remote_viewer_shows_the_vm_screen_through_the_proxy() {
    let (_qemu, spice) = qemu();
    let dir = tempfile::tempdir().unwrap();
    let (_proxy, port, admin, audit) = proxy(dir.path(), "Ticket", spice);
    let display = Display::start();
    let blank = dir.path().join("blank.png");
    display.screenshot(&blank);

    let t = ticket(dir.path(), &format!("127.0.0.1:{spice}"));
    let vv = dir.path().join("console.vv");
    std::fs::write(&vv, format!("[virt-viewer]\ntype=spice\nhost=127.0.0.1\nport={spice}\nproxy=http://alice:{t}@127.0.0.1:{port}\ndelete-this-file=0\ntitle=vm-e2e\n")).unwrap();
    let _viewer = display.remote_viewer(&vv);

    // The display channel carries the screen: wait until it has moved real data through us.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{admin}/metrics")]).output().unwrap();
        let text = String::from_utf8_lossy(&m.stdout).to_string();
        let active: u64 = text.lines().find(|l| l.starts_with("spice_proxy_active_tunnels ")).and_then(|l| l.split(' ').nth(1)?.parse().ok()).unwrap_or(0);
        if active >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "remote-viewer opened no channels through the proxy: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(8));
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("remote-viewer-through-proxy.png");
    display.screenshot(&shot);
    let (before, after) = (unique_colours(&blank), unique_colours(&shot));
    assert!(before <= 2 && after > 16, "the screen did not change: {before} colours before, {after} after ({})", shot.display());
    drop(_viewer);
    // Every channel closes with an audit line; the display channel moved the screen's pixels.
    let mut down = Vec::new();
    while let Ok(line) = audit.recv_timeout(Duration::from_secs(5)) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["outcome"].as_str(), Some("ok"), "{line}");
        down.push(v["bytesDown"].as_u64().unwrap());
    }
    assert!(down.len() >= 2 && down.iter().any(|b| *b > 50_000), "channel byte counts: {down:?}");
    eprintln!("screenshot: {}", shot.display());
}
