//! Fixtures shared by `benches/v5_codec.rs` and `tests/v5_gaps.rs` (issue 13).
//!
//! The same five MQTT 5 packets built twice, once with each candidate codec's types:
//! rumqttc 0.25's `rumqttc::v5::mqttbytes::v5` and rmqtt-codec 0.3's `rmqtt_codec::v5`.
//! The decode benchmark feeds both codecs the same wire bytes (rumqttc's encoding; the
//! gap test prints whether the two encodings are byte-identical and cross-decode).

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

/// Inbound/outbound maximum packet size given to both codecs (1 MiB).
pub const MAX: u32 = 1024 * 1024;

/// The benchmark cases, in report order.
pub const CASES: [&str; 5] = [
    "publish_qos1",
    "publish_qos1_props",
    "connect",
    "subscribe3",
    "puback",
];

const TOPIC: &str = "site/a7/line3/press12/temperature";
const CORRELATION: [u8; 16] = *b"0123456789abcdef";

fn payload() -> Bytes {
    Bytes::from_static(&[0x5au8; 64])
}

/// rumqttc 0.25: `rumqttc::v5::mqttbytes::v5`.
pub mod rumq {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::*;
    pub use rumqttc::v5::mqttbytes::{Error, QoS};

    pub fn packet(case: &str) -> Packet {
        match case {
            "publish_qos1" => Packet::Publish(publish(None)),
            "publish_qos1_props" => Packet::Publish(publish(Some(PublishProperties {
                payload_format_indicator: None,
                message_expiry_interval: Some(300),
                topic_alias: None,
                response_topic: None,
                correlation_data: Some(Bytes::from_static(&CORRELATION)),
                user_properties: vec![
                    ("site".into(), "a7".into()),
                    ("unit".into(), "celsius".into()),
                ],
                subscription_identifiers: Vec::new(),
                content_type: Some("application/json".into()),
            }))),
            "connect" => {
                let mut props = ConnectProperties::new();
                props.session_expiry_interval = Some(3600);
                props.receive_maximum = Some(32);
                props.user_properties = vec![("gateway".into(), "edge-01".into())];
                Packet::Connect(
                    Connect {
                        keep_alive: 30,
                        client_id: "press12-sensor".into(),
                        clean_start: true,
                        properties: Some(props),
                    },
                    None,
                    Some(Login::new("press12", "s3cret-pass")),
                )
            }
            "subscribe3" => {
                let f = |path: &str, qos, nolocal, preserve_retain, rule| Filter {
                    path: path.into(),
                    qos,
                    nolocal,
                    preserve_retain,
                    retain_forward_rule: rule,
                };
                Packet::Subscribe(Subscribe {
                    pkid: 7,
                    filters: vec![
                        f(
                            "site/+/line3/#",
                            QoS::AtLeastOnce,
                            true,
                            false,
                            RetainForwardRule::OnEverySubscribe,
                        ),
                        f(
                            "site/a7/alarms",
                            QoS::ExactlyOnce,
                            false,
                            true,
                            RetainForwardRule::OnNewSubscribe,
                        ),
                        f(
                            "$SYS/broker/load",
                            QoS::AtMostOnce,
                            false,
                            false,
                            RetainForwardRule::Never,
                        ),
                    ],
                    properties: Some(SubscribeProperties {
                        id: Some(42),
                        user_properties: Vec::new(),
                    }),
                })
            }
            "puback" => Packet::PubAck(PubAck::new(4711, None)),
            other => panic!("unknown case {other}"),
        }
    }

    fn publish(properties: Option<PublishProperties>) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Bytes::from_static(TOPIC.as_bytes()),
            pkid: 4711,
            payload: payload(),
            properties,
        }
    }

    /// `Packet::read` with the bench's maximum packet size.
    pub fn decode(buf: &mut BytesMut) -> Result<Packet, Error> {
        Packet::read(buf, Some(MAX))
    }

    pub fn encode(p: &Packet, buf: &mut BytesMut) -> Result<usize, Error> {
        p.write(buf, Some(MAX))
    }

    pub fn wire(case: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(&packet(case), &mut buf).expect("rumqttc encodes the fixture");
        buf
    }
}

/// rmqtt-codec 0.3: `rmqtt_codec::v5`.
pub mod rmq {
    use super::*;
    pub use rmqtt_codec::error::{DecodeError, EncodeError};
    pub use rmqtt_codec::types::{Publish, QoS};
    pub use rmqtt_codec::v5::*;
    use tokio_util::codec::{Decoder, Encoder};

    fn nz16(v: u16) -> NonZeroU16 {
        NonZeroU16::new(v).unwrap()
    }

    pub fn packet(case: &str) -> Packet {
        match case {
            "publish_qos1" => Packet::Publish(Box::new(publish(PublishProperties::default()))),
            "publish_qos1_props" => Packet::Publish(Box::new(publish(PublishProperties {
                topic_alias: None,
                correlation_data: Some(Bytes::from_static(&CORRELATION)),
                message_expiry_interval: NonZeroU32::new(300),
                content_type: Some(ByteString::from_static("application/json")),
                user_properties: vec![
                    (
                        ByteString::from_static("site"),
                        ByteString::from_static("a7"),
                    ),
                    (
                        ByteString::from_static("unit"),
                        ByteString::from_static("celsius"),
                    ),
                ],
                is_utf8_payload: false,
                response_topic: None,
                subscription_ids: Vec::new(),
            }))),
            "connect" => Packet::Connect(Box::new(Connect {
                clean_start: true,
                keep_alive: 30,
                session_expiry_interval_secs: 3600,
                receive_max: Some(nz16(32)),
                user_properties: vec![(
                    ByteString::from_static("gateway"),
                    ByteString::from_static("edge-01"),
                )],
                client_id: ByteString::from_static("press12-sensor"),
                username: Some(ByteString::from_static("press12")),
                password: Some(Bytes::from_static(b"s3cret-pass")),
                ..Connect::default()
            })),
            "subscribe3" => {
                let o = |qos, no_local, retain_as_published, retain_handling| SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                };
                Packet::Subscribe(Subscribe {
                    packet_id: nz16(7),
                    id: NonZeroU32::new(42),
                    user_properties: Vec::new(),
                    topic_filters: vec![
                        (
                            ByteString::from_static("site/+/line3/#"),
                            o(QoS::AtLeastOnce, true, false, RetainHandling::AtSubscribe),
                        ),
                        (
                            ByteString::from_static("site/a7/alarms"),
                            o(
                                QoS::ExactlyOnce,
                                false,
                                true,
                                RetainHandling::AtSubscribeNew,
                            ),
                        ),
                        (
                            ByteString::from_static("$SYS/broker/load"),
                            o(QoS::AtMostOnce, false, false, RetainHandling::NoAtSubscribe),
                        ),
                    ],
                })
            }
            "puback" => Packet::PublishAck(PublishAck {
                packet_id: nz16(4711),
                reason_code: PublishAckReason::Success,
                properties: Vec::new(),
                reason_string: None,
            }),
            other => panic!("unknown case {other}"),
        }
    }

    fn publish(properties: PublishProperties) -> Publish {
        Publish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: ByteString::from_static(TOPIC),
            packet_id: Some(nz16(4711)),
            payload: payload(),
            properties: Some(properties),
        }
    }

    pub fn codec() -> Codec {
        Codec::new(MAX, MAX)
    }

    /// `Decoder::decode`: `Ok(None)` means "incomplete frame".
    pub fn decode(codec: &mut Codec, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        codec.decode(buf).map(|o| o.map(|(p, _len)| p))
    }

    pub fn encode(codec: &mut Codec, p: Packet, buf: &mut BytesMut) -> Result<(), EncodeError> {
        codec.encode(p, buf)
    }

    pub fn wire(case: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(&mut codec(), packet(case), &mut buf).expect("rmqtt-codec encodes the fixture");
        buf
    }
}
