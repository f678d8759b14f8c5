//! Where a virtio-blk device's bytes live. The device only talks to this trait, so a
//! replicating backend (COLO's primary mirror, the secondary's active/hidden disks) slots in
//! without touching the device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Block storage addressed in bytes.
pub trait BlockBackend: Send {
    /// Size in bytes (fixed while the device runs).
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The range's content may be dropped (reads back as zeroes afterwards for raw files).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// The range must read back as zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// A raw image file.
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens `path` read-write, or read-only when `readonly`.
    pub fn open(path: &Path, readonly: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (off, len) = (
            libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?,
            libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?,
        );
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self
            .fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        // Filesystems without ZERO_RANGE: write the zeroes.
        let zeroes = vec![0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_file_round_trip() {
        let path = std::env::temp_dir().join(format!("colovmm-raw-{}", std::process::id()));
        std::fs::write(&path, vec![0xaau8; 1 << 20]).unwrap();
        let mut b = RawFile::open(&path, false).unwrap();
        assert_eq!(b.size(), 1 << 20);
        b.write_at(4096, b"hello").unwrap();
        let mut buf = [0u8; 5];
        b.read_at(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        b.write_zeroes(4096, 4096).unwrap();
        b.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0; 5]);
        b.flush().unwrap();
        // Reading past the end is an error, not a short read.
        let mut big = vec![0u8; 8192];
        assert!(b.read_at((1 << 20) - 4096, &mut big).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn readonly_refuses_writes() {
        let path = std::env::temp_dir().join(format!("colovmm-ro-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mut b = RawFile::open(&path, true).unwrap();
        assert!(b.write_at(0, b"x").is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
