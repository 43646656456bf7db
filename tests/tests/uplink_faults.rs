//! The bridge over a bad uplink: the real daemon, a real Mosquitto upstream and the link
//! simulator (`waystation-linksim`) between them, adding 150 ms each way and the faults
//! sites' uplinks have: connections reset, connections that go silent without closing
//! ("zombies", e.g. a NAT or carrier that dropped its state), partitions, and the daemon
//! itself killed mid-transfer.
//!
//! What it proves, and why each matters to a user:
//! - Under a reset or zombie every 4-9 s, a sensor at 200 QoS 1 msg/s for a minute loses
//!   nothing it was acknowledged for, first arrivals stay in per-topic order, duplicates stay
//!   within the window resent per lost connection, and the backlog is upstream within 30 s
//!   of the last publish. Mosquitto as an edge bridge did this with 1,682 duplicates and one
//!   reordering (FACTS.md, "Testing links"); the bridge must do at least as well.
//! - A zombie link is found by the keep-alive (an unanswered PINGREQ: reason `ping_timeout`)
//!   within 1.5 x `keep_alive` and replaced: TCP alone would wait for minutes.
//! - A 30 s partition with publishers running builds a backlog on disk that arrives whole and
//!   in order once the link returns, even though the simulator then releases the stale
//!   connection attempts it held.
//! - Commands published upstream during a partition reach the device afterwards: the bridge's
//!   persistent upstream session (`clean_session = false`, the default) keeps them.
//! - A SIGKILL while a window is in flight over the slow link and a backlog waits loses none
//!   of the acknowledged messages.
//! - `/healthz` says `degraded` once the bridge has been unable to connect for 30 s, the
//!   failures are counted by reason on `/metrics`, and it says `ok` again once connected.
//!
//! Every test that measures time holds `SERIAL`, so they never share the two cores.

mod uplink_common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uplink_common::{
    bridge, bridge_status, count_in_log, failures_in_log, get, link, metric, seed, sim_address,
    CONNECTED, LOST,
};
use waystation_e2e::raw::{Connect, Pkt, RawClient, RecvError};
use waystation_e2e::upstream::{
    analyze, parse_id, Collector, Publisher, PublisherSpec, Received, Upstream,
};
use waystation_e2e::{free_port, wait_until, Waystation};
use waystation_linksim::{Chaos, Fault};

/// The tests that measure time never run side by side.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One-way latency of the site's uplink in these tests (300 ms round trips, as cellular or
/// satellite links have) and the jitter on each chunk.
const WAN: Duration = Duration::from_millis(150);
const JITTER: Duration = Duration::from_millis(5);

fn wait_connected(ws: &Waystation, times: usize, timeout: Duration) {
    assert!(
        wait_until(timeout, || count_in_log(ws, CONNECTED) >= times),
        "the bridge did not connect (connection {times}) within {timeout:?}:\n{}",
        ws.logs()
    );
}

fn acked_ids(publishers: &[Publisher]) -> HashSet<(u32, u64)> {
    publishers
        .iter()
        .flat_map(|p| p.acked().into_iter().map(move |s| (p.spec.publisher, s)))
        .collect()
}

fn seen_ids(collector: &Collector) -> HashSet<(u32, u64)> {
    collector
        .received()
        .iter()
        .filter_map(|r| parse_id(&r.payload))
        .collect()
}

/// When the last message of `want` first arrived.
fn last_first_arrival(received: &[Received], want: &HashSet<(u32, u64)>) -> Option<Instant> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|r| parse_id(&r.payload).is_some_and(|id| want.contains(&id) && seen.insert(id)))
        .map(|r| r.at)
        .max()
}

fn stop_all(publishers: &mut [Publisher]) -> Vec<String> {
    let mut anomalies = Vec::new();
    for p in publishers.iter_mut() {
        p.stop();
        p.snapshot(|s| anomalies.extend(s.anomalies.iter().cloned()));
    }
    anomalies
}

// ---------------------------------------------------------------------------------------
// Chaos: resets and zombies every 4-9 s under a steady sensor
// ---------------------------------------------------------------------------------------

#[test]
fn sensor_at_200_msg_s_through_resets_and_zombies_loses_nothing() {
    let _serial = serial();
    let seed = seed("UPLINK_CHAOS_SEED");
    // What a user on this link would set:
    // - keep_alive 3: a zombie is found within 1 x keep_alive while messages wait for their
    //   acknowledgement (1.5 x idle). Faults come every 4-9 s, so with the default of 30 the
    //   link would be dead most of the time; 3 s is still ten 300 ms round trips.
    // - max_inflight 200: over a long link the window sets the pace, 200 / 0.3 s = ~660 msg/s,
    //   3.3x the sensor's 200 msg/s, so the few seconds of backlog an outage leaves (~600
    //   messages) drain within about a second of reconnecting, before the next fault. A larger
    //   window drains faster but can duplicate more per fault: the unacknowledged window is
    //   what a reconnect sends again.
    // - connect_timeout 3: a zombie that strikes during a connection attempt costs 3 s, not 10.
    const KEEP_ALIVE: u64 = 3;
    const MAX_INFLIGHT: usize = 200;
    const MESSAGES: u64 = 12_000; // 60 s at 200 msg/s
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "chaos-collector", "site1/#");
    let sim = link(upstream.port, WAN, JITTER, seed);
    let handle = sim.handle();
    let ws = Waystation::start_with(&bridge(
        &sim_address(&sim),
        KEEP_ALIVE,
        &format!("max_inflight = {MAX_INFLIGHT}\nconnect_timeout = 3"),
    ));
    wait_connected(&ws, 1, Duration::from_secs(10));
    let http = ws.http_addr();

    let chaos = handle.start_chaos(Chaos {
        seed,
        min_interval: Duration::from_secs(4),
        max_interval: Duration::from_secs(9),
        kinds: vec![Fault::Reset, Fault::Zombie],
    });
    let started = Instant::now();
    // One sensor paced to 200 msg/s (a 4.8 ms pause after each PUBLISH; the rest of the
    // 5 ms goes to sending it).
    let mut spec = PublisherSpec::new(0, MESSAGES);
    spec.pace = Some(Duration::from_micros(4_800));
    spec.window = 50;
    let st = Publisher::start(ws.addr, spec).join(Duration::from_secs(120));
    let publishing = started.elapsed();
    let last_publish = st.last_ack.unwrap_or_else(Instant::now);
    assert!(st.anomalies.is_empty(), "{:?}", st.anomalies);
    let want: HashSet<(u32, u64)> = st.acked.iter().map(|s| (0, *s)).collect();

    // The link stays as bad while what is left drains.
    let arrived = collector.wait_for_all(&want, Duration::from_secs(30));
    drop(chaos);
    let faults = handle.faults();
    collector.wait_quiet(Duration::from_millis(1_000), Duration::from_secs(10));
    let received = collector.received();
    let a = analyze(&received, "site1/");
    let drained = last_first_arrival(&received, &want).map_or("never".into(), |t| {
        format!("{:.2?}", t.saturating_duration_since(last_publish))
    });
    let stats = handle.stats();
    let resets = faults.iter().filter(|(_, f)| *f == Fault::Reset).count();
    let zombies = faults.iter().filter(|(_, f)| *f == Fault::Zombie).count();
    let logs = ws.logs();
    let reconnects = logs.matches(CONNECTED).count().saturating_sub(1);
    let failures = failures_in_log(&logs);
    let failed: usize = failures.values().sum();
    let status = bridge_status(http);
    let (_, metrics) = get(http, "/metrics");
    let metric_failures = metric(
        &metrics,
        "waystation_bridge_connection_failures_total",
        &["bridge=\"cloud\""],
    )
    .unwrap_or(0.0);
    let bound = faults.len() * MAX_INFLIGHT;
    println!(
        "chaos (seed {seed}): {} acked in {publishing:.1?} ({:.0} msg/s), {} delivered ({} received, {} duplicates, \
         bound {bound} = {} faults x max_inflight {MAX_INFLIGHT}), {} order violations; all upstream {drained} after \
         the last publish; faults applied {} ({resets} resets, {zombies} zombies; connections hit: {} reset, {} zombie); \
         bridge reconnects {reconnects}, failures {failures:?} (metrics: {metric_failures}, status: {}), \
         connect attempts {}; link: {} connections, {} bytes up ({:.1} per acked message), {} bytes down; \
         bridge sent {} bytes",
        want.len(),
        want.len() as f64 / publishing.as_secs_f64(),
        a.unique.len(),
        a.total,
        a.duplicates,
        faults.len(),
        a.order_violations.len(),
        faults.len(),
        stats.resets,
        stats.zombies,
        status["failures"],
        status["connect_attempts"],
        stats.accepted,
        stats.bytes_up,
        stats.bytes_up as f64 / want.len() as f64,
        stats.bytes_down,
        status["bytes_sent"],
    );

    assert_eq!(
        want.len() as u64,
        MESSAGES,
        "the local side is not on the bad link"
    );
    assert!(
        faults.len() >= 6,
        "the chaos must have struck through the minute: {faults:?}"
    );
    assert!(
        failed >= 1 && reconnects >= 1,
        "the bridge never noticed a fault:\n{logs}"
    );
    a.assert_all_arrived_in_order(
        arrived,
        &want,
        "resets and zombies, 30 s after the last publish",
    );
    // Each fault ends at most one bridge connection (the simulator hits the one that is
    // open), and a lost connection resends at most its unacknowledged window, so at most
    // max_inflight duplicates per fault. More failures than faults would be the bridge
    // dropping healthy connections.
    assert!(
        failed <= faults.len(),
        "{failed} connection failures for {} faults: {failures:?}\n{logs}",
        faults.len()
    );
    assert!(
        a.duplicates <= bound,
        "{} duplicates, bound {bound} ({} faults x {MAX_INFLIGHT})",
        a.duplicates,
        faults.len()
    );
}

// ---------------------------------------------------------------------------------------
// Zombie detection
// ---------------------------------------------------------------------------------------

#[test]
fn zombie_link_is_found_by_ping_timeout_and_replaced_within_one_and_a_half_keep_alives() {
    let _serial = serial();
    const KEEP_ALIVE: u64 = 4;
    let one_way = Duration::from_millis(50);
    let rtt = one_way * 2;
    let upstream = Upstream::start();
    let sim = link(upstream.port, one_way, Duration::from_millis(2), KEEP_ALIVE);
    let handle = sim.handle();
    let ws = Waystation::start_with(&bridge(&sim_address(&sim), KEEP_ALIVE, ""));
    wait_connected(&ws, 1, Duration::from_secs(10));
    let keep_alive = Duration::from_secs(KEEP_ALIVE);
    // An idle link is found dead at most 1.5 x keep_alive after it went silent (a PINGREQ
    // after keep_alive, unanswered for half of it). Then the reconnection: a back-off of
    // 100 ms +-25% (the first after a good connection), CONNECT -> CONNACK (a round trip),
    // the session's 10 ms tick and this test's 20 ms polling of the log.
    let margin = rtt * 2 + Duration::from_millis(500);
    let bound = keep_alive * 3 / 2 + margin;
    let mut report = Vec::new();
    // The zombie strikes at different points of the keep-alive cycle; 4.2 s after the
    // CONNACK is just after the first PINGRESP, the worst case (1.5 x keep_alive).
    for (round, phase_ms) in [300u64, 2_000, 4_200].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(phase_ms));
        let lost_before = count_in_log(&ws, LOST);
        let zombied = Instant::now();
        handle.zombie_all();
        assert!(
            wait_until(bound + Duration::from_secs(10), || count_in_log(&ws, LOST)
                > lost_before),
            "round {round}: the zombie link was never given up:\n{}",
            ws.logs()
        );
        let detected = zombied.elapsed();
        assert!(
            wait_until(bound + Duration::from_secs(10), || count_in_log(
                &ws, CONNECTED
            ) >= round + 2),
            "round {round}: no new connection after the zombie:\n{}",
            ws.logs()
        );
        let reconnected = zombied.elapsed();
        let logs = ws.logs();
        let line = logs
            .lines()
            .filter(|l| l.contains(LOST))
            .nth(lost_before)
            .unwrap_or_default()
            .to_string();
        report.push(format!(
            "zombie {phase_ms} ms after connecting: given up after {detected:.2?}, reconnected after {reconnected:.2?}"
        ));
        assert!(
            line.contains("reason=\"ping_timeout\"") || line.contains("reason=ping_timeout"),
            "round {round}: the failure must be the keep-alive's: {line}"
        );
        assert!(
            reconnected <= bound,
            "round {round}: reconnected {reconnected:?} after the zombie, bound {bound:?} \
             (1.5 x keep_alive {KEEP_ALIVE} s + {margin:?}):\n{logs}"
        );
        // Sanity: a PINGREQ must go unanswered for half a keep-alive (it may have been sent
        // up to a round trip before the zombie struck).
        assert!(
            detected + rtt + Duration::from_millis(100) >= keep_alive / 2,
            "round {round}: given up {detected:?} after the zombie: too soon to be the keep-alive"
        );
    }
    let stats = handle.stats();
    println!(
        "zombie detection, keep_alive {KEEP_ALIVE} s, {} ms each way, bound {bound:?}: {report:?}; link: {} connections, {} zombies",
        one_way.as_millis(),
        stats.accepted,
        stats.zombies
    );
    assert_eq!(stats.zombies, 3);
    assert_eq!(failures_in_log(&ws.logs()).get("ping_timeout"), Some(&3));
}

// ---------------------------------------------------------------------------------------
// A 30 s partition
// ---------------------------------------------------------------------------------------

#[test]
fn backlog_built_during_a_30_s_partition_arrives_complete_and_in_order() {
    let _serial = serial();
    const PARTITION: Duration = Duration::from_secs(30);
    // A user on a 150 ms link sets a wide window: 500 / 0.3 s = ~1,660 msg/s, so the backlog
    // of a long outage drains in seconds. keep_alive stays at the harness's 5 s.
    const MAX_INFLIGHT: usize = 500;
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "partition-collector", "site1/#");
    let sim = link(upstream.port, WAN, JITTER, 30);
    let handle = sim.handle();
    let ws = Waystation::start_with(&bridge(
        &sim_address(&sim),
        5,
        &format!("max_inflight = {MAX_INFLIGHT}"),
    ));
    wait_connected(&ws, 1, Duration::from_secs(10));
    let http = ws.http_addr();

    // Four sensors at up to 50 msg/s each, publishing before, during and after the partition.
    let mut publishers: Vec<Publisher> = (0..4)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, 0);
            spec.count = None;
            spec.pace = Some(Duration::from_millis(20));
            spec.window = 20;
            Publisher::start(ws.addr, spec)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let before = seen_ids(&collector).len();

    handle.partition(PARTITION);
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (acked_early, seen_early) = (acked_ids(&publishers).len(), seen_ids(&collector).len());
    std::thread::sleep(PARTITION - Duration::from_secs(2));
    let (acked_late, seen_late) = (acked_ids(&publishers).len(), seen_ids(&collector).len());
    let (_, metrics) = get(http, "/metrics");
    let backlog = metric(
        &metrics,
        "waystation_bridge_backlog_messages",
        &["bridge=\"cloud\""],
    )
    .unwrap_or(0.0);
    let during = bridge_status(http);
    let built = acked_late - acked_early;

    let heal_at = cut + PARTITION;
    std::thread::sleep(heal_at.saturating_duration_since(Instant::now()));
    let healed = Instant::now();
    // The sensors carry on for a while after the link returns.
    std::thread::sleep(Duration::from_secs(3));
    let anomalies = stop_all(&mut publishers);
    let want = acked_ids(&publishers);
    let arrived = collector.wait_for_all(&want, Duration::from_secs(60));
    collector.wait_quiet(Duration::from_millis(1_000), Duration::from_secs(10));
    let received = collector.received();
    let a = analyze(&received, "site1/");
    let drained = last_first_arrival(&received, &want).map_or("never".into(), |t| {
        format!("{:.2?}", t.saturating_duration_since(healed))
    });
    let logs = ws.logs();
    let stats = handle.stats();
    println!(
        "partition {PARTITION:?}: {before} upstream before it; during it {built} acked and {} arrived (backlog metric \
         {backlog}, bridge connected {}, failures {}); after it: {} acked in all, {} delivered, {} duplicates, \
         {} order violations, all upstream {drained} after the link returned; failures in the log {:?}, \
         {} connections (CONNACKs); link: {} connections accepted",
        seen_late - seen_early,
        during["connected"],
        during["failures"],
        want.len(),
        a.unique.len(),
        a.duplicates,
        a.order_violations.len(),
        failures_in_log(&logs),
        logs.matches(CONNECTED).count(),
        stats.accepted
    );
    assert!(anomalies.is_empty(), "{anomalies:?}");
    assert!(before > 100, "messages flowed before the partition");
    assert_eq!(
        seen_late, seen_early,
        "nothing may cross the link while it is partitioned"
    );
    assert!(
        built >= 3_000,
        "the publishers must build a backlog during the partition (acked {built})"
    );
    assert!(
        backlog >= built as f64 * 0.9,
        "the daemon holds the backlog: metric {backlog}, built {built}"
    );
    assert_eq!(
        during["connected"], false,
        "the bridge must notice the dead link during a 30 s partition: {during}"
    );
    a.assert_all_arrived_in_order(arrived, &want, "30 s partition");
}

// ---------------------------------------------------------------------------------------
// Commands from the cloud during a partition
// ---------------------------------------------------------------------------------------

#[test]
fn commands_published_upstream_during_a_partition_reach_the_device_after_it() {
    let _serial = serial();
    const COMMANDS: u16 = 10;
    const PARTITION: Duration = Duration::from_secs(15);
    let upstream = Upstream::start();
    let sim = link(upstream.port, WAN, JITTER, 40);
    let handle = sim.handle();
    // clean_session is left at its default (false): the upstream keeps the bridge's session
    // and what is published for it while the link is down. (With `clean_session = true` this
    // test fails: none of the ten commands arrives.)
    let config = format!(
        "{}\n[[bridge.subscribe]]\nremote = \"site1/cmd/#\"\nlocal_prefix = \"\"\nqos = 1\n",
        bridge(&sim_address(&sim), 5, "")
    );
    let ws = Waystation::start_with(&config);
    // The device: a persistent local session on its command topics, connected throughout.
    let (mut device, _) = RawClient::connect_ok(ws.addr, &Connect::new("valve-1").clean(false));
    device.subscribe_ok(1, &[("site1/cmd/#", 1)]);
    wait_connected(&ws, 1, Duration::from_secs(10));

    // The cloud application, straight on the upstream.
    let upstream_addr = SocketAddr::from(([127, 0, 0, 1], upstream.port));
    let mut cloud = RawClient::connect(upstream_addr, "cloud-app");
    // The bridge subscribes right after its CONNACK: probe until a command gets through.
    let mut pid = 0u16;
    let probed = wait_until(Duration::from_secs(15), || {
        pid += 1;
        cloud.publish1(
            "site1/cmd/valve",
            format!("probe-{pid}").as_bytes(),
            false,
            pid,
        );
        match device.recv_timeout(Duration::from_millis(500)) {
            Ok(Pkt::Publish(p)) => {
                device.ack(&p);
                true
            }
            _ => false,
        }
    });
    assert!(
        probed,
        "no command reached the device before the partition:\n{}",
        ws.logs()
    );

    handle.partition(PARTITION);
    let cut = Instant::now();
    for i in 0..COMMANDS {
        pid += 1;
        cloud.publish1("site1/cmd/valve", format!("cmd-{i}").as_bytes(), false, pid);
        std::thread::sleep(Duration::from_secs(1));
    }
    // Nothing can reach the device while the link is cut.
    let mut commands: Vec<String> = Vec::new();
    let mut arrivals: Vec<(String, Duration)> = Vec::new();
    let mut read = |device: &mut RawClient, until: Instant, commands: &mut Vec<String>| {
        while Instant::now() < until {
            match device.recv_timeout(Duration::from_millis(100)) {
                Ok(Pkt::Publish(p)) => {
                    device.ack(&p);
                    let text = String::from_utf8_lossy(&p.payload).to_string();
                    if text.starts_with("cmd-") {
                        arrivals.push((text.clone(), cut.elapsed()));
                        commands.push(text);
                    }
                }
                Ok(_) | Err(RecvError::Timeout) => {}
                Err(RecvError::Closed) => panic!("the device's connection closed"),
            }
            let distinct: HashSet<&String> = commands.iter().collect();
            if distinct.len() == usize::from(COMMANDS) {
                break;
            }
        }
    };
    read(
        &mut device,
        cut + PARTITION - Duration::from_millis(500),
        &mut commands,
    );
    let during = commands.len();
    read(
        &mut device,
        cut + PARTITION + Duration::from_secs(40),
        &mut commands,
    );
    let logs = ws.logs();
    let mut first: Vec<&String> = Vec::new();
    for c in &commands {
        if !first.contains(&c) {
            first.push(c);
        }
    }
    let want: Vec<String> = (0..COMMANDS).map(|i| format!("cmd-{i}")).collect();
    println!(
        "commands during a {PARTITION:?} partition: {COMMANDS} published upstream, {during} reached the device during \
         it, {} after it ({} distinct, {} duplicates); arrivals (since the cut): {arrivals:?}; bridge failures {:?}, \
         {} connections",
        commands.len() - during,
        first.len(),
        commands.len() - first.len(),
        failures_in_log(&logs),
        logs.matches(CONNECTED).count()
    );
    assert_eq!(
        during, 0,
        "commands crossed a partitioned link: {commands:?}"
    );
    assert_eq!(
        first,
        want.iter().collect::<Vec<_>>(),
        "every command, first arrivals in the order published:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------
// SIGKILL while forwarding over the slow link
// ---------------------------------------------------------------------------------------

#[test]
fn sigkill_while_forwarding_over_a_150_ms_link_loses_no_acknowledged_message() {
    let _serial = serial();
    const KILLS: usize = 3;
    const MAX_INFLIGHT: usize = 200;
    let seed = seed("UPLINK_KILL_SEED");
    let mut rng = seed;
    let mut below = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "kill-collector", "site1/#");
    let sim = link(upstream.port, WAN, JITTER, seed);
    let mut ws = Waystation::start_with(&bridge(
        &sim_address(&sim),
        5,
        &format!("max_inflight = {MAX_INFLIGHT}"),
    ));
    wait_connected(&ws, 1, Duration::from_secs(10));

    // Four publishers at up to 250 msg/s each: more than the ~660 msg/s a window of 200
    // carries over 300 ms round trips, so at each kill a full window is on the link and a
    // backlog waits in the log.
    let mut publishers: Vec<Publisher> = (0..4)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, 0);
            spec.count = None;
            spec.pace = Some(Duration::from_millis(4));
            spec.window = 20;
            spec.reconnect = true;
            Publisher::start(ws.addr, spec)
        })
        .collect();
    let mut backlogs = Vec::new();
    let mut inflight = Vec::new();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(2_000 + below(2_000)));
        let acked = acked_ids(&publishers);
        let seen = seen_ids(&collector);
        backlogs.push(acked.difference(&seen).count());
        let status = bridge_status(ws.http_addr());
        inflight.push(status["inflight"].as_u64().unwrap_or(0));
        ws.kill();
        ws.restart();
    }
    std::thread::sleep(Duration::from_secs(2));
    let anomalies = stop_all(&mut publishers);
    let want = acked_ids(&publishers);
    let stopped = Instant::now();
    let arrived = collector.wait_for_all(&want, Duration::from_secs(90));
    let drained = stopped.elapsed();
    collector.wait_quiet(Duration::from_millis(1_000), Duration::from_secs(10));
    let a = analyze(&collector.received(), "site1/");
    let bound = KILLS * 2 * MAX_INFLIGHT;
    let acked_delivered = want.iter().filter(|id| a.unique.contains(id)).count();
    println!(
        "SIGKILL over a {WAN:?} link (seed {seed}): {KILLS} kills; acked but not upstream at each kill {backlogs:?}, \
         bridge in flight {inflight:?}; {} acked, {acked_delivered} of them delivered, {} delivered in all, \
         {} duplicates (bound {bound}); all upstream {drained:.2?} after the publishers stopped; link: {} connections",
        want.len(),
        a.unique.len(),
        a.duplicates,
        sim.handle().stats().accepted
    );
    assert!(anomalies.is_empty(), "{anomalies:?}");
    assert!(
        backlogs.iter().all(|b| *b >= MAX_INFLIGHT),
        "each kill must find at least a window's worth acknowledged and not yet upstream: {backlogs:?}"
    );
    a.assert_all_arrived_in_order(arrived, &want, "SIGKILLs over 150 ms");
    // A crash resends what was in flight and what was acknowledged but not yet durably
    // behind the cursor, each held to max_inflight (bridge/mod.rs, "Bounded duplicates").
    assert!(
        a.duplicates <= bound,
        "{} duplicates after {KILLS} kills, bound {bound}",
        a.duplicates
    );
}

// ---------------------------------------------------------------------------------------
// Health when the upstream cannot be reached
// ---------------------------------------------------------------------------------------

/// Not under `SERIAL`: an idle daemon retrying twice a second, and the 30 s are measured by
/// the daemon's own clock.
#[test]
fn healthz_degraded_after_30_s_unreachable_then_ok_once_connected() {
    let port = free_port();
    let started = Instant::now();
    let ws = Waystation::start_with(&bridge(&format!("127.0.0.1:{port}"), 5, ""));
    let http = ws.http_addr();
    let (code, body) = get(http, "/healthz");
    assert_eq!(
        (code, body.as_str()),
        (200, "ok\n"),
        "down for less than 30 s is not degraded yet"
    );

    std::thread::sleep(Duration::from_secs(29).saturating_sub(started.elapsed()));
    let deadline = started + Duration::from_secs(45);
    let (code, body) = loop {
        let (code, body) = get(http, "/healthz");
        if body.starts_with("degraded") || Instant::now() >= deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let degraded_after = started.elapsed();
    let (_, metrics) = get(http, "/metrics");
    let status = bridge_status(http);
    let refused = metric(
        &metrics,
        "waystation_bridge_connection_failures_total",
        &["bridge=\"cloud\"", "reason=\"connect_refused\""],
    );
    let attempts = metric(
        &metrics,
        "waystation_bridge_connect_attempts_total",
        &["bridge=\"cloud\""],
    );
    let down = metric(
        &metrics,
        "waystation_bridge_down_seconds",
        &["bridge=\"cloud\""],
    );
    println!(
        "unreachable upstream: /healthz after {degraded_after:.1?}: {code} {body:?}; metrics: connect_refused {refused:?}, \
         attempts {attempts:?}, down {down:?} s; status: failures {}, down_for_s {}",
        status["failures"], status["down_for_s"]
    );
    assert_eq!(code, 200, "degraded is not unhealthy: {body}");
    assert!(
        body.starts_with("degraded: bridge cloud: upstream unreachable for "),
        "after {degraded_after:?}: {body:?}"
    );
    let secs: u64 = body
        .split("unreachable for ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(secs >= 30, "{body}");
    assert!(
        refused.is_some_and(|n| n > 0.0),
        "connect_refused failures on /metrics:\n{metrics}"
    );
    assert!(attempts.is_some_and(|n| n >= 10.0), "{attempts:?}");
    assert!(down.is_some_and(|d| d >= 30.0), "{down:?}");
    assert!(
        status["failures"]["connect_refused"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    assert!(status["down_for_s"].as_u64().unwrap_or(0) >= 30, "{status}");

    // The upstream comes up on that port: the bridge connects and health is plain ok.
    let _upstream = Upstream::start_on(port);
    wait_connected(&ws, 1, Duration::from_secs(15));
    let mut last = (0, String::new());
    let ok = wait_until(Duration::from_secs(5), || {
        last = get(http, "/healthz");
        last == (200, "ok\n".to_string())
    });
    assert!(ok, "/healthz once connected: {last:?}");
    let (_, metrics) = get(http, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "waystation_bridge_down_seconds",
            &["bridge=\"cloud\""]
        ),
        Some(0.0)
    );
    assert_eq!(bridge_status(http)["connected"], true);
}
