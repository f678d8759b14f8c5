//! virtio-blk: one request queue; each request is a chain of header (read by the device),
//! data buffer, and status byte (written by the device). Requests are submitted in batches
//! and completed by polling the used ring; callers decide when to sleep (see
//! `commands::disk`). The per-request header and status live in a table indexed by the
//! chain's head descriptor.

use super::{Buf, F_RING_EVENT_IDX, Found, Mmio, Queue, negotiate};
use alloc::alloc::{Layout, alloc_zeroed};

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// Status byte values.
pub const S_OK: u8 = 0;
/// The device reported an I/O error.
pub const S_IOERR: u8 = 1;
/// The device does not support the request.
pub const S_UNSUPP: u8 = 2;
/// Not yet written by the device (we preset it, so a device that "completes" without
/// writing the status is caught).
const S_PENDING: u8 = 0xff;

/// Bytes per sector (virtio-blk addresses in 512-byte units whatever the block size).
pub const SECTOR: u64 = 512;
/// Largest data buffer per request we issue.
pub const MAX_REQUEST: u32 = 1 << 20;

/// What a request does.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Op {
    /// Device → memory.
    Read,
    /// Memory → device.
    Write,
    /// Make completed writes durable.
    Flush,
}

/// A virtio-blk device.
pub struct Blk {
    mmio: Mmio,
    q: Queue,
    /// 32 bytes per descriptor: 16-byte header, then the status byte at +16.
    slots: *mut u8,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// VIRTIO_BLK_F_RO: the device refuses writes.
    pub read_only: bool,
    /// VIRTIO_BLK_F_FLUSH: flushes are needed (and supported).
    pub flush: bool,
    /// Largest request we issue (bounded by size_max/seg_max when offered).
    pub max_request: u32,
    /// Set after a timeout: the device was reset and is not used again.
    pub failed: bool,
    /// MMIO base (for messages).
    pub base: u64,
    /// Notifications sent and interrupts acknowledged.
    pub kicks: u64,
    /// Interrupts that found InterruptStatus set.
    pub irqs: u64,
}

// SAFETY: `slots` is heap memory owned by this device.
unsafe impl Send for Blk {}

impl Blk {
    /// Initialises the device.
    pub fn init(dev: &Found) -> Result<Blk, &'static str> {
        let m = dev.mmio;
        let feat = negotiate(
            &m,
            F_RO | F_FLUSH | F_BLK_SIZE | F_SIZE_MAX | F_SEG_MAX | F_RING_EVENT_IDX,
        )?;
        let q = m.setup_queue(0, 256, feat & F_RING_EVENT_IDX != 0)?;
        let capacity = m.config64(0);
        let mut max_request = MAX_REQUEST;
        if feat & F_SIZE_MAX != 0 {
            let size_max = m.config32(8);
            if size_max >= 4096 {
                // One data descriptor per request, so one segment must hold it all.
                max_request = max_request.min(size_max & !4095);
            }
        }
        let layout = Layout::from_size_align(32 * q.size() as usize, 64).expect("slot layout");
        // SAFETY: non-zero size; kept for the device's life.
        let slots = unsafe { alloc_zeroed(layout) };
        assert!(!slots.is_null(), "out of memory for virtio-blk");
        m.driver_ok();
        Ok(Blk {
            mmio: m,
            q,
            slots,
            capacity,
            read_only: feat & F_RO != 0,
            flush: feat & F_FLUSH != 0,
            max_request,
            failed: false,
            base: dev.loc.base,
            kicks: 0,
            irqs: 0,
        })
    }

    /// Requests the device can still take.
    pub fn room(&self) -> usize {
        self.q.num_free() as usize / 3
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.q.in_flight().div_ceil(3) as usize
    }

    /// Queues a request (not yet visible: `kick`). `buf`/`len` is the data buffer (unused
    /// for Flush); it must stay valid until the request completes. Returns the request's tag.
    pub fn submit(&mut self, op: Op, sector: u64, buf: u64, len: u32) -> Option<u16> {
        let head = self.q.peek_head()?;
        if self.room() == 0 {
            return None;
        }
        // SAFETY: head < queue size, so the 32-byte slot is inside the table.
        let slot = unsafe { self.slots.add(32 * head as usize) };
        let kind = match op {
            Op::Read => T_IN,
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
        };
        // SAFETY: the slot belongs to this head, which the device does not hold now.
        unsafe {
            core::ptr::write_volatile(slot as *mut u32, kind);
            core::ptr::write_volatile(slot.add(4) as *mut u32, 0);
            core::ptr::write_volatile(
                slot.add(8) as *mut u64,
                if op == Op::Flush { 0 } else { sector },
            );
            core::ptr::write_volatile(slot.add(16), S_PENDING);
        }
        let hdr = Buf {
            addr: slot as u64,
            len: 16,
            writable: false,
        };
        let status = Buf {
            addr: slot as u64 + 16,
            len: 1,
            writable: true,
        };
        let got = if op == Op::Flush {
            self.q.add(&[hdr, status])
        } else {
            self.q.add(&[
                hdr,
                Buf {
                    addr: buf,
                    len,
                    writable: op == Op::Read,
                },
                status,
            ])
        };
        debug_assert_eq!(got, Some(head));
        got
    }

    /// Publishes queued requests and notifies the device if it is waiting for them.
    pub fn kick(&mut self) {
        if self.q.needs_kick() {
            self.mmio.notify(0);
            self.kicks += 1;
        }
    }

    /// Takes one completion: (tag, status byte). Used entries with bogus ids are skipped.
    pub fn poll(&mut self) -> Option<(u16, u8)> {
        loop {
            match self.q.pop_used() {
                Ok(Some((head, _))) => {
                    // SAFETY: as in submit; the device is done with this slot.
                    let status = unsafe {
                        core::ptr::read_volatile(self.slots.add(32 * head as usize + 16))
                    };
                    let status = if status == S_PENDING { S_IOERR } else { status };
                    return Some((head, status));
                }
                Ok(None) => return None,
                Err(_) => continue,
            }
        }
    }

    /// Used entries that named no request in flight.
    pub fn bogus(&self) -> u64 {
        self.q.bogus
    }

    /// Acknowledges the interrupt (before polling).
    pub fn ack_irq(&mut self) {
        if self.mmio.ack_irq() != 0 {
            self.irqs += 1;
        }
    }

    /// Asks for an interrupt on the next completion; true if one is already there.
    pub fn enable_irq(&mut self) -> bool {
        self.q.enable_irq()
    }

    /// Gives up on the device after a timeout: reset stops it from touching our buffers.
    pub fn give_up(&mut self) {
        self.mmio.fail();
        self.failed = true;
    }
}
