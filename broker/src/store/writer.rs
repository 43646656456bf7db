//! The group-commit writer thread (see the module docs of `store`): it drains the submission
//! channel into groups, turns each group into one idempotent `sled::Batch` ([`build`]), applies
//! and syncs it through the engine, retrying (and reopening sled) until it is durable, then
//! publishes the new durable ticket and counters in [`Shared`].
//!
//! It reads and writes the log only through `chunk.rs`, `parts.rs` and `read.rs`, and shares
//! nothing with the public handles but [`Shared`], so it never imports from `store/mod.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{error, info, warn};

use super::chunk::{self, Entries, Value};
use super::engine::{
    log_key, parse_log_key, wait_unique, wait_until_unlocked, Engine, KEY_NEXT_SEQ,
};
use super::parts::{self, Large};
use super::read::{decode_log_item, log_bounds};
use super::shared::{lock, write_lock, Shared, Submission, WriteOp};
use super::types::{Seq, StoreError, Ticket};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While shutting down, failed attempts after which the writer gives up on a batch that was
/// never acknowledged (instead of blocking shutdown forever on a full disk).
const SHUTDOWN_ATTEMPTS: u32 = 3;

/// The keyspace values stored in parts (see [`super::parts`]), as of the last durable commit:
/// a `Put` or `Remove` must remove the parts of the value it replaces, in the same batch, and
/// looking them up here costs no read per operation.
pub(crate) struct LargeValues {
    /// Keyspace key (with prefix) -> where its value's parts are.
    pub keyspace: HashMap<Vec<u8>, Large>,
    /// Gen of the next large keyspace value (unique within this run, above every gen on disk).
    pub next_gen: u64,
}

/// A group commit ready to apply: idempotent, so it can be applied again after a failure.
struct Built {
    batch: sled::Batch,
    through: Ticket,
    ops: usize,
    d_len: i64,
    d_bytes: i64,
    touched_log: bool,
    /// Changes to [`LargeValues::keyspace`], applied once the batch is durable.
    large: HashMap<Vec<u8>, Option<Large>>,
    next_gen: u64,
    /// Parts written by this batch: `(owner, gen, count)`, touched once applied (see
    /// [`parts::touch_written`]).
    written_parts: Vec<(Vec<u8>, u64, u32)>,
}

/// The writer thread's state besides the channel.
pub(crate) struct WriterState {
    synced_blobs: HashSet<OsString>,
    large: LargeValues,
    /// Pending bytes (see [`Shared::pending_bytes`]) of the group in hand: released when it
    /// is published durable, or dropped.
    in_hand: u64,
}

pub(super) fn run(shared: Arc<Shared>, rx: Receiver<Submission>, large: LargeValues) {
    let max_ops = shared.cfg.max_batch_ops.max(1);
    let max_bytes = shared.cfg.max_batch_bytes.max(1) as u64;
    let mut st = WriterState {
        synced_blobs: HashSet::new(),
        large,
        in_hand: 0,
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // recv() fails only once every sender is gone and the channel is drained.
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut n = group[0].ops.len();
            let mut bytes = group[0].bytes;
            while n < max_ops && bytes < max_bytes {
                match rx.try_recv() {
                    Ok(s) => {
                        n += s.ops.len();
                        bytes += s.bytes;
                        group.push(s);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            st.in_hand = bytes;
            if let Err(reason) = commit(&shared, &group, &mut st) {
                // Only while shutting down: count what is left and stop.
                let mut lost: usize = group.iter().map(|s| s.ops.len()).sum();
                let mut lost_bytes = std::mem::take(&mut st.in_hand);
                while let Ok(s) = rx.try_recv() {
                    lost += s.ops.len();
                    lost_bytes += s.bytes;
                }
                shared.pending_bytes.fetch_sub(lost_bytes, Ordering::SeqCst);
                error!(ops = lost, %reason, "store writer stopping with operations that never became durable (none was acknowledged)");
                let msg = StoreError::NotDurable(lost, reason).to_string();
                *lock(&shared.writer_failure) = Some(msg.clone());
                if !shared.closing.load(Ordering::SeqCst) {
                    shared.watch_tx.send_modify(|d| d.fatal = Some(msg));
                }
                shared.durable_cv.notify_all();
                return;
            }
        }
    }));
    if let Err(panic) = result {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let msg =
            format!("the store writer thread panicked ({what}); nothing more will become durable");
        error!("{msg}");
        *lock(&shared.writer_failure) = Some(msg.clone());
        // Nothing can be submitted any more (`submit` fails with this message); then nothing
        // queued will ever be committed: release its pending bytes.
        lock(&shared.submit).tx = None;
        let mut dropped = std::mem::take(&mut st.in_hand);
        while let Ok(s) = rx.try_recv() {
            dropped += s.bytes;
        }
        shared.pending_bytes.fetch_sub(dropped, Ordering::SeqCst);
        shared.watch_tx.send_modify(|d| {
            d.error = Some(msg.clone());
            d.fatal = Some(msg);
        });
        shared.durable_cv.notify_all();
    }
}

/// Commits one group, retrying until it succeeds. Returns `Err` only when shutting down.
fn commit(shared: &Shared, group: &[Submission], st: &mut WriterState) -> Result<(), String> {
    #[cfg(test)]
    if shared.panic_writer.swap(false, Ordering::SeqCst) {
        panic!("injected store writer panic");
    }
    let mut backoff = BACKOFF_START;
    let mut failures: u32 = 0;
    let mut built: Option<Built> = None;
    loop {
        let attempt = shared.engine().and_then(|engine| {
            if built.is_none() {
                built = Some(build(&engine, group, shared.chunked_from, &st.large)?);
            }
            let b = built.as_ref().expect("built above");
            engine.tree.apply_batch(b.batch.clone())?;
            for (owner, gen, n) in &b.written_parts {
                parts::touch_written(&engine.tree, owner, *gen, *n);
            }
            #[cfg(test)]
            if shared
                .fail_commits
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(StoreError::Io {
                    what: "injected failure syncing",
                    path: shared.cfg.dir.join("db"),
                    source: std::io::Error::from_raw_os_error(28), // ENOSPC
                });
            }
            let syncing = Instant::now();
            engine.make_durable(&shared.cfg.dir, &mut st.synced_blobs)?;
            crate::stats::COMMIT_SYNC_US.observe(syncing.elapsed().as_micros() as u64);
            crate::stats::COMMIT_BATCH_OPS.observe(b.ops as u64);
            Ok(engine)
        });
        match attempt {
            Ok(engine) => {
                let b = built.take().expect("built before a successful apply");
                for (k, l) in b.large.iter() {
                    match l {
                        Some(l) => st.large.keyspace.insert(k.clone(), *l),
                        None => st.large.keyspace.remove(k),
                    };
                }
                st.large.next_gen = b.next_gen;
                publish(shared, &engine, &b, failures, &mut st.in_hand);
                return Ok(());
            }
            Err(e) => {
                failures += 1;
                let msg = e.to_string();
                error!(error = %msg, attempt = failures, retry_in_ms = backoff.as_millis() as u64,
                    "store commit failed; nothing in this batch is acknowledged, retrying");
                shared.watch_tx.send_modify(|d| d.error = Some(msg.clone()));
                lock(&shared.durable).1 = Some(msg.clone());
                if shared.closing.load(Ordering::SeqCst) && failures >= SHUTDOWN_ATTEMPTS {
                    return Err(msg);
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                // sled keeps an I/O error sticky until the database is reopened.
                if let Err(e) = reopen(shared) {
                    warn!(error = %e, "reopening the store after a failed commit failed; will retry");
                }
            }
        }
    }
}

/// The log as this group commit sees it: sled's state with the group's own changes on top.
/// Chunks are read from sled on demand (deletions touch the front of the log, appends its
/// last chunk), so building a commit costs a few reads whatever the backlog.
struct LogView<'a> {
    tree: &'a sled::Tree,
    chunked_from: Seq,
    /// Chunks changed by this group, by key: `Some` = new contents, `None` = removed.
    dirty: BTreeMap<Seq, Option<Entries>>,
}

impl LogView<'_> {
    fn decode(&self, k: &[u8], v: sled::IVec) -> Result<(Seq, Entries), StoreError> {
        decode_log_item(k, v, self.chunked_from)
    }

    /// The chunk with the highest key `<= max_key`: the one that holds `max_key` if any does.
    fn last_chunk_through(&self, max_key: Seq) -> Result<Option<(Seq, Entries)>, StoreError> {
        let from_dirty = self
            .dirty
            .range(..=max_key)
            .rev()
            .find_map(|(k, c)| c.as_ref().map(|c| (*k, c)));
        let mut from_tree = None;
        for item in self.tree.range(log_key(0)..=log_key(max_key)).rev() {
            let (k, v) = item?;
            let key = parse_log_key(&k)
                .ok_or_else(|| StoreError::Corrupt(format!("bad log key {:?}", &k[..])))?;
            if from_dirty.is_some_and(|(dk, _)| dk > key) {
                break;
            }
            if !self.dirty.contains_key(&key) {
                from_tree = Some(self.decode(&k, v)?);
                break;
            }
        }
        Ok(match (from_dirty, from_tree) {
            (Some((dk, d)), Some((tk, t))) => Some(if dk > tk { (dk, d.clone()) } else { (tk, t) }),
            (Some((dk, d)), None) => Some((dk, d.clone())),
            (None, t) => t,
        })
    }

    /// The chunk stored under `key` in sled, ignoring this group's changes.
    fn load_from_tree(&self, key: Seq) -> Result<Option<Entries>, StoreError> {
        match self.tree.get(log_key(key))? {
            Some(v) => Ok(Some(self.decode(&log_key(key), v)?.1)),
            None => Ok(None),
        }
    }

    /// Every chunk whose key is `<= max_key`, ascending.
    fn chunks_through(&self, max_key: Seq) -> Result<Vec<(Seq, Entries)>, StoreError> {
        let mut out: BTreeMap<Seq, Entries> = BTreeMap::new();
        for item in self.tree.range(log_key(0)..=log_key(max_key)) {
            let (k, v) = item?;
            let (key, entries) = self.decode(&k, v)?;
            if !self.dirty.contains_key(&key) {
                out.insert(key, entries);
            }
        }
        for (k, c) in self.dirty.range(..=max_key) {
            if let Some(c) = c {
                out.insert(*k, c.clone());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Replaces chunk `key` by the `rest` of its entries (re-keyed to the first one).
    fn replace(&mut self, key: Seq, rest: Entries) {
        self.dirty.insert(key, None);
        if let Some(&(first, _)) = rest.first() {
            self.dirty.insert(first, Some(rest));
        }
    }
}

/// Removes the parts of the large records among `gone` (log entries being deleted).
fn remove_log_parts(batch: &mut sled::Batch, gone: &[(Seq, Value)]) {
    for (seq, v) in gone {
        if let Value::Parts { parts, .. } = v {
            parts::remove_parts(batch, &log_key(*seq), 0, *parts);
        }
    }
}

/// Turns a group into one sled batch. Reads the log only where the group changes it: the last
/// chunk (appends join it while it has room) and the chunks that deletions reach. Large values
/// go to parts in the same batch (see [`super::parts`]); the parts of what a deletion, `Put` or
/// `Remove` ends are removed in it.
fn build(
    engine: &Engine,
    group: &[Submission],
    chunked_from: Seq,
    large: &LargeValues,
) -> Result<Built, StoreError> {
    let mut b = Builder {
        batch: sled::Batch::default(),
        view: LogView {
            tree: &engine.tree,
            chunked_from,
            dirty: BTreeMap::new(),
        },
        large,
        large_changes: HashMap::new(),
        next_gen: large.next_gen,
        written_parts: Vec::new(),
        d_len: 0,
        d_bytes: 0,
        ops: 0,
        touched_log: false,
        max_appended: None,
        tail: None,
    };
    for sub in group {
        for op in &sub.ops {
            b.ops += 1;
            match op {
                WriteOp::Append(seq, v) if parts::is_large(v.len()) => b.append_large(*seq, v),
                WriteOp::Append(seq, v) => b.append(*seq, v)?,
                WriteOp::DeleteLog(seq) => b.delete_log(*seq)?,
                WriteOp::DeleteLogThrough(through) => b.delete_log_through(*through)?,
                WriteOp::Put(k, v) => b.put(k, v),
                WriteOp::Remove(k) => b.remove(k),
            }
        }
    }
    Ok(b.finish(group.last().map_or(0, |s| s.ticket)))
}

/// A group commit being built by [`build`], one operation at a time, in submission order.
struct Builder<'a> {
    batch: sled::Batch,
    view: LogView<'a>,
    /// The large keyspace values as of the last durable commit.
    large: &'a LargeValues,
    /// What this group changes in `large` so far (see [`Built::large`]).
    large_changes: HashMap<Vec<u8>, Option<Large>>,
    next_gen: u64,
    written_parts: Vec<(Vec<u8>, u64, u32)>,
    d_len: i64,
    d_bytes: i64,
    ops: usize,
    touched_log: bool,
    max_appended: Option<Seq>,
    /// Key of the chunk appends go to, once looked up; `None` after a deletion (which may
    /// remove or re-key it).
    tail: Option<Option<Seq>>,
}

impl Builder<'_> {
    fn appended(&mut self, seq: Seq, len: usize) {
        self.d_len += 1;
        self.d_bytes += len as i64;
        self.max_appended = Some(seq);
        self.touched_log = true;
    }

    fn append_large(&mut self, seq: Seq, v: &Bytes) {
        // Parts under their own keys; a marker in a chunk of its own, which `fits` in
        // `append` never extends.
        let n = parts::insert_parts(&mut self.batch, &log_key(seq), 0, v);
        self.written_parts.push((log_key(seq).to_vec(), 0, n));
        let marker = Value::Parts {
            len: v.len() as u64,
            parts: n,
        };
        self.view.dirty.insert(seq, Some(vec![(seq, marker)]));
        self.tail = Some(Some(seq));
        self.appended(seq, v.len());
    }

    fn append(&mut self, seq: Seq, v: &Bytes) -> Result<(), StoreError> {
        if self.tail.is_none() {
            // Legacy entries are single raw records: never extend one.
            let chunked_from = self.view.chunked_from;
            self.tail = Some(
                self.view
                    .last_chunk_through(Seq::MAX)?
                    .map(|(k, _)| k)
                    .filter(|&k| k >= chunked_from),
            );
        }
        let fits = |chunk: &Entries| {
            chunk.last().is_some_and(|&(last, _)| {
                last < seq
                    && chunk.iter().all(|(_, v)| v.is_inline())
                    && chunk::encoded_len(chunk) + chunk::entry_len(last, seq, v.len())
                        <= chunk::CHUNK_TARGET_BYTES
            })
        };
        let mut joined = false;
        if let Some(Some(k)) = self.tail {
            if !self.view.dirty.contains_key(&k) {
                if let Some(chunk) = self.view.load_from_tree(k)? {
                    if fits(&chunk) {
                        self.view.dirty.insert(k, Some(chunk));
                    }
                }
            }
            if let Some(Some(chunk)) = self.view.dirty.get_mut(&k) {
                if fits(chunk) {
                    chunk.push((seq, Value::Inline(v.clone())));
                    joined = true;
                }
            }
        }
        if !joined {
            self.view
                .dirty
                .insert(seq, Some(vec![(seq, Value::Inline(v.clone()))]));
            self.tail = Some(Some(seq));
        }
        self.appended(seq, v.len());
        Ok(())
    }

    fn delete_log(&mut self, seq: Seq) -> Result<(), StoreError> {
        if let Some((key, entries)) = self.view.last_chunk_through(seq)? {
            if let Some(i) = entries.iter().position(|(s, _)| *s == seq) {
                let mut rest = entries;
                let gone = rest.remove(i);
                self.d_len -= 1;
                self.d_bytes -= gone.1.len() as i64;
                remove_log_parts(&mut self.batch, std::slice::from_ref(&gone));
                self.touched_log = true;
                if i == 0 {
                    self.view.replace(key, rest);
                } else {
                    self.view.dirty.insert(key, Some(rest));
                }
                self.tail = None;
            }
        }
        Ok(())
    }

    fn delete_log_through(&mut self, through: Seq) -> Result<(), StoreError> {
        for (key, entries) in self.view.chunks_through(through)? {
            let (gone, rest): (Entries, Entries) =
                entries.into_iter().partition(|(s, _)| *s <= through);
            if gone.is_empty() {
                continue;
            }
            self.d_len -= gone.len() as i64;
            self.d_bytes -= gone.iter().map(|(_, v)| v.len() as i64).sum::<i64>();
            remove_log_parts(&mut self.batch, &gone);
            self.touched_log = true;
            self.view.replace(key, rest);
            self.tail = None;
        }
        Ok(())
    }

    /// Where the value of keyspace key `k` is stored in parts, as of this group so far.
    fn large_value(&self, k: &[u8]) -> Option<Large> {
        match self.large_changes.get(k) {
            Some(change) => *change,
            None => self.large.keyspace.get(k).copied(),
        }
    }

    fn put(&mut self, k: &[u8], v: &[u8]) {
        let old = self.large_value(k);
        if let Some(old) = old {
            parts::remove_parts(&mut self.batch, k, old.gen, old.parts);
        }
        let new = if parts::is_large(v.len()) {
            let gen = self.next_gen;
            self.next_gen += 1;
            let parts = parts::insert_parts(&mut self.batch, k, gen, v);
            self.written_parts.push((k.to_vec(), gen, parts));
            let l = Large {
                gen,
                len: v.len() as u64,
                parts,
            };
            self.batch.insert(k, parts::encode_descriptor(l));
            Some(l)
        } else {
            self.batch.insert(k, &*parts::encode_small(v));
            None
        };
        if old.is_some() || new.is_some() {
            self.large_changes.insert(k.to_vec(), new);
        }
    }

    fn remove(&mut self, k: &[u8]) {
        if let Some(old) = self.large_value(k) {
            parts::remove_parts(&mut self.batch, k, old.gen, old.parts);
            self.large_changes.insert(k.to_vec(), None);
        }
        self.batch.remove(k);
    }

    /// Writes the changed chunks and the seq high-water mark into the batch.
    fn finish(mut self, through: Ticket) -> Built {
        for (key, chunk) in self.view.dirty {
            match chunk {
                Some(entries) => self
                    .batch
                    .insert(&log_key(key)[..], chunk::encode(&entries)),
                None => self.batch.remove(&log_key(key)[..]),
            }
        }
        if let Some(max) = self.max_appended {
            // High-water mark in the same atomic batch: seqs are never reused, even if the
            // tail is deleted later.
            self.batch
                .insert(KEY_NEXT_SEQ, &(max + 1).to_be_bytes()[..]);
        }
        Built {
            batch: self.batch,
            through,
            ops: self.ops,
            d_len: self.d_len,
            d_bytes: self.d_bytes,
            touched_log: self.touched_log,
            large: self.large_changes,
            next_gen: self.next_gen,
            written_parts: self.written_parts,
        }
    }
}

fn publish(shared: &Shared, engine: &Engine, b: &Built, failures: u32, in_hand: &mut u64) {
    if b.touched_log {
        let (first_seq, last_seq) = log_bounds(&engine.tree, shared.chunked_from);
        let mut c = lock(&shared.counters);
        c.len = (c.len as i64 + b.d_len).max(0) as u64;
        c.bytes = (c.bytes as i64 + b.d_bytes).max(0) as u64;
        c.first_seq = first_seq;
        c.last_seq = last_seq;
    }
    if failures > 0 {
        info!(
            after_failures = failures,
            "store commit succeeded again; acknowledgements resume"
        );
    }
    // Before the watch: a router woken by this update sees the bytes gone.
    shared
        .pending_bytes
        .fetch_sub(std::mem::take(in_hand), Ordering::SeqCst);
    // Watch first: whoever wakes from `wait_durable` sees the watch already updated.
    shared.watch_tx.send_modify(|d| {
        d.durable_through = b.through;
        d.error = None;
        d.commits += 1;
        d.last_batch_ops = b.ops;
    });
    {
        let mut d = lock(&shared.durable);
        d.0 = b.through;
        d.1 = None;
    }
    shared.durable_cv.notify_all();
}

/// Drops the engine (waiting for readers to let go of it and for sled to release its
/// directory lock) and opens it again.
fn reopen(shared: &Shared) -> Result<(), StoreError> {
    let mut slot = write_lock(&shared.engine);
    let deadline = Instant::now() + Duration::from_secs(5);
    if let Some(engine) = slot.take() {
        if let Err(still_shared) = wait_unique(engine, deadline) {
            *slot = Some(still_shared);
            return Err(StoreError::Unavailable(
                "readers still hold the old engine".into(),
            ));
        }
    }
    wait_until_unlocked(&shared.cfg.dir.join("db"), deadline)?;
    let engine = Engine::open(&shared.cfg)?;
    *slot = Some(Arc::new(engine));
    Ok(())
}
