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
//!   Nor do writes: pages created by writing many new part keys were never evicted (300
//!   records of 1 MiB: RSS 319 MiB, 229 once the writer touches every part it wrote after
//!   `apply_batch`, ~125 with the daemon's fixed mmap threshold as well; `bench.sh --only 9`).
//!   Measured with `scripts/bench.sh --only 6`: VmRSS flat at ~30 MiB from 250 k to 2 M waiting.
//!   Two costs scale with what one commit writes or deletes, not with the backlog: sled holds
//!   a batch's values several times over until it is applied (hence `max_batch_bytes`; a
//!   single 16 MiB record is still one batch: peak RSS ~230 MB streaming them), and to delete
//!   a key sled loads the leaf that holds it and keeps what it loaded until the batch is
//!   applied: deleting 16 MiB of records in one commit took 21 ms and no extra memory, 64 MiB
//!   ~0.2-0.3 s and +70 MB, 256 MiB 1.5-7 s and +1.1 GB (small records cost as much per byte:
//!   75 MiB of 100-byte records, +450 MB). Callers should delete in steps of a few MiB to a
//!   few tens of MiB of records per commit.
//! - **Large values**: a log record or keyspace value longer than [`MAX_INLINE_VALUE_BYTES`]
//!   (7 KiB) is stored as parts of that size under their own keys (prefix `P`, in sled leaves
//!   of their own; see `parts.rs` for the format and why 7 KiB), named by a small marker entry
//!   in its log chunk or a descriptor under its keyspace key. Values up to [`MAX_VALUE_BYTES`]
//!   (17 MiB: a 16 MiB MQTT packet and the stored message's header) are accepted. Reads join
//!   the parts transparently and [`LogStats::bytes`] counts the record's length, as for any
//!   record. A 16 MiB record is necessarily 16 MiB in memory when read, so
//!   [`Store::read_log_budget`] bounds the bytes one read returns.
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
//! submission, then drains whatever else is already queued (up to `max_batch_ops` operations
//! and `max_batch_bytes` bytes) without waiting on any timer: a lone message is committed at
//! once, and under load the submissions that arrive while one sync runs form the next batch.
//! For each batch it builds one `sled::Batch`, applies it, calls `Db::flush()`, `sync_data()`
//! on any new blob files, then `sync_data()` on `<dir>/db`, and only then publishes the
//! batch's highest ticket as [`Durability::durable_through`]. Within a batch operations take
//! effect in submission order (a later op on the same key wins).
//!
//! ## Durability contract
//!
//! - **Durable** means: sled's `flush()` returned *and* `fdatasync` on `<dir>/db` returned.
//!   `flush()` alone uses `sync_file_range`, which flushes neither the device cache nor file
//!   metadata (sled #1452, #1351), so it is not power-loss safe. sled writes values and page
//!   images larger than ~128 KiB to separate blob files that it never syncs. Large values are
//!   split into 7 KiB parts so that neither a value nor a leaf image of parts or chunks gets
//!   there; the writer still syncs every blob file it has not synced yet (an index page full
//!   of long keys could be one), and the `blobs/` directory, before the ack. Values are capped
//!   at [`MAX_VALUE_BYTES`], keys at [`MAX_KEY_BYTES`].
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
//! - **Large values** are no exception to any of this: a value's parts are inserted in the same
//!   `sled::Batch` as the chunk marker or keyspace descriptor that names them, and removed in
//!   the same batch as the `DeleteLog`, `DeleteLogThrough`, `Remove` or overwriting `Put` that
//!   ends the value. So a large value is acknowledged only once all its parts are synced, a
//!   crash keeps all of it or none, and the log reads back in seq order whatever the sizes.
//!   Reads are not snapshots: a reader that finds a value's parts incomplete looks at its
//!   marker or descriptor again; if the entry was deleted (or the key given a new value) in
//!   the meantime it skips the entry (or reads the new value), otherwise the store is corrupt
//!   and the read returns [`StoreError::Corrupt`].
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
//!   scan at open finds an entry this module did not write (including parts that no marker or
//!   descriptor names, and a marker or descriptor whose parts are missing, in excess or of
//!   the wrong total length: sled recovers batches whole, so either means damage), or the db
//!   file holds data but the marker key written at creation is missing (sled opens a garbage
//!   file as an *empty* database, silently), the directory is moved aside to
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
//! - **A dead writer is never silent**: if the writer thread panics (a bug here or in sled),
//!   [`Durability::fatal`] (and `error`) are published, [`Store::wait_durable`] and later
//!   [`Store::submit`]s fail with [`StoreError::Unavailable`], and nothing is acknowledged
//!   again. The process should then exit non-zero so its supervisor restarts it; what was
//!   acknowledged is on disk and the next open recovers as after a crash. The same holds if the
//!   writer ever stopped with operations it could not make durable other than at shutdown.
//! - **Backpressure**: the submit queue is unbounded; callers bound it by waiting for acks
//!   (publishers' in-flight windows) and by [`Store::pending_bytes`]: the bytes of keys and
//!   values submitted and not yet durable, lowered before the [`Store::durability`] update
//!   that publishes their commit. While the disk is full, nothing is acked.

mod chunk;
mod parts;
pub mod record;
mod writer;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Largest value (log record or keyspace value) accepted by [`Store::submit`]: a 16 MiB MQTT
/// packet (the protocol's largest is 256 MiB, but no client of an edge broker needs that) and
/// the stored message's header and topic. Values above [`MAX_INLINE_VALUE_BYTES`] are stored
/// as parts (see `parts.rs`).
pub const MAX_VALUE_BYTES: usize = 17 * 1024 * 1024;
/// Largest value stored under a single sled key; larger ones are split into parts of this size.
pub const MAX_INLINE_VALUE_BYTES: usize = parts::PART_BYTES;
/// The byte budget of [`Store::read_log`] (see [`Store::read_log_budget`]).
pub const READ_LOG_MAX_BYTES: usize = 16 * 1024 * 1024;
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
    /// Counted in [`Shared::pending_bytes`] until published durable or dropped.
    bytes: u64,
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
    /// See [`Store::pending_bytes`].
    pending_bytes: AtomicU64,
    /// Seqs, tickets and the channel to the writer, which takes `tx` away if it dies.
    submit: Mutex<SubmitState>,
    /// Test hook: the next N commit attempts fail as if the disk were full.
    #[cfg(test)]
    fail_commits: std::sync::atomic::AtomicU32,
    /// Test hook: the writer panics at its next commit.
    #[cfg(test)]
    panic_writer: AtomicBool,
}

struct SubmitState {
    next_seq: Seq,
    next_ticket: Ticket,
    tx: Option<mpsc::Sender<Submission>>,
}

struct Inner {
    shared: Arc<Shared>,
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
        let (tx, rx) = mpsc::channel();
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
            pending_bytes: AtomicU64::new(0),
            submit: Mutex::new(SubmitState {
                next_seq: scan.next_seq,
                next_ticket: 1,
                tx: Some(tx),
            }),
            #[cfg(test)]
            fail_commits: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            panic_writer: AtomicBool::new(false),
        });
        let writer_shared = shared.clone();
        let large = writer::LargeValues {
            keyspace: scan.large,
            next_gen: scan.next_gen,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run(writer_shared, rx, large))
            .map_err(|source| StoreError::Io {
                what: "spawning the writer thread for",
                path: cfg.dir.clone(),
                source,
            })?;
        let inner = Inner {
            shared,
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
    /// submission if a value is larger than [`MAX_VALUE_BYTES`] or a key than
    /// [`MAX_KEY_BYTES`]; fails with [`StoreError::Unavailable`] once the writer has died (see
    /// [`Durability::fatal`]) and [`StoreError::Closed`] after shutdown.
    pub fn submit(&self, ops: Vec<Op>) -> Result<(Ticket, Vec<Seq>), StoreError> {
        let mut bytes = 0u64;
        for op in &ops {
            let n = match op {
                Op::Append(v) => {
                    check_value(v.len())?;
                    v.len()
                }
                Op::Put { key, value, .. } => {
                    check_key(key.len())?;
                    check_value(value.len())?;
                    key.len() + value.len()
                }
                Op::Remove { key, .. } => {
                    check_key(key.len())?;
                    key.len()
                }
                Op::DeleteLog(_) | Op::DeleteLogThrough(_) => 0,
            };
            bytes += n as u64;
        }
        let shared = &self.inner.shared;
        let mut st = lock(&shared.submit);
        let Some(tx) = st.tx.clone() else {
            return Err(match lock(&shared.writer_failure).clone() {
                Some(f) if !shared.closing.load(Ordering::SeqCst) => StoreError::Unavailable(f),
                _ => StoreError::Closed,
            });
        };
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
        // Counted before the writer can see it (it subtracts once the batch is durable).
        shared.pending_bytes.fetch_add(bytes, Ordering::SeqCst);
        // Sent under the lock so that channel order == ticket order == seq order.
        if tx
            .send(Submission {
                ticket,
                ops: write_ops,
                bytes,
            })
            .is_err()
        {
            shared.pending_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return Err(StoreError::Closed);
        }
        st.next_ticket += 1;
        st.next_seq = seq;
        Ok((ticket, seqs))
    }

    /// Bytes of keys and values submitted but not yet durable (queued or being committed).
    /// Lowered by the writer before it publishes the [`Durability`] update for their commit,
    /// so whoever wakes on that update sees the lowered value. A cheap atomic load.
    pub fn pending_bytes(&self) -> u64 {
        self.inner.shared.pending_bytes.load(Ordering::SeqCst)
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

    /// Log entries with seq `>= from`, ascending, at most `max`, and at most
    /// [`READ_LOG_MAX_BYTES`] of records (but always at least one entry if there is one): see
    /// [`Store::read_log_budget`]. An empty result means there is no entry at or after `from`.
    pub fn read_log(&self, from: Seq, max: usize) -> Result<Vec<(Seq, Bytes)>, StoreError> {
        self.read_log_budget(from, max, READ_LOG_MAX_BYTES)
    }

    /// Log entries with seq `>= from`, ascending: at most `max_entries`, and no more entries
    /// than fit in `max_bytes` of records, except that the first entry found is always
    /// returned whatever its size (so a caller always makes progress, and memory is bounded by
    /// `max(max_bytes, MAX_VALUE_BYTES)`). An empty result means there is no entry at or after
    /// `from` (or `max_entries` is 0). A large record's parts are read only if it is returned.
    pub fn read_log_budget(
        &self,
        from: Seq,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Seq, Bytes)>, StoreError> {
        let shared = &self.inner.shared;
        let engine = shared.engine()?;
        let mut out = Vec::with_capacity(max_entries.min(1024));
        if max_entries == 0 {
            return Ok(out);
        }
        let mut bytes: u64 = 0;
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
                if seq < next {
                    continue;
                }
                next = seq.saturating_add(1);
                if !out.is_empty() && bytes.saturating_add(v.len()) > max_bytes as u64 {
                    return Ok(out);
                }
                let Some(record) = log_record(&engine.tree, shared.chunked_from, seq, v)? else {
                    continue; // deleted while we read it
                };
                bytes += record.len() as u64;
                out.push((seq, record));
                if out.len() >= max_entries || bytes >= max_bytes as u64 {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    pub fn get(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.inner.shared.engine()?;
        let key = space.key(key);
        match engine.tree.get(&key)? {
            Some(stored) => keyspace_value(&engine.tree, &key, stored),
            None => Ok(None),
        }
    }

    /// Every key/value pair in `space` whose key starts with `prefix`, in key order. Keys are
    /// returned without the internal keyspace prefix.
    pub fn scan(&self, space: Keyspace, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let engine = self.inner.shared.engine()?;
        let mut out = Vec::new();
        for item in engine.tree.scan_prefix(space.key(prefix)) {
            let (k, stored) = item?;
            if let Some(v) = keyspace_value(&engine.tree, &k, stored)? {
                out.push((k[1..].to_vec(), v));
            }
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
                stats.oldest_received_at_ms = match first_entry {
                    Some((_, chunk::Value::Inline(record))) => record::peek_received_at_ms(&record),
                    // The header is in the first part.
                    Some((seq, chunk::Value::Parts { .. })) => engine
                        .tree
                        .get(parts::part_key(&log_key(seq), 0, 0))
                        .ok()
                        .flatten()
                        .and_then(|part| record::peek_received_at_ms(&part)),
                    None => None,
                };
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
        lock(&self.shared.submit).tx = None;
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

/// The record of log entry `seq`, whose chunk entry is `v`: its bytes, joined from its parts
/// if it is large. `None` if the entry was deleted while we read its parts.
pub(crate) fn log_record(
    tree: &sled::Tree,
    chunked_from: Seq,
    seq: Seq,
    v: chunk::Value,
) -> Result<Option<Bytes>, StoreError> {
    let (len, parts) = match v {
        chunk::Value::Inline(b) => return Ok(Some(b)),
        chunk::Value::Parts { len, parts } => (len, parts),
    };
    let owner = log_key(seq);
    let large = parts::Large { gen: 0, len, parts };
    match parts::fetch(tree, &owner, large)? {
        Ok(bytes) => Ok(Some(Bytes::from(bytes))),
        Err(why) => {
            // A deletion commit removes the marker and the parts together (and readers never
            // see half a batch): if the marker is still there, the parts are damaged.
            let still_there = match tree.range(log_key(0)..=owner).next_back() {
                Some(item) => {
                    let (k, v) = item?;
                    decode_log_item(&k, v, chunked_from)?
                        .1
                        .iter()
                        .any(|(s, v)| *s == seq && *v == chunk::Value::Parts { len, parts })
                }
                None => false,
            };
            if still_there {
                Err(StoreError::Corrupt(format!("log record {seq}: {why}")))
            } else {
                Ok(None)
            }
        }
    }
}

/// How often a read of a large keyspace value starts over because the value was replaced
/// while it read the parts, before it gives up.
const RESOLVE_ATTEMPTS: usize = 100;

/// The value of keyspace key `key` (with its prefix) stored as `stored`: unescaped, or joined
/// from its parts. `None` if the key was removed while we read its parts.
pub(crate) fn keyspace_value(
    tree: &sled::Tree,
    key: &[u8],
    mut stored: sled::IVec,
) -> Result<Option<Vec<u8>>, StoreError> {
    let name = || String::from_utf8_lossy(&key[..key.len().min(80)]).into_owned();
    for _ in 0..RESOLVE_ATTEMPTS {
        let large = match parts::decode_value(&stored)
            .map_err(|e| StoreError::Corrupt(format!("key {:?}: {e}", name())))?
        {
            parts::Stored::Small(v) => return Ok(Some(v.to_vec())),
            parts::Stored::Large(large) => large,
        };
        match parts::fetch(tree, key, large)? {
            Ok(v) => return Ok(Some(v)),
            // Replaced or removed meanwhile (each value's parts have a gen of their own, so
            // what we read is all of the old value or not), or damaged if it is unchanged.
            Err(why) => match tree.get(key)? {
                Some(now) if now == stored => {
                    return Err(StoreError::Corrupt(format!("key {:?}: {why}", name())))
                }
                Some(now) => stored = now,
                None => return Ok(None),
            },
        }
    }
    Err(StoreError::Unavailable(format!(
        "key {:?} was replaced {RESOLVE_ATTEMPTS} times while being read",
        name()
    )))
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
    /// Keyspace keys (with prefix) whose values are stored in parts.
    large: HashMap<Vec<u8>, parts::Large>,
    /// Gen for the next large keyspace value: above every gen in the store.
    next_gen: u64,
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
    // Large values, by their parts' key without the index (owner and gen): what markers and
    // descriptors name, and what parts are present (count, bytes). Compared at the end (the
    // parts' `P` keys sort between the log and the keyspaces).
    let id = |owner: &[u8], gen: u64| {
        let mut k = parts::part_key(owner, gen, 0);
        k.truncate(k.len() - 4);
        k
    };
    let mut named: HashMap<Vec<u8>, parts::Large> = HashMap::new();
    let mut found: HashMap<Vec<u8>, (u32, u64)> = HashMap::new();
    let mut large: HashMap<Vec<u8>, parts::Large> = HashMap::new();
    let mut max_gen = 0u64;
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
                    c.bytes += record.len();
                    c.first_seq.get_or_insert(*seq);
                    c.last_seq = Some(*seq);
                    if let chunk::Value::Parts { len, parts } = *record {
                        named.insert(id(&log_key(*seq), 0), parts::Large { gen: 0, len, parts });
                    }
                }
            }
            Some(&parts::PREFIX_PART) => {
                touch_for_eviction(tree, &k);
                let Some((_, _, index)) = parts::parse_part_key(&k) else {
                    return Err(format!("bad part key {:?}", &k[..k.len().min(24)]));
                };
                let value_id = &k[..k.len() - 4];
                let seen = match found.get_mut(value_id) {
                    Some(seen) => seen,
                    None => found.entry(value_id.to_vec()).or_insert((0, 0)),
                };
                if index != seen.0 || v.is_empty() {
                    return Err(format!(
                        "part {index} ({} bytes) of {:?} where part {} was expected",
                        v.len(),
                        &value_id[..value_id.len().min(24)],
                        seen.0
                    ));
                }
                seen.0 += 1;
                seen.1 += v.len() as u64;
            }
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_NEXT_SEQ => {
                let raw: [u8; 8] = v[..]
                    .try_into()
                    .map_err(|_| format!("next_seq value of {} bytes", v.len()))?;
                hwm = hwm.max(u64::from_be_bytes(raw));
            }
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_MARKER => has_marker = true,
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_CHUNKED_FROM => {}
            Some(p) if Keyspace::ALL.iter().any(|s| s.prefix() == *p) => {
                match parts::decode_value(&v) {
                    Ok(parts::Stored::Small(_)) => {}
                    Ok(parts::Stored::Large(l)) => {
                        named.insert(id(&k, l.gen), l);
                        large.insert(k.to_vec(), l);
                        max_gen = max_gen.max(l.gen);
                    }
                    Err(e) => return Err(format!("key {:?}: {e}", &k[..k.len().min(24)])),
                }
            }
            _ => return Err(format!("unknown key {:?}", &k[..k.len().min(16)])),
        }
    }
    for (value_id, l) in &named {
        match found.remove(value_id) {
            Some((n, bytes)) if n == l.parts && bytes == l.len => {}
            seen => {
                let (n, bytes) = seen.unwrap_or((0, 0));
                return Err(format!(
                    "large value {:?}: {n} parts of {bytes} bytes where {} parts of {} bytes \
                     were written",
                    &value_id[..value_id.len().min(24)],
                    l.parts,
                    l.len
                ));
            }
        }
    }
    if let Some((value_id, (n, bytes))) = found.iter().next() {
        return Err(format!(
            "{} large values' parts belong to no log entry or key, e.g. {n} parts of {bytes} \
             bytes under {:?}",
            found.len(),
            &value_id[..value_id.len().min(24)]
        ));
    }
    let next_seq = hwm.max(c.last_seq.map_or(1, |s| s + 1));
    Ok(Scan {
        counters: c,
        next_seq,
        has_marker,
        // Everything from the next append on is written in chunks.
        chunked_from: stored_chunked_from.unwrap_or(next_seq),
        chunked_from_stored: stored_chunked_from.is_some(),
        large,
        next_gen: max_gen + 1,
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
