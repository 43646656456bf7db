//! Large, checkable payloads for the large-message and power-cut tests: every payload is
//! distinct and every byte of a received copy can be compared with what was sent.

use std::hash::Hasher;

/// `"big:<seq>:<len>:"` then a xorshift stream seeded from `seq`, `len` bytes in all.
pub fn big_payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p = format!("big:{seq}:{len}:").into_bytes();
    assert!(
        p.len() <= len,
        "payload of {len} bytes too short for its header"
    );
    p.reserve(len - p.len());
    let mut x =
        0x9E37_79B9_7F4A_7C15u64 ^ (seq.wrapping_add(1)).wrapping_mul(0xD1B5_4A32_D192_ED03);
    while p.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (len - p.len()).min(8);
        p.extend_from_slice(&x.to_le_bytes()[..n]);
    }
    p
}

/// `(seq, len)` from a payload's header.
pub fn parse_header(payload: &[u8]) -> Option<(u64, usize)> {
    let head = &payload[..payload.len().min(48)];
    let mut it = head.split(|b| *b == b':');
    if it.next()? != b"big" {
        return None;
    }
    let seq = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    let len = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    Some((seq, len))
}

/// A short fingerprint of `bytes`, for messages about payloads too large to print.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}
