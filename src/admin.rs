//! The admin HTTP server of the operator and of the proxy: `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

type Encode = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    metrics: Encode,
    ready: watch::Receiver<bool>,
    not_ready: &'static str,
}

/// Serves until the process ends. `/readyz` answers 200 while `ready` is true, else 503 with `not_ready`.
pub async fn serve(listener: TcpListener, metrics: Encode, ready: watch::Receiver<bool>, not_ready: &'static str) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<AdminState>| async move {
                if *s.ready.borrow() { (StatusCode::OK, "ready\n".to_string()) } else { (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", s.not_ready)) }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move {
                ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], (s.metrics)())
            }),
        )
        .with_state(AdminState { metrics, ready, not_ready });
    axum::serve(listener, app).await?;
    Ok(())
}

pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}
