//! Board support for QEMU's `lm3s6965evb` shared by the firmware and the baseline binary:
//! UART0 (a PL011 at 0x4000_C000) as an `embedded_io` byte stream, a millisecond clock from
//! SysTick, semihosting console lines without `core::fmt`, `key=value` arguments from the semihosting
//! command line, and the stack high-water mark (cortex-m-rt paints the stack at reset).
#![no_std]

use core::sync::atomic::{AtomicU32, Ordering};
use cortex_m::peripheral::{syst::SystClkSource, SYST};
use cortex_m_rt::exception;
use cortex_m_semihosting::debug::{self, EXIT_FAILURE, EXIT_SUCCESS};

/// PL011 UART0 registers.
mod pl011 {
    pub const BASE: usize = 0x4000_C000;
    pub const DR: usize = BASE;
    pub const FR: usize = BASE + 0x18;
    pub const IBRD: usize = BASE + 0x24;
    pub const FBRD: usize = BASE + 0x28;
    pub const LCRH: usize = BASE + 0x2C;
    pub const CR: usize = BASE + 0x30;
    pub const FR_RXFE: u32 = 1 << 4;
    pub const FR_TXFF: u32 = 1 << 5;
    pub const LCRH_FEN: u32 = 1 << 4;
    pub const LCRH_WLEN8: u32 = 3 << 5;
    pub const CR_UARTEN: u32 = 1;
    pub const CR_TXE: u32 = 1 << 8;
    pub const CR_RXE: u32 = 1 << 9;
}

/// System control: clock gating for UART0 (RCGC1 bit 0) and GPIO port A (RCGC2 bit 0).
const SYSCTL_RCGC1: usize = 0x400F_E104;
const SYSCTL_RCGC2: usize = 0x400F_E108;
/// GPIO port A: PA0/PA1 are U0Rx/U0Tx (alternate function, digital enable).
const GPIOA_AFSEL: usize = 0x4000_4420;
const GPIOA_DEN: usize = 0x4000_451C;

fn rd(addr: usize) -> u32 {
    // SAFETY: fixed, aligned MMIO register addresses of this chip.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
fn wr(addr: usize, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// UART0 as the MQTT byte stream: 115200 8N1 with FIFOs.
pub struct Uart {
    _private: (),
}

/// UART errors (none are reported by this driver, but `embedded_io` wants a type).
#[derive(Debug, Clone, Copy)]
pub struct UartError;

impl core::fmt::Display for UartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("uart")
    }
}
impl core::error::Error for UartError {}
impl embedded_io::Error for UartError {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

impl Uart {
    /// Enables UART0 (only one instance should exist).
    pub fn take() -> Self {
        wr(SYSCTL_RCGC1, rd(SYSCTL_RCGC1) | 1);
        wr(SYSCTL_RCGC2, rd(SYSCTL_RCGC2) | 1);
        wr(GPIOA_AFSEL, rd(GPIOA_AFSEL) | 0b11);
        wr(GPIOA_DEN, rd(GPIOA_DEN) | 0b11);
        wr(pl011::CR, 0);
        // 12 MHz / (16 * 115200) = 6.51 -> IBRD 6, FBRD round(0.51 * 64) = 33.
        wr(pl011::IBRD, 6);
        wr(pl011::FBRD, 33);
        wr(pl011::LCRH, pl011::LCRH_WLEN8 | pl011::LCRH_FEN);
        wr(pl011::CR, pl011::CR_UARTEN | pl011::CR_TXE | pl011::CR_RXE);
        Uart { _private: () }
    }

    fn rx_ready() -> bool {
        rd(pl011::FR) & pl011::FR_RXFE == 0
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = UartError;
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, UartError> {
        Ok(Self::rx_ready())
    }
}

impl embedded_io::Read for Uart {
    /// Returns what the receive FIFO holds (waiting for the first byte if it is empty).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, UartError> {
        if buf.is_empty() {
            return Ok(0);
        }
        while !Self::rx_ready() {}
        let mut n = 0;
        while n < buf.len() && Self::rx_ready() {
            buf[n] = rd(pl011::DR) as u8;
            n += 1;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, UartError> {
        for &b in buf {
            while rd(pl011::FR) & pl011::FR_TXFF != 0 {}
            wr(pl011::DR, b as u32);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), UartError> {
        Ok(())
    }
}

impl waystation_firmware::Transport for Uart {
    /// The wire is always there: QEMU's chardev reconnects the TCP side on its own.
    fn open(&mut self) -> Result<(), UartError> {
        Ok(())
    }
}

static MILLIS: AtomicU32 = AtomicU32::new(0);

/// Core clock of the emulated LM3S6965 (12 MHz crystal, no PLL).
pub const CORE_HZ: u32 = 12_000_000;

/// Starts a 1 kHz SysTick interrupt.
pub fn clock_start(mut syst: SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(CORE_HZ / 1000 - 1);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

/// Milliseconds since `clock_start` (wrapping).
pub fn now_ms() -> u32 {
    MILLIS.load(Ordering::Relaxed)
}

#[exception]
fn SysTick() {
    // Single core, only this handler writes: load + store is enough (no CAS on ARMv7-M needed
    // either, but this keeps it obviously race-free).
    MILLIS.store(MILLIS.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Writes one console line over semihosting, without `core::fmt`: the `parts` as they are,
/// then each `(label, number)` field, then a newline. Both binaries log only through this (the
/// firmware's event, config and link lines included), so the board's printing code is the same
/// in the firmware and in the baseline, and the size difference is the firmware library's.
/// Numbers are `i32` or `u32` values widened to `i64`.
pub fn log(parts: &[&[u8]], fields: &[(&[u8], i64)]) {
    if let Ok(mut out) = cortex_m_semihosting::hio::hstdout() {
        for p in parts {
            let _ = out.write_all(p);
        }
        for &(label, v) in fields {
            let mut b = [0u8; 12];
            let _ = out.write_all(label);
            let _ = out.write_all(itoa(v, &mut b));
        }
        let _ = out.write_all(b"\n");
    }
}

/// Decimal text of `v`, an `i32` or `u32` value (anything in -2^32..2^32): the digits come from
/// 32-bit division, which the Cortex-M3 does in hardware (`u64` division would link ~1 KB of
/// software division helpers).
pub fn itoa(v: i64, buf: &mut [u8; 12]) -> &[u8] {
    let mut x = v.unsigned_abs() as u32;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 || i == 1 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Parses a decimal integer.
pub fn atoi(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (d - b'0') as i64;
    }
    Some(if neg { -v } else { v })
}

/// The semihosting command line (QEMU: `-semihosting-config ...,arg=a,arg=b`).
pub struct Args {
    buf: [u8; 160],
    len: usize,
}

impl Args {
    pub fn read() -> Self {
        let mut a = Args { buf: [0; 160], len: 0 };
        let mut block = [a.buf.as_mut_ptr() as usize, a.buf.len()];
        // SAFETY: SYS_GET_CMDLINE writes at most block[1] bytes to block[0] and the length back.
        let r = unsafe { cortex_m_semihosting::syscall1!(GET_CMDLINE, block.as_mut_ptr()) };
        if r == 0 {
            a.len = block[1].min(a.buf.len());
        }
        a
    }

    /// The value of `key=value`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.buf[..self.len].split(|&b| b == b' ' || b == 0).find_map(|tok| {
            let eq = tok.iter().position(|&b| b == b'=')?;
            (&tok[..eq] == key).then(|| &tok[eq + 1..])
        })
    }

    pub fn int(&self, key: &[u8], default: i64) -> i64 {
        self.get(key).and_then(atoi).unwrap_or(default)
    }
}

extern "C" {
    static _stack_start: u32;
    static _stack_end: u32;
}

/// Bytes of stack used so far: the distance from the top of RAM to the lowest word that no
/// longer holds cortex-m-rt's paint value (0xCCCC_CCCC).
pub fn stack_high_water() -> u32 {
    // SAFETY: linker symbols; only their addresses are used, and the words between them are RAM.
    unsafe {
        let top = core::ptr::addr_of!(_stack_start) as usize;
        let mut p = core::ptr::addr_of!(_stack_end) as usize;
        while p < top && core::ptr::read_volatile(p as *const u32) == 0xCCCC_CCCC {
            p += 4;
        }
        (top - p) as u32
    }
}

/// Prints `stack-high-water <n>` (parsed by the size script and the QEMU test).
pub fn print_stack() {
    log(&[], &[(b"stack-high-water ", stack_high_water() as i64)]);
}

/// Ends the QEMU run with the given status.
pub fn exit(ok: bool) -> ! {
    debug::exit(if ok { EXIT_SUCCESS } else { EXIT_FAILURE });
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    log(&[b"panic"], &[]);
    exit(false)
}
