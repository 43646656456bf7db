//! The board example (firmware/board-lm3s6965) booted in `qemu-system-arm`, its UART wired to
//! Debian's mosquitto by QEMU's `-serial tcp:`: its events arrive, an invalid config document is
//! refused and reported, and a threshold changed through the retained `sensors/<id>/config`
//! takes effect. The test builds the board itself (release, thumbv7m-none-eabi) into
//! `target/firmware-board`, the directory `scripts/firmware-size.sh` also uses.

mod firmware_common;

use firmware_common::{workspace, Broker, Subscriber};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use waystation_e2e::{wait_until, ChildGuard};

const ID: &str = "qemu-e2e-1";

fn build_board() -> std::path::PathBuf {
    let root = workspace();
    let target = root.join("target/firmware-board");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "board-lm3s6965"])
        .current_dir(root.join("firmware/board-lm3s6965"))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the board example failed");
    target.join("thumbv7m-none-eabi/release/board-lm3s6965")
}

fn events(sub: &Subscriber) -> Vec<serde_json::Value> {
    sub.json_on(&format!("{ID}/events"))
}

fn statuses(sub: &Subscriber) -> Vec<String> {
    sub.snapshot()
        .iter()
        .filter(|m| m.topic == format!("sensors/{ID}/status"))
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

fn publish(port: u16, topic: &str, payload: &str, retain: bool) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-p", &port.to_string(), "-q", "1", "-t", topic, "-m", payload]);
    if retain {
        cmd.arg("-r");
    }
    let (status, _) = waystation_e2e::run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "mosquitto_pub failed");
}

#[test]
fn qemu_board_publishes_events_and_obeys_config() {
    let kernel = build_board();
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "fw-qemu-sub", &format!("sensors/{ID}/#"));
    let mut child = Command::new("qemu-system-arm")
        .args(["-cpu", "cortex-m3", "-machine", "lm3s6965evb", "-nographic", "-monitor", "none"])
        .args(["-semihosting-config"])
        .arg(format!("enable=on,target=native,arg=board,arg=id={ID},arg=boot=42,arg=period=50,arg=run_ms=60000"))
        .args(["-serial", &format!("tcp:127.0.0.1:{}", broker.port)])
        .arg("-kernel")
        .arg(&kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-arm (scripts/test.sh installs it)");
    let out = child.stdout.take().expect("stdout");
    let _qemu = ChildGuard(child);
    let console = Arc::new(Mutex::new(Vec::<String>::new()));
    let c = console.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            c.lock().unwrap().push(line);
        }
    });
    let dump = || console.lock().unwrap().join("\n");

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
    publish(broker.port, &format!("sensors/{ID}/config"), r#"{"rising":1000,"falling":5000}"#, false);
    assert!(
        wait_until(Duration::from_secs(15), || statuses(&sub).iter().any(|s| s.contains("rejected"))),
        "no rejection on the status topic: {:?}",
        statuses(&sub)
    );

    // A retained document changes the thresholds.
    publish(broker.port, &format!("sensors/{ID}/config"), r#"{"rising":36000,"falling":14000}"#, true);
    assert!(
        wait_until(Duration::from_secs(15), || statuses(&sub).iter().any(|s| s.contains("applied"))),
        "config not applied: {:?}; console:\n{}",
        statuses(&sub),
        dump()
    );
    let seq_before = events(&sub).len() as u64;
    let new_thresholds = |evs: &[serde_json::Value]| {
        let r = evs.iter().any(|e| e["direction"] == "rising" && e["threshold"] == 36000 && e["value"].as_i64().unwrap() >= 36000);
        let f = evs.iter().any(|e| e["direction"] == "falling" && e["threshold"] == 14000 && e["value"].as_i64().unwrap() <= 14000);
        r && f
    };
    assert!(
        wait_until(Duration::from_secs(30), || new_thresholds(&events(&sub))),
        "events never used the new thresholds: {:?}",
        events(&sub)
    );
    // Once the new thresholds are used, the old ones never come back.
    let all = events(&sub);
    let first_new = all.iter().position(|e| e["threshold"] == 36000 || e["threshold"] == 14000).unwrap();
    assert!(first_new as u64 <= seq_before + 1, "{all:?}");
    assert!(all[first_new..].iter().all(|e| e["threshold"] == 36000 || e["threshold"] == 14000), "{all:?}");
    assert!(dump().contains("config applied rising=36000 falling=14000"), "{}", dump());

    // Stack use reported by the board (painted stack) stays well inside the RAM budget.
    let stack = dump()
        .lines()
        .filter_map(|l| l.strip_prefix("stack-high-water ").and_then(|n| n.trim().parse::<u32>().ok()))
        .max()
        .expect("board reports its stack use");
    assert!(stack > 256 && stack < 4096, "stack {stack}");
}
