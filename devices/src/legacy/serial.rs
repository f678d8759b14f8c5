//! COM1: a 16550 UART (vm-superio) whose interrupt is an eventfd wired to an irqfd.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Length of the UART's port range.
pub const COM1_LEN: u16 = 8;
/// ISA IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by writing the eventfd that KVM's irqfd listens on.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub enum SerialOutput {
    /// colovmm's standard output.
    Stdout(io::Stdout),
    /// A file, truncated at start.
    File(File),
    /// The client currently connected to a Unix socket (output is dropped while none is).
    Socket(Arc<Mutex<Option<UnixStream>>>),
    /// Nowhere.
    Sink,
}

impl SerialOutput {
    /// Another handle on the same destination (a VM rebooted through the API keeps its console).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            SerialOutput::Stdout(_) => SerialOutput::Stdout(io::stdout()),
            SerialOutput::File(f) => SerialOutput::File(f.try_clone()?),
            SerialOutput::Socket(c) => SerialOutput::Socket(c.clone()),
            SerialOutput::Sink => SerialOutput::Sink,
        })
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Stdout(s) => s.write(buf),
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Socket(client) => {
                if let Ok(mut guard) = client.lock() {
                    if let Some(stream) = guard.as_mut() {
                        if stream.write_all(buf).is_err() {
                            // The client went away: drop it, keep the guest running.
                            *guard = None;
                        }
                    }
                }
                Ok(buf.len())
            }
            SerialOutput::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Stdout(s) => s.flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Socket(_) | SerialOutput::Sink => Ok(()),
        }
    }
}

/// The UART as a bus device, plus the input path used by the VMM's console reader.
pub struct SerialPort {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialPort {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, b) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_raises_interrupt_and_reads_back() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), SerialOutput::Sink);
        port.write(1, &[1]); // IER: receive-data interrupt on
        assert_eq!(port.enqueue_input(b"hi"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        port.read(0, &mut b);
        assert_eq!(b[0], b'h');
    }

    #[test]
    fn full_fifo_takes_nothing_more() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq, SerialOutput::Sink);
        let big = vec![b'x'; 1000];
        let n = port.enqueue_input(&big);
        assert!(n > 0 && n < big.len());
        assert_eq!(port.enqueue_input(b"y"), 0);
    }
}
