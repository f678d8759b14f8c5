//! Starts the HTTP API for `--api-socket` and returns the control loop's end of the channel.

use std::path::Path;
use std::sync::Arc;

use api::{ApiReceiver, HttpServer};

use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// The channel's eventfd could not be created.
    #[error("API channel: {0}")]
    Channel(std::io::Error),
    /// The server could not listen.
    #[error("API socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        source: api::HttpError,
    },
}

/// Listens on `path` (server threads under the API seccomp filter) and returns where
/// requests arrive, with the server handle (dropping it stops the server).
pub fn start(path: &Path, mode: SeccompMode) -> Result<(ApiReceiver, HttpServer), ApiStartError> {
    let (sender, receiver) = api::api_channel().map_err(ApiStartError::Channel)?;
    let init: api::ThreadInit = Arc::new(move || {
        if let Err(e) = seccomp::apply(ThreadKind::Api, mode) {
            // An API thread without its filter must not serve requests.
            log::error!("{e}");
            std::process::abort();
        }
    });
    let server = api::start_http_server_with_init(path, sender, init).map_err(|source| {
        ApiStartError::Listen {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok((receiver, server))
}
