//! The durable store under bad conditions, through the real daemon: a corrupt store is moved
//! aside and the daemon still serves; a full disk stops acknowledgements without a crash and
//! they resume when space returns; `max_age` drops what waited too long, and counts it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use waystation_e2e::raw::{self, Pkt, RawClient, RecvError};
use waystation_e2e::{free_port, wait_until, Waystation};

fn bridge_config(upstream_port: u16, extra_storage: &str) -> String {
    format!(
        "[storage]\n{extra_storage}\n\n[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{upstream_port}\"\nkeep_alive = 5\nreconnect = {{ initial_ms = 100, max_ms = 300 }}\n[[bridge.forward]]\nlocal = \"sensors/#\"\nremote_prefix = \"up/\"\nqos = 1\n"
    )
}

/// The log line value `key=N` summed over every line containing `needle`.
fn sum_logged(logs: &str, needle: &str, key: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
        })
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

#[test]
fn corrupt_store_is_moved_aside_and_the_daemon_serves() {
    let mut ws = Waystation::start();
    // Something on disk: a retained message.
    let mut c = RawClient::connect(ws.addr, "writer");
    c.send(&raw::publish("sensors/r", b"kept", 1, true, false, Some(1)));
    assert_eq!(c.recv(), Pkt::PubAck(1));
    drop(c);
    assert!(ws.terminate().is_some_and(|s| s.success()));

    let db = ws.data_dir().join("store").join("db");
    assert!(db.exists(), "store file {} missing", db.display());
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&db, garbage).expect("overwrite db");

    ws.restart();
    assert!(
        ws.wait_for_log("moved aside", Duration::from_secs(10)),
        "no alert in logs:\n{}",
        ws.logs()
    );
    let aside: Vec<PathBuf> = std::fs::read_dir(ws.data_dir())
        .expect("read data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("store.corrupt-"))
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "expected one store.corrupt-* directory, found {aside:?}"
    );
    // The alert stays visible: /healthz says why with 503, and a metric to alert on.
    let http = ws.http_addr();
    let (code, body) = http_get(http, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("moved aside"), "{body}");
    let (code, metrics) = http_get(http, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l == "waystation_store_moved_aside 1"),
        "{metrics}"
    );
    // The daemon works on an empty store: publish and receive.
    let mut sub = RawClient::connect(ws.addr, "sub");
    sub.send(&raw::subscribe(1, &[("sensors/#", 1)]));
    assert!(matches!(sub.recv(), Pkt::SubAck { .. }));
    let mut pubc = RawClient::connect(ws.addr, "pub");
    pubc.send(&raw::publish(
        "sensors/x",
        b"after",
        1,
        false,
        false,
        Some(7),
    ));
    assert_eq!(pubc.recv(), Pkt::PubAck(7));
    assert_eq!(sub.recv_publish().payload, b"after");
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect http");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A tmpfs mounted on a directory for the life of the guard.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn full_disk_stops_acks_without_crash_and_they_resume_when_space_returns() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    // Upstream down: everything bridged stays in the log.
    let dead_upstream = free_port();
    let mut ws = Waystation::start_with(&bridge_config(dead_upstream, ""));
    ws.kill();
    let data = ws.data_dir();
    std::fs::remove_dir_all(&data).expect("clear data dir");
    let _mount = Tmpfs::mount(&data, "24m").expect("mount tmpfs as root");
    ws.restart();

    // Fill the disk but for a little.
    let filler = data.join("filler");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if=/dev/zero of={} bs=64k 2>/dev/null; true",
            filler.display()
        ))
        .status()
        .expect("dd");
    assert!(status.success());

    let mut client = RawClient::connect(ws.addr, "filler-pub");
    let payload = vec![b'p'; 4096];
    let mut acked = 0u16;
    let mut unacked = None;
    for pid in 1..=400u16 {
        client.send(&raw::publish(
            "sensors/big",
            &payload,
            1,
            false,
            false,
            Some(pid),
        ));
        match client.recv_timeout(Duration::from_secs(3)) {
            Ok(Pkt::PubAck(p)) => {
                assert_eq!(p, pid);
                acked = pid;
            }
            Err(RecvError::Timeout) => {
                unacked = Some(pid);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let stuck = unacked.expect("the disk never filled up: every publish was acknowledged");
    assert!(
        ws.wait_for_log("storage is failing", Duration::from_secs(5)),
        "no storage error logged:\n{}",
        ws.logs()
    );

    // Space returns: the withheld PUBACK arrives, and the daemon carries on.
    std::fs::remove_file(&filler).expect("remove filler");
    match client.recv_timeout(Duration::from_secs(15)) {
        Ok(Pkt::PubAck(p)) => assert_eq!(p, stuck),
        other => panic!(
            "PUBACK {stuck} did not arrive after space returned: {other:?}\n{}",
            ws.logs()
        ),
    }
    assert!(
        ws.wait_for_log("storage recovered", Duration::from_secs(5)),
        "{}",
        ws.logs()
    );
    client.send(&raw::publish(
        "sensors/big",
        b"small",
        1,
        false,
        false,
        Some(stuck + 1),
    ));
    assert_eq!(client.recv(), Pkt::PubAck(stuck + 1));

    // Nothing acknowledged was lost: after a restart, the log holds every acked message
    // (the upstream comes up and receives them all).
    assert_eq!(acked + 1, stuck, "PUBACKs out of order");
    let total = stuck + 1;
    drop(client);
    // Still running, and it shuts down cleanly: the full disk cost no crash.
    assert!(ws.terminate().is_some_and(|s| s.success()), "{}", ws.logs());
    ws.restart();
    let upstream = MosquittoOn::start(dead_upstream);
    let received = upstream.count_within("up/sensors/big", total as usize, Duration::from_secs(30));
    assert!(
        received >= total as usize,
        "upstream got {received} of {total} acknowledged messages\n{}",
        ws.logs()
    );
}

/// A mosquitto started on a given port with a subscriber counting what arrives.
struct MosquittoOn {
    _broker: waystation_e2e::ChildGuard,
    port: u16,
}

impl MosquittoOn {
    fn start(port: u16) -> MosquittoOn {
        let child = Command::new("/usr/sbin/mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).is_ok()
        }));
        MosquittoOn {
            _broker: waystation_e2e::ChildGuard(child),
            port,
        }
    }

    /// Subscribes at QoS 1 and counts messages on `topic` until `want` arrived or `within` passed.
    fn count_within(&self, topic: &str, want: usize, within: Duration) -> usize {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut sub = RawClient::connect(addr, "counter");
        sub.send(&raw::subscribe(1, &[(topic, 1)]));
        let mut count = 0;
        let deadline = std::time::Instant::now() + within;
        while count < want && std::time::Instant::now() < deadline {
            match sub.recv_timeout(Duration::from_millis(500)) {
                Ok(Pkt::Publish(p)) => {
                    count += 1;
                    if let Some(pid) = p.pid {
                        sub.send(&raw::puback(pid));
                    }
                }
                Ok(_) | Err(RecvError::Timeout) => {}
                Err(RecvError::Closed) => break,
            }
        }
        count
    }
}

#[test]
fn messages_older_than_max_age_are_dropped_and_counted() {
    let upstream_port = free_port();
    let ws = Waystation::start_with(&bridge_config(upstream_port, "max_age = 1"));
    let mut client = RawClient::connect(ws.addr, "old-pub");
    for pid in 1..=5u16 {
        client.send(&raw::publish(
            "sensors/old",
            b"stale",
            1,
            false,
            false,
            Some(pid),
        ));
        assert_eq!(client.recv(), Pkt::PubAck(pid));
    }
    assert!(
        wait_until(Duration::from_secs(10), || sum_logged(
            &ws.logs(),
            "older than max_age",
            "dropped"
        ) >= 5),
        "no max_age drop logged:\n{}",
        ws.logs()
    );
    assert_eq!(sum_logged(&ws.logs(), "older than max_age", "dropped"), 5);

    // The upstream comes back: only what is fresh arrives.
    let upstream = MosquittoOn::start(upstream_port);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], upstream.port));
    let mut sub = RawClient::connect(addr, "fresh-counter");
    sub.send(&raw::subscribe(1, &[("up/#", 1)]));
    assert!(matches!(sub.recv(), Pkt::SubAck { .. }));
    client.send(&raw::publish(
        "sensors/old",
        b"fresh",
        1,
        false,
        false,
        Some(6),
    ));
    assert_eq!(client.recv(), Pkt::PubAck(6));
    let mut payloads = Vec::new();
    while let Ok(pkt) = sub.recv_timeout(Duration::from_secs(3)) {
        if let Pkt::Publish(p) = pkt {
            if let Some(pid) = p.pid {
                sub.send(&raw::puback(pid));
            }
            payloads.push(String::from_utf8_lossy(&p.payload).to_string());
        }
    }
    assert!(
        payloads.iter().any(|p| p == "fresh"),
        "fresh message not forwarded: {payloads:?}\n{}",
        ws.logs()
    );
    assert!(
        payloads.iter().all(|p| p == "fresh"),
        "stale messages forwarded: {payloads:?}"
    );
}
