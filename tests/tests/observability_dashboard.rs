//! Issue 5: the dashboard in real Chromium (Debian's `chromium`, headless) against a running
//! gateway with simulated firmware sensors publishing and a bridge forwarding to rumqttd.
//! The page's script writes what it drew into data attributes (`data-sensor-count` on the
//! body, `data-points` on each chart, `data-pipeline-*` on the pipeline panel); the tests read
//! them from the DOM Chromium dumps, and save screenshots (their paths are printed).
//!
//! Issue 15: the pipeline panel, with a `[[pipeline]]` rule that validates and deduplicates
//! and a forward rule that batches and compresses, shows the same numbers as the status API.

mod observability_common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use observability_common::{get, start_rumqttd, Gateway};
use waystation_e2e::raw::RawClient;
use waystation_e2e::{wait_until, wait_with_timeout, waystation_bin};
use waystation_firmware::sim::{run, SimOptions};

const SENSORS: usize = 5;

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("chromium is not installed (scripts/test.sh installs Debian's chromium)")
}

/// Chromium with the flags that keep it quiet, local and deterministic enough for a test.
fn chromium_command(profile: &std::path::Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    c
}

/// Runs chromium in its own process group (it starts helpers), returns (exit, stdout), and
/// kills whatever of the group is left.
fn run_quiet(cmd: &mut Command, timeout: Duration) -> (Option<std::process::ExitStatus>, String) {
    use std::os::unix::process::CommandExt;
    // One Chromium at a time: the tests of this file run in parallel on small machines.
    static CHROMIUM: Mutex<()> = Mutex::new(());
    let _one = CHROMIUM.lock().unwrap_or_else(|p| p.into_inner());
    let mut child = cmd
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn chromium");
    let pgid = child.id() as i32;
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let status = wait_with_timeout(&mut child, timeout);
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    (status, reader.join().unwrap_or_default())
}

fn attr(dom: &str, element_marker: &str, name: &str) -> Option<String> {
    let start = dom.find(element_marker)?;
    let tag_end = start + dom[start..].find('>')?;
    let tag = &dom[dom[..start].rfind('<')?..tag_end];
    let key = format!("{name}=\"");
    let v = tag.split(&key).nth(1)?;
    Some(v[..v.find('"')?].to_string())
}

/// The page as Chromium left it after a few seconds of (virtual) time.
fn dump_dom(profile: &std::path::Path, url: &str) -> String {
    let (status, dom) = run_quiet(
        chromium_command(profile).arg("--dump-dom").arg(url),
        Duration::from_secs(90),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "chromium --dump-dom failed: {status:?}\n{dom}"
    );
    dom
}

/// A screenshot to look at, kept under target/<profile>/observability/`name`.
fn screenshot(profile: &std::path::Path, url: &str, name: &str, window: &str) {
    let shot_dir = waystation_bin()
        .parent()
        .expect("target/<profile>")
        .join("observability");
    std::fs::create_dir_all(&shot_dir).expect("screenshot dir");
    let shot = shot_dir.join(name);
    let _ = std::fs::remove_file(&shot);
    let (status, out) = run_quiet(
        chromium_command(profile)
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("--window-size={window}"))
            .arg(url),
        Duration::from_secs(90),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "chromium --screenshot failed: {status:?}\n{out}"
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real PNG ({} bytes)",
        png.len()
    );
    println!("dashboard screenshot: {}", shot.display());
    eprintln!("dashboard screenshot: {}", shot.display());
}

#[test]
fn dashboard_in_chromium_shows_sensors_and_charts_with_data() {
    let upstream = start_rumqttd();
    let bridge = format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{upstream}\"\n[[bridge.forward]]\nlocal = \"sensors/+/events\"\nremote_prefix = \"site1/\"\n"
    );
    let gw = Gateway::start(&[], "sys_interval = 1", &bridge);

    let stop = Arc::new(AtomicBool::new(false));
    let sim_stop = stop.clone();
    let options = SimOptions {
        broker: gw.mqtt.to_string(),
        sensors: SENSORS,
        rate_hz: 4.0,
        id_prefix: "dash-".into(),
        duration: Some(Duration::from_secs(120)),
        drain_timeout: Duration::from_secs(5),
        boot: Some(1),
        progress: None,
        ..SimOptions::default()
    };
    let sim = std::thread::spawn(move || run(&options, &sim_stop));

    // Every sensor connected and published, and the bridge forwarded something.
    let ready = wait_until(Duration::from_secs(30), || {
        let (_, _, body) = get(gw.http, "/api/v1/status");
        let s: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let publishing = s["clients"].as_array().map_or(0, |c| {
            c.iter().filter(|c| !c["last_publish"].is_null()).count()
        });
        publishing == SENSORS && s["bridges"][0]["forwarded"].as_u64().unwrap_or(0) > 0
    });
    assert!(ready, "sensors never all published through the bridge");
    // Let the gateway's one-a-second history fill a little (the charts start from it).
    let history = wait_until(Duration::from_secs(30), || {
        let (_, _, body) = get(gw.http, "/api/v1/history");
        let h: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        h["samples"].as_array().is_some_and(|s| s.len() >= 10)
    });
    assert!(history, "/api/v1/history never held 10 samples");

    let profile = tempfile::tempdir().expect("profile dir");
    let url = gw.url("/");
    let dom = dump_dom(profile.path(), &url);
    let sensors = attr(&dom, "<body", "data-sensor-count");
    assert_eq!(
        sensors.as_deref(),
        Some(SENSORS.to_string().as_str()),
        "sensor count on the page:\n{dom}"
    );
    let polls: u32 = attr(&dom, "<body", "data-polls")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(
        polls >= 3,
        "the page polled the status API {polls} times:\n{dom}"
    );
    for chart in ["chart-ingest", "chart-forward", "chart-backlog"] {
        let points: u32 = attr(&dom, &format!("id=\"{chart}\""), "data-points")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(points >= 8, "{chart} has {points} points:\n{dom}");
    }
    for i in 0..SENSORS {
        let row = format!("data-client=\"dash-{i:04}\"");
        assert!(dom.contains(&row), "sensor row {row} missing:\n{dom}");
    }
    assert!(
        dom.contains("sensors/dash-0000/"),
        "last event topic shown:\n{dom}"
    );
    assert!(
        dom.contains("data-bridge=\"cloud\"") && dom.contains("data-connected=\"true\""),
        "bridge row:\n{dom}"
    );
    assert!(dom.contains("class=\"badge ok\""), "healthy badge:\n{dom}");

    screenshot(profile.path(), &url, "dashboard.png", "1280,900");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let report = sim.join().expect("sim thread").expect("sim ran");
    assert_eq!(report.pending, 0, "{report:?}");
}

/// Invalid messages the pipeline test publishes: (topic, payload), and the reasons they add
/// up to on the panel (`data-pipeline-invalid-by-reason`, reasons in label order).
const INVALID: [(&str, &str); 3] = [
    ("sensors/x/events", "not json"),
    ("sensors/x/events", "{\"v\":1,"),
    (
        "sensors/dash-raw/events",
        r#"{"v":2,"device":"dash-raw","boot":1,"seq":9,"sensor":"temp","value":1,"threshold":0,"direction":"rising"}"#,
    ),
];
const INVALID_BY_REASON: &str = "not_json=2,unknown_version=1";
const RESENT_EVENT: &str = r#"{"v":1,"device":"dash-raw","boot":1,"seq":1,"sensor":"temp","value":31000,"threshold":30000,"direction":"rising"}"#;

fn status(gw: &Gateway) -> serde_json::Value {
    let (code, _, body) = get(gw.http, "/api/v1/status");
    assert_eq!(code, 200, "/api/v1/status: {body}");
    serde_json::from_str(&body).expect("status JSON")
}

#[test]
fn dashboard_in_chromium_shows_the_pipeline_counters_the_status_api_has() {
    let upstream = start_rumqttd();
    let config = format!(
        "[[pipeline]]\ntopics = \"sensors/+/events\"\nvalidate = \"event-v1\"\ndedup = \"event-v1\"\n\n\
         [[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{upstream}\"\n\
         [[bridge.forward]]\nlocal = \"sensors/+/events\"\nbatch = {{ max_events = 20, max_ms = 200 }}\n\
         batch_topic = \"site1/batches\"\ncompress = \"zstd\"\n"
    );
    let gw = Gateway::start(&[], "", &config);

    // Valid events from simulated sensors (they end, and their outboxes drain, before the
    // page is read, so the numbers hold still), then invalid ones and one event sent twice.
    let options = SimOptions {
        broker: gw.mqtt.to_string(),
        sensors: SENSORS,
        rate_hz: 10.0,
        id_prefix: "pipe-".into(),
        duration: Some(Duration::from_secs(3)),
        drain_timeout: Duration::from_secs(10),
        boot: Some(1),
        progress: None,
        ..SimOptions::default()
    };
    let report = run(&options, &AtomicBool::new(false)).expect("sim ran");
    assert!(report.acknowledged > 0 && report.pending == 0, "{report:?}");
    let mut raw = RawClient::connect(gw.mqtt, "dash-raw");
    // Each is acknowledged (the pipeline keeps what it refuses, and a resend is dropped
    // only once its first copy is in the log).
    let mut messages: Vec<(&str, &str)> = INVALID.to_vec();
    messages.extend([("sensors/dash-raw/events", RESENT_EVENT); 2]);
    for (pid, (topic, payload)) in (1..).zip(messages) {
        raw.publish1(topic, payload.as_bytes(), false, pid);
    }
    raw.send(&waystation_e2e::raw::disconnect());

    // Every valid event went up in a batch (the last one within max_ms of its first event).
    let mut settled = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        settled = status(&gw);
        let p = &settled["pipeline"];
        p["invalid"] == INVALID.len()
            && p["dead_letters"] == INVALID.len()
            && p["duplicates"].as_u64() >= Some(1)
            && p["valid"] == report.acknowledged + 1
            && p["batched_events"] == p["valid"]
            && settled["bridges"][0]["backlog"] == 0
    });
    assert!(ok, "the pipeline's counters never settled: {settled:#}");
    let p = settled["pipeline"].clone();
    assert!(p["batches"].as_u64() > Some(0), "{p:#}");
    assert!(
        p["bytes_saved"].as_u64() > Some(0),
        "zstd saved nothing: {p:#}"
    );

    let profile = tempfile::tempdir().expect("profile dir");
    let url = gw.url("/");
    let dom = dump_dom(profile.path(), &url);
    let after = status(&gw)["pipeline"].clone();
    assert_eq!(after, p, "the counters moved while the page was read");
    let panel = |name: &str| -> u64 {
        attr(&dom, "id=\"pipeline\"", &format!("data-pipeline-{name}"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no data-pipeline-{name} on the pipeline panel:\n{dom}"))
    };
    for (attribute, key) in [
        ("valid", "valid"),
        ("invalid", "invalid"),
        ("duplicates", "duplicates"),
        ("dead-letters", "dead_letters"),
        ("dead-letter-bytes", "dead_letter_bytes"),
        ("batches", "batches"),
        ("batched-events", "batched_events"),
        ("bytes-saved", "bytes_saved"),
    ] {
        assert_eq!(
            Some(panel(attribute)),
            p[key].as_u64(),
            "data-pipeline-{attribute} against the status API's pipeline.{key} ({p:#}):\n{dom}"
        );
    }
    assert!(panel("valid") > 0 && panel("duplicates") >= 1 && panel("batches") > 0);
    assert_eq!(panel("invalid"), INVALID.len() as u64);
    assert_eq!(panel("dead-letters"), INVALID.len() as u64);
    assert!(panel("bytes-saved") > 0);
    assert_eq!(
        attr(&dom, "id=\"pipeline\"", "data-pipeline-invalid-by-reason").as_deref(),
        Some(INVALID_BY_REASON),
        "the by-reason breakdown:\n{dom}"
    );
    // What a person sees: the breakdown, and where to look at the dead letters.
    assert!(
        dom.contains("not json 2, unknown version 1"),
        "by-reason text:\n{dom}"
    );
    assert!(
        dom.contains("<code>waystation dlq list</code>"),
        "dead letter hint:\n{dom}"
    );
    screenshot(profile.path(), &url, "dashboard-pipeline.png", "1280,1000");
}
