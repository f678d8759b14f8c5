//! virtio-net: queue 0 receives, queue 1 transmits. Every buffer is one descriptor of
//! `BUF_SIZE` bytes starting with the 12-byte virtio-net header (VERSION_1 always has
//! `num_buffers`). The receive ring is kept full; transmit buffers are reclaimed lazily and
//! never interrupt unless the ring is full. See `crate::net` for the smoltcp side.

use super::{Buf, F_RING_EVENT_IDX, Found, Mmio, Queue, negotiate};
use alloc::alloc::{Layout, alloc_zeroed};
use alloc::vec;
use alloc::vec::Vec;

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;

/// The virtio-net header (virtio 1.x: always 12 bytes).
pub const HDR: usize = 12;
/// Bytes per buffer: header + a 1514-byte frame, rounded up.
const BUF_SIZE: usize = 2048;
/// Largest Ethernet frame (without FCS) we send or accept.
pub const MAX_FRAME: usize = 1514;

const RX: u16 = 0;
const TX: u16 = 1;

/// A received frame.
pub enum Frame {
    /// Still in receive buffer `buf` (frame at +HDR, `len` bytes); give the buffer back
    /// with `recycle`.
    InPlace { buf: u64, len: usize },
    /// Assembled from several merged buffers (already recycled).
    Owned(Vec<u8>),
}

/// A virtio-net device.
pub struct NetDev {
    mmio: Mmio,
    rxq: Queue,
    txq: Queue,
    /// Buffer address per descriptor head (rx and tx).
    rx_buf: Vec<u64>,
    tx_buf: Vec<u64>,
    /// Free buffers.
    rx_free: Vec<u64>,
    tx_free: Vec<u64>,
    /// MAC address from config space (or a fixed local one if the device has none).
    pub mac: [u8; 6],
    /// VIRTIO_NET_F_MRG_RXBUF negotiated.
    pub mergeable: bool,
    /// Frames received and sent, and frames dropped on receive.
    pub rx_packets: u64,
    /// Frames given to the device.
    pub tx_packets: u64,
    /// Frames dropped (malformed, too long, bogus used entries).
    pub rx_dropped: u64,
    /// Notifications sent.
    pub kicks: u64,
    /// Interrupts that found InterruptStatus set.
    pub irqs: u64,
    /// MMIO base (for messages).
    pub base: u64,
}

// SAFETY: the buffers are heap memory owned by this device.
unsafe impl Send for NetDev {}

fn alloc_pool(n: usize) -> Vec<u64> {
    let layout = Layout::from_size_align(n * BUF_SIZE, 4096).expect("pool layout");
    // SAFETY: non-zero size; kept for the device's life.
    let base = unsafe { alloc_zeroed(layout) } as u64;
    assert!(base != 0, "out of memory for virtio-net buffers");
    (0..n as u64)
        .rev()
        .map(|i| base + i * BUF_SIZE as u64)
        .collect()
}

impl NetDev {
    /// Initialises the device and fills the receive ring.
    pub fn init(dev: &Found) -> Result<NetDev, &'static str> {
        let m = dev.mmio;
        let feat = negotiate(&m, F_MAC | F_MRG_RXBUF | F_RING_EVENT_IDX)?;
        let event_idx = feat & F_RING_EVENT_IDX != 0;
        let rxq = m.setup_queue(RX, 256, event_idx)?;
        let mut txq = m.setup_queue(TX, 256, event_idx)?;
        txq.disable_irq();
        let mac = if feat & F_MAC != 0 {
            core::array::from_fn(|i| m.config8(i))
        } else {
            [0x02, 0, 0, 0, 0, 0x02]
        };
        let (nrx, ntx) = (rxq.size() as usize, txq.size() as usize);
        let mut d = NetDev {
            mmio: m,
            rxq,
            txq,
            rx_buf: vec![0; nrx],
            tx_buf: vec![0; ntx],
            rx_free: alloc_pool(nrx),
            tx_free: alloc_pool(ntx),
            mac,
            mergeable: feat & F_MRG_RXBUF != 0,
            rx_packets: 0,
            tx_packets: 0,
            rx_dropped: 0,
            kicks: 0,
            irqs: 0,
            base: dev.loc.base,
        };
        m.driver_ok();
        d.refill();
        d.rxq.enable_irq();
        d.kick();
        Ok(d)
    }

    /// Gives every free receive buffer to the device (published at the next `kick`).
    pub fn refill(&mut self) {
        while let Some(&buf) = self.rx_free.last() {
            let Some(head) = self.rxq.add(&[Buf {
                addr: buf,
                len: BUF_SIZE as u32,
                writable: true,
            }]) else {
                break;
            };
            self.rx_free.pop();
            self.rx_buf[head as usize] = buf;
        }
    }

    /// Returns a receive buffer after its frame was consumed.
    pub fn recycle(&mut self, buf: u64) {
        self.rx_free.push(buf);
    }

    /// Publishes receive buffers and sent frames; notifies each queue only if the device
    /// is waiting on it.
    pub fn kick(&mut self) {
        self.refill();
        if self.rxq.needs_kick() {
            self.mmio.notify(RX);
            self.kicks += 1;
        }
        if self.txq.needs_kick() {
            self.mmio.notify(TX);
            self.kicks += 1;
        }
    }

    /// Takes the next used receive chain: (buffer, bytes written).
    fn pop_rx(&mut self) -> Option<(u64, usize)> {
        loop {
            match self.rxq.pop_used() {
                Ok(Some((head, len))) => return Some((self.rx_buf[head as usize], len as usize)),
                Ok(None) => return None,
                Err(_) => self.rx_dropped += 1,
            }
        }
    }

    /// The next received frame, if any.
    pub fn receive(&mut self) -> Option<Frame> {
        loop {
            let (buf, len) = self.pop_rx()?;
            // SAFETY: buf is one of our BUF_SIZE buffers and the device is done with it.
            let num_buffers = unsafe { core::ptr::read_volatile((buf + 10) as *const u16) };
            if len <= HDR || len > BUF_SIZE {
                self.recycle(buf);
                self.rx_dropped += 1;
                continue;
            }
            if !self.mergeable || num_buffers <= 1 {
                self.rx_packets += 1;
                return Some(Frame::InPlace {
                    buf,
                    len: len - HDR,
                });
            }
            // Merged: the frame continues in the next num_buffers - 1 used buffers.
            let mut frame = Vec::with_capacity(MAX_FRAME);
            // SAFETY: as above; len <= BUF_SIZE.
            frame.extend_from_slice(unsafe {
                core::slice::from_raw_parts((buf + HDR as u64) as *const u8, len - HDR)
            });
            self.recycle(buf);
            let mut ok = true;
            for _ in 1..num_buffers {
                match self.pop_rx() {
                    Some((b, l)) => {
                        let l = l.min(BUF_SIZE);
                        // SAFETY: as above.
                        frame.extend_from_slice(unsafe {
                            core::slice::from_raw_parts(b as *const u8, l)
                        });
                        self.recycle(b);
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok && frame.len() <= MAX_FRAME + 4 {
                self.rx_packets += 1;
                return Some(Frame::Owned(frame));
            }
            self.rx_dropped += 1;
        }
    }

    /// Frames waiting in the used ring.
    pub fn rx_ready(&self) -> bool {
        self.rxq.has_used()
    }

    /// Takes back transmit buffers the device is done with.
    pub fn reclaim_tx(&mut self) {
        loop {
            match self.txq.pop_used() {
                Ok(Some((head, _))) => self.tx_free.push(self.tx_buf[head as usize]),
                Ok(None) => return,
                Err(_) => {}
            }
        }
    }

    /// A transmit buffer is free (reclaiming first if needed).
    pub fn can_send(&mut self) -> bool {
        if self.tx_free.is_empty() || self.txq.num_free() == 0 {
            self.reclaim_tx();
        }
        !self.tx_free.is_empty() && self.txq.num_free() > 0
    }

    /// Builds a frame of `len` bytes with `fill` and queues it (published right away, kicked
    /// at the next `kick`). The caller checked `can_send`.
    pub fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let len = len.min(MAX_FRAME);
        let buf = self.tx_free.pop().expect("can_send was checked");
        // SAFETY: buf is a free BUF_SIZE buffer the device does not hold.
        let bytes = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, HDR + len) };
        bytes[..HDR].fill(0);
        let r = fill(&mut bytes[HDR..]);
        let head = self
            .txq
            .add(&[Buf {
                addr: buf,
                len: (HDR + len) as u32,
                writable: false,
            }])
            .expect("checked");
        self.tx_buf[head as usize] = buf;
        self.txq.publish();
        self.tx_packets += 1;
        r
    }

    /// Acknowledges the interrupt (before polling the rings).
    pub fn ack_irq(&mut self) {
        if self.mmio.ack_irq() != 0 {
            self.irqs += 1;
        }
    }

    /// Used entries that named no buffer in flight (both queues).
    pub fn bogus(&self) -> u64 {
        self.rxq.bogus + self.txq.bogus
    }

    /// Before sleeping: asks for an interrupt on the next received frame, and on the next
    /// transmit completion only if the transmit ring is full. True if something already
    /// arrived (poll again instead of sleeping).
    pub fn enable_irq(&mut self) -> bool {
        self.reclaim_tx();
        let rx = self.rxq.enable_irq();
        if self.tx_full() {
            // Received frames cannot be answered until a transmit buffer comes back.
            self.txq.enable_irq()
        } else {
            self.txq.disable_irq();
            rx
        }
    }

    /// Transmit ring full (the caller should wait for its interrupt).
    pub fn tx_full(&self) -> bool {
        self.tx_free.is_empty() || self.txq.num_free() == 0
    }
}
