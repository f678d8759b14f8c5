//! Zero-copy parsing of the Ethernet frames the proxy sees, connection keys and checksums.
//!
//! [`parse`] walks a frame (without the vnet header) down to its transport layer and hands back
//! views into the caller's buffer: nothing is copied. Every view also records where it sits in
//! the frame (`offset` fields), so a rewriter can patch a field in a `&mut [u8]` of the same
//! frame and fix the checksum with [`checksum_update_u32`].
//!
//! What is understood: up to two VLAN tags (802.1Q `0x8100`, 802.1ad `0x88a8`, any order);
//! IPv4 (options skipped, fragments reported, padding after the total length ignored); IPv6 with
//! its extension headers walked (hop-by-hop, routing, destination options, AH, mobility, HIP,
//! shim6, and the Fragment header); TCP (options iterated), UDP, ICMP and ICMPv6. Anything else
//! is left as raw bytes: another ethertype as [`Net::Other`], another IP protocol as
//! [`Transport::Other`]. A length that does not fit is a [`ParseError`], never a panic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes of an untagged Ethernet header.
pub const ETH_HDR_LEN: usize = 14;
/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype (TPID) of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// Ethertype (TPID) of an 802.1ad service tag (QinQ).
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Most VLAN tags a frame may carry.
pub const MAX_VLAN_TAGS: usize = 2;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;
/// Most IPv6 extension headers walked before the frame is refused (bounds the work per frame).
pub const MAX_IPV6_EXT_HEADERS: usize = 8;
/// Largest IP datagram (and so largest reassembled fragment payload end).
pub const MAX_DATAGRAM: usize = 65_535;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_MOBILITY: u8 = 135;
const IPV6_HIP: u8 = 139;
const IPV6_SHIM6: u8 = 140;

/// TCP flag bits (the low 9 bits of bytes 12-13 of the header).
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u16 = 0x001;
    /// Synchronize sequence numbers.
    pub const SYN: u16 = 0x002;
    /// Reset the connection.
    pub const RST: u16 = 0x004;
    /// Push.
    pub const PSH: u16 = 0x008;
    /// The acknowledgment field is significant.
    pub const ACK: u16 = 0x010;
    /// Urgent pointer significant.
    pub const URG: u16 = 0x020;
    /// ECN echo.
    pub const ECE: u16 = 0x040;
    /// Congestion window reduced.
    pub const CWR: u16 = 0x080;
}

/// Why a frame could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A layer claims or needs more bytes than the frame holds.
    #[error("{layer}: {have} bytes where {need} are needed")]
    Truncated {
        /// The layer being parsed.
        layer: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
    /// More than [`MAX_VLAN_TAGS`] VLAN tags.
    #[error("more than {MAX_VLAN_TAGS} VLAN tags")]
    TooManyVlanTags,
    /// The IP version nibble disagrees with the ethertype.
    #[error("IP version {found} under an IPv{expected} ethertype")]
    BadIpVersion {
        /// The version the ethertype announced.
        expected: u8,
        /// The version in the header.
        found: u8,
    },
    /// An IPv4 header length below 20 bytes.
    #[error("IPv4 header length {0} is below 20 bytes")]
    BadIhl(usize),
    /// An IPv4 total length below its header length.
    #[error("IPv4 total length {total} is below the header's {header} bytes")]
    BadTotalLength {
        /// The total length field.
        total: usize,
        /// The header length.
        header: usize,
    },
    /// A fragment that would end past [`MAX_DATAGRAM`].
    #[error("a fragment ends at byte {0}, past the largest datagram")]
    FragmentTooLarge(usize),
    /// More than [`MAX_IPV6_EXT_HEADERS`] IPv6 extension headers.
    #[error("more than {MAX_IPV6_EXT_HEADERS} IPv6 extension headers")]
    TooManyExtensionHeaders,
    /// A second IPv6 Fragment header (or one inside a reassembled payload).
    #[error("a second IPv6 fragment header")]
    NestedFragment,
    /// A TCP data offset below 20 bytes.
    #[error("TCP data offset {0} is below 20 bytes")]
    BadDataOffset(usize),
    /// A UDP length below its 8-byte header.
    #[error("UDP length {0} is below the 8-byte header")]
    BadUdpLength(usize),
    /// A TCP option whose length byte is impossible.
    #[error("TCP option {kind} has length {len}")]
    BadTcpOption {
        /// The option kind.
        kind: u8,
        /// Its length byte (or the bytes left, if that byte is missing).
        len: usize,
    },
}

/// Checks that `bytes` holds at least `need` bytes.
fn need(layer: &'static str, bytes: &[u8], need: usize) -> Result<(), ParseError> {
    if bytes.len() < need {
        return Err(ParseError::Truncated {
            layer,
            need,
            have: bytes.len(),
        });
    }
    Ok(())
}

// The readers below are only called at offsets the constructors have validated, so indexing
// cannot fail; they stay private for that reason.
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The VLAN tags of a frame, outermost first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Vlans {
    tci: [u16; MAX_VLAN_TAGS],
    len: u8,
}

impl Vlans {
    /// Number of tags (0 to 2).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether the frame is untagged.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tag control information (priority, DEI, VLAN id) of the tags present.
    pub fn tci(&self) -> &[u16] {
        &self.tci[..self.len()]
    }

    /// The 12-bit VLAN ids, outermost first, 0 where there is no tag.
    pub fn ids(&self) -> [u16; MAX_VLAN_TAGS] {
        let mut ids = [0; MAX_VLAN_TAGS];
        for (id, tci) in ids.iter_mut().zip(self.tci()) {
            *id = tci & 0x0fff;
        }
        ids
    }
}

/// A parsed Ethernet frame: views into the caller's bytes.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// The whole frame.
    pub bytes: &'a [u8],
    /// Its VLAN tags.
    pub vlans: Vlans,
    /// The ethertype after the tags.
    pub ethertype: u16,
    /// Where the network layer starts.
    pub l3_offset: usize,
    /// The network layer.
    pub net: Net<'a>,
}

impl Frame<'_> {
    /// Destination MAC address.
    pub fn dst_mac(&self) -> [u8; 6] {
        mac_at(self.bytes, 0)
    }

    /// Source MAC address.
    pub fn src_mac(&self) -> [u8; 6] {
        mac_at(self.bytes, 6)
    }

    /// The connection this frame belongs to, normalized, and which way it travels.
    pub fn conn_key(&self) -> (ConnKey, KeyDir) {
        let vlan = self.vlans.ids();
        match &self.net {
            Net::Ip(ip) => transport_key(
                vlan,
                ip.header.src(),
                ip.header.dst(),
                ip.protocol,
                &ip.transport,
            ),
            Net::Other(_) => ConnKey::new(
                vlan,
                KeyProto::Ether(self.ethertype),
                (Addr::Mac(self.src_mac()), 0),
                (Addr::Mac(self.dst_mac()), 0),
            ),
        }
    }
}

/// The connection key of an IP packet from `src` to `dst` whose upper layer is `transport`
/// (`protocol` names it when it is not TCP, UDP or ICMP), and its direction.
pub fn transport_key(
    vlan: [u16; MAX_VLAN_TAGS],
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    transport: &Transport<'_>,
) -> (ConnKey, KeyDir) {
    let (proto, sport, dport) = match transport {
        Transport::Tcp(t) => (KeyProto::Tcp, t.src_port(), t.dst_port()),
        Transport::Udp(u) => (KeyProto::Udp, u.src_port(), u.dst_port()),
        Transport::Icmp(i) => {
            // Echo request and reply share the identifier: it separates ping sessions the
            // way ports separate sockets.
            let id = i.echo_id().unwrap_or(0);
            let proto = if i.v6 {
                KeyProto::Icmpv6
            } else {
                KeyProto::Icmp
            };
            (proto, id, id)
        }
        Transport::Fragment(_) | Transport::Other(_) => (KeyProto::Ip(protocol), 0, 0),
    };
    ConnKey::new(vlan, proto, (Addr::Ip(src), sport), (Addr::Ip(dst), dport))
}

fn mac_at(b: &[u8], at: usize) -> [u8; 6] {
    let mut mac = [0; 6];
    if let Some(s) = b.get(at..at + 6) {
        mac.copy_from_slice(s);
    }
    mac
}

/// The network layer of a frame.
#[derive(Clone, Copy, Debug)]
pub enum Net<'a> {
    /// IPv4 or IPv6.
    Ip(Ip<'a>),
    /// Another ethertype (ARP, …): the bytes after the Ethernet header and tags.
    Other(&'a [u8]),
}

/// An IPv4 header (options included), validated.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Header<'a> {
    bytes: &'a [u8],
}

impl<'a> Ipv4Header<'a> {
    /// The header bytes (20 to 60).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.bytes[12],
            self.bytes[13],
            self.bytes[14],
            self.bytes[15],
        )
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.bytes[16],
            self.bytes[17],
            self.bytes[18],
            self.bytes[19],
        )
    }
    /// Total length field.
    pub fn total_len(&self) -> u16 {
        be16(self.bytes, 2)
    }
    /// Identification field.
    pub fn id(&self) -> u16 {
        be16(self.bytes, 4)
    }
    /// Don't-fragment flag.
    pub fn dont_fragment(&self) -> bool {
        self.bytes[6] & 0x40 != 0
    }
    /// More-fragments flag.
    pub fn more_fragments(&self) -> bool {
        self.bytes[6] & 0x20 != 0
    }
    /// Fragment offset in bytes.
    pub fn fragment_offset(&self) -> usize {
        usize::from(be16(self.bytes, 6) & 0x1fff) * 8
    }
    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.bytes[8]
    }
    /// Protocol field.
    pub fn protocol(&self) -> u8 {
        self.bytes[9]
    }
    /// Header checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.bytes, 10)
    }
    /// Whether the header checksum is right.
    pub fn checksum_ok(&self) -> bool {
        internet_checksum(self.bytes) == 0
    }
}

/// The fixed 40-byte IPv6 header, validated.
#[derive(Clone, Copy, Debug)]
pub struct Ipv6Header<'a> {
    bytes: &'a [u8],
}

impl<'a> Ipv6Header<'a> {
    /// The 40 header bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(addr16(self.bytes, 8))
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(addr16(self.bytes, 24))
    }
    /// Payload length field (extension headers included).
    pub fn payload_len(&self) -> u16 {
        be16(self.bytes, 4)
    }
    /// The first next-header field.
    pub fn next_header(&self) -> u8 {
        self.bytes[6]
    }
    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.bytes[7]
    }
    /// Flow label.
    pub fn flow_label(&self) -> u32 {
        be32(self.bytes, 0) & 0x000f_ffff
    }
}

fn addr16(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}

/// An IPv4 or IPv6 header.
#[derive(Clone, Copy, Debug)]
pub enum IpHeader<'a> {
    /// IPv4.
    V4(Ipv4Header<'a>),
    /// IPv6 (the fixed header; extension headers are walked into [`Ip`]).
    V6(Ipv6Header<'a>),
}

impl IpHeader<'_> {
    /// Source address.
    pub fn src(&self) -> IpAddr {
        match self {
            IpHeader::V4(h) => IpAddr::V4(h.src()),
            IpHeader::V6(h) => IpAddr::V6(h.src()),
        }
    }
    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        match self {
            IpHeader::V4(h) => IpAddr::V4(h.dst()),
            IpHeader::V6(h) => IpAddr::V6(h.dst()),
        }
    }
    /// The addresses as a checksum pseudo-header needs them.
    pub fn pseudo(&self) -> PseudoAddrs {
        match self {
            IpHeader::V4(h) => PseudoAddrs::V4(h.src().octets(), h.dst().octets()),
            IpHeader::V6(h) => PseudoAddrs::V6(h.src().octets(), h.dst().octets()),
        }
    }
}

/// Where a fragment sits in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// Identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// Offset of this fragment's data in the datagram's payload, in bytes.
    pub offset: usize,
    /// Whether more fragments follow.
    pub more: bool,
}

/// An IP packet: header, the upper layer found behind it, and that layer parsed.
#[derive(Clone, Copy, Debug)]
pub struct Ip<'a> {
    /// The IPv4 or fixed IPv6 header.
    pub header: IpHeader<'a>,
    /// Where the IP header starts in the frame.
    pub offset: usize,
    /// The upper-layer protocol. For an IPv6 fragment it is the Fragment header's next header,
    /// which may be another extension header: walk it with [`ipv6_upper_layer`] once reassembled.
    pub protocol: u8,
    /// Set when this packet is a fragment (an IPv6 "atomic" fragment, offset 0 and no more
    /// fragments, is not one).
    pub fragment: Option<Fragment>,
    /// Where the upper-layer bytes start in the frame.
    pub upper_offset: usize,
    /// The upper-layer bytes (or this fragment's data), without link-layer padding.
    pub upper: &'a [u8],
    /// The upper layer parsed ([`Transport::Fragment`] for a fragment).
    pub transport: Transport<'a>,
}

/// The transport layer of an IP packet.
#[derive(Clone, Copy, Debug)]
pub enum Transport<'a> {
    /// TCP.
    Tcp(Tcp<'a>),
    /// UDP.
    Udp(Udp<'a>),
    /// ICMP or ICMPv6.
    Icmp(Icmp<'a>),
    /// A fragment's data: the transport header may not be there; reassemble first.
    Fragment(&'a [u8]),
    /// Another protocol's bytes.
    Other(&'a [u8]),
}

/// A TCP segment, validated.
#[derive(Clone, Copy, Debug)]
pub struct Tcp<'a> {
    /// Where the TCP header starts (in the frame, or in the buffer given to [`parse_transport`]).
    pub offset: usize,
    header: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Tcp<'a> {
    /// Offset of the checksum field within the TCP header.
    pub const CHECKSUM_AT: usize = 16;
    /// Offset of the sequence number field within the TCP header.
    pub const SEQ_AT: usize = 4;
    /// Offset of the acknowledgment number field within the TCP header.
    pub const ACK_AT: usize = 8;

    /// The header, options included.
    pub fn header(&self) -> &'a [u8] {
        self.header
    }
    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.header, 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.header, 2)
    }
    /// Sequence number.
    pub fn seq(&self) -> u32 {
        be32(self.header, Self::SEQ_AT)
    }
    /// Acknowledgment number (meaningful only with the ACK flag).
    pub fn ack(&self) -> u32 {
        be32(self.header, Self::ACK_AT)
    }
    /// Header length in bytes (the data offset).
    pub fn data_offset(&self) -> usize {
        self.header.len()
    }
    /// The nine flag bits ([`tcp_flags`]).
    pub fn flags(&self) -> u16 {
        be16(self.header, 12) & 0x01ff
    }
    /// SYN flag.
    pub fn syn(&self) -> bool {
        self.flags() & tcp_flags::SYN != 0
    }
    /// FIN flag.
    pub fn fin(&self) -> bool {
        self.flags() & tcp_flags::FIN != 0
    }
    /// RST flag.
    pub fn rst(&self) -> bool {
        self.flags() & tcp_flags::RST != 0
    }
    /// ACK flag.
    pub fn has_ack(&self) -> bool {
        self.flags() & tcp_flags::ACK != 0
    }
    /// Receive window.
    pub fn window(&self) -> u16 {
        be16(self.header, 14)
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.header, Self::CHECKSUM_AT)
    }
    /// Sequence space the segment occupies: payload plus one each for SYN and FIN.
    pub fn seq_len(&self) -> u32 {
        // A payload is < 64 KiB (the IP length bounds it), so this cannot overflow.
        self.payload.len() as u32 + u32::from(self.syn()) + u32::from(self.fin())
    }
    /// The options.
    pub fn options(&self) -> TcpOptions<'a> {
        TcpOptions {
            bytes: self.header.get(20..).unwrap_or(&[]),
            at: 0,
        }
    }
    /// The timestamp option (value, echo reply) and its offset in the header, if present.
    pub fn timestamp(&self) -> Option<(u32, u32, usize)> {
        self.options()
            .map_while(Result::ok)
            .find_map(|o| match o.data {
                [a, b, c, d, e, f, g, h] if o.kind == 8 => Some((
                    u32::from_be_bytes([*a, *b, *c, *d]),
                    u32::from_be_bytes([*e, *f, *g, *h]),
                    20 + o.offset,
                )),
                _ => None,
            })
    }
}

/// One TCP option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOption<'a> {
    /// Kind (2 MSS, 3 window scale, 4 SACK permitted, 5 SACK, 8 timestamps, …).
    pub kind: u8,
    /// The bytes after kind and length (empty for NOP).
    pub data: &'a [u8],
    /// Where the option starts, counted from the first option byte (header byte 20).
    pub offset: usize,
}

/// Iterator over TCP options; stops at End of Option List, yields one error and stops on a
/// malformed option.
#[derive(Clone, Debug)]
pub struct TcpOptions<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = Result<TcpOption<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.at;
        let kind = *self.bytes.get(start)?;
        match kind {
            0 => {
                self.at = self.bytes.len();
                None
            }
            1 => {
                self.at += 1;
                Some(Ok(TcpOption {
                    kind,
                    data: &[],
                    offset: start,
                }))
            }
            _ => {
                let left = self.bytes.len() - start;
                let len = self.bytes.get(start + 1).map(|&l| usize::from(l));
                // Stop for good after an error: the rest cannot be framed.
                self.at = self.bytes.len();
                match len {
                    Some(len) if len >= 2 && len <= left => {
                        self.at = start + len;
                        Some(Ok(TcpOption {
                            kind,
                            data: &self.bytes[start + 2..start + len],
                            offset: start,
                        }))
                    }
                    Some(len) => Some(Err(ParseError::BadTcpOption { kind, len })),
                    None => Some(Err(ParseError::BadTcpOption { kind, len: left })),
                }
            }
        }
    }
}

/// A UDP datagram, validated (trimmed to its length field).
#[derive(Clone, Copy, Debug)]
pub struct Udp<'a> {
    /// Where the UDP header starts.
    pub offset: usize,
    header: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Udp<'a> {
    /// Offset of the checksum field within the UDP header.
    pub const CHECKSUM_AT: usize = 6;

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.header, 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.header, 2)
    }
    /// Length field (header included).
    pub fn length(&self) -> u16 {
        be16(self.header, 4)
    }
    /// Checksum field (0: none, IPv4 only).
    pub fn checksum(&self) -> u16 {
        be16(self.header, Self::CHECKSUM_AT)
    }
    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// An ICMP or ICMPv6 message, validated to hold type, code and checksum.
#[derive(Clone, Copy, Debug)]
pub struct Icmp<'a> {
    /// Where the ICMP header starts.
    pub offset: usize,
    /// ICMPv6 rather than ICMP.
    pub v6: bool,
    bytes: &'a [u8],
}

impl<'a> Icmp<'a> {
    /// The whole message.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Type.
    pub fn icmp_type(&self) -> u8 {
        self.bytes[0]
    }
    /// Code.
    pub fn code(&self) -> u8 {
        self.bytes[1]
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.bytes, 2)
    }
    /// Everything after type, code and checksum.
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[4..]
    }
    /// The identifier of an echo request or reply.
    pub fn echo_id(&self) -> Option<u16> {
        let echo = if self.v6 {
            matches!(self.icmp_type(), 128 | 129)
        } else {
            matches!(self.icmp_type(), 0 | 8)
        };
        if echo && self.bytes.len() >= 6 {
            Some(be16(self.bytes, 4))
        } else {
            None
        }
    }
}

/// Parses an Ethernet frame (no vnet header in front) down to its transport layer.
pub fn parse(frame: &[u8]) -> Result<Frame<'_>, ParseError> {
    need("ethernet", frame, ETH_HDR_LEN)?;
    let mut vlans = Vlans::default();
    let mut at = 12;
    let mut ethertype = be16(frame, at);
    while ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        if vlans.len() == MAX_VLAN_TAGS {
            return Err(ParseError::TooManyVlanTags);
        }
        need("vlan tag", frame, at + 6)?;
        vlans.tci[vlans.len()] = be16(frame, at + 2);
        vlans.len += 1;
        at += 4;
        ethertype = be16(frame, at);
    }
    let l3_offset = at + 2;
    let l3 = &frame[l3_offset..];
    let net = match ethertype {
        ETHERTYPE_IPV4 => Net::Ip(parse_ipv4(l3, l3_offset)?),
        ETHERTYPE_IPV6 => Net::Ip(parse_ipv6(l3, l3_offset)?),
        _ => Net::Other(l3),
    };
    Ok(Frame {
        bytes: frame,
        vlans,
        ethertype,
        l3_offset,
        net,
    })
}

fn parse_ipv4(b: &[u8], offset: usize) -> Result<Ip<'_>, ParseError> {
    need("ipv4", b, 20)?;
    let version = b[0] >> 4;
    if version != 4 {
        return Err(ParseError::BadIpVersion {
            expected: 4,
            found: version,
        });
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(ParseError::BadIhl(ihl));
    }
    need("ipv4 header", b, ihl)?;
    let total = usize::from(be16(b, 2));
    if total < ihl {
        return Err(ParseError::BadTotalLength { total, header: ihl });
    }
    // Bytes past the total length are link-layer padding (a frame is at least 60 bytes).
    need("ipv4 total length", b, total)?;
    let header = Ipv4Header { bytes: &b[..ihl] };
    let upper = &b[ihl..total];
    let upper_offset = offset + ihl;
    let frag = Fragment {
        id: u32::from(header.id()),
        offset: header.fragment_offset(),
        more: header.more_fragments(),
    };
    let fragment = (frag.more || frag.offset != 0).then_some(frag);
    if frag.offset + upper.len() > MAX_DATAGRAM {
        return Err(ParseError::FragmentTooLarge(frag.offset + upper.len()));
    }
    let protocol = header.protocol();
    let transport = if fragment.is_some() {
        Transport::Fragment(upper)
    } else {
        parse_transport(protocol, upper, upper_offset, false)?
    };
    Ok(Ip {
        header: IpHeader::V4(header),
        offset,
        protocol,
        fragment,
        upper_offset,
        upper,
        transport,
    })
}

fn parse_ipv6(b: &[u8], offset: usize) -> Result<Ip<'_>, ParseError> {
    need("ipv6", b, 40)?;
    let version = b[0] >> 4;
    if version != 6 {
        return Err(ParseError::BadIpVersion {
            expected: 6,
            found: version,
        });
    }
    let header = Ipv6Header { bytes: &b[..40] };
    let end = 40 + usize::from(header.payload_len());
    need("ipv6 payload length", b, end)?;
    let payload = &b[40..end];
    let walk = walk_ipv6(header.next_header(), payload, true)?;
    let upper = &payload[walk.upper_at..];
    let upper_offset = offset + 40 + walk.upper_at;
    let fragment = walk.fragment.filter(|f| f.more || f.offset != 0);
    if let Some(f) = fragment {
        if f.offset + upper.len() > MAX_DATAGRAM {
            return Err(ParseError::FragmentTooLarge(f.offset + upper.len()));
        }
    }
    let transport = if fragment.is_some() {
        Transport::Fragment(upper)
    } else {
        parse_transport(walk.protocol, upper, upper_offset, true)?
    };
    Ok(Ip {
        header: IpHeader::V6(header),
        offset,
        protocol: walk.protocol,
        fragment,
        upper_offset,
        upper,
        transport,
    })
}

struct Ipv6Walk {
    protocol: u8,
    upper_at: usize,
    fragment: Option<Fragment>,
}

/// Walks IPv6 extension headers from `next` over `b`. A Fragment header that really fragments
/// ends the walk (what follows it is fragment data); an atomic one is stepped over.
fn walk_ipv6(mut next: u8, b: &[u8], allow_fragment: bool) -> Result<Ipv6Walk, ParseError> {
    let mut at = 0;
    let mut fragment = None;
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_MOBILITY | IPV6_HIP | IPV6_SHIM6 => {
                need("ipv6 extension header", &b[at..], 2)?;
                (usize::from(b[at + 1]) + 1) * 8
            }
            IPV6_AH => {
                need("ipv6 authentication header", &b[at..], 2)?;
                (usize::from(b[at + 1]) + 2) * 4
            }
            IPV6_FRAGMENT => {
                if !allow_fragment || fragment.is_some() {
                    return Err(ParseError::NestedFragment);
                }
                need("ipv6 fragment header", &b[at..], 8)?;
                let off_flags = be16(b, at + 2);
                let f = Fragment {
                    id: be32(b, at + 4),
                    offset: usize::from(off_flags >> 3) * 8,
                    more: off_flags & 1 != 0,
                };
                fragment = Some(f);
                let following = b[at];
                if f.more || f.offset != 0 {
                    return Ok(Ipv6Walk {
                        protocol: following,
                        upper_at: at + 8,
                        fragment,
                    });
                }
                8
            }
            _ => {
                return Ok(Ipv6Walk {
                    protocol: next,
                    upper_at: at,
                    fragment,
                })
            }
        };
        need("ipv6 extension header", &b[at..], len)?;
        next = b[at];
        at += len;
    }
    Err(ParseError::TooManyExtensionHeaders)
}

/// Walks the IPv6 extension headers that may start a reassembled payload (`first` is the
/// Fragment header's next header): the upper-layer protocol and where it starts in `bytes`.
pub fn ipv6_upper_layer(first: u8, bytes: &[u8]) -> Result<(u8, usize), ParseError> {
    let w = walk_ipv6(first, bytes, false)?;
    Ok((w.protocol, w.upper_at))
}

/// Parses the transport layer `protocol` in `b`; `offset` is recorded in the result (where `b`
/// starts in its frame or buffer) and `v6` tells ICMP from ICMPv6 semantics.
pub fn parse_transport(
    protocol: u8,
    b: &[u8],
    offset: usize,
    v6: bool,
) -> Result<Transport<'_>, ParseError> {
    Ok(match protocol {
        IPPROTO_TCP => {
            need("tcp", b, 20)?;
            let doff = usize::from(b[12] >> 4) * 4;
            if doff < 20 {
                return Err(ParseError::BadDataOffset(doff));
            }
            need("tcp header", b, doff)?;
            Transport::Tcp(Tcp {
                offset,
                header: &b[..doff],
                payload: &b[doff..],
            })
        }
        IPPROTO_UDP => {
            need("udp", b, 8)?;
            let len = usize::from(be16(b, 4));
            if len < 8 {
                return Err(ParseError::BadUdpLength(len));
            }
            need("udp length", b, len)?;
            Transport::Udp(Udp {
                offset,
                header: &b[..8],
                payload: &b[8..len],
            })
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if (protocol == IPPROTO_ICMPV6) == v6 => {
            need("icmp", b, 4)?;
            Transport::Icmp(Icmp {
                offset,
                v6,
                bytes: b,
            })
        }
        _ => Transport::Other(b),
    })
}

/// An address in a connection key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Addr {
    /// An IP address.
    Ip(IpAddr),
    /// A MAC address (frames that are not IP).
    Mac([u8; 6]),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Addr::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Addr::Mac(m) => write!(
                f,
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
        }
    }
}

/// The protocol part of a connection key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (ports hold the echo identifier).
    Icmp,
    /// ICMPv6 (ports hold the echo identifier).
    Icmpv6,
    /// Another IP protocol number.
    Ip(u8),
    /// A non-IP ethertype.
    Ether(u16),
}

/// A connection: both directions of a flow map to the same key (the endpoints are sorted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// VLAN ids, outermost first, 0 where untagged.
    pub vlan: [u16; MAX_VLAN_TAGS],
    /// Protocol.
    pub proto: KeyProto,
    /// The lower endpoint (address, port).
    pub lo: (Addr, u16),
    /// The higher endpoint.
    pub hi: (Addr, u16),
}

/// Which way a packet travels within its [`ConnKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyDir {
    /// From `lo` to `hi`.
    LoToHi,
    /// From `hi` to `lo`.
    HiToLo,
}

impl ConnKey {
    /// The key of a packet from `src` to `dst`, and its direction.
    pub fn new(
        vlan: [u16; MAX_VLAN_TAGS],
        proto: KeyProto,
        src: (Addr, u16),
        dst: (Addr, u16),
    ) -> (Self, KeyDir) {
        let (lo, hi, dir) = if src <= dst {
            (src, dst, KeyDir::LoToHi)
        } else {
            (dst, src, KeyDir::HiToLo)
        };
        (
            ConnKey {
                vlan,
                proto,
                lo,
                hi,
            },
            dir,
        )
    }
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            KeyProto::Tcp => write!(f, "tcp")?,
            KeyProto::Udp => write!(f, "udp")?,
            KeyProto::Icmp => write!(f, "icmp")?,
            KeyProto::Icmpv6 => write!(f, "icmpv6")?,
            KeyProto::Ip(p) => write!(f, "ip proto {p}")?,
            KeyProto::Ether(t) => write!(f, "ethertype {t:#06x}")?,
        }
        write!(
            f,
            " {}:{} <-> {}:{}",
            self.lo.0, self.lo.1, self.hi.0, self.hi.1
        )?;
        if self.vlan != [0; MAX_VLAN_TAGS] {
            write!(f, " vlan {}/{}", self.vlan[0], self.vlan[1])?;
        }
        Ok(())
    }
}

/// Source and destination addresses for a transport checksum's pseudo-header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PseudoAddrs {
    /// IPv4 source and destination.
    V4([u8; 4], [u8; 4]),
    /// IPv6 source and destination.
    V6([u8; 16], [u8; 16]),
}

/// Adds `data` as big-endian 16-bit words (odd length padded with a zero byte) to a running
/// one's-complement sum, unfolded.
pub fn checksum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a running sum into 16 bits and complements it: the value a checksum field carries.
pub fn checksum_finish(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    !(sum as u16)
}

/// The internet checksum (RFC 1071) of `data`; over data that holds a correct checksum it is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    checksum_finish(checksum_add(0, data))
}

/// The checksum an IPv4 header should carry (its own checksum field is skipped).
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let sum = checksum_add(0, header.get(..10).unwrap_or(header));
    checksum_finish(checksum_add(sum, header.get(12..).unwrap_or(&[])))
}

/// The TCP/UDP/ICMPv6 checksum of `segment` over the pseudo-header of `addrs` and `protocol`.
///
/// With `field = Some(at)` the two bytes at `at` (the checksum field) count as zero and the
/// result is the value to store (UDP stores 0xffff for a computed 0: 0 means "no checksum");
/// with `None` the segment is summed as it is and a correct one gives 0.
pub fn transport_checksum(
    addrs: &PseudoAddrs,
    protocol: u8,
    segment: &[u8],
    field: Option<usize>,
) -> u16 {
    let mut sum = match addrs {
        PseudoAddrs::V4(s, d) => checksum_add(checksum_add(0, s), d),
        PseudoAddrs::V6(s, d) => checksum_add(checksum_add(0, s), d),
    };
    // The length is 16 bits in the IPv4 pseudo-header and 32 in IPv6's; as 16-bit words summed,
    // both come down to adding the two halves of the 32-bit length.
    let len = segment.len() as u64;
    sum += (len >> 16) + (len & 0xffff) + u64::from(protocol);
    match field.filter(|&at| at + 2 <= segment.len()) {
        Some(at) => {
            sum = checksum_add(sum, &segment[..at]);
            // Keep the word alignment: the part after the field starts on an even offset
            // only if `at` is even, which it is for every checksum field.
            sum = checksum_add(sum, &segment[at + 2..]);
        }
        None => sum = checksum_add(sum, segment),
    }
    checksum_finish(sum)
}

/// RFC 1624 incremental update: the checksum after a 16-bit word of the covered data changed
/// from `old` to `new` (HC' = ~(~HC + ~m + m')).
pub fn checksum_update_u16(checksum: u16, old: u16, new: u16) -> u16 {
    let sum = u64::from(!checksum) + u64::from(!old) + u64::from(new);
    checksum_finish(sum)
}

/// RFC 1624 incremental update for a 32-bit field (a TCP sequence or acknowledgment number)
/// that changed from `old` to `new`.
pub fn checksum_update_u32(checksum: u16, old: u32, new: u32) -> u16 {
    // Both halves are folded into one sum: complementing once at the end avoids the
    // intermediate -0 that two chained 16-bit updates could produce.
    let sum = u64::from(!checksum)
        + u64::from(!((old >> 16) as u16))
        + u64::from(!(old as u16))
        + u64::from((new >> 16) as u16)
        + u64::from(new as u16);
    checksum_finish(sum)
}

/// Which 32-bit TCP field [`rewrite_tcp_u32`] changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpField {
    /// The sequence number.
    Seq,
    /// The acknowledgment number.
    Ack,
}

/// Rewrites the sequence or acknowledgment number of the TCP header at `tcp_offset` in
/// `frame`, returning the old value.
///
/// With `fix_checksum` the checksum is updated incrementally. Leave it off for a packet whose
/// vnet header asks for checksum offload (NEEDS_CSUM): its checksum field then holds only the
/// pseudo-header sum, which sequence numbers do not enter.
pub fn rewrite_tcp_u32(
    frame: &mut [u8],
    tcp_offset: usize,
    field: TcpField,
    new: u32,
    fix_checksum: bool,
) -> Result<u32, ParseError> {
    let have = frame.len();
    let header = frame
        .get_mut(tcp_offset..)
        .filter(|h| h.len() >= 20)
        .ok_or(ParseError::Truncated {
            layer: "tcp",
            need: tcp_offset.saturating_add(20),
            have,
        })?;
    let at = match field {
        TcpField::Seq => Tcp::SEQ_AT,
        TcpField::Ack => Tcp::ACK_AT,
    };
    let old = be32(header, at);
    header[at..at + 4].copy_from_slice(&new.to_be_bytes());
    if fix_checksum {
        let c = be16(header, Tcp::CHECKSUM_AT);
        let c = checksum_update_u32(c, old, new);
        header[Tcp::CHECKSUM_AT..Tcp::CHECKSUM_AT + 2].copy_from_slice(&c.to_be_bytes());
    }
    Ok(old)
}

#[cfg(test)]
pub(crate) mod testframes;
#[cfg(test)]
mod tests;
