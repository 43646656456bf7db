//! Opening a store directory: open sled, scan everything in it once (rebuilding the log
//! counters and the next seq, and checking that every key is one the store writes), and, if
//! the engine or the scan says the data is corrupt, move the directory aside and start empty.
//!
//! This is the "Corruption at open" part of the durability contract in `store/mod.rs`: only
//! damage moves a store aside, never a plain I/O error (a lock held elsewhere, permissions, a
//! full disk), since moving a healthy store aside would lose it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use super::engine::{
    log_key, touch_for_eviction, Engine, KEY_CHUNKED_FROM, KEY_MARKER, KEY_NEXT_SEQ, MARKER_VALUE,
    PREFIX_INTERNAL, PREFIX_LOG,
};
use super::read::decode_log_item;
use super::shared::Counters;
use super::types::{Keyspace, Recovery, Seq, StoreConfig, StoreError};
use super::{chunk, parts};

/// Opens or creates the store at `cfg.dir`, moving a corrupt one aside first (see the module
/// docs of `store`), and reports what it found.
pub(super) fn open(cfg: &StoreConfig) -> Result<(Engine, Scan, Recovery), StoreError> {
    let started = Instant::now();
    create_parent(&cfg.dir)?;
    let mut moved_aside = None;
    let (engine, scan) = match open_and_scan(cfg) {
        Ok(v) => v,
        Err(OpenFailure::Fatal(e)) => return Err(e),
        Err(OpenFailure::Corrupt(reason)) => {
            let aside = move_aside(&cfg.dir)?;
            error!(dir = %cfg.dir.display(), moved_to = %aside.display(), %reason,
                "store is corrupt: moved it aside and starting with an empty store");
            moved_aside = Some(aside);
            match open_and_scan(cfg) {
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
    Ok((engine, scan, recovery))
}

fn create_parent(dir: &Path) -> Result<(), StoreError> {
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::Io {
                what: "creating",
                path: parent.to_path_buf(),
                source,
            })?;
        }
    }
    Ok(())
}

enum OpenFailure {
    /// Move the directory aside and start empty.
    Corrupt(String),
    /// Return to the caller; the data may be fine.
    Fatal(StoreError),
}

pub(super) struct Scan {
    pub(super) counters: Counters,
    pub(super) next_seq: Seq,
    pub(super) has_marker: bool,
    pub(super) chunked_from: Seq,
    /// `false` for a new store and for one written before chunks: the key is written at open.
    pub(super) chunked_from_stored: bool,
    /// Keyspace keys (with prefix) whose values are stored in parts.
    pub(super) large: HashMap<Vec<u8>, parts::Large>,
    /// Gen for the next large keyspace value: above every gen in the store.
    pub(super) next_gen: u64,
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
    let stored_chunked_from = read_chunked_from(tree)?;
    let mut walk = Walk {
        tree,
        // A store without the key predates chunks: every log key in it is a raw record.
        chunked_from: stored_chunked_from.unwrap_or(Seq::MAX),
        counters: Counters::default(),
        hwm: 1,
        has_marker: false,
        parts: PartsCheck::default(),
        large: HashMap::new(),
        max_gen: 0,
    };
    for item in tree.iter() {
        let (k, v) = item.map_err(|e| format!("reading the store: {e}"))?;
        walk.visit(&k, v)?;
    }
    walk.parts.finish()?;
    let c = walk.counters;
    let next_seq = walk.hwm.max(c.last_seq.map_or(1, |s| s + 1));
    Ok(Scan {
        counters: c,
        next_seq,
        has_marker: walk.has_marker,
        // Everything from the next append on is written in chunks.
        chunked_from: stored_chunked_from.unwrap_or(next_seq),
        chunked_from_stored: stored_chunked_from.is_some(),
        large: walk.large,
        next_gen: walk.max_gen + 1,
    })
}

/// The stored [`KEY_CHUNKED_FROM`], if any.
fn read_chunked_from(tree: &sled::Tree) -> Result<Option<Seq>, String> {
    match tree
        .get(KEY_CHUNKED_FROM)
        .map_err(|e| format!("reading the store: {e}"))?
    {
        Some(v) => {
            Ok(Some(u64::from_be_bytes(v[..].try_into().map_err(
                |_| format!("chunked_from value of {} bytes", v.len()),
            )?)))
        }
        None => Ok(None),
    }
}

/// What [`scan_all`] has learnt so far, key by key in sled's order.
struct Walk<'a> {
    tree: &'a sled::Tree,
    chunked_from: Seq,
    counters: Counters,
    /// The largest stored next-seq high-water mark (1 if none).
    hwm: Seq,
    has_marker: bool,
    parts: PartsCheck,
    /// Keyspace keys (with prefix) whose values are stored in parts.
    large: HashMap<Vec<u8>, parts::Large>,
    max_gen: u64,
}

impl Walk<'_> {
    fn visit(&mut self, k: &sled::IVec, v: sled::IVec) -> Result<(), String> {
        match k.first() {
            Some(&PREFIX_LOG) => {
                touch_for_eviction(self.tree, k);
                self.log_chunk(k, v)?;
            }
            Some(&parts::PREFIX_PART) => {
                touch_for_eviction(self.tree, k);
                self.parts.part(k, &v)?;
            }
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_NEXT_SEQ => {
                let raw: [u8; 8] = v[..]
                    .try_into()
                    .map_err(|_| format!("next_seq value of {} bytes", v.len()))?;
                self.hwm = self.hwm.max(u64::from_be_bytes(raw));
            }
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_MARKER => self.has_marker = true,
            Some(&PREFIX_INTERNAL) if &k[..] == KEY_CHUNKED_FROM => {}
            Some(p) if Keyspace::ALL.iter().any(|s| s.prefix() == *p) => {
                match parts::decode_value(&v) {
                    Ok(parts::Stored::Small(_)) => {}
                    Ok(parts::Stored::Large(l)) => {
                        self.parts.name(k, l);
                        self.large.insert(k.to_vec(), l);
                        self.max_gen = self.max_gen.max(l.gen);
                    }
                    Err(e) => return Err(format!("key {:?}: {e}", &k[..k.len().min(24)])),
                }
            }
            _ => return Err(format!("unknown key {:?}", &k[..k.len().min(16)])),
        }
        Ok(())
    }

    /// Counts a log chunk's entries, which must follow the previous chunk's in seq order.
    fn log_chunk(&mut self, k: &[u8], v: sled::IVec) -> Result<(), String> {
        let c = &mut self.counters;
        let (_, entries) = decode_log_item(k, v, self.chunked_from).map_err(|e| e.to_string())?;
        for (seq, record) in &entries {
            if c.last_seq.is_some_and(|last| last >= *seq) {
                return Err(format!("log entry {seq} is out of order"));
            }
            c.len += 1;
            c.bytes += record.len();
            c.first_seq.get_or_insert(*seq);
            c.last_seq = Some(*seq);
            if let chunk::Value::Parts { len, parts } = *record {
                let large = parts::Large { gen: 0, len, parts };
                self.parts.name(&log_key(*seq), large);
            }
        }
        Ok(())
    }
}

/// Large values, by their parts' key without the index (owner and gen): what markers and
/// descriptors name, and what parts are present (count, bytes). Compared at the end (the
/// parts' `P` keys sort between the log and the keyspaces).
#[derive(Default)]
struct PartsCheck {
    named: HashMap<Vec<u8>, parts::Large>,
    found: HashMap<Vec<u8>, (u32, u64)>,
}

impl PartsCheck {
    /// A marker or descriptor of `owner` names the value `large`.
    fn name(&mut self, owner: &[u8], large: parts::Large) {
        let mut id = parts::part_key(owner, large.gen, 0);
        id.truncate(id.len() - 4);
        self.named.insert(id, large);
    }

    /// Part key `k` holds `v`: the parts of a value must come in order, none empty.
    fn part(&mut self, k: &[u8], v: &[u8]) -> Result<(), String> {
        let Some((_, _, index)) = parts::parse_part_key(k) else {
            return Err(format!("bad part key {:?}", &k[..k.len().min(24)]));
        };
        let value_id = &k[..k.len() - 4];
        let seen = match self.found.get_mut(value_id) {
            Some(seen) => seen,
            None => self.found.entry(value_id.to_vec()).or_insert((0, 0)),
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
        Ok(())
    }

    /// Every named value has exactly its parts, and no part belongs to no value.
    fn finish(mut self) -> Result<(), String> {
        for (value_id, l) in &self.named {
            match self.found.remove(value_id) {
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
        if let Some((value_id, (n, bytes))) = self.found.iter().next() {
            return Err(format!(
                "{} large values' parts belong to no log entry or key, e.g. {n} parts of {bytes} \
                 bytes under {:?}",
                self.found.len(),
                &value_id[..value_id.len().min(24)]
            ));
        }
        Ok(())
    }
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
pub(super) fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let t = crate::time::utc(secs);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}
