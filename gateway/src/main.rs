//! `waystation`: the edge gateway daemon. This file is the binary's edge: the command line,
//! logging, signals, and turning a config file into a running broker. The work itself is
//! done by the `waystation-broker` library.

mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info};

use config::Config;

/// Exit code for a config that cannot be used (as in `check-config`), as sysexits' EX_USAGE
/// is not what systemd units expect: 2 is "invalid argument" for them too.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "waystation", version, about = "MQTT edge gateway: keeps sensor events on disk and forwards them upstream")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM.
    Run {
        /// The TOML config file (see config/waystation.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 when it is usable, 2 with the reason when not.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: OK", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("waystation")
        .build()?;
    runtime.block_on(async move {
        let broker_config = waystation_broker::BrokerConfig {
            gateway_id: config.gateway.id.clone(),
            listeners: config.listeners.iter().map(|l| l.bind).collect(),
            limits: config.limits.to_limits(),
            data_dir: Some(config.gateway.data_dir.clone()),
            storage: config.storage.to_limits(),
            bridges: config.bridges.clone(),
        };
        let broker = waystation_broker::Broker::start(broker_config).await?;
        for addr in broker.local_addrs() {
            info!("listening on {addr}");
        }
        info!(gateway = %config.gateway.id, "waystation started");
        shutdown_signal().await?;
        info!("shutting down");
        broker.shutdown().await;
        info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
