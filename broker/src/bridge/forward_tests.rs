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
    config.forward.push(ForwardRule {
        local: "sensors/#".into(),
        remote_prefix: "site1/".into(),
        qos: 1,
    });
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
