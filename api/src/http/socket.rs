//! The listening Unix socket: created 0600, replacing a stale socket file but never a live
//! one or a file that is not a socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Longer than `sun_path` allows, or contains a NUL.
    #[error(
        "API socket path {0:?} is unusable: it must be shorter than 108 bytes and have no NUL"
    )]
    BadPath(PathBuf),
    /// Another server answers on that path.
    #[error("API socket {0:?} is in use by a running server")]
    InUse(PathBuf),
    /// Something other than a socket is there.
    #[error("{0:?} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("API socket {path:?}: {op}")]
    Os {
        /// The path.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Identity of the socket file we created, so cleanup never removes a successor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> Option<Self> {
        std::fs::symlink_metadata(path).ok().map(|m| Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Removes `path` if it is still the socket we bound.
pub fn remove_if_ours(path: &Path, id: Option<FileId>) {
    if id.is_some() && FileId::of(path) == id {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("removing API socket {}: {e}", path.display());
        }
    }
}

/// Binds a listening socket at `path` with mode 0600.
pub fn bind(path: &Path) -> Result<(UnixListener, Option<FileId>), SocketError> {
    let os = |op, source| SocketError::Os {
        path: path.to_path_buf(),
        op,
        source,
    };
    clear_stale(path)?;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is a plain C struct for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(SocketError::BadPath(path.to_path_buf()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }

    // SAFETY: a plain system call with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os("socket", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    // Why fchmod before bind: Linux gives the new socket file the socket inode's mode (less
    // the umask), so the file is 0600 from the instant it exists, with no window in which
    // another user could connect and no process-wide umask change racing other threads.
    // SAFETY: fchmod on a descriptor we own; the result is checked.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(os("fchmod", io::Error::last_os_error()));
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` does not exceed its size (the
    // path is shorter than sun_path, checked above).
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os("bind", io::Error::last_os_error()));
    }
    // Belt and braces for kernels or filesystems that do not carry the inode mode over.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| os("chmod", e))?;
    let id = FileId::of(path);
    // SAFETY: listen on a bound socket we own; the result is checked.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        remove_if_ours(path, id);
        return Err(os("listen", e));
    }
    let listener = UnixListener::from(fd);
    // The acceptor polls before accepting; non-blocking so a client that vanished between
    // the two can never block it.
    listener
        .set_nonblocking(true)
        .map_err(|e| os("set_nonblocking", e))?;
    Ok((listener, id))
}

/// Removes a socket file nobody listens on; refuses a live socket or any other file.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(SocketError::Os {
                path: path.to_path_buf(),
                op: "stat",
                source: e,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(SocketError::InUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|e| SocketError::Os {
        path: path.to_path_buf(),
        op: "remove stale socket",
        source: e,
    })
}
