//! What the broker shows of itself: a snapshot the router refreshes a few times a second,
//! read by the observability endpoints without touching the router's hot path.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::bridge::BridgeStatus;
use crate::store::{Durability, LogStats, Recovery};

/// Payload bytes kept per client's last publish (for the dashboard).
pub const LAST_PAYLOAD_PREVIEW: usize = 256;

#[derive(Debug, Clone)]
pub struct LastPublish {
    pub topic: String,
    /// The first `LAST_PAYLOAD_PREVIEW` bytes.
    pub payload: Bytes,
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub client_id: String,
    pub peer: Option<SocketAddr>,
    pub username: Option<String>,
    pub connected_at_ms: u64,
    pub clean_session: bool,
    pub messages_in: u64,
    pub last_publish: Option<LastPublish>,
}

#[derive(Debug, Clone, Default)]
pub struct RouterSnapshot {
    /// Connected clients, by client id.
    pub clients: Vec<ClientInfo>,
    pub sessions: usize,
    pub offline_sessions: usize,
    /// QoS 1/2 messages waiting in sessions (queued or in flight).
    pub queued_messages: usize,
    pub subscriptions: usize,
    pub retained: usize,
    /// Acknowledgements waiting for the disk.
    pub pending_acks: usize,
    pub storage_error: Option<String>,
    /// `on_full = "reject_new"` is holding publishers back.
    pub storage_full: bool,
    pub taken_at_ms: u64,
}

/// Everything at once, for `/api/v1/status` and metrics.
#[derive(Debug, Clone)]
pub struct BrokerStatus {
    pub started_at_ms: u64,
    pub router: RouterSnapshot,
    pub bridges: Vec<BridgeStatus>,
    pub log: Option<LogStats>,
    pub durability: Option<Durability>,
    pub recovery: Option<Recovery>,
    /// Bytes submitted to the store and not yet durable (`max_pending_bytes`).
    pub pending_bytes: Option<u64>,
    /// The latest storage fault survived: (Unix ms, kind, detail). See `stats::StoreFault`.
    pub last_store_fault: Option<(u64, crate::stats::StoreFault, String)>,
}
