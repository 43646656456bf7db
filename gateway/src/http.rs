//! The observability HTTP server (`[http] bind`, default 127.0.0.1:8080): `/metrics`,
//! `/healthz`, `/api/v1/status` and the dashboard at `/` (one static page and its script,
//! compiled into the binary: no CDN, no build step). `/api/v1/history` holds one sample a
//! second of the last five minutes (received, forwarded, backlog), so the dashboard's charts
//! are full as soon as it opens.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use waystation_broker::{DeadLetterHandle, Shutdown, StatusHandle};

use crate::{dlq, metrics, status, time};

const DASHBOARD_HTML: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");

/// Samples kept for `/api/v1/history` (one a second).
const HISTORY_LEN: usize = 300;

struct AppState {
    status: StatusHandle,
    registry: Registry,
    gateway_id: String,
    /// (unix ms, messages received, forwarded, backlog).
    history: Mutex<VecDeque<[u64; 4]>>,
}

fn sample(status: &StatusHandle) -> [u64; 4] {
    let s = status.status();
    let received = crate::sys::received_by_qos(status.stats()).iter().sum();
    let forwarded = s.bridges.iter().map(|b| b.forwarded).sum();
    let last_seq = s.log.as_ref().and_then(|l| l.last_seq).unwrap_or(0);
    let backlog = match &s.log {
        Some(l) => l.len,
        None => s
            .bridges
            .iter()
            .map(|b| last_seq.saturating_sub(b.cursor))
            .sum(),
    };
    [time::unix_ms(), received, forwarded, backlog]
}

fn app_state(status: StatusHandle, gateway_id: String) -> Arc<AppState> {
    Arc::new(AppState {
        registry: metrics::registry(status.clone()),
        status,
        gateway_id,
        history: Mutex::new(VecDeque::new()),
    })
}

fn router_with_state(state: Arc<AppState>, dead_letters: Option<DeadLetterHandle>) -> Router {
    Router::new()
        .merge(dlq::routes(dead_letters))
        .route("/api/v1/history", get(api_history))
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_js))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/api/v1/status", get(api_status))
        .with_state(state)
}

/// Binds `addr` (port 0 picks one) and serves until `shutdown` is signalled; returns the
/// bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    status: StatusHandle,
    gateway_id: String,
    dead_letters: Option<DeadLetterHandle>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let state = app_state(status, gateway_id);
    let app = router_with_state(state.clone(), dead_letters);
    let sampler_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sampler_stop.signalled() => return,
            }
            let s = sample(&state.status);
            let mut h = state.history.lock().unwrap_or_else(|p| p.into_inner());
            if h.len() == HISTORY_LEN {
                h.pop_front();
            }
            h.push_back(s);
        }
    });
    let task = tokio::spawn(async move {
        // The peer's address: dead-letter replay and purge answer loopback peers only.
        let result = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.signalled().await;
        })
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok((local, task))
}

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

async fn dashboard_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_JS,
    )
        .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode(&state.registry),
    )
        .into_response()
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let s = state.status.status();
    if let Some(reason) = status::unhealthy(&s) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response();
    }
    let degraded = status::degraded(&s, time::unix_ms());
    if degraded.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        // Degraded, not failing: the gateway keeps every message while the uplink is away,
        // so a load balancer or systemd watchdog must not restart it for this.
        (
            StatusCode::OK,
            format!("degraded: {}\n", degraded.join("; ")),
        )
            .into_response()
    }
}

async fn api_history(State(state): State<Arc<AppState>>) -> Response {
    let samples: Vec<[u64; 4]> = state
        .history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let body = serde_json::json!({ "fields": ["t_ms", "received", "forwarded", "backlog"], "samples": samples }).to_string();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn api_status(State(state): State<Arc<AppState>>) -> Response {
    let body = status::status_json(&state.status, &state.gateway_id).to_string();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}
