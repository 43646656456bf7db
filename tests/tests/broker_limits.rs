//! The `[limits]` config keys enforced on live connections: max_packet_size,
//! max_connections, and a malformed packet closing only its own connection.
//! (max_inflight: broker_qos.rs; max_queued_messages: broker_sessions.rs; connect_timeout:
//! broker_connect.rs.)

use std::net::TcpStream;
use std::time::{Duration, Instant};

use waystation_e2e::raw::{self, Connect, Pkt, RawClient, RecvError};
use waystation_e2e::{wait_until, Waystation};

const SHORT: Duration = Duration::from_millis(500);

// Issue: "max packet size (a larger packet closes that connection only)". A PUBLISH over
// `max_packet_size` closes its connection (nothing is delivered, no PUBACK); a header
// announcing an oversized packet is enough (the broker must not wait for, or buffer, the
// body); other clients are unaffected and packets under the limit pass.
#[test]
fn oversized_packet_closes_only_that_connection() {
    let ws = Waystation::start_with("[limits]\nmax_packet_size = 1024\n");
    let mut sub = RawClient::connect(ws.addr, "big-sub");
    sub.subscribe_ok(1, &[("big/#", 1)]);
    let mut neighbour = RawClient::connect(ws.addr, "big-neighbour");

    let mut big = RawClient::connect(ws.addr, "big-pub");
    let _ = big.try_send(&raw::publish(
        "big/t",
        &vec![b'x'; 4096],
        1,
        false,
        false,
        Some(1),
    ));
    let got = big.expect_closed(Duration::from_secs(3));
    assert!(
        got.is_empty(),
        "oversized PUBLISH answered with {got:?} instead of a close"
    );

    // Only the header (and a little) of a 100 kB packet: closed without waiting for the rest.
    let mut announcer = RawClient::connect(ws.addr, "big-announcer");
    let mut head = vec![0x32];
    raw::encode_remaining_length(100_000, &mut head);
    head.extend_from_slice(&[0x00, 0x05, b'b', b'i', b'g', b'/', b'h', 0x00, 0x01]);
    head.extend_from_slice(&[b'y'; 100]);
    let _ = announcer.try_send(&head);
    assert!(
        announcer.closed_within(Duration::from_secs(3)),
        "a packet announced larger than max_packet_size must close the connection at once"
    );

    // Under the limit is fine, for everyone else too.
    neighbour.publish1("big/ok", &vec![b'o'; 900], false, 2);
    let p = sub.recv_publish();
    assert_eq!(
        (p.topic.as_str(), p.payload.len()),
        ("big/ok", 900),
        "the oversized message was delivered?"
    );
    sub.ack(&p);
    sub.expect_silence(SHORT);
    neighbour.ping();
}

fn try_mqtt_connect(addr: std::net::SocketAddr, id: &str) -> Result<RawClient, Vec<Pkt>> {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return Err(Vec::new()); // refused at the TCP level: also a refusal
    };
    let mut c = RawClient::tcp_from(stream);
    if c.try_send(&Connect::new(id).encode()).is_err() {
        return Err(Vec::new());
    }
    match c.recv_timeout(Duration::from_secs(3)) {
        Ok(Pkt::ConnAck { code: 0, .. }) => Ok(c),
        Ok(other) => {
            let mut got = vec![other];
            got.extend(c.expect_closed(Duration::from_secs(3)));
            Err(got)
        }
        Err(RecvError::Closed) => Err(Vec::new()),
        Err(RecvError::Timeout) => panic!("{id}: neither accepted nor refused within 3 s"),
    }
}

// Issue: "max connections": with `max_connections = 3`, a fourth client is refused (no
// CONNACK 0; the socket is closed — a CONNACK 0x03 "server unavailable" first is allowed,
// [MQTT-3.2.2-5]), the three connected ones keep working, and once one leaves a new client
// is accepted.
#[test]
fn max_connections_refuses_the_extra_client() {
    let ws = Waystation::start_with("[limits]\nmax_connections = 3\n");
    let mut a = RawClient::connect(ws.addr, "mc-a");
    let mut b = RawClient::connect(ws.addr, "mc-b");
    let c = RawClient::connect(ws.addr, "mc-c");
    match try_mqtt_connect(ws.addr, "mc-d") {
        Ok(_) => panic!("fourth connection accepted with max_connections = 3"),
        Err(got) => {
            for p in &got {
                assert!(
                    matches!(p, Pkt::ConnAck { code: 3, .. }),
                    "refused client may get at most CONNACK 0x03: {got:?}"
                );
            }
        }
    }
    a.subscribe_ok(1, &[("mc/t", 1)]);
    b.publish1("mc/t", b"still fine", false, 1);
    assert_eq!(a.recv_publish().payload, b"still fine");

    c.disconnect();
    let mut accepted = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            match try_mqtt_connect(ws.addr, "mc-e") {
                Ok(c) => {
                    accepted = Some(c);
                    true
                }
                Err(_) => false,
            }
        }),
        "a slot freed by a leaving client must be usable again"
    );
    accepted.unwrap().ping();
}

// Issue: "A malformed packet closes that one connection and is logged; every other client
// carries on without loss." ([MQTT-4.8.0-1]: on a protocol violation the server MUST close
// the network connection.) While a publisher streams QoS 1 messages to a subscriber, three
// clients send malformed packets; each is closed, the stream loses nothing, and the daemon
// logs something at the default (info) level.
#[test]
fn malformed_packet_closes_only_that_connection_and_is_logged() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "mal-sub");
    sub.subscribe_ok(1, &[("mal/t", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "mal-pub");

    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "reserved packet type 0",
            vec![0x00, 0x04, 0xFF, 0xFE, 0xFD, 0x00],
        ),
        (
            "reserved packet type 15",
            vec![0xF0, 0x03, 0x13, 0x37, 0x42],
        ),
        (
            "remaining length over 4 bytes",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        ),
        (
            "SUBSCRIBE with bad flags",
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
    ];
    let mut seq = 0u16;
    for (name, bytes) in bad {
        for _ in 0..5 {
            seq += 1;
            publisher.publish1("mal/t", format!("{seq}").as_bytes(), false, seq);
        }
        let logs_before = ws.logs().len();
        let mut c = RawClient::connect(ws.addr, &format!("mal-{seq}"));
        let _ = c.try_send(&bytes);
        let got = c.expect_closed(Duration::from_secs(3));
        assert!(got.is_empty(), "{name}: answered with {got:?}");
        assert!(
            wait_until(Duration::from_secs(2), || ws.logs().len() > logs_before),
            "{name}: a malformed packet must be logged (nothing new in the log)"
        );
    }
    for _ in 0..5 {
        seq += 1;
        publisher.publish1("mal/t", format!("{seq}").as_bytes(), false, seq);
    }
    let start = Instant::now();
    for want in 1..=seq {
        let p = sub.recv_publish();
        assert_eq!(
            p.payload,
            format!("{want}").as_bytes(),
            "lost or reordered after {:?}",
            start.elapsed()
        );
        sub.ack(&p);
    }
    sub.expect_silence(SHORT);
}
