//! The page traits for colovmm's guest memory (vm-memory's mmap backend).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{AccessError, GuestMemoryReader, GuestMemoryWriter};
/// colovmm's guest memory: vm-memory's mmap backend with a dirty bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

impl GuestMemoryReader for GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.read_slice(buf, GuestAddress(gpa))
            .map_err(|e| Box::new(e) as AccessError)
    }
}

/// Writes go through vm-memory, so they also set its dirty bitmap: clear it after a restore if
/// something reads it.
impl GuestMemoryWriter for GuestMemory {
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        self.write_slice(data, GuestAddress(gpa))
            .map_err(|e| Box::new(e) as AccessError)
    }

    /// Drops the pages instead of writing zeroes (anonymous private memory reads back as
    /// zeroes after MADV_DONTNEED): an idle guest's RAM is mostly zero, and writing it all on
    /// the destination cost more than sending it.
    fn write_zeroes(&self, gpa: u64, len: u64) -> Result<(), AccessError> {
        let addr = GuestAddress(gpa);
        self.find_region(addr)
            .filter(|r| {
                let start = gpa - r.start_addr().0;
                start.checked_add(len).is_some_and(|end| end <= r.len())
            })
            .ok_or_else(|| format!("zero range {gpa:#x}+{len:#x} is not inside one region"))?;
        let host = self
            .get_host_address(addr)
            .map_err(|e| Box::new(e) as AccessError)?;
        // SAFETY: [host, host+len) lies inside one mapping this memory owns (checked above),
        // page-aligned as the protocol guarantees; MADV_DONTNEED only replaces the contents
        // with zeroes, which is what was asked.
        let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
        if r == 0 {
            return Ok(());
        }
        // Not page-aligned or not anonymous: write the zeroes.
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64);
            GuestMemoryWriter::write(self, gpa + done, &ZEROES[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_guest_memory(size: u64) -> Result<GuestMemory, vm_memory::mmap::FromRangesError> {
        GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)])
    }

    #[test]
    fn reads_back_what_it_writes() {
        let mem = create_guest_memory(1 << 20).unwrap();
        GuestMemoryWriter::write(&mem, 0x2000, &[7u8; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        GuestMemoryReader::read(&mem, 0x2000, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 4096]);
        assert!(GuestMemoryReader::read(&mem, 1 << 20, &mut buf).is_err());
    }

    #[test]
    fn zero_ranges_read_back_as_zeroes() {
        let mem = create_guest_memory(1 << 20).unwrap();
        GuestMemoryWriter::write(&mem, 0x3000, &[9u8; 8192]).unwrap();
        GuestMemoryWriter::write_zeroes(&mem, 0x3000, 4096).unwrap();
        let mut buf = [0xffu8; 8192];
        GuestMemoryReader::read(&mem, 0x3000, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 0));
        assert!(
            buf[4096..].iter().all(|b| *b == 9),
            "the next page is untouched"
        );
        assert!(GuestMemoryWriter::write_zeroes(&mem, (1 << 20) - 4096, 8192).is_err());
    }
}
