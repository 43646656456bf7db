//! # The durable store: Waystation's log and metadata on disk
//!
//! Everything that must outlive the process goes through this module: the ordered message
//! log (what bridges forward upstream and what offline sessions are owed), retained messages,
//! persistent sessions and small metadata (bridge cursors). It is the only code that knows the
//! storage engine (sled 0.34.7), so another engine can be measured beside it later by
//! re-implementing this API against the same contract.
//!
//! ## Model
//!
//! - The **log** maps a [`Seq`] to an opaque record (normally a [`record::StoredMessage`]).
//!   Seqs are assigned by [`Store::submit`] in submission order, strictly increasing, and a
//!   seq that was ever durable is never reused, not even after the tail was deleted and the
//!   store reopened: the next seq is kept as a high-water mark written in the same atomic
//!   batch as the appends it covers, and at open the counter restarts at
//!   `max(last live seq + 1, high-water mark)`. Seqs handed out to a batch that was lost in a
//!   crash (never durable, never acknowledged) are handed out again after it. (sled's
//!   `generate_id` is not used: it jumps by millions across reopens and can repeat an id after
//!   an abrupt exit.) Seqs may have gaps (deleted entries).
//! - Four **keyspaces** ([`Keyspace`]) hold key/value pairs for the router.
//! - Log entries are packed into **chunks** of up to 2 KiB under one sled key (`L` + 8-byte
//!   big-endian seq of the chunk's first entry; see [`chunk`] for the format and invariants).
//!   sled's memory grows with its number of keys (per-page metadata for every leaf of at most
//!   16 keys, loaded or not), so one key per message made the daemon's memory follow the
//!   backlog; with chunks it stays flat. Chunking is invisible above this module: every
//!   operation still names single seqs. The writer appends to the last chunk while it has
//!   room (so a trickle of lone messages packs as well as a burst), rewriting it whole in the
//!   same atomic batch; deleting into a chunk rewrites its remainder under its new first seq.
//! - **Memory**: the log on disk may be much larger than memory. Two sled 0.34 behaviours
//!   would otherwise make memory follow the backlog: per-page metadata (hence chunks, above)
//!   and a page cache that only evicts once one of its 256 shard queues has seen 64 accesses,
//!   which a sequential reader never causes (hence [`touch_for_eviction`] on every chunk read).
//!   Measured with `scripts/bench.sh --only 6`: VmRSS flat at ~30 MiB from 250 k to 2 M waiting.
//! - All of it lives in **one sled tree**, each key prefixed by one byte naming its keyspace
//!   (`L` for the log). This is deliberate: sled recovers an
//!   `apply_batch` atomically *per tree*, so with a single tree one group commit is one atomic
//!   batch. A bridge can move its cursor and delete the log entries behind it, or the router can
//!   append a message and queue it for a session, in one `submit`, and a crash leaves either all
//!   or none of it.
//!
//! ## Group commit
//!
//! [`Store::submit`] only validates, assigns a [`Ticket`] and seqs, and queues the operations
//! on a channel; it never waits for the disk. One writer thread blocks for the first queued
//! submission, then drains whatever else is already queued (up to `max_batch_ops` operations)
//! without waiting on any timer: a lone message is committed at once, and under load the
//! submissions that arrive while one sync runs form the next batch. For each batch it builds one
//! `sled::Batch`, applies it, calls `Db::flush()`, `sync_data()` on any new blob files, then
//! `sync_data()` on `<dir>/db`, and only then publishes the batch's highest ticket as
//! [`Durability::durable_through`]. Within a batch operations take effect in submission order
//! (a later op on the same key wins).
//!
//! ## Durability contract
//!
//! - **Durable** means: sled's `flush()` returned *and* `fdatasync` on `<dir>/db` returned.
//!   `flush()` alone uses `sync_file_range`, which flushes neither the device cache nor file
//!   metadata (sled #1452, #1351), so it is not power-loss safe. sled writes values too large
//!   for a log segment (and page rewrites of nodes holding several large values) to separate
//!   blob files that it never syncs; the writer syncs every blob file it has not synced yet, and
//!   the `blobs/` directory, before the ack. Records are capped at [`MAX_VALUE_BYTES`].
//!   `flush_async` is never called (it deadlocks when called concurrently: sled #1308, #1241).
//! - **An ack**: a ticket `t` with `durable_through >= t` was on disk in the sense above.
//!   Every operation of every submission with a ticket `<= durable_through` survives a crash
//!   (SIGKILL or power loss on a device that honours flushes).
//! - **Never lost**: anything acknowledged. A failed commit (I/O error, disk full) never drops
//!   the batch and never advances `durable_through`: the writer sets [`Durability::error`],
//!   backs off (100 ms doubling to 1 s), reopens the engine (sled makes any write error sticky
//!   until reopened) and applies the same batch again. When it succeeds the error is cleared.
//! - **May be lost**: submissions not yet acknowledged when the process dies. Their effects are
//!   all-or-nothing per batch. Their seqs may be handed out again after the restart
//!   (harmless: no consumer's durable cursor can be past a seq that was never durable).
//! - **May be duplicated / re-applied**: a batch that failed (e.g. flush error) may already be
//!   on disk when it is retried; every operation is therefore idempotent (put of a fixed value,
//!   remove, append at a seq fixed at submit time), so applying it twice equals applying it
//!   once. At a higher level, a consumer that deletes log entries after forwarding them may
//!   forward an entry again after a crash (at least once).
//! - **Crash mid-batch**: sled recovers a tree to a prefix of its batches, each batch whole.
//!   Since everything is in one tree, there is no cross-keyspace tearing. (Were the keyspaces
//!   separate trees, a crash could keep one tree's half of a group commit and lose the other's;
//!   callers would then have to write the log entry before the metadata that points to it.)
//! - **Reads** ([`Store::read_log`], [`Store::get`], [`Store::scan`]) see what the writer has
//!   applied, which can include the batch being synced right now, i.e. not yet durable. A
//!   bridge may forward such an entry upstream before it is durable; if the process then dies,
//!   the entry was never acked to its publisher, so this is at worst a duplicate, never a loss.
//! - **Chunk rewrites**: appending to the last chunk or deleting part of a chunk replaces a
//!   value that already held acknowledged entries. That is safe because the new value is
//!   written in the same atomic batch as everything else in the commit and sled recovers a
//!   batch whole or not at all: after a crash the chunk is either its old value (the commit
//!   was never acknowledged) or its new one.
//! - **Counters** ([`Store::log_stats`]): `len` and `bytes` count log entries and the sum of
//!   their record lengths, maintained by the writer for durable batches and rebuilt by a full
//!   scan at open. They never use file sizes (sled's files are 2-2.5x the live data and do not
//!   shrink while open).
//! - **Corruption at open**: if sled fails to open with a corruption error (or panics), the
//!   scan at open finds an entry this module did not write, or the db file holds data but the
//!   marker key written at creation is missing (sled opens a garbage file as an *empty*
//!   database, silently), the directory is moved aside to
//!   `<dir>.corrupt-<UTC timestamp>`, an error is logged, an empty store is opened, and
//!   [`Recovery::moved_aside`] says where the old data went. Plain I/O errors at open (a lock
//!   held by another process, permissions, disk full) are returned as errors instead: moving a
//!   healthy store aside would lose it.
//!   Limits: sled treats damage in the *tail* of its log like a torn write at a crash and
//!   recovers the prefix before it without an error; such a loss cannot be told apart from a
//!   crash and is not detected here. A crash between creating the db file and syncing the
//!   marker (the first milliseconds of a new store) makes the next open move the (empty) store
//!   aside: a spurious alert, no data lost.
//! - **Shutdown** ([`Store::shutdown`], or dropping the last handle) commits what was queued,
//!   drops the engine and returns only once sled's `flock` on `<dir>/db` is released, so the
//!   directory can be reopened at once (a restart, the crash tests). Dropping a `sled::Db` is
//!   not enough: jobs on sled's I/O thread pool hold the locked file a little longer.
//! - **Backpressure**: the submit queue is unbounded; callers bound it by waiting for acks
//!   (publishers' in-flight windows). While the disk is full, nothing is acked.

mod chunk;
pub mod record;
mod writer;

use std::collections::HashSet;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Log position: strictly increasing, never reused. The first seq of a new store is 1.
pub type Seq = u64;
/// A key (without its keyspace prefix) and its value, as returned by [`Store::scan`].
pub type KeyValue = (Vec<u8>, Vec<u8>);
/// Group-commit ticket: strictly increasing per [`Store::submit`]. The first ticket is 1.
pub type Ticket = u64;

/// Largest value (log record or keyspace value) accepted by [`Store::submit`]. sled moves
/// larger log messages to blob files; keeping records well below a segment's inline limit
/// (128 KiB with the default 512 KiB segments) keeps single values inline.
pub const MAX_VALUE_BYTES: usize = 120 * 1024;
/// Largest key accepted in a keyspace.
pub const MAX_KEY_BYTES: usize = 4 * 1024;

const TREE_NAME: &[u8] = b"waystation.v1";
const PREFIX_LOG: u8 = b'L';
const PREFIX_INTERNAL: u8 = b'_';
const KEY_NEXT_SEQ: &[u8] = b"_next_seq";
/// First seq written in chunks ([`chunk`]); log keys below it are single raw records written
/// before chunks existed. Set once, when a store is created or first opened by this version.
const KEY_CHUNKED_FROM: &[u8] = b"_chunked_from";
/// Written (and synced) when a store is created. sled opens a database file full of garbage as
/// an empty database without any error, so "the db file had data but the marker is gone" is
/// how such corruption is detected.
const KEY_MARKER: &[u8] = b"_waystation_store";
const MARKER_VALUE: &[u8] = b"1";

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled directory. Moved aside to `<dir>.corrupt-<timestamp>` if corrupt.
    pub dir: PathBuf,
    /// sled page cache. sled's own default is 1 GiB; ours is 16 MiB.
    pub cache_capacity_bytes: u64,
    /// Most operations in one group commit (a single submission larger than this is still
    /// committed whole).
    pub max_batch_ops: usize,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            cache_capacity_bytes: 16 * 1024 * 1024,
            max_batch_ops: 1024,
        }
    }
}

/// What [`Store::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Set when the store was corrupt and moved here; the store opened empty.
    pub moved_aside: Option<PathBuf>,
    pub log_len: u64,
    pub log_bytes: u64,
    pub first_seq: Option<Seq>,
    pub last_seq: Option<Seq>,
}

/// Progress of the group commit, published on [`Store::durability`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durability {
    /// Every submission with a ticket `<=` this is durable.
    pub durable_through: Ticket,
    /// Set while the last commit attempt failed (e.g. disk full); cleared by the next success.
    pub error: Option<String>,
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
    /// `received_at_ms` of the oldest entry, if it is a [`record::StoredMessage`].
    pub oldest_received_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keyspace {
    Meta,
    Retained,
    Sessions,
    SessionQueue,
}

impl Keyspace {
    fn prefix(self) -> u8 {
        match self {
            Keyspace::Meta => b'm',
            Keyspace::Retained => b'r',
            Keyspace::Sessions => b's',
            Keyspace::SessionQueue => b'q',
        }
    }
    fn key(self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + key.len());
        k.push(self.prefix());
        k.extend_from_slice(key);
        k
    }
    const ALL: [Keyspace; 4] = [
        Keyspace::Meta,
        Keyspace::Retained,
        Keyspace::Sessions,
        Keyspace::SessionQueue,
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

/// An operation as the writer sees it: seqs resolved.
#[derive(Debug)]
pub(crate) enum WriteOp {
    Append(Seq, Bytes),
    DeleteLog(Seq),
    DeleteLogThrough(Seq),
    Put(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
}

pub(crate) struct Submission {
    ticket: Ticket,
    ops: Vec<WriteOp>,
}

/// The open sled database and the file we fsync.
pub(crate) struct Engine {
    db: sled::Db,
    tree: sled::Tree,
    db_file: File,
}

#[derive(Default)]
pub(crate) struct Counters {
    len: u64,
    bytes: u64,
    first_seq: Option<Seq>,
    last_seq: Option<Seq>,
}

pub(crate) struct Shared {
    cfg: StoreConfig,
    /// See [`KEY_CHUNKED_FROM`].
    chunked_from: Seq,
    /// `None` only while the writer reopens sled after a failed commit.
    engine: RwLock<Option<Arc<Engine>>>,
    counters: Mutex<Counters>,
    durable: Mutex<(Ticket, Option<String>)>,
    durable_cv: Condvar,
    watch_tx: watch::Sender<Durability>,
    closing: AtomicBool,
    /// Set once `close` has taken the engine out for good: reads then fail with `Closed`.
    released: AtomicBool,
    /// Set by the writer if it exits with operations it could not commit.
    writer_failure: Mutex<Option<String>>,
    /// Test hook: the next N commit attempts fail as if the disk were full.
    #[cfg(test)]
    fail_commits: std::sync::atomic::AtomicU32,
}

struct SubmitState {
    next_seq: Seq,
    next_ticket: Ticket,
    tx: Option<mpsc::Sender<Submission>>,
}

struct Inner {
    shared: Arc<Shared>,
    submit: Mutex<SubmitState>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Handle to the store: cheap to clone, `Send + Sync`. The writer thread stops when
/// [`Store::shutdown`] is called or the last handle is dropped, after committing what was queued.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens or creates the store at `cfg.dir`. A corrupt store is moved aside (see the module
    /// docs) and reported in [`Recovery::moved_aside`].
    pub fn open(cfg: StoreConfig) -> Result<(Store, Recovery), StoreError> {
        let started = Instant::now();
        if let Some(parent) = cfg.dir.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|source| StoreError::Io {
                    what: "creating",
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
        }
        let mut moved_aside = None;
        let (engine, scan) = match open_and_scan(&cfg) {
            Ok(v) => v,
            Err(OpenFailure::Fatal(e)) => return Err(e),
            Err(OpenFailure::Corrupt(reason)) => {
                let aside = move_aside(&cfg.dir)?;
                error!(dir = %cfg.dir.display(), moved_to = %aside.display(), %reason,
                    "store is corrupt: moved it aside and starting with an empty store");
                moved_aside = Some(aside);
                match open_and_scan(&cfg) {
                    Ok(v) => v,
                    Err(OpenFailure::Fatal(e)) => return Err(e),
                    Err(OpenFailure::Corrupt(r)) => {
                        return Err(StoreError::Corrupt(format!(
                            "fresh store is corrupt too: {r}"
                        )))
                    }
                }
            }
        };
        let recovery = Recovery {
            moved_aside,
            log_len: scan.counters.len,
            log_bytes: scan.counters.bytes,
            first_seq: scan.counters.first_seq,
            last_seq: scan.counters.last_seq,
        };
        info!(dir = %cfg.dir.display(), entries = recovery.log_len, bytes = recovery.log_bytes,
            first_seq = ?recovery.first_seq, last_seq = ?recovery.last_seq, next_seq = scan.next_seq,
            elapsed_ms = started.elapsed().as_millis() as u64, "store opened");

        let (watch_tx, _) = watch::channel(Durability::default());
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            chunked_from: scan.chunked_from,
            engine: RwLock::new(Some(Arc::new(engine))),
            counters: Mutex::new(scan.counters),
            durable: Mutex::new((0, None)),
            durable_cv: Condvar::new(),
            watch_tx,
            closing: AtomicBool::new(false),
            released: AtomicBool::new(false),
            writer_failure: Mutex::new(None),
            #[cfg(test)]
            fail_commits: std::sync::atomic::AtomicU32::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run(writer_shared, rx))
            .map_err(|source| StoreError::Io {
                what: "spawning the writer thread for",
                path: cfg.dir.clone(),
                source,
            })?;
        let inner = Inner {
            shared,
            submit: Mutex::new(SubmitState {
                next_seq: scan.next_seq,
                next_ticket: 1,
                tx: Some(tx),
            }),
            writer: Mutex::new(Some(handle)),
        };
        Ok((
            Store {
                inner: Arc::new(inner),
            },
            recovery,
        ))
    }

    /// Queues operations for the next group commit and returns at once. Log appends get their
    /// seqs here, in submission order (one per [`Op::Append`], in order). Rejects the whole
    /// submission if a value or key is too large.
    pub fn submit(&self, ops: Vec<Op>) -> Result<(Ticket, Vec<Seq>), StoreError> {
        for op in &ops {
            match op {
                Op::Append(v) => check_value(v.len())?,
                Op::Put { key, value, .. } => {
                    check_key(key.len())?;
                    check_value(value.len())?;
                }
                Op::Remove { key, .. } => check_key(key.len())?,
                Op::DeleteLog(_) | Op::DeleteLogThrough(_) => {}
            }
        }
        let mut st = lock(&self.inner.submit);
        let tx = st.tx.as_ref().ok_or(StoreError::Closed)?.clone();
        let ticket = st.next_ticket;
        let mut seq = st.next_seq;
        let mut seqs = Vec::new();
        let write_ops = ops
            .into_iter()
            .map(|op| match op {
                Op::Append(v) => {
                    seqs.push(seq);
                    seq += 1;
                    WriteOp::Append(seq - 1, v)
                }
                Op::DeleteLog(s) => WriteOp::DeleteLog(s),
                Op::DeleteLogThrough(s) => WriteOp::DeleteLogThrough(s),
                Op::Put { space, key, value } => WriteOp::Put(space.key(&key), value),
                Op::Remove { space, key } => WriteOp::Remove(space.key(&key)),
            })
            .collect();
        // Sent under the lock so that channel order == ticket order == seq order.
        tx.send(Submission {
            ticket,
            ops: write_ops,
        })
        .map_err(|_| StoreError::Closed)?;
        st.next_ticket += 1;
        st.next_seq = seq;
        Ok((ticket, seqs))
    }

    /// Progress of the group commit.
    pub fn durability(&self) -> watch::Receiver<Durability> {
        self.inner.shared.watch_tx.subscribe()
    }

    /// Blocks until `ticket` is durable (for callers outside an async runtime).
    pub fn wait_durable(&self, ticket: Ticket, timeout: Duration) -> Result<(), StoreError> {
        let shared = &self.inner.shared;
        let deadline = Instant::now() + timeout;
        let mut d = lock(&shared.durable);
        while d.0 < ticket {
            if let Some(f) = lock(&shared.writer_failure).as_ref() {
                return Err(StoreError::Unavailable(f.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Timeout(ticket));
            }
            d = shared
                .durable_cv
                .wait_timeout(d, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        Ok(())
    }

    /// Log entries with seq `>= from`, ascending, at most `max`.
    pub fn read_log(&self, from: Seq, max: usize) -> Result<Vec<(Seq, Bytes)>, StoreError> {
        let shared = &self.inner.shared;
        let engine = shared.engine()?;
        let mut out = Vec::with_capacity(max.min(1024));
        if max == 0 {
            return Ok(out);
        }
        // The chunk holding `from` starts at or before it.
        let start = match engine.tree.range(log_key(0)..=log_key(from)).next_back() {
            Some(item) => {
                let (k, _) = item?;
                parse_log_key(&k)
                    .ok_or_else(|| StoreError::Corrupt(format!("bad log key {:?}", &k[..])))?
            }
            None => from,
        };
        // sled's iterator is not a snapshot: a commit that re-keys a chunk (a deletion into
        // it) while we iterate can show us its remainder twice, under the old key and the new.
        let mut next = from;
        for item in engine.tree.range(log_key(start)..=log_key(Seq::MAX)) {
            let (k, v) = item?;
            touch_for_eviction(&engine.tree, &k);
            let (_, entries) = decode_log_item(&k, v, shared.chunked_from)?;
            for (seq, v) in entries {
                if seq >= next {
                    next = seq.saturating_add(1);
                    out.push((seq, v));
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    pub fn get(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.inner.shared.engine()?;
        Ok(engine.tree.get(space.key(key))?.map(|v| v.to_vec()))
    }

    /// Every key/value pair in `space` whose key starts with `prefix`, in key order. Keys are
    /// returned without the internal keyspace prefix.
    pub fn scan(&self, space: Keyspace, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let engine = self.inner.shared.engine()?;
        let mut out = Vec::new();
        for item in engine.tree.scan_prefix(space.key(prefix)) {
            let (k, v) = item?;
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Log counters for the durable state.
    pub fn log_stats(&self) -> LogStats {
        let c = lock(&self.inner.shared.counters);
        let mut stats = LogStats {
            len: c.len,
            bytes: c.bytes,
            first_seq: c.first_seq,
            last_seq: c.last_seq,
            oldest_received_at_ms: None,
        };
        drop(c);
        if let (Some(first), Ok(engine)) = (stats.first_seq, self.inner.shared.engine()) {
            if let Ok(Some(v)) = engine.tree.get(log_key(first)) {
                let first_entry =
                    decode_log_item(&log_key(first), v, self.inner.shared.chunked_from)
                        .ok()
                        .and_then(|(_, entries)| entries.into_iter().next());
                if let Some((_, record)) = first_entry {
                    stats.oldest_received_at_ms = record::peek_received_at_ms(&record);
                }
            }
        }
        stats
    }

    /// Commits everything queued, stops the writer thread, closes the storage engine and waits
    /// until sled has released its lock on the directory: when this returns (`Ok` or not), the
    /// directory can be opened again at once, by this process or another. Later `submit`s and
    /// reads on any clone fail with [`StoreError::Closed`]. Returns an error if some queued
    /// operations could not be made durable (e.g. the disk stayed full; those were never
    /// acknowledged) or if the lock was not released within [`RELEASE_TIMEOUT`].
    /// Dropping the last handle does the same.
    pub fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.close()
    }
}

impl Inner {
    fn close(&self) -> Result<(), StoreError> {
        // Dropping the only sender ends the writer's loop once it has drained the channel.
        lock(&self.submit).tx = None;
        self.shared.closing.store(true, Ordering::SeqCst);
        let handle = lock(&self.writer).take();
        let mut result = Ok(());
        if let Some(h) = handle {
            if h.join().is_err() {
                result = Err(StoreError::Unavailable(
                    "the store writer thread panicked".into(),
                ));
            }
        }
        if result.is_ok() {
            if let Some(f) = lock(&self.shared.writer_failure).clone() {
                result = Err(StoreError::Unavailable(f));
            }
        }
        // Whatever happened above, let go of the directory.
        let released = self.release_engine();
        result.and(released)
    }

    /// Drops the engine and returns once sled no longer holds `<dir>/db` locked. Dropping a
    /// `sled::Db` does not release the lock by itself: sled's I/O thread pool runs log writes
    /// and segment truncations that hold their own reference to the locked file, and a job
    /// can still be running (or be preempted) after the last handle is dropped, so an open
    /// right after the drop could fail with "could not acquire lock". Only the first call
    /// does anything.
    fn release_engine(&self) -> Result<(), StoreError> {
        if self.shared.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        let engine = write_lock(&self.shared.engine).take();
        if let Some(engine) = engine {
            // Readers (read_log, scan, ...) hold a clone only for the duration of one call.
            if let Err(still_shared) = wait_unique(engine, deadline) {
                drop(still_shared);
                return Err(StoreError::Unavailable(
                    "readers still held the storage engine at shutdown; its lock is released when they finish".into(),
                ));
            }
        }
        wait_until_unlocked(&self.shared.cfg.dir.join("db"), deadline)
    }
}

/// How long [`Store::shutdown`] (and a reopen after a failed commit) waits for sled to let go
/// of the directory lock. Normally well under a millisecond; a truncation job syncing on a
/// busy disk can take longer.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for `engine` to be the last reference, then drops it (sled flushes and syncs on drop).
/// Returns the engine back if other references remain at `deadline`.
pub(crate) fn wait_unique(mut engine: Arc<Engine>, deadline: Instant) -> Result<(), Arc<Engine>> {
    loop {
        match Arc::try_unwrap(engine) {
            Ok(e) => {
                drop(e);
                return Ok(());
            }
            Err(still_shared) if Instant::now() < deadline => {
                engine = still_shared;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(still_shared) => return Err(still_shared),
        }
    }
}

/// Returns once nobody holds the `flock` that sled takes on `db_path` (sled 0.34 locks the
/// file with `flock(LOCK_EX | LOCK_NB)` through fs2 and keeps it until the last reference to
/// the file, including ones held by its I/O thread pool, is gone). The probe opens the file
/// anew: flock locks belong to the open file description, so this conflicts with a lock held
/// in this process too.
pub(crate) fn wait_until_unlocked(db_path: &Path, deadline: Instant) -> Result<(), StoreError> {
    let file = match File::open(db_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                what: "opening",
                path: db_path.to_path_buf(),
                source,
            })
        }
    };
    let started = Instant::now();
    loop {
        match flock::try_lock_exclusive(&file) {
            Ok(true) => {
                flock::unlock(&file);
                let waited = started.elapsed();
                if waited > Duration::from_millis(100) {
                    warn!(path = %db_path.display(), waited_ms = waited.as_millis() as u64,
                        "sled released the store's lock only after a while");
                }
                return Ok(());
            }
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Ok(false) => {
                return Err(StoreError::Unavailable(format!(
                    "sled still held the lock on {} {} ms after the store was closed",
                    db_path.display(),
                    started.elapsed().as_millis()
                )))
            }
            Err(source) => {
                return Err(StoreError::Io {
                    what: "probing the lock on",
                    path: db_path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// `flock(2)`, which std offers only from Rust 1.89 (`File::try_lock`) while the workspace
/// supports 1.88.
#[cfg(unix)]
mod flock {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::raw::c_int;

    // Same values on Linux (every architecture) and the BSDs/macOS.
    const LOCK_EX: c_int = 2;
    const LOCK_NB: c_int = 4;
    const LOCK_UN: c_int = 8;

    extern "C" {
        fn flock(fd: c_int, operation: c_int) -> c_int;
    }

    /// `Ok(false)` if someone else holds a conflicting lock.
    pub(super) fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
        loop {
            // SAFETY: `flock` only reads its integer arguments; the fd is open for the
            // lifetime of `file`.
            if unsafe { flock(file.as_raw_fd(), LOCK_EX | LOCK_NB) } == 0 {
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(false),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    pub(super) fn unlock(file: &File) {
        // SAFETY: as above. Closing `file` would release the lock anyway.
        unsafe {
            flock(file.as_raw_fd(), LOCK_UN);
        }
    }
}

/// Elsewhere the probe is skipped (best effort: the lock is not waited for).
#[cfg(not(unix))]
mod flock {
    pub(super) fn try_lock_exclusive(_: &std::fs::File) -> std::io::Result<bool> {
        Ok(true)
    }
    pub(super) fn unlock(_: &std::fs::File) {}
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            error!(error = %e, "store closed with errors");
        }
    }
}

impl Shared {
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        read_lock(&self.engine).clone().ok_or_else(|| {
            if self.released.load(Ordering::SeqCst) {
                StoreError::Closed
            } else {
                StoreError::Unavailable(
                    "the storage engine is being reopened after a write error".into(),
                )
            }
        })
    }
}

fn check_value(len: usize) -> Result<(), StoreError> {
    if len > MAX_VALUE_BYTES {
        return Err(StoreError::ValueTooLarge {
            len,
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

fn check_key(len: usize) -> Result<(), StoreError> {
    if len > MAX_KEY_BYTES {
        return Err(StoreError::KeyTooLarge {
            len,
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

pub(crate) fn log_key(seq: Seq) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PREFIX_LOG;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn parse_log_key(k: &[u8]) -> Option<Seq> {
    if k.len() != 9 || k[0] != PREFIX_LOG {
        return None;
    }
    Some(u64::from_be_bytes(k[1..].try_into().ok()?))
}

/// See [`touch_for_eviction`].
const EVICTION_TOUCHES: usize = 5;

/// Makes sled account for a log chunk just read, so its cache stays near `cache_capacity`
/// while a reader walks a long log (start-up scan, a bridge draining while another bridge's
/// upstream is away, so nothing behind the reader is deleted).
///
/// sled 0.34's page cache records each page access in one of 256 shard queues and only
/// evicts once a shard's queue holds 64 accesses. A sequential reader touches each leaf page
/// only a few times, so no queue ever fills and every page read stays in memory: measured
/// 199 MiB after a restart with 2 M messages waiting (the scan) and 272 MiB after one bridge
/// drained them (a 16 MiB cache). A few cheap point reads of a chunk that is already in
/// memory fill the queue of the page just read, and the cache evicts as designed (34 and
/// 57 MiB in the same runs; `scripts/bench.sh --only 6`).
pub(crate) fn touch_for_eviction(tree: &sled::Tree, key: &[u8]) {
    for _ in 0..EVICTION_TOUCHES {
        // The value is not needed: only the access is.
        let _ = tree.get(key);
    }
}

/// Decodes one log key/value pair from sled into its chunk key and entries.
pub(crate) fn decode_log_item(
    k: &[u8],
    v: sled::IVec,
    chunked_from: Seq,
) -> Result<(Seq, chunk::Entries), StoreError> {
    let key =
        parse_log_key(k).ok_or_else(|| StoreError::Corrupt(format!("bad log key {:?}", k)))?;
    // One copy per chunk; the entries share it.
    let entries = chunk::decode(key, Bytes::copy_from_slice(&v), key < chunked_from)
        .map_err(StoreError::Corrupt)?;
    Ok((key, entries))
}

/// Seqs of the first and the last log entry. A chunk's key is its first entry's seq, so only
/// the last chunk is decoded.
pub(crate) fn log_bounds(tree: &sled::Tree, chunked_from: Seq) -> (Option<Seq>, Option<Seq>) {
    let log = || tree.range(log_key(0)..=log_key(Seq::MAX));
    let first = log()
        .next()
        .and_then(|r| r.ok())
        .and_then(|(k, _)| parse_log_key(&k));
    let last = log()
        .next_back()
        .and_then(|r| r.ok())
        .and_then(|(k, v)| decode_log_item(&k, v, chunked_from).ok())
        .and_then(|(_, entries)| entries.last().map(|e| e.0));
    (first, last)
}

/// Poison-tolerant lock: a panicking reader must not take the store down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

enum OpenFailure {
    /// Move the directory aside and start empty.
    Corrupt(String),
    /// Return to the caller; the data may be fine.
    Fatal(StoreError),
}

struct Scan {
    counters: Counters,
    next_seq: Seq,
    has_marker: bool,
    chunked_from: Seq,
    /// `false` for a new store and for one written before chunks: the key is written at open.
    chunked_from_stored: bool,
}

impl Engine {
    /// Opens sled at `cfg.dir`. Errors are sled's or I/O on the db file.
    pub(crate) fn open(cfg: &StoreConfig) -> Result<Engine, StoreError> {
        let db = sled::Config::new()
            .path(&cfg.dir)
            .cache_capacity(cfg.cache_capacity_bytes)
            // Every write is driven (and flushed) by our writer thread; no background flusher
            // whose errors would surface elsewhere.
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree(TREE_NAME)?;
        sync_sled_conf(&cfg.dir)?;
        let db_path = cfg.dir.join("db");
        let db_file = File::open(&db_path).map_err(|source| StoreError::Io {
            what: "opening",
            path: db_path.clone(),
            source,
        })?;
        Ok(Engine { db, tree, db_file })
    }

    /// `flush()` + sync of new blob files + `fdatasync(<dir>/db)`.
    pub(crate) fn make_durable(
        &self,
        dir: &Path,
        synced_blobs: &mut HashSet<std::ffi::OsString>,
    ) -> Result<(), StoreError> {
        self.db.flush()?;
        sync_blobs(dir, synced_blobs)?;
        self.db_file.sync_data().map_err(|source| StoreError::Io {
            what: "syncing",
            path: dir.join("db"),
            source,
        })
    }
}

/// sled 0.34.7 writes `<dir>/conf` at open and never syncs it (config.rs `write_config`):
/// after a power cut it finds the file empty and logs `empty/corrupt configuration file found`
/// at every start. Synced here, with the directory entry that names it.
fn sync_sled_conf(dir: &Path) -> Result<(), StoreError> {
    let conf = dir.join("conf");
    File::open(&conf)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Io {
            what: "syncing",
            path: conf,
            source,
        })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            what: "syncing",
            path: dir.to_path_buf(),
            source,
        })
}

/// sled writes large page images to `<dir>/blobs/<lsn>` and never syncs them.
fn sync_blobs(dir: &Path, synced: &mut HashSet<std::ffi::OsString>) -> Result<(), StoreError> {
    let blobs = dir.join("blobs");
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { what, path, source }
    }
    let rd = match std::fs::read_dir(&blobs) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("listing", &blobs)(e)),
    };
    let mut present = HashSet::new();
    let mut new = false;
    for entry in rd {
        let entry = entry.map_err(io("listing", &blobs))?;
        let name = entry.file_name();
        if !synced.contains(&name) {
            let path = entry.path();
            match File::open(&path) {
                Ok(f) => f.sync_data().map_err(io("syncing", &path))?,
                // sled removed it meanwhile (superseded).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("opening", &path)(e)),
            }
            new = true;
        }
        present.insert(name);
    }
    if new {
        File::open(&blobs)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &blobs))?;
    }
    *synced = present;
    Ok(())
}

fn open_and_scan(cfg: &StoreConfig) -> Result<(Engine, Scan), OpenFailure> {
    let result = catch_unwind(AssertUnwindSafe(
        || -> Result<(Engine, Scan), OpenFailure> {
            let db_path = cfg.dir.join("db");
            let existed = std::fs::metadata(&db_path)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
            let engine = Engine::open(cfg).map_err(|e| match e {
                StoreError::Engine(sled::Error::Corruption { .. })
                | StoreError::Engine(sled::Error::ReportableBug(_))
                | StoreError::Engine(sled::Error::Unsupported(_)) => {
                    OpenFailure::Corrupt(e.to_string())
                }
                StoreError::Engine(sled::Error::Io(ref io))
                    if io.kind() == std::io::ErrorKind::InvalidData =>
                {
                    OpenFailure::Corrupt(e.to_string())
                }
                other => OpenFailure::Fatal(other),
            })?;
            let scan = scan_all(&engine.tree).map_err(OpenFailure::Corrupt)?;
            if !scan.has_marker {
                if existed {
                    return Err(OpenFailure::Corrupt(
                    "the database file holds data but sled recovered no Waystation store from it".into(),
                ));
                }
                engine
                    .tree
                    .insert(KEY_MARKER, MARKER_VALUE)
                    .map_err(|e| OpenFailure::Fatal(e.into()))?;
            }
            if !scan.has_marker || !scan.chunked_from_stored {
                engine
                    .tree
                    .insert(KEY_CHUNKED_FROM, &scan.chunked_from.to_be_bytes()[..])
                    .map_err(|e| OpenFailure::Fatal(e.into()))?;
                engine
                    .make_durable(&cfg.dir, &mut HashSet::new())
                    .map_err(OpenFailure::Fatal)?;
            }
            Ok((engine, scan))
        },
    ));
    let (engine, scan) = match result {
        Ok(r) => r?,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            return Err(OpenFailure::Corrupt(format!(
                "sled panicked while opening: {msg}"
            )));
        }
    };
    // Make the directory entries of a freshly created store durable.
    for d in [Some(cfg.dir.as_path()), cfg.dir.parent()]
        .into_iter()
        .flatten()
    {
        if d.as_os_str().is_empty() {
            continue;
        }
        if let Err(e) = File::open(d).and_then(|f| f.sync_all()) {
            warn!(dir = %d.display(), error = %e, "could not sync directory");
        }
    }
    Ok((engine, scan))
}

/// Rebuilds the counters, decodes every log chunk and checks that every key is one this module
/// writes.
fn scan_all(tree: &sled::Tree) -> Result<Scan, String> {
    let mut c = Counters::default();
    let mut hwm: Seq = 1;
    let mut has_marker = false;
    let stored_chunked_from = match tree
        .get(KEY_CHUNKED_FROM)
        .map_err(|e| format!("reading the store: {e}"))?
    {
        Some(v) => {
            Some(u64::from_be_bytes(v[..].try_into().map_err(|_| {
                format!("chunked_from value of {} bytes", v.len())
            })?))
        }
        None => None,
    };
    // A store without the key predates chunks: every log key in it is a raw record.
    let chunked_from = stored_chunked_from.unwrap_or(Seq::MAX);
    for item in tree.iter() {
        let (k, v) = item.map_err(|e| format!("reading the store: {e}"))?;
        match k.first() {
            Some(&PREFIX_LOG) => {
                touch_for_eviction(tree, &k);
                let (_, entries) =
                    decode_log_item(&k, v, chunked_from).map_err(|e| e.to_string())?;
                for (seq, record) in &entries {
                    if c.last_seq.is_some_and(|last| last >= *seq) {
                        return Err(format!("log entry {seq} is out of order"));
                    }
                    c.len += 1;
                    c.bytes += record.len() as u64;
                    c.first_seq.get_or_insert(*seq);
                    c.last_seq = Some(*seq);
                }
            }
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_NEXT_SEQ => {
                let raw: [u8; 8] = v[..]
                    .try_into()
                    .map_err(|_| format!("next_seq value of {} bytes", v.len()))?;
                hwm = hwm.max(u64::from_be_bytes(raw));
            }
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_MARKER => has_marker = true,
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_CHUNKED_FROM => {}
            Some(p) if Keyspace::ALL.iter().any(|s| s.prefix() == *p) => {}
            _ => return Err(format!("unknown key {:?}", &k[..k.len().min(16)])),
        }
    }
    let next_seq = hwm.max(c.last_seq.map_or(1, |s| s + 1));
    Ok(Scan {
        counters: c,
        next_seq,
        has_marker,
        // Everything from the next append on is written in chunks.
        chunked_from: stored_chunked_from.unwrap_or(next_seq),
        chunked_from_stored: stored_chunked_from.is_some(),
    })
}

/// Renames `dir` to `<dir>.corrupt-<UTC timestamp>` (with a numeric suffix if taken).
fn move_aside(dir: &Path) -> Result<PathBuf, StoreError> {
    let stamp = utc_stamp(SystemTime::now());
    let base = format!("{}.corrupt-{stamp}", dir.display());
    let mut target = PathBuf::from(&base);
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    std::fs::rename(dir, &target).map_err(|source| StoreError::Io {
        what: "moving aside",
        path: dir.to_path_buf(),
        source,
    })?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(parent).and_then(|f| f.sync_all());
    }
    Ok(target)
}

/// `YYYYMMDDTHHMMSSZ`.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
