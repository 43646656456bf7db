//! What a bridge has in flight: the window of log entries sent upstream and not yet done
//! with (acknowledged, or passed over behind one that is not), the cursor that moves over them
//! in order, its durable copy, and the keep-alive deadlines of the current connection. Plain
//! state with no I/O, so the session loop owns it across reconnects and tests drive it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::batch::PendingBatch;
use super::link::LinkError;
use crate::protocol::message::Message;
use crate::store::{Seq, Ticket};

/// A log entry the window holds: sent and not yet acknowledged, acknowledged but behind an
/// entry that is not, or passed over (not for this bridge) behind one that is not.
pub(super) struct Sent {
    pub(super) seq: Seq,
    /// 0 for QoS 0 and passed-over entries, and for an event of the pending batch (not yet
    /// acknowledged, not yet sent). The events of a batch PUBLISH share its id; the last
    /// of them carries the frame and size.
    pub(super) pkid: u16,
    pub(super) acked: bool,
    pub(super) sent_at: Instant,
    /// When the broker received it (Unix ms), for the forward latency histogram.
    pub(super) received_at_ms: u64,
    /// Published upstream: may be duplicated after a crash until a cursor past it is durable.
    pub(super) forwarded: bool,
    /// The encoded QoS 1 PUBLISH, kept until acknowledged to send again after a reconnect.
    pub(super) frame: Option<Bytes>,
    /// The message of an unacknowledged QoS 1 PUBLISH over MQTT 5, to encode again after a
    /// reconnect (its frame named topic aliases of the old connection and an expiry that has
    /// since counted down).
    pub(super) message: Option<Message>,
    /// When its MQTT 5 message expiry runs out (unix ms): it is not sent again after that.
    pub(super) expires_at_ms: Option<u64>,
    /// Encoded length of a QoS 1 PUBLISH while unacknowledged (`Window::unacked_bytes`).
    pub(super) size: usize,
}

impl Sent {
    /// An entry this bridge does not send (not for it, or undecodable): done with at once.
    pub(super) fn passed_over(seq: Seq) -> Sent {
        Sent {
            seq,
            pkid: 0,
            acked: true,
            sent_at: Instant::now(),
            received_at_ms: 0,
            forwarded: false,
            frame: None,
            message: None,
            expires_at_ms: None,
            size: 0,
        }
    }

    /// Unacknowledged, with what it takes to send it again.
    pub(super) fn resendable(&self) -> bool {
        !self.acked && (self.frame.is_some() || self.message.is_some())
    }
}

/// Messages a bridge did not forward, counted for the log: each reason is logged at its
/// 1st, 2nd, 4th, 8th... occurrence, so a flood does not flood the log.
#[derive(Debug, Default)]
pub(super) struct Drops {
    pub(super) expired: u64,
    pub(super) too_large: u64,
    pub(super) refused: u64,
}

impl Drops {
    /// Counts one; whether this one is worth a log line.
    pub(super) fn count(counter: &mut u64) -> bool {
        *counter += 1;
        counter.is_power_of_two()
    }
}

/// Forwarding state that survives reconnects (not restarts: those start at the durable
/// cursor, see the module docs of `bridge`).
pub(super) struct Window {
    /// Every entry `<=` cursor is done for this bridge (in memory; see `durable_cursor`).
    pub(super) cursor: Seq,
    /// The cursor last submitted to the store, and the one the disk surely has.
    pub(super) persisted: Seq,
    pub(super) durable_cursor: Seq,
    /// Cursor writes submitted and not yet durable.
    pub(super) unconfirmed: VecDeque<(Ticket, Seq)>,
    pub(super) last_persist: Instant,
    /// Forwarded entries behind `cursor` but not behind `durable_cursor`: they would be sent
    /// again after a crash, so they are bounded by `max_inflight` like `sent`.
    pub(super) forwarded_unpersisted: VecDeque<Seq>,
    /// Entries after `cursor` that were read from the log, in log order.
    pub(super) sent: VecDeque<Sent>,
    pub(super) by_pkid: HashMap<u16, Seq>,
    pub(super) next_pkid: u16,
    /// Entries read from the log ahead of the window: one range scan per READ_AHEAD.
    pub(super) read_ahead: VecDeque<(Seq, Bytes)>,
    pub(super) next_read: Seq,
    /// PUBLISHes encoded this turn: where each lies in the turn's output buffer.
    pub(super) unframed: Vec<(Seq, std::ops::Range<usize>)>,
    /// Encoded bytes of the QoS 1 PUBLISHes not yet acknowledged (`MAX_WINDOW_BYTES`).
    pub(super) unacked_bytes: usize,
    /// PUBACKs not yet counted in the shared status (it is updated once per turn).
    pub(super) acked_since_status: u64,
    /// Encoded and not yet queued to the writer (kept across a failed session).
    pub(super) out: BytesMut,
    /// When the window was last refilled.
    pub(super) last_fill: Instant,
    /// Unacknowledged PUBLISHes of an earlier connection waiting to be sent again on this
    /// one (the upstream's receive maximum is lower than what was in flight), in order.
    pub(super) deferred: VecDeque<Seq>,
    pub(super) drops: Drops,
    /// The batch being gathered (`batch.rs`), sent when full, at its deadline or before
    /// an entry forwarded otherwise. Its events are in `sent` already, unacknowledged.
    pub(super) batch: Option<PendingBatch>,
    /// Batch PUBLISHes in flight: packet id -> the seq of its first event (`by_pkid` has
    /// its last).
    pub(super) batch_spans: HashMap<u16, Seq>,
}

impl Window {
    pub(super) fn new(cursor: Seq) -> Window {
        Window {
            cursor,
            persisted: cursor,
            durable_cursor: cursor,
            unconfirmed: VecDeque::new(),
            last_persist: Instant::now(),
            forwarded_unpersisted: VecDeque::new(),
            sent: VecDeque::new(),
            by_pkid: HashMap::new(),
            next_pkid: 1,
            read_ahead: VecDeque::new(),
            next_read: cursor + 1,
            unframed: Vec::new(),
            unacked_bytes: 0,
            acked_since_status: 0,
            out: BytesMut::new(),
            last_fill: Instant::now(),
            deferred: VecDeque::new(),
            drops: Drops::default(),
            batch: None,
            batch_spans: HashMap::new(),
        }
    }

    /// QoS 1 PUBLISHes on the wire of this connection and not yet acknowledged (the
    /// upstream's receive maximum bounds them).
    pub(super) fn on_the_wire(&self) -> usize {
        self.by_pkid.len().saturating_sub(self.deferred.len())
    }

    /// Done with the in-flight entry at `index` without an acknowledgement (it expired or
    /// grew too large for a new connection's limit before it could be sent again): the
    /// cursor moves over it as if acknowledged, once everything before it is.
    pub(super) fn give_up(&mut self, index: usize) {
        if let Some(entry) = self.sent.get_mut(index) {
            if entry.acked {
                return;
            }
            entry.acked = true;
            entry.frame = None;
            entry.message = None;
            self.by_pkid.remove(&entry.pkid);
            self.unacked_bytes = self.unacked_bytes.saturating_sub(entry.size);
        }
    }

    /// Keeps each QoS 1 PUBLISH encoded this turn as a slice of `written` (no copy), to send
    /// again after a reconnect if it is still unacknowledged then.
    pub(super) fn keep_frames(&mut self, written: &Bytes) {
        for (seq, range) in self.unframed.drain(..) {
            if let Ok(i) = self.sent.binary_search_by_key(&seq, |s| s.seq) {
                if let Some(entry) = self.sent.get_mut(i) {
                    if !entry.acked {
                        entry.frame = Some(written.slice(range));
                    }
                }
            }
        }
    }

    /// Marks what the PUBACK of `pkid`, sent for log entry `seq`, acknowledges: that entry,
    /// or every event of the batch it carried (the cursor moves over a batch only once all
    /// of it is acknowledged). Returns how many log entries it acknowledged.
    pub(super) fn acknowledge(&mut self, seq: Seq, pkid: u16) -> u64 {
        let first = self.batch_spans.remove(&pkid).unwrap_or(seq);
        let start = self.sent.partition_point(|s| s.seq < first);
        let mut acked = 0;
        for entry in self.sent.range_mut(start..) {
            if entry.seq > seq {
                break;
            }
            if entry.pkid == pkid && !entry.acked {
                entry.acked = true;
                entry.frame = None;
                entry.message = None;
                self.unacked_bytes = self.unacked_bytes.saturating_sub(entry.size);
                crate::stats::FORWARD_LATENCY_MS
                    .observe(crate::time::unix_ms().saturating_sub(entry.received_at_ms));
                acked += 1;
            }
        }
        acked
    }

    /// A packet id not in use (the window is far smaller than 65,535).
    pub(super) fn allocate_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.by_pkid.contains_key(&pkid) {
                return pkid;
            }
        }
    }

    pub(super) fn unacked(&self) -> usize {
        self.by_pkid.len()
    }

    /// Takes in what the store made durable since the last call.
    pub(super) fn absorb_durability(&mut self, durable_through: Ticket) {
        while let Some((ticket, seq)) = self.unconfirmed.front().copied() {
            if ticket > durable_through {
                break;
            }
            self.unconfirmed.pop_front();
            self.durable_cursor = seq;
        }
        let durable = self.durable_cursor;
        while self
            .forwarded_unpersisted
            .front()
            .is_some_and(|s| *s <= durable)
        {
            self.forwarded_unpersisted.pop_front();
        }
    }

    /// Moves the cursor over the acknowledged prefix; returns how many entries it passed.
    pub(super) fn advance(&mut self) -> u64 {
        let mut advanced = 0;
        while self.sent.front().is_some_and(|s| s.acked) {
            if let Some(done) = self.sent.pop_front() {
                self.cursor = done.seq;
                if done.forwarded {
                    self.forwarded_unpersisted.push_back(done.seq);
                }
                advanced += 1;
            }
        }
        advanced
    }

    /// Slots free for new PUBLISHes: both what is in the window and what is acknowledged
    /// but not yet durably behind the cursor are bounded by `max_inflight`.
    pub(super) fn room(&self, max_inflight: usize) -> usize {
        max_inflight
            .saturating_sub(self.sent.len())
            .min(max_inflight.saturating_sub(self.forwarded_unpersisted.len()))
    }
}

/// Keep-alive bookkeeping for one connection.
pub(super) struct KeepAlive {
    pub(super) interval: Duration,
    pub(super) last_sent: Instant,
    pub(super) last_heard: Instant,
    pub(super) ping_sent_at: Option<Instant>,
}

impl KeepAlive {
    pub(super) fn new(interval: Duration) -> KeepAlive {
        let now = Instant::now();
        KeepAlive {
            interval,
            last_sent: now,
            last_heard: now,
            ping_sent_at: None,
        }
    }

    /// Whether to send a PINGREQ now: after `interval` without sending (the MQTT keep-alive
    /// contract), or without hearing anything (`interval / 2` of that while messages wait
    /// for acknowledgement, so a dead link under load is found within one `interval`).
    pub(super) fn ping_due(&self, waiting_for_acks: bool) -> bool {
        if self.ping_sent_at.is_some() {
            return false;
        }
        let heard_limit = if waiting_for_acks {
            self.interval / 2
        } else {
            self.interval
        };
        self.last_sent.elapsed() >= self.interval || self.last_heard.elapsed() >= heard_limit
    }

    /// Anything from the upstream shows the link is alive, and answers a PINGREQ.
    pub(super) fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.ping_sent_at = None;
    }

    /// A PINGREQ unanswered for `interval / 2` means the connection is dead: nothing heard
    /// for at most 1.5 x `interval` (1 x while messages wait).
    pub(super) fn dead(&self) -> Option<LinkError> {
        let grace = self.interval / 2;
        self.ping_sent_at
            .filter(|at| at.elapsed() >= grace)
            .map(|_| LinkError::PingTimeout(grace))
    }
}
