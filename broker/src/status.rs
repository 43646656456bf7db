//! What the broker shows of itself: a snapshot the router refreshes a few times a second,
//! read by the observability endpoints without touching the router's hot path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::stats::WireCounters;
use crate::store::{Durability, LogStats, Recovery, Seq};

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
    /// The session's own key (no copy per client, nor per snapshot).
    pub client_id: Arc<str>,
    pub peer: Option<SocketAddr>,
    pub username: Option<String>,
    pub connected_at_ms: u64,
    pub clean_session: bool,
    /// 4 (MQTT 3.1.1) or 5 (MQTT 5).
    pub protocol_version: u8,
    /// Seconds the session outlives the connection (`u32::MAX`: never expires).
    pub session_expiry: u32,
    pub messages_in: u64,
    /// Boxed: most clients of a gateway with many idle ones never publish.
    pub last_publish: Option<Box<LastPublish>>,
}

#[derive(Debug, Clone, Default)]
pub struct RouterSnapshot {
    /// Connected clients, by client id.
    pub clients: Vec<Arc<ClientInfo>>,
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
    /// Connections lost and attempts failed, in all...
    pub reconnects: u64,
    /// ...and by reason (`LinkError::reason`: "ping_timeout", "connect_refused", ...).
    pub failures: BTreeMap<&'static str, u64>,
    /// Connection attempts started.
    pub connect_attempts: u64,
    /// Unix ms since when the link has been down (None while connected).
    pub down_since_ms: Option<u64>,
    /// Unix ms of the current connection's CONNACK.
    pub connected_since_ms: Option<u64>,
    /// QoS 1 PUBLISHes sent upstream and not yet acknowledged.
    pub inflight: usize,
    /// Bytes on the wire both ways, over every connection (shared with the link's tasks).
    pub wire: Arc<WireCounters>,
    /// Batch PUBLISHes sent (`[[bridge.forward]]` with `batch`).
    pub batches: Arc<crate::stats::BatchCounters>,
}
