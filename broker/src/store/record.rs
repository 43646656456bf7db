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
//! Version 2 is version 1 with the MQTT 5 message properties between the origin and the
//! payload; a message without properties (every MQTT 3.1.1 message) is still written as
//! version 1, byte for byte as before, and both versions are read:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format version = 2 |
//! | 1 | 10 + .. + .. | flags, `received_at_ms`, topic, origin: as in version 1 |
//! | .. | 4 + n | properties: u32 length, then each as its MQTT 5 identifier byte and value |
//! | .. | 4 + n | payload: u32 length, bytes; the record ends exactly here |
//!
//! Property values: 0x01 payload format indicator (1 byte), 0x02 message expiry interval
//! (u32), 0x03 content type and 0x08 response topic (u16 length, UTF-8), 0x09 correlation
//! data (u16 length, bytes), 0x26 user property (two such strings; repeated, in order), 0x0B
//! subscription identifier (u32; repeated: a session queue's copy for one subscriber). Each
//! but these two at most once; anything else is a corrupt record.
//!
//! `received_at_ms` sits at a fixed offset so [`peek_received_at_ms`] can read the age of the
//! oldest log entry without decoding it. Decoding never panics: corrupt input is an error.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::message::MessageProperties;

/// First byte of a record without properties.
pub const FORMAT_V1: u8 = 1;
/// First byte of a record with MQTT 5 message properties.
pub const FORMAT_V2: u8 = 2;
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
    /// MQTT 5 message properties; `None` writes a version 1 record.
    pub properties: Option<MessageProperties>,
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
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u8),
    #[error("property {0:#04x} appears twice")]
    DuplicateProperty(u8),
}

impl StoredMessage {
    /// Size of the encoded record in bytes.
    pub fn encoded_len(&self) -> usize {
        let properties = self
            .properties
            .as_ref()
            .map_or(0, |p| 4 + properties_len(p));
        HEADER_LEN
            + 2
            + self.topic.len()
            + 2
            + self.origin.len()
            + properties
            + 4
            + self.payload.len()
    }

    /// Encodes in the current format version.
    pub fn encode(&self) -> Result<Bytes, RecordError> {
        if self.qos > 2 {
            return Err(RecordError::InvalidQos(self.qos));
        }
        check_len("topic", self.topic.len(), u16::MAX as usize)?;
        check_len("origin", self.origin.len(), u16::MAX as usize)?;
        check_len("payload", self.payload.len(), u32::MAX as usize)?;
        if let Some(properties) = &self.properties {
            check_properties(properties)?;
        }
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        buf.put_u8(if self.properties.is_some() {
            FORMAT_V2
        } else {
            FORMAT_V1
        });
        buf.put_u8(u8::from(self.retain) | (self.qos << 1));
        buf.put_u64(self.received_at_ms);
        buf.put_u16(self.topic.len() as u16);
        buf.put_slice(self.topic.as_bytes());
        buf.put_u16(self.origin.len() as u16);
        buf.put_slice(self.origin.as_bytes());
        if let Some(properties) = &self.properties {
            buf.put_u32(properties_len(properties) as u32);
            put_properties(&mut buf, properties);
        }
        buf.put_u32(self.payload.len() as u32);
        buf.put_slice(&self.payload);
        Ok(buf.freeze())
    }

    /// Decodes a record of any known version. The payload shares `bytes` (no copy).
    pub fn decode(bytes: &Bytes) -> Result<StoredMessage, RecordError> {
        let version = *bytes.first().ok_or(RecordError::Empty)?;
        if version != FORMAT_V1 && version != FORMAT_V2 {
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
        let properties = if version == FORMAT_V2 {
            let len = u32::from_be_bytes(r.array::<4>("properties length")?) as usize;
            let start = r.pos;
            r.take(len, "properties")?;
            Some(read_properties(bytes.slice(start..r.pos))?)
        } else {
            None
        };
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
            properties,
        })
    }
}

/// Reads `received_at_ms` from an encoded record without decoding the rest.
/// `None` if the bytes are not a record of a known version.
pub fn peek_received_at_ms(bytes: &[u8]) -> Option<u64> {
    if bytes.first() != Some(&FORMAT_V1) && bytes.first() != Some(&FORMAT_V2) {
        return None;
    }
    let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
    Some(u64::from_be_bytes(raw))
}

const PAYLOAD_FORMAT: u8 = 0x01;
const MESSAGE_EXPIRY: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const USER_PROPERTY: u8 = 0x26;
const SUBSCRIPTION_ID: u8 = 0x0B;

fn properties_len(p: &MessageProperties) -> usize {
    let string = |s: &Option<String>| s.as_ref().map_or(0, |s| 1 + 2 + s.len());
    p.payload_format_indicator.map_or(0, |_| 2)
        + p.message_expiry_interval.map_or(0, |_| 5)
        + string(&p.content_type)
        + string(&p.response_topic)
        + p.correlation_data.as_ref().map_or(0, |d| 1 + 2 + d.len())
        + p.user_properties
            .iter()
            .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
            .sum::<usize>()
        + p.subscription_ids.len() * 5
}

fn check_properties(p: &MessageProperties) -> Result<(), RecordError> {
    let max = u16::MAX as usize;
    for (field, s) in [
        ("content type", &p.content_type),
        ("response topic", &p.response_topic),
    ] {
        check_len(field, s.as_ref().map_or(0, String::len), max)?;
    }
    check_len(
        "correlation data",
        p.correlation_data.as_ref().map_or(0, Bytes::len),
        max,
    )?;
    for (k, v) in &p.user_properties {
        check_len("user property", k.len().max(v.len()), max)?;
    }
    check_len("properties", properties_len(p), u32::MAX as usize)
}

fn put_properties(buf: &mut BytesMut, p: &MessageProperties) {
    let put_str = |buf: &mut BytesMut, s: &[u8]| {
        buf.put_u16(s.len() as u16);
        buf.put_slice(s);
    };
    if let Some(v) = p.payload_format_indicator {
        buf.put_u8(PAYLOAD_FORMAT);
        buf.put_u8(v);
    }
    if let Some(v) = p.message_expiry_interval {
        buf.put_u8(MESSAGE_EXPIRY);
        buf.put_u32(v);
    }
    for (id, value) in [
        (CONTENT_TYPE, p.content_type.as_ref().map(|s| s.as_bytes())),
        (
            RESPONSE_TOPIC,
            p.response_topic.as_ref().map(|s| s.as_bytes()),
        ),
        (CORRELATION_DATA, p.correlation_data.as_deref()),
    ] {
        if let Some(value) = value {
            buf.put_u8(id);
            put_str(buf, value);
        }
    }
    for (k, v) in &p.user_properties {
        buf.put_u8(USER_PROPERTY);
        put_str(buf, k.as_bytes());
        put_str(buf, v.as_bytes());
    }
    for id in &p.subscription_ids {
        buf.put_u8(SUBSCRIPTION_ID);
        buf.put_u32(*id);
    }
}

fn read_properties(section: Bytes) -> Result<MessageProperties, RecordError> {
    let mut p = MessageProperties::default();
    let mut r = Reader {
        buf: &section,
        pos: 0,
    };
    let mut seen = 0u64;
    while r.pos < section.len() {
        let id = r.take(1, "property identifier")?[0];
        if id != USER_PROPERTY && id != SUBSCRIPTION_ID {
            let bit = 1u64 << (id & 63);
            if seen & bit != 0 {
                return Err(RecordError::DuplicateProperty(id));
            }
            seen |= bit;
        }
        match id {
            PAYLOAD_FORMAT => p.payload_format_indicator = Some(r.take(1, "payload format")?[0]),
            MESSAGE_EXPIRY => {
                p.message_expiry_interval =
                    Some(u32::from_be_bytes(r.array::<4>("message expiry")?))
            }
            CONTENT_TYPE => p.content_type = Some(r.string("content type")?),
            RESPONSE_TOPIC => p.response_topic = Some(r.string("response topic")?),
            CORRELATION_DATA => {
                let len = u16::from_be_bytes(r.array::<2>("correlation data length")?) as usize;
                let start = r.pos;
                r.take(len, "correlation data")?;
                p.correlation_data = Some(section.slice(start..r.pos));
            }
            USER_PROPERTY => {
                let key = r.string("user property")?;
                let value = r.string("user property")?;
                p.user_properties.push((key, value));
            }
            SUBSCRIPTION_ID => p
                .subscription_ids
                .push(u32::from_be_bytes(r.array::<4>("subscription identifier")?)),
            other => return Err(RecordError::UnknownProperty(other)),
        }
    }
    Ok(p)
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
    /// A u16-length-prefixed UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, RecordError> {
        let len = u16::from_be_bytes(self.array::<2>(field)?) as usize;
        utf8(self.take(len, field)?, field)
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
            properties: None,
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
        decode_garbage(0x9e37_79b9_7f4a_7c15, FORMAT_V1);
    }

    /// Decodes 300 pseudo-random records (lengths 0..300) of the given version: none may panic.
    fn decode_garbage(mut x: u64, version: u8) {
        for len in 0..300 {
            let mut g: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Some(b) = g.first_mut() {
                *b = version;
            }
            let _ = StoredMessage::decode(&Bytes::from(g));
        }
    }

    fn with_properties() -> StoredMessage {
        StoredMessage {
            properties: Some(MessageProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(259_200),
                content_type: Some("application/json".into()),
                response_topic: Some("replies/dev-42".into()),
                correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xff])),
                user_properties: vec![
                    ("site".into(), "north".into()),
                    ("site".into(), "south".into()),
                    ("unit".into(), "C".into()),
                ],
                subscription_ids: vec![7, 300_000],
                expires_at_ms: None,
            }),
            ..sample()
        }
    }

    // Stores written before properties existed hold version 1 records, and a 3.1.1 message
    // must cost nothing more: without properties the bytes are exactly version 1's.
    #[test]
    fn a_message_without_properties_is_written_as_version_1_byte_for_byte() {
        let enc = sample().encode().unwrap();
        let mut v1 = vec![FORMAT_V1, 0b011];
        v1.extend_from_slice(&1_700_000_000_123u64.to_be_bytes());
        v1.extend_from_slice(&[0, 19]);
        v1.extend_from_slice(b"sensors/room-1/temp");
        v1.extend_from_slice(&[0, 6]);
        v1.extend_from_slice(b"dev-42");
        v1.extend_from_slice(&[0, 0, 0, 10]);
        v1.extend_from_slice(b"{\"c\":21.5}");
        assert_eq!(enc.as_ref(), v1.as_slice());
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v1)).unwrap().properties,
            None
        );
    }

    #[test]
    fn properties_round_trip_in_a_version_2_record() {
        let m = with_properties();
        let enc = m.encode().unwrap();
        assert_eq!(enc[0], FORMAT_V2);
        assert_eq!(enc.len(), m.encoded_len());
        assert_eq!(
            StoredMessage::decode(&enc).unwrap(),
            m,
            "user properties keep their order"
        );
        assert_eq!(peek_received_at_ms(&enc), Some(m.received_at_ms));
        // Present but empty is not the same as absent: it stays version 2.
        let empty = StoredMessage {
            properties: Some(MessageProperties::default()),
            ..sample()
        };
        let enc = empty.encode().unwrap();
        assert_eq!(enc[0], FORMAT_V2);
        assert_eq!(StoredMessage::decode(&enc).unwrap(), empty);
    }

    #[test]
    fn a_corrupt_property_section_is_an_error_never_a_panic() {
        let enc = with_properties().encode().unwrap();
        for n in 0..enc.len() {
            assert!(
                StoredMessage::decode(&enc.slice(..n)).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
        // The property section starts after the header, topic and origin.
        let props_at = HEADER_LEN + 2 + 19 + 2 + 6;
        let first_property = props_at + 4;
        let mut v = enc.to_vec();
        v[first_property] = 0x7f;
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v)),
            Err(RecordError::UnknownProperty(0x7f))
        );
        // The same property twice (only the user property may repeat).
        let once = StoredMessage {
            properties: Some(MessageProperties {
                payload_format_indicator: Some(1),
                ..MessageProperties::default()
            }),
            ..sample()
        };
        let mut v = once.encode().unwrap().to_vec();
        assert_eq!(
            &v[props_at..first_property + 2],
            &[0, 0, 0, 2, PAYLOAD_FORMAT, 1]
        );
        v[props_at..props_at + 4].copy_from_slice(&4u32.to_be_bytes());
        v.splice(first_property + 2..first_property + 2, [PAYLOAD_FORMAT, 0]);
        assert_eq!(
            StoredMessage::decode(&Bytes::from(v)),
            Err(RecordError::DuplicateProperty(PAYLOAD_FORMAT))
        );
        // A section length past the end of the record.
        let mut v = enc.to_vec();
        v[props_at..props_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(StoredMessage::decode(&Bytes::from(v)).is_err());
        decode_garbage(0x2545_f491_4f6c_dd1d, FORMAT_V2);
    }
}
