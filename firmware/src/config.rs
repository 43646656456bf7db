//! The retained configuration document on `sensors/<id>/config`: JSON whose fields override the
//! current thresholds, e.g. `{"rising":30000,"falling":25000,"debounce":3}`. Unknown fields are
//! ignored (new optional fields must not break old devices); an invalid document changes nothing.

use crate::detector::{ThresholdError, Thresholds};
use serde::Deserialize;

#[derive(Deserialize, Default)]
struct Doc {
    v: Option<u8>,
    rising: Option<i32>,
    falling: Option<i32>,
    debounce: Option<u8>,
    min_interval_ms: Option<u32>,
    heartbeat_ms: Option<u32>,
}

/// Why a configuration document was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConfigError {
    /// Not JSON, or a field of the wrong type or out of range.
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

/// Applies the document to `current` and returns the result, or why it was refused.
pub fn parse(payload: &[u8], current: Thresholds) -> Result<Thresholds, ConfigError> {
    let (doc, _) = serde_json_core::from_slice::<Doc>(payload).map_err(|_| ConfigError::Syntax)?;
    if doc.v.is_some_and(|v| v != 1) {
        return Err(ConfigError::Version);
    }
    let t = Thresholds {
        rising: doc.rising.unwrap_or(current.rising),
        falling: doc.falling.unwrap_or(current.falling),
        debounce: doc.debounce.unwrap_or(current.debounce),
        min_interval_ms: doc.min_interval_ms.unwrap_or(current.min_interval_ms),
        heartbeat_ms: doc.heartbeat_ms.unwrap_or(current.heartbeat_ms),
    };
    t.validate().map_err(ConfigError::Invalid)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    const CUR: Thresholds = Thresholds { rising: 100, falling: 0, debounce: 1, min_interval_ms: 0, heartbeat_ms: 0 };

    #[test]
    fn partial_update() {
        let t = parse(br#"{"rising":500,"debounce":3,"future_field":"x"}"#, CUR).unwrap();
        assert_eq!(t, Thresholds { rising: 500, debounce: 3, ..CUR });
        let t = parse(br#" {"v":1,"falling":-20,"min_interval_ms":1000,"heartbeat_ms":60000} "#, CUR).unwrap();
        assert_eq!(t, Thresholds { falling: -20, min_interval_ms: 1000, heartbeat_ms: 60000, ..CUR });
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"", CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(b"not json", CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(br#"{"rising":"high"}"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(br#"{"debounce":300}"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(br#"{"rising":99999999999}"#, CUR), Err(ConfigError::Syntax));
        assert_eq!(parse(br#"{"v":2,"rising":1}"#, CUR), Err(ConfigError::Version));
        assert_eq!(parse(br#"{"falling":100}"#, CUR), Err(ConfigError::Invalid(ThresholdError::FallingNotBelowRising)));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&bytes, CUR);
        }
    }
}
