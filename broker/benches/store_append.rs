//! Group-commit throughput: append batches of 100-byte records and wait until each batch is
//! durable (sled flush + fdatasync). Reports records/s.
//!
//! `cargo bench -p waystation-broker --bench store_append`. Measured on the 2-core dev VM:
//! batches of 64: ~116k records/s; batches of 256: ~197k records/s; 8 pipelined publishers
//! (one record per submit, 32 un-acked each): ~96k records/s.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use waystation_broker::store::{Op, Store, StoreConfig};

fn append_batches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(dir.path().join("store"))).expect("open store");
    let record = Bytes::from(vec![0x5a; 100]);
    let mut group = c.benchmark_group("store_append");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    for batch in [64usize, 256] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("records_100B_commit", batch),
            &batch,
            |b, &batch| {
                b.iter(|| {
                    let ops = (0..batch).map(|_| Op::Append(record.clone())).collect();
                    let (ticket, seqs) = store.submit(ops).expect("submit");
                    store
                        .wait_durable(ticket, Duration::from_secs(30))
                        .expect("durable");
                    // Keep the log from growing without bound across iterations.
                    let last = *seqs.last().expect("appended");
                    store
                        .submit(vec![Op::DeleteLogThrough(last)])
                        .expect("submit delete");
                })
            },
        );
    }
    group.finish();
    store.shutdown().expect("shutdown");
}

/// The broker's QoS 1 ingest shape: 8 publishers, one record per submit, each keeping up to 32
/// submits un-acked (its in-flight window); the group commit forms the batches.
fn pipelined_publishers(c: &mut Criterion) {
    const PUBLISHERS: usize = 8;
    const WINDOW: usize = 32;
    const PER_PUBLISHER: usize = 2_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(dir.path().join("store"))).expect("open store");
    let record = Bytes::from(vec![0x5a; 100]);
    let mut group = c.benchmark_group("store_ingest");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((PUBLISHERS * PER_PUBLISHER) as u64));
    group.bench_function("8_publishers_window_32_100B", |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                for _ in 0..PUBLISHERS {
                    s.spawn(|| {
                        let mut pending = std::collections::VecDeque::new();
                        for _ in 0..PER_PUBLISHER {
                            if pending.len() == WINDOW {
                                let t = pending.pop_front().expect("window");
                                store
                                    .wait_durable(t, Duration::from_secs(30))
                                    .expect("durable");
                            }
                            let (t, _) = store
                                .submit(vec![Op::Append(record.clone())])
                                .expect("submit");
                            pending.push_back(t);
                        }
                        if let Some(t) = pending.pop_back() {
                            store
                                .wait_durable(t, Duration::from_secs(30))
                                .expect("durable");
                        }
                    });
                }
            });
            let last = store.log_stats().last_seq.expect("appended");
            let (t, _) = store
                .submit(vec![Op::DeleteLogThrough(last)])
                .expect("delete");
            store
                .wait_durable(t, Duration::from_secs(30))
                .expect("durable");
        })
    });
    group.finish();
    let d = store.durability().borrow().clone();
    eprintln!(
        "ingest: {} commits in total, last batch {} ops",
        d.commits, d.last_batch_ops
    );
    store.shutdown().expect("shutdown");
}

criterion_group!(benches, append_batches, pipelined_publishers);
criterion_main!(benches);
