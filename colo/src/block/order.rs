//! The order of the primary's writes and the checkpoints on the secondary.
//!
//! The PVM runs on right after a checkpoint's pause, so its writes after the pause of
//! checkpoint `n` (epoch `n`) may reach the secondary before the SVM has loaded `n`. The
//! base must equal the PVM's disk *at that pause* when the load empties the hidden and active
//! layers, so such writes wait in a queue and go into the base only once the load is done
//! (their copy-before-write then fills the new epoch's hidden layer). The primary puts a
//! barrier into the write stream at every pause; the secondary applies checkpoint `n` only
//! once barrier `n` arrived, i.e. once every write the PVM made before the pause is in the
//! base — "a checkpoint includes every write the guest saw completed before the pause".
//!
//! Nothing here owns a socket or waits: the caller feeds the stream and asks.

use std::collections::VecDeque;

use devices::virtio::block::BlockBackend;

use super::mirror::DiskOp;
use super::replica::{ReplicaDisk, ReplicaError};

/// Bytes of writes queued for a checkpoint not loaded yet, at most: beyond, the stream is
/// refused (the secondary cannot keep up; protection should end rather than grow without bound).
pub const MAX_QUEUED_BYTES: u64 = 256 << 20;

/// Errors of the write order.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// A barrier out of order.
    #[error("write barrier {got} after {last}")]
    Barrier {
        /// The barrier received.
        got: u64,
        /// The last one before it.
        last: u64,
    },
    /// A load of a checkpoint whose barrier has not arrived, or out of order.
    #[error("checkpoint {got} loaded with barrier {barrier} and the disk at {epoch}")]
    Load {
        /// The checkpoint loaded.
        got: u64,
        /// The last barrier received.
        barrier: u64,
        /// The checkpoint the disk was at.
        epoch: u64,
    },
    /// Too many writes wait for a load.
    #[error("{0} bytes of writes wait for a checkpoint load")]
    Backlog(u64),
    /// Applying a write failed.
    #[error(transparent)]
    Disk(#[from] ReplicaError),
}

/// A write kept for a later epoch.
enum Owned {
    Write { offset: u64, data: Vec<u8> },
    Zeroes { offset: u64, len: u64 },
}

/// The secondary's view of the write stream (see the module documentation).
#[derive(Default)]
pub struct WriteOrder {
    /// The checkpoint the disk (and the SVM) is at.
    epoch: u64,
    /// The last barrier received: writes arriving now belong to this epoch.
    barrier: u64,
    queued: VecDeque<(u64, Owned)>,
    queued_bytes: u64,
    applied: u64,
}

impl WriteOrder {
    /// A stream before protection: the first checkpoint is 1, barrier 0 is implied.
    pub fn new() -> Self {
        Self::default()
    }

    /// A write of the primary: into the base now if its epoch is the disk's, else queued.
    pub fn write<B: BlockBackend>(
        &mut self,
        disk: &mut ReplicaDisk<B>,
        op: DiskOp<'_>,
    ) -> Result<(), OrderError> {
        if self.barrier == self.epoch {
            if self.epoch == 0 {
                seed(disk, op)?;
            } else {
                apply(disk, op)?;
            }
            self.applied += 1;
            return Ok(());
        }
        let (owned, bytes) = match op {
            DiskOp::Write { offset, data } => (
                Owned::Write {
                    offset,
                    data: data.to_vec(),
                },
                data.len() as u64,
            ),
            DiskOp::Zeroes { offset, len } => (Owned::Zeroes { offset, len }, 0),
        };
        let total = self.queued_bytes.saturating_add(bytes);
        if total > MAX_QUEUED_BYTES {
            return Err(OrderError::Backlog(total));
        }
        self.queued_bytes = total;
        self.queued.push_back((self.barrier, owned));
        Ok(())
    }

    /// The primary paused for checkpoint `n`: later writes belong to epoch `n`.
    pub fn barrier(&mut self, n: u64) -> Result<(), OrderError> {
        if n != self.barrier + 1 {
            return Err(OrderError::Barrier {
                got: n,
                last: self.barrier,
            });
        }
        self.barrier = n;
        Ok(())
    }

    /// Whether checkpoint `n` may be applied: every write from before its pause is in.
    pub fn ready_for(&self, n: u64) -> bool {
        self.barrier >= n
    }

    /// The SVM loaded checkpoint `n`: the layers are emptied (the disk is the PVM's at the
    /// pause), then the writes of epoch `n` that waited go into the base.
    pub fn loaded<B: BlockBackend>(
        &mut self,
        disk: &mut ReplicaDisk<B>,
        n: u64,
    ) -> Result<(), OrderError> {
        if n != self.epoch + 1 || !self.ready_for(n) {
            return Err(OrderError::Load {
                got: n,
                barrier: self.barrier,
                epoch: self.epoch,
            });
        }
        disk.checkpoint()?;
        self.epoch = n;
        while self.queued.front().is_some_and(|(e, _)| *e == n) {
            let Some((_, op)) = self.queued.pop_front() else {
                break;
            };
            let op = match &op {
                Owned::Write { offset, data } => {
                    self.queued_bytes -= data.len() as u64;
                    DiskOp::Write {
                        offset: *offset,
                        data,
                    }
                }
                Owned::Zeroes { offset, len } => DiskOp::Zeroes {
                    offset: *offset,
                    len: *len,
                },
            };
            apply(disk, op)?;
            self.applied += 1;
        }
        Ok(())
    }

    /// Writes applied to the base so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Writes waiting for a load now.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// The primary is gone: writes of epochs the SVM never loads are dropped (the SVM goes
    /// on from its last checkpoint); returns how many.
    pub fn failover(&mut self) -> usize {
        self.queued_bytes = 0;
        let n = self.queued.len();
        self.queued.clear();
        n
    }
}

fn seed<B: BlockBackend>(disk: &mut ReplicaDisk<B>, op: DiskOp<'_>) -> Result<(), ReplicaError> {
    match op {
        DiskOp::Write { offset, data } => disk.seed_write(offset, data),
        DiskOp::Zeroes { offset, len } => disk.seed_zeroes(offset, len),
    }
}

fn apply<B: BlockBackend>(disk: &mut ReplicaDisk<B>, op: DiskOp<'_>) -> Result<(), ReplicaError> {
    match op {
        DiskOp::Write { offset, data } => disk.primary_write(offset, data),
        DiskOp::Zeroes { offset, len } => disk.primary_write_zeroes(offset, len),
    }
}

#[cfg(test)]
mod tests {
    use super::super::replica::{LayerStore, ReplicaConfig};
    use super::super::testdisk::Mem;
    use super::*;

    fn disk() -> ReplicaDisk<Mem> {
        let cfg = ReplicaConfig {
            block_size: 512,
            layers: LayerStore::Memory,
            ..ReplicaConfig::default()
        };
        ReplicaDisk::open(Mem(vec![0; 4096]), &cfg).unwrap()
    }

    fn svm_reads(d: &mut ReplicaDisk<Mem>, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        d.read(offset, &mut buf).unwrap();
        buf
    }

    fn write(offset: u64, data: &[u8]) -> DiskOp<'_> {
        DiskOp::Write { offset, data }
    }

    #[test]
    fn writes_after_a_pause_wait_for_that_checkpoints_load() {
        let mut d = disk();
        let mut o = WriteOrder::new();
        // Before the first checkpoint: epoch 0, straight into the base (the SVM has not run:
        // its first checkpoint is this disk).
        o.write(&mut d, write(0, b"epoch0")).unwrap();
        assert_eq!(svm_reads(&mut d, 0, 6), b"epoch0");
        assert_eq!(d.stats().copy_before_writes, 0);
        // Pause of checkpoint 1; the PVM goes on writing (epoch 1) before the SVM loaded 1.
        o.barrier(1).unwrap();
        assert!(o.ready_for(1) && !o.ready_for(2));
        o.write(&mut d, write(0, b"EPOCH1")).unwrap();
        assert_eq!(o.queued(), 1, "not in the base before the load");
        // The load: the disk is the PVM's at the pause, then epoch 1's writes go in, behind
        // the new hidden layer: the SVM still reads the checkpoint's content.
        o.loaded(&mut d, 1).unwrap();
        assert_eq!(o.queued(), 0);
        assert_eq!(svm_reads(&mut d, 0, 6), b"epoch0");
        // Checkpoint 2: now the SVM's disk is the PVM's, epoch 1's write included.
        o.barrier(2).unwrap();
        o.loaded(&mut d, 2).unwrap();
        assert_eq!(svm_reads(&mut d, 0, 6), b"EPOCH1");
        assert_eq!(o.applied(), 2);
    }

    #[test]
    fn a_checkpoint_waits_for_its_barrier_and_loads_in_order() {
        let mut d = disk();
        let mut o = WriteOrder::new();
        assert!(!o.ready_for(1));
        assert!(matches!(o.loaded(&mut d, 1), Err(OrderError::Load { .. })));
        o.barrier(1).unwrap();
        assert!(matches!(
            o.barrier(3),
            Err(OrderError::Barrier { got: 3, last: 1 })
        ));
        assert!(matches!(o.loaded(&mut d, 2), Err(OrderError::Load { .. })));
        o.loaded(&mut d, 1).unwrap();
        assert!(matches!(o.loaded(&mut d, 1), Err(OrderError::Load { .. })));
    }

    #[test]
    fn writes_two_epochs_ahead_wait_for_their_own_load() {
        let mut d = disk();
        let mut o = WriteOrder::new();
        o.barrier(1).unwrap();
        o.write(&mut d, write(0, b"one")).unwrap();
        o.barrier(2).unwrap();
        o.write(&mut d, write(512, b"two")).unwrap();
        o.write(&mut d, DiskOp::Zeroes { offset: 0, len: 3 })
            .unwrap();
        o.loaded(&mut d, 1).unwrap();
        assert_eq!(o.queued(), 2, "epoch 2's wait for checkpoint 2");
        o.loaded(&mut d, 2).unwrap();
        assert_eq!(o.queued(), 0);
        o.barrier(3).unwrap();
        o.loaded(&mut d, 3).unwrap();
        assert_eq!(svm_reads(&mut d, 0, 3), [0, 0, 0]);
        assert_eq!(svm_reads(&mut d, 512, 3), b"two");
    }

    #[test]
    fn a_failover_drops_what_the_svm_never_loads_and_the_backlog_is_bounded() {
        let mut d = disk();
        let mut o = WriteOrder::new();
        o.barrier(1).unwrap();
        o.write(&mut d, write(0, b"never")).unwrap();
        assert_eq!(o.failover(), 1);
        assert_eq!(svm_reads(&mut d, 0, 5), [0; 5]);
        let big = vec![1u8; (MAX_QUEUED_BYTES / 2 + 1) as usize];
        let mut o = WriteOrder::new();
        o.barrier(1).unwrap();
        // Offsets are checked only when applied; the bound counts bytes.
        o.write(&mut d, write(0, &big)).unwrap();
        assert!(matches!(
            o.write(&mut d, write(0, &big)),
            Err(OrderError::Backlog(_))
        ));
    }
}
