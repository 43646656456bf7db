//! The firmware against the real `waystation` daemon (firmware_sim.rs and firmware_qemu.rs run
//! the same checks against Debian's mosquitto):
//! - simulated sensors (the real firmware state machine over TCP, in-process and through the
//!   `waystation sim` subcommand): every event reaches a subscriber;
//! - the daemon killed (SIGKILL) and started again on the same port and data directory under
//!   them: no acknowledged event is lost, the outboxes drain after the reconnect;
//! - the QEMU board with its UART on waystation's listener: its events arrive, and a retained
//!   `sensors/<id>/config` threshold change takes effect.

mod firmware_common;

use firmware_common::{all_arrived, build_board, publish, statuses, Qemu, Subscriber};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use waystation_e2e::{wait_until, waystation_bin, Waystation};
use waystation_firmware::sim::{run, SimOptions};

const BOOT: u32 = 9;

fn opts(broker: String, prefix: &str, sensors: usize, secs: u64) -> SimOptions {
    SimOptions {
        broker,
        sensors,
        rate_hz: 10.0,
        id_prefix: prefix.into(),
        duration: Some(Duration::from_secs(secs)),
        drain_timeout: Duration::from_secs(30),
        boot: Some(BOOT),
        keep_alive_s: 5,
        response_timeout_ms: 1_000,
        backoff_max_ms: 500,
        progress: None,
    }
}

#[test]
fn simulated_sensors_through_waystation() {
    let ws = Waystation::start();
    let sub = Subscriber::start(ws.port(), "fw-ws-sub-1", "sensors/+/events");
    let status = Subscriber::start(ws.port(), "fw-ws-status-1", "sensors/+/status");
    let report = run(
        &opts(ws.addr.to_string(), "fwws-", 4, 3),
        &AtomicBool::new(false),
    )
    .expect("sim runs");
    assert!(
        report.created >= 4 * 20,
        "10 events/s x 4 sensors x 3 s: {report:?}"
    );
    assert_eq!(report.acknowledged, report.created, "{report:?}");
    assert_eq!((report.dropped, report.pending), (0, 0), "{report:?}");
    assert_eq!(report.link_losses, 0, "{report:?}");
    all_arrived(&sub, &report, BOOT as u64);
    // Each device announced itself online (retained) and said offline when it stopped.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = status.snapshot();
            (0..4).all(|i| {
                let t = format!("sensors/fwws-{i:04}/status");
                m.iter().any(|x| x.topic == t && x.payload == b"online")
                    && m.iter().any(|x| x.topic == t && x.payload == b"offline")
            })
        }),
        "status messages: {:?}",
        status.snapshot()
    );
}

#[test]
fn waystation_killed_and_restarted_loses_no_acknowledged_event() {
    let mut ws = Waystation::start();
    let sub = Subscriber::start(ws.port(), "fw-ws-sub-2", "sensors/+/events");
    let address = ws.addr.to_string();
    let sim =
        std::thread::spawn(move || run(&opts(address, "fwwsr-", 5, 8), &AtomicBool::new(false)));
    std::thread::sleep(Duration::from_secs(2));
    // SIGKILL: whatever waystation acknowledged must already be durable.
    ws.kill();
    // Down for 1.5 s: the devices keep detecting, their outboxes fill.
    std::thread::sleep(Duration::from_millis(1500));
    ws.restart();
    let report = sim.join().expect("sim thread").expect("sim runs");
    assert!(
        report.connects >= 10,
        "every device reconnected: {report:?}"
    );
    assert!(report.link_losses >= 5, "{report:?}");
    assert_eq!(
        (report.dropped, report.pending),
        (0, 0),
        "outboxes drained: {report:?}"
    );
    assert_eq!(report.acknowledged, report.created, "{report:?}");
    // Every event the daemon acknowledged, before the kill or after the restart, reaches the
    // subscriber (its persistent session survives in the data directory).
    let dups = all_arrived(&sub, &report, BOOT as u64);
    eprintln!("{report}; duplicates at the subscriber: {dups}");
}

/// The `waystation sim` subcommand: the binary's own simulated sensors against the daemon.
#[test]
fn waystation_sim_subcommand_against_waystation() {
    let ws = Waystation::start();
    let sub = Subscriber::start(ws.port(), "fw-ws-sub-3", "sensors/+/events");
    let mut cmd = Command::new(waystation_bin());
    cmd.args([
        "sim",
        "--broker",
        &ws.addr.to_string(),
        "--sensors",
        "3",
        "--rate",
        "10",
    ])
    .args(["--duration", "2", "--id-prefix", "fwcli-"]);
    let (status, out) = waystation_e2e::run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "waystation sim failed: {status:?}\n{out}"
    );
    // The final report (progress lines come before it):
    // "sensors 3 | events created N published N acknowledged N resent R dropped 0 pending 0 | ..."
    let last = out
        .lines()
        .rev()
        .find(|l| l.contains("created"))
        .unwrap_or("");
    let field = |name: &str| -> u64 {
        last.split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{name} N` in the sim's output: {out}"))
    };
    let created = field("created");
    assert!(created >= 3 * 10, "10 events/s x 3 sensors x 2 s: {out}");
    assert_eq!(field("acknowledged"), created, "{out}");
    assert_eq!((field("dropped"), field("pending")), (0, 0), "{out}");
    // Every acknowledged event arrived: `created` in all, each sensor's seqs without a gap.
    assert!(
        wait_until(Duration::from_secs(20), || {
            let evs = sub.json_on("/events");
            let mut seen = std::collections::HashSet::new();
            for e in &evs {
                assert_eq!(e["v"], 1, "{e}");
                seen.insert((
                    e["device"].as_str().unwrap_or("").to_string(),
                    e["seq"].as_u64().unwrap_or(u64::MAX),
                ));
            }
            seen.len() as u64 == created
                && (0..3).all(|i| {
                    let id = format!("fwcli-{i:04}");
                    let n = seen.iter().filter(|(d, _)| *d == id).count() as u64;
                    (0..n).all(|s| seen.contains(&(id.clone(), s)))
                })
        }),
        "subscriber has {} events, the sim created {created}: {out}",
        sub.json_on("/events").len()
    );
}

#[test]
fn qemu_board_through_waystation() {
    const ID: &str = "qemu-ws-1";
    let kernel = build_board();
    let ws = Waystation::start();
    let sub = Subscriber::start(ws.port(), "fw-ws-qemu-sub", &format!("sensors/{ID}/#"));
    let qemu = Qemu::boot(
        &kernel,
        ws.port(),
        &[&format!("id={ID}"), "boot=5", "period=50", "run_ms=60000"],
    );
    let events = || sub.json_on(&format!("{ID}/events"));

    // Events with the built-in thresholds (rising 30000, falling 20000 milli-°C), in order.
    assert!(
        wait_until(Duration::from_secs(30), || events().len() >= 4),
        "no events from the board through waystation; console:\n{}",
        qemu.console()
    );
    assert!(
        statuses(&sub, ID).iter().any(|s| s == "online"),
        "{:?}",
        statuses(&sub, ID)
    );
    let first = events();
    for (i, e) in first.iter().enumerate() {
        assert_eq!(
            (e["v"].as_u64(), e["device"].as_str(), e["boot"].as_u64()),
            (Some(1), Some(ID), Some(5)),
            "{e}"
        );
        assert_eq!(e["sensor"], "temp");
        assert_eq!(e["seq"], i as u64, "in order, none missing: {first:?}");
        match e["direction"].as_str() {
            Some("rising") => assert!(
                e["threshold"] == 30000 && e["value"].as_i64().unwrap() >= 30000,
                "{e}"
            ),
            Some("falling") => assert!(
                e["threshold"] == 20000 && e["value"].as_i64().unwrap() <= 20000,
                "{e}"
            ),
            other => panic!("direction {other:?}"),
        }
    }

    // A retained document on sensors/<id>/config, published through waystation, changes them.
    publish(
        ws.port(),
        &format!("sensors/{ID}/config"),
        r#"{"rising":36000,"falling":14000}"#,
        true,
    );
    assert!(
        wait_until(Duration::from_secs(15), || statuses(&sub, ID)
            .iter()
            .any(|s| s.contains("applied"))),
        "config not applied: {:?}; console:\n{}",
        statuses(&sub, ID),
        qemu.console()
    );
    let seq_before = events().len();
    let used = |evs: &[serde_json::Value]| {
        let r = evs.iter().any(|e| {
            e["direction"] == "rising"
                && e["threshold"] == 36000
                && e["value"].as_i64().unwrap() >= 36000
        });
        let f = evs.iter().any(|e| {
            e["direction"] == "falling"
                && e["threshold"] == 14000
                && e["value"].as_i64().unwrap() <= 14000
        });
        r && f
    };
    assert!(
        wait_until(Duration::from_secs(30), || used(&events())),
        "events never used the new thresholds: {:?}",
        events()
    );
    // Once the new thresholds are used, the old ones never come back, and no seq is missing.
    let all = events();
    let first_new = all
        .iter()
        .position(|e| e["threshold"] == 36000 || e["threshold"] == 14000)
        .unwrap();
    assert!(first_new <= seq_before + 1, "{all:?}");
    assert!(
        all[first_new..]
            .iter()
            .all(|e| e["threshold"] == 36000 || e["threshold"] == 14000),
        "{all:?}"
    );
    assert!(
        all.iter().enumerate().all(|(i, e)| e["seq"] == i as u64),
        "{all:?}"
    );
    assert!(
        qemu.console()
            .contains("config applied rising=36000 falling=14000"),
        "{}",
        qemu.console()
    );

    // The document is retained by waystation: a new subscriber gets it.
    let late = Subscriber::start(
        ws.port(),
        "fw-ws-qemu-late",
        &format!("sensors/{ID}/config"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || late
            .snapshot()
            .iter()
            .any(|m| m.payload == br#"{"rising":36000,"falling":14000}"#)),
        "config not retained: {:?}",
        late.snapshot()
    );
}
