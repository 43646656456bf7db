//! Issue 3, "Tests, against a real upstream" - outage: the upstream Mosquitto is stopped
//! mid-stream for several seconds and started again. Publishers keep getting PUBACKs from
//! the durable log meanwhile; afterwards every acknowledged message arrives upstream, the
//! first occurrence of each in per-topic order (at least once: duplicates are allowed and
//! counted), and the backlog drains. With `max_rate` set, the drain measured at the
//! upstream subscriber does not exceed the rate by more than a small margin.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use waystation_e2e::upstream::{
    analyze, bridge_toml, missing, parse_id, Collector, Publisher, PublisherSpec, Upstream,
};
use waystation_e2e::Waystation;

/// The two tests measure time: never run them side by side on the two cores.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn upstream_stopped_mid_stream_loses_nothing_keeps_order_and_drains() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "outage-collector", "site1/#");
    let ws = Waystation::start_with(&bridge_toml(&upstream.address(), ""));
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );

    // 5 publishers x 3,000 messages, paced to span the outage (~1,500 msgs/s in all).
    let publishers: Vec<Publisher> = (0..5)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, 3_000);
            spec.pace = Some(Duration::from_millis(3));
            Publisher::start(ws.addr, spec)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1_000));
    let before_outage = collector.count();
    upstream.stop();
    let outage_start = Instant::now();
    let acked_at_stop: usize = publishers.iter().map(Publisher::acked_count).sum();
    std::thread::sleep(Duration::from_secs(4));
    let acked_during: usize =
        publishers.iter().map(Publisher::acked_count).sum::<usize>() - acked_at_stop;
    upstream.start_again();
    let outage = outage_start.elapsed();

    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(60));
        assert!(
            st.anomalies.is_empty(),
            "publisher {id}: {:?}",
            st.anomalies
        );
        assert_eq!(st.acked.len(), 3_000);
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    let drain_start = Instant::now();
    let arrived = collector.wait_for_all(&want, Duration::from_secs(60));
    let drained_in = drain_start.elapsed();
    collector.wait_quiet(Duration::from_millis(500), Duration::from_secs(5));
    let a = analyze(&collector.received(), "site1/");
    println!(
        "outage: {outage:?} down; {before_outage} received before it, {acked_during} acked during it; \
         {} acked in all, {} received ({} unique, {} duplicates); all arrived {drained_in:?} after the publishers finished",
        want.len(),
        a.total,
        a.unique.len(),
        a.duplicates
    );
    assert!(
        before_outage > 0,
        "the stream was flowing before the outage"
    );
    assert!(
        acked_during > 500,
        "publishers kept getting PUBACKs during the outage: {acked_during}"
    );
    assert!(
        ws.logs().contains("upstream connection lost"),
        "the bridge saw the outage:\n{}",
        ws.logs()
    );
    assert!(
        arrived,
        "lost upstream (first 20 per publisher): {:?}",
        missing(&want, &a.unique)
    );
    assert!(a.malformed.is_empty(), "{:?}", a.malformed);
    assert!(
        a.order_violations.is_empty(),
        "per-topic order broken: {:?}",
        a.order_violations
    );
    assert_eq!(a.unique.len(), want.len());
}

#[test]
fn backlog_drains_after_an_outage_no_faster_than_max_rate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const RATE: f64 = 200.0;
    const MESSAGES: u64 = 1_200;
    let mut upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "rate-collector", "site1/#");
    // The upstream is away while the backlog builds (its saved session keeps the
    // collector's subscription for when it comes back).
    upstream.stop();
    let ws = Waystation::start_with(&bridge_toml(&upstream.address(), "max_rate = 200"));
    let publishers: Vec<Publisher> = (0..4)
        .map(|p| Publisher::start(ws.addr, PublisherSpec::new(p, MESSAGES / 4)))
        .collect();
    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(60));
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    assert_eq!(
        want.len() as u64,
        MESSAGES,
        "all acked from the log while the upstream is down"
    );
    assert_eq!(collector.count(), 0);

    upstream.start_again();
    let started = Instant::now();
    let arrived = collector.wait_for_all(&want, Duration::from_secs(40));
    collector.wait_quiet(Duration::from_millis(500), Duration::from_secs(5));
    let received = collector.received();
    let a = analyze(&received, "site1/");
    assert!(arrived, "lost upstream: {:?}", missing(&want, &a.unique));
    assert!(a.order_violations.is_empty(), "{:?}", a.order_violations);

    let times: Vec<Instant> = received
        .iter()
        .filter(|r| parse_id(&r.payload).is_some())
        .map(|r| r.at)
        .collect();
    let span = times.last().unwrap().duration_since(times[0]).as_secs_f64();
    let average = (times.len() - 1) as f64 / span;
    // Most messages in any one-second window.
    let mut peak = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= Duration::from_secs(1) {
            lo += 1;
        }
        peak = peak.max(hi - lo + 1);
    }
    println!(
        "max_rate {RATE}: {} received ({} duplicates) over {span:.2} s: average {average:.1}/s, \
         peak {peak} in one second; first arrival {:?} after the upstream came back",
        received.len(),
        a.duplicates,
        times[0].duration_since(started)
    );
    assert!(
        average <= RATE * 1.1,
        "average drain rate {average:.1}/s exceeds max_rate {RATE}"
    );
    assert!(
        (peak as f64) <= RATE * 1.25,
        "{peak} messages in one second with max_rate {RATE}"
    );
    assert!(
        average >= RATE * 0.5,
        "the drain should run near max_rate, not crawl: {average:.1}/s"
    );
}
