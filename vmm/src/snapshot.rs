//! Snapshot and restore: a paused VM's complete state (KVM, devices, memory) written to a
//! directory, and a VM rebuilt from one.
//!
//! Layout of `file:///DIR`: `state.json` ([`VmSnapshot`], versioned) and `memory` (guest RAM,
//! the regions listed in `state.json`, back to back). The same [`VmSnapshot`] travels in the
//! migration stream's `State` message.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use api::VmState;
use devices::state::{ComponentState, StateError, Stateful};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::console::Console;
use crate::seccomp::SeccompMode;
use crate::vm::{Start, Vm, VmError};
use crate::vm_state::{
    restore_vcpu, restore_vm, save_vcpu, save_vm, saveable_msrs, KvmStateError, VcpuState,
    VmKvmState,
};

/// Format version of [`VmSnapshot`]; a different one is refused.
pub const SNAPSHOT_VERSION: u32 = 1;
const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory";

/// Errors taking or applying a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Only `file:///DIR` is understood.
    #[error("unsupported snapshot URL '{0}' (expected file:///DIR)")]
    Url(String),
    /// The VM must be paused.
    #[error("the VM must be paused to snapshot it (it is {0:?})")]
    NotPaused(VmState),
    /// The destination directory holds a snapshot already.
    #[error("{0} already holds a snapshot")]
    NotEmpty(String),
    /// KVM state.
    #[error(transparent)]
    Kvm(#[from] KvmStateError),
    /// A device's state.
    #[error("device state: {0}")]
    Device(#[from] StateError),
    /// Reading or writing the files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// state.json does not parse.
    #[error("{path} is not a colovmm snapshot: {why}")]
    Format {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// Written by another format version.
    #[error("snapshot version {found} is not supported (this colovmm reads {SNAPSHOT_VERSION})")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The snapshot does not fit the VM it is applied to.
    #[error("snapshot does not match the VM: {0}")]
    Mismatch(String),
    /// Guest memory access.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Building the VM.
    #[error(transparent)]
    Vm(#[from] Box<VmError>),
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// One guest RAM region as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Everything about a VM except its memory contents.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The configuration to rebuild the same hardware.
    pub config: VmConfig,
    /// Per-vCPU state, by id.
    pub vcpus: Vec<VcpuState>,
    /// Irqchips, PIT, clock.
    pub kvm: VmKvmState,
    /// COM1.
    pub serial: ComponentState,
    /// virtio transports with their devices, in slot order.
    pub virtio: Vec<ComponentState>,
    /// Guest RAM regions, in the order the memory follows.
    pub memory: Vec<MemoryRange>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The VM configuration recorded in a snapshot directory.
pub fn read_config(dir: &Path) -> Result<VmConfig> {
    #[derive(Deserialize)]
    struct ConfigOnly {
        version: u32,
        config: VmConfig,
    }
    let path = dir.join(STATE_FILE);
    let raw = std::fs::read(&path).map_err(io_err(&path))?;
    let c: ConfigOnly = serde_json::from_slice(&raw).map_err(|e| SnapshotError::Format {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    if c.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version { found: c.version });
    }
    Ok(c.config)
}

/// The directory of a `file:///DIR` URL.
pub fn url_dir(url: &str) -> Result<PathBuf> {
    match url.strip_prefix("file://") {
        Some(p) if p.starts_with('/') && p.len() > 1 => Ok(PathBuf::from(p)),
        _ => Err(SnapshotError::Url(url.to_string())),
    }
}

/// The RAM regions of `memory`.
pub fn memory_ranges_of(memory: &crate::memory::GuestMemory) -> Vec<MemoryRange> {
    memory
        .iter()
        .map(|r| MemoryRange {
            gpa: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

impl Vm {
    /// The guest RAM regions.
    pub fn memory_ranges(&self) -> Vec<MemoryRange> {
        memory_ranges_of(&self.memory)
    }

    /// Captures everything but memory; the VM must be paused (vCPUs parked, devices stopped).
    pub fn save_snapshot(&self) -> Result<VmSnapshot> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::NotPaused(self.state));
        }
        let mut vcpus = Vec::with_capacity(self.vcpu_fds.len());
        for fd in &self.vcpu_fds {
            let fd = fd
                .lock()
                .map_err(|_| SnapshotError::Memory("vCPU lock".into()))?;
            // Probing is one ioctl per MSR: done once, not in every checkpoint's pause.
            let list = match self.msr_list.get() {
                Some(l) => l,
                None => {
                    let probed = saveable_msrs(&self.kvm, &fd)?;
                    self.msr_list.get_or_init(|| probed)
                }
            };
            vcpus.push(save_vcpu(&fd, list)?);
        }
        let serial = match self.serial.lock() {
            Ok(s) => s.save_state()?,
            Err(p) => p.into_inner().save_state()?,
        };
        Ok(VmSnapshot {
            version: SNAPSHOT_VERSION,
            config: self.config.clone(),
            vcpus,
            kvm: save_vm(&self.fd)?,
            serial,
            virtio: self.virtio.save_all()?,
            memory: self.memory_ranges(),
        })
    }

    /// Applies `snap` (everything but memory) to this VM, built from the same configuration.
    pub fn apply_snapshot(&mut self, snap: &VmSnapshot) -> Result<()> {
        if snap.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                found: snap.version,
            });
        }
        if snap.vcpus.len() != self.vcpu_fds.len() {
            return Err(SnapshotError::Mismatch(format!(
                "{} vCPUs saved, {} here",
                snap.vcpus.len(),
                self.vcpu_fds.len()
            )));
        }
        if snap.memory != self.memory_ranges() {
            return Err(SnapshotError::Mismatch(format!(
                "memory layout {:?} saved, {:?} here",
                snap.memory,
                self.memory_ranges()
            )));
        }
        for (fd, state) in self.vcpu_fds.iter().zip(&snap.vcpus) {
            let fd = fd
                .lock()
                .map_err(|_| SnapshotError::Memory("vCPU lock".into()))?;
            restore_vcpu(&fd, state)?;
        }
        restore_vm(&self.fd, &snap.kvm)?;
        match self.serial.lock() {
            Ok(mut s) => s.restore_state(&snap.serial)?,
            Err(p) => p.into_inner().restore_state(&snap.serial)?,
        }
        self.virtio.restore_all(&snap.virtio)?;
        self.state = VmState::Paused;
        Ok(())
    }

    /// Writes a snapshot of this paused VM to `file:///DIR`.
    pub fn snapshot_to(&self, url: &str) -> Result<()> {
        let dir = url_dir(url)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let state_path = dir.join(STATE_FILE);
        if state_path.exists() {
            return Err(SnapshotError::NotEmpty(dir.display().to_string()));
        }
        let snap = self.save_snapshot()?;
        let mem_path = dir.join(MEMORY_FILE);
        let mut mem_file = BufWriter::new(File::create(&mem_path).map_err(io_err(&mem_path))?);
        for r in &snap.memory {
            self.memory
                .write_all_volatile_to(GuestAddress(r.gpa), mem_file.get_mut(), r.len as usize)
                .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        }
        mem_file.flush().map_err(io_err(&mem_path))?;
        mem_file.get_ref().sync_all().map_err(io_err(&mem_path))?;
        // state.json last: its presence marks a complete snapshot.
        let json = serde_json::to_vec(&snap).map_err(|e| SnapshotError::Format {
            path: state_path.display().to_string(),
            why: e.to_string(),
        })?;
        let tmp = dir.join(".state.json.tmp");
        std::fs::write(&tmp, json).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &state_path).map_err(io_err(&state_path))?;
        Ok(())
    }

    /// Rebuilds a VM from `file:///DIR`; it comes up paused.
    pub fn restore_from(url: &str, console: &Console, seccomp: SeccompMode) -> Result<Vm> {
        let dir = url_dir(url)?;
        let state_path = dir.join(STATE_FILE);
        let raw = std::fs::read(&state_path).map_err(io_err(&state_path))?;
        let snap: VmSnapshot = serde_json::from_slice(&raw).map_err(|e| SnapshotError::Format {
            path: state_path.display().to_string(),
            why: e.to_string(),
        })?;
        if snap.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                found: snap.version,
            });
        }
        let mem_path = dir.join(MEMORY_FILE);
        let mut mem_file = File::open(&mem_path).map_err(io_err(&mem_path))?;
        let want: u64 = snap.memory.iter().map(|r| r.len).sum();
        let have = mem_file.metadata().map_err(io_err(&mem_path))?.len();
        if have != want {
            return Err(SnapshotError::Mismatch(format!(
                "memory file is {have} bytes, state.json describes {want}"
            )));
        }
        let mut vm = Vm::build(&snap.config, console, seccomp, Start::Restore)
            .map_err(|e| SnapshotError::Vm(Box::new(e)))?;
        if snap.memory != vm.memory_ranges() {
            return Err(SnapshotError::Mismatch("memory layout".into()));
        }
        for r in &snap.memory {
            vm.memory
                .read_exact_volatile_from(GuestAddress(r.gpa), &mut mem_file, r.len as usize)
                .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        }
        vm.apply_snapshot(&snap)?;
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(url_dir("file:///tmp/s").unwrap(), PathBuf::from("/tmp/s"));
        assert!(url_dir("file://relative").is_err());
        assert!(url_dir("tcp:1.2.3.4:5").is_err());
        assert!(url_dir("file:///").is_err());
    }
}
