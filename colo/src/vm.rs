//! What COLO needs from a VM, implemented by the VMM. COLO never sees KVM, devices or the
//! state format: it moves pages, and hands the saved state (the VM's `Stateful` snapshot,
//! opaque bytes here) from one side's `save_state` to the other side's `load_state`.

use devices::virtio::block::{BlockBackend, WriteSlot};
use devices::virtio::net::FilterSlot;
use migration::{DirtyBitmap, GuestMemoryReader, MemRange};

/// A NIC of a protected VM: where the COLO proxy joins its data path.
#[derive(Clone, Debug)]
pub struct ProtectedNic {
    /// Its tap's name (for the status and logs).
    pub tap: String,
    /// The MAC address the guest sees.
    pub mac: [u8; 6],
    /// The filter slot of its chain (and its injector).
    pub slot: FilterSlot,
}

/// A disk of a protected VM: where block replication joins its write path.
#[derive(Clone, Debug)]
pub struct ProtectedDisk {
    /// Its id (for the status and logs).
    pub id: String,
    /// Its image, which the initial sync reads through a handle of its own.
    pub path: std::path::PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The write slot of its backend.
    pub slot: WriteSlot,
}

/// A VM protected by COLO (the PVM on the primary, the SVM on the secondary).
pub trait ProtectedVm: Send + Sync {
    /// Guest RAM regions.
    fn regions(&self) -> Vec<MemRange>;
    /// Guest RAM for reading pages (while the VM runs or is paused).
    fn memory(&self) -> &dyn GuestMemoryReader;
    /// Starts dirty logging (vCPU and VMM writes); the log starts empty.
    fn start_dirty_log(&self) -> Result<(), String>;
    /// Stops dirty logging.
    fn stop_dirty_log(&self);
    /// Pages written since the last call or since logging started; clears the log.
    fn take_dirty(&self) -> Result<Vec<DirtyBitmap>, String>;
    /// Holds the VM for a checkpoint: pauses vCPUs and devices, and keeps the user from
    /// pausing or resuming it until [`Self::resume`]. `Ok(false)`: it was already paused (by
    /// the user), so the checkpoint must not run it afterwards.
    fn pause(&self) -> Result<bool, String>;
    /// The VM's state (vCPUs, devices), serialized; the VM is paused.
    fn save_state(&self) -> Result<Vec<u8>, String>;
    /// Loads state saved by the other side's `save_state`; the VM is paused.
    fn load_state(&self, state: Vec<u8>) -> Result<(), String>;
    /// Ends the checkpoint's hold; runs the VM again if `run`.
    fn resume(&self, run: bool) -> Result<(), String>;
    /// Copies bytes into guest RAM without marking them dirty (the secondary's flush: these
    /// pages are the checkpoint, not the SVM's own writes).
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), String>;
    /// The VM's NICs (the proxy supports at most one).
    fn nics(&self) -> Vec<ProtectedNic> {
        Vec::new()
    }
    /// The VM's disks, in configuration order (the primary's are replicated).
    fn disks(&self) -> Vec<ProtectedDisk> {
        Vec::new()
    }
}

/// Builds the SVM on the secondary when the primary's first message arrives.
pub trait SecondaryHost: Send {
    /// A VM for the primary's configuration (`config_json`, as the VMM serializes it), with
    /// memory laid out as `regions`, not running yet; its disks, in configuration order, are
    /// `disks` (the replicas block replication keeps).
    fn create_vm(
        &mut self,
        config_json: &str,
        vcpus: u32,
        regions: &[MemRange],
        disks: Vec<Box<dyn BlockBackend>>,
    ) -> Result<std::sync::Arc<dyn ProtectedVm>, String>;
}

/// Where COLO reports what happened (the VMM turns these into API events and its own state).
pub trait Observer: Send + Sync {
    /// An event for the event stream: `checkpoint`, `protected`, ….
    fn event(&self, name: &str, properties: serde_json::Value);
    /// Protection ended; called once, from the COLO worker thread, as its last act.
    fn exited(&self, exit: crate::status::ColoExit);
}
