//! Where a virtio-blk device's bytes live. The device only talks to this trait, so a
//! replicating backend (COLO's primary mirror, the secondary's active/hidden disks) slots in
//! without touching the device.
//!
//! Request data moves through [`BlockBackend::read_to_guest`] and
//! [`BlockBackend::write_from_guest`], which get the request's guest buffers as
//! [`GuestSlice`]s. Their default implementations go through a bounce buffer and the
//! `&[u8]`-based [`BlockBackend::read_at`]/[`BlockBackend::write_at`], so a backend that only
//! implements those (a replicating backend that must see every written byte, an in-memory
//! test disk) works unchanged; [`RawFile`] overrides them with `preadv`/`pwritev` straight
//! between the file and guest memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::bitmap::{Bitmap, MS};
use vm_memory::VolatileSlice;

/// A piece of guest memory a request's data is read into or written from. Writing into it
/// through its methods (`copy_from`, `write_volatile`, ...) marks the guest's dirty bitmap;
/// raw pointer access must call `bitmap().mark_dirty` itself.
pub type GuestSlice<'a> = VolatileSlice<'a, MS<'a, crate::GuestMemory>>;

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

    /// Fills the guest buffers `bufs`, in order, from `offset` (a read request's data).
    ///
    /// The default reads into a bounce buffer with [`BlockBackend::read_at`] and copies it into
    /// guest memory. An override must mark every guest byte it writes dirty (see
    /// [`GuestSlice`]), or migration and COLO checkpoints miss the data.
    fn read_to_guest(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let mut bounce = vec![0u8; total_len(bufs)];
        self.read_at(offset, &mut bounce)?;
        scatter(&bounce, bufs);
        Ok(())
    }

    /// Another handle on the same storage, for a helper thread that serves requests at the
    /// same time as this one. `None` (the default) keeps every request on one thread, in
    /// the order the driver queued them: what a backend that mirrors writes in order needs.
    /// Requests in flight together may complete in any order (virtio-blk promises nothing
    /// else), so a handle must only be independent positional I/O on the same bytes.
    fn try_clone(&self) -> Option<Box<dyn BlockBackend>> {
        None
    }

    /// Whether requests served by this backend complete only at [`BlockBackend::settle`]:
    /// the worker then tells the guest about a batch of requests after settling it, rather
    /// than each as soon as it was served. Asked at the start of each batch.
    fn needs_settle(&self) -> bool {
        false
    }

    /// Makes the requests served so far complete: called before the worker tells the guest
    /// about them (when [`BlockBackend::needs_settle`] said so, and before reporting what
    /// helper threads served). COLO's mirror waits here until the secondary holds the writes,
    /// so a batch of writes costs one round trip, not one each. Errors are the backend's to
    /// handle: the requests were served.
    fn settle(&mut self) {}

    /// Writes the guest buffers `bufs`, in order, at `offset` (a write request's data).
    ///
    /// The default copies them into one buffer ([`gather`]) and hands it to
    /// [`BlockBackend::write_at`]: the bytes are snapshotted once, so a replicating backend
    /// that keeps this default mirrors exactly what it writes locally even if the guest
    /// changes its buffer meanwhile.
    fn write_from_guest(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let mut bounce = Vec::new();
        gather(bufs, &mut bounce);
        self.write_at(offset, &bounce)
    }
}

/// Total length of `bufs`.
pub fn total_len(bufs: &[GuestSlice<'_>]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Copies `bufs`, in order, into `out` (cleared first).
pub fn gather(bufs: &[GuestSlice<'_>], out: &mut Vec<u8>) {
    out.clear();
    out.resize(total_len(bufs), 0);
    let mut at = 0;
    for b in bufs {
        let n = b.copy_to(&mut out[at..at + b.len()]);
        at += n;
    }
}

/// Copies `src` into `bufs`, in order, marking them dirty (as far as `src` reaches).
pub fn scatter(mut src: &[u8], bufs: &[GuestSlice<'_>]) {
    for b in bufs {
        if src.is_empty() {
            break;
        }
        let n = b.len().min(src.len());
        b.copy_from(&src[..n]);
        src = &src[n..];
    }
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

    fn try_clone(&self) -> Option<Box<dyn BlockBackend>> {
        match self.file.try_clone() {
            Ok(file) => Some(Box::new(RawFile {
                file,
                size: self.size,
            })),
            Err(e) => {
                log::warn!("virtio-blk: cannot duplicate the image descriptor: {e}");
                None
            }
        }
    }

    fn read_to_guest(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        vectored_io(self.file.as_raw_fd(), offset, bufs, Direction::Read)
    }

    fn write_from_guest(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        vectored_io(self.file.as_raw_fd(), offset, bufs, Direction::Write)
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

/// Which way [`vectored_io`] moves bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// File to guest memory (`preadv`).
    Read,
    /// Guest memory to file (`pwritev`).
    Write,
}

/// Most iovecs one `preadv`/`pwritev` takes (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Keeps a guest mapping valid while the kernel uses its address (a no-op but for Xen grants).
enum Guard {
    Read(#[allow(dead_code)] vm_memory::volatile_memory::PtrGuard),
    Write(#[allow(dead_code)] vm_memory::volatile_memory::PtrGuardMut),
}

/// Moves every byte of `bufs`, in order, between them and `fd` at `offset` with
/// `preadv`/`pwritev`, resuming after short transfers. Guest bytes a read fills are marked
/// dirty (on a failed read, the whole attempted range is, as the kernel may have written part).
fn vectored_io(
    fd: RawFd,
    mut offset: u64,
    bufs: &[GuestSlice<'_>],
    dir: Direction,
) -> io::Result<()> {
    // Next byte to move: `skip` bytes into `bufs[idx]`.
    let (mut idx, mut skip) = (0usize, 0usize);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(MAX_IOVECS));
    let mut guards: Vec<Guard> = Vec::with_capacity(iov.capacity());
    loop {
        // Zero-length slices never take a byte: step over them.
        while idx < bufs.len() && bufs[idx].len() == skip {
            idx += 1;
            skip = 0;
        }
        if idx == bufs.len() {
            return Ok(());
        }
        iov.clear();
        guards.clear();
        for b in bufs[idx..].iter().take(MAX_IOVECS) {
            let start = if iov.is_empty() { skip } else { 0 };
            let (base, guard) = match dir {
                Direction::Read => {
                    let g = b.ptr_guard_mut();
                    (g.as_ptr(), Guard::Write(g))
                }
                Direction::Write => {
                    let g = b.ptr_guard();
                    (g.as_ptr().cast_mut(), Guard::Read(g))
                }
            };
            iov.push(libc::iovec {
                // `start` < b.len(): `skip` stays below the length of the slice it indexes.
                iov_base: base.wrapping_add(start).cast(),
                iov_len: b.len() - start,
            });
            guards.push(guard);
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let count = iov.len() as libc::c_int; // at most MAX_IOVECS
        let n = match dir {
            // SAFETY: each iovec covers the unmoved tail of a VolatileSlice, i.e. guest memory
            // mapped for as long as `bufs` borrows it (the guards pin it for this call); the
            // kernel writes at most `iov_len` bytes into each.
            Direction::Read => unsafe { libc::preadv(fd, iov.as_ptr(), count, off) },
            // SAFETY: as above; the kernel only reads from the iovecs.
            Direction::Write => unsafe { libc::pwritev(fd, iov.as_ptr(), count, off) },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if dir == Direction::Read {
                mark_dirty(bufs, idx, skip, iov.iter().map(|v| v.iov_len).sum());
            }
            return Err(e);
        }
        let n = n as usize; // n >= 0 checked above
        if n == 0 {
            return Err(match dir {
                Direction::Read => io::ErrorKind::UnexpectedEof.into(),
                Direction::Write => io::ErrorKind::WriteZero.into(),
            });
        }
        if dir == Direction::Read {
            mark_dirty(bufs, idx, skip, n);
        }
        offset += n as u64;
        // Advance past the `n` bytes moved.
        let mut left = n;
        while left > 0 && idx < bufs.len() {
            let room = bufs[idx].len() - skip;
            if left < room {
                skip += left;
                left = 0;
            } else {
                left -= room;
                idx += 1;
                skip = 0;
            }
        }
    }
}

/// Marks `len` bytes of `bufs` dirty, starting `skip` bytes into `bufs[idx]`.
fn mark_dirty(bufs: &[GuestSlice<'_>], idx: usize, mut skip: usize, mut len: usize) {
    for b in bufs.iter().skip(idx) {
        if len == 0 {
            break;
        }
        let n = (b.len() - skip).min(len);
        b.bitmap().mark_dirty(skip, n);
        len -= n;
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend as _, Permissions};

    use crate::GuestMemory;

    fn temp_image(tag: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("colovmm-{tag}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Two RAM regions back to back, so a buffer can straddle them (two slices).
    fn two_regions() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)])
            .unwrap()
    }

    fn slices(mem: &GuestMemory, bufs: &[(u64, usize)]) -> Vec<GuestSlice<'static>> {
        // The memory outlives every use in these tests; the slices borrow it.
        let mem: &'static GuestMemory = Box::leak(Box::new(mem.clone()));
        bufs.iter()
            .flat_map(|&(addr, len)| {
                vm_memory::GuestMemory::get_slices(
                    mem,
                    GuestAddress(addr),
                    len,
                    Permissions::ReadWrite,
                )
                .unwrap()
                .map(|s| s.unwrap())
                .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The region's own AtomicBitmap, as the VMM's dirty-page log reads it.
    fn dirty(mem: &GuestMemory, addr: u64) -> bool {
        let (region, off) = mem.to_region_addr(GuestAddress(addr)).unwrap();
        std::ops::Deref::deref(region)
            .bitmap()
            .is_addr_set(off.0 as usize)
    }

    fn clear_dirty(mem: &GuestMemory) {
        for r in mem.iter() {
            std::ops::Deref::deref(r).bitmap().reset();
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// preadv into guest memory: every byte lands where the chain says, across regions, and
    /// every page it filled is dirty (and no other).
    #[test]
    fn raw_file_reads_into_guest_memory_and_marks_it_dirty() {
        let image = pattern(64 << 10);
        let path = temp_image("rv", &image);
        let mut b = RawFile::open(&path, false).unwrap();
        let mem = two_regions();
        clear_dirty(&mem);
        // 5000 bytes at the end of region 0 and the start of region 1, then 3 pages elsewhere.
        let bufs = slices(&mem, &[((1 << 20) - 3000, 5000), (0x4000, 3 * 4096)]);
        assert_eq!(bufs.len(), 3, "the first buffer straddles two regions");
        b.read_to_guest(4096, &bufs).unwrap();
        let mut got = vec![0u8; 5000];
        mem.read_slice(&mut got, GuestAddress((1 << 20) - 3000))
            .unwrap();
        assert_eq!(got, image[4096..4096 + 5000]);
        let mut got = vec![0u8; 3 * 4096];
        mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(got, image[4096 + 5000..4096 + 5000 + 3 * 4096]);
        for page in [(1 << 20) - 4096, 1 << 20, 0x4000, 0x5000, 0x6000] {
            assert!(dirty(&mem, page), "page {page:#x} not dirty");
        }
        for page in [0x3000, 0x7000, (1 << 20) + 0x1000, 0] {
            assert!(!dirty(&mem, page), "page {page:#x} dirty");
        }
        // Past the end of the file: an error, never a hang or a short success.
        let far = slices(&mem, &[(0x10000, 8192)]);
        assert!(b.read_to_guest((64 << 10) - 4096, &far).is_err());
        // Nothing to move: fine.
        b.read_to_guest(0, &[]).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// pwritev from guest memory: the file gets exactly the buffers' bytes, in order, and
    /// reading guest memory marks nothing dirty.
    #[test]
    fn raw_file_writes_from_guest_memory() {
        let path = temp_image("wv", &vec![0u8; 64 << 10]);
        let mut b = RawFile::open(&path, false).unwrap();
        let mem = two_regions();
        let data = pattern(9000);
        mem.write_slice(&data[..5000], GuestAddress((1 << 20) - 2000))
            .unwrap();
        mem.write_slice(&data[5000..], GuestAddress(0x8000))
            .unwrap();
        clear_dirty(&mem);
        let bufs = slices(&mem, &[((1 << 20) - 2000, 5000), (0x8000, 4000)]);
        b.write_from_guest(512, &bufs).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file[512..512 + 9000], data[..]);
        assert!(file[..512]
            .iter()
            .chain(&file[512 + 9000..])
            .all(|&x| x == 0));
        assert!(!dirty(&mem, 0x8000) && !dirty(&mem, 1 << 20));
        // A clone is independent positional I/O on the same bytes.
        let mut c = b.try_clone().unwrap();
        let mut back = vec![0u8; 9000];
        c.read_at(512, &mut back).unwrap();
        assert_eq!(back, data);
        std::fs::remove_file(&path).unwrap();
    }

    /// A backend with only the `&[u8]` methods (what a replicating backend may keep) gets
    /// correct data through the defaults, and its reads mark guest memory dirty too.
    #[test]
    fn default_guest_methods_go_through_read_at_and_write_at() {
        struct Disk(Vec<u8>, Vec<(u64, Vec<u8>)>);
        impl BlockBackend for Disk {
            fn size(&self) -> u64 {
                self.0.len() as u64
            }
            fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
                buf.copy_from_slice(&self.0[off as usize..off as usize + buf.len()]);
                Ok(())
            }
            fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
                self.1.push((off, buf.to_vec()));
                Ok(())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
            fn discard(&mut self, _: u64, _: u64) -> io::Result<()> {
                Ok(())
            }
            fn write_zeroes(&mut self, _: u64, _: u64) -> io::Result<()> {
                Ok(())
            }
        }
        let mut b = Disk(pattern(32 << 10), Vec::new());
        assert!(b.try_clone().is_none(), "one thread, in order, by default");
        let mem = two_regions();
        clear_dirty(&mem);
        let bufs = slices(&mem, &[((1 << 20) - 100, 300), (0x2000, 50)]);
        b.read_to_guest(1000, &bufs).unwrap();
        let mut got = vec![0u8; 300];
        mem.read_slice(&mut got, GuestAddress((1 << 20) - 100))
            .unwrap();
        assert_eq!(got, b.0[1000..1300]);
        assert!(dirty(&mem, (1 << 20) - 100) && dirty(&mem, 1 << 20) && dirty(&mem, 0x2000));
        b.write_from_guest(7, &bufs).unwrap();
        let mut want = got.clone();
        want.extend_from_slice(&b.0[1300..1350]);
        assert_eq!(
            b.1,
            vec![(7, want)],
            "one write_at with every byte, in order"
        );
    }

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
