//! `linksim`: the link simulator as a process, for the benchmark script. It prints one line
//! `linksim listening on ADDR` once bound, runs until SIGINT or SIGTERM, then prints one line
//! of counters. Both lines are parsed by scripts: keep their format.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use waystation_linksim::{Chaos, Fault, LinkConfig, LinkSim};

/// A TCP proxy that makes a loopback connection behave like a WAN link.
#[derive(Parser, Debug)]
#[command(name = "linksim")]
struct Args {
    /// Address to accept clients on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to forward each connection, as HOST:PORT.
    #[arg(long)]
    target: String,
    /// One-way latency in both directions.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Client → server latency (overrides --latency-ms).
    #[arg(long)]
    up_latency_ms: Option<u64>,
    /// Server → client latency (overrides --latency-ms).
    #[arg(long)]
    down_latency_ms: Option<u64>,
    /// Each chunk's delay varies by up to ± this much (order is kept).
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Bandwidth cap per direction, in bytes per second.
    #[arg(long)]
    bandwidth: Option<u64>,
    /// Reset or zombie every connection at random intervals of MIN_S-MAX_S seconds, e.g. 4-9.
    #[arg(long, value_parser = parse_flaky)]
    flaky: Option<FlakyRange>,
    /// Seed for jitter and the flaky schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Extra delay before a close is passed on.
    #[arg(long, default_value_t = 0)]
    slow_close_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct FlakyRange {
    min: Duration,
    max: Duration,
}

fn parse_flaky(text: &str) -> Result<FlakyRange, String> {
    let seconds = |part: &str| {
        part.trim()
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| format!("`{part}` is not a number of seconds"))
    };
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("expected MIN_S-MAX_S, got `{text}`"))?;
    let (min, max) = (seconds(min)?, seconds(max)?);
    if min > max || max.is_zero() {
        return Err(format!("`{text}`: need 0 <= MIN <= MAX and MAX > 0"));
    }
    Ok(FlakyRange { min, max })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let latency = Duration::from_millis(args.latency_ms);
    let config = LinkConfig {
        listen: args.listen,
        target: args.target.clone(),
        up_latency: args.up_latency_ms.map_or(latency, Duration::from_millis),
        down_latency: args.down_latency_ms.map_or(latency, Duration::from_millis),
        jitter: Duration::from_millis(args.jitter_ms),
        bandwidth: args.bandwidth,
        seed: args.seed,
        slow_close: Duration::from_millis(args.slow_close_ms),
        ..LinkConfig::default()
    };
    let sim = match LinkSim::start(config) {
        Ok(sim) => sim,
        Err(error) => {
            eprintln!("linksim: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let handle = sim.handle();
    let _chaos = args.flaky.map(|range| {
        handle.start_chaos(Chaos {
            seed: args.seed,
            min_interval: range.min,
            max_interval: range.max,
            kinds: vec![Fault::Reset, Fault::Zombie],
        })
    });
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "linksim listening on {}", sim.local_addr());
    let _ = stdout.flush();

    if let Err(error) = wait_for_stop_signal().await {
        eprintln!("linksim: cannot watch for signals: {error}");
        return ExitCode::FAILURE;
    }
    drop(sim);
    let stats = handle.stats();
    let _ = writeln!(
        stdout,
        "linksim stats: accepted={} bytes_up={} bytes_down={} resets={} zombies={}",
        stats.accepted, stats.bytes_up, stats.bytes_down, stats.resets, stats.zombies
    );
    let _ = stdout.flush();
    ExitCode::SUCCESS
}

async fn wait_for_stop_signal() -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // Cancel-safe: signal streams lose no signal when a `recv` is dropped.
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flaky_ranges_parse() {
        let range = parse_flaky("4-9").expect("valid");
        assert_eq!(
            (range.min, range.max),
            (Duration::from_secs(4), Duration::from_secs(9))
        );
        let range = parse_flaky("0.5-2").expect("valid");
        assert_eq!(range.min, Duration::from_millis(500));
        assert!(parse_flaky("9-4").is_err());
        assert!(parse_flaky("4").is_err());
        assert!(parse_flaky("a-b").is_err());
    }
}
