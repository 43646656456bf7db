//! Issue 3, "Tests, against a real upstream" - bounds: with the upstream away and more
//! data than `[storage] max_bytes` (20 KB here), `on_full = "drop_oldest"` keeps the newest
//! messages and counts exactly what it dropped, and `on_full = "reject_new"` loses nothing:
//! publishers stop getting PUBACKs while the log is full, and once the upstream is back
//! everything acknowledged arrives and the publishers complete.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use waystation_e2e::upstream::{
    analyze, bridge_toml, missing, Collector, Publisher, PublisherSpec, Upstream,
};
use waystation_e2e::{wait_until, Waystation};

const MAX_BYTES: u64 = 20_000;

/// An upstream whose (persistent) subscriber is registered, then stopped: the bridge
/// finds nobody there until `start_again`.
fn absent_upstream(collector_id: &str) -> (Upstream, Collector) {
    let mut upstream = Upstream::start();
    let collector = Collector::start(upstream.port, collector_id, "site1/#");
    upstream.stop();
    (upstream, collector)
}

fn storage_toml(on_full: &str) -> String {
    format!("[storage]\nmax_bytes = {MAX_BYTES}\non_full = \"{on_full}\"\n\n")
}

/// Sum of `dropped=N` over the daemon's "store full (drop_oldest)" lines.
fn logged_drops(logs: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains("store full (drop_oldest)"))
        .filter_map(|l| {
            l.split("dropped=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

struct DropOutcome {
    published: u64,
    logged_dropped: u64,
    kept: u64,
}

/// 1,000 messages into a 20 KB log with the upstream away, then the upstream comes back:
/// asserts that exactly the newest ones arrive; returns the counts.
fn drop_oldest_run(collector_id: &str) -> DropOutcome {
    const N: u64 = 1_000;
    let (mut upstream, collector) = absent_upstream(collector_id);
    let ws = Waystation::start_with(&format!(
        "{}{}",
        storage_toml("drop_oldest"),
        bridge_toml(&upstream.address(), "")
    ));
    // One publisher: its sequence order is the log order, so "the newest" is a seq suffix.
    let mut spec = PublisherSpec::new(0, N);
    spec.payload_len = 60;
    let st = Publisher::start(ws.addr, spec).join(Duration::from_secs(60));
    assert_eq!(
        st.acked.len() as u64,
        N,
        "drop_oldest never blocks publishers"
    );
    // Let housekeeping settle the last trims, then read the count the daemon logged.
    std::thread::sleep(Duration::from_millis(1_000));
    let dropped = logged_drops(&ws.logs());

    upstream.start_again();
    collector.wait_quiet(Duration::from_millis(1_500), Duration::from_secs(30));
    let received = collector.received();
    let a = analyze(&received, "site1/");
    let got: Vec<u64> = {
        let mut v: Vec<u64> = a.unique.iter().map(|id| id.1).collect();
        v.sort_unstable();
        v
    };
    let kept = got.len() as u64;
    let kept_bytes: usize = received
        .iter()
        .map(|r| r.payload.len() + r.topic.len())
        .sum();
    println!(
        "drop_oldest: {N} published of {} B payload, max_bytes {MAX_BYTES}: logged dropped {dropped}, \
         arrived {kept} (seq {:?}..={:?}, {} duplicates, ~{kept_bytes} B of topic+payload upstream), actually dropped {}",
        60,
        got.first(),
        got.last(),
        a.duplicates,
        N - kept
    );
    assert!(
        kept > 0 && kept < N,
        "the log must have been trimmed, not emptied: kept {kept} of {N}"
    );
    let newest: Vec<u64> = (N - kept..N).collect();
    assert_eq!(
        got, newest,
        "what survives must be exactly the newest {kept} messages"
    );
    assert!(a.order_violations.is_empty(), "{:?}", a.order_violations);
    DropOutcome {
        published: N,
        logged_dropped: dropped,
        kept,
    }
}

#[test]
fn drop_oldest_keeps_exactly_the_newest() {
    let o = drop_oldest_run("bounds-drop-collector");
    assert!(o.logged_dropped > 0, "the daemon logged its drops");
}

// The router once re-counted entries whose DeleteLogThrough was submitted but not yet
// durable (logged 1003 dropped of 1000 published while 794 were dropped).
#[test]
fn drop_oldest_counts_exactly_what_it_dropped() {
    let o = drop_oldest_run("bounds-dropcount-collector");
    assert_eq!(
        o.logged_dropped,
        o.published - o.kept,
        "the logged drop count must equal what was actually dropped"
    );
}

#[test]
fn reject_new_blocks_publishers_while_full_and_loses_nothing() {
    const PUBLISHERS: u32 = 4;
    const EACH: u64 = 200;
    let (mut upstream, collector) = absent_upstream("bounds-reject-collector");
    let ws = Waystation::start_with(&format!(
        "{}{}",
        storage_toml("reject_new"),
        bridge_toml(&upstream.address(), "")
    ));
    let publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, EACH);
            spec.payload_len = 60;
            Publisher::start(ws.addr, spec)
        })
        .collect();
    let acked = |ps: &[Publisher]| ps.iter().map(Publisher::acked_count).sum::<usize>();

    // Blocked: the daemon says the store is full and acks stop coming.
    assert!(
        ws.wait_for_log("store full (reject_new)", Duration::from_secs(20)),
        "the store never reported full:\n{}",
        ws.logs()
    );
    let mut last = acked(&publishers);
    let mut still_since = Instant::now();
    let stalled = wait_until(Duration::from_secs(20), || {
        let now = acked(&publishers);
        if now != last {
            last = now;
            still_since = Instant::now();
        }
        still_since.elapsed() >= Duration::from_secs(2)
    });
    let acked_while_full = acked(&publishers);
    println!(
        "reject_new: {acked_while_full} of {} acked before the store filled",
        PUBLISHERS as u64 * EACH
    );
    assert!(
        stalled,
        "PUBACKs kept coming while the store was full: {acked_while_full} acked"
    );
    assert!(
        (acked_while_full as u64) < PUBLISHERS as u64 * EACH,
        "the publishers must be blocked before finishing"
    );
    assert!(publishers.iter().all(|p| !p.done()));
    assert_eq!(collector.count(), 0);

    // The upstream comes back: the bridge makes room, the publishers complete.
    upstream.start_again();
    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(60));
        assert!(
            st.anomalies.is_empty(),
            "publisher {id}: {:?}",
            st.anomalies
        );
        assert_eq!(
            st.acked.len() as u64,
            EACH,
            "publisher {id} completes once there is room"
        );
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    let arrived = collector.wait_for_all(&want, Duration::from_secs(30));
    collector.wait_quiet(Duration::from_millis(500), Duration::from_secs(5));
    let a = analyze(&collector.received(), "site1/");
    println!(
        "reject_new: {} acked in all, {} arrived ({} duplicates)",
        want.len(),
        a.unique.len(),
        a.duplicates
    );
    assert!(ws.logs().contains("store has room again"), "{}", ws.logs());
    assert!(arrived, "lost: {:?}", missing(&want, &a.unique));
    assert!(a.order_violations.is_empty(), "{:?}", a.order_violations);
}
