//! Tests of the proxy channel's wire format.
use super::body::*;
use super::*;
use crate::proxy::packet::ETHERTYPE_ARP;
use proptest::prelude::*;
use std::net::Shutdown;
use std::ops::Range;
use std::sync::OnceLock;
use std::time::Instant;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn psk() -> Psk {
    Psk::parse(KEY).unwrap()
}

/// A fresh connection's keys: the primary's, the secondary's.
fn fresh_keys() -> (Arc<SessionKey>, Arc<SessionKey>) {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let k = psk();
    thread::scope(|scope| {
        let t = scope.spawn(|| handshake(&mut b, &k, Side::Secondary).unwrap());
        let p = handshake(&mut a, &k, Side::Primary).unwrap();
        (p, t.join().unwrap())
    })
}

/// One connection's keys for all tests (a handshake per property case would dominate).
fn key_of(side: Side) -> Arc<SessionKey> {
    static KEYS: OnceLock<(Arc<SessionKey>, Arc<SessionKey>)> = OnceLock::new();
    let (p, s) = KEYS.get_or_init(fresh_keys);
    Arc::clone(match side {
        Side::Primary => p,
        Side::Secondary => s,
    })
}

/// What `side` sends for its hello and then `msgs`, and where each frame lies.
fn frames(side: Side, msgs: &[Message<'_>]) -> (Vec<u8>, Vec<Range<usize>>) {
    let mut all = vec![Message::hello(side)];
    all.extend_from_slice(msgs);
    let mut w = FrameWriter::new(Vec::new(), key_of(side), side);
    let mut bounds = Vec::new();
    for m in &all {
        let start = w.get_ref().len();
        w.write(m).unwrap();
        bounds.push(start..w.get_ref().len());
    }
    assert_eq!(w.frames(), all.len() as u64);
    (w.into_inner(), bounds)
}

/// A reader of the frames `from` sent (at the other end).
fn reader_of(from: Side, bytes: &[u8]) -> FrameReader<&[u8]> {
    let side = peer_of(from);
    FrameReader::new(bytes, key_of(side), side)
}

/// A frame with any header fields and body, sealed with `from`'s real key: authentic, so
/// only the checks after the MAC can refuse it.
fn raw(from: Side, seq: u64, code: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    out.extend_from_slice(body);
    seal_frame(&mut out, &key_of(from), seq, code, flags);
    out
}

fn hello_raw(from: Side) -> Vec<u8> {
    raw(from, 0, 1, 0, &[1, 0, role_code(from), 0])
}

/// Reads `frames` as `from`'s: all but the last are accepted, the last is refused, and the
/// reader stays failed. Returns the refusal.
fn refused(from: Side, frames: &[Vec<u8>]) -> WireError {
    let bytes = frames.concat();
    let mut r = reader_of(from, &bytes);
    for _ in 1..frames.len() {
        r.read().unwrap();
    }
    let e = r.read().unwrap_err();
    assert!(matches!(r.read(), Err(WireError::Failed)));
    e
}

fn malformed(e: WireError) -> &'static str {
    match e {
        WireError::Malformed(m) => m,
        other => panic!("not Malformed: {other:?}"),
    }
}

fn packet(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

fn ip(s: &str) -> Addr {
    Addr::Ip(s.parse().unwrap())
}

fn tcp_v4() -> (ConnKey, KeyDir) {
    ConnKey::new(
        [0, 0],
        KeyProto::Tcp,
        (ip("10.0.0.2"), 40000),
        (ip("10.0.0.1"), 80),
    )
}

fn tcp_v6() -> (ConnKey, KeyDir) {
    ConnKey::new(
        [0, 0],
        KeyProto::Tcp,
        (ip("fd00::1"), 443),
        (ip("fd00::2"), 51000),
    )
}

fn tcp_vlan() -> (ConnKey, KeyDir) {
    ConnKey::new(
        [100, 4095],
        KeyProto::Tcp,
        (ip("192.168.7.9"), 22),
        (ip("192.168.7.1"), 60000),
    )
}

fn encoded(key: &ConnKey) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(key, &mut out).unwrap();
    out
}

fn decoded(bytes: &[u8]) -> Result<ConnKey, WireError> {
    let mut f = Fields { bytes };
    let key = decode_key(&mut f)?;
    assert!(f.bytes.is_empty());
    Ok(key)
}

#[test]
fn every_message_round_trips() {
    let pkt = packet(VNET_HDR_LEN + 1514, 7);
    let (k4, d4) = tcp_v4();
    let (k6, d6) = tcp_v6();
    let (kv, dv) = tcp_vlan();
    let from_primary = [
        Message::Mirror { frame: &pkt },
        Message::IsnOffset {
            key: k4,
            guest_dir: d4,
            offset: 1,
            checkpoint: 3,
        },
        Message::IsnOffset {
            key: k6,
            guest_dir: d6,
            offset: u32::MAX,
            checkpoint: 3,
        },
        Message::IsnOffset {
            key: kv,
            guest_dir: dv,
            offset: 0,
            checkpoint: 3,
        },
        Message::Mirror {
            frame: &pkt[..MIN_PACKET_LEN],
        },
        Message::Bye {
            reason: "failover requested",
        },
    ];
    let (bytes, bounds) = frames(Side::Primary, &from_primary);
    // The layout: header + body + MAC.
    assert_eq!(bounds[0].len(), HEADER_LEN + HELLO_LEN + TAG_LEN);
    assert_eq!(bounds[1].len(), HEADER_LEN + pkt.len() + TAG_LEN);
    assert_eq!(bounds[2].len(), HEADER_LEN + 20 + ISN_TAIL_LEN + TAG_LEN);
    assert_eq!(bounds[3].len(), HEADER_LEN + 44 + ISN_TAIL_LEN + TAG_LEN);
    assert_eq!(&bytes[..8], &[4, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(
        &bytes[bounds[1].start + 8..bounds[1].start + 16],
        &[1, 0, 0, 0, 0, 0, 0, 0]
    );
    let mut r = reader_of(Side::Primary, &bytes);
    assert_eq!(r.read().unwrap(), Message::hello(Side::Primary));
    for m in &from_primary {
        assert_eq!(r.read().unwrap(), *m);
    }
    assert_eq!(r.frames(), 7);
    assert!(matches!(r.read(), Err(WireError::Closed)));

    let svm = packet(VNET_HDR_LEN + 60, 9);
    let from_secondary = [
        Message::SvmOutput { frame: &svm },
        Message::Epoch { checkpoint: 1 },
        Message::SvmOutput { frame: &svm[..40] },
        Message::Epoch { checkpoint: 2 },
        Message::Epoch {
            checkpoint: u64::MAX,
        },
        Message::Bye { reason: "" },
    ];
    let (bytes, _) = frames(Side::Secondary, &from_secondary);
    let mut r = reader_of(Side::Secondary, &bytes);
    assert_eq!(r.read().unwrap(), Message::hello(Side::Secondary));
    for m in &from_secondary {
        assert_eq!(r.read().unwrap(), *m);
    }
    assert!(matches!(r.read(), Err(WireError::Closed)));
}

#[test]
fn conn_keys_of_every_kind_round_trip() {
    let mac = |last: u8| Addr::Mac([2, 0, 0, 0, 0, last]);
    let cases = [
        (tcp_v4().0, 20),
        (tcp_v6().0, 44),
        (tcp_vlan().0, 20),
        (
            ConnKey::new(
                [5, 0],
                KeyProto::Udp,
                (ip("fd00::9"), 53),
                (ip("fd00::1"), 3000),
            )
            .0,
            44,
        ),
        (
            ConnKey::new(
                [0, 0],
                KeyProto::Icmp,
                (ip("10.0.0.1"), 9),
                (ip("10.0.0.2"), 9),
            )
            .0,
            20,
        ),
        (
            ConnKey::new(
                [0, 7],
                KeyProto::Icmpv6,
                (ip("fd00::2"), 9),
                (ip("fd00::1"), 9),
            )
            .0,
            44,
        ),
        // A TCP fragment, ICMP under IPv6: other IP protocols.
        (
            ConnKey::new(
                [0, 0],
                KeyProto::Ip(6),
                (ip("10.0.0.1"), 0),
                (ip("10.0.0.2"), 0),
            )
            .0,
            20,
        ),
        (
            ConnKey::new(
                [0, 0],
                KeyProto::Ip(1),
                (ip("fd00::1"), 0),
                (ip("fd00::2"), 0),
            )
            .0,
            44,
        ),
        (
            ConnKey::new(
                [1, 2],
                KeyProto::Ether(ETHERTYPE_ARP),
                (mac(9), 0),
                (mac(1), 0),
            )
            .0,
            24,
        ),
    ];
    for (key, len) in cases {
        let bytes = encoded(&key);
        assert_eq!(bytes.len(), len, "{key}");
        assert_eq!(decoded(&bytes).unwrap(), key);
        for cut in 0..bytes.len() {
            let e = decode_key(&mut Fields {
                bytes: &bytes[..cut],
            })
            .unwrap_err();
            assert_eq!(malformed(e), "body shorter than its fields");
        }
    }
}

#[test]
fn malformed_conn_keys_are_refused() {
    let good = encoded(&tcp_v4().0);
    // vlan 0..4, proto 4, family 5, value 6..8, lo 8..14, hi 14..20.
    let bad = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        edit(&mut b);
        malformed(decoded(&b).unwrap_err())
    };
    assert_eq!(bad(&|b| b[1] = 0x10), "VLAN id above 4095");
    assert_eq!(bad(&|b| b[2..4].fill(0xff)), "VLAN id above 4095");
    assert_eq!(bad(&|b| b[4] = 0), "unknown protocol in a connection key");
    assert_eq!(bad(&|b| b[4] = 7), "unknown protocol in a connection key");
    assert_eq!(
        bad(&|b| b[6] = 1),
        "protocol value set for TCP, UDP or ICMP"
    );
    assert_eq!(bad(&|b| b[5] = 5), "unknown address family");
    assert_eq!(
        bad(&|b| b[5] = FAMILY_MAC),
        "address family does not fit the protocol"
    );
    assert_eq!(
        bad(&|b| b[4] = PROTO_ICMPV6),
        "address family does not fit the protocol"
    );
    assert_eq!(
        bad(&|b| b[4] = PROTO_ETHER),
        "address family does not fit the protocol"
    );
    assert_eq!(bad(&|b| b[4] = PROTO_ICMP), "ICMP key with two echo ids");
    assert_eq!(
        bad(&|b| {
            b[4] = PROTO_IP;
            b[6] = 6;
        }),
        "ports in a key of a protocol without ports"
    );
    assert_eq!(
        bad(&|b| {
            b[4] = PROTO_IP;
            b[7] = 1;
        }),
        "IP protocol above 255"
    );
    assert_eq!(
        bad(&|b| {
            let (lo, hi) = (b[8..14].to_vec(), b[14..20].to_vec());
            b[8..14].copy_from_slice(&hi);
            b[14..20].copy_from_slice(&lo);
        }),
        "connection key endpoints are not in order"
    );
    // Endpoints of two families cannot be written.
    let mixed = ConnKey {
        vlan: [0, 0],
        proto: KeyProto::Tcp,
        lo: (ip("10.0.0.1"), 1),
        hi: (ip("fd00::1"), 2),
    };
    let e = encode_key(&mixed, &mut Vec::new()).unwrap_err();
    assert_eq!(
        malformed(e),
        "connection key endpoints of different address families"
    );
}

#[test]
fn a_flipped_bit_anywhere_is_refused() {
    let (k, d) = tcp_v6();
    let pkt = packet(VNET_HDR_LEN + 60, 1);
    let (bytes, bounds) = frames(
        Side::Primary,
        &[
            Message::Mirror { frame: &pkt },
            Message::IsnOffset {
                key: k,
                guest_dir: d,
                offset: 77,
                checkpoint: 3,
            },
        ],
    );
    for (n, frame) in bounds.iter().enumerate() {
        for bit in frame.start * 8..frame.end * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let mut r = reader_of(Side::Primary, &b);
            for _ in 0..n {
                r.read().unwrap();
            }
            let e = r.read().unwrap_err();
            // Sequence number, body and MAC: only the MAC can tell. Length, type and
            // flags may already fail on their own checks.
            if bit / 8 - frame.start >= 8 {
                assert!(matches!(e, WireError::BadMac { .. }), "bit {bit}: {e:?}");
            }
            assert!(matches!(r.read(), Err(WireError::Failed)));
        }
    }
}

#[test]
fn replayed_reordered_and_dropped_frames_are_refused() {
    let (a, b) = (packet(80, 1), packet(80, 2));
    let (bytes, bounds) = frames(
        Side::Primary,
        &[Message::Mirror { frame: &a }, Message::Mirror { frame: &b }],
    );
    let frame = |i: usize| bytes[bounds[i].clone()].to_vec();
    // Sends the frames in `order`: how many are accepted, and the refusal.
    let seq_error = |order: &[usize]| {
        let sent: Vec<u8> = order.iter().flat_map(|&i| frame(i)).collect();
        let mut r = reader_of(Side::Primary, &sent);
        let mut accepted = 0;
        loop {
            match r.read() {
                Ok(_) => accepted += 1,
                Err(WireError::Sequence { expected, got }) => return (accepted, expected, got),
                Err(e) => panic!("{order:?}: {e:?}"),
            }
        }
    };
    assert_eq!(seq_error(&[0, 1, 1, 2]), (2, 2, 1), "replay");
    assert_eq!(seq_error(&[0, 0, 1]), (1, 1, 0), "hello replayed");
    assert_eq!(seq_error(&[0, 2, 1]), (1, 1, 2), "reorder");
    assert_eq!(seq_error(&[0, 2]), (1, 1, 2), "drop");
    assert_eq!(seq_error(&[1, 0]), (0, 0, 1), "hello dropped");
}

#[test]
fn another_key_or_a_reflected_frame_is_refused() {
    let (other_primary, other_secondary) = fresh_keys();
    let (bytes, _) = frames(Side::Primary, &[]);
    // Our primary's frames under another connection's keys.
    let mut r = FrameReader::new(&bytes[..], other_secondary, Side::Secondary);
    assert!(matches!(r.read(), Err(WireError::BadMac { seq: 0 })));
    // Another connection's frames under ours.
    let mut w = FrameWriter::new(Vec::new(), other_primary, Side::Primary);
    w.write(&Message::hello(Side::Primary)).unwrap();
    let mut r = reader_of(Side::Primary, w.get_ref());
    assert!(matches!(r.read(), Err(WireError::BadMac { seq: 0 })));
    // The primary's own frames sent back to it.
    let mut r = FrameReader::new(&bytes[..], key_of(Side::Primary), Side::Primary);
    assert!(matches!(r.read(), Err(WireError::BadMac { seq: 0 })));
}

#[test]
fn too_large_is_refused_from_the_header_without_allocating() {
    // A header claiming 4 GiB; the peer stays open and sends nothing more.
    let (mut a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header.extend_from_slice(&MsgType::Mirror.code().to_le_bytes());
    header.extend_from_slice(&[0; 10]);
    a.write_all(&header).unwrap();
    let mut r = FrameReader::new(b, key_of(Side::Secondary), Side::Secondary);
    let t0 = Instant::now();
    let e = r.read().unwrap_err();
    assert!(
        matches!(e, WireError::TooLarge { ty: MsgType::Mirror, len, max: MAX_PACKET_LEN }
            if len == u32::MAX as usize),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(r.buf.capacity() <= HEADER_LEN, "{}", r.buf.capacity());
    assert!(matches!(r.read(), Err(WireError::Failed)));
    drop(a);

    // Every type: one byte over its limit is refused from the header alone; at the limit
    // the frame is read (and its MAC of zeros fails).
    for ty in MsgType::ALL {
        let max = ty.max_body();
        let mut over = vec![0; HEADER_LEN];
        over[..4].copy_from_slice(&(max as u32 + 1).to_le_bytes());
        over[4..6].copy_from_slice(&ty.code().to_le_bytes());
        let e = refused(Side::Primary, &[over]);
        assert!(
            matches!(e, WireError::TooLarge { ty: t, len, max: m } if t == ty && len == max + 1 && m == max),
            "{ty}: {e:?}"
        );
        let mut at = vec![0; HEADER_LEN + max + TAG_LEN];
        at[..4].copy_from_slice(&(max as u32).to_le_bytes());
        at[4..6].copy_from_slice(&ty.code().to_le_bytes());
        let e = refused(Side::Primary, &[at]);
        assert!(matches!(e, WireError::BadMac { seq: 0 }), "{ty}: {e:?}");
    }
    assert_eq!(MAX_PACKET_LEN, 65_609);
}

#[test]
fn bad_headers_are_refused_before_the_body() {
    let e = refused(Side::Primary, &[raw(Side::Primary, 0, 0, 0, &[])]);
    assert!(matches!(e, WireError::UnknownType(0)), "{e:?}");
    let e = refused(Side::Primary, &[raw(Side::Primary, 0, 12, 0, &[])]);
    assert!(matches!(e, WireError::UnknownType(12)), "{e:?}");
    let e = refused(
        Side::Primary,
        &[raw(Side::Primary, 0, 1, 0x8000, &[1, 0, 1, 0])],
    );
    assert!(matches!(e, WireError::Flags(0x8000)), "{e:?}");
}

#[test]
fn authentic_but_malformed_frames_are_refused() {
    use Side::{Primary as P, Secondary as S};
    let hp = hello_raw(P);
    let hs = hello_raw(S);
    let pkt = packet(100, 3);
    let isn = |key: &ConnKey, tail: &[u8]| {
        let mut b = encoded(key);
        b.extend_from_slice(tail);
        b
    };
    let udp = ConnKey::new(
        [0, 0],
        KeyProto::Udp,
        (ip("10.0.0.1"), 1),
        (ip("10.0.0.2"), 2),
    )
    .0;
    let tcp = tcp_v4().0;
    let cases: Vec<(Side, Vec<Vec<u8>>, &str)> = vec![
        (
            P,
            vec![raw(P, 0, 3, 0, &pkt)],
            "the first frame is not a hello",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 1, 0, &[1, 0, 1, 0])],
            "a second hello",
        ),
        (
            P,
            vec![raw(P, 0, 1, 0, &[1, 0, 1, 0, 0])],
            "hello of the wrong length",
        ),
        (
            P,
            vec![raw(P, 0, 1, 0, &[1])],
            "body shorter than its fields",
        ),
        (
            P,
            vec![raw(P, 0, 1, 0, &[1, 0, 2, 0])],
            "the hello names the wrong role",
        ),
        (
            P,
            vec![raw(P, 0, 1, 0, &[1, 0, 3, 0])],
            "hello with an invalid role",
        ),
        (
            P,
            vec![raw(P, 0, 1, 0, &[1, 0, 1, 1])],
            "hello reserved byte is not zero",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 3, 0, &pkt[..MIN_PACKET_LEN - 1])],
            "packet shorter than a vnet header and an Ethernet header",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 2, 0, &[0xff])],
            "bye reason is not UTF-8",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 2, 0, b"bye\x07")],
            "bye reason has a control character",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 2, 0, b"done"), raw(P, 2, 3, 0, &pkt)],
            "a frame after bye",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 5, 0, &isn(&udp, &[0, 1, 0, 0, 0]))],
            "ISN offset of a connection that is not TCP",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 5, 0, &isn(&tcp, &[2, 1, 0, 0, 0]))],
            "unknown direction",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 5, 0, &isn(&tcp, &[0; 12]))],
            "body shorter than its fields",
        ),
        (
            P,
            vec![hp.clone(), raw(P, 1, 5, 0, &isn(&tcp, &[0; 14]))],
            "bytes after the message",
        ),
        (
            S,
            vec![hs.clone(), raw(S, 1, 6, 0, &0u64.to_le_bytes())],
            "epoch does not advance",
        ),
        (
            S,
            vec![
                hs.clone(),
                raw(S, 1, 6, 0, &5u64.to_le_bytes()),
                raw(S, 2, 6, 0, &5u64.to_le_bytes()),
            ],
            "epoch does not advance",
        ),
        (
            S,
            vec![hs.clone(), raw(S, 1, 6, 0, &[1; 7])],
            "body shorter than its fields",
        ),
    ];
    for (from, sent, why) in cases {
        assert_eq!(malformed(refused(from, &sent)), why);
    }
    // Messages of the other side's role.
    let e = refused(P, &[hp.clone(), raw(P, 1, 4, 0, &pkt)]);
    assert!(
        matches!(e, WireError::WrongDirection(MsgType::SvmOutput)),
        "{e:?}"
    );
    // The primary marks epochs too (its mirrored frames), and its numbers must advance.
    let e = refused(
        P,
        &[
            hp,
            raw(P, 1, 6, 0, &2u64.to_le_bytes()),
            raw(P, 2, 6, 0, &1u64.to_le_bytes()),
        ],
    );
    assert_eq!(malformed(e), "epoch does not advance");
    let e = refused(S, &[hs, raw(S, 1, 3, 0, &pkt)]);
    assert!(
        matches!(e, WireError::WrongDirection(MsgType::Mirror)),
        "{e:?}"
    );
    // Another version, even with a longer hello.
    let e = refused(P, &[raw(P, 0, 1, 0, &[2, 0, 1, 0, 9, 9])]);
    assert!(matches!(e, WireError::Version(2)), "{e:?}");
}

#[test]
fn the_writer_refuses_what_the_reader_would_and_stays_usable() {
    let pkt = packet(100, 5);
    let mut w = FrameWriter::new(Vec::new(), key_of(Side::Primary), Side::Primary);
    let e = w.write(&Message::Mirror { frame: &pkt }).unwrap_err();
    assert_eq!(malformed(e), "the first frame is not a hello");
    let e = w
        .write(&Message::Hello {
            version: 2,
            role: Side::Primary,
        })
        .unwrap_err();
    assert!(matches!(e, WireError::Version(2)), "{e:?}");
    let e = w.write(&Message::hello(Side::Secondary)).unwrap_err();
    assert_eq!(malformed(e), "the hello names the wrong role");
    assert!(w.get_ref().is_empty());
    w.write(&Message::hello(Side::Primary)).unwrap();
    // Both sides mark epochs; each side's numbers must advance.
    w.write(&Message::Epoch { checkpoint: 1 }).unwrap();
    let e = w.write(&Message::Epoch { checkpoint: 1 }).unwrap_err();
    assert_eq!(malformed(e), "epoch does not advance");
    let after_hello = w.get_ref().len();

    let e = w.write(&Message::SvmOutput { frame: &pkt }).unwrap_err();
    assert!(
        matches!(e, WireError::WrongDirection(MsgType::SvmOutput)),
        "{e:?}"
    );
    let huge = packet(MAX_PACKET_LEN + 1, 0);
    let e = w.write(&Message::Mirror { frame: &huge }).unwrap_err();
    assert!(
        matches!(e, WireError::TooLarge { ty: MsgType::Mirror, len, max: MAX_PACKET_LEN } if len == huge.len()),
        "{e:?}"
    );
    let e = w
        .write(&Message::Mirror {
            frame: &pkt[..MIN_PACKET_LEN - 1],
        })
        .unwrap_err();
    assert_eq!(
        malformed(e),
        "packet shorter than a vnet header and an Ethernet header"
    );
    let long = "x".repeat(MAX_BYE_REASON + 1);
    let e = w.write(&Message::Bye { reason: &long }).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::TooLarge {
                ty: MsgType::Bye,
                ..
            }
        ),
        "{e:?}"
    );
    let e = w.write(&Message::Bye { reason: "a\nb" }).unwrap_err();
    assert_eq!(malformed(e), "bye reason has a control character");
    let (mut key, dir) = tcp_v4();
    key.vlan[0] = 4096;
    let e = w
        .write(&Message::IsnOffset {
            key,
            guest_dir: dir,
            offset: 1,
            checkpoint: 3,
        })
        .unwrap_err();
    assert_eq!(malformed(e), "VLAN id above 4095");
    key.vlan[0] = 0;
    key.proto = KeyProto::Udp;
    let e = w
        .write(&Message::IsnOffset {
            key,
            guest_dir: dir,
            offset: 1,
            checkpoint: 3,
        })
        .unwrap_err();
    assert_eq!(malformed(e), "ISN offset of a connection that is not TCP");
    let e = w.write(&Message::hello(Side::Primary)).unwrap_err();
    assert_eq!(malformed(e), "a second hello");
    // Nothing of the refused messages went out, and the writer goes on.
    assert_eq!(w.get_ref().len(), after_hello);
    assert_eq!(w.frames(), 2, "the hello and one epoch mark");
    let max = packet(MAX_PACKET_LEN, 1);
    w.write(&Message::Mirror { frame: &max }).unwrap();
    w.write(&Message::Bye { reason: "done" }).unwrap();
    let e = w.write(&Message::Mirror { frame: &pkt }).unwrap_err();
    assert_eq!(malformed(e), "a frame after bye");
    let mut r = reader_of(Side::Primary, w.get_ref());
    assert_eq!(r.read().unwrap(), Message::hello(Side::Primary));
    assert_eq!(r.read().unwrap(), Message::Epoch { checkpoint: 1 });
    assert_eq!(r.read().unwrap(), Message::Mirror { frame: &max });
    assert_eq!(r.read().unwrap(), Message::Bye { reason: "done" });
    assert!(matches!(r.read(), Err(WireError::Closed)));

    let mut w = FrameWriter::new(Vec::new(), key_of(Side::Secondary), Side::Secondary);
    w.write(&Message::hello(Side::Secondary)).unwrap();
    let e = w.write(&Message::Epoch { checkpoint: 0 }).unwrap_err();
    assert_eq!(malformed(e), "epoch does not advance");
    w.write(&Message::Epoch { checkpoint: 3 }).unwrap();
    for n in [3, 2] {
        let e = w.write(&Message::Epoch { checkpoint: n }).unwrap_err();
        assert_eq!(malformed(e), "epoch does not advance");
    }
    w.write(&Message::Epoch { checkpoint: 4 }).unwrap();
    let e = w.write(&Message::Mirror { frame: &pkt }).unwrap_err();
    assert!(
        matches!(e, WireError::WrongDirection(MsgType::Mirror)),
        "{e:?}"
    );
}

#[test]
fn truncated_input_is_closed_or_eof_never_a_panic() {
    let pkt = packet(90, 4);
    let (bytes, bounds) = frames(
        Side::Primary,
        &[
            Message::Mirror { frame: &pkt },
            Message::Bye { reason: "done" },
        ],
    );
    for cut in 0..=bytes.len() {
        let mut r = reader_of(Side::Primary, &bytes[..cut]);
        let whole = bounds.iter().filter(|b| b.end <= cut).count();
        for _ in 0..whole {
            r.read().unwrap();
        }
        let e = r.read().unwrap_err();
        if cut == 0 || bounds.iter().any(|b| b.end == cut) {
            assert!(matches!(e, WireError::Closed), "cut {cut}: {e:?}");
        } else {
            assert!(
                matches!(&e, WireError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof),
                "cut {cut}: {e:?}"
            );
        }
    }
}

#[test]
fn a_timeout_keeps_the_partial_frame() {
    let (mut a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
    let pkt = packet(200, 6);
    let (bytes, bounds) = frames(Side::Primary, &[Message::Mirror { frame: &pkt }]);
    let end0 = bounds[0].end;
    let mut r = FrameReader::new(b, key_of(Side::Secondary), Side::Secondary);
    assert!(r.read().unwrap_err().is_timeout(), "between frames");
    for part in [0..5, 5..20, 20..end0 - 1] {
        a.write_all(&bytes[part]).unwrap();
        assert!(r.read().unwrap_err().is_timeout());
    }
    a.write_all(&bytes[end0 - 1..end0 + 10]).unwrap();
    assert_eq!(r.read().unwrap(), Message::hello(Side::Primary));
    assert!(r.read().unwrap_err().is_timeout(), "inside the next header");
    a.write_all(&bytes[end0 + 10..]).unwrap();
    assert_eq!(r.read().unwrap(), Message::Mirror { frame: &pkt });
    drop(a);
    assert!(matches!(r.read(), Err(WireError::Closed)));
}

#[test]
fn a_stream_pair_carries_both_directions() {
    let ((mut pr, mut pw), (mut sr, mut sw)) = stream_pair(&psk(), Duration::from_secs(5)).unwrap();
    assert_eq!(
        (pr.frames(), pw.frames(), sr.frames(), sw.frames()),
        (1, 1, 1, 1)
    );
    let big = packet(MAX_PACKET_LEN, 3);
    let (key, guest_dir) = tcp_vlan();
    thread::scope(|scope| {
        scope.spawn(|| {
            pw.write(&Message::Mirror { frame: &big }).unwrap();
            pw.write(&Message::IsnOffset {
                key,
                guest_dir,
                offset: 12345,
                checkpoint: 3,
            })
            .unwrap();
        });
        assert_eq!(sr.read().unwrap(), Message::Mirror { frame: &big });
        assert_eq!(
            sr.read().unwrap(),
            Message::IsnOffset {
                key,
                guest_dir,
                offset: 12345,
                checkpoint: 3
            }
        );
    });
    let svm = packet(64, 8);
    sw.write(&Message::SvmOutput { frame: &svm }).unwrap();
    sw.write(&Message::Epoch { checkpoint: 1 }).unwrap();
    sw.write(&Message::Bye { reason: "stopping" }).unwrap();
    sw.get_ref().shutdown(Shutdown::Write).unwrap();
    assert_eq!(pr.read().unwrap(), Message::SvmOutput { frame: &svm });
    assert_eq!(pr.read().unwrap(), Message::Epoch { checkpoint: 1 });
    assert_eq!(pr.read().unwrap(), Message::Bye { reason: "stopping" });
    assert!(matches!(pr.read(), Err(WireError::Closed)));
}

fn vlan() -> impl Strategy<Value = [u16; 2]> {
    (0u16..4096, 0u16..4096).prop_map(|(a, b)| [a, b])
}

fn ips() -> impl Strategy<Value = (IpAddr, IpAddr)> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<[u8; 4]>()).prop_map(|(a, b)| (a.into(), b.into())),
        (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(a, b)| (a.into(), b.into())),
    ]
}

fn tcp_key() -> impl Strategy<Value = (ConnKey, KeyDir)> {
    (vlan(), ips(), any::<u16>(), any::<u16>()).prop_map(|(v, (a, b), pa, pb)| {
        ConnKey::new(v, KeyProto::Tcp, (Addr::Ip(a), pa), (Addr::Ip(b), pb))
    })
}

/// Keys as the frame parser makes them, of every kind.
fn any_key() -> impl Strategy<Value = ConnKey> {
    let ipk = |v, p, (a, b): (IpAddr, IpAddr), pa, pb| {
        ConnKey::new(v, p, (Addr::Ip(a), pa), (Addr::Ip(b), pb)).0
    };
    prop_oneof![
        (vlan(), ips(), any::<bool>(), any::<u16>(), any::<u16>()).prop_map(
            move |(v, ab, udp, pa, pb)| {
                let p = if udp { KeyProto::Udp } else { KeyProto::Tcp };
                ipk(v, p, ab, pa, pb)
            }
        ),
        (vlan(), any::<[u8; 4]>(), any::<[u8; 4]>(), any::<u16>())
            .prop_map(move |(v, a, b, id)| ipk(v, KeyProto::Icmp, (a.into(), b.into()), id, id)),
        (vlan(), any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u16>())
            .prop_map(move |(v, a, b, id)| ipk(v, KeyProto::Icmpv6, (a.into(), b.into()), id, id)),
        (vlan(), ips(), any::<u8>()).prop_map(move |(v, ab, n)| ipk(v, KeyProto::Ip(n), ab, 0, 0)),
        (vlan(), any::<[u8; 6]>(), any::<[u8; 6]>(), any::<u16>()).prop_map(|(v, a, b, t)| {
            ConnKey::new(v, KeyProto::Ether(t), (Addr::Mac(a), 0), (Addr::Mac(b), 0)).0
        }),
    ]
}

/// A message, owned, for generating sequences of them.
#[derive(Clone, Debug)]
enum Spec {
    Mirror(Vec<u8>),
    Svm(Vec<u8>),
    Isn(ConnKey, KeyDir, u32),
    /// The step from the previous epoch.
    Epoch(u64),
}

fn spec() -> impl Strategy<Value = Spec> {
    let pkt = || proptest::collection::vec(any::<u8>(), MIN_PACKET_LEN..400);
    prop_oneof![
        pkt().prop_map(Spec::Mirror),
        pkt().prop_map(Spec::Svm),
        (tcp_key(), any::<u32>()).prop_map(|((k, d), o)| Spec::Isn(k, d, o)),
        (1u64..1000).prop_map(Spec::Epoch),
    ]
}

fn sample_stream() -> (Vec<u8>, Vec<Range<usize>>) {
    let (k, d) = tcp_vlan();
    let pkt = packet(100, 11);
    frames(
        Side::Primary,
        &[
            Message::Mirror { frame: &pkt },
            Message::IsnOffset {
                key: k,
                guest_dir: d,
                offset: 5,
                checkpoint: 3,
            },
            Message::Bye { reason: "done" },
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every key the parser can make is written and read back unchanged.
    #[test]
    fn keys_round_trip(key in any_key()) {
        let bytes = encoded(&key);
        let len = match key.lo.0 {
            Addr::Ip(IpAddr::V4(_)) => 20,
            Addr::Ip(IpAddr::V6(_)) => 44,
            Addr::Mac(_) => 24,
        };
        prop_assert_eq!(bytes.len(), len);
        prop_assert_eq!(decoded(&bytes).unwrap(), key);
    }

    /// Arbitrary messages, both ways, arrive as they were sent, then the stream ends.
    #[test]
    fn messages_round_trip(
        specs in proptest::collection::vec(spec(), 0..12),
        bye_p in proptest::option::of("[^\\p{Cc}]{0,40}"),
        bye_s in proptest::option::of("[^\\p{Cc}]{0,40}"),
    ) {
        let mut from_p = Vec::new();
        let mut from_s = Vec::new();
        let mut epoch = 0;
        for s in &specs {
            match s {
                Spec::Mirror(frame) => from_p.push(Message::Mirror { frame }),
                Spec::Svm(frame) => from_s.push(Message::SvmOutput { frame }),
                Spec::Isn(key, guest_dir, offset) => from_p.push(Message::IsnOffset {
                    key: *key,
                    guest_dir: *guest_dir,
                    offset: *offset,
                    checkpoint: 3,
                }),
                Spec::Epoch(step) => {
                    epoch += step;
                    from_s.push(Message::Epoch { checkpoint: epoch });
                }
            }
        }
        if let Some(reason) = &bye_p {
            from_p.push(Message::Bye { reason });
        }
        if let Some(reason) = &bye_s {
            from_s.push(Message::Bye { reason });
        }
        for (side, msgs) in [(Side::Primary, &from_p), (Side::Secondary, &from_s)] {
            let (bytes, _) = frames(side, msgs);
            let mut r = reader_of(side, &bytes);
            prop_assert_eq!(r.read().unwrap(), Message::hello(side));
            for m in msgs {
                prop_assert_eq!(r.read().unwrap(), *m);
            }
            prop_assert!(matches!(r.read(), Err(WireError::Closed)));
        }
    }

    /// Arbitrary bytes never panic the reader and never give a message.
    #[test]
    fn arbitrary_bytes_never_yield_a_message(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        primary in any::<bool>(),
    ) {
        let side = if primary { Side::Primary } else { Side::Secondary };
        let mut r = FrameReader::new(&bytes[..], key_of(side), side);
        for _ in 0..3 {
            prop_assert!(r.read().is_err());
        }
    }

    /// Frames whose header passes (known type, no flags, a length within the limit) and
    /// whose body and MAC are arbitrary never give a message either.
    #[test]
    fn plausible_frames_never_yield_a_message(
        code in 1u16..=6,
        len in 0u32..80,
        seq in prop_oneof![Just(0u64), any::<u64>()],
        rest in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&code.to_le_bytes());
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&seq.to_le_bytes());
        bytes.extend_from_slice(&rest);
        let mut r = reader_of(Side::Primary, &bytes);
        prop_assert!(r.read().is_err());
        prop_assert!(matches!(r.read(), Err(WireError::Failed)));
    }

    /// A good stream damaged at one byte gives exactly the frames before the damage.
    #[test]
    fn damage_stops_the_stream_at_the_damaged_frame(
        at in any::<proptest::sample::Index>(),
        x in 1u8..=255,
    ) {
        let (good, bounds) = sample_stream();
        let mut bytes = good.clone();
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        let damaged = bounds.iter().position(|b| b.contains(&i)).unwrap();
        let mut clean = reader_of(Side::Primary, &good);
        let mut r = reader_of(Side::Primary, &bytes);
        for _ in 0..damaged {
            prop_assert_eq!(r.read().unwrap(), clean.read().unwrap());
        }
        prop_assert!(r.read().is_err());
    }
}

#[test]
fn queued_frames_leave_on_flush_and_read_back_in_order() {
    let side = Side::Secondary;
    let mut w = FrameWriter::new(
        std::io::BufWriter::with_capacity(1 << 16, Vec::new()),
        key_of(side),
        side,
    );
    w.queue(&Message::hello(side)).unwrap();
    let outputs: Vec<Vec<u8>> = (0..3).map(|i| packet(100 + i, i as u8)).collect();
    for p in &outputs {
        w.queue(&Message::SvmOutput { frame: p }).unwrap();
    }
    assert!(
        w.get_ref().get_ref().is_empty(),
        "nothing written before the flush"
    );
    w.flush().unwrap();
    let bytes = w.into_inner().into_inner().unwrap();
    let mut r = reader_of(side, &bytes);
    assert_eq!(r.read().unwrap(), Message::hello(side));
    for p in &outputs {
        assert_eq!(r.read().unwrap(), Message::SvmOutput { frame: p });
    }
}

/// `msgs` as `side` sends them on a disk channel (after its hello).
fn disk_frames(side: Side, msgs: &[Message<'_>]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new(), key_of(side), side).on(Channel::Disk);
    w.write(&Message::hello(side)).unwrap();
    for m in msgs {
        w.write(m).unwrap();
    }
    w.into_inner()
}

#[test]
fn the_disk_channel_carries_its_messages_and_refuses_the_proxys() {
    let data = packet(MAX_DISK_CHUNK, 5);
    let sent = [
        Message::DiskInfo {
            disk: 1,
            size: 1 << 30,
        },
        Message::DiskWrite {
            disk: 1,
            offset: 4096,
            data: &data,
        },
        Message::DiskZeroes {
            disk: 0,
            offset: 0,
            len: 512,
        },
        Message::Epoch { checkpoint: 1 },
    ];
    let bytes = disk_frames(Side::Primary, &sent);
    let mut r =
        FrameReader::new(&bytes[..], key_of(Side::Secondary), Side::Secondary).on(Channel::Disk);
    assert!(matches!(r.read().unwrap(), Message::Hello { .. }));
    for m in &sent {
        assert_eq!(&r.read().unwrap(), m);
    }
    let back = [
        Message::DiskHashes {
            disk: 1,
            total: 60,
            chunk: b"part",
        },
        Message::DiskAck { writes: 2 },
        Message::DiskAck { writes: 5 },
    ];
    let bytes = disk_frames(Side::Secondary, &back);
    let mut r =
        FrameReader::new(&bytes[..], key_of(Side::Primary), Side::Primary).on(Channel::Disk);
    r.read().unwrap();
    for m in &back {
        assert_eq!(&r.read().unwrap(), m);
    }
    // The proxy's messages are not the disk channel's, and the other way round; the writer
    // refuses what the reader would.
    let mut w =
        FrameWriter::new(Vec::new(), key_of(Side::Primary), Side::Primary).on(Channel::Disk);
    w.write(&Message::hello(Side::Primary)).unwrap();
    let frame = packet(64, 1);
    assert!(matches!(
        w.write(&Message::Mirror { frame: &frame }),
        Err(WireError::WrongChannel(MsgType::Mirror, Channel::Disk))
    ));
    let mut w = FrameWriter::new(Vec::new(), key_of(Side::Primary), Side::Primary);
    w.write(&Message::hello(Side::Primary)).unwrap();
    assert!(matches!(
        w.write(&Message::DiskInfo { disk: 0, size: 1 }),
        Err(WireError::WrongChannel(MsgType::DiskInfo, Channel::Proxy))
    ));
    // The barrier is the primary's only; acks only advance; empty writes mean nothing.
    let mut w =
        FrameWriter::new(Vec::new(), key_of(Side::Secondary), Side::Secondary).on(Channel::Disk);
    w.write(&Message::hello(Side::Secondary)).unwrap();
    assert!(matches!(
        w.write(&Message::Epoch { checkpoint: 1 }),
        Err(WireError::WrongDirection(MsgType::Epoch))
    ));
    w.write(&Message::DiskAck { writes: 3 }).unwrap();
    assert!(matches!(
        w.write(&Message::DiskAck { writes: 3 }),
        Err(WireError::Malformed(_))
    ));
    let mut w =
        FrameWriter::new(Vec::new(), key_of(Side::Primary), Side::Primary).on(Channel::Disk);
    w.write(&Message::hello(Side::Primary)).unwrap();
    for bad in [
        Message::DiskWrite {
            disk: 0,
            offset: 0,
            data: &[],
        },
        Message::DiskWrite {
            disk: 0,
            offset: u64::MAX,
            data: b"x",
        },
        Message::DiskZeroes {
            disk: 0,
            offset: 8,
            len: 0,
        },
    ] {
        assert!(
            matches!(w.write(&bad), Err(WireError::Malformed(_))),
            "{bad:?}"
        );
    }
    let too_big = packet(MAX_DISK_CHUNK + 1, 2);
    assert!(matches!(
        w.write(&Message::DiskWrite {
            disk: 0,
            offset: 0,
            data: &too_big
        }),
        Err(WireError::TooLarge { .. })
    ));
}
