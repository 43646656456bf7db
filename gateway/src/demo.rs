//! `waystation demo`: the gateway's whole job in one process, with no config.
//!
//! - a "cloud": rumqttd (a second MQTT implementation) in-process on a loopback port, with
//!   a subscriber on it that records every event it receives;
//! - a TCP relay in front of the cloud that the demo can cut (the outage: connections are
//!   closed and new ones refused, as when the site's uplink goes away);
//! - with `--uplink-latency` or `--flaky`, the test kit's link simulator between the bridge
//!   and the relay: a WAN link's latency, and resets and silent "zombie" connections every
//!   4-9 s that the bridge must notice and survive;
//! - the edge broker with its durable store in a temporary directory and a bridge that
//!   forwards `sensors/+/events` to the cloud through the relay;
//! - the observability server (dashboard, /metrics) and `$SYS` topics;
//! - simulated sensors: the firmware crate's real device state machine over TCP.
//!
//! It shows a live status line, cuts the cloud off part-way, and ends (at `--duration` or
//! Ctrl-C) with a summary that checks itself: every event the sensors produced reached the
//! cloud, none lost, duplicates counted. Exit 0 when the check passes, 1 when it does not.

use std::collections::HashSet;
use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use waystation_broker::bridge::{BridgeConfig, ForwardRule, ReconnectConfig};
use waystation_broker::{Broker, BrokerConfig, Limits, StatusHandle, StorageLimits};
use waystation_firmware::sim::{SimOptions, SimReport};

/// Local topics forwarded to the cloud, and the prefix they get there.
const FORWARD: &str = "sensors/+/events";
const REMOTE_PREFIX: &str = "demo-site/";

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Seconds the sensors publish (the demo then drains and checks).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Number of simulated sensors.
    #[arg(long, default_value_t = 8)]
    pub sensors: usize,
    /// Threshold events per second per sensor.
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Seconds the cloud is unreachable, starting at 30% of the duration (0: no outage).
    /// Default: a quarter of the duration.
    #[arg(long)]
    pub outage: Option<f64>,
    /// One-way latency of the simulated uplink in milliseconds (0: a direct loopback link).
    #[arg(long, default_value_t = 0)]
    pub uplink_latency: u64,
    /// A flaky uplink: a connection reset or a silent zombie connection every 4-9 s.
    #[arg(long)]
    pub flaky: bool,
    /// Address of the dashboard and /metrics (falls back to a free port if taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
}

pub fn main(args: DemoArgs) -> ExitCode {
    if !(args.duration > 0.0 && args.duration.is_finite())
        || args.sensors == 0
        || !(args.rate > 0.0 && args.rate <= 200.0)
    {
        eprintln!("error: need --duration > 0, --sensors >= 1 and 0 < --rate <= 200");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("demo")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the cloud subscriber saw.
#[derive(Default)]
struct CloudLog {
    /// (device, boot, seq) of every event, once.
    unique: HashSet<(String, u64, u64)>,
    total: u64,
    unparsable: u64,
}

async fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let outage = Duration::from_secs_f64(args.outage.unwrap_or(args.duration / 4.0).max(0.0));
    let duration = Duration::from_secs_f64(args.duration);
    let outage_at = duration.mul_f64(0.3);
    let tty = std::io::stdout().is_terminal();
    let data = tempfile::Builder::new()
        .prefix("waystation-demo-")
        .tempdir()?;

    // The cloud, its subscriber, and the relay the bridge reaches it through.
    let cloud = start_cloud().await?;
    let cloud_log = Arc::new(Mutex::new(CloudLog::default()));
    start_cloud_subscriber(cloud, cloud_log.clone()).await?;
    let (relay_addr, cloud_down) = start_relay(cloud).await?;
    // The simulated WAN link, when asked for: between the bridge and the relay.
    let seed = fault_seed();
    let (uplink, link_sim) = if args.uplink_latency > 0 || args.flaky {
        let latency = Duration::from_millis(args.uplink_latency);
        let sim = waystation_linksim::LinkSim::start(waystation_linksim::LinkConfig {
            up_latency: latency,
            down_latency: latency,
            jitter: latency / 10,
            ..waystation_linksim::LinkConfig::new(relay_addr.to_string())
        })?;
        let chaos = args.flaky.then(|| {
            sim.handle().start_chaos(waystation_linksim::Chaos {
                seed,
                min_interval: Duration::from_secs(4),
                max_interval: Duration::from_secs(9),
                kinds: vec![
                    waystation_linksim::Fault::Reset,
                    waystation_linksim::Fault::Zombie,
                ],
            })
        });
        (sim.local_addr(), Some((sim, chaos)))
    } else {
        (relay_addr, None)
    };

    let broker_config = BrokerConfig {
        gateway_id: "demo".into(),
        listeners: vec![SocketAddr::from(([127, 0, 0, 1], 0)).into()],
        limits: Limits::default(),
        data_dir: Some(data.path().to_path_buf()),
        storage: StorageLimits::default(),
        bridges: vec![BridgeConfig {
            name: "cloud".into(),
            address: uplink.to_string(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            tls: None,
            keep_alive: 5,
            clean_session: false,
            connect_timeout: 5,
            max_inflight: 100,
            max_rate: None,
            ack_timeout: 5,
            reconnect: ReconnectConfig {
                initial_ms: 250,
                max_ms: 1000,
            },
            forward: vec![ForwardRule {
                local: FORWARD.into(),
                remote_prefix: REMOTE_PREFIX.into(),
                qos: 1,
            }],
            subscribe: vec![],
        }],
        security: Default::default(),
    };
    let broker = Broker::start(broker_config).await?;
    let edge = broker.local_addrs()[0];
    let handle = broker.status_handle();
    let (obs_stop, obs_stopped) = watch::channel(false);
    let http = match crate::http::serve(
        args.http,
        handle.clone(),
        "demo".into(),
        obs_stopped.clone(),
    )
    .await
    {
        Ok(h) => h,
        Err(_) => {
            crate::http::serve(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                handle.clone(),
                "demo".into(),
                obs_stopped.clone(),
            )
            .await?
        }
    };
    let sys = tokio::spawn(crate::sys::run(
        broker.publisher(),
        handle.clone(),
        Duration::from_secs(5),
        obs_stopped.clone(),
    ));

    println!(
        "Waystation demo: {} simulated sensors x {} events/s for {:.0} s",
        args.sensors, args.rate, args.duration
    );
    println!(
        "  edge broker   mqtt://{edge}   (store in {})",
        data.path().display()
    );
    println!("  cloud broker  mqtt://{cloud}   (rumqttd, in-process; reached through a relay the demo can cut)");
    println!(
        "  dashboard     http://{}/   (also /metrics, /healthz, /api/v1/status)",
        http.0
    );
    if link_sim.is_some() {
        println!(
            "  uplink        simulated: {} ms each way{}",
            args.uplink_latency,
            if args.flaky {
                format!(", a reset or a zombie connection every 4-9 s (seed {seed})")
            } else {
                String::new()
            }
        );
    }
    if outage.is_zero() {
        println!("  no cloud outage (--outage 0)");
    } else {
        println!("  the cloud goes away at {:.0} s for {:.0} s: watch the backlog grow on disk and drain", outage_at.as_secs_f64(), outage.as_secs_f64());
    }
    println!();

    // The sensors, on their own thread (the firmware's blocking, single-threaded driver).
    let stop = Arc::new(AtomicBool::new(false));
    let sim_options = SimOptions {
        broker: edge.to_string(),
        sensors: args.sensors,
        rate_hz: args.rate,
        id_prefix: "sensor-".into(),
        duration: Some(duration),
        drain_timeout: Duration::from_secs(30),
        boot: None,
        keep_alive_s: 30,
        response_timeout_ms: 3_000,
        backoff_max_ms: 2_000,
        progress: None,
    };
    let sim_stop = stop.clone();
    let sim = std::thread::spawn(move || waystation_firmware::sim::run(&sim_options, &sim_stop));

    // Live progress while the sensors run; the outage on its schedule; Ctrl-C stops early.
    let started = Instant::now();
    let mut progress = Progress::new(tty);
    let mut outage_state = if outage.is_zero() {
        OutageState::Done
    } else {
        OutageState::Before
    };
    let mut peak_backlog = 0u64;
    let mut drained_after: Option<Duration> = None;
    let mut outage_lasted: Option<Duration> = None;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut interrupted = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !sim.is_finished() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                stop.store(true, Ordering::SeqCst);
                progress.note("Ctrl-C: stopping the sensors, then draining and checking");
            }
        }
        let t = started.elapsed();
        match outage_state {
            OutageState::Before if t >= outage_at && !stop.load(Ordering::SeqCst) => {
                cloud_down.send_replace(true);
                progress.note(&format!("{:>5.1}s  CLOUD OUTAGE: the uplink is cut for {:.0} s; events keep being acknowledged and wait on disk", t.as_secs_f64(), outage.as_secs_f64()));
                outage_state = OutageState::During(Instant::now());
            }
            OutageState::During(since)
                if since.elapsed() >= outage || stop.load(Ordering::SeqCst) =>
            {
                cloud_down.send_replace(false);
                outage_lasted = Some(since.elapsed());
                progress.note(&format!(
                    "{:>5.1}s  cloud is back: the bridge reconnects and drains the backlog",
                    t.as_secs_f64()
                ));
                outage_state = OutageState::After(Instant::now());
            }
            _ => {}
        }
        let snap = Snap::take(&handle, &cloud_log);
        if matches!(outage_state, OutageState::During(_)) {
            peak_backlog = peak_backlog.max(snap.waiting);
        }
        if let OutageState::After(since) = outage_state {
            if drained_after.is_none() && snap.waiting < peak_backlog / 20 + 10 {
                drained_after = Some(since.elapsed());
            }
        }
        progress.line(&snap.line(t, args.sensors, *cloud_down.borrow()));
    }
    if let OutageState::During(since) = outage_state {
        outage_lasted = Some(since.elapsed());
        outage_state = OutageState::After(Instant::now());
        progress.note(&format!(
            "{:>5.1}s  cloud is back (the sensors are done): the bridge drains the backlog",
            started.elapsed().as_secs_f64()
        ));
    }
    cloud_down.send_replace(false);
    let report: SimReport = match sim.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => anyhow::bail!("sensors: {e}"),
        Err(_) => anyhow::bail!("the sensor thread panicked"),
    };

    // Drain: wait until the cloud has every produced event (or the log stays non-empty).
    let want: HashSet<(String, u64, u64)> = report
        .devices
        .iter()
        .flat_map(|d| (0..u64::from(d.created)).map(move |s| (d.id.clone(), u64::from(d.boot), s)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snap = Snap::take(&handle, &cloud_log);
        if let (OutageState::After(since), None) = (&outage_state, drained_after) {
            if snap.waiting < peak_backlog / 20 + 10 {
                drained_after = Some(since.elapsed());
            }
        }
        progress.line(&snap.line(started.elapsed(), args.sensors, false));
        let complete = want.iter().all(|k| {
            cloud_log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unique
                .contains(k)
        });
        if (complete && snap.waiting == 0) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Let late duplicates (resends after the outage) arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snap = Snap::take(&handle, &cloud_log);
    progress.finish(&snap.line(started.elapsed(), args.sensors, false));

    let _ = obs_stop.send(true);
    let _ = sys.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), http.1).await;
    let status = handle.status();
    broker.shutdown().await;

    // The self-check.
    let log = cloud_log.lock().unwrap_or_else(|p| p.into_inner());
    let received_wanted = want.iter().filter(|k| log.unique.contains(*k)).count() as u64;
    let lost = want.len() as u64 - received_wanted;
    let unexpected = log.unique.len() as u64 - received_wanted;
    let duplicates = log.total - log.unique.len() as u64 - log.unparsable;
    let produced = report.created;
    let forwarded: u64 = status.bridges.iter().map(|b| b.forwarded).sum();
    let reconnects: u64 = status.bridges.iter().map(|b| b.reconnects).sum();
    let ok = lost == 0
        && unexpected == 0
        && log.unparsable == 0
        && report.pending == 0
        && report.dropped == 0
        && produced > 0;

    println!();
    println!("Summary ({:.1} s)", started.elapsed().as_secs_f64());
    println!(
        "  sensors                     {} (the firmware's device state machine, {} events/s each)",
        args.sensors, args.rate
    );
    println!("  events produced             {produced}");
    println!(
        "  acknowledged by the edge    {} (PUBACK only after the event is on disk)",
        report.acknowledged
    );
    println!(
        "  forwarded to the cloud      {forwarded} (PUBACKs from the cloud, resends included)"
    );
    println!(
        "  received by the cloud       {} unique, {} in all",
        log.unique.len(),
        log.total
    );
    println!("  duplicates                  {duplicates} (at-least-once: resent after the outage cut them in flight)");
    match outage_lasted {
        Some(lasted) => {
            let drained = drained_after.map_or("not measured".to_string(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            });
            println!(
                "  cloud outage                {:.1} s, backlog peaked at {peak_backlog} events on disk, drained in {drained}, bridge reconnects {reconnects}",
                lasted.as_secs_f64()
            );
        }
        None if outage.is_zero() => println!("  cloud outage                none (--outage 0)"),
        None => println!("  cloud outage                none (stopped before it began)"),
    }
    if let Some((sim, _)) = &link_sim {
        let st = sim.handle().stats();
        let mut reasons: Vec<String> = status
            .bridges
            .iter()
            .flat_map(|b| b.failures.iter().map(|(k, v)| format!("{k} {v}")))
            .collect();
        reasons.sort();
        println!(
            "  simulated uplink            {} resets and {} zombie connections survived; bridge failures by reason: {}; {:.0} bytes up per forwarded event",
            st.resets,
            st.zombies,
            if reasons.is_empty() { "none".to_string() } else { reasons.join(", ") },
            st.bytes_up as f64 / forwarded.max(1) as f64
        );
    }
    println!(
        "  sensor resends / drops      {} / {}",
        report.resent, report.dropped
    );
    println!("  lost                        {lost}");
    if ok {
        println!("  self-check                  PASS: produced = received by the cloud ({produced}), none lost, {duplicates} duplicates");
    } else {
        println!(
            "  self-check                  FAIL: {lost} lost, {unexpected} unexpected, {} unparsable, {} still pending and {} dropped on the sensors",
            log.unparsable, report.pending, report.dropped
        );
        let mut missing: Vec<_> = want
            .iter()
            .filter(|k| !log.unique.contains(*k))
            .take(10)
            .collect();
        missing.sort();
        if !missing.is_empty() {
            println!("  first missing (device, boot, seq): {missing:?}");
        }
    }
    Ok(ok)
}

enum OutageState {
    Before,
    During(Instant),
    After(Instant),
    Done,
}

/// One status reading for the progress line.
struct Snap {
    received: u64,
    persisted: u64,
    forwarded: u64,
    waiting: u64,
    connected: bool,
    cloud_unique: usize,
    sensors_up: usize,
}

impl Snap {
    fn take(handle: &StatusHandle, cloud: &Mutex<CloudLog>) -> Snap {
        let s = handle.status();
        let st = handle.stats();
        let forwarded: u64 = s.bridges.iter().map(|b| b.forwarded).sum();
        let last_seq = s.log.as_ref().and_then(|l| l.last_seq).unwrap_or(0);
        // What the bridge has not forwarded yet (the log may also hold forwarded entries
        // whose deletion is batched).
        let log_len = s.log.as_ref().map_or(0, |l| l.len);
        let waiting = s
            .bridges
            .iter()
            .map(|b| last_seq.saturating_sub(b.cursor))
            .max()
            .unwrap_or(0)
            .min(log_len);
        let received = st.messages_received[1].load(Ordering::Relaxed);
        Snap {
            received,

            // Events written to the log: its newest seq (one per event; the log empties as it
            // drains, so the highest seen), and at least what was forwarded plus what waits.
            persisted: PERSISTED
                .fetch_max(last_seq, Ordering::Relaxed)
                .max(last_seq)
                .max((forwarded + waiting).min(received)),
            forwarded,
            waiting,
            connected: s.bridges.iter().all(|b| b.connected),
            cloud_unique: cloud.lock().unwrap_or_else(|p| p.into_inner()).unique.len(),
            sensors_up: s
                .router
                .clients
                .iter()
                .filter(|c| c.client_id.starts_with("sensor-"))
                .count(),
        }
    }

    fn line(&self, t: Duration, sensors: usize, cut: bool) -> String {
        // Events per second over the last ~2 s (the line is drawn every 250 ms).
        let rate = {
            let mut r = RATE.lock().unwrap_or_else(|p| p.into_inner());
            r.push_back((Instant::now(), self.received));
            while r.len() > 8 {
                r.pop_front();
            }
            let (t0, n0) = r[0];
            let dt = t0.elapsed().as_secs_f64();
            if dt > 0.1 {
                self.received.saturating_sub(n0) as f64 / dt
            } else {
                0.0
            }
        };
        format!(
            "{:>5.1}s  sensors {}/{}  {:>5.0}/s  acknowledged {:>6}  on disk {:>6}  forwarded {:>6}  waiting {:>5}  cloud {}  cloud has {:>6}",
            t.as_secs_f64(),
            self.sensors_up,
            sensors,
            rate,
            self.received,
            self.persisted,
            self.forwarded,
            self.waiting,
            if cut { "DOWN" } else if self.connected { "up  " } else { "reconnecting" },
            self.cloud_unique,
        )
    }
}

static PERSISTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Recent (time, acknowledged) readings, for the rate on the progress line.
static RATE: Mutex<VecDeque<(Instant, u64)>> = Mutex::new(VecDeque::new());

/// The live line: rewritten in place on a terminal, one line a second otherwise.
struct Progress {
    tty: bool,
    last_print: Option<Instant>,
}

impl Progress {
    fn new(tty: bool) -> Progress {
        Progress {
            tty,
            last_print: None,
        }
    }

    fn line(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\r\x1b[K{text}");
            let _ = out.flush();
        } else if self
            .last_print
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_print = Some(Instant::now());
            let _ = writeln!(out, "{text}");
        }
    }

    /// A line that stays (above the live line).
    fn note(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\r\x1b[K");
        }
        let _ = writeln!(out, "{text}");
    }

    fn finish(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = writeln!(out, "\r\x1b[K{text}");
        } else {
            let _ = writeln!(out, "{text}");
        }
    }
}

/// rumqttd on a free loopback port, in its own threads (they live until the process exits).
async fn start_cloud() -> anyhow::Result<SocketAddr> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server = rumqttd::ServerSettings {
        name: "cloud".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            // Large enough that the subscriber never falls off the end of a segment.
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some([("1".to_string(), server)].into_iter().collect()),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("cloud".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cloud broker (rumqttd) did not start on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(addr)
}

/// Subscribes to the forwarded events on the cloud (directly, not through the relay) and
/// records each; returns once the subscription is acknowledged.
async fn start_cloud_subscriber(
    cloud: SocketAddr,
    log: Arc<Mutex<CloudLog>>,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(
        "demo-cloud-subscriber",
        cloud.ip().to_string(),
        cloud.port(),
    );
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client
        .subscribe(format!("{REMOTE_PREFIX}sensors/+/events"), QoS::AtLeastOnce)
        .await?;
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client; // keeps the request channel open
        let mut subscribed = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let key = serde_json::from_slice::<serde_json::Value>(&p.payload)
                        .ok()
                        .and_then(|v| {
                            Some((
                                v["device"].as_str()?.to_string(),
                                v["boot"].as_u64()?,
                                v["seq"].as_u64()?,
                            ))
                        });
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.total += 1;
                    match key {
                        Some(k) => {
                            log.unique.insert(k);
                        }
                        None => log.unparsable += 1,
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cloud subscriber: connection error; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .map_err(|_| anyhow::anyhow!("the cloud subscriber was not subscribed within 10 s"))??;
    Ok(())
}

/// A TCP relay to `target`. While the returned flag is true, every relayed connection is
/// closed and new ones are accepted and closed at once: the cloud is unreachable.
/// A different fault schedule each run (printed, so a run can be replayed).
fn fault_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

async fn start_relay(target: SocketAddr) -> anyhow::Result<(SocketAddr, Arc<watch::Sender<bool>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (down_tx, down_rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            if *down_rx.borrow() {
                drop(inbound);
                continue;
            }
            let mut down = down_rx.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = down.wait_for(|d| *d) => {}
                }
            });
        }
    });
    Ok((addr, Arc::new(down_tx)))
}
