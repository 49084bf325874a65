//! The admin HTTP server of the operator and of the proxy: `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use crate::listener::WaitingMetrics;

type Encode = Arc<dyn Fn() -> String + Send + Sync>;

/// Whether the process is ready, else why not (the body of `/readyz`'s 503).
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Ready while `ready` is true, else `not_ready`.
pub fn ready_while(ready: watch::Receiver<bool>, not_ready: &'static str) -> Readiness {
    Arc::new(move || if *ready.borrow() { Ok(()) } else { Err(not_ready.to_string()) })
}

#[derive(Clone)]
struct AdminState {
    metrics: Encode,
    ready: Readiness,
}

/// How long a scraper or probe has to send its request (kubelet probes and Prometheus send at once).
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Scrapers and probes at once: a few in practice.
pub const MAX_CONNECTIONS: usize = 256;

/// Serves until the process ends. `/readyz` answers 200 while `ready` says so, else 503 with the reason.
/// One connection past `MAX_CONNECTIONS` closes the longest waiting (`listener::Waiting`): a
/// flood of silent connections must not fail the kubelet's probes (a failed liveness probe
/// restarts the pod, and every console through it ends), and probes send their request at once.
pub async fn serve(listener: TcpListener, metrics: Encode, ready: Readiness, connections: WaitingMetrics) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<AdminState>| async move {
                match (s.ready)() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move {
                ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], (s.metrics)())
            }),
        )
        .with_state(AdminState { metrics, ready });
    let limit = crate::listener::Waiting::new(MAX_CONNECTIONS, connections);
    crate::listener::serve(listener, app, HEAD_TIMEOUT, limit, |_| (), std::future::pending()).await;
    Ok(())
}

pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    crate::listener::bind(addr, "admin").await
}

/// Registers the admin port's connection metrics (`admin_connections`, and
/// `admin_connections_closed` to make room) under the process's prefix, for `serve`.
pub fn register_connections(registry: &mut prometheus_client::registry::Registry) -> WaitingMetrics {
    let closed = format!("Admin-port connections (probes, scrapes) closed to make room for a newer one because {MAX_CONNECTIONS} were open");
    WaitingMetrics::register(registry, "admin_connections", closed, "Admin-port connections open now")
}
