//! Waystation's edge broker: an MQTT 3.1.1 server for the devices on a site that keeps what
//! it acknowledges on disk and forwards it upstream.
//!
//! # The map: one PUBLISH from a device's socket to the cloud's PUBACK
//!
//! 1. `net::server` accepts the TCP connection (within `max_connections` and the per-address
//!    rate of `policy::ratelimit`), runs the TLS handshake with `tls`'s config, and hands
//!    the stream to `net::connection`.
//! 2. `net::connection` admits the CONNECT (`handshake`: client id, `policy::auth`,
//!    `policy::acl`, the will), then its reader decodes each packet with `protocol::v4` into
//!    the neutral types of `protocol::message` and sends the PUBLISH to the router as a
//!    `router::RouterCmd`; its writer task writes whatever the router puts in the
//!    connection's `outbox::Outbox`.
//! 3. `router` is the one task that owns sessions, subscriptions and retained messages.
//!    `router::publish` admits the message (once, per message), adds what must be kept to the
//!    burst's batch — a log append when a `[[bridge]]` forward rule (`config::bridge`) matches,
//!    an entry in each persistent session's queue (`persist` lays them out), the retained
//!    record — and delivers it to the online subscribers found in the `topic` trie.
//! 4. At the end of the burst the router submits the batch to `store` as one ticket;
//!    `store`'s writer thread commits and fsyncs it (group commit). The PUBACK waits as a
//!    `router::acks` target until the store reports the ticket durable, then goes out in
//!    arrival order. Only then has the device been told its message is kept.
//! 5. `bridge` (one task per `[[bridge]]`) reads the log from its durable cursor, sends each
//!    entry upstream over its own `bridge::link`, keeps what is in flight in
//!    `bridge::window`, and on the upstream's PUBACK moves and persists its cursor; the log is
//!    deleted behind the slowest bridge. Commands from the cloud come back through
//!    `bridge::inbound` as router commands.
//!
//! Beside the path: `config` (every config type, deserialized once), `shutdown` (the one
//! stop signal), `stats` (counters and histograms) and `status` (snapshots for the daemon's
//! HTTP endpoints and `$SYS`), `time`. Arrows point down only (`scripts/layout.py` checks):
//! `protocol` and `store` know nothing of the router, the router nothing of `net`, and the
//! bridge talks to the router only through `RouterCmd`.

pub mod bridge;
pub mod config;
/// Entry points for cargo-fuzz (fuzz/) and their regression tests; not part of the API.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod keep_alive;
pub mod net;
mod outbox;
mod persist;
pub mod pipeline;
pub mod policy;
pub mod protocol;
mod router;
mod session;
pub mod shutdown;
mod small_map;
mod stats;
pub mod status;
pub mod store;
pub mod time;
pub mod tls;
pub mod topic;

pub use bridge::BridgeStatus;
pub use config::{
    BridgeConfig, BrokerConfig, DeadLetterLimits, Limits, OnFull, PipelineRule, StorageLimits,
    DEFAULT_MAX_PACKET_SIZE, DEFAULT_MAX_PENDING_BYTES, MAX_PACKET_SIZE_LIMIT,
};
pub use net::server::{Broker, BrokerError, BrokerStopping, InternalPublisher, StatusHandle};
pub use persist::MAX_SESSION_RECORD_BYTES;
pub use policy::auth::Security;
pub use router::{DeadLetterError, DeadLetterHandle, DeadLetterSummary};
pub use shutdown::Shutdown;
pub use stats::{Stats, StoreFault, StoreFaults};
pub use tls::{ListenerConfig, TlsConfig};

// The paths the gateway, the bench and the fuzz targets have always used.
pub use policy::{acl, auth};
pub use protocol::message;
