//! Issue 17, "Large messages, durably": with `max_packet_size = 16842752` (a 16 MiB payload
//! with its topic, the largest allowed) QoS 1 publishes of 500 kB (the Eclipse Paho C test
//! suite's `test8-4`/`test8-6` size) and 16 MiB are acknowledged, delivered byte for byte to a
//! local subscriber and, through a bridge, to a real upstream Mosquitto (whose own packet
//! limit is the protocol's 256 MB); acknowledged large messages survive a SIGKILL while the
//! upstream is frozen and arrive upstream in order after the restart; a persistent session
//! that was offline gets them after a SIGKILL + restart; and a packet over the limit closes
//! only its own connection.
//!
//! Every payload is distinct and checkable: `"big:<seq>:<len>:"` followed by a xorshift
//! stream seeded from `seq`, so each received copy is compared with the bytes that were sent
//! (a failure prints lengths, the first differing offset and hashes, never 16 MiB of bytes).
//! The clients' own packet limits are raised: rumqttc's (`set_max_packet_size`) in the
//! collectors; the raw client has none.

use std::time::{Duration, Instant};

use waystation_e2e::payload::{big_payload, hash, parse_header};
use waystation_e2e::raw::{self, Connect, Pkt, RawClient, RecvError};
use waystation_e2e::upstream::{bridge_toml, Collector, Received, Upstream};
use waystation_e2e::Waystation;

/// `[limits] max_packet_size` of every daemon here: the largest the config accepts.
const MAX_PACKET: usize = 16_842_752;
const MIB: usize = 1 << 20;
/// rumqttc's limits in the collectors (incoming and outgoing): a 16 MiB payload, its topic
/// and header fit; rumqttc closes the connection on anything larger.
const CLIENT_MAX_PACKET: usize = 17 * MIB;
/// A PUBACK for a 16 MiB message needs the whole packet read, stored in parts and fsynced;
/// a debug build on a busy CI machine can take seconds for that.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Everything expected upstream or at a subscriber arrives within this (drain after a
/// restart and thaw included).
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------

/// Panics unless `got` is exactly `big_payload(seq, len)`, with a short description.
fn assert_intact(what: &str, got: &[u8], seq: u64, len: usize) {
    let want = big_payload(seq, len);
    if got == want.as_slice() {
        return;
    }
    let first_diff = got
        .iter()
        .zip(want.iter())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: message {seq} corrupted: {} bytes received, {} sent; first difference at byte \
         {first_diff}; hash {:016x} received, {:016x} sent",
        got.len(),
        want.len(),
        hash(got),
        hash(&want)
    );
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn config(extra: &str) -> String {
    format!("[limits]\nmax_packet_size = {MAX_PACKET}\n\n{extra}")
}

/// Sends every `(seq, len)` as a QoS 1 PUBLISH on `topic` (packet id seq + 1) without
/// waiting, then waits for each PUBACK (bounded), in order [MQTT-4.6.0-2].
fn publish_all_acked(c: &mut RawClient, topic: &str, msgs: &[(u64, usize)]) {
    for &(seq, len) in msgs {
        let pid = seq as u16 + 1;
        c.send(&raw::publish(
            topic,
            &big_payload(seq, len),
            1,
            false,
            false,
            Some(pid),
        ));
    }
    for &(seq, len) in msgs {
        let pid = seq as u16 + 1;
        let started = Instant::now();
        match c.recv_timeout(ACK_TIMEOUT) {
            Ok(Pkt::PubAck(p)) => assert_eq!(
                p, pid,
                "PUBACKs in the order of the PUBLISHes [MQTT-4.6.0-2] (message {seq})"
            ),
            other => panic!(
                "message {seq} ({len} bytes): expected PUBACK({pid}) within {ACK_TIMEOUT:?}, got {other:?}"
            ),
        }
        println!(
            "message {seq}: {len} bytes acknowledged (waited {:?} for its PUBACK)",
            started.elapsed()
        );
    }
}

/// Waits (bounded, polling the count so 16 MiB payloads are not copied every 20 ms) until
/// the collector holds every seq of `msgs`; returns what it received.
fn wait_for_seqs(c: &Collector, msgs: &[(u64, usize)], timeout: Duration) -> (bool, Vec<Received>) {
    let deadline = Instant::now() + timeout;
    let mut checked = usize::MAX;
    loop {
        let n = c.count();
        if n != checked {
            checked = n;
            let got = c.received();
            let seqs: Vec<u64> = got
                .iter()
                .filter_map(|r| parse_header(&r.payload))
                .map(|(s, _)| s)
                .collect();
            if msgs.iter().all(|(s, _)| seqs.contains(s)) {
                return (true, got);
            }
        }
        if Instant::now() >= deadline {
            return (false, c.received());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every message of `msgs` arrived on `topic`, intact; the first arrival of each is in seq
/// order; nothing else arrived. Returns the number of duplicates (at least once allows them).
fn assert_delivered(
    what: &str,
    arrived: bool,
    got: &[Received],
    topic: &str,
    msgs: &[(u64, usize)],
) -> usize {
    let summary: Vec<String> = got
        .iter()
        .map(|r| match parse_header(&r.payload) {
            Some((s, l)) => format!("{}:{s}({l}B, got {})", r.topic, r.payload.len()),
            None => format!("{}:<{} bytes, no header>", r.topic, r.payload.len()),
        })
        .collect();
    assert!(
        arrived,
        "{what}: not every message arrived within the wait; received: {summary:?}"
    );
    let mut firsts: Vec<u64> = Vec::new();
    let mut duplicates = 0;
    for r in got {
        assert_eq!(r.topic, topic, "{what}: arrivals: {summary:?}");
        let (seq, len) = parse_header(&r.payload)
            .unwrap_or_else(|| panic!("{what}: a payload without its header: {summary:?}"));
        assert!(
            msgs.contains(&(seq, len)),
            "{what}: a message never sent: {seq} ({len} B); arrivals {summary:?}"
        );
        assert_intact(what, &r.payload, seq, len);
        if firsts.contains(&seq) {
            duplicates += 1;
        } else {
            firsts.push(seq);
        }
    }
    let want: Vec<u64> = msgs.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        firsts, want,
        "{what}: first arrivals out of publish order; arrivals {summary:?}"
    );
    duplicates
}

/// `(log_messages, log_bytes)` of each "store recovered" line the daemon logged, one per
/// start.
fn recovered(ws: &Waystation) -> Vec<(u64, u64)> {
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split(key)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    ws.logs()
        .lines()
        .filter(|l| l.contains("store recovered"))
        .filter_map(|l| Some((field(l, "log_messages=")?, field(l, "log_bytes=")?)))
        .collect()
}

fn start_bridged(upstream: &Upstream) -> Waystation {
    let ws = Waystation::start_with(&config(&bridge_toml(
        &upstream.address(),
        "max_inflight = 100",
    )));
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "the bridge did not connect:\n{}",
        ws.logs()
    );
    ws
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Catches: a `max_packet_size` ceiling still below 16 MiB (the connection is closed, no
/// PUBACK); large messages split into parts and reassembled wrongly (lost, reordered or
/// truncated parts show as a byte mismatch); a PUBACK withheld for a message in parts; the
/// bridge failing to forward (or an upstream refusing) a 16 MiB PUBLISH.
#[test]
fn large_qos1_publishes_acked_and_delivered_intact_locally_and_upstream() {
    let started = Instant::now();
    let upstream = Upstream::start();
    let up = Collector::start_sized(upstream.port, "large-up", "site1/#", CLIENT_MAX_PACKET);
    let ws = start_bridged(&upstream);
    let local = Collector::start_sized(ws.port(), "large-local", "sensors/#", CLIENT_MAX_PACKET);

    let msgs = [(0, 500_000), (1, 16 * MIB)];
    let mut publisher = RawClient::connect(ws.addr, "large-pub");
    publish_all_acked(&mut publisher, "sensors/big", &msgs);

    let (arrived, got) = wait_for_seqs(&local, &msgs, ARRIVAL_TIMEOUT);
    let local_dups = assert_delivered("local subscriber", arrived, &got, "sensors/big", &msgs);
    let (arrived, got) = wait_for_seqs(&up, &msgs, ARRIVAL_TIMEOUT);
    let up_dups = assert_delivered("upstream", arrived, &got, "site1/sensors/big", &msgs);
    println!(
        "500 kB + 16 MiB: acked, intact locally ({local_dups} duplicates) and upstream \
         ({up_dups} duplicates) in {:?}",
        started.elapsed()
    );
    // The publisher's connection is still usable after them.
    publisher.ping();
}

/// Catches: large messages acknowledged before all their parts were durable, or parts not
/// written in the same atomic commit as their log entry (after a SIGKILL a message is lost,
/// truncated or refused at open); the bridge's cursor or resend skipping or reordering
/// entries stored in parts; a restart that fails on a log holding large records.
#[test]
fn large_messages_acked_while_upstream_frozen_survive_sigkill_in_order() {
    let started = Instant::now();
    let upstream = Upstream::start();
    let up = Collector::start_sized(
        upstream.port,
        "large-crash-up",
        "site1/#",
        CLIENT_MAX_PACKET,
    );
    let mut ws = start_bridged(&upstream);

    upstream.freeze();
    // Mixed sizes, the small ones between large ones: parts of one message must never be
    // mistaken for the next entry. 7,169 B is one byte over a single part (7 KiB).
    let msgs = [
        (0, 3 * MIB + 17),
        (1, 500_000),
        (2, 64),
        (3, 16 * MIB),
        (4, 7 * 1024 + 1),
        (5, MIB),
    ];
    let mut publisher = RawClient::connect(ws.addr, "large-crash-pub");
    publish_all_acked(&mut publisher, "sensors/big", &msgs);
    drop(publisher);

    // Every PUBACK is in: they exist on the daemon's disk (and perhaps partly in the frozen
    // upstream's socket buffer) only.
    ws.kill();
    ws.restart();
    // The kill found every message waiting in the log (the frozen upstream acknowledged
    // none), so the restart recovered all of them from disk, large records whole.
    let starts = recovered(&ws);
    let total: usize = msgs.iter().map(|(_, l)| l).sum();
    assert!(
        starts.len() == 2 && starts[1].0 >= msgs.len() as u64 && starts[1].1 >= total as u64,
        "the restart recovers the {} acknowledged messages ({total} payload bytes) from the \
         log; recovered (messages, bytes) per start: {starts:?}",
        msgs.len()
    );
    assert!(!ws.logs().contains("was corrupt"), "{}", ws.logs());
    upstream.thaw();

    let (arrived, got) = wait_for_seqs(&up, &msgs, ARRIVAL_TIMEOUT);
    let dups = assert_delivered(
        "upstream after SIGKILL + restart",
        arrived,
        &got,
        "site1/sensors/big",
        &msgs,
    );
    println!(
        "{} large messages acked with the upstream frozen, SIGKILL, restart, thaw: all \
         upstream intact and in order, {dups} duplicates, {:?}",
        msgs.len(),
        started.elapsed()
    );
}

/// Catches: a persistent session's queue losing (or truncating) large messages across a
/// SIGKILL; queued large messages not stored in parts atomically with the session's queue;
/// CONNACK without session present after the restart.
#[test]
fn persistent_offline_subscriber_gets_large_messages_after_sigkill() {
    let started = Instant::now();
    let mut ws = Waystation::start_with(&config(""));

    let id = "large-offline-sub";
    let (mut sub, _) = RawClient::connect_ok(ws.addr, &Connect::new(id).clean(false));
    sub.subscribe_ok(1, &[("big/#", 1)]);
    sub.disconnect();

    let msgs = [(0, 500_000), (1, 16 * MIB), (2, 2 * MIB + 3)];
    let mut publisher = RawClient::connect(ws.addr, "large-offline-pub");
    publish_all_acked(&mut publisher, "big/files", &msgs);
    drop(publisher);

    ws.kill();
    ws.restart();
    assert!(!ws.logs().contains("was corrupt"), "{}", ws.logs());

    let (mut sub, session_present) = RawClient::connect_ok(ws.addr, &Connect::new(id).clean(false));
    assert!(
        session_present,
        "the persistent session survives a SIGKILL [MQTT-3.2.2-2]"
    );
    let mut firsts = Vec::new();
    while firsts.len() < msgs.len() {
        let p = match sub.recv_timeout(ACK_TIMEOUT) {
            Ok(Pkt::Publish(p)) => p,
            other => panic!(
                "queued large message {} of {}: expected PUBLISH within {ACK_TIMEOUT:?}, got {other:?} \
                 (received so far: {firsts:?})",
                firsts.len(),
                msgs.len()
            ),
        };
        assert_eq!(p.topic, "big/files");
        assert_eq!(p.qos, 1, "granted QoS 1, published QoS 1");
        let (seq, len) = parse_header(&p.payload).expect("payload header");
        assert_intact("offline subscriber", &p.payload, seq, len);
        sub.ack(&p);
        if !firsts.contains(&seq) {
            firsts.push(seq);
        }
    }
    let want: Vec<u64> = msgs.iter().map(|(s, _)| *s).collect();
    assert_eq!(firsts, want, "queued messages delivered in publish order");
    println!(
        "offline persistent subscriber: {} large messages after SIGKILL + restart, intact, in \
         order, {:?}",
        msgs.len(),
        started.elapsed()
    );
}

/// Catches: an oversized packet taking the daemon (or other connections) down, being
/// acknowledged, delivered or stored; the daemon buffering a packet it has already decided to
/// refuse instead of closing as soon as the header says it is too large.
#[test]
fn publish_over_max_packet_size_closes_only_that_connection() {
    let ws = Waystation::start_with(&config(""));
    let mut sub = RawClient::connect(ws.addr, "large-limit-sub");
    sub.subscribe_ok(1, &[("big/#", 1)]);
    let mut honest = RawClient::connect(ws.addr, "large-limit-honest");

    // Over the limit however it is counted (remaining length or whole packet).
    let mut offender = RawClient::connect(ws.addr, "large-limit-offender");
    let too_big = raw::publish(
        "big/too",
        &big_payload(99, MAX_PACKET),
        1,
        false,
        false,
        Some(1),
    );
    assert!(too_big.len() > MAX_PACKET + 4);
    // The daemon may close the connection while this is still being written.
    let write = offender.try_send(&too_big);
    let before_close = match offender.recv_timeout(Duration::from_secs(10)) {
        Err(RecvError::Closed) => Vec::new(),
        Ok(p) => {
            let mut got = vec![p];
            got.extend(offender.expect_closed(Duration::from_secs(10)));
            got
        }
        Err(RecvError::Timeout) => panic!(
            "a {} byte PUBLISH over max_packet_size {MAX_PACKET} did not close its connection \
             within 10 s (write: {write:?})",
            too_big.len()
        ),
    };
    assert!(
        before_close.is_empty(),
        "nothing answers an oversized PUBLISH (MQTT 3.1.1 has no way to say why), got {before_close:?}"
    );

    // Everyone else is unaffected: the subscriber and the other publisher stay connected,
    // a large message still goes through, and the oversized one was never delivered.
    let msgs = [(0, 500_000)];
    publish_all_acked(&mut honest, "big/ok", &msgs);
    let p = match sub.recv_timeout(ACK_TIMEOUT) {
        Ok(Pkt::Publish(p)) => p,
        other => panic!("subscriber: expected the 500 kB PUBLISH, got {other:?}"),
    };
    assert_eq!(
        p.topic, "big/ok",
        "the oversized message must not be delivered"
    );
    assert_intact(
        "subscriber after the oversized publish",
        &p.payload,
        0,
        500_000,
    );
    sub.ack(&p);
    sub.expect_silence(Duration::from_millis(300));
    honest.ping();
    // A new connection is accepted too.
    RawClient::connect(ws.addr, "large-limit-after").ping();
    assert!(!ws.logs().contains("panicked"), "{}", ws.logs());
}
