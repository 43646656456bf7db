//! Issue 15, "nothing acknowledged is lost across a SIGKILL at any stage": the whole pipeline
//! at once — simulated firmware sensors publishing, the ingest rule validating and
//! deduplicating, the bridge gathering zstd batches and forwarding them to a real Mosquitto —
//! while the daemon is SIGKILLed and restarted four times under load. The sensors reconnect
//! and resend what was not acknowledged (their resends of events that were are caught by the
//! durable dedup windows); the bridge restarts from its durable cursor. Every event the
//! sensors got a PUBACK for must arrive upstream; copies the bridge itself sends again after a
//! kill are allowed (at least once) and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use waystation_e2e::upstream::{batch_events, Collector, Upstream};
use waystation_e2e::{http_get, wait_until, Waystation};
use waystation_firmware::sim::{run, SimOptions};

const BATCH_TOPIC: &str = "site1/events/batch";

/// (device, boot, seq) -> copies upstream, from every zstd NDJSON batch received.
fn upstream_events(collector: &Collector) -> HashMap<(String, u64, u64), usize> {
    let mut copies = HashMap::new();
    for r in collector.received() {
        assert_eq!(r.topic, format!("{BATCH_TOPIC}/zstd"), "only batches go up");
        for e in batch_events(&r.payload, Some("zstd"), "ndjson") {
            let p = &e["payload"];
            let id = (
                p["device"].as_str().unwrap_or_default().to_string(),
                p["boot"].as_u64().unwrap_or_default(),
                p["seq"].as_u64().unwrap_or_default(),
            );
            *copies.entry(id).or_default() += 1;
        }
    }
    copies
}

#[test]
fn sigkills_under_load_with_every_stage_on_lose_no_acknowledged_event() {
    const KILLS: usize = 4;
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "pipeline-crash-collector", "site1/#");
    let config = format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"{}\"\nkeep_alive = 5\n\
         reconnect = {{ initial_ms = 100, max_ms = 500 }}\n\n\
         [[bridge.forward]]\nlocal = \"sensors/+/events\"\nqos = 1\n\
         batch = {{ max_events = 50, max_ms = 300 }}\nbatch_topic = \"{BATCH_TOPIC}\"\n\
         encoding = \"ndjson\"\ncompress = \"zstd\"\n\n\
         [[pipeline]]\ntopics = \"sensors/+/events\"\nvalidate = \"event-v1\"\ndedup = \"event-v1\"\n",
        upstream.address()
    );
    let mut ws = Waystation::start_with(&config);
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sensors = {
        let (broker, stop) = (ws.addr.to_string(), stop.clone());
        std::thread::spawn(move || {
            run(
                &SimOptions {
                    broker,
                    sensors: 4,
                    rate_hz: 25.0,
                    id_prefix: "crash-".into(),
                    duration: Some(Duration::from_secs(60)),
                    drain_timeout: Duration::from_secs(30),
                    boot: Some(11),
                    keep_alive_s: 5,
                    response_timeout_ms: 500,
                    backoff_max_ms: 200,
                    progress: None,
                },
                &stop,
            )
        })
    };
    // What the bridge had not moved its cursor over at each kill (in a pending batch, in
    // flight, or not read yet): a kill that finds none proves nothing.
    let mut backlogs = Vec::new();
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(900 + 300 * kill as u64));
        let (_, body) = http_get(ws.http_addr(), "/api/v1/status");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        backlogs.push(status["bridges"][0]["backlog"].as_u64().unwrap_or(0));
        ws.kill();
        ws.restart();
    }
    assert!(
        backlogs.iter().filter(|b| **b > 0).count() >= KILLS / 2,
        "most kills must find events not yet forwarded: {backlogs:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let report = sensors.join().expect("sim thread").expect("sim runs");
    assert_eq!((report.dropped, report.pending), (0, 0), "{report:?}");
    assert!(
        report.link_losses >= KILLS as u64,
        "the sensors saw the kills: {report:?}"
    );
    let want: Vec<(String, u64, u64)> = report
        .devices
        .iter()
        .flat_map(|d| (0..d.created).map(|s| (d.id.clone(), u64::from(d.boot), u64::from(s))))
        .collect();
    assert!(want.len() > 200, "{report:?}");
    let arrived = wait_until(Duration::from_secs(60), || {
        let seen = upstream_events(&collector);
        want.iter().all(|id| seen.contains_key(id))
    });
    let seen = upstream_events(&collector);
    let missing: Vec<_> = want.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        arrived && missing.is_empty(),
        "{} acknowledged events lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let copies: usize = seen.values().sum();
    println!(
        "pipeline crash: {KILLS} SIGKILLs (not forwarded at each: {backlogs:?}), {} events acknowledged ({} resent by the sensors), \
         {} copies upstream ({} sent again by the bridge after a kill)",
        want.len(),
        report.resent,
        copies,
        copies - seen.len()
    );
    assert_eq!(
        seen.len(),
        want.len(),
        "only the events the sensors created"
    );
}
