//! Tests of both proxies through their public calls.

use std::time::{Duration, Instant};

use super::super::compare::{CompareConfig, MismatchReason, DEFAULT_VNET_HDR_LEN};
use super::super::packet::tcp_flags::{ACK, FIN, PSH, SYN};
use super::super::packet::testframes::*;
use super::super::packet::{self, ConnKey, KeyDir, Net, Transport, IPPROTO_TCP};
use super::super::wire::Message;
use super::*;

const PVM_ISN: u32 = 1_000;
const SVM_ISN: u32 = 4_000_000_000; // the SVM's numbers wrap past 2^32
const CLIENT_ISN: u32 = 777;
const REQ: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

/// Prepends a zeroed vnet header.
fn pkt(eth: Vec<u8>) -> Vec<u8> {
    let mut v = vec![0; DEFAULT_VNET_HDR_LEN];
    v.extend(eth);
    v
}

/// A frame from the guest (port 80) to the client (port 40000).
fn guest(seq: u32, ack: u32, flags: u16, payload: &[u8]) -> Vec<u8> {
    pkt(tcp(&Spec::v4(), seq, ack, flags, payload))
}

/// A frame from the client (port `port`) to the guest (port 80).
fn client_on(port: u16, seq: u32, ack: u32, flags: u16, payload: &[u8]) -> Vec<u8> {
    let spec = Spec::v4().swapped();
    let seg = tcp_segment(&spec, port, 80, seq, ack, flags, &[], payload);
    pkt(ip_frame(&spec, IPPROTO_TCP, &seg))
}

fn client(seq: u32, ack: u32, flags: u16, payload: &[u8]) -> Vec<u8> {
    client_on(40000, seq, ack, flags, payload)
}

/// (seq, ack) of a vnet frame.
fn seq_ack(frame: &[u8]) -> (u32, u32) {
    let f = packet::parse(&frame[DEFAULT_VNET_HDR_LEN..]).expect("frame");
    let Net::Ip(ip) = &f.net else {
        panic!("not ip")
    };
    let Transport::Tcp(t) = &ip.transport else {
        panic!("not tcp")
    };
    (t.seq(), t.ack())
}

/// The frame's transport checksum verifies.
fn checksum_ok(frame: &[u8]) -> bool {
    let f = packet::parse(&frame[DEFAULT_VNET_HDR_LEN..]).expect("frame");
    let Net::Ip(ip) = &f.net else {
        panic!("not ip")
    };
    packet::transport_checksum(&ip.header.pseudo(), ip.protocol, ip.upper, None) == 0
}

fn conn_key(frame: &[u8]) -> ConnKey {
    packet::parse(&frame[DEFAULT_VNET_HDR_LEN..])
        .expect("frame")
        .conn_key()
        .0
}

fn taps(out: &[Output]) -> Vec<Vec<u8>> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToTap(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn checkpoints(out: &[Output]) -> Vec<MismatchReason> {
    out.iter()
        .filter_map(|o| match o {
            Output::Checkpoint(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn offsets(out: &[Output]) -> Vec<(u64, ConnKey, KeyDir, u32)> {
    out.iter()
        .filter_map(|o| match o {
            &Output::SendOffset {
                epoch,
                key,
                guest_dir,
                offset,
            } => Some((epoch, key, guest_dir, offset)),
            _ => None,
        })
        .collect()
}

/// A primary after checkpoint 1: both VMs in epoch 1.
fn protected() -> PrimaryProxy {
    let mut p = PrimaryProxy::new(CompareConfig::default());
    assert_eq!(p.checkpoint_started(1), Ok(vec![Output::MirrorEpoch(1)]));
    p.svm_epoch(1).unwrap();
    assert!(p.checkpoint_done(1).unwrap().is_empty());
    p
}

/// Opens the client's connection in the current epoch; the PVM and SVM answer with their own
/// ISNs. Returns everything output.
fn open(p: &mut PrimaryProxy, now: Instant) -> Vec<Output> {
    let syn = client(CLIENT_ISN, 0, SYN, b"");
    assert_eq!(p.from_client(&syn), Some(syn.clone()));
    let mut out = p.from_pvm(now, guest(PVM_ISN, CLIENT_ISN + 1, SYN | ACK, b""));
    out.extend(p.from_svm(now, guest(SVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"")));
    out
}

const ACK_C: u32 = CLIENT_ISN + 1 + REQ.len() as u32;

#[test]
fn request_response_with_other_isns_and_segmentation_is_released() {
    let now = Instant::now();
    let mut p = protected();
    let out = open(&mut p, now);
    assert_eq!(
        taps(&out),
        vec![guest(PVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"")]
    );
    let key = conn_key(&client(CLIENT_ISN, 0, SYN, b""));
    assert_eq!(
        offsets(&out),
        vec![(1, key, KeyDir::HiToLo, SVM_ISN.wrapping_sub(PVM_ISN))]
    );
    // The client's request acknowledges the PVM's SYN-ACK: the SVM's copy acknowledges its own.
    let req = client(CLIENT_ISN + 1, PVM_ISN + 1, ACK | PSH, REQ);
    let mirrored = p.from_client(&req).unwrap();
    assert_eq!(
        seq_ack(&mirrored),
        (CLIENT_ISN + 1, SVM_ISN.wrapping_add(1))
    );
    assert!(checksum_ok(&mirrored));
    // One segment from the PVM, two from the SVM in its own sequence space.
    let pvm_resp = guest(PVM_ISN + 1, ACK_C, ACK | PSH, RESP);
    assert!(p.from_pvm(now, pvm_resp.clone()).is_empty());
    let (a, b) = RESP.split_at(10);
    assert!(p
        .from_svm(now, guest(SVM_ISN.wrapping_add(1), ACK_C, ACK, a))
        .is_empty());
    let out = p.from_svm(now, guest(SVM_ISN.wrapping_add(11), ACK_C, ACK | PSH, b));
    assert_eq!(out, vec![Output::ToTap(pvm_resp)]);
    let c = p.counters();
    assert_eq!(c.compare.checkpoint_requests, 0);
    assert_eq!(c.compare.mismatches, 0);
    assert_eq!(c.rewriter.offsets_learned, 1);
    assert_eq!(c.offsets_sent, 1);
    assert_eq!(c.mirrored, 2);
}

#[test]
fn the_svms_syn_ack_first_is_held_for_the_pvms_isn() {
    let now = Instant::now();
    let mut p = protected();
    p.from_client(&client(CLIENT_ISN, 0, SYN, b""));
    assert!(p
        .from_svm(now, guest(SVM_ISN, CLIENT_ISN + 1, SYN | ACK, b""))
        .is_empty());
    let pvm = guest(PVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"");
    let out = p.from_pvm(now, pvm.clone());
    assert_eq!(taps(&out), vec![pvm]);
    assert_eq!(offsets(&out).len(), 1);
}

#[test]
fn a_differing_reply_asks_for_one_checkpoint() {
    let now = Instant::now();
    let mut p = protected();
    open(&mut p, now);
    p.from_pvm(now, guest(PVM_ISN + 1, ACK_C, ACK | PSH, b"uptime 100"));
    let out = p.from_svm(
        now,
        guest(SVM_ISN.wrapping_add(1), ACK_C, ACK, b"uptime 101"),
    );
    assert!(taps(&out).is_empty());
    assert!(matches!(
        checkpoints(&out)[..],
        [MismatchReason::Mismatch(_)]
    ));
    // More divergence in the same epoch asks no more.
    let mut more = p.from_pvm(now, guest(PVM_ISN + 11, ACK_C, ACK, b"x"));
    more.extend(p.from_svm(now, guest(SVM_ISN.wrapping_add(11), ACK_C, ACK, b"y")));
    more.extend(p.tick(now + Duration::from_secs(10)));
    assert!(checkpoints(&more).is_empty());
    // The checkpoint releases what was held, in order; the new epoch may ask again.
    p.checkpoint_started(2).unwrap();
    p.svm_epoch(2).unwrap();
    let out = p.checkpoint_done(2).unwrap();
    assert_eq!(
        taps(&out),
        vec![
            guest(PVM_ISN + 1, ACK_C, ACK | PSH, b"uptime 100"),
            guest(PVM_ISN + 11, ACK_C, ACK, b"x")
        ]
    );
    p.from_pvm(now, guest(PVM_ISN + 12, ACK_C, ACK, b"a"));
    let out = p.from_svm(now, guest(PVM_ISN + 12, ACK_C, ACK, b"b"));
    assert_eq!(checkpoints(&out).len(), 1);
    assert_eq!(p.counters().compare.checkpoint_requests, 2);
}

/// Epoch 1 has the connection open (offset known) and the PVM's `A` held; checkpoint 2 starts
/// and the PVM sends `B` (epoch 2).
fn two_epochs(now: Instant) -> (PrimaryProxy, Vec<u8>, Vec<u8>) {
    let mut p = protected();
    open(&mut p, now);
    let a = guest(PVM_ISN + 1, ACK_C, ACK | PSH, b"AAAA");
    assert!(p.from_pvm(now, a.clone()).is_empty());
    assert_eq!(p.checkpoint_started(2), Ok(vec![Output::MirrorEpoch(2)]));
    let b = guest(PVM_ISN + 5, ACK_C, ACK | PSH, b"BBBB");
    assert!(p.from_pvm(now, b.clone()).is_empty());
    (p, a, b)
}

#[test]
fn svm_frames_before_the_marker_are_compared_in_the_old_epoch() {
    let now = Instant::now();
    let (mut p, a, b) = two_epochs(now);
    // The SVM, still in epoch 1 (its own sequence space), sends A: it matches epoch 1's A.
    let out = p.from_svm(now, guest(SVM_ISN.wrapping_add(1), ACK_C, ACK, b"AAAA"));
    assert_eq!(taps(&out), vec![a]);
    // A pre-marker B goes to epoch 1 too: it does not release the PVM's epoch-2 B.
    let out = p.from_svm(now, guest(SVM_ISN.wrapping_add(5), ACK_C, ACK, b"BBBB"));
    assert!(out.is_empty());
    // After the marker the SVM runs checkpoint 2's state: the PVM's numbers, no offset.
    p.svm_epoch(2).unwrap();
    let out = p.from_svm(now, guest(PVM_ISN + 5, ACK_C, ACK, b"BBBB"));
    assert_eq!(taps(&out), vec![b]);
    assert!(p.checkpoint_done(2).unwrap().is_empty());
    assert_eq!(p.counters().epochs, 1);
    assert_eq!(p.counters().compare.checkpoint_requests, 0);
}

#[test]
fn checkpoint_done_releases_the_old_epoch_only_ack_before_marker() {
    let now = Instant::now();
    let (mut p, a, b) = two_epochs(now);
    // The Ack comes first: epoch 1 ends, A goes out, B (epoch 2) stays held.
    let out = p.checkpoint_done(2).unwrap();
    assert_eq!(taps(&out), vec![a]);
    // The SVM's frames before the marker belong to an epoch that is gone.
    assert!(p
        .from_svm(now, guest(SVM_ISN.wrapping_add(1), ACK_C, ACK, b"AAAA"))
        .is_empty());
    assert_eq!(p.counters().stale_svm, 1);
    p.svm_epoch(2).unwrap();
    let out = p.from_svm(now, guest(PVM_ISN + 5, ACK_C, ACK, b"BBBB"));
    assert_eq!(taps(&out), vec![b]);
}

#[test]
fn checkpoint_done_releases_the_old_epoch_only_marker_before_ack() {
    let now = Instant::now();
    let (mut p, a, b) = two_epochs(now);
    p.svm_epoch(2).unwrap();
    // The SVM's epoch-2 frames match B, but A (epoch 1, unmatched) must leave first: B waits.
    let out = p.from_svm(now, guest(PVM_ISN + 5, ACK_C, ACK, b"BBBB"));
    assert!(out.is_empty());
    assert_eq!(p.counters().buffered, 1);
    let out = p.checkpoint_done(2).unwrap();
    assert_eq!(taps(&out), vec![a, b]);
    assert_eq!(p.counters().buffered, 0);
    // Epoch 2 goes on alone.
    let c = guest(PVM_ISN + 9, ACK_C, ACK | PSH, b"C");
    p.from_pvm(now, c.clone());
    let out = p.from_svm(now, guest(PVM_ISN + 9, ACK_C, ACK, b"C"));
    assert_eq!(taps(&out), vec![c]);
}

#[test]
fn a_buffered_release_leaves_once_the_old_epoch_matched_everything() {
    let now = Instant::now();
    let mut p = protected();
    open(&mut p, now);
    let a = guest(PVM_ISN + 1, ACK_C, ACK | PSH, b"AAAA");
    p.from_pvm(now, a.clone());
    p.checkpoint_started(2).unwrap();
    // Epoch 2's compare releases a pure ACK at once, but it must still wait for A.
    let pure_ack = guest(PVM_ISN + 5, ACK_C + 1, ACK, b"");
    assert!(p.from_pvm(now, pure_ack.clone()).is_empty());
    assert_eq!(p.counters().buffered, 1);
    // The SVM's pre-marker A releases A, then the buffered ACK.
    let out = p.from_svm(now, guest(SVM_ISN.wrapping_add(1), ACK_C, ACK, b"AAAA"));
    assert_eq!(taps(&out), vec![a, pure_ack]);
}

#[test]
fn requests_of_an_old_epoch_are_moot_and_ticks_wait_for_the_svm() {
    let now = Instant::now();
    let (mut p, _a, _b) = two_epochs(now);
    // Epoch 1 diverges after checkpoint 2 started: checkpoint 2 resolves it, ask nothing.
    let out = p.from_svm(now, guest(SVM_ISN.wrapping_add(1), ACK_C, ACK, b"ZZZZ"));
    assert!(checkpoints(&out).is_empty());
    assert_eq!(p.counters().moot_requests, 1);
    // B waits for an SVM that has not loaded checkpoint 2: no timeout for that.
    let late = now + Duration::from_secs(10);
    assert!(p.tick(late).is_empty());
    p.svm_epoch(2).unwrap();
    assert!(matches!(
        checkpoints(&p.tick(late))[..],
        [MismatchReason::Timeout(_)]
    ));
}

#[test]
fn failover_releases_everything_in_order_then_passes_through() {
    let now = Instant::now();
    let (mut p, a, b) = two_epochs(now);
    let out = p.failover();
    assert_eq!(taps(&out), vec![a, b]);
    assert!(p.is_failed_over());
    let c = guest(PVM_ISN + 9, ACK_C, ACK | PSH, b"C");
    assert_eq!(p.from_pvm(now, c.clone()), vec![Output::ToTap(c)]);
    assert!(p.from_svm(now, guest(1, 2, ACK, b"x")).is_empty());
    assert_eq!(p.from_client(&client(1, 2, ACK, b"")), None);
    assert_eq!(p.checkpoint_started(3), Err(SessionError::FailedOver));
    assert_eq!(p.counters().epochs, 1);
}

#[test]
fn a_failed_checkpoint_ends_protection() {
    let now = Instant::now();
    let (mut p, a, b) = two_epochs(now);
    assert_eq!(taps(&p.checkpoint_failed(2)), vec![a, b]);
    assert!(p.is_failed_over());
}

#[test]
fn before_protection_frames_pass_and_nothing_is_mirrored() {
    let now = Instant::now();
    let mut p = PrimaryProxy::new(CompareConfig::default());
    let f = guest(5, 6, ACK | PSH, b"boot");
    assert_eq!(p.from_pvm(now, f.clone()), vec![Output::ToTap(f)]);
    assert_eq!(p.from_client(&client(1, 2, ACK, b"")), None);
    p.checkpoint_started(1).unwrap();
    // From the pause of checkpoint 1 on, the PVM's frames are held.
    assert!(p.from_pvm(now, guest(9, 6, ACK | PSH, b"x")).is_empty());
    assert!(p.from_client(&client(1, 2, ACK, b"")).is_some());
}

#[test]
fn offsets_are_sent_once_per_connection() {
    let now = Instant::now();
    let mut p = protected();
    let mut out = open(&mut p, now);
    // Retransmitted SYN-ACKs from both sides.
    out.extend(p.from_pvm(now, guest(PVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"")));
    out.extend(p.from_svm(now, guest(SVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"")));
    // A second connection, on another client port.
    let spec = Spec::v4();
    let synack = |isn| {
        let seg = tcp_segment(&spec, 80, 40001, isn, 5, SYN | ACK, &[], b"");
        pkt(ip_frame(&spec, IPPROTO_TCP, &seg))
    };
    p.from_client(&client_on(40001, 4, 0, SYN, b""));
    out.extend(p.from_pvm(now, synack(PVM_ISN + 100)));
    out.extend(p.from_svm(now, synack(SVM_ISN)));
    let sent = offsets(&out);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].3, SVM_ISN.wrapping_sub(PVM_ISN + 100));
    // A connection both VMs open with the same ISN (after a checkpoint) needs none.
    p.checkpoint_started(2).unwrap();
    p.svm_epoch(2).unwrap();
    p.checkpoint_done(2).unwrap();
    let mut out = p.from_pvm(now, synack(7));
    out.extend(p.from_svm(now, synack(7)));
    assert!(offsets(&out).is_empty());
    assert_eq!(p.counters().offsets_sent, 2);
}

#[test]
fn calls_out_of_order_are_refused() {
    let mut p = protected();
    assert_eq!(
        p.checkpoint_started(3),
        Err(SessionError::BadStart {
            got: 3,
            expected: 2
        })
    );
    assert!(matches!(
        p.checkpoint_done(2),
        Err(SessionError::BadDone { .. })
    ));
    p.checkpoint_started(2).unwrap();
    assert!(matches!(
        p.checkpoint_started(3),
        Err(SessionError::BadStart { .. })
    ));
    assert!(matches!(
        p.svm_epoch(1),
        Err(SessionError::BadMarker { .. })
    ));
    assert!(matches!(
        p.svm_epoch(3),
        Err(SessionError::BadMarker { .. })
    ));
    assert!(matches!(
        p.checkpoint_done(1),
        Err(SessionError::BadDone { .. })
    ));
    assert!(p.checkpoint_done(2).is_ok());
}

#[test]
fn counters_sum_the_epochs() {
    let now = Instant::now();
    let (mut p, _a, _b) = two_epochs(now);
    let c = p.counters();
    assert_eq!((c.pvm_epoch, c.svm_epoch, c.epochs), (2, 1, 2));
    // SYN-ACK, A (epoch 1) and B (epoch 2), plus epoch 0's nothing.
    assert_eq!(c.compare.primary_packets, 3);
    p.checkpoint_done(2).unwrap();
    let c = p.counters();
    assert_eq!(c.compare.primary_packets, 3);
    assert_eq!(c.compare.released, 2);
    assert_eq!(c.compare.queue_depth, 1);
    assert_eq!(c.checkpoint_done, 2);
}

// ---- the secondary ----

#[test]
fn secondary_injects_mirrored_frames_by_epoch() {
    let mut s = SecondaryProxy::new();
    let f = |n: u8| client(u32::from(n), 0, ACK, &[n]);
    // Before the first checkpoint's load: the frames after the primary's pause wait for it.
    s.mirror_epoch(1).unwrap();
    assert_eq!(s.mirrored(f(1)), None);
    let loaded = s.checkpoint_loaded(1).unwrap();
    assert_eq!(loaded.marker, Message::Epoch { checkpoint: 1 });
    assert_eq!(loaded.inject, vec![f(1)]);
    assert_eq!(s.mirrored(f(2)), Some(f(2)));
    // Checkpoint 2: the frames after its pause wait for its load.
    s.mirror_epoch(2).unwrap();
    assert_eq!(s.mirrored(f(3)), None);
    assert_eq!(s.checkpoint_loaded(2).unwrap().inject, vec![f(3)]);
    // Loaded before the primary's marker 3 arrived: the frames still marked 2 are in
    // checkpoint 3 already.
    assert!(s.checkpoint_loaded(3).is_ok());
    assert_eq!(s.mirrored(f(4)), None);
    assert_eq!(s.counters().stale_mirrored, 1);
    s.mirror_epoch(3).unwrap();
    assert_eq!(s.mirrored(f(5)), Some(f(5)));
    assert!(s.checkpoint_loaded(3).is_err());
    assert!(s.mirror_epoch(3).is_err());
}

#[test]
fn frames_of_the_old_epoch_arriving_during_a_load_are_not_injected() {
    let mut s = SecondaryProxy::new();
    let f = |n: u8| client(u32::from(n), 0, ACK, &[n]);
    s.mirror_epoch(1).unwrap();
    s.checkpoint_loaded(1).unwrap();
    assert_eq!(s.mirrored(f(1)), Some(f(1)));
    // The SVM pauses for checkpoint 2 before the primary's marker 2 arrived: what still comes
    // marked 1 reached the PVM before checkpoint 2's pause, so checkpoint 2 holds it.
    s.checkpoint_applying();
    assert_eq!(s.mirrored(f(2)), None);
    s.mirror_epoch(2).unwrap();
    assert_eq!(s.mirrored(f(3)), None);
    let loaded = s.checkpoint_loaded(2).unwrap();
    assert_eq!(loaded.inject, vec![f(3)]);
    assert_eq!(s.counters().stale_mirrored, 1);
    // Loaded: frames of the SVM's epoch go straight in again.
    assert_eq!(s.mirrored(f(4)), Some(f(4)));
}

#[test]
fn at_a_takeover_the_svms_segments_since_its_last_load_go_to_the_tap_again() {
    let mut s = SecondaryProxy::new();
    s.mirror_epoch(1).unwrap();
    s.checkpoint_loaded(1).unwrap();
    let old = guest(100, 7, ACK | PSH, b"superseded by checkpoint 2");
    assert!(matches!(s.from_svm(old), SvmTx::ToPrimary(_)));
    s.mirror_epoch(2).unwrap();
    s.checkpoint_loaded(2).unwrap();
    let data = guest(200, 7, ACK | PSH, b"reply");
    let fin = guest(205, 7, ACK | FIN, b"");
    let pure_ack = guest(206, 8, ACK, b"");
    for f in [&data, &pure_ack, &fin] {
        assert!(matches!(s.from_svm(f.clone()), SvmTx::ToPrimary(_)));
    }
    // Data and FIN since the last load, in order; not the pure ACK, not the older epoch's.
    assert_eq!(s.failover(), vec![data, fin]);
    assert_eq!(s.counters().replayed, 2);
    // Once only.
    assert!(s.failover().is_empty());
}

#[test]
fn the_replay_keeps_the_newest_segments_and_rewrites_them_for_the_client() {
    let now = Instant::now();
    let mut p = protected();
    let mut s = SecondaryProxy::new();
    s.mirror_epoch(1).unwrap();
    s.checkpoint_loaded(1).unwrap();
    for o in open(&mut p, now) {
        if let Output::SendOffset {
            epoch,
            key,
            guest_dir,
            offset,
        } = o
        {
            s.learn_offset(epoch, key, guest_dir, offset);
        }
    }
    let n = secondary::MAX_REPLAY + 3;
    for i in 0..n {
        let seq = SVM_ISN.wrapping_add(1 + i as u32);
        s.from_svm(guest(seq, ACK_C, ACK | PSH, b"x"));
    }
    let replay = s.failover();
    assert_eq!(replay.len(), n - 3);
    assert_eq!(s.counters().replay_dropped, 3);
    // The newest, in the PVM's (the client's) sequence space.
    assert_eq!(
        replay.last().unwrap(),
        &guest(PVM_ISN + n as u32, ACK_C, ACK | PSH, b"x")
    );
    assert!(checksum_ok(replay.last().unwrap()));
}

#[test]
fn secondary_sends_the_svms_frames_to_the_primary_only() {
    let mut s = SecondaryProxy::new();
    let f = guest(SVM_ISN, 1, ACK, b"x");
    assert_eq!(s.from_svm(f.clone()), SvmTx::ToPrimary(f.clone()));
    assert_eq!(s.from_tap(client(1, 2, ACK, b"")), None);
    let c = s.counters();
    assert_eq!((c.svm_out, c.tap_dropped), (1, 1));
}

#[test]
fn secondary_keeps_offsets_of_its_epoch_only() {
    let key = conn_key(&client(CLIENT_ISN, 0, SYN, b""));
    let mut s = SecondaryProxy::new();
    s.checkpoint_loaded(1).unwrap();
    s.learn_offset(1, key, KeyDir::HiToLo, 10);
    assert_eq!(s.counters().offsets, 1);
    // An offset for the next epoch waits for its load; the current ones end with it.
    s.learn_offset(2, key, KeyDir::HiToLo, 20);
    s.checkpoint_loaded(2).unwrap();
    assert_eq!(s.counters().offsets, 1);
    // One of an epoch that ended is dropped.
    s.learn_offset(1, key, KeyDir::HiToLo, 30);
    assert_eq!(s.counters().offsets_dropped, 1);
    s.failover();
    let f = s.from_tap(client(5, 100, ACK, b"")).unwrap();
    assert_eq!(seq_ack(&f).1, 120);
}

#[test]
fn after_failover_the_secondary_keeps_the_clients_connection() {
    let now = Instant::now();
    let mut p = protected();
    let mut s = SecondaryProxy::new();
    s.mirror_epoch(1).unwrap();
    s.checkpoint_loaded(1).unwrap();
    // The connection opens through the primary; its offset reaches the secondary.
    for o in open(&mut p, now) {
        if let Output::SendOffset {
            epoch,
            key,
            guest_dir,
            offset,
        } = o
        {
            s.learn_offset(epoch, key, guest_dir, offset);
        }
    }
    s.failover();
    // The client acknowledges in the PVM's space; the SVM gets its own numbers.
    let ack = s
        .from_tap(client(CLIENT_ISN + 1, PVM_ISN + 1, ACK | PSH, REQ))
        .unwrap();
    assert_eq!(seq_ack(&ack), (CLIENT_ISN + 1, SVM_ISN.wrapping_add(1)));
    assert!(checksum_ok(&ack));
    // The SVM's reply leaves in the PVM's space, checksum right.
    let SvmTx::ToTap(out) = s.from_svm(guest(SVM_ISN.wrapping_add(1), ACK_C, ACK | PSH, RESP))
    else {
        panic!("not to the tap")
    };
    assert_eq!(out, guest(PVM_ISN + 1, ACK_C, ACK | PSH, RESP));
    assert!(checksum_ok(&out));
    // A retransmitted SYN-ACK of that connection too.
    let SvmTx::ToTap(out) = s.from_svm(guest(SVM_ISN, CLIENT_ISN + 1, SYN | ACK, b"")) else {
        panic!("not to the tap")
    };
    assert_eq!(out, guest(PVM_ISN, CLIENT_ISN + 1, SYN | ACK, b""));
    // Another connection is untouched.
    let other = client_on(40001, 9, 12345, ACK, b"");
    assert_eq!(s.from_tap(other.clone()), Some(other));
    // The client opens anew on the same ports: no offset any more, either way.
    s.from_tap(client(50, 0, SYN, b""));
    let f = guest(SVM_ISN.wrapping_add(1), 51, ACK, b"new");
    assert_eq!(s.from_svm(f.clone()), SvmTx::ToTap(f));
    let f = client(51, SVM_ISN.wrapping_add(1), ACK, b"");
    assert_eq!(s.from_tap(f.clone()), Some(f));
    let c = s.counters();
    assert_eq!((c.svm_rewritten, c.client_rewritten), (2, 1));
    assert_eq!(s.mirrored(client(1, 2, ACK, b"")), None);
}

#[test]
fn offloaded_checksums_are_left_alone() {
    let now = Instant::now();
    let mut p = protected();
    open(&mut p, now);
    let mut req = client(CLIENT_ISN + 1, PVM_ISN + 1, ACK, b"");
    req[0] = VNET_F_NEEDS_CSUM;
    let csum = |f: &[u8]| f[f.len() - 4..f.len() - 2].to_vec();
    let m = p.from_client(&req).unwrap();
    assert_eq!(seq_ack(&m).1, SVM_ISN.wrapping_add(1));
    assert_eq!(csum(&m), csum(&req));
}
