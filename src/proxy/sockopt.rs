//! The two socket options the proxy needs that neither rustix nor socket2 wraps.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

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
