//! What a client sends, as every protocol adapter decodes it: the packets a server receives,
//! in neutral types (no codec's structs), and why decoding may end a connection. The
//! connection acts on these alone, so the MQTT 3.1.1 adapter (`v4`) and an MQTT 5 one decode
//! into the same thing and nothing above them knows which the client speaks.

use crate::protocol::message::{CloseReason, Message, SubscriptionOptions};

/// The protocol a client speaks, chosen by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// A decoded client packet.
#[derive(Debug)]
pub enum Inbound {
    Connect(Connect),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect(Disconnect),
}

/// A DISCONNECT. MQTT 3.1.1's has no content: no will, session expiry unchanged.
#[derive(Debug, Default)]
pub struct Disconnect {
    /// MQTT 5 reason code 0x04: the client ends normally but asks for its will.
    pub publish_will: bool,
    /// MQTT 5: a new session expiry interval for the session left behind.
    pub session_expiry: Option<u32>,
}

/// A CONNECT, framing and flags already checked by the adapter.
#[derive(Debug)]
pub struct Connect {
    pub version: Version,
    /// As sent: empty when the client left it to the server.
    pub client_id: String,
    /// 3.1.1 clean session, MQTT 5 clean start: discard any session left by this client id.
    pub clean_session: bool,
    /// Seconds the session outlives the connection: for 3.1.1, 0 with clean session and
    /// [`SESSION_NEVER_EXPIRES`] without.
    pub session_expiry: u32,
    /// How many QoS 1/2 PUBLISHes the client takes unacknowledged at once (MQTT 5 receive
    /// maximum; 65,535 when not limited).
    pub receive_maximum: u16,
    /// The largest packet the client accepts (MQTT 5 maximum packet size); `None`: no limit.
    pub max_packet_size: Option<u32>,
    /// How many topic aliases the client accepts from the broker (MQTT 5; 0: none).
    pub topic_alias_max: u16,
    /// MQTT 5 enhanced authentication method, when one is named (none is offered).
    pub auth_method: Option<String>,
    pub keep_alive: u16,
    pub username: Option<String>,
    /// Empty when none was sent. Bytes, not text: MQTT 5 passwords are binary data.
    pub password: Vec<u8>,
    /// The will as it would be published; its topic is not yet validated.
    pub will: Option<Message>,
    /// MQTT 5 will delay interval, seconds.
    pub will_delay: u32,
}

/// The session expiry interval that means "never" (MQTT 5 0xFFFFFFFF; a 3.1.1 persistent
/// session).
pub const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

#[derive(Debug)]
pub struct Publish {
    /// 0 for QoS 0.
    pub pkid: u16,
    pub dup: bool,
    /// Its topic is not yet validated (the connection checks it and its limits).
    pub message: Message,
}

#[derive(Debug)]
pub struct Subscribe {
    pub pkid: u16,
    /// Each filter as sent (not yet validated) with what it asks for (the MQTT 5
    /// subscription identifier, if any, in each filter's options).
    pub filters: Vec<(String, SubscriptionOptions)>,
}

#[derive(Debug)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed to frame the next packet.
    #[error("incomplete packet")]
    Incomplete,
    #[error("packet of {0} bytes exceeds max_packet_size")]
    TooLarge(usize),
    /// A CONNECT with a protocol level (or name) this adapter does not speak: answered
    /// with CONNACK 0x01 before closing [MQTT-3.1.2-2].
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    /// An MQTT 5 CONNECT whose client identifier the codec refuses (empty without clean
    /// start): CONNACK 0x85.
    #[error("client identifier not valid")]
    ClientIdRejected,
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    /// MQTT 5: a topic alias of 0, above the maximum, or not yet set.
    #[error("topic alias invalid: {0}")]
    TopicAliasInvalid(&'static str),
    /// The peer closed the connection (or it failed) before a whole packet arrived.
    #[error("connection closed")]
    Closed,
}

impl DecodeError {
    /// What an MQTT 5 client is told when this ends its connection.
    pub fn close_reason(&self) -> CloseReason {
        match self {
            DecodeError::TooLarge(_) => CloseReason::PacketTooLarge,
            DecodeError::Malformed(_) | DecodeError::Incomplete => CloseReason::MalformedPacket,
            DecodeError::TopicAliasInvalid(_) => CloseReason::TopicAliasInvalid,
            DecodeError::UnsupportedProtocol(_)
            | DecodeError::ClientIdRejected
            | DecodeError::Violation(_)
            | DecodeError::Closed => CloseReason::ProtocolError,
        }
    }
}
