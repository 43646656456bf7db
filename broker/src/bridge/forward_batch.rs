//! The forwarding half for rules with `batch`: log entries into the pending batch
//! (`batch.rs`), and the batch into one PUBLISH when it is full, due, or about to be passed
//! by an entry forwarded otherwise (`forward.rs` calls in here, and the session for the
//! deadline). See the batch rules in the `bridge` module docs.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::batch::{self, BatchSpec, PendingBatch};
use super::failure::Failure;
use super::forward::encoding;
use super::window::{Sent, Window};
use super::wire::{Encoded, Encoder};
use super::Bridge;
use crate::config::bridge::ForwardRule;
use crate::protocol::message::{Message, MessageProperties, QoS};
use crate::store::record::StoredMessage;
use crate::store::Seq;
use crate::time::unix_ms;

impl Bridge {
    /// Adds log entry `seq`, for batching rule `index`, to the pending batch: the batch is
    /// sent first when it is another rule's or the event does not fit, and at once when the
    /// event fills it. An expired message, or an event too large for any batch the upstream
    /// takes, is passed over (counted) instead. Returns whether it joined a batch.
    pub(super) fn batch_one(
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
