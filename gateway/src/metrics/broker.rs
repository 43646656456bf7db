//! `/metrics`, the broker's part: connections, security, sessions, messages, the store and
//! the durable log, in that order.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use waystation_broker::status::BrokerStatus;
use waystation_broker::Stats;

use super::families::{counter, family, gauge, gauge_f, histogram, snap, Labels};

/// Uptime and the life of connections (accepted, refused, closed early).
pub fn encode_connections(
    e: &mut DescriptorEncoder,
    st: &Stats,
    status: &BrokerStatus,
    now: u64,
) -> Result<(), std::fmt::Error> {
    gauge_f(
        e,
        "waystation_uptime_seconds",
        "Seconds since the broker started",
        now.saturating_sub(status.started_at_ms) as f64 / 1000.0,
    )?;
    gauge(
        e,
        "waystation_connections",
        "MQTT connections open now",
        st.connections.load(Relaxed) as i64,
    )?;
    counter(
        e,
        "waystation_connections",
        "MQTT connections accepted",
        st.connections_total.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_connections_refused",
        "Connections refused at max_connections",
        st.refused_connections.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_protocol_errors",
        "Connections closed for a protocol violation",
        st.protocol_errors.load(Relaxed),
    )?;
    Ok(())
}

/// Security: authentication, ACL and per-client limits (docs/security.md).
pub fn encode_security(e: &mut DescriptorEncoder, st: &Stats) -> Result<(), std::fmt::Error> {
    // Security: authentication, ACL and per-client limits (docs/security.md).
    counter(
        e,
        "waystation_auth_failures",
        "CONNECTs refused for bad or missing credentials (CONNACK 4 or 5)",
        st.auth_failures.load(Relaxed),
    )?;
    let acl: Vec<(Labels, f64)> = [
        ("publish", &st.acl_denied_publish),
        ("subscribe", &st.acl_denied_subscribe),
        ("delivery", &st.acl_denied_deliveries),
    ]
    .iter()
    .map(|(k, c)| (vec![("action", k.to_string())], c.load(Relaxed) as f64))
    .collect();
    family(
        e,
        "waystation_acl_denied",
        "Publishes, subscriptions and deliveries refused by the ACL",
        MetricType::Counter,
        &acl,
    )?;
    counter(
        e,
        "waystation_publish_rate_exceeded",
        "Connections closed for exceeding max_publish_rate",
        st.publish_rate_exceeded.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_limit_refusals",
        "Topics and filters refused by max_topic_length/levels and max_subscriptions",
        st.limit_refusals.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_connection_rate_refused",
        "Connections closed at accept by max_connection_rate",
        st.connection_rate_refused.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_connect_timeouts",
        "Connections closed for no CONNECT within connect_timeout",
        st.connect_timeouts.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_closed_before_connect",
        "TCP connections closed before sending anything (port probes, health checks); not protocol errors",
        st.closed_before_connect.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_keep_alive_timeouts",
        "Connections closed for silence over 1.5x the keep-alive",
        st.keep_alive_timeouts.load(Relaxed),
    )?;
    Ok(())
}

/// Clients, sessions, subscriptions, and messages in, out and dropped.
pub fn encode_sessions_and_messages(
    e: &mut DescriptorEncoder,
    st: &Stats,
    status: &BrokerStatus,
) -> Result<(), std::fmt::Error> {
    let qos_rows = |a: &[std::sync::atomic::AtomicU64; 3]| -> Vec<(Labels, f64)> {
        (0..3)
            .map(|q| (vec![("qos", q.to_string())], a[q].load(Relaxed) as f64))
            .collect()
    };
    gauge(
        e,
        "waystation_clients_connected",
        "Clients past CONNECT",
        status.router.clients.len() as i64,
    )?;
    gauge(
        e,
        "waystation_sessions",
        "Sessions (connected and offline persistent)",
        status.router.sessions as i64,
    )?;
    gauge(
        e,
        "waystation_sessions_offline",
        "Offline persistent sessions",
        status.router.offline_sessions as i64,
    )?;
    gauge(
        e,
        "waystation_session_queued_messages",
        "QoS 1/2 messages waiting in sessions",
        status.router.queued_messages as i64,
    )?;
    gauge(
        e,
        "waystation_subscriptions",
        "Subscriptions",
        status.router.subscriptions as i64,
    )?;
    gauge(
        e,
        "waystation_retained_messages",
        "Retained messages",
        status.router.retained as i64,
    )?;
    gauge(
        e,
        "waystation_pending_acks",
        "Acknowledgements waiting for the disk",
        status.router.pending_acks as i64,
    )?;
    let received = crate::sys::received_by_qos(st);
    let received: Vec<(Labels, f64)> = (0..3)
        .map(|q| (vec![("qos", q.to_string())], received[q] as f64))
        .collect();
    family(
        e,
        "waystation_messages_received",
        "PUBLISH packets received from clients and bridges, by QoS",
        MetricType::Counter,
        &received,
    )?;
    family(
        e,
        "waystation_messages_sent",
        "PUBLISH packets sent to clients, by QoS",
        MetricType::Counter,
        &qos_rows(&st.messages_sent),
    )?;
    counter(
        e,
        "waystation_bytes_received",
        "Payload bytes received from clients",
        st.bytes_received.load(Relaxed),
    )?;
    let dropped: Vec<(Labels, f64)> = [
        ("queue_full", &st.dropped_queue_full),
        ("qos0_offline", &st.dropped_qos0_offline),
        ("qos0_slow_client", &st.dropped_qos0_slow),
        ("storage_full", &st.dropped_storage_full),
        ("expired", &st.dropped_expired),
        ("message_expiry", &st.dropped_message_expiry),
        ("packet_too_large", &st.dropped_too_large),
    ]
    .iter()
    .map(|(r, c)| (vec![("reason", r.to_string())], c.load(Relaxed) as f64))
    .collect();
    family(
        e,
        "waystation_messages_dropped",
        "Messages dropped, by reason",
        MetricType::Counter,
        &dropped,
    )?;
    Ok(())
}

/// The durable store: health, back-pressure and faults.
pub fn encode_store(
    e: &mut DescriptorEncoder,
    st: &Stats,
    status: &BrokerStatus,
) -> Result<(), std::fmt::Error> {
    // The durable log (what the bridges still have to forward).
    let storage_ok = status.router.storage_error.is_none()
        && status.durability.as_ref().is_none_or(|d| d.error.is_none());
    gauge(
        e,
        "waystation_storage_ok",
        "1 while the last commit succeeded",
        i64::from(storage_ok),
    )?;
    gauge(
        e,
        "waystation_storage_full",
        "1 while on_full = reject_new holds publishers back",
        i64::from(status.router.storage_full),
    )?;
    let moved_aside = status
        .recovery
        .as_ref()
        .is_some_and(|r| r.moved_aside.is_some());
    gauge(
        e,
        "waystation_store_moved_aside",
        "1 when the store was corrupt at start-up and was moved aside (alert on it)",
        i64::from(moved_aside),
    )?;
    if let Some(pending) = status.pending_bytes {
        gauge(
            e,
            "waystation_store_pending_bytes",
            "Bytes submitted to the store and not yet durable (publishers pause over storage.max_pending_bytes)",
            pending as i64,
        )?;
    }
    gauge(
        e,
        "waystation_ingest_paused",
        "1 while publishers are not read from (writes pending over max_pending_bytes, store full or failing)",
        st.ingest_paused.load(Relaxed) as i64,
    )?;
    counter(
        e,
        "waystation_ingest_pauses",
        "Times publishers were paused because more than storage.max_pending_bytes waited for the disk",
        st.ingest_pauses.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_publisher_waits",
        "Times a publisher was not read from until a live subscriber it feeds with QoS 0 caught up (back-pressure)",
        st.publisher_waits.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_slow_subscribers",
        "Times a live subscriber behind on QoS 0 for 2 s was marked slow: its QoS 0 messages past 256 KiB are dropped until everything it was given is written",
        st.slow_subscribers.load(Relaxed),
    )?;
    let faults = st.store_faults();
    let fault_counts: Vec<(Labels, f64)> = waystation_broker::StoreFault::ALL
        .iter()
        .map(|f| {
            (
                vec![("kind", f.label().to_string())],
                faults.count(*f) as f64,
            )
        })
        .collect();
    family(
        e,
        "waystation_store_faults",
        "Storage faults survived (each logged at ERROR): read_error, corrupt_record, record_refused, cursor_not_saved, burst_refused",
        MetricType::Counter,
        &fault_counts,
    )?;
    counter(
        e,
        "waystation_session_record_full",
        "SUBSCRIBE filters refused (0x80) because the persistent session's record would outgrow its limit",
        st.session_record_full.load(Relaxed),
    )?;
    Ok(())
}

/// The durable log (what the bridges still have to forward) and the commit histograms.
pub fn encode_log(
    e: &mut DescriptorEncoder,
    st: &Stats,
    status: &BrokerStatus,
    now: u64,
) -> Result<(), std::fmt::Error> {
    if let Some(log) = &status.log {
        gauge(e, "waystation_log_messages", "Messages in the durable log: the slowest bridge's backlog plus forwarded entries not yet deleted (deleted in runs)", log.len as i64)?;
        gauge(
            e,
            "waystation_log_bytes",
            "Logical bytes in the durable log",
            log.bytes as i64,
        )?;
        let age = log
            .oldest_received_at_ms
            .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
        gauge_f(
            e,
            "waystation_log_oldest_age_seconds",
            "Age of the oldest message in the log",
            age,
        )?;
        gauge(
            e,
            "waystation_log_last_seq",
            "Sequence number of the newest log entry (grows by one per persisted message)",
            log.last_seq.unwrap_or(0) as i64,
        )?;
    }
    if let Some(d) = &status.durability {
        counter(
            e,
            "waystation_store_commits",
            "Group commits made durable",
            d.commits,
        )?;
    }
    histogram(
        e,
        "waystation_commit_batch_ops",
        "Operations per group commit",
        &snap!(st.commit_batch_ops()),
        1.0,
    )?;
    histogram(
        e,
        "waystation_commit_sync_seconds",
        "Time to make one group commit durable",
        &snap!(st.commit_sync_us()),
        1e6,
    )?;
    histogram(
        e,
        "waystation_forward_latency_seconds",
        "From the broker receiving a message to the upstream acknowledging it",
        &snap!(st.forward_latency_ms()),
        1e3,
    )?;
    Ok(())
}
