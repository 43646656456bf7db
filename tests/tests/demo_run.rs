//! Issue 5: `waystation demo` runs the whole story in one process (sensors, edge broker with
//! its store, a bridge, rumqttd as the cloud, an outage part-way) and checks itself: a short
//! run ends with "none lost" and exit 0.

use std::process::Command;
use std::time::Duration;

use waystation_e2e::{run_with_timeout, waystation_bin};

fn field(summary: &str, name: &str) -> Option<u64> {
    let line = summary.lines().find(|l| l.trim_start().starts_with(name))?;
    line.trim_start()[name.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn demo_15_seconds_with_an_outage_loses_nothing() {
    let (status, out) = run_with_timeout(
        Command::new(waystation_bin()).args([
            "demo",
            "--duration",
            "15",
            "--sensors",
            "6",
            "--rate",
            "5",
            "--outage",
            "4",
            "--http",
            "127.0.0.1:0",
        ]),
        Duration::from_secs(150),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "demo exited {status:?}:\n{out}"
    );
    assert!(
        out.contains("CLOUD OUTAGE") && out.contains("cloud is back"),
        "the outage happened:\n{out}"
    );
    assert!(
        out.contains("dashboard     http://127.0.0.1:"),
        "the dashboard address is shown:\n{out}"
    );
    let produced = field(&out, "events produced").expect("produced line");
    assert!(
        produced >= 6 * 5 * 10,
        "6 sensors x 5 events/s x ~15 s: {produced}\n{out}"
    );
    assert_eq!(field(&out, "lost"), Some(0), "{out}");
    let received = out
        .lines()
        .find(|l| l.trim_start().starts_with("received by the cloud"))
        .expect("received line");
    assert!(
        received.contains(&format!(" {produced} unique")),
        "produced = received by the cloud:\n{out}"
    );
    assert!(out.contains("self-check                  PASS"), "{out}");
    let peak = out
        .lines()
        .find(|l| l.contains("backlog peaked at"))
        .expect("outage line");
    let peak: u64 = peak
        .split("backlog peaked at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(peak > 0, "events waited on disk during the outage:\n{out}");
}

#[test]
fn demo_rejects_bad_options() {
    let (status, _) = run_with_timeout(
        Command::new(waystation_bin()).args(["demo", "--sensors", "0"]),
        Duration::from_secs(10),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(2));
}

/// `--uplink-latency 100 --flaky`: the demo's bridge crosses the link simulator (100 ms each
/// way, a reset or a zombie connection every 4-9 s) and still loses nothing; the summary says
/// which faults it survived.
#[test]
fn demo_over_a_flaky_100ms_uplink_loses_nothing() {
    let (status, out) = run_with_timeout(
        Command::new(waystation_bin()).args([
            "demo",
            "--duration",
            "20",
            "--sensors",
            "4",
            "--rate",
            "5",
            "--outage",
            "0",
            "--uplink-latency",
            "100",
            "--flaky",
            "--http",
            "127.0.0.1:0",
        ]),
        Duration::from_secs(150),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "demo exited {status:?}:\n{out}"
    );
    assert!(
        out.contains("uplink        simulated: 100 ms each way, a reset or a zombie"),
        "{out}"
    );
    assert_eq!(field(&out, "lost"), Some(0), "{out}");
    assert!(out.contains("self-check                  PASS"), "{out}");
    let faults = out
        .lines()
        .find(|l| l.contains("simulated uplink"))
        .expect("simulated uplink line");
    let survived: u64 = faults
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok())
        .take(2)
        .sum();
    assert!(
        survived >= 1,
        "20 s with a fault every 4-9 s must apply some: {faults}"
    );
}
