//! Threshold detection: a rising and a falling threshold whose gap is the hysteresis band, a
//! debounce of N consecutive samples, a minimum interval between events, an optional heartbeat,
//! and silence at boot until the first stable reading. Thresholds change at run time.
//!
//! States: `Unknown` (boot, until `debounce` consecutive samples agree on a zone), `Low`, `Mid`
//! (booted inside the band: either crossing may come next) and `High`. A rising event fires when
//! `debounce` consecutive samples are `>= rising` and the state is not `High`; a falling event
//! when `debounce` consecutive samples are `<= falling` and the state is not `Low`. So two events
//! in the same direction always have a crossing back beyond the other threshold between them.

use serde::Serialize;

/// Which way a reading crossed, or a periodic heartbeat.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Rising,
    Falling,
    Heartbeat,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Rising => "rising",
            Direction::Falling => "falling",
            Direction::Heartbeat => "heartbeat",
        }
    }
}

/// Detector settings. `falling < rising` is required: the gap between them is the hysteresis.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Thresholds {
    /// A rising event fires at or above this (milli-units).
    pub rising: i32,
    /// A falling event fires at or below this (milli-units).
    pub falling: i32,
    /// Consecutive samples beyond a threshold needed (0 is treated as 1).
    pub debounce: u8,
    /// Minimum milliseconds between two crossing events; a crossing that is still there when the
    /// interval ends fires then.
    pub min_interval_ms: u32,
    /// A heartbeat event after this many milliseconds without any event; 0 disables it.
    pub heartbeat_ms: u32,
}

/// Why thresholds were refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ThresholdError {
    FallingNotBelowRising,
}

impl ThresholdError {
    pub fn as_str(self) -> &'static str {
        match self {
            ThresholdError::FallingNotBelowRising => "falling must be below rising",
        }
    }
}

impl Thresholds {
    pub fn validate(&self) -> Result<(), ThresholdError> {
        if self.falling < self.rising {
            Ok(())
        } else {
            Err(ThresholdError::FallingNotBelowRising)
        }
    }
}

/// A detected event.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Detection {
    pub direction: Direction,
    /// The reading that completed the debounce (or the latest one, for a heartbeat).
    pub value: i32,
    /// The threshold crossed; for a heartbeat, the threshold the next event would cross.
    pub threshold: i32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Unknown,
    Low,
    Mid,
    High,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Zone {
    Below,
    Band,
    Above,
}

/// The detector.
pub struct Detector {
    cfg: Thresholds,
    state: State,
    zone: Zone,
    run: u8,
    last_event_ms: Option<u32>,
    /// When the state became known (heartbeats count from here until the first event).
    known_since_ms: u32,
}

impl Detector {
    pub fn new(cfg: Thresholds) -> Result<Self, ThresholdError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            state: State::Unknown,
            zone: Zone::Band,
            run: 0,
            last_event_ms: None,
            known_since_ms: 0,
        })
    }

    pub fn thresholds(&self) -> Thresholds {
        self.cfg
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Replaces the thresholds at run time; the state is kept, the debounce count restarts.
    pub fn set_thresholds(&mut self, cfg: Thresholds) -> Result<(), ThresholdError> {
        cfg.validate()?;
        self.cfg = cfg;
        self.run = 0;
        Ok(())
    }

    fn zone_of(&self, v: i32) -> Zone {
        if v >= self.cfg.rising {
            Zone::Above
        } else if v <= self.cfg.falling {
            Zone::Below
        } else {
            Zone::Band
        }
    }

    /// Feeds one reading taken at `now_ms` (a wrapping millisecond clock).
    pub fn update(&mut self, value: i32, now_ms: u32) -> Option<Detection> {
        let zone = self.zone_of(value);
        if zone == self.zone {
            self.run = self.run.saturating_add(1);
        } else {
            self.zone = zone;
            self.run = 1;
        }
        let stable = self.run >= self.cfg.debounce.max(1);
        if self.state == State::Unknown {
            if stable {
                self.state = match zone {
                    Zone::Below => State::Low,
                    Zone::Band => State::Mid,
                    Zone::Above => State::High,
                };
                self.known_since_ms = now_ms;
            }
            return None;
        }
        let crossing = match (zone, self.state) {
            (Zone::Above, State::Low | State::Mid) => {
                Some((Direction::Rising, self.cfg.rising, State::High))
            }
            (Zone::Below, State::High | State::Mid) => {
                Some((Direction::Falling, self.cfg.falling, State::Low))
            }
            _ => None,
        };
        let since_last = now_ms.wrapping_sub(self.last_event_ms.unwrap_or(self.known_since_ms));
        if let Some((direction, threshold, next)) = crossing {
            let interval_ok = match self.last_event_ms {
                Some(t) => now_ms.wrapping_sub(t) >= self.cfg.min_interval_ms,
                None => true,
            };
            if stable && interval_ok {
                self.state = next;
                self.last_event_ms = Some(now_ms);
                return Some(Detection {
                    direction,
                    value,
                    threshold,
                });
            }
        }
        if self.cfg.heartbeat_ms > 0 && since_last >= self.cfg.heartbeat_ms {
            self.last_event_ms = Some(now_ms);
            let threshold = if self.state == State::High {
                self.cfg.falling
            } else {
                self.cfg.rising
            };
            return Some(Detection {
                direction: Direction::Heartbeat,
                value,
                threshold,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn th(rising: i32, falling: i32, debounce: u8) -> Thresholds {
        Thresholds {
            rising,
            falling,
            debounce,
            min_interval_ms: 0,
            heartbeat_ms: 0,
        }
    }

    fn run(d: &mut Detector, values: &[i32]) -> std::vec::Vec<(usize, Direction)> {
        values
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| d.update(v, i as u32 * 100).map(|e| (i, e.direction)))
            .collect()
    }

    #[test]
    fn rejects_inverted_thresholds() {
        assert!(Detector::new(th(10, 10, 1)).is_err());
        assert!(Detector::new(th(10, 20, 1)).is_err());
        let mut d = Detector::new(th(10, 0, 1)).unwrap();
        assert_eq!(
            d.set_thresholds(th(0, 5, 1)),
            Err(ThresholdError::FallingNotBelowRising)
        );
        assert_eq!(d.thresholds(), th(10, 0, 1));
    }

    #[test]
    fn silent_at_boot_even_when_above() {
        let mut d = Detector::new(th(100, 0, 2)).unwrap();
        assert_eq!(run(&mut d, &[500, 500, 500, 500]), []);
        assert_eq!(d.state(), State::High);
        assert_eq!(run(&mut d, &[-5, -5]), [(1, Direction::Falling)]);
    }

    #[test]
    fn booting_in_band_allows_either_crossing() {
        let mut d = Detector::new(th(100, 0, 1)).unwrap();
        assert_eq!(run(&mut d, &[50, 150]), [(1, Direction::Rising)]);
        let mut d = Detector::new(th(100, 0, 1)).unwrap();
        assert_eq!(run(&mut d, &[50, -1]), [(1, Direction::Falling)]);
    }

    #[test]
    fn hysteresis_band_suppresses_chatter() {
        let mut d = Detector::new(th(100, 0, 1)).unwrap();
        let ev = run(&mut d, &[-10, 120, 90, 120, 90, 120, 10, -10, 50, -20, 101]);
        assert_eq!(
            ev,
            [
                (1, Direction::Rising),
                (7, Direction::Falling),
                (10, Direction::Rising)
            ]
        );
    }

    #[test]
    fn debounce_needs_consecutive_samples() {
        let mut d = Detector::new(th(100, 0, 3)).unwrap();
        let ev = run(&mut d, &[-1, -1, -1, 200, 200, 50, 200, 200, 200]);
        assert_eq!(ev, [(8, Direction::Rising)]);
        let e = d.update(-1, 10_000);
        assert_eq!(e, None);
    }

    #[test]
    fn event_reports_value_and_threshold() {
        let mut d = Detector::new(th(100, 0, 1)).unwrap();
        d.update(-3, 0);
        assert_eq!(
            d.update(123, 1),
            Some(Detection {
                direction: Direction::Rising,
                value: 123,
                threshold: 100
            })
        );
        assert_eq!(
            d.update(-7, 2),
            Some(Detection {
                direction: Direction::Falling,
                value: -7,
                threshold: 0
            })
        );
    }

    #[test]
    fn min_interval_defers_then_fires_if_still_crossed() {
        let mut d = Detector::new(Thresholds {
            min_interval_ms: 1000,
            ..th(100, 0, 1)
        })
        .unwrap();
        assert_eq!(d.update(-5, 0), None);
        assert!(d.update(150, 100).is_some()); // rising at t=100
        assert_eq!(d.update(-5, 200), None); // too soon
        assert_eq!(d.update(-5, 1099), None);
        assert_eq!(
            d.update(-5, 1100).map(|e| e.direction),
            Some(Direction::Falling)
        );
        // A crossing that goes away before the interval ends never fires.
        assert_eq!(d.update(150, 1200), None);
        assert_eq!(d.update(50, 2200), None);
        assert_eq!(d.state(), State::Low);
    }

    #[test]
    fn heartbeat_when_quiet() {
        let mut d = Detector::new(Thresholds {
            heartbeat_ms: 1000,
            ..th(100, 0, 1)
        })
        .unwrap();
        assert_eq!(d.update(50, 0), None); // state known (Mid) at t=0
        assert_eq!(d.update(50, 999), None);
        let hb = d.update(60, 1000).unwrap();
        assert_eq!(
            hb,
            Detection {
                direction: Direction::Heartbeat,
                value: 60,
                threshold: 100
            }
        );
        assert_eq!(d.update(50, 1999), None);
        assert!(d
            .update(150, 2000)
            .is_some_and(|e| e.direction == Direction::Rising));
        assert_eq!(d.update(150, 2999), None);
        assert_eq!(
            d.update(150, 3000).map(|e| (e.direction, e.threshold)),
            Some((Direction::Heartbeat, 0))
        );
    }

    #[test]
    fn thresholds_change_at_run_time() {
        let mut d = Detector::new(th(100, 0, 1)).unwrap();
        assert_eq!(run(&mut d, &[50, 60]), []);
        d.set_thresholds(th(55, 10, 1)).unwrap();
        assert_eq!(
            d.update(60, 5).map(|e| (e.direction, e.threshold)),
            Some((Direction::Rising, 55))
        );
    }

    #[test]
    fn clock_wraps() {
        let mut d = Detector::new(Thresholds {
            min_interval_ms: 100,
            ..th(100, 0, 1)
        })
        .unwrap();
        d.update(-5, u32::MAX - 500);
        assert!(d.update(150, u32::MAX - 50).is_some());
        assert_eq!(d.update(-5, 10), None); // 61 ms later
        assert!(d.update(-5, 60).is_some()); // 111 ms later
    }

    proptest! {
        /// Hysteresis never produces two events in the same direction without a crossing back:
        /// between two rising events some sample was <= falling, and vice versa; and every
        /// crossing event follows `debounce` samples beyond its threshold.
        #[test]
        fn no_repeat_without_crossing_back(
            values in proptest::collection::vec(-2000i32..2000, 1..400),
            a in -1500i32..1500, gap in 1i32..800, debounce in 0u8..5,
            min_interval_ms in 0u32..300, heartbeat_ms in 0u32..500,
            change_at in 0usize..400, b in -1500i32..1500, gap2 in 1i32..800,
        ) {
            let mut d = Detector::new(Thresholds { rising: a + gap, falling: a, debounce, min_interval_ms, heartbeat_ms }).unwrap();
            let mut last: Option<Direction> = None;
            let mut crossed_back = true;
            for (i, &v) in values.iter().enumerate() {
                if i == change_at {
                    d.set_thresholds(Thresholds { rising: b + gap2, falling: b, debounce, min_interval_ms, heartbeat_ms }).unwrap();
                }
                let t = d.thresholds();
                // Track whether a sample went beyond the opposite threshold since the last event.
                match last {
                    Some(Direction::Rising) if v <= t.falling => crossed_back = true,
                    Some(Direction::Falling) if v >= t.rising => crossed_back = true,
                    _ => {}
                }
                if let Some(e) = d.update(v, i as u32 * 10) {
                    if e.direction == Direction::Heartbeat {
                        continue;
                    }
                    prop_assert_eq!(e.value, v);
                    if e.direction == Direction::Rising { prop_assert!(v >= t.rising) } else { prop_assert!(v <= t.falling) }
                    let n = debounce.max(1) as usize;
                    prop_assert!(i + 1 >= n);
                    for &w in &values[i + 1 - n..=i] {
                        if e.direction == Direction::Rising { prop_assert!(w >= t.rising) } else { prop_assert!(w <= t.falling) }
                    }
                    if last == Some(e.direction) {
                        prop_assert!(crossed_back, "two {:?} events at {} without a crossing back", e.direction, i);
                    }
                    prop_assert!(last != Some(e.direction));
                    last = Some(e.direction);
                    crossed_back = false;
                }
            }
        }
    }
}
