//! spice-operator: runs SPICE console proxies on Kubernetes and resolves which proxy each VM
//! cluster and pool uses. See README.md for the layout.
pub mod admin;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod engine;
pub mod http_answer;
pub mod labels;
pub mod leader;
pub mod listener;
pub mod log_queue;
pub mod managed_fields;
pub mod metrics;
pub mod mounted;
pub mod open_files;
pub mod proxy;
pub mod resolve;
pub mod rotation;
pub mod tls;

/// On the first SIGTERM or Ctrl-C runs `begin_stop` (a graceful stop: drain, finish
/// reconciles); a second one exits the process at once with status 1, as Kubernetes
/// controllers do, for whoever does not want to wait.
pub fn on_stop_signals(begin_stop: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        shutdown_signal().await;
        begin_stop();
        shutdown_signal().await;
        tracing::warn!("second stop signal: exiting at once");
        log_queue::flush_all(std::time::Duration::from_millis(500));
        std::process::exit(1);
    });
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
