//! One decoded packet after CONNECT, checked against what this client may do (topic names
//! and limits, the ACL, MQTT 5's payload format indicator) and handed to the router as a
//! command. Refusals that MQTT lets a server answer without closing (a PUBLISH it will not
//! take, a filter it will not grant) are answered, counted and logged here, and the
//! connection goes on; a protocol violation ends it (`Err`).

use std::sync::atomic::Ordering;

use tracing::{debug, info, warn};

use crate::protocol::inbound::Inbound;
use crate::protocol::message::{PublishRefusal, QoS, SubscribeFilter, SubscribeRefusal};
use crate::router::RouterCmd;
use crate::session::ConnId;
use crate::topic::{valid_filter, valid_topic_name};

use super::context::{topic_within_limits, ConnectionContext, Guard};
use crate::outbox::Outbox;

/// Acts on one packet (DISCONNECT is the reader's); `Err`: a protocol violation.
///
/// The command is made before the future is: the future then holds it once, beside a
/// wait for room in the router's queue, not the packet, the command and `send`'s own copy
/// (952 bytes, which every connection's task kept room for, idle or not: issue 14).
pub(super) fn dispatch<'a>(
    packet: Inbound,
    conn: ConnId,
    client_id: &str,
    ctx: &'a ConnectionContext,
    guard: &mut Guard,
    outbox: &Outbox,
) -> impl std::future::Future<Output = Result<(), &'static str>> + 'a {
    let cmd = command(packet, conn, client_id, ctx, guard, outbox);
    async move {
        // `cmd` is used in place, never moved into a local before the wait: a local would
        // be a second copy in the future.
        if !matches!(cmd, Ok(Some(_))) {
            return cmd.map(|_| ());
        }
        // A full router queue makes this wait: back-pressure on every publisher alike.
        let room = ctx.router.reserve().await.map_err(|_| "broker stopping")?;
        if let Ok(Some(cmd)) = cmd {
            room.send(cmd);
        }
        Ok(())
    }
}

/// The router's command for one packet; `None`: nothing to tell it.
fn command(
    packet: Inbound,
    conn: ConnId,
    client_id: &str,
    ctx: &ConnectionContext,
    guard: &mut Guard,
    outbox: &Outbox,
) -> Result<Option<RouterCmd>, &'static str> {
    let cmd = match packet {
        Inbound::Connect(_) => return Err("second CONNECT on a connection"),
        Inbound::Disconnect(_) => return Ok(None),
        Inbound::PingReq => RouterCmd::Ping { conn },
        Inbound::Publish(publish) => {
            let pkid = publish.pkid;
            let message = publish.message;
            if !valid_topic_name(&message.topic) {
                return Err("PUBLISH to an invalid topic name (wildcard, empty or NUL)");
            }
            debug!(client_id, topic = %message.topic, qos = message.qos as u8, dup = publish.dup, "publish received");
            match refuse_publish(&message, ctx, guard) {
                None => {
                    // Counted before the router can see it (it counts it back when routed).
                    outbox.to_router(&message);
                    RouterCmd::Publish {
                        conn,
                        pkid,
                        message,
                    }
                }
                Some(reason) => {
                    if guard.should_log_refusal() {
                        let why = match reason {
                            PublishRefusal::NotAuthorized => "no write access (ACL)",
                            PublishRefusal::TopicNameInvalid => {
                                "topic over max_topic_length/max_topic_levels"
                            }
                            PublishRefusal::PayloadFormatInvalid => {
                                "payload format indicator 1 but the payload is not UTF-8"
                            }
                        };
                        warn!(client_id, topic = %message.topic, reason = why, refusals = guard.refusals, "PUBLISH refused: acknowledged, not stored nor delivered");
                    }
                    // QoS 0 needs no answer; QoS 1/2 are answered in their turn by the router.
                    if message.qos == QoS::AtMostOnce {
                        return Ok(None);
                    }
                    RouterCmd::Refused {
                        conn,
                        pkid,
                        qos: message.qos,
                        reason,
                    }
                }
            }
        }
        Inbound::PubAck(pkid) => RouterCmd::PubAck { conn, pkid },
        Inbound::PubRec(pkid) => RouterCmd::PubRec { conn, pkid },
        Inbound::PubRel(pkid) => RouterCmd::PubRel { conn, pkid },
        Inbound::PubComp(pkid) => RouterCmd::PubComp { conn, pkid },
        Inbound::Subscribe(subscribe) => {
            if subscribe
                .filters
                .iter()
                .any(|(f, o)| o.no_local && f.starts_with("$share/"))
            {
                // [MQTT-3.8.3-4]: no local on a shared subscription is a protocol error.
                return Err("no local set on a shared subscription");
            }
            let filters = subscribe
                .filters
                .into_iter()
                .map(|(filter, options)| SubscribeFilter {
                    requested: refuse_filter(&filter, client_id, ctx, guard)
                        .map_or(Ok(options), Err),
                    filter,
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
    Ok(Some(cmd))
}

/// Why a PUBLISH with a valid topic name is not taken, counted; `None`: it is.
fn refuse_publish(
    message: &crate::protocol::message::Message,
    ctx: &ConnectionContext,
    guard: &Guard,
) -> Option<PublishRefusal> {
    if !topic_within_limits(&message.topic, &ctx.limits) {
        ctx.stats.limit_refusals.fetch_add(1, Ordering::Relaxed);
        return Some(PublishRefusal::TopicNameInvalid);
    }
    if guard
        .acl
        .as_ref()
        .is_some_and(|acl| !acl.may_publish(&message.topic))
    {
        ctx.stats.acl_denied_publish.fetch_add(1, Ordering::Relaxed);
        return Some(PublishRefusal::NotAuthorized);
    }
    let says_utf8 = message
        .properties
        .as_ref()
        .is_some_and(|p| p.payload_format_indicator == Some(1));
    if says_utf8 && std::str::from_utf8(&message.payload).is_err() {
        // MQTT 5 3.3.2.3.2: a server that checks answers 0x99.
        ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        return Some(PublishRefusal::PayloadFormatInvalid);
    }
    None
}

/// Why a filter of a SUBSCRIBE is not granted, counted and logged; `None`: it may be.
fn refuse_filter(
    filter: &str,
    client_id: &str,
    ctx: &ConnectionContext,
    guard: &mut Guard,
) -> Option<SubscribeRefusal> {
    // A shared subscription's ACL and validity are its filter's (after `$share/{group}/`).
    let (filter, shared) = match filter.strip_prefix("$share/") {
        Some(_) => match crate::topic::parse_shared(filter) {
            Some((_, inner)) => (inner, true),
            None => {
                info!(client_id, filter = %filter, "invalid shared subscription: refused in SUBACK");
                return Some(SubscribeRefusal::TopicFilterInvalid);
            }
        },
        None => (filter, false),
    };
    if !shared && !valid_filter(filter) {
        info!(client_id, filter = %filter, "invalid topic filter: refused in SUBACK");
        return Some(SubscribeRefusal::TopicFilterInvalid);
    }
    if !topic_within_limits(filter, &ctx.limits) {
        ctx.stats.limit_refusals.fetch_add(1, Ordering::Relaxed);
        if guard.should_log_refusal() {
            warn!(client_id, filter = %filter, "topic filter over max_topic_length/max_topic_levels: refused in SUBACK");
        }
        return Some(SubscribeRefusal::TopicFilterInvalid);
    }
    if guard
        .acl
        .as_ref()
        .is_some_and(|acl| !acl.may_subscribe(filter))
    {
        ctx.stats
            .acl_denied_subscribe
            .fetch_add(1, Ordering::Relaxed);
        if guard.should_log_refusal() {
            warn!(client_id, filter = %filter, "no read access (ACL): filter refused in SUBACK");
        }
        return Some(SubscribeRefusal::NotAuthorized);
    }
    None
}
