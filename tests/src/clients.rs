//! Real MQTT 5 client libraries driven from the tests: paho-mqtt 2.x (Python) and MQTT.js
//! (Node), each through a small script under `tests/clients/` that runs a list of steps
//! (JSON) and prints what the broker said as JSON lines (see `tests/clients/paho_v5.py`).
//! `scripts/test.sh` installs both libraries there (a venv and `npm ci`).
//!
//! Every client runs bounded: the script has its own alarm, and the process is killed when
//! its [`ScriptClient`] drops or overruns.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ChildGuard;

/// Which client library runs the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lib {
    /// paho-mqtt 2.1 (Python), `tests/clients/paho_v5.py`.
    Paho,
    /// MQTT.js 5 (npm `mqtt`), `tests/clients/mqttjs_v5.js`.
    MqttJs,
}

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}

fn command(lib: Lib) -> Command {
    let dir = clients_dir();
    match lib {
        Lib::Paho => {
            let venv = dir.join(".venv/bin/python");
            assert!(
                venv.exists(),
                "{} missing: run scripts/test.sh (it installs paho-mqtt into tests/clients/.venv)",
                venv.display()
            );
            let mut c = Command::new(venv);
            c.arg(dir.join("paho_v5.py"));
            c
        }
        Lib::MqttJs => {
            assert!(
                dir.join("node_modules/mqtt").exists(),
                "tests/clients/node_modules/mqtt missing: run scripts/test.sh (npm ci in tests/clients)"
            );
            let mut c = Command::new("node");
            c.arg(dir.join("mqttjs_v5.js"));
            c
        }
    }
}

/// A client script running in the background; its events are read as they come.
pub struct ScriptClient {
    child: ChildGuard,
    rx: Receiver<Value>,
    /// Every event read so far, in order.
    pub seen: Vec<Value>,
    lib: Lib,
}

impl ScriptClient {
    /// Starts `lib` against 127.0.0.1:`port` running `steps` (a JSON array).
    pub fn spawn(lib: Lib, port: u16, steps: Value) -> ScriptClient {
        let mut child = command(lib)
            .args(["127.0.0.1", &port.to_string(), &steps.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {lib:?} client: {e}"));
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "line": line}));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        ScriptClient {
            child: ChildGuard(child),
            rx,
            seen: Vec::new(),
            lib,
        }
    }

    /// Waits (at most `timeout`) for the first event not yet returned that `pred` accepts.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(_) => panic!(
                    "{:?} client: no {what} within {timeout:?}; events: {:#?}",
                    self.lib, self.seen
                ),
            }
        }
    }

    /// Waits for the next event named `name` (e.g. "suback").
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        self.wait_for(name, timeout, |e| e["event"] == name)
    }

    /// Waits for the script to end (killing it after `timeout`); returns every event.
    pub fn finish(mut self, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => self.seen.push(e),
                // The sender goes when stdout closes: the script ended (or was killed).
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.0.kill();
                    panic!(
                        "{:?} client still running after {timeout:?}; events: {:#?}",
                        self.lib, self.seen
                    );
                }
            }
        }
        let _ = crate::wait_with_timeout(&mut self.child.0, Duration::from_secs(5));
        std::mem::take(&mut self.seen)
    }
}

/// Runs `steps` with `lib` to the end (60 s at most) and returns its events.
pub fn run(lib: Lib, port: u16, steps: Value) -> Vec<Value> {
    ScriptClient::spawn(lib, port, steps).finish(Duration::from_secs(60))
}

/// The events named `name`, in order.
pub fn events<'a>(all: &'a [Value], name: &str) -> Vec<&'a Value> {
    all.iter().filter(|e| e["event"] == name).collect()
}

/// The only event named `name`; panics (showing all events) unless there is exactly one.
pub fn one<'a>(all: &'a [Value], name: &str) -> &'a Value {
    let found = events(all, name);
    assert_eq!(found.len(), 1, "expected one {name:?} event in {all:#?}");
    found[0]
}

/// The payloads (as text) of the "message" events, in order.
pub fn payloads(all: &[Value]) -> Vec<String> {
    events(all, "message")
        .iter()
        .map(|m| m["payload"].as_str().unwrap_or("<binary>").to_string())
        .collect()
}
