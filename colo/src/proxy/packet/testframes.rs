//! Builders of test frames (Ethernet, VLAN, IPv4/IPv6, fragments, TCP/UDP/ICMP, ARP) with
//! correct checksums, shared by the proxy's tests.

use super::*;

/// MAC of the guest in test frames.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// MAC of the peer in test frames.
pub const PEER_MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];

/// How to build one frame.
#[derive(Clone, Debug)]
pub struct Spec {
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub ip_id: u32,
    pub frag: Option<Fragment>,
}

impl Spec {
    /// Guest 10.0.0.2 → client 10.0.0.1, untagged.
    pub fn v4() -> Self {
        Spec {
            vlans: vec![],
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            ttl: 64,
            ip_id: 1,
            frag: None,
        }
    }
    /// Guest fd00::2 → client fd00::1, untagged.
    pub fn v6() -> Self {
        Spec {
            src: IpAddr::V6("fd00::2".parse().unwrap()),
            dst: IpAddr::V6("fd00::1".parse().unwrap()),
            ..Spec::v4()
        }
    }
    /// Adds an 802.1Q tag (or 802.1ad with `tpid`).
    pub fn vlan(mut self, tpid: u16, id: u16) -> Self {
        self.vlans.push((tpid, id));
        self
    }
    pub fn id(mut self, id: u32) -> Self {
        self.ip_id = id;
        self
    }
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }
    pub fn swapped(mut self) -> Self {
        std::mem::swap(&mut self.src, &mut self.dst);
        self
    }
}

/// A TCP header + payload with a correct checksum for `spec`'s addresses.
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    spec: &Spec,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let doff = 20 + options.len();
    let mut t = Vec::with_capacity(doff + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&(((doff as u16 / 4) << 12) | flags).to_be_bytes());
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(options);
    t.extend_from_slice(payload);
    let c = transport_checksum(&pseudo(spec), IPPROTO_TCP, &t, Some(16));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

fn pseudo(spec: &Spec) -> PseudoAddrs {
    match (spec.src, spec.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PseudoAddrs::V4(s.octets(), d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => PseudoAddrs::V6(s.octets(), d.octets()),
        _ => panic!("mixed address families"),
    }
}

/// A full TCP frame.
pub fn tcp(spec: &Spec, seq: u32, ack: u32, flags: u16, payload: &[u8]) -> Vec<u8> {
    tcp_opts(spec, seq, ack, flags, &[], payload)
}

/// A full TCP frame with options; guest port 80, client port 40000.
pub fn tcp_opts(
    spec: &Spec,
    seq: u32,
    ack: u32,
    flags: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let seg = tcp_segment(spec, 80, 40000, seq, ack, flags, options, payload);
    ip_frame(spec, IPPROTO_TCP, &seg)
}

/// A UDP frame, guest port 53 → client port 5353.
pub fn udp(spec: &Spec, payload: &[u8]) -> Vec<u8> {
    ip_frame(spec, IPPROTO_UDP, &udp_datagram(spec, 53, 5353, payload))
}

/// A UDP header + payload with its checksum.
pub fn udp_datagram(spec: &Spec, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = match transport_checksum(&pseudo(spec), IPPROTO_UDP, &u, Some(6)) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An ICMP (or ICMPv6, by `spec`'s family) echo request.
pub fn ping(spec: &Spec, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let v6 = spec.src.is_ipv6();
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = if v6 {
        transport_checksum(&pseudo(spec), IPPROTO_ICMPV6, &m, Some(2))
    } else {
        internet_checksum(&m)
    };
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ip_frame(spec, if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }, &m)
}

/// An Ethernet header with `spec`'s tags and `ethertype`.
pub fn eth(spec: &Spec, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&GUEST_MAC);
    for &(tpid, id) in &spec.vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IP frame carrying `upper` (already a transport segment, or fragment data when
/// `spec.frag` is set).
pub fn ip_frame(spec: &Spec, protocol: u8, upper: &[u8]) -> Vec<u8> {
    match (spec.src, spec.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut f = eth(spec, ETHERTYPE_IPV4);
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&((20 + upper.len()) as u16).to_be_bytes());
            h.extend_from_slice(&(spec.ip_id as u16).to_be_bytes());
            let frag = spec.frag.map_or(0x4000, |fr| {
                (fr.offset / 8) as u16 | if fr.more { 0x2000 } else { 0 }
            });
            h.extend_from_slice(&frag.to_be_bytes());
            h.extend_from_slice(&[spec.ttl, protocol, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = ipv4_header_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&h);
            f.extend_from_slice(upper);
            f
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut f = eth(spec, ETHERTYPE_IPV6);
            let ext = if spec.frag.is_some() { 8 } else { 0 };
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&((ext + upper.len()) as u16).to_be_bytes());
            f.push(if spec.frag.is_some() {
                IPV6_FRAGMENT
            } else {
                protocol
            });
            f.push(spec.ttl);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            if let Some(fr) = spec.frag {
                f.extend_from_slice(&[protocol, 0]);
                f.extend_from_slice(&((fr.offset as u16) | u16::from(fr.more)).to_be_bytes());
                f.extend_from_slice(&spec.ip_id.to_be_bytes());
            }
            f.extend_from_slice(upper);
            f
        }
        _ => panic!("mixed address families"),
    }
}

/// Splits a transport segment into IP fragments of at most `max` data bytes (a multiple
/// of 8 except for the last).
pub fn fragments(spec: &Spec, protocol: u8, upper: &[u8], max: usize) -> Vec<Vec<u8>> {
    assert_eq!(max % 8, 0);
    let mut out = Vec::new();
    let mut at = 0;
    while at < upper.len() {
        let end = (at + max).min(upper.len());
        let mut s = spec.clone();
        s.frag = Some(Fragment {
            id: spec.ip_id,
            offset: at,
            more: end < upper.len(),
        });
        out.push(ip_frame(&s, protocol, &upper[at..end]));
        at = end;
    }
    out
}

/// An ARP request from the guest for `target`.
pub fn arp(target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}
