//! Socket options the proxy sets beyond what tokio offers. Two of them (TCP_DEFER_ACCEPT,
//! SO_RCVLOWAT) are set by hand because neither rustix nor socket2 wraps them.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use rustix::net::sockopt;

fn set_int(socket: &impl AsFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a descriptor borrowed for the call and a pointer to a c_int that outlives it,
    // passed with its exact size.
    let rc = unsafe {
        libc::setsockopt(socket.as_fd().as_raw_fd(), level, name, (&value as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// TCP_DEFER_ACCEPT on a listener: hand a connection over only once data arrived (or after
/// about `secs`).
pub fn set_defer_accept(listener: &impl AsFd, secs: u32) -> io::Result<()> {
    set_int(listener, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs.min(i32::MAX as u32) as libc::c_int)
}

/// SO_RCVLOWAT: the socket reports readable (and wakes its poller) only once this many bytes
/// are queued, or its receive window is nearly closed, or the peer closed.
pub fn set_recv_lowat(socket: &impl AsFd, bytes: usize) -> io::Result<()> {
    set_int(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes.clamp(1, i32::MAX as usize) as libc::c_int)
}

/// Silence on a connection before the first keepalive probe, the gap between probes, and the
/// unanswered probes that end it: a peer gone without a FIN is found within
/// `KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL` (2 minutes).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const KEEPALIVE_PROBES: u32 = 4;

/// TCP keepalive and a user timeout, on both sides of a tunnel.
///
/// Client side, set on a listener: accepted sockets inherit them, so they cost nothing per
/// tunnel.
///
/// SPICE pings its quiet channels only every 300 s, and load balancers in front of the proxy
/// drop flows idle for less (Azure's after 4 minutes, AWS's NLB after 350 s): a probe every
/// minute keeps those flows, and the NAT mappings of home routers, alive. A client that
/// vanished without closing (laptop asleep, network gone) is found after about 2 minutes
/// instead of holding its tunnels, and its places under the per-client limit, until the idle
/// timeout. The user timeout gives data sent to such a client (a display update) the same
/// 2 minutes to be acknowledged, instead of the kernel's 15 or so of retransmissions.
///
/// Upstream side, set on each socket before it connects: a hypervisor that crashed or lost
/// its network sends nothing more, and SPICE clients do not ping, so without probes its
/// tunnels would hang on a frozen screen until the idle timeout (an hour by default). With
/// them the client sees the session end within about 2 minutes.
pub fn set_keepalive(socket: &impl AsFd) -> io::Result<()> {
    let gone_after = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES;
    sockopt::set_socket_keepalive(socket, true)?;
    sockopt::set_tcp_keepidle(socket, KEEPALIVE_IDLE)?;
    sockopt::set_tcp_keepintvl(socket, KEEPALIVE_INTERVAL)?;
    sockopt::set_tcp_keepcnt(socket, KEEPALIVE_PROBES)?;
    sockopt::set_tcp_user_timeout(socket, gone_after.as_millis() as u32)?;
    Ok(())
}
