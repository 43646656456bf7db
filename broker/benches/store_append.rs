//! Group-commit throughput: append batches of 100-byte records and wait until each batch is
//! durable (sled flush + fdatasync). Reports records/s.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use waystation_broker::store::{Op, Store, StoreConfig};

fn append_batches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(dir.path().join("store"))).expect("open store");
    let record = Bytes::from(vec![0x5a; 100]);
    let mut group = c.benchmark_group("store_append");
    group.sample_size(20).measurement_time(Duration::from_secs(8));
    for batch in [64usize, 256] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("records_100B_commit", batch), &batch, |b, &batch| {
            b.iter(|| {
                let ops = (0..batch).map(|_| Op::Append(record.clone())).collect();
                let (ticket, seqs) = store.submit(ops).expect("submit");
                store.wait_durable(ticket, Duration::from_secs(30)).expect("durable");
                // Keep the log from growing without bound across iterations.
                let last = *seqs.last().expect("appended");
                store.submit(vec![Op::DeleteLogThrough(last)]).expect("submit delete");
            })
        });
    }
    group.finish();
    store.shutdown().expect("shutdown");
}

criterion_group!(benches, append_batches);
criterion_main!(benches);
