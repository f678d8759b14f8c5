//! Frame classification: what one frame (or reassembled datagram) means to the compare — the
//! connection and direction it belongs to and the TCP segment or bytes to compare — or, for an
//! IP fragment, what to reassemble it under.

use std::net::IpAddr;

use super::super::packet::{
    self, Addr, ConnKey, Fragment, KeyDir, KeyProto, Net, Transport, MAX_VLAN_TAGS,
};
use super::fragments::FragKey;

/// What one frame (or reassembled datagram) means to the compare.
#[derive(Debug)]
pub(super) struct Unit {
    pub(super) key: ConnKey,
    pub(super) dir: KeyDir,
    pub(super) body: Body,
}

#[derive(Debug)]
pub(super) enum Body {
    Tcp(TcpSeg),
    /// The bytes compared for a datagram or a whole frame.
    Bytes(Vec<u8>),
}

#[derive(Debug)]
pub(super) struct TcpSeg {
    pub(super) seq: u32,
    pub(super) ack: Option<u32>,
    pub(super) syn: bool,
    pub(super) fin: bool,
    pub(super) rst: bool,
    pub(super) payload: Vec<u8>,
}

impl TcpSeg {
    pub(super) fn is_pure_ack(&self) -> bool {
        self.payload.is_empty() && !self.syn && !self.fin && !self.rst
    }
}

pub(super) enum Classified {
    Unit(Unit),
    Fragment {
        key: FragKey,
        frag: Fragment,
        data: Vec<u8>,
    },
}

pub(super) fn classify(f: &packet::Frame<'_>) -> Classified {
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
pub(super) fn opaque_unit(eth: &[u8]) -> Unit {
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
pub(super) fn reassembled_unit(key: &FragKey, payload: &[u8]) -> Unit {
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
