//! colovmm's HTTP/1.1 + JSON API server on a Unix socket.
//!
//! Why `httparse` and our own loop rather than `tiny_http`: the server must stay up and
//! bounded against hostile local clients, and those bounds are what we need to control.
//! tiny_http has no cap on header size (its limit PR is still open upstream), takes no
//! whole-request deadline (only per-read timeouts, which slowloris defeats), and its thread
//! pool grows with concurrent connections. httparse is a dependency-free, panic-free parser
//! of one buffer; around it we own the reading ([`request`]: 16 KiB head, 1 MiB body, one
//! deadline per request), the threads ([`server`]: one acceptor, a fixed pool of workers, a
//! bounded queue) and the replies ([`response`]: always `Connection: close` and a JSON body).
//!
//! Routes ([`routes::ROUTES`]) use Cloud Hypervisor's names under `/api/v1/`. Each request
//! becomes an [`ApiRequest`](crate::ApiRequest) sent to the VMM's control loop through the
//! [`ApiSender`]; the server never runs on vCPU or device threads. Bodies are parsed and
//! checked ([`validate`] for snapshot and migration) before anything reaches the loop.

pub mod dispatch;
pub mod request;
pub mod response;
pub mod routes;
pub mod server;
pub mod socket;
pub mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use crate::ApiSender;

pub use request::Limits;
pub use routes::{Action, Method, Route, API_PREFIX, ROUTES};
pub use server::{HttpOptions, HttpServer};
pub use socket::SocketError;
pub use validate::{MigrationUrl, ValidationError};

/// Why the server could not start, or the option was refused.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The socket could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The stop eventfd could not be created.
    #[error("creating the API server's stop eventfd")]
    EventFd(#[source] std::io::Error),
    /// A server thread could not be started.
    #[error("starting an API server thread")]
    Spawn(#[source] std::io::Error),
    /// `--api-socket` was not `path=FILE`.
    #[error("--api-socket: {0}")]
    BadOption(String),
}

/// Starts the API server on `path` with default limits; requests go to `sender`.
pub fn start_http_server(path: &Path, sender: ApiSender) -> Result<HttpServer, HttpError> {
    server::start(path, sender, HttpOptions::default(), None)
}

/// Runs first on every server thread (the VMM installs the API threads' seccomp filter).
pub type ThreadInit = std::sync::Arc<dyn Fn() + Send + Sync>;

/// [`start_http_server`] whose threads each run `init` before anything else.
pub fn start_http_server_with_init(
    path: &Path,
    sender: ApiSender,
    init: ThreadInit,
) -> Result<HttpServer, HttpError> {
    server::start(path, sender, HttpOptions::default(), Some(init))
}

/// [`start_http_server`] with explicit limits and pool sizes.
pub fn start_http_server_with(
    path: &Path,
    sender: ApiSender,
    options: HttpOptions,
) -> Result<HttpServer, HttpError> {
    server::start(path, sender, options, None)
}

/// Parses `--api-socket path=FILE` (a bare `FILE` is accepted too, as Cloud Hypervisor does).
pub fn parse_api_socket(s: &str) -> Result<PathBuf, HttpError> {
    let path = match s.split_once('=') {
        Some(("path", p)) => p,
        Some(("fd", _)) => {
            return Err(HttpError::BadOption(
                "fd=N is not supported; use path=FILE".into(),
            ))
        }
        Some((key, _)) => {
            return Err(HttpError::BadOption(format!(
                "unknown key '{key}' (expected path=FILE)"
            )))
        }
        None => s,
    };
    if path.is_empty() || path.contains(',') {
        return Err(HttpError::BadOption(format!(
            "expected path=FILE, got '{s}'"
        )));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod option_tests {
    use super::*;

    #[test]
    fn api_socket_option() {
        assert_eq!(
            parse_api_socket("path=/run/c.sock").unwrap(),
            PathBuf::from("/run/c.sock")
        );
        assert_eq!(
            parse_api_socket("/run/c.sock").unwrap(),
            PathBuf::from("/run/c.sock")
        );
        for bad in ["", "path=", "fd=3", "socket=/x", "path=/a,mode=1"] {
            let e = parse_api_socket(bad).unwrap_err().to_string();
            assert!(e.starts_with("--api-socket"), "{bad}: {e}");
        }
    }
}
