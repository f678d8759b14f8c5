//! One sparse layer of fixed-size blocks over a disk (the hidden or the active layer of a
//! [`super::ReplicaDisk`]): only the blocks written since it was last emptied take room.
//!
//! A block is present whole or not at all (a write into an absent block must cover it), so a
//! present block always hides every layer below it. A block may also be present as zeroes,
//! which takes no room: a guest that discards its whole disk must not fill the layer.
//!
//! In memory, a layer is a map of block → bytes. On files, block `i` lives at `i * block
//! size` of a sparse data file and the set of present blocks is kept in an index file, so a
//! reopened layer (after a crash during a failover merge) knows what it holds. Index file:
//!
//! ```text
//! 0  "COLOLAYR"  8  version u32 = 1  12  reserved u32 = 0  16  disk size u64
//! 24 block size u64  32  FNV-1a of bytes 0..32 u64  40  bitmap: bit i (LSB first) = block i
//! ```
//!
//! (all little-endian). The data file is as long as the disk rounded up to whole blocks.
//! Nothing is synced until [`Layer::sync`]: the replica syncs before it relies on the files.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec::{checksum, le_u32, le_u64};
use super::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

const INDEX_MAGIC: &[u8; 8] = b"COLOLAYR";
const INDEX_VERSION: u32 = 1;
const INDEX_HEADER: u64 = 40;

/// Errors of a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A block size that is not a power of two in the supported range.
    #[error("block size {0} is not a power of two from 512 B to 2 MiB")]
    BlockSize(u64),
    /// A disk whose size rounded up to whole blocks does not fit in 64 bits.
    #[error("a {0}-byte disk is too large")]
    DiskSize(u64),
    /// A block index past the end of the disk.
    #[error("block {0} is outside the disk")]
    Block(u64),
    /// A read of a block the layer does not hold.
    #[error("block {0} is not in the layer")]
    Absent(u64),
    /// A write into an absent block that does not cover it whole.
    #[error("block {0} is not in the layer and the write does not cover it whole")]
    Partial(u64),
    /// A range that runs past the end of its block.
    #[error("{len} bytes at {at} run past the end of a block")]
    Bounds {
        /// Offset in the block.
        at: usize,
        /// Length.
        len: usize,
    },
    /// An index or data file that is not a layer of this disk.
    #[error("{path}: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A failed file operation.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A disk's size and block size, and the block arithmetic over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    block_size: u64,
    blocks: u64,
}

/// The part of one block an I/O range covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Block index.
    pub block: u64,
    /// Offset in the block.
    pub at: usize,
    /// Length in the block.
    pub len: usize,
    /// Offset in the request.
    pub pos: usize,
}

impl Geometry {
    /// A `size`-byte disk cut in `block_size` blocks (a power of two, 512 B to 2 MiB).
    pub fn new(size: u64, block_size: u64) -> Result<Self, LayerError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(LayerError::BlockSize(block_size));
        }
        let blocks = size.div_ceil(block_size);
        blocks
            .checked_mul(block_size)
            .ok_or(LayerError::DiskSize(size))?;
        Ok(Self {
            size,
            block_size,
            blocks,
        })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Block size as a buffer length (at most [`MAX_BLOCK_SIZE`]).
    pub fn bs(&self) -> usize {
        self.block_size as usize
    }

    /// Byte offset of block `b`.
    pub fn start(&self, b: u64) -> u64 {
        b * self.block_size
    }

    /// Bytes of block `b` (< blocks) inside the disk: the block size but for a short last one.
    pub fn valid(&self, b: u64) -> usize {
        (self.size - self.start(b)).min(self.block_size) as usize
    }

    /// Whether `len` bytes at `offset` lie inside the disk.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// The blocks `len` bytes at `offset` touch, in order (the range must be inside).
    pub fn segments(&self, offset: u64, len: u64) -> impl Iterator<Item = Segment> {
        let (bs, end) = (self.block_size, offset + len);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let seg = Segment {
                block: at / bs,
                at: (at % bs) as usize,
                len: (bs - at % bs).min(end - at) as usize,
                pos: (at - offset) as usize,
            };
            at += seg.len as u64;
            Some(seg)
        })
    }

    fn index_len(&self) -> u64 {
        INDEX_HEADER + self.blocks.div_ceil(8)
    }

    fn index_header(&self) -> [u8; INDEX_HEADER as usize] {
        let mut h = [0u8; INDEX_HEADER as usize];
        h[..8].copy_from_slice(INDEX_MAGIC);
        h[8..12].copy_from_slice(&INDEX_VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..32].copy_from_slice(&self.block_size.to_le_bytes());
        let sum = checksum(&h[..32]);
        h[32..40].copy_from_slice(&sum.to_le_bytes());
        h
    }
}

/// How a present block is held.
enum Slot {
    /// All zeroes, stored nowhere.
    Zero,
    /// In memory.
    Mem(Box<[u8]>),
    /// In the data file.
    File,
}

/// The data and index files of a file-backed layer.
struct Files {
    data: File,
    index: File,
    data_path: PathBuf,
    index_path: PathBuf,
}

/// A sparse set of whole blocks over a disk.
pub struct Layer {
    geo: Geometry,
    slots: BTreeMap<u64, Slot>,
    /// Present blocks that are not [`Slot::Zero`].
    stored: u64,
    files: Option<Files>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn open_rw(path: &Path, create: bool) -> Result<File, LayerError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .open(path)
        .map_err(io_err("opening", path))
}

impl Layer {
    /// An empty layer in memory.
    pub fn memory(geo: Geometry) -> Self {
        Self {
            geo,
            slots: BTreeMap::new(),
            stored: 0,
            files: None,
        }
    }

    /// An empty layer on the files `data` and `index` (created, or truncated).
    pub fn create(geo: Geometry, data: &Path, index: &Path) -> Result<Self, LayerError> {
        let files = Files {
            data: open_rw(data, true)?,
            index: open_rw(index, true)?,
            data_path: data.to_path_buf(),
            index_path: index.to_path_buf(),
        };
        files
            .data
            .set_len(geo.blocks * geo.block_size)
            .map_err(io_err("sizing", data))?;
        files
            .index
            .write_all_at(&geo.index_header(), 0)
            .map_err(io_err("writing", index))?;
        files
            .index
            .set_len(geo.index_len())
            .map_err(io_err("sizing", index))?;
        Ok(Self {
            files: Some(files),
            ..Self::memory(geo)
        })
    }

    /// The layer a previous [`Layer::create`] left on `data` and `index`, checked to belong to
    /// a disk of this geometry.
    pub fn open(geo: Geometry, data: &Path, index: &Path) -> Result<Self, LayerError> {
        let bad = |path: &Path, why: String| LayerError::Format {
            path: path.to_path_buf(),
            why,
        };
        let files = Files {
            data: open_rw(data, false)?,
            index: open_rw(index, false)?,
            data_path: data.to_path_buf(),
            index_path: index.to_path_buf(),
        };
        let len = |f: &File, p: &Path| f.metadata().map(|m| m.len()).map_err(io_err("stat", p));
        let index_len = len(&files.index, index)?;
        if index_len != geo.index_len() {
            return Err(bad(
                index,
                format!("{index_len} bytes, not {}", geo.index_len()),
            ));
        }
        let mut bytes = vec![0u8; index_len as usize];
        files
            .index
            .read_exact_at(&mut bytes, 0)
            .map_err(io_err("reading", index))?;
        let (header, bitmap) = bytes.split_at(INDEX_HEADER as usize);
        if &header[..8] != INDEX_MAGIC {
            return Err(bad(index, "not a layer index".into()));
        }
        if le_u64(header, 32) != checksum(&header[..32]) {
            return Err(bad(index, "header checksum mismatch".into()));
        }
        if le_u32(header, 8) != INDEX_VERSION || le_u32(header, 12) != 0 {
            return Err(bad(index, format!("version {}", le_u32(header, 8))));
        }
        let (size, bs) = (le_u64(header, 16), le_u64(header, 24));
        if size != geo.size || bs != geo.block_size {
            return Err(bad(
                index,
                format!("made for a {size}-byte disk in {bs}-byte blocks"),
            ));
        }
        let data_len = len(&files.data, data)?;
        if data_len != geo.blocks * geo.block_size {
            return Err(bad(data, format!("{data_len} bytes, not whole blocks")));
        }
        let mut layer = Self::memory(geo);
        for (i, &byte) in bitmap.iter().enumerate() {
            for bit in (0..8).filter(|bit| byte & (1 << bit) != 0) {
                let b = i as u64 * 8 + bit;
                if b >= geo.blocks {
                    return Err(bad(
                        index,
                        format!("block {b} past the disk marked present"),
                    ));
                }
                layer.slots.insert(b, Slot::File);
            }
        }
        layer.stored = layer.slots.len() as u64;
        layer.files = Some(files);
        Ok(layer)
    }

    /// The disk geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Whether the layer lives in files.
    pub fn is_file_backed(&self) -> bool {
        self.files.is_some()
    }

    /// Whether block `b` is present.
    pub fn has(&self, b: u64) -> bool {
        self.slots.contains_key(&b)
    }

    /// Whether block `b` is present and known to be all zeroes.
    pub fn is_zero(&self, b: u64) -> bool {
        matches!(self.slots.get(&b), Some(Slot::Zero))
    }

    /// Number of present blocks.
    pub fn block_count(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Bytes the present blocks take (blocks of zeroes take none).
    pub fn bytes_used(&self) -> u64 {
        self.stored * self.geo.block_size
    }

    /// The present blocks, in ascending order.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.keys().copied()
    }

    /// The first present block at or after `from`.
    pub fn next_block(&self, from: u64) -> Option<u64> {
        self.slots.range(from..).next().map(|(&b, _)| b)
    }

    fn check(&self, b: u64, at: usize, len: usize) -> Result<(), LayerError> {
        if b >= self.geo.blocks {
            return Err(LayerError::Block(b));
        }
        if at.checked_add(len).is_none_or(|end| end > self.geo.bs()) {
            return Err(LayerError::Bounds { at, len });
        }
        Ok(())
    }

    /// Fills `buf` from offset `at` of the present block `b`.
    pub fn read(&self, b: u64, at: usize, buf: &mut [u8]) -> Result<(), LayerError> {
        self.check(b, at, buf.len())?;
        match (self.slots.get(&b), &self.files) {
            (None, _) => return Err(LayerError::Absent(b)),
            (Some(Slot::Zero), _) => buf.fill(0),
            (Some(Slot::Mem(data)), _) => buf.copy_from_slice(&data[at..at + buf.len()]),
            (Some(Slot::File), Some(f)) => f
                .data
                .read_exact_at(buf, self.geo.start(b) + at as u64)
                .map_err(io_err("reading", &f.data_path))?,
            (Some(Slot::File), None) => return Err(LayerError::Absent(b)),
        }
        Ok(())
    }

    /// Writes `data` at offset `at` of block `b`; an absent block must be written whole.
    pub fn write(&mut self, b: u64, at: usize, data: &[u8]) -> Result<(), LayerError> {
        self.check(b, at, data.len())?;
        let whole = at == 0 && data.len() == self.geo.bs();
        if !whole && !self.has(b) {
            return Err(LayerError::Partial(b));
        }
        let Some(f) = &self.files else {
            match self.slots.entry(b) {
                Entry::Occupied(mut e) => match e.get_mut() {
                    Slot::Mem(buf) => buf[at..at + data.len()].copy_from_slice(data),
                    slot => {
                        let mut buf = vec![0u8; self.geo.bs()].into_boxed_slice();
                        buf[at..at + data.len()].copy_from_slice(data);
                        *slot = Slot::Mem(buf);
                        self.stored += 1;
                    }
                },
                Entry::Vacant(e) => {
                    e.insert(Slot::Mem(data.into()));
                    self.stored += 1;
                }
            }
            return Ok(());
        };
        f.data
            .write_all_at(data, self.geo.start(b) + at as u64)
            .map_err(io_err("writing", &f.data_path))?;
        match self.slots.insert(b, Slot::File) {
            Some(Slot::File) => {}
            Some(_) => self.stored += 1,
            None => {
                self.stored += 1;
                self.write_index_byte(b / 8)?;
            }
        }
        Ok(())
    }

    /// Makes block `b` present as zeroes, freeing what it held.
    pub fn write_zeroes(&mut self, b: u64) -> Result<(), LayerError> {
        self.check(b, 0, self.geo.bs())?;
        if let Some(f) = &self.files {
            punch(f, self.geo.start(b), self.geo.block_size)?;
        }
        match self.slots.insert(b, Slot::Zero) {
            Some(Slot::Zero) => {}
            Some(_) => self.stored -= 1,
            None if self.files.is_some() => self.write_index_byte(b / 8)?,
            None => {}
        }
        Ok(())
    }

    /// Stores byte `i` of the presence bitmap as the slots say it is.
    fn write_index_byte(&self, i: u64) -> Result<(), LayerError> {
        let Some(f) = &self.files else { return Ok(()) };
        let byte = self
            .slots
            .range(i * 8..i * 8 + 8)
            .fold(0u8, |acc, (&b, _)| acc | 1 << (b % 8));
        f.index
            .write_all_at(&[byte], INDEX_HEADER + i)
            .map_err(io_err("writing", &f.index_path))
    }

    /// Empties the layer. On files the index goes first, so a block never looks present
    /// after its data is gone.
    pub fn clear(&mut self) -> Result<(), LayerError> {
        if let Some(f) = &self.files {
            // Runs of index bytes to zero; gaps under 4 KiB are zeroed along (they are zero).
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for byte in self.slots.keys().map(|b| b / 8) {
                match runs.last_mut() {
                    Some((_, end)) if byte < *end + 4096 => *end = byte + 1,
                    _ => runs.push((byte, byte + 1)),
                }
            }
            for (start, end) in runs {
                f.index
                    .write_all_at(&vec![0u8; (end - start) as usize], INDEX_HEADER + start)
                    .map_err(io_err("writing", &f.index_path))?;
            }
            let len = self.geo.blocks * self.geo.block_size;
            f.data
                .set_len(0)
                .and_then(|()| f.data.set_len(len))
                .map_err(io_err("truncating", &f.data_path))?;
        }
        self.slots.clear();
        self.stored = 0;
        Ok(())
    }

    /// Makes the files durable: data first, then the index that points into it.
    pub fn sync(&self) -> Result<(), LayerError> {
        if let Some(f) = &self.files {
            f.data
                .sync_data()
                .map_err(io_err("syncing", &f.data_path))?;
            f.index
                .sync_data()
                .map_err(io_err("syncing", &f.index_path))?;
        }
        Ok(())
    }
}

/// Deallocates `len` bytes at `offset` of the data file (writes zeroes where holes cannot be
/// punched).
fn punch(f: &Files, offset: u64, len: u64) -> Result<(), LayerError> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(LayerError::Block(offset));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor this layer owns; no memory is passed.
    if unsafe { libc::fallocate(f.data.as_raw_fd(), mode, off, n) } == 0 {
        return Ok(());
    }
    f.data
        .write_all_at(&vec![0u8; len as usize], offset)
        .map_err(io_err("zeroing", &f.data_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 512;

    fn geo() -> Geometry {
        Geometry::new(4 * BS as u64 + 100, BS as u64).unwrap()
    }

    /// What both kinds of layer must do alike.
    fn exercise(l: &mut Layer) {
        let mut buf = [0u8; 4];
        assert!(matches!(l.read(0, 0, &mut buf), Err(LayerError::Absent(0))));
        assert!(matches!(
            l.write(1, 0, &[1; 10]),
            Err(LayerError::Partial(1))
        ));
        assert!(matches!(l.write(5, 0, &[1; BS]), Err(LayerError::Block(5))));
        assert!(matches!(
            l.write(1, 510, &[1; 4]),
            Err(LayerError::Bounds { .. })
        ));
        assert!(l.read(0, usize::MAX, &mut buf).is_err(), "no overflow");
        l.write(1, 0, &[7; BS]).unwrap();
        l.write(1, 2, &[9; 2]).unwrap();
        l.read(1, 0, &mut buf).unwrap();
        assert_eq!(buf, [7, 7, 9, 9]);
        l.write_zeroes(3).unwrap();
        assert!(l.has(3) && l.is_zero(3) && !l.is_zero(1));
        l.read(3, 100, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
        assert_eq!((l.block_count(), l.bytes_used()), (2, BS as u64));
        l.write(3, 8, &[5; 2]).unwrap();
        l.read(3, 6, &mut buf).unwrap();
        assert_eq!(
            buf,
            [0, 0, 5, 5],
            "a partial write into zeroes keeps the zeroes"
        );
        assert_eq!(l.bytes_used(), 2 * BS as u64);
        l.write_zeroes(1).unwrap();
        assert_eq!(l.bytes_used(), BS as u64);
        assert_eq!(l.blocks().collect::<Vec<_>>(), [1, 3]);
        assert_eq!((l.next_block(2), l.next_block(4)), (Some(3), None));
        l.write(4, 0, &[4; BS]).unwrap();
    }

    #[test]
    fn memory_layer() {
        let mut l = Layer::memory(geo());
        exercise(&mut l);
        l.clear().unwrap();
        assert_eq!((l.block_count(), l.bytes_used()), (0, 0));
        assert!(!l.is_file_backed());
    }

    #[test]
    fn file_layer_survives_reopening_and_clears() {
        let dir = std::env::temp_dir().join(format!("colovmm-layer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (data, index) = (dir.join("l.data"), dir.join("l.index"));
        let mut l = Layer::create(geo(), &data, &index).unwrap();
        exercise(&mut l);
        l.sync().unwrap();
        drop(l);
        let mut l = Layer::open(geo(), &data, &index).unwrap();
        assert_eq!(l.blocks().collect::<Vec<_>>(), [1, 3, 4]);
        let mut buf = [0u8; 4];
        l.read(3, 6, &mut buf).unwrap();
        assert_eq!(buf, [0, 0, 5, 5]);
        l.read(1, 0, &mut buf).unwrap();
        assert_eq!(buf, [0; 4], "zeroed blocks read back as zeroes");
        assert!(
            Layer::open(
                Geometry::new(8 * BS as u64, BS as u64).unwrap(),
                &data,
                &index
            )
            .is_err(),
            "another disk's layer"
        );
        l.clear().unwrap();
        drop(l);
        let l = Layer::open(geo(), &data, &index).unwrap();
        assert_eq!(l.block_count(), 0);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(100)
            .unwrap();
        assert!(matches!(
            Layer::open(geo(), &data, &index),
            Err(LayerError::Format { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
