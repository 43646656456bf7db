//! QoS 0 to live subscribers (issue 14): a subscriber that keeps up on average (bursts faster
//! than it reads, pauses between them) loses nothing, because the broker pauses the
//! publishers feeding it while it is behind (back-pressure, like a TCP pipe); one that stops
//! reading is called slow after two seconds, its QoS 0 messages are dropped (counted)
//! while the publishers and every other subscriber go on, the broker's memory stays bounded,
//! and once it reads again it gets new messages.
//!
//! Volumes are chosen to overflow what the kernel's socket buffers hold on loopback (a few
//! MiB) and the 2 MiB `max_queued_bytes` set here many times over: 30 MiB of 1 KiB messages.
//! Without the publishers' pauses a subscriber reading at 4 MiB/s loses messages here, and
//! so does one reading as fast as this test can (the pauses must come soon enough: the
//! router runs behind its publishers, by at most 64 KiB of each one's messages).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use waystation_e2e::raw::{self, Pkt, RawClient, RecvError};
use waystation_e2e::{http_get, metric_sample, proc_status_kib, Waystation};

const PAYLOAD: usize = 1024;
/// PUBLISH packets per socket write.
const BATCH: usize = 32;
/// Any single wait in these tests (a message, a write): generous for a loaded CI machine.
const WAIT: Duration = Duration::from_secs(30);
/// What a connected client may have sent and not yet written, at most.
const LIMITS: &str = "[limits]\nmax_queued_bytes = 2097152\n";

fn metric(ws: &Waystation, name: &str) -> f64 {
    let (code, body) = http_get(ws.http_addr(), "/metrics");
    assert_eq!(code, 200, "GET /metrics");
    metric_sample(&body, name).unwrap_or(0.0)
}

fn dropped_slow(ws: &Waystation) -> f64 {
    metric(
        ws,
        "waystation_messages_dropped_total{reason=\"qos0_slow_client\"}",
    )
}

/// A payload saying who sent it and its number, padded to PAYLOAD bytes.
fn payload(publisher: u8, seq: u32) -> Vec<u8> {
    let mut p = vec![b'.'; PAYLOAD];
    p[0] = publisher;
    p[1..5].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Publishes `count` QoS 0 messages to `topic` as fast as the broker reads them, resting
/// `rest` after every `burst` of them.
fn flood(
    ws: &Waystation,
    id: u8,
    topic: &'static str,
    count: u32,
    (burst, rest): (u32, Duration),
) -> thread::JoinHandle<()> {
    let mut publisher = RawClient::connect(ws.addr, &format!("pace-pub-{id}"));
    publisher.stream.set_write_timeout(Some(WAIT)).ok();
    thread::spawn(move || {
        let mut seq = 0;
        while seq < count {
            if seq > 0 && seq % burst == 0 {
                thread::sleep(rest);
            }
            let mut batch = Vec::with_capacity(BATCH * (PAYLOAD + 16));
            for _ in 0..BATCH
                .min((count - seq) as usize)
                .min((burst - seq % burst) as usize)
            {
                batch.extend(raw::publish(
                    topic,
                    &payload(id, seq),
                    0,
                    false,
                    false,
                    None,
                ));
                seq += 1;
            }
            publisher.send(&batch);
        }
        // Everything before it was read by the broker once this is acknowledged.
        publisher.send(&raw::pingreq());
        assert_eq!(publisher.recv_timeout(WAIT), Ok(Pkt::PingResp));
    })
}

/// Receives until `expected` messages came, checking each publisher's are in order with no
/// gap; sleeps `pause` after every `every` messages (a subscriber slower than the flood).
fn receive_all(sub: &mut RawClient, publishers: u8, expected: u32, every: u32, pause: Duration) {
    let mut next = vec![0u32; publishers as usize];
    for n in 1..=expected {
        let p = match sub.recv_timeout(WAIT) {
            Ok(Pkt::Publish(p)) => p,
            other => panic!("message {n} of {expected}: {other:?} (next per publisher {next:?})"),
        };
        let (who, seq) = (
            p.payload[0] as usize,
            u32::from_be_bytes([p.payload[1], p.payload[2], p.payload[3], p.payload[4]]),
        );
        assert_eq!(
            seq, next[who],
            "publisher {who}: message {seq} came where {} was due: QoS 0 lost for a subscriber that reads",
            next[who]
        );
        next[who] += 1;
        if n % every == 0 {
            thread::sleep(pause);
        }
    }
}

#[test]
fn a_subscriber_keeping_up_on_average_loses_no_qos0_message() {
    let ws = Waystation::start_with(LIMITS);
    let mut sub = RawClient::connect(ws.addr, "pace-reader");
    sub.subscribe_ok(1, &[("pace/#", 0)]);
    // Three bursts of 4 MiB from each, 1.5 s apart.
    const BURST: u32 = 4096;
    const PER_PUBLISHER: u32 = 3 * BURST;
    let publishers: Vec<_> = (0..2)
        .map(|id| {
            let bursts = (BURST, Duration::from_millis(1500));
            flood(&ws, id, "pace/a", PER_PUBLISHER, bursts)
        })
        .collect();
    // About 8 MiB/s: slower than the two publishers send a burst, faster on average.
    receive_all(
        &mut sub,
        2,
        2 * PER_PUBLISHER,
        200,
        Duration::from_millis(25),
    );
    for p in publishers {
        p.join().expect("publisher");
    }
    sub.expect_silence(Duration::from_millis(300));
    assert_eq!(
        dropped_slow(&ws),
        0.0,
        "QoS 0 dropped for a reading subscriber"
    );
    assert!(
        metric(&ws, "waystation_publisher_waits_total") >= 1.0,
        "the publishers were never paused: this test no longer overflows the subscriber"
    );
    assert_eq!(metric(&ws, "waystation_slow_subscribers_total"), 0.0);
}

#[test]
fn a_subscriber_that_stops_reading_is_dropped_for_and_holds_up_no_one() {
    let ws = Waystation::start_with(LIMITS);
    let pid = ws.pid().expect("daemon pid");
    let mut frozen = RawClient::connect(ws.addr, "pace-frozen");
    frozen.subscribe_ok(1, &[("pace/#", 0)]);
    let mut healthy = RawClient::connect(ws.addr, "pace-healthy");
    healthy.subscribe_ok(1, &[("pace/#", 0)]);
    let rss_before = proc_status_kib(pid, "VmRSS").expect("VmRSS");
    let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak_rss.clone(), sampling.clone());
        thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = proc_status_kib(pid, "VmRSS") {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    const COUNT: u32 = 30_000;
    // Bursts of 4 MiB with rests, so that the healthy subscriber keeps up on average
    // however slowly this test reads on a loaded machine.
    let publisher = flood(&ws, 0, "pace/b", COUNT, (4096, Duration::from_millis(500)));
    // The healthy subscriber gets every message, though the frozen one shares the topic.
    receive_all(&mut healthy, 1, COUNT, u32::MAX, Duration::ZERO);
    publisher.join().expect("publisher");
    sampling.store(false, Ordering::Relaxed);
    sampler.join().expect("sampler");

    assert!(
        metric(&ws, "waystation_slow_subscribers_total") >= 1.0,
        "the frozen subscriber was never called slow"
    );
    let dropped = dropped_slow(&ws);
    assert!(
        dropped > 0.0,
        "nothing dropped for a subscriber that reads nothing"
    );
    // What it was sent and not yet written is bounded (1 MiB of QoS 0, plus what the
    // router held); 30 MiB were published.
    let grew_mib = (peak_rss.load(Ordering::Relaxed) - rss_before) as f64 / 1024.0;
    assert!(
        grew_mib < 24.0,
        "the daemon grew by {grew_mib:.1} MiB holding a frozen subscriber's messages"
    );

    // It reads again: what it was sent before it was called slow, then, caught up, new
    // messages again.
    let mut before = 0;
    loop {
        match frozen.recv_timeout(Duration::from_millis(500)) {
            Ok(Pkt::Publish(_)) => before += 1,
            Err(RecvError::Timeout) => break,
            other => panic!("the once-frozen subscriber: {other:?}"),
        }
    }
    assert!(
        before > 0 && (before as f64) + dropped == COUNT as f64,
        "the frozen subscriber: {before} received + {dropped} dropped != {COUNT} published"
    );
    let mut publisher = RawClient::connect(ws.addr, "pace-after");
    publisher.send(&raw::publish("pace/c", b"after", 0, false, false, None));
    let got = frozen.recv_publish();
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("pace/c", &b"after"[..])
    );
}

/// The same over a subscriber's slow link (the test kit's link simulator: 150 ms each way
/// with jitter, 256 KiB/s down): bursts of 1 MiB it takes 4 s to carry, 5 s apart, arrive
/// whole and in order; then the link goes silent (zombie) during a burst: the subscriber is
/// called slow, the publisher and a subscriber on a good link get everything.
#[test]
fn over_a_slow_link_bursts_arrive_whole_and_a_zombie_link_holds_no_one() {
    use waystation_linksim::{LinkConfig, LinkSim};

    let ws = Waystation::start_with(LIMITS);
    let sim = LinkSim::start(LinkConfig {
        up_latency: Duration::from_millis(150),
        down_latency: Duration::from_millis(150),
        jitter: Duration::from_millis(20),
        bandwidth: Some(256 * 1024),
        ..LinkConfig::new(ws.addr.to_string())
    })
    .expect("link simulator");
    let link = sim.handle();
    let mut remote = RawClient::connect(sim.local_addr(), "pace-remote");
    remote.subscribe_ok(1, &[("pace/link", 0)]);
    let mut local = RawClient::connect(ws.addr, "pace-local");
    local.subscribe_ok(1, &[("pace/link", 0)]);

    const BURST: u32 = 1024;
    let publisher = flood(
        &ws,
        0,
        "pace/link",
        3 * BURST,
        (BURST, Duration::from_secs(5)),
    );
    let remote_reader = thread::spawn(move || {
        receive_all(&mut remote, 1, 3 * BURST, u32::MAX, Duration::ZERO);
        remote
    });
    receive_all(&mut local, 1, 3 * BURST, u32::MAX, Duration::ZERO);
    publisher.join().expect("publisher");
    let _remote = remote_reader
        .join()
        .expect("the remote subscriber lost messages");
    assert_eq!(
        dropped_slow(&ws),
        0.0,
        "QoS 0 dropped for a subscriber keeping up over a slow link"
    );

    // Silent both ways now; a burst of 24 MiB follows (more than the sockets on the way hold).
    link.zombie_all();
    const BIG: u32 = 24 * 1024;
    let publisher = flood(&ws, 1, "pace/link", BIG, (BIG, Duration::ZERO));
    receive_all(&mut local, 2, BIG, u32::MAX, Duration::ZERO);
    publisher
        .join()
        .expect("publisher held up by a zombie subscriber");
    assert!(
        metric(&ws, "waystation_slow_subscribers_total") >= 1.0,
        "the zombie link's subscriber was never called slow"
    );
    assert!(dropped_slow(&ws) > 0.0, "nothing dropped for a zombie link");
}
