//! The compare on captured traffic: a real session between a Linux client and the test guest
//! (`testdata/guest-session.pcap`: ARP, a 30 000-byte HTTP download, three redis-cli
//! sessions; Linux's segments carry timestamps and SACK-permitted options, the guest's do
//! not), recorded on the client's side of the switch. The guest's frames are the PVM's output;
//! the SVM's output is the same byte streams sent differently — other IP ids and TTLs, every
//! data segment split in two, segments of a connection reordered — which must all match,
//! while one byte changed anywhere must ask for a checkpoint.

use super::super::packet::testframes::{tcp_segment, Spec};
use super::super::packet::{self, Net, Transport, IPPROTO_TCP};
use super::*;
use std::net::{IpAddr, Ipv4Addr};

const CAPTURE: &[u8] = include_bytes!("testdata/guest-session.pcap");
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);

/// The frames of a classic little-endian pcap file.
fn pcap_frames(file: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(
        &file[..4],
        &0xa1b2_c3d4u32.to_le_bytes(),
        "a little-endian pcap"
    );
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let len = u32::from_le_bytes(file[at + 8..at + 12].try_into().unwrap()) as usize;
        frames.push(file[at + 16..at + 16 + len].to_vec());
        at += 16 + len;
    }
    frames
}

/// The guest's frames, in capture order.
fn guest_frames() -> Vec<Vec<u8>> {
    pcap_frames(CAPTURE)
        .into_iter()
        .filter(|f| match packet::parse(f) {
            Ok(p) => match p.net {
                Net::Ip(ip) => ip.header.src() == IpAddr::V4(GUEST),
                // ARP and the like: the guest's if it comes from the guest's MAC.
                Net::Other(_) => f[6..12] == pcap_guest_mac(),
            },
            Err(_) => false,
        })
        .collect()
}

/// The guest's MAC: the source of its first IP frame.
fn pcap_guest_mac() -> [u8; 6] {
    pcap_frames(CAPTURE)
        .iter()
        .find_map(|f| match packet::parse(f).ok()?.net {
            Net::Ip(ip) if ip.header.src() == IpAddr::V4(GUEST) => f[6..12].try_into().ok(),
            _ => None,
        })
        .expect("the capture has a frame from the guest")
}

/// How the SVM re-sends one of the guest's frames: TCP rebuilt with another IP id and TTL
/// and no options, its payload in `pieces` segments; anything else as captured.
fn resend(frame: &[u8], pieces: usize, id: u32) -> Vec<Vec<u8>> {
    let Ok(p) = packet::parse(frame) else {
        return vec![frame.to_vec()];
    };
    let (Net::Ip(ip), IpAddr::V4(client)) = (p.net, ip_dst(&p)) else {
        return vec![frame.to_vec()];
    };
    let Transport::Tcp(t) = ip.transport else {
        return vec![frame.to_vec()];
    };
    let spec = Spec {
        src: IpAddr::V4(GUEST),
        dst: IpAddr::V4(client),
        ttl: 63,
        ip_id: id,
        ..Spec::v4()
    };
    let payload = t.payload();
    let n = pieces.clamp(1, payload.len().max(1));
    let step = payload.len().div_ceil(n).max(1);
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let end = (off + step).min(payload.len());
        let last = end == payload.len();
        // FIN and PSH belong to the last piece only.
        let flags = if last {
            t.flags()
        } else {
            t.flags() & !(packet::tcp_flags::FIN | packet::tcp_flags::PSH)
        };
        let seg = tcp_segment(
            &spec,
            t.src_port(),
            t.dst_port(),
            t.seq().wrapping_add(off as u32),
            t.ack(),
            flags,
            &[],
            &payload[off..end],
        );
        out.push(packet::testframes::ip_frame(&spec, IPPROTO_TCP, &seg));
        if last {
            break;
        }
        off = end;
    }
    out
}

fn ip_dst(p: &packet::Frame<'_>) -> IpAddr {
    match &p.net {
        Net::Ip(ip) => ip.header.dst(),
        Net::Other(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

fn vnet(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0; DEFAULT_VNET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}

/// Feeds the PVM's frames and the SVM's (`svm`), interleaved PVM first; returns the frames
/// released and the checkpoints asked for.
fn run(pvm: &[Vec<u8>], svm: &[Vec<u8>]) -> (usize, Vec<MismatchReason>) {
    let mut c = ColoCompare::new(CompareConfig::default());
    let now = Instant::now();
    let mut actions = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < pvm.len() || j < svm.len() {
        if i < pvm.len() {
            actions.extend(c.primary(now, vnet(&pvm[i])));
            i += 1;
        }
        for _ in 0..2 {
            if j < svm.len() {
                actions.extend(c.secondary(now, vnet(&svm[j])));
                j += 1;
            }
        }
    }
    let released = actions
        .iter()
        .filter(|a| matches!(a, Action::Release(_)))
        .count();
    let checkpoints = actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Checkpoint(r) => Some(r),
            Action::Release(_) => None,
        })
        .collect();
    (released, checkpoints)
}

#[test]
fn the_capture_holds_a_real_session() {
    let guest = guest_frames();
    let data: usize = guest
        .iter()
        .filter_map(|f| match packet::parse(f).ok()?.net {
            Net::Ip(ip) => match ip.transport {
                Transport::Tcp(t) => Some(t.payload().len()),
                _ => None,
            },
            Net::Other(_) => None,
        })
        .sum();
    assert!(guest.len() >= 20, "{} guest frames", guest.len());
    assert!(data > 30_000, "{data} bytes of guest TCP payload");
}

#[test]
fn the_same_streams_sent_differently_match() {
    let pvm = guest_frames();
    let svm: Vec<Vec<u8>> = pvm
        .iter()
        .enumerate()
        .flat_map(|(i, f)| resend(f, 2, 40_000 + i as u32))
        .collect();
    assert!(svm.len() > pvm.len(), "data segments were split");
    let (released, checkpoints) = run(&pvm, &svm);
    assert!(checkpoints.is_empty(), "{checkpoints:?}");
    assert_eq!(released, pvm.len(), "every PVM frame released on a match");
}

#[test]
fn reordered_segments_of_the_svm_still_match() {
    let pvm = guest_frames();
    let mut svm: Vec<Vec<u8>> = pvm
        .iter()
        .enumerate()
        .flat_map(|(i, f)| resend(f, 3, i as u32))
        .collect();
    // Swap neighbours pairwise: within a connection, later data arrives first.
    for pair in svm.chunks_mut(2) {
        pair.reverse();
    }
    let (released, checkpoints) = run(&pvm, &svm);
    assert!(checkpoints.is_empty(), "{checkpoints:?}");
    assert_eq!(released, pvm.len());
}

#[test]
fn one_changed_byte_anywhere_in_the_data_asks_for_a_checkpoint() {
    let pvm = guest_frames();
    let data_frames: Vec<usize> = pvm
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            matches!(packet::parse(f).map(|p| p.net), Ok(Net::Ip(ip))
                if matches!(ip.transport, Transport::Tcp(t) if !t.payload().is_empty()))
        })
        .map(|(i, _)| i)
        .collect();
    assert!(data_frames.len() >= 5);
    for &victim in &data_frames {
        let svm: Vec<Vec<u8>> = pvm
            .iter()
            .enumerate()
            .flat_map(|(i, f)| {
                let mut out = resend(f, 2, i as u32);
                if i == victim {
                    // The last byte of the frame's data (its checksum is not the compare's
                    // business: rebuild it so only the payload differs).
                    let last = out.len() - 1;
                    let p = packet::parse(&out[last]).unwrap();
                    let Net::Ip(ip) = p.net else { unreachable!() };
                    let Transport::Tcp(t) = ip.transport else {
                        unreachable!()
                    };
                    let mut payload = t.payload().to_vec();
                    *payload.last_mut().unwrap() ^= 0x20;
                    let spec = Spec {
                        src: IpAddr::V4(GUEST),
                        dst: ip.header.dst(),
                        ..Spec::v4()
                    };
                    let seg = tcp_segment(
                        &spec,
                        t.src_port(),
                        t.dst_port(),
                        t.seq(),
                        t.ack(),
                        t.flags(),
                        &[],
                        &payload,
                    );
                    out[last] = packet::testframes::ip_frame(&spec, IPPROTO_TCP, &seg);
                }
                out
            })
            .collect();
        let (released, checkpoints) = run(&pvm, &svm);
        assert_eq!(checkpoints.len(), 1, "frame {victim}: {checkpoints:?}");
        assert!(
            matches!(checkpoints[0], MismatchReason::Mismatch(_)),
            "frame {victim}: {:?}",
            checkpoints[0]
        );
        assert!(
            released < pvm.len(),
            "frame {victim}: the differing data was held"
        );
    }
}
