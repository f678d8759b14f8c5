//! The secondary's proxy: mirrored frames into the SVM by epoch, the SVM's frames back to the
//! primary, and after a failover the SVM on the real network with the client's connections
//! kept in the sequence space the client knows.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use super::super::compare::DEFAULT_VNET_HDR_LEN;
use super::super::packet::{self, rewrite_tcp_u32, ConnKey, KeyDir, Net, TcpField, Transport};
use super::super::rewriter::SeqRewriter;
use super::super::wire::Message;
use super::{needs_csum, SessionError};

/// Mirrored frames queued for an epoch the SVM has not loaded yet, at most.
pub const MAX_QUEUED: usize = 8192;
/// Offsets kept (the current epoch's plus those told for the next), at most.
pub const MAX_OFFSETS: usize = 65_536;
/// TCP segments the SVM sent since its last load kept for a takeover, at most (the oldest go).
pub const MAX_REPLAY: usize = 1024;

/// Where a frame the SVM sent goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SvmTx {
    /// While protected: to the primary, as SvmOutput (never to this host's tap).
    ToPrimary(Vec<u8>),
    /// After a failover: to the tap, in the sequence space the client knows.
    ToTap(Vec<u8>),
}

/// What to do once the SVM loaded a checkpoint, before it runs again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Send this to the primary before any SvmOutput of the new epoch.
    pub marker: Message<'static>,
    /// Mirrored frames that waited for this epoch: into the SVM's rx, in this order.
    pub inject: Vec<Vec<u8>>,
}

/// Counters of a [`SecondaryProxy`], for the status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SecondaryCounters {
    /// The checkpoint the SVM last loaded.
    pub svm_epoch: u64,
    /// The epoch of the mirrored frames arriving now (the primary's last marker).
    pub mirror_epoch: u64,
    /// Mirrored frames handed to the SVM.
    pub injected: u64,
    /// Mirrored frames waiting for the next checkpoint's load now.
    pub queued: usize,
    /// Mirrored frames dropped: their epoch's checkpoint already holds them.
    pub stale_mirrored: u64,
    /// Mirrored frames dropped because the queue was full.
    pub queue_full: u64,
    /// SVM frames sent to the primary.
    pub svm_out: u64,
    /// Frames from this host's tap dropped while protected.
    pub tap_dropped: u64,
    /// Offsets known for the SVM's epoch now.
    pub offsets: usize,
    /// Offsets dropped: of an epoch that ended, or beyond [`MAX_OFFSETS`].
    pub offsets_dropped: u64,
    /// After the failover: SVM segments put into the client's sequence space.
    pub svm_rewritten: u64,
    /// After the failover: client segments put into the SVM's sequence space.
    pub client_rewritten: u64,
    /// At the failover: the SVM's segments since its last load sent again, to the tap.
    pub replayed: u64,
    /// Segments kept for a replay that were dropped ([`MAX_REPLAY`]).
    pub replay_dropped: u64,
    /// Whether the proxy failed over.
    pub failed_over: bool,
}

/// The secondary's proxy (see the parent module's documentation).
pub struct SecondaryProxy {
    hdr: usize,
    svm_epoch: u64,
    mirror_epoch: u64,
    /// Mirrored frames of an epoch after the SVM's, with that epoch.
    queued: VecDeque<(u64, Vec<u8>)>,
    /// The SVM's epoch's offsets: guest direction and SVM ISN − PVM ISN.
    offsets: HashMap<ConnKey, (KeyDir, u32)>,
    /// Offsets told for a later epoch.
    pending: Vec<(u64, ConnKey, KeyDir, u32)>,
    failed_over: bool,
    /// The SVM is paused to load the next checkpoint.
    applying: bool,
    /// The SVM's TCP segments carrying data, SYN or FIN since its last load: they went to the
    /// primary, and only the matched ones reached the client.
    since_load: VecDeque<Vec<u8>>,
    /// After the failover: the client's ACKs and SACK blocks into the SVM's space.
    rewriter: SeqRewriter,
    counters: SecondaryCounters,
}

impl Default for SecondaryProxy {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP segment's place in its connection.
struct TcpInfo {
    key: ConnKey,
    dir: KeyDir,
    offset: usize,
    seq: u32,
    /// A SYN without ACK: someone opens a new connection.
    opening: bool,
}

/// Whether `eth` is a TCP segment that moves its stream: data, SYN or FIN (a lost pure ACK
/// costs nothing; the next one says the same).
fn carries_stream(eth: &[u8]) -> bool {
    let Ok(f) = packet::parse(eth) else {
        return false;
    };
    let Net::Ip(ip) = &f.net else { return false };
    let Transport::Tcp(t) = &ip.transport else {
        return false;
    };
    !t.payload().is_empty() || t.syn() || t.fin()
}

fn tcp_info(eth: &[u8]) -> Option<TcpInfo> {
    let f = packet::parse(eth).ok()?;
    let Net::Ip(ip) = &f.net else { return None };
    let Transport::Tcp(t) = &ip.transport else {
        return None;
    };
    let (key, dir) = f.conn_key();
    Some(TcpInfo {
        key,
        dir,
        offset: t.offset,
        seq: t.seq(),
        opening: t.syn() && !t.has_ack(),
    })
}

impl SecondaryProxy {
    /// A proxy before the first checkpoint: nothing reaches the SVM until it loaded one.
    pub fn new() -> Self {
        SecondaryProxy {
            hdr: DEFAULT_VNET_HDR_LEN,
            svm_epoch: 0,
            mirror_epoch: 0,
            queued: VecDeque::new(),
            offsets: HashMap::new(),
            pending: Vec::new(),
            failed_over: false,
            applying: false,
            since_load: VecDeque::new(),
            rewriter: SeqRewriter::new(),
            counters: SecondaryCounters::default(),
        }
    }

    /// Whether [`failover`](Self::failover) was called.
    pub fn is_failed_over(&self) -> bool {
        self.failed_over
    }

    /// The primary's mirror marker: the mirrored frames after it reached the PVM in epoch `n`.
    pub fn mirror_epoch(&mut self, n: u64) -> Result<(), SessionError> {
        if n <= self.mirror_epoch {
            return Err(SessionError::BadMarker {
                got: n,
                last: self.mirror_epoch,
                newest: self.svm_epoch,
            });
        }
        self.mirror_epoch = n;
        Ok(())
    }

    /// A frame a client sent to the PVM (already in the SVM's sequence space): returned for
    /// the SVM's rx when the SVM is in the frame's epoch; queued when that epoch's checkpoint
    /// is still to be loaded ([`Loaded::inject`]); dropped when the SVM's checkpoint already
    /// includes it, or after the failover.
    pub fn mirrored(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        if self.failed_over {
            return None;
        }
        if self.mirror_epoch == self.svm_epoch && self.svm_epoch > 0 && !self.applying {
            self.counters.injected += 1;
            return Some(frame);
        }
        if self.mirror_epoch > self.svm_epoch {
            if self.queued.len() >= MAX_QUEUED {
                self.counters.queue_full += 1;
            } else {
                self.queued.push_back((self.mirror_epoch, frame));
            }
        } else {
            self.counters.stale_mirrored += 1;
        }
        None
    }

    /// A frame the SVM sent: to the primary while protected; after the failover, to the tap
    /// with its sequence number put into the PVM's space on a connection with an offset.
    pub fn from_svm(&mut self, mut frame: Vec<u8>) -> SvmTx {
        if !self.failed_over {
            self.counters.svm_out += 1;
            if frame.get(self.hdr..).is_some_and(carries_stream) {
                if self.since_load.len() >= MAX_REPLAY {
                    self.since_load.pop_front();
                    self.counters.replay_dropped += 1;
                }
                self.since_load.push_back(frame.clone());
            }
            return SvmTx::ToPrimary(frame);
        }
        let fix = !needs_csum(&frame);
        if let Some(eth) = frame.get_mut(self.hdr..) {
            if let Some(t) = tcp_info(eth) {
                if let Some(&(guest_dir, off)) = self.offsets.get(&t.key) {
                    if t.opening {
                        // The guest opens a new connection on the same ports: no offset.
                        self.forget(t.key, guest_dir);
                    } else if t.dir == guest_dir && off != 0 {
                        let seq = t.seq.wrapping_sub(off);
                        if rewrite_tcp_u32(eth, t.offset, TcpField::Seq, seq, fix).is_ok() {
                            self.counters.svm_rewritten += 1;
                        }
                    }
                }
            }
        }
        SvmTx::ToTap(frame)
    }

    /// A frame from this host's tap: dropped while protected (the guest's network is the
    /// primary's); after the failover returned for the SVM's rx, a client's acknowledgment
    /// and SACK blocks put into the SVM's space on a connection with an offset.
    pub fn from_tap(&mut self, mut frame: Vec<u8>) -> Option<Vec<u8>> {
        if !self.failed_over {
            self.counters.tap_dropped += 1;
            return None;
        }
        let fix = !needs_csum(&frame);
        if let Some(eth) = frame.get_mut(self.hdr..) {
            if let Some(t) = tcp_info(eth).filter(|t| t.opening) {
                if let Some(&(guest_dir, _)) = self.offsets.get(&t.key) {
                    // The client opens a new connection on the same ports.
                    self.forget(t.key, guest_dir);
                }
            }
            let before = self.rewriter.counters().client_rewritten;
            self.rewriter.to_svm(eth, fix);
            self.counters.client_rewritten += self.rewriter.counters().client_rewritten - before;
        }
        Some(frame)
    }

    /// An offset the primary learned for a connection opened in `epoch`: used if the SVM is in
    /// that epoch, kept for when it loads it, dropped if that epoch has ended.
    pub fn learn_offset(&mut self, epoch: u64, key: ConnKey, guest_dir: KeyDir, offset: u32) {
        if self.failed_over || epoch < self.svm_epoch {
            self.counters.offsets_dropped += 1;
            return;
        }
        if self.offsets.len() + self.pending.len() >= MAX_OFFSETS
            && !self.offsets.contains_key(&key)
        {
            self.counters.offsets_dropped += 1;
            return;
        }
        if epoch == self.svm_epoch {
            self.offsets.insert(key, (guest_dir, offset));
        } else {
            self.pending.push((epoch, key, guest_dir, offset));
        }
    }

    /// The SVM paused to load the next checkpoint: frames of its current epoch that still
    /// arrive reached the PVM before that checkpoint's pause, which accounts for them — they
    /// are dropped, not injected into an SVM that is about to become the checkpoint.
    pub fn checkpoint_applying(&mut self) {
        self.applying = true;
    }

    /// The SVM loaded checkpoint `n` (and is still paused): its offsets start at zero, the
    /// mirrored frames that waited for `n` are returned for its rx and older ones dropped;
    /// the marker goes to the primary before anything the SVM sends next.
    pub fn checkpoint_loaded(&mut self, n: u64) -> Result<Loaded, SessionError> {
        if self.failed_over {
            return Err(SessionError::FailedOver);
        }
        if n <= self.svm_epoch {
            return Err(SessionError::BadMarker {
                got: n,
                last: self.svm_epoch,
                newest: self.svm_epoch,
            });
        }
        self.svm_epoch = n;
        self.applying = false;
        // What the SVM sent before is superseded: the checkpoint holds what the PVM sent.
        self.since_load.clear();
        self.offsets.clear();
        let mut dropped = 0;
        let mut later = Vec::new();
        for (e, key, dir, off) in std::mem::take(&mut self.pending) {
            match e.cmp(&n) {
                std::cmp::Ordering::Less => dropped += 1,
                std::cmp::Ordering::Equal => {
                    self.offsets.insert(key, (dir, off));
                }
                std::cmp::Ordering::Greater => later.push((e, key, dir, off)),
            }
        }
        self.pending = later;
        self.counters.offsets_dropped += dropped;
        let mut inject = Vec::new();
        let mut keep = VecDeque::new();
        for (e, f) in self.queued.drain(..) {
            match e.cmp(&n) {
                std::cmp::Ordering::Less => self.counters.stale_mirrored += 1,
                std::cmp::Ordering::Equal => inject.push(f),
                std::cmp::Ordering::Greater => keep.push_back((e, f)),
            }
        }
        self.queued = keep;
        self.counters.injected += inject.len() as u64;
        Ok(Loaded {
            marker: Message::Epoch { checkpoint: n },
            inject,
        })
    }

    /// The primary is gone: the SVM goes on from its last loaded checkpoint, on this host's
    /// tap; the connections with an offset keep being rewritten, new ones are not.
    ///
    /// Returns the TCP segments the SVM sent since its last load, in order and in the client's
    /// sequence space, for the tap: they went to the primary, whose matching output may never
    /// have left, and without them the client waits for the SVM's retransmission timer (a
    /// second here). They are the SVM's own output after the state it goes on from, so each
    /// is either new to the client or a duplicate TCP discards; datagrams are not replayed.
    pub fn failover(&mut self) -> Vec<Vec<u8>> {
        if self.failed_over {
            return Vec::new();
        }
        self.failed_over = true;
        self.counters.stale_mirrored += self.queued.len() as u64;
        self.queued.clear();
        self.pending.clear();
        for (&key, &(dir, off)) in &self.offsets {
            self.rewriter.learn(key, dir, off);
        }
        let replay: Vec<Vec<u8>> = std::mem::take(&mut self.since_load)
            .into_iter()
            .filter_map(|f| match self.from_svm(f) {
                SvmTx::ToTap(f) => Some(f),
                SvmTx::ToPrimary(_) => None,
            })
            .collect();
        self.counters.replayed += replay.len() as u64;
        replay
    }

    /// The counters.
    pub fn counters(&self) -> SecondaryCounters {
        let mut c = self.counters;
        c.svm_epoch = self.svm_epoch;
        c.mirror_epoch = self.mirror_epoch;
        c.queued = self.queued.len();
        c.offsets = self.offsets.len();
        c.failed_over = self.failed_over;
        c
    }

    fn forget(&mut self, key: ConnKey, guest_dir: KeyDir) {
        self.offsets.remove(&key);
        // An offset of zero rewrites nothing.
        self.rewriter.learn(key, guest_dir, 0);
    }
}
