//! The built-in SPICE proxy run by every SpiceProxy Deployment (`spice-operator proxy`):
//! HTTP CONNECT tunnels with tickets, an allow-list and a zero-copy splice(2) data path.
pub mod allow;
pub mod client_mend;
pub mod config;
pub mod head;
pub mod metrics;
pub mod open_files;
pub mod proxy_protocol;
pub mod server;
mod sockopt;
pub mod throttle;
pub mod ticket;
pub mod tunnel;
pub mod upstream_tls;
pub mod websocket;
