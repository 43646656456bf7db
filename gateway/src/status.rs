//! `/api/v1/status` and `/healthz`: the broker's status as JSON, and whether it is healthy.
//!
//! The JSON is built by hand from the broker's status types (they do not derive `Serialize`,
//! and the API's shape is ours to keep stable). Times are Unix milliseconds (`*_ms`) or
//! seconds (`*_s`); payload previews are UTF-8 (lossy) and at most 256 bytes.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};
use waystation_broker::pipeline::event::InvalidReason;
use waystation_broker::status::{BridgeStatus, BrokerStatus};
use waystation_broker::{Stats, StatusHandle};

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

/// The edge pipeline (docs/pipeline.md): the ingest counters (`[[pipeline]]`, dead letters)
/// and the bridges' batch counters summed over every bridge. `bytes_saved` is what batching
/// and compression kept off the uplinks: the events' topic and payload bytes less the batch
/// payloads sent (0, not negative, when a batch came out larger).
pub fn pipeline_json(st: &Stats, bridges: &[BridgeStatus]) -> Value {
    let by_reason: serde_json::Map<String, Value> = InvalidReason::ALL
        .iter()
        .map(|r| {
            let n = st.pipeline_invalid[*r as usize].load(Relaxed);
            (r.label().to_string(), json!(n))
        })
        .collect();
    let invalid: u64 = st.pipeline_invalid.iter().map(|c| c.load(Relaxed)).sum();
    let batch_sum = |f: fn(&BridgeStatus) -> u64| bridges.iter().map(f).sum::<u64>();
    let input = batch_sum(|b| b.batches.input_bytes.load(Relaxed));
    let output = batch_sum(|b| b.batches.output_bytes.load(Relaxed));
    json!({
        "valid": st.pipeline_valid.load(Relaxed),
        "invalid": invalid,
        "invalid_by_reason": by_reason,
        "duplicates": st.pipeline_duplicates.load(Relaxed),
        "dead_letters": st.dead_letters.load(Relaxed),
        "dead_letter_bytes": st.dead_letter_bytes.load(Relaxed),
        "dead_letters_evicted": st.dead_letters_evicted.load(Relaxed),
        "dead_letters_replayed": st.dead_letters_replayed.load(Relaxed),
        "batches": batch_sum(|b| b.batches.batches.load(Relaxed)),
        "batched_events": batch_sum(|b| b.batches.events.load(Relaxed)),
        "batch_input_bytes": input,
        "batch_output_bytes": output,
        "bytes_saved": input.saturating_sub(output),
    })
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
        "pipeline": pipeline_json(st, &status.bridges),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(batches: u64, events: u64, input: u64, output: u64) -> BridgeStatus {
        let b = BridgeStatus::default();
        b.batches.batches.store(batches, Relaxed);
        b.batches.events.store(events, Relaxed);
        b.batches.input_bytes.store(input, Relaxed);
        b.batches.output_bytes.store(output, Relaxed);
        b
    }

    #[test]
    fn pipeline_counts_reasons_and_sums_batches_over_bridges() {
        let st = Stats::default();
        st.pipeline_valid.store(40, Relaxed);
        st.pipeline_duplicates.store(2, Relaxed);
        st.pipeline_invalid[InvalidReason::NotJson as usize].store(3, Relaxed);
        st.pipeline_invalid[InvalidReason::DeviceMismatch as usize].store(1, Relaxed);
        st.dead_letters.store(4, Relaxed);
        st.dead_letter_bytes.store(321, Relaxed);
        st.dead_letters_evicted.store(5, Relaxed);
        st.dead_letters_replayed.store(6, Relaxed);
        let bridges = [batches(2, 30, 3000, 1000), batches(1, 10, 1000, 200)];
        let p = pipeline_json(&st, &bridges);
        assert_eq!(
            p,
            json!({
                "valid": 40, "invalid": 4, "duplicates": 2,
                "invalid_by_reason": {
                    "not_json": 3, "schema_violation": 0, "missing_field": 0, "wrong_type": 0, "bad_value": 0,
                    "unknown_version": 0, "device_mismatch": 1, "no_event_id": 0,
                },
                "dead_letters": 4, "dead_letter_bytes": 321,
                "dead_letters_evicted": 5, "dead_letters_replayed": 6,
                "batches": 3, "batched_events": 40,
                "batch_input_bytes": 4000, "batch_output_bytes": 1200, "bytes_saved": 2800,
            })
        );
    }

    #[test]
    fn bytes_saved_is_never_negative() {
        let p = pipeline_json(&Stats::default(), &[batches(1, 1, 50, 80)]);
        assert_eq!(p["bytes_saved"], 0);
        assert_eq!(p["batch_output_bytes"], 80);
        let none = pipeline_json(&Stats::default(), &[]);
        assert_eq!(none["batches"], 0);
        assert_eq!(none["bytes_saved"], 0);
    }
}
