//! Saving and restoring what KVM holds for a VM: each vCPU's registers, FPU/XSAVE, MSRs,
//! LAPIC, pending events and run state; the in-kernel PIC/IOAPIC, PIT and clock.
//!
//! Everything here requires the vCPUs to be parked (VM paused).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors reading or writing KVM state.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// An ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which one.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("KVM accepted {set} of {total} MSRs (stopped at {index:#x})")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
        /// The first refused.
        index: u32,
    },
}

type Result<T> = std::result::Result<T, KvmStateError>;

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Kvm { what, source }
}

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM could read (TSC, kvmclock, APIC base, syscall MSRs, ...).
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// The MSRs worth saving: KVM's list, minus those this KVM refuses to read back.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut keep = Vec::new();
    for &index in list.as_slice() {
        // One at a time: KVM_GET_MSRS stops at the first MSR it cannot read.
        let entry = kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut one = Msrs::from_entries(&[entry]).map_err(|_| KvmStateError::Msrs {
            set: 0,
            total: 1,
            index,
        })?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            keep.push(index);
        }
    }
    Ok(keep)
}

/// Reads `vcpu`'s state; `msrs` from [`saveable_msrs`].
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &[u32]) -> Result<VcpuState> {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msr_buf = Msrs::from_entries(&entries).map_err(|_| KvmStateError::Msrs {
        set: 0,
        total: entries.len(),
        index: 0,
    })?;
    let read = vcpu.get_msrs(&mut msr_buf).map_err(ioctl("KVM_GET_MSRS"))?;
    if read != entries.len() {
        return Err(KvmStateError::Msrs {
            set: read,
            total: entries.len(),
            index: entries.get(read).map_or(0, |e| e.index),
        });
    }
    Ok(VcpuState {
        // Events first: reading them does not change them, and they describe the instant the
        // vCPU stopped.
        events: vcpu
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
        msrs: msr_buf.as_slice().to_vec(),
        lapic: vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
        debugregs: vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
    })
}

/// Writes `state` into `vcpu`, in the order KVM needs (mode before registers, MSRs before the
/// LAPIC, pending events last).
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    vcpu.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    // SAFETY: the buffer is a kvm_xsave read by KVM_GET_XSAVE from a vCPU with the same CPUID.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| KvmStateError::Msrs {
        set: 0,
        total: state.msrs.len(),
        index: 0,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != state.msrs.len() {
        return Err(KvmStateError::Msrs {
            set,
            total: state.msrs.len(),
            index: state.msrs.get(set).map_or(0, |e| e.index),
        });
    }
    vcpu.set_lapic(&state.lapic)
        .map_err(ioctl("KVM_SET_LAPIC"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    vcpu.set_vcpu_events(&state.events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The VM-wide in-kernel devices.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    /// The 8259 pair and the IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The 8254 timer.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Reads the irqchips, PIT and clock.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState> {
    let mut irqchips = Vec::with_capacity(CHIPS.len());
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(ioctl("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    let mut clock = vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
    // Only the value carries over; flags describe this host's clock source.
    clock.flags = 0;
    Ok(VmKvmState {
        irqchips,
        pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Writes the irqchips, PIT and clock.
pub fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<()> {
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(ioctl("KVM_SET_PIT2"))?;
    vm.set_clock(&state.clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    Ok(())
}
