//! The server's threads: one acceptor and a fixed pool of workers, fed through a bounded
//! queue, so neither thread count nor memory grows with the number of clients.
//!
//! Each worker serves one connection at a time: read one request (bounded size and time),
//! answer it, close. A full queue is answered 503 by the acceptor without waiting.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::dispatch::dispatch;
use super::request::{error_response, read_request, Limits};
use super::response::{send_all, Response};
use super::socket::{self, FileId};
use super::HttpError;
use crate::ApiSender;

/// How long a client may take to read its reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After replying, how long to drain what the client still sends (see [`linger_close`]).
const LINGER_TIME: Duration = Duration::from_millis(500);
/// ... and how many bytes at most.
const LINGER_BYTES: usize = 2 << 20;

/// Tuning for [`start_http_server_with`](super::start_http_server_with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    /// Size and time bounds on each request.
    pub limits: Limits,
    /// Worker threads (connections served at once).
    pub workers: usize,
    /// Accepted connections waiting for a worker before new ones get 503.
    pub max_pending: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            workers: 4,
            max_pending: 64,
        }
    }
}

/// What the threads share with the handle.
struct Shared {
    stopping: AtomicBool,
    stop_evt: EventFd,
    /// The connection each worker is serving, so stopping can cut it short.
    active: Mutex<Vec<Option<UnixStream>>>,
}

impl Shared {
    fn active(&self) -> MutexGuard<'_, Vec<Option<UnixStream>>> {
        // A poisoned lock only means a thread panicked while holding it; the slots are still
        // meaningful, and the server must keep going.
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running API server; [`HttpServer::stop`] or dropping it shuts it down.
pub struct HttpServer {
    path: PathBuf,
    file_id: Option<FileId>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpServer {
    /// The socket it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks the threads to stop, without waiting: no new connections are served and the ones
    /// in progress are cut off, except a request already handed to the control loop, whose
    /// reply is still awaited.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.stop_evt.write(1) {
            log::warn!("waking the API acceptor: {e}");
        }
        for stream in self.shared.active().iter().flatten() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Stops, waits for every thread, and removes the socket file.
    ///
    /// A worker waiting on the control loop holds this up until the loop answers, or until
    /// [`CONTROL_LOOP_TIMEOUT`](crate::CONTROL_LOOP_TIMEOUT): drop the `ApiReceiver` first
    /// (that fails pending calls at once) when stopping from the control loop itself.
    pub fn join(self) {
        // Drop does the work, so join and drop cannot disagree.
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("an API server thread panicked");
            }
        }
        socket::remove_if_ours(&self.path, self.file_id);
    }
}

/// Binds `path` and starts the threads.
pub fn start(
    path: &Path,
    sender: ApiSender,
    options: HttpOptions,
    init: Option<super::ThreadInit>,
) -> Result<HttpServer, HttpError> {
    let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(HttpError::EventFd)?;
    let (listener, file_id) = socket::bind(path)?;
    let workers = options.workers.max(1);
    let shared = Arc::new(Shared {
        stopping: AtomicBool::new(false),
        stop_evt,
        active: Mutex::new((0..workers).map(|_| None).collect()),
    });
    // From here on, dropping `server` stops and joins whatever was started.
    let mut server = HttpServer {
        path: path.to_path_buf(),
        file_id,
        shared: Arc::clone(&shared),
        threads: Vec::with_capacity(workers + 1),
    };
    let (queue_tx, queue_rx) = sync_channel::<UnixStream>(options.max_pending.max(1));
    let queue_rx = Arc::new(Mutex::new(queue_rx));
    let sender = Arc::new(sender);
    for slot in 0..workers {
        let worker = Worker {
            slot,
            shared: Arc::clone(&shared),
            queue: Arc::clone(&queue_rx),
            sender: Arc::clone(&sender),
            limits: options.limits,
        };
        let init = init.clone();
        let t = std::thread::Builder::new()
            .name(format!("api-http-{slot}"))
            .spawn(move || {
                if let Some(init) = init {
                    init();
                }
                worker.run()
            })
            .map_err(HttpError::Spawn)?;
        server.threads.push(t);
    }
    let acceptor = Acceptor {
        listener,
        shared,
        queue: queue_tx,
    };
    let t = std::thread::Builder::new()
        .name("api-http-accept".into())
        .spawn(move || {
            if let Some(init) = init {
                init();
            }
            acceptor.run()
        })
        .map_err(HttpError::Spawn)?;
    server.threads.push(t);
    Ok(server)
}

/// Accepts connections and queues them for the workers.
struct Acceptor {
    listener: UnixListener,
    shared: Arc<Shared>,
    queue: SyncSender<UnixStream>,
}

impl Acceptor {
    fn run(self) {
        while !self.shared.stopping.load(Ordering::SeqCst) {
            if !self.wait_readable() {
                continue;
            }
            if !self.accept_all() {
                return;
            }
        }
    }

    /// Blocks until a client connects or stop is asked; false on a poll error.
    fn wait_readable(&self) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.stop_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd and the count passed matches it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log::warn!("API server poll: {e}");
                // Do not spin if the error persists.
                std::thread::sleep(Duration::from_millis(50));
            }
            return false;
        }
        true
    }

    /// Accepts until none are waiting; false once the workers are gone.
    fn accept_all(&self) -> bool {
        loop {
            if self.shared.stopping.load(Ordering::SeqCst) {
                return true;
            }
            match self.listener.accept() {
                Ok((stream, _)) => match self.queue.try_send(stream) {
                    Ok(()) => {}
                    Err(TrySendError::Full(stream)) => reject_busy(&stream),
                    Err(TrySendError::Disconnected(_)) => return false,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the listener stays readable, so back off rather
                    // than spin; the client waits in the backlog.
                    log::warn!("API server accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    return true;
                }
            }
        }
    }
}

/// Answers 503 on the acceptor thread without ever blocking it (a fresh socket's send buffer
/// takes a small reply whole; if not, the client simply gets nothing).
fn reject_busy(stream: &UnixStream) {
    let _ = stream.set_nonblocking(true);
    let reply = Response::error_msg(503, "the API server is busy; retry shortly").to_bytes();
    let _ = send_all(stream, &reply);
}

/// Serves queued connections one at a time.
struct Worker {
    slot: usize,
    shared: Arc<Shared>,
    queue: Arc<Mutex<Receiver<UnixStream>>>,
    sender: Arc<ApiSender>,
    limits: Limits,
}

impl Worker {
    fn run(self) {
        loop {
            let next = self
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv();
            // Err: the acceptor has exited and the queue is empty.
            let Ok(stream) = next else { return };
            if self.register(&stream) {
                // Once the request goes to the control loop its reply is owed: `stop` must not
                // cut the connection (vmm.shutdown's own reply would be lost).
                serve(&stream, &self.sender, &self.limits, || self.unregister());
            }
            self.unregister();
        }
    }

    /// Records the connection so `stop` can cut it; false if stopping already (then the
    /// connection is just closed).
    fn register(&self, stream: &UnixStream) -> bool {
        let clone = stream.try_clone().ok();
        if let Some(slot) = self.shared.active().get_mut(self.slot) {
            *slot = clone;
        }
        // Checked after registering: either `stop` sees the slot or we see the flag.
        !self.shared.stopping.load(Ordering::SeqCst)
    }

    fn unregister(&self) {
        if let Some(slot) = self.shared.active().get_mut(self.slot) {
            *slot = None;
        }
    }
}

/// One connection: one request, one reply, close.
fn serve(stream: &UnixStream, sender: &ApiSender, limits: &Limits, dispatching: impl FnOnce()) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let (response, head_only) = match read_request(stream, limits) {
        Ok(req) => {
            dispatching();
            (dispatch(&req, sender), req.method == "HEAD")
        }
        Err(e) => {
            log::debug!("API request refused: {e}");
            (error_response(&e), false)
        }
    };
    let bytes = if head_only {
        response.to_head_bytes()
    } else {
        response.to_bytes()
    };
    if let Err(e) = send_all(stream, &bytes) {
        log::debug!("API client went away before its reply: {e}");
    }
    linger_close(stream);
}

/// Half-closes, then reads and discards what the client still sends for a short while.
///
/// Why: closing a socket with unread input makes the peer's next read fail with
/// ECONNRESET instead of EOF, and a client still writing (an oversized body, pipelined
/// requests) gets EPIPE before it looks at the reply explaining why. Bounded in time and
/// bytes so a client cannot keep the worker.
fn linger_close(stream: &UnixStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 8192];
    let mut drained = 0usize;
    let mut reader = stream;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || reader.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
