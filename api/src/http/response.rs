//! HTTP responses: every one the server sends is built here, so each is well-formed, closes
//! the connection, and carries a JSON body (or none, for 204).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use crate::ApiError;

/// A reply ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers (e.g. `Allow`).
    pub headers: Vec<(&'static str, String)>,
    /// JSON body; empty for 204.
    pub body: Vec<u8>,
}

/// The reason phrase for the codes the server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ if (400..500).contains(&status) => "Client Error",
        _ => "Server Error",
    }
}

impl Response {
    /// 200 with `value` as the body.
    pub fn json(value: &serde_json::Value) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status: 200,
                headers: Vec::new(),
                body,
            },
            Err(e) => Self::error(&ApiError::new(500, format!("cannot encode the reply: {e}"))),
        }
    }

    /// 204, no body.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// An error reply: `{"error": ..., "causes": [...]}` with the error's status.
    pub fn error(e: &ApiError) -> Self {
        // The control loop could hand back any number; only 4xx/5xx may carry an error body.
        let status = if (400..=599).contains(&e.status) {
            e.status
        } else {
            500
        };
        let body = serde_json::to_vec(e)
            .unwrap_or_else(|_| br#"{"error":"cannot encode the error","causes":[]}"#.to_vec());
        Self {
            status,
            headers: Vec::new(),
            body,
        }
    }

    /// Shorthand for [`Response::error`] with a bare message.
    pub fn error_msg(status: u16, msg: impl Into<String>) -> Self {
        Self::error(&ApiError::new(status, msg))
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire. Every reply closes the connection: one request per
    /// connection keeps a slow or idle client from pinning a worker between requests.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode(false)
    }

    /// The bytes on the wire for a `HEAD` request: the same head, no body (RFC 9110).
    pub fn to_head_bytes(&self) -> Vec<u8> {
        self.encode(true)
    }

    fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        out.push_str("Server: colovmm\r\nConnection: close\r\n");
        // RFC 9110: a 204 carries neither a body nor Content-Length.
        if self.status != 204 {
            out.push_str("Content-Type: application/json\r\n");
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        for (name, value) in &self.headers {
            // Values are ours, but never let one split the header block.
            let value: String = value.chars().filter(|c| !c.is_control()).collect();
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if self.status != 204 && !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// Writes all of `buf` with `MSG_NOSIGNAL`: a client that hangs up mid-reply gives `EPIPE`,
/// never a `SIGPIPE` that would kill the VMM if it ever stops ignoring that signal.
pub fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice and the length passed is its own; the fd is owned
        // by `stream`, which outlives the call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match n {
            n if n > 0 => buf = buf.get(n as usize..).unwrap_or_default(),
            0 => return Err(io::ErrorKind::WriteZero.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let r = Response::no_content().to_bytes();
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 204 No Content\r\n"), "{s}");
        assert!(!s.contains("Content-Length"), "{s}");
        assert!(s.ends_with("\r\n\r\n"));

        let r = Response::error_msg(405, "no")
            .with_header("Allow", "GET")
            .to_bytes();
        let s = String::from_utf8(r).unwrap();
        assert!(s.contains("\r\nAllow: GET\r\n"), "{s}");
        assert!(s.ends_with(r#"{"error":"no","causes":[]}"#), "{s}");
        assert!(s.contains("Content-Length: 26\r\n"), "{s}");
    }

    #[test]
    fn head_replies_have_no_body() {
        let r = Response::error_msg(405, "no");
        let full = r.to_bytes();
        let head = r.to_head_bytes();
        assert!(full.starts_with(&head) && full.len() > head.len());
        assert!(head.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn bogus_status_becomes_500() {
        assert_eq!(Response::error(&ApiError::new(200, "x")).status, 500);
        assert_eq!(Response::error(&ApiError::new(0, "x")).status, 500);
        assert_eq!(Response::error(&ApiError::new(409, "x")).status, 409);
    }

    #[test]
    fn header_values_cannot_inject() {
        let s = Response::no_content()
            .with_header("Allow", "GET\r\nX-Evil: 1")
            .to_bytes();
        let s = String::from_utf8(s).unwrap();
        assert!(!s.contains("\r\nX-Evil"), "{s}");
    }
}
