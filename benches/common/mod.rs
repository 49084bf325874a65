//! What both peer benchmarks (`proxy_compare`, `bridge_compare`) share: the target server the
//! peers connect to, the peers' CPU time and processes read from /proc, and small helpers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the target ends a stream of bytes ('S').
#[derive(Clone, Copy)]
#[allow(dead_code)] // each benchmark compiles this module and uses one of them
pub enum StreamEnd {
    /// Half-closes: the client reads until end of file (a CONNECT tunnel passes the FIN on).
    Shutdown,
    /// Waits for the client to hang up once it has everything: a close racing the last bytes
    /// would measure a WebSocket bridge's shutdown, not its throughput.
    HoldUntilClientCloses,
}

/// The target on `l`; what it does with a connection is chosen by the 9 bytes the client sends
/// first (a command and a little-endian count): 'S' streams that many bytes to the client (the
/// display direction), 'E' echoes 64-byte messages, anything else greets with one byte and
/// holds the connection until the client goes.
pub fn target_server(l: TcpListener, end: StreamEnd) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut cmd = [0u8; 9];
                if s.read_exact(&mut cmd).await.is_err() {
                    return;
                }
                let n = u64::from_le_bytes(cmd[1..9].try_into().unwrap());
                match cmd[0] {
                    b'S' => {
                        let buf = vec![0x5au8; 1 << 20];
                        let mut left = n;
                        while left > 0 {
                            let k = left.min(buf.len() as u64) as usize;
                            if s.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            left -= k as u64;
                        }
                        match end {
                            StreamEnd::Shutdown => drop(s.shutdown().await),
                            StreamEnd::HoldUntilClientCloses => drop(s.read(&mut [0u8; 1]).await),
                        }
                    }
                    b'E' => {
                        let mut b = [0u8; 64];
                        while s.read_exact(&mut b).await.is_ok() {
                            if s.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                    }
                    _ => {
                        let _ = s.write_all(b"G").await;
                        let _ = s.read(&mut [0u8; 1]).await;
                    }
                }
            });
        }
    });
    addr
}

/// utime, stime, cutime and cstime from a `/proc/.../stat` file, in seconds; `None` once the
/// process is gone.
fn stat_times(path: &str) -> Option<[f64; 4]> {
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let field = |i: usize| fields.get(i)?.parse::<f64>().ok().map(|ticks| ticks / 100.0);
    Some([field(11)?, field(12)?, field(13)?, field(14)?])
}

/// CPU seconds of a peer: the process and all its descendants, counting the children they
/// have already reaped (squid and tinyproxy work in child processes, websockify forks one per
/// connection).
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    family(pid).iter().filter_map(|p| stat_times(&format!("/proc/{p}/stat"))).map(|t| t.iter().sum::<f64>()).sum()
}

/// CPU seconds of this process alone: the load generator and the targets, the same for every
/// peer, so what a peer's protocol costs its clients shows as a difference here. (Not its
/// children's: the peers it started and stopped.)
pub fn own_cpu_seconds() -> f64 {
    let [user, system, ..] = stat_times("/proc/self/stat").expect("own /proc stat");
    user + system
}

/// A KiB figure summed over the process and all its descendants: `field` (e.g. `VmRSS:`) of
/// each one's `/proc/PID/<file>` (e.g. `status`).
pub fn family_kib(pid: u32, file: &str, field: &str) -> u64 {
    family(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/{file}")).ok())
        .filter_map(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .sum()
}

/// The process and all its descendants.
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                let ppid: u32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
                if ppid == parent && !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        i += 1;
    }
    out
}

/// The median; NaN for no figures (a phase that was skipped).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A port free on 127.0.0.1 now, for a peer to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits (up to 20 s) until a peer just started accepts connections on `port`.
pub fn wait_listening(port: u16, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{name} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}
