//! `wsbench`: the load tool behind Waystation's benchmarks (docs/BENCHMARKS.md,
//! scripts/bench.sh). It speaks MQTT 3.1.1 to any broker (publishers optionally MQTT 5), so
//! the same load is put on Waystation, Mosquitto and rumqttd; `wsbench rumqttd` runs rumqttd
//! 0.20 in-process as a peer.

mod event;
mod idle;
mod load;
mod proto;
mod report;

use std::net::SocketAddr;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "wsbench",
    about = "MQTT 3.1.1/5 load tool: throughput, latency, loss, duplicates and broker memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N publishers and M subscribers: throughput, latency p50/p99/p99.9, lost, duplicated, RSS.
    Run(load::RunArgs),
    /// One subscriber that (re)connects until it has --expect messages (backlog drains).
    Sub(load::SubArgs),
    /// Many idle connected clients: broker RSS per connection.
    Idle(idle::IdleArgs),
    /// Writes a result record of given values (for figures measured by the script).
    Record(report::RecordArgs),
    /// Prints a markdown table for one scenario: median, min-max, ratio to the baseline.
    Table(report::TableArgs),
    /// Runs rumqttd 0.20 in this process until killed.
    Rumqttd {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Also an MQTT 5 listener on this port (rumqttd serves v5 on listeners of its own;
        /// its v4 listener refuses a v5 CONNECT).
        #[arg(long)]
        v5_port: Option<u16>,
        /// Room for this many connections (idle-connection runs need more than the default).
        #[arg(long, default_value_t = 20_010)]
        max_connections: usize,
    },
    /// Prints VmRSS and VmHWM (KiB) of a process.
    Mem {
        #[arg(long)]
        pid: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            let out = a.labels.out.clone();
            let rec = runtime()?.block_on(load::run(a))?;
            rec.emit(out.as_deref())
        }
        Command::Sub(a) => {
            let out = a.labels.out.clone();
            let rec = runtime()?.block_on(load::sub(a))?;
            rec.emit(out.as_deref())
        }
        Command::Idle(a) => {
            let out = a.labels.out.clone();
            let rec = runtime()?.block_on(idle::idle(a))?;
            rec.emit(out.as_deref())
        }
        Command::Record(a) => report::record(a),
        Command::Table(a) => report::table(a),
        Command::Rumqttd {
            port,
            host,
            v5_port: None,
            max_connections,
        } => run_rumqttd(SocketAddr::new(host, port), max_connections),
        Command::Rumqttd {
            port,
            host,
            v5_port: Some(v5),
            max_connections,
        } => run_rumqttd_v4_v5(
            SocketAddr::new(host, port),
            SocketAddr::new(host, v5),
            max_connections,
        ),
        Command::Mem { pid } => {
            let (rss, hwm) =
                load::proc_mem(pid).ok_or_else(|| anyhow::anyhow!("no /proc/{pid}/status"))?;
            println!("{rss} {hwm}");
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// rumqttd as configured in its own rumqttd.toml (v4 listener, 100 in flight, 100 MiB x 10
/// segments), with room for `max_connections` and no delay between accepts.
fn run_rumqttd(listen: SocketAddr, max_connections: usize) -> Result<()> {
    let cloud = waystation_cloud::Cloud::start(waystation_cloud::CloudOptions {
        listen: Some(listen),
        max_connections,
        max_segment_size: 100 * 1024 * 1024,
        next_connection_delay_ms: 0,
        ..Default::default()
    })?;
    eprintln!("rumqttd listening on {listen}");
    cloud.wait()?;
    Ok(())
}

/// rumqttd as in [`run_rumqttd`] (tests/cloud's settings), with an MQTT 5 listener on `v5`
/// beside the v4 one on `v4`: one router, so a v4 subscriber gets what v5 clients publish.
fn run_rumqttd_v4_v5(v4: SocketAddr, v5: SocketAddr, max_connections: usize) -> Result<()> {
    let server = |name: &str, listen| rumqttd::ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
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
            max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(
            [("1".to_string(), server("cloud", v4))]
                .into_iter()
                .collect(),
        ),
        v5: Some(
            [("1".to_string(), server("cloud-v5", v5))]
                .into_iter()
                .collect(),
        ),
        ..Default::default()
    };
    eprintln!("rumqttd listening on {v4} (MQTT 3.1.1) and {v5} (MQTT 5)");
    rumqttd::Broker::new(config)
        .start()
        .map_err(|e| anyhow::anyhow!("rumqttd: {e:?}"))
}
