//! The drop paths and the window's limits, driven through `fill_window`, `resume` and
//! `resend_deferred` with a real store and no network.
use std::time::Duration;

use serde::de::value::{Error, MapDeserializer};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::*;
use crate::bridge::wire::UpstreamLimits;
use crate::bridge::{BridgeConfig, Cursors, ForwardRule};
use crate::protocol::message::MessageProperties;
use crate::store::{Op, Store, StoreConfig};

struct Fixture {
    bridge: Bridge,
    _tmp: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(StoreConfig::new(tmp.path().join("store"))).expect("open");
    let mut config = BridgeConfig::deserialize(MapDeserializer::<_, Error>::new(
        [("name", "cloud"), ("address", "127.0.0.1:1")].into_iter(),
    ))
    .expect("config");
    config
        .forward
        .push(ForwardRule::new("sensors/#", "site1/", 1));
    let (router, _router_rx) = mpsc::channel(1);
    let bridge = Bridge {
        config,
        client_id: "gw-cloud".into(),
        index: 0,
        store,
        cursors: Cursors::new(vec![0], 0),
        router,
        status: Default::default(),
        shutdown: crate::shutdown::Shutdown::new(),
        stats: Default::default(),
    };
    Fixture { bridge, _tmp: tmp }
}

/// Appends records (payload length, expiry interval, received this long ago) to the log.
fn append(store: &Store, records: &[(usize, Option<u32>, u64)]) {
    let ops = records
        .iter()
        .map(|(len, expiry, age_ms)| {
            let record = StoredMessage {
                topic: "sensors/t".into(),
                payload: Bytes::from(vec![b'x'; *len]),
                qos: 1,
                retain: false,
                received_at_ms: unix_ms() - age_ms,
                origin: "dev".into(),
                properties: expiry.map(|secs| MessageProperties {
                    message_expiry_interval: Some(secs),
                    ..MessageProperties::default()
                }),
            };
            Op::Append(record.encode().expect("encode"))
        })
        .collect();
    let (ticket, _) = store.submit(ops).expect("submit");
    store
        .wait_durable(ticket, Duration::from_secs(5))
        .expect("durable");
}

fn ack(window: &mut Window, seq: Seq) {
    let pkid = window
        .by_pkid
        .iter()
        .find(|(_, s)| **s == seq)
        .map(|(p, _)| *p)
        .expect("in flight");
    window.by_pkid.remove(&pkid);
    let i = window
        .sent
        .binary_search_by_key(&seq, |s| s.seq)
        .expect("in window");
    window.sent[i].acked = true;
}

#[test]
fn expired_and_too_large_messages_are_counted_drops_the_cursor_moves_over_in_order() {
    let f = fixture();
    let b = &f.bridge;
    // 1: fine, 2: too large, 3: expired (10 s expiry, received 11 s ago), 4: fine.
    append(
        &b.store,
        &[
            (10, None, 0),
            (500, None, 0),
            (10, Some(10), 11_000),
            (10, Some(60), 0),
        ],
    );
    let limits = UpstreamLimits {
        max_packet_size: Some(200),
        ..UpstreamLimits::default()
    };
    let mut encoder = Encoder::new(5, &limits);
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    let sent = b
        .fill_window(
            &mut window,
            &mut out,
            &mut encoder,
            10,
            &mut None,
            "bridge:cloud",
        )
        .expect("fill");
    assert_eq!(sent, 2, "1 and 4 go up");
    assert_eq!(b.stats.dropped_too_large.load(Relaxed), 1);
    assert_eq!(b.stats.dropped_message_expiry.load(Relaxed), 1);
    assert_eq!(window.unacked(), 2);
    // Nothing is done before 1 is acknowledged: the drops behind it do not move the cursor.
    assert_eq!(window.advance(), 0);
    ack(&mut window, 4);
    assert_eq!(window.advance(), 0, "1 still unacknowledged");
    assert_eq!(window.cursor, 0);
    ack(&mut window, 1);
    assert_eq!(window.advance(), 4);
    assert_eq!(window.cursor, 4);
}

#[test]
fn an_mqtt_3_1_1_bridge_never_forwards_an_expired_message_either() {
    let f = fixture();
    let b = &f.bridge;
    append(&b.store, &[(10, Some(1), 5_000), (10, None, 5_000)]);
    let mut encoder = Encoder::new(4, &UpstreamLimits::default());
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    let sent = b
        .fill_window(
            &mut window,
            &mut out,
            &mut encoder,
            10,
            &mut None,
            "bridge:cloud",
        )
        .expect("fill");
    assert_eq!(sent, 1);
    assert_eq!(b.stats.dropped_message_expiry.load(Relaxed), 1);
    assert_eq!(
        window.by_pkid.values().copied().collect::<Vec<_>>(),
        vec![2]
    );
}

#[test]
fn a_reconnect_under_a_lower_receive_maximum_resends_in_order_as_room_comes() {
    let f = fixture();
    let b = &f.bridge;
    append(&b.store, &[(10, None, 0); 5]);
    let mut encoder = Encoder::new(5, &UpstreamLimits::default());
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    let sent = b
        .fill_window(
            &mut window,
            &mut out,
            &mut encoder,
            10,
            &mut None,
            "bridge:cloud",
        )
        .expect("fill");
    assert_eq!(sent, 5);
    // The link drops with all 5 unacknowledged; the new upstream takes 2 at a time.
    let mut out = BytesMut::new();
    let mut encoder = Encoder::new(5, &UpstreamLimits::default());
    b.resume(&mut window, &mut out, &mut encoder, 2)
        .expect("resume");
    assert_eq!(
        window.deferred.iter().copied().collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(window.on_the_wire(), 2);
    // Nothing new, and no deferred one, while 2 are on the wire.
    append(&b.store, &[(10, None, 0)]);
    let mut later = BytesMut::new();
    let sent = b
        .fill_window(
            &mut window,
            &mut later,
            &mut encoder,
            2,
            &mut None,
            "bridge:cloud",
        )
        .expect("fill");
    assert_eq!((sent, later.len()), (0, 0));
    ack(&mut window, 1);
    let sent = b
        .fill_window(
            &mut window,
            &mut later,
            &mut encoder,
            2,
            &mut None,
            "bridge:cloud",
        )
        .expect("fill");
    assert_eq!(sent, 0, "the deferred go first");
    assert_eq!(
        window.deferred.iter().copied().collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert_eq!(window.on_the_wire(), 2);
    let mut codec = rmqtt_codec::v5::Codec::new(0, 0);
    use tokio_util::codec::Decoder as _;
    match codec.decode(&mut later) {
        Ok(Some((rmqtt_codec::v5::Packet::Publish(p), _))) => {
            assert!(p.dup, "sent again");
            assert_eq!(
                &*p.topic, "site1/sensors/t",
                "the new connection's alias is set again"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unacknowledged_message_that_expires_before_the_reconnect_is_given_up() {
    let f = fixture();
    let b = &f.bridge;
    append(&b.store, &[(10, Some(2), 1_500), (10, None, 0)]);
    let mut encoder = Encoder::new(4, &UpstreamLimits::default());
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    let sent = b
        .fill_window(
            &mut window,
            &mut out,
            &mut encoder,
            10,
            &mut None,
            "bridge:cloud",
        )
        .expect("fill");
    assert_eq!(sent, 2);
    window.keep_frames(&out.split().freeze());
    std::thread::sleep(Duration::from_millis(600));
    let mut out = BytesMut::new();
    b.resume(&mut window, &mut out, &mut encoder, 10)
        .expect("resume");
    assert_eq!(b.stats.dropped_message_expiry.load(Relaxed), 1);
    assert_eq!(
        window.by_pkid.values().copied().collect::<Vec<_>>(),
        vec![2]
    );
    ack(&mut window, 2);
    assert_eq!(window.advance(), 2);
}

/// Appends records on `topics` (payload `{"n":<i>}`) to the log.
fn append_on(store: &Store, topics: &[&str]) {
    let ops = topics
        .iter()
        .enumerate()
        .map(|(i, topic)| {
            let record = StoredMessage {
                topic: (*topic).into(),
                payload: Bytes::from(format!("{{\"n\":{i}}}")),
                qos: 1,
                retain: false,
                received_at_ms: unix_ms(),
                origin: "dev".into(),
                properties: None,
            };
            Op::Append(record.encode().expect("encode"))
        })
        .collect();
    let (ticket, _) = store.submit(ops).expect("submit");
    store
        .wait_durable(ticket, Duration::from_secs(5))
        .expect("durable");
}

/// `sensors/#` batched (3 events, json-array) to `site1/batch`; `alarms/#` one by one.
fn batching_fixture() -> Fixture {
    let mut f = fixture();
    let rule = &mut f.bridge.config.forward[0];
    rule.batch = Some(crate::config::bridge::BatchConfig {
        max_events: 3,
        max_ms: 60_000,
        max_bytes: 1 << 20,
    });
    rule.batch_topic = Some("site1/batch".into());
    f.bridge
        .config
        .forward
        .push(ForwardRule::new("alarms/#", "site1/", 1));
    f
}

/// The v4 PUBLISHes in `bytes`: (topic, payload, pkid, dup).
fn publishes(bytes: &[u8]) -> Vec<(String, String, u16, bool)> {
    let mut buf = BytesMut::from(bytes);
    let mut all = Vec::new();
    while !buf.is_empty() {
        match rumqttc::mqttbytes::v4::Packet::read(&mut buf, 1 << 20) {
            Ok(rumqttc::mqttbytes::v4::Packet::Publish(p)) => all.push((
                p.topic,
                String::from_utf8_lossy(&p.payload).to_string(),
                p.pkid,
                p.dup,
            )),
            other => panic!("{other:?}"),
        }
    }
    all
}

fn puback(window: &mut Window, pkid: u16) -> u64 {
    let seq = window.by_pkid.remove(&pkid).expect("in flight");
    window.acknowledge(seq, pkid)
}

#[test]
fn a_batch_is_one_publish_acknowledged_whole_and_resent_byte_for_byte() {
    let f = batching_fixture();
    let b = &f.bridge;
    append_on(&b.store, &["sensors/a"; 7]);
    let mut encoder = Encoder::new(4, &UpstreamLimits::default());
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    let sent = b
        .fill_window(&mut window, &mut out, &mut encoder, 10, &mut None, "x")
        .expect("fill");
    assert_eq!(sent, 7, "every event joined a batch");
    let frames = out.split().freeze();
    window.keep_frames(&frames);
    let p = publishes(&frames);
    assert_eq!(p.len(), 2, "two full batches of 3; the 7th waits: {p:?}");
    assert_eq!(p[0].0, "site1/batch");
    assert_eq!(
        p[0].1,
        r#"[{"topic":"sensors/a","payload":{"n":0}},{"topic":"sensors/a","payload":{"n":1}},{"topic":"sensors/a","payload":{"n":2}}]"#
    );
    assert_eq!(window.unacked(), 2, "one packet id per batch");
    // The second batch's PUBACK first: the cursor cannot move past the first batch.
    assert_eq!(puback(&mut window, p[1].2), 3);
    assert_eq!(window.advance(), 0);
    assert_eq!(window.cursor, 0);
    // The link drops: the unacknowledged first batch goes again, the same bytes with DUP.
    let mut again = BytesMut::new();
    b.resume(&mut window, &mut again, &mut encoder, 10)
        .expect("resume");
    let mut want = frames.slice(0..frames.len() / 2).to_vec();
    want[0] |= 0x08;
    assert_eq!(
        &again[..],
        &want[..],
        "batch 1 resent byte for byte, DUP set"
    );
    assert_eq!(puback(&mut window, p[0].2), 3);
    assert_eq!(window.advance(), 6, "the whole of both batches");
    assert_eq!(window.cursor, 6);
    // The 7th goes at its deadline, alone.
    assert!(window.batch.is_some());
    window.batch.as_mut().expect("pending").deadline = Instant::now();
    b.flush_batch_if_due(&mut window, &mut out, &mut encoder, 10)
        .expect("flush");
    let p = publishes(&out.split());
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, r#"[{"topic":"sensors/a","payload":{"n":6}}]"#);
    assert_eq!(puback(&mut window, p[0].2), 1);
    assert_eq!(window.advance(), 1);
    assert_eq!(window.cursor, 7);
    let status = b.status.lock().expect("status");
    assert_eq!(status.batches.batches.load(Relaxed), 3);
    assert_eq!(status.batches.events.load(Relaxed), 7);
    assert_eq!(status.batches.input_bytes.load(Relaxed), 7 * (9 + 7));
}

#[test]
fn an_entry_forwarded_otherwise_sends_the_batch_before_it_and_passed_over_ones_do_not() {
    let f = batching_fixture();
    let b = &f.bridge;
    // 3 (not forwarded) sits inside the batch; 4 is forwarded on its own.
    append_on(
        &b.store,
        &["sensors/a", "sensors/b", "other/x", "alarms/1", "sensors/c"],
    );
    let mut encoder = Encoder::new(4, &UpstreamLimits::default());
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    b.fill_window(&mut window, &mut out, &mut encoder, 10, &mut None, "x")
        .expect("fill");
    let p = publishes(&out.split());
    let topics: Vec<&str> = p.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(
        topics,
        ["site1/batch", "site1/alarms/1"],
        "batch first: {p:?}"
    );
    assert_eq!(
        p[0].1,
        r#"[{"topic":"sensors/a","payload":{"n":0}},{"topic":"sensors/b","payload":{"n":1}}]"#
    );
    assert_eq!(puback(&mut window, p[1].2), 1);
    assert_eq!(
        window.advance(),
        0,
        "the batch before it is not acknowledged"
    );
    assert_eq!(puback(&mut window, p[0].2), 2);
    assert_eq!(window.advance(), 4, "1, 2, 3 passed over, 4");
    assert!(window.batch.is_some(), "sensors/c waits in the next batch");
}

#[test]
fn a_batch_over_mqtt_5_carries_its_content_type_and_encoding_properties() {
    let mut f = batching_fixture();
    f.bridge.config.forward[0].compress = Some(crate::config::bridge::Compression::Gzip);
    let b = &f.bridge;
    append_on(&b.store, &["sensors/a"; 3]);
    let mut encoder = Encoder::new(5, &UpstreamLimits::default());
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    b.fill_window(&mut window, &mut out, &mut encoder, 10, &mut None, "x")
        .expect("fill");
    let mut codec = rmqtt_codec::v5::Codec::new(0, 0);
    use tokio_util::codec::Decoder as _;
    let Ok(Some((rmqtt_codec::v5::Packet::Publish(p), _))) = codec.decode(&mut out) else {
        panic!("one PUBLISH");
    };
    assert_eq!(&*p.topic, "site1/batch", "no suffix over MQTT 5");
    let props = p.properties.expect("properties");
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    let user: Vec<(String, String)> = props
        .user_properties
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        user,
        [
            ("content-encoding".to_string(), "gzip".to_string()),
            ("batch-events".to_string(), "3".to_string())
        ]
    );
    assert!(
        props.topic_alias.is_none(),
        "resent byte for byte: no alias"
    );
    let mut plain = String::new();
    use std::io::Read as _;
    flate2::read::GzDecoder::new(&p.payload[..])
        .read_to_string(&mut plain)
        .expect("gzip");
    assert!(plain.starts_with(r#"[{"topic":"sensors/a""#), "{plain}");
}

#[test]
fn a_window_smaller_than_a_batch_sends_what_it_holds() {
    let f = batching_fixture();
    let b = &f.bridge;
    append_on(&b.store, &["sensors/a"; 5]);
    let mut encoder = Encoder::new(4, &UpstreamLimits::default());
    let mut window = Window::new(0);
    let mut out = BytesMut::new();
    // An upstream receive maximum of 2: the batch of 3 can never fill.
    b.fill_window(&mut window, &mut out, &mut encoder, 2, &mut None, "x")
        .expect("fill");
    assert!(out.is_empty(), "filled by the same call's pending events");
    b.flush_batch_if_due(&mut window, &mut out, &mut encoder, 2)
        .expect("flush");
    let p = publishes(&out.split());
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1.matches("topic").count(), 2);
}
