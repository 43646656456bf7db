//! Packets on the socket: reading until one whole packet is decoded (never more than
//! `max_packet_size`), writing one packet at once (the handshake's refusals), and the writer
//! task that drains a connection's outbox in batches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use crate::outbox::{counted_bytes, OutboxReceiver};
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
/// The writer's state, owned by the connection between its phases (mod.rs): the batch is
/// encoded by a plain method, so no packet is held across a write.
pub(super) struct Writing<W> {
    writer: W,
    pub(super) outbox: OutboxReceiver,
    encoder: Encoder,
    client_id: Arc<str>,
    unacknowledged: Option<Arc<AtomicU32>>,
    stats: Arc<Stats>,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> Writing<W> {
    pub(super) fn new(
        writer: W,
        outbox: OutboxReceiver,
        encoder: Encoder,
        (client_id, unacknowledged): (Arc<str>, Option<Arc<AtomicU32>>),
        stats: Arc<Stats>,
    ) -> Self {
        Writing {
            writer,
            outbox,
            encoder,
            client_id,
            unacknowledged,
            stats,
            // Starts empty and grows with the traffic: an idle sensor connection should cost
            // next to nothing here, not a 64 KiB batch buffer (10,000 idle clients measured
            // 19 KiB each with it).
            buf: BytesMut::new(),
        }
    }

    /// Writes `first`, then drains the outbox onto the socket in batches until every sender
    /// is gone, a `Close` was written or a write failed. `busy` is true from the moment it
    /// has a packet until that batch is written: while it is false the writer waits on the
    /// outbox and holds nothing, so this future may be dropped (the connection goes quiet,
    /// mod.rs); while it is true it may not.
    pub(super) async fn run(&mut self, first: Option<Outbound>, busy: &AtomicBool) {
        let mut next = first;
        loop {
            let first = match next.take() {
                Some(packet) => packet,
                None => {
                    busy.store(false, Ordering::Relaxed);
                    match self.outbox.recv().await {
                        Some(packet) => packet,
                        None => return,
                    }
                }
            };
            busy.store(true, Ordering::Relaxed);
            let (publish_bytes, close) = self.encode_batch(first);
            let written = self.writer.write_all(&self.buf).await;
            self.buf.clear();
            if self.buf.capacity() > WRITE_KEEP_BYTES && self.outbox.is_empty() {
                // A burst is over: an idle subscriber should not keep a 64 KiB batch buffer.
                self.buf = BytesMut::new();
            }
            self.outbox.written(publish_bytes);
            if written.is_err() || close {
                let _ = self.writer.shutdown().await;
                return;
            }
        }
    }
}

impl<W> Writing<W> {
    /// Encodes `first` and what else is queued, up to [`WRITE_BATCH_BYTES`] or a `Close`:
    /// the PUBLISH bytes among them ([`counted_bytes`]), and whether the socket is to be
    /// closed after them.
    fn encode_batch(&mut self, first: Outbound) -> (usize, bool) {
        let mut publish_bytes = 0;
        let mut next = Some(first);
        while let Some(packet) = next.take() {
            publish_bytes += counted_bytes(&packet);
            if let Err(e) = self.encoder.encode(&packet, &mut self.buf) {
                let client_id = &self.client_id;
                match &packet {
                    Outbound::Publish { message, .. } => {
                        // The router checks a client's maximum packet size before it sends;
                        // this is the backstop, logged and counted the same way.
                        self.stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                        warn!(client_id = %client_id, topic = %message.topic, error = %e, "cannot encode outgoing PUBLISH: dropped")
                    }
                    _ => {
                        warn!(client_id = %client_id, error = %e, "cannot encode outgoing packet: dropped")
                    }
                }
            }
            if let Some(count) = &self.unacknowledged {
                if ends_inbound_flow(&packet) {
                    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                }
            }
            if matches!(packet, Outbound::Close(_)) {
                // Written (an MQTT 5 DISCONNECT with its reason), then the socket is closed.
                return (publish_bytes, true);
            }
            if self.buf.len() < WRITE_BATCH_BYTES {
                next = self.outbox.try_recv();
            }
        }
        (publish_bytes, false)
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

/// The size of the writer's future over a TCP socket (see `net::footprint_tests`).
#[cfg(test)]
pub(crate) fn write_loop_future_size() -> usize {
    fn size<W: AsyncWrite + Unpin>(writer: W) -> usize {
        let (_outbox, rx) = crate::outbox::Outbox::new();
        let mut writing = Writing::new(
            writer,
            rx,
            Encoder::V4,
            (Arc::from(""), None),
            Arc::default(),
        );
        let busy = AtomicBool::new(false);
        let size = std::mem::size_of_val(&writing.run(None, &busy));
        size
    }
    // A `WriteHalf` is one pointer, whatever the stream.
    size(tokio::io::split(tokio::io::empty()).1)
}
