//! The admin HTTP server of the operator and of the proxy: `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
/// A connection past `MAX_CONNECTIONS` is answered 503 and counted in `refused`: a probe that
/// meets it fails, so the count tells why.
pub async fn serve(listener: TcpListener, metrics: Encode, ready: Readiness, refused: prometheus_client::metrics::counter::Counter) -> anyhow::Result<()> {
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
    crate::listener::serve(listener, app, HEAD_TIMEOUT, crate::listener::ConnectionLimit::new(MAX_CONNECTIONS, refused), |_| (), std::future::pending()).await;
    Ok(())
}

pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    crate::listener::bind(addr, "admin").await
}

/// Registers the counter `serve` takes, as `admin_connections_refused` in `registry`.
pub fn register_refused(registry: &mut prometheus_client::registry::Registry) -> prometheus_client::metrics::counter::Counter {
    let refused = prometheus_client::metrics::counter::Counter::default();
    let help = format!("Admin-port connections (probes, scrapes) closed or answered 503 because {MAX_CONNECTIONS} were open");
    registry.register("admin_connections_refused", help, refused.clone());
    refused
}
