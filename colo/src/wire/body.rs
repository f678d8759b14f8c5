//! Message bodies on the wire: encoding and validating decoding, connection keys included.

use super::*;

/// Takes fields off the front of a body, refusing to read past its end.
pub(super) struct Fields<'a> {
    pub(super) bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self
            .bytes
            .split_at_checked(N)
            .ok_or(WireError::Malformed("body shorter than its fields"))?;
        self.bytes = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.take().map(u64::from_le_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

pub(super) fn encode_key(key: &ConnKey, out: &mut Vec<u8>) -> Result<(), WireError> {
    for id in key.vlan {
        out.extend_from_slice(&id.to_le_bytes());
    }
    let (proto, value) = match key.proto {
        KeyProto::Tcp => (PROTO_TCP, 0),
        KeyProto::Udp => (PROTO_UDP, 0),
        KeyProto::Icmp => (PROTO_ICMP, 0),
        KeyProto::Icmpv6 => (PROTO_ICMPV6, 0),
        KeyProto::Ip(p) => (PROTO_IP, u16::from(p)),
        KeyProto::Ether(t) => (PROTO_ETHER, t),
    };
    // One family byte for both endpoints: a key from a parsed frame never mixes them.
    let family = match (key.lo.0, key.hi.0) {
        (Addr::Ip(IpAddr::V4(_)), Addr::Ip(IpAddr::V4(_))) => FAMILY_IPV4,
        (Addr::Ip(IpAddr::V6(_)), Addr::Ip(IpAddr::V6(_))) => FAMILY_IPV6,
        (Addr::Mac(_), Addr::Mac(_)) => FAMILY_MAC,
        _ => {
            return Err(WireError::Malformed(
                "connection key endpoints of different address families",
            ))
        }
    };
    out.push(proto);
    out.push(family);
    out.extend_from_slice(&value.to_le_bytes());
    for (addr, port) in [key.lo, key.hi] {
        match addr {
            Addr::Ip(IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
            Addr::Ip(IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
            Addr::Mac(m) => out.extend_from_slice(&m),
        }
        out.extend_from_slice(&port.to_le_bytes());
    }
    Ok(())
}

pub(super) fn decode_endpoint(f: &mut Fields<'_>, family: u8) -> Result<(Addr, u16), WireError> {
    let addr = match family {
        FAMILY_IPV4 => Addr::Ip(IpAddr::V4(Ipv4Addr::from(f.take::<4>()?))),
        FAMILY_IPV6 => Addr::Ip(IpAddr::V6(Ipv6Addr::from(f.take::<16>()?))),
        _ => Addr::Mac(f.take::<6>()?),
    };
    Ok((addr, f.u16()?))
}

/// Reads a connection key, refusing any that [`ConnKey::new`] could not have made.
pub(super) fn decode_key(f: &mut Fields<'_>) -> Result<ConnKey, WireError> {
    let vlan = [f.u16()?, f.u16()?];
    if vlan.iter().any(|&id| id > 0x0fff) {
        return Err(WireError::Malformed("VLAN id above 4095"));
    }
    let (tag, family, value) = (f.u8()?, f.u8()?, f.u16()?);
    let proto = match tag {
        PROTO_TCP => KeyProto::Tcp,
        PROTO_UDP => KeyProto::Udp,
        PROTO_ICMP => KeyProto::Icmp,
        PROTO_ICMPV6 => KeyProto::Icmpv6,
        PROTO_IP => KeyProto::Ip(
            u8::try_from(value).map_err(|_| WireError::Malformed("IP protocol above 255"))?,
        ),
        PROTO_ETHER => KeyProto::Ether(value),
        _ => return Err(WireError::Malformed("unknown protocol in a connection key")),
    };
    if !matches!(proto, KeyProto::Ip(_) | KeyProto::Ether(_)) && value != 0 {
        return Err(WireError::Malformed(
            "protocol value set for TCP, UDP or ICMP",
        ));
    }
    if !matches!(family, FAMILY_IPV4 | FAMILY_IPV6 | FAMILY_MAC) {
        return Err(WireError::Malformed("unknown address family"));
    }
    // What the frame parser produces: ICMP only under IPv4, ICMPv6 only under IPv6 (the other
    // combinations become `Ip(n)`), MAC addresses only for non-IP ethertypes.
    let fits = match proto {
        KeyProto::Icmp => family == FAMILY_IPV4,
        KeyProto::Icmpv6 => family == FAMILY_IPV6,
        KeyProto::Ether(_) => family == FAMILY_MAC,
        KeyProto::Tcp | KeyProto::Udp | KeyProto::Ip(_) => family != FAMILY_MAC,
    };
    if !fits {
        return Err(WireError::Malformed(
            "address family does not fit the protocol",
        ));
    }
    let lo = decode_endpoint(f, family)?;
    let hi = decode_endpoint(f, family)?;
    // An unsorted key would never equal the one the proxy computes for the same flow.
    if lo > hi {
        return Err(WireError::Malformed(
            "connection key endpoints are not in order",
        ));
    }
    match proto {
        KeyProto::Icmp | KeyProto::Icmpv6 if lo.1 != hi.1 => {
            return Err(WireError::Malformed("ICMP key with two echo ids"));
        }
        KeyProto::Ip(_) | KeyProto::Ether(_) if lo.1 != 0 || hi.1 != 0 => {
            return Err(WireError::Malformed(
                "ports in a key of a protocol without ports",
            ));
        }
        _ => {}
    }
    Ok(ConnKey {
        vlan,
        proto,
        lo,
        hi,
    })
}

pub(super) fn encode_body(msg: &Message<'_>, out: &mut Vec<u8>) -> Result<(), WireError> {
    match *msg {
        Message::Hello { version, role } => {
            out.extend_from_slice(&version.to_le_bytes());
            out.push(role_code(role));
            out.push(0);
        }
        Message::Bye { reason } => out.extend_from_slice(reason.as_bytes()),
        Message::Mirror { frame } | Message::SvmOutput { frame } => out.extend_from_slice(frame),
        Message::IsnOffset {
            key,
            guest_dir,
            offset,
            checkpoint,
        } => {
            encode_key(&key, out)?;
            out.push(match guest_dir {
                KeyDir::LoToHi => 0,
                KeyDir::HiToLo => 1,
            });
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&checkpoint.to_le_bytes());
        }
        Message::Epoch { checkpoint } => out.extend_from_slice(&checkpoint.to_le_bytes()),
        Message::DiskAck { writes } => out.extend_from_slice(&writes.to_le_bytes()),
        Message::DiskInfo { disk, size } => {
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        Message::DiskHashes { disk, total, chunk } => {
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&total.to_le_bytes());
            out.extend_from_slice(chunk);
        }
        Message::DiskWrite { disk, offset, data } => {
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(data);
        }
        Message::DiskZeroes { disk, offset, len } => {
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
    Ok(())
}

/// Decodes and validates a body of type `ty` (its length already within the type's limit).
pub(super) fn decode_body(ty: MsgType, body: &[u8]) -> Result<Message<'_>, WireError> {
    let mut f = Fields { bytes: body };
    let msg = match ty {
        MsgType::Hello => {
            // The version first: a later version's hello may have another length.
            let version = f.u16()?;
            if version != VERSION {
                return Err(WireError::Version(version));
            }
            if body.len() != HELLO_LEN {
                return Err(WireError::Malformed("hello of the wrong length"));
            }
            let role = match f.u8()? {
                ROLE_PRIMARY => Side::Primary,
                ROLE_SECONDARY => Side::Secondary,
                _ => return Err(WireError::Malformed("hello with an invalid role")),
            };
            if f.u8()? != 0 {
                return Err(WireError::Malformed("hello reserved byte is not zero"));
            }
            Message::Hello { version, role }
        }
        MsgType::Bye => {
            let reason = std::str::from_utf8(f.rest())
                .map_err(|_| WireError::Malformed("bye reason is not UTF-8"))?;
            // It goes into logs.
            if reason.chars().any(char::is_control) {
                return Err(WireError::Malformed("bye reason has a control character"));
            }
            Message::Bye { reason }
        }
        MsgType::Mirror | MsgType::SvmOutput => {
            let frame = f.rest();
            if frame.len() < MIN_PACKET_LEN {
                return Err(WireError::Malformed(
                    "packet shorter than a vnet header and an Ethernet header",
                ));
            }
            if ty == MsgType::Mirror {
                Message::Mirror { frame }
            } else {
                Message::SvmOutput { frame }
            }
        }
        MsgType::IsnOffset => {
            let key = decode_key(&mut f)?;
            // The rewriter only keeps offsets of TCP connections.
            if key.proto != KeyProto::Tcp {
                return Err(WireError::Malformed(
                    "ISN offset of a connection that is not TCP",
                ));
            }
            let guest_dir = match f.u8()? {
                0 => KeyDir::LoToHi,
                1 => KeyDir::HiToLo,
                _ => return Err(WireError::Malformed("unknown direction")),
            };
            Message::IsnOffset {
                key,
                guest_dir,
                offset: f.u32()?,
                checkpoint: f.u64()?,
            }
        }
        MsgType::Epoch => Message::Epoch {
            checkpoint: f.u64()?,
        },
        MsgType::DiskAck => Message::DiskAck { writes: f.u64()? },
        MsgType::DiskInfo => Message::DiskInfo {
            disk: f.u16()?,
            size: f.u64()?,
        },
        MsgType::DiskHashes => {
            let (disk, total, chunk) = (f.u16()?, f.u64()?, f.rest());
            if chunk.is_empty() {
                return Err(WireError::Malformed("empty hash list chunk"));
            }
            Message::DiskHashes { disk, total, chunk }
        }
        MsgType::DiskWrite => {
            let (disk, offset, data) = (f.u16()?, f.u64()?, f.rest());
            if data.is_empty() {
                return Err(WireError::Malformed("disk write without data"));
            }
            if offset.checked_add(data.len() as u64).is_none() {
                return Err(WireError::Malformed("disk write past 2^64"));
            }
            Message::DiskWrite { disk, offset, data }
        }
        MsgType::DiskZeroes => {
            let (disk, offset, len) = (f.u16()?, f.u64()?, f.u64()?);
            if len == 0 || offset.checked_add(len).is_none() {
                return Err(WireError::Malformed(
                    "disk zeroes of an empty or wrapping range",
                ));
            }
            Message::DiskZeroes { disk, offset, len }
        }
    };
    if !f.bytes.is_empty() {
        return Err(WireError::Malformed("bytes after the message"));
    }
    Ok(msg)
}
