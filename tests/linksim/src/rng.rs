//! The one source of randomness: a hand-written SplitMix64, so a run (jitter draws, chaos
//! schedule) is reproducible from its seed without pulling in a crate for a few lines.

use std::time::Duration;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast and good enough for test timing.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: u64,
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (0 when `bound` is 0). The modulo bias is negligible for the
    /// small bounds used here.
    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    /// A duration drawn uniformly from `min..=max` (nanosecond resolution).
    pub(crate) fn duration_between(&mut self, min: Duration, max: Duration) -> Duration {
        let span = nanos(max.saturating_sub(min));
        min + Duration::from_nanos(self.below(span.saturating_add(1)))
    }
}

/// One chunk's one-way delay: `latency` plus an offset drawn uniformly from `-jitter..=jitter`,
/// never below zero.
pub(crate) fn jittered(latency: Duration, jitter: Duration, rng: &mut Rng) -> Duration {
    if jitter.is_zero() {
        return latency;
    }
    let jitter = nanos(jitter);
    let offset = rng.below(jitter.saturating_mul(2).saturating_add(1));
    let delay = (nanos(latency) + offset).saturating_sub(jitter);
    Duration::from_nanos(delay)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_other_seed_other_numbers() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let mut rng = Rng::new(7);
        let latency = Duration::from_millis(100);
        let jitter = Duration::from_millis(20);
        let delays: Vec<_> = (0..1000)
            .map(|_| jittered(latency, jitter, &mut rng))
            .collect();
        assert!(delays
            .iter()
            .all(|d| *d >= latency - jitter && *d <= latency + jitter));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(90)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(110)));
    }

    #[test]
    fn jitter_larger_than_latency_never_goes_negative() {
        let mut rng = Rng::new(3);
        let delays: Vec<_> = (0..1000)
            .map(|_| {
                jittered(
                    Duration::from_millis(1),
                    Duration::from_millis(50),
                    &mut rng,
                )
            })
            .collect();
        assert!(delays.contains(&Duration::ZERO));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(51)));
    }

    #[test]
    fn durations_between_cover_the_range() {
        let mut rng = Rng::new(11);
        let (min, max) = (Duration::from_secs(4), Duration::from_secs(9));
        let draws: Vec<_> = (0..1000).map(|_| rng.duration_between(min, max)).collect();
        assert!(draws.iter().all(|d| *d >= min && *d <= max));
        assert!(draws.iter().any(|d| *d < Duration::from_secs(5)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(8)));
    }
}
