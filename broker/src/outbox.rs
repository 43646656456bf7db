//! A connection's outbox: the packets the router has sent to one client and its writer task
//! has not yet written to the socket.
//!
//! The router (one task for every session) sends; the connection's writer task receives and
//! writes in batches. Sending never waits: a full socket must not stop the router, so what
//! a slow reader costs is bounded by the session's own limits, which the router checks
//! before it sends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::protocol::message::Outbound;

/// The sending side of one connection: the router's handle to its writer task.
///
/// A queue of our own rather than a tokio channel: an unbounded channel allocates a block of
/// 32 slots (2.3 KiB of `Outbound`) when it is made, for every connection, idle or not; this
/// queue allocates only while packets wait and gives a burst's room back once drained.
pub struct Outbox {
    shared: Arc<OutboxShared>,
}

pub struct OutboxReceiver {
    shared: Arc<OutboxShared>,
}

struct OutboxShared {
    state: Mutex<OutboxState>,
    /// Wakes the one receiver; a notification sent while it is not waiting is kept for it.
    wake: tokio::sync::Notify,
    /// Sent and not yet written by the writer (queued, held, or taken and being written).
    pending: AtomicUsize,
}

struct OutboxState {
    queue: VecDeque<Outbound>,
    /// Packets held back until the CONNACK may go out (see [`Outbox::hold`]).
    held: Option<Vec<Outbound>>,
    /// Live `Outbox` handles; at 0 the receiver ends once the queue is drained.
    senders: usize,
    receiver_gone: bool,
}

/// A drained queue that grew past this many packets gives its room back.
const OUTBOX_KEEP_SLOTS: usize = 1024;

impl OutboxShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Outbox {
    pub fn new() -> (Outbox, OutboxReceiver) {
        let shared = Arc::new(OutboxShared {
            state: Mutex::new(OutboxState {
                queue: VecDeque::new(),
                held: None,
                senders: 1,
                receiver_gone: false,
            }),
            wake: tokio::sync::Notify::new(),
            pending: AtomicUsize::new(0),
        });
        (
            Outbox {
                shared: shared.clone(),
            },
            OutboxReceiver { shared },
        )
    }

    pub fn send(&self, packet: Outbound) {
        self.shared.pending.fetch_add(1, Ordering::Relaxed);
        let mut state = self.shared.lock();
        // A gone receiver means the connection is going away; the router learns that from
        // its Disconnected command, so there is nothing to do here.
        if state.receiver_gone {
            return;
        }
        // Close is never held: a connection taken over before its CONNACK must still end.
        if !matches!(packet, Outbound::Close(_)) {
            if let Some(held) = state.held.as_mut() {
                held.push(packet);
                return;
            }
        }
        state.queue.push_back(packet);
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Like [`Outbox::send`], but a `Close` too waits behind a held CONNACK: the broker
    /// closing a connection for what its client sent tells an MQTT 5 client why only after
    /// the CONNACK (a takeover's `Close`, sent with `send`, must end a connection whose
    /// CONNACK may never come).
    pub fn send_in_order(&self, packet: Outbound) {
        self.shared.pending.fetch_add(1, Ordering::Relaxed);
        let mut state = self.shared.lock();
        if state.receiver_gone {
            return;
        }
        match state.held.as_mut() {
            Some(held) => held.push(packet),
            None => state.queue.push_back(packet),
        }
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Holds back everything sent from now on until [`Outbox::release_hold`]: a new
    /// persistent session's CONNACK waits for its session record to be durable, and the
    /// CONNACK must be the first packet the client sees [MQTT-3.2.0-1].
    pub fn hold(&self) {
        self.shared.lock().held = Some(Vec::new());
    }

    /// Sends `first` (the CONNACK), then everything held since [`Outbox::hold`], in order.
    pub fn release_hold(&self, first: Outbound) {
        self.shared.pending.fetch_add(1, Ordering::Relaxed);
        let mut state = self.shared.lock();
        let held = state.held.take().unwrap_or_default();
        if !state.receiver_gone {
            state.queue.push_back(first);
            state.queue.extend(held);
        }
        drop(state);
        self.shared.wake.notify_one();
    }

    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Outbox {
        self.shared.lock().senders += 1;
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.shared.wake.notify_one();
        }
    }
}

impl OutboxReceiver {
    /// The next packet; `None` once every `Outbox` is dropped and the queue is drained.
    /// Cancel safe: a packet is only taken in the poll that returns it.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            {
                let mut state = self.shared.lock();
                if let Some(packet) = state.queue.pop_front() {
                    return Some(packet);
                }
                if state.queue.capacity() > OUTBOX_KEEP_SLOTS {
                    state.queue = VecDeque::new();
                }
                if state.senders == 0 {
                    return None;
                }
            }
            self.shared.wake.notified().await;
        }
    }

    /// The next packet if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.shared.lock().queue.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.lock().queue.is_empty()
    }

    /// Called by the writer once it has written `n` packets.
    pub fn written(&self, n: usize) {
        self.shared.pending.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_gone = true;
        state.queue = VecDeque::new();
        state.held = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut OutboxReceiver) -> Vec<Outbound> {
        std::iter::from_fn(|| rx.try_recv()).collect()
    }

    #[test]
    fn held_outbox_sends_connack_first_then_what_was_held_and_never_holds_close() {
        let (outbox, mut rx) = Outbox::new();
        outbox.hold();
        outbox.send(Outbound::PingResp);
        outbox.send(Outbound::Close(
            crate::protocol::message::CloseReason::Unspecified,
        ));
        outbox.send(Outbound::PubAck(3));
        // Only Close got through while held.
        assert!(matches!(drain(&mut rx)[..], [Outbound::Close(_)]));
        outbox.release_hold(Outbound::ConnAck(
            crate::protocol::message::ConnectOutcome::Accepted {
                session_present: false,
            },
        ));
        outbox.send(Outbound::PubAck(4));
        let sent = drain(&mut rx);
        assert!(
            matches!(
                sent[..],
                [
                    Outbound::ConnAck(_),
                    Outbound::PingResp,
                    Outbound::PubAck(3),
                    Outbound::PubAck(4)
                ]
            ),
            "{sent:?}"
        );
        assert_eq!(outbox.pending(), 5);
    }
}
