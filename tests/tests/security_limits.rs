//! Per-client limits (issue 7): publish rate, subscriptions, topic length and levels,
//! queued bytes, and the new-connection rate per source address. Each offender is cut
//! off or refused and counted; a well-behaved neighbour is not affected.

mod security_common;

use std::time::Duration;

use security_common::{metric, start};
use waystation_e2e::raw::{self, Connect, Pkt, RawClient};

// max_publish_rate: a client publishing faster than the rate (beyond one second's burst)
// is disconnected and counted; a client well under it carries on.
#[test]
fn publish_rate_over_the_limit_disconnects_only_the_flooder() {
    let ws = start("[limits]\nmax_publish_rate = 50\n");
    let mut sub = RawClient::connect(ws.addr, "sub");
    sub.subscribe_ok(1, &[("t/#", 1)]);
    let mut honest = RawClient::connect(ws.addr, "honest");
    let mut flood = RawClient::connect(ws.addr, "flood");
    let burst: Vec<u8> = (0..500)
        .flat_map(|i| raw::publish("t/flood", format!("{i}").as_bytes(), 0, false, false, None))
        .collect();
    let _ = flood.try_send(&burst);
    assert!(
        flood.closed_within(Duration::from_secs(5)),
        "flooder still connected"
    );
    for i in 0..20u16 {
        honest.publish1("t/honest", format!("{i}").as_bytes(), false, i + 1);
        std::thread::sleep(Duration::from_millis(25));
    }
    let mut honest_seen = 0;
    while let Ok(Pkt::Publish(p)) = sub.recv_timeout(Duration::from_millis(500)) {
        sub.ack(&p);
        honest_seen += usize::from(p.topic == "t/honest");
    }
    assert_eq!(honest_seen, 20);
    assert_eq!(metric(&ws, "waystation_publish_rate_exceeded_total"), 1.0);
    assert!(ws.logs().contains("max_publish_rate"));
}

// max_subscriptions: filters beyond the limit get 0x80; re-subscribing a held filter is
// not a new one.
#[test]
fn subscriptions_beyond_the_limit_get_0x80() {
    let ws = start("[limits]\nmax_subscriptions = 3\n");
    let mut c = RawClient::connect(ws.addr, "many");
    assert_eq!(c.subscribe(1, &[("a", 1), ("b", 1)]), vec![1, 1]);
    assert_eq!(
        c.subscribe(2, &[("c", 0), ("d", 0), ("a", 0), ("e", 1)]),
        vec![0, 0x80, 0, 0x80]
    );
    c.unsubscribe(3, &["b"]);
    assert_eq!(c.subscribe(4, &[("d", 1)]), vec![1]);
    assert_eq!(metric(&ws, "waystation_limit_refusals_total"), 2.0);
}

// max_topic_length / max_topic_levels: an over-long PUBLISH is acknowledged and dropped,
// an over-long will dropped, an over-long filter refused with 0x80.
#[test]
fn over_long_topics_are_refused() {
    let ws = start("[limits]\nmax_topic_length = 32\nmax_topic_levels = 4\n");
    let mut sub = RawClient::connect(ws.addr, "sub");
    assert_eq!(
        sub.subscribe(1, &[("#", 1), ("a/b/c/d/e", 1), (&"x".repeat(33), 1)]),
        vec![1, 0x80, 0x80]
    );
    let mut publisher = RawClient::connect(ws.addr, "pub");
    publisher.publish1(&"y".repeat(33), b"too long", false, 1);
    publisher.publish1("a/b/c/d/e", b"too deep", false, 2);
    publisher.publish1("a/b/c/d", b"fine", false, 3);
    let p = sub.recv_publish();
    assert_eq!(p.topic, "a/b/c/d");
    sub.ack(&p);
    sub.expect_silence(Duration::from_millis(300));
    assert_eq!(metric(&ws, "waystation_limit_refusals_total"), 4.0);
}

// max_queued_bytes: an offline persistent session keeps messages up to the byte bound
// (here 4 of 1000 bytes), the rest is dropped and counted.
#[test]
fn queued_bytes_bound_an_offline_session() {
    let ws = start("[limits]\nmax_queued_bytes = 4100\n");
    let (mut away, _) = RawClient::connect_ok(ws.addr, &Connect::new("away").clean(false));
    away.subscribe_ok(1, &[("q", 1)]);
    away.disconnect();
    let mut publisher = RawClient::connect(ws.addr, "pub");
    for i in 0..10u16 {
        publisher.publish1("q", &[b'0' + i as u8; 1000], false, i + 1);
    }
    let (mut back, present) = RawClient::connect_ok(ws.addr, &Connect::new("away").clean(false));
    assert!(present);
    let mut got = 0;
    while let Ok(Pkt::Publish(p)) = back.recv_timeout(Duration::from_millis(500)) {
        back.ack(&p);
        got += 1;
    }
    assert_eq!(got, 4, "4 x (1 + 1000) bytes fit in 4100");
    assert_eq!(
        metric(
            &ws,
            "waystation_messages_dropped_total{reason=\"queue_full\"}"
        ),
        6.0
    );
}

// max_connection_rate: beyond the burst, new connections from one address are closed at
// accept (no CONNACK) and counted; after a pause the address is let in again.
#[test]
fn connection_rate_per_address() {
    let ws = start("[limits]\nmax_connection_rate = 2\nmax_connection_burst = 5\n");
    // The HTTP scrape below does not count: it is another listener.
    let mut accepted = 0;
    let mut refused = 0;
    let mut keep = Vec::new();
    for i in 0..12 {
        let mut c = RawClient::tcp(ws.addr);
        let _ = c.try_send(&Connect::new(&format!("c{i}")).encode());
        match c.recv_timeout(Duration::from_secs(3)) {
            Ok(Pkt::ConnAck { code: 0, .. }) => {
                accepted += 1;
                keep.push(c);
            }
            _ => refused += 1,
        }
    }
    assert!((5..=6).contains(&accepted), "accepted {accepted}");
    assert_eq!(accepted + refused, 12);
    assert_eq!(
        metric(&ws, "waystation_connection_rate_refused_total"),
        f64::from(refused)
    );
    std::thread::sleep(Duration::from_millis(1100));
    RawClient::connect(ws.addr, "later");
}
