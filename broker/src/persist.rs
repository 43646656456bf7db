//! How the router's state is laid out in the store, and how it is read back at start-up.
//!
//! - `Keyspace::Sessions`: client id -> the session's subscriptions (persistent sessions only).
//! - `Keyspace::SessionQueue`: (client id, queue id) -> a message owed to that session and
//!   not yet acknowledged by it (QoS 1/2 only), deleted on PUBACK/PUBCOMP.
//! - `Keyspace::Retained`: topic -> the retained message.
//! - The log: messages that a bridge forwards upstream (see `bridge`).
//!
//! Every value is a `StoredMessage` or the small subscription list below; anything that
//! fails to decode is skipped and logged, never a panic.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::warn;

use crate::protocol::message::{Message, QoS, SubscriptionOptions};
use crate::store::record::StoredMessage;
use crate::store::{Keyspace, Store, StoreError};

/// The longest client id a persistent session may have: its queue keys (`queue_key`: 2 bytes
/// of length, the id, 8 of queue id) must fit the store's key limit. A longer id with
/// clean session 0 is refused at CONNECT (CONNACK 0x02) rather than failing its writes.
pub const MAX_PERSISTENT_CLIENT_ID_BYTES: usize = crate::store::MAX_KEY_BYTES - 2 - 8;

pub fn queue_prefix(client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + client_id.len() + 8);
    key.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    key.extend_from_slice(client_id.as_bytes());
    key
}

pub fn queue_key(client_id: &str, id: u64) -> Vec<u8> {
    let mut key = queue_prefix(client_id);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn queue_id_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// A persistent session's record: its subscriptions, and for an MQTT 5 session that does
/// not live forever, its expiry.
///
/// Layout: an optional header `[0xFF][version 2][expiry u32][deadline u64]` (written only
/// for a session with a finite expiry, so every 3.1.1 record is byte for byte as before),
/// then `[options u8][len u16][filter]([id u32])` per subscription. The options byte is the MQTT 5
/// subscription options byte, of which 3.1.1 records use only the QoS bits; 0xFF can never
/// start an entry (reserved bits), which is what tells the header apart.
///
/// Largest session record (rewritten whole at every SUBSCRIBE and UNSUBSCRIBE). Filters that
/// would make it larger get 0x80 in SUBACK, for that client alone. 120 KiB stays one value
/// inline in a sled segment: ~1,000 filters of 100 bytes, more than `max_subscriptions`'
/// default allows of typical filters.
pub const MAX_SESSION_RECORD_BYTES: usize = 120 * 1024;

/// Marks a session record with an expiry header.
const SESSION_HEADER: u8 = 0xFF;
const SESSION_RECORD_V2: u8 = 2;
const SESSION_HEADER_LEN: usize = 1 + 1 + 4 + 8;
/// Bit 6 of an entry's options byte (reserved in MQTT): a u32 subscription identifier
/// follows the filter.
const HAS_SUBSCRIPTION_ID: u8 = 0x40;

/// Bytes one filter takes in the session record ([`encode_session`]), at most.
pub fn subscription_record_len(filter: &str) -> usize {
    3 + filter.len() + 4
}

/// A session's expiry as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredExpiry {
    /// The session expiry interval, seconds.
    pub secs: u32,
    /// When the session ends (unix ms) if its client stays away; `None` while connected.
    pub deadline_ms: Option<u64>,
}

pub fn encode_session<'a>(
    subscriptions: impl IntoIterator<Item = (&'a String, &'a SubscriptionOptions)>,
    expiry: Option<StoredExpiry>,
) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(expiry) = expiry {
        out.push(SESSION_HEADER);
        out.push(SESSION_RECORD_V2);
        out.extend_from_slice(&expiry.secs.to_be_bytes());
        out.extend_from_slice(&expiry.deadline_ms.unwrap_or(0).to_be_bytes());
    }
    for (filter, options) in subscriptions {
        out.push(options.to_byte() | options.subscription_id.map_or(0, |_| HAS_SUBSCRIPTION_ID));
        out.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        out.extend_from_slice(filter.as_bytes());
        if let Some(id) = options.subscription_id {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
    out
}

/// `None` for a record that is not one of ours (corrupt or from a newer version).
#[allow(clippy::type_complexity)]
pub fn decode_session(
    mut bytes: &[u8],
) -> Option<(HashMap<String, SubscriptionOptions>, Option<StoredExpiry>)> {
    let mut expiry = None;
    if bytes.first() == Some(&SESSION_HEADER) {
        let header = bytes.get(..SESSION_HEADER_LEN)?;
        if header[1] != SESSION_RECORD_V2 {
            return None;
        }
        let secs = u32::from_be_bytes(header[2..6].try_into().ok()?);
        let deadline = u64::from_be_bytes(header[6..14].try_into().ok()?);
        expiry = Some(StoredExpiry {
            secs,
            deadline_ms: (deadline != 0).then_some(deadline),
        });
        bytes = &bytes[SESSION_HEADER_LEN..];
    }
    let mut out = HashMap::new();
    while !bytes.is_empty() {
        let first = *bytes.first()?;
        let mut options = SubscriptionOptions::from_byte(first & !HAS_SUBSCRIPTION_ID)?;
        let len = u16::from_be_bytes([*bytes.get(1)?, *bytes.get(2)?]) as usize;
        let filter = std::str::from_utf8(bytes.get(3..3 + len)?).ok()?;
        bytes = &bytes[3 + len..];
        if first & HAS_SUBSCRIPTION_ID != 0 {
            let id = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
            options.subscription_id = Some(id);
            bytes = &bytes[4..];
        }
        out.insert(filter.to_string(), options);
    }
    Some((out, expiry))
}

pub fn to_stored(message: &Message, origin: &str, received_at_ms: u64) -> StoredMessage {
    StoredMessage {
        topic: message.topic.to_string(),
        payload: message.payload.clone(),
        qos: message.qos as u8,
        retain: message.retain,
        received_at_ms,
        origin: origin.to_string(),
        properties: message.properties.as_deref().cloned(),
    }
}

pub fn from_stored(stored: StoredMessage) -> Option<Message> {
    let mut message = Message::new(
        stored.topic,
        stored.payload,
        QoS::from_u8(stored.qos)?,
        stored.retain,
    );
    message.properties = stored.properties.map(|mut p| {
        // The deadline is not stored: it is the interval counted from when the broker
        // received the message, so a restart does not give a message more time.
        p.expires_at_ms = p
            .message_expiry_interval
            .map(|secs| stored.received_at_ms + u64::from(secs) * 1000);
        Arc::new(p)
    });
    Some(message)
}

/// A persistent session as read back from the store.
pub struct RestoredSession {
    pub subscriptions: HashMap<String, SubscriptionOptions>,
    /// `None`: the session never expires (3.1.1, or MQTT 5 0xFFFFFFFF).
    pub expiry: Option<StoredExpiry>,
    /// Owed messages in the order they were queued, with their queue ids.
    pub queue: Vec<(u64, Message)>,
}

pub struct Restored {
    pub sessions: HashMap<Arc<str>, RestoredSession>,
    pub retained: HashMap<Arc<str>, Message>,
    /// The next free queue id (above every id in use).
    pub next_queue_id: u64,
}

pub fn restore(store: &Store) -> Result<Restored, StoreError> {
    let mut sessions = HashMap::new();
    let mut next_queue_id = 1;
    for (key, value) in store.scan(Keyspace::Sessions, b"")? {
        let (Ok(client_id), Some((subscriptions, expiry))) =
            (String::from_utf8(key), decode_session(&value))
        else {
            warn!("undecodable session record skipped");
            continue;
        };
        let mut queue = Vec::new();
        for (qkey, qvalue) in store.scan(Keyspace::SessionQueue, &queue_prefix(&client_id))? {
            let id = queue_id_of(&qkey);
            let message = StoredMessage::decode(&bytes::Bytes::from(qvalue))
                .ok()
                .and_then(from_stored);
            match (id, message) {
                (Some(id), Some(message)) => {
                    next_queue_id = next_queue_id.max(id + 1);
                    queue.push((id, message));
                }
                _ => warn!(client_id, "undecodable queued message skipped"),
            }
        }
        sessions.insert(
            Arc::from(client_id),
            RestoredSession {
                subscriptions,
                expiry,
                queue,
            },
        );
    }
    let mut retained = HashMap::new();
    for (key, value) in store.scan(Keyspace::Retained, b"")? {
        match StoredMessage::decode(&bytes::Bytes::from(value))
            .ok()
            .and_then(from_stored)
        {
            Some(message) if String::from_utf8(key).is_ok() => {
                retained.insert(message.topic.clone(), message);
            }
            _ => warn!("undecodable retained message skipped"),
        }
    }
    Ok(Restored {
        sessions,
        retained,
        next_queue_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // What a persistent session's queue, the retained store and the log keep of a message is
    // what comes back: MQTT 5 properties included, and a 3.1.1 message still without any.
    #[test]
    fn a_message_and_its_properties_survive_the_stored_record() {
        let mut message = Message::new("cmd/valve", &b"open"[..], QoS::AtLeastOnce, true);
        let plain = to_stored(&message, "dev-1", 7).encode().expect("encodes");
        let back = from_stored(StoredMessage::decode(&plain).expect("decodes")).expect("valid");
        assert_eq!(back, message);
        message.properties = Some(Arc::new(crate::protocol::message::MessageProperties {
            message_expiry_interval: Some(60),
            user_properties: vec![("trace".into(), "a1".into())],
            correlation_data: Some(bytes::Bytes::from_static(b"\x00\x01")),
            ..Default::default()
        }));
        let rich = to_stored(&message, "dev-1", 7).encode().expect("encodes");
        assert!(rich.len() > plain.len());
        let back = from_stored(StoredMessage::decode(&rich).expect("decodes")).expect("valid");
        // Received at 7 ms with 60 s to live: expires at 60,007 ms, wherever it is read.
        let mut expected = message.clone();
        if let Some(p) = expected.properties.as_mut() {
            Arc::make_mut(p).expires_at_ms = Some(60_007);
        }
        assert_eq!(back, expected);
    }

    #[test]
    fn subscriptions_round_trip_and_garbage_is_refused() {
        let mut subs = HashMap::new();
        subs.insert("a/#".to_string(), QoS::AtLeastOnce.into());
        subs.insert("b/+/c".to_string(), QoS::ExactlyOnce.into());
        assert_eq!(
            decode_session(&encode_session(&subs, None)),
            Some((subs.clone(), None))
        );
        // A 3.1.1 session's record is what it always was: [qos][len][filter].
        let one: HashMap<String, SubscriptionOptions> =
            [("a".to_string(), QoS::AtLeastOnce.into())].into();
        assert_eq!(encode_session(&one, None), vec![1, 0, 1, b'a']);
        assert_eq!(decode_session(&[1, 0, 9, b'a']), None);
        // QoS 3, reserved option bits, retain handling 3.
        assert_eq!(decode_session(&[3, 0, 0]), None);
        assert_eq!(decode_session(&[0x41, 0, 0]), None);
        assert_eq!(decode_session(&[0x31, 0, 0]), None);
    }

    #[test]
    fn mqtt5_options_and_expiry_round_trip() {
        let subs: HashMap<String, SubscriptionOptions> = [(
            "s/#".to_string(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                subscription_id: Some(268_435_455),
            },
        )]
        .into();
        for deadline_ms in [None, Some(1_700_000_000_123)] {
            let expiry = StoredExpiry {
                secs: 3600,
                deadline_ms,
            };
            let bytes = encode_session(&subs, Some(expiry));
            assert_eq!(bytes[0], 0xFF);
            assert_eq!(decode_session(&bytes), Some((subs.clone(), Some(expiry))));
        }
        // A header from a version this build does not know.
        let mut newer = encode_session(
            &subs,
            Some(StoredExpiry {
                secs: 1,
                deadline_ms: None,
            }),
        );
        newer[1] = 3;
        assert_eq!(decode_session(&newer), None);
        assert_eq!(decode_session(&[0xFF, 2, 0]), None);
    }

    #[test]
    fn queue_keys_sort_by_client_then_id() {
        assert!(queue_key("a", 2) < queue_key("a", 10));
        assert!(queue_key("a", u64::MAX) < queue_key("ab", 0));
        assert_eq!(queue_id_of(&queue_key("x", 42)), Some(42));
    }
}
