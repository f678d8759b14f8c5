//! Reading one request off a connection, within fixed limits.
//!
//! The head (request line + headers) may be at most [`Limits::max_head`] bytes and the body at
//! most [`Limits::max_body`]; the whole request must arrive before [`Limits::timeout`] runs
//! out. The deadline covers the whole request, not each read, because a slowloris client
//! sending one byte just before every per-read timeout would otherwise hold a worker forever.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::response::{send_all, Response};

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 64;

/// Bounds on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus headers, in bytes.
    pub max_head: usize,
    /// Body, in bytes.
    pub max_body: usize,
    /// Time for the whole request to arrive.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: 16 << 10,
            max_body: 1 << 20,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A request as the router needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method token, case preserved (methods are case-sensitive).
    pub method: String,
    /// Request target as sent.
    pub target: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// Why no request could be read; each maps to the status the client is told.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not HTTP/1.x syntax.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The client closed (or half-closed) before the request was complete.
    #[error("the connection closed before the request was complete")]
    Truncated,
    /// The request did not arrive in time.
    #[error("the request was not complete within {0:?}")]
    Timeout(Duration),
    /// Request line and headers too long.
    #[error("request line and headers exceed {0} bytes")]
    HeadTooLarge(usize),
    /// Too many header fields.
    #[error("more than {0} request headers")]
    TooManyHeaders(usize),
    /// Body too long.
    #[error("a request body of {len} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// Unparseable or conflicting `Content-Length`.
    #[error("invalid Content-Length: {0}")]
    BadLength(String),
    /// Chunked or other transfer codings.
    #[error("Transfer-Encoding is not supported: send the body with Content-Length")]
    TransferEncoding,
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("only HTTP/1.0 and HTTP/1.1 are supported")]
    Version,
    /// The socket failed.
    #[error("reading the request: {0}")]
    Io(#[source] io::Error),
}

impl RequestError {
    /// The status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_)
            | RequestError::Truncated
            | RequestError::BadLength(_)
            | RequestError::Io(_) => 400,
            RequestError::Timeout(_) => 408,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::HeadTooLarge(_) | RequestError::TooManyHeaders(_) => 431,
            RequestError::TransferEncoding => 501,
            RequestError::Version => 505,
        }
    }
}

/// What the head says about the body.
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) content_length: u64,
    pub(crate) expect_continue: bool,
}

/// Reads one request, answering `Expect: 100-continue` on the way.
pub fn read_request(stream: &UnixStream, limits: &Limits) -> Result<Request, RequestError> {
    let deadline = Instant::now() + limits.timeout;
    let (head, mut buf) = read_head(stream, limits, deadline)?;
    if head.content_length > limits.max_body as u64 {
        return Err(RequestError::BodyTooLarge {
            len: head.content_length,
            max: limits.max_body,
        });
    }
    // Bounded by max_body just above.
    let len = head.content_length as usize;
    if head.expect_continue && buf.len() < len {
        let interim = format!("HTTP/1.1 100 {}\r\n\r\n", super::response::reason(100));
        send_all(stream, interim.as_bytes()).map_err(RequestError::Io)?;
    }
    // Bytes past the body are a pipelined request: the connection closes after this reply,
    // so they are dropped.
    buf.truncate(len);
    let mut chunk = [0u8; 8192];
    while buf.len() < len {
        let want = (len - buf.len()).min(chunk.len());
        let n = read_some(stream, &mut chunk[..want], deadline, limits.timeout)?;
        if n == 0 {
            return Err(RequestError::Truncated);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    Ok(Request {
        method: head.method,
        target: head.target,
        body: buf,
    })
}

/// Reads until the head is complete; returns it and whatever followed it in the buffer.
fn read_head(
    stream: &UnixStream,
    limits: &Limits,
    deadline: Instant,
) -> Result<(Head, Vec<u8>), RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let room = limits.max_head.saturating_sub(buf.len());
        if room == 0 {
            return Err(RequestError::HeadTooLarge(limits.max_head));
        }
        let want = room.min(chunk.len());
        let n = read_some(stream, &mut chunk[..want], deadline, limits.timeout)?;
        if n == 0 {
            return Err(RequestError::Truncated);
        }
        let new = chunk.get(..n).unwrap_or_default();
        buf.extend_from_slice(new);
        // A head ends with a newline; re-parsing only then keeps a client that trickles
        // bytes from costing quadratic time.
        if !new.contains(&b'\n') {
            continue;
        }
        if let Some((head, used)) = parse_head(&buf)? {
            buf.drain(..used);
            return Ok((head, buf));
        }
    }
}

/// Parses a complete head, or `None` if more bytes are needed.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::TooManyHeaders(MAX_HEADERS))
        }
        Err(httparse::Error::Version) => return Err(RequestError::Version),
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(RequestError::Malformed("no request line".into()));
    };
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value)?;
            // Two different lengths are a request-smuggling classic: refuse.
            if content_length.is_some_and(|old| old != n) {
                return Err(RequestError::BadLength("conflicting values".into()));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::TransferEncoding);
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    Ok(Some((
        Head {
            method: method.to_string(),
            target: target.to_string(),
            content_length: content_length.unwrap_or(0),
            expect_continue,
        },
        used,
    )))
}

/// `Content-Length`: 1 to 19 ASCII digits (no sign, no spaces inside).
fn parse_length(value: &[u8]) -> Result<u64, RequestError> {
    let shown = || {
        String::from_utf8_lossy(value)
            .chars()
            .take(32)
            .collect::<String>()
    };
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(RequestError::BadLength(shown()));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RequestError::BadLength(shown()))
}

/// One read that gives up at `deadline`.
fn read_some(
    mut stream: &UnixStream,
    buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<usize, RequestError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Timeout(timeout));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(RequestError::Io)?;
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(RequestError::Io(e)),
        }
    }
}

/// The reply for a request that could not be read.
pub fn error_response(e: &RequestError) -> Response {
    Response::error_msg(e.status(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read(bytes: &[u8], limits: Limits) -> Result<Request, RequestError> {
        let (a, mut b) = UnixStream::pair().unwrap();
        let bytes = bytes.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = b.write_all(&bytes);
            let _ = b.shutdown(std::net::Shutdown::Write);
            // Keep the peer open until the reader is done so "truncated" means EOF.
            let mut sink = Vec::new();
            let _ = b.read_to_end(&mut sink);
        });
        let r = read_request(&a, &limits);
        drop(a);
        writer.join().unwrap();
        r
    }

    #[test]
    fn parses_a_request_with_a_body() {
        let r = read(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcdEXTRA",
            Limits::default(),
        )
        .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.target, "/api/v1/vm.create");
        assert_eq!(r.body, b"abcd");
    }

    #[test]
    fn limits_and_errors() {
        let small = Limits {
            max_head: 64,
            max_body: 8,
            timeout: Duration::from_secs(5),
        };
        let status = |b: &[u8]| read(b, small).unwrap_err().status();
        assert_eq!(status(&[b'A'; 100]), 431);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: 9\r\n\r\n"), 413);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status(b"GET /\xff HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"\x00\x01\x02\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\n"), 400);
        assert_eq!(status(b""), 400);
        let many: Vec<u8> = std::iter::once(&b"GET / HTTP/1.1\r\n"[..])
            .chain(std::iter::repeat_n(&b"a:b\r\n"[..], MAX_HEADERS + 1))
            .chain(std::iter::once(&b"\r\n"[..]))
            .flatten()
            .copied()
            .collect();
        let roomy = Limits {
            max_head: 4096,
            ..small
        };
        assert_eq!(read(&many, roomy).unwrap_err().status(), 431);
    }

    #[test]
    fn slow_client_times_out() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let limits = Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let start = Instant::now();
        assert_eq!(read_request(&a, &limits).unwrap_err().status(), 408);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
