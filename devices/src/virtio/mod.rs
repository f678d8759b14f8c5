//! Virtio: the device trait, interrupt signalling, and the MMIO transport devices sit behind.

pub mod block;
pub mod mmio;
pub mod net;
pub mod queue;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::state::Stateful;
use crate::GuestMemory;

/// Device type ids (virtio 1.2 §5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
}

/// Feature bits common to all devices.
pub mod features {
    /// Virtio 1.x (modern) device.
    pub const VERSION_1: u64 = 1 << 32;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
}

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status register the driver reads, and the eventfd that KVM
/// injects (irqfd) so signalling never goes through a vCPU thread.
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt raised by writing `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Raises the interrupt with `bits` added to the status.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio interrupt lost: {e}");
        }
    }

    /// Current interrupt status.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Sets the status (restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }

    /// The eventfd KVM listens on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A queue handed to a device on activation, with the eventfd the driver's notifications arrive on.
pub struct ActiveQueue {
    /// The queue (addresses, size and ring positions).
    pub queue: Queue,
    /// Written (by KVM's ioeventfd) when the driver notifies this queue.
    pub notify: EventFd,
}

/// Run first thing on every device worker thread, with the device kind (the VMM installs the
/// thread's seccomp filter this way; devices know nothing about seccomp).
pub type WorkerInit = std::sync::Arc<dyn Fn(&'static str) + Send + Sync>;

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The device's interrupt.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The queues the driver made ready, in index order.
    pub queues: Vec<ActiveQueue>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// To run at the start of each worker thread the device spawns.
    pub worker_init: Option<WorkerInit>,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up a queue the device needs.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device could not start its worker.
    #[error("cannot start the device worker: {0}")]
    Worker(String),
}

/// A virtio device behind a transport. Its data path runs on its own worker thread(s).
pub trait VirtioDevice: Stateful + Send {
    /// The virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the data path.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the data path (driver reset); returns the queues with their ring positions.
    fn reset(&mut self) -> Vec<Queue>;
}

/// Reads `data.len()` bytes at `offset` of a config-space byte image; out of range reads as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, b) in data.iter_mut().enumerate() {
        *b = start
            .checked_add(i)
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}
