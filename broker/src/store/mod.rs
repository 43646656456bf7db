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
//!
//! ## Files
//!
//! This file holds the public API ([`Store`] and its methods); the rest sits below it, and
//! imports only point down this list, never back up to this file:
//! `recovery.rs` (open, scan, move a broken store aside) and `writer.rs` (the group commit)
//! build on `read.rs` (decoding chunks, joining parts), `shared.rs` (state the handles and
//! the writer share), `chunk.rs` and `parts.rs` (the on-disk formats), `engine.rs` (sled, the
//! key layout, fsync, `flock`) and `types.rs` (the public types, errors and limits, re-exported
//! here). `record.rs` is the stored message format, used by callers.

mod chunk;
mod engine;
mod parts;
mod read;
pub mod record;
mod recovery;
mod shared;
mod types;
mod writer;

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tracing::error;

pub use engine::RELEASE_TIMEOUT;
pub use parts::MAX_INLINE_VALUE_BYTES;
pub use types::{
    Durability, KeyValue, Keyspace, LogStats, Op, Recovery, Seq, StoreConfig, StoreError, Ticket,
    MAX_KEY_BYTES, MAX_VALUE_BYTES, READ_LOG_MAX_BYTES,
};

use engine::{log_key, parse_log_key, touch_for_eviction, wait_unique, wait_until_unlocked};
use read::{decode_log_item, keyspace_value, log_record};
use shared::{lock, write_lock, Shared, Submission, WriteOp};
use types::{check_key, check_value};

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
        let (engine, scan, recovered) = recovery::open(&cfg)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::new(
            cfg.clone(),
            engine,
            scan.chunked_from,
            scan.counters,
            scan.next_seq,
            tx,
        ));
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
            recovered,
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

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            error!(error = %e, "store closed with errors");
        }
    }
}

#[cfg(test)]
mod tests;
