//! Batch encoding, compression and cut points, decoded back with independent decoders
//! (serde_json, ruzstd's decoder, flate2's reader).
use std::io::Read as _;

use base64::Engine as _;
use serde_json::{json, Value};

use super::*;

fn rule(encoding: BatchEncoding, compress: Option<Compression>) -> ForwardRule {
    let mut rule = ForwardRule::new("sensors/#", "", 1);
    rule.batch = Some(BatchConfig {
        max_events: 3,
        max_ms: 1000,
        max_bytes: 64,
    });
    rule.batch_topic = Some("site1/events/batch".into());
    rule.encoding = Some(encoding);
    rule.compress = compress;
    rule
}

/// The events pushed, as one finished payload.
fn batch_of(spec: &BatchSpec, events: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = PendingBatch::new(0, spec, Instant::now());
    for (i, (topic, payload)) in events.iter().enumerate() {
        let e = event(topic, payload);
        b.push(spec, i as Seq + 1, topic.len() + payload.len(), &e);
    }
    b.finish(spec).expect("finish")
}

fn decompress(data: &[u8], how: Option<Compression>) -> Vec<u8> {
    let mut plain = Vec::new();
    match how {
        None => plain.extend_from_slice(data),
        Some(Compression::Zstd) => {
            ruzstd::decoding::StreamingDecoder::new(data)
                .expect("zstd frame")
                .read_to_end(&mut plain)
                .expect("zstd");
        }
        Some(Compression::Gzip) => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut plain)
                .expect("gzip");
        }
    }
    plain
}

/// The events of a finished payload, whatever its encoding.
fn decode(data: &[u8], encoding: BatchEncoding, how: Option<Compression>) -> Vec<Value> {
    let plain = decompress(data, how);
    match encoding {
        BatchEncoding::JsonArray => match serde_json::from_slice(&plain).expect("json") {
            Value::Array(events) => events,
            other => panic!("not an array: {other}"),
        },
        BatchEncoding::Ndjson => {
            assert!(plain.ends_with(b"\n"), "each event ends with \\n");
            plain
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).expect("one event per line"))
                .collect()
        }
    }
}

const SAMPLE: [(&str, &[u8]); 4] = [
    ("sensors/a", b"{\"t\": 21.5,\n \"s\": \"a b\\\"\\n\"}"),
    ("sensors/\"b\"", b"42"),
    ("sensors/c", b"not json"),
    ("sensors/d", b"\xff\x00\x01"),
];

fn expected() -> Vec<Value> {
    let b64 = |p: &[u8]| base64::engine::general_purpose::STANDARD.encode(p);
    vec![
        json!({"topic": "sensors/a", "payload": {"t": 21.5, "s": "a b\"\n"}}),
        json!({"topic": "sensors/\"b\"", "payload": 42}),
        json!({"topic": "sensors/c", "payload_base64": b64(b"not json")}),
        json!({"topic": "sensors/d", "payload_base64": b64(b"\xff\x00\x01")}),
    ]
}

#[test]
fn every_encoding_and_compression_round_trips() {
    for encoding in [BatchEncoding::JsonArray, BatchEncoding::Ndjson] {
        for how in [None, Some(Compression::Zstd), Some(Compression::Gzip)] {
            let r = rule(encoding, how);
            let spec = BatchSpec::of(&r).expect("batching rule");
            let payload = batch_of(&spec, &SAMPLE);
            assert_eq!(
                decode(&payload, encoding, how),
                expected(),
                "{encoding:?} {how:?}"
            );
        }
    }
}

#[test]
fn compression_makes_repetitive_batches_smaller() {
    let many: Vec<(&str, &[u8])> = (0..100)
        .map(|_| {
            (
                "sensors/room1/temperature",
                &b"{\"celsius\": 21.5, \"ok\": true}"[..],
            )
        })
        .collect();
    for how in [Some(Compression::Zstd), Some(Compression::Gzip)] {
        let r = rule(BatchEncoding::JsonArray, how);
        let mut spec = BatchSpec::of(&r).expect("batching rule");
        spec.limits.max_events = 100;
        let plain = batch_of(&spec, &many);
        let raw_len = decompress(&plain, how).len();
        assert!(
            plain.len() * 5 < raw_len,
            "{how:?}: {} of {raw_len}",
            plain.len()
        );
        assert_eq!(decode(&plain, BatchEncoding::JsonArray, how).len(), 100);
    }
}

#[test]
fn ndjson_is_one_line_per_event_even_for_pretty_printed_payloads() {
    let r = rule(BatchEncoding::Ndjson, None);
    let spec = BatchSpec::of(&r).expect("batching rule");
    let payload = batch_of(&spec, &SAMPLE[..2]);
    assert_eq!(payload.iter().filter(|b| **b == b'\n').count(), 2);
    // Whitespace inside strings is kept as it was.
    assert!(String::from_utf8_lossy(&payload).contains(r#""s":"a b\"\n""#));
}

#[test]
fn cut_points_max_events_and_max_bytes() {
    let r = rule(BatchEncoding::JsonArray, None);
    let spec = BatchSpec::of(&r).expect("batching rule");
    // max_events = 3: full at the third event.
    let mut b = PendingBatch::new(0, &spec, Instant::now());
    for seq in 1..=3 {
        assert!(!b.is_full(&spec));
        let e = event("s/t", b"1");
        assert!(b.fits(&spec, 4, e.len(), usize::MAX));
        b.push(&spec, seq, 4, &e);
    }
    assert!(b.is_full(&spec));
    assert_eq!((b.first_seq, b.last_seq, b.events), (1, 3, 3));
    // max_bytes = 64 of topic + payload: 40 fit, 40 more do not; a batch full at 64.
    let mut b = PendingBatch::new(0, &spec, Instant::now());
    let e = event("s/t", &[b'7'; 37]);
    assert!(b.fits(&spec, 40, e.len(), usize::MAX));
    b.push(&spec, 1, 40, &e);
    assert!(!b.is_full(&spec));
    assert!(!b.fits(&spec, 40, e.len(), usize::MAX), "64 bytes at most");
    assert!(b.fits(&spec, 24, e.len(), usize::MAX));
    b.push(&spec, 2, 24, &e);
    assert!(b.is_full(&spec), "exactly max_bytes");
    // An event larger than max_bytes goes alone in an empty batch.
    let b = PendingBatch::new(0, &spec, Instant::now());
    assert!(b.fits(&spec, 1000, 1100, usize::MAX));
    // The encoded cap (an upstream's maximum packet size) cuts too.
    let mut b = PendingBatch::new(0, &spec, Instant::now());
    b.push(&spec, 1, 4, &e);
    assert!(!b.fits(&spec, 4, e.len(), e.len() + 2));
    assert!(b.fits(&spec, 4, e.len(), 2 * e.len() + 3));
}

#[test]
fn topic_suffix_over_3_1_1_and_properties_over_5() {
    let r = rule(BatchEncoding::Ndjson, Some(Compression::Zstd));
    let spec = BatchSpec::of(&r).expect("batching rule");
    assert_eq!(spec.topic(false), "site1/events/batch/zstd");
    assert_eq!(spec.topic(true), "site1/events/batch");
    assert_eq!(spec.content_type(), "application/x-ndjson");
    assert_eq!(spec.content_encoding(), Some("zstd"));
    let r = rule(BatchEncoding::JsonArray, None);
    let spec = BatchSpec::of(&r).expect("batching rule");
    assert_eq!(spec.topic(false), "site1/events/batch");
    assert_eq!(spec.content_type(), "application/json");
    assert_eq!(spec.content_encoding(), None);
    assert!(BatchSpec::of(&ForwardRule::new("a/#", "", 1)).is_none());
}
