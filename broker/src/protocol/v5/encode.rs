//! The MQTT 5 adapter's sending half: `Outbound` to bytes for one connection, with what that
//! connection agreed to at CONNECT (the client's maximum packet size, the topic aliases it
//! takes) and the CONNACK properties that tell it what this broker offers.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::BytesMut;
use bytestring::ByteString;
use rmqtt_codec::types::Publish as CodecPublish;
use rmqtt_codec::v5;
use tokio_util::codec::Encoder as _;

use crate::protocol::message::{
    CloseReason, ConnectOutcome, Message, Outbound, PublishRefusal, QoS, SubscribeRefusal,
};
use crate::protocol::topic_alias::{AliasUse, OutboundAliases, TOPIC_ALIAS_MAXIMUM};
use crate::time::unix_ms;

fn qos_to_v5(qos: QoS) -> v5::QoS {
    match qos {
        QoS::AtMostOnce => v5::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5::QoS::ExactlyOnce,
    }
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
    /// QoS 1/2 PUBLISHes the client may have unacknowledged (65535: not announced).
    pub receive_maximum: u16,
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
    /// The client's Maximum Packet Size, checked on the whole encoded packet (the codec's
    /// own check keeps 5 bytes in hand, which the router's exact check would not match).
    client_max_packet_size: Option<u32>,
    aliases: OutboundAliases,
}

impl V5Encoder {
    /// `client_max_packet_size`: what the client's CONNECT allows (`None`: no limit);
    /// `client_topic_alias_max`: how many topic aliases it takes from us.
    pub fn new(
        connack: ConnAckInfo,
        client_max_packet_size: Option<u32>,
        client_topic_alias_max: u16,
    ) -> V5Encoder {
        V5Encoder {
            codec: v5::Codec::new(0, 0),
            connack,
            client_max_packet_size,
            aliases: OutboundAliases::new(client_topic_alias_max),
        }
    }

    /// Appends the encoding of `packet` to `buf`; `Close` encodes as a DISCONNECT.
    pub fn encode(&mut self, packet: &Outbound, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let packet = match packet {
            Outbound::ConnAck(outcome) => v5::Packet::ConnectAck(Box::new(self.connack(*outcome))),
            Outbound::Publish { pkid, message, dup } => {
                let alias = self.aliases.choose(&message.topic);
                let encoded = self.write(publish_to_v5(*pkid, message, *dup, alias), buf);
                let used = match encoded {
                    // Setting an alias adds 3 bytes the router's size check did not count:
                    // without it the packet fits.
                    Err(EncodeError::TooLarge { .. }) if matches!(alias, AliasUse::Set(_)) => {
                        self.write(publish_to_v5(*pkid, message, *dup, AliasUse::None), buf)?;
                        AliasUse::None
                    }
                    other => {
                        other?;
                        alias
                    }
                };
                self.aliases.sent(&message.topic, used);
                return Ok(());
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
        self.write(packet, buf)
    }

    /// Encodes one packet, or nothing if it is larger than the client accepts.
    fn write(
        &mut self,
        packet: impl Into<v5::Packet>,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let start = buf.len();
        self.codec
            .encode(packet.into(), buf)
            .map_err(|e| EncodeError::Codec(e.to_string()))?;
        let size = buf.len() - start;
        match self.client_max_packet_size {
            Some(max) if size > max as usize => {
                buf.truncate(start);
                Err(EncodeError::TooLarge {
                    size: size as u32,
                    max,
                })
            }
            _ => Ok(()),
        }
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
                receive_max: NonZeroU16::new(self.connack.receive_maximum)
                    .unwrap_or(NonZeroU16::MAX),
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
pub(crate) fn publish_to_v5(
    pkid: u16,
    message: &Message,
    dup: bool,
    alias: AliasUse,
) -> CodecPublish {
    let topic_alias = match alias {
        AliasUse::None => None,
        AliasUse::Set(a) | AliasUse::Reuse(a) => NonZeroU16::new(a),
    };
    let mut properties = message
        .properties
        .as_deref()
        .map(|p| v5::PublishProperties {
            topic_alias,
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
    if properties.is_none() && topic_alias.is_some() {
        properties = Some(v5::PublishProperties {
            topic_alias,
            ..v5::PublishProperties::default()
        });
    }
    CodecPublish {
        dup,
        retain: message.retain,
        qos: qos_to_v5(message.qos),
        topic: match alias {
            AliasUse::Reuse(_) => ByteString::new(),
            _ => ByteString::from(&*message.topic),
        },
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
