//! The descriptors the proxy's tunnel limit needs (the limit itself is `crate::open_files`).

use crate::open_files::Need;

/// Descriptors one tunnel may hold: its two sockets and, while each direction splices, a pipe
/// (two descriptors) per direction. A browser bridge holds two.
pub const PER_TUNNEL: u64 = 6;
/// Descriptors kept for the process: stdio, the admin port and its scrapes, the browser port,
/// secrets being re-read, the main runtime's epoll and eventfd.
pub const RESERVED: u64 = 64;
/// And for each worker: its listener, epoll and eventfd, and its spare pipes.
pub const PER_WORKER: u64 = 3 + 2 * super::tunnel::SPARE_PIPES as u64;

/// What `workers` worker threads' tunnels need. Each tunnel place also has one connection on
/// the CONNECT port waiting for its request to be accepted and, with a browser port, one there
/// waiting for its WebSocket upgrade (each port holds as many as there are tunnel places).
pub fn need(workers: usize, browser_port: bool) -> Need {
    Need { per_connection: PER_TUNNEL + 1 + browser_port as u64, reserved: RESERVED + PER_WORKER * workers as u64 }
}

/// Raises the open-files limit for `max_tunnels` over `workers` workers; returns the tunnels it
/// leaves descriptors for.
pub fn fit(max_tunnels: usize, workers: usize, browser_port: bool) -> usize {
    crate::open_files::fit(max_tunnels, need(workers, browser_port), "maxTunnels", "tunnels")
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_worker_keeps_descriptors_of_its_own() {
        assert_eq!(super::need(2, false).reserved, 64 + 2 * 11);
        let plan = crate::open_files::plan(Some(1024), Some(524_288), 10_000, super::need(64, false));
        assert_eq!(plan.raise_to, Some(70_000 + 64 + 64 * 11));
    }

    #[test]
    fn a_browser_port_needs_one_more_descriptor_per_tunnel() {
        let plan = |browser| crate::open_files::plan(Some(256), Some(256), 10_000, super::need(2, browser)).connections;
        assert_eq!((plan(false), plan(true)), ((256 - 86) / 7, (256 - 86) / 8));
    }
}
