//! Chaos: faults at random intervals, drawn from a seeded generator so that a flaky run can be
//! replayed exactly. The schedule is a pure iterator ([`Chaos::schedule`]) so it can be
//! inspected and tested without a network.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;

use crate::rng::Rng;
use crate::{Fault, Shared};

/// Intervals shorter than this are raised to it, so a zero range cannot spin.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// A schedule of faults: after each interval drawn uniformly from `min_interval..=max_interval`,
/// one of `kinds` (drawn uniformly) hits every current connection.
#[derive(Debug, Clone)]
pub struct Chaos {
    pub seed: u64,
    pub min_interval: Duration,
    pub max_interval: Duration,
    pub kinds: Vec<Fault>,
}

impl Chaos {
    /// The faults this chaos applies, as offsets from its start. Endless unless `kinds` is empty.
    pub fn schedule(&self) -> ChaosSchedule {
        ChaosSchedule {
            rng: Rng::new(self.seed),
            elapsed: Duration::ZERO,
            min_interval: self.min_interval.max(MIN_INTERVAL),
            max_interval: self.max_interval.max(self.min_interval).max(MIN_INTERVAL),
            kinds: self.kinds.clone(),
        }
    }
}

/// Iterator over `(offset from start, fault)`, in time order.
#[derive(Debug, Clone)]
pub struct ChaosSchedule {
    rng: Rng,
    elapsed: Duration,
    min_interval: Duration,
    max_interval: Duration,
    kinds: Vec<Fault>,
}

impl Iterator for ChaosSchedule {
    type Item = (Duration, Fault);

    fn next(&mut self) -> Option<Self::Item> {
        if self.kinds.is_empty() {
            return None;
        }
        self.elapsed += self
            .rng
            .duration_between(self.min_interval, self.max_interval);
        // `below` is less than the length, so the index is in range.
        let pick = self.rng.below(self.kinds.len() as u64) as usize;
        Some((self.elapsed, self.kinds[pick]))
    }
}

/// Stops the chaos when dropped (it also stops with the simulator).
#[must_use = "the chaos stops as soon as its guard is dropped"]
#[derive(Debug)]
pub struct ChaosGuard {
    task: AbortHandle,
}

impl ChaosGuard {
    pub(crate) fn new(task: AbortHandle) -> Self {
        Self { task }
    }
}

impl Drop for ChaosGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn run(chaos: Chaos, shared: Arc<Shared>) {
    let start = tokio::time::Instant::now();
    for (offset, fault) in chaos.schedule() {
        // Aborting here is harmless: a fault is applied whole or not at all.
        tokio::time::sleep_until(start + offset).await;
        shared.apply(fault);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chaos(seed: u64) -> Chaos {
        Chaos {
            seed,
            min_interval: Duration::from_secs(4),
            max_interval: Duration::from_secs(9),
            kinds: vec![Fault::Reset, Fault::Zombie],
        }
    }

    #[test]
    fn same_seed_same_schedule() {
        let first: Vec<_> = chaos(5).schedule().take(50).collect();
        let again: Vec<_> = chaos(5).schedule().take(50).collect();
        let other: Vec<_> = chaos(6).schedule().take(50).collect();
        assert_eq!(first, again);
        assert_ne!(first, other);
    }

    #[test]
    fn intervals_stay_in_range_and_both_kinds_occur() {
        let schedule: Vec<_> = chaos(9).schedule().take(200).collect();
        let mut previous = Duration::ZERO;
        for (offset, _) in &schedule {
            let interval = *offset - previous;
            assert!(interval >= Duration::from_secs(4) && interval <= Duration::from_secs(9));
            previous = *offset;
        }
        let resets = schedule.iter().filter(|(_, f)| *f == Fault::Reset).count();
        assert!(resets > 50 && resets < 150, "{resets} resets of 200");
    }

    #[test]
    fn no_kinds_no_faults() {
        let mut none = chaos(1);
        none.kinds.clear();
        assert_eq!(none.schedule().next(), None);
    }
}
