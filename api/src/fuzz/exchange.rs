//! Sends one case's bytes on a fresh connection and collects what comes back.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::generate::After;
use crate::http::response::send_all;

/// Most reply bytes kept; a well-behaved server sends far less.
const MAX_REPLY: usize = 4 << 20;

/// Why an exchange failed (a server fault, not a bad reply).
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The server is not accepting.
    #[error("cannot connect to {path:?}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server neither finished its reply nor closed in time.
    #[error("no complete reply within {0:?}")]
    Timeout(Duration),
    /// The server kept sending.
    #[error("reply longer than {MAX_REPLY} bytes")]
    TooLong,
    /// Reading failed.
    #[error("reading the reply")]
    Io(#[source] io::Error),
}

/// Sends `bytes`, then does what `after` says; returns the reply when it was read whole.
pub fn exchange(
    socket: &Path,
    bytes: &[u8],
    after: After,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, ExchangeError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ExchangeError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(ExchangeError::Io)?;
    // The server may refuse early (431, 413) and stop reading; its reply is still what we
    // judge, so a failed send is not an error here.
    let _ = send_all(&stream, bytes);
    match after {
        After::Disconnect => return Ok(None),
        After::ReadSome => {
            stream
                .set_read_timeout(Some(timeout))
                .map_err(ExchangeError::Io)?;
            let mut few = [0u8; 16];
            let _ = stream.read(&mut few);
            return Ok(None);
        }
        After::Read => {}
    }
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + timeout;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ExchangeError::Timeout(timeout));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(ExchangeError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(Some(reply)),
            Ok(n) => {
                reply.extend_from_slice(chunk.get(..n).unwrap_or_default());
                if reply.len() > MAX_REPLY {
                    return Err(ExchangeError::TooLong);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            // A reset after the reply arrived ends it like EOF; the checker judges the bytes.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Some(reply)),
            Err(e) => return Err(ExchangeError::Io(e)),
        }
    }
}
