//! virtio-blk: a device over a [`BlockBackend`].

mod backend;
mod device;
mod hook;
mod request;
mod worker;

pub use backend::{gather, scatter, total_len, BlockBackend, GuestSlice, RawFile};
pub use device::{Block, BlockConfig, BlockCounters};
pub use hook::{Hooked, SlotTaken, WriteHook, WriteOp, WriteSlot};
pub use request::{status, ID_BYTES, SECTOR_SIZE};
