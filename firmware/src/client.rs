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

use crate::event::{Event, MAX_DEVICE_ID, MAX_EVENT_JSON, MAX_SENSOR_NAME};
use crate::mqtt::{self, DecodeError, Packet, Writer};
use embedded_io::{Error as _, ErrorKind, Read, ReadReady, Write};
use heapless::String;

/// A byte stream to the broker. `read` is only called after `read_ready` said true, so it
/// must not block then; `write` may block (briefly) until bytes are accepted.
pub trait Transport: Read + Write + ReadReady {
    /// Opens, or opens again, the stream before a CONNECT. A UART does nothing here.
    fn open(&mut self) -> Result<(), Self::Error>;
    /// Closes the stream after the client gave up on it.
    fn close(&mut self) {}
}

/// Receive buffer: larger incoming packets are skipped.
pub const RX_BUF: usize = 256;
const MAX_TOPIC: usize = 8 + MAX_DEVICE_ID + 7;
/// Transmit buffer: the largest packet the client sends is an event PUBLISH (rounded up to
/// whole words).
pub const TX_BUF: usize = (5 + 2 + MAX_TOPIC + 2 + MAX_EVENT_JSON + 3) & !3;

/// Session timing.
#[derive(Clone, Copy, Debug)]
pub struct ClientConfig {
    pub keep_alive_s: u16,
    /// How long to wait for CONNACK or PINGRESP before the link is considered dead.
    pub response_timeout_ms: u32,
    pub backoff_min_ms: u32,
    pub backoff_max_ms: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            keep_alive_s: 30,
            response_timeout_ms: 5_000,
            backoff_min_ms: 500,
            backoff_max_ms: 30_000,
        }
    }
}

/// Counters, for progress output and tests. They wrap at 2^32 (wrapping adds are smaller in
/// flash than saturating ones; the `dropped` count carried in events saturates).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Events sent for the first time.
    pub published: u32,
    /// Events the broker acknowledged (PUBACK).
    pub acknowledged: u32,
    /// Events dropped from a full outbox.
    pub dropped: u32,
    /// PUBLISHes sent again with DUP after a reconnect.
    pub resent: u32,
    /// CONNACKs accepted.
    pub connects: u32,
    /// Links dropped.
    pub link_losses: u32,
}

/// The device id or sensor name is empty, too long or not a valid topic level.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BadIdentity;

/// What `poll` hands to the caller.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Incoming<'a> {
    /// A message on `sensors/<id>/config` (possibly empty: a cleared retained document).
    Config(&'a [u8]),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Link {
    Down { since: u32, wait: u32 },
    AwaitConnAck { since: u32 },
    Up,
}

/// A ring of `N` slots, oldest first: removing the oldest moves nothing (no `memmove`), and
/// index loops instead of `heapless::Deque`'s two-slice iterators keep it small in flash.
struct Outbox<const N: usize> {
    slots: [Slot; N],
    head: usize,
    len: usize,
}

impl<const N: usize> Outbox<N> {
    fn new() -> Self {
        let empty = Slot {
            pid: 0,
            acked: false,
            ever_sent: false,
            sent_on_link: false,
            event: Event {
                seq: 0,
                value: 0,
                threshold: 0,
                direction: crate::detector::Direction::Rising,
                dropped: 0,
            },
        };
        Self {
            slots: [empty; N],
            head: 0,
            len: 0,
        }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_full(&self) -> bool {
        self.len == N
    }
    /// Storage index of the `i`-th oldest slot (`head < N` and `i < N`, so one wrap at most).
    fn at(&self, i: usize) -> usize {
        let j = self.head + i;
        if j >= N {
            j - N
        } else {
            j
        }
    }
    fn get(&self, i: usize) -> Option<&Slot> {
        if i < self.len {
            self.slots.get(self.at(i))
        } else {
            None
        }
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut Slot> {
        if i < self.len {
            let j = self.at(i);
            self.slots.get_mut(j)
        } else {
            None
        }
    }
    /// The position of the oldest unacknowledged slot with packet id `pid` (any id: `None`),
    /// sent on this link if `on_link`. One function for every search keeps one copy in flash.
    fn find(&self, pid: Option<u16>, on_link: bool) -> Option<usize> {
        (0..self.len).find(|&i| {
            self.get(i).is_some_and(|s| {
                !s.acked && pid.is_none_or(|p| s.pid == p) && (s.sent_on_link || !on_link)
            })
        })
    }
    /// Appends (the caller makes room first); a full ring ignores the slot.
    fn push_back(&mut self, s: Slot) {
        if self.len < N {
            let j = self.at(self.len);
            if let Some(d) = self.slots.get_mut(j) {
                *d = s;
                self.len += 1;
            }
        }
    }
    fn pop_front(&mut self) -> Option<Slot> {
        let s = *self.get(0)?;
        self.head = self.at(1);
        self.len -= 1;
        Some(s)
    }
    /// After a link loss: every slot has to be sent again on the next link.
    fn all_unsent(&mut self) {
        for s in self.slots.iter_mut() {
            s.sent_on_link = false;
        }
    }
}

#[derive(Clone, Copy)]
struct Slot {
    pid: u16,
    /// Acknowledged but not yet at the front (acks out of order): a tombstone.
    acked: bool,
    ever_sent: bool,
    sent_on_link: bool,
    event: Event,
}

/// The result of a configuration document, reported on the status topic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConfigReport {
    Applied,
    Rejected(&'static str),
}

/// The receive and transmit buffers, word-aligned and a whole number of words, so that clearing
/// them at start is one `memclr4` (an odd-sized byte array at an odd offset is cleared by the
/// byte-wise `memclr`, 208 more bytes of flash).
#[repr(C, align(4))]
struct Buffers {
    rx: [u8; RX_BUF],
    tx: [u8; TX_BUF],
}

pub struct Client<T: Transport, const N: usize> {
    t: T,
    cfg: ClientConfig,
    id: String<MAX_DEVICE_ID>,
    sensor: String<MAX_SENSOR_NAME>,
    boot: u32,
    link: Link,
    backoff_ms: u32,
    /// Oldest first.
    outbox: Outbox<N>,
    dropped_pending: u32,
    next_pid: u16,
    sub_pid: Option<u16>,
    subscribed: bool,
    report: Option<ConfigReport>,
    io: Buffers,
    rx_len: usize,
    consume: usize,
    skip: usize,
    last_tx: u32,
    last_rx: u32,
    ping_sent: Option<u32>,
    jitter: u32,
    stats: Stats,
}

/// `sensors/<id><suffix>` in parts: the topics are put together while a packet is written
/// rather than kept (three stored topics cost RAM and the code that builds them).
fn topic<'a>(id: &'a str, suffix: &'a [u8]) -> [&'a [u8]; 3] {
    [b"sensors/", id.as_bytes(), suffix]
}

const STATUS: &[u8] = b"/status";
const CONFIG: &[u8] = b"/config";
const EVENTS: &[u8] = b"/events";

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

    fn alloc_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1);
            let p = self.next_pid;
            if p != 0 && self.sub_pid != Some(p) && self.outbox.find(Some(p), false).is_none() {
                return p;
            }
        }
    }

    fn link_lost(&mut self, now: u32) {
        self.t.close();
        let extra = if self.backoff_ms >= 4 {
            self.jitter ^= self.jitter << 13;
            self.jitter ^= self.jitter >> 17;
            self.jitter ^= self.jitter << 5;
            self.jitter % (self.backoff_ms / 4)
        } else {
            0
        };
        self.link = Link::Down {
            since: now,
            wait: self.backoff_ms.saturating_add(extra),
        };
        self.backoff_ms = self
            .backoff_ms
            .saturating_mul(2)
            .min(self.cfg.backoff_max_ms)
            .max(self.cfg.backoff_min_ms);
        self.stats.link_losses = self.stats.link_losses.wrapping_add(1);
        self.rx_len = 0;
        self.consume = 0;
        self.skip = 0;
        self.ping_sent = None;
        self.sub_pid = None;
        self.subscribed = false;
        self.outbox.all_unsent();
    }

    /// Writes the packet an encoder put into the tx buffer; on failure the link is dropped and
    /// false returned. An encode error skips the packet.
    fn send(&mut self, r: mqtt::Encoded, now: u32) -> bool {
        let Ok(r) = r else { return true };
        let mut at = r.start;
        while let Some(rest) = self.io.tx.get(at..r.end).filter(|b| !b.is_empty()) {
            match self.t.write(rest) {
                Ok(0) | Err(_) => {
                    self.link_lost(now);
                    return false;
                }
                Ok(k) => at += k,
            }
        }
        if self.t.flush().is_err() {
            self.link_lost(now);
            return false;
        }
        self.last_tx = now;
        true
    }

    /// A QoS 0 PUBLISH on the status topic whose payload is `parts` put together.
    fn publish_status(&mut self, retain: bool, parts: &[&[u8]], now: u32) -> bool {
        let mut w = Writer::new(&mut self.io.tx);
        w.field(&topic(&self.id, STATUS));
        for p in parts {
            w.bytes(p);
        }
        let r = w.finish(mqtt::publish_first(0, retain, false));
        self.send(r, now)
    }

    /// A fixed header and a packet id (PUBACK, PUBREC, PUBCOMP).
    fn send_ack(&mut self, first: u8, pid: u16, now: u32) -> bool {
        let r = mqtt::encode_ack(&mut self.io.tx, first, pid);
        self.send(r, now)
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

    fn connect(&mut self, now: u32) {
        if self.t.open().is_err() {
            self.link_lost(now);
            return;
        }
        // Clean session, a will (retained, QoS 1: `offline` on the status topic), no credentials.
        let mut w = Writer::new(&mut self.io.tx);
        w.field(&[b"MQTT"]);
        w.bytes(&[4, 0x20 | 0x08 | 0x04 | 0x02]);
        w.u16(self.cfg.keep_alive_s);
        w.field(&[self.id.as_bytes()]);
        w.field(&topic(&self.id, STATUS));
        w.field(&[b"offline"]);
        let r = w.finish(mqtt::kind::CONNECT << 4);
        self.rx_len = 0;
        self.skip = 0;
        self.link = Link::AwaitConnAck { since: now };
        self.send(r, now);
    }

    /// Connected: keep-alive, pending report, unsent events. False when the link was lost.
    fn service(&mut self, now: u32) -> bool {
        let keep_alive_ms = self.cfg.keep_alive_s as u32 * 1000;
        match self.ping_sent {
            Some(t) if now.wrapping_sub(t) >= self.cfg.response_timeout_ms => {
                self.link_lost(now);
                return false;
            }
            Some(_) => {}
            None => {
                let idle = keep_alive_ms > 0 && now.wrapping_sub(self.last_tx) >= keep_alive_ms / 2;
                let waiting = self.outbox.find(None, true).is_some()
                    && now.wrapping_sub(self.last_rx) >= self.cfg.response_timeout_ms;
                if idle || waiting {
                    let r = mqtt::encode_pingreq(&mut self.io.tx);
                    if !self.send(r, now) {
                        return false;
                    }
                    self.ping_sent = Some(now);
                }
            }
        }
        if let Some(r) = self.report.take() {
            let parts: [&[u8]; 3] = match r {
                ConfigReport::Applied => [b"{\"config\":\"applied\"}", b"", b""],
                ConfigReport::Rejected(why) => [
                    b"{\"config\":\"rejected\",\"reason\":\"",
                    why.as_bytes(),
                    b"\"}",
                ],
            };
            if !self.publish_status(false, &parts, now) {
                return false;
            }
        }
        for i in 0..self.outbox.len() {
            let Some(&s) = self.outbox.get(i) else { break };
            if s.sent_on_link || s.acked {
                continue;
            }
            // The JSON is serialized straight into the packet, after the topic and packet id.
            let mut w = Writer::new(&mut self.io.tx);
            w.field(&topic(&self.id, EVENTS));
            w.u16(s.pid);
            let len = s
                .event
                .to_json(&self.id, self.boot, &self.sensor, w.spare())
                .ok();
            w.advance(len);
            let Ok(r) = w.finish(mqtt::publish_first(1, false, s.ever_sent)) else {
                continue;
            };
            if !self.send(Ok(r), now) {
                return false;
            }
            if let Some(slot) = self.outbox.get_mut(i) {
                slot.sent_on_link = true;
                slot.ever_sent = true;
            }
            if s.ever_sent {
                self.stats.resent = self.stats.resent.wrapping_add(1);
            } else {
                self.stats.published = self.stats.published.wrapping_add(1);
            }
        }
        true
    }

    /// Reads what is available and handles complete packets.
    fn receive(&mut self, now: u32) -> Option<Incoming<'_>> {
        if matches!(self.link, Link::Down { .. }) {
            return None;
        }
        while self.rx_len < RX_BUF {
            match self.t.read_ready() {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    self.link_lost(now);
                    return None;
                }
            }
            match self.t.read(&mut self.io.rx[self.rx_len..]) {
                Ok(0) => {
                    self.link_lost(now);
                    return None;
                }
                Ok(k) => self.rx_len += k.min(RX_BUF - self.rx_len),
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::Interrupted) => break,
                Err(_) => {
                    self.link_lost(now);
                    return None;
                }
            }
        }
        let mut at = 0;
        let mut found: Option<(usize, usize)> = None; // payload range of a config message
        while at < self.rx_len {
            if self.skip > 0 {
                let k = self.skip.min(self.rx_len - at);
                self.skip -= k;
                at += k;
                continue;
            }
            let Some(buf) = self.io.rx.get(at..self.rx_len) else {
                break;
            };
            let header = match mqtt::decode_header(buf) {
                Ok(h) => h,
                Err(DecodeError::Incomplete) => break,
                Err(_) => {
                    self.link_lost(now);
                    return None;
                }
            };
            if header.total() > RX_BUF {
                // Too large for this device: acknowledge nothing, skip it.
                self.skip = header.total();
                self.last_rx = now;
                continue;
            }
            let (packet, used) = match mqtt::decode(buf) {
                Ok(x) => x,
                Err(DecodeError::Incomplete) => break,
                Err(_) => {
                    self.link_lost(now);
                    return None;
                }
            };
            self.last_rx = now;
            at += used;
            // Copy out what is needed so the packet's borrow of `rx` ends here: the packet type,
            // its packet id (0: none) and one byte (CONNACK code, first SUBACK code, PUBLISH QoS).
            let mut config = None;
            let (k, pid, aux) = match packet {
                Packet::ConnAck { code, .. } => (mqtt::kind::CONNACK, 0, code),
                Packet::Ack { kind, pid } => (kind, pid, 0),
                Packet::SubAck { pid, codes } => (
                    mqtt::kind::SUBACK,
                    pid,
                    codes.first().copied().unwrap_or(0x80),
                ),
                Packet::PingResp => (mqtt::kind::PINGRESP, 0, 0),
                Packet::Publish(p) => {
                    let mine = p
                        .topic
                        .strip_prefix(b"sensors/".as_slice())
                        .and_then(|t| t.strip_prefix(self.id.as_bytes()));
                    if mine == Some(CONFIG) {
                        // The payload ends the packet.
                        config = Some((at - p.payload.len(), at));
                    }
                    (mqtt::kind::PUBLISH, p.pid.unwrap_or(0), p.qos)
                }
            };
            if !self.handle(k, pid, aux, now) {
                return None;
            }
            if config.is_some() {
                found = config;
                break;
            }
        }
        // Bytes up to `at` are done; they are removed at the next poll (the config payload
        // returned below borrows them until then).
        self.consume = at;
        let (a, b) = found?;
        self.io.rx.get(a..b).map(Incoming::Config)
    }

    /// Acts on one packet from the broker (see `receive`); false when the link was dropped.
    fn handle(&mut self, k: u8, pid: u16, aux: u8, now: u32) -> bool {
        use mqtt::kind;
        let connected = self.link == Link::Up;
        if k == kind::CONNACK || !connected {
            // Only one CONNACK, accepting, is valid, and nothing may come before it.
            if connected || k != kind::CONNACK || aux != 0 {
                self.link_lost(now);
                return false;
            }
            self.link = Link::Up;
            self.backoff_ms = self.cfg.backoff_min_ms;
            self.stats.connects = self.stats.connects.wrapping_add(1);
            self.ping_sent = None;
            if !self.publish_status(true, &[b"online"], now) {
                return false;
            }
            let pid = self.alloc_pid();
            self.sub_pid = Some(pid);
            let mut w = Writer::new(&mut self.io.tx);
            w.u16(pid);
            w.field(&topic(&self.id, CONFIG));
            w.bytes(&[1]);
            let r = w.finish((kind::SUBSCRIBE << 4) | 0x02);
            // Unacknowledged events go out again (with DUP) at the next poll.
            return self.send(r, now);
        }
        match k {
            kind::PUBACK => {
                if let Some(s) = self
                    .outbox
                    .find(Some(pid), true)
                    .and_then(|i| self.outbox.get_mut(i))
                {
                    s.acked = true;
                    self.stats.acknowledged = self.stats.acknowledged.wrapping_add(1);
                }
                while self.outbox.get(0).is_some_and(|s| s.acked) {
                    self.outbox.pop_front();
                }
            }
            kind::SUBACK if self.sub_pid == Some(pid) => {
                self.sub_pid = None;
                self.subscribed = aux != 0x80;
            }
            kind::PINGRESP => self.ping_sent = None,
            kind::PUBREL => return self.send_ack(kind::PUBCOMP << 4, pid, now),
            // QoS 1 -> PUBACK (4), QoS 2 -> PUBREC (5).
            kind::PUBLISH if pid != 0 => {
                return self.send_ack((kind::PUBACK - 1 + aux) << 4, pid, now)
            }
            // PUBREC, PUBCOMP and UNSUBACK answer nothing this client sends: ignore.
            _ => {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::Direction;
    use crate::mqtt::{Connect, Will};
    use std::collections::VecDeque;
    use std::vec::Vec as StdVec;

    #[derive(Debug)]
    struct LinkError(ErrorKind);
    impl core::fmt::Display for LinkError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl core::error::Error for LinkError {}
    impl embedded_io::Error for LinkError {
        fn kind(&self) -> ErrorKind {
            self.0
        }
    }

    /// A scripted broker link: `inbound` is what the broker sent, `out` what the client wrote.
    #[derive(Default)]
    struct Fake {
        inbound: VecDeque<u8>,
        out: StdVec<u8>,
        refuse_open: bool,
        eof: bool,
        opens: u32,
    }
    impl embedded_io::ErrorType for Fake {
        type Error = LinkError;
    }
    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
            if self.eof {
                return Ok(0);
            }
            let n = buf.len().min(self.inbound.len()).min(7); // dribble: partial packets
            for b in buf.iter_mut().take(n) {
                *b = self.inbound.pop_front().unwrap();
            }
            if n == 0 {
                return Err(LinkError(ErrorKind::TimedOut));
            }
            Ok(n)
        }
    }
    impl ReadReady for Fake {
        fn read_ready(&mut self) -> Result<bool, LinkError> {
            Ok(self.eof || !self.inbound.is_empty())
        }
    }
    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> Result<usize, LinkError> {
            if self.eof {
                return Err(LinkError(ErrorKind::BrokenPipe));
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> Result<(), LinkError> {
            Ok(())
        }
    }
    impl Transport for Fake {
        fn open(&mut self) -> Result<(), LinkError> {
            self.opens += 1;
            if self.refuse_open {
                return Err(LinkError(ErrorKind::ConnectionRefused));
            }
            self.eof = false;
            Ok(())
        }
    }

    const CFG: ClientConfig = ClientConfig {
        keep_alive_s: 10,
        response_timeout_ms: 1000,
        backoff_min_ms: 100,
        backoff_max_ms: 800,
    };

    fn client<const N: usize>() -> Client<Fake, N> {
        Client::new(Fake::default(), "dev1", 7, "temp", CFG).unwrap()
    }

    /// Splits what the client wrote into packets and clears it.
    fn sent<const N: usize>(c: &mut Client<Fake, N>) -> StdVec<StdVec<u8>> {
        let mut out = core::mem::take(&mut c.transport().out);
        let mut packets = StdVec::new();
        while !out.is_empty() {
            let h = mqtt::decode_header(&out).unwrap();
            packets.push(out.drain(..h.total()).collect());
        }
        packets
    }

    fn feed<const N: usize>(c: &mut Client<Fake, N>, bytes: &[u8]) {
        c.transport().inbound.extend(bytes.iter().copied());
    }

    fn publish_of(p: &[u8]) -> (u8, u16, bool, serde_json::Value) {
        match mqtt::decode(p).unwrap().0 {
            Packet::Publish(p) => {
                assert_eq!(p.topic, b"sensors/dev1/events");
                (
                    p.qos,
                    p.pid.unwrap(),
                    p.dup,
                    serde_json::from_slice(p.payload).unwrap(),
                )
            }
            other => panic!("not a publish: {other:?}"),
        }
    }

    fn ev(seq: u32) -> Event {
        Event {
            seq,
            value: 1000 + seq as i32,
            threshold: 900,
            direction: Direction::Rising,
            dropped: 0,
        }
    }

    /// Connects: CONNECT, CONNACK, then online + SUBSCRIBE (+ SUBACK).
    fn up<const N: usize>(c: &mut Client<Fake, N>, now: u32) -> StdVec<StdVec<u8>> {
        assert_eq!(c.poll(now), None);
        let p = sent(c);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0][0], 0x10, "CONNECT");
        feed(c, &[0x20, 2, 0, 0]);
        assert_eq!(c.poll(now), None);
        assert!(c.is_connected());
        let p = sent(c);
        assert_eq!(p[0], {
            let mut b = [0u8; 64];
            let r =
                mqtt::encode_publish(&mut b, "sensors/dev1/status", b"online", 0, true, false, 0)
                    .unwrap();
            b[r].to_vec()
        });
        assert_eq!(p[1][0], 0x82, "SUBSCRIBE");
        assert_eq!(&p[1][4..], b"\x00\x13sensors/dev1/config\x01");
        let sub_pid = [p[1][2], p[1][3]];
        feed(c, &[0x90, 3, sub_pid[0], sub_pid[1], 1]);
        p[2..].to_vec()
    }

    #[test]
    fn connect_has_retained_offline_will() {
        let mut c = client::<4>();
        c.poll(0);
        let p = sent(&mut c);
        let mut want = [0u8; 128];
        let r = mqtt::encode_connect(
            &mut want,
            &Connect {
                client_id: "dev1",
                keep_alive_s: 10,
                clean_session: true,
                will: Some(Will {
                    topic: "sensors/dev1/status",
                    payload: b"offline",
                    qos: 1,
                    retain: true,
                }),
                username: None,
                password: None,
            },
        )
        .unwrap();
        assert_eq!(p, [want[r].to_vec()]);
    }

    #[test]
    fn publishes_qos1_and_drains_on_puback() {
        let mut c = client::<4>();
        assert!(up(&mut c, 0).is_empty());
        c.enqueue(ev(0));
        c.enqueue(ev(1));
        c.poll(10);
        assert!(c.is_subscribed());
        let p = sent(&mut c);
        assert_eq!(p.len(), 2);
        let (qos, pid0, dup, json) = publish_of(&p[0]);
        assert_eq!((qos, dup), (1, false));
        assert_eq!(
            json,
            serde_json::json!({"v":1,"device":"dev1","boot":7,"seq":0,"sensor":"temp","value":1000,"threshold":900,"direction":"rising"})
        );
        let (_, pid1, _, _) = publish_of(&p[1]);
        assert_ne!(pid0, pid1);
        feed(&mut c, &[0x40, 2, (pid1 >> 8) as u8, pid1 as u8]);
        c.poll(20);
        assert_eq!(c.outbox_len(), 1);
        feed(&mut c, &[0x40, 2, (pid0 >> 8) as u8, pid0 as u8]);
        // An ack for an unknown id changes nothing.
        feed(&mut c, &[0x40, 2, 0x7f, 0x7f]);
        c.poll(30);
        assert_eq!(c.outbox_len(), 0);
        assert_eq!(c.stats().acknowledged, 2);
        assert_eq!(c.stats().published, 2);
        assert!(sent(&mut c).is_empty(), "nothing resent while connected");
    }

    #[test]
    fn unacked_events_survive_reconnect_and_resend_with_dup() {
        let mut c = client::<4>();
        up(&mut c, 0);
        c.enqueue(ev(0));
        c.enqueue(ev(1));
        c.poll(1);
        let first: StdVec<_> = sent(&mut c).iter().map(|p| publish_of(p)).collect();
        let (_, pid0, _, _) = first[0];
        feed(&mut c, &[0x40, 2, (pid0 >> 8) as u8, pid0 as u8]);
        c.poll(2);
        // Broker goes away: end of stream.
        c.transport().eof = true;
        c.poll(3);
        assert!(!c.is_connected());
        c.enqueue(ev(2)); // produced while down
        c.transport().refuse_open = true;
        c.poll(50); // back-off (100 ms + jitter) not over yet
        assert_eq!(c.transport().opens, 1);
        c.poll(3 + 125);
        assert_eq!(c.transport().opens, 2);
        assert!(!c.is_connected());
        c.transport().refuse_open = false;
        c.poll(3 + 126); // second back-off (200 ms + jitter) not over yet
        assert_eq!(c.transport().opens, 2);
        let resent = up(&mut c, 3 + 126 + 250);
        assert!(resent.is_empty());
        c.poll(400);
        let p: StdVec<_> = sent(&mut c).iter().map(|p| publish_of(p)).collect();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].1, p[0].2, p[0].3["seq"].as_u64()),
            (first[1].1, true, Some(1))
        );
        assert_eq!((p[1].2, p[1].3["seq"].as_u64()), (false, Some(2)));
        assert_eq!(c.stats().resent, 1);
        assert_eq!(c.stats().published, 3);
    }

    #[test]
    fn full_outbox_drops_oldest_and_counts() {
        let mut c = client::<2>();
        for s in 0..5 {
            c.enqueue(ev(s));
        }
        // 0, 1, 2 dropped; 2 carried one drop (0) and took it along when it was dropped itself,
        // so 3 carries one (1) and 4 carries two (0 via 2, and 2).
        assert_eq!(c.stats().dropped, 3);
        up(&mut c, 0);
        c.poll(1);
        let p: StdVec<_> = sent(&mut c).iter().map(|p| publish_of(p).3).collect();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0]["seq"].as_u64(), p[0]["dropped"].as_u64()),
            (Some(3), Some(1))
        );
        assert_eq!(
            (p[1]["seq"].as_u64(), p[1]["dropped"].as_u64()),
            (Some(4), Some(2))
        );
        c.enqueue(ev(5)); // outbox full again: 3 (carrying 1) dropped -> 5 carries 2
        c.poll(2);
        let p: StdVec<_> = sent(&mut c).iter().map(|p| publish_of(p).3).collect();
        assert_eq!(
            (p[0]["seq"].as_u64(), p[0]["dropped"].as_u64()),
            (Some(5), Some(2))
        );
        // Reported drops in the events still queued (4: 2, 5: 2) equal the real drops: 0, 1, 2, 3.
        assert_eq!(c.stats().dropped, 4);
    }

    #[test]
    fn keep_alive_and_dead_link_detection() {
        let mut c = client::<2>();
        up(&mut c, 0);
        c.poll(4_999);
        assert!(sent(&mut c).is_empty());
        c.poll(5_000); // half the keep-alive idle
        assert_eq!(sent(&mut c), [vec![0xc0, 0]]);
        feed(&mut c, &[0xd0, 0]);
        c.poll(5_100);
        assert!(c.is_connected());
        c.poll(10_100);
        assert_eq!(sent(&mut c), [vec![0xc0, 0]]);
        c.poll(11_099);
        assert!(c.is_connected());
        c.poll(11_100); // no PINGRESP within the response timeout
        assert!(!c.is_connected());
        assert_eq!(c.stats().link_losses, 1);
    }

    #[test]
    fn connack_timeout_and_refusal() {
        let mut c = client::<2>();
        c.poll(0);
        c.poll(999);
        c.poll(1000);
        assert_eq!(c.stats().link_losses, 1);
        c.poll(2000);
        sent(&mut c);
        feed(&mut c, &[0x20, 2, 0, 5]); // not authorized
        c.poll(2001);
        assert!(!c.is_connected());
        assert_eq!(c.stats().link_losses, 2);
    }

    #[test]
    fn config_message_is_handed_over_and_acked() {
        let mut c = client::<2>();
        up(&mut c, 0);
        let doc = br#"{"rising":5}"#;
        let mut b = [0u8; 128];
        let r = mqtt::encode_publish(&mut b, "sensors/dev1/config", doc, 1, true, false, 0x0a0b)
            .unwrap();
        feed(&mut c, &b[r]);
        // Topics that only share a prefix or an end with the config topic are not config.
        for other in [
            "other/topic",
            "sensors/dev1/config/x",
            "sensors/dev1x/config",
            "sensors/dev/config",
            "x/dev1/config",
        ] {
            let r = mqtt::encode_publish(&mut b, other, b"x", 0, false, false, 0).unwrap();
            feed(&mut c, &b[r]);
        }
        feed(&mut c, &[0xd0, 0]);
        let mut got = None;
        for t in 1..10 {
            if let Some(Incoming::Config(p)) = c.poll(t) {
                got = Some(p.to_vec());
            }
        }
        assert_eq!(got.as_deref(), Some(&doc[..]));
        assert_eq!(sent(&mut c), [vec![0x40, 2, 0x0a, 0x0b]]);
        assert!(c.is_connected());
        c.report_config(ConfigReport::Rejected("falling must be below rising"));
        c.poll(11);
        let p = sent(&mut c);
        match mqtt::decode(&p[0]).unwrap().0 {
            Packet::Publish(p) => {
                assert_eq!(
                    (p.topic, p.retain, p.qos),
                    (&b"sensors/dev1/status"[..], false, 0)
                );
                assert_eq!(
                    p.payload,
                    br#"{"config":"rejected","reason":"falling must be below rising"}"#
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_packet_is_skipped() {
        let mut c = client::<2>();
        up(&mut c, 0);
        let big = [b'x'; 600];
        let mut b = [0u8; 700];
        let r =
            mqtt::encode_publish(&mut b, "sensors/dev1/config", &big, 0, false, false, 0).unwrap();
        feed(&mut c, &b[r]);
        feed(&mut c, &[0xd0, 0]);
        for t in 1..200 {
            assert_eq!(c.poll(t), None);
        }
        assert!(c.is_connected());
        assert!(c.transport().inbound.is_empty());
    }

    #[test]
    fn protocol_violations_drop_the_link() {
        for bad in [
            &[0x20u8, 2, 0, 0][..],
            &[0x10, 0],
            &[0xf0, 0],
            &[0x40, 2, 0, 0],
            &[0x30, 0xff, 0xff, 0xff, 0xff, 1],
        ] {
            let mut c = client::<2>();
            up(&mut c, 0);
            feed(&mut c, bad);
            c.poll(1);
            assert!(!c.is_connected(), "{bad:?}");
        }
        // Before CONNACK, anything else is a violation too.
        let mut c = client::<2>();
        c.poll(0);
        feed(&mut c, &[0xd0, 0]);
        c.poll(1);
        assert_eq!(c.stats().link_losses, 1);
    }

    proptest::proptest! {
        #[test]
        fn random_broker_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..20)) {
            let mut c = client::<2>();
            up(&mut c, 0);
            c.enqueue(ev(0));
            let mut now = 1;
            for chunk in chunks {
                feed(&mut c, &chunk);
                for _ in 0..4 {
                    now += 300;
                    if !c.is_connected() && c.stats().connects < 3 {
                        // let it reconnect
                        let _ = c.poll(now);
                        feed(&mut c, &[0x20, 2, 0, 0]);
                    }
                    let _ = c.poll(now);
                }
                let _ = sent(&mut c);
            }
        }
    }
}
