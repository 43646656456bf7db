//! Authentication (issue 7): Mosquitto 2 password files, `waystation passwd`, anonymous
//! access, CONNACK 4/5 with the refusal logged (never the password) and counted.

mod security_common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use security_common::{connect_as, metric, mosquitto_pub_ok, start};
use waystation_e2e::raw::MosquittoSub;
use waystation_e2e::{run_with_timeout, waystation_bin};

fn mosquitto_passwd(file: &Path, user: &str, password: &str, create: bool) {
    let mut cmd = Command::new("mosquitto_passwd");
    if create {
        cmd.arg("-c");
    }
    let status = cmd
        .arg("-b")
        .arg(file)
        .args([user, password])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(status.success());
}

fn auth_config(file: &Path) -> String {
    format!("[auth]\npassword_file = \"{}\"\n", file.display())
}

// A password file made by Debian's mosquitto_passwd is used as is: the right password
// gets in (mosquitto_pub -u/-P, delivered to a mosquitto_sub that also logged in), a wrong
// one or an unknown user gets CONNACK 4, an anonymous client CONNACK 5 (a password file
// turns anonymous access off); each refusal is logged with client id and address, never
// the password, and counted in waystation_auth_failures_total.
#[test]
fn mosquitto_passwd_file_is_accepted_and_bad_credentials_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    mosquitto_passwd(&file, "alice", "s3cret-alice", true);
    mosquitto_passwd(&file, "bob", "s3cret-bob", false);
    let ws = start(&auth_config(&file));

    let sub = MosquittoSub::start(
        ws.port(),
        &["-u", "bob", "-P", "s3cret-bob", "-t", "site/#", "-q", "1"],
    );
    assert!(mosquitto_pub_ok(
        ws.port(),
        &[
            "-u",
            "alice",
            "-P",
            "s3cret-alice",
            "-t",
            "site/a",
            "-m",
            "hello",
            "-q",
            "1"
        ]
    ));
    assert_eq!(
        sub.next_message(Duration::from_secs(5)).as_deref(),
        Some("site/a hello")
    );
    assert!(!mosquitto_pub_ok(
        ws.port(),
        &[
            "-u",
            "alice",
            "-P",
            "wrong-password-xyz",
            "-t",
            "site/a",
            "-m",
            "x"
        ]
    ));

    let (mut c, code) = connect_as(&ws, "dev-wrong", Some("alice"), Some("not-her-password"));
    assert_eq!(code, 4, "wrong password: bad user name or password");
    assert!(c.closed_within(Duration::from_secs(3)));
    let (mut c, code) = connect_as(&ws, "dev-unknown", Some("mallory"), Some("whatever-pw"));
    assert_eq!(code, 4, "unknown user");
    assert!(c.closed_within(Duration::from_secs(3)));
    let (mut c, code) = connect_as(&ws, "dev-anon", None, None);
    assert_eq!(code, 5, "anonymous with a password file: not authorised");
    assert!(c.closed_within(Duration::from_secs(3)));
    let (_ok, code) = connect_as(&ws, "dev-ok", Some("bob"), Some("s3cret-bob"));
    assert_eq!(code, 0);

    assert!(ws.wait_for_log("client_id=dev-unknown", Duration::from_secs(5)));
    let logs = ws.logs();
    for id in ["dev-wrong", "dev-unknown", "dev-anon"] {
        let line = logs
            .lines()
            .find(|l| l.contains("authentication failed") && l.contains(id))
            .unwrap_or_else(|| panic!("no log for {id}:\n{logs}"));
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }
    for secret in [
        "not-her-password",
        "whatever-pw",
        "wrong-password-xyz",
        "s3cret",
    ] {
        assert!(!logs.contains(secret), "a password appears in the logs");
    }
    // mosquitto_pub with the wrong password + three raw refusals.
    assert_eq!(metric(&ws, "waystation_auth_failures_total"), 4.0);
}

// `waystation passwd FILE USER` reads the password from stdin when it is not a terminal
// (never from argv), creates the file with mode 0600, changes a password in place and
// removes a user with --delete; the daemon (and Mosquitto's format) accept the result.
#[test]
fn waystation_passwd_adds_changes_and_deletes_users() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let passwd = |user: &str, stdin: Option<&str>, delete: bool| -> bool {
        let mut cmd = Command::new(waystation_bin());
        cmd.arg("passwd")
            .arg(&file)
            .arg(user)
            .args(["--iterations", "1000"]);
        if delete {
            cmd.arg("--delete");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        waystation_e2e::wait_with_timeout(&mut child, Duration::from_secs(20))
            .is_some_and(|s| s.success())
    };
    assert!(passwd("sensor1", Some("first-pw\n"), false));
    assert!(passwd("sensor2", Some("other-pw\n"), false));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .starts_with("sensor1:$7$1000$"));
    assert!(
        !passwd("sensor3", Some("\n"), false),
        "empty password refused"
    );

    let ws = start(&auth_config(&file));
    assert_eq!(
        connect_as(&ws, "s1", Some("sensor1"), Some("first-pw")).1,
        0
    );
    drop(ws);
    assert!(passwd("sensor1", Some("second-pw\n"), false));
    assert!(passwd("sensor2", None, true));
    assert!(
        !passwd("sensor2", None, true),
        "deleting a missing user fails"
    );
    let ws = start(&auth_config(&file));
    assert_eq!(
        connect_as(&ws, "s1", Some("sensor1"), Some("first-pw")).1,
        4
    );
    assert_eq!(
        connect_as(&ws, "s1", Some("sensor1"), Some("second-pw")).1,
        0
    );
    assert_eq!(
        connect_as(&ws, "s2", Some("sensor2"), Some("other-pw")).1,
        4
    );
    // mosquitto_passwd can keep managing the same file.
    mosquitto_passwd(&file, "sensor4", "fourth-pw", false);
    drop(ws);
    let ws = start(&auth_config(&file));
    assert_eq!(
        connect_as(&ws, "s4", Some("sensor4"), Some("fourth-pw")).1,
        0
    );
    assert_eq!(
        connect_as(&ws, "s1", Some("sensor1"), Some("second-pw")).1,
        0
    );
}

fn check_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\ndata_dir = \"{}\"\n{text}",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let out = Command::new(waystation_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Anonymous access: loopback-only listeners with no password file let anonymous clients
// in (every other e2e suite relies on it); a non-loopback listener with anonymous access
// refuses to start unless allow_anonymous = true is written, and then logs a warning.
#[test]
fn anonymous_access_needs_explicit_consent_off_loopback() {
    let ws = start("");
    assert_eq!(
        connect_as(&ws, "anon-local", None, None).1,
        0,
        "loopback only, no password file"
    );
    drop(ws);

    let (code, err) = check_config("[[listener]]\nbind = \"0.0.0.0:0\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("auth.allow_anonymous") && err.contains("0.0.0.0:0"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\ndata_dir = \"{}\"\n[[listener]]\nbind = \"0.0.0.0:0\"\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let (status, _) = run_with_timeout(
        Command::new(waystation_bin())
            .args(["run", "--config"])
            .arg(&path),
        Duration::from_secs(10),
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "run refuses to start"
    );

    let ws = start("[[listener]]\nbind = \"0.0.0.0:0\"\n[auth]\nallow_anonymous = true\n");
    assert!(
        ws.wait_for_log(
            "allow_anonymous = true on a non-loopback listener",
            Duration::from_secs(5)
        ),
        "{}",
        ws.logs()
    );
    assert_eq!(connect_as(&ws, "anon-net", None, None).1, 0);

    // allow_anonymous = false with no password file could let nobody in: refused.
    assert_eq!(check_config("[auth]\nallow_anonymous = false\n").0, 2);
    // A broken password file is named with its line.
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "# users\nalice:plaintext\n").unwrap();
    let (code, err) = check_config(&format!("[auth]\npassword_file = \"{}\"\n", pw.display()));
    assert_eq!(code, 2);
    assert!(
        err.contains("line 2") && err.contains(&pw.display().to_string()),
        "{err}"
    );
}
