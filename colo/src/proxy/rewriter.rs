//! The TCP sequence rewriter: a connection opened since the last checkpoint has one initial
//! sequence number (ISN) in the PVM and another in the SVM, so the SVM's segments carry other
//! sequence numbers than the PVM's, and the client acknowledges the PVM's. The rewriter learns
//! each such connection's offset (SVM ISN − PVM ISN) from the two VMs' SYN or SYN-ACK, puts
//! the SVM's outgoing sequence numbers into the PVM's space (so the compare sees the same
//! stream) and the client's acknowledgments (and SACK blocks) into the SVM's space (so the SVM
//! accepts them). Checksums are fixed incrementally.
//!
//! After a checkpoint the SVM is a copy of the PVM, its TCP state included: every offset is
//! zero again ([`SeqRewriter::reset`]). After a failover of the secondary the offsets it was
//! told keep the connections alive that the client opened with the PVM; new connections need
//! none.
//!
//! The SVM's SYN can arrive before the PVM's: it is held until the PVM's shows its ISN, so the
//! compare never sees an untranslated SYN.

use std::collections::HashMap;

use super::packet::{
    self, checksum_update_u32, rewrite_tcp_u32, ConnKey, KeyDir, Net, TcpField, Transport,
};

/// SVM frames held for one connection, at most (a SYN and its retransmissions).
const MAX_HELD_PER_CONN: usize = 8;
/// Connections with a held SYN, at most.
const MAX_HELD_CONNS: usize = 4096;

/// One connection's ISNs, by the guest's direction.
#[derive(Clone, Copy, Debug, Default)]
struct Isns {
    /// The direction the guest's segments travel in.
    guest_dir: Option<KeyDir>,
    pvm: Option<u32>,
    svm: Option<u32>,
}

impl Isns {
    fn offset(&self) -> Option<u32> {
        Some(self.svm?.wrapping_sub(self.pvm?))
    }
}

/// An SVM frame waiting for the PVM's ISN.
struct HeldFrame {
    frame: Vec<u8>,
    fix_checksum: bool,
}

/// What the rewriter counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RewriterCounters {
    /// Connections whose offset is known.
    pub offsets_learned: u64,
    /// SVM segments put into the PVM's sequence space.
    pub svm_rewritten: u64,
    /// Client segments put into the SVM's sequence space.
    pub client_rewritten: u64,
    /// SVM SYNs held until the PVM's arrived.
    pub held: u64,
    /// SVM frames dropped because too many were held.
    pub dropped: u64,
}

/// The rewriter's state for every connection opened since the last checkpoint.
#[derive(Default)]
pub struct SeqRewriter {
    conns: HashMap<ConnKey, Isns>,
    held: HashMap<ConnKey, Vec<HeldFrame>>,
    counters: RewriterCounters,
}

/// The TCP header of a frame: its connection, direction, offset in the frame and fields.
struct TcpAt {
    key: ConnKey,
    dir: KeyDir,
    offset: usize,
    header_len: usize,
    seq: u32,
    ack: u32,
    syn: bool,
    has_ack: bool,
}

fn tcp_at(frame: &[u8]) -> Option<TcpAt> {
    let f = packet::parse(frame).ok()?;
    let Net::Ip(ip) = &f.net else { return None };
    let Transport::Tcp(t) = &ip.transport else {
        return None;
    };
    let (key, dir) = f.conn_key();
    Some(TcpAt {
        key,
        dir,
        offset: t.offset,
        header_len: t.data_offset(),
        seq: t.seq(),
        ack: t.ack(),
        syn: t.syn(),
        has_ack: t.has_ack(),
    })
}

impl SeqRewriter {
    /// An empty rewriter.
    pub fn new() -> Self {
        Self::default()
    }

    /// What it counted.
    pub fn counters(&self) -> RewriterCounters {
        self.counters
    }

    /// A connection's offset (SVM − PVM, in the guest's direction), once known.
    pub fn offset(&self, key: &ConnKey) -> Option<u32> {
        self.conns.get(key).and_then(Isns::offset)
    }

    /// Every known offset, with the guest's direction (to tell the secondary).
    pub fn offsets(&self) -> Vec<(ConnKey, KeyDir, u32)> {
        self.conns
            .iter()
            .filter_map(|(k, i)| Some((*k, i.guest_dir?, i.offset()?)))
            .collect()
    }

    /// Sets an offset learned elsewhere (the secondary, told by the primary).
    pub fn learn(&mut self, key: ConnKey, guest_dir: KeyDir, offset: u32) {
        self.conns.insert(
            key,
            Isns {
                guest_dir: Some(guest_dir),
                pvm: Some(0),
                svm: Some(offset),
            },
        );
    }

    /// Looks at a frame the PVM sent (it is not changed): a SYN gives the PVM's ISN. Returns
    /// the SVM frames that were waiting for it, now in the PVM's sequence space.
    pub fn pvm_out(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        let Some(t) = tcp_at(frame).filter(|t| t.syn) else {
            return Vec::new();
        };
        let isns = self.conns.entry(t.key).or_default();
        if isns.pvm.is_some_and(|p| p != t.seq) {
            // A new connection on the same addresses and ports: start over.
            *isns = Isns::default();
        }
        isns.pvm = Some(t.seq);
        isns.guest_dir = Some(t.dir);
        if isns.offset().is_some() {
            self.counters.offsets_learned += 1;
        }
        let mut out = Vec::new();
        for h in self.held.remove(&t.key).unwrap_or_default() {
            out.extend(self.svm_out(h.frame, h.fix_checksum));
        }
        out
    }

    /// A frame the SVM sent, into the PVM's sequence space; empty while it waits for the
    /// PVM's SYN. `fix_checksum`: false when the vnet header asks for checksum offload.
    pub fn svm_out(&mut self, mut frame: Vec<u8>, fix_checksum: bool) -> Vec<Vec<u8>> {
        let Some(t) = tcp_at(&frame) else {
            return vec![frame];
        };
        let isns = self.conns.get(&t.key).copied();
        let isns = match (isns, t.syn) {
            (None, false) => return vec![frame],
            (None, true) => {
                let isns = Isns {
                    guest_dir: Some(t.dir),
                    pvm: None,
                    svm: Some(t.seq),
                };
                self.conns.insert(t.key, isns);
                isns
            }
            (Some(mut isns), true) if isns.svm != Some(t.seq) => {
                if isns.offset().is_some() {
                    // A new connection on the same addresses and ports, the SVM first.
                    isns = Isns::default();
                }
                isns.svm = Some(t.seq);
                isns.guest_dir = Some(t.dir);
                self.conns.insert(t.key, isns);
                if isns.offset().is_some() {
                    self.counters.offsets_learned += 1;
                }
                isns
            }
            (Some(isns), _) => isns,
        };
        match isns.offset() {
            Some(0) => vec![frame],
            Some(off) => {
                let _ = rewrite_tcp_u32(
                    &mut frame,
                    t.offset,
                    TcpField::Seq,
                    t.seq.wrapping_sub(off),
                    fix_checksum,
                );
                self.counters.svm_rewritten += 1;
                vec![frame]
            }
            None => {
                self.hold(t.key, frame, fix_checksum);
                Vec::new()
            }
        }
    }

    fn hold(&mut self, key: ConnKey, frame: Vec<u8>, fix_checksum: bool) {
        if !self.held.contains_key(&key) && self.held.len() >= MAX_HELD_CONNS {
            self.counters.dropped += 1;
            return;
        }
        let q = self.held.entry(key).or_default();
        if q.len() >= MAX_HELD_PER_CONN {
            self.counters.dropped += 1;
            return;
        }
        q.push(HeldFrame {
            frame,
            fix_checksum,
        });
        self.counters.held += 1;
    }

    /// A frame from the client (it acknowledges the PVM's sequence numbers), in place into
    /// the SVM's space: the acknowledgment number and SACK blocks.
    pub fn to_svm(&mut self, frame: &mut [u8], fix_checksum: bool) {
        let Some(t) = tcp_at(frame).filter(|t| t.has_ack) else {
            return;
        };
        let Some((guest_dir, off)) = self
            .conns
            .get(&t.key)
            .and_then(|i| Some((i.guest_dir?, i.offset()?)))
        else {
            return;
        };
        if off == 0 || guest_dir == t.dir {
            return;
        }
        let _ = rewrite_tcp_u32(
            frame,
            t.offset,
            TcpField::Ack,
            t.ack.wrapping_add(off),
            fix_checksum,
        );
        rewrite_sack(frame, t.offset, t.header_len, off, fix_checksum);
        self.counters.client_rewritten += 1;
    }

    /// A checkpoint made the SVM a copy of the PVM: no offsets any more, and SVM SYNs still
    /// waiting belong to a state that is gone.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.held.clear();
    }
}

/// Adds `off` to both edges of every SACK block in the TCP options at `tcp..tcp+len`.
fn rewrite_sack(frame: &mut [u8], tcp: usize, len: usize, off: u32, fix_checksum: bool) {
    const SACK: u8 = 5;
    let Some(header) = frame.get_mut(tcp..tcp + len) else {
        return;
    };
    let mut at = 20;
    let mut edges = Vec::new();
    while at < header.len() {
        match header[at] {
            0 => break,
            1 => at += 1,
            kind => {
                let Some(&l) = header.get(at + 1) else { break };
                let l = usize::from(l);
                if l < 2 || at + l > header.len() {
                    break;
                }
                if kind == SACK {
                    let mut e = at + 2;
                    while e + 4 <= at + l {
                        edges.push(e);
                        e += 4;
                    }
                }
                at += l;
            }
        }
    }
    for e in edges {
        let old = u32::from_be_bytes([header[e], header[e + 1], header[e + 2], header[e + 3]]);
        let new = old.wrapping_add(off);
        header[e..e + 4].copy_from_slice(&new.to_be_bytes());
        if fix_checksum {
            let c = u16::from_be_bytes([header[16], header[17]]);
            let c = checksum_update_u32(c, old, new);
            header[16..18].copy_from_slice(&c.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::tcp_flags::{ACK, PSH, SYN};
    use super::super::packet::testframes::*;
    use super::*;

    const PVM_ISN: u32 = 1_000;
    const SVM_ISN: u32 = 4_000_000_000; // wraps past 2^32 within the test
    const CLIENT_ISN: u32 = 777;

    /// A frame from the client (port 40000) to the guest (port 80).
    fn client(seq: u32, ack: u32, flags: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let spec = Spec::v4().swapped();
        let seg = tcp_segment(&spec, 40000, 80, seq, ack, flags, options, payload);
        ip_frame(&spec, packet::IPPROTO_TCP, &seg)
    }

    fn seq_ack(frame: &[u8]) -> (u32, u32) {
        let t = tcp_at(frame).expect("tcp");
        (t.seq, t.ack)
    }

    /// The checksum of a rewritten frame is right: recomputing it over the frame gives zero.
    fn checksum_ok(frame: &[u8]) -> bool {
        let f = packet::parse(frame).unwrap();
        let Net::Ip(ip) = &f.net else { panic!() };
        packet::transport_checksum(&ip.header.pseudo(), ip.protocol, ip.upper, None) == 0
    }

    #[test]
    fn a_connection_the_client_opens() {
        let from_guest = Spec::v4();
        let mut r = SeqRewriter::new();
        // The client's SYN reaches both (nothing to rewrite: no ACK).
        let mut syn = client(CLIENT_ISN, 0, SYN, &[], b"");
        r.to_svm(&mut syn, true);
        assert_eq!(seq_ack(&syn), (CLIENT_ISN, 0));
        // The SVM answers first: held until the PVM's SYN-ACK shows its ISN.
        let svm_synack = tcp(&from_guest, SVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"");
        assert!(r.svm_out(svm_synack, true).is_empty());
        let pvm_synack = tcp(&from_guest, PVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"");
        let released = r.pvm_out(&pvm_synack);
        assert_eq!(released.len(), 1);
        assert_eq!(
            released[0], pvm_synack,
            "translated SYN-ACK = the PVM's, byte for byte"
        );
        // Data from the SVM, in the PVM's space, checksum fixed.
        let data = tcp(
            &from_guest,
            SVM_ISN + 1,
            CLIENT_ISN + 1,
            ACK | PSH,
            b"+OK\r\n",
        );
        let out = r.svm_out(data, true);
        assert_eq!(seq_ack(&out[0]), (PVM_ISN + 1, CLIENT_ISN + 1));
        assert!(checksum_ok(&out[0]));
        // The client acknowledges the PVM's bytes; the SVM gets its own numbers.
        let mut ack = client(CLIENT_ISN + 1, PVM_ISN + 6, ACK, &[], b"");
        r.to_svm(&mut ack, true);
        assert_eq!(seq_ack(&ack), (CLIENT_ISN + 1, SVM_ISN.wrapping_add(6)));
        assert!(checksum_ok(&ack));
        assert_eq!(r.counters().offsets_learned, 1);
    }

    #[test]
    fn a_connection_the_guest_opens_and_the_round_trip() {
        let from_guest = Spec::v4();
        let mut r = SeqRewriter::new();
        let pvm_syn = tcp(&from_guest, PVM_ISN, 0, SYN, b"");
        assert!(r.pvm_out(&pvm_syn).is_empty());
        let svm_syn = tcp(&from_guest, SVM_ISN, 0, SYN, b"");
        assert_eq!(r.svm_out(svm_syn, true), vec![pvm_syn]);
        let mut synack = client(CLIENT_ISN, PVM_ISN + 1, SYN | ACK, &[], b"");
        r.to_svm(&mut synack, true);
        assert_eq!(seq_ack(&synack).1, SVM_ISN.wrapping_add(1));
        // Round trip: PVM space → SVM space → PVM space gives back the same frame.
        let original = tcp(
            &from_guest,
            SVM_ISN.wrapping_add(1),
            CLIENT_ISN + 1,
            ACK,
            b"x",
        );
        let back = r.svm_out(original.clone(), true);
        let mut there = back[0].clone();
        // Into SVM space again by hand (what the SVM would have sent) and compare.
        let off = r.offset(&tcp_at(&original).unwrap().key).unwrap();
        let t = tcp_at(&there).unwrap();
        rewrite_tcp_u32(
            &mut there,
            t.offset,
            TcpField::Seq,
            t.seq.wrapping_add(off),
            true,
        )
        .unwrap();
        assert_eq!(there, original);
    }

    #[test]
    fn sack_blocks_follow_the_offset() {
        let from_guest = Spec::v4();
        let mut r = SeqRewriter::new();
        r.pvm_out(&tcp(&from_guest, PVM_ISN, 0, SYN, b""));
        r.svm_out(tcp(&from_guest, SVM_ISN, 0, SYN, b""), true);
        // NOP NOP SACK(10) one block [PVM+100, PVM+200).
        let mut opts = vec![1, 1, 5, 10];
        opts.extend_from_slice(&(PVM_ISN + 100).to_be_bytes());
        opts.extend_from_slice(&(PVM_ISN + 200).to_be_bytes());
        let mut f = client(CLIENT_ISN, PVM_ISN + 50, ACK, &opts, b"");
        r.to_svm(&mut f, true);
        let t = tcp_at(&f).unwrap();
        let o = t.offset + 20 + 4;
        let edge = |at: usize| u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]);
        assert_eq!(edge(o), SVM_ISN.wrapping_add(100));
        assert_eq!(edge(o + 4), SVM_ISN.wrapping_add(200));
        assert!(checksum_ok(&f));
    }

    #[test]
    fn a_checkpoint_resets_every_offset() {
        let from_guest = Spec::v4();
        let mut r = SeqRewriter::new();
        r.pvm_out(&tcp(&from_guest, PVM_ISN, 0, SYN, b""));
        r.svm_out(tcp(&from_guest, SVM_ISN, 0, SYN, b""), true);
        assert!(!r.offsets().is_empty());
        r.reset();
        assert!(r.offsets().is_empty());
        // The SVM now uses the PVM's numbers: its frames pass unchanged.
        let f = tcp(&from_guest, PVM_ISN + 1, 5, ACK, b"y");
        assert_eq!(r.svm_out(f.clone(), true), vec![f]);
    }

    #[test]
    fn learned_offsets_serve_the_secondary_after_failover() {
        let from_guest = Spec::v4();
        let mut primary = SeqRewriter::new();
        primary.pvm_out(&tcp(&from_guest, PVM_ISN, 0, SYN, b""));
        primary.svm_out(tcp(&from_guest, SVM_ISN, 0, SYN, b""), true);
        let mut secondary = SeqRewriter::new();
        for (k, d, o) in primary.offsets() {
            secondary.learn(k, d, o);
        }
        let mut ack = client(CLIENT_ISN, PVM_ISN + 9, ACK, &[], b"");
        secondary.to_svm(&mut ack, true);
        assert_eq!(seq_ack(&ack).1, SVM_ISN.wrapping_add(9));
        let out = secondary.svm_out(
            tcp(&from_guest, SVM_ISN.wrapping_add(9), 1, ACK, b"z"),
            true,
        );
        assert_eq!(seq_ack(&out[0]).0, PVM_ISN + 9);
    }

    #[test]
    fn without_checksum_fixing_only_the_numbers_change() {
        // Offloaded checksums hold the pseudo-header sum only: leave them alone.
        let from_guest = Spec::v4();
        let mut r = SeqRewriter::new();
        r.pvm_out(&tcp(&from_guest, PVM_ISN, 0, SYN, b""));
        r.svm_out(tcp(&from_guest, SVM_ISN, 0, SYN, b""), false);
        let f = tcp(&from_guest, SVM_ISN.wrapping_add(1), 1, ACK, b"q");
        let t = tcp_at(&f).unwrap();
        let csum = |b: &[u8]| [b[t.offset + 16], b[t.offset + 17]];
        let out = r.svm_out(f.clone(), false);
        assert_eq!(csum(&out[0]), csum(&f));
        assert_eq!(seq_ack(&out[0]).0, PVM_ISN + 1);
    }

    #[test]
    fn non_tcp_and_unknown_connections_pass_unchanged() {
        let mut r = SeqRewriter::new();
        let u = udp(&Spec::v4(), b"dns");
        assert_eq!(r.svm_out(u.clone(), true), vec![u]);
        let f = tcp(&Spec::v4(), 5, 6, ACK, b"old connection");
        assert_eq!(r.svm_out(f.clone(), true), vec![f.clone()]);
        let mut g = f.clone();
        r.to_svm(&mut g, true);
        assert_eq!(g, f);
        assert_eq!(r.svm_out(vec![1, 2, 3], true), vec![vec![1, 2, 3]]);
    }

    #[test]
    fn held_frames_are_bounded() {
        let mut r = SeqRewriter::new();
        for _ in 0..MAX_HELD_PER_CONN + 3 {
            assert!(r
                .svm_out(tcp(&Spec::v4(), SVM_ISN, 0, SYN, b""), true)
                .is_empty());
        }
        assert_eq!(r.counters().dropped, 3);
        let out = r.pvm_out(&tcp(&Spec::v4(), PVM_ISN, 0, SYN, b""));
        assert_eq!(out.len(), MAX_HELD_PER_CONN);
    }
}
