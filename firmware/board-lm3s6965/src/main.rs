//! Waystation firmware on QEMU's lm3s6965evb: a simulated temperature sensor, the threshold
//! detector and the MQTT client of `waystation-firmware`, speaking MQTT over UART0 (QEMU's
//! `-serial tcp:HOST:PORT` puts the broker on the other end of the wire).
//!
//! Semihosting arguments (`key=value`, all optional): `id` (device id), `boot` (boot counter),
//! `rising`, `falling` (milli-°C), `period` (ms between readings), `keepalive` (s), `run_ms`
//! (exit with success after this long; 0 = run forever).
#![no_std]
#![no_main]

use board_lm3s6965::{self as board, log, Args, Uart};
use cortex_m_rt::entry;
use waystation_firmware::client::ClientConfig;
use waystation_firmware::detector::Thresholds;
use waystation_firmware::sensor::{Shape, Waveform};
use waystation_firmware::{Device, DeviceConfig};

/// Events kept for redelivery: small on purpose (RAM budget).
const OUTBOX: usize = 8;

#[entry]
fn main() -> ! {
    let Some(cp) = cortex_m::Peripherals::take() else { board::exit(false) };
    board::clock_start(cp.SYST);
    let uart = Uart::take();
    let args = Args::read();
    let id = match args.get(b"id") {
        // SAFETY: checked to be ASCII just before (`from_utf8` would cost ~600 bytes of flash).
        Some(s) if s.is_ascii() => unsafe { core::str::from_utf8_unchecked(s) },
        _ => "qemu-lm3s6965",
    };
    let thresholds = Thresholds {
        rising: args.int(b"rising", 30_000) as i32,
        falling: args.int(b"falling", 20_000) as i32,
        debounce: 2,
        min_interval_ms: 0,
        heartbeat_ms: 0,
    };
    let cfg = DeviceConfig {
        id,
        boot: args.int(b"boot", 1) as u32,
        sensor_name: "temp",
        sample_period_ms: args.int(b"period", 100) as u32,
        thresholds,
        client: ClientConfig {
            keep_alive_s: args.int(b"keepalive", 10) as u16,
            response_timeout_ms: 3_000,
            backoff_min_ms: 200,
            backoff_max_ms: 5_000,
        },
    };
    // 10..40 °C over 40 readings, with ±0.2 °C noise (the debounce absorbs it).
    let wave = Waveform::new(Shape::Triangle, 10_000, 40_000, 40, 0).with_noise(200, 0x5eed);
    let Ok(mut device) = Device::<_, _, OUTBOX>::new(wave, uart, &cfg) else {
        log(&[b"bad device config"], &[]);
        board::exit(false)
    };
    let run_ms = args.int(b"run_ms", 0) as u32;
    log(&[b"boot ", id.as_bytes()], &[]);
    let mut was_connected = false;
    loop {
        let now = board::now_ms();
        let act = device.poll(now);
        if let Some((seq, d)) = act.event {
            log(&[b"event ", d.direction.as_str().as_bytes()], &[(b" seq=", seq as i64)]);
        }
        match act.config {
            Some(Ok(t)) => log(&[b"config applied"], &[(b" rising=", t.rising as i64), (b" falling=", t.falling as i64)]),
            Some(Err(why)) => log(&[b"config rejected: ", why.as_bytes()], &[]),
            None => {}
        }
        let connected = device.client().is_connected();
        if connected != was_connected {
            was_connected = connected;
            log(&[if connected { b"mqtt connected" } else { b"mqtt link lost" }], &[]);
            board::print_stack();
        }
        if run_ms > 0 && now >= run_ms {
            let s = device.client().stats();
            log(
                &[b"done"],
                &[
                    (b" published=", s.published as i64),
                    (b" acknowledged=", s.acknowledged as i64),
                    (b" dropped=", s.dropped as i64),
                ],
            );
            board::print_stack();
            board::exit(true);
        }
        cortex_m::asm::wfi();
    }
}
