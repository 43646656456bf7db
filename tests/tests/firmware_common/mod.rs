//! Helpers of the firmware end-to-end tests: a Debian `mosquitto` with persistence that can be
//! stopped gracefully and started again on the same port, a QoS 1 subscriber that records
//! every message and survives broker restarts, a check that every simulated event arrived, and
//! the QEMU board (build, boot with its UART on a broker's port, console capture). Every wait is
//! bounded; processes die on drop.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use waystation_e2e::{wait_until, ChildGuard};
use waystation_firmware::sim::SimReport;

/// Debian's mosquitto with persistence, stopped gracefully and started again on the same
/// port: the harness's [`waystation_e2e::Mosquitto`].
#[allow(unused_imports)] // not every firmware test binary starts a broker
pub use waystation_e2e::Mosquitto as Broker;

/// A received message.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A rumqttc subscriber (persistent session, QoS 1) in a thread, recording messages.
pub struct Subscriber {
    pub msgs: Arc<Mutex<Vec<Msg>>>,
    pub subscribed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub client: rumqttc::Client,
}

impl Subscriber {
    pub fn start(port: u16, id: &str, filter: &str) -> Subscriber {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut conn) = rumqttc::Client::new(opts, 1000);
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .expect("subscribe");
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, st) = (msgs.clone(), subscribed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match conn.recv_timeout(Duration::from_millis(200)) {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => {
                        s.store(true, Ordering::SeqCst)
                    }
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                        m.lock().unwrap().push(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                        })
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        eprintln!("subscriber: {e}");
                        std::thread::sleep(Duration::from_millis(100)); // reconnects on next poll
                    }
                    Err(rumqttc::RecvTimeoutError::Timeout) => {}
                    Err(rumqttc::RecvTimeoutError::Disconnected) => break,
                }
            }
        });
        let sub = Subscriber {
            msgs,
            subscribed,
            stop,
            thread: Some(thread),
            client,
        };
        assert!(
            wait_until(Duration::from_secs(10), || sub
                .subscribed
                .load(Ordering::SeqCst)),
            "subscriber got no SUBACK"
        );
        sub
    }

    pub fn snapshot(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Parsed JSON payloads of messages on topics ending with `suffix`.
    pub fn json_on(&self, suffix: &str) -> Vec<serde_json::Value> {
        self.snapshot()
            .iter()
            .filter(|m| m.topic.ends_with(suffix))
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Waits (20 s at most) until the subscriber holds seqs `0..created` of every device in the
/// report, all with schema version 1 and boot `boot`; returns how many duplicates it got (QoS 1
/// allows them; `(device, boot, seq)` identifies them).
pub fn all_arrived(sub: &Subscriber, report: &SimReport, boot: u64) -> usize {
    let want: HashMap<String, u32> = report
        .devices
        .iter()
        .map(|d| (d.id.clone(), d.created))
        .collect();
    let mut dups = 0;
    let ok = wait_until(Duration::from_secs(20), || {
        let mut seen: HashSet<(String, u64)> = HashSet::new();
        dups = 0;
        for e in sub.json_on("/events") {
            assert_eq!(e["v"], 1, "{e}");
            assert_eq!(e["boot"], boot, "{e}");
            let key = (
                e["device"].as_str().unwrap_or("").to_string(),
                e["seq"].as_u64().unwrap_or(u64::MAX),
            );
            if !seen.insert(key) {
                dups += 1;
            }
        }
        want.iter()
            .all(|(id, &n)| (0..n as u64).all(|s| seen.contains(&(id.clone(), s))))
    });
    if !ok {
        let got = sub.json_on("/events").len();
        panic!("not every event arrived: subscriber has {got}, report {report:?}");
    }
    dups
}

/// Builds the board example (release, thumbv7m-none-eabi) into `target/firmware-board`, the
/// directory `scripts/firmware-size.sh` also uses; returns the kernel image.
pub fn build_board() -> PathBuf {
    let root = workspace();
    let target = root.join("target/firmware-board");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "board-lm3s6965"])
        .current_dir(root.join("firmware/board-lm3s6965"))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the board example failed");
    target.join("thumbv7m-none-eabi/release/board-lm3s6965")
}

/// The board booted in `qemu-system-arm`, UART0 connected to `127.0.0.1:port`; its console
/// (semihosting) lines are collected. QEMU is killed on drop.
pub struct Qemu {
    _child: ChildGuard,
    console: Arc<Mutex<Vec<String>>>,
}

impl Qemu {
    /// `args`: the board's `key=value` semihosting arguments (id, boot, period, run_ms, ...).
    pub fn boot(kernel: &std::path::Path, port: u16, args: &[&str]) -> Qemu {
        let mut semihosting = String::from("enable=on,target=native,arg=board");
        for a in args {
            semihosting.push_str(",arg=");
            semihosting.push_str(a);
        }
        let mut child = Command::new("qemu-system-arm")
            .args([
                "-cpu",
                "cortex-m3",
                "-machine",
                "lm3s6965evb",
                "-nographic",
                "-monitor",
                "none",
            ])
            .args(["-semihosting-config", &semihosting])
            .args(["-serial", &format!("tcp:127.0.0.1:{port}")])
            .arg("-kernel")
            .arg(kernel)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-arm (scripts/test.sh installs it)");
        let out = child.stdout.take().expect("stdout");
        let console = Arc::new(Mutex::new(Vec::<String>::new()));
        let c = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                c.lock().unwrap().push(line);
            }
        });
        Qemu {
            _child: ChildGuard(child),
            console,
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.console.lock().unwrap().join("\n")
    }

    /// The largest `stack-high-water` the board reported.
    pub fn stack_high_water(&self) -> Option<u32> {
        self.console()
            .lines()
            .filter_map(|l| {
                l.strip_prefix("stack-high-water ")
                    .and_then(|n| n.trim().parse::<u32>().ok())
            })
            .max()
    }
}

/// `mosquitto_pub -q 1` to the broker on `port` (any MQTT 3.1.1 broker: mosquitto or waystation).
pub fn publish(port: u16, topic: &str, payload: &str, retain: bool) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        payload,
    ]);
    if retain {
        cmd.arg("-r");
    }
    let (status, _) = waystation_e2e::run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "mosquitto_pub failed");
}

/// Payloads of the messages on `sensors/<id>/status`.
pub fn statuses(sub: &Subscriber, id: &str) -> Vec<String> {
    sub.snapshot()
        .iter()
        .filter(|m| m.topic == format!("sensors/{id}/status"))
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}
