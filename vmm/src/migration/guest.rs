//! The page traits for colovmm's guest memory (vm-memory's mmap backend).

use vm_memory::{Bytes, GuestAddress};

use super::memory::{AccessError, GuestMemoryReader, GuestMemoryWriter};
use crate::memory::GuestMemory;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn reads_back_what_it_writes() {
        let mem = create_guest_memory(1 << 20).unwrap();
        GuestMemoryWriter::write(&mem, 0x2000, &[7u8; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        GuestMemoryReader::read(&mem, 0x2000, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 4096]);
        assert!(GuestMemoryReader::read(&mem, 1 << 20, &mut buf).is_err());
    }
}
