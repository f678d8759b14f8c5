//! virtio-blk: a device over a [`BlockBackend`].

mod backend;
mod device;
mod request;

pub use backend::{BlockBackend, RawFile};
pub use device::{Block, BlockConfig, BlockCounters};
pub use request::{status, ID_BYTES, SECTOR_SIZE};
