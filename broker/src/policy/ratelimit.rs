//! Token buckets for the per-client limits: `max_publish_rate` (one bucket per
//! connection) and `max_connection_rate` (one bucket per source address, at accept).

use std::collections::HashMap;
use std::net::IpAddr;

use tokio::time::Instant;

/// Holds up to `capacity` tokens, refilled at `rate` per second; each event takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, capacity: u32, now: Instant) -> TokenBucket {
        let capacity = f64::from(capacity.max(1));
        TokenBucket {
            rate: f64::from(rate_per_sec),
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely (it can be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// Entries kept before full (idle) buckets are forgotten.
const PRUNE_ABOVE: usize = 4096;

/// `max_connection_rate`: one bucket per source address.
#[derive(Debug)]
pub struct ConnectionRate {
    rate: u32,
    burst: u32,
    buckets: HashMap<IpAddr, (TokenBucket, u64)>,
}

/// The verdict on one new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Refused; `first` is true for the first refusal since this address was last let in
    /// (log once per streak, count every one).
    No {
        first: bool,
    },
}

impl ConnectionRate {
    /// `rate` 0: every connection is admitted.
    pub fn new(rate: u32, burst: u32) -> ConnectionRate {
        ConnectionRate {
            rate,
            burst,
            buckets: HashMap::new(),
        }
    }

    pub fn admit(&mut self, addr: IpAddr, now: Instant) -> Admit {
        if self.rate == 0 {
            return Admit::Yes;
        }
        if self.buckets.len() >= PRUNE_ABOVE {
            self.buckets.retain(|_, (b, _)| !b.is_full(now));
        }
        let (rate, burst) = (self.rate, self.burst.max(self.rate));
        let (bucket, streak) = self
            .buckets
            .entry(addr)
            .or_insert_with(|| (TokenBucket::new(rate, burst, now), 0));
        if bucket.try_take(now) {
            *streak = 0;
            Admit::Yes
        } else {
            *streak += 1;
            Admit::No {
                first: *streak == 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.try_take(t0)).count(), 5);
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(110)));
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn connection_rate_is_per_address() {
        let t0 = Instant::now();
        let mut r = ConnectionRate::new(1, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(r.admit(a, t0), Admit::Yes);
        assert_eq!(r.admit(a, t0), Admit::Yes);
        assert_eq!(r.admit(a, t0), Admit::No { first: true });
        assert_eq!(r.admit(a, t0), Admit::No { first: false });
        assert_eq!(r.admit(b, t0), Admit::Yes);
        assert_eq!(r.admit(a, t0 + Duration::from_secs(1)), Admit::Yes);
        let mut off = ConnectionRate::new(0, 0);
        assert!((0..10_000).all(|_| off.admit(a, t0) == Admit::Yes));
    }
}
