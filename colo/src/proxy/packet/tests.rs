//! Tests of frame parsing, keys, checksums and rewriting.

use super::testframes::*;
use super::*;
use proptest::prelude::*;

fn tcp_of<'a>(f: &'a Frame<'a>) -> &'a Tcp<'a> {
    match &f.net {
        Net::Ip(Ip {
            transport: Transport::Tcp(t),
            ..
        }) => t,
        other => panic!("not tcp: {other:?}"),
    }
}

fn ip_of<'a>(f: &'a Frame<'a>) -> &'a Ip<'a> {
    match &f.net {
        Net::Ip(ip) => ip,
        other => panic!("not ip: {other:?}"),
    }
}

#[test]
fn tcp_v4_fields() {
    // MSS 1460, NOP, NOP, timestamps 7/9.
    let opts = [2, 4, 5, 0xb4, 1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9];
    let mut frame = tcp_opts(
        &Spec::v4(),
        1000,
        2000,
        tcp_flags::ACK | tcp_flags::PSH,
        &opts,
        b"hello",
    );
    frame.extend_from_slice(&[0; 10]); // link padding must be ignored
    let f = parse(&frame).unwrap();
    assert!(f.vlans.is_empty());
    assert_eq!(f.ethertype, ETHERTYPE_IPV4);
    let ip = ip_of(&f);
    let IpHeader::V4(h) = ip.header else { panic!() };
    assert!(h.checksum_ok());
    assert_eq!(h.checksum(), ipv4_header_checksum(h.bytes()));
    assert_eq!(h.ttl(), 64);
    assert!(h.dont_fragment());
    assert!(ip.fragment.is_none());
    let t = tcp_of(&f);
    assert_eq!((t.src_port(), t.dst_port()), (80, 40000));
    assert_eq!((t.seq(), t.ack()), (1000, 2000));
    assert!(t.has_ack() && !t.syn() && !t.fin() && !t.rst());
    assert_eq!(t.data_offset(), 36);
    assert_eq!(t.payload(), b"hello");
    assert_eq!(t.seq_len(), 5);
    assert_eq!(t.timestamp(), Some((7, 9, 26)));
    let kinds: Vec<u8> = t.options().map(|o| o.unwrap().kind).collect();
    assert_eq!(kinds, [2, 1, 1, 8]);
    let seg = &frame[t.offset..t.offset + t.data_offset() + 5];
    assert_eq!(
        transport_checksum(&ip.header.pseudo(), IPPROTO_TCP, seg, None),
        0
    );
}

#[test]
fn vlan_tags_up_to_two() {
    let spec = Spec::v4()
        .vlan(ETHERTYPE_QINQ, 0x2064)
        .vlan(ETHERTYPE_VLAN, 7);
    let frame = udp(&spec, b"x");
    let f = parse(&frame).unwrap();
    assert_eq!(f.vlans.len(), 2);
    assert_eq!(f.vlans.tci(), &[0x2064, 7]);
    assert_eq!(f.vlans.ids(), [100, 7]);
    assert_eq!(f.l3_offset, 22);
    let (k, _) = f.conn_key();
    assert_eq!(k.vlan, [100, 7]);
    let three = udp(&spec.vlan(ETHERTYPE_VLAN, 9), b"x");
    assert_eq!(parse(&three).unwrap_err(), ParseError::TooManyVlanTags);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let spec = Spec::v6();
    let seg = tcp_segment(&spec, 80, 40000, 5, 6, tcp_flags::ACK, &[], b"data");
    // hop-by-hop (8 bytes) → destination options (16 bytes) → TCP.
    let mut upper = vec![IPV6_DSTOPTS, 0, 1, 4, 0, 0, 0, 0];
    upper.extend_from_slice(&[IPPROTO_TCP, 1, 1, 12]);
    upper.extend_from_slice(&[0; 12]);
    upper.extend_from_slice(&seg);
    let frame = ip_frame(&spec, IPV6_HOPOPTS, &upper);
    let f = parse(&frame).unwrap();
    let ip = ip_of(&f);
    assert_eq!(ip.protocol, IPPROTO_TCP);
    assert_eq!(ip.upper_offset, 14 + 40 + 24);
    assert_eq!(tcp_of(&f).payload(), b"data");
    assert_eq!(
        transport_checksum(&ip.header.pseudo(), IPPROTO_TCP, ip.upper, None),
        0
    );
}

#[test]
fn fragments_are_reported() {
    let spec = Spec::v4().id(77);
    let dgram = udp_datagram(&spec, 53, 5353, &[7; 100]);
    let frags = fragments(&spec, IPPROTO_UDP, &dgram, 48);
    assert_eq!(frags.len(), 3);
    let f = parse(&frags[1]).unwrap();
    let ip = ip_of(&f);
    assert_eq!(
        ip.fragment,
        Some(Fragment {
            id: 77,
            offset: 48,
            more: true
        })
    );
    assert!(matches!(ip.transport, Transport::Fragment(d) if d.len() == 48));

    let spec6 = Spec::v6().id(0xdead_beef);
    let frags6 = fragments(&spec6, IPPROTO_UDP, &dgram, 64);
    let f = parse(&frags6[1]).unwrap();
    let ip = ip_of(&f);
    assert_eq!(ip.protocol, IPPROTO_UDP);
    assert_eq!(
        ip.fragment,
        Some(Fragment {
            id: 0xdead_beef,
            offset: 64,
            more: false
        })
    );
    // An atomic fragment (offset 0, no more) is parsed through.
    let mut atomic = spec6.clone();
    atomic.frag = Some(Fragment {
        id: 1,
        offset: 0,
        more: false,
    });
    let frame = ip_frame(&atomic, IPPROTO_UDP, &udp_datagram(&atomic, 1, 2, b"a"));
    let f = parse(&frame).unwrap();
    assert!(ip_of(&f).fragment.is_none());
    assert!(matches!(ip_of(&f).transport, Transport::Udp(_)));
}

#[test]
fn conn_key_is_the_same_both_ways() {
    let a = tcp(&Spec::v4(), 1, 2, tcp_flags::ACK, b"");
    let fb = {
        let spec = Spec::v4().swapped();
        let seg = tcp_segment(&spec, 40000, 80, 2, 1, tcp_flags::ACK, &[], b"");
        ip_frame(&spec, IPPROTO_TCP, &seg)
    };
    let (ka, da) = parse(&a).unwrap().conn_key();
    let (kb, db) = parse(&fb).unwrap().conn_key();
    assert_eq!(ka, kb);
    assert_ne!(da, db);
    assert_eq!(ka.to_string(), "tcp 10.0.0.1:40000 <-> 10.0.0.2:80");
    let (karp, _) = parse(&arp([10, 0, 0, 1])).unwrap().conn_key();
    assert_eq!(karp.proto, KeyProto::Ether(ETHERTYPE_ARP));
    let (kping, _) = parse(&ping(&Spec::v6(), 9, 1, b"p")).unwrap().conn_key();
    assert_eq!((kping.proto, kping.lo.1), (KeyProto::Icmpv6, 9));
}

#[test]
fn bad_lengths_are_errors() {
    let frame = tcp(&Spec::v4(), 1, 2, tcp_flags::ACK, b"abc");
    assert!(matches!(
        parse(&frame[..40]),
        Err(ParseError::Truncated { .. })
    ));
    let mut ihl = frame.clone();
    ihl[14] = 0x44;
    assert_eq!(parse(&ihl).unwrap_err(), ParseError::BadIhl(16));
    let mut ver = frame.clone();
    ver[14] = 0x65;
    assert!(matches!(parse(&ver), Err(ParseError::BadIpVersion { .. })));
    let mut doff = frame.clone();
    doff[14 + 20 + 12] = 0x40;
    assert_eq!(parse(&doff).unwrap_err(), ParseError::BadDataOffset(16));
    let mut udpl = udp(&Spec::v4(), b"abc");
    udpl[14 + 20 + 5] = 4;
    assert_eq!(parse(&udpl).unwrap_err(), ParseError::BadUdpLength(4));
    let opts = [8, 40, 0, 0];
    let t = tcp_opts(&Spec::v4(), 1, 2, 0, &opts, b"");
    let f = parse(&t).unwrap();
    let got: Vec<_> = tcp_of(&f).options().collect();
    assert_eq!(got, [Err(ParseError::BadTcpOption { kind: 8, len: 40 })]);
    assert_eq!(tcp_of(&f).timestamp(), None);
}

#[test]
fn checksums() {
    // RFC 1071's example words sum to 0xddf2; the checksum is its complement.
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(internet_checksum(&data), !0xddf2);
    assert_eq!(internet_checksum(&[0xff]), !0xff00);
    let mut with = data.to_vec();
    with.extend_from_slice(&internet_checksum(&data).to_be_bytes());
    assert_eq!(internet_checksum(&with), 0);
}

#[test]
fn rewrite_keeps_the_checksum_right() {
    for spec in [Spec::v4(), Spec::v6()] {
        let mut frame = tcp(&spec, 0xffff_fff0, 77, tcp_flags::ACK, b"payload!");
        let (off, pseudo) = {
            let f = parse(&frame).unwrap();
            (tcp_of(&f).offset, ip_of(&f).header.pseudo())
        };
        let old = rewrite_tcp_u32(&mut frame, off, TcpField::Seq, 0x1234_5678, true).unwrap();
        assert_eq!(old, 0xffff_fff0);
        rewrite_tcp_u32(&mut frame, off, TcpField::Ack, 0, true).unwrap();
        let f = parse(&frame).unwrap();
        let t = tcp_of(&f);
        assert_eq!((t.seq(), t.ack()), (0x1234_5678, 0));
        let seg = &frame[off..];
        assert_eq!(transport_checksum(&pseudo, IPPROTO_TCP, seg, None), 0);
        assert_eq!(
            t.checksum(),
            transport_checksum(&pseudo, IPPROTO_TCP, seg, Some(16))
        );
    }
    assert!(rewrite_tcp_u32(&mut [0; 30], 20, TcpField::Seq, 1, true).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Arbitrary bytes never panic the parser and whatever it accepts is consistent.
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(f) = parse(&bytes) {
            let _ = f.conn_key();
            if let Net::Ip(ip) = f.net {
                prop_assert!(ip.upper_offset + ip.upper.len() <= bytes.len());
                if let Transport::Tcp(t) = ip.transport {
                    prop_assert!(t.data_offset() >= 20);
                    for o in t.options() { let _ = o; }
                    let _ = t.timestamp();
                }
            }
        }
    }

    /// Arbitrary bytes behind a valid Ethernet + IP prefix (the interesting part for the
    /// IP and transport parsers) never panic either.
    #[test]
    fn arbitrary_ip_payload(
        v6 in any::<bool>(),
        vlan in any::<bool>(),
        proto in prop_oneof![Just(6u8), Just(17), Just(1), Just(58), Just(0), Just(44), Just(60), Just(51), any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut spec = if v6 { Spec::v6() } else { Spec::v4() };
        if vlan { spec = spec.vlan(ETHERTYPE_VLAN, 5); }
        let frame = ip_frame(&spec, proto, &body);
        let _ = parse(&frame).map(|f| f.conn_key());
        let _ = ipv6_upper_layer(proto, &body);
        let _ = parse_transport(proto, &body, 0, v6);
    }

    /// Every TCP frame built from arbitrary fields parses back to them, and rewriting
    /// seq/ack with the incremental update leaves a valid checksum.
    #[test]
    fn tcp_round_trip(
        v6 in any::<bool>(),
        seq in any::<u32>(), ack in any::<u32>(), new in any::<u32>(),
        flags in 0u16..0x200,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let spec = if v6 { Spec::v6() } else { Spec::v4() };
        let mut frame = tcp(&spec, seq, ack, flags, &payload);
        let (off, pseudo) = {
            let f = parse(&frame).unwrap();
            let t = tcp_of(&f);
            prop_assert_eq!((t.seq(), t.ack(), t.flags()), (seq, ack, flags));
            prop_assert_eq!(t.payload(), &payload[..]);
            (t.offset, ip_of(&f).header.pseudo())
        };
        rewrite_tcp_u32(&mut frame, off, TcpField::Seq, new, true).unwrap();
        prop_assert_eq!(transport_checksum(&pseudo, IPPROTO_TCP, &frame[off..], None), 0);
    }

    /// RFC 1624's update equals recomputing from scratch, for any data and field.
    #[test]
    fn incremental_update(
        mut data in proptest::collection::vec(any::<u8>(), 8..64),
        at in 0usize..28, new in any::<u32>(),
    ) {
        let at = ((at * 2) % (data.len() - 4)) & !1;
        let before = internet_checksum(&data);
        let old = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        data[at..at + 4].copy_from_slice(&new.to_be_bytes());
        let after = internet_checksum(&data);
        let inc = checksum_update_u32(before, old, new);
        // 0x0000 and 0xffff are the same one's-complement value.
        prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0));
    }
}
