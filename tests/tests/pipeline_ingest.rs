//! Issue 15, the ingest half of the edge pipeline, against the real daemon and a real upstream
//! (Mosquitto):
//! - simulated firmware sensors behind a link that resets (so they resend events whose PUBACK
//!   was lost), a device resending by hand before and after a SIGKILL of the daemon: every
//!   acknowledged event reaches the cloud, each exactly once;
//! - invalid messages are acknowledged, kept as dead letters with their reason (across a
//!   SIGKILL), listed by the API and `waystation dlq`, and replayed after the config is fixed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use waystation_e2e::raw::{publish, Connect, Pkt, RawClient};
use waystation_e2e::upstream::{bridge_toml, Collector, Upstream};
use waystation_e2e::{http_get, metric_sample, wait_until, waystation_bin, Waystation};
use waystation_firmware::sim::{run, SimOptions};
use waystation_linksim::{Chaos, Fault, LinkConfig, LinkSim};

const EVENTS_RULE: &str =
    "[[pipeline]]\ntopics = \"sensors/+/events\"\nvalidate = \"event-v1\"\ndedup = \"event-v1\"\n";

fn event(device: &str, boot: u32, seq: u32) -> String {
    format!(
        r#"{{"v":1,"device":"{device}","boot":{boot},"seq":{seq},"sensor":"temp","value":{},"threshold":30000,"direction":"rising"}}"#,
        30_000 + seq
    )
}

/// Publishes each (topic, payload) at QoS 1 (DUP set if `dup`) and waits for every PUBACK.
fn publish_acked(client: &mut RawClient, messages: &[(String, String)], first_pid: u16, dup: bool) {
    for (i, (topic, payload)) in messages.iter().enumerate() {
        let pid = first_pid + i as u16;
        client.send(&publish(
            topic,
            payload.as_bytes(),
            1,
            false,
            dup,
            Some(pid),
        ));
        match client.recv_timeout(Duration::from_secs(10)) {
            Ok(Pkt::PubAck(p)) if p == pid => {}
            other => panic!("PUBACK {pid} expected for {topic}, got {other:?}"),
        }
    }
}

fn device_events(device: &str, boot: u32, seqs: std::ops::Range<u32>) -> Vec<(String, String)> {
    seqs.map(|s| (format!("sensors/{device}/events"), event(device, boot, s)))
        .collect()
}

/// (device, boot, seq) -> copies that reached the upstream.
fn copies(collector: &Collector) -> HashMap<(String, u64, u64), usize> {
    let mut seen = HashMap::new();
    for r in collector.received() {
        if !r.topic.ends_with("/events") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("JSON upstream");
        let id = (
            v["device"].as_str().unwrap_or_default().to_string(),
            v["boot"].as_u64().unwrap_or_default(),
            v["seq"].as_u64().unwrap_or_default(),
        );
        *seen.entry(id).or_default() += 1;
    }
    seen
}

fn metric(ws: &Waystation, name: &str) -> f64 {
    let (_, body) = http_get(ws.http_addr(), "/metrics");
    metric_sample(&body, name).unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[test]
fn resent_events_reach_the_cloud_once_through_resets_and_a_sigkill() {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "pipeline-collector", "site1/#");
    let config = format!("{}\n{EVENTS_RULE}", bridge_toml(&upstream.address(), ""));
    let mut ws = Waystation::start_with(&config);
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );

    // Simulated sensors on a 10 ms link that resets every 0.3-0.9 s: each reset loses
    // PUBACKs in flight, and the firmware sends those events again (DUP) on reconnecting.
    let link = LinkSim::start(LinkConfig {
        target: ws.addr.to_string(),
        up_latency: Duration::from_millis(10),
        down_latency: Duration::from_millis(10),
        seed: 15,
        ..LinkConfig::default()
    })
    .expect("link simulator");
    let chaos = link.handle().start_chaos(Chaos {
        seed: 15,
        min_interval: Duration::from_millis(300),
        max_interval: Duration::from_millis(900),
        kinds: vec![Fault::Reset],
    });
    let report = run(
        &SimOptions {
            broker: link.local_addr().to_string(),
            sensors: 3,
            rate_hz: 20.0,
            id_prefix: "dd-".into(),
            duration: Some(Duration::from_secs(4)),
            drain_timeout: Duration::from_secs(30),
            boot: Some(7),
            keep_alive_s: 5,
            response_timeout_ms: 500,
            backoff_max_ms: 200,
            progress: None,
        },
        &AtomicBool::new(false),
    )
    .expect("sim runs");
    drop(chaos);
    assert_eq!((report.dropped, report.pending), (0, 0), "{report:?}");
    assert!(
        report.link_losses > 0 && report.resent > 0,
        "the link must have forced resends: {report:?}"
    );

    // A device resending by hand: seqs 0..20, then 10..20 again after a reconnect (DUP).
    let mut device = RawClient::connect(ws.addr, "dd-raw");
    publish_acked(&mut device, &device_events("dd-raw", 3, 0..20), 1, false);
    drop(device);
    let mut device = RawClient::connect(ws.addr, "dd-raw");
    publish_acked(&mut device, &device_events("dd-raw", 3, 10..20), 1, true);
    collector.wait_quiet(Duration::from_secs(1), Duration::from_secs(30));
    let duplicates_before_kill = metric(&ws, "waystation_pipeline_duplicates_total");
    assert!(duplicates_before_kill >= 10.0, "{duplicates_before_kill}");

    // SIGKILL, then the device resends what it may not have had acknowledged, and goes on.
    ws.kill();
    ws.restart();
    let mut device = RawClient::connect(ws.addr, "dd-raw");
    publish_acked(&mut device, &device_events("dd-raw", 3, 15..25), 100, true);
    let mut want: Vec<(String, u64, u64)> = (0..25).map(|s| ("dd-raw".to_string(), 3, s)).collect();
    for d in &report.devices {
        want.extend((0..d.created).map(|s| (d.id.clone(), u64::from(d.boot), u64::from(s))));
    }
    assert!(
        wait_until(Duration::from_secs(30), || {
            let seen = copies(&collector);
            want.iter().all(|id| seen.contains_key(id))
        }),
        "not every acknowledged event arrived upstream"
    );
    collector.wait_quiet(Duration::from_secs(1), Duration::from_secs(30));
    let seen = copies(&collector);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "events forwarded more than once: {twice:?}"
    );
    assert_eq!(seen.len(), want.len(), "only the events sent, each once");
    // After the restart the windows came back from disk: the 5 resends were caught.
    assert!(metric(&ws, "waystation_pipeline_duplicates_total") >= 5.0);
}

/// POST with a JSON body from this machine: (status, body).
fn post(addr: SocketAddr, path: &str, content_type: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

fn dlq(ws: &Waystation, args: &[&str]) -> (bool, String) {
    let out = Command::new(waystation_bin())
        .arg("dlq")
        .arg("--http")
        .arg(ws.http_addr().to_string())
        .args(args)
        .output()
        .expect("run waystation dlq");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn dead_letters(ws: &Waystation) -> serde_json::Value {
    let (code, body) = http_get(ws.http_addr(), "/api/v1/dead-letters");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

#[test]
fn invalid_messages_are_dead_lettered_and_replayed_after_the_config_is_fixed() {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "dlq-collector", "site1/#");
    // The mistake: event-v1 checked on all of sensors/#, status messages included.
    let wrong = format!(
        "{}\n[[pipeline]]\ntopics = \"sensors/#\"\nvalidate = \"event-v1\"\n",
        bridge_toml(&upstream.address(), "")
    );
    let mut ws = Waystation::start_with(&wrong);
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );
    let mut client = RawClient::connect_ok(ws.addr, &Connect::new("dev-1")).0;
    let good: Vec<(String, String)> = device_events("dev-1", 1, 0..3);
    let bad = vec![
        ("sensors/dev-1/status".to_string(), "online".to_string()),
        (
            "sensors/dev-1/events".to_string(),
            "not json at all".to_string(),
        ),
        (
            "sensors/dev-1/events".to_string(),
            event("dev-1", 1, 9).replace("\"v\":1", "\"v\":2"),
        ),
        ("sensors/dev-1/events".to_string(), event("dev-2", 1, 9)),
        (
            "sensors/dev-1/events".to_string(),
            event("dev-1", 1, 9).replace("\"value\":30009", "\"value\":\"hot\""),
        ),
    ];
    publish_acked(&mut client, &good, 1, false);
    publish_acked(&mut client, &bad, 10, false); // acknowledged: kept, as dead letters
    drop(client);
    assert!(wait_until(Duration::from_secs(10), || copies(&collector)
        .len()
        == 3));
    collector.wait_quiet(Duration::from_secs(1), Duration::from_secs(10));
    assert_eq!(collector.count(), 3, "only the valid events go upstream");

    let listed = dead_letters(&ws);
    assert_eq!(listed["total"], 5, "{listed}");
    let reasons: Vec<&str> = listed["dead_letters"]
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        reasons,
        [
            "not_json",
            "not_json",
            "unknown_version",
            "device_mismatch",
            "wrong_type"
        ]
    );
    assert_eq!(listed["dead_letters"][0]["payload"], "online");
    assert_eq!(listed["dead_letters"][0]["origin"], "dev-1");
    assert_eq!(
        metric(
            &ws,
            "waystation_pipeline_invalid_total{reason=\"not_json\"}"
        ),
        2.0
    );
    assert_eq!(metric(&ws, "waystation_dead_letters"), 5.0);

    // Acknowledged means kept: the dead letters survive a SIGKILL.
    ws.kill();
    ws.restart();
    let (ok, table) = dlq(&ws, &["list"]);
    assert!(ok, "{table}");
    assert!(table.starts_with("5 dead letter(s)"), "{table}");
    for needle in [
        "unknown_version",
        "sensors/dev-1/status",
        "device_mismatch",
        "schema version 2 is not 1",
    ] {
        assert!(table.contains(needle), "{needle} not in:\n{table}");
    }
    // Changes are refused without a JSON content type, and purge needs ids or --all.
    let (code, _) = post(
        ws.http_addr(),
        "/api/v1/dead-letters/purge",
        "text/plain",
        "{\"all\":true}",
    );
    assert_eq!(code, 415);
    let (ok, text) = dlq(&ws, &["purge"]);
    assert!(!ok && text.contains("--all"), "{text}");

    // The fix: event-v1 on the event topics only. Replay: the status message passes now,
    // the broken events are refused again (new dead letters).
    ws.set_extra_config(&format!(
        "{}\n[[pipeline]]\ntopics = \"sensors/+/events\"\nvalidate = \"event-v1\"\n",
        bridge_toml(&upstream.address(), "")
    ));
    ws.restart();
    let (ok, text) = dlq(&ws, &["replay"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("replayed 1") && text.contains("refused again 4"),
        "{text}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || collector.received().iter().any(
            |r| r.topic == "site1/sensors/dev-1/status" && r.payload == b"online"
        )),
        "the replayed status message must reach the upstream"
    );
    let listed = dead_letters(&ws);
    assert_eq!(listed["total"], 4, "{listed}");
    assert_eq!(metric(&ws, "waystation_dead_letters_replayed_total"), 1.0);

    // Purge one by id, then the rest.
    let first = listed["dead_letters"][0]["id"].as_u64().expect("id");
    let (ok, text) = dlq(&ws, &["purge", &first.to_string()]);
    assert!(ok && text.contains("purged 1"), "{text}");
    let (ok, text) = dlq(&ws, &["purge", "--all"]);
    assert!(ok && text.contains("purged 3"), "{text}");
    assert_eq!(dead_letters(&ws)["total"], 0);
    ws.restart();
    assert_eq!(dead_letters(&ws)["total"], 0, "purged for good");
}

#[test]
fn a_json_schema_rule_forwards_what_conforms_and_dead_letters_the_rest() {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "schema-collector", "site1/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = dir.path().join("reading.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["tank", "level"],
            "properties": {"tank": {"type": "string"}, "level": {"type": "number", "minimum": 0, "maximum": 100}}}"#,
    )
    .expect("write schema");
    let config = format!(
        "{}\n[[pipeline]]\ntopics = \"sensors/+/level\"\nvalidate = {{ json_schema = \"{}\" }}\n",
        bridge_toml(&upstream.address(), ""),
        schema.display()
    );
    let ws = Waystation::start_with(&config);
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );
    let mut client = RawClient::connect(ws.addr, "tank-1");
    let messages: Vec<(String, String)> = [
        r#"{"tank":"t1","level":40.5}"#,
        r#"{"tank":"t1","level":140}"#,
        r#"{"level":3}"#,
        r#"{"tank":"t1","level":41}"#,
    ]
    .iter()
    .map(|p| ("sensors/tank-1/level".to_string(), p.to_string()))
    .collect();
    publish_acked(&mut client, &messages, 1, false);
    assert!(wait_until(Duration::from_secs(10), || collector.count() == 2));
    collector.wait_quiet(Duration::from_secs(1), Duration::from_secs(10));
    let forwarded: Vec<Vec<u8>> = collector
        .received()
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(
        forwarded,
        [messages[0].1.as_bytes(), messages[3].1.as_bytes()],
        "the conforming readings, in order"
    );
    let listed = dead_letters(&ws);
    assert_eq!(listed["total"], 2, "{listed}");
    let letters = listed["dead_letters"].as_array().expect("array");
    assert!(
        letters.iter().all(|d| d["reason"] == "schema_violation"),
        "{listed}"
    );
    assert!(
        letters[0]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("/level"),
        "{listed}"
    );
    assert!(
        letters[1]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("tank"),
        "{listed}"
    );
    assert_eq!(
        metric(
            &ws,
            "waystation_pipeline_invalid_total{reason=\"schema_violation\"}"
        ),
        2.0
    );
}
