//! The publish path: a client's PUBLISH (or a bridge's command) accepted once, its writes
//! (log append for bridges, persistent sessions' queues, the retained store) added to the
//! burst's batch, then routed to every matching subscriber. `accept_publish` is the single
//! place a message is admitted; see the router's module doc for the ack contract.

use super::*;
use crate::outbox::QOS0_BEHIND_BYTES;
use crate::pipeline::Verdict;

impl Router {
    pub(super) fn publish(&mut self, conn: ConnId, pkid: u16, message: Message) {
        self.stats
            .message_received(message.qos, message.payload.len());
        if let Some(info) = self.clients.get_mut(&conn) {
            let info = Arc::make_mut(info);
            info.messages_in += 1;
            let preview = message
                .payload
                .slice(..message.payload.len().min(LAST_PAYLOAD_PREVIEW));
            match &mut info.last_publish {
                // Reuse the topic allocation when a sensor publishes to the same topic again.
                Some(last) if *last.topic == *message.topic => {
                    last.payload = preview;
                    last.at_ms = unix_ms();
                }
                last => {
                    *last = Some(Box::new(LastPublish {
                        topic: message.topic.to_string(),
                        payload: preview,
                        at_ms: unix_ms(),
                    }))
                }
            }
        }
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        let Some(outbox) = session.online.as_ref().map(|o| o.outbox.clone()) else {
            return;
        };
        outbox.routed(&message);
        let qos = message.qos;
        // A resend of a QoS 2 message routed already is acknowledged, not delivered again.
        let first_receipt = qos != QoS::ExactlyOnce || session.first_qos2_receipt(pkid);
        if qos == QoS::ExactlyOnce && first_receipt {
            self.batch_qos2.push((client.clone(), pkid));
        }
        // A resend is answered as the first receipt was, minus the "no subscribers" news.
        let mut matched = true;
        if first_receipt {
            self.behind = None;
            match self.accept_publish(message, &client, None) {
                Ok(delivered) => matched = delivered,
                Err(reason) => {
                    // Nothing was stored or delivered: no ack, and the connection ends as for
                    // a packet over max_packet_size (3.1.1 cannot say why).
                    if qos == QoS::ExactlyOnce {
                        self.batch_qos2.pop();
                        if let Some(s) = self.sessions.get_mut(&client) {
                            s.pubrel(pkid);
                        }
                    }
                    warn!(client_id = %client, %reason, "publish cannot be stored: closing the connection");
                    outbox.send(Outbound::Close(CloseReason::Unspecified));
                    return;
                }
            }
        }
        if let Some(subscriber) = self.behind.take() {
            outbox.wait_for(subscriber);
        }
        self.ack_publish(outbox, pkid, qos, matched);
    }

    /// The one place every accepted PUBLISH (client's, will, or bridge's) goes through:
    /// durable writes first (collected for this burst's commit), then delivery.
    ///
    /// Admission: everything this message would write is checked here, for this message
    /// alone, so that the burst's submission cannot be refused for its sake. A message that
    /// cannot be stored is neither stored nor delivered (`Err`, counted and logged); its
    /// sender decides what that means (a client's connection is closed). `Ok(false)`: it was
    /// accepted but nobody gets it (no matching subscription, no bridge forwards it: MQTT
    /// 5's PUBACK 0x10).
    pub(super) fn accept_publish(
        &mut self,
        message: Message,
        origin: &str,
        origin_bridge: Option<usize>,
    ) -> Result<bool, String> {
        let forwarded = self.store_publish(&message, origin, origin_bridge)?;
        let delivered = self.route(message, origin);
        Ok(delivered || forwarded)
    }

    /// `accept_publish`'s durable half: the log append (through the ingest pipeline), the
    /// retained record. Whether a bridge forwards it.
    pub(super) fn store_publish(
        &mut self,
        message: &Message,
        origin: &str,
        origin_bridge: Option<usize>,
    ) -> Result<bool, String> {
        let mut forwarded = false;
        if let Some(durable) = &self.durable {
            let now = unix_ms();
            forwarded = durable
                .bridges
                .iter()
                .enumerate()
                .any(|(i, b)| Some(i) != origin_bridge && b.forwards(&message.topic));
            let stored_origin = match origin_bridge {
                Some(i) => bridge_origin(&durable.bridges[i].name),
                None => origin.to_string(),
            };
            let mut ops = Vec::new();
            // The ingest pipeline may keep it out of the log (a resend, or refused: then a
            // dead letter, written in this same commit). Not a bridge's own commands.
            let logged = forwarded
                && match (&mut self.pipeline, origin_bridge) {
                    (Some(ingest), None) => {
                        ingest.check(message, &stored_origin, now, &mut ops) == Verdict::Forward
                    }
                    _ => true,
                };
            if message.retain && message.payload.is_empty() {
                ops.push(Op::Remove {
                    space: Keyspace::Retained,
                    key: message.topic.as_bytes().to_vec(),
                });
            } else if message.retain || logged {
                let record = persist::to_stored(message, &stored_origin, now)
                    .encode()
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        if bytes.len() > crate::store::MAX_VALUE_BYTES {
                            Err(format!(
                                "record of {} bytes is larger than the store accepts ({} bytes)",
                                bytes.len(),
                                crate::store::MAX_VALUE_BYTES
                            ))
                        } else if message.retain
                            && message.topic.len() > crate::store::MAX_KEY_BYTES
                        {
                            Err(format!(
                                "retained topic of {} bytes is longer than the store's key limit ({} bytes)",
                                message.topic.len(),
                                crate::store::MAX_KEY_BYTES
                            ))
                        } else {
                            Ok(bytes)
                        }
                    });
                let bytes = match record {
                    Ok(bytes) => bytes,
                    Err(reason) => {
                        error!(client_id = %stored_origin, topic = %message.topic, %reason,
                            "message cannot be stored: refused (neither stored nor delivered)");
                        crate::stats::STORE_FAULTS.record(
                            crate::stats::StoreFault::RecordRefused,
                            format!(
                                "message on {} from {stored_origin}: {reason}",
                                message.topic
                            ),
                        );
                        return Err(reason);
                    }
                };
                if message.retain {
                    ops.push(Op::Put {
                        space: Keyspace::Retained,
                        key: message.topic.as_bytes().to_vec(),
                        value: bytes.to_vec(),
                    });
                }
                if logged {
                    ops.push(Op::Append(bytes));
                }
            }
            self.batch_ops.append(&mut ops);
        }
        Ok(forwarded)
    }

    /// Updates the retained store and delivers to every matching subscription, once per
    /// client at the highest QoS it was granted [MQTT-3.3.5-1]. `origin`: the publishing
    /// client's id, which a no-local subscription of that same client id does not receive
    /// [MQTT-3.8.3-3]. With overlapping subscriptions, the message goes out unless every one
    /// of them is no-local, and keeps its RETAIN flag if any is retain-as-published.
    pub(super) fn route(&mut self, message: Message, origin: &str) -> bool {
        if message.retain {
            if message.payload.is_empty() {
                self.retained.remove(&message.topic);
            } else {
                self.retained.insert(message.topic.clone(), message.clone());
            }
        }
        let mut matched = std::mem::take(&mut self.matched);
        self.subscriptions
            .for_each_match(&message.topic, |client, options| {
                let (best, ids) = matched
                    .entry(client.clone())
                    .or_insert((options, Vec::new()));
                best.qos = best.qos.max(options.qos);
                best.no_local &= options.no_local;
                best.retain_as_published |= options.retain_as_published;
                // Every matching subscription's identifier goes with the one copy [MQTT-3.3.4-3].
                ids.extend(options.subscription_id);
            });
        let mut any = !matched.is_empty();
        if !self.shared.is_empty() {
            let (sessions, limits) = (&self.sessions, &self.limits);
            let picked = self.shared.pick_for(&message.topic, |client, pass| {
                sessions.get(client).is_some_and(|s| match pass {
                    0 => s.online.is_some() && s.would_keep(limits),
                    _ => !s.clean && (message.qos != QoS::AtMostOnce && s.would_keep(limits)),
                })
            });
            any |= !picked.is_empty();
            // A member also subscribed without `$share` gets a copy for each [4.8.2].
            for (client, options) in picked {
                let ids: Vec<u32> = options.subscription_id.into_iter().collect();
                self.deliver_to(&client, copy_for(&message, options, &ids));
            }
        }
        for (client, (granted, ids)) in matched.drain() {
            if granted.no_local && &*client == origin {
                continue;
            }
            self.deliver_to(&client, copy_for(&message, granted, &ids));
        }
        self.matched = matched;
        any
    }

    /// Deletes and counts what a session dropped from its queue when its turn came.
    pub(super) fn reap_discarded(&mut self, client: &ClientKey) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        for (stored, reason) in session.take_discarded() {
            self.stats.message_dropped(reason);
            if let Some(id) = stored {
                self.batch_ops.push(Op::Remove {
                    space: Keyspace::SessionQueue,
                    key: persist::queue_key(client, id),
                });
            }
        }
    }

    /// Hands one message to one session, writing it to disk first when the session is
    /// persistent and the message QoS 1/2 (so that it survives a restart until acked).
    pub(super) fn deliver_to(&mut self, client: &ClientKey, message: Message) {
        // ACL: read access to this very topic (a wildcard subscription may reach further).
        if !self.perms.is_empty()
            && self
                .perms
                .get(client)
                .is_some_and(|acl| !acl.may_read(&message.topic))
        {
            self.stats
                .acl_denied_deliveries
                .fetch_add(1, Ordering::Relaxed);
            debug!(client_id = %client, topic = %message.topic, "not delivered: no read access (ACL)");
            return;
        }
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        let qos = message.qos;
        if let Some(reason) = session.undeliverable(&message, unix_ms()) {
            self.stats.message_dropped(reason);
            debug!(client_id = %client, topic = %message.topic, ?reason, "not delivered");
            return;
        }
        let mut stored = None;
        if self.durable.is_some()
            && !session.clean
            && qos != QoS::AtMostOnce
            && session.would_keep(&self.limits)
        {
            let id = self.next_queue_id;
            match persist::to_stored(&message, "", unix_ms()).encode() {
                Ok(bytes) => {
                    self.next_queue_id += 1;
                    self.batch_ops.push(Op::Put {
                        space: Keyspace::SessionQueue,
                        key: persist::queue_key(client, id),
                        value: bytes.to_vec(),
                    });
                    stored = Some(id);
                }
                Err(e) => {
                    error!(client_id = %client, topic = %message.topic, error = %e, "message cannot be stored for the session: kept in memory only");
                    crate::stats::STORE_FAULTS.record(
                        crate::stats::StoreFault::RecordRefused,
                        format!("queued message on {} for {client}: {e}", message.topic),
                    );
                }
            }
        }
        let topic = message.topic.clone();
        match session.deliver(message, stored, &self.limits) {
            Ok(()) => {
                self.stats.message_sent(qos);
                if let Some(online) = session.online.as_ref().filter(|_| qos == QoS::AtMostOnce) {
                    if online.outbox.publish_bytes() >= QOS0_BEHIND_BYTES {
                        self.behind = Some(online.outbox.congestion());
                    }
                }
            }
            Err(reason) => {
                self.stats.message_dropped(reason);
                if reason == Dropped::QueueFull {
                    warn!(client_id = %client, topic = %topic, "queue full (max_queued_messages): message dropped for this client");
                }
                let slow = session
                    .online
                    .as_ref()
                    .filter(|_| reason == Dropped::Qos0SlowClient);
                if let Some(dropped) = slow.and_then(|online| online.outbox.note_drop()) {
                    warn!(client_id = %client, dropped, "subscriber behind: QoS 0 messages dropped for it (count since the last report, at most one a minute)");
                }
            }
        }
    }
}

/// One subscriber's copy of `message`: at most the QoS it was granted; RETAIN 0 for a live
/// message [MQTT-3.3.1-9] unless the subscription asked for it as published [MQTT-3.3.1-12];
/// the identifiers of its matching subscriptions (a properties block of its own only then).
pub(super) fn copy_for(message: &Message, granted: SubscriptionOptions, ids: &[u32]) -> Message {
    let properties = if ids.is_empty() {
        message.properties.clone()
    } else {
        let mut own = message.properties.as_deref().cloned().unwrap_or_default();
        own.subscription_ids = ids.to_vec();
        Some(Arc::new(own))
    };
    Message {
        topic: message.topic.clone(),
        payload: message.payload.clone(),
        qos: message.qos.min(granted.qos),
        retain: granted.retain_as_published && message.retain,
        properties,
    }
}
