//! An in-memory disk for the block tests.

use std::io;

use devices::virtio::block::BlockBackend;

/// An in-memory disk; ranges past its end are refused.
pub(super) struct Mem(pub Vec<u8>);

impl BlockBackend for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        let src = self
            .0
            .get(o..o + buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        self.0
            .get_mut(o..o + buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?
            .copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(offset, &vec![0; len as usize])
    }
}
