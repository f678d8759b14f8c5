//! Just enough of the i8042 keyboard controller for a guest to reset the machine (`out 0x64, 0xfe`).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequest, VmExitEvent};

/// First I/O port of the controller (data at +0, status/command at +4).
pub const I8042_BASE: u16 = 0x60;
/// Length of the port range (0x60..=0x64).
pub const I8042_LEN: u16 = 5;
const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// An i8042 with no keyboard attached.
pub struct I8042 {
    exit: Arc<VmExitEvent>,
}

impl I8042 {
    /// A controller that reports resets to `exit`.
    pub fn new(exit: Arc<VmExitEvent>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; no keyboard data ever.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(ExitRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let exit = Arc::new(VmExitEvent::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]); // data port: not a command
        dev.write(CMD_OFFSET, &[0xaa]); // self-test: ignored
        assert_eq!(exit.pending(), None);
        dev.write(CMD_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.pending(), Some(ExitRequest::Reset));
        assert_eq!(exit.fd().read().unwrap(), 1);
    }
}
