//! The end-to-end test harness: starts the real `waystation` binary (and, for later suites,
//! Debian's `mosquitto`) as child processes on free loopback ports, and cleans them up.
//!
//! The binary is the one `cargo build --workspace --bins` put next to this test binary
//! (`target/<profile>/waystation`), or `$WAYSTATION_BIN`. Every wait here is bounded; every
//! process is killed when its guard drops, also when a test panics.

pub mod clients;
pub mod payload;
pub mod pki;
pub mod raw;
pub mod raw5;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a daemon gets to start listening before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn waystation_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("WAYSTATION_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/waystation
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("waystation");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1 (bound, then released: prefer port 0 in configs when the
/// process can report the port it got).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send_signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Waits for a child for at most `timeout`; kills it (SIGKILL) if it is still running then.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `waystation run` with its own data directory and config file.
pub struct Waystation {
    child: Option<Child>,
    /// The first MQTT listener's address.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    extra_config: String,
    logs: Arc<Mutex<String>>,
    /// Processes started so far (each logs its HTTP address once).
    starts: usize,
    /// RLIMIT_NOFILE (soft and hard) the daemon is started with, if set.
    nofile: Option<u64>,
}

impl Waystation {
    /// Starts with the default config, one listener on a free loopback port.
    pub fn start() -> Waystation {
        Waystation::start_with("")
    }

    /// Starts with `extra` TOML added to the generated config (e.g. a `[limits]` table).
    /// Unless `extra` has its own `[[listener]]`, one listener on a free port is added.
    pub fn start_with(extra: &str) -> Waystation {
        Waystation::start_in(extra, None)
    }

    /// Like [`Waystation::start_with`], with the data directory at `data_dir` (e.g. on a test
    /// file system such as the power-cut one) instead of inside the daemon's own temporary
    /// directory: `data_dir()` is a symlink to it. `data_dir` must exist.
    pub fn start_with_data_dir(extra: &str, data_dir: &Path) -> Waystation {
        Waystation::start_in(extra, Some(data_dir))
    }

    /// Like [`Waystation::start_with`], with the daemon's open files limit (soft and hard)
    /// set to `nofile` before it runs, so it cannot raise it.
    pub fn start_with_nofile(extra: &str, nofile: u64) -> Waystation {
        Waystation::start_in_limited(extra, None, Some(nofile))
    }

    fn start_in(extra: &str, data_dir: Option<&Path>) -> Waystation {
        Waystation::start_in_limited(extra, data_dir, None)
    }

    fn start_in_limited(extra: &str, data_dir: Option<&Path>, nofile: Option<u64>) -> Waystation {
        let dir = tempfile::Builder::new()
            .prefix("waystation-e2e-")
            .tempdir()
            .expect("tempdir");
        if let Some(data_dir) = data_dir {
            std::os::unix::fs::symlink(data_dir, dir.path().join("data"))
                .expect("symlink the data directory");
        }
        let mut ws = Waystation {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            extra_config: extra.to_string(),
            logs: Arc::new(Mutex::new(String::new())),
            starts: 0,
            nofile,
        };
        ws.spawn(0);
        ws
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The config the next `restart` uses (what the test adds to the harness's own keys).
    pub fn set_extra_config(&mut self, extra: &str) {
        self.extra_config = extra.to_string();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("waystation.toml")
    }

    /// `host:port` of the first listener, for command-line clients.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn spawn(&mut self, port: u16) {
        let mut config = format!(
            "[gateway]\nid = \"e2e\"\ndata_dir = \"{}\"\n\n",
            self.data_dir().display()
        );
        if !self.extra_config.contains("[[listener]]") {
            config.push_str(&format!("[[listener]]\nbind = \"127.0.0.1:{port}\"\n\n"));
        }
        // Every daemon gets its own free HTTP port unless the test sets one.
        if !self.extra_config.contains("[http]") {
            config.push_str("[http]\nbind = \"127.0.0.1:0\"\n\n");
        }
        config.push_str(&self.extra_config);
        std::fs::write(self.config_path(), config).expect("write config");

        let mut cmd = Command::new(waystation_bin());
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: between fork and exec only setrlimit (async-signal-safe) runs, on a
            // struct copied into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(["run", "--config"])
            .arg(self.config_path())
            .env(
                "RUST_LOG",
                std::env::var("WAYSTATION_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn waystation");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs = Arc::clone(&self.logs);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(addr) = line
                        .split("listening on ")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    {
                        sent = addr_tx.send(addr).is_ok();
                    }
                }
                let mut logs = logs.lock().unwrap_or_else(|p| p.into_inner());
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        self.child = Some(child);
        self.starts += 1;
        match addr_rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => self.addr = addr,
            Err(_) => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                self.kill();
                panic!(
                    "waystation did not start listening within {START_TIMEOUT:?} (exit: {status:?}); logs:\n{}",
                    self.logs()
                );
            }
        }
    }

    /// The current process's HTTP address (`[http] bind`, a free port unless the test set
    /// one), from its log line: the logs hold one such line per start, so the last one, once
    /// this start has written it.
    pub fn http_addr(&self) -> SocketAddr {
        const MARKER: &str = "/api/v1/status at http://";
        assert!(
            wait_until(Duration::from_secs(10), || self
                .logs()
                .matches(MARKER)
                .count()
                >= self.starts),
            "no HTTP server line for start {} in the logs:\n{}",
            self.starts,
            self.logs()
        );
        let logs = self.logs();
        let rest = logs.rsplit(MARKER).next().unwrap_or_default();
        rest.split(['/', ' ', '\n'])
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP address after {MARKER:?} in:\n{logs}"))
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the logs contain `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to 15 s; returns the exit status (None: it had to be killed).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        send_signal(&child, libc::SIGTERM);
        wait_with_timeout(&mut child, Duration::from_secs(15))
    }

    /// Starts the daemon again on the same port and data directory (after `kill` or
    /// `terminate`; kills a running one first).
    pub fn restart(&mut self) {
        self.kill();
        let port = self.addr.port();
        self.spawn(port);
    }

    /// A TCP connection to the first listener.
    pub fn connect_tcp(&self) -> TcpStream {
        let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .expect("connect to waystation");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set_read_timeout");
        stream
    }
}

impl Drop for Waystation {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- waystation logs ---\n{}", self.logs());
        }
    }
}

/// A plain HTTP/1.1 GET with `Connection: close` (connect and read bounded by 5 s / 10 s);
/// returns the status code (0 if none could be read) and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(5))).ok();
    if write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let response = String::from_utf8_lossy(&raw);
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

/// The value of the Prometheus sample named exactly `name` (labels included, e.g.
/// `waystation_ingest_pauses_total`) in a `/metrics` body, if present.
pub fn metric_sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`, `RssAnon`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Runs a command-line program (e.g. `mosquitto_pub`) with a timeout; returns its status
/// and stdout. The process is killed if it overruns.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> (Option<ExitStatus>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let status = wait_with_timeout(&mut child, timeout);
    let out = reader.join().unwrap_or_default();
    (status, out)
}

/// A child process killed when dropped (for `mosquitto_sub` and the like running in the
/// background of a test).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's `mosquitto` on a loopback port, as the upstream (cloud) broker or the devices'
/// broker in tests, with a config suited to counting every
/// message: no queue limit for a subscriber (Mosquitto's default of 1,000 queued messages
/// drops QoS 1 messages for a slow subscriber while acking the publisher, FACTS.md), and
/// persistence, so that the test's persistent subscriber session and its subscription
/// survive `stop` + `start_again` (a graceful SIGTERM writes the database). Without that,
/// a bridge reconnecting before the test's subscriber has subscribed again would have its
/// messages acked and dropped by the upstream: a loss that is not Waystation's.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("ws-upstream-")
            .tempdir()
            .expect("tempdir");
        let conf = format!(
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             autosave_interval 0\nmax_queued_messages 0\nmax_inflight_messages 100\nset_tcp_nodelay true\n\
             log_dest none\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut u = Mosquitto {
            child: None,
            port,
            dir,
        };
        u.spawn();
        u
    }

    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
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
        let up = wait_until(START_TIMEOUT, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        assert!(up, "upstream mosquitto did not listen on {addr}");
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, signal);
            }
        }
    }

    /// SIGSTOP: connections stay open, nothing is answered (a stalled cloud).
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// An outage: SIGTERM (Mosquitto saves its sessions), waits for the exit.
    pub fn stop(&mut self) {
        self.thaw();
        self.signal(libc::SIGTERM);
        if let Some(mut c) = self.child.take() {
            wait_with_timeout(&mut c, Duration::from_secs(10));
        }
    }

    /// Back on the same port with the saved sessions.
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.thaw();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
