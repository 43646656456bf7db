//! Large values: a log record or keyspace value longer than [`PART_BYTES`] is stored as
//! parts under their own keys.
//!
//! Why: sled 0.34 writes any log message (one inserted value, or the whole image of a page
//! when it rewrites one) larger than about a quarter of a segment (~128 KiB with the default
//! 512 KiB segments) to a blob file of its own, and rewrites a leaf (up to 16 keys, 17 just
//! before a split) whole when it consolidates it. Values of megabytes under one key, or leaves
//! full of 100 KiB values, therefore meant one blob file per write and per page rewrite, each
//! needing its own fsync. Split into parts of [`PART_BYTES`], every sled value and every leaf
//! image stays inline in the log (17 x 7 KiB + overhead < 128 KiB, checked below), whatever the
//! size of the value.
//!
//! Keys: `P` + owner length (u16 big-endian) + owner + gen (u64 big-endian) + part index (u32
//! big-endian, from 0), where the owner is the internal key of what the value belongs to:
//! `L` + seq for a log record (gen 0: a seq is never written twice within a run), or the
//! keyspace key (prefix byte + user key) for a keyspace value, whose gen is new for every
//! large `Put` (so a reader holding an old descriptor can never mix parts of two values: it
//! finds the old parts whole or not at all). The length prefix makes the parts of one value
//! contiguous in key order (no other owner's key can sort between them), in sled leaves of
//! their own: never in the log's chunk leaves, and the log's chunks never hold the bytes of
//! large records. Every part is non-empty; all but the last are [`PART_BYTES`] long (readers
//! only rely on the lengths adding up).
//!
//! Where the value says it is large:
//! - log: a marker entry in its chunk (`chunk::Value::Parts`);
//! - keyspace: the value stored under the key is a **descriptor**: [`VALUE_TAG`], 1, gen (u64
//!   BE), length (u64 BE), part count (u32 BE): 22 bytes. A small value whose first byte is
//!   [`VALUE_TAG`] is stored escaped as [`VALUE_TAG`], 0, value; any other small value is
//!   stored as it is, as before this format existed. (No value written by an earlier version
//!   starts with 0xFF: stored messages start with their format version 1, session records
//!   with a QoS 0-2 or nothing, bridge cursors with the top byte of a seq.)
//!
//! Parts are written in the same `sled::Batch` as their marker or descriptor, and removed in
//! the same batch as the entry or key they belong to, so a crash keeps all of a value or none.
//! The scan at open checks that the parts present are exactly the parts that markers and
//! descriptors name (see `scan_all`).

use std::borrow::Cow;

use super::engine::touch_for_eviction;
use super::types::{StoreError, MAX_VALUE_BYTES};

pub(crate) const PREFIX_PART: u8 = b'P';

/// Size of every part but a value's last. 7 KiB keeps a leaf full of parts (16 keys, 17 just
/// before a split) under sled's inline limit, so no part, and no page image of parts, ever
/// goes to a blob file (checked below). Measured here, 256 records of 1 MiB, 8 in flight:
///
/// | part size | MiB/s | blob files | RSS after |
/// |---|---|---|---|
/// | 7 KiB | 100-150 | 0 | 131 MB |
/// | 16 KiB | 60 | 1,451 | 138 MB |
/// | 32 KiB | 149 | 746 | 222 MB |
/// | 64 KiB | 186 | 383 | 270 MB |
///
/// Each blob file costs the writer one more fsync before the ack (cheap on this VM's disk,
/// milliseconds each on an SD card) and wears flash; larger parts also kept more in memory.
/// The price of small parts is more keys (2,341 for 16 MiB) and somewhat slower reads of
/// large records (650-820 MiB/s here, against ~870 with 32 KiB parts).
pub const PART_BYTES: usize = 7 * 1024;
/// Largest value stored under a single sled key; larger ones are split into parts of this size.
/// (Public as `store::MAX_INLINE_VALUE_BYTES`; defined here, beside the reasons for its size.)
pub const MAX_INLINE_VALUE_BYTES: usize = PART_BYTES;

/// sled 0.34's limit for a log message (a value, or a page image) kept inline in its log: a
/// quarter of a segment (512 KiB by default, and here) less the segment and message headers
/// (pagecache/logger.rs `reserve_inner`). Anything larger goes to a blob file of its own.
pub const SLED_INLINE_LIMIT_BYTES: usize = 512 * 1024 / 4 - 20 - 32;

/// A leaf holds at most 17 parts (sled splits leaves of more than 16 keys); allowing 128 B a
/// part for its key (24 B for a log record's, more for a keyspace key) and lengths, and 4 KiB
/// for the node's header and bounds, its image stays inline. (Keys near [`super::MAX_KEY_BYTES`]
/// could push a leaf of parts over it: sled then writes a blob file, which the writer syncs
/// like any other; nothing is lost, it is only slower.)
const _: () = assert!(17 * (PART_BYTES + 128) + 4096 <= SLED_INLINE_LIMIT_BYTES);

/// First byte of a keyspace value that is not stored as it is.
pub(crate) const VALUE_TAG: u8 = 0xFF;
const TAG_ESCAPED: u8 = 0;
const TAG_DESCRIPTOR: u8 = 1;
const DESCRIPTOR_LEN: usize = 2 + 8 + 8 + 4;

/// Where a large value's parts are and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Large {
    pub gen: u64,
    pub len: u64,
    pub parts: u32,
}

pub(crate) fn is_large(len: usize) -> bool {
    len > PART_BYTES
}

#[cfg(test)]
pub(crate) fn part_count(len: usize) -> u32 {
    len.div_ceil(PART_BYTES) as u32
}

/// Owners are internal keys: at most a prefix byte and [`super::MAX_KEY_BYTES`].
pub(crate) fn part_key(owner: &[u8], gen: u64, index: u32) -> Vec<u8> {
    debug_assert!(owner.len() <= usize::from(u16::MAX));
    let mut k = Vec::with_capacity(3 + owner.len() + 12);
    k.push(PREFIX_PART);
    k.extend_from_slice(&(owner.len() as u16).to_be_bytes());
    k.extend_from_slice(owner);
    k.extend_from_slice(&gen.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// `(owner, gen, index)` of a part key.
pub(crate) fn parse_part_key(k: &[u8]) -> Option<(&[u8], u64, u32)> {
    if k.first() != Some(&PREFIX_PART) || k.len() < 3 {
        return None;
    }
    let owner_len = usize::from(u16::from_be_bytes([k[1], k[2]]));
    if owner_len == 0 || k.len() != 3 + owner_len + 12 {
        return None;
    }
    let (owner, tail) = k[3..].split_at(owner_len);
    let gen = u64::from_be_bytes(tail[..8].try_into().ok()?);
    let index = u32::from_be_bytes(tail[8..].try_into().ok()?);
    Some((owner, gen, index))
}

/// Adds the parts of `value` to `batch`; returns how many.
pub(crate) fn insert_parts(batch: &mut sled::Batch, owner: &[u8], gen: u64, value: &[u8]) -> u32 {
    let mut n = 0u32;
    for part in value.chunks(PART_BYTES) {
        batch.insert(part_key(owner, gen, n), part);
        n += 1;
    }
    n
}

/// Makes sled account for the parts just written, as reads do (see [`touch_for_eviction`]).
pub(crate) fn touch_written(tree: &sled::Tree, owner: &[u8], gen: u64, parts: u32) {
    for i in 0..parts {
        touch_for_eviction(tree, &part_key(owner, gen, i));
    }
}

pub(crate) fn remove_parts(batch: &mut sled::Batch, owner: &[u8], gen: u64, parts: u32) {
    for i in 0..parts {
        batch.remove(part_key(owner, gen, i));
    }
}

/// Reads and joins the parts of a value. The outer error is sled's; the inner one says how the
/// parts on disk differ from what `large` names (the value was deleted or replaced while we
/// read, or the store is corrupt: the caller tells which). Never allocates by `large.len`
/// beyond [`MAX_VALUE_BYTES`].
pub(crate) fn fetch(
    tree: &sled::Tree,
    owner: &[u8],
    large: Large,
) -> Result<Result<Vec<u8>, String>, StoreError> {
    let cap = usize::try_from(large.len).map_or(MAX_VALUE_BYTES, |l| l.min(MAX_VALUE_BYTES));
    let mut out = Vec::with_capacity(cap);
    let mut next = 0u32;
    let range = part_key(owner, large.gen, 0)..=part_key(owner, large.gen, u32::MAX);
    for item in tree.range(range) {
        let (k, v) = item?;
        touch_for_eviction(tree, &k);
        // The range holds only this owner's parts of this gen (see the key layout).
        let index = parse_part_key(&k).map(|(_, _, i)| i);
        if index != Some(next) || next >= large.parts || v.is_empty() {
            return Ok(Err(format!(
                "part {index:?} found where part {next} of {} was expected",
                large.parts
            )));
        }
        if (out.len() + v.len()) as u64 > large.len {
            return Ok(Err(format!(
                "parts hold more than the {} bytes of the value",
                large.len
            )));
        }
        out.extend_from_slice(&v);
        next += 1;
    }
    if next != large.parts || out.len() as u64 != large.len {
        return Ok(Err(format!(
            "{next} of {} parts ({} of {} bytes) present",
            large.parts,
            out.len(),
            large.len
        )));
    }
    Ok(Ok(out))
}

/// A keyspace value as stored.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stored<'a> {
    /// The value itself (unescaped).
    Small(&'a [u8]),
    Large(Large),
}

pub(crate) fn decode_value(v: &[u8]) -> Result<Stored<'_>, String> {
    if v.first() != Some(&VALUE_TAG) {
        return Ok(Stored::Small(v));
    }
    match v.get(1) {
        Some(&TAG_ESCAPED) => Ok(Stored::Small(&v[2..])),
        Some(&TAG_DESCRIPTOR) if v.len() == DESCRIPTOR_LEN => {
            let gen = u64::from_be_bytes(v[2..10].try_into().map_err(|_| "descriptor")?);
            let len = u64::from_be_bytes(v[10..18].try_into().map_err(|_| "descriptor")?);
            let parts = u32::from_be_bytes(v[18..22].try_into().map_err(|_| "descriptor")?);
            if parts == 0 || u64::from(parts) > len {
                return Err(format!(
                    "large value descriptor: {len} bytes in {parts} parts"
                ));
            }
            Ok(Stored::Large(Large { gen, len, parts }))
        }
        tag => Err(format!(
            "value of {} bytes with tag {tag:?} is neither escaped nor a descriptor",
            v.len()
        )),
    }
}

/// What to store under the key for a small value.
pub(crate) fn encode_small(v: &[u8]) -> Cow<'_, [u8]> {
    if v.first() == Some(&VALUE_TAG) {
        let mut out = Vec::with_capacity(2 + v.len());
        out.extend_from_slice(&[VALUE_TAG, TAG_ESCAPED]);
        out.extend_from_slice(v);
        Cow::Owned(out)
    } else {
        Cow::Borrowed(v)
    }
}

pub(crate) fn encode_descriptor(large: Large) -> Vec<u8> {
    let mut out = Vec::with_capacity(DESCRIPTOR_LEN);
    out.extend_from_slice(&[VALUE_TAG, TAG_DESCRIPTOR]);
    out.extend_from_slice(&large.gen.to_be_bytes());
    out.extend_from_slice(&large.len.to_be_bytes());
    out.extend_from_slice(&large.parts.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_keys_parse_back() {
        let k = part_key(b"rsome/topic", 7, 3);
        assert_eq!(parse_part_key(&k), Some((&b"rsome/topic"[..], 7, 3)));
        assert_eq!(parse_part_key(&k[..k.len() - 1]), None);
        let mut long = k.clone();
        long.push(0);
        assert_eq!(parse_part_key(&long), None);
        assert_eq!(parse_part_key(b"P\x00\x00123456789012"), None);
        assert_eq!(parse_part_key(b"P"), None);
        assert_eq!(parse_part_key(b"Lxxxxxxxxxxxxxxx"), None);
        assert_eq!(part_count(PART_BYTES + 1), 2);
        assert_eq!(part_count(17 << 20), 2_487);
    }

    #[test]
    fn parts_values_escape_and_describe() {
        for v in [&b""[..], b"\x01abc", b"\xff", b"\xff\x01"] {
            let stored = encode_small(v);
            assert_eq!(decode_value(&stored), Ok(Stored::Small(v)));
        }
        let large = Large {
            gen: 9,
            len: 100_000,
            parts: 15,
        };
        assert_eq!(
            decode_value(&encode_descriptor(large)),
            Ok(Stored::Large(large))
        );
        assert!(decode_value(b"\xff\x02").is_err());
        assert!(decode_value(b"\xff").is_err());
        let mut bad = encode_descriptor(large);
        bad.pop();
        assert!(decode_value(&bad).is_err());
        let zero = encode_descriptor(Large { parts: 0, ..large });
        assert!(decode_value(&zero).is_err());
    }

    proptest! {
        #[test]
        fn parts_decode_value_never_panics(v in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut v = v;
            if let Some(f) = v.first_mut() { *f = VALUE_TAG; }
            let _ = decode_value(&v);
        }
    }
}
