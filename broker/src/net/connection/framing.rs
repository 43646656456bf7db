//! Packets on the socket: reading until one whole packet is decoded (never more than
//! `max_packet_size`), writing one packet at once (the handshake's refusals), and the writer
//! task that drains a connection's outbox in batches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use crate::outbox::OutboxReceiver;
use crate::protocol::inbound::{DecodeError, Inbound};
use crate::protocol::message::Outbound;
use crate::protocol::{Decoder, Encoder};
use crate::stats::Stats;

/// Write at most this much per socket write when draining the outbox.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// A write buffer larger than this is given back once the outbox is empty.
const WRITE_KEEP_BYTES: usize = 4 * 1024;

pub(super) fn log_bad_input(peer: &SocketAddr, client_id: &str, error: &DecodeError) {
    warn!(%peer, client_id, error = %error, "bad packet: closing connection");
}
/// Reads until one whole packet is decoded.
pub(super) async fn read_packet(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    decoder: &mut Decoder,
    max_packet_size: usize,
) -> Result<Inbound, DecodeError> {
    loop {
        match decoder.decode(buf, max_packet_size) {
            Err(DecodeError::Incomplete) => {}
            other => return other,
        }
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(DecodeError::Closed),
            Ok(_) => {}
        }
    }
}
pub(super) async fn write_now(
    writer: &mut (impl AsyncWrite + Unpin),
    encoder: &mut Encoder,
    packet: Outbound,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    encoder
        .encode(&packet, &mut buf)
        .map_err(std::io::Error::other)?;
    writer.write_all(&buf).await?;
    writer.flush().await
}
pub(super) async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    mut outbox: OutboxReceiver,
    mut encoder: Encoder,
    (client_id, unacknowledged): (Arc<str>, Option<Arc<AtomicU32>>),
    stats: Arc<Stats>,
) {
    // Starts empty and grows with the traffic: an idle sensor connection should cost next
    // to nothing here, not a 64 KiB batch buffer (10,000 idle clients measured 19 KiB each
    // with it).
    let mut buf = BytesMut::new();
    while let Some(first) = outbox.recv().await {
        let mut count = 0;
        let mut next = Some(first);
        let mut close = false;
        while let Some(packet) = next.take() {
            count += 1;
            if let Err(e) = encoder.encode(&packet, &mut buf) {
                match &packet {
                    Outbound::Publish { message, .. } => {
                        // The router checks a client's maximum packet size before it sends;
                        // this is the backstop, logged and counted the same way.
                        stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                        warn!(client_id = %client_id, topic = %message.topic, error = %e, "cannot encode outgoing PUBLISH: dropped")
                    }
                    _ => {
                        warn!(client_id = %client_id, error = %e, "cannot encode outgoing packet: dropped")
                    }
                }
            }
            if let Some(count) = &unacknowledged {
                if ends_inbound_flow(&packet) {
                    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                }
            }
            if matches!(packet, Outbound::Close(_)) {
                // Written (an MQTT 5 DISCONNECT with its reason), then the socket is closed.
                close = true;
                break;
            }
            if buf.len() < WRITE_BATCH_BYTES {
                next = outbox.try_recv();
            }
        }
        let written = writer.write_all(&buf).await;
        buf.clear();
        if buf.capacity() > WRITE_KEEP_BYTES && outbox.is_empty() {
            // A burst is over: an idle subscriber should not keep a 64 KiB batch buffer.
            buf = BytesMut::new();
        }
        outbox.written(count);
        if written.is_err() || close {
            let _ = writer.shutdown().await;
            return;
        }
    }
}

/// Whether writing `packet` ends a QoS 1/2 PUBLISH the client sent (its PUBACK, its PUBCOMP,
/// or a refusal): what frees a slot of the client's Receive Maximum [MQTT-3.3.4-9].
fn ends_inbound_flow(packet: &Outbound) -> bool {
    matches!(
        packet,
        Outbound::PubAck(_)
            | Outbound::PubComp(_)
            | Outbound::PubRefused { .. }
            | Outbound::PubAckNoSubscribers {
                qos: crate::protocol::message::QoS::AtLeastOnce,
                ..
            }
    )
}

/// The size of the writer task's future over a TCP socket (see `net::footprint_tests`).
#[cfg(test)]
pub(crate) fn write_loop_future_size() -> usize {
    fn size<W: AsyncWrite + Unpin>(writer: W) -> usize {
        let (_outbox, rx) = crate::outbox::Outbox::new();
        std::mem::size_of_val(&write_loop(
            writer,
            rx,
            Encoder::V4,
            (Arc::from(""), None),
            Arc::default(),
        ))
    }
    // A `WriteHalf` is one pointer, whatever the stream.
    size(tokio::io::split(tokio::io::empty()).1)
}
