//! The replicated disk against a model: the primary's disk, and the SVM's view ("the disk at
//! the last checkpoint plus the SVM's writes since"); random interleavings, failovers cut
//! short by failing writes and restarts, and the edge cases.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::virtio::block::BlockBackend;
use proptest::prelude::*;

use super::*;

/// An in-memory base whose bytes outlive the disk that owns it (a "restart" reopens them),
/// whose writes can be made to fail after a count, tearing the failing one half-way, and
/// that loses what was written since its last flush in a power loss.
#[derive(Clone)]
struct MemDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
    durable: Arc<Mutex<Vec<u8>>>,
    writes_left: Arc<AtomicU64>,
}

impl MemDisk {
    fn new(size: usize) -> Self {
        let bytes: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ 0x5a).collect();
        Self {
            durable: Arc::new(Mutex::new(bytes.clone())),
            bytes: Arc::new(Mutex::new(bytes)),
            writes_left: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    fn power_loss(&self) {
        let durable = self.durable.lock().unwrap().clone();
        *self.bytes.lock().unwrap() = durable;
    }

    fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    fn fail_after(&self, n: u64) {
        self.writes_left.store(n, Ordering::SeqCst);
    }

    fn store(&mut self, offset: u64, data: Option<&[u8]>, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap();
        let (off, len) = (offset as usize, len as usize);
        if off + len > bytes.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let left = self.writes_left.load(Ordering::SeqCst);
        let n = if left == 0 { len / 2 } else { len };
        match data {
            Some(d) => bytes[off..off + n].copy_from_slice(&d[..n]),
            None => bytes[off..off + n].fill(0),
        }
        if left == 0 {
            return Err(io::Error::other("injected write failure"));
        }
        if left != u64::MAX {
            self.writes_left.store(left - 1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = self.bytes.lock().unwrap();
        let off = offset as usize;
        let src = bytes
            .get(off..off + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.store(offset, Some(buf), buf.len() as u64)
    }
    fn flush(&mut self) -> io::Result<()> {
        let bytes = self.bytes.lock().unwrap().clone();
        *self.durable.lock().unwrap() = bytes;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.store(offset, None, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.store(offset, None, len)
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("colovmm-block-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(block_size: u64, layers: LayerStore) -> ReplicaConfig {
    ReplicaConfig {
        block_size,
        layers,
        progress_every: 2,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed | 1).wrapping_mul(i as u8 ^ 0x3c).wrapping_add(seed))
        .collect()
}

/// Where an operation goes, fitted to the disk when applied ([`Span::fit`]).
#[derive(Clone, Copy, Debug)]
struct Span {
    off: u64,
    len: u64,
    /// In whole 512-byte sectors (what guests issue) rather than arbitrary bytes.
    sectors: bool,
}

impl Span {
    /// Inside a `size`-byte disk: up to three blocks long, sometimes to the end of the disk.
    fn fit(self, size: u64, bs: u64) -> (u64, u64) {
        let off = self.off % (size + 1);
        let room = size - off;
        let len = if self.len % 16 == 1 {
            room
        } else {
            self.len % (room.min(3 * bs) + 1)
        };
        if self.sectors {
            (off & !511, len & !511)
        } else {
            (off, len)
        }
    }
}

/// One step of an interleaving.
#[derive(Clone, Debug)]
enum Op {
    Primary(Span, u8),
    PrimaryZeroes(Span),
    Svm(Span, u8),
    SvmZeroes(Span, bool),
    Read(Span),
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    let span = (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(off, len, sectors)| Span {
        off,
        len,
        sectors,
    });
    prop_oneof![
        4 => (span.clone(), any::<u8>()).prop_map(|(s, seed)| Op::Primary(s, seed)),
        1 => span.clone().prop_map(Op::PrimaryZeroes),
        4 => (span.clone(), any::<u8>()).prop_map(|(s, seed)| Op::Svm(s, seed)),
        1 => (span.clone(), any::<bool>()).prop_map(|(s, discard)| Op::SvmZeroes(s, discard)),
        4 => span.prop_map(Op::Read),
        1 => Just(Op::Checkpoint),
    ]
}

/// The primary's disk (= the base) and the SVM's view.
struct Model {
    pvm: Vec<u8>,
    svm: Vec<u8>,
}

/// Applies `op` to the disk and the model, checking reads and the base as it goes.
fn apply(
    disk: &mut ReplicaDisk<MemDisk>,
    base: &MemDisk,
    m: &mut Model,
    op: &Op,
) -> Result<(), TestCaseError> {
    let (size, bs) = (m.pvm.len() as u64, disk.geometry().block_size());
    let r = |span: Span| {
        let (o, l) = span.fit(size, bs);
        (o, l, o as usize..(o + l) as usize)
    };
    match *op {
        Op::Primary(span, seed) => {
            let (o, l, range) = r(span);
            let data = pattern(seed, l as usize);
            disk.primary_write(o, &data).unwrap();
            m.pvm[range].copy_from_slice(&data);
        }
        Op::PrimaryZeroes(span) => {
            let (o, l, range) = r(span);
            disk.primary_write_zeroes(o, l).unwrap();
            m.pvm[range].fill(0);
        }
        Op::Svm(span, seed) => {
            let (o, l, range) = r(span);
            let data = pattern(seed, l as usize);
            disk.write(o, &data).unwrap();
            m.svm[range].copy_from_slice(&data);
        }
        Op::SvmZeroes(span, discard) => {
            let (o, l, range) = r(span);
            disk.write_zeroes(o, l, discard).unwrap();
            m.svm[range].fill(0);
        }
        Op::Read(span) => {
            let (o, l, range) = r(span);
            let mut buf = vec![0xeeu8; l as usize];
            disk.read(o, &mut buf).unwrap();
            prop_assert!(
                buf == m.svm[range],
                "SVM read {o}+{l} differs from the model"
            );
        }
        Op::Checkpoint => {
            disk.checkpoint().unwrap();
            m.svm.clone_from(&m.pvm);
            let mut all = vec![0u8; size as usize];
            disk.read(0, &mut all).unwrap();
            prop_assert!(
                all == m.pvm,
                "after a checkpoint the SVM sees the primary's disk"
            );
            let s = disk.stats();
            prop_assert_eq!((s.hidden_blocks, s.active_blocks), (0, 0));
        }
    }
    prop_assert!(base.snapshot() == m.pvm, "the base is the primary's disk");
    Ok(())
}

/// Runs `ops` on a fresh disk, then fails over; returns the disk, its base and the model.
fn run(
    ops: &[Op],
    size: usize,
    cfg: &ReplicaConfig,
) -> Result<(ReplicaDisk<MemDisk>, MemDisk, Model), TestCaseError> {
    let base = MemDisk::new(size);
    let mut disk = ReplicaDisk::open(base.clone(), cfg).unwrap();
    let mut m = Model {
        pvm: base.snapshot(),
        svm: base.snapshot(),
    };
    for op in ops {
        apply(&mut disk, &base, &mut m, op)?;
    }
    Ok((disk, base, m))
}

/// Fails over and checks the merged base and that the disk is then the base alone.
fn check_failover(
    disk: &mut ReplicaDisk<MemDisk>,
    base: &MemDisk,
    m: &Model,
) -> Result<(), TestCaseError> {
    disk.failover().unwrap();
    prop_assert!(
        base.snapshot() == m.svm,
        "the merged base is the SVM's view"
    );
    prop_assert_eq!(disk.state(), ReplicaState::Alone);
    let s = disk.stats();
    prop_assert_eq!((s.hidden_blocks, s.active_blocks, s.merges), (0, 0, 1));
    let end = m.svm.len().min(700);
    disk.write(0, &vec![0xa5; end]).unwrap();
    prop_assert!(
        base.snapshot()[..end].iter().all(|&b| b == 0xa5),
        "writes go to the base"
    );
    Ok(())
}

/// Block sizes from one sector up, disks of a few blocks with a short last one.
fn geometry() -> impl Strategy<Value = (u64, usize)> {
    (
        prop_oneof![Just(512u64), Just(1024), Just(4096)],
        1usize..24,
        0usize..4096,
    )
        .prop_map(|(bs, blocks, extra)| (bs, blocks * bs as usize + extra % bs as usize))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// In-memory layers: every read matches the model; the failover base is the SVM's view.
    #[test]
    fn memory_layers_follow_the_model(
        (bs, size) in geometry(),
        ops in proptest::collection::vec(op(), 0..60),
    ) {
        let (mut disk, base, m) = run(&ops, size, &config(bs, LayerStore::Memory))?;
        check_failover(&mut disk, &base, &m)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// File-backed layers, the same.
    #[test]
    fn file_layers_follow_the_model(
        (bs, size) in geometry(),
        ops in proptest::collection::vec(op(), 0..40),
    ) {
        let dir = TempDir::new();
        let (mut disk, base, m) = run(&ops, size, &config(bs, LayerStore::Files(dir.0.clone())))?;
        check_failover(&mut disk, &base, &m)?;
    }

    /// A failover whose base writes fail (tearing the failing write), resumed in process, by
    /// a restart that reopens the layers and journal, or by one after a power loss (the base
    /// loses what was not flushed), possibly several times, ends with the base equal to the
    /// SVM's view; the view stays right while the merge is pending.
    #[test]
    fn interrupted_merges_resume(
        (bs, size) in geometry(),
        ops in proptest::collection::vec(op(), 0..40),
        crashes in proptest::collection::vec((0u64..8, 0u8..3), 1..4),
        files in any::<bool>(),
        progress_every in 1u64..6,
    ) {
        let dir = TempDir::new();
        let store = if files { LayerStore::Files(dir.0.clone()) } else { LayerStore::Memory };
        let cfg = ReplicaConfig { progress_every, ..config(bs, store) };
        let (mut disk, base, m) = run(&ops, size, &cfg)?;
        for &(after, how) in &crashes {
            base.fail_after(after);
            let failed = disk.failover().is_err();
            base.fail_after(u64::MAX);
            if !failed {
                break;
            }
            prop_assert!(matches!(disk.state(), ReplicaState::Merging { .. }), "merging");
            if how > 0 && files {
                drop(disk);
                if how == 2 {
                    base.power_loss();
                }
                disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
                prop_assert!(matches!(disk.state(), ReplicaState::Merging { .. }), "merging");
            }
            let mut all = vec![0u8; size];
            disk.read(0, &mut all).unwrap();
            prop_assert!(all == m.svm, "mid-merge the SVM still sees its view");
            prop_assert!(disk.primary_write(0, &[1]).is_err());
            prop_assert!(disk.checkpoint().is_err());
        }
        disk.failover().unwrap();
        prop_assert!(base.snapshot() == m.svm, "the merged base is the SVM's view");
        prop_assert_eq!(disk.state(), ReplicaState::Alone);
        if files {
            prop_assert!(!dir.0.join("merge.journal").exists());
        }
    }
}

const BS: u64 = 4096;

fn mem_disk(size: usize) -> (ReplicaDisk<MemDisk>, MemDisk) {
    let base = MemDisk::new(size);
    let disk = ReplicaDisk::open(base.clone(), &config(BS, LayerStore::Memory)).unwrap();
    (disk, base)
}

fn read(disk: &mut ReplicaDisk<MemDisk>, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    disk.read(off, &mut buf).unwrap();
    buf
}

#[test]
fn unaligned_writes_spanning_blocks() {
    let (mut disk, base) = mem_disk(4 * BS as usize);
    let before = base.snapshot();
    // The primary writes 3 sectors over blocks 0 and 1; the SVM writes 10 bytes over 1 and 2.
    disk.primary_write(BS - 512, &[1; 1536]).unwrap();
    disk.write(2 * BS - 3, &[2; 10]).unwrap();
    let mut want = before.clone();
    want[(2 * BS - 3) as usize..(2 * BS + 7) as usize].fill(2);
    assert_eq!(read(&mut disk, 0, 4 * BS as usize), want);
    let s = disk.stats();
    assert_eq!(s.copy_before_writes, 2);
    assert_eq!((s.hidden_blocks, s.active_blocks), (2, 2));
    assert_eq!(s.active_bytes, 2 * BS);
    disk.checkpoint().unwrap();
    assert_eq!(read(&mut disk, 0, 4 * BS as usize), base.snapshot());
}

#[test]
fn copy_before_write_once_per_block_and_never_under_active() {
    let (mut disk, _) = mem_disk(4 * BS as usize);
    disk.primary_write(0, &[1; 512]).unwrap();
    disk.primary_write(512, &[2; 512]).unwrap();
    assert_eq!(disk.stats().copy_before_writes, 1, "block 0 copied once");
    disk.write(BS, &[3; 512]).unwrap();
    disk.primary_write(BS, &[4; 512]).unwrap();
    assert_eq!(disk.stats().copy_before_writes, 1, "active hides block 1");
    assert_eq!(read(&mut disk, BS, 512), vec![3; 512]);
    disk.checkpoint().unwrap();
    disk.primary_write(0, &[5; 512]).unwrap();
    assert_eq!(
        disk.stats().copy_before_writes,
        2,
        "copied again after a checkpoint"
    );
}

#[test]
fn short_last_block() {
    let size = 3 * BS as usize + 100;
    let (mut disk, base) = mem_disk(size);
    disk.primary_write(size as u64 - 50, &[7; 50]).unwrap();
    disk.write(size as u64 - 100, &[8; 30]).unwrap();
    disk.write_zeroes(3 * BS, 100, false).unwrap();
    assert_eq!(read(&mut disk, 3 * BS, 100), vec![0; 100]);
    assert_eq!(disk.stats().active_bytes, 0, "a zeroed block takes no room");
    disk.write(size as u64 - 1, &[9]).unwrap();
    let mut want = base.snapshot();
    want[size - 50..].copy_from_slice(&[7; 50]);
    want[3 * BS as usize..].fill(0);
    disk.checkpoint().unwrap();
    disk.write(3 * BS, &[6; 100]).unwrap();
    disk.failover().unwrap();
    want[3 * BS as usize..].fill(6);
    assert_eq!(base.snapshot(), want);
}

#[test]
fn zero_length_and_out_of_range() {
    let size = 2 * BS + 1000;
    let (mut disk, _) = mem_disk(size as usize);
    disk.primary_write(size, &[]).unwrap();
    disk.primary_write_zeroes(5, 0).unwrap();
    disk.write(size, &[]).unwrap();
    disk.read(0, &mut []).unwrap();
    disk.write_zeroes(size, 0, true).unwrap();
    assert_eq!(disk.stats(), ReplicaStats::default(), "nothing moved");
    let out = |r: Result<(), ReplicaError>| matches!(r, Err(ReplicaError::OutOfRange { .. }));
    assert!(out(disk.primary_write(size - 1, &[0; 2])));
    assert!(out(disk.primary_write(size + 1, &[])));
    assert!(out(disk.primary_write_zeroes(u64::MAX, 2)));
    assert!(out(disk.write(u64::MAX - 1, &[0; 4])));
    assert!(out(disk.read(size, &mut [0])));
    assert!(out(disk.write_zeroes(1, size, false)));
    assert_eq!(disk.stats(), ReplicaStats::default());
}

#[test]
fn bad_block_sizes_refused() {
    for bs in [0, 256, 511, 513, 3000, 4 << 20] {
        let r = ReplicaDisk::open(MemDisk::new(8192), &config(bs, LayerStore::Memory));
        assert!(matches!(r, Err(ReplicaError::Geometry(_))), "{bs}");
    }
    assert!(
        Geometry::new(u64::MAX, 4096).is_err(),
        "rounds up past 64 bits"
    );
    assert_eq!(
        ReplicaConfig::default().block_size,
        DEFAULT_BLOCK_SIZE,
        "64 KiB unless told"
    );
}

#[test]
fn after_failover_the_disk_is_the_base() {
    let (mut disk, base) = mem_disk(4 * BS as usize);
    disk.write(0, &[1; 100]).unwrap();
    disk.failover().unwrap();
    disk.failover().unwrap();
    assert_eq!(disk.stats().merges, 1, "a second failover does nothing");
    assert!(matches!(
        disk.primary_write(0, &[0]),
        Err(ReplicaError::NotReplicating(_))
    ));
    assert!(disk.primary_write_zeroes(0, 1).is_err());
    assert!(disk.checkpoint().is_err());
    disk.write_zeroes(BS, BS, true).unwrap();
    disk.flush().unwrap();
    assert!(base.snapshot()[..100].iter().all(|&b| b == 1));
    assert!(base.snapshot()[BS as usize..2 * BS as usize]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn whole_disk_discard_takes_no_room() {
    let size = 64 * BS as usize;
    let (mut disk, base) = mem_disk(size);
    disk.write_zeroes(0, size as u64, true).unwrap();
    let s = disk.stats();
    assert_eq!((s.active_blocks, s.active_bytes), (64, 0));
    assert!(read(&mut disk, 0, size).iter().all(|&b| b == 0));
    disk.write(100, &[3; 10]).unwrap();
    assert_eq!(disk.stats().active_bytes, BS);
    disk.failover().unwrap();
    let got = base.snapshot();
    assert!(got[..100].iter().chain(&got[110..]).all(|&b| b == 0));
    assert_eq!(got[100..110], [3; 10]);
}

#[test]
fn handle_serves_the_svm_and_the_primary() {
    let base = MemDisk::new(8 * BS as usize);
    let disk = ReplicaDisk::open(base.clone(), &config(BS, LayerStore::Memory)).unwrap();
    let handle = ReplicaHandle::new(disk);
    let mut svm: Box<dyn BlockBackend> = handle.try_clone().unwrap();
    let mut worker = svm.try_clone().unwrap();
    assert_eq!(svm.size(), 8 * BS);
    let primary = handle.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..8 {
            primary
                .lock()
                .unwrap()
                .primary_write(i * BS, &[0xee; 4096])
                .unwrap();
        }
    });
    svm.write_at(10, b"svm").unwrap();
    writer.join().unwrap();
    let mut buf = [0u8; 3];
    worker.read_at(10, &mut buf).unwrap();
    assert_eq!(&buf, b"svm");
    let mut buf = [0u8; 4];
    worker.read_at(BS, &mut buf).unwrap();
    assert_eq!(
        buf,
        [(BS / 512) as u8 ^ 0x5a; 4],
        "the SVM keeps the checkpoint's block"
    );
    let err = svm.read_at(8 * BS, &mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    svm.write_zeroes(0, BS).unwrap();
    svm.discard(BS, 1).unwrap();
    svm.flush().unwrap();
    handle.lock().unwrap().checkpoint().unwrap();
    worker.read_at(BS, &mut buf).unwrap();
    assert_eq!(buf, [0xee; 4]);
}

/// A power loss just after failover began keeps what the primary wrote before the last
/// checkpoint (the base is flushed before the journal is written) and what the SVM wrote.
#[test]
fn power_loss_as_failover_begins() {
    let dir = TempDir::new();
    let base = MemDisk::new(4 * BS as usize);
    let cfg = config(BS, LayerStore::Files(dir.0.clone()));
    let mut disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
    disk.primary_write(0, &[1; 100]).unwrap();
    disk.checkpoint().unwrap();
    disk.write(2 * BS, &[2; 100]).unwrap();
    disk.primary_write(3 * BS, &[3; 100]).unwrap();
    let want = read(&mut disk, 0, 4 * BS as usize);
    base.fail_after(0);
    assert!(disk.failover().is_err());
    drop(disk);
    base.power_loss();
    base.fail_after(u64::MAX);
    let mut disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
    assert_eq!(disk.state(), ReplicaState::Merging { next: 0 });
    assert_eq!(read(&mut disk, 0, 4 * BS as usize), want);
    disk.failover().unwrap();
    assert_eq!(base.snapshot(), want);
}

#[test]
fn reopening_without_a_journal_starts_empty() {
    let dir = TempDir::new();
    let base = MemDisk::new(4 * BS as usize);
    let cfg = config(BS, LayerStore::Files(dir.0.clone()));
    let mut disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
    disk.write(0, &[1; 10]).unwrap();
    disk.primary_write(BS, &[2; 10]).unwrap();
    drop(disk);
    let mut disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
    assert_eq!(disk.state(), ReplicaState::Replicating);
    assert_eq!(read(&mut disk, 0, 4 * BS as usize), base.snapshot());
}

#[test]
fn damaged_journal_is_refused() {
    let dir = TempDir::new();
    let base = MemDisk::new(4 * BS as usize);
    let cfg = config(BS, LayerStore::Files(dir.0.clone()));
    let mut disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
    disk.write(0, &[1; 10]).unwrap();
    base.fail_after(0);
    assert!(disk.failover().is_err());
    base.fail_after(u64::MAX);
    drop(disk);
    let journal = dir.0.join("merge.journal");
    let good = std::fs::read(&journal).unwrap();
    let refused = |bytes: &[u8], cfg: &ReplicaConfig| {
        std::fs::write(&journal, bytes).unwrap();
        matches!(
            ReplicaDisk::open(base.clone(), cfg),
            Err(ReplicaError::Journal { .. })
        )
    };
    for at in [0, 8, 12, 16, 24, 32, 40] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        assert!(refused(&bad, &cfg), "byte {at} flipped");
    }
    assert!(refused(&good[..40], &cfg), "short");
    assert!(
        refused(&good, &config(2 * BS, cfg.layers.clone())),
        "other block size"
    );
    std::fs::write(&journal, &good).unwrap();
    let mut disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
    disk.failover().unwrap();
    assert_eq!(base.snapshot()[..10], [1; 10]);
}

#[test]
fn damaged_index_is_refused() {
    let dir = TempDir::new();
    let base = MemDisk::new(4 * BS as usize);
    let cfg = config(BS, LayerStore::Files(dir.0.clone()));
    let mut disk = ReplicaDisk::open(base.clone(), &cfg).unwrap();
    disk.write(0, &[1; 10]).unwrap();
    base.fail_after(0);
    assert!(disk.failover().is_err());
    base.fail_after(u64::MAX);
    drop(disk);
    let index = dir.0.join("active.index");
    let good = std::fs::read(&index).unwrap();
    for (at, bit) in [(0, 1), (9, 1), (20, 1), (30, 1), (35, 1), (40, 0x80)] {
        let mut bad = good.clone();
        bad[at] ^= bit;
        std::fs::write(&index, &bad).unwrap();
        let r = ReplicaDisk::open(base.clone(), &cfg);
        assert!(
            matches!(
                r,
                Err(ReplicaError::Layer {
                    layer: "active",
                    ..
                })
            ),
            "byte {at}"
        );
    }
    std::fs::write(&index, &good[..40]).unwrap();
    assert!(ReplicaDisk::open(base.clone(), &cfg).is_err(), "short");
}
