//! Block replication, the secondary's side: the disk the secondary VM (SVM) runs on.
//!
//! The primary's disk writes are mirrored into the secondary's copy of the disk (the *base*)
//! as they happen, while the SVM keeps running on the disk as of the last checkpoint. Two
//! sparse [`Layer`]s on top of the base make that possible ([`ReplicaDisk`]):
//!
//! - *hidden*: before the first primary write since the last checkpoint overwrites a base
//!   block, the block's old content is copied here (copy-before-write), so the SVM still
//!   reads the checkpoint's content;
//! - *active*: the SVM's own writes, which must never reach the base while the primary is
//!   alive.
//!
//! The SVM reads active, then hidden, then base. At a checkpoint the SVM's disk becomes the
//! primary's again, which is the base: both layers are emptied. At failover the SVM's view
//! is made permanent by merging the layers into the base, after which the SVM runs on the
//! base alone; with file-backed layers a journal lets a merge cut short by a crash resume.
//!
//! The layers are sized by what was written since the last checkpoint, not by the disk: a
//! map of blocks in memory (what QEMU's "put them on a ramdisk" advice amounts to), or a
//! sparse data file plus a bitmap index file (on tmpfs, that also survives a process crash).
//!
//! Block size: [`DEFAULT_BLOCK_SIZE`] is 64 KiB, the granularity QEMU's replication copies
//! and allocates at (the qcow2 cluster size of its hidden and active overlays, which its
//! copy-before-write backup job follows), so costs compare with QEMU's. Smaller blocks
//! waste less on scattered small writes (a 4 KiB write copies one whole block into a layer),
//! larger ones cost fewer map entries and syscalls on streaming writes; 64 KiB keeps a
//! layer's index at 16 entries per MiB written and the file index at 2 MiB per TiB of disk.
//! Any power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`] may be configured.

mod codec;
mod handle;
mod journal;
pub mod layer;
pub mod link;
pub mod mirror;
pub mod order;
pub mod replica;
pub mod sync;

#[cfg(test)]
mod testdisk;
#[cfg(test)]
mod tests;

pub use handle::ReplicaHandle;
pub use journal::merge_unfinished;
pub use layer::{Geometry, Layer, LayerError};
pub use replica::{
    LayerStore, ReplicaConfig, ReplicaDisk, ReplicaError, ReplicaState, ReplicaStats,
};

/// Block size used unless configured otherwise (QEMU's qcow2 cluster size).
pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;
/// Smallest block size: one sector.
pub const MIN_BLOCK_SIZE: u64 = 512;
/// Largest block size (qcow2's largest cluster).
pub const MAX_BLOCK_SIZE: u64 = 2 * 1024 * 1024;
