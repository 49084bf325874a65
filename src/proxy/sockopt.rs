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

/// Silence on a client connection before the first keepalive probe, the gap between probes,
/// and the unanswered probes that end it: a client gone without a FIN is found within
/// `CLIENT_IDLE + CLIENT_PROBES * CLIENT_PROBE_INTERVAL` (2 minutes).
pub const CLIENT_IDLE: Duration = Duration::from_secs(60);
pub const CLIENT_PROBE_INTERVAL: Duration = Duration::from_secs(15);
pub const CLIENT_PROBES: u32 = 4;

/// TCP keepalive and a user timeout for client connections, set on a listener: accepted
/// sockets inherit them, so they cost nothing per tunnel.
///
/// SPICE pings its quiet channels only every 300 s, and load balancers in front of the proxy
/// drop flows idle for less (Azure's after 4 minutes, AWS's NLB after 350 s): a probe every
/// minute keeps those flows, and the NAT mappings of home routers, alive. A client that
/// vanished without closing (laptop asleep, network gone) is found after about 2 minutes
/// instead of holding its tunnels, and its places under the per-client limit, until the idle
/// timeout. The user timeout gives data sent to such a client (a display update) the same
/// 2 minutes to be acknowledged, instead of the kernel's 15 or so of retransmissions.
pub fn set_client_keepalive(listener: &impl AsFd) -> io::Result<()> {
    let gone_after = CLIENT_IDLE + CLIENT_PROBE_INTERVAL * CLIENT_PROBES;
    sockopt::set_socket_keepalive(listener, true)?;
    sockopt::set_tcp_keepidle(listener, CLIENT_IDLE)?;
    sockopt::set_tcp_keepintvl(listener, CLIENT_PROBE_INTERVAL)?;
    sockopt::set_tcp_keepcnt(listener, CLIENT_PROBES)?;
    sockopt::set_tcp_user_timeout(listener, gone_after.as_millis() as u32)?;
    Ok(())
}
