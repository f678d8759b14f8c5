//! The compare: decides when the primary's output packets may leave, and when the two VMs
//! have diverged.
//!
//! Every frame the PVM sends is **held** here; every frame the SVM sends (its sequence numbers
//! already moved into the PVM's space by the secondary's rewriter) is only material to compare
//! against. A PVM frame is **released** (handed back as [`Action::Release`], for the tap) once
//! the SVM produced the same output; when they differ, or a frame waits longer than the
//! timeout, or a queue is full, the compare asks for a checkpoint ([`Action::Checkpoint`]),
//! once until [`ColoCompare::checkpoint_done`] says it happened. A checkpoint makes the SVM a
//! copy of the PVM, so everything still held is released and the SVM's leftovers are dropped.
//!
//! Rules, per connection ([`ConnKey`]: both directions one connection, each direction compared
//! on its own):
//!
//! - **TCP** by sequence space, not by segment. Each side's segments are placed by sequence
//!   number (SYN and FIN occupy one position each, as in TCP itself) and every position both
//!   sides have sent is compared as soon as both have it, so different segmentation,
//!   reordering, duplicates and overlapping retransmissions all come out the same. Positions
//!   compared (or, after a checkpoint, already sent by the PVM) are not compared again: a
//!   retransmission of them is released at once. Nothing else counts as old — on a connection
//!   first seen mid-stream every byte either side sends is compared.
//!   A PVM segment is released once every position it covers matched, a RST it carries was
//!   sent by the SVM at the same position, and its acknowledgment number does not run ahead of
//!   the highest the SVM sent in that direction — so the client is never told data arrived
//!   that the SVM has not received. Pure ACKs (no data, SYN, FIN or RST) go out at once.
//!   Held segments of a direction leave in the order they came. Headers are not compared: IP
//!   id, TTL, checksums, window, options (timestamps) may differ.
//! - **UDP, ICMP, ICMPv6, other IP protocols** by payload (ICMP: type, code and body), the
//!   datagrams of a direction in order: the n-th from the PVM against the n-th from the SVM.
//! - **Non-IP frames** (ARP, …) and frames that do not parse: by the whole Ethernet frame.
//! - **IPv6 and VLAN-tagged** frames follow the same rules (the VLAN ids are part of the key).
//! - **IP fragments** are reassembled on each side first (IP ids may differ between the VMs,
//!   so each side's fragments are put together on their own) and the datagram is compared by
//!   the rules above; the PVM's fragments are held until it matched and then released as they
//!   came.
//!
//! After a checkpoint only where each TCP direction stands in sequence space is kept (and
//! forgotten once the connection closed or stayed silent for [`IDLE_FORGET`]); all queues
//! start empty.
//!
//! Memory: payloads are copied once into the compare (both sides), PVM frames are held whole;
//! [`CompareConfig`] bounds the packets queued per connection and in all, and the connections.
//!
//! Everything runs on the caller's clock (`now` arguments), so it is deterministic in tests.
//! Call [`ColoCompare::tick`] every [`DEFAULT_SCAN_PERIOD`] or so to catch timeouts.

#[cfg(test)]
mod captured_tests;
mod classify;
mod conn;
mod datagram;
mod fragments;
mod ranges;
mod tcp;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::packet::{self, ConnKey, Fragment, KeyProto};
use classify::{classify, opaque_unit, reassembled_unit, Body, Classified, Unit};
use conn::Conn;
use fragments::{FragKey, Reassembly};

/// How long a packet may wait for its counterpart before a checkpoint is asked for (QEMU's).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);
/// How often the caller should call [`ColoCompare::tick`] (QEMU's scan period).
pub const DEFAULT_SCAN_PERIOD: Duration = Duration::from_millis(1000);
/// Bytes of the virtio-net header in front of each frame by default (`Packet`'s wire form).
pub const DEFAULT_VNET_HDR_LEN: usize = 12;
/// A TCP connection with nothing queued is forgotten after this long without a frame (or at
/// the next tick once it closed); the state is a few words, but connections come and go.
pub const IDLE_FORGET: Duration = Duration::from_secs(60);

/// Settings of a [`ColoCompare`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompareConfig {
    /// Longest a packet may wait to be matched before a checkpoint is asked for.
    pub timeout: Duration,
    /// Most packets queued for one connection (PVM frames held plus SVM pieces waiting).
    pub max_per_conn: usize,
    /// Most packets queued in all (PVM frames can be 64 KiB with TSO: this bounds memory).
    pub max_total: usize,
    /// Most connections tracked between two checkpoints.
    pub max_conns: usize,
    /// Bytes in front of the Ethernet frame in every frame handed in (the vnet header); they
    /// are neither parsed nor compared, and released frames keep them.
    pub vnet_hdr_len: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            timeout: DEFAULT_TIMEOUT,
            // QEMU's per-list limit.
            max_per_conn: 1024,
            max_total: 8192,
            // QEMU's connection table limit.
            max_conns: 16384,
            vnet_hdr_len: DEFAULT_VNET_HDR_LEN,
        }
    }
}

/// Why the compare asks for a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MismatchReason {
    /// The two VMs sent different output (which connection and what differed).
    Mismatch(String),
    /// A packet waited longer than the timeout for its counterpart.
    Timeout(String),
    /// A queue limit was reached; the packet was dropped.
    Overflow(String),
}

impl fmt::Display for MismatchReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MismatchReason::Mismatch(s) => write!(f, "mismatch: {s}"),
            MismatchReason::Timeout(s) => write!(f, "timeout: {s}"),
            MismatchReason::Overflow(s) => write!(f, "queue full: {s}"),
        }
    }
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this PVM frame (as it was handed in, vnet header included) to the tap.
    Release(Vec<u8>),
    /// Take a checkpoint, then call [`ColoCompare::checkpoint_done`].
    Checkpoint(MismatchReason),
}

/// Counters of a [`ColoCompare`], for the status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompareCounters {
    /// Frames handed in from the primary.
    pub primary_packets: u64,
    /// Frames handed in from the secondary.
    pub secondary_packets: u64,
    /// Bytes found equal (TCP sequence space, datagram payloads, whole frames).
    pub compared_bytes: u64,
    /// PVM frames released, by a match or by a checkpoint/failover.
    pub released: u64,
    /// Of those, the ones released unmatched by a checkpoint or failover.
    pub flushed: u64,
    /// Connections found diverged.
    pub mismatches: u64,
    /// Timeouts that asked for a checkpoint.
    pub timeouts: u64,
    /// Frames refused because a queue or the connection table was full.
    pub overflows: u64,
    /// PVM frames dropped on overflow.
    pub dropped_primary: u64,
    /// SVM frames dropped on overflow.
    pub dropped_secondary: u64,
    /// SVM pieces still waiting when a checkpoint or failover discarded them.
    pub discarded_secondary: u64,
    /// Frames that did not parse (compared as whole frames).
    pub unparsed: u64,
    /// Checkpoints asked for.
    pub checkpoint_requests: u64,
    /// Packets queued now.
    pub queue_depth: usize,
    /// Most packets queued at once.
    pub queue_depth_max: usize,
    /// Connections tracked now.
    pub connections: usize,
}

/// The compare engine (see the module documentation).
#[derive(Debug)]
pub struct ColoCompare {
    cfg: CompareConfig,
    conns: HashMap<ConnKey, Conn>,
    frags: [Reassembly; 2],
    /// A checkpoint was asked for and has not happened yet: ask no more.
    pending: bool,
    failed_over: bool,
    /// Arrival number of the next PVM frame: a flush releases in arrival order.
    next_order: u64,
    /// Packets queued in `conns` and `frags`.
    depth: usize,
    /// The latest `now` seen (for forgetting idle connections at a checkpoint).
    clock: Option<Instant>,
    counters: CompareCounters,
}

impl ColoCompare {
    /// A compare with nothing queued.
    pub fn new(cfg: CompareConfig) -> Self {
        ColoCompare {
            cfg,
            conns: HashMap::new(),
            frags: [Reassembly::default(), Reassembly::default()],
            pending: false,
            failed_over: false,
            next_order: 0,
            depth: 0,
            clock: None,
            counters: CompareCounters::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &CompareConfig {
        &self.cfg
    }

    /// The counters.
    pub fn counters(&self) -> CompareCounters {
        self.counters
    }

    /// Whether a checkpoint was asked for and [`checkpoint_done`](Self::checkpoint_done) has
    /// not been called since.
    pub fn checkpoint_pending(&self) -> bool {
        self.pending
    }

    /// Whether [`failover`](Self::failover) was called: frames now pass straight through.
    pub fn is_failed_over(&self) -> bool {
        self.failed_over
    }

    /// A frame the PVM sent: held until matched (pure TCP ACKs go out at once).
    pub fn primary(&mut self, now: Instant, frame: Vec<u8>) -> Vec<Action> {
        self.counters.primary_packets += 1;
        self.see(now);
        let mut out = Vec::new();
        if self.failed_over {
            self.counters.released += 1;
            out.push(Action::Release(frame));
            return out;
        }
        self.input(Side::Primary, now, frame, &mut out);
        out
    }

    /// A frame the SVM sent: compared, never released itself.
    pub fn secondary(&mut self, now: Instant, frame: Vec<u8>) -> Vec<Action> {
        self.counters.secondary_packets += 1;
        self.see(now);
        let mut out = Vec::new();
        if !self.failed_over {
            self.input(Side::Secondary, now, frame, &mut out);
        }
        out
    }

    /// Looks for packets older than the timeout (asking for a checkpoint if one is found) and
    /// forgets idle connections.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        self.see(now);
        let mut out = Vec::new();
        if self.failed_over {
            return out;
        }
        self.forget_idle(now);
        self.update_gauges();
        if self.pending {
            return out;
        }
        let timeout = self.cfg.timeout;
        let late = |t: Instant| now.saturating_duration_since(t) >= timeout;
        let mut found = None;
        for (key, conn) in &self.conns {
            if let Some((t, side)) = conn.oldest() {
                if late(t) {
                    let waited = now.saturating_duration_since(t);
                    found = Some(format!("{key}: a {side} packet waited {waited:?}"));
                    break;
                }
            }
        }
        if found.is_none() {
            for (side, r) in [Side::Primary, Side::Secondary]
                .into_iter()
                .zip(&self.frags)
            {
                if let Some(t) = r.oldest().filter(|&t| late(t)) {
                    let waited = now.saturating_duration_since(t);
                    found = Some(format!("a {side} fragmented datagram waited {waited:?}"));
                    break;
                }
            }
        }
        if let Some(what) = found {
            self.counters.timeouts += 1;
            self.request(MismatchReason::Timeout(what), &mut out);
        }
        out
    }

    /// The checkpoint happened: every held PVM frame is released (in the order it came), the
    /// SVM's leftovers are dropped, and comparing starts afresh.
    ///
    /// Only where each TCP direction stands in sequence space is kept: the SVM is now a copy of
    /// the PVM, so data the PVM sent before is old for both, and a retransmission of it is
    /// released at once instead of waiting for a counterpart the SVM may never send.
    pub fn checkpoint_done(&mut self) -> Vec<Action> {
        let mut held = Vec::new();
        let mut discarded = 0;
        for conn in self.conns.values_mut() {
            conn.checkpoint(&mut held, &mut discarded);
        }
        if let Some(now) = self.clock {
            self.forget_idle(now);
        }
        self.flush(held, discarded)
    }

    /// The secondary is gone: release everything held and stop comparing; from now on PVM
    /// frames are released as they come and SVM frames ignored.
    pub fn failover(&mut self) -> Vec<Action> {
        self.failed_over = true;
        let mut held = Vec::new();
        let mut discarded = 0;
        for (_, conn) in self.conns.drain() {
            conn.drain_into(&mut held, &mut discarded);
        }
        self.flush(held, discarded)
    }

    fn see(&mut self, now: Instant) {
        if self.clock.is_none_or(|c| now > c) {
            self.clock = Some(now);
        }
    }

    /// Drops the state of TCP connections with nothing queued that closed or fell silent.
    fn forget_idle(&mut self, now: Instant) {
        self.conns.retain(|_, c| {
            c.depth() > 0
                || !(c.closed() || now.saturating_duration_since(c.last_seen) >= IDLE_FORGET)
        });
    }

    /// Releases `held` in arrival order, drops the fragments being reassembled (the PVM's are
    /// released too) and counts what the SVM had waiting.
    fn flush(&mut self, mut held: Vec<Held>, mut discarded: usize) -> Vec<Action> {
        let [p, s] = &mut self.frags;
        for partial in std::mem::take(&mut p.partials).into_values() {
            held.extend(partial.held);
        }
        discarded += s.count;
        self.frags = [Reassembly::default(), Reassembly::default()];
        held.sort_by_key(|h| h.order);
        let mut out = Vec::new();
        for h in held {
            self.counters.flushed += h.frames.len() as u64;
            self.release(h, &mut out);
        }
        self.counters.discarded_secondary += discarded as u64;
        self.pending = false;
        self.depth = self.conns.values().map(Conn::depth).sum();
        self.update_gauges();
        out
    }

    fn input(&mut self, side: Side, now: Instant, frame: Vec<u8>, out: &mut Vec<Action>) {
        let order = self.next_order;
        if side == Side::Primary {
            self.next_order += 1;
        }
        let classified = {
            let eth = frame.get(self.cfg.vnet_hdr_len..).unwrap_or(&[]);
            match packet::parse(eth) {
                Ok(f) => classify(&f),
                Err(_) => {
                    self.counters.unparsed += 1;
                    Classified::Unit(opaque_unit(eth))
                }
            }
        };
        let held = (side == Side::Primary).then(|| Held {
            order,
            since: now,
            frames: vec![frame],
        });
        match classified {
            Classified::Unit(unit) => self.on_unit(side, now, unit, held, out),
            Classified::Fragment { key, frag, data } => {
                self.on_fragment(side, now, key, frag, &data, held, out)
            }
        }
        self.update_gauges();
    }

    #[allow(clippy::too_many_arguments)]
    fn on_fragment(
        &mut self,
        side: Side,
        now: Instant,
        key: FragKey,
        frag: Fragment,
        data: &[u8],
        held: Option<Held>,
        out: &mut Vec<Action>,
    ) {
        if self.depth + 1 > self.cfg.max_total {
            let what = format!(
                "more than {} packets queued (fragments)",
                self.cfg.max_total
            );
            self.overflow(side, held, what, out);
            return;
        }
        let r = &mut self.frags[side.index()];
        let before = r.count;
        let done = r.add(key, frag, data, held, now);
        // Saturating: a miscount must not take the proxy down.
        self.depth = (self.depth + r.count).saturating_sub(before);
        if let Some(done) = done {
            let unit = reassembled_unit(&key, &done.payload);
            self.on_unit(side, now, unit, done.held, out);
        }
    }

    fn on_unit(
        &mut self,
        side: Side,
        now: Instant,
        unit: Unit,
        held: Option<Held>,
        out: &mut Vec<Action>,
    ) {
        let Unit { key, dir, body } = unit;
        let pure_ack = matches!(&body, Body::Tcp(s) if s.is_pure_ack());
        if !self.conns.contains_key(&key) {
            // A pure ACK needs no state on the primary's side: nothing to wait for.
            if pure_ack && side == Side::Primary {
                if let Some(h) = held {
                    self.release(h, out);
                }
                return;
            }
            if self.conns.len() >= self.cfg.max_conns {
                let what = format!("{key}: more than {} connections", self.cfg.max_conns);
                self.overflow(side, held, what, out);
                return;
            }
            self.conns
                .insert(key, Conn::new(key.proto == KeyProto::Tcp, now));
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.last_seen = now;
        let adding = held.as_ref().map_or(1, |h| h.frames.len());
        let queued = conn.diverged || !pure_ack;
        let before = conn.depth();
        let over_conn = before + adding > self.cfg.max_per_conn;
        let over_total = self.depth + adding > self.cfg.max_total;
        if queued && (over_conn || over_total) {
            let what = if over_conn {
                format!("{key}: more than {} packets queued", self.cfg.max_per_conn)
            } else {
                format!("more than {} packets queued", self.cfg.max_total)
            };
            if before == 0 && conn.is_stateless() {
                self.conns.remove(&key);
            }
            self.overflow(side, held, what, out);
            return;
        }
        let mut outcome = conn.push(side, dir, body, held, now);
        let mut discarded = 0;
        if outcome.mismatch.is_some() {
            discarded = conn.diverge();
        }
        let after = conn.depth();
        // Datagram connections keep no state worth a table entry; TCP ones are forgotten by
        // `forget_idle`.
        let removable = after == 0 && conn.is_stateless();
        self.depth = (self.depth + after).saturating_sub(before);
        if removable {
            self.conns.remove(&key);
        }
        self.counters.discarded_secondary += discarded as u64;
        self.counters.compared_bytes += outcome.compared;
        for h in std::mem::take(&mut outcome.released) {
            self.release(h, out);
        }
        if let Some(what) = outcome.mismatch {
            self.counters.mismatches += 1;
            self.request(MismatchReason::Mismatch(format!("{key}: {what}")), out);
        }
    }

    fn overflow(&mut self, side: Side, held: Option<Held>, what: String, out: &mut Vec<Action>) {
        self.counters.overflows += 1;
        match held {
            Some(h) => self.counters.dropped_primary += h.frames.len() as u64,
            None if side == Side::Secondary => self.counters.dropped_secondary += 1,
            None => {}
        }
        self.request(MismatchReason::Overflow(what), out);
    }

    fn request(&mut self, reason: MismatchReason, out: &mut Vec<Action>) {
        if !self.pending {
            self.pending = true;
            self.counters.checkpoint_requests += 1;
            out.push(Action::Checkpoint(reason));
        }
    }

    fn release(&mut self, held: Held, out: &mut Vec<Action>) {
        for f in held.frames {
            self.counters.released += 1;
            out.push(Action::Release(f));
        }
    }

    fn update_gauges(&mut self) {
        self.counters.queue_depth = self.depth;
        self.counters.queue_depth_max = self.counters.queue_depth_max.max(self.depth);
        self.counters.connections = self.conns.len();
    }
}

/// Which VM a frame came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Primary,
    Secondary,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::Primary => 0,
            Side::Secondary => 1,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Primary => "primary",
            Side::Secondary => "secondary",
        })
    }
}

/// PVM frames held as one unit (one frame, or the fragments of one datagram).
#[derive(Debug)]
struct Held {
    order: u64,
    since: Instant,
    frames: Vec<Vec<u8>>,
}

/// What pushing a unit into one direction of a connection produced.
#[derive(Debug, Default)]
struct Outcome {
    released: Vec<Held>,
    compared: u64,
    mismatch: Option<String>,
}
