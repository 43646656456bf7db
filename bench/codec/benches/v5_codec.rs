//! Issue 13: MQTT 5 encode/decode, rumqttc 0.25 (`v5::mqttbytes::v5`) vs rmqtt-codec 0.3.
//!
//! One criterion group per (operation, case), holding both codecs, so each pair runs back
//! to back in the same run (the machine is small and shared: compare ratios, not absolutes).
//!
//! - `decode/<case>`: both codecs read the same wire bytes (rumqttc's encoding of the case)
//!   from a fresh `BytesMut` clone (setup, untimed); the decoded packet is dropped untimed.
//! - `encode/<case>`: an owned packet (each codec's own decoding of the wire bytes, cloned
//!   in setup, untimed) is written into one reused `BytesMut` (cleared each time).
//!   rmqtt-codec's `Encoder` takes the packet by value, so its drop is inside the timing;
//!   rumqttc's `write` takes `&self`, and the routine drops the owned packet too, so both
//!   include the drop.
//! - `encode_shared/<case>`: the broker fan-out shape, one packet written for many
//!   subscribers: rumqttc writes from `&Packet`; rmqtt-codec must clone it first (timed).
//!
//! Run: `cargo bench --bench v5_codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use waystation_codec_bench::{rmq, rumq, CASES};

fn decode(c: &mut Criterion) {
    for case in CASES {
        let wire = rumq::wire(case);
        // Both must decode the shared bytes, or the comparison means nothing.
        rumq::decode(&mut wire.clone()).expect("rumqttc decodes its own encoding");
        rmq::decode(&mut rmq::codec(), &mut wire.clone())
            .expect("rmqtt-codec decodes rumqttc's encoding")
            .expect("complete frame");

        let mut g = c.benchmark_group(format!("decode/{case}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("rumqttc", |b| {
            b.iter_batched(
                || wire.clone(),
                |mut buf| rumq::decode(black_box(&mut buf)).unwrap(),
                BatchSize::SmallInput,
            )
        });
        let mut codec = rmq::codec();
        g.bench_function("rmqtt", |b| {
            b.iter_batched(
                || wire.clone(),
                |mut buf| {
                    rmq::decode(&mut codec, black_box(&mut buf))
                        .unwrap()
                        .unwrap()
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

/// The packets to encode, as each codec decoded them from the shared wire bytes: what a
/// broker forwarding a received PUBLISH holds (rmqtt-codec's strings then share the read
/// buffer, rumqttc's property strings are owned `String`s), not `from_static` fixtures.
fn decoded(case: &str) -> (rumq::Packet, rmq::Packet) {
    let wire = rumq::wire(case);
    let a = rumq::decode(&mut wire.clone()).unwrap();
    let b = rmq::decode(&mut rmq::codec(), &mut wire.clone())
        .unwrap()
        .unwrap();
    assert_eq!(a, rumq::packet(case));
    assert_eq!(b, rmq::packet(case));
    (a, b)
}

fn encode(c: &mut Criterion) {
    for case in CASES {
        let (rumq_pkt, rmq_pkt) = decoded(case);
        let mut buf = BytesMut::with_capacity(4096);

        let mut g = c.benchmark_group(format!("encode/{case}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("rumqttc", |b| {
            b.iter_batched(
                || rumq_pkt.clone(),
                |p| {
                    buf.clear();
                    rumq::encode(black_box(&p), &mut buf).unwrap();
                    drop(p);
                },
                BatchSize::SmallInput,
            )
        });
        let mut codec = rmq::codec();
        g.bench_function("rmqtt", |b| {
            b.iter_batched(
                || rmq_pkt.clone(),
                |p| {
                    buf.clear();
                    rmq::encode(&mut codec, black_box(p), &mut buf).unwrap();
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

fn encode_shared(c: &mut Criterion) {
    for case in CASES {
        let (rumq_pkt, rmq_pkt) = decoded(case);
        let mut buf = BytesMut::with_capacity(4096);

        let mut g = c.benchmark_group(format!("encode_shared/{case}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("rumqttc", |b| {
            b.iter(|| {
                buf.clear();
                rumq::encode(black_box(&rumq_pkt), &mut buf).unwrap();
            })
        });
        let mut codec = rmq::codec();
        g.bench_function("rmqtt", |b| {
            b.iter(|| {
                buf.clear();
                rmq::encode(&mut codec, black_box(&rmq_pkt).clone(), &mut buf).unwrap();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, decode, encode, encode_shared);
criterion_main!(benches);
