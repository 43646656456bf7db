//! Counters the broker keeps about itself, readable from any thread (for logs now, and for
//! the metrics endpoint and `$SYS` topics later).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::message::QoS;
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
    /// Messages whose MQTT 5 message expiry interval passed before delivery or forwarding.
    pub dropped_message_expiry: AtomicU64,
    /// Messages not sent to an MQTT 5 client (or upstream) because the packet would exceed
    /// the peer's maximum packet size; delivery goes on as if it had been sent.
    pub dropped_too_large: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub refused_connections: AtomicU64,
    /// CONNECTs refused for bad or missing credentials (CONNACK 4 or 5).
    pub auth_failures: AtomicU64,
    /// PUBLISHes (and wills) dropped because the ACL gives no write access.
    pub acl_denied_publish: AtomicU64,
    /// SUBSCRIBE filters refused (0x80) by the ACL.
    pub acl_denied_subscribe: AtomicU64,
    /// Messages not delivered to a subscriber (live or retained) for lack of read access.
    pub acl_denied_deliveries: AtomicU64,
    /// Connections closed for exceeding `max_publish_rate`.
    pub publish_rate_exceeded: AtomicU64,
    /// Topics and filters refused for `max_topic_length`/`max_topic_levels`, and filters
    /// refused for `max_subscriptions`.
    pub limit_refusals: AtomicU64,
    /// Connections closed at accept by `max_connection_rate` (per source address).
    pub connection_rate_refused: AtomicU64,
    /// Connections closed for sending no (whole) CONNECT within `connect_timeout`.
    pub connect_timeouts: AtomicU64,
    /// TCP connections closed before sending a single byte (port probes, load balancers'
    /// health checks): not protocol errors.
    pub closed_before_connect: AtomicU64,
    /// Connections closed because nothing came within 1.5x the client's keep-alive.
    pub keep_alive_timeouts: AtomicU64,
    /// SUBSCRIBE filters refused (0x80) because the session record would outgrow
    /// `persist::MAX_SESSION_RECORD_BYTES`.
    pub session_record_full: AtomicU64,
    /// Times reading from publishers was paused because more than `max_pending_bytes` were
    /// waiting to be written to disk.
    pub ingest_pauses: AtomicU64,
    /// 1 while publishers are not read from (pending bytes, store full or failing).
    pub ingest_paused: AtomicU64,
    /// Times a publisher was not read from while a live subscriber it feeds with QoS 0
    /// caught up (back-pressure).
    pub publisher_waits: AtomicU64,
    /// Times a live subscriber stayed behind past the grace and was marked slow (its QoS 0
    /// messages dropped until it catches up).
    pub slow_subscribers: AtomicU64,
    /// Ingest pipeline (`crate::pipeline`): messages that passed to the log, resends not
    /// logged again, and refusals by `InvalidReason` (its `as usize`).
    pub pipeline_valid: AtomicU64,
    pub pipeline_duplicates: AtomicU64,
    pub pipeline_invalid: [AtomicU64; 7],
    /// Dead letters stored now, and their bytes.
    pub dead_letters: AtomicU64,
    pub dead_letter_bytes: AtomicU64,
    /// Dead letters deleted to stay within `[dead_letter]`'s bounds, since start.
    pub dead_letters_evicted: AtomicU64,
    /// Dead letters sent through the pipeline again (`waystation dlq replay`).
    pub dead_letters_replayed: AtomicU64,
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
            Dropped::Expired => &self.dropped_message_expiry,
            Dropped::TooLarge => &self.dropped_too_large,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// A fixed-bucket histogram of integer observations, readable from any thread (for
/// `/metrics`). Bucket `i` counts observations `<= bounds[i]` and `> bounds[i-1]`; the last
/// one (index `bounds.len()`) everything above.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    counts: [AtomicU64; HISTOGRAM_MAX_BUCKETS],
    sum: AtomicU64,
}

const HISTOGRAM_MAX_BUCKETS: usize = 24;

/// What [`Histogram::snapshot`] returns: per-bucket (not cumulative) counts.
#[derive(Debug, Clone)]
pub struct HistogramSnapshot {
    pub bounds: &'static [u64],
    /// `bounds.len() + 1` entries, the last for observations above every bound.
    pub counts: Vec<u64>,
    pub sum: u64,
}

impl Histogram {
    pub const fn new(bounds: &'static [u64]) -> Histogram {
        assert!(bounds.len() < HISTOGRAM_MAX_BUCKETS);
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; HISTOGRAM_MAX_BUCKETS],
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts[..=self.bounds.len()]
                .iter()
                .map(|c| c.load(Relaxed))
                .collect(),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// Operations per group commit (`store::writer`). Process-wide: one broker per process.
pub static COMMIT_BATCH_OPS: Histogram =
    Histogram::new(&[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]);
/// Microseconds to make one group commit durable (sled flush + fsyncs), `store::writer`.
pub static COMMIT_SYNC_US: Histogram = Histogram::new(&[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
]);
/// Milliseconds from the broker receiving a message to the upstream acknowledging it
/// (`bridge`, QoS 1 forwards), backlog time included.
pub static FORWARD_LATENCY_MS: Histogram = Histogram::new(&[
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
    900_000, 3_600_000,
]);

/// Storage faults that the daemon survives but an operator must hear about: each is logged
/// at ERROR where it happens, counted here (`waystation_store_faults_total{kind}`), and the
/// latest is reported as degraded on `/healthz` for a while ([`StoreFaults::last`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// Reading the log failed during a retention scan (`max_bytes` drop_oldest, `max_age`):
    /// the scan stopped early and is retried at the next housekeeping tick.
    ReadError,
    /// A log record that does not decode was found by the `max_age` scan or a bridge: it is
    /// dropped or passed over (it could never be forwarded) and counted.
    CorruptRecord,
    /// A message that cannot be encoded as a record: its publisher's connection is closed
    /// (nothing acknowledged), as for a packet over `max_packet_size`.
    RecordRefused,
    /// A bridge could not submit its cursor: it is submitted again at its next turn.
    CursorNotSaved,
    /// The store refused a whole burst (it was shutting down): its acks were withheld and
    /// the connections waiting for them closed, so their clients resend.
    BurstRefused,
}

impl StoreFault {
    pub const ALL: [StoreFault; 5] = [
        StoreFault::ReadError,
        StoreFault::CorruptRecord,
        StoreFault::RecordRefused,
        StoreFault::CursorNotSaved,
        StoreFault::BurstRefused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StoreFault::ReadError => "read_error",
            StoreFault::CorruptRecord => "corrupt_record",
            StoreFault::RecordRefused => "record_refused",
            StoreFault::CursorNotSaved => "cursor_not_saved",
            StoreFault::BurstRefused => "burst_refused",
        }
    }
}

/// See [`StoreFault`]. Process-wide: one broker per process.
#[derive(Debug)]
pub struct StoreFaults {
    counts: [AtomicU64; StoreFault::ALL.len()],
    last: std::sync::Mutex<Option<(u64, StoreFault, String)>>,
}

impl StoreFaults {
    const fn new() -> StoreFaults {
        StoreFaults {
            counts: [const { AtomicU64::new(0) }; StoreFault::ALL.len()],
            last: std::sync::Mutex::new(None),
        }
    }

    /// Counts `fault` and remembers it (with `detail`) as the latest. The caller logs it.
    pub fn record(&self, fault: StoreFault, detail: impl Into<String>) {
        self.counts[fault as usize].fetch_add(1, Relaxed);
        let now = crate::time::unix_ms();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, fault, detail.into()));
    }

    pub fn count(&self, fault: StoreFault) -> u64 {
        self.counts[fault as usize].load(Relaxed)
    }

    /// The latest fault: (Unix ms, kind, detail).
    pub fn last(&self) -> Option<(u64, StoreFault, String)> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub static STORE_FAULTS: StoreFaults = StoreFaults::new();

impl Stats {
    /// [`STORE_FAULTS`].
    pub fn store_faults(&self) -> &'static StoreFaults {
        &STORE_FAULTS
    }

    /// [`COMMIT_BATCH_OPS`] (reachable from outside the crate through `Stats`).
    pub fn commit_batch_ops(&self) -> HistogramSnapshot {
        COMMIT_BATCH_OPS.snapshot()
    }

    /// [`COMMIT_SYNC_US`].
    pub fn commit_sync_us(&self) -> HistogramSnapshot {
        COMMIT_SYNC_US.snapshot()
    }

    /// [`FORWARD_LATENCY_MS`].
    pub fn forward_latency_ms(&self) -> HistogramSnapshot {
        FORWARD_LATENCY_MS.snapshot()
    }
}

/// Bytes on the wire, both ways, for one bridge across its connections.
#[derive(Debug, Default)]
pub struct WireCounters {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// Batch PUBLISHes of one bridge (forward rules with `batch`): events packed, their topic
/// and payload bytes in, the PUBLISH payload bytes out after encoding and compression.
#[derive(Debug, Default)]
pub struct BatchCounters {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub input_bytes: AtomicU64,
    pub output_bytes: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        static H: Histogram = Histogram::new(&[1, 10]);
        for v in [0, 1, 2, 10, 11, 1000] {
            H.observe(v);
        }
        let s = H.snapshot();
        assert_eq!(s.counts, vec![2, 2, 2]);
        assert_eq!(s.sum, 1024);
    }
}
