//! The demo's optional simulated WAN link (`--uplink-latency`, `--flaky`): the test kit's
//! link simulator between the bridge and the relay in front of the cloud.

use std::net::SocketAddr;
use std::time::Duration;

use waystation_linksim::{Chaos, ChaosGuard, Fault, LinkConfig, LinkSim};

/// The simulator and its fault schedule; dropping it stops both.
pub type Uplink = (LinkSim, Option<ChaosGuard>);

/// A different fault schedule each run (printed, so a run can be replayed).
pub fn fault_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// The address the bridge should dial: `relay` itself when no simulation is asked for,
/// else a simulator in front of it.
pub fn start(
    relay: SocketAddr,
    latency_ms: u64,
    flaky: bool,
    seed: u64,
) -> anyhow::Result<(SocketAddr, Option<Uplink>)> {
    if latency_ms == 0 && !flaky {
        return Ok((relay, None));
    }
    let latency = Duration::from_millis(latency_ms);
    let sim = LinkSim::start(LinkConfig {
        up_latency: latency,
        down_latency: latency,
        jitter: latency / 10,
        ..LinkConfig::new(relay.to_string())
    })?;
    let chaos = flaky.then(|| {
        sim.handle().start_chaos(Chaos {
            seed,
            min_interval: Duration::from_secs(4),
            max_interval: Duration::from_secs(9),
            kinds: vec![Fault::Reset, Fault::Zombie],
        })
    });
    Ok((sim.local_addr(), Some((sim, chaos))))
}
