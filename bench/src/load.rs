//! The load itself: publishers with a bounded in-flight window (or a fixed rate), subscribers
//! that check ids and timestamps, idle connections, and the broker's memory from /proc.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::event::{self, PayloadFormat};
use crate::proto::{self, Conn, HEADER_LEN};
use crate::report::{Labels, Record};

const KEEP_ALIVE: u16 = 600;
const WRITE_CHUNK: usize = 64 * 1024;
const DEFAULT_TOPIC: &str = "sensors/{p}/temp";

#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Broker the publishers connect to.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Broker the subscribers connect to (default: --addr); e.g. the upstream behind a bridge.
    #[arg(long)]
    pub sub_addr: Option<SocketAddr>,
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// Messages per publisher (with --rate and --duration: rate x duration).
    #[arg(long, default_value_t = 20_000)]
    pub messages: u32,
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Subscription QoS (default: --qos).
    #[arg(long)]
    pub sub_qos: Option<u8>,
    /// Payload bytes (at least 16: publisher id, sequence, timestamp).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Payloads: `binary` (--payload bytes: id, sequence, send time) or `event-v1`, the
    /// firmware's JSON events (docs/event-schema.md; --payload is ignored), publisher N being
    /// device sim-000N on `sensors/sim-000N/events` (unless --topic says otherwise; `{d}` in
    /// it is the device id), boot fixed, seq from 0. Subscribers then count events, whether
    /// they arrive one per PUBLISH or in an edge's batches, and measure no latency.
    #[arg(long, value_enum, default_value_t = PayloadFormat::Binary)]
    pub payload_format: PayloadFormat,
    /// Number of the first publisher (its id in payloads and `{p}` in the topic): runs that
    /// add to the same backlog use different bases so a later drain can tell them apart.
    #[arg(long, default_value_t = 0)]
    pub publisher_base: u32,
    /// Messages per second per publisher; 0 = as fast as the in-flight window allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to publish for at --rate (sets --messages).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Unacknowledged QoS 1/2 publishes per publisher.
    #[arg(long, default_value_t = 100)]
    pub inflight: usize,
    /// Open loop (with --rate): message i of a publisher is due at start + i/rate whatever
    /// came back; its latency (to the subscriber and to the PUBACK) counts from that scheduled
    /// time, so a broker that makes the sender wait is charged for it (no coordinated
    /// omission). Unacknowledged messages are bounded only by the 65,535 packet ids.
    #[arg(long)]
    pub open_loop: bool,
    /// With --rate: messages are due in bursts of this many (the same average rate).
    #[arg(long, default_value_t = 1)]
    pub burst: u32,
    /// Subscribers read at most this many bytes/s from their sockets while publishers are
    /// at work (a subscriber that cannot keep up); afterwards they read at full speed, so
    /// what the broker kept still arrives and `lost` is what it dropped. 0: no limit.
    #[arg(long, default_value_t = 0.0)]
    pub sub_read_rate: f64,
    /// MQTT version of the publishers: 4 (3.1.1) or 5. Subscribers speak 3.1.1.
    #[arg(long, default_value_t = 4)]
    pub protocol: u8,
    /// With --protocol 5: every PUBLISH carries a message expiry interval and a user property.
    #[arg(long)]
    pub v5_properties: bool,
    /// Topic per publisher; {p} is replaced by the publisher index (event-v1 default:
    /// sensors/{d}/events).
    #[arg(long, default_value = DEFAULT_TOPIC)]
    pub topic: String,
    #[arg(long, default_value = "sensors/#")]
    pub filter: String,
    /// Subscribers use clean_session=false with fixed client ids (sessions survive a broker restart).
    #[arg(long)]
    pub sub_persistent: bool,
    /// Subscribers reconnect (every 10 ms) when their connection drops.
    #[arg(long)]
    pub sub_reconnect: bool,
    /// Stop waiting this long after the last new message once publishing is done.
    #[arg(long, default_value_t = 5.0)]
    pub idle_timeout: f64,
    /// Hard limit for the whole run, in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub max_time: f64,
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Client id prefix.
    #[arg(long, default_value = "wsb")]
    pub client_prefix: String,
    /// The broker's process id: its VmRSS is sampled and VmHWM read from /proc/<pid>/status.
    #[arg(long)]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub labels: Labels,
}

/// VmRSS and VmHWM in KiB.
pub fn proc_mem(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

struct RssSampler {
    max_kib: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let max_kib = Arc::new(AtomicU64::new(0));
        let (stop, mut rx) = watch::channel(false);
        let m = max_kib.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Some((rss, _)) = proc_mem(pid) {
                    m.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = rx.changed() => return,
                }
            }
        });
        RssSampler {
            max_kib,
            stop,
            task,
        }
    }
    async fn finish(self) -> u64 {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.max_kib.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct PubResult {
    /// Open loop, QoS 1/2: scheduled send to PUBACK/PUBCOMP, microseconds.
    ack_hist: Option<Histogram<u64>>,
    sent: u64,
    acked: u64,
    /// MQTT 5 acknowledgements with a reason code of 0x80 or above (counted in `acked`).
    refused: u64,
    last_ack: Option<Instant>,
    /// Payload bytes sent.
    payload_bytes: u64,
}

struct PubPlan {
    qos: u8,
    messages: u32,
    payload: usize,
    inflight: usize,
    period: Option<Duration>,
    open_loop: bool,
    burst: u32,
    /// Wall-clock nanoseconds at `t0` (scheduled send times are stamped from it).
    t0_ns: u64,
    /// MQTT 5 publishers: the property block of every PUBLISH.
    v5_properties: Option<Vec<u8>>,
    format: PayloadFormat,
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    idx: u32,
    topic: String,
    conn: Conn,
    plan: Arc<PubPlan>,
    t0: Instant,
    offset: Duration,
    done: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> Result<PubResult> {
    let (mut rd, mut wr) = conn.stream.into_split();
    let mut rbuf = conn.leftover;
    let mut reader = conn.reader;
    rbuf.reserve(64 * 1024);
    let mut wbuf = BytesMut::with_capacity(WRITE_CHUNK * 2);
    // 0: free, 1: waiting for PUBACK/PUBREC, 2: waiting for PUBCOMP.
    let mut pkid_state = vec![0u8; 65536];
    let mut next_pkid: u16 = 0;
    let mut inflight = 0usize;
    let mut seq = 0u32;
    let mut res = PubResult::default();
    let qos = plan.qos;
    let window = match (qos, plan.open_loop) {
        (0, _) => usize::MAX,
        (_, true) => 65_535,
        _ => plan.inflight,
    };
    let burst = plan.burst.max(1);
    let due = |seq: u32| plan.period.map(|p| t0 + offset + p * (seq - seq % burst));
    // Open loop: the scheduled send time of each packet id in flight, for its PUBACK latency.
    let mut sched_ns = vec![0u64; if plan.open_loop && qos > 0 { 65536 } else { 0 }];
    if plan.open_loop && qos > 0 {
        res.ack_hist = Some(Histogram::new(3).expect("histogram"));
    }
    let mut event_buf = Vec::with_capacity(256);
    let stamp = |seq: u32| match due(seq) {
        Some(d) if plan.open_loop => plan.t0_ns + d.duration_since(t0).as_nanos() as u64,
        _ => proto::now_ns(),
    };
    loop {
        let now = Instant::now();
        while seq < plan.messages && inflight < window && wbuf.len() < WRITE_CHUNK {
            if let Some(d) = due(seq) {
                if d > now {
                    break;
                }
            }
            let mut pkid = 0;
            if qos > 0 {
                loop {
                    next_pkid = next_pkid.wrapping_add(1);
                    if next_pkid != 0 && pkid_state[next_pkid as usize] == 0 {
                        break;
                    }
                }
                pkid = next_pkid;
                pkid_state[pkid as usize] = 1;
                inflight += 1;
            }
            let sent_ns = stamp(seq);
            if let Some(s) = sched_ns.get_mut(pkid as usize) {
                *s = sent_ns;
            }
            match plan.format {
                PayloadFormat::Binary => {
                    proto::encode_publish(
                        &mut wbuf,
                        &topic,
                        qos,
                        pkid,
                        idx,
                        seq,
                        sent_ns,
                        plan.payload,
                        plan.v5_properties.as_deref(),
                    );
                    res.payload_bytes += plan.payload as u64;
                }
                PayloadFormat::EventV1 => {
                    event_buf.clear();
                    event::write_event(&mut event_buf, idx, seq);
                    proto::encode_publish_payload(
                        &mut wbuf,
                        &topic,
                        qos,
                        pkid,
                        &event_buf,
                        plan.v5_properties.as_deref(),
                    );
                    res.payload_bytes += event_buf.len() as u64;
                }
            }
            seq += 1;
            res.sent += 1;
        }
        if seq == plan.messages && wbuf.is_empty() && (qos == 0 || inflight == 0) {
            if qos == 0 {
                res.acked = res.sent;
                res.last_ack = Some(Instant::now());
            }
            break;
        }
        let wake = if seq < plan.messages && inflight < window {
            due(seq)
        } else {
            None
        };
        tokio::select! {
            biased;
            r = rd.read_buf(&mut rbuf) => {
                if r.context("publisher read")? == 0 {
                    bail!("publisher {idx}: broker closed the connection after {} acks", res.acked);
                }
                let now = Instant::now();
                let now_ns = if res.ack_hist.is_some() { proto::now_ns() } else { 0 };
                let acked_at = |pkid: u16, res: &mut PubResult| {
                    if let (Some(h), Some(s)) = (res.ack_hist.as_mut(), sched_ns.get(pkid as usize)) {
                        let _ = h.record(now_ns.saturating_sub(*s) / 1000);
                    }
                };
                reader.drain(&mut rbuf, |ack| match ack {
                    proto::Reply::PubAck { pkid, refused } if pkid_state[pkid as usize] == 1 => {
                        acked_at(pkid, &mut res);
                        pkid_state[pkid as usize] = 0;
                        inflight -= 1;
                        res.acked += 1;
                        res.refused += u64::from(refused);
                        res.last_ack = Some(now);
                    }
                    proto::Reply::PubRec { pkid, refused } if pkid_state[pkid as usize] == 1 => {
                        if refused {
                            // A refused QoS 2 message ends at its PUBREC [MQTT-4.3.3].
                            pkid_state[pkid as usize] = 0;
                            inflight -= 1;
                            res.acked += 1;
                            res.refused += 1;
                            res.last_ack = Some(now);
                        } else {
                            pkid_state[pkid as usize] = 2;
                            proto::put_ack(&mut wbuf, proto::PUBREL, pkid);
                        }
                    }
                    proto::Reply::PubComp { pkid } if pkid_state[pkid as usize] == 2 => {
                        acked_at(pkid, &mut res);
                        pkid_state[pkid as usize] = 0;
                        inflight -= 1;
                        res.acked += 1;
                        res.last_ack = Some(now);
                    }
                    _ => {}
                })?;
            }
            r = wr.write(&wbuf), if !wbuf.is_empty() => {
                let n = r.context("publisher write")?;
                wbuf.advance(n);
            }
            _ = tokio::time::sleep_until(wake.unwrap_or(now).into()), if wake.is_some() && wbuf.is_empty() => {}
        }
    }
    done.fetch_add(1, Ordering::SeqCst);
    // Stay connected until the run ends (memory is measured with the clients connected).
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = rd.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { break },
        }
    }
    // DISCONNECT.
    let _ = wr.write_all(&[0xE0, 0x00]).await;
    Ok(res)
}

/// What one subscriber saw.
pub struct SubState {
    format: PayloadFormat,
    seen: Vec<Vec<u64>>,
    /// PUBLISH packets and their payload bytes (with event-v1 batches: fewer than messages).
    pub publishes: u64,
    pub payload_bytes: u64,
    pub received: u64,
    pub unique: u64,
    pub stray: u64,
    pub hist: Histogram<u64>,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    pub reconnects: u64,
}

impl SubState {
    fn new(format: PayloadFormat) -> Self {
        SubState {
            format,
            seen: Vec::new(),
            publishes: 0,
            payload_bytes: 0,
            received: 0,
            unique: 0,
            stray: 0,
            hist: Histogram::new(3).expect("histogram"),
            first: None,
            last: None,
            reconnects: 0,
        }
    }
    /// Records one PUBLISH; returns how many new messages it brought.
    fn record(&mut self, payload: &[u8], now_ns: u64, now: Instant) -> u64 {
        self.publishes += 1;
        self.payload_bytes += payload.len() as u64;
        match self.format {
            PayloadFormat::Binary => {
                let Some((p, seq, ts)) = proto::parse_payload(payload) else {
                    self.stray += 1;
                    return 0;
                };
                let _ = self.hist.record(now_ns.saturating_sub(ts) / 1000);
                u64::from(self.message(p, seq, now))
            }
            PayloadFormat::EventV1 => {
                let mut new = 0;
                if event::events_in(payload, |p, seq| {
                    new += u64::from(self.message(p, seq, now))
                })
                .is_err()
                {
                    self.stray += 1;
                }
                new
            }
        }
    }

    /// Message `seq` of publisher `p` arrived; returns whether it was new.
    fn message(&mut self, p: u32, seq: u32, now: Instant) -> bool {
        self.received += 1;
        if self.first.is_none() {
            self.first = Some(now);
        }
        self.last = Some(now);
        let p = p as usize;
        if p >= 1 << 20 {
            self.stray += 1;
            return false;
        }
        if self.seen.len() <= p {
            self.seen.resize_with(p + 1, Vec::new);
        }
        let bits = &mut self.seen[p];
        let word = (seq / 64) as usize;
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        let mask = 1u64 << (seq % 64);
        if bits[word] & mask != 0 {
            return false;
        }
        bits[word] |= mask;
        self.unique += 1;
        true
    }
}

pub struct SubPlan {
    pub addr: SocketAddr,
    pub filter: String,
    pub qos: QoS,
    pub client_id: String,
    pub clean: bool,
    pub reconnect: bool,
    /// Bytes/s read from the socket until `unthrottle` is set (None: no limit).
    pub read_rate: Option<f64>,
    pub unthrottle: Arc<std::sync::atomic::AtomicBool>,
    pub format: PayloadFormat,
}

/// A reader limited to `rate` bytes/s on average: how much it may read now, or how long to
/// wait before it may read `chunk`.
struct Throttle {
    rate: f64,
    start: Instant,
    read: u64,
}

impl Throttle {
    fn allowance(&self, chunk: usize) -> Result<usize, Duration> {
        let earned = self.rate * self.start.elapsed().as_secs_f64() - self.read as f64;
        if earned >= chunk as f64 {
            Ok(chunk)
        } else {
            Err(Duration::from_secs_f64((chunk as f64 - earned) / self.rate))
        }
    }
}

/// Runs one subscriber until `stop`; `progress` counts new messages over all subscribers.
pub async fn subscriber(
    plan: SubPlan,
    first_conn: Option<Conn>,
    progress: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Result<SubState> {
    let mut st = SubState::new(plan.format);
    let mut conn = first_conn;
    'outer: loop {
        let c = match conn.take() {
            Some(c) => c,
            None => {
                // (Re)connect every 10 ms until stopped.
                loop {
                    if *stop.borrow() {
                        break 'outer;
                    }
                    match proto::connect(
                        plan.addr,
                        &plan.client_id,
                        plan.clean,
                        KEEP_ALIVE,
                        Duration::from_secs(2),
                        4,
                    )
                    .await
                    {
                        Ok(mut c) => {
                            proto::send_subscribe(&mut c, &plan.filter, plan.qos).await?;
                            st.reconnects += 1;
                            break c;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }
        };
        let (mut rd, mut wr) = c.stream.into_split();
        let mut rbuf = c.leftover;
        rbuf.reserve(256 * 1024);
        let mut throttle = plan.read_rate.map(|rate| Throttle {
            rate,
            start: Instant::now(),
            read: 0,
        });
        // Read in slices of 1/50 s worth, 1-64 KiB.
        let chunk = plan
            .read_rate
            .map_or(0, |r| ((r / 50.0) as usize).clamp(1024, 64 * 1024));
        let mut acks = BytesMut::with_capacity(16 * 1024);
        loop {
            // Packets already buffered (e.g. read together with the CONNACK) come first.
            let now = Instant::now();
            let now_ns = proto::now_ns();
            let mut new = 0u64;
            proto::drain_packets(&mut rbuf, |p| {
                match p {
                    Packet::Publish(publ) => {
                        new += st.record(&publ.payload, now_ns, now);
                        match publ.qos {
                            QoS::AtLeastOnce => proto::put_ack(&mut acks, proto::PUBACK, publ.pkid),
                            QoS::ExactlyOnce => proto::put_ack(&mut acks, proto::PUBREC, publ.pkid),
                            QoS::AtMostOnce => {}
                        }
                    }
                    Packet::PubRel(r) => proto::put_ack(&mut acks, proto::PUBCOMP, r.pkid),
                    _ => {}
                }
                Ok(())
            })?;
            if new > 0 {
                progress.fetch_add(new, Ordering::Relaxed);
            }
            if !acks.is_empty() {
                if wr.write_all(&acks).await.is_err() {
                    if plan.reconnect {
                        continue 'outer;
                    }
                    bail!("subscriber write failed");
                }
                acks.clear();
            }
            // Room for a large read: `read_buf` on a full BytesMut would grow it (and read)
            // 64 bytes at a time, which large payloads would feel.
            if rbuf.capacity() - rbuf.len() < 64 * 1024 {
                rbuf.reserve(256 * 1024);
            }
            if throttle.is_some() && plan.unthrottle.load(Ordering::Relaxed) {
                throttle = None;
            }
            let limit = match throttle.as_ref().map(|t| t.allowance(chunk)) {
                Some(Err(wait)) => {
                    tokio::select! {
                        _ = stop.changed() => break 'outer,
                        _ = tokio::time::sleep(wait.min(Duration::from_millis(20))) => {}
                    }
                    continue;
                }
                Some(Ok(n)) => n as u64,
                None => u64::MAX,
            };
            let mut limited = (&mut rd).take(limit);
            tokio::select! {
                biased;
                _ = stop.changed() => break 'outer,
                r = limited.read_buf(&mut rbuf) => match r {
                    Ok(n) if n > 0 => {
                        if let Some(t) = throttle.as_mut() {
                            t.read += n as u64;
                        }
                    }
                    _ if plan.reconnect => continue 'outer,
                    Ok(_) => bail!("subscriber: broker closed the connection"),
                    Err(e) => bail!("subscriber read: {e}"),
                },
            }
        }
    }
    Ok(st)
}

fn merge(
    states: &[SubState],
) -> (
    Histogram<u64>,
    u64,
    u64,
    u64,
    Option<Instant>,
    Option<Instant>,
    u64,
) {
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let (mut received, mut unique, mut stray, mut reconnects) = (0, 0, 0, 0);
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for s in states {
        hist.add(&s.hist).expect("merge histograms");
        received += s.received;
        unique += s.unique;
        stray += s.stray;
        reconnects += s.reconnects;
        first = match (first, s.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = last.max(s.last);
    }
    (hist, received, unique, stray, first, last, reconnects)
}

fn latency_fields(rec: &mut BTreeMap<String, f64>, hist: &Histogram<u64>) {
    if hist.is_empty() {
        return;
    }
    rec.insert("p50_ms".into(), hist.value_at_quantile(0.5) as f64 / 1000.0);
    rec.insert(
        "p99_ms".into(),
        hist.value_at_quantile(0.99) as f64 / 1000.0,
    );
    rec.insert(
        "p999_ms".into(),
        hist.value_at_quantile(0.999) as f64 / 1000.0,
    );
    rec.insert("max_ms".into(), hist.max() as f64 / 1000.0);
}

async fn connect_many(
    addr: SocketAddr,
    ids: Vec<String>,
    clean: bool,
    concurrency: usize,
    protocol: u8,
) -> Result<Vec<Conn>> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let n = ids.len();
    for (i, id) in ids.into_iter().enumerate() {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            let mut tries = 0;
            loop {
                match proto::connect(
                    addr,
                    &id,
                    clean,
                    KEEP_ALIVE,
                    Duration::from_secs(10),
                    protocol,
                )
                .await
                {
                    Ok(c) => return Ok((i, c)),
                    Err(e) if tries < 3 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.context(format!("client {id}"))),
                }
            }
        });
    }
    let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r??;
        conns[i] = Some(c);
    }
    Ok(conns.into_iter().map(|c| c.expect("connected")).collect())
}

pub async fn run(a: RunArgs) -> Result<Record> {
    let events = a.payload_format == PayloadFormat::EventV1;
    if a.payload < HEADER_LEN && !events {
        bail!("--payload must be at least {HEADER_LEN}");
    }
    proto::qos_from(a.qos)?;
    if a.protocol != 4 && a.protocol != 5 {
        bail!("--protocol must be 4 (MQTT 3.1.1) or 5");
    }
    if a.v5_properties && a.protocol != 5 {
        bail!("--v5-properties needs --protocol 5");
    }
    let sub_qos = proto::qos_from(a.sub_qos.unwrap_or(a.qos))?;
    let messages = match (a.rate > 0.0, a.duration) {
        (true, Some(d)) => (a.rate * d).round() as u32,
        _ => a.messages,
    };
    let rss_start = a.pid.and_then(proc_mem).map(|m| m.0);
    let sampler = a.pid.map(RssSampler::start);
    let sub_addr = a.sub_addr.unwrap_or(a.addr);
    let t_connect = Instant::now();

    // Subscribers first, SUBACK received before anyone publishes.
    let progress = Arc::new(AtomicU64::new(0));
    let unthrottle = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subs = JoinSet::new();
    let sub_ids: Vec<String> = (0..a.subscribers)
        .map(|j| format!("{}-sub-{j}", a.client_prefix))
        .collect();
    let sub_conns = connect_many(
        sub_addr,
        sub_ids.clone(),
        !a.sub_persistent,
        a.connect_concurrency,
        4,
    )
    .await?;
    for (j, mut c) in sub_conns.into_iter().enumerate() {
        proto::send_subscribe(&mut c, &a.filter, sub_qos).await?;
        // Wait for the SUBACK (a persistent session may deliver publishes first: keep them).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Parse a copy: the subscriber task handles whatever came before the SUBACK.
            let mut peek = c.leftover.clone();
            let mut got_suback = false;
            while let Ok(p) = Packet::read(&mut peek, proto::MAX_PACKET) {
                if matches!(p, Packet::SubAck(_)) {
                    got_suback = true;
                    break;
                }
            }
            if got_suback {
                break;
            }
            if Instant::now() > deadline {
                bail!("no SUBACK");
            }
            tokio::time::timeout(Duration::from_secs(10), c.stream.read_buf(&mut c.leftover))
                .await??;
        }
        let plan = SubPlan {
            addr: sub_addr,
            filter: a.filter.clone(),
            qos: sub_qos,
            client_id: sub_ids[j].clone(),
            clean: !a.sub_persistent,
            reconnect: a.sub_reconnect,
            read_rate: (a.sub_read_rate > 0.0).then_some(a.sub_read_rate),
            unthrottle: unthrottle.clone(),
            format: a.payload_format,
        };
        subs.spawn(subscriber(plan, Some(c), progress.clone(), stop_rx.clone()));
    }

    let pub_ids: Vec<String> = (0..a.publishers)
        .map(|i| format!("{}-pub-{i}", a.client_prefix))
        .collect();
    let pub_conns = connect_many(a.addr, pub_ids, true, a.connect_concurrency, a.protocol).await?;
    let connect_secs = t_connect.elapsed().as_secs_f64();

    let plan = PubPlan {
        qos: a.qos,
        messages,
        payload: a.payload,
        inflight: a.inflight,
        period: (a.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / a.rate)),
        open_loop: a.open_loop,
        burst: a.burst,
        t0_ns: 0,
        v5_properties: (a.protocol == 5).then(|| {
            if a.v5_properties {
                proto::v5_publish_properties()
            } else {
                vec![0]
            }
        }),
        format: a.payload_format,
    };
    if a.open_loop && a.rate <= 0.0 {
        bail!("--open-loop needs --rate");
    }
    // The wall clock at t0 (open-loop payloads are stamped from it; the Instant follows at once).
    let plan = Arc::new(PubPlan {
        t0_ns: proto::now_ns(),
        ..plan
    });
    let t0 = Instant::now();
    let pubs_done = Arc::new(AtomicUsize::new(0));
    let mut pubs = JoinSet::new();
    for (i, c) in pub_conns.into_iter().enumerate() {
        let idx = a.publisher_base + i as u32;
        let template = match a.topic.as_str() {
            DEFAULT_TOPIC if events => "sensors/{d}/events",
            t => t,
        };
        let topic = template
            .replace("{p}", &idx.to_string())
            .replace("{d}", &event::device_id(idx));
        let offset = plan
            .period
            .map(|p| p.mul_f64(i as f64 / a.publishers as f64))
            .unwrap_or_default();
        let plan = plan.clone();
        let done = pubs_done.clone();
        let stop = stop_rx.clone();
        pubs.spawn(async move {
            let r = publisher(idx, topic, c, plan, t0, offset, done.clone(), stop).await;
            if r.is_err() {
                // A failed publisher is done too (its error is reported).
                done.fetch_add(1, Ordering::SeqCst);
            }
            r
        });
    }

    // Wait: every subscriber has every message, or nothing new for idle_timeout once publishing
    // is over, or max_time.
    let expected_per_sub = messages as u64 * a.publishers as u64;
    let expected = expected_per_sub * a.subscribers as u64;
    let idle = Duration::from_secs_f64(a.idle_timeout);
    let hard = t0 + Duration::from_secs_f64(a.max_time);
    let mut last_progress = (0u64, Instant::now());
    let mut pubs_done_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = Instant::now();
        let p = progress.load(Ordering::Relaxed);
        if p != last_progress.0 {
            last_progress = (p, now);
        }
        let all_pubs = pubs_done.load(Ordering::SeqCst) == a.publishers;
        if all_pubs && pubs_done_at.is_none() {
            pubs_done_at = Some(now);
            unthrottle.store(true, Ordering::Relaxed);
        }
        if all_pubs && p >= expected {
            break;
        }
        if let Some(d) = pubs_done_at {
            if now.duration_since(last_progress.1.max(d)) > idle {
                break;
            }
        }
        if now > hard {
            eprintln!("wsbench: max time reached");
            break;
        }
    }
    let _ = stop_tx.send(true);
    let mut pub_res = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = pubs.join_next().await {
        match r? {
            Ok(p) => pub_res.push(p),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let mut states = Vec::new();
    while let Some(r) = subs.join_next().await {
        match r? {
            Ok(s) => states.push(s),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let rss_max = match sampler {
        Some(s) => Some(s.finish().await),
        None => None,
    };
    let hwm = a.pid.and_then(proc_mem);

    let sent: u64 = pub_res.iter().map(|p| p.sent).sum();
    let acked: u64 = pub_res.iter().map(|p| p.acked).sum();
    let refused: u64 = pub_res.iter().map(|p| p.refused).sum();
    let last_ack = pub_res.iter().filter_map(|p| p.last_ack).max();
    let mut ack_hist: Option<Histogram<u64>> = None;
    for h in pub_res.iter().filter_map(|p| p.ack_hist.as_ref()) {
        match ack_hist.as_mut() {
            Some(all) => all.add(h).expect("merge histograms"),
            None => ack_hist = Some(h.clone()),
        }
    }
    let (hist, received, unique, stray, _first, last, reconnects) = merge(&states);

    let mut rec = Record::new(&a.labels);
    let f = &mut rec.values;
    f.insert("publishers".into(), a.publishers as f64);
    f.insert("subscribers".into(), a.subscribers as f64);
    f.insert("qos".into(), a.qos as f64);
    f.insert("protocol".into(), a.protocol as f64);
    if refused > 0 {
        f.insert("refused".into(), refused as f64);
    }
    let payload_bytes: u64 = pub_res.iter().map(|p| p.payload_bytes).sum();
    // Event payloads vary in length: their mean.
    let payload_len = match a.payload_format {
        PayloadFormat::Binary => a.payload as f64,
        PayloadFormat::EventV1 => payload_bytes as f64 / sent.max(1) as f64,
    };
    f.insert("payload".into(), payload_len);
    if a.subscribers > 0 {
        f.insert(
            "publishes".into(),
            states.iter().map(|s| s.publishes).sum::<u64>() as f64,
        );
    }
    f.insert("expected".into(), expected as f64);
    f.insert("sent".into(), sent as f64);
    f.insert("acked".into(), acked as f64);
    f.insert("received".into(), received as f64);
    f.insert("unique".into(), unique as f64);
    f.insert("lost".into(), expected.saturating_sub(unique) as f64);
    f.insert("dup".into(), (received - unique) as f64);
    f.insert("connect_s".into(), connect_secs);
    if stray > 0 {
        f.insert("stray".into(), stray as f64);
    }
    if a.sub_reconnect {
        f.insert("sub_reconnects".into(), reconnects as f64);
    }
    // Payload MiB/s beside msg/s (for large payloads the figure that matters).
    let mib = payload_len / (1024.0 * 1024.0);
    if let Some(t) = last_ack {
        let s = t.duration_since(t0).as_secs_f64();
        f.insert("pub_s".into(), s);
        f.insert("pub_rate".into(), acked as f64 / s);
        f.insert("pub_mib_s".into(), acked as f64 * mib / s);
    }
    if let Some(t) = last {
        let s = t.duration_since(t0).as_secs_f64();
        f.insert("e2e_s".into(), s);
        f.insert("e2e_rate".into(), unique as f64 / s);
        f.insert("e2e_mib_s".into(), unique as f64 * mib / s);
    }
    latency_fields(f, &hist);
    if let Some(h) = ack_hist.filter(|h| !h.is_empty()) {
        f.insert(
            "ack_p50_ms".into(),
            h.value_at_quantile(0.5) as f64 / 1000.0,
        );
        f.insert(
            "ack_p99_ms".into(),
            h.value_at_quantile(0.99) as f64 / 1000.0,
        );
        f.insert(
            "ack_p999_ms".into(),
            h.value_at_quantile(0.999) as f64 / 1000.0,
        );
    }
    if a.rate > 0.0 {
        f.insert("target_rate".into(), a.rate * a.publishers as f64);
    }
    if a.sub_read_rate > 0.0 {
        f.insert("sub_read_rate".into(), a.sub_read_rate);
    }
    if let Some(r) = rss_start {
        f.insert("rss_start_mib".into(), r as f64 / 1024.0);
    }
    if let Some(r) = rss_max {
        f.insert("rss_max_mib".into(), r as f64 / 1024.0);
    }
    if let Some((rss, hwm)) = hwm {
        f.insert("rss_end_mib".into(), rss as f64 / 1024.0);
        f.insert("hwm_mib".into(), hwm as f64 / 1024.0);
    }
    rec.errors = errors;
    Ok(rec)
}

#[derive(clap::Args, Clone, Debug)]
pub struct SubArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long, default_value = "sensors/#")]
    pub filter: String,
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Messages expected in total (ids from any publisher).
    #[arg(long)]
    pub expect: u64,
    #[arg(long, default_value = "wsb-drain")]
    pub client_id: String,
    /// clean_session=false.
    #[arg(long)]
    pub persistent: bool,
    /// Stop this long after the last new message (once the first has arrived).
    #[arg(long, default_value_t = 10.0)]
    pub idle_timeout: f64,
    #[arg(long, default_value_t = 300.0)]
    pub max_time: f64,
    /// Process whose memory to sample meanwhile (e.g. the draining edge).
    #[arg(long)]
    pub pid: Option<u32>,
    /// What the messages are (see `run`): with `event-v1` it counts events, also those an
    /// edge packed into batches, and reports the PUBLISHes and payload bytes that carried them.
    #[arg(long, value_enum, default_value_t = PayloadFormat::Binary)]
    pub payload_format: PayloadFormat,
    #[command(flatten)]
    pub labels: Labels,
}

/// A lone subscriber that (re)connects until it has `expect` messages: measures a drain as
/// (messages - 1) / (last arrival - first arrival), independent of reconnect back-off.
pub async fn sub(a: SubArgs) -> Result<Record> {
    let plan = SubPlan {
        addr: a.addr,
        filter: a.filter.clone(),
        qos: proto::qos_from(a.qos)?,
        client_id: a.client_id.clone(),
        clean: !a.persistent,
        reconnect: true,
        read_rate: None,
        unthrottle: Default::default(),
        format: a.payload_format,
    };
    let sampler = a.pid.map(RssSampler::start);
    let progress = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Instant::now();
    let task = tokio::spawn(subscriber(plan, None, progress.clone(), stop_rx));
    let idle = Duration::from_secs_f64(a.idle_timeout);
    let hard = t0 + Duration::from_secs_f64(a.max_time);
    let mut last = (0u64, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = Instant::now();
        let p = progress.load(Ordering::Relaxed);
        if p != last.0 {
            last = (p, now);
        }
        if p >= a.expect || (p > 0 && now.duration_since(last.1) > idle) || now > hard {
            break;
        }
    }
    let _ = stop_tx.send(true);
    let st = task.await??;
    let rss_max = match sampler {
        Some(s) => Some(s.finish().await),
        None => None,
    };
    let mut rec = Record::new(&a.labels);
    let f = &mut rec.values;
    f.insert("expected".into(), a.expect as f64);
    f.insert("received".into(), st.received as f64);
    f.insert("unique".into(), st.unique as f64);
    f.insert("lost".into(), a.expect.saturating_sub(st.unique) as f64);
    f.insert("dup".into(), (st.received - st.unique) as f64);
    f.insert("publishes".into(), st.publishes as f64);
    f.insert("payload_bytes".into(), st.payload_bytes as f64);
    if st.stray > 0 {
        f.insert("stray".into(), st.stray as f64);
    }
    if let (Some(first), Some(lastm)) = (st.first, st.last) {
        let s = lastm.duration_since(first).as_secs_f64();
        f.insert("drain_s".into(), s);
        if s > 0.0 {
            f.insert(
                "drain_rate".into(),
                (st.unique.saturating_sub(1)) as f64 / s,
            );
        }
        f.insert(
            "wait_first_s".into(),
            first.duration_since(t0).as_secs_f64(),
        );
    }
    if let Some(r) = rss_max {
        f.insert("rss_max_mib".into(), r as f64 / 1024.0);
    }
    if let Some((rss, hwm)) = a.pid.and_then(proc_mem) {
        f.insert("rss_end_mib".into(), rss as f64 / 1024.0);
        f.insert("hwm_mib".into(), hwm as f64 / 1024.0);
    }
    Ok(rec)
}
