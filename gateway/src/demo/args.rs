//! `waystation demo`'s command line. Its own module so the demo's parts can read the
//! options without importing the orchestration in mod.rs.

use std::net::SocketAddr;

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
