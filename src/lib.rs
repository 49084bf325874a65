//! spice-operator: runs SPICE console proxies on Kubernetes and resolves which proxy each VM
//! cluster and pool uses. See README.md for the layout.
pub mod admin;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod engine;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod proxy;
pub mod resolve;

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
