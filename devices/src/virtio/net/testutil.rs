//! Test-only driver side of a virtqueue, over `virtio_queue::mock::MockSplitQueue`.
//!
//! The mock lays its used ring out at `avail + 4 + len` bytes, on top of the second half of the
//! avail ring and of `used_event`; the driver here moves the used ring to its own page so rings
//! of 256 entries and EVENT_IDX behave as they do with a real driver.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::GuestMemory;

/// Device-writable descriptor flag.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Chained descriptor flag.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// Guest memory for tests: 8 MiB from 0.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
}

/// A non-blocking datagram socketpair: the worker's end and the "network" end.
pub fn fake_tap() -> (Arc<UnixDatagram>, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (Arc::new(a), b)
}

/// The guest driver's view of one queue.
pub struct Driver<'a> {
    mem: &'a GuestMemory,
    vq: MockSplitQueue<'a, GuestMemory>,
    len: u16,
    used: GuestAddress,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    /// A queue of `len` entries: descriptors and avail ring at `base`, used ring at `base + 64K`.
    pub fn new(mem: &'a GuestMemory, base: u64, len: u16) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), len);
        let used = GuestAddress(base + 0x10000);
        mem.write_slice(&[0u8; 8], used).unwrap();
        Self {
            mem,
            vq,
            len,
            used,
            next_desc: 0,
        }
    }

    /// The device's queue, ready, with EVENT_IDX as asked.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_event_idx(event_idx);
        q
    }

    /// Publishes a chain of `(addr, len, flags)` descriptors (NEXT links added); returns its head.
    pub fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last { flags & !NEXT } else { flags | NEXT };
                let next = (head + i as u16 + 1) % self.len;
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.add_raw(&raw)
    }

    /// Publishes descriptors exactly as given (for malformed chains); returns the head.
    pub fn add_raw(&mut self, raw: &[RawDescriptor]) -> u16 {
        let head = self.next_desc;
        self.vq.add_desc_chains(raw, head).unwrap();
        self.next_desc = (head + raw.len() as u16) % self.len;
        head
    }

    /// Index of the next descriptor `add` will use.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    /// Where the used ring's idx lives in guest memory.
    pub fn used_idx_addr(&self) -> GuestAddress {
        self.used.unchecked_add(2)
    }

    /// The used ring's idx.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Used element `i`: (descriptor head, length written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.len));
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (id, len)
    }

    /// Sets used_event (EVENT_IDX): interrupt the driver once the used idx passes `v`.
    pub fn set_used_event(&self, v: u16) {
        let at = self
            .vq
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(self.len));
        self.mem.write_obj(v, at).unwrap();
    }

    /// avail_event (EVENT_IDX): the driver notifies once its avail idx passes it.
    pub fn avail_event(&self) -> u16 {
        let at = self.used.unchecked_add(4 + 8 * u64::from(self.len));
        self.mem.read_obj(at).unwrap()
    }

    /// The used ring flags (VRING_USED_F_NO_NOTIFY without EVENT_IDX).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used).unwrap()
    }
}
