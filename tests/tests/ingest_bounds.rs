//! Issue 17, "Bounded ingest": a QoS 0 flood into a forwarded topic while the upstream is
//! frozen must slow the flooders, not grow the daemon's memory. With `[storage]
//! max_pending_bytes = 64 KiB`, 6 publishers write pre-encoded QoS 0 PUBLISHes (64 B
//! payloads, `flood/<n>`, forwarded at QoS 1 by a bridge to a SIGSTOPped Mosquitto) as fast
//! as raw TCP allows for 3 s. Two tests, run one after the other (each floods both cores):
//!
//! 1. The flood beside one pipelining QoS 1 publisher (`sensors/p0`): the gate engages
//!    (`waystation_ingest_pauses_total` > 0 on `/metrics`); bytes submitted and not yet
//!    durable (`waystation_store_pending_bytes`) stay within the cap plus the router's queue; no flooder
//!    is disconnected (back-pressure, not eviction); afterwards the gate reopens
//!    (`waystation_ingest_paused` 0), a new QoS 1 publish is acknowledged and `/healthz`
//!    answers 200; after the thaw every QoS 1 message acknowledged during the flood arrives
//!    upstream, in order (nothing acknowledged was dropped to make room).
//! 2. The flood alone (the shape of issue 17's benchmark): nothing but QoS 0 in the log.
//!
//! In both, the daemon's VmRSS is sampled every 100 ms from before the flood until the
//! backlog has sat still for 1 s with the upstream frozen (memory must be bounded at any
//! backlog, not only while it is being written): it grows by less than 40 MiB over the idle
//! footprint and stays under 64 MiB (the goal for the whole daemon) when the suite is
//! built in release.
//!
//! The gate pauses every connection that has published (the QoS 1 publisher included), so
//! "a QoS 1 publisher is unaffected" is not a property; being served again once the disk has
//! caught up is.

use std::collections::HashSet;
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use waystation_e2e::raw::{self, Pkt, RawClient};
use waystation_e2e::upstream::{
    analyze, payload, topic_of, Collector, Publisher, PublisherSpec, Upstream,
};
use waystation_e2e::{http_get, metric_sample, proc_status_kib, wait_until, Waystation};

/// `[storage] max_pending_bytes` here: 64 KiB, the smallest the config accepts (the default
/// is 8 MiB), so the gate engages even where the daemon, not the disk, is the bottleneck (a
/// debug build's router: with 1 MiB its writes never waited long enough to cross it).
const MAX_PENDING: u64 = 64 << 10;
const FLOODERS: usize = 6;
const FLOOD_FOR: Duration = Duration::from_secs(3);
/// How much the daemon's VmRSS may grow over its idle footprint (sampled just before the
/// flood) while flooded. What it needs: sled's page cache (`cache_bytes`, 16 MiB by default)
/// filling as the log grows, at most `max_pending_bytes` (64 KiB here) of writes waiting plus
/// the router's bounded queue, per-connection buffers of a few KiB, and what glibc keeps in
/// its two arenas. Measured here with the gate: 22-29 MiB (debug and release builds).
/// Without it (`max_pending_bytes` = 16 GiB) the release daemon grew by 174 MiB in these 3 s
/// (issue 17's bench: 161 MiB at 2 M messages).
const RSS_GROWTH_BOUND_KIB: u64 = 40 * 1024;
/// Issue 17's goal for the whole daemon at any backlog, asserted for a release build (the
/// suite's profile is the daemon's, `waystation_bin`): a debug daemon's idle VmRSS alone is
/// ~42 MiB (its code and debug-build allocations), so there only the growth is bounded.
const RSS_BOUND_RELEASE_KIB: u64 = 64 * 1024;
/// Bytes waiting for the disk may pass the cap by what was already queued when it was
/// crossed (the router's queue: 8,192 commands of about 100 B here), not by more. Measured
/// with a 1 MiB cap: at most 1.6 MiB with the gate; 7.7 MiB (debug, CPU-bound) and 88 MiB
/// (release) without it.
const PENDING_BOUND: f64 = (MAX_PENDING + (2 << 20)) as f64;

/// The bridge keeps its default keep-alive (30 s): a frozen upstream then looks like a
/// stalled but live connection for the whole test (TCP open, nothing read or answered), the
/// case where nothing but the daemon's own bounds keeps the backlog on disk. (With 5 s the
/// bridge gives the connection up after 7.5 s and the backlog stays in the log anyway.)
fn config(upstream: &str) -> String {
    format!(
        "[storage]\nmax_pending_bytes = {MAX_PENDING}\n\n\
         [[bridge]]\nname = \"cloud\"\naddress = \"{upstream}\"\n\
         reconnect = {{ initial_ms = 100, max_ms = 500 }}\nmax_inflight = 100\n\n\
         [[bridge.forward]]\nlocal = \"flood/#\"\nremote_prefix = \"site1/\"\nqos = 1\n\n\
         [[bridge.forward]]\nlocal = \"sensors/#\"\nremote_prefix = \"site1/\"\nqos = 1\n"
    )
}

/// A raw TCP publisher writing one pre-encoded buffer of QoS 0 PUBLISHes over and over until
/// stopped; counts the bytes the daemon took and whether it ever closed the connection.
struct Flooder {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(u64, Option<String>)>>,
    packet_len: usize,
}

impl Flooder {
    fn start(addr: SocketAddr, n: usize) -> Flooder {
        let topic = format!("flood/{n}");
        let mut batch = Vec::new();
        let mut packet_len = 0;
        for seq in 0..512u32 {
            let mut body = format!("flood:{n}:{seq}:").into_bytes();
            body.resize(64, b'f');
            let p = raw::publish(&topic, &body, 0, false, false, None);
            packet_len = p.len();
            batch.extend_from_slice(&p);
        }
        let mut stream = RawClient::connect(addr, &format!("flooder-{n}")).stream;
        // Short, so a paused write (the daemon not reading) still sees `stop` promptly.
        stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .expect("set_write_timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut at, mut written) = (0usize, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match stream.write(&batch[at..]) {
                        Ok(0) => return (written, Some("write returned 0".into())),
                        Ok(k) => {
                            written += k as u64;
                            at = (at + k) % batch.len();
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return (written, Some(e.to_string())),
                    }
                }
                (written, None)
            })
        };
        Flooder {
            stop,
            handle: Some(handle),
            packet_len,
        }
    }

    /// Stops; returns (PUBLISHes the daemon's socket took, the error that ended it early).
    fn finish(mut self) -> (u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (bytes, err) = self
            .handle
            .take()
            .expect("running")
            .join()
            .unwrap_or((0, Some("flooder thread panicked".into())));
        (bytes / self.packet_len as u64, err)
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Samples `f` every `every` on its own thread until stopped; keeps the maximum.
struct MaxSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl MaxSampler {
    fn start(every: Duration, f: impl Fn() -> Option<u64> + Send + 'static) -> MaxSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, max, samples) = (stop.clone(), max.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(v) = f() {
                        max.fetch_max(v, Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(every);
                }
            })
        };
        MaxSampler {
            stop,
            max,
            samples,
            handle: Some(handle),
        }
    }

    /// (maximum, number of samples).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (
            self.max.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

impl Drop for MaxSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The two tests flood the same two cores: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// An upstream Mosquitto (with a collector on `site1/sensors/#`) and the daemon bridged to it.
struct Setup {
    upstream: Upstream,
    collector: Collector,
    ws: Waystation,
    http: SocketAddr,
    pid: u32,
    rss_before: u64,
}

fn setup(collector_id: &str) -> Setup {
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, collector_id, "site1/sensors/#");
    let ws = Waystation::start_with(&config(&upstream.address()));
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );
    let http = ws.http_addr();
    let pid = ws.pid().expect("daemon running");
    let rss_before = proc_status_kib(pid, "VmRSS").expect("VmRSS");
    Setup {
        upstream,
        collector,
        ws,
        http,
        pid,
        rss_before,
    }
}

fn vm_rss_sampler(pid: u32) -> MaxSampler {
    MaxSampler::start(Duration::from_millis(100), move || {
        proc_status_kib(pid, "VmRSS")
    })
}

/// FLOODERS flooders for FLOOD_FOR; returns (PUBLISHes taken, flooders cut off early).
fn flood(addr: SocketAddr) -> (u64, Vec<String>) {
    let flooders: Vec<Flooder> = (0..FLOODERS).map(|n| Flooder::start(addr, n)).collect();
    std::thread::sleep(FLOOD_FOR);
    let mut flooded = 0u64;
    let mut errors = Vec::new();
    for (n, f) in flooders.into_iter().enumerate() {
        let (msgs, err) = f.finish();
        flooded += msgs;
        if let Some(e) = err {
            errors.push(format!("flooder {n}: {e}"));
        }
    }
    (flooded, errors)
}

fn metric(http: SocketAddr, name: &str) -> f64 {
    let (code, body) = http_get(http, "/metrics");
    assert_eq!(code, 200, "GET /metrics");
    metric_sample(&body, name).unwrap_or(f64::NAN)
}

/// Waits (20 s at most) for the gate to reopen once the flood has stopped.
fn assert_gate_reopens(http: SocketAddr) {
    let mut paused = f64::NAN;
    assert!(
        wait_until(Duration::from_secs(20), || {
            paused = metric(http, "waystation_ingest_paused");
            paused == 0.0
        }),
        "waystation_ingest_paused still {paused} 20 s after the flood stopped"
    );
}

/// With the upstream frozen, waits until the log's length has not changed for 1 s (nothing
/// should take entries off it once the bridge's window and its socket are full), 20 s at
/// most (a debug daemon still absorbs what the flooders' sockets held for several seconds);
/// returns the lengths seen.
fn hold_backlog(http: SocketAddr) -> Vec<f64> {
    let held = Instant::now();
    let mut last = metric(http, "waystation_log_messages");
    let mut since = Instant::now();
    let mut lengths = vec![last];
    while held.elapsed() < Duration::from_secs(20) && since.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(200));
        let n = metric(http, "waystation_log_messages");
        if n != last {
            lengths.push(n);
            (last, since) = (n, Instant::now());
        }
    }
    lengths
}

/// The VmRSS bounds (see RSS_GROWTH_BOUND_KIB, RSS_BOUND_RELEASE_KIB).
fn assert_rss_bounded(what: &str, rss_before: u64, rss: MaxSampler, log_lengths: &[f64]) {
    // The first and last few lengths, for the messages.
    let log_lengths = if log_lengths.len() > 8 {
        format!(
            "{:?} ... {:?} ({} changes)",
            &log_lengths[..4],
            &log_lengths[log_lengths.len() - 3..],
            log_lengths.len() - 1
        )
    } else {
        format!("{log_lengths:?}")
    };
    let (rss_max, rss_samples) = rss.finish();
    println!(
        "{what}: VmRSS {rss_before} KiB before the flood, max {rss_max} KiB over {rss_samples} \
         samples (flood and backlog held); log lengths seen while held: {log_lengths}"
    );
    assert!(rss_samples >= 10, "VmRSS sampled {rss_samples} times only");
    assert!(
        rss_max.saturating_sub(rss_before) < RSS_GROWTH_BOUND_KIB,
        "{what}: daemon VmRSS grew from {rss_before} KiB to {rss_max} KiB during the flood and \
         while its backlog waited for the frozen upstream (bound: {RSS_GROWTH_BOUND_KIB} KiB of \
         growth); log lengths seen meanwhile: {log_lengths}"
    );
    if !cfg!(debug_assertions) {
        assert!(
            rss_max < RSS_BOUND_RELEASE_KIB,
            "{what}: release daemon VmRSS reached {rss_max} KiB during the flood and while its \
             backlog waited (goal < {RSS_BOUND_RELEASE_KIB} KiB); log lengths seen: {log_lengths}"
        );
    }
}

/// Catches: an unbounded submit queue (RSS grows with the flood; the issue measured
/// 161 MiB); a gate that is never engaged (no pause counted) or never released (the gauge
/// stays 1, the new QoS 1 publish gets no PUBACK); a gate that evicts publishers instead of
/// back-pressuring them; acknowledged QoS 1 messages dropped or reordered to make room.
#[test]
fn qos0_flood_beside_qos1_is_back_pressured_and_loses_no_acked_message() {
    let _serial = serial();
    let started = Instant::now();
    let s = setup("ingest-collector");
    let http = s.http;

    s.upstream.freeze();
    let mut qos1 = {
        let mut spec = PublisherSpec::new(0, 0);
        spec.count = None;
        spec.window = 10;
        spec.payload_len = 48;
        Publisher::start(s.ws.addr, spec)
    };
    let rss = vm_rss_sampler(s.pid);
    let pending = MaxSampler::start(Duration::from_millis(250), move || {
        let (code, body) = http_get(http, "/metrics");
        (code == 200)
            .then(|| metric_sample(&body, "waystation_store_pending_bytes"))
            .flatten()
            .map(|v| v as u64)
    });
    let (flooded, flooder_errors) = flood(s.ws.addr);
    qos1.stop();
    let (pending_max, pending_samples) = pending.finish();
    let (acked, q1_connections, q1_anomalies) =
        qos1.snapshot(|s| (s.acked.clone(), s.connections, s.anomalies.clone()));

    let pauses = metric(http, "waystation_ingest_pauses_total");
    println!(
        "flood beside QoS 1: {FLOODERS} x QoS 0 64 B for {:?}: {flooded} PUBLISHes taken by the \
         daemon's sockets ({:.0} msg/s); ingest pauses {pauses}; pending bytes max {pending_max} \
         over {pending_samples} samples (cap {MAX_PENDING}); QoS 1 acked during the flood {}",
        FLOOD_FOR,
        flooded as f64 / FLOOD_FOR.as_secs_f64(),
        acked.len()
    );
    assert!(
        pauses > 0.0,
        "a flood against max_pending_bytes = {MAX_PENDING} must pause ingest at least once \
         (waystation_ingest_pauses_total = {pauses})"
    );
    assert!(
        pending_max as f64 <= PENDING_BOUND,
        "bytes waiting for the disk reached {pending_max} (cap {MAX_PENDING}, bound {PENDING_BOUND})"
    );
    assert!(
        flooder_errors.is_empty(),
        "the gate back-pressures publishers, it does not disconnect them: {flooder_errors:?}"
    );
    assert!(q1_anomalies.is_empty(), "{q1_anomalies:?}");
    assert_eq!(
        q1_connections, 1,
        "the QoS 1 publisher kept its one connection through the flood"
    );
    assert!(
        !acked.is_empty(),
        "the QoS 1 publisher got PUBACKs during the flood (the gate reopens as the disk catches up)"
    );

    // The disk catches up: the gate reopens, a new publisher is served, the daemon is healthy.
    assert_gate_reopens(http);
    let mut after = RawClient::connect(s.ws.addr, "ingest-after");
    after.send(&raw::publish(
        &topic_of(1),
        &payload(1, 0, 24),
        1,
        false,
        false,
        Some(1),
    ));
    match after.recv_timeout(Duration::from_secs(10)) {
        Ok(Pkt::PubAck(1)) => {}
        other => {
            panic!("a QoS 1 publish after the flood: expected PUBACK(1) within 10 s, got {other:?}")
        }
    }
    let (code, body) = http_get(http, "/healthz");
    assert_eq!(code, 200, "/healthz after the flood: {body}");

    let log_lengths = hold_backlog(http);
    assert_rss_bounded("flood beside QoS 1", s.rss_before, rss, &log_lengths);

    // Nothing acknowledged was dropped: after the thaw the whole log drains (the flood
    // included, it sits before and between the QoS 1 messages) and every acked one arrives.
    s.upstream.thaw();
    let mut want: HashSet<(u32, u64)> = acked.iter().map(|s| (0, *s)).collect();
    want.insert((1, 0));
    let arrived = s.collector.wait_for_all(&want, Duration::from_secs(60));
    s.collector
        .wait_quiet(Duration::from_millis(300), Duration::from_secs(5));
    let a = analyze(&s.collector.received(), "site1/");
    println!(
        "after the thaw: {} of {} acked QoS 1 messages upstream ({} duplicates), {:?} in all",
        want.iter().filter(|id| a.unique.contains(id)).count(),
        want.len(),
        a.duplicates,
        started.elapsed()
    );
    a.assert_all_arrived_in_order(arrived, &want, "QoS 1 acked during a QoS 0 flood");
}

/// Catches what the test above cannot, because its QoS 1 messages fill the bridge's window
/// and stop it reading the log: QoS 0 entries, which hold no window slot (done once handed
/// to the bridge's writer), moved from the log into memory without bound while the upstream
/// does not read. Also: a gate never engaged or never released under a pure QoS 0 flood.
#[test]
fn qos0_flood_alone_keeps_memory_bounded_while_the_backlog_waits_for_a_frozen_upstream() {
    let _serial = serial();
    let started = Instant::now();
    let s = setup("ingest-alone-collector");
    let http = s.http;

    s.upstream.freeze();
    let rss = vm_rss_sampler(s.pid);
    let (flooded, flooder_errors) = flood(s.ws.addr);
    let pauses = metric(http, "waystation_ingest_pauses_total");
    println!(
        "flood alone: {FLOODERS} x QoS 0 64 B for {:?}: {flooded} PUBLISHes taken by the \
         daemon's sockets ({:.0} msg/s); ingest pauses {pauses}",
        FLOOD_FOR,
        flooded as f64 / FLOOD_FOR.as_secs_f64()
    );
    assert!(
        pauses > 0.0,
        "a flood against max_pending_bytes = {MAX_PENDING} must pause ingest at least once \
         (waystation_ingest_pauses_total = {pauses})"
    );
    assert!(
        flooder_errors.is_empty(),
        "the gate back-pressures publishers, it does not disconnect them: {flooder_errors:?}"
    );
    assert_gate_reopens(http);
    let log_lengths = hold_backlog(http);
    assert_rss_bounded("flood alone", s.rss_before, rss, &log_lengths);
    let (code, body) = http_get(http, "/healthz");
    assert_eq!(code, 200, "/healthz after the flood: {body}");

    // The bridge still forwards once the upstream answers again.
    s.upstream.thaw();
    let mut after = RawClient::connect(s.ws.addr, "ingest-alone-after");
    after.publish1(&topic_of(2), &payload(2, 0, 24), false, 1);
    let want: HashSet<(u32, u64)> = [(2, 0)].into_iter().collect();
    let arrived = s.collector.wait_for_all(&want, Duration::from_secs(60));
    let a = analyze(&s.collector.received(), "site1/");
    a.assert_all_arrived_in_order(arrived, &want, "a QoS 1 message after the flood and thaw");
    println!("flood alone: {:?} in all", started.elapsed());
}
