//! The virtio-net data path: one thread and one epoll moving frames between the tap and the
//! guest's queues, through the filter chain.
//!
//! The tap is registered **level-triggered**. Each wake-up handles a bounded batch and goes back
//! to epoll, so a busy direction cannot starve the other, and whatever is left is reported again
//! without us having to remember it (edge-triggered would force draining the tap to EAGAIN every
//! time, or bookkeeping of "maybe more"). Back-pressure is explicit instead: EPOLLIN is removed
//! while a received frame waits for guest buffers (we stop reading the tap rather than spin or
//! drop), and EPOLLOUT is added only while a frame waits for the tap to accept writes.
//!
//! Guest notifications: tx kicks are disabled while a batch is processed and re-enabled with a
//! re-check at the end; rx kicks are only asked for while we wait for rx buffers. Interrupts are
//! raised at most once per batch, and with EVENT_IDX only when the driver's `used_event` asks
//! (without it, once per batch: virtio-queue does not honour VRING_AVAIL_F_NO_INTERRUPT).

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::NetCounters;
use super::filter::{Direction, FilterChain, Packet, Verdict};
use super::rx::{Delivery, RxRing};
use super::tap::{TapIo, VNET_HDR_LEN};
use crate::virtio::{ActiveQueue, Interrupt, INT_VRING};
use crate::GuestMemory;

/// Largest tx frame accepted from the guest: the vnet header plus 64 KiB (a maximal GSO frame).
pub const MAX_TX_FRAME: usize = VNET_HDR_LEN + 65536;
/// Size of the buffer tap reads land in: the largest GSO frame the tap produces, header included.
pub const RX_BUFFER_LEN: usize = 65562;

/// Tx chains (and injected tx packets) handled per wake-up before the other sources get a turn.
const TX_BUDGET: usize = 256;
/// Rx steps (a read or a delivery) per wake-up.
const RX_BUDGET: usize = 512;
/// Consecutive failed tap reads after which the tap is considered gone.
const MAX_READ_ERRORS: u32 = 16;
/// At most one warning of a kind per interval: a guest or a network can produce them at line rate.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

const TOKEN_TAP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_INJECT: u64 = 3;
const TOKEN_KILL: u64 = 4;

/// Errors setting the worker up.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating the epoll or registering a descriptor failed.
    #[error("epoll: {0}")]
    Epoll(io::Error),
}

/// Why a tx descriptor chain was refused (it goes back to the driver, its frame dropped).
#[derive(Debug, thiserror::Error)]
pub enum TxChainError {
    /// Tx buffers are for the device to read.
    #[error("device-writable descriptor in a tx chain")]
    Writable,
    /// More than a maximal GSO frame.
    #[error("frame longer than {MAX_TX_FRAME} bytes")]
    TooLong,
    /// Not even a vnet header.
    #[error("{0} bytes, less than a vnet header")]
    TooShort(usize),
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
}

/// Everything a worker starts from.
pub(crate) struct WorkerSetup {
    pub mem: GuestMemory,
    pub interrupt: Arc<Interrupt>,
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub acked_features: u64,
    pub tap: Arc<dyn TapIo>,
    pub filters: FilterChain,
    pub counters: Arc<NetCounters>,
    pub kill: EventFd,
}

/// What a worker hands back when it stops.
pub(crate) struct WorkerExit {
    /// The queues in index order (rx, tx), with their ring positions.
    pub queues: Vec<Queue>,
    /// The filter chain, for the next activation.
    pub filters: FilterChain,
}

/// Logs at most one warning per [`WARN_INTERVAL`] and counts the rest.
#[derive(Default)]
pub(super) struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub fn warn(&mut self, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        let msg = msg();
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{msg}"),
            n => log::warn!("{msg} ({n} similar warnings suppressed)"),
        }
        self.last = Some(now);
    }
}

/// A frame waiting to go somewhere: in the direction's own buffer (the no-copy fast path), or
/// owned (it came out of the filter chain or an injector).
enum Frame {
    InBuf(usize),
    Owned(Vec<u8>),
}

impl Frame {
    fn bytes<'a>(&'a self, buf: &'a [u8]) -> &'a [u8] {
        match self {
            Frame::InBuf(n) => buf.get(..*n).unwrap_or(&[]),
            Frame::Owned(v) => v,
        }
    }
}

struct Rx {
    ring: RxRing,
    notify: EventFd,
    buf: Box<[u8]>,
    /// The next frame for the guest; while it is there the tap is not read.
    pending: Option<Frame>,
}

struct Tx {
    queue: Queue,
    notify: EventFd,
    buf: Box<[u8]>,
    /// A frame the tap refused with EAGAIN; nothing else is sent until it goes.
    pending: Option<Frame>,
    used: bool,
}

/// The net device's data-path thread.
pub(crate) struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    tap: Arc<dyn TapIo>,
    filters: FilterChain,
    counters: Arc<NetCounters>,
    kill: EventFd,
    epoll: Epoll,
    rx: Rx,
    tx: Tx,
    /// What the tap is registered for.
    tap_events: EventSet,
    /// The tap returned errors only: it is out of epoll, tx frames are dropped.
    tap_dead: bool,
    read_errors: u32,
    warn_rx: RateLimited,
    warn_tx: RateLimited,
    warn_tap: RateLimited,
}

/// Pops the next available chain; errors are the driver's (corrupt avail index or ring).
pub(super) fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Copies a tx chain's readable buffers (vnet header + frame) into `buf`; returns the length.
fn gather_tx(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
) -> Result<usize, TxChainError> {
    let mut total = 0usize;
    let mut open = false;
    for desc in chain {
        open = desc.has_next();
        if desc.is_write_only() {
            return Err(TxChainError::Writable);
        }
        let len = desc.len() as usize;
        let end = total.checked_add(len).ok_or(TxChainError::TooLong)?;
        let dst = buf.get_mut(total..end).ok_or(TxChainError::TooLong)?;
        mem.read_slice(dst, desc.addr())
            .map_err(|_| TxChainError::OutsideMemory {
                addr: desc.addr().0,
                len: len as u64,
            })?;
        total = end;
    }
    // The chain iterator stops silently on a loop or a bad link; a last descriptor that still
    // says NEXT is how that shows.
    if open {
        return Err(TxChainError::Unterminated);
    }
    if total < VNET_HDR_LEN {
        return Err(TxChainError::TooShort(total));
    }
    Ok(total)
}

/// Raises the queue's interrupt if used entries were added and the driver wants to know.
fn signal_used(mem: &GuestMemory, queue: &mut Queue, used: &mut bool, interrupt: &Interrupt) {
    if !std::mem::take(used) {
        return;
    }
    // On error (unreadable used_event) interrupting is the safe side.
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal(INT_VRING);
    }
}

/// Wakes our own loop through `fd` (work was left for the next round).
fn kick(fd: &EventFd) {
    if let Err(e) = fd.write(1) {
        log::error!("net: cannot reschedule the worker: {e}");
    }
}

/// Consumes an eventfd's count (EAGAIN just means it was already consumed).
fn drain(fd: &EventFd) {
    let _ = fd.read();
}

impl Worker {
    /// Builds the worker and its epoll; on failure hands back the queues and the filters.
    pub fn new(setup: WorkerSetup) -> Result<Self, Box<(WorkerError, WorkerExit)>> {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                return Err(Box::new((
                    WorkerError::Epoll(e),
                    WorkerExit {
                        queues: vec![setup.rx.queue, setup.tx.queue],
                        filters: setup.filters,
                    },
                )))
            }
        };
        let worker = Self {
            mem: setup.mem,
            interrupt: setup.interrupt,
            tap: setup.tap,
            filters: setup.filters,
            counters: setup.counters,
            kill: setup.kill,
            epoll,
            rx: Rx {
                ring: RxRing::new(setup.rx.queue, setup.acked_features),
                notify: setup.rx.notify,
                buf: vec![0u8; RX_BUFFER_LEN].into_boxed_slice(),
                pending: None,
            },
            tx: Tx {
                queue: setup.tx.queue,
                notify: setup.tx.notify,
                buf: vec![0u8; MAX_TX_FRAME].into_boxed_slice(),
                pending: None,
                used: false,
            },
            tap_events: EventSet::IN,
            tap_dead: false,
            read_errors: 0,
            warn_rx: RateLimited::default(),
            warn_tx: RateLimited::default(),
            warn_tap: RateLimited::default(),
        };
        match worker.register() {
            Ok(()) => Ok(worker),
            Err(e) => Err(Box::new((WorkerError::Epoll(e), worker.into_exit()))),
        }
    }

    fn register(&self) -> io::Result<()> {
        let add = |fd, events, token| {
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add(self.tap.as_raw_fd(), self.tap_events, TOKEN_TAP)?;
        add(self.rx.notify.as_raw_fd(), EventSet::IN, TOKEN_RX)?;
        add(self.tx.notify.as_raw_fd(), EventSet::IN, TOKEN_TX)?;
        add(
            self.filters.wake_fd().as_raw_fd(),
            EventSet::IN,
            TOKEN_INJECT,
        )?;
        add(self.kill.as_raw_fd(), EventSet::IN, TOKEN_KILL)
    }

    /// Runs until the kill eventfd fires; returns the queues and the filter chain.
    pub fn run(mut self) -> WorkerExit {
        // The driver may have queued work before we started (or before a restore).
        self.set_rx_notify(false);
        self.process_tx();
        self.process_rx();
        let mut events = [EpollEvent::default(); 8];
        'run: loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("net: epoll_wait failed, the device stops: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => break 'run,
                    TOKEN_TAP => self.on_tap(ev.event_set()),
                    TOKEN_RX => self.on_rx_notify(),
                    TOKEN_TX => self.on_tx_notify(),
                    TOKEN_INJECT => self.on_injected(),
                    _ => {}
                }
            }
        }
        self.into_exit()
    }

    fn into_exit(mut self) -> WorkerExit {
        // Buffers reserved for an undelivered frame go back to the guest's avail ring, so the
        // saved queue position loses none of them.
        self.rx.ring.rewind();
        WorkerExit {
            queues: vec![self.rx.ring.queue, self.tx.queue],
            filters: self.filters,
        }
    }

    fn on_tap(&mut self, events: EventSet) {
        let ready = EventSet::IN | EventSet::OUT;
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) && !events.intersects(ready) {
            self.tap_gone("error or hang-up on the tap");
            return;
        }
        if events.contains(EventSet::OUT) {
            self.on_tap_writable();
        }
        if events.contains(EventSet::IN) {
            self.process_rx();
        }
    }

    fn on_rx_notify(&mut self) {
        drain(&self.rx.notify);
        self.process_rx();
    }

    fn on_tx_notify(&mut self) {
        drain(&self.tx.notify);
        self.process_tx();
    }

    fn on_injected(&mut self) {
        // Read before draining the queues: an injection after this read wakes us again.
        drain(self.filters.wake_fd());
        self.process_rx();
        self.process_tx();
    }

    fn tap_gone(&mut self, why: &str) {
        if self.tap_dead {
            return;
        }
        log::error!("net: tap lost ({why}); tx frames will be dropped");
        self.tap_dead = true;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.tap.as_raw_fd(),
            EpollEvent::default(),
        );
        if self.tx.pending.take().is_some() {
            NetCounters::add(&self.counters.tx_dropped, 1);
        }
        // Keep consuming the tx queue so the guest is not left waiting for its buffers.
        self.process_tx();
    }

    /// Registers the tap for what we can handle now: reads unless a frame waits for rx buffers,
    /// writes only while a frame waits for the tap.
    fn update_tap_interest(&mut self) {
        if self.tap_dead {
            return;
        }
        let mut want = EventSet::empty();
        if self.rx.pending.is_none() {
            want |= EventSet::IN;
        }
        if self.tx.pending.is_some() {
            want |= EventSet::OUT;
        }
        if want == self.tap_events {
            return;
        }
        let ev = EpollEvent::new(want, TOKEN_TAP);
        match self
            .epoll
            .ctl(ControlOperation::Modify, self.tap.as_raw_fd(), ev)
        {
            Ok(()) => self.tap_events = want,
            Err(e) => log::error!("net: cannot change the tap's epoll events: {e}"),
        }
    }

    // ---- rx: tap (or injector) -> filters -> guest ----

    /// Turns rx-queue notifications on (we wait for buffers) or off; true if buffers arrived
    /// while turning them on.
    fn set_rx_notify(&mut self, on: bool) -> bool {
        let q = &mut self.rx.ring.queue;
        if on {
            self.rx.ring.notify_on = true;
            return match q.enable_notification(&self.mem) {
                Ok(more) => more,
                Err(e) => {
                    self.warn_rx
                        .warn(|| format!("net: cannot enable rx notifications: {e}"));
                    false
                }
            };
        }
        if self.rx.ring.notify_on {
            self.rx.ring.notify_on = false;
            if let Err(e) = q.disable_notification(&self.mem) {
                self.warn_rx
                    .warn(|| format!("net: cannot disable rx notifications: {e}"));
            }
        }
        false
    }

    fn process_rx(&mut self) {
        let mut budget = RX_BUDGET;
        loop {
            if budget == 0 {
                // More may be waiting: come back after the other sources had their turn.
                kick(&self.rx.notify);
                break;
            }
            budget -= 1;
            if let Some(frame) = self.rx.pending.take() {
                match self.deliver(&frame) {
                    Delivery::NoRoom => {
                        self.rx.pending = Some(frame);
                        if self.set_rx_notify(true) {
                            continue; // buffers arrived meanwhile
                        }
                        break;
                    }
                    Delivery::QueueBroken => {
                        self.rx.pending = Some(frame);
                        break;
                    }
                    Delivery::Delivered | Delivery::Dropped => {
                        self.set_rx_notify(false);
                    }
                }
                continue;
            }
            if let Some(pkt) = self.filters.next_injected(Direction::Rx) {
                NetCounters::add(&self.counters.rx_injected, 1);
                self.rx.pending = Some(Frame::Owned(pkt.into_bytes()));
                continue;
            }
            if self.tap_dead {
                break;
            }
            match self.tap.read(&mut self.rx.buf) {
                // A tap never reads 0 bytes; level-triggered, retrying it would spin.
                Ok(0) => {
                    self.read_errors += 1;
                    if self.read_errors >= MAX_READ_ERRORS {
                        self.tap_gone("reads return nothing");
                    }
                    break;
                }
                Ok(n) => {
                    self.read_errors = 0;
                    self.rx_from_tap(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_errors = 0;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.read_errors += 1;
                    self.warn_tap.warn(|| format!("net: tap read failed: {e}"));
                    if self.read_errors >= MAX_READ_ERRORS {
                        self.tap_gone("reads keep failing");
                    }
                    break;
                }
            }
        }
        self.update_tap_interest();
        signal_used(
            &self.mem,
            &mut self.rx.ring.queue,
            &mut self.rx.ring.used,
            &self.interrupt,
        );
    }

    /// A frame of `n` bytes is in the rx buffer: filter it and make it the pending frame.
    fn rx_from_tap(&mut self, n: usize) {
        if n < VNET_HDR_LEN {
            NetCounters::add(&self.counters.rx_dropped, 1);
            self.warn_rx
                .warn(|| format!("net: {n}-byte read from the tap, shorter than a vnet header"));
            return;
        }
        // The tap writes the 10-byte virtio_net_hdr and skips num_buffers: clear the stale bytes
        // so filters (COLO compare) see the same header for the same frame.
        if let Some(num_buffers) = self.rx.buf.get_mut(10..12) {
            num_buffers.fill(0);
        }
        if self.filters.is_empty() {
            // Fast path: delivered straight from the read buffer, no copy, no allocation.
            self.rx.pending = Some(Frame::InBuf(n));
            return;
        }
        let bytes = self.rx.buf.get(..n).unwrap_or(&[]).to_vec();
        let Ok(mut pkt) = Packet::new(bytes) else {
            NetCounters::add(&self.counters.rx_dropped, 1);
            return;
        };
        match self.filters.process(Direction::Rx, &mut pkt) {
            Verdict::Pass if pkt.len() >= VNET_HDR_LEN => {
                self.rx.pending = Some(Frame::Owned(pkt.into_bytes()));
            }
            Verdict::Pass | Verdict::Drop => NetCounters::add(&self.counters.rx_dropped, 1),
            Verdict::Hold => NetCounters::add(&self.counters.rx_held, 1),
        }
    }

    fn deliver(&mut self, frame: &Frame) -> Delivery {
        let bytes = frame.bytes(&self.rx.buf);
        let d = self
            .rx
            .ring
            .deliver(&self.mem, bytes, &mut self.warn_rx, &self.counters);
        match d {
            Delivery::Delivered => {
                NetCounters::add(&self.counters.rx_packets, 1);
                let payload = bytes.len().saturating_sub(VNET_HDR_LEN);
                NetCounters::add(&self.counters.rx_bytes, payload as u64);
            }
            Delivery::Dropped => NetCounters::add(&self.counters.rx_dropped, 1),
            Delivery::NoRoom | Delivery::QueueBroken => {}
        }
        d
    }

    // ---- tx: guest (or injector) -> filters -> tap ----

    fn process_tx(&mut self) {
        if self.tx.pending.is_some() {
            return; // EPOLLOUT resumes us
        }
        let mut budget = TX_BUDGET;
        // Injected frames first: they were released before anything the guest queues now.
        while budget > 0 && self.tx.pending.is_none() {
            let Some(pkt) = self.filters.next_injected(Direction::Tx) else {
                break;
            };
            budget -= 1;
            NetCounters::add(&self.counters.tx_injected, 1);
            if pkt.len() < VNET_HDR_LEN {
                NetCounters::add(&self.counters.tx_dropped, 1);
                continue;
            }
            self.send(Frame::Owned(pkt.into_bytes()));
        }
        'batch: loop {
            if let Err(e) = self.tx.queue.disable_notification(&self.mem) {
                self.warn_tx
                    .warn(|| format!("net: cannot disable tx notifications: {e}"));
            }
            loop {
                if self.tx.pending.is_some() {
                    // The tap is full: leave guest kicks off, EPOLLOUT brings us back.
                    break 'batch;
                }
                if budget == 0 {
                    kick(&self.tx.notify);
                    break 'batch;
                }
                let chain = match pop(&mut self.tx.queue, &self.mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        // Retrying cannot help: wait for the driver's next kick.
                        self.warn_tx.warn(|| format!("net: tx queue unusable: {e}"));
                        break 'batch;
                    }
                };
                budget -= 1;
                let head = chain.head_index();
                let gathered = gather_tx(&self.mem, chain, &mut self.tx.buf);
                // The frame is copied out: the guest may have its buffer back whatever happens.
                if let Err(e) = self.tx.queue.add_used(&self.mem, head, 0) {
                    self.warn_tx
                        .warn(|| format!("net: cannot return tx chain {head}: {e}"));
                }
                self.tx.used = true;
                match gathered {
                    Ok(len) => self.tx_frame(len),
                    Err(e) => {
                        NetCounters::add(&self.counters.tx_bad_chains, 1);
                        self.warn_tx
                            .warn(|| format!("net: tx chain {head} refused: {e}"));
                    }
                }
            }
            match self.tx.queue.enable_notification(&self.mem) {
                Ok(true) => continue, // the guest queued more while we were finishing
                Ok(false) => break,
                Err(e) => {
                    self.warn_tx
                        .warn(|| format!("net: cannot enable tx notifications: {e}"));
                    break;
                }
            }
        }
        self.update_tap_interest();
        signal_used(
            &self.mem,
            &mut self.tx.queue,
            &mut self.tx.used,
            &self.interrupt,
        );
    }

    /// A guest frame of `len` bytes is in the tx buffer: filter it and send it.
    fn tx_frame(&mut self, len: usize) {
        if self.filters.is_empty() {
            self.send(Frame::InBuf(len));
            return;
        }
        let bytes = self.tx.buf.get(..len).unwrap_or(&[]).to_vec();
        let Ok(mut pkt) = Packet::new(bytes) else {
            NetCounters::add(&self.counters.tx_dropped, 1);
            return;
        };
        match self.filters.process(Direction::Tx, &mut pkt) {
            Verdict::Pass if pkt.len() >= VNET_HDR_LEN => {
                self.send(Frame::Owned(pkt.into_bytes()));
            }
            Verdict::Pass | Verdict::Drop => NetCounters::add(&self.counters.tx_dropped, 1),
            Verdict::Hold => NetCounters::add(&self.counters.tx_held, 1),
        }
    }

    /// Writes a frame to the tap; on EAGAIN keeps it as the pending frame.
    fn send(&mut self, frame: Frame) {
        if self.tap_dead {
            NetCounters::add(&self.counters.tx_dropped, 1);
            return;
        }
        let bytes = frame.bytes(&self.tx.buf);
        let len = bytes.len();
        let result = loop {
            match self.tap.write(bytes) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            Ok(_) => {
                NetCounters::add(&self.counters.tx_packets, 1);
                let payload = len.saturating_sub(VNET_HDR_LEN);
                NetCounters::add(&self.counters.tx_bytes, payload as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tx.pending = Some(frame),
            Err(e) => {
                // e.g. EIO while the interface is down, EINVAL for a bad GSO header.
                NetCounters::add(&self.counters.tx_dropped, 1);
                self.warn_tx.warn(|| format!("net: tap write failed: {e}"));
            }
        }
    }

    fn on_tap_writable(&mut self) {
        if let Some(frame) = self.tx.pending.take() {
            self.send(frame);
        }
        // Picks up where the tap stopped us (or returns at once if it is still full).
        self.process_tx();
        self.update_tap_interest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::net_features::{GUEST_CSUM, MRG_RXBUF};
    use crate::virtio::net::testutil::{fake_tap, memory, Driver, NEXT, W};
    use std::os::unix::net::UnixDatagram;
    use std::sync::Mutex;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress};

    const RXQ: u64 = 0;
    const TXQ: u64 = 0x40000;
    const DATA: u64 = 0x100000;

    struct Rig<'a> {
        mem: &'a GuestMemory,
        rx: Driver<'a>,
        tx: Driver<'a>,
        w: Worker,
        peer: UnixDatagram,
        irq: EventFd,
        counters: Arc<NetCounters>,
        kill: EventFd,
    }

    fn rig_with(mem: &GuestMemory, acked: u64, filters: FilterChain) -> Rig<'_> {
        rig_opts(mem, acked, filters, true)
    }

    fn rig_opts(mem: &GuestMemory, acked: u64, filters: FilterChain, event_idx: bool) -> Rig<'_> {
        let rx = Driver::new(mem, RXQ, 256);
        let tx = Driver::new(mem, TXQ, 256);
        let (tap, peer) = fake_tap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let counters = Arc::new(NetCounters::default());
        let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let active = |d: &Driver| ActiveQueue {
            queue: d.queue(event_idx),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let setup = WorkerSetup {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            rx: active(&rx),
            tx: active(&tx),
            acked_features: acked,
            tap,
            filters,
            counters: counters.clone(),
            kill: kill.try_clone().unwrap(),
        };
        let w = Worker::new(setup).map_err(|e| e.0).unwrap();
        Rig {
            mem,
            rx,
            tx,
            w,
            peer,
            irq,
            counters,
            kill,
        }
    }

    fn rig(mem: &GuestMemory, acked: u64) -> Rig<'_> {
        rig_with(mem, acked, FilterChain::new().unwrap())
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ tag).collect();
        f[..VNET_HDR_LEN].fill(0);
        f
    }

    impl Rig<'_> {
        /// The guest queues `bytes` as one tx chain split into pieces of `piece` bytes.
        fn guest_send(&mut self, at: u64, bytes: &[u8], piece: usize) -> u16 {
            self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
            let descs: Vec<_> = bytes
                .chunks(piece)
                .scan(at, |a, c| {
                    let d = (*a, c.len() as u32, 0);
                    *a += c.len() as u64;
                    Some(d)
                })
                .collect();
            self.tx.add(&descs)
        }

        fn tap_recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; RX_BUFFER_LEN];
            self.peer.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
        }

        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }

        fn guest_bytes(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        }
    }

    #[test]
    fn tx_chain_reaches_the_tap_byte_for_byte() {
        let mem = memory();
        let mut r = rig(&mem, 0);
        let f = frame(1, 1514 + 12);
        // Header alone in the first descriptor, the rest split unevenly, as drivers do.
        r.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
        let head = r.tx.add(&[
            (DATA, 12, 0),
            (DATA + 12, 1000, 0),
            (DATA + 1012, (f.len() - 1012) as u32, 0),
        ]);
        r.w.process_tx();
        assert_eq!(r.tap_recv().unwrap(), f);
        assert_eq!(r.tx.used_idx(), 1);
        assert_eq!(r.tx.used(0), (u32::from(head), 0));
        assert_eq!(r.irqs(), 1, "used_event 0 asks for the first interrupt");
        let s = r.counters.snapshot();
        assert_eq!((s.tx_packets, s.tx_bytes), (1, 1514));
    }

    #[test]
    fn malformed_tx_chains_are_returned_and_the_worker_goes_on() {
        let mem = memory();
        let mut r = rig(&mem, 0);
        let good: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 60 + usize::from(i))).collect();
        let raw = |addr: u64, len: u32, flags: u16, next: u16| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        };
        let mut bad_heads = Vec::new();
        for (i, g) in good.iter().enumerate() {
            r.guest_send(DATA + 0x10000 * i as u64, g, 32);
            let n = r.tx.next_desc();
            let bad: Vec<RawDescriptor> = match i {
                // Outside guest memory (8 MiB).
                0 => vec![raw(0x4000_0000, 64, 0, 0)],
                // A device-writable descriptor in a tx chain.
                1 => vec![raw(DATA, 12, NEXT, n + 1), raw(DATA, 64, W, 0)],
                // A loop: each descriptor points at the other.
                2 => vec![raw(DATA, 40, NEXT, n + 1), raw(DATA, 40, NEXT, n)],
                // A length no frame can have.
                3 => vec![raw(DATA, 0xffff_ffff, 0, 0)],
                // A link to a descriptor index past the table.
                _ => vec![raw(DATA, 12, NEXT, 999)],
            };
            bad_heads.push(r.tx.add_raw(&bad));
        }
        r.w.process_tx();
        for g in &good {
            assert_eq!(&r.tap_recv().unwrap(), g);
        }
        assert!(r.tap_recv().is_none(), "no malformed frame reached the tap");
        assert_eq!(r.tx.used_idx(), 10);
        for i in 0..10 {
            assert_eq!(r.tx.used(i).1, 0);
        }
        let returned: Vec<u32> = (0..10).map(|i| r.tx.used(i).0).collect();
        for h in bad_heads {
            assert!(returned.contains(&u32::from(h)), "bad chain {h} kept");
        }
        let s = r.counters.snapshot();
        assert_eq!((s.tx_packets, s.tx_bad_chains, s.tx_dropped), (5, 5, 0));

        // Still working afterwards.
        let again = frame(9, 100);
        r.guest_send(DATA + 0x80000, &again, 100);
        r.w.process_tx();
        assert_eq!(r.tap_recv().unwrap(), again);
    }

    #[test]
    fn a_full_tap_holds_the_frame_until_writable() {
        let mem = memory();
        let mut r = rig(&mem, 0);
        // A connected datagram socketpair is bounded by the sender's SO_SNDBUF (~200 KiB):
        // 1 MiB of frames the peer does not read makes the fake tap answer EAGAIN.
        let frames: Vec<Vec<u8>> = (0..64).map(|i| frame(i, 16000)).collect();
        for (i, f) in frames.iter().enumerate() {
            r.guest_send(DATA + 0x4000 * i as u64, f, 4000);
        }
        r.w.process_tx();
        assert!(r.w.tx.pending.is_some(), "expected the fake tap to fill up");
        assert!(r.w.tap_events.contains(EventSet::OUT));
        let consumed = r.tx.used_idx();
        assert!(consumed < 64, "the queue waits behind the held frame");

        let mut got = Vec::new();
        for _ in 0..100 {
            while let Some(f) = r.tap_recv() {
                got.push(f);
            }
            if got.len() == frames.len() {
                break;
            }
            r.w.on_tap(EventSet::OUT);
        }
        assert_eq!(got, frames, "every frame, in order, none dropped");
        assert!(r.w.tx.pending.is_none());
        assert!(!r.w.tap_events.contains(EventSet::OUT));
        assert_eq!(r.counters.snapshot().tx_dropped, 0);
    }

    #[test]
    fn batches_keep_kicks_and_interrupts_well_below_one_per_packet() {
        let mem = memory();
        let mut r = rig(&mem, 0);
        for i in 0..64u64 {
            r.guest_send(DATA + 0x1000 * i, &frame(i as u8, 200), 200);
        }
        // A driver that wants to hear about completions only at the end of its burst.
        r.tx.set_used_event(63);
        r.w.process_tx();
        for _ in 0..64 {
            r.tap_recv().unwrap();
        }
        assert_eq!(r.irqs(), 1, "one interrupt for 64 frames");
        // The guest's next kick is asked for only when it queues past what we consumed.
        assert_eq!(r.tx.avail_event(), 64);
    }

    fn rx_buffers(r: &mut Rig, n: u64, size: u32) -> Vec<u16> {
        (0..n)
            .map(|i| r.rx.add(&[(DATA + 0x20000 * i, size, W)]))
            .collect()
    }

    #[test]
    fn rx_merges_a_frame_across_two_buffers() {
        let mem = memory();
        let mut r = rig(&mem, MRG_RXBUF);
        let heads = rx_buffers(&mut r, 2, 1000);
        let f = frame(3, 1500);
        r.peer.send(&f).unwrap();
        r.w.on_tap(EventSet::IN);
        assert_eq!(r.rx.used_idx(), 2);
        assert_eq!(r.rx.used(0), (u32::from(heads[0]), 1000));
        assert_eq!(r.rx.used(1), (u32::from(heads[1]), 500));
        let mut got = r.guest_bytes(DATA, 1000);
        got.extend(r.guest_bytes(DATA + 0x20000, 500));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        got[10..12].fill(0);
        assert_eq!(got, f);
        assert_eq!(r.irqs(), 1);
        let s = r.counters.snapshot();
        assert_eq!((s.rx_packets, s.rx_bytes), (1, 1488));
    }

    #[test]
    fn rx_without_buffers_holds_the_frame_and_stops_reading() {
        let mem = memory();
        let mut r = rig(&mem, MRG_RXBUF);
        let (a, b) = (frame(1, 300), frame(2, 400));
        r.peer.send(&a).unwrap();
        r.w.on_tap(EventSet::IN);
        assert!(r.w.rx.pending.is_some());
        assert!(
            !r.w.tap_events.contains(EventSet::IN),
            "no tap reads while the guest has no room"
        );
        // The driver is asked to notify on its next buffer.
        assert_eq!(r.rx.avail_event(), 0);
        r.peer.send(&b).unwrap();

        rx_buffers(&mut r, 1, 2048);
        r.w.on_rx_notify();
        // a went in; b was read next and now waits for the next buffer.
        assert_eq!(r.rx.used_idx(), 1);
        let mut got = r.guest_bytes(DATA, a.len());
        got[10..12].fill(0);
        assert_eq!(got, a);
        assert!(r.w.rx.pending.is_some());
        assert_eq!(r.rx.avail_event(), 1);

        r.rx.add(&[(DATA + 0x20000, 2048, W)]);
        r.w.on_rx_notify();
        assert_eq!(r.rx.used_idx(), 2);
        let mut got = r.guest_bytes(DATA + 0x20000, b.len());
        got[10..12].fill(0);
        assert_eq!(got, b);
        assert!(r.w.rx.pending.is_none());
        assert!(r.w.tap_events.contains(EventSet::IN));
        assert_eq!(r.counters.snapshot().rx_dropped, 0);
    }

    #[test]
    fn without_event_idx_rx_kicks_are_wanted_only_while_waiting_for_buffers() {
        let mem = memory();
        let mut r = rig_opts(&mem, MRG_RXBUF, FilterChain::new().unwrap(), false);
        const NO_NOTIFY: u16 = 1;
        r.w.set_rx_notify(false);
        r.peer.send(&frame(1, 100)).unwrap();
        r.w.on_tap(EventSet::IN);
        assert_eq!(r.rx.used_flags(), 0, "stalled: the driver must kick us");
        rx_buffers(&mut r, 1, 2048);
        r.w.on_rx_notify();
        assert_eq!(r.rx.used_idx(), 1);
        assert_eq!(r.rx.used_flags(), NO_NOTIFY, "not stalled: no rx kicks");
        // Tx: off during the batch, back on (0) once the queue is empty.
        r.guest_send(DATA, &frame(2, 64), 64);
        r.w.process_tx();
        assert_eq!(r.tx.used_flags(), 0);
        assert_eq!(r.irqs(), 2, "one interrupt per batch without used_event");
    }

    #[test]
    fn rx_reserves_partial_buffers_and_gives_them_back_on_exit() {
        let mem = memory();
        let mut r = rig(&mem, MRG_RXBUF);
        rx_buffers(&mut r, 2, 1000);
        r.peer.send(&frame(5, 5000)).unwrap();
        r.w.on_tap(EventSet::IN);
        // Two buffers reserved, not enough: nothing used, the frame waits, and the driver's next
        // buffer (index 2) will notify us.
        assert_eq!(r.rx.used_idx(), 0);
        assert!(r.w.rx.pending.is_some());
        assert_eq!(r.rx.avail_event(), 2);
        let exit = r.w.into_exit();
        assert_eq!(
            exit.queues[0].next_avail(),
            0,
            "reserved buffers are not lost"
        );
    }

    #[test]
    fn rx_without_mrg_drops_what_cannot_fit_and_keeps_the_buffer() {
        let mem = memory();
        let mut r = rig(&mem, GUEST_CSUM);
        let head = rx_buffers(&mut r, 1, 1000)[0];
        let mut big = frame(1, 1500);
        big[0] = 1; // NEEDS_CSUM: kept, the guest negotiated GUEST_CSUM
        let small = {
            let mut s = frame(2, 100);
            s[0] = 1;
            s
        };
        r.peer.send(&big).unwrap();
        r.peer.send(&small).unwrap();
        r.w.on_tap(EventSet::IN);
        assert_eq!(r.rx.used_idx(), 1);
        assert_eq!(r.rx.used(0), (u32::from(head), 100));
        let got = r.guest_bytes(DATA, 100);
        assert_eq!(&got[12..], &small[12..]);
        assert_eq!(got[0], 1);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(r.counters.snapshot().rx_dropped, 1);
    }

    #[test]
    fn rx_header_flags_cleared_without_guest_csum() {
        let mem = memory();
        let mut r = rig(&mem, 0);
        rx_buffers(&mut r, 1, 2048);
        let mut f = frame(1, 100);
        f[0] = 2; // DATA_VALID from the tap
        r.peer.send(&f).unwrap();
        r.w.on_tap(EventSet::IN);
        assert_eq!(r.guest_bytes(DATA, 1)[0], 0);
    }

    #[test]
    fn malformed_rx_chains_are_returned_empty() {
        let mem = memory();
        let mut r = rig(&mem, MRG_RXBUF);
        let readable = r.rx.add(&[(DATA, 2048, 0)]);
        let outside = r.rx.add(&[(0x4000_0000, 2048, W)]);
        let tiny = r.rx.add(&[(DATA, 4, W)]);
        let good = r.rx.add(&[(DATA + 0x20000, 2048, W)]);
        let f = frame(1, 500);
        r.peer.send(&f).unwrap();
        r.w.on_tap(EventSet::IN);
        assert_eq!(r.rx.used_idx(), 4);
        let used: Vec<_> = (0..4).map(|i| r.rx.used(i)).collect();
        for bad in [readable, outside, tiny] {
            assert!(used.contains(&(u32::from(bad), 0)));
        }
        assert!(used.contains(&(u32::from(good), 500)));
        assert_eq!(r.counters.snapshot().rx_bad_chains, 3);
        assert_eq!(r.counters.snapshot().rx_packets, 1);
    }

    /// Rewrites the last frame byte on tx; drops rx frames whose last byte is 0xdd; holds rx
    /// frames whose last byte is 0x11 and injects them back (as received) at once.
    struct TestFilter {
        seen: Arc<Mutex<Vec<Direction>>>,
    }
    impl crate::virtio::net::PacketFilter for TestFilter {
        fn name(&self) -> &str {
            "test"
        }
        fn process(
            &mut self,
            dir: Direction,
            pkt: &mut Packet,
            inject: &crate::virtio::net::Injector,
        ) -> Verdict {
            self.seen.lock().unwrap().push(dir);
            let last = pkt.frame().last().copied();
            match (dir, last) {
                (Direction::Tx, _) => {
                    if let Some(b) = pkt.frame_mut().last_mut() {
                        *b = 0xee;
                    }
                    Verdict::Pass
                }
                (Direction::Rx, Some(0xdd)) => Verdict::Drop,
                (Direction::Rx, Some(0x11)) => {
                    inject.inject(Direction::Rx, pkt.take()).unwrap();
                    Verdict::Hold
                }
                _ => Verdict::Pass,
            }
        }
    }

    #[test]
    fn filters_modify_drop_hold_and_inject() {
        let mem = memory();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut chain = FilterChain::new().unwrap();
        chain.push(Box::new(TestFilter { seen: seen.clone() }));
        let mut r = rig_with(&mem, MRG_RXBUF, chain);

        let f = frame(1, 80);
        r.guest_send(DATA, &f, 80);
        r.w.process_tx();
        let mut want = f.clone();
        *want.last_mut().unwrap() = 0xee;
        assert_eq!(r.tap_recv().unwrap(), want);

        rx_buffers(&mut r, 4, 2048);
        let mut dropped = frame(2, 90);
        *dropped.last_mut().unwrap() = 0xdd;
        let mut held = frame(3, 90);
        *held.last_mut().unwrap() = 0x11;
        r.peer.send(&dropped).unwrap();
        r.peer.send(&held).unwrap();
        r.w.on_tap(EventSet::IN);
        // The held frame was injected; injected frames do not cross the filters again.
        r.w.on_injected();
        assert_eq!(r.rx.used_idx(), 1);
        let mut got = r.guest_bytes(DATA, 90);
        got[10..12].fill(0);
        assert_eq!(got, held);
        assert_eq!(
            *seen.lock().unwrap(),
            [Direction::Tx, Direction::Rx, Direction::Rx]
        );
        let s = r.counters.snapshot();
        assert_eq!(
            (s.rx_dropped, s.rx_held, s.rx_injected, s.rx_packets),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn runs_on_a_thread_until_killed() {
        let mem = memory();
        let mut chain = FilterChain::new().unwrap();
        let inj = chain.injector();
        chain.push(Box::new(TestFilter {
            seen: Arc::new(Mutex::new(Vec::new())),
        }));
        let mut r = rig_with(&mem, MRG_RXBUF, chain);
        rx_buffers(&mut r, 2, 2048);
        let Rig {
            w,
            peer,
            kill,
            counters,
            rx,
            ..
        } = r;
        let handle = std::thread::spawn(move || w.run());
        let f = frame(4, 300);
        peer.send(&f).unwrap();
        // Injected from yet another thread, straight to the tap, unfiltered.
        let tx_pkt = frame(5, 64);
        let to_send = tx_pkt.clone();
        std::thread::spawn(move || {
            inj.inject(Direction::Tx, Packet::new(to_send).unwrap())
                .unwrap()
        })
        .join()
        .unwrap();
        peer.set_nonblocking(false).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &tx_pkt[..]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.snapshot().rx_packets < 1 {
            assert!(Instant::now() < deadline, "rx frame never delivered");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(rx.used_idx(), 1);
        kill.write(1).unwrap();
        let exit = handle.join().unwrap();
        assert_eq!(exit.queues.len(), 2);
        assert_eq!(exit.queues[0].next_used(), 1);
        assert_eq!(exit.filters.len(), 1, "the chain comes back");
    }
}
