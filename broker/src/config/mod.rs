//! Every broker config type: what the daemon's TOML file becomes once read. The gateway reads
//! the file, resolves paths and secrets, and reports errors with key and line; the broker only
//! receives these values. Nothing here depends on the rest of the broker but the types of the
//! settings themselves (listeners' TLS, security, topic rules).

pub mod bridge;
pub mod pipeline;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::policy::auth::Security;
use crate::tls::ListenerConfig;

pub use bridge::{BridgeConfig, BridgeTls, ForwardRule, ReconnectConfig, Secret, SubscribeRule};
pub use pipeline::{DeadLetterLimits, DedupKey, PipelineRule, Schema, Validation};

/// Bounds that protect the broker from any one client: `[limits]` in the daemon's config,
/// each field a key of the same name (unset keys keep their defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest packet accepted (remaining length, bytes); a larger one closes that connection.
    pub max_packet_size: usize,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// QoS 1/2 messages sent to one client and not yet acknowledged.
    pub max_inflight: u16,
    /// QoS 1/2 PUBLISHes an MQTT 5 client may send before their PUBACK/PUBCOMP (its
    /// Receive Maximum, told in CONNACK); one more closes the connection with 0x93. 65535:
    /// not announced. 3.1.1 has no such limit (its publishers are held back by not reading).
    pub receive_maximum: u16,
    /// QoS 1/2 messages waiting for one client (offline, or window full).
    pub max_queued_messages: usize,
    /// Time a new connection has to send CONNECT (seconds in the config file).
    #[serde(deserialize_with = "seconds")]
    pub connect_timeout: Duration,
    /// PUBLISH packets per second one connection may send (token bucket holding one
    /// second's worth); a connection that exceeds it is closed. 0: no limit.
    pub max_publish_rate: u32,
    /// Topic filters one client may hold; more are refused in SUBACK (0x80). 0: no limit.
    pub max_subscriptions: usize,
    /// Bytes of a topic name or filter (PUBLISH, will, SUBSCRIBE).
    pub max_topic_length: usize,
    /// Levels (`/`-separated parts) of a topic name or filter.
    pub max_topic_levels: usize,
    /// Bytes (topic + payload) of the QoS 1/2 messages waiting in one client's queue, and of
    /// the QoS 0 messages not yet written to a connected client (outbox.rs).
    pub max_queued_bytes: usize,
    /// New connections per second from one source address (token bucket at accept);
    /// 0: no limit.
    pub max_connection_rate: u32,
    /// Connections one source address may open at once above the rate (bucket size).
    pub max_connection_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            max_connections: 10_000,
            max_inflight: 100,
            receive_maximum: 1024,
            max_queued_messages: 1000,
            connect_timeout: Duration::from_secs(10),
            max_publish_rate: 0,
            max_subscriptions: 1000,
            max_topic_length: 1024,
            max_topic_levels: 32,
            max_queued_bytes: 16 << 20,
            max_connection_rate: 20,
            max_connection_burst: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Used in bridge client ids (`<gateway_id>-<bridge name>`).
    pub gateway_id: String,
    /// Where to listen, each with its TLS settings (`SocketAddr::into()` for plain TCP).
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    /// Where the durable store lives. `None`: nothing is written to disk (tests, and a
    /// broker with no bridges that needs no persistence).
    pub data_dir: Option<PathBuf>,
    pub storage: StorageLimits,
    pub bridges: Vec<BridgeConfig>,
    /// `[[pipeline]]`: checks and deduplication before the log (`crate::pipeline`).
    pub pipeline: Vec<PipelineRule>,
    pub dead_letter: DeadLetterLimits,
    /// Authentication and ACL. The default lets anyone in and anywhere: the daemon builds
    /// the real policy from its config.
    pub security: Security,
}

/// What to do when the log holds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Drop the oldest unforwarded messages (counted and logged) to make room.
    DropOldest,
    /// Stop reading from publishers until bridges make room: nothing acknowledged is lost.
    RejectNew,
}

/// Default `max_packet_size`: 1 MiB, room for camera stills and log bundles; devices that
/// send less lose nothing by it (buffers grow only as packets need).
pub const DEFAULT_MAX_PACKET_SIZE: usize = 1 << 20;
/// Largest `max_packet_size` that may be configured: a 16 MiB payload with its topic and
/// header. Every record such a packet makes fits the store ([`crate::store::MAX_VALUE_BYTES`]).
pub const MAX_PACKET_SIZE_LIMIT: usize = (16 << 20) + (64 << 10);

/// Default [`StorageLimits::max_pending_bytes`]: several group commits' worth of small
/// messages (~25 k sensor readings, a commit takes at most 1,024) and room for a few large
/// ones. Measured with a QoS 0 flood (8 publishers, upstream frozen): the daemon's peak RSS
/// was 62 MiB at 8 MiB, 41 MiB at 1 MiB.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 4 << 20;

/// `[storage]`: bounds of the durable log (unset keys keep their defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageLimits {
    /// Logical bytes of log records (counted by the store itself, never the file size).
    pub max_bytes: u64,
    /// Unforwarded messages older than this are dropped; `None` keeps them forever (seconds
    /// in the config file, 0 for forever).
    #[serde(deserialize_with = "seconds_or_forever")]
    pub max_age: Option<Duration>,
    pub on_full: OnFull,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Bytes submitted to the store and not yet durable above which publishers are no longer
    /// read from (their sockets back-pressure them) until the disk catches up to half of it.
    /// Bounds the daemon's memory under a QoS 0 flood, which no ack ever slows down.
    pub max_pending_bytes: u64,
}

impl Default for StorageLimits {
    fn default() -> Self {
        StorageLimits {
            max_bytes: 1 << 30,
            max_age: None,
            on_full: OnFull::RejectNew,
            cache_bytes: 16 << 20,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
        }
    }
}

/// A duration given in whole seconds, as every duration in the config file is.
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

/// Whole seconds where 0 means "no limit".
fn seconds_or_forever<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    u64::deserialize(d).map(|secs| (secs > 0).then(|| Duration::from_secs(secs)))
}
