//! The stored message format: what the router puts in the durable log (and in the retained
//! and session-queue keyspaces) for one MQTT PUBLISH.
//!
//! This is a storage format, not an MQTT codec: hand-written, compact, length-prefixed, and
//! versioned by its first byte so that a later version can be read beside this one.
//!
//! Version 1 layout (all integers big-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format version = 1 |
//! | 1 | 1 | flags: bit 0 = retain, bits 1-2 = QoS (0..=2), other bits 0 |
//! | 2 | 8 | `received_at_ms` (unix milliseconds) |
//! | 10 | 2 + n | topic: u16 length, UTF-8 bytes |
//! | .. | 2 + n | origin (client id): u16 length, UTF-8 bytes |
//! | .. | 4 + n | payload: u32 length, bytes; the record ends exactly here |
//!
//! `received_at_ms` sits at a fixed offset so [`peek_received_at_ms`] can read the age of the
//! oldest log entry without decoding it. Decoding never panics: corrupt input is an error.

use bytes::{BufMut, Bytes, BytesMut};

/// First byte of every record written by this version.
pub const FORMAT_V1: u8 = 1;
const HEADER_LEN: usize = 1 + 1 + 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Unix time in milliseconds when the broker received the PUBLISH.
    pub received_at_ms: u64,
    /// Client id of the publisher.
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("record truncated in field {0}")]
    Truncated(&'static str),
    #[error("invalid flags byte {0:#04x}")]
    InvalidFlags(u8),
    #[error("field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    #[error("field {field} is {len} bytes, more than the format allows ({max})")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("QoS {0} is not 0, 1 or 2")]
    InvalidQos(u8),
}

impl StoredMessage {
    /// Size of the encoded record in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 2 + self.topic.len() + 2 + self.origin.len() + 4 + self.payload.len()
    }

    /// Encodes in the current format version.
    pub fn encode(&self) -> Result<Bytes, RecordError> {
        if self.qos > 2 {
            return Err(RecordError::InvalidQos(self.qos));
        }
        check_len("topic", self.topic.len(), u16::MAX as usize)?;
        check_len("origin", self.origin.len(), u16::MAX as usize)?;
        check_len("payload", self.payload.len(), u32::MAX as usize)?;
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        buf.put_u8(FORMAT_V1);
        buf.put_u8(u8::from(self.retain) | (self.qos << 1));
        buf.put_u64(self.received_at_ms);
        buf.put_u16(self.topic.len() as u16);
        buf.put_slice(self.topic.as_bytes());
        buf.put_u16(self.origin.len() as u16);
        buf.put_slice(self.origin.as_bytes());
        buf.put_u32(self.payload.len() as u32);
        buf.put_slice(&self.payload);
        Ok(buf.freeze())
    }

    /// Decodes a record of any known version. The payload shares `bytes` (no copy).
    pub fn decode(bytes: &Bytes) -> Result<StoredMessage, RecordError> {
        let version = *bytes.first().ok_or(RecordError::Empty)?;
        if version != FORMAT_V1 {
            return Err(RecordError::UnknownVersion(version));
        }
        let mut r = Reader { buf: bytes, pos: 1 };
        let flags = r.take(1, "flags")?[0];
        if flags & !0b111 != 0 {
            return Err(RecordError::InvalidFlags(flags));
        }
        let qos = flags >> 1;
        if qos > 2 {
            return Err(RecordError::InvalidQos(qos));
        }
        let received_at_ms = u64::from_be_bytes(r.array::<8>("received_at_ms")?);
        let topic_len = u16::from_be_bytes(r.array::<2>("topic length")?) as usize;
        let topic = utf8(r.take(topic_len, "topic")?, "topic")?;
        let origin_len = u16::from_be_bytes(r.array::<2>("origin length")?) as usize;
        let origin = utf8(r.take(origin_len, "origin")?, "origin")?;
        let payload_len = u32::from_be_bytes(r.array::<4>("payload length")?) as usize;
        let start = r.pos;
        r.take(payload_len, "payload")?;
        let payload = bytes.slice(start..r.pos);
        if r.pos != bytes.len() {
            return Err(RecordError::TrailingBytes(bytes.len() - r.pos));
        }
        Ok(StoredMessage {
            topic,
            payload,
            qos,
            retain: flags & 1 == 1,
            received_at_ms,
            origin,
        })
    }
}

/// Reads `received_at_ms` from an encoded record without decoding the rest.
/// `None` if the bytes are not a record of a known version.
pub fn peek_received_at_ms(bytes: &[u8]) -> Option<u64> {
    if bytes.first() != Some(&FORMAT_V1) {
        return None;
    }
    let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
    Some(u64::from_be_bytes(raw))
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), RecordError> {
    if len > max {
        Err(RecordError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

fn utf8(b: &[u8], field: &'static str) -> Result<String, RecordError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| RecordError::InvalidUtf8(field))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], RecordError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(RecordError::Truncated(field))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(RecordError::Truncated(field))?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], RecordError> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredMessage {
        StoredMessage {
            topic: "sensors/room-1/temp".into(),
            payload: Bytes::from_static(b"{\"c\":21.5}"),
            qos: 1,
            retain: true,
            received_at_ms: 1_700_000_000_123,
            origin: "dev-42".into(),
        }
    }

    #[test]
    fn record_roundtrip() {
        for qos in 0..=2 {
            for retain in [false, true] {
                let m = StoredMessage {
                    qos,
                    retain,
                    ..sample()
                };
                let enc = m.encode().unwrap();
                assert_eq!(enc.len(), m.encoded_len());
                assert_eq!(enc[0], FORMAT_V1);
                assert_eq!(StoredMessage::decode(&enc).unwrap(), m);
                assert_eq!(peek_received_at_ms(&enc), Some(m.received_at_ms));
            }
        }
        let empty = StoredMessage {
            topic: String::new(),
            payload: Bytes::new(),
            origin: String::new(),
            ..sample()
        };
        assert_eq!(
            StoredMessage::decode(&empty.encode().unwrap()).unwrap(),
            empty
        );
    }

    #[test]
    fn record_rejects_corrupt_bytes() {
        let enc = sample().encode().unwrap();
        // Every truncation is an error, never a panic.
        for n in 0..enc.len() {
            assert!(
                StoredMessage::decode(&enc.slice(..n)).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
        let mut v = enc.to_vec();
        v.push(0);
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v)),
            Err(RecordError::TrailingBytes(1))
        );
        let mut v = enc.to_vec();
        v[0] = 9;
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v)),
            Err(RecordError::UnknownVersion(9))
        );
        let mut v = enc.to_vec();
        v[1] = 0b110; // QoS 3
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v)),
            Err(RecordError::InvalidQos(3))
        );
        let mut v = enc.to_vec();
        v[1] = 0x80;
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v)),
            Err(RecordError::InvalidFlags(0x80))
        );
        let mut v = enc.to_vec();
        v[12] = 0xff; // first topic byte
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v)),
            Err(RecordError::InvalidUtf8("topic"))
        );
        // Length fields pointing past the end.
        let mut v = enc.to_vec();
        v[10] = 0xff;
        assert!(StoredMessage::decode(&Bytes::from(v)).is_err());
        assert!(StoredMessage { qos: 3, ..sample() }.encode().is_err());
        // Pseudo-random garbage: no panics.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let g: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut g = g;
            if let Some(b) = g.first_mut() {
                *b = FORMAT_V1;
            }
            let _ = StoredMessage::decode(&Bytes::from(g));
        }
    }
}
