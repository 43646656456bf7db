//! Issue 5, observability: `/healthz`, `/api/v1/status`, `/metrics` (Prometheus text format),
//! the dashboard's files, `$SYS/broker/...` topics and `--log-format json`, against the real
//! daemon with a bridge whose upstream is away (so a backlog builds on disk).

mod observability_common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use observability_common::{get, sample, Gateway};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use waystation_e2e::{free_port, wait_until};

fn bridge_to_nowhere(extra: &str) -> String {
    format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{}\"\nreconnect = {{ initial_ms = 100, max_ms = 200 }}\n[[bridge.forward]]\nlocal = \"sensors/#\"\n{extra}",
        free_port()
    )
}

/// Publishes `n` QoS 1 messages on `sensors/<id>/events` as client `id`; returns how many
/// were acknowledged within `timeout` (the client stays connected while `linger`).
fn publish(
    addr: std::net::SocketAddr,
    id: &str,
    n: usize,
    timeout: Duration,
    linger: Duration,
) -> usize {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, n + 10);
    for i in 0..n {
        client
            .publish(
                format!("sensors/{id}/events"),
                QoS::AtLeastOnce,
                false,
                format!("{{\"seq\":{i}}}"),
            )
            .unwrap();
    }
    let deadline = Instant::now() + timeout;
    let mut acked = 0;
    while Instant::now() < deadline && acked < n {
        match connection.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Err(_)) => break,
            _ => {}
        }
    }
    let until = Instant::now() + linger;
    while Instant::now() < until {
        let _ = connection.recv_timeout(Duration::from_millis(100));
    }
    acked
}

#[test]
fn health_status_and_metrics_show_clients_backlog_and_bridge_state() {
    let gw = Gateway::start(&[], "sys_interval = 1", &bridge_to_nowhere(""));
    let (code, _, body) = get(gw.http, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // A sensor publishes 50 events while the upstream is away: all acknowledged, all waiting.
    let mqtt = gw.mqtt;
    let sensor = std::thread::spawn(move || {
        publish(
            mqtt,
            "obs-sensor-1",
            50,
            Duration::from_secs(20),
            Duration::from_secs(4),
        )
    });
    let mut status = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        let (code, ctype, body) = get(gw.http, "/api/v1/status");
        assert_eq!(code, 200);
        assert_eq!(ctype, "application/json");
        status = serde_json::from_str(&body).expect("status is JSON");
        status["storage"]["log_messages"] == 50
            && status["clients"].as_array().is_some_and(|c| !c.is_empty())
    });
    assert!(
        ok,
        "status never showed 50 waiting events and the sensor: {status:#}"
    );
    let client = &status["clients"][0];
    assert_eq!(client["client_id"], "obs-sensor-1");
    assert_eq!(
        client["last_publish"]["topic"],
        "sensors/obs-sensor-1/events"
    );
    assert_eq!(client["last_publish"]["payload"], "{\"seq\":49}");
    assert_eq!(client["messages_in"], 50);
    assert_eq!(status["bridges"][0]["name"], "cloud");
    assert_eq!(status["bridges"][0]["connected"], false);
    assert_eq!(status["bridges"][0]["backlog"], 50);
    assert!(status["bridges"][0]["last_error"].is_string(), "{status:#}");
    assert_eq!(status["healthy"], true);
    assert_eq!(
        status["totals"]["messages_received"], 50,
        "$SYS publishes are not counted: {status:#}"
    );

    let (code, ctype, metrics) = get(gw.http, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    for (name, want) in [
        ("waystation_messages_received_total{qos=\"1\"}", 50.0),
        ("waystation_messages_received_total{qos=\"0\"}", 0.0),
        ("waystation_bridge_connected{bridge=\"cloud\"}", 0.0),
        ("waystation_bridge_backlog_messages{bridge=\"cloud\"}", 50.0),
        ("waystation_log_messages", 50.0),
        ("waystation_clients_connected", 1.0),
        ("waystation_storage_ok", 1.0),
        (
            "waystation_messages_dropped_total{reason=\"queue_full\"}",
            0.0,
        ),
    ] {
        assert_eq!(sample(&metrics, name), Some(want), "{name} in:\n{metrics}");
    }
    assert!(
        sample(
            &metrics,
            "waystation_bridge_backlog_bytes{bridge=\"cloud\"}"
        )
        .is_some_and(|b| b > 50.0 * 10.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "waystation_log_oldest_age_seconds").is_some_and(|a| a >= 0.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "waystation_bridge_reconnects_total{bridge=\"cloud\"}"
        )
        .is_some_and(|r| r >= 1.0),
        "{metrics}"
    );
    for line in [
        "# TYPE waystation_commit_sync_seconds histogram",
        "# TYPE waystation_commit_batch_ops histogram",
        "# TYPE waystation_forward_latency_seconds histogram",
        "# TYPE waystation_messages_received_total counter",
        "waystation_commit_sync_seconds_bucket{le=\"+Inf\"}",
        "waystation_commit_sync_seconds_bucket{le=\"0.001\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    assert!(
        sample(&metrics, "waystation_commit_batch_ops_count").is_some_and(|c| c >= 1.0),
        "{metrics}"
    );

    // The dashboard: one page and its script, from the binary.
    let (code, ctype, html) = get(gw.http, "/");
    assert_eq!((code, ctype.as_str()), (200, "text/html; charset=utf-8"));
    assert!(
        html.contains("<script src=\"/dashboard.js\">") && html.contains("chart-ingest"),
        "{html}"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN: the page loads nothing from elsewhere"
    );
    let (code, ctype, js) = get(gw.http, "/dashboard.js");
    assert_eq!(
        (code, ctype.as_str()),
        (200, "text/javascript; charset=utf-8")
    );
    assert!(js.contains("/api/v1/status"));
    assert_eq!(get(gw.http, "/nope").0, 404);
    assert_eq!(sensor.join().unwrap(), 50);
}

#[test]
fn sys_topics_are_published_every_interval() {
    let gw = Gateway::start(&[], "sys_interval = 1", "");
    let mut options = MqttOptions::new("obs-sys-sub", gw.mqtt.ip().to_string(), gw.mqtt.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 10);
    client.subscribe("$SYS/broker/#", QoS::AtMostOnce).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx
                        .send((
                            p.topic.clone(),
                            String::from_utf8_lossy(&p.payload).to_string(),
                            p.retain,
                        ))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(_) => return,
                _ => {}
            }
        }
    });
    let mut seen = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !(seen.contains_key("$SYS/broker/uptime")
            && seen.contains_key("$SYS/broker/store/bytes"))
    {
        if let Ok((topic, value, retain)) = rx.recv_timeout(Duration::from_millis(200)) {
            assert!(
                !retain,
                "$SYS topics are not retained (no disk writes for statistics)"
            );
            seen.insert(topic, value);
        }
    }
    assert!(
        seen.get("$SYS/broker/uptime")
            .is_some_and(|v| v.ends_with(" seconds")),
        "{seen:?}"
    );
    assert!(
        seen.get("$SYS/broker/version")
            .is_some_and(|v| v.starts_with("waystation version ")),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("$SYS/broker/clients/connected")
            .map(String::as_str),
        Some("1"),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("$SYS/broker/messages/received")
            .map(String::as_str),
        Some("0"),
        "{seen:?}"
    );
    assert!(seen.contains_key("$SYS/broker/store/messages"), "{seen:?}");
    drop(client);
}

#[test]
fn healthz_is_503_with_the_reason_while_the_log_is_full() {
    let extra = format!(
        "[storage]\nmax_bytes = 2048\non_full = \"reject_new\"\n\n{}",
        bridge_to_nowhere("")
    );
    let gw = Gateway::start(&[], "sys_interval = 0", &extra);
    let mqtt = gw.mqtt;
    // More than 2 KiB of events: the log fills and the broker holds the publisher back.
    let _publisher = std::thread::spawn(move || {
        publish(
            mqtt,
            "obs-filler",
            100,
            Duration::from_secs(15),
            Duration::ZERO,
        )
    });
    let mut last = (0, String::new(), String::new());
    let ok = wait_until(Duration::from_secs(15), || {
        last = get(gw.http, "/healthz");
        last.0 == 503
    });
    assert!(ok, "healthz never turned 503: {last:?}");
    assert!(
        last.2.contains("storage") && last.2.contains("full"),
        "the reason is given: {:?}",
        last.2
    );
    let (_, _, metrics) = get(gw.http, "/metrics");
    assert_eq!(
        sample(&metrics, "waystation_storage_full"),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_and_name_the_client() {
    let mut gw = Gateway::start(&["--log-format", "json"], "sys_interval = 0", "");
    assert_eq!(
        publish(
            gw.mqtt,
            "obs-json-client",
            1,
            Duration::from_secs(10),
            Duration::ZERO
        ),
        1
    );
    assert!(gw.terminate(), "SIGTERM exits 0");
    let logs = gw.logs();
    let mut n = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(),
            "{line}"
        );
        n += 1;
    }
    assert!(n >= 4, "{logs}");
    assert!(
        logs.contains("\"message\":\"listening on 127.0.0.1:"),
        "{logs}"
    );
    assert!(
        logs.contains("\"message\":\"waystation started\"") && logs.contains("\"gateway\":\"obs\""),
        "{logs}"
    );
}

/// Issue 17: a TCP connection closed before sending anything (a port probe, a load
/// balancer's health check) is counted apart and is not a protocol error operators alert on.
#[test]
fn connections_closed_before_connect_are_not_protocol_errors() {
    let gw = Gateway::start(&[], "", "");
    for _ in 0..3 {
        drop(std::net::TcpStream::connect(gw.mqtt).expect("connect"));
    }
    let counted = waystation_e2e::wait_until(Duration::from_secs(10), || {
        let (_, _, metrics) = get(gw.http, "/metrics");
        sample(&metrics, "waystation_closed_before_connect_total") == Some(3.0)
    });
    let (_, _, metrics) = get(gw.http, "/metrics");
    assert!(counted, "3 probes counted: {metrics}");
    assert_eq!(
        sample(&metrics, "waystation_protocol_errors_total"),
        Some(0.0),
        "probes are not protocol errors"
    );
    assert!(
        !gw.logs().contains("bad packet"),
        "no WARN for a probe:\n{}",
        gw.logs()
    );
}
