//! Hostile MQTT 5 clients: malformed v5 packets sent over TCP to the real binary after a
//! valid v5 CONNECT (or as the CONNECT itself). Each bad connection is told why in a v5
//! DISCONNECT with the reason code the spec gives (0x81 Malformed Packet for what the codec
//! refuses, 0x82 Protocol Error, 0x94 Topic Alias invalid) and is then closed
//! ([MQTT-4.13.1-1]); a bad CONNECT gets no CONNACK 0x00. Throughout, a well-behaved
//! MQTT 3.1.1 pair and an MQTT 5 pair keep exchanging QoS 1 messages, and the broker never
//! panics.
//!
//! The v5 packets are built by hand here (tests/src/raw.rs speaks 3.1.1); what the broker
//! sends back is read with raw.rs and reinterpreted as MQTT 5 (properties stripped).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use waystation_e2e::raw::{self, Pkt, RawClient, RecvError};
use waystation_e2e::Waystation;

const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// The topic alias maximum the broker announces (broker/src/protocol/v5.rs).
const TOPIC_ALIAS_MAXIMUM: u16 = 16;

// ---------------------------------------------------------------------------------------
// MQTT 5 packets, by hand
// ---------------------------------------------------------------------------------------

fn varint(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    raw::encode_remaining_length(n, &mut out);
    out
}

/// A property block: its variable byte integer length, then `body` (id/value pairs).
fn props(body: &[u8]) -> Vec<u8> {
    [varint(body.len()), body.to_vec()].concat()
}

fn str_bytes(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    raw::mqtt_str(s, &mut out);
    out
}

/// An MQTT 5 CONNECT, clean start, keep-alive 60 s, with `properties` (a whole block).
fn connect5(client_id: &str, properties: &[u8]) -> Vec<u8> {
    let body = [
        str_bytes(b"MQTT"),
        vec![5, 0x02, 0, 60],
        properties.to_vec(),
        str_bytes(client_id.as_bytes()),
    ]
    .concat();
    raw::packet(0x10, &body)
}

/// An MQTT 5 PUBLISH with `properties` (a whole block); `pid` for QoS > 0.
fn publish5(topic: &str, payload: &[u8], qos: u8, pid: u16, properties: &[u8]) -> Vec<u8> {
    let mut body = str_bytes(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pid.to_be_bytes());
    }
    body.extend_from_slice(properties);
    body.extend_from_slice(payload);
    raw::packet(0x30 | (qos << 1), &body)
}

/// An MQTT 5 SUBSCRIBE of one filter with subscription `options` and `properties`.
fn subscribe5(pid: u16, filter: &str, options: u8, properties: &[u8]) -> Vec<u8> {
    let body = [
        pid.to_be_bytes().to_vec(),
        properties.to_vec(),
        str_bytes(filter.as_bytes()),
        vec![options],
    ]
    .concat();
    raw::packet(0x82, &body)
}

/// Property ids used below (MQTT 5.0, 2.2.2.2).
const MESSAGE_EXPIRY: u8 = 0x02;
const SUBSCRIPTION_ID: u8 = 0x0B;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS: u8 = 0x23;
const USER_PROPERTY: u8 = 0x26;

// ---------------------------------------------------------------------------------------
// What the broker sends an MQTT 5 client
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum P5 {
    ConnAck { reason: u8 },
    Publish(raw::Publish),
    PubAck { pid: u16, reason: u8 },
    SubAck { pid: u16, codes: Vec<u8> },
    Disconnect { reason: u8 },
    Other(Pkt),
}

/// Skips a property block at the head of `bytes`; `None` when it runs past the end.
fn after_properties(bytes: &[u8]) -> Option<&[u8]> {
    let (mut len, mut shift, mut at) = (0usize, 0, 0);
    loop {
        let b = *bytes.get(at)?;
        len |= usize::from(b & 0x7F) << shift;
        at += 1;
        shift += 7;
        if b & 0x80 == 0 || at == 4 {
            break;
        }
    }
    bytes.get(at + len..)
}

/// A packet as raw.rs (3.1.1) decoded it, read as the MQTT 5 packet it is.
fn as_v5(p: Pkt) -> P5 {
    match p {
        Pkt::Publish(mut publish) => match after_properties(&publish.payload) {
            Some(payload) => {
                publish.payload = payload.to_vec();
                P5::Publish(publish)
            }
            None => P5::Other(Pkt::Publish(publish)),
        },
        Pkt::PubAck(pid) => P5::PubAck { pid, reason: 0 },
        Pkt::SubAck { pid, codes } => match after_properties(&codes) {
            Some(codes) => P5::SubAck {
                pid,
                codes: codes.to_vec(),
            },
            None => P5::Other(Pkt::SubAck { pid, codes }),
        },
        Pkt::ConnAck { code, .. } => P5::ConnAck { reason: code },
        Pkt::Other {
            first_byte: 0x20,
            body,
        } if body.len() >= 2 => P5::ConnAck { reason: body[1] },
        Pkt::Other {
            first_byte: 0x40,
            body,
        } if body.len() >= 3 => P5::PubAck {
            pid: u16::from_be_bytes([body[0], body[1]]),
            reason: body[2],
        },
        // A DISCONNECT without a reason byte means 0x00 [MQTT-3.14.2.1].
        Pkt::Other {
            first_byte: 0xE0,
            body,
        } => P5::Disconnect {
            reason: body.first().copied().unwrap_or(0),
        },
        other => P5::Other(other),
    }
}

fn recv5(c: &mut RawClient, timeout: Duration) -> Result<P5, RecvError> {
    c.recv_timeout(timeout).map(as_v5)
}

fn expect5(c: &mut RawClient, what: &str) -> P5 {
    recv5(c, raw::RECV_TIMEOUT)
        .unwrap_or_else(|e| panic!("expected {what} within {:?}: {e:?}", raw::RECV_TIMEOUT))
}

/// An MQTT 5 client connected with CONNACK 0x00.
fn connect_v5(addr: SocketAddr, client_id: &str) -> RawClient {
    let mut c = RawClient::tcp(addr);
    c.send(&connect5(client_id, &props(&[])));
    match expect5(&mut c, "CONNACK") {
        P5::ConnAck { reason: 0 } => c,
        other => panic!("{client_id}: expected CONNACK 0x00, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Witnesses
// ---------------------------------------------------------------------------------------

/// Well-behaved clients of both versions: after each hostile act a 3.1.1 and an MQTT 5
/// publisher each send a QoS 1 message, and a 3.1.1 and an MQTT 5 subscriber both get both.
struct Witness {
    sub4: RawClient,
    sub5: RawClient,
    pub4: RawClient,
    pub5: RawClient,
    seq: u16,
}

impl Witness {
    fn new(ws: &Waystation) -> Witness {
        let mut sub4 = RawClient::connect(ws.addr, "witness-sub4");
        sub4.subscribe_ok(1, &[("witness/#", 1)]);
        let mut sub5 = connect_v5(ws.addr, "witness-sub5");
        sub5.send(&subscribe5(1, "witness/#", 1, &props(&[])));
        match expect5(&mut sub5, "SUBACK") {
            P5::SubAck { pid: 1, codes } if codes == [1] => {}
            other => panic!("witness-sub5: expected SUBACK granting QoS 1, got {other:?}"),
        }
        Witness {
            sub4,
            sub5,
            pub4: RawClient::connect(ws.addr, "witness-pub4"),
            pub5: connect_v5(ws.addr, "witness-pub5"),
            seq: 0,
        }
    }

    fn check(&mut self, after: &str) {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let from4 = format!("v4 after {after} #{seq}");
        let from5 = format!("v5 after {after} #{seq}");
        self.pub4
            .publish1("witness/v4", from4.as_bytes(), false, seq);
        // The first v5 message sets topic alias 1, every later one publishes by the alias
        // alone (an empty topic), with a user property.
        let (topic, mut properties) = if seq == 1 {
            ("witness/v5", vec![TOPIC_ALIAS, 0, 1])
        } else {
            ("", vec![TOPIC_ALIAS, 0, 1])
        };
        properties.extend([USER_PROPERTY, 0, 1, b'k', 0, 1, b'v']);
        self.pub5.send(&publish5(
            topic,
            from5.as_bytes(),
            1,
            seq,
            &props(&properties),
        ));
        match expect5(&mut self.pub5, "PUBACK") {
            P5::PubAck { pid, reason: 0 } if pid == seq => {}
            other => {
                panic!("witness-pub5 after {after}: expected PUBACK({seq}) 0x00, got {other:?}")
            }
        }
        let want = [
            ("witness/v4".to_string(), from4.into_bytes()),
            ("witness/v5".to_string(), from5.into_bytes()),
        ];
        for (name, sub, v5) in [
            ("witness-sub4", &mut self.sub4, false),
            ("witness-sub5", &mut self.sub5, true),
        ] {
            let mut got = Vec::new();
            for _ in 0..2 {
                let p = if v5 {
                    match expect5(sub, "PUBLISH") {
                        P5::Publish(p) => p,
                        other => panic!("{name} after {after}: expected PUBLISH, got {other:?}"),
                    }
                } else {
                    sub.recv_publish()
                };
                let pid = p.pid.expect("QoS 1 delivery has a packet id");
                sub.send(&raw::puback(pid));
                got.push((p.topic, p.payload));
            }
            got.sort();
            assert_eq!(got, want, "{name}: witness messages after {after}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// Sends `bytes` after a valid MQTT 5 CONNECT and checks that the broker answers with a
/// DISCONNECT carrying `reason` and nothing else, then closes.
fn check_disconnect(ws: &Waystation, name: &str, bytes: &[u8], reason: u8) -> Result<(), String> {
    let mut c = connect_v5(ws.addr, "hostile5");
    let _ = c.try_send(bytes);
    let got = read_until_closed(&mut c, name)?;
    if got != [P5::Disconnect { reason }] {
        return Err(format!(
            "{name}: expected DISCONNECT 0x{reason:02x} then close, got {got:02x?}"
        ));
    }
    Ok(())
}

/// Sends `bytes` as the first packet (a bad CONNECT) and checks that the broker closes the
/// connection having sent nothing, or only a CONNACK refusing it (0x80 or above).
fn check_connect_refused(ws: &Waystation, name: &str, bytes: &[u8]) -> Result<(), String> {
    let mut c = RawClient::tcp(ws.addr);
    let _ = c.try_send(bytes);
    let got = read_until_closed(&mut c, name)?;
    match got.as_slice() {
        [] => Ok(()),
        [P5::ConnAck { reason }] if *reason >= 0x80 => Ok(()),
        other => Err(format!(
            "{name}: expected a close (or a refusing CONNACK), got {other:02x?}"
        )),
    }
}

fn read_until_closed(c: &mut RawClient, name: &str) -> Result<Vec<P5>, String> {
    let deadline = Instant::now() + CLOSE_WAIT;
    let mut got = Vec::new();
    loop {
        match recv5(c, deadline.saturating_duration_since(Instant::now())) {
            Ok(p) => got.push(p),
            Err(RecvError::Closed) => return Ok(got),
            Err(RecvError::Timeout) => {
                return Err(format!(
                    "{name}: connection still open after {CLOSE_WAIT:?} (broker sent {got:02x?})"
                ))
            }
        }
    }
}

// Each malformed or forbidden MQTT 5 packet closes only its own connection, with the
// reason code in a DISCONNECT first:
// - 0x81 Malformed Packet for what the decoder (rmqtt-codec) refuses while parsing: an
//   unknown property id, a property given twice (the spec calls a repeated property a
//   Protocol Error, 0x82 would fit as well), a property length past the end of the packet,
//   topic alias 0 [MQTT-3.3.2-8], subscription identifier 0 (3.8.2.1.2);
// - 0x94 Topic Alias invalid for an alias above the maximum the CONNACK announced
//   [MQTT-3.3.2-9];
// - 0x82 Protocol Error for an AUTH when no authentication method was agreed
//   [MQTT-4.12.0-1], for a PUBLISH from a client carrying a subscription identifier
//   [MQTT-3.3.4-6], and for a PUBLISH by an alias that was never set (3.3.2.3.4).
// A CONNECT with receive maximum 0 (3.1.2.11.3: a Protocol Error) is closed without a
// CONNACK 0x00: closing without any CONNACK is what the broker does, and the spec allows
// it (4.13.1: the CONNACK 0x80+ is a MAY).
#[test]
fn malformed_v5_packets_get_their_reason_code_and_close_only_their_connection() {
    let ws = Waystation::start();
    let mut witness = Witness::new(&ws);
    witness.check("start");

    let expiry = |secs: u32| [&[MESSAGE_EXPIRY][..], &secs.to_be_bytes()].concat();
    let alias = |n: u16| [&[TOPIC_ALIAS][..], &n.to_be_bytes()].concat();
    let topic = "hostile/t";
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "PUBLISH with an unknown property id (0x7F)",
            publish5(topic, b"x", 1, 1, &props(&[0x7F, 0, 1])),
            0x81,
        ),
        (
            "PUBLISH with the message expiry interval twice",
            publish5(topic, b"x", 1, 1, &props(&[expiry(5), expiry(6)].concat())),
            0x81,
        ),
        (
            "PUBLISH whose property length runs past the packet",
            raw::packet(
                0x32,
                &[str_bytes(topic.as_bytes()), vec![0, 1, 40], expiry(5)].concat(),
            ),
            0x81,
        ),
        (
            "PUBLISH with topic alias 0",
            publish5(topic, b"x", 1, 1, &props(&alias(0))),
            0x81,
        ),
        (
            "SUBSCRIBE with subscription identifier 0",
            subscribe5(1, "hostile/#", 1, &props(&[SUBSCRIPTION_ID, 0])),
            0x81,
        ),
        (
            "PUBLISH with a topic alias above the maximum",
            publish5(topic, b"x", 1, 1, &props(&alias(TOPIC_ALIAS_MAXIMUM + 1))),
            0x94,
        ),
        (
            "QoS 0 PUBLISH with topic alias 65535",
            publish5(topic, b"x", 0, 0, &props(&alias(u16::MAX))),
            0x94,
        ),
        ("AUTH with no properties", vec![0xF0, 0x00], 0x82),
        (
            "AUTH continuing a method (0x18)",
            raw::packet(
                0xF0,
                &[
                    vec![0x18],
                    props(&[&[0x15][..], &str_bytes(b"SCRAM-SHA-1")].concat()),
                ]
                .concat(),
            ),
            0x82,
        ),
        (
            "PUBLISH with a subscription identifier",
            publish5(topic, b"x", 1, 1, &props(&[SUBSCRIPTION_ID, 3])),
            0x82,
        ),
        (
            "PUBLISH by a topic alias never set",
            publish5("", b"x", 1, 1, &props(&alias(5))),
            0x82,
        ),
    ];
    let mut failures = Vec::new();
    for (name, bytes, reason) in &cases {
        if let Err(e) = check_disconnect(&ws, name, bytes, *reason) {
            failures.push(format!("{e} [bytes {bytes:02x?}]"));
        }
        witness.check(name);
    }

    let connects: Vec<(&str, Vec<u8>)> = vec![
        (
            "CONNECT with receive maximum 0",
            connect5("hostile5", &props(&[RECEIVE_MAXIMUM, 0, 0])),
        ),
        (
            "CONNECT with receive maximum twice",
            connect5(
                "hostile5",
                &props(&[RECEIVE_MAXIMUM, 0, 5, RECEIVE_MAXIMUM, 0, 6]),
            ),
        ),
        (
            "CONNECT with an unknown property id (0x01, a PUBLISH property)",
            connect5("hostile5", &props(&[0x01, 1])),
        ),
    ];
    for (name, bytes) in &connects {
        if let Err(e) = check_connect_refused(&ws, name, bytes) {
            failures.push(format!("{e} [bytes {bytes:02x?}]"));
        }
        witness.check(name);
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile MQTT 5 cases not handled as expected:\n{}",
        failures.len(),
        cases.len() + connects.len(),
        failures.join("\n")
    );
    let logs = ws.logs();
    assert!(!logs.contains("panicked"), "the broker panicked:\n{logs}");
}
