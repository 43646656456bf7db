//! The MQTT 3.1.1 (protocol level 4) adapter: bytes to protocol-neutral events and back.
//!
//! Packets are framed, decoded and encoded by `rumqttc::mqttbytes::v4`. This file adds
//! what that codec leaves to a server: the fixed-header flag and reserved-bit checks the
//! standard requires of a receiver, and the translation to and from `message` types.

use bytes::BytesMut;
use rumqttc::mqttbytes::{self, v4};

use crate::protocol::frame;
use crate::protocol::inbound::{
    Connect, DecodeError, Disconnect, Inbound, Publish, Subscribe, Unsubscribe, Version,
    SESSION_NEVER_EXPIRES,
};
use crate::protocol::message::{ConnectOutcome, Message, Outbound, QoS, SubscriptionOptions};

fn malformed(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

/// Decodes the next whole packet from `buf` (consuming it), or returns `Incomplete`
/// leaving `buf` as it was.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Inbound, DecodeError> {
    let header = match mqttbytes::check(buf.iter(), max_packet_size) {
        Ok(h) => h,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Err(DecodeError::Incomplete),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => return Err(DecodeError::TooLarge(n)),
        Err(e) => return Err(malformed(e)),
    };
    let frame_len = header.frame_length();
    frame::check_flags(buf[0])?;
    let packet_type = buf[0] >> 4;
    let body_start = frame::header_len(&buf[..frame_len]);
    match packet_type {
        1 => check_connect(&buf[body_start..frame_len])?,
        8 => check_subscribe(&buf[body_start..frame_len])?,
        _ => {}
    }
    let packet = v4::Packet::read(buf, max_packet_size).map_err(|e| match e {
        mqttbytes::Error::InvalidProtocolLevel(level) => DecodeError::UnsupportedProtocol(level),
        other => malformed(other),
    })?;
    Ok(match packet {
        v4::Packet::Connect(c) => {
            if c.protocol != mqttbytes::Protocol::V4 {
                return Err(DecodeError::UnsupportedProtocol(5));
            }
            Inbound::Connect(connect_from_v4(c))
        }
        v4::Packet::Publish(p) => Inbound::Publish(Publish {
            pkid: p.pkid,
            dup: p.dup,
            message: message_from_v4(p),
        }),
        v4::Packet::PubAck(p) => Inbound::PubAck(p.pkid),
        v4::Packet::PubRec(p) => Inbound::PubRec(p.pkid),
        v4::Packet::PubRel(p) => Inbound::PubRel(p.pkid),
        v4::Packet::PubComp(p) => Inbound::PubComp(p.pkid),
        v4::Packet::Subscribe(s) => {
            if s.pkid == 0 {
                return Err(DecodeError::Violation("SUBSCRIBE with packet identifier 0"));
            }
            Inbound::Subscribe(Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| (f.path, SubscriptionOptions::qos(qos_from_v4(f.qos))))
                    .collect(),
            })
        }
        v4::Packet::Unsubscribe(u) => {
            // A non-zero packet identifier [MQTT-2.3.1-1]; at least one filter [MQTT-3.10.3-2].
            if u.pkid == 0 {
                return Err(DecodeError::Violation(
                    "UNSUBSCRIBE with packet identifier 0",
                ));
            }
            if u.topics.is_empty() {
                return Err(DecodeError::Violation("UNSUBSCRIBE without topic filters"));
            }
            Inbound::Unsubscribe(Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            })
        }
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect(Disconnect::default()),
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => {
            return Err(DecodeError::Violation("client sent a server-only packet"));
        }
    })
}

fn read_len_prefixed(body: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
    let start = at + 2;
    Some((body.get(start..start + len)?, start + len))
}

/// CONNECT checks rumqttc leaves to us: the protocol name, the reserved flag [MQTT-3.1.2-3],
/// a password without a user name [MQTT-3.1.2-22], will flags without a will [MQTT-3.1.2-11..15].
fn check_connect(body: &[u8]) -> Result<(), DecodeError> {
    let Some((name, at)) = read_len_prefixed(body, 0) else {
        return Err(DecodeError::Malformed("truncated CONNECT".into()));
    };
    let level = body.get(at).copied().unwrap_or(0);
    match name {
        b"MQTT" => {}
        // MQTT 3.1 clients get "unacceptable protocol version" rather than a silent close.
        b"MQIsdp" => return Err(DecodeError::UnsupportedProtocol(level)),
        _ => return Err(DecodeError::Malformed("protocol name is not MQTT".into())),
    }
    if level != 4 {
        return Err(DecodeError::UnsupportedProtocol(level));
    }
    let Some(&flags) = body.get(at + 1) else {
        return Err(DecodeError::Malformed("truncated CONNECT".into()));
    };
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set".into()));
    }
    if flags & 0x80 == 0 && flags & 0x40 != 0 {
        return Err(DecodeError::Malformed(
            "password flag without user name flag".into(),
        ));
    }
    if flags & 0x04 == 0 && flags & 0x38 != 0 {
        return Err(DecodeError::Malformed(
            "will QoS/retain set without will flag".into(),
        ));
    }
    if (flags >> 3) & 0b11 == 3 {
        return Err(DecodeError::Malformed("will QoS 3".into()));
    }
    Ok(())
}

/// SUBSCRIBE: the reserved bits of each requested-QoS byte must be 0 [MQTT-3.8.3-4].
fn check_subscribe(body: &[u8]) -> Result<(), DecodeError> {
    let mut at = 2; // packet identifier
    while at < body.len() {
        let Some((_, next)) = read_len_prefixed(body, at) else {
            return Err(DecodeError::Malformed("truncated SUBSCRIBE".into()));
        };
        match body.get(next) {
            Some(options) if options & 0b1111_1100 == 0 && options & 0b11 != 3 => {}
            Some(_) => {
                return Err(DecodeError::Malformed(
                    "SUBSCRIBE options reserved bits or QoS 3".into(),
                ))
            }
            None => return Err(DecodeError::Malformed("truncated SUBSCRIBE".into())),
        }
        at = next + 1;
    }
    Ok(())
}

fn qos_from_v4(qos: mqttbytes::QoS) -> QoS {
    match qos {
        mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v4(qos: QoS) -> mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => mqttbytes::QoS::ExactlyOnce,
    }
}

fn connect_from_v4(connect: v4::Connect) -> Connect {
    let (username, password) = match connect.login {
        Some(login) => (Some(login.username), login.password.into_bytes()),
        None => (None, Vec::new()),
    };
    Connect {
        version: Version::V4,
        client_id: connect.client_id,
        clean_session: connect.clean_session,
        session_expiry: if connect.clean_session {
            0
        } else {
            SESSION_NEVER_EXPIRES
        },
        receive_maximum: u16::MAX,
        max_packet_size: None,
        topic_alias_max: 0,
        auth_method: None,
        keep_alive: connect.keep_alive,
        username,
        password,
        will: connect.last_will.map(will_from_v4),
        will_delay: 0,
    }
}

fn will_from_v4(will: v4::LastWill) -> Message {
    Message {
        topic: will.topic.into(),
        payload: will.message,
        qos: qos_from_v4(will.qos),
        retain: will.retain,
        properties: None,
    }
}

fn message_from_v4(publish: v4::Publish) -> Message {
    Message {
        topic: publish.topic.into(),
        payload: publish.payload,
        qos: qos_from_v4(publish.qos),
        retain: publish.retain,
        properties: None,
    }
}

/// Appends the encoding of `packet` to `buf`. `Close` encodes to nothing.
pub fn encode(packet: &Outbound, buf: &mut BytesMut) -> Result<(), mqttbytes::Error> {
    match packet {
        Outbound::ConnAck(outcome) => {
            let (code, session_present) = match *outcome {
                ConnectOutcome::Accepted { session_present } => {
                    (v4::ConnectReturnCode::Success, session_present)
                }
                ConnectOutcome::UnacceptableProtocol => {
                    (v4::ConnectReturnCode::RefusedProtocolVersion, false)
                }
                ConnectOutcome::IdentifierRejected => (v4::ConnectReturnCode::BadClientId, false),
                ConnectOutcome::ServerUnavailable => {
                    (v4::ConnectReturnCode::ServiceUnavailable, false)
                }
                ConnectOutcome::BadCredentials => {
                    (v4::ConnectReturnCode::BadUserNamePassword, false)
                }
                ConnectOutcome::NotAuthorized | ConnectOutcome::BadAuthenticationMethod => {
                    (v4::ConnectReturnCode::NotAuthorized, false)
                }
            };
            v4::ConnAck::new(code, session_present).write(buf)?;
        }
        Outbound::Publish { pkid, message, dup } => {
            let publish = v4::Publish {
                dup: *dup,
                qos: qos_to_v4(message.qos),
                retain: message.retain,
                topic: message.topic.to_string(),
                pkid: *pkid,
                payload: message.payload.clone(),
            };
            publish.write(buf)?;
        }
        Outbound::PubAck(pkid) => {
            v4::PubAck::new(*pkid).write(buf)?;
        }
        Outbound::PubRec(pkid) => {
            v4::PubRec::new(*pkid).write(buf)?;
        }
        // 3.1.1 has no negative acknowledgement: a refused PUBLISH is acknowledged.
        Outbound::PubRefused { pkid, qos, .. } | Outbound::PubAckNoSubscribers { pkid, qos } => {
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    v4::PubAck::new(*pkid).write(buf)?;
                }
                QoS::ExactlyOnce => {
                    v4::PubRec::new(*pkid).write(buf)?;
                }
            }
        }
        Outbound::PubRel(pkid) => {
            v4::PubRel::new(*pkid).write(buf)?;
        }
        Outbound::PubComp(pkid) => {
            v4::PubComp::new(*pkid).write(buf)?;
        }
        Outbound::SubAck { pkid, granted } => {
            let codes = granted
                .iter()
                .map(|g| match g {
                    Ok(qos) => v4::SubscribeReasonCode::Success(qos_to_v4(*qos)),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            v4::SubAck::new(*pkid, codes).write(buf)?;
        }
        Outbound::UnsubAck { pkid, .. } => {
            v4::UnsubAck::new(*pkid).write(buf)?;
        }
        Outbound::PingResp => {
            v4::PingResp.write(buf)?;
        }
        Outbound::Close(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_hex(hex: &str) -> Result<Inbound, DecodeError> {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        decode(&mut BytesMut::from(&bytes[..]), 1024)
    }

    #[test]
    fn connect_level_3_and_5_are_unsupported_not_malformed() {
        // MQIsdp level 3, client id "a": the 3.1.1 adapter alone refuses it.
        assert!(matches!(
            decode_hex("100f00064d514973647003020000000161"),
            Err(DecodeError::UnsupportedProtocol(3))
        ));
        // Level 5 reaches this adapter only if called directly (`Decoder` sends it to v5).
        assert!(matches!(
            decode_hex("100d00044d5154540502000000016100"),
            Err(DecodeError::UnsupportedProtocol(5))
        ));
    }

    #[test]
    fn connect_reserved_flag_is_malformed() {
        assert!(matches!(
            decode_hex("100d00044d51545404030000000161"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_hex("100d00044d51545404020000000161"),
            Ok(Inbound::Connect(_))
        ));
    }

    #[test]
    fn bad_fixed_header_flags_are_malformed() {
        // SUBSCRIBE with flags 0 instead of 2
        assert!(matches!(
            decode_hex("8006000100016100"),
            Err(DecodeError::Malformed(_))
        ));
        // PUBLISH QoS 0 with DUP
        assert!(matches!(
            decode_hex("38050001616869"),
            Err(DecodeError::Malformed(_))
        ));
        // PINGREQ ok, with flags not ok
        assert!(matches!(decode_hex("c000"), Ok(Inbound::PingReq)));
        assert!(matches!(decode_hex("c100"), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn zero_packet_ids_are_violations() {
        assert!(matches!(
            decode_hex("8206000000016101"),
            Err(DecodeError::Violation(_))
        ));
        assert!(matches!(
            decode_hex("a2050000000161"),
            Err(DecodeError::Violation(_))
        ));
    }

    #[test]
    fn subscribe_reserved_option_bits_are_malformed() {
        assert!(matches!(
            decode_hex("8206000100016101"),
            Ok(Inbound::Subscribe(_))
        ));
        assert!(matches!(
            decode_hex("8206000100016105"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn incomplete_leaves_buffer_and_oversize_is_reported() {
        let mut buf = BytesMut::from(&[0x30u8, 0x05, 0x00][..]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(DecodeError::Incomplete)
        ));
        assert_eq!(buf.len(), 3);
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(DecodeError::TooLarge(_))
        ));
    }
}
