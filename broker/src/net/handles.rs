//! Handles the daemon keeps on a running [`Broker`](super::server::Broker): one to publish
//! into it as an internal client (`$SYS`), one to read its status for `/metrics`, the
//! dashboard and `/api/v1/status`. Both are cheap clones that outlive no part of it.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::bridge::BridgeStatus;
use crate::protocol::message::Message;
use crate::router::RouterCmd;
use crate::stats::Stats;
use crate::status::{BrokerStatus, RouterSnapshot};
use crate::store::{Recovery, Store};

/// See [`Broker::publisher`].
#[derive(Clone)]
pub struct InternalPublisher {
    pub(super) router: mpsc::Sender<RouterCmd>,
}

impl InternalPublisher {
    /// Routes `message`; returns once it is accepted (durably, where it had to be written).
    /// Errors when the broker is stopping.
    pub async fn publish(&self, message: Message) -> Result<(), BrokerStopping> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.router
            .send(RouterCmd::Inject {
                message,
                origin_bridge: None,
                accepted: Some(tx),
            })
            .await
            .map_err(|_| BrokerStopping)?;
        rx.await.map_err(|_| BrokerStopping)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the broker is stopping")]
pub struct BrokerStopping;

#[derive(Clone)]
pub struct StatusHandle {
    pub(super) started_at_ms: u64,
    pub(super) snapshot: Arc<Mutex<RouterSnapshot>>,
    pub(super) bridges: Vec<Arc<Mutex<BridgeStatus>>>,
    pub(super) store: Option<Store>,
    pub(super) recovery: Option<Recovery>,
    pub(super) stats: Arc<Stats>,
}

impl StatusHandle {
    /// A consistent-enough view of everything (the router part is at most ~200 ms old).
    pub fn status(&self) -> BrokerStatus {
        BrokerStatus {
            started_at_ms: self.started_at_ms,
            router: self
                .snapshot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            bridges: self
                .bridges
                .iter()
                .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect(),
            log: self.store.as_ref().map(Store::log_stats),
            durability: self.store.as_ref().map(|s| s.durability().borrow().clone()),
            recovery: self.recovery.clone(),
            pending_bytes: self.store.as_ref().map(Store::pending_bytes),
            last_store_fault: crate::stats::STORE_FAULTS.last(),
        }
    }

    /// The live counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}
