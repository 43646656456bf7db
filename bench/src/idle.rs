//! Many idle connected clients: the broker's resident memory per connection and the connect
//! rate. The clients cost the tool little: no task per connection once connected (the
//! sockets are kept, deregistered from the runtime; keep-alive 600 s, so nothing is due
//! while they are held), and they spread over several source addresses (127.0.0.1,
//! 127.0.0.2, ...): one (source address, broker address) pair has at most ~28k ephemeral
//! ports, and well before that the kernel's search for a free one slows connects down
//! (19,800 clients into Mosquitto: 1,155 connects/s from one address, 5,484 from four).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;

use crate::load::proc_mem;
use crate::proto;
use crate::report::{Labels, Record};

/// Clients per source address (the ephemeral range 32768-60999 holds 28,232 ports; the
/// fuller it is, the longer each connect() searches for a free one).
const PER_SOURCE: usize = 5_000;

#[derive(clap::Args, Clone, Debug)]
pub struct IdleArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// Seconds to hold the connections before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Source addresses 127.0.0.1, 127.0.0.2, ... (default: one per 5,000 clients; a
    /// loopback broker address only).
    #[arg(long)]
    pub sources: Option<usize>,
    #[arg(long)]
    pub pid: Option<u32>,
    #[arg(long, default_value = "wsb-idle")]
    pub client_prefix: String,
    /// Each client subscribes (QoS 1) to this filter once connected, `{i}` replaced by its
    /// number (e.g. `devices/{i}/cmd`), and waits for its SUBACK before the measurement.
    #[arg(long)]
    pub subscribe: Option<String>,
    #[command(flatten)]
    pub labels: Labels,
}

/// The soft open files limit of this process, from /proc/self/limits.
fn nofile_soft() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Connects `clients` idle clients and reports the broker's resident memory per connection.
pub async fn idle(a: IdleArgs) -> Result<Record> {
    if let Some(limit) = nofile_soft() {
        if a.clients + 64 > limit {
            bail!(
                "{} clients need {} descriptors; this process may open {limit} (ulimit -n)",
                a.clients,
                a.clients + 64
            );
        }
    }
    let sources = a.sources.unwrap_or(a.clients.div_ceil(PER_SOURCE)).max(1);
    let src = |i: usize| -> Option<IpAddr> {
        (sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % sources) as u8)))
    };
    if sources > 1 && !a.addr.ip().is_loopback() {
        bail!("--sources > 1 binds 127.0.0.x: the broker must listen on loopback");
    }
    let before = a.pid.and_then(proc_mem);
    let t0 = Instant::now();
    let mut held: Vec<std::net::TcpStream> = Vec::with_capacity(a.clients);
    let mut set = JoinSet::new();
    let mut next = 0usize;
    while held.len() < a.clients {
        while next < a.clients && set.len() < a.connect_concurrency.max(1) {
            let (addr, source) = (a.addr, src(next));
            let id = format!("{}-{next}", a.client_prefix);
            let filter = a
                .subscribe
                .as_ref()
                .map(|f| f.replace("{i}", &next.to_string()));
            set.spawn(async move { connect_one(source, addr, id, filter).await });
            next += 1;
        }
        match set.join_next().await {
            Some(r) => held.push(r??),
            None => break,
        }
    }
    let connect_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let after = a.pid.and_then(proc_mem);
    let mut rec = Record::new(&a.labels);
    let f = &mut rec.values;
    f.insert("clients".into(), held.len() as f64);
    f.insert("sources".into(), sources as f64);
    f.insert("connect_s".into(), connect_s);
    f.insert("connect_rate".into(), held.len() as f64 / connect_s);
    if let (Some(b), Some(c)) = (before, after) {
        f.insert("rss_before_mib".into(), b.0 as f64 / 1024.0);
        f.insert("rss_after_mib".into(), c.0 as f64 / 1024.0);
        f.insert("hwm_mib".into(), c.1 as f64 / 1024.0);
        f.insert(
            "kib_per_conn".into(),
            (c.0 as f64 - b.0 as f64) / held.len() as f64,
        );
    }
    drop(held);
    Ok(rec)
}

/// One client: connected (CONNACK accepted, 3 tries) and subscribed to `filter` if any
/// (SUBACK received), then only its socket is kept.
async fn connect_one(
    src: Option<IpAddr>,
    addr: SocketAddr,
    id: String,
    filter: Option<String>,
) -> Result<std::net::TcpStream> {
    let mut tries = 0;
    loop {
        let r = proto::connect_from(src, addr, &id, true, 600, Duration::from_secs(10), 4).await;
        match r {
            Ok(mut c) => {
                if let Some(filter) = &filter {
                    proto::send_subscribe(&mut c, filter, rumqttc::mqttbytes::QoS::AtLeastOnce)
                        .await?;
                    wait_suback(&mut c).await?;
                }
                return c.stream.into_std().context("deregister the socket");
            }
            Err(_) if tries < 3 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context(format!("client {id}"))),
        }
    }
}

/// Reads until `c`'s SUBACK has come (what came before it is dropped: an idle client's
/// clean session has nothing queued).
async fn wait_suback(c: &mut proto::Conn) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while let Ok(p) = rumqttc::mqttbytes::v4::Packet::read(&mut c.leftover, proto::MAX_PACKET) {
            if matches!(p, rumqttc::mqttbytes::v4::Packet::SubAck(_)) {
                return Ok(());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.stream.read_buf(&mut c.leftover)).await?? == 0 {
            bail!("connection closed before its SUBACK");
        }
    }
}
