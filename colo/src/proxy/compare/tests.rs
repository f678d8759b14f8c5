//! Tests of the compare: the engine through its public calls, plus the range helpers.

use super::super::packet::testframes::*;
use super::super::packet::{tcp_flags as f, ETHERTYPE_QINQ, ETHERTYPE_VLAN, IPPROTO_UDP};
use super::ranges::{minus, ByteMap, Intervals};
use super::*;
use proptest::prelude::*;
use std::sync::Arc;

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
