//! colovmm's VMM: builds a KVM VM from a [`config::VmConfig`] and runs it.
//!
//! Boot steps, in order: KVM VM → guest memory → irqchip + PIT → legacy devices → ACPI tables →
//! kernel, command line, initramfs → vCPUs → run.

pub mod acpi;
pub mod api_server;
pub mod boot;
pub mod cli;
pub mod colo_host;
pub mod control;
mod control_colo;
pub use api::config;
pub mod console;
pub mod cpu;
pub mod dirty;
pub mod layout;
pub mod live_migration;
pub mod logger;
pub mod memory;
pub use migration;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod virtio_devices;
pub mod vm;
pub mod vm_state;

pub use control::{Vmm, VmmExit};
pub use vm::{Vm, VmError, VmOutcome};
