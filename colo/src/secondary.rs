//! The secondary: waits for the primary, builds the SVM from the primary's configuration,
//! keeps the RAM cache, and applies each checkpoint only once all of it has arrived.
//!
//! Pages land in the cache while the SVM keeps running; the SVM pauses only when the
//! primary's Complete arrives: flush the pages dirtied by the PVM or the SVM from the cache,
//! load the state, ack, resume. A checkpoint cut off half-way leaves the SVM as it was, on
//! the last complete checkpoint. When the primary is lost the SVM goes on as a normal VM;
//! when the primary ends protection on purpose (a farewell, or Abandon on the stream), the
//! SVM stops, so that one VM runs, not two.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::transport::{self, TransportError};
use migration::{DirtyBitmap, Event, MemRange, Receiver, ReceiverOptions, StartInfo};

use crate::auth::{self, Psk};
use crate::block::link::{barrier_patience, DiskTarget, SecondaryDisks};
use crate::block::LayerStore;
use crate::heartbeat::{Heartbeat, LostReason};
use crate::primary::{
    channel_broken, clone_all, CHECKPOINT_PURPOSE, HEARTBEAT_PURPOSE, IO_TIMEOUT, VERDICT_SLACK,
};
use crate::protection::{peer_may_be_gone, Cause, FailoverSwitch, Protection};
use crate::proxy::link::SecondaryLink;
use crate::ram_cache::{RamCache, PAGE_SIZE};
use crate::record::{self, Reason};
use crate::status::{
    ms, CheckpointReport, ColoExit, ColoState, ColoStatus, ExitAction, Role, SharedStatus,
};
use crate::vm::{Observer, ProtectedVm, SecondaryHost};

/// How long the checkpoint stream may stay silent between two checkpoints. The heartbeat,
/// not this, notices a dead primary; this only bounds a primary that beats but never sends.
const IDLE_LIMIT: Duration = Duration::from_secs(2 * 3600);
/// How long a new connection may take to send its first beat.
const FIRST_BEAT_WAIT: Duration = Duration::from_secs(1);
/// Poll period while waiting for the primary (to notice an API failover meanwhile).
const ACCEPT_POLL: Duration = Duration::from_millis(500);

/// How the secondary waits.
#[derive(Clone, Debug)]
pub struct SecondaryConfig {
    /// The address it listens on (for the status).
    pub listen: String,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Silence after which the primary counts as lost.
    pub heartbeat_timeout: Duration,
    /// The pre-shared key every connection must authenticate with, if one was given.
    pub psk: Option<Arc<Psk>>,
    /// Where each disk of the primary is replicated, in order.
    pub disks: Vec<DiskTarget>,
    /// Where the replicas' hidden and active layers live.
    pub layers: LayerStore,
}

/// Starts waiting for a primary on `listener`.
pub fn start_secondary(
    listener: TcpListener,
    cfg: SecondaryConfig,
    host: Box<dyn SecondaryHost>,
    observer: Arc<dyn Observer>,
) -> std::io::Result<Protection> {
    let mut status = ColoStatus::new(Role::Secondary, None, Duration::ZERO, 1);
    status.heartbeat.interval_ms = cfg.heartbeat_interval.as_millis() as u64;
    status.heartbeat.timeout_ms = cfg.heartbeat_timeout.as_millis() as u64;
    let status = SharedStatus::new(status);
    let switch = Arc::new(FailoverSwitch::default());
    let worker = Worker {
        cfg,
        status: status.clone(),
        switch: switch.clone(),
        observer,
        vm: None,
        applied: 0,
        link: None,
        disks: None,
    };
    std::thread::Builder::new()
        .name("colo-secondary".into())
        .spawn(move || worker.run(listener, host))?;
    Ok(Protection {
        status,
        switch,
        commands: None,
    })
}

struct End {
    reason: String,
    during_checkpoint: bool,
    /// The SVM cannot go on (never synced, or a load failed half-way).
    unusable: bool,
    /// The error may mean a dead primary: wait for the heartbeat's verdict.
    peer_may_be_gone: bool,
}

impl End {
    /// This side refuses what the primary sent (the primary is alive).
    fn refused(reason: impl Into<String>, during_checkpoint: bool) -> Self {
        End {
            reason: reason.into(),
            during_checkpoint,
            unusable: false,
            peer_may_be_gone: false,
        }
    }

    /// A stream error.
    fn stream(e: migration::ChannelError, during_checkpoint: bool) -> Self {
        End {
            peer_may_be_gone: peer_may_be_gone(&e),
            ..End::refused(e.to_string(), during_checkpoint)
        }
    }

    /// The SVM is in no state to run.
    fn broken(reason: String) -> Self {
        End {
            unusable: true,
            ..End::refused(reason, true)
        }
    }
}

struct Worker {
    cfg: SecondaryConfig,
    status: SharedStatus,
    switch: Arc<FailoverSwitch>,
    observer: Arc<dyn Observer>,
    vm: Option<Arc<dyn ProtectedVm>>,
    /// Complete checkpoints applied to the SVM.
    applied: u64,
    /// The proxy channel of the session.
    link: Option<SecondaryLink>,
    /// Block replication of the session.
    disks: Option<SecondaryDisks>,
}

impl Worker {
    fn run(mut self, listener: TcpListener, mut host: Box<dyn SecondaryHost>) {
        let end = self.protect(&listener, host.as_mut());
        drop(listener);
        // A broken stream may be a dead primary, or one that ended protection: the heartbeat
        // (a loss, or a farewell sent before the streams closed) tells which.
        if end.peer_may_be_gone && self.switch.cause().is_none() {
            self.switch.wait(self.cfg.heartbeat_timeout + VERDICT_SLACK);
        }
        // The first cause wins; a failure here means this side ends protection.
        self.switch.throw(Cause::Failed, end.reason.clone());
        let (cause, reason) = match self.switch.cause() {
            // The primary ended protection because this side refused its checkpoint (its
            // farewell can overtake the worker): the refusal is the cause.
            Some((Cause::PeerLeft, _)) if !end.peer_may_be_gone => {
                (Cause::Failed, end.reason.clone())
            }
            Some(c) => c,
            None => (Cause::Failed, end.reason.clone()),
        };
        // The SVM takes over only from a complete checkpoint, and only when the primary is
        // gone or the user asked: otherwise the primary's VM runs on and this one must not.
        let take_over = !end.unusable
            && self.applied > 0
            && matches!(cause, Cause::PeerLost | Cause::Requested);
        if let Some(vm) = &self.vm {
            vm.stop_dirty_log();
        }
        if let Some(link) = self.link.take() {
            if take_over {
                // The SVM's own frames go to this host's tap from now on.
                link.failover();
            } else {
                link.close();
            }
            self.status.lock().proxy_ended(link.status());
        }
        let mut reason = reason;
        if let Some(disks) = self.disks.take() {
            if take_over {
                // The SVM's view of each disk becomes the base's content (it runs meanwhile:
                // its I/O waits for each merged block).
                if let Err(e) = disks.failover() {
                    log::error!("COLO: {e}");
                    reason = format!("{reason}; and the failover of the disks failed: {e}");
                }
            } else {
                disks.close();
            }
            self.status.lock().disks_ended(disks.status());
        }
        let exit = ColoExit {
            role: Role::Secondary,
            reason,
            during_checkpoint: end.during_checkpoint,
            after_checkpoints: self.applied,
            action: if take_over {
                ExitAction::Continue
            } else {
                ExitAction::Stop
            },
        };
        {
            let mut s = self.status.lock();
            s.state = if take_over {
                ColoState::FailedOver
            } else {
                ColoState::Stopped
            };
            s.exit = Some(exit.clone());
        }
        self.observer.exited(exit);
    }

    fn protect(&mut self, listener: &TcpListener, host: &mut dyn SecondaryHost) -> End {
        let (mut receiver, start) = match self.accept(listener) {
            Ok(r) => r,
            Err(e) => return End::refused(e, false),
        };
        let result = self.receive(&mut receiver, start, host);
        if let Err(end) = &result {
            if !end.peer_may_be_gone {
                // This side's refusal is the cause, whatever the primary does about it.
                self.switch.claim(Cause::Failed, end.reason.clone());
            }
            receiver.reject(&end.reason);
        }
        match result {
            Ok(end) | Err(end) => end,
        }
    }

    /// Waits for a primary: a session counts once its heartbeat, its channels and a valid
    /// Start message arrived; anything less is dropped and the secondary listens on.
    fn accept(&mut self, listener: &TcpListener) -> Result<(Receiver, StartInfo), String> {
        loop {
            if let Some(r) = self.switch.reason() {
                return Err(r);
            }
            match transport::wait_for_connection(listener.as_raw_fd(), ACCEPT_POLL) {
                Err(TransportError::NoPeer(_)) => continue,
                Err(e) => return Err(format!("waiting for the primary: {e}")),
                Ok(()) => {}
            }
            match self.session(listener) {
                Ok(s) => return Ok(s),
                Err(e) => log::warn!("COLO: refused a connection attempt: {e}"),
            }
        }
    }

    /// One connection attempt: the heartbeat, the channels, Start.
    fn session(&mut self, listener: &TcpListener) -> Result<(Receiver, StartInfo), String> {
        let (mut hb, from) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let psk = self.cfg.psk.clone();
        if let Some(psk) = &psk {
            transport::set_tcp_timeouts(&hb, FIRST_BEAT_WAIT)
                .map_err(|e| format!("heartbeat socket: {e}"))?;
            auth::authenticate_within(
                &mut hb,
                psk,
                Role::Secondary,
                HEARTBEAT_PURPOSE,
                FIRST_BEAT_WAIT,
            )
            .map_err(|e| format!("{from} did not authenticate: {e}"))?;
        }
        let mut first = [0u8; crate::heartbeat::FRAME_LEN];
        hb.set_read_timeout(Some(FIRST_BEAT_WAIT))
            .and_then(|()| std::io::Read::read_exact(&mut &hb, &mut first))
            .map_err(|e| format!("{from} sent no heartbeat: {e}"))?;
        if !crate::heartbeat::is_beat(&first) {
            return Err(format!("{from} did not open with a heartbeat"));
        }
        let streams =
            transport::accept_session_tcp_with(listener, IO_TIMEOUT, IO_TIMEOUT, &mut |stream| {
                match &psk {
                    Some(psk) => auth::authenticate_within(
                        stream,
                        psk,
                        Role::Secondary,
                        CHECKPOINT_PURPOSE,
                        FIRST_BEAT_WAIT,
                    )
                    .map(|_| ())
                    .map_err(|e| format!("a checkpoint channel did not authenticate: {e}")),
                    None => Ok(()),
                }
            })
            .map_err(|e| format!("the checkpoint channels after {from}'s heartbeat: {e}"))?;
        let public = Psk::public();
        let link = SecondaryLink::accept(
            listener,
            psk.as_deref().unwrap_or(&public),
            IO_TIMEOUT,
            channel_broken(
                self.switch.clone(),
                self.cfg.heartbeat_timeout,
                "proxy channel",
            ),
        )
        .map_err(|e| format!("the proxy channel after {from}'s heartbeat: {e}"))?;
        let disks = SecondaryDisks::accept(
            listener,
            psk.as_deref().unwrap_or(&public),
            IO_TIMEOUT,
            self.cfg.disks.clone(),
            self.cfg.layers.clone(),
            channel_broken(
                self.switch.clone(),
                self.cfg.heartbeat_timeout,
                "disk channel",
            ),
        )
        .map_err(|e| format!("the disk channel after {from}'s heartbeat: {e}"))?;
        let mut clones = clone_all(&streams)?;
        clones.push(Box::new(
            link.socket()
                .map_err(|e| format!("proxy channel socket: {e}"))?,
        ));
        clones.push(Box::new(
            disks
                .socket()
                .map_err(|e| format!("disk channel socket: {e}"))?,
        ));
        let channels = streams.len() as u32;
        let mut receiver = Receiver::new(
            streams,
            ReceiverOptions {
                io_timeout: IO_TIMEOUT,
                idle_timeout: IDLE_LIMIT,
                ..ReceiverOptions::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let start = match receiver.recv_start() {
            Ok(s) => s,
            Err(e) => {
                receiver.reject(&e.to_string());
                return Err(format!("{from}: {e}"));
            }
        };
        hb.set_nodelay(true)
            .map_err(|e| format!("heartbeat socket: {e}"))?;
        self.switch.guard_streams(clones);
        self.start_heartbeat(hb)?;
        self.status.lock().watch_proxy(link.status_source());
        self.link = Some(link);
        self.status.lock().watch_disks(disks.status_source());
        self.disks = Some(disks);
        {
            let mut s = self.status.lock();
            s.peer = Some(format!("{} (primary {from})", self.cfg.listen));
            s.channels = channels;
        }
        Ok((receiver, start))
    }

    fn start_heartbeat(&self, hb: TcpStream) -> Result<(), String> {
        let switch = self.switch.clone();
        let hb = Heartbeat::start_with_grace(
            Box::new(hb),
            self.cfg.heartbeat_interval,
            self.cfg.heartbeat_timeout,
            IO_TIMEOUT,
            move |why| match why {
                LostReason::Farewell => {
                    switch.throw(Cause::PeerLeft, "the primary ended protection".into())
                }
                other => switch.throw(Cause::PeerLost, format!("primary lost: {other}")),
            },
        )
        .map_err(|e| format!("starting the heartbeat: {e}"))?;
        self.status.lock().watch_heartbeat(hb.last_seen());
        self.switch.own_heartbeat(hb);
        Ok(())
    }

    /// Receives the initial sync and then checkpoints until the stream ends. `Ok` is an
    /// orderly end (the primary abandoned), `Err` a failure.
    fn receive(
        &mut self,
        receiver: &mut Receiver,
        start: StartInfo,
        host: &mut dyn SecondaryHost,
    ) -> Result<End, End> {
        let fail = End::stream;
        let regions: Vec<MemRange> = start.layout.regions().to_vec();
        let backends = self
            .disks
            .as_ref()
            .map(SecondaryDisks::backends)
            .unwrap_or_default();
        let vm = host
            .create_vm(&start.config_json, start.vcpus, &regions, backends)
            .map_err(|e| End::broken(format!("cannot build the SVM: {e}")))?;
        self.vm = Some(vm.clone());
        if let Some(link) = &self.link {
            link.attach(vm.nics())
                .map_err(|e| End::refused(format!("the SVM's network: {e}"), false))?;
        }
        let spans: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.len)).collect();
        let cache = Arc::new(RamCache::new(&spans).map_err(|e| End::broken(e.to_string()))?);
        receiver
            .start_applying(cache.clone())
            .map_err(|e| fail(e, false))?;
        // Ready: the primary waits for this before it sends pages.
        receiver.ack().map_err(|e| fail(e, false))?;
        let mut pending: Option<Vec<u8>> = None;
        // Bytes received when the last checkpoint completed: more means one is arriving.
        let mut settled = 0u64;
        let received = |r: &Receiver| {
            let st = r.stats();
            st.data_bytes + st.zero_bytes
        };
        loop {
            let event = match receiver.next_event() {
                Ok(e) => e,
                Err(e) => {
                    let during = pending.is_some() || received(receiver) > settled;
                    return Err(fail(e, during));
                }
            };
            match event {
                Event::RoundDone { .. } => {
                    // Until the first checkpoint is applied the primary waits for each round.
                    if self.applied == 0 {
                        receiver.ack().map_err(|e| fail(e, true))?;
                    }
                }
                Event::State(blob) => {
                    if pending.is_some() {
                        return Err(End::refused(
                            "two checkpoint records in one checkpoint",
                            true,
                        ));
                    }
                    record::decode(&blob)
                        .map_err(|e| End::refused(format!("bad checkpoint record: {e}"), true))?;
                    pending = Some(blob);
                }
                Event::Complete => {
                    let blob = pending.take().ok_or_else(|| {
                        End::refused("a checkpoint completed without its record", true)
                    })?;
                    self.apply(&vm, &cache, &blob, receiver, &regions)?;
                    settled = received(receiver);
                }
                Event::Abandoned(why) => {
                    self.switch.throw(
                        Cause::PeerLeft,
                        format!("the primary ended protection: {why}"),
                    );
                    return Ok(End::refused(
                        format!("the primary ended protection: {why}"),
                        pending.is_some(),
                    ));
                }
            }
        }
    }

    /// Applies a complete checkpoint: pause the SVM, flush, load, ack, resume.
    fn apply(
        &mut self,
        vm: &Arc<dyn ProtectedVm>,
        cache: &RamCache,
        blob: &[u8],
        receiver: &mut Receiver,
        regions: &[MemRange],
    ) -> Result<(), End> {
        let rec = record::decode(blob)
            .map_err(|e| End::refused(format!("bad checkpoint record: {e}"), true))?;
        let first = self.applied == 0;
        if first != (rec.reason == Reason::Initial) {
            return Err(End::refused(
                format!(
                    "checkpoint {} has reason {:?} out of order",
                    rec.seq, rec.reason
                ),
                true,
            ));
        }
        // Failover asked for before the load began: abandon, the SVM stays as it is.
        if let Some(r) = self.switch.reason() {
            return Err(End::refused(r, true));
        }
        // The checkpoint's disk is whole only once every write from before its pause is here.
        if let Some(disks) = &self.disks {
            disks
                .wait_barrier(rec.seq, barrier_patience(IO_TIMEOUT))
                .map_err(|e| End {
                    peer_may_be_gone: true,
                    ..End::refused(e, true)
                })?;
        }
        self.status.lock().state = ColoState::Checkpointing;
        let broken = |what: &str, e: String| End::broken(format!("{what}: {e}"));
        let t0 = Instant::now();
        let mut phases = std::collections::BTreeMap::new();
        let we_paused = if first {
            false
        } else {
            vm.pause()
                .map_err(|e| End::refused(format!("pausing the SVM: {e}"), true))?
        };
        let svm_dirty = if first {
            regions
                .iter()
                .map(|r| vec![0u64; (r.len / PAGE_SIZE).div_ceil(64) as usize])
                .collect()
        } else {
            match vm.take_dirty() {
                Ok(d) => words_per_region(d, regions),
                Err(e) => {
                    let _ = vm.resume(we_paused);
                    return Err(End::refused(format!("the SVM's dirty log: {e}"), true));
                }
            }
        };
        phases.insert("pause".to_string(), ms(t0.elapsed()));
        if let Some(link) = &self.link {
            link.checkpoint_applying();
        }
        // From here on the SVM's memory changes: finish, whatever the switch says.
        let t = Instant::now();
        let flushed = cache
            .flush(&svm_dirty, |gpa, data| vm.write_ram(gpa, data))
            .map_err(|e| broken("flushing the RAM cache", e.to_string()))?;
        phases.insert("flush".to_string(), ms(t.elapsed()));
        let t = Instant::now();
        vm.load_state(rec.state.to_vec())
            .map_err(|e| broken("loading the checkpoint's state", e))?;
        phases.insert("load".to_string(), ms(t.elapsed()));
        if let Some(disks) = &self.disks {
            let t = Instant::now();
            disks
                .loaded(rec.seq)
                .map_err(|e| broken("the checkpoint's disks", e))?;
            phases.insert("disks".to_string(), ms(t.elapsed()));
        }
        self.applied += 1;
        if let Some(link) = &self.link {
            // A broken channel ends protection by itself (its on_broken); the load stands.
            if let Err(e) = link.checkpoint_loaded(rec.seq) {
                log::warn!("COLO: {e}");
            }
        }
        let acked = receiver.ack();
        if first {
            vm.start_dirty_log()
                .map_err(|e| broken("starting the SVM's dirty log", e))?;
        }
        let t = Instant::now();
        vm.resume(!rec.pause_after && (first || we_paused))
            .map_err(|e| broken("resuming the SVM", e))?;
        phases.insert("resume".to_string(), ms(t.elapsed()));
        let pause = t0.elapsed();
        let report = CheckpointReport {
            seq: rec.seq,
            bytes: flushed.pages * PAGE_SIZE,
            pages: flushed.pages,
            phases_ms: phases,
        };
        let event = serde_json::json!({
            "seq": rec.seq,
            "reason": rec.reason,
            "pause_ms": ms(pause),
            "bytes": report.bytes,
            "pages": report.pages,
            "runs": flushed.runs,
            "phases_ms": report.phases_ms,
        });
        {
            let mut s = self.status.lock();
            s.record(rec.reason, pause, report);
            s.state = ColoState::Protected;
        }
        if first {
            self.observer.event("protected", serde_json::json!({}));
        }
        self.observer.event("checkpoint", event);
        acked.map_err(|e| End::stream(e, false))
    }
}

/// The SVM's dirty words per cache region (a region the log did not report is clean).
fn words_per_region(mut dirty: Vec<DirtyBitmap>, regions: &[MemRange]) -> Vec<Vec<u64>> {
    regions
        .iter()
        .map(|r| {
            let words = (r.len / PAGE_SIZE).div_ceil(64) as usize;
            // Moved out, not copied: this runs while the SVM is paused.
            let mut w = dirty
                .iter_mut()
                .find(|d| d.gpa == r.gpa)
                .map(|d| std::mem::take(&mut d.words))
                .unwrap_or_default();
            w.resize(words, 0);
            w
        })
        .collect()
}
