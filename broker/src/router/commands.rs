//! What the router is told: the commands connections and bridges send it, one queue for all,
//! so the order of events is the order of this queue.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::outbox::Outbox;
use crate::policy::acl::ClientAcl;
use crate::protocol::message::{CloseReason, Message, PublishRefusal, QoS, SubscribeFilter};
use crate::protocol::Version;
use crate::session::ConnId;

/// What a client asked for when it connected, after the adapter validated it.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Never empty: the adapter assigns an id to a clean session that sent none.
    pub client_id: Arc<str>,
    pub version: Version,
    /// Discard what this client id left behind (3.1.1 clean session, MQTT 5 clean start).
    pub clean_start: bool,
    /// Seconds the session outlives the connection: 0 ends it with the connection,
    /// [`crate::protocol::inbound::SESSION_NEVER_EXPIRES`] keeps it until a clean start.
    pub session_expiry: u32,
    /// QoS 1/2 messages the client takes unacknowledged at once (MQTT 5 receive maximum).
    pub receive_maximum: u16,
    /// The largest packet the client accepts; `None`: no limit.
    pub max_packet_size: Option<u32>,
    pub keep_alive_secs: u16,
    pub will: Option<Message>,
    /// Seconds to wait before publishing the will (MQTT 5 will delay interval).
    pub will_delay: u32,
    pub username: Option<String>,
    pub peer: Option<std::net::SocketAddr>,
    /// The ACL rules for this client (`None`: no ACL configured, everything allowed). The
    /// router checks read access with them for every message it delivers.
    pub acl: Option<Arc<ClientAcl>>,
}

/// What an operator asks of the dead-letter store (`waystation dlq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// Send these dead letters through the ingest pipeline again (after a config fix).
    Replay(Vec<u64>),
    /// Delete them.
    Purge(Vec<u64>),
}

/// The router's answer; `durable` fires once its writes are on disk.
#[derive(Debug)]
pub struct DeadLetterOutcome {
    /// Replayed and now logged for forwarding.
    pub replayed: usize,
    /// Replayed and refused again: a new dead letter replaces the old one.
    pub refused_again: usize,
    pub purged: usize,
    /// Not replayed, and kept: no bridge forwards its topic now, or the store refuses it.
    pub kept: usize,
    /// Ids not (or no longer) stored.
    pub missing: usize,
    pub durable: oneshot::Receiver<()>,
}

/// Commands from connections and bridges to the router.
#[derive(Debug)]
pub enum RouterCmd {
    DeadLetters {
        action: DeadLetterAction,
        reply: oneshot::Sender<DeadLetterOutcome>,
    },
    Connect {
        conn: ConnId,
        /// Boxed: once per connection, and at 168 bytes it would make every command (and
        /// every connection's room for one on its way to the router) that large.
        request: Box<ConnectRequest>,
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
        reason: PublishRefusal,
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
    /// `session_expiry`: a new interval the MQTT 5 DISCONNECT set. `tell`: why the broker
    /// ended it, sent to an MQTT 5 client in a DISCONNECT (behind its CONNACK).
    Disconnected {
        conn: ConnId,
        graceful: bool,
        session_expiry: Option<u32>,
        tell: Option<CloseReason>,
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
