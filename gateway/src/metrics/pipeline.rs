//! The ingest pipeline (`[[pipeline]]`) and the dead-letter store.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use waystation_broker::pipeline::event::InvalidReason;
use waystation_broker::Stats;

use super::families::{counter, family, gauge, Labels};

pub fn encode_pipeline(e: &mut DescriptorEncoder, st: &Stats) -> Result<(), std::fmt::Error> {
    counter(
        e,
        "waystation_pipeline_valid",
        "Messages a [[pipeline]] rule passed on to the log for forwarding",
        st.pipeline_valid.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_pipeline_duplicates",
        "Resent events (same device, boot and seq) not logged for forwarding again",
        st.pipeline_duplicates.load(Relaxed),
    )?;
    let invalid: Vec<(Labels, f64)> = InvalidReason::ALL
        .iter()
        .map(|r| {
            (
                vec![("reason", r.label().to_string())],
                st.pipeline_invalid[*r as usize].load(Relaxed) as f64,
            )
        })
        .collect();
    family(
        e,
        "waystation_pipeline_invalid",
        "Messages a [[pipeline]] rule refused (kept as dead letters), by reason",
        MetricType::Counter,
        &invalid,
    )?;
    gauge(
        e,
        "waystation_dead_letters",
        "Dead letters stored",
        st.dead_letters.load(Relaxed) as i64,
    )?;
    gauge(
        e,
        "waystation_dead_letter_bytes",
        "Bytes of dead letters stored",
        st.dead_letter_bytes.load(Relaxed) as i64,
    )?;
    counter(
        e,
        "waystation_dead_letters_evicted",
        "Dead letters deleted to stay within [dead_letter] max_bytes and max_age",
        st.dead_letters_evicted.load(Relaxed),
    )?;
    counter(
        e,
        "waystation_dead_letters_replayed",
        "Dead letters sent through the pipeline again and accepted",
        st.dead_letters_replayed.load(Relaxed),
    )
}
