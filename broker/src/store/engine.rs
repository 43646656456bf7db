//! The storage engine underneath the store: the sled handle, the key layout of the one tree
//! everything lives in, and what it takes to make a commit durable and to let go of the
//! directory (flush, fsync of `<dir>/db` and of blob files, sled's `flock`).
//!
//! This is the only file that opens sled or syncs its files, so the durability contract in
//! `store/mod.rs` rests on [`Engine::make_durable`] and the release guarantee of shutdown and
//! reopen on [`wait_unique`] and [`wait_until_unlocked`]. It knows nothing of chunks, parts or
//! the writer: those build on the keys and the handle defined here.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::types::{Seq, StoreConfig, StoreError};

// Key layout: one tree, every key led by one byte naming what it belongs to (see the module
// docs of `store` for why one tree); parts use `P` (`parts.rs`), keyspaces their own bytes.
pub(super) const TREE_NAME: &[u8] = b"waystation.v1";
pub(super) const PREFIX_LOG: u8 = b'L';
pub(super) const PREFIX_INTERNAL: u8 = b'_';
pub(super) const KEY_NEXT_SEQ: &[u8] = b"_next_seq";
/// First seq written in chunks ([`chunk`](super::chunk)); log keys below it are single raw
/// records written before chunks existed. Set once, when a store is created or first opened by
/// this version.
pub(super) const KEY_CHUNKED_FROM: &[u8] = b"_chunked_from";
/// Written (and synced) when a store is created. sled opens a database file full of garbage as
/// an empty database without any error, so "the db file had data but the marker is gone" is
/// how such corruption is detected.
pub(super) const KEY_MARKER: &[u8] = b"_waystation_store";
pub(super) const MARKER_VALUE: &[u8] = b"1";

/// The open sled database and the file we fsync.
pub(crate) struct Engine {
    db: sled::Db,
    pub(super) tree: sled::Tree,
    db_file: File,
}

pub(super) fn log_key(seq: Seq) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PREFIX_LOG;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn parse_log_key(k: &[u8]) -> Option<Seq> {
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
pub(super) fn touch_for_eviction(tree: &sled::Tree, key: &[u8]) {
    for _ in 0..EVICTION_TOUCHES {
        // The value is not needed: only the access is.
        let _ = tree.get(key);
    }
}

impl Engine {
    /// Opens sled at `cfg.dir`. Errors are sled's or I/O on the db file.
    pub(super) fn open(cfg: &StoreConfig) -> Result<Engine, StoreError> {
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
    pub(super) fn make_durable(
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

/// How long [`Store::shutdown`](super::Store::shutdown) (and a reopen after a failed commit)
/// waits for sled to let go of the directory lock. Normally well under a millisecond; a
/// truncation job syncing on a busy disk can take longer.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for `engine` to be the last reference, then drops it (sled flushes and syncs on drop).
/// Returns the engine back if other references remain at `deadline`.
pub(super) fn wait_unique(mut engine: Arc<Engine>, deadline: Instant) -> Result<(), Arc<Engine>> {
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
pub(super) fn wait_until_unlocked(db_path: &Path, deadline: Instant) -> Result<(), StoreError> {
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
