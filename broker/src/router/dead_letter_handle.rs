//! [`DeadLetterHandle`]: how the daemon's HTTP API and `waystation dlq` reach the dead
//! letters. Listing reads the store directly (off the async threads); replay and purge are
//! router commands (`dead_letters.rs`), sent in slices, each awaited until durable.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::commands::{DeadLetterAction, RouterCmd};
use crate::pipeline::dead_letter::DeadLetter;
use crate::store::{Keyspace, Store};

/// Dead letters handled per router command, so a replay of thousands does not hold the
/// router (each is a read from the store) for long.
const PER_COMMAND: usize = 256;

/// The daemon's way to the dead letters: list them from the store, replay or purge them
/// through the router.
#[derive(Clone)]
pub struct DeadLetterHandle {
    pub(crate) store: Store,
    pub(crate) router: mpsc::Sender<RouterCmd>,
}

/// What a replay or purge did, summed over its router commands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetterSummary {
    pub replayed: usize,
    pub refused_again: usize,
    pub purged: usize,
    /// Not replayed and kept (no bridge forwards the topic now, or the store refuses it).
    pub kept: usize,
    pub missing: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("reading the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the broker is stopping")]
    Stopping,
    #[error("the store did not confirm the writes within {0:?}")]
    NotDurable(Duration),
}

impl DeadLetterHandle {
    /// The stored dead letters, oldest first, at most `limit` of them, and how many there are.
    pub async fn list(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), DeadLetterError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let all = store.scan(Keyspace::DeadLetter, b"")?;
            let total = all.len();
            let letters = all
                .iter()
                .filter_map(|(k, v)| DeadLetter::decode(k, v))
                .take(limit)
                .collect();
            Ok((letters, total))
        })
        .await
        .map_err(|_| DeadLetterError::Stopping)?
    }

    /// Every stored id (for "all").
    async fn all_ids(&self) -> Result<Vec<u64>, DeadLetterError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            Ok(store
                .scan(Keyspace::DeadLetter, b"")?
                .iter()
                .filter_map(|(k, _)| Some(u64::from_be_bytes(k.as_slice().try_into().ok()?)))
                .collect())
        })
        .await
        .map_err(|_| DeadLetterError::Stopping)?
    }

    pub async fn replay(
        &self,
        ids: Option<Vec<u64>>,
    ) -> Result<DeadLetterSummary, DeadLetterError> {
        self.run(ids, DeadLetterAction::Replay).await
    }

    pub async fn purge(&self, ids: Option<Vec<u64>>) -> Result<DeadLetterSummary, DeadLetterError> {
        self.run(ids, DeadLetterAction::Purge).await
    }

    /// Sends `ids` (all stored ones when `None`) in commands of [`PER_COMMAND`] and waits
    /// until each command's writes are durable.
    async fn run(
        &self,
        ids: Option<Vec<u64>>,
        action: fn(Vec<u64>) -> DeadLetterAction,
    ) -> Result<DeadLetterSummary, DeadLetterError> {
        const DURABLE_WAIT: Duration = Duration::from_secs(30);
        let ids = match ids {
            Some(ids) => ids,
            None => self.all_ids().await?,
        };
        let mut summary = DeadLetterSummary::default();
        for chunk in ids.chunks(PER_COMMAND) {
            let (reply, answer) = oneshot::channel();
            self.router
                .send(RouterCmd::DeadLetters {
                    action: action(chunk.to_vec()),
                    reply,
                })
                .await
                .map_err(|_| DeadLetterError::Stopping)?;
            let outcome = answer.await.map_err(|_| DeadLetterError::Stopping)?;
            match tokio::time::timeout(DURABLE_WAIT, outcome.durable).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(DeadLetterError::Stopping),
                Err(_) => return Err(DeadLetterError::NotDurable(DURABLE_WAIT)),
            }
            summary.replayed += outcome.replayed;
            summary.refused_again += outcome.refused_again;
            summary.purged += outcome.purged;
            summary.kept += outcome.kept;
            summary.missing += outcome.missing;
        }
        Ok(summary)
    }
}
