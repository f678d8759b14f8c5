//! The proxy at run time: the [`session`](super::session) state machines wired to a NIC's
//! filter slot, the proxy channel's connection and the checkpoint workers.
//!
//! Each side owns one connection to the other (opened right after the checkpoint channels,
//! authenticated with the same key, purpose [`wire::PURPOSE`]) and three threads: a reader (the
//! peer's frames into the proxy), a writer (an [`Outbox`] queue onto the socket, so a filter on a
//! NIC's worker thread never blocks on the network) and a ticker (the compare's timeouts, and
//! packets the device's injection queue had no room for yet). The filter itself runs on the NIC's
//! worker thread. All of them share the side's proxy under one mutex; the frames a proxy releases
//! are injected under that mutex, so they reach the tap (or the guest) in the proxy's order.

mod primary;
mod secondary;

pub use primary::PrimaryLink;
pub use secondary::SecondaryLink;

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::virtio::net::{Direction, InjectError, Injector, Packet};
use serde::Serialize;

use super::packet::{ConnKey, KeyDir};
use super::session::{PrimaryCounters, SecondaryCounters};
use super::wire::{self, FrameReader, FrameWriter, Message, WireError};
use crate::auth::{Psk, Side};
use crate::wire::Channel;

/// Frames waiting for the writer, at most: beyond, mirrored and SVM frames are dropped (and
/// counted) rather than stalling a NIC; TCP resends them, the compare notices.
pub const OUTBOX_LEN: usize = 8192;
/// Packets waiting for room in a device's injection queue, at most.
pub const BACKLOG_LEN: usize = 16_384;
/// How often the reader and the writer look at the closed flag; the ticker's period.
const POLL: Duration = Duration::from_millis(20);

/// Errors setting up a data channel (the proxy's, or the disk channel through
/// [`crate::block::link`]); the caller says which channel.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting, accepting or configuring the socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The handshake or the hellos failed.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// No connection came.
    #[error("the primary did not connect within {0:?}")]
    NoPeer(Duration),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The VM has more NICs than the proxy handles.
    #[error("COLO protects at most one NIC; this VM has {0}")]
    TooManyNics(usize),
    /// The NIC's filter slot is in use.
    #[error("the NIC's filter slot is in use: {0}")]
    SlotTaken(String),
}

/// What the proxy channel did, for the status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkCounters {
    /// Frames written to the peer.
    pub frames_sent: u64,
    /// Frames read from the peer.
    pub frames_received: u64,
    /// Packets dropped because the writer's queue was full.
    pub outbox_dropped: u64,
    /// Packets waiting for room in the NIC's injection queue now.
    pub backlog: usize,
    /// Packets dropped because that backlog was full, or the NIC was gone.
    pub inject_dropped: u64,
    /// Why the channel broke, if it did.
    pub broken: Option<String>,
}

/// The proxy's part of `vm.colo-status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStatus {
    /// The protected NIC's tap, if the VM has one.
    pub nic: Option<String>,
    /// The primary's compare, rewriter and epochs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<PrimaryCounters>,
    /// The secondary's mirror and rewriting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary: Option<SecondaryCounters>,
    /// The last difference (or timeout) that asked for a checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_divergence: Option<String>,
    /// The channel between the hosts.
    pub link: LinkCounters,
}

/// Counters the threads share (the disk channel's too, whose NIC counters stay 0).
#[derive(Default)]
pub(crate) struct LinkStats {
    pub(crate) sent: AtomicU64,
    received: AtomicU64,
    outbox_dropped: AtomicU64,
    inject_dropped: AtomicU64,
    broken: std::sync::Mutex<Option<String>>,
}

impl LinkStats {
    pub(crate) fn counters(&self, backlog: usize) -> LinkCounters {
        LinkCounters {
            frames_sent: self.sent.load(Ordering::Relaxed),
            frames_received: self.received.load(Ordering::Relaxed),
            outbox_dropped: self.outbox_dropped.load(Ordering::Relaxed),
            backlog,
            inject_dropped: self.inject_dropped.load(Ordering::Relaxed),
            broken: self
                .broken
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

/// A message queued for the writer thread (owned: the wire's messages borrow).
enum Outgoing {
    Mirror(Vec<u8>),
    SvmOutput(Vec<u8>),
    Offset {
        key: ConnKey,
        guest_dir: KeyDir,
        offset: u32,
        epoch: u64,
    },
    Epoch(u64),
    /// Nothing to send: the channel closed, the writer should look.
    Wake,
}

/// The writer thread's queue.
#[derive(Clone)]
struct Outbox {
    tx: SyncSender<Outgoing>,
    stats: Arc<LinkStats>,
}

impl Outbox {
    /// Queues a packet, or drops it (counted) when the writer is behind: a NIC never waits.
    fn packet(&self, o: Outgoing) {
        match self.tx.try_send(o) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.outbox_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues a message the protocol cannot lose (an epoch marker), waiting for room; fails
    /// only once the writer is gone (its socket writes are bounded by their timeout).
    fn control(&self, o: Outgoing) -> Result<(), String> {
        self.tx
            .send(o)
            .map_err(|_| "the proxy channel is closed".to_string())
    }
}

/// Packets released towards one side of a NIC, in order, past a full injection queue.
struct Backlog {
    dir: Direction,
    frames: VecDeque<Packet>,
}

impl Backlog {
    fn new(dir: Direction) -> Self {
        Backlog {
            dir,
            frames: VecDeque::new(),
        }
    }

    /// Injects `frame` after those waiting already.
    fn push(&mut self, injector: Option<&Injector>, frame: Vec<u8>, stats: &LinkStats) {
        let Ok(pkt) = Packet::new(frame) else {
            stats.inject_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.frames.is_empty() {
            if let Some(inj) = injector {
                match inj.inject(self.dir, pkt) {
                    Ok(()) => return,
                    Err(InjectError::Full(_, p)) => {
                        self.frames.push_back(p);
                        return;
                    }
                    Err(InjectError::Closed(..)) => {}
                }
            }
            stats.inject_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.frames.len() >= BACKLOG_LEN {
            stats.inject_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.frames.push_back(pkt);
    }

    /// Injects what waits, until the queue is full again.
    fn flush(&mut self, injector: Option<&Injector>, stats: &LinkStats) {
        let Some(inj) = injector else {
            let n = self.frames.len() as u64;
            self.frames.clear();
            stats.inject_dropped.fetch_add(n, Ordering::Relaxed);
            return;
        };
        while let Some(p) = self.frames.pop_front() {
            match inj.inject(self.dir, p) {
                Ok(()) => {}
                Err(InjectError::Full(_, p)) => {
                    self.frames.push_front(p);
                    return;
                }
                Err(InjectError::Closed(..)) => {
                    let n = self.frames.len() as u64 + 1;
                    self.frames.clear();
                    stats.inject_dropped.fetch_add(n, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Called once if the channel breaks while open (not after [`Conn::close`]).
pub type OnBroken = Arc<dyn Fn(String) + Send + Sync>;

/// One side's connection of a data channel: the socket (to shut it down) and the threads'
/// common flags.
pub(crate) struct Conn {
    stream: TcpStream,
    closed: AtomicBool,
    broke: AtomicBool,
    pub(crate) stats: Arc<LinkStats>,
    on_broken: OnBroken,
}

impl Conn {
    /// A channel over `stream`, with fresh counters.
    pub(crate) fn new(stream: TcpStream, on_broken: OnBroken) -> Arc<Conn> {
        Arc::new(Conn {
            stream,
            closed: AtomicBool::new(false),
            broke: AtomicBool::new(false),
            stats: Arc::new(LinkStats::default()),
            on_broken,
        })
    }

    /// Marks the channel broken once, unless it was closed on purpose.
    pub(crate) fn broken(&self, why: String) {
        if self.closed.load(Ordering::Acquire) || self.broke.swap(true, Ordering::AcqRel) {
            return;
        }
        log::warn!("COLO proxy: {why}");
        *self
            .stats
            .broken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why.clone());
        (self.on_broken)(why);
    }

    /// Stops the threads: reads and writes fail at once.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A second handle on the socket (for the failover switch to shut down).
    pub(crate) fn socket(&self) -> std::io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Why the channel broke, if it did.
    pub(crate) fn broken_reason(&self) -> Option<String> {
        self.stats
            .broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the channel broke or was closed: nothing more will cross it.
    pub(crate) fn is_down(&self) -> bool {
        self.is_closed() || self.broke.load(Ordering::Acquire)
    }
}

/// An authenticated connection past the hellos.
pub(crate) struct Opened {
    pub(crate) reader: FrameReader<BufReader<TcpStream>>,
    pub(crate) writer: FrameWriter<BufWriter<TcpStream>>,
    pub(crate) stream: TcpStream,
}

/// Bytes each side buffers per direction: a burst of frames leaves in a few writes and
/// arrives in a few reads.
const STREAM_BUFFER: usize = 256 << 10;

/// Connects to the secondary's listener and authenticates as the primary on `channel`.
pub(crate) fn connect(
    addr: SocketAddr,
    psk: &Psk,
    timeout: Duration,
    channel: Channel,
) -> Result<Opened, LinkError> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    open(stream, psk, Side::Primary, timeout, channel)
}

/// Takes the primary's connection of `channel` from `listener` (the next one within
/// `timeout`).
pub(crate) fn accept(
    listener: &TcpListener,
    psk: &Psk,
    timeout: Duration,
    channel: Channel,
) -> Result<Opened, LinkError> {
    migration::transport::wait_for_connection(listener.as_raw_fd(), timeout)
        .map_err(|_| LinkError::NoPeer(timeout))?;
    let (stream, _) = listener.accept()?;
    open(stream, psk, Side::Secondary, timeout, channel)
}

fn open(
    mut stream: TcpStream,
    psk: &Psk,
    side: Side,
    timeout: Duration,
    channel: Channel,
) -> Result<Opened, LinkError> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let key = wire::handshake_on(&mut stream, psk, side, channel)?;
    let (reader, writer) = wire::open_on(
        BufReader::with_capacity(STREAM_BUFFER, stream.try_clone()?),
        BufWriter::with_capacity(STREAM_BUFFER, stream.try_clone()?),
        key,
        side,
        channel,
    )?;
    // From now on reads poll the closed flag; writes keep their bound.
    stream.set_read_timeout(Some(POLL * 10))?;
    Ok(Opened {
        reader,
        writer,
        stream,
    })
}

/// Starts the writer thread; returns its queue. Frames queued together leave in one write:
/// the stream is flushed whenever the queue runs dry.
fn spawn_writer(
    name: &str,
    mut writer: FrameWriter<BufWriter<TcpStream>>,
    chan: Arc<Conn>,
) -> Result<(Outbox, JoinHandle<()>), LinkError> {
    let (tx, rx): (SyncSender<Outgoing>, Receiver<Outgoing>) = sync_channel(OUTBOX_LEN);
    let outbox = Outbox {
        tx,
        stats: chan.stats.clone(),
    };
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            let mut next = match rx.recv_timeout(POLL * 5) {
                Ok(_) if chan.is_closed() => return,
                Ok(o) => Some(o),
                Err(RecvTimeoutError::Timeout) if !chan.is_closed() => continue,
                Err(_) => return,
            };
            while let Some(o) = next.take() {
                if let Err(e) = send(&mut writer, &o) {
                    chan.broken(format!("sending to the peer: {e}"));
                    return;
                }
                if !matches!(o, Outgoing::Wake) {
                    chan.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                next = rx.try_recv().ok();
            }
            if let Err(e) = writer.flush() {
                chan.broken(format!("sending to the peer: {e}"));
                return;
            }
        })
        .map_err(LinkError::Thread)?;
    Ok((outbox, handle))
}

/// Queues `o` on the stream (nothing for a wake-up).
fn send(writer: &mut FrameWriter<BufWriter<TcpStream>>, o: &Outgoing) -> Result<(), WireError> {
    let msg = match o {
        Outgoing::Mirror(f) => Message::Mirror { frame: f },
        Outgoing::SvmOutput(f) => Message::SvmOutput { frame: f },
        Outgoing::Offset {
            key,
            guest_dir,
            offset,
            epoch,
        } => Message::IsnOffset {
            key: *key,
            guest_dir: *guest_dir,
            offset: *offset,
            checkpoint: *epoch,
        },
        Outgoing::Epoch(n) => Message::Epoch { checkpoint: *n },
        Outgoing::Wake => return Ok(()),
    };
    writer.queue(&msg)
}

/// Starts the reader thread: `handle` gets every frame after the hellos; a `Bye` or an error
/// ends it.
pub(crate) fn spawn_reader(
    name: &str,
    mut reader: FrameReader<BufReader<TcpStream>>,
    chan: Arc<Conn>,
    mut handle: impl FnMut(Message<'_>) -> Result<(), String> + Send + 'static,
) -> Result<JoinHandle<()>, LinkError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            match reader.read() {
                Ok(Message::Bye { reason }) => {
                    // Nothing more will come: a peer that ends the channel while this side
                    // still uses it ends protection (ignored once this side closed it).
                    chan.broken(format!("the peer ended the channel: {reason}"));
                    return;
                }
                Ok(msg) => {
                    chan.stats.received.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = handle(msg) {
                        chan.broken(e);
                        return;
                    }
                }
                Err(e) if e.is_timeout() && !chan.is_closed() => {}
                Err(e) => {
                    chan.broken(format!("reading from the peer: {e}"));
                    return;
                }
            }
        })
        .map_err(LinkError::Thread)
}

/// Starts the ticker thread: `tick` runs every [`POLL`] until the channel closes.
fn spawn_ticker(
    name: &str,
    chan: Arc<Conn>,
    mut tick: impl FnMut() + Send + 'static,
) -> Result<JoinHandle<()>, LinkError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while !chan.is_closed() {
                std::thread::sleep(POLL);
                tick();
            }
        })
        .map_err(LinkError::Thread)
}

/// A side's channel and the threads serving it.
struct Threads {
    chan: Arc<Conn>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Threads {
    fn new(chan: Arc<Conn>) -> Self {
        Threads {
            chan,
            handles: Mutex::new(Vec::new()),
        }
    }

    /// Keeps a thread that started; one that did not ends protection (without its reader or
    /// ticker the proxy would hold every frame until the next checkpoint).
    fn keep(&self, h: Result<JoinHandle<()>, LinkError>) {
        match h {
            Ok(h) => self
                .handles
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(h),
            Err(e) => self.chan.broken(e.to_string()),
        }
    }

    /// A second handle on the socket.
    fn socket(&self) -> std::io::Result<TcpStream> {
        self.chan.stream.try_clone()
    }

    /// Closes the channel and joins the threads (the writer at once, the others within a poll
    /// period).
    fn close(&self, outbox: &Outbox) {
        self.chan.close();
        // A full queue means the writer is busy and sees the flag after its current frame.
        let _ = outbox.tx.try_send(Outgoing::Wake);
        let handles =
            std::mem::take(&mut *self.handles.lock().unwrap_or_else(PoisonError::into_inner));
        for h in handles {
            if h.join().is_err() {
                log::error!("COLO proxy: a thread panicked");
            }
        }
    }
}
