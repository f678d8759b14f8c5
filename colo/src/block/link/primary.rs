//! The primary's end of the disk channel: the mirror in each disk's write slot, the initial
//! sync and the write barrier of every checkpoint.

use std::io::BufWriter;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devices::virtio::block::{BlockBackend, RawFile};

use super::{down, lock, patience, Channel, DiskConn, DiskStatus, DisksStatus, WAIT_POLL};
use crate::auth::Psk;
use crate::block::mirror::{Completion, DiskOp, Mirror, Replicator};
use crate::block::sync::{self, RegionHashes, SyncPlan, SyncProgress};
use crate::proxy::link::{connect, spawn_reader, Conn, LinkError, OnBroken};
use crate::vm::ProtectedDisk;
use crate::wire::{FrameWriter, Message, MAX_DISK_CHUNK};

/// What the writer side holds: the frames go out in this order.
struct Out {
    writer: FrameWriter<BufWriter<TcpStream>>,
}

/// One disk's sync state, for the status.
#[derive(Clone, Default)]
struct SyncState {
    /// The disk's size.
    size: u64,
    progress: SyncProgress,
    done: bool,
    /// The secondary's hash list as it arrives.
    hashes: Vec<u8>,
    /// Its announced length, once the first chunk came.
    hashes_total: Option<u64>,
}

/// What the block threads, the reader and the worker share.
struct Shared {
    conn: Arc<Conn>,
    out: Mutex<Out>,
    /// Write frames sent so far (the secondary acks this count). Apart from `out`, whose holder
    /// may sit in a socket write: the reader must never wait for it, or a secondary blocked on
    /// sending acks and a primary blocked on sending writes would wait for each other.
    sent: AtomicU64,
    acked: Mutex<u64>,
    acked_cv: Condvar,
    sync: Mutex<Vec<SyncState>>,
    sync_cv: Condvar,
    timeout: Duration,
}

impl Shared {
    /// Sends `op` of `disk` after everything sent before (in chunks the wire takes); returns
    /// the count of write frames the secondary must ack for it.
    fn send(&self, disk: u16, op: DiskOp<'_>) -> Result<u64, String> {
        if self.conn.is_down() {
            return Err(down(&self.conn, "sending a disk write"));
        }
        let mut out = lock(&self.out);
        let out = &mut *out;
        let mut queue = |msg: &Message<'_>| {
            out.writer
                .queue(msg)
                .map_err(|e| format!("sending to the secondary: {e}"))
        };
        // Counted before it is queued: a full buffer may put the frame on the wire (and the
        // secondary may ack it) before `queue` returns.
        let count = || {
            self.sent.fetch_add(1, Ordering::AcqRel);
            self.conn.stats.sent.fetch_add(1, Ordering::Relaxed);
        };
        match op {
            DiskOp::Write { offset, data } => {
                for (i, chunk) in data.chunks(MAX_DISK_CHUNK).enumerate() {
                    count();
                    queue(&Message::DiskWrite {
                        disk,
                        offset: offset + (i * MAX_DISK_CHUNK) as u64,
                        data: chunk,
                    })?;
                }
            }
            // An empty range changes nothing (and the wire refuses it).
            DiskOp::Zeroes { len: 0, .. } => {}
            DiskOp::Zeroes { offset, len } => {
                count();
                queue(&Message::DiskZeroes { disk, offset, len })?;
            }
        }
        out.writer
            .flush()
            .map_err(|e| format!("sending to the secondary: {e}"))?;
        // Only this holder of `out` counts up: the count now ends with this op.
        Ok(self.sent.load(Ordering::Acquire))
    }

    /// Waits until the secondary holds the first `n` writes.
    fn wait_acked(&self, n: u64, patience: Duration) -> Result<(), String> {
        let deadline = Instant::now() + patience;
        let mut acked = lock(&self.acked);
        while *acked < n {
            if self.conn.is_down() {
                return Err(down(
                    &self.conn,
                    "waiting for the secondary to hold a write",
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "the secondary did not acknowledge a disk write within {patience:?}"
                ));
            }
            acked = self
                .acked_cv
                .wait_timeout(acked, WAIT_POLL.min(deadline - now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// A message from the secondary (the reader thread).
    fn received(&self, msg: Message<'_>) -> Result<(), String> {
        match msg {
            Message::DiskAck { writes } => {
                let sent = self.sent.load(Ordering::Acquire);
                if writes > sent {
                    return Err(format!(
                        "the secondary acknowledged {writes} disk writes of {sent} sent"
                    ));
                }
                *lock(&self.acked) = writes;
                self.acked_cv.notify_all();
                Ok(())
            }
            Message::DiskHashes { disk, total, chunk } => {
                let mut sync = lock(&self.sync);
                let s = sync
                    .get_mut(usize::from(disk))
                    .ok_or_else(|| format!("hashes of disk {disk}, which was not announced"))?;
                let limit =
                    sync::HEADER_LEN as u64 + sync::region_count(s.size) * sync::HASH_LEN as u64;
                if total > limit || s.hashes_total.is_some_and(|t| t != total) {
                    return Err(format!(
                        "disk {disk}: a hash list of {total} bytes (at most {limit})"
                    ));
                }
                if s.hashes.len() as u64 + chunk.len() as u64 > total {
                    return Err(format!("disk {disk}: the hash list overruns its length"));
                }
                s.hashes_total = Some(total);
                s.hashes.extend_from_slice(chunk);
                self.sync_cv.notify_all();
                Ok(())
            }
            other => Err(format!("unexpected {} from the secondary", other.ty())),
        }
    }
}

/// Hands one disk's writes to the channel.
struct DiskReplicator {
    shared: Arc<Shared>,
    disk: u16,
}

impl Replicator for DiskReplicator {
    fn replicate(&self, op: DiskOp<'_>) -> Result<(), String> {
        self.shared.send(self.disk, op).map(|_| ())
    }

    fn settle(&self) -> Result<(), String> {
        // Everything sent so far on the channel, other disks' writes included: they are
        // ahead in the same stream, so the wait is the same.
        let sent = self.shared.sent.load(Ordering::Acquire);
        self.shared.wait_acked(sent, self.shared.timeout)
    }

    fn failed(&self, why: String) {
        self.shared
            .conn
            .broken(format!("replicating disk {}: {why}", self.disk));
    }
}

/// One disk of the PVM and its mirror.
struct PvmDisk {
    disk: ProtectedDisk,
    mirror: Arc<Mirror>,
}

/// The primary's end of block replication: created once the proxy channel is up, ended with
/// protection.
pub struct PrimaryDisks {
    shared: Arc<Shared>,
    disks: Vec<PvmDisk>,
    conn: DiskConn,
}

impl PrimaryDisks {
    /// Connects the disk channel to the secondary at `addr`, announces `disks` and puts a
    /// mirror into each one's write slot: every write from now on reaches the secondary.
    /// `on_broken` hears once if the channel breaks (or a write cannot be replicated).
    pub fn connect(
        addr: SocketAddr,
        psk: &Psk,
        timeout: Duration,
        disks: Vec<ProtectedDisk>,
        completion: Completion,
        on_broken: OnBroken,
    ) -> Result<PrimaryDisks, LinkError> {
        if disks.len() > usize::from(u16::MAX) {
            return Err(LinkError::Io(std::io::Error::other("too many disks")));
        }
        let opened = connect(addr, psk, timeout, Channel::Disk)?;
        let conn = Conn::new(opened.stream, on_broken);
        let sync = disks
            .iter()
            .map(|d| SyncState {
                size: d.size,
                ..SyncState::default()
            })
            .collect();
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            out: Mutex::new(Out {
                writer: opened.writer,
            }),
            sent: AtomicU64::new(0),
            acked: Mutex::new(0),
            acked_cv: Condvar::new(),
            sync: Mutex::new(sync),
            sync_cv: Condvar::new(),
            timeout,
        });
        let s = shared.clone();
        let reader = spawn_reader("colo-disk-rx", opened.reader, conn.clone(), move |msg| {
            s.received(msg)
        })?;
        let mut link = PrimaryDisks {
            shared: shared.clone(),
            disks: Vec::new(),
            conn: DiskConn::new(conn, reader),
        };
        {
            let mut out = lock(&shared.out);
            for (i, d) in disks.iter().enumerate() {
                out.writer.queue(&Message::DiskInfo {
                    disk: i as u16,
                    size: d.size,
                })?;
                shared.conn.stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            out.writer.flush()?;
        }
        for (i, disk) in disks.into_iter().enumerate() {
            let replicator = Arc::new(DiskReplicator {
                shared: shared.clone(),
                disk: i as u16,
            });
            let mirror = Mirror::new(replicator, completion);
            if let Err(e) = disk.slot.install(mirror.clone()) {
                link.close();
                return Err(LinkError::SlotTaken(format!("disk {}: {e}", disk.id)));
            }
            link.disks.push(PvmDisk { disk, mirror });
        }
        Ok(link)
    }

    /// Makes every secondary base equal its PVM disk: compares region hashes and sends the
    /// regions that differ while the PVM runs (its writes are mirrored meanwhile, each region
    /// read and sent under the disk's write slot so the two streams stay in the image's
    /// order), then waits until the secondary holds all of it. `progress` hears each disk's
    /// progress now and then.
    pub fn sync(&self, mut progress: impl FnMut(u16, &SyncProgress)) -> Result<(), String> {
        for (i, d) in self.disks.iter().enumerate() {
            let disk = i as u16;
            let mut image = RawFile::open(&d.disk.path, true).map_err(|e| {
                format!("disk {}: opening {}: {e}", d.disk.id, d.disk.path.display())
            })?;
            let mine = RegionHashes::compute(&mut image)
                .map_err(|e| format!("disk {}: hashing: {e}", d.disk.id))?;
            let theirs = self.their_hashes(i, d.disk.size)?;
            let plan = SyncPlan::new(&mine, &theirs);
            let mut p = plan.progress();
            self.set_progress(i, p, false);
            progress(disk, &p);
            let mut buf = vec![0u8; sync::REGION as usize];
            let mut last_report = Instant::now();
            for range in plan.ranges() {
                let data = &mut buf[..range.len as usize];
                d.disk.slot.exclusive(|| {
                    image.read_at(range.offset, data).map_err(|e| {
                        format!("disk {}: reading {}: {e}", d.disk.id, range.offset)
                    })?;
                    self.shared.send(
                        disk,
                        DiskOp::Write {
                            offset: range.offset,
                            data,
                        },
                    )
                })?;
                p.sent(*range);
                self.set_progress(i, p, false);
                if last_report.elapsed() >= Duration::from_secs(1) {
                    last_report = Instant::now();
                    progress(disk, &p);
                }
            }
            let sent = self.shared.sent.load(Ordering::Acquire);
            self.shared
                .wait_acked(sent, patience(self.shared.timeout, plan.bytes()))?;
            self.set_progress(i, p, true);
            progress(disk, &p);
        }
        Ok(())
    }

    fn set_progress(&self, i: usize, p: SyncProgress, done: bool) {
        if let Some(s) = lock(&self.shared.sync).get_mut(i) {
            s.progress = p;
            s.done = done;
        }
    }

    /// Waits for the secondary's whole hash list of disk `i`.
    fn their_hashes(&self, i: usize, size: u64) -> Result<RegionHashes, String> {
        let wait = patience(self.shared.timeout, size);
        let deadline = Instant::now() + wait;
        let mut sync = lock(&self.shared.sync);
        loop {
            let s = &sync[i];
            if s.hashes_total.is_some_and(|t| t == s.hashes.len() as u64) {
                return RegionHashes::decode(&s.hashes)
                    .map_err(|e| format!("disk {i}: the secondary's hash list: {e}"));
            }
            if self.shared.conn.is_down() {
                return Err(down(
                    &self.shared.conn,
                    "waiting for the secondary's hash list",
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "disk {i}: the secondary sent no hash list within {wait:?}"
                ));
            }
            sync = self
                .shared
                .sync_cv
                .wait_timeout(sync, WAIT_POLL.min(deadline - now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The PVM is paused for checkpoint `n` (every write it completed was sent): the barrier.
    pub fn checkpoint_started(&self, n: u64) -> Result<(), String> {
        if self.shared.conn.is_down() {
            return Err(down(&self.shared.conn, "write barrier"));
        }
        let mut out = lock(&self.shared.out);
        out.writer
            .write(&Message::Epoch { checkpoint: n })
            .map_err(|e| format!("disk channel: write barrier {n}: {e}"))?;
        self.shared.conn.stats.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Protection ended: the disks go on alone (hooks out), the channel closes.
    pub fn close(&self) {
        for d in &self.disks {
            d.mirror.detach();
            d.disk.slot.remove();
        }
        self.conn.close();
    }

    /// A second handle on the channel's socket (for the failover switch).
    pub fn socket(&self) -> std::io::Result<TcpStream> {
        self.conn.socket()
    }

    /// The status, as a closure the status document calls while the link runs.
    pub fn status_source(&self) -> Arc<dyn Fn() -> DisksStatus + Send + Sync> {
        let shared = self.shared.clone();
        let disks: Vec<(String, Arc<Mirror>)> = self
            .disks
            .iter()
            .map(|d| (d.disk.id.clone(), d.mirror.clone()))
            .collect();
        Arc::new(move || status(&shared, &disks))
    }

    /// The status now.
    pub fn status(&self) -> DisksStatus {
        (self.status_source())()
    }
}

impl Drop for PrimaryDisks {
    fn drop(&mut self) {
        self.close();
    }
}

fn status(shared: &Shared, disks: &[(String, Arc<Mirror>)]) -> DisksStatus {
    let sync = lock(&shared.sync).clone();
    let disks = disks
        .iter()
        .zip(sync)
        .enumerate()
        .map(|(i, ((name, mirror), s))| DiskStatus {
            disk: i as u16,
            name: name.clone(),
            size: s.size,
            sync: s.progress,
            synced: s.done,
            mirror: Some(mirror.counters()),
            ..DiskStatus::default()
        })
        .collect();
    DisksStatus {
        disks,
        writes: shared.sent.load(Ordering::Acquire),
        acked: *lock(&shared.acked),
        link: shared.conn.stats.counters(0),
    }
}
