//! Log chunks: many log entries under one sled key.
//!
//! Why: sled 0.34 splits a leaf once it holds more than 16 keys and keeps a page-table entry
//! and cache bookkeeping in memory for every page, loaded or not. With one key per log entry
//! the daemon's memory grew by ~19 B for every message waiting on disk (80 MiB with 2 M
//! waiting). Packing consecutive entries into chunks of up to [`CHUNK_TARGET_BYTES`] makes
//! that cost per chunk, i.e. ~18x smaller for 64-byte sensor payloads.
//!
//! Invariants (kept by the writer, relied on by readers):
//! - A chunk's key is `L` + the seq of its **first** entry; entries inside a chunk are in
//!   strictly increasing seq order; chunks do not overlap, so the log in key order is the log
//!   in seq order.
//! - A chunk is never empty (an emptied chunk is removed).
//! - Only the last chunk grows, and only with entries of a later commit appended after its
//!   last one (the writer rewrites it whole, in the same atomic batch as the rest of the
//!   commit). Deleting entries at the front of a chunk re-keys it to its new first entry.
//! - Stores written before chunks existed hold one raw record per key: every log key below the
//!   store's `chunked_from` seq is such a legacy entry, read as a chunk of one.
//! - A record larger than [`MAX_INLINE_VALUE_BYTES`](super::MAX_INLINE_VALUE_BYTES) is not in
//!   its chunk: the chunk holds a **marker entry** (its logical length and part count) and the
//!   bytes are in parts under the `P` prefix ([`super::parts`]), written and removed in the
//!   same atomic batch as the marker. The writer gives each marker a chunk of its own and never
//!   appends to such a chunk (a policy, not something decoding relies on: a chunk may mix both).
//!
//! Layouts: one format byte, then one item per entry, each starting with a LEB128 seq delta
//! (0 for the first entry, whose seq is the key; then the distance from the previous entry,
//! >= 1).
//! - [`CHUNK_V1`] (only inline records, the format of every chunk without a marker, readable by
//!   older versions): delta, LEB128 length, the record's bytes.
//! - [`CHUNK_V2`] (at least one marker): delta, LEB128 `length << 1 | is_marker`, then the
//!   record's bytes for an inline record, or the LEB128 part count for a marker (>= 1, at
//!   most `length`: parts are never empty).
//!
//! Decoding never panics and never allocates by a length it read: corrupt input is an error.

use bytes::Bytes;

use super::types::Seq;

pub(crate) const CHUNK_V1: u8 = 0xC1;
pub(crate) const CHUNK_V2: u8 = 0xC2;

/// A chunk stops taking entries once its encoding would exceed this. Bigger chunks mean fewer
/// sled pages (less per-page memory: ~0.2 MiB per million 64-byte messages at this size), but
/// a leaf holds up to 16 of them and sled's cache keeps at least one leaf per shard (256
/// shards), so its floor is 256 leaves: 8 MiB at 2 KiB chunks, 25 MiB at 6 KiB. Rewriting the
/// last chunk on every commit of a trickle also costs up to this much write per commit. A
/// single record larger than this (and at most `MAX_INLINE_VALUE_BYTES`) gets a chunk of its
/// own.
pub(crate) const CHUNK_TARGET_BYTES: usize = 2 * 1024;

/// One log entry as a chunk holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// The record's bytes (a slice of the chunk).
    Inline(Bytes),
    /// A marker: the record (`len` bytes) is in `parts` parts (see [`super::parts`]).
    Parts { len: u64, parts: u32 },
}

impl Value {
    /// The record's logical length.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Value::Inline(b) => b.len() as u64,
            Value::Parts { len, .. } => *len,
        }
    }
    pub(crate) fn is_inline(&self) -> bool {
        matches!(self, Value::Inline(_))
    }
}

/// Entries of one chunk, ascending by seq.
pub(crate) type Entries = Vec<(Seq, Value)>;

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or_else(|| format!("chunk truncated in a varint at byte {}", *pos))?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return Err("chunk varint overflows 64 bits".into());
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("chunk varint longer than 10 bytes".into())
}

fn is_v2(entries: &[(Seq, Value)]) -> bool {
    entries.iter().any(|(_, v)| !v.is_inline())
}

/// Bytes of one entry after its seq delta, in the given format.
fn item_len(v: &Value, v2: bool) -> usize {
    match v {
        Value::Inline(b) if v2 => varint_len((b.len() as u64) << 1) + b.len(),
        Value::Inline(b) => varint_len(b.len() as u64) + b.len(),
        Value::Parts { len, parts } => varint_len(len << 1 | 1) + varint_len(u64::from(*parts)),
    }
}

/// Size of the chunk `encode` would produce for `entries`.
pub(crate) fn encoded_len(entries: &[(Seq, Value)]) -> usize {
    let v2 = is_v2(entries);
    let mut prev = entries.first().map_or(0, |e| e.0);
    1 + entries
        .iter()
        .map(|(seq, v)| {
            let n = varint_len(seq - prev) + item_len(v, v2);
            prev = *seq;
            n
        })
        .sum::<usize>()
}

/// Bytes an inline record adds when appended after `prev_seq` to a chunk of inline records.
pub(crate) fn entry_len(prev_seq: Seq, seq: Seq, len: usize) -> usize {
    varint_len(seq - prev_seq) + varint_len(len as u64) + len
}

/// Encodes `entries` (non-empty, ascending); the chunk's key is `entries[0].0`. V1 unless an
/// entry is a marker.
pub(crate) fn encode(entries: &[(Seq, Value)]) -> Vec<u8> {
    let v2 = is_v2(entries);
    let mut out = Vec::with_capacity(encoded_len(entries));
    out.push(if v2 { CHUNK_V2 } else { CHUNK_V1 });
    let mut prev = entries.first().map_or(0, |e| e.0);
    for (seq, v) in entries {
        put_varint(&mut out, seq - prev);
        match v {
            Value::Inline(b) => {
                put_varint(
                    &mut out,
                    if v2 {
                        (b.len() as u64) << 1
                    } else {
                        b.len() as u64
                    },
                );
                out.extend_from_slice(b);
            }
            Value::Parts { len, parts } => {
                put_varint(&mut out, len << 1 | 1);
                put_varint(&mut out, u64::from(*parts));
            }
        }
        prev = *seq;
    }
    out
}

/// Decodes the value stored under log key `key`. `value` is shared, not copied, by the
/// returned entries. `legacy` says the key predates chunks: the value is one raw record.
pub(crate) fn decode(key: Seq, value: Bytes, legacy: bool) -> Result<Entries, String> {
    if legacy {
        return Ok(vec![(key, Value::Inline(value))]);
    }
    let v2 = match value.first() {
        Some(&CHUNK_V1) => false,
        Some(&CHUNK_V2) => true,
        Some(b) => return Err(format!("log chunk {key}: unknown format byte {b:#04x}")),
        None => return Err(format!("log chunk {key} is empty")),
    };
    let mut pos = 1;
    let mut entries = Vec::new();
    let mut seq = key;
    while pos < value.len() {
        let delta = get_varint(&value, &mut pos).map_err(|e| format!("log chunk {key}: {e}"))?;
        if entries.is_empty() != (delta == 0) {
            return Err(format!(
                "log chunk {key}: entry {} has seq delta {delta}",
                entries.len()
            ));
        }
        seq = seq
            .checked_add(delta)
            .ok_or_else(|| format!("log chunk {key}: seq overflows"))?;
        let word = get_varint(&value, &mut pos).map_err(|e| format!("log chunk {key}: {e}"))?;
        let (len, marker) = if v2 {
            (word >> 1, word & 1 == 1)
        } else {
            (word, false)
        };
        if marker {
            let parts =
                get_varint(&value, &mut pos).map_err(|e| format!("log chunk {key}: {e}"))?;
            let parts = u32::try_from(parts)
                .ok()
                .filter(|&p| p >= 1 && u64::from(p) <= len)
                .ok_or_else(|| {
                    format!("log chunk {key}: entry {seq} of {len} bytes in {parts} parts")
                })?;
            entries.push((seq, Value::Parts { len, parts }));
            continue;
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&end| end <= value.len())
            .ok_or_else(|| {
                format!("log chunk {key}: entry of {len} bytes runs past the chunk's end")
            })?;
        entries.push((seq, Value::Inline(value.slice(pos..end))));
        pos = end;
    }
    if entries.is_empty() {
        return Err(format!("log chunk {key} holds no entry"));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inline(b: &'static [u8]) -> Value {
        Value::Inline(Bytes::from_static(b))
    }

    #[test]
    fn chunk_round_trip_with_gaps_and_sizes() {
        let entries: Entries = vec![
            (5, inline(b"")),
            (6, Value::Inline(Bytes::from(vec![7u8; 200]))),
            (1_000, inline(b"x")),
        ];
        let enc = encode(&entries);
        assert_eq!(enc[0], CHUNK_V1);
        assert_eq!(enc.len(), encoded_len(&entries));
        assert_eq!(decode(5, Bytes::from(enc), false).unwrap(), entries);
    }

    #[test]
    fn chunk_with_a_marker_is_v2_and_round_trips() {
        let alone: Entries = vec![(
            9,
            Value::Parts {
                len: 17 << 20,
                parts: 2_500,
            },
        )];
        let enc = encode(&alone);
        assert_eq!(enc[0], CHUNK_V2);
        assert_eq!(enc.len(), encoded_len(&alone));
        assert!(enc.len() < 10, "a marker is small: {} bytes", enc.len());
        assert_eq!(decode(9, Bytes::from(enc), false).unwrap(), alone);
        // Mixed (never written by this version, but decodable).
        let mixed: Entries = vec![
            (3, inline(b"abc")),
            (
                4,
                Value::Parts {
                    len: 70_000,
                    parts: 10,
                },
            ),
            (7, Value::Inline(Bytes::from(vec![1u8; 100]))),
        ];
        let enc = encode(&mixed);
        assert_eq!(enc.len(), encoded_len(&mixed));
        assert_eq!(decode(3, Bytes::from(enc), false).unwrap(), mixed);
    }

    #[test]
    fn chunk_legacy_value_is_one_entry() {
        let v = Bytes::from_static(&[1, 2, 3]);
        assert_eq!(
            decode(9, v.clone(), true).unwrap(),
            vec![(9, Value::Inline(v))]
        );
    }

    #[test]
    fn chunk_corrupt_inputs_are_errors() {
        let good = encode(&[(1, inline(b"abc")), (2, inline(b"d"))]);
        assert!(decode(1, Bytes::new(), false).is_err());
        assert!(decode(1, Bytes::from_static(&[0x01, 0, 1, 9]), false).is_err());
        // Only the format byte: no entry.
        assert!(decode(1, Bytes::from_static(&[CHUNK_V1]), false).is_err());
        assert!(decode(1, Bytes::from_static(&[CHUNK_V2]), false).is_err());
        // First entry with a non-zero delta; later entry with a zero delta.
        assert!(decode(1, Bytes::from_static(&[CHUNK_V1, 1, 0]), false).is_err());
        assert!(decode(1, Bytes::from_static(&[CHUNK_V1, 0, 0, 0, 0]), false).is_err());
        // Every truncation of a good chunk but the whole and the ones ending on an entry.
        for cut in 0..good.len() {
            let r = decode(1, Bytes::copy_from_slice(&good[..cut]), false);
            if cut == 6 {
                assert_eq!(r.unwrap().len(), 1);
            } else {
                assert!(r.is_err(), "cut at {cut}");
            }
        }
        // A length that points past the end, and an overlong varint.
        assert!(decode(
            1,
            Bytes::from_static(&[CHUNK_V1, 0, 0xff, 0xff, 0x03]),
            false
        )
        .is_err());
        assert!(decode(
            1,
            Bytes::from(vec![
                CHUNK_V1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            false
        )
        .is_err());
        // Markers: no part count, zero parts, more parts than bytes, a part count over u32.
        assert!(decode(1, Bytes::from_static(&[CHUNK_V2, 0, 21]), false).is_err());
        assert!(decode(1, Bytes::from_static(&[CHUNK_V2, 0, 21, 0]), false).is_err());
        assert!(decode(1, Bytes::from_static(&[CHUNK_V2, 0, 21, 11]), false).is_err());
        assert!(decode(
            1,
            Bytes::from_static(&[
                CHUNK_V2, 0, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x80, 0x80, 0x80, 0x80, 0x10
            ]),
            false
        )
        .is_err());
        assert_eq!(
            decode(1, Bytes::from_static(&[CHUNK_V2, 0, 21, 10]), false).unwrap(),
            vec![(1, Value::Parts { len: 10, parts: 10 })]
        );
    }

    fn value() -> impl Strategy<Value = Value> {
        let inline = proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|v| Value::Inline(Bytes::from(v)));
        let marker = (1u32..100_000, 0u64..1 << 40).prop_map(|(parts, extra)| Value::Parts {
            len: u64::from(parts) + extra,
            parts,
        });
        prop_oneof![3 => inline, 1 => marker]
    }

    proptest! {
        #[test]
        fn chunk_round_trips(first in 0u64..u64::MAX / 2,
                             gaps in proptest::collection::vec((1u64..1_000_000, value()), 1..40)) {
            let mut seq = first;
            let mut entries = Entries::new();
            for (i, (gap, v)) in gaps.into_iter().enumerate() {
                if i > 0 { seq += gap; }
                entries.push((seq, v));
            }
            let enc = encode(&entries);
            prop_assert_eq!(enc.len(), encoded_len(&entries));
            if entries.iter().all(|(_, v)| v.is_inline()) {
                prop_assert_eq!(enc[0], CHUNK_V1);
                let mut total = 1;
                for w in 0..entries.len() {
                    let prev = if w == 0 { entries[0].0 } else { entries[w - 1].0 };
                    total += entry_len(prev, entries[w].0, entries[w].1.len() as usize);
                }
                prop_assert_eq!(total, enc.len());
            }
            prop_assert_eq!(decode(first, Bytes::from(enc), false).unwrap(), entries);
        }

        #[test]
        fn chunk_decode_never_panics(key in any::<u64>(), v2 in any::<bool>(),
                                     bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = bytes;
            if let Some(first) = b.first_mut() {
                *first = if v2 { CHUNK_V2 } else { CHUNK_V1 };
            }
            let _ = decode(key, Bytes::from(b), false);
        }
    }
}
