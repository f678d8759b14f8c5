//! One direction of a TCP connection: both sides' segments placed in sequence space and
//! compared position by position, and the PVM's held segments released once they matched.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::classify::TcpSeg;
use super::ranges::{minus, ByteMap, Intervals};
use super::{Held, Outcome, Side};

/// `a` comes after `b` in sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The later of two sequence numbers.
fn seq_max(a: Option<u32>, b: u32) -> u32 {
    match a {
        Some(a) if seq_after(a, b) => a,
        _ => b,
    }
}

/// One direction of a TCP connection: both sides' uncompared bytes, what was compared, the
/// PVM's held segments.
///
/// Positions are sequence numbers unwrapped to `i64` around `reference` (the furthest position
/// seen), so wrap-around needs no care. Each side keeps only bytes not compared yet; where both
/// have a position it is compared at once and moves to `compared`, so the two sides' pieces
/// never overlap. Nothing is assumed about a connection first seen mid-stream: every byte
/// either side sends is compared, whatever the order; only a checkpoint makes bytes old.
#[derive(Debug, Default)]
pub(super) struct TcpDir {
    pub(super) anchor: Option<u32>,
    /// Position of the furthest segment end seen.
    reference: i64,
    /// Positions below are old: the PVM had sent them by the last checkpoint.
    old_below: Option<i64>,
    /// Positions found equal on both sides since the last checkpoint.
    compared: Intervals,
    pub(super) pvm: Stream,
    pub(super) svm: Stream,
    /// Highest acknowledgment number the SVM sent in this direction.
    pub(super) svm_ack: Option<u32>,
    /// Highest acknowledgment number of a PVM segment seen.
    pvm_ack: Option<u32>,
    pub(super) held: VecDeque<HeldSeg>,
    /// A FIN matched or a RST was released: the direction is over.
    pub(super) closed: bool,
}

#[derive(Debug)]
pub(super) struct HeldSeg {
    pub(super) held: Held,
    /// Positions the segment covers (SYN, data, FIN).
    start: i64,
    end: i64,
    /// Position of its RST, if it carries one.
    rst: Option<i64>,
    ack: Option<u32>,
}

/// One side's uncompared sequence space in one direction: data, SYN/FIN positions, RSTs.
#[derive(Debug, Default)]
pub(super) struct Stream {
    data: ByteMap,
    flags: BTreeMap<i64, (Flag, Instant)>,
    /// RST positions, with how many RSTs were sent there.
    rst: BTreeMap<i64, (usize, Instant)>,
}

impl Stream {
    pub(super) fn depth(&self) -> usize {
        self.data.len() + self.flags.len() + self.rst.len()
    }

    pub(super) fn oldest(&self) -> Option<Instant> {
        let flags = self.flags.values().map(|(_, t)| *t);
        let rst = self.rst.values().map(|(_, t)| *t);
        self.data.oldest().into_iter().chain(flags).chain(rst).min()
    }

    /// What this side has at `pos` that is not a RST, for mismatch messages.
    fn what_at(&self, pos: i64) -> Option<&'static str> {
        match self.flags.get(&pos) {
            Some((f, _)) => Some(f.name()),
            None => self.data.at(pos).map(|_| "data"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flag {
    Syn,
    Fin,
}

impl Flag {
    fn name(self) -> &'static str {
        match self {
            Flag::Syn => "SYN",
            Flag::Fin => "FIN",
        }
    }
}

/// What one segment's arrival compares against: this side's and the other side's streams and
/// the compared set of the direction.
struct Absorb<'a> {
    side: Side,
    mine: &'a mut Stream,
    other: &'a mut Stream,
    compared: &'a mut Intervals,
    old: i64,
    anchor: u32,
    now: Instant,
}

impl Absorb<'_> {
    fn seq(&self, pos: i64) -> u32 {
        self.anchor.wrapping_add(pos as u32)
    }

    fn differ(&self, pos: i64, mine: &str, other: &str) -> String {
        let (p, s) = match self.side {
            Side::Primary => (mine, other),
            Side::Secondary => (other, mine),
        };
        format!(
            "{p} from the primary, {s} from the secondary at sequence {}",
            self.seq(pos)
        )
    }

    /// Whether `pos` is old or compared already.
    fn settled(&self, pos: i64) -> bool {
        pos < self.old || self.compared.covers(pos, pos + 1)
    }

    /// Stores the new part of `payload` (at `start`) and compares it with the other side;
    /// returns the bytes found equal.
    fn data(&mut self, start: i64, payload: &Arc<[u8]>) -> Result<u64, String> {
        let end = start + payload.len() as i64;
        let from = start.max(self.old);
        if from >= end {
            return Ok(0);
        }
        let want = minus(vec![(from, end)], &self.compared.overlapping(from, end));
        let stored = self.mine.data.insert(start, payload, want, self.now);
        let mut equal = Vec::new();
        let verdict = self.compare_stored(&stored, &mut equal);
        // What matched before a difference still counts (its PVM segments may go).
        let mut n = 0;
        for (a, b) in equal {
            self.mine.data.remove_range(a, b);
            self.other.data.remove_range(a, b);
            self.compared.add(a, b);
            n += (b - a) as u64;
        }
        verdict.map(|()| n)
    }

    /// Compares freshly stored ranges with the other side, collecting the equal parts, up to
    /// the first difference.
    fn compare_stored(
        &self,
        stored: &[(i64, i64)],
        equal: &mut Vec<(i64, i64)>,
    ) -> Result<(), String> {
        for &(a, b) in stored {
            if let Some((&p, (f, _))) = self.other.flags.range(a..b).next() {
                return Err(self.differ(p, "data", f.name()));
            }
            if let Some((&p, _)) = self.other.rst.range(a..b).next() {
                return Err(self.differ(p, "data", "RST"));
            }
            for (o1, o2) in self.other.data.overlaps(a, b) {
                let (Some(x), Some(y)) =
                    (self.mine.data.slice(o1, o2), self.other.data.slice(o1, o2))
                else {
                    continue;
                };
                if let Some(i) = x.iter().zip(y).position(|(x, y)| x != y) {
                    let i = i as i64;
                    equal.push((o1, o1 + i));
                    let seq = self.seq(o1 + i);
                    return Err(format!("payload differs at sequence {seq}"));
                }
                equal.push((o1, o2));
            }
        }
        Ok(())
    }

    /// Stores a SYN or FIN at `pos` and compares it with the other side.
    fn flag(&mut self, pos: i64, flag: Flag) -> Result<(), String> {
        if self.settled(pos) || self.mine.flags.contains_key(&pos) {
            return Ok(());
        }
        match self.other.flags.get(&pos) {
            Some((f, _)) if *f == flag => {
                self.other.flags.remove(&pos);
                self.compared.add(pos, pos + 1);
                return Ok(());
            }
            Some((f, _)) => return Err(self.differ(pos, flag.name(), f.name())),
            None => {}
        }
        if self.other.data.at(pos).is_some() {
            return Err(self.differ(pos, flag.name(), "data"));
        }
        if self.other.rst.contains_key(&pos) {
            return Err(self.differ(pos, flag.name(), "RST"));
        }
        self.mine.flags.insert(pos, (flag, self.now));
        Ok(())
    }

    /// Records a RST at `pos`; the other side sending something else there is a mismatch.
    fn rst(&mut self, pos: i64) -> Result<(), String> {
        self.mine.rst.entry(pos).or_insert((0, self.now)).0 += 1;
        if !self.other.rst.contains_key(&pos) {
            if let Some(what) = self.other.what_at(pos) {
                return Err(self.differ(pos, "RST", what));
            }
        }
        Ok(())
    }
}

impl TcpDir {
    /// The position of `seq`, anchoring the direction on the first one seen.
    fn position(&mut self, seq: u32) -> i64 {
        let anchor = *self.anchor.get_or_insert(seq);
        // Truncating the reference to 32 bits gives its sequence number modulo 2^32.
        let ref_seq = anchor.wrapping_add(self.reference as u32);
        self.reference + i64::from(seq.wrapping_sub(ref_seq) as i32)
    }

    /// Positions a segment covers: (start, end, RST position).
    fn place(&mut self, seg: &TcpSeg) -> (i64, i64, Option<i64>) {
        let start = self.position(seg.seq);
        let end = start + i64::from(seg.syn) + seg.payload.len() as i64 + i64::from(seg.fin);
        self.reference = self.reference.max(end);
        (start, end, seg.rst.then_some(end))
    }

    /// Places a segment and keeps the PVM frame carrying it, if any; returns its start.
    fn place_and_hold(&mut self, seg: &TcpSeg, held: Option<Held>) -> i64 {
        let (start, end, rst) = self.place(seg);
        if let Some(held) = held {
            self.held.push_back(HeldSeg {
                held,
                start,
                end,
                rst,
                ack: seg.ack,
            });
        }
        start
    }

    pub(super) fn push(
        &mut self,
        side: Side,
        seg: TcpSeg,
        held: Option<Held>,
        now: Instant,
    ) -> Outcome {
        let mut o = Outcome::default();
        if let Some(a) = seg.ack {
            match side {
                Side::Secondary => self.svm_ack = Some(seq_max(self.svm_ack, a)),
                Side::Primary => self.pvm_ack = Some(seq_max(self.pvm_ack, a)),
            }
        }
        if seg.is_pure_ack() {
            o.released.extend(held);
            // An SVM ACK may let held PVM segments go.
            self.release_ready(&mut o);
            return o;
        }
        let start = self.place_and_hold(&seg, held);
        match self.absorb(side, start, seg, now) {
            Ok(n) => o.compared = n,
            Err(what) => o.mismatch = Some(what),
        }
        // Even after a mismatch: what matched before it may go.
        self.release_ready(&mut o);
        o
    }

    fn absorb(&mut self, side: Side, start: i64, seg: TcpSeg, now: Instant) -> Result<u64, String> {
        let TcpDir {
            pvm,
            svm,
            compared,
            old_below,
            anchor,
            closed,
            ..
        } = self;
        let (mine, other) = match side {
            Side::Primary => (pvm, svm),
            Side::Secondary => (svm, pvm),
        };
        let mut a = Absorb {
            side,
            mine,
            other,
            compared,
            old: old_below.unwrap_or(i64::MIN),
            anchor: anchor.unwrap_or(0),
            now,
        };
        let mut pos = start;
        if seg.syn {
            a.flag(pos, Flag::Syn)?;
            pos += 1;
        }
        let mut n = 0;
        if !seg.payload.is_empty() {
            let len = seg.payload.len() as i64;
            n = a.data(pos, &Arc::from(seg.payload))?;
            pos += len;
        }
        if seg.fin {
            a.flag(pos, Flag::Fin)?;
            if a.compared.covers(pos, pos + 1) {
                *closed = true;
            }
            pos += 1;
        }
        if seg.rst {
            a.rst(pos)?;
        }
        Ok(n)
    }

    /// Holds a PVM segment without comparing (the connection diverged).
    pub(super) fn park(&mut self, seg: TcpSeg, held: Option<Held>) {
        if let Some(a) = seg.ack {
            self.pvm_ack = Some(seq_max(self.pvm_ack, a));
        }
        self.place_and_hold(&seg, held);
    }

    /// After a checkpoint: everything held goes, and what the PVM sent so far becomes old for
    /// both sides (the SVM is its copy now, and has received what the PVM acknowledged).
    pub(super) fn checkpoint(&mut self, held: &mut Vec<Held>, discarded: &mut usize) {
        let mut high = self
            .old_below
            .into_iter()
            .chain(self.compared.max_end())
            .max();
        for h in self.held.drain(..) {
            high = Some(high.map_or(h.end, |x| x.max(h.end)));
            if h.rst.is_some() {
                self.closed = true;
            }
            held.push(h.held);
        }
        *discarded += self.svm.depth();
        self.pvm = Stream::default();
        self.svm = Stream::default();
        self.compared = Intervals::default();
        self.old_below = high;
        if let Some(a) = self.pvm_ack {
            self.svm_ack = Some(seq_max(self.svm_ack, a));
        }
    }

    /// Releases held segments, in the order they came, while the first one may go.
    fn release_ready(&mut self, o: &mut Outcome) {
        let old = self.old_below.unwrap_or(i64::MIN);
        while let Some(h) = self.held.front() {
            let from = h.start.max(old);
            let data_ok = from >= h.end || self.compared.covers(from, h.end);
            let rst_ok = h.rst.is_none_or(|r| self.svm.rst.contains_key(&r));
            let ack_ok = h
                .ack
                .is_none_or(|a| self.svm_ack.is_some_and(|s| !seq_after(a, s)));
            if !(data_ok && rst_ok && ack_ok) {
                break;
            }
            if let Some(r) = h.rst {
                // One SVM RST answers one PVM RST.
                for stream in [&mut self.svm, &mut self.pvm] {
                    if let Some(e) = stream.rst.get_mut(&r) {
                        e.0 -= 1;
                        if e.0 == 0 {
                            stream.rst.remove(&r);
                        }
                    }
                }
                self.closed = true;
            }
            if let Some(h) = self.held.pop_front() {
                o.released.push(h.held);
            }
        }
    }

    pub(super) fn depth(&self) -> usize {
        let held: usize = self.held.iter().map(|h| h.held.frames.len()).sum();
        held + self.svm.depth()
    }
}
