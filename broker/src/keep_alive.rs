//! When a connection's client was last heard from, and so when its keep-alive runs out
//! (1.5x the client's value [MQTT-3.1.2-24]), in 8 bytes: every connection keeps this for
//! as long as it lives, and an `Instant` alone is 16 (issue 14: what an idle client costs).

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The client's keep-alive and its last read, as milliseconds since a process-wide origin,
/// wrapping: a `u32` of milliseconds spans 49 days, and the longest keep-alive
/// (65,535 s x 1.5) is 27 hours, so the time since the last read is exact for as long as it
/// can matter.
#[derive(Clone, Copy)]
pub(super) struct KeepAlive {
    /// 1.5x the client's keep-alive, ms (0: none).
    limit_ms: u32,
    heard_ms: u32,
}

/// Milliseconds since the first call, wrapping at 2^32.
fn now_ms() -> u32 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // Truncation is the wrap: only differences of these values are used.
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u32
}

impl KeepAlive {
    /// A client whose CONNECT asked for `keep_alive_secs` (0: no keep-alive), heard now.
    pub(super) fn new(keep_alive_secs: u16) -> KeepAlive {
        KeepAlive {
            limit_ms: u32::from(keep_alive_secs) * 1500,
            heard_ms: now_ms(),
        }
    }

    /// Bytes came in: the keep-alive starts again.
    pub(super) fn heard(&mut self) {
        self.heard_ms = now_ms();
    }

    /// How long since bytes last came in.
    pub(super) fn silent_for(&self) -> Duration {
        Duration::from_millis(u64::from(now_ms().wrapping_sub(self.heard_ms)))
    }

    fn limit(&self) -> Option<Duration> {
        (self.limit_ms != 0).then(|| Duration::from_millis(u64::from(self.limit_ms)))
    }

    /// When the keep-alive runs out if nothing comes in before (a year away without one).
    pub(super) fn deadline(&self) -> Instant {
        let left = match self.limit() {
            Some(limit) => limit.saturating_sub(self.silent_for()),
            None => Duration::from_secs(86400 * 365),
        };
        Instant::now() + left
    }

    pub(super) fn expired(&self) -> bool {
        self.limit().is_some_and(|limit| self.silent_for() >= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_out_one_and_a_half_keep_alives_after_the_last_read() {
        let mut keep_alive = KeepAlive::new(1);
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
    }

    #[test]
    fn the_longest_keep_alive_fits_the_wrap() {
        // 1.5x 65,535 s in ms, well inside u32 (the span the wrapping difference is exact in).
        assert!(u64::from(u16::MAX) * 1500 < u64::from(u32::MAX) / 2);
    }
}
