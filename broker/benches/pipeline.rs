//! The ingest pipeline's own cost per event (`crate::pipeline`): the event-v1 check (which
//! finds the event's id) and the router's whole decision (rule, check, dedup window), apart from
//! everything else a PUBLISH costs. Scenario 12b of scripts/bench.sh measures the whole
//! daemon with the pipeline on and off; this says how much of the difference is the
//! pipeline's code.
//!
//! `cargo bench -p waystation-broker --bench pipeline`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use waystation_broker::config::{DeadLetterLimits, DedupKey, PipelineRule, Schema, Validation};
use waystation_broker::message::{Message, QoS};
use waystation_broker::pipeline::event::validate_event_v1;
use waystation_broker::pipeline::Ingest;
use waystation_broker::store::{Store, StoreConfig};

/// 8 devices' events, as the firmware writes them (the shape scenario 12 publishes).
fn events() -> Vec<(String, Vec<u8>)> {
    (0..800u32)
        .map(|i| {
            let device = format!("dev-{:02}", i % 8);
            let payload = format!(
                r#"{{"v":1,"device":"{device}","boot":3,"seq":{},"sensor":"temp","value":{},"threshold":250,"direction":"rising","dropped":0}}"#,
                i / 8,
                200 + i % 100
            );
            (format!("sensors/{device}/events"), payload.into_bytes())
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(dir.path().join("store"))).expect("open store");
    let rule = PipelineRule {
        topics: "sensors/+/events".into(),
        validate: Some(Validation::Preset(Schema::EventV1)),
        dedup: Some(DedupKey::Preset(Schema::EventV1)),
        dedup_devices: 10_000,
    };
    let mut ingest =
        Ingest::load(&[rule], DeadLetterLimits::default(), &store, Arc::default()).expect("load");
    let events = events();
    let messages: Vec<Message> = events
        .iter()
        .map(|(topic, payload)| {
            Message::new(topic.as_str(), payload.clone(), QoS::AtLeastOnce, false)
        })
        .collect();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("validate event-v1 (and its id)", |b| {
        b.iter(|| {
            for (topic, payload) in &events {
                std::hint::black_box(validate_event_v1(topic, payload).is_ok());
            }
        })
    });
    let mut ops = Vec::new();
    // After the first pass every event is a resend: the window's lookup, not its growth.
    group.bench_function(
        "check: rule, validate, dedup window (flushed per 100)",
        |b| {
            b.iter(|| {
                for (i, message) in messages.iter().enumerate() {
                    std::hint::black_box(ingest.check(message, "c", 0, &mut ops));
                    if i % 100 == 99 {
                        ingest.flush(&mut ops);
                        ops.clear();
                    }
                }
            })
        },
    );
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
