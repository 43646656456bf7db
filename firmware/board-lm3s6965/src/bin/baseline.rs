//! The board example without the firmware library: the same clock, UART, semihosting output
//! and argument parsing, echoing UART bytes instead of running the device. Its size is the
//! baseline the firmware library's flash and RAM are measured against.
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
    loop {
        if uart.read_ready().unwrap_or(false) {
            if let Ok(n) = uart.read(&mut buf) {
                let _ = uart.write(&buf[..n]);
                echoed = echoed.wrapping_add(n as u32);
            }
        }
        let now = board::now_ms();
        if run_ms > 0 && now >= run_ms {
            log(&[b"done"], &[(b" echoed=", echoed as i64)]);
            board::print_stack();
            board::exit(true);
        }
        cortex_m::asm::wfi();
    }
}
