//! The acknowledgement contract's pieces: every answer that tells a client something is kept
//! (PUBACK, PUBREC, SUBACK, UNSUBACK, a CONNACK that wrote a session, a bridge command's
//! acceptance) is an [`AckTarget`]. The router collects a burst's targets, submits the burst's
//! writes as one store ticket, and releases the targets strictly in arrival order once the
//! store reports that ticket durable (see the router's module doc for the whole contract).

use tokio::sync::oneshot;

use crate::outbox::Outbox;
use crate::protocol::message::{CloseReason, Outbound, SubscriptionOptions};
use crate::session::ConnId;

/// An answer that waits for what its request wrote to be durable: released in arrival
/// order by [`Router::release`].
pub(super) enum AckTarget {
    /// PUBACK, PUBREC, UNSUBACK.
    Client(Outbox, Outbound),
    /// A broker-internal publish (a bridge's command) was accepted.
    Internal(oneshot::Sender<()>),
    /// The CONNACK of a CONNECT that changed the stored session: the outbox holds every
    /// other packet for this connection until it goes out ([`Outbox::hold`]).
    ConnAck(Outbox, Outbound),
    /// SUBACK, then the retained messages matching the filters it granted (so a client sees
    /// its SUBACK before them, as it would without the wait).
    SubAck {
        conn: ConnId,
        outbox: Outbox,
        packet: Outbound,
        granted: Vec<(String, SubscriptionOptions)>,
    },
}

impl AckTarget {
    /// Its request could not be stored: nothing is acknowledged. A client's connection is
    /// closed so that it reconnects and sends again (MQTT 3.1.1 has no negative ack); an
    /// internal waiter sees its sender dropped.
    pub(super) fn refuse(self) {
        match self {
            AckTarget::Client(outbox, _)
            | AckTarget::ConnAck(outbox, _)
            | AckTarget::SubAck { outbox, .. } => {
                outbox.send(Outbound::Close(CloseReason::Unspecified))
            }
            AckTarget::Internal(_) => {}
        }
    }
}
