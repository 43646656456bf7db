//! The forwarding half of a session: what a new connection sends again, and how log entries
//! become PUBLISHes in free window slots.
//!
//! Two kinds of entries are passed over rather than sent, each counted (`Stats`) and logged,
//! and the cursor moves over them as over an acknowledged one — once everything before them
//! is acknowledged, as always (`Window::advance`):
//! - a message whose MQTT 5 message expiry has run out (`dropped_message_expiry`), over
//!   either protocol: an expired message is never forwarded [MQTT-3.3.2-5];
//! - a message whose PUBLISH would be larger than the upstream's Maximum Packet Size
//!   (`dropped_too_large`) [MQTT-3.1.2-24]: waiting would not make it smaller, and a bridge
//!   that stopped at it would stall for good.
//!
//! The same holds for an unacknowledged message sent again after a reconnect: expired by
//! then, or too large for the new connection's limit, it is given up (`Window::give_up`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::{error, info, warn};

use super::batch::{self, BatchSpec, PendingBatch};
use super::failure::{encoded, Failure};
use super::window::{Drops, Sent, Window};
use super::wire::{Encoded, Encoder};
use super::{Bridge, RateLimiter};
use crate::config::bridge::ForwardRule;
use crate::protocol::message::{Message, MessageProperties, QoS};
use crate::store::record::StoredMessage;
use crate::store::Seq;
use crate::time::unix_ms;

/// Log entries read per range scan.
const READ_AHEAD: usize = 1024;
/// Bytes of log records read per range scan (at least one record): 1,024 sensor readings
/// are ~100 KiB, but records may be 16 MiB each.
const READ_AHEAD_BYTES: usize = 4 << 20;
/// Bytes of QoS 1 PUBLISHes sent upstream and not yet acknowledged (kept to send again after
/// a reconnect), on top of the `max_inflight` count: at least one message is always in
/// flight, so a 16 MiB one goes alone, and memory stays bounded whatever the record sizes.
pub(super) const MAX_WINDOW_BYTES: usize = 8 << 20;

/// While PUBACKs are on their way, the window is refilled in runs of at least
/// max_inflight / this, or after REFILL_HOLD (see `fill_window`).
const REFILL_RUN_DIVISOR: usize = 8;
const REFILL_HOLD: std::time::Duration = std::time::Duration::from_millis(1);

impl Bridge {
    /// What a new connection sends first: the SUBSCRIBE for the command topics, then every
    /// PUBLISH the last connection left unacknowledged, with its packet id and DUP set (at
    /// most `limit` of them now, the rest as acknowledgements make room: `resend_deferred`).
    pub(super) fn resume(
        &self,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &mut Encoder,
        limit: usize,
    ) -> Result<(), Failure> {
        // A SUBSCRIBE of an earlier connection that never got its SUBACK holds no id now.
        window.by_pkid.retain(|_, seq| *seq != 0);
        if !self.config.subscribe.is_empty() {
            let filters: Vec<(String, u8)> = self
                .config
                .subscribe
                .iter()
                .map(|rule| (rule.remote.clone(), rule.qos))
                .collect();
            let pkid = window.allocate_pkid();
            // Held (as seq 0, which no log entry has) until the SUBACK, so no PUBLISH
            // reuses the id meanwhile.
            window.by_pkid.insert(pkid, 0);
            encoded(encoder.subscribe(out, pkid, &filters))?;
        }
        // Unacknowledged PUBLISHes from the last connection first, same ids, DUP set.
        window.unframed.clear();
        window.deferred.clear();
        let pending: Vec<usize> = (0..window.sent.len())
            .filter(|i| window.sent[*i].resendable())
            .collect();
        if !pending.is_empty() {
            info!(bridge = %self.config.name, resent = pending.len(), "sending unacknowledged messages again (DUP)");
        }
        let mut resent = 0;
        for index in pending {
            if resent >= limit {
                let entry = &mut window.sent[index];
                entry.sent_at = Instant::now(); // the ack timeout counts from now
                window.deferred.push_back(entry.seq);
            } else if self.resend(window, index, out, encoder)? {
                resent += 1;
            }
        }
        Ok(())
    }

    /// Sends deferred PUBLISHes of an earlier connection while the upstream's receive
    /// maximum allows; returns whether any are still waiting (nothing new goes before them).
    fn resend_deferred(
        &self,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &mut Encoder,
        limit: usize,
    ) -> Result<bool, Failure> {
        while window.on_the_wire() < limit {
            let Some(seq) = window.deferred.pop_front() else {
                break;
            };
            if let Ok(index) = window.sent.binary_search_by_key(&seq, |s| s.seq) {
                if window.sent[index].resendable() {
                    self.resend(window, index, out, encoder)?;
                }
            }
        }
        Ok(!window.deferred.is_empty())
    }

    /// Sends the unacknowledged entry at `index` again (DUP); `false` if it was given up
    /// instead (expired, or too large for this connection).
    fn resend(
        &self,
        window: &mut Window,
        index: usize,
        out: &mut BytesMut,
        encoder: &mut Encoder,
    ) -> Result<bool, Failure> {
        let entry = &window.sent[index];
        let seq = entry.seq;
        if entry.expires_at_ms.is_some_and(|at| at <= unix_ms()) {
            window.give_up(index);
            self.dropped_expired(window, seq);
            return Ok(false);
        }
        if let Some(frame) = entry.frame.clone() {
            let start = out.len();
            out.extend_from_slice(&frame);
            out[start] |= 0x08; // DUP
            window.unframed.push((seq, start..out.len()));
        } else if let Some(message) = entry.message.clone() {
            let pkid = entry.pkid;
            let result = encoder.publish(out, &message, pkid, true);
            if let Encoded::TooLarge { size, max } = result.map_err(encoding)? {
                window.give_up(index);
                self.dropped_too_large(window, seq, size, max);
                return Ok(false);
            }
        } else {
            return Ok(false);
        }
        window.sent[index].sent_at = Instant::now();
        Ok(true)
    }

    /// Reads log entries into free window slots and encodes the PUBLISHes into `out`.
    /// Returns how many entries were sent upstream.
    pub(super) fn fill_window(
        &self,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &mut Encoder,
        max_inflight: usize,
        rate: &mut Option<RateLimiter>,
        own_origin: &str,
    ) -> Result<usize, Failure> {
        if !window.deferred.is_empty()
            && self.resend_deferred(window, out, encoder, max_inflight)?
        {
            return Ok(0);
        }
        let room = window.room(max_inflight);
        // While acknowledgements are on their way, refill in runs of an eighth of the window
        // rather than a slot or two per PUBACK: one write (one syscall, one wake-up of the
        // writer) per run instead of per message. Measured draining into Mosquitto, which
        // acknowledges in small bursts: 35 k -> 47-53 k msg/s. A window with nothing waiting
        // refills at once, and no slot waits longer than REFILL_HOLD (an upstream that
        // acknowledges in large, spaced bursts, as rumqttd does, lost 40% without it).
        if room < (max_inflight / REFILL_RUN_DIVISOR).max(1)
            && window.unacked() > 0
            && window.last_fill.elapsed() < REFILL_HOLD
        {
            return Ok(0);
        }
        let budget = match rate {
            Some(r) => r.available(room),
            None => room,
        };
        if budget == 0 {
            return Ok(0);
        }
        if window.read_ahead.len() < budget {
            let from = window
                .read_ahead
                .back()
                .map_or(window.next_read, |(seq, _)| seq + 1);
            let more = self
                .store
                .read_log_budget(from, READ_AHEAD.max(budget), READ_AHEAD_BYTES)
                .map_err(|e| Failure::new("store", format!("reading log: {e}")))?;
            window.read_ahead.extend(more);
        }
        let mut sent = 0;
        window.last_fill = Instant::now();
        let take = budget.min(window.read_ahead.len());
        for _ in 0..take {
            if window.unacked_bytes >= MAX_WINDOW_BYTES || out.len() >= MAX_WINDOW_BYTES {
                break; // large records: the rest waits for acknowledgements
            }
            let Some((seq, bytes)) = window.read_ahead.pop_front() else {
                break;
            };
            window.next_read = seq + 1;
            if self.forward_one(window, out, encoder, seq, &bytes, own_origin)? {
                if let Some(r) = rate.as_mut() {
                    r.take();
                }
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Sends log entry `seq` upstream if it is for this bridge, or passes over it; returns
    /// whether a PUBLISH was encoded.
    fn forward_one(
        &self,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &mut Encoder,
        seq: Seq,
        bytes: &Bytes,
        own_origin: &str,
    ) -> Result<bool, Failure> {
        let record = match StoredMessage::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                // It could never be forwarded: passed over (and deleted with the rest
                // behind the cursor), but as the fault it is.
                error!(bridge = %self.config.name, seq, error = %e, "undecodable log entry skipped");
                crate::stats::STORE_FAULTS.record(
                    crate::stats::StoreFault::CorruptRecord,
                    format!("bridge {}: log record {seq}: {e}", self.config.name),
                );
                window.sent.push_back(Sent::passed_over(seq));
                return Ok(false);
            }
        };
        let rule = if record.origin == own_origin {
            None // its own command coming back
        } else {
            self.config.forward_rule_at(&record.topic)
        };
        let Some((index, rule)) = rule else {
            window.sent.push_back(Sent::passed_over(seq));
            return Ok(false);
        };
        if let Some(spec) = BatchSpec::of(rule) {
            return self.batch_one(window, out, encoder, seq, (index, spec), record);
        }
        // Forwarded on its own: a pending batch goes up first, so the wire keeps log order.
        self.flush_batch(window, out, encoder)?;
        let (message, received_at_ms) = upstream_message(record, &rule.remote_prefix, rule.qos);
        let expires_at_ms = message.properties.as_ref().and_then(|p| p.expires_at_ms);
        if message.expired(unix_ms()) {
            window.sent.push_back(Sent::passed_over(seq));
            self.dropped_expired(window, seq);
            return Ok(false);
        }
        let pkid = if message.qos == QoS::AtLeastOnce {
            window.allocate_pkid()
        } else {
            0
        };
        let start = out.len();
        let result = encoder.publish(out, &message, pkid, false);
        if let Encoded::TooLarge { size, max } = result.map_err(encoding)? {
            window.sent.push_back(Sent::passed_over(seq));
            self.dropped_too_large(window, seq, size, max);
            return Ok(false);
        }
        let size = if pkid != 0 { out.len() - start } else { 0 };
        window.unacked_bytes += size;
        let mut resend = None;
        if pkid != 0 {
            window.by_pkid.insert(pkid, seq);
            if encoder.is_v5() {
                // Encoded again after a reconnect: aliases and expiry are per sending.
                resend = Some(message);
            } else {
                // Kept as a slice of the buffer this turn writes (see `keep_frames`).
                window.unframed.push((seq, start..out.len()));
            }
        }
        window.sent.push_back(Sent {
            seq,
            pkid,
            acked: pkid == 0, // QoS 0: done once handed to the writer
            sent_at: Instant::now(),
            received_at_ms,
            forwarded: true,
            frame: None,
            message: resend,
            expires_at_ms,
            size,
        });
        Ok(true)
    }

    /// Adds log entry `seq`, for batching rule `index`, to the pending batch: the batch is
    /// sent first when it is another rule's or the event does not fit, and at once when the
    /// event fills it. An expired message, or an event too large for any batch the upstream
    /// takes, is passed over (counted) instead. Returns whether it joined a batch.
    fn batch_one(
        &self,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &mut Encoder,
        seq: Seq,
        (index, spec): (usize, BatchSpec),
        record: StoredMessage,
    ) -> Result<bool, Failure> {
        let expires_at_ms = record
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| record.received_at_ms + u64::from(secs) * 1000);
        if expires_at_ms.is_some_and(|at| at <= unix_ms()) {
            window.sent.push_back(Sent::passed_over(seq));
            self.dropped_expired(window, seq);
            return Ok(false);
        }
        let event = batch::event(&record.topic, &record.payload);
        let input = record.topic.len() + record.payload.len();
        // Within an MQTT 5 upstream's maximum packet size: room for the fixed header, topic
        // and properties, and for what compressing incompressible data adds.
        let topic_len = spec.topic(encoder.is_v5()).len();
        let cap = encoder.max_packet_size().map_or(usize::MAX, |max| {
            let max = max as usize;
            max.saturating_sub(topic_len + 256 + max / 512)
        });
        if event.len() + 2 > cap {
            window.sent.push_back(Sent::passed_over(seq));
            let max = encoder.max_packet_size().unwrap_or(u32::MAX);
            self.dropped_too_large(window, seq, event.len(), max);
            return Ok(false);
        }
        let other = |b: &PendingBatch| b.rule != index || !b.fits(&spec, input, event.len(), cap);
        if window.batch.as_ref().is_some_and(other) {
            self.flush_batch(window, out, encoder)?;
        }
        let now = Instant::now();
        let pending = window
            .batch
            .get_or_insert_with(|| PendingBatch::new(index, &spec, now));
        pending.push(&spec, seq, input, &event);
        let full = pending.is_full(&spec);
        // Unacknowledged with no packet id: it waits for its batch (see `Sent::pkid`).
        let mut entry = Sent::passed_over(seq);
        entry.acked = false;
        entry.forwarded = true;
        entry.received_at_ms = record.received_at_ms;
        window.sent.push_back(entry);
        if full {
            self.flush_batch(window, out, encoder)?;
        }
        Ok(true)
    }

    /// Sends the pending batch, if any, as one PUBLISH on its rule's `batch_topic` at the
    /// rule's QoS: one packet id for all its events, acknowledged together (`Window::
    /// acknowledge`); the frame is kept to send again byte for byte after a reconnect.
    pub(super) fn flush_batch(
        &self,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &mut Encoder,
    ) -> Result<(), Failure> {
        let Some(pending) = window.batch.take() else {
            return Ok(());
        };
        let rule = self.config.forward.get(pending.rule);
        let Some((rule, spec)) = rule.and_then(|r| Some((r, BatchSpec::of(r)?))) else {
            return Err(Failure::new("config", "a batch of a rule without batch"));
        };
        let (first, last, events, input) = (
            pending.first_seq,
            pending.last_seq,
            pending.events,
            pending.input_bytes,
        );
        let payload = pending.finish(&spec).map_err(encoding)?;
        let payload_len = payload.len();
        let message = batch_message(rule, &spec, encoder.is_v5(), payload, events);
        let pkid = match message.qos {
            QoS::AtMostOnce => 0,
            _ => window.allocate_pkid(),
        };
        let start = out.len();
        let written = match encoder
            .publish_unaliased(out, &message, pkid)
            .map_err(encoding)?
        {
            Encoded::Written => true,
            Encoded::TooLarge { size, max } => {
                // The cap above keeps batches smaller; should one still be too large, its
                // events are given up like any message too large, counted each.
                for _ in 0..events {
                    self.dropped_too_large(window, last, size, max);
                }
                false
            }
        };
        let size = if written && pkid != 0 {
            out.len() - start
        } else {
            0
        };
        let now = Instant::now();
        let from = window.sent.partition_point(|s| s.seq < first);
        for entry in window.sent.range_mut(from..) {
            if entry.seq > last {
                break;
            }
            if entry.acked || entry.pkid != 0 {
                continue; // passed over between its events
            }
            entry.sent_at = now;
            if !written || pkid == 0 {
                entry.acked = true; // given up, or QoS 0: done once handed to the writer
            } else {
                entry.pkid = pkid;
                if entry.seq == last {
                    entry.size = size;
                }
            }
        }
        if !written {
            return Ok(());
        }
        if pkid != 0 {
            window.by_pkid.insert(pkid, last);
            window.batch_spans.insert(pkid, first);
            window.unframed.push((last, start..out.len()));
            window.unacked_bytes += size;
        }
        self.set_status(|s| {
            let c = &s.batches;
            c.batches.fetch_add(1, Relaxed);
            c.events.fetch_add(events as u64, Relaxed);
            c.input_bytes.fetch_add(input as u64, Relaxed);
            c.output_bytes.fetch_add(payload_len as u64, Relaxed);
        });
        Ok(())
    }

    /// Sends the pending batch if it is due: `max_ms` after its first event, or when the
    /// window is full and nothing else is on the wire to free it (an upstream's receive
    /// maximum below `max_events`). Not while PUBLISHes of an earlier connection wait to be
    /// sent again (nothing new goes before them).
    pub(super) fn flush_batch_if_due(
        &self,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &mut Encoder,
        max_inflight: usize,
    ) -> Result<(), Failure> {
        let Some(pending) = &window.batch else {
            return Ok(());
        };
        let due = pending.deadline <= Instant::now()
            || (window.room(max_inflight) == 0 && window.on_the_wire() == 0);
        if due && window.deferred.is_empty() {
            self.flush_batch(window, out, encoder)?;
        }
        Ok(())
    }

    fn dropped_expired(&self, window: &mut Window, seq: Seq) {
        self.stats.dropped_message_expiry.fetch_add(1, Relaxed);
        if Drops::count(&mut window.drops.expired) {
            info!(bridge = %self.config.name, seq, dropped = window.drops.expired, "message expiry passed before it could be forwarded: not sent (stats: dropped_message_expiry)");
        }
    }

    fn dropped_too_large(&self, window: &mut Window, seq: Seq, size: usize, max: u32) {
        self.stats.dropped_too_large.fetch_add(1, Relaxed);
        if Drops::count(&mut window.drops.too_large) {
            warn!(bridge = %self.config.name, seq, size, max, dropped = window.drops.too_large, "message larger than the upstream's maximum packet size: not forwarded (stats: dropped_too_large)");
        }
    }
}

fn encoding(e: String) -> Failure {
    Failure::new("protocol_error", format!("encoding: {e}"))
}

/// The PUBLISH of a batch: over MQTT 5 with its content type and the user properties
/// `content-encoding` (when compressed) and `batch-events`.
fn batch_message(
    rule: &ForwardRule,
    spec: &BatchSpec,
    v5: bool,
    payload: Vec<u8>,
    events: usize,
) -> Message {
    let qos = if rule.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut message = Message::new(spec.topic(v5), payload, qos, false);
    if v5 {
        let mut user_properties = Vec::new();
        if let Some(how) = spec.content_encoding() {
            user_properties.push(("content-encoding".to_string(), how.to_string()));
        }
        user_properties.push(("batch-events".to_string(), events.to_string()));
        message.properties = Some(Arc::new(MessageProperties {
            content_type: Some(spec.content_type().to_string()),
            user_properties,
            ..MessageProperties::default()
        }));
    }
    message
}

/// A log record as the message to send upstream: the remote topic, the QoS it goes at (the
/// lower of the rule's and the message's, 0 or 1), its properties with the expiry deadline
/// counted from when the broker received it. Also returns `received_at_ms`.
pub(super) fn upstream_message(
    record: StoredMessage,
    prefix: &str,
    rule_qos: u8,
) -> (Message, u64) {
    let qos = if rule_qos == 0 || record.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let received_at_ms = record.received_at_ms;
    let topic: Arc<str> = if prefix.is_empty() {
        Arc::from(record.topic)
    } else {
        Arc::from(format!("{prefix}{}", record.topic))
    };
    let mut message = Message::new(topic, record.payload, qos, record.retain);
    message.properties = record.properties.map(|mut p| {
        // Only a server sends subscription identifiers [MQTT-3.3.4-6]; a log record has none.
        p.subscription_ids.clear();
        p.expires_at_ms = p
            .message_expiry_interval
            .map(|secs| received_at_ms + u64::from(secs) * 1000);
        Arc::new(p)
    });
    (message, received_at_ms)
}

#[cfg(test)]
#[path = "forward_tests.rs"]
mod tests;
