//! Simulated sensors (the real firmware state machine over TCP) through Debian's mosquitto,
//! with the broker restarted under them: every event arrives, none acknowledged is lost, the
//! outboxes drain after reconnect.

mod firmware_common;

use firmware_common::{all_arrived, Broker, Subscriber};
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

#[test]
fn simulated_sensors_through_mosquitto() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "fw-sim-sub-1", "sensors/+/events");
    let status = Subscriber::start(broker.port, "fw-sim-status-1", "sensors/+/status");
    let report = run(&opts(broker.address(), 4, 3), &AtomicBool::new(false)).expect("sim runs");
    assert!(
        report.created >= 4 * 20,
        "10 events/s x 4 sensors x 3 s: {report:?}"
    );
    assert_eq!(report.acknowledged, report.created, "{report:?}");
    assert_eq!((report.dropped, report.pending), (0, 0), "{report:?}");
    all_arrived(&sub, &report, 7);
    // Each device announced itself online (retained) and said offline when it stopped.
    assert!(wait_until(Duration::from_secs(10), || {
        let m = status.snapshot();
        (0..4).all(|i| {
            let t = format!("sensors/fwsim-{i:04}/status");
            m.iter().any(|x| x.topic == t && x.payload == b"online")
                && m.iter().any(|x| x.topic == t && x.payload == b"offline")
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
    // Events made during the outage were sent after the reconnect, so more than the first
    // connection could carry: and every one of them reached the subscriber.
    let dups = all_arrived(&sub, &report, 7);
    eprintln!("{report}; duplicates at the subscriber: {dups}");
}
