//! One bridge's task: connect (with back-off), then run the forwarding session over the
//! link until it ends, and again, until shutdown.
//!
//! The session is a single loop that owns every piece of forwarding state — the window of
//! PUBLISHes sent and not yet acknowledged, the cursor and its durable copy, keep-alive
//! deadlines — and waits in one `select!` on things that are all cancel-safe: the link's
//! incoming queue, the store's durability watch, a tick and shutdown. It never awaits the
//! network itself: connection attempts run in a task of their own (`link::connect`) and
//! bytes go out through the link's writer task.
//!
//! The [`Window`] outlives a connection: after a reconnect the PUBLISHes still unacknowledged
//! are sent again first, with their packet ids and DUP set (MQTT-4.4.0-1 for a persistent
//! session), and entries already acknowledged are not sent again.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::failure::{encoded, Failure};
use super::forward::MAX_WINDOW_BYTES;
use super::inbound::{acknowledge_commands, AbortOnDrop};
use super::link::{self, Link, LinkError, LinkParams};
use super::window::{Drops, KeepAlive, Window};
use super::wire::{ConnectOptions, Encoder, Incoming};
use super::{cursor_key, load_cursor, Backoff, Bridge, BridgeStatus, RateLimiter, Secret};
use crate::store::{Keyspace, Op, Seq, Ticket};
use crate::time::unix_ms;

/// With no cursor write outstanding, persist an advanced cursor once this long has passed
/// since the last write (at once after a quiet spell, so a trickle is on disk promptly).
const CURSOR_PERSIST_INTERVAL: Duration = Duration::from_millis(20);

/// Most packets from the upstream handled in one turn of the session loop.
const INCOMING_PER_TURN: usize = 1024;

/// How long a graceful shutdown waits for queued bytes and DISCONNECT to leave.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

impl Bridge {
    pub(super) fn set_status(&self, f: impl FnOnce(&mut BridgeStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut status);
    }

    /// The bridge's task: runs until shutdown.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(&self.config.reconnect);
        let mut window = Window::new(load_cursor(&self.store, &self.config.name));
        let wire = self
            .status
            .lock()
            .map(|s| s.wire.clone())
            .unwrap_or_default();
        self.set_status(|s| {
            s.name = self.config.name.clone();
            s.cursor = window.cursor;
            s.down_since_ms = Some(unix_ms());
        });
        let shutdown = self.shutdown.clone();
        loop {
            if shutdown.is_signalled() {
                return;
            }
            self.set_status(|s| s.connect_attempts += 1);
            let failure = match self.link_params() {
                Err(e) => Failure::new("config", e),
                Ok(params) => {
                    debug!(bridge = %self.config.name, address = %self.config.address, "connecting upstream");
                    let mut attempt = tokio::spawn(link::connect(params, wire.clone()));
                    // Cancel safety: the attempt lives in its own task; this select waits on
                    // its JoinHandle (dropping a JoinHandle cancels nothing) and aborts the
                    // task itself on shutdown.
                    let attempted = tokio::select! {
                        joined = &mut attempt => joined,
                        _ = shutdown.signalled() => {
                            attempt.abort();
                            return;
                        }
                    };
                    match attempted {
                        Ok(Ok(link)) => {
                            backoff.reset();
                            match self.session(link, &mut window).await {
                                Ok(()) => return, // shutdown
                                Err(f) => f,
                            }
                        }
                        Ok(Err(e)) => e.into(),
                        Err(e) => Failure::new("io_error", format!("connection task: {e}")),
                    }
                }
            };
            warn!(bridge = %self.config.name, address = %self.config.address, reason = failure.reason, error = %failure.message, "upstream connection lost or refused; retrying");
            self.set_status(|s| {
                if s.connected {
                    s.down_since_ms = Some(unix_ms());
                }
                s.connected = false;
                s.inflight = 0;
                s.last_error = Some(failure.message.clone());
                s.reconnects += 1;
                *s.failures.entry(failure.reason).or_insert(0) += 1;
            });
            let wait = backoff.next();
            debug!(bridge = %self.config.name, ?wait, "reconnecting after back-off");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.signalled() => return,
            }
        }
    }

    fn link_params(&self) -> Result<LinkParams, String> {
        let (host, port) =
            crate::config::bridge::split_host_port(&self.config.address).ok_or("bad address")?;
        let password = match &self.config.username {
            Some(_) => self.config.password()?,
            None => None,
        };
        let connect = ConnectOptions {
            protocol: self.config.protocol,
            client_id: self.client_id.clone(),
            keep_alive: u16::try_from(self.config.keep_alive).unwrap_or(u16::MAX),
            clean_session: self.config.clean_session,
            session_expiry: self.config.session_expiry_secs(),
            username: self.config.username.clone(),
            password: password.as_ref().map(|p| Secret::expose(p).to_string()),
        };
        Ok(LinkParams {
            host,
            port,
            tls: self.config.tls_config()?,
            connect,
            step_timeout: Duration::from_secs(self.config.connect_timeout),
            tcp_user_timeout: Duration::from_secs(self.config.keep_alive) * 3 / 2,
        })
    }

    /// One connected session, until the link fails (`Err`) or shutdown (`Ok`).
    async fn session(&mut self, mut link: Link, window: &mut Window) -> Result<(), Failure> {
        info!(bridge = %self.config.name, address = %self.config.address, session_present = link.session_present, protocol = link.protocol, "upstream connected");
        if link.protocol == 5 {
            let l = &link.limits;
            info!(bridge = %self.config.name, receive_maximum = l.receive_maximum, maximum_packet_size = ?l.max_packet_size, topic_alias_maximum = l.topic_alias_maximum, server_keep_alive = ?l.server_keep_alive, session_expiry = ?l.session_expiry, "upstream MQTT 5 limits");
        }
        self.set_status(|s| {
            s.connected = true;
            s.last_error = None;
            s.down_since_ms = None;
            s.connected_since_ms = Some(unix_ms());
        });
        // An MQTT 5 upstream's Server Keep Alive replaces ours [MQTT-3.2.2-21].
        let keep_alive_secs = match link.limits.server_keep_alive {
            Some(secs) if secs > 0 => u64::from(secs),
            _ => self.config.keep_alive,
        };
        let mut keep_alive = KeepAlive::new(Duration::from_secs(keep_alive_secs));
        // Encoded this turn and not yet queued to the writer. A session that failed before
        // queuing them left their frames behind: keep them to send now with the others.
        let mut out = std::mem::take(&mut window.out);
        if !out.is_empty() {
            let never_written = out.split().freeze();
            window.keep_frames(&never_written);
        }
        let result = self
            .run_session(&mut link, window, &mut out, &mut keep_alive)
            .await;
        window.out = out;
        match result {
            Ok(()) => {
                link.close(CLOSE_GRACE).await;
                Ok(())
            }
            Err(f) => Err(f),
        }
    }

    async fn run_session(
        &self,
        link: &mut Link,
        window: &mut Window,
        out: &mut BytesMut,
        keep_alive: &mut KeepAlive,
    ) -> Result<(), Failure> {
        // The window: our max_inflight, within the upstream's receive maximum.
        let max_inflight = usize::from(self.config.max_inflight)
            .min(usize::from(link.limits.receive_maximum))
            .max(1);
        let mut encoder = Encoder::new(link.protocol, &link.limits);
        let ack_timeout = Duration::from_secs(self.config.ack_timeout);
        let mut rate = self.config.max_rate.map(RateLimiter::new);
        let mut durable = self.store.durability();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.shutdown.clone();
        let own_origin = crate::router::bridge_origin(&self.config.name);

        // Commands are acknowledged upstream in the order they came (MQTT-4.6.0-2), each once
        // the router has accepted it: a task per connection awaits them in turn.
        let (command_acks, command_acks_rx) = mpsc::unbounded_channel();
        let acker = link
            .sender()
            .map(|tx| tokio::spawn(acknowledge_commands(command_acks_rx, tx)));
        let _acker = AbortOnDrop(acker);

        self.resume(window, out, &mut encoder, max_inflight)?;

        let mut skip_rounds = 0;
        loop {
            let durable_through = durable.borrow().durable_through;
            window.absorb_durability(durable_through);
            // QoS 0 forwards take no window slot: while a stalled upstream leaves a window's
            // worth of bytes unwritten, nothing more is read from the log (the 10 ms tick
            // looks again), or a QoS 0 backlog would move from disk into memory.
            let added = if link.queued_bytes() < MAX_WINDOW_BYTES {
                self.fill_window(
                    window,
                    out,
                    &mut encoder,
                    max_inflight,
                    &mut rate,
                    &own_origin,
                )?
            } else {
                0
            };
            self.flush_batch_if_due(window, out, &mut encoder, max_inflight)?;
            let advanced = self.advance(window, added);
            self.persist_or_delete(window, max_inflight);

            self.check_and_write(link, window, out, &encoder, keep_alive, ack_timeout)?;

            // Entries that were not for this bridge were passed over without sending: read
            // on at once rather than after the next wake-up (a few rounds, then wait).
            if advanced > 0 && added == 0 && window.room(max_inflight) > 0 && skip_rounds < 8 {
                skip_rounds += 1;
                continue;
            }
            skip_rounds = 0;

            // Cancel safety: every branch is cancel-safe. `link.incoming()` is an mpsc
            // receive (the reader task owns the socket and any partly read packet),
            // `changed()` and `tick()` keep no data, and writes never happen here: they are
            // queued to the link's writer task above. The batch timer is a plain sleep: the
            // pending batch is state in `window`, owned by this loop, not by the future, so
            // dropping the sleep when another branch wins loses nothing (it is made again
            // from the batch's deadline next turn, and `flush_batch_if_due` sends it).
            let batch_due = window.batch.as_ref().map(|b| b.deadline);
            let batch_timer = tokio::time::sleep_until(tokio::time::Instant::from_std(
                batch_due.unwrap_or_else(Instant::now),
            ));
            tokio::select! {
                packet = link.incoming() => {
                    let mut packet = packet?;
                    keep_alive.heard();
                    // Everything already queued in the same turn: a burst of PUBACKs frees
                    // its slots together and the refill goes out in one write.
                    let mut handled = 0;
                    loop {
                        self.on_packet(packet, window, &encoder, &command_acks).await?;
                        handled += 1;
                        if handled == INCOMING_PER_TURN {
                            break; // the rest waits for the next turn, still queued
                        }
                        match link.try_incoming() {
                            Some(next) => packet = next?,
                            None => break,
                        }
                    }
                }
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(Failure::new("store", "store closed"));
                    }
                }
                _ = tick.tick() => {}
                _ = batch_timer, if batch_due.is_some() => {}
                _ = shutdown.signalled() => {
                    window.advance();
                    if window.cursor > window.persisted {
                        self.persist_cursor(window.cursor, true);
                    }
                    return Ok(()); // the caller closes the link
                }
            }
        }
    }

    /// Ends the session on a stalled upstream (`ack_timeout`) or a dead link (keep-alive),
    /// pings when due, and queues what this turn encoded to the link's writer.
    fn check_and_write(
        &self,
        link: &Link,
        window: &mut Window,
        out: &mut BytesMut,
        encoder: &Encoder,
        keep_alive: &mut KeepAlive,
        ack_timeout: Duration,
    ) -> Result<(), Failure> {
        // Events of the pending batch (no packet id yet) wait for it, not for an ack.
        if let Some(oldest) = window.sent.iter().find(|s| !s.acked && s.pkid != 0) {
            if oldest.sent_at.elapsed() > ack_timeout {
                return Err(LinkError::AckTimeout(ack_timeout.as_secs()).into());
            }
        }
        if let Some(dead) = keep_alive.dead() {
            return Err(dead.into());
        }
        if keep_alive.ping_due(window.unacked() > 0) {
            encoded(encoder.pingreq(out))?;
            keep_alive.ping_sent_at = Some(Instant::now());
        }
        if !out.is_empty() {
            let written = out.split().freeze();
            window.keep_frames(&written);
            link.send(written);
            keep_alive.last_sent = Instant::now();
        }
        Ok(())
    }

    /// Moves the cursor over what is done and reports it; returns how far it moved.
    fn advance(&self, window: &mut Window, added: usize) -> u64 {
        let advanced = window.advance();
        if advanced > 0 || added > 0 {
            let (cursor, inflight) = (window.cursor, window.unacked());
            let acked = std::mem::take(&mut window.acked_since_status);
            self.set_status(|s| {
                s.cursor = cursor;
                s.inflight = inflight;
                s.forwarded += acked;
            });
        }
        advanced
    }

    async fn on_packet(
        &self,
        packet: Incoming,
        window: &mut Window,
        encoder: &Encoder,
        command_acks: &mpsc::UnboundedSender<(Bytes, oneshot::Receiver<()>)>,
    ) -> Result<(), Failure> {
        match packet {
            Incoming::PubAck { pkid, refused } => {
                let Some(seq) = window.by_pkid.remove(&pkid) else {
                    debug!(bridge = %self.config.name, pkid, "PUBACK for no message in flight");
                    return Ok(());
                };
                if let Some(reason) = refused {
                    // An MQTT 5 upstream that will not take it (not authorized, quota...):
                    // sending it again would be refused again, so it is done with, as a
                    // 3.1.1 upstream's plain PUBACK for a message it drops would be.
                    if Drops::count(&mut window.drops.refused) {
                        warn!(bridge = %self.config.name, seq, %reason, refused = window.drops.refused, "upstream refused a forwarded message (PUBACK reason code)");
                    }
                }
                window.acked_since_status += window.acknowledge(seq, pkid);
            }
            Incoming::PingResp => {}
            Incoming::Publish(publish) => {
                self.deliver_locally(publish, encoder, command_acks).await?
            }
            Incoming::PubRel(pkid) => {
                // QoS 2 from an upstream that ignored our granted QoS: finish its handshake.
                let mut frame = BytesMut::new();
                encoded(encoder.pubcomp(&mut frame, pkid))?;
                let (done, ready) = oneshot::channel();
                let _ = done.send(());
                let _ = command_acks.send((frame.freeze(), ready));
            }
            Incoming::SubAck { pkid, refused } => {
                window.by_pkid.remove(&pkid);
                if refused {
                    warn!(bridge = %self.config.name, "upstream refused a subscription");
                }
            }
            Incoming::Disconnect(reason) => {
                return Err(Failure::new(
                    "closed_by_upstream",
                    format!("upstream sent DISCONNECT: {reason}"),
                ))
            }
            Incoming::Unexpected(what) => {
                return Err(Failure::new(
                    "protocol_error",
                    format!("unexpected packet from upstream: {what}"),
                ))
            }
            Incoming::ConnAck { .. } => {
                return Err(Failure::new(
                    "protocol_error",
                    "unexpected packet from upstream: a second CONNACK",
                ))
            }
        }
        Ok(())
    }

    /// Submits the cursor when it is worth a write, or a deletion held back. Each write is a
    /// group commit with an fsync, so under load they go out in runs: when half the window's
    /// worth of forwarded entries waits to be durably behind the cursor (the window closes at
    /// a whole one; up to two writes outstanding), or every `CURSOR_PERSIST_INTERVAL`.
    fn persist_or_delete(&self, window: &mut Window, max_inflight: usize) {
        let filling =
            window.forwarded_unpersisted.len() * 2 >= max_inflight && window.unconfirmed.len() < 2;
        let stale = window.unconfirmed.is_empty()
            && window.last_persist.elapsed() >= CURSOR_PERSIST_INTERVAL;
        if window.cursor > window.persisted && (filling || stale) {
            // Not submitted: `persisted` stays behind, so the next turn tries again.
            if let Some(ticket) = self.persist_cursor(window.cursor, false) {
                window.unconfirmed.push_back((ticket, window.cursor));
                window.persisted = window.cursor;
            }
            window.last_persist = Instant::now();
        } else if let Some(min) = self.cursors.delete_due() {
            // Idle, but a delete was held back to make a longer run: do it now, or a log
            // kept full by `reject_new` would never make room.
            if let Err(e) = self.store.submit(vec![Op::DeleteLogThrough(min)]) {
                error!(bridge = %self.config.name, error = %e, "cannot delete forwarded log entries; retrying at the next turn");
                crate::stats::STORE_FAULTS.record(
                    crate::stats::StoreFault::CursorNotSaved,
                    format!(
                        "bridge {}: deleting forwarded entries: {e}",
                        self.config.name
                    ),
                );
            }
        }
    }

    /// Submits the cursor (and the deletion of entries every bridge is done with); returns
    /// the ticket that becomes durable with it.
    fn persist_cursor(&self, cursor: Seq, force_delete: bool) -> Option<Ticket> {
        let mut ops = vec![Op::Put {
            space: Keyspace::Meta,
            key: cursor_key(&self.config.name),
            value: cursor.to_be_bytes().to_vec(),
        }];
        if let Some(min) = self.cursors.advance(self.index, cursor, force_delete) {
            ops.push(Op::DeleteLogThrough(min));
        }
        match self.store.submit(ops) {
            Ok((ticket, _)) => Some(ticket),
            Err(e) => {
                // After a crash the entries behind the unsaved cursor would be forwarded
                // again (duplicates, never a loss); the next turn submits it again.
                error!(bridge = %self.config.name, error = %e, cursor, "cannot persist bridge cursor; retrying at the next turn");
                crate::stats::STORE_FAULTS.record(
                    crate::stats::StoreFault::CursorNotSaved,
                    format!("bridge {}: cursor {cursor}: {e}", self.config.name),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::window::Sent;
    use super::*;

    // A cursor the store refused used to be logged at WARN and then forgotten: the window
    // counted it as submitted, so it was not written again until the cursor moved. It is now
    // an ERROR, a counted store fault, and submitted again at the next turn.
    #[test]
    fn a_cursor_the_store_refuses_is_a_counted_fault_and_is_submitted_again() {
        use serde::de::value::{Error, MapDeserializer};
        use serde::Deserialize;
        let tmp = tempfile::tempdir().expect("tempdir");
        let (store, _) =
            crate::store::Store::open(crate::store::StoreConfig::new(tmp.path().join("store")))
                .expect("open");
        let config = super::super::BridgeConfig::deserialize(MapDeserializer::<_, Error>::new(
            [("name", "cloud"), ("address", "127.0.0.1:1")].into_iter(),
        ))
        .expect("config");
        let (router, _router_rx) = mpsc::channel(1);
        let shutdown = crate::shutdown::Shutdown::new();
        let bridge = Bridge {
            config,
            client_id: "gw-cloud".into(),
            index: 0,
            store: store.clone(),
            cursors: super::super::Cursors::new(vec![0], 0),
            router,
            status: Default::default(),
            shutdown,
            stats: Default::default(),
        };
        store.shutdown().expect("shutdown");
        let before = crate::stats::STORE_FAULTS.count(crate::stats::StoreFault::CursorNotSaved);
        let mut window = Window::new(0);
        window.cursor = 5;
        std::thread::sleep(CURSOR_PERSIST_INTERVAL * 2);
        bridge.persist_or_delete(&mut window, 100);
        assert!(
            crate::stats::STORE_FAULTS.count(crate::stats::StoreFault::CursorNotSaved) > before
        );
        assert_eq!(
            window.persisted, 0,
            "not submitted: tried again at the next turn"
        );
        assert!(window.unconfirmed.is_empty());
    }

    #[test]
    fn window_room_bounds_both_in_flight_and_undurable() {
        let mut w = Window::new(0);
        for seq in 1..=3 {
            let pkid = w.allocate_pkid();
            w.by_pkid.insert(pkid, seq);
            w.sent.push_back(Sent {
                seq,
                pkid,
                acked: false,
                sent_at: Instant::now(),
                received_at_ms: 0,
                forwarded: true,
                frame: None,
                message: None,
                expires_at_ms: None,
                size: 0,
            });
        }
        assert_eq!(w.room(4), 1);
        w.sent[0].acked = true;
        w.sent[1].acked = true;
        assert_eq!(w.advance(), 2);
        assert_eq!(w.cursor, 2);
        // Acknowledged but not durable: still bounded by max_inflight.
        assert_eq!(w.forwarded_unpersisted.len(), 2);
        assert_eq!(
            w.room(2),
            0,
            "two undurable forwarded entries fill a window of 2"
        );
        assert_eq!(w.room(4), 2);
        w.unconfirmed.push_back((7, 2));
        w.absorb_durability(6);
        assert_eq!(w.forwarded_unpersisted.len(), 2, "ticket 7 not durable yet");
        w.absorb_durability(7);
        assert_eq!(w.durable_cursor, 2);
        assert!(w.forwarded_unpersisted.is_empty());
        assert_eq!(w.room(2), 1);
    }

    #[test]
    fn packet_ids_skip_those_in_use_and_wrap_past_zero() {
        let mut w = Window::new(0);
        w.next_pkid = u16::MAX;
        w.by_pkid.insert(1, 10);
        assert_eq!(w.allocate_pkid(), u16::MAX);
        assert_eq!(w.allocate_pkid(), 2, "0 is never an id and 1 is in use");
    }

    #[test]
    fn keep_alive_pings_sooner_under_load_and_declares_death_after_half_an_interval() {
        let mut k = KeepAlive::new(Duration::from_millis(200));
        assert!(!k.ping_due(false));
        k.last_heard = Instant::now() - Duration::from_millis(120);
        assert!(
            !k.ping_due(false),
            "idle: nothing heard for 120 of 200 ms is fine"
        );
        assert!(
            k.ping_due(true),
            "waiting for acks: 120 ms of silence > 100"
        );
        k.ping_sent_at = Some(Instant::now() - Duration::from_millis(150));
        assert!(!k.ping_due(true), "one ping at a time");
        assert!(k.dead().is_some(), "no answer 150 ms after the ping");
        k.heard();
        assert!(k.dead().is_none(), "something heard after the ping");
        assert!(!k.ping_due(true));
    }
}
