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
    irq: EventFd,
}

/// The UART's registers and receive FIFO, for save/restore (vm-superio's `SerialState` has
/// no serde).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

const STATE_KIND: &str = "serial-16550";
const STATE_VERSION: u32 = 1;
/// The 16550's receive FIFO depth: a state claiming more is not from a 16550.
const FIFO_SIZE: usize = 64;

impl SerialPort {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: SerialOutput) -> io::Result<Self> {
        // A second handle lets a restore rebuild the UART around the same interrupt.
        let trigger = IrqTrigger(irq.try_clone()?);
        Ok(Self {
            uart: Serial::new(trigger, out),
            irq,
        })
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

impl crate::state::Stateful for SerialPort {
    fn save_state(&self) -> Result<crate::state::ComponentState, crate::state::StateError> {
        let s = self.uart.state();
        let snap = SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        crate::state::ComponentState::encode(STATE_KIND, STATE_VERSION, &snap)
    }

    fn restore_state(
        &mut self,
        state: &crate::state::ComponentState,
    ) -> Result<(), crate::state::StateError> {
        let s: SerialSnapshot = state.decode(STATE_KIND, STATE_VERSION)?;
        let fail = |why: String| crate::state::StateError::Mismatch {
            kind: STATE_KIND.into(),
            why,
        };
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(fail(format!(
                "{} bytes in a 64-byte FIFO",
                s.in_buffer.len()
            )));
        }
        let irq = self.irq.try_clone().map_err(|e| fail(e.to_string()))?;
        let out = self
            .uart
            .writer()
            .try_clone()
            .map_err(|e| fail(e.to_string()))?;
        let state = vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        self.uart = Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| fail(format!("{e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Stateful;

    #[test]
    fn state_round_trip_keeps_registers_and_fifo() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut a = SerialPort::new(irq, SerialOutput::Sink).unwrap();
        a.write(1, &[1]); // IER
        a.write(7, &[0x5a]); // scratch
        a.enqueue_input(b"abc");
        let saved = a.save_state().unwrap();
        let mut b = SerialPort::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            SerialOutput::Sink,
        )
        .unwrap();
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state().unwrap(), saved);
        let mut x = [0u8];
        b.read(0, &mut x);
        assert_eq!(x[0], b'a');
        b.read(7, &mut x);
        assert_eq!(x[0], 0x5a);
    }

    #[test]
    fn input_raises_interrupt_and_reads_back() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), SerialOutput::Sink).unwrap();
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
        let mut port = SerialPort::new(irq, SerialOutput::Sink).unwrap();
        let big = vec![b'x'; 1000];
        let n = port.enqueue_input(&big);
        assert!(n > 0 && n < big.len());
        assert_eq!(port.enqueue_input(b"y"), 0);
    }
}
