//! Simulated sensors on the host (feature `std`): N devices, each the real [`Device`] state
//! machine of this crate with a [`Waveform`] sensor, each over its own non-blocking
//! `std::net::TcpStream` to an MQTT broker, all driven from one thread. Used by
//! `waystation sim`, the demo and the end-to-end tests.
//!
//! Each sensor's triangle wave has a period of 10 readings and crosses its own rising and
//! falling thresholds once per period, so it produces 2 events per period: `rate_hz` events per
//! second per sensor means one reading every `1000 / (5 * rate_hz)` ms (at most 200 events/s).

use crate::client::{ClientConfig, Transport};
use crate::detector::Thresholds;
use crate::device::{Device, DeviceConfig};
use crate::sensor::{Shape, Waveform};
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Outbox capacity of a simulated device: a few minutes of events at 1 event/s.
pub const SIM_OUTBOX: usize = 256;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// `HOST:PORT` of the MQTT broker.
    pub broker: String,
    pub sensors: usize,
    /// Events per second per sensor (threshold crossings; readings are 5x as frequent).
    pub rate_hz: f64,
    /// Device ids are `<id_prefix><index>` with the index zero-padded to 4 digits.
    pub id_prefix: String,
    /// Stop after this long (None: until `stop` is set).
    pub duration: Option<Duration>,
    /// After stopping, how long to keep running the clients so the outboxes drain.
    pub drain_timeout: Duration,
    /// Boot counter for all devices; None uses the Unix time in seconds (grows per run).
    pub boot: Option<u32>,
    pub keep_alive_s: u16,
    pub response_timeout_ms: u32,
    pub backoff_max_ms: u32,
    /// Print a progress line this often (None: silent).
    pub progress: Option<Duration>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            broker: "127.0.0.1:1883".into(),
            sensors: 4,
            rate_hz: 1.0,
            id_prefix: "sim-".into(),
            duration: None,
            drain_timeout: Duration::from_secs(10),
            boot: None,
            keep_alive_s: 30,
            response_timeout_ms: 3_000,
            backoff_max_ms: 2_000,
            progress: Some(Duration::from_secs(1)),
        }
    }
}

/// Per-device results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    pub id: String,
    pub boot: u32,
    /// Events created (their seqs are 0..created).
    pub created: u32,
    pub published: u32,
    pub acknowledged: u32,
    pub resent: u32,
    pub dropped: u32,
    /// Still unacknowledged at the end.
    pub pending: u32,
    pub connects: u32,
}

/// Totals of a run.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub created: u64,
    /// Events sent at least once.
    pub published: u64,
    /// Events the broker acknowledged (PUBACK).
    pub acknowledged: u64,
    pub resent: u64,
    pub dropped: u64,
    pub pending: u64,
    pub connects: u64,
    pub link_losses: u64,
    pub elapsed: Duration,
    pub devices: Vec<DeviceReport>,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sensors {} | events created {} published {} acknowledged {} resent {} dropped {} pending {} | connects {} link losses {} | {:.1}s",
            self.devices.len(),
            self.created,
            self.published,
            self.acknowledged,
            self.resent,
            self.dropped,
            self.pending,
            self.connects,
            self.link_losses,
            self.elapsed.as_secs_f64()
        )
    }
}

/// An I/O error of the TCP transport, as an `embedded_io` error.
#[derive(Debug)]
pub struct TcpError(pub std::io::ErrorKind);

impl std::fmt::Display for TcpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tcp: {}", self.0)
    }
}
impl std::error::Error for TcpError {}
impl embedded_io::Error for TcpError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self.0 {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                embedded_io::ErrorKind::TimedOut
            }
            k => k.into(),
        }
    }
}

/// A reconnecting, non-blocking TCP stream: reads never block (`read_ready` peeks), writes
/// wait up to `write_timeout` for the socket to take the bytes.
pub struct TcpTransport {
    addr: String,
    stream: Option<TcpStream>,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
}

impl TcpTransport {
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            stream: None,
            connect_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_secs(2),
        }
    }
    fn stream(&mut self) -> Result<&mut TcpStream, TcpError> {
        self.stream
            .as_mut()
            .ok_or(TcpError(std::io::ErrorKind::NotConnected))
    }
}

impl embedded_io::ErrorType for TcpTransport {
    type Error = TcpError;
}

impl embedded_io::ReadReady for TcpTransport {
    fn read_ready(&mut self) -> Result<bool, TcpError> {
        let s = self.stream()?;
        let mut b = [0u8; 1];
        match s.peek(&mut b) {
            Ok(_) => Ok(true), // data, or 0 = end of stream, which read() reports
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(TcpError(e.kind())),
        }
    }
}

impl embedded_io::Read for TcpTransport {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, TcpError> {
        self.stream()?.read(buf).map_err(|e| TcpError(e.kind()))
    }
}

impl embedded_io::Write for TcpTransport {
    fn write(&mut self, buf: &[u8]) -> Result<usize, TcpError> {
        let deadline = Instant::now() + self.write_timeout;
        let s = self.stream()?;
        loop {
            match s.write(buf) {
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(TcpError(std::io::ErrorKind::TimedOut));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(TcpError(e.kind())),
            }
        }
    }
    fn flush(&mut self) -> Result<(), TcpError> {
        Ok(())
    }
}

impl Transport for TcpTransport {
    fn open(&mut self) -> Result<(), TcpError> {
        self.stream = None;
        let addrs = self
            .addr
            .to_socket_addrs()
            .map_err(|e| TcpError(e.kind()))?;
        let mut last = TcpError(std::io::ErrorKind::AddrNotAvailable);
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.connect_timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    s.set_nonblocking(true).map_err(|e| TcpError(e.kind()))?;
                    self.stream = Some(s);
                    return Ok(());
                }
                Err(e) => last = TcpError(e.kind()),
            }
        }
        Err(last)
    }
    fn close(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The simulated device type.
pub type SimDevice = Device<Waveform, TcpTransport, SIM_OUTBOX>;

/// Waveform and thresholds of sensor `i`: each sensor gets its own range and thresholds.
pub fn sensor_profile(i: usize) -> (Waveform, Thresholds) {
    let i32i = (i % 1000) as i32;
    let min = 15_000 + 37 * i32i; // milli-°C
    let max = 35_000 + 53 * i32i;
    let span = max - min;
    let wave = Waveform::new(Shape::Triangle, min, max, 10, (i % 10) as u32);
    let t = Thresholds {
        rising: min + span * 7 / 10,
        falling: min + span * 3 / 10,
        debounce: 1,
        min_interval_ms: 0,
        heartbeat_ms: 0,
    };
    (wave, t)
}

/// Builds device `i` of a simulation.
pub fn build_device(opts: &SimOptions, i: usize, boot: u32) -> Result<SimDevice, String> {
    let id = format!("{}{:04}", opts.id_prefix, i);
    let (wave, thresholds) = sensor_profile(i);
    let sample_period_ms = (1000.0 / (5.0 * opts.rate_hz.max(0.001))).round().max(1.0) as u32;
    let cfg = DeviceConfig {
        id: &id,
        boot,
        sensor_name: "temp",
        sample_period_ms,
        thresholds,
        client: ClientConfig {
            keep_alive_s: opts.keep_alive_s,
            response_timeout_ms: opts.response_timeout_ms,
            backoff_min_ms: 100,
            backoff_max_ms: opts.backoff_max_ms,
        },
    };
    Device::new(wave, TcpTransport::new(&opts.broker), &cfg)
        .map_err(|e| format!("device {id}: {e:?}"))
}

fn report(devices: &[SimDevice], boot: u32, elapsed: Duration) -> SimReport {
    let mut r = SimReport {
        elapsed,
        ..Default::default()
    };
    for d in devices {
        let s = d.client().stats();
        let dr = DeviceReport {
            id: d.client().device_id().to_string(),
            boot,
            created: d.events_created(),
            published: s.published,
            acknowledged: s.acknowledged,
            resent: s.resent,
            dropped: s.dropped,
            pending: d.client().outbox_len() as u32,
            connects: s.connects,
        };
        r.created += dr.created as u64;
        r.published += dr.published as u64;
        r.acknowledged += dr.acknowledged as u64;
        r.resent += dr.resent as u64;
        r.dropped += dr.dropped as u64;
        r.pending += dr.pending as u64;
        r.connects += dr.connects as u64;
        r.link_losses += s.link_losses as u64;
        r.devices.push(dr);
    }
    r
}

/// Runs the simulation until `duration` passes or `stop` is set, then stops sampling and lets
/// the outboxes drain for up to `drain_timeout`, disconnects cleanly, and reports.
pub fn run(opts: &SimOptions, stop: &AtomicBool) -> Result<SimReport, String> {
    if opts.sensors == 0 {
        return Err("need at least one sensor".into());
    }
    if !(opts.rate_hz > 0.0 && opts.rate_hz <= 200.0) {
        return Err("rate must be in (0, 200] events/s per sensor".into());
    }
    let boot = opts.boot.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1)
    });
    let mut devices = (0..opts.sensors)
        .map(|i| build_device(opts, i, boot))
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u32;
    let mut last_progress = Instant::now();
    let mut draining: Option<Instant> = None;
    loop {
        let now = now_ms();
        for d in devices.iter_mut() {
            d.poll(now);
        }
        let time_up = opts.duration.is_some_and(|t| start.elapsed() >= t);
        if draining.is_none() && (time_up || stop.load(Ordering::Relaxed)) {
            for d in devices.iter_mut() {
                d.set_sampling(false);
            }
            draining = Some(Instant::now());
        }
        if let Some(since) = draining {
            let empty = devices.iter().all(|d| d.client().outbox_len() == 0);
            if empty || since.elapsed() >= opts.drain_timeout {
                break;
            }
        }
        if let Some(every) = opts.progress {
            if last_progress.elapsed() >= every {
                last_progress = Instant::now();
                let up = devices.iter().filter(|d| d.client().is_connected()).count();
                println!(
                    "sim: connected {up}/{} | {}",
                    devices.len(),
                    report(&devices, boot, start.elapsed())
                );
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let now = now_ms();
    for d in devices.iter_mut() {
        d.client_mut().disconnect(now);
    }
    let r = report(&devices, boot, start.elapsed());
    if opts.progress.is_some() {
        println!("sim: done | {r}");
    }
    Ok(r)
}
