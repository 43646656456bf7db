//! What a client sends, as every protocol adapter decodes it: the packets a server receives,
//! in neutral types (no codec's structs), and why decoding may end a connection. The
//! connection acts on these alone, so the MQTT 3.1.1 adapter (`v4`) and an MQTT 5 one decode
//! into the same thing and nothing above them knows which the client speaks.

use crate::protocol::message::{Message, QoS};

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
    Disconnect,
}

/// A CONNECT, framing and flags already checked by the adapter.
#[derive(Debug)]
pub struct Connect {
    /// As sent: empty when the client left it to the server.
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    /// Empty when none was sent. Bytes, not text: MQTT 5 passwords are binary data.
    pub password: Vec<u8>,
    /// The will as it would be published; its topic is not yet validated.
    pub will: Option<Message>,
}

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
    /// Each filter as sent (not yet validated) with the QoS it asks for.
    pub filters: Vec<(String, QoS)>,
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
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    /// The peer closed the connection (or it failed) before a whole packet arrived.
    #[error("connection closed")]
    Closed,
}
