//! What the demo shows while it runs: the live status line, the outage on its schedule, and
//! the wait for the backlog to drain once the sensors are done.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use waystation_broker::StatusHandle;

use super::cloud::CloudLog;

pub enum OutageState {
    Before,
    During(Instant),
    After(Instant),
    Done,
}

/// One status reading for the progress line.
pub struct Snap {
    received: u64,
    persisted: u64,
    forwarded: u64,
    waiting: u64,
    connected: bool,
    cloud_unique: usize,
    sensors_up: usize,
}

impl Snap {
    pub fn take(handle: &StatusHandle, cloud: &Mutex<CloudLog>) -> Snap {
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

    pub fn line(&self, t: Duration, sensors: usize, cut: bool) -> String {
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
pub struct Progress {
    tty: bool,
    last_print: Option<Instant>,
}

impl Progress {
    pub fn new(tty: bool) -> Progress {
        Progress {
            tty,
            last_print: None,
        }
    }

    pub fn line(&mut self, text: &str) {
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
    pub fn note(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\r\x1b[K");
        }
        let _ = writeln!(out, "{text}");
    }

    pub fn finish(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = writeln!(out, "\r\x1b[K{text}");
        } else {
            let _ = writeln!(out, "{text}");
        }
    }
}

/// The staged outage: when it starts, how long it lasts, and what it did to the backlog.
pub struct Outage {
    at: Duration,
    pub length: Duration,
    state: OutageState,
    pub peak_backlog: u64,
    pub drained_after: Option<Duration>,
    pub lasted: Option<Duration>,
}

impl Outage {
    /// An outage of `length` starting `at` into the run; none when `length` is zero.
    pub fn new(at: Duration, length: Duration) -> Outage {
        Outage {
            at,
            length,
            state: if length.is_zero() {
                OutageState::Done
            } else {
                OutageState::Before
            },
            peak_backlog: 0,
            drained_after: None,
            lasted: None,
        }
    }

    /// The backlog peaks during the outage; "drained" is when it is back to a twentieth of
    /// the peak (plus a few in flight), as a person watching the dashboard would call it.
    fn observe(&mut self, waiting: u64) {
        if matches!(self.state, OutageState::During(_)) {
            self.peak_backlog = self.peak_backlog.max(waiting);
        }
        if let OutageState::After(since) = self.state {
            if self.drained_after.is_none() && waiting < self.peak_backlog / 20 + 10 {
                self.drained_after = Some(since.elapsed());
            }
        }
    }
}

/// The running demo as the live line sees it.
pub struct Live<'a> {
    pub handle: &'a StatusHandle,
    pub cloud_log: &'a Mutex<CloudLog>,
    /// The relay's switch: true while the cloud is cut off.
    pub cloud_down: &'a watch::Sender<bool>,
    pub sensors: usize,
    pub started: Instant,
    pub progress: Progress,
}

impl Live<'_> {
    /// Until `sensors_done`: the live line every 250 ms, the outage on its schedule, and
    /// Ctrl-C, which sets `stop` so the sensors end early (and the outage with them).
    pub async fn while_sensors_run(
        &mut self,
        sensors_done: impl Fn() -> bool,
        stop: &AtomicBool,
        outage: &mut Outage,
    ) {
        let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
        let mut interrupted = false;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while !sensors_done() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut ctrl_c, if !interrupted => {
                    interrupted = true;
                    stop.store(true, Ordering::SeqCst);
                    self.progress.note("Ctrl-C: stopping the sensors, then draining and checking");
                }
            }
            let t = self.started.elapsed();
            self.step_outage(t, stop.load(Ordering::SeqCst), outage);
            let snap = Snap::take(self.handle, self.cloud_log);
            outage.observe(snap.waiting);
            self.progress
                .line(&snap.line(t, self.sensors, *self.cloud_down.borrow()));
        }
        if let OutageState::During(since) = outage.state {
            outage.lasted = Some(since.elapsed());
            outage.state = OutageState::After(Instant::now());
            self.progress.note(&format!(
                "{:>5.1}s  cloud is back (the sensors are done): the bridge drains the backlog",
                self.started.elapsed().as_secs_f64()
            ));
        }
        self.cloud_down.send_replace(false);
    }

    /// Cuts the cloud off at its time and brings it back after its length (or at once when
    /// the sensors are being stopped).
    fn step_outage(&mut self, t: Duration, stopping: bool, outage: &mut Outage) {
        match outage.state {
            OutageState::Before if t >= outage.at && !stopping => {
                self.cloud_down.send_replace(true);
                self.progress.note(&format!("{:>5.1}s  CLOUD OUTAGE: the uplink is cut for {:.0} s; events keep being acknowledged and wait on disk", t.as_secs_f64(), outage.length.as_secs_f64()));
                outage.state = OutageState::During(Instant::now());
            }
            OutageState::During(since) if since.elapsed() >= outage.length || stopping => {
                self.cloud_down.send_replace(false);
                outage.lasted = Some(since.elapsed());
                self.progress.note(&format!(
                    "{:>5.1}s  cloud is back: the bridge reconnects and drains the backlog",
                    t.as_secs_f64()
                ));
                outage.state = OutageState::After(Instant::now());
            }
            _ => {}
        }
    }

    /// Waits (at most 60 s) until the cloud has every event in `want` and nothing waits on
    /// disk, then a little longer for late duplicates (resends after the outage).
    pub async fn drain(&mut self, want: &HashSet<(String, u64, u64)>, outage: &mut Outage) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let snap = Snap::take(self.handle, self.cloud_log);
            outage.observe(snap.waiting);
            self.progress
                .line(&snap.line(self.started.elapsed(), self.sensors, false));
            let complete = want.iter().all(|k| {
                self.cloud_log
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
        let snap = Snap::take(self.handle, self.cloud_log);
        self.progress
            .finish(&snap.line(self.started.elapsed(), self.sensors, false));
    }
}
