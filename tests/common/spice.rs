//! Real SPICE peers for the tests: qemu's SPICE server, an X server for remote-viewer,
//! screenshots, and a proxy process whose audit lines the test reads.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Kill(pub Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 20 s until process `pid` itself listens on `port`.
pub fn wait_port(pid: u32, port: u16, what: &str) {
    wait_listening(pid, port, what, || None);
}

/// Waits up to 20 s until `child` listens on `port`; if it exits first, fails with its exit
/// status and what it wrote to `stderr_file`.
fn wait_child(child: &mut Child, port: u16, what: &str, stderr_file: &Path) {
    wait_listening(child.id(), port, what, || {
        let status = child.try_wait().unwrap()?;
        Some(format!("{status}, {}", std::fs::read_to_string(stderr_file).unwrap_or_default()))
    });
}

/// Waits up to 20 s until process `pid` listens on `port`; `gone` says why it has ended (then
/// there is nothing to wait for). Whether the port merely accepts is not enough: another test's
/// process may hold it, and the process meant to listen there has then failed to bind (a CI run
/// of 2026-12-07 saw its proxy answer 502 for a SPICE server that accepted a moment before).
fn wait_listening(pid: u32, port: u16, what: &str, mut gone: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !super::listens(pid, port) {
        if let Some(why) = gone() {
            panic!("{what} exited before listening on {port}: {why}");
        }
        assert!(super::running(pid), "{what} (pid {pid}) exited before listening on {port}");
        assert!(Instant::now() < deadline, "{what} (pid {pid}) did not listen on {port} within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A diskless VM (it shows its BIOS screen) with SPICE on 127.0.0.1, no password.
pub fn qemu() -> (Kill, u16) {
    qemu_spice(None)
}

/// The same with a SPICE password, as oVirt sets one on every VM's console (no commas).
pub fn qemu_with_password(password: &str) -> (Kill, u16) {
    qemu_spice(Some(password))
}

fn qemu_spice(password: Option<&str>) -> (Kill, u16) {
    let port = super::free_port();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-machine", "accel=tcg", "-m", "64", "-nodefaults", "-vga", "qxl", "-display", "none"]);
    match password {
        Some(pw) => qemu.args(["-object", &format!("secret,id=spicepw,data={pw}")]).args(["-spice", &format!("port={port},addr=127.0.0.1,password-secret=spicepw")]),
        None => qemu.args(["-spice", &format!("port={port},addr=127.0.0.1,disable-ticketing=on")]),
    };
    let stderr_file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qemu-{port}.stderr"));
    let mut child = qemu
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (hack/deps.sh)");
    wait_child(&mut child, port, "qemu's SPICE server", &stderr_file);
    (Kill(child), port)
}

/// An Xvfb display for remote-viewer.
pub struct Display {
    pub name: String,
    _server: Kill,
}

impl Display {
    /// Xvfb on a display it picks itself, once it accepts clients: with `-displayfd` it writes
    /// the display's number when ready. (A fixed wait and a display named from the process id
    /// failed CI once: the screenshot found no X server 800 ms after Xvfb started.)
    pub fn start() -> Display {
        let mut child = Command::new("Xvfb")
            .args(["-displayfd", "1", "-screen", "0", "1024x768x24", "-nolisten", "tcp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb must be installed (hack/deps.sh: xvfb)");
        let stdout = child.stdout.take().unwrap();
        let server = Kill(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let number = rx.recv_timeout(Duration::from_secs(30)).expect("Xvfb did not say its display within 30 s");
        let number: u32 = number.trim().parse().unwrap_or_else(|_| panic!("Xvfb ended without a display: {number:?}"));
        Display { name: format!(":{number}"), _server: server }
    }

    pub fn screenshot(&self, file: &Path) {
        assert!(Command::new("import").env("DISPLAY", &self.name).args(["-window", "root"]).arg(file).status().unwrap().success());
    }

    pub fn remote_viewer(&self, vv: &Path) -> Kill {
        Kill(Command::new("remote-viewer").env("DISPLAY", &self.name).arg(vv).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("remote-viewer"))
    }
}

pub fn unique_colours(png: &Path) -> usize {
    let out = Command::new("convert").arg(png).args(["-format", "%k", "info:"]).output().expect("imagemagick");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// `spice-operator proxy --config FILE`, its audit lines (stdout, those naming a target) on a channel.
/// A proxy that exits before it listens fails the test with its own error (kept beside `config`).
pub fn proxy_process(config: &Path, port: u16) -> (Kill, std::sync::mpsc::Receiver<String>) {
    let stderr_file = config.with_extension("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_spice-operator"))
        .args(["proxy", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Connections without a request are the tests' own readiness probes.
        for line in BufReader::new(out).lines().map_while(Result::ok).filter(|l| l.starts_with('{') && !l.contains("\"no_request\"")) {
            let _ = tx.send(line);
        }
    });
    wait_child(&mut child, port, "the proxy", &stderr_file);
    (Kill(child), rx)
}

/// `spice_proxy_active_tunnels` from a proxy's /metrics.
pub fn active_tunnels(admin_port: u16) -> u64 {
    let text = super::http_get(admin_port, "/metrics").unwrap_or_default();
    text.lines().find(|l| l.starts_with("spice_proxy_active_tunnels ")).and_then(|l| l.split(' ').nth(1)?.parse().ok()).unwrap_or(0)
}

pub fn artifact(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}
