//! The handle the VMM keeps on a running protection (either role), and the failover switch
//! the COLO worker, the heartbeat and the API share.

use std::net::Shutdown;
use std::sync::mpsc::Sender as MpscSender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use migration::Transport;

use crate::heartbeat::Heartbeat;
use crate::record::Reason;
use crate::status::{ColoStatus, SharedStatus};

/// What the API asks of the primary's worker.
#[derive(Debug)]
pub enum Command {
    /// Take a checkpoint now.
    Checkpoint {
        /// Why.
        reason: Reason,
        /// Both VMs stay paused after it.
        pause_after: bool,
    },
    /// Change the checkpoint interval.
    SetInterval(Duration),
    /// Wake up: the failover switch was thrown.
    Wake,
}

/// Errors of requests to a protection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtectionError {
    /// Protection has ended.
    #[error("COLO protection has ended")]
    Ended,
    /// Only the primary takes checkpoints and has an interval.
    #[error("only the primary takes checkpoints")]
    NotPrimary,
}

/// Why protection ended, as the failover switch saw it first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The peer died, hung or its connection broke (the heartbeat's verdict).
    PeerLost,
    /// The peer ended protection on purpose and lives on (its farewell).
    PeerLeft,
    /// Failover asked for through the API on this side.
    Requested,
    /// This side's worker failed (or refused what the peer sent) and ends protection.
    Failed,
}

/// Thrown once when the peer is lost, failover is asked for, or the worker fails: records the
/// first cause, tells the peer when this side ends protection on purpose (a farewell on the
/// heartbeat, sent before anything else closes), then shuts the checkpoint streams down,
/// which wakes any thread blocked on them at once.
#[derive(Default)]
pub struct FailoverSwitch {
    inner: Mutex<SwitchInner>,
    thrown: std::sync::Condvar,
    /// Say farewell whatever the cause (the primary: it always carries on).
    always_farewell: bool,
}

#[derive(Default)]
struct SwitchInner {
    cause: Option<(Cause, String)>,
    /// The heartbeat was stopped and the streams shut.
    acted: bool,
    streams: Vec<Box<dyn Transport>>,
    heartbeat: Option<Heartbeat>,
    wake: Option<MpscSender<Command>>,
}

impl FailoverSwitch {
    /// The primary's switch: it says farewell on every cause.
    pub fn for_primary() -> Self {
        FailoverSwitch {
            always_farewell: true,
            ..FailoverSwitch::default()
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, SwitchInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Streams to shut down when thrown (if already thrown, shuts them down at once).
    pub fn guard_streams(&self, streams: Vec<Box<dyn Transport>>) {
        let mut i = self.inner();
        if i.acted {
            for s in &streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        i.streams.extend(streams);
    }

    /// The heartbeat to stop (or say farewell on) when thrown.
    pub fn own_heartbeat(&self, hb: Heartbeat) {
        let mut i = self.inner();
        if i.acted {
            drop(i);
            hb.stop();
            return;
        }
        i.heartbeat = Some(hb);
    }

    /// Where to send a wake-up when thrown.
    pub fn wake_with(&self, tx: MpscSender<Command>) {
        self.inner().wake = Some(tx);
    }

    /// Records the first cause without acting on it yet (the worker still has to tell the
    /// peer why, on the stream, before the streams close). A later [`Self::throw`] acts.
    pub fn claim(&self, cause: Cause, reason: String) {
        let mut i = self.inner();
        if i.cause.is_none() {
            log::warn!("COLO: {reason}");
            i.cause = Some((cause, reason));
        }
    }

    /// Throws the switch: the first cause recorded is the one that counts; the first throw
    /// acts on it.
    pub fn throw(&self, cause: Cause, reason: String) {
        self.claim(cause, reason);
        let (cause, hb, wake, streams) = {
            let mut i = self.inner();
            if std::mem::replace(&mut i.acted, true) {
                return;
            }
            let cause = i.cause.as_ref().map_or(cause, |(c, _)| *c);
            let streams: Vec<_> = i
                .streams
                .iter()
                .filter_map(|s| s.try_clone_transport().ok())
                .collect();
            (cause, i.heartbeat.take(), i.wake.take(), streams)
        };
        self.thrown.notify_all();
        // Outside the lock: stopping the heartbeat joins its threads, and one of them may be
        // the caller's (the heartbeat reports a loss from its own thread). The farewell goes
        // before the streams close, so the peer hears why before it sees them end.
        if let Some(hb) = hb {
            // The primary always lives on, so it always says so: a secondary that merely
            // missed beats must stop rather than take over (two VMs).
            if self.always_farewell || matches!(cause, Cause::Requested | Cause::Failed) {
                hb.send_farewell();
            }
            // Dropping joins the heartbeat's threads, and this may be one of them.
            std::thread::spawn(move || drop(hb));
        }
        // A secondary that said farewell closes the streams itself, after telling the primary
        // why (a refused checkpoint, say): let the primary's worker read that reason.
        if !(self.always_farewell && cause == Cause::PeerLeft) {
            for s in &streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Some(tx) = wake {
            let _ = tx.send(Command::Wake);
        }
    }

    /// The first cause and its reason, if thrown.
    pub fn cause(&self) -> Option<(Cause, String)> {
        self.inner().cause.clone()
    }

    /// Why it was thrown, if it was.
    pub fn reason(&self) -> Option<String> {
        self.cause().map(|(_, r)| r)
    }

    /// Waits at most `limit` for the switch to be thrown (for the heartbeat's verdict after
    /// a stream broke); returns the cause if it was.
    pub fn wait(&self, limit: Duration) -> Option<(Cause, String)> {
        let deadline = std::time::Instant::now() + limit;
        let mut i = self.inner();
        while i.cause.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            i = self
                .thrown
                .wait_timeout(i, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        i.cause.clone()
    }
}

/// Whether a stream error means the peer may be gone (ask the heartbeat), rather than that
/// it sent something refused or refused something itself (it is alive).
pub fn peer_may_be_gone(e: &migration::ChannelError) -> bool {
    use migration::{ChannelError as C, ProtocolError as P};
    match e {
        C::Protocol { source, .. } => matches!(
            source,
            P::Io(_) | P::Timeout | P::Idle | P::Closed | P::Truncated { .. }
        ),
        C::Io { .. }
        | C::ChannelEnded { .. }
        | C::Idle(_)
        | C::Stalled(_)
        | C::Aborted
        | C::AlreadyFailed => true,
        _ => false,
    }
}

/// A running protection, as the VMM holds it.
pub struct Protection {
    pub(crate) status: SharedStatus,
    pub(crate) switch: Arc<FailoverSwitch>,
    pub(crate) commands: Option<MpscSender<Command>>,
}

impl Protection {
    /// The status now.
    pub fn status(&self) -> ColoStatus {
        self.status.get()
    }

    /// Whether protection still runs.
    pub fn active(&self) -> bool {
        self.status.lock().exit.is_none()
    }

    /// Asks the primary for a checkpoint now (returns at once; the status and the event
    /// stream tell when it completed).
    pub fn checkpoint(&self, pause_after: bool) -> Result<(), ProtectionError> {
        self.command(Command::Checkpoint {
            reason: Reason::Request,
            pause_after,
        })
    }

    /// Changes the primary's checkpoint interval.
    pub fn set_interval(&self, interval: Duration) -> Result<(), ProtectionError> {
        self.command(Command::SetInterval(interval))
    }

    fn command(&self, c: Command) -> Result<(), ProtectionError> {
        if !self.active() {
            return Err(ProtectionError::Ended);
        }
        let tx = self.commands.as_ref().ok_or(ProtectionError::NotPrimary)?;
        tx.send(c).map_err(|_| ProtectionError::Ended)
    }

    /// Ends protection because this side's VM stops (the guest powered off, the VMM shuts
    /// down): the peer is told, so it does not take over a VM that was meant to stop.
    pub fn end(&self, reason: &str) {
        if self.active() {
            self.switch.throw(Cause::Requested, reason.to_string());
        }
    }

    /// Failover by hand: this side goes on alone and tells the peer so (QEMU's
    /// `x-colo-lost-heartbeat`). A checkpoint being loaded on the secondary finishes first.
    pub fn failover(&self) -> Result<(), ProtectionError> {
        if !self.active() {
            return Err(ProtectionError::Ended);
        }
        self.switch.throw(
            Cause::Requested,
            "failover requested through the API".into(),
        );
        Ok(())
    }
}
