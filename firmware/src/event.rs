//! The event, schema version 1 (docs/event-schema.md). `(device, boot, seq)` identifies an event.
//!
//! On the device the JSON is written by a small hand-written writer ([`Event::to_json`]), not by
//! `serde-json-core`: the generic serializer and its formatting cost ~900 bytes of the 8 KiB
//! flash budget, the writer ~250. The output is byte for byte what `serde_json` and
//! `serde-json-core` make of [`EventDocument`], which keeps `#[derive(Serialize)]` for host tools
//! (property-tested below). No escaping is ever needed: the only strings are the device id and
//! sensor name (checked to be `[A-Za-z0-9._-]`) and the direction.

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

/// The whole event document, for serde (host tools, tests): serializing it with any serde JSON
/// serializer gives the same bytes as [`Event::to_json`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub struct EventDocument<'a> {
    pub v: u32,
    pub device: &'a str,
    pub boot: u32,
    pub seq: u32,
    pub sensor: &'a str,
    pub value: i32,
    pub threshold: i32,
    pub direction: Direction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u32>,
}

/// 1..=23 bytes of `[A-Za-z0-9._-]`: a valid device id or sensor name (a topic level that
/// needs no JSON escaping).
pub(crate) fn valid_token(s: &str) -> bool {
    (1..=MAX_DEVICE_ID).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Serialization failed: the buffer is too small (id or name too long for `MAX_EVENT_JSON`), or
/// the id or sensor name is not 1..=23 bytes of `[A-Za-z0-9._-]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EventTooLarge;

/// Appends to a fixed buffer; a write that does not fit marks the output as failed.
struct Json<'a> {
    buf: &'a mut [u8],
    at: usize,
    ok: bool,
}

impl Json<'_> {
    fn raw(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.at..self.at.wrapping_add(b.len())) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.at += b.len();
            }
            None => self.ok = false,
        }
    }
    /// `text` then a decimal integer (`-` first when `neg`), from 32-bit division only (the
    /// Cortex-M3 divides in hardware; 64-bit division would link ~1 KB of helpers).
    fn num(&mut self, text: &[u8], neg: bool, mut v: u32) {
        self.raw(text);
        if neg {
            self.raw(b"-");
        }
        let mut d = [0u8; 10];
        let mut i = d.len();
        for slot in d.iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
            i -= 1;
            if v == 0 {
                break;
            }
        }
        self.raw(d.get(i..).unwrap_or_default());
    }
    fn int(&mut self, text: &[u8], v: i32) {
        self.num(text, v < 0, v.unsigned_abs())
    }
}

impl Event {
    /// The document as a serde type (for host tools; the device uses [`Event::to_json`]).
    pub fn document<'a>(&self, device: &'a str, boot: u32, sensor: &'a str) -> EventDocument<'a> {
        EventDocument {
            v: SCHEMA_VERSION as u32,
            device,
            boot,
            seq: self.seq,
            sensor,
            value: self.value,
            threshold: self.threshold,
            direction: self.direction,
            dropped: if self.dropped > 0 {
                Some(self.dropped)
            } else {
                None
            },
        }
    }

    /// Writes the JSON document into `buf` and returns its length: the fields in the order of
    /// [`EventDocument`], no whitespace, `dropped` only when non-zero.
    pub fn to_json(
        &self,
        device: &str,
        boot: u32,
        sensor: &str,
        buf: &mut [u8],
    ) -> Result<usize, EventTooLarge> {
        if !valid_token(device) || !valid_token(sensor) {
            return Err(EventTooLarge);
        }
        let mut j = Json {
            buf,
            at: 0,
            ok: true,
        };
        j.raw(b"{\"v\":1,\"device\":\"");
        j.raw(device.as_bytes());
        j.num(b"\",\"boot\":", false, boot);
        j.num(b",\"seq\":", false, self.seq);
        j.raw(b",\"sensor\":\"");
        j.raw(sensor.as_bytes());
        j.int(b"\",\"value\":", self.value);
        j.int(b",\"threshold\":", self.threshold);
        j.raw(b",\"direction\":\"");
        j.raw(self.direction.as_str().as_bytes());
        if self.dropped > 0 {
            j.num(b"\",\"dropped\":", false, self.dropped);
            j.raw(b"}");
        } else {
            j.raw(b"\"}");
        }
        if j.ok {
            Ok(j.at)
        } else {
            Err(EventTooLarge)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_json() {
        let e = Event {
            seq: 7,
            value: -1250,
            threshold: 0,
            direction: Direction::Falling,
            dropped: 0,
        };
        let mut buf = [0u8; MAX_EVENT_JSON];
        let n = e.to_json("dev-1", 3, "temp", &mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"v":1,"device":"dev-1","boot":3,"seq":7,"sensor":"temp","value":-1250,"threshold":0,"direction":"falling"}"#
        );
        let e = Event {
            seq: 8,
            value: 30001,
            threshold: 30000,
            direction: Direction::Rising,
            dropped: 2,
        };
        let n = e.to_json("dev-1", 3, "temp", &mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"v":1,"device":"dev-1","boot":3,"seq":8,"sensor":"temp","value":30001,"threshold":30000,"direction":"rising","dropped":2}"#
        );
    }

    /// Byte for byte the document `serde_json` and `serde-json-core` (which the device used before
    /// this hand-written writer) make of [`EventDocument`], for any valid identifiers and values;
    /// and the schema of docs/event-schema.md. Invalid identifiers are refused.
    #[test]
    fn same_as_serde_json() {
        use proptest::prelude::*;
        let mut runner =
            proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(2000));
        let values = (
            any::<u32>(),
            any::<u32>(),
            any::<i32>(),
            any::<i32>(),
            0u8..3,
            prop_oneof![Just(0u32), any::<u32>()],
        );
        runner
            .run(
                &("[A-Za-z0-9._-]{1,23}", "[A-Za-z0-9._-]{1,15}", values),
                |(id, name, (boot, seq, value, threshold, dir, dropped))| {
                    let direction =
                        [Direction::Rising, Direction::Falling, Direction::Heartbeat][dir as usize];
                    let e = Event {
                        seq,
                        value,
                        threshold,
                        direction,
                        dropped,
                    };
                    let mut buf = [0u8; MAX_EVENT_JSON];
                    let n = e.to_json(&id, boot, &name, &mut buf).unwrap();
                    let doc = e.document(&id, boot, &name);
                    let serde = serde_json::to_vec(&doc).unwrap();
                    prop_assert_eq!(
                        core::str::from_utf8(&buf[..n]).unwrap(),
                        core::str::from_utf8(&serde).unwrap()
                    );
                    let mut core_buf = [0u8; MAX_EVENT_JSON];
                    let m = serde_json_core::to_slice(&doc, &mut core_buf).unwrap();
                    prop_assert_eq!(&buf[..n], &core_buf[..m]);
                    let mut want = serde_json::json!({
                        "v": 1, "device": id, "boot": boot, "seq": seq, "sensor": name,
                        "value": value, "threshold": threshold, "direction": direction.as_str(),
                    });
                    if dropped > 0 {
                        want["dropped"] = serde_json::json!(dropped);
                    }
                    let got: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
                    prop_assert_eq!(got, want);
                    Ok(())
                },
            )
            .unwrap();
        let e = Event {
            seq: 1,
            value: 0,
            threshold: 0,
            direction: Direction::Rising,
            dropped: 0,
        };
        let mut buf = [0u8; MAX_EVENT_JSON];
        for bad in [
            "",
            "a\"b",
            "a/b",
            "x y",
            "é",
            &"x".repeat(MAX_DEVICE_ID + 1),
        ] {
            assert_eq!(
                e.to_json(bad, 1, "temp", &mut buf),
                Err(EventTooLarge),
                "{bad:?}"
            );
            assert_eq!(
                e.to_json("dev", 1, bad, &mut buf),
                Err(EventTooLarge),
                "{bad:?}"
            );
        }
        assert!(e
            .to_json(&"x".repeat(MAX_DEVICE_ID), 1, "temp", &mut buf)
            .is_ok());
    }

    /// Every buffer too small for the document is refused, never overrun or cut short.
    #[test]
    fn short_buffers_are_refused() {
        let e = Event {
            seq: 8,
            value: -30001,
            threshold: 30000,
            direction: Direction::Rising,
            dropped: 2,
        };
        let mut full = [0u8; MAX_EVENT_JSON];
        let n = e.to_json("dev-1", 3, "temp", &mut full).unwrap();
        for len in 0..n {
            let mut buf = vec![0u8; len];
            assert_eq!(
                e.to_json("dev-1", 3, "temp", &mut buf),
                Err(EventTooLarge),
                "{len}"
            );
        }
    }

    #[test]
    fn worst_case_fits() {
        let e = Event {
            seq: u32::MAX,
            value: i32::MIN,
            threshold: i32::MIN,
            direction: Direction::Heartbeat,
            dropped: u32::MAX,
        };
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
