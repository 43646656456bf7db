//! Issue 17, "SUBACK, UNSUBACK and CONNACK-with-session after the session record is
//! durable, as PUBACK is": against the real `waystation`, a persistent (clean session 0)
//! client's CONNACK, SUBACK or UNSUBACK is read, and the daemon is SIGKILLed that instant,
//! many times over; after each restart what the client was told must hold (its session
//! exists, it receives what it subscribed to, it does not receive what it unsubscribed
//! from). Also: retained messages come after the SUBACK that grants their filter, also when
//! that SUBACK waits for the disk.
//!
//! The raw client (tests/src/raw.rs) sends each packet and reads exactly its answer, so the
//! kill lands within microseconds of the acknowledgement: an ack sent before the group
//! commit's fsync would, almost every time, be followed by a restart without the record.

mod reliability_common;

use std::time::Instant;

use reliability_common::persistent;
use waystation_e2e::raw::{self, Pkt, RawClient};
use waystation_e2e::Waystation;

/// Kills per test: each is a restart, ~0.1-0.5 s.
const ROUNDS: usize = 25;

/// A retained QoS 1 publish (always written to the store), acknowledged only once durable:
/// commits are durable in order, so everything written before it is on disk too. Lets a
/// test make earlier state durable without relying on the ack it does not test.
fn barrier(ws: &Waystation, round: usize) {
    let mut c = RawClient::connect(ws.addr, &format!("barrier-{round}"));
    c.publish1(&format!("durable/barrier/{round}"), b"b", true, 1);
    c.disconnect();
}

/// Reads the next packet, which must be the CONNACK; returns session present (code 0).
fn read_connack(c: &mut RawClient, what: &str) -> bool {
    match c.recv() {
        Pkt::ConnAck {
            session_present,
            code: 0,
        } => session_present,
        other => panic!("{what}: expected CONNACK 0, got {other:?}"),
    }
}

// Breaks if: CONNACK to a new persistent session goes out before its session record is
// durable (the session is gone after the SIGKILL: session present 0 on reconnect).
#[test]
fn connack_of_a_new_persistent_session_means_it_survives_sigkill() {
    let started = Instant::now();
    let mut ws = Waystation::start();
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        let id = format!("connack-{round}");
        let mut c = RawClient::tcp(ws.addr);
        c.send(&persistent(&id).encode());
        let present = read_connack(&mut c, &id);
        ws.kill();
        assert!(!present, "{id} is a new session");
        drop(c);
        ws.restart();
        let (c, present) = RawClient::connect_ok(ws.addr, &persistent(&id));
        if !present {
            lost.push(id);
        }
        drop(c);
    }
    assert!(
        lost.is_empty(),
        "sessions acknowledged by CONNACK and lost in a SIGKILL right after it ({} of {ROUNDS}): {lost:?}",
        lost.len()
    );
    println!(
        "connack: {ROUNDS} SIGKILLs right after CONNACK, every session kept, {:.1?}",
        started.elapsed()
    );
}

// The session itself is made durable first (a barrier), so only the SUBACK is tested.
//
// Breaks if: SUBACK for a persistent session goes out before the session record holding the
// new filter is durable: after the SIGKILL, the session is gone (session present 0) or has no
// such subscription, and the message published to the topic after the restart is not
// delivered when the client comes back.
#[test]
fn suback_means_the_subscription_survives_sigkill() {
    let started = Instant::now();
    let mut ws = Waystation::start();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let id = format!("suback-{round}");
        let topic = format!("durable/sub/{round}");
        let (mut c, present) = RawClient::connect_ok(ws.addr, &persistent(&id));
        assert!(!present, "{id} is a new session");
        barrier(&ws, round);
        c.send(&raw::subscribe(1, &[(topic.as_str(), 1)]));
        let reply = c.recv();
        ws.kill();
        assert_eq!(
            reply,
            Pkt::SubAck {
                pid: 1,
                codes: vec![1]
            },
            "{id}: SUBACK granting QoS 1"
        );
        drop(c);
        ws.restart();

        let mut publisher = RawClient::connect(ws.addr, &format!("suback-pub-{round}"));
        publisher.publish1(&topic, format!("m{round}").as_bytes(), false, 1);
        let (mut c, present) = RawClient::connect_ok(ws.addr, &persistent(&id));
        if !present {
            failures.push(format!("{id}: session lost (session present 0)"));
            continue;
        }
        match c.recv_timeout(raw::RECV_TIMEOUT) {
            Ok(Pkt::Publish(p)) if p.topic == topic && p.payload == format!("m{round}").as_bytes() => {
                c.ack(&p)
            }
            other => failures.push(format!(
                "{id}: the message on {topic} published after the restart was not delivered: {other:?}"
            )),
        }
        c.disconnect();
    }
    assert!(
        failures.is_empty(),
        "subscriptions acknowledged by SUBACK and lost in a SIGKILL right after it ({} of {ROUNDS}): {failures:?}",
        failures.len()
    );
    println!(
        "suback: {ROUNDS} SIGKILLs right after SUBACK, every subscription kept, {:.1?}",
        started.elapsed()
    );
}

// The session and both subscriptions are made durable first (a barrier), so only the
// UNSUBACK is tested.
//
// Breaks if: UNSUBACK for a persistent session goes out before the shrunk session record is
// durable: after the SIGKILL the old record (still subscribed) is recovered and the message
// on the unsubscribed topic is delivered, ahead of the one on the topic still subscribed.
#[test]
fn unsuback_means_the_unsubscription_survives_sigkill() {
    let started = Instant::now();
    let mut ws = Waystation::start();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let id = format!("unsuback-{round}");
        let gone = format!("durable/unsub/{round}/gone");
        let kept = format!("durable/unsub/{round}/kept");
        let (mut c, present) = RawClient::connect_ok(ws.addr, &persistent(&id));
        assert!(!present, "{id} is a new session");
        c.subscribe_ok(1, &[(gone.as_str(), 1), (kept.as_str(), 1)]);
        barrier(&ws, round);
        c.send(&raw::unsubscribe(2, &[gone.as_str()]));
        let reply = c.recv();
        ws.kill();
        assert_eq!(reply, Pkt::UnsubAck(2), "{id}: UNSUBACK");
        drop(c);
        ws.restart();

        // Queued for the absent session in this order: a message on the unsubscribed topic,
        // then one on the topic still subscribed. The first delivery must be the second.
        let mut publisher = RawClient::connect(ws.addr, &format!("unsuback-pub-{round}"));
        publisher.publish1(&gone, b"must not arrive", false, 1);
        publisher.publish1(&kept, b"kept", false, 2);
        let (mut c, present) = RawClient::connect_ok(ws.addr, &persistent(&id));
        if !present {
            failures.push(format!("{id}: session lost (session present 0)"));
            continue;
        }
        match c.recv_timeout(raw::RECV_TIMEOUT) {
            Ok(Pkt::Publish(p)) if p.topic == kept => c.ack(&p),
            Ok(Pkt::Publish(p)) if p.topic == gone => failures.push(format!(
                "{id}: delivered a message on {gone}, unsubscribed (UNSUBACK) before the SIGKILL"
            )),
            other => failures.push(format!(
                "{id}: expected the message on {kept}, got {other:?}"
            )),
        }
        c.disconnect();
    }
    assert!(
        failures.is_empty(),
        "unsubscriptions acknowledged by UNSUBACK and undone by a SIGKILL right after it ({} of {ROUNDS}): {failures:?}",
        failures.len()
    );
    println!(
        "unsuback: {ROUNDS} SIGKILLs right after UNSUBACK, every unsubscription kept, {:.1?}",
        started.elapsed()
    );
}

// Breaks if: the retained messages for a new subscription are sent before its SUBACK (now
// that the SUBACK of a persistent session waits for the disk, they would overtake it), or
// not at all, or without the retain flag [MQTT-3.3.1-6]; for a clean and a persistent
// session, with one and with two retained topics matched.
#[test]
fn retained_messages_follow_the_suback() {
    let ws = Waystation::start();
    let mut setter = RawClient::connect(ws.addr, "retainer");
    for round in 0..20u16 {
        let a = format!("durable/ret/{round}/a");
        let b = format!("durable/ret/{round}/b");
        setter.publish1(&a, format!("a{round}").as_bytes(), true, round * 2 + 1);
        setter.publish1(&b, format!("b{round}").as_bytes(), true, round * 2 + 2);
        let clean = round % 2 == 0;
        let connect = persistent(&format!("ret-sub-{round}")).clean(clean);
        let (mut c, _) = RawClient::connect_ok(ws.addr, &connect);
        let (filters, want): (Vec<String>, Vec<String>) = if round % 4 < 2 {
            (vec![a.clone()], vec![a.clone()])
        } else {
            (
                vec![format!("durable/ret/{round}/+")],
                vec![a.clone(), b.clone()],
            )
        };
        let requested: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 1)).collect();
        c.send(&raw::subscribe(9, &requested));
        let what = format!("round {round} (clean session {clean}, filters {filters:?})");
        match c.recv() {
            Pkt::SubAck { pid: 9, codes } => assert_eq!(codes, vec![1], "{what}"),
            other => {
                panic!("{what}: the first packet after SUBSCRIBE must be its SUBACK, got {other:?}")
            }
        }
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let p = c.recv_publish();
            assert!(
                p.retain,
                "{what}: a retained message sent for a new subscription has RETAIN set"
            );
            c.ack(&p);
            got.push(p.topic);
        }
        got.sort();
        assert_eq!(got, want, "{what}: retained messages after the SUBACK");
        c.disconnect();
    }
}
