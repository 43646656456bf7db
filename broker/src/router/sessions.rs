//! Sessions and subscriptions as the router keeps them: CONNECT (new, resumed, taken over,
//! discarded), the end of a connection (its will), SUBSCRIBE and UNSUBSCRIBE with their
//! per-session admission, and the retained messages a new subscription is owed. Every write
//! goes into the burst's batch and every answer through the ack pipeline (`acks.rs`), so a
//! client is told only what is durable.

use super::*;

impl Router {
    /// The session of a live connection; `None` for a connection that was taken over.
    pub(super) fn session_of(&mut self, conn: ConnId) -> Option<(ClientKey, &mut Session)> {
        let client = &self.clients.get(&conn)?.client_id;
        let session = self.sessions.get_mut(client)?;
        match &session.online {
            Some(online) if online.conn == conn => Some((client.clone(), session)),
            _ => None,
        }
    }

    pub(super) fn connect(&mut self, conn: ConnId, request: ConnectRequest, outbox: Outbox) {
        let client = request.client_id.clone();
        // Whatever this CONNECT writes (a new session record, a discarded one, a will)
        // must be durable before the CONNACK says "session present" or not.
        let ops_before = self.batch_ops.len();
        self.end_previous_connection(&client, request.clean_start);
        // A session with no expiry ends with its connection [MQTT-3.1.2-6], also a taken-over one.
        if self.sessions.get(&client).is_some_and(|s| s.clean) {
            self.discard_session(&client);
        }
        let session_present = match self.sessions.get(&client) {
            Some(_) if request.clean_start => {
                self.discard_session(&client);
                false
            }
            Some(_) => true,
            None => false,
        };
        let persistent = request.session_expiry > 0;
        if persistent && !session_present {
            // Written now so that "session present" is true after a restart too.
            let expiry = (request.session_expiry != SESSION_NEVER_EXPIRES).then_some(
                persist::StoredExpiry {
                    secs: request.session_expiry,
                    deadline_ms: None,
                },
            );
            self.save_session_record(&client, &Subscriptions::default(), expiry);
        }
        let session = self
            .sessions
            .entry(client.clone())
            .or_insert_with(|| Box::new(Session::new(!persistent)));
        session.clean = !persistent;
        let previous_expiry = std::mem::replace(&mut session.expiry_secs, request.session_expiry);
        session.expires_at = None;
        if persistent
            && session_present
            && self.durable.is_some()
            && (previous_expiry != SESSION_NEVER_EXPIRES
                || request.session_expiry != SESSION_NEVER_EXPIRES)
        {
            // The record's expiry (and any deadline set when the client left) is replaced:
            // a crash while the client is connected must not end its session early.
            self.batch_ops.push(Op::Put {
                space: Keyspace::Sessions,
                key: client.as_bytes().to_vec(),
                value: persist::encode_session(&session.subscriptions, stored_expiry(session)),
            });
        }
        // What waits for this client id was checked against the previous connection's
        // rules (or none, after a restart): keep only what this one may read.
        let unreadable = match &request.acl {
            Some(acl) => session.retain_waiting(|m| acl.may_read(&m.topic)),
            None => Vec::new(),
        };
        let connack = Outbound::ConnAck(ConnectOutcome::Accepted { session_present });
        if self.durable.is_some() && self.batch_ops.len() > ops_before {
            outbox.hold();
            self.batch_acks
                .push(AckTarget::ConnAck(outbox.clone(), connack));
        } else {
            outbox.send(connack);
        }
        session.online = Some(Online {
            conn,
            outbox,
            will: request.will.map(Box::new),
            will_delay: request.will_delay,
            receive_maximum: request.receive_maximum,
            max_packet_size: request.max_packet_size,
        });
        session.resume(&self.limits);
        if !unreadable.is_empty() {
            self.stats
                .acl_denied_deliveries
                .fetch_add(unreadable.len() as u64, Ordering::Relaxed);
            info!(client_id = %client, dropped = unreadable.len(), "queued messages this client may not read (ACL) dropped");
        }
        for id in unreadable {
            self.batch_ops.push(Op::Remove {
                space: Keyspace::SessionQueue,
                key: persist::queue_key(&client, id),
            });
        }
        match request.acl {
            Some(acl) => self.perms.insert(client.clone(), acl),
            None => self.perms.remove(&client),
        };
        self.clients.insert(
            conn,
            Arc::new(ClientInfo {
                client_id: client.clone(),
                peer: request.peer,
                username: request.username,
                connected_at_ms: unix_ms(),
                clean_session: request.clean_start && !persistent,
                protocol_version: match request.version {
                    crate::protocol::Version::V4 => 4,
                    crate::protocol::Version::V5 => 5,
                },
                session_expiry: request.session_expiry,
                messages_in: 0,
                last_publish: None,
            }),
        );
        self.reap_discarded(&client);
        self.stats.connection_opened();
    }

    /// Takes over a live connection with the same client id [MQTT-3.1.4-2]: closes it and
    /// publishes its will, as for any connection the server closes; a delayed will (MQTT
    /// 5) waits unless this connection ends the session [MQTT-3.1.3-9].
    fn end_previous_connection(&mut self, client: &ClientKey, clean_start: bool) {
        let previous = self.sessions.get_mut(client).and_then(|s| {
            let old = s.online.take()?;
            info!(client_id = %client, "session taken over by a new connection");
            old.outbox
                .send(Outbound::Close(CloseReason::SessionTakenOver));
            self.clients.remove(&old.conn);
            self.stats.connection_closed();
            Some((old.will.map(|w| *w), old.will_delay))
        });
        let ends_session = clean_start || self.sessions.get(client).is_some_and(|s| s.clean);
        if let Some((Some(will), delay)) = previous {
            if delay == 0 || ends_session {
                // A will that cannot be stored is logged and counted by accept_publish.
                self.publish_will(will, client);
            }
        }
        // A will still waiting for its delay: a new connection to the session cancels it,
        // one that ends the session publishes it now [MQTT-3.1.3-9].
        if let Some(will) = self
            .sessions
            .get_mut(client)
            .and_then(|s| s.delayed_will.take())
        {
            if ends_session {
                self.publish_will(will.1, client);
            }
        }
    }

    /// Adds a subscription to the table, or to its group if it is `$share/...`.
    pub(super) fn add_subscription(
        &mut self,
        filter: &str,
        client: &ClientKey,
        options: SubscriptionOptions,
    ) {
        if crate::topic::parse_shared(filter).is_some() {
            self.shared.insert(filter, client.clone(), options);
        } else {
            self.subscriptions.insert(filter, client.clone(), options);
        }
    }

    pub(super) fn remove_subscription(&mut self, filter: &str, client: &ClientKey) {
        if crate::topic::parse_shared(filter).is_some() {
            self.shared.remove(filter, client);
        } else {
            self.subscriptions.remove(filter, client);
        }
    }

    pub(super) fn save_session_record(
        &mut self,
        client: &str,
        subscriptions: &Subscriptions,
        expiry: Option<persist::StoredExpiry>,
    ) {
        if self.durable.is_some() {
            self.batch_ops.push(Op::Put {
                space: Keyspace::Sessions,
                key: client.as_bytes().to_vec(),
                value: persist::encode_session(subscriptions, expiry),
            });
        }
    }

    pub(super) fn discard_session(&mut self, client: &ClientKey) {
        self.perms.remove(client);
        let Some(session) = self.sessions.remove(client) else {
            return;
        };
        for filter in session.subscriptions.keys() {
            self.remove_subscription(filter, client);
        }
        if !session.clean && self.durable.is_some() {
            for id in session.stored_ids() {
                self.batch_ops.push(Op::Remove {
                    space: Keyspace::SessionQueue,
                    key: persist::queue_key(client, id),
                });
            }
            self.batch_ops.push(Op::Remove {
                space: Keyspace::Sessions,
                key: client.as_bytes().to_vec(),
            });
        }
    }

    /// `tell`: why the broker ended the connection, for an MQTT 5 client's DISCONNECT.
    pub(super) fn disconnected(
        &mut self,
        conn: ConnId,
        graceful: bool,
        session_expiry: Option<u32>,
        tell: Option<CloseReason>,
    ) {
        let Some(client) = self
            .clients
            .remove(&conn)
            .map(|info| info.client_id.clone())
        else {
            return; // taken over earlier: its will was handled then
        };
        self.stats.connection_closed();
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        let (will, will_delay) = match session.online.take() {
            Some(online) if online.conn == conn => {
                if let Some(reason) = tell {
                    // Behind the CONNACK even if that still waits for the disk: the first
                    // packet a client sees is its CONNACK [MQTT-3.2.0-1].
                    online.outbox.send_in_order(Outbound::Close(reason));
                }
                (online.will.map(|w| *w), online.will_delay)
            }
            other => {
                session.online = other;
                return;
            }
        };
        if let Some(expiry) = session_expiry {
            // MQTT 5 DISCONNECT may change the interval (not from 0: the connection
            // refuses that as a protocol error [MQTT-3.14.2-2]).
            session.expiry_secs = expiry;
            session.clean = expiry == 0;
        }
        let clean = session.clean;
        let will = will.filter(|_| !graceful);
        if let Some(will) = will {
            if will_delay == 0 || clean {
                debug!(client_id = %client, topic = %will.topic, "publishing will");
                self.publish_will(will, &client);
            } else {
                session.delayed_will = Some(Box::new((
                    Instant::now() + Duration::from_secs(u64::from(will_delay)),
                    will,
                )));
                self.timed_sessions.insert(client.clone());
            }
        }
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        if clean {
            self.discard_session(&client);
        } else if session.expiry_secs != SESSION_NEVER_EXPIRES {
            session.expires_at =
                Some(Instant::now() + Duration::from_secs(u64::from(session.expiry_secs)));
            self.timed_sessions.insert(client.clone());
            let subscriptions = session.subscriptions.clone();
            let expiry = stored_expiry(session);
            // The deadline goes into the session record, so a restart keeps it.
            self.save_session_record(&client, &subscriptions, expiry);
        }
    }

    /// Publishes a will now, its message expiry counted from now.
    pub(super) fn publish_will(&mut self, mut will: Message, client: &ClientKey) {
        if let Some(p) = will.properties.as_mut() {
            if let Some(secs) = p.message_expiry_interval {
                Arc::make_mut(p).expires_at_ms = Some(unix_ms() + u64::from(secs) * 1000);
            }
        }
        // A will that cannot be stored is logged and counted by accept_publish.
        let _ = self.accept_publish(will, client, None);
    }

    /// Delayed wills whose time has come and offline sessions whose expiry interval has
    /// passed (their delayed will, if any, goes out as the session ends).
    pub(super) fn expire_sessions(&mut self) {
        if self.timed_sessions.is_empty() {
            return;
        }
        let now = Instant::now();
        let clients: Vec<ClientKey> = self.timed_sessions.iter().cloned().collect();
        for client in clients {
            let Some(session) = self.sessions.get_mut(&client) else {
                self.timed_sessions.remove(&client);
                continue;
            };
            let offline = session.online.is_none();
            let session_over = offline && session.expires_at.is_some_and(|at| at <= now);
            let will_due = session
                .delayed_will
                .as_ref()
                .is_some_and(|w| w.0 <= now || session_over);
            if will_due {
                if let Some((_, will)) = session.delayed_will.take().map(|b| *b) {
                    debug!(client_id = %client, topic = %will.topic, "publishing delayed will");
                    self.publish_will(will, &client);
                }
            }
            if session_over {
                info!(client_id = %client, "session expired: discarded");
                self.discard_session(&client);
                self.timed_sessions.remove(&client);
            } else if let Some(session) = self.sessions.get(&client) {
                if session.delayed_will.is_none() && (session.expires_at.is_none() || !offline) {
                    self.timed_sessions.remove(&client);
                }
            }
        }
    }

    /// SUBACK goes out once the session record (for a persistent session) is durable, like
    /// a PUBACK, so a subscription the client was told about survives a crash; the retained
    /// messages for the new filters follow it ([`Router::release`]). Live messages may reach
    /// the client before its SUBACK, which MQTT 3.1.1 allows (3.8.4).
    pub(super) fn subscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<SubscribeFilter>) {
        let max_subscriptions = self.limits.max_subscriptions;
        let stored = self.durable.is_some();
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        let persistent = stored && !session.clean;
        // Admission: the session record is rewritten whole and must stay within
        // MAX_SESSION_RECORD_BYTES; filters that would outgrow it are refused for this
        // client alone, never by failing the burst's commit.
        let mut record_bytes: usize = if persistent {
            session
                .subscriptions
                .keys()
                .map(|f| persist::subscription_record_len(f))
                .sum()
        } else {
            0
        };
        let mut granted = Vec::with_capacity(filters.len());
        let mut new_filters = Vec::new();
        let (mut over_limit, mut record_full) = (0u64, 0u64);
        for f in filters {
            let known = session.subscriptions.contains_key(&f.filter);
            let full =
                max_subscriptions > 0 && session.subscriptions.len() >= max_subscriptions && !known;
            let grows = if persistent && !known {
                persist::subscription_record_len(&f.filter)
            } else {
                0
            };
            match f.requested {
                Ok(_) if full => {
                    over_limit += 1;
                    granted.push(Err(SubscribeRefusal::QuotaExceeded));
                }
                Ok(_) if record_bytes + grows > persist::MAX_SESSION_RECORD_BYTES => {
                    record_full += 1;
                    granted.push(Err(SubscribeRefusal::Unspecified));
                }
                Ok(options) => {
                    let qos = options.qos;
                    record_bytes += grows;
                    session.subscriptions.insert(f.filter.clone(), options);
                    granted.push(Ok(qos));
                    // Retain handling [MQTT-3.3.1-9..11]: 0 sends the retained messages at
                    // every subscribe, 1 only for a new subscription, 2 never.
                    // A shared subscription gets no retained messages [MQTT-3.8.4-?, 4.8.2].
                    let send_retained = match options.retain_handling {
                        _ if f.filter.starts_with("$share/") => false,
                        0 => true,
                        1 => !known,
                        _ => false,
                    };
                    new_filters.push((f.filter, options, send_retained));
                }
                Err(refusal) => granted.push(Err(refusal)),
            }
        }
        let outbox = session.online.as_ref().map(|o| o.outbox.clone());
        let record = persistent.then(|| (session.subscriptions.clone(), stored_expiry(session)));
        if over_limit > 0 {
            self.stats
                .limit_refusals
                .fetch_add(over_limit, Ordering::Relaxed);
            warn!(client_id = %client, refused = over_limit, max_subscriptions, "max_subscriptions reached: filters refused in SUBACK");
        }
        if record_full > 0 {
            self.stats
                .session_record_full
                .fetch_add(record_full, Ordering::Relaxed);
            warn!(client_id = %client, refused = record_full, max_record_bytes = persist::MAX_SESSION_RECORD_BYTES,
                "session record full: filters refused in SUBACK (0x80)");
        }
        for (filter, options, _) in &new_filters {
            self.add_subscription(filter, &client, *options);
        }
        if let Some((subscriptions, expiry)) = record {
            self.save_session_record(&client, &subscriptions, expiry);
        }
        let new_filters = new_filters
            .into_iter()
            .filter(|(_, _, send_retained)| *send_retained)
            .map(|(filter, options, _)| (filter, options))
            .collect();
        if let Some(outbox) = outbox {
            self.batch_acks.push(AckTarget::SubAck {
                conn,
                outbox,
                packet: Outbound::SubAck { pkid, granted },
                granted: new_filters,
            });
        }
    }

    /// Retained messages matching newly granted filters, with the retain flag set
    /// [MQTT-3.3.1-6], to the session of `conn` if it is still connected.
    pub(super) fn send_retained(
        &mut self,
        conn: ConnId,
        granted: &[(String, SubscriptionOptions)],
    ) {
        let Some((client, _)) = self.session_of(conn) else {
            return;
        };
        let mut retained: Vec<Message> = Vec::new();
        for (filter, options) in granted {
            let ids: Vec<u32> = options.subscription_id.into_iter().collect();
            for message in self.retained.values() {
                if filter_matches(filter, &message.topic) {
                    let mut copy = publish::copy_for(message, *options, &ids);
                    copy.retain = true;
                    retained.push(copy);
                }
            }
        }
        for message in retained {
            self.deliver_to(&client, message);
        }
    }

    /// UNSUBACK, like SUBACK, once the shrunk session record is durable.
    pub(super) fn unsubscribe(&mut self, conn: ConnId, pkid: u16, filters: Vec<String>) {
        let Some((client, session)) = self.session_of(conn) else {
            return;
        };
        let existed: Vec<bool> = filters
            .iter()
            .map(|filter| session.subscriptions.remove(filter).is_some())
            .collect();
        let outbox = session.online.as_ref().map(|o| o.outbox.clone());
        let record =
            (!session.clean).then(|| (session.subscriptions.clone(), stored_expiry(session)));
        for filter in &filters {
            self.remove_subscription(filter, &client);
        }
        if let Some((subscriptions, expiry)) = record {
            self.save_session_record(&client, &subscriptions, expiry);
        }
        if let Some(outbox) = outbox {
            self.batch_acks.push(AckTarget::Client(
                outbox,
                Outbound::UnsubAck { pkid, existed },
            ));
        }
    }
}

/// The expiry to store in a session's record: `None` for a session that never expires; a
/// deadline only while its client is away.
fn stored_expiry(session: &Session) -> Option<persist::StoredExpiry> {
    (session.expiry_secs != SESSION_NEVER_EXPIRES).then(|| persist::StoredExpiry {
        secs: session.expiry_secs,
        deadline_ms: session
            .expires_at
            .map(|at| unix_ms() + at.saturating_duration_since(Instant::now()).as_millis() as u64),
    })
}
