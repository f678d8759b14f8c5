//! The secondary's RAM cache: the primary's memory as of the last complete checkpoint.
//!
//! A checkpoint's pages land here only; the running secondary VM (SVM) is untouched until the
//! whole checkpoint has arrived. Then [`RamCache::flush`] copies into SVM memory every page the
//! primary dirtied *or the SVM itself dirtied* since the last checkpoint, as runs of pages, so
//! the SVM ends up byte-equal to the primary.
//!
//! A checkpoint that breaks half-way leaves pages of it in the cache; the secondary then never
//! flushes, and fails over from the SVM as it is.
//!
//! The cache is prefaulted at creation so checkpoints never pay first-touch page faults
//! (~10 µs per 4 KiB page on kvm_pvm).

use std::sync::atomic::{AtomicU64, Ordering};

/// Page size of dirty bitmaps and of the cache.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of the cache.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    /// The cache could not be mapped.
    #[error("cannot map a {0}-byte RAM cache")]
    Map(u64),
    /// A region or write that is not page-aligned or overlaps.
    #[error("range {gpa:#x}+{len:#x} is not page-aligned")]
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A write outside every region.
    #[error("range {gpa:#x}+{len:#x} is outside the cached memory")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A bitmap of the wrong size for its region.
    #[error("dirty bitmap for region {0} has the wrong length")]
    Bitmap(usize),
    /// Copying into the SVM failed.
    #[error("flush into SVM memory at {gpa:#x}: {why}")]
    Flush {
        /// Where.
        gpa: u64,
        /// Why.
        why: String,
    },
}

/// One anonymous, prefaulted mapping.
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by one `Mapping` and only reached through &self/&mut self of
// the RamCache that owns it; raw pointers are not shared elsewhere.
unsafe impl Send for Mapping {}
// SAFETY: shared access only copies bytes in or out; see `Mapping::store` for why those
// accesses never overlap.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn new(len: u64) -> Result<Self, CacheError> {
        let size = usize::try_from(len).map_err(|_| CacheError::Map(len))?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(CacheError::Map(len));
        }
        // SAFETY: advice on the mapping just created, over its exact length.
        unsafe { libc::madvise(ptr, size, libc::MADV_HUGEPAGE) };
        // In 64 MiB steps, so the memory-map lock is released between them (other threads,
        // the heartbeat's among them, fault and spawn meanwhile).
        let mut off = 0;
        while off < size {
            let n = (64usize << 20).min(size - off);
            // SAFETY: advice on a part of the mapping just created.
            let r = unsafe {
                libc::madvise(
                    ptr.cast::<u8>().add(off).cast(),
                    n,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                log::debug!("RAM cache prefault: {}", std::io::Error::last_os_error());
                break;
            }
            off += n;
        }
        Ok(Self {
            ptr: ptr.cast(),
            len: size,
        })
    }

    pub(crate) fn slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live mapping owned by self, readable and writable.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Copies `data` to offset `off` (bounds checked by the caller).
    fn store(&self, off: usize, data: &[u8]) {
        debug_assert!(off + data.len() <= self.len);
        // SAFETY: the range lies inside the live mapping (checked by the caller). Writers of
        // one checkpoint store disjoint pages, and readers (flush, read) run only once the
        // checkpoint's writers are done, so no two accesses to the same bytes overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    /// Zeroes `len` bytes at `off` (bounds checked by the caller).
    fn zero(&self, off: usize, len: usize) {
        debug_assert!(off + len <= self.len);
        // SAFETY: as for `store`.
        unsafe { std::ptr::write_bytes(self.ptr.add(off), 0, len) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct Region {
    gpa: u64,
    len: u64,
    data: Mapping,
    /// Pages the primary sent since the last flush (set from several receiving threads).
    pvm_dirty: Vec<AtomicU64>,
}

/// What a flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Pages copied into the SVM.
    pub pages: u64,
    /// Runs of contiguous pages (one copy each).
    pub runs: u64,
}

/// The secondary's copy of the primary's memory.
pub struct RamCache {
    regions: Vec<Region>,
}

fn aligned(gpa: u64, len: u64) -> bool {
    gpa.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE)
}

impl RamCache {
    /// A cache for the guest RAM `regions` (gpa, len), prefaulted.
    pub fn new(regions: &[(u64, u64)]) -> Result<Self, CacheError> {
        let mut out: Vec<Region> = Vec::with_capacity(regions.len());
        for &(gpa, len) in regions {
            if !aligned(gpa, len) || len == 0 {
                return Err(CacheError::Unaligned { gpa, len });
            }
            if out.iter().any(|r| gpa < r.gpa + r.len && r.gpa < gpa + len) {
                return Err(CacheError::OutOfRange { gpa, len });
            }
            let pages = len / PAGE_SIZE;
            out.push(Region {
                gpa,
                len,
                data: Mapping::new(len)?,
                pvm_dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        Ok(Self { regions: out })
    }

    fn region_of(&self, gpa: u64, len: u64) -> Result<&Region, CacheError> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.gpa + r.len))
            .ok_or(CacheError::OutOfRange { gpa, len })
    }

    /// Stores pages of a checkpoint (page-aligned, inside one region); the SVM is untouched.
    /// Several threads may store at once, never the same pages.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), CacheError> {
        let r = self.dirty_range(gpa, data.len() as u64)?;
        r.data.store((gpa - r.gpa) as usize, data);
        Ok(())
    }

    /// Stores zero pages of a checkpoint, like [`Self::write`].
    pub fn write_zeroes(&self, gpa: u64, len: u64) -> Result<(), CacheError> {
        let r = self.dirty_range(gpa, len)?;
        r.data.zero((gpa - r.gpa) as usize, len as usize);
        Ok(())
    }

    /// The region of an aligned range, with the range's pages marked as sent by the primary.
    fn dirty_range(&self, gpa: u64, len: u64) -> Result<&Region, CacheError> {
        if !aligned(gpa, len) {
            return Err(CacheError::Unaligned { gpa, len });
        }
        let r = self.region_of(gpa, len)?;
        let first = (gpa - r.gpa) / PAGE_SIZE;
        for page in first..first + len / PAGE_SIZE {
            r.pvm_dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
        Ok(r)
    }

    /// Reads from the cache (tests, and the initial state check).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), CacheError> {
        let len = buf.len() as u64;
        let r = self.region_of(gpa, len)?;
        let off = (gpa - r.gpa) as usize;
        buf.copy_from_slice(&r.data.slice()[off..off + buf.len()]);
        Ok(())
    }

    /// Copies into the SVM (through `svm_write(gpa, bytes)`) every page the primary sent
    /// since the last flush or that the SVM dirtied (`svm_dirty`, one bitmap per region, bit i
    /// = page i), as runs of contiguous pages; then forgets the primary's dirty set.
    ///
    /// Call only while no checkpoint is being received (no concurrent [`Self::write`]).
    pub fn flush(
        &self,
        svm_dirty: &[Vec<u64>],
        mut svm_write: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<FlushStats, CacheError> {
        if svm_dirty.len() != self.regions.len() {
            return Err(CacheError::Bitmap(svm_dirty.len()));
        }
        let mut stats = FlushStats::default();
        for (i, (r, svm)) in self.regions.iter().zip(svm_dirty).enumerate() {
            let pages = r.len / PAGE_SIZE;
            if svm.len() < r.pvm_dirty.len() {
                return Err(CacheError::Bitmap(i));
            }
            let dirty = |p: u64| {
                let (w, b) = ((p / 64) as usize, p % 64);
                (r.pvm_dirty[w].load(Ordering::Relaxed) | svm[w]) & (1 << b) != 0
            };
            let mut page = 0;
            while page < pages {
                if !dirty(page) {
                    page += 1;
                    continue;
                }
                let start = page;
                while page < pages && dirty(page) {
                    page += 1;
                }
                let (off, n) = (
                    (start * PAGE_SIZE) as usize,
                    ((page - start) * PAGE_SIZE) as usize,
                );
                let gpa = r.gpa + start * PAGE_SIZE;
                svm_write(gpa, &r.data.slice()[off..off + n])
                    .map_err(|why| CacheError::Flush { gpa, why })?;
                stats.pages += page - start;
                stats.runs += 1;
            }
            r.pvm_dirty
                .iter()
                .for_each(|w| w.store(0, Ordering::Relaxed));
        }
        Ok(stats)
    }
}

/// The receiver of a checkpoint stream writes straight into the cache.
impl migration::GuestMemoryWriter for RamCache {
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), migration::AccessError> {
        RamCache::write(self, gpa, data).map_err(Into::into)
    }

    fn write_zeroes(&self, gpa: u64, len: u64) -> Result<(), migration::AccessError> {
        RamCache::write_zeroes(self, gpa, len).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    /// A stand-in for SVM memory.
    fn svm(len: usize) -> Vec<u8> {
        vec![0u8; len]
    }

    #[test]
    fn checkpoint_pages_reach_the_svm_only_at_flush() {
        let cache = RamCache::new(&[(0, 64 * P)]).unwrap();
        let mut mem = svm(64 * P as usize);
        cache.write(3 * P, &[7u8; 4096]).unwrap();
        assert!(
            mem.iter().all(|b| *b == 0),
            "nothing reaches the SVM before the flush"
        );
        let stats = cache
            .flush(&[vec![0; 1]], |gpa, data| {
                mem[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
                Ok(())
            })
            .unwrap();
        assert_eq!(stats, FlushStats { pages: 1, runs: 1 });
        assert!(mem[3 * P as usize..4 * P as usize].iter().all(|b| *b == 7));
        // The primary's set is forgotten: a second flush copies nothing.
        let again = cache.flush(&[vec![0; 1]], |_, _| Ok(())).unwrap();
        assert_eq!(again.pages, 0);
    }

    #[test]
    fn pages_the_svm_dirtied_are_put_back_to_the_primarys_state() {
        let cache = RamCache::new(&[(0, 64 * P)]).unwrap();
        cache.write(0, &vec![1u8; 64 * P as usize]).unwrap();
        let mut mem = svm(64 * P as usize);
        cache
            .flush(&[vec![0; 1]], |gpa, d| {
                mem[gpa as usize..gpa as usize + d.len()].copy_from_slice(d);
                Ok(())
            })
            .unwrap();
        // The SVM runs and writes pages 10 and 11; the primary sends page 12.
        mem[10 * P as usize..12 * P as usize].fill(9);
        cache.write(12 * P, &[2u8; 4096]).unwrap();
        let stats = cache
            .flush(&[vec![(1 << 10) | (1 << 11)]], |gpa, d| {
                mem[gpa as usize..gpa as usize + d.len()].copy_from_slice(d);
                Ok(())
            })
            .unwrap();
        assert_eq!(
            stats,
            FlushStats { pages: 3, runs: 1 },
            "10..=12 is one run"
        );
        assert!(mem[10 * P as usize..12 * P as usize]
            .iter()
            .all(|b| *b == 1));
        assert!(mem[12 * P as usize..13 * P as usize]
            .iter()
            .all(|b| *b == 2));
    }

    #[test]
    fn bad_writes_are_refused() {
        let cache = RamCache::new(&[(0, 16 * P), (1 << 32, 16 * P)]).unwrap();
        assert!(matches!(
            cache.write(1, &[0; 4096]),
            Err(CacheError::Unaligned { .. })
        ));
        assert!(matches!(
            cache.write(15 * P, &[0; 8192]),
            Err(CacheError::OutOfRange { .. })
        ));
        assert!(matches!(
            cache.write(16 * P, &[0; 4096]),
            Err(CacheError::OutOfRange { .. })
        ));
        assert!(cache.write((1 << 32) + P, &[5; 4096]).is_ok());
        let mut buf = [0u8; 4096];
        cache.read((1 << 32) + P, &mut buf).unwrap();
        assert_eq!(buf, [5u8; 4096]);
        assert!(RamCache::new(&[(0, 100)]).is_err());
        assert!(
            RamCache::new(&[(0, 16 * P), (8 * P, 16 * P)]).is_err(),
            "overlap"
        );
        assert!(
            cache.flush(&[vec![0]], |_, _| Ok(())).is_err(),
            "one bitmap per region"
        );
    }
}
