//! Issue 5: the dashboard in real Chromium (Debian's `chromium`, headless) against a running
//! gateway with simulated firmware sensors publishing and a bridge forwarding to rumqttd.
//! The page's script writes what it drew into data attributes (`data-sensor-count` on the
//! body, `data-points` on each chart); the test reads them from the DOM Chromium dumps, and
//! saves a screenshot (its path is printed).

mod observability_common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use observability_common::{get, start_rumqttd, Gateway};
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
    let (status, dom) = run_quiet(
        chromium_command(profile.path()).arg("--dump-dom").arg(&url),
        Duration::from_secs(90),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "chromium --dump-dom failed: {status:?}\n{dom}"
    );
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

    // A screenshot to look at (kept under target/).
    let shot_dir = waystation_bin()
        .parent()
        .expect("target/<profile>")
        .join("observability");
    std::fs::create_dir_all(&shot_dir).expect("screenshot dir");
    let shot = shot_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let (status, out) = run_quiet(
        chromium_command(profile.path())
            .arg(format!("--screenshot={}", shot.display()))
            .arg("--window-size=1280,900")
            .arg(&url),
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

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let report = sim.join().expect("sim thread").expect("sim ran");
    assert_eq!(report.pending, 0, "{report:?}");
}
