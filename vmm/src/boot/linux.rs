//! The 64-bit Linux boot protocol: `boot_params` with an e820 map, a flat GDT and identity
//! page tables so the vCPU can start directly in long mode.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{BootError, InitramfsInfo};
use crate::layout::{
    BOOT_GDT_START, CMDLINE_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};
use crate::memory::{GuestMemory, MemoryMapEntry};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// GDT selector of the 64-bit code segment.
pub const BOOT_GDT_CODE64: u16 = 0x10;
/// GDT selector of the data segment.
pub const BOOT_GDT_DATA: u16 = 0x18;
/// GDT selector of the TSS.
pub const BOOT_GDT_TSS: u16 = 0x20;

/// The boot GDT: null, null, code64, data, TSS (Linux expects __BOOT_CS = 0x10, __BOOT_DS = 0x18).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // code: present, DPL 0, long mode
    0x00cf_9300_0000_ffff, // data: present, writable, 4 GiB
    0x0080_8b00_0000_0000, // 64-bit TSS, busy
];

/// Writes `boot_params` for a bzImage (or a plain ELF without PVH); returns its address.
pub fn write_boot_params(
    mem: &GuestMemory,
    map: &[MemoryMapEntry],
    header: Option<setup_header>,
    cmdline: &str,
    rsdp: GuestAddress,
    initramfs: Option<InitramfsInfo>,
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    if map.len() > params.e820_table.len() {
        return Err(BootError::BootParams(format!(
            "{} memory-map entries, the zero page holds {}",
            map.len(),
            params.e820_table.len()
        )));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, ZERO_PAGE_START),
        mem,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))?;
    Ok(ZERO_PAGE_START)
}

/// Writes the GDT and page tables identity-mapping the first GiB with 2 MiB pages.
pub fn write_gdt_and_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let err = |e: vm_memory::GuestMemoryError| BootError::BootParams(e.to_string());
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, BOOT_GDT_START.unchecked_add(i as u64 * 8))
            .map_err(err)?;
    }
    mem.write_obj(PDPTE_START.0 | 0x03, PML4_START)
        .map_err(err)?;
    mem.write_obj(PDE_START.0 | 0x03, PDPTE_START)
        .map_err(err)?;
    for i in 0..512u64 {
        // present | writable | 2 MiB page
        mem.write_obj((i << 21) | 0x83, PDE_START.unchecked_add(i * 8))
            .map_err(err)?;
    }
    Ok(())
}
