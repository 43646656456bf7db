//! Authorisation (issue 7): a Mosquitto-style ACL file. Denied SUBSCRIBE filters get 0x80
//! in SUBACK (Mosquitto 2 grants them anyway), denied PUBLISHes are acknowledged but
//! neither stored nor delivered, and live, retained, queued and will messages are all
//! checked against the reader's `read` rights per topic.
//!
//! No password file here: user names are taken at their word (see docs/security.md), which
//! is what lets raw clients claim users without passwords; security_auth covers passwords.

mod security_common;

use std::path::PathBuf;
use std::time::Duration;

use security_common::{connect_packet, metric, start};
use waystation_e2e::raw::{RawClient, Will};
use waystation_e2e::Waystation;

const ACL: &str = "\
# Anonymous clients: read the public topics only.
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#

user root
topic readwrite #

# Every client may write below its own client id, and read its own commands.
pattern write sensors/%c/#
pattern read commands/%c/#

user monitor
topic read sensors/#
";

fn start_with_acl() -> (Waystation, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("acl");
    std::fs::write(&file, ACL).unwrap();
    (
        start(&format!("[acl]\nfile = \"{}\"\n", file.display())),
        dir,
    )
}

fn client(ws: &Waystation, id: &str, user: Option<&str>) -> RawClient {
    RawClient::connect_ok(ws.addr, &connect_packet(id, user, None)).0
}

fn suback(c: &mut RawClient, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    c.subscribe(pid, filters)
}

// SUBACK: granted filters get their QoS, refused ones 0x80 (no read rule could match, or
// a deny covers the whole filter); the refusals are counted.
#[test]
fn denied_subscriptions_get_0x80() {
    let (ws, _dir) = start_with_acl();
    let mut alice = client(&ws, "alice-1", Some("alice"));
    let codes = suback(
        &mut alice,
        1,
        &[
            ("alice/#", 1),
            ("bob/#", 1),
            ("alice/secret/#", 1),
            ("#", 0),
            ("commands/alice-1/+", 1),
            ("commands/other/+", 1),
        ],
    );
    assert_eq!(codes, vec![1, 0x80, 0x80, 0, 1, 0x80]);
    let mut anon = client(&ws, "anon-1", None);
    assert_eq!(
        suback(&mut anon, 1, &[("public/#", 1), ("alice/#", 1)]),
        vec![1, 0x80]
    );
    assert_eq!(
        metric(&ws, "waystation_acl_denied_total{action=\"subscribe\"}"),
        4.0
    );
}

// A PUBLISH without write access: QoS 1 still gets its PUBACK (no negative ack in 3.1.1),
// but nobody receives it and it is not retained; logged and counted. Deny beats a grant.
#[test]
fn denied_publishes_are_acked_but_not_delivered_nor_retained() {
    let (ws, _dir) = start_with_acl();
    let mut root = client(&ws, "root-1", Some("root"));
    root.subscribe_ok(1, &[("#", 1)]);
    let mut alice = client(&ws, "alice-1", Some("alice"));
    alice.publish1("alice/secret/key", b"denied by deny rule", true, 1); // asserts PUBACK
    alice.publish1("public/news", b"no write on public", false, 2);
    alice.publish1("alice/notes", b"allowed", false, 3);
    let p = root.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("alice/notes", &b"allowed"[..]),
        "only the allowed message is delivered"
    );
    root.ack(&p);
    root.expect_silence(Duration::from_millis(300));
    // Not retained either: a new subscriber gets nothing for alice/secret/key.
    let mut root2 = client(&ws, "root-2", Some("root"));
    root2.subscribe_ok(1, &[("alice/secret/#", 1)]);
    root2.expect_silence(Duration::from_millis(300));
    assert_eq!(
        metric(&ws, "waystation_acl_denied_total{action=\"publish\"}"),
        2.0
    );
    assert!(ws.logs().contains("PUBLISH refused"), "{}", ws.logs());
}

// `pattern write sensors/%c/#`: one line keeps every sensor to its own topics.
#[test]
fn pattern_keeps_each_client_to_its_own_topics() {
    let (ws, _dir) = start_with_acl();
    let mut monitor = client(&ws, "mon", Some("monitor"));
    monitor.subscribe_ok(1, &[("sensors/#", 1)]);
    let mut dev = client(&ws, "dev-7", None);
    dev.publish1("sensors/dev-8/temp", b"spoofed", false, 1);
    dev.publish1("sensors/dev-7/temp", b"21.5", false, 2);
    let p = monitor.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("sensors/dev-7/temp", &b"21.5"[..])
    );
    monitor.ack(&p);
    monitor.expect_silence(Duration::from_millis(300));
    // A client id with a '/' or wildcard gets no pattern grants (it could reach dev-8's topics).
    let mut sneaky = client(&ws, "dev-8/x", None);
    sneaky.publish1("sensors/dev-8/x/temp", b"sneaky", false, 1);
    monitor.expect_silence(Duration::from_millis(300));
}

// A wildcard subscription is granted when some readable topic could match it, and then each
// delivered message is checked against its own topic: live, retained and queued ones.
#[test]
fn wildcard_subscriptions_get_only_readable_topics_live_retained_and_queued() {
    let (ws, _dir) = start_with_acl();
    let mut root = client(&ws, "root-1", Some("root"));
    root.publish1("alice/secret/r", b"retained secret", true, 1);
    root.publish1("alice/r", b"retained ok", true, 2);
    root.publish1("bob/r", b"retained bob", true, 3);

    let mut alice = client(&ws, "alice-1", Some("alice"));
    assert_eq!(alice.subscribe(1, &[("#", 1)]), vec![1]);
    let p = alice.recv_publish();
    assert_eq!(
        (p.topic.as_str(), p.retain),
        ("alice/r", true),
        "only the readable retained message"
    );
    alice.ack(&p);
    alice.expect_silence(Duration::from_millis(300));

    root.publish1("alice/secret/live", b"x", false, 4);
    root.publish1("bob/live", b"x", false, 5);
    root.publish1("alice/live", b"ok", false, 6);
    let p = alice.recv_publish();
    assert_eq!(p.topic, "alice/live");
    alice.ack(&p);
    alice.expect_silence(Duration::from_millis(300));

    // A persistent session queued while away, then taken by a client id reused by another
    // user: only what the new connection may read is delivered.
    let (mut a2, _) = RawClient::connect_ok(
        ws.addr,
        &connect_packet("shared-id", Some("alice"), None).clean(false),
    );
    a2.subscribe_ok(1, &[("alice/#", 1)]);
    a2.disconnect();
    root.publish1("alice/queued", b"q", false, 7);
    let (mut anon, present) = RawClient::connect_ok(
        ws.addr,
        &connect_packet("shared-id", None, None).clean(false),
    );
    assert!(present);
    anon.expect_silence(Duration::from_millis(500));
    assert!(metric(&ws, "waystation_acl_denied_total{action=\"delivery\"}") >= 5.0);
}

// Wills obey the same write rules: a will to a topic the client may not write is dropped
// at CONNECT (logged, counted), an allowed one is published when the client vanishes.
#[test]
fn wills_obey_the_acl() {
    let (ws, _dir) = start_with_acl();
    let mut root = client(&ws, "root-1", Some("root"));
    root.subscribe_ok(1, &[("#", 1)]);
    let (bad, _) = RawClient::connect_ok(
        ws.addr,
        &connect_packet("dev-1", None, None).will(Will::new("alice/will", b"forged", 1, false)),
    );
    drop(bad);
    root.expect_silence(Duration::from_millis(500));
    let (good, _) = RawClient::connect_ok(
        ws.addr,
        &connect_packet("dev-2", None, None).will(Will::new(
            "sensors/dev-2/status",
            b"offline",
            1,
            false,
        )),
    );
    drop(good);
    let p = root.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("sensors/dev-2/status", &b"offline"[..])
    );
    assert!(ws.logs().contains("will refused"), "{}", ws.logs());
}

// ACL parse errors name the file and the line; the daemon does not start.
#[test]
fn acl_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acl");
    std::fs::write(&file, "user a\ntopic read a/#\ntopic read a/#/b\n").unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\ndata_dir = \"{}\"\n[acl]\nfile = \"{}\"\n",
            dir.path().join("d").display(),
            file.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(waystation_e2e::waystation_bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("acl.file")
            && err.contains("line 3")
            && err.contains(&file.display().to_string()),
        "{err}"
    );
}
