//! Issue 17 - power cuts: the real `waystation` binary with its `data_dir` on the power-cut
//! file system (tests/powercut: a FUSE pass-through that keeps file data in memory until the
//! file is fsynced and throws away, on command, everything that was not), bridged to a real
//! Mosquitto upstream, cut at random moments under QoS 1 load, 12 times in one run.
//!
//! A SIGKILL alone never loses the page cache, so it cannot tell whether the fsync behind an
//! acknowledgement is really there (FACTS.md, "Testing links, power cuts and other faults").
//! Here each cut is a SIGKILL of the daemon followed by `drop_unsynced()`: every file of the
//! store reverts to what it held at its last fsync, as after a power loss. Then the daemon is
//! started again on the same directory and must:
//!
//! - open the store (a store that fails to open, or is moved aside as corrupt, fails the test
//!   with the daemon's log: that would be a bug to report, not to tolerate);
//! - forward every message whose publisher got a PUBACK (duplicates allowed, no loss);
//! - keep a persistent session (clean session 0, QoS 1 subscription) that is offline the
//!   whole run, with every acknowledged message queued for it;
//! - keep the retained messages as last acknowledged;
//! - keep the bridge's cursor: after each cut the bridge resends only what it had not durably
//!   moved its cursor over, at most 2 x `max_inflight` messages (bridge/mod.rs, "Bounded
//!   duplicates"). A cursor lost at a cut would resend the whole log from the start, tens of
//!   thousands of messages by the later cuts.
//!
//! Every other trial freezes the upstream (SIGSTOP) before the cut and thaws it after the
//! restart, so that thousands of acknowledged messages exist only in Waystation's store when
//! the power goes (FACTS.md, "Testing durability"). A cut at a random moment under load finds
//! unsynced data only when it lands between a write and its fsync (about one in three did), so
//! every other pair of trials the cut is aimed: the file system holds the next fsync of
//! `<store>/db`, the daemon is killed while it waits there (a group commit written, not yet
//! synced, so not yet acknowledged), and that commit is dropped.
//!
//! A second test takes large messages (up to 16 MiB, stored in parts) through 6 such cuts,
//! 4 of them aimed, and checks them byte for byte upstream, at an offline persistent session
//! and as a retained message (see its own comment).
//!
//! Needs /dev/fuse and fusermount3 (Debian `fuse3`, installed by scripts/test.sh): without
//! them the test fails, it does not skip. `POWERCUT_SEED=<n>` repeats a cut schedule.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use waystation_e2e::payload::{big_payload, hash, parse_header};
use waystation_e2e::raw::{self, Connect, Pkt, RawClient, RecvError};
use waystation_e2e::upstream::{
    analyze, bridge_toml, parse_id, Collector, Publisher, PublisherSpec, Upstream,
};
use waystation_e2e::{wait_until, Waystation};
use waystation_powercut::PowerCutFs;

const CUTS: usize = 12;
const PUBLISHERS: u32 = 4;
const MAX_INFLIGHT: usize = 100;
/// QoS 1 messages per trial for the offline persistent session.
const COMMANDS_PER_TRIAL: u16 = 10;
const SESSION_ID: &str = "powercut-session";

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `POWERCUT_SEED`, or one from the clock.
fn seed() -> u64 {
    std::env::var("POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn acked_ids(publishers: &[Publisher]) -> HashSet<(u32, u64)> {
    publishers
        .iter()
        .flat_map(|p| p.acked().into_iter().map(move |s| (p.spec.publisher, s)))
        .collect()
}

/// The backing directory: on tmpfs if there is one, so that the real fsyncs behind the
/// simulated ones cost nothing (what survives a cut is decided by the FUSE layer, not by it).
fn backing_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("ws-powercut-");
    match b.tempdir_in(shm) {
        Ok(d) if shm.is_dir() => d,
        _ => b.tempdir().expect("tempdir"),
    }
}

/// Fails the test (with the daemon's log) if the store was found corrupt at any start.
fn assert_store_opened_cleanly(ws: &Waystation, cut: usize) {
    let logs = ws.logs();
    let bad: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains("store is corrupt")
                || l.contains("store was corrupt")
                || l.contains("moved it aside")
                || l.contains("panicked")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "after power cut {cut} the store did not open cleanly: {bad:#?}\n--- daemon log ---\n{logs}"
    );
}

/// The retained messages under `cfg/#`, through a fresh clean session: waits (bounded) for
/// `expect` of them, then briefly for any more.
fn retained(ws: &Waystation, expect: usize) -> BTreeMap<String, String> {
    let mut c = RawClient::connect(ws.addr, "powercut-retained-check");
    c.subscribe_ok(1, &[("cfg/#", 1)]);
    let mut got = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let wait = if got.len() < expect && Instant::now() < deadline {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(200)
        };
        match c.recv_timeout(wait) {
            Ok(Pkt::Publish(p)) => {
                c.ack(&p);
                got.insert(p.topic.clone(), String::from_utf8_lossy(&p.payload).into());
            }
            Ok(other) => panic!("unexpected packet {other:?}"),
            Err(RecvError::Timeout) if got.len() >= expect || Instant::now() >= deadline => break,
            Err(RecvError::Timeout) => {}
            Err(RecvError::Closed) => panic!("the daemon closed the retained check"),
        }
    }
    c.disconnect();
    got
}

#[test]
fn power_cuts_under_load_lose_no_acknowledged_message_session_or_retained_message() {
    if let Err(e) = waystation_powercut::check_available() {
        panic!(
            "the power-cut test needs FUSE: {e}. It fails instead of skipping so that a CI \
             machine without fuse3 cannot pass it silently."
        );
    }
    let seed = seed();
    println!("power-cut test seed {seed} (POWERCUT_SEED={seed} repeats the cut schedule)");
    let mut rng = Rng(seed);
    let started = Instant::now();

    // Declaration order is drop order reversed: the daemon dies before the mount goes.
    let backing = backing_dir();
    let fs = PowerCutFs::mount_backed_by(backing.path()).expect("mount the power-cut file system");
    let data = fs.path().join("data");
    std::fs::create_dir(&data).expect("create the data directory on the mount");
    let upstream = Upstream::start();
    let collector = Collector::start(upstream.port, "powercut-collector", "site1/#");
    let mut ws = Waystation::start_with_data_dir(
        &bridge_toml(
            &upstream.address(),
            &format!("max_inflight = {MAX_INFLIGHT}"),
        ),
        &data,
    );
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );

    // The persistent session, offline from here on, and a retained message.
    let (mut s, present) = RawClient::connect_ok(ws.addr, &Connect::new(SESSION_ID).clean(false));
    assert!(!present);
    s.subscribe_ok(1, &[("dev/+/cmd", 1)]);
    s.disconnect();
    let mut c = RawClient::connect(ws.addr, "powercut-cfg");
    c.publish1("cfg/interval", b"30s", true, 1);
    c.disconnect();

    let mut publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|p| {
            let mut spec = PublisherSpec::new(p, 0);
            spec.count = None;
            spec.window = 20;
            spec.payload_len = 48;
            // About 900 msg/s each: a live upstream keeps up (the backlog at a cut is the
            // window), a frozen one lets thousands pile up on disk; unpaced, the publishers
            // outrun the bridge and every trial ends with a backlog of 100k+ to drain.
            spec.pace = Some(Duration::from_millis(1));
            spec.reconnect = true;
            Publisher::start(ws.addr, spec)
        })
        .collect();

    let mut commands_acked: HashSet<String> = HashSet::new();
    let mut backlog_at_cuts = Vec::new();
    let mut received_at_cuts = Vec::new();
    // (files, bytes) of unsynced data each cut threw away.
    let mut dropped: Vec<(usize, u64)> = Vec::new();
    let mut dropped_paths = std::collections::BTreeSet::new();
    let mut restart_times = Vec::new();
    for cut in 0..CUTS {
        let frozen = cut % 2 == 1;
        let run = Duration::from_millis(400 + rng.below(800));
        if frozen {
            std::thread::sleep(Duration::from_millis(rng.below(200)));
            upstream.freeze();
        }
        std::thread::sleep(run / 2);
        // Mid-trial, acknowledged well before the cut: messages for the offline session and
        // a new value of a retained topic.
        let mut c = RawClient::connect(ws.addr, "powercut-commands");
        for i in 0..COMMANDS_PER_TRIAL {
            let payload = format!("cmd-{cut}-{i}");
            c.publish1(&format!("dev/{cut}/cmd"), payload.as_bytes(), false, i + 1);
            commands_acked.insert(payload);
        }
        c.publish1("cfg/trial", format!("trial-{cut}").as_bytes(), true, 100);
        c.disconnect();
        std::thread::sleep(run / 2);

        // Acknowledged but not (yet) upstream when the power goes: the backlog at stake.
        let acked = acked_ids(&publishers);
        let seen: HashSet<(u32, u64)> = collector
            .received()
            .iter()
            .filter_map(|r| parse_id(&r.payload))
            .collect();
        backlog_at_cuts.push(acked.difference(&seen).count());

        // The power cut: at a random moment, or (every other pair of trials) right between
        // the store writing a group commit and its fdatasync on `<store>/db` returning.
        let mut lost = (0, 0);
        let at_fsync = (cut / 2) % 2 == 1;
        if at_fsync {
            fs.hold_next_fsync("data/store/db");
            let held = fs.wait_for_held_fsync(Duration::from_secs(10));
            assert!(held, "no fsync of data/store/db within 10 s under load");
            let pid = ws.pid().expect("the daemon runs") as libc::pid_t;
            // SAFETY: kill(2) on our child, not yet reaped (it cannot exit while its fsync
            // is held).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let c = fs.drop_unsynced(); // and fails the held fsync
            lost = (c.files, c.bytes);
            dropped_paths.extend(c.paths);
        }
        ws.kill();
        // Whatever the dying daemon still had queued on the mount goes too.
        let c = fs.drop_unsynced();
        lost = (lost.0 + c.files, lost.1 + c.bytes);
        dropped.push(lost);
        dropped_paths.extend(c.paths);
        received_at_cuts.push(collector.count());
        let t = Instant::now();
        ws.restart();
        restart_times.push(t.elapsed());
        assert_store_opened_cleanly(&ws, cut);

        let want = BTreeMap::from([
            ("cfg/interval".to_string(), "30s".to_string()),
            ("cfg/trial".to_string(), format!("trial-{cut}")),
        ]);
        assert_eq!(
            retained(&ws, want.len()),
            want,
            "retained messages after power cut {cut}\n--- daemon log ---\n{}",
            ws.logs()
        );
        if frozen {
            std::thread::sleep(Duration::from_millis(rng.below(200)));
            upstream.thaw();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for p in &mut publishers {
        p.stop();
    }
    let want = acked_ids(&publishers);
    let anomalies: Vec<String> = publishers
        .iter()
        .flat_map(|p| p.snapshot(|s| s.anomalies.clone()))
        .collect();

    let arrived = collector.wait_for_all(&want, Duration::from_secs(60));
    collector.wait_quiet(Duration::from_millis(500), Duration::from_secs(5));
    let received = collector.received();
    let a = analyze(&received, "site1/");
    // Duplicates arriving after each restart (until the next cut): what that cut cost.
    let mut dups_per_cut = vec![0usize; CUTS];
    let mut seen = HashSet::new();
    for (i, r) in received.iter().enumerate() {
        if let Some(id) = parse_id(&r.payload) {
            if !seen.insert(id) {
                if let Some(k) = received_at_cuts.iter().rposition(|&at| at <= i) {
                    dups_per_cut[k] += 1;
                }
            }
        }
    }

    // The persistent session, offline through every cut: all its acknowledged messages.
    let (mut s, present) = RawClient::connect_ok(ws.addr, &Connect::new(SESSION_ID).clean(false));
    assert!(
        present,
        "the persistent session must survive {CUTS} power cuts\n--- daemon log ---\n{}",
        ws.logs()
    );
    let mut queued = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match s.recv_timeout(Duration::from_secs(2)) {
            Ok(Pkt::Publish(p)) => {
                s.ack(&p);
                queued.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(other) => panic!("unexpected packet for the session: {other:?}"),
            Err(RecvError::Timeout) => break,
            Err(RecvError::Closed) => panic!("the daemon closed the persistent session"),
        }
    }
    s.disconnect();
    let queued_set: HashSet<&str> = queued.iter().map(String::as_str).collect();
    let mut commands_missing: Vec<&String> = commands_acked
        .iter()
        .filter(|c| !queued_set.contains(c.as_str()))
        .collect();
    commands_missing.sort();

    let recovered: Vec<u64> = ws
        .logs()
        .lines()
        .filter(|l| l.contains("store recovered"))
        .filter_map(|l| {
            l.split("log_messages=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    // What the daemon warned about across the cuts, each message once with its count.
    let mut warnings: BTreeMap<String, usize> = BTreeMap::new();
    for l in ws.logs().lines() {
        if l.contains("WARN") || l.contains("ERROR") {
            let msg = l
                .split_once("WARN")
                .or_else(|| l.split_once("ERROR"))
                .map_or(l, |(_, m)| m);
            *warnings
                .entry(msg.trim().chars().take(160).collect())
                .or_default() += 1;
        }
    }
    println!("daemon warnings and errors over the run: {warnings:#?}");
    let stats = fs.stats();
    let acked_delivered = want.iter().filter(|id| a.unique.contains(id)).count();
    let frozen_backlogs: Vec<usize> = backlog_at_cuts.iter().skip(1).step_by(2).copied().collect();
    println!(
        "power cuts: {CUTS}; acked {} (lost {}), delivered {} unique, received {} in all, \
         duplicates {} (per cut {:?}, bound {} each); acked-not-yet-upstream at each cut {:?}; \
         unsynced data dropped at each cut (files, bytes) {:?} from {:?}; log entries recovered at each \
         start {:?}; restarts {:?}; session: {} commands acked, {} delivered ({} duplicates), \
         missing {}; file system: {} fsyncs ({} MiB synced), {} directory fsyncs; {:?}",
        want.len(),
        want.len() - acked_delivered,
        a.unique.len(),
        a.total,
        a.duplicates,
        dups_per_cut,
        2 * MAX_INFLIGHT,
        backlog_at_cuts,
        dropped,
        dropped_paths,
        recovered,
        restart_times,
        commands_acked.len(),
        queued.len(),
        queued.len() - queued_set.len(),
        commands_missing.len(),
        stats.fsyncs,
        stats.synced_bytes >> 20,
        stats.fsyncdirs,
        started.elapsed()
    );

    assert!(anomalies.is_empty(), "{anomalies:?}");
    assert!(
        commands_missing.is_empty(),
        "acknowledged messages for the offline persistent session lost at power cuts: {commands_missing:?}"
    );
    a.assert_all_arrived_in_order(arrived, &want, "power cuts under load");
    assert!(
        dups_per_cut.iter().all(|d| *d <= 2 * MAX_INFLIGHT),
        "the bridge resent more than 2 x max_inflight after a power cut (its cursor did not \
         survive?): {dups_per_cut:?}"
    );
    assert!(
        frozen_backlogs.iter().filter(|b| **b >= 100).count() >= CUTS / 4,
        "most frozen trials must hold a backlog at the cut, else the test proves nothing: \
         {frozen_backlogs:?}"
    );
    // A held fsync of the db almost always follows a group commit's writes; sled's own
    // occasional syncs of the file could be held with nothing new behind them.
    let aimed: Vec<usize> = dropped
        .iter()
        .enumerate()
        .filter(|(cut, _)| (cut / 2) % 2 == 1)
        .map(|(_, (files, _))| *files)
        .collect();
    assert!(
        aimed.iter().filter(|files| **files > 0).count() + 1 >= aimed.len(),
        "the cuts held at an fsync found no unsynced data to drop: {dropped:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Large messages through power cuts
// ---------------------------------------------------------------------------------------

/// `[limits] max_packet_size` of the daemon: a 16 MiB payload with its topic, the largest
/// the config accepts.
const LARGE_MAX_PACKET: usize = 16_842_752;
const MIB: usize = 1 << 20;
/// rumqttc's packet limits in the upstream collector: a 16 MiB payload, its topic and header
/// fit (rumqttc closes the connection on anything larger).
const LARGE_CLIENT_MAX_PACKET: usize = 17 * MIB;
/// `[limits] max_queued_bytes`: the offline session is meant to get every acknowledged message
/// (about 40 MiB here); the default 16 MiB would rightly drop some as "queue full".
const LARGE_MAX_QUEUED_BYTES: usize = 128 * MIB;
const LARGE_CUTS: usize = 6;
const LARGE_SESSION_ID: &str = "powercut-large-session";
/// A PUBACK for a 16 MiB message needs it read, stored in parts and fsynced: seconds on a
/// busy debug build.
const LARGE_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Everything expected upstream or at the session arrives within this after the last thaw.
const LARGE_ARRIVAL_TIMEOUT: Duration = Duration::from_secs(40);
/// Bridged (`sensors/#` -> `site1/sensors/#`) and queued for the offline session.
const TOPIC_A: &str = "sensors/big/a";
const TOPIC_B: &str = "sensors/big/b";
/// Retained, neither bridged nor subscribed by the session.
const TOPIC_RETAINED: &str = "cfg/blob";

/// One message of the large-message test: its payload is `big_payload(seq, len)`. Seqs are
/// unique over the run and increase in publish order (on every topic).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    seq: u64,
    len: usize,
    topic: &'static str,
    retain: bool,
}

/// Checks one received copy of a message against what was sent: `Err` says what is wrong
/// (lengths, first differing byte, hashes; never megabytes of bytes).
fn check_copy(
    what: &str,
    sent: &BTreeMap<u64, Msg>,
    topic: &str,
    remote_prefix: &str,
    payload: &[u8],
) -> Result<Msg, String> {
    let (seq, len) = parse_header(payload).ok_or_else(|| {
        format!(
            "{what}: a payload of {} bytes on {topic} without its header",
            payload.len()
        )
    })?;
    let m = sent
        .get(&seq)
        .filter(|m| m.len == len)
        .ok_or_else(|| format!("{what}: message {seq} ({len} B) on {topic} was never sent"))?;
    if topic != format!("{remote_prefix}{}", m.topic) {
        return Err(format!(
            "{what}: message {seq} arrived on {topic}, sent on {}",
            m.topic
        ));
    }
    let want = big_payload(seq, len);
    if payload != want.as_slice() {
        let first_diff = payload
            .iter()
            .zip(want.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(payload.len().min(want.len()));
        return Err(format!(
            "{what}: message {seq} on {topic} corrupted: {} bytes received, {} sent; first \
             difference at byte {first_diff}; hash {:016x} received, {:016x} sent",
            payload.len(),
            want.len(),
            hash(payload),
            hash(&want)
        ));
    }
    Ok(m.clone())
}

/// What arrived at one receiver: first arrivals per topic in arrival order, duplicates, and
/// every problem found (corruption, unknown message, order).
#[derive(Debug, Default)]
struct Arrivals {
    firsts: BTreeMap<&'static str, Vec<u64>>,
    unique: HashSet<u64>,
    duplicates: usize,
    problems: Vec<String>,
}

impl Arrivals {
    fn add(
        &mut self,
        what: &str,
        sent: &BTreeMap<u64, Msg>,
        topic: &str,
        prefix: &str,
        payload: &[u8],
    ) {
        match check_copy(what, sent, topic, prefix, payload) {
            Ok(m) => {
                if !self.unique.insert(m.seq) {
                    self.duplicates += 1;
                    return;
                }
                let firsts = self.firsts.entry(m.topic).or_default();
                if let Some(&last) = firsts.last() {
                    if m.seq < last {
                        self.problems.push(format!(
                            "{what}: on {}, message {} first arrived after {last} (per-topic \
                             order of first arrivals broken)",
                            m.topic, m.seq
                        ));
                    }
                }
                firsts.push(m.seq);
            }
            Err(e) => self.problems.push(e),
        }
    }

    /// The acknowledged messages (seqs) that never arrived.
    fn missing(&self, want: &BTreeSet<u64>) -> Vec<u64> {
        want.iter()
            .filter(|s| !self.unique.contains(s))
            .copied()
            .collect()
    }
}

/// One publisher connection sending `msgs` as pipelined QoS 1 PUBLISHes (packet ids 1, 2,
/// ...) from a thread of its own, while another thread reads the PUBACKs: an acknowledgement
/// is recorded the moment it arrives, also while the sending thread is blocked on a daemon
/// that stopped reading (its store held at an fsync), and before a SIGKILL can reset the
/// connection and throw away what the socket had received.
struct LargePublisher {
    msgs: Vec<Msg>,
    acked: Arc<Mutex<Vec<Msg>>>,
    anomalies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    stream: std::net::TcpStream,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LargePublisher {
    /// Connects (clean session), runs `before_sending` (e.g. arming a held fsync: the
    /// CONNACK may itself wait for a commit), then starts sending.
    fn start(
        addr: std::net::SocketAddr,
        client_id: &str,
        msgs: Vec<Msg>,
        before_sending: impl FnOnce(),
    ) -> LargePublisher {
        let mut writer = RawClient::connect(addr, client_id);
        let stream = writer
            .stream
            .try_clone()
            .expect("clone the publisher's socket");
        let mut reader = RawClient::tcp_from(stream.try_clone().expect("clone the socket"));
        // After tcp_from (which sets 5 s on the shared socket): a 16 MiB PUBLISH may wait for
        // a daemon that pauses reading while it makes the previous ones durable.
        writer
            .stream
            .set_write_timeout(Some(LARGE_ACK_TIMEOUT))
            .ok();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let anomalies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        before_sending();
        let sender = {
            let (msgs, stop) = (msgs.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                for (i, m) in msgs.iter().enumerate() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let pkt = raw::publish(
                        m.topic,
                        &big_payload(m.seq, m.len),
                        1,
                        m.retain,
                        false,
                        Some(i as u16 + 1),
                    );
                    // A connection closed by the daemon's death: the rest is never sent.
                    if writer.try_send(&pkt).is_err() {
                        break;
                    }
                }
            })
        };
        let receiver = {
            let (msgs, acked, anomalies, stop) = (
                msgs.clone(),
                Arc::clone(&acked),
                Arc::clone(&anomalies),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                let mut next = 0usize;
                while next < msgs.len() {
                    match reader.recv_timeout(Duration::from_millis(100)) {
                        Ok(Pkt::PubAck(pid)) => {
                            let i = usize::from(pid).wrapping_sub(1);
                            if i != next {
                                anomalies.lock().unwrap().push(format!(
                                    "PUBACK({pid}) where PUBACK({}) was due [MQTT-4.6.0-2]",
                                    next + 1
                                ));
                            }
                            match msgs.get(i) {
                                Some(m) => acked.lock().unwrap().push(m.clone()),
                                None => anomalies
                                    .lock()
                                    .unwrap()
                                    .push(format!("PUBACK({pid}) for no PUBLISH sent")),
                            }
                            next += 1;
                        }
                        Ok(other) => anomalies
                            .lock()
                            .unwrap()
                            .push(format!("publisher got {other:?}")),
                        Err(RecvError::Timeout) if stop.load(Ordering::SeqCst) => break,
                        Err(RecvError::Timeout) => {}
                        Err(RecvError::Closed) => break,
                    }
                }
            })
        };
        LargePublisher {
            msgs,
            acked,
            anomalies,
            stop,
            stream,
            threads: vec![sender, receiver],
        }
    }

    fn wait_all_acked(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.acked.lock().unwrap().len() == self.msgs.len()
        })
    }

    /// Closes the connection (if the daemon has not), joins the threads; returns the
    /// messages acknowledged and any protocol anomaly seen.
    fn finish(mut self) -> (Vec<Msg>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            t.join().expect("publisher thread");
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let anomalies = std::mem::take(&mut *self.anomalies.lock().unwrap());
        (acked, anomalies)
    }
}

/// Lines of the daemon's log that say the store was found corrupt, was moved aside, lost a
/// record or that something panicked.
fn bad_log_lines(logs: &str) -> Vec<String> {
    const BAD: &[&str] = &[
        "corrupt",
        "moved it aside",
        "moved aside",
        "panicked",
        "does not decode",
        "cannot be stored",
    ];
    logs.lines()
        .filter(|l| BAD.iter().any(|b| l.contains(b)))
        .map(str::to_string)
        .collect()
}

/// The retained message on [`TOPIC_RETAINED`], through a fresh clean session.
fn retained_blob(ws: &Waystation, client_id: &str) -> Option<raw::Publish> {
    let mut c = RawClient::connect(ws.addr, client_id);
    c.subscribe_ok(1, &[(TOPIC_RETAINED, 1)]);
    let got = match c.recv_timeout(Duration::from_secs(10)) {
        Ok(Pkt::Publish(p)) => {
            c.ack(&p);
            Some(p)
        }
        Ok(other) => panic!("retained check: unexpected packet {other:?}"),
        Err(_) => None,
    };
    c.disconnect();
    got
}

/// Issue 17, large messages through power cuts: the daemon (`max_packet_size` 16842752,
/// data_dir on the power-cut file system, bridged to a real Mosquitto) takes QoS 1 messages
/// of mixed sizes (64 B to 2 MiB, one of 16 MiB, a 1 MiB retained one, 7 KiB + 1 just over
/// one store part) through 6 power cuts, the upstream frozen in every other trial, while a
/// persistent session (clean session 0) subscribed to them is offline. In each trial one
/// publisher's messages are all acknowledged, then a second burst is cut short:
///
/// - aimed (4 trials): the file system holds the next fsync of `<store>/db` after the burst
///   starts, the daemon is SIGKILLed while it waits there and every unsynced byte dropped;
/// - at a random moment (2 trials): SIGKILL during the burst, then the unsynced bytes
///   dropped.
///
/// Every PUBACK received counts: its message must then arrive upstream byte for byte (first
/// arrivals in publish order per topic, duplicates allowed), be delivered byte for byte to
/// the session when it reconnects, and the retained message must be the last acknowledged
/// one (or a later one sent, never an older one) after every restart. The log must never
/// show a corrupt store, a store moved aside, an undecodable record or a panic.
///
/// Why it fails if large records were not durable when acknowledged: the file system keeps
/// every write since the file's last fsync in memory and throws it away at the cut, so only
/// what was fsynced before its PUBACK survives. In an aimed trial the held fsync is the
/// first one after the burst starts (with the upstream frozen nothing else, such as a bridge
/// cursor, is being committed): a correct daemon acknowledges nothing of the burst, while one
/// that acknowledged a large record before syncing it has sent that PUBACK by the time it
/// reaches the held fsync, and the record is dropped. Such a record is then missing
/// upstream and at the session, or the retained message is an older one, or the held fsync
/// never comes (a daemon that never syncs large records); a record whose marker survived
/// without its parts (or the reverse) would be caught by the store's scan at open, which
/// the log check turns into a failure ("corrupt", "moved it aside"). Checked by hand, not committed: with the store writer calling only sled's
/// `flush()` (which no fsync follows) instead of `make_durable` for groups holding a record
/// over 7 KiB, this test failed at the first cut (the acknowledged 1 MiB retained message
/// gone); with that assertion and the held-fsync one relaxed, 15 acknowledged messages were
/// missing upstream (the 16 MiB one among them), 26 at the session, and the retained message
/// was older than the last acknowledged one after 3 of the 6 cuts.
#[test]
fn large_messages_through_power_cuts_arrive_intact_upstream_and_to_the_offline_session() {
    if let Err(e) = waystation_powercut::check_available() {
        panic!(
            "the power-cut test needs FUSE: {e}. It fails instead of skipping so that a CI \
             machine without fuse3 cannot pass it silently."
        );
    }
    let seed = seed();
    println!("large-message power-cut test seed {seed} (POWERCUT_SEED={seed} repeats it)");
    let mut rng = Rng(seed);
    let started = Instant::now();

    // Declaration order is drop order reversed: the daemon dies before the mount goes.
    let backing = backing_dir();
    let fs = PowerCutFs::mount_backed_by(backing.path()).expect("mount the power-cut file system");
    let data = fs.path().join("data");
    std::fs::create_dir(&data).expect("create the data directory on the mount");
    let upstream = Upstream::start();
    let collector = Collector::start_sized(
        upstream.port,
        "powercut-large-collector",
        "site1/#",
        LARGE_CLIENT_MAX_PACKET,
    );
    let config = format!(
        "[limits]\nmax_packet_size = {LARGE_MAX_PACKET}\nmax_queued_bytes = {LARGE_MAX_QUEUED_BYTES}\n\n{}",
        bridge_toml(&upstream.address(), &format!("max_inflight = {MAX_INFLIGHT}"))
    );
    let mut ws = Waystation::start_with_data_dir(&config, &data);
    assert!(
        ws.wait_for_log("upstream connected", Duration::from_secs(10)),
        "{}",
        ws.logs()
    );

    // The persistent session, offline from here to the end.
    let (mut s, present) =
        RawClient::connect_ok(ws.addr, &Connect::new(LARGE_SESSION_ID).clean(false));
    assert!(!present);
    s.subscribe_ok(1, &[("sensors/big/#", 1)]);
    s.disconnect();

    let mut next_seq = 0u64;
    let mut msg = |topic: &'static str, len: usize| {
        next_seq += 1;
        Msg {
            seq: next_seq,
            len,
            topic,
            retain: topic == TOPIC_RETAINED,
        }
    };
    // Every message sent (acknowledged or not), and the seqs acknowledged.
    let mut sent: BTreeMap<u64, Msg> = BTreeMap::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut anomalies: Vec<String> = Vec::new();
    // Per cut: burst messages acknowledged, (files, bytes) of unsynced data dropped.
    let mut burst_acked = Vec::new();
    let mut dropped: Vec<(usize, u64)> = Vec::new();
    let mut retained_seen = Vec::new();
    for cut in 0..LARGE_CUTS {
        let frozen = cut % 2 == 1;
        let aimed = cut % 3 != 2;
        if frozen {
            upstream.freeze();
        }
        // Acknowledged before the cut: small ones between large ones, so that the parts of
        // one record are never mistaken for the next entry.
        let mut msgs = vec![
            msg(TOPIC_A, 64),
            msg(TOPIC_A, 500_000),
            msg(TOPIC_B, 300),
            msg(TOPIC_B, 2 * MIB + cut),
            msg(TOPIC_A, 7 * 1024 + 1),
        ];
        if cut == 1 {
            // Acknowledged with the upstream frozen: when the power goes it exists only in
            // Waystation's store.
            msgs.push(msg(TOPIC_A, 16 * MIB));
        }
        msgs.push(msg(TOPIC_RETAINED, MIB + cut));
        msgs.push(msg(TOPIC_B, 100));
        sent.extend(msgs.iter().map(|m| (m.seq, m.clone())));
        let p = LargePublisher::start(ws.addr, &format!("powercut-large-pub-{cut}"), msgs, || {});
        let all = p.wait_all_acked(LARGE_ACK_TIMEOUT);
        let (got, a) = p.finish();
        acked.extend(got.iter().map(|m| m.seq));
        anomalies.extend(a);
        assert!(
            all,
            "trial {cut}: not every PUBLISH acknowledged within {LARGE_ACK_TIMEOUT:?} ({} were)\n\
             --- daemon log ---\n{}",
            got.len(),
            ws.logs()
        );

        // The power cut, during a second burst.
        let burst = vec![
            msg(TOPIC_A, 500_000 + cut),
            msg(TOPIC_B, 64),
            msg(TOPIC_A, 2 * MIB),
            msg(TOPIC_RETAINED, MIB + 100 + cut),
            msg(TOPIC_B, 200),
        ];
        sent.extend(burst.iter().map(|m| (m.seq, m.clone())));
        let p = LargePublisher::start(
            ws.addr,
            &format!("powercut-large-burst-{cut}"),
            burst,
            || {
                if aimed {
                    fs.hold_next_fsync("data/store/db");
                }
            },
        );
        let mut lost = (0, 0);
        if aimed {
            let held = fs.wait_for_held_fsync(Duration::from_secs(10));
            assert!(
                held,
                "trial {cut}: no fsync of data/store/db within 10 s of a burst"
            );
            // Time for any PUBACK the daemon would (wrongly) send for a record not synced.
            std::thread::sleep(Duration::from_millis(300));
            let pid = ws.pid().expect("the daemon runs") as libc::pid_t;
            // SAFETY: kill(2) on our child, not yet reaped (it cannot exit while its fsync
            // is held).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let c = fs.drop_unsynced(); // and fails the held fsync
            lost = (c.files, c.bytes);
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(400)));
        }
        ws.kill();
        let c = fs.drop_unsynced();
        dropped.push((lost.0 + c.files, lost.1 + c.bytes));
        let (got, a) = p.finish();
        burst_acked.push(got.len());
        acked.extend(got.iter().map(|m| m.seq));
        anomalies.extend(a);

        ws.restart();
        let bad = bad_log_lines(&ws.logs());
        assert!(
            bad.is_empty(),
            "after power cut {cut} the store did not open cleanly: {bad:#?}\n--- daemon log ---\n{}",
            ws.logs()
        );
        // The retained message: the last acknowledged one, or one sent after it.
        let last_acked = sent
            .values()
            .filter(|m| m.retain && acked.contains(&m.seq))
            .map(|m| m.seq)
            .max()
            .expect("a retained message is acknowledged in every trial");
        let r =
            retained_blob(&ws, &format!("powercut-large-retained-{cut}")).unwrap_or_else(|| {
                panic!(
                    "after power cut {cut} no retained message on {TOPIC_RETAINED} (last \
                 acknowledged: {last_acked})\n--- daemon log ---\n{}",
                    ws.logs()
                )
            });
        assert!(
            r.retain,
            "a retained message is sent with RETAIN 1 to a new subscription"
        );
        let m = check_copy("retained", &sent, &r.topic, "", &r.payload)
            .unwrap_or_else(|e| panic!("after power cut {cut}: {e}"));
        assert!(
            m.retain && m.seq >= last_acked,
            "after power cut {cut} the retained message is {} ({} B), older than the last \
             acknowledged one, {last_acked}",
            m.seq,
            m.len
        );
        retained_seen.push((m.seq, last_acked));
        if frozen {
            upstream.thaw();
        }
    }

    let sensors_acked: BTreeSet<u64> = acked
        .iter()
        .filter(|s| sent[s].topic.starts_with("sensors/"))
        .copied()
        .collect();

    // Upstream: every acknowledged message, intact. Copies of 16 MiB payloads are taken only
    // when something new arrived.
    let deadline = Instant::now() + LARGE_ARRIVAL_TIMEOUT;
    let mut checked = usize::MAX;
    loop {
        let n = collector.count();
        if n != checked {
            checked = n;
            let got: HashSet<u64> = collector
                .received()
                .iter()
                .filter_map(|r| parse_header(&r.payload).map(|(s, _)| s))
                .collect();
            if sensors_acked.iter().all(|s| got.contains(s)) {
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    collector.wait_quiet(Duration::from_millis(500), Duration::from_secs(5));
    let mut up = Arrivals::default();
    for r in collector.received() {
        up.add("upstream", &sent, &r.topic, "site1/", &r.payload);
    }

    // The persistent session, offline through every cut: every acknowledged message, intact.
    let (mut s, present) =
        RawClient::connect_ok(ws.addr, &Connect::new(LARGE_SESSION_ID).clean(false));
    assert!(
        present,
        "the persistent session must survive {LARGE_CUTS} power cuts\n--- daemon log ---\n{}",
        ws.logs()
    );
    let mut session = Arrivals::default();
    let deadline = Instant::now() + LARGE_ARRIVAL_TIMEOUT;
    loop {
        let complete = sensors_acked.iter().all(|q| session.unique.contains(q));
        if Instant::now() >= deadline {
            break;
        }
        let wait = if complete {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(2)
        };
        match s.recv_timeout(wait) {
            Ok(Pkt::Publish(p)) => {
                s.ack(&p);
                session.add("persistent session", &sent, &p.topic, "", &p.payload);
            }
            Ok(other) => panic!("unexpected packet for the session: {other:?}"),
            Err(RecvError::Timeout) if complete => break,
            Err(RecvError::Timeout) => {}
            Err(RecvError::Closed) => panic!("the daemon closed the persistent session"),
        }
    }
    s.disconnect();

    let up_missing = up.missing(&sensors_acked);
    let session_missing = session.missing(&sensors_acked);
    let bytes = |seqs: &mut dyn Iterator<Item = &u64>| -> usize { seqs.map(|s| sent[s].len).sum() };
    let stats = fs.stats();
    let bad = bad_log_lines(&ws.logs());
    println!(
        "large messages through power cuts: {LARGE_CUTS} cuts (aimed at an fsync of the db: \
         0, 1, 3, 4; upstream frozen: 1, 3, 5); sent {} messages ({} MiB), acknowledged {} \
         ({} MiB; {} bridged ones, {} MiB), of the cut bursts {burst_acked:?}; upstream: {} \
         unique ({} acknowledged ones lost), {} duplicates; session: {} unique ({} lost), {} \
         duplicates; retained (got, last acknowledged) after each cut {retained_seen:?}; \
         unsynced data dropped at each cut (files, bytes) {dropped:?}; file system: {} fsyncs \
         ({} MiB synced); {:?}",
        sent.len(),
        bytes(&mut sent.keys()) >> 20,
        acked.len(),
        bytes(&mut acked.iter()) >> 20,
        sensors_acked.len(),
        bytes(&mut sensors_acked.iter()) >> 20,
        up.unique.len(),
        up_missing.len(),
        up.duplicates,
        session.unique.len(),
        session_missing.len(),
        session.duplicates,
        stats.fsyncs,
        stats.synced_bytes >> 20,
        started.elapsed()
    );

    assert!(anomalies.is_empty(), "publishers: {anomalies:?}");
    assert!(
        up_missing.is_empty(),
        "acknowledged messages missing upstream after the power cuts: {:?}\n--- daemon log ---\n{}",
        up_missing.iter().map(|s| &sent[s]).collect::<Vec<_>>(),
        ws.logs()
    );
    assert!(up.problems.is_empty(), "upstream: {:#?}", up.problems);
    assert!(
        session_missing.is_empty(),
        "acknowledged messages the offline persistent session never got: {:?}\n--- daemon log ---\n{}",
        session_missing.iter().map(|s| &sent[s]).collect::<Vec<_>>(),
        ws.logs()
    );
    assert!(
        session.problems.is_empty(),
        "session: {:#?}",
        session.problems
    );
    assert!(bad.is_empty(), "the daemon's log: {bad:#?}");
    // The aimed cuts must find a large record between its write and its fsync (a held fsync
    // with less behind it, e.g. a bridge cursor's commit, proves less).
    let aimed_large = dropped
        .iter()
        .enumerate()
        .filter(|(cut, (_, bytes))| cut % 3 != 2 && *bytes >= 500_000)
        .count();
    assert!(
        aimed_large >= 2,
        "the cuts held at an fsync found no large record unsynced: {dropped:?}"
    );
}
