//! MQTT 5 against real clients (issue 13), part 6: shared subscriptions and subscription
//! identifiers. Two paho members of `$share/workers/jobs/#` split a stream between them
//! (each message to exactly one), a 3.1.1 member (mosquitto_sub) may join the same group,
//! and a persistent member queues for the group across a SIGKILL; MQTT.js and paho see their
//! subscription identifiers on the messages their subscriptions match.

mod v5_common;

use std::time::Duration;

use serde_json::{json, Value};
use v5_common::{pub5, run, start, WAIT};
use waystation_e2e::clients::{events, payloads, Lib, ScriptClient};
use waystation_e2e::Waystation;

fn member(ws: &Waystation, lib: Lib, id: &str, expect: usize) -> ScriptClient {
    let mut c = ScriptClient::spawn(
        lib,
        ws.port(),
        json!([
            {"op": "connect", "id": id},
            {"op": "subscribe", "filters": [{"filter": "$share/workers/jobs/#", "qos": 1}]},
            {"op": "expect", "count": expect, "secs": 20},
            {"op": "sleep", "secs": 1},
            {"op": "disconnect"},
        ]),
    );
    let ack = c.wait_event("suback", WAIT);
    assert_eq!(
        ack["reasons"],
        json!([1]),
        "shared subscription granted: {ack}"
    );
    c
}

// [MQTT-4.8.2] each message of a shared subscription goes to one member: 8 jobs to two
// members (paho, MQTT.js) arrive 8 times in all, none twice, each member getting some.
#[test]
fn a_shared_subscription_gives_each_message_to_one_member() {
    let ws = start("");
    let a = member(&ws, Lib::Paho, "worker-a", 4);
    let b = member(&ws, Lib::MqttJs, "worker-b", 4);
    for i in 0..8 {
        pub5(
            ws.port(),
            &[
                "-t",
                &format!("jobs/{i}"),
                "-m",
                &format!("job-{i}"),
                "-q",
                "1",
            ],
        );
    }
    let (got_a, got_b) = (payloads(&a.finish(WAIT)), payloads(&b.finish(WAIT)));
    let mut all: Vec<String> = got_a.iter().chain(&got_b).cloned().collect();
    all.sort();
    let want: Vec<String> = (0..8).map(|i| format!("job-{i}")).collect();
    assert_eq!(all, want, "a: {got_a:?} b: {got_b:?}");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "a: {got_a:?} b: {got_b:?}"
    );
}

// A persistent member (session expiry 1 h) holds the group's messages while every member is
// away, across a SIGKILL and restart, and gets them when it comes back.
#[test]
fn a_persistent_member_queues_for_the_group_across_a_restart() {
    let mut ws = start("");
    run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "keeper", "clean_start": true,
             "props": {"SessionExpiryInterval": 3600}},
            {"op": "subscribe", "filters": [{"filter": "$share/workers/jobs/#", "qos": 1}]},
            {"op": "disconnect"},
        ]),
    );
    pub5(
        ws.port(),
        &["-t", "jobs/late", "-m", "while-away", "-q", "1"],
    );
    ws.kill();
    ws.restart();
    let got = run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "keeper", "clean_start": false,
             "props": {"SessionExpiryInterval": 3600}},
            {"op": "expect", "count": 1, "secs": 15},
            {"op": "disconnect"},
        ]),
    );
    assert_eq!(payloads(&got), ["while-away"], "{got:#?}");
}

fn subscription_ids(event: &Value) -> Vec<u64> {
    let props = &event["props"];
    let v = props
        .get("SubscriptionIdentifier")
        .or_else(|| props.get("subscriptionIdentifier"))
        .cloned()
        .unwrap_or(Value::Null);
    let mut ids: Vec<u64> = match v {
        Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
        Value::Number(n) => n.as_u64().into_iter().collect(),
        _ => Vec::new(),
    };
    ids.sort();
    ids
}

// [MQTT-3.3.4-3] a message matching two subscriptions of one client goes once, with both
// subscription identifiers; one matching a single subscription carries its identifier.
#[test]
fn subscription_identifiers_come_back_with_the_messages() {
    let ws = start("");
    for (lib, key) in [
        (Lib::Paho, "SubscriptionIdentifier"),
        (Lib::MqttJs, "subscriptionIdentifier"),
    ] {
        let (all, plus) = (format!("ids/{lib:?}/#"), format!("ids/{lib:?}/+"));
        let mut c = ScriptClient::spawn(
            lib,
            ws.port(),
            json!([
                {"op": "connect", "id": format!("ids-{lib:?}")},
                {"op": "subscribe", "filters": [{"filter": all, "qos": 1}],
                 "props": {key: 7}},
                {"op": "subscribe", "filters": [{"filter": plus, "qos": 1}],
                 "props": {key: 300000}},
                {"op": "expect", "count": 2, "secs": 20},
                {"op": "disconnect"},
            ]),
        );
        for _ in 0..2 {
            c.wait_event("suback", WAIT);
        }
        pub5(
            ws.port(),
            &["-t", &format!("ids/{lib:?}/one"), "-m", "both", "-q", "1"],
        );
        pub5(
            ws.port(),
            &[
                "-t",
                &format!("ids/{lib:?}/one/two"),
                "-m",
                "deep",
                "-q",
                "1",
            ],
        );
        let got = c.finish(Duration::from_secs(25));
        let messages = events(&got, "message");
        assert_eq!(payloads(&got), ["both", "deep"], "{lib:?}: {got:#?}");
        assert_eq!(
            subscription_ids(messages[0]),
            [7, 300000],
            "{lib:?}: {got:#?}"
        );
        assert_eq!(subscription_ids(messages[1]), [7], "{lib:?}: {got:#?}");
    }
}
