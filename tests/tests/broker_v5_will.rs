//! MQTT 5 against real clients (issue 13), part 3: the will. DISCONNECT 0x04 publishes it
//! with its properties while 0x00 does not; the will delay interval (a reconnect within it
//! cancels the will, its passing publishes it, the end of the session publishes it early).
//! Clients: paho-mqtt 2.1 (the will's owner; killing its process drops the connection
//! without DISCONNECT, as a device losing power does) and MQTT.js (the subscriber).

mod v5_common;

use std::time::Duration;

use serde_json::{json, Value};
use v5_common::{run, start, subscriber, WAIT};
use waystation_e2e::clients::{events, payloads, Lib, ScriptClient};
use waystation_e2e::Waystation;

fn will(topic: &str, payload: &str, props: Value) -> Value {
    json!({"topic": topic, "payload": payload, "qos": 1, "props": props})
}

/// A paho client connected with `connect` (which carries the will), left running until
/// dropped (its process killed: the connection ends without DISCONNECT).
fn holder(ws: &Waystation, connect: Value) -> ScriptClient {
    let mut c = ScriptClient::spawn(
        Lib::Paho,
        ws.port(),
        json!([connect, {"op": "sleep", "secs": 60}]),
    );
    let ack = c.wait_event("connack", WAIT);
    assert_eq!(ack["reason"], 0, "{ack}");
    c
}

/// MQTT.js publishes `payload` to `topic` (QoS 1): a marker in the subscriber's stream.
fn marker(ws: &Waystation, topic: &str, payload: &str) {
    run(
        Lib::MqttJs,
        ws,
        json!([
            {"op": "connect", "id": format!("marker-{payload}")},
            {"op": "publish", "topic": topic, "payload": payload, "qos": 1},
            {"op": "disconnect"},
        ]),
    );
}

// [MQTT-3.14.4-3] a DISCONNECT with reason 0x00 discards the will; with 0x04 (disconnect
// with will message) the will is published, with its properties (user properties, content
// type) as the client set them.
#[test]
fn disconnect_0x04_publishes_the_will_with_its_properties() {
    let ws = start("");
    let sub = subscriber(
        Lib::MqttJs,
        &ws,
        json!({"op": "connect", "id": "will-sub"}),
        json!({"filter": "will/#", "qos": 1}),
        2,
    );
    let props = json!({"UserProperty": [["reason", "0x04"]], "ContentType": "text/plain"});
    for (id, code) in [("will-quiet", 0), ("will-loud", 4)] {
        let got = run(
            Lib::Paho,
            &ws,
            json!([
                {"op": "connect", "id": id, "will": will(&format!("will/{id}"), id, props.clone())},
                {"op": "disconnect", "reason": code},
            ]),
        );
        assert!(!events(&got, "connack").is_empty(), "{got:#?}");
    }
    marker(&ws, "will/marker", "after");
    let got = sub.finish(WAIT);
    assert_eq!(payloads(&got), ["will-loud", "after"], "{got:#?}");
    let m = &events(&got, "message")[0];
    assert_eq!(m["topic"], "will/will-loud");
    assert_eq!(m["props"]["userProperties"], json!({"reason": "0x04"}));
    assert_eq!(m["props"]["contentType"], "text/plain");
}

// [MQTT-3.1.3-9] will delay: the client's connection drops (no DISCONNECT) and it is back
// within the delay: no will. It drops again and stays away: the will is published once the
// delay has passed.
#[test]
fn will_delay_reconnect_cancels_and_delay_passing_publishes() {
    let ws = start("");
    let sub = subscriber(
        Lib::MqttJs,
        &ws,
        json!({"op": "connect", "id": "wd-sub"}),
        json!({"filter": "wd/#", "qos": 1}),
        2,
    );
    let connect = json!({"op": "connect", "id": "wd-dev", "clean_start": false,
        "props": {"SessionExpiryInterval": 3600},
        "will": will("wd/will", "wd-gone", json!({"WillDelayInterval": 5}))});
    drop(holder(&ws, connect.clone()));
    let back = holder(&ws, connect);
    // Past the delay (5 s, long enough for the client to be back within it on a loaded
    // machine): had the reconnect not cancelled the will, it would be out by now.
    std::thread::sleep(Duration::from_millis(6000));
    marker(&ws, "wd/marker", "marker");
    drop(back);
    let got = sub.finish(Duration::from_secs(20));
    assert_eq!(
        payloads(&got),
        ["marker", "wd-gone"],
        "the will went out despite the reconnect, or never: {got:#?}"
    );
}

// [MQTT-3.1.3-9] a will delay longer than the session: the will is published when the
// session ends (expiry 1 s), not after its delay of an hour.
#[test]
fn session_end_publishes_a_delayed_will() {
    let ws = start("");
    let sub = subscriber(
        Lib::MqttJs,
        &ws,
        json!({"op": "connect", "id": "we-sub"}),
        json!({"filter": "we/#", "qos": 1}),
        1,
    );
    let connect = json!({"op": "connect", "id": "we-dev", "clean_start": false,
        "props": {"SessionExpiryInterval": 1},
        "will": will("we/will", "we-gone", json!({"WillDelayInterval": 3600}))});
    drop(holder(&ws, connect));
    let got = sub.finish(Duration::from_secs(20));
    assert_eq!(payloads(&got), ["we-gone"], "{got:#?}");
}
