//! The MQTT 5 adapter against hand-written bytes (the malformed cases the issue lists) and
//! against packets a real client would send, encoded by the codec's client side.

use super::encode::EncodeError;
use super::*;
use crate::protocol::codec::Decoder;
use crate::protocol::message::{
    CloseReason, ConnectOutcome, Outbound, PublishRefusal, SubscribeRefusal,
};
use tokio_util::codec::Encoder as _;

fn hex(hex: &str) -> BytesMut {
    let hex: String = hex.split_whitespace().collect();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    BytesMut::from(&bytes[..])
}

fn decode_hex(h: &str) -> Result<Inbound, DecodeError> {
    V5Decoder::new().decode(&mut hex(h), 1024)
}

fn client_bytes(packet: v5::Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    v5::Codec::new(0, 0)
        .encode(packet, &mut buf)
        .expect("client packet encodes");
    buf
}

fn encode(encoder: &mut V5Encoder, packet: Outbound) -> v5::Packet {
    let mut buf = BytesMut::new();
    encoder.encode(&packet, &mut buf).expect("encodes");
    let (packet, _) = v5::Codec::new(0, 0)
        .decode(&mut buf)
        .expect("decodes")
        .expect("whole packet");
    packet
}

#[test]
fn the_connect_level_picks_the_adapter() {
    let connect = client_bytes(v5::Packet::Connect(Box::new(v5::Connect {
        clean_start: true,
        keep_alive: 30,
        session_expiry_interval_secs: 3600,
        receive_max: NonZeroU16::new(5),
        max_packet_size: NonZeroU32::new(2048),
        client_id: "dev-1".into(),
        password: Some(bytes::Bytes::from_static(&[0xFF, 0x00, 0x80])),
        username: Some("u".into()),
        ..v5::Connect::default()
    })));
    let mut decoder = Decoder::new();
    let mut buf = connect.clone();
    match decoder.decode(&mut buf, 1024) {
        Ok(Inbound::Connect(c)) => {
            assert_eq!(c.version, Version::V5);
            assert_eq!(c.client_id, "dev-1");
            assert_eq!(c.session_expiry, 3600);
            assert_eq!(c.receive_maximum, 5);
            assert_eq!(c.max_packet_size, Some(2048));
            // Binary passwords pass as they are [MQTT-3.1.3.5].
            assert_eq!(c.password, vec![0xFF, 0x00, 0x80]);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(decoder, Decoder::V5(_)));
    // A 3.1.1 CONNECT stays with the 3.1.1 adapter.
    let mut decoder = Decoder::new();
    let mut buf = hex("100d00044d51545404020000000161");
    assert!(matches!(
        decoder.decode(&mut buf, 1024),
        Ok(Inbound::Connect(Connect {
            version: Version::V4,
            ..
        }))
    ));
    assert!(matches!(decoder, Decoder::V4));
}

#[test]
fn a_split_connect_waits_for_its_level() {
    let mut decoder = Decoder::new();
    let mut buf = hex("10 10 00 04 4d 51");
    assert!(matches!(
        decoder.decode(&mut buf, 1024),
        Err(DecodeError::Incomplete)
    ));
    assert!(matches!(decoder, Decoder::Undecided));
    assert_eq!(buf.len(), 6);
}

#[test]
fn malformed_v5_packets_are_refused() {
    // PUBLISH QoS 0 "a", property length 3 with 0x7F (no such property).
    assert!(matches!(
        decode_hex("30 07 0001 61 03 7f 0000"),
        Err(DecodeError::Malformed(_))
    ));
    // Message expiry interval twice.
    assert!(matches!(
        decode_hex("30 0e 0001 61 0a 02 0000000a 02 0000000a"),
        Err(DecodeError::Malformed(_))
    ));
    // Property length past the end of the packet.
    assert!(matches!(
        decode_hex("30 06 0001 61 09 02 00"),
        Err(DecodeError::Malformed(_))
    ));
    // Topic alias 0.
    assert!(matches!(
        decode_hex("30 07 0001 61 03 23 0000"),
        Err(DecodeError::Malformed(_))
    ));
    // Subscription identifier 0 on SUBSCRIBE.
    assert!(matches!(
        decode_hex("82 09 0001 02 0b 00 0001 61 01"),
        Err(DecodeError::Malformed(_))
    ));
    // CONNECT with receive maximum 0.
    assert!(matches!(
        decode_hex("10 11 0004 4d515454 05 02 003c 03 21 0000 0001 61"),
        Err(DecodeError::Malformed(_))
    ));
    // SUBSCRIBE with flags 0 (fixed header), QoS 3 PUBLISH.
    assert!(matches!(
        decode_hex("80 07 0001 00 0001 61 01"),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode_hex("36 04 0001 61 00"),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn topic_aliases_are_resolved_per_connection_and_bounded() {
    let mut decoder = V5Decoder::new();
    // "a/b" with alias 3, then an empty topic with alias 3.
    let mut buf = hex("30 0a 0003 612f62 03 23 0003 78");
    buf.extend_from_slice(&hex("30 07 0000 03 23 0003 79"));
    let first = decoder.decode(&mut buf, 1024);
    let second = decoder.decode(&mut buf, 1024);
    match (first, second) {
        (Ok(Inbound::Publish(a)), Ok(Inbound::Publish(b))) => {
            assert_eq!(&*a.message.topic, "a/b");
            assert_eq!(&*b.message.topic, "a/b");
            assert_eq!(&b.message.payload[..], b"y");
        }
        other => panic!("{other:?}"),
    }
    // An alias above the maximum we announce.
    let over = format!("30 07 0001 61 03 23 {:04x}", TOPIC_ALIAS_MAXIMUM + 1);
    assert!(matches!(
        decode_hex(&over),
        Err(DecodeError::TopicAliasInvalid(_))
    ));
    // An alias never set.
    assert!(matches!(
        decode_hex("30 06 0000 03 23 0002"),
        Err(DecodeError::Violation(_))
    ));
}

#[test]
fn disconnect_forms_and_auth() {
    // The usual clean DISCONNECT: no reason code, no properties.
    assert!(matches!(
        decode_hex("e0 00"),
        Ok(Inbound::Disconnect(Disconnect {
            publish_will: false,
            session_expiry: None
        }))
    ));
    // Reason 0x04 only: the will is to be published.
    assert!(matches!(
        decode_hex("e0 01 04"),
        Ok(Inbound::Disconnect(Disconnect {
            publish_will: true,
            ..
        }))
    ));
    // Normal, with a new session expiry of 60 s.
    assert!(matches!(
        decode_hex("e0 07 00 05 11 0000003c"),
        Ok(Inbound::Disconnect(Disconnect {
            session_expiry: Some(60),
            ..
        }))
    ));
    assert!(matches!(
        decode_hex("f0 00"),
        Err(DecodeError::Violation(_))
    ));
}

#[test]
fn publish_properties_are_carried_and_expiry_counted_down() {
    let publish = client_bytes(v5::Packet::Publish(Box::new(CodecPublish {
        dup: false,
        retain: false,
        qos: v5::QoS::AtLeastOnce,
        topic: "sensors/t".into(),
        packet_id: NonZeroU16::new(7),
        payload: bytes::Bytes::from_static(b"21.5"),
        properties: Some(v5::PublishProperties {
            message_expiry_interval: NonZeroU32::new(60),
            content_type: Some("text/plain".into()),
            user_properties: vec![("site".into(), "north".into()), ("site".into(), "b".into())],
            is_utf8_payload: true,
            response_topic: Some("replies/1".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"\x01\x02")),
            ..v5::PublishProperties::default()
        }),
    })));
    let Ok(Inbound::Publish(p)) = V5Decoder::new().decode(&mut publish.clone(), 1024) else {
        panic!("PUBLISH decodes");
    };
    assert_eq!(p.pkid, 7);
    let props = p.message.properties.clone().expect("properties");
    assert_eq!(props.message_expiry_interval, Some(60));
    assert_eq!(props.payload_format_indicator, Some(1));
    assert_eq!(
        props.user_properties,
        vec![
            ("site".to_string(), "north".to_string()),
            ("site".to_string(), "b".to_string())
        ]
    );
    // 20 s later, a subscriber is told 40 s are left.
    let mut aged = p.message.clone();
    let own = Arc::make_mut(aged.properties.as_mut().expect("properties"));
    own.expires_at_ms = Some(unix_ms() + 40_000);
    // The router's copy for one subscriber carries its subscription identifiers.
    own.subscription_ids = vec![7, 300_000];
    let mut encoder = V5Encoder::new(ConnAckInfo::default(), None, 0);
    match encode(
        &mut encoder,
        Outbound::Publish {
            pkid: 3,
            message: aged,
            dup: false,
        },
    ) {
        v5::Packet::Publish(out) => {
            let props = out.properties.expect("properties");
            let left = props.message_expiry_interval.map(NonZeroU32::get);
            assert!(matches!(left, Some(39..=40)), "{left:?}");
            assert_eq!(props.content_type.as_deref(), Some("text/plain"));
            assert_eq!(props.user_properties.len(), 2);
            assert_eq!(props.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
            let ids: Vec<u32> = props.subscription_ids.iter().map(|i| i.get()).collect();
            assert_eq!(ids, [7, 300_000]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn connack_tells_what_the_broker_offers() {
    let mut encoder = V5Encoder::new(
        ConnAckInfo {
            assigned_client_id: Some("auto-1".into()),
            max_packet_size: 4096,
            session_expiry: None,
            receive_maximum: 1024,
        },
        None,
        0,
    );
    match encode(
        &mut encoder,
        Outbound::ConnAck(ConnectOutcome::Accepted {
            session_present: false,
        }),
    ) {
        v5::Packet::ConnectAck(ack) => {
            assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
            assert_eq!(ack.assigned_client_id.as_deref(), Some("auto-1"));
            assert_eq!(ack.max_packet_size, Some(4096));
            assert_eq!(ack.topic_alias_max, TOPIC_ALIAS_MAXIMUM);
            assert_eq!(ack.receive_max.get(), 1024);
            assert!(ack.shared_subscription_available);
            assert!(ack.subscription_identifiers_available);
            assert!(ack.retain_available && ack.wildcard_subscription_available);
        }
        other => panic!("{other:?}"),
    }
    match encode(
        &mut encoder,
        Outbound::ConnAck(ConnectOutcome::BadAuthenticationMethod),
    ) {
        v5::Packet::ConnectAck(ack) => {
            assert_eq!(
                ack.reason_code,
                v5::ConnectAckReason::BadAuthenticationMethod
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refusals_and_closes_carry_reason_codes() {
    let mut encoder = V5Encoder::new(ConnAckInfo::default(), None, 0);
    match encode(
        &mut encoder,
        Outbound::PubRefused {
            pkid: 9,
            qos: QoS::AtLeastOnce,
            reason: PublishRefusal::NotAuthorized,
        },
    ) {
        v5::Packet::PublishAck(a) => {
            assert_eq!(a.reason_code, v5::PublishAckReason::NotAuthorized)
        }
        other => panic!("{other:?}"),
    }
    match encode(
        &mut encoder,
        Outbound::SubAck {
            pkid: 2,
            granted: vec![
                Ok(QoS::AtLeastOnce),
                Err(SubscribeRefusal::SharedSubscriptionsNotSupported),
                Err(SubscribeRefusal::TopicFilterInvalid),
            ],
        },
    ) {
        v5::Packet::SubscribeAck(a) => assert_eq!(
            a.status,
            vec![
                v5::SubscribeAckReason::GrantedQos1,
                v5::SubscribeAckReason::SharedSubscriptionNotSupported,
                v5::SubscribeAckReason::TopicFilterInvalid
            ]
        ),
        other => panic!("{other:?}"),
    }
    match encode(&mut encoder, Outbound::Close(CloseReason::SessionTakenOver)) {
        v5::Packet::Disconnect(d) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver);
            assert!(d.reason_string.is_some());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn nothing_larger_than_the_client_allows_is_encoded() {
    let mut encoder = V5Encoder::new(ConnAckInfo::default(), Some(64), 0);
    let message = Message::new("t", vec![0u8; 100], QoS::AtLeastOnce, false);
    assert_eq!(publish_len(&message), 1 + 1 + 2 + 1 + 2 + 1 + 100);
    let mut buf = BytesMut::new();
    assert!(matches!(
        encoder.encode(
            &Outbound::Publish {
                pkid: 1,
                message,
                dup: false
            },
            &mut buf
        ),
        Err(EncodeError::TooLarge { .. })
    ));
    assert!(buf.is_empty());
}

#[test]
fn topic_aliases_go_to_a_client_that_takes_them() {
    let mut encoder = V5Encoder::new(ConnAckInfo::default(), None, 4);
    let publish = |payload: &'static str| Outbound::Publish {
        pkid: 0,
        message: Message::new(
            "sensors/site-a/temperature",
            payload,
            QoS::AtMostOnce,
            false,
        ),
        dup: false,
    };
    let (first, second) = (
        encode(&mut encoder, publish("1")),
        encode(&mut encoder, publish("2")),
    );
    match (first, second) {
        (v5::Packet::Publish(a), v5::Packet::Publish(b)) => {
            assert_eq!(&*a.topic, "sensors/site-a/temperature");
            let alias = a.properties.and_then(|p| p.topic_alias);
            assert_eq!(alias.map(NonZeroU16::get), Some(1));
            assert_eq!(&*b.topic, "", "the second time, the alias alone");
            assert_eq!(b.properties.and_then(|p| p.topic_alias), alias);
        }
        other => panic!("{other:?}"),
    }
    // A client that takes none gets the name every time.
    let mut plain = V5Encoder::new(ConnAckInfo::default(), None, 0);
    for _ in 0..2 {
        match encode(&mut plain, publish("x")) {
            v5::Packet::Publish(p) => {
                assert_eq!(&*p.topic, "sensors/site-a/temperature");
                assert!(p.properties.and_then(|p| p.topic_alias).is_none());
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn the_client_maximum_counts_the_whole_packet_and_an_alias_gives_way_to_it() {
    // 1 + 1 + (2 + 1) + 1 + 59 = 65 bytes without an alias; 68 setting one.
    let message = Message::new("t", vec![0u8; 59], QoS::AtMostOnce, false);
    let size = publish_len(&message);
    let mut encoder = V5Encoder::new(ConnAckInfo::default(), Some(size as u32), 4);
    let mut buf = BytesMut::new();
    let packet = Outbound::Publish {
        pkid: 0,
        message,
        dup: false,
    };
    encoder
        .encode(&packet, &mut buf)
        .expect("fits exactly, without the alias");
    assert_eq!(buf.len(), size);
}
