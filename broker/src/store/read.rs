//! Reading stored values back: a log key/value pair decoded into its chunk's entries, a log
//! record or keyspace value joined from its parts, and the bounds of the log.
//!
//! Used by the public reads in `store/mod.rs`, by the scan at open (`recovery.rs`) and by the
//! writer (which decodes the chunks it rewrites), so it lives beside them rather than in any
//! of them. sled's iterators are not snapshots, which is why a read that finds a large value
//! incomplete looks again before it calls the store corrupt.

use bytes::Bytes;

use super::chunk;
use super::engine::{log_key, parse_log_key};
use super::parts;
use super::types::{Seq, StoreError};

/// Decodes one log key/value pair from sled into its chunk key and entries.
pub(super) fn decode_log_item(
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
pub(super) fn log_record(
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
pub(super) fn keyspace_value(
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
pub(super) fn log_bounds(tree: &sled::Tree, chunked_from: Seq) -> (Option<Seq>, Option<Seq>) {
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
