//! The daemon's command line: `check-config` (exit 0 / exit 2 naming key and line),
//! `--help` on every command, several listeners, and clean shutdown on SIGTERM / SIGINT.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use waystation_e2e::raw::RawClient;
use waystation_e2e::{wait_until, wait_with_timeout, waystation_bin, Waystation};

/// Runs the daemon binary with `args` (10 s at most); returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(waystation_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn waystation");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_with_timeout(&mut child, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("waystation {args:?} did not exit within 10 s"));
    (
        status.code().unwrap_or(-1),
        out_t.join().unwrap(),
        err_t.join().unwrap(),
    )
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(path: &Path) -> (i32, String, String) {
    run(&["check-config", "--config", path.to_str().unwrap()])
}

// Issue: "`waystation check-config --config <file>` validates and exits"; the shipped
// config/waystation.toml and an empty file (every key has a default) are valid: exit 0.
#[test]
fn check_config_accepts_good_files() {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/waystation.toml");
    let (code, out, err) = check_config(&shipped);
    assert_eq!(code, 0, "config/waystation.toml rejected: {out}{err}");
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = check_config(&write_config(dir.path(), "empty.toml", ""));
    assert_eq!(code, 0, "an empty config must be valid: {out}{err}");
    let full = "[gateway]\nid = \"gw\"\ndata_dir = \"/tmp/x\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nbind = \"[::1]:1883\"\n\n[limits]\nmax_packet_size = 1024\nmax_connections = 5\nmax_inflight = 10\nmax_queued_messages = 50\nconnect_timeout = 3\n";
    let (code, out, err) = check_config(&write_config(dir.path(), "full.toml", full));
    assert_eq!(code, 0, "every documented key: {out}{err}");
}

// A `[[pipeline]]` rule no bridge forwards to does nothing: `check-config` accepts the file
// (it is not wrong, only useless) but warns, naming the rule; a rule a bridge reaches is
// not warned about.
#[test]
fn check_config_warns_of_a_pipeline_rule_no_bridge_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:1\"\n\n[[bridge.forward]]\nlocal = \"sensors/#\"\n\n[[pipeline]]\ntopics = \"sensors/+/events\"\nvalidate = \"event-v1\"\n\n[[pipeline]]\ntopics = \"meters/+/events\"\nvalidate = \"event-v1\"\n";
    let (code, out, err) = check_config(&write_config(dir.path(), "pipe.toml", text));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning") && err.contains("\"meters/+/events\""),
        "the unreachable rule is named: {err}"
    );
    assert!(
        !err.contains("\"sensors/+/events\""),
        "the reachable rule is not: {err}"
    );
}

/// Asserts exit 2 and that the message names every `needles` entry.
fn assert_rejected(text: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "bad.toml", text);
    let (code, out, err) = check_config(&path);
    let all = format!("{out}{err}");
    assert_eq!(code, 2, "want exit 2 for:\n{text}\ngot {code}: {all}");
    for n in needles {
        assert!(
            all.contains(n),
            "the error must mention {n:?}; it says:\n{all}"
        );
    }
    // `run` refuses the same file with the same code.
    let (code, _, _) = run(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "`run` with a bad config must exit 2 too");
}

// Issue: "an unknown key ... is a clear error naming the key and line, exit code 2".
#[test]
fn check_config_rejects_unknown_key_naming_key_and_line() {
    assert_rejected(
        "[gateway]\nid = \"x\"\n\n[limits]\nmax_inflight = 10\nmax_inflihgt = 5\n",
        &["max_inflihgt", "line 6"],
    );
    assert_rejected(
        "[gateway]\nid = \"x\"\n[gatway]\nid = \"y\"\n",
        &["gatway", "line 3"],
    );
}

// Issue: "a wrong type ... is a clear error naming the key and line, exit code 2".
#[test]
fn check_config_rejects_wrong_type_naming_key_and_line() {
    assert_rejected(
        "[limits]\nmax_connections = 10\nmax_inflight = \"lots\"\n",
        &["max_inflight", "line 3"],
    );
    assert_rejected("[gateway]\nid = 42\n", &["id", "line 2"]);
}

// Issue: "a bad address is a clear error naming the key and line, exit code 2".
#[test]
fn check_config_rejects_bad_address_naming_key_and_line() {
    assert_rejected(
        "[gateway]\nid = \"x\"\n\n[[listener]]\nbind = \"not-an-address\"\n",
        &["bind", "line 5"],
    );
    assert_rejected(
        "[[listener]]\nbind = \"127.0.0.1:99999\"\n",
        &["bind", "line 2"],
    );
}

// A value out of its documented range (max_packet_size 64..=16842752) is refused, naming
// the key.
#[test]
fn check_config_rejects_out_of_range_limit() {
    assert_rejected("[limits]\nmax_packet_size = 10\n", &["max_packet_size"]);
    assert_rejected(
        "[limits]\nmax_packet_size = 20000000\n",
        &["max_packet_size"],
    );
}

// Issue: "`--help` on every command".
#[test]
fn help_works_for_every_command() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check-config", "--help"],
        vec!["help", "run"],
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "waystation {args:?}: {out}{err}");
        assert!(
            out.contains("Usage"),
            "waystation {args:?} prints usage: {out}"
        );
    }
    let (_, out, _) = run(&["--help"]);
    assert!(
        out.contains("run") && out.contains("check-config"),
        "top-level help lists the commands: {out}"
    );
    let (_, out, _) = run(&["run", "--help"]);
    assert!(
        out.contains("--config"),
        "run --help documents --config: {out}"
    );
}

fn connect_refused(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

// Issue: "SIGINT/SIGTERM shut down cleanly: stop accepting, close connections, flush,
// exit 0".
#[test]
fn sigterm_shuts_down_cleanly_with_exit_0() {
    let mut ws = Waystation::start();
    let addr = ws.addr;
    let mut client = RawClient::connect(addr, "sigterm-client");
    client.ping();
    let status = ws
        .terminate()
        .expect("waystation must exit within 15 s of SIGTERM");
    assert!(status.success(), "SIGTERM: exit status {status}");
    assert!(
        client.closed_within(Duration::from_secs(2)),
        "client connection closed on shutdown"
    );
    assert!(connect_refused(addr), "no longer accepting after shutdown");
}

#[test]
fn sigint_shuts_down_cleanly_with_exit_0() {
    let mut ws = Waystation::start();
    let addr = ws.addr;
    let mut client = RawClient::connect(addr, "sigint-client");
    let pid = ws.pid().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on the daemon this test spawned (not yet reaped).
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    assert!(
        client.closed_within(Duration::from_secs(10)),
        "client connection closed on SIGINT"
    );
    assert!(
        wait_until(Duration::from_secs(10), || connect_refused(addr)),
        "still accepting after SIGINT"
    );
    // terminate() only reaps it now (it has exited already): its status is SIGINT's.
    let status = ws.terminate().expect("exited");
    assert!(status.success(), "SIGINT: exit status {status}");
    assert!(
        ws.logs().contains("stopped") || ws.logs().contains("shutting down"),
        "shutdown is logged"
    );
}

// Issue: "`[[listener]] bind` (one or more TCP listeners)": two listeners, one broker —
// a subscriber on one receives what a publisher on the other sends.
#[test]
fn two_listeners_serve_one_broker() {
    let ws = Waystation::start_with(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n",
    );
    assert!(
        ws.wait_for_log("waystation started", Duration::from_secs(10)),
        "daemon start not logged"
    );
    let addrs: Vec<SocketAddr> = ws
        .logs()
        .lines()
        .filter_map(|l| l.split("listening on ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(addrs.len(), 2, "two `listening on` lines: {}", ws.logs());
    assert_ne!(addrs[0], addrs[1]);
    let mut sub = RawClient::connect(addrs[0], "l1-sub");
    sub.subscribe_ok(1, &[("two/listeners", 1)]);
    let mut publisher = RawClient::connect(addrs[1], "l2-pub");
    publisher.publish1("two/listeners", b"across", false, 1);
    assert_eq!(sub.recv_publish().payload, b"across");
}
