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
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::NetCounters;
use super::filter::{Direction, FilterChain, Packet, Verdict};
use super::rx::{Delivery, RxRing};
use super::tap::{TapIo, VNET_HDR_LEN};
use super::tx::{gather, map_tx};
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

/// Retries a tap write interrupted by a signal.
fn write_retrying(mut write: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match write() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Counts the outcome of writing a `len`-byte frame to the tap; true if the tap was full (the
/// frame must wait for EPOLLOUT).
fn record_write(
    result: io::Result<usize>,
    len: usize,
    counters: &NetCounters,
    warn: &mut RateLimited,
) -> bool {
    match result {
        Ok(_) => {
            NetCounters::add(&counters.tx_packets, 1);
            let payload = len.saturating_sub(VNET_HDR_LEN);
            NetCounters::add(&counters.tx_bytes, payload as u64);
            false
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(e) => {
            // e.g. EIO while the interface is down, EINVAL for a bad GSO header.
            NetCounters::add(&counters.tx_dropped, 1);
            warn.warn(|| format!("net: tap write failed: {e}"));
            false
        }
    }
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
                let mut slices = Vec::with_capacity(4);
                let taken = match map_tx(&self.mem, chain, &mut slices) {
                    Ok(len) if self.filters.is_empty() && !self.tap_dead => {
                        // Straight from guest memory; copied only if the tap makes it wait.
                        let result = write_retrying(|| self.tap.write_guest(&slices));
                        if record_write(result, len, &self.counters, &mut self.warn_tx) {
                            let n = gather(&slices, &mut self.tx.buf);
                            self.tx.pending = Some(Frame::InBuf(n));
                        }
                        Ok(None)
                    }
                    // Filters (or a dead tap) need the bytes: copy them out.
                    Ok(_) => Ok(Some(gather(&slices, &mut self.tx.buf))),
                    Err(e) => Err(e),
                };
                drop(slices);
                // The frame is sent or copied out: the guest may have its buffer back.
                if let Err(e) = self.tx.queue.add_used(&self.mem, head, 0) {
                    self.warn_tx
                        .warn(|| format!("net: cannot return tx chain {head}: {e}"));
                }
                self.tx.used = true;
                match taken {
                    Ok(Some(len)) => self.tx_frame(len),
                    Ok(None) => {}
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
        let result = write_retrying(|| self.tap.write(bytes));
        if record_write(result, len, &self.counters, &mut self.warn_tx) {
            self.tx.pending = Some(frame);
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
#[path = "worker_tests.rs"]
mod tests;
