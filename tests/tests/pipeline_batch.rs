//! Issue 15, outbound: a forward rule with `batch` packs the events it forwards into batch
//! PUBLISHes (json-array or ndjson, zstd or gzip, MQTT 3.1.1 or 5 upstream), and the bridge's
//! cursor moves only when a whole batch is acknowledged.
//!
//! Real processes: QoS 1 publishers into the `waystation` daemon, a real Mosquitto upstream,
//! a subscriber there recording every PUBLISH. Every batch is decoded (decompressed, split
//! into events, payloads read back from base64) and the events are checked against what the
//! publishers got PUBACKs for: all of them, in per-topic order, and without a reconnect
//! exactly once. Then a SIGKILL while batches are being gathered and forwarded (upstream up:
//! the pending batch is the backlog at stake) and a run over a 150 ms-each-way link.

mod uplink_common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use uplink_common::{link, sim_address};
use waystation_e2e::raw::MosquittoSub;
use waystation_e2e::upstream::{
    acked_ids, analyze, batch_events, parse_id, stop_all, Analysis, Collector, Publisher,
    PublisherSpec, Received, Upstream,
};
use waystation_e2e::{http_get, metric_sample, wait_until, Waystation};

const BATCH_TOPIC: &str = "site1/events/batch";

#[derive(Debug, Clone, Copy)]
struct Case {
    protocol: u8,
    /// "json-array" or "ndjson".
    encoding: &'static str,
    /// "zstd", "gzip" or None.
    compress: Option<&'static str>,
}

/// `[[bridge]]` "cloud" forwarding `sensors/#` in batches to `BATCH_TOPIC`.
fn bridge_toml(address: &str, case: Case, batch: &str, extra: &str) -> String {
    let compress = case
        .compress
        .map(|c| format!("compress = \"{c}\"\n"))
        .unwrap_or_default();
    format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"{address}\"\nkeep_alive = 5\n\
         protocol = {}\nreconnect = {{ initial_ms = 100, max_ms = 500 }}\n{extra}\n\n\
         [[bridge.forward]]\nlocal = \"sensors/#\"\nqos = 1\nbatch = {{ {batch} }}\n\
         batch_topic = \"{BATCH_TOPIC}\"\nencoding = \"{}\"\n{compress}",
        case.protocol, case.encoding
    )
}

/// The events of every batch PUBLISH received, as the `Received` the analysis reads (topic:
/// the event's local topic; payload: its bytes), in arrival order; and the events per batch.
fn decode_batches(received: &[Received], case: Case) -> (Vec<Received>, Vec<usize>) {
    let want_topic = match case.compress {
        Some(c) if case.protocol == 4 => format!("{BATCH_TOPIC}/{c}"),
        _ => BATCH_TOPIC.to_string(),
    };
    let (mut events, mut sizes) = (Vec::new(), Vec::new());
    for r in received {
        assert_eq!(r.topic, want_topic, "only batch PUBLISHes go up");
        let batch = batch_events(&r.payload, case.compress, case.encoding);
        sizes.push(batch.len());
        for e in batch {
            let topic = e["topic"].as_str().expect("topic").to_string();
            // The test's payloads ("<publisher>:<seq>:xxx") are not JSON.
            let b64 = e["payload_base64"].as_str().expect("payload_base64");
            let payload = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            events.push(Received {
                topic,
                payload,
                retain: false,
                at: r.at,
            });
        }
    }
    (events, sizes)
}

/// The daemon with a batching bridge to `address`, once its bridge has connected.
fn start(address: &str, case: Case, batch: &str, extra: &str) -> Waystation {
    let ws = Waystation::start_with(&bridge_toml(address, case, batch, extra));
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(15)),
        "{}",
        ws.logs()
    );
    ws
}

/// 3 publishers x 200 QoS 1 messages of `payload_len` bytes, each `pace` apart if set,
/// to the end: what was acked.
fn publish_600(ws: &Waystation, payload_len: usize, pace: Option<Duration>) -> Publishing {
    let publishers = (0..3)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, 200);
            spec.payload_len = payload_len;
            spec.pace = pace;
            Publisher::start(ws.addr, spec)
        })
        .collect();
    Publishing(publishers)
}

/// Publishers at work ([`publish_600`]).
struct Publishing(Vec<Publisher>);

impl Publishing {
    fn done(&self) -> bool {
        self.0.iter().all(Publisher::done)
    }

    /// Waits for every publisher to finish: what was acked.
    fn join(self) -> HashSet<(u32, u64)> {
        join_all(self.0)
    }
}

fn join_all(publishers: Vec<Publisher>) -> HashSet<(u32, u64)> {
    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(60));
        assert!(st.anomalies.is_empty(), "{:?}", st.anomalies);
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    assert_eq!(want.len(), 600);
    want
}

/// Waits (bounded) until the decoded events hold every id in `want`; returns the analysis
/// of everything received by then, the events per batch, and whether all arrived.
fn collect(
    collector: &Collector,
    want: &HashSet<(u32, u64)>,
    case: Case,
    timeout: Duration,
) -> (Analysis, Vec<usize>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let (events, _) = decode_batches(&collector.received(), case);
        let got: HashSet<(u32, u64)> = events.iter().filter_map(|r| parse_id(&r.payload)).collect();
        let all = want.is_subset(&got);
        if all || Instant::now() >= deadline {
            collector.wait_quiet(Duration::from_millis(300), Duration::from_secs(5));
            let (events, sizes) = decode_batches(&collector.received(), case);
            return (analyze(&events, ""), sizes, all);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The bridge "cloud"'s sample of `name` in /metrics.
fn bridge_metric(ws: &Waystation, name: &str) -> f64 {
    let (_, body) = http_get(ws.http_addr(), "/metrics");
    metric_sample(&body, &format!("{name}{{bridge=\"cloud\"}}"))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"))
}

/// 3 publishers x 200 QoS 1 messages through a batching bridge: every acknowledged event
/// arrives exactly once, in order, packed into batches; /metrics counts them; over MQTT 5
/// each batch says its content type, encoding and size in properties.
fn run_case(case: Case) {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "batch-collector", "site1/#");
    // Over MQTT 5, a v5 subscriber prints each batch's properties.
    let props = (case.protocol == 5).then(|| {
        MosquittoSub::start(
            upstream.port,
            &["-V", "5", "-q", "1", "-t", "site1/#", "-F", "%t|%C|%P"],
        )
    });
    let ws = start(
        &upstream.address(),
        case,
        "max_events = 50, max_ms = 300",
        "",
    );
    let want = publish_600(&ws, 64, None).join();
    let (a, sizes, all) = collect(&collector, &want, case, Duration::from_secs(30));
    println!(
        "{case:?}: {} events in {} batches {sizes:?}",
        a.total,
        sizes.len()
    );
    a.assert_all_arrived_in_order(all, &want, &format!("{case:?}"));
    assert_eq!(a.unique, want, "exactly what was acknowledged");
    assert_eq!(a.duplicates, 0, "no reconnect: each event once");
    assert!(sizes.iter().all(|n| (1..=50).contains(n)), "{sizes:?}");
    assert!(sizes.len() * 2 <= a.total, "events were batched: {sizes:?}");
    assert_eq!(
        bridge_metric(&ws, "waystation_pipeline_batched_events_total"),
        600.0
    );
    assert_eq!(
        bridge_metric(&ws, "waystation_pipeline_batches_total"),
        sizes.len() as f64
    );
    let input = bridge_metric(&ws, "waystation_pipeline_batch_input_bytes_total");
    let output = bridge_metric(&ws, "waystation_pipeline_batch_output_bytes_total");
    assert_eq!(input, 600.0 * (10.0 + 64.0), "topic + payload bytes");
    let sent: usize = collector.received().iter().map(|r| r.payload.len()).sum();
    assert_eq!(output, sent as f64, "the PUBLISH payload bytes");
    if case.compress.is_some() {
        assert!(output < input, "compressed: {output} of {input}");
    }
    if let Some(sub) = props {
        check_v5_properties(&sub, case, &sizes);
    }
}

/// Each batch's MQTT 5 properties, as `mosquitto_sub -F '%t|%C|%P'` prints them.
fn check_v5_properties(sub: &MosquittoSub, case: Case, sizes: &[usize]) {
    let (lines, _) = sub.collect(sizes.len(), Duration::from_secs(10));
    assert_eq!(lines.len(), sizes.len(), "{lines:?}");
    let content_type = match case.encoding {
        "json-array" => "application/json",
        _ => "application/x-ndjson",
    };
    for (line, n) in lines.iter().zip(sizes) {
        let want = format!("{BATCH_TOPIC}|{content_type}|");
        assert!(line.starts_with(&want), "{line}");
        assert!(line.contains(&format!("batch-events:{n}")), "{line}");
        match case.compress {
            Some(c) => assert!(line.contains(&format!("content-encoding:{c}")), "{line}"),
            None => assert!(!line.contains("content-encoding"), "{line}"),
        }
    }
}

#[test]
fn v4_json_array_uncompressed() {
    run_case(Case {
        protocol: 4,
        encoding: "json-array",
        compress: None,
    });
}

#[test]
fn v4_ndjson_zstd() {
    run_case(Case {
        protocol: 4,
        encoding: "ndjson",
        compress: Some("zstd"),
    });
}

#[test]
fn v4_json_array_gzip() {
    run_case(Case {
        protocol: 4,
        encoding: "json-array",
        compress: Some("gzip"),
    });
}

#[test]
fn v5_ndjson_uncompressed() {
    run_case(Case {
        protocol: 5,
        encoding: "ndjson",
        compress: None,
    });
}

#[test]
fn v5_json_array_zstd() {
    run_case(Case {
        protocol: 5,
        encoding: "json-array",
        compress: Some("zstd"),
    });
}

#[test]
fn v5_ndjson_gzip() {
    run_case(Case {
        protocol: 5,
        encoding: "ndjson",
        compress: Some("gzip"),
    });
}

/// SIGKILL while batches are gathered and forwarded, the upstream up all along: large,
/// slow-filling batches (up to 1,000 events or 3 s) mean each kill finds acknowledged events
/// that exist only in the log (the pending batch is memory only). After each restart the
/// bridge starts from its durable cursor: every acknowledged event arrives, duplicates are
/// counted, none is lost.
#[test]
fn sigkill_while_batching_loses_no_acknowledged_event() {
    const TRIALS: usize = 6;
    let case = Case {
        protocol: 4,
        encoding: "ndjson",
        compress: Some("zstd"),
    };
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "batch-crash-collector", "site1/#");
    let batch = "max_events = 1000, max_ms = 3000";
    let mut ws = start(&upstream.address(), case, batch, "max_inflight = 1000");
    let mut publishers: Vec<Publisher> = (0..4)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, 0);
            spec.count = None;
            spec.window = 10;
            spec.payload_len = 48;
            spec.pace = Some(Duration::from_millis(4));
            spec.reconnect = true;
            Publisher::start(ws.addr, spec)
        })
        .collect();
    let mut backlogs = Vec::new();
    for trial in 0..TRIALS {
        std::thread::sleep(Duration::from_millis(700 + 150 * trial as u64));
        let acked = acked_ids(&publishers);
        let (events, _) = decode_batches(&collector.received(), case);
        let seen: HashSet<(u32, u64)> =
            events.iter().filter_map(|r| parse_id(&r.payload)).collect();
        backlogs.push(acked.difference(&seen).count());
        ws.kill();
        ws.restart();
    }
    std::thread::sleep(Duration::from_millis(500));
    let want = stop_all(&mut publishers);
    let (a, sizes, all) = collect(&collector, &want, case, Duration::from_secs(60));
    println!(
        "batch crash: {TRIALS} SIGKILLs, acked {}, received {} events in {} batches ({} unique, \
         {} duplicates); acknowledged-not-upstream at each kill {backlogs:?}",
        want.len(),
        a.total,
        sizes.len(),
        a.unique.len(),
        a.duplicates
    );
    assert!(
        backlogs.iter().filter(|b| **b > 0).count() >= TRIALS / 2,
        "most kills must find acknowledged events not yet upstream, else the test proves \
         nothing: {backlogs:?}"
    );
    a.assert_all_arrived_in_order(all, &want, "SIGKILLs while batching");
}

/// A batching bridge to an upstream behind the link simulator (150 ms each way).
struct SlowLink {
    collector: Collector,
    sim: waystation_linksim::LinkSim,
    ws: Waystation,
    // Dropped last: the collector and the simulator talk to it.
    _upstream: Upstream,
}

fn slow_link(case: Case, seed: u64, batch: &str, extra: &str) -> SlowLink {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, &format!("batch-slow-{seed}"), "site1/#");
    let sim = link(
        upstream.port,
        Duration::from_millis(150),
        Duration::ZERO,
        seed,
    );
    let ws = start(&sim_address(&sim), case, batch, extra);
    SlowLink {
        collector,
        sim,
        ws,
        _upstream: upstream,
    }
}

/// Batches over a slow link (150 ms each way, the link simulator): all 600 events arrive
/// once, in order, in batches.
#[test]
fn batches_over_a_150_ms_link() {
    let case = Case {
        protocol: 5,
        encoding: "json-array",
        compress: Some("zstd"),
    };
    let batch = "max_events = 100, max_ms = 500";
    let l = slow_link(case, 15, batch, "max_inflight = 300");
    let want = publish_600(&l.ws, 24, None).join();
    let (a, sizes, all) = collect(&l.collector, &want, case, Duration::from_secs(60));
    println!("150 ms link: {} events in batches {sizes:?}", a.total);
    a.assert_all_arrived_in_order(all, &want, "150 ms link");
    assert_eq!(a.unique, want);
    assert_eq!(a.duplicates, 0, "no reconnect: each event once");
    assert!(sizes.len() * 2 <= a.total, "batched: {sizes:?}");
}

/// The connection is reset (the link simulator, 150 ms each way) while a batch waits for its
/// PUBACK, a few times: the bridge reconnects and sends the unacknowledged batch again (DUP,
/// same bytes); every acknowledged event arrives, in order, duplicates counted.
#[test]
fn batches_in_flight_when_the_link_resets_are_sent_again() {
    let case = Case {
        protocol: 4,
        encoding: "json-array",
        compress: Some("gzip"),
    };
    fault_while_batches_in_flight(case, 16, "reset", 3, |sim| sim.handle().reset_all());
}

/// The same with a link that goes silent instead ("zombie": a NAT or carrier dropped its
/// state; nothing closes, nothing arrives): the bridge's keep-alive (5 s, a PINGREQ after half
/// of it while a batch waits) gives the connection up and the batch goes again on the next.
#[test]
fn batches_in_flight_when_the_link_goes_silent_are_sent_again() {
    let case = Case {
        protocol: 5,
        encoding: "ndjson",
        compress: Some("zstd"),
    };
    fault_while_batches_in_flight(case, 17, "zombie", 2, |sim| sim.handle().zombie_all());
}

/// Publishes 600 events (one each 10 ms) through a batching bridge over a 150 ms link and
/// strikes the link with `fault` up to `faults` times, each while a batch awaits its PUBACK,
/// waiting for the bridge to reconnect after each; then every acknowledged event must arrive
/// upstream, in order, and some batch must have been sent again.
fn fault_while_batches_in_flight(
    case: Case,
    seed: u64,
    name: &str,
    faults: usize,
    fault: impl Fn(&waystation_linksim::LinkSim),
) {
    let batch = "max_events = 50, max_ms = 200";
    let l = slow_link(case, seed, batch, "max_inflight = 200");
    let ws = &l.ws;
    let publishing = publish_600(ws, 24, Some(Duration::from_millis(10)));
    let mut struck = 0;
    while struck < faults && !publishing.done() {
        // A batch PUBLISH is unacknowledged (its PUBACK is 300 ms away): strike now.
        let in_flight = wait_until(Duration::from_secs(10), || {
            bridge_metric(ws, "waystation_bridge_inflight") > 0.0
        });
        if in_flight {
            let connected = || ws.logs().matches("upstream connected").count();
            let before = connected();
            fault(&l.sim);
            struck += 1;
            // A zombie is given up within 1.5 x keep_alive (7.5 s), then a back-off.
            assert!(
                wait_until(Duration::from_secs(20), || connected() > before),
                "no reconnect after the {name}:\n{}",
                ws.logs()
            );
            std::thread::sleep(Duration::from_millis(400));
        }
    }
    let want = publishing.join();
    let (a, sizes, all) = collect(&l.collector, &want, case, Duration::from_secs(60));
    let resent = ws
        .logs()
        .matches("sending unacknowledged messages again")
        .count();
    println!(
        "{name} x {struck}: {} events in {} batches, {} duplicates; batches sent again after {resent} reconnects",
        a.total,
        sizes.len(),
        a.duplicates
    );
    a.assert_all_arrived_in_order(all, &want, &format!("{name}s while batches were in flight"));
    assert!(
        struck > 0 && resent > 0,
        "no batch was in flight at a {name}: proves nothing"
    );
}
