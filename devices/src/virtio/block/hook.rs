//! The block-write path: every disk's backend sits behind a [`WriteSlot`], into which a
//! replication (COLO's primary mirror) puts a [`WriteHook`] while the device runs. The hook
//! sees each write after the local image took it, in the order the image took them.
//!
//! An empty slot keeps the backend's own data path (`pwritev` straight from guest memory);
//! a filled one snapshots the guest's buffers once, so the hook sees exactly the bytes the
//! image got. Requests that a worker's helper threads serve in parallel are serialized while
//! a hook is in: the slot's lock is held from the local write to the hook's return, so the
//! hook's order is the image's order (two overlapping writes in flight at once would
//! otherwise land in one order here and in another on the replica).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::backend::{gather, BlockBackend, GuestSlice};

/// A write the local image took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOp<'a> {
    /// Bytes at an offset.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// A range that now reads back as zeroes (write-zeroes and discard alike).
    Zeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Sees every write of a disk after its image took it.
pub trait WriteHook: Send + Sync {
    /// `op` is in the local image. Runs on the device's thread, under the slot's lock.
    fn written(&self, op: WriteOp<'_>);
    /// The guest is about to learn that the writes seen so far completed (outside the slot's
    /// lock): the place to wait for whatever must hold them first.
    fn settle(&self) {}
}

/// The slot was taken when a hook was put in.
#[derive(Debug, thiserror::Error)]
#[error("the disk's write slot already has a hook")]
pub struct SlotTaken;

/// Where a disk's [`WriteHook`] goes; clones share the slot.
#[derive(Clone, Default)]
pub struct WriteSlot {
    hook: Arc<Mutex<Option<Arc<dyn WriteHook>>>>,
}

impl WriteSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<dyn WriteHook>>> {
        // The guarded value is a plain `Option`: a panic cannot leave it half-changed.
        self.hook.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `hook` in: every write from the next one on reaches it.
    pub fn install(&self, hook: Arc<dyn WriteHook>) -> Result<(), SlotTaken> {
        let mut slot = self.lock();
        if slot.is_some() {
            return Err(SlotTaken);
        }
        *slot = Some(hook);
        Ok(())
    }

    /// Takes the hook out (after the write in progress, if any).
    pub fn remove(&self) -> Option<Arc<dyn WriteHook>> {
        self.lock().take()
    }

    /// Whether a hook is in.
    pub fn is_filled(&self) -> bool {
        self.lock().is_some()
    }

    /// The hook, if one is in.
    fn hook(&self) -> Option<Arc<dyn WriteHook>> {
        self.lock().clone()
    }

    /// Runs `f` with no write of this disk in progress and none starting until it returns:
    /// a reader of the image that must see writes and the hook's stream in the same order
    /// (the initial sync reading a region and sending it) runs here.
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _held = self.lock();
        f()
    }
}

impl std::fmt::Debug for WriteSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteSlot")
            .field("filled", &self.is_filled())
            .finish()
    }
}

/// A backend behind a [`WriteSlot`].
pub struct Hooked {
    inner: Box<dyn BlockBackend>,
    slot: WriteSlot,
}

impl Hooked {
    /// `inner`, its writes passed to whatever hook `slot` holds.
    pub fn new(inner: Box<dyn BlockBackend>, slot: WriteSlot) -> Self {
        Hooked { inner, slot }
    }

    /// Does `write` on the image, then tells the hook (if any) what `op` it was, all under
    /// the slot's lock.
    fn hooked(
        &mut self,
        op: WriteOp<'_>,
        write: impl FnOnce(&mut dyn BlockBackend) -> io::Result<()>,
    ) -> io::Result<()> {
        let slot = self.slot.lock();
        // Local first: a write the image refused is not this disk's content, so no replica
        // may get it either.
        write(self.inner.as_mut())?;
        if let Some(hook) = slot.as_ref() {
            hook.written(op);
        }
        Ok(())
    }
}

impl BlockBackend for Hooked {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.hooked(WriteOp::Write { offset, data: buf }, |b| {
            b.write_at(offset, buf)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        // A replica needs no durability of its own: COLO's secondary only ever uses its copy
        // from the last checkpoint, which it holds whole.
        self.inner.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // A raw image reads a discarded range back as zeroes; a replica must too.
        self.hooked(WriteOp::Zeroes { offset, len }, |b| b.discard(offset, len))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.hooked(WriteOp::Zeroes { offset, len }, |b| {
            b.write_zeroes(offset, len)
        })
    }

    fn read_to_guest(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.inner.read_to_guest(offset, bufs)
    }

    fn try_clone(&self) -> Option<Box<dyn BlockBackend>> {
        let inner = self.inner.try_clone()?;
        Some(Box::new(Hooked::new(inner, self.slot.clone())))
    }

    fn needs_settle(&self) -> bool {
        self.slot.is_filled() || self.inner.needs_settle()
    }

    fn settle(&mut self) {
        self.inner.settle();
        // Not under the slot's lock: the wait must not hold up a reader of the image.
        if let Some(hook) = self.slot.hook() {
            hook.settle();
        }
    }

    fn write_from_guest(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        if !self.slot.is_filled() {
            return self.inner.write_from_guest(offset, bufs);
        }
        // Snapshotted once: the guest may change its buffer while the hook runs.
        let mut data = Vec::new();
        gather(bufs, &mut data);
        let slot = self.slot.lock();
        self.inner.write_at(offset, &data)?;
        if let Some(hook) = slot.as_ref() {
            hook.written(WriteOp::Write {
                offset,
                data: &data,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);

    impl BlockBackend for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            let o = offset as usize;
            if o + buf.len() > self.0.len() {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            self.0[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.write_zeroes(offset, len)
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.write_at(offset, &vec![0; len as usize])
        }
    }

    #[derive(Default)]
    struct Log(
        Mutex<Vec<(u64, Vec<u8>, u64)>>,
        std::sync::atomic::AtomicU64,
    );

    impl WriteHook for Log {
        fn written(&self, op: WriteOp<'_>) {
            let e = match op {
                WriteOp::Write { offset, data } => (offset, data.to_vec(), 0),
                WriteOp::Zeroes { offset, len } => (offset, Vec::new(), len),
            };
            self.0.lock().unwrap().push(e);
        }

        fn settle(&self) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_hook_sees_the_writes_the_image_took_while_it_is_in() {
        let slot = WriteSlot::new();
        let mut disk = Hooked::new(Box::new(Mem(vec![0; 4096])), slot.clone());
        disk.write_at(0, b"before").unwrap();
        let log = Arc::new(Log::default());
        assert!(!disk.needs_settle(), "an empty slot completes at once");
        slot.install(log.clone()).unwrap();
        assert!(disk.needs_settle());
        assert!(slot.install(log.clone()).is_err(), "one hook per slot");
        disk.write_at(512, b"during").unwrap();
        disk.write_zeroes(1024, 100).unwrap();
        disk.discard(2048, 512).unwrap();
        // Refused by the image: not the disk's content, so not the hook's either.
        assert!(disk.write_at(4090, b"too long").is_err());
        // A helper's handle shares the slot.
        let mut helper = disk.try_clone();
        assert!(helper.is_none(), "Mem has no second handle");
        helper.take();
        disk.settle();
        assert_eq!(log.1.load(std::sync::atomic::Ordering::SeqCst), 1);
        slot.remove();
        disk.write_at(0, b"after").unwrap();
        let seen = log.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                (512, b"during".to_vec(), 0),
                (1024, Vec::new(), 100),
                (2048, Vec::new(), 512)
            ]
        );
        let mut buf = [0u8; 6];
        disk.read_at(512, &mut buf).unwrap();
        assert_eq!(&buf, b"during");
    }
}
