//! The hardware-reduced ACPI sleep-control and reset register (one byte at one I/O port).
//!
//! The FADT points both SLEEP_CONTROL_REG and RESET_REG here; the DSDT's `_S5_` gives SLP_TYP 5.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequest, VmExitEvent};

/// I/O port of the register.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// SLP_TYP value of S5 that the DSDT advertises.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value the FADT's RESET_REG asks the guest to write.
pub const RESET_VALUE: u8 = 1;
const SLP_EN: u8 = 1 << 5;

/// Turns guest writes of "S5 + SLP_EN" or the reset value into VM exit requests.
pub struct AcpiSleepControl {
    exit: Arc<VmExitEvent>,
}

impl AcpiSleepControl {
    /// A register that reports to `exit`.
    pub fn new(exit: Arc<VmExitEvent>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken" since we never sleep.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if value == RESET_VALUE {
            self.exit.request(ExitRequest::Reset);
        } else if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
            self.exit.request(ExitRequest::PowerOff);
        } else {
            log::debug!("ignored ACPI sleep-control write {value:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let exit = Arc::new(VmExitEvent::new().unwrap());
        let mut dev = AcpiSleepControl::new(exit.clone());
        dev.write(0, &[(3 << 2) | SLP_EN]); // S3 is not supported: ignored
        assert_eq!(exit.pending(), None);
        dev.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.pending(), Some(ExitRequest::PowerOff));

        let exit = Arc::new(VmExitEvent::new().unwrap());
        let mut dev = AcpiSleepControl::new(exit.clone());
        dev.write(0, &[RESET_VALUE]);
        assert_eq!(exit.pending(), Some(ExitRequest::Reset));
    }
}
