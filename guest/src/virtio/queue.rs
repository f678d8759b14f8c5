//! A split virtqueue (virtio 1.x, section 2.7) in identity-mapped heap memory, so the
//! addresses the device sees are the pointers we hold.
//!
//! Notification suppression: with `VIRTIO_F_RING_EVENT_IDX` the driver kicks only when the
//! device's `avail_event` says it is waiting (`needs_kick`), and asks for one interrupt at a
//! time by writing `used_event` just before it goes idle (`enable_irq`). Without it, the
//! ring flags are used instead. Every kick and every interrupt is an exit to the VMM.

use alloc::alloc::{Layout, alloc_zeroed};
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, fence};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Buf {
    /// Guest-physical (= virtual) address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (otherwise it only reads it).
    pub writable: bool,
}

/// A used-ring entry that does not name a chain we gave the device.
#[derive(Debug)]
pub struct BogusUsed(pub u32);

/// The driver side of one split virtqueue.
pub struct Queue {
    size: u16,
    desc: *mut u64,
    avail: *mut u16,
    used: *mut u16,
    free_head: u16,
    num_free: u16,
    /// avail.idx as we will publish it.
    avail_idx: u16,
    /// avail.idx when we last decided whether to kick.
    kicked_idx: u16,
    last_used: u16,
    event_idx: bool,
    /// Chain length per head descriptor while the device owns it (0 = free).
    in_flight: Vec<u8>,
    /// Used entries that named no chain in flight.
    pub bogus: u64,
}

// SAFETY: the raw pointers name heap memory that this queue owns for its whole life.
unsafe impl Send for Queue {}

impl Queue {
    /// Allocates a queue of `size` entries (a power of two, at most 32768).
    pub fn new(size: u16, event_idx: bool) -> Queue {
        assert!(size.is_power_of_two() && size <= 32768);
        let n = size as usize;
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n).next_multiple_of(4);
        let total = used_off + 6 + 8 * n;
        let layout = Layout::from_size_align(total, 4096).expect("queue layout");
        // SAFETY: non-zero size; the memory is never freed (queues live as long as the guest).
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null(), "out of memory for a virtqueue");
        let mut q = Queue {
            size,
            desc: base as *mut u64,
            // SAFETY: both offsets are inside the allocation.
            avail: unsafe { base.add(avail_off) } as *mut u16,
            used: unsafe { base.add(used_off) } as *mut u16,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx,
            in_flight: vec![0; n],
            bogus: 0,
        };
        for i in 0..size {
            q.set_next(i, i.wrapping_add(1));
        }
        q
    }

    /// Entries in the ring.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not given to the device.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Physical addresses of the descriptor table, the driver (avail) and device (used) areas.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    fn set_next(&mut self, i: u16, next: u16) {
        // SAFETY: i < size; descriptor i is 16 bytes: addr, len, flags, next (at byte 14).
        unsafe { write_volatile((self.desc as *mut u16).add(8 * i as usize + 7), next) }
    }

    fn next(&self, i: u16) -> u16 {
        // SAFETY: as in set_next.
        unsafe { read_volatile((self.desc as *const u16).add(8 * i as usize + 7)) }
    }

    /// The head descriptor the next `add` will use (to key per-request memory by it).
    pub fn peek_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Puts a chain in the avail ring (not yet visible: see `publish`). Returns its head,
    /// or `None` if there are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.num_free as usize || bufs.len() > 255 {
            return None;
        }
        let head = self.free_head;
        let mut cur = head;
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let next = self.next(cur);
            let flags =
                if last { 0 } else { DESC_F_NEXT } | if b.writable { DESC_F_WRITE } else { 0 };
            // SAFETY: cur < size (it came from the free list).
            unsafe {
                let d = self.desc.add(2 * cur as usize);
                write_volatile(d, b.addr);
                write_volatile(d.add(1) as *mut u32, b.len);
                write_volatile((d.add(1) as *mut u16).add(2), flags);
            }
            if last {
                self.free_head = next;
            } else {
                cur = next;
            }
        }
        self.num_free -= bufs.len() as u16;
        self.in_flight[head as usize] = bufs.len() as u8;
        let slot = (self.avail_idx & (self.size - 1)) as usize;
        // SAFETY: avail ring entry `slot` (after flags and idx).
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Some(head)
    }

    /// Makes every added chain visible to the device.
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        // SAFETY: avail.idx.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
    }

    /// Publishes, then says whether the device asked to be notified about what was added
    /// since the last call.
    pub fn needs_kick(&mut self) -> bool {
        self.publish();
        fence(Ordering::SeqCst); // the idx store must be visible before we read avail_event
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        if old == new {
            return false;
        }
        if self.event_idx {
            // SAFETY: avail_event follows the used ring.
            let event = unsafe { read_volatile(self.used.add(2 + 4 * self.size as usize)) };
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: used.flags.
            unsafe { read_volatile(self.used) & USED_F_NO_NOTIFY == 0 }
        }
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used.idx.
        let idx = unsafe { read_volatile(self.used.add(1)) };
        fence(Ordering::Acquire);
        idx
    }

    /// The device has returned chains we have not popped yet.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next used entry: (head, bytes written). Entries naming a chain that is not
    /// in flight are counted in `bogus` and returned as an error (the ring moves past them).
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, BogusUsed> {
        if self.used_idx() == self.last_used {
            return Ok(None);
        }
        let slot = (self.last_used & (self.size - 1)) as usize;
        // SAFETY: used ring element `slot`: u32 id, u32 len, starting at byte 4.
        let (id, len) = unsafe {
            let e = (self.used as *mut u32).add(1 + 2 * slot);
            (read_volatile(e), read_volatile(e.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        if id >= self.size as u32 || self.in_flight[id as usize] == 0 {
            self.bogus += 1;
            return Err(BogusUsed(id));
        }
        let head = id as u16;
        let n = core::mem::replace(&mut self.in_flight[head as usize], 0);
        let mut tail = head;
        for _ in 1..n {
            tail = self.next(tail);
        }
        self.set_next(tail, self.free_head);
        self.free_head = head;
        self.num_free += n as u16;
        Ok(Some((head, len)))
    }

    /// Asks for an interrupt when the next chain is used. Returns true if one already was
    /// (the caller must poll again instead of sleeping).
    pub fn enable_irq(&mut self) -> bool {
        // SAFETY: avail.flags and used_event (after the avail ring).
        unsafe {
            if self.event_idx {
                write_volatile(self.avail.add(2 + self.size as usize), self.last_used);
            } else {
                write_volatile(self.avail, 0);
            }
        }
        fence(Ordering::SeqCst); // used_event must be visible before we re-read used.idx
        self.has_used()
    }

    /// Asks for no interrupts (advisory for the device).
    pub fn disable_irq(&mut self) {
        // SAFETY: as in enable_irq.
        unsafe {
            if self.event_idx {
                write_volatile(
                    self.avail.add(2 + self.size as usize),
                    self.last_used.wrapping_sub(1),
                );
            }
            write_volatile(self.avail, AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Chains the device still holds.
    pub fn in_flight(&self) -> u16 {
        self.size - self.num_free
    }
}
