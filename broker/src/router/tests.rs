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
        properties: None,
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

fn connect(router: &mut Router, conn: ConnId, client_id: &str) -> crate::outbox::OutboxReceiver {
    let (outbox, rx) = Outbox::new();
    connect_on(router, conn, client_id, true, outbox);
    rx
}

/// CONNECT on `conn` with the given clean_session flag, answered through `outbox` (which
/// may be shared by several connections, to see one order across them); ends the burst.
fn connect_on(router: &mut Router, conn: ConnId, client_id: &str, clean: bool, outbox: Outbox) {
    router.handle(RouterCmd::Connect {
        conn,
        request: Box::new(ConnectRequest {
            client_id: client_id.into(),
            version: crate::protocol::Version::V4,
            clean_start: clean,
            session_expiry: if clean {
                0
            } else {
                crate::protocol::inbound::SESSION_NEVER_EXPIRES
            },
            receive_maximum: u16::MAX,
            max_packet_size: None,
            keep_alive_secs: 60,
            will: None,
            will_delay: 0,
            username: None,
            peer: None,
            acl: None,
        }),
        outbox: OutboxHandle(outbox),
    });
    router.end_burst();
}

fn drain(rx: &mut crate::outbox::OutboxReceiver) -> Vec<Outbound> {
    let mut out = Vec::new();
    while let Some(p) = rx.try_recv() {
        out.push(p);
    }
    out
}

fn open_store(tmp: &tempfile::TempDir) -> Store {
    Store::open(StoreConfig::new(tmp.path().join("store")))
        .expect("open")
        .0
}

fn publish(router: &mut Router, conn: ConnId, pkid: u16, topic: &str, payload: &str, qos: QoS) {
    router.handle(RouterCmd::Publish {
        conn,
        pkid,
        message: Message::new(topic, payload.to_string(), qos, false),
    });
}

fn publish_retained(router: &mut Router, conn: ConnId, pkid: u16, topic: &str, payload: &str) {
    router.handle(RouterCmd::Publish {
        conn,
        pkid,
        message: Message::new(topic, payload.to_string(), QoS::AtLeastOnce, true),
    });
}

fn subscribe(router: &mut Router, conn: ConnId, pkid: u16, filter: &str, qos: QoS) {
    router.handle(RouterCmd::Subscribe {
        conn,
        pkid,
        filters: vec![SubscribeFilter {
            filter: filter.into(),
            requested: Ok(crate::protocol::message::SubscriptionOptions::qos(qos)),
        }],
    });
}

/// The ticket the last waiting ack is queued behind.
fn last_pending_ticket(router: &Router) -> Ticket {
    router.pending_acks.back().expect("an ack is waiting").0
}

/// Waits (bounded) until the store has made durable everything the waiting acks depend
/// on and tells the router, as its run loop does on a durability update, submitting what
/// released SUBACKs wrote and repeating for that.
fn settle(router: &mut Router, store: &Store) {
    for _ in 0..10 {
        let Some((ticket, _)) = router.pending_acks.back() else {
            return;
        };
        let ticket = *ticket;
        store
            .wait_durable(ticket, Duration::from_secs(10))
            .expect("durable in time");
        router.on_durable(Durability {
            durable_through: ticket,
            ..Durability::default()
        });
        while !router.batch_ops.is_empty() {
            router.end_burst();
        }
    }
    panic!("acks still waiting after 10 rounds of durability updates");
}

/// One packet as a short string, so whole sequences can be compared with `assert_eq!`.
fn show(packet: &Outbound) -> String {
    match packet {
        Outbound::Publish { pkid, message, dup } => format!(
            "Publish({pkid} {} {:?} q{}{}{})",
            message.topic,
            String::from_utf8_lossy(&message.payload),
            message.qos as u8,
            if message.retain { " retain" } else { "" },
            if *dup { " dup" } else { "" },
        ),
        Outbound::PubAckNoSubscribers {
            pkid,
            qos: QoS::AtLeastOnce,
        } => format!("PubAck({pkid}) 0x10"),
        other => format!("{other:?}"),
    }
}

/// What the connection behind `rx` has been sent since the last call.
fn packets(rx: &mut crate::outbox::OutboxReceiver) -> Vec<String> {
    drain(rx).iter().map(show).collect()
}

const CONNACK_NEW: &str = "ConnAck(Accepted { session_present: false })";
const CONNACK_PRESENT: &str = "ConnAck(Accepted { session_present: true })";

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
    assert!(matches!(sent[..], [Outbound::Close(_)]), "{sent:?}");
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

// PUBACKs wait for the store to report their burst durable and leave in the order the
// PUBLISHes arrived, across clients and bursts: those of the second burst (including one
// that wrote nothing, in a third burst) stay behind the first burst's until the router
// hears that the second burst is durable too, even if the disk already has it.
#[test]
fn qos1_pubacks_wait_for_durability_and_keep_arrival_order_across_bursts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    // One outbox for both connections: its receiver sees the order acks are released in.
    let (outbox, mut rx) = Outbox::new();
    connect_on(&mut router, 1, "a", true, outbox.clone());
    connect_on(&mut router, 2, "b", true, outbox);
    assert_eq!(packets(&mut rx), [CONNACK_NEW, CONNACK_NEW]);

    // Burst 1: retained messages are written; "n/a" writes nothing but is behind them.
    publish_retained(&mut router, 1, 1, "r/a", "a1");
    publish_retained(&mut router, 2, 10, "r/b", "b10");
    publish(&mut router, 1, 2, "n/a", "a2", QoS::AtLeastOnce);
    router.end_burst();
    let first = last_pending_ticket(&router);
    assert_eq!(
        packets(&mut rx),
        Vec::<String>::new(),
        "no PUBACK before durable"
    );

    // Burst 2, written; burst 3 writes nothing but must wait behind burst 2.
    publish_retained(&mut router, 2, 11, "r/b", "b11");
    publish_retained(&mut router, 1, 3, "r/a", "a3");
    router.end_burst();
    let second = last_pending_ticket(&router);
    assert!(second > first, "the second burst has its own ticket");
    publish(&mut router, 1, 4, "n/a", "a4", QoS::AtLeastOnce);
    router.end_burst();
    assert_eq!(last_pending_ticket(&router), second);
    assert_eq!(router.pending_acks.len(), 6);
    assert_eq!(
        packets(&mut rx),
        Vec::<String>::new(),
        "no PUBACK before durable"
    );

    // On disk already, but the router has not been told: still nothing.
    store
        .wait_durable(second, Duration::from_secs(10))
        .expect("durable in time");
    assert_eq!(packets(&mut rx), Vec::<String>::new());

    router.on_durable(Durability {
        durable_through: first,
        ..Durability::default()
    });
    assert_eq!(
        packets(&mut rx),
        ["PubAck(1) 0x10", "PubAck(10) 0x10", "PubAck(2) 0x10"],
        "only the first burst, in arrival order"
    );
    router.on_durable(Durability {
        durable_through: second,
        ..Durability::default()
    });
    assert_eq!(
        packets(&mut rx),
        ["PubAck(11) 0x10", "PubAck(3) 0x10", "PubAck(4) 0x10"]
    );
    assert!(router.pending_acks.is_empty());
}

// A QoS 2 PUBLISH resent before PUBREL (before or after its PUBREC) is answered with PUBREC
// again, in its turn, but routed and written once: the subscriber gets one copy and its
// persistent queue holds one entry. After PUBREL (answered with PUBCOMP) the packet id is
// free, and a new PUBLISH with it is a new message.
#[test]
fn qos2_resend_before_pubrel_is_pubrecd_again_but_stored_and_routed_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let mut publisher = connect(&mut router, 1, "pub");
    // Persistent: every message it is owed is written to its queue in the store.
    let (outbox, mut sub) = Outbox::new();
    connect_on(&mut router, 2, "sub", false, outbox);
    subscribe(&mut router, 2, 1, "q/#", QoS::ExactlyOnce);
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher), [CONNACK_NEW]);
    assert_eq!(
        packets(&mut sub),
        [
            CONNACK_NEW,
            "SubAck { pkid: 1, granted: [Ok(ExactlyOnce)] }"
        ]
    );
    let queued = |store: &Store| {
        store
            .scan(Keyspace::SessionQueue, &persist::queue_prefix("sub"))
            .expect("scan")
            .len()
    };

    publish(&mut router, 1, 5, "q/x", "once", QoS::ExactlyOnce);
    router.end_burst();
    assert_eq!(
        packets(&mut publisher),
        Vec::<String>::new(),
        "PUBREC waits"
    );
    assert_eq!(packets(&mut sub), ["Publish(1 q/x \"once\" q2)"]);
    // Resent while its PUBREC is still waiting for the disk.
    publish(&mut router, 1, 5, "q/x", "once", QoS::ExactlyOnce);
    router.end_burst();
    assert_eq!(
        packets(&mut publisher),
        Vec::<String>::new(),
        "PUBREC waits"
    );
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher), ["PubRec(5)", "PubRec(5)"]);
    // Resent after its PUBREC, before PUBREL.
    publish(&mut router, 1, 5, "q/x", "once", QoS::ExactlyOnce);
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher), ["PubRec(5)"]);
    assert_eq!(packets(&mut sub), Vec::<String>::new(), "routed once");
    assert_eq!(queued(&store), 1, "written to the subscriber's queue once");

    router.handle(RouterCmd::PubRel { conn: 1, pkid: 5 });
    router.end_burst();
    assert_eq!(packets(&mut publisher), ["PubComp(5)"]);
    // The id is free again: the same id now carries a new message.
    publish(&mut router, 1, 5, "q/x", "next", QoS::ExactlyOnce);
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher), ["PubRec(5)"]);
    assert_eq!(packets(&mut sub), ["Publish(2 q/x \"next\" q2)"]);
    assert_eq!(queued(&store), 2);
}

// A second CONNECT with the same client id takes the session over: the old connection is
// told to close (and what it sends on its way out, up to its Disconnected, is ignored), the
// new one gets CONNACK with session present, and the subscriptions of the persistent
// session deliver to the new connection only.
#[test]
fn takeover_closes_the_old_connection_and_the_session_continues_on_the_new_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let mut publisher = connect(&mut router, 3, "p");
    let (outbox, mut old) = Outbox::new();
    connect_on(&mut router, 1, "a", false, outbox);
    subscribe(&mut router, 1, 1, "t/#", QoS::AtLeastOnce);
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher), [CONNACK_NEW]);
    assert_eq!(
        packets(&mut old),
        [
            CONNACK_NEW,
            "SubAck { pkid: 1, granted: [Ok(AtLeastOnce)] }"
        ]
    );

    let (outbox, mut new) = Outbox::new();
    connect_on(&mut router, 2, "a", false, outbox);
    settle(&mut router, &store);
    assert_eq!(packets(&mut old), ["Close(SessionTakenOver)"]);
    assert_eq!(packets(&mut new), [CONNACK_PRESENT]);
    // The old connection's last words, then its end: no answer, and no effect on "a".
    router.handle(RouterCmd::Ping { conn: 1 });
    router.handle(RouterCmd::Disconnected {
        conn: 1,
        graceful: false,
        session_expiry: None,
        tell: None,
    });
    router.end_burst();
    assert!(router.session_of(1).is_none());
    let (_, session) = router
        .session_of(2)
        .expect("the session lives on connection 2");
    assert_eq!(
        session.subscriptions.get("t/#"),
        Some(&QoS::AtLeastOnce.into()),
        "the subscription came along"
    );

    publish(&mut router, 3, 7, "t/x", "after", QoS::AtLeastOnce);
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher), ["PubAck(7)"]);
    assert_eq!(packets(&mut new), ["Publish(1 t/x \"after\" q1)"]);
    assert_eq!(packets(&mut old), Vec::<String>::new());
}

// A retained message replaces the one before it on its topic: a new subscriber gets exactly
// the latest, with the retain flag, right behind its SUBACK (which waits for its session
// record). An empty retained payload is delivered to live subscribers as usual and
// clears the topic, in memory and in the store: a later subscriber gets nothing retained.
#[test]
fn a_new_subscriber_gets_only_the_latest_retained_message_and_none_once_cleared() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let mut publisher = connect(&mut router, 1, "p");
    assert_eq!(packets(&mut publisher), [CONNACK_NEW]);
    publish_retained(&mut router, 1, 1, "cfg/t", "v1");
    router.end_burst();
    settle(&mut router, &store);
    publish_retained(&mut router, 1, 2, "cfg/t", "v2");
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(
        packets(&mut publisher),
        ["PubAck(1) 0x10", "PubAck(2) 0x10"],
        "nobody subscribed yet: MQTT 5 says 0x10"
    );
    let stored = store
        .get(Keyspace::Retained, b"cfg/t")
        .expect("get")
        .expect("retained message stored");
    let stored = StoredMessage::decode(&bytes::Bytes::from(stored)).expect("decodes");
    assert_eq!(&stored.payload[..], b"v2");

    let (outbox, mut sub) = Outbox::new();
    connect_on(&mut router, 2, "s", false, outbox);
    settle(&mut router, &store);
    assert_eq!(packets(&mut sub), [CONNACK_NEW]);
    subscribe(&mut router, 2, 4, "cfg/t", QoS::AtLeastOnce);
    router.end_burst();
    assert_eq!(packets(&mut sub), Vec::<String>::new(), "SUBACK waits");
    settle(&mut router, &store);
    assert_eq!(
        packets(&mut sub),
        [
            "SubAck { pkid: 4, granted: [Ok(AtLeastOnce)] }",
            "Publish(1 cfg/t \"v2\" q1 retain)"
        ]
    );

    publish_retained(&mut router, 1, 3, "cfg/t", "");
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher), ["PubAck(3)"]);
    assert_eq!(packets(&mut sub), ["Publish(2 cfg/t \"\" q1)"]);
    assert_eq!(store.get(Keyspace::Retained, b"cfg/t").expect("get"), None);

    let mut late = connect(&mut router, 3, "late");
    subscribe(&mut router, 3, 5, "cfg/t", QoS::AtLeastOnce);
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(
        packets(&mut late),
        [
            CONNACK_NEW,
            "SubAck { pkid: 5, granted: [Ok(AtLeastOnce)] }"
        ]
    );
}

fn subscribe_with(
    router: &mut Router,
    conn: ConnId,
    pkid: u16,
    filter: &str,
    options: crate::protocol::message::SubscriptionOptions,
) {
    router.handle(RouterCmd::Subscribe {
        conn,
        pkid,
        filters: vec![SubscribeFilter {
            filter: filter.into(),
            requested: Ok(options),
        }],
    });
}

// MQTT 5 subscription options: no local (a client's own messages are not sent back to the
// same client id), retain as published (the live message keeps RETAIN 1), and retain
// handling (1: retained messages only for a new subscription, 2: never).
#[test]
fn subscription_options_no_local_retain_as_published_and_retain_handling() {
    use crate::protocol::message::SubscriptionOptions;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let mut a = connect(&mut router, 1, "a");
    let mut b = connect(&mut router, 2, "b");
    publish_retained(&mut router, 2, 1, "r/x", "old");
    router.end_burst();
    settle(&mut router, &store);
    let options = |no_local, retain_as_published, retain_handling| SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local,
        retain_as_published,
        retain_handling,
        subscription_id: None,
    };
    // a: no local on t/#, retain as published and handling 1 on r/#.
    subscribe_with(&mut router, 1, 2, "t/#", options(true, false, 0));
    subscribe_with(&mut router, 1, 3, "r/#", options(false, true, 1));
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(
        packets(&mut a)[1..],
        [
            "SubAck { pkid: 2, granted: [Ok(AtLeastOnce)] }",
            "SubAck { pkid: 3, granted: [Ok(AtLeastOnce)] }",
            "Publish(1 r/x \"old\" q1 retain)"
        ]
    );
    // Subscribing again to r/# with handling 1: not new, so no retained message.
    subscribe_with(&mut router, 1, 4, "r/#", options(false, true, 1));
    // b: handling 2 on r/#: never the retained message.
    subscribe_with(&mut router, 2, 5, "r/#", options(false, false, 2));
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(
        packets(&mut a),
        ["SubAck { pkid: 4, granted: [Ok(AtLeastOnce)] }"]
    );
    assert_eq!(
        packets(&mut b)[1..],
        [
            "PubAck(1) 0x10",
            "SubAck { pkid: 5, granted: [Ok(AtLeastOnce)] }"
        ]
    );
    // a publishes on t/1 (its own no-local subscription) and a retained r/y.
    publish(&mut router, 1, 5, "t/1", "mine", QoS::AtLeastOnce);
    publish_retained(&mut router, 1, 6, "r/y", "new");
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(
        packets(&mut a),
        ["Publish(2 r/y \"new\" q1 retain)", "PubAck(5)", "PubAck(6)"],
        "no t/1 for its publisher; r/y keeps RETAIN (retain as published); acks wait for the disk"
    );
    // b gets r/y with RETAIN 0 (not retain as published).
    assert_eq!(packets(&mut b), ["Publish(1 r/y \"new\" q1)"]);
}

// MQTT 5 message expiry and maximum packet size: an expired message is never delivered
// (counted), and one larger than the client accepts is dropped for that client alone.
#[test]
fn expired_and_oversized_messages_are_dropped_and_counted() {
    use crate::protocol::message::MessageProperties;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let (outbox, mut small) = Outbox::new();
    router.handle(RouterCmd::Connect {
        conn: 1,
        request: Box::new(ConnectRequest {
            client_id: "small".into(),
            version: crate::protocol::Version::V5,
            clean_start: true,
            session_expiry: 0,
            receive_maximum: 10,
            max_packet_size: Some(64),
            keep_alive_secs: 60,
            will: None,
            will_delay: 0,
            username: None,
            peer: None,
            acl: None,
        }),
        outbox: OutboxHandle(outbox),
    });
    let mut big = connect(&mut router, 2, "big");
    subscribe(&mut router, 1, 1, "m/#", QoS::AtLeastOnce);
    subscribe(&mut router, 2, 1, "m/#", QoS::AtLeastOnce);
    router.end_burst();
    settle(&mut router, &store);
    drain(&mut small);
    drain(&mut big);
    let with_expiry = |payload: &str, expires_at_ms| {
        let mut m = Message::new("m/1", payload.to_string(), QoS::AtLeastOnce, false);
        m.properties = Some(Arc::new(MessageProperties {
            message_expiry_interval: Some(1),
            expires_at_ms: Some(expires_at_ms),
            ..MessageProperties::default()
        }));
        m
    };
    let now = unix_ms();
    router.handle(RouterCmd::Inject {
        message: with_expiry("gone", now - 1),
        origin_bridge: None,
        accepted: None,
    });
    router.handle(RouterCmd::Inject {
        message: with_expiry(&"x".repeat(100), now + 60_000),
        origin_bridge: None,
        accepted: None,
    });
    router.handle(RouterCmd::Inject {
        message: with_expiry("fits", now + 60_000),
        origin_bridge: None,
        accepted: None,
    });
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut small), ["Publish(1 m/1 \"fits\" q1)"]);
    let to_big = packets(&mut big);
    assert_eq!(to_big.len(), 2, "{to_big:?}");
    assert_eq!(to_big[1], "Publish(2 m/1 \"fits\" q1)");
    assert_eq!(
        router.stats.dropped_message_expiry.load(Ordering::Relaxed),
        2
    );
    assert_eq!(router.stats.dropped_too_large.load(Ordering::Relaxed), 1);
}

// `$share/{group}/{filter}`: each message to one member, in turn, connected members first;
// with every member away, a persistent one queues it; no retained message on subscribing.
#[test]
fn shared_subscriptions_give_each_message_to_one_member() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let mut publisher = connect(&mut router, 1, "p");
    publish_retained(&mut router, 1, 1, "jobs/old", "retained");
    let (outbox, mut w1) = Outbox::new();
    connect_on(&mut router, 2, "w1", false, outbox);
    let mut w2 = connect(&mut router, 3, "w2");
    subscribe(&mut router, 2, 1, "$share/g/jobs/#", QoS::AtLeastOnce);
    subscribe(&mut router, 3, 1, "$share/g/jobs/#", QoS::AtLeastOnce);
    router.end_burst();
    settle(&mut router, &store);
    drain(&mut publisher);
    assert_eq!(
        packets(&mut w1)[1..],
        ["SubAck { pkid: 1, granted: [Ok(AtLeastOnce)] }"],
        "no retained message for a shared subscription"
    );
    drain(&mut w2);
    for (i, job) in ["j1", "j2", "j3", "j4"].iter().enumerate() {
        publish(
            &mut router,
            1,
            10 + i as u16,
            "jobs/a",
            job,
            QoS::AtLeastOnce,
        );
    }
    router.end_burst();
    settle(&mut router, &store);
    let (to_w1, to_w2) = (packets(&mut w1), packets(&mut w2));
    assert_eq!(to_w1.len() + to_w2.len(), 4, "{to_w1:?} {to_w2:?}");
    assert_eq!(to_w1.len(), 2, "turns alternate: {to_w1:?} {to_w2:?}");
    // Both away: w2's session ends with it, w1 (persistent) queues for the group.
    for conn in [2, 3] {
        router.handle(RouterCmd::Disconnected {
            conn,
            graceful: true,
            session_expiry: None,
            tell: None,
        });
    }
    publish(&mut router, 1, 20, "jobs/b", "queued", QoS::AtLeastOnce);
    router.end_burst();
    settle(&mut router, &store);
    assert_eq!(packets(&mut publisher).len(), 5);
    let (outbox, mut back) = Outbox::new();
    connect_on(&mut router, 4, "w1", false, outbox);
    settle(&mut router, &store);
    let got = packets(&mut back);
    assert!(
        got.iter().any(|p| p.contains("queued")),
        "the persistent member gets what came while the group was away: {got:?}"
    );
}

// MQTT 5 subscription identifiers: every matching subscription's identifier goes with the
// one copy a client gets, also for a retained message sent at subscribe; a client without
// one gets the message's own properties.
#[test]
fn subscription_identifiers_go_with_each_copy() {
    use crate::protocol::message::SubscriptionOptions;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let mut publisher = connect(&mut router, 1, "p");
    publish_retained(&mut router, 1, 1, "s/r", "kept");
    let mut a = connect(&mut router, 2, "a");
    let with_id = |id| SubscriptionOptions {
        subscription_id: Some(id),
        ..SubscriptionOptions::qos(QoS::AtLeastOnce)
    };
    subscribe_with(&mut router, 2, 1, "s/#", with_id(7));
    subscribe_with(&mut router, 2, 2, "s/+", with_id(9));
    router.end_burst();
    settle(&mut router, &store);
    drain(&mut publisher);
    let ids_of = |packets: Vec<Outbound>| -> Vec<Vec<u32>> {
        packets
            .into_iter()
            .filter_map(|p| match p {
                Outbound::Publish { message, .. } => Some(
                    message
                        .properties
                        .map(|p| p.subscription_ids.clone())
                        .unwrap_or_default(),
                ),
                _ => None,
            })
            .collect()
    };
    // The retained s/r at each SUBSCRIBE, with that subscription's identifier.
    assert_eq!(ids_of(drain(&mut a)), vec![vec![7], vec![9]]);
    publish(&mut router, 1, 2, "s/x", "live", QoS::AtLeastOnce);
    router.end_burst();
    settle(&mut router, &store);
    let mut got = ids_of(drain(&mut a));
    got[0].sort();
    assert_eq!(got, vec![vec![7, 9]]);
}

// A connection the broker ends for what its client sent (a bad packet right behind the
// CONNECT) tells an MQTT 5 client why only after its CONNACK, also when that CONNACK waits
// for a new persistent session's record to be durable [MQTT-3.2.0-1].
#[test]
fn the_disconnect_telling_why_waits_behind_a_held_connack() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let (outbox, mut rx) = Outbox::new();
    connect_on(&mut router, 1, "persistent", false, outbox);
    router.handle(RouterCmd::Disconnected {
        conn: 1,
        graceful: false,
        session_expiry: None,
        tell: Some(CloseReason::MalformedPacket),
    });
    router.end_burst();
    assert_eq!(
        packets(&mut rx),
        Vec::<String>::new(),
        "CONNACK held for the disk"
    );
    settle(&mut router, &store);
    assert_eq!(packets(&mut rx), [CONNACK_NEW, "Close(MalformedPacket)"]);
}

// The ingest pipeline inside the router: a resend is acknowledged but not logged again, a
// refused message is acknowledged and kept as a dead letter; a replay keeps a letter whose
// topic no bridge forwards any more (deleting it would lose an acknowledged message), and
// a purge deletes it durably.
#[test]
fn pipeline_dedups_dead_letters_and_replay_keeps_what_no_bridge_takes() {
    use super::commands::DeadLetterAction;
    use crate::config::{DeadLetterLimits, DedupKey, PipelineRule, Schema, Validation};
    use tokio::sync::oneshot;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp);
    let mut router = router_on(&store, Duration::from_secs(3600));
    let forward = |filter: &str| {
        vec![ForwardRoute {
            name: "cloud".into(),
            filters: vec![filter.into()],
        }]
    };
    router.durable.as_mut().expect("durable").bridges = forward("sensors/#");
    let rule = PipelineRule {
        topics: "sensors/+/events".into(),
        validate: Some(Validation::Preset(Schema::EventV1)),
        dedup: Some(DedupKey::Preset(Schema::EventV1)),
        dedup_devices: 10,
    };
    let ingest = Ingest::load(
        &[rule],
        DeadLetterLimits::default(),
        &store,
        router.stats.clone(),
    )
    .expect("load");
    router.set_pipeline(ingest);
    let mut rx = connect(&mut router, 1, "dev");
    drain(&mut rx);
    let event = r#"{"v":1,"device":"dev","boot":1,"seq":5,"sensor":"t","value":1,"threshold":2,"direction":"rising"}"#;
    publish(
        &mut router,
        1,
        1,
        "sensors/dev/events",
        event,
        QoS::AtLeastOnce,
    );
    publish(
        &mut router,
        1,
        2,
        "sensors/dev/events",
        event,
        QoS::AtLeastOnce,
    );
    publish(
        &mut router,
        1,
        3,
        "sensors/dev/events",
        "{}",
        QoS::AtLeastOnce,
    );
    router.end_burst();
    settle(&mut router, &store);
    let acks = drain(&mut rx);
    assert_eq!(
        acks.iter()
            .filter(|p| matches!(p, Outbound::PubAck(_)))
            .count(),
        3,
        "{acks:?}"
    );
    assert_eq!(store.log_stats().len, 1, "the resend is not logged again");
    let id = {
        let ingest = router.pipeline.as_ref().expect("pipeline");
        assert_eq!(ingest.dead_letters.count(), 1);
        ingest.dead_letters.ids().next().expect("a dead letter")
    };
    router.durable.as_mut().expect("durable").bridges = forward("other/#");
    let (reply, mut answer) = oneshot::channel();
    router.handle(RouterCmd::DeadLetters {
        action: DeadLetterAction::Replay(vec![id, 999]),
        reply,
    });
    let outcome = answer.try_recv().expect("answered at once");
    assert_eq!((outcome.replayed, outcome.kept, outcome.missing), (0, 1, 1));
    assert_eq!(
        router.pipeline.as_ref().map(|p| p.dead_letters.count()),
        Some(1)
    );
    let (reply, mut answer) = oneshot::channel();
    router.handle(RouterCmd::DeadLetters {
        action: DeadLetterAction::Purge(vec![id]),
        reply,
    });
    let mut outcome = answer.try_recv().expect("answered at once");
    assert_eq!(outcome.purged, 1);
    router.end_burst();
    settle(&mut router, &store);
    assert!(outcome.durable.try_recv().is_ok(), "answered once durable");
    assert!(store
        .scan(Keyspace::DeadLetter, b"")
        .expect("scan")
        .is_empty());
}
