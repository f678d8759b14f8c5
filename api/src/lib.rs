//! colovmm's control-plane wire types and API.
//!
//! [`config`] holds the VM configuration: the CLI builds it from option strings, and the HTTP
//! API's `vm.create` takes the same structure as JSON. The HTTP server runs on its own thread
//! and hands each request to the VMM's control loop as an [`ApiRequest`] through an
//! [`ApiSender`] (a channel plus an eventfd the loop polls); each request carries its own reply
//! channel. [`colo`] holds the COLO replication settings and bodies.

pub mod client;
pub mod colo;
pub mod config;
pub mod events;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod http;

use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use colo::{
    ColoCheckpointData, ColoConfig, ColoRole, ColoSetData, DiskCompletion, MemoryChecksum,
};
pub use config::VmConfig;
pub use events::{EventMonitor, EventMonitorConfig, EventMonitorError};
pub use http::{
    parse_api_socket, start_http_server, start_http_server_with_init, HttpError, HttpServer,
    ThreadInit,
};
pub use http::{MigrationUrl, ValidationError};

/// One action asked of the VMM.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// Is the VMM alive? Answers [`VmmPingResponse`].
    VmmPing,
    /// Stop the VM (if any) and exit the VMM.
    VmmShutdown,
    /// Define the VM (no VM may exist yet).
    VmCreate(Box<VmConfig>),
    /// Boot the created VM.
    VmBoot,
    /// Configuration, state, memory and devices: [`VmInfo`].
    VmInfo,
    /// Stop the vCPUs; devices keep their state.
    VmPause,
    /// Restart paused vCPUs.
    VmResume,
    /// Stop the VM; the VMM stays up (a new `vm.create` may follow).
    VmShutdown,
    /// Shut down and boot again with the same configuration.
    VmReboot,
    /// Per-device I/O counters: a JSON object of objects of numbers.
    VmCounters,
    /// Save a paused VM's complete state to a URL.
    VmSnapshot(VmSnapshotConfig),
    /// Replace the (absent or shut down) VM by one restored from a URL; it comes up paused.
    VmRestore(VmRestoreConfig),
    /// Live-migrate the running VM to a receiving colovmm.
    VmSendMigration(SendMigrationData),
    /// Wait for an incoming migration (this colovmm has no VM yet).
    VmReceiveMigration(ReceiveMigrationData),
    /// Progress of the current or last migration: [`MigrationStatus`].
    VmMigrationStatus,
    /// Start COLO replication as primary or secondary.
    VmColoStart(ColoConfig),
    /// COLO role, state and checkpoint statistics (a JSON object, `ColoStatus` in the spec).
    VmColoStatus,
    /// Stop replicating and carry on alone (the secondary takes over, or the primary goes on).
    VmColoFailover,
    /// Change settings of the running COLO pair.
    VmColoSet(ColoSetData),
    /// Take a checkpoint now.
    VmColoCheckpoint(ColoCheckpointData),
    /// CRC-32 over all guest RAM: [`MemoryChecksum`].
    VmMemoryChecksum,
}

/// `vm.snapshot` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotConfig {
    /// Where to write: `file:///DIR` (created if missing, must be empty).
    pub destination_url: String,
}

/// `vm.restore` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRestoreConfig {
    /// Where to read: `file:///DIR` written by `vm.snapshot`.
    pub source_url: String,
}

/// `vm.send-migration` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationData {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub destination_url: String,
    /// Pause budget for the final round (default 300 ms).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Parallel connections for memory (default 1).
    #[serde(default)]
    pub channels: Option<u32>,
}

/// `vm.receive-migration` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationData {
    /// `tcp:ADDR:PORT` or `unix:PATH` to listen on.
    pub receiver_url: String,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationPhase {
    /// None has run.
    Idle,
    /// Sending or receiving.
    Active,
    /// Done: the VM runs on the destination.
    Completed,
    /// Stopped with an error; the source VM keeps running.
    Failed,
}

impl MigrationStatus {
    /// The status before any migration.
    pub fn idle() -> Self {
        Self {
            phase: MigrationPhase::Idle,
            round: 0,
            bytes: 0,
            total_bytes: 0,
            dirty_rate: 0,
            eta_ms: 0,
            downtime_ms: None,
            elapsed_ms: 0,
            error: None,
        }
    }
}

/// `vm.migration-status` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it is.
    pub phase: MigrationPhase,
    /// Precopy round (1 = all memory).
    pub round: u32,
    /// Bytes of memory sent (or received) so far.
    pub bytes: u64,
    /// Guest RAM size.
    pub total_bytes: u64,
    /// Bytes dirtied per second during the last round.
    pub dirty_rate: u64,
    /// Predicted time to completion, in ms.
    pub eta_ms: u64,
    /// Measured pause of the final round, once known.
    pub downtime_ms: Option<f64>,
    /// Total time so far, in ms.
    pub elapsed_ms: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// An error reply: HTTP status, a message, and the chain of causes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// HTTP status code (400 bad request, 404, 409 wrong state, 500, 503...).
    #[serde(skip)]
    pub status: u16,
    /// What went wrong.
    pub error: String,
    /// Underlying causes, outermost first.
    pub causes: Vec<String>,
}

impl ApiError {
    /// An error with `status` and `error`, no causes.
    pub fn new(status: u16, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            causes: Vec::new(),
        }
    }

    /// Builds one from a std error, walking its `source()` chain into `causes`.
    pub fn from_error(status: u16, e: &dyn std::error::Error) -> Self {
        let mut causes = Vec::new();
        let mut src = e.source();
        while let Some(s) = src {
            causes.push(s.to_string());
            src = s.source();
        }
        Self {
            status,
            error: e.to_string(),
            causes,
        }
    }
}

/// The control loop's answer: a JSON body (`Null` means 204 No Content) or an error.
pub type ApiResponse = Result<serde_json::Value, ApiError>;

/// `vmm.ping` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    /// colovmm's version.
    pub version: String,
    /// The VMM's process id.
    pub pid: u32,
}

/// Lifecycle of the (single) VM a colovmm process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// `vm.create` done, not booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs stopped by `vm.pause`.
    Paused,
    /// The guest powered off, or `vm.shutdown`.
    Shutdown,
}

/// One device as `vm.info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Name (disk id, tap name, "com1"...).
    pub id: String,
    /// Kind ("virtio-blk", "virtio-net", "serial"...).
    pub kind: String,
    /// MMIO or port base address.
    pub base: u64,
    /// IRQ, if any.
    pub irq: Option<u32>,
}

/// `vm.info` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The configuration the VM was created with.
    pub config: VmConfig,
    /// Where it is in its life.
    pub state: VmState,
    /// Bytes of guest RAM.
    pub memory_actual_size: u64,
    /// Its devices.
    pub devices: Vec<DeviceInfo>,
}

/// How long the API thread waits for the control loop before answering 503.
pub const CONTROL_LOOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A request in flight: what is asked, and where the answer goes.
pub type ApiMessage = (ApiRequest, SyncSender<ApiResponse>);

/// The API thread's end of the channel to the control loop.
pub struct ApiSender {
    tx: Sender<ApiMessage>,
    evt: EventFd,
}

impl ApiSender {
    /// Sends `req` and waits for the answer (503 if the loop is gone or too slow).
    pub fn call(&self, req: ApiRequest) -> ApiResponse {
        let (reply_tx, reply_rx) = sync_channel(1);
        let gone = || ApiError::new(503, "the VMM control loop is not answering");
        self.tx.send((req, reply_tx)).map_err(|_| gone())?;
        self.evt.write(1).map_err(|_| gone())?;
        match reply_rx.recv_timeout(CONTROL_LOOP_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

/// The control loop's end: poll [`ApiReceiver::eventfd`], then drain with [`ApiReceiver::try_recv`].
pub struct ApiReceiver {
    rx: Receiver<ApiMessage>,
    evt: EventFd,
}

impl ApiReceiver {
    /// Readable when requests are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The next waiting request, if any (clears the eventfd when none are left).
    pub fn try_recv(&self) -> Option<ApiMessage> {
        match self.rx.try_recv() {
            Ok(m) => Some(m),
            Err(_) => {
                // Clear the wake-up, then look again: a request that arrived in between would
                // otherwise wait for the next one.
                let _ = self.evt.read();
                self.rx.try_recv().ok()
            }
        }
    }
}

/// A connected pair.
pub fn api_channel() -> std::io::Result<(ApiSender, ApiReceiver)> {
    let (tx, rx) = channel();
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    Ok((
        ApiSender {
            tx,
            evt: evt.try_clone()?,
        },
        ApiReceiver { rx, evt },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_reply_round_trip() {
        let (tx, rx) = api_channel().unwrap();
        let loop_thread = std::thread::spawn(move || loop {
            if let Some((req, reply)) = rx.try_recv() {
                let body = match req {
                    ApiRequest::VmmPing => Ok(serde_json::json!({"ok": true})),
                    _ => Err(ApiError::new(409, "no")),
                };
                reply.send(body).unwrap();
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        });
        assert_eq!(tx.call(ApiRequest::VmmPing).unwrap()["ok"], true);
        loop_thread.join().unwrap();
        assert_eq!(tx.call(ApiRequest::VmmPing).unwrap_err().status, 503);
    }

    #[test]
    fn errors_carry_their_causes() {
        let inner = std::io::Error::other("disk gone");
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "boot failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = ApiError::from_error(500, &Outer(inner));
        assert_eq!(e.error, "boot failed");
        assert_eq!(e.causes, vec!["disk gone".to_string()]);
    }
}
