//! The initial sync of a disk, part of starting protection: the secondary's base must equal
//! the primary's disk before writes are mirrored into it, and copying the whole disk every
//! time protection starts would cost a full disk's transfer even when the secondary already
//! holds a (nearly) identical copy, e.g. after a restart of protection.
//!
//! So the secondary hashes its base per [`REGION`] ([`RegionHashes::compute`]), sends the
//! list ([`RegionHashes::encode`]), the primary compares it with its own disk's hashes
//! ([`SyncPlan::new`]) and sends only the regions that differ, which the secondary writes
//! into its base ([`apply`]). A base that is absent or of another size differs everywhere.
//! Progress ([`SyncProgress`]) is counted in bytes and regions for status and events.
//!
//! Nothing here owns a socket: the caller moves the hash list and the regions, and must
//! keep the primary's disk unwritten (or mirror its writes as well) while the sync runs.
//! The list comes from the peer, so [`RegionHashes::decode`] checks every length against
//! the input before allocating.

use std::io;

use devices::virtio::block::BlockBackend;
use sha2::{Digest, Sha256};

/// Bytes per hashed region. 1 MiB keeps the hash list at 32 KiB per GiB of disk (32 MiB for
/// 1 TiB, one message) while a scattered small difference resends at most 1 MiB; smaller
/// regions would grow the list faster than they save on resends of typical 64 KiB-block
/// writes, larger ones would resend more for every stray write.
pub const REGION: u64 = 1024 * 1024;
/// Length of one region hash (SHA-256).
pub const HASH_LEN: usize = 32;
/// First bytes of an encoded hash list.
pub const MAGIC: [u8; 4] = *b"CLRH";
/// Version of the hash list encoding this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the encoded list's header, before the hashes.
pub const HEADER_LEN: usize = 28;

/// Errors of the initial sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Reading or writing a disk failed.
    #[error("disk at {offset}: {source}")]
    Disk {
        /// Where.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A hash list shorter than its header or than its count says.
    #[error("hash list truncated: {len} bytes, {need} needed")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        need: u64,
    },
    /// A hash list longer than its count says.
    #[error("hash list has {len} bytes, {expected} expected")]
    TrailingBytes {
        /// Bytes received.
        len: usize,
        /// Bytes expected.
        expected: u64,
    },
    /// Not a hash list.
    #[error("not a region hash list")]
    Magic,
    /// A hash list of an encoding version this code does not know.
    #[error("hash list version {0}, {VERSION} supported")]
    Version(u32),
    /// A hash list of another region size.
    #[error("hash list region size {0}, {REGION} expected")]
    RegionSize(u32),
    /// A region count that does not match the disk size.
    #[error("{count} regions for a {size}-byte disk")]
    Count {
        /// Regions in the list.
        count: u64,
        /// Disk size in the list.
        size: u64,
    },
    /// Data outside the disk.
    #[error("{len} bytes at {offset} are outside the {size}-byte disk")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
}

/// Number of regions of a `size`-byte disk (the last one may be short).
pub fn region_count(size: u64) -> u64 {
    size.div_ceil(REGION)
}

/// One SHA-256 per [`REGION`] of a disk, plus the disk's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionHashes {
    size: u64,
    hashes: Vec<[u8; HASH_LEN]>,
}

impl RegionHashes {
    /// The hashes of `disk`, read region by region.
    pub fn compute<B: BlockBackend + ?Sized>(disk: &mut B) -> Result<Self, SyncError> {
        let size = disk.size();
        let count = region_count(size);
        let mut buf = vec![0u8; REGION as usize];
        let mut hashes = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        for i in 0..count {
            let offset = i * REGION;
            let len = (size - offset).min(REGION) as usize;
            disk.read_at(offset, &mut buf[..len])
                .map_err(|source| SyncError::Disk { offset, source })?;
            hashes.push(Sha256::digest(&buf[..len]).into());
        }
        Ok(Self { size, hashes })
    }

    /// The list of a secondary without a base: differs from every disk but an empty one.
    pub fn absent() -> Self {
        Self {
            size: 0,
            hashes: Vec::new(),
        }
    }

    /// Size of the hashed disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hashes, one per region in order.
    pub fn hashes(&self) -> &[[u8; HASH_LEN]] {
        &self.hashes
    }

    /// The list as bytes: header (magic, version, region size, disk size, count), hashes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.hashes.len() * HASH_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(REGION as u32).to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        out
    }

    /// Parses a list a peer sent; every field and length is checked before allocating.
    pub fn decode(bytes: &[u8]) -> Result<Self, SyncError> {
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(SyncError::Truncated {
                len: bytes.len(),
                need: HEADER_LEN as u64,
            });
        };
        if header[..4] != MAGIC {
            return Err(SyncError::Magic);
        }
        let version = le_u32(header, 4);
        if version != VERSION {
            return Err(SyncError::Version(version));
        }
        let region = le_u32(header, 8);
        if u64::from(region) != REGION {
            return Err(SyncError::RegionSize(region));
        }
        let size = le_u64(header, 12);
        let count = le_u64(header, 20);
        if count != region_count(size) {
            return Err(SyncError::Count { count, size });
        }
        let expected = count
            .checked_mul(HASH_LEN as u64)
            .and_then(|n| n.checked_add(HEADER_LEN as u64))
            .ok_or(SyncError::Count { count, size })?;
        let len = bytes.len();
        if (len as u64) < expected {
            return Err(SyncError::Truncated {
                len,
                need: expected,
            });
        }
        if len as u64 > expected {
            return Err(SyncError::TrailingBytes { len, expected });
        }
        // `count` hashes fill exactly the rest of `bytes`: the allocation is bounded by it.
        let hashes = bytes[HEADER_LEN..]
            .chunks_exact(HASH_LEN)
            .map(|c| {
                let mut h = [0u8; HASH_LEN];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(Self { size, hashes })
    }
}

/// A byte range of the disk to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncRange {
    /// Start, a multiple of [`REGION`].
    pub offset: u64,
    /// Length, at most [`REGION`].
    pub len: u64,
}

/// What the primary sends: the regions whose hashes differ from the secondary's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPlan {
    size: u64,
    whole: bool,
    ranges: Vec<SyncRange>,
}

impl SyncPlan {
    /// Compares the primary's hashes with the secondary's; a size mismatch sends every region.
    pub fn new(primary: &RegionHashes, secondary: &RegionHashes) -> Self {
        let size = primary.size;
        let whole = primary.size != secondary.size;
        let ranges = primary
            .hashes
            .iter()
            .enumerate()
            .filter(|&(i, h)| whole || secondary.hashes.get(i) != Some(h))
            .map(|(i, _)| {
                let offset = i as u64 * REGION;
                SyncRange {
                    offset,
                    len: (size - offset).min(REGION),
                }
            })
            .collect();
        Self {
            size,
            whole,
            ranges,
        }
    }

    /// Size of the primary's disk, which the secondary's base must take.
    pub fn disk_size(&self) -> u64 {
        self.size
    }

    /// Whether the sizes differed, so the base is rewritten whole (and resized first).
    pub fn whole_disk(&self) -> bool {
        self.whole
    }

    /// The ranges to send, one per differing region, in ascending order.
    pub fn ranges(&self) -> &[SyncRange] {
        &self.ranges
    }

    /// Regions of the disk.
    pub fn regions(&self) -> u64 {
        region_count(self.size)
    }

    /// Regions to send.
    pub fn differing(&self) -> u64 {
        self.ranges.len() as u64
    }

    /// Bytes to send.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Progress before anything was sent.
    pub fn progress(&self) -> SyncProgress {
        SyncProgress {
            bytes_total: self.bytes(),
            bytes_sent: 0,
            regions: self.regions(),
            regions_total: self.differing(),
            regions_sent: 0,
        }
    }
}

/// Progress of an initial sync, for status and events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncProgress {
    /// Bytes to send in all.
    pub bytes_total: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Regions of the disk.
    pub regions: u64,
    /// Regions to send (the differing ones).
    pub regions_total: u64,
    /// Regions sent so far.
    pub regions_sent: u64,
}

impl SyncProgress {
    /// Counts `range` as sent.
    pub fn sent(&mut self, range: SyncRange) {
        self.bytes_sent = self.bytes_sent.saturating_add(range.len);
        self.regions_sent = self.regions_sent.saturating_add(1);
    }

    /// Whether every differing region was sent.
    pub fn done(&self) -> bool {
        self.regions_sent >= self.regions_total
    }
}

/// Writes received `data` at `offset` of the secondary's `base`, refusing data past its end.
pub fn apply<B: BlockBackend + ?Sized>(
    base: &mut B,
    offset: u64,
    data: &[u8],
) -> Result<(), SyncError> {
    let (len, size) = (data.len() as u64, base.size());
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(SyncError::OutOfRange { offset, len, size });
    }
    base.write_at(offset, data)
        .map_err(|source| SyncError::Disk { offset, source })
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::block::RawFile;
    use proptest::prelude::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A sparse file of `size` bytes, removed when dropped.
    struct TempImage(PathBuf);

    impl TempImage {
        fn new(size: u64) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("colovmm-sync-{}-{n}.img", std::process::id()));
            let file = std::fs::File::create(&path).unwrap();
            file.set_len(size).unwrap();
            Self(path)
        }

        fn open(&self) -> RawFile {
            RawFile::open(&self.0, false).unwrap()
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Writes a few distinct bytes into each region in `regions` (index multiplied up).
    fn scribble(disk: &mut RawFile, regions: &[u64]) {
        for &r in regions {
            let offset = r * REGION + (r * 4099) % (REGION - 16);
            disk.write_at(offset, &r.to_le_bytes()).unwrap();
            disk.write_at(offset + 8, b"primary!").unwrap();
        }
    }

    /// Every 10th region, offset by a varying amount so they scatter.
    fn tenth(count: u64) -> Vec<u64> {
        (0..count / 10).map(|k| k * 10 + (k * 7) % 10).collect()
    }

    /// Syncs a `size`-byte disk with 10 % of its regions differing; returns the plan.
    fn sync_tenth(size: u64) {
        let (p, s) = (TempImage::new(size), TempImage::new(size));
        let (mut primary, mut secondary) = (p.open(), s.open());
        let differ = tenth(region_count(size));
        scribble(&mut primary, &differ);

        let t = std::time::Instant::now();
        let theirs =
            RegionHashes::decode(&RegionHashes::compute(&mut secondary).unwrap().encode()).unwrap();
        let ours = RegionHashes::compute(&mut primary).unwrap();
        let plan = SyncPlan::new(&ours, &theirs);
        eprintln!("hashing {size} bytes twice: {:?}", t.elapsed());

        let sent: Vec<u64> = plan.ranges().iter().map(|r| r.offset / REGION).collect();
        assert_eq!(sent, differ);
        assert!(!plan.whole_disk());
        assert_eq!(plan.regions(), region_count(size));
        assert_eq!(plan.bytes(), differ.len() as u64 * REGION);
        let share = plan.bytes() as f64 / size as f64;
        assert!((0.09..=0.11).contains(&share), "sent {share} of the disk");

        let mut progress = plan.progress();
        let mut buf = vec![0u8; REGION as usize];
        for &r in plan.ranges() {
            let data = &mut buf[..r.len as usize];
            primary.read_at(r.offset, data).unwrap();
            apply(&mut secondary, r.offset, data).unwrap();
            progress.sent(r);
        }
        assert!(progress.done());
        assert_eq!(progress.bytes_sent, plan.bytes());
        assert_eq!(RegionHashes::compute(&mut secondary).unwrap(), ours);
    }

    /// A few seconds: the workspace builds sha2 optimized even in debug profiles.
    #[test]
    fn a_tenth_differing_sends_a_tenth_1gib() {
        sync_tenth(1 << 30);
    }

    #[test]
    fn identical_disks_send_nothing() {
        let size = 5 * REGION + 1234;
        let (p, s) = (TempImage::new(size), TempImage::new(size));
        let (mut primary, mut secondary) = (p.open(), s.open());
        scribble(&mut primary, &[0, 3, 5]);
        scribble(&mut secondary, &[0, 3, 5]);
        let plan = SyncPlan::new(
            &RegionHashes::compute(&mut primary).unwrap(),
            &RegionHashes::compute(&mut secondary).unwrap(),
        );
        assert!(plan.ranges().is_empty());
        assert_eq!((plan.regions(), plan.differing(), plan.bytes()), (6, 0, 0));
        assert!(plan.progress().done());
    }

    #[test]
    fn different_sizes_or_no_base_send_everything() {
        let size = 3 * REGION + 100;
        let (p, s) = (TempImage::new(size), TempImage::new(size - 100));
        let (mut primary, mut secondary) = (p.open(), s.open());
        let ours = RegionHashes::compute(&mut primary).unwrap();
        // The first three regions hash equal, yet the size mismatch sends them too.
        for theirs in [
            RegionHashes::compute(&mut secondary).unwrap(),
            RegionHashes::absent(),
        ] {
            let plan = SyncPlan::new(&ours, &theirs);
            assert!(plan.whole_disk());
            assert_eq!(plan.bytes(), size);
            assert_eq!(plan.differing(), 4);
            assert_eq!(
                plan.ranges().last(),
                Some(&SyncRange {
                    offset: 3 * REGION,
                    len: 100
                })
            );
        }
    }

    #[test]
    fn apply_refuses_data_past_the_end() {
        let img = TempImage::new(2 * REGION);
        let mut base = img.open();
        assert!(apply(&mut base, 2 * REGION - 4, b"abcd").is_ok());
        for (offset, len) in [(2 * REGION - 3, 4), (u64::MAX - 1, 4)] {
            assert!(matches!(
                apply(&mut base, offset, &vec![0; len]),
                Err(SyncError::OutOfRange { .. })
            ));
        }
    }

    fn sample() -> Vec<u8> {
        RegionHashes {
            size: 2 * REGION + 1,
            hashes: vec![[1; HASH_LEN], [2; HASH_LEN], [3; HASH_LEN]],
        }
        .encode()
    }

    #[test]
    fn encoding_round_trips() {
        let bytes = sample();
        assert_eq!(bytes.len(), HEADER_LEN + 3 * HASH_LEN);
        assert_eq!(RegionHashes::decode(&bytes).unwrap().encode(), bytes);
        let empty = RegionHashes::absent().encode();
        assert_eq!(
            RegionHashes::decode(&empty).unwrap(),
            RegionHashes::absent()
        );
    }

    #[test]
    fn decoder_refuses_bad_input() {
        let good = sample();
        let with = |at: usize, field: &[u8]| {
            let mut b = good.clone();
            b[at..at + field.len()].copy_from_slice(field);
            RegionHashes::decode(&b)
        };
        assert!(matches!(
            RegionHashes::decode(&good[..HEADER_LEN - 1]),
            Err(SyncError::Truncated { .. })
        ));
        assert!(matches!(
            RegionHashes::decode(&good[..good.len() - 1]),
            Err(SyncError::Truncated { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            RegionHashes::decode(&long),
            Err(SyncError::TrailingBytes { .. })
        ));
        assert!(matches!(with(0, b"XXXX"), Err(SyncError::Magic)));
        assert!(matches!(
            with(4, &2u32.to_le_bytes()),
            Err(SyncError::Version(2))
        ));
        assert!(matches!(
            with(8, &4096u32.to_le_bytes()),
            Err(SyncError::RegionSize(4096))
        ));
        // Wrong count for the size, either way.
        assert!(matches!(
            with(20, &4u64.to_le_bytes()),
            Err(SyncError::Count { count: 4, .. })
        ));
        assert!(matches!(
            with(12, &(3 * REGION + 1).to_le_bytes()),
            Err(SyncError::Count { count: 3, .. })
        ));
        // A huge disk with a matching count: refused for the missing bytes, nothing allocated.
        let mut huge = good[..HEADER_LEN].to_vec();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        huge[20..28].copy_from_slice(&region_count(u64::MAX).to_le_bytes());
        assert!(matches!(
            RegionHashes::decode(&huge),
            Err(SyncError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = RegionHashes::decode(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_a_valid_header(
            size in prop_oneof![any::<u64>(), 0..8 * REGION],
            count in prop_oneof![any::<u64>(), 0u64..8],
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&VERSION.to_le_bytes());
            bytes.extend_from_slice(&(REGION as u32).to_le_bytes());
            bytes.extend_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&count.to_le_bytes());
            bytes.extend_from_slice(&tail);
            if let Ok(list) = RegionHashes::decode(&bytes) {
                prop_assert_eq!(list.encode(), bytes);
            }
        }
    }
}
