//! The encoder vocabulary of `/metrics`: one constant counter or gauge, a labelled family,
//! a broker histogram. The section files (broker.rs, bridges.rs) speak only this, so the
//! `prometheus-client` details stay in one place.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

pub type Labels = Vec<(&'static str, String)>;

pub fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

pub fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

pub fn gauge_f(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

pub fn family(
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
pub fn histogram(
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
pub mod waystation_broker_histogram {
    pub struct Snapshot {
        pub bounds: &'static [u64],
        pub counts: Vec<u64>,
        pub sum: u64,
    }
}

macro_rules! snap {
    ($s:expr) => {{
        let s = $s;
        $crate::metrics::families::waystation_broker_histogram::Snapshot {
            bounds: s.bounds,
            counts: s.counts,
            sum: s.sum,
        }
    }};
}
pub(super) use snap;
