//! The data path of one tunnel: small reads are copied through a per-thread buffer, bulk data
//! moves with splice(2) through a pipe per direction (zero copy: it never enters user space),
//! with a portable copy fallback. EOF on one side becomes a write shutdown on the other
//! (half-close), so each direction ends on its own.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use futures::Future;
use rustix::pipe::{SpliceFlags, pipe_with, PipeFlags};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;

use super::metrics::End;

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
/// The per-thread buffer copies go through.
const SCRATCH: usize = 64 * 1024;
/// In splice mode a direction copies while its reads stay below this, and splices from the
/// first read that reaches it. Interactive channels (inputs, cursor, the link exchange) move a
/// few bytes at a time; for them a pipe costs more syscalls (pipe2, F_SETPIPE_SZ, two closes)
/// than the one copy it would save. Bulk data (display, 1 GiB tests) splices after one read.
const SPLICE_FROM: usize = 16 * 1024;

/// Empty pipes a worker keeps for the next direction with bytes to splice.
pub(crate) const SPARE_PIPES: usize = 4;

thread_local! {
    /// Copies are read into and written from here at once, so a tunnel holds no buffer of its
    /// own unless its destination is full (then only the unsent rest is kept).
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
    /// A direction holds a pipe only while bytes are in it, as HAProxy's pipe pool does, and
    /// gives it back here when it has to wait for more. Otherwise every console whose display
    /// once sent a burst would keep two descriptors and a 1 MiB pipe for its whole session:
    /// the kernel counts pipe sizes per user (`fs.pipe-user-pages-soft`, 64 MiB), and past
    /// that an unprivileged process gets pipes of two pages, 8 KiB.
    static SPARES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe's read and write end; the spares hold nothing.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    /// A spare of this worker's, or a new one.
    fn take() -> io::Result<Pipe> {
        match SPARES.with_borrow_mut(Vec::pop) {
            Some(pipe) => Ok(pipe),
            None => new_pipe().map(|(r, w)| Pipe { r, w }),
        }
    }

    /// Keeps an empty pipe for the next taker (beyond `SPARE_PIPES`, closes it).
    fn give_back(self) {
        SPARES.with_borrow_mut(|spares| {
            if spares.len() < SPARE_PIPES {
                spares.push(self);
            }
        });
    }
}

/// Counters one tunnel shares between its two directions and the idle watchdog.
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// Of those bytes, how many moved by splice(2) (never entering user space).
    pub spliced: AtomicU64,
    /// Set by whichever direction reaches EOF first; from then on the tunnel is half-closed.
    one_ended: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Self { epoch: Instant::now(), last_ms: AtomicU64::new(0), up: AtomicU64::new(0), down: AtomicU64::new(0), spliced: AtomicU64::new(0), one_ended: AtomicBool::new(false) }
    }
}

/// How long a tunnel may stay quiet: `idle` while both directions are open, `half_closed`
/// (at most `idle`) once one of them has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub idle: Duration,
    pub half_closed: Duration,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn quiet_until(&self, limit: Duration) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit
    }
    /// Resolves once nothing moved for the timeout that applies: `Close::Idle`, or
    /// `Close::HalfClosedIdle` once a direction has ended. The timer is re-planned only when
    /// it fires (not on every touch) and when the tunnel becomes half-closed.
    ///
    /// It learns that a direction ended without a wake-up of its own (a notification would
    /// cost every short tunnel an extra poll and a waiter list): `run` polls it right after
    /// the two directions in the same task, so the poll in which one ends reaches it too.
    async fn idle(&self, t: Timeouts) -> Close {
        let half_limit = t.half_closed.min(t.idle);
        let mut half = false;
        let sleep = tokio::time::sleep_until(self.quiet_until(t.idle).into());
        tokio::pin!(sleep);
        poll_fn(|cx| {
            loop {
                if !half && self.one_ended.load(Ordering::Relaxed) {
                    half = true;
                    sleep.as_mut().reset(self.quiet_until(half_limit).into());
                }
                ready!(sleep.as_mut().poll(cx));
                let until = self.quiet_until(if half { half_limit } else { t.idle });
                if Instant::now() >= until {
                    return Poll::Ready(if half { Close::HalfClosedIdle } else { Close::Idle });
                }
                sleep.as_mut().reset(until.into());
            }
        })
        .await
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// Both sides finished (EOF each way).
    Finished,
    Idle,
    /// One direction had ended and the other stayed quiet for the half-closed timeout.
    HalfClosedIdle,
    /// The drain deadline of a stopping proxy passed.
    Drained,
    /// A new allow-list no longer lists the target.
    Revoked,
    Error(String),
    /// The client went away before sending a complete request (a port probe, say).
    NoRequest,
}

impl Close {
    pub fn as_str(&self) -> &str {
        match self {
            Close::Finished => "finished",
            Close::Idle => "idle timeout",
            Close::HalfClosedIdle => "half-closed timeout",
            Close::Drained => "drain deadline",
            Close::Revoked => "target taken off the allow-list",
            Close::Error(e) => e,
            Close::NoRequest => "client closed before sending a request",
        }
    }
    /// How `spice_proxy_tunnel_ends_total` counts it; `None` for a connection that never
    /// became a tunnel.
    pub fn end(&self) -> Option<End> {
        match self {
            Close::Finished => Some(End::Finished),
            Close::Idle => Some(End::Idle),
            Close::HalfClosedIdle => Some(End::HalfClosed),
            Close::Drained => Some(End::Drained),
            Close::Revoked => Some(End::Revoked),
            Close::Error(_) => Some(End::Error),
            Close::NoRequest => None,
        }
    }
}

/// What may end an open tunnel, or change its timeouts, from outside it: a draining proxy,
/// a changed configuration file.
pub trait Outside {
    /// The timeouts that apply now.
    fn timeouts(&self) -> Timeouts;
    /// Why the tunnel must end already, if it must.
    fn ends(&mut self) -> Option<Close>;
    /// Waits for the next change outside, then says why the tunnel must end, or `None` when
    /// it goes on (with the timeouts read anew).
    fn changed(&mut self) -> impl Future<Output = Option<Close>>;
}

/// Runs the tunnel until both directions end, either fails, it idles out (with the shorter
/// timeout once half-closed), or `outside` ends it (the drain deadline, or a revoked target).
/// A change of the timeouts applies to it at once, counted from its last activity. The
/// caller closes both sockets as soon as it returns: when both directions ended, that close
/// is what sends the FIN of the direction that ended second.
pub async fn run(client: &mut TcpStream, upstream: &mut TcpStream, mode: DataPath, activity: &Activity, outside: &mut impl Outside) -> Close {
    activity.touch();
    // Borrowed halves: reads through them learn from a short read that the socket is drained
    // (no extra read just to see EAGAIN), and they cost no allocation.
    let (client_in, client_out) = client.split();
    let (upstream_in, upstream_out) = upstream.split();
    // Both directions are built inside the join: a future first bound to a local keeps a
    // second slot in this state machine, and every idle tunnel would carry it (rust#62958).
    // EOF ends one direction and the other goes on (half-close), but an error ends both at
    // once: a peer found dead by keepalive must not leave the tunnel waiting for the other
    // side, which may say nothing for hours.
    tokio::select! {
        // In this order: the watchdog must be polled after the directions (see `idle`).
        biased;
        both = futures::future::try_join(
            one_way(client_in, upstream_out.as_ref(), mode, &activity.up, activity),
            one_way(upstream_in, client_out.as_ref(), mode, &activity.down, activity),
        ) => match both {
            Ok(((), ())) => Close::Finished,
            Err(e) => Close::Error(format!("io error: {e}")),
        },
        ended = watch(activity, outside) => ended,
    }
}

/// The idle watchdog and what comes from outside, in one future: a change outside that ends
/// nothing re-plans the watchdog with the timeouts then in use.
async fn watch(activity: &Activity, outside: &mut impl Outside) -> Close {
    if let Some(close) = outside.ends() {
        return close;
    }
    loop {
        tokio::select! {
            // As in `run`: the watchdog is polled on every poll of this future.
            biased;
            quiet = activity.idle(outside.timeouts()) => return quiet,
            changed = outside.changed() => if let Some(close) = changed {
                return close;
            },
        }
    }
}

async fn one_way(mut src: ReadHalf<'_>, dst: &TcpStream, mode: DataPath, counter: &AtomicU64, activity: &Activity) -> io::Result<()> {
    let result = match mode {
        DataPath::Splice => match copy_loop(&mut src, dst, counter, activity, SPLICE_FROM).await {
            Ok(Copied::Eof) => Ok(()),
            Ok(Copied::Bulk) => {
                let spliced = {
                    let _count = SplicedSince { before: counter.load(Ordering::Relaxed), counter, spliced: &activity.spliced };
                    splice_loop(src.as_ref(), dst, counter, activity).await
                };
                match spliced {
                    Err(SpliceError::Unsupported) => copy_loop(&mut src, dst, counter, activity, SCRATCH).await.map(|_| ()),
                    Err(SpliceError::Io(e)) => Err(e),
                    Ok(()) => Ok(()),
                }
            }
            Err(e) => Err(e),
        },
        DataPath::Copy => copy_loop(&mut src, dst, counter, activity, SCRATCH).await.map(|_| ()),
    };
    // Half-close: the peer sees EOF only once everything before it was delivered. When the
    // other direction has ended already, the tunnel closes both sockets right after this, and
    // that close sends the same FIN (both receive queues were read to EOF, so it is no reset).
    if result.is_ok() && !activity.one_ended.swap(true, Ordering::Relaxed) {
        // The half-closed timeout counts from the FIN, not from data before a long quiet spell.
        activity.touch();
        match rustix::net::shutdown(dst, rustix::net::Shutdown::Write) {
            Ok(()) | Err(rustix::io::Errno::NOTCONN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    result
}

/// Only one direction adds to its `counter`, so what the counter gained while that direction
/// spliced is what was spliced: one add per direction, none per splice call. Added on drop, so
/// it is also counted when the tunnel ends mid-splice (the other side failed, idle, drain).
struct SplicedSince<'a> {
    before: u64,
    counter: &'a AtomicU64,
    spliced: &'a AtomicU64,
}

impl Drop for SplicedSince<'_> {
    fn drop(&mut self) {
        self.spliced.fetch_add(self.counter.load(Ordering::Relaxed) - self.before, Ordering::Relaxed);
    }
}

enum SpliceError {
    /// The kernel cannot splice these descriptors, or the process has no descriptors left for
    /// a pipe; nothing was moved by splice, so copying takes over.
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
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut moved_any = false;
    loop {
        src.readable().await.map_err(SpliceError::Io)?;
        // Out of descriptors (or pipe memory) the tunnel still works, copying: the pipe is
        // empty whenever one is taken, so nothing is in flight.
        let pipe = Pipe::take().map_err(|_| SpliceError::Unsupported)?;
        let filled = src.try_io(Interest::READABLE, || Ok(rustix::pipe::splice(src, None, &pipe.w, None, PIPE_SIZE, flags)?));
        let mut in_pipe = match filled {
            Ok(0) => {
                pipe.give_back();
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) if !moved_any && matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
                return Err(SpliceError::Unsupported);
            }
            Err(e) => return Err(SpliceError::Io(e)),
        };
        moved_any = true;
        while in_pipe > 0 {
            dst.writable().await.map_err(SpliceError::Io)?;
            match dst.try_io(Interest::WRITABLE, || Ok(rustix::pipe::splice(&pipe.r, None, dst, None, in_pipe, flags)?)) {
                Ok(n) => {
                    in_pipe -= n;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                // The destination is full: wait for it. The source stays polled meanwhile and
                // may wake this thread for nothing, which was measured to cost no CPU worth
                // saving. Raising its SO_RCVLOWAT for the wait stopped those wake-ups, but made
                // the kernel acknowledge every segment and close the window, and the update that
                // reopened it sent the sender's queued segments inside this process's splice
                // call: 6-7 % more CPU per GiB, not less (docs/proxy-benchmark.md).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SpliceError::Io(e)),
            }
        }
        // Emptied: kept for whichever direction of this worker has bytes next (this one,
        // when more are waiting already). A pipe still holding bytes is closed with them.
        pipe.give_back();
        activity.touch();
    }
}

/// How a copy loop ended.
enum Copied {
    Eof,
    /// A read filled `limit` bytes: the caller splices from here on.
    Bulk,
}

/// Copies through the per-thread buffer, reading at most `limit` bytes at a time; with
/// `limit` < SCRATCH it returns `Bulk` after forwarding the first read that filled it.
async fn copy_loop(src: &mut ReadHalf<'_>, dst: &TcpStream, counter: &AtomicU64, activity: &Activity, limit: usize) -> io::Result<Copied> {
    loop {
        // Read and write in one go while the buffer is borrowed; only what the destination
        // would not take now is kept, in a buffer of its own, across the wait below.
        let (n, rest) = poll_fn(|cx| {
            SCRATCH_BUF.with_borrow_mut(|buf| {
                let mut filled = ReadBuf::new(&mut buf[..limit]);
                ready!(Pin::new(&mut *src).poll_read(cx, &mut filled))?;
                let n = filled.filled().len();
                let sent = match n {
                    0 => 0,
                    _ => match dst.try_write(&buf[..n]) {
                        Ok(m) => m,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) => return Poll::Ready(Err(e)),
                    },
                };
                Poll::Ready(Ok((n, buf[sent..n].to_vec())))
            })
        })
        .await?;
        if n == 0 {
            return Ok(Copied::Eof);
        }
        let mut sent = 0;
        while sent < rest.len() {
            dst.writable().await?;
            match dst.try_write(&rest[sent..]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        if limit < SCRATCH && n == limit {
            return Ok(Copied::Bulk);
        }
    }
}
