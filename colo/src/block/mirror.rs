//! Block replication, the primary's side: the [`WriteHook`] that hands every write of the
//! PVM's disk to the secondary ([`Replicator`]) after the PVM's own image took it.
//!
//! The guest's write completes once the secondary holds it ([`Completion::Replicated`], the
//! default: the device settles a batch of served requests before it reports them, and the
//! mirror waits then for the secondary's ack of everything sent, one round trip per batch), or
//! as soon as the local image does ([`Completion::Local`]). Local-first is still
//! consistent for COLO — a checkpoint is ordered after every write sent before its pause, and
//! the PVM's output that depends on a write leaves only after such a checkpoint — but it lets an
//! unbounded amount of written data be in flight: a checkpoint then waits for all of it, and a
//! primary that dies takes the unsent part with it (harmless: the SVM goes on from the last
//! checkpoint, whose disk the secondary has whole).
//!
//! Replication never fails the guest's I/O: the first error detaches the mirror (the PVM's disk
//! goes on alone), is counted, and is reported once through [`Replicator::failed`] so the
//! caller ends protection with a clear event.
//!
//! The device's [`devices::virtio::block::Hooked`] backend calls the hook under its slot's
//! lock, in the image's order, with the bytes snapshotted once: the secondary gets exactly
//! the bytes written locally, in the same order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use devices::virtio::block::{WriteHook, WriteOp};
use serde::Serialize;

/// One write the secondary must apply to its base, in order (the device's [`WriteOp`]).
pub type DiskOp<'a> = WriteOp<'a>;

/// Where the mirror sends writes: the disk channel to the secondary.
pub trait Replicator: Send + Sync {
    /// Sends `op` after every earlier one.
    fn replicate(&self, op: DiskOp<'_>) -> Result<(), String>;
    /// Returns once the secondary holds every write sent so far.
    fn settle(&self) -> Result<(), String>;
    /// Replication failed for good (called once, with the first error): end protection.
    fn failed(&self, why: String);
}

/// When the guest's write completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Completion {
    /// Once the secondary holds it.
    #[default]
    Replicated,
    /// Once the local image holds it (see the module documentation for the risk).
    Local,
}

/// What the mirror did, for the status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MirrorCounters {
    /// Writes (and zeroed ranges) handed to the secondary.
    pub replicated: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Writes that were not replicated because replication had failed.
    pub unreplicated: u64,
    /// Whether replication failed (the disk goes on alone).
    pub detached: bool,
}

/// The mirror's shared state: the replicator and the counters.
pub struct Mirror {
    replicator: Arc<dyn Replicator>,
    completion: Completion,
    detached: AtomicBool,
    replicated: AtomicU64,
    bytes: AtomicU64,
    unreplicated: AtomicU64,
}

impl Mirror {
    /// A mirror sending to `replicator`.
    pub fn new(replicator: Arc<dyn Replicator>, completion: Completion) -> Arc<Mirror> {
        Arc::new(Mirror {
            replicator,
            completion,
            detached: AtomicBool::new(false),
            replicated: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            unreplicated: AtomicU64::new(0),
        })
    }

    /// Stops replicating (protection ended): the disk goes on alone.
    pub fn detach(&self) {
        self.detached.store(true, Ordering::Release);
    }

    /// The counters.
    pub fn counters(&self) -> MirrorCounters {
        MirrorCounters {
            replicated: self.replicated.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            unreplicated: self.unreplicated.load(Ordering::Relaxed),
            detached: self.detached.load(Ordering::Acquire),
        }
    }

    /// Hands `op` to the secondary, after the local write succeeded.
    pub fn send(&self, op: DiskOp<'_>) {
        if self.detached.load(Ordering::Acquire) {
            self.unreplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let len = match op {
            DiskOp::Write { data, .. } => data.len() as u64,
            DiskOp::Zeroes { len, .. } => len,
        };
        match self.replicator.replicate(op) {
            Ok(()) => {
                self.replicated.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(why) => {
                self.unreplicated.fetch_add(1, Ordering::Relaxed);
                self.fail(why);
            }
        }
    }

    /// With [`Completion::Replicated`], waits until the secondary holds what was sent: the
    /// guest learns of those writes' completion next.
    pub fn settle(&self) {
        if self.completion != Completion::Replicated || self.detached.load(Ordering::Acquire) {
            return;
        }
        if let Err(why) = self.replicator.settle() {
            self.fail(why);
        }
    }

    /// Detaches for good on the first error and reports it once.
    fn fail(&self, why: String) {
        if !self.detached.swap(true, Ordering::AcqRel) {
            log::warn!("COLO disk: replication failed, the disk goes on alone: {why}");
            self.replicator.failed(why);
        }
    }
}

impl WriteHook for Mirror {
    fn written(&self, op: WriteOp<'_>) {
        self.send(op);
    }

    fn settle(&self) {
        Mirror::settle(self);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdisk::Mem;
    use super::*;
    use devices::virtio::block::{BlockBackend, Hooked, WriteSlot};
    use std::sync::Mutex;

    /// Applies what it is sent to its own disk (the secondary's base); fails from `fail_at`.
    #[derive(Default)]
    struct Secondary {
        base: Mutex<Vec<u8>>,
        /// Per write: how many settles came before it.
        sent: Mutex<Vec<usize>>,
        settles: Mutex<usize>,
        fail_at: Option<usize>,
        failed: Mutex<Vec<String>>,
    }

    impl Replicator for Secondary {
        fn settle(&self) -> Result<(), String> {
            *self.settles.lock().unwrap() += 1;
            Ok(())
        }

        fn replicate(&self, op: DiskOp<'_>) -> Result<(), String> {
            let mut sent = self.sent.lock().unwrap();
            if self.fail_at.is_some_and(|n| sent.len() >= n) {
                return Err("the secondary is gone".into());
            }
            sent.push(*self.settles.lock().unwrap());
            let mut base = self.base.lock().unwrap();
            match op {
                DiskOp::Write { offset, data } => {
                    base[offset as usize..offset as usize + data.len()].copy_from_slice(data)
                }
                DiskOp::Zeroes { offset, len } => {
                    base[offset as usize..(offset + len) as usize].fill(0)
                }
            }
            Ok(())
        }
        fn failed(&self, why: String) {
            self.failed.lock().unwrap().push(why);
        }
    }

    /// The PVM's disk with the mirror in its slot.
    struct Pvm {
        disk: Hooked,
        mirror: Arc<Mirror>,
    }

    impl Pvm {
        fn mirror(&self) -> &Mirror {
            &self.mirror
        }

        fn local(&mut self) -> Vec<u8> {
            let mut all = vec![0; 8192];
            self.disk.read_at(0, &mut all).unwrap();
            all
        }
    }

    fn setup(fail_at: Option<usize>, completion: Completion) -> (Pvm, Arc<Secondary>) {
        let sec = Arc::new(Secondary {
            base: Mutex::new(vec![7; 8192]),
            fail_at,
            ..Secondary::default()
        });
        let slot = WriteSlot::new();
        let mirror = Mirror::new(sec.clone(), completion);
        slot.install(mirror.clone()).unwrap();
        let disk = Hooked::new(Box::new(Mem(vec![7; 8192])), slot);
        (Pvm { disk, mirror }, sec)
    }

    #[test]
    fn every_write_reaches_both_in_order() {
        let (mut d, sec) = setup(None, Completion::Replicated);
        d.disk.write_at(100, b"hello").unwrap();
        d.disk.write_zeroes(0, 50).unwrap();
        d.disk.discard(4096, 4096).unwrap();
        d.disk.write_at(4100, b"over the discard").unwrap();
        let local = d.local();
        assert_eq!(&*sec.base.lock().unwrap(), &local);
        // Sent as they came, no wait in between; the device's settle waits for all of them.
        assert_eq!(*sec.sent.lock().unwrap(), [0; 4]);
        assert!(d.disk.needs_settle());
        d.disk.settle();
        assert_eq!(*sec.settles.lock().unwrap(), 1);
        let c = d.mirror().counters();
        assert_eq!(
            (c.replicated, c.bytes, c.detached),
            (4, 5 + 50 + 4096 + 16, false)
        );
        let mut buf = [0u8; 5];
        d.disk.read_at(100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn local_completion_does_not_wait() {
        let (mut d, sec) = setup(None, Completion::Local);
        d.disk.write_at(0, b"x").unwrap();
        d.disk.settle();
        assert_eq!(sec.sent.lock().unwrap().len(), 1);
        assert_eq!(*sec.settles.lock().unwrap(), 0);
    }

    #[test]
    fn a_replication_error_never_fails_the_guest_and_is_reported_once() {
        let (mut d, sec) = setup(Some(1), Completion::Replicated);
        d.disk.write_at(0, b"first").unwrap();
        d.disk.write_at(10, b"second").unwrap();
        d.disk.write_at(20, b"third").unwrap();
        assert_eq!(
            &d.local()[10..16],
            b"second",
            "the PVM's disk has every write"
        );
        assert_eq!(&sec.base.lock().unwrap()[10..16], &[7u8; 6]);
        assert_eq!(sec.failed.lock().unwrap().len(), 1);
        let c = d.mirror().counters();
        assert_eq!((c.replicated, c.unreplicated, c.detached), (1, 2, true));
    }

    #[test]
    fn a_local_error_is_the_guests_and_is_not_replicated() {
        let (mut d, sec) = setup(None, Completion::Replicated);
        assert!(d.disk.write_at(8190, b"past the end").is_err());
        assert!(sec.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn a_detached_mirror_only_writes_locally() {
        let (mut d, sec) = setup(None, Completion::Replicated);
        d.mirror().detach();
        d.disk.write_at(0, b"alone").unwrap();
        assert!(sec.sent.lock().unwrap().is_empty());
        assert!(
            sec.failed.lock().unwrap().is_empty(),
            "detaching is not a failure"
        );
        assert_eq!(d.mirror().counters().unreplicated, 1);
    }
}
