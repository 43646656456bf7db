//! Retained messages and will messages.

use std::time::Duration;

use waystation_e2e::raw::{self, Connect, MosquittoSub, Pkt, RawClient, Will};
use waystation_e2e::Waystation;

const SHORT: Duration = Duration::from_millis(600);

// [MQTT-3.3.1-5] a retained PUBLISH is stored per topic; [MQTT-3.3.1-6] when a new
// subscription is made, the last retained message on each matching topic MUST be sent with
// RETAIN 1, at min(message QoS, granted QoS) ([MQTT-3.8.4-6]).
#[test]
fn retained_message_is_delivered_on_matching_subscribe_with_retain_flag() {
    let ws = Waystation::start();
    let mut publisher = RawClient::connect(ws.addr, "ret-pub");
    publisher.publish1("ret/a/temp", b"21.5", true, 1);
    publisher.publish2("ret/b/temp", b"19.0", true, 2);
    publisher.publish1("other/x", b"no", true, 3);

    let mut sub = RawClient::connect(ws.addr, "ret-sub");
    sub.send(&raw::subscribe(1, &[("ret/+/temp", 1)]));
    assert_eq!(
        sub.recv(),
        Pkt::SubAck {
            pid: 1,
            codes: vec![1]
        }
    );
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = sub.recv_publish();
        assert!(
            p.retain,
            "retained message on subscribe must have RETAIN 1 [MQTT-3.3.1-6]: {p:?}"
        );
        assert_eq!(p.qos, 1, "min(published QoS, granted 1)");
        sub.ack(&p);
        got.push((p.topic, p.payload));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("ret/a/temp".into(), b"21.5".to_vec()),
            ("ret/b/temp".into(), b"19.0".to_vec())
        ]
    );
    sub.expect_silence(SHORT);

    // A QoS 0 subscription gets it at QoS 0.
    let mut sub0 = RawClient::connect(ws.addr, "ret-sub0");
    sub0.subscribe_ok(1, &[("ret/a/temp", 0)]);
    let p = sub0.recv_publish();
    assert_eq!(
        (p.retain, p.qos, p.payload.as_slice()),
        (true, 0, &b"21.5"[..])
    );
}

// [MQTT-3.3.1-5] a new retained message replaces the one stored for that topic;
// [MQTT-3.3.1-7] also a QoS 0 one; [MQTT-3.3.1-12] a PUBLISH with RETAIN 0 MUST NOT store
// or replace it.
#[test]
fn retained_message_is_replaced_per_topic() {
    let ws = Waystation::start();
    let mut publisher = RawClient::connect(ws.addr, "rep-pub");
    publisher.publish1("rep/t", b"v1", true, 1);
    publisher.publish1("rep/t", b"v2", true, 2);
    let mut sub = RawClient::connect(ws.addr, "rep-sub1");
    sub.subscribe_ok(1, &[("rep/t", 1)]);
    let p = sub.recv_publish();
    assert_eq!(p.payload, b"v2");
    sub.ack(&p);
    sub.expect_silence(SHORT);

    publisher.publish0("rep/t", b"v3-qos0", true);
    publisher.publish1("rep/t", b"not-retained", false, 3);
    let mut sub = RawClient::connect(ws.addr, "rep-sub2");
    sub.subscribe_ok(1, &[("rep/#", 1)]);
    let p = sub.recv_publish();
    assert_eq!(
        (p.payload.as_slice(), p.retain, p.qos),
        (&b"v3-qos0"[..], true, 0)
    );
    sub.expect_silence(SHORT);
}

// [MQTT-3.3.1-10] a retained PUBLISH with a zero-byte payload is delivered normally to
// current subscribers and removes the retained message; [MQTT-3.3.1-11] a zero-byte
// retained message MUST NOT be stored: future subscribers get nothing.
#[test]
fn empty_retained_payload_clears_the_retained_message() {
    let ws = Waystation::start();
    let mut publisher = RawClient::connect(ws.addr, "clr-pub");
    publisher.publish1("clr/t", b"soon gone", true, 1);
    let mut existing = RawClient::connect(ws.addr, "clr-existing");
    existing.subscribe_ok(1, &[("clr/t", 1)]);
    let p = existing.recv_publish();
    existing.ack(&p);

    publisher.publish1("clr/t", b"", true, 2);
    let p = existing.recv_publish();
    assert_eq!(
        p.payload, b"",
        "the empty retained PUBLISH is forwarded as normal [MQTT-3.3.1-10]"
    );
    existing.ack(&p);

    let mut later = RawClient::connect(ws.addr, "clr-later");
    later.subscribe_ok(1, &[("clr/#", 1)]);
    later.expect_silence(SHORT);
}

// [MQTT-3.3.1-9] the server MUST set RETAIN 0 when forwarding a message to a subscription
// that existed when the message arrived, whatever the publisher's RETAIN flag.
#[test]
fn retain_flag_is_cleared_on_normal_forwarding() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "fwd-sub");
    sub.subscribe_ok(1, &[("fwd/t", 2)]);
    let mut publisher = RawClient::connect(ws.addr, "fwd-pub");
    for (q, pid) in [(0u8, 0u16), (1, 1), (2, 2)] {
        publisher.publish_qos("fwd/t", format!("q{q}").as_bytes(), q, true, pid);
        let p = sub.recv_publish();
        assert!(
            !p.retain,
            "RETAIN must be 0 on normal forwarding [MQTT-3.3.1-9]: {p:?}"
        );
        sub.ack(&p);
    }
}

// Retained delivery with Debian's mosquitto clients: mosquitto_pub -r, then a later
// mosquitto_sub gets it (and sees r1 in its debug output).
#[test]
fn retained_message_with_mosquitto_clients() {
    let ws = Waystation::start();
    raw::mosquitto_pub(
        ws.port(),
        &["-r", "-q", "1", "-t", "mq/retained", "-m", "kept"],
    );
    let msub = MosquittoSub::start(ws.port(), &["-q", "1", "-t", "mq/#", "-C", "1", "-W", "10"]);
    let (lines, debug) = msub.collect(1, Duration::from_secs(5));
    assert_eq!(lines, vec!["mq/retained kept"]);
    assert!(
        debug[0].contains("r1"),
        "retained flag set on subscribe delivery: {debug:?}"
    );
}

fn will_client(
    ws: &Waystation,
    id: &str,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
) -> RawClient {
    RawClient::connect_ok(
        ws.addr,
        &Connect::new(id).will(Will::new(topic, payload, qos, retain)),
    )
    .0
}

// [MQTT-3.1.2-8] the will MUST be published when the network connection is closed
// without DISCONNECT (here: the socket just drops), with the will QoS ([MQTT-3.1.2-14]).
#[test]
fn will_published_on_socket_drop() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "w-drop-sub");
    sub.subscribe_ok(1, &[("wills/#", 2)]);
    let c = will_client(&ws, "w-drop", "wills/drop", b"lost power", 1, false);
    let _ = c.stream.shutdown(std::net::Shutdown::Both);
    drop(c);
    let p = sub.recv_publish();
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice(), p.qos, p.retain),
        ("wills/drop", &b"lost power"[..], 1, false)
    );
    sub.ack(&p);
    sub.expect_silence(SHORT);
}

// [MQTT-3.1.2-8] "... the Server closes the Network Connection because of a protocol
// error" is one of the situations in which the will is published.
#[test]
fn will_published_on_protocol_error() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "w-err-sub");
    sub.subscribe_ok(1, &[("wills/#", 0)]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("second CONNECT", Connect::new("w-err-0").encode()),
        (
            "PUBLISH to a wildcard topic",
            raw::publish("a/#", b"x", 0, false, false, None),
        ),
        ("reserved packet type 0", vec![0x00, 0x00]),
        (
            "PUBLISH QoS 3",
            vec![0x36, 0x06, 0x00, 0x01, b't', 0x00, 0x01, b'x'],
        ),
    ];
    for (i, (name, bytes)) in cases.into_iter().enumerate() {
        let mut c = will_client(
            &ws,
            &format!("w-err-{i}"),
            &format!("wills/err{i}"),
            name.as_bytes(),
            0,
            false,
        );
        let _ = c.try_send(&bytes);
        assert!(
            c.closed_within(Duration::from_secs(3)),
            "{name}: connection not closed"
        );
        let p = sub.recv_publish();
        assert_eq!(
            (p.topic, p.payload),
            (format!("wills/err{i}"), name.as_bytes().to_vec()),
            "{name}: will"
        );
    }
}

// [MQTT-3.1.2-10] the will MUST be removed once the server has received DISCONNECT;
// [MQTT-3.14.4-3] "On receipt of DISCONNECT the Server MUST discard any Will Message
// associated with the current connection without publishing it".
#[test]
fn no_will_after_disconnect() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "w-disc-sub");
    sub.subscribe_ok(1, &[("wills/#", 0)]);
    let c = will_client(&ws, "w-disc", "wills/disc", b"must not appear", 0, false);
    c.disconnect();
    sub.expect_silence(Duration::from_millis(1000));
    // The subscriber is fine: another client's will (socket drop) does arrive.
    let c = will_client(&ws, "w-disc-2", "wills/drop", b"sentinel", 0, false);
    drop(c);
    let p = sub.recv_publish();
    assert_eq!(p.payload, b"sentinel");
}

// [MQTT-3.1.2-17] will retain 1: the will is published as a retained message, so a later
// subscriber gets it with RETAIN 1 ([MQTT-3.3.1-6]).
#[test]
fn retained_will_is_stored_as_retained_message() {
    let ws = Waystation::start();
    // A watcher subscribed beforehand sees the will when it is published (live, so RETAIN 0);
    // only then is the later subscriber's RETAIN 1 copy a test of the retained store, not of
    // which of the two arrived first.
    let mut watcher = RawClient::connect(ws.addr, "w-ret-watcher");
    watcher.subscribe_ok(1, &[("wills/status", 1)]);
    let c = will_client(&ws, "w-ret", "wills/status", b"offline", 1, true);
    drop(c);
    let live = watcher.recv_publish();
    assert_eq!(
        (live.payload.as_slice(), live.retain),
        (&b"offline"[..], false)
    );
    let mut later = RawClient::connect(ws.addr, "w-ret-later");
    later.subscribe_ok(1, &[("wills/status", 1)]);
    let p = later.recv_publish();
    assert_eq!(
        (p.payload.as_slice(), p.retain, p.qos),
        (&b"offline"[..], true, 1)
    );
}

// [MQTT-3.1.2-8] will via a real client: mosquitto_sub sees the will of a client whose
// socket dropped.
#[test]
fn will_seen_by_mosquitto_sub() {
    let ws = Waystation::start();
    let msub = MosquittoSub::start(ws.port(), &["-t", "wills/+", "-C", "1", "-W", "10"]);
    let c = will_client(&ws, "w-mq", "wills/sensor7", b"gone", 0, false);
    drop(c);
    let (lines, _) = msub.collect(1, Duration::from_secs(5));
    assert_eq!(lines, vec!["wills/sensor7 gone"]);
}
