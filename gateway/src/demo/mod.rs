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
//!
//! Layout: mod.rs runs the story in order; args.rs is the command line, cloud.rs the cloud
//! and its relay, uplink.rs the simulated WAN link, edge.rs the gateway itself, sensors.rs
//! the simulated devices, live.rs the live line, outage and drain, report.rs the banner and
//! the self-checked summary.

mod args;
mod cloud;
mod edge;
mod live;
mod report;
mod sensors;
mod uplink;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use args::DemoArgs;
use cloud::CloudLog;
use edge::Edge;
use live::{Live, Outage, Progress};

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

async fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let outage = Duration::from_secs_f64(args.outage.unwrap_or(args.duration / 4.0).max(0.0));
    let duration = Duration::from_secs_f64(args.duration);
    let outage_at = duration.mul_f64(0.3);
    let tty = std::io::stdout().is_terminal();
    let data = tempfile::Builder::new()
        .prefix("waystation-demo-")
        .tempdir()?;

    // The cloud, its subscriber, and the relay the bridge reaches it through.
    let cloud = cloud::start_cloud().await?;
    let cloud_log = Arc::new(Mutex::new(CloudLog::default()));
    cloud::start_cloud_subscriber(cloud, cloud_log.clone()).await?;
    let (relay_addr, cloud_down) = cloud::start_relay(cloud).await?;
    // The simulated WAN link, when asked for: between the bridge and the relay.
    let seed = uplink::fault_seed();
    let (uplink, link_sim) = uplink::start(relay_addr, args.uplink_latency, args.flaky, seed)?;

    let edge = Edge::start(uplink, data.path(), args.http).await?;
    let addrs = report::Addrs {
        edge: edge.addr,
        data_dir: data.path(),
        cloud,
        http: edge.http_addr,
    };
    report::banner(&args, &addrs, link_sim.is_some(), seed, outage, outage_at);

    let stop = Arc::new(AtomicBool::new(false));
    let sim = sensors::start(edge.addr, args.sensors, args.rate, duration, stop.clone());

    // Live progress while the sensors run; the outage on its schedule; Ctrl-C stops early.
    let mut outage = Outage::new(outage_at, outage);
    let mut live = Live {
        handle: &edge.handle,
        cloud_log: &cloud_log,
        cloud_down: &cloud_down,
        sensors: args.sensors,
        started: Instant::now(),
        progress: Progress::new(tty),
    };
    live.while_sensors_run(|| sim.is_finished(), &stop, &mut outage)
        .await;
    let report = match sim.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => anyhow::bail!("sensors: {e}"),
        Err(_) => anyhow::bail!("the sensor thread panicked"),
    };

    // Drain: wait until the cloud has every produced event (or the log stays non-empty).
    let want = sensors::produced(&report);
    live.drain(&want, &mut outage).await;
    let started = live.started;

    let status = edge.stop().await;

    let log = cloud_log.lock().unwrap_or_else(|p| p.into_inner());
    Ok(report::summary(&report::Ending {
        args: &args,
        started,
        report: &report,
        want: &want,
        log: &log,
        status: &status,
        outage: &outage,
        uplink: link_sim.as_ref(),
    }))
}
