//! One client connection: the CONNECT handshake, then a reader that decodes packets and
//! hands them to the router, and a writer that encodes what the router sends back.
//!
//! Reader and writer are separate tasks so that a client that is slow to read can never
//! stop us from reading its acknowledgements (and vice versa). The reader enforces the
//! keep-alive (1.5x the client's value [MQTT-3.1.2-24]) and ends the connection on any
//! malformed packet or protocol violation, telling the router whether the end was
//! graceful (DISCONNECT: no will) or not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use crate::outbox::Outbox;
use crate::protocol::inbound::{DecodeError, Inbound};
use crate::protocol::message::{CloseReason, Outbound, QoS};
use crate::protocol::Decoder;
use crate::router::RouterCmd;
use crate::session::ConnId;

mod context;
mod dispatch;
mod framing;
mod handshake;

pub use context::ConnectionContext;
use context::Guard;
use dispatch::dispatch;
use framing::write_loop;
#[cfg(test)]
pub(crate) use framing::write_loop_future_size;
use handshake::{open, Opened};

/// How long a connection with nothing buffered keeps its read buffer before giving it back.
const IDLE_BUFFER_RELEASE: Duration = Duration::from_secs(1);

/// Why the reader stopped.
enum End {
    /// DISCONNECT received: the will is discarded [MQTT-3.14.4-3], unless an MQTT 5 client
    /// asked for it (reason 0x04); `session_expiry` is a new interval it set.
    Disconnect {
        publish_will: bool,
        session_expiry: Option<u32>,
    },
    /// Anything else: socket closed or failed, keep-alive expired, bad packet, taken over,
    /// broker shutting down. The will is published. `tell`: what an MQTT 5 client is sent
    /// in a DISCONNECT before the close (`None`: the client went, or is told by the router).
    Abrupt(String, Option<CloseReason>),
}

fn abrupt(why: impl Into<String>, tell: CloseReason) -> End {
    End::Abrupt(why.into(), Some(tell))
}

/// Serves one client over any byte stream (TCP, or TLS over TCP: `server::serve` accepts).
/// `identity`: the user name a verified client certificate gives (`use_identity_as_username`).
/// `ctx` is shared by the listener's connections (a copy in each would be 144 bytes, twice
/// over: an async fn's future keeps its arguments beside the locals they move into).
pub async fn handle<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    identity: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    // Enough for a typical CONNECT; `read_buf` grows it for a longer one.
    let mut buf = BytesMut::with_capacity(256);
    let mut decoder = Decoder::new();

    // Boxed: held inline, the handshake's futures (timers, the password check, the
    // CONNECT on its way to the router) would be room the task keeps for as long as the
    // client stays connected.
    let Some(Opened {
        conn,
        client_id,
        keep_alive,
        version,
        session_expiry,
        mut guard,
        encoder,
        outbox: own_outbox,
        outbox_rx,
    }) = Box::pin(open(
        (&mut reader, &mut writer),
        (&mut buf, &mut decoder),
        &peer,
        &ctx,
        identity,
    ))
    .await
    else {
        return;
    };

    // MQTT 5 Receive Maximum: QoS 1/2 PUBLISHes read and not yet acknowledged, counted up
    // by the reader and down by the writer as it writes their PUBACK/PUBCOMP.
    let unacknowledged = (version == crate::protocol::Version::V5
        && ctx.limits.receive_maximum < u16::MAX)
        .then(|| Arc::new(AtomicU32::new(0)));
    // The writer runs in this task, polled beside the reader (never after it): a second
    // task would cost every connection another task header and future (issue 14), and
    // `select!` polls both whenever either can go on, so a slow writer never stops the
    // reader (nor the reverse).
    let mut writing = std::pin::pin!(write_loop(
        writer,
        outbox_rx,
        encoder,
        (client_id.clone(), unacknowledged.clone()),
        ctx.stats.clone(),
    ));
    let mut written = false;
    let keep_alive_limit =
        (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    // Cancel safety: the writer is polled by reference (the select cancels nothing of it)
    // and `signalled()` holds no data. `read_loop` is dropped only when the
    // connection ends anyway: a packet it had partly read, or a command it had not yet handed
    // to the router, was never acknowledged, so the client sends it again after reconnecting.
    let mut reading = Reading {
        buf: &mut buf,
        decoder: &mut decoder,
        conn,
        client_id: &client_id,
        ctx: &ctx,
        keep_alive_limit,
        session_expiry,
        unacknowledged,
        outbox: &own_outbox,
    };
    let end = tokio::select! {
        end = read_loop(&mut reader, &mut reading, &mut guard) => end,
        _ = &mut writing => {
            written = true;
            End::Abrupt("closed by broker or write failed".into(), None)
        }
        _ = ctx.shutdown.signalled() => abrupt("broker shutting down", CloseReason::ServerShuttingDown),
    };
    let (graceful, session_expiry, tell) = match &end {
        End::Disconnect {
            publish_will,
            session_expiry,
        } => {
            info!(%peer, client_id = %client_id, publish_will, "client disconnected");
            (!publish_will, *session_expiry, None)
        }
        End::Abrupt(reason, tell) => {
            info!(%peer, client_id = %client_id, reason = %reason, "connection closed");
            (false, None, *tell)
        }
    };
    // The router writes the DISCONNECT telling why (a 3.1.1 client just sees the close),
    // after anything it sent before, the CONNACK above all.
    let told = ctx
        .router
        .send(RouterCmd::Disconnected {
            conn,
            graceful,
            session_expiry,
            tell,
        })
        .await;
    if let (Err(_), Some(tell)) = (told, tell) {
        // The router is gone (the broker is stopping): say it here.
        own_outbox.send(Outbound::Close(tell));
    }
    // Let the writer flush what is queued (e.g. a final PUBACK) for a moment, then stop it.
    drop(own_outbox);
    if !written {
        let _ = timeout(Duration::from_millis(100), writing).await;
    }
}

/// A DISCONNECT ends the connection; it may not raise the session expiry from 0
/// [MQTT-3.14.2-2].
fn on_disconnect(
    d: &crate::protocol::inbound::Disconnect,
    connect_expiry: u32,
    client_id: &str,
    ctx: &ConnectionContext,
) -> End {
    if connect_expiry == 0 && d.session_expiry.is_some_and(|e| e > 0) {
        ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        warn!(
            client_id,
            "DISCONNECT sets a session expiry after CONNECT set 0: closing"
        );
        return abrupt(
            "session expiry raised from 0 at DISCONNECT",
            CloseReason::ProtocolError,
        );
    }
    End::Disconnect {
        publish_will: d.publish_will,
        session_expiry: d.session_expiry,
    }
}

/// Counts a QoS 1/2 PUBLISH against an MQTT 5 client's Receive Maximum; the end of the
/// connection (DISCONNECT 0x93) when it has one more unacknowledged than allowed.
fn over_receive_maximum(
    packet: &Inbound,
    unacknowledged: Option<&AtomicU32>,
    ctx: &ConnectionContext,
    client_id: &str,
) -> Option<End> {
    let (Inbound::Publish(p), Some(count)) = (packet, unacknowledged) else {
        return None;
    };
    let limit = u32::from(ctx.limits.receive_maximum);
    if p.message.qos == QoS::AtMostOnce || count.fetch_add(1, Ordering::Relaxed) < limit {
        return None;
    }
    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    warn!(
        client_id,
        receive_maximum = limit,
        "more QoS 1/2 PUBLISHes unacknowledged than the Receive Maximum: closing"
    );
    Some(abrupt(
        "receive maximum exceeded",
        CloseReason::ReceiveMaximumExceeded,
    ))
}

/// Back-pressure on a publisher (outbox.rs has the policy): waits before reading more from
/// it while more than its share of its messages wait in the router's queue, then while a
/// live subscriber it feeds QoS 0 is behind, unless that one turns out slow.
async fn pace(outbox: &Outbox, ctx: &ConnectionContext, client_id: &str) {
    // The router runs behind its publishers: keeping each one's part of its queue short
    // means a subscriber the router finds behind is behind by little when the publisher
    // hears of it (just below), and one publisher cannot fill the router's queue.
    outbox.router_caught_up().await;
    if let Some(subscriber) = outbox.take_wait() {
        ctx.stats.publisher_waits.fetch_add(1, Ordering::Relaxed);
        if !subscriber.caught_up().await {
            ctx.stats.slow_subscribers.fetch_add(1, Ordering::Relaxed);
            debug!(
                client_id,
                "a subscriber this client feeds QoS 0 stayed behind: marked slow"
            );
        }
    }
}

/// What the reader works with after CONNECT.
struct Reading<'a> {
    buf: &'a mut BytesMut,
    decoder: &'a mut Decoder,
    conn: ConnId,
    client_id: &'a str,
    ctx: &'a ConnectionContext,
    keep_alive_limit: Option<Duration>,
    /// The session expiry the CONNECT set: a DISCONNECT may not raise it from 0.
    session_expiry: u32,
    /// QoS 1/2 PUBLISHes not yet acknowledged, for an MQTT 5 client with a Receive Maximum.
    unacknowledged: Option<Arc<AtomicU32>>,
    /// This connection's outbox: where the router says a subscriber it feeds is behind.
    outbox: &'a Outbox,
}

async fn read_loop(
    reader: &mut (impl AsyncRead + Unpin),
    reading: &mut Reading<'_>,
    guard: &mut Guard,
) -> End {
    let Reading {
        buf,
        decoder,
        conn,
        client_id,
        ctx,
        keep_alive_limit,
        session_expiry,
        unacknowledged,
        outbox,
    } = reading;
    let (conn, client_id, ctx, keep_alive_limit) = (*conn, *client_id, *ctx, *keep_alive_limit);
    let far_future = Duration::from_secs(86400 * 365);
    let mut ingest_paused = ctx.ingest_paused.clone();
    let mut has_published = false;
    // A read has filled the buffer since the CONNECT: the client sends more than a few
    // small packets (a SUBSCRIBE or a ping does not make an idle client's buffer 4 KiB).
    let mut traffic = false;
    loop {
        // Handle every whole packet already buffered before reading again.
        loop {
            let packet = match decoder.decode(buf, ctx.limits.max_packet_size) {
                Ok(p) => p,
                Err(DecodeError::Incomplete) => break,
                Err(e) => {
                    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(client_id, error = %e, "bad packet: closing connection");
                    return abrupt(e.to_string(), e.close_reason());
                }
            };
            if let Inbound::Disconnect(d) = &packet {
                return on_disconnect(d, *session_expiry, client_id, ctx);
            }
            if let Some(end) =
                over_receive_maximum(&packet, unacknowledged.as_deref(), ctx, client_id)
            {
                return end;
            }
            if matches!(packet, Inbound::Publish(_)) {
                has_published = true;
                if let Some(bucket) = &mut guard.publish_rate {
                    if !bucket.try_take(Instant::now()) {
                        ctx.stats
                            .publish_rate_exceeded
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(
                            client_id,
                            max_publish_rate = ctx.limits.max_publish_rate,
                            "publish rate over max_publish_rate: closing connection"
                        );
                        return abrupt("max_publish_rate exceeded", CloseReason::QuotaExceeded);
                    }
                }
            }
            if let Err(reason) = dispatch(packet, conn, client_id, ctx, guard, outbox).await {
                ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                warn!(client_id, reason, "protocol violation: closing connection");
                return abrupt(reason, CloseReason::ProtocolError);
            }
        }
        // Cancel safety: pacing holds no data (a partial packet stays in `buf`).
        pace(outbox, ctx, client_id).await;
        if has_published && *ingest_paused.borrow() {
            debug!(
                client_id,
                "store full or failing: not reading from this publisher"
            );
            if ingest_paused.wait_for(|paused| !*paused).await.is_err() {
                return abrupt("broker stopping", CloseReason::ServerShuttingDown);
            }
        }
        // Reads run at least 1 KiB at a time once the client sends more than its CONNECT;
        // a client that only connected keeps the small buffer its CONNECT came in, and one
        // whose buffer was given back (below) gets it again with its next bytes.
        if (traffic || !buf.is_empty()) && buf.capacity() > 0 && buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let deadline = Instant::now() + keep_alive_limit.unwrap_or(far_future);
        let read = if buf.is_empty() && buf.capacity() > 0 {
            // Nothing buffered: wait a while with the buffer, then give it back, so a client
            // that went quiet after a burst holds none; `read_buf` allocates 64 bytes when
            // data comes and the buffer grows with the traffic again.
            // Cancel safety: `read_buf` is cancel safe (a read that has not completed has
            // taken nothing from the socket), so the timeout may drop it.
            let idle_after = (Instant::now() + IDLE_BUFFER_RELEASE).min(deadline);
            match tokio::time::timeout_at(idle_after, reader.read_buf(buf)).await {
                Ok(read) => Some(read),
                Err(_) => {
                    **buf = BytesMut::new();
                    None
                }
            }
        } else {
            None
        };
        let read = match read {
            Some(read) => Ok(read),
            None => tokio::time::timeout_at(deadline, reader.read_buf(buf)).await,
        };
        match read {
            Err(_) => {
                ctx.stats
                    .keep_alive_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return abrupt("keep-alive expired", CloseReason::KeepAliveTimeout);
            }
            Ok(Ok(0)) => return End::Abrupt("connection closed by client".into(), None),
            Ok(Err(e)) => return End::Abrupt(format!("read error: {e}"), None),
            Ok(Ok(_)) => traffic = traffic || buf.len() == buf.capacity(),
        }
    }
}
