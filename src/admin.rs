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
/// One connection past `MAX_CONNECTIONS` closes the longest waiting (`listener::Waiting`): a
/// flood of silent connections must not fail the kubelet's probes (a failed liveness probe
/// restarts the pod, and every console through it ends), and probes send their request at once.
pub async fn serve(listener: TcpListener, metrics: Encode, ready: Readiness, connections: Connections) -> anyhow::Result<()> {
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
    let limit = crate::listener::Waiting::new(MAX_CONNECTIONS, connections.closed, connections.open);
    crate::listener::serve(listener, app, HEAD_TIMEOUT, limit, |_| (), std::future::pending()).await;
    Ok(())
}

pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    crate::listener::bind(addr, "admin").await
}

/// The admin port's connections, as metrics under the process's prefix.
#[derive(Clone, Default)]
pub struct Connections {
    /// `admin_connections_closed`: closed to make room because `MAX_CONNECTIONS` were open.
    pub closed: prometheus_client::metrics::counter::Counter,
    /// `admin_connections`: open now.
    pub open: prometheus_client::metrics::gauge::Gauge,
}

impl Connections {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let c = Connections::default();
        let help = format!("Admin-port connections (probes, scrapes) closed to make room for a newer one because {MAX_CONNECTIONS} were open");
        registry.register("admin_connections_closed", help, c.closed.clone());
        registry.register("admin_connections", "Admin-port connections open now", c.open.clone());
        c
    }
}
