//! A client's session: what the broker keeps for one client id, connected or not.
//!
//! It holds the subscriptions, the QoS 1/2 messages sent and not yet acknowledged (the
//! in-flight window, in send order), the messages waiting for room in that window or for
//! the client to come back, and the QoS 2 packet ids received and awaiting PUBREL. The
//! router owns every session; the connection task only moves bytes.

use std::collections::{BTreeSet, VecDeque};

use crate::outbox::{Outbox, Qos0Admission};
use crate::protocol::message::{Message, Outbound, QoS};

/// Topic + payload bytes of the QoS 1/2 messages sent to one client and not yet acknowledged,
/// on top of the `max_inflight` count (at least one message is always in flight). With
/// 16 MiB messages allowed, 100 in flight per subscriber would hold 1.6 GiB; beyond this
/// they wait in the queue (bounded by `max_queued_bytes`) like any message over the window.
pub const MAX_INFLIGHT_BYTES: usize = 4 << 20;

/// Identifies one network connection (a client id may have several over time).
pub type ConnId = u64;

/// A session's filters and their options (one or two for most devices: see `small_map`).
pub type Subscriptions =
    crate::small_map::SmallMap<String, crate::protocol::message::SubscriptionOptions>;

pub struct Online {
    pub conn: ConnId,
    pub outbox: Outbox,
    /// Boxed: most clients set none, and every session would carry its 64 B (issue 14).
    pub will: Option<Box<Message>>,
    /// Seconds the will waits after the connection ends (MQTT 5 will delay interval).
    pub will_delay: u32,
    /// At most this many QoS 1/2 PUBLISHes in flight to the client (its receive maximum).
    pub receive_maximum: u16,
    /// Messages larger than this as a PUBLISH are not sent to the client.
    pub max_packet_size: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InflightState {
    /// PUBLISH sent (QoS 1 or 2), waiting for PUBACK or PUBREC.
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

struct Inflight {
    pkid: u16,
    message: Message,
    state: InflightState,
    /// Where the message is kept on disk for a persistent session (queue id).
    stored: Option<u64>,
}

/// A message waiting for its turn, with its queue id if it is kept on disk.
type Queued = (Message, Option<u64>);

/// Why a message for this session was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    QueueFull,
    Qos0Offline,
    Qos0SlowClient,
    /// Its MQTT 5 message expiry interval passed before delivery started.
    Expired,
    /// Larger as a PUBLISH than the client's maximum packet size: dropped as if sent
    /// [MQTT-3.1.2-25].
    TooLarge,
}

pub struct Session {
    /// Ends with its connection (session expiry 0).
    pub clean: bool,
    /// Session expiry interval, seconds (`SESSION_NEVER_EXPIRES`: kept until a clean start).
    pub expiry_secs: u32,
    /// When the session ends if its client has not come back.
    pub expires_at: Option<tokio::time::Instant>,
    /// A will waiting for its delay to pass (MQTT 5 will delay interval). Boxed: rare, and
    /// every session (idle ones too) would carry its size.
    pub delayed_will: Option<Box<(tokio::time::Instant, Message)>>,
    pub subscriptions: Subscriptions,
    pub online: Option<Online>,
    /// Messages on their way and QoS 2 ids; `None` while there are none: an idle session
    /// does not carry their 128 B (issue 14: what an idle client costs).
    traffic: Option<Box<Traffic>>,
    next_pkid: u16,
}

/// What a session holds while messages move, boxed in [`Session`] only while any do.
struct Traffic {
    inflight: VecDeque<Inflight>,
    /// Topic + payload bytes of `inflight` ([`MAX_INFLIGHT_BYTES`]).
    inflight_bytes: usize,
    queue: VecDeque<Queued>,
    /// Topic + payload bytes of `queue` (`max_queued_bytes`).
    queued_bytes: usize,
    /// QoS 2 packet ids received and not yet released. A `BTreeSet`: no room taken while
    /// empty, and O(log n) for a client that keeps many.
    incoming_qos2: BTreeSet<u16>,
    /// Queued messages dropped when their turn came (expired, too large), with their queue
    /// ids on disk, for the router to delete and count ([`Session::take_discarded`]).
    discarded: Vec<(Option<u64>, Dropped)>,
}

/// What an idle session's [`Traffic`] reads as.
static NO_TRAFFIC: Traffic = Traffic::EMPTY;

impl Traffic {
    const EMPTY: Traffic = Traffic {
        inflight: VecDeque::new(),
        inflight_bytes: 0,
        queue: VecDeque::new(),
        queued_bytes: 0,
        incoming_qos2: BTreeSet::new(),
        discarded: Vec::new(),
    };

    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
            && self.queue.is_empty()
            && self.incoming_qos2.is_empty()
            && self.discarded.is_empty()
    }
}

impl Session {
    pub fn new(clean: bool) -> Session {
        Session {
            clean,
            expiry_secs: if clean {
                0
            } else {
                crate::protocol::inbound::SESSION_NEVER_EXPIRES
            },
            expires_at: None,
            delayed_will: None,
            subscriptions: Subscriptions::default(),
            online: None,
            traffic: None,
            next_pkid: 1,
        }
    }

    fn traffic(&self) -> &Traffic {
        self.traffic.as_deref().unwrap_or(&NO_TRAFFIC)
    }

    fn traffic_mut(&mut self) -> &mut Traffic {
        self.traffic.get_or_insert_with(|| Box::new(Traffic::EMPTY))
    }

    /// Gives the traffic's box back once nothing is on its way any more.
    fn settle(&mut self) {
        if self.traffic.as_ref().is_some_and(|t| t.is_empty()) {
            self.traffic = None;
        }
    }

    /// Messages waiting for this client: queued plus in flight.
    pub fn waiting(&self) -> usize {
        let t = self.traffic();
        t.queue.len() + t.inflight.len()
    }

    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.traffic().queue.len()
    }

    #[cfg(test)]
    pub fn inflight(&self) -> usize {
        self.traffic().inflight.len()
    }

    /// Whether a QoS 1/2 message for this session would be kept (not dropped as QueueFull):
    /// the router writes it to disk first for a persistent session.
    pub fn would_keep(&self, limits: &SessionLimits) -> bool {
        (self.online.is_some() && self.traffic().queue.is_empty() && self.window_has_room(limits))
            || self.queue_has_room(0, limits)
    }

    /// Room for one more PUBLISH in flight: fewer than `max_inflight`, and under
    /// [`MAX_INFLIGHT_BYTES`] unless nothing is in flight.
    fn window_has_room(&self, limits: &SessionLimits) -> bool {
        let receive_maximum = self
            .online
            .as_ref()
            .map_or(usize::MAX, |o| usize::from(o.receive_maximum));
        let t = self.traffic();
        t.inflight.len() < limits.max_inflight.min(receive_maximum)
            && (t.inflight.is_empty() || t.inflight_bytes < MAX_INFLIGHT_BYTES)
    }

    /// Why `message` may not be sent to this session now, if it may not: expired, or
    /// larger than the connected client's maximum packet size.
    pub fn undeliverable(&self, message: &Message, now_ms: u64) -> Option<Dropped> {
        if message.expired(now_ms) {
            return Some(Dropped::Expired);
        }
        let max = self.online.as_ref().and_then(|o| o.max_packet_size)?;
        (crate::protocol::v5::publish_len(message) > max as usize).then_some(Dropped::TooLarge)
    }

    /// Messages dropped from the queue when their turn came, since the last call.
    pub fn take_discarded(&mut self) -> Vec<(Option<u64>, Dropped)> {
        let Some(t) = self.traffic.as_mut() else {
            return Vec::new();
        };
        let discarded = std::mem::take(&mut t.discarded);
        self.settle();
        discarded
    }

    fn queue_has_room(&self, bytes: usize, limits: &SessionLimits) -> bool {
        let t = self.traffic();
        t.queue.len() < limits.max_queued && t.queued_bytes + bytes <= limits.max_queued_bytes
    }

    /// Delivers `message` (already at the QoS granted to this client) now, or keeps it
    /// for later: in the queue while the in-flight window is full or the client away.
    /// `stored` is its queue id when it is also on disk.
    pub fn deliver(
        &mut self,
        message: Message,
        stored: Option<u64>,
        limits: &SessionLimits,
    ) -> Result<(), Dropped> {
        match &self.online {
            None if message.qos == QoS::AtMostOnce => Err(Dropped::Qos0Offline),
            Some(online) if message.qos == QoS::AtMostOnce => {
                // Bounded in bytes, with back-pressure on the publishers first (outbox.rs).
                if online.outbox.admit_qos0(limits.max_queued_bytes) == Qos0Admission::Drop {
                    return Err(Dropped::Qos0SlowClient);
                }
                online.outbox.send(Outbound::Publish {
                    pkid: 0,
                    message,
                    dup: false,
                });
                Ok(())
            }
            _ => {
                if self.online.is_some()
                    && self.traffic().queue.is_empty()
                    && self.window_has_room(limits)
                {
                    self.send_new(message, stored);
                    return Ok(());
                }
                let bytes = message_bytes(&message);
                if !self.queue_has_room(bytes, limits) {
                    return Err(Dropped::QueueFull);
                }
                let t = self.traffic_mut();
                t.queued_bytes += bytes;
                t.queue.push_back((message, stored));
                Ok(())
            }
        }
    }

    fn send_new(&mut self, message: Message, stored: Option<u64>) {
        let pkid = self.allocate_pkid();
        if let Some(online) = &self.online {
            online.outbox.send(Outbound::Publish {
                pkid,
                message: message.clone(),
                dup: false,
            });
        }
        let t = self.traffic_mut();
        t.inflight_bytes += message_bytes(&message);
        t.inflight.push_back(Inflight {
            pkid,
            message,
            state: InflightState::Published,
            stored,
        });
    }

    /// A message read back from disk at start-up, owed to this (offline) session.
    pub fn restore_queued(&mut self, message: Message, stored: u64) {
        let t = self.traffic_mut();
        t.queued_bytes += message_bytes(&message);
        t.queue.push_back((message, Some(stored)));
    }

    /// Drops waiting messages (queued, or sent and not yet acknowledged) that `keep`
    /// refuses, e.g. those a new connection of this client id may not read under the ACL.
    /// Returns the queue ids on disk of the dropped ones.
    pub fn retain_waiting(&mut self, mut keep: impl FnMut(&Message) -> bool) -> Vec<u64> {
        let mut dropped = Vec::new();
        let Some(t) = self.traffic.as_mut() else {
            return dropped;
        };
        t.queue.retain(|(m, stored)| {
            let k = keep(m);
            if !k {
                dropped.extend(*stored);
            }
            k
        });
        t.inflight.retain(|f| {
            let k = f.state == InflightState::Released || keep(&f.message);
            if !k {
                dropped.extend(f.stored);
            }
            k
        });
        t.queued_bytes = t.queue.iter().map(|(m, _)| message_bytes(m)).sum();
        t.inflight_bytes = t.inflight.iter().map(|f| message_bytes(&f.message)).sum();
        self.settle();
        dropped
    }

    /// Queue ids of every message of this session kept on disk.
    pub fn stored_ids(&self) -> impl Iterator<Item = u64> + '_ {
        let t = self.traffic();
        t.inflight
            .iter()
            .filter_map(|f| f.stored)
            .chain(t.queue.iter().filter_map(|q| q.1))
    }

    fn allocate_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.traffic().inflight.iter().any(|f| f.pkid == pkid) {
                return pkid;
            }
        }
    }

    /// Moves queued messages into the in-flight window while there is room.
    pub fn fill_window(&mut self, limits: &SessionLimits) {
        if self.online.is_none() {
            return;
        }
        let now = crate::time::unix_ms();
        while self.window_has_room(limits) {
            let Some(t) = self.traffic.as_mut() else {
                break;
            };
            let Some((message, stored)) = t.queue.pop_front() else {
                break;
            };
            t.queued_bytes = t.queued_bytes.saturating_sub(message_bytes(&message));
            if let Some(reason) = self.undeliverable(&message, now) {
                self.traffic_mut().discarded.push((stored, reason));
                continue;
            }
            self.send_new(message, stored);
        }
    }

    /// On reconnect: resend every unacknowledged PUBLISH with DUP set and every PUBREL,
    /// in their original order [MQTT-4.4.0-1], then fill the window from the queue.
    pub fn resume(&mut self, limits: &SessionLimits) {
        if let Some(online) = &self.online {
            for f in &self.traffic().inflight {
                let packet = match f.state {
                    InflightState::Published => Outbound::Publish {
                        pkid: f.pkid,
                        message: f.message.clone(),
                        dup: true,
                    },
                    InflightState::Released => Outbound::PubRel(f.pkid),
                };
                online.outbox.send(packet);
            }
        }
        self.fill_window(limits);
    }

    /// PUBACK from the client: the QoS 1 message is done. Returns its queue id on disk.
    pub fn puback(&mut self, pkid: u16, limits: &SessionLimits) -> Option<u64> {
        self.finish(
            |f| f.pkid == pkid && f.message.qos == QoS::AtLeastOnce,
            limits,
        )
    }

    /// The in-flight message `done` picks is acknowledged: out of the window, which is
    /// filled again from the queue. Returns its queue id on disk.
    fn finish(&mut self, done: impl Fn(&Inflight) -> bool, limits: &SessionLimits) -> Option<u64> {
        let t = self.traffic.as_mut()?;
        let i = t.inflight.iter().position(done)?;
        let done = t.inflight.remove(i)?;
        t.inflight_bytes = t
            .inflight_bytes
            .saturating_sub(message_bytes(&done.message));
        self.fill_window(limits);
        self.settle();
        done.stored
    }

    /// PUBREC from the client: answer PUBREL and wait for PUBCOMP.
    pub fn pubrec(&mut self, pkid: u16) {
        let Some(t) = self.traffic.as_mut() else {
            return;
        };
        if let Some(f) = t
            .inflight
            .iter_mut()
            .find(|f| f.pkid == pkid && f.message.qos == QoS::ExactlyOnce)
        {
            f.state = InflightState::Released;
            if let Some(online) = &self.online {
                online.outbox.send(Outbound::PubRel(pkid));
            }
        }
    }

    /// PUBCOMP from the client: the QoS 2 message is done. Returns its queue id on disk.
    pub fn pubcomp(&mut self, pkid: u16, limits: &SessionLimits) -> Option<u64> {
        self.finish(
            |f| f.pkid == pkid && f.state == InflightState::Released,
            limits,
        )
    }

    /// A QoS 2 PUBLISH arrived with `pkid`: true the first time (route it), false for a
    /// resend before PUBREL (acknowledge again, do not deliver twice) [MQTT-4.3.3-2].
    pub fn first_qos2_receipt(&mut self, pkid: u16) -> bool {
        self.traffic_mut().incoming_qos2.insert(pkid)
    }

    /// PUBREL from the client: the packet id may be reused.
    pub fn pubrel(&mut self, pkid: u16) {
        if let Some(t) = self.traffic.as_mut() {
            t.incoming_qos2.remove(&pkid);
        }
        self.settle();
    }
}

/// The per-session bounds, from the broker's limits.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_inflight: usize,
    pub max_queued: usize,
    /// Topic + payload bytes of the queued messages.
    pub max_queued_bytes: usize,
    /// Topic filters held at once (0: no limit).
    pub max_subscriptions: usize,
}

fn message_bytes(m: &Message) -> usize {
    m.topic.len() + m.payload.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxReceiver;

    fn online(session: &mut Session) -> OutboxReceiver {
        let (outbox, rx) = Outbox::new();
        session.online = Some(Online {
            conn: 1,
            outbox,
            will: None,
            will_delay: 0,
            receive_maximum: u16::MAX,
            max_packet_size: None,
        });
        rx
    }

    fn drain(rx: &mut OutboxReceiver) -> Vec<Outbound> {
        let mut v = Vec::new();
        while let Some(p) = rx.try_recv() {
            v.push(p);
        }
        v
    }

    fn msg(n: u8, qos: QoS) -> Message {
        Message::new("t", vec![n], qos, false)
    }

    #[test]
    fn window_bounds_inflight_and_acks_release_queue() {
        let limits = SessionLimits {
            max_inflight: 2,
            max_queued: 10,
            max_queued_bytes: usize::MAX,
            max_subscriptions: 0,
        };
        let mut s = Session::new(false);
        let mut rx = online(&mut s);
        for n in 0..5 {
            s.deliver(msg(n, QoS::AtLeastOnce), None, &limits).unwrap();
        }
        let sent = drain(&mut rx);
        assert_eq!(sent.len(), 2);
        assert_eq!(s.queued(), 3);
        let Outbound::Publish { pkid, .. } = sent[0] else {
            panic!()
        };
        s.puback(pkid, &limits);
        let sent = drain(&mut rx);
        assert_eq!(sent.len(), 1);
        assert!(
            matches!(&sent[0], Outbound::Publish { message, .. } if message.payload[..] == [2])
        );
    }

    #[test]
    fn offline_queue_is_bounded_and_qos0_not_kept() {
        let limits = SessionLimits {
            max_inflight: 2,
            max_queued: 2,
            max_queued_bytes: usize::MAX,
            max_subscriptions: 0,
        };
        let mut s = Session::new(false);
        assert_eq!(
            s.deliver(msg(0, QoS::AtMostOnce), None, &limits),
            Err(Dropped::Qos0Offline)
        );
        s.deliver(msg(1, QoS::AtLeastOnce), None, &limits).unwrap();
        s.deliver(msg(2, QoS::ExactlyOnce), None, &limits).unwrap();
        assert_eq!(
            s.deliver(msg(3, QoS::AtLeastOnce), None, &limits),
            Err(Dropped::QueueFull)
        );
        let mut rx = online(&mut s);
        s.resume(&limits);
        assert_eq!(drain(&mut rx).len(), 2);
    }

    #[test]
    fn resume_resends_with_dup_and_pubrel() {
        let limits = SessionLimits {
            max_inflight: 10,
            max_queued: 10,
            max_queued_bytes: usize::MAX,
            max_subscriptions: 0,
        };
        let mut s = Session::new(false);
        let mut rx = online(&mut s);
        s.deliver(msg(1, QoS::AtLeastOnce), None, &limits).unwrap();
        s.deliver(msg(2, QoS::ExactlyOnce), None, &limits).unwrap();
        let sent = drain(&mut rx);
        let Outbound::Publish { pkid: p2, .. } = sent[1] else {
            panic!()
        };
        s.pubrec(p2);
        assert!(matches!(drain(&mut rx)[..], [Outbound::PubRel(p)] if p == p2));
        s.online = None;
        let mut rx = online(&mut s);
        s.resume(&limits);
        let sent = drain(&mut rx);
        assert!(matches!(&sent[0], Outbound::Publish { dup: true, .. }));
        assert!(matches!(sent[1], Outbound::PubRel(p) if p == p2));
        s.pubcomp(p2, &limits);
        assert_eq!(s.inflight(), 1);
    }

    #[test]
    fn queue_is_bounded_in_bytes_and_filtered_on_request() {
        // "t" + 1 payload byte = 2 bytes per message: room for 3.
        let limits = SessionLimits {
            max_inflight: 1,
            max_queued: 100,
            max_queued_bytes: 6,
            max_subscriptions: 0,
        };
        let mut s = Session::new(false);
        for n in 0..3 {
            s.deliver(msg(n, QoS::AtLeastOnce), Some(u64::from(n)), &limits)
                .unwrap();
        }
        assert_eq!(
            s.deliver(msg(3, QoS::AtLeastOnce), None, &limits),
            Err(Dropped::QueueFull)
        );
        let dropped = s.retain_waiting(|m| m.payload[0] != 1);
        assert_eq!(dropped, vec![1]);
        assert_eq!(s.queued(), 2);
        s.deliver(msg(4, QoS::AtLeastOnce), None, &limits).unwrap();
        let mut rx = online(&mut s);
        s.resume(&limits);
        assert_eq!(drain(&mut rx).len(), 1);
        s.deliver(msg(5, QoS::AtLeastOnce), None, &limits).unwrap();
        assert_eq!(
            s.deliver(msg(6, QoS::AtLeastOnce), None, &limits),
            Err(Dropped::QueueFull)
        );
    }

    #[test]
    fn inflight_window_is_bounded_in_bytes_but_always_takes_one() {
        let limits = SessionLimits {
            max_inflight: 100,
            max_queued: 100,
            max_queued_bytes: usize::MAX,
            max_subscriptions: 0,
        };
        let big = |n: u8| Message::new("t", vec![n; 3 << 20], QoS::AtLeastOnce, false);
        let mut s = Session::new(false);
        let mut rx = online(&mut s);
        for n in 0..3 {
            s.deliver(big(n), None, &limits).unwrap();
        }
        // 3 MiB in flight is under 4 MiB: a second goes; 6 MiB is over: the third waits.
        let sent = drain(&mut rx);
        assert_eq!((sent.len(), s.inflight(), s.queued()), (2, 2, 1));
        let Outbound::Publish { pkid, .. } = sent[0] else {
            panic!()
        };
        s.puback(pkid, &limits);
        assert_eq!(drain(&mut rx).len(), 1);
        // One larger than the whole bound still goes when nothing else is in flight.
        let mut s = Session::new(false);
        let mut rx = online(&mut s);
        s.deliver(
            Message::new("t", vec![0; 5 << 20], QoS::AtLeastOnce, false),
            None,
            &limits,
        )
        .unwrap();
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn qos2_receipt_is_deduplicated_until_pubrel() {
        let mut s = Session::new(false);
        assert!(s.first_qos2_receipt(7));
        assert!(!s.first_qos2_receipt(7));
        s.pubrel(7);
        assert!(s.first_qos2_receipt(7));
    }
}
