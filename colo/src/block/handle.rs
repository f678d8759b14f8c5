//! The shared handle on a replica disk: the SVM's virtio-blk backend and the receiver of the
//! primary's writes, one operation at a time.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::block::BlockBackend;

use super::replica::{ReplicaDisk, ReplicaError};

/// A shared handle on a [`ReplicaDisk`]: the SVM's virtio-blk backend (as many clones as its
/// workers need) and the receiver of the primary's writes, each operation atomic.
pub struct ReplicaHandle<B> {
    disk: Arc<Mutex<ReplicaDisk<B>>>,
    size: u64,
}

impl<B> Clone for ReplicaHandle<B> {
    fn clone(&self) -> Self {
        Self {
            disk: Arc::clone(&self.disk),
            size: self.size,
        }
    }
}

impl<B: BlockBackend> ReplicaHandle<B> {
    /// Shares `disk`.
    pub fn new(disk: ReplicaDisk<B>) -> Self {
        let size = disk.size();
        Self {
            disk: Arc::new(Mutex::new(disk)),
            size,
        }
    }

    /// The disk, for the operations of the replication (primary writes, checkpoint,
    /// failover, stats).
    pub fn lock(&self) -> Result<MutexGuard<'_, ReplicaDisk<B>>, ReplicaError> {
        self.disk.lock().map_err(|_| ReplicaError::Poisoned)
    }
}

impl<B: BlockBackend + 'static> BlockBackend for ReplicaHandle<B> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Ok(self.lock()?.read(offset, buf)?)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        Ok(self.lock()?.write(offset, buf)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.lock()?.flush()?)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        Ok(self.lock()?.write_zeroes(offset, len, true)?)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        Ok(self.lock()?.write_zeroes(offset, len, false)?)
    }

    fn try_clone(&self) -> Option<Box<dyn BlockBackend>> {
        Some(Box::new(self.clone()))
    }
}
