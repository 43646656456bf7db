//! MQTT 5 against real clients (issue 13), part 2: session expiry (ended after its
//! interval, 0 ending with the connection, clean start, changed at DISCONNECT, kept across a
//! SIGKILL and restart), message expiry (offline queues, retained messages, counted from
//! when the broker first received the message across a SIGKILL and restart), and message
//! properties kept on disk. Clients: paho-mqtt 2.1, MQTT.js 5, mosquitto_pub -V mqttv5,
//! raw bytes for a DISCONNECT the libraries will not send.
//!
//! Waits for an interval to pass are sleeps a little longer than the interval plus the
//! broker's 200 ms housekeeping tick; no test asserts how long anything took.

mod v5_common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use v5_common::{dropped, pub5, reason, run, start, WAIT};
use waystation_e2e::clients::{events, one, payloads, Lib};
use waystation_e2e::raw5::{self, prop, Props};
use waystation_e2e::Waystation;

/// A paho connect step resuming (clean start 0) with a session expiry interval.
fn resume(id: &str, expiry: u32) -> Value {
    json!({"op": "connect", "id": id, "clean_start": false,
           "props": {"SessionExpiryInterval": expiry}})
}

/// Creates a session for `id` (expiry `expiry`) subscribed to `filter` at QoS 1, and leaves.
fn park(ws: &Waystation, id: &str, expiry: u32, filter: &str) {
    let got = run(
        Lib::Paho,
        ws,
        json!([
            resume(id, expiry),
            {"op": "subscribe", "filters": [{"filter": filter, "qos": 1}]},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(one(&got, "suback")["reasons"], json!([1]), "{got:#?}");
}

/// Reconnects `id` (clean start 0, expiry 3600), waits `linger` for what is queued, leaves;
/// returns (session present, the events).
fn come_back(ws: &Waystation, id: &str, linger: f64) -> (bool, Vec<Value>) {
    let got = run(
        Lib::Paho,
        ws,
        json!([resume(id, 3600), {"op": "sleep", "secs": linger}, {"op": "disconnect"}]),
    );
    let present = one(&got, "connack")["session_present"] == true;
    (present, got)
}

fn publish_q1(ws: &Waystation, topic: &str, payload: &str) {
    pub5(ws.port(), &["-q", "1", "-t", topic, "-m", payload]);
}

// [MQTT-3.1.2-23] a session with an expiry interval outlives its connection, and ends when
// the interval has passed: a client back after it finds no session (session present 0) and
// nothing queued; one with a long interval finds both.
#[test]
fn session_ends_after_its_expiry_interval() {
    let ws = start("");
    park(&ws, "se-short", 2, "se/t");
    park(&ws, "se-long", 3600, "se/t");
    publish_q1(&ws, "se/t", "while-away");
    std::thread::sleep(Duration::from_millis(3500));

    let (present, got) = come_back(&ws, "se-short", 1.0);
    assert!(!present, "session of expiry 2 s still present: {got:#?}");
    assert!(events(&got, "message").is_empty(), "{got:#?}");
    let (present, got) = come_back(&ws, "se-long", 1.0);
    assert!(present, "session of expiry 3600 s lost: {got:#?}");
    assert_eq!(payloads(&got), ["while-away"]);
}

// Session expiry 0 (or absent) ends the session with the connection [MQTT-3.1.2-22]; clean
// start 1 discards an existing session and what was queued for it [MQTT-3.1.2-4].
#[test]
fn expiry_zero_and_clean_start_end_the_session() {
    let ws = start("");
    park(&ws, "se-zero", 0, "zero/t");
    let (present, _) = come_back(&ws, "se-zero", 0.1);
    assert!(!present, "expiry 0: session ended with the connection");

    park(&ws, "se-clean", 3600, "clean/t");
    publish_q1(&ws, "clean/t", "discarded");
    let got = run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "se-clean", "clean_start": true,
             "props": {"sessionExpiryInterval": 3600}},
            {"op": "sleep", "secs": 1},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(one(&got, "connack")["session_present"], false, "{got:#?}");
    assert!(events(&got, "message").is_empty(), "{got:#?}");
}

// A DISCONNECT may lower the session expiry (here 3600 -> 1 s: the session is gone after
// it), but not raise it from 0: that is a protocol error answered with DISCONNECT 0x82
// [MQTT-3.14.2-2] (raw bytes: paho and MQTT.js send what they are told, but the server's
// answer comes after they have closed).
#[test]
fn disconnect_changes_the_session_expiry() {
    let ws = start("");
    let got = run(
        Lib::Paho,
        &ws,
        json!([
            resume("dc-lower", 3600),
            {"op": "subscribe", "filters": [{"filter": "dc/t", "qos": 1}]},
            {"op": "disconnect", "props": {"SessionExpiryInterval": 1}},
        ]),
    );
    assert_eq!(one(&got, "suback")["reasons"], json!([1]));
    std::thread::sleep(Duration::from_millis(2500));
    let (present, got) = come_back(&ws, "dc-lower", 0.1);
    assert!(
        !present,
        "DISCONNECT set expiry 1 s; session still there: {got:#?}"
    );

    let (mut c, ack) =
        raw5::connect_with(ws.addr, &raw5::connect("dc-raise", true, 60, &Props::new()));
    assert_eq!(ack.reason, 0);
    c.send(&raw5::disconnect(
        0,
        &Props::new().u32(prop::SESSION_EXPIRY_INTERVAL, 60),
    ));
    assert_eq!(raw5::expect_disconnect(&mut c, WAIT), 0x82);
}

// Issue 13: "Session expiry interval: enforced, and kept across restarts." A session whose
// interval ran out while the broker was down (SIGKILL, restarted on the same data
// directory) is gone when its client comes back; one with a long interval is still there
// with its queued message.
#[test]
fn session_expiry_survives_sigkill_and_restart() {
    let ws_dir = tempfile::tempdir().unwrap();
    let mut ws = Waystation::start_with_data_dir("", ws_dir.path());
    park(&ws, "kill-short", 3, "kill/t");
    park(&ws, "kill-long", 3600, "kill/t");
    let parked = Instant::now();
    publish_q1(&ws, "kill/t", "queued-before-kill");
    ws.kill();
    ws.restart();
    // Past the 3 s interval (counted from the disconnect) and a housekeeping tick.
    let left = Duration::from_millis(4500).saturating_sub(parked.elapsed());
    std::thread::sleep(left);

    let (present, got) = come_back(&ws, "kill-short", 1.0);
    assert!(
        !present && events(&got, "message").is_empty(),
        "session of expiry 3 s outlived its interval across a restart: {got:#?}"
    );
    let (present, got) = come_back(&ws, "kill-long", 1.0);
    assert!(
        present,
        "session of expiry 3600 s lost in the restart: {got:#?}"
    );
    assert_eq!(payloads(&got), ["queued-before-kill"]);
}

// Message expiry [MQTT-3.3.2-5]: a message whose interval passed while its subscriber was
// away is not delivered from the offline queue, nor as a retained message to a new
// subscriber; one with time left is, with the interval counted down [MQTT-3.3.2-6]. The
// drops are counted in /metrics.
#[test]
fn expired_messages_are_not_delivered_from_queue_or_retained() {
    let ws = start("");
    park(&ws, "me-sub", 3600, "me/#");
    let expiring = |topic: &str, payload: &str, secs: &str, retain: bool| {
        let mut args = vec!["-q", "1", "-t", topic, "-m", payload];
        args.extend(["-D", "publish", "message-expiry-interval", secs]);
        if retain {
            args.push("-r");
        }
        pub5(ws.port(), &args);
    };
    expiring("me/short", "short", "2", false);
    expiring("me/long", "long", "600", false);
    expiring("me/kept/short", "retained-short", "2", true);
    expiring("me/kept/long", "retained-long", "600", true);
    std::thread::sleep(Duration::from_millis(3500));

    let (present, got) = come_back(&ws, "me-sub", 1.0);
    assert!(present);
    assert_eq!(payloads(&got), ["long", "retained-long"], "{got:#?}");
    for m in events(&got, "message") {
        let left = m["props"]["MessageExpiryInterval"].as_u64().unwrap_or(0);
        assert!((1..=598).contains(&left), "expiry not counted down: {m}");
    }
    let got = run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "me-late"},
            {"op": "subscribe", "filters": [{"filter": "me/kept/+", "qos": 1}]},
            {"op": "sleep", "secs": 1},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(payloads(&got), ["retained-long"], "{got:#?}");
    let m = one(&got, "message");
    assert_eq!(m["retain"], true);
    let left = m["props"]["messageExpiryInterval"].as_u64().unwrap_or(0);
    assert!(
        (1..=598).contains(&left),
        "retained expiry not counted down: {m}"
    );
    assert!(
        dropped(&ws, "message_expiry") >= 1.0,
        "expired drops counted"
    );
}

// Issue 13: message expiry across a SIGKILL and restart counts from when the broker first
// received the message, not from the restart: the 5 s message (queued for an offline
// session and retained) published, the broker killed, restarted once 6 s have passed, is
// not delivered; the one with an hour left is, counted down.
#[test]
fn message_expiry_counts_from_first_receipt_across_sigkill() {
    let ws_dir = tempfile::tempdir().unwrap();
    let mut ws = Waystation::start_with_data_dir("", ws_dir.path());
    park(&ws, "mk-sub", 3600, "mk/#");
    let got = run(
        Lib::MqttJs,
        &ws,
        json!([
            {"op": "connect", "id": "mk-pub"},
            {"op": "publish", "topic": "mk/short", "payload": "short", "qos": 1,
             "props": {"messageExpiryInterval": 5}},
            {"op": "publish", "topic": "mk/long", "payload": "long", "qos": 1,
             "props": {"messageExpiryInterval": 3600}},
            {"op": "publish", "topic": "mk/retained", "payload": "retained-short", "qos": 1,
             "retain": true, "props": {"messageExpiryInterval": 5}},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(events(&got, "puback").len(), 3, "{got:#?}");
    // Counted from the PUBACKs, so at least 6 s have passed since the broker received
    // them (the client's own start-up is not counted in).
    let published = Instant::now();
    ws.kill();
    std::thread::sleep(Duration::from_secs(6).saturating_sub(published.elapsed()));
    ws.restart();

    let (present, got) = come_back(&ws, "mk-sub", 1.0);
    assert!(present);
    assert_eq!(
        payloads(&got),
        ["long"],
        "expired before the restart, delivered after it: {got:#?}"
    );
    let left = one(&got, "message")["props"]["MessageExpiryInterval"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        (1..=3594).contains(&left),
        "expiry not counted from receipt: {left}"
    );
    let got = run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "mk-late"},
            {"op": "subscribe", "filters": [{"filter": "mk/#", "qos": 1}]},
            {"op": "sleep", "secs": 1},
            {"op": "disconnect"},
        ]),
    );
    assert!(
        events(&got, "message").is_empty(),
        "expired retained: {got:#?}"
    );
}

// Properties are stored with the message: a persistent session's queue and the retained
// store give them back unchanged after a SIGKILL and restart.
#[test]
fn message_properties_survive_sigkill_in_queue_and_retained_store() {
    let ws_dir = tempfile::tempdir().unwrap();
    let mut ws = Waystation::start_with_data_dir("", ws_dir.path());
    park(&ws, "pk-sub", 3600, "pk/#");
    let props = json!({"UserProperty": [["b", "2"], ["a", "1"], ["b", "3"]],
                       "ContentType": "application/cbor", "ResponseTopic": "pk/reply",
                       "CorrelationData_hex": "00ff10", "PayloadFormatIndicator": 1});
    let got = run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "pk-pub"},
            {"op": "publish", "topic": "pk/queued", "payload": "q", "qos": 1, "props": props},
            {"op": "publish", "topic": "pk/retained", "payload": "r", "qos": 1, "retain": true,
             "props": props},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(events(&got, "puback").len(), 2, "{got:#?}");
    ws.kill();
    ws.restart();

    let check = |m: &Value| {
        let p = &m["props"];
        assert_eq!(
            p["UserProperty"],
            json!([["b", "2"], ["a", "1"], ["b", "3"]]),
            "{m}"
        );
        assert_eq!(p["ContentType"], "application/cbor", "{m}");
        assert_eq!(p["ResponseTopic"], "pk/reply", "{m}");
        assert_eq!(p["CorrelationData"], "00ff10", "{m}");
        assert_eq!(p["PayloadFormatIndicator"], 1, "{m}");
    };
    let (present, got) = come_back(&ws, "pk-sub", 1.0);
    assert!(present);
    assert_eq!(payloads(&got), ["q", "r"], "{got:#?}");
    events(&got, "message").into_iter().for_each(check);
    let got = run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "pk-late"},
            {"op": "subscribe", "filters": [{"filter": "pk/retained", "qos": 1}]},
            {"op": "expect", "count": 1},
            {"op": "disconnect"},
        ]),
    );
    check(one(&got, "message"));
    assert_eq!(reason(&got, "connack"), 0);
}
