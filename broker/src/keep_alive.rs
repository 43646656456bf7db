//! When a connection's client was last heard from, and so when its keep-alive runs out
//! (1.5x the client's value [MQTT-3.1.2-24]), in 8 bytes of the outbox the connection shares
//! with the router: the reader notes each read, and the router's housekeeping looks at every
//! quiet connection's cell and wakes the ones whose time is up. A quiet connection keeps no
//! timer of its own (tokio's is 112 B in every idle client's task; issue 14: what an idle
//! client costs), the way Mosquitto's one loop checks every client's keep-alive in turn.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// How long a quiet connection with nothing buffered keeps its read buffer before giving it
/// back (a client sending every few hundred ms keeps it; an idle one holds none).
pub const BUFFER_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// The client's keep-alive and its last read, as milliseconds since a process-wide origin,
/// wrapping: a `u32` of milliseconds spans 49 days, and the longest keep-alive
/// (65,535 s x 1.5) is 27 hours, so the time since the last read is exact for as long as it
/// can matter.
pub struct KeepAlive {
    /// 1.5x the client's keep-alive, ms (0: none). Set once, at CONNECT.
    limit_ms: AtomicU32,
    heard_ms: AtomicU32,
    /// What the connection is doing, for the router's sweep: [`SERVING`], [`QUIET`] or
    /// [`QUIET_WITH_BUFFER`].
    phase: AtomicU8,
}

const SERVING: u8 = 0;
const QUIET: u8 = 1;
const QUIET_WITH_BUFFER: u8 = 2;

/// Milliseconds since the first call, wrapping at 2^32. Time as tokio sees it, so that a
/// test with paused time moves it too.
pub fn now_ms() -> u32 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // Truncation is the wrap: only differences of these values are used.
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u32
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive::new(0)
    }
}

impl KeepAlive {
    /// A client whose CONNECT asked for `keep_alive_secs` (0: no keep-alive), heard now.
    pub fn new(keep_alive_secs: u16) -> KeepAlive {
        KeepAlive {
            limit_ms: AtomicU32::new(u32::from(keep_alive_secs) * 1500),
            heard_ms: AtomicU32::new(now_ms()),
            phase: AtomicU8::new(SERVING),
        }
    }

    /// The CONNECT's keep-alive, once it is known.
    pub fn start(&self, keep_alive_secs: u16) {
        self.limit_ms
            .store(u32::from(keep_alive_secs) * 1500, Ordering::Relaxed);
        self.heard();
    }

    /// Bytes came in: the keep-alive starts again.
    pub fn heard(&self) {
        self.heard_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn silent_ms(&self, now_ms: u32) -> u32 {
        now_ms.wrapping_sub(self.heard_ms.load(Ordering::Relaxed))
    }

    /// How long since bytes last came in.
    pub fn silent_for(&self) -> Duration {
        Duration::from_millis(u64::from(self.silent_ms(now_ms())))
    }

    fn limit(&self) -> Option<Duration> {
        let limit_ms = self.limit_ms.load(Ordering::Relaxed);
        (limit_ms != 0).then(|| Duration::from_millis(u64::from(limit_ms)))
    }

    /// When the keep-alive runs out if nothing comes in before (a year away without one).
    pub fn deadline(&self) -> Instant {
        let left = match self.limit() {
            Some(limit) => limit.saturating_sub(self.silent_for()),
            None => Duration::from_secs(86400 * 365),
        };
        Instant::now() + left
    }

    pub fn expired(&self) -> bool {
        self.limit().is_some_and(|limit| self.silent_for() >= limit)
    }

    /// The connection goes quiet (`holding_buffer`: with a read buffer to give back after
    /// [`BUFFER_RELEASE_AFTER`]) or serves again: only a quiet one is woken by
    /// [`KeepAlive::due`] (a serving reader has its own timer).
    pub fn set_quiet(&self, quiet: bool, holding_buffer: bool) {
        let phase = match (quiet, holding_buffer) {
            (false, _) => SERVING,
            (true, false) => QUIET,
            (true, true) => QUIET_WITH_BUFFER,
        };
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// For the router's sweep at `now_ms` ([`now_ms`]): whether the quiet connection is to
    /// be woken, its keep-alive out or its read buffer due back.
    pub fn due(&self, now_ms: u32) -> bool {
        let phase = self.phase.load(Ordering::Relaxed);
        if phase == SERVING {
            return false;
        }
        let silent = self.silent_ms(now_ms);
        let limit_ms = self.limit_ms.load(Ordering::Relaxed);
        (limit_ms != 0 && silent >= limit_ms)
            || (phase == QUIET_WITH_BUFFER
                && u128::from(silent) >= BUFFER_RELEASE_AFTER.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_out_one_and_a_half_keep_alives_after_the_last_read() {
        let keep_alive = KeepAlive::new(1);
        assert!(!keep_alive.expired());
        let left = keep_alive.deadline() - Instant::now();
        assert!(left > Duration::from_millis(1400) && left <= Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_millis(1550)).await;
        assert!(keep_alive.expired());
        keep_alive.heard();
        assert!(!keep_alive.expired());
        assert!(keep_alive.silent_for() < Duration::from_millis(100));
    }

    #[test]
    fn no_keep_alive_never_runs_out() {
        let keep_alive = KeepAlive::new(0);
        assert!(!keep_alive.expired());
        assert!(keep_alive.deadline() > Instant::now() + Duration::from_secs(86400 * 300));
        keep_alive.set_quiet(true, false);
        assert!(!keep_alive.due(now_ms().wrapping_add(86_400_000)));
    }

    #[test]
    fn the_longest_keep_alive_fits_the_wrap() {
        // 1.5x 65,535 s in ms, well inside u32 (the span the wrapping difference is exact in).
        assert!(u64::from(u16::MAX) * 1500 < u64::from(u32::MAX) / 2);
    }

    #[test]
    fn only_a_quiet_connection_is_due_and_only_when_its_time_is_up() {
        let keep_alive = KeepAlive::new(10);
        let now = now_ms();
        let later = |ms: u32| now.wrapping_add(ms);
        // Serving: the reader's own timer looks after it.
        assert!(!keep_alive.due(later(20_000)));
        keep_alive.set_quiet(true, false);
        assert!(!keep_alive.due(later(14_000)));
        assert!(keep_alive.due(later(15_100)));
        // Holding a read buffer: due a second after the last read, to give it back.
        keep_alive.set_quiet(true, true);
        assert!(!keep_alive.due(later(500)));
        assert!(keep_alive.due(later(1_100)));
        keep_alive.set_quiet(false, true);
        assert!(!keep_alive.due(later(15_100)));
    }
}
