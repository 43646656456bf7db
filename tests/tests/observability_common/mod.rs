//! Helpers of the observability tests: the daemon started with a config of the test's own
//! (`[http]`, `sys_interval`, `--log-format`), a minimal HTTP/1.1 GET, and rumqttd as an
//! in-process upstream. Every wait is bounded; the daemon is killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use waystation_cloud::{Cloud, CloudOptions};
use waystation_e2e::{wait_until, waystation_bin, START_TIMEOUT};

pub struct Gateway {
    child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    logs: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// The address after `marker` in a log line, text or JSON.
fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    let token: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    token.parse().ok()
}

impl Gateway {
    /// Starts `waystation [global_args] run` with an MQTT listener and the HTTP server on free
    /// ports, plus `extra` TOML (tables after `[gateway]`, which gets `gateway_keys`).
    pub fn start(global_args: &[&str], gateway_keys: &str, extra: &str) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("waystation-obs-")
            .tempdir()
            .expect("tempdir");
        let config = format!(
            "[gateway]\nid = \"obs\"\ndata_dir = \"{}\"\n{gateway_keys}\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"127.0.0.1:0\"\n\n{extra}",
            dir.path().join("data").display()
        );
        let path = dir.path().join("waystation.toml");
        std::fs::write(&path, config).expect("write config");
        let mut child = Command::new(waystation_bin())
            .args(global_args)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn waystation");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut found = (None, None);
        let ok = wait_until(START_TIMEOUT, || {
            let l = logs.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for line in l.lines() {
                found.0 = found.0.or_else(|| addr_after(line, "listening on "));
                found.1 = found.1.or_else(|| addr_after(line, "at http://"));
            }
            found.0.is_some() && found.1.is_some()
        });
        let logs_now = logs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !ok {
            let _ = child.kill();
            panic!("waystation did not report its MQTT and HTTP addresses; logs:\n{logs_now}");
        }
        Gateway {
            child,
            mqtt: found.0.unwrap(),
            http: found.1.unwrap(),
            logs,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// SIGTERM; waits up to 15 s. Returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        waystation_e2e::wait_with_timeout(&mut self.child, Duration::from_secs(15))
            .is_some_and(|s| s.success())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- waystation logs ---\n{}", self.logs());
        }
    }
}

/// A GET over HTTP/1.1: (status, content-type, body).
pub fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read http response");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("http head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        ctype,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The value of the sample `name` (full name with labels, e.g. `x_total{qos="1"}`).
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// rumqttd 0.20 in-process on a free port (its threads live until the test process exits).
pub fn start_rumqttd() -> u16 {
    Cloud::start(CloudOptions {
        start_timeout: START_TIMEOUT,
        ..CloudOptions::default()
    })
    .expect("rumqttd")
    .port()
}
