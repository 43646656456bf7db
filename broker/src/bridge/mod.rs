//! Upstream bridges: forward the durable log to a cloud broker, and bring the cloud's
//! commands back to local subscribers.
//!
//! Each bridge is one task (`session.rs`) with one upstream connection at a time, made and
//! spoken by our own MQTT client link (`link.rs`), MQTT 3.1.1 or 5 per bridge (`protocol`;
//! `wire.rs` puts both codecs, rumqttc's v4 and rmqtt-codec's v5, behind one interface;
//! `aliases.rs` holds an MQTT 5 connection's topic aliases). The task reads
//! the log from its own durable cursor, publishes the entries that match its `forward` rules
//! in log order with at most `max_inflight` unacknowledged, and moves its cursor over an
//! entry only when every entry up to it is acknowledged upstream (QoS 1 PUBACK; QoS 0 once
//! handed to the writer). The log entry is deleted when every bridge's cursor has passed it
//! (`Cursors`). The `[[bridge]]` config is `crate::config::bridge`. In this folder: `session.rs`
//! (the task and its select loop), `forward.rs` (log entries into PUBLISHes, what a new
//! connection sends again, the drops), `window.rs` (what is in flight, the cursor,
//! keep-alive: plain state), `link.rs` (the upstream connection), `inbound.rs` (commands from
//! the cloud),
//! `failure.rs` (why a session ended), `batch.rs` (the batches of a forward rule with
//! `batch`: their state, encoding and compression); `Cursors` and the back-off live here.
//!
//! Invariants:
//! - Never skip: the cursor only advances over a contiguous run of acknowledged entries,
//!   so a crash resends from the first entry not durably behind the cursor, and a reconnect
//!   resends every unacknowledged PUBLISH (same packet id, DUP set) before anything new.
//! - Bounded duplicates: after a crash the bridge resends from its last *durable* cursor.
//!   What it may send twice is (a) what it had sent and not yet moved the cursor over, at
//!   most `max_inflight` entries, plus (b) what the cursor had moved over but the disk did
//!   not have yet, also held to at most `max_inflight`: a crash duplicates at most
//!   `2 x max_inflight` messages. The two bounds are separate so that a window slot is free
//!   again at the PUBACK, without waiting for a disk sync: on a long link the window, not
//!   the disk, sets the pace (window / round trip). Cursor writes ride the store's group
//!   commit and are pipelined.
//! - Never drop for slowness: an upstream that is away, refuses us, stalls (connected but
//!   not acknowledging for `ack_timeout`) or goes silent (a PINGREQ unanswered for half a
//!   `keep_alive`) is reconnected with capped, jittered exponential back-off while the log
//!   holds everything.
//! - In order: one connection, one in-order stream, and the window is resent in order.
//! - Never forward what may not be: a message whose MQTT 5 expiry has run out (over either
//!   protocol), or one larger than an MQTT 5 upstream's maximum packet size, is passed over,
//!   counted (`Stats::dropped_message_expiry`, `dropped_too_large`) and logged; the cursor
//!   moves over it like over an acknowledged entry, so still never past an unacknowledged
//!   one. An MQTT 5 upstream's receive maximum lowers the window (`max_inflight`) for the
//!   connection; what was in flight beyond it is sent again as acknowledgements make room.
//! - Batches (`[[bridge.forward]]` with `batch`, docs/pipeline.md): consecutive entries one
//!   rule forwards are packed into one PUBLISH on its `batch_topic`, sent when full
//!   (`max_events`, `max_bytes`), `max_ms` after its first event was read, or before the next
//!   entry forwarded otherwise (entries passed over do not cut a batch). The batch's events
//!   sit in the window from the moment they are read, unacknowledged, so they count against
//!   `max_inflight` like any entry (the duplicate bound above stays in entries) and the
//!   cursor cannot pass them. One packet id covers them all: they count as acknowledged only
//!   at its PUBACK (QoS 1; QoS 0 once handed to the writer), together. The frame is kept and
//!   a reconnect sends it again byte for byte with DUP set (no topic alias, over MQTT 5
//!   either). A crash restarts from the durable cursor and may cut batches differently:
//!   events may arrive twice in different batches, never not at all. The pending batch is
//!   plain state in the `Window`, kept across reconnects.
//! - Commands from the upstream are acknowledged only once the router accepted them (durably
//!   where they must be kept), in the order they came; with `clean_session = false` (the
//!   default) the upstream keeps what arrives for the site while the link is down (over MQTT
//!   5 for `session_expiry`, by default for ever). MQTT 5 commands keep their properties.

mod aliases;
mod batch;
mod failure;
mod forward;
mod inbound;
pub mod link;
mod session;
mod window;
pub mod wire;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use crate::config::bridge::{
    BridgeConfig, BridgeTls, ForwardRule, ReconnectConfig, Secret, SubscribeRule,
};
pub use crate::stats::WireCounters;
pub use crate::status::BridgeStatus;
pub use link::LinkError;

use crate::router::RouterCmd;
use crate::stats::Stats;
use crate::store::{Keyspace, Seq, Store};

/// The cursors of every bridge: the log is deleted up to the slowest.
pub struct Cursors {
    state: Mutex<CursorState>,
}

struct CursorState {
    positions: Vec<Seq>,
    /// The log is deleted through here (or is about to be).
    deleted_through: Seq,
    last_delete: Instant,
}

/// Delete the log behind the slowest bridge in runs of at least this many entries (or
/// after `DELETE_INTERVAL`): each delete costs a range scan and a commit, so many small
/// ones slow the drain.
const DELETE_EVERY: u64 = 2048;
const DELETE_INTERVAL: Duration = Duration::from_millis(500);
/// Most entries one delete covers; a longer span (a bridge catching up after an outage of
/// another, or leftovers found at start) goes in several, one per turn. sled keeps every
/// leaf a batch deletes from in memory until the batch is applied: one commit deleting 75 MiB
/// of 100-byte entries cost ~450 MB here.
const MAX_DELETE_SPAN: u64 = 8 * DELETE_EVERY;

impl Cursors {
    /// `deleted_through`: the log holds nothing at or below it (the seq before its first
    /// entry). Entries behind every cursor that a crash kept from being deleted (deletes are
    /// made in runs) are deleted from there by the first advances.
    pub fn new(initial: Vec<Seq>, deleted_through: Seq) -> Arc<Cursors> {
        let min = initial.iter().copied().min().unwrap_or(0);
        let deleted_through = deleted_through.min(min);
        Arc::new(Cursors {
            state: Mutex::new(CursorState {
                positions: initial,
                deleted_through,
                last_delete: Instant::now(),
            }),
        })
    }

    /// Records bridge `index` at `cursor`; returns how far the log may now be deleted, when
    /// that is worth a delete (a long enough run, a while since the last, or `force`).
    fn advance(&self, index: usize, cursor: Seq, force: bool) -> Option<Seq> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state.positions.get_mut(index)? = cursor;
        let min = state.positions.iter().copied().min()?;
        let behind = min.saturating_sub(state.deleted_through);
        if behind == 0
            || !(force || behind >= DELETE_EVERY || state.last_delete.elapsed() >= DELETE_INTERVAL)
        {
            return None;
        }
        Some(state.take_run(min))
    }

    /// A delete that `advance` held back and whose interval has passed.
    fn delete_due(&self) -> Option<Seq> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let min = state.positions.iter().copied().min()?;
        let behind = min.saturating_sub(state.deleted_through);
        if behind == 0 || (behind < DELETE_EVERY && state.last_delete.elapsed() < DELETE_INTERVAL) {
            return None;
        }
        Some(state.take_run(min))
    }

    pub fn min(&self) -> Seq {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.positions.iter().copied().min().unwrap_or(0)
    }
}

impl CursorState {
    /// The next delete towards `min`, at most `MAX_DELETE_SPAN` entries long.
    fn take_run(&mut self, min: Seq) -> Seq {
        let through = min.min(self.deleted_through.saturating_add(MAX_DELETE_SPAN));
        self.deleted_through = through;
        self.last_delete = Instant::now();
        through
    }
}

pub fn cursor_key(name: &str) -> Vec<u8> {
    format!("bridge/{name}/cursor").into_bytes()
}

pub fn load_cursor(store: &Store, name: &str) -> Seq {
    match store.get(Keyspace::Meta, &cursor_key(name)) {
        Ok(Some(bytes)) if bytes.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes);
            u64::from_be_bytes(b)
        }
        _ => 0,
    }
}

/// One bridge, ready to [`run`](Bridge::run) as a task.
pub struct Bridge {
    pub config: BridgeConfig,
    pub client_id: String,
    pub index: usize,
    pub store: Store,
    pub cursors: Arc<Cursors>,
    pub router: mpsc::Sender<RouterCmd>,
    pub status: Arc<Mutex<BridgeStatus>>,
    pub shutdown: crate::shutdown::Shutdown,
    /// The broker's counters: messages not forwarded (expired, too large) are counted there.
    pub stats: Arc<Stats>,
}

/// Capped exponential back-off with +-25% jitter.
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    fn new(config: &ReconnectConfig) -> Backoff {
        let initial = Duration::from_millis(config.initial_ms);
        Backoff {
            initial,
            max: Duration::from_millis(config.max_ms),
            current: initial,
            rng: crate::time::unix_ms() | 1,
        }
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }

    fn next(&mut self) -> Duration {
        // xorshift: jitter needs no more than this.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let quarter = base.as_millis() as u64 / 4;
        let jitter = if quarter == 0 {
            0
        } else {
            self.rng % (2 * quarter + 1)
        };
        Duration::from_millis(base.as_millis() as u64 - quarter + jitter)
    }
}

/// Token bucket for `max_rate`: refills continuously, holds at most a tenth of a second.
struct RateLimiter {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second: f64::from(per_second),
            tokens: 1.0,
            last: Instant::now(),
        }
    }

    fn available(&mut self, want: usize) -> usize {
        let now = Instant::now();
        let capacity = (self.per_second / 10.0).max(1.0);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(capacity);
        self.last = now;
        want.min(self.tokens.floor() as usize)
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut b = Backoff::new(&ReconnectConfig {
            initial_ms: 100,
            max_ms: 1000,
        });
        let waits: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert!((75..=125).contains(&waits[0]), "{waits:?}");
        assert!((150..=250).contains(&waits[1]), "{waits:?}");
        assert!(
            waits[5..].iter().all(|w| (750..=1250).contains(w)),
            "{waits:?}"
        );
        b.reset();
        assert!(b.next() <= Duration::from_millis(125));
    }

    #[test]
    fn rate_limiter_caps_burst() {
        let mut r = RateLimiter::new(100);
        let first = r.available(1000);
        assert!(first <= 10, "{first}");
    }

    #[test]
    fn cursors_delete_behind_the_slowest_in_long_runs() {
        let c = Cursors::new(vec![0, 0], 0);
        assert_eq!(
            c.advance(0, 5000, false),
            None,
            "the other bridge is still at 0"
        );
        assert_eq!(
            c.advance(1, 3, false),
            None,
            "too short a run to delete yet"
        );
        assert_eq!(c.advance(1, 4, true), Some(4), "forced (shutdown)");
        assert_eq!(
            c.advance(1, 4 + DELETE_EVERY, false),
            Some(4 + DELETE_EVERY)
        );
        assert_eq!(c.min(), 4 + DELETE_EVERY);
        // A short run held back is deleted once the interval has passed, even if idle.
        assert_eq!(c.advance(1, 10 + DELETE_EVERY, false), None);
        assert_eq!(c.delete_due(), None);
        std::thread::sleep(DELETE_INTERVAL);
        assert_eq!(c.delete_due(), Some(10 + DELETE_EVERY));
        assert_eq!(c.delete_due(), None);
    }

    #[test]
    fn cursors_delete_long_spans_and_leftovers_in_bounded_runs() {
        // Restarted with both cursors at 100_000 but the log still holding entries from 10
        // (deletes held back when the process died).
        let c = Cursors::new(vec![100_000, 100_000], 9);
        let mut runs = Vec::new();
        while let Some(through) = c.delete_due() {
            runs.push(through);
        }
        assert_eq!(runs.first(), Some(&(9 + MAX_DELETE_SPAN)));
        // The short remainder waits for the interval, as any short run does.
        std::thread::sleep(DELETE_INTERVAL);
        runs.extend(c.delete_due());
        assert_eq!(runs.last(), Some(&100_000));
        assert!(runs.windows(2).all(|w| w[1] - w[0] <= MAX_DELETE_SPAN));
        // A bridge catching up far ahead: the delete that goes with its cursor is capped too.
        let c = Cursors::new(vec![0, 0], 0);
        c.advance(0, 1_000_000, false);
        assert_eq!(c.advance(1, 1_000_000, false), Some(MAX_DELETE_SPAN));
    }
}
