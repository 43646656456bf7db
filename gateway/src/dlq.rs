//! The dead letters over HTTP and from the command line.
//!
//! HTTP (on `[http] bind`, beside `/metrics`):
//! - `GET /api/v1/dead-letters?limit=N` — the oldest N (default 100) and how many there are;
//! - `POST /api/v1/dead-letters/replay` and `/purge` with a JSON body `{"ids":[...]}` or
//!   `{"all":true}`. Both change what the gateway keeps, so they are answered only for a
//!   client on the machine itself (a loopback peer) and only with `Content-Type:
//!   application/json` (a web page elsewhere cannot send that without a CORS preflight, which
//!   this server does not grant): the dashboard port has no authentication.
//!
//! `waystation dlq list | replay | purge` is a small HTTP/1.1 client of those routes (std
//! TcpStream, `Connection: close`): the daemon owns the store, so the CLI asks it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;
use waystation_broker::DeadLetterHandle;

/// Dead letters `GET` returns when the query names no `limit`, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

pub fn routes<S: Clone + Send + Sync + 'static>(handle: Option<DeadLetterHandle>) -> Router<S> {
    Router::new()
        .route("/api/v1/dead-letters", get(list))
        .route("/api/v1/dead-letters/replay", post(replay))
        .route("/api/v1/dead-letters/purge", post(purge))
        .with_state(handle)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    json(status, serde_json::json!({ "error": message.to_string() }))
}

async fn list(
    State(handle): State<Option<DeadLetterHandle>>,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(handle) = handle else {
        return error(StatusCode::NOT_FOUND, "no data directory: no dead letters");
    };
    let mut limit = DEFAULT_LIMIT;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("limit", n)) => match n.parse::<usize>() {
                Ok(n) if n <= MAX_LIMIT => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("limit must be 0 to {MAX_LIMIT}"),
                    )
                }
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {pair:?}"),
                )
            }
        }
    }
    match handle.list(limit).await {
        Ok((letters, total)) => {
            let items: Vec<serde_json::Value> = letters.iter().map(|d| d.to_json()).collect();
            json(
                StatusCode::OK,
                serde_json::json!({ "total": total, "dead_letters": items }),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    #[serde(default)]
    ids: Option<Vec<u64>>,
    #[serde(default)]
    all: bool,
}

/// The ids a mutation names (`None`: all), or the response refusing it.
fn selection(
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Option<Vec<u64>>, Box<Response>> {
    if !peer.ip().is_loopback() {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "replay and purge are answered only on the gateway itself (waystation dlq)",
        )));
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        )));
    }
    let selection: Selection = serde_json::from_slice(body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("body: {e}"))))?;
    match (selection.ids, selection.all) {
        (Some(ids), false) => Ok(Some(ids)),
        (None, true) => Ok(None),
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "name either \"ids\" or \"all\": true",
        ))),
    }
}

async fn replay(
    State(handle): State<Option<DeadLetterHandle>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    mutate(handle, peer, headers, body, true).await
}

async fn purge(
    State(handle): State<Option<DeadLetterHandle>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    mutate(handle, peer, headers, body, false).await
}

async fn mutate(
    handle: Option<DeadLetterHandle>,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Bytes,
    replay: bool,
) -> Response {
    let ids = match selection(peer, &headers, &body) {
        Ok(ids) => ids,
        Err(refused) => return *refused,
    };
    let Some(handle) = handle else {
        return error(StatusCode::NOT_FOUND, "no data directory: no dead letters");
    };
    let result = if replay {
        handle.replay(ids).await
    } else {
        handle.purge(ids).await
    };
    match result {
        Ok(summary) => json(
            StatusCode::OK,
            serde_json::to_value(summary).unwrap_or_default(),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

// ---- the command line --------------------------------------------------------------------

/// `waystation dlq`'s actions.
#[derive(clap::Subcommand)]
pub enum DlqAction {
    /// Print the stored dead letters, oldest first.
    List {
        #[arg(long, default_value_t = DEFAULT_LIMIT)]
        limit: usize,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters through the pipeline again (after fixing the config or the
    /// schema): those it now accepts are forwarded, the others become new dead letters.
    Replay {
        /// Ids to replay; none: every stored one.
        ids: Vec<u64>,
    },
    /// Delete dead letters.
    Purge {
        ids: Vec<u64>,
        /// Delete every stored one (needed when no ids are given).
        #[arg(long)]
        all: bool,
    },
}

/// Runs a `waystation dlq` action against the daemon's HTTP server at `addr`.
pub fn main(addr: &str, action: DlqAction) -> Result<(), String> {
    match action {
        DlqAction::List { limit, json } => {
            let body = request(
                addr,
                "GET",
                &format!("/api/v1/dead-letters?limit={limit}"),
                None,
            )?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let v: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("answer: {e}"))?;
            let items = v["dead_letters"].as_array().cloned().unwrap_or_default();
            println!(
                "{} dead letter(s){}",
                v["total"],
                if items.len() < v["total"].as_u64().unwrap_or(0) as usize {
                    format!(", the oldest {} shown", items.len())
                } else {
                    String::new()
                }
            );
            for d in items {
                println!(
                    "{:>6}  {}  {:<15}  {}  ({})  {}",
                    d["id"],
                    utc(d["at_ms"].as_u64().unwrap_or(0)),
                    d["reason"].as_str().unwrap_or("?"),
                    d["topic"].as_str().unwrap_or("?"),
                    d["origin"].as_str().unwrap_or("?"),
                    d["detail"].as_str().unwrap_or(""),
                );
            }
            Ok(())
        }
        DlqAction::Replay { ids } => {
            let body = if ids.is_empty() {
                serde_json::json!({"all": true})
            } else {
                serde_json::json!({ "ids": ids })
            };
            let answer = request(
                addr,
                "POST",
                "/api/v1/dead-letters/replay",
                Some(&body.to_string()),
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&answer).map_err(|e| format!("answer: {e}"))?;
            println!(
                "replayed {} (forwarded now), refused again {}, kept (no bridge forwards the topic) {}, not found {}",
                v["replayed"], v["refused_again"], v["kept"], v["missing"]
            );
            Ok(())
        }
        DlqAction::Purge { ids, all } => {
            let body = match (ids.is_empty(), all) {
                (true, true) => serde_json::json!({"all": true}),
                (false, false) => serde_json::json!({ "ids": ids }),
                (true, false) => return Err("name the ids to purge, or --all".into()),
                (false, true) => return Err("give ids or --all, not both".into()),
            };
            let answer = request(
                addr,
                "POST",
                "/api/v1/dead-letters/purge",
                Some(&body.to_string()),
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&answer).map_err(|e| format!("answer: {e}"))?;
            println!("purged {}, not found {}", v["purged"], v["missing"]);
            Ok(())
        }
    }
}

/// One HTTP/1.1 request; the body of a 2xx answer, or an error naming the status and the
/// server's message.
fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
    let timeout = Duration::from_secs(60);
    let mut stream = TcpStream::connect(addr).map_err(|e| {
        format!("cannot reach the gateway at {addr}: {e} (is it running? see [http] bind)")
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(format!("{head}{body}").as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status")?;
    if (200..300).contains(&status) {
        Ok(body.to_string())
    } else {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| body.trim().to_string());
        Err(format!("the gateway answered {status}: {message}"))
    }
}

/// Unix ms as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(ms: u64) -> String {
    let t = waystation_broker::time::utc((ms / 1000) as i64);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_083_199_000), "2026-11-30T23:59:59Z");
    }
}
