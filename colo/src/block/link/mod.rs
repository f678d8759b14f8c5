//! Block replication at run time: the disk channel's connection, the primary's mirror hooks
//! and initial sync ([`PrimaryDisks`]), the secondary's replicas and write order
//! ([`SecondaryDisks`]), and what the checkpoint workers call at each checkpoint.
//!
//! The disk channel is a [`crate::wire`] connection of its own ([`Channel::Disk`]), opened
//! right after the proxy channel. The primary's writes leave from the PVM's block thread
//! (under the disk's write slot, so in the image's order) and the thread waits for the
//! secondary's ack; the secondary's reader thread applies them in arrival order through a
//! [`WriteOrder`](super::order::WriteOrder) per disk and acks each.

mod primary;
mod secondary;

pub use primary::PrimaryDisks;
pub use secondary::{barrier_patience, finish_merges, DiskTarget, SecondaryDisks};

use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use super::mirror::MirrorCounters;
use super::replica::ReplicaStats;
use super::sync::SyncProgress;
use crate::proxy::link::{Conn, LinkCounters};
pub use crate::wire::Channel;

/// One disk's part of `vm.colo-status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DiskStatus {
    /// Its index in the VM's configuration.
    pub disk: u16,
    /// Its id (primary) or its base image (secondary).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The initial sync's progress.
    pub sync: SyncProgress,
    /// Whether the initial sync finished.
    pub synced: bool,
    /// The primary's mirror.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorCounters>,
    /// The secondary's layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaStats>,
    /// Secondary: the primary's writes applied to the base so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// Secondary: writes waiting for their checkpoint's load now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<usize>,
}

/// Block replication's part of `vm.colo-status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DisksStatus {
    /// Each disk.
    pub disks: Vec<DiskStatus>,
    /// Writes the primary sent (or the secondary held) so far.
    pub writes: u64,
    /// Primary: writes the secondary acknowledged.
    pub acked: u64,
    /// The channel between the hosts.
    pub link: LinkCounters,
}

/// Seconds a side waits for the other's answer that takes a disk's worth of work (hashing
/// it): this much per GiB on top of the channel's timeout.
const PATIENCE_PER_GIB: std::time::Duration = std::time::Duration::from_secs(10);

fn patience(base: std::time::Duration, bytes: u64) -> std::time::Duration {
    base + PATIENCE_PER_GIB
        * u32::try_from(bytes >> 30)
            .unwrap_or(u32::MAX)
            .saturating_add(1)
}

/// How often a waiter looks whether the channel went down.
const WAIT_POLL: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A side's disk connection and its reader thread.
struct DiskConn {
    conn: Arc<Conn>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl DiskConn {
    fn new(conn: Arc<Conn>, reader: JoinHandle<()>) -> Self {
        DiskConn {
            conn,
            reader: Mutex::new(Some(reader)),
        }
    }

    /// Closes the channel and joins the reader (at once: its reads fail).
    fn close(&self) {
        self.conn.close();
        if let Some(h) = lock(&self.reader).take() {
            if h.join().is_err() {
                log::error!("COLO disk channel: the reader panicked");
            }
        }
    }

    /// A second handle on the socket (for the failover switch).
    fn socket(&self) -> std::io::Result<TcpStream> {
        self.conn.socket()
    }
}

/// `what` failed because the channel is down, and why it went down if known.
fn down(conn: &Conn, what: &str) -> String {
    match conn.broken_reason() {
        Some(why) => format!("{what}: the disk channel broke: {why}"),
        None => format!("{what}: the disk channel is closed"),
    }
}
