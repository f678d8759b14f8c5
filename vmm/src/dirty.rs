//! Which guest pages changed: KVM's dirty log (writes by vCPUs) OR'ed with the bitmap of
//! writes the VMM itself makes into guest memory (virtio used rings, rx buffers, disk reads).
//! Without the second half a migration or checkpoint would silently lose device writes.

use std::sync::Arc;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::vm::{set_memory_slots, Vm, VmError};

/// Bits per bitmap word; one bit per 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;

pub use migration::DirtyBitmap;

/// A handle on a VM's dirty pages that a migration or checkpoint thread can keep.
#[derive(Clone)]
pub struct DirtyTracker {
    fd: Arc<VmFd>,
    memory: GuestMemory,
}

impl Vm {
    /// A tracker for this VM's memory (logging starts with [`DirtyTracker::start`]).
    pub fn dirty_tracker(&self) -> DirtyTracker {
        DirtyTracker {
            fd: self.fd.clone(),
            memory: self.memory.clone(),
        }
    }
}

impl DirtyTracker {
    /// Starts logging: KVM tracks vCPU writes from now on; the VMM's bitmap starts empty.
    pub fn start(&self) -> Result<(), VmError> {
        set_memory_slots(&self.fd, &self.memory, KVM_MEM_LOG_DIRTY_PAGES)?;
        for region in self.memory.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
        Ok(())
    }

    /// Stops KVM's logging.
    pub fn stop(&self) -> Result<(), VmError> {
        set_memory_slots(&self.fd, &self.memory, 0)
    }

    /// Pages written since the last call (or since logging started), both by vCPUs and by the
    /// VMM; reading clears both logs.
    pub fn take(&self) -> Result<Vec<DirtyBitmap>, VmError> {
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let len = region.len();
                let mut words =
                    self.fd
                        .get_dirty_log(slot as u32, len as usize)
                        .map_err(|source| VmError::Kvm {
                            what: "KVM_GET_DIRTY_LOG",
                            source,
                        })?;
                let vmm = std::ops::Deref::deref(region).bitmap().get_and_reset();
                for (w, v) in words.iter_mut().zip(vmm) {
                    *w |= v;
                }
                Ok(DirtyBitmap {
                    gpa: region.start_addr().0,
                    len,
                    words,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemoryConfig, PayloadConfig, SerialConfig, VmConfig};
    use crate::console::Console;
    use crate::seccomp::SeccompMode;
    use crate::vm::Start;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vmm_writes_are_in_the_dirty_set() {
        let config = VmConfig {
            payload: PayloadConfig {
                kernel: "/nonexistent".into(),
                initramfs: None,
                cmdline: String::new(),
            },
            memory: MemoryConfig { size: 32 << 20 },
            cpus: Default::default(),
            serial: SerialConfig::Off,
            disks: Vec::new(),
            nets: Vec::new(),
        };
        let console = Console::open(&SerialConfig::Off).unwrap();
        let vm = Vm::build(&config, &console, SeccompMode::Off, Start::Restore).unwrap();
        let dirty = vm.dirty_tracker();
        dirty.start().unwrap();
        assert_eq!(dirty.take().unwrap()[0].count(), 0, "clean after start");
        // What a device does: write into guest memory through the VMM's mapping. KVM's log
        // cannot see this; only the VMM's bitmap can.
        vm.memory()
            .write_slice(&[0xab; 8], GuestAddress(5 * PAGE_SIZE + 100))
            .unwrap();
        let pages = dirty.take().unwrap();
        assert!(pages[0].is_dirty(5 * PAGE_SIZE), "device write lost");
        assert_eq!(pages[0].count(), 1);
        assert_eq!(dirty.take().unwrap()[0].count(), 0, "reading clears");
        dirty.stop().unwrap();
    }
}
