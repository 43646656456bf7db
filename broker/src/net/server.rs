//! Listeners and the accept loop: opens the store, restores state, binds the configured
//! addresses, enforces `max_connections`, starts one task per connection and one per
//! bridge, and shuts everything down in order (stop accepting, close connections, stop the
//! bridges, let the router submit its last batch, commit and close the store).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

pub use super::handles::{BrokerStopping, InternalPublisher, StatusHandle};
use crate::bridge::{self, Bridge, BridgeStatus, Cursors};
use crate::config::BrokerConfig;
use crate::net::connection;
use crate::net::connection::ConnectionContext;
use crate::persist::{self, Restored};
use crate::pipeline::{Ingest, LoadError};
use crate::policy::auth::Authenticator;
use crate::policy::ratelimit::{Admit, ConnectionRate};
use crate::router::{DeadLetterHandle, Durable, ForwardRoute, Router, RouterCmd};
use crate::session::SessionLimits;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::status::{BrokerStatus, RouterSnapshot};
use crate::store::{Recovery, Seq, Store, StoreConfig};
use crate::tls::{self, TlsError, TlsListener};
use std::path::PathBuf;

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS listener {addr}: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        dir: PathBuf,
        source: crate::store::StoreError,
    },
    #[error("{0}")]
    Pipeline(String),
}

/// Commands queued for the router before connections wait (back-pressure).
const ROUTER_QUEUE: usize = 8192;

/// A running broker.
pub struct Broker {
    local_addrs: Vec<SocketAddr>,
    /// TLS listeners by local address, for `reload_tls`.
    tls_listeners: Vec<(SocketAddr, Arc<TlsListener>)>,
    shutdown: Shutdown,
    accept_tasks: Vec<JoinHandle<()>>,
    bridge_tasks: Vec<JoinHandle<()>>,
    router_task: JoinHandle<()>,
    /// `max_connections` of them; every connection task holds one until it ends (no
    /// separate handle per connection to tell shutdown they are gone: 8 B each, issue 14).
    permits: Arc<Semaphore>,
    max_connections: usize,
    stats: Arc<Stats>,
    store: Option<Store>,
    recovery: Option<Recovery>,
    bridges: Vec<Arc<Mutex<BridgeStatus>>>,
    snapshot: Arc<Mutex<RouterSnapshot>>,
    started_at_ms: u64,
    /// For `publisher()`; dropped at shutdown so the router can finish.
    router_tx: Option<mpsc::Sender<RouterCmd>>,
}

impl Broker {
    /// Opens the store (if configured), binds every listener (port 0 picks a free port: see
    /// `local_addrs`) and starts serving.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let stats = Arc::new(Stats::default());
        let (router_tx, router_rx) = mpsc::channel(ROUTER_QUEUE);
        let shutdown = Shutdown::new();
        let (ingest_tx, ingest_rx) = watch::channel(false);
        let limits = SessionLimits {
            max_inflight: usize::from(config.limits.max_inflight),
            max_queued: config.limits.max_queued_messages,
            max_queued_bytes: config.limits.max_queued_bytes,
            max_subscriptions: config.limits.max_subscriptions,
        };
        let auth = Arc::new(Authenticator::new(config.security.clone()));
        let connection_rate = Arc::new(Mutex::new(ConnectionRate::new(
            config.limits.max_connection_rate,
            config.limits.max_connection_burst,
        )));

        let (store, recovery, restored) = open_store(&config).await?;

        let durable = store.clone().map(|store| Durable {
            store,
            bridges: config
                .bridges
                .iter()
                .map(|b| ForwardRoute {
                    name: b.name.clone(),
                    filters: b.forward.iter().map(|rule| rule.local.clone()).collect(),
                })
                .collect(),
            storage: config.storage.clone(),
            ingest_paused: ingest_tx,
        });
        let snapshot = Arc::new(Mutex::new(RouterSnapshot::default()));
        let mut router = Router::new(limits, stats.clone(), durable, snapshot.clone());
        if let Some(state) = restored {
            router.restore(state);
        }
        if let Some(ingest) = load_pipeline(&config, store.as_ref(), &stats).await? {
            router.set_pipeline(ingest);
        }
        router.wake_connections_on(shutdown.clone());
        let router_task = tokio::spawn(router.run(router_rx));

        let (bridges, bridge_tasks) =
            start_bridges(&config, store.as_ref(), &router_tx, &shutdown, &stats);

        let permits = Arc::new(Semaphore::new(config.limits.max_connections));
        let mut local_addrs = Vec::new();
        let mut accept_tasks = Vec::new();
        let mut tls_listeners = Vec::new();
        for listener_config in &config.listeners {
            let addr = &listener_config.bind;
            let tls = match &listener_config.tls {
                Some(settings) => Some(Arc::new(TlsListener::new(settings.clone()).map_err(
                    |source| BrokerError::Tls {
                        addr: *addr,
                        source,
                    },
                )?)),
                None => None,
            };
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: *addr,
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| BrokerError::Bind {
                addr: *addr,
                source,
            })?;
            local_addrs.push(local);
            if let Some(tls) = &tls {
                tls_listeners.push((local, tls.clone()));
            }
            let ctx = Arc::new(ConnectionContext {
                limits: config.limits.clone(),
                router: router_tx.clone(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                ingest_paused: ingest_rx.clone(),
                auth: auth.clone(),
                tls,
            });
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                ctx,
                permits.clone(),
                connection_rate.clone(),
            )));
        }
        Ok(Broker {
            local_addrs,
            tls_listeners,
            shutdown,
            accept_tasks,
            bridge_tasks,
            router_task,
            permits,
            max_connections: config.limits.max_connections,
            stats,
            store,
            recovery,
            bridges,
            snapshot,
            started_at_ms: crate::time::unix_ms(),
            router_tx: Some(router_tx),
        })
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Reads every TLS listener's certificate, key and client CA files again (SIGHUP).
    /// New connections use them; open connections are not touched. A listener whose files
    /// fail to load keeps its current ones. One result per TLS listener (local address).
    pub fn reload_tls(&self) -> Vec<(SocketAddr, Result<(), TlsError>)> {
        self.tls_listeners
            .iter()
            .map(|(addr, tls)| (*addr, tls.reload()))
            .collect()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// What the store found at start-up (`moved_aside` set after a corrupt store).
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The dead-letter store's API (`None` without a data directory).
    pub fn dead_letters(&self) -> Option<DeadLetterHandle> {
        Some(DeadLetterHandle {
            store: self.store.clone()?,
            router: self.router_tx.clone()?,
        })
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// A cheap, cloneable handle for reading the broker's status while it runs (for the
    /// HTTP endpoints and `$SYS`), valid after `shutdown` too.
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle {
            started_at_ms: self.started_at_ms,
            snapshot: self.snapshot.clone(),
            bridges: self.bridges.clone(),
            store: self.store.clone(),
            recovery: self.recovery.clone(),
            stats: self.stats.clone(),
        }
    }

    pub fn status(&self) -> BrokerStatus {
        self.status_handle().status()
    }

    /// A handle that publishes messages from inside the process (e.g. `$SYS` topics), routed
    /// like a client's. Drop it before `shutdown`, or shutdown waits for it (5 s at most).
    pub fn publisher(&self) -> InternalPublisher {
        let (closed, _) = mpsc::channel(1);
        InternalPublisher {
            router: self.router_tx.clone().unwrap_or(closed),
        }
    }

    /// Stops accepting, closes every connection, stops the bridges (persisting their
    /// cursors), lets the router submit its last batch, then commits and closes the store.
    pub async fn shutdown(mut self) {
        self.shutdown.signal();
        self.router_tx = None;
        for task in self.accept_tasks.drain(..) {
            let _ = task.await;
        }
        // Every connection holds one of the permits until it ends: all of them back means
        // every connection has closed.
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(Duration::from_secs(5), self.permits.acquire_many(all))
            .await
            .is_err()
        {
            warn!("connections still open after 5 s: stopping anyway");
        }
        for task in self.bridge_tasks.drain(..) {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                warn!("a bridge did not stop within 5 s");
            }
        }
        // Every sender of the router's queue lived in the accept loops, connections and bridges.
        if tokio::time::timeout(Duration::from_secs(5), &mut self.router_task)
            .await
            .is_err()
        {
            warn!("router did not stop within 5 s");
            self.router_task.abort();
        }
        if let Some(store) = self.store.take() {
            match tokio::task::spawn_blocking(move || store.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "store did not close cleanly"),
                Err(e) => error!(error = %e, "store shutdown failed"),
            }
        }
    }
}

/// Pause after a failed accept() (EMFILE: out of descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this long while accept() keeps failing.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Failed accepts, logged at most once per [`ACCEPT_LOG_EVERY`] with how many were not.
#[derive(Default)]
struct AcceptFailures {
    last_log: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn failed(&mut self, e: &std::io::Error) {
        let now = std::time::Instant::now();
        if self
            .last_log
            .is_some_and(|t| now.duration_since(t) < ACCEPT_LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        error!(error = %e, failed_since_last_log = self.unlogged, backoff_ms = ACCEPT_BACKOFF.as_millis() as u64,
            "accept failed (out of file descriptors? raise the open files limit or lower max_connections); retrying, logged at most every 10 s");
        self.last_log = Some(now);
        self.unlogged = 0;
    }

    fn succeeded(&mut self) {
        if self.last_log.take().is_some() {
            info!(
                failed_since_last_log = self.unlogged,
                "accepting connections again"
            );
            self.unlogged = 0;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ConnectionContext>,
    permits: Arc<Semaphore>,
    connection_rate: Arc<Mutex<ConnectionRate>>,
) {
    let shutdown = ctx.shutdown.clone();
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.signalled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE (out of descriptors) and friends: the pending connection stays
                // in the backlog and accept() fails again at once, so without a pause this
                // loop would spin at 100% CPU. Existing connections go on being served; once
                // descriptors free up the next accept succeeds.
                failures.failed(&e);
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = shutdown.signalled() => return,
                }
                continue;
            }
        };
        failures.succeeded();
        // `max_connection_rate`, per source address, before anything else is spent on it.
        let admit = connection_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(peer.ip(), tokio::time::Instant::now());
        if let Admit::No { first } = admit {
            ctx.stats
                .connection_rate_refused
                .fetch_add(1, Ordering::Relaxed);
            if first {
                warn!(%peer, max_connection_rate = ctx.limits.max_connection_rate, "new connections from this address over max_connection_rate: refused (logged once per streak)");
            }
            drop(stream);
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            ctx.stats
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            warn!(%peer, max_connections = ctx.limits.max_connections, "max_connections reached: connection refused");
            drop(stream);
            continue;
        };
        let conn_ctx = ctx.clone();
        // Plain TCP and TLS connections are tasks of their own kinds: a task keeps its
        // future's largest state for as long as it lives, and a plain connection should not
        // carry room for a TLS session and its handshake (issue 14: idle connections).
        match conn_ctx.tls.clone() {
            None => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(plain_connection(stream, peer, conn_ctx, permit))
            }
            Some(tls) => tokio::spawn(async move {
                serve_tls(stream, peer, conn_ctx, tls).await;
                drop(permit);
            }),
        };
    }
}

/// Opens the store and reads back what it holds (sessions, queues, retained messages) off
/// the runtime; with no `data_dir` there is nothing to open.
/// The ingest pipeline's rules, dedup windows and dead-letter index (with a store only).
async fn load_pipeline(
    config: &BrokerConfig,
    store: Option<&Store>,
    stats: &Arc<Stats>,
) -> Result<Option<Ingest>, BrokerError> {
    let (Some(store), Some(dir)) = (store, &config.data_dir) else {
        return Ok(None);
    };
    let (rules, limits) = (config.pipeline.clone(), config.dead_letter.clone());
    let (store, stats) = (store.clone(), stats.clone());
    let loaded = tokio::task::spawn_blocking(move || Ingest::load(&rules, limits, &store, stats))
        .await
        .map_err(|e| BrokerError::Pipeline(e.to_string()))?;
    match loaded {
        Ok(ingest) => Ok(Some(ingest)),
        Err(LoadError::Store(source)) => Err(BrokerError::Store {
            dir: dir.clone(),
            source,
        }),
        Err(e) => Err(BrokerError::Pipeline(e.to_string())),
    }
}

async fn open_store(
    config: &BrokerConfig,
) -> Result<(Option<Store>, Option<Recovery>, Option<Restored>), BrokerError> {
    let mut store = None;
    let mut recovery = None;
    let mut restored = None;
    if let Some(dir) = &config.data_dir {
        let mut store_config = StoreConfig::new(dir.join("store"));
        store_config.cache_capacity_bytes = config.storage.cache_bytes;
        let dir = dir.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let (store, recovery) = Store::open(store_config)?;
            let restored = persist::restore(&store)?;
            Ok((store, recovery, restored))
        })
        .await
        .map_err(|e| BrokerError::Store {
            dir: dir.clone(),
            source: crate::store::StoreError::Unavailable(e.to_string()),
        })?
        .map_err(|source| BrokerError::Store {
            dir: dir.clone(),
            source,
        })?;
        let (s, r, state) = opened;
        if let Some(aside) = &r.moved_aside {
            error!(moved_to = %aside.display(), "the store was corrupt: it was moved aside and an empty store opened");
        }
        info!(
            log_messages = r.log_len,
            log_bytes = r.log_bytes,
            sessions = state.sessions.len(),
            retained = state.retained.len(),
            "store recovered"
        );
        store = Some(s);
        recovery = Some(r);
        restored = Some(state);
    }
    Ok((store, recovery, restored))
}

/// One task per `[[bridge]]`, each starting from its durable cursor; the log is deleted
/// behind the slowest (`Cursors`). Bridges need the store: without one none start.
fn start_bridges(
    config: &BrokerConfig,
    store: Option<&Store>,
    router_tx: &mpsc::Sender<RouterCmd>,
    shutdown: &Shutdown,
    stats: &Arc<Stats>,
) -> (Vec<Arc<Mutex<BridgeStatus>>>, Vec<JoinHandle<()>>) {
    let mut bridges = Vec::new();
    let mut bridge_tasks = Vec::new();
    if let Some(store) = store {
        let cursors = Cursors::new(
            config
                .bridges
                .iter()
                .map(|b| bridge::load_cursor(store, &b.name))
                .collect(),
            store
                .log_stats()
                .first_seq
                .map_or(Seq::MAX, |first| first.saturating_sub(1)),
        );
        for (index, bridge_config) in config.bridges.iter().enumerate() {
            let status = Arc::new(Mutex::new(BridgeStatus {
                name: bridge_config.name.clone(),
                ..Default::default()
            }));
            bridges.push(status.clone());
            let client_id = bridge_config
                .client_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", config.gateway_id, bridge_config.name));
            let bridge = Bridge {
                config: bridge_config.clone(),
                client_id,
                index,
                store: store.clone(),
                cursors: cursors.clone(),
                router: router_tx.clone(),
                status,
                shutdown: shutdown.clone(),
                stats: stats.clone(),
            };
            bridge_tasks.push(tokio::spawn(bridge.run()));
        }
    } else if !config.bridges.is_empty() {
        warn!("bridges need a data_dir: none started");
    }
    (bridges, bridge_tasks)
}

/// A plain TCP connection's task, holding its `max_connections` permit and the server's
/// "connections still open" sender until it ends.
fn plain_connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    permit: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send {
    connection::handle_holding(stream, peer, ctx, None, permit)
}

/// The size of a plain TCP connection's task future, as `accept_loop` spawns it (see
/// `net::footprint_tests`).
#[cfg(test)]
pub(crate) fn task_future_size(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
) -> usize {
    let permit = Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .expect("one permit");
    std::mem::size_of_val(&plain_connection(stream, peer, ctx, permit))
}

/// Runs one accepted connection of a TLS listener: the TLS handshake first (within
/// `connect_timeout`), then the MQTT connection.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    tls: Arc<TlsListener>,
) {
    let _ = stream.set_nodelay(true);
    let stream =
        match tokio::time::timeout(ctx.limits.connect_timeout, tls.acceptor().accept(stream)).await
        {
            Err(_) => {
                debug!(%peer, "no TLS handshake within connect_timeout: closing");
                return;
            }
            Ok(Err(e)) => {
                info!(%peer, error = %e, "TLS handshake failed: closing");
                return;
            }
            Ok(Ok(stream)) => stream,
        };
    let mut identity = None;
    if tls.settings().use_identity_as_username {
        let cn = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| tls::common_name(cert));
        match cn {
            Some(cn) if !cn.is_empty() => identity = Some(cn),
            _ => {
                warn!(%peer, "client certificate has no subject CN (use_identity_as_username): closing");
                return;
            }
        }
    }
    connection::handle(stream, peer, ctx, identity).await;
}
