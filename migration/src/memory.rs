//! Guest pages in and out of the stream: dirty bitmaps to ranges, ranges to bounded
//! MemoryPages/MemoryZero messages, and received page messages into guest memory. Guest memory
//! is reached only through [`GuestMemoryReader`] and [`GuestMemoryWriter`], so none of this
//! needs KVM.

use std::io::Write;

use super::protocol::{Message, MessageType, ProtocolError, StreamWriter};
use super::ranges::{check_ranges, MemRange, RangeError, PAGE_SIZE};

/// Error type guest memory accessors return.
pub type AccessError = Box<dyn std::error::Error + Send + Sync>;

/// Reads guest memory on the sending side (called from several channel threads at once).
pub trait GuestMemoryReader: Sync {
    /// Copies `buf.len()` bytes of guest memory at `gpa` into `buf`. `gpa..gpa+len` lies in
    /// one region of the layout.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError>;
}

/// Writes guest memory on the receiving side (called from several channel threads at once,
/// never for overlapping ranges within one round).
pub trait GuestMemoryWriter: Send + Sync {
    /// Copies `data` into guest memory at `gpa`; the range lies in one region of the layout.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError>;

    /// Fills `len` bytes at `gpa` with zeroes. Override where there is something cheaper than
    /// copying zeroes (a destination known to be fresh, say).
    fn write_zeroes(&self, gpa: u64, len: u64) -> Result<(), AccessError> {
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64);
            self.write(gpa + done, &ZEROES[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// Errors collecting, sending or applying pages.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The dirty bitmap has fewer bits than the region has pages.
    #[error("dirty bitmap of {words} words is too short for region {gpa:#x}+{len:#x}")]
    BitmapTooShort {
        /// Region start.
        gpa: u64,
        /// Region length.
        len: u64,
        /// Bitmap length in u64 words.
        words: usize,
    },
    /// A region or range that is not page-aligned, sorted and disjoint.
    #[error("bad page range: {0}")]
    Range(#[from] RangeError),
    /// Batches must hold at least one page.
    #[error("batch size of {0} bytes is below one page")]
    BatchTooSmall(u64),
    /// A batch too large to hold in memory on this host.
    #[error("batch of {0} bytes does not fit in memory")]
    BatchTooLarge(u64),
    /// Reading guest memory failed.
    #[error("reading guest memory at {gpa:#x}+{len:#x}: {source}")]
    Read {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Why.
        source: AccessError,
    },
    /// Writing guest memory failed.
    #[error("writing guest memory at {gpa:#x}+{len:#x}: {source}")]
    Write {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Why.
        source: AccessError,
    },
    /// A page message whose data does not cover its ranges.
    #[error("page message data is shorter than its ranges")]
    ShortData,
    /// Not a page message.
    #[error("{0:?} is not a page message")]
    NotPages(MessageType),
    /// Writing the stream failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// One region's dirty pages: bit `i` of word `i / 64` covers page `i` from `gpa`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Guest-physical start of the region.
    pub gpa: u64,
    /// Region length in bytes.
    pub len: u64,
    /// The bits.
    pub words: Vec<u64>,
}

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let Some(page) = gpa.checked_sub(self.gpa).map(|o| o / PAGE_SIZE) else {
            return false;
        };
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

impl DirtyBitmap {
    /// The dirty ranges of this bitmap's region, appended to `out`.
    pub fn ranges(&self, out: &mut Vec<MemRange>) -> Result<(), MemoryError> {
        dirty_ranges(MemRange::new(self.gpa, self.len), &self.words, out)
    }
}

/// ORs the dirty set `b` into `a` (the same regions, in the same order): pages dirtied in
/// either of two periods.
pub fn merge_dirty(a: &mut [DirtyBitmap], b: &[DirtyBitmap]) {
    for (x, y) in a.iter_mut().zip(b) {
        for (wx, wy) in x.words.iter_mut().zip(&y.words) {
            *wx |= wy;
        }
    }
}

/// The dirty ranges of a whole dirty set, and how many bytes they cover.
pub fn dirty_set_ranges(bitmaps: &[DirtyBitmap]) -> Result<(Vec<MemRange>, u64), MemoryError> {
    let mut out = Vec::new();
    for b in bitmaps {
        b.ranges(&mut out)?;
    }
    let bytes = out.iter().map(|r| r.len).sum();
    Ok((out, bytes))
}

/// Appends the dirty ranges of `region` to `out`, from a KVM-style dirty bitmap: bit `i % 64`
/// of word `i / 64` set means page `i` of the region is dirty. Runs of dirty pages become one
/// range; bits past the region's last page are ignored.
pub fn dirty_ranges(
    region: MemRange,
    bitmap: &[u64],
    out: &mut Vec<MemRange>,
) -> Result<(), MemoryError> {
    check_ranges(&[region], None)?;
    let pages = region.len / PAGE_SIZE;
    let words = pages.div_ceil(64);
    let bitmap = usize::try_from(words)
        .ok()
        .and_then(|w| bitmap.get(..w))
        .ok_or(MemoryError::BitmapTooShort {
            gpa: region.gpa,
            len: region.len,
            words: bitmap.len(),
        })?;
    let mut push = |first: u64, end: u64| {
        out.push(MemRange::new(
            region.gpa + first * PAGE_SIZE,
            (end - first) * PAGE_SIZE,
        ))
    };
    let mut run: Option<u64> = None;
    for (wi, &word) in bitmap.iter().enumerate() {
        let base = wi as u64 * 64;
        let valid = (pages - base).min(64);
        let w = if valid == 64 {
            word
        } else {
            word & ((1u64 << valid) - 1)
        };
        // Whole-word fast paths: most of a bitmap is all clean or all dirty.
        if w == 0 {
            if let Some(first) = run.take() {
                push(first, base);
            }
            continue;
        }
        if w == u64::MAX {
            run.get_or_insert(base);
            continue;
        }
        let mut bit = 0u32;
        while bit < 64 {
            let rest = w >> bit;
            if let Some(first) = run {
                // Zeroes shift in from the top, so a run reaching bit 63 stops at 64.
                bit += rest.trailing_ones();
                if bit < 64 {
                    push(first, base + u64::from(bit));
                    run = None;
                }
            } else {
                if rest == 0 {
                    break;
                }
                bit += rest.trailing_zeros();
                run = Some(base + u64::from(bit));
            }
        }
    }
    if let Some(first) = run {
        push(first, pages);
    }
    Ok(())
}

/// Splits `ranges` (sorted, disjoint, page-aligned) into batches of at most `max_bytes` each,
/// cutting ranges where needed; each batch becomes at most one MemoryPages and one MemoryZero
/// message.
pub fn batches(ranges: &[MemRange], max_bytes: u64) -> Result<Vec<Vec<MemRange>>, MemoryError> {
    let max = max_bytes - max_bytes % PAGE_SIZE;
    if max == 0 {
        return Err(MemoryError::BatchTooSmall(max_bytes));
    }
    check_ranges(ranges, None)?;
    let mut out = Vec::new();
    let mut cur: Vec<MemRange> = Vec::new();
    let mut cur_bytes = 0u64;
    for r in ranges {
        let mut r = *r;
        while r.len > 0 {
            let take = r.len.min(max - cur_bytes);
            cur.push(MemRange::new(r.gpa, take));
            cur_bytes += take;
            r = MemRange::new(r.gpa + take, r.len - take);
            if cur_bytes == max {
                out.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// Bytes moved by page messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Page contents sent or written.
    pub data_bytes: u64,
    /// Bytes sent or written as zero ranges.
    pub zero_bytes: u64,
    /// Messages.
    pub messages: u64,
}

impl std::ops::AddAssign for PageStats {
    fn add_assign(&mut self, o: Self) {
        self.data_bytes += o.data_bytes;
        self.zero_bytes += o.zero_bytes;
        self.messages += o.messages;
    }
}

/// Buffers reused from batch to batch by one sending channel.
#[derive(Default)]
pub struct PageScratch {
    /// Page contents; its length is a high-water mark, so it is zero-filled only when it grows.
    data: Vec<u8>,
    pages: Vec<MemRange>,
    zeros: Vec<MemRange>,
}

/// Whether a page is all zeroes. OR-folding fixed blocks lets the compiler vectorize; the
/// early exit per block keeps a page with data cheap.
fn is_zero(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Appends `r` to `list`, merging it into the last range when it continues it. `same_source`
/// says both came from one input range: ranges from different inputs are never merged, as
/// they may lie in different RAM regions.
fn push_merged(list: &mut Vec<MemRange>, r: MemRange, same_source: bool) {
    if let Some(last) = list.last_mut() {
        if same_source && last.gpa + last.len == r.gpa {
            last.len += r.len;
            return;
        }
    }
    list.push(r);
}

/// Reads one batch of guest memory and writes it to `w`: a MemoryZero message for its zero
/// pages (when `detect_zero`) and a MemoryPages message for the rest.
pub fn send_batch<W: Write>(
    w: &mut StreamWriter<W>,
    batch: &[MemRange],
    mem: &dyn GuestMemoryReader,
    detect_zero: bool,
    scratch: &mut PageScratch,
) -> Result<PageStats, MemoryError> {
    let total = check_ranges(batch, None)?;
    let total = usize::try_from(total).map_err(|_| MemoryError::BatchTooLarge(total))?;
    if scratch.data.len() < total {
        scratch.data.resize(total, 0);
    }
    // Page data is copied out of the guest before it is checksummed: a running guest may
    // change its pages between the checksum and the send.
    let mut off = 0usize;
    for r in batch {
        let len = r.len as usize;
        mem.read(r.gpa, &mut scratch.data[off..off + len])
            .map_err(|source| MemoryError::Read {
                gpa: r.gpa,
                len: r.len,
                source,
            })?;
        off += len;
    }
    let mut stats = PageStats::default();
    if !detect_zero {
        w.write_message(&Message::MemoryPages {
            ranges: batch.into(),
            data: &scratch.data[..total],
        })?;
        stats.data_bytes = total as u64;
        stats.messages = 1;
        return Ok(stats);
    }
    let data_len = split_zero_pages(batch, scratch);
    if !scratch.zeros.is_empty() {
        w.write_message(&Message::MemoryZero {
            ranges: scratch.zeros.as_slice().into(),
        })?;
        stats.zero_bytes = (total - data_len) as u64;
        stats.messages += 1;
    }
    if !scratch.pages.is_empty() {
        w.write_message(&Message::MemoryPages {
            ranges: scratch.pages.as_slice().into(),
            data: &scratch.data[..data_len],
        })?;
        stats.data_bytes = data_len as u64;
        stats.messages += 1;
    }
    Ok(stats)
}

/// Sorts the pages of `batch`, whose contents are in `scratch.data`, into zero ranges and data
/// ranges, compacting the data pages to the front of `scratch.data`. Returns the data length.
fn split_zero_pages(batch: &[MemRange], scratch: &mut PageScratch) -> usize {
    scratch.pages.clear();
    scratch.zeros.clear();
    let page = PAGE_SIZE as usize;
    let (mut read, mut write) = (0usize, 0usize);
    for r in batch {
        let (mut zero_started, mut data_started) = (false, false);
        for i in 0..r.len / PAGE_SIZE {
            let p = MemRange::new(r.gpa + i * PAGE_SIZE, PAGE_SIZE);
            if is_zero(&scratch.data[read..read + page]) {
                push_merged(&mut scratch.zeros, p, zero_started);
                zero_started = true;
            } else {
                if read != write {
                    scratch.data.copy_within(read..read + page, write);
                }
                push_merged(&mut scratch.pages, p, data_started);
                data_started = true;
                write += page;
            }
            read += page;
        }
    }
    write
}

/// Writes a received MemoryPages or MemoryZero message into guest memory. The reader has
/// already checked its ranges against the layout.
pub fn apply(msg: &Message<'_>, dest: &dyn GuestMemoryWriter) -> Result<PageStats, MemoryError> {
    let mut stats = PageStats {
        messages: 1,
        ..PageStats::default()
    };
    match msg {
        Message::MemoryPages { ranges, data } => {
            let mut off = 0usize;
            for r in ranges.iter() {
                let chunk = usize::try_from(r.len)
                    .ok()
                    .and_then(|len| data.get(off..off.checked_add(len)?))
                    .ok_or(MemoryError::ShortData)?;
                dest.write(r.gpa, chunk)
                    .map_err(|source| MemoryError::Write {
                        gpa: r.gpa,
                        len: r.len,
                        source,
                    })?;
                off += chunk.len();
                stats.data_bytes += r.len;
            }
        }
        Message::MemoryZero { ranges } => {
            for r in ranges.iter() {
                dest.write_zeroes(r.gpa, r.len)
                    .map_err(|source| MemoryError::Write {
                        gpa: r.gpa,
                        len: r.len,
                        source,
                    })?;
                stats.zero_bytes += r.len;
            }
        }
        other => return Err(MemoryError::NotPages(other.kind())),
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::super::protocol::{Limits, StreamReader};
    use super::super::ranges::MemoryLayout;
    use super::super::testutil::VecMemory;
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn ranges_of(bitmap: &[u64], pages: u64) -> Vec<MemRange> {
        let mut out = Vec::new();
        dirty_ranges(MemRange::new(0x10_0000, pages * P), bitmap, &mut out).unwrap();
        out
    }

    /// Reference: one bit at a time.
    fn naive(bitmap: &[u64], pages: u64) -> Vec<MemRange> {
        let mut out: Vec<MemRange> = Vec::new();
        for i in 0..pages {
            if bitmap[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                let gpa = 0x10_0000 + i * P;
                push_merged(&mut out, MemRange::new(gpa, P), true);
            }
        }
        out
    }

    #[test]
    fn bitmap_runs_match_a_bit_by_bit_scan() {
        let cases: &[(&[u64], u64)] = &[
            (&[0], 64),
            (&[u64::MAX], 64),
            (&[u64::MAX, u64::MAX], 100),
            (&[1 << 63, 1], 128),
            (&[0b1011_0110, 0, 1 << 5], 150),
            (
                &[0xf0f0_f0f0_f0f0_f0f0, u64::MAX, 0x8000_0000_0000_0001],
                192,
            ),
            (&[u64::MAX], 10),
        ];
        for (bm, pages) in cases {
            assert_eq!(ranges_of(bm, *pages), naive(bm, *pages), "{bm:x?}");
        }
        // Bits past the last page are ignored, so a run stops at the region's end.
        assert_eq!(
            ranges_of(&[u64::MAX], 10),
            vec![MemRange::new(0x10_0000, 10 * P)]
        );
    }

    #[test]
    fn short_bitmap_is_refused() {
        let mut out = Vec::new();
        let e = dirty_ranges(MemRange::new(0, 65 * P), &[0], &mut out).unwrap_err();
        assert!(matches!(e, MemoryError::BitmapTooShort { .. }));
    }

    #[test]
    fn batches_are_bounded_and_cover_everything() {
        let ranges = [
            MemRange::new(0, 5 * P),
            MemRange::new(8 * P, P),
            MemRange::new(10 * P, 3 * P),
        ];
        let b = batches(&ranges, 2 * P + 100).unwrap();
        let sizes: Vec<u64> = b.iter().map(|b| b.iter().map(|r| r.len).sum()).collect();
        assert_eq!(sizes, vec![2 * P, 2 * P, 2 * P, 2 * P, P]);
        let flat: Vec<MemRange> = b.concat();
        let mut merged = Vec::new();
        for r in flat {
            push_merged(&mut merged, r, true);
        }
        assert_eq!(merged[0], MemRange::new(0, 5 * P));
        assert_eq!(merged.len(), 3);
        assert!(matches!(
            batches(&ranges, 100),
            Err(MemoryError::BatchTooSmall(100))
        ));
    }

    #[test]
    fn zero_pages_go_as_zero_ranges_and_round_trip() {
        let layout = MemoryLayout::new(vec![MemRange::new(0, 16 * P)]).unwrap();
        let src = VecMemory::new(&layout);
        // Pages 1, 2 and 5 have data; 0, 3, 4, 6, 7 are zero.
        for (page, byte) in [(1u64, 0xaa), (2, 0xbb), (5, 0xcc)] {
            src.write(page * P, &vec![byte; P as usize]).unwrap();
        }
        let batch = [MemRange::new(0, 8 * P)];
        let mut scratch = PageScratch::default();
        let mut w = StreamWriter::new(Vec::new(), Limits::default());
        let stats = send_batch(&mut w, &batch, &src, true, &mut scratch).unwrap();
        assert_eq!(stats.data_bytes, 3 * P);
        assert_eq!(stats.zero_bytes, 5 * P);
        assert_eq!(
            scratch.pages,
            vec![MemRange::new(P, 2 * P), MemRange::new(5 * P, P)]
        );
        assert_eq!(
            scratch.zeros,
            vec![
                MemRange::new(0, P),
                MemRange::new(3 * P, 2 * P),
                MemRange::new(6 * P, 2 * P)
            ]
        );

        // Apply onto garbage: the zero ranges must really be zeroed.
        let dst = VecMemory::new(&layout);
        dst.write(0, &vec![0x5a; 16 * P as usize]).unwrap();
        let bytes = w.into_inner();
        let mut r = StreamReader::new(bytes.as_slice(), Limits::default());
        r.set_layout(layout.clone());
        for _ in 0..2 {
            let msg = r.next_message().unwrap();
            apply(&msg, &dst).unwrap();
        }
        assert_eq!(
            dst.snapshot()[..8 * P as usize],
            src.snapshot()[..8 * P as usize]
        );
    }

    #[test]
    fn apply_refuses_short_data_and_other_messages() {
        let layout = MemoryLayout::new(vec![MemRange::new(0, 4 * P)]).unwrap();
        let dst = VecMemory::new(&layout);
        let short = Message::MemoryPages {
            ranges: vec![MemRange::new(0, 2 * P)].into(),
            data: &[0u8; 100],
        };
        assert!(matches!(apply(&short, &dst), Err(MemoryError::ShortData)));
        assert!(matches!(
            apply(&Message::Ack, &dst),
            Err(MemoryError::NotPages(MessageType::Ack))
        ));
    }

    #[test]
    fn merged_dirty_sets_keep_every_page() {
        let mut a = vec![DirtyBitmap {
            gpa: 0,
            len: 128 * PAGE_SIZE,
            words: vec![0b0101, 0],
        }];
        let b = vec![DirtyBitmap {
            gpa: 0,
            len: 128 * PAGE_SIZE,
            words: vec![0b0010, 1 << 63],
        }];
        merge_dirty(&mut a, &b);
        let (ranges, bytes) = dirty_set_ranges(&a).unwrap();
        assert_eq!(bytes, 4 * PAGE_SIZE);
        assert_eq!(ranges[0], MemRange::new(0, 3 * PAGE_SIZE));
        assert_eq!(ranges[1], MemRange::new(127 * PAGE_SIZE, PAGE_SIZE));
    }
}
