//! Listeners and the accept loop: binds the configured addresses, enforces
//! `max_connections`, starts one task per connection, and shuts everything down in order
//! (stop accepting, close connections, wait for them, stop the router).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::connection::{self, ConnectionContext};
use crate::router::{Router, RouterCmd};
use crate::session::SessionLimits;
use crate::{BrokerConfig, BrokerError, Stats};

/// Commands queued for the router before connections wait (back-pressure).
const ROUTER_QUEUE: usize = 8192;

/// A running broker. Dropping it without `shutdown` leaves its tasks running until the
/// runtime stops.
pub struct Broker {
    local_addrs: Vec<SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    accept_tasks: Vec<JoinHandle<()>>,
    router_task: JoinHandle<()>,
    /// Every connection task holds a clone; `recv` returns None once all are gone.
    connections_done: mpsc::Receiver<()>,
    stats: Arc<Stats>,
}

impl Broker {
    /// Binds every listener (port 0 picks a free port: see `local_addrs`) and starts serving.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let stats = Arc::new(Stats::default());
        let (router_tx, router_rx) = mpsc::channel(ROUTER_QUEUE);
        let limits = SessionLimits {
            max_inflight: usize::from(config.limits.max_inflight),
            max_queued: config.limits.max_queued_messages,
        };
        let router_task = tokio::spawn(Router::new(limits, stats.clone()).run(router_rx));

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (done_tx, connections_done) = mpsc::channel::<()>(1);
        let permits = Arc::new(Semaphore::new(config.limits.max_connections));
        let mut local_addrs = Vec::new();
        let mut accept_tasks = Vec::new();
        for addr in &config.listeners {
            let listener = TcpListener::bind(addr).await.map_err(|source| BrokerError::Bind { addr: *addr, source })?;
            let local = listener.local_addr().map_err(|source| BrokerError::Bind { addr: *addr, source })?;
            local_addrs.push(local);
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                config.limits.clone(),
                router_tx.clone(),
                stats.clone(),
                permits.clone(),
                shutdown_rx.clone(),
                done_tx.clone(),
            )));
        }
        Ok(Broker { local_addrs, shutdown_tx, accept_tasks, router_task, connections_done, stats })
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Stops accepting, closes every connection (publishing wills as for any connection
    /// the server closes), waits for them (at most 5 s), then stops the router.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        for task in self.accept_tasks.drain(..) {
            let _ = task.await;
        }
        if tokio::time::timeout(Duration::from_secs(5), self.connections_done.recv()).await.is_err() {
            warn!("connections still open after 5 s: stopping anyway");
        }
        // Every sender of the router's queue lived in the accept loops and connections.
        if tokio::time::timeout(Duration::from_secs(5), &mut self.router_task).await.is_err() {
            self.router_task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    limits: crate::Limits,
    router: mpsc::Sender<RouterCmd>,
    stats: Arc<Stats>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.refused_connections.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, max_connections = limits.max_connections, "max_connections reached: connection refused");
            drop(stream);
            continue;
        };
        let ctx = ConnectionContext {
            limits: limits.clone(),
            router: router.clone(),
            stats: stats.clone(),
            shutdown: shutdown.clone(),
        };
        let done = done.clone();
        tokio::spawn(async move {
            connection::handle(stream, peer, ctx).await;
            drop(permit);
            drop(done);
        });
    }
}
