//! Protocol-neutral message and request types.
//!
//! The router, the sessions and (later) the durable log speak only these types. Each wire
//! protocol is an adapter at the connection edge (`v4.rs` for MQTT 3.1.1) that turns its
//! packets into these and back, so an MQTT 5 adapter can be added beside it.

use std::sync::Arc;

use bytes::Bytes;

/// Quality of service, ordered so that `min`/`max` give the MQTT semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// An application message as the broker routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// What an MQTT 5 publisher attached to it; `None` for every MQTT 3.1.1 message. Shared:
    /// a message goes to many subscribers and queues.
    pub properties: Option<Arc<MessageProperties>>,
}

/// The MQTT 5 properties that belong to an application message (v5 section 3.3.2.3) rather
/// than to one packet: kept with the message on disk, forwarded upstream and delivered to
/// MQTT 5 subscribers unaltered (user properties in order) [MQTT-3.3.2-17, -18]; an MQTT
/// 3.1.1 subscriber gets the message without them. Topic aliases and subscription
/// identifiers belong to one connection and are not here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    /// 0: unspecified bytes, 1: UTF-8 text.
    pub payload_format_indicator: Option<u8>,
    /// Seconds the message lives, counted from when the broker received it.
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl Message {
    pub fn new(
        topic: impl Into<Arc<str>>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            properties: None,
        }
    }
}

/// One filter of a SUBSCRIBE; `None` when the filter is not valid (answered with a failure
/// return code rather than a dropped connection).
#[derive(Debug, Clone)]
pub struct SubscribeFilter {
    pub filter: String,
    pub requested: Option<QoS>,
}

/// The outcome of a CONNECT as the protocol adapters encode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    Accepted { session_present: bool },
    UnacceptableProtocol,
    IdentifierRejected,
    ServerUnavailable,
    BadCredentials,
    NotAuthorized,
}

/// What the broker sends to one client. The connection's writer encodes it.
#[derive(Debug, Clone)]
pub enum Outbound {
    ConnAck(ConnectOutcome),
    Publish {
        pkid: u16,
        message: Message,
        dup: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    /// Granted QoS per filter, `None` for a refused filter.
    SubAck {
        pkid: u16,
        granted: Vec<Option<QoS>>,
    },
    UnsubAck(u16),
    PingResp,
    /// Close the connection (session taken over, broker shutting down).
    Close,
}
