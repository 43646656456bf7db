//! The CONNECT handshake: the first packet within `connect_timeout`, then everything checked
//! before the router sees the client (its id, credentials or certificate identity, ACL,
//! will). Refusals answer with the CONNACK code Mosquitto would send.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use crate::outbox::{Outbox, OutboxReceiver};
use crate::policy::auth::Refusal;
use crate::policy::ratelimit::TokenBucket;
use crate::protocol::inbound::{Connect, DecodeError, Inbound};
use crate::protocol::message::{ConnectOutcome, Outbound};
use crate::protocol::v5::{ConnAckInfo, V5Encoder};
use crate::protocol::{Decoder, Encoder, Version};
use crate::router::{ConnectRequest, OutboxHandle, RouterCmd};
use crate::session::ConnId;
use crate::topic::valid_topic_name;

use super::context::{topic_within_limits, ConnectionContext, Guard};
use super::framing::{log_bad_input, read_packet, write_now};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// What an accepted client's connection goes on with once the router has its CONNECT.
pub(super) struct Opened {
    pub(super) conn: ConnId,
    pub(super) client_id: Arc<str>,
    pub(super) version: Version,
    pub(super) session_expiry: u32,
    pub(super) guard: Guard,
    /// For the writer, with the CONNACK's properties.
    pub(super) encoder: Encoder,
    /// The connection's own handle on its outbox (the router has the other).
    pub(super) outbox: Outbox,
    pub(super) outbox_rx: OutboxReceiver,
}

/// The handshake: the CONNECT read and checked, then handed to the router with the new
/// connection's outbox. `None` when the connection is to close (refused, or the broker
/// stopping).
pub(super) async fn open(
    (reader, writer): (
        &mut (impl AsyncRead + Unpin),
        &mut (impl AsyncWrite + Unpin),
    ),
    (buf, decoder): (&mut BytesMut, &mut Decoder),
    peer: &SocketAddr,
    ctx: &ConnectionContext,
    identity: Option<String>,
) -> Option<Opened> {
    let connect = read_connect(reader, writer, buf, decoder, peer, ctx).await?;
    let clean_session = connect.clean_session;
    let (request, guard, encoder) = admit(connect, writer, peer, ctx, identity).await?;
    let (client_id, keep_alive) = (request.client_id.clone(), request.keep_alive_secs);
    let (version, session_expiry) = (request.version, request.session_expiry);
    let conn = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let (outbox, outbox_rx) = Outbox::new();
    outbox.keep_alive().start(keep_alive);
    let connect = RouterCmd::Connect {
        conn,
        request: Box::new(request),
        outbox: OutboxHandle(outbox.clone()),
    };
    // An error: the broker is stopping.
    ctx.router.send(connect).await.ok()?;
    info!(%peer, client_id = %client_id, keep_alive, clean_session, session_expiry, ?version, "client connected");
    Some(Opened {
        conn,
        client_id,
        version,
        session_expiry,
        guard,
        encoder,
        outbox,
        outbox_rx,
    })
}

/// The first packet, which must be a CONNECT within `connect_timeout` [MQTT-3.1.0-1];
/// `None` (after answering or counting what came instead) when the connection is to close.
async fn read_connect(
    reader: &mut (impl AsyncRead + Unpin),
    writer: &mut (impl AsyncWrite + Unpin),
    buf: &mut BytesMut,
    decoder: &mut Decoder,
    peer: &SocketAddr,
    ctx: &ConnectionContext,
) -> Option<Connect> {
    let first = timeout(
        ctx.limits.connect_timeout,
        read_packet(reader, buf, decoder, ctx.limits.max_packet_size),
    )
    .await;
    match first {
        Err(_) => {
            ctx.stats.connect_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "no CONNECT within connect_timeout: closing");
            None
        }
        Ok(Ok(Inbound::Connect(c))) => Some(c),
        Ok(Ok(_)) => {
            warn!(%peer, "first packet is not CONNECT: closing");
            ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            None
        }
        Ok(Err(DecodeError::UnsupportedProtocol(level))) => {
            info!(%peer, level, "unsupported protocol level: CONNACK 0x01");
            let _ = write_now(
                writer,
                &mut Encoder::V4,
                Outbound::ConnAck(ConnectOutcome::UnacceptableProtocol),
            )
            .await;
            None
        }
        Ok(Err(DecodeError::ClientIdRejected)) => {
            info!(%peer, "MQTT 5 CONNECT with an empty client id and no clean start: CONNACK 0x85");
            let _ = write_now(
                writer,
                &mut refusal_encoder(Version::V5),
                Outbound::ConnAck(ConnectOutcome::IdentifierRejected),
            )
            .await;
            None
        }
        Ok(Err(DecodeError::Closed)) if buf.is_empty() => {
            // A port probe or a health check, not a client gone wrong.
            ctx.stats
                .closed_before_connect
                .fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "connection closed before CONNECT");
            None
        }
        Ok(Err(e)) => {
            log_bad_input(peer, "", &e);
            ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Everything the broker checks of a CONNECT before the router sees it: the client id, the
/// credentials (or the certificate's identity), the ACL and the will. `None` when the
/// connection was refused (the CONNACK saying why is written) or is to close.
async fn admit(
    connect: Connect,
    writer: &mut (impl AsyncWrite + Unpin),
    peer: &SocketAddr,
    ctx: &ConnectionContext,
    identity: Option<String>,
) -> Option<(ConnectRequest, Guard, Encoder)> {
    let mut refusals = refusal_encoder(connect.version);
    if let Some(method) = &connect.auth_method {
        // MQTT 5 enhanced authentication: no method is offered [MQTT-4.12.0-1].
        info!(%peer, method = %method, "authentication method not supported: CONNACK 0x8C");
        ctx.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        let _ = write_now(
            writer,
            &mut refusals,
            Outbound::ConnAck(ConnectOutcome::BadAuthenticationMethod),
        )
        .await;
        return None;
    }
    // A session that outlives its connection is kept under its client id (3.1.1: clean
    // session 0; MQTT 5: a session expiry interval above 0).
    let persistent = connect.session_expiry > 0;
    let assigned = connect.client_id.is_empty();
    let client_id: Arc<str> = if assigned {
        if connect.version == Version::V4 && !connect.clean_session {
            // A persistent session needs a name to be found again [MQTT-3.1.3-8].
            info!(%peer, "empty client id with clean session 0: CONNACK 0x02");
            let _ = write_now(
                writer,
                &mut refusals,
                Outbound::ConnAck(ConnectOutcome::IdentifierRejected),
            )
            .await;
            return None;
        }
        generated_client_id().into()
    } else {
        connect.client_id.into()
    };
    if persistent && client_id.len() > crate::persist::MAX_PERSISTENT_CLIENT_ID_BYTES {
        // Its session could not be stored: refuse it here, for this client alone.
        info!(%peer, len = client_id.len(), max = crate::persist::MAX_PERSISTENT_CLIENT_ID_BYTES, "client id too long for a persistent session: CONNACK 0x02");
        let _ = write_now(
            writer,
            &mut refusals,
            Outbound::ConnAck(ConnectOutcome::IdentifierRejected),
        )
        .await;
        return None;
    }
    if let Some(will) = &connect.will {
        if !valid_topic_name(&will.topic) {
            warn!(%peer, client_id = %client_id, "will topic is not a valid topic name: closing");
            return None;
        }
    }

    // Authentication (slow hashing runs off the runtime). The password is never logged.
    let (username, password) = (connect.username, connect.password);
    // A verified client certificate is the credential: its CN replaces any user name sent
    // and no password is checked (Mosquitto's use_identity_as_username).
    let certified = identity.is_some();
    let username = identity.or(username);
    let checked = if certified {
        Ok(())
    } else {
        ctx.auth.check(username.as_deref(), &password).await
    };
    if let Err(refusal) = checked {
        drop(password);
        ctx.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        let outcome = match refusal {
            Refusal::AnonymousNotAllowed => ConnectOutcome::NotAuthorized,
            Refusal::BadCredentials => ConnectOutcome::BadCredentials,
        };
        warn!(%peer, client_id = %client_id, username = username.as_deref().unwrap_or(""), reason = refusal.reason(), "authentication failed: connection refused");
        let _ = write_now(writer, &mut refusals, Outbound::ConnAck(outcome)).await;
        return None;
    }
    drop(password);
    let guard = Guard {
        acl: ctx.auth.client_acl(&client_id, username.as_deref()),
        publish_rate: (ctx.limits.max_publish_rate > 0).then(|| {
            Box::new(TokenBucket::new(
                ctx.limits.max_publish_rate,
                ctx.limits.max_publish_rate,
                Instant::now(),
            ))
        }),
        refusals: 0,
    };
    let encoder = session_encoder(
        connect.version,
        (connect.max_packet_size, connect.topic_alias_max),
        assigned.then(|| client_id.clone()),
        ctx,
    );
    let will = vet_will(connect.will, &guard, peer, &client_id, ctx);
    let request = ConnectRequest {
        client_id: client_id.clone(),
        version: connect.version,
        clean_start: connect.clean_session,
        session_expiry: connect.session_expiry,
        receive_maximum: connect.receive_maximum,
        max_packet_size: connect.max_packet_size,
        keep_alive_secs: connect.keep_alive,
        will,
        will_delay: connect.will_delay,
        username,
        peer: Some(*peer),
        acl: guard.acl.clone(),
    };

    Some((request, guard, encoder))
}

/// The encoder for an accepted client's session: the CONNACK's properties, and the
/// client's maximum packet size for everything sent after it.
fn session_encoder(
    version: Version,
    (client_max_packet_size, client_topic_alias_max): (Option<u32>, u16),
    assigned_client_id: Option<Arc<str>>,
    ctx: &ConnectionContext,
) -> Encoder {
    match version {
        Version::V4 => Encoder::V4,
        Version::V5 => Encoder::V5(Box::new(V5Encoder::new(
            ConnAckInfo {
                assigned_client_id,
                max_packet_size: ctx.limits.max_packet_size as u32,
                session_expiry: None,
                receive_maximum: ctx.limits.receive_maximum,
            },
            client_max_packet_size,
            client_topic_alias_max,
        ))),
    }
}

/// The encoder for a CONNACK that refuses a client of `version`.
fn refusal_encoder(version: Version) -> Encoder {
    match version {
        Version::V4 => Encoder::V4,
        Version::V5 => Encoder::V5(Box::new(V5Encoder::new(ConnAckInfo::default(), None, 0))),
    }
}
/// The will, if it may be published: within the topic limits and writable under the ACL.
/// A refused will is logged and counted, and the connection goes on without one.
pub(super) fn vet_will(
    mut will: Option<crate::protocol::message::Message>,
    guard: &Guard,
    peer: &SocketAddr,
    client_id: &str,
    ctx: &ConnectionContext,
) -> Option<crate::protocol::message::Message> {
    if let Some(w) = &will {
        let within = topic_within_limits(&w.topic, &ctx.limits);
        let writable = guard
            .acl
            .as_ref()
            .is_none_or(|acl| acl.may_publish(&w.topic));
        if !within || !writable {
            let counter = if within {
                &ctx.stats.acl_denied_publish
            } else {
                &ctx.stats.limit_refusals
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let reason = if within {
                "no write access (ACL)"
            } else {
                "topic over max_topic_length/max_topic_levels"
            };
            warn!(%peer, client_id = %client_id, topic = %w.topic, reason, "will refused: it will not be published");
            will = None;
        }
    }

    will
}
pub(super) fn generated_client_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "auto-{:x}-{}",
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
