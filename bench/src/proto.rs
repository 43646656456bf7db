//! The few MQTT 3.1.1 client steps the load tool needs, over raw tokio TCP with rumqttc's
//! `mqttbytes::v4` codec for decoding. PUBLISH is encoded by hand into one reused buffer
//! (no per-message allocation), so the tool stays cheaper than the brokers it measures.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::v4::{Connect, Packet, Subscribe};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Appends one PUBLISH packet carrying (publisher, seq, now) in the first 16 payload bytes.
pub fn encode_publish(
    buf: &mut BytesMut,
    topic: &str,
    qos: u8,
    pkid: u16,
    publisher: u32,
    seq: u32,
    payload_len: usize,
) {
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload_len;
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
    buf.put_u32(publisher);
    buf.put_u32(seq);
    buf.put_u64(now_ns());
    buf.put_bytes(0x5a, payload_len - HEADER_LEN);
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

pub struct Conn {
    pub stream: TcpStream,
    /// Bytes read past the CONNACK/SUBACK (a persistent session may deliver at once).
    pub leftover: BytesMut,
}

/// TCP connect + CONNECT + CONNACK (accepted), with a deadline.
pub async fn connect(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    timeout: Duration,
) -> Result<Conn> {
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
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
