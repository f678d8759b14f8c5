//! The PVH boot protocol: `hvm_start_info`, its memory map and module list.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::{BootError, InitramfsInfo};
use crate::layout::{PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::memory::{GuestMemory, MemoryMapEntry};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes `hvm_start_info` and what it points to; returns its address (the entry's `rbx`).
pub fn write_start_info(
    mem: &GuestMemory,
    map: &[MemoryMapEntry],
    cmdline: GuestAddress,
    rsdp: GuestAddress,
    initramfs: Option<InitramfsInfo>,
) -> Result<GuestAddress, BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: cmdline.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, PVH_INFO_START);
    if let Some(initrd) = initramfs {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START.0;
        params = BootParams::new(&info, PVH_INFO_START);
        let module = hvm_modlist_entry {
            paddr: initrd.addr.0,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], PVH_MODLIST_START);
    }
    params.set_sections(&memmap, PVH_MEMMAP_START);
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))?;
    Ok(PVH_INFO_START)
}
