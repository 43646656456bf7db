//! Persistent sessions (clean session 0): subscriptions and queued QoS 1/2 messages kept
//! while the client is away, redelivery of unacknowledged messages with DUP on reconnect,
//! PUBREL resend, inbound QoS 2 state, the session present flag, clean session 1 discarding
//! the session, and `[limits] max_queued_messages` bounding the offline queue.

use std::time::Duration;

use waystation_e2e::raw::{self, Connect, Pkt, RawClient};
use waystation_e2e::Waystation;

const SHORT: Duration = Duration::from_millis(600);

fn persistent(id: &str) -> Connect {
    Connect::new(id).clean(false)
}

/// Drops the TCP connection without DISCONNECT (as a device losing power would).
fn drop_connection(c: RawClient) {
    let _ = c.stream.shutdown(std::net::Shutdown::Both);
    drop(c);
    // Give the broker a moment to notice, so that publishes after this find the client
    // offline rather than racing its disconnect.
    std::thread::sleep(Duration::from_millis(200));
}

// [MQTT-3.1.2-4] with clean session 0 the server resumes the session's state (its
// subscriptions) after reconnect; [MQTT-3.1.2-5] QoS 1 and QoS 2 messages matching its
// subscriptions are stored while it is disconnected and delivered on reconnect, in order;
// [MQTT-3.2.2-2] session present 1.
#[test]
fn subscriptions_and_queued_qos1_qos2_messages_survive_disconnect() {
    let ws = Waystation::start();
    let (mut c, sp) = RawClient::connect_ok(ws.addr, &persistent("ps-1"));
    assert!(!sp);
    c.subscribe_ok(1, &[("ps/#", 2)]);
    c.disconnect();

    let mut publisher = RawClient::connect(ws.addr, "ps-pub");
    publisher.publish1("ps/a", b"q1-while-away", false, 1);
    publisher.publish2("ps/b", b"q2-while-away", false, 2);
    publisher.publish1("ps/c", b"q1-again", false, 3);

    let (mut c, sp) = RawClient::connect_ok(ws.addr, &persistent("ps-1"));
    assert!(sp, "stored session: session present 1 [MQTT-3.2.2-2]");
    let a = c.recv_publish();
    assert_eq!(
        (a.topic.as_str(), a.payload.as_slice(), a.qos),
        ("ps/a", &b"q1-while-away"[..], 1)
    );
    c.ack(&a);
    let b = c.recv_publish();
    assert_eq!(
        (b.topic.as_str(), b.payload.as_slice(), b.qos),
        ("ps/b", &b"q2-while-away"[..], 2)
    );
    c.ack(&b);
    let d = c.recv_publish();
    assert_eq!(d.payload, b"q1-again");
    c.ack(&d);
    c.expect_silence(SHORT);

    // The subscription itself was kept: no new SUBSCRIBE needed.
    publisher.publish1("ps/live", b"live", false, 4);
    let l = c.recv_publish();
    assert_eq!(l.payload, b"live");
    c.ack(&l);
}

// [MQTT-3.1.2-5] only QoS 1 and QoS 2 messages are stored for a disconnected client;
// issue: "QoS 0 messages for offline clients are not queued".
#[test]
fn qos0_messages_are_not_queued_for_offline_clients() {
    let ws = Waystation::start();
    let (mut c, _) = RawClient::connect_ok(ws.addr, &persistent("ps-q0"));
    c.subscribe_ok(1, &[("q0off/t", 2)]);
    drop_connection(c);

    let mut publisher = RawClient::connect(ws.addr, "ps-q0-pub");
    publisher.publish0("q0off/t", b"qos0-lost", false);
    publisher.publish1("q0off/t", b"qos1-kept", false, 1);
    publisher.publish0("q0off/t", b"qos0-lost-too", false);
    publisher.ping(); // the QoS 0 publishes have been processed

    let (mut c, sp) = RawClient::connect_ok(ws.addr, &persistent("ps-q0"));
    assert!(sp);
    let p = c.recv_publish();
    assert_eq!(
        p.payload, b"qos1-kept",
        "a QoS 0 message was queued for an offline client"
    );
    c.ack(&p);
    c.expect_silence(SHORT);
}

// [MQTT-4.4.0-1] "When a Client reconnects with CleanSession set to 0, both the Client and
// Server MUST re-send any unacknowledged PUBLISH Packets (where QoS > 0) and PUBREL Packets
// using their original Packet Identifiers." [MQTT-3.3.1-1] the DUP flag MUST be 1 on such
// a re-delivery.
#[test]
fn unacked_qos1_is_redelivered_with_dup_and_same_id_on_reconnect() {
    let ws = Waystation::start();
    let (mut c, _) = RawClient::connect_ok(ws.addr, &persistent("redeliver-1"));
    c.subscribe_ok(1, &[("rd/t", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "rd-pub");
    publisher.publish1("rd/t", b"first", false, 1);
    publisher.publish1("rd/t", b"second", false, 2);
    let first = c.recv_publish();
    let second = c.recv_publish();
    assert!(
        !first.dup && !second.dup,
        "first delivery has DUP 0 [MQTT-3.3.1-2]"
    );
    // Ack only the second; the first stays unacknowledged.
    c.send(&raw::puback(second.pid.unwrap()));
    c.ping();
    drop_connection(c);

    let (mut c, sp) = RawClient::connect_ok(ws.addr, &persistent("redeliver-1"));
    assert!(sp);
    let again = c.recv_publish();
    assert_eq!(again.payload, b"first");
    assert!(again.dup, "re-delivery must have DUP 1 [MQTT-3.3.1-1]");
    assert_eq!(again.pid, first.pid, "original packet id [MQTT-4.4.0-1]");
    assert_eq!(again.qos, 1);
    c.send(&raw::puback(again.pid.unwrap()));
    c.expect_silence(SHORT); // the acknowledged "second" is not resent
}

// [MQTT-4.4.0-1] for QoS 2: a PUBLISH never PUBREC'd is re-sent (DUP 1, same id); one
// that was PUBREC'd (server in "PUBREL sent" state) gets its PUBREL re-sent, not the PUBLISH.
#[test]
fn qos2_redelivery_resends_publish_with_dup_and_pubrel() {
    let ws = Waystation::start();
    let (mut c, _) = RawClient::connect_ok(ws.addr, &persistent("redeliver-2"));
    c.subscribe_ok(1, &[("rd2/t", 2)]);
    let mut publisher = RawClient::connect(ws.addr, "rd2-pub");
    publisher.publish2("rd2/t", b"not-received", false, 1);
    publisher.publish2("rd2/t", b"received", false, 2);
    let p1 = c.recv_publish();
    let p2 = c.recv_publish();
    assert_eq!(
        (p1.payload.as_slice(), p2.payload.as_slice()),
        (&b"not-received"[..], &b"received"[..])
    );
    c.send(&raw::pubrec(p2.pid.unwrap()));
    c.await_pubrel(p2.pid.unwrap());
    drop_connection(c); // no PUBREC for p1, no PUBCOMP for p2

    let (mut c, sp) = RawClient::connect_ok(ws.addr, &persistent("redeliver-2"));
    assert!(sp);
    let mut got_publish = None;
    let mut got_pubrel = false;
    for _ in 0..2 {
        match c.recv() {
            Pkt::Publish(p) => {
                assert!(got_publish.is_none(), "PUBLISH re-sent twice: {p:?}");
                got_publish = Some(p);
            }
            Pkt::PubRel(id) => {
                assert_eq!(
                    id,
                    p2.pid.unwrap(),
                    "PUBREL with the original id [MQTT-4.4.0-1]"
                );
                got_pubrel = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let again = got_publish.expect("unacknowledged QoS 2 PUBLISH re-sent [MQTT-4.4.0-1]");
    assert!(
        got_pubrel,
        "PUBREL re-sent for the PUBREC'd message [MQTT-4.4.0-1]"
    );
    assert_eq!(again.payload, b"not-received");
    assert!(again.dup, "DUP 1 on re-delivery [MQTT-3.3.1-1]");
    assert_eq!(again.pid, p1.pid);
    assert_eq!(again.qos, 2);
    c.send(&raw::pubcomp(p2.pid.unwrap()));
    c.ack(&again);
    c.expect_silence(SHORT);
}

// The server as QoS 2 receiver keeps its state across a reconnect of a persistent session
// ([MQTT-4.3.3-2], [MQTT-4.4.0-1]): the publisher may resend PUBREL (or the PUBLISH with DUP)
// after reconnecting; the message reaches subscribers exactly once.
#[test]
fn inbound_qos2_state_survives_publisher_reconnect() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "in2-sub");
    sub.subscribe_ok(1, &[("in2/#", 2)]);

    let (mut publisher, _) = RawClient::connect_ok(ws.addr, &persistent("in2-pub"));
    publisher.send(&raw::publish(
        "in2/a",
        b"via-pubrel",
        2,
        false,
        false,
        Some(5),
    ));
    assert_eq!(publisher.recv(), Pkt::PubRec(5));
    publisher.send(&raw::publish("in2/b", b"via-dup", 2, false, false, Some(6)));
    assert_eq!(publisher.recv(), Pkt::PubRec(6));
    drop_connection(publisher);

    let (mut publisher, sp) = RawClient::connect_ok(ws.addr, &persistent("in2-pub"));
    assert!(sp);
    publisher.send(&raw::pubrel(5));
    assert_eq!(publisher.recv(), Pkt::PubComp(5));
    publisher.send(&raw::publish("in2/b", b"via-dup", 2, false, true, Some(6)));
    assert_eq!(publisher.recv(), Pkt::PubRec(6));
    publisher.send(&raw::pubrel(6));
    assert_eq!(publisher.recv(), Pkt::PubComp(6));

    let mut got = Vec::new();
    for _ in 0..2 {
        let p = sub.recv_publish();
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
        sub.ack(&p);
    }
    got.sort();
    assert_eq!(got, vec!["via-dup", "via-pubrel"]);
    sub.expect_silence(SHORT);
}

// [MQTT-3.1.2-6] "If CleanSession is set to 1, the Client and Server MUST discard any
// previous Session and start a new one. This Session lasts as long as the Network
// Connection." Queued messages and subscriptions are gone; [MQTT-3.2.2-1] session present
// 0; and after that clean connection ends no session remains ([MQTT-3.2.2-3] on the next
// clean session 0 connect).
#[test]
fn clean_session_1_discards_the_old_session() {
    let ws = Waystation::start();
    let (mut c, _) = RawClient::connect_ok(ws.addr, &persistent("cs-discard"));
    c.subscribe_ok(1, &[("cs/t", 1)]);
    c.disconnect();
    let mut publisher = RawClient::connect(ws.addr, "cs-pub");
    publisher.publish1("cs/t", b"queued-then-discarded", false, 1);

    let (mut c, sp) = RawClient::connect_ok(ws.addr, &Connect::new("cs-discard"));
    assert!(!sp, "clean session 1: session present 0 [MQTT-3.2.2-1]");
    c.expect_silence(SHORT); // the queued message went with the old session
    publisher.publish1("cs/t", b"after-clean", false, 2);
    c.expect_silence(SHORT); // and so did the subscription
    c.subscribe_ok(2, &[("cs/t", 1)]);
    c.disconnect();

    // The clean session's state (its subscription) did not outlive its connection.
    let (mut c, sp) = RawClient::connect_ok(ws.addr, &persistent("cs-discard"));
    assert!(
        !sp,
        "no session may remain after a clean session ends [MQTT-3.1.2-6]"
    );
    publisher.publish1("cs/t", b"after-clean-2", false, 3);
    c.expect_silence(SHORT);
}

// Issue: `[limits] max_queued_messages` bounds the messages kept for an offline session;
// config/waystation.toml: "Beyond it the newest messages for that client are dropped".
#[test]
fn max_queued_messages_bounds_the_offline_queue() {
    let ws = Waystation::start_with("[limits]\nmax_queued_messages = 5\n");
    let (mut c, _) = RawClient::connect_ok(ws.addr, &persistent("mq-sub"));
    c.subscribe_ok(1, &[("mq/t", 1)]);
    c.disconnect();
    let mut publisher = RawClient::connect(ws.addr, "mq-pub");
    for i in 0..20u16 {
        publisher.publish1("mq/t", format!("m{i}").as_bytes(), false, i + 1);
    }
    let (mut c, sp) = RawClient::connect_ok(ws.addr, &persistent("mq-sub"));
    assert!(sp);
    let mut got = Vec::new();
    loop {
        match c.recv_timeout(Duration::from_millis(800)) {
            Ok(Pkt::Publish(p)) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                c.ack(&p);
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(raw::RecvError::Timeout) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        got,
        vec!["m0", "m1", "m2", "m3", "m4"],
        "5 queued (oldest kept, newest dropped)"
    );
    // The session works normally afterwards.
    publisher.publish1("mq/t", b"live", false, 99);
    assert_eq!(c.recv_publish().payload, b"live");
}
