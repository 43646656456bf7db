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
    /// The subscription identifiers of the subscriptions that matched, for one subscriber:
    /// set by the router on that subscriber's copy (stored with it in its queue), never
    /// by a publisher and never forwarded upstream.
    pub subscription_ids: Vec<u32>,
    /// When the message expires (unix ms), from `message_expiry_interval` and the time the
    /// broker received it. Not stored: the record keeps the interval and `received_at_ms`,
    /// and reading it back sets this again (`persist::from_stored`).
    pub expires_at_ms: Option<u64>,
}

impl MessageProperties {
    /// Seconds left to live at `now_ms`, rounded up: `None` without an expiry, `Some(0)`
    /// once expired (never delivered nor forwarded then [MQTT-3.3.2-5]).
    pub fn remaining_expiry_secs(&self, now_ms: u64) -> Option<u32> {
        let at = self.expires_at_ms?;
        Some(
            at.saturating_sub(now_ms)
                .div_ceil(1000)
                .min(u64::from(u32::MAX)) as u32,
        )
    }
}

impl Message {
    /// Whether the message's expiry interval has passed at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.properties
            .as_ref()
            .and_then(|p| p.remaining_expiry_secs(now_ms))
            == Some(0)
    }

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

/// What a subscriber asked of one filter. MQTT 3.1.1 has only the QoS; the rest are the
/// MQTT 5 subscription options (v5 3.8.3.1), at their 3.1.1 meaning by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    /// Never send this subscriber what its own connection published.
    pub no_local: bool,
    /// Keep the RETAIN flag of a live message as published (3.1.1 clears it).
    pub retain_as_published: bool,
    /// 0: retained messages at every subscribe, 1: only for a new subscription, 2: never.
    pub retain_handling: u8,
    /// MQTT 5 subscription identifier, sent back with every message this subscription
    /// matches.
    pub subscription_id: Option<u32>,
}

impl SubscriptionOptions {
    /// A 3.1.1 subscription: only the QoS.
    pub fn qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }
}

impl From<QoS> for SubscriptionOptions {
    fn from(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions::qos(qos)
    }
}

impl SubscriptionOptions {
    /// The MQTT 5 subscription options byte (3.1.1: the requested QoS byte); the session
    /// record stores it (and the identifier apart).
    pub fn to_byte(self) -> u8 {
        self.qos as u8
            | u8::from(self.no_local) << 2
            | u8::from(self.retain_as_published) << 3
            | (self.retain_handling & 0b11) << 4
    }

    /// `None` for reserved bits, QoS 3 or retain handling 3.
    pub fn from_byte(byte: u8) -> Option<SubscriptionOptions> {
        if byte & 0b1100_0000 != 0 || (byte >> 4) & 0b11 == 3 {
            return None;
        }
        Some(SubscriptionOptions {
            qos: QoS::from_u8(byte & 0b11)?,
            no_local: byte & 0b100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling: (byte >> 4) & 0b11,
            subscription_id: None,
        })
    }
}

/// Why a filter of a SUBSCRIBE was refused: one SUBACK failure code in 3.1.1 (0x80), the
/// reason code named here in MQTT 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRefusal {
    /// 0x80: the session record is full, or anything else.
    Unspecified,
    /// 0x87: the ACL gives no read access.
    NotAuthorized,
    /// 0x8F: not a valid filter, or over max_topic_length/max_topic_levels.
    TopicFilterInvalid,
    /// 0x97: max_subscriptions reached.
    QuotaExceeded,
    /// 0x9E: `$share/...` (shared subscriptions are not offered).
    SharedSubscriptionsNotSupported,
}

/// One filter of a SUBSCRIBE; a refused filter is answered with a failure code rather than
/// a dropped connection.
#[derive(Debug, Clone)]
pub struct SubscribeFilter {
    pub filter: String,
    pub requested: Result<SubscriptionOptions, SubscribeRefusal>,
}

/// The outcome of a CONNECT as the protocol adapters encode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    Accepted {
        session_present: bool,
    },
    UnacceptableProtocol,
    IdentifierRejected,
    ServerUnavailable,
    BadCredentials,
    NotAuthorized,
    /// MQTT 5 enhanced authentication asked for: none is offered (0x8C).
    BadAuthenticationMethod,
}

/// Why the broker refused a PUBLISH it acknowledges anyway: MQTT 3.1.1 has no negative
/// acknowledgement (a plain PUBACK/PUBREC goes out); MQTT 5 sends the reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRefusal {
    /// 0x87: no write access under the ACL.
    NotAuthorized,
    /// 0x90: over max_topic_length/max_topic_levels.
    TopicNameInvalid,
    /// 0x99: payload format indicator 1 and the payload is not UTF-8.
    PayloadFormatInvalid,
}

/// Why the broker closes a connection: an MQTT 5 client is sent a DISCONNECT with the
/// matching reason code first; a 3.1.1 client just sees the close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 0x80
    Unspecified,
    /// 0x81
    MalformedPacket,
    /// 0x82
    ProtocolError,
    /// 0x87
    NotAuthorized,
    /// 0x8B
    ServerShuttingDown,
    /// 0x8D
    KeepAliveTimeout,
    /// 0x8E
    SessionTakenOver,
    /// 0x93
    ReceiveMaximumExceeded,
    /// 0x94
    TopicAliasInvalid,
    /// 0x95
    PacketTooLarge,
    /// 0x97: a rate limit (max_publish_rate).
    QuotaExceeded,
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
    /// The PUBACK (QoS 1) or PUBREC (QoS 2) of a PUBLISH accepted that no subscription or
    /// bridge takes (MQTT 5 reason 0x10).
    PubAckNoSubscribers {
        pkid: u16,
        qos: QoS,
    },
    /// The PUBACK (QoS 1) or PUBREC (QoS 2) of a PUBLISH the broker refused.
    PubRefused {
        pkid: u16,
        qos: QoS,
        reason: PublishRefusal,
    },
    PubRel(u16),
    PubComp(u16),
    /// Granted QoS per filter, or why it was refused.
    SubAck {
        pkid: u16,
        granted: Vec<Result<QoS, SubscribeRefusal>>,
    },
    /// Whether each filter was subscribed (MQTT 5 reason 0x11 for one that was not).
    UnsubAck {
        pkid: u16,
        existed: Vec<bool>,
    },
    PingResp,
    /// Close the connection (session taken over, broker shutting down, a bad packet),
    /// telling an MQTT 5 client why.
    Close(CloseReason),
}
