//! Issue 13, "Bridge": `protocol = 5` on a `[[bridge]]`, against a real Mosquitto 2 upstream
//! (subscribers `mosquitto_sub -V mqttv5` and the harness's collector) and against a raw MQTT 5
//! upstream written here, which states the limits it wants honoured in its CONNACK and records
//! every packet the bridge sends.
//!
//! - message properties (user properties, content type, payload format, response topic,
//!   correlation data) arrive upstream, and the expiry forwarded is what is left of it;
//! - a 3.1.1 device's message goes through a v5 bridge, and a v5 device's through a 3.1.1
//!   bridge (properties dropped, message delivered);
//! - messages whose expiry runs out while the upstream is away are never forwarded, over
//!   either protocol, and are counted; a message behind them still goes;
//! - topic aliases (within the upstream's maximum), the receive maximum and the maximum
//!   packet size (a larger message is dropped and counted, the next one still goes);
//! - SIGKILL mid-stream loses no acknowledged message; 150 ms each way through the link
//!   simulator connects and forwards in order.

mod uplink_common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rmqtt_codec::v5;
use tokio_util::codec::{Decoder as _, Encoder as _};
use uplink_common::{bridge, get, link, metric, sim_address, CONNECTED};
use waystation_e2e::upstream::{
    analyze, bridge_toml, missing, parse_id, Collector, Publisher, PublisherSpec, Upstream,
};
use waystation_e2e::{run_with_timeout, wait_until, ChildGuard, Waystation};

const WAIT: Duration = Duration::from_secs(20);

fn start_bridged(address: &str, extra: &str) -> Waystation {
    let ws = Waystation::start_with(&bridge_toml(address, extra));
    assert!(
        ws.wait_for_log(CONNECTED, WAIT),
        "bridge never connected:\n{}",
        ws.logs()
    );
    ws
}

/// `mosquitto_pub` to the daemon, QoS 1, with `args` (e.g. `-V mqttv5 -D publish ...`).
fn publish(ws: &Waystation, topic: &str, message: &str, args: &[&str]) {
    let port = ws.port().to_string();
    let (status, out) = run_with_timeout(
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                message,
            ])
            .args(args),
        Duration::from_secs(10),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "mosquitto_pub failed: {out}"
    );
}

/// `mosquitto_sub -V mqttv5` on the upstream, one line per message:
/// `topic|payload|user properties|expiry|content type|response topic|correlation|format`.
struct Sub {
    _child: ChildGuard,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Sub {
    fn start(port: u16, filter: &str) -> Sub {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("sub.out");
        let file = std::fs::File::create(&out).expect("create");
        let child = Command::new("mosquitto_sub")
            .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-q", "1", "-t", filter, "-F", "%t|%p|%P|%E|%C|%R|%D|%F"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        Sub {
            _child: ChildGuard(child),
            out,
            _dir: dir,
        }
    }

    fn lines(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    fn line_for(&self, topic: &str, payload: &str) -> Option<Vec<String>> {
        self.lines().into_iter().find(|l| {
            l.first().map(String::as_str) == Some(topic)
                && l.get(1).map(String::as_str) == Some(payload)
        })
    }

    /// Publishes probes through the bridge until one arrives: the subscriber is subscribed
    /// and the bridge forwards.
    fn wait_ready(&self, ws: &Waystation) {
        let mut n = 0;
        let ready = wait_until(WAIT, || {
            n += 1;
            publish(ws, "sensors/probe", &format!("probe{n}"), &[]);
            std::thread::sleep(Duration::from_millis(200));
            self.lines()
                .iter()
                .any(|l| l.first().map(String::as_str) == Some("site1/sensors/probe"))
        });
        assert!(ready, "no probe arrived upstream:\n{}", ws.logs());
    }
}

const V5_PROPS: &[&str] = &[
    "-V",
    "mqttv5",
    "-D",
    "publish",
    "user-property",
    "site",
    "north",
    "-D",
    "publish",
    "user-property",
    "k2",
    "v2",
    "-D",
    "publish",
    "content-type",
    "text/plain",
    "-D",
    "publish",
    "response-topic",
    "replies/1",
    "-D",
    "publish",
    "correlation-data",
    "corr-7",
    "-D",
    "publish",
    "payload-format-indicator",
    "1",
    "-D",
    "publish",
    "message-expiry-interval",
    "120",
];

#[test]
fn v5_bridge_forwards_properties_and_the_remaining_expiry_and_3_1_1_devices_still_go_through() {
    let upstream = Upstream::start();
    let sub = Sub::start(upstream.port, "site1/#");
    let ws = start_bridged(&upstream.address(), "protocol = 5");
    sub.wait_ready(&ws);

    publish(&ws, "sensors/v5", "hello", V5_PROPS);
    publish(&ws, "sensors/v4", "plain", &["-V", "mqttv311"]);
    let arrived = wait_until(WAIT, || {
        sub.line_for("site1/sensors/v5", "hello").is_some()
            && sub.line_for("site1/sensors/v4", "plain").is_some()
    });
    assert!(arrived, "upstream got {:?}\n{}", sub.lines(), ws.logs());
    let v5 = sub.line_for("site1/sensors/v5", "hello").expect("v5 line");
    assert_eq!(
        v5[2], "site:north k2:v2",
        "user properties in order: {v5:?}"
    );
    let expiry: u32 = v5[3]
        .parse()
        .unwrap_or_else(|_| panic!("an expiry: {v5:?}"));
    assert!(
        (1..=120).contains(&expiry),
        "the remaining expiry, at most the original 120 s: {v5:?}"
    );
    assert_eq!(
        &v5[4..8],
        ["text/plain", "replies/1", "corr-7", "1"],
        "{v5:?}"
    );
    let v4 = sub.line_for("site1/sensors/v4", "plain").expect("v4 line");
    assert!(
        v4[2..].iter().all(String::is_empty),
        "no properties: {v4:?}"
    );
    assert!(ws.logs().contains("protocol=5"), "{}", ws.logs());
}

#[test]
fn v5_device_through_a_3_1_1_bridge_arrives_without_its_properties() {
    let upstream = Upstream::start();
    let sub = Sub::start(upstream.port, "site1/#");
    let ws = start_bridged(&upstream.address(), "");
    sub.wait_ready(&ws);
    publish(&ws, "sensors/v5", "hello", V5_PROPS);
    assert!(
        wait_until(WAIT, || sub.line_for("site1/sensors/v5", "hello").is_some()),
        "upstream got {:?}",
        sub.lines()
    );
    let line = sub.line_for("site1/sensors/v5", "hello").expect("line");
    assert!(
        line[2..].iter().all(String::is_empty),
        "3.1.1 carries no properties: {line:?}"
    );
}

fn dropped(ws: &Waystation, reason: &str) -> f64 {
    let (_, body) = get(ws.http_addr(), "/metrics");
    metric(
        &body,
        "waystation_messages_dropped_total",
        &[&format!("reason=\"{reason}\"")],
    )
    .unwrap_or(0.0)
}

/// The upstream goes away; three messages with a 1 s expiry and one without are published;
/// the expiry passes; the upstream comes back: only the one without arrives.
fn expired_while_the_upstream_is_away(protocol: u8) {
    let mut upstream = Upstream::start();
    let collector = Collector::start(
        upstream.port,
        &format!("exp-collector-{protocol}"),
        "site1/#",
    );
    let ws = start_bridged(&upstream.address(), &format!("protocol = {protocol}"));
    publish(&ws, "sensors/before", "before", &[]);
    assert!(
        wait_until(WAIT, || collector.count() >= 1),
        "nothing forwarded before the outage:\n{}",
        ws.logs()
    );
    upstream.stop();
    for i in 0..3 {
        publish(
            &ws,
            "sensors/exp",
            &format!("expiring{i}"),
            &[
                "-V",
                "mqttv5",
                "-D",
                "publish",
                "message-expiry-interval",
                "1",
            ],
        );
    }
    publish(&ws, "sensors/keep", "kept", &["-V", "mqttv5"]);
    std::thread::sleep(Duration::from_millis(2500));
    upstream.start_again();
    let kept = wait_until(WAIT, || {
        collector.received().iter().any(|r| r.payload == b"kept")
    });
    assert!(
        kept,
        "the message behind the expired ones never arrived:\n{}",
        ws.logs()
    );
    collector.wait_quiet(Duration::from_millis(500), Duration::from_secs(5));
    let expired: Vec<_> = collector
        .received()
        .into_iter()
        .filter(|r| r.topic == "site1/sensors/exp")
        .collect();
    assert!(
        expired.is_empty(),
        "expired messages forwarded: {expired:?}"
    );
    assert_eq!(dropped(&ws, "message_expiry"), 3.0, "counted in the metric");
}

#[test]
fn v5_bridge_never_forwards_messages_that_expired_while_the_upstream_was_away() {
    expired_while_the_upstream_is_away(5);
}

#[test]
fn mqtt_3_1_1_bridge_never_forwards_messages_that_expired_while_the_upstream_was_away() {
    expired_while_the_upstream_is_away(4);
}

// ---------------------------------------------------------------------------------------
// A raw MQTT 5 upstream: states its limits in the CONNACK, records every PUBLISH (resolving
// topic aliases as a server must), acknowledges only once `receive_max` are outstanding or
// nothing came for 50 ms, and answers PINGREQ.
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Seen {
    topic: String,
    payload: Vec<u8>,
    alias: Option<u16>,
    /// Sent with an empty topic: the alias alone named it.
    alias_only: bool,
}

#[derive(Debug, Default)]
struct RawLog {
    connect: Option<v5::Connect>,
    publishes: Vec<Seen>,
    /// Most QoS 1 PUBLISHes outstanding at once.
    max_unacked: usize,
    /// Aliases used that were never set on the connection, or above the maximum.
    alias_errors: Vec<String>,
}

struct RawUpstream {
    port: u16,
    log: Arc<Mutex<RawLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RawUpstream {
    fn start(connack: v5::ConnectAck) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let log = Arc::new(Mutex::new(RawLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((sock, _)) => serve_raw(sock, &connack, &log, &stop),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        RawUpstream {
            port,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&RawLog) -> T) -> T {
        f(&self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn send(sock: &mut TcpStream, packet: v5::Packet) {
    let mut out = BytesMut::new();
    v5::Codec::new(0, 0)
        .encode(packet, &mut out)
        .expect("encode");
    let _ = sock.write_all(&out);
}

fn serve_raw(
    mut sock: TcpStream,
    connack: &v5::ConnectAck,
    log: &Mutex<RawLog>,
    stop: &AtomicBool,
) {
    let _ = sock.set_nonblocking(false);
    sock.set_read_timeout(Some(Duration::from_millis(10)))
        .expect("timeout");
    let receive_max = usize::from(connack.receive_max.get());
    let alias_max = connack.topic_alias_max;
    let mut codec = v5::Codec::new(0, 0);
    let mut buf = BytesMut::new();
    let mut aliases: HashMap<u16, String> = HashMap::new();
    let mut pending: Vec<std::num::NonZeroU16> = Vec::new();
    let mut last_publish = Instant::now();
    let mut chunk = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match sock.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
        loop {
            let packet = match codec.decode(&mut buf) {
                Ok(Some((p, _))) => p,
                Ok(None) => break,
                Err(e) => panic!("the bridge sent something malformed: {e}"),
            };
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            match packet {
                v5::Packet::Connect(c) => {
                    log.connect = Some(*c);
                    aliases.clear();
                    send(&mut sock, v5::Packet::ConnectAck(Box::new(connack.clone())));
                }
                v5::Packet::Publish(p) => {
                    last_publish = Instant::now();
                    let alias = p
                        .properties
                        .as_ref()
                        .and_then(|props| props.topic_alias)
                        .map(|a| a.get());
                    let topic = match alias {
                        Some(a) if a > alias_max => {
                            log.alias_errors
                                .push(format!("alias {a} above {alias_max}"));
                            p.topic.to_string()
                        }
                        Some(a) if p.topic.is_empty() => {
                            aliases.get(&a).cloned().unwrap_or_else(|| {
                                log.alias_errors
                                    .push(format!("alias {a} used before it was set"));
                                String::new()
                            })
                        }
                        Some(a) => {
                            aliases.insert(a, p.topic.to_string());
                            p.topic.to_string()
                        }
                        None => p.topic.to_string(),
                    };
                    log.publishes.push(Seen {
                        topic,
                        payload: p.payload.to_vec(),
                        alias,
                        alias_only: p.topic.is_empty(),
                    });
                    if let Some(id) = p.packet_id {
                        pending.push(id);
                        log.max_unacked = log.max_unacked.max(pending.len());
                    }
                }
                v5::Packet::PingRequest => send(&mut sock, v5::Packet::PingResponse),
                v5::Packet::Disconnect(_) => return,
                other => panic!("unexpected from the bridge: {other:?}"),
            }
        }
        if !pending.is_empty()
            && (pending.len() >= receive_max || last_publish.elapsed() > Duration::from_millis(50))
        {
            for id in pending.drain(..) {
                send(
                    &mut sock,
                    v5::Packet::PublishAck(v5::PublishAck {
                        packet_id: id,
                        ..v5::PublishAck::default()
                    }),
                );
            }
        }
    }
}

#[test]
fn v5_bridge_uses_topic_aliases_and_honours_receive_maximum_and_maximum_packet_size() {
    let raw = RawUpstream::start(v5::ConnectAck {
        receive_max: std::num::NonZeroU16::new(3).expect("3"),
        topic_alias_max: 2,
        max_packet_size: Some(400),
        ..v5::ConnectAck::default()
    });
    let ws = start_bridged(&format!("127.0.0.1:{}", raw.port), "protocol = 5");
    // 4 topics through 2 aliases: the least recently used one gives its alias up.
    let publishers: Vec<Publisher> = (0..4)
        .map(|p| Publisher::start(ws.addr, PublisherSpec::new(p, 30)))
        .collect();
    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(30));
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    assert_eq!(want.len(), 120);
    let ids = |log: &RawLog| -> HashSet<(u32, u64)> {
        log.publishes
            .iter()
            .filter_map(|s| parse_id(&s.payload))
            .collect()
    };
    assert!(
        wait_until(WAIT, || raw.with(|l| ids(l).is_superset(&want))),
        "missing upstream: {:?}\n{}",
        missing(&want, &raw.with(ids)),
        ws.logs()
    );
    // Larger than the upstream's 400 bytes: dropped and counted; the next one still goes.
    publish(&ws, "sensors/big", &"x".repeat(1000), &[]);
    publish(&ws, "sensors/after", "after", &[]);
    assert!(
        wait_until(WAIT, || raw
            .with(|l| l.publishes.iter().any(|s| s.payload == b"after"))),
        "the bridge stalled at the too-large message:\n{}",
        ws.logs()
    );
    assert_eq!(dropped(&ws, "packet_too_large"), 1.0);

    raw.with(|log| {
        let connect = log.connect.as_ref().expect("CONNECT");
        assert!(!connect.clean_start, "a persistent session by default");
        assert_eq!(connect.session_expiry_interval_secs, u32::MAX, "never expires by default");
        assert!(log.publishes.iter().all(|s| s.topic != "site1/sensors/big"));
        assert!(log.alias_errors.is_empty(), "{:?}", log.alias_errors);
        assert_eq!(
            log.max_unacked, 3,
            "the window is the upstream's receive maximum (3), not max_inflight (100)"
        );
        // Every message under the topic its payload names, in order: aliases resolved right.
        let mut last: HashMap<u32, u64> = HashMap::new();
        for s in &log.publishes {
            if let Some((p, seq)) = parse_id(&s.payload) {
                assert_eq!(s.topic, format!("site1/sensors/p{p}"), "{s:?}");
                if let Some(prev) = last.insert(p, seq) {
                    assert!(seq > prev, "publisher {p}: {seq} after {prev}");
                }
            }
        }
        let aliased = log.publishes.iter().filter(|s| s.alias_only).count();
        let named = log.publishes.iter().filter(|s| s.alias.is_some() && !s.alias_only).count();
        println!(
            "raw upstream: {} PUBLISHes, {aliased} by alias alone, {named} setting an alias, max unacked {}",
            log.publishes.len(),
            log.max_unacked
        );
        assert!(aliased > log.publishes.len() / 2, "aliases cut the topic from most PUBLISHes");
        assert!(log.publishes.iter().all(|s| s.alias.is_none_or(|a| a <= 2)));
    });
}

// ---------------------------------------------------------------------------------------
// SIGKILL mid-stream, and 150 ms each way.
// ---------------------------------------------------------------------------------------

#[test]
fn sigkill_mid_stream_with_a_v5_bridge_loses_no_acknowledged_message() {
    const TRIALS: usize = 8;
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "v5-crash-collector", "site1/#");
    let mut ws = start_bridged(&upstream.address(), "protocol = 5\nmax_inflight = 100");
    let mut publishers: Vec<Publisher> = (0..3)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, 0);
            spec.count = None;
            spec.window = 20;
            spec.reconnect = true;
            Publisher::start(ws.addr, spec)
        })
        .collect();
    for trial in 0..TRIALS {
        // Every other trial with the upstream frozen: a backlog that only the log holds.
        let frozen = trial % 2 == 1;
        std::thread::sleep(Duration::from_millis(150));
        if frozen {
            upstream.freeze();
        }
        std::thread::sleep(Duration::from_millis(400 + 50 * trial as u64));
        ws.kill();
        ws.restart();
        if frozen {
            std::thread::sleep(Duration::from_millis(100));
            upstream.thaw();
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for p in &mut publishers {
        p.stop();
    }
    let want: HashSet<(u32, u64)> = publishers
        .iter()
        .flat_map(|p| p.acked().into_iter().map(move |s| (p.spec.publisher, s)))
        .collect();
    assert!(
        want.len() > 100,
        "too little published to mean anything: {}",
        want.len()
    );
    let arrived = collector.wait_for_all(&want, Duration::from_secs(60));
    collector.wait_quiet(Duration::from_millis(500), Duration::from_secs(5));
    let a = analyze(&collector.received(), "site1/");
    println!(
        "v5 crash: {TRIALS} kills, {} acked, {} unique upstream, {} duplicates",
        want.len(),
        a.unique.len(),
        a.duplicates
    );
    assert!(
        arrived,
        "acknowledged and lost: {:?}\n{}",
        missing(&want, &a.unique),
        ws.logs()
    );
    assert!(a.malformed.is_empty(), "{:?}", a.malformed);
}

#[test]
fn v5_bridge_over_150_ms_each_way_connects_and_forwards_in_order() {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "v5-latency-collector", "site1/#");
    let sim = link(
        upstream.port,
        Duration::from_millis(150),
        Duration::from_millis(5),
        150,
    );
    let ws = Waystation::start_with(&bridge(&sim_address(&sim), 5, "protocol = 5"));
    assert!(ws.wait_for_log(CONNECTED, WAIT), "{}", ws.logs());
    let publishers: Vec<Publisher> = (0..3)
        .map(|p| Publisher::start(ws.addr, PublisherSpec::new(p, 100)))
        .collect();
    let mut want = HashSet::new();
    for p in publishers {
        let id = p.spec.publisher;
        let st = p.join(Duration::from_secs(30));
        want.extend(st.acked.iter().map(|s| (id, *s)));
    }
    assert_eq!(want.len(), 300);
    let arrived = collector.wait_for_all(&want, Duration::from_secs(60));
    let a = analyze(&collector.received(), "site1/");
    assert!(
        arrived,
        "missing: {:?}\n{}",
        missing(&want, &a.unique),
        ws.logs()
    );
    assert!(a.order_violations.is_empty(), "{:?}", a.order_violations);
    assert!(a.malformed.is_empty(), "{:?}", a.malformed);
}

#[test]
fn v5_commands_from_the_cloud_keep_their_properties_for_local_v5_subscribers() {
    let upstream = Upstream::start();
    let extra = "protocol = 5\n\n[[bridge.subscribe]]\nremote = \"site1/cmd/#\"\nlocal_prefix = \"\"\nqos = 1";
    let ws = start_bridged(&upstream.address(), extra);
    let local = Sub::start(ws.port(), "site1/cmd/#");
    let port = upstream.port.to_string();
    let mut n = 0;
    let arrived = wait_until(WAIT, || {
        n += 1;
        let (status, out) = run_with_timeout(
            Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-q",
                    "1",
                    "-t",
                    "site1/cmd/reboot",
                ])
                .args(["-m", &format!("now{n}")])
                .args(V5_PROPS),
            Duration::from_secs(10),
        );
        assert!(status.is_some_and(|s| s.success()), "{out}");
        std::thread::sleep(Duration::from_millis(200));
        !local.lines().is_empty()
    });
    assert!(arrived, "no command arrived locally:\n{}", ws.logs());
    let line = local.lines().remove(0);
    assert_eq!(line[0], "site1/cmd/reboot", "{line:?}");
    assert_eq!(
        line[2], "site:north k2:v2",
        "user properties kept: {line:?}"
    );
    assert_eq!(
        &line[4..8],
        ["text/plain", "replies/1", "corr-7", "1"],
        "{line:?}"
    );
    let expiry: u32 = line[3]
        .parse()
        .unwrap_or_else(|_| panic!("an expiry: {line:?}"));
    assert!((1..=120).contains(&expiry), "{line:?}");
}
