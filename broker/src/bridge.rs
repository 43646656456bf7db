//! Upstream bridges: forward the durable log to a cloud broker, and bring the cloud's
//! commands back to local subscribers.
//!
//! Each bridge is one task with one rumqttc connection. It reads the log from its own
//! durable cursor, publishes the entries that match its `forward` rules in log order with
//! at most `max_inflight` unacknowledged, and moves its cursor over an entry only when
//! every entry up to it is acknowledged upstream (QoS 1 PUBACK; QoS 0 once written). The
//! log entry is deleted when every bridge's cursor has passed it (`Cursors`).
//!
//! Invariants:
//! - Never skip: the cursor only advances over a contiguous run of acknowledged entries,
//!   so a crash or reconnect resends from the first unacknowledged one.
//! - Bounded duplicates: after a crash the bridge resends from its last *durable* cursor,
//!   so what it may send twice is what is in flight plus what was acknowledged upstream but
//!   whose cursor write is not durable yet. Both share the `max_inflight` window: a forwarded
//!   entry frees its slot only once a cursor past it is on disk, so a crash duplicates at
//!   most `max_inflight` messages. Cursor writes ride the store's group commit and are
//!   pipelined (up to two outstanding), so the window refills one commit after the acks.
//! - Never drop for slowness: an upstream that is away, refuses us or stalls (connected
//!   but not acknowledging for `ack_timeout`) is reconnected with capped, jittered
//!   exponential back-off while the log holds everything.
//! - In order: one connection, one in-order stream; on reconnect the unacknowledged
//!   entries are sent again first, because reading restarts at the cursor.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, TlsConfiguration, Transport};
use serde::{Deserialize, Deserializer};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::message::{Message, QoS};
use crate::router::RouterCmd;
use crate::store::record::StoredMessage;
use crate::store::{Keyspace, Op, Seq, Store};
use crate::topic::{filter_matches, valid_filter};

/// Log entries read per range scan.
const READ_AHEAD: usize = 1024;

/// Persist the cursor after this many newly acknowledged entries...
const CURSOR_PERSIST_EVERY: u64 = 64;
/// ...or this long after the last persisted advance, whichever comes first.
const CURSOR_PERSIST_INTERVAL: Duration = Duration::from_millis(20);

fn default_keep_alive() -> u64 {
    30
}
fn default_max_inflight() -> u16 {
    100
}
fn default_ack_timeout() -> u64 {
    30
}
fn default_qos() -> u8 {
    1
}

/// `[[bridge]]` in the config file. Its `Debug` prints no password (see [`Secret`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    pub name: String,
    /// `host:port` of the upstream broker.
    pub address: String,
    /// Defaults to `<gateway id>-<bridge name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// The upstream password written in the config; better `password_file` or `password_env`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the upstream password (its first line), read at each connection.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the upstream password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// TLS to the upstream: `true` (system roots) or `{ ca_file, cert, key }`.
    #[serde(default, deserialize_with = "deserialize_bridge_tls")]
    pub tls: Option<BridgeTls>,
    /// Seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: u64,
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages per second while draining; unset = unlimited.
    #[serde(default)]
    pub max_rate: Option<u32>,
    /// Seconds an unacknowledged message may wait before the upstream counts as stalled.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: u64,
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    #[serde(default)]
    pub forward: Vec<ForwardRule>,
    #[serde(default)]
    pub subscribe: Vec<SubscribeRule>,
}

/// A secret (the upstream password): `Debug` and `Display` print `***`, so it cannot end up
/// in a log line or a status page by accident.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `tls` of a `[[bridge]]`: `tls = true` trusts the system's CA certificates;
/// `tls = { ca_file = "...", cert = "...", key = "..." }` trusts `ca_file` instead (when
/// given) and presents a client certificate (mutual TLS, as AWS IoT Core requires).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTls {
    /// PEM CA certificate(s) to trust; unset: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain; needs `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// `tls = true | false | { ... }`.
fn deserialize_bridge_tls<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BridgeTls>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<BridgeTls>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("true, false or a table { ca_file, cert, key }")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(v.then(BridgeTls::default))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            BridgeTls::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    deserializer.deserialize_any(Visitor)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// First back-off, milliseconds; doubled after each failure...
    pub initial_ms: u64,
    /// ...up to this, milliseconds. Each wait is jittered by +-25%.
    pub max_ms: u64,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial_ms: 500,
            max_ms: 30_000,
        }
    }
}

/// `[[bridge.forward]]`: local messages matching `local` go upstream as `remote_prefix + topic`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRule {
    pub local: String,
    #[serde(default)]
    pub remote_prefix: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
}

/// `[[bridge.subscribe]]`: upstream messages matching `remote` are published locally as
/// `local_prefix + topic`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRule {
    pub remote: String,
    #[serde(default)]
    pub local_prefix: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
}

impl BridgeConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let key = |k: &str| format!("bridge[{}].{k}", self.name);
        if self.name.is_empty() || self.name.contains(['/', '+', '#']) {
            return Err((
                "bridge.name".into(),
                format!("{:?} must be non-empty without / + #", self.name),
            ));
        }
        if split_host_port(&self.address).is_none() {
            return Err((
                key("address"),
                format!("{:?} is not host:port", self.address),
            ));
        }
        if self.max_inflight == 0 {
            return Err((key("max_inflight"), "must be at least 1".into()));
        }
        if self.max_rate == Some(0) {
            return Err((
                key("max_rate"),
                "must be at least 1 (or unset for no limit)".into(),
            ));
        }
        if self.keep_alive < 5 {
            return Err((key("keep_alive"), "must be at least 5 seconds".into()));
        }
        if self.reconnect.initial_ms == 0 || self.reconnect.max_ms < self.reconnect.initial_ms {
            return Err((key("reconnect"), "need 0 < initial_ms <= max_ms".into()));
        }
        let sources = [
            self.password.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err((
                key("password"),
                "set only one of password, password_file and password_env".into(),
            ));
        }
        if sources.contains(&true) && self.username.is_none() {
            return Err((
                key("username"),
                "a password needs a username (MQTT 3.1.1)".into(),
            ));
        }
        self.password().map_err(|e| {
            (
                key(if self.password_env.is_some() {
                    "password_env"
                } else {
                    "password_file"
                }),
                e,
            )
        })?;
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err((key("tls"), "cert and key go together".into()));
            }
            self.tls_config().map_err(|e| (key("tls"), e))?;
        }
        for rule in &self.forward {
            if !valid_filter(&rule.local) {
                return Err((
                    key("forward.local"),
                    format!("{:?} is not a valid topic filter", rule.local),
                ));
            }
            if rule.qos > 1 {
                return Err((key("forward.qos"), "must be 0 or 1".into()));
            }
        }
        for rule in &self.subscribe {
            if !valid_filter(&rule.remote) {
                return Err((
                    key("subscribe.remote"),
                    format!("{:?} is not a valid topic filter", rule.remote),
                ));
            }
            if rule.qos > 1 {
                return Err((key("subscribe.qos"), "must be 0 or 1".into()));
            }
        }
        Ok(())
    }

    /// The upstream password from `password`, `password_file` (first line) or
    /// `password_env`. Errors name the file or variable, never the value.
    pub fn password(&self) -> Result<Option<Secret>, String> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                return Err(format!(
                    "{} is empty: the password is its first line",
                    path.display()
                ));
            }
            return Ok(Some(Secret::new(line)));
        }
        if let Some(name) = &self.password_env {
            return match std::env::var(name) {
                Ok(value) if !value.is_empty() => Ok(Some(Secret::new(value))),
                _ => Err(format!(
                    "environment variable {name} is not set (or empty or not UTF-8)"
                )),
            };
        }
        Ok(self.password.clone())
    }

    /// The rustls client config for `tls`, reading its files (None: plain TCP).
    pub fn tls_config(
        &self,
    ) -> Result<Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>, String> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let client_auth = tls.cert.as_deref().zip(tls.key.as_deref());
        crate::tls::client_config(tls.ca_file.as_deref(), client_auth)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The forward rule for a local topic (the first that matches), if any.
    pub fn forward_rule(&self, topic: &str) -> Option<&ForwardRule> {
        self.forward
            .iter()
            .find(|r| filter_matches(&r.local, topic))
    }
}

fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
}

/// What a bridge shows of itself (for status endpoints and tests).
#[derive(Debug, Clone, Default)]
pub struct BridgeStatus {
    pub name: String,
    pub connected: bool,
    pub last_error: Option<String>,
    /// Every log entry with seq <= cursor is done for this bridge.
    pub cursor: Seq,
    pub forwarded: u64,
    pub received: u64,
    pub reconnects: u64,
    pub inflight: usize,
}

/// The cursors of every bridge: the log is deleted up to the slowest.
pub struct Cursors {
    state: Mutex<CursorState>,
}

struct CursorState {
    positions: Vec<Seq>,
    /// The log is deleted through here (or is about to be).
    deleted_through: Seq,
    last_delete: Instant,
}

/// Delete the log behind the slowest bridge in runs of at least this many entries (or
/// after `DELETE_INTERVAL`): each delete costs a range scan and a commit, so many small
/// ones slow the drain.
const DELETE_EVERY: u64 = 2048;
const DELETE_INTERVAL: Duration = Duration::from_millis(500);

impl Cursors {
    pub fn new(initial: Vec<Seq>) -> Arc<Cursors> {
        let deleted_through = initial.iter().copied().min().unwrap_or(0);
        Arc::new(Cursors {
            state: Mutex::new(CursorState {
                positions: initial,
                deleted_through,
                last_delete: Instant::now(),
            }),
        })
    }

    /// Records bridge `index` at `cursor`; returns how far the log may now be deleted, when
    /// that is worth a delete (a long enough run, a while since the last, or `force`).
    fn advance(&self, index: usize, cursor: Seq, force: bool) -> Option<Seq> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state.positions.get_mut(index)? = cursor;
        let min = state.positions.iter().copied().min()?;
        let behind = min.saturating_sub(state.deleted_through);
        if behind == 0
            || !(force || behind >= DELETE_EVERY || state.last_delete.elapsed() >= DELETE_INTERVAL)
        {
            return None;
        }
        state.deleted_through = min;
        state.last_delete = Instant::now();
        Some(min)
    }

    /// A delete that `advance` held back and whose interval has passed.
    fn delete_due(&self) -> Option<Seq> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let min = state.positions.iter().copied().min()?;
        if min <= state.deleted_through || state.last_delete.elapsed() < DELETE_INTERVAL {
            return None;
        }
        state.deleted_through = min;
        state.last_delete = Instant::now();
        Some(min)
    }

    pub fn min(&self) -> Seq {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.positions.iter().copied().min().unwrap_or(0)
    }
}

pub fn cursor_key(name: &str) -> Vec<u8> {
    format!("bridge/{name}/cursor").into_bytes()
}

pub fn load_cursor(store: &Store, name: &str) -> Seq {
    match store.get(Keyspace::Meta, &cursor_key(name)) {
        Ok(Some(bytes)) if bytes.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes);
            u64::from_be_bytes(b)
        }
        _ => 0,
    }
}

pub struct Bridge {
    pub config: BridgeConfig,
    pub client_id: String,
    pub index: usize,
    pub store: Store,
    pub cursors: Arc<Cursors>,
    pub router: mpsc::Sender<RouterCmd>,
    pub status: Arc<Mutex<BridgeStatus>>,
    pub shutdown: watch::Receiver<bool>,
}

/// What woke the bridge's connection loop.
enum Wake {
    Event(Result<Event, rumqttc::ConnectionError>),
    /// The store committed (false: it closed).
    Log(bool),
    Tick,
    Shutdown,
}

/// One message sent upstream and not yet acknowledged.
struct Sent {
    seq: Seq,
    pkid: Option<u16>,
    acked: bool,
    sent_at: Instant,
    /// When the broker received it (Unix ms), for the forward latency histogram.
    received_at_ms: u64,
    /// Published upstream (not passed over as not for this bridge): may be duplicated after
    /// a crash until a cursor past it is durable.
    forwarded: bool,
}

impl Sent {
    /// An entry this bridge does not send (not for it, or undecodable): done with at once.
    fn passed_over(seq: Seq) -> Sent {
        Sent {
            seq,
            pkid: None,
            acked: true,
            sent_at: Instant::now(),
            received_at_ms: 0,
            forwarded: false,
        }
    }
}

impl Bridge {
    fn set_status(&self, f: impl FnOnce(&mut BridgeStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut status);
    }

    pub async fn run(mut self) {
        let mut backoff = Backoff::new(&self.config.reconnect);
        let mut cursor = load_cursor(&self.store, &self.config.name);
        self.set_status(|s| {
            s.name = self.config.name.clone();
            s.cursor = cursor;
        });
        loop {
            let stopping = *self.shutdown.borrow();
            if stopping {
                return;
            }
            let outcome = self.connection(&mut cursor, &mut backoff).await;
            self.set_status(|s| {
                s.connected = false;
                s.inflight = 0;
            });
            match outcome {
                Ok(()) => return, // shutdown
                Err(e) => {
                    warn!(bridge = %self.config.name, error = %e, "upstream connection lost");
                    self.set_status(|s| {
                        s.last_error = Some(e.clone());
                        s.reconnects += 1;
                    });
                }
            }
            let wait = backoff.next();
            debug!(bridge = %self.config.name, ?wait, "reconnecting after back-off");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// One upstream connection, from CONNECT to its end. `Ok` only on shutdown.
    async fn connection(&mut self, cursor: &mut Seq, backoff: &mut Backoff) -> Result<(), String> {
        let (host, port) = split_host_port(&self.config.address).ok_or("bad address")?;
        let mut options = MqttOptions::new(self.client_id.clone(), host, port);
        options.set_keep_alive(Duration::from_secs(self.config.keep_alive));
        options.set_clean_session(true);
        options.set_inflight(self.config.max_inflight);
        options.set_request_channel_capacity(usize::from(self.config.max_inflight) * 2 + 16);
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        options.set_manual_acks(true);
        if let Some(user) = &self.config.username {
            let password = self.config.password()?;
            options.set_credentials(user.clone(), password.as_ref().map_or("", Secret::expose));
        }
        if let Some(tls) = self.config.tls_config()? {
            // rumqttc sends the address's host as SNI and checks the certificate against it.
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        let (client, mut eventloop) =
            AsyncClient::new(options, usize::from(self.config.max_inflight) * 2 + 16);
        let ack_timeout = Duration::from_secs(self.config.ack_timeout);
        let max_inflight = usize::from(self.config.max_inflight);
        let mut durable = self.store.durability();
        let mut connected = false;
        let mut rate = self.config.max_rate.map(RateLimiter::new);

        // Sent and not yet acknowledged, in log order; pkids arrive via Outgoing events in
        // the order the publishes were queued.
        let mut sent: VecDeque<Sent> = VecDeque::new();
        let mut awaiting_pkid: VecDeque<Seq> = VecDeque::new();
        let mut by_pkid: HashMap<u16, Seq> = HashMap::new();
        let mut next_read = *cursor + 1;
        // Entries read from the log ahead of the window: one range scan per READ_AHEAD
        // entries instead of one per window refill.
        let mut read_ahead: VecDeque<(Seq, bytes::Bytes)> = VecDeque::new();
        let mut persisted = *cursor;
        // Cursor writes submitted and not yet durable, and the cursor the disk surely has.
        let mut unconfirmed: VecDeque<(crate::store::Ticket, Seq)> = VecDeque::new();
        let mut durable_cursor = *cursor;
        // Forwarded entries behind the cursor but not behind the durable cursor: they hold
        // window slots (see "Bounded duplicates").
        let mut forwarded_unpersisted: VecDeque<Seq> = VecDeque::new();
        let mut skip_rounds = 0;
        let mut last_persist = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        let own_origin = crate::router::bridge_origin(&self.config.name);

        loop {
            let durable_through = durable.borrow().durable_through;
            while unconfirmed
                .front()
                .is_some_and(|(ticket, _)| *ticket <= durable_through)
            {
                if let Some((_, seq)) = unconfirmed.pop_front() {
                    durable_cursor = seq;
                }
            }
            while forwarded_unpersisted
                .front()
                .is_some_and(|seq| *seq <= durable_cursor)
            {
                forwarded_unpersisted.pop_front();
            }
            let occupied = sent.len() + forwarded_unpersisted.len();
            // Fill the window from the log.
            if connected && occupied < max_inflight {
                let budget = max_inflight - occupied;
                let budget = match &mut rate {
                    Some(r) => r.available(budget),
                    None => budget,
                };
                if budget > 0 {
                    if read_ahead.len() < budget {
                        let from = read_ahead.back().map_or(next_read, |(seq, _)| seq + 1);
                        let more = self
                            .store
                            .read_log(from, READ_AHEAD.max(budget))
                            .map_err(|e| format!("reading log: {e}"))?;
                        read_ahead.extend(more);
                    }
                    let take = budget.min(read_ahead.len());
                    for (seq, bytes) in read_ahead.drain(..take) {
                        next_read = seq + 1;
                        let record = match StoredMessage::decode(&bytes) {
                            Ok(r) => r,
                            Err(e) => {
                                warn!(bridge = %self.config.name, seq, error = %e, "undecodable log entry skipped");
                                sent.push_back(Sent::passed_over(seq));
                                continue;
                            }
                        };
                        let from_here = record.origin == own_origin;
                        let rule = if from_here {
                            None
                        } else {
                            self.config.forward_rule(&record.topic)
                        };
                        let Some(rule) = rule else {
                            // Not for this bridge (or its own command coming back): done for it.
                            sent.push_back(Sent::passed_over(seq));
                            continue;
                        };
                        let topic = format!("{}{}", rule.remote_prefix, record.topic);
                        let qos = if rule.qos == 0 || record.qos == 0 {
                            rumqttc::QoS::AtMostOnce
                        } else {
                            rumqttc::QoS::AtLeastOnce
                        };
                        client
                            .try_publish(topic, qos, record.retain, record.payload.to_vec())
                            .map_err(|e| format!("queueing publish: {e}"))?;
                        if let Some(r) = &mut rate {
                            r.take();
                        }
                        awaiting_pkid.push_back(seq);
                        sent.push_back(Sent {
                            seq,
                            pkid: None,
                            acked: false,
                            sent_at: Instant::now(),
                            received_at_ms: record.received_at_ms,
                            forwarded: true,
                        });
                    }
                }
            }
            // Advance the cursor over the acknowledged prefix.
            let mut advanced = 0u64;
            while sent.front().is_some_and(|s| s.acked) {
                if let Some(done) = sent.pop_front() {
                    *cursor = done.seq;
                    if done.forwarded {
                        forwarded_unpersisted.push_back(done.seq);
                    }
                    advanced += 1;
                }
            }
            if advanced > 0 {
                let status_cursor = *cursor;
                self.set_status(|s| {
                    s.cursor = status_cursor;
                    s.inflight = sent.len();
                });
            }
            // Persist at once while fewer than two writes are outstanding (the window waits for
            // them), else in runs.
            if *cursor > persisted
                && (unconfirmed.len() < 2
                    || *cursor - persisted >= CURSOR_PERSIST_EVERY
                    || last_persist.elapsed() >= CURSOR_PERSIST_INTERVAL)
            {
                if let Some(ticket) = self.persist_cursor(*cursor, false) {
                    unconfirmed.push_back((ticket, *cursor));
                }
                persisted = *cursor;
                last_persist = Instant::now();
            } else if let Some(min) = self.cursors.delete_due() {
                // Idle, but a delete was held back to make a longer run: do it now, or a
                // log kept full by `reject_new` would never make room.
                if let Err(e) = self.store.submit(vec![Op::DeleteLogThrough(min)]) {
                    warn!(bridge = %self.config.name, error = %e, "cannot delete forwarded log entries");
                }
            }
            if let Some(oldest) = sent.front() {
                if !oldest.acked && oldest.pkid.is_some() && oldest.sent_at.elapsed() > ack_timeout
                {
                    return Err(format!(
                        "upstream stalled: no acknowledgement for {}s",
                        ack_timeout.as_secs()
                    ));
                }
            }
            // Entries that were not for this bridge were passed over without sending: read on
            // at once rather than after the next wake-up (a few rounds, then poll the link).
            if advanced > 0
                && sent.len() < max_inflight
                && skip_rounds < 8
                && awaiting_pkid.is_empty()
            {
                skip_rounds += 1;
                continue;
            }
            skip_rounds = 0;

            let wake = tokio::select! {
                event = eventloop.poll() => Wake::Event(event),
                changed = durable.changed() => Wake::Log(changed.is_ok()),
                _ = tick.tick() => Wake::Tick,
                _ = shutdown.wait_for(|s| *s) => Wake::Shutdown,
            };
            match wake {
                Wake::Tick => {}
                Wake::Log(true) => {}
                Wake::Log(false) => return Err("store closed".into()),
                Wake::Shutdown => {
                    if *cursor > persisted {
                        self.persist_cursor(*cursor, true);
                    }
                    let _ = client.try_disconnect();
                    return Ok(());
                }
                Wake::Event(event) => match event.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        connected = true;
                        backoff.reset();
                        info!(bridge = %self.config.name, address = %self.config.address, "upstream connected");
                        self.set_status(|s| {
                            s.connected = true;
                            s.last_error = None;
                        });
                        for rule in &self.config.subscribe {
                            let qos = if rule.qos == 0 {
                                rumqttc::QoS::AtMostOnce
                            } else {
                                rumqttc::QoS::AtLeastOnce
                            };
                            client
                                .try_subscribe(rule.remote.clone(), qos)
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        if let Some(seq) = awaiting_pkid.pop_front() {
                            if let Some(entry) = sent.iter_mut().find(|s| s.seq == seq) {
                                entry.sent_at = Instant::now();
                                if pkid == 0 {
                                    entry.acked = true; // QoS 0: done once written
                                } else {
                                    entry.pkid = Some(pkid);
                                    by_pkid.insert(pkid, seq);
                                }
                            }
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        if let Some(seq) = by_pkid.remove(&ack.pkid) {
                            if let Some(entry) = sent.iter_mut().find(|s| s.seq == seq) {
                                entry.acked = true;
                                crate::stats::FORWARD_LATENCY_MS
                                    .observe(unix_ms().saturating_sub(entry.received_at_ms));
                            }
                            self.set_status(|s| s.forwarded += 1);
                        }
                    }
                    Event::Incoming(Packet::Publish(publish)) => {
                        self.deliver_locally(&client, publish).await?;
                    }
                    Event::Incoming(Packet::SubAck(suback)) => {
                        if suback
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        {
                            warn!(bridge = %self.config.name, "upstream refused a subscription");
                        }
                    }
                    _ => {}
                },
            }
        }
    }

    /// Submits the cursor (and the deletion of entries every bridge is done with); returns
    /// the ticket that becomes durable with it.
    fn persist_cursor(&self, cursor: Seq, force_delete: bool) -> Option<crate::store::Ticket> {
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
                warn!(bridge = %self.config.name, error = %e, "cannot persist bridge cursor");
                None
            }
        }
    }

    /// A command from the cloud: publish it locally, and acknowledge it upstream once the
    /// router has accepted it (durably, where it had to be written).
    async fn deliver_locally(
        &self,
        client: &AsyncClient,
        publish: rumqttc::Publish,
    ) -> Result<(), String> {
        let Some(rule) = self
            .config
            .subscribe
            .iter()
            .find(|r| filter_matches(&r.remote, &publish.topic))
        else {
            let _ = client.try_ack(&publish);
            return Ok(());
        };
        let topic = format!("{}{}", rule.local_prefix, publish.topic);
        self.set_status(|s| s.received += 1);
        let qos = match publish.qos {
            rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
            rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
            rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
        };
        let message = Message::new(topic, publish.payload.clone(), qos, publish.retain);
        let (accepted_tx, accepted_rx) = oneshot::channel();
        self.router
            .send(RouterCmd::Inject {
                message,
                origin_bridge: Some(self.index),
                accepted: Some(accepted_tx),
            })
            .await
            .map_err(|_| "broker stopping".to_string())?;
        let client = client.clone();
        tokio::spawn(async move {
            if accepted_rx.await.is_ok() {
                let _ = client.ack(&publish).await;
            }
        });
        Ok(())
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Capped exponential back-off with +-25% jitter.
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    fn new(config: &ReconnectConfig) -> Backoff {
        let initial = Duration::from_millis(config.initial_ms);
        Backoff {
            initial,
            max: Duration::from_millis(config.max_ms),
            current: initial,
            rng: unix_ms() | 1,
        }
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }

    fn next(&mut self) -> Duration {
        // xorshift: jitter needs no more than this.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let quarter = base.as_millis() as u64 / 4;
        let jitter = if quarter == 0 {
            0
        } else {
            self.rng % (2 * quarter + 1)
        };
        Duration::from_millis(base.as_millis() as u64 - quarter + jitter)
    }
}

/// Token bucket for `max_rate`: refills continuously, holds at most a tenth of a second.
struct RateLimiter {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second: f64::from(per_second),
            tokens: 1.0,
            last: Instant::now(),
        }
    }

    fn available(&mut self, want: usize) -> usize {
        let now = Instant::now();
        let capacity = (self.per_second / 10.0).max(1.0);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(capacity);
        self.last = now;
        want.min(self.tokens.floor() as usize)
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut b = Backoff::new(&ReconnectConfig {
            initial_ms: 100,
            max_ms: 1000,
        });
        let waits: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert!((75..=125).contains(&waits[0]), "{waits:?}");
        assert!((150..=250).contains(&waits[1]), "{waits:?}");
        assert!(
            waits[5..].iter().all(|w| (750..=1250).contains(w)),
            "{waits:?}"
        );
        b.reset();
        assert!(b.next() <= Duration::from_millis(125));
    }

    #[test]
    fn rate_limiter_caps_burst() {
        let mut r = RateLimiter::new(100);
        let first = r.available(1000);
        assert!(first <= 10, "{first}");
    }

    #[test]
    fn cursors_delete_behind_the_slowest_in_long_runs() {
        let c = Cursors::new(vec![0, 0]);
        assert_eq!(
            c.advance(0, 5000, false),
            None,
            "the other bridge is still at 0"
        );
        assert_eq!(
            c.advance(1, 3, false),
            None,
            "too short a run to delete yet"
        );
        assert_eq!(c.advance(1, 4, true), Some(4), "forced (shutdown)");
        assert_eq!(
            c.advance(1, 4 + DELETE_EVERY, false),
            Some(4 + DELETE_EVERY)
        );
        assert_eq!(c.min(), 4 + DELETE_EVERY);
        // A short run held back is deleted once the interval has passed, even if idle.
        assert_eq!(c.advance(1, 10 + DELETE_EVERY, false), None);
        assert_eq!(c.delete_due(), None);
        std::thread::sleep(DELETE_INTERVAL);
        assert_eq!(c.delete_due(), Some(10 + DELETE_EVERY));
        assert_eq!(c.delete_due(), None);
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            split_host_port("localhost:1883"),
            Some(("localhost".into(), 1883))
        );
        assert_eq!(split_host_port("[::1]:1883"), Some(("::1".into(), 1883)));
        assert_eq!(split_host_port("nohost"), None);
        assert_eq!(split_host_port("h:0"), None);
    }
}
