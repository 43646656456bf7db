//! The demo's sensors: the firmware crate's real device state machine, N of them over TCP,
//! on a thread of their own (the firmware's driver is blocking and single-threaded).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use waystation_firmware::sim::{SimOptions, SimReport};

pub type Sensors = std::thread::JoinHandle<Result<SimReport, String>>;

/// `count` sensors publishing `rate` events/s each into `edge` for `duration`, or until
/// `stop` is set.
pub fn start(
    edge: SocketAddr,
    count: usize,
    rate: f64,
    duration: Duration,
    stop: Arc<AtomicBool>,
) -> Sensors {
    let sim_options = SimOptions {
        broker: edge.to_string(),
        sensors: count,
        rate_hz: rate,
        id_prefix: "sensor-".into(),
        duration: Some(duration),
        drain_timeout: Duration::from_secs(30),
        boot: None,
        keep_alive_s: 30,
        response_timeout_ms: 3_000,
        backoff_max_ms: 2_000,
        progress: None,
    };
    std::thread::spawn(move || waystation_firmware::sim::run(&sim_options, &stop))
}

/// Every event the sensors produced, as (device, boot, seq): what the cloud must have.
pub fn produced(report: &SimReport) -> HashSet<(String, u64, u64)> {
    report
        .devices
        .iter()
        .flat_map(|d| (0..u64::from(d.created)).map(move |s| (d.id.clone(), u64::from(d.boot), s)))
        .collect()
}
