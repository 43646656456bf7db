//! `/metrics`: the broker's counters and status in the Prometheus text format (0.0.4),
//! encoded by `prometheus-client`. Nothing is copied on the hot path: a [`Collector`] reads
//! the broker's atomic counters and its status snapshot at each scrape.
//!
//! Names: every metric starts with `waystation_`; counters end in `_total` (added by the
//! encoder); durations are in seconds. Per-bridge metrics carry a `bridge` label.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use waystation_broker::StatusHandle;

use crate::time::unix_ms;

/// Content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry with the broker collector in it.
pub fn registry(status: StatusHandle) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BrokerCollector { status }));
    registry
}

/// Encodes every metric of `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

struct BrokerCollector {
    status: StatusHandle,
}

impl std::fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn gauge_f(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    rows: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, metric_type)?;
    for (labels, v) in rows {
        let f = m.encode_family(labels)?;
        match metric_type {
            MetricType::Counter => ConstCounter::new(*v as u64).encode(f)?,
            _ => ConstGauge::new(*v).encode(f)?,
        }
    }
    Ok(())
}

/// A broker histogram, its integer unit divided by `divisor` (e.g. 1e6 for µs → s).
fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    snap: &waystation_broker_histogram::Snapshot,
    divisor: f64,
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let mut buckets: Vec<(f64, u64)> = snap
        .bounds
        .iter()
        .map(|b| *b as f64 / divisor)
        .zip(snap.counts.iter().copied())
        .collect();
    buckets.push((f64::INFINITY, snap.counts.last().copied().unwrap_or(0)));
    let count = snap.counts.iter().sum();
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        snap.sum as f64 / divisor,
        count,
        &buckets,
        None,
    )
}

/// The broker's histogram snapshot type is not nameable from here, so it is copied.
mod waystation_broker_histogram {
    pub struct Snapshot {
        pub bounds: &'static [u64],
        pub counts: Vec<u64>,
        pub sum: u64,
    }
}

macro_rules! snap {
    ($s:expr) => {{
        let s = $s;
        waystation_broker_histogram::Snapshot {
            bounds: s.bounds,
            counts: s.counts,
            sum: s.sum,
        }
    }};
}

impl Collector for BrokerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.status.stats();
        let status = self.status.status();
        let now = unix_ms();
        let qos_rows = |a: &[std::sync::atomic::AtomicU64; 3]| -> Vec<(Labels, f64)> {
            (0..3)
                .map(|q| (vec![("qos", q.to_string())], a[q].load(Relaxed) as f64))
                .collect()
        };

        gauge_f(
            &mut e,
            "waystation_uptime_seconds",
            "Seconds since the broker started",
            now.saturating_sub(status.started_at_ms) as f64 / 1000.0,
        )?;
        gauge(
            &mut e,
            "waystation_connections",
            "MQTT connections open now",
            st.connections.load(Relaxed) as i64,
        )?;
        counter(
            &mut e,
            "waystation_connections",
            "MQTT connections accepted",
            st.connections_total.load(Relaxed),
        )?;
        counter(
            &mut e,
            "waystation_connections_refused",
            "Connections refused at max_connections",
            st.refused_connections.load(Relaxed),
        )?;
        counter(
            &mut e,
            "waystation_protocol_errors",
            "Connections closed for a protocol violation",
            st.protocol_errors.load(Relaxed),
        )?;
        // Security: authentication, ACL and per-client limits (docs/security.md).
        counter(
            &mut e,
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
            &mut e,
            "waystation_acl_denied",
            "Publishes, subscriptions and deliveries refused by the ACL",
            MetricType::Counter,
            &acl,
        )?;
        counter(
            &mut e,
            "waystation_publish_rate_exceeded",
            "Connections closed for exceeding max_publish_rate",
            st.publish_rate_exceeded.load(Relaxed),
        )?;
        counter(
            &mut e,
            "waystation_limit_refusals",
            "Topics and filters refused by max_topic_length/levels and max_subscriptions",
            st.limit_refusals.load(Relaxed),
        )?;
        counter(
            &mut e,
            "waystation_connection_rate_refused",
            "Connections closed at accept by max_connection_rate",
            st.connection_rate_refused.load(Relaxed),
        )?;
        counter(
            &mut e,
            "waystation_connect_timeouts",
            "Connections closed for no CONNECT within connect_timeout",
            st.connect_timeouts.load(Relaxed),
        )?;
        counter(
            &mut e,
            "waystation_closed_before_connect",
            "TCP connections closed before sending anything (port probes, health checks); not protocol errors",
            st.closed_before_connect.load(Relaxed),
        )?;
        counter(
            &mut e,
            "waystation_keep_alive_timeouts",
            "Connections closed for silence over 1.5x the keep-alive",
            st.keep_alive_timeouts.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "waystation_clients_connected",
            "Clients past CONNECT",
            status.router.clients.len() as i64,
        )?;
        gauge(
            &mut e,
            "waystation_sessions",
            "Sessions (connected and offline persistent)",
            status.router.sessions as i64,
        )?;
        gauge(
            &mut e,
            "waystation_sessions_offline",
            "Offline persistent sessions",
            status.router.offline_sessions as i64,
        )?;
        gauge(
            &mut e,
            "waystation_session_queued_messages",
            "QoS 1/2 messages waiting in sessions",
            status.router.queued_messages as i64,
        )?;
        gauge(
            &mut e,
            "waystation_subscriptions",
            "Subscriptions",
            status.router.subscriptions as i64,
        )?;
        gauge(
            &mut e,
            "waystation_retained_messages",
            "Retained messages",
            status.router.retained as i64,
        )?;
        gauge(
            &mut e,
            "waystation_pending_acks",
            "Acknowledgements waiting for the disk",
            status.router.pending_acks as i64,
        )?;
        let received = crate::sys::received_by_qos(st);
        let received: Vec<(Labels, f64)> = (0..3)
            .map(|q| (vec![("qos", q.to_string())], received[q] as f64))
            .collect();
        family(
            &mut e,
            "waystation_messages_received",
            "PUBLISH packets received from clients and bridges, by QoS",
            MetricType::Counter,
            &received,
        )?;
        family(
            &mut e,
            "waystation_messages_sent",
            "PUBLISH packets sent to clients, by QoS",
            MetricType::Counter,
            &qos_rows(&st.messages_sent),
        )?;
        counter(
            &mut e,
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
        ]
        .iter()
        .map(|(r, c)| (vec![("reason", r.to_string())], c.load(Relaxed) as f64))
        .collect();
        family(
            &mut e,
            "waystation_messages_dropped",
            "Messages dropped, by reason",
            MetricType::Counter,
            &dropped,
        )?;

        // The durable log (what the bridges still have to forward).
        let storage_ok = status.router.storage_error.is_none()
            && status.durability.as_ref().is_none_or(|d| d.error.is_none());
        gauge(
            &mut e,
            "waystation_storage_ok",
            "1 while the last commit succeeded",
            i64::from(storage_ok),
        )?;
        gauge(
            &mut e,
            "waystation_storage_full",
            "1 while on_full = reject_new holds publishers back",
            i64::from(status.router.storage_full),
        )?;
        let moved_aside = status
            .recovery
            .as_ref()
            .is_some_and(|r| r.moved_aside.is_some());
        gauge(
            &mut e,
            "waystation_store_moved_aside",
            "1 when the store was corrupt at start-up and was moved aside (alert on it)",
            i64::from(moved_aside),
        )?;
        if let Some(pending) = status.pending_bytes {
            gauge(
                &mut e,
                "waystation_store_pending_bytes",
                "Bytes submitted to the store and not yet durable (publishers pause over storage.max_pending_bytes)",
                pending as i64,
            )?;
        }
        gauge(
            &mut e,
            "waystation_ingest_paused",
            "1 while publishers are not read from (writes pending over max_pending_bytes, store full or failing)",
            st.ingest_paused.load(Relaxed) as i64,
        )?;
        counter(
            &mut e,
            "waystation_ingest_pauses",
            "Times publishers were paused because more than storage.max_pending_bytes waited for the disk",
            st.ingest_pauses.load(Relaxed),
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
            &mut e,
            "waystation_store_faults",
            "Storage faults survived (each logged at ERROR): read_error, corrupt_record, record_refused, cursor_not_saved, burst_refused",
            MetricType::Counter,
            &fault_counts,
        )?;
        counter(
            &mut e,
            "waystation_session_record_full",
            "SUBSCRIBE filters refused (0x80) because the persistent session's record would outgrow its limit",
            st.session_record_full.load(Relaxed),
        )?;
        if let Some(log) = &status.log {
            gauge(&mut e, "waystation_log_messages", "Messages in the durable log: the slowest bridge's backlog plus forwarded entries not yet deleted (deleted in runs)", log.len as i64)?;
            gauge(
                &mut e,
                "waystation_log_bytes",
                "Logical bytes in the durable log",
                log.bytes as i64,
            )?;
            let age = log
                .oldest_received_at_ms
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            gauge_f(
                &mut e,
                "waystation_log_oldest_age_seconds",
                "Age of the oldest message in the log",
                age,
            )?;
            gauge(
                &mut e,
                "waystation_log_last_seq",
                "Sequence number of the newest log entry (grows by one per persisted message)",
                log.last_seq.unwrap_or(0) as i64,
            )?;
        }
        if let Some(d) = &status.durability {
            counter(
                &mut e,
                "waystation_store_commits",
                "Group commits made durable",
                d.commits,
            )?;
        }
        histogram(
            &mut e,
            "waystation_commit_batch_ops",
            "Operations per group commit",
            &snap!(st.commit_batch_ops()),
            1.0,
        )?;
        histogram(
            &mut e,
            "waystation_commit_sync_seconds",
            "Time to make one group commit durable",
            &snap!(st.commit_sync_us()),
            1e6,
        )?;
        histogram(
            &mut e,
            "waystation_forward_latency_seconds",
            "From the broker receiving a message to the upstream acknowledging it",
            &snap!(st.forward_latency_ms()),
            1e3,
        )?;

        // Bridges.
        let last_seq = status.log.as_ref().and_then(|l| l.last_seq).unwrap_or(0);
        let b = |f: &dyn Fn(&waystation_broker::BridgeStatus) -> f64| -> Vec<(Labels, f64)> {
            status
                .bridges
                .iter()
                .map(|x| (vec![("bridge", x.name.clone())], f(x)))
                .collect()
        };
        family(
            &mut e,
            "waystation_bridge_connected",
            "1 while the upstream connection is up",
            MetricType::Gauge,
            &b(&|x| f64::from(u8::from(x.connected))),
        )?;
        family(
            &mut e,
            "waystation_bridge_forwarded",
            "Messages acknowledged by the upstream",
            MetricType::Counter,
            &b(&|x| x.forwarded as f64),
        )?;
        family(
            &mut e,
            "waystation_bridge_received",
            "Messages received from the upstream (commands)",
            MetricType::Counter,
            &b(&|x| x.received as f64),
        )?;
        family(
            &mut e,
            "waystation_bridge_reconnects",
            "Upstream connections lost",
            MetricType::Counter,
            &b(&|x| x.reconnects as f64),
        )?;
        family(
            &mut e,
            "waystation_bridge_connect_attempts",
            "Upstream connection attempts started",
            MetricType::Counter,
            &b(&|x| x.connect_attempts as f64),
        )?;
        let failures: Vec<(Labels, f64)> = status
            .bridges
            .iter()
            .flat_map(|x| {
                waystation_broker::bridge::LinkError::REASONS
                    .iter()
                    .chain(["config", "store", "shutdown"].iter())
                    .map(move |reason| {
                        (
                            vec![("bridge", x.name.clone()), ("reason", reason.to_string())],
                            x.failures.get(reason).copied().unwrap_or(0) as f64,
                        )
                    })
            })
            .collect();
        family(
            &mut e,
            "waystation_bridge_connection_failures",
            "Upstream connections lost or attempts failed, by reason",
            MetricType::Counter,
            &failures,
        )?;
        family(
            &mut e,
            "waystation_bridge_down_seconds",
            "How long the upstream link has been down (0 while connected)",
            MetricType::Gauge,
            &b(&|x| {
                x.down_since_ms
                    .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0)
            }),
        )?;
        family(
            &mut e,
            "waystation_bridge_sent_bytes",
            "Bytes written to the upstream, MQTT framing and TLS included",
            MetricType::Counter,
            &b(&|x| x.wire.bytes_sent.load(std::sync::atomic::Ordering::Relaxed) as f64),
        )?;
        family(
            &mut e,
            "waystation_bridge_received_bytes",
            "Bytes read from the upstream",
            MetricType::Counter,
            &b(&|x| {
                x.wire
                    .bytes_received
                    .load(std::sync::atomic::Ordering::Relaxed) as f64
            }),
        )?;
        family(
            &mut e,
            "waystation_bridge_inflight",
            "Messages sent upstream, not yet acknowledged",
            MetricType::Gauge,
            &b(&|x| x.inflight as f64),
        )?;
        family(
            &mut e,
            "waystation_bridge_backlog_messages",
            "Log entries after the bridge's cursor (waiting to be forwarded)",
            MetricType::Gauge,
            &b(&|x| last_seq.saturating_sub(x.cursor) as f64),
        )?;
        // The log is shared: its bytes and oldest age are the slowest bridge's backlog.
        let min_cursor = status.bridges.iter().map(|x| x.cursor).min();
        let (log_bytes, oldest) = status.log.as_ref().map_or((0, 0.0), |l| {
            (
                l.bytes,
                l.oldest_received_at_ms
                    .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
            )
        });
        let slowest = |x: &waystation_broker::BridgeStatus| {
            Some(x.cursor) == min_cursor && x.cursor < last_seq
        };
        family(
            &mut e,
            "waystation_bridge_backlog_bytes",
            "Logical bytes waiting for the bridge (the log's bytes for the slowest bridge, else 0)",
            MetricType::Gauge,
            &b(&|x| if slowest(x) { log_bytes as f64 } else { 0.0 }),
        )?;
        family(
            &mut e,
            "waystation_bridge_backlog_oldest_age_seconds",
            "Age of the oldest message waiting for the bridge (slowest bridge; else 0)",
            MetricType::Gauge,
            &b(&|x| if slowest(x) { oldest } else { 0.0 }),
        )?;
        Ok(())
    }
}
