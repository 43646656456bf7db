//! The MQTT 5.0 adapter: bytes to the neutral `inbound` types and `Outbound` back to bytes.
//!
//! Packets are decoded and encoded by `rmqtt-codec` (chosen by measurement over rumqttc's
//! v5 codec: bench/codec/README.md). This file adds what a server needs around it: framing
//! by the whole packet length (`frame`), the fixed-header flag checks, the topic aliases a
//! client sets (they belong to one connection, so they are resolved here and nothing above
//! sees an alias), the conversions, and the CONNACK properties that tell a client what this
//! broker offers.
//!
//! No reason string or user property is ever sent on an acknowledgement, so a client's
//! Request Problem Information 0 is honoured by construction [MQTT-3.1.2-29].
//!
//! What the codec already rejects as malformed, and this adapter relies on: unknown or
//! duplicate properties, a property length past the packet, topic alias 0, subscription
//! identifier 0, receive maximum 0, a CONNECT reserved flag, binary topics that are not UTF-8.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::BytesMut;
use bytestring::ByteString;
use rmqtt_codec::error::{DecodeError as CodecDecodeError, EncodeError as CodecEncodeError};
use rmqtt_codec::types::Publish as CodecPublish;
use rmqtt_codec::v5;
use tokio_util::codec::{Decoder as _, Encoder as _};

use crate::protocol::frame;
use crate::protocol::inbound::{
    Connect, DecodeError, Disconnect, Inbound, Publish, Subscribe, Unsubscribe, Version,
};
use crate::protocol::message::{
    CloseReason, ConnectOutcome, Message, MessageProperties, Outbound, PublishRefusal, QoS,
    SubscribeRefusal, SubscriptionOptions,
};
use crate::time::unix_ms;

/// How many topic aliases a client may set on one connection (CONNACK Topic Alias
/// Maximum). Each costs the topic's bytes for the connection's life, so a small number:
/// a sensor publishes to a handful of topics.
pub const TOPIC_ALIAS_MAXIMUM: u16 = 16;

/// One MQTT 5 connection's decoding state: the codec and the topic aliases its client set.
#[derive(Debug)]
pub struct V5Decoder {
    codec: v5::Codec,
    /// Alias `n` at index `n - 1`; grows only as far as the client's highest alias.
    aliases: Vec<Option<Arc<str>>>,
}

impl V5Decoder {
    pub fn new() -> V5Decoder {
        V5Decoder {
            // Size is checked on the whole packet before the codec sees it (`frame`).
            codec: v5::Codec::new(0, 0),
            aliases: Vec::new(),
        }
    }

    /// Decodes the next whole packet from `buf` (consuming it), or returns `Incomplete`
    /// leaving `buf` as it was.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_packet_size: usize,
    ) -> Result<Inbound, DecodeError> {
        let len = frame::packet_len(buf, max_packet_size)?;
        frame::check_flags(buf[0])?;
        if buf.len() < len {
            return Err(DecodeError::Incomplete);
        }
        let mut packet_bytes = buf.split_to(len);
        let packet = match self.codec.decode(&mut packet_bytes) {
            Ok(Some((packet, _))) => packet,
            Ok(None) => return Err(DecodeError::Malformed("truncated packet".into())),
            Err(CodecDecodeError::InvalidClientId) => return Err(DecodeError::ClientIdRejected),
            Err(CodecDecodeError::UnsupportedProtocolLevel) => {
                return Err(DecodeError::UnsupportedProtocol(0))
            }
            Err(e) => return Err(DecodeError::Malformed(e.to_string())),
        };
        self.convert(packet)
    }

    fn convert(&mut self, packet: v5::Packet) -> Result<Inbound, DecodeError> {
        Ok(match packet {
            v5::Packet::Connect(c) => Inbound::Connect(connect_from_v5(*c)),
            v5::Packet::Publish(p) => Inbound::Publish(self.publish_from_v5(*p)?),
            v5::Packet::PublishAck(a) => Inbound::PubAck(a.packet_id.get()),
            v5::Packet::PublishReceived(a) => Inbound::PubRec(a.packet_id.get()),
            v5::Packet::PublishRelease(a) => Inbound::PubRel(a.packet_id.get()),
            v5::Packet::PublishComplete(a) => Inbound::PubComp(a.packet_id.get()),
            v5::Packet::Subscribe(s) => Inbound::Subscribe(Subscribe {
                pkid: s.packet_id.get(),
                filters: s
                    .topic_filters
                    .into_iter()
                    .map(|(filter, o)| {
                        (
                            filter.to_string(),
                            SubscriptionOptions {
                                qos: qos_from_v5(o.qos),
                                no_local: o.no_local,
                                retain_as_published: o.retain_as_published,
                                retain_handling: o.retain_handling as u8,
                                subscription_id: s.id.map(NonZeroU32::get),
                            },
                        )
                    })
                    .collect(),
            }),
            v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe(Unsubscribe {
                pkid: u.packet_id.get(),
                filters: u.topic_filters.into_iter().map(|f| f.to_string()).collect(),
            }),
            v5::Packet::PingRequest => Inbound::PingReq,
            v5::Packet::Disconnect(d) => Inbound::Disconnect(Disconnect {
                publish_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
                session_expiry: d.session_expiry_interval_secs,
            }),
            // No authentication method is offered (a CONNECT naming one is refused), so an
            // AUTH can only be a protocol error [MQTT-4.12.0-1].
            v5::Packet::Auth(_) => {
                return Err(DecodeError::Violation(
                    "AUTH without an authentication method",
                ))
            }
            v5::Packet::ConnectAck(_)
            | v5::Packet::SubscribeAck(_)
            | v5::Packet::UnsubscribeAck(_)
            | v5::Packet::PingResponse => {
                return Err(DecodeError::Violation("client sent a server-only packet"))
            }
        })
    }

    fn publish_from_v5(&mut self, p: CodecPublish) -> Result<Publish, DecodeError> {
        let props = p.properties.unwrap_or_default();
        if !props.subscription_ids.is_empty() {
            // [MQTT-3.3.4-6]: only the server sends subscription identifiers.
            return Err(DecodeError::Violation(
                "PUBLISH from a client with a subscription identifier",
            ));
        }
        let topic: Arc<str> = match props.topic_alias {
            None => Arc::from(&*p.topic),
            Some(alias) => {
                let alias = usize::from(alias.get());
                if alias > usize::from(TOPIC_ALIAS_MAXIMUM) {
                    return Err(DecodeError::TopicAliasInvalid(
                        "above the topic alias maximum",
                    ));
                }
                if p.topic.is_empty() {
                    match self.aliases.get(alias - 1).and_then(Option::as_ref) {
                        Some(topic) => topic.clone(),
                        None => {
                            return Err(DecodeError::Violation(
                                "PUBLISH with an empty topic and an alias not set",
                            ))
                        }
                    }
                } else {
                    let topic: Arc<str> = Arc::from(&*p.topic);
                    if self.aliases.len() < alias {
                        self.aliases.resize(alias, None);
                    }
                    self.aliases[alias - 1] = Some(topic.clone());
                    topic
                }
            }
        };
        let properties = properties_from_v5(props, true);
        Ok(Publish {
            pkid: p.packet_id.map_or(0, NonZeroU16::get),
            dup: p.dup,
            message: Message {
                topic,
                payload: p.payload,
                qos: qos_from_v5(p.qos),
                retain: p.retain,
                properties,
            },
        })
    }
}

fn qos_from_v5(qos: v5::QoS) -> QoS {
    match qos {
        v5::QoS::AtMostOnce => QoS::AtMostOnce,
        v5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v5(qos: QoS) -> v5::QoS {
    match qos {
        QoS::AtMostOnce => v5::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5::QoS::ExactlyOnce,
    }
}

fn connect_from_v5(c: v5::Connect) -> Connect {
    let will_delay = c
        .last_will
        .as_ref()
        .and_then(|w| w.will_delay_interval_sec)
        .unwrap_or(0);
    Connect {
        version: Version::V5,
        client_id: c.client_id.to_string(),
        clean_session: c.clean_start,
        session_expiry: c.session_expiry_interval_secs,
        receive_maximum: c.receive_max.map_or(u16::MAX, NonZeroU16::get),
        max_packet_size: c.max_packet_size.map(NonZeroU32::get),
        auth_method: c.auth_method.map(|m| m.to_string()),
        keep_alive: c.keep_alive,
        username: c.username.map(|u| u.to_string()),
        password: c.password.map(|p| p.to_vec()).unwrap_or_default(),
        will: c.last_will.map(will_from_v5),
        will_delay,
    }
}

fn will_from_v5(w: v5::LastWill) -> Message {
    let props = v5::PublishProperties {
        is_utf8_payload: w.is_utf8_payload.unwrap_or(false),
        message_expiry_interval: w.message_expiry_interval,
        content_type: w.content_type,
        response_topic: w.response_topic,
        correlation_data: w.correlation_data,
        user_properties: w.user_properties,
        ..v5::PublishProperties::default()
    };
    Message {
        topic: Arc::from(&*w.topic),
        payload: w.message,
        qos: qos_from_v5(w.qos),
        retain: w.retain,
        // A will's expiry counts from when it is published, not from the CONNECT.
        properties: properties_from_v5(props, false),
    }
}

/// The application-message properties of a PUBLISH (or will); `None` when it has none, so
/// the message is stored and forwarded exactly like a 3.1.1 one. `received_now`: the expiry
/// clock starts now.
pub(crate) fn properties_from_v5(
    props: v5::PublishProperties,
    received_now: bool,
) -> Option<Arc<MessageProperties>> {
    let properties = MessageProperties {
        payload_format_indicator: props.is_utf8_payload.then_some(1),
        message_expiry_interval: props.message_expiry_interval.map(NonZeroU32::get),
        content_type: props.content_type.map(|s| s.to_string()),
        response_topic: props.response_topic.map(|s| s.to_string()),
        correlation_data: props.correlation_data,
        user_properties: props
            .user_properties
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        // A client never sends them (refused before this, [MQTT-3.3.4-6]).
        subscription_ids: Vec::new(),
        expires_at_ms: props
            .message_expiry_interval
            .filter(|_| received_now)
            .map(|secs| unix_ms() + u64::from(secs.get()) * 1000),
    };
    (properties != MessageProperties::default()).then(|| Arc::new(properties))
}

/// What the CONNACK of an accepted MQTT 5 client says beside "success".
#[derive(Debug, Clone, Default)]
pub struct ConnAckInfo {
    /// The id the broker gave a client that sent an empty one [MQTT-3.2.2-16].
    pub assigned_client_id: Option<Arc<str>>,
    /// `max_packet_size`: the largest packet the broker takes.
    pub max_packet_size: u32,
    /// The session expiry the broker uses, when it differs from what the client asked.
    pub session_expiry: Option<u32>,
}

/// Why an `Outbound` could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Larger than the client's Maximum Packet Size: not sent [MQTT-3.1.2-24].
    #[error("packet of {size} bytes exceeds the client's maximum packet size {max}")]
    TooLarge { size: u32, max: u32 },
    #[error("{0}")]
    Codec(String),
}

/// One MQTT 5 connection's encoding state.
#[derive(Debug)]
pub struct V5Encoder {
    codec: v5::Codec,
    connack: ConnAckInfo,
}

impl V5Encoder {
    /// `client_max_packet_size`: what the client's CONNECT allows (`None`: no limit).
    pub fn new(connack: ConnAckInfo, client_max_packet_size: Option<u32>) -> V5Encoder {
        let mut codec = v5::Codec::new(0, 0);
        if let Some(max) = client_max_packet_size {
            codec.set_max_outbound_size(max);
        }
        V5Encoder { codec, connack }
    }

    /// Appends the encoding of `packet` to `buf`; `Close` encodes as a DISCONNECT.
    pub fn encode(&mut self, packet: &Outbound, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let packet = match packet {
            Outbound::ConnAck(outcome) => v5::Packet::ConnectAck(Box::new(self.connack(*outcome))),
            Outbound::Publish { pkid, message, dup } => {
                v5::Packet::Publish(Box::new(publish_to_v5(*pkid, message, *dup)))
            }
            Outbound::PubAck(pkid) => {
                v5::Packet::PublishAck(ack(*pkid, v5::PublishAckReason::Success))
            }
            Outbound::PubRec(pkid) => {
                v5::Packet::PublishReceived(ack(*pkid, v5::PublishAckReason::Success))
            }
            Outbound::PubRefused { pkid, qos, reason } => {
                let reason = match reason {
                    PublishRefusal::NotAuthorized => v5::PublishAckReason::NotAuthorized,
                    PublishRefusal::TopicNameInvalid => v5::PublishAckReason::TopicNameInvalid,
                    PublishRefusal::PayloadFormatInvalid => {
                        v5::PublishAckReason::PayloadFormatInvalid
                    }
                };
                match qos {
                    QoS::AtMostOnce => return Ok(()),
                    QoS::AtLeastOnce => v5::Packet::PublishAck(ack(*pkid, reason)),
                    QoS::ExactlyOnce => v5::Packet::PublishReceived(ack(*pkid, reason)),
                }
            }
            Outbound::PubAckNoSubscribers { pkid, qos } => {
                let reason = v5::PublishAckReason::NoMatchingSubscribers;
                match qos {
                    QoS::AtMostOnce => return Ok(()),
                    QoS::AtLeastOnce => v5::Packet::PublishAck(ack(*pkid, reason)),
                    QoS::ExactlyOnce => v5::Packet::PublishReceived(ack(*pkid, reason)),
                }
            }
            Outbound::PubRel(pkid) => v5::Packet::PublishRelease(ack2(*pkid)),
            Outbound::PubComp(pkid) => v5::Packet::PublishComplete(ack2(*pkid)),
            Outbound::SubAck { pkid, granted } => v5::Packet::SubscribeAck(v5::SubscribeAck {
                packet_id: packet_id(*pkid)?,
                properties: Vec::new(),
                reason_string: None,
                status: granted.iter().map(|g| suback_reason(*g)).collect(),
            }),
            Outbound::UnsubAck { pkid, existed } => {
                v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                    packet_id: packet_id(*pkid)?,
                    properties: Vec::new(),
                    reason_string: None,
                    status: existed
                        .iter()
                        .map(|e| {
                            if *e {
                                v5::UnsubscribeAckReason::Success
                            } else {
                                v5::UnsubscribeAckReason::NoSubscriptionExisted
                            }
                        })
                        .collect(),
                })
            }
            Outbound::PingResp => v5::Packet::PingResponse,
            Outbound::Close(reason) => v5::Packet::Disconnect(v5::Disconnect {
                reason_code: disconnect_reason(*reason).0,
                session_expiry_interval_secs: None,
                server_reference: None,
                // Allowed on DISCONNECT whatever the client asked [MQTT-3.1.2-29].
                reason_string: Some(ByteString::from_static(disconnect_reason(*reason).1)),
                user_properties: Vec::new(),
            }),
        };
        self.codec.encode(packet, buf).map_err(|e| match e {
            CodecEncodeError::OverMaxPacketSize { size, max } => {
                EncodeError::TooLarge { size, max }
            }
            other => EncodeError::Codec(other.to_string()),
        })
    }

    fn connack(&self, outcome: ConnectOutcome) -> v5::ConnectAck {
        // A reason string is allowed on CONNACK whatever the client asked [MQTT-3.1.2-29]:
        // a device (or the person reading its log) learns why.
        let refused = |reason_code, why: &'static str| v5::ConnectAck {
            reason_code,
            reason_string: Some(ByteString::from_static(why)),
            ..v5::ConnectAck::default()
        };
        match outcome {
            ConnectOutcome::Accepted { session_present } => v5::ConnectAck {
                session_present,
                reason_code: v5::ConnectAckReason::Success,
                session_expiry_interval_secs: self.connack.session_expiry,
                max_packet_size: Some(self.connack.max_packet_size),
                assigned_client_id: self
                    .connack
                    .assigned_client_id
                    .as_deref()
                    .map(ByteString::from),
                topic_alias_max: TOPIC_ALIAS_MAXIMUM,
                ..v5::ConnectAck::default()
            },
            ConnectOutcome::UnacceptableProtocol => refused(
                v5::ConnectAckReason::UnsupportedProtocolVersion,
                "protocol level not supported: use 4 (MQTT 3.1.1) or 5",
            ),
            ConnectOutcome::IdentifierRejected => refused(
                v5::ConnectAckReason::ClientIdentifierNotValid,
                "empty client id without clean start, or too long for a stored session",
            ),
            ConnectOutcome::ServerUnavailable => refused(
                v5::ConnectAckReason::ServerUnavailable,
                "server unavailable",
            ),
            ConnectOutcome::BadCredentials => refused(
                v5::ConnectAckReason::BadUserNameOrPassword,
                "bad user name or password",
            ),
            ConnectOutcome::NotAuthorized => refused(
                v5::ConnectAckReason::NotAuthorized,
                "not authorized: anonymous clients are not allowed",
            ),
            ConnectOutcome::BadAuthenticationMethod => refused(
                v5::ConnectAckReason::BadAuthenticationMethod,
                "enhanced authentication is not offered: use a user name and password",
            ),
        }
    }
}

fn packet_id(pkid: u16) -> Result<NonZeroU16, EncodeError> {
    NonZeroU16::new(pkid).ok_or_else(|| EncodeError::Codec("packet identifier 0".into()))
}

fn ack(pkid: u16, reason_code: v5::PublishAckReason) -> v5::PublishAck {
    v5::PublishAck {
        // A 0 here is a broker bug; 1 keeps the encoder total (the client ignores it).
        packet_id: NonZeroU16::new(pkid).unwrap_or(NonZeroU16::MIN),
        reason_code,
        properties: Vec::new(),
        reason_string: None,
    }
}

fn ack2(pkid: u16) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id: NonZeroU16::new(pkid).unwrap_or(NonZeroU16::MIN),
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

fn suback_reason(granted: Result<QoS, SubscribeRefusal>) -> v5::SubscribeAckReason {
    match granted {
        Ok(QoS::AtMostOnce) => v5::SubscribeAckReason::GrantedQos0,
        Ok(QoS::AtLeastOnce) => v5::SubscribeAckReason::GrantedQos1,
        Ok(QoS::ExactlyOnce) => v5::SubscribeAckReason::GrantedQos2,
        Err(SubscribeRefusal::Unspecified) => v5::SubscribeAckReason::UnspecifiedError,
        Err(SubscribeRefusal::NotAuthorized) => v5::SubscribeAckReason::NotAuthorized,
        Err(SubscribeRefusal::TopicFilterInvalid) => v5::SubscribeAckReason::TopicFilterInvalid,
        Err(SubscribeRefusal::QuotaExceeded) => v5::SubscribeAckReason::QuotaExceeded,
        Err(SubscribeRefusal::SharedSubscriptionsNotSupported) => {
            v5::SubscribeAckReason::SharedSubscriptionNotSupported
        }
    }
}

/// The DISCONNECT reason code for `reason`, and the reason string sent with it.
fn disconnect_reason(reason: CloseReason) -> (v5::DisconnectReasonCode, &'static str) {
    use v5::DisconnectReasonCode as Code;
    match reason {
        CloseReason::Unspecified => (Code::UnspecifiedError, "closed by the server"),
        CloseReason::MalformedPacket => (Code::MalformedPacket, "malformed packet"),
        CloseReason::ProtocolError => (Code::ProtocolError, "protocol error"),
        CloseReason::NotAuthorized => (Code::NotAuthorized, "not authorized"),
        CloseReason::ServerShuttingDown => (Code::ServerShuttingDown, "server shutting down"),
        CloseReason::KeepAliveTimeout => (
            Code::KeepAliveTimeout,
            "nothing received within 1.5 times the keep-alive",
        ),
        CloseReason::SessionTakenOver => (
            Code::SessionTakenOver,
            "another connection took this client id",
        ),
        CloseReason::ReceiveMaximumExceeded => {
            (Code::ReceiveMaximumExceeded, "receive maximum exceeded")
        }
        CloseReason::TopicAliasInvalid => (
            Code::TopicAliasInvalid,
            "topic alias 0 or above the topic alias maximum",
        ),
        CloseReason::PacketTooLarge => (Code::PacketTooLarge, "packet over max_packet_size"),
        CloseReason::QuotaExceeded => (Code::QuotaExceeded, "publish rate over max_publish_rate"),
    }
}

/// An application message as one MQTT 5 subscriber receives it: the message expiry
/// interval counted down to what is left [MQTT-3.3.2-6].
pub(crate) fn publish_to_v5(pkid: u16, message: &Message, dup: bool) -> CodecPublish {
    let properties = message
        .properties
        .as_deref()
        .map(|p| v5::PublishProperties {
            topic_alias: None,
            correlation_data: p.correlation_data.clone(),
            // Expired messages are dropped before they are queued for a client; one that
            // expires between the queue and the socket goes out with 1 s left.
            message_expiry_interval: p
                .remaining_expiry_secs(unix_ms())
                .map(|s| NonZeroU32::new(s).unwrap_or(NonZeroU32::MIN)),
            content_type: p.content_type.as_deref().map(ByteString::from),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
                .collect(),
            is_utf8_payload: p.payload_format_indicator == Some(1),
            response_topic: p.response_topic.as_deref().map(ByteString::from),
            subscription_ids: p
                .subscription_ids
                .iter()
                .filter_map(|id| NonZeroU32::new(*id))
                .collect(),
        });
    CodecPublish {
        dup,
        retain: message.retain,
        qos: qos_to_v5(message.qos),
        topic: ByteString::from(&*message.topic),
        packet_id: NonZeroU16::new(pkid),
        payload: message.payload.clone(),
        properties,
    }
}

/// The encoded size of `message` as a PUBLISH to an MQTT 5 client (no topic alias), for
/// the client's maximum packet size before the message takes a packet id.
pub fn publish_len(message: &Message) -> usize {
    let mut props = 0usize;
    if let Some(p) = message.properties.as_deref() {
        props += p.payload_format_indicator.map_or(0, |_| 2);
        props += p.message_expiry_interval.map_or(0, |_| 5);
        props += p.content_type.as_ref().map_or(0, |s| 3 + s.len());
        props += p.response_topic.as_ref().map_or(0, |s| 3 + s.len());
        props += p.correlation_data.as_ref().map_or(0, |b| 3 + b.len());
        props += p
            .user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>();
        props += p
            .subscription_ids
            .iter()
            .map(|id| 1 + varint_len(*id as usize))
            .sum::<usize>();
    }
    let pkid = if message.qos == QoS::AtMostOnce { 0 } else { 2 };
    let remaining =
        2 + message.topic.len() + pkid + varint_len(props) + props + message.payload.len();
    1 + varint_len(remaining) + remaining
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[cfg(test)]
#[path = "v5_tests.rs"]
mod tests;
