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

/// The wire form. Every number is an `i64` and every text a `&str`: one integer and one
/// string serializer instead of one per type saves about 1 KB of flash (docs/event-schema.md).
#[derive(Serialize)]
struct Wire<'a> {
    v: i64,
    device: &'a str,
    boot: i64,
    seq: i64,
    sensor: &'a str,
    value: i64,
    threshold: i64,
    direction: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<i64>,
}

/// Serialization failed: the buffer is too small (id or name too long for `MAX_EVENT_JSON`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EventTooLarge;

impl Event {
    /// Writes the JSON document into `buf` and returns its length.
    pub fn to_json(&self, device: &str, boot: u32, sensor: &str, buf: &mut [u8]) -> Result<usize, EventTooLarge> {
        let w = Wire {
            v: SCHEMA_VERSION as i64,
            device,
            boot: boot as i64,
            seq: self.seq as i64,
            sensor,
            value: self.value as i64,
            threshold: self.threshold as i64,
            direction: self.direction.as_str(),
            dropped: if self.dropped > 0 { Some(self.dropped as i64) } else { None },
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
