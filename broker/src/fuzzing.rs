//! Entry points for `cargo fuzz` (the `fuzz/` crate) and for the regression tests of what
//! it finds. Not an API: hidden from the docs, may change at any time.
//!
//! - [`decode`], [`decode_v5`]: bytes through the MQTT 3.1.1 or 5 decoder in a loop, as a
//!   connection's reader does, with the properties the rest of the broker relies on checked.
//! - [`connection`]: bytes written by a client to a real connection task (CONNECT
//!   handshake, keep-alive, dispatch, ACL checks, writer) wired to a real router, over an
//!   in-memory duplex stream instead of a socket. The input ends with end of stream, so
//!   no run waits for a timeout.
//! - [`run_connection_v5`]: the same with the session opened by one of [`V5_CONNECTS`]
//!   valid MQTT 5 CONNECTs, so every input after its first byte exercises the MQTT 5
//!   connection (topic aliases, reason codes, receive maximum, the client's maximum
//!   packet size) instead of dying at the handshake.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::config::Limits;
use crate::net::connection::{self, ConnectionContext};
use crate::policy::acl::Acl;
use crate::policy::auth::Security;
use crate::protocol::inbound::{DecodeError, Inbound};
use crate::protocol::message::Outbound;
use crate::protocol::v4;
use crate::protocol::v5::{ConnAckInfo, V5Decoder, V5Encoder};
use crate::protocol::Version;
use crate::router::Router;
use crate::session::SessionLimits;
use crate::stats::Stats;
use crate::status::RouterSnapshot;
use crate::topic::{valid_filter, valid_topic_name};

/// Packets larger than this are refused, as with a small `max_packet_size`.
pub const MAX_PACKET_SIZE: usize = 8 * 1024;

/// Decodes `data` packet after packet until it runs out or a packet is refused.
pub fn decode(data: &[u8]) {
    decode_with(data, Version::V4)
}

/// [`decode`] for the MQTT 5 adapter (topic aliases carried from packet to packet, as on
/// one connection).
pub fn decode_v5(data: &[u8]) {
    decode_with(data, Version::V5)
}

fn decode_with(data: &[u8], version: Version) {
    let mut buf = BytesMut::from(data);
    let mut v5_decoder = V5Decoder::new();
    loop {
        let before = buf.clone();
        let decoded = match version {
            Version::V4 => v4::decode(&mut buf, MAX_PACKET_SIZE),
            Version::V5 => v5_decoder.decode(&mut buf, MAX_PACKET_SIZE),
        };
        match decoded {
            Ok(packet) => {
                assert!(
                    buf.len() < before.len(),
                    "a decoded packet consumed no bytes"
                );
                check_packet(packet, version);
            }
            Err(DecodeError::Incomplete) => {
                assert_eq!(buf, before, "Incomplete must leave the buffer as it was");
                return;
            }
            Err(_) => return,
        }
    }
}

/// What the connection does with each packet, minus the router: conversions, topic checks
/// and, for PUBLISH, that re-encoding what was decoded gives the same message back.
fn check_packet(packet: Inbound, version: Version) {
    match packet {
        Inbound::Connect(connect) => {
            if let Some(will) = connect.will {
                let _ = valid_topic_name(&will.topic);
            }
        }
        Inbound::Publish(publish) => {
            let (pkid, dup, message) = (publish.pkid, publish.dup, publish.message);
            if !valid_topic_name(&message.topic) {
                return;
            }
            let mut out = BytesMut::new();
            let publish = Outbound::Publish {
                pkid,
                message: message.clone(),
                dup,
            };
            let again = match version {
                Version::V4 => {
                    v4::encode(&publish, &mut out).expect("a decoded PUBLISH encodes");
                    v4::decode(&mut out, usize::MAX >> 4)
                }
                Version::V5 => {
                    V5Encoder::new(ConnAckInfo::default(), None, 0)
                        .encode(&publish, &mut out)
                        .expect("a decoded PUBLISH encodes");
                    V5Decoder::new().decode(&mut out, usize::MAX >> 4)
                }
            };
            match again {
                Ok(Inbound::Publish(again)) => {
                    // The expiry deadline is set again at decoding (a few ms later).
                    let strip = |m: &crate::protocol::message::Message| {
                        let mut m = m.clone();
                        if let Some(p) = m.properties.as_mut() {
                            std::sync::Arc::make_mut(p).expires_at_ms = None;
                        }
                        m
                    };
                    assert_eq!(strip(&again.message), strip(&message), "PUBLISH round trip")
                }
                other => panic!("re-encoded PUBLISH decodes as {other:?}"),
            }
            assert!(
                out.is_empty(),
                "re-encoded PUBLISH left {} bytes",
                out.len()
            );
        }
        Inbound::Subscribe(subscribe) => {
            for (filter, _qos) in subscribe.filters {
                let _ = valid_filter(&filter);
            }
        }
        Inbound::Unsubscribe(unsubscribe) => {
            for filter in unsubscribe.filters {
                let _ = valid_filter(&filter);
            }
        }
        Inbound::PubAck(_)
        | Inbound::PubRec(_)
        | Inbound::PubRel(_)
        | Inbound::PubComp(_)
        | Inbound::PingReq
        | Inbound::Disconnect(_) => {}
    }
}

/// The ACL [`connection`] uses when asked to: every kind of rule, so refusals are exercised.
pub const FUZZ_ACL: &str =
    "topic read $SYS/#\npattern readwrite devices/%c/#\npattern write sensors/%u/#\n\
topic deny devices/+/secret\nuser admin\ntopic readwrite #\n";

/// One client connection fed `data` (then end of stream) against a fresh router; returns
/// what the broker wrote back. With `acl`, [`FUZZ_ACL`] applies. Small limits make the
/// bounds reachable. Panics in the connection or router tasks are re-raised here.
pub async fn connection(data: &[u8], acl: bool) -> Vec<u8> {
    let limits = Limits {
        max_packet_size: MAX_PACKET_SIZE,
        max_inflight: 4,
        receive_maximum: 8,
        max_queued_messages: 16,
        connect_timeout: Duration::from_secs(5),
        max_publish_rate: 1000,
        max_subscriptions: 16,
        max_topic_length: 256,
        max_topic_levels: 8,
        max_queued_bytes: 64 * 1024,
        ..Limits::default()
    };
    let stats = Arc::new(Stats::default());
    let session_limits = SessionLimits {
        max_inflight: usize::from(limits.max_inflight),
        max_queued: limits.max_queued_messages,
        max_queued_bytes: limits.max_queued_bytes,
        max_subscriptions: limits.max_subscriptions,
    };
    let router = Router::new(
        session_limits,
        stats.clone(),
        None,
        Arc::new(Mutex::new(RouterSnapshot::default())),
    );
    let (router_tx, router_rx) = mpsc::channel(64);
    let router_task = tokio::spawn(router.run(router_rx));
    let (_ingest_tx, ingest_rx) = watch::channel(false);
    let mut security = Security::default();
    if acl {
        security.acl = Some(Arc::new(Acl::parse(FUZZ_ACL).expect("FUZZ_ACL parses")));
    }
    let ctx = ConnectionContext {
        limits,
        router: router_tx,
        stats,
        shutdown: crate::shutdown::Shutdown::new(),
        ingest_paused: ingest_rx,
        auth: Arc::new(crate::policy::auth::Authenticator::new(security)),
        tls: None,
    };
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
    let connection_task = tokio::spawn(connection::handle(server, peer, Arc::new(ctx), None));
    let (mut from_broker, mut to_broker) = tokio::io::split(client);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = from_broker.read_to_end(&mut out).await;
        out
    });
    let _ = to_broker.write_all(data).await;
    let _ = to_broker.shutdown().await;
    // The connection ends at end of stream (or earlier, on a bad packet); then every sender
    // of the router's queue is gone and the router stops.
    rethrow(connection_task.await);
    drop(to_broker);
    rethrow(router_task.await);
    match reader.await {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Vec::new(),
    }
}

fn rethrow(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Runs [`connection`] on a new current-thread runtime.
pub fn run_connection(data: &[u8], acl: bool) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    runtime.block_on(connection(data, acl))
}

/// How many MQTT 5 CONNECTs [`run_connection_v5`] chooses from.
pub const V5_CONNECTS: u8 = 4;

/// The MQTT 5 CONNECT `variant` (modulo [`V5_CONNECTS`]) that [`run_connection_v5`] opens
/// its session with; `fuzz/seed.py` writes the same variants' inputs.
/// - 0: client id `fz5`, clean start, no properties.
/// - 1: `fz5` with receive maximum 1, maximum packet size 128 (what the broker sends is
///   cut to fit or dropped), topic alias maximum 4, problem information off, a user property.
/// - 2: `fz5` as user `admin` (every topic under [`FUZZ_ACL`]), binary password, session
///   expiry 60 s without clean start, a QoS 1 retained will with every will property.
/// - 3: empty client id (the broker assigns one), session expiry "never", a will
///   delayed 5 s.
pub fn v5_connect(variant: u8) -> Vec<u8> {
    use rmqtt_codec::v5;
    use std::num::{NonZeroU16, NonZeroU32};
    let will = |delay| v5::LastWill {
        qos: v5::QoS::AtLeastOnce,
        retain: true,
        topic: "devices/fz5/will".into(),
        message: bytes::Bytes::from_static(b"gone"),
        will_delay_interval_sec: Some(delay),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00\x01")),
        message_expiry_interval: NonZeroU32::new(30),
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        is_utf8_payload: Some(true),
        response_topic: Some("devices/fz5/reply".into()),
    };
    let base = v5::Connect {
        clean_start: true,
        keep_alive: 60,
        client_id: "fz5".into(),
        ..v5::Connect::default()
    };
    let connect = match variant % V5_CONNECTS {
        0 => base,
        1 => v5::Connect {
            receive_max: NonZeroU16::new(1),
            max_packet_size: NonZeroU32::new(128),
            topic_alias_max: 4,
            request_problem_info: false,
            user_properties: vec![("fuzz".into(), "1".into())],
            ..base
        },
        2 => v5::Connect {
            clean_start: false,
            session_expiry_interval_secs: 60,
            username: Some("admin".into()),
            password: Some(bytes::Bytes::from_static(b"\x00\xffpw")),
            last_will: Some(will(0)),
            ..base
        },
        _ => v5::Connect {
            client_id: "".into(),
            session_expiry_interval_secs: u32::MAX,
            last_will: Some(will(5)),
            ..base
        },
    };
    let mut out = BytesMut::new();
    tokio_util::codec::Encoder::encode(
        &mut v5::Codec::new(0, 0),
        v5::Packet::Connect(Box::new(connect)),
        &mut out,
    )
    .expect("a fuzzing CONNECT encodes");
    out.to_vec()
}

/// [`run_connection`] for an MQTT 5 session: `data[0]` picks the CONNECT ([`v5_connect`],
/// bits 1-2) and the ACL (bit 0); the rest is what the client sends after its CONNECT.
pub fn run_connection_v5(data: &[u8]) -> Vec<u8> {
    let Some((&selector, rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut input = v5_connect(selector >> 1);
    input.extend_from_slice(rest);
    run_connection(&input, selector & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(client_id: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    }

    #[test]
    fn harness_connects_subscribes_and_gets_its_own_publish() {
        let mut input = connect("dev1");
        // SUBSCRIBE 1 "a/#" QoS 1, PUBLISH QoS 1 id 2 "a/b" "hi", PINGREQ; no DISCONNECT.
        input.extend([0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1]);
        input.extend([0x32, 9, 0, 3, b'a', b'/', b'b', 0, 2, b'h', b'i']);
        input.extend([0xc0, 0]);
        let out = run_connection(&input, false);
        assert!(
            out.starts_with(&[0x20, 2, 0, 0]),
            "CONNACK first: {out:02x?}"
        );
        assert!(
            out.windows(5).any(|w| w == [0x90, 3, 0, 1, 1]),
            "SUBACK: {out:02x?}"
        );
        assert!(
            out.windows(4).any(|w| w == [0x40, 2, 0, 2]),
            "PUBACK: {out:02x?}"
        );
        assert!(
            out.windows(2).any(|w| w == [0xd0, 0]),
            "PINGRESP: {out:02x?}"
        );
        assert!(
            out.windows(2).any(|w| w == b"hi"),
            "own publish delivered: {out:02x?}"
        );
    }

    #[test]
    fn harness_ends_on_garbage_and_on_silence() {
        assert!(run_connection(&[0xff, 0xff, 0xff], false).is_empty());
        assert!(run_connection(&[], true).is_empty());
        // CONNECT then end of stream.
        let out = run_connection(&connect("quiet"), true);
        assert!(out.starts_with(&[0x20, 2, 0, 0]), "{out:02x?}");
    }

    #[test]
    fn v5_harness_connects_and_resolves_topic_aliases() {
        // ACL off, CONNECT 0; SUBSCRIBE 1 "a/#" QoS 1; PUBLISH QoS 1 id 2 "a/b" alias 1
        // "hi"; PUBLISH QoS 1 id 3 by alias 1 alone "yo"; PINGREQ.
        let mut input = vec![0];
        input.extend([0x82, 9, 0, 1, 0, 0, 3, b'a', b'/', b'#', 1]);
        input.extend([
            0x32, 13, 0, 3, b'a', b'/', b'b', 0, 2, 3, 0x23, 0, 1, b'h', b'i',
        ]);
        input.extend([0x32, 10, 0, 0, 0, 3, 3, 0x23, 0, 1, b'y', b'o']);
        input.extend([0xc0, 0]);
        let out = run_connection_v5(&input);
        assert!(out.starts_with(&[0x20]), "CONNACK first: {out:02x?}");
        assert_eq!(out[3], 0, "CONNACK reason: {out:02x?}");
        assert!(
            out.windows(5).any(|w| w == [0x40, 4, 0, 3, 0]),
            "PUBACK for the alias-only PUBLISH: {out:02x?}"
        );
        assert!(
            out.windows(2).any(|w| w == b"yo"),
            "alias-only publish delivered: {out:02x?}"
        );
        // Every CONNECT variant is accepted, with and without the ACL.
        for selector in 0..V5_CONNECTS * 2 {
            let out = run_connection_v5(&[selector]);
            assert!(
                out.len() > 3 && out[0] == 0x20 && out[3] == 0,
                "variant {selector}: {out:02x?}"
            );
        }
    }

    /// The reason code of the DISCONNECT that ends `out`, if it ends with one.
    /// The reason code of the DISCONNECT among the packets the broker wrote (walked packet
    /// by packet: a DISCONNECT may carry a reason string).
    fn disconnect_reason(mut out: &[u8]) -> Option<u8> {
        while let Ok(len) = crate::protocol::frame::packet_len(out, usize::MAX) {
            let packet = out.get(..len)?;
            if packet[0] == 0xe0 {
                let header = crate::protocol::frame::header_len(packet);
                return Some(packet.get(header).copied().unwrap_or(0));
            }
            out = &out[len..];
        }
        None
    }

    #[test]
    fn v5_harness_closes_with_a_reason_code() {
        // Topic alias 17 (maximum 16): 0x94; AUTH: 0x82; an unknown property: 0x81.
        let out = run_connection_v5(&[0, 0x30, 8, 0, 1, b't', 3, 0x23, 0, 17, b'x']);
        assert_eq!(disconnect_reason(&out), Some(0x94), "{out:02x?}");
        let out = run_connection_v5(&[0, 0xf0, 0]);
        assert_eq!(disconnect_reason(&out), Some(0x82), "{out:02x?}");
        let out = run_connection_v5(&[0, 0x30, 7, 0, 1, b't', 2, 0x7f, 0, b'x']);
        assert_eq!(disconnect_reason(&out), Some(0x81), "{out:02x?}");
    }

    /// Found while writing the connection_v5 target: when a bad packet arrived in the same
    /// read as the CONNECT, the reader queued its DISCONNECT on the outbox before the router
    /// had handled the CONNECT, so the client got `e0 02 94 00` and never a CONNACK. MQTT 5
    /// forbids a DISCONNECT before a successful CONNACK [MQTT-3.14.0-1]; the DISCONNECT now
    /// goes through the router, behind the CONNACK.
    #[test]
    fn v5_disconnect_never_precedes_the_connack() {
        let out = run_connection_v5(&[0, 0x30, 8, 0, 1, b't', 3, 0x23, 0, 17, b'x']);
        assert_eq!(out.first(), Some(&0x20), "CONNACK first: {out:02x?}");
        assert_eq!(disconnect_reason(&out), Some(0x94), "{out:02x?}");
    }

    #[test]
    fn decode_loop_accepts_a_stream_of_packets() {
        let mut input = connect("dev1");
        input.extend([0x30, 5, 0, 1, b'x', b'o', b'k', 0xc0, 0, 0xe0, 0]);
        decode(&input);
        decode(&input[..input.len() - 3]);
        decode(&[0x10, 0xff, 0xff, 0xff, 0x7f]);
    }
}
