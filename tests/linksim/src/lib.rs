//! Waystation's link simulator: a user-space TCP proxy that makes a loopback connection behave
//! like the WAN links our users have (site Wi-Fi, DSL, cellular): one-way latency and jitter, a
//! bandwidth cap, slow closes and, on command, resets, zombie connections and partitions. This
//! kernel has no netem, so the bridge is tested through this instead.
//!
//! A [`LinkSim`] runs on its own thread with its own current-thread tokio runtime, so plain
//! synchronous tests, async code (the daemon's demo) and the `linksim` binary (the benchmark
//! script) start it the same way. Dropping it stops everything. The library never prints
//! (tests parse stdout); faults are recorded in [`LinkHandle::faults`] instead. Everything
//! random comes from one seeded generator, so a run can be replayed from its seed.

mod chaos;
mod pump;
mod rng;

pub use chaos::{Chaos, ChaosGuard, ChaosSchedule};

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

/// How long shutting down may wait for the runtime's blocking pool (DNS look-ups of the target).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// How the link behaves. Latencies are one-way; the bandwidth cap applies to each direction
/// separately, shared by all connections (it is one link).
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Where clients connect (default 127.0.0.1:0, see [`LinkSim::local_addr`]).
    pub listen: SocketAddr,
    /// Where each client connection is forwarded to, as `host:port`.
    pub target: String,
    /// Client → server delay.
    pub up_latency: Duration,
    /// Server → client delay.
    pub down_latency: Duration,
    /// Each chunk's delay varies by up to ± this much (it never overtakes earlier chunks).
    pub jitter: Duration,
    /// Bytes per second in each direction, or no cap.
    pub bandwidth: Option<u64>,
    /// Seeds the jitter draws.
    pub seed: u64,
    /// Extra delay before a close (FIN) is passed on, as on links where closes linger.
    pub slow_close: Duration,
    /// How long a zombie connection's sockets are kept before they are quietly dropped.
    pub zombie_hold: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            target: String::new(),
            up_latency: Duration::ZERO,
            down_latency: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth: None,
            seed: 1,
            slow_close: Duration::ZERO,
            zombie_hold: Duration::from_secs(120),
        }
    }
}

impl LinkConfig {
    /// A perfect link to `target` (`host:port`); set the other fields to make it worse.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            ..Self::default()
        }
    }
}

/// Counters since the simulator started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Connections still being proxied (held, live or closing; not reset, not zombie).
    pub open: u64,
    /// Bytes delivered to the server.
    pub bytes_up: u64,
    /// Bytes delivered to the client.
    pub bytes_down: u64,
    /// Connections aborted by a reset fault.
    pub resets: u64,
    /// Connections turned into zombies.
    pub zombies: u64,
}

/// A fault applied to every current connection (a partition also holds new ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Abort both ways with a TCP RST; queued data is lost.
    Reset,
    /// Go silent both ways without closing anything, like a peer that vanished.
    Zombie,
    /// Deliver nothing for this long, then carry on where the link stopped.
    Partition(Duration),
}

/// Which way bytes flow: up is client → server, down is server → client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Up,
    Down,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// A connection's fate, watched by its tasks. It only ever leaves `Normal` once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Normal,
    Reset,
    Zombie,
}

/// A running simulator. Dropping it closes the listener and every connection and joins its
/// thread (bounded: nothing in it blocks).
pub struct LinkSim {
    local_addr: SocketAddr,
    handle: LinkHandle,
    /// Dropping this tells the accept loop to stop.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LinkSim {
    /// Binds `config.listen` and starts proxying on a thread of its own. Callable from sync
    /// code and from inside a tokio runtime alike.
    pub fn start(config: LinkConfig) -> io::Result<LinkSim> {
        let listener = std::net::TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(&config));
        let (stop, stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("linksim".into())
            .spawn(move || run_thread(listener, thread_shared, stopped, ready_tx))?;
        // The runtime is built on its own thread so it is also dropped there: dropping a runtime
        // inside an async context panics, and callers may well be inside one.
        let runtime = match ready_rx.recv() {
            Ok(Ok(runtime)) => runtime,
            Ok(Err(error)) => {
                let _ = thread.join();
                return Err(error);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(io::Error::other(
                    "link simulator thread exited while starting",
                ));
            }
        };
        Ok(LinkSim {
            local_addr,
            handle: LinkHandle { shared, runtime },
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address clients should connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to inject faults and read counters from any thread.
    pub fn handle(&self) -> LinkHandle {
        self.handle.clone()
    }
}

impl Drop for LinkSim {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_thread(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    stopped: oneshot::Receiver<()>,
    ready: mpsc::Sender<io::Result<tokio::runtime::Handle>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if ready.send(Ok(runtime.handle().clone())).is_err() {
        return;
    }
    runtime.block_on(accept_loop(listener, Arc::clone(&shared), stopped));
    // Drops every connection task and with it every socket, zombies included.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    lock(&shared.connections).clear();
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        // Cancel-safe: `accept` and a oneshot receiver lose nothing when dropped and re-polled.
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                let (id, mode) = shared.register();
                tokio::spawn(pump::run_connection(client, id, Arc::clone(&shared), mode));
            }
            Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
        }
    }
}

/// Controls a running simulator from any thread; it stays usable (and harmless) after the
/// simulator is dropped.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl LinkHandle {
    /// Aborts every current connection both ways with a TCP RST. Zombies stay zombies: the
    /// link already lost them.
    pub fn reset_all(&self) {
        self.shared.apply(Fault::Reset);
    }

    /// Makes every current connection go silent both ways without closing it.
    pub fn zombie_all(&self) {
        self.shared.apply(Fault::Zombie);
    }

    /// Delivers nothing for `duration`; new connections wait for the end to reach the target.
    pub fn partition(&self, duration: Duration) {
        self.shared.apply(Fault::Partition(duration));
    }

    /// Changes the one-way latencies for chunks read from now on.
    pub fn set_latency(&self, up: Duration, down: Duration) {
        *lock(&self.shared.latency) = [up, down];
    }

    pub fn stats(&self) -> LinkStats {
        let shared = &self.shared;
        let open = lock(&shared.connections)
            .values()
            .filter(|mode| *mode.borrow() == Mode::Normal)
            .count();
        LinkStats {
            accepted: shared.accepted.load(Ordering::Relaxed),
            open: open as u64,
            bytes_up: shared.delivered[Direction::Up.index()].load(Ordering::Relaxed),
            bytes_down: shared.delivered[Direction::Down.index()].load(Ordering::Relaxed),
            resets: shared.resets.load(Ordering::Relaxed),
            zombies: shared.zombies.load(Ordering::Relaxed),
        }
    }

    /// Every fault applied so far (by hand or by chaos), with its time since the start.
    pub fn faults(&self) -> Vec<(Duration, Fault)> {
        lock(&self.shared.faults).clone()
    }

    /// Applies faults on `chaos`'s schedule until the guard is dropped or the simulator stops.
    pub fn start_chaos(&self, chaos: Chaos) -> ChaosGuard {
        let task = self
            .runtime
            .spawn(chaos::run(chaos, Arc::clone(&self.shared)));
        ChaosGuard::new(task.abort_handle())
    }
}

/// State shared by the handle, the accept loop and every connection task.
pub(crate) struct Shared {
    pub(crate) target: String,
    pub(crate) jitter: Duration,
    pub(crate) bandwidth: Option<u64>,
    pub(crate) slow_close: Duration,
    pub(crate) zombie_hold: Duration,
    started: Instant,
    /// One-way latencies, indexed by [`Direction::index`].
    latency: Mutex<[Duration; 2]>,
    rng: Mutex<rng::Rng>,
    partition_until: Mutex<Option<Instant>>,
    /// Per direction, when the link is next free to send (the bandwidth pacer).
    link_free_at: [Mutex<Instant>; 2],
    /// Each live connection's fate, by connection id.
    connections: Mutex<HashMap<u64, watch::Sender<Mode>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    delivered: [AtomicU64; 2],
    resets: AtomicU64,
    zombies: AtomicU64,
    faults: Mutex<Vec<(Duration, Fault)>>,
}

impl Shared {
    fn new(config: &LinkConfig) -> Self {
        let now = Instant::now();
        Self {
            target: config.target.clone(),
            jitter: config.jitter,
            // A zero cap would stall the link for ever; treat it as no cap.
            bandwidth: config.bandwidth.filter(|rate| *rate > 0),
            slow_close: config.slow_close,
            zombie_hold: config.zombie_hold,
            started: now,
            latency: Mutex::new([config.up_latency, config.down_latency]),
            rng: Mutex::new(rng::Rng::new(config.seed)),
            partition_until: Mutex::new(None),
            link_free_at: [Mutex::new(now), Mutex::new(now)],
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            delivered: [AtomicU64::new(0), AtomicU64::new(0)],
            resets: AtomicU64::new(0),
            zombies: AtomicU64::new(0),
            faults: Mutex::new(Vec::new()),
        }
    }

    fn register(&self) -> (u64, watch::Receiver<Mode>) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (mode, watched) = watch::channel(Mode::Normal);
        lock(&self.connections).insert(id, mode);
        (id, watched)
    }

    pub(crate) fn unregister(&self, id: u64) {
        lock(&self.connections).remove(&id);
    }

    pub(crate) fn apply(&self, fault: Fault) {
        lock(&self.faults).push((self.started.elapsed(), fault));
        let (mode, counter) = match fault {
            Fault::Reset => (Mode::Reset, &self.resets),
            Fault::Zombie => (Mode::Zombie, &self.zombies),
            Fault::Partition(duration) => {
                let end = Instant::now() + duration;
                let mut until = lock(&self.partition_until);
                // Overlapping partitions end when the last one does.
                *until = Some(until.map_or(end, |current| current.max(end)));
                return;
            }
        };
        for fate in lock(&self.connections).values() {
            // Reset or zombie connections are gone as far as the link is concerned.
            if *fate.borrow() == Mode::Normal {
                fate.send_replace(mode);
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// When the current partition ends, if one is on.
    pub(crate) fn partition_end(&self) -> Option<Instant> {
        let end = (*lock(&self.partition_until))?;
        (end > Instant::now()).then_some(end)
    }

    /// When a chunk read now should be delivered: after the latency and a jitter draw, but
    /// never before the chunk read before it (`previous`), so the byte order is kept.
    pub(crate) fn deliver_at(&self, direction: Direction, previous: Instant) -> Instant {
        let latency = lock(&self.latency)[direction.index()];
        let delay = rng::jittered(latency, self.jitter, &mut lock(&self.rng));
        previous.max(Instant::now() + delay)
    }

    /// Books `bytes` on the link at `rate` bytes/s and returns when they may start.
    pub(crate) fn book_bandwidth(&self, direction: Direction, bytes: usize, rate: u64) -> Instant {
        let mut free_at = lock(&self.link_free_at[direction.index()]);
        // Idle time earns no credit: a burst after a pause is paced like any other.
        let start = (*free_at).max(Instant::now());
        *free_at = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        start
    }

    pub(crate) fn count_delivered(&self, direction: Direction, bytes: usize) {
        self.delivered[direction.index()].fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Locks a mutex even if a holder panicked: the data here (counters, times) stays valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
