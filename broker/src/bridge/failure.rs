//! Why a bridge session or connection attempt ended (a fixed label for metrics and a message
//! for people), and the encoding helper whose error is such an end.

use super::link::LinkError;

/// Why a session or an attempt ended: a fixed label for metrics and a message for people.
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Failure {
        Failure {
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

impl Failure {
    pub(super) fn new(reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }
}

/// An encoding result as a session's end (`protocol_error`) when it failed.
pub(super) fn encoded(result: Result<(), String>) -> Result<(), Failure> {
    result.map_err(|e| Failure::new("protocol_error", format!("encoding: {e}")))
}
