//! The board example without the firmware library: the same clock, UART, semihosting output
//! and argument parsing, echoing UART bytes instead of running the device. Its size is the
//! baseline the firmware library's flash and RAM are measured against.
//!
//! It also makes the board's own diagnostic lines of `main.rs` (the echo of event, config, link
//! and summary lines: board strings and `log` calls with the same shapes), fed here from the
//! echoed bytes so that they stay in the binary. That printing is board code that the firmware
//! binary has whatever library it links, so it belongs on this side of the difference.
#![no_std]
#![no_main]

use board_lm3s6965::{self as board, log, Args, Uart};
use cortex_m_rt::entry;
use embedded_io::{Read, ReadReady, Write};

#[entry]
fn main() -> ! {
    let Some(cp) = cortex_m::Peripherals::take() else { board::exit(false) };
    board::clock_start(cp.SYST);
    let mut uart = Uart::take();
    let args = Args::read();
    let id = args.get(b"id").unwrap_or(b"baseline");
    let run_ms = args.int(b"run_ms", 0) as u32;
    log(&[b"boot ", id], &[]);
    let mut buf = [0u8; 16];
    let mut echoed: u32 = 0;
    let mut was_connected = false;
    loop {
        let now = board::now_ms();
        if uart.read_ready().unwrap_or(false) {
            if let Ok(n) = uart.read(&mut buf) {
                let _ = uart.write(&buf[..n]);
                echoed = echoed.wrapping_add(n as u32);
                // The same diagnostic lines as main.rs, chosen by the first byte received.
                let text = buf.get(1..n).unwrap_or(&[]);
                match buf[0] {
                    b'e' => log(&[b"event ", text], &[(b" seq=", echoed as i64)]),
                    b'a' => log(&[b"config applied"], &[(b" rising=", n as i64), (b" falling=", now as i64)]),
                    b'r' => log(&[b"config rejected: ", text], &[]),
                    _ => {}
                }
                let connected = buf[0] == b'c';
                if connected != was_connected {
                    was_connected = connected;
                    log(&[if connected { b"mqtt connected" } else { b"mqtt link lost" }], &[]);
                    board::print_stack();
                }
            }
        }
        if run_ms > 0 && now >= run_ms {
            log(
                &[b"done"],
                &[(b" published=", echoed as i64), (b" acknowledged=", now as i64), (b" dropped=", run_ms as i64)],
            );
            board::print_stack();
            board::exit(true);
        }
        cortex_m::asm::wfi();
    }
}
