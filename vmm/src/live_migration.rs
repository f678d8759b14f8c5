//! Live migration, driven by a worker thread per direction so the control loop keeps serving
//! the API (`vm.migration-status`) while pages move. The workers ask the control loop for what
//! only it may do (pause the VM and capture its state; build, fill and start the destination
//! VM) through [`WorkerRequest`]s.
//!
//! Source: connect N channels → Start → dirty logging on → round 1 (all RAM) → rounds of dirty
//! pages until the precopy model says the rest fits the downtime budget → pause → last dirty
//! pages → State → Complete → the destination acks once it runs → source VM shuts down. Any
//! failure abandons the stream and resumes the source VM. `docs/migration.md` has the diagram.

use std::sync::mpsc::{sync_channel, Receiver as MpscReceiver, Sender as MpscSender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{MigrationPhase, MigrationStatus, MigrationUrl};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::dirty::{DirtyBitmap, DirtyTracker};
use crate::memory::GuestMemory;
use crate::migration::channels::{Event, Receiver, ReceiverOptions, Sender, SenderOptions};
use crate::migration::precopy::{decide, Decision, PrecopyConfig, RoundReport};
use crate::migration::ranges::{MemRange, MemoryLayout};
use crate::migration::transport::{self, Transport};
use crate::migration::{new_session_id, StartInfo};

/// How long any connect, accept or socket I/O may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a receiver waits for the source to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);

/// What a migration worker asks of the control loop.
pub enum WorkerRequest {
    /// Source: pause the VM and return its serialized state.
    PauseAndSave(SyncSender<Result<Vec<u8>, String>>),
    /// Source: finished (Ok: the destination runs the guest).
    SourceDone(Result<(), String>),
    /// Destination: build a VM for this config (memory to be filled) and return its memory.
    CreateVm(Box<VmConfig>, SyncSender<Result<GuestMemory, String>>),
    /// Destination: apply the serialized state to the new VM.
    ApplyState(Vec<u8>, SyncSender<Result<(), String>>),
    /// Destination: run the VM.
    Resume(SyncSender<Result<(), String>>),
    /// Destination: finished (Err: the new VM must go).
    DestinationDone(Result<(), String>),
    /// COLO's requests.
    Colo(crate::colo_host::ColoRequest),
}

/// The workers' way to the control loop: a channel plus an eventfd the loop polls.
#[derive(Clone)]
pub struct LoopLink {
    tx: MpscSender<WorkerRequest>,
    evt: Arc<EventFd>,
}

impl LoopLink {
    /// A link and the loop's end of it.
    pub fn new() -> std::io::Result<(LoopLink, MpscReceiver<WorkerRequest>, Arc<EventFd>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok((
            LoopLink {
                tx,
                evt: evt.clone(),
            },
            rx,
            evt,
        ))
    }

    pub(crate) fn send(&self, req: WorkerRequest) -> Result<(), String> {
        self.tx
            .send(req)
            .map_err(|_| "the control loop is gone".to_string())?;
        self.evt
            .write(1)
            .map_err(|e| format!("waking the control loop: {e}"))
    }

    pub(crate) fn ask<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, String>>) -> WorkerRequest,
    ) -> Result<T, String> {
        let (tx, rx) = sync_channel(1);
        self.send(make(tx))?;
        rx.recv_timeout(Duration::from_secs(120))
            .map_err(|_| "the control loop did not answer".to_string())?
    }
}

/// Shared, always-readable progress.
pub type StatusCell = Arc<Mutex<MigrationStatus>>;

/// A fresh status.
pub fn idle_status() -> MigrationStatus {
    MigrationStatus::idle()
}

fn update(cell: &StatusCell, f: impl FnOnce(&mut MigrationStatus)) {
    if let Ok(mut s) = cell.lock() {
        f(&mut s);
    }
}

/// What the source worker needs, captured by the control loop.
pub struct SourcePlan {
    /// Where to send.
    pub url: MigrationUrl,
    /// Parallel channels.
    pub channels: u16,
    /// Pause budget.
    pub downtime: Duration,
    /// Guest memory (read while the guest runs).
    pub memory: GuestMemory,
    /// Dirty pages.
    pub dirty: DirtyTracker,
    /// RAM regions.
    pub regions: Vec<MemRange>,
    /// vCPUs.
    pub vcpus: u32,
    /// The VM's configuration, for the destination to rebuild the hardware.
    pub config_json: String,
    /// Where progress events go.
    pub events: api::EventMonitor,
}

fn connect(url: &MigrationUrl, channels: u16) -> Result<Vec<Box<dyn Transport>>, String> {
    match url {
        MigrationUrl::Tcp { .. } => {
            let addr = url
                .socket_addr()
                .and_then(|a| std::net::ToSocketAddrs::to_socket_addrs(&a).ok()?.next())
                .ok_or_else(|| format!("cannot resolve {url}"))?;
            transport::connect_tcp(addr, channels, IO_TIMEOUT).map_err(|e| e.to_string())
        }
        MigrationUrl::Unix(path) => {
            transport::connect_unix(path, channels, IO_TIMEOUT).map_err(|e| e.to_string())
        }
    }
}

fn ranges_of(bitmaps: &[DirtyBitmap]) -> Result<(Vec<MemRange>, u64), String> {
    crate::migration::dirty_set_ranges(bitmaps).map_err(|e| e.to_string())
}

/// Starts the source worker; its progress lands in `status`.
pub fn start_source(plan: SourcePlan, link: LoopLink, status: StatusCell) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("migration-send".into())
        .spawn(move || {
            let result = run_source(&plan, &link, &status);
            if result.is_err() {
                let _ = plan.dirty.stop();
            }
            let _ = link.send(WorkerRequest::SourceDone(result));
        })
        .map(|_| ())
}

fn run_source(plan: &SourcePlan, link: &LoopLink, status: &StatusCell) -> Result<(), String> {
    let started = Instant::now();
    let total: u64 = plan.regions.iter().map(|r| r.len).sum();
    update(status, |s| {
        *s = idle_status();
        s.phase = MigrationPhase::Active;
        s.total_bytes = total;
    });
    let streams = connect(&plan.url, plan.channels)?;
    let mut sender = Sender::new(streams, new_session_id(), SenderOptions::default())
        .map_err(|e| e.to_string())?;
    let layout = MemoryLayout::new(plan.regions.clone()).map_err(|e| e.to_string())?;
    let result = (|| {
        sender
            .send_start(&StartInfo {
                layout,
                vcpus: plan.vcpus,
                config_json: plan.config_json.clone(),
            })
            .map_err(|e| e.to_string())?;
        plan.dirty.start().map_err(|e| e.to_string())?;
        precopy(plan, link, &mut sender, status, started)
    })();
    if let Err(e) = &result {
        sender.abandon(e);
    }
    result
}

fn precopy(
    plan: &SourcePlan,
    link: &LoopLink,
    sender: &mut Sender,
    status: &StatusCell,
    started: Instant,
) -> Result<(), String> {
    let cfg = PrecopyConfig {
        downtime_budget: plan.downtime,
        ..PrecopyConfig::default()
    };
    let mut history: Vec<RoundReport> = Vec::new();
    let mut sent_total = 0u64;
    let mut ranges = plan.regions.clone();
    loop {
        let t = Instant::now();
        let stats = sender
            .send_round(&ranges, &plan.memory)
            .map_err(|e| e.to_string())?;
        sender.wait_round_applied().map_err(|e| e.to_string())?;
        let duration = t.elapsed();
        let bytes = stats.pages.data_bytes + stats.pages.zero_bytes;
        sent_total += bytes;
        let pending = plan.dirty.take().map_err(|e| e.to_string())?;
        let (next, dirty_bytes) = ranges_of(&pending)?;
        history.push(RoundReport {
            bytes_sent: bytes,
            duration,
            dirty_after: dirty_bytes,
        });
        let decision = decide(&cfg, &history);
        let rate = dirty_bytes as f64 / duration.as_secs_f64().max(1e-3);
        update(status, |s| {
            s.round = history.len() as u32;
            s.bytes = sent_total;
            s.dirty_rate = rate as u64;
            s.elapsed_ms = started.elapsed().as_millis() as u64;
            if let Decision::StopAndCopy {
                predicted_downtime, ..
            } = decision
            {
                s.eta_ms = predicted_downtime.as_millis() as u64;
            }
        });
        plan.events.emit(
            "migration",
            "round",
            serde_json::json!({
                "round": history.len(),
                "bytes": bytes,
                "total_bytes": sent_total,
                "dirty_bytes": dirty_bytes,
                "dirty_rate": rate as u64,
                "duration_ms": duration.as_secs_f64() * 1000.0,
            }),
        );
        match decision {
            Decision::AnotherRound => ranges = next,
            Decision::StopAndCopy { reason, .. } => {
                log::info!(
                    "migration: stop-and-copy after {} rounds ({reason:?}), {dirty_bytes} bytes left",
                    history.len()
                );
                return stop_and_copy(plan, link, sender, status, started, pending, sent_total);
            }
        }
    }
}

fn stop_and_copy(
    plan: &SourcePlan,
    link: &LoopLink,
    sender: &mut Sender,
    status: &StatusCell,
    started: Instant,
    mut pending: Vec<DirtyBitmap>,
    sent_before: u64,
) -> Result<(), String> {
    let paused = Instant::now();
    // From here the guest is stopped: the control loop resumes it if anything below fails.
    let blob = link.ask(WorkerRequest::PauseAndSave)?;
    let last = plan.dirty.take().map_err(|e| e.to_string())?;
    crate::migration::merge_dirty(&mut pending, &last);
    let (ranges, bytes) = ranges_of(&pending)?;
    let stats = sender
        .send_round(&ranges, &plan.memory)
        .map_err(|e| e.to_string())?;
    sender.wait_round_applied().map_err(|e| e.to_string())?;
    sender.send_state(&blob).map_err(|e| e.to_string())?;
    // Returns once the destination has loaded everything and acked: it runs from here on.
    sender.complete().map_err(|e| e.to_string())?;
    let downtime = paused.elapsed();
    let _ = plan.dirty.stop();
    update(status, |s| {
        s.phase = MigrationPhase::Completed;
        s.bytes = sent_before + stats.pages.data_bytes + stats.pages.zero_bytes;
        s.downtime_ms = Some(downtime.as_secs_f64() * 1000.0);
        s.elapsed_ms = started.elapsed().as_millis() as u64;
        s.eta_ms = 0;
    });
    log::info!(
        "migration complete: {} ms total, {:.1} ms downtime, last round {bytes} bytes",
        started.elapsed().as_millis(),
        downtime.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Where the destination listens.
pub enum Listener {
    /// TCP.
    Tcp(std::net::TcpListener),
    /// A Unix socket (its file is removed when the migration ends).
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `url` (in the control loop, so a bad address fails the API call itself).
    pub fn bind(url: &MigrationUrl) -> Result<Listener, String> {
        match url {
            MigrationUrl::Tcp { .. } => {
                let addr = url
                    .socket_addr()
                    .ok_or_else(|| format!("bad address {url}"))?;
                std::net::TcpListener::bind(&addr)
                    .map(Listener::Tcp)
                    .map_err(|e| format!("listen on {addr}: {e}"))
            }
            MigrationUrl::Unix(path) => {
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(path);
                }
                std::os::unix::net::UnixListener::bind(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(|e| format!("listen on {}: {e}", path.display()))
            }
        }
    }

    /// Accepts the source's channels.
    fn accept_session(&self) -> Result<Vec<Box<dyn Transport>>, String> {
        match self {
            Listener::Tcp(l) => transport::accept_session_tcp(l, ACCEPT_TIMEOUT, IO_TIMEOUT),
            Listener::Unix(l, _) => transport::accept_session_unix(l, ACCEPT_TIMEOUT, IO_TIMEOUT),
        }
        .map_err(|e| e.to_string())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts the destination worker on `listener`.
pub fn start_destination(
    listener: Listener,
    link: LoopLink,
    status: StatusCell,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("migration-recv".into())
        .spawn(move || {
            let result = run_destination(&listener, &link, &status);
            update(&status, |s| match &result {
                Ok(()) => s.phase = MigrationPhase::Completed,
                Err(e) => {
                    s.phase = MigrationPhase::Failed;
                    s.error = Some(e.clone());
                }
            });
            let _ = link.send(WorkerRequest::DestinationDone(result));
        })
        .map(|_| ())
}

fn run_destination(
    listener: &Listener,
    link: &LoopLink,
    status: &StatusCell,
) -> Result<(), String> {
    let streams = listener.accept_session()?;
    let started = Instant::now();
    let mut receiver =
        Receiver::new(streams, ReceiverOptions::default()).map_err(|e| e.to_string())?;
    let result = receive(&mut receiver, link, status, started);
    if let Err(e) = &result {
        receiver.reject(e);
    }
    result
}

fn receive(
    receiver: &mut Receiver,
    link: &LoopLink,
    status: &StatusCell,
    started: Instant,
) -> Result<(), String> {
    let start = receiver.recv_start().map_err(|e| e.to_string())?;
    let config: VmConfig = serde_json::from_str(&start.config_json)
        .map_err(|e| format!("the source's VM configuration does not parse: {e}"))?;
    config.validate().map_err(|e| e.to_string())?;
    if u32::from(config.cpus.boot) != start.vcpus || config.memory.size != start.memory_size() {
        return Err("the Start message contradicts its own configuration".into());
    }
    update(status, |s| {
        *s = idle_status();
        s.phase = MigrationPhase::Active;
        s.total_bytes = start.memory_size();
    });
    let memory = link.ask(|tx| WorkerRequest::CreateVm(Box::new(config), tx))?;
    let regions: Vec<MemRange> = crate::snapshot::memory_ranges_of(&memory)
        .into_iter()
        .map(|r| MemRange {
            gpa: r.gpa,
            len: r.len,
        })
        .collect();
    if regions != start.layout.regions() {
        return Err("the source's memory layout differs from the VM built here".into());
    }
    receiver
        .start_applying(Arc::new(memory))
        .map_err(|e| e.to_string())?;
    let mut state_applied = false;
    loop {
        match receiver.next_event().map_err(|e| e.to_string())? {
            Event::RoundDone { round } => {
                // The source waits for this before it measures or pauses.
                receiver.ack().map_err(|e| e.to_string())?;
                let st = receiver.stats();
                let bytes = st.data_bytes + st.zero_bytes;
                update(status, |s| {
                    s.round = round as u32;
                    s.bytes = bytes;
                    s.elapsed_ms = started.elapsed().as_millis() as u64;
                });
            }
            Event::State(blob) => {
                link.ask(|tx| WorkerRequest::ApplyState(blob, tx))?;
                state_applied = true;
            }
            Event::Complete => {
                if !state_applied {
                    return Err("the source completed without sending the VM state".into());
                }
                link.ask(WorkerRequest::Resume)?;
                receiver.ack().map_err(|e| e.to_string())?;
                update(status, |s| {
                    s.elapsed_ms = started.elapsed().as_millis() as u64
                });
                return Ok(());
            }
            Event::Abandoned(reason) => return Err(format!("the source gave up: {reason}")),
        }
    }
}
