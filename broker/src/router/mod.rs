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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::acl::ClientAcl;
use crate::bridge::BridgeConfig;
use crate::config::{OnFull, StorageLimits};
use crate::message::{ConnectOutcome, Message, Outbound, QoS, SubscribeFilter};
use crate::persist::{self, Restored};
use crate::session::{ConnId, Dropped, Online, Outbox, Session, SessionLimits};
use crate::stats::Stats;
use crate::status::{ClientInfo, LastPublish, RouterSnapshot, LAST_PAYLOAD_PREVIEW};
use crate::store::record::StoredMessage;
use crate::store::{Durability, Keyspace, Op, Store, Ticket};
use crate::time::unix_ms;
use crate::topic::{filter_matches, ClientKey, SubscriptionTable};

/// Commands handled per wake-up before the batch is submitted (bounds ack latency).
const MAX_BURST: usize = 1024;

/// Most log bytes one retention pass (`max_bytes` drop_oldest, `max_age`) deletes; the rest
/// goes at the next housekeeping tick (every 200 ms, so up to 80 MiB/s). sled loads every
/// leaf a batch deletes from and keeps it until the batch is applied: one commit deleting
/// 256 MiB of the log cost ~1.1 GB of memory here, after a long outage `max_age` could reach
/// that much at once.
const RETENTION_DELETE_MAX_BYTES: u64 = 16 << 20;

/// What a client asked for when it connected, after the adapter validated it.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Never empty: the adapter assigns an id to a clean session that sent none.
    pub client_id: Arc<str>,
    pub clean_session: bool,
    pub keep_alive_secs: u16,
    pub will: Option<Message>,
    pub username: Option<String>,
    pub peer: Option<std::net::SocketAddr>,
    /// The ACL rules for this client (`None`: no ACL configured, everything allowed). The
    /// router checks read access with them for every message it delivers.
    pub acl: Option<Arc<ClientAcl>>,
}

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

/// An answer that waits for what its request wrote to be durable: released in arrival
/// order by [`Router::release`].
enum AckTarget {
    /// PUBACK, PUBREC, UNSUBACK.
    Client(Outbox, Outbound),
    /// A broker-internal publish (a bridge's command) was accepted.
    Internal(oneshot::Sender<()>),
    /// The CONNACK of a CONNECT that changed the stored session: the outbox holds every
    /// other packet for this connection until it goes out ([`Outbox::hold`]).
    ConnAck(Outbox, Outbound),
    /// SUBACK, then the retained messages matching the filters it granted (so a client sees
    /// its SUBACK before them, as it would without the wait).
    SubAck {
        conn: ConnId,
        outbox: Outbox,
        packet: Outbound,
        granted: Vec<(String, QoS)>,
    },
}

impl AckTarget {
    /// Its request could not be stored: nothing is acknowledged. A client's connection is
    /// closed so that it reconnects and sends again (MQTT 3.1.1 has no negative ack); an
    /// internal waiter sees its sender dropped.
    fn refuse(self) {
        match self {
            AckTarget::Client(outbox, _)
            | AckTarget::ConnAck(outbox, _)
            | AckTarget::SubAck { outbox, .. } => outbox.send(Outbound::Close),
            AckTarget::Internal(_) => {}
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
                Some(state) = durable_changed(&mut durability) => {
                    self.on_durable(state);
                    // Released SUBACKs deliver retained messages, which a persistent
                    // session writes to its queue: submit those now, not at the next burst.
                    while !self.batch_ops.is_empty() {
                        self.end_burst();
                    }
                }
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
        // Whatever this CONNECT writes (a new session record, a discarded one, a will)
        // must be durable before the CONNACK says "session present" or not.
        let ops_before = self.batch_ops.len();
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
            // A will that cannot be stored is logged and counted by accept_publish.
            let _ = self.accept_publish(will, &client, None);
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
        let connack = Outbound::ConnAck(ConnectOutcome::Accepted { session_present });
        if self.durable.is_some() && self.batch_ops.len() > ops_before {
            outbox.hold();
            self.batch_acks
                .push(AckTarget::ConnAck(outbox.clone(), connack));
        } else {
            outbox.send(connack);
        }
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
                // A will that cannot be stored is logged and counted by accept_publish.
                let _ = self.accept_publish(will, &client, None);
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
        if qos == QoS::ExactlyOnce && first_receipt {
            self.batch_qos2.push((client.clone(), pkid));
        }
        if first_receipt {
            if let Err(reason) = self.accept_publish(message, &client, None) {
                // Nothing was stored or delivered: no ack, and the connection ends as for
                // a packet over max_packet_size (3.1.1 cannot say why).
                if qos == QoS::ExactlyOnce {
                    self.batch_qos2.pop();
                    if let Some(s) = self.sessions.get_mut(&client) {
                        s.pubrel(pkid);
                    }
                }
                warn!(client_id = %client, %reason, "publish cannot be stored: closing the connection");
                outbox.send(Outbound::Close);
                return;
            }
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
    ///
    /// Admission: everything this message would write is checked here, for this message
    /// alone, so that the burst's submission cannot be refused for its sake. A message that
    /// cannot be stored is neither stored nor delivered (`Err`, counted and logged); its
    /// sender decides what that means (a client's connection is closed).
    fn accept_publish(
        &mut self,
        message: Message,
        origin: &str,
        origin_bridge: Option<usize>,
    ) -> Result<(), String> {
        if let Some(durable) = &self.durable {
            let now = unix_ms();
            let forwarded =
                durable.bridges.iter().enumerate().any(|(i, b)| {
                    Some(i) != origin_bridge && b.forward_rule(&message.topic).is_some()
                });
            let stored_origin = match origin_bridge {
                Some(i) => bridge_origin(&durable.bridges[i].name),
                None => origin.to_string(),
            };
            let mut ops = Vec::new();
            if message.retain && message.payload.is_empty() {
                ops.push(Op::Remove {
                    space: Keyspace::Retained,
                    key: message.topic.as_bytes().to_vec(),
                });
            } else if message.retain || forwarded {
                let record = persist::to_stored(&message, &stored_origin, now)
                    .encode()
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        if bytes.len() > crate::store::MAX_VALUE_BYTES {
                            Err(format!(
                                "record of {} bytes is larger than the store accepts ({} bytes)",
                                bytes.len(),
                                crate::store::MAX_VALUE_BYTES
                            ))
                        } else if message.retain
                            && message.topic.len() > crate::store::MAX_KEY_BYTES
                        {
                            Err(format!(
                                "retained topic of {} bytes is longer than the store's key limit ({} bytes)",
                                message.topic.len(),
                                crate::store::MAX_KEY_BYTES
                            ))
                        } else {
                            Ok(bytes)
                        }
                    });
                let bytes = match record {
                    Ok(bytes) => bytes,
                    Err(reason) => {
                        error!(client_id = %stored_origin, topic = %message.topic, %reason,
                            "message cannot be stored: refused (neither stored nor delivered)");
                        crate::stats::STORE_FAULTS.record(
                            crate::stats::StoreFault::RecordRefused,
                            format!(
                                "message on {} from {stored_origin}: {reason}",
                                message.topic
                            ),
                        );
                        return Err(reason);
                    }
                };
                if message.retain {
                    ops.push(Op::Put {
                        space: Keyspace::Retained,
                        key: message.topic.as_bytes().to_vec(),
                        value: bytes.to_vec(),
                    });
                }
                if forwarded {
                    ops.push(Op::Append(bytes));
                }
            }
            self.batch_ops.append(&mut ops);
        }
        self.route(message);
        Ok(())
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
                    error!(client_id = %client, topic = %message.topic, error = %e, "message cannot be stored for the session: kept in memory only");
                    crate::stats::STORE_FAULTS.record(
                        crate::stats::StoreFault::RecordRefused,
                        format!("queued message on {} for {client}: {e}", message.topic),
                    );
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

    /// SUBACK goes out once the session record (for a persistent session) is durable, like
    /// a PUBACK, so a subscription the client was told about survives a crash; the retained
    /// messages for the new filters follow it ([`Router::release`]). Live messages may reach
    /// the client before its SUBACK, which MQTT 3.1.1 allows (3.8.4).
    fn subscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<SubscribeFilter>) {
        let max_subscriptions = self.limits.max_subscriptions;
        let stored = self.durable.is_some();
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        let persistent = stored && !session.clean;
        // Admission: the session record is rewritten whole and must stay within
        // MAX_SESSION_RECORD_BYTES; filters that would outgrow it are refused for this
        // client alone, never by failing the burst's commit.
        let mut record_bytes: usize = if persistent {
            session
                .subscriptions
                .keys()
                .map(|f| persist::subscription_record_len(f))
                .sum()
        } else {
            0
        };
        let mut granted = Vec::with_capacity(filters.len());
        let mut new_filters = Vec::new();
        let (mut over_limit, mut record_full) = (0u64, 0u64);
        for f in filters {
            let known = session.subscriptions.contains_key(&f.filter);
            let full =
                max_subscriptions > 0 && session.subscriptions.len() >= max_subscriptions && !known;
            let grows = if persistent && !known {
                persist::subscription_record_len(&f.filter)
            } else {
                0
            };
            match f.requested {
                Some(_) if full => {
                    over_limit += 1;
                    granted.push(None);
                }
                Some(_) if record_bytes + grows > persist::MAX_SESSION_RECORD_BYTES => {
                    record_full += 1;
                    granted.push(None);
                }
                Some(qos) => {
                    record_bytes += grows;
                    session.subscriptions.insert(f.filter.clone(), qos);
                    granted.push(Some(qos));
                    new_filters.push((f.filter, qos));
                }
                None => granted.push(None),
            }
        }
        let outbox = session.online.as_ref().map(|o| o.outbox.clone());
        let record = persistent.then(|| session.subscriptions.clone());
        if over_limit > 0 {
            self.stats
                .limit_refusals
                .fetch_add(over_limit, Ordering::Relaxed);
            warn!(client_id = %client, refused = over_limit, max_subscriptions, "max_subscriptions reached: filters refused in SUBACK");
        }
        if record_full > 0 {
            self.stats
                .session_record_full
                .fetch_add(record_full, Ordering::Relaxed);
            warn!(client_id = %client, refused = record_full, max_record_bytes = persist::MAX_SESSION_RECORD_BYTES,
                "session record full: filters refused in SUBACK (0x80)");
        }
        for (filter, qos) in &new_filters {
            self.subscriptions.insert(filter, client.clone(), *qos);
        }
        if let Some(subscriptions) = record {
            self.save_session_record(&client, &subscriptions);
        }
        if let Some(outbox) = outbox {
            self.batch_acks.push(AckTarget::SubAck {
                conn,
                outbox,
                packet: Outbound::SubAck { pkid, granted },
                granted: new_filters,
            });
        }
    }

    /// Retained messages matching newly granted filters, with the retain flag set
    /// [MQTT-3.3.1-6], to the session of `conn` if it is still connected.
    fn send_retained(&mut self, conn: ConnId, granted: &[(String, QoS)]) {
        let Some((client, _)) = self.session_of(conn) else {
            return;
        };
        let mut retained: Vec<Message> = Vec::new();
        for (filter, qos) in granted {
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

    /// UNSUBACK, like SUBACK, once the shrunk session record is durable.
    fn unsubscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<String>) {
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        for filter in &filters {
            session.subscriptions.remove(filter);
        }
        let outbox = session.online.as_ref().map(|o| o.outbox.clone());
        let record = (!session.clean).then(|| session.subscriptions.clone());
        for filter in &filters {
            self.subscriptions.remove(filter, &client);
        }
        if let Some(subscriptions) = record {
            self.save_session_record(&client, &subscriptions);
        }
        if let Some(outbox) = outbox {
            self.batch_acks
                .push(AckTarget::Client(outbox, Outbound::UnsubAck(pkid)));
        }
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

    /// Bounded ingest: QoS 0 publishers never wait for an ack, and a pipelining QoS 1
    /// client need not, so without this a flood would queue without bound in front of the
    /// disk. Over `max_pending_bytes` the connections stop reading from publishers (the
    /// socket back-pressures them, as for a full store); at half of it they resume. Checked
    /// after each submission and each commit.
    fn check_pending_bytes(&mut self) {
        let Some(durable) = &self.durable else { return };
        let pending = durable.store.pending_bytes();
        let cap = durable.storage.max_pending_bytes;
        let backlog = if self.ingest_backlog {
            pending > cap / 2
        } else {
            pending > cap
        };
        if backlog != self.ingest_backlog {
            self.ingest_backlog = backlog;
            if backlog {
                self.stats.ingest_pauses.fetch_add(1, Ordering::Relaxed);
                debug!(
                    pending_bytes = pending,
                    max_pending_bytes = cap,
                    "writes pending over max_pending_bytes: publishers paused"
                );
            }
            self.update_ingest_gate();
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

    fn update_ingest_gate(&self) {
        if let Some(durable) = &self.durable {
            let paused = self.storage_error.is_some() || self.storage_full || self.ingest_backlog;
            self.stats
                .ingest_paused
                .store(u64::from(paused), Ordering::Relaxed);
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
                while excess > 0 && freed < RETENTION_DELETE_MAX_BYTES {
                    let entries = match store.read_log(from, 1024) {
                        Ok(e) if !e.is_empty() => e,
                        Ok(_) => break,
                        Err(e) => {
                            retention_read_failed("on_full = drop_oldest", &e);
                            break;
                        }
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
        'scan: while freed < RETENTION_DELETE_MAX_BYTES {
            let entries = match store.read_log(from, 1024) {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => break,
                Err(e) => {
                    retention_read_failed("max_age", &e);
                    break;
                }
            };
            for (seq, bytes) in entries {
                from = seq + 1;
                match StoredMessage::decode(&bytes) {
                    Ok(m) if m.received_at_ms >= cutoff => break 'scan,
                    Ok(_) => dropped += 1,
                    Err(e) => {
                        // Its age is unknown and no bridge could forward it either: dropped
                        // with the expired ones, but as what it is.
                        error!(seq, len = bytes.len(), error = %e, "log record does not decode: dropped");
                        crate::stats::STORE_FAULTS.record(
                            crate::stats::StoreFault::CorruptRecord,
                            format!("log record {seq} ({} bytes): {e}", bytes.len()),
                        );
                    }
                }
                last = Some(seq);
                freed += bytes.len() as u64;
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

/// A retention scan could not read the log: it stops here and runs again at the next
/// housekeeping tick (200 ms); the operator hears of it.
fn retention_read_failed(scan: &str, e: &crate::store::StoreError) {
    error!(scan, error = %e, "reading the log for a retention scan failed; retrying at the next tick");
    crate::stats::STORE_FAULTS.record(
        crate::stats::StoreFault::ReadError,
        format!("{scan} scan: {e}"),
    );
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

#[cfg(test)]
mod tests;
