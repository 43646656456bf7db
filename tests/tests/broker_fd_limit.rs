//! The daemon at its open files limit (issue 14): started with RLIMIT_NOFILE 64 (soft and
//! hard, so it cannot raise it), more clients than fit try to connect. accept() then fails
//! with EMFILE; the daemon must stay up, keep serving the clients it has, not spin on the
//! failing accept (CPU time over two seconds, not a latency), log it rarely, and accept again
//! once clients have closed.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use waystation_e2e::raw::{self, Pkt, RawClient};
use waystation_e2e::{wait_until, Waystation};

/// The daemon's whole descriptor budget (it uses ~15 with no client).
const NOFILE: u64 = 64;
/// More clients than can fit under NOFILE.
const TRY_CLIENTS: usize = 80;

/// A client that sent CONNECT: `Some` once its CONNACK came within `wait`.
fn try_connect(addr: SocketAddr, id: &str, wait: Duration) -> (RawClient, bool) {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("TCP connect to {addr} (the backlog takes it): {e}"));
    let mut c = RawClient::tcp_from(stream);
    c.send(&raw::Connect::new(id).encode());
    let ok = matches!(c.recv_timeout(wait), Ok(Pkt::ConnAck { code: 0, .. }));
    (c, ok)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().expect("stat format");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn at_its_descriptor_limit_the_daemon_keeps_serving_and_does_not_spin() {
    let ws = Waystation::start_with_nofile(
        "[limits]\nmax_connections = 1000\nmax_connection_rate = 0\n",
        NOFILE,
    );
    let pid = ws.pid().expect("daemon pid");
    let mut sub = RawClient::connect(ws.addr, "fd-sub");
    sub.subscribe_ok(1, &[("fd/#", 1)]);
    let mut publisher = RawClient::connect(ws.addr, "fd-pub");

    // Fill the table: clients until one gets no CONNACK (its connection waits in the backlog).
    let mut clients = Vec::new();
    let mut refused = None;
    for i in 0..TRY_CLIENTS {
        let (c, ok) = try_connect(ws.addr, &format!("fd-{i}"), Duration::from_secs(2));
        if !ok {
            refused = Some(c);
            break;
        }
        clients.push(c);
    }
    assert!(
        refused.is_some(),
        "all {TRY_CLIENTS} clients connected under a limit of {NOFILE} descriptors"
    );
    assert!(
        clients.len() >= 10,
        "only {} clients fit in {NOFILE} descriptors",
        clients.len()
    );
    assert!(
        ws.wait_for_log("accept failed", Duration::from_secs(10)),
        "no accept failure logged"
    );

    // Out of descriptors, with a connection pending: no busy loop. Two seconds of a spinning
    // accept loop cost ~2 s of CPU; backing off 100 ms per failure costs next to nothing.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 40,
        "the daemon used {used} ticks of CPU in 2 s while out of descriptors (spinning on accept?)"
    );
    let failures = ws.logs().matches("accept failed").count();
    assert!(
        failures <= 2,
        "accept failures logged {failures} times: at most once per 10 s"
    );

    // Existing clients are still served.
    publisher.send(&raw::publish(
        "fd/a",
        b"still here",
        1,
        false,
        false,
        Some(1),
    ));
    assert_eq!(publisher.recv(), Pkt::PubAck(1));
    let got = sub.recv_publish();
    assert_eq!(
        (got.topic.as_str(), got.payload.as_slice()),
        ("fd/a", &b"still here"[..])
    );

    // Descriptors free up: the pending client is accepted, and a new one too.
    clients.truncate(clients.len() - 5);
    let mut pending = refused.expect("checked above");
    assert!(
        matches!(
            pending.recv_timeout(Duration::from_secs(10)),
            Ok(Pkt::ConnAck { code: 0, .. })
        ),
        "the client waiting in the backlog was not accepted once descriptors were free"
    );
    let mut late = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (c, ok) = try_connect(ws.addr, "fd-late", Duration::from_secs(2));
            late = Some(c);
            ok
        }),
        "no new client connected after others closed"
    );
    assert!(
        ws.wait_for_log("accepting connections again", Duration::from_secs(5)),
        "recovery not logged"
    );
    drop(late);
    drop(clients);
}
