//! Waystation's edge broker: an MQTT 3.1.1 server for the devices on a site.
//!
//! How the parts fit:
//! - `server`: listeners, the accept loop, `max_connections`, ordered shutdown.
//! - `connection`: one task pair per client: CONNECT handshake, keep-alive, reading and
//!   writing packets; it never touches shared state.
//! - `v4`: the MQTT 3.1.1 adapter over rumqttc's codec (a v5 adapter would sit beside it).
//! - `router`: the single owner of sessions, subscriptions and retained messages; every
//!   accepted PUBLISH goes through its `accept_publish`.
//! - `session`: one client's state: subscriptions, in-flight window, queue, QoS 2 ids.
//! - `auth`, `acl`: who may connect (password files) and which topics each client may
//!   publish to and read (ACL files); `docs/security.md` has the threat model.
//! - `topic`: topic/filter rules and the subscription trie. `message`: the neutral types.
//! - `store`: the durable log and keyspaces on sled, with group commit (the durability
//!   contract is documented there). `persist`: how sessions and retained messages are laid
//!   out in it. `bridge`: forwarding the log upstream and commands back.

pub mod acl;
pub mod auth;
pub mod bridge;
pub mod config;
mod connection;
/// Entry points for cargo-fuzz (fuzz/) and their regression tests; not part of the API.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
mod persist;
mod ratelimit;
mod router;
mod server;
mod session;
pub mod shutdown;
mod stats;
pub mod status;
pub mod store;
pub mod time;
pub mod tls;
pub mod topic;
mod v4;

pub use auth::Security;
pub use bridge::BridgeStatus;
pub use config::{
    BridgeConfig, BrokerConfig, Limits, OnFull, StorageLimits, DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_MAX_PENDING_BYTES, MAX_PACKET_SIZE_LIMIT,
};
pub use persist::MAX_SESSION_RECORD_BYTES;
pub use server::{Broker, BrokerError, BrokerStopping, InternalPublisher, StatusHandle};
pub use shutdown::Shutdown;
pub use stats::{Stats, StoreFault, StoreFaults};
pub use tls::{ListenerConfig, TlsConfig};
