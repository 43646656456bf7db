//! The router: the one task that owns every session, the subscription table and the
//! retained messages, and decides where each accepted PUBLISH goes.
//!
//! Connections talk to it only by message passing (`RouterCmd` in, `Outbound` out through
//! each connection's `Outbox`), so no connection ever takes a lock on the hot path and
//! the order of events is the order of the router's queue. Acknowledgements to publishers
//! (PUBACK/PUBREC) are sent from `accept_publish`, the single place where a message is
//! "accepted": today as soon as it is routed; with the durable log, once it is on disk.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::message::{ConnectOutcome, ConnectRequest, Message, Outbound, QoS, SubscribeFilter};
use crate::session::{ConnId, Dropped, Online, Outbox, Session, SessionLimits};
use crate::stats::Stats;
use crate::topic::{filter_matches, ClientKey, SubscriptionTable};

/// Commands from connections to the router.
#[derive(Debug)]
pub enum RouterCmd {
    Connect { conn: ConnId, request: ConnectRequest, outbox: OutboxHandle },
    Publish { conn: ConnId, pkid: u16, message: Message },
    PubAck { conn: ConnId, pkid: u16 },
    PubRec { conn: ConnId, pkid: u16 },
    PubRel { conn: ConnId, pkid: u16 },
    PubComp { conn: ConnId, pkid: u16 },
    Subscribe { conn: ConnId, pkid: u16, filters: Vec<SubscribeFilter> },
    Unsubscribe { conn: ConnId, pkid: u16, filters: Vec<String> },
    /// The connection ended. `graceful`: after a DISCONNECT packet (no will).
    Disconnected { conn: ConnId, graceful: bool },
}

/// `Outbox` wrapped so that `RouterCmd` can derive Debug.
pub struct OutboxHandle(pub Outbox);

impl std::fmt::Debug for OutboxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
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
}

impl Router {
    pub fn new(limits: SessionLimits, stats: Arc<Stats>) -> Router {
        Router {
            sessions: HashMap::new(),
            connections: HashMap::new(),
            subscriptions: SubscriptionTable::default(),
            retained: HashMap::new(),
            limits,
            stats,
            matched: HashMap::new(),
        }
    }

    /// Runs until every sender of `commands` is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<RouterCmd>) {
        while let Some(cmd) = commands.recv().await {
            self.handle(cmd);
        }
        debug!("router stopped");
    }

    pub fn handle(&mut self, cmd: RouterCmd) {
        match cmd {
            RouterCmd::Connect { conn, request, outbox } => self.connect(conn, request, outbox.0),
            RouterCmd::Publish { conn, pkid, message } => self.publish(conn, pkid, message),
            RouterCmd::PubAck { conn, pkid } => {
                let limits = self.limits;
                if let Some(s) = self.session_of(conn) {
                    s.puback(pkid, &limits);
                }
            }
            RouterCmd::PubRec { conn, pkid } => {
                if let Some(s) = self.session_of(conn) {
                    s.pubrec(pkid);
                }
            }
            RouterCmd::PubComp { conn, pkid } => {
                let limits = self.limits;
                if let Some(s) = self.session_of(conn) {
                    s.pubcomp(pkid, &limits);
                }
            }
            RouterCmd::PubRel { conn, pkid } => {
                if let Some(s) = self.session_of(conn) {
                    s.pubrel(pkid);
                    if let Some(online) = &s.online {
                        // PUBCOMP even for an unknown id, so the client can free it [MQTT-4.3.3-2].
                        online.outbox.send(Outbound::PubComp(pkid));
                    }
                }
            }
            RouterCmd::Subscribe { conn, pkid, filters } => self.subscribe(conn, pkid, filters),
            RouterCmd::Unsubscribe { conn, pkid, filters } => self.unsubscribe(conn, pkid, filters),
            RouterCmd::Disconnected { conn, graceful } => self.disconnected(conn, graceful),
        }
    }

    /// The session of a live connection; `None` for a connection that was taken over.
    fn session_of(&mut self, conn: ConnId) -> Option<&mut Session> {
        let client = self.connections.get(&conn)?;
        let session = self.sessions.get_mut(client)?;
        match &session.online {
            Some(online) if online.conn == conn => Some(session),
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
            self.stats.connection_closed();
            old.will
        });
        if let Some(will) = previous_will {
            self.route(will);
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
        let session = self
            .sessions
            .entry(client.clone())
            .or_insert_with(|| Session::new(request.clean_session));
        session.clean = request.clean_session;
        outbox.send(Outbound::ConnAck(ConnectOutcome::Accepted { session_present }));
        session.online = Some(Online { conn, outbox, will: request.will });
        session.resume(&self.limits);
        self.connections.insert(conn, client);
        self.stats.connection_opened();
    }

    fn discard_session(&mut self, client: &ClientKey) {
        if let Some(session) = self.sessions.remove(client) {
            for filter in session.subscriptions.keys() {
                self.subscriptions.remove(filter, client);
            }
        }
    }

    fn disconnected(&mut self, conn: ConnId, graceful: bool) {
        let Some(client) = self.connections.remove(&conn) else {
            return; // taken over earlier: its will was handled then
        };
        self.stats.connection_closed();
        let Some(session) = self.sessions.get_mut(&client) else { return };
        let will = match session.online.take() {
            Some(online) if online.conn == conn => online.will,
            other => {
                session.online = other;
                return;
            }
        };
        let clean = session.clean;
        if clean {
            self.discard_session(&client);
        }
        if !graceful {
            if let Some(will) = will {
                debug!(client_id = %client, topic = %will.topic, "publishing will");
                self.route(will);
            }
        }
    }

    fn publish(&mut self, conn: ConnId, pkid: u16, message: Message) {
        self.stats.message_received(message.qos, message.payload.len());
        let Some(session) = self.session_of(conn) else { return };
        let outbox = session.online.as_ref().map(|o| o.outbox.clone());
        if message.qos == QoS::ExactlyOnce && !session.first_qos2_receipt(pkid) {
            // A resend of a QoS 2 message routed already: acknowledge, do not deliver again.
            if let Some(outbox) = outbox {
                outbox.send(Outbound::PubRec(pkid));
            }
            return;
        }
        let qos = message.qos;
        self.accept_publish(message);
        if let Some(outbox) = outbox {
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => outbox.send(Outbound::PubAck(pkid)),
                QoS::ExactlyOnce => outbox.send(Outbound::PubRec(pkid)),
            }
        }
    }

    /// The one place every accepted PUBLISH (and every will) goes through.
    fn accept_publish(&mut self, message: Message) {
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
        self.subscriptions.for_each_match(&message.topic, |client, qos| {
            let best = matched.entry(client.clone()).or_insert(qos);
            *best = (*best).max(qos);
        });
        for (client, granted) in matched.drain() {
            let Some(session) = self.sessions.get_mut(&client) else { continue };
            let copy = Message {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos: message.qos.min(granted),
                // The retain flag is only set on messages sent because of a new subscription [MQTT-3.3.1-9].
                retain: false,
            };
            let qos = copy.qos;
            match session.deliver(copy, &self.limits) {
                Ok(()) => self.stats.message_sent(qos),
                Err(reason) => {
                    self.stats.message_dropped(reason);
                    if reason == Dropped::QueueFull {
                        warn!(client_id = %client, topic = %message.topic, "queue full (max_queued_messages): message dropped for this client");
                    }
                }
            }
        }
        self.matched = matched;
    }

    fn subscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<SubscribeFilter>) {
        let limits = self.limits;
        let Some(client) = self.connections.get(&conn).cloned() else { return };
        let Some(session) = self.session_of(conn) else { return };
        let mut granted = Vec::with_capacity(filters.len());
        let mut new_filters = Vec::new();
        for f in filters {
            match f.requested {
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
        for (filter, qos) in &new_filters {
            self.subscriptions.insert(filter, client.clone(), *qos);
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
        if let Some(session) = self.sessions.get_mut(&client) {
            for message in retained {
                let qos = message.qos;
                match session.deliver(message, &limits) {
                    Ok(()) => self.stats.message_sent(qos),
                    Err(reason) => self.stats.message_dropped(reason),
                }
            }
        }
    }

    fn unsubscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<String>) {
        let Some(client) = self.connections.get(&conn).cloned() else { return };
        let Some(session) = self.session_of(conn) else { return };
        for filter in &filters {
            session.subscriptions.remove(filter);
        }
        if let Some(online) = &session.online {
            online.outbox.send(Outbound::UnsubAck(pkid));
        }
        for filter in &filters {
            self.subscriptions.remove(filter, &client);
        }
    }
}
