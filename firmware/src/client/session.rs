//! The connection state machine behind [`Client`]: its state (link phase, back-off, buffers,
//! keep-alive clocks, the outbox) and the steps `poll` drives: connect, keep the link alive and
//! send what is due (`service`), read and act on what the broker sent (`receive`, `handle`),
//! and drop the link with a back-off. The public API in `mod.rs` calls into this file and this
//! file never calls back, so the state is defined here rather than beside the API.

use super::outbox::Outbox;
use super::types::{ClientConfig, ConfigReport, Incoming, Stats, Transport, RX_BUF, TX_BUF};
use crate::event::{MAX_DEVICE_ID, MAX_SENSOR_NAME};
use crate::mqtt::{self, DecodeError, Packet, Writer};
use embedded_io::{Error as _, ErrorKind};
use heapless::String;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Link {
    Down { since: u32, wait: u32 },
    AwaitConnAck { since: u32 },
    Up,
}

/// The receive and transmit buffers, word-aligned and a whole number of words, so that clearing
/// them at start is one `memclr4` (an odd-sized byte array at an odd offset is cleared by the
/// byte-wise `memclr`, 208 more bytes of flash).
#[repr(C, align(4))]
pub(super) struct Buffers {
    pub(super) rx: [u8; RX_BUF],
    pub(super) tx: [u8; TX_BUF],
}

// Fields are `pub(super)` because the API in `mod.rs` builds and reads them; outside `client`
// they stay private, as they were before the split.
pub struct Client<T: Transport, const N: usize> {
    pub(super) t: T,
    pub(super) cfg: ClientConfig,
    pub(super) id: String<MAX_DEVICE_ID>,
    pub(super) sensor: String<MAX_SENSOR_NAME>,
    pub(super) boot: u32,
    pub(super) link: Link,
    pub(super) backoff_ms: u32,
    /// Oldest first.
    pub(super) outbox: Outbox<N>,
    pub(super) dropped_pending: u32,
    pub(super) next_pid: u16,
    pub(super) sub_pid: Option<u16>,
    pub(super) subscribed: bool,
    pub(super) report: Option<ConfigReport>,
    pub(super) io: Buffers,
    pub(super) rx_len: usize,
    pub(super) consume: usize,
    pub(super) skip: usize,
    pub(super) last_tx: u32,
    pub(super) last_rx: u32,
    pub(super) ping_sent: Option<u32>,
    pub(super) jitter: u32,
    pub(super) stats: Stats,
}

/// `sensors/<id><suffix>` in parts: the topics are put together while a packet is written
/// rather than kept (three stored topics cost RAM and the code that builds them).
fn topic<'a>(id: &'a str, suffix: &'a [u8]) -> [&'a [u8]; 3] {
    [b"sensors/", id.as_bytes(), suffix]
}

const STATUS: &[u8] = b"/status";
const CONFIG: &[u8] = b"/config";
const EVENTS: &[u8] = b"/events";

impl<T: Transport, const N: usize> Client<T, N> {
    pub(super) fn alloc_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1);
            let p = self.next_pid;
            if p != 0 && self.sub_pid != Some(p) && self.outbox.find(Some(p), false).is_none() {
                return p;
            }
        }
    }

    pub(super) fn link_lost(&mut self, now: u32) {
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
    pub(super) fn send(&mut self, r: mqtt::Encoded, now: u32) -> bool {
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
    pub(super) fn publish_status(&mut self, retain: bool, parts: &[&[u8]], now: u32) -> bool {
        let mut w = Writer::new(&mut self.io.tx);
        w.field(&topic(&self.id, STATUS));
        for p in parts {
            w.bytes(p);
        }
        let r = w.finish(mqtt::publish_first(0, retain, false));
        self.send(r, now)
    }

    /// A fixed header and a packet id (PUBACK, PUBREC, PUBCOMP).
    pub(super) fn send_ack(&mut self, first: u8, pid: u16, now: u32) -> bool {
        let r = mqtt::encode_ack(&mut self.io.tx, first, pid);
        self.send(r, now)
    }

    pub(super) fn connect(&mut self, now: u32) {
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
    pub(super) fn service(&mut self, now: u32) -> bool {
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
    pub(super) fn receive(&mut self, now: u32) -> Option<Incoming<'_>> {
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
    pub(super) fn handle(&mut self, k: u8, pid: u16, aux: u8, now: u32) -> bool {
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
