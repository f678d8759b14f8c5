//! The VMM's side of COLO: the VM as `colo` sees it. Pages and the dirty log are reached
//! directly from the COLO worker thread; pause, state and resume go through the control loop,
//! which owns the VM.

use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use colo::{ColoExit, Observer, ProtectedVm, SecondaryHost};
use devices::virtio::block::BlockBackend;
use migration::{DirtyBitmap, GuestMemoryReader, MemRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::dirty::DirtyTracker;
use crate::live_migration::{LoopLink, WorkerRequest};
use crate::memory::GuestMemory;

/// What COLO asks of the control loop.
pub enum ColoRequest {
    /// Hold the VM for a checkpoint and pause it; `Ok(false)` if it was already paused.
    Pause(SyncSender<Result<bool, String>>),
    /// The paused VM's state, serialized.
    Save(SyncSender<Result<Vec<u8>, String>>),
    /// Load the other side's state into the paused VM.
    Load(Vec<u8>, SyncSender<Result<(), String>>),
    /// End the checkpoint's hold; run the VM if the flag says so.
    Resume(bool, SyncSender<Result<(), String>>),
    /// Secondary: build the SVM for the primary's configuration (not running yet), on these
    /// disk backends (the replicas).
    CreateVm(
        Box<VmConfig>,
        Vec<Box<dyn BlockBackend>>,
        SyncSender<Result<VmParts, String>>,
    ),
    /// Protection ended.
    Exited(ColoExit),
}

/// The handles on a VM that the COLO worker uses directly.
#[derive(Clone)]
pub struct VmParts {
    /// Guest RAM.
    pub memory: GuestMemory,
    /// Its dirty log.
    pub dirty: DirtyTracker,
    /// RAM regions.
    pub regions: Vec<MemRange>,
    /// The NICs (for the proxy).
    pub nics: Vec<colo::vm::ProtectedNic>,
    /// The disks (for block replication).
    pub disks: Vec<colo::vm::ProtectedDisk>,
}

/// A VM of this VMM, as COLO reaches it.
pub struct ColoVm {
    parts: VmParts,
    link: LoopLink,
}

impl ColoVm {
    /// Wraps the control loop's VM.
    pub fn new(parts: VmParts, link: LoopLink) -> Self {
        ColoVm { parts, link }
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, String>>) -> ColoRequest,
    ) -> Result<T, String> {
        self.link.ask(|tx| WorkerRequest::Colo(make(tx)))
    }
}

impl ProtectedVm for ColoVm {
    fn regions(&self) -> Vec<MemRange> {
        self.parts.regions.clone()
    }

    fn memory(&self) -> &dyn GuestMemoryReader {
        &self.parts.memory
    }

    fn start_dirty_log(&self) -> Result<(), String> {
        self.parts.dirty.start().map_err(|e| e.to_string())
    }

    fn stop_dirty_log(&self) {
        if let Err(e) = self.parts.dirty.stop() {
            log::warn!("COLO: stopping the dirty log: {e}");
        }
    }

    fn take_dirty(&self) -> Result<Vec<DirtyBitmap>, String> {
        self.parts.dirty.take().map_err(|e| e.to_string())
    }

    fn pause(&self) -> Result<bool, String> {
        self.ask(ColoRequest::Pause)
    }

    fn save_state(&self) -> Result<Vec<u8>, String> {
        self.ask(ColoRequest::Save)
    }

    fn load_state(&self, state: Vec<u8>) -> Result<(), String> {
        self.ask(|tx| ColoRequest::Load(state, tx))
    }

    fn resume(&self, run: bool) -> Result<(), String> {
        self.ask(|tx| ColoRequest::Resume(run, tx))
    }

    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        write_untracked(&self.parts.memory, gpa, data)
    }

    fn nics(&self) -> Vec<colo::vm::ProtectedNic> {
        self.parts.nics.clone()
    }

    fn disks(&self) -> Vec<colo::vm::ProtectedDisk> {
        self.parts.disks.clone()
    }
}

/// Copies `data` into guest RAM at `gpa` bypassing vm-memory's dirty bitmap: the secondary's
/// flush installs the primary's pages, which are not the SVM's own writes.
fn write_untracked(memory: &GuestMemory, gpa: u64, data: &[u8]) -> Result<(), String> {
    let len = data.len() as u64;
    let region = memory
        .find_region(GuestAddress(gpa))
        .filter(|r| {
            let off = gpa - r.start_addr().0;
            off.checked_add(len).is_some_and(|end| end <= r.len())
        })
        .ok_or_else(|| format!("{gpa:#x}+{len:#x} is not inside one RAM region"))?;
    let off = (gpa - region.start_addr().0) as usize;
    // SAFETY: [off, off+len) lies inside this mapped RAM region (checked above), which lives
    // as long as `memory`; the SVM is paused, so no vCPU or device touches it meanwhile, and
    // `data` (the RAM cache) is a different mapping.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), region.as_ptr().add(off), data.len()) };
    Ok(())
}

/// Builds the SVM through the control loop.
pub struct ColoSecondaryHost {
    /// The way to the control loop.
    pub link: LoopLink,
}

impl SecondaryHost for ColoSecondaryHost {
    fn create_vm(
        &mut self,
        config_json: &str,
        vcpus: u32,
        regions: &[MemRange],
        disks: Vec<Box<dyn BlockBackend>>,
    ) -> Result<Arc<dyn ProtectedVm>, String> {
        let config: VmConfig = serde_json::from_str(config_json)
            .map_err(|e| format!("the primary's VM configuration does not parse: {e}"))?;
        config.validate().map_err(|e| e.to_string())?;
        if u32::from(config.cpus.boot) != vcpus {
            return Err("the primary's Start message contradicts its configuration".into());
        }
        let parts = self
            .link
            .ask(|tx| WorkerRequest::Colo(ColoRequest::CreateVm(Box::new(config), disks, tx)))?;
        if parts.regions != regions {
            return Err("the primary's memory layout differs from the SVM built here".into());
        }
        Ok(Arc::new(ColoVm::new(parts, self.link.clone())))
    }
}

/// Turns COLO's reports into API events and a message to the control loop.
pub struct ColoObserver {
    /// Where events go.
    pub events: api::EventMonitor,
    /// The way to the control loop.
    pub link: LoopLink,
}

impl Observer for ColoObserver {
    fn event(&self, name: &str, properties: serde_json::Value) {
        self.events.emit("colo", name, properties);
    }

    fn exited(&self, exit: ColoExit) {
        if let Err(e) = self
            .link
            .send(WorkerRequest::Colo(ColoRequest::Exited(exit)))
        {
            log::error!("COLO ended but the control loop did not hear it: {e}");
        }
    }
}

/// The parts of the control loop's VM that COLO uses directly.
pub fn parts_of(vm: &crate::vm::Vm) -> VmParts {
    VmParts {
        memory: vm.memory().clone(),
        dirty: vm.dirty_tracker(),
        regions: vm
            .memory_ranges()
            .into_iter()
            .map(|r| MemRange::new(r.gpa, r.len))
            .collect(),
        nics: vm.virtio().nics(),
        disks: vm.virtio().disks(),
    }
}

/// CRC-32 of all guest RAM, region by region in address order (`vm.memory-checksum`).
pub fn memory_checksum(memory: &GuestMemory) -> api::MemoryChecksum {
    let mut h = crc32fast::Hasher::new();
    let mut bytes = 0u64;
    for region in memory.iter() {
        // SAFETY: the region's whole mapping, alive while `memory` is borrowed; a racing
        // vCPU write could only make the checksum stale, which the caller avoids by pausing.
        let slice = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        h.update(slice);
        bytes += region.len();
    }
    api::MemoryChecksum {
        crc32: h.finalize(),
        bytes,
    }
}
