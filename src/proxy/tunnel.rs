//! The data path of one tunnel: bytes move with splice(2) through a pipe per direction
//! (zero copy: they never enter user space), with a portable copy fallback. EOF on one side
//! becomes a write shutdown on the other (half-close), so each direction ends on its own.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::Future;
use rustix::pipe::{SpliceFlags, pipe_with, PipeFlags};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::TcpStream;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DataPath {
    /// splice(2) through a kernel pipe, falling back to copying if the kernel refuses.
    #[default]
    Splice,
    /// Read into and write from a user-space buffer.
    Copy,
}

/// Bytes moved per splice call and the pipe size asked for (the kernel may grant less).
const PIPE_SIZE: usize = 1 << 20;
const COPY_BUF: usize = 64 * 1024;

/// Counters one tunnel shares between its two directions and the idle watchdog.
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { epoch: Instant::now(), last_ms: AtomicU64::new(0), up: AtomicU64::new(0), down: AtomicU64::new(0) }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Resolves once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet_until = self.epoch + last + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until.into()).await;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// Both sides finished (EOF each way).
    Finished,
    Idle,
    /// The drain deadline of a stopping proxy passed.
    Drained,
    Error(String),
    /// The client went away before sending a complete request (a port probe, say).
    NoRequest,
}

impl Close {
    pub fn as_str(&self) -> &str {
        match self {
            Close::Finished => "finished",
            Close::Idle => "idle timeout",
            Close::Drained => "drain deadline",
            Close::Error(e) => e,
            Close::NoRequest => "client closed before sending a request",
        }
    }
}

/// Runs the tunnel until both directions end, it idles out, or `cancel` resolves.
pub async fn run(client: &TcpStream, upstream: &TcpStream, mode: DataPath, idle: Duration, activity: &Activity, cancel: impl Future<Output = ()>) -> Close {
    activity.touch();
    // Both directions are built inside the join: a future first bound to a local keeps a
    // second slot in this state machine, and every idle tunnel would carry it (rust#62958).
    tokio::select! {
        (a, b) = futures::future::join(
            one_way(client, upstream, mode, &activity.up, activity),
            one_way(upstream, client, mode, &activity.down, activity),
        ) => match (a, b) {
            (Ok(()), Ok(())) => Close::Finished,
            (Err(e), _) | (_, Err(e)) => Close::Error(format!("io error: {e}")),
        },
        _ = activity.idle(idle) => Close::Idle,
        _ = cancel => Close::Drained,
    }
}

async fn one_way(src: &TcpStream, dst: &TcpStream, mode: DataPath, counter: &AtomicU64, activity: &Activity) -> io::Result<()> {
    let result = match mode {
        DataPath::Splice => match splice_loop(src, dst, counter, activity).await {
            Err(SpliceError::Unsupported) => copy_loop(src, dst, counter, activity).await,
            Err(SpliceError::Io(e)) => Err(e),
            Ok(()) => Ok(()),
        },
        DataPath::Copy => copy_loop(src, dst, counter, activity).await,
    };
    if result.is_ok() {
        // Half-close: the peer sees EOF only once everything before it was delivered.
        match rustix::net::shutdown(dst, rustix::net::Shutdown::Write) {
            Ok(()) | Err(rustix::io::Errno::NOTCONN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    result
}

enum SpliceError {
    /// The kernel cannot splice these descriptors; nothing was moved yet.
    Unsupported,
    Io(io::Error),
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    // A bigger pipe means fewer syscalls per GiB; an unprivileged process may be capped lower.
    let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE);
    Ok((r, w))
}

async fn splice_loop(src: &TcpStream, dst: &TcpStream, counter: &AtomicU64, activity: &Activity) -> Result<(), SpliceError> {
    // The pipe is made on first data: an idle channel (SPICE opens several) costs no descriptors.
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut moved_any = false;
    loop {
        src.readable().await.map_err(SpliceError::Io)?;
        if pipe.is_none() {
            pipe = Some(new_pipe().map_err(SpliceError::Io)?);
        }
        let (r, w) = pipe.as_ref().expect("pipe was just made");
        let filled = src.try_io(Interest::READABLE, || Ok(rustix::pipe::splice(src, None, w, None, PIPE_SIZE, flags)?));
        let mut in_pipe = match filled {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if !moved_any && matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
                return Err(SpliceError::Unsupported);
            }
            Err(e) => return Err(SpliceError::Io(e)),
        };
        moved_any = true;
        while in_pipe > 0 {
            dst.writable().await.map_err(SpliceError::Io)?;
            match dst.try_io(Interest::WRITABLE, || Ok(rustix::pipe::splice(r, None, dst, None, in_pipe, flags)?)) {
                Ok(n) => {
                    in_pipe -= n;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SpliceError::Io(e)),
            }
        }
        activity.touch();
    }
}

async fn copy_loop(src: &TcpStream, dst: &TcpStream, counter: &AtomicU64, activity: &Activity) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        src.readable().await?;
        if buf.is_empty() {
            buf = vec![0; COPY_BUF];
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            dst.writable().await?;
            match dst.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}
