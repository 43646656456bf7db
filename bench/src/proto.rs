//! The few MQTT client steps the load tool needs, over raw tokio TCP: MQTT 3.1.1 with
//! rumqttc's `mqttbytes::v4` codec, and MQTT 5 (publishers, `--protocol 5`) with
//! rmqtt-codec's v5 codec (the one the broker uses, from the client side) for CONNECT,
//! CONNACK and the acknowledgements. PUBLISH is encoded by hand into one reused buffer in
//! both versions (no per-message allocation), so the tool stays cheaper than the brokers it
//! measures and costs the same per message whichever version it speaks.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, BytesMut};
use rmqtt_codec::v5;
use rumqttc::mqttbytes::v4::{Connect, Packet, Subscribe};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::{Decoder as _, Encoder as _};

/// Largest packet the tool accepts from a broker: a 16 MiB payload with its topic and header
/// (Waystation's largest `max_packet_size`), so large-message runs can be received.
pub const MAX_PACKET: usize = 17 << 20;
/// Bytes at the start of every payload: publisher id, sequence number, send time.
pub const HEADER_LEN: usize = 16;

pub fn qos_from(n: u8) -> Result<QoS> {
    Ok(match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => bail!("QoS must be 0, 1 or 2"),
    })
}

/// Wall-clock nanoseconds: publisher and subscriber may be separate processes.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// MQTT 5 PUBLISH properties (`--v5-properties`): message expiry interval 3600 s and one
/// user property, as a whole property block (length first).
pub fn v5_publish_properties() -> Vec<u8> {
    let mut body = vec![0x02];
    body.extend_from_slice(&3600u32.to_be_bytes());
    body.push(0x26);
    for s in ["src", "wsbench"] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut block = vec![body.len() as u8];
    block.extend(body);
    block
}

/// Appends one PUBLISH packet carrying (publisher, seq, sent) in the first 16 payload bytes:
/// `sent_ns` is the wall-clock send time, or the scheduled one in an open-loop run (so a late
/// send counts as latency). `v5_properties`: an MQTT 5 PUBLISH with this property block
/// (`[0]`: none); `None`: 3.1.1.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    buf: &mut BytesMut,
    topic: &str,
    qos: u8,
    pkid: u16,
    publisher: u32,
    seq: u32,
    sent_ns: u64,
    payload_len: usize,
    v5_properties: Option<&[u8]>,
) {
    put_publish_header(buf, topic, qos, pkid, payload_len, v5_properties);
    buf.put_u32(publisher);
    buf.put_u32(seq);
    buf.put_u64(sent_ns);
    buf.put_bytes(0x5a, payload_len - HEADER_LEN);
}

/// Appends one PUBLISH packet carrying `payload` as it is (e.g. a firmware event).
pub fn encode_publish_payload(
    buf: &mut BytesMut,
    topic: &str,
    qos: u8,
    pkid: u16,
    payload: &[u8],
    v5_properties: Option<&[u8]>,
) {
    put_publish_header(buf, topic, qos, pkid, payload.len(), v5_properties);
    buf.put_slice(payload);
}

/// A PUBLISH up to its payload, which is `payload_len` bytes.
fn put_publish_header(
    buf: &mut BytesMut,
    topic: &str,
    qos: u8,
    pkid: u16,
    payload_len: usize,
    v5_properties: Option<&[u8]>,
) {
    let props_len = v5_properties.map_or(0, <[u8]>::len);
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + props_len + payload_len;
    buf.reserve(remaining + 5);
    buf.put_u8(0x30 | (qos << 1));
    let mut len = remaining;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic.as_bytes());
    if qos > 0 {
        buf.put_u16(pkid);
    }
    if let Some(props) = v5_properties {
        buf.put_slice(props);
    }
}

/// (publisher, seq, sent_ns) from a payload written by `encode_publish`.
pub fn parse_payload(p: &[u8]) -> Option<(u32, u32, u64)> {
    if p.len() < HEADER_LEN {
        return None;
    }
    let publisher = u32::from_be_bytes(p[0..4].try_into().ok()?);
    let seq = u32::from_be_bytes(p[4..8].try_into().ok()?);
    let ts = u64::from_be_bytes(p[8..16].try_into().ok()?);
    Some((publisher, seq, ts))
}

/// Decodes every complete packet in `buf`.
pub fn drain_packets(buf: &mut BytesMut, mut each: impl FnMut(Packet) -> Result<()>) -> Result<()> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => each(p)?,
            Err(CodecError::InsufficientBytes(_)) => return Ok(()),
            Err(e) => bail!("decode: {e:?}"),
        }
    }
}

/// What a publisher reads (its acknowledgements), in either version: packet id and, for MQTT 5,
/// whether the reason code refused the message (0x80 or above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    PubAck { pkid: u16, refused: bool },
    PubRec { pkid: u16, refused: bool },
    PubComp { pkid: u16 },
    Other,
}

/// A publisher's packet reader: rumqttc's v4 codec, or rmqtt-codec's v5 one. The v5 codec
/// keeps state between calls (it consumes a fixed header before the body is in), so one
/// lives for the connection's life.
pub enum AckReader {
    V4,
    V5(Box<v5::Codec>),
}

impl AckReader {
    /// Decodes every complete packet in `buf`. A DISCONNECT from an MQTT 5 broker is an
    /// error carrying its reason code.
    pub fn drain(&mut self, buf: &mut BytesMut, mut each: impl FnMut(Reply)) -> Result<()> {
        match self {
            AckReader::V4 => drain_packets(buf, |p| {
                each(match p {
                    Packet::PubAck(a) => Reply::PubAck {
                        pkid: a.pkid,
                        refused: false,
                    },
                    Packet::PubRec(r) => Reply::PubRec {
                        pkid: r.pkid,
                        refused: false,
                    },
                    Packet::PubComp(c) => Reply::PubComp { pkid: c.pkid },
                    _ => Reply::Other,
                });
                Ok(())
            }),
            AckReader::V5(codec) => loop {
                let packet = match codec.decode(buf) {
                    Ok(Some((p, _))) => p,
                    Ok(None) => return Ok(()),
                    Err(e) => bail!("decode (MQTT 5): {e}"),
                };
                each(match packet {
                    v5::Packet::PublishAck(a) => Reply::PubAck {
                        pkid: a.packet_id.get(),
                        refused: a.reason_code as u8 >= 0x80,
                    },
                    v5::Packet::PublishReceived(a) => Reply::PubRec {
                        pkid: a.packet_id.get(),
                        refused: a.reason_code as u8 >= 0x80,
                    },
                    v5::Packet::PublishComplete(a) => Reply::PubComp {
                        pkid: a.packet_id.get(),
                    },
                    v5::Packet::Disconnect(d) => {
                        bail!("broker sent DISCONNECT {:?}", d.reason_code)
                    }
                    _ => Reply::Other,
                });
            },
        }
    }
}

pub struct Conn {
    pub stream: TcpStream,
    /// Bytes read past the CONNACK/SUBACK (a persistent session may deliver at once).
    pub leftover: BytesMut,
    /// How to read what the broker sends this client (its protocol version).
    pub reader: AckReader,
}

/// TCP connect + CONNECT + CONNACK (accepted), with a deadline, in MQTT 3.1.1
/// (`protocol` 4) or MQTT 5 (`protocol` 5: clean start, session expiry 0 with `clean`,
/// "never" without).
pub async fn connect(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    timeout: Duration,
    protocol: u8,
) -> Result<Conn> {
    connect_from(None, addr, client_id, clean, keep_alive, timeout, protocol).await
}

/// [`connect`] from the source address `src` (any port): one (source, destination) pair
/// gives at most ~28k ephemeral ports, so many idle clients spread over 127.0.0.x.
pub async fn connect_from(
    src: Option<IpAddr>,
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    timeout: Duration,
    protocol: u8,
) -> Result<Conn> {
    let fut = async {
        let stream = match src {
            None => TcpStream::connect(addr).await,
            Some(ip) => {
                let sock = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(ip, 0))
                    .with_context(|| format!("bind {ip}"))?;
                sock.connect(addr).await
            }
        }
        .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        if protocol == 5 {
            return connect_v5(stream, client_id, clean, keep_alive).await;
        }
        let mut connect = Connect::new(client_id);
        connect.clean_session = clean;
        connect.keep_alive = keep_alive;
        let mut out = BytesMut::new();
        connect
            .write(&mut out)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut conn = Conn {
            stream,
            leftover: BytesMut::with_capacity(4096),
            reader: AckReader::V4,
        };
        conn.stream.write_all(&out).await?;
        loop {
            match Packet::read(&mut conn.leftover, MAX_PACKET) {
                Ok(Packet::ConnAck(ack)) => {
                    if ack.code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success {
                        bail!("CONNACK refused: {:?}", ack.code);
                    }
                    return Ok(conn);
                }
                Ok(other) => bail!("expected CONNACK, got {other:?}"),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => bail!("decode CONNACK: {e:?}"),
            }
            if conn.stream.read_buf(&mut conn.leftover).await? == 0 {
                bail!("closed before CONNACK");
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .context("CONNACK timeout")?
}

async fn connect_v5(
    stream: TcpStream,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
) -> Result<Conn> {
    let connect = v5::Connect {
        clean_start: clean,
        keep_alive,
        session_expiry_interval_secs: if clean { 0 } else { u32::MAX },
        client_id: client_id.into(),
        ..v5::Connect::default()
    };
    let mut codec = Box::new(v5::Codec::new(0, 0));
    let mut out = BytesMut::new();
    codec
        .encode(v5::Packet::Connect(Box::new(connect)), &mut out)
        .map_err(|e| anyhow::anyhow!("encode CONNECT: {e}"))?;
    let mut conn = Conn {
        stream,
        leftover: BytesMut::with_capacity(4096),
        reader: AckReader::V4,
    };
    conn.stream.write_all(&out).await?;
    loop {
        match codec.decode(&mut conn.leftover) {
            Ok(Some((v5::Packet::ConnectAck(ack), _))) => {
                if ack.reason_code != v5::ConnectAckReason::Success {
                    bail!("CONNACK refused: {:?}", ack.reason_code);
                }
                conn.reader = AckReader::V5(codec);
                return Ok(conn);
            }
            Ok(Some((other, _))) => bail!("expected CONNACK, got {other:?}"),
            Ok(None) => {}
            Err(e) => bail!("decode CONNACK (MQTT 5): {e}"),
        }
        if conn.stream.read_buf(&mut conn.leftover).await? == 0 {
            bail!("closed before CONNACK (MQTT 5 CONNECT)");
        }
    }
}

/// Sends SUBSCRIBE (packet id 1); the SUBACK is consumed by the caller's read loop.
pub async fn send_subscribe(conn: &mut Conn, filter: &str, qos: QoS) -> Result<()> {
    let mut sub = Subscribe::new(filter, qos);
    sub.pkid = 1;
    let mut out = BytesMut::new();
    sub.write(&mut out).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    conn.stream.write_all(&out).await?;
    Ok(())
}

pub fn put_ack(buf: &mut BytesMut, kind: u8, pkid: u16) {
    // PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70: all two-byte remaining length.
    buf.put_u8(kind);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;
