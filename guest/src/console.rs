//! COM1 (16550 at 0x3f8, IRQ 4): line output and line input.
//!
//! Every port access is a ~30 µs exit to the VMM, so output goes out in chunks of up to 16
//! bytes (the FIFO size), one LSR.THRE check and one ring-0 `rep outsb` per chunk. Input is
//! drained on the RX interrupt until LSR.DR clears (the IRQ is edge-routed, so a byte left
//! behind would never interrupt again). Only the BSP prints.

use crate::arch;
use core::fmt::{self, Write};

const FIFO: usize = 16;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

/// A 16550-compatible UART at an I/O port base.
pub struct Serial {
    base: u16,
}

/// The console UART.
pub const COM1: Serial = Serial { base: 0x3f8 };

impl Serial {
    /// 8N1, FIFOs on and cleared, OUT2 set (IRQ gate on PCs), RX-data interrupt enabled.
    pub fn enable_rx_irq(&self) {
        arch::outb(self.base + 3, 0x03);
        arch::outb(self.base + 2, 0x07);
        arch::outb(self.base + 4, 0x0b);
        arch::outb(self.base + 1, 0x01);
    }

    /// Writes all of `bytes`.
    pub fn write(&self, bytes: &[u8]) {
        for chunk in bytes.chunks(FIFO) {
            self.wait_thr_empty();
            arch::outsb(self.base, chunk);
        }
    }

    /// Waits until the transmit FIFO is empty; gives up after ~30 ms of polling so a
    /// broken UART cannot hang the guest.
    fn wait_thr_empty(&self) {
        for _ in 0..1000 {
            if arch::inb(self.base + 5) & LSR_THR_EMPTY != 0 {
                return;
            }
        }
    }

    /// A received byte, if any.
    pub fn read_byte(&self) -> Option<u8> {
        (arch::inb(self.base + 5) & LSR_DATA_READY != 0).then(|| arch::inb(self.base))
    }
}

/// Formats into a buffer and sends it when full or finished, so a line is a few big writes.
struct LineWriter {
    buf: [u8; 128],
    len: usize,
}

impl LineWriter {
    fn flush(&mut self) {
        COM1.write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints one line (a `\n` is appended).
pub fn print_line(args: fmt::Arguments) {
    let mut w = LineWriter {
        buf: [0; 128],
        len: 0,
    };
    let _ = w.write_fmt(args);
    let _ = w.write_str("\n");
    w.flush();
}

/// `println!`-style output of one line on COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}

/// Assembles input bytes into lines.
pub struct LineReader {
    buf: [u8; 256],
    len: usize,
    overflow: bool,
}

/// What a byte completed.
pub enum Input<'a> {
    /// Nothing yet (or an empty line).
    None,
    /// A non-empty line, without its terminator.
    Line(&'a str),
    /// A line that was too long or not UTF-8.
    Bad(&'static str),
}

impl LineReader {
    /// An empty reader.
    pub const fn new() -> Self {
        LineReader {
            buf: [0; 256],
            len: 0,
            overflow: false,
        }
    }

    /// Feeds one byte; `\r` and `\n` both end a line.
    pub fn push(&mut self, b: u8) -> Input<'_> {
        if b != b'\r' && b != b'\n' {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            } else {
                self.overflow = true;
            }
            return Input::None;
        }
        let (len, overflow) = (self.len, self.overflow);
        self.len = 0;
        self.overflow = false;
        if overflow {
            return Input::Bad("line too long");
        }
        match core::str::from_utf8(&self.buf[..len]) {
            Ok(s) if s.trim().is_empty() => Input::None,
            Ok(s) => Input::Line(s.trim()),
            Err(_) => Input::Bad("not utf-8"),
        }
    }
}
