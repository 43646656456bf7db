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
//!
//! Layout: one format byte ([`CHUNK_V1`]), then per entry: LEB128 seq delta (0 for the first
//! entry, whose seq is the key; then the distance from the previous entry, >= 1), LEB128
//! length, the record's bytes. Decoding never panics: corrupt input is an error.

use bytes::Bytes;

use super::Seq;

pub(crate) const CHUNK_V1: u8 = 0xC1;

/// A chunk stops taking entries once its encoding would exceed this. Bigger chunks mean fewer
/// sled pages (less per-page memory: ~0.2 MiB per million 64-byte messages at this size), but
/// a leaf holds up to 16 of them and sled's cache keeps at least one leaf per shard (256
/// shards), so its floor is 256 leaves: 8 MiB at 2 KiB chunks, 25 MiB at 6 KiB. Rewriting the
/// last chunk on every commit of a trickle also costs up to this much write per commit. A
/// single record larger than this gets a chunk of its own.
pub(crate) const CHUNK_TARGET_BYTES: usize = 2 * 1024;

/// Entries of one chunk, ascending by seq.
pub(crate) type Entries = Vec<(Seq, Bytes)>;

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

/// Size of the chunk `encode` would produce for `entries`.
pub(crate) fn encoded_len(entries: &[(Seq, Bytes)]) -> usize {
    let mut prev = entries.first().map_or(0, |e| e.0);
    1 + entries
        .iter()
        .map(|(seq, v)| {
            let n = varint_len(seq - prev) + varint_len(v.len() as u64) + v.len();
            prev = *seq;
            n
        })
        .sum::<usize>()
}

/// Bytes an entry adds when appended after `prev_seq`.
pub(crate) fn entry_len(prev_seq: Seq, seq: Seq, len: usize) -> usize {
    varint_len(seq - prev_seq) + varint_len(len as u64) + len
}

/// Encodes `entries` (non-empty, ascending); the chunk's key is `entries[0].0`.
pub(crate) fn encode(entries: &[(Seq, Bytes)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(entries));
    out.push(CHUNK_V1);
    let mut prev = entries.first().map_or(0, |e| e.0);
    for (seq, v) in entries {
        put_varint(&mut out, seq - prev);
        put_varint(&mut out, v.len() as u64);
        out.extend_from_slice(v);
        prev = *seq;
    }
    out
}

/// Decodes the value stored under log key `key`. `value` is shared, not copied, by the
/// returned entries. `legacy` says the key predates chunks: the value is one raw record.
pub(crate) fn decode(key: Seq, value: Bytes, legacy: bool) -> Result<Entries, String> {
    if legacy {
        return Ok(vec![(key, value)]);
    }
    match value.first() {
        Some(&CHUNK_V1) => {}
        Some(b) => return Err(format!("log chunk {key}: unknown format byte {b:#04x}")),
        None => return Err(format!("log chunk {key} is empty")),
    }
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
        let len = get_varint(&value, &mut pos).map_err(|e| format!("log chunk {key}: {e}"))?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&end| end <= value.len())
            .ok_or_else(|| {
                format!("log chunk {key}: entry of {len} bytes runs past the chunk's end")
            })?;
        entries.push((seq, value.slice(pos..end)));
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

    #[test]
    fn chunk_round_trip_with_gaps_and_sizes() {
        let entries: Entries = vec![
            (5, Bytes::from_static(b"")),
            (6, Bytes::from(vec![7u8; 200])),
            (1_000, Bytes::from_static(b"x")),
        ];
        let enc = encode(&entries);
        assert_eq!(enc.len(), encoded_len(&entries));
        assert_eq!(decode(5, Bytes::from(enc), false).unwrap(), entries);
    }

    #[test]
    fn chunk_legacy_value_is_one_entry() {
        let v = Bytes::from_static(&[1, 2, 3]);
        assert_eq!(decode(9, v.clone(), true).unwrap(), vec![(9, v)]);
    }

    #[test]
    fn chunk_corrupt_inputs_are_errors() {
        let good = encode(&[
            (1, Bytes::from_static(b"abc")),
            (2, Bytes::from_static(b"d")),
        ]);
        assert!(decode(1, Bytes::new(), false).is_err());
        assert!(decode(1, Bytes::from_static(&[0x01, 0, 1, 9]), false).is_err());
        // Only the format byte: no entry.
        assert!(decode(1, Bytes::from_static(&[CHUNK_V1]), false).is_err());
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
    }

    proptest! {
        #[test]
        fn chunk_round_trips(first in 0u64..u64::MAX / 2,
                             gaps in proptest::collection::vec((1u64..1_000_000, proptest::collection::vec(any::<u8>(), 0..300)), 1..40)) {
            let mut seq = first;
            let mut entries = Entries::new();
            for (i, (gap, v)) in gaps.into_iter().enumerate() {
                if i > 0 { seq += gap; }
                entries.push((seq, Bytes::from(v)));
            }
            let enc = encode(&entries);
            prop_assert_eq!(enc.len(), encoded_len(&entries));
            let mut total = 1;
            for w in 0..entries.len() {
                let prev = if w == 0 { entries[0].0 } else { entries[w - 1].0 };
                total += entry_len(prev, entries[w].0, entries[w].1.len());
            }
            prop_assert_eq!(total, enc.len());
            prop_assert_eq!(decode(first, Bytes::from(enc), false).unwrap(), entries);
        }

        #[test]
        fn chunk_decode_never_panics(key in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(key, Bytes::from(bytes), false);
        }
    }
}
