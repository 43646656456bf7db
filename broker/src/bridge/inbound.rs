//! The other direction: commands from the cloud. Each is published locally through the
//! router and acknowledged upstream only once the router accepted it (durably where it had
//! to be written), in the order the commands came [MQTT-4.6.0-2]; one that is never accepted
//! is never acknowledged, so the upstream sends it again.

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::failure::{encoded, Failure};
use super::link::LinkSender;
use super::wire::{Command, Encoder};
use super::Bridge;
use crate::protocol::message::Message;
use crate::router::RouterCmd;
use crate::topic::filter_matches;

impl Bridge {
    /// A command from the cloud: publish it locally, and acknowledge it upstream once the
    /// router has accepted it (durably, where it had to be written). An MQTT 5 command keeps
    /// its message properties (user properties, content type, expiry, ...) for local MQTT 5
    /// subscribers.
    pub(super) async fn deliver_locally(
        &self,
        publish: Command,
        encoder: &Encoder,
        command_acks: &mpsc::UnboundedSender<(Bytes, oneshot::Receiver<()>)>,
    ) -> Result<(), Failure> {
        let mut ack = BytesMut::new();
        encoded(encoder.command_ack(&mut ack, publish.qos, publish.pkid))?;
        let (accepted_tx, accepted_rx) = oneshot::channel();
        match self
            .config
            .subscribe
            .iter()
            .find(|r| filter_matches(&r.remote, &publish.topic))
        {
            None => {
                let _ = accepted_tx.send(()); // not ours to deliver: just acknowledge it
            }
            Some(rule) => {
                self.set_status(|s| s.received += 1);
                let topic = format!("{}{}", rule.local_prefix, publish.topic);
                let mut message = Message::new(topic, publish.payload, publish.qos, publish.retain);
                message.properties = publish.properties;
                self.router
                    .send(RouterCmd::Inject {
                        message,
                        origin_bridge: Some(self.index),
                        accepted: Some(accepted_tx),
                    })
                    .await
                    .map_err(|_| Failure::new("shutdown", "broker stopping"))?;
            }
        }
        if !ack.is_empty() {
            let _ = command_acks.send((ack.freeze(), accepted_rx));
        }
        Ok(())
    }
}

/// Sends each command's acknowledgement once the router accepted it, in arrival order. A
/// command the router never accepts is never acknowledged: the upstream sends it again.
pub(super) async fn acknowledge_commands(
    mut pending: mpsc::UnboundedReceiver<(Bytes, oneshot::Receiver<()>)>,
    link: LinkSender,
) {
    while let Some((ack, accepted)) = pending.recv().await {
        if accepted.await.is_err() {
            // Not accepted (the router could not keep it): left unacknowledged, so the
            // upstream sends it again after the next reconnect. Later commands go on.
            continue;
        }
        if link.send(ack).is_err() {
            return;
        }
    }
}

/// Aborts the command acknowledger when the session that spawned it ends.
pub(super) struct AbortOnDrop(pub(super) Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}
