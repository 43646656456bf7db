//! The retained configuration document on `sensors/<id>/config`: JSON whose fields override the
//! current thresholds, e.g. `{"rising":30000,"falling":25000,"debounce":3}`. Unknown fields are
//! ignored (new optional fields must not break old devices); an invalid document changes nothing.

use crate::detector::{ThresholdError, Thresholds};

/// Why a configuration document was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConfigError {
    /// Not a JSON object, or a known field of the wrong type or out of range.
    Syntax,
    /// A `v` this firmware does not understand.
    Version,
    Invalid(ThresholdError),
}

impl ConfigError {
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigError::Syntax => "not a valid config document",
            ConfigError::Version => "unsupported config version",
            ConfigError::Invalid(e) => e.as_str(),
        }
    }
}

/// Nesting allowed inside ignored values.
const MAX_DEPTH: u8 = 16;

/// A small JSON scanner: this document is a flat object of integers, and a hand-written
/// scanner is a quarter of the flash of a generic deserializer (docs/event-schema.md).
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

type R<T> = Result<T, ConfigError>;

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> R<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(ConfigError::Syntax)
        }
    }
    /// A string; returns its raw bytes between the quotes (escapes not decoded).
    fn string(&mut self) -> R<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match self.peek() {
                None => return Err(ConfigError::Syntax),
                Some(b'"') => {
                    let s = self.b.get(start..self.i).ok_or(ConfigError::Syntax);
                    self.i += 1;
                    return s;
                }
                Some(b'\\') => self.i += 2,
                Some(c) if c < 0x20 => return Err(ConfigError::Syntax),
                Some(_) => self.i += 1,
            }
        }
    }
    /// An integer without fraction or exponent.
    fn int(&mut self) -> R<i64> {
        self.ws();
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let mut v: i64 = 0;
        let mut digits = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v * 10 + (c - b'0') as i64;
            digits += 1;
            self.i += 1;
            if digits > 12 {
                // Beyond every field's range; also keeps `v` far from overflow.
                return Err(ConfigError::Syntax);
            }
        }
        if digits == 0 || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(ConfigError::Syntax);
        }
        Ok(if neg { -v } else { v })
    }
    /// Skips any JSON value (for fields this firmware does not know).
    fn skip_value(&mut self, depth: u8) -> R<()> {
        if depth > MAX_DEPTH {
            return Err(ConfigError::Syntax);
        }
        self.ws();
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(open @ (b'{' | b'[')) => {
                self.i += 1;
                let close = if open == b'{' { b'}' } else { b']' };
                if self.eat(close) {
                    return Ok(());
                }
                loop {
                    if open == b'{' {
                        self.string()?;
                        self.expect(b':')?;
                    }
                    self.skip_value(depth + 1)?;
                    if self.eat(close) {
                        return Ok(());
                    }
                    self.expect(b',')?;
                }
            }
            Some(b't') => self.word(b"true"),
            Some(b'f') => self.word(b"false"),
            Some(b'n') => self.word(b"null"),
            _ => {
                self.ws();
                if self.peek() == Some(b'-') {
                    self.i += 1;
                }
                let start = self.i;
                while matches!(
                    self.peek(),
                    Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                ) {
                    self.i += 1;
                }
                if self.i == start {
                    Err(ConfigError::Syntax)
                } else {
                    Ok(())
                }
            }
        }
    }
    fn word(&mut self, w: &[u8]) -> R<()> {
        if self.b.get(self.i..self.i + w.len()) == Some(w) {
            self.i += w.len();
            Ok(())
        } else {
            Err(ConfigError::Syntax)
        }
    }
}

/// Applies the document to `current` and returns the result, or why it was refused.
pub fn parse(payload: &[u8], current: Thresholds) -> Result<Thresholds, ConfigError> {
    let mut s = Scan { b: payload, i: 0 };
    // Known keys and their ranges; values land in `vals` (the document's last value wins).
    // Ranges by position (code, not a table of 64-bit bounds in flash): `v` (checked below),
    // two `i32`, a `u8`, two `u32`.
    const KEYS: [&[u8]; 6] = [
        b"v",
        b"rising",
        b"falling",
        b"debounce",
        b"min_interval_ms",
        b"heartbeat_ms",
    ];
    let mut vals = [
        1,
        current.rising as i64,
        current.falling as i64,
        current.debounce as i64,
        current.min_interval_ms as i64,
        current.heartbeat_ms as i64,
    ];
    s.expect(b'{')?;
    if !s.eat(b'}') {
        loop {
            let key = s.string()?;
            s.expect(b':')?;
            match KEYS.iter().position(|&k| k == key) {
                Some(i) => {
                    let v = s.int()?;
                    // `v` out of range is a version error, the others a syntax error.
                    let ok = match i {
                        0 => true,
                        1 | 2 => i32::try_from(v).is_ok(),
                        3 => u8::try_from(v).is_ok(),
                        _ => u32::try_from(v).is_ok(),
                    };
                    match vals.get_mut(i) {
                        Some(slot) if ok => *slot = v,
                        _ => return Err(ConfigError::Syntax),
                    }
                }
                None => s.skip_value(0)?,
            }
            if s.eat(b'}') {
                break;
            }
            s.expect(b',')?;
        }
    }
    s.ws();
    if s.i != payload.len() {
        return Err(ConfigError::Syntax);
    }
    if vals[0] != 1 {
        return Err(ConfigError::Version);
    }
    // In range (checked above), so the casts are exact.
    let t = Thresholds {
        rising: vals[1] as i32,
        falling: vals[2] as i32,
        debounce: vals[3] as u8,
        min_interval_ms: vals[4] as u32,
        heartbeat_ms: vals[5] as u32,
    };
    t.validate().map_err(ConfigError::Invalid)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    const CUR: Thresholds = Thresholds {
        rising: 100,
        falling: 0,
        debounce: 1,
        min_interval_ms: 0,
        heartbeat_ms: 0,
    };

    #[test]
    fn partial_update() {
        let t = parse(br#"{"rising":500,"debounce":3,"future_field":"x"}"#, CUR).unwrap();
        assert_eq!(
            t,
            Thresholds {
                rising: 500,
                debounce: 3,
                ..CUR
            }
        );
        let t = parse(
            br#" {"v":1,"falling":-20,"min_interval_ms":1000,"heartbeat_ms":60000} "#,
            CUR,
        )
        .unwrap();
        assert_eq!(
            t,
            Thresholds {
                falling: -20,
                min_interval_ms: 1000,
                heartbeat_ms: 60000,
                ..CUR
            }
        );
    }

    #[test]
    fn skips_unknown_values_of_every_kind() {
        let doc = br#"{"a":"s\"}","b":[1,2.5e3,{"c":null}],"d":true,"e":false,"f":{},"g":[],"h":-0.5,"rising":7000}"#;
        assert_eq!(
            parse(doc, CUR),
            Ok(Thresholds {
                rising: 7000,
                ..CUR
            })
        );
        assert_eq!(parse(b"{}", CUR), Ok(CUR));
        assert_eq!(parse(b" { } ", CUR), Ok(CUR));
    }

    /// Agrees with a real JSON parser on documents built from random fields.
    #[test]
    fn agrees_with_serde_json() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::default();
        let field = (
            prop::sample::select(vec![
                "rising",
                "falling",
                "debounce",
                "min_interval_ms",
                "heartbeat_ms",
                "other",
            ]),
            -70000i64..70000,
        );
        runner
            .run(&proptest::collection::vec(field, 0..6), |fields| {
                let obj: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                    .collect();
                let text = serde_json::to_string(&obj).unwrap();
                let get = |k: &str| obj.get(k).and_then(|v| v.as_i64());
                let want = (|| {
                    let t = Thresholds {
                        rising: get("rising")
                            .map_or(Some(CUR.rising), |v| i32::try_from(v).ok())?,
                        falling: get("falling")
                            .map_or(Some(CUR.falling), |v| i32::try_from(v).ok())?,
                        debounce: get("debounce")
                            .map_or(Some(CUR.debounce), |v| u8::try_from(v).ok())?,
                        min_interval_ms: get("min_interval_ms")
                            .map_or(Some(CUR.min_interval_ms), |v| u32::try_from(v).ok())?,
                        heartbeat_ms: get("heartbeat_ms")
                            .map_or(Some(CUR.heartbeat_ms), |v| u32::try_from(v).ok())?,
                    };
                    t.validate().ok().map(|_| t)
                })();
                prop_assert_eq!(parse(text.as_bytes(), CUR).ok(), want, "{}", text);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"", CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(b"not json", CUR), Err(ConfigError::Syntax));
        assert_eq!(
            parse(br#"{"rising":"high"}"#, CUR),
            Err(ConfigError::Syntax)
        );
        assert_eq!(parse(br#"{"debounce":300}"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(
            parse(br#"{"rising":99999999999}"#, CUR),
            Err(ConfigError::Syntax)
        );
        assert_eq!(
            parse(br#"{"v":2,"rising":1}"#, CUR),
            Err(ConfigError::Version)
        );
        assert_eq!(
            parse(br#"{"falling":100}"#, CUR),
            Err(ConfigError::Invalid(ThresholdError::FallingNotBelowRising))
        );
        assert_eq!(parse(br#"{"rising":1.5}"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(br#"{"rising":500"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(br#"{"rising":500,}"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(br#"{"rising":500} x"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(
            parse(br#"{"x":[1,{"a":"}"}],"rising":-}"#, CUR),
            Err(ConfigError::Syntax)
        );
        assert_eq!(parse(br#"[]"#, CUR), Err(ConfigError::Syntax));
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(40), "]".repeat(40));
        assert_eq!(parse(deep.as_bytes(), CUR), Err(ConfigError::Syntax));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&bytes, CUR);
        }
    }
}
