//! The ingest pipeline: what is checked and deduplicated before a message is logged for
//! forwarding (`[[pipeline]]` in the config, `crate::config::pipeline`).
//!
//! It runs in the router, inside `accept_publish`, for a message a bridge forwards (not for
//! a bridge's own commands), by the first `[[pipeline]]` rule whose `topics` filter matches:
//! - **validate** (`event-v1`, `event.rs`): a message that fails is not logged for
//!   forwarding but kept in the dead-letter store (`dead_letter.rs`) with its reason;
//! - **dedup** (`dedup.rs`): an event whose `(device, boot, seq)` was heard already is not
//!   logged again.
//!
//! Local subscribers get every message as MQTT says, refused or resent: the pipeline is about
//! what goes upstream. Batching and compression happen later, per upstream, in the bridge.
//!
//! ## Contract
//! - **An acknowledged message is in exactly one of**: the log (to be forwarded), the
//!   dead-letter store, or — a resend — the log already, by its first copy. Each decision's
//!   writes (log append, dead letter, the device's dedup window) go into the same group
//!   commit as the message's other writes (the windows once per burst: `Ingest::flush`
//!   before the router submits it), and the PUBACK waits for it, so a crash leaves the log,
//!   the dead letters and the windows consistent with each other.
//! - **Deduplication never drops what it has not seen**: only an id recorded in a window
//!   counts as a duplicate, and a resend's PUBACK cannot overtake its first copy's commit
//!   (the router releases acknowledgements in arrival order, each behind every commit
//!   submitted before it; the store retries a failed commit until it is durable). What it cannot know (an older boot, an event number far
//!   behind, a device forgotten for `dedup_devices`) is forwarded. Duplicates the bridge
//!   itself makes (a crash between sending upstream and moving its cursor) cannot be removed
//!   here: every event carries its id, so the cloud can.
//! - A message without the id `dedup` asks for is refused (`no_event_id`) — unless the rule
//!   only deduplicates and has no `validate`, the id is what the rule is for.

pub mod dead_letter;
pub mod dedup;
pub mod event;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::{DeadLetterLimits, DedupKey, PipelineRule, Schema, Validation};
use crate::protocol::message::Message;
use crate::stats::Stats;
use crate::store::{Keyspace, Op, Store, StoreError};
use crate::topic::filter_matches;
use dead_letter::{DeadLetter, DeadLetters};
use dedup::DeviceWindows;
use event::{EventId, Invalid};

/// Why the pipeline could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("[[pipeline]] topics = {topics:?}: {reason}")]
    Schema { topics: String, reason: String },
}

/// What the pipeline decided for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it for forwarding (no rule, or it passed).
    Forward,
    /// A resend of an event already logged: not logged again.
    Duplicate,
    /// Refused: kept in the dead-letter store instead of the log.
    DeadLettered,
}

struct Rule {
    config: PipelineRule,
    /// A `json_schema` rule's compiled schema.
    schema: Option<jsonschema::Validator>,
    windows: Option<DeviceWindows>,
}

/// The compiled `[[pipeline]]` rules, their dedup windows and the dead-letter index.
pub struct Ingest {
    rules: Vec<Rule>,
    pub dead_letters: DeadLetters,
    stats: Arc<Stats>,
    /// Messages refused since start, for the log's back-off.
    refused: u64,
}

/// Prefix of a rule's keys in `Keyspace::Dedup`: its filter, hashed (a rule that changes
/// its filter starts with empty windows).
fn rule_tag(filter: &str) -> Vec<u8> {
    Sha256::digest(filter.as_bytes())[..8].to_vec()
}

impl Ingest {
    /// Compiles the rules and reads the windows and the dead-letter index from the store;
    /// deletes windows of rules no longer configured and unreadable records.
    pub fn load(
        rules: &[PipelineRule],
        limits: DeadLetterLimits,
        store: &Store,
        stats: Arc<Stats>,
    ) -> Result<Ingest, LoadError> {
        let mut compiled = Vec::with_capacity(rules.len());
        for config in rules {
            let schema = match &config.validate {
                Some(Validation::JsonSchema { json_schema }) => Some(
                    Validation::compile(json_schema).map_err(|reason| LoadError::Schema {
                        topics: config.topics.clone(),
                        reason,
                    })?,
                ),
                _ => None,
            };
            let windows = config
                .dedup
                .as_ref()
                .map(|_| DeviceWindows::new(rule_tag(&config.topics), config.dedup_devices));
            compiled.push(Rule {
                config: config.clone(),
                schema,
                windows,
            });
        }
        let mut stale = Vec::new();
        for (key, value) in store.scan(Keyspace::Dedup, b"")? {
            let owner = compiled
                .iter_mut()
                .filter_map(|r| r.windows.as_mut())
                .find(|w| key.starts_with(w.tag()));
            let kept = match owner {
                Some(w) => {
                    let device = key[w.tag().len()..].to_vec();
                    w.restore(&device, &value)
                }
                None => false,
            };
            if !kept {
                stale.push(Op::Remove {
                    space: Keyspace::Dedup,
                    key,
                });
            }
        }
        let mut dead_letters = DeadLetters::new(limits);
        for (key, value) in store.scan(Keyspace::DeadLetter, b"")? {
            if !dead_letters.restore(&key, &value) {
                tracing::warn!(key = ?key, "unreadable dead letter deleted");
                stale.push(Op::Remove {
                    space: Keyspace::DeadLetter,
                    key,
                });
            }
        }
        dead_letters.enforce(crate::time::unix_ms(), &mut stale);
        if !stale.is_empty() {
            store.submit(stale)?;
        }
        let ingest = Ingest {
            rules: compiled,
            dead_letters,
            stats,
            refused: 0,
        };
        ingest.publish_gauges();
        Ok(ingest)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides what happens to `message` (which a bridge forwards); its writes go to `ops`.
    pub fn check(
        &mut self,
        message: &Message,
        origin: &str,
        now_ms: u64,
        ops: &mut Vec<Op>,
    ) -> Verdict {
        let Some(rule) = self
            .rules
            .iter_mut()
            .find(|r| filter_matches(&r.config.topics, &message.topic))
        else {
            return Verdict::Forward;
        };
        match identify(rule, &message.topic, &message.payload) {
            Err(invalid) => {
                self.stats.pipeline_invalid[invalid.reason as usize].fetch_add(1, Relaxed);
                self.dead_letter(message, origin, invalid, now_ms, ops);
                Verdict::DeadLettered
            }
            Ok(id) => {
                let first = match (&mut rule.windows, id) {
                    (Some(windows), Some(id)) => windows.first_time(&id, ops),
                    _ => true,
                };
                if first {
                    self.stats.pipeline_valid.fetch_add(1, Relaxed);
                    Verdict::Forward
                } else {
                    self.stats.pipeline_duplicates.fetch_add(1, Relaxed);
                    Verdict::Duplicate
                }
            }
        }
    }

    fn dead_letter(
        &mut self,
        message: &Message,
        origin: &str,
        invalid: Invalid,
        now_ms: u64,
        ops: &mut Vec<Op>,
    ) {
        let reason = invalid.reason;
        let letter = DeadLetter {
            id: 0,
            at_ms: now_ms,
            reason: invalid.reason.label().to_string(),
            detail: invalid.detail,
            topic: message.topic.to_string(),
            origin: origin.to_string(),
            qos: message.qos as u8,
            payload: message.payload.to_vec(),
        };
        let id = self.dead_letters.add(letter, now_ms, ops);
        // Logged at the 1st, 2nd, 4th, 8th... so a flood of bad events does not flood the log.
        self.refused += 1;
        if self.refused.is_power_of_two() {
            tracing::warn!(id, topic = %message.topic, client_id = origin, reason = reason.label(),
                refused = self.refused, "message refused by the pipeline: kept as a dead letter, not forwarded");
        }
        self.publish_gauges();
    }

    /// Writes what the burst changed in the dedup windows: call before submitting it.
    pub fn flush(&mut self, ops: &mut Vec<Op>) {
        for windows in self.rules.iter_mut().filter_map(|r| r.windows.as_mut()) {
            windows.flush(ops);
        }
    }

    /// Deletes dead letters past `max_age` (housekeeping).
    pub fn expire(&mut self, now_ms: u64, ops: &mut Vec<Op>) {
        let before = ops.len();
        self.dead_letters.enforce(now_ms, ops);
        if ops.len() != before {
            self.publish_gauges();
        }
    }

    pub fn publish_gauges(&self) {
        self.stats
            .dead_letters
            .store(self.dead_letters.count() as u64, Relaxed);
        self.stats
            .dead_letter_bytes
            .store(self.dead_letters.bytes(), Relaxed);
        self.stats
            .dead_letters_evicted
            .store(self.dead_letters.evicted, Relaxed);
    }
}

/// Validates (if the rule says so) and finds the event's id (if it deduplicates).
fn identify<'a>(
    rule: &Rule,
    topic: &str,
    payload: &'a [u8],
) -> Result<Option<EventId<'a>>, Invalid> {
    let validated = match (&rule.config.validate, &rule.schema) {
        (Some(Validation::Preset(Schema::EventV1)), _) => {
            Some(event::validate_event_v1(topic, payload)?)
        }
        (_, Some(schema)) => {
            event::validate_json_schema(schema, payload)?;
            None
        }
        _ => None,
    };
    let Some(key) = &rule.config.dedup else {
        return Ok(None);
    };
    match (key, validated) {
        (DedupKey::Preset(Schema::EventV1), Some(id)) => Ok(Some(id)),
        (DedupKey::Preset(Schema::EventV1), None) => event::event_v1_id(payload).map(Some),
        _ => {
            let (device, boot, seq) = key.pointers();
            event::event_id_at(payload, device, boot, seq).map(Some)
        }
    }
}
