//! Replaying and purging dead letters (`crate::pipeline::dead_letter`): the router does both,
//! since a replay goes through the same admission as a new PUBLISH and its writes (the log
//! append or a new dead letter, and the old record's deletion) must be one group commit.
//! `dead_letter_handle.rs` is how the daemon's HTTP API and `waystation dlq` reach it.
//!
//! A replayed message is logged for forwarding again but not delivered to local subscribers
//! a second time: they had it when it first arrived.

use tokio::sync::oneshot;

use super::commands::{DeadLetterAction, DeadLetterOutcome};
use super::*;
use crate::pipeline::dead_letter::DeadLetter;
use crate::protocol::message::{Message, QoS};
use crate::store::{Keyspace, Store};

impl Router {
    pub(super) fn dead_letters(
        &mut self,
        action: DeadLetterAction,
        reply: oneshot::Sender<DeadLetterOutcome>,
    ) {
        let (done, durable) = oneshot::channel();
        let mut outcome = DeadLetterOutcome {
            replayed: 0,
            refused_again: 0,
            purged: 0,
            kept: 0,
            missing: 0,
            durable,
        };
        let store = self.durable.as_ref().map(|d| d.store.clone());
        if let (Some(store), Some(_)) = (store, self.pipeline.as_ref()) {
            match action {
                DeadLetterAction::Purge(ids) => {
                    if let Some(p) = self.pipeline.as_mut() {
                        for id in ids {
                            if p.dead_letters.remove(id, &mut self.batch_ops) {
                                outcome.purged += 1;
                            } else {
                                outcome.missing += 1;
                            }
                        }
                    }
                }
                DeadLetterAction::Replay(ids) => {
                    for id in ids {
                        self.replay_one(&store, id, &mut outcome);
                    }
                    self.stats.dead_letters_replayed.fetch_add(
                        outcome.replayed as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }
            if let Some(p) = &self.pipeline {
                p.publish_gauges();
            }
        }
        self.batch_acks.push(AckTarget::Internal(done));
        let _ = reply.send(outcome);
    }

    fn replay_one(&mut self, store: &Store, id: u64, outcome: &mut DeadLetterOutcome) {
        let key = DeadLetter::key(id);
        let letter = match store.get(Keyspace::DeadLetter, &key) {
            Ok(Some(value)) => DeadLetter::decode(&key, &value),
            _ => None,
        };
        let (Some(letter), Some(before)) = (
            letter,
            self.pipeline.as_ref().map(|p| p.dead_letters.count()),
        ) else {
            outcome.missing += 1;
            return;
        };
        let message = Message {
            topic: letter.topic.as_str().into(),
            payload: letter.payload.into(),
            qos: QoS::from_u8(letter.qos).unwrap_or(QoS::AtLeastOnce),
            retain: false,
            properties: None,
        };
        // The old record is deleted only once the message is somewhere again: logged for
        // forwarding, or a new dead letter. One no bridge forwards now, or too large for the
        // store now (logged and counted there), stays as it is.
        match self.store_publish(&message, &letter.origin, None) {
            Ok(true) => {
                let Some(pipeline) = self.pipeline.as_mut() else {
                    return;
                };
                if pipeline.dead_letters.count() > before {
                    outcome.refused_again += 1;
                } else {
                    outcome.replayed += 1;
                }
                pipeline.dead_letters.remove(id, &mut self.batch_ops);
            }
            Ok(false) | Err(_) => outcome.kept += 1,
        }
    }
}
