//! PVH `hvm_start_info`: memory map and command line, copied into fixed buffers before
//! anything else touches memory (the loader may have put them where the heap or the AP
//! trampoline will go).

use core::ptr::read_unaligned;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_REGIONS: usize = 64;
const MAX_CMDLINE: usize = 1024;
const E820_RAM: u32 = 1;

/// One memory map entry.
#[derive(Clone, Copy, Default)]
pub struct Region {
    /// Physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// What the loader told us.
pub struct BootInfo {
    regions: [Region; MAX_REGIONS],
    nregions: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// Physical address of the ACPI RSDP, 0 if not given.
    pub rsdp: u64,
}

/// Reads `T` at a physical address (identity mapped).
fn phys<T: Copy>(addr: u64) -> T {
    // SAFETY: the loader hands us addresses of its own structures inside guest RAM, which
    // is identity mapped; unaligned reads are fine on x86.
    unsafe { read_unaligned(addr as *const T) }
}

impl BootInfo {
    /// Parses the start_info at `paddr`; panics if it is not a PVH start_info with a memmap.
    pub fn parse(paddr: u64) -> BootInfo {
        let magic: u32 = phys(paddr);
        assert!(
            magic == START_INFO_MAGIC,
            "bad hvm_start_info magic {magic:#x}"
        );
        let version: u32 = phys(paddr + 4);
        let cmdline_paddr: u64 = phys(paddr + 24);
        let rsdp: u64 = phys(paddr + 32);
        assert!(version >= 1, "hvm_start_info version 0 has no memory map");
        let memmap_paddr: u64 = phys(paddr + 40);
        let entries: u32 = phys(paddr + 48);

        let mut info = BootInfo {
            regions: [Region::default(); MAX_REGIONS],
            nregions: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp,
        };
        for i in 0..(entries as usize).min(MAX_REGIONS) {
            let e = memmap_paddr + 24 * i as u64;
            info.regions[i] = Region {
                addr: phys(e),
                size: phys(e + 8),
                kind: phys(e + 16),
            };
            info.nregions += 1;
        }
        if cmdline_paddr != 0 {
            while info.cmdline_len < MAX_CMDLINE {
                let b: u8 = phys(cmdline_paddr + info.cmdline_len as u64);
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
        info
    }

    /// The memory map as given.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.nregions]
    }

    /// RAM (type 1) entries.
    pub fn ram(&self) -> impl Iterator<Item = &Region> + '_ {
        self.regions()
            .iter()
            .filter(|r| r.kind == E820_RAM && r.size > 0)
    }

    /// Total RAM rounded to the nearest MiB.
    pub fn ram_mib(&self) -> u64 {
        let bytes: u64 = self.ram().map(|r| r.size).sum();
        (bytes + (1 << 19)) >> 20
    }

    /// The values of every `key=value` word with this key, in order.
    pub fn cmdline_values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let line = core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("");
        line.split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter(move |(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The value of the first `key=value` word on the command line.
    pub fn cmdline_value(&self, key: &str) -> Option<&str> {
        let line = core::str::from_utf8(&self.cmdline[..self.cmdline_len]).ok()?;
        line.split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}
