//! A minimal MQTT 3.1.1 codec for the device side (OASIS MQTT 3.1.1, chapters 2 and 3).
//!
//! Encoders write the packets a client sends (CONNECT, PUBLISH, PUBACK, PUBREC, PUBCOMP,
//! SUBSCRIBE, PINGREQ, DISCONNECT) into a caller-provided buffer and return the length, or
//! [`EncodeError`] when it does not fit. [`decode`] parses every packet a server can send
//! (CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP) from a byte
//! slice without copying; anything else, and any malformed input, is a [`DecodeError`] value.
//! Nothing here allocates or panics on any input.

use core::ops::Range;

/// Packet type numbers (high nibble of the fixed header, spec 2.2.1).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// The largest value the Remaining Length field can carry (spec 2.2.3).
pub const MAX_REMAINING: usize = 268_435_455;

/// The buffer is too small for the packet, or a field is longer than MQTT allows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EncodeError;

/// Why bytes could not be decoded into a packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DecodeError {
    /// More bytes are needed; nothing is wrong yet.
    Incomplete,
    /// The bytes violate the packet layout (bad flags, lengths, UTF-8, packet id 0...).
    Malformed,
    /// A well-formed packet a server never sends to a client (CONNECT, SUBSCRIBE, ...).
    Unexpected,
}

/// An application message (PUBLISH), borrowed from the receive buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Publish<'a> {
    /// Well-formed UTF-8 (checked), kept as bytes: `core::str::from_utf8` and its tables cost
    /// more flash than the rest of the decoder.
    pub topic: &'a [u8],
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// Present exactly when `qos > 0`.
    pub pid: Option<u16>,
}

/// A packet a server sends to a client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Packet<'a> {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish(Publish<'a>),
    /// PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK (`kind`, a [`kind`] number): a packet id and
    /// nothing else, decoded by one shared path.
    Ack {
        kind: u8,
        pid: u16,
    },
    /// `codes`: one return code per requested filter (0, 1, 2 granted QoS; 0x80 failure).
    SubAck {
        pid: u16,
        codes: &'a [u8],
    },
    PingResp,
}

/// A fixed header: first byte, Remaining Length, and the header's own length in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    pub first: u8,
    pub remaining: usize,
    pub header_len: usize,
}

impl Header {
    /// Bytes in the whole packet.
    pub fn total(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Parses a fixed header. `Incomplete` when the Remaining Length is not all there yet;
/// `Malformed` when it uses more than four bytes (spec 2.2.3).
pub fn decode_header(buf: &[u8]) -> Result<Header, DecodeError> {
    let first = *buf.first().ok_or(DecodeError::Incomplete)?;
    let mut remaining: usize = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Err(DecodeError::Malformed);
        }
        let b = *buf.get(i).ok_or(DecodeError::Incomplete)?;
        remaining |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    Ok(Header {
        first,
        remaining,
        header_len: i,
    })
}

fn be16(b: &[u8], at: usize) -> Result<u16, DecodeError> {
    match (b.get(at), b.get(at + 1)) {
        (Some(&h), Some(&l)) => Ok(u16::from_be_bytes([h, l])),
        _ => Err(DecodeError::Malformed),
    }
}

/// Decodes one packet from the start of `buf`; returns it and the number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<(Packet<'_>, usize), DecodeError> {
    use DecodeError::{Malformed, Unexpected};
    let h = decode_header(buf)?;
    let total = h.total();
    let body = buf
        .get(h.header_len..total)
        .ok_or(DecodeError::Incomplete)?;
    let flags = h.first & 0x0f;
    let k = h.first >> 4;
    // A packet id, for the packets that start with one.
    let pid = match body {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    let packet = match k {
        kind::PUBLISH => Packet::Publish(decode_publish(flags, body)?),
        kind::CONNECT | kind::SUBSCRIBE | kind::UNSUBSCRIBE | kind::PINGREQ | kind::DISCONNECT => {
            return Err(Unexpected)
        }
        // Reserved types (0, 15), and fixed-header flags other than PUBREL's 0b0010 and 0 (2.2.2).
        0 | 15 => return Err(Malformed),
        _ if flags != if k == kind::PUBREL { 2 } else { 0 } => return Err(Malformed),
        kind::CONNACK => match *body {
            [ack, code] if ack & 0xfe == 0 => Packet::ConnAck {
                session_present: ack == 1,
                code,
            },
            _ => return Err(Malformed),
        },
        kind::PINGRESP if body.is_empty() => Packet::PingResp,
        kind::SUBACK => {
            let codes = body.get(2..).unwrap_or_default();
            if pid == 0 || codes.is_empty() || codes.iter().any(|&c| c > 2 && c != 0x80) {
                return Err(Malformed);
            }
            Packet::SubAck { pid, codes }
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK: exactly a non-zero packet id.
        kind::PUBACK..=kind::PUBCOMP | kind::UNSUBACK if body.len() == 2 && pid != 0 => {
            Packet::Ack { kind: k, pid }
        }
        _ => return Err(Malformed),
    };
    Ok((packet, total))
}

fn decode_publish(flags: u8, body: &[u8]) -> Result<Publish<'_>, DecodeError> {
    let qos = (flags >> 1) & 3;
    let dup = flags & 8 != 0;
    if qos == 3 || (qos == 0 && dup) {
        return Err(DecodeError::Malformed);
    }
    let tlen = be16(body, 0)? as usize;
    let topic_end = 2 + tlen;
    let topic_bytes = body.get(2..topic_end).ok_or(DecodeError::Malformed)?;
    // Topic names in a PUBLISH are UTF-8 and carry no wildcards and no NUL (3.3.2.1, 1.5.3).
    if !utf8_ok(topic_bytes)
        || topic_bytes.is_empty()
        || topic_bytes
            .iter()
            .any(|&b| b == b'+' || b == b'#' || b == 0)
    {
        return Err(DecodeError::Malformed);
    }
    let topic = topic_bytes;
    let (pid, rest) = if qos > 0 {
        let pid = be16(body, topic_end)?;
        if pid == 0 {
            return Err(DecodeError::Malformed);
        }
        (Some(pid), topic_end + 2)
    } else {
        (None, topic_end)
    };
    let payload = body.get(rest..).ok_or(DecodeError::Malformed)?;
    Ok(Publish {
        topic,
        payload,
        qos,
        retain: flags & 1 != 0,
        dup,
        pid,
    })
}

/// Well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
/// Each sequence is decoded to its code point, which is then range-checked: smaller in flash
/// than a table of valid second bytes per lead byte.
pub fn utf8_ok(b: &[u8]) -> bool {
    let mut it = b.iter();
    while let Some(&c) = it.next() {
        // Continuation bytes after this lead byte, and the smallest code point that needs them.
        let (n, min) = match c.leading_ones() {
            0 => continue,
            2 => (1, 0x80),
            3 => (2, 0x800),
            4 => (3, 0x1_0000),
            _ => return false,
        };
        let mut cp = (c & (0x3f >> n)) as u32;
        for _ in 0..n {
            match it.next() {
                Some(&d) if d & 0xc0 == 0x80 => cp = cp << 6 | (d & 0x3f) as u32,
                _ => return false,
            }
        }
        if cp < min || cp > 0x10_ffff || (0xd800..0xe000).contains(&cp) {
            return false;
        }
    }
    true
}

/// Room kept at the front of a packet buffer for the fixed header (1 byte + at most 4 of
/// Remaining Length).
pub const HEAD: usize = 5;

/// Writes one packet into a fixed buffer: the variable header and payload from [`HEAD`] on, then
/// [`Writer::finish`] puts the fixed header right in front of them, so no length has to be
/// computed up front and a payload (an event's JSON) can be serialized straight into place.
/// Writes that do not fit set a sticky failure instead of returning a `Result` each: every packet
/// the client sends goes through this one small path.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
    ok: bool,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        let ok = buf.len() >= HEAD;
        Writer { buf, at: HEAD, ok }
    }
    pub fn bytes(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.at..self.at.wrapping_add(b.len())) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.at += b.len();
            }
            None => self.ok = false,
        }
    }
    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes())
    }
    /// A length-prefixed UTF-8 string or binary field (spec 1.5.3), the concatenation of `parts`.
    pub fn field(&mut self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > u16::MAX as usize {
            self.ok = false;
        }
        self.u16(len as u16);
        for p in parts {
            self.bytes(p);
        }
    }
    /// The free space after what was written, to serialize into; then [`Writer::advance`].
    pub fn spare(&mut self) -> &mut [u8] {
        self.buf.get_mut(self.at..).unwrap_or_default()
    }
    /// Counts `n` bytes written into [`Writer::spare`]; a failure of that write is `None`.
    pub fn advance(&mut self, n: Option<usize>) {
        match n {
            Some(n) if n <= self.buf.len() - self.at => self.at += n,
            _ => self.ok = false,
        }
    }
    /// Writes the fixed header (first byte `first`) and returns where the packet is in the buffer.
    pub fn finish(self, first: u8) -> Result<Range<usize>, EncodeError> {
        let mut rem = self.at - HEAD;
        let n = if rem < 1 << 7 {
            1
        } else if rem < 1 << 14 {
            2
        } else if rem < 1 << 21 {
            3
        } else {
            4
        };
        if !self.ok || rem > MAX_REMAINING {
            return Err(EncodeError);
        }
        let start = HEAD - 1 - n;
        let Some((f, len)) = self
            .buf
            .get_mut(start..HEAD)
            .and_then(|h| h.split_first_mut())
        else {
            return Err(EncodeError);
        };
        *f = first;
        for b in len.iter_mut() {
            *b = rem as u8 | 0x80;
            rem >>= 7;
        }
        if let Some(last) = len.last_mut() {
            *last &= 0x7f;
        }
        Ok(start..self.at)
    }
}

/// A will message stored by the server at CONNECT.
#[derive(Clone, Copy, Debug)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
}

/// The variable header and payload of a CONNECT (spec 3.1).
#[derive(Clone, Copy, Debug)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub keep_alive_s: u16,
    pub clean_session: bool,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

/// The encoders below write a whole packet into `buf` and return where it is (see [`Writer`]).
pub type Encoded = Result<Range<usize>, EncodeError>;

/// Writes a CONNECT with protocol name "MQTT", level 4.
pub fn encode_connect(buf: &mut [u8], c: &Connect<'_>) -> Encoded {
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos & 3) << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    let mut o = Writer::new(buf);
    o.field(&[b"MQTT"]);
    o.bytes(&[4, flags]);
    o.u16(c.keep_alive_s);
    o.field(&[c.client_id.as_bytes()]);
    if let Some(w) = &c.will {
        o.field(&[w.topic.as_bytes()]);
        o.field(&[w.payload]);
    }
    if let Some(u) = c.username {
        o.field(&[u.as_bytes()]);
    }
    if let Some(p) = c.password {
        o.field(&[p]);
    }
    o.finish(kind::CONNECT << 4)
}

/// The first byte of a PUBLISH. DUP is set only when `qos > 0`.
pub fn publish_first(qos: u8, retain: bool, dup: bool) -> u8 {
    let qos = qos & 3;
    (kind::PUBLISH << 4) | (qos << 1) | retain as u8 | (((dup && qos > 0) as u8) << 3)
}

/// Writes a PUBLISH. `pid` is used only when `qos > 0` (and must then be non-zero).
pub fn encode_publish(
    buf: &mut [u8],
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    dup: bool,
    pid: u16,
) -> Encoded {
    let mut o = Writer::new(buf);
    o.field(&[topic.as_bytes()]);
    if qos & 3 > 0 {
        o.u16(pid);
    }
    o.bytes(payload);
    o.finish(publish_first(qos, retain, dup))
}

/// A packet that is a fixed header and a packet id: PUBACK, PUBREC, PUBREL, PUBCOMP.
pub fn encode_ack(buf: &mut [u8], first: u8, pid: u16) -> Encoded {
    let mut o = Writer::new(buf);
    o.u16(pid);
    o.finish(first)
}

/// PUBACK: acknowledges an incoming QoS 1 PUBLISH.
pub fn encode_puback(buf: &mut [u8], pid: u16) -> Encoded {
    encode_ack(buf, kind::PUBACK << 4, pid)
}

/// PUBREC: first answer to an incoming QoS 2 PUBLISH.
pub fn encode_pubrec(buf: &mut [u8], pid: u16) -> Encoded {
    encode_ack(buf, kind::PUBREC << 4, pid)
}

/// PUBCOMP: answer to PUBREL.
pub fn encode_pubcomp(buf: &mut [u8], pid: u16) -> Encoded {
    encode_ack(buf, kind::PUBCOMP << 4, pid)
}

/// SUBSCRIBE to one filter (fixed-header flags 0b0010, spec 3.8.1).
pub fn encode_subscribe(buf: &mut [u8], pid: u16, filter: &str, qos: u8) -> Encoded {
    let mut o = Writer::new(buf);
    o.u16(pid);
    o.field(&[filter.as_bytes()]);
    o.bytes(&[qos & 3]);
    o.finish((kind::SUBSCRIBE << 4) | 0x02)
}

/// PINGREQ.
pub fn encode_pingreq(buf: &mut [u8]) -> Encoded {
    Writer::new(buf).finish(kind::PINGREQ << 4)
}

/// DISCONNECT.
pub fn encode_disconnect(buf: &mut [u8]) -> Encoded {
    Writer::new(buf).finish(kind::DISCONNECT << 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut [u8]) -> Encoded) -> std::vec::Vec<u8> {
        let mut buf = [0u8; 512];
        let r = f(&mut buf).expect("fits");
        buf[r].to_vec()
    }

    #[test]
    fn connect_matches_spec_layout() {
        // Spec 3.1.2.10 example: keep alive 10, plus will and credentials.
        let c = Connect {
            client_id: "dev1",
            keep_alive_s: 10,
            clean_session: true,
            will: Some(Will {
                topic: "s/st",
                payload: b"offline",
                qos: 1,
                retain: true,
            }),
            username: Some("u"),
            password: Some(b"p"),
        };
        let got = enc(|b| encode_connect(b, &c));
        let mut want = vec![0x10, 0];
        want.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
        // username | password | will retain | will qos 1 | will | clean session
        want.push(0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02);
        want.extend_from_slice(&[0, 10]);
        want.extend_from_slice(&[0, 4, b'd', b'e', b'v', b'1']);
        want.extend_from_slice(&[0, 4, b's', b'/', b's', b't']);
        want.extend_from_slice(&[0, 7]);
        want.extend_from_slice(b"offline");
        want.extend_from_slice(&[0, 1, b'u', 0, 1, b'p']);
        want[1] = (want.len() - 2) as u8;
        assert_eq!(got, want);
    }

    #[test]
    fn minimal_connect() {
        let c = Connect {
            client_id: "",
            keep_alive_s: 60,
            clean_session: true,
            will: None,
            username: None,
            password: None,
        };
        assert_eq!(
            enc(|b| encode_connect(b, &c)),
            [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0]
        );
    }

    #[test]
    fn publish_layouts() {
        // Spec 3.3.2.3: topic "a/b", packet id 10.
        assert_eq!(
            enc(|b| encode_publish(b, "a/b", b"hi", 1, false, false, 10)),
            [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']
        );
        assert_eq!(
            enc(|b| encode_publish(b, "a/b", b"hi", 1, true, true, 0x0102)),
            [0x3b, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'h', b'i']
        );
        // QoS 0: no packet id, DUP never set.
        assert_eq!(
            enc(|b| encode_publish(b, "a", b"x", 0, true, true, 7)),
            [0x31, 4, 0, 1, b'a', b'x']
        );
    }

    #[test]
    fn remaining_length_multibyte() {
        // Spec 2.2.3 table: 128 -> 0x80 0x01, 16383 -> 0xff 0x7f.
        let payload = [b'z'; 128 - 3];
        let got = enc(|b| encode_publish(b, "a", &payload, 0, false, false, 0));
        assert_eq!(&got[..3], &[0x30, 0x80, 0x01]);
        assert_eq!(got.len(), 3 + 128);
        let h = decode_header(&[0x30, 0xff, 0x7f]).unwrap();
        assert_eq!((h.remaining, h.header_len), (16383, 3));
        let h = decode_header(&[0x30, 0xff, 0xff, 0xff, 0x7f]).unwrap();
        assert_eq!(h.remaining, MAX_REMAINING);
        assert_eq!(
            decode_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(DecodeError::Malformed)
        );
        assert_eq!(decode_header(&[0x30, 0xff]), Err(DecodeError::Incomplete));
    }

    #[test]
    fn subscribe_ping_disconnect_acks() {
        assert_eq!(
            enc(|b| encode_subscribe(b, 1, "a/#", 1)),
            [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1]
        );
        assert_eq!(enc(encode_pingreq), [0xc0, 0]);
        assert_eq!(enc(encode_disconnect), [0xe0, 0]);
        assert_eq!(enc(|b| encode_puback(b, 0x1234)), [0x40, 2, 0x12, 0x34]);
        assert_eq!(enc(|b| encode_pubrec(b, 5)), [0x50, 2, 0, 5]);
        assert_eq!(enc(|b| encode_pubcomp(b, 5)), [0x70, 2, 0, 5]);
    }

    #[test]
    fn encode_reports_small_buffers() {
        let mut small = [0u8; 5];
        assert_eq!(
            encode_publish(&mut small, "abc", b"x", 0, false, false, 0),
            Err(EncodeError)
        );
        assert_eq!(encode_pingreq(&mut small[..4]), Err(EncodeError));
        assert_eq!(encode_pingreq(&mut small), Ok(3..5));
        let mut buf = vec![0u8; 70_000];
        let long = "x".repeat(65_536);
        assert_eq!(
            encode_publish(&mut buf, &long, b"", 0, false, false, 0),
            Err(EncodeError)
        );
        let long = "x".repeat(65_535);
        let r = encode_publish(&mut buf, &long, b"", 0, false, false, 0).unwrap();
        assert_eq!(
            &buf[r.start..r.start + 6],
            &[0x30, 0x81, 0x80, 0x04, 0xff, 0xff]
        );
    }

    #[test]
    fn decodes_every_server_packet() {
        let cases: &[(&[u8], Packet<'_>)] = &[
            (
                &[0x20, 2, 0, 0],
                Packet::ConnAck {
                    session_present: false,
                    code: 0,
                },
            ),
            (
                &[0x20, 2, 1, 5],
                Packet::ConnAck {
                    session_present: true,
                    code: 5,
                },
            ),
            (
                &[0x40, 2, 0, 7],
                Packet::Ack {
                    kind: kind::PUBACK,
                    pid: 7,
                },
            ),
            (
                &[0x50, 2, 1, 0],
                Packet::Ack {
                    kind: kind::PUBREC,
                    pid: 256,
                },
            ),
            (
                &[0x62, 2, 0, 9],
                Packet::Ack {
                    kind: kind::PUBREL,
                    pid: 9,
                },
            ),
            (
                &[0x70, 2, 0, 9],
                Packet::Ack {
                    kind: kind::PUBCOMP,
                    pid: 9,
                },
            ),
            (
                &[0x90, 3, 0, 1, 1],
                Packet::SubAck {
                    pid: 1,
                    codes: &[1],
                },
            ),
            (
                &[0x90, 4, 0, 2, 0x80, 0],
                Packet::SubAck {
                    pid: 2,
                    codes: &[0x80, 0],
                },
            ),
            (
                &[0xb0, 2, 0, 3],
                Packet::Ack {
                    kind: kind::UNSUBACK,
                    pid: 3,
                },
            ),
            (&[0xd0, 0], Packet::PingResp),
        ];
        for (bytes, want) in cases {
            let (p, used) = decode(bytes).unwrap();
            assert_eq!(&p, want);
            assert_eq!(used, bytes.len());
            // Every prefix is Incomplete, never an error or a panic.
            for cut in 0..bytes.len() {
                assert_eq!(
                    decode(&bytes[..cut]),
                    Err(DecodeError::Incomplete),
                    "{bytes:?} cut {cut}"
                );
            }
        }
        let (p, _) = decode(&[0x3b, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']).unwrap();
        assert_eq!(
            p,
            Packet::Publish(Publish {
                topic: b"a/b",
                payload: b"hi",
                qos: 1,
                retain: true,
                dup: true,
                pid: Some(10)
            })
        );
        let (p, _) = decode(&[0x30, 4, 0, 1, b'a', b'x', 0xd0, 0]).unwrap();
        assert_eq!(
            p,
            Packet::Publish(Publish {
                topic: b"a",
                payload: b"x",
                qos: 0,
                retain: false,
                dup: false,
                pid: None
            })
        );
        // Empty payload (a retained message being cleared).
        let (p, _) = decode(&[0x31, 3, 0, 1, b'a']).unwrap();
        assert!(matches!(
            p,
            Packet::Publish(Publish {
                payload: b"",
                retain: true,
                ..
            })
        ));
    }

    #[test]
    fn rejects_malformed_and_client_packets() {
        let bad: &[&[u8]] = &[
            &[0x20, 3, 0, 0, 0],          // CONNACK wrong length
            &[0x20, 2, 2, 0],             // CONNACK reserved flag bits
            &[0x21, 2, 0, 0],             // CONNACK bad fixed-header flags
            &[0x40, 2, 0, 0],             // PUBACK packet id 0
            &[0x40, 3, 0, 1, 0],          // PUBACK too long
            &[0x60, 2, 0, 1],             // PUBREL without its 0b0010 flags
            &[0x90, 2, 0, 1],             // SUBACK without codes
            &[0x90, 3, 0, 1, 3],          // SUBACK invalid code
            &[0xd0, 1, 0],                // PINGRESP with a body
            &[0x36, 4, 0, 1, b'a', b'x'], // PUBLISH QoS 3
            &[0x38, 4, 0, 1, b'a', b'x'], // PUBLISH DUP with QoS 0
            &[0x30, 4, 0, 5, b'a', b'x'], // topic longer than the packet
            &[0x30, 4, 0, 2, 0xff, 0xfe], // topic not UTF-8
            &[0x30, 4, 0, 2, b'a', b'#'], // wildcard in a topic name
            &[0x30, 2, 0, 0],             // empty topic
            &[0x32, 5, 0, 1, b'a', 0, 0], // QoS 1 packet id 0
            &[0x32, 4, 0, 1, b'a', 0],    // QoS 1 truncated packet id
            &[0x00, 0],                   // reserved type 0
            &[0xf0, 0],                   // reserved type 15
        ];
        for b in bad {
            assert_eq!(decode(b).map(|x| x.0), Err(DecodeError::Malformed), "{b:?}");
        }
        for b in [
            &[0x10u8, 0][..],
            &[0x82, 0],
            &[0xa2, 0],
            &[0xc0, 0],
            &[0xe0, 0],
        ] {
            assert_eq!(
                decode(b).map(|x| x.0),
                Err(DecodeError::Unexpected),
                "{b:?}"
            );
        }
    }

    #[test]
    fn mqtt_packet_vectors() {
        // Byte-level cases from mqtt-packet's test suite (testdata/README.md).
        let text = include_str!("../testdata/mqtt-packet-vectors.json");
        let cases: std::vec::Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
        let (mut accepted, mut rejected) = (0, 0);
        for c in &cases {
            let Some(hex) = c["hex"].as_str() else {
                continue;
            };
            let bytes: std::vec::Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let result = decode(&bytes); // must not panic, whatever the case
            let v4 = c["protocolVersion"] == 4;
            let server_sent = matches!(
                bytes.first().map(|b| b >> 4),
                Some(2 | 3 | 4 | 5 | 6 | 7 | 9 | 11 | 13)
            );
            if !v4 || !server_sent {
                continue;
            }
            let name = c["name"].as_str().unwrap_or("");
            match c["kind"].as_str() {
                Some("parse_error") => {
                    assert!(result.is_err(), "accepted invalid case {name}: {hex}");
                    rejected += 1;
                }
                Some(
                    "parse_generate"
                    | "parse_only"
                    | "parse_and_generate"
                    | "parse_generate_defaults",
                ) => {
                    let (_, used) = result
                        .unwrap_or_else(|e| panic!("rejected valid case {name}: {hex}: {e:?}"));
                    assert_eq!(used, bytes.len(), "{name}");
                    accepted += 1;
                }
                _ => {}
            }
        }
        assert!(
            accepted >= 15 && rejected >= 11,
            "accepted {accepted} rejected {rejected}"
        );
    }

    #[test]
    fn utf8_check_matches_core() {
        let cases: &[&[u8]] = &[
            b"abc",
            "é€😀".as_bytes(),
            b"\xc0\x80",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
            b"\xe2\x82",
            b"\xff",
            b"\xf0\x9f\x98\x80",
        ];
        for c in cases {
            assert_eq!(utf8_ok(c), core::str::from_utf8(c).is_ok(), "{c:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn utf8_agrees(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..12)) {
            proptest::prop_assert_eq!(utf8_ok(&bytes), core::str::from_utf8(&bytes).is_ok());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            match decode(&bytes) {
                Ok((_, used)) => proptest::prop_assert!(used <= bytes.len()),
                Err(_) => {}
            }
        }

        #[test]
        fn publish_round_trips(topic in "[a-z/]{1,40}", payload in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
                               qos in 0u8..2, retain: bool, pid in 1u16..) {
            let mut buf = [0u8; 400];
            let r = encode_publish(&mut buf, &topic, &payload, qos, retain, false, pid).unwrap();
            let (p, used) = decode(&buf[r.clone()]).unwrap();
            proptest::prop_assert_eq!(used, r.len());
            let want = Publish { topic: topic.as_bytes(), payload: &payload, qos, retain, dup: false, pid: if qos > 0 { Some(pid) } else { None } };
            proptest::prop_assert_eq!(p, Packet::Publish(want));
        }
    }
}
