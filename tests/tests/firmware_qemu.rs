//! The board example (firmware/board-lm3s6965) booted in `qemu-system-arm`, its UART wired to
//! Debian's mosquitto by QEMU's `-serial tcp:`: its events arrive, an invalid config document is
//! refused and reported, and a threshold changed through the retained `sensors/<id>/config`
//! takes effect. The test builds the board itself (release, thumbv7m-none-eabi) into
//! `target/firmware-board`, the directory `scripts/firmware-size.sh` also uses.

mod firmware_common;

use firmware_common::{build_board, publish, Broker, Qemu, Subscriber};
use std::time::Duration;
use waystation_e2e::wait_until;

const ID: &str = "qemu-e2e-1";

fn events(sub: &Subscriber) -> Vec<serde_json::Value> {
    sub.json_on(&format!("{ID}/events"))
}

fn statuses(sub: &Subscriber) -> Vec<String> {
    firmware_common::statuses(sub, ID)
}

#[test]
fn qemu_board_publishes_events_and_obeys_config() {
    let kernel = build_board();
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "fw-qemu-sub", &format!("sensors/{ID}/#"));
    let qemu = Qemu::boot(
        &kernel,
        broker.port,
        &[&format!("id={ID}"), "boot=42", "period=50", "run_ms=60000"],
    );
    let dump = || qemu.console();

    // Events with the built-in thresholds (rising 30000, falling 20000 milli-°C).
    assert!(
        wait_until(Duration::from_secs(30), || events(&sub).len() >= 4),
        "no events from the board; console:\n{}",
        dump()
    );
    assert!(statuses(&sub).iter().any(|s| s == "online"));
    let first = events(&sub);
    for (i, e) in first.iter().enumerate() {
        assert_eq!(e["v"], 1);
        assert_eq!(e["device"], ID);
        assert_eq!(e["boot"], 42);
        assert_eq!(e["sensor"], "temp");
        assert_eq!(e["seq"], i as u64, "in order, none missing: {first:?}");
        match e["direction"].as_str() {
            Some("rising") => {
                assert_eq!(e["threshold"], 30000);
                assert!(e["value"].as_i64().unwrap() >= 30000)
            }
            Some("falling") => {
                assert_eq!(e["threshold"], 20000);
                assert!(e["value"].as_i64().unwrap() <= 20000)
            }
            other => panic!("direction {other:?}"),
        }
    }

    // An invalid document is ignored and reported.
    publish(
        broker.port,
        &format!("sensors/{ID}/config"),
        r#"{"rising":1000,"falling":5000}"#,
        false,
    );
    assert!(
        wait_until(Duration::from_secs(15), || statuses(&sub)
            .iter()
            .any(|s| s.contains("rejected"))),
        "no rejection on the status topic: {:?}",
        statuses(&sub)
    );

    // A retained document changes the thresholds.
    publish(
        broker.port,
        &format!("sensors/{ID}/config"),
        r#"{"rising":36000,"falling":14000}"#,
        true,
    );
    assert!(
        wait_until(Duration::from_secs(15), || statuses(&sub)
            .iter()
            .any(|s| s.contains("applied"))),
        "config not applied: {:?}; console:\n{}",
        statuses(&sub),
        dump()
    );
    let seq_before = events(&sub).len() as u64;
    let new_thresholds = |evs: &[serde_json::Value]| {
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
        wait_until(Duration::from_secs(30), || new_thresholds(&events(&sub))),
        "events never used the new thresholds: {:?}",
        events(&sub)
    );
    // Once the new thresholds are used, the old ones never come back.
    let all = events(&sub);
    let first_new = all
        .iter()
        .position(|e| e["threshold"] == 36000 || e["threshold"] == 14000)
        .unwrap();
    assert!(first_new as u64 <= seq_before + 1, "{all:?}");
    assert!(
        all[first_new..]
            .iter()
            .all(|e| e["threshold"] == 36000 || e["threshold"] == 14000),
        "{all:?}"
    );
    assert!(
        dump().contains("config applied rising=36000 falling=14000"),
        "{}",
        dump()
    );

    // Stack use reported by the board (painted stack) stays well inside the RAM budget.
    let stack = qemu
        .stack_high_water()
        .expect("board reports its stack use");
    assert!(stack > 256 && stack < 4096, "stack {stack}");
}
