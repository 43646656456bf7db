//! The other direction: commands from the cloud. Each is published locally through the
//! router and acknowledged upstream only once the router accepted it (durably where it had
//! to be written), in the order the commands came [MQTT-4.6.0-2]; one that is never accepted
//! is never acknowledged, so the upstream sends it again.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{v4, QoS as WireQoS};
use tokio::sync::{mpsc, oneshot};

use super::failure::{encode, Failure};
use super::link::LinkSender;
use super::Bridge;
use crate::protocol::message::{Message, QoS};
use crate::router::RouterCmd;
use crate::topic::filter_matches;

impl Bridge {
    /// A command from the cloud: publish it locally, and acknowledge it upstream once the
    /// router has accepted it (durably, where it had to be written).
    pub(super) async fn deliver_locally(
        &self,
        publish: v4::Publish,
        command_acks: &mpsc::UnboundedSender<(Bytes, oneshot::Receiver<()>)>,
    ) -> Result<(), Failure> {
        let mut ack = BytesMut::new();
        match publish.qos {
            WireQoS::AtMostOnce => {}
            WireQoS::AtLeastOnce => encode(&mut ack, |b| v4::PubAck::new(publish.pkid).write(b))?,
            WireQoS::ExactlyOnce => encode(&mut ack, |b| v4::PubRec::new(publish.pkid).write(b))?,
        }
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
                let qos = match publish.qos {
                    WireQoS::AtMostOnce => QoS::AtMostOnce,
                    WireQoS::AtLeastOnce => QoS::AtLeastOnce,
                    WireQoS::ExactlyOnce => QoS::ExactlyOnce,
                };
                let topic = format!("{}{}", rule.local_prefix, publish.topic);
                let message = Message::new(topic, publish.payload, qos, publish.retain);
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
