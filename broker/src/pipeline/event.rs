//! The firmware's event schema, version 1 (docs/event-schema.md), checked on the way in, and
//! how an event's identity `(device, boot, seq)` is found in a JSON payload.
//!
//! Unknown fields are allowed (the schema lets version 1 grow optional fields); every field
//! the schema names must have its type and range. On the standard topic
//! `sensors/<device>/events` the payload's `device` must be that topic level.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

/// Why a message was refused; the label of `waystation_pipeline_invalid_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    NotJson,
    MissingField,
    WrongType,
    BadValue,
    UnknownVersion,
    DeviceMismatch,
    /// `dedup` is set but the payload does not say which event it is.
    NoEventId,
    /// A `json_schema` rule's schema refused it.
    SchemaViolation,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 8] = [
        InvalidReason::NotJson,
        InvalidReason::MissingField,
        InvalidReason::WrongType,
        InvalidReason::BadValue,
        InvalidReason::UnknownVersion,
        InvalidReason::DeviceMismatch,
        InvalidReason::NoEventId,
        InvalidReason::SchemaViolation,
    ];

    pub fn label(self) -> &'static str {
        match self {
            InvalidReason::NotJson => "not_json",
            InvalidReason::MissingField => "missing_field",
            InvalidReason::WrongType => "wrong_type",
            InvalidReason::BadValue => "bad_value",
            InvalidReason::UnknownVersion => "unknown_version",
            InvalidReason::DeviceMismatch => "device_mismatch",
            InvalidReason::NoEventId => "no_event_id",
            InvalidReason::SchemaViolation => "schema_violation",
        }
    }

    pub fn from_label(label: &str) -> Option<InvalidReason> {
        InvalidReason::ALL.into_iter().find(|r| r.label() == label)
    }
}

/// A refusal: the reason's code and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: InvalidReason,
    pub detail: String,
}

impl Invalid {
    fn new(reason: InvalidReason, detail: impl Into<String>) -> Invalid {
        Invalid {
            reason,
            detail: detail.into(),
        }
    }
}

/// An event's identity: a resend carries the same one. The device name is borrowed from
/// the payload when it can be (no escapes): most events are checked without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId<'a> {
    pub device: Cow<'a, str>,
    pub boot: u64,
    pub seq: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Direction {
    Rising,
    Falling,
    Heartbeat,
}

/// Every field of version 1; serde checks presence, types and integer ranges. The sensor
/// name is only checked: borrowed from the payload when it can be.
#[derive(Deserialize)]
struct EventV1<'a> {
    v: u32,
    #[serde(borrow)]
    device: Cow<'a, str>,
    boot: u32,
    seq: u32,
    #[serde(borrow)]
    sensor: Cow<'a, str>,
    #[allow(dead_code)] // checked for type and range only
    value: i32,
    #[allow(dead_code)]
    threshold: i32,
    #[allow(dead_code)]
    direction: Direction,
    #[serde(default)]
    #[allow(dead_code)]
    dropped: Option<u32>,
}

/// Checks `payload` against event-v1 and returns the event's identity.
pub fn validate_event_v1<'a>(topic: &str, payload: &'a [u8]) -> Result<EventId<'a>, Invalid> {
    // The common case, a valid event, in one typed pass; anything else is looked at again
    // to say what is wrong (the version first, so a v2 event is called that). The payload
    // is checked as UTF-8 once, as a whole (JSON is UTF-8): the parser then need not check
    // each string again.
    let text = utf8(payload)?;
    let event = match serde_json::from_str::<EventV1>(text) {
        Ok(event) if event.v == 1 => event,
        _ => diagnose(text)?,
    };
    check_name("device", &event.device, 23)?;
    check_name("sensor", &event.sensor, 15)?;
    // The standard topic `sensors/<device>/events` (one level between).
    let topic_device = topic
        .strip_prefix("sensors/")
        .and_then(|rest| rest.strip_suffix("/events"))
        .filter(|device| !device.contains('/'));
    if let Some(device) = topic_device {
        if device != event.device {
            return Err(Invalid::new(
                InvalidReason::DeviceMismatch,
                format!(
                    "device {:?} published on the topic of device {device:?}",
                    event.device
                ),
            ));
        }
    }
    Ok(EventId {
        device: event.device,
        boot: u64::from(event.boot),
        seq: u64::from(event.seq),
    })
}

fn utf8(payload: &[u8]) -> Result<&str, Invalid> {
    std::str::from_utf8(payload)
        .map_err(|e| Invalid::new(InvalidReason::NotJson, format!("not JSON: not UTF-8: {e}")))
}

/// Why `payload` is not an event-v1 (or the event, if it is one after all).
fn diagnose(payload: &str) -> Result<EventV1<'static>, Invalid> {
    let value: Value = serde_json::from_str(payload)
        .map_err(|e| Invalid::new(InvalidReason::NotJson, format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Invalid::new(
            InvalidReason::WrongType,
            "the event is not a JSON object",
        ));
    }
    match value.get("v") {
        None => {
            return Err(Invalid::new(
                InvalidReason::MissingField,
                "missing field `v`",
            ))
        }
        Some(v) if v.as_u64() != Some(1) => {
            return Err(Invalid::new(
                InvalidReason::UnknownVersion,
                format!("schema version {v} is not 1"),
            ))
        }
        Some(_) => {}
    }
    EventV1::deserialize(value).map_err(|e| {
        let text = e.to_string();
        let reason = if text.starts_with("missing field") {
            InvalidReason::MissingField
        } else if text.starts_with("invalid type") {
            InvalidReason::WrongType
        } else {
            InvalidReason::BadValue
        };
        Invalid::new(reason, text)
    })
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    let ok = (1..=max).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            InvalidReason::BadValue,
            format!("`{field}` {value:?} is not 1-{max} characters of [A-Za-z0-9._-]"),
        ))
    }
}

/// Checks `payload` against a compiled JSON Schema; the detail names where it failed.
pub fn validate_json_schema(
    validator: &jsonschema::Validator,
    payload: &[u8],
) -> Result<(), Invalid> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Invalid::new(InvalidReason::NotJson, format!("not JSON: {e}")))?;
    validator.validate(&value).map_err(|e| {
        let at = e.instance_path().to_string();
        let at = if at.is_empty() { "/".to_string() } else { at };
        Invalid::new(InvalidReason::SchemaViolation, format!("at {at}: {e}"))
    })
}

/// An event-v1's identity alone, for a rule that deduplicates without validating: one
/// typed pass that ignores every other field.
pub fn event_v1_id(payload: &[u8]) -> Result<EventId<'_>, Invalid> {
    #[derive(Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        device: Cow<'a, str>,
        boot: u32,
        seq: u32,
    }
    match serde_json::from_str::<Id>(utf8(payload)?) {
        Ok(id) if !id.device.is_empty() => Ok(EventId {
            device: id.device,
            boot: u64::from(id.boot),
            seq: u64::from(id.seq),
        }),
        _ => event_id_at(payload, "/device", Some("/boot"), "/seq"),
    }
}

/// Finds an event's identity with JSON pointers (`boot` optional: 0 when not configured).
pub fn event_id_at(
    payload: &[u8],
    device: &str,
    boot: Option<&str>,
    seq: &str,
) -> Result<EventId<'static>, Invalid> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Invalid::new(InvalidReason::NotJson, format!("not JSON: {e}")))?;
    let missing = |what: &str, pointer: &str| {
        Invalid::new(
            InvalidReason::NoEventId,
            format!("no {what} at JSON pointer {pointer:?} (a string or a non-negative integer)"),
        )
    };
    let device_value = match value.pointer(device) {
        Some(Value::String(s)) if !s.is_empty() => Cow::Owned(s.clone()),
        Some(Value::Number(n)) => Cow::Owned(n.to_string()),
        _ => return Err(missing("device", device)),
    };
    let number = |pointer: &str, what: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_u64)
            .ok_or_else(|| missing(what, pointer))
    };
    Ok(EventId {
        device: device_value,
        boot: match boot {
            Some(pointer) => number(pointer, "boot")?,
            None => 0,
        },
        seq: number(seq, "seq")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"v":1,"device":"sim-0003","boot":17,"seq":42,"sensor":"temp","value":30125,"threshold":30000,"direction":"rising","dropped":2}"#;

    fn reason(topic: &str, payload: &str) -> InvalidReason {
        validate_event_v1(topic, payload.as_bytes())
            .unwrap_err()
            .reason
    }

    #[test]
    fn the_documented_example_is_valid_and_identified() {
        let id = validate_event_v1("sensors/sim-0003/events", GOOD.as_bytes()).unwrap();
        assert_eq!(
            id,
            EventId {
                device: "sim-0003".into(),
                boot: 17,
                seq: 42
            }
        );
        // Unknown fields are allowed, `dropped` is optional; any topic outside the standard one.
        let extra = GOOD.replace(r#","dropped":2"#, r#","unit":"mC""#);
        assert!(validate_event_v1("plant/a", extra.as_bytes()).is_ok());
    }

    #[test]
    fn each_fault_has_its_reason() {
        let t = "sensors/sim-0003/events";
        assert_eq!(reason(t, "hello"), InvalidReason::NotJson);
        assert_eq!(reason(t, "[1,2]"), InvalidReason::WrongType);
        assert_eq!(
            reason(t, &GOOD.replace(r#""v":1"#, r#""v":2"#)),
            InvalidReason::UnknownVersion
        );
        assert_eq!(
            reason(t, &GOOD.replace(r#""seq":42,"#, "")),
            InvalidReason::MissingField
        );
        assert_eq!(
            reason(t, &GOOD.replace(r#""seq":42"#, r#""seq":"42""#)),
            InvalidReason::WrongType
        );
        assert_eq!(
            reason(t, &GOOD.replace(r#""seq":42"#, r#""seq":-1"#)),
            InvalidReason::BadValue
        );
        assert_eq!(
            reason(t, &GOOD.replace("rising", "sideways")),
            InvalidReason::BadValue
        );
        assert_eq!(
            reason(t, &GOOD.replace("sim-0003", "sim 3")),
            InvalidReason::BadValue
        );
        assert_eq!(
            reason("sensors/other/events", GOOD),
            InvalidReason::DeviceMismatch
        );
        let v = validate_event_v1(t, br#"{"device":"x"}"#).unwrap_err();
        assert_eq!(v.reason, InvalidReason::MissingField);
        assert!(v.detail.contains("`v`"), "{}", v.detail);
    }

    #[test]
    fn pointers_find_an_id_in_another_format() {
        let payload = br#"{"meta":{"src":"pump-7","n":9},"reading":3}"#;
        let id = event_id_at(payload, "/meta/src", None, "/meta/n").unwrap();
        assert_eq!((&*id.device, id.boot, id.seq), ("pump-7", 0, 9));
        let e = event_id_at(payload, "/meta/src", None, "/reading/x").unwrap_err();
        assert_eq!(e.reason, InvalidReason::NoEventId);
        assert_eq!(
            event_id_at(b"nope", "/a", None, "/b").unwrap_err().reason,
            InvalidReason::NotJson
        );
    }

    #[test]
    fn a_json_schema_refuses_with_the_place_at_fault() {
        let schema = serde_json::json!({
            "type": "object",
            "required": ["id", "level"],
            "properties": {"id": {"type": "string"}, "level": {"type": "number", "maximum": 100}}
        });
        let validator = jsonschema::validator_for(&schema).unwrap();
        assert!(validate_json_schema(&validator, br#"{"id":"t1","level":40}"#).is_ok());
        let e = validate_json_schema(&validator, br#"{"id":"t1","level":400}"#).unwrap_err();
        assert_eq!(e.reason, InvalidReason::SchemaViolation);
        assert!(e.detail.contains("/level"), "{}", e.detail);
        let e = validate_json_schema(&validator, br#"{"level":4}"#).unwrap_err();
        assert!(e.detail.contains("id"), "{}", e.detail);
        let e = validate_json_schema(&validator, b"\x01").unwrap_err();
        assert_eq!(e.reason, InvalidReason::NotJson);
    }

    #[test]
    fn the_event_v1_id_alone() {
        let id = event_v1_id(GOOD.as_bytes()).unwrap();
        assert_eq!((&*id.device, id.boot, id.seq), ("sim-0003", 17, 42));
        let e = event_v1_id(br#"{"device":"a","seq":1}"#).unwrap_err();
        assert_eq!(e.reason, InvalidReason::NoEventId);
        assert_eq!(
            event_v1_id(b"x").unwrap_err().reason,
            InvalidReason::NotJson
        );
    }

    #[test]
    fn labels_round_trip() {
        for r in InvalidReason::ALL {
            assert_eq!(InvalidReason::from_label(r.label()), Some(r));
        }
    }
}
