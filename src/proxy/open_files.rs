//! The open-files limit a proxy needs for its tunnel limit.
//!
//! Container runtimes may start a process with a soft limit of 1024 descriptors (containerd 2
//! and Docker 29 inherit systemd's 1024:524288), about 500 idle tunnels or 170 splicing ones,
//! far below the default `maxTunnels` of 10,000. Past it, accept(2), socket(2) and pipe(2) fail
//! with EMFILE: a client gets no answer at all, or a 503 when its upstream socket cannot be made,
//! and a direction about to splice copies instead. The hard limit
//! is what a process may raise its own soft limit to, as HAProxy does for its maxconn; where
//! even that is too low, the tunnel limit is lowered to fit, so clients over it get the 503 of
//! a full proxy instead.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors one tunnel may hold: its two sockets and, while each direction splices, a pipe
/// (two descriptors) per direction. A browser bridge holds two.
pub const PER_TUNNEL: u64 = 6;
/// Descriptors kept for the process: stdio, the admin port and its scrapes, the browser port,
/// secrets being re-read, the main runtime's epoll and eventfd.
pub const RESERVED: u64 = 64;
/// And for each worker: its listener, epoll and eventfd, and its spare pipes.
pub const PER_WORKER: u64 = 3 + 2 * super::tunnel::SPARE_PIPES as u64;

/// What the limits call for, given the soft and hard limits now (`None`: unlimited), for
/// `max_tunnels` over `workers` worker threads.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// The soft limit to set, when it must rise (never above the hard limit, never lowered).
    pub raise_to: Option<u64>,
    /// The tunnels the soft limit then leaves descriptors for: `max_tunnels` or fewer, at least one.
    pub tunnels: usize,
}

pub fn plan(soft: Option<u64>, hard: Option<u64>, max_tunnels: usize, workers: usize) -> Plan {
    let reserved = RESERVED + PER_WORKER * workers as u64;
    let need = (max_tunnels as u64).saturating_mul(PER_TUNNEL).saturating_add(reserved);
    let (soft, hard) = (soft.unwrap_or(u64::MAX), hard.unwrap_or(u64::MAX));
    let raise_to = Some(need.min(hard)).filter(|&to| to > soft);
    let limit = raise_to.unwrap_or(soft);
    let tunnels = (limit.saturating_sub(reserved) / PER_TUNNEL).clamp(1, max_tunnels.max(1) as u64) as usize;
    Plan { raise_to, tunnels }
}

/// Raises this process's soft limit on open files as far as `max_tunnels` needs and the hard
/// limit allows; returns how many tunnels the limit in effect leaves descriptors for.
pub fn fit(max_tunnels: usize, workers: usize) -> usize {
    let now = getrlimit(Resource::Nofile);
    let mut planned = plan(now.current, now.maximum, max_tunnels, workers);
    let mut limit = now.current;
    if let Some(to) = planned.raise_to {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(to), maximum: now.maximum }) {
            Ok(()) => {
                tracing::debug!(from = %shown(now.current), to, "raised the open-files limit for the tunnel limit");
                limit = Some(to);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
                planned = plan(now.current, now.current, max_tunnels, workers);
            }
        }
    }
    if planned.tunnels < max_tunnels {
        tracing::warn!(
            open_files_limit = %shown(limit),
            hard_limit = %shown(now.maximum),
            max_tunnels,
            tunnels = planned.tunnels,
            "the open-files limit leaves descriptors for {} tunnels only, fewer than maxTunnels: clients over it get 503 (raise the container runtime's LimitNOFILE)",
            planned.tunnels
        );
    }
    planned.tunnels
}

/// A limit as a number, or `unlimited` (RLIM_INFINITY).
fn shown(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".into(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_as_far_as_the_tunnels_need_and_the_hard_limit_allows() {
        // Two workers: 64 + 2 × 11 descriptors besides the tunnels'.
        let plan = |soft, hard, max_tunnels| plan(soft, hard, max_tunnels, 2);
        // containerd 2's 1024:524288: raised to what 10,000 tunnels need, no further.
        assert_eq!(plan(Some(1024), Some(524_288), 10_000), Plan { raise_to: Some(60_086), tunnels: 10_000 });
        // A hard limit below that: raised to it, and the tunnel limit lowered to fit.
        assert_eq!(plan(Some(1024), Some(4096), 10_000), Plan { raise_to: Some(4096), tunnels: 668 });
        // Enough already, or unlimited: left alone, never lowered.
        assert_eq!(plan(Some(1_048_576), Some(1_048_576), 10_000), Plan { raise_to: None, tunnels: 10_000 });
        assert_eq!(plan(None, None, 10_000), Plan { raise_to: None, tunnels: 10_000 });
        assert_eq!(plan(Some(70_000), Some(70_000), 100), Plan { raise_to: None, tunnels: 100 });
        // Soft equal to a hard limit that is too low: nothing to raise, the tunnel limit fits it.
        assert_eq!(plan(Some(256), Some(256), 10_000), Plan { raise_to: None, tunnels: 28 });
        // Below what the rest of the proxy needs: still one tunnel, not a proxy refusing all.
        assert_eq!(plan(Some(64), Some(64), 10_000).tunnels, 1);
        assert_eq!(plan(Some(1024), Some(524_288), usize::MAX), Plan { raise_to: Some(524_288), tunnels: 87_367 });
        // Each worker keeps its own descriptors.
        assert_eq!(super::plan(Some(1024), Some(524_288), 10_000, 64).raise_to, Some(60_000 + 64 + 64 * 11));
    }
}
