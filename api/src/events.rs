//! The event monitor (`--event-monitor path=FILE|fd=N`): one JSON object per line,
//!
//! ```text
//! {"timestamp":1718000000.123456,"source":"vm","event":"booted","properties":{}}
//! ```
//!
//! `timestamp` is seconds since the UNIX epoch as an f64 (microsecond precision). Why not
//! RFC 3339: a number sorts, subtracts and plots as-is in jq, Python or a spreadsheet, and
//! needs no date library here or in the reader. `properties` is always an object.
//!
//! [`EventMonitor::emit`] serialises on the caller's thread and hands the line to a writer
//! thread through a bounded queue, so a slow or stuck reader (a FIFO nobody drains) never
//! stalls a vCPU or the control loop: when the queue is full the event is dropped and
//! counted. Write errors are logged once and never reach the caller.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Events waiting for the writer before new ones are dropped.
pub const QUEUE_LEN: usize = 1024;

/// A bad `--event-monitor` option, or a sink that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum EventMonitorError {
    /// Neither `path=FILE` nor `fd=N`.
    #[error("--event-monitor: expected path=FILE or fd=N, got '{0}'")]
    Syntax(String),
    /// `fd=` with something other than a descriptor number.
    #[error("--event-monitor: '{0}' is not a file descriptor number")]
    BadFd(String),
    /// The file could not be opened.
    #[error("--event-monitor: cannot open {path:?}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The descriptor is not open.
    #[error("--event-monitor: fd {fd} is not usable")]
    Dup {
        /// The descriptor.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The descriptor is open read-only.
    #[error("--event-monitor: fd {0} is not open for writing")]
    NotWritable(RawFd),
    /// The writer thread could not be started.
    #[error("--event-monitor: starting the writer thread")]
    Spawn(#[source] io::Error),
}

/// Where events go, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventMonitorConfig {
    /// A file (created if missing, appended to) or a FIFO.
    Path(PathBuf),
    /// An inherited descriptor (duplicated; the original is left alone).
    Fd(RawFd),
}

impl EventMonitorConfig {
    /// Parses `path=FILE` or `fd=N`.
    pub fn parse(s: &str) -> Result<Self, EventMonitorError> {
        match s.split_once('=') {
            Some(("path", p)) if !p.is_empty() => Ok(Self::Path(p.into())),
            Some(("fd", n)) => n
                .parse::<RawFd>()
                .ok()
                .filter(|n| *n >= 0)
                .map(Self::Fd)
                .ok_or_else(|| EventMonitorError::BadFd(n.to_string())),
            _ => Err(EventMonitorError::Syntax(s.to_string())),
        }
    }
}

/// One line of output; field order is the documented one.
#[derive(Serialize)]
struct Event<'a> {
    timestamp: f64,
    source: &'a str,
    event: &'a str,
    properties: &'a serde_json::Value,
}

enum Msg {
    Line(String),
    Flush(SyncSender<()>),
}

/// Problems already reported, so each is logged once.
#[derive(Default)]
struct Reported {
    full: AtomicBool,
    gone: AtomicBool,
    encode: AtomicBool,
    dropped: AtomicU64,
}

impl Reported {
    fn once(flag: &AtomicBool, msg: impl FnOnce() -> String) {
        if !flag.swap(true, Ordering::Relaxed) {
            log::warn!("event monitor: {}", msg());
        }
    }
}

/// A cloneable, thread-safe handle for emitting events; cheap to clone.
#[derive(Clone)]
pub struct EventMonitor {
    tx: Option<SyncSender<Msg>>,
    reported: Arc<Reported>,
}

impl EventMonitor {
    /// A monitor that discards everything (no `--event-monitor`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            reported: Arc::default(),
        }
    }

    /// Opens the sink `config` names and starts the writer thread.
    ///
    /// A FIFO path blocks here until a reader opens it, as with Cloud Hypervisor.
    pub fn open(config: &EventMonitorConfig) -> Result<Self, EventMonitorError> {
        let file = match config {
            EventMonitorConfig::Path(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| EventMonitorError::Open {
                    path: path.clone(),
                    source,
                })?,
            EventMonitorConfig::Fd(fd) => dup_writable(*fd)?,
        };
        Self::from_writer(file)
    }

    /// Starts a monitor writing to any sink (tests, or a caller's own pipe).
    pub fn from_writer(sink: impl Write + Send + 'static) -> Result<Self, EventMonitorError> {
        let (tx, rx) = sync_channel(QUEUE_LEN);
        let reported = Arc::new(Reported::default());
        let writer_reported = Arc::clone(&reported);
        // Detached: it exits when the last handle is dropped; `flush` is how a caller makes
        // sure everything is written.
        std::thread::Builder::new()
            .name("event-monitor".into())
            .spawn(move || write_loop(rx, sink, &writer_reported))
            .map_err(EventMonitorError::Spawn)?;
        Ok(Self {
            tx: Some(tx),
            reported,
        })
    }

    /// Whether events go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Records `event` from `source` (`"vm"`, `"vmm"`, `"virtio-blk"`...); `properties`
    /// should be an object (`Null` becomes `{}`, anything else `{"value": ...}`). Never
    /// blocks on I/O and never fails.
    pub fn emit(&self, source: &str, event: &str, properties: serde_json::Value) {
        let Some(tx) = &self.tx else { return };
        let properties = match properties {
            serde_json::Value::Object(_) => properties,
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            other => serde_json::json!({ "value": other }),
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let ev = Event {
            timestamp,
            source,
            event,
            properties: &properties,
        };
        let mut line = match serde_json::to_string(&ev) {
            Ok(l) => l,
            Err(e) => {
                Reported::once(&self.reported.encode, || {
                    format!("cannot encode an event: {e}")
                });
                return;
            }
        };
        line.push('\n');
        match tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.reported.dropped.fetch_add(1, Ordering::Relaxed);
                Reported::once(&self.reported.full, || {
                    "the sink is not keeping up; dropping events".into()
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                Reported::once(&self.reported.gone, || "the writer thread is gone".into());
            }
        }
    }

    /// Waits up to `timeout` until every event emitted so far is written; false if it could
    /// not be confirmed (sink stuck, or queue full).
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let (done_tx, done_rx) = sync_channel(1);
        if tx.try_send(Msg::Flush(done_tx)).is_err() {
            return false;
        }
        done_rx.recv_timeout(timeout).is_ok()
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.reported.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: one `write` per line, so lines from one process never interleave.
fn write_loop(rx: Receiver<Msg>, mut sink: impl Write, reported: &Reported) {
    let io_failed = AtomicBool::new(false);
    for msg in rx {
        match msg {
            Msg::Line(line) => {
                if let Err(e) = sink.write_all(line.as_bytes()).and_then(|()| sink.flush()) {
                    Reported::once(&io_failed, || format!("writing an event failed: {e}"));
                }
            }
            Msg::Flush(done) => {
                let _ = sink.flush();
                let _ = done.send(());
            }
        }
    }
    let dropped = reported.dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        log::warn!("event monitor: {dropped} events were dropped");
    }
}

/// Duplicates an inherited descriptor, checking it is open for writing.
fn dup_writable(fd: RawFd) -> Result<File, EventMonitorError> {
    // SAFETY: F_GETFL reads flags of a descriptor number; an unopened one yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(EventMonitorError::Dup {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    if flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(EventMonitorError::NotWritable(fd));
    }
    // Why duplicate: the number stays the caller's (it may be stdout), and ours gets
    // close-on-exec so device helpers we spawn do not inherit it.
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor or fails; the result is checked.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(EventMonitorError::Dup {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `new` was just created by fcntl and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(new) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("colovmm-events-{}-{name}", std::process::id()))
    }

    fn lines(path: &PathBuf) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    #[test]
    fn option_parsing() {
        assert_eq!(
            EventMonitorConfig::parse("path=/tmp/ev").unwrap(),
            EventMonitorConfig::Path("/tmp/ev".into())
        );
        assert_eq!(
            EventMonitorConfig::parse("fd=3").unwrap(),
            EventMonitorConfig::Fd(3)
        );
        for bad in ["", "path=", "/tmp/ev", "file=/x", "fd"] {
            let e = EventMonitorConfig::parse(bad).unwrap_err();
            assert!(matches!(e, EventMonitorError::Syntax(_)), "{bad}: {e}");
            assert!(e.to_string().contains("path=FILE or fd=N"), "{e}");
        }
        for bad in ["fd=", "fd=-1", "fd=x", "fd=99999999999"] {
            assert!(matches!(
                EventMonitorConfig::parse(bad),
                Err(EventMonitorError::BadFd(_))
            ));
        }
    }

    #[test]
    fn writes_one_object_per_line() {
        let path = temp_path("lines");
        let _ = std::fs::remove_file(&path);
        let m = EventMonitor::open(&EventMonitorConfig::Path(path.clone())).unwrap();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        m.emit("vm", "booted", serde_json::Value::Null);
        m.emit(
            "virtio-blk",
            "activated",
            serde_json::json!({"id": "disk0"}),
        );
        m.emit("vmm", "odd", serde_json::json!(7));
        assert!(m.flush(Duration::from_secs(5)));
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(
            raw.starts_with(r#"{"timestamp":"#)
                && raw.contains(r#","source":"vm","event":"booted","properties":{}}"#),
            "{raw}"
        );
        let ev = lines(&path);
        assert_eq!(ev.len(), 3);
        let ts = ev[0]["timestamp"].as_f64().unwrap();
        assert!(ts >= before - 1.0 && ts < before + 60.0, "{ts}");
        assert_eq!(ev[1]["source"], "virtio-blk");
        assert_eq!(ev[1]["properties"]["id"], "disk0");
        assert_eq!(ev[2]["properties"]["value"], 7);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fd_sink_and_bad_fds() {
        let path = temp_path("fd");
        let file = File::create(&path).unwrap();
        let m = EventMonitor::open(&EventMonitorConfig::Fd(file.as_raw_fd())).unwrap();
        drop(file); // our duplicate keeps the file open
        m.emit("vmm", "started", serde_json::json!({"pid": 1}));
        assert!(m.flush(Duration::from_secs(5)));
        assert_eq!(lines(&path)[0]["event"], "started");
        std::fs::remove_file(&path).unwrap();

        let read_only = File::open("/dev/null").unwrap();
        assert!(matches!(
            EventMonitor::open(&EventMonitorConfig::Fd(read_only.as_raw_fd())),
            Err(EventMonitorError::NotWritable(_))
        ));
        assert!(matches!(
            EventMonitor::open(&EventMonitorConfig::Fd(1 << 20)),
            Err(EventMonitorError::Dup { .. })
        ));
        let e = EventMonitor::open(&EventMonitorConfig::Path("/nonexistent/dir/ev".into()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/dir/ev"), "{e}");
    }

    #[test]
    fn concurrent_emitters_never_interleave() {
        let path = temp_path("threads");
        let _ = std::fs::remove_file(&path);
        let m = EventMonitor::open(&EventMonitorConfig::Path(path.clone())).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        m.emit("vm", "tick", serde_json::json!({"t": t, "i": i}));
                        if i % 50 == 0 {
                            // Let the writer keep up so the queue never overflows here.
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(m.flush(Duration::from_secs(5)));
        assert_eq!(lines(&path).len() as u64 + m.dropped(), 400);
        std::fs::remove_file(&path).unwrap();
    }

    /// A sink that fails every write.
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink that blocks until released.
    struct Stuck(Arc<Mutex<()>>);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _held = self.0.lock().unwrap();
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn io_errors_and_stuck_sinks_never_reach_the_caller() {
        let m = EventMonitor::from_writer(Broken).unwrap();
        for _ in 0..10 {
            m.emit("vm", "x", serde_json::Value::Null);
        }
        assert!(m.flush(Duration::from_secs(5)));

        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let m = EventMonitor::from_writer(Stuck(Arc::clone(&gate))).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..(QUEUE_LEN * 2) {
            m.emit("vm", "x", serde_json::Value::Null);
        }
        assert!(start.elapsed() < Duration::from_secs(2), "emit blocked");
        assert!(m.dropped() >= (QUEUE_LEN - 1) as u64, "{}", m.dropped());
        assert!(!m.flush(Duration::from_millis(50)));
        drop(held);
        // The queue may still be full for a moment after the sink is released.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !m.flush(Duration::from_secs(1)) {
            assert!(std::time::Instant::now() < deadline, "writer never drained");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn disabled_is_a_no_op() {
        let m = EventMonitor::disabled();
        assert!(!m.is_enabled());
        m.emit("vm", "booted", serde_json::Value::Null);
        assert!(m.flush(Duration::from_millis(1)));
    }
}
