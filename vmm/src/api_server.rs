//! Starts the HTTP API for `--api-socket` and returns the control loop's end of the channel.

use std::path::Path;

use api::ApiReceiver;

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// The channel's eventfd could not be created.
    #[error("API channel: {0}")]
    Channel(std::io::Error),
    /// The server could not listen.
    #[error("API socket {path}: {why}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        why: String,
    },
}

/// The running server (stops when dropped).
pub struct ApiServer;

/// Listens on `path` and returns where requests arrive.
pub fn start(
    path: &Path,
    _seccomp: crate::seccomp::SeccompMode,
) -> Result<(ApiReceiver, ApiServer), ApiStartError> {
    let (_sender, receiver) = api::api_channel().map_err(ApiStartError::Channel)?;
    Err(ApiStartError::Listen {
        path: path.display().to_string(),
        why: "the HTTP server is not built yet".to_string(),
    })
    .map(|()| (receiver, ApiServer))
}
