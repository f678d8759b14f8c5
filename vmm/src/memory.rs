//! Guest RAM: its regions around the MMIO hole, the guest memory object, and the memory map
//! given to the guest (e820 / PVH memmap).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{EBDA_START, HIGH_RAM_START, MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest memory with a dirty bitmap, so writes made by the VMM itself can be tracked.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the RAM failed.
    #[error("cannot allocate {size} bytes of guest RAM: {source}")]
    Allocate {
        /// Bytes requested.
        size: u64,
        /// Why.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical RAM ranges for `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), (size - low) as usize));
    }
    ranges
}

/// Allocates guest RAM of `size` bytes.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let mem = GuestMemory::from_ranges(&ram_ranges(size))
        .map_err(|source| MemoryError::Allocate { size, source })?;
    for region in mem.iter() {
        advise_huge_pages(region);
    }
    Ok(mem)
}

/// Faults in every page of guest RAM now (MADV_POPULATE_WRITE), so a restore or an incoming
/// migration writes at memcpy speed instead of paying the host's first-touch cost (~0.5 GB/s
/// on kvm_pvm) while the guest is stopped. Only advice: an older kernel skips it.
///
/// In 64 MiB steps: one call over gigabytes holds the process's memory-map lock for seconds,
/// and every other thread that faults or spawns meanwhile (a COLO heartbeat, say) waits.
pub fn prefault(mem: &GuestMemory) {
    for region in mem.iter() {
        let len = region.len() as usize;
        let mut off = 0;
        while off < len {
            let n = PREFAULT_STEP.min(len - off);
            // SAFETY: madvise on a part of a mapping this region owns;
            // MADV_POPULATE_WRITE only allocates the pages, their contents stay zero.
            let r = unsafe {
                libc::madvise(
                    region.as_ptr().add(off).cast(),
                    n,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                log::debug!("MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error());
                break;
            }
            off += n;
        }
    }
}

/// Bytes per prefault call.
const PREFAULT_STEP: usize = 64 << 20;

/// Asks for transparent huge pages behind guest RAM: first touches and the hypervisor's page
/// tables get much cheaper (measured on kvm_pvm: 4 KiB host pages fault in at ~0.4-0.7 GB/s).
/// Only advice: a kernel without THP keeps 4 KiB pages.
fn advise_huge_pages(region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>) {
    let host = region.as_ptr();
    // SAFETY: madvise on a mapping this region owns, over exactly its length; MADV_HUGEPAGE
    // changes no contents.
    let r = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
    if r != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Kind of a memory-map entry (e820 type numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (EBDA, BIOS area holding our ACPI tables).
    Reserved = 2,
}

/// One entry of the map handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: MemoryType,
}

/// The memory map a guest sees: low RAM, the reserved legacy area, and high RAM.
pub fn memory_map(mem: &GuestMemory) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: MemoryType::Ram,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIGH_RAM_START.0 - EBDA_START,
            kind: MemoryType::Reserved,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIGH_RAM_START.0);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: MemoryType::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_HOLE_END), (1 << 30) as usize));
    }

    #[test]
    fn map_covers_all_ram_once() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let map = memory_map(&mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryType::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (64 << 20) - (HIGH_RAM_START.0 - EBDA_START));
        assert_eq!(
            map.last().unwrap().addr + map.last().unwrap().size,
            64 << 20
        );
    }
}
