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

/// A UTC calendar time: year, month (1-12), day, hour, minute, second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
}

/// Seconds since the Unix epoch as a UTC calendar time (Howard Hinnant's civil_from_days,
/// proleptic Gregorian), for file names and the times people read.
pub fn utc(unix_secs: i64) -> Utc {
    let (days, rem) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    Utc {
        year: yoe + era * 400 + i64::from(month <= 2),
        month,
        day: doy - (153 * mp + 2) / 5 + 1,
        hour: rem / 3600,
        minute: rem % 3600 / 60,
        second: rem % 60,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_of_known_instants() {
        let t = |y, mo, d, h, mi, s| Utc {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
            second: s,
        };
        assert_eq!(utc(0), t(1970, 1, 1, 0, 0, 0));
        assert_eq!(utc(951_782_400), t(2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(1_796_083_199), t(2026, 11, 30, 23, 59, 59));
        assert_eq!(utc(-1), t(1969, 12, 31, 23, 59, 59));
    }
}
