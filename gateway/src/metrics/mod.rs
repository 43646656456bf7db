//! `/metrics`: the broker's counters and status in the Prometheus text format (0.0.4),
//! encoded by `prometheus-client`. Nothing is copied on the hot path: a [`Collector`] reads
//! the broker's atomic counters and its status snapshot at each scrape.
//!
//! Names: every metric starts with `waystation_`; counters end in `_total` (added by the
//! encoder); durations are in seconds. Per-bridge metrics carry a `bridge` label.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use waystation_broker::StatusHandle;

use crate::time::unix_ms;

// One file per part of the exposition, so no function or file grows past what a reader
// can hold; families.rs is the encoder vocabulary they share.
mod bridges;
mod broker;
mod families;
mod pipeline;

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

impl Collector for BrokerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.status.stats();
        let status = self.status.status();
        let now = unix_ms();
        // The order is the exposition order; scrapers do not care, people reading it do.
        broker::encode_connections(&mut e, st, &status, now)?;
        broker::encode_security(&mut e, st)?;
        broker::encode_sessions_and_messages(&mut e, st, &status)?;
        broker::encode_store(&mut e, st, &status)?;
        broker::encode_log(&mut e, st, &status, now)?;
        pipeline::encode_pipeline(&mut e, st)?;
        bridges::encode_bridge_links(&mut e, &status, now)?;
        bridges::encode_bridge_backlogs(&mut e, &status, now)?;
        bridges::encode_bridge_batches(&mut e, &status)?;
        Ok(())
    }
}
