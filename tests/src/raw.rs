//! Raw MQTT 3.1.1 packets over a std `TcpStream`, for protocol-level end-to-end tests:
//! hand-built bytes (so a test can send exactly what it means, malformed included) and a
//! small strict decoder for what the broker sends back (flags included: DUP, RETAIN, QoS).
//!
//! Every read here is bounded by a timeout; nothing can hang a test.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Default wait for a packet the test expects.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// The MQTT variable byte integer ("remaining length").
pub fn encode_remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// A whole packet: first byte, remaining length, body.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    encode_remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A UTF-8 encoded string: two-byte big-endian length, then the bytes.
pub fn mqtt_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

impl Will {
    pub fn new(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Will {
        Will {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
        }
    }
}

/// Everything a CONNECT can say; `Connect::new(id)` is a valid MQTT 3.1.1 CONNECT with
/// clean session 1 and keep-alive 60 s.
#[derive(Debug, Clone)]
pub struct Connect {
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub protocol_name: String,
    pub protocol_level: u8,
    /// When set, replaces the connect flags byte computed from the fields above.
    pub flags_override: Option<u8>,
}

impl Connect {
    pub fn new(client_id: &str) -> Connect {
        Connect {
            client_id: client_id.into(),
            clean_session: true,
            keep_alive: 60,
            will: None,
            username: None,
            password: None,
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            flags_override: None,
        }
    }
    pub fn clean(mut self, clean: bool) -> Connect {
        self.clean_session = clean;
        self
    }
    pub fn keep_alive(mut self, secs: u16) -> Connect {
        self.keep_alive = secs;
        self
    }
    pub fn will(mut self, will: Will) -> Connect {
        self.will = Some(will);
        self
    }
    pub fn level(mut self, level: u8) -> Connect {
        self.protocol_level = level;
        self
    }

    pub fn flags(&self) -> u8 {
        if let Some(f) = self.flags_override {
            return f;
        }
        let mut flags = 0u8;
        if self.clean_session {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        flags
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        mqtt_str(self.protocol_name.as_bytes(), &mut body);
        body.push(self.protocol_level);
        body.push(self.flags());
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        mqtt_str(self.client_id.as_bytes(), &mut body);
        if let Some(w) = &self.will {
            mqtt_str(w.topic.as_bytes(), &mut body);
            mqtt_str(&w.payload, &mut body);
        }
        if let Some(u) = &self.username {
            mqtt_str(u.as_bytes(), &mut body);
        }
        if let Some(p) = &self.password {
            mqtt_str(p, &mut body);
        }
        packet(0x10, &body)
    }
}

/// PUBLISH with explicit flags. `pid` must be Some for QoS > 0.
pub fn publish(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    dup: bool,
    pid: Option<u16>,
) -> Vec<u8> {
    let mut first = 0x30 | (qos << 1);
    if retain {
        first |= 0x01;
    }
    if dup {
        first |= 0x08;
    }
    let mut body = Vec::new();
    mqtt_str(topic.as_bytes(), &mut body);
    if qos > 0 {
        body.extend_from_slice(
            &pid.expect("QoS > 0 PUBLISH needs a packet id")
                .to_be_bytes(),
        );
    }
    body.extend_from_slice(payload);
    packet(first, &body)
}

pub fn puback(pid: u16) -> Vec<u8> {
    packet(0x40, &pid.to_be_bytes())
}
pub fn pubrec(pid: u16) -> Vec<u8> {
    packet(0x50, &pid.to_be_bytes())
}
pub fn pubrel(pid: u16) -> Vec<u8> {
    packet(0x62, &pid.to_be_bytes())
}
pub fn pubcomp(pid: u16) -> Vec<u8> {
    packet(0x70, &pid.to_be_bytes())
}
pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}
pub fn disconnect() -> Vec<u8> {
    vec![0xE0, 0x00]
}

pub fn subscribe(pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    for (f, q) in filters {
        mqtt_str(f.as_bytes(), &mut body);
        body.push(*q);
    }
    packet(0x82, &body)
}

pub fn unsubscribe(pid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    for f in filters {
        mqtt_str(f.as_bytes(), &mut body);
    }
    packet(0xA2, &body)
}

/// Hex string (as in the shared vectors) to bytes.
pub fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len() % 2 == 0, "odd hex length: {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or_else(|e| panic!("bad hex {hex}: {e}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Decoding (server -> client packets)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub pid: Option<u16>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    SubAck {
        pid: u16,
        codes: Vec<u8>,
    },
    UnsubAck(u16),
    PingResp,
    /// Anything a server must not send a client (or a malformed packet): kept raw.
    Other {
        first_byte: u8,
        body: Vec<u8>,
    },
}

fn two(body: &[u8]) -> Option<u16> {
    (body.len() == 2).then(|| u16::from_be_bytes([body[0], body[1]]))
}

/// Decodes one complete packet; anything not well-formed as MQTT 3.1.1 server output
/// becomes `Pkt::Other` (tests then fail on it with the bytes in the message).
pub fn decode(first_byte: u8, body: &[u8]) -> Pkt {
    let other = || Pkt::Other {
        first_byte,
        body: body.to_vec(),
    };
    let flags = first_byte & 0x0F;
    match first_byte >> 4 {
        2 if flags == 0 && body.len() == 2 && body[0] & 0xFE == 0 => Pkt::ConnAck {
            session_present: body[0] & 1 == 1,
            code: body[1],
        },
        3 => {
            let qos = (flags >> 1) & 3;
            if qos == 3 || body.len() < 2 {
                return other();
            }
            let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2 + tlen;
            if body.len() < at {
                return other();
            }
            let Ok(topic) = String::from_utf8(body[2..at].to_vec()) else {
                return other();
            };
            let pid = if qos > 0 {
                if body.len() < at + 2 {
                    return other();
                }
                let p = u16::from_be_bytes([body[at], body[at + 1]]);
                at += 2;
                Some(p)
            } else {
                None
            };
            Pkt::Publish(Publish {
                dup: flags & 0x08 != 0,
                qos,
                retain: flags & 0x01 != 0,
                topic,
                pid,
                payload: body[at..].to_vec(),
            })
        }
        4 if flags == 0 => two(body).map(Pkt::PubAck).unwrap_or_else(other),
        5 if flags == 0 => two(body).map(Pkt::PubRec).unwrap_or_else(other),
        6 if flags == 2 => two(body).map(Pkt::PubRel).unwrap_or_else(other),
        7 if flags == 0 => two(body).map(Pkt::PubComp).unwrap_or_else(other),
        9 if flags == 0 && body.len() >= 3 => Pkt::SubAck {
            pid: u16::from_be_bytes([body[0], body[1]]),
            codes: body[2..].to_vec(),
        },
        11 if flags == 0 => two(body).map(Pkt::UnsubAck).unwrap_or_else(other),
        13 if flags == 0 && body.is_empty() => Pkt::PingResp,
        _ => other(),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing complete arrived in time.
    Timeout,
    /// The peer closed the connection (EOF or reset) before a complete packet.
    Closed,
}

// ---------------------------------------------------------------------------------------
// A raw client
// ---------------------------------------------------------------------------------------

/// A TCP connection speaking hand-built MQTT.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Packets read while waiting for another one (e.g. PUBLISHes interleaved with a
    /// PUBREL); `recv` returns them first, in order.
    pending: std::collections::VecDeque<Pkt>,
}

impl RawClient {
    /// A TCP connection, nothing sent yet.
    pub fn tcp(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        RawClient::tcp_from(stream)
    }

    /// Wraps an already connected stream.
    pub fn tcp_from(stream: TcpStream) -> RawClient {
        stream.set_nodelay(true).ok();
        // A broker that stops reading without closing must not hang a writing test.
        stream.set_write_timeout(Some(Duration::from_secs(5))).ok();
        RawClient {
            stream,
            buf: Vec::new(),
            pending: Default::default(),
        }
    }

    /// Connects, sends `connect` and returns the CONNACK's (session_present, code).
    pub fn connect_with(addr: SocketAddr, connect: &Connect) -> (RawClient, bool, u8) {
        let mut c = RawClient::tcp(addr);
        c.send(&connect.encode());
        match c.recv() {
            Pkt::ConnAck {
                session_present,
                code,
            } => (c, session_present, code),
            other => panic!(
                "expected CONNACK for {:?}, got {other:?}",
                connect.client_id
            ),
        }
    }

    /// Connects with `connect` and asserts CONNACK 0; returns the client and session present.
    pub fn connect_ok(addr: SocketAddr, connect: &Connect) -> (RawClient, bool) {
        let (c, sp, code) = RawClient::connect_with(addr, connect);
        assert_eq!(code, 0, "CONNACK return code for {:?}", connect.client_id);
        (c, sp)
    }

    /// A clean-session client with keep-alive 60 s, connected.
    pub fn connect(addr: SocketAddr, client_id: &str) -> RawClient {
        let (c, sp) = RawClient::connect_ok(addr, &Connect::new(client_id));
        assert!(
            !sp,
            "clean session CONNACK must have session present 0 [MQTT-3.2.2-1]"
        );
        c
    }

    /// Sends bytes. Write errors are returned, not panicked on (a test of a hostile client
    /// expects the broker to cut it off mid-write).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes)
            .unwrap_or_else(|e| panic!("send to broker: {e}"));
    }

    /// Reads one packet within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Pkt, RecvError> {
        if let Some(p) = self.pending.pop_front() {
            return Ok(p);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.try_frame() {
                return Ok(p);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvError::Timeout);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream.set_read_timeout(Some(wait)).ok();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(RecvError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(RecvError::Closed),
            }
        }
    }

    fn try_frame(&mut self) -> Option<Pkt> {
        if self.buf.len() < 2 {
            return None;
        }
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut i = 1;
        loop {
            if i >= self.buf.len() {
                return None;
            }
            let b = self.buf[i];
            len += (b & 0x7F) as usize * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            assert!(
                i <= 4,
                "broker sent a malformed remaining length: {:02x?}",
                &self.buf[..i]
            );
        }
        if self.buf.len() < i + len {
            return None;
        }
        let first = self.buf[0];
        let body: Vec<u8> = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Some(decode(first, &body))
    }

    /// Reads one packet; panics if none arrives within `RECV_TIMEOUT`.
    pub fn recv(&mut self) -> Pkt {
        match self.recv_timeout(RECV_TIMEOUT) {
            Ok(p) => p,
            Err(e) => panic!("expected a packet from the broker within {RECV_TIMEOUT:?}: {e:?}"),
        }
    }

    /// Reads one packet that must be a PUBLISH.
    pub fn recv_publish(&mut self) -> Publish {
        match self.recv() {
            Pkt::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives (and the connection stays open) for `d`.
    pub fn expect_silence(&mut self, d: Duration) {
        match self.recv_timeout(d) {
            Err(RecvError::Timeout) => {}
            Err(RecvError::Closed) => panic!("connection closed, expected it to stay open"),
            Ok(p) => panic!("expected nothing for {d:?}, got {p:?}"),
        }
    }

    /// Waits until the broker closes the connection; returns the packets it sent before.
    /// Panics if the connection is still open after `timeout`.
    pub fn expect_closed(&mut self, timeout: Duration) -> Vec<Pkt> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_timeout(left) {
                Ok(p) => got.push(p),
                Err(RecvError::Closed) => return got,
                Err(RecvError::Timeout) => {
                    panic!("connection still open after {timeout:?} (received meanwhile: {got:?})")
                }
            }
        }
    }

    /// Whether the broker closed the connection within `timeout` (packets in between are
    /// ignored).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvError::Closed) => return true,
                Err(RecvError::Timeout) => return false,
            }
        }
    }

    /// SUBSCRIBE and wait for its SUBACK; returns the return codes.
    pub fn subscribe(&mut self, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe(pid, filters));
        match self.recv() {
            Pkt::SubAck { pid: p, codes } => {
                assert_eq!(
                    p, pid,
                    "SUBACK packet id must match the SUBSCRIBE's [MQTT-3.8.4-2]"
                );
                codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// SUBSCRIBE and assert every filter was granted the requested QoS.
    pub fn subscribe_ok(&mut self, pid: u16, filters: &[(&str, u8)]) {
        let codes = self.subscribe(pid, filters);
        let want: Vec<u8> = filters.iter().map(|(_, q)| *q).collect();
        assert_eq!(codes, want, "SUBACK return codes for {filters:?}");
    }

    /// UNSUBSCRIBE and wait for its UNSUBACK.
    pub fn unsubscribe(&mut self, pid: u16, filters: &[&str]) {
        self.send(&unsubscribe(pid, filters));
        match self.recv() {
            Pkt::UnsubAck(p) => assert_eq!(p, pid, "UNSUBACK packet id [MQTT-3.10.4-4]"),
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// QoS 0 publish (fire and forget).
    pub fn publish0(&mut self, topic: &str, payload: &[u8], retain: bool) {
        self.send(&publish(topic, payload, 0, retain, false, None));
    }

    /// QoS 1 publish; waits for its PUBACK.
    pub fn publish1(&mut self, topic: &str, payload: &[u8], retain: bool, pid: u16) {
        self.send(&publish(topic, payload, 1, retain, false, Some(pid)));
        match self.await_packet("PUBACK", |p| !matches!(p, Pkt::Publish(_))) {
            Pkt::PubAck(p) => assert_eq!(p, pid, "PUBACK packet id [MQTT-4.3.2-2]"),
            other => panic!("expected PUBACK({pid}), got {other:?}"),
        }
    }

    /// QoS 2 publish; runs PUBREC -> PUBREL -> PUBCOMP.
    pub fn publish2(&mut self, topic: &str, payload: &[u8], retain: bool, pid: u16) {
        self.send(&publish(topic, payload, 2, retain, false, Some(pid)));
        match self.await_packet("PUBREC", |p| !matches!(p, Pkt::Publish(_))) {
            Pkt::PubRec(p) => assert_eq!(p, pid, "PUBREC packet id [MQTT-4.3.3-2]"),
            other => panic!("expected PUBREC({pid}), got {other:?}"),
        }
        self.send(&pubrel(pid));
        match self.await_packet("PUBCOMP", |p| !matches!(p, Pkt::Publish(_))) {
            Pkt::PubComp(p) => assert_eq!(p, pid, "PUBCOMP packet id [MQTT-4.3.3-2]"),
            other => panic!("expected PUBCOMP({pid}), got {other:?}"),
        }
    }

    /// Publish at `qos` and complete its handshake.
    pub fn publish_qos(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool, pid: u16) {
        match qos {
            0 => self.publish0(topic, payload, retain),
            1 => self.publish1(topic, payload, retain, pid),
            2 => self.publish2(topic, payload, retain, pid),
            _ => panic!("qos {qos}"),
        }
    }

    /// PINGREQ, expect PINGRESP.
    pub fn ping(&mut self) {
        self.send(&pingreq());
        match self.recv() {
            Pkt::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    /// Acknowledges a received PUBLISH as a well-behaved receiver does (QoS 2 runs the
    /// whole PUBREC/PUBREL/PUBCOMP exchange).
    pub fn ack(&mut self, p: &Publish) {
        match p.qos {
            0 => {}
            1 => self.send(&puback(p.pid.unwrap())),
            2 => {
                let pid = p.pid.unwrap();
                self.send(&pubrec(pid));
                self.await_pubrel(pid);
                self.send(&pubcomp(pid));
            }
            q => panic!("qos {q}"),
        }
    }

    /// Waits (RECV_TIMEOUT) for the first packet `is_it` accepts; packets arriving before
    /// it (e.g. deliveries of the client's own publications interleaved with its acks) are
    /// kept, in order, for later `recv`s.
    pub fn await_packet(&mut self, what: &str, mut is_it: impl FnMut(&Pkt) -> bool) -> Pkt {
        if let Some(i) = self.pending.iter().position(&mut is_it) {
            return self.pending.remove(i).unwrap();
        }
        let deadline = Instant::now() + RECV_TIMEOUT;
        let mut held = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Read from the wire only: `pending` holds what earlier waits set aside.
            let pending = std::mem::take(&mut self.pending);
            let got = self.recv_timeout(left);
            self.pending = pending;
            match got {
                Ok(p) if is_it(&p) => break p,
                Ok(other) => held.push(other),
                Err(e) => {
                    panic!("expected {what} within {RECV_TIMEOUT:?}: {e:?} (meanwhile {held:?})")
                }
            }
        };
        self.pending.extend(held);
        found
    }

    /// Waits for PUBREL(pid); other packets arriving meanwhile are kept for `recv`.
    pub fn await_pubrel(&mut self, pid: u16) {
        self.await_packet(&format!("PUBREL({pid})"), |p| *p == Pkt::PubRel(pid));
    }

    /// Sends DISCONNECT and waits for the broker to close the socket [MQTT-3.14.4-1].
    pub fn disconnect(mut self) {
        self.send(&disconnect());
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self.closed_within(Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------------------
// Debian's mosquitto command-line clients
// ---------------------------------------------------------------------------------------

/// A `mosquitto_sub` running in the background, subscribed (its SUBACK seen) before
/// `start` returns; its message lines are collected from stdout.
pub struct MosquittoSub {
    _child: crate::ChildGuard,
    lines: std::sync::mpsc::Receiver<String>,
}

impl MosquittoSub {
    /// `mosquitto_sub -d -v -h 127.0.0.1 -p <port> <args>`; waits up to 10 s for its SUBACK.
    pub fn start(port: u16, args: &[&str]) -> MosquittoSub {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        // stdbuf -oL: mosquitto_sub's stdout is a pipe here, so without it stdio would hold
        // the SUBACK debug line (and messages) in a buffer until exit.
        let mut child = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-d",
                "-v",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mosquitto_sub (package mosquitto-clients)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("SUBACK") => break,
                Ok(_) => {}
                Err(_) => panic!("mosquitto_sub {args:?} got no SUBACK within 10 s"),
            }
        }
        MosquittoSub {
            _child: crate::ChildGuard(child),
            lines: rx,
        }
    }

    /// The next message line ("topic payload" with -v), skipping -d debug lines; None
    /// if none comes within `timeout`.
    pub fn next_message(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("Client ") || l.starts_with("Subscribed") => {}
                Ok(l) => return Some(l),
                Err(_) => return None,
            }
        }
    }

    /// The next raw stdout line (debug or message); None if none within `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Collects `n` message lines (within `timeout` overall); also returns the -d lines
    /// for received PUBLISHes seen meanwhile.
    pub fn collect(&self, n: usize, timeout: Duration) -> (Vec<String>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let (mut msgs, mut debug) = (Vec::new(), Vec::new());
        while msgs.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("received PUBLISH") => debug.push(l),
                Ok(l) if l.starts_with("Client ") || l.starts_with("Subscribed") => {}
                Ok(l) => msgs.push(l),
                Err(_) => break,
            }
        }
        (msgs, debug)
    }

    /// The -d debug line for the next received PUBLISH, e.g.
    /// "Client x received PUBLISH (d0, q1, r1, m1, 'topic', ... (5 bytes))".
    pub fn next_publish_debug(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("received PUBLISH") => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

/// Runs `mosquitto_pub -h 127.0.0.1 -p <port> <args>` to completion (10 s at most) and
/// asserts it exited 0.
pub fn mosquitto_pub(port: u16, args: &[&str]) {
    let (status, _) = crate::run_with_timeout(
        std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(10),
    );
    let status =
        status.unwrap_or_else(|| panic!("mosquitto_pub {args:?} did not finish within 10 s"));
    assert!(status.success(), "mosquitto_pub {args:?}: {status}");
}
