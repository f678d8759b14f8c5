//! Copying a received frame into the guest's rx buffers: one chain, or several with MRG_RXBUF.
//!
//! With MRG_RXBUF a frame may need several chains and the guest may not have posted them all yet.
//! Chains popped for a frame stay reserved across attempts (rather than being pushed back) so
//! that, with EVENT_IDX, `avail_event` points past them and the guest's next refill notifies us.
//! They are a contiguous, untouched run of the avail ring starting at `start`, which is what lets
//! [`RxRing::rewind`] give them back when the worker stops.

use virtio_bindings::virtio_net as vn;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::device::{net_features as nf, NetCounters};
use super::tap::VNET_HDR_LEN;
use super::worker::{pop, RateLimited};
use crate::GuestMemory;

/// Why an rx descriptor chain was refused (it goes back to the driver empty).
#[derive(Debug, thiserror::Error)]
pub enum RxChainError {
    /// Rx buffers are for the device to write.
    #[error("device-readable descriptor in an rx chain")]
    Readable,
    /// A buffer is not guest RAM.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The chain iterator stopped on a loop, a bad link or a bad indirect table.
    #[error("chain does not end (loop, bad next index or bad indirect table)")]
    Unterminated,
    /// No writable byte in the chain.
    #[error("no writable room")]
    Empty,
    /// The first buffer of a frame must hold the whole vnet header (virtio 1.2 §5.1.6.3.1).
    #[error("first buffer smaller than a vnet header")]
    NoRoomForHeader,
}

/// What became of a frame offered to the guest.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    /// In the guest's buffers and on the used ring.
    Delivered,
    /// Not enough rx buffers yet; keep the frame.
    NoRoom,
    /// The frame can never be delivered (does not fit, offloads not negotiated, bad buffers).
    Dropped,
    /// The avail ring itself is unreadable; wait for the driver to do something.
    QueueBroken,
}

/// The receive queue, the negotiated rx features and the buffers reserved for the current frame.
pub(super) struct RxRing {
    pub queue: Queue,
    features: u64,
    start: u16,
    chains: Vec<(u16, u32)>,
    segs: Vec<(GuestAddress, u32)>,
    capacity: usize,
    /// Used entries were added since the last interrupt decision.
    pub used: bool,
    /// Guest notifications are on (we are waiting for buffers).
    pub notify_on: bool,
}

impl RxRing {
    /// The ring for `queue` with the driver's `acked` features.
    pub fn new(queue: Queue, acked: u64) -> Self {
        Self {
            queue,
            features: acked,
            start: 0,
            chains: Vec::with_capacity(64),
            segs: Vec::with_capacity(64),
            capacity: 0,
            used: false,
            notify_on: true,
        }
    }

    fn clear(&mut self) {
        self.chains.clear();
        self.segs.clear();
        self.capacity = 0;
    }

    /// Puts the reserved chains back in the avail ring, untouched.
    pub fn rewind(&mut self) {
        if !self.chains.is_empty() {
            self.queue.set_next_avail(self.start);
        }
        self.clear();
    }

    fn give_back(&mut self, mem: &GuestMemory, head: u16, len: u32, warn: &mut RateLimited) {
        if let Err(e) = self.queue.add_used(mem, head, len) {
            warn.warn(|| format!("net: cannot return rx buffer {head}: {e}"));
        }
        self.used = true;
    }

    /// Returns every reserved chain empty (the driver discards zero-length buffers).
    fn give_back_all_empty(&mut self, mem: &GuestMemory, warn: &mut RateLimited) {
        let chains = std::mem::take(&mut self.chains);
        for &(head, _) in &chains {
            self.give_back(mem, head, 0, warn);
        }
        self.chains = chains;
        self.clear();
    }

    /// Why a guest with our negotiated features cannot take a frame with header `hdr`. A tap
    /// can still hold frames built for an earlier driver's offloads, and injected frames come
    /// from elsewhere: neither may hand the guest something it did not agree to.
    fn refuse_offload(&self, hdr: &[u8]) -> Option<&'static str> {
        let flags = u32::from(hdr.first().copied().unwrap_or(0));
        let gso = u32::from(hdr.get(1).copied().unwrap_or(0));
        if flags & vn::VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && self.features & nf::GUEST_CSUM == 0 {
            return Some("partial checksum without GUEST_CSUM");
        }
        let needed = match gso {
            vn::VIRTIO_NET_HDR_GSO_NONE => return None,
            vn::VIRTIO_NET_HDR_GSO_TCPV4 => nf::GUEST_TSO4,
            vn::VIRTIO_NET_HDR_GSO_TCPV6 => nf::GUEST_TSO6,
            vn::VIRTIO_NET_HDR_GSO_UDP => nf::GUEST_UFO,
            // ECN-marked or USO GSO: never offered.
            _ => return Some("GSO type never offered"),
        };
        (self.features & needed == 0).then_some("GSO type not negotiated")
    }

    /// Copies `frame` (vnet header + Ethernet frame) into the guest's rx buffers.
    pub fn deliver(
        &mut self,
        mem: &GuestMemory,
        frame: &[u8],
        warn: &mut RateLimited,
        counters: &NetCounters,
    ) -> Delivery {
        let Some((hdr_in, body)) = frame.split_at_checked(VNET_HDR_LEN) else {
            return Delivery::Dropped;
        };
        if let Some(why) = self.refuse_offload(hdr_in) {
            warn.warn(|| format!("net: dropped a frame for the guest: {why}"));
            return Delivery::Dropped;
        }
        let max_chains = if self.features & nf::MRG_RXBUF != 0 {
            usize::from(self.queue.size())
        } else {
            1
        };
        while self.capacity < frame.len() {
            if self.chains.len() >= max_chains {
                warn.warn(|| {
                    format!(
                        "net: dropped a {}-byte frame: the guest's rx buffers cannot hold it",
                        frame.len()
                    )
                });
                self.rewind();
                return Delivery::Dropped;
            }
            if self.chains.is_empty() {
                self.start = self.queue.next_avail();
            }
            let chain = match pop(&mut self.queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => return Delivery::NoRoom,
                Err(e) => {
                    warn.warn(|| format!("net: rx queue unusable: {e}"));
                    return Delivery::QueueBroken;
                }
            };
            let head = chain.head_index();
            let mark = self.segs.len();
            let need = frame.len() - self.capacity;
            let collected = collect_writable(mem, chain, &mut self.segs, need).and_then(|got| {
                if self.chains.is_empty() && got < VNET_HDR_LEN {
                    return Err(RxChainError::NoRoomForHeader);
                }
                Ok(got)
            });
            match collected {
                Ok(got) => {
                    self.chains.push((head, got as u32));
                    self.capacity += got;
                }
                Err(e) => {
                    self.segs.truncate(mark);
                    NetCounters::add(&counters.rx_bad_chains, 1);
                    warn.warn(|| format!("net: rx chain {head} handed back empty: {e}"));
                    self.give_back(mem, head, 0, warn);
                    if !self.chains.is_empty() {
                        // Reserved chains cannot be rewound past one already returned: return
                        // them empty as well, and drop the frame.
                        self.give_back_all_empty(mem, warn);
                        return Delivery::Dropped;
                    }
                }
            }
        }

        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr.copy_from_slice(hdr_in);
        if self.features & nf::GUEST_CSUM == 0 {
            // Without GUEST_CSUM the device must not set header flags such as DATA_VALID
            // (virtio 1.2 §5.1.6.4.1).
            hdr[0] = 0;
        }
        let num_buffers = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        if let Err(e) = write_segments(mem, &self.segs, &hdr, body) {
            // Only possible if guest memory shrank under us; the driver gets what was copied.
            warn.warn(|| format!("net: writing a frame into guest memory failed: {e}"));
        }
        let chains = std::mem::take(&mut self.chains);
        for &(head, len) in &chains {
            self.give_back(mem, head, len, warn);
        }
        self.chains = chains;
        self.clear();
        Delivery::Delivered
    }
}

/// Appends the writable buffers of an rx chain, up to `need` bytes, to `segs`; returns the room.
fn collect_writable(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    segs: &mut Vec<(GuestAddress, u32)>,
    need: usize,
) -> Result<usize, RxChainError> {
    let mut got = 0usize;
    let mut open = false;
    for desc in chain {
        open = desc.has_next();
        if !desc.is_write_only() {
            return Err(RxChainError::Readable);
        }
        let take = (desc.len() as usize).min(need - got);
        if take > 0 {
            if !GuestMemoryBackend::check_range(mem, desc.addr(), take) {
                return Err(RxChainError::OutsideMemory {
                    addr: desc.addr().0,
                    len: take as u64,
                });
            }
            segs.push((desc.addr(), take as u32));
            got += take;
        }
        if got == need {
            // The rest of the chain is not needed for this frame, so it is not looked at.
            return Ok(got);
        }
    }
    // The chain iterator stops silently on a loop or a bad link; a last descriptor that still
    // says NEXT is how that shows.
    if open {
        return Err(RxChainError::Unterminated);
    }
    if got == 0 {
        return Err(RxChainError::Empty);
    }
    Ok(got)
}

/// Writes `hdr` then `body` across `segs` (whose total length is exactly theirs).
fn write_segments(
    mem: &GuestMemory,
    segs: &[(GuestAddress, u32)],
    hdr: &[u8],
    body: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut sources = [hdr, body].into_iter();
    let mut cur: &[u8] = &[];
    for &(addr, len) in segs {
        let mut addr = addr;
        let mut left = len as usize;
        while left > 0 {
            if cur.is_empty() {
                match sources.next() {
                    Some(next) => cur = next,
                    None => return Ok(()),
                }
                continue;
            }
            let n = left.min(cur.len());
            let (now, rest) = cur.split_at(n);
            // write_slice goes through the dirty bitmap, so migration and COLO see rx data.
            mem.write_slice(now, addr)?;
            cur = rest;
            left -= n;
            addr = GuestAddress(addr.0 + n as u64); // inside a range check_range accepted
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::testutil::{memory, Driver, W};

    fn ring(mem: &GuestMemory, acked: u64) -> (Driver<'_>, RxRing) {
        let d = Driver::new(mem, 0, 16);
        let q = d.queue(false);
        (d, RxRing::new(q, acked))
    }

    fn hdr(flags: u8, gso: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0] = flags;
        f[1] = gso;
        f
    }

    #[test]
    fn offloads_the_guest_did_not_negotiate_are_dropped() {
        let mem = memory();
        let counters = NetCounters::default();
        let mut warn = RateLimited::default();
        let (mut d, mut r) = ring(&mem, nf::GUEST_CSUM | nf::GUEST_TSO4);
        d.add(&[(0x100000, 4096, W)]);
        let tcp4 = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        let tcp6 = vn::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
        let ecn = vn::VIRTIO_NET_HDR_GSO_ECN as u8;
        for refused in [hdr(1, tcp6), hdr(1, tcp4 | ecn), hdr(0, 5)] {
            assert_eq!(
                r.deliver(&mem, &refused, &mut warn, &counters),
                Delivery::Dropped
            );
        }
        assert_eq!(
            r.deliver(&mem, &hdr(1, tcp4), &mut warn, &counters),
            Delivery::Delivered
        );

        let (mut d, mut r) = ring(&mem, 0);
        d.add(&[(0x100000, 4096, W)]);
        assert_eq!(
            r.deliver(&mem, &hdr(1, 0), &mut warn, &counters),
            Delivery::Dropped,
            "partial checksum for a guest without GUEST_CSUM"
        );
        assert_eq!(d.used_idx(), 0, "the buffer stays with us");
    }

    #[test]
    fn segments_are_filled_in_order_across_header_and_body() {
        let mem = memory();
        let segs = [
            (GuestAddress(0x100000), 5),
            (GuestAddress(0x200000), 10),
            (GuestAddress(0x300000), 5),
        ];
        let hdr: Vec<u8> = (0..12).collect();
        let body: Vec<u8> = (12..20).collect();
        write_segments(&mem, &segs, &hdr, &body).unwrap();
        let mut got = Vec::new();
        for (addr, len) in segs {
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, addr).unwrap();
            got.extend(b);
        }
        assert_eq!(got, (0..20).collect::<Vec<u8>>());
    }
}
