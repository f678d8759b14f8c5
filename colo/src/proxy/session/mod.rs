//! The two sides' proxy logic as pure, synchronous state machines: the caller moves the bytes
//! (tap, virtio-net, the proxy channel) and calls in; nothing here blocks, spawns or owns a
//! socket, and time comes in as `now` arguments.
//!
//! # Epochs
//!
//! The primary resumes the PVM as soon as a checkpoint's dirty pages are copied aside, before
//! the secondary has loaded that checkpoint. So for a while the two VMs are in different
//! **epochs**: the PVM's frames sent after the pause of checkpoint `n` belong to epoch `n` and
//! must be compared with what the SVM sends after it loaded checkpoint `n` — which the
//! secondary marks with an `Epoch { checkpoint: n }` message on the proxy channel, in order
//! with its SvmOutput frames; the SVM's frames before that marker still belong to epoch `n-1`.
//!
//! [`PrimaryProxy`] keeps one [`ColoCompare`] and one [`SeqRewriter`] per epoch, at most two
//! alive: the oldest one the SVM may still be sending into, and the one the PVM is in.
//!
//! - [`PrimaryProxy::checkpoint_started`]`(n)` (PVM paused): a new epoch `n`; PVM frames go
//!   there from now on.
//! - [`PrimaryProxy::svm_epoch`]`(n)` (the secondary's marker): SVM frames go to epoch `n`.
//! - [`PrimaryProxy::checkpoint_done`]`(n)` (the secondary's Ack): every epoch before `n` ends —
//!   its held PVM frames are released, its SVM frames dropped ([`ColoCompare::checkpoint_done`]).
//!   SVM frames that still arrive before the marker `n` belong to an epoch that is gone and are
//!   dropped. Marker and Ack travel on different connections: either may come first.
//! - Releases keep their order towards the tap: a frame of epoch `n` leaves only when no older
//!   epoch holds a PVM frame any more; until then it waits in its epoch's buffer.
//! - Only the PVM's current epoch may ask for a checkpoint (a request of an older epoch is moot:
//!   the checkpoint that ends it is already under way), at most once per epoch; it may come
//!   while checkpoint `n` still runs: take the next one after it.
//!
//! Mirrored frames need the same care in the other direction: a client frame that reached the
//! PVM after the pause of checkpoint `n` must reach the SVM after it loaded `n`, and one from
//! before must not reach it after (checkpoint `n` already holds its effect). So the primary
//! puts a marker of its own into the mirror stream at every pause ([`Output::MirrorEpoch`]) and
//! [`SecondaryProxy`] queues or drops mirrored frames by it; ISN offsets carry their epoch too.
//! Both need the proxy channel to carry them (see [`Output`]).

mod secondary;
#[cfg(test)]
mod tests;

pub use secondary::{Loaded, SecondaryCounters, SecondaryProxy, SvmTx};

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use serde::Serialize;

use super::compare::{Action, ColoCompare, CompareConfig, CompareCounters, MismatchReason};
use super::packet::{ConnKey, KeyDir};
use super::rewriter::{RewriterCounters, SeqRewriter};

/// Bit of the vnet header's flags byte (byte 0) for "checksum to be completed by the device":
/// the checksum field holds only the pseudo-header sum, so a rewrite must leave it alone.
pub const VNET_F_NEEDS_CSUM: u8 = 1;

/// A call came out of the order the checkpoint protocol allows: the caller's state is wrong,
/// so protection should end.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// `checkpoint_started(n)` while another checkpoint is still open, or not the next number.
    #[error("checkpoint {got} started, expected {expected} (the previous one must be done)")]
    BadStart {
        /// The number given.
        got: u64,
        /// The only number allowed now.
        expected: u64,
    },
    /// `checkpoint_done(n)` for another checkpoint than the one running.
    #[error("checkpoint {got} done, but {running:?} is running")]
    BadDone {
        /// The number given.
        got: u64,
        /// The checkpoint started and not yet done.
        running: Option<u64>,
    },
    /// An epoch marker that does not advance or names a checkpoint not yet started.
    #[error("epoch marker {got}: the last was {last}, the newest checkpoint {newest}")]
    BadMarker {
        /// The number given.
        got: u64,
        /// The last marker.
        last: u64,
        /// The newest checkpoint started (or loaded, on the secondary).
        newest: u64,
    },
    /// A call that needs protection after the failover.
    #[error("the proxy has failed over")]
    FailedOver,
}

/// What the caller of [`PrimaryProxy`] must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this frame (vnet header + Ethernet frame) to the tap.
    ToTap(Vec<u8>),
    /// Ask for a checkpoint (at most one per epoch).
    Checkpoint(MismatchReason),
    /// Tell the secondary a learned TCP sequence offset, which it needs after a failover. It
    /// belongs to `epoch` (the SVM's offsets start at zero at every checkpoint): the wire's
    /// IsnOffset must carry this number for the secondary to use it only in that epoch
    /// ([`SecondaryProxy::learn_offset`]).
    SendOffset {
        /// The checkpoint whose epoch the connection was opened in.
        epoch: u64,
        /// The connection.
        key: ConnKey,
        /// The direction of the guest's segments.
        guest_dir: KeyDir,
        /// SVM ISN − PVM ISN.
        offset: u32,
    },
    /// Put an epoch marker into the mirror stream, before any later mirrored frame: what
    /// follows reached the PVM in epoch `n` ([`SecondaryProxy::mirror_epoch`]). Needs a
    /// primary → secondary Epoch message on the proxy channel.
    MirrorEpoch(u64),
}

/// Counters of a [`PrimaryProxy`], for the status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrimaryCounters {
    /// The compares of all epochs, summed (gauges: the live epochs').
    pub compare: CompareCounters,
    /// The rewriters of all epochs, summed.
    pub rewriter: RewriterCounters,
    /// The PVM's epoch (the newest checkpoint started; 0 before the first).
    pub pvm_epoch: u64,
    /// The epoch the SVM's frames go to (the last marker).
    pub svm_epoch: u64,
    /// The last checkpoint the secondary acknowledged.
    pub checkpoint_done: u64,
    /// Epochs alive (1 or 2).
    pub epochs: usize,
    /// Released frames waiting for an older epoch now.
    pub buffered: usize,
    /// SVM frames dropped because their epoch had ended.
    pub stale_svm: u64,
    /// Checkpoint requests of an older epoch, not passed on.
    pub moot_requests: u64,
    /// Offsets sent to the secondary.
    pub offsets_sent: u64,
    /// Mirrored frames (copies for the secondary).
    pub mirrored: u64,
    /// Whether the proxy failed over.
    pub failed_over: bool,
}

/// One epoch's compare and rewriter.
struct Epoch {
    n: u64,
    compare: ColoCompare,
    rewriter: SeqRewriter,
    /// Frames this epoch released while an older epoch still held some.
    buffered: VecDeque<Vec<u8>>,
    /// This epoch asked for a checkpoint.
    requested: bool,
    /// Offsets told to the secondary.
    sent: HashMap<ConnKey, u32>,
    /// `offsets_learned` of the rewriter when last looked at.
    learned_seen: u64,
}

impl Epoch {
    fn new(n: u64, cfg: &CompareConfig) -> Self {
        Epoch {
            n,
            compare: ColoCompare::new(cfg.clone()),
            rewriter: SeqRewriter::new(),
            buffered: VecDeque::new(),
            requested: false,
            sent: HashMap::new(),
            learned_seen: 0,
        }
    }

    /// PVM frames the compare holds.
    fn held(&self) -> u64 {
        let c = self.compare.counters();
        c.primary_packets
            .saturating_sub(c.released)
            .saturating_sub(c.dropped_primary)
    }

    /// Nothing of this epoch may still leave: a newer epoch's frames need not wait for it.
    fn drained(&self) -> bool {
        self.held() == 0 && self.buffered.is_empty()
    }
}

/// The primary's proxy: mirrors client frames, holds the PVM's, compares them with the SVM's
/// per epoch, releases them in order (see the module documentation).
pub struct PrimaryProxy {
    cfg: CompareConfig,
    /// Oldest first; never empty, at most two.
    epochs: VecDeque<Epoch>,
    svm_epoch: u64,
    done: u64,
    failed_over: bool,
    /// Counters of the epochs that ended.
    retired: CompareCounters,
    retired_rw: RewriterCounters,
    counters: PrimaryCounters,
}

impl PrimaryProxy {
    /// A proxy before protection: until [`checkpoint_started`](Self::checkpoint_started)`(1)`
    /// (epoch 0) the PVM's frames pass straight through and nothing is mirrored.
    pub fn new(cfg: CompareConfig) -> Self {
        let mut first = Epoch::new(0, &cfg);
        // Epoch 0 has no SVM: its compare lets everything through.
        let _ = first.compare.failover();
        PrimaryProxy {
            cfg,
            epochs: VecDeque::from([first]),
            svm_epoch: 0,
            done: 0,
            failed_over: false,
            retired: CompareCounters::default(),
            retired_rw: RewriterCounters::default(),
            counters: PrimaryCounters::default(),
        }
    }

    /// The compare settings.
    pub fn config(&self) -> &CompareConfig {
        &self.cfg
    }

    /// The PVM's epoch (the newest checkpoint started).
    pub fn pvm_epoch(&self) -> u64 {
        self.newest().n
    }

    /// Whether [`failover`](Self::failover) was called.
    pub fn is_failed_over(&self) -> bool {
        self.failed_over
    }

    fn newest(&self) -> &Epoch {
        // `epochs` is never empty: the last epoch is never removed.
        &self.epochs[self.epochs.len() - 1]
    }

    fn newest_index(&self) -> usize {
        self.epochs.len() - 1
    }

    /// A frame from the tap for the PVM (the caller hands the original to the PVM unchanged).
    /// Returns the copy to mirror to the secondary — the client's ACK and SACK blocks put into
    /// the SVM's sequence space by the PVM's epoch's rewriter, the epoch the mirrored frame will
    /// reach the SVM in — or `None` when there is no SVM to mirror to (before protection, after
    /// a failover).
    pub fn from_client(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        if self.failed_over || self.newest().n == 0 {
            return None;
        }
        let hdr = self.cfg.vnet_hdr_len;
        let mut copy = frame.to_vec();
        if copy.len() > hdr {
            let fix = !needs_csum(&copy);
            let idx = self.newest_index();
            self.epochs[idx].rewriter.to_svm(&mut copy[hdr..], fix);
        }
        self.counters.mirrored += 1;
        Some(copy)
    }

    /// A frame the PVM sent: its epoch's rewriter sees it (an SVM SYN it was holding for the
    /// PVM's ISN goes to the compare now), then the compare holds or releases it.
    pub fn from_pvm(&mut self, now: Instant, frame: Vec<u8>) -> Vec<Output> {
        let mut out = Vec::new();
        let idx = self.newest_index();
        let hdr = self.cfg.vnet_hdr_len;
        if !self.failed_over && self.epochs[idx].n > 0 {
            let waiting = match frame.get(hdr..) {
                Some(eth) => self.epochs[idx].rewriter.pvm_out(eth),
                None => Vec::new(),
            };
            // The rewriter held them without their vnet header; the compare ignores it.
            let zero = vec![0; hdr];
            for eth in waiting {
                let f = join(&zero, eth);
                let actions = self.epochs[idx].compare.secondary(now, f);
                self.route(idx, actions, &mut out);
            }
            self.announce_offsets(idx, &mut out);
        }
        let actions = self.epochs[idx].compare.primary(now, frame);
        self.route(idx, actions, &mut out);
        out
    }

    /// A frame the SVM sent (as it came in SvmOutput): into the PVM's sequence space by its
    /// epoch's rewriter, then compared in that epoch. Dropped when its epoch has ended.
    pub fn from_svm(&mut self, now: Instant, frame: Vec<u8>) -> Vec<Output> {
        let mut out = Vec::new();
        if self.failed_over {
            return out;
        }
        let Some(idx) = self.epochs.iter().position(|e| e.n == self.svm_epoch) else {
            self.counters.stale_svm += 1;
            return out;
        };
        let hdr = self.cfg.vnet_hdr_len;
        let frames = if frame.len() > hdr {
            let fix = !needs_csum(&frame);
            let mut head = frame;
            let eth = head.split_off(hdr);
            let svm = self.epochs[idx].rewriter.svm_out(eth, fix);
            svm.into_iter().map(|eth| join(&head, eth)).collect()
        } else {
            vec![frame]
        };
        for f in frames {
            let actions = self.epochs[idx].compare.secondary(now, f);
            self.route(idx, actions, &mut out);
        }
        self.announce_offsets(idx, &mut out);
        self.drain(&mut out);
        out
    }

    /// The PVM is paused for checkpoint `n`: the PVM's later frames belong to a new epoch `n`.
    /// `n` must follow the last checkpoint, which must be done. Returns the mirror marker.
    pub fn checkpoint_started(&mut self, n: u64) -> Result<Vec<Output>, SessionError> {
        if self.failed_over {
            return Err(SessionError::FailedOver);
        }
        let newest = self.newest().n;
        if n != newest + 1 || self.done != newest {
            return Err(SessionError::BadStart {
                got: n,
                expected: self.done + 1,
            });
        }
        self.epochs.push_back(Epoch::new(n, &self.cfg));
        Ok(vec![Output::MirrorEpoch(n)])
    }

    /// The secondary's marker: the SVM loaded checkpoint `n`, its later frames belong to epoch
    /// `n`. Markers advance and never pass the newest checkpoint started.
    pub fn svm_epoch(&mut self, n: u64) -> Result<(), SessionError> {
        if self.failed_over {
            return Ok(());
        }
        let newest = self.newest().n;
        if n <= self.svm_epoch || n > newest {
            return Err(SessionError::BadMarker {
                got: n,
                last: self.svm_epoch,
                newest,
            });
        }
        self.svm_epoch = n;
        Ok(())
    }

    /// The secondary acknowledged checkpoint `n` (the one running): every older epoch ends —
    /// its held PVM frames are released in order, its SVM frames dropped — followed by what
    /// epoch `n` released meanwhile.
    pub fn checkpoint_done(&mut self, n: u64) -> Result<Vec<Output>, SessionError> {
        if self.failed_over {
            return Err(SessionError::FailedOver);
        }
        let newest = self.newest().n;
        let running = (newest > self.done).then_some(newest);
        if running != Some(n) {
            return Err(SessionError::BadDone { got: n, running });
        }
        let mut out = Vec::new();
        while self.epochs.front().is_some_and(|e| e.n < n) {
            let Some(mut old) = self.epochs.pop_front() else {
                break;
            };
            out.extend(old.buffered.drain(..).map(Output::ToTap));
            for a in old.compare.checkpoint_done() {
                if let Action::Release(f) = a {
                    out.push(Output::ToTap(f));
                }
            }
            self.retire(&old);
        }
        self.done = n;
        self.drain(&mut out);
        Ok(out)
    }

    /// Checkpoint `n` failed (refused, I/O error): protection ends, as by
    /// [`failover`](Self::failover).
    pub fn checkpoint_failed(&mut self, n: u64) -> Vec<Output> {
        log::warn!("proxy: checkpoint {n} failed, passing the PVM's frames through");
        self.failover()
    }

    /// Looks for frames that waited too long in the PVM's epoch, once the SVM is in it too
    /// (before, waiting is the checkpoint's doing, not a divergence). Call it every
    /// [`super::compare::DEFAULT_SCAN_PERIOD`] or so.
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.failed_over {
            return out;
        }
        let idx = self.newest_index();
        if self.epochs[idx].n == self.svm_epoch {
            let actions = self.epochs[idx].compare.tick(now);
            self.route(idx, actions, &mut out);
        }
        out
    }

    /// The secondary is gone: everything held is released (epoch by epoch, in order), and the
    /// PVM's frames pass straight through from now on.
    pub fn failover(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        if self.failed_over {
            return out;
        }
        self.failed_over = true;
        for e in &mut self.epochs {
            out.extend(e.buffered.drain(..).map(Output::ToTap));
            for a in e.compare.failover() {
                if let Action::Release(f) = a {
                    out.push(Output::ToTap(f));
                }
            }
        }
        while self.epochs.len() > 1 {
            if let Some(old) = self.epochs.pop_front() {
                self.retire(&old);
            }
        }
        out
    }

    /// The counters: the compares and rewriters of all epochs summed, and the proxy's own.
    pub fn counters(&self) -> PrimaryCounters {
        let mut c = self.counters;
        c.compare = self.retired;
        c.compare.queue_depth = 0;
        c.compare.connections = 0;
        c.rewriter = self.retired_rw;
        for e in &self.epochs {
            add_compare(&mut c.compare, &e.compare.counters());
            add_rewriter(&mut c.rewriter, &e.rewriter.counters());
        }
        c.pvm_epoch = self.newest().n;
        c.svm_epoch = self.svm_epoch;
        c.checkpoint_done = self.done;
        c.epochs = self.epochs.len();
        c.buffered = self.epochs.iter().map(|e| e.buffered.len()).sum();
        c.failed_over = self.failed_over;
        c
    }

    /// Hands an epoch's actions on: releases to the tap unless an older epoch still has some
    /// to send, checkpoint requests only from the PVM's epoch and once.
    fn route(&mut self, idx: usize, actions: Vec<Action>, out: &mut Vec<Output>) {
        let newest = self.newest_index();
        for a in actions {
            match a {
                Action::Release(f) => {
                    if self.epochs.iter().take(idx).all(Epoch::drained) {
                        out.push(Output::ToTap(f));
                    } else {
                        self.epochs[idx].buffered.push_back(f);
                    }
                }
                Action::Checkpoint(reason) => {
                    let e = &mut self.epochs[idx];
                    if idx == newest && !e.requested && !self.failed_over {
                        e.requested = true;
                        out.push(Output::Checkpoint(reason));
                    } else {
                        self.counters.moot_requests += 1;
                    }
                }
            }
        }
    }

    /// Releases buffered frames whose older epochs have nothing left to send (the oldest
    /// epoch's buffer too: it was the newer one until an epoch before it ended).
    fn drain(&mut self, out: &mut Vec<Output>) {
        for i in 0..self.epochs.len() {
            if !self.epochs.iter().take(i).all(Epoch::drained) {
                break;
            }
            out.extend(self.epochs[i].buffered.drain(..).map(Output::ToTap));
        }
    }

    /// Emits [`Output::SendOffset`] for offsets the epoch's rewriter learned since last time.
    fn announce_offsets(&mut self, idx: usize, out: &mut Vec<Output>) {
        let e = &mut self.epochs[idx];
        let learned = e.rewriter.counters().offsets_learned;
        if learned == e.learned_seen {
            return;
        }
        e.learned_seen = learned;
        for (key, guest_dir, offset) in e.rewriter.offsets() {
            let before = e.sent.get(&key).copied();
            // A zero offset needs no rewriting; it is worth telling only to replace another.
            if before == Some(offset) || (before.is_none() && offset == 0) {
                continue;
            }
            e.sent.insert(key, offset);
            self.counters.offsets_sent += 1;
            out.push(Output::SendOffset {
                epoch: e.n,
                key,
                guest_dir,
                offset,
            });
        }
    }

    fn retire(&mut self, e: &Epoch) {
        let mut c = e.compare.counters();
        c.queue_depth = 0;
        c.connections = 0;
        add_compare(&mut self.retired, &c);
        add_rewriter(&mut self.retired_rw, &e.rewriter.counters());
    }
}

/// Whether a frame's vnet header asks for checksum offload (its checksum must not be fixed).
pub fn needs_csum(frame: &[u8]) -> bool {
    frame.first().is_some_and(|f| f & VNET_F_NEEDS_CSUM != 0)
}

fn join(head: &[u8], eth: Vec<u8>) -> Vec<u8> {
    let mut f = Vec::with_capacity(head.len() + eth.len());
    f.extend_from_slice(head);
    f.extend(eth);
    f
}

fn add_compare(a: &mut CompareCounters, b: &CompareCounters) {
    a.primary_packets += b.primary_packets;
    a.secondary_packets += b.secondary_packets;
    a.compared_bytes += b.compared_bytes;
    a.released += b.released;
    a.flushed += b.flushed;
    a.mismatches += b.mismatches;
    a.timeouts += b.timeouts;
    a.overflows += b.overflows;
    a.dropped_primary += b.dropped_primary;
    a.dropped_secondary += b.dropped_secondary;
    a.discarded_secondary += b.discarded_secondary;
    a.unparsed += b.unparsed;
    a.checkpoint_requests += b.checkpoint_requests;
    a.queue_depth += b.queue_depth;
    a.queue_depth_max = a.queue_depth_max.max(b.queue_depth_max);
    a.connections += b.connections;
}

fn add_rewriter(a: &mut RewriterCounters, b: &RewriterCounters) {
    a.offsets_learned += b.offsets_learned;
    a.svm_rewritten += b.svm_rewritten;
    a.client_rewritten += b.client_rewritten;
    a.held += b.held;
    a.dropped += b.dropped;
}
