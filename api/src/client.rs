//! A small blocking HTTP/1.1 client over a Unix socket, for `colovmm-remote` and the tests.
//!
//! One request per connection (the server closes after each reply), one deadline covering
//! connect, send and the whole reply, and a cap on the reply size.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::http::response::send_all;
use crate::ApiError;

/// Longer than the server's wait for the control loop, so its 503 arrives first.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(40);
/// Largest reply accepted (status line, headers and body).
pub const MAX_REPLY: usize = 16 << 20;
const MAX_HEADERS: usize = 64;

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there (or no permission).
    #[error("cannot connect to the API socket {path:?}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Method or path would not make a valid request line.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Sending or receiving failed.
    #[error("talking to the API server")]
    Io(#[source] io::Error),
    /// No complete reply within the timeout.
    #[error("no complete reply within {0:?}")]
    Timeout(Duration),
    /// The reply is not HTTP/1.x, or ended early.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The reply is larger than [`MAX_REPLY`].
    #[error("reply larger than {MAX_REPLY} bytes")]
    TooLarge,
}

/// Sends one request with [`DEFAULT_TIMEOUT`]; returns the status and body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), ClientError> {
    request_with_timeout(socket, method, path, body, DEFAULT_TIMEOUT)
}

/// [`request`] with an explicit timeout for the whole exchange.
pub fn request_with_timeout(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = |c: char| c.is_ascii_whitespace() || c.is_control();
    if method.is_empty() || method.contains(bad) || !path.starts_with('/') || path.contains(bad) {
        return Err(ClientError::InvalidRequest(format!("{method} {path}")));
    }
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(ClientError::Io)?;
    let mut msg = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n");
    if let Some(body) = body {
        msg.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    msg.push_str("\r\n");
    let mut bytes = msg.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let sent = send_all(&stream, &bytes);
    // A server refusing the request (413...) may close before reading it all; its reply is
    // still worth reading, so a send error only counts if no reply comes.
    match read_reply(&stream, deadline, timeout) {
        Ok(r) => Ok(r),
        Err(e) => match sent {
            Err(s) => Err(ClientError::Io(s)),
            Ok(()) => Err(e),
        },
    }
}

/// Reads a reply: skips 1xx, then the body by `Content-Length`, or to EOF without one.
fn read_reply(
    mut stream: &UnixStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut eof = false;
    loop {
        if let Some((status, head_len, length)) = parse_head(&buf)? {
            if (100..200).contains(&status) {
                buf.drain(..head_len);
                continue;
            }
            let body_so_far = buf.len() - head_len;
            let done = match length {
                Some(n) => body_so_far >= n,
                None => eof || status == 204 || status == 304,
            };
            if done {
                let end = length.map_or(buf.len(), |n| head_len + n);
                return Ok((status, buf.get(head_len..end).unwrap_or_default().to_vec()));
            }
        }
        if eof {
            return Err(ClientError::Malformed(
                "the connection closed before the reply was complete".into(),
            ));
        }
        if buf.len() > MAX_REPLY {
            return Err(ClientError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout(timeout));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(ClientError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // The server may reset after a complete reply; what was read is judged above.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => eof = true,
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
}

/// Status, head length and `Content-Length` of a complete head, or `None` if more is needed.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, Option<usize>)>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = resp
        .code
        .ok_or_else(|| ClientError::Malformed("no status".into()))?;
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| ClientError::Malformed("bad Content-Length".into()))?;
            if n > MAX_REPLY {
                return Err(ClientError::TooLarge);
            }
            length = Some(n);
        }
    }
    Ok(Some((status, head_len, length)))
}

/// Reads an error reply's body as an [`ApiError`], or wraps whatever text it holds.
pub fn api_error(status: u16, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(mut e) => {
            e.status = status;
            e
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let msg = if text.is_empty() {
                format!("HTTP {status} {}", crate::http::response::reason(status))
            } else {
                text.chars().take(1000).collect()
            };
            ApiError::new(status, msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_head(r).unwrap(), Some((200, 38, Some(2))));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n").is_err());
    }

    #[test]
    fn error_bodies() {
        let e = api_error(409, br#"{"error":"busy","causes":["a"]}"#);
        assert_eq!((e.status, e.error.as_str()), (409, "busy"));
        assert_eq!(e.causes, vec!["a".to_string()]);
        assert_eq!(api_error(502, b"").error, "HTTP 502 Server Error");
        assert_eq!(api_error(500, b"oops").error, "oops");
    }

    #[test]
    fn refuses_bad_request_lines() {
        let p = Path::new("/nonexistent");
        for (m, path) in [("GET", "x"), ("G T", "/x"), ("GET", "/a b"), ("", "/")] {
            assert!(matches!(
                request(p, m, path, None),
                Err(ClientError::InvalidRequest(_))
            ));
        }
        assert!(matches!(
            request(p, "GET", "/x", None),
            Err(ClientError::Connect { .. })
        ));
    }
}
