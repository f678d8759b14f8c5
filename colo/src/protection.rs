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

/// Thrown once when the peer is lost or failover is asked for: records why, tells the peer
/// (a farewell on the heartbeat when this side ends protection on purpose) and shuts the
/// checkpoint streams down, which wakes any thread blocked on them at once.
#[derive(Default)]
pub struct FailoverSwitch {
    inner: Mutex<SwitchInner>,
}

#[derive(Default)]
struct SwitchInner {
    reason: Option<String>,
    /// The peer ended protection on purpose (it keeps running).
    farewell_from_peer: bool,
    streams: Vec<Box<dyn Transport>>,
    heartbeat: Option<Heartbeat>,
    wake: Option<MpscSender<Command>>,
}

impl FailoverSwitch {
    fn inner(&self) -> std::sync::MutexGuard<'_, SwitchInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Streams to shut down when thrown (if already thrown, shuts them down at once).
    pub fn guard_streams(&self, streams: Vec<Box<dyn Transport>>) {
        let mut i = self.inner();
        if i.reason.is_some() {
            for s in &streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        i.streams.extend(streams);
    }

    /// The heartbeat to stop (or say farewell on) when thrown.
    pub fn own_heartbeat(&self, hb: Heartbeat) {
        let mut i = self.inner();
        if i.reason.is_some() {
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

    /// Throws the switch: the peer is gone (`farewell: false`) or this side ends protection
    /// on purpose (`farewell: true`, the peer is told). Only the first call counts.
    pub fn throw(&self, reason: String, farewell: bool) {
        self.throw_inner(reason, farewell, false);
    }

    /// Throws the switch because the peer said farewell.
    pub fn peer_left(&self, reason: String) {
        self.throw_inner(reason, false, true);
    }

    fn throw_inner(&self, reason: String, farewell: bool, from_peer: bool) {
        let (hb, wake) = {
            let mut i = self.inner();
            if i.reason.is_some() {
                return;
            }
            log::warn!("COLO: {reason}");
            i.reason = Some(reason);
            i.farewell_from_peer = from_peer;
            for s in &i.streams {
                let _ = s.shutdown(Shutdown::Both);
            }
            (i.heartbeat.take(), i.wake.take())
        };
        // Outside the lock: stopping the heartbeat joins its threads, and one of them may be
        // the caller's (the heartbeat reports a loss from its own thread).
        if let Some(hb) = hb {
            if farewell {
                hb.farewell();
            } else {
                std::thread::spawn(move || hb.stop());
            }
        }
        if let Some(tx) = wake {
            let _ = tx.send(Command::Wake);
        }
    }

    /// Why it was thrown, if it was.
    pub fn reason(&self) -> Option<String> {
        self.inner().reason.clone()
    }

    /// Whether it was thrown because the peer said farewell.
    pub fn peer_said_farewell(&self) -> bool {
        self.inner().farewell_from_peer
    }

    /// Stops the heartbeat without a failover (protection over for another reason).
    pub fn disarm(&self) {
        let hb = self.inner().heartbeat.take();
        if let Some(hb) = hb {
            hb.stop();
        }
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

    /// Failover by hand: this side goes on alone and tells the peer so (QEMU's
    /// `x-colo-lost-heartbeat`). A checkpoint being loaded on the secondary finishes first.
    pub fn failover(&self) -> Result<(), ProtectionError> {
        if !self.active() {
            return Err(ProtectionError::Ended);
        }
        self.switch
            .throw("failover requested through the API".into(), true);
        Ok(())
    }
}
