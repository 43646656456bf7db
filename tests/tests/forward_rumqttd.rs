//! Issue 3, "Tests, against a real upstream", with a second upstream implementation:
//! rumqttd 0.20 in-process. Steady flow (20 clients x 1,000 QoS 1 messages) arrives
//! complete and in per-topic order, and cloud-to-device commands published on rumqttd
//! reach a local subscriber.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use waystation_cloud::{Cloud, CloudOptions};
use waystation_e2e::raw::{Pkt, RawClient};
use waystation_e2e::upstream::{
    analyze, bridge_toml, missing, Collector, Publisher, PublisherSpec,
};
use waystation_e2e::{Waystation, START_TIMEOUT};

/// rumqttd 0.20 in-process on a free port: the second upstream implementation. Its
/// segments are made large enough that a slow subscriber loses nothing (FACTS.md). The
/// broker's threads live until the test process exits.
pub fn start_rumqttd() -> u16 {
    Cloud::start(CloudOptions {
        max_connections: 1000,
        max_segment_size: 64 * 1024 * 1024,
        start_timeout: START_TIMEOUT,
        ..CloudOptions::default()
    })
    .expect("rumqttd")
    .port()
}

#[test]
fn steady_flow_into_rumqttd_20_clients_x_1000_qos1_all_arrive_in_order() {
    let port = start_rumqttd();
    let collector = Collector::start(port, "rumqttd-collector", "site1/#");
    let ws = Waystation::start_with(&bridge_toml(&format!("127.0.0.1:{port}"), ""));
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "bridge never connected:\n{}",
        ws.logs()
    );

    let started = Instant::now();
    let publishers: Vec<Publisher> = (0..20)
        .map(|p| Publisher::start(ws.addr, PublisherSpec::new(p, 1_000)))
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
        assert_eq!(st.acked.len(), 1_000, "publisher {id} acked");
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    let arrived = collector.wait_for_all(&want, Duration::from_secs(60));
    collector.wait_quiet(Duration::from_millis(300), Duration::from_secs(5));
    let a = analyze(&collector.received(), "site1/");
    println!(
        "rumqttd steady: {} acked, {} received ({} unique, {} duplicates) after {:?}",
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
    assert_eq!(a.unique.len(), want.len());
    assert_eq!(a.duplicates, 0);
}

#[test]
fn commands_published_on_rumqttd_reach_a_local_subscriber() {
    let port = start_rumqttd();
    let extra = format!(
        "{}\n[[bridge.subscribe]]\nremote = \"site1/cmd/#\"\nlocal_prefix = \"\"\nqos = 1\n",
        bridge_toml(&format!("127.0.0.1:{port}"), "")
    );
    let ws = Waystation::start_with(&extra);
    let mut local = RawClient::connect(ws.addr, "rumqttd-cmd-sub");
    local.subscribe_ok(1, &[("site1/cmd/#", 1)]);
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );

    let mut options = rumqttc::MqttOptions::new("rumqttd-cloud-app", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = rumqttc::Client::new(options, 100);
    std::thread::spawn(move || for _ in connection.iter() {});
    // The bridge's SUBSCRIBE may land just after its CONNACK: publish until one arrives.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut got = None;
    let mut n = 0;
    while Instant::now() < deadline && got.is_none() {
        n += 1;
        client
            .publish(
                "site1/cmd/valve",
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("open-{n}"),
            )
            .unwrap();
        if let Ok(Pkt::Publish(p)) = local.recv_timeout(Duration::from_millis(500)) {
            got = Some(p);
        }
    }
    let p = got.expect("no command from rumqttd reached the local subscriber within 15 s");
    assert_eq!(p.topic, "site1/cmd/valve");
    assert!(String::from_utf8_lossy(&p.payload).starts_with("open-"));
    let _ = client.try_disconnect();
}
