//! `$SYS/broker/...` topics in Mosquitto's style, published (QoS 0) every `sys_interval`
//! seconds through the broker's internal publisher. Subscribers see them with
//! `mosquitto_sub -t '$SYS/#' -v` (a `#` filter alone does not match `$` topics).
//!
//! Unlike Mosquitto's they are not retained: a retained message is written to disk, and a
//! dozen fsyncs every interval for statistics would wear a Pi's SD card for nothing. A new
//! subscriber gets the values at the next interval.
//!
//! The broker counts these publishes as received QoS 0 messages; [`published`] says how many
//! there were, so the figures shown to people (here, `/metrics`, the dashboard) leave them out.

static PUBLISHED: AtomicU64 = AtomicU64::new(0);

/// `$SYS` messages published so far (counted by the broker as received QoS 0 messages).
pub fn published() -> u64 {
    PUBLISHED.load(Relaxed)
}

/// Messages received from clients and bridges, by QoS, without our own `$SYS` publishes.
pub fn received_by_qos(stats: &waystation_broker::Stats) -> [u64; 3] {
    let r = &stats.messages_received;
    [
        r[0].load(Relaxed).saturating_sub(published()),
        r[1].load(Relaxed),
        r[2].load(Relaxed),
    ]
}

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use waystation_broker::message::{Message, QoS};
use waystation_broker::{InternalPublisher, Shutdown, StatusHandle};

use crate::time::unix_ms;

/// The `(topic, value)` pairs of one round.
pub fn topics(handle: &StatusHandle) -> Vec<(String, String)> {
    let s = handle.status();
    let st = handle.stats();
    let sum =
        |a: &[std::sync::atomic::AtomicU64; 3]| a.iter().map(|c| c.load(Relaxed)).sum::<u64>();
    let uptime = unix_ms().saturating_sub(s.started_at_ms) / 1000;
    let mut t = vec![
        (
            "version".to_string(),
            format!("waystation version {}", env!("CARGO_PKG_VERSION")),
        ),
        ("uptime".into(), format!("{uptime} seconds")),
        (
            "clients/connected".into(),
            s.router.clients.len().to_string(),
        ),
        ("clients/total".into(), s.router.sessions.to_string()),
        (
            "clients/disconnected".into(),
            s.router.offline_sessions.to_string(),
        ),
        (
            "messages/received".into(),
            received_by_qos(st).iter().sum::<u64>().to_string(),
        ),
        ("messages/sent".into(), sum(&st.messages_sent).to_string()),
        (
            "load/bytes/received".into(),
            st.bytes_received.load(Relaxed).to_string(),
        ),
        (
            "subscriptions/count".into(),
            s.router.subscriptions.to_string(),
        ),
        (
            "retained messages/count".into(),
            s.router.retained.to_string(),
        ),
        (
            "store/messages".into(),
            s.log.as_ref().map_or(0, |l| l.len).to_string(),
        ),
        (
            "store/bytes".into(),
            s.log.as_ref().map_or(0, |l| l.bytes).to_string(),
        ),
    ];
    let last_seq = s.log.as_ref().and_then(|l| l.last_seq).unwrap_or(0);
    for b in &s.bridges {
        t.push((
            format!("bridges/{}/connected", b.name),
            u8::from(b.connected).to_string(),
        ));
        t.push((
            format!("bridges/{}/forwarded", b.name),
            b.forwarded.to_string(),
        ));
        t.push((
            format!("bridges/{}/backlog", b.name),
            last_seq.saturating_sub(b.cursor).to_string(),
        ));
    }
    t.into_iter()
        .map(|(k, v)| (format!("$SYS/broker/{k}"), v))
        .collect()
}

/// Publishes every `interval` until `shutdown` is signalled (then drops the publisher, so the
/// broker's shutdown need not wait for it).
pub async fn run(
    publisher: InternalPublisher,
    handle: StatusHandle,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.signalled() => return,
        }
        for (topic, value) in topics(&handle) {
            let message = Message::new(topic, value.into_bytes(), QoS::AtMostOnce, false);
            PUBLISHED.fetch_add(1, Relaxed);
            if publisher.publish(message).await.is_err() {
                return;
            }
        }
    }
}
