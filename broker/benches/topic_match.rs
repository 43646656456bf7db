//! Routing cost: `SubscriptionTable::for_each_match` against 10,000 subscriptions, the lookup
//! the router does for every accepted PUBLISH.
//!
//! `cargo bench -p waystation-broker --bench topic_match`. The table holds what a site
//! gateway sees: 9,000 exact device filters (`site/<s>/dev/<d>/<metric>`), 900 single-level
//! wildcards (`site/<s>/+/<d>/temp`), 90 multi-level wildcards (`site/<s>/dev/<d>/#`) and
//! 10 catch-alls (`#`, `site/#`, `sensors/#`, ...), each under its own client id.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use waystation_broker::message::QoS;
use waystation_broker::topic::{ClientKey, SubscriptionTable};

fn table_10k() -> SubscriptionTable {
    let mut t = SubscriptionTable::default();
    let metrics = [
        "temp", "hum", "co2", "pm25", "volt", "rssi", "door", "motion", "lux",
    ];
    let mut n = 0usize;
    let mut add = |t: &mut SubscriptionTable, filter: String| {
        let client: ClientKey = Arc::from(format!("client-{n}"));
        t.insert(
            &filter,
            client,
            if n % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            },
        );
        n += 1;
    };
    for i in 0..9_000 {
        add(
            &mut t,
            format!("site/{}/dev/{}/{}", i % 10, i / 9, metrics[i % 9]),
        );
    }
    for i in 0..900 {
        add(&mut t, format!("site/{}/+/{}/temp", i % 10, i));
    }
    for i in 0..90 {
        add(&mut t, format!("site/{}/dev/{}/#", i % 10, i * 7));
    }
    for f in [
        "#",
        "site/#",
        "sensors/#",
        "site/+/dev/+/temp",
        "+/+/+/+/+",
        "site/3/#",
        "alerts/#",
        "site/+/dev/7/+",
        "$SYS/#",
        "+/1/#",
    ] {
        add(&mut t, f.to_string());
    }
    assert_eq!(t.len(), 10_000);
    t
}

fn matching(c: &mut Criterion) {
    let table = table_10k();
    let mut group = c.benchmark_group("topic_match_10k_subscriptions");
    group.throughput(Throughput::Elements(1));
    // (topic, what it exercises)
    let topics = [
        ("site/3/dev/7/temp", "exact + every wildcard kind"),
        ("site/9/dev/999/lux", "exact + catch-alls"),
        ("sensors/17/temp", "only sensors/# and #"),
        ("nobody/listens/here", "one catch-all (#)"),
        ("$SYS/broker/load", "$-topic: wildcards at the root skipped"),
    ];
    for (topic, _what) in topics {
        let mut found = 0usize;
        table.for_each_match(topic, |_, _| found += 1);
        group.bench_with_input(
            BenchmarkId::new(format!("{found}_matches"), topic),
            topic,
            |b, topic| {
                b.iter(|| {
                    let mut n = 0usize;
                    table.for_each_match(std::hint::black_box(topic), |_, q| {
                        n += q.qos as usize + 1
                    });
                    n
                })
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("topic_table_build");
    group.sample_size(20);
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("insert_10k", |b| b.iter(table_10k));
    group.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
