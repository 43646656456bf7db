//! Wall-clock time as the gateway reports it: Unix milliseconds.
//!
//! A leaf module on purpose: the status JSON, `$SYS`, `/metrics` and the dashboard's history
//! all stamp times, and taking the clock from here (not from one of them) keeps their imports
//! pointing one way.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the clock is before it (a Pi without RTC at boot),
/// so a bad clock gives odd numbers rather than a panic.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
