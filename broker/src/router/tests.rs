//! Router unit tests: commands in through `Router::handle`, packets out of the outboxes, no sockets.
use super::*;
use crate::stats::{StoreFault, STORE_FAULTS};
use crate::store::StoreConfig;

fn record(received_at_ms: u64) -> bytes::Bytes {
    StoredMessage {
        topic: "sensors/t".into(),
        payload: bytes::Bytes::from_static(b"21.5"),
        qos: 1,
        retain: false,
        received_at_ms,
        origin: "dev".into(),
    }
    .encode()
    .expect("encodes")
}

fn router_on(store: &Store, max_age: Duration) -> Router {
    let (ingest_paused, _) = watch::channel(false);
    let durable = Durable {
        store: store.clone(),
        bridges: Vec::new(),
        storage: StorageLimits {
            max_age: Some(max_age),
            ..StorageLimits::default()
        },
        ingest_paused,
    };
    let limits = SessionLimits {
        max_inflight: 10,
        max_queued: 10,
        max_queued_bytes: 1 << 20,
        max_subscriptions: 0,
    };
    Router::new(
        limits,
        Arc::new(Stats::default()),
        Some(durable),
        Arc::new(Mutex::new(RouterSnapshot::default())),
    )
}

fn connect(router: &mut Router, conn: ConnId, client_id: &str) -> crate::session::OutboxReceiver {
    let (outbox, rx) = Outbox::new();
    router.handle(RouterCmd::Connect {
        conn,
        request: ConnectRequest {
            client_id: client_id.into(),
            clean_session: true,
            keep_alive_secs: 60,
            will: None,
            username: None,
            peer: None,
            acl: None,
        },
        outbox: OutboxHandle(outbox),
    });
    router.end_burst();
    rx
}

fn drain(rx: &mut crate::session::OutboxReceiver) -> Vec<Outbound> {
    let mut out = Vec::new();
    while let Ok(p) = rx.rx.try_recv() {
        out.push(p);
    }
    out
}

// A burst the store refuses (here: shut down under it) acknowledges nothing: the QoS 2
// publisher gets its connection closed instead of a PUBREC, and its packet id is not
// left marked as received, so its resend is routed and stored rather than only answered
// with PUBREC (before, the receipt stayed marked and the resend was never stored).
#[test]
fn a_refused_burst_acks_nothing_and_forgets_its_qos2_receipts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(tmp.path().join("store"))).expect("open");
    let mut router = router_on(&store, Duration::from_secs(3600));
    let mut rx = connect(&mut router, 1, "dev");
    assert!(matches!(drain(&mut rx)[..], [Outbound::ConnAck(_)]));
    store.shutdown().expect("shutdown");
    let refused_before = STORE_FAULTS.count(StoreFault::BurstRefused);
    // Retained: it must be written, so the burst has something to submit.
    let message = Message::new("cfg/mode", &b"eco"[..], QoS::ExactlyOnce, true);
    router.handle(RouterCmd::Publish {
        conn: 1,
        pkid: 7,
        message,
    });
    router.end_burst();
    let sent = drain(&mut rx);
    assert!(matches!(sent[..], [Outbound::Close]), "{sent:?}");
    assert!(STORE_FAULTS.count(StoreFault::BurstRefused) > refused_before);
    let (_, session) = router.session_of(1).expect("still connected here");
    assert!(
        session.first_qos2_receipt(7),
        "the QoS 2 receipt of a burst that was not stored must be forgotten"
    );
}

// A retention scan that cannot read the log (here: the store is closed under it) used
// to stop without a word; it is now a counted, logged fault, and nothing is dropped.
#[test]
fn a_retention_scan_that_cannot_read_the_log_is_a_counted_fault() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(tmp.path().join("store"))).expect("open");
    let (ticket, _) = store
        .submit((0..10).map(|_| Op::Append(record(unix_ms()))).collect())
        .expect("submit");
    store
        .wait_durable(ticket, Duration::from_secs(10))
        .expect("durable");
    let mut router = router_on(&store, Duration::from_secs(3600));
    if let Some(durable) = router.durable.as_mut() {
        durable.storage.on_full = OnFull::DropOldest;
        durable.storage.max_bytes = 1;
    }
    store.shutdown().expect("shutdown");
    let before = STORE_FAULTS.count(StoreFault::ReadError);
    router.check_storage_limits();
    assert!(STORE_FAULTS.count(StoreFault::ReadError) > before);
    assert_eq!(router.stats.dropped_storage_full.load(Ordering::Relaxed), 0);
}

// A record that does not decode, met by the max_age scan, used to be deleted as if it had
// expired, silently. It is still dropped (no bridge could forward it), but logged and
// counted as a store fault; the expired records around it are counted as expired, and
// the fresh one after them is kept.
#[test]
fn max_age_scan_counts_an_undecodable_record_as_a_fault_not_as_expired() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(tmp.path().join("store"))).expect("open");
    let old = unix_ms() - 60_000;
    let (ticket, _) = store
        .submit(vec![
            Op::Append(record(old)),
            Op::Append(bytes::Bytes::from_static(b"\x07not a record")),
            Op::Append(record(old)),
            Op::Append(record(unix_ms() + 60_000)),
        ])
        .expect("submit");
    store
        .wait_durable(ticket, Duration::from_secs(10))
        .expect("durable");
    let faults_before = STORE_FAULTS.count(StoreFault::CorruptRecord);
    let mut router = router_on(&store, Duration::from_secs(1));
    router.expire_old_messages();
    assert_eq!(router.stats.dropped_expired.load(Ordering::Relaxed), 2);
    assert!(STORE_FAULTS.count(StoreFault::CorruptRecord) > faults_before);
    let (through, _) = router.pending_drop.expect("a delete was submitted");
    assert_eq!(through, 3, "the fresh record (seq 4) is kept");
}
