//! Helpers shared by the uplink suites (`uplink_latency.rs`, `uplink_faults.rs`): the bridge
//! config with its keep-alive and other keys, the link simulator in front of an upstream,
//! the daemon's HTTP endpoints (`/healthz`, `/metrics`, `/api/v1/status`), and what the
//! daemon's log says about its upstream connections.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use waystation_e2e::upstream::bridge_toml;
use waystation_e2e::Waystation;
use waystation_linksim::{LinkConfig, LinkSim};

/// What the bridge logs when a connection attempt fails or a connection is lost.
pub const LOST: &str = "upstream connection lost or refused; retrying";
/// What the bridge logs on each CONNACK.
pub const CONNECTED: &str = "upstream connected";

/// The harness's `[[bridge]]` "cloud" (forwards `sensors/#` to `site1/`, QoS 1, reconnect
/// back-off 100-500 ms) with `keep_alive` in seconds and `extra` keys of the bridge table.
/// `bridge_toml` sets `keep_alive = 5` itself, so a second key would be a TOML error.
pub fn bridge(address: &str, keep_alive: u64, extra: &str) -> String {
    let toml = bridge_toml(address, extra);
    assert!(
        toml.contains("keep_alive = 5\n"),
        "bridge_toml changed: {toml}"
    );
    toml.replacen(
        "keep_alive = 5\n",
        &format!("keep_alive = {keep_alive}\n"),
        1,
    )
}

/// A simulated link to `127.0.0.1:target_port`: `one_way` latency each way, `jitter` on each
/// chunk, seeded.
pub fn link(target_port: u16, one_way: Duration, jitter: Duration, seed: u64) -> LinkSim {
    LinkSim::start(LinkConfig {
        target: format!("127.0.0.1:{target_port}"),
        up_latency: one_way,
        down_latency: one_way,
        jitter,
        seed,
        ..LinkConfig::default()
    })
    .expect("start the link simulator")
}

/// `host:port` of a simulator, for the bridge's `address`.
pub fn sim_address(sim: &LinkSim) -> String {
    sim.local_addr().to_string()
}

/// `GET path` over HTTP/1.0: (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read http response");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("http head");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

/// The sum of the samples of metric `name` (exactly that name, e.g.
/// `waystation_bridge_connection_failures_total`) whose labels contain every one of `labels`
/// (e.g. `reason="connect_refused"`); None when there is no such sample.
pub fn metric(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue, // a longer name with this prefix
            },
        };
        if labels.iter().all(|want| label_part.contains(want)) {
            if let Ok(v) = value.trim().parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// Every failure the bridge logged, counted by its `reason=` label.
pub fn failures_in_log(logs: &str) -> BTreeMap<String, usize> {
    let mut reasons = BTreeMap::new();
    for line in logs.lines().filter(|l| l.contains(LOST)) {
        let reason = line
            .split("reason=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .trim_matches('"')
            .to_string();
        *reasons.entry(reason).or_insert(0) += 1;
    }
    reasons
}

/// How many times the log says `needle`.
pub fn count_in_log(ws: &Waystation, needle: &str) -> usize {
    ws.logs().matches(needle).count()
}

/// A seed from `$name`, else from the clock; printed so that a run can be repeated.
pub fn seed(name: &str) -> u64 {
    let seed = std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    println!("{name}={seed} repeats this run's link behaviour");
    seed
}

/// `bridges[0]` of `/api/v1/status` (the one bridge, "cloud").
pub fn bridge_status(http: SocketAddr) -> serde_json::Value {
    let (code, body) = get(http, "/api/v1/status");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    status["bridges"][0].clone()
}
