//! Issue 3, "Tests, against a real upstream" - steady flow: 20 clients x 1,000 QoS 1
//! messages published to Waystation all arrive at the upstream Mosquitto through the
//! bridge, each topic's messages in the order they were published.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use waystation_e2e::upstream::{
    analyze, bridge_toml, missing, Collector, Publisher, PublisherSpec, Upstream,
};
use waystation_e2e::Waystation;

pub const PUBLISHERS: u32 = 20;
pub const PER_PUBLISHER: u64 = 1_000;

#[test]
fn steady_flow_20_clients_x_1000_qos1_all_arrive_upstream_in_order() {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "steady-collector", "site1/#");
    let ws = Waystation::start_with(&bridge_toml(&upstream.address(), ""));
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "bridge never connected:\n{}",
        ws.logs()
    );

    let started = Instant::now();
    let publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|p| Publisher::start(ws.addr, PublisherSpec::new(p, PER_PUBLISHER)))
        .collect();
    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(90));
        assert!(
            st.anomalies.is_empty(),
            "publisher {id}: {:?}",
            st.anomalies
        );
        assert_eq!(st.acked.len() as u64, PER_PUBLISHER, "publisher {id} acked");
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    let published = started.elapsed();
    let arrived = collector.wait_for_all(&want, Duration::from_secs(60));
    collector.wait_quiet(Duration::from_millis(300), Duration::from_secs(5));
    let a = analyze(&collector.received(), "site1/");
    println!(
        "steady: {} acked in {published:?}, {} received upstream ({} unique, {} duplicates) after {:?}",
        want.len(),
        a.total,
        a.unique.len(),
        a.duplicates,
        started.elapsed()
    );
    assert!(
        arrived,
        "missing upstream (first 20 per publisher): {:?}",
        missing(&want, &a.unique)
    );
    assert!(a.malformed.is_empty(), "{:?}", a.malformed);
    assert!(
        a.order_violations.is_empty(),
        "per-topic order broken: {:?}",
        a.order_violations
    );
    assert_eq!(a.unique.len(), want.len(), "nothing else arrived");
    assert_eq!(
        a.duplicates, 0,
        "no reconnect happened, so no duplicates are expected"
    );
}
