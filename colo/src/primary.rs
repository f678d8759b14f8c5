//! The primary: copies the whole VM to the secondary, then checkpoints it at every interval
//! (or on request) until the secondary is lost or protection is ended.
//!
//! A checkpoint: pause the PVM → save its state and take the dirty log → send the dirty pages
//! (N channels) and the checkpoint record → Complete → the secondary flushes, loads and acks →
//! resume. One round trip per checkpoint. Any failure resumes the PVM and ends protection:
//! the PVM never stays paused on a dead peer.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver as MpscReceiver, RecvTimeoutError, Sender as MpscSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::transport::{self, set_tcp_timeouts, Transport};
use migration::{
    new_session_id, DirtyBitmap, MemRange, MemoryLayout, Sender, SenderOptions, StartInfo,
};

use crate::auth::{self, Psk};
use crate::block::link::PrimaryDisks;
use crate::block::mirror::Completion;
use crate::heartbeat::{Heartbeat, LostReason};
use crate::protection::{peer_may_be_gone, Cause, Command, FailoverSwitch, Protection};
use crate::proxy::compare::CompareConfig;
use crate::proxy::link::{OnBroken, PrimaryLink};
use crate::record::{Reason, Record};
use crate::staging::Staging;
use crate::status::{
    ms, CheckpointReport, ColoExit, ColoState, ColoStatus, ExitAction, Role, SharedStatus,
};
use crate::vm::{Observer, ProtectedVm};

/// Bound on every connect, read and write on the checkpoint streams.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the primary keeps trying to reach a secondary that is not listening yet.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);
/// The initial sync stops iterating once this little is left for the first checkpoint.
const SYNC_SMALL_ENOUGH: u64 = 32 << 20;
/// The authentication purpose of the heartbeat connection.
pub const HEARTBEAT_PURPOSE: &str = "heartbeat";
/// The authentication purpose of every checkpoint channel.
pub const CHECKPOINT_PURPOSE: &str = "checkpoint";
/// How long an Ack may take (the secondary's preparation for a large VM, or its flush).
const ACK_PATIENCE: Duration = Duration::from_secs(120);
/// How long to wait for the heartbeat's verdict beyond its timeout, after a stream broke.
pub const VERDICT_SLACK: Duration = Duration::from_millis(500);
/// ... or after this many rounds (a guest that dirties faster than the link).
const SYNC_MAX_ROUNDS: usize = 5;

/// How the primary protects its VM.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// The secondary's HOST:PORT.
    pub peer: String,
    /// Parallel checkpoint channels.
    pub channels: u16,
    /// Time from the end of one checkpoint to the start of the next.
    pub interval: Duration,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Silence after which the secondary counts as lost.
    pub heartbeat_timeout: Duration,
    /// The VM's configuration, for the secondary to build the same hardware.
    pub config_json: String,
    /// vCPUs.
    pub vcpus: u32,
    /// The pre-shared key every connection is authenticated with, if one was given.
    pub psk: Option<Arc<Psk>>,
    /// How long a PVM packet may wait for the SVM's before a checkpoint is asked for.
    pub compare_timeout: Duration,
    /// When the guest's disk writes complete (see [`crate::block::mirror`]).
    pub disk_completion: Completion,
}

/// Starts protecting `vm`: a worker thread connects, syncs and checkpoints.
pub fn start_primary(
    vm: Arc<dyn ProtectedVm>,
    cfg: PrimaryConfig,
    observer: Arc<dyn Observer>,
) -> std::io::Result<Protection> {
    let mut status = ColoStatus::new(
        Role::Primary,
        Some(cfg.peer.clone()),
        cfg.interval,
        cfg.channels,
    );
    status.heartbeat.interval_ms = cfg.heartbeat_interval.as_millis() as u64;
    status.heartbeat.timeout_ms = cfg.heartbeat_timeout.as_millis() as u64;
    let status = SharedStatus::new(status);
    let switch = Arc::new(FailoverSwitch::for_primary());
    let ram = vm.regions().iter().map(|r| r.len).sum();
    let (tx, rx) = std::sync::mpsc::channel();
    switch.wake_with(tx.clone());
    let worker = Worker {
        vm,
        cfg,
        status: status.clone(),
        switch: switch.clone(),
        observer,
        seq: 0,
        staging: Staging::new(ram),
        commands: tx.clone(),
        link: None,
        disks: None,
    };
    std::thread::Builder::new()
        .name("colo-primary".into())
        .spawn(move || worker.run(rx))?;
    Ok(Protection {
        status,
        switch,
        commands: Some(tx),
    })
}

/// Why protection ended.
struct End {
    reason: String,
    during_checkpoint: bool,
    /// The error may mean a dead peer: wait for the heartbeat's verdict.
    peer_may_be_gone: bool,
}

impl End {
    fn new(f: impl Into<Failure>, during_checkpoint: bool) -> Self {
        let f = f.into();
        End {
            reason: f.message,
            during_checkpoint,
            peer_may_be_gone: f.peer_may_be_gone,
        }
    }
}

/// A failure inside a checkpoint or the sync.
struct Failure {
    message: String,
    peer_may_be_gone: bool,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            message,
            peer_may_be_gone: false,
        }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::from(message.to_string())
    }
}

impl From<migration::ChannelError> for Failure {
    fn from(e: migration::ChannelError) -> Self {
        Failure {
            peer_may_be_gone: peer_may_be_gone(&e),
            message: e.to_string(),
        }
    }
}

impl Failure {
    fn context(self, what: &str) -> Self {
        Failure {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

struct Worker {
    vm: Arc<dyn ProtectedVm>,
    cfg: PrimaryConfig,
    status: SharedStatus,
    switch: Arc<FailoverSwitch>,
    observer: Arc<dyn Observer>,
    seq: u64,
    staging: Staging,
    /// For the proxy's checkpoint requests.
    commands: MpscSender<Command>,
    link: Option<PrimaryLink>,
    /// Block replication.
    disks: Option<PrimaryDisks>,
}

impl Worker {
    fn run(mut self, commands: MpscReceiver<Command>) {
        let mut sender = None;
        let end = self.protect(&mut sender, &commands);
        // A broken stream may be the first sign of a dead secondary: the heartbeat says.
        if end.peer_may_be_gone && self.switch.cause().is_none() {
            self.switch.wait(self.cfg.heartbeat_timeout + VERDICT_SLACK);
        }
        // The first cause wins; a failure here is this side ending protection (farewell).
        self.switch.throw(Cause::Failed, end.reason.clone());
        let reason = match self.switch.cause() {
            // The secondary ended protection because it refused a checkpoint (its farewell can
            // overtake the worker): the refusal says more.
            Some((Cause::PeerLeft, _)) if !end.peer_may_be_gone => end.reason,
            Some((_, reason)) => reason,
            None => end.reason,
        };
        // Everything the compare holds goes out now: the PVM is on its own.
        if let Some(link) = self.link.take() {
            link.failover();
            self.status.lock().proxy_ended(link.status());
        }
        // The disks go on alone: the mirrors leave their write slots.
        if let Some(disks) = self.disks.take() {
            disks.close();
            self.status.lock().disks_ended(disks.status());
        }
        if let Some(s) = sender.as_mut() {
            s.abandon(&reason);
        }
        self.vm.stop_dirty_log();
        let exit = ColoExit {
            role: Role::Primary,
            reason,
            during_checkpoint: end.during_checkpoint,
            after_checkpoints: self.status.lock().checkpoints,
            action: ExitAction::Continue,
        };
        {
            let mut s = self.status.lock();
            // The PVM always runs on, alone.
            s.state = ColoState::FailedOver;
            s.exit = Some(exit.clone());
        }
        self.observer.exited(exit);
    }

    fn protect(&mut self, slot: &mut Option<Sender>, commands: &MpscReceiver<Command>) -> End {
        let sender = match self.connect() {
            Ok(s) => slot.insert(s),
            Err(e) => return End::new(e, false),
        };
        if let Err(e) = self.connect_proxy() {
            return End::new(e, false);
        }
        if let Err(e) = self.connect_disks() {
            return End::new(e, false);
        }
        if let Err(e) = self.sync_disks() {
            return End::new(Failure::from(e).context("initial disk sync"), false);
        }
        if let Err(e) = self.sync(sender) {
            return End::new(e.context("initial sync"), true);
        }
        self.status.lock().state = ColoState::Protected;
        self.observer.event(
            "protected",
            serde_json::json!({"peer": self.cfg.peer, "channels": self.cfg.channels}),
        );
        let mut interval = self.cfg.interval;
        let mut next = Instant::now() + interval;
        loop {
            if let Some(reason) = self.switch.reason() {
                return End::new(reason, false);
            }
            let wait = next.saturating_duration_since(Instant::now());
            let (reason, pause_after) = match commands.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => (Reason::Interval, false),
                Err(RecvTimeoutError::Disconnected) => {
                    return End::new("the VMM dropped protection", false)
                }
                Ok(Command::Wake) => continue,
                Ok(Command::SetInterval(d)) => {
                    interval = d;
                    next = Instant::now() + d;
                    self.status.lock().checkpoint_interval_ms = d.as_millis() as u64;
                    continue;
                }
                Ok(Command::Checkpoint {
                    reason,
                    pause_after,
                }) => (reason, pause_after),
            };
            if let Err(e) = self.checkpoint(sender, reason, pause_after, Vec::new()) {
                return End::new(e.context("checkpoint failed"), true);
            }
            next = Instant::now() + interval;
        }
    }

    /// Connects the checkpoint channels, then the heartbeat.
    fn connect(&self) -> Result<Sender, String> {
        let addr = resolve(&self.cfg.peer)?;
        let deadline = Instant::now() + CONNECT_PATIENCE;
        // The heartbeat first: the secondary takes a connection that opens with a beat as the
        // start of a primary's session, then its checkpoint channels.
        let (hb, streams) = loop {
            // Only a secondary that is not listening yet is worth waiting for.
            let mut hb = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                Ok(s) => s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot reach the secondary at {addr}: {e}"))
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Some(psk) = &self.cfg.psk {
                set_tcp_timeouts(&hb, IO_TIMEOUT).map_err(|e| e.to_string())?;
                auth::authenticate(&mut hb, psk, Role::Primary, HEARTBEAT_PURPOSE)
                    .map_err(|e| format!("authenticating to the secondary at {addr}: {e}"))?;
            }
            let attempt = hb
                .set_nodelay(true)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    // The channels before the beats: an attempt that fails here must not leave
                    // a heartbeat behind whose loss would end the next, good attempt.
                    let streams = transport::connect_tcp(addr, self.cfg.channels, IO_TIMEOUT)
                        .map_err(|e| e.to_string())?;
                    let beat = Heartbeat::start_with_grace(
                        Box::new(hb.try_clone().map_err(|e| e.to_string())?),
                        self.cfg.heartbeat_interval,
                        self.cfg.heartbeat_timeout,
                        IO_TIMEOUT,
                        heartbeat_verdict(self.switch.clone()),
                    )
                    .map_err(|e| format!("starting the heartbeat: {e}"))?;
                    Ok((beat, streams))
                });
            match attempt {
                Ok(pair) => break pair,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot reach the secondary at {addr}: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        self.status.lock().watch_heartbeat(hb.last_seen());
        self.switch.own_heartbeat(hb);
        let clones = clone_all(&streams)?;
        self.switch.guard_streams(clones);
        let psk = self.cfg.psk.clone();
        Sender::with_setup(
            streams,
            new_session_id(),
            SenderOptions {
                io_timeout: IO_TIMEOUT,
                // The secondary prefaults the SVM's RAM and its cache before it acks Start
                // (~10 µs a page here); a dead secondary is noticed by the heartbeat sooner.
                ack_timeout: ACK_PATIENCE,
                ..SenderOptions::default()
            },
            &mut |_, stream| match &psk {
                Some(psk) => auth::authenticate(stream, psk, Role::Primary, CHECKPOINT_PURPOSE)
                    .map(|_| ())
                    .map_err(|e| format!("authentication: {e}")),
                None => Ok(()),
            },
        )
        .map_err(|e| e.to_string())
    }

    /// Opens the proxy channel (after the checkpoint channels, as the secondary expects) and
    /// puts the compare on the PVM's NIC.
    fn connect_proxy(&mut self) -> Result<(), String> {
        let addr = resolve(&self.cfg.peer)?;
        let mut nics = self.vm.nics();
        if nics.len() > 1 {
            return Err(format!(
                "COLO protects at most one NIC; this VM has {}",
                nics.len()
            ));
        }
        let psk = match &self.cfg.psk {
            Some(k) => (**k).clone(),
            None => Psk::public(),
        };
        let compare = CompareConfig {
            timeout: self.cfg.compare_timeout,
            ..CompareConfig::default()
        };
        let link = PrimaryLink::connect(
            addr,
            &psk,
            IO_TIMEOUT,
            compare,
            nics.pop(),
            self.commands.clone(),
            channel_broken(
                self.switch.clone(),
                self.cfg.heartbeat_timeout,
                "proxy channel",
            ),
        )
        .map_err(|e| format!("proxy channel: {e}"))?;
        let socket = link
            .socket()
            .map_err(|e| format!("proxy channel socket: {e}"))?;
        self.switch.guard_streams(vec![Box::new(socket)]);
        let link = self.link.insert(link);
        // The status reads the counters through the link's shared state, not the worker.
        let shared = link.status_source();
        self.status.lock().watch_proxy(shared);
        Ok(())
    }

    /// Opens the disk channel (after the proxy channel) and puts a mirror into every disk's
    /// write slot.
    fn connect_disks(&mut self) -> Result<(), String> {
        let addr = resolve(&self.cfg.peer)?;
        let psk = match &self.cfg.psk {
            Some(k) => (**k).clone(),
            None => Psk::public(),
        };
        let disks = PrimaryDisks::connect(
            addr,
            &psk,
            IO_TIMEOUT,
            self.vm.disks(),
            self.cfg.disk_completion,
            channel_broken(
                self.switch.clone(),
                self.cfg.heartbeat_timeout,
                "disk channel",
            ),
        )
        .map_err(|e| format!("disk channel: {e}"))?;
        let socket = disks
            .socket()
            .map_err(|e| format!("disk channel socket: {e}"))?;
        self.switch.guard_streams(vec![Box::new(socket)]);
        self.status.lock().watch_disks(disks.status_source());
        self.disks = Some(disks);
        Ok(())
    }

    /// Makes the secondary's copy of every disk equal the PVM's (only what differs crosses),
    /// reporting progress as `disk-sync` events.
    fn sync_disks(&self) -> Result<(), String> {
        let Some(disks) = &self.disks else {
            return Ok(());
        };
        let observer = self.observer.clone();
        disks.sync(|disk, p| {
            observer.event(
                "disk-sync",
                serde_json::json!({
                    "disk": disk,
                    "bytes_sent": p.bytes_sent,
                    "bytes_total": p.bytes_total,
                    "regions_sent": p.regions_sent,
                    "regions_differing": p.regions_total,
                    "regions": p.regions,
                    "done": p.done(),
                }),
            );
        })
    }

    /// Copies the whole VM while it runs, a few rounds of what it dirtied meanwhile, then the
    /// first checkpoint. Rounds before it are acked, so the sender never runs ahead.
    fn sync(&mut self, sender: &mut Sender) -> Result<(), Failure> {
        let regions = self.vm.regions();
        let layout = MemoryLayout::new(regions.clone()).map_err(|e| e.to_string())?;
        sender
            .send_start(&StartInfo {
                layout,
                vcpus: self.cfg.vcpus,
                config_json: self.cfg.config_json.clone(),
            })
            .map_err(Failure::from)?;
        // The secondary acks Start once the SVM and the RAM cache exist: pages sent before
        // would pile up behind its prefault and time the writes out on a large VM.
        sender.wait_round_applied().map_err(Failure::from)?;
        self.vm.start_dirty_log()?;
        // A staging buffer for a quarter of RAM (at most 256 MiB) from the start, so early
        // checkpoints need not pause for their transfer; it grows with the dirty sets seen.
        let ram: u64 = regions.iter().map(|r| r.len).sum();
        if let Err(e) = self.staging.grow_for((ram / 4).min(256 << 20)) {
            log::warn!("COLO: staging buffer: {e}");
        }
        let mut ranges = regions;
        let mut rounds = 0;
        let pending = loop {
            sender
                .send_round(&ranges, self.vm.memory())
                .map_err(Failure::from)?;
            sender.wait_round_applied().map_err(Failure::from)?;
            rounds += 1;
            let dirty = self.vm.take_dirty()?;
            let (next, bytes) = ranges_of(&dirty)?;
            if bytes <= SYNC_SMALL_ENOUGH || rounds >= SYNC_MAX_ROUNDS {
                break dirty;
            }
            ranges = next;
        };
        self.checkpoint(sender, Reason::Initial, false, pending)
    }

    /// One checkpoint; `carry` holds dirty pages not sent yet (from the initial sync).
    ///
    /// The PVM is paused for its state, the dirty log and a copy of the dirty pages into the
    /// staging buffer, then resumes while the copy crosses the network; without room in the
    /// buffer it stays paused until the secondary acks.
    fn checkpoint(
        &mut self,
        sender: &mut Sender,
        reason: Reason,
        pause_after: bool,
        carry: Vec<DirtyBitmap>,
    ) -> Result<(), Failure> {
        self.seq += 1;
        self.status.lock().state = ColoState::Checkpointing;
        self.observer.event(
            "checkpoint-started",
            serde_json::json!({"seq": self.seq, "reason": reason}),
        );
        let mut phases = Phases::start();
        let we_paused = self.vm.pause()?;
        if let Some(link) = &self.link {
            // PVM frames from now on belong to this checkpoint's epoch.
            if let Err(e) = link.checkpoint_started(self.seq) {
                self.vm.resume(we_paused)?;
                return Err(e.into());
            }
        }
        if let Some(disks) = &self.disks {
            // Every write the PVM completed is on the disk channel: the barrier follows them.
            if let Err(e) = disks.checkpoint_started(self.seq) {
                self.vm.resume(we_paused)?;
                return Err(e.into());
            }
        }
        // Resumes the PVM (unless the user had paused it or asked to stay paused); returns
        // how long it was paused.
        let resume = |phases: &mut Phases, failed: bool| -> Result<Duration, String> {
            let paused = phases.t0.elapsed();
            self.vm.resume(we_paused && (failed || !pause_after))?;
            phases.mark("resume");
            Ok(paused)
        };
        phases.mark("pause");
        let collected = (|| {
            let state = self.vm.save_state()?;
            let mut dirty = self.vm.take_dirty()?;
            migration::merge_dirty(&mut dirty, &carry);
            let (ranges, bytes) = ranges_of(&dirty)?;
            let staged = self.staging.stage(&ranges, self.vm.memory())?;
            Ok::<_, Failure>((state, ranges, bytes, staged))
        })();
        phases.mark("collect");
        let (state, ranges, dirty_bytes, staged) = match collected {
            Ok(c) => c,
            Err(e) => {
                resume(&mut phases, true)?;
                return Err(e);
            }
        };
        let mut pause = None;
        if staged {
            pause = Some(resume(&mut phases, false)?);
        }
        let sent = (|| {
            let mem: &dyn migration::GuestMemoryReader = if staged {
                &self.staging.reader()
            } else {
                self.vm.memory()
            };
            let stats = sender.send_round(&ranges, mem).map_err(Failure::from)?;
            if reason == Reason::Initial {
                sender.wait_round_applied().map_err(Failure::from)?;
            }
            let record = Record {
                seq: self.seq,
                reason,
                pause_after,
                state: &state,
            }
            .encode();
            sender.send_state(&record).map_err(Failure::from)?;
            phases.mark("transfer");
            sender.complete().map_err(Failure::from)?;
            phases.mark("secondary");
            if let Some(link) = &self.link {
                link.checkpoint_done(self.seq)?;
            }
            Ok::<_, Failure>(stats)
        })();
        if pause.is_none() {
            pause = Some(resume(&mut phases, sent.is_err())?);
        } else if sent.is_err() && pause_after && we_paused {
            // Staged with pause_after: it stayed paused for a checkpoint that failed.
            self.vm.resume(true)?;
        }
        let stats = sent?;
        let pause = pause.unwrap_or_default();
        if !staged || dirty_bytes > self.staging.capacity() / 10 * 8 {
            // Room for next time, while the PVM runs.
            if let Err(e) = self.staging.grow_for(dirty_bytes + dirty_bytes / 4) {
                log::warn!("COLO: staging buffer: {e}; checkpoints keep pausing for the transfer");
            }
        }
        let bytes = stats.pages.data_bytes + stats.pages.zero_bytes;
        let report = CheckpointReport {
            seq: self.seq,
            bytes,
            pages: bytes / migration::PAGE_SIZE,
            phases_ms: phases.done,
        };
        let event = serde_json::json!({
            "seq": report.seq,
            "reason": reason,
            "pause_ms": ms(pause),
            "total_ms": ms(phases.t0.elapsed()),
            "staged": staged,
            "bytes": report.bytes,
            "pages": report.pages,
            "phases_ms": report.phases_ms,
            "pause_after": pause_after,
        });
        {
            let mut s = self.status.lock();
            s.record(reason, pause, report);
            s.state = ColoState::Protected;
        }
        self.observer.event("checkpoint", event);
        Ok(())
    }
}

/// Phase times of one checkpoint, each from the end of the previous one.
struct Phases {
    t0: Instant,
    last: Instant,
    done: std::collections::BTreeMap<String, f64>,
}

impl Phases {
    fn start() -> Self {
        let now = Instant::now();
        Phases {
            t0: now,
            last: now,
            done: Default::default(),
        }
    }

    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        self.done.insert(name.to_string(), ms(now - self.last));
        self.last = now;
    }
}

/// What either side does when a data channel (proxy, disk) breaks: the heartbeat says first whether the
/// peer is gone; otherwise this side ends protection.
pub(crate) fn channel_broken(
    switch: Arc<FailoverSwitch>,
    heartbeat_timeout: Duration,
    channel: &'static str,
) -> OnBroken {
    Arc::new(move |why| {
        if switch.cause().is_none() {
            switch.wait(heartbeat_timeout + VERDICT_SLACK);
        }
        switch.throw(Cause::Failed, format!("{channel}: {why}"));
    })
}

/// What the primary does with the heartbeat's news.
fn heartbeat_verdict(switch: Arc<FailoverSwitch>) -> impl FnOnce(LostReason) + Send + 'static {
    move |why| match why {
        LostReason::Farewell => {
            switch.throw(Cause::PeerLeft, "the secondary ended protection".into())
        }
        other => switch.throw(Cause::PeerLost, format!("secondary lost: {other}")),
    }
}

fn resolve(peer: &str) -> Result<SocketAddr, String> {
    peer.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {peer}: {e}"))?
        .next()
        .ok_or_else(|| format!("{peer} resolves to no address"))
}

/// Second handles on `streams`, for the failover switch.
pub(crate) fn clone_all(streams: &[Box<dyn Transport>]) -> Result<Vec<Box<dyn Transport>>, String> {
    streams
        .iter()
        .map(|s| s.try_clone_transport())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("duplicating a checkpoint stream: {e}"))
}

/// The dirty ranges of `bitmaps` and their total bytes.
fn ranges_of(bitmaps: &[DirtyBitmap]) -> Result<(Vec<MemRange>, u64), String> {
    migration::dirty_set_ranges(bitmaps).map_err(|e| e.to_string())
}
