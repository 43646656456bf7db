//! MQTT 5 against real clients (issue 13), part 4: topic aliases (MQTT.js, rumqttc v5, and
//! raw bytes for the invalid ones), the client's maximum packet size (drop and count) and
//! receive maximum (rumqttc v5 with manual acks), and the reason codes of the server's
//! DISCONNECT (session taken over, keep-alive timeout, malformed packet, protocol error,
//! packet too large, quota exceeded, server shutting down).

mod v5_common;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use serde_json::json;
use v5_common::{dropped, reason, run, start, subscriber, WAIT};
use waystation_e2e::clients::{events, one, payloads, Lib, ScriptClient};
use waystation_e2e::raw::{self, Connect, RawClient};
use waystation_e2e::raw5::{self, prop, Props};
use waystation_e2e::Waystation;

/// rumqttc's v5 client with its event loop on a thread of its own (its `poll` must not be
/// cancelled while connecting: FACTS.md); incoming packets arrive on a channel.
struct Rumq {
    client: Client,
    incoming: Receiver<Packet>,
}

impl Rumq {
    fn connect(mut options: MqttOptions) -> Rumq {
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = Client::new(options, 64);
        let (tx, incoming) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(_) => break,
                }
            }
        });
        let mut c = Rumq { client, incoming };
        match c.next(WAIT) {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(
                    ack.code,
                    rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
                )
            }
            other => panic!("rumqttc: expected CONNACK, got {other:?}"),
        }
        c
    }

    fn next(&mut self, timeout: Duration) -> Option<Packet> {
        match self.incoming.recv_timeout(timeout) {
            Ok(p) => Some(p),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The next PUBLISH within `timeout` (other packets skipped).
    fn next_publish(&mut self, timeout: Duration) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now()))? {
                Packet::Publish(p) => return Some(p),
                _ => continue,
            }
        }
    }
}

fn options(ws: &Waystation, id: &str) -> MqttOptions {
    MqttOptions::new(id, "127.0.0.1", ws.port())
}

// Topic aliases from the client [MQTT-3.3.2-12]: MQTT.js sets alias 1 with its first
// PUBLISH and then sends the topic empty (its "sent" events show the bytes); rumqttc v5
// does the same by hand with alias 16 (the CONNACK's maximum). The subscriber (paho) gets
// every message under its full topic name, with no alias (none are sent outbound).
#[test]
fn topic_aliases_from_mqttjs_and_rumqttc_resolve() {
    let ws = start("");
    let sub = subscriber(
        Lib::Paho,
        &ws,
        json!({"op": "connect", "id": "ta-sub"}),
        json!({"filter": "ta/#", "qos": 1}),
        4,
    );
    let got = run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "ta-js", "auto_use_topic_alias": true},
            {"op": "publish", "topic": "ta/js", "payload": "js-1", "qos": 1,
             "props": {"topicAlias": 1}},
            {"op": "publish", "topic": "ta/js", "payload": "js-2", "qos": 1},
            {"op": "disconnect"},
        ]),
    );
    let sent = events(&got, "sent");
    assert_eq!(
        sent[1]["topic"], "",
        "MQTT.js sent the second by alias: {got:#?}"
    );
    assert_eq!(sent[1]["props"]["topicAlias"], 1);
    assert_eq!(events(&got, "puback").len(), 2, "{got:#?}");

    let rumq = Rumq::connect(options(&ws, "ta-rumqttc"));
    let alias = |n| PublishProperties {
        topic_alias: Some(n),
        ..PublishProperties::default()
    };
    rumq.client
        .publish_with_properties("ta/rumqttc", QoS::AtLeastOnce, false, "r-1", alias(16))
        .unwrap();
    rumq.client
        .publish_with_properties("", QoS::AtLeastOnce, false, "r-2", alias(16))
        .unwrap();

    let got = sub.finish(WAIT);
    let topics: Vec<_> = events(&got, "message")
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m["topic"].as_str().unwrap(),
                m["payload"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        topics,
        [
            "ta/js js-1",
            "ta/js js-2",
            "ta/rumqttc r-1",
            "ta/rumqttc r-2"
        ]
    );
    for m in events(&got, "message") {
        assert!(
            m["props"].get("TopicAlias").is_none(),
            "alias sent outbound: {m}"
        );
    }
}

// Invalid topic aliases (raw bytes: clients check them before sending): above the
// CONNACK's maximum of 16 -> DISCONNECT 0x94 [MQTT-3.3.2-9]; an empty topic with an alias
// never set -> DISCONNECT 0x82 [MQTT-3.3.4-?].
#[test]
fn invalid_topic_aliases_close_with_reason_codes() {
    let ws = start("");
    let mut c = raw5::connect_ok(ws.addr, "ta-over", &Props::new());
    c.send(&raw5::publish(
        "ta/x",
        b"x",
        1,
        Some(1),
        &Props::new().u16(prop::TOPIC_ALIAS, 17),
    ));
    assert_eq!(raw5::expect_disconnect(&mut c, WAIT), 0x94);

    let mut c = raw5::connect_ok(ws.addr, "ta-unset", &Props::new());
    c.send(&raw5::publish(
        "",
        b"x",
        1,
        Some(1),
        &Props::new().u16(prop::TOPIC_ALIAS, 3),
    ));
    assert_eq!(raw5::expect_disconnect(&mut c, WAIT), 0x82);
}

// [MQTT-3.1.2-24/25] the client's maximum packet size: a message that would exceed it is
// not sent to that client (paho, 300 bytes) and is dealt with as if it had been: three of
// them at QoS 1 do not hold the client's in-flight window (receive maximum 2), delivery
// goes on with the next message, and the drops are counted in /metrics (packet_too_large).
// A client without a limit gets all four.
#[test]
fn client_maximum_packet_size_drops_and_counts() {
    let ws = start("");
    let small = subscriber(
        Lib::Paho,
        &ws,
        json!({"op": "connect", "id": "mps-small",
               "props": {"MaximumPacketSize": 300, "ReceiveMaximum": 2}}),
        json!({"filter": "mps/#", "qos": 1}),
        1,
    );
    let any = subscriber(
        Lib::MqttJs,
        &ws,
        json!({"op": "connect", "id": "mps-any"}),
        json!({"filter": "mps/#", "qos": 1}),
        4,
    );
    let big = "b".repeat(1000);
    run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "mps-pub"},
            {"op": "publish", "topic": "mps/big", "payload": big, "qos": 1},
            {"op": "publish", "topic": "mps/big", "payload": big, "qos": 1},
            {"op": "publish", "topic": "mps/big", "payload": big, "qos": 1},
            {"op": "publish", "topic": "mps/small", "payload": "small", "qos": 1},
            {"op": "disconnect"},
        ]),
    );
    let got = small.finish(WAIT);
    assert_eq!(payloads(&got), ["small"], "{got:#?}");
    let got = any.finish(WAIT);
    assert_eq!(payloads(&got), [big.as_str(), &big, &big, "small"]);
    assert_eq!(dropped(&ws, "packet_too_large"), 3.0);
}

// [MQTT-3.3.4-9] the client's receive maximum caps the QoS 1/2 PUBLISHes in flight to it:
// rumqttc v5 (receive maximum 2, manual acks) gets two of five, a third only after it acks
// one, and the rest as it acks them.
#[test]
fn receive_maximum_caps_messages_in_flight() {
    let ws = start("");
    let mut opts = options(&ws, "rm-sub");
    opts.set_receive_maximum(Some(2)).set_manual_acks(true);
    let mut sub = Rumq::connect(opts);
    sub.client.subscribe("rm/#", QoS::AtLeastOnce).unwrap();
    match sub.next(WAIT) {
        Some(Packet::SubAck(_)) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let steps: Vec<_> = (1..=5)
        .map(|i| json!({"op": "publish", "topic": "rm/t", "payload": format!("m{i}"), "qos": 1}))
        .collect();
    let mut all = vec![json!({"op": "connect", "id": "rm-pub"})];
    all.extend(steps);
    all.push(json!({"op": "disconnect"}));
    let got = run(Lib::MqttJs, &ws, json!(all));
    assert_eq!(events(&got, "puback").len(), 5, "{got:#?}");

    let first = sub.next_publish(WAIT).expect("first in flight");
    let second = sub.next_publish(WAIT).expect("second in flight");
    assert!(
        sub.next_publish(Duration::from_millis(1000)).is_none(),
        "a third PUBLISH while two are unacknowledged (receive maximum 2)"
    );
    sub.client.ack(&first).unwrap();
    let third = sub.next_publish(WAIT).expect("a third after one ack");
    assert_eq!(
        [&first, &second, &third].map(|p| p.payload.to_vec()),
        [b"m1".to_vec(), b"m2".to_vec(), b"m3".to_vec()]
    );
    for p in [second, third] {
        sub.client.ack(&p).unwrap();
    }
    let rest: Vec<_> = (0..2)
        .map(|_| {
            let p = sub.next_publish(WAIT).expect("the rest after acks");
            sub.client.ack(&p).unwrap();
            p.payload.to_vec()
        })
        .collect();
    assert_eq!(rest, [b"m4".to_vec(), b"m5".to_vec()]);
}

// The server's DISCONNECT reason codes [MQTT-4.13]: 0x8E session taken over (paho, when
// MQTT.js connects with its client id), 0x8D keep-alive timeout, 0x81 malformed packet (a
// PUBLISH with an unknown property), 0x82 protocol error (AUTH without an authentication
// method), the last three with raw bytes.
#[test]
fn server_disconnect_reason_codes() {
    let ws = start("");
    let mut first = ScriptClient::spawn(
        Lib::Paho,
        ws.port(),
        json!([{"op": "connect", "id": "twin"}, {"op": "wait_disconnect", "secs": 20}]),
    );
    first.wait_event("connack", WAIT);
    let got = run(
        Lib::MqttJs,
        &ws,
        json!([{"op": "connect", "id": "twin"}, {"op": "disconnect"}]),
    );
    assert_eq!(reason(&got, "connack"), 0);
    let taken = first.wait_event("disconnected", WAIT);
    assert_eq!(taken["reason"], 0x8E, "session taken over");

    let (mut c, ack) = raw5::connect_with(ws.addr, &raw5::connect("ka", true, 1, &Props::new()));
    assert_eq!(ack.reason, 0);
    assert_eq!(
        raw5::expect_disconnect(&mut c, WAIT),
        0x8D,
        "keep-alive timeout"
    );

    let mut c = raw5::connect_ok(ws.addr, "malformed", &Props::new());
    c.send(&raw5::publish(
        "m/t",
        b"x",
        0,
        None,
        &Props::new().raw(&[0x7F, 0x00]),
    ));
    assert_eq!(
        raw5::expect_disconnect(&mut c, WAIT),
        0x81,
        "unknown property"
    );

    let mut c = raw5::connect_ok(ws.addr, "auth", &Props::new());
    c.send(&raw5::auth("SCRAM-SHA-1"));
    assert_eq!(
        raw5::expect_disconnect(&mut c, WAIT),
        0x82,
        "AUTH without a method"
    );
}

// 0x95 packet too large (over [limits] max_packet_size, raw: clients refuse to send it),
// 0x97 quota exceeded (over max_publish_rate, paho publishing one after the other).
#[test]
fn limits_close_with_reason_codes() {
    let ws = start("[limits]\nmax_packet_size = 1024\nmax_publish_rate = 5\n");
    let mut c = raw5::connect_ok(ws.addr, "too-large", &Props::new());
    // Only the start of it: the broker decides on the fixed header, and nothing it leaves
    // unread can turn its close into a reset that loses the DISCONNECT.
    let big = raw5::publish("big/t", &[b'x'; 2000], 0, None, &Props::new());
    c.send(&big[..16]);
    assert_eq!(raw5::expect_disconnect(&mut c, WAIT), 0x95);

    // QoS 1, each PUBACK awaited: the client has nothing unsent when the broker closes, so
    // the close is a FIN behind the DISCONNECT (a client still writing gets a TCP reset,
    // which may discard the DISCONNECT before the client reads it).
    let mut steps = vec![json!({"op": "connect", "id": "flood"})];
    steps.extend((0..30).map(
        |i| json!({"op": "publish", "topic": "flood/t", "payload": format!("{i}"), "qos": 1}),
    ));
    steps.push(json!({"op": "wait_disconnect"}));
    let got = run(Lib::Paho, &ws, json!(steps));
    assert_eq!(reason(&got, "disconnected"), 0x97, "{got:#?}");
}

// 0x8B server shutting down: SIGTERM while MQTT.js is connected.
#[test]
fn sigterm_disconnects_v5_clients_with_server_shutting_down() {
    let mut ws = start("");
    let mut c = ScriptClient::spawn(
        Lib::MqttJs,
        ws.port(),
        json!([{"op": "connect", "id": "bye"}, {"op": "wait_disconnect", "secs": 20}]),
    );
    assert_eq!(c.wait_event("connack", WAIT)["reason"], 0);
    ws.terminate();
    assert_eq!(c.wait_event("disconnected", WAIT)["reason"], 0x8B);
    let _ = one(&c.finish(WAIT), "disconnected");
}

// PUBACK / PUBREC 0x10 no matching subscribers: the message is accepted (stored, retained if
// asked) but nobody takes it; once a subscriber matches, 0x00. paho at QoS 1, MQTT.js at
// QoS 2 (the code is in the PUBREC).
#[test]
fn no_matching_subscribers_is_reason_0x10() {
    let ws = start("");
    let publish = |lib, qos: u8| {
        let got = run(
            lib,
            &ws,
            json!([
                {"op": "connect", "id": format!("nms-{lib:?}-{qos}")},
                {"op": "publish", "topic": "nobody/t", "payload": "x", "qos": qos},
                {"op": "disconnect"},
            ]),
        );
        reason(&got, "puback")
    };
    assert_eq!(publish(Lib::Paho, 1), 0x10, "PUBACK, no subscriber");
    assert_eq!(publish(Lib::MqttJs, 2), 0x10, "PUBREC, no subscriber");
    let sub = subscriber(
        Lib::Paho,
        &ws,
        json!({"op": "connect", "id": "nms-sub"}),
        json!({"filter": "nobody/#", "qos": 1}),
        2,
    );
    assert_eq!(publish(Lib::Paho, 1), 0x00, "PUBACK with a subscriber");
    assert_eq!(publish(Lib::MqttJs, 2), 0x00, "PUBREC with a subscriber");
    assert_eq!(payloads(&sub.finish(WAIT)), ["x", "x"]);
}

// The broker's own Receive Maximum ([limits] receive_maximum, told in CONNACK): a client
// that keeps within it is served (three QoS 1 PUBLISHes, their PUBACKs, three more); one
// that sends a fourth before the first PUBACK is closed with DISCONNECT 0x93. A 3.1.1
// client is not counted (its protocol has no such limit).
#[test]
fn the_brokers_receive_maximum_is_announced_and_enforced() {
    let ws = start("[limits]\nreceive_maximum = 3\n");
    let mut keeps = raw5::connect_ok(ws.addr, "rm-keeps", &Props::new());
    for round in 0..2u16 {
        for i in 1..=3u16 {
            keeps.send(&raw5::publish(
                "rm/t",
                b"x",
                1,
                Some(round * 3 + i),
                &Props::new(),
            ));
        }
        for _ in 0..3 {
            let p = keeps.recv();
            assert!(
                raw5::disconnect_reason(&p).is_none(),
                "within the receive maximum: {p:?}"
            );
        }
    }
    let (mut over, ack) =
        raw5::connect_with(ws.addr, &raw5::connect("rm-over", true, 60, &Props::new()));
    assert!(
        ack.props
            .windows(3)
            .any(|w| w == [raw5::prop::RECEIVE_MAXIMUM, 0, 3]),
        "Receive Maximum 3 announced in CONNACK: {:02x?}",
        ack.props
    );
    let mut burst = Vec::new();
    for i in 1..=4u16 {
        burst.extend(raw5::publish("rm/t", b"x", 1, Some(i), &Props::new()));
    }
    over.send(&burst);
    assert_eq!(raw5::expect_disconnect(&mut over, WAIT), 0x93);
    // 3.1.1: four at once are fine.
    let (mut v4, _, code) = RawClient::connect_with(ws.addr, &Connect::new("rm-v4"));
    assert_eq!(code, 0);
    let mut burst = Vec::new();
    for i in 1..=4u16 {
        burst.extend(raw::publish("rm/t", b"x", 1, false, false, Some(i)));
    }
    v4.send(&burst);
    for _ in 0..4 {
        assert!(matches!(v4.recv(), raw::Pkt::PubAck(_)));
    }
}
