//! `[[bridge]]` of the config file: where the upstream is, how to log in, how hard to push,
//! and which topics go up and come down. Deserialized here (serde) and checked by
//! [`BridgeConfig::validate`], whose errors name the key at fault.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use crate::topic::{filter_matches, valid_filter};

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
fn default_connect_timeout() -> u64 {
    10
}
fn default_protocol() -> u8 {
    4
}

/// `session_expiry` when unset: a persistent session never expires upstream (what
/// `clean_session = false` means in MQTT 3.1.1); with `clean_session = true` it ends with
/// the connection.
pub const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

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
    /// Seconds between keep-alive pings when the link is quiet. A connection that stays
    /// silent past its PINGREQ is taken for dead (within 1.5 x keep_alive of the last packet
    /// heard; within keep_alive while messages wait for acknowledgement) and reconnected.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: u64,
    /// `false` (the default): the upstream keeps the bridge's session while the link is
    /// down, so commands published for the site meanwhile (QoS 1) wait there and arrive when
    /// it returns. `true` starts afresh at each connection, as Mosquitto's `cleansession true`.
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT version spoken upstream: 4 (3.1.1, the default) or 5.
    #[serde(default = "default_protocol")]
    pub protocol: u8,
    /// MQTT 5 only: seconds the upstream keeps the bridge's session after the link drops
    /// (`4294967295` = never). Unset: never with `clean_session = false`, 0 with `true`.
    #[serde(default)]
    pub session_expiry: Option<u32>,
    /// Seconds each step of a connection attempt may take (name lookup, TCP connect, TLS
    /// handshake, CONNECT to CONNACK) before the attempt is abandoned and retried.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
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

/// `[[bridge.forward]]`: local messages matching `local` go upstream as `remote_prefix + topic`,
/// one PUBLISH each, or packed into batch PUBLISHes on `batch_topic` when `batch` is set
/// (docs/pipeline.md, "Batch and compress"; `bridge/batch.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRule {
    pub local: String,
    #[serde(default)]
    pub remote_prefix: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// `batch = { max_events, max_ms, max_bytes }`: batch what this rule forwards.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
    /// The upstream topic of the batch PUBLISHes (required with `batch`; used as is).
    #[serde(default)]
    pub batch_topic: Option<String>,
    /// How a batch's events are written (only with `batch`; default `json-array`).
    #[serde(default)]
    pub encoding: Option<BatchEncoding>,
    /// `zstd` or `gzip` over the encoded batch (only with `batch`; default none).
    #[serde(default)]
    pub compress: Option<Compression>,
}

/// `batch` of a `[[bridge.forward]]` rule: a batch goes up when it holds `max_events`
/// events or `max_bytes` of their topics and payloads, or `max_ms` after its first event
/// was read, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_events: usize,
    pub max_ms: u64,
    pub max_bytes: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 100,
            max_ms: 1000,
            max_bytes: 256 * 1024,
        }
    }
}

/// `encoding` of a batching rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchEncoding {
    /// `[e1,e2,...]`, content type `application/json`.
    #[default]
    JsonArray,
    /// One event per line, each followed by `\n`: `application/x-ndjson`.
    Ndjson,
}

/// `compress` of a batching rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
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
        if !(4..=5).contains(&self.protocol) {
            return Err((
                key("protocol"),
                format!(
                    "{} is not an MQTT version offered: 4 (3.1.1) or 5",
                    self.protocol
                ),
            ));
        }
        if self.session_expiry.is_some() && self.protocol != 5 {
            return Err((
                key("session_expiry"),
                "needs protocol = 5 (MQTT 3.1.1 has clean_session only)".into(),
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
        if !(2..=65_535).contains(&self.keep_alive) {
            return Err((key("keep_alive"), "must be 2 to 65535 seconds".into()));
        }
        if !(1..=3_600).contains(&self.connect_timeout) {
            return Err((key("connect_timeout"), "must be 1 to 3600 seconds".into()));
        }
        if self.ack_timeout == 0 {
            return Err((key("ack_timeout"), "must be at least 1 second".into()));
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
            return Err((key("username"), "a password needs a username".into()));
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
            rule.validate_batch(self.max_inflight)
                .map_err(|(k, why)| (key(&format!("forward.{k}")), why))?;
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
    pub fn tls_config(&self) -> Result<Option<Arc<tokio_rustls::rustls::ClientConfig>>, String> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let client_auth = tls.cert.as_deref().zip(tls.key.as_deref());
        crate::tls::client_config(tls.ca_file.as_deref(), client_auth)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The session expiry interval sent in an MQTT 5 CONNECT (see `session_expiry`).
    pub fn session_expiry_secs(&self) -> u32 {
        self.session_expiry.unwrap_or(if self.clean_session {
            0
        } else {
            SESSION_NEVER_EXPIRES
        })
    }

    /// The forward rule for a local topic (the first that matches), if any.
    pub fn forward_rule(&self, topic: &str) -> Option<&ForwardRule> {
        self.forward_rule_at(topic).map(|(_, rule)| rule)
    }

    /// [`BridgeConfig::forward_rule`] with its index in `forward`.
    pub fn forward_rule_at(&self, topic: &str) -> Option<(usize, &ForwardRule)> {
        self.forward
            .iter()
            .enumerate()
            .find(|(_, r)| filter_matches(&r.local, topic))
    }
}

impl ForwardRule {
    /// A rule forwarding each message on its own (no batch).
    pub fn new(local: impl Into<String>, remote_prefix: impl Into<String>, qos: u8) -> Self {
        ForwardRule {
            local: local.into(),
            remote_prefix: remote_prefix.into(),
            qos,
            batch: None,
            batch_topic: None,
            encoding: None,
            compress: None,
        }
    }

    /// The batch keys: together or not at all, within bounds. Errors name the key under
    /// `forward.`.
    fn validate_batch(&self, max_inflight: u16) -> Result<(), (&'static str, String)> {
        let Some(batch) = &self.batch else {
            let stray = [
                ("batch_topic", self.batch_topic.is_some()),
                ("encoding", self.encoding.is_some()),
                ("compress", self.compress.is_some()),
            ];
            return match stray.into_iter().find(|(_, set)| *set) {
                Some((k, _)) => Err((k, "only with batch (set batch = { ... })".into())),
                None => Ok(()),
            };
        };
        match self.batch_topic.as_deref() {
            None => return Err(("batch_topic", "required with batch".into())),
            Some(t) if t.is_empty() || t.contains(['+', '#']) || t.starts_with('$') => {
                return Err((
                    "batch_topic",
                    format!("{t:?} is not a topic name to publish to"),
                ))
            }
            Some(_) => {}
        }
        if batch.max_events == 0 || batch.max_events > usize::from(max_inflight) {
            return Err((
                "batch.max_events",
                format!(
                    "must be 1 to max_inflight ({max_inflight}): the window counts events, so a \
                     batch cannot outgrow it"
                ),
            ));
        }
        if batch.max_ms == 0 || batch.max_ms > 3_600_000 {
            return Err(("batch.max_ms", "must be 1 to 3600000 ms".into()));
        }
        if batch.max_bytes == 0 || batch.max_bytes > MAX_BATCH_BYTES {
            return Err((
                "batch.max_bytes",
                format!("must be 1 to {MAX_BATCH_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

/// Most bytes of topics and payloads one batch may gather (`batch.max_bytes`).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

pub(crate) fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[(&'static str, &'static str)]) -> BridgeConfig {
        use serde::de::value::{Error, MapDeserializer};
        let mut config = BridgeConfig::deserialize(MapDeserializer::<_, Error>::new(
            [("name", "cloud"), ("address", "127.0.0.1:1883")].into_iter(),
        ))
        .expect("config");
        for (k, v) in extra {
            match *k {
                "protocol" => config.protocol = v.parse().expect("u8"),
                "session_expiry" => config.session_expiry = Some(v.parse().expect("u32")),
                "clean_session" => config.clean_session = v.parse().expect("bool"),
                _ => unreachable!(),
            }
        }
        config
    }

    #[test]
    fn protocol_is_4_or_5_and_session_expiry_needs_5() {
        let c = parse(&[]);
        assert_eq!(c.protocol, 4, "3.1.1 stays the default");
        assert!(c.validate().is_ok());
        assert!(parse(&[("protocol", "5")]).validate().is_ok());
        let (key, why) = parse(&[("protocol", "3")]).validate().expect_err("3");
        assert_eq!(key, "bridge[cloud].protocol");
        assert!(why.contains("4 (3.1.1) or 5"), "{why}");
        let (key, _) = parse(&[("session_expiry", "60")])
            .validate()
            .expect_err("session_expiry on 3.1.1");
        assert_eq!(key, "bridge[cloud].session_expiry");
        assert!(parse(&[("protocol", "5"), ("session_expiry", "60")])
            .validate()
            .is_ok());
    }

    #[test]
    fn session_expiry_defaults_follow_clean_session() {
        assert_eq!(
            parse(&[("protocol", "5")]).session_expiry_secs(),
            SESSION_NEVER_EXPIRES
        );
        assert_eq!(
            parse(&[("protocol", "5"), ("clean_session", "true")]).session_expiry_secs(),
            0
        );
        assert_eq!(
            parse(&[("protocol", "5"), ("session_expiry", "3600")]).session_expiry_secs(),
            3600
        );
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
