//! The MQTT 3.1.1 session of one device, as a step function: [`Client::poll`] is called by the
//! main loop with the current time and never blocks for longer than the transport's own reads
//! and writes. No executor, no allocator.
//!
//! - CONNECT with a will (`sensors/<id>/status` = `offline`, retained, QoS 1); after CONNACK,
//!   `online` retained on the same topic, then SUBSCRIBE to `sensors/<id>/config` (QoS 1).
//! - Events go to `sensors/<id>/events` at QoS 1 through a bounded outbox of `N` entries that
//!   lives across reconnects; after a reconnect every unacknowledged event is sent again with
//!   DUP set. A full outbox drops its oldest event; the count rides in the next event's `dropped`.
//! - Keep-alive PINGREQ when idle; a PINGREQ or CONNACK unanswered for `response_timeout_ms`,
//!   a transport error, end of stream or a protocol violation drops the link, and it is opened
//!   again after an exponential back-off (`backoff_min_ms` doubling up to `backoff_max_ms`).
//! - Incoming PUBLISHes on the config topic are handed to the caller; QoS 1/2 are acknowledged.
//!
//! Files: `types.rs` holds the public vocabulary (re-exported here), `outbox.rs` the ring of
//! in-flight events, `session.rs` the client's state and the connection state machine; this file
//! is the public API over them. References run one way, down to the leaves: this file uses
//! `session.rs`, `outbox.rs` and `types.rs`; `session.rs` uses `outbox.rs` and `types.rs`;
//! those two use nothing of `client`. The client's state lives in `session.rs`, not here, so
//! that the state machine never has to reach back up into this file.

mod outbox;
mod session;
#[cfg(test)]
mod tests;
mod types;

pub use session::Client;
pub use types::{
    BadIdentity, ClientConfig, ConfigReport, Incoming, Stats, Transport, RX_BUF, TX_BUF,
};

use crate::event::Event;
use crate::mqtt;
use heapless::String;
use outbox::{Outbox, Slot};
use session::{Buffers, Link};

fn valid_level(s: &str) -> bool {
    crate::event::valid_token(s)
}

impl<T: Transport, const N: usize> Client<T, N> {
    /// A client for device `id` (1..=23 of `[A-Za-z0-9._-]`, also the MQTT client id) in boot
    /// number `boot`, publishing readings of `sensor`.
    pub fn new(
        t: T,
        id: &str,
        boot: u32,
        sensor: &str,
        cfg: ClientConfig,
    ) -> Result<Self, BadIdentity> {
        if !valid_level(id) || !valid_level(sensor) {
            return Err(BadIdentity);
        }
        let jitter = id.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ b as u32).wrapping_mul(0x0100_0193)
        }) ^ boot;
        Ok(Self {
            t,
            cfg,
            id: String::try_from(id).map_err(|_| BadIdentity)?,
            sensor: String::try_from(sensor).map_err(|_| BadIdentity)?,
            boot,
            link: Link::Down { since: 0, wait: 0 },
            backoff_ms: cfg.backoff_min_ms,
            outbox: Outbox::new(),
            dropped_pending: 0,
            next_pid: 0,
            sub_pid: None,
            subscribed: false,
            report: None,
            io: Buffers {
                rx: [0; RX_BUF],
                tx: [0; TX_BUF],
            },
            rx_len: 0,
            consume: 0,
            skip: 0,
            last_tx: 0,
            last_rx: 0,
            ping_sent: None,
            jitter: jitter | 1,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }
    pub fn is_connected(&self) -> bool {
        self.link == Link::Up
    }
    /// The broker granted the config subscription.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed
    }
    /// Events waiting for a PUBACK (sent or not).
    pub fn outbox_len(&self) -> usize {
        (0..self.outbox.len())
            .filter(|&i| self.outbox.get(i).is_some_and(|s| !s.acked))
            .count()
    }
    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }
    pub fn device_id(&self) -> &str {
        &self.id
    }

    /// Queues an event for QoS 1 delivery. With a full outbox the oldest event is dropped and
    /// counted; this event carries the count of drops not yet reported.
    pub fn enqueue(&mut self, mut event: Event) {
        if N == 0 {
            self.stats.dropped = self.stats.dropped.wrapping_add(1);
            return;
        }
        if self.outbox.is_full() {
            // The front is never a tombstone (see `handle`), so this is the oldest event.
            if let Some(old) = self.outbox.pop_front() {
                if !old.acked {
                    self.dropped_pending = self
                        .dropped_pending
                        .saturating_add(old.event.dropped)
                        .saturating_add(1);
                    self.stats.dropped = self.stats.dropped.wrapping_add(1);
                }
            }
        }
        event.dropped = event.dropped.saturating_add(self.dropped_pending);
        self.dropped_pending = 0;
        let pid = self.alloc_pid();
        // Cannot fail: a slot was freed above.
        self.outbox.push_back(Slot {
            pid,
            acked: false,
            ever_sent: false,
            sent_on_link: false,
            event,
        });
    }

    /// Reports the fate of a config document on the status topic (QoS 0, not retained, so the
    /// retained `online`/`offline` stays). Sent by the next `poll` while connected.
    pub fn report_config(&mut self, r: ConfigReport) {
        self.report = Some(r);
    }

    /// A clean goodbye: `offline` retained on the status topic, DISCONNECT (so the broker
    /// discards the will), close. Unacknowledged events stay in the outbox.
    pub fn disconnect(&mut self, now: u32) {
        if self.link == Link::Up && self.publish_status(true, &[b"offline"], now) && {
            let r = mqtt::encode_disconnect(&mut self.io.tx);
            self.send(r, now)
        } {
            self.t.close();
        }
        self.link = Link::Down {
            since: now,
            wait: 0,
        };
        self.outbox.all_unsent();
    }

    /// One step: connection management, sending what is due, reading what has arrived.
    /// Returns a config message when one arrived; call again soon after (the main loop's pace).
    pub fn poll(&mut self, now: u32) -> Option<Incoming<'_>> {
        if self.consume > 0 {
            // A byte loop, not `copy_within`: keeps the 1.6 KB `memmove` out of the firmware.
            // `get` rather than indexing: no bounds-check panic paths in the firmware.
            let keep = self.rx_len - self.consume;
            for i in 0..keep {
                if let Some(&b) = self.io.rx.get(i + self.consume) {
                    if let Some(d) = self.io.rx.get_mut(i) {
                        *d = core::hint::black_box(b);
                    }
                }
            }
            self.rx_len = keep;
            self.consume = 0;
        }
        match self.link {
            Link::Down { since, wait } => {
                if now.wrapping_sub(since) < wait {
                    return None;
                }
                self.connect(now);
            }
            Link::AwaitConnAck { since } => {
                if now.wrapping_sub(since) >= self.cfg.response_timeout_ms {
                    self.link_lost(now);
                    return None;
                }
            }
            Link::Up => {
                if !self.service(now) {
                    return None;
                }
            }
        }
        self.receive(now)
    }
}
