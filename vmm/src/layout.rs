//! Where things sit in guest-physical memory (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (bzImage boot)            0x0000_6000  PVH start_info, modlist
//! 0x0000_7000  boot_params "zero page"       0x0000_9000  identity page tables (3 pages)
//! 0x0002_0000  kernel command line           0x0009_fc00  end of low RAM (EBDA and BIOS area follow)
//! 0x000e_0000  ACPI tables (RSDP first)      0x0010_0000  kernel (high memory starts)
//! 0xc000_0000  32-bit MMIO hole (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000)
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

/// The bzImage boot GDT.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (initramfs), right after start_info.
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
/// PVH memory map, after the module list.
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6080);
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Level-4 page table for the 64-bit bzImage entry.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Level-3 page table.
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
/// Level-2 page table (2 MiB pages, first GiB identity-mapped).
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line we pass (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of usable low memory; the EBDA and legacy BIOS area follow.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, in the legacy BIOS area where a guest may also scan for the RSDP.
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
/// Bytes reserved for ACPI tables.
pub const ACPI_MAX_SIZE: u64 = 0x20000;
/// Start of high memory: kernels load here.
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x10_0000);
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS region (three pages, needed by VMX; harmless elsewhere).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM's identity-map page (VMX real-mode emulation).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
