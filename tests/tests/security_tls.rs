//! TLS (issue 7): TLS listeners with real clients (`mosquitto_pub`/`mosquitto_sub` with
//! `--cafile/--cert/--key`), client certificates as identity, certificate reload on SIGHUP
//! without dropping connections, and a bridge over mutual TLS to Debian's mosquitto.
//! Certificates are made at test time with Debian's `openssl`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use waystation_e2e::pki::Pki;
use waystation_e2e::{free_port, raw, run_with_timeout, wait_until, ChildGuard, Waystation};

const WAIT: Duration = Duration::from_secs(15);

/// GET /api/v1/status as JSON.
fn status(http: SocketAddr) -> serde_json::Value {
    let mut s = TcpStream::connect_timeout(&http, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/v1/status HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read http");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http head");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("status JSON: {e}: {body}"))
}

/// The user name of the connected client `client_id`, as /api/v1/status shows it.
fn username_of(http: SocketAddr, client_id: &str) -> Option<Option<String>> {
    let status = status(http);
    let clients = status["clients"].as_array()?;
    clients
        .iter()
        .find(|c| c["client_id"] == client_id)
        .map(|c| c["username"].as_str().map(str::to_string))
}

/// `mosquitto_pub` with `args`; true when it exited 0.
fn mosquitto_pub(port: u16, args: &[&str]) -> bool {
    let (status, _) = run_with_timeout(
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(15),
    );
    status.is_some_and(|s| s.success())
}

/// A `mosquitto_sub` in the background; its output lines are collected.
struct Sub {
    _child: ChildGuard,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sub {
    fn start(port: u16, args: &[&str]) -> Sub {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let mut stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pending = String::new();
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(i) = pending.find('\n') {
                    let line: String = pending.drain(..=i).collect();
                    sink.lock().unwrap().push(line.trim_end().to_string());
                }
            }
        });
        Sub {
            _child: ChildGuard(child),
            lines,
        }
    }

    fn has(&self, line: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l == line)
    }

    fn wait_for(&self, line: &str) -> bool {
        wait_until(WAIT, || self.has(line))
    }
}

/// Sends a plain MQTT CONNECT to a TLS port: no CONNACK may come back, and the connection
/// must be closed.
fn plain_connect_is_refused(addr: SocketAddr) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&raw::Connect::new("plain").encode()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_ne!(
        got.first(),
        Some(&0x20),
        "a plain CONNECT got a CONNACK on a TLS listener: {got:02x?}"
    );
}

fn tls_listener(pki: &Pki, server: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\"{extra} }}\n\n",
        pki.crt(server),
        pki.key(server)
    )
}

// Issue: "Listeners: [[listener]] tls = { cert, key, client_ca } with rustls; TLS 1.2+".
#[test]
fn tls_listener_serves_trusting_clients_and_refuses_plain_tcp_and_other_cas() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("other-ca");
    pki.leaf("server", "ca", "localhost", true);
    let ws = Waystation::start_with(&tls_listener(&pki, "server", ""));
    let port = ws.port();
    let ca = pki.crt("ca");

    assert!(mosquitto_pub(
        port,
        &[
            "--cafile",
            &ca,
            "-t",
            "tls/retained",
            "-m",
            "over-tls",
            "-r",
            "-q",
            "1"
        ]
    ));
    let sub = Sub::start(
        port,
        &["--cafile", &ca, "-t", "tls/#", "-C", "1", "-W", "10"],
    );
    assert!(
        sub.wait_for("over-tls"),
        "a TLS subscriber did not get the message a TLS publisher sent"
    );
    // TLS 1.2 is accepted too (1.3 is what the clients above negotiated).
    assert!(mosquitto_pub(
        port,
        &[
            "--cafile",
            &ca,
            "--tls-version",
            "tlsv1.2",
            "-t",
            "tls/v12",
            "-m",
            "x"
        ]
    ));

    plain_connect_is_refused(ws.addr);
    assert!(
        !mosquitto_pub(port, &["-t", "tls/plain", "-m", "x"]),
        "plain TCP client was served"
    );
    assert!(
        !mosquitto_pub(
            port,
            &[
                "--cafile",
                &pki.crt("other-ca"),
                "-t",
                "tls/wrong-ca",
                "-m",
                "x"
            ]
        ),
        "client trusting another CA connected"
    );
    // The daemon is still fine after the refusals.
    assert!(mosquitto_pub(
        port,
        &["--cafile", &ca, "-t", "tls/after", "-m", "x"]
    ));
}

// Issue: "with client_ca, a client certificate is required and use_identity_as_username =
// true maps its CN to the username".
#[test]
fn client_certificate_is_required_and_its_cn_is_the_username() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("rogue-ca");
    pki.leaf("server", "ca", "localhost", true);
    pki.leaf("sensor", "ca", "sensor-42", false);
    pki.leaf("rogue", "rogue-ca", "sensor-42", false);
    let extra = format!(
        ", client_ca = \"{}\", use_identity_as_username = true",
        pki.crt("ca")
    );
    let ws = Waystation::start_with(&tls_listener(&pki, "server", &extra));
    let port = ws.port();
    let http = ws.http_addr();
    let ca = pki.crt("ca");

    assert!(
        !mosquitto_pub(port, &["--cafile", &ca, "-t", "id/none", "-m", "x"]),
        "a client without a certificate was served"
    );
    assert!(
        !mosquitto_pub(
            port,
            &[
                "--cafile",
                &ca,
                "--cert",
                &pki.crt("rogue"),
                "--key",
                &pki.key("rogue"),
                "-t",
                "id/rogue",
                "-m",
                "x"
            ]
        ),
        "a certificate from another CA was accepted"
    );

    // The user name a client sends is replaced by its certificate's CN.
    let cert = [
        "--cafile",
        ca.as_str(),
        "--cert",
        &pki.crt("sensor"),
        "--key",
        &pki.key("sensor"),
    ];
    let sub = Sub::start(
        port,
        &[
            &cert[..],
            &["-i", "dev-42", "-u", "someone-else", "-t", "id/#"],
        ]
        .concat(),
    );
    let mut seen = None;
    let found = wait_until(WAIT, || {
        seen = username_of(http, "dev-42");
        seen.is_some()
    });
    assert!(found, "client dev-42 never showed up in /api/v1/status");
    assert_eq!(seen, Some(Some("sensor-42".to_string())));
    assert!(mosquitto_pub(
        port,
        &[&cert[..], &["-t", "id/hello", "-m", "certified"]].concat()
    ));
    assert!(sub.wait_for("certified"));
}

fn sighup(ws: &Waystation) {
    // SAFETY: kill(2) on the daemon this test spawned.
    unsafe {
        libc::kill(ws.pid().expect("running") as libc::pid_t, libc::SIGHUP);
    }
}

// Issue: "Certificates are reloaded on SIGHUP without dropping connections."
#[test]
fn sighup_reloads_certificates_and_keeps_open_connections() {
    let pki = Pki::new();
    pki.ca("ca1");
    pki.ca("ca2");
    pki.leaf("server1", "ca1", "localhost", true);
    pki.leaf("server2", "ca2", "localhost", true);
    std::fs::copy(pki.path("server1.crt"), pki.path("live.crt")).unwrap();
    std::fs::copy(pki.path("server1.key"), pki.path("live.key")).unwrap();
    let ws = Waystation::start_with(&tls_listener(&pki, "live", ""));
    let port = ws.port();
    let http = ws.http_addr();
    let (ca1, ca2) = (pki.crt("ca1"), pki.crt("ca2"));

    let keeper = Sub::start(port, &["--cafile", &ca1, "-i", "keeper", "-t", "reload/#"]);
    assert!(
        wait_until(WAIT, || username_of(http, "keeper").is_some()),
        "keeper did not connect"
    );
    assert!(mosquitto_pub(
        port,
        &["--cafile", &ca1, "-t", "reload/x", "-m", "before"]
    ));
    assert!(keeper.wait_for("before"));

    // A broken certificate: the reload fails, the old one stays in use.
    std::fs::write(pki.path("live.crt"), "not a certificate\n").unwrap();
    sighup(&ws);
    assert!(
        ws.wait_for_log("TLS certificates not reloaded", WAIT),
        "a bad certificate was not reported"
    );
    assert!(mosquitto_pub(
        port,
        &["--cafile", &ca1, "-t", "reload/x", "-m", "still-old"]
    ));
    assert!(keeper.wait_for("still-old"));

    // The new certificate (another CA, so clients can tell which one they got).
    std::fs::copy(pki.path("server2.key"), pki.path("live.key")).unwrap();
    std::fs::copy(pki.path("server2.crt"), pki.path("live.crt")).unwrap();
    sighup(&ws);
    assert!(
        ws.wait_for_log("SIGHUP: TLS certificates reloaded", WAIT),
        "no reload logged"
    );
    assert!(
        !mosquitto_pub(port, &["--cafile", &ca1, "-t", "reload/x", "-m", "old-ca"]),
        "the old certificate is still served"
    );
    assert!(mosquitto_pub(
        port,
        &["--cafile", &ca2, "-t", "reload/x", "-m", "after"]
    ));
    // The connection made before the reloads is still up and receiving.
    assert!(
        keeper.wait_for("after"),
        "the connection opened before SIGHUP lost messages"
    );
    assert!(!keeper.has("old-ca"));
    // ...on its first connection (mosquitto_sub would reconnect silently).
    let logs = ws.logs();
    let keeper_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("client_id=keeper"))
        .collect();
    assert_eq!(
        keeper_lines
            .iter()
            .filter(|l| l.contains("client connected"))
            .count(),
        1,
        "{keeper_lines:#?}"
    );
    assert!(
        !keeper_lines
            .iter()
            .any(|l| l.contains("closed") || l.contains("disconnected")),
        "{keeper_lines:#?}"
    );
}

// Issue: "Bridges: TLS to the upstream with ... a CA file, client certificate and key (mutual
// TLS), SNI from the address; password_file ... Secrets never appear in logs or in
// /api/v1/status."
#[test]
fn bridge_forwards_over_mutual_tls_to_mosquitto_with_a_password_file() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.leaf("upstream", "ca", "localhost", true);
    pki.leaf("gateway", "ca", "site1-gateway", false);
    let secret = "upstream-Secret-7f3a";
    let passwd = pki.path("upstream.passwd");
    let out = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["site1", secret])
        .output()
        .expect("mosquitto_passwd");
    assert!(
        out.status.success(),
        "mosquitto_passwd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let password_file = pki.path("bridge.pw");
    std::fs::write(&password_file, format!("{secret}\n")).unwrap();

    let upstream_port = free_port();
    let conf = pki.path("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {upstream_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             tls_version tlsv1.2\nallow_anonymous false\npassword_file {}\n",
            pki.crt("ca"),
            pki.crt("upstream"),
            pki.key("upstream"),
            passwd.display()
        ),
    )
    .unwrap();
    let mosquitto = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    let _mosquitto = ChildGuard(mosquitto);
    let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
    assert!(
        wait_until(WAIT, || TcpStream::connect_timeout(
            &upstream,
            Duration::from_millis(200)
        )
        .is_ok()),
        "mosquitto did not start"
    );

    let client = [
        "--cafile",
        &pki.crt("ca"),
        "--cert",
        &pki.crt("gateway"),
        "--key",
        &pki.key("gateway"),
        "-u",
        "site1",
        "-P",
        secret,
    ];
    let cloud = Sub::start(
        upstream_port,
        &[&client[..], &["-t", "site1/#", "-v"]].concat(),
    );

    let ws = Waystation::start_with(&format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"localhost:{upstream_port}\"\nusername = \"site1\"\npassword_file = \"{}\"\n\
         tls = {{ ca_file = \"{}\", cert = \"{}\", key = \"{}\" }}\nreconnect = {{ initial_ms = 100, max_ms = 1000 }}\n\
         [[bridge.forward]]\nlocal = \"sensors/#\"\nremote_prefix = \"site1/\"\n",
        password_file.display(),
        pki.crt("ca"),
        pki.crt("gateway"),
        pki.key("gateway"),
    ));
    let http = ws.http_addr();
    // "localhost": rumqttc sends it as SNI and checks it against the certificate's DNS name.
    assert!(
        wait_until(WAIT, || status(http)["bridges"][0]["connected"] == true),
        "the bridge did not connect over TLS: {}",
        status(http)["bridges"]
    );
    // A subscriber on mosquitto may need a moment: publish until the first one arrives.
    assert!(wait_until(WAIT, || {
        mosquitto_pub(
            ws.port(),
            &["-t", "sensors/probe", "-m", "probe", "-q", "1"],
        );
        cloud.has("site1/sensors/probe probe")
    }));
    for i in 0..20 {
        assert!(mosquitto_pub(
            ws.port(),
            &[
                "-t",
                &format!("sensors/t{i}"),
                "-m",
                &format!("m{i}"),
                "-q",
                "1"
            ]
        ));
    }
    for i in 0..20 {
        assert!(
            cloud.wait_for(&format!("site1/sensors/t{i} m{i}")),
            "message {i} did not arrive upstream"
        );
    }

    let status_text = status(http).to_string();
    assert!(
        !status_text.contains(secret),
        "the password is in /api/v1/status"
    );
    assert!(!ws.logs().contains(secret), "the password is in the logs");
}
