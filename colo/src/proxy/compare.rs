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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::packet::{
    self, Addr, ConnKey, Fragment, KeyDir, KeyProto, Net, Transport, MAX_DATAGRAM, MAX_VLAN_TAGS,
};

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

fn dir_index(d: KeyDir) -> usize {
    match d {
        KeyDir::LoToHi => 0,
        KeyDir::HiToLo => 1,
    }
}

/// PVM frames held as one unit (one frame, or the fragments of one datagram).
#[derive(Debug)]
struct Held {
    order: u64,
    since: Instant,
    frames: Vec<Vec<u8>>,
}

/// What one frame (or reassembled datagram) means to the compare.
#[derive(Debug)]
struct Unit {
    key: ConnKey,
    dir: KeyDir,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Tcp(TcpSeg),
    /// The bytes compared for a datagram or a whole frame.
    Bytes(Vec<u8>),
}

#[derive(Debug)]
struct TcpSeg {
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    payload: Vec<u8>,
}

impl TcpSeg {
    fn is_pure_ack(&self) -> bool {
        self.payload.is_empty() && !self.syn && !self.fin && !self.rst
    }
}

enum Classified {
    Unit(Unit),
    Fragment {
        key: FragKey,
        frag: Fragment,
        data: Vec<u8>,
    },
}

fn classify(f: &packet::Frame<'_>) -> Classified {
    match &f.net {
        Net::Other(_) => {
            let (key, dir) = f.conn_key();
            Classified::Unit(Unit {
                key,
                dir,
                body: Body::Bytes(f.bytes.to_vec()),
            })
        }
        Net::Ip(ip) => match ip.fragment {
            Some(frag) => Classified::Fragment {
                key: FragKey {
                    vlan: f.vlans.ids(),
                    src: ip.header.src(),
                    dst: ip.header.dst(),
                    protocol: ip.protocol,
                    id: frag.id,
                },
                frag,
                data: ip.upper.to_vec(),
            },
            None => Classified::Unit(transport_unit(
                f.vlans.ids(),
                ip.header.src(),
                ip.header.dst(),
                ip.protocol,
                &ip.transport,
            )),
        },
    }
}

fn transport_unit(
    vlan: [u16; MAX_VLAN_TAGS],
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    t: &Transport<'_>,
) -> Unit {
    let (key, dir) = packet::transport_key(vlan, src, dst, protocol, t);
    let body = match t {
        Transport::Tcp(t) => Body::Tcp(TcpSeg {
            seq: t.seq(),
            ack: t.has_ack().then(|| t.ack()),
            syn: t.syn(),
            fin: t.fin(),
            rst: t.rst(),
            payload: t.payload().to_vec(),
        }),
        Transport::Udp(u) => Body::Bytes(u.payload().to_vec()),
        Transport::Icmp(i) => {
            // The checksum (bytes 2-3) is left out: headers are not compared.
            let mut b = Vec::with_capacity(i.bytes().len() - 2);
            b.extend_from_slice(&[i.icmp_type(), i.code()]);
            b.extend_from_slice(i.body());
            Body::Bytes(b)
        }
        Transport::Fragment(b) | Transport::Other(b) => Body::Bytes(b.to_vec()),
    };
    Unit { key, dir, body }
}

/// A frame that does not parse: compared whole, keyed by its ethertype and MACs if it has them.
fn opaque_unit(eth: &[u8]) -> Unit {
    let mac = |at: usize| {
        let mut m = [0; 6];
        if let Some(s) = eth.get(at..at + 6) {
            m.copy_from_slice(s);
        }
        Addr::Mac(m)
    };
    let ethertype = eth
        .get(12..14)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let (key, dir) = ConnKey::new(
        [0; MAX_VLAN_TAGS],
        KeyProto::Ether(ethertype),
        (mac(6), 0),
        (mac(0), 0),
    );
    Unit {
        key,
        dir,
        body: Body::Bytes(eth.to_vec()),
    }
}

/// The unit of a reassembled datagram; one whose transport does not parse is compared as
/// raw bytes of its protocol, never passed unchecked.
fn reassembled_unit(key: &FragKey, payload: &[u8]) -> Unit {
    let v6 = key.src.is_ipv6();
    let upper = if v6 {
        packet::ipv6_upper_layer(key.protocol, payload)
            .and_then(|(proto, at)| {
                let rest = payload.get(at..).unwrap_or(&[]);
                packet::parse_transport(proto, rest, at, true).map(|t| (proto, t))
            })
            .ok()
    } else {
        packet::parse_transport(key.protocol, payload, 0, false)
            .ok()
            .map(|t| (key.protocol, t))
    };
    let (protocol, transport) = upper.unwrap_or((key.protocol, Transport::Other(payload)));
    transport_unit(key.vlan, key.src, key.dst, protocol, &transport)
}

/// One connection's queues and state.
#[derive(Debug)]
struct Conn {
    /// The VMs were found to differ here: hold the PVM's frames until the checkpoint.
    diverged: bool,
    /// Datagram frames held while diverged (TCP ones stay in their direction's queue).
    parked: Vec<Held>,
    /// When a frame of this connection last came, from either side.
    last_seen: Instant,
    kind: ConnKind,
}

#[derive(Debug)]
enum ConnKind {
    Tcp(Box<[TcpDir; 2]>),
    Datagrams([DgDir; 2]),
}

#[derive(Debug, Default)]
struct Outcome {
    released: Vec<Held>,
    compared: u64,
    mismatch: Option<String>,
}

impl Conn {
    fn new(tcp: bool, now: Instant) -> Self {
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

    fn push(
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
    fn diverge(&mut self) -> usize {
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
    fn checkpoint(&mut self, held: &mut Vec<Held>, discarded: &mut usize) {
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
    fn drain_into(mut self, held: &mut Vec<Held>, discarded: &mut usize) {
        self.checkpoint(held, discarded);
    }

    /// Packets queued: PVM frames held plus SVM pieces waiting.
    fn depth(&self) -> usize {
        let parked: usize = self.parked.iter().map(|h| h.frames.len()).sum();
        parked
            + match &self.kind {
                ConnKind::Tcp(dirs) => dirs.iter().map(TcpDir::depth).sum::<usize>(),
                ConnKind::Datagrams(dirs) => dirs.iter().map(DgDir::depth).sum::<usize>(),
            }
    }

    /// Whether the connection holds no state beyond its queues (datagrams, or TCP that has not
    /// seen a segment yet).
    fn is_stateless(&self) -> bool {
        !self.diverged
            && match &self.kind {
                ConnKind::Tcp(dirs) => dirs
                    .iter()
                    .all(|d| d.anchor.is_none() && d.svm_ack.is_none()),
                ConnKind::Datagrams(_) => true,
            }
    }

    /// Whether every TCP direction this connection used has ended (FIN matched, RST sent).
    fn closed(&self) -> bool {
        match &self.kind {
            ConnKind::Tcp(dirs) => dirs.iter().all(|d| d.anchor.is_none() || d.closed),
            ConnKind::Datagrams(_) => true,
        }
    }

    /// The oldest thing waiting, and whose.
    fn oldest(&self) -> Option<(Instant, Side)> {
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
struct TcpDir {
    anchor: Option<u32>,
    /// Position of the furthest segment end seen.
    reference: i64,
    /// Positions below are old: the PVM had sent them by the last checkpoint.
    old_below: Option<i64>,
    /// Positions found equal on both sides since the last checkpoint.
    compared: Intervals,
    pvm: Stream,
    svm: Stream,
    /// Highest acknowledgment number the SVM sent in this direction.
    svm_ack: Option<u32>,
    /// Highest acknowledgment number of a PVM segment seen.
    pvm_ack: Option<u32>,
    held: VecDeque<HeldSeg>,
    /// A FIN matched or a RST was released: the direction is over.
    closed: bool,
}

#[derive(Debug)]
struct HeldSeg {
    held: Held,
    /// Positions the segment covers (SYN, data, FIN).
    start: i64,
    end: i64,
    /// Position of its RST, if it carries one.
    rst: Option<i64>,
    ack: Option<u32>,
}

/// One side's uncompared sequence space in one direction: data, SYN/FIN positions, RSTs.
#[derive(Debug, Default)]
struct Stream {
    data: ByteMap,
    flags: BTreeMap<i64, (Flag, Instant)>,
    /// RST positions, with how many RSTs were sent there.
    rst: BTreeMap<i64, (usize, Instant)>,
}

impl Stream {
    fn depth(&self) -> usize {
        self.data.len() + self.flags.len() + self.rst.len()
    }

    fn oldest(&self) -> Option<Instant> {
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

    fn push(&mut self, side: Side, seg: TcpSeg, held: Option<Held>, now: Instant) -> Outcome {
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
        let (start, end, rst) = self.place(&seg);
        if let Some(held) = held {
            self.held.push_back(HeldSeg {
                held,
                start,
                end,
                rst,
                ack: seg.ack,
            });
        }
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
    fn park(&mut self, seg: TcpSeg, held: Option<Held>) {
        if let Some(a) = seg.ack {
            self.pvm_ack = Some(seq_max(self.pvm_ack, a));
        }
        let (start, end, rst) = self.place(&seg);
        if let Some(held) = held {
            self.held.push_back(HeldSeg {
                held,
                start,
                end,
                rst,
                ack: seg.ack,
            });
        }
    }

    /// After a checkpoint: everything held goes, and what the PVM sent so far becomes old for
    /// both sides (the SVM is its copy now, and has received what the PVM acknowledged).
    fn checkpoint(&mut self, held: &mut Vec<Held>, discarded: &mut usize) {
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

    fn depth(&self) -> usize {
        let held: usize = self.held.iter().map(|h| h.held.frames.len()).sum();
        held + self.svm.depth()
    }
}

/// `ranges` without `holes` (both half-open).
fn minus(mut ranges: Vec<(i64, i64)>, holes: &[(i64, i64)]) -> Vec<(i64, i64)> {
    for &(h1, h2) in holes {
        let mut next = Vec::with_capacity(ranges.len() + 1);
        for (a, b) in ranges {
            if h2 <= a || h1 >= b {
                next.push((a, b));
            } else {
                if a < h1 {
                    next.push((a, h1));
                }
                if h2 < b {
                    next.push((h2, b));
                }
            }
        }
        ranges = next;
    }
    ranges
}

/// Disjoint, merged half-open ranges.
#[derive(Debug, Default)]
struct Intervals {
    map: BTreeMap<i64, i64>,
}

impl Intervals {
    fn add(&mut self, mut a: i64, mut b: i64) {
        if a >= b {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..=a).next_back() {
            if e >= a {
                a = s;
                b = b.max(e);
                self.map.remove(&s);
            }
        }
        let after: Vec<(i64, i64)> = self.map.range(a..=b).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in after {
            b = b.max(e);
            self.map.remove(&s);
        }
        self.map.insert(a, b);
    }

    fn covers(&self, a: i64, b: i64) -> bool {
        a >= b
            || self
                .map
                .range(..=a)
                .next_back()
                .is_some_and(|(_, &e)| e >= b)
    }

    fn overlapping(&self, a: i64, b: i64) -> Vec<(i64, i64)> {
        if a >= b {
            return Vec::new();
        }
        let first = self.map.range(..a).next_back().filter(|(_, &e)| e > a);
        first
            .into_iter()
            .chain(self.map.range(a..b))
            .map(|(&s, &e)| (s, e))
            .collect()
    }

    fn max_end(&self) -> Option<i64> {
        self.map.last_key_value().map(|(_, &e)| e)
    }
}

/// One direction of a datagram connection: the two sides' datagrams, in order.
#[derive(Debug, Default)]
struct DgDir {
    pvm: VecDeque<(Held, Vec<u8>)>,
    svm: VecDeque<(Instant, Vec<u8>)>,
}

impl DgDir {
    fn push(&mut self, side: Side, bytes: Vec<u8>, held: Option<Held>, now: Instant) -> Outcome {
        match (side, held) {
            (Side::Primary, Some(h)) => self.pvm.push_back((h, bytes)),
            _ => self.svm.push_back((now, bytes)),
        }
        let mut o = Outcome::default();
        while let (Some((_, p)), Some((_, s))) = (self.pvm.front(), self.svm.front()) {
            if p != s {
                let at = p.iter().zip(s).position(|(a, b)| a != b);
                o.mismatch = Some(match at {
                    Some(i) => format!("datagram payloads differ at byte {i}"),
                    None => format!("datagram lengths differ ({} vs {} bytes)", p.len(), s.len()),
                });
                break;
            }
            o.compared += p.len() as u64;
            self.svm.pop_front();
            if let Some((h, _)) = self.pvm.pop_front() {
                o.released.push(h);
            }
        }
        o
    }

    fn depth(&self) -> usize {
        let held: usize = self.pvm.iter().map(|(h, _)| h.frames.len()).sum();
        held + self.svm.len()
    }
}

/// Non-overlapping byte ranges keyed by their first position; what is stored first wins.
/// Pieces are views into shared buffers, so cutting one is cheap.
#[derive(Debug, Default)]
struct ByteMap {
    map: BTreeMap<i64, Piece>,
}

#[derive(Clone, Debug)]
struct Piece {
    buf: Arc<[u8]>,
    off: usize,
    len: usize,
    since: Instant,
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        self.buf.get(self.off..self.off + self.len).unwrap_or(&[])
    }

    fn end(&self, start: i64) -> i64 {
        start + self.len as i64
    }

    /// The part of this piece (stored at `start`) that covers `a..b`, which must lie inside it.
    fn cut(&self, start: i64, a: i64, b: i64) -> Piece {
        let skip = usize::try_from(a - start).unwrap_or(0);
        Piece {
            buf: self.buf.clone(),
            off: self.off + skip,
            len: usize::try_from(b - a).unwrap_or(0),
            since: self.since,
        }
    }
}

impl ByteMap {
    /// Stores the parts of `buf` (which starts at `start`) that lie in `want` and are not
    /// stored yet; returns the ranges stored.
    fn insert(
        &mut self,
        start: i64,
        buf: &Arc<[u8]>,
        want: Vec<(i64, i64)>,
        now: Instant,
    ) -> Vec<(i64, i64)> {
        let end = start + buf.len() as i64;
        let want: Vec<(i64, i64)> = want
            .into_iter()
            .map(|(a, b)| (a.max(start), b.min(end)))
            .filter(|(a, b)| a < b)
            .collect();
        let mut stored = Vec::new();
        for (a, b) in want {
            let have = self.overlaps(a, b);
            for (g1, g2) in minus(vec![(a, b)], &have) {
                let whole = Piece {
                    buf: buf.clone(),
                    off: 0,
                    len: buf.len(),
                    since: now,
                };
                self.map.insert(g1, whole.cut(start, g1, g2));
                stored.push((g1, g2));
            }
        }
        stored
    }

    /// The stored bytes from `pos` to the end of the piece holding it.
    fn at(&self, pos: i64) -> Option<&[u8]> {
        let (&k, p) = self.map.range(..=pos).next_back()?;
        let off = usize::try_from(pos - k).ok()?;
        p.bytes().get(off..).filter(|s| !s.is_empty())
    }

    /// The bytes of `a..b` if one piece holds them all.
    fn slice(&self, a: i64, b: i64) -> Option<&[u8]> {
        let len = usize::try_from(b - a).ok()?;
        self.at(a).and_then(|s| s.get(..len))
    }

    /// The stored parts of `a..b`, clipped to it (each inside one piece).
    fn overlaps(&self, a: i64, b: i64) -> Vec<(i64, i64)> {
        if a >= b {
            return Vec::new();
        }
        let first = self
            .map
            .range(..a)
            .next_back()
            .filter(|(&k, p)| p.end(k) > a);
        first
            .into_iter()
            .chain(self.map.range(a..b))
            .map(|(&k, p)| (k.max(a), p.end(k).min(b)))
            .collect()
    }

    /// Forgets `a..b`, cutting the pieces that stick out of it.
    fn remove_range(&mut self, a: i64, b: i64) {
        if a >= b {
            return;
        }
        let keys: Vec<i64> = self
            .map
            .range(..b)
            .rev()
            .take_while(|(&k, p)| p.end(k) > a)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            let Some(p) = self.map.remove(&k) else {
                continue;
            };
            let end = p.end(k);
            if k < a {
                self.map.insert(k, p.cut(k, k, a));
            }
            if end > b {
                self.map.insert(b, p.cut(k, b, end));
            }
        }
    }

    /// Whether `from..to` is stored without a gap.
    fn covers(&self, from: i64, to: i64) -> bool {
        let mut at = from;
        while at < to {
            match self.at(at) {
                Some(s) => at += s.len() as i64,
                None => return false,
            }
        }
        true
    }

    /// The bytes of `from..to` (gaps, if any, as zeros).
    fn gather(&self, from: i64, to: i64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let want = usize::try_from(to - at).unwrap_or(0);
            match self.at(at) {
                Some(s) => {
                    let s = &s[..s.len().min(want)];
                    out.extend_from_slice(s);
                    at += s.len() as i64;
                }
                None => {
                    out.push(0);
                    at += 1;
                }
            }
        }
        out
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn oldest(&self) -> Option<Instant> {
        self.map.values().map(|p| p.since).min()
    }
}

/// What identifies the fragments of one datagram (on one side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FragKey {
    vlan: [u16; MAX_VLAN_TAGS],
    src: IpAddr,
    dst: IpAddr,
    /// IPv4's protocol or the IPv6 Fragment header's next header.
    protocol: u8,
    id: u32,
}

/// One side's datagrams being reassembled.
#[derive(Debug, Default)]
struct Reassembly {
    partials: HashMap<FragKey, Partial>,
    /// Fragments held in all partials.
    count: usize,
}

#[derive(Debug)]
struct Partial {
    data: ByteMap,
    /// Length of the datagram's payload, once its last fragment came.
    total: Option<usize>,
    /// The PVM's fragment frames (none on the secondary's side).
    held: Option<Held>,
    count: usize,
    since: Instant,
}

struct Reassembled {
    payload: Vec<u8>,
    held: Option<Held>,
}

impl Reassembly {
    /// Adds a fragment; returns the datagram when it is complete.
    fn add(
        &mut self,
        key: FragKey,
        frag: Fragment,
        data: &[u8],
        held: Option<Held>,
        now: Instant,
    ) -> Option<Reassembled> {
        let p = self.partials.entry(key).or_insert_with(|| Partial {
            data: ByteMap::default(),
            total: None,
            held: None,
            count: 0,
            since: now,
        });
        p.count += 1;
        self.count += 1;
        match (&mut p.held, held) {
            (Some(all), Some(h)) => all.frames.extend(h.frames),
            (slot @ None, Some(h)) => *slot = Some(h),
            (_, None) => {}
        }
        let end = frag.offset + data.len();
        if !frag.more && p.total.is_none() {
            // The first last-fragment wins, like the data: a conflicting one changes nothing.
            p.total = Some(end);
        }
        // The parser bounds fragment ends by MAX_DATAGRAM, so these conversions are exact.
        let offset = i64::try_from(frag.offset.min(MAX_DATAGRAM)).unwrap_or(0);
        let buf: Arc<[u8]> = Arc::from(data);
        let end = offset + buf.len() as i64;
        p.data.insert(offset, &buf, vec![(offset, end)], now);
        let total = i64::try_from(p.total?).ok()?;
        if !p.data.covers(0, total) {
            return None;
        }
        let p = self.partials.remove(&key)?;
        self.count -= p.count;
        Some(Reassembled {
            payload: p.data.gather(0, total),
            held: p.held,
        })
    }

    fn oldest(&self) -> Option<Instant> {
        self.partials.values().map(|p| p.since).min()
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::testframes::*;
    use super::super::packet::{tcp_flags as f, ETHERTYPE_QINQ, ETHERTYPE_VLAN, IPPROTO_UDP};
    use super::*;
    use proptest::prelude::*;

    const ACK: u16 = f::ACK;
    const PA: u16 = f::ACK | f::PSH;

    /// Prepends the 12-byte vnet header the compare expects.
    fn pkt(frame: Vec<u8>) -> Vec<u8> {
        let mut v = vec![0; DEFAULT_VNET_HDR_LEN];
        v.extend(frame);
        v
    }

    struct T {
        c: ColoCompare,
        now: Instant,
        out: Vec<Action>,
    }

    impl T {
        fn new() -> Self {
            Self::with(CompareConfig::default())
        }
        fn with(cfg: CompareConfig) -> Self {
            T {
                c: ColoCompare::new(cfg),
                now: Instant::now(),
                out: Vec::new(),
            }
        }
        fn p(&mut self, frame: Vec<u8>) -> Vec<Action> {
            let a = self.c.primary(self.now, pkt(frame));
            self.out.extend(a.clone());
            a
        }
        fn s(&mut self, frame: Vec<u8>) -> Vec<Action> {
            let a = self.c.secondary(self.now, pkt(frame));
            self.out.extend(a.clone());
            a
        }
        fn released(&self) -> Vec<Vec<u8>> {
            released(&self.out)
        }
        fn checkpoints(&self) -> Vec<MismatchReason> {
            checkpoints(&self.out)
        }
    }

    fn released(a: &[Action]) -> Vec<Vec<u8>> {
        a.iter()
            .filter_map(|a| match a {
                Action::Release(f) => Some(f[DEFAULT_VNET_HDR_LEN..].to_vec()),
                Action::Checkpoint(_) => None,
            })
            .collect()
    }

    fn checkpoints(a: &[Action]) -> Vec<MismatchReason> {
        a.iter()
            .filter_map(|a| match a {
                Action::Checkpoint(r) => Some(r.clone()),
                Action::Release(_) => None,
            })
            .collect()
    }

    /// Asserts the frames are the expected ones, printing sizes rather than bytes on failure.
    #[track_caller]
    fn check(got: Vec<Vec<u8>>, want: &[Vec<u8>]) {
        if got != want {
            let sizes = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
            let same: Vec<bool> = got.iter().zip(want).map(|(a, b)| a == b).collect();
            panic!(
                "released {:?}, expected {:?} (equal pairwise: {same:?})",
                sizes(&got),
                sizes(want)
            );
        }
    }

    fn is_mismatch(r: &[MismatchReason]) -> bool {
        matches!(r, [MismatchReason::Mismatch(_)])
    }

    /// Segments `data` (starting at sequence `seq`) at the given cut points.
    fn segments(spec: &Spec, seq: u32, ack: u32, data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < data.len()));
        bounds.push(data.len());
        bounds.sort_unstable();
        bounds.dedup();
        bounds
            .windows(2)
            .map(|w| {
                tcp(
                    spec,
                    seq.wrapping_add(w[0] as u32),
                    ack,
                    PA,
                    &data[w[0]..w[1]],
                )
            })
            .collect()
    }

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn same_bytes_different_segmentation_all_released() {
        let mut t = T::new();
        let data = body(5000);
        let pvm = segments(&Spec::v4(), 1000, 1, &data, &[1448, 2896, 4344]);
        let svm = segments(&Spec::v4().id(999).ttl(63), 1000, 1, &data, &[100, 3000]);
        for f in &pvm {
            assert!(t.p(f.clone()).is_empty(), "held until the SVM sends");
        }
        for f in svm {
            t.s(f);
        }
        check(t.released(), &pvm);
        assert!(t.checkpoints().is_empty());
        let c = t.c.counters();
        assert_eq!(c.compared_bytes, 5000);
        assert_eq!(c.released, 4);
        assert_eq!(c.queue_depth, 0);
        assert!(c.queue_depth_max >= 4);
    }

    #[test]
    fn one_differing_byte_one_checkpoint() {
        let mut t = T::new();
        let data = body(3000);
        let mut other = data.clone();
        other[2000] ^= 1;
        let pvm = segments(&Spec::v4(), 7, 1, &data, &[1000, 2000]);
        for f in &pvm {
            t.p(f.clone());
        }
        for f in segments(&Spec::v4(), 7, 1, &other, &[1500]) {
            t.s(f);
        }
        // More traffic on the diverged connection asks for nothing more.
        t.p(tcp(&Spec::v4(), 3007, 1, PA, b"more"));
        t.s(tcp(&Spec::v4(), 3007, 1, PA, b"more"));
        let cps = t.checkpoints();
        assert!(is_mismatch(&cps), "{cps:?}");
        assert!(cps[0].to_string().contains("sequence 2007"), "{}", cps[0]);
        // The first 1000 + 1000 bytes matched and went; the rest waits for the checkpoint.
        check(t.released(), &pvm[..2]);
        assert_eq!(t.c.counters().mismatches, 1);
        let after = t.c.checkpoint_done();
        assert_eq!(
            released(&after),
            [pvm[2].clone(), tcp(&Spec::v4(), 3007, 1, PA, b"more")]
        );
        assert!(!t.c.checkpoint_pending());
        assert_eq!(t.c.counters().queue_depth, 0);
        // A fresh epoch compares again from scratch.
        t.out.clear();
        t.p(tcp(&Spec::v4(), 3011, 1, PA, b"x"));
        t.s(tcp(&Spec::v4(), 3011, 1, PA, b"x"));
        assert_eq!(t.released().len(), 1);
    }

    #[test]
    fn reordered_segments() {
        let mut t = T::new();
        let data = body(3000);
        let pvm = segments(&Spec::v4(), 1, 1, &data, &[1000, 2000]);
        let svm = segments(&Spec::v4(), 1, 1, &data, &[1000, 2000]);
        // The SVM's arrive last-first, the PVM's middle-first.
        t.s(svm[2].clone());
        t.p(pvm[1].clone());
        assert!(t.released().is_empty());
        t.s(svm[1].clone());
        check(t.released(), &pvm[1..2]);
        t.p(pvm[2].clone());
        check(t.released(), &pvm[1..]);
        // The first bytes came last from both: still compared, not taken for old data.
        t.p(pvm[0].clone());
        assert_eq!(t.released().len(), 2);
        t.s(svm[0].clone());
        check(
            t.released(),
            &[pvm[1].clone(), pvm[2].clone(), pvm[0].clone()],
        );
        assert!(t.checkpoints().is_empty());
        assert_eq!(t.c.counters().compared_bytes, 3000);

        // The same with a differing byte in the part that came last.
        let mut t = T::new();
        let mut other = data.clone();
        other[10] ^= 1;
        t.p(pvm[1].clone());
        t.s(svm[1].clone());
        t.p(pvm[0].clone());
        t.s(segments(&Spec::v4(), 1, 1, &other, &[1000]).remove(0));
        assert!(is_mismatch(&t.checkpoints()));
    }

    #[test]
    fn retransmission_of_data_sent_before_a_checkpoint_is_old() {
        let mut t = T::new();
        let data = body(300);
        let spec = Spec::v4();
        let seg = |a: usize, b: usize| tcp(&spec, 1 + a as u32, 1, PA, &data[a..b]);
        t.p(seg(0, 100));
        t.s(seg(0, 100));
        t.p(seg(100, 200));
        assert_eq!(t.released().len(), 1);
        assert_eq!(released(&t.c.checkpoint_done()).len(), 1);
        // Both bytes 0..100 (compared) and 100..200 (released by the checkpoint) are old now.
        check(released(&t.p(seg(0, 200))), &[seg(0, 200)]);
        assert!(t.p(seg(150, 300)).is_empty(), "200..300 is new");
        t.s(seg(200, 300));
        assert_eq!(t.released().len(), 3);
        assert!(t.checkpoints().is_empty());
    }

    #[test]
    fn retransmissions_duplicate_and_overlapping() {
        let mut t = T::new();
        let data = body(3000);
        let spec = Spec::v4();
        let seg = |a: usize, b: usize| tcp(&spec, 100 + a as u32, 1, PA, &data[a..b]);
        t.p(seg(0, 1000));
        t.p(seg(0, 1000)); // duplicate before the match
        t.s(seg(0, 1500));
        assert_eq!(t.released().len(), 2);
        t.p(seg(500, 2000)); // overlaps compared and new bytes
        t.s(seg(1000, 1500)); // duplicate of what the SVM sent
        t.s(seg(1200, 3000));
        assert_eq!(t.released().len(), 3);
        t.p(seg(0, 300)); // retransmission of old, compared data: out at once
        assert_eq!(t.released().len(), 4);
        t.p(seg(1900, 3000));
        assert_eq!(t.released().len(), 5);
        assert!(t.checkpoints().is_empty());
        assert_eq!(t.c.counters().compared_bytes, 3000);
        // A retransmission that disagrees with the new bytes is caught.
        t.p(tcp(&spec, 3100, 1, PA, b"abc"));
        t.s(tcp(&spec, 3100, 1, PA, b"abd"));
        assert!(is_mismatch(&t.checkpoints()));
    }

    #[test]
    fn pure_ack_released_at_once() {
        let mut t = T::new();
        let ack = tcp(&Spec::v4(), 5, 77, ACK, b"");
        check(released(&t.p(ack.clone())), std::slice::from_ref(&ack));
        // Also on a connection that has data held.
        t.p(tcp(&Spec::v4(), 5, 77, PA, b"data"));
        check(released(&t.p(ack.clone())), &[ack]);
        assert_eq!(t.c.counters().queue_depth, 1);
    }

    #[test]
    fn ack_running_ahead_is_held_until_the_svm_acks() {
        let mut t = T::new();
        let spec = Spec::v4();
        let seg = tcp(&spec, 10, 500, PA, b"reply");
        t.p(seg.clone());
        // Same bytes, but the SVM has acknowledged only up to 400.
        t.s(tcp(&spec, 10, 400, PA, b"reply"));
        assert!(t.released().is_empty());
        t.s(tcp(&spec, 15, 499, ACK, b""));
        assert!(t.released().is_empty());
        t.s(tcp(&spec, 15, 500, ACK, b""));
        check(t.released(), &[seg]);
        assert!(t.checkpoints().is_empty());
    }

    #[test]
    fn handshake_flags_and_close() {
        let mut t = T::new();
        let spec = Spec::v4();
        let synack = tcp(&spec, 1000, 5001, f::SYN | ACK, b"");
        t.p(synack.clone());
        t.s(synack.clone());
        check(t.released(), &[synack]);
        let data = tcp(&spec, 1001, 5001, PA, b"hi");
        let fin = tcp(&spec, 1003, 5001, f::FIN | ACK, b"");
        t.p(data.clone());
        t.p(fin.clone());
        t.s(tcp(&spec, 1001, 5001, PA | f::FIN, b"hi"));
        check(t.released()[1..].to_vec(), &[data, fin]);
        assert!(t.checkpoints().is_empty());
        assert_eq!(t.c.counters().connections, 1);
        t.c.tick(t.now);
        assert_eq!(t.c.counters().connections, 0, "closed and idle: forgotten");

        // FIN against data at the same position is a mismatch.
        let mut t = T::new();
        t.p(tcp(&spec, 1, 1, f::FIN | ACK, b""));
        t.s(tcp(&spec, 1, 1, PA, b"x"));
        assert!(is_mismatch(&t.checkpoints()));

        // RST compared by position.
        let mut t = T::new();
        let rst = tcp(&spec, 50, 9, f::RST | ACK, b"");
        t.p(rst.clone());
        assert!(t.released().is_empty());
        t.s(rst.clone());
        check(t.released(), &[rst]);
        let mut t = T::new();
        t.p(tcp(&spec, 50, 9, f::RST | ACK, b""));
        t.s(tcp(&spec, 50, 9, PA, b"late data"));
        assert!(is_mismatch(&t.checkpoints()));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut t = T::new();
        let data = body(4000);
        for f in segments(&Spec::v4(), u32::MAX - 1500, 1, &data, &[1000, 1600]) {
            t.p(f);
        }
        for f in segments(&Spec::v4(), u32::MAX - 1500, 1, &data, &[1501, 3000]) {
            t.s(f);
        }
        assert_eq!(t.released().len(), 3);
        assert!(t.checkpoints().is_empty());
    }

    #[test]
    fn headers_are_not_compared() {
        let mut t = T::new();
        // Timestamp option values and IP id/TTL differ; the payload does not.
        let ts = |v: u8| [1, 1, 8, 10, 0, 0, 0, v, 0, 0, 0, 1];
        let a = tcp_opts(&Spec::v4().id(1).ttl(64), 1, 1, PA, &ts(5), b"same");
        let b = tcp_opts(&Spec::v4().id(2).ttl(9), 1, 1, PA, &ts(6), b"same");
        t.p(a.clone());
        t.s(b);
        check(t.released(), &[a]);
    }

    #[test]
    fn udp_by_payload_in_order() {
        let mut t = T::new();
        let a = udp(&Spec::v4().id(1), b"query one");
        let b = udp(&Spec::v4().id(2), b"query two");
        t.p(a.clone());
        t.p(b.clone());
        t.s(udp(&Spec::v4().id(50).ttl(3), b"query one"));
        check(t.released(), &[a]);
        t.s(udp(&Spec::v4().id(51), b"query two"));
        assert_eq!(t.released().len(), 2);
        assert!(t.checkpoints().is_empty());
        t.p(udp(&Spec::v4(), b"uptime 1"));
        t.s(udp(&Spec::v4(), b"uptime 2"));
        assert!(is_mismatch(&t.checkpoints()));
    }

    #[test]
    fn icmp_by_payload() {
        let mut t = T::new();
        let p = ping(&Spec::v4(), 7, 1, b"abcdefgh");
        t.p(p.clone());
        t.s(ping(&Spec::v4().id(9), 7, 1, b"abcdefgh"));
        check(t.released(), &[p]);
        t.p(ping(&Spec::v6(), 7, 2, b"abcdefgh"));
        t.s(ping(&Spec::v6(), 7, 2, b"abcdefgX"));
        assert!(is_mismatch(&t.checkpoints()));
    }

    #[test]
    fn arp_by_whole_frame() {
        let mut t = T::new();
        let a = arp([10, 0, 0, 1]);
        t.p(a.clone());
        t.s(a.clone());
        check(t.released(), &[a]);
        t.p(arp([10, 0, 0, 1]));
        t.s(arp([10, 0, 0, 3]));
        assert!(is_mismatch(&t.checkpoints()));
    }

    #[test]
    fn ipv6_and_vlan_tcp_are_compared() {
        let specs = [
            Spec::v6(),
            Spec::v4().vlan(ETHERTYPE_VLAN, 10),
            Spec::v6().vlan(ETHERTYPE_QINQ, 20).vlan(ETHERTYPE_VLAN, 30),
        ];
        for spec in specs {
            let mut t = T::new();
            let data = body(2000);
            let pvm = segments(&spec, 1, 1, &data, &[700]);
            for fr in &pvm {
                t.p(fr.clone());
            }
            for fr in segments(&spec, 1, 1, &data, &[1300]) {
                t.s(fr);
            }
            check(t.released(), &pvm);
            let mut t = T::new();
            t.p(tcp(&spec, 1, 1, PA, b"hello"));
            t.s(tcp(&spec, 1, 1, PA, b"hellO"));
            assert!(is_mismatch(&t.checkpoints()), "{spec:?}");
            assert!(t.released().is_empty());
        }
        // Another VLAN is another connection: its bytes are not compared with these.
        let mut t = T::new();
        t.p(tcp(&Spec::v4().vlan(ETHERTYPE_VLAN, 1), 1, 1, PA, b"a"));
        t.s(tcp(&Spec::v4().vlan(ETHERTYPE_VLAN, 2), 1, 1, PA, b"a"));
        assert!(t.released().is_empty());
        assert_eq!(t.c.counters().connections, 2);
    }

    #[test]
    fn fragments_are_reassembled_and_compared() {
        for spec in [Spec::v4(), Spec::v6()] {
            let payload = body(3000);
            let pv = spec.clone().id(40);
            let sv = spec.clone().id(41);
            let dgram = udp_datagram(&pv, 53, 5353, &payload);
            let pvm = fragments(&pv, IPPROTO_UDP, &dgram, 1480);
            let svm = fragments(
                &sv,
                IPPROTO_UDP,
                &udp_datagram(&sv, 53, 5353, &payload),
                1000,
            );
            let mut t = T::new();
            // The PVM's arrive out of order; nothing goes before the datagram matched.
            t.p(pvm[2].clone());
            t.p(pvm[0].clone());
            for fr in &svm {
                t.s(fr.clone());
            }
            assert!(t.released().is_empty());
            t.p(pvm[1].clone());
            check(
                t.released(),
                &[pvm[2].clone(), pvm[0].clone(), pvm[1].clone()],
            );
            assert!(t.checkpoints().is_empty());
            assert_eq!(t.c.counters().queue_depth, 0);

            // One byte off in the secondary's last fragment.
            let mut bad = payload.clone();
            bad[2999] ^= 0x80;
            let svm_bad = fragments(&sv, IPPROTO_UDP, &udp_datagram(&sv, 53, 5353, &bad), 1000);
            let mut t = T::new();
            for fr in &pvm {
                t.p(fr.clone());
            }
            for fr in svm_bad {
                t.s(fr);
            }
            assert!(is_mismatch(&t.checkpoints()), "{spec:?}");
            check(released(&t.c.checkpoint_done()), &pvm);
        }
        // A fragmented TCP segment goes through the TCP rules.
        let spec = Spec::v4().id(3);
        let seg = tcp_segment(&spec, 80, 40000, 1, 1, PA, &[], &body(100));
        let frags = fragments(&spec, 6, &seg, 64);
        let mut t = T::new();
        for fr in &frags {
            t.p(fr.clone());
        }
        t.s(tcp(&spec, 1, 1, PA, &body(60)));
        assert!(t.released().is_empty());
        t.s(tcp(&spec, 61, 1, PA, &body(100)[60..]));
        check(t.released(), &frags);
    }

    #[test]
    fn timeout_then_release_after_checkpoint() {
        let mut t = T::new();
        let a = tcp(&Spec::v4(), 1, 1, PA, b"lonely");
        t.p(a.clone());
        t.now += Duration::from_millis(2999);
        assert!(t.c.tick(t.now).is_empty());
        t.now += Duration::from_millis(1);
        let cp = t.c.tick(t.now);
        assert!(
            matches!(&checkpoints(&cp)[..], [MismatchReason::Timeout(_)]),
            "{cp:?}"
        );
        assert!(
            t.c.tick(t.now + Duration::from_secs(5)).is_empty(),
            "asked once"
        );
        assert_eq!(t.c.counters().timeouts, 1);
        check(released(&t.c.checkpoint_done()), &[a]);
        assert_eq!(t.c.counters().flushed, 1);

        // The secondary's unmatched output times out too, and is dropped at the checkpoint.
        t.s(udp(&Spec::v4(), b"only the svm"));
        t.now += DEFAULT_TIMEOUT;
        assert_eq!(checkpoints(&t.c.tick(t.now)).len(), 1);
        assert!(t.c.checkpoint_done().is_empty());
        assert_eq!(t.c.counters().discarded_secondary, 1);
    }

    #[test]
    fn queue_limits() {
        let cfg = CompareConfig {
            max_per_conn: 3,
            max_total: 5,
            ..CompareConfig::default()
        };
        let mut t = T::with(cfg);
        let spec = Spec::v4();
        for i in 0..4u32 {
            t.p(tcp(&spec, 1 + i, 1, PA, b"x"));
        }
        let cps = t.checkpoints();
        assert!(matches!(&cps[..], [MismatchReason::Overflow(_)]), "{cps:?}");
        let c = t.c.counters();
        assert_eq!((c.overflows, c.dropped_primary, c.queue_depth), (1, 1, 3));
        // Another connection fills the total.
        let other = Spec::v4().swapped();
        t.p(udp(&other, b"1"));
        t.p(udp(&other, b"2"));
        t.p(udp(&other, b"3"));
        let c = t.c.counters();
        assert_eq!((c.overflows, c.dropped_primary, c.queue_depth), (2, 2, 5));
        assert_eq!(t.checkpoints().len(), 1, "one request until the checkpoint");
        assert_eq!(released(&t.c.checkpoint_done()).len(), 5);
        assert_eq!(t.c.counters().queue_depth_max, 5);
    }

    #[test]
    fn failover_releases_and_passes_through() {
        let mut t = T::new();
        let a = tcp(&Spec::v4(), 1, 1, PA, b"a");
        let b = udp(&Spec::v4(), b"b");
        t.p(a.clone());
        t.p(b.clone());
        check(released(&t.c.failover()), &[a, b]);
        assert!(t.c.is_failed_over());
        let c = tcp(&Spec::v4(), 2, 1, PA, b"c");
        check(released(&t.p(c.clone())), &[c]);
        assert!(t.s(udp(&Spec::v4(), b"x")).is_empty());
        assert!(t.c.tick(t.now + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn malformed_frames_compared_whole() {
        let mut t = T::new();
        let mut bad = tcp(&Spec::v4(), 1, 1, PA, b"abc");
        bad[14] = 0x41; // IHL 4: does not parse
        t.p(bad.clone());
        t.s(bad.clone());
        check(t.released(), &[bad]);
        t.p(vec![1, 2, 3]);
        t.s(vec![1, 2, 4]);
        assert!(is_mismatch(&t.checkpoints()));
        assert_eq!(t.c.counters().unparsed, 4);
    }

    #[test]
    fn byte_map_first_wins_and_cuts() {
        let now = Instant::now();
        let buf = |b: &[u8]| -> Arc<[u8]> { Arc::from(b) };
        let mut m = ByteMap::default();
        assert_eq!(m.insert(10, &buf(b"abcd"), vec![(10, 14)], now), [(10, 14)]);
        let got = m.insert(8, &buf(b"XXXXXXXX"), vec![(0, 100)], now);
        assert_eq!(got, [(8, 10), (14, 16)]);
        m.insert(20, &buf(b"zz"), vec![(20, 22)], now);
        assert_eq!(m.gather(8, 16), b"XXabcdXX");
        assert!(m.covers(8, 16));
        assert!(!m.covers(8, 21));
        assert_eq!(m.overlaps(9, 21), [(9, 10), (10, 14), (14, 16), (20, 21)]);
        m.remove_range(11, 15);
        assert_eq!(m.gather(8, 16), b"XXa\0\0\0\0X");
        assert_eq!(m.slice(8, 11), None, "spans two pieces");
        assert_eq!(m.slice(8, 10), Some(&b"XX"[..]));
        assert_eq!(m.at(15), Some(&b"X"[..]));
        assert_eq!(m.len(), 4);
        // Only the wanted ranges are stored.
        let got = m.insert(30, &buf(b"0123456789"), vec![(32, 34), (36, 50)], now);
        assert_eq!(got, [(32, 34), (36, 40)]);
        assert_eq!(m.slice(36, 40), Some(&b"6789"[..]));
    }

    #[test]
    fn intervals_merge() {
        let mut i = Intervals::default();
        i.add(10, 20);
        i.add(30, 40);
        assert!(i.covers(12, 20) && !i.covers(15, 31));
        assert_eq!(i.overlapping(15, 35), [(10, 20), (30, 40)]);
        i.add(20, 30);
        assert!(i.covers(10, 40));
        assert_eq!(i.map.len(), 1);
        i.add(5, 50);
        assert_eq!(i.max_end(), Some(50));
        assert_eq!(
            minus(vec![(0, 100)], &[(10, 20), (90, 120)]),
            [(0, 10), (20, 90)]
        );
        assert_eq!(minus(vec![(0, 10)], &[(20, 30)]), [(0, 10)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any two segmentations of the same bytes, each delivered in any order and with
        /// duplicates, match completely: every PVM frame released, no checkpoint.
        #[test]
        fn any_segmentation_matches(
            len in 1usize..4000,
            pcuts in proptest::collection::vec(0usize..4000, 0..8),
            scuts in proptest::collection::vec(0usize..4000, 0..8),
            pshuffle in proptest::collection::vec(any::<u16>(), 9),
            sshuffle in proptest::collection::vec(any::<u16>(), 9),
            interleave in proptest::collection::vec(any::<bool>(), 32),
            seq in any::<u32>(),
            dup in any::<bool>(),
        ) {
            let data = body(len);
            let order = |mut v: Vec<Vec<u8>>, keys: &[u16]| {
                let mut idx: Vec<usize> = (0..v.len()).collect();
                idx.sort_by_key(|&i| keys[i % keys.len()]);
                let out: Vec<Vec<u8>> = idx.iter().map(|&i| std::mem::take(&mut v[i])).collect();
                out
            };
            let mut pvm = order(segments(&Spec::v4(), seq, 1, &data, &pcuts), &pshuffle);
            if dup { pvm.push(pvm[0].clone()); }
            let svm = order(segments(&Spec::v4(), seq, 1, &data, &scuts), &sshuffle);
            let mut t = T::new();
            let (mut pi, mut si) = (pvm.iter(), svm.iter());
            for &first in interleave.iter().cycle().take(pvm.len() + svm.len() + 32) {
                let next = if first { pi.next().map(|f| (true, f)) } else { si.next().map(|f| (false, f)) };
                let next = next.or_else(|| pi.next().map(|f| (true, f))).or_else(|| si.next().map(|f| (false, f)));
                match next {
                    Some((true, f)) => { t.p(f.clone()); }
                    Some((false, f)) => { t.s(f.clone()); }
                    None => break,
                }
            }
            prop_assert!(t.checkpoints().is_empty());
            prop_assert_eq!(t.released().len(), pvm.len());
            prop_assert_eq!(t.c.counters().compared_bytes, len as u64);
        }

        /// One changed byte anywhere gives exactly one mismatch checkpoint, and every PVM frame
        /// is out once the checkpoint is done.
        #[test]
        fn one_changed_byte_is_one_mismatch(
            len in 1usize..3000,
            at in any::<usize>(),
            pcuts in proptest::collection::vec(0usize..3000, 0..6),
            scuts in proptest::collection::vec(0usize..3000, 0..6),
        ) {
            let data = body(len);
            let mut other = data.clone();
            other[at % len] ^= 0x55;
            let pvm = segments(&Spec::v6(), 77, 1, &data, &pcuts);
            let mut t = T::new();
            for f in &pvm { t.p(f.clone()); }
            for f in segments(&Spec::v6(), 77, 1, &other, &scuts) { t.s(f); }
            prop_assert!(is_mismatch(&t.checkpoints()));
            let before = t.released().len();
            prop_assert_eq!(before + released(&t.c.checkpoint_done()).len(), pvm.len());
        }

        /// Any two fragmentations of the same UDP datagram (IPv4 or IPv6), in any order, match:
        /// the PVM's fragments all go, no checkpoint.
        #[test]
        fn any_fragmentation_matches(
            len in 1usize..3000,
            v6 in any::<bool>(),
            pmax in 1usize..40,
            smax in 1usize..40,
            pkeys in proptest::collection::vec(any::<u16>(), 64),
            skeys in proptest::collection::vec(any::<u16>(), 64),
            svm_first in any::<bool>(),
        ) {
            let spec = if v6 { Spec::v6() } else { Spec::v4() };
            let payload = body(len);
            let shuffled = |mut v: Vec<Vec<u8>>, keys: &[u16]| {
                let mut idx: Vec<usize> = (0..v.len()).collect();
                idx.sort_by_key(|&i| keys[i % keys.len()]);
                idx.iter().map(|&i| std::mem::take(&mut v[i])).collect::<Vec<_>>()
            };
            let pv = spec.clone().id(1);
            let sv = spec.id(2);
            let pvm = shuffled(fragments(&pv, IPPROTO_UDP, &udp_datagram(&pv, 53, 5353, &payload), pmax * 8), &pkeys);
            let svm = shuffled(fragments(&sv, IPPROTO_UDP, &udp_datagram(&sv, 53, 5353, &payload), smax * 8), &skeys);
            let mut t = T::new();
            if svm_first { for f in &svm { t.s(f.clone()); } }
            for f in &pvm { t.p(f.clone()); }
            if !svm_first { for f in &svm { t.s(f.clone()); } }
            prop_assert!(t.checkpoints().is_empty());
            let mut got = t.released();
            let mut want = pvm.clone();
            got.sort();
            want.sort();
            prop_assert!(got == want);
            prop_assert_eq!(t.c.counters().queue_depth, 0);
        }

        /// Arbitrary frames from either side never panic the compare and every PVM frame is
        /// released exactly once by the end.
        #[test]
        fn arbitrary_frames(
            frames in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..120)), 0..40),
        ) {
            let mut t = T::new();
            let mut sent = 0;
            for (primary, mut f) in frames {
                // Make about half of them look like IP so the deeper parsers are reached.
                if f.len() > 26 && f[0] & 1 == 0 {
                    f[24] = 0x08; f[25] = 0;
                    f[26] = 0x45;
                }
                if primary {
                    sent += 1;
                    t.out.extend(t.c.primary(t.now, f));
                } else {
                    t.out.extend(t.c.secondary(t.now, f));
                }
                t.now += Duration::from_millis(200);
                t.out.extend(t.c.tick(t.now));
            }
            t.out.extend(t.c.checkpoint_done());
            let n = t.out.iter().filter(|a| matches!(a, Action::Release(_))).count();
            prop_assert_eq!(n, sent);
            prop_assert_eq!(t.c.counters().queue_depth, 0);
        }
    }
}
