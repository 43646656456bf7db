//! Wall-clock time as the broker records it: Unix milliseconds, in stored records, status and
//! `$SYS`. A leaf every other module may use; nothing here knows of the broker.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the clock is set before 1970 (a Pi without RTC
/// before NTP has run reads 1970, not earlier, so this is a guard, not a path).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
