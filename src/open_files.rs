//! The open-files limit a server needs for its connection limit.
//!
//! Container runtimes may start a process with a soft limit of 1024 descriptors (containerd 2
//! and Docker 29 inherit systemd's 1024:524288): for the proxy about 500 idle tunnels or 170
//! splicing ones, far below the default `maxTunnels` of 10,000; for the operator fewer engine
//! API connections than its limit of 1,024 once its watches and admin port are counted. Past
//! it, accept(2), socket(2) and pipe(2) fail with EMFILE: a client gets no answer at all, or a
//! 503 when an upstream socket cannot be made, and a tunnel direction about to splice copies
//! instead. The hard limit is what a process may raise its own soft limit to, as HAProxy does
//! for its maxconn; where even that is too low, the connection limit is lowered to fit, so
//! clients over it get the 503 of a full server instead.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// What a server's connections need: `per_connection` descriptors each, besides `reserved`
/// for the rest of the process.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub per_connection: u64,
    pub reserved: u64,
}

/// What the limits call for, given the soft and hard limits now (`None`: unlimited).
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// The soft limit to set, when it must rise (never above the hard limit, never lowered).
    pub raise_to: Option<u64>,
    /// The connections the soft limit then leaves descriptors for: the limit asked or fewer,
    /// at least one.
    pub connections: usize,
}

pub fn plan(soft: Option<u64>, hard: Option<u64>, max_connections: usize, need: Need) -> Plan {
    let total = (max_connections as u64).saturating_mul(need.per_connection).saturating_add(need.reserved);
    let (soft, hard) = (soft.unwrap_or(u64::MAX), hard.unwrap_or(u64::MAX));
    let raise_to = Some(total.min(hard)).filter(|&to| to > soft);
    let limit = raise_to.unwrap_or(soft);
    let connections = (limit.saturating_sub(need.reserved) / need.per_connection.max(1)).clamp(1, max_connections.max(1) as u64) as usize;
    Plan { raise_to, connections }
}

/// Raises this process's soft limit on open files as far as `max_connections` needs and the
/// hard limit allows; returns how many connections the limit in effect leaves descriptors for,
/// with a warning naming `setting` (what the user would change) when that is fewer, counted as
/// `unit` (tunnels, connections).
pub fn fit(max_connections: usize, need: Need, setting: &str, unit: &str) -> usize {
    let now = getrlimit(Resource::Nofile);
    let mut planned = plan(now.current, now.maximum, max_connections, need);
    let mut limit = now.current;
    if let Some(to) = planned.raise_to {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(to), maximum: now.maximum }) {
            Ok(()) => {
                tracing::debug!(from = %shown(now.current), to, "raised the open-files limit for {setting}");
                limit = Some(to);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
                planned = plan(now.current, now.current, max_connections, need);
            }
        }
    }
    if planned.connections < max_connections {
        tracing::warn!(
            open_files_limit = %shown(limit),
            hard_limit = %shown(now.maximum),
            setting,
            asked = max_connections,
            connections = planned.connections,
            "the open-files limit leaves descriptors for {} {unit} only, fewer than {setting} asks: clients over it get 503 (raise the container runtime's LimitNOFILE)",
            planned.connections
        );
    }
    planned.connections
}

/// A limit as a number, or `unlimited` (RLIM_INFINITY).
fn shown(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".into(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_as_far_as_the_connections_need_and_the_hard_limit_allows() {
        // The proxy's need with two workers: 6 per tunnel, 64 + 2 × 11 besides.
        let plan = |soft, hard, max| plan(soft, hard, max, Need { per_connection: 6, reserved: 86 });
        // containerd 2's 1024:524288: raised to what 10,000 tunnels need, no further.
        assert_eq!(plan(Some(1024), Some(524_288), 10_000), Plan { raise_to: Some(60_086), connections: 10_000 });
        // A hard limit below that: raised to it, and the limit lowered to fit.
        assert_eq!(plan(Some(1024), Some(4096), 10_000), Plan { raise_to: Some(4096), connections: 668 });
        // Enough already, or unlimited: left alone, never lowered.
        assert_eq!(plan(Some(1_048_576), Some(1_048_576), 10_000), Plan { raise_to: None, connections: 10_000 });
        assert_eq!(plan(None, None, 10_000), Plan { raise_to: None, connections: 10_000 });
        assert_eq!(plan(Some(70_000), Some(70_000), 100), Plan { raise_to: None, connections: 100 });
        // Soft equal to a hard limit that is too low: nothing to raise, the limit fits it.
        assert_eq!(plan(Some(256), Some(256), 10_000), Plan { raise_to: None, connections: 28 });
        // Below what the rest of the process needs: still one connection, not a server refusing all.
        assert_eq!(plan(Some(64), Some(64), 10_000).connections, 1);
        assert_eq!(plan(Some(1024), Some(524_288), usize::MAX), Plan { raise_to: Some(524_288), connections: 87_367 });
        // One descriptor per connection (the engine API): 1,024 of them and 512 besides.
        let engine = Need { per_connection: 1, reserved: 512 };
        assert_eq!(super::plan(Some(1024), Some(524_288), 1024, engine), Plan { raise_to: Some(1536), connections: 1024 });
        assert_eq!(super::plan(Some(1024), Some(1024), 1024, engine), Plan { raise_to: None, connections: 512 });
    }
}
