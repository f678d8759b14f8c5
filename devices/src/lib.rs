//! Devices of a colovmm VM: the port/MMIO buses they sit on and the legacy platform devices.
//!
//! Devices never depend on the VMM or on COLO: they are driven through [`bus::BusDevice`] and report
//! guest-initiated lifecycle changes (power-off, reset) through [`VmExitEvent`].

pub mod acpi_power;
pub mod bus;
pub mod legacy;
pub mod rate_limit;
pub mod state;
pub mod virtio;

use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: with the bitmap that records the VMM's own writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Why the guest asked to stop running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitRequest {
    /// ACPI S5 (power off).
    PowerOff,
    /// A reset through the i8042 or the ACPI reset register.
    Reset,
    /// The guest stopped abnormally (triple fault, emulation failure); the text says how.
    Crash(String),
}

/// Shared channel by which a device tells the VMM's control loop that the guest wants to stop.
///
/// The first request wins: a guest that resets after powering off has already left.
pub struct VmExitEvent {
    fd: EventFd,
    reason: Mutex<Option<ExitRequest>>,
}

impl VmExitEvent {
    /// Creates the event; the control loop waits on [`VmExitEvent::fd`].
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            fd: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `req` (unless one is already pending) and wakes the control loop.
    pub fn request(&self, req: ExitRequest) {
        if let Ok(mut reason) = self.reason.lock() {
            reason.get_or_insert(req);
        }
        if let Err(e) = self.fd.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    /// The pending request, if any.
    pub fn pending(&self) -> Option<ExitRequest> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// The eventfd that becomes readable when a request is made.
    pub fn fd(&self) -> &EventFd {
        &self.fd
    }
}
