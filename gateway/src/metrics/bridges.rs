//! `/metrics`, per bridge: the upstream link, its traffic and its backlog, each family
//! labelled with the bridge's name.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use waystation_broker::status::BrokerStatus;
use waystation_broker::BridgeStatus;

use super::families::{family, Labels};

/// One row per bridge, labelled with its name.
fn per_bridge(status: &BrokerStatus, f: &dyn Fn(&BridgeStatus) -> f64) -> Vec<(Labels, f64)> {
    status
        .bridges
        .iter()
        .map(|x| (vec![("bridge", x.name.clone())], f(x)))
        .collect()
}

/// Per bridge: the upstream link and its traffic.
pub fn encode_bridge_links(
    e: &mut DescriptorEncoder,
    status: &BrokerStatus,
    now: u64,
) -> Result<(), std::fmt::Error> {
    // Bridges.
    let b = |f: &dyn Fn(&BridgeStatus) -> f64| per_bridge(status, f);
    family(
        e,
        "waystation_bridge_connected",
        "1 while the upstream connection is up",
        MetricType::Gauge,
        &b(&|x| f64::from(u8::from(x.connected))),
    )?;
    family(
        e,
        "waystation_bridge_forwarded",
        "Messages acknowledged by the upstream",
        MetricType::Counter,
        &b(&|x| x.forwarded as f64),
    )?;
    family(
        e,
        "waystation_bridge_received",
        "Messages received from the upstream (commands)",
        MetricType::Counter,
        &b(&|x| x.received as f64),
    )?;
    family(
        e,
        "waystation_bridge_reconnects",
        "Upstream connections lost",
        MetricType::Counter,
        &b(&|x| x.reconnects as f64),
    )?;
    family(
        e,
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
        e,
        "waystation_bridge_connection_failures",
        "Upstream connections lost or attempts failed, by reason",
        MetricType::Counter,
        &failures,
    )?;
    family(
        e,
        "waystation_bridge_down_seconds",
        "How long the upstream link has been down (0 while connected)",
        MetricType::Gauge,
        &b(&|x| {
            x.down_since_ms
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0)
        }),
    )?;
    family(
        e,
        "waystation_bridge_sent_bytes",
        "Bytes written to the upstream, MQTT framing and TLS included",
        MetricType::Counter,
        &b(&|x| x.wire.bytes_sent.load(Relaxed) as f64),
    )?;
    family(
        e,
        "waystation_bridge_received_bytes",
        "Bytes read from the upstream",
        MetricType::Counter,
        &b(&|x| x.wire.bytes_received.load(Relaxed) as f64),
    )?;
    Ok(())
}

/// Per bridge: what waits to be forwarded.
pub fn encode_bridge_backlogs(
    e: &mut DescriptorEncoder,
    status: &BrokerStatus,
    now: u64,
) -> Result<(), std::fmt::Error> {
    let b = |f: &dyn Fn(&BridgeStatus) -> f64| per_bridge(status, f);
    let last_seq = status.log.as_ref().and_then(|l| l.last_seq).unwrap_or(0);
    family(
        e,
        "waystation_bridge_inflight",
        "Messages sent upstream, not yet acknowledged",
        MetricType::Gauge,
        &b(&|x| x.inflight as f64),
    )?;
    family(
        e,
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
    let slowest = |x: &BridgeStatus| Some(x.cursor) == min_cursor && x.cursor < last_seq;
    family(
        e,
        "waystation_bridge_backlog_bytes",
        "Logical bytes waiting for the bridge (the log's bytes for the slowest bridge, else 0)",
        MetricType::Gauge,
        &b(&|x| if slowest(x) { log_bytes as f64 } else { 0.0 }),
    )?;
    family(
        e,
        "waystation_bridge_backlog_oldest_age_seconds",
        "Age of the oldest message waiting for the bridge (slowest bridge; else 0)",
        MetricType::Gauge,
        &b(&|x| if slowest(x) { oldest } else { 0.0 }),
    )?;
    Ok(())
}

/// Per bridge: batch PUBLISHes (forward rules with `batch`); bytes saved is input - output.
pub fn encode_bridge_batches(
    e: &mut DescriptorEncoder,
    status: &BrokerStatus,
) -> Result<(), std::fmt::Error> {
    let b = |f: &dyn Fn(&BridgeStatus) -> f64| per_bridge(status, f);
    let rows: [(&str, &str, fn(&BridgeStatus) -> u64); 4] = [
        (
            "waystation_pipeline_batches",
            "Batch PUBLISHes sent upstream",
            |x| x.batches.batches.load(Relaxed),
        ),
        (
            "waystation_pipeline_batched_events",
            "Events packed into batches",
            |x| x.batches.events.load(Relaxed),
        ),
        (
            "waystation_pipeline_batch_input_bytes",
            "Topic and payload bytes of the batched events",
            |x| x.batches.input_bytes.load(Relaxed),
        ),
        (
            "waystation_pipeline_batch_output_bytes",
            "Batch PUBLISH payload bytes after encoding and compression",
            |x| x.batches.output_bytes.load(Relaxed),
        ),
    ];
    for (name, help, value) in rows {
        family(e, name, help, MetricType::Counter, &b(&|x| value(x) as f64))?;
    }
    Ok(())
}
