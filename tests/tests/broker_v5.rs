//! MQTT 5 against real clients (issue 13), part 1: 3.1.1 and 5 clients on one listener,
//! application-message properties end to end, the CONNACK's properties, and the reason
//! codes a client is refused with (CONNACK, PUBACK/PUBREC, SUBACK, UNSUBACK), binary
//! passwords included. Clients: mosquitto_pub/sub (`-V mqttv5`, `-D`), paho-mqtt 2.1 and
//! MQTT.js 5 (tests/clients/), and hand-built bytes (tests/src/raw5.rs) where no library
//! sends what is needed.

mod v5_common;

use std::path::Path;
use std::process::Command;

use serde_json::json;
use v5_common::{pub5, reason, run, run_cli, start, subscriber, WAIT};
use waystation_e2e::clients::{events, one, payloads, Lib, ScriptClient};
use waystation_e2e::raw::{self, Connect, MosquittoSub, RawClient};
use waystation_e2e::raw5::{self, Props};

// One listener, both versions, both directions: a 3.1.1 publisher (mosquitto_pub) reaches
// an MQTT 5 subscriber (paho) with no properties, and an MQTT 5 publisher (MQTT.js, with
// user properties and a content type) reaches a 3.1.1 subscriber (mosquitto_sub) with the
// properties dropped and the payload intact, and the MQTT 5 subscriber with them.
#[test]
fn v4_and_v5_clients_exchange_messages_on_one_listener() {
    let ws = start("");
    let v4_sub = MosquittoSub::start(ws.port(), &["-V", "mqttv311", "-q", "1", "-t", "mix/#"]);
    let v5_sub = subscriber(
        Lib::Paho,
        &ws,
        json!({"op": "connect", "id": "mix-v5-sub"}),
        json!({"filter": "mix/#", "qos": 1}),
        2,
    );

    raw::mosquitto_pub(
        ws.port(),
        &[
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-t",
            "mix/from-v4",
            "-m",
            "hello-from-v4",
        ],
    );
    let published = run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "mix-v5-pub"},
            {"op": "publish", "topic": "mix/from-v5", "payload": "hello-from-v5", "qos": 1,
             "props": {"userProperties": {"origin": "mqtt.js"}, "contentType": "text/plain"}},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(reason(&published, "puback"), 0, "{published:#?}");

    let (v4_msgs, _) = v4_sub.collect(2, WAIT);
    assert_eq!(
        v4_msgs,
        ["mix/from-v4 hello-from-v4", "mix/from-v5 hello-from-v5"],
        "the 3.1.1 subscriber gets both, the v5 properties dropped (payload unchanged)"
    );
    let got = v5_sub.finish(WAIT);
    let msgs = events(&got, "message");
    assert_eq!(
        payloads(&got),
        ["hello-from-v4", "hello-from-v5"],
        "{got:#?}"
    );
    assert_eq!(
        msgs[0]["props"],
        json!({}),
        "a 3.1.1 message has no properties"
    );
    assert_eq!(
        msgs[1]["props"]["UserProperty"],
        json!([["origin", "mqtt.js"]])
    );
    assert_eq!(msgs[1]["props"]["ContentType"], "text/plain");
}

// User properties (in order, a key repeated), content type, payload format indicator,
// response topic and correlation data, set with mosquitto_pub -D, arrive unchanged at
// paho, MQTT.js and mosquitto_sub -V mqttv5; the message expiry arrives counted down.
#[test]
fn publish_properties_are_carried_end_to_end() {
    let ws = start("");
    let paho = subscriber(
        Lib::Paho,
        &ws,
        json!({"op": "connect", "id": "props-paho"}),
        json!({"filter": "props/#", "qos": 1}),
        1,
    );
    let js = subscriber(
        Lib::MqttJs,
        &ws,
        json!({"op": "connect", "id": "props-js"}),
        json!({"filter": "props/#", "qos": 1}),
        1,
    );
    let cli = MosquittoSub::start(
        ws.port(),
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "props/#",
            "-F",
            "%t|%p|%P|%C|%R|%F",
        ],
    );
    pub5(
        ws.port(),
        &[
            "-q",
            "1",
            "-t",
            "props/x",
            "-m",
            "payload-1",
            "-D",
            "publish",
            "user-property",
            "zone",
            "north",
            "-D",
            "publish",
            "user-property",
            "alpha",
            "1",
            "-D",
            "publish",
            "user-property",
            "zone",
            "south",
            "-D",
            "publish",
            "content-type",
            "application/json",
            "-D",
            "publish",
            "payload-format-indicator",
            "1",
            "-D",
            "publish",
            "response-topic",
            "props/reply",
            "-D",
            "publish",
            "correlation-data",
            "req-42",
            "-D",
            "publish",
            "message-expiry-interval",
            "3600",
        ],
    );

    let got = paho.finish(WAIT);
    let m = one(&got, "message");
    assert_eq!(m["payload"], "payload-1");
    let p = &m["props"];
    assert_eq!(
        p["UserProperty"],
        json!([["zone", "north"], ["alpha", "1"], ["zone", "south"]]),
        "user properties in order [MQTT-3.3.2-18]"
    );
    assert_eq!(p["ContentType"], "application/json");
    assert_eq!(p["PayloadFormatIndicator"], 1);
    assert_eq!(p["ResponseTopic"], "props/reply");
    assert_eq!(
        p["CorrelationData"],
        hex(b"req-42"),
        "paho prints binary as hex"
    );
    let left = p["MessageExpiryInterval"].as_u64().expect("expiry sent on");
    assert!((1..=3600).contains(&left), "expiry counted down: {left}");

    let got = js.finish(WAIT);
    let p = &one(&got, "message")["props"];
    assert_eq!(
        p["userProperties"],
        json!({"zone": ["north", "south"], "alpha": "1"})
    );
    assert_eq!(p["contentType"], "application/json");
    assert_eq!(p["correlationData_hex"], hex(b"req-42"));
    assert_eq!(p["responseTopic"], "props/reply");

    let line = cli
        .next_message(WAIT)
        .expect("mosquitto_sub -V mqttv5 got the message");
    assert_eq!(
        line,
        "props/x|payload-1|zone:north alpha:1 zone:south|application/json|props/reply|1"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// The CONNACK's properties, as paho and MQTT.js read them: the broker's maximum packet size
// ([limits] max_packet_size), topic alias maximum 16, an assigned client id for an empty
// one, retain, wildcards, subscription identifiers and shared subscriptions available
// (absent = 1), receive maximum 1024 ([limits] receive_maximum's default).
#[test]
fn connack_properties_as_clients_see_them() {
    let ws = start("[limits]\nmax_packet_size = 65536\n");
    let got = run(
        Lib::Paho,
        &ws,
        json!([{"op": "connect", "id": ""}, {"op": "disconnect"}]),
    );
    let ack = one(&got, "connack");
    assert_eq!(ack["reason"], 0, "{got:#?}");
    let p = &ack["props"];
    assert_eq!(p["MaximumPacketSize"], 65536);
    assert_eq!(p["TopicAliasMaximum"], 16);
    let assigned = p["AssignedClientIdentifier"].as_str().unwrap_or_default();
    assert!(
        !assigned.is_empty(),
        "empty client id: one assigned [MQTT-3.2.2-16]: {p}"
    );
    assert_eq!(
        p["ReceiveMaximum"], 1024,
        "[limits] receive_maximum's default: {p}"
    );
    for absent_or_one in [
        "RetainAvailable",
        "WildcardSubscriptionAvailable",
        "SubscriptionIdentifierAvailable",
        "SharedSubscriptionAvailable",
    ] {
        assert!(
            p.get(absent_or_one).is_none_or(|v| v == 1),
            "{absent_or_one}: {p}"
        );
    }

    let got = run(
        Lib::MqttJs,
        &ws,
        json!([{"op": "connect", "id": "named-js"}, {"op": "disconnect"}]),
    );
    let p = &one(&got, "connack")["props"];
    assert_eq!(p["maximumPacketSize"], 65536);
    assert_eq!(p["topicAliasMaximum"], 16);
    assert!(
        p.get("assignedClientIdentifier").is_none(),
        "id was given: {p}"
    );
    for absent_or_true in [
        "subscriptionIdentifiersAvailable",
        "sharedSubscriptionAvailable",
    ] {
        assert!(
            p.get(absent_or_true).is_none_or(|v| v == true),
            "{absent_or_true}: {p}"
        );
    }
}

fn mosquitto_passwd(file: &Path, user: &str, password: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    let status = cmd
        .arg("-b")
        .arg(file)
        .arg(user)
        .arg(std::ffi::OsStr::from_bytes(password))
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(status.success());
}

/// A password with bytes that are not UTF-8 (no NUL: it goes through argv).
const BINARY_PASSWORD: &[u8] = b"\xff\xfe\x80bin\x01";

fn with_passwords(dir: &Path) -> String {
    let file = dir.join("passwd");
    mosquitto_passwd(&file, "alice", b"alice-secret");
    mosquitto_passwd(&file, "device", BINARY_PASSWORD);
    format!("[auth]\npassword_file = \"{}\"\n", file.display())
}

// CONNACK reason codes seen by clients: 0x86 bad user name or password (paho), 0x87 not
// authorized for an anonymous client when a password file is set (MQTT.js), 0x8C bad
// authentication method for any method named (paho, with good credentials otherwise), 0x85
// for an empty client id without clean start (raw: libraries refuse to send it).
#[test]
fn connack_reason_codes_seen_by_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ws = start(&with_passwords(dir.path()));
    let connect = |lib, step| {
        let got = run(lib, &ws, json!([step]));
        reason(&got, "connack")
    };
    let ok = json!({"op": "connect", "id": "a1", "username": "alice", "password": "alice-secret"});
    assert_eq!(connect(Lib::Paho, ok), 0);
    let bad = json!({"op": "connect", "id": "a2", "username": "alice", "password": "wrong"});
    assert_eq!(connect(Lib::Paho, bad), 0x86);
    let anonymous = json!({"op": "connect", "id": "a3"});
    assert_eq!(connect(Lib::MqttJs, anonymous), 0x87);
    let method = json!({"op": "connect", "id": "a4", "username": "alice", "password": "alice-secret",
                        "props": {"AuthenticationMethod": "SCRAM-SHA-256"}});
    assert_eq!(connect(Lib::Paho, method), 0x8C);
    let method_js = json!({"op": "connect", "id": "a5", "username": "alice", "password": "alice-secret",
                           "props": {"authenticationMethod": "GS2-KRB5"}});
    assert_eq!(connect(Lib::MqttJs, method_js), 0x8C);

    let (mut c, ack) = raw5::connect_with(ws.addr, &raw5::connect("", false, 60, &Props::new()));
    assert_eq!(
        ack.reason, 0x85,
        "empty client id, clean start 0 [MQTT-3.1.3-8]"
    );
    assert!(
        c.closed_within(WAIT),
        "closed after a refusing CONNACK [MQTT-3.2.2-7]"
    );
}

// A password that is not UTF-8 (MQTT 5 binary data) checked as bytes against a
// Mosquitto-format password file: paho (bytes) and MQTT.js (Buffer) get in with it, a
// different byte string is refused with 0x86.
#[test]
fn binary_passwords_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ws = start(&with_passwords(dir.path()));
    let pw = hex(BINARY_PASSWORD);
    let step = |id: &str, pw: &str| json!([{"op": "connect", "id": id, "username": "device", "password_hex": pw}, {"op": "disconnect"}]);
    assert_eq!(
        reason(&run(Lib::Paho, &ws, step("bin-1", &pw)), "connack"),
        0
    );
    assert_eq!(
        reason(&run(Lib::MqttJs, &ws, step("bin-2", &pw)), "connack"),
        0
    );
    let wrong = hex(b"\xff\xfe\x80bin\x02");
    assert_eq!(
        reason(&run(Lib::Paho, &ws, step("bin-3", &wrong)), "connack"),
        0x86
    );
}

// A protocol level neither 4 nor 5 is refused with a CONNACK and a close.
#[test]
fn unknown_protocol_level_is_refused() {
    let ws = start("");
    let (mut c, _, code) = RawClient::connect_with(ws.addr, &Connect::new("lvl-6").level(6));
    assert_eq!(code, 0x01, "3.1.1 CONNACK: unacceptable protocol version");
    assert!(c.closed_within(WAIT));
}

const ACL: &str = "user dev\ntopic readwrite ok/#\n";

fn start_with_acl(dir: &Path, limits: &str) -> waystation_e2e::Waystation {
    let file = dir.join("acl");
    std::fs::write(&file, ACL).unwrap();
    start(&format!(
        "[acl]\nfile = \"{}\"\n\n[limits]\n{limits}",
        file.display()
    ))
}

// PUBACK / PUBREC reason codes for refused publishes: 0x87 not authorized (ACL), 0x90 topic
// over max_topic_length, 0x99 payload format indicator 1 with a payload that is not UTF-8;
// none of them is delivered, the connection goes on and an accepted one gets 0x00.
#[test]
fn refused_publishes_get_reason_codes() {
    let dir = tempfile::tempdir().unwrap();
    let ws = start_with_acl(dir.path(), "max_topic_length = 64\n");
    let sub = subscriber(
        Lib::MqttJs,
        &ws,
        json!({"op": "connect", "id": "rc-sub", "username": "dev"}),
        json!({"filter": "#", "qos": 1}),
        1,
    );
    let long_topic = format!("ok/{}", "x".repeat(100));
    let got = run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "rc-pub", "username": "dev"},
            {"op": "publish", "topic": "denied/x", "payload": "no", "qos": 1},
            {"op": "publish", "topic": long_topic, "payload": "no", "qos": 1},
            {"op": "publish", "topic": "ok/bin", "payload_hex": "fffe00", "qos": 1,
             "props": {"PayloadFormatIndicator": 1}},
            {"op": "publish", "topic": "ok/fine", "payload": "fine", "qos": 1,
             "props": {"PayloadFormatIndicator": 1}},
            {"op": "disconnect"},
        ]),
    );
    let codes: Vec<u64> = events(&got, "puback")
        .iter()
        .map(|e| e["reason"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [0x87, 0x90, 0x99, 0x00], "{got:#?}");
    // QoS 2: the refusal is in the PUBREC (MQTT.js).
    let got = run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "rc-pub2", "username": "dev"},
            {"op": "publish", "topic": "denied/y", "payload": "no", "qos": 2},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(reason(&got, "puback"), 0x87, "PUBREC 0x87: {got:#?}");
    let got = sub.finish(WAIT);
    assert_eq!(
        payloads(&got),
        ["fine"],
        "only the accepted one is delivered"
    );
}

// SUBACK reason codes: 0x87 not authorized (ACL, also for the filter of a shared
// subscription), 0x97 quota (max_subscriptions); UNSUBACK 0x11 for a filter not subscribed
// and 0x00 for one that was (paho); a SUBSCRIBE with a subscription identifier is granted.
// 0x8F invalid filter (and an invalid shared one) with raw bytes: paho, MQTT.js and
// mosquitto_sub all refuse to send one.
#[test]
fn suback_and_unsuback_reason_codes() {
    let dir = tempfile::tempdir().unwrap();
    let ws = start_with_acl(dir.path(), "max_subscriptions = 3\n");
    let got = run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "sub-rc", "username": "dev"},
            {"op": "subscribe", "filters": [
                {"filter": "secret/#", "qos": 1},
                {"filter": "$share/group/ok/x", "qos": 1},
                {"filter": "ok/a", "qos": 1},
                {"filter": "ok/b", "qos": 2}]},
            {"op": "subscribe", "filters": [{"filter": "ok/c", "qos": 0}]},
            {"op": "unsubscribe", "filters": ["ok/never", "ok/a"]},
            {"op": "subscribe", "filters": [{"filter": "ok/d", "qos": 0}],
             "props": {"SubscriptionIdentifier": 7}},
            {"op": "subscribe", "filters": [{"filter": "$share/g/secret/x", "qos": 0}]},
            {"op": "disconnect"},
        ]),
    );
    let subacks: Vec<&serde_json::Value> = events(&got, "suback")
        .into_iter()
        .map(|e| &e["reasons"])
        .collect();
    assert_eq!(subacks[0], &json!([0x87, 1, 1, 2]), "{got:#?}");
    assert_eq!(
        subacks[1],
        &json!([0x97]),
        "fourth filter over max_subscriptions = 3"
    );
    assert_eq!(one(&got, "unsuback")["reasons"], json!([0x11, 0x00]));
    assert_eq!(subacks[2], &json!([0]), "with a subscription identifier");
    assert_eq!(
        subacks[3],
        &json!([0x87]),
        "a shared subscription's filter under the ACL"
    );
    let mut c = raw5::connect_ok(ws.addr, "sub-rc-raw", &Props::new());
    c.send(&raw5::subscribe(9, "ok/#/bad", 1, &Props::new()));
    assert_eq!(raw5::suback_reasons(&c.recv()), [0x8F], "invalid filter");
    c.send(&raw5::subscribe(10, "$share/g+/ok/x", 1, &Props::new()));
    assert_eq!(
        raw5::suback_reasons(&c.recv()),
        [0x8F],
        "invalid share name"
    );
    // MQTT.js, the shared subscription alone.
    let got = run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "sub-rc-js", "username": "dev"},
            {"op": "subscribe", "filters": [{"filter": "$share/g/ok/#", "qos": 0}]},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(one(&got, "suback")["reasons"], json!([0]));
    // mosquitto_sub is granted it too (it exits 0 after -E either way).
    let (_, out, err) = run_cli(
        "mosquitto_sub",
        ws.port(),
        &["-V", "mqttv5", "-u", "dev", "-t", "$share/g/ok/#", "-E"],
    );
    assert!(
        !format!("{out}{err}").contains("denied"),
        "mosquitto_sub: {out}{err}"
    );
}

// The status API tells an operator which protocol each client speaks and how long its
// session outlives it.
#[test]
fn status_api_shows_each_clients_protocol_version() {
    let ws = start("");
    let _v5 = raw5::connect_ok(ws.addr, "seen-v5", &Props::new().u32(0x11, 600));
    let (_v4, _, code) = RawClient::connect_with(ws.addr, &Connect::new("seen-v4"));
    assert_eq!(code, 0);
    // The status is a snapshot the router refreshes a few times a second.
    let mut body = String::new();
    let listed = waystation_e2e::wait_until(WAIT, || {
        body = waystation_e2e::http_get(ws.http_addr(), "/api/v1/status").1;
        body.contains("seen-v5") && body.contains("seen-v4")
    });
    assert!(listed, "both clients listed: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    let clients = json["clients"].as_array().expect("clients");
    let find = |id: &str| {
        clients
            .iter()
            .find(|c| c["client_id"] == id)
            .unwrap_or_else(|| panic!("{id} in {body}"))
    };
    assert_eq!(find("seen-v5")["protocol_version"], 5);
    assert_eq!(find("seen-v5")["session_expiry"], 600);
    assert_eq!(find("seen-v4")["protocol_version"], 4);
    assert_eq!(find("seen-v4")["session_expiry"], 0);
}

// Topic aliases to a client that takes them (its CONNECT's topic alias maximum): MQTT.js
// gets the topic name with an alias the first time and the alias alone after, and still
// reports the right topic; paho, which takes none, gets the name every time.
#[test]
fn topic_aliases_go_to_clients_that_take_them() {
    let ws = start("");
    let mut js = ScriptClient::spawn(
        Lib::MqttJs,
        ws.port(),
        json!([
            {"op": "connect", "id": "alias-js", "props": {"topicAliasMaximum": 4}},
            {"op": "subscribe", "filters": [{"filter": "alias/#", "qos": 1}]},
            {"op": "expect", "count": 3, "secs": 20},
            {"op": "disconnect"},
        ]),
    );
    js.wait_event("suback", WAIT);
    for payload in ["one", "two", "three"] {
        pub5(
            ws.port(),
            &["-t", "alias/site-a/temperature", "-m", payload, "-q", "1"],
        );
    }
    let got = js.finish(WAIT);
    let messages = events(&got, "message");
    assert_eq!(payloads(&got), ["one", "two", "three"], "{got:#?}");
    for m in &messages {
        assert_eq!(m["topic"], "alias/site-a/temperature", "{m}");
    }
    let alias = |m: &serde_json::Value| m["props"]["topicAlias"].as_u64();
    assert!(
        alias(messages[0]).is_some(),
        "alias set with the name: {got:#?}"
    );
    assert_eq!(alias(messages[1]), alias(messages[0]), "{got:#?}");
    assert_eq!(alias(messages[2]), alias(messages[0]), "{got:#?}");
}
