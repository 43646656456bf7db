//! The MQTT 5.0 adapter: bytes to the neutral `inbound` types (here) and `Outbound` back to
//! bytes (`encode`).
//!
//! Packets are decoded and encoded by `rmqtt-codec` (chosen by measurement over rumqttc's
//! v5 codec: bench/codec/README.md). This adds what a server needs around it: framing by the
//! whole packet length (`frame`), the fixed-header flag checks, the topic aliases a client
//! sets (they belong to one connection, so they are resolved here and nothing above sees an
//! alias), the conversions; `encode` adds the CONNACK properties that tell a client what this
//! broker offers, the client's maximum packet size and the aliases it takes from us.
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
use rmqtt_codec::error::DecodeError as CodecDecodeError;
use rmqtt_codec::types::Publish as CodecPublish;
use rmqtt_codec::v5;
use tokio_util::codec::Decoder as _;

use crate::protocol::frame;
use crate::protocol::inbound::{
    Connect, DecodeError, Disconnect, Inbound, Publish, Subscribe, Unsubscribe, Version,
};
use crate::protocol::message::{Message, MessageProperties, QoS, SubscriptionOptions};
use crate::protocol::topic_alias::TOPIC_ALIAS_MAXIMUM;
use crate::time::unix_ms;

mod encode;

pub(crate) use encode::publish_to_v5;
pub use encode::{publish_len, ConnAckInfo, V5Encoder};

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
        topic_alias_max: c.topic_alias_max,
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

#[cfg(test)]
mod tests;
