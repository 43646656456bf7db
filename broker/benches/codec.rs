//! Wire codec hot path: the broker's MQTT 3.1.1 adapter (src/v4.rs, private) decodes with
//! `rumqttc::mqttbytes::v4::Packet::read` and encodes with `Publish::write` / `PubAck::write`,
//! so those are measured here on the packets a sensor gateway sees most.
//!
//! `cargo bench -p waystation-broker --bench codec`.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;

const MAX: usize = 64 * 1024;

fn publish(payload: usize, qos: QoS) -> Publish {
    let mut p = Publish::from_bytes(
        "sensors/site1/dev-0042/temp",
        qos,
        Bytes::from(vec![0x5a; payload]),
    );
    if qos != QoS::AtMostOnce {
        p.pkid = 4242;
    }
    p
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("v4_decode");
    for (name, qos, size) in [
        ("publish_qos1", QoS::AtLeastOnce, 64),
        ("publish_qos0", QoS::AtMostOnce, 64),
        ("publish_qos1", QoS::AtLeastOnce, 1024),
    ] {
        let mut wire = BytesMut::new();
        publish(size, qos).write(&mut wire).expect("encode");
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new(name, size), &wire, |b, wire| {
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                Packet::read(&mut buf, MAX).expect("decode")
            })
        });
    }
    let mut wire = BytesMut::new();
    PubAck::new(4242).write(&mut wire).expect("encode");
    let wire = wire.freeze();
    group.bench_function("puback", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            Packet::read(&mut buf, MAX).expect("decode")
        })
    });
    // A read buffer holding 100 pipelined QoS 1 publishes of 64 B (one socket read's worth),
    // decoded until empty as the connection reader does.
    let mut wire = BytesMut::new();
    for _ in 0..100 {
        publish(64, QoS::AtLeastOnce)
            .write(&mut wire)
            .expect("encode");
    }
    let wire = wire.freeze();
    group.throughput(Throughput::Elements(100));
    group.bench_function("batch_100_publish_qos1_64B", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut n = 0;
            while !buf.is_empty() {
                if let Packet::Publish(p) = Packet::read(&mut buf, MAX).expect("decode") {
                    n += p.payload.len();
                }
            }
            n
        })
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("v4_encode");
    for (name, qos, size) in [
        ("publish_qos1", QoS::AtLeastOnce, 64),
        ("publish_qos1", QoS::AtLeastOnce, 1024),
    ] {
        let p = publish(size, qos);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new(name, size), &p, |b, p| {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            b.iter(|| {
                if buf.len() > 60 * 1024 {
                    buf.clear();
                }
                p.write(&mut buf).expect("encode")
            })
        });
    }
    group.bench_function("puback", |b| {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            if buf.len() > 60 * 1024 {
                buf.clear();
            }
            PubAck::new(std::hint::black_box(4242))
                .write(&mut buf)
                .expect("encode")
        })
    });
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
