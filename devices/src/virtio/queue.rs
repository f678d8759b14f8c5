//! A serializable mirror of a virtqueue's state (virtio-queue's `QueueState` has no serde).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

/// Everything needed to rebuild a queue exactly where it was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// Set by the driver when configuration is done.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether EVENT_IDX suppression is on.
    pub event_idx: bool,
}

impl QueueSnapshot {
    /// Captures `q`.
    pub fn of(q: &Queue) -> Self {
        Self {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    /// Rebuilds the queue; fails (changing nothing) on values a queue cannot hold.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.max_size)?;
        if self.size != 0 {
            q.try_set_size(self.size)?;
        }
        q.try_set_desc_table_address(GuestAddress(self.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))?;
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        q.set_ready(self.ready);
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(128);
        q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
        q.set_next_avail(17);
        q.set_next_used(15);
        q.set_event_idx(true);
        q.set_ready(true);
        let snap = QueueSnapshot::of(&q);
        let json = serde_json::to_string(&snap).unwrap();
        let back: QueueSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(QueueSnapshot::of(&back.to_queue().unwrap()), snap);
    }

    #[test]
    fn refuses_impossible_values() {
        let snap = QueueSnapshot {
            max_size: 256,
            size: 100, // not a power of two
            ..Default::default()
        };
        assert!(snap.to_queue().is_err());
        let snap = QueueSnapshot {
            max_size: 256,
            size: 64,
            desc_table: 0x1001, // misaligned
            ..Default::default()
        };
        assert!(snap.to_queue().is_err());
    }
}
