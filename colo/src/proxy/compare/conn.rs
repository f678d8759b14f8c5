//! One connection's queues and state: hands each unit to its direction (TCP or datagram),
//! holds the PVM's frames once the VMs diverged, and hands everything over at a checkpoint.

use std::time::Instant;

use super::super::packet::KeyDir;
use super::classify::Body;
use super::datagram::DgDir;
use super::tcp::{Stream, TcpDir};
use super::{Held, Outcome, Side};

/// One connection's queues and state.
#[derive(Debug)]
pub(super) struct Conn {
    /// The VMs were found to differ here: hold the PVM's frames until the checkpoint.
    pub(super) diverged: bool,
    /// Datagram frames held while diverged (TCP ones stay in their direction's queue).
    parked: Vec<Held>,
    /// When a frame of this connection last came, from either side.
    pub(super) last_seen: Instant,
    kind: ConnKind,
}

#[derive(Debug)]
enum ConnKind {
    Tcp(Box<[TcpDir; 2]>),
    Datagrams([DgDir; 2]),
}

impl Conn {
    pub(super) fn new(tcp: bool, now: Instant) -> Self {
        Conn {
            diverged: false,
            parked: Vec::new(),
            last_seen: now,
            kind: if tcp {
                ConnKind::Tcp(Box::default())
            } else {
                ConnKind::Datagrams(Default::default())
            },
        }
    }

    pub(super) fn push(
        &mut self,
        side: Side,
        dir: KeyDir,
        body: Body,
        held: Option<Held>,
        now: Instant,
    ) -> Outcome {
        let d = dir_index(dir);
        match (&mut self.kind, body) {
            (ConnKind::Tcp(dirs), Body::Tcp(seg)) if self.diverged => {
                dirs[d].park(seg, held);
                Outcome::default()
            }
            (ConnKind::Tcp(dirs), Body::Tcp(seg)) => dirs[d].push(side, seg, held, now),
            (_, _) if self.diverged => {
                self.parked.extend(held);
                Outcome::default()
            }
            (ConnKind::Datagrams(dirs), Body::Bytes(b)) => dirs[d].push(side, b, held, now),
            // The key's protocol decides both the connection kind and the body, so this cannot
            // happen; should it, the frame is neither released nor lost.
            (_, _) => {
                self.parked.extend(held);
                Outcome {
                    mismatch: Some("frame of an unexpected kind".into()),
                    ..Outcome::default()
                }
            }
        }
    }

    /// Stops comparing until the checkpoint: the SVM's pieces are dropped (how many is
    /// returned), the PVM's frames stay held.
    pub(super) fn diverge(&mut self) -> usize {
        self.diverged = true;
        let mut discarded = 0;
        match &mut self.kind {
            ConnKind::Tcp(dirs) => {
                for d in dirs.iter_mut() {
                    discarded += d.svm.depth();
                    d.svm = Stream::default();
                    // Nothing more is compared, so the PVM's copy of the bytes is not needed.
                    d.pvm = Stream::default();
                }
            }
            ConnKind::Datagrams(dirs) => {
                for d in dirs.iter_mut() {
                    discarded += d.svm.len();
                    d.svm.clear();
                    self.parked.extend(d.pvm.drain(..).map(|(h, _)| h));
                }
            }
        }
        discarded
    }

    /// After a checkpoint: hands over everything held, counts the SVM's leftovers, and keeps
    /// only where each TCP direction stands.
    pub(super) fn checkpoint(&mut self, held: &mut Vec<Held>, discarded: &mut usize) {
        self.diverged = false;
        held.append(&mut self.parked);
        match &mut self.kind {
            ConnKind::Tcp(dirs) => {
                for d in dirs.iter_mut() {
                    d.checkpoint(held, discarded);
                }
            }
            ConnKind::Datagrams(dirs) => {
                for d in dirs.iter_mut() {
                    *discarded += d.svm.len();
                    d.svm.clear();
                    held.extend(d.pvm.drain(..).map(|(h, _)| h));
                }
            }
        }
    }

    /// Hands over everything held and counts the SVM's leftovers (failover).
    pub(super) fn drain_into(mut self, held: &mut Vec<Held>, discarded: &mut usize) {
        self.checkpoint(held, discarded);
    }

    /// Packets queued: PVM frames held plus SVM pieces waiting.
    pub(super) fn depth(&self) -> usize {
        let parked: usize = self.parked.iter().map(|h| h.frames.len()).sum();
        parked
            + match &self.kind {
                ConnKind::Tcp(dirs) => dirs.iter().map(TcpDir::depth).sum::<usize>(),
                ConnKind::Datagrams(dirs) => dirs.iter().map(DgDir::depth).sum::<usize>(),
            }
    }

    /// Whether the connection holds no state beyond its queues (datagrams, or TCP that has not
    /// seen a segment yet).
    pub(super) fn is_stateless(&self) -> bool {
        !self.diverged
            && match &self.kind {
                ConnKind::Tcp(dirs) => dirs
                    .iter()
                    .all(|d| d.anchor.is_none() && d.svm_ack.is_none()),
                ConnKind::Datagrams(_) => true,
            }
    }

    /// Whether every TCP direction this connection used has ended (FIN matched, RST sent).
    pub(super) fn closed(&self) -> bool {
        match &self.kind {
            ConnKind::Tcp(dirs) => dirs.iter().all(|d| d.anchor.is_none() || d.closed),
            ConnKind::Datagrams(_) => true,
        }
    }

    /// The oldest thing waiting, and whose.
    pub(super) fn oldest(&self) -> Option<(Instant, Side)> {
        if self.diverged {
            // A checkpoint has been asked for already.
            return None;
        }
        let mut oldest: Option<(Instant, Side)> = None;
        let mut see = |t: Option<Instant>, side| {
            if let Some(t) = t {
                if oldest.is_none_or(|(o, _)| t < o) {
                    oldest = Some((t, side));
                }
            }
        };
        match &self.kind {
            ConnKind::Tcp(dirs) => {
                for d in dirs.iter() {
                    see(d.held.front().map(|h| h.held.since), Side::Primary);
                    see(d.svm.oldest(), Side::Secondary);
                }
            }
            ConnKind::Datagrams(dirs) => {
                for d in dirs {
                    see(d.pvm.front().map(|(h, _)| h.since), Side::Primary);
                    see(d.svm.front().map(|(t, _)| *t), Side::Secondary);
                }
            }
        }
        oldest
    }
}

fn dir_index(d: KeyDir) -> usize {
    match d {
        KeyDir::LoToHi => 0,
        KeyDir::HiToLo => 1,
    }
}
