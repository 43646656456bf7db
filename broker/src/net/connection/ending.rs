//! Why a connection ends, and the two checks on a packet read that can end it: a DISCONNECT
//! (graceful, or a protocol error when it raises the session expiry from 0) and a PUBLISH
//! over an MQTT 5 client's Receive Maximum.

use std::sync::atomic::{AtomicU32, Ordering};

use tracing::warn;

use super::context::ConnectionContext;
use crate::protocol::inbound::Inbound;
use crate::protocol::message::{CloseReason, QoS};

/// Why the reader stopped.
pub(super) enum End {
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

pub(super) fn abrupt(why: impl Into<String>, tell: CloseReason) -> End {
    End::Abrupt(why.into(), Some(tell))
}

/// A DISCONNECT ends the connection; it may not raise the session expiry from 0
/// [MQTT-3.14.2-2].
pub(super) fn on_disconnect(
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
pub(super) fn over_receive_maximum(
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
