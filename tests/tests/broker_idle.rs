//! A connection that goes quiet gives its read buffer back (after a second with nothing
//! buffered, so 10,000 idle sensors do not hold 4 KiB each) and gets one again with its next
//! bytes. What must hold whatever the buffer does: a PUBLISH sent after a quiet spell, and one
//! split across a quiet spell (its first bytes buffered, the rest a second and a half later),
//! arrive whole and are acknowledged; a larger one after the release is read in full.

use std::time::Duration;

use waystation_e2e::raw::{self, Pkt, RawClient};
use waystation_e2e::Waystation;

/// Longer than the broker's one-second release of an empty read buffer.
const QUIET: Duration = Duration::from_millis(1500);

#[test]
fn packets_after_and_across_a_quiet_spell_arrive_whole() {
    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "idle-sub");
    sub.subscribe_ok(1, &[("idle/#", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "idle-pub");

    // Quiet right after CONNECT: the buffer the CONNECT came in is given back.
    std::thread::sleep(QUIET);
    publisher.send(&raw::publish(
        "idle/a",
        b"after a quiet spell",
        1,
        false,
        false,
        Some(1),
    ));
    assert_eq!(publisher.recv(), Pkt::PubAck(1));
    let got = sub.recv_publish();
    assert_eq!(
        (got.topic.as_str(), got.payload.as_slice()),
        ("idle/a", &b"after a quiet spell"[..])
    );

    // Its first 10 bytes, a quiet spell with them buffered, then the rest: 5,000 bytes of
    // payload, far more than the 64 bytes a released buffer starts with again.
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let packet = raw::publish("idle/b", &payload, 1, false, false, Some(2));
    publisher.send(&packet[..10]);
    std::thread::sleep(QUIET);
    publisher.send(&packet[10..]);
    assert_eq!(publisher.recv(), Pkt::PubAck(2));
    let got = sub.recv_publish();
    assert_eq!(got.topic, "idle/b");
    assert!(got.payload == payload, "the split PUBLISH arrived altered");

    // Quiet again, then two packets in one write after the release.
    std::thread::sleep(QUIET);
    let mut two = raw::publish("idle/c", &payload, 1, false, false, Some(3));
    two.extend(raw::publish("idle/d", b"second", 1, false, false, Some(4)));
    publisher.send(&two);
    assert_eq!(publisher.recv(), Pkt::PubAck(3));
    assert_eq!(publisher.recv(), Pkt::PubAck(4));
    assert_eq!(sub.recv_publish().topic, "idle/c");
    assert_eq!(sub.recv_publish().topic, "idle/d");
}

/// The same over a device's Wi-Fi or cellular link (the test kit's link simulator: 150 ms each
/// way with jitter, 32 KiB/s): a PUBLISH trickles in over many reads after the buffer was
/// given back, one is cut by a 1.2 s partition in its middle, and a link that goes silent
/// (zombie) is still closed at 1.5 x keep-alive whatever the buffer does.
#[test]
fn over_a_slow_link_partitions_and_zombies_keep_their_meaning() {
    use waystation_linksim::{LinkConfig, LinkSim};

    let ws = Waystation::start();
    let mut sub = RawClient::connect(ws.addr, "slow-sub");
    sub.subscribe_ok(1, &[("slow/#", 1)]);
    let sim = LinkSim::start(LinkConfig {
        up_latency: Duration::from_millis(150),
        down_latency: Duration::from_millis(150),
        jitter: Duration::from_millis(20),
        bandwidth: Some(32 * 1024),
        ..LinkConfig::new(ws.addr.to_string())
    })
    .expect("link simulator");
    let link = sim.handle();
    let (mut device, _, code) = RawClient::connect_with(
        sim.local_addr(),
        &raw::Connect::new("slow-dev").keep_alive(2),
    );
    assert_eq!(code, 0, "CONNACK over the slow link");

    let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    std::thread::sleep(QUIET);
    device.send(&raw::publish("slow/a", &payload, 1, false, false, Some(1)));
    assert_eq!(device.recv(), Pkt::PubAck(1));
    let got = sub.recv_publish();
    assert!(
        got.topic == "slow/a" && got.payload == payload,
        "trickled PUBLISH altered"
    );

    // Keep the session alive across the quiet spells, as a device's client library does.
    device.send(&raw::pingreq());
    assert_eq!(device.recv(), Pkt::PingResp);
    let packet = raw::publish("slow/b", &payload, 1, false, false, Some(2));
    device.send(&packet[..packet.len() / 2]);
    link.partition(Duration::from_millis(1200));
    device.send(&packet[packet.len() / 2..]);
    assert_eq!(device.recv(), Pkt::PubAck(2));
    let got = sub.recv_publish();
    assert!(
        got.topic == "slow/b" && got.payload == payload,
        "partitioned PUBLISH altered"
    );

    // Silent both ways: the broker must close it at 1.5 x 2 s, not hold it forever.
    link.zombie_all();
    assert!(
        ws.wait_for_log("keep-alive expired", Duration::from_secs(10)),
        "a zombie device link was not closed by the keep-alive"
    );
}
