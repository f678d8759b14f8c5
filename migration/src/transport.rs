//! Byte streams a migration runs over (TCP, Unix sockets, files) with every read and write
//! bounded by a timeout, and helpers that open or accept N channels before a deadline.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors opening channels.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Fewer peers connected than the transfer needs before the deadline.
    #[error("only {accepted} of {wanted} migration channels connected in time")]
    AcceptTimeout {
        /// Connections accepted.
        accepted: usize,
        /// Connections needed.
        wanted: usize,
    },
    /// Preparing an accepted stream failed (its authentication, say).
    #[error("{0}")]
    Prepare(String),
    /// Nobody connected before the deadline.
    #[error("no source connected within {} s", .0.as_secs())]
    NoPeer(Duration),
    /// The first connection did not start with a stream header.
    #[error("the first migration stream sent no valid header: {0}")]
    Header(String),
    /// A timeout of zero would mean "block forever" to the socket layer.
    #[error("migration I/O timeout must be non-zero")]
    ZeroTimeout,
}

/// A stream one migration channel runs over. `Sync` so that one thread can shut down
/// another's stream through a shared handle.
pub trait Transport: Read + Write + Send + Sync {
    /// Bounds every later read and write by `timeout` (SO_RCVTIMEO and SO_SNDTIMEO on sockets;
    /// files never block indefinitely, so they ignore it).
    fn set_io_timeout(&self, timeout: Duration) -> io::Result<()>;
    /// Another handle to the same stream (to shut it down from another thread).
    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>>;
    /// Ends one or both directions, waking threads blocked on them; the peer sees the end.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

/// Lets wrappers (and tests) stack transports.
impl<T: Transport + ?Sized> Transport for Box<T> {
    fn set_io_timeout(&self, timeout: Duration) -> io::Result<()> {
        (**self).set_io_timeout(timeout)
    }

    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        (**self).try_clone_transport()
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        (**self).shutdown(how)
    }
}

/// Refuses a zero timeout, which std's socket calls reject and the kernel reads as "forever".
fn nonzero(timeout: Duration) -> io::Result<Duration> {
    if timeout.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "zero I/O timeout",
        ));
    }
    Ok(timeout)
}

/// Sets SO_RCVTIMEO and SO_SNDTIMEO on a TCP stream.
pub fn set_tcp_timeouts(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    let t = nonzero(timeout)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

/// Sets SO_RCVTIMEO and SO_SNDTIMEO on a Unix stream.
pub fn set_unix_timeouts(s: &UnixStream, timeout: Duration) -> io::Result<()> {
    let t = nonzero(timeout)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

impl Transport for TcpStream {
    fn set_io_timeout(&self, timeout: Duration) -> io::Result<()> {
        set_tcp_timeouts(self, timeout)
    }

    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl Transport for UnixStream {
    fn set_io_timeout(&self, timeout: Duration) -> io::Result<()> {
        set_unix_timeouts(self, timeout)
    }

    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// Snapshots to and restores from a file use a single-channel transfer over it.
impl Transport for File {
    fn set_io_timeout(&self, timeout: Duration) -> io::Result<()> {
        nonzero(timeout).map(|_| ())
    }

    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
        Ok(())
    }
}

/// Connects `channels` TCP streams to `addr`, each with `timeout` on connect and on every
/// later read and write, and Nagle off (the small control messages wait on replies).
pub fn connect_tcp(
    addr: SocketAddr,
    channels: u16,
    timeout: Duration,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    nonzero(timeout).map_err(|_| TransportError::ZeroTimeout)?;
    let io = |what| move |source| TransportError::Io { what, source };
    let mut out: Vec<Box<dyn Transport>> = Vec::with_capacity(channels.into());
    for _ in 0..channels {
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(io("connect"))?;
        s.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        set_tcp_timeouts(&s, timeout).map_err(io("socket timeouts"))?;
        out.push(Box::new(s));
    }
    Ok(out)
}

/// Connects `channels` Unix streams to `path`, each with `timeout` on every read and write.
pub fn connect_unix(
    path: &Path,
    channels: u16,
    timeout: Duration,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    nonzero(timeout).map_err(|_| TransportError::ZeroTimeout)?;
    let io = |what| move |source| TransportError::Io { what, source };
    let mut out: Vec<Box<dyn Transport>> = Vec::with_capacity(channels.into());
    for _ in 0..channels {
        // A Unix connect completes at once unless the listener's backlog is full.
        let s = UnixStream::connect(path).map_err(io("connect"))?;
        set_unix_timeouts(&s, timeout).map_err(io("socket timeouts"))?;
        out.push(Box::new(s));
    }
    Ok(out)
}

/// Accepts `channels` TCP connections before `timeout` runs out (the order they arrive in
/// does not matter: each stream's header names its channel).
pub fn accept_tcp(
    listener: &TcpListener,
    channels: u16,
    timeout: Duration,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    accept_tcp_with(listener, channels, timeout, &mut |_| Ok(()))
}

/// How a receiver prepares each accepted TCP stream before reading from it (authenticate it).
pub type Prepare<'a> = &'a mut dyn FnMut(&mut TcpStream) -> Result<(), String>;

/// [`accept_tcp`], running `prepare` on each stream as it is accepted.
pub fn accept_tcp_with(
    listener: &TcpListener,
    channels: u16,
    timeout: Duration,
    prepare: Prepare<'_>,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    accept_on(
        listener.as_raw_fd(),
        |nb| listener.set_nonblocking(nb),
        channels,
        timeout,
        || {
            let (mut s, _) = listener.accept()?;
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            set_tcp_timeouts(&s, timeout)?;
            prepare(&mut s).map_err(io::Error::other)?;
            Ok(Box::new(s) as Box<dyn Transport>)
        },
    )
}

/// Accepts `channels` Unix connections before `timeout` runs out.
pub fn accept_unix(
    listener: &UnixListener,
    channels: u16,
    timeout: Duration,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    accept_on(
        listener.as_raw_fd(),
        |nb| listener.set_nonblocking(nb),
        channels,
        timeout,
        || {
            let (s, _) = listener.accept()?;
            s.set_nonblocking(false)?;
            set_unix_timeouts(&s, timeout)?;
            Ok(Box::new(s) as Box<dyn Transport>)
        },
    )
}

/// The shared part of the accept functions: the listener goes non-blocking for [`accept_n`]
/// and is left as the caller gave it, whatever happened.
fn accept_on(
    fd: RawFd,
    set_nonblocking: impl Fn(bool) -> io::Result<()>,
    channels: u16,
    timeout: Duration,
    accept: impl FnMut() -> io::Result<Box<dyn Transport>>,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    nonzero(timeout).map_err(|_| TransportError::ZeroTimeout)?;
    let io = |what| move |source| TransportError::Io { what, source };
    set_nonblocking(true).map_err(io("set_nonblocking"))?;
    let accepted = accept_n(fd, channels.into(), timeout, accept);
    let restored = set_nonblocking(false).map_err(io("set_nonblocking"));
    let accepted = accepted?;
    restored?;
    Ok(accepted)
}

/// Calls `accept` (on a non-blocking listener `fd`) until it has `n` streams, polling in
/// between, and gives up at the deadline.
fn accept_n(
    fd: RawFd,
    n: usize,
    timeout: Duration,
    mut accept: impl FnMut() -> io::Result<Box<dyn Transport>>,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match accept() {
            Ok(s) => {
                out.push(s);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(TransportError::Io {
                    what: "accept",
                    source,
                })
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::AcceptTimeout {
                accepted: out.len(),
                wanted: n,
            });
        }
        wait_readable(fd, left).map_err(|source| TransportError::Io {
            what: "poll",
            source,
        })?;
    }
    Ok(out)
}

/// Waits until `fd` is readable (a listener: a connection is pending) or `timeout` passes.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Round up so a sub-millisecond remainder does not spin with a zero timeout.
    let ms = timeout.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd on our stack and we pass a count of 1; poll only
    // writes its `revents`.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// How long the first connection of a session may take to send its stream header.
const HEADER_WAIT: Duration = Duration::from_secs(1);

/// Accepts one transfer's channels on a TCP listener: waits up to `wait` for the first
/// connection, learns the channel count from its stream header (peeked, so the receiver still
/// reads it), then accepts the others within `timeout`. Every stream gets `timeout` on its
/// reads and writes.
pub fn accept_session_tcp(
    listener: &TcpListener,
    wait: Duration,
    timeout: Duration,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    accept_session_tcp_with(listener, wait, timeout, &mut |_| Ok(()))
}

/// [`accept_session_tcp`], running `prepare` on each stream before its header is read.
pub fn accept_session_tcp_with(
    listener: &TcpListener,
    wait: Duration,
    timeout: Duration,
    prepare: Prepare<'_>,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    let io = |what| move |source| TransportError::Io { what, source };
    wait_for_connection(listener.as_raw_fd(), wait)?;
    let (mut s, _) = listener.accept().map_err(io("accept"))?;
    s.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
    set_tcp_timeouts(&s, timeout).map_err(io("socket timeouts"))?;
    prepare(&mut s).map_err(TransportError::Prepare)?;
    // A connection that sends no header soon is not a source: do not let it hold the
    // listener for a whole I/O timeout while the real one waits behind it.
    set_tcp_timeouts(&s, timeout.min(HEADER_WAIT)).map_err(io("socket timeouts"))?;
    let channels = peek_channel_count(s.as_raw_fd())?;
    set_tcp_timeouts(&s, timeout).map_err(io("socket timeouts"))?;
    let mut out: Vec<Box<dyn Transport>> = vec![Box::new(s)];
    if channels > 1 {
        out.extend(accept_tcp_with(listener, channels - 1, timeout, prepare)?);
    }
    Ok(out)
}

/// [`accept_session_tcp`] for a Unix listener.
pub fn accept_session_unix(
    listener: &UnixListener,
    wait: Duration,
    timeout: Duration,
) -> Result<Vec<Box<dyn Transport>>, TransportError> {
    let io = |what| move |source| TransportError::Io { what, source };
    wait_for_connection(listener.as_raw_fd(), wait)?;
    let (s, _) = listener.accept().map_err(io("accept"))?;
    set_unix_timeouts(&s, timeout.min(HEADER_WAIT)).map_err(io("socket timeouts"))?;
    let channels = peek_channel_count(s.as_raw_fd())?;
    set_unix_timeouts(&s, timeout).map_err(io("socket timeouts"))?;
    let mut out: Vec<Box<dyn Transport>> = vec![Box::new(s)];
    if channels > 1 {
        out.extend(accept_unix(listener, channels - 1, timeout)?);
    }
    Ok(out)
}

/// Waits until a connection is pending on `fd`, at most `timeout`; fails when none came.
pub fn wait_for_connection(fd: RawFd, timeout: Duration) -> Result<(), TransportError> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        1 => Ok(()),
        0 => Err(TransportError::NoPeer(timeout)),
        _ => Err(TransportError::Io {
            what: "poll",
            source: io::Error::last_os_error(),
        }),
    }
}

/// The channel count in a stream's header, read with MSG_PEEK so the receiver still sees it.
fn peek_channel_count(fd: RawFd) -> Result<u16, TransportError> {
    use super::protocol::{StreamHeader, STREAM_HEADER_LEN};
    let mut buf = [0u8; STREAM_HEADER_LEN];
    // SAFETY: recv into a buffer we own, of its exact length; the socket has a read timeout.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_WAITALL,
        )
    };
    if n != STREAM_HEADER_LEN as isize {
        return Err(TransportError::Header(
            io::Error::last_os_error().to_string(),
        ));
    }
    StreamHeader::decode(&buf)
        .map(|h| h.channels)
        .map_err(|e| TransportError::Header(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_gives_up_at_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _one = TcpStream::connect(addr).unwrap();
        let t0 = Instant::now();
        let e = accept_tcp(&l, 2, Duration::from_millis(200)).err().unwrap();
        assert!(matches!(
            e,
            TransportError::AcceptTimeout {
                accepted: 1,
                wanted: 2
            }
        ));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn reads_time_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut a: Box<dyn Transport> = Box::new(a);
        a.set_io_timeout(Duration::from_millis(50)).unwrap();
        let mut buf = [0u8; 1];
        let e = a.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(a.set_io_timeout(Duration::ZERO).is_err());
    }

    #[test]
    fn connect_and_accept_unix() {
        let dir = std::env::temp_dir().join(format!("colovmm-mig-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("t.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let c = connect_unix(&path, 3, Duration::from_secs(1)).unwrap();
        let a = accept_unix(&l, 3, Duration::from_secs(1)).unwrap();
        assert_eq!((c.len(), a.len()), (3, 3));
        let _ = std::fs::remove_file(&path);
    }
}
