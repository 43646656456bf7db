//! Hand-built MQTT 5 packets for what no client library sends (AUTH, an alias above the
//! maximum, malformed properties, a DISCONNECT raising the session expiry from 0), on top
//! of [`crate::raw::RawClient`]: the broker's MQTT 5 answers arrive there as `Pkt::Other`
//! (their bodies carry reason codes and properties), and are read here.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::raw::{encode_remaining_length, mqtt_str, packet, Pkt, RawClient, RecvError};

/// Property identifiers used by the tests (MQTT 5.0, 2.2.2.2).
pub mod prop {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// A property list under construction (without its length prefix).
#[derive(Debug, Clone, Default)]
pub struct Props(pub Vec<u8>);

impl Props {
    pub fn new() -> Props {
        Props::default()
    }
    pub fn byte(mut self, id: u8, v: u8) -> Props {
        self.0.extend([id, v]);
        self
    }
    pub fn u16(mut self, id: u8, v: u16) -> Props {
        self.0.push(id);
        self.0.extend(v.to_be_bytes());
        self
    }
    pub fn u32(mut self, id: u8, v: u32) -> Props {
        self.0.push(id);
        self.0.extend(v.to_be_bytes());
        self
    }
    pub fn varint(mut self, id: u8, v: usize) -> Props {
        self.0.push(id);
        encode_remaining_length(v, &mut self.0);
        self
    }
    pub fn str(mut self, id: u8, s: &str) -> Props {
        self.0.push(id);
        mqtt_str(s.as_bytes(), &mut self.0);
        self
    }
    /// Raw bytes appended as they are (e.g. an unknown property id).
    pub fn raw(mut self, bytes: &[u8]) -> Props {
        self.0.extend_from_slice(bytes);
        self
    }
    /// The property length then the properties, as they go into a packet.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_remaining_length(self.0.len(), out);
        out.extend_from_slice(&self.0);
    }
}

/// An MQTT 5 CONNECT: clean start, keep-alive `keep_alive`, the given properties.
pub fn connect(client_id: &str, clean_start: bool, keep_alive: u16, props: &Props) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(b"MQTT", &mut body);
    body.push(5);
    body.push(if clean_start { 0x02 } else { 0x00 });
    body.extend(keep_alive.to_be_bytes());
    props.encode(&mut body);
    mqtt_str(client_id.as_bytes(), &mut body);
    packet(0x10, &body)
}

/// An MQTT 5 PUBLISH (QoS from `qos`; `pid` needed above 0).
pub fn publish(topic: &str, payload: &[u8], qos: u8, pid: Option<u16>, props: &Props) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(topic.as_bytes(), &mut body);
    if qos > 0 {
        body.extend(pid.expect("packet id for QoS > 0").to_be_bytes());
    }
    props.encode(&mut body);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// An MQTT 5 SUBSCRIBE of one filter with the options byte `options` (QoS in bits 0-1).
pub fn subscribe(pid: u16, filter: &str, options: u8, props: &Props) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    props.encode(&mut body);
    mqtt_str(filter.as_bytes(), &mut body);
    body.push(options);
    packet(0x82, &body)
}

/// An MQTT 5 DISCONNECT with a reason code and properties.
pub fn disconnect(reason: u8, props: &Props) -> Vec<u8> {
    let mut body = vec![reason];
    props.encode(&mut body);
    packet(0xE0, &body)
}

/// An AUTH packet (continue authentication, 0x18) naming `method`.
pub fn auth(method: &str) -> Vec<u8> {
    let mut body = vec![0x18];
    Props::new()
        .str(prop::AUTHENTICATION_METHOD, method)
        .encode(&mut body);
    packet(0xF0, &body)
}

/// An MQTT 5 CONNACK as read: session present, reason code, the raw properties.
#[derive(Debug, Clone)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason: u8,
    pub props: Vec<u8>,
}

/// Reads a variable byte integer at `at`; returns it and the bytes it took.
fn varint(bytes: &[u8], at: usize) -> (usize, usize) {
    let (mut value, mut mult, mut i) = (0usize, 1usize, at);
    while let Some(&b) = bytes.get(i) {
        value += usize::from(b & 0x7F) * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    (value, i - at)
}

/// A packet the v4 decoder kept raw, as MQTT 5 CONNACK; `None` if it is not one.
pub fn as_connack(p: &Pkt) -> Option<ConnAck> {
    match p {
        Pkt::Other { first_byte, body } if *first_byte == 0x20 && body.len() >= 2 => {
            let (len, n) = varint(body, 2);
            Some(ConnAck {
                session_present: body[0] & 1 == 1,
                reason: body[1],
                props: body.get(2 + n..2 + n + len).unwrap_or_default().to_vec(),
            })
        }
        Pkt::ConnAck {
            session_present,
            code,
        } => Some(ConnAck {
            session_present: *session_present,
            reason: *code,
            props: Vec::new(),
        }),
        _ => None,
    }
}

/// The reason code of a server DISCONNECT (0 when it has none); `None` if `p` is not one.
pub fn disconnect_reason(p: &Pkt) -> Option<u8> {
    match p {
        Pkt::Other { first_byte, body } if *first_byte == 0xE0 => {
            Some(body.first().copied().unwrap_or(0))
        }
        _ => None,
    }
}

/// The reason codes of an MQTT 5 SUBACK without properties (read by the v4 decoder, the
/// property length 0 comes first); panics on anything else.
pub fn suback_reasons(p: &Pkt) -> Vec<u8> {
    match p {
        Pkt::SubAck { codes, .. } if codes.first() == Some(&0) => codes[1..].to_vec(),
        other => panic!("expected an MQTT 5 SUBACK without properties, got {other:?}"),
    }
}

/// Connects with an MQTT 5 CONNECT and returns the client and its CONNACK.
pub fn connect_with(addr: SocketAddr, connect_bytes: &[u8]) -> (RawClient, ConnAck) {
    let mut c = RawClient::tcp(addr);
    c.send(connect_bytes);
    let p = c.recv();
    let ack = as_connack(&p).unwrap_or_else(|| panic!("expected an MQTT 5 CONNACK, got {p:?}"));
    (c, ack)
}

/// A clean-start MQTT 5 client, connected (CONNACK 0 asserted).
pub fn connect_ok(addr: SocketAddr, client_id: &str, props: &Props) -> RawClient {
    let (c, ack) = connect_with(addr, &connect(client_id, true, 60, props));
    assert_eq!(ack.reason, 0, "CONNACK reason code for {client_id:?}");
    c
}

/// Waits for the broker's DISCONNECT and then the close; returns its reason code. Panics
/// if the connection closes without one or stays open past `timeout`.
pub fn expect_disconnect(c: &mut RawClient, timeout: Duration) -> u8 {
    let deadline = Instant::now() + timeout;
    let mut before = Vec::new();
    let reason = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv_timeout(left) {
            Ok(p) => match disconnect_reason(&p) {
                Some(r) => break r,
                None => before.push(p),
            },
            Err(RecvError::Closed) => {
                panic!("closed without a DISCONNECT (received before: {before:?})")
            }
            Err(RecvError::Timeout) => {
                panic!("no DISCONNECT within {timeout:?} (received before: {before:?})")
            }
        }
    };
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "the connection stays open after the server's DISCONNECT [MQTT-4.13.2-1]"
    );
    reason
}
