//! Both upstream protocols, checked against rmqtt-codec decoding as the upstream would.
use super::*;

use crate::time::unix_ms;

fn decode_v5(buf: &mut BytesMut) -> Vec<v5::Packet> {
    let mut codec = v5::Codec::new(0, 0);
    let mut packets = Vec::new();
    while let Some((p, _)) = codec.decode(buf).expect("decodes") {
        packets.push(p);
    }
    packets
}

fn limits(alias_max: u16, max_packet_size: Option<u32>) -> UpstreamLimits {
    UpstreamLimits {
        topic_alias_maximum: alias_max,
        max_packet_size,
        ..UpstreamLimits::default()
    }
}

fn message(topic: &str, payload: &[u8], expiry: Option<u32>) -> Message {
    let mut m = Message::new(topic, payload.to_vec(), QoS::AtLeastOnce, false);
    m.properties = Some(Arc::new(MessageProperties {
        user_properties: vec![("site".into(), "north".into())],
        content_type: Some("text/plain".into()),
        payload_format_indicator: Some(1),
        response_topic: Some("replies/1".into()),
        correlation_data: Some(Bytes::from_static(b"c-1")),
        message_expiry_interval: expiry,
        expires_at_ms: expiry.map(|s| unix_ms() + u64::from(s) * 1000 - 1500),
        subscription_ids: Vec::new(),
    }));
    m
}

#[test]
fn v5_connect_carries_session_expiry_login_and_our_maximum_packet_size() {
    let mut frame = connect_frame(&ConnectOptions {
        protocol: 5,
        client_id: "gw-cloud".into(),
        keep_alive: 30,
        clean_session: false,
        session_expiry: u32::MAX,
        username: Some("u".into()),
        password: Some("p".into()),
    })
    .expect("encodes");
    match decode_v5(&mut frame).pop() {
        Some(v5::Packet::Connect(c)) => {
            assert!(!c.clean_start);
            assert_eq!(c.session_expiry_interval_secs, u32::MAX);
            assert_eq!(c.keep_alive, 30);
            assert_eq!(&*c.client_id, "gw-cloud");
            assert_eq!(c.username.as_deref(), Some("u"));
            assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
            assert_eq!(
                c.max_packet_size.map(NonZeroU32::get),
                Some(MAX_INCOMING_PACKET as u32)
            );
            assert_eq!(
                c.topic_alias_max, 0,
                "the upstream may not alias its commands"
            );
        }
        other => panic!("expected CONNECT, got {other:?}"),
    }
}

#[test]
fn v5_publish_keeps_properties_counts_expiry_down_and_aliases_the_topic() {
    let mut enc = Encoder::new(5, &limits(10, None));
    let mut out = BytesMut::new();
    let m = message("site1/sensors/t", b"21.5", Some(60));
    for pkid in 1..=2 {
        assert_eq!(enc.publish(&mut out, &m, pkid, false), Ok(Encoded::Written));
    }
    let packets = decode_v5(&mut out);
    let publishes: Vec<_> = packets
        .into_iter()
        .map(|p| match p {
            v5::Packet::Publish(p) => p,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        &*publishes[0].topic, "site1/sensors/t",
        "the first sets the alias"
    );
    assert_eq!(&*publishes[1].topic, "", "the second uses it");
    for p in &publishes {
        let props = p.properties.as_ref().expect("properties");
        assert_eq!(props.topic_alias.map(NonZeroU16::get), Some(1));
        assert_eq!(props.user_properties[0].0, "site");
        assert_eq!(props.user_properties[0].1, "north");
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert!(props.is_utf8_payload);
        assert_eq!(props.response_topic.as_deref(), Some("replies/1"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c-1"[..]));
        let left = props.message_expiry_interval.expect("expiry").get();
        assert!(
            (58..=59).contains(&left),
            "remaining, not the original 60: {left}"
        );
        assert_eq!(&p.payload[..], b"21.5");
    }
}

#[test]
fn v5_publish_over_the_maximum_packet_size_is_not_written_and_sets_no_alias() {
    let mut enc = Encoder::new(5, &limits(10, Some(100)));
    let mut out = BytesMut::from(&b"xy"[..]);
    let big = message("site1/sensors/t", &[0u8; 200], None);
    match enc.publish(&mut out, &big, 1, false) {
        Ok(Encoded::TooLarge { size, max: 100 }) => assert!(size > 200),
        other => panic!("{other:?}"),
    }
    assert_eq!(&out[..], b"xy", "nothing written");
    let small = message("site1/sensors/t", b"1", None);
    assert_eq!(
        enc.publish(&mut out, &small, 2, false),
        Ok(Encoded::Written)
    );
    let _ = out.split_to(2);
    assert!(out.len() <= 100);
    match decode_v5(&mut out).pop() {
        Some(v5::Packet::Publish(p)) => {
            assert_eq!(
                &*p.topic, "site1/sensors/t",
                "the alias is set by this one, not the dropped one"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn v4_publish_drops_properties() {
    let mut enc = Encoder::new(4, &UpstreamLimits::default());
    let mut out = BytesMut::new();
    let m = message("site1/sensors/t", b"21.5", Some(60));
    assert_eq!(enc.publish(&mut out, &m, 7, true), Ok(Encoded::Written));
    match v4::Packet::read(&mut out, 1 << 20) {
        Ok(v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "site1/sensors/t");
            assert_eq!(p.pkid, 7);
            assert!(p.dup);
            assert_eq!(&p.payload[..], b"21.5");
        }
        other => panic!("{other:?}"),
    }
    assert!(out.is_empty());
}

#[test]
fn v5_connack_limits_pubacks_with_reasons_and_commands_are_read() {
    let mut buf = BytesMut::new();
    let mut codec = v5::Codec::new(0, 0);
    let connack = v5::ConnectAck {
        session_present: true,
        receive_max: NonZeroU16::new(5).expect("5"),
        max_packet_size: Some(1000),
        topic_alias_max: 3,
        server_keepalive_sec: Some(20),
        ..v5::ConnectAck::default()
    };
    codec
        .encode(v5::Packet::ConnectAck(Box::new(connack)), &mut buf)
        .expect("connack");
    let refused = v5::PublishAck {
        packet_id: NonZeroU16::new(9).expect("9"),
        reason_code: v5::PublishAckReason::NotAuthorized,
        ..v5::PublishAck::default()
    };
    codec
        .encode(v5::Packet::PublishAck(refused), &mut buf)
        .expect("puback");
    let mut command = publish_to_v5(
        3,
        &message("cmd/reboot", b"now", Some(30)),
        false,
        crate::protocol::topic_alias::AliasUse::None,
    );
    command.topic = ByteString::from("cmd/reboot");
    codec
        .encode(v5::Packet::Publish(Box::new(command)), &mut buf)
        .expect("publish");
    buf.extend_from_slice(&[0xE0, 0x00]); // DISCONNECT, the short form

    let mut decoder = Decoder::new(5);
    match decoder.read(&mut buf) {
        Ok(Some(Incoming::ConnAck {
            session_present: true,
            refused: None,
            limits,
        })) => {
            assert_eq!(limits.receive_maximum, 5);
            assert_eq!(limits.max_packet_size, Some(1000));
            assert_eq!(limits.topic_alias_maximum, 3);
            assert_eq!(limits.server_keep_alive, Some(20));
        }
        other => panic!("{other:?}"),
    }
    match decoder.read(&mut buf) {
        Ok(Some(Incoming::PubAck {
            pkid: 9,
            refused: Some(why),
        })) => {
            assert!(why.contains("NotAuthorized"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    match decoder.read(&mut buf) {
        Ok(Some(Incoming::Publish(c))) => {
            assert_eq!(c.topic, "cmd/reboot");
            assert_eq!(c.pkid, 3);
            let p = c.properties.expect("properties kept");
            assert_eq!(
                p.user_properties,
                vec![("site".to_string(), "north".to_string())]
            );
            assert_eq!(p.correlation_data.as_deref(), Some(&b"c-1"[..]));
            assert!(p.expires_at_ms.is_some(), "expiry counted from arrival");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decoder.read(&mut buf),
        Ok(Some(Incoming::Disconnect(_)))
    ));
    assert!(matches!(decoder.read(&mut buf), Ok(None)));
}

#[test]
fn a_3_1_1_only_upstream_refusing_level_5_says_so() {
    let mut buf = BytesMut::from(&[0x20, 0x02, 0x00, 0x01][..]);
    match Decoder::new(5).read(&mut buf) {
        Err(WireError::Refused(why)) => assert!(why.contains("protocol = 4"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn v5_subscribe_asks_no_local_and_retain_as_published() {
    let enc = Encoder::new(5, &UpstreamLimits::default());
    let mut out = BytesMut::new();
    enc.subscribe(&mut out, 4, &[("cmd/#".into(), 1)])
        .expect("subscribe");
    match decode_v5(&mut out).pop() {
        Some(v5::Packet::Subscribe(s)) => {
            let (filter, o) = &s.topic_filters[0];
            assert_eq!(&**filter, "cmd/#");
            assert!(o.no_local && o.retain_as_published);
            assert_eq!(o.qos, v5::QoS::AtLeastOnce);
        }
        other => panic!("{other:?}"),
    }
}
