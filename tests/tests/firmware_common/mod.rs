//! Helpers of the firmware end-to-end tests: a Debian `mosquitto` with persistence that can be
//! stopped gracefully and started again on the same port, and a QoS 1 subscriber that records
//! every message and survives broker restarts. Every wait is bounded; processes die on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use waystation_e2e::{free_port, wait_until};

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write conf");
        let mut b = Broker { child: None, port, dir };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("mosquitto is not installed (scripts/test.sh installs it)");
        let child = Command::new(bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let up = wait_until(Duration::from_secs(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        assert!(up, "mosquitto did not listen on {addr}");
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait, bounded, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            if waystation_e2e::wait_with_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).expect("subscribe");
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, st) = (msgs.clone(), subscribed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match conn.recv_timeout(Duration::from_millis(200)) {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => s.store(true, Ordering::SeqCst),
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                        m.lock().unwrap().push(Msg { topic: p.topic.clone(), payload: p.payload.to_vec() })
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
        let sub = Subscriber { msgs, subscribed, stop, thread: Some(thread), client };
        assert!(
            wait_until(Duration::from_secs(10), || sub.subscribed.load(Ordering::SeqCst)),
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
