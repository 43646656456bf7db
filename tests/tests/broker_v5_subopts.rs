//! MQTT 5 against real clients (issue 13), part 5: subscription options. No local (a
//! client's own messages are not sent back to it), retain as published (the retain flag as
//! the publisher set it on live messages), retain handling 0 / 1 / 2 (retained messages at
//! every subscribe / only for a new subscription / never). Clients: paho-mqtt 2.1, MQTT.js
//! and mosquitto_sub --retain-as-published.

mod v5_common;

use serde_json::{json, Value};
use v5_common::{pub5, run, start, subscriber, WAIT};
use waystation_e2e::clients::{events, payloads, Lib, ScriptClient};
use waystation_e2e::raw::MosquittoSub;

// [MQTT-3.8.3-3] no local: paho subscribes with it and publishes on the same topic; its
// own message is not sent back, another client's (MQTT.js) is. MQTT.js's own no-local
// subscription likewise.
#[test]
fn no_local_keeps_a_clients_own_messages_from_it() {
    let ws = start("");
    for (lib, other) in [(Lib::Paho, Lib::MqttJs), (Lib::MqttJs, Lib::Paho)] {
        let topic = format!("nl/{lib:?}");
        let mut me = ScriptClient::spawn(
            lib,
            ws.port(),
            json!([
                {"op": "connect", "id": format!("nl-{lib:?}")},
                {"op": "subscribe", "filters": [{"filter": topic, "qos": 1, "no_local": true}]},
                {"op": "publish", "topic": topic, "payload": "own", "qos": 1},
                {"op": "sleep", "secs": 30},
            ]),
        );
        me.wait_event("puback", WAIT);
        run(
            other,
            &ws,
            json!([
                {"op": "connect", "id": format!("nl-other-{lib:?}")},
                {"op": "publish", "topic": topic, "payload": "other", "qos": 1},
                {"op": "disconnect"},
            ]),
        );
        // Delivered in order: had "own" been sent back, it would have come first.
        me.wait_for("the other client's message", WAIT, |e| {
            e["event"] == "message" && e["payload"] == "other"
        });
        assert_eq!(
            payloads(&me.seen),
            ["other"],
            "{lib:?} with no local got its own message back: {:#?}",
            me.seen
        );
    }
}

// [MQTT-3.3.1-12/13] retain as published: a live message published with RETAIN 1 reaches a
// subscriber with that option (mosquitto_sub --retain-as-published, paho) with RETAIN 1,
// and one without it (paho) with RETAIN 0.
#[test]
fn retain_as_published_keeps_the_retain_flag() {
    let ws = start("");
    let cli = MosquittoSub::start(
        ws.port(),
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "rap/#",
            "--retain-as-published",
            "-F",
            "%r %t %p",
        ],
    );
    let with_rap = subscriber(
        Lib::Paho,
        &ws,
        json!({"op": "connect", "id": "rap-on"}),
        json!({"filter": "rap/#", "qos": 1, "retain_as_published": true}),
        2,
    );
    let without = subscriber(
        Lib::Paho,
        &ws,
        json!({"op": "connect", "id": "rap-off"}),
        json!({"filter": "rap/#", "qos": 1}),
        2,
    );
    pub5(
        ws.port(),
        &["-q", "1", "-r", "-t", "rap/kept", "-m", "retained-live"],
    );
    pub5(
        ws.port(),
        &["-q", "1", "-t", "rap/plain", "-m", "plain-live"],
    );

    let flags = |got: &[Value]| -> Vec<(String, bool)> {
        events(got, "message")
            .iter()
            .map(|m| {
                (
                    m["payload"].as_str().unwrap().to_string(),
                    m["retain"] == true,
                )
            })
            .collect()
    };
    let got = with_rap.finish(WAIT);
    assert_eq!(
        flags(&got),
        [("retained-live".into(), true), ("plain-live".into(), false)],
        "retain as published: {got:#?}"
    );
    let got = without.finish(WAIT);
    assert_eq!(
        flags(&got),
        [
            ("retained-live".into(), false),
            ("plain-live".into(), false)
        ],
        "live messages have RETAIN 0 without the option [MQTT-3.3.1-12]"
    );
    let (lines, _) = cli.collect(2, WAIT);
    assert_eq!(
        lines,
        ["1 rap/kept retained-live", "0 rap/plain plain-live"]
    );
}

/// How many messages arrived after each SUBACK (before the next one), in order.
fn messages_per_subscribe(got: &[Value]) -> Vec<usize> {
    let mut counts: Vec<usize> = Vec::new();
    for e in got {
        match e["event"].as_str() {
            Some("suback") => counts.push(0),
            Some("message") => *counts.last_mut().expect("message before any SUBACK") += 1,
            _ => {}
        }
    }
    counts
}

// [MQTT-3.3.1-9/10/11] retain handling: 0 sends the retained messages at every subscribe,
// also for a subscription that exists; 1 only for a new one; 2 never. paho and MQTT.js
// run the same sequence: rh/# rh 0 (new: 1), rh/# rh 1 (exists: 0), rh/+ rh 1 (new: 1),
// rh/a rh 2 (new: 0), rh/# rh 0 (exists: 1).
#[test]
fn retain_handling_0_1_2() {
    let ws = start("");
    pub5(ws.port(), &["-q", "1", "-r", "-t", "rh/a", "-m", "kept"]);
    for lib in [Lib::Paho, Lib::MqttJs] {
        let sub = |filter: &str, rh: u8| {
            json!({"op": "subscribe",
                   "filters": [{"filter": filter, "qos": 1, "retain_handling": rh}]})
        };
        let pause = json!({"op": "sleep", "secs": 0.5});
        let got = run(
            lib,
            &ws,
            json!([
                {"op": "connect", "id": format!("rh-{lib:?}")},
                sub("rh/#", 0), pause,
                sub("rh/#", 1), pause,
                sub("rh/+", 1), pause,
                sub("rh/a", 2), pause,
                sub("rh/#", 0), pause,
                {"op": "disconnect"},
            ]),
        );
        assert_eq!(
            messages_per_subscribe(&got),
            [1, 0, 1, 0, 1],
            "{lib:?}: retained messages after each SUBSCRIBE: {got:#?}"
        );
    }
}
