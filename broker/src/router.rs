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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::acl::ClientAcl;
use crate::bridge::{unix_ms, BridgeConfig};
use crate::message::{ConnectOutcome, ConnectRequest, Message, Outbound, QoS, SubscribeFilter};
use crate::persist::{self, Restored};
use crate::session::{ConnId, Dropped, Online, Outbox, Session, SessionLimits};
use crate::stats::Stats;
use crate::status::{ClientInfo, LastPublish, RouterSnapshot, LAST_PAYLOAD_PREVIEW};
use crate::store::record::StoredMessage;
use crate::store::{Durability, Keyspace, Op, Store, Ticket};
use crate::topic::{filter_matches, ClientKey, SubscriptionTable};
use crate::{OnFull, StorageLimits};

/// Commands handled per wake-up before the batch is submitted (bounds ack latency).
const MAX_BURST: usize = 1024;

/// Commands from connections and bridges to the router.
#[derive(Debug)]
pub enum RouterCmd {
    Connect {
        conn: ConnId,
        request: ConnectRequest,
        outbox: OutboxHandle,
    },
    Publish {
        conn: ConnId,
        pkid: u16,
        message: Message,
    },
    /// A PUBLISH the connection refused (ACL, topic limits): acknowledged in its turn
    /// (MQTT 3.1.1 has no negative acknowledgement), neither stored nor delivered.
    Refused {
        conn: ConnId,
        pkid: u16,
        qos: QoS,
    },
    PubAck {
        conn: ConnId,
        pkid: u16,
    },
    PubRec {
        conn: ConnId,
        pkid: u16,
    },
    PubRel {
        conn: ConnId,
        pkid: u16,
    },
    PubComp {
        conn: ConnId,
        pkid: u16,
    },
    Subscribe {
        conn: ConnId,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
    },
    Unsubscribe {
        conn: ConnId,
        pkid: u16,
        filters: Vec<String>,
    },
    /// PINGREQ: answered here rather than by the connection, so that a PINGREQ sent right
    /// behind the CONNECT is answered after the CONNACK [MQTT-3.2.0-1].
    Ping {
        conn: ConnId,
    },
    /// The connection ended. `graceful`: after a DISCONNECT packet (no will).
    Disconnected {
        conn: ConnId,
        graceful: bool,
    },
    /// A message from inside the broker (a bridge's cloud-to-device command). `accepted`
    /// fires once it is accepted, durably where it had to be written.
    Inject {
        message: Message,
        origin_bridge: Option<usize>,
        accepted: Option<oneshot::Sender<()>>,
    },
}

/// `Outbox` wrapped so that `RouterCmd` can derive Debug.
pub struct OutboxHandle(pub Outbox);

impl std::fmt::Debug for OutboxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

/// Someone waiting for a message to be accepted.
enum AckTarget {
    Client(Outbox, Outbound),
    Internal(oneshot::Sender<()>),
}

impl AckTarget {
    fn release(self) {
        match self {
            AckTarget::Client(outbox, packet) => outbox.send(packet),
            AckTarget::Internal(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// The router's durable side: present when the broker has a data directory.
pub struct Durable {
    pub store: Store,
    pub bridges: Vec<BridgeConfig>,
    pub storage: StorageLimits,
    /// True while publishers must not be read from (store full with reject_new, or the
    /// disk failing): their own QoS 1 retries keep the data meanwhile.
    pub ingest_paused: watch::Sender<bool>,
}

pub struct Router {
    sessions: HashMap<ClientKey, Session>,
    /// Which session each live connection belongs to.
    connections: HashMap<ConnId, ClientKey>,
    subscriptions: SubscriptionTable,
    retained: HashMap<Arc<str>, Message>,
    limits: SessionLimits,
    stats: Arc<Stats>,
    /// Reused per message: client -> highest granted QoS among its matching filters.
    matched: HashMap<ClientKey, QoS>,
    durable: Option<Durable>,
    /// Writes and acks of the burst being handled.
    batch_ops: Vec<Op>,
    batch_acks: Vec<AckTarget>,
    /// Acks waiting for their ticket to be durable, in arrival order.
    pending_acks: VecDeque<(Ticket, AckTarget)>,
    durable_through: Ticket,
    next_queue_id: u64,
    storage_error: Option<String>,
    storage_full: bool,
    clients: HashMap<ConnId, ClientInfo>,
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
            connections: HashMap::new(),
            subscriptions: SubscriptionTable::default(),
            retained: HashMap::new(),
            limits,
            stats,
            matched: HashMap::new(),
            durable,
            batch_ops: Vec::new(),
            batch_acks: Vec::new(),
            pending_acks: VecDeque::new(),
            durable_through: 0,
            next_queue_id: 1,
            storage_error: None,
            storage_full: false,
            clients: HashMap::new(),
            perms: HashMap::new(),
            snapshot,
            pending_drop: None,
        }
    }

    /// Loads persistent sessions, their queues and the retained messages read at start-up.
    pub fn restore(&mut self, restored: Restored) {
        for (client, saved) in restored.sessions {
            let mut session = Session::new(false);
            for (filter, qos) in &saved.subscriptions {
                self.subscriptions.insert(filter, client.clone(), *qos);
            }
            session.subscriptions = saved.subscriptions;
            for (id, message) in saved.queue {
                session.restore_queued(message, id);
            }
            self.sessions.insert(client, session);
        }
        self.retained = restored.retained;
        self.next_queue_id = restored.next_queue_id;
    }

    /// Runs until every sender of `commands` is gone, then submits what is left.
    pub async fn run(mut self, mut commands: mpsc::Receiver<RouterCmd>) {
        let mut durability = self.durable.as_ref().map(|d| d.store.durability());
        let mut housekeeping = tokio::time::interval(Duration::from_millis(200));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
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
                Some(state) = durable_changed(&mut durability) => self.on_durable(state),
                _ = housekeeping.tick() => self.housekeeping(),
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
            } => self.connect(conn, request, outbox.0),
            RouterCmd::Publish {
                conn,
                pkid,
                message,
            } => self.publish(conn, pkid, message),
            RouterCmd::Refused { conn, pkid, qos } => {
                if let Some((_, session)) = self.session_of(conn) {
                    if let Some(outbox) = session.online.as_ref().map(|o| o.outbox.clone()) {
                        match qos {
                            QoS::AtMostOnce => {}
                            QoS::AtLeastOnce => self
                                .batch_acks
                                .push(AckTarget::Client(outbox, Outbound::PubAck(pkid))),
                            QoS::ExactlyOnce => self
                                .batch_acks
                                .push(AckTarget::Client(outbox, Outbound::PubRec(pkid))),
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
            RouterCmd::Disconnected { conn, graceful } => self.disconnected(conn, graceful),
            RouterCmd::Inject {
                message,
                origin_bridge,
                accepted,
            } => {
                self.stats
                    .message_received(message.qos, message.payload.len());
                self.accept_publish(message, "", origin_bridge);
                if let Some(tx) = accepted {
                    self.batch_acks.push(AckTarget::Internal(tx));
                }
            }
        }
    }

    /// The session of a live connection; `None` for a connection that was taken over.
    fn session_of(&mut self, conn: ConnId) -> Option<(ClientKey, &mut Session)> {
        let client = self.connections.get(&conn)?;
        let session = self.sessions.get_mut(client)?;
        match &session.online {
            Some(online) if online.conn == conn => Some((client.clone(), session)),
            _ => None,
        }
    }

    fn connect(&mut self, conn: ConnId, request: ConnectRequest, outbox: Outbox) {
        let client = request.client_id.clone();
        // Take over a live connection with the same client id [MQTT-3.1.4-2]: close it and
        // publish its will, as for any connection the server closes.
        let previous_will = self.sessions.get_mut(&client).and_then(|s| {
            let old = s.online.take()?;
            info!(client_id = %client, "session taken over by a new connection");
            old.outbox.send(Outbound::Close);
            self.connections.remove(&old.conn);
            self.clients.remove(&old.conn);
            self.stats.connection_closed();
            old.will
        });
        if let Some(will) = previous_will {
            self.accept_publish(will, &client, None);
        }
        // A clean session ends with its connection [MQTT-3.1.2-6], also a taken-over one.
        if self.sessions.get(&client).is_some_and(|s| s.clean) {
            self.discard_session(&client);
        }
        let session_present = match self.sessions.get(&client) {
            Some(_) if request.clean_session => {
                self.discard_session(&client);
                false
            }
            Some(_) => true,
            None => false,
        };
        if !request.clean_session && !session_present {
            // Written now so that "session present" is true after a restart too.
            self.save_session_record(&client, &std::collections::HashMap::new());
        }
        let session = self
            .sessions
            .entry(client.clone())
            .or_insert_with(|| Session::new(request.clean_session));
        session.clean = request.clean_session;
        // What waits for this client id was checked against the previous connection's
        // rules (or none, after a restart): keep only what this one may read.
        let unreadable = match &request.acl {
            Some(acl) => session.retain_waiting(|m| acl.may_read(&m.topic)),
            None => Vec::new(),
        };
        outbox.send(Outbound::ConnAck(ConnectOutcome::Accepted {
            session_present,
        }));
        session.online = Some(Online {
            conn,
            outbox,
            will: request.will,
        });
        session.resume(&self.limits);
        if !unreadable.is_empty() {
            self.stats
                .acl_denied_deliveries
                .fetch_add(unreadable.len() as u64, Ordering::Relaxed);
            info!(client_id = %client, dropped = unreadable.len(), "queued messages this client may not read (ACL) dropped");
        }
        for id in unreadable {
            self.batch_ops.push(Op::Remove {
                space: Keyspace::SessionQueue,
                key: persist::queue_key(&client, id),
            });
        }
        match request.acl {
            Some(acl) => self.perms.insert(client.clone(), acl),
            None => self.perms.remove(&client),
        };
        self.clients.insert(
            conn,
            ClientInfo {
                client_id: client.to_string(),
                peer: request.peer,
                username: request.username,
                connected_at_ms: unix_ms(),
                clean_session: request.clean_session,
                messages_in: 0,
                last_publish: None,
            },
        );
        self.connections.insert(conn, client);
        self.stats.connection_opened();
    }

    fn save_session_record(&mut self, client: &str, subscriptions: &HashMap<String, QoS>) {
        if self.durable.is_some() {
            self.batch_ops.push(Op::Put {
                space: Keyspace::Sessions,
                key: client.as_bytes().to_vec(),
                value: persist::encode_subscriptions(subscriptions),
            });
        }
    }

    fn discard_session(&mut self, client: &ClientKey) {
        self.perms.remove(client);
        let Some(session) = self.sessions.remove(client) else {
            return;
        };
        for filter in session.subscriptions.keys() {
            self.subscriptions.remove(filter, client);
        }
        if !session.clean && self.durable.is_some() {
            for id in session.stored_ids() {
                self.batch_ops.push(Op::Remove {
                    space: Keyspace::SessionQueue,
                    key: persist::queue_key(client, id),
                });
            }
            self.batch_ops.push(Op::Remove {
                space: Keyspace::Sessions,
                key: client.as_bytes().to_vec(),
            });
        }
    }

    fn disconnected(&mut self, conn: ConnId, graceful: bool) {
        self.clients.remove(&conn);
        let Some(client) = self.connections.remove(&conn) else {
            return; // taken over earlier: its will was handled then
        };
        self.stats.connection_closed();
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        let will = match session.online.take() {
            Some(online) if online.conn == conn => online.will,
            other => {
                session.online = other;
                return;
            }
        };
        if session.clean {
            self.discard_session(&client);
        }
        if !graceful {
            if let Some(will) = will {
                debug!(client_id = %client, topic = %will.topic, "publishing will");
                self.accept_publish(will, &client, None);
            }
        }
    }

    fn publish(&mut self, conn: ConnId, pkid: u16, message: Message) {
        self.stats
            .message_received(message.qos, message.payload.len());
        if let Some(info) = self.clients.get_mut(&conn) {
            info.messages_in += 1;
            let preview = message
                .payload
                .slice(..message.payload.len().min(LAST_PAYLOAD_PREVIEW));
            match &mut info.last_publish {
                // Reuse the topic allocation when a sensor publishes to the same topic again.
                Some(last) if *last.topic == *message.topic => {
                    last.payload = preview;
                    last.at_ms = unix_ms();
                }
                last => {
                    *last = Some(LastPublish {
                        topic: message.topic.to_string(),
                        payload: preview,
                        at_ms: unix_ms(),
                    })
                }
            }
        }
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        let Some(outbox) = session.online.as_ref().map(|o| o.outbox.clone()) else {
            return;
        };
        let qos = message.qos;
        // A resend of a QoS 2 message routed already is acknowledged, not delivered again.
        let first_receipt = qos != QoS::ExactlyOnce || session.first_qos2_receipt(pkid);
        if first_receipt {
            self.accept_publish(message, &client, None);
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self
                .batch_acks
                .push(AckTarget::Client(outbox, Outbound::PubAck(pkid))),
            QoS::ExactlyOnce => self
                .batch_acks
                .push(AckTarget::Client(outbox, Outbound::PubRec(pkid))),
        }
    }

    /// The one place every accepted PUBLISH (client's, will, or bridge's) goes through:
    /// durable writes first (collected for this burst's commit), then delivery.
    fn accept_publish(&mut self, message: Message, origin: &str, origin_bridge: Option<usize>) {
        if let Some(durable) = &self.durable {
            let now = unix_ms();
            if message.retain {
                if message.payload.is_empty() {
                    self.batch_ops.push(Op::Remove {
                        space: Keyspace::Retained,
                        key: message.topic.as_bytes().to_vec(),
                    });
                } else if let Ok(bytes) = persist::to_stored(&message, origin, now).encode() {
                    self.batch_ops.push(Op::Put {
                        space: Keyspace::Retained,
                        key: message.topic.as_bytes().to_vec(),
                        value: bytes.to_vec(),
                    });
                }
            }
            let forwarded =
                durable.bridges.iter().enumerate().any(|(i, b)| {
                    Some(i) != origin_bridge && b.forward_rule(&message.topic).is_some()
                });
            if forwarded {
                let origin = match origin_bridge {
                    Some(i) => bridge_origin(&durable.bridges[i].name),
                    None => origin.to_string(),
                };
                match persist::to_stored(&message, &origin, now).encode() {
                    Ok(bytes) => self.batch_ops.push(Op::Append(bytes)),
                    Err(e) => {
                        error!(client_id = %origin, topic = %message.topic, error = %e, "message cannot be stored: not forwarded")
                    }
                }
            }
        }
        self.route(message);
    }

    /// Updates the retained store and delivers to every matching subscription, once per
    /// client at the highest QoS it was granted [MQTT-3.3.5-1].
    fn route(&mut self, message: Message) {
        if message.retain {
            if message.payload.is_empty() {
                self.retained.remove(&message.topic);
            } else {
                self.retained.insert(message.topic.clone(), message.clone());
            }
        }
        let mut matched = std::mem::take(&mut self.matched);
        self.subscriptions
            .for_each_match(&message.topic, |client, qos| {
                let best = matched.entry(client.clone()).or_insert(qos);
                *best = (*best).max(qos);
            });
        for (client, granted) in matched.drain() {
            let copy = Message {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos: message.qos.min(granted),
                // The retain flag is only set on messages sent because of a new subscription [MQTT-3.3.1-9].
                retain: false,
            };
            self.deliver_to(&client, copy);
        }
        self.matched = matched;
    }

    /// Hands one message to one session, writing it to disk first when the session is
    /// persistent and the message QoS 1/2 (so that it survives a restart until acked).
    fn deliver_to(&mut self, client: &ClientKey, message: Message) {
        // ACL: read access to this very topic (a wildcard subscription may reach further).
        if !self.perms.is_empty()
            && self
                .perms
                .get(client)
                .is_some_and(|acl| !acl.may_read(&message.topic))
        {
            self.stats
                .acl_denied_deliveries
                .fetch_add(1, Ordering::Relaxed);
            debug!(client_id = %client, topic = %message.topic, "not delivered: no read access (ACL)");
            return;
        }
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        let qos = message.qos;
        let mut stored = None;
        if self.durable.is_some()
            && !session.clean
            && qos != QoS::AtMostOnce
            && session.would_keep(&self.limits)
        {
            let id = self.next_queue_id;
            match persist::to_stored(&message, "", unix_ms()).encode() {
                Ok(bytes) => {
                    self.next_queue_id += 1;
                    self.batch_ops.push(Op::Put {
                        space: Keyspace::SessionQueue,
                        key: persist::queue_key(client, id),
                        value: bytes.to_vec(),
                    });
                    stored = Some(id);
                }
                Err(e) => {
                    error!(client_id = %client, topic = %message.topic, error = %e, "message cannot be stored for the session")
                }
            }
        }
        let topic = message.topic.clone();
        match session.deliver(message, stored, &self.limits) {
            Ok(()) => self.stats.message_sent(qos),
            Err(reason) => {
                self.stats.message_dropped(reason);
                if reason == Dropped::QueueFull {
                    warn!(client_id = %client, topic = %topic, "queue full (max_queued_messages): message dropped for this client");
                }
            }
        }
    }

    fn subscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<SubscribeFilter>) {
        let max_subscriptions = self.limits.max_subscriptions;
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        let mut granted = Vec::with_capacity(filters.len());
        let mut new_filters = Vec::new();
        let mut over_limit = 0u64;
        for f in filters {
            let full = max_subscriptions > 0
                && session.subscriptions.len() >= max_subscriptions
                && !session.subscriptions.contains_key(&f.filter);
            match f.requested {
                Some(_) if full => {
                    over_limit += 1;
                    granted.push(None);
                }
                Some(qos) => {
                    session.subscriptions.insert(f.filter.clone(), qos);
                    granted.push(Some(qos));
                    new_filters.push((f.filter, qos));
                }
                None => granted.push(None),
            }
        }
        if let Some(online) = &session.online {
            online.outbox.send(Outbound::SubAck { pkid, granted });
        }
        let persistent = !session.clean;
        let record = persistent.then(|| session.subscriptions.clone());
        if over_limit > 0 {
            self.stats
                .limit_refusals
                .fetch_add(over_limit, Ordering::Relaxed);
            warn!(client_id = %client, refused = over_limit, max_subscriptions, "max_subscriptions reached: filters refused in SUBACK");
        }
        for (filter, qos) in &new_filters {
            self.subscriptions.insert(filter, client.clone(), *qos);
        }
        if let Some(subscriptions) = record {
            self.save_session_record(&client, &subscriptions);
        }
        // Retained messages matching a new subscription, with the retain flag set [MQTT-3.3.1-6].
        let mut retained: Vec<Message> = Vec::new();
        for (filter, qos) in &new_filters {
            for message in self.retained.values() {
                if filter_matches(filter, &message.topic) {
                    let mut copy = message.clone();
                    copy.qos = copy.qos.min(*qos);
                    copy.retain = true;
                    retained.push(copy);
                }
            }
        }
        for message in retained {
            self.deliver_to(&client, message);
        }
    }

    fn unsubscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<String>) {
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        for filter in &filters {
            session.subscriptions.remove(filter);
        }
        if let Some(online) = &session.online {
            online.outbox.send(Outbound::UnsubAck(pkid));
        }
        let record = (!session.clean).then(|| session.subscriptions.clone());
        for filter in &filters {
            self.subscriptions.remove(filter, &client);
        }
        if let Some(subscriptions) = record {
            self.save_session_record(&client, &subscriptions);
        }
    }

    /// Submits the burst's writes as one ticket and queues its acks behind it.
    fn end_burst(&mut self) {
        let ops = std::mem::take(&mut self.batch_ops);
        let acks = std::mem::take(&mut self.batch_acks);
        let mut ticket = None;
        if !ops.is_empty() {
            if let Some(durable) = &self.durable {
                match durable.store.submit(ops) {
                    Ok((t, _)) => ticket = Some(t),
                    Err(e) => {
                        // Nothing of this burst is durable: withhold its acks, so publishers
                        // resend after reconnecting. Never ack what is not on disk.
                        error!(error = %e, withheld_acks = acks.len(), "store refused a batch");
                        return;
                    }
                }
            }
        }
        match ticket {
            None if self.pending_acks.is_empty() => acks.into_iter().for_each(AckTarget::release),
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
        }
    }

    fn on_durable(&mut self, state: Durability) {
        self.durable_through = state.durable_through;
        while self
            .pending_acks
            .front()
            .is_some_and(|(t, _)| *t <= self.durable_through)
        {
            if let Some((_, ack)) = self.pending_acks.pop_front() {
                ack.release();
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

    fn update_ingest_gate(&self) {
        if let Some(durable) = &self.durable {
            let paused = self.storage_error.is_some() || self.storage_full;
            durable
                .ingest_paused
                .send_if_modified(|p| std::mem::replace(p, paused) != paused);
        }
    }

    fn housekeeping(&mut self) {
        self.check_storage_limits();
        self.expire_old_messages();
        self.refresh_snapshot();
    }

    fn refresh_snapshot(&self) {
        let mut clients: Vec<ClientInfo> = self.clients.values().cloned().collect();
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let snapshot = RouterSnapshot {
            clients,
            sessions: self.sessions.len(),
            offline_sessions: self
                .sessions
                .values()
                .filter(|s| s.online.is_none())
                .count(),
            queued_messages: self.sessions.values().map(Session::waiting).sum(),
            subscriptions: self.subscriptions.len(),
            retained: self.retained.len(),
            pending_acks: self.pending_acks.len(),
            storage_error: self.storage_error.clone(),
            storage_full: self.storage_full,
            taken_at_ms: unix_ms(),
        };
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }

    /// `[storage] max_bytes`: drop the oldest log entries, or pause publishers until the
    /// bridges make room. Logical bytes as the store counts them, never file sizes.
    fn check_storage_limits(&mut self) {
        let Some(durable) = &self.durable else { return };
        let store = durable.store.clone();
        let max_bytes = durable.storage.max_bytes;
        let on_full = durable.storage.on_full;
        let stats = store.log_stats();
        match on_full {
            OnFull::RejectNew => {
                let full = stats.bytes >= max_bytes;
                if full != self.storage_full {
                    if full {
                        warn!(log_bytes = stats.bytes, max_bytes, "store full (reject_new): publishers paused until bridges forward the backlog");
                    } else {
                        info!(
                            log_bytes = stats.bytes,
                            "store has room again: publishers resumed"
                        );
                    }
                    self.storage_full = full;
                    self.update_ingest_gate();
                }
            }
            OnFull::DropOldest => {
                let (bytes, from) = self.log_after_pending_drops(&stats);
                if bytes <= max_bytes {
                    return;
                }
                let mut excess = bytes - max_bytes;
                let mut from = from;
                let mut last = None;
                let mut dropped = 0u64;
                let mut freed = 0u64;
                while excess > 0 {
                    let entries = match store.read_log(from, 1024) {
                        Ok(e) if !e.is_empty() => e,
                        _ => break,
                    };
                    for (seq, record) in entries {
                        from = seq + 1;
                        last = Some(seq);
                        dropped += 1;
                        freed += record.len() as u64;
                        excess = excess.saturating_sub(record.len() as u64);
                        if excess == 0 {
                            break;
                        }
                    }
                }
                if let Some(last) = last {
                    if store.submit(vec![Op::DeleteLogThrough(last)]).is_ok() {
                        self.note_pending_drop(last, freed);
                        self.stats
                            .dropped_storage_full
                            .fetch_add(dropped, Ordering::Relaxed);
                        warn!(
                            dropped,
                            max_bytes,
                            "store full (drop_oldest): oldest unforwarded messages dropped"
                        );
                    }
                }
            }
        }
    }

    /// The log's bytes and first seq as they will be once our pending drops are committed.
    fn log_after_pending_drops(&mut self, stats: &crate::store::LogStats) -> (u64, u64) {
        let first = stats.first_seq.unwrap_or(0);
        match self.pending_drop {
            Some((through, bytes)) if first <= through => {
                (stats.bytes.saturating_sub(bytes), through + 1)
            }
            _ => {
                self.pending_drop = None;
                (stats.bytes, first)
            }
        }
    }

    fn note_pending_drop(&mut self, through: u64, bytes: u64) {
        self.pending_drop = Some(match self.pending_drop {
            Some((_, earlier)) => (through, earlier + bytes),
            None => (through, bytes),
        });
    }

    /// `[storage] max_age`: unforwarded messages older than this are dropped and counted.
    fn expire_old_messages(&mut self) {
        let Some(durable) = &self.durable else { return };
        let Some(max_age) = durable.storage.max_age else {
            return;
        };
        let store = durable.store.clone();
        let stats = store.log_stats();
        let Some(oldest) = stats.oldest_received_at_ms else {
            return;
        };
        let cutoff = unix_ms().saturating_sub(max_age.as_millis() as u64);
        if oldest >= cutoff {
            return;
        }
        let (_, mut from) = self.log_after_pending_drops(&stats);
        let mut last = None;
        let mut dropped = 0u64;
        let mut freed = 0u64;
        'scan: loop {
            let entries = match store.read_log(from, 1024) {
                Ok(e) if !e.is_empty() => e,
                _ => break,
            };
            for (seq, bytes) in entries {
                from = seq + 1;
                match StoredMessage::decode(&bytes) {
                    Ok(m) if m.received_at_ms >= cutoff => break 'scan,
                    _ => {
                        last = Some(seq);
                        dropped += 1;
                        freed += bytes.len() as u64;
                    }
                }
            }
        }
        if let Some(last) = last {
            if store.submit(vec![Op::DeleteLogThrough(last)]).is_ok() {
                self.note_pending_drop(last, freed);
                self.stats
                    .dropped_expired
                    .fetch_add(dropped, Ordering::Relaxed);
                warn!(
                    dropped,
                    max_age_secs = max_age.as_secs(),
                    "messages older than max_age dropped"
                );
            }
        }
    }
}

/// The `origin` a bridge's own messages carry in the log, so it never forwards them back.
pub fn bridge_origin(name: &str) -> String {
    format!("$bridge/{name}")
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
