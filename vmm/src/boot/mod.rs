//! Loading a kernel and writing what its entry point expects: PVH (`hvm_start_info`) for an
//! ELF vmlinux with a PVH note, the 64-bit Linux boot protocol (`boot_params`) for a bzImage.

mod linux;
mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use crate::config::PayloadConfig;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, MMIO_HOLE_START};
use crate::memory::{memory_map, GuestMemory};

pub use linux::{BOOT_GDT_CODE64, BOOT_GDT_DATA, BOOT_GDT_TSS};

/// Errors loading the payload.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error("{path} is not a kernel: neither an ELF vmlinux nor a bzImage ({reason})")]
    NotAKernel {
        /// The file.
        path: String,
        /// What the loader said.
        reason: String,
    },
    /// The ELF/bzImage loader failed.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        source: loader::Error,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs could not be read or does not fit.
    #[error("cannot load initramfs {path}: {reason}")]
    Initramfs {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Writing boot structures failed.
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

type Result<T> = std::result::Result<T, BootError>;

/// How the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh {
        /// The PVH entry point.
        entry: GuestAddress,
        /// Address of `hvm_start_info`.
        start_info: GuestAddress,
    },
    /// 64-bit long mode with identity paging, `rsi` = `boot_params`.
    Linux64 {
        /// The 64-bit entry point.
        entry: GuestAddress,
        /// Address of `boot_params`.
        zero_page: GuestAddress,
    },
}

/// A loaded initramfs.
#[derive(Clone, Copy, Debug)]
pub struct InitramfsInfo {
    /// Where it was placed.
    pub addr: GuestAddress,
    /// Its size in bytes.
    pub size: u64,
}

/// Loads kernel, command line and initramfs, then writes the boot structures.
pub fn load_payload(
    mem: &GuestMemory,
    payload: &PayloadConfig,
    rsdp: GuestAddress,
) -> Result<BootEntry> {
    let path = payload.kernel.display().to_string();
    let file_err = |source| BootError::KernelFile {
        path: path.clone(),
        source,
    };
    let mut kernel = File::open(&payload.kernel).map_err(file_err)?;
    let mut magic = [0u8; 4];
    let is_elf = kernel.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    kernel.seek(SeekFrom::Start(0)).map_err(file_err)?;

    let result = if is_elf {
        Elf::load(mem, None, &mut kernel, Some(HIGH_RAM_START)).map_err(|source| {
            BootError::Load {
                path: path.clone(),
                source,
            }
        })?
    } else {
        BzImage::load(mem, None, &mut kernel, Some(HIGH_RAM_START)).map_err(|e| {
            BootError::NotAKernel {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?
    };

    let cmdline = load_cmdline(mem, &payload.cmdline)?;
    let initramfs = match &payload.initramfs {
        Some(p) => Some(load_initramfs(mem, p, result.kernel_end)?),
        None => None,
    };
    let map = memory_map(mem);

    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            let start_info = pvh::write_start_info(mem, &map, cmdline, rsdp, initramfs)?;
            Ok(BootEntry::Pvh { entry, start_info })
        }
        _ => {
            // A bzImage's 64-bit entry sits 0x200 past its load address; an ELF without a
            // PVH note is entered at its ELF entry.
            let entry = match result.setup_header {
                Some(_) => result.kernel_load.unchecked_add(0x200),
                None => result.kernel_load,
            };
            let zero_page = linux::write_boot_params(
                mem,
                &map,
                result.setup_header,
                &payload.cmdline,
                rsdp,
                initramfs,
            )?;
            linux::write_gdt_and_page_tables(mem)?;
            Ok(BootEntry::Linux64 { entry, zero_page })
        }
    }
}

fn load_cmdline(mem: &GuestMemory, raw: &str) -> Result<GuestAddress> {
    let cmdline =
        Cmdline::try_from(raw, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, CMDLINE_START, &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(CMDLINE_START)
}

/// Places the initramfs as high as the kernel allows in low memory, page-aligned.
fn load_initramfs(mem: &GuestMemory, path: &Path, kernel_end: u64) -> Result<InitramfsInfo> {
    let err = |reason: String| BootError::Initramfs {
        path: path.display().to_string(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
    // Linux's default initrd_addr_max is 0x37ffffff; stay below it and below the MMIO hole.
    let top = (mem.last_addr().raw_value() + 1)
        .min(MMIO_HOLE_START)
        .min(0x3800_0000);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| {
            err(format!(
                "{size} bytes do not fit in guest memory above the kernel"
            ))
        })?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| err(e.to_string()))?;
    vm_memory::Bytes::write_slice(mem, &buf, GuestAddress(addr)).map_err(|e| err(e.to_string()))?;
    Ok(InitramfsInfo {
        addr: GuestAddress(addr),
        size,
    })
}
