//! Block replication between a real primary and secondary over loopback, without KVM: the
//! PVM's disk is a raw image behind a write slot the test writes through (as its virtio-blk
//! worker would), the SVM's disk the replica handle the secondary built.
//!
//! - the initial sync sends only the regions where the secondary's copy differs;
//! - the SVM reads the disk as of the last checkpoint while the primary writes, and the
//!   primary's disk again after each checkpoint (its own writes dropped);
//! - when the primary is lost, the SVM's view is merged into the base file;
//! - when the secondary is lost, the PVM's disk goes on alone.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use colo::block::link::DiskTarget;
use colo::vm::ProtectedDisk;
use common::*;
use devices::virtio::block::{BlockBackend, Hooked, RawFile, WriteSlot};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "colo-disk-{name}-{}-{}",
            std::process::id(),
            Rng::seeded().next_u64()
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn read_all(b: &mut dyn BlockBackend) -> Vec<u8> {
    let mut all = vec![0u8; b.size() as usize];
    b.read_at(0, &mut all).unwrap();
    all
}

fn file_bytes(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap()
}

/// A primary disk with random data in every other MiB, a secondary copy that differs in
/// `differing` regions, and a protected pair over them. Returns the pair, the PVM's disk
/// (as its device writes it) and the paths.
fn pair_with_disk(dir: &TempDir, differing: &[u64]) -> (Pair, Hooked, PathBuf, PathBuf) {
    let (pvm_path, base_path) = (dir.0.join("pvm.img"), dir.0.join("base.img"));
    let mut rng = Rng::seeded();
    let mut image = vec![0u8; SIZE as usize];
    for r in (0..SIZE / MIB).step_by(2) {
        rng.fill(&mut image[(r * MIB) as usize..((r + 1) * MIB) as usize]);
    }
    fs::write(&pvm_path, &image).unwrap();
    for &r in differing {
        image[(r * MIB + 100) as usize] ^= 0xff;
    }
    fs::write(&base_path, &image).unwrap();
    let slot = WriteSlot::new();
    let disk = Hooked::new(
        Box::new(RawFile::open(&pvm_path, false).unwrap()),
        slot.clone(),
    );
    PRIMARY_DISKS.with(|d| {
        *d.borrow_mut() = vec![ProtectedDisk {
            id: "disk0".into(),
            path: pvm_path.clone(),
            size: SIZE,
            slot,
        }]
    });
    SECONDARY_DISKS.with(|d| {
        *d.borrow_mut() = vec![DiskTarget {
            path: base_path.clone(),
        }]
    });
    let pair = start_pair(Setup {
        interval: Duration::from_secs(3600),
        pvm_mutates: false,
        svm_mutates: false,
        proxy: true,
        ..Setup::default()
    });
    PRIMARY_DISKS.with(|d| d.borrow_mut().clear());
    SECONDARY_DISKS.with(|d| d.borrow_mut().clear());
    pair.wait_protected();
    (pair, disk, pvm_path, base_path)
}

/// The SVM's disk as its device would read it.
fn svm_disk(pair: &Pair) -> Box<dyn BlockBackend> {
    let disks = pair.s.host.svm_disks.lock().unwrap();
    disks[0].try_clone().expect("a replica handle clones")
}

fn checkpoint(pair: &Pair) {
    let n = pair.p.protection.status().checkpoints;
    pair.p.protection.checkpoint(false).unwrap();
    pair.wait_checkpoints(n + 1);
    assert!(wait_until(WAIT, || pair.s.protection.status().checkpoints > n));
}

#[test]
fn the_svm_sees_each_checkpoints_disk_and_takes_it_over_when_the_primary_is_lost() {
    let dir = TempDir::new("takeover");
    let (pair, mut pvm, pvm_path, base_path) = pair_with_disk(&dir, &[0, 3, 4]);
    // Only the three differing regions crossed.
    let syncs = pair.p.obs.events("disk-sync");
    let last = &syncs.last().expect("a disk-sync event").props;
    assert_eq!(last["done"], true);
    assert_eq!(last["regions_differing"], 3);
    assert_eq!(last["bytes_sent"], 3 * MIB);
    let mut svm = svm_disk(&pair);
    assert_eq!(read_all(svm.as_mut()), file_bytes(&pvm_path));

    // The PVM writes: the SVM still reads the checkpoint's disk, until the next one.
    let before = file_bytes(&pvm_path);
    pvm.write_at(MIB + 7, b"written by the PVM").unwrap();
    pvm.write_zeroes(5 * MIB, 64 * 1024).unwrap();
    assert_eq!(read_all(svm.as_mut()), before);
    // The SVM's own writes stay in its active layer...
    svm.write_at(2 * MIB, b"the SVM's own").unwrap();
    checkpoint(&pair);
    // ... and a checkpoint makes its disk the PVM's again.
    let at_checkpoint = file_bytes(&pvm_path);
    assert_eq!(read_all(svm.as_mut()), at_checkpoint);
    let st = pair.s.protection.status().disks.expect("disk status");
    assert_eq!(st.disks[0].replica.unwrap().active_bytes, 0);

    // After the checkpoint: the SVM writes, the PVM writes, and the primary dies.
    svm.write_at(6 * MIB, b"after the checkpoint").unwrap();
    pvm.write_at(7 * MIB, b"lost with the primary").unwrap();
    let mut expected = at_checkpoint.clone();
    expected[(6 * MIB) as usize..(6 * MIB) as usize + 20].copy_from_slice(b"after the checkpoint");
    pair.proxy().cut();
    let (exit, _) = pair.s.obs.wait_exit(WAIT).expect("the secondary's exit");
    assert_eq!(exit.action, colo::ExitAction::Continue, "{exit:?}");
    // The merged base is exactly what the SVM saw, and the SVM goes on on it.
    assert_eq!(file_bytes(&base_path), expected);
    assert_eq!(read_all(svm.as_mut()), expected);
    svm.write_at(0, b"alone").unwrap();
    assert_eq!(&file_bytes(&base_path)[..5], b"alone");
    let st = pair.s.protection.status().disks.expect("disk status");
    assert_eq!(st.disks[0].replica.unwrap().merges, 1);
}

#[test]
fn the_pvms_disk_goes_on_alone_when_the_secondary_is_lost() {
    let dir = TempDir::new("alone");
    let (pair, mut pvm, pvm_path, _) = pair_with_disk(&dir, &[]);
    assert_eq!(
        pair.p.obs.events("disk-sync").last().unwrap().props["bytes_sent"],
        0
    );
    pvm.write_at(0, b"replicated").unwrap();
    pair.proxy().cut();
    let (exit, _) = pair.p.obs.wait_exit(WAIT).expect("the primary's exit");
    assert_eq!(exit.action, colo::ExitAction::Continue);
    pvm.write_at(10, b"alone").unwrap();
    let bytes = file_bytes(&pvm_path);
    assert_eq!(&bytes[..15], b"replicatedalone");
    let st = pair.p.protection.status().disks.expect("disk status");
    let mirror = st.disks[0].mirror.unwrap();
    assert!(mirror.detached);
    assert_eq!(mirror.replicated, 1);
}

#[test]
fn a_secondary_without_a_copy_for_each_disk_refuses_and_the_primary_says_why() {
    let dir = TempDir::new("refused");
    let path = dir.0.join("pvm.img");
    fs::write(&path, vec![1u8; MIB as usize]).unwrap();
    PRIMARY_DISKS.with(|d| {
        *d.borrow_mut() = vec![ProtectedDisk {
            id: "disk0".into(),
            path: path.clone(),
            size: MIB,
            slot: WriteSlot::new(),
        }]
    });
    // The secondary was given no --disk.
    let pair = start_pair(Setup {
        interval: Duration::from_secs(3600),
        pvm_mutates: false,
        svm_mutates: false,
        ..Setup::default()
    });
    PRIMARY_DISKS.with(|d| d.borrow_mut().clear());
    let (exit, _) = pair.p.obs.wait_exit(WAIT).expect("the primary's exit");
    assert_eq!(exit.action, colo::ExitAction::Continue);
    assert!(
        exit.reason
            .contains("more disks than the 0 this secondary was given"),
        "{exit:?}"
    );
    let (exit, _) = pair.s.obs.wait_exit(WAIT).expect("the secondary's exit");
    assert_eq!(exit.action, colo::ExitAction::Stop, "{exit:?}");
    assert!(pair.p.obs.events("protected").is_empty());
}

/// A raw file whose writes fail once `left` runs out (a crash in the middle of a merge).
struct Failing {
    file: RawFile,
    left: Arc<AtomicU64>,
}

impl BlockBackend for Failing {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let left = self.left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(std::io::Error::other("the process died"));
        }
        self.left.store(left - 1, Ordering::SeqCst);
        self.file.write_at(offset, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.file.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.file.write_zeroes(offset, len)
    }
}

#[test]
fn a_merge_cut_short_is_finished_when_the_secondary_starts_again() {
    use colo::block::{LayerStore, ReplicaConfig, ReplicaDisk};
    let dir = TempDir::new("resume");
    let base_path = dir.0.join("copy.img");
    let mut bytes = vec![0u8; SIZE as usize];
    Rng::seeded().fill(&mut bytes);
    fs::write(&base_path, &bytes).unwrap();
    let layers = dir.0.join("layers");
    let left = Arc::new(AtomicU64::new(u64::MAX));
    let base = Failing {
        file: RawFile::open(&base_path, false).unwrap(),
        left: left.clone(),
    };
    let config = ReplicaConfig {
        layers: LayerStore::Files(layers.join("disk0")),
        ..ReplicaConfig::default()
    };
    let mut disk = ReplicaDisk::open(base, &config).unwrap();
    disk.checkpoint().unwrap();
    // The primary's writes after the checkpoint (the SVM must not see them) and the SVM's own.
    for i in 0..40u64 {
        disk.primary_write(i * 200_000, b"the primary, after the checkpoint")
            .unwrap();
        disk.write(i * 200_000 + 70_000, b"the SVM's own").unwrap();
    }
    let mut view = vec![0u8; SIZE as usize];
    disk.read(0, &mut view).unwrap();
    assert_ne!(view, file_bytes(&base_path), "the layers matter");
    // The failover's merge dies after a few blocks, the process with it.
    left.store(5, Ordering::SeqCst);
    assert!(disk.failover().is_err(), "the merge is cut short");
    drop(disk);
    assert!(colo::block::merge_unfinished(&layers.join("disk0")));
    let target = DiskTarget {
        path: base_path.clone(),
    };
    let finished =
        colo::block::link::finish_merges(std::slice::from_ref(&target), &layers).unwrap();
    assert_eq!(finished, std::slice::from_ref(&base_path));
    assert!(!colo::block::merge_unfinished(&layers.join("disk0")));
    assert_eq!(file_bytes(&base_path), view, "the copy is the SVM's view");
    // Nothing left to finish the next time.
    let none = colo::block::link::finish_merges(&[target], &layers).unwrap();
    assert!(none.is_empty());
}
