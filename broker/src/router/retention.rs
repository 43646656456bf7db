//! What keeps the store within its bounds, run from the router's housekeeping tick and after
//! each submission: `max_bytes` (drop_oldest or reject_new), `max_age`, the bounded-ingest
//! gate (`max_pending_bytes`), and the status snapshot the HTTP endpoints read.

use super::*;

/// Most log bytes one retention pass (`max_bytes` drop_oldest, `max_age`) deletes; the rest
/// goes at the next housekeeping tick (every 200 ms, so up to 80 MiB/s). sled loads every
/// leaf a batch deletes from and keeps it until the batch is applied: one commit deleting
/// 256 MiB of the log cost ~1.1 GB of memory here, after a long outage `max_age` could reach
/// that much at once.
const RETENTION_DELETE_MAX_BYTES: u64 = 16 << 20;

impl Router {
    /// Bounded ingest: QoS 0 publishers never wait for an ack, and a pipelining QoS 1
    /// client need not, so without this a flood would queue without bound in front of the
    /// disk. Over `max_pending_bytes` the connections stop reading from publishers (the
    /// socket back-pressures them, as for a full store); at half of it they resume. Checked
    /// after each submission and each commit.
    pub(super) fn check_pending_bytes(&mut self) {
        let Some(durable) = &self.durable else { return };
        let pending = durable.store.pending_bytes();
        let cap = durable.storage.max_pending_bytes;
        let backlog = if self.ingest_backlog {
            pending > cap / 2
        } else {
            pending > cap
        };
        if backlog != self.ingest_backlog {
            self.ingest_backlog = backlog;
            if backlog {
                self.stats.ingest_pauses.fetch_add(1, Ordering::Relaxed);
                debug!(
                    pending_bytes = pending,
                    max_pending_bytes = cap,
                    "writes pending over max_pending_bytes: publishers paused"
                );
            }
            self.update_ingest_gate();
        }
    }

    pub(super) fn update_ingest_gate(&self) {
        if let Some(durable) = &self.durable {
            let paused = self.storage_error.is_some() || self.storage_full || self.ingest_backlog;
            self.stats
                .ingest_paused
                .store(u64::from(paused), Ordering::Relaxed);
            durable
                .ingest_paused
                .send_if_modified(|p| std::mem::replace(p, paused) != paused);
        }
    }

    pub(super) fn housekeeping(&mut self) {
        self.wake_due_connections();
        self.check_storage_limits();
        self.expire_old_messages();
        self.expire_sessions();
        if let Some(ingest) = &mut self.pipeline {
            ingest.expire(unix_ms(), &mut self.batch_ops);
        }
        self.refresh_snapshot();
    }

    /// Wakes each quiet connection whose keep-alive ran out or whose read buffer is due
    /// back (`keep_alive.rs`): one pass over the sessions every housekeeping tick instead of
    /// a timer in every idle client's task (112 B each; issue 14). A keep-alive is so
    /// enforced within a tick of its 1.5x limit.
    fn wake_due_connections(&self) {
        let now = crate::keep_alive::now_ms();
        for online in self.sessions.values().filter_map(|s| s.online.as_ref()) {
            online.outbox.wake_if_due(now);
        }
    }

    pub(super) fn refresh_snapshot(&self) {
        // Shared with the router's map, not copied: a client that publishes gets its own copy
        // at its next PUBLISH (`Arc::make_mut`), an idle one never does (issue 14).
        let mut clients: Vec<Arc<ClientInfo>> = self.clients.values().cloned().collect();
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let snapshot = RouterSnapshot {
            clients,
            sessions: self.sessions.len(),
            offline_sessions: self
                .sessions
                .values()
                .filter(|s| s.online.is_none())
                .count(),
            queued_messages: self.sessions.values().map(|s| s.waiting()).sum(),
            subscriptions: self.subscriptions.len() + self.shared.len(),
            retained: self.retained.len(),
            pending_acks: self.pending_acks.len(),
            storage_error: self.storage_error.clone(),
            storage_full: self.storage_full,
            taken_at_ms: unix_ms(),
        };
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }

    /// `[storage] max_bytes`: drop the oldest log entries, or pause publishers until the
    /// bridges make room. Logical bytes as the store counts them, never file sizes.
    pub(super) fn check_storage_limits(&mut self) {
        let Some(durable) = &self.durable else { return };
        let store = durable.store.clone();
        let max_bytes = durable.storage.max_bytes;
        let on_full = durable.storage.on_full;
        let stats = store.log_stats();
        match on_full {
            OnFull::RejectNew => {
                let full = stats.bytes >= max_bytes;
                if full != self.storage_full {
                    if full {
                        warn!(log_bytes = stats.bytes, max_bytes, "store full (reject_new): publishers paused until bridges forward the backlog");
                    } else {
                        info!(
                            log_bytes = stats.bytes,
                            "store has room again: publishers resumed"
                        );
                    }
                    self.storage_full = full;
                    self.update_ingest_gate();
                }
            }
            OnFull::DropOldest => {
                let (bytes, from) = self.log_after_pending_drops(&stats);
                if bytes <= max_bytes {
                    return;
                }
                let mut excess = bytes - max_bytes;
                let mut from = from;
                let mut last = None;
                let mut dropped = 0u64;
                let mut freed = 0u64;
                while excess > 0 && freed < RETENTION_DELETE_MAX_BYTES {
                    let entries = match store.read_log(from, 1024) {
                        Ok(e) if !e.is_empty() => e,
                        Ok(_) => break,
                        Err(e) => {
                            retention_read_failed("on_full = drop_oldest", &e);
                            break;
                        }
                    };
                    for (seq, record) in entries {
                        from = seq + 1;
                        last = Some(seq);
                        dropped += 1;
                        freed += record.len() as u64;
                        excess = excess.saturating_sub(record.len() as u64);
                        if excess == 0 {
                            break;
                        }
                    }
                }
                if let Some(last) = last {
                    if store.submit(vec![Op::DeleteLogThrough(last)]).is_ok() {
                        self.note_pending_drop(last, freed);
                        self.stats
                            .dropped_storage_full
                            .fetch_add(dropped, Ordering::Relaxed);
                        warn!(
                            dropped,
                            max_bytes,
                            "store full (drop_oldest): oldest unforwarded messages dropped"
                        );
                    }
                }
            }
        }
    }

    /// The log's bytes and first seq as they will be once our pending drops are committed.
    pub(super) fn log_after_pending_drops(&mut self, stats: &crate::store::LogStats) -> (u64, u64) {
        let first = stats.first_seq.unwrap_or(0);
        match self.pending_drop {
            Some((through, bytes)) if first <= through => {
                (stats.bytes.saturating_sub(bytes), through + 1)
            }
            _ => {
                self.pending_drop = None;
                (stats.bytes, first)
            }
        }
    }

    pub(super) fn note_pending_drop(&mut self, through: u64, bytes: u64) {
        self.pending_drop = Some(match self.pending_drop {
            Some((_, earlier)) => (through, earlier + bytes),
            None => (through, bytes),
        });
    }

    /// `[storage] max_age`: unforwarded messages older than this are dropped and counted.
    pub(super) fn expire_old_messages(&mut self) {
        let Some(durable) = &self.durable else { return };
        let Some(max_age) = durable.storage.max_age else {
            return;
        };
        let store = durable.store.clone();
        let stats = store.log_stats();
        let Some(oldest) = stats.oldest_received_at_ms else {
            return;
        };
        let cutoff = unix_ms().saturating_sub(max_age.as_millis() as u64);
        if oldest >= cutoff {
            return;
        }
        let (_, mut from) = self.log_after_pending_drops(&stats);
        let mut last = None;
        let mut dropped = 0u64;
        let mut freed = 0u64;
        'scan: while freed < RETENTION_DELETE_MAX_BYTES {
            let entries = match store.read_log(from, 1024) {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => break,
                Err(e) => {
                    retention_read_failed("max_age", &e);
                    break;
                }
            };
            for (seq, bytes) in entries {
                from = seq + 1;
                match StoredMessage::decode(&bytes) {
                    Ok(m) if m.received_at_ms >= cutoff => break 'scan,
                    Ok(_) => dropped += 1,
                    Err(e) => {
                        // Its age is unknown and no bridge could forward it either: dropped
                        // with the expired ones, but as what it is.
                        error!(seq, len = bytes.len(), error = %e, "log record does not decode: dropped");
                        crate::stats::STORE_FAULTS.record(
                            crate::stats::StoreFault::CorruptRecord,
                            format!("log record {seq} ({} bytes): {e}", bytes.len()),
                        );
                    }
                }
                last = Some(seq);
                freed += bytes.len() as u64;
            }
        }
        if let Some(last) = last {
            if store.submit(vec![Op::DeleteLogThrough(last)]).is_ok() {
                self.note_pending_drop(last, freed);
                self.stats
                    .dropped_expired
                    .fetch_add(dropped, Ordering::Relaxed);
                warn!(
                    dropped,
                    max_age_secs = max_age.as_secs(),
                    "messages older than max_age dropped"
                );
            }
        }
    }
}

/// A retention scan could not read the log: it stops here and runs again at the next
/// housekeeping tick (200 ms); the operator hears of it.
fn retention_read_failed(scan: &str, e: &crate::store::StoreError) {
    error!(scan, error = %e, "reading the log for a retention scan failed; retrying at the next tick");
    crate::stats::STORE_FAULTS.record(
        crate::stats::StoreFault::ReadError,
        format!("{scan} scan: {e}"),
    );
}
