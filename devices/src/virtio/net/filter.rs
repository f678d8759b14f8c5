//! The packet-filter chain every frame between the guest and the tap crosses.
//!
//! This is where COLO plugs in its mirror, compare and TCP rewriter. The model is a pipeline:
//! the filters stand in a row between the guest (first filter) and the tap (last filter), so a
//! Tx frame (guest → tap) visits them first to last and an Rx frame (tap → guest) last to first.
//! Each filter therefore has the same neighbours in both directions, which is what lets a filter
//! pair up the two halves of a connection (the rewriter) wherever it is placed.
//!
//! A filter may modify a packet in place, copy it elsewhere (mirror), drop it, or hold it (take
//! it and decide later, e.g. compare keeping a primary packet until the secondary's matches).
//! Packets it releases later go through an [`Injector`]: **injected packets enter after the
//! filter chain** — an injected Tx packet goes straight to the tap and an injected Rx packet
//! straight to the guest, without visiting any filter (including the one that injected it).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;

/// How many injected packets per direction may wait for the worker before `inject` says Full.
pub const INJECT_QUEUE_LEN: usize = 1024;

/// Errors of the filter module.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A packet must at least hold the vnet header.
    #[error("a packet of {0} bytes is shorter than the {VNET_HDR_LEN}-byte vnet header")]
    TooShort(usize),
    /// The injection wake-up eventfd could not be created.
    #[error("cannot create the injection eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Errors injecting a packet; the packet is handed back so the caller can retry or account for it.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The worker has not caught up with earlier injections (or the device is stalled).
    #[error("the {0:?} injection queue is full")]
    Full(Direction, Packet),
    /// The device (and its filter chain) is gone.
    #[error("the device behind this injector is gone")]
    Closed(Direction, Packet),
}

/// Which way a frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the tap to the guest.
    Rx,
    /// From the guest to the tap.
    Tx,
}

/// What a filter decided about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the next filter (or deliver it, after the last).
    Pass,
    /// Discard it; later filters do not see it.
    Drop,
    /// The filter kept it (usually with [`Packet::take`]); later filters do not see it.
    Hold,
}

/// One frame as it crosses the chain: the 12-byte vnet header, then the Ethernet frame.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Packet {
    bytes: Vec<u8>,
}

impl Packet {
    /// A packet from its wire form (vnet header + frame).
    pub fn new(bytes: Vec<u8>) -> Result<Self, FilterError> {
        if bytes.len() < VNET_HDR_LEN {
            return Err(FilterError::TooShort(bytes.len()));
        }
        Ok(Self { bytes })
    }

    /// A packet carrying `frame` behind an all-zero vnet header (fully checksummed, no GSO).
    pub fn from_frame(frame: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(VNET_HDR_LEN + frame.len());
        bytes.resize(VNET_HDR_LEN, 0);
        bytes.extend_from_slice(frame);
        Self { bytes }
    }

    /// The whole packet, header included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The vnet header (shorter only if a filter truncated the packet).
    pub fn vnet_header(&self) -> &[u8] {
        &self.bytes[..self.bytes.len().min(VNET_HDR_LEN)]
    }

    /// The vnet header, for a filter that changes offload information.
    pub fn vnet_header_mut(&mut self) -> &mut [u8] {
        let end = self.bytes.len().min(VNET_HDR_LEN);
        &mut self.bytes[..end]
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> &[u8] {
        self.bytes.get(VNET_HDR_LEN..).unwrap_or(&[])
    }

    /// The Ethernet frame, for in-place rewriting.
    pub fn frame_mut(&mut self) -> &mut [u8] {
        self.bytes.get_mut(VNET_HDR_LEN..).unwrap_or(&mut [])
    }

    /// The underlying buffer, for filters that change the length; a packet left shorter than
    /// the vnet header is dropped.
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// The wire form.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Moves the packet out, leaving an empty one: how a filter holds a packet without copying.
    pub fn take(&mut self) -> Packet {
        std::mem::take(self)
    }

    /// Length of the wire form.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the packet is empty (taken).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl fmt::Debug for Packet {
    // Frames can be 64 KiB: log their size, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Packet({} bytes)", self.bytes.len())
    }
}

/// A stage of the chain. Runs on the device's worker thread, so it must not block for long:
/// every frame of the device waits behind it.
pub trait PacketFilter: Send {
    /// A short name for logs and the API.
    fn name(&self) -> &str;
    /// Looks at (and maybe changes, keeps or drops) one packet travelling in `dir`. `inject`
    /// can be cloned to release packets later from any thread.
    fn process(&mut self, dir: Direction, pkt: &mut Packet, inject: &Injector) -> Verdict;
}

/// A cloneable, thread-safe handle that puts packets on the wire past the filter chain.
#[derive(Clone)]
pub struct Injector {
    rx: SyncSender<Packet>,
    tx: SyncSender<Packet>,
    wake: Arc<EventFd>,
}

impl Injector {
    /// Queues `pkt` for delivery in `dir` (Rx: to the guest, Tx: to the tap) without blocking.
    pub fn inject(&self, dir: Direction, pkt: Packet) -> Result<(), InjectError> {
        let queue = match dir {
            Direction::Rx => &self.rx,
            Direction::Tx => &self.tx,
        };
        queue.try_send(pkt).map_err(|e| match e {
            TrySendError::Full(p) => InjectError::Full(dir, p),
            TrySendError::Disconnected(p) => InjectError::Closed(dir, p),
        })?;
        // Queue first, wake second: a worker that drains after reading the eventfd cannot miss it.
        if let Err(e) = self.wake.write(1) {
            log::warn!("net: cannot wake the worker for an injected packet: {e}");
        }
        Ok(())
    }
}

impl fmt::Debug for Injector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Injector")
    }
}

/// A filter may already be in the slot.
#[derive(Debug, thiserror::Error)]
#[error("the filter slot already holds {0:?}")]
pub struct SlotTaken(pub String);

struct SlotInner {
    /// Whether `filter` holds one: read per packet without the lock, so an empty slot keeps the
    /// chain's zero-copy fast path.
    armed: AtomicBool,
    filter: Mutex<Option<Box<dyn PacketFilter>>>,
}

/// The receiving ends of a chain's injection queues (the worker's, and the slot's to discard).
struct Injected {
    rx: Mutex<Receiver<Packet>>,
    tx: Mutex<Receiver<Packet>>,
}

impl Injected {
    fn queue(&self, dir: Direction) -> std::sync::MutexGuard<'_, Receiver<Packet>> {
        match dir {
            Direction::Rx => &self.rx,
            Direction::Tx => &self.tx,
        }
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The place on the tap side of a chain where a filter can be put, and taken out again, while
/// the device runs: how COLO's proxy joins a NIC that was built (and booted) unprotected.
#[derive(Clone)]
pub struct FilterSlot {
    inner: Arc<SlotInner>,
    injector: Injector,
    injected: Arc<Injected>,
}

impl FilterSlot {
    /// Puts `filter` into the slot; the next packet in either direction visits it.
    pub fn install(&self, filter: Box<dyn PacketFilter>) -> Result<(), SlotTaken> {
        let mut slot = self
            .inner
            .filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = slot.as_ref() {
            return Err(SlotTaken(f.name().to_string()));
        }
        *slot = Some(filter);
        self.inner.armed.store(true, Ordering::Release);
        Ok(())
    }

    /// Takes the filter out (waiting for a packet it is processing); packets pass it from now on.
    pub fn remove(&self) -> Option<Box<dyn PacketFilter>> {
        let mut slot = self
            .inner
            .filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.armed.store(false, Ordering::Release);
        slot.take()
    }

    /// Whether a filter is in the slot.
    pub fn is_armed(&self) -> bool {
        self.inner.armed.load(Ordering::Acquire)
    }

    /// The device's injector (packets past the whole chain).
    pub fn injector(&self) -> Injector {
        self.injector.clone()
    }

    /// Drops the packets injected in `dir` that the device has not taken yet (a COLO
    /// secondary's mirrored frames that the checkpoint being loaded already accounts for);
    /// returns how many.
    pub fn discard_injected(&self, dir: Direction) -> usize {
        let queue = self.injected.queue(dir);
        std::iter::from_fn(|| queue.try_recv().ok()).count()
    }

    fn process(&self, dir: Direction, pkt: &mut Packet) -> Verdict {
        if !self.is_armed() {
            return Verdict::Pass;
        }
        let mut slot = self
            .inner
            .filter
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match slot.as_mut() {
            Some(f) => f.process(dir, pkt, &self.injector),
            None => Verdict::Pass,
        }
    }
}

impl fmt::Debug for FilterSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FilterSlot(armed: {})", self.is_armed())
    }
}

/// The ordered filters of one device plus the receiving end of its injector.
pub struct FilterChain {
    filters: Vec<Box<dyn PacketFilter>>,
    slot: FilterSlot,
    injector: Injector,
    injected: Arc<Injected>,
    wake: Arc<EventFd>,
}

impl FilterChain {
    /// An empty chain (the fast path: frames are neither copied nor allocated).
    pub fn new() -> Result<Self, FilterError> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(FilterError::EventFd)?);
        let (rx_send, injected_rx) = sync_channel(INJECT_QUEUE_LEN);
        let (tx_send, injected_tx) = sync_channel(INJECT_QUEUE_LEN);
        let injector = Injector {
            rx: rx_send,
            tx: tx_send,
            wake: wake.clone(),
        };
        let injected = Arc::new(Injected {
            rx: Mutex::new(injected_rx),
            tx: Mutex::new(injected_tx),
        });
        Ok(Self {
            filters: Vec::new(),
            slot: FilterSlot {
                inner: Arc::new(SlotInner {
                    armed: AtomicBool::new(false),
                    filter: Mutex::new(None),
                }),
                injector: injector.clone(),
                injected: injected.clone(),
            },
            injector,
            injected,
            wake,
        })
    }

    /// Appends `filter` on the tap side of the existing ones.
    pub fn push(&mut self, filter: Box<dyn PacketFilter>) {
        self.filters.push(filter);
    }

    /// Whether no filter is configured (nor in the slot).
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty() && !self.slot.is_armed()
    }

    /// Number of filters pushed (the slot not counted).
    pub fn len(&self) -> usize {
        self.filters.len()
    }

    /// The filters' names, guest side first (the slot not included).
    pub fn names(&self) -> Vec<&str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    /// The slot on the tap side of the pushed filters, for a filter added while the device runs.
    pub fn slot(&self) -> FilterSlot {
        self.slot.clone()
    }

    /// A handle to inject packets past this chain.
    pub fn injector(&self) -> Injector {
        self.injector.clone()
    }

    /// Runs `pkt` through the filters in `dir` order (the slot last for Tx, first for Rx),
    /// stopping at the first that does not pass it.
    pub fn process(&mut self, dir: Direction, pkt: &mut Packet) -> Verdict {
        if dir == Direction::Rx {
            let v = self.slot.process(dir, pkt);
            if v != Verdict::Pass {
                return v;
            }
        }
        let injector = &self.injector;
        let mut run = |f: &mut Box<dyn PacketFilter>| f.process(dir, pkt, injector);
        let verdict = match dir {
            Direction::Tx => self
                .filters
                .iter_mut()
                .map(&mut run)
                .find(|v| *v != Verdict::Pass),
            Direction::Rx => self
                .filters
                .iter_mut()
                .rev()
                .map(&mut run)
                .find(|v| *v != Verdict::Pass),
        };
        match verdict {
            Some(v) => v,
            None if dir == Direction::Tx => self.slot.process(dir, pkt),
            None => Verdict::Pass,
        }
    }

    /// The next injected packet for `dir`, if any (worker side).
    pub fn next_injected(&self, dir: Direction) -> Option<Packet> {
        match dir {
            Direction::Rx => self.injected.queue(Direction::Rx).try_recv().ok(),
            Direction::Tx => self.injected.queue(Direction::Tx).try_recv().ok(),
        }
    }

    /// The eventfd that becomes readable when a packet is injected (worker side).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

impl fmt::Debug for FilterChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterChain")
            .field("filters", &self.names())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<String>>>;

    /// Records its name, then answers `verdict`.
    struct Probe {
        name: String,
        log: Log,
        verdict: Verdict,
    }

    impl PacketFilter for Probe {
        fn name(&self) -> &str {
            &self.name
        }
        fn process(&mut self, dir: Direction, _pkt: &mut Packet, _: &Injector) -> Verdict {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{dir:?}", self.name));
            self.verdict
        }
    }

    fn probe(name: &str, log: &Log, verdict: Verdict) -> Box<dyn PacketFilter> {
        Box::new(Probe {
            name: name.into(),
            log: log.clone(),
            verdict,
        })
    }

    fn pkt(frame: &[u8]) -> Packet {
        Packet::from_frame(frame)
    }

    #[test]
    fn packet_accessors() {
        assert!(matches!(
            Packet::new(vec![0; 11]),
            Err(FilterError::TooShort(11))
        ));
        let mut p = Packet::new([[1u8; 12].as_slice(), b"frame"].concat()).unwrap();
        assert_eq!(p.vnet_header(), &[1u8; 12]);
        assert_eq!(p.frame(), b"frame");
        p.frame_mut()[0] = b'F';
        assert_eq!(p.frame(), b"Frame");
        p.bytes_mut().truncate(5);
        assert_eq!(p.vnet_header().len(), 5);
        assert!(p.frame().is_empty());
        let taken = p.take();
        assert!(p.is_empty());
        assert_eq!(taken.len(), 5);
        assert_eq!(format!("{taken:?}"), "Packet(5 bytes)");
    }

    #[test]
    fn empty_chain_passes() {
        let mut chain = FilterChain::new().unwrap();
        assert!(chain.is_empty());
        let mut p = pkt(b"x");
        assert_eq!(chain.process(Direction::Tx, &mut p), Verdict::Pass);
        assert_eq!(p.frame(), b"x");
    }

    #[test]
    fn tx_runs_guest_to_tap_and_rx_tap_to_guest() {
        let log = Log::default();
        let mut chain = FilterChain::new().unwrap();
        for n in ["a", "b", "c"] {
            chain.push(probe(n, &log, Verdict::Pass));
        }
        assert_eq!(chain.names(), ["a", "b", "c"]);
        assert_eq!(chain.len(), 3);
        assert_eq!(chain.process(Direction::Tx, &mut pkt(b"1")), Verdict::Pass);
        assert_eq!(chain.process(Direction::Rx, &mut pkt(b"2")), Verdict::Pass);
        assert_eq!(
            *log.lock().unwrap(),
            ["a:Tx", "b:Tx", "c:Tx", "c:Rx", "b:Rx", "a:Rx"]
        );
    }

    #[test]
    fn drop_and_hold_stop_the_chain() {
        for verdict in [Verdict::Drop, Verdict::Hold] {
            let log = Log::default();
            let mut chain = FilterChain::new().unwrap();
            chain.push(probe("a", &log, Verdict::Pass));
            chain.push(probe("stop", &log, verdict));
            chain.push(probe("c", &log, Verdict::Pass));
            assert_eq!(chain.process(Direction::Tx, &mut pkt(b"1")), verdict);
            assert_eq!(*log.lock().unwrap(), ["a:Tx", "stop:Tx"]);
        }
    }

    /// Rewrites the first frame byte; the next filter must see the change.
    struct Rewrite(u8);
    impl PacketFilter for Rewrite {
        fn name(&self) -> &str {
            "rewrite"
        }
        fn process(&mut self, _: Direction, pkt: &mut Packet, _: &Injector) -> Verdict {
            if let Some(b) = pkt.frame_mut().first_mut() {
                *b = self.0;
            }
            Verdict::Pass
        }
    }

    /// Expects a frame byte, drops anything else.
    struct Expect(u8);
    impl PacketFilter for Expect {
        fn name(&self) -> &str {
            "expect"
        }
        fn process(&mut self, _: Direction, pkt: &mut Packet, _: &Injector) -> Verdict {
            if pkt.frame().first() == Some(&self.0) {
                Verdict::Pass
            } else {
                Verdict::Drop
            }
        }
    }

    #[test]
    fn modification_is_seen_downstream() {
        let mut chain = FilterChain::new().unwrap();
        chain.push(Box::new(Rewrite(b'Z')));
        chain.push(Box::new(Expect(b'Z')));
        let mut p = pkt(b"abc");
        assert_eq!(chain.process(Direction::Tx, &mut p), Verdict::Pass);
        assert_eq!(p.frame(), b"Zbc");
        // Rx runs the other way: Expect sees the frame before Rewrite and drops it.
        assert_eq!(
            chain.process(Direction::Rx, &mut pkt(b"abc")),
            Verdict::Drop
        );
    }

    /// Holds every packet and hands its injector and the packets to the test.
    struct Holder {
        held: Arc<Mutex<Vec<(Direction, Packet)>>>,
        injector: Arc<Mutex<Option<Injector>>>,
    }
    impl PacketFilter for Holder {
        fn name(&self) -> &str {
            "holder"
        }
        fn process(&mut self, dir: Direction, pkt: &mut Packet, inject: &Injector) -> Verdict {
            self.held.lock().unwrap().push((dir, pkt.take()));
            *self.injector.lock().unwrap() = Some(inject.clone());
            Verdict::Hold
        }
    }

    #[test]
    fn held_packets_are_injected_later_from_another_thread() {
        let held = Arc::new(Mutex::new(Vec::new()));
        let injector = Arc::new(Mutex::new(None));
        let mut chain = FilterChain::new().unwrap();
        chain.push(Box::new(Holder {
            held: held.clone(),
            injector: injector.clone(),
        }));
        let mut a = pkt(b"to-tap");
        let mut b = pkt(b"to-guest");
        assert_eq!(chain.process(Direction::Tx, &mut a), Verdict::Hold);
        assert_eq!(chain.process(Direction::Rx, &mut b), Verdict::Hold);
        assert!(a.is_empty() && b.is_empty(), "held without a copy");
        assert!(chain.next_injected(Direction::Tx).is_none());

        let inj = injector.lock().unwrap().clone().unwrap();
        let packets = std::mem::take(&mut *held.lock().unwrap());
        std::thread::spawn(move || {
            for (dir, p) in packets {
                inj.inject(dir, p).unwrap();
            }
        })
        .join()
        .unwrap();

        assert_eq!(chain.wake_fd().read().unwrap(), 2);
        assert_eq!(
            chain.next_injected(Direction::Tx).unwrap().frame(),
            b"to-tap"
        );
        assert_eq!(
            chain.next_injected(Direction::Rx).unwrap().frame(),
            b"to-guest"
        );
        assert!(chain.next_injected(Direction::Rx).is_none());
    }

    #[test]
    fn the_slot_sits_on_the_tap_side_and_can_be_filled_and_emptied_at_run_time() {
        let log = Log::default();
        let mut chain = FilterChain::new().unwrap();
        chain.push(probe("a", &log, Verdict::Pass));
        let slot = chain.slot();
        assert!(!slot.is_armed());
        slot.install(probe("s", &log, Verdict::Pass)).unwrap();
        assert!(matches!(
            slot.install(probe("t", &log, Verdict::Pass)),
            Err(SlotTaken(name)) if name == "s"
        ));
        assert!(!chain.is_empty(), "an armed slot leaves the fast path");
        chain.process(Direction::Tx, &mut pkt(b"1"));
        chain.process(Direction::Rx, &mut pkt(b"2"));
        assert_eq!(*log.lock().unwrap(), ["a:Tx", "s:Tx", "s:Rx", "a:Rx"]);
        let taken = slot.remove().unwrap();
        assert_eq!(taken.name(), "s");
        assert!(chain.is_empty() == chain.names().is_empty() && !slot.is_armed());
        log.lock().unwrap().clear();
        chain.process(Direction::Tx, &mut pkt(b"3"));
        assert_eq!(*log.lock().unwrap(), ["a:Tx"]);
        // Injected packets not yet taken can be discarded through the slot.
        let inj = slot.injector();
        inj.inject(Direction::Rx, pkt(b"stale")).unwrap();
        inj.inject(Direction::Rx, pkt(b"stale")).unwrap();
        inj.inject(Direction::Tx, pkt(b"kept")).unwrap();
        assert_eq!(slot.discard_injected(Direction::Rx), 2);
        assert!(chain.next_injected(Direction::Rx).is_none());
        assert_eq!(chain.next_injected(Direction::Tx).unwrap().frame(), b"kept");
        // A slot filter that drops stops an Rx packet before the pushed filters see it.
        slot.install(probe("d", &log, Verdict::Drop)).unwrap();
        log.lock().unwrap().clear();
        assert_eq!(chain.process(Direction::Rx, &mut pkt(b"4")), Verdict::Drop);
        assert_eq!(*log.lock().unwrap(), ["d:Rx"]);
    }

    #[test]
    fn injection_is_bounded_and_fails_once_the_chain_is_gone() {
        let chain = FilterChain::new().unwrap();
        let inj = chain.injector();
        for _ in 0..INJECT_QUEUE_LEN {
            inj.inject(Direction::Rx, pkt(b"x")).unwrap();
        }
        match inj.inject(Direction::Rx, pkt(b"last")) {
            Err(InjectError::Full(Direction::Rx, p)) => assert_eq!(p.frame(), b"last"),
            other => panic!("{other:?}"),
        }
        // The other direction has its own queue.
        inj.inject(Direction::Tx, pkt(b"y")).unwrap();
        drop(chain);
        assert!(matches!(
            inj.inject(Direction::Tx, pkt(b"z")),
            Err(InjectError::Closed(Direction::Tx, _))
        ));
    }
}
