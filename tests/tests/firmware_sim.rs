//! Simulated sensors (the real firmware state machine over TCP) through Debian's mosquitto,
//! with the broker restarted under them: every event arrives, none acknowledged is lost, the
//! outboxes drain after reconnect.

mod firmware_common;

use firmware_common::{Broker, Subscriber};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use waystation_e2e::wait_until;
use waystation_firmware::sim::{run, SimOptions};

fn opts(broker: String, sensors: usize, secs: u64) -> SimOptions {
    SimOptions {
        broker,
        sensors,
        rate_hz: 10.0,
        id_prefix: "fwsim-".into(),
        duration: Some(Duration::from_secs(secs)),
        drain_timeout: Duration::from_secs(20),
        boot: Some(7),
        keep_alive_s: 5,
        response_timeout_ms: 1_000,
        backoff_max_ms: 500,
        progress: None,
    }
}

/// Waits until the subscriber holds seqs 0..created of every device; returns the duplicates.
fn all_arrived(sub: &Subscriber, report: &waystation_firmware::sim::SimReport) -> usize {
    let want: HashMap<String, u32> = report.devices.iter().map(|d| (d.id.clone(), d.created)).collect();
    let mut dups = 0;
    let ok = wait_until(Duration::from_secs(20), || {
        let mut seen: HashSet<(String, u64)> = HashSet::new();
        dups = 0;
        for e in sub.json_on("/events") {
            assert_eq!(e["v"], 1, "{e}");
            assert_eq!(e["boot"], 7, "{e}");
            let key = (e["device"].as_str().unwrap_or("").to_string(), e["seq"].as_u64().unwrap_or(u64::MAX));
            if !seen.insert(key) {
                dups += 1;
            }
        }
        want.iter().all(|(id, &n)| (0..n as u64).all(|s| seen.contains(&(id.clone(), s))))
    });
    if !ok {
        let got = sub.json_on("/events").len();
        panic!("not every event arrived: subscriber has {got}, report {report:?}");
    }
    dups
}

#[test]
fn simulated_sensors_through_mosquitto() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "fw-sim-sub-1", "sensors/+/events");
    let status = Subscriber::start(broker.port, "fw-sim-status-1", "sensors/+/status");
    let report = run(&opts(broker.address(), 4, 3), &AtomicBool::new(false)).expect("sim runs");
    assert!(report.created >= 4 * 20, "10 events/s x 4 sensors x 3 s: {report:?}");
    assert_eq!(report.acknowledged, report.created, "{report:?}");
    assert_eq!((report.dropped, report.pending), (0, 0), "{report:?}");
    all_arrived(&sub, &report);
    // Each device announced itself online (retained) and said offline when it stopped.
    assert!(wait_until(Duration::from_secs(10), || {
        let m = status.snapshot();
        (0..4).all(|i| {
            let t = format!("sensors/fwsim-{i:04}/status");
            m.iter().any(|x| x.topic == t && x.payload == b"online") && m.iter().any(|x| x.topic == t && x.payload == b"offline")
        })
    }));
}

#[test]
fn broker_restart_loses_no_acknowledged_event() {
    let mut broker = Broker::start();
    let sub = Subscriber::start(broker.port, "fw-sim-sub-2", "sensors/+/events");
    let address = broker.address();
    let sim = std::thread::spawn(move || run(&opts(address, 5, 7), &AtomicBool::new(false)));
    std::thread::sleep(Duration::from_secs(2));
    broker.stop();
    // Down for 1.5 s: the devices keep detecting, their outboxes fill.
    std::thread::sleep(Duration::from_millis(1500));
    broker.start_again();
    let report = sim.join().expect("sim thread").expect("sim runs");
    assert!(report.connects >= 10, "every device reconnected: {report:?}");
    assert!(report.link_losses >= 5, "{report:?}");
    assert_eq!((report.dropped, report.pending), (0, 0), "outboxes drained: {report:?}");
    assert_eq!(report.acknowledged, report.created, "{report:?}");
    // Events made during the outage were sent after the reconnect, so more than the first
    // connection could carry: and every one of them reached the subscriber.
    let dups = all_arrived(&sub, &report);
    eprintln!("{report}; duplicates at the subscriber: {dups}");
}
