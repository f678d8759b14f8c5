//! The virtio-blk data path: a worker thread that owns the queue and serves requests, and
//! optional helper threads that serve large reads and writes at the same time.
//!
//! Copying between the page cache and guest memory is what a large request costs (one core
//! does ~5-8 GB/s here), so a second thread nearly doubles sequential throughput. Helpers exist
//! only when the backend hands out a second handle ([`BlockBackend::try_clone`]); they get a
//! request only while idle, and only requests of at least [`PARALLEL_MIN_BYTES`]: small random
//! requests cost less than the hand-over (a wake-up of the helper and of the worker) and stay
//! on the worker, in order. The worker alone touches the queue: helpers send their outcome
//! back and the worker puts it on the used ring. A FLUSH waits until the helpers are done, so
//! it still covers every write queued before it.

use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlockBackend;
use super::device::BlockCounters;
use super::request::{execute, Completed, DiskInfo, Outcome, FLUSH};
use crate::virtio::{ActiveQueue, Interrupt, WorkerInit, INT_VRING};
use crate::GuestMemory;

/// What the worker thread gives back when it stops.
pub(super) type WorkerExit = (Box<dyn BlockBackend>, Queue);

/// A chain a helper serves; it carries its own handle on guest memory.
type Job = DescriptorChain<Arc<GuestMemory>>;

/// Helper threads per device (besides the worker): with the worker, two copies at a time,
/// which is what a 2-core host can run; more threads would mostly add wake-ups.
pub(super) const HELPERS: usize = 1;

/// Requests with at least this much data may go to an idle helper; smaller ones are cheaper to
/// serve on the worker than to hand over.
const PARALLEL_MIN_BYTES: u64 = 64 << 10;

/// Interrupt in the middle of a batch when about this many bytes of requests (estimated as the
/// requests left times the size of the one just done) are still to be served: at ~5 GB/s that
/// is ~50 µs of work, about what taking an interrupt and queueing more costs the guest. Small
/// random requests stay at one interrupt per batch, large sequential ones get the queue
/// refilled while we copy.
const EARLY_SIGNAL_BYTES: u64 = 256 << 10;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_KILL: u64 = 1;
const TOKEN_DONE: u64 = 2;

/// What a device's worker starts from.
pub(super) struct WorkerSetup {
    pub mem: GuestMemory,
    pub queue: ActiveQueue,
    pub interrupt: Arc<Interrupt>,
    pub backend: Box<dyn BlockBackend>,
    pub id: Vec<u8>,
    pub readonly: bool,
    pub counters: Arc<BlockCounters>,
    pub worker_init: Option<WorkerInit>,
}

/// A finished helper request.
struct Done {
    /// Which helper served it.
    helper: usize,
    head: u16,
    outcome: Outcome,
}

/// A helper thread and its job channel.
struct Helper {
    jobs: Sender<Job>,
    busy: bool,
    thread: JoinHandle<()>,
}

/// The helpers of one worker, and where their results come back.
struct Pool {
    helpers: Vec<Helper>,
    done: Receiver<Done>,
    /// Written by a helper after each result, so an idle worker wakes up.
    done_evt: EventFd,
    in_flight: usize,
}

impl Pool {
    /// Starts up to [`HELPERS`] helpers on handles cloned from `backend` (none if it cannot
    /// clone, or if anything fails: the worker then serves everything itself).
    fn start(setup: &WorkerSetup, mem: &Arc<GuestMemory>, name: &str) -> Option<Pool> {
        let done_evt = EventFd::new(libc::EFD_NONBLOCK).ok()?;
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut helpers = Vec::new();
        for i in 0..HELPERS {
            let Some(backend) = setup.backend.try_clone() else {
                break;
            };
            let Ok(evt) = done_evt.try_clone() else {
                break;
            };
            let (jobs, job_rx) = std::sync::mpsc::channel();
            let ctx = HelperCtx {
                index: i,
                mem: mem.clone(),
                backend,
                id: setup.id.clone(),
                readonly: setup.readonly,
                done: done_tx.clone(),
                evt,
            };
            let init = setup.worker_init.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-io{i}"))
                .spawn(move || {
                    if let Some(init) = init {
                        init("virtio-blk");
                    }
                    ctx.run(job_rx)
                });
            match spawned {
                Ok(thread) => helpers.push(Helper {
                    jobs,
                    busy: false,
                    thread,
                }),
                Err(e) => {
                    log::warn!("virtio-blk {name}: no I/O helper thread: {e}");
                    break;
                }
            }
        }
        (!helpers.is_empty()).then_some(Pool {
            helpers,
            done,
            done_evt,
            in_flight: 0,
        })
    }

    /// Hands `chain` to an idle helper; gives it back if none is idle (or the helper is gone).
    fn offer(&mut self, chain: Job) -> Result<(), Job> {
        let Some(h) = self.helpers.iter_mut().find(|h| !h.busy) else {
            return Err(chain);
        };
        match h.jobs.send(chain) {
            Ok(()) => {
                h.busy = true;
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => Err(e.0),
        }
    }

    /// A finished request, if any (waiting for one when `block`).
    fn next_done(&mut self, block: bool) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        let done = if block {
            loop {
                match self.done.recv_timeout(Duration::from_millis(100)) {
                    Ok(d) => break d,
                    Err(RecvTimeoutError::Disconnected) => return None,
                    Err(RecvTimeoutError::Timeout) => self.forget_dead_helpers(),
                }
                if self.in_flight == 0 {
                    return None;
                }
            }
        } else {
            match self.done.try_recv() {
                Ok(d) => d,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return None,
            }
        };
        self.in_flight -= 1;
        if let Some(h) = self.helpers.get_mut(done.helper) {
            h.busy = false;
        }
        Some(done)
    }

    /// A helper that panicked never answers: stop waiting for its request.
    fn forget_dead_helpers(&mut self) {
        for h in self.helpers.iter_mut().filter(|h| h.busy) {
            if h.thread.is_finished() {
                log::error!("virtio-blk: an I/O helper died; its request is lost");
                h.busy = false;
                self.in_flight -= 1;
            }
        }
    }

    /// Stops the helpers: each finishes its request, whose result stays in `done`.
    fn close(self) -> Receiver<Done> {
        for h in self.helpers {
            drop(h.jobs);
            if h.thread.join().is_err() {
                log::error!("virtio-blk: an I/O helper panicked; its request is lost");
            }
        }
        self.done
    }
}

/// What a helper thread owns.
struct HelperCtx {
    index: usize,
    mem: Arc<GuestMemory>,
    backend: Box<dyn BlockBackend>,
    id: Vec<u8>,
    readonly: bool,
    done: Sender<Done>,
    evt: EventFd,
}

impl HelperCtx {
    fn run(mut self, jobs: Receiver<Job>) {
        let disk = DiskInfo {
            readonly: self.readonly,
            id: &self.id,
        };
        while let Ok(chain) = jobs.recv() {
            let head = chain.head_index();
            let outcome = execute(&self.mem, chain, self.backend.as_mut(), &disk);
            let done = Done {
                helper: self.index,
                head,
                outcome,
            };
            if self.done.send(done).is_err() {
                return;
            }
            if let Err(e) = self.evt.write(1) {
                log::error!("virtio-blk: cannot wake the worker: {e}");
            }
        }
    }
}

/// The thread that owns the queue.
pub(super) struct Worker {
    mem: Arc<GuestMemory>,
    queue: ActiveQueue,
    interrupt: Arc<Interrupt>,
    backend: Box<dyn BlockBackend>,
    id: Vec<u8>,
    readonly: bool,
    counters: Arc<BlockCounters>,
    pool: Option<Pool>,
    /// Used entries were added since the last interrupt decision.
    used: bool,
}

impl Worker {
    /// The worker for `setup`, with its helpers already running (`name` names their threads).
    pub fn new(setup: WorkerSetup, name: &str) -> Worker {
        // A clone of a GuestMemoryMmap shares its regions: this is the same memory.
        let mem = Arc::new(setup.mem.clone());
        let pool = Pool::start(&setup, &mem, name);
        Worker {
            mem,
            queue: setup.queue,
            interrupt: setup.interrupt,
            backend: setup.backend,
            id: setup.id,
            readonly: setup.readonly,
            counters: setup.counters,
            pool,
            used: false,
        }
    }

    /// Serves the queue until `kill` fires; then hands back the backend and the queue, with
    /// every request it took off the ring completed.
    pub fn run(mut self, kill: EventFd) -> WorkerExit {
        if let Err(e) = self.event_loop(&kill) {
            log::error!("virtio-blk worker stopped: {e}");
        }
        if let Some(pool) = self.pool.take() {
            let in_flight = pool.in_flight;
            let done = pool.close();
            let done: Vec<Done> = done.try_iter().take(in_flight).collect();
            if !done.is_empty() {
                self.backend.settle();
            }
            for d in done {
                self.complete(d.head, d.outcome, 0);
            }
            self.signal_if_asked();
        }
        (self.backend, self.queue.queue)
    }

    fn event_loop(&mut self, kill: &EventFd) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.queue.notify.as_raw_fd(), TOKEN_QUEUE)?;
        add(kill.as_raw_fd(), TOKEN_KILL)?;
        if let Some(pool) = &self.pool {
            add(pool.done_evt.as_raw_fd(), TOKEN_DONE)?;
        }
        // Requests may already be waiting (restore, or a notify before activation).
        self.process_queue();
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return Ok(()),
                    TOKEN_QUEUE => {
                        let _ = self.queue.notify.read();
                        self.process_queue();
                    }
                    TOKEN_DONE => {
                        if let Some(pool) = &self.pool {
                            let _ = pool.done_evt.read();
                        }
                        self.reap(false);
                        self.signal_if_asked();
                    }
                    _ => {}
                }
            }
        }
    }

    /// Serves every available request, with guest notifications off while we work.
    ///
    /// Interrupts: one at the end of a batch, if the driver wants it. With EVENT_IDX, also one
    /// in the middle when the driver asks for it and the rest of the batch will keep us busy
    /// long enough (see [`EARLY_SIGNAL_BYTES`]): the driver then refills the queue while we
    /// work instead of waiting for the whole batch.
    fn process_queue(&mut self) {
        loop {
            if let Err(e) = self.queue.queue.disable_notification(self.mem.as_ref()) {
                crate::warn_limited!("virtio-blk: queue unusable: {e:?}");
                break;
            }
            let chains: Vec<Job> = match self.queue.queue.iter(self.mem.clone()) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    crate::warn_limited!("virtio-blk: bad available ring: {e:?}");
                    break;
                }
            };
            let batch = chains.len();
            // Served now, told to the guest once the backend settled the batch.
            let settle = self.backend.needs_settle();
            let mut served = Vec::new();
            for (i, chain) in chains.into_iter().enumerate() {
                self.reap(false);
                let Some(chain) = self.offer(chain) else {
                    continue;
                };
                if is_flush(&self.mem, &chain) {
                    // A flush covers every write queued before it, also those a helper is
                    // still doing (as when one thread served them all in order).
                    self.reap(true);
                }
                let head = chain.head_index();
                let disk = DiskInfo {
                    readonly: self.readonly,
                    id: &self.id,
                };
                let outcome = execute(&self.mem, chain, self.backend.as_mut(), &disk);
                if settle {
                    served.push((head, outcome));
                    continue;
                }
                let left = (batch - i - 1) as u64;
                self.complete(
                    head,
                    outcome,
                    left.saturating_mul(outcome.completed.bytes()),
                );
            }
            if !served.is_empty() {
                self.backend.settle();
                for (head, outcome) in served {
                    self.complete(head, outcome, 0);
                }
            }
            match self.queue.queue.enable_notification(self.mem.as_ref()) {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => break,
                Err(e) => {
                    crate::warn_limited!("virtio-blk: queue unusable: {e:?}");
                    break;
                }
            }
        }
        self.signal_if_asked();
    }

    /// Gives a large request to an idle helper; returns the chain if we serve it ourselves.
    fn offer(&mut self, chain: Job) -> Option<Job> {
        let Some(pool) = self.pool.as_mut() else {
            return Some(chain);
        };
        if data_bytes(&chain) < PARALLEL_MIN_BYTES {
            return Some(chain);
        }
        pool.offer(chain).err()
    }

    /// Completes what the helpers finished (when `block`, waits until they are all done),
    /// after settling it.
    fn reap(&mut self, block: bool) {
        let mut done = Vec::new();
        while let Some(d) = self.pool.as_mut().and_then(|p| p.next_done(block)) {
            done.push(d);
        }
        if done.is_empty() {
            return;
        }
        self.backend.settle();
        for d in done {
            self.complete(d.head, d.outcome, 0);
        }
    }

    /// Puts a served request on the used ring; interrupts early if `work_left` bytes of
    /// requests still wait and the driver asked to hear about this one.
    fn complete(&mut self, head: u16, outcome: Outcome, work_left: u64) {
        count(&self.counters, outcome.completed);
        let mem = self.mem.as_ref();
        if let Err(e) = self.queue.queue.add_used(mem, head, outcome.used_len) {
            crate::warn_limited!("virtio-blk: cannot return descriptor {head}: {e:?}");
        }
        self.used = true;
        if self.queue.queue.event_idx_enabled() && work_left >= EARLY_SIGNAL_BYTES {
            self.signal_if_asked();
        }
    }

    /// Raises the interrupt if used entries were added and the driver wants to know.
    fn signal_if_asked(&mut self) {
        if !std::mem::take(&mut self.used) {
            return;
        }
        // On error (unreadable used_event) interrupting is the safe side.
        if self
            .queue
            .queue
            .needs_notification(self.mem.as_ref())
            .unwrap_or(true)
        {
            self.interrupt.signal(INT_VRING);
        }
    }
}

/// Whether the chain is a FLUSH request (peeks at the header's type field).
fn is_flush<T>(mem: &GuestMemory, chain: &DescriptorChain<T>) -> bool
where
    T: Deref + Clone,
    T::Target: vm_memory::GuestMemory + Sized,
{
    let Some(first) = chain.clone().next() else {
        return false;
    };
    if first.is_write_only() || first.len() < 4 {
        return false;
    }
    vm_memory::Bytes::read_obj::<u32>(mem, first.addr()).is_ok_and(|t| u32::from_le(t) == FLUSH)
}

/// Bytes a chain's descriptors cover (header and status included); the chain iterator stops on
/// loops and bad links by itself.
fn data_bytes<T>(chain: &DescriptorChain<T>) -> u64
where
    T: Deref + Clone,
    T::Target: vm_memory::GuestMemory + Sized,
{
    chain.clone().map(|d| u64::from(d.len())).sum()
}

fn count(c: &BlockCounters, done: Completed) {
    match done {
        Completed::Read(n) => {
            c.read_ops.fetch_add(1, Ordering::Relaxed);
            c.read_bytes.fetch_add(n, Ordering::Relaxed);
        }
        Completed::Write(n) => {
            c.write_ops.fetch_add(1, Ordering::Relaxed);
            c.write_bytes.fetch_add(n, Ordering::Relaxed);
        }
        Completed::Other => {}
        Completed::Failed => {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
