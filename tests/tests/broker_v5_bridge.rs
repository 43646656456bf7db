//! MQTT 5 against real clients (issue 13), part 6: through a bridge to an upstream
//! Mosquitto. 3.1.1 and 5 clients exchange messages through the bridge both ways, and a
//! message whose expiry passed while it waited in the durable log (upstream unreachable,
//! the edge SIGKILLed and restarted) is not forwarded. Clients: paho-mqtt 2.1 and MQTT.js
//! at the edge, mosquitto_pub/sub (3.1.1 and `-V mqttv5`) upstream.

mod v5_common;

use std::time::{Duration, Instant};

use serde_json::json;
use v5_common::{dropped, pub5, run, subscriber, WAIT};
use waystation_e2e::clients::{payloads, Lib};
use waystation_e2e::raw::{self, MosquittoSub, Pkt, RawClient};
use waystation_e2e::upstream::bridge_toml;
use waystation_e2e::{free_port, wait_until, Mosquitto, Waystation};

fn bridged(upstream_port: u16) -> Waystation {
    let mut toml = bridge_toml(&format!("127.0.0.1:{upstream_port}"), "");
    toml.push_str(
        "\n[[bridge.subscribe]]\nremote = \"site1/commands/#\"\nlocal_prefix = \"\"\nqos = 1\n",
    );
    Waystation::start_with(&toml)
}

// Issue 13: "3.1.1 and 5 clients exchange messages ... through a bridge". Up: an MQTT 5
// device (paho) publishes at the edge; a 3.1.1 and an MQTT 5 mosquitto_sub upstream get it.
// Down: a 3.1.1 mosquitto_pub and an MQTT 5 one upstream send commands; an MQTT 5 device
// (MQTT.js) at the edge gets both.
#[test]
fn v4_and_v5_clients_exchange_messages_through_a_bridge() {
    let upstream = Mosquitto::start();
    let up_v4 = MosquittoSub::start(
        upstream.port,
        &["-V", "mqttv311", "-q", "1", "-t", "site1/sensors/#"],
    );
    let up_v5 = MosquittoSub::start(
        upstream.port,
        &["-V", "mqttv5", "-q", "1", "-t", "site1/sensors/#"],
    );
    let ws = bridged(upstream.port);
    assert!(ws.wait_for_log("upstream connected", WAIT), "{}", ws.logs());
    let device = subscriber(
        Lib::MqttJs,
        &ws,
        json!({"op": "connect", "id": "bridge-dev"}),
        json!({"filter": "site1/commands/+/c", "qos": 1}),
        2,
    );
    run(
        Lib::Paho,
        &ws,
        json!([
            {"op": "connect", "id": "bridge-sensor"},
            {"op": "publish", "topic": "sensors/t1", "payload": "21.5", "qos": 1,
             "props": {"UserProperty": [["unit", "C"]]}},
            {"op": "disconnect"},
        ]),
    );
    for sub in [&up_v4, &up_v5] {
        assert_eq!(
            sub.next_message(WAIT).as_deref(),
            Some("site1/sensors/t1 21.5")
        );
    }
    // The bridge subscribes upstream after its CONNACK: probe until a command gets through.
    let mut probe = RawClient::connect(ws.addr, "bridge-probe");
    probe.subscribe_ok(1, &[("site1/commands/probe", 0)]);
    let through = wait_until(WAIT, || {
        raw::mosquitto_pub(upstream.port, &["-t", "site1/commands/probe", "-m", "p"]);
        matches!(
            probe.recv_timeout(Duration::from_millis(300)),
            Ok(Pkt::Publish(_))
        )
    });
    assert!(through, "no command came down the bridge:\n{}", ws.logs());
    raw::mosquitto_pub(
        upstream.port,
        &[
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-t",
            "site1/commands/1/c",
            "-m",
            "from-v4",
        ],
    );
    pub5(
        upstream.port,
        &["-q", "1", "-t", "site1/commands/2/c", "-m", "from-v5"],
    );
    let got = device.finish(WAIT);
    assert_eq!(payloads(&got), ["from-v4", "from-v5"], "{got:#?}");
}

// Issue 13: "an expired message is never delivered or forwarded, including from the
// durable log". The upstream is not there; an MQTT 5 publisher's messages (expiry 3 s and
// 1 h) wait in the durable log; the edge is SIGKILLed, and restarted once the short one has
// expired, with the upstream now up: only the long one is forwarded, and the drop counted.
#[test]
fn expired_messages_are_not_forwarded_from_the_durable_log() {
    let port = free_port();
    let mut ws = bridged(port);
    pub5(
        ws.port(),
        &[
            "-q",
            "1",
            "-t",
            "sensors/short",
            "-m",
            "short",
            "-D",
            "publish",
            "message-expiry-interval",
            "3",
        ],
    );
    pub5(
        ws.port(),
        &[
            "-q",
            "1",
            "-t",
            "sensors/long",
            "-m",
            "long",
            "-D",
            "publish",
            "message-expiry-interval",
            "3600",
        ],
    );
    // Acknowledged, so received by now: 4 s from here is past the 3 s from receipt.
    let published = Instant::now();
    ws.kill();
    let upstream = Mosquitto::start_on(port);
    let up = MosquittoSub::start(upstream.port, &["-V", "mqttv5", "-q", "1", "-t", "site1/#"]);
    std::thread::sleep(Duration::from_millis(4000).saturating_sub(published.elapsed()));
    ws.restart();
    // Forwarded in order: the short one, had it gone, would come first.
    assert_eq!(
        up.next_message(WAIT).as_deref(),
        Some("site1/sensors/long long"),
        "{}",
        ws.logs()
    );
    assert!(dropped(&ws, "message_expiry") >= 1.0);
}
