//! The vocabulary of the store: seqs and tickets, limits, configuration, what the store
//! reports ([`Recovery`], [`Durability`], [`LogStats`]), the operations callers submit and
//! [`StoreError`].
//!
//! Everything here is plain data with no dependency on the rest of `store`, so every other file
//! of the folder (the engine, the writer, recovery, the chunk and part formats) can name these
//! types without importing from `store/mod.rs`, which re-exports them as the public API.

use std::path::PathBuf;

use bytes::Bytes;

/// Log position: strictly increasing, never reused. The first seq of a new store is 1.
pub type Seq = u64;
/// A key (without its keyspace prefix) and its value, as returned by
/// [`Store::scan`](super::Store::scan).
pub type KeyValue = (Vec<u8>, Vec<u8>);
/// Group-commit ticket: strictly increasing per [`Store::submit`](super::Store::submit). The
/// first ticket is 1.
pub type Ticket = u64;

/// Largest value (log record or keyspace value) accepted by
/// [`Store::submit`](super::Store::submit): a 16 MiB MQTT packet (the protocol's largest is
/// 256 MiB, but no client of an edge broker needs that) and the stored message's header and
/// topic. Values above [`MAX_INLINE_VALUE_BYTES`](super::MAX_INLINE_VALUE_BYTES) are stored as
/// parts (see `parts.rs`).
pub const MAX_VALUE_BYTES: usize = 17 * 1024 * 1024;
/// The byte budget of [`Store::read_log`](super::Store::read_log) (see
/// [`Store::read_log_budget`](super::Store::read_log_budget)).
pub const READ_LOG_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Largest key accepted in a keyspace.
pub const MAX_KEY_BYTES: usize = 4 * 1024;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled directory. Moved aside to `<dir>.corrupt-<timestamp>` if corrupt.
    pub dir: PathBuf,
    /// sled page cache. sled's own default is 1 GiB; ours is 16 MiB.
    pub cache_capacity_bytes: u64,
    /// Most operations in one group commit (a single submission larger than this is still
    /// committed whole).
    pub max_batch_ops: usize,
    /// Most bytes of keys and values in one group commit, likewise. Bounds the writer's memory
    /// when large values arrive together: sled holds a commit's values several times over
    /// until it is applied (measured, 1 MiB records: peak RSS ~60 MiB with 1 MiB commits, ~100
    /// with 4 MiB, ~130 with 8-16 MiB, for 119, 138 and ~150 MiB/s).
    pub max_batch_bytes: usize,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            cache_capacity_bytes: 16 * 1024 * 1024,
            max_batch_ops: 1024,
            max_batch_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What [`Store::open`](super::Store::open) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Set when the store was corrupt and moved here; the store opened empty.
    pub moved_aside: Option<PathBuf>,
    pub log_len: u64,
    pub log_bytes: u64,
    pub first_seq: Option<Seq>,
    pub last_seq: Option<Seq>,
}

/// Progress of the group commit, published on [`Store::durability`](super::Store::durability).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durability {
    /// Every submission with a ticket `<=` this is durable.
    pub durable_through: Ticket,
    /// Set while the last commit attempt failed (e.g. disk full); cleared by the next success.
    pub error: Option<String>,
    /// Set for good when the writer thread died (it panicked, or stopped with operations it
    /// could not make durable other than at shutdown): nothing will be acknowledged again
    /// until the process restarts. A daemon should exit non-zero when it sees this.
    pub fatal: Option<String>,
    /// Successful group commits since open.
    pub commits: u64,
    /// Operations in the last successful group commit.
    pub last_batch_ops: usize,
}

/// Log counters for durable state (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    pub len: u64,
    /// Sum of record lengths (logical bytes), never a file size.
    pub bytes: u64,
    pub first_seq: Option<Seq>,
    pub last_seq: Option<Seq>,
    /// `received_at_ms` of the oldest entry, if it is a
    /// [`StoredMessage`](super::record::StoredMessage).
    pub oldest_received_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keyspace {
    Meta,
    Retained,
    Sessions,
    SessionQueue,
    /// Messages the ingest pipeline refused, by id (`crate::pipeline::dead_letter`).
    DeadLetter,
    /// Each device's recent event numbers, for deduplication (`crate::pipeline::dedup`).
    Dedup,
}

impl Keyspace {
    pub(super) fn prefix(self) -> u8 {
        match self {
            Keyspace::Meta => b'm',
            Keyspace::Retained => b'r',
            Keyspace::Sessions => b's',
            Keyspace::SessionQueue => b'q',
            Keyspace::DeadLetter => b'd',
            Keyspace::Dedup => b'e',
        }
    }
    pub(super) fn key(self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + key.len());
        k.push(self.prefix());
        k.extend_from_slice(key);
        k
    }
    pub(super) const ALL: [Keyspace; 6] = [
        Keyspace::Meta,
        Keyspace::Retained,
        Keyspace::Sessions,
        Keyspace::SessionQueue,
        Keyspace::DeadLetter,
        Keyspace::Dedup,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Append a record to the log; its seq is returned by `submit`.
    Append(Bytes),
    /// Delete one log entry (no-op if absent).
    DeleteLog(Seq),
    /// Delete every log entry with seq `<=` this (including ones appended earlier in the same
    /// group commit).
    DeleteLogThrough(Seq),
    Put {
        space: Keyspace,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Remove {
        space: Keyspace,
        key: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(#[from] sled::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("value of {len} bytes is larger than the store accepts ({max} bytes)")]
    ValueTooLarge { len: usize, max: usize },
    #[error("key of {len} bytes is larger than the store accepts ({max} bytes)")]
    KeyTooLarge { len: usize, max: usize },
    #[error("store is shut down")]
    Closed,
    #[error("store is unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("timed out waiting for ticket {0} to become durable")]
    Timeout(Ticket),
    #[error("{0} submitted operations were never made durable: {1}")]
    NotDurable(usize, String),
}

pub(super) fn check_value(len: usize) -> Result<(), StoreError> {
    if len > MAX_VALUE_BYTES {
        return Err(StoreError::ValueTooLarge {
            len,
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

pub(super) fn check_key(len: usize) -> Result<(), StoreError> {
    if len > MAX_KEY_BYTES {
        return Err(StoreError::KeyTooLarge {
            len,
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}
