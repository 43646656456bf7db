//! `/api/v1/status` and `/healthz`: the broker's status as JSON, and whether it is healthy.
//!
//! The JSON is built by hand from the broker's status types (they do not derive `Serialize`,
//! and the API's shape is ours to keep stable). Times are Unix milliseconds (`*_ms`) or
//! seconds (`*_s`); payload previews are UTF-8 (lossy) and at most 256 bytes.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};
use waystation_broker::status::BrokerStatus;
use waystation_broker::StatusHandle;

use crate::time::unix_ms;

/// Why the gateway is unhealthy, or `None` when listeners and storage are fine. Listeners are
/// bound before the HTTP server starts and live as long as the broker, so storage is what
/// can go wrong while running.
pub fn unhealthy(status: &BrokerStatus) -> Option<String> {
    if let Some(e) = &status.router.storage_error {
        return Some(format!("storage: {e}"));
    }
    if let Some(e) = status.durability.as_ref().and_then(|d| d.error.as_ref()) {
        return Some(format!("storage: commits failing: {e}"));
    }
    if let Some(aside) = status
        .recovery
        .as_ref()
        .and_then(|r| r.moved_aside.as_ref())
    {
        // Raised until the operator restarts the daemon after looking at what was moved aside:
        // the messages in it were acknowledged and are not being forwarded.
        return Some(format!(
            "storage: the store was corrupt at start-up and was moved aside to {} (its messages are not forwarded); running on an empty store",
            aside.display()
        ));
    }
    if status.router.storage_full {
        return Some("storage: the log is full (on_full = reject_new): publishers are held back until bridges make room".into());
    }
    None
}

/// A bridge down this long is reported as degraded on `/healthz` (still 200: the log holds
/// everything and publishers are served; an operator should look at the uplink).
pub const BRIDGE_DEGRADED_AFTER_MS: u64 = 30_000;

/// A storage fault the daemon survived (`StoreFault`: a failed read, a corrupt record, a
/// refused record or cursor) keeps `/healthz` degraded this long after it happened.
pub const STORE_FAULT_DEGRADED_FOR_MS: u64 = 10 * 60_000;

/// What works but needs an operator's eye: a recent storage fault, and bridges that have
/// been trying to reach their upstream for a while, each with how long and the last error.
pub fn degraded(status: &BrokerStatus, now_ms: u64) -> Vec<String> {
    let mut reasons: Vec<String> = Vec::new();
    if let Some((at_ms, fault, detail)) = &status.last_store_fault {
        let ago = now_ms.saturating_sub(*at_ms);
        if ago < STORE_FAULT_DEGRADED_FOR_MS {
            reasons.push(format!(
                "storage fault {} s ago ({}): {detail} (see waystation_store_faults_total and the log)",
                ago / 1000,
                fault.label()
            ));
        }
    }
    let bridges = status.bridges.iter().filter_map(|b| {
        let down_for = now_ms.saturating_sub(b.down_since_ms?);
        (down_for >= BRIDGE_DEGRADED_AFTER_MS).then(|| {
            format!(
                "bridge {}: upstream unreachable for {} s ({} attempts; last error: {})",
                b.name,
                down_for / 1000,
                b.connect_attempts,
                b.last_error.as_deref().unwrap_or("none yet")
            )
        })
    });
    reasons.extend(bridges);
    reasons
}

pub fn status_json(handle: &StatusHandle, gateway_id: &str) -> Value {
    let status = handle.status();
    let st = handle.stats();
    let now = unix_ms();
    let r = &status.router;
    let clients: Vec<Value> = r
        .clients
        .iter()
        .map(|c| {
            json!({
                "client_id": &*c.client_id,
                "peer": c.peer.map(|p| p.to_string()),
                "username": c.username,
                "connected_at_ms": c.connected_at_ms,
                "clean_session": c.clean_session,
                "protocol_version": c.protocol_version,
                "session_expiry": c.session_expiry,
                "messages_in": c.messages_in,
                "last_publish": c.last_publish.as_ref().map(|p| json!({
                    "topic": p.topic,
                    "payload": String::from_utf8_lossy(&p.payload),
                    "at_ms": p.at_ms,
                })),
            })
        })
        .collect();
    let last_seq = status.log.as_ref().and_then(|l| l.last_seq).unwrap_or(0);
    let bridges: Vec<Value> = status
        .bridges
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "connected": b.connected,
                "last_error": b.last_error,
                "cursor": b.cursor,
                "backlog": last_seq.saturating_sub(b.cursor),
                "forwarded": b.forwarded,
                "received": b.received,
                "reconnects": b.reconnects,
                "connect_attempts": b.connect_attempts,
                "failures": b.failures,
                "connected_since_ms": b.connected_since_ms,
                "down_since_ms": b.down_since_ms,
                "down_for_s": b.down_since_ms.map(|t| now.saturating_sub(t) / 1000),
                "bytes_sent": b.wire.bytes_sent.load(Relaxed),
                "bytes_received": b.wire.bytes_received.load(Relaxed),
                "inflight": b.inflight,
            })
        })
        .collect();
    let sum =
        |a: &[std::sync::atomic::AtomicU64; 3]| a.iter().map(|c| c.load(Relaxed)).sum::<u64>();
    let unhealthy = unhealthy(&status);
    let degraded = degraded(&status, now);
    json!({
        "gateway": gateway_id,
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": now,
        "started_at_ms": status.started_at_ms,
        "uptime_s": now.saturating_sub(status.started_at_ms) / 1000,
        "healthy": unhealthy.is_none(),
        "unhealthy_reason": unhealthy,
        "degraded": degraded,
        "totals": {
            "connections": st.connections.load(Relaxed),
            "connections_total": st.connections_total.load(Relaxed),
            "messages_received": crate::sys::received_by_qos(st).iter().sum::<u64>(),
            "messages_sent": sum(&st.messages_sent),
            "bytes_received": st.bytes_received.load(Relaxed),
            "forwarded": status.bridges.iter().map(|b| b.forwarded).sum::<u64>(),
            "dropped": st.dropped_queue_full.load(Relaxed) + st.dropped_qos0_offline.load(Relaxed)
                + st.dropped_qos0_slow.load(Relaxed) + st.dropped_storage_full.load(Relaxed)
                + st.dropped_expired.load(Relaxed) + st.dropped_message_expiry.load(Relaxed)
                + st.dropped_too_large.load(Relaxed),
            "protocol_errors": st.protocol_errors.load(Relaxed),
        },
        "clients": clients,
        "sessions": {
            "total": r.sessions,
            "offline": r.offline_sessions,
            "queued_messages": r.queued_messages,
            "subscriptions": r.subscriptions,
            "retained": r.retained,
        },
        "bridges": bridges,
        "storage": {
            "enabled": status.log.is_some(),
            "log_messages": status.log.as_ref().map(|l| l.len),
            "log_bytes": status.log.as_ref().map(|l| l.bytes),
            "first_seq": status.log.as_ref().and_then(|l| l.first_seq),
            "last_seq": status.log.as_ref().and_then(|l| l.last_seq),
            "oldest_age_s": status.log.as_ref().and_then(|l| l.oldest_received_at_ms).map(|t| now.saturating_sub(t) as f64 / 1000.0),
            "durable_through": status.durability.as_ref().map(|d| d.durable_through),
            "commits": status.durability.as_ref().map(|d| d.commits),
            "last_batch_ops": status.durability.as_ref().map(|d| d.last_batch_ops),
            "error": status.router.storage_error.clone().or_else(|| status.durability.as_ref().and_then(|d| d.error.clone())),
            "full": r.storage_full,
            "pending_acks": r.pending_acks,
            "pending_bytes": status.pending_bytes,
            "ingest_paused": st.ingest_paused.load(Relaxed) == 1,
            "faults": waystation_broker::StoreFault::ALL.iter()
                .map(|f| (f.label().to_string(), json!(st.store_faults().count(*f))))
                .collect::<serde_json::Map<String, Value>>(),
            "last_fault": status.last_store_fault.as_ref().map(|(at_ms, f, detail)| json!({
                "at_ms": at_ms, "kind": f.label(), "detail": detail,
            })),
            "moved_aside": status.recovery.as_ref().and_then(|rc| rc.moved_aside.as_ref()).map(|p| p.display().to_string()),
        },
    })
}
