//! Tests of the wire format: round trips, and a reader that refuses every kind of bad input.

use std::borrow::Cow;

use super::protocol::*;
use super::ranges::{MemRange, MemoryLayout, RangeError, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        MemRange::new(0, 64 * P),
        MemRange::new(1 << 32, 16 * P),
    ])
    .unwrap()
}

fn start() -> StartInfo {
    StartInfo {
        layout: layout(),
        vcpus: 2,
        config_json: r#"{"memory":{"size":"320K"}}"#.to_owned(),
    }
}

/// One of every message, with page data small enough to keep the stream short.
fn samples(data: &[u8]) -> Vec<Message<'_>> {
    vec![
        Message::Start(start()),
        Message::MemoryPages {
            ranges: Cow::Owned(vec![
                MemRange::new(P, P),
                MemRange::new((1 << 32) + 2 * P, P),
            ]),
            data,
        },
        Message::MemoryZero {
            ranges: Cow::Owned(vec![MemRange::new(0, P), MemRange::new(8 * P, 4 * P)]),
        },
        Message::Barrier { round: 7 },
        Message::State {
            blob: b"device state",
        },
        Message::Complete,
        Message::Abandon {
            reason: "operator cancelled",
        },
        Message::Ack,
        Message::Error {
            message: "out of memory",
        },
    ]
}

fn page_data() -> Vec<u8> {
    (0..2 * P).map(|i| (i * 7 % 251) as u8).collect()
}

/// Header plus `msgs`, and the offsets where each message starts.
fn encode(msgs: &[Message<'_>]) -> (Vec<u8>, Vec<usize>) {
    let mut w = StreamWriter::new(Vec::new(), Limits::default());
    w.write_header(&StreamHeader::new(0, 1, 0x1234_5678))
        .unwrap();
    let mut starts = Vec::new();
    for m in msgs {
        starts.push(w.get_ref().len());
        w.write_message(m).unwrap();
    }
    (w.into_inner(), starts)
}

/// Reads a whole stream; `Ok` only if the header and `n` messages parse.
fn parse(bytes: &[u8], n: usize) -> Result<(), ProtocolError> {
    let mut r = StreamReader::new(bytes, Limits::default());
    r.read_header()?;
    for _ in 0..n {
        r.next_message()?;
    }
    match r.next_message() {
        Err(ProtocolError::Closed) => Ok(()),
        Err(e) => Err(e),
        Ok(m) => panic!("extra message {m:?}"),
    }
}

/// A frame with any type, flags and payload, checksummed correctly.
fn raw_frame(ty: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&ty.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// A range-list payload: count, then the ranges, then `tail`.
fn ranges_payload(count: u32, ranges: &[(u64, u64)], tail: &[u8]) -> Vec<u8> {
    let mut p = count.to_le_bytes().to_vec();
    for (gpa, len) in ranges {
        p.extend_from_slice(&gpa.to_le_bytes());
        p.extend_from_slice(&len.to_le_bytes());
    }
    p.extend_from_slice(tail);
    p
}

/// Reads one raw frame with the sample layout in force.
fn read_raw(frame: &[u8]) -> Result<(), ProtocolError> {
    let mut r = StreamReader::new(frame, Limits::default());
    r.set_layout(layout());
    r.next_message().map(|_| ())
}

#[test]
fn migration_every_message_round_trips() {
    let data = page_data();
    let msgs = samples(&data);
    let (bytes, _) = encode(&msgs);
    let mut r = StreamReader::new(bytes.as_slice(), Limits::default());
    assert_eq!(
        r.read_header().unwrap(),
        StreamHeader::new(0, 1, 0x1234_5678)
    );
    for want in &msgs {
        let got = r.next_message().unwrap();
        assert_eq!(&got, want);
    }
    assert!(matches!(r.next_message(), Err(ProtocolError::Closed)));
    // The Start message set the layout that the page messages were checked against.
    assert_eq!(r.layout(), Some(&layout()));
}

#[test]
fn migration_truncation_at_every_offset_is_refused() {
    let data = page_data();
    let msgs = samples(&data);
    let (bytes, starts) = encode(&msgs);
    assert!(parse(&bytes, msgs.len()).is_ok());
    for cut in 0..bytes.len() {
        let err = parse(&bytes[..cut], msgs.len()).unwrap_err();
        let at_boundary = starts.contains(&cut);
        match err {
            ProtocolError::Closed => assert!(at_boundary, "cut {cut}: Closed inside a message"),
            ProtocolError::Truncated { .. } => assert!(!at_boundary, "cut {cut}"),
            other => panic!("cut at {cut}: {other}"),
        }
    }
}

#[test]
fn migration_any_flipped_byte_is_refused() {
    let data = page_data();
    let msgs = samples(&data);
    let (bytes, _) = encode(&msgs);
    for pos in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[pos] ^= mask;
            assert!(
                parse(&bad, msgs.len()).is_err(),
                "flip {mask:#x} at {pos} went unnoticed"
            );
        }
    }
}

#[test]
fn migration_payload_corruption_is_a_checksum_error() {
    let data = page_data();
    let (mut bytes, starts) = encode(&[Message::Start(start()), samples(&data)[1].clone()]);
    let pages_payload = starts[1] + FRAME_HEADER_LEN + 40;
    bytes[pages_payload] ^= 0x10;
    let err = parse(&bytes, 2).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Checksum {
                ty: MessageType::MemoryPages,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn migration_huge_length_fails_before_allocating() {
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&(MessageType::MemoryPages as u16).to_le_bytes());
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut r = StreamReader::new(hdr.as_slice(), Limits::default());
    let err = r.next_message().unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge { len, .. } if len == 1 << 40));
    assert_eq!(r.buffer_capacity(), 0);

    // A length within the limit in a stream that ends early costs what arrived, not what was
    // claimed.
    let mut short = hdr.clone();
    short[4..12].copy_from_slice(&(60u64 << 20).to_le_bytes());
    short.extend_from_slice(&[0u8; 100]);
    let mut r = StreamReader::new(short.as_slice(), Limits::default());
    assert!(matches!(
        r.next_message(),
        Err(ProtocolError::Truncated { got: 100, .. })
    ));
    assert!(r.buffer_capacity() <= 128 * 1024, "{}", r.buffer_capacity());
}

#[test]
fn migration_limits_are_per_type_and_configurable() {
    let limits = Limits {
        max_pages_payload: 64 * 1024,
        max_state_payload: 1000,
        max_control_payload: 100,
    };
    let blob = vec![0u8; 1001];
    let mut w = StreamWriter::new(Vec::new(), limits);
    // The writer refuses what the reader would.
    assert!(matches!(
        w.write_message(&Message::State { blob: &blob }),
        Err(ProtocolError::TooLarge {
            ty: MessageType::State,
            ..
        })
    ));
    let mut w = StreamWriter::new(Vec::new(), Limits::default());
    w.write_message(&Message::State { blob: &blob }).unwrap();
    let bytes = w.into_inner();
    let mut r = StreamReader::new(bytes.as_slice(), limits);
    assert!(matches!(
        r.next_message(),
        Err(ProtocolError::TooLarge { max: 1000, .. })
    ));
    let mut r = StreamReader::new(bytes.as_slice(), Limits::default());
    assert!(r.next_message().is_ok());
}

#[test]
fn migration_fixed_size_messages_must_have_their_size() {
    for (ty, payload) in [
        (MessageType::Barrier, vec![0u8; 7]),
        (MessageType::Barrier, vec![0u8; 9]),
        (MessageType::Complete, vec![0u8; 1]),
        (MessageType::Ack, vec![1u8; 4]),
    ] {
        let err = read_raw(&raw_frame(ty as u16, 0, &payload)).unwrap_err();
        assert!(
            matches!(err, ProtocolError::BadLength { .. }),
            "{ty:?}: {err}"
        );
    }
}

#[test]
fn migration_unknown_types_and_flags_are_refused() {
    assert!(matches!(
        read_raw(&raw_frame(0, 0, &[])),
        Err(ProtocolError::UnknownType(0))
    ));
    assert!(matches!(
        read_raw(&raw_frame(99, 0, &[])),
        Err(ProtocolError::UnknownType(99))
    ));
    assert!(matches!(
        read_raw(&raw_frame(MessageType::Ack as u16, 1, &[])),
        Err(ProtocolError::UnknownMessageFlags { flags: 1, .. })
    ));
}

#[test]
fn migration_bad_stream_headers_are_refused() {
    let good = StreamHeader::new(1, 4, 99).encode();
    assert_eq!(StreamHeader::decode(&good).unwrap().channel, 1);
    let resum = |mut b: [u8; STREAM_HEADER_LEN]| {
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        StreamHeader::decode(&b)
    };
    let mut b = good;
    b[0] = b'X';
    assert!(matches!(
        StreamHeader::decode(&b),
        Err(ProtocolError::BadMagic { .. })
    ));
    let mut b = good;
    b[8] = 2;
    assert!(matches!(
        resum(b),
        Err(ProtocolError::UnsupportedVersion { found: 2 })
    ));
    let mut b = good;
    b[16] ^= 1;
    assert!(matches!(
        StreamHeader::decode(&b),
        Err(ProtocolError::HeaderChecksum)
    ));
    let mut b = good;
    b[10] = 1;
    assert!(matches!(
        resum(b),
        Err(ProtocolError::UnknownStreamFlags(1))
    ));
    let mut b = good;
    b[25] = 1;
    assert!(matches!(resum(b), Err(ProtocolError::ReservedNonZero)));
    for (ch, n) in [(4u16, 4u16), (0, 0), (0, MAX_CHANNELS + 1)] {
        let mut b = good;
        b[12..14].copy_from_slice(&ch.to_le_bytes());
        b[14..16].copy_from_slice(&n.to_le_bytes());
        assert!(
            matches!(resum(b), Err(ProtocolError::BadChannel { .. })),
            "{ch}/{n}"
        );
    }
    let mut r = StreamReader::new(&good[..20], Limits::default());
    assert!(matches!(
        r.read_header(),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn migration_bad_ranges_are_refused() {
    let page = [0u8; P as usize];
    let two = [0u8; 2 * P as usize];
    let pages = |count, ranges: &[(u64, u64)], data: &[u8]| {
        read_raw(&raw_frame(
            MessageType::MemoryPages as u16,
            0,
            &ranges_payload(count, ranges, data),
        ))
    };
    let range_err = |r: Result<(), ProtocolError>| match r {
        Err(ProtocolError::Range { source, .. }) => source,
        other => panic!("{other:?}"),
    };
    assert!(pages(1, &[(P, P)], &page).is_ok());
    assert!(matches!(
        range_err(pages(1, &[(P + 8, P)], &page)),
        RangeError::Misaligned { .. }
    ));
    assert!(matches!(
        range_err(pages(1, &[(P, 100)], &page[..100])),
        RangeError::Misaligned { .. }
    ));
    assert!(matches!(
        range_err(pages(1, &[(P, 0)], &[])),
        RangeError::Empty { .. }
    ));
    assert!(matches!(
        range_err(pages(2, &[(P, P), (P, P)], &two)),
        RangeError::Overlap { .. }
    ));
    assert!(matches!(
        range_err(pages(2, &[(4 * P, P), (P, P)], &two)),
        RangeError::Overlap { .. }
    ));
    // Past the end of RAM, in the hole between the regions, straddling a region's end.
    for gpa in [1u64 << 40, 100 * P, 63 * P] {
        assert!(
            matches!(
                range_err(pages(1, &[(gpa, 2 * P)], &two)),
                RangeError::OutsideMemory { .. }
            ),
            "{gpa:#x}"
        );
    }
    assert!(matches!(
        range_err(pages(1, &[(u64::MAX - P + 1, P)], &page)),
        RangeError::Overflow { .. }
    ));
    // Counts that disagree with the payload.
    for (count, ranges, data) in [
        (3u32, &[(P, P)][..], &[][..]),
        (u32::MAX, &[(P, P)][..], &page[..]),
        (1, &[(P, P)][..], &two[..]),
        (1, &[(P, 2 * P)][..], &page[..]),
    ] {
        let err = pages(count, ranges, data).unwrap_err();
        assert!(
            matches!(err, ProtocolError::BadLength { .. }),
            "{count}: {err}"
        );
    }
    assert!(matches!(
        read_raw(&raw_frame(MessageType::MemoryPages as u16, 0, &[1, 0])),
        Err(ProtocolError::BadLength { .. })
    ));
    // Zero ranges: the same checks, and nothing may follow them.
    let zero = |ranges: &[(u64, u64)], tail: &[u8]| {
        read_raw(&raw_frame(
            MessageType::MemoryZero as u16,
            0,
            &ranges_payload(ranges.len() as u32, ranges, tail),
        ))
    };
    assert!(zero(&[(0, 64 * P)], &[]).is_ok());
    assert!(matches!(
        range_err(zero(&[(0, 65 * P)], &[])),
        RangeError::OutsideMemory { .. }
    ));
    assert!(matches!(
        zero(&[(0, P)], &[0]),
        Err(ProtocolError::BadLength { .. })
    ));
}

#[test]
fn migration_pages_need_a_layout() {
    let frame = raw_frame(
        MessageType::MemoryZero as u16,
        0,
        &ranges_payload(1, &[(0, P)], &[]),
    );
    let mut r = StreamReader::new(frame.as_slice(), Limits::default());
    assert!(matches!(
        r.next_message(),
        Err(ProtocolError::NoLayout(MessageType::MemoryZero))
    ));
}

#[test]
fn migration_bad_start_and_text_are_refused() {
    let start_payload = |size: u64, vcpus: u32, regions: &[(u64, u64)], cfg: &[u8]| {
        let mut p = size.to_le_bytes().to_vec();
        p.extend_from_slice(&vcpus.to_le_bytes());
        p.extend_from_slice(&ranges_payload(regions.len() as u32, regions, cfg));
        raw_frame(MessageType::Start as u16, 0, &p)
    };
    assert!(read_raw(&start_payload(P, 1, &[(0, P)], b"{}")).is_ok());
    assert!(matches!(
        read_raw(&start_payload(2 * P, 1, &[(0, P)], b"{}")),
        Err(ProtocolError::BadStart(_))
    ));
    assert!(matches!(
        read_raw(&start_payload(P, 0, &[(0, P)], b"{}")),
        Err(ProtocolError::BadStart(_))
    ));
    assert!(matches!(
        read_raw(&start_payload(0, 1, &[], b"{}")),
        Err(ProtocolError::Range { .. })
    ));
    assert!(matches!(
        read_raw(&start_payload(P, 1, &[(0, P)], &[0xff, 0xfe])),
        Err(ProtocolError::Utf8(MessageType::Start))
    ));
    assert!(matches!(
        read_raw(&raw_frame(MessageType::Start as u16, 0, &[0; 11])),
        Err(ProtocolError::BadLength { .. })
    ));
    assert!(matches!(
        read_raw(&raw_frame(MessageType::Error as u16, 0, &[0xc3])),
        Err(ProtocolError::Utf8(MessageType::Error))
    ));
}

#[test]
fn migration_writer_refuses_bad_page_messages() {
    let mut w = StreamWriter::new(Vec::new(), Limits::default());
    let page = [0u8; P as usize];
    let bad = [
        Message::MemoryPages {
            ranges: Cow::Owned(vec![MemRange::new(0, P)]),
            data: &page[..10],
        },
        Message::MemoryPages {
            ranges: Cow::Owned(vec![MemRange::new(P, P), MemRange::new(0, P)]),
            data: &[0u8; 2 * P as usize],
        },
        Message::MemoryZero {
            ranges: Cow::Owned(vec![MemRange::new(3, P)]),
        },
    ];
    for m in &bad {
        assert!(w.write_message(m).is_err(), "{m:?}");
    }
    assert!(w.get_ref().is_empty(), "nothing half-written");
}

#[test]
fn migration_quiet_stream_is_idle_but_half_a_message_is_a_timeout() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut r = StreamReader::new(a, Limits::default());
    assert!(matches!(r.next_message(), Err(ProtocolError::Idle)));
    // Still in sync: a message sent now is read whole.
    b.write_all(&raw_frame(MessageType::Ack as u16, 0, &[]))
        .unwrap();
    assert_eq!(r.next_message().unwrap(), Message::Ack);
    b.write_all(&raw_frame(MessageType::Ack as u16, 0, &[])[..5])
        .unwrap();
    assert!(matches!(r.next_message(), Err(ProtocolError::Timeout)));
}
