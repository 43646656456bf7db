//! The event, schema version 1 (docs/event-schema.md), serialized as JSON with
//! `serde-json-core` into fixed-size buffers. `(device, boot, seq)` identifies an event.

use crate::detector::Direction;
use serde::Serialize;

/// The schema version written in `v`.
pub const SCHEMA_VERSION: u8 = 1;

/// Longest device id (the MQTT 3.1.1 client-id length every server must accept).
pub const MAX_DEVICE_ID: usize = 23;
/// Longest sensor name.
pub const MAX_SENSOR_NAME: usize = 15;
/// Upper bound of one serialized event with the longest id and name and extreme values.
pub const MAX_EVENT_JSON: usize = 224;

/// What the outbox keeps per event: everything but the per-device constants.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Event {
    pub seq: u32,
    pub value: i32,
    pub threshold: i32,
    pub direction: Direction,
    /// Events dropped from a full outbox before this one (0 is not written).
    pub dropped: u32,
}

/// The wire form. Numbers keep their 32-bit types: their serializers use the core's 32-bit
/// divide, where one `i64` serializer would pull in the 64-bit division helpers (~1 KB).
#[derive(Serialize)]
struct Wire<'a> {
    v: u32,
    device: Token<'a>,
    boot: u32,
    seq: u32,
    sensor: Token<'a>,
    value: i32,
    threshold: i32,
    direction: Token<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<u32>,
}

/// Longest [`Token`] text (the device id; sensor names and directions are shorter).
const MAX_TOKEN: usize = MAX_DEVICE_ID;

/// A string that needs no JSON escaping: 1..=[`MAX_TOKEN`] bytes of `[A-Za-z0-9._-]` (checked by
/// [`Event::to_json`]; ids and sensor names are topic levels of that alphabet anyway). It is
/// written as its quoted bytes through `serialize_bytes`, which serde-json-core emits verbatim,
/// instead of `serialize_str`, whose per-`char` escaping costs ~450 bytes of flash for strings
/// that can never need it. The output is the same JSON string (tested against `serde_json`).
struct Token<'a>(&'a str);

/// 1..=23 bytes of `[A-Za-z0-9._-]`: a valid device id or sensor name (a topic level that
/// needs no JSON escaping).
pub(crate) fn valid_token(s: &str) -> bool {
    (1..=MAX_TOKEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Serialize for Token<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b = self.0.as_bytes();
        let n = b.len().min(MAX_TOKEN);
        // Uninitialized, so the stack buffer is not cleared first (a `memclr` call otherwise).
        let mut q = core::mem::MaybeUninit::<[u8; MAX_TOKEN + 2]>::uninit();
        let p = q.as_mut_ptr().cast::<u8>();
        // SAFETY: `n + 2 <= MAX_TOKEN + 2`: the writes stay inside `q`, and the slice covers
        // exactly the `n + 2` bytes written here.
        let quoted = unsafe {
            p.write(b'"');
            core::ptr::copy_nonoverlapping(b.as_ptr(), p.add(1), n);
            p.add(n + 1).write(b'"');
            core::slice::from_raw_parts(p, n + 2)
        };
        s.serialize_bytes(quoted)
    }
}

/// Serialization failed: the buffer is too small (id or name too long for `MAX_EVENT_JSON`), or
/// the id or sensor name is not 1..=23 bytes of `[A-Za-z0-9._-]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EventTooLarge;

impl Event {
    /// Writes the JSON document into `buf` and returns its length.
    pub fn to_json(&self, device: &str, boot: u32, sensor: &str, buf: &mut [u8]) -> Result<usize, EventTooLarge> {
        if !valid_token(device) || !valid_token(sensor) {
            return Err(EventTooLarge);
        }
        let w = Wire {
            v: SCHEMA_VERSION as u32,
            device: Token(device),
            boot,
            seq: self.seq,
            sensor: Token(sensor),
            value: self.value,
            threshold: self.threshold,
            direction: Token(self.direction.as_str()),
            dropped: if self.dropped > 0 { Some(self.dropped) } else { None },
        };
        serde_json_core::to_slice(&w, buf).map_err(|_| EventTooLarge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_json() {
        let e = Event { seq: 7, value: -1250, threshold: 0, direction: Direction::Falling, dropped: 0 };
        let mut buf = [0u8; MAX_EVENT_JSON];
        let n = e.to_json("dev-1", 3, "temp", &mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"v":1,"device":"dev-1","boot":3,"seq":7,"sensor":"temp","value":-1250,"threshold":0,"direction":"falling"}"#
        );
        let e = Event { seq: 8, value: 30001, threshold: 30000, direction: Direction::Rising, dropped: 2 };
        let n = e.to_json("dev-1", 3, "temp", &mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"v":1,"device":"dev-1","boot":3,"seq":8,"sensor":"temp","value":30001,"threshold":30000,"direction":"rising","dropped":2}"#
        );
    }

    /// The same document as `serde_json` builds (with its ordinary string escaping) for any
    /// valid identifiers and values; invalid identifiers are refused.
    #[test]
    fn same_as_serde_json() {
        use proptest::prelude::*;
        let ident = "[A-Za-z0-9._-]{1,15}";
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&(ident, ident, any::<u32>(), any::<u32>(), any::<i32>(), any::<i32>(), 0u8..3, any::<u32>()), |(id, name, boot, seq, value, threshold, dir, dropped)| {
                let direction = [Direction::Rising, Direction::Falling, Direction::Heartbeat][dir as usize];
                let e = Event { seq, value, threshold, direction, dropped };
                let mut want = serde_json::json!({
                    "v": 1, "device": id, "boot": boot, "seq": seq, "sensor": name,
                    "value": value, "threshold": threshold, "direction": direction.as_str(),
                });
                if dropped > 0 {
                    want["dropped"] = serde_json::json!(dropped);
                }
                let mut buf = [0u8; MAX_EVENT_JSON];
                let n = e.to_json(&id, boot, &name, &mut buf).unwrap();
                let got: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
                prop_assert_eq!(got, want);
                Ok(())
            })
            .unwrap();
        let e = Event { seq: 1, value: 0, threshold: 0, direction: Direction::Rising, dropped: 0 };
        let mut buf = [0u8; MAX_EVENT_JSON];
        for bad in ["", "a\"b", "a/b", "x y", "é", &"x".repeat(MAX_DEVICE_ID + 1)] {
            assert_eq!(e.to_json(bad, 1, "temp", &mut buf), Err(EventTooLarge), "{bad:?}");
            assert_eq!(e.to_json("dev", 1, bad, &mut buf), Err(EventTooLarge), "{bad:?}");
        }
        assert!(e.to_json(&"x".repeat(MAX_DEVICE_ID), 1, "temp", &mut buf).is_ok());
    }

    #[test]
    fn worst_case_fits() {
        let e = Event { seq: u32::MAX, value: i32::MIN, threshold: i32::MIN, direction: Direction::Heartbeat, dropped: u32::MAX };
        let mut buf = [0u8; MAX_EVENT_JSON];
        let id = "x".repeat(MAX_DEVICE_ID);
        let name = "y".repeat(MAX_SENSOR_NAME);
        let n = e.to_json(&id, u32::MAX, &name, &mut buf).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(parsed["value"], i32::MIN);
        assert_eq!(parsed["dropped"], u32::MAX);
        let mut small = [0u8; 40];
        assert_eq!(e.to_json(&id, 1, &name, &mut small), Err(EventTooLarge));
    }
}
