//! The secondary's end of the disk channel: a [`ReplicaDisk`] per disk of the primary over
//! this host's copy (the base), the primary's writes into it in order, and the checkpoint
//! and failover steps the worker calls.

use std::fs::OpenOptions;
use std::io::BufWriter;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devices::virtio::block::{BlockBackend, RawFile};

use super::{down, lock, patience, Channel, DiskConn, DiskStatus, DisksStatus, WAIT_POLL};
use crate::auth::Psk;
use crate::block::mirror::DiskOp;
use crate::block::order::WriteOrder;
use crate::block::replica::{LayerStore, ReplicaConfig, ReplicaDisk};
use crate::block::sync::{RegionHashes, SyncProgress};
use crate::block::ReplicaHandle;
use crate::proxy::link::{accept, spawn_reader, Conn, LinkError, OnBroken};
use crate::wire::{FrameWriter, Message, MAX_BYE_REASON, MAX_HASH_CHUNK};

/// Where one disk of the primary lives on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskTarget {
    /// The base: this host's copy of the primary's disk (created, sparse, if absent).
    pub path: PathBuf,
}

/// One replica and the order of the writes into it.
struct SvmDisk {
    path: PathBuf,
    size: u64,
    handle: ReplicaHandle<RawFile>,
    order: WriteOrder,
}

struct State {
    disks: Vec<SvmDisk>,
    /// Write frames held (applied or queued) so far: what the acks say.
    held: u64,
    /// The last barrier received.
    barrier: u64,
}

struct Shared {
    conn: Arc<Conn>,
    state: Mutex<State>,
    cv: Condvar,
}

/// The secondary's end of block replication.
pub struct SecondaryDisks {
    shared: Arc<Shared>,
    conn: DiskConn,
}

impl SecondaryDisks {
    /// Takes the primary's disk channel from `listener`; disk `i` of the primary will be
    /// replicated into `targets[i]`, its layers kept in `layers` (a directory per disk).
    pub fn accept(
        listener: &TcpListener,
        psk: &Psk,
        timeout: Duration,
        targets: Vec<DiskTarget>,
        layers: LayerStore,
        on_broken: OnBroken,
    ) -> Result<SecondaryDisks, LinkError> {
        let opened = accept(listener, psk, timeout, Channel::Disk)?;
        let conn = Conn::new(opened.stream, on_broken);
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            state: Mutex::new(State {
                disks: Vec::new(),
                held: 0,
                barrier: 0,
            }),
            cv: Condvar::new(),
        });
        let mut handler = Handler {
            shared: shared.clone(),
            writer: opened.writer,
            targets,
            layers,
        };
        let reader = spawn_reader("colo-disk-rx", opened.reader, conn.clone(), move |msg| {
            handler.received(msg).inspect_err(|why| handler.refuse(why))
        })?;
        Ok(SecondaryDisks {
            shared,
            conn: DiskConn::new(conn, reader),
        })
    }

    /// The SVM's backends: one handle per disk announced so far, in order.
    pub fn backends(&self) -> Vec<Box<dyn BlockBackend>> {
        lock(&self.shared.state)
            .disks
            .iter()
            .map(|d| Box::new(d.handle.clone()) as Box<dyn BlockBackend>)
            .collect()
    }

    /// Waits until every write the PVM made before checkpoint `n`'s pause arrived (its
    /// barrier), so the checkpoint's disk is whole before it is applied.
    pub fn wait_barrier(&self, n: u64, patience: Duration) -> Result<(), String> {
        let deadline = Instant::now() + patience;
        let mut st = lock(&self.shared.state);
        while st.barrier < n {
            if self.shared.conn.is_down() {
                return Err(down(
                    &self.shared.conn,
                    &format!("waiting for checkpoint {n}'s write barrier"),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "checkpoint {n}'s write barrier did not come within {patience:?}"
                ));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, WAIT_POLL.min(deadline - now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// The SVM loaded checkpoint `n` (it is paused): its disks are the PVM's at the pause,
    /// then the writes of epoch `n` that waited go into the bases.
    pub fn loaded(&self, n: u64) -> Result<(), String> {
        let mut st = lock(&self.shared.state);
        for d in &mut st.disks {
            let mut disk = d.handle.lock().map_err(|e| e.to_string())?;
            d.order
                .loaded(&mut disk, n)
                .map_err(|e| format!("disk {}: checkpoint {n}: {e}", d.path.display()))?;
        }
        Ok(())
    }

    /// The primary is gone and the SVM takes over: writes of checkpoints it never loaded
    /// are dropped, and each disk's layers are merged into its base.
    pub fn failover(&self) -> Result<(), String> {
        self.close();
        let mut st = lock(&self.shared.state);
        for d in &mut st.disks {
            let dropped = d.order.failover();
            let mut disk = d.handle.lock().map_err(|e| e.to_string())?;
            disk.failover()
                .map_err(|e| format!("disk {}: merging its layers: {e}", d.path.display()))?;
            log::info!(
                "COLO disk {}: merged into the base ({} writes of an unloaded checkpoint dropped)",
                d.path.display(),
                dropped
            );
        }
        Ok(())
    }

    /// Stops the channel (protection ended).
    pub fn close(&self) {
        self.conn.close();
    }

    /// A second handle on the channel's socket (for the failover switch).
    pub fn socket(&self) -> std::io::Result<TcpStream> {
        self.conn.socket()
    }

    /// The status, as a closure the status document calls while the link runs.
    pub fn status_source(&self) -> Arc<dyn Fn() -> DisksStatus + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || status(&shared))
    }

    /// The status now.
    pub fn status(&self) -> DisksStatus {
        status(&self.shared)
    }
}

impl Drop for SecondaryDisks {
    fn drop(&mut self) {
        self.close();
    }
}

fn status(shared: &Shared) -> DisksStatus {
    let st = lock(&shared.state);
    let disks = st
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskStatus {
            disk: i as u16,
            name: d.path.display().to_string(),
            size: d.size,
            sync: SyncProgress::default(),
            synced: st.barrier > 0,
            replica: d.handle.lock().ok().map(|r| r.stats()),
            applied: Some(d.order.applied()),
            queued: Some(d.order.queued()),
            ..DiskStatus::default()
        })
        .collect();
    DisksStatus {
        disks,
        writes: st.held,
        acked: st.held,
        link: shared.conn.stats.counters(0),
    }
}

/// The reader thread's side: it answers on the channel itself.
struct Handler {
    shared: Arc<Shared>,
    writer: FrameWriter<BufWriter<TcpStream>>,
    targets: Vec<DiskTarget>,
    layers: LayerStore,
}

impl Handler {
    /// Tells the primary why this side ends the channel, so its exit says so.
    fn refuse(&mut self, why: &str) {
        let mut reason: String = why
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        while reason.len() > MAX_BYE_REASON {
            reason.pop();
        }
        if let Err(e) = self.writer.write(&Message::Bye { reason: &reason }) {
            log::debug!("COLO disk channel: the bye did not go out: {e}");
        }
    }

    fn received(&mut self, msg: Message<'_>) -> Result<(), String> {
        match msg {
            Message::DiskInfo { disk, size } => self.announce(disk, size),
            Message::DiskWrite { disk, offset, data } => {
                self.write(disk, DiskOp::Write { offset, data })
            }
            Message::DiskZeroes { disk, offset, len } => {
                self.write(disk, DiskOp::Zeroes { offset, len })
            }
            Message::Epoch { checkpoint } => {
                let mut st = lock(&self.shared.state);
                for d in &mut st.disks {
                    d.order
                        .barrier(checkpoint)
                        .map_err(|e| format!("disk {}: {e}", d.path.display()))?;
                }
                if checkpoint != st.barrier + 1 {
                    return Err(format!("write barrier {checkpoint} after {}", st.barrier));
                }
                st.barrier = checkpoint;
                self.shared.cv.notify_all();
                Ok(())
            }
            other => Err(format!("unexpected {} from the primary", other.ty())),
        }
    }

    /// The primary's disk `disk` has `size` bytes: open (or create) its base, hash it, send
    /// the list.
    fn announce(&mut self, disk: u16, size: u64) -> Result<(), String> {
        let index = usize::from(disk);
        if index != lock(&self.shared.state).disks.len() {
            return Err(format!("disk {disk} announced out of order"));
        }
        let target = self.targets.get(index).ok_or_else(|| {
            format!(
                "the primary's VM has more disks than the {} this secondary was given \
                 (one --disk path=BASE per disk of the primary)",
                self.targets.len()
            )
        })?;
        let mut base = open_base(&target.path, size)?;
        let hashes = RegionHashes::compute(&mut base)
            .map_err(|e| format!("disk {}: hashing the base: {e}", target.path.display()))?;
        let layers = match &self.layers {
            LayerStore::Memory => LayerStore::Memory,
            LayerStore::Files(dir) => LayerStore::Files(layers_of(dir, index)),
        };
        let replica = ReplicaDisk::open(
            base,
            &ReplicaConfig {
                layers,
                ..ReplicaConfig::default()
            },
        )
        .map_err(|e| format!("disk {}: {e}", target.path.display()))?;
        lock(&self.shared.state).disks.push(SvmDisk {
            path: target.path.clone(),
            size,
            handle: ReplicaHandle::new(replica),
            order: WriteOrder::new(),
        });
        let list = hashes.encode();
        let total = list.len() as u64;
        for chunk in list.chunks(MAX_HASH_CHUNK) {
            self.writer
                .queue(&Message::DiskHashes { disk, total, chunk })
                .map_err(|e| format!("sending the hash list: {e}"))?;
            self.sent();
        }
        self.writer
            .flush()
            .map_err(|e| format!("sending the hash list: {e}"))
    }

    /// A write of the primary (or of the initial sync): into its disk's order, then acked.
    fn write(&mut self, disk: u16, op: DiskOp<'_>) -> Result<(), String> {
        let held = {
            let mut st = lock(&self.shared.state);
            let d = st
                .disks
                .get_mut(usize::from(disk))
                .ok_or_else(|| format!("a write to disk {disk}, which was not announced"))?;
            let mut replica = d.handle.lock().map_err(|e| e.to_string())?;
            d.order
                .write(&mut replica, op)
                .map_err(|e| format!("disk {}: {e}", d.path.display()))?;
            drop(replica);
            st.held += 1;
            st.held
        };
        self.writer
            .write(&Message::DiskAck { writes: held })
            .map_err(|e| format!("acknowledging a disk write: {e}"))?;
        self.sent();
        Ok(())
    }

    fn sent(&self) {
        self.shared
            .conn
            .stats
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// This host's copy of a `size`-byte disk at `path`: created sparse if absent; one of
/// another size is refused (it is somebody else's disk, or a mistake).
fn open_base(path: &Path, size: u64) -> Result<RawFile, String> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => f
            .set_len(size)
            .map_err(|e| format!("creating the base {}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating the base {}: {e}", path.display())),
    }
    let base = RawFile::open(path, false)
        .map_err(|e| format!("opening the base {}: {e}", path.display()))?;
    if base.size() != size {
        return Err(format!(
            "the base {} has {} bytes and the primary's disk {size}: give this secondary a \
             copy of that disk, or a path that does not exist yet",
            path.display(),
            base.size()
        ));
    }
    Ok(base)
}

/// The layers' directory of disk `index` under `layers` (one per disk).
fn layers_of(layers: &Path, index: usize) -> PathBuf {
    layers.join(format!("disk{index}"))
}

/// Finishes the failover merges a crash of the secondary's process cut short: for each target
/// whose layers (under `layers`) hold a merge journal, the merge resumes where the journal says
/// and the copy is then whole (the SVM's view at the failover). Returns the copies it finished.
/// Until this ran, such a copy must not be booted: part of the SVM's writes are only in the
/// layers.
pub fn finish_merges(targets: &[DiskTarget], layers: &Path) -> Result<Vec<PathBuf>, String> {
    let mut finished = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let dir = layers_of(layers, i);
        if !crate::block::merge_unfinished(&dir) {
            continue;
        }
        let base = RawFile::open(&target.path, false)
            .map_err(|e| format!("opening {}: {e}", target.path.display()))?;
        let config = ReplicaConfig {
            layers: LayerStore::Files(dir),
            ..ReplicaConfig::default()
        };
        let mut disk = ReplicaDisk::open(base, &config)
            .and_then(|mut d| d.failover().map(|()| d))
            .map_err(|e| format!("finishing the merge into {}: {e}", target.path.display()))?;
        log::info!(
            "COLO disk {}: finished a merge a crash had cut short ({} blocks)",
            target.path.display(),
            disk.stats().merged_blocks
        );
        disk.flush().map_err(|e| e.to_string())?;
        finished.push(target.path.clone());
    }
    Ok(finished)
}

/// How long the worker waits for a checkpoint's barrier.
pub fn barrier_patience(timeout: Duration) -> Duration {
    patience(timeout, 0)
}
