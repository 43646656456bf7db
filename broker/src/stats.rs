//! Counters the broker keeps about itself, readable from any thread (for logs now, and for
//! the metrics endpoint and `$SYS` topics later).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::message::QoS;
use crate::session::Dropped;

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub messages_received: [AtomicU64; 3],
    pub bytes_received: AtomicU64,
    pub messages_sent: [AtomicU64; 3],
    pub dropped_queue_full: AtomicU64,
    pub dropped_qos0_offline: AtomicU64,
    pub dropped_qos0_slow: AtomicU64,
    /// Log entries dropped by `on_full = "drop_oldest"`.
    pub dropped_storage_full: AtomicU64,
    /// Log entries dropped for being older than `max_age`.
    pub dropped_expired: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub refused_connections: AtomicU64,
}

impl Stats {
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    pub fn message_received(&self, qos: QoS, bytes: usize) {
        self.messages_received[qos as usize].fetch_add(1, Relaxed);
        self.bytes_received.fetch_add(bytes as u64, Relaxed);
    }

    pub fn message_sent(&self, qos: QoS) {
        self.messages_sent[qos as usize].fetch_add(1, Relaxed);
    }

    pub fn message_dropped(&self, reason: Dropped) {
        let counter = match reason {
            Dropped::QueueFull => &self.dropped_queue_full,
            Dropped::Qos0Offline => &self.dropped_qos0_offline,
            Dropped::Qos0SlowClient => &self.dropped_qos0_slow,
        };
        counter.fetch_add(1, Relaxed);
    }
}
