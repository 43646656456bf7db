//! `waystation`: the edge gateway daemon. This file is the binary's edge: the command line,
//! logging, signals, and turning a config file into a running broker. The work itself is
//! done by the `waystation-broker` library.

mod config;
#[cfg(feature = "demo")]
mod demo;
mod dlq;
mod http;
mod malloc;
mod metrics;
mod passwd;
mod rlimit;
mod status;
mod sys;
mod time;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use config::Config;
use waystation_broker::config::pipeline::unreachable_rules;

/// What `check-config` and the daemon say of a `[[pipeline]]` rule no bridge forwards to.
fn unreachable_rule_warning(topics: &str) -> String {
    format!("[[pipeline]] topics = {topics:?}: no [[bridge.forward]] `local` filter reaches these topics, and the pipeline runs only on what a bridge forwards: this rule does nothing")
}

/// Exit code for a config that cannot be used (as in `check-config`), as sysexits' EX_USAGE
/// is not what systemd units expect: 2 is "invalid argument" for them too.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "waystation",
    version,
    about = "MQTT edge gateway: keeps sensor events on disk and forwards them upstream"
)]
struct Cli {
    /// Log line format on stderr: "text" for people, "json" (one object per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM.
    Run {
        /// The TOML config file (see config/waystation.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file (and the password and ACL files it names) and exit: 0 when
    /// it is usable, 2 with the reason when not.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Add or change a user in a password file (Mosquitto 2 format, PBKDF2-SHA512), or
    /// remove one with --delete. The password is read from the terminal without echo, or
    /// from the first line of stdin when stdin is not a terminal; never from the command line.
    Passwd {
        /// The password file; replaced atomically. Created mode 0600, or 0640 with the
        /// directory's group when that is another group (e.g. /etc/waystation, group
        /// waystation); an existing file keeps its owner, group and mode.
        file: PathBuf,
        user: String,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
        /// PBKDF2 iterations for the new hash.
        #[arg(long, default_value_t = waystation_broker::auth::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
    /// The dead letters of the running gateway (messages its pipeline refused): list them,
    /// replay them through the pipeline after a fix, or purge them. Talks to the daemon's
    /// HTTP server, from the same machine.
    Dlq {
        /// The daemon's HTTP address ([http] bind); default: from --config, else 127.0.0.1:8080.
        #[arg(long)]
        http: Option<String>,
        /// The daemon's config file, to find its [http] bind.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: dlq::DlqAction,
    },
    /// Simulated sensors: N copies of the real firmware state machine publishing threshold
    /// events over TCP to a broker; prints what was published and acknowledged.
    #[cfg(feature = "demo")]
    Sim {
        /// MQTT broker as HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        /// Number of simulated sensors.
        #[arg(long, default_value_t = 4)]
        sensors: usize,
        /// Threshold events per second per sensor (readings are 5x as frequent; max 200).
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Device ids are <PREFIX><index, 4 digits>.
        #[arg(long, default_value = "sim-")]
        id_prefix: String,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        duration: Option<f64>,
    },
    /// The whole story in one process, no config needed: simulated sensors publish into the
    /// edge broker, which stores and forwards to an in-process cloud broker that goes away
    /// part-way; ends with a self-checked summary (exit 1 if anything was lost).
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    malloc::limit_arenas();
    let cli = Cli::parse();
    #[cfg(feature = "demo")]
    let quiet = matches!(cli.command, Command::Demo(_));
    #[cfg(not(feature = "demo"))]
    let quiet = false;
    init_logging(cli.log_format, quiet);
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::main(args),
        Command::Passwd {
            file,
            user,
            delete,
            iterations,
        } => passwd::main(&file, &user, delete, iterations),
        Command::Dlq {
            http,
            config,
            action,
        } => {
            let addr = match (http, config) {
                (Some(addr), _) => addr,
                (None, Some(path)) => match Config::load(&path) {
                    Ok(c) if c.http.bind.ip().is_unspecified() => {
                        format!("127.0.0.1:{}", c.http.bind.port())
                    }
                    Ok(c) => c.http.bind.to_string(),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_BAD_CONFIG);
                    }
                },
                (None, None) => "127.0.0.1:8080".into(),
            };
            match dlq::main(&addr, action) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => {
            match Config::load(&config).and_then(|c| c.security(&config).map(|_| c)) {
                Ok(c) => {
                    for topics in unreachable_rules(&c.pipeline, &c.bridges) {
                        eprintln!("warning: {}", unreachable_rule_warning(topics));
                    }
                    println!("{}: OK", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
            }
        }
        #[cfg(feature = "demo")]
        Command::Sim {
            broker,
            sensors,
            rate,
            id_prefix,
            duration,
        } => run_sim(broker, sensors, rate, id_prefix, duration),
        Command::Run { config } => {
            let (config, security) =
                match Config::load(&config).and_then(|c| c.security(&config).map(|s| (c, s))) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_BAD_CONFIG);
                    }
                };
            if let Err(e) = writable_dir(&config.gateway.data_dir) {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            match run(config, security) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `waystation sim`: blocks until `--duration` or Ctrl-C, then lets the outboxes drain.
/// Exit 0 when every event was acknowledged, 1 when some were left pending, 2 on bad options.
#[cfg(feature = "demo")]
fn run_sim(
    broker: String,
    sensors: usize,
    rate: f64,
    id_prefix: String,
    duration: Option<f64>,
) -> ExitCode {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = stop.clone();
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_signal.store(true, Ordering::SeqCst);
            }
        });
    });
    let options = waystation_firmware::sim::SimOptions {
        broker,
        sensors,
        rate_hz: rate,
        id_prefix,
        duration: duration
            .filter(|d| d.is_finite() && *d > 0.0)
            .map(std::time::Duration::from_secs_f64),
        ..Default::default()
    };
    match waystation_firmware::sim::run(&options, &stop) {
        Ok(report) => {
            println!("{report}");
            if report.pending > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// `quiet`: the default level is `error` (the demo draws its own progress on the terminal,
/// and its outage makes the bridge warn on purpose).
fn init_logging(format: LogFormat, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    // rumqttd (the demo's cloud) logs every probe and cut connection as an error.
    let default = if quiet { "error,rumqttd=off" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One JSON object per line: timestamp, level, target, the event's fields (client,
        // topic, bridge... as the broker names them) flattened next to "message".
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// `gateway.data_dir` must be writable by the daemon's user: a permission or read-only error
/// will not go away by restarting, so it is a config error (exit 2), named with its usual cause.
/// Other errors are left to the store, which reports them itself.
fn writable_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::io::ErrorKind;
    let probe = dir.join(format!(".waystation-write-test-{}", std::process::id()));
    let result = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .map(drop)
    });
    let _ = std::fs::remove_file(&probe);
    match result {
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => {
            Err(format!(
                "gateway.data_dir {}: {e}: the daemon's user must be able to write it (under the systemd unit, ProtectSystem=strict makes a data_dir outside /var/lib/waystation read-only unless ReadWritePaths= names it: see docs/raspberry-pi.md)",
                dir.display()
            ))
        }
        _ => Ok(()),
    }
}

fn run(
    config: Config,
    (security, anonymous): (waystation_broker::Security, config::AnonymousPolicy),
) -> anyhow::Result<()> {
    rlimit::raise_nofile(config.limits.max_connections as u64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("waystation")
        .build()?;
    runtime.block_on(async move {
        // Signal handlers first: a SIGTERM that arrives as soon as the daemon says it is
        // listening must shut it down cleanly, not kill it with the default action.
        let mut signals = Signals::install()?;
        let broker_config = waystation_broker::BrokerConfig {
            gateway_id: config.gateway.id.clone(),
            listeners: config.listeners.clone(),
            limits: config.limits.clone(),
            data_dir: Some(config.gateway.data_dir.clone()),
            storage: config.storage.clone(),
            bridges: config.bridges.clone(),
            pipeline: config.pipeline.clone(),
            dead_letter: config.dead_letter.clone(),
            security,
        };
        for topics in unreachable_rules(&broker_config.pipeline, &broker_config.bridges) {
            warn!("{}", unreachable_rule_warning(topics));
        }
        for addr in &anonymous.exposed {
            warn!(listener = %addr, "allow_anonymous = true on a non-loopback listener: anyone who can reach it may connect");
        }
        info!(
            anonymous = anonymous.allowed,
            users = broker_config.security.passwords.as_ref().map_or(0, |p| p.len()),
            acl = broker_config.security.acl.is_some(),
            "security policy"
        );
        let broker = waystation_broker::Broker::start(broker_config).await?;
        for addr in broker.local_addrs() {
            info!("listening on {addr}");
        }
        // Stops the HTTP server and $SYS before the broker, so neither sees it half gone.
        let obs_stop = waystation_broker::Shutdown::new();
        let mut http_task = None;
        if config.http.enabled {
            // The dashboard is not the gateway's job: if its port is taken, say so and go on
            // storing and forwarding.
            match http::serve(config.http.bind, broker.status_handle(), config.gateway.id.clone(), broker.dead_letters(), obs_stop.clone()).await {
                Ok((addr, task)) => {
                    info!("dashboard, /metrics, /healthz, /api/v1/dead-letters and /api/v1/status at http://{addr}/");
                    http_task = Some(task);
                }
                Err(e) => error!(bind = %config.http.bind, error = %e, "cannot start the HTTP server ([http] bind): running without it"),
            }
        }
        let sys_task = (config.gateway.sys_interval > 0).then(|| {
            let interval = std::time::Duration::from_secs(config.gateway.sys_interval);
            tokio::spawn(sys::run(broker.publisher(), broker.status_handle(), interval, obs_stop.clone()))
        });
        info!(gateway = %config.gateway.id, "waystation started");
        let stop = signals.wait_for_shutdown(&broker).await;
        info!("shutting down");
        obs_stop.signal();
        for task in [http_task, sys_task].into_iter().flatten() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
        }
        match stop {
            Stop::Signal => {
                broker.shutdown().await;
                info!("stopped");
                Ok(())
            }
            Stop::StoreFailed(reason) => {
                // Bounded: the writer is gone, and nothing must keep a daemon that no longer
                // acknowledges anything from exiting.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), broker.shutdown()).await;
                Err(anyhow::anyhow!(
                    "the store can no longer make anything durable ({reason}); exiting so that the service manager restarts the daemon (nothing unacknowledged was lost: publishers resend)"
                ))
            }
        }
    })
}

/// Waits for SIGTERM or SIGINT; on SIGHUP reloads the TLS listeners' certificates.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Also returns when the store's writer is dead (`Durability::fatal`): a daemon that
    /// can no longer acknowledge anything must not look alive.
    async fn wait_for_shutdown(&mut self, broker: &waystation_broker::Broker) -> Stop {
        let mut durability = broker.store().map(|s| s.durability());
        loop {
            // Every branch is cancel-safe: signal streams and a watch receiver.
            tokio::select! {
                _ = self.term.recv() => return Stop::Signal,
                _ = self.int.recv() => return Stop::Signal,
                _ = self.hup.recv() => reload_certificates(broker),
                reason = store_failed(&mut durability) => {
                    error!(%reason, "the store's writer is dead: stopping");
                    return Stop::StoreFailed(reason);
                }
            }
        }
    }
}

/// Why the daemon stops.
enum Stop {
    Signal,
    StoreFailed(String),
}

/// Resolves once the store reports a fatal failure; never without a store.
async fn store_failed(
    durability: &mut Option<tokio::sync::watch::Receiver<waystation_broker::store::Durability>>,
) -> String {
    if let Some(rx) = durability {
        if let Ok(d) = rx.wait_for(|d| d.fatal.is_some()).await {
            return d.fatal.clone().unwrap_or_default();
        }
        // The store was dropped: shutdown is under way elsewhere.
        *durability = None;
    }
    std::future::pending().await
}

/// SIGHUP: new TLS connections use the certificate files as they are now; open ones keep
/// theirs. A listener whose files do not load keeps the ones it has.
fn reload_certificates(broker: &waystation_broker::Broker) {
    let results = broker.reload_tls();
    if results.is_empty() {
        info!("SIGHUP: no TLS listener, nothing to reload");
    }
    for (listener, result) in results {
        match result {
            Ok(()) => info!(%listener, "SIGHUP: TLS certificates reloaded"),
            Err(e) => {
                error!(%listener, error = %e, "SIGHUP: TLS certificates not reloaded: keeping the ones in use")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waystation_broker::store::Durability;

    // A dead store writer must stop the daemon (non-zero exit, for systemd to restart it):
    // `store_failed` is what `wait_for_shutdown` selects on. Commit errors that clear again
    // (a full disk) must not.
    #[tokio::test]
    async fn a_fatal_store_failure_ends_the_wait_and_a_passing_error_does_not() {
        let (tx, rx) = tokio::sync::watch::channel(Durability::default());
        let mut durability = Some(rx);
        let waiter = tokio::spawn(async move { store_failed(&mut durability).await });
        tx.send_modify(|d| d.error = Some("disk full".into()));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "a commit error alone is not fatal");
        tx.send_modify(|d| d.fatal = Some("the store writer thread panicked".into()));
        let reason = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("resolves once fatal is set")
            .expect("task");
        assert!(reason.contains("panicked"), "{reason}");
    }
}
