//! Unit tests of the client against a scripted broker link (`Fake`): packets on the wire, the
//! outbox across reconnects, keep-alive and dead-link detection, and protocol violations.

use super::*;
use crate::detector::Direction;
use crate::mqtt::{Connect, Packet, Will};
use embedded_io::{ErrorKind, Read, ReadReady, Write};
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
        let r = mqtt::encode_publish(&mut b, "sensors/dev1/status", b"online", 0, true, false, 0)
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
    let r =
        mqtt::encode_publish(&mut b, "sensors/dev1/config", doc, 1, true, false, 0x0a0b).unwrap();
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
    let r = mqtt::encode_publish(&mut b, "sensors/dev1/config", &big, 0, false, false, 0).unwrap();
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
