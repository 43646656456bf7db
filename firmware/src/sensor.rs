//! Sensors: the [`Sensor`] trait (readings in integer milli-units), a TMP102 I2C temperature
//! driver over `embedded-hal` 1.0, and a simulated [`Waveform`] sensor for tests and demos.

use embedded_hal::i2c::I2c;

/// A source of readings in integer milli-units (milli-°C for temperature).
pub trait Sensor {
    type Error;
    /// Takes one reading.
    fn read(&mut self) -> Result<i32, Self::Error>;
}

/// TMP102 register pointers (TI SBOS397, table 7-3).
pub mod tmp102_reg {
    pub const TEMPERATURE: u8 = 0x00;
    pub const CONFIG: u8 = 0x01;
    pub const T_LOW: u8 = 0x02;
    pub const T_HIGH: u8 = 0x03;
}

/// Configuration register bit: extended mode (13-bit temperature), byte 2 bit 4 (EM).
pub const TMP102_EM: u8 = 0x10;

/// TMP102 digital temperature sensor (I2C address 0x48..=0x4B, set by the ADD0 pin).
pub struct Tmp102<I> {
    i2c: I,
    address: u8,
    extended: bool,
}

impl<I: I2c> Tmp102<I> {
    /// Default address with ADD0 tied to ground.
    pub const DEFAULT_ADDRESS: u8 = 0x48;

    /// A driver in normal (12-bit) mode; call [`Tmp102::set_extended`] to switch.
    pub fn new(i2c: I, address: u8) -> Self {
        Self {
            i2c,
            address,
            extended: false,
        }
    }

    /// Switches between 12-bit (-55..128 °C) and 13-bit extended (-55..150 °C) mode by writing
    /// the configuration register (read-modify-write, keeping the other bits).
    pub fn set_extended(&mut self, extended: bool) -> Result<(), I::Error> {
        let mut cfg = [0u8; 2];
        self.i2c
            .write_read(self.address, &[tmp102_reg::CONFIG], &mut cfg)?;
        if extended {
            cfg[1] |= TMP102_EM;
        } else {
            cfg[1] &= !TMP102_EM;
        }
        self.i2c
            .write(self.address, &[tmp102_reg::CONFIG, cfg[0], cfg[1]])?;
        self.extended = extended;
        Ok(())
    }

    /// Gives the bus back.
    pub fn release(self) -> I {
        self.i2c
    }
}

/// Converts the two temperature-register bytes to milli-°C. The register is left-justified
/// two's complement: 12 bits in normal mode, 13 in extended mode (bit 0 of byte 2 is then 1),
/// 0.0625 °C per LSB = 62.5 m°C, so milli-°C = raw * 625 / 10 (exact for even raw values;
/// rounded toward zero otherwise).
pub fn tmp102_to_millicelsius(bytes: [u8; 2], extended: bool) -> i32 {
    let word = i16::from_be_bytes(bytes) as i32;
    let raw = if extended { word >> 3 } else { word >> 4 };
    raw * 625 / 10
}

impl<I: I2c> Sensor for Tmp102<I> {
    type Error = I::Error;
    fn read(&mut self) -> Result<i32, I::Error> {
        let mut b = [0u8; 2];
        self.i2c
            .write_read(self.address, &[tmp102_reg::TEMPERATURE], &mut b)?;
        // In extended mode the register's bit 0 (EM flag) is 1; trust the flag, not the state.
        let extended = b[1] & 1 == 1;
        Ok(tmp102_to_millicelsius(b, extended))
    }
}

/// Waveform shape of a simulated sensor.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shape {
    /// Linear up from `min` to `max` and back down.
    Triangle,
    /// Holds `min` for half the period, then `max`.
    Square,
}

/// A simulated sensor: a periodic waveform between `min` and `max` milli-units, one step per
/// reading, plus an optional deterministic pseudo-random noise of up to ±`noise`.
#[derive(Clone, Debug)]
pub struct Waveform {
    pub shape: Shape,
    pub min: i32,
    pub max: i32,
    /// Readings per period (used clamped to 2..=[`Waveform::MAX_PERIOD`]).
    pub period: u32,
    pub noise: i32,
    step: u32,
    rng: u32,
}

impl Waveform {
    /// A waveform starting at phase `phase` (in readings) with no noise. `period` is clamped to
    /// 2..=[`Waveform::MAX_PERIOD`].
    pub fn new(shape: Shape, min: i32, max: i32, period: u32, phase: u32) -> Self {
        let period = period.clamp(2, Self::MAX_PERIOD);
        Self {
            shape,
            min,
            max,
            period,
            noise: 0,
            step: phase % period,
            rng: 0x9e37_79b9 ^ phase,
        }
    }

    /// Longest period in readings: keeps [`Waveform::value_at`] in 32-bit arithmetic (the
    /// 64-bit division helpers cost ~1 KB of flash on a Cortex-M3).
    pub const MAX_PERIOD: u32 = 1 << 17;

    /// Adds noise of up to ±`amplitude`, seeded by `seed`.
    pub fn with_noise(mut self, amplitude: i32, seed: u32) -> Self {
        self.noise = amplitude.max(0);
        self.rng = seed | 1;
        self
    }

    /// The noiseless value at step `s` of the period: `min + (max - min) * pos / half`,
    /// rounded toward zero, without 64-bit arithmetic.
    pub fn value_at(&self, s: u32) -> i32 {
        let p = self.period.clamp(2, Self::MAX_PERIOD);
        let s = s % p;
        let (lo, hi) = (self.min, self.max);
        match self.shape {
            Shape::Triangle => {
                let half = p / 2;
                let pos = if s <= half { s } else { p - s };
                // |max - min| * pos / half, exactly: span = q * half + r with r < half, so
                // r * pos < half² <= 2^32 (half <= 2^16).
                let span = hi.abs_diff(lo);
                let (q, r) = (span / half, span % half);
                let step = (q * pos).wrapping_add(r * pos / half);
                // The result lies between min and max, so the wrapping arithmetic is exact.
                if hi >= lo {
                    lo.wrapping_add(step as i32)
                } else {
                    lo.wrapping_sub(step as i32)
                }
            }
            Shape::Square => {
                if s < p / 2 {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn next_noise(&mut self) -> i32 {
        if self.noise == 0 {
            return 0;
        }
        // xorshift32
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        // 2 * noise + 1 <= 2^32 - 1, and the result lies in -noise..=noise.
        let span = 2 * self.noise as u32 + 1;
        ((x % span) as i32).wrapping_sub(self.noise)
    }
}

/// A simulated reading never fails.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Never {}

impl Sensor for Waveform {
    type Error = Never;
    fn read(&mut self) -> Result<i32, Never> {
        let v = self.value_at(self.step);
        self.step = (self.step + 1) % self.period.clamp(2, Self::MAX_PERIOD);
        let n = self.next_noise();
        Ok(v.saturating_add(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

    #[test]
    fn datasheet_conversion_table() {
        // TI SBOS397 table 7-1 (12-bit) and 7-2 (13-bit extended mode).
        let normal: &[(u16, i32)] = &[
            (0x7FF0, 127_937), // 127.9375 °C -> rounded toward zero
            (0x6400, 100_000),
            (0x5000, 80_000),
            (0x4B00, 75_000),
            (0x3200, 50_000),
            (0x1900, 25_000),
            (0x0040, 250),
            (0x0000, 0),
            (0xFFC0, -250),
            (0xE700, -25_000),
            (0xC900, -55_000),
        ];
        for &(reg, mc) in normal {
            assert_eq!(
                tmp102_to_millicelsius(reg.to_be_bytes(), false),
                mc,
                "{reg:#06x}"
            );
        }
        let extended: &[(u16, i32)] = &[
            (0x4B00 | 1, 150_000),
            (0x3E80 | 1, 125_000),
            (0x0C80 | 1, 25_000),
            (0x0008 | 1, 62), // 0.0625 °C, one LSB
            (0x0000 | 1, 0),
            (0xFFF8 | 1, -62),
            (0xE480 | 1, -55_000),
        ];
        for &(reg, mc) in extended {
            assert_eq!(
                tmp102_to_millicelsius(reg.to_be_bytes(), true),
                mc,
                "{reg:#06x}"
            );
        }
    }

    #[test]
    fn tmp102_reads_over_i2c() {
        let expectations = [
            Transaction::write_read(0x48, vec![0x00], vec![0x19, 0x00]), // 25 °C normal mode
            Transaction::write_read(0x48, vec![0x01], vec![0x60, 0xA0]), // config power-on default
            Transaction::write(0x48, vec![0x01, 0x60, 0xB0]),            // EM set
            Transaction::write_read(0x48, vec![0x00], vec![0x4B, 0x01]), // 150 °C extended
            Transaction::write_read(0x48, vec![0x00], vec![0xE7, 0x00]), // -25 °C normal
        ];
        let mut i2c = Mock::new(&expectations);
        let mut t = Tmp102::new(i2c.clone(), Tmp102::<Mock>::DEFAULT_ADDRESS);
        assert_eq!(t.read(), Ok(25_000));
        t.set_extended(true).unwrap();
        assert_eq!(t.read(), Ok(150_000));
        assert_eq!(t.read(), Ok(-25_000));
        i2c.done();
    }

    #[test]
    fn tmp102_bus_error_is_a_value() {
        use embedded_hal::i2c::ErrorKind;
        let expectations =
            [Transaction::write_read(0x49, vec![0x00], vec![0, 0]).with_error(ErrorKind::Other)];
        let mut i2c = Mock::new(&expectations);
        let mut t = Tmp102::new(i2c.clone(), 0x49);
        assert_eq!(t.read(), Err(ErrorKind::Other));
        i2c.done();
    }

    #[test]
    fn triangle_covers_range_and_repeats() {
        let mut w = Waveform::new(Shape::Triangle, -1000, 3000, 8, 0);
        let got: std::vec::Vec<i32> = (0..16).map(|_| w.read().unwrap()).collect();
        assert_eq!(&got[..8], &[-1000, 0, 1000, 2000, 3000, 2000, 1000, 0]);
        assert_eq!(&got[..8], &got[8..]);
        let mut s = Waveform::new(Shape::Square, 1, 2, 4, 1);
        let got: std::vec::Vec<i32> = (0..4).map(|_| s.read().unwrap()).collect();
        assert_eq!(got, [1, 2, 2, 1]);
    }

    /// The 32-bit formula agrees with the plain 64-bit one.
    #[test]
    fn value_at_matches_wide_arithmetic() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::default();
        let period = prop_oneof![2u32..50, 2u32..=Waveform::MAX_PERIOD];
        runner
            .run(
                &(any::<i32>(), any::<i32>(), period, any::<u32>()),
                |(min, max, period, s)| {
                    let w = Waveform::new(Shape::Triangle, min, max, period, 0);
                    let (p, s) = (period as i64, (s % period) as i64);
                    let half = p / 2;
                    let pos = if s <= half { s } else { p - s };
                    let want = min as i64 + (max as i64 - min as i64) * pos / half;
                    prop_assert_eq!(w.value_at(s as u32) as i64, want);
                    Ok(())
                },
            )
            .unwrap();
        let mut w = Waveform::new(Shape::Square, 0, 0, 2, 0).with_noise(i32::MAX, 3);
        for _ in 0..1000 {
            let v = w.read().unwrap();
            assert!((-i32::MAX..=i32::MAX).contains(&v));
        }
    }

    #[test]
    fn noise_stays_bounded() {
        let mut w = Waveform::new(Shape::Square, 0, 0, 2, 0).with_noise(50, 7);
        let vals: std::vec::Vec<i32> = (0..1000).map(|_| w.read().unwrap()).collect();
        assert!(vals.iter().all(|v| (-50..=50).contains(v)));
        assert!(vals.iter().any(|&v| v != vals[0]));
    }
}
