//! Socket options the proxy sets beyond what tokio offers. TCP_DEFER_ACCEPT is set by hand
//! because neither rustix nor socket2 wraps it.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use rustix::net::sockopt;

use crate::crd::{ClientSocketSpec, DEAD_PEER_MAX_SECONDS, DEAD_PEER_MIN_SECONDS};

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

/// The send buffer and congestion control of `clientSocket`, on a listener whose accepted
/// sockets inherit them. A congestion control the kernel refuses is named in the error: an
/// unprivileged process may only choose what net.ipv4.tcp_allowed_congestion_control lists.
pub fn apply_client_socket(listener: &impl AsFd, client_socket: &ClientSocketSpec) -> io::Result<()> {
    if let Some(bytes) = client_socket.send_buffer() {
        sockopt::set_socket_send_buffer_size(listener, bytes as usize)?;
    }
    if let Some(cc) = &client_socket.congestion_control {
        sockopt::set_tcp_congestion(listener, cc).map_err(|e| {
            let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control").unwrap_or_default();
            io::Error::new(
                io::Error::from(e).kind(),
                format!("clientSocket.congestionControl {cc:?}: the kernel refused it ({e}); this node allows {:?} (net.ipv4.tcp_allowed_congestion_control)", allowed.trim()),
            )
        })?;
    }
    Ok(())
}

/// TCP keepalive and a user timeout, on both sides of a tunnel: how a peer that went away
/// without a FIN is found within the SpiceProxy's `deadPeerTimeoutSeconds` (2 minutes by
/// default).
///
/// Client side, set on a listener: accepted sockets inherit them, so they cost nothing per
/// tunnel.
///
/// SPICE pings its quiet channels only every 300 s, and load balancers in front of the proxy
/// drop flows idle for less (Azure's after 4 minutes, AWS's NLB after 350 s): a probe at least
/// every minute keeps those flows, and the NAT mappings of home routers, alive. A client that
/// vanished without closing (laptop asleep, network gone) is found after the timeout instead
/// of holding its tunnels, and its places under the per-client limit, until the idle timeout.
/// The user timeout gives data sent to such a client (a display update) the same time to be
/// acknowledged, instead of the kernel's 15 or so minutes of retransmissions.
///
/// Upstream side, set on each socket before it connects: a hypervisor that crashed or lost
/// its network sends nothing more, and SPICE clients do not ping, so without probes its
/// tunnels would hang on a frozen screen until the idle timeout (an hour by default). With
/// them the client sees the session end after the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    pub interval: Duration,
    /// Unanswered probes that end the connection.
    pub probes: u32,
    /// How long sent data may stay unacknowledged (TCP_USER_TIMEOUT).
    pub user_timeout: Duration,
}

impl Keepalive {
    /// The probe schedule that finds a dead peer within `dead_peer` (whole seconds, 10 s to an
    /// hour): the first probe after half of it but at most 60 s of silence, then at least 4
    /// probes spread over the rest, none more than 60 s apart. 120 s gives a probe after 60 s
    /// and 4 more 15 s apart.
    pub fn within(dead_peer: Duration) -> Self {
        let total = dead_peer.as_secs().clamp(DEAD_PEER_MIN_SECONDS as u64, DEAD_PEER_MAX_SECONDS as u64);
        let idle = (total / 2).min(60);
        let rest = total - idle;
        // At most 3540 / 60 = 59 probes, below the kernel's cap of 127.
        let probes = rest.div_ceil(60).max(4);
        Self {
            idle: Duration::from_secs(idle),
            interval: Duration::from_secs((rest / probes).max(1)),
            probes: probes as u32,
            user_timeout: Duration::from_secs(total),
        }
    }

    pub fn apply(&self, socket: &impl AsFd) -> io::Result<()> {
        sockopt::set_socket_keepalive(socket, true)?;
        sockopt::set_tcp_keepidle(socket, self.idle)?;
        sockopt::set_tcp_keepintvl(socket, self.interval)?;
        sockopt::set_tcp_keepcnt(socket, self.probes)?;
        sockopt::set_tcp_user_timeout(socket, self.user_timeout.as_millis() as u32)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Keepalive;
    use std::time::Duration;

    #[test]
    fn probes_find_a_dead_peer_within_the_timeout_and_come_at_least_every_minute() {
        let k = Keepalive::within(Duration::from_secs(120));
        assert_eq!((k.idle, k.interval, k.probes), (Duration::from_secs(60), Duration::from_secs(15), 4), "the default");
        for secs in [10, 11, 59, 120, 121, 299, 300, 301, 599, 1000, 3599, 3600] {
            let k = Keepalive::within(Duration::from_secs(secs));
            let found_after = k.idle + k.interval * k.probes;
            assert!(found_after <= Duration::from_secs(secs), "{secs} s: probes run until {found_after:?}");
            // Flooring the interval to whole seconds loses at most a second per probe.
            assert!(found_after + Duration::from_secs(k.probes as u64) > Duration::from_secs(secs), "{secs} s: ends long before the timeout");
            assert!(k.idle <= Duration::from_secs(60) && k.interval <= Duration::from_secs(60), "{secs} s: {k:?} leaves a flow idle over a minute");
            assert!(k.interval >= Duration::from_secs(1) && (4..=127).contains(&k.probes), "{secs} s: {k:?}");
            assert_eq!(k.user_timeout, Duration::from_secs(secs));
        }
        assert_eq!(Keepalive::within(Duration::ZERO), Keepalive::within(Duration::from_secs(10)), "clamped below");
        assert_eq!(Keepalive::within(Duration::from_secs(86_400)).probes, 59, "clamped above");
    }
}
