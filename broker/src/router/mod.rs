//! The router: the one task that owns every session, the subscription table and the
//! retained messages, and decides where each accepted PUBLISH goes.
//!
//! Connections (and bridges) talk to it only by message passing (`RouterCmd` in,
//! `Outbound` out through each connection's `Outbox`), so no connection ever takes a lock
//! on the hot path and the order of events is the order of the router's queue.
//!
//! The acknowledgement contract lives here. `accept_publish` is the single place a
//! message is accepted: it collects what must be written (a log append when a bridge
//! forwards the topic, a queue entry for each persistent session it is owed to, the
//! retained store) into the current burst's batch. At the end of each burst of commands
//! the batch is submitted to the store as one group-commit ticket, and every PUBACK/PUBREC
//! of that burst waits in `pending_acks` until the store reports the ticket durable. Acks
//! are released strictly in the order the PUBLISHes arrived [MQTT-4.6.0-2], also those that
//! needed no write. With no store (tests), acks go out at the end of the burst.
//!
//! The same holds for every answer that tells a client something is kept: SUBACK and
//! UNSUBACK wait for the session record, and a CONNACK for what its CONNECT wrote (a new
//! persistent session's record, a discarded one); the connection's outbox holds everything
//! else until that CONNACK goes out, so it is still the first packet the client sees.
//!
//! Admission is per message, never per burst: whatever a client can make the store refuse
//! (a record too large, a retained topic too long for a key, a session record outgrowing
//! its limit, a client id too long for a session key) is checked when its packet is
//! accepted and refused for that packet alone, so a burst's submission cannot fail for
//! one client's sake. If it fails anyway (the store is shutting down), none of its acks go
//! out, the connections waiting for them are closed, and its QoS 2 receipts are forgotten,
//! so nothing is acknowledged or marked received that was not stored.
//!
//! Bounded ingest: while more than `max_pending_bytes` wait to be made durable, the
//! connections stop reading from publishers (the `ingest_paused` watch).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::{OnFull, StorageLimits};
use crate::outbox::{Congestion, Outbox};
use crate::persist::{self, Restored};
use crate::pipeline::Ingest;
use crate::policy::acl::ClientAcl;
use crate::protocol::inbound::SESSION_NEVER_EXPIRES;
use crate::protocol::message::{
    CloseReason, ConnectOutcome, Message, Outbound, QoS, SubscribeFilter, SubscribeRefusal,
    SubscriptionOptions,
};
use crate::session::{ConnId, Dropped, Online, Session, SessionLimits, Subscriptions};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::status::{ClientInfo, LastPublish, RouterSnapshot, LAST_PAYLOAD_PREVIEW};
use crate::store::record::StoredMessage;
use crate::store::{Durability, Keyspace, Op, Store, Ticket};
use crate::time::unix_ms;
use crate::topic::{filter_matches, ClientKey, SubscriptionTable};
use acks::AckTarget;
pub use commands::{ConnectRequest, OutboxHandle, RouterCmd};
pub use dead_letter_handle::{DeadLetterError, DeadLetterHandle, DeadLetterSummary};

/// Commands handled per wake-up before the batch is submitted (bounds ack latency).
const MAX_BURST: usize = 1024;

/// What the router needs to know of one `[[bridge]]`, compiled from its config by the server:
/// its name (the origin its commands carry in the log, so it never forwards them back) and
/// the local filters of its forward rules (a message matching one is appended to the log).
#[derive(Debug, Clone)]
pub struct ForwardRoute {
    pub name: String,
    pub filters: Vec<String>,
}

impl ForwardRoute {
    pub fn forwards(&self, topic: &str) -> bool {
        self.filters
            .iter()
            .any(|filter| filter_matches(filter, topic))
    }
}

/// The router's durable side: present when the broker has a data directory.
pub struct Durable {
    pub store: Store,
    pub bridges: Vec<ForwardRoute>,
    pub storage: StorageLimits,
    /// True while publishers must not be read from (store full with reject_new, or the
    /// disk failing): their own QoS 1 retries keep the data meanwhile.
    pub ingest_paused: watch::Sender<bool>,
}

pub struct Router {
    /// Boxed: a map keeps room for about 1.6 entries per session at 10,000 sessions, and a
    /// `Session` is about 300 B (issue 14: what an idle client costs).
    sessions: HashMap<ClientKey, Box<Session>>,
    subscriptions: SubscriptionTable,
    /// `$share/{group}/{filter}` subscriptions: one member per message.
    shared: shared::SharedSubscriptions,
    retained: HashMap<Arc<str>, Message>,
    limits: SessionLimits,
    stats: Arc<Stats>,
    /// Reused per message: client -> its matching subscriptions' options combined, and
    /// their subscription identifiers.
    matched: HashMap<ClientKey, (SubscriptionOptions, Vec<u32>)>,
    /// A live subscriber the message being routed found behind (QoS 0): its publisher is
    /// told to wait for it (outbox.rs has the policy).
    behind: Option<Congestion>,
    durable: Option<Durable>,
    /// Writes and acks of the burst being handled.
    batch_ops: Vec<Op>,
    batch_acks: Vec<AckTarget>,
    /// QoS 2 packet ids first received in this burst, forgotten again if the burst cannot be
    /// stored: a resend must then be routed (and stored), not just answered with PUBREC.
    batch_qos2: Vec<(ClientKey, u16)>,
    /// Acks waiting for their ticket to be durable, in arrival order.
    pending_acks: VecDeque<(Ticket, AckTarget)>,
    durable_through: Ticket,
    next_queue_id: u64,
    storage_error: Option<String>,
    storage_full: bool,
    /// More than `max_pending_bytes` submitted and not yet durable: publishers are not read
    /// from until it drops to half of that (see [`Router::check_pending_bytes`]).
    ingest_backlog: bool,
    /// Each live connection: its client (whose `client_id` is the key of its session) as
    /// the status shows it. One map for both (issue 14: each map costs about 1.6 entries
    /// per client). Shared with the status snapshot (see `refresh_snapshot`).
    clients: HashMap<ConnId, Arc<ClientInfo>>,
    /// ACL rules of each session's latest connection (empty when no ACL is configured).
    /// A session restored from disk has none until its client connects again; its queue
    /// is filtered then.
    perms: HashMap<ClientKey, Arc<ClientAcl>>,
    snapshot: Arc<Mutex<RouterSnapshot>>,
    /// Log entries this router asked to delete (drop_oldest, max_age) that the store may
    /// not have applied yet: (delete through this seq, their bytes). The store's counters
    /// only move once the delete is committed, so without this the same oldest entries
    /// would be found, dropped and counted again.
    pending_drop: Option<(u64, u64)>,
    /// Sessions with a delayed will or an expiry deadline running (MQTT 5), looked at by
    /// housekeeping; every other session needs no timer.
    timed_sessions: HashSet<ClientKey>,
    /// `[[pipeline]]` rules and the dead letters (with a store only).
    pipeline: Option<Ingest>,
    /// The broker's stop signal, when it is given one: at the signal every live connection's
    /// outbox is woken, so a quiet connection sees it without a wait of its own on it.
    stopping: Option<Shutdown>,
}

impl Router {
    pub fn new(
        limits: SessionLimits,
        stats: Arc<Stats>,
        durable: Option<Durable>,
        snapshot: Arc<Mutex<RouterSnapshot>>,
    ) -> Router {
        Router {
            sessions: HashMap::new(),
            subscriptions: SubscriptionTable::default(),
            shared: shared::SharedSubscriptions::default(),
            retained: HashMap::new(),
            limits,
            stats,
            matched: HashMap::new(),
            behind: None,
            durable,
            batch_ops: Vec::new(),
            batch_acks: Vec::new(),
            batch_qos2: Vec::new(),
            pending_acks: VecDeque::new(),
            durable_through: 0,
            next_queue_id: 1,
            storage_error: None,
            storage_full: false,
            ingest_backlog: false,
            clients: HashMap::new(),
            perms: HashMap::new(),
            snapshot,
            pending_drop: None,
            timed_sessions: HashSet::new(),
            pipeline: None,
            stopping: None,
        }
    }

    /// The ingest pipeline, read from the store by `Ingest::load`.
    pub fn set_pipeline(&mut self, ingest: Ingest) {
        self.pipeline = Some(ingest);
    }

    /// Wakes every live connection when `shutdown` is signalled. A quiet connection waits
    /// only on its socket and its outbox, and checks the signal when woken:
    /// a wait on the signal of its own would be 72 B in the task of every idle client
    /// (issue 14), and the router already holds each connection's outbox.
    pub fn wake_connections_on(&mut self, shutdown: Shutdown) {
        self.stopping = Some(shutdown);
    }

    /// Loads persistent sessions, their queues and the retained messages read at start-up.
    pub fn restore(&mut self, restored: Restored) {
        for (client, saved) in restored.sessions {
            let mut session = Session::new(false);
            for (filter, options) in &saved.subscriptions {
                self.add_subscription(filter, &client, *options);
            }
            session.subscriptions = saved.subscriptions.into_iter().collect();
            if let Some(expiry) = saved.expiry {
                // Offline since the restart at least: its time runs from the deadline it
                // was given, or from now if it was connected when the broker stopped.
                let now_ms = unix_ms();
                let left_ms = match expiry.deadline_ms {
                    Some(deadline) => deadline.saturating_sub(now_ms),
                    None => u64::from(expiry.secs) * 1000,
                };
                session.expiry_secs = expiry.secs;
                session.expires_at = Some(Instant::now() + Duration::from_millis(left_ms));
                self.timed_sessions.insert(client.clone());
            }
            for (id, message) in saved.queue {
                session.restore_queued(message, id);
            }
            self.sessions.insert(client, Box::new(session));
        }
        self.retained = restored.retained;
        self.next_queue_id = restored.next_queue_id;
    }

    /// Runs until every sender of `commands` is gone, then submits what is left.
    pub async fn run(mut self, mut commands: mpsc::Receiver<RouterCmd>) {
        let mut durability = self.durable.as_ref().map(|d| d.store.durability());
        let mut housekeeping = tokio::time::interval(Duration::from_millis(200));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopping = self.stopping.take();
        let mut woke_for_stop = stopping.is_none();
        loop {
            tokio::select! {
                () = signalled(stopping.as_ref()), if !woke_for_stop => {
                    woke_for_stop = true;
                    // Connections that register after this hear of the stop when their
                    // CONNACK wakes them (the serving phase waits on the signal itself).
                    for session in self.sessions.values() {
                        if let Some(online) = &session.online {
                            online.outbox.wake();
                        }
                    }
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.handle(cmd);
                    for _ in 1..MAX_BURST {
                        match commands.try_recv() {
                            Ok(cmd) => self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                    self.end_burst();
                }
                Some(state) = durable_changed(&mut durability) => {
                    self.on_durable(state);
                    // Released SUBACKs deliver retained messages, which a persistent
                    // session writes to its queue: submit those now, not at the next burst.
                    while !self.batch_ops.is_empty() {
                        self.end_burst();
                    }
                }
                _ = housekeeping.tick() => {
                    self.housekeeping();
                    // Wills published and sessions expired write to the store.
                    if !self.batch_ops.is_empty() || !self.batch_acks.is_empty() {
                        self.end_burst();
                    }
                }
            }
        }
        self.end_burst();
        debug!("router stopped");
    }

    pub fn handle(&mut self, cmd: RouterCmd) {
        match cmd {
            RouterCmd::Connect {
                conn,
                request,
                outbox,
            } => self.connect(conn, *request, outbox.0),
            RouterCmd::Publish {
                conn,
                pkid,
                message,
            } => self.publish(conn, pkid, message),
            RouterCmd::Refused {
                conn,
                pkid,
                qos,
                reason,
            } => {
                if let Some((_, session)) = self.session_of(conn) {
                    if let Some(outbox) = session.online.as_ref().map(|o| o.outbox.clone()) {
                        // In its turn behind the burst, like the PUBACKs around it.
                        if qos != QoS::AtMostOnce {
                            self.batch_acks.push(AckTarget::Client(
                                outbox,
                                Outbound::PubRefused { pkid, qos, reason },
                            ));
                        }
                    }
                }
            }
            RouterCmd::PubAck { conn, pkid } => {
                let limits = self.limits;
                if let Some((client, s)) = self.session_of(conn) {
                    if let Some(id) = s.puback(pkid, &limits) {
                        self.batch_ops.push(Op::Remove {
                            space: Keyspace::SessionQueue,
                            key: persist::queue_key(&client, id),
                        });
                    }
                    self.reap_discarded(&client);
                }
            }
            RouterCmd::PubRec { conn, pkid } => {
                if let Some((_, s)) = self.session_of(conn) {
                    s.pubrec(pkid);
                }
            }
            RouterCmd::PubComp { conn, pkid } => {
                let limits = self.limits;
                if let Some((client, s)) = self.session_of(conn) {
                    if let Some(id) = s.pubcomp(pkid, &limits) {
                        self.batch_ops.push(Op::Remove {
                            space: Keyspace::SessionQueue,
                            key: persist::queue_key(&client, id),
                        });
                    }
                    self.reap_discarded(&client);
                }
            }
            RouterCmd::PubRel { conn, pkid } => {
                if let Some((_, s)) = self.session_of(conn) {
                    s.pubrel(pkid);
                    if let Some(online) = &s.online {
                        // PUBCOMP even for an unknown id, so the client can free it [MQTT-4.3.3-2].
                        online.outbox.send(Outbound::PubComp(pkid));
                    }
                }
            }
            RouterCmd::Subscribe {
                conn,
                pkid,
                filters,
            } => self.subscribe(conn, pkid, filters),
            RouterCmd::Unsubscribe {
                conn,
                pkid,
                filters,
            } => self.unsubscribe(conn, pkid, filters),
            RouterCmd::Ping { conn } => {
                if let Some(online) = self.session_of(conn).and_then(|(_, s)| s.online.as_ref()) {
                    online.outbox.send(Outbound::PingResp);
                }
            }
            RouterCmd::Disconnected {
                conn,
                graceful,
                session_expiry,
                tell,
            } => self.disconnected(conn, graceful, session_expiry, tell),
            RouterCmd::DeadLetters { action, reply } => self.dead_letters(action, reply),
            RouterCmd::Inject {
                message,
                origin_bridge,
                accepted,
            } => {
                self.stats
                    .message_received(message.qos, message.payload.len());
                // Refused (logged and counted inside): `accepted` is dropped unanswered, so
                // the bridge does not acknowledge the command upstream.
                if self.accept_publish(message, "", origin_bridge).is_ok() {
                    if let Some(tx) = accepted {
                        self.batch_acks.push(AckTarget::Internal(tx));
                    }
                }
            }
        }
    }

    /// Queues a PUBLISH's answer (PUBACK for QoS 1, PUBREC for QoS 2) behind the burst's
    /// writes; QoS 0 has none.
    /// `matched`: false when no subscription or bridge took the message (MQTT 5 says so
    /// with reason 0x10; 3.1.1 acknowledges as always).
    fn ack_publish(&mut self, outbox: Outbox, pkid: u16, qos: QoS, matched: bool) {
        let packet = match qos {
            QoS::AtMostOnce => return,
            _ if !matched => Outbound::PubAckNoSubscribers { pkid, qos },
            QoS::AtLeastOnce => Outbound::PubAck(pkid),
            QoS::ExactlyOnce => Outbound::PubRec(pkid),
        };
        self.batch_acks.push(AckTarget::Client(outbox, packet));
    }

    /// Sends an answer whose writes are durable (or that needed none).
    fn release(&mut self, ack: AckTarget) {
        match ack {
            AckTarget::Client(outbox, packet) => outbox.send(packet),
            AckTarget::Internal(tx) => {
                let _ = tx.send(());
            }
            AckTarget::ConnAck(outbox, packet) => outbox.release_hold(packet),
            AckTarget::SubAck {
                conn,
                outbox,
                packet,
                granted,
            } => {
                outbox.send(packet);
                self.send_retained(conn, &granted);
            }
        }
    }

    /// Submits the burst's writes as one ticket and queues its acks behind it.
    fn end_burst(&mut self) {
        if let Some(ingest) = &mut self.pipeline {
            ingest.flush(&mut self.batch_ops);
        }
        let ops = std::mem::take(&mut self.batch_ops);
        let acks = std::mem::take(&mut self.batch_acks);
        let qos2 = std::mem::take(&mut self.batch_qos2);
        let mut ticket = None;
        if !ops.is_empty() {
            if let Some(durable) = &self.durable {
                match durable.store.submit(ops) {
                    Ok((t, _)) => ticket = Some(t),
                    Err(e) => {
                        // Admission (accept_publish, subscribe, connect) keeps sizes within
                        // the store's limits, so this is the store shutting down or broken.
                        // Nothing of this burst is durable: acknowledge none of it, close
                        // the connections that wait for an ack so they resend, and forget
                        // its QoS 2 receipts so a resend is stored, not just PUBREC'd.
                        error!(error = %e, withheld_acks = acks.len(), "store refused a burst: its acknowledgements are withheld and those connections closed");
                        crate::stats::STORE_FAULTS
                            .record(crate::stats::StoreFault::BurstRefused, e.to_string());
                        for (client, pkid) in qos2 {
                            if let Some(session) = self.sessions.get_mut(&client) {
                                session.pubrel(pkid);
                            }
                        }
                        acks.into_iter().for_each(AckTarget::refuse);
                        return;
                    }
                }
            }
        }
        match ticket {
            None if self.pending_acks.is_empty() => {
                for ack in acks {
                    self.release(ack);
                }
            }
            // Behind earlier acks still waiting for the disk: keep arrival order.
            None => {
                let behind = self.pending_acks.back().map_or(0, |(t, _)| *t);
                self.pending_acks
                    .extend(acks.into_iter().map(|a| (behind, a)));
            }
            Some(t) => self.pending_acks.extend(acks.into_iter().map(|a| (t, a))),
        }
        if ticket.is_some() {
            self.check_storage_limits();
            self.check_pending_bytes();
        }
    }

    fn on_durable(&mut self, state: Durability) {
        self.durable_through = state.durable_through;
        self.check_pending_bytes();
        while self
            .pending_acks
            .front()
            .is_some_and(|(t, _)| *t <= self.durable_through)
        {
            if let Some((_, ack)) = self.pending_acks.pop_front() {
                self.release(ack);
            }
        }
        if state.error != self.storage_error {
            match &state.error {
                Some(e) => {
                    error!(error = %e, "storage is failing: acknowledgements stop until it recovers")
                }
                None => info!("storage recovered: acknowledgements resume"),
            }
            self.storage_error = state.error;
            self.update_ingest_gate();
        }
    }
}

/// The `origin` a bridge's own messages carry in the log, so it never forwards them back.
pub fn bridge_origin(name: &str) -> String {
    format!("$bridge/{name}")
}

async fn signalled(shutdown: Option<&Shutdown>) {
    match shutdown {
        Some(shutdown) => shutdown.signalled().await,
        None => std::future::pending().await,
    }
}

async fn durable_changed(rx: &mut Option<watch::Receiver<Durability>>) -> Option<Durability> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

mod acks;
mod commands;
mod dead_letter_handle;
mod dead_letters;
mod publish;
mod retention;
mod sessions;
mod shared;
#[cfg(test)]
mod tests;
