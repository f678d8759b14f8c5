//! The primary's staging buffer: the dirty pages of a checkpoint, copied out of the paused
//! PVM so that it can resume before they cross the network. The pause then costs a memcpy
//! of the dirty set instead of its transfer and the secondary's flush.
//!
//! The buffer is prefaulted (first touches cost ~10 µs per page on this kind of host) and
//! grows, outside any pause, to the largest dirty set seen, up to the guest's RAM size; a
//! checkpoint whose dirty set does not fit is sent with the PVM paused, as before.

use migration::{AccessError, GuestMemoryReader, MemRange};

use crate::ram_cache::Mapping;

/// Room to grow beyond the dirty set that did not fit, so a slowly growing working set does
/// not re-allocate at every checkpoint.
const HEADROOM: f64 = 1.25;

/// Copies of dirty pages, ready to send.
#[derive(Default)]
pub struct Staging {
    map: Option<Mapping>,
    /// (gpa, len, offset in the buffer) per staged range, sorted by gpa.
    index: Vec<(u64, u64, usize)>,
    limit: u64,
}

impl Staging {
    /// A staging buffer that never grows beyond `limit` bytes (0: never stage).
    pub fn new(limit: u64) -> Self {
        Staging {
            limit,
            ..Staging::default()
        }
    }

    /// Bytes it holds without growing.
    pub fn capacity(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.slice().len() as u64)
    }

    /// Copies `ranges` (sorted, disjoint) out of `mem`; false (nothing copied) when they do
    /// not fit.
    pub fn stage(
        &mut self,
        ranges: &[MemRange],
        mem: &dyn GuestMemoryReader,
    ) -> Result<bool, String> {
        let total: u64 = ranges.iter().map(|r| r.len).sum();
        self.index.clear();
        let Some(map) = self
            .map
            .as_mut()
            .filter(|m| m.slice().len() as u64 >= total)
        else {
            return Ok(false);
        };
        let buf = map.slice_mut();
        let mut off = 0usize;
        for r in ranges {
            let len = r.len as usize;
            mem.read(r.gpa, &mut buf[off..off + len])
                .map_err(|e| format!("copying {:#x}+{:#x} out of the PVM: {e}", r.gpa, r.len))?;
            self.index.push((r.gpa, r.len, off));
            off += len;
        }
        Ok(true)
    }

    /// Grows (outside the pause) so that `needed` bytes fit next time, within the limit.
    pub fn grow_for(&mut self, needed: u64) -> Result<(), String> {
        if needed <= self.capacity() || needed > self.limit {
            return Ok(());
        }
        let want = ((needed as f64 * HEADROOM) as u64)
            .max(self.capacity() * 2)
            .min(self.limit)
            .next_multiple_of(migration::PAGE_SIZE);
        self.index.clear();
        self.map = None;
        self.map = Some(Mapping::new(want).map_err(|e| e.to_string())?);
        log::info!("COLO: staging buffer grown to {} MiB", want >> 20);
        Ok(())
    }

    /// The staged pages, read by gpa like guest memory.
    pub fn reader(&self) -> StagedPages<'_> {
        StagedPages {
            index: &self.index,
            data: self.map.as_ref().map_or(&[], |m| m.slice()),
        }
    }
}

/// Reads staged pages by guest address.
pub struct StagedPages<'a> {
    index: &'a [(u64, u64, usize)],
    data: &'a [u8],
}

impl GuestMemoryReader for StagedPages<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let i = self.index.partition_point(|&(g, _, _)| g <= gpa);
        let &(g, len, off) = i
            .checked_sub(1)
            .and_then(|i| self.index.get(i))
            .ok_or_else(|| format!("{gpa:#x} was not staged"))?;
        let inner = (gpa - g) as usize;
        if inner + buf.len() > len as usize {
            return Err(format!("{gpa:#x}+{:#x} runs past a staged range", buf.len()).into());
        }
        buf.copy_from_slice(&self.data[off + inner..off + inner + buf.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pattern;
    impl GuestMemoryReader for Pattern {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((gpa + i as u64) / 4096) as u8;
            }
            Ok(())
        }
    }

    #[test]
    fn staged_pages_read_back_by_address() {
        let p = migration::PAGE_SIZE;
        let ranges = [MemRange::new(2 * p, 3 * p), MemRange::new(1 << 32, p)];
        let mut s = Staging::new(1 << 20);
        assert!(!s.stage(&ranges, &Pattern).unwrap(), "no buffer yet");
        s.grow_for(4 * p).unwrap();
        assert!(s.capacity() >= 4 * p);
        assert!(s.stage(&ranges, &Pattern).unwrap());
        let r = s.reader();
        let mut buf = vec![0u8; p as usize];
        r.read(3 * p, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 3));
        r.read(1 << 32, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == ((1u64 << 32) / p) as u8));
        assert!(r.read(p, &mut buf).is_err(), "not staged");
        assert!(
            r.read(4 * p, &mut vec![0; 2 * p as usize]).is_err(),
            "past the range"
        );
        s.grow_for(2 << 20).unwrap();
        assert!(s.capacity() < 2 << 20, "the limit holds");
    }
}
