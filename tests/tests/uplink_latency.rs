//! The bridge connects and forwards over slow links: 10, 50, 150 and 300 ms each way (a few
//! ms of jitter), over plain TCP and over TLS, through the link simulator
//! (`waystation-linksim`) between the real daemon and a real Mosquitto upstream.
//!
//! Why: rumqttc's event loop, which the bridge used before, never connected over a link of
//! 10 ms or more when polled beside a tick (FACTS.md): the connection attempt was dropped
//! half-way on every wake-up. The bridge now runs each attempt as a task of its own; these
//! tests prove that it connects at every latency a site's uplink may have (satellite and bad
//! cellular reach 300 ms each way), TLS handshake included, and that a few hundred QoS 1
//! messages then arrive upstream, all of them and in per-topic order, within a time bounded
//! in round trips: the window (`max_inflight`) is refilled as acknowledgements return, not
//! one message per round trip.
//!
//! Each case is light (300 messages), so the cases run side by side as separate tests;
//! the bounds are a fixed slack for starting processes on a busy machine plus a number of
//! round trips.

mod uplink_common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uplink_common::{bridge, link, sim_address, CONNECTED};
use waystation_e2e::pki::Pki;
use waystation_e2e::upstream::{analyze, missing, Collector, Publisher, PublisherSpec, Upstream};
use waystation_e2e::{free_port, wait_until, ChildGuard, Waystation};

/// Messages per case: 3 publishers (topics) x 100.
const PUBLISHERS: u32 = 3;
const PER_PUBLISHER: u64 = 100;
/// The bridge's default window.
const MAX_INFLIGHT: u64 = 100;
/// Slack for starting processes (debug build) on a machine that may be busy.
const SLACK: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------
// A TLS upstream: a CA and a server certificate made with `openssl`, and Mosquitto with a
// TLS listener (for the bridge, through the simulator) and a plain one (for the collector).
// ---------------------------------------------------------------------------------------

/// `ca.crt` and `server.crt`/`server.key` for 127.0.0.1 and localhost.
fn make_pki() -> Pki {
    let pki = Pki::new();
    pki.ca("ca");
    pki.leaf("server", "ca", "localhost", true);
    pki
}

/// Debian's Mosquitto with a plain listener on `plain_port` and a TLS one on `tls_port`,
/// configured to count every message (no queue limit, as the harness's `Mosquitto`).
struct TlsUpstream {
    _child: ChildGuard,
    plain_port: u16,
    tls_port: u16,
}

impl TlsUpstream {
    fn start(pki: &Pki) -> TlsUpstream {
        let (plain_port, tls_port) = (free_port(), free_port());
        let conf = pki.path("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nuser root\nallow_anonymous true\n\
                 max_queued_messages 0\nmax_inflight_messages 100\nset_tcp_nodelay true\nlog_dest none\n\
                 listener {plain_port} 127.0.0.1\n\
                 listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
                pki.path("ca.crt").display(),
                pki.path("server.crt").display(),
                pki.path("server.key").display()
            ),
        )
        .expect("write mosquitto.conf");
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("mosquitto is not installed (scripts/test.sh installs it)");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let guard = ChildGuard(child);
        for port in [plain_port, tls_port] {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            assert!(
                wait_until(Duration::from_secs(20), || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                }),
                "mosquitto did not listen on {addr}"
            );
        }
        TlsUpstream {
            _child: guard,
            plain_port,
            tls_port,
        }
    }
}

// ---------------------------------------------------------------------------------------
// One case
// ---------------------------------------------------------------------------------------

fn forward_over(one_way_ms: u64, tls: bool) {
    let one_way = Duration::from_millis(one_way_ms);
    let rtt = 2 * one_way;
    let jitter = Duration::from_millis(3);
    let label = format!(
        "{} {one_way_ms} ms each way",
        if tls { "TLS" } else { "TCP" }
    );

    // The upstream, its subscriber (directly, as in the cloud), and the simulated link.
    let pki = tls.then(make_pki);
    let plain_upstream = (!tls).then(Upstream::start);
    let tls_upstream = pki.as_ref().map(TlsUpstream::start);
    let (collector_port, bridge_target) = match (&plain_upstream, &tls_upstream) {
        (Some(up), _) => (up.port, up.port),
        (_, Some(up)) => (up.plain_port, up.tls_port),
        _ => unreachable!("one of the two upstreams runs"),
    };
    let collector = Collector::start(
        collector_port,
        &format!("latency-collector-{one_way_ms}-{tls}"),
        "site1/#",
    );
    let sim = link(bridge_target, one_way, jitter, one_way_ms);
    // The certificate names 127.0.0.1 (an IP SAN), which is where the simulator listens.
    let tls_key = pki.as_ref().map_or(String::new(), |pki| {
        format!(
            "tls = {{ ca_file = \"{}\" }}\n",
            pki.path("ca.crt").display()
        )
    });
    let extra = format!("{tls_key}max_inflight = {MAX_INFLIGHT}");

    // Connect: TLS 1.3 adds one round trip to CONNECT -> CONNACK (the TCP handshake with the
    // simulator is local; its own connection to the upstream is on loopback).
    let started = Instant::now();
    let ws = Waystation::start_with(&bridge(&sim_address(&sim), 5, &extra));
    let connect_bound = SLACK + rtt * 4;
    let connected = ws.wait_for_log(CONNECTED, connect_bound);
    let connect_time = started.elapsed();
    assert!(
        connected,
        "{label}: the bridge did not connect within {connect_bound:?}:\n{}",
        ws.logs()
    );

    // Forward: 300 QoS 1 messages published locally as fast as the daemon acknowledges them.
    let published = Instant::now();
    let publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|p| Publisher::start(ws.addr, PublisherSpec::new(p, PER_PUBLISHER)))
        .collect();
    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(30));
        assert!(st.anomalies.is_empty(), "{label}: {:?}", st.anomalies);
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    assert_eq!(want.len() as u64, u64::from(PUBLISHERS) * PER_PUBLISHER);
    let ingest_time = published.elapsed();
    // At least 3 windows' worth of round trips, doubled, plus the slack.
    let total = u64::from(PUBLISHERS) * PER_PUBLISHER;
    let deliver_bound = SLACK + rtt * (2 * total.div_ceil(MAX_INFLIGHT) as u32 + 2);
    let arrived = collector.wait_for_all(&want, deliver_bound);
    let received = collector.received();
    let a = analyze(&received, "site1/");
    let last_first_arrival = {
        let mut seen = HashSet::new();
        received
            .iter()
            .filter(|r| {
                waystation_e2e::upstream::parse_id(&r.payload).is_some_and(|id| seen.insert(id))
            })
            .map(|r| r.at)
            .max()
    };
    let deliver_time = last_first_arrival
        .map(|t| t.duration_since(published))
        .unwrap_or_default();
    let stats = sim.handle().stats();
    println!(
        "{label}: connected {connect_time:.2?} after start (bound {connect_bound:?}); {} messages acked locally in \
         {ingest_time:.2?}, all upstream {deliver_time:.2?} after the first publish (bound {deliver_bound:?}); \
         {} received, {} duplicates; link: {} connection(s), {} bytes up ({:.1} per message), {} bytes down",
        want.len(),
        a.total,
        a.duplicates,
        stats.accepted,
        stats.bytes_up,
        stats.bytes_up as f64 / want.len() as f64,
        stats.bytes_down
    );
    assert!(
        arrived,
        "{label}: not all upstream within {deliver_bound:?}: missing {:?}\n{}",
        missing(&want, &a.unique),
        ws.logs()
    );
    assert!(a.malformed.is_empty(), "{label}: {:?}", a.malformed);
    assert!(
        a.order_violations.is_empty(),
        "{label}: per-topic order broken: {:?}",
        a.order_violations
    );
    // The link really was that slow: CONNECT -> CONNACK is a round trip (TLS adds one), and
    // the last window needs at least one more after the first.
    let min_connect = if tls { rtt * 2 } else { rtt };
    assert!(
        connect_time >= min_connect && deliver_time >= rtt + one_way,
        "{label}: faster than the link allows: connected in {connect_time:?}, delivered in {deliver_time:?}"
    );
    assert_eq!(
        stats.accepted,
        1,
        "{label}: one connection should carry everything:\n{}",
        ws.logs()
    );
    assert!(
        !ws.logs().contains(uplink_common::LOST),
        "{label}: the link was never lost, yet:\n{}",
        ws.logs()
    );
}

#[test]
fn tcp_10ms() {
    forward_over(10, false);
}

#[test]
fn tcp_50ms() {
    forward_over(50, false);
}

#[test]
fn tcp_150ms() {
    forward_over(150, false);
}

#[test]
fn tcp_300ms() {
    forward_over(300, false);
}

#[test]
fn tls_10ms() {
    forward_over(10, true);
}

#[test]
fn tls_50ms() {
    forward_over(50, true);
}

#[test]
fn tls_150ms() {
    forward_over(150, true);
}

#[test]
fn tls_300ms() {
    forward_over(300, true);
}
