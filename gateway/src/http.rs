//! The observability HTTP server (`[http] bind`, default 127.0.0.1:8080): `/metrics`,
//! `/healthz`, `/api/v1/status` and the dashboard at `/` (one static page and its script,
//! compiled into the binary: no CDN, no build step).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use waystation_broker::StatusHandle;

use crate::{metrics, status};

const DASHBOARD_HTML: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");

struct AppState {
    status: StatusHandle,
    registry: Registry,
    gateway_id: String,
}

pub fn router(status: StatusHandle, gateway_id: String) -> Router {
    let state = Arc::new(AppState { registry: metrics::registry(status.clone()), status, gateway_id });
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_js))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/api/v1/status", get(api_status))
        .with_state(state)
}

/// Binds `addr` (port 0 picks one) and serves until `shutdown` turns true; returns the
/// bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    status: StatusHandle,
    gateway_id: String,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(status, gateway_id);
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok((local, task))
}

async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], DASHBOARD_HTML).into_response()
}

async fn dashboard_js() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], DASHBOARD_JS).into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics::encode(&state.registry)).into_response()
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match status::unhealthy(&state.status.status()) {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn api_status(State(state): State<Arc<AppState>>) -> Response {
    let body = status::status_json(&state.status, &state.gateway_id).to_string();
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}
