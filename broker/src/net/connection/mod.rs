//! One client connection: the CONNECT handshake, then a reader that decodes packets and
//! hands them to the router, and a writer that encodes what the router sends back.
//!
//! Reader and writer are separate tasks so that a client that is slow to read can never
//! stop us from reading its acknowledgements (and vice versa). The reader enforces the
//! keep-alive (1.5x the client's value [MQTT-3.1.2-24]) and ends the connection on any
//! malformed packet or protocol violation, telling the router whether the end was
//! graceful (DISCONNECT: no will) or not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use crate::protocol::inbound::{DecodeError, Inbound};
use crate::protocol::message::{QoS, SubscribeFilter};
use crate::protocol::v4;
use crate::router::{OutboxHandle, RouterCmd};
use crate::session::{ConnId, Outbox};
use crate::topic::{valid_filter, valid_topic_name};

mod context;
mod framing;
mod handshake;

pub use context::ConnectionContext;
use context::{topic_within_limits, Guard};
use framing::write_loop;
use handshake::{admit, read_connect};

/// How long a connection with nothing buffered keeps its read buffer before giving it back.
const IDLE_BUFFER_RELEASE: Duration = Duration::from_secs(1);

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Why the reader stopped.
enum End {
    /// DISCONNECT received: the will is discarded [MQTT-3.14.4-3].
    Graceful,
    /// Anything else: socket closed or failed, keep-alive expired, bad packet, taken over,
    /// broker shutting down. The will is published.
    Abrupt(String),
}

/// Serves one client over any byte stream (TCP, or TLS over TCP: `server::serve` accepts).
/// `identity`: the user name a verified client certificate gives (`use_identity_as_username`).
pub async fn handle<S>(
    stream: S,
    peer: SocketAddr,
    ctx: ConnectionContext,
    identity: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    // Enough for a typical CONNECT; `read_buf` grows it for a longer one.
    let mut buf = BytesMut::with_capacity(256);

    let Some(connect) = read_connect(&mut reader, &mut writer, &mut buf, &peer, &ctx).await else {
        return;
    };
    let clean_session = connect.clean_session;
    let Some((request, mut guard)) = admit(connect, &mut writer, &peer, &ctx, identity).await
    else {
        return;
    };
    let (client_id, keep_alive) = (request.client_id.clone(), request.keep_alive_secs);

    let conn = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let (outbox, outbox_rx) = Outbox::new();
    let own_outbox = outbox.clone();
    if ctx
        .router
        .send(RouterCmd::Connect {
            conn,
            request,
            outbox: OutboxHandle(outbox),
        })
        .await
        .is_err()
    {
        return; // broker stopping
    }
    info!(%peer, client_id = %client_id, keep_alive, clean_session, "client connected");

    let mut writer_task = tokio::spawn(write_loop(writer, outbox_rx, client_id.clone()));
    let keep_alive_limit =
        (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    // Cancel safety: the writer is a task of its own (dropping its JoinHandle cancels
    // nothing) and `signalled()` holds no data. `read_loop` is dropped only when the
    // connection ends anyway: a packet it had partly read, or a command it had not yet handed
    // to the router, was never acknowledged, so the client sends it again after reconnecting.
    let end = tokio::select! {
        end = read_loop(&mut reader, &mut buf, conn, &client_id, &ctx, keep_alive_limit, &mut guard) => end,
        _ = &mut writer_task => End::Abrupt("closed by broker or write failed".into()),
        _ = ctx.shutdown.signalled() => End::Abrupt("broker shutting down".into()),
    };
    let graceful = matches!(end, End::Graceful);
    match &end {
        End::Graceful => info!(%peer, client_id = %client_id, "client disconnected"),
        End::Abrupt(reason) => {
            info!(%peer, client_id = %client_id, reason = %reason, "connection closed")
        }
    }
    let _ = ctx
        .router
        .send(RouterCmd::Disconnected { conn, graceful })
        .await;
    // Let the writer flush what is queued (e.g. a final PUBACK) for a moment, then stop it.
    drop(own_outbox);
    if !writer_task.is_finished() {
        own_close(&mut writer_task).await;
    }
}

async fn own_close(writer_task: &mut tokio::task::JoinHandle<()>) {
    if timeout(Duration::from_millis(100), &mut *writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
    }
}

async fn read_loop(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    conn: ConnId,
    client_id: &str,
    ctx: &ConnectionContext,
    keep_alive_limit: Option<Duration>,
    guard: &mut Guard,
) -> End {
    let far_future = Duration::from_secs(86400 * 365);
    let mut ingest_paused = ctx.ingest_paused.clone();
    let mut has_published = false;
    // The client has sent something since its CONNECT.
    let mut traffic = false;
    loop {
        // Handle every whole packet already buffered before reading again.
        loop {
            let packet = match v4::decode(buf, ctx.limits.max_packet_size) {
                Ok(p) => p,
                Err(DecodeError::Incomplete) => break,
                Err(e) => {
                    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(client_id, error = %e, "bad packet: closing connection");
                    return End::Abrupt(e.to_string());
                }
            };
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
                        return End::Abrupt("max_publish_rate exceeded".into());
                    }
                }
            }
            match dispatch(packet, conn, client_id, ctx, guard).await {
                Ok(true) => {}
                Ok(false) => return End::Graceful,
                Err(reason) => {
                    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(client_id, reason, "protocol violation: closing connection");
                    return End::Abrupt(reason.to_string());
                }
            }
        }
        if has_published && *ingest_paused.borrow() {
            debug!(
                client_id,
                "store full or failing: not reading from this publisher"
            );
            if ingest_paused.wait_for(|paused| !*paused).await.is_err() {
                return End::Abrupt("broker stopping".into());
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
                    *buf = BytesMut::new();
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
                return End::Abrupt("keep-alive expired".into());
            }
            Ok(Ok(0)) => return End::Abrupt("connection closed by client".into()),
            Ok(Err(e)) => return End::Abrupt(format!("read error: {e}")),
            Ok(Ok(_)) => traffic = true,
        }
    }
}

/// Acts on one packet. `Ok(false)`: DISCONNECT; `Err`: a protocol violation.
async fn dispatch(
    packet: Inbound,
    conn: ConnId,
    client_id: &str,
    ctx: &ConnectionContext,
    guard: &mut Guard,
) -> Result<bool, &'static str> {
    let cmd = match packet {
        Inbound::Connect(_) => return Err("second CONNECT on a connection"),
        Inbound::Disconnect => return Ok(false),
        Inbound::PingReq => RouterCmd::Ping { conn },
        Inbound::Publish(publish) => {
            let pkid = publish.pkid;
            let message = publish.message;
            if !valid_topic_name(&message.topic) {
                return Err("PUBLISH to an invalid topic name (wildcard, empty or NUL)");
            }
            debug!(client_id, topic = %message.topic, qos = message.qos as u8, dup = publish.dup, "publish received");
            let within = topic_within_limits(&message.topic, &ctx.limits);
            if !within
                || guard
                    .acl
                    .as_ref()
                    .is_some_and(|acl| !acl.may_publish(&message.topic))
            {
                let counter = if within {
                    &ctx.stats.acl_denied_publish
                } else {
                    &ctx.stats.limit_refusals
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if guard.should_log_refusal() {
                    let reason = if within {
                        "no write access (ACL)"
                    } else {
                        "topic over max_topic_length/max_topic_levels"
                    };
                    warn!(client_id, topic = %message.topic, reason, refusals = guard.refusals, "PUBLISH refused: acknowledged, not stored nor delivered");
                }
                let qos = message.qos;
                // QoS 0 needs no answer; QoS 1/2 are acknowledged in their turn by the router.
                if qos == QoS::AtMostOnce {
                    return Ok(true);
                }
                RouterCmd::Refused { conn, pkid, qos }
            } else {
                RouterCmd::Publish {
                    conn,
                    pkid,
                    message,
                }
            }
        }
        Inbound::PubAck(pkid) => RouterCmd::PubAck { conn, pkid },
        Inbound::PubRec(pkid) => RouterCmd::PubRec { conn, pkid },
        Inbound::PubRel(pkid) => RouterCmd::PubRel { conn, pkid },
        Inbound::PubComp(pkid) => RouterCmd::PubComp { conn, pkid },
        Inbound::Subscribe(subscribe) => {
            let filters = subscribe
                .filters
                .into_iter()
                .map(|(filter, qos)| {
                    let mut valid = valid_filter(&filter);
                    if !valid {
                        info!(client_id, filter = %filter, "invalid topic filter: refused in SUBACK");
                    } else if !topic_within_limits(&filter, &ctx.limits) {
                        valid = false;
                        ctx.stats.limit_refusals.fetch_add(1, Ordering::Relaxed);
                        if guard.should_log_refusal() {
                            warn!(client_id, filter = %filter, "topic filter over max_topic_length/max_topic_levels: refused in SUBACK");
                        }
                    } else if guard.acl.as_ref().is_some_and(|acl| !acl.may_subscribe(&filter)) {
                        valid = false;
                        ctx.stats.acl_denied_subscribe.fetch_add(1, Ordering::Relaxed);
                        if guard.should_log_refusal() {
                            warn!(client_id, filter = %filter, "no read access (ACL): filter refused in SUBACK");
                        }
                    }
                    SubscribeFilter {
                        requested: valid.then_some(qos),
                        filter,
                    }
                })
                .collect();
            RouterCmd::Subscribe {
                conn,
                pkid: subscribe.pkid,
                filters,
            }
        }
        Inbound::Unsubscribe(unsubscribe) => RouterCmd::Unsubscribe {
            conn,
            pkid: unsubscribe.pkid,
            filters: unsubscribe.filters,
        },
    };
    // A full router queue makes this wait: back-pressure on every publisher alike.
    ctx.router.send(cmd).await.map_err(|_| "broker stopping")?;
    Ok(true)
}
