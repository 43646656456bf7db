//! Helpers shared by the MQTT 5 suites (broker_v5*.rs): the daemon with its HTTP server,
//! `/metrics` samples, and the command-line clients with their stderr kept.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use waystation_e2e::clients::{self, Lib, ScriptClient};
use waystation_e2e::{http_get, metric_sample, wait_with_timeout, Waystation};

pub const WAIT: Duration = Duration::from_secs(15);

/// The daemon with `extra` config (a free HTTP port is added by the harness).
pub fn start(extra: &str) -> Waystation {
    Waystation::start_with(extra)
}

/// A `/metrics` sample by its name without the `_total` suffix the exporter may add
/// (labels included), 0 when absent.
pub fn metric(ws: &Waystation, name: &str) -> f64 {
    let (code, body) = http_get(ws.http_addr(), "/metrics");
    assert_eq!(code, 200, "GET /metrics");
    let (family, labels) = name.split_at(name.find('{').unwrap_or(name.len()));
    metric_sample(&body, name)
        .or_else(|| metric_sample(&body, &format!("{family}_total{labels}")))
        .unwrap_or(0.0)
}

/// `waystation_messages_dropped{reason="<reason>"}`.
pub fn dropped(ws: &Waystation, reason: &str) -> f64 {
    metric(
        ws,
        &format!("waystation_messages_dropped{{reason=\"{reason}\"}}"),
    )
}

/// Runs `program` (mosquitto_pub, mosquitto_sub) with `args` for at most 15 s; returns
/// (exit code, stdout, stderr).
pub fn run_cli(program: &str, port: u16, args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(program)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program} (package mosquitto-clients): {e}"));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let status = wait_with_timeout(&mut child, WAIT);
    (
        status.and_then(|s| s.code()),
        out_t.join().unwrap_or_default(),
        err_t.join().unwrap_or_default(),
    )
}

/// `mosquitto_pub -V mqttv5 <args>`, which must exit 0.
pub fn pub5(port: u16, args: &[&str]) {
    let mut all = vec!["-V", "mqttv5"];
    all.extend_from_slice(args);
    let (code, out, err) = run_cli("mosquitto_pub", port, &all);
    assert_eq!(code, Some(0), "mosquitto_pub {all:?}: {out}{err}");
}

/// Runs steps with `lib` to the end; returns the events.
pub fn run(lib: Lib, ws: &Waystation, steps: Value) -> Vec<Value> {
    clients::run(lib, ws.port(), steps)
}

/// Starts a subscriber (`connect` step given, one filter) and waits for its SUBACK; it then
/// waits for `count` messages and ends.
pub fn subscriber(
    lib: Lib,
    ws: &Waystation,
    connect: Value,
    filter: Value,
    count: usize,
) -> ScriptClient {
    let steps = serde_json::json!([
        connect,
        {"op": "subscribe", "filters": [filter]},
        {"op": "expect", "count": count, "secs": 20},
        {"op": "disconnect"},
    ]);
    let mut c = ScriptClient::spawn(lib, ws.port(), steps);
    let ack = c.wait_event("suback", WAIT);
    assert!(
        ack["reasons"][0].as_u64().is_some_and(|r| r < 0x80),
        "subscription refused: {ack}"
    );
    c
}

/// The reason code of the only event named `name`.
pub fn reason(all: &[Value], name: &str) -> u64 {
    clients::one(all, name)["reason"]
        .as_u64()
        .unwrap_or_else(|| panic!("no reason code in {all:#?}"))
}
