//! Helpers for the store-and-forward suites (`tests/tests/forward_*.rs`, issue 3): an
//! upstream Mosquitto whose subscriber survives the upstream's restarts, an upstream
//! subscriber that records what arrives, pipelined QoS 1 publishers that record exactly
//! which messages got a PUBACK, and the analysis (loss, duplicates, per-topic order).
//!
//! Every message carries `"<publisher>:<seq>:"` (plus padding) as its payload and goes to
//! `sensors/p<publisher>`, so per-topic order is per-publisher sequence order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::raw::{self, Connect, Pkt, RawClient, RecvError};
use crate::wait_until;

// ---------------------------------------------------------------------------------------
// Upstream Mosquitto
// ---------------------------------------------------------------------------------------

/// The upstream (cloud) broker of these tests: the harness's [`crate::Mosquitto`].
pub use crate::Mosquitto as Upstream;

// ---------------------------------------------------------------------------------------
// The upstream subscriber
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub at: Instant,
}

/// A rumqttc client subscribed at QoS 1 on the upstream, recording every PUBLISH in
/// arrival order. Persistent session (clean session 0) so that it keeps its subscription
/// and queued messages across `Upstream::stop`/`start_again`; subscribes again whenever
/// the CONNACK says the session is gone. It reconnects on its own.
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    subacks: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    client: rumqttc::Client,
}

impl Collector {
    /// Connects and waits (bounded) for the SUBACK of `filter`.
    pub fn start(port: u16, client_id: &str, filter: &str) -> Collector {
        Collector::start_sized(port, client_id, filter, 256 * 1024)
    }

    /// As [`Collector::start`], accepting packets of up to `max_packet_size` bytes (rumqttc
    /// closes the connection on a larger one), e.g. for large-message tests.
    pub fn start_sized(
        port: u16,
        client_id: &str,
        filter: &str,
        max_packet_size: usize,
    ) -> Collector {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(max_packet_size, max_packet_size);
        options.set_inflight(100);
        let (client, mut connection) = rumqttc::Client::new(options, 1000);
        let received = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (received, subacks, stop) = (
                Arc::clone(&received),
                Arc::clone(&subacks),
                Arc::clone(&stop),
            );
            let client = client.clone();
            let filter = filter.to_string();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(event) = connection.recv() else { break };
                    match event {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                            if !ack.session_present {
                                let _ =
                                    client.try_subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce);
                            } else {
                                subacks.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            subacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            let r = Received {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                at: Instant::now(),
                            };
                            received.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        let c = Collector {
            received,
            subacks,
            stop,
            client,
        };
        assert!(
            wait_until(Duration::from_secs(10), || c.subacks.load(Ordering::SeqCst)
                > 0),
            "upstream subscriber got no SUBACK for {filter} within 10 s"
        );
        c
    }

    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Times the subscription was confirmed (a SUBACK, or a CONNACK with session present).
    pub fn subscribed(&self) -> u64 {
        self.subacks.load(Ordering::SeqCst)
    }

    /// Waits until the distinct `(publisher, seq)` ids received include all of `want`.
    pub fn wait_for_all(&self, want: &HashSet<(u32, u64)>, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let got: HashSet<(u32, u64)> = self
                .received()
                .iter()
                .filter_map(|r| parse_id(&r.payload))
                .collect();
            want.iter().all(|id| got.contains(id))
        })
    }

    /// Waits until the number of received messages stops changing for `quiet`.
    pub fn wait_quiet(&self, quiet: Duration, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = self.count();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let n = self.count();
            if n != last {
                last = n;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
    }
}

// ---------------------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------------------

/// `"<publisher>:<seq>:"` padded with `x` to at least `len` bytes.
pub fn payload(publisher: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut p = format!("{publisher}:{seq}:").into_bytes();
    while p.len() < len {
        p.push(b'x');
    }
    p
}

pub fn parse_id(payload: &[u8]) -> Option<(u32, u64)> {
    let s = std::str::from_utf8(payload).ok()?;
    let mut it = s.split(':');
    let p = it.next()?.parse().ok()?;
    let q = it.next()?.parse().ok()?;
    Some((p, q))
}

/// Every `(publisher, seq)` acknowledged so far, over all `publishers`.
pub fn acked_ids(publishers: &[Publisher]) -> HashSet<(u32, u64)> {
    publishers
        .iter()
        .flat_map(|p| p.acked().into_iter().map(move |s| (p.spec.publisher, s)))
        .collect()
}

/// Stops every publisher; asserts none saw a protocol anomaly; returns what was acked.
pub fn stop_all(publishers: &mut [Publisher]) -> HashSet<(u32, u64)> {
    for p in publishers.iter_mut() {
        p.stop();
    }
    let anomalies: Vec<String> = publishers
        .iter()
        .flat_map(|p| p.snapshot(|s| s.anomalies.clone()))
        .collect();
    assert!(anomalies.is_empty(), "{anomalies:?}");
    acked_ids(publishers)
}

pub fn topic_of(publisher: u32) -> String {
    format!("sensors/p{publisher}")
}

#[derive(Debug, Clone)]
pub struct PublisherSpec {
    pub publisher: u32,
    /// Messages to publish (seq 0..count); `None`: until stopped.
    pub count: Option<u64>,
    /// QoS 1 PUBLISHes sent and not yet acknowledged, at most.
    pub window: usize,
    pub payload_len: usize,
    /// Sleep after each PUBLISH (pacing), if any.
    pub pace: Option<Duration>,
    /// Reconnect when the connection drops (the daemon killed); else panic.
    pub reconnect: bool,
}

impl PublisherSpec {
    pub fn new(publisher: u32, count: u64) -> PublisherSpec {
        PublisherSpec {
            publisher,
            count: Some(count),
            window: 10,
            payload_len: 24,
            pace: None,
            reconnect: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct PublisherState {
    /// Seqs whose own PUBACK arrived, in the order the PUBACKs arrived.
    pub acked: Vec<u64>,
    /// Seqs sent (at least once).
    pub sent: u64,
    /// PUBLISHes outstanding when a connection dropped (never acknowledged).
    pub abandoned: u64,
    /// Connections made.
    pub connections: u64,
    /// PUBACKs for a packet id not in flight, or not the oldest in flight (MQTT-4.6.0-2).
    pub anomalies: Vec<String>,
    pub done: bool,
    pub last_ack: Option<Instant>,
}

/// A QoS 1 publisher on its own thread over the raw client, up to `window` in flight,
/// mapping each PUBACK's packet id back to the message it acknowledges.
pub struct Publisher {
    pub spec: PublisherSpec,
    pub state: Arc<Mutex<PublisherState>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Publisher {
    pub fn start(addr: SocketAddr, spec: PublisherSpec) -> Publisher {
        let state = Arc::new(Mutex::new(PublisherState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (state, stop, spec) = (Arc::clone(&state), Arc::clone(&stop), spec.clone());
            std::thread::spawn(move || run_publisher(addr, spec, state, stop))
        };
        Publisher {
            spec,
            state,
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }

    pub fn acked(&self) -> Vec<u64> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acked
            .clone()
    }

    pub fn acked_count(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acked
            .len()
    }

    pub fn done(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).done
    }

    pub fn snapshot<T>(&self, f: impl FnOnce(&PublisherState) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits (bounded) for the thread to finish all its messages.
    pub fn join(mut self, timeout: Duration) -> PublisherState {
        let finished = wait_until(timeout, || self.done());
        self.stop();
        let state = std::mem::take(&mut *self.state.lock().unwrap_or_else(|e| e.into_inner()));
        assert!(
            finished,
            "publisher {} did not finish within {timeout:?}: {state:?}",
            self.spec.publisher
        );
        state
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn connect_raw(addr: SocketAddr, client_id: &str) -> Option<RawClient> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let mut c = RawClient::tcp_from(stream);
    c.try_send(&Connect::new(client_id).encode()).ok()?;
    match c.recv_timeout(Duration::from_secs(5)) {
        Ok(Pkt::ConnAck { code: 0, .. }) => Some(c),
        _ => None,
    }
}

fn run_publisher(
    addr: SocketAddr,
    spec: PublisherSpec,
    state: Arc<Mutex<PublisherState>>,
    stop: Arc<AtomicBool>,
) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let topic = topic_of(spec.publisher);
    let client_id = format!("fwd-pub-{}", spec.publisher);
    let mut next: u64 = 0;
    let mut pid: u16 = 0;
    let finished = |next: u64| spec.count.is_some_and(|c| next >= c);
    'connection: while !stop.load(Ordering::SeqCst) {
        let Some(mut c) = connect_raw(addr, &client_id) else {
            assert!(
                spec.reconnect,
                "publisher {} cannot connect to {addr}",
                spec.publisher
            );
            std::thread::sleep(Duration::from_millis(30));
            continue;
        };
        lock().connections += 1;
        // Packet id -> seq, oldest first.
        let mut inflight: std::collections::VecDeque<(u16, u64)> = Default::default();
        loop {
            while inflight.len() < spec.window && !finished(next) && !stop.load(Ordering::SeqCst) {
                pid = if pid == u16::MAX { 1 } else { pid + 1 };
                let bytes = raw::publish(
                    &topic,
                    &payload(spec.publisher, next, spec.payload_len),
                    1,
                    false,
                    false,
                    Some(pid),
                );
                if c.try_send(&bytes).is_err() {
                    // Maybe never read by the broker: not acked, not counted as sent.
                    break;
                }
                inflight.push_back((pid, next));
                lock().sent += 1;
                next += 1;
                if let Some(p) = spec.pace {
                    std::thread::sleep(p);
                }
            }
            if inflight.is_empty() && (finished(next) || stop.load(Ordering::SeqCst)) {
                lock().done = finished(next);
                return;
            }
            match c.recv_timeout(Duration::from_millis(100)) {
                Ok(Pkt::PubAck(p)) => {
                    let mut st = lock();
                    match inflight.iter().position(|(q, _)| *q == p) {
                        Some(i) => {
                            if i != 0 {
                                st.anomalies.push(format!(
                                    "PUBACK {p} not for the oldest in flight (position {i})"
                                ));
                            }
                            let (_, seq) = inflight.remove(i).expect("position exists");
                            st.acked.push(seq);
                            st.last_ack = Some(Instant::now());
                        }
                        None => st
                            .anomalies
                            .push(format!("PUBACK for packet id {p} not in flight")),
                    }
                }
                Ok(other) => lock()
                    .anomalies
                    .push(format!("unexpected packet {other:?}")),
                Err(RecvError::Timeout) => {
                    if stop.load(Ordering::SeqCst) {
                        lock().abandoned += inflight.len() as u64;
                        return;
                    }
                }
                Err(RecvError::Closed) => {
                    assert!(
                        spec.reconnect,
                        "publisher {}: connection closed by the broker",
                        spec.publisher
                    );
                    lock().abandoned += inflight.len() as u64;
                    continue 'connection;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Analysis
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct Analysis {
    /// Distinct (publisher, seq) received.
    pub unique: HashSet<(u32, u64)>,
    pub total: usize,
    pub duplicates: usize,
    /// Per publisher, first occurrences out of sequence order ("p: seq a after b").
    pub order_violations: Vec<String>,
    /// Messages on an unexpected topic or with an unparsable payload.
    pub malformed: Vec<String>,
}

impl Analysis {
    /// Every wanted message arrived (`arrived`: what the caller's bounded wait returned), none
    /// malformed, and the first arrivals kept per-topic order. `what` names the case.
    pub fn assert_all_arrived_in_order(
        &self,
        arrived: bool,
        want: &HashSet<(u32, u64)>,
        what: &str,
    ) {
        assert!(
            arrived,
            "{what}: acknowledged messages missing upstream (first 20 per publisher): {:?}",
            missing(want, &self.unique)
        );
        assert!(self.malformed.is_empty(), "{what}: {:?}", self.malformed);
        assert!(
            self.order_violations.is_empty(),
            "{what}: per-topic order of first arrivals broken: {:?}",
            self.order_violations
        );
    }
}

/// Parses what the upstream received: ids, duplicates, and whether the first occurrence of
/// each message per topic came in sequence order (at least once, in order per topic).
pub fn analyze(received: &[Received], remote_prefix: &str) -> Analysis {
    let mut a = Analysis {
        total: received.len(),
        ..Default::default()
    };
    let mut last_first: HashMap<u32, u64> = HashMap::new();
    for r in received {
        let Some((p, s)) = parse_id(&r.payload) else {
            a.malformed.push(format!(
                "{}: {:?}",
                r.topic,
                String::from_utf8_lossy(&r.payload)
            ));
            continue;
        };
        let want_topic = format!("{remote_prefix}{}", topic_of(p));
        if r.topic != want_topic {
            a.malformed.push(format!(
                "{p}:{s} arrived on {} (want {want_topic})",
                r.topic
            ));
        }
        if !a.unique.insert((p, s)) {
            a.duplicates += 1;
            continue;
        }
        if let Some(prev) = last_first.insert(p, s) {
            if s < prev && a.order_violations.len() < 20 {
                a.order_violations
                    .push(format!("publisher {p}: seq {s} first arrived after {prev}"));
            }
        }
    }
    a
}

/// The ids in `want` that are not in `got`, grouped per publisher (for failure messages).
pub fn missing(want: &HashSet<(u32, u64)>, got: &HashSet<(u32, u64)>) -> BTreeMap<u32, Vec<u64>> {
    let mut m: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for id in want.difference(got) {
        m.entry(id.0).or_default().push(id.1);
    }
    for v in m.values_mut() {
        v.sort_unstable();
        v.truncate(20);
    }
    m
}

/// `[[bridge]]` TOML named "cloud" forwarding `sensors/#` to `site1/` at QoS 1, with
/// `extra` lines added to the bridge table (e.g. `max_rate = 200`).
pub fn bridge_toml(address: &str, extra: &str) -> String {
    format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"{address}\"\nkeep_alive = 5\n\
         reconnect = {{ initial_ms = 100, max_ms = 500 }}\n{extra}\n\n\
         [[bridge.forward]]\nlocal = \"sensors/#\"\nremote_prefix = \"site1/\"\nqos = 1\n"
    )
}

/// The events of one batch PUBLISH of a bridge (docs/pipeline.md, "Decoding a batch"):
/// decompressed (`compress`: "zstd", "gzip" or none) and split (`encoding`: "json-array" or
/// "ndjson", whose every event ends with `\n`). Panics on anything else: tests call it.
pub fn batch_events(
    payload: &[u8],
    compress: Option<&str>,
    encoding: &str,
) -> Vec<serde_json::Value> {
    use std::io::Read as _;
    let mut plain = Vec::new();
    match compress {
        None => plain.extend_from_slice(payload),
        Some("zstd") => {
            ruzstd::decoding::StreamingDecoder::new(payload)
                .expect("a zstd frame")
                .read_to_end(&mut plain)
                .expect("zstd");
        }
        Some(_) => {
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut plain)
                .expect("gzip");
        }
    }
    match encoding {
        "json-array" => serde_json::from_slice(&plain).expect("a JSON array"),
        _ => {
            assert!(plain.ends_with(b"\n"), "NDJSON: \\n after each event");
            plain
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).expect("one JSON event per line"))
                .collect()
        }
    }
}
