//! Transfers over N parallel channels (like QEMU's multifd). The [`Sender`] spreads each
//! round's pages over N streams, one thread each, and ends the round with a Barrier on every
//! stream; the [`Receiver`] applies pages from all streams concurrently and reports a round
//! only once every stream has passed its barrier. Start, State, Complete, Abandon and the
//! replies use channel 0. Both sides can be driven once per checkpoint (COLO) or once (a
//! migration or a snapshot file, which is a one-channel transfer).

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::memory::{
    self, GuestMemoryReader, GuestMemoryWriter, MemoryError, PageScratch, PageStats,
};
use super::protocol::{
    Limits, Message, MessageType, ProtocolError, StartInfo, StreamHeader, StreamReader,
    StreamWriter, MAX_CHANNELS,
};
use super::ranges::{MemRange, PAGE_SIZE};
use super::transport::Transport;

/// How long a failing sender waits for the destination's Error message, to report its reason.
const REMOTE_REASON_WAIT: Duration = Duration::from_millis(250);

/// Errors of a multi-channel transfer. After one, the transfer is over: both ends shut their
/// streams down and every later call fails with [`ChannelError::AlreadyFailed`].
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Reading or writing a stream failed.
    #[error("migration channel {channel}: {source}")]
    Protocol {
        /// Channel index.
        channel: u16,
        /// Why.
        source: ProtocolError,
    },
    /// Collecting, sending or applying pages failed.
    #[error("migration channel {channel}: {source}")]
    Memory {
        /// Channel index.
        channel: u16,
        /// Why.
        source: MemoryError,
    },
    /// A socket call failed.
    #[error("migration channel {channel}: {what}: {source}")]
    Io {
        /// Channel index.
        channel: u16,
        /// The call.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Channel count out of range.
    #[error("a migration needs 1 to {MAX_CHANNELS} channels, not {0}")]
    ChannelCount(usize),
    /// The streams' headers do not describe one transfer.
    #[error("migration streams do not belong together: {0}")]
    Mismatch(&'static str),
    /// Options that cannot work.
    #[error("invalid migration options: {0}")]
    Options(&'static str),
    /// Setting a stream up before its header failed (authentication, say).
    #[error("migration channel {channel}: {why}")]
    Setup {
        /// Channel index.
        channel: u16,
        /// Why.
        why: String,
    },
    /// The destination sent an Error.
    #[error("the destination failed: {0}")]
    Remote(String),
    /// The source failed, and the destination had sent an Error.
    #[error("{local}; the destination reported: {remote}")]
    LocalAndRemote {
        /// What failed here.
        local: Box<ChannelError>,
        /// The destination's Error message.
        remote: String,
    },
    /// The source sent Abandon where the receiver needed something else.
    #[error("the source abandoned the migration: {0}")]
    Abandoned(String),
    /// A message that does not belong where it came.
    #[error("unexpected {got:?} message on migration channel {channel} ({when})")]
    Unexpected {
        /// Channel index.
        channel: u16,
        /// Message type.
        got: MessageType,
        /// What was expected instead.
        when: &'static str,
    },
    /// Barrier rounds must increase.
    #[error("migration channel {channel}: barrier for round {round} after round {last}")]
    RoundOrder {
        /// Channel index.
        channel: u16,
        /// Round in the barrier.
        round: u64,
        /// Last round seen.
        last: u64,
    },
    /// A data channel closed before the barrier a round needs.
    #[error("migration channel {channel} closed before the barrier of round {round}")]
    ChannelEnded {
        /// Channel index.
        channel: u16,
        /// The round awaited.
        round: u64,
    },
    /// Channel 0 was silent for longer than the idle timeout.
    #[error("no migration message for {0:?}")]
    Idle(Duration),
    /// Data channels made no progress towards a barrier.
    #[error("migration data channels made no progress for {0:?}")]
    Stalled(Duration),
    /// Pages arrived before [`Receiver::start_applying`], or it came before the Start message.
    #[error("migration pages before the destination memory is ready")]
    NotStarted,
    /// Another channel failed first (only seen inside a round).
    #[error("aborted because another migration channel failed")]
    Aborted,
    /// A channel thread could not be started.
    #[error("starting a migration channel thread: {0}")]
    Spawn(io::Error),
    /// A channel thread panicked.
    #[error("a migration channel thread panicked")]
    Panicked,
    /// The transfer failed earlier.
    #[error("the migration already failed")]
    AlreadyFailed,
}

/// Maps a stream error on channel `channel`.
fn proto(channel: u16) -> impl Fn(ProtocolError) -> ChannelError {
    move |source| ChannelError::Protocol { channel, source }
}

/// Maps a socket call's error on channel `channel`.
fn io_call(channel: u16, what: &'static str) -> impl Fn(io::Error) -> ChannelError {
    move |source| ChannelError::Io {
        channel,
        what,
        source,
    }
}

/// Locks a mutex, carrying on if a panicking thread poisoned it: every critical section here
/// leaves its data consistent, and a dead thread already shows as a failed or stalled channel.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random identifier for a new transfer.
pub fn new_session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process; mixing in the time and pid keeps two
    // transfers of one process apart too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// Sender settings.
#[derive(Clone, Copy, Debug)]
pub struct SenderOptions {
    /// Message size limits; must match the receiver's.
    pub limits: Limits,
    /// Page bytes per batch (one MemoryPages message at most, plus zero ranges); also the unit
    /// of work the channel threads take turns on.
    pub batch_bytes: u64,
    /// Send zero pages as MemoryZero ranges instead of data.
    pub detect_zero_pages: bool,
    /// Bound on every read and write.
    pub io_timeout: Duration,
    /// How long [`Sender::complete`] waits for the Ack (the destination may load state first).
    pub ack_timeout: Duration,
}

impl Default for SenderOptions {
    fn default() -> Self {
        SenderOptions {
            limits: Limits::default(),
            batch_bytes: 2 << 20,
            detect_zero_pages: true,
            io_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(60),
        }
    }
}

impl SenderOptions {
    /// Refuses options the receiver would refuse or that cannot work.
    fn validate(&self) -> Result<(), ChannelError> {
        if self.batch_bytes < PAGE_SIZE {
            return Err(ChannelError::Options("batch_bytes is below one page"));
        }
        // Worst case one range per page: 16 bytes of range table per page, plus the count.
        let table = self.batch_bytes / PAGE_SIZE * 16 + 4;
        if self.batch_bytes.saturating_add(table) > self.limits.max_pages_payload {
            return Err(ChannelError::Options(
                "batch_bytes with its range table exceeds max_pages_payload",
            ));
        }
        if self.io_timeout.is_zero() || self.ack_timeout.is_zero() {
            return Err(ChannelError::Options("timeouts must be non-zero"));
        }
        Ok(())
    }
}

/// What one round sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundStats {
    /// Round number (1, 2, …, increasing across checkpoints).
    pub round: u64,
    /// Bytes and messages.
    pub pages: PageStats,
    /// Wall time of the round.
    pub duration: Duration,
}

/// What [`Sender::with_setup`] runs on each stream (by channel index) before its header.
pub type StreamSetup<'a> = &'a mut dyn FnMut(u16, &mut Box<dyn Transport>) -> Result<(), String>;

/// The sending end of a transfer.
pub struct Sender {
    writers: Vec<StreamWriter<Box<dyn Transport>>>,
    scratch: Vec<PageScratch>,
    /// Channel 0's read side: Ack and Error come back there.
    replies: StreamReader<Box<dyn Transport>>,
    /// Handles to every stream, to shut them all down from any thread.
    handles: Vec<Box<dyn Transport>>,
    opts: SenderOptions,
    round: u64,
    failed: bool,
}

impl Sender {
    /// Starts a transfer over `streams` (channel i = `streams[i]`): sets their timeouts and
    /// writes their stream headers.
    pub fn new(
        streams: Vec<Box<dyn Transport>>,
        session: u64,
        opts: SenderOptions,
    ) -> Result<Self, ChannelError> {
        Self::with_setup(streams, session, opts, &mut |_, _| Ok(()))
    }

    /// Like [`Self::new`], running `setup` on each stream, in channel order, just before its
    /// header goes out (an authentication handshake, say: the receiver reads a channel's
    /// header right after setting it up, so the next channel's setup must wait for it).
    pub fn with_setup(
        streams: Vec<Box<dyn Transport>>,
        session: u64,
        opts: SenderOptions,
        setup: StreamSetup<'_>,
    ) -> Result<Self, ChannelError> {
        opts.validate()?;
        let count = channel_count(streams.len())?;
        let mut writers = Vec::with_capacity(streams.len());
        let mut handles = Vec::with_capacity(streams.len());
        for (ch, mut s) in (0..count).zip(streams) {
            s.set_io_timeout(opts.io_timeout)
                .map_err(io_call(ch, "set timeouts"))?;
            setup(ch, &mut s).map_err(|why| ChannelError::Setup { channel: ch, why })?;
            handles.push(s.try_clone_transport().map_err(io_call(ch, "dup"))?);
            let mut w = StreamWriter::new(s, opts.limits);
            w.write_header(&StreamHeader::new(ch, count, session))
                .map_err(proto(ch))?;
            writers.push(w);
        }
        let replies = handles[0]
            .try_clone_transport()
            .map_err(io_call(0, "dup"))?;
        Ok(Sender {
            scratch: (0..writers.len()).map(|_| PageScratch::default()).collect(),
            writers,
            replies: StreamReader::new(replies, opts.limits),
            handles,
            opts,
            round: 0,
            failed: false,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.writers.len()
    }

    /// Sends Start on channel 0.
    pub fn send_start(&mut self, start: &StartInfo) -> Result<(), ChannelError> {
        let msg = Message::Start(start.clone());
        self.guarded(|s| s.control(&msg))
    }

    /// Sends the pages of `ranges` (sorted, disjoint, page-aligned; each inside one RAM
    /// region), read through `mem`, spread over all channels, then a Barrier on each.
    pub fn send_round(
        &mut self,
        ranges: &[MemRange],
        mem: &dyn GuestMemoryReader,
    ) -> Result<RoundStats, ChannelError> {
        self.guarded(|s| s.round_inner(ranges, mem))
    }

    /// Waits until the receiver has applied every page sent so far (when it acks each round).
    ///
    /// Without this the sender runs ahead of a slow destination, its bandwidth estimate is
    /// the socket buffer's, and the pause ends up waiting for the destination's backlog.
    pub fn wait_round_applied(&mut self) -> Result<(), ChannelError> {
        self.guarded(|s| s.wait_ack())
    }

    /// Sends the VM/device state on channel 0. Call after the last round of a migration or
    /// checkpoint, so the receiver hands it over only once all pages have landed.
    pub fn send_state(&mut self, blob: &[u8]) -> Result<(), ChannelError> {
        self.guarded(|s| s.control(&Message::State { blob }))
    }

    /// Sends Complete and does not wait for an answer (a snapshot file has no one to answer).
    pub fn send_complete(&mut self) -> Result<(), ChannelError> {
        self.guarded(|s| s.control(&Message::Complete))
    }

    /// Sends Complete and waits up to `ack_timeout` for the destination's Ack. The channels
    /// stay open, so the next checkpoint can follow.
    pub fn complete(&mut self) -> Result<(), ChannelError> {
        self.guarded(|s| {
            s.control(&Message::Complete)?;
            s.wait_ack()
        })
    }

    /// Tells the destination the source gives up, then shuts every channel down.
    pub fn abandon(&mut self, reason: &str) {
        if !self.failed {
            // Best effort: the destination may already be gone.
            let _ = self.control(&Message::Abandon { reason });
        }
        self.failed = true;
        self.shutdown_all(Shutdown::Both);
    }

    /// Runs `f` unless the transfer already failed; on error, fails the whole transfer.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ChannelError>,
    ) -> Result<T, ChannelError> {
        if self.failed {
            return Err(ChannelError::AlreadyFailed);
        }
        f(self).map_err(|e| self.fail(e))
    }

    /// Ends the transfer after `e`, preferring the destination's own reason if it sent one.
    fn fail(&mut self, e: ChannelError) -> ChannelError {
        self.failed = true;
        let e = match e {
            ChannelError::Remote(_) => e,
            // Keep our own view (a reset may be the network's doing or the destination's)
            // next to the destination's, if it said anything.
            local => match self.remote_reason() {
                Some(remote) => ChannelError::LocalAndRemote {
                    local: Box::new(local),
                    remote,
                },
                None => local,
            },
        };
        self.shutdown_all(Shutdown::Both);
        e
    }

    /// An Error message the destination sent before it hung up, if there is one.
    fn remote_reason(&mut self) -> Option<String> {
        self.replies
            .get_ref()
            .set_io_timeout(REMOTE_REASON_WAIT)
            .ok()?;
        match self.replies.next_message() {
            Ok(Message::Error { message }) => Some(message.to_owned()),
            _ => None,
        }
    }

    /// Shuts every stream down (`Write` keeps channel 0 readable for the destination's reason).
    fn shutdown_all(&self, how: Shutdown) {
        for h in &self.handles {
            let _ = h.shutdown(how);
        }
    }

    /// Writes a control message on channel 0.
    fn control(&mut self, msg: &Message<'_>) -> Result<(), ChannelError> {
        let w = &mut self.writers[0];
        w.write_message(msg).map_err(proto(0))?;
        w.flush().map_err(proto(0))
    }

    /// Waits for the Ack to a Complete.
    fn wait_ack(&mut self) -> Result<(), ChannelError> {
        let t = self.replies.get_ref();
        t.set_io_timeout(self.opts.ack_timeout)
            .map_err(io_call(0, "set timeouts"))?;
        let reply = match self.replies.next_message().map_err(proto(0))? {
            Message::Ack => Ok(()),
            Message::Error { message } => Err(ChannelError::Remote(message.to_owned())),
            other => Err(ChannelError::Unexpected {
                channel: 0,
                got: other.kind(),
                when: "waiting for Ack",
            }),
        };
        // The handle shares the socket with channel 0's writer: put its timeout back.
        self.replies
            .get_ref()
            .set_io_timeout(self.opts.io_timeout)
            .map_err(io_call(0, "set timeouts"))?;
        reply
    }

    /// One round: batches taken in turn by one thread per channel, then a barrier on each.
    fn round_inner(
        &mut self,
        ranges: &[MemRange],
        mem: &dyn GuestMemoryReader,
    ) -> Result<RoundStats, ChannelError> {
        let start = Instant::now();
        let batches = memory::batches(ranges, self.opts.batch_bytes)
            .map_err(|source| ChannelError::Memory { channel: 0, source })?;
        self.round += 1;
        let job = RoundJob {
            batches: &batches,
            next: AtomicUsize::new(0),
            abort: AtomicBool::new(false),
            first_error: Mutex::new(None),
            handles: &self.handles,
            mem,
            detect_zero: self.opts.detect_zero_pages,
            round: self.round,
        };
        let mut pages = PageStats::default();
        if self.writers.len() == 1 {
            // One channel (a snapshot file, say): no thread needed.
            if let Ok(st) = job.run(0, &mut self.writers[0], &mut self.scratch[0]) {
                pages = st;
            }
        } else {
            thread::scope(|scope| {
                let mut running = Vec::with_capacity(self.writers.len());
                for (ch, (w, sc)) in (0u16..).zip(self.writers.iter_mut().zip(&mut self.scratch)) {
                    let job = &job;
                    let spawned = thread::Builder::new()
                        .name(format!("mig-tx-{ch}"))
                        .spawn_scoped(scope, move || job.run(ch, w, sc));
                    match spawned {
                        Ok(h) => running.push(h),
                        Err(e) => job.record(ChannelError::Spawn(e)),
                    }
                }
                for h in running {
                    match h.join() {
                        Ok(Ok(st)) => pages += st,
                        Ok(Err(())) => {}
                        Err(_) => job.record(ChannelError::Panicked),
                    }
                }
            });
        }
        if let Some(e) = lock(&job.first_error).take() {
            return Err(e);
        }
        if job.abort.load(Ordering::Relaxed) {
            return Err(ChannelError::Aborted);
        }
        Ok(RoundStats {
            round: self.round,
            pages,
            duration: start.elapsed(),
        })
    }
}

/// Checks a channel count and converts it for the wire.
fn channel_count(n: usize) -> Result<u16, ChannelError> {
    u16::try_from(n)
        .ok()
        .filter(|c| (1..=MAX_CHANNELS).contains(c))
        .ok_or(ChannelError::ChannelCount(n))
}

/// One round's shared work list and failure state, borrowed by every channel thread.
struct RoundJob<'a> {
    batches: &'a [Vec<MemRange>],
    /// Index of the next batch to take: threads that are faster take more.
    next: AtomicUsize,
    abort: AtomicBool,
    first_error: Mutex<Option<ChannelError>>,
    handles: &'a [Box<dyn Transport>],
    mem: &'a dyn GuestMemoryReader,
    detect_zero: bool,
    round: u64,
}

impl RoundJob<'_> {
    /// Sends batches on channel `ch` until none are left, then its barrier. On error, records
    /// it and stops the other channels.
    fn run(
        &self,
        ch: u16,
        w: &mut StreamWriter<Box<dyn Transport>>,
        scratch: &mut PageScratch,
    ) -> Result<PageStats, ()> {
        self.run_inner(ch, w, scratch).map_err(|e| self.record(e))
    }

    fn run_inner(
        &self,
        ch: u16,
        w: &mut StreamWriter<Box<dyn Transport>>,
        scratch: &mut PageScratch,
    ) -> Result<PageStats, ChannelError> {
        let mut stats = PageStats::default();
        while !self.abort.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(batch) = self.batches.get(i) else {
                w.write_message(&Message::Barrier { round: self.round })
                    .map_err(proto(ch))?;
                w.flush().map_err(proto(ch))?;
                return Ok(stats);
            };
            stats += memory::send_batch(w, batch, self.mem, self.detect_zero, scratch).map_err(
                |source| ChannelError::Memory {
                    channel: ch,
                    source,
                },
            )?;
        }
        Err(ChannelError::Aborted)
    }

    /// Keeps the first real error and stops every channel: shutting down the write sides
    /// wakes threads blocked in a write and tells the receiver at once.
    fn record(&self, e: ChannelError) {
        {
            let mut first = lock(&self.first_error);
            if first.is_none() && !matches!(e, ChannelError::Aborted) {
                *first = Some(e);
            }
        }
        if !self.abort.swap(true, Ordering::Relaxed) {
            for h in self.handles {
                let _ = h.shutdown(Shutdown::Write);
            }
        }
    }
}

/// Receiver settings.
#[derive(Clone, Copy, Debug)]
pub struct ReceiverOptions {
    /// Message size limits; must match the sender's.
    pub limits: Limits,
    /// Bound on every read and write: a message that stops arriving halfway this long fails
    /// the transfer, and so do data channels that owe a barrier and stay silent twice as long.
    pub io_timeout: Duration,
    /// How long channel 0 may be silent between two messages (between rounds, or between
    /// COLO checkpoints) before [`Receiver::next_event`] fails.
    pub idle_timeout: Duration,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            limits: Limits::default(),
            io_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What [`Receiver::next_event`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Every page of this round, on every channel, is written to guest memory.
    RoundDone {
        /// Round number.
        round: u64,
    },
    /// VM/device state; all pages sent before it have landed.
    State(Vec<u8>),
    /// The source sent everything; answer with [`Receiver::ack`] once the state is loaded
    /// (or [`Receiver::reject`]).
    Complete,
    /// The source gave up; discard what was received.
    Abandoned(String),
}

/// Progress of the data channel threads, under one lock.
struct Progress {
    /// Last barrier round passed, per data channel (index = channel - 1).
    barrier: Vec<u64>,
    /// Whether each data channel's stream has ended.
    ended: Vec<bool>,
    /// First failure on any channel.
    error: Option<ChannelError>,
    /// Whether the transfer failed (the error may have been taken already).
    failed: bool,
    /// Whether the source was told and the streams shut down, after a failure.
    reported: bool,
    /// Messages handled by data channels, to tell a slow round from a stuck one.
    activity: u64,
    stats: PageStats,
}

/// What the receiver's threads share.
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Channel 0's write side: Ack and Error go there, from any thread.
    replies: Mutex<StreamWriter<Box<dyn Transport>>>,
    handles: Vec<Box<dyn Transport>>,
    /// Set while the receiver is being dropped: errors after it are expected.
    stopping: AtomicBool,
}

impl Shared {
    /// Fails the transfer with `e` unless it already failed: publishes the error, tells the
    /// source (best effort) and shuts every stream down, which wakes every thread blocked on
    /// one. Gives `e` back if the transfer had already failed (it is then a consequence, not
    /// the cause).
    #[must_use]
    fn fail(&self, e: ChannelError) -> Option<ChannelError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Some(e);
        }
        // The source wraps this in "the destination failed", so send a rejection's own words.
        let message = match &e {
            ChannelError::Remote(m) => m.clone(),
            other => other.to_string(),
        };
        {
            let mut p = lock(&self.progress);
            if p.failed {
                return Some(e);
            }
            p.failed = true;
            p.error = Some(e);
        }
        self.changed.notify_all();
        {
            let mut w = lock(&self.replies);
            let _ = w.write_message(&Message::Error { message: &message });
            let _ = w.flush();
        }
        for h in &self.handles {
            let _ = h.shutdown(Shutdown::Both);
        }
        lock(&self.progress).reported = true;
        self.changed.notify_all();
        None
    }

    /// Waits (at most `limit`) until a failure has been reported to the source, so that the
    /// caller, who may drop the receiver next, does not cut the Error message off.
    fn wait_reported(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut p = lock(&self.progress);
        while p.failed && !p.reported {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            p = self
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Takes the recorded error, if one is waiting.
    fn take_error(&self) -> Option<ChannelError> {
        lock(&self.progress).error.take()
    }
}

/// The receiving end of a transfer.
pub struct Receiver {
    control: StreamReader<Box<dyn Transport>>,
    /// Data channels 1.., until [`Receiver::start_applying`] hands them to threads.
    pending: Vec<StreamReader<Box<dyn Transport>>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    dest: Option<Arc<dyn GuestMemoryWriter>>,
    opts: ReceiverOptions,
    session: u64,
    last_round: u64,
    control_stats: PageStats,
    failed: bool,
}

impl Receiver {
    /// Takes the streams of one transfer, in any order: sets their timeouts, reads and checks
    /// their headers (same session, every channel exactly once).
    pub fn new(
        streams: Vec<Box<dyn Transport>>,
        opts: ReceiverOptions,
    ) -> Result<Self, ChannelError> {
        if opts.io_timeout.is_zero() || opts.idle_timeout.is_zero() {
            return Err(ChannelError::Options("timeouts must be non-zero"));
        }
        let count = channel_count(streams.len())?;
        let mut readers: Vec<Option<StreamReader<Box<dyn Transport>>>> =
            (0..count).map(|_| None).collect();
        let mut session = None;
        let mut handles: Vec<Option<Box<dyn Transport>>> = (0..count).map(|_| None).collect();
        for (i, s) in (0..count).zip(streams) {
            s.set_io_timeout(opts.io_timeout)
                .map_err(io_call(i, "set timeouts"))?;
            let mut r = StreamReader::new(s, opts.limits);
            let h = r.read_header().map_err(proto(i))?;
            if h.channels != count {
                return Err(ChannelError::Mismatch(
                    "channel count differs from the streams given",
                ));
            }
            if *session.get_or_insert(h.session) != h.session {
                return Err(ChannelError::Mismatch("streams of different sessions"));
            }
            let slot = usize::from(h.channel);
            if readers[slot].is_some() {
                return Err(ChannelError::Mismatch("two streams claim the same channel"));
            }
            handles[slot] = Some(
                r.get_ref()
                    .try_clone_transport()
                    .map_err(io_call(h.channel, "dup"))?,
            );
            readers[slot] = Some(r);
        }
        // Every slot is filled: `count` distinct indices below `count`.
        let mut readers = readers.into_iter().flatten();
        let handles: Vec<Box<dyn Transport>> = handles.into_iter().flatten().collect();
        let control = readers.next().ok_or(ChannelError::ChannelCount(0))?;
        let pending: Vec<_> = readers.collect();
        let replies = handles[0]
            .try_clone_transport()
            .map_err(io_call(0, "dup"))?;
        let data = pending.len();
        Ok(Receiver {
            control,
            pending,
            workers: Vec::new(),
            shared: Arc::new(Shared {
                progress: Mutex::new(Progress {
                    barrier: vec![0; data],
                    ended: vec![false; data],
                    error: None,
                    failed: false,
                    reported: false,
                    activity: 0,
                    stats: PageStats::default(),
                }),
                changed: Condvar::new(),
                replies: Mutex::new(StreamWriter::new(replies, opts.limits)),
                handles,
                stopping: AtomicBool::new(false),
            }),
            dest: None,
            opts,
            session: session.unwrap_or(0),
            last_round: 0,
            control_stats: PageStats::default(),
            failed: false,
        })
    }

    /// The transfer's session id, from the stream headers.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.shared.handles.len()
    }

    /// Page bytes and messages applied so far, on all channels.
    pub fn stats(&self) -> PageStats {
        let mut s = lock(&self.shared.progress).stats;
        s += self.control_stats;
        s
    }

    /// Reads the Start message, which must come first on channel 0.
    pub fn recv_start(&mut self) -> Result<StartInfo, ChannelError> {
        self.guarded(|r| match r.control.next_message().map_err(proto(0))? {
            Message::Start(start) => Ok(start),
            Message::Abandon { reason } => Err(ChannelError::Abandoned(reason.to_owned())),
            other => Err(ChannelError::Unexpected {
                channel: 0,
                got: other.kind(),
                when: "expecting Start",
            }),
        })
    }

    /// Starts applying pages to `dest`: one thread per data channel. Call after
    /// [`Self::recv_start`], once guest memory for its layout exists.
    pub fn start_applying(&mut self, dest: Arc<dyn GuestMemoryWriter>) -> Result<(), ChannelError> {
        self.guarded(|r| {
            let layout = r
                .control
                .layout()
                .cloned()
                .ok_or(ChannelError::NotStarted)?;
            for (ch, mut reader) in (1u16..).zip(r.pending.drain(..)) {
                reader.set_layout(layout.clone());
                let shared = Arc::clone(&r.shared);
                let dest = Arc::clone(&dest);
                let h = thread::Builder::new()
                    .name(format!("mig-rx-{ch}"))
                    .spawn(move || data_channel(ch, reader, dest, shared))
                    .map_err(ChannelError::Spawn)?;
                r.workers.push(h);
            }
            r.dest = Some(dest);
            Ok(())
        })
    }

    /// Reads channel 0 up to the next event, applying the pages that come on it on the way.
    pub fn next_event(&mut self) -> Result<Event, ChannelError> {
        self.guarded(Self::event_inner)
    }

    /// Answers the source's Complete.
    pub fn ack(&mut self) -> Result<(), ChannelError> {
        self.guarded(|r| {
            let mut w = lock(&r.shared.replies);
            w.write_message(&Message::Ack).map_err(proto(0))?;
            w.flush().map_err(proto(0))
        })
    }

    /// Refuses the transfer (state that does not load, say): sends Error to the source and
    /// shuts every channel down.
    pub fn reject(&mut self, message: &str) {
        if !self.failed {
            self.failed = true;
            let _ = self.shared.fail(ChannelError::Remote(message.to_owned()));
        }
    }

    /// Runs `f` unless the transfer already failed. On error, fails the whole transfer and
    /// returns the root cause (a data channel's error rather than the closed channel 0 it
    /// caused).
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ChannelError>,
    ) -> Result<T, ChannelError> {
        if self.failed {
            return Err(ChannelError::AlreadyFailed);
        }
        match f(self) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.failed = true;
                // If a data channel failed first, its error is the cause; if `e` is that error
                // (already taken out by wait_barrier), it comes back from `fail`.
                let unrecorded = self.shared.fail(e);
                self.shared
                    .wait_reported(self.opts.io_timeout + Duration::from_secs(1));
                Err(self
                    .shared
                    .take_error()
                    .or(unrecorded)
                    .unwrap_or(ChannelError::AlreadyFailed))
            }
        }
    }

    fn event_inner(&mut self) -> Result<Event, ChannelError> {
        let idle_since = Instant::now();
        loop {
            if let Some(e) = self.shared.take_error() {
                return Err(e);
            }
            let msg = match self.control.next_message() {
                Err(ProtocolError::Idle) if idle_since.elapsed() < self.opts.idle_timeout => {
                    continue
                }
                Err(ProtocolError::Idle) => return Err(ChannelError::Idle(idle_since.elapsed())),
                other => other.map_err(proto(0))?,
            };
            match msg {
                Message::MemoryPages { .. } | Message::MemoryZero { .. } => {
                    let dest = self.dest.as_deref().ok_or(ChannelError::NotStarted)?;
                    self.control_stats += memory::apply(&msg, dest)
                        .map_err(|source| ChannelError::Memory { channel: 0, source })?;
                }
                Message::Barrier { round } => {
                    if round <= self.last_round {
                        return Err(ChannelError::RoundOrder {
                            channel: 0,
                            round,
                            last: self.last_round,
                        });
                    }
                    self.last_round = round;
                    wait_barrier(&self.shared, round, self.opts.io_timeout)?;
                    return Ok(Event::RoundDone { round });
                }
                Message::State { blob } => return Ok(Event::State(blob.to_vec())),
                Message::Complete => return Ok(Event::Complete),
                Message::Abandon { reason } => return Ok(Event::Abandoned(reason.to_owned())),
                other @ (Message::Start(_) | Message::Ack | Message::Error { .. }) => {
                    return Err(ChannelError::Unexpected {
                        channel: 0,
                        got: other.kind(),
                        when: "during the transfer",
                    })
                }
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for h in &self.shared.handles {
            let _ = h.shutdown(Shutdown::Both);
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Waits until every data channel has passed the barrier of `round`. Fails if a channel
/// fails or ends first, or if none of them handles a message for twice the I/O timeout
/// (each read is bounded by it, so only a peer that trickles bytes gets that far).
fn wait_barrier(shared: &Shared, round: u64, io_timeout: Duration) -> Result<(), ChannelError> {
    let stall = io_timeout.saturating_mul(2);
    let mut p = lock(&shared.progress);
    let mut seen = p.activity;
    let mut since = Instant::now();
    loop {
        if p.failed {
            return Err(p.error.take().unwrap_or(ChannelError::AlreadyFailed));
        }
        let mut waiting = false;
        for (i, (&b, &ended)) in p.barrier.iter().zip(&p.ended).enumerate() {
            if b < round {
                if ended {
                    return Err(ChannelError::ChannelEnded {
                        channel: i as u16 + 1,
                        round,
                    });
                }
                waiting = true;
            }
        }
        if !waiting {
            return Ok(());
        }
        if p.activity != seen {
            seen = p.activity;
            since = Instant::now();
        } else if since.elapsed() >= stall {
            return Err(ChannelError::Stalled(stall));
        }
        let left = stall.saturating_sub(since.elapsed());
        p = shared
            .changed
            .wait_timeout(p, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// A data channel's thread: applies pages, records barriers, until its stream ends or fails.
fn data_channel(
    ch: u16,
    mut reader: StreamReader<Box<dyn Transport>>,
    dest: Arc<dyn GuestMemoryWriter>,
    shared: Arc<Shared>,
) {
    let idx = usize::from(ch) - 1;
    loop {
        let step = match reader.next_message() {
            Ok(msg @ (Message::MemoryPages { .. } | Message::MemoryZero { .. })) => {
                memory::apply(&msg, &*dest)
                    .map(|st| {
                        let mut p = lock(&shared.progress);
                        p.stats += st;
                        p.activity += 1;
                    })
                    .map_err(|source| ChannelError::Memory {
                        channel: ch,
                        source,
                    })
            }
            Ok(Message::Barrier { round }) => {
                let mut p = lock(&shared.progress);
                let last = p.barrier[idx];
                if round <= last {
                    Err(ChannelError::RoundOrder {
                        channel: ch,
                        round,
                        last,
                    })
                } else {
                    p.barrier[idx] = round;
                    p.activity += 1;
                    drop(p);
                    shared.changed.notify_all();
                    Ok(())
                }
            }
            Ok(other) => Err(ChannelError::Unexpected {
                channel: ch,
                got: other.kind(),
                when: "on a data channel",
            }),
            // Quiet between rounds or checkpoints: wait on, unless the transfer is over. A
            // channel that owes a barrier and stays quiet is wait_barrier's to catch.
            Err(ProtocolError::Idle) => {
                if shared.stopping.load(Ordering::Relaxed) || lock(&shared.progress).failed {
                    return;
                }
                Ok(())
            }
            Err(ProtocolError::Closed) => {
                // The end between two messages is an error only if a barrier is still owed,
                // which wait_barrier decides.
                lock(&shared.progress).ended[idx] = true;
                shared.changed.notify_all();
                return;
            }
            Err(source) => Err(ChannelError::Protocol {
                channel: ch,
                source,
            }),
        };
        if let Err(e) = step {
            let _ = shared.fail(e);
            return;
        }
    }
}
