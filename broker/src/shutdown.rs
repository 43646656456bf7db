//! The one shutdown signal of the daemon: every task that must stop when the broker stops (the
//! accept loops, each connection, the bridges, the HTTP server, the samplers) holds a clone.
//!
//! It is tokio-util's `CancellationToken` behind a small surface: `signal` once, `signalled` to
//! wait. Waiting is cancel safe, so it sits in any `tokio::select!` arm; a clone made after the
//! signal is already signalled, so a task started late still stops.

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop. Idempotent.
    pub fn signal(&self) {
        self.token.cancel();
    }

    pub fn is_signalled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once `signal` has been called (at once if it already was). Cancel safe.
    pub fn signalled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_clone_made_before_or_after_the_signal_sees_it() {
        let shutdown = Shutdown::new();
        let early = shutdown.clone();
        assert!(!early.is_signalled());
        shutdown.signal();
        tokio::time::timeout(std::time::Duration::from_secs(1), early.signalled())
            .await
            .expect("an early clone wakes");
        let late = shutdown.clone();
        assert!(late.is_signalled());
        tokio::time::timeout(std::time::Duration::from_secs(1), late.signalled())
            .await
            .expect("a late clone is already signalled");
    }
}
