//! The dead-letter store: messages the ingest pipeline refused, kept durably with why, so an
//! operator can see them and send them through the pipeline again once the fault is fixed.
//!
//! Each dead letter is one JSON record under `Keyspace::DeadLetter`, keyed by its id (8-byte
//! big-endian, increasing, never reused while the store lives). It is written in the same
//! group commit as the PUBACK's other writes, so a refused message that was acknowledged
//! is on disk here, never nowhere. Bounded like the log: `max_bytes` of records (the oldest
//! are deleted first) and `max_age`; each deletion is counted. The index in memory holds
//! only ids, sizes and times (24 bytes each), not the payloads.

use std::collections::VecDeque;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::DeadLetterLimits;
use crate::store::{Keyspace, Op};

/// One refused message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    /// When it was refused (Unix ms).
    pub at_ms: u64,
    /// The reason's code (`InvalidReason::label`) and the operator's sentence.
    pub reason: String,
    pub detail: String,
    pub topic: String,
    /// The client id that published it.
    pub origin: String,
    pub qos: u8,
    /// Stored as is after the header, not in it (no base64 growth: a dead letter is never
    /// much larger than the log record the message would have made).
    #[serde(skip)]
    pub payload: Vec<u8>,
}

impl DeadLetter {
    pub fn key(id: u64) -> Vec<u8> {
        id.to_be_bytes().to_vec()
    }

    /// `[header length, u32 BE][header JSON][payload]`.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(self).unwrap_or_default();
        let mut value = Vec::with_capacity(4 + header.len() + self.payload.len());
        value.extend_from_slice(&(header.len() as u32).to_be_bytes());
        value.extend_from_slice(&header);
        value.extend_from_slice(&self.payload);
        value
    }

    pub fn decode(key: &[u8], value: &[u8]) -> Option<DeadLetter> {
        let id = u64::from_be_bytes(key.try_into().ok()?);
        let len = u32::from_be_bytes(value.get(..4)?.try_into().ok()?) as usize;
        let header = value.get(4..4usize.checked_add(len)?)?;
        let mut letter = serde_json::from_slice::<DeadLetter>(header)
            .ok()
            .filter(|d| d.id == id)?;
        letter.payload = value[4 + len..].to_vec();
        Some(letter)
    }

    /// As `/api/v1/dead-letters` shows it: the header's fields, `payload_base64`, and
    /// `payload` as text when it is UTF-8 (else null).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["payload_base64"] = base64::engine::general_purpose::STANDARD
            .encode(&self.payload)
            .into();
        v["payload"] =
            std::str::from_utf8(&self.payload).map_or(serde_json::Value::Null, |t| t.into());
        v
    }
}

/// What is stored, by id: enough to bound it without reading it.
pub struct DeadLetters {
    limits: DeadLetterLimits,
    /// (id, bytes, at_ms), in id order (which is time order).
    index: VecDeque<(u64, u64, u64)>,
    bytes: u64,
    next_id: u64,
    /// Deleted to keep within the bounds, since start.
    pub evicted: u64,
}

impl DeadLetters {
    pub fn new(limits: DeadLetterLimits) -> DeadLetters {
        DeadLetters {
            limits,
            index: VecDeque::new(),
            bytes: 0,
            next_id: 1,
            evicted: 0,
        }
    }

    /// A record read back at start, in key order. False if it is unreadable (then deleted).
    pub fn restore(&mut self, key: &[u8], value: &[u8]) -> bool {
        match DeadLetter::decode(key, value) {
            Some(d) => {
                self.index.push_back((d.id, value.len() as u64, d.at_ms));
                self.bytes += value.len() as u64;
                self.next_id = self.next_id.max(d.id + 1);
                true
            }
            None => false,
        }
    }

    pub fn count(&self) -> usize {
        self.index.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.iter().map(|(id, _, _)| *id)
    }

    /// Stores a new dead letter (its id is assigned here) and deletes the oldest past the
    /// bounds; the writes go to `ops`.
    pub fn add(&mut self, mut letter: DeadLetter, now_ms: u64, ops: &mut Vec<Op>) -> u64 {
        letter.id = self.next_id;
        self.next_id += 1;
        let value = letter.encode();
        self.index
            .push_back((letter.id, value.len() as u64, letter.at_ms));
        self.bytes += value.len() as u64;
        ops.push(Op::Put {
            space: Keyspace::DeadLetter,
            key: DeadLetter::key(letter.id),
            value,
        });
        self.enforce(now_ms, ops);
        letter.id
    }

    /// Deletes what is past `max_bytes` (oldest first; never the newest, so a message
    /// larger than the bound is still kept, alone) or older than `max_age`.
    pub fn enforce(&mut self, now_ms: u64, ops: &mut Vec<Op>) {
        let max_age_ms = self.limits.max_age.map(|a| a.as_millis() as u64);
        while let Some(&(id, bytes, at_ms)) = self.index.front() {
            let too_old = max_age_ms.is_some_and(|age| now_ms.saturating_sub(at_ms) > age);
            let too_much = self.bytes > self.limits.max_bytes && self.index.len() > 1;
            if !too_much && !too_old {
                break;
            }
            self.index.pop_front();
            self.bytes -= bytes;
            self.evicted += 1;
            ops.push(Op::Remove {
                space: Keyspace::DeadLetter,
                key: DeadLetter::key(id),
            });
        }
    }

    /// Forgets `id` (replayed or purged), deleting its record; false if it is not stored.
    pub fn remove(&mut self, id: u64, ops: &mut Vec<Op>) -> bool {
        let Ok(at) = self.index.binary_search_by_key(&id, |(i, _, _)| *i) else {
            return false;
        };
        if let Some((_, bytes, _)) = self.index.remove(at) {
            self.bytes -= bytes;
        }
        ops.push(Op::Remove {
            space: Keyspace::DeadLetter,
            key: DeadLetter::key(id),
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn letter(at_ms: u64, payload: &[u8]) -> DeadLetter {
        DeadLetter {
            id: 0,
            at_ms,
            reason: "not_json".into(),
            detail: "not JSON".into(),
            topic: "sensors/a/events".into(),
            origin: "a".into(),
            qos: 1,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn records_round_trip_and_ids_continue_after_a_restart() {
        let mut d = DeadLetters::new(DeadLetterLimits::default());
        let mut ops = Vec::new();
        assert_eq!(d.add(letter(5, b"\x00\xffraw"), 5, &mut ops), 1);
        assert_eq!(d.add(letter(6, b"x"), 6, &mut ops), 2);
        let mut again = DeadLetters::new(DeadLetterLimits::default());
        for op in &ops {
            if let Op::Put { key, value, .. } = op {
                assert!(again.restore(key, value));
                let back = DeadLetter::decode(key, value).unwrap();
                assert_eq!(back.topic, "sensors/a/events");
                if back.id == 1 {
                    assert_eq!(back.payload, b"\x00\xffraw");
                    assert_eq!(back.to_json()["payload"], serde_json::Value::Null);
                    assert_eq!(back.to_json()["payload_base64"], "AP9yYXc=");
                } else {
                    assert_eq!(back.to_json()["payload"], "x");
                }
            }
        }
        assert_eq!((again.count(), again.bytes()), (2, d.bytes()));
        assert_eq!(again.add(letter(7, b"y"), 7, &mut Vec::new()), 3);
        assert!(!again.restore(&9u64.to_be_bytes(), b"{}"));
        assert!(
            DeadLetter::decode(
                &2u64.to_be_bytes(),
                &serde_json::to_vec(&letter(1, b"")).unwrap()
            )
            .is_none(),
            "id must match its key"
        );
    }

    #[test]
    fn bounded_by_bytes_and_age_oldest_first() {
        let limits = DeadLetterLimits {
            max_bytes: 4096,
            max_age: Some(Duration::from_secs(60)),
        };
        let mut d = DeadLetters::new(limits);
        let mut ops = Vec::new();
        for i in 0..40 {
            d.add(letter(1000 + i, &[b'x'; 200]), 1000 + i, &mut ops);
        }
        assert!(d.bytes() <= 4096);
        assert!(d.evicted > 0);
        let first_kept = d.ids().next().unwrap();
        assert_eq!(
            first_kept,
            40 - d.count() as u64 + 1,
            "the oldest went first"
        );
        let mut ops = Vec::new();
        d.enforce(1000 + 39 + 60_001, &mut ops);
        assert_eq!(d.count(), 0);
        assert_eq!(d.bytes(), 0);
        assert!(ops.iter().all(|op| matches!(op, Op::Remove { .. })));
        // One letter larger than the bound is kept, alone.
        let mut ops = Vec::new();
        d.add(letter(5000, &[b'x'; 200]), 5000, &mut ops);
        d.add(letter(5001, &[b'y'; 8000]), 5001, &mut ops);
        assert_eq!(d.count(), 1);
        assert!(d.bytes() > 4096);
    }

    #[test]
    fn remove_deletes_one() {
        let mut d = DeadLetters::new(DeadLetterLimits::default());
        let mut ops = Vec::new();
        let a = d.add(letter(1, b"a"), 1, &mut ops);
        let b = d.add(letter(1, b"b"), 1, &mut ops);
        assert!(d.remove(a, &mut ops));
        assert!(!d.remove(a, &mut ops));
        assert_eq!(d.ids().collect::<Vec<_>>(), vec![b]);
    }
}
