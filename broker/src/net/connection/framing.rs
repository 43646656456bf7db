//! Packets on the socket: reading until one whole packet is decoded (never more than
//! `max_packet_size`), writing one packet at once (the handshake's refusals), and the writer
//! task that drains a connection's outbox in batches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};

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
/// Room on the stack for a quiet connection's read; a read that fills it means traffic.
pub(super) const QUIET_READ: usize = 1024;

pub(super) fn log_bad_input(peer: &SocketAddr, client_id: &str, error: &DecodeError) {
    warn!(%peer, client_id, error = %error, "bad packet: closing connection");
}
/// Reads what a quiet connection receives through room on the stack, then copies it into
/// `buf`: `read_buf` on an empty `BytesMut` reserves 64 B, which every idle client would
/// hold while it waits (issue 14's heap profile). Cancel safe: bytes leave the socket only
/// in the poll that copies them into `buf`.
pub(super) fn poll_read_quietly<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    let mut room = [0u8; QUIET_READ];
    let mut read = tokio::io::ReadBuf::new(&mut room);
    std::task::ready!(std::pin::Pin::new(reader).poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
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
/// encoded by a plain method, so no packet is held across a write, and how much of it is
/// written is kept here, so a batch whose writing future was dropped is finished by the next
/// one (never a packet cut short followed by another).
pub(super) struct Writing {
    pub(super) outbox: OutboxReceiver,
    encoder: Encoder,
    /// The batch being written (empty: none).
    buf: BytesMut,
    /// Bytes of `buf` already on the socket.
    written: usize,
    /// The batch's PUBLISH bytes ([`counted_bytes`]), and whether the socket closes after it.
    /// A `u32`: a batch is at most [`WRITE_BATCH_BYTES`] and one packet (< 256 MiB), and the
    /// 8 B saved keep an idle client's task cell a size class down (`net::footprint_tests`).
    batch: (u32, bool),
}

/// What the writer borrows from the rest of the connection while it runs: kept there, not
/// in [`Writing`], so that an idle connection's state holds each once (issue 14).
pub(super) struct WriterSide<'a> {
    /// True while a batch is in progress (see [`Writing::run`]).
    pub(super) busy: &'a AtomicBool,
    pub(super) client_id: &'a str,
    /// QoS 1/2 PUBLISHes read and not yet acknowledged, for an MQTT 5 client with a
    /// Receive Maximum: the writer counts one down at each PUBACK/PUBCOMP it writes.
    pub(super) unacknowledged: Option<&'a AtomicU32>,
    pub(super) stats: &'a Stats,
}

impl Writing {
    pub(super) fn new(outbox: OutboxReceiver, encoder: Encoder) -> Self {
        Writing {
            outbox,
            encoder,
            // Starts empty and grows with the traffic: an idle sensor connection should cost
            // next to nothing here, not a 64 KiB batch buffer (10,000 idle clients measured
            // 19 KiB each with it).
            buf: BytesMut::new(),
            written: 0,
            batch: (0, false),
        }
    }

    /// Finishes the batch in progress, if any, then drains the outbox onto the socket in
    /// batches until every sender is gone, a `Close` was written or a write failed.
    /// `side.busy` is true while a batch is in progress; while it is false the writer waits
    /// on the outbox holding nothing, which is when the connection may go quiet (mod.rs).
    ///
    /// Cancel safety: a state machine that survives the drop. Each `write` puts some bytes on
    /// the socket (counted in `written`) or none, and `recv` loses no packet; dropped
    /// anywhere, the next call goes on where this one stopped. `writer` is the socket's
    /// writing side for this call only (the connection keeps the socket whole between its
    /// phases: a split socket is a shared allocation in every idle client).
    pub(super) async fn run<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        side: &WriterSide<'_>,
    ) {
        loop {
            if self.buf.is_empty() {
                side.busy.store(false, Ordering::Relaxed);
                let Some(first) = self.outbox.recv().await else {
                    return;
                };
                let (publish_bytes, close) = self.encode_batch(first, side);
                self.batch = (u32::try_from(publish_bytes).unwrap_or(u32::MAX), close);
            }
            side.busy.store(true, Ordering::Relaxed);
            while self.written < self.buf.len() {
                match writer.write(&self.buf[self.written..]).await {
                    Ok(n) if n > 0 => self.written += n,
                    // A write error, or a socket that takes nothing more: the connection ends.
                    _ => {
                        self.end_batch();
                        let _ = writer.shutdown().await;
                        return;
                    }
                }
            }
            let close = self.end_batch();
            if close {
                let _ = writer.shutdown().await;
                return;
            }
        }
    }

    /// The batch is written (or given up): its buffer back to empty, its PUBLISH bytes off
    /// the subscriber's count; whether the socket is to be closed now.
    fn end_batch(&mut self) -> bool {
        self.buf.clear();
        self.written = 0;
        if self.buf.capacity() > WRITE_KEEP_BYTES && self.outbox.is_empty() {
            // A burst is over: an idle subscriber should not keep a 64 KiB batch buffer.
            self.buf = BytesMut::new();
        }
        let (publish_bytes, close) = std::mem::take(&mut self.batch);
        self.outbox.written(publish_bytes as usize);
        close
    }
}

impl Writing {
    /// Encodes `first` and what else is queued, up to [`WRITE_BATCH_BYTES`] or a `Close`:
    /// the PUBLISH bytes among them ([`counted_bytes`]), and whether the socket is to be
    /// closed after them.
    fn encode_batch(&mut self, first: Outbound, side: &WriterSide<'_>) -> (usize, bool) {
        let mut publish_bytes = 0;
        let mut next = Some(first);
        while let Some(packet) = next.take() {
            publish_bytes += counted_bytes(&packet);
            if let Err(e) = self.encoder.encode(&packet, &mut self.buf) {
                let client_id = side.client_id;
                match &packet {
                    Outbound::Publish { message, .. } => {
                        // The router checks a client's maximum packet size before it sends;
                        // this is the backstop, logged and counted the same way.
                        side.stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                        warn!(client_id = %client_id, topic = %message.topic, error = %e, "cannot encode outgoing PUBLISH: dropped")
                    }
                    _ => {
                        warn!(client_id = %client_id, error = %e, "cannot encode outgoing packet: dropped")
                    }
                }
            }
            if let Some(count) = side.unacknowledged {
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
    fn size<W: AsyncWrite + Unpin>(mut writer: W) -> usize {
        let (_outbox, rx) = crate::outbox::Outbox::new();
        let mut writing = Writing::new(rx, Encoder::V4);
        let (busy, stats) = (AtomicBool::new(false), Stats::default());
        let side = WriterSide {
            busy: &busy,
            client_id: "",
            unacknowledged: None,
            stats: &stats,
        };
        let size = std::mem::size_of_val(&writing.run(&mut writer, &side));
        size
    }
    // The serving phase's `WriteHalf` is one pointer, whatever the stream.
    size(tokio::io::split(tokio::io::empty()).1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// A socket that takes at most 100 bytes a write, and nothing past `limit` until the
    /// limit is lifted (a client that stopped reading, then reads again).
    struct Throttled {
        taken: Arc<Mutex<Vec<u8>>>,
        limit: Arc<Mutex<usize>>,
    }

    impl AsyncWrite for Throttled {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let mut taken = self.taken.lock().expect("lock");
            let room = self.limit.lock().expect("lock").saturating_sub(taken.len());
            if room == 0 {
                return Poll::Pending;
            }
            let n = data.len().min(100).min(room);
            taken.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_cut_short_by_a_dropped_future_is_finished_by_the_next() {
        let (outbox, rx) = crate::outbox::Outbox::new();
        let mut want = BytesMut::new();
        for pkid in 1..=1000u16 {
            Encoder::V4
                .encode(&Outbound::PubAck(pkid), &mut want)
                .expect("encode");
            outbox.send(Outbound::PubAck(pkid));
        }
        let taken = Arc::new(Mutex::new(Vec::new()));
        let limit = Arc::new(Mutex::new(1_001));
        let mut socket = Throttled {
            taken: taken.clone(),
            limit: limit.clone(),
        };
        let mut writing = Writing::new(rx, Encoder::V4);
        let (busy, stats) = (AtomicBool::new(false), Stats::default());
        let side = WriterSide {
            busy: &busy,
            client_id: "t",
            unacknowledged: None,
            stats: &stats,
        };
        // The socket stops taking bytes in the middle of a PUBACK; the future is dropped
        // there (as a connection's serving phase is when its reader ends the connection).
        let cut =
            tokio::time::timeout(Duration::from_millis(100), writing.run(&mut socket, &side)).await;
        assert!(cut.is_err(), "the writer waits on the full socket");
        assert!(busy.load(Ordering::Relaxed), "dropped mid-batch");
        assert_eq!(taken.lock().expect("lock").len(), 1_001);
        // The socket drains; with every sender gone the writer ends once all is written.
        *limit.lock().expect("lock") = usize::MAX;
        drop(outbox);
        tokio::time::timeout(Duration::from_secs(5), writing.run(&mut socket, &side))
            .await
            .expect("the batch is finished and the writer ends");
        assert!(!busy.load(Ordering::Relaxed));
        // Every PUBACK whole and in order: the rest of the cut batch, nothing before it.
        assert_eq!(&taken.lock().expect("lock")[..], &want[..]);
    }
}
