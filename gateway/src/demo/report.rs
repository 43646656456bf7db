//! What the demo prints: the banner that says what is running where, and the closing
//! summary with its self-check (produced = received by the cloud, none lost).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use waystation_broker::status::BrokerStatus;
use waystation_firmware::sim::SimReport;

use super::args::DemoArgs;
use super::cloud::CloudLog;
use super::live::Outage;
use super::uplink::Uplink;

/// Where each part listens.
pub struct Addrs<'a> {
    pub edge: SocketAddr,
    pub data_dir: &'a Path,
    pub cloud: SocketAddr,
    pub http: SocketAddr,
}

pub fn banner(
    args: &DemoArgs,
    at: &Addrs,
    simulated_uplink: bool,
    seed: u64,
    outage: Duration,
    outage_at: Duration,
) {
    println!(
        "Waystation demo: {} simulated sensors x {} events/s for {:.0} s",
        args.sensors, args.rate, args.duration
    );
    println!(
        "  edge broker   mqtt://{}   (store in {})",
        at.edge,
        at.data_dir.display()
    );
    println!("  cloud broker  mqtt://{}   (rumqttd, in-process; reached through a relay the demo can cut)", at.cloud);
    println!(
        "  dashboard     http://{}/   (also /metrics, /healthz, /api/v1/status)",
        at.http
    );
    if simulated_uplink {
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
}

/// Everything the summary is computed from.
pub struct Ending<'a> {
    pub args: &'a DemoArgs,
    pub started: Instant,
    pub report: &'a SimReport,
    pub want: &'a std::collections::HashSet<(String, u64, u64)>,
    pub log: &'a CloudLog,
    pub status: &'a BrokerStatus,
    pub outage: &'a Outage,
    pub uplink: Option<&'a Uplink>,
}

/// The counts the self-check and the summary need.
struct Tally {
    lost: u64,
    unexpected: u64,
    duplicates: u64,
    produced: u64,
    forwarded: u64,
    reconnects: u64,
    ok: bool,
}

fn tally(end: &Ending) -> Tally {
    let (log, report, status) = (end.log, end.report, end.status);
    let received_wanted = end.want.iter().filter(|k| log.unique.contains(*k)).count() as u64;
    let lost = end.want.len() as u64 - received_wanted;
    let unexpected = log.unique.len() as u64 - received_wanted;
    let duplicates = log.total - log.unique.len() as u64 - log.unparsable;
    let produced = report.created;
    let ok = lost == 0
        && unexpected == 0
        && log.unparsable == 0
        && report.pending == 0
        && report.dropped == 0
        && produced > 0;
    Tally {
        lost,
        unexpected,
        duplicates,
        produced,
        forwarded: status.bridges.iter().map(|b| b.forwarded).sum(),
        reconnects: status.bridges.iter().map(|b| b.reconnects).sum(),
        ok,
    }
}

/// Prints the summary; true when the self-check passes.
pub fn summary(end: &Ending) -> bool {
    let t = tally(end);
    let (args, log, report) = (end.args, end.log, end.report);
    let Tally {
        produced,
        forwarded,
        duplicates,
        ..
    } = t;
    println!();
    println!("Summary ({:.1} s)", end.started.elapsed().as_secs_f64());
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
    print_outage(end.outage, t.reconnects);
    if let Some((sim, _)) = end.uplink {
        print_uplink(sim, end.status, forwarded);
    }
    println!(
        "  sensor resends / drops      {} / {}",
        report.resent, report.dropped
    );
    print_check(end, &t);
    t.ok
}

fn print_outage(outage: &Outage, reconnects: u64) {
    match outage.lasted {
        Some(lasted) => {
            let drained = outage
                .drained_after
                .map_or("not measured".to_string(), |d| {
                    format!("{:.1} s", d.as_secs_f64())
                });
            println!(
                "  cloud outage                {:.1} s, backlog peaked at {} events on disk, drained in {drained}, bridge reconnects {reconnects}",
                lasted.as_secs_f64(),
                outage.peak_backlog
            );
        }
        None if outage.length.is_zero() => {
            println!("  cloud outage                none (--outage 0)")
        }
        None => println!("  cloud outage                none (stopped before it began)"),
    }
}

fn print_uplink(sim: &waystation_linksim::LinkSim, status: &BrokerStatus, forwarded: u64) {
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

fn print_check(end: &Ending, t: &Tally) {
    let (log, report) = (end.log, end.report);
    let lost = t.lost;
    println!("  lost                        {lost}");
    if t.ok {
        println!("  self-check                  PASS: produced = received by the cloud ({}), none lost, {} duplicates", t.produced, t.duplicates);
    } else {
        println!(
            "  self-check                  FAIL: {lost} lost, {} unexpected, {} unparsable, {} still pending and {} dropped on the sensors",
            t.unexpected, log.unparsable, report.pending, report.dropped
        );
        let mut missing: Vec<_> = end
            .want
            .iter()
            .filter(|k| !log.unique.contains(*k))
            .take(10)
            .collect();
        missing.sort();
        if !missing.is_empty() {
            println!("  first missing (device, boot, seq): {missing:?}");
        }
    }
}
