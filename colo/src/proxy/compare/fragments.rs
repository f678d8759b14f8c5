//! IP fragment reassembly, on each side on its own: the PVM's fragment frames are held together
//! until their datagram is complete.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::super::packet::{Fragment, MAX_DATAGRAM, MAX_VLAN_TAGS};
use super::ranges::ByteMap;
use super::Held;

/// What identifies the fragments of one datagram (on one side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FragKey {
    pub(super) vlan: [u16; MAX_VLAN_TAGS],
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    /// IPv4's protocol or the IPv6 Fragment header's next header.
    pub(super) protocol: u8,
    pub(super) id: u32,
}

/// One side's datagrams being reassembled.
#[derive(Debug, Default)]
pub(super) struct Reassembly {
    pub(super) partials: HashMap<FragKey, Partial>,
    /// Fragments held in all partials.
    pub(super) count: usize,
}

#[derive(Debug)]
pub(super) struct Partial {
    data: ByteMap,
    /// Length of the datagram's payload, once its last fragment came.
    total: Option<usize>,
    /// The PVM's fragment frames (none on the secondary's side).
    pub(super) held: Option<Held>,
    count: usize,
    since: Instant,
}

pub(super) struct Reassembled {
    pub(super) payload: Vec<u8>,
    pub(super) held: Option<Held>,
}

impl Reassembly {
    /// Adds a fragment; returns the datagram when it is complete.
    pub(super) fn add(
        &mut self,
        key: FragKey,
        frag: Fragment,
        data: &[u8],
        held: Option<Held>,
        now: Instant,
    ) -> Option<Reassembled> {
        let p = self.partials.entry(key).or_insert_with(|| Partial {
            data: ByteMap::default(),
            total: None,
            held: None,
            count: 0,
            since: now,
        });
        p.count += 1;
        self.count += 1;
        match (&mut p.held, held) {
            (Some(all), Some(h)) => all.frames.extend(h.frames),
            (slot @ None, Some(h)) => *slot = Some(h),
            (_, None) => {}
        }
        let end = frag.offset + data.len();
        if !frag.more && p.total.is_none() {
            // The first last-fragment wins, like the data: a conflicting one changes nothing.
            p.total = Some(end);
        }
        // The parser bounds fragment ends by MAX_DATAGRAM, so these conversions are exact.
        let offset = i64::try_from(frag.offset.min(MAX_DATAGRAM)).unwrap_or(0);
        let buf: Arc<[u8]> = Arc::from(data);
        let end = offset + buf.len() as i64;
        p.data.insert(offset, &buf, vec![(offset, end)], now);
        let total = i64::try_from(p.total?).ok()?;
        if !p.data.covers(0, total) {
            return None;
        }
        let p = self.partials.remove(&key)?;
        self.count -= p.count;
        Some(Reassembled {
            payload: p.data.gather(0, total),
            held: p.held,
        })
    }

    pub(super) fn oldest(&self) -> Option<Instant> {
        self.partials.values().map(|p| p.since).min()
    }
}
