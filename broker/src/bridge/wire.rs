//! The two MQTT versions a bridge speaks upstream, behind one small interface: `protocol = 4`
//! (3.1.1, on rumqttc's `mqttbytes::v4`) or `protocol = 5` (on rmqtt-codec, the codec of the
//! broker's own MQTT 5 listener side, `crate::protocol::v5`).
//!
//! The link and the session deal only in what is here: [`ConnectOptions`] to build a
//! CONNECT, [`Incoming`] for every packet an upstream sends (the CONNACK's limits read into
//! [`UpstreamLimits`]), and an [`Encoder`] for what goes up. The encoder of an MQTT 5
//! connection owns its topic aliases (`aliases.rs`) and knows the upstream's maximum
//! packet size: a PUBLISH over it is not written ([`Encoded::TooLarge`]).

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::v5;
use rumqttc::mqttbytes::{self, v4, QoS as WireQoS};
use tokio_util::codec::{Decoder as _, Encoder as _};

use super::aliases::{AliasUse, TopicAliases};
use crate::protocol::message::{Message, MessageProperties, QoS};
use crate::protocol::v5::{properties_from_v5, publish_to_v5};

/// The bridge's largest packet from the upstream (the log's records are smaller); sent as
/// the CONNECT's Maximum Packet Size to an MQTT 5 upstream.
pub const MAX_INCOMING_PACKET: usize = 256 * 1024;

/// What a CONNECT says, whichever the version.
#[derive(Clone)]
pub struct ConnectOptions {
    /// 4 (MQTT 3.1.1) or 5.
    pub protocol: u8,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean_session: bool,
    /// MQTT 5 Session Expiry Interval (seconds; `u32::MAX`: never).
    pub session_expiry: u32,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// What the upstream's CONNACK allows; an MQTT 3.1.1 upstream states none of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// QoS 1 PUBLISHes it takes unacknowledged at once (65,535 when unstated).
    pub receive_maximum: u16,
    /// Largest packet it takes, whole (None: no limit but the protocol's).
    pub max_packet_size: Option<u32>,
    pub topic_alias_maximum: u16,
    /// Server Keep Alive: the keep-alive to use instead of ours.
    pub server_keep_alive: Option<u16>,
    /// The session expiry it granted, when it differs from what we asked.
    pub session_expiry: Option<u32>,
}

impl Default for UpstreamLimits {
    fn default() -> UpstreamLimits {
        UpstreamLimits {
            receive_maximum: u16::MAX,
            max_packet_size: None,
            topic_alias_maximum: 0,
            server_keep_alive: None,
            session_expiry: None,
        }
    }
}

/// A message from the cloud (a PUBLISH on a subscribed topic).
#[derive(Debug)]
pub struct Command {
    pub pkid: u16,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 message properties, expiry counted from now; None from a 3.1.1 upstream.
    pub properties: Option<Arc<MessageProperties>>,
}

/// A packet from the upstream, whichever the version.
#[derive(Debug)]
pub enum Incoming {
    ConnAck {
        session_present: bool,
        /// Why it refused us (None: accepted).
        refused: Option<String>,
        limits: UpstreamLimits,
    },
    /// `refused`: an MQTT 5 reason code of 0x80 or above (the upstream will not take it).
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    Publish(Command),
    PubRel(u16),
    SubAck {
        pkid: u16,
        refused: bool,
    },
    PingResp,
    /// An MQTT 5 upstream closing the connection, and why.
    Disconnect(String),
    /// Anything else: not a packet a server sends a client.
    Unexpected(String),
}

/// Why bytes from the upstream could not be read, or a CONNECT not built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The upstream refused the connection in a way only the bytes show.
    Refused(String),
    /// Not MQTT we can read (or write).
    Protocol(String),
}

/// Frames packets off a byte buffer for one connection.
pub enum Decoder {
    V4,
    V5(v5::Codec),
}

impl Decoder {
    pub fn new(protocol: u8) -> Decoder {
        if protocol == 5 {
            Decoder::V5(v5::Codec::new(MAX_INCOMING_PACKET as u32, 0))
        } else {
            Decoder::V4
        }
    }

    /// One packet off the front of `buf`, if a whole one is there.
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
        match self {
            Decoder::V4 => match v4::Packet::read(buf, MAX_INCOMING_PACKET) {
                Ok(packet) => Ok(Some(from_v4(packet))),
                Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(WireError::Protocol(e.to_string())),
            },
            Decoder::V5(codec) => {
                // A 3.1.1-only server answers a level 5 CONNECT with a 3.1.1 CONNACK 0x01.
                if buf.starts_with(&[0x20, 0x02]) && buf.get(3) == Some(&1) {
                    return Err(WireError::Refused(
                        "unacceptable protocol version: the upstream does not speak MQTT 5 \
                         (set protocol = 4)"
                            .into(),
                    ));
                }
                match codec.decode(buf) {
                    Ok(Some((packet, _))) => Ok(Some(from_v5(packet))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(WireError::Protocol(e.to_string())),
                }
            }
        }
    }
}

fn qos_from_wire(qos: WireQoS) -> QoS {
    match qos {
        WireQoS::AtMostOnce => QoS::AtMostOnce,
        WireQoS::AtLeastOnce => QoS::AtLeastOnce,
        WireQoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn from_v4(packet: v4::Packet) -> Incoming {
    match packet {
        v4::Packet::ConnAck(ack) => Incoming::ConnAck {
            session_present: ack.session_present,
            refused: match ack.code {
                v4::ConnectReturnCode::Success => None,
                code => Some(format!("{code:?}")),
            },
            limits: UpstreamLimits::default(),
        },
        v4::Packet::PubAck(ack) => Incoming::PubAck {
            pkid: ack.pkid,
            refused: None,
        },
        v4::Packet::Publish(p) => Incoming::Publish(Command {
            pkid: p.pkid,
            qos: qos_from_wire(p.qos),
            retain: p.retain,
            topic: p.topic,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubRel(rel) => Incoming::PubRel(rel.pkid),
        v4::Packet::SubAck(ack) => Incoming::SubAck {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .any(|c| matches!(c, v4::SubscribeReasonCode::Failure)),
        },
        v4::Packet::PingResp => Incoming::PingResp,
        other => Incoming::Unexpected(format!("{other:?}")),
    }
}

fn from_v5(packet: v5::Packet) -> Incoming {
    match packet {
        v5::Packet::ConnectAck(ack) => Incoming::ConnAck {
            session_present: ack.session_present,
            refused: (ack.reason_code != v5::ConnectAckReason::Success).then(|| {
                let reason = ack.reason_string.as_deref().unwrap_or("");
                format!("{:?} {reason}", ack.reason_code)
                    .trim_end()
                    .to_string()
            }),
            limits: UpstreamLimits {
                receive_maximum: ack.receive_max.get(),
                max_packet_size: ack.max_packet_size,
                topic_alias_maximum: ack.topic_alias_max,
                server_keep_alive: ack.server_keepalive_sec,
                session_expiry: ack.session_expiry_interval_secs,
            },
        },
        v5::Packet::PublishAck(ack) => Incoming::PubAck {
            pkid: ack.packet_id.get(),
            refused: (u8::from(ack.reason_code) >= 0x80).then(|| {
                let reason = ack.reason_string.as_deref().unwrap_or("");
                format!("{:?} {reason}", ack.reason_code)
                    .trim_end()
                    .to_string()
            }),
        },
        v5::Packet::Publish(p) => Incoming::Publish(Command {
            pkid: p.packet_id.map_or(0, NonZeroU16::get),
            qos: match p.qos {
                v5::QoS::AtMostOnce => QoS::AtMostOnce,
                v5::QoS::AtLeastOnce => QoS::AtLeastOnce,
                v5::QoS::ExactlyOnce => QoS::ExactlyOnce,
            },
            retain: p.retain,
            topic: p.topic.to_string(),
            payload: p.payload,
            properties: p
                .properties
                .and_then(|props| properties_from_v5(props, true)),
        }),
        v5::Packet::PublishRelease(rel) => Incoming::PubRel(rel.packet_id.get()),
        v5::Packet::SubscribeAck(ack) => Incoming::SubAck {
            pkid: ack.packet_id.get(),
            refused: ack.status.iter().any(|s| u8::from(*s) >= 0x80),
        },
        v5::Packet::PingResponse => Incoming::PingResp,
        v5::Packet::Disconnect(d) => {
            let reason = d.reason_string.as_deref().unwrap_or("");
            Incoming::Disconnect(
                format!("{:?} {reason}", d.reason_code)
                    .trim_end()
                    .to_string(),
            )
        }
        other => Incoming::Unexpected(format!("{other:?}")),
    }
}

/// The CONNECT for `options`, encoded.
pub fn connect_frame(options: &ConnectOptions) -> Result<BytesMut, WireError> {
    let mut frame = BytesMut::new();
    let failed = |e: String| WireError::Protocol(format!("encoding CONNECT: {e}"));
    if options.protocol == 5 {
        let connect = v5::Connect {
            clean_start: options.clean_session,
            keep_alive: options.keep_alive,
            session_expiry_interval_secs: options.session_expiry,
            client_id: ByteString::from(options.client_id.as_str()),
            username: options.username.as_deref().map(ByteString::from),
            password: options
                .password
                .as_ref()
                .map(|p| Bytes::copy_from_slice(p.as_bytes())),
            max_packet_size: NonZeroU32::new(MAX_INCOMING_PACKET as u32),
            // No reason strings or user properties on acknowledgements: we only log them.
            request_problem_info: false,
            ..v5::Connect::default()
        };
        v5::Codec::new(0, 0)
            .encode(v5::Packet::Connect(Box::new(connect)), &mut frame)
            .map_err(|e| failed(e.to_string()))?;
    } else {
        let mut connect = v4::Connect::new(options.client_id.clone());
        connect.keep_alive = options.keep_alive;
        connect.clean_session = options.clean_session;
        if let Some(user) = &options.username {
            connect.set_login(user.clone(), options.password.as_deref().unwrap_or(""));
        }
        connect
            .write(&mut frame)
            .map_err(|e| failed(e.to_string()))?;
    }
    Ok(frame)
}

/// The DISCONNECT that ends a connection normally.
pub fn disconnect_frame(protocol: u8) -> Bytes {
    let mut frame = BytesMut::with_capacity(2);
    if protocol == 5 {
        // Reason 0 and no properties: the two-byte form [MQTT-3.14.2-1].
        frame.extend_from_slice(&[0xE0, 0x00]);
    } else {
        let _ = v4::Disconnect.write(&mut frame);
    }
    frame.freeze()
}

/// What became of a PUBLISH handed to [`Encoder::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// Appended to the buffer.
    Written,
    /// Larger than the upstream's maximum packet size: nothing written.
    TooLarge { size: usize, max: u32 },
}

/// Encodes what the bridge sends on one connection.
pub enum Encoder {
    V4,
    V5 {
        aliases: TopicAliases,
        max_packet_size: Option<u32>,
    },
}

/// rmqtt-codec's encoder keeps no state between packets we use (it is a `Cell`s struct,
/// not `Sync`, so one is made per packet rather than held across the session's awaits).
fn v5_encode(packet: v5::Packet, out: &mut BytesMut) -> EncodeResult {
    v5::Codec::new(0, 0)
        .encode(packet, out)
        .map_err(|e| e.to_string())
}

type EncodeResult = Result<(), String>;

impl Encoder {
    pub fn new(protocol: u8, limits: &UpstreamLimits) -> Encoder {
        if protocol == 5 {
            Encoder::V5 {
                aliases: TopicAliases::new(limits.topic_alias_maximum),
                max_packet_size: limits.max_packet_size,
            }
        } else {
            Encoder::V4
        }
    }

    pub fn is_v5(&self) -> bool {
        matches!(self, Encoder::V5 { .. })
    }

    /// Appends one PUBLISH of `message` (topic: the upstream's; QoS: the one to send at)
    /// to `out`, or nothing if it is too large for the upstream.
    pub fn publish(
        &mut self,
        out: &mut BytesMut,
        message: &Message,
        pkid: u16,
        dup: bool,
    ) -> Result<Encoded, String> {
        let start = out.len();
        match self {
            Encoder::V4 => {
                let qos = match message.qos {
                    QoS::AtMostOnce => WireQoS::AtMostOnce,
                    _ => WireQoS::AtLeastOnce,
                };
                let mut publish = v4::Publish::from_bytes(
                    message.topic.to_string(),
                    qos,
                    message.payload.clone(),
                );
                publish.retain = message.retain;
                publish.pkid = pkid;
                publish.dup = dup;
                publish.write(out).map_err(|e| e.to_string())?;
                Ok(Encoded::Written)
            }
            Encoder::V5 {
                aliases,
                max_packet_size,
            } => {
                // The expiry counted down to what is left now [MQTT-3.3.2-6].
                let mut publish = publish_to_v5(
                    pkid,
                    message,
                    dup,
                    crate::protocol::topic_alias::AliasUse::None,
                );
                let chosen = aliases.choose(&message.topic);
                if let AliasUse::Set(alias) | AliasUse::Use(alias) = chosen {
                    let props = publish.properties.get_or_insert_with(Default::default);
                    props.topic_alias = NonZeroU16::new(alias);
                    if matches!(chosen, AliasUse::Use(_)) {
                        publish.topic = ByteString::new();
                    }
                }
                v5_encode(v5::Packet::Publish(Box::new(publish)), out)?;
                let size = out.len() - start;
                if let Some(max) = *max_packet_size {
                    if size > max as usize {
                        out.truncate(start);
                        return Ok(Encoded::TooLarge { size, max });
                    }
                }
                aliases.commit(&message.topic, chosen);
                Ok(Encoded::Written)
            }
        }
    }

    /// Like [`Encoder::publish`], without topic aliases: the frame means the same on any
    /// connection, so it can be sent again byte for byte (a batch PUBLISH).
    pub fn publish_unaliased(
        &mut self,
        out: &mut BytesMut,
        message: &Message,
        pkid: u16,
    ) -> Result<Encoded, String> {
        let Encoder::V5 {
            max_packet_size, ..
        } = self
        else {
            return self.publish(out, message, pkid, false);
        };
        let start = out.len();
        let publish = publish_to_v5(
            pkid,
            message,
            false,
            crate::protocol::topic_alias::AliasUse::None,
        );
        v5_encode(v5::Packet::Publish(Box::new(publish)), out)?;
        let size = out.len() - start;
        match *max_packet_size {
            Some(max) if size > max as usize => {
                out.truncate(start);
                Ok(Encoded::TooLarge { size, max })
            }
            _ => Ok(Encoded::Written),
        }
    }

    /// The upstream's maximum packet size, if it stated one (MQTT 5).
    pub fn max_packet_size(&self) -> Option<u32> {
        match self {
            Encoder::V4 => None,
            Encoder::V5 {
                max_packet_size, ..
            } => *max_packet_size,
        }
    }

    pub fn pingreq(&self, out: &mut BytesMut) -> EncodeResult {
        match self {
            Encoder::V4 => v4::PingReq.write(out).map(drop).map_err(|e| e.to_string()),
            Encoder::V5 { .. } => {
                out.extend_from_slice(&[0xC0, 0x00]);
                Ok(())
            }
        }
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) of a command; nothing for QoS 0.
    pub fn command_ack(&self, out: &mut BytesMut, qos: QoS, pkid: u16) -> EncodeResult {
        let Some(id) = NonZeroU16::new(pkid) else {
            return Ok(()); // QoS 0
        };
        match (self, qos) {
            (_, QoS::AtMostOnce) => Ok(()),
            (Encoder::V4, QoS::AtLeastOnce) => v4::PubAck::new(pkid).write(out).map(drop),
            (Encoder::V4, QoS::ExactlyOnce) => v4::PubRec::new(pkid).write(out).map(drop),
            (Encoder::V5 { .. }, qos) => {
                let ack = v5::PublishAck {
                    packet_id: id,
                    ..v5::PublishAck::default()
                };
                let packet = if qos == QoS::AtLeastOnce {
                    v5::Packet::PublishAck(ack)
                } else {
                    v5::Packet::PublishReceived(ack)
                };
                return v5_encode(packet, out);
            }
        }
        .map_err(|e| e.to_string())
    }

    /// PUBCOMP for a PUBREL (QoS 2 from an upstream that ignored our granted QoS).
    pub fn pubcomp(&self, out: &mut BytesMut, pkid: u16) -> EncodeResult {
        match self {
            Encoder::V4 => v4::PubComp::new(pkid)
                .write(out)
                .map(drop)
                .map_err(|e| e.to_string()),
            Encoder::V5 { .. } => {
                let packet = v5::Packet::PublishComplete(v5::PublishAck2 {
                    packet_id: NonZeroU16::new(pkid).unwrap_or(NonZeroU16::MIN),
                    reason_code: v5::PublishAck2Reason::Success,
                    properties: Vec::new(),
                    reason_string: None,
                });
                v5_encode(packet, out)
            }
        }
    }

    /// SUBSCRIBE to `(filter, qos)` pairs. Over MQTT 5 with No Local (our own forwards never
    /// come back down) and Retain As Published (a retained command stays retained here).
    pub fn subscribe(
        &self,
        out: &mut BytesMut,
        pkid: u16,
        filters: &[(String, u8)],
    ) -> EncodeResult {
        match self {
            Encoder::V4 => {
                let filters = filters.iter().map(|(f, qos)| {
                    let qos = if *qos == 0 {
                        WireQoS::AtMostOnce
                    } else {
                        WireQoS::AtLeastOnce
                    };
                    v4::SubscribeFilter::new(f.clone(), qos)
                });
                let mut subscribe = v4::Subscribe::new_many(filters);
                subscribe.pkid = pkid;
                subscribe.write(out).map(drop).map_err(|e| e.to_string())
            }
            Encoder::V5 { .. } => {
                let packet = v5::Packet::Subscribe(v5::Subscribe {
                    packet_id: NonZeroU16::new(pkid).ok_or("packet identifier 0")?,
                    id: None,
                    user_properties: Vec::new(),
                    topic_filters: filters
                        .iter()
                        .map(|(f, qos)| {
                            let options = v5::SubscriptionOptions {
                                qos: if *qos == 0 {
                                    v5::QoS::AtMostOnce
                                } else {
                                    v5::QoS::AtLeastOnce
                                },
                                no_local: true,
                                retain_as_published: true,
                                retain_handling: v5::RetainHandling::AtSubscribe,
                            };
                            (ByteString::from(f.as_str()), options)
                        })
                        .collect(),
                });
                v5_encode(packet, out)
            }
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
