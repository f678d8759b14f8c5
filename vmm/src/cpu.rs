//! Per-vCPU set-up before the first KVM_RUN: CPUID, MSRs, FPU, LAPIC and, on the boot vCPU,
//! the registers the kernel's entry point expects.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::boot::{BootEntry, BOOT_GDT_CODE64, BOOT_GDT_DATA, BOOT_GDT_TSS};
use crate::layout::{BOOT_GDT_START, PML4_START};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        /// The vCPU.
        id: u8,
        /// Which operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
}

const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x4d]; // "KVMKVMKVM\0\0\0"
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// Tailors the host-supported CPUID to vCPU `id` of `count`: APIC ids, topology, hypervisor bit.
pub fn vcpu_cpuid(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let bits_for_count = u32::BITS - (u32::from(count) - 1).leading_zeros();
    let mut has_kvm_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is meaningful
                }
            }
            4 => {
                // cores per package - 1 in EAX[31:26]
                e.eax = (e.eax & 0x03ff_ffff) | ((u32::from(count) - 1) << 26);
            }
            0xb | 0x1f => {
                // One thread per core, `count` cores in one package.
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // level 0: SMT
                    }
                    1 => {
                        e.eax = bits_for_count;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1; // level 1: core
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            KVM_CPUID_SIGNATURE => {
                has_kvm_leaf = true;
                e.eax = KVM_CPUID_FEATURES;
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            _ => {}
        }
    }
    if !has_kvm_leaf {
        let mut entries = cpuid.as_slice().to_vec();
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: KVM_CPUID_SIGNATURE,
            eax: KVM_CPUID_FEATURES,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
        if let Ok(with_leaf) = CpuId::from_entries(&entries) {
            return with_leaf;
        }
    }
    cpuid
}

fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b: Vec<u8> = regs[off..off + 4].iter().map(|c| *c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// Sets everything a vCPU needs before it runs; the boot vCPU also gets its entry state.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    boot: Option<BootEntry>,
) -> Result<(), CpuError> {
    let kvm = |what| move |source| CpuError::Kvm { id, what, source };
    vcpu.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Kvm {
        id,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; the rest are conveniences, not requirements.
        log::debug!(
            "vCPU {id}: KVM took {set} of {} boot MSRs (stopped at {:#x})",
            entries.len(),
            entries[set].index
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    // LINT0 = ExtINT (the 8259 path), LINT1 = NMI, as firmware leaves them.
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7 << 8;
    const MODE_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0) & !0x700;
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, lvt0 | MODE_EXTINT);
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1) & !0x700;
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, lvt1 | MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;

    if let Some(entry) = boot {
        let (regs, sregs) = entry_state(entry, vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?);
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Registers for the boot vCPU at `entry`, starting from KVM's reset `sregs`.
fn entry_state(entry: BootEntry, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    const CODE_EXEC_READ_ACCESSED: u8 = 0xb;
    const DATA_READ_WRITE_ACCESSED: u8 = 0x3;
    const TSS_BUSY: u8 = 0xb;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            // PVH: flat 32-bit protected mode, paging off (the PVH ABI).
            regs.rip = entry.0;
            regs.rbx = start_info.0;
            sregs.cs = segment(0x08, CODE_EXEC_READ_ACCESSED, false);
            let data = segment(0x10, DATA_READ_WRITE_ACCESSED, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = kvm_segment {
                limit: 0x67,
                selector: 0x18,
                type_: TSS_BUSY,
                present: 1,
                ..Default::default()
            };
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            regs.rip = entry.0;
            regs.rsi = zero_page.0;
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
            sregs.gdt.base = BOOT_GDT_START.0;
            sregs.gdt.limit = (5 * 8 - 1) as u16;
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            sregs.cs = segment(BOOT_GDT_CODE64, CODE_EXEC_READ_ACCESSED, true);
            let data = segment(BOOT_GDT_DATA, DATA_READ_WRITE_ACCESSED, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = kvm_segment {
                selector: BOOT_GDT_TSS,
                type_: TSS_BUSY,
                present: 1,
                ..Default::default()
            };
            sregs.cr3 = PML4_START.0;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn apic_ids_and_topology() {
        let c = vcpu_cpuid(&base(), 3, 4);
        let leaf1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        let topo = c.as_slice().iter().find(|e| e.function == 0xb).unwrap();
        assert_eq!((topo.eax, topo.ebx, topo.edx), (2, 4, 3));
        let kvm = c
            .as_slice()
            .iter()
            .find(|e| e.function == KVM_CPUID_SIGNATURE)
            .unwrap();
        assert_eq!([kvm.ebx, kvm.ecx, kvm.edx], KVM_SIGNATURE);
    }

    #[test]
    fn pvh_entry_is_flat_protected_mode() {
        let (regs, sregs) = entry_state(
            BootEntry::Pvh {
                entry: vm_memory::GuestAddress(0x10_0000),
                start_info: vm_memory::GuestAddress(0x6000),
            },
            kvm_sregs::default(),
        );
        assert_eq!((regs.rip, regs.rbx), (0x10_0000, 0x6000));
        assert_eq!(sregs.cr0 & 0x8000_0001, 1);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
    }
}
