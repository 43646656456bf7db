//! State shared between the [`Store`](super::Store) handles and the writer thread: what a
//! submission looks like once it has its seqs and ticket, the log counters, the engine slot the
//! writer swaps on reopen, and the durability published to waiters.
//!
//! It sits below both `store/mod.rs` (which fills it on `submit` and reads it) and `writer.rs`
//! (which drains it and publishes commits), so neither has to import the other's internals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::watch;

use super::engine::Engine;
use super::types::{Durability, Seq, StoreConfig, StoreError, Ticket};

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
    pub(super) ticket: Ticket,
    pub(super) ops: Vec<WriteOp>,
    /// Counted in [`Shared::pending_bytes`] until published durable or dropped.
    pub(super) bytes: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(super) len: u64,
    pub(super) bytes: u64,
    pub(super) first_seq: Option<Seq>,
    pub(super) last_seq: Option<Seq>,
}

pub(crate) struct Shared {
    pub(super) cfg: StoreConfig,
    /// See [`KEY_CHUNKED_FROM`](super::engine::KEY_CHUNKED_FROM).
    pub(super) chunked_from: Seq,
    /// `None` only while the writer reopens sled after a failed commit.
    pub(super) engine: RwLock<Option<Arc<Engine>>>,
    pub(super) counters: Mutex<Counters>,
    pub(super) durable: Mutex<(Ticket, Option<String>)>,
    pub(super) durable_cv: Condvar,
    pub(super) watch_tx: watch::Sender<Durability>,
    pub(super) closing: AtomicBool,
    /// Set once `close` has taken the engine out for good: reads then fail with `Closed`.
    pub(super) released: AtomicBool,
    /// Set by the writer if it exits with operations it could not commit.
    pub(super) writer_failure: Mutex<Option<String>>,
    /// See [`Store::pending_bytes`](super::Store::pending_bytes).
    pub(super) pending_bytes: AtomicU64,
    /// Seqs, tickets and the channel to the writer, which takes `tx` away if it dies.
    pub(super) submit: Mutex<SubmitState>,
    /// Test hook: the next N commit attempts fail as if the disk were full.
    #[cfg(test)]
    pub(super) fail_commits: std::sync::atomic::AtomicU32,
    /// Test hook: the writer panics at its next commit.
    #[cfg(test)]
    pub(super) panic_writer: AtomicBool,
}

impl Shared {
    /// The state of a store just opened: nothing submitted yet, the counters and next seq as
    /// the scan at open found them, and `tx` the writer's channel.
    pub(super) fn new(
        cfg: StoreConfig,
        engine: Engine,
        chunked_from: Seq,
        counters: Counters,
        next_seq: Seq,
        tx: mpsc::Sender<Submission>,
    ) -> Shared {
        let (watch_tx, _) = watch::channel(Durability::default());
        Shared {
            cfg,
            chunked_from,
            engine: RwLock::new(Some(Arc::new(engine))),
            counters: Mutex::new(counters),
            durable: Mutex::new((0, None)),
            durable_cv: Condvar::new(),
            watch_tx,
            closing: AtomicBool::new(false),
            released: AtomicBool::new(false),
            writer_failure: Mutex::new(None),
            pending_bytes: AtomicU64::new(0),
            submit: Mutex::new(SubmitState {
                next_seq,
                next_ticket: 1,
                tx: Some(tx),
            }),
            #[cfg(test)]
            fail_commits: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            panic_writer: AtomicBool::new(false),
        }
    }

    pub(super) fn engine(&self) -> Result<Arc<Engine>, StoreError> {
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

pub(super) struct SubmitState {
    pub(super) next_seq: Seq,
    pub(super) next_ticket: Ticket,
    pub(super) tx: Option<mpsc::Sender<Submission>>,
}

/// Poison-tolerant lock: a panicking reader must not take the store down with it.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}
