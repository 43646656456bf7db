//! Helpers shared by the security suites: the daemon with its HTTP server on a free port,
//! `/metrics` samples, clients with credentials, and the daemon's RSS.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use waystation_e2e::raw::{Connect, RawClient};
use waystation_e2e::Waystation;

/// The daemon with `extra` config and its HTTP server on a free loopback port.
pub fn start(extra: &str) -> Waystation {
    Waystation::start_with(&format!("[http]\nbind = \"127.0.0.1:0\"\n\n{extra}"))
}

/// The body of `GET /metrics`.
pub fn metrics(ws: &Waystation) -> String {
    let addr = ws.http_addr();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read /metrics");
    let text = String::from_utf8_lossy(&raw).to_string();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// A sample of `/metrics` by its full name (labels included), 0 when absent.
pub fn metric(ws: &Waystation, name: &str) -> f64 {
    let body = metrics(ws);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A CONNECT with optional user name and password.
pub fn connect_packet(id: &str, user: Option<&str>, password: Option<&str>) -> Connect {
    let mut c = Connect::new(id);
    c.username = user.map(str::to_string);
    c.password = password.map(|p| p.as_bytes().to_vec());
    c
}

/// Connects and returns the client and the CONNACK return code.
pub fn connect_as(
    ws: &Waystation,
    id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> (RawClient, u8) {
    let (c, _, code) = RawClient::connect_with(ws.addr, &connect_packet(id, user, password));
    (c, code)
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `mosquitto_pub` with extra args; returns whether it exited 0.
pub fn mosquitto_pub_ok(port: u16, args: &[&str]) -> bool {
    let (status, _) = waystation_e2e::run_with_timeout(
        std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(10),
    );
    status.is_some_and(|s| s.success())
}
