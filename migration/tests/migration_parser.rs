//! Arbitrary bytes into the migration stream parser: it never panics, and what it allocates is
//! bounded by its limits and by the bytes that actually arrived, never by what a header claims.
//! A counting allocator watches every allocation the parsing thread makes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;

use migration::protocol::{Limits, Message, StartInfo, StreamHeader, StreamReader, StreamWriter};
use migration::{MemRange, MemoryLayout, PAGE_SIZE};
use proptest::prelude::*;

/// Passes everything to the system allocator, noting the largest request made by a thread
/// while it is watching.
struct Watching;

thread_local! {
    static WATCH: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the allocator runs during thread teardown too, when the slots may be gone.
    let _ = WATCH.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// `note` only touches const-initialized thread-locals, which never allocate.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded unchanged; `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Watching = Watching;

/// The largest single allocation `f` makes on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    WATCH.with(|w| w.set(true));
    f();
    WATCH.with(|w| w.set(false));
    LARGEST.with(|l| l.get())
}

const P: u64 = PAGE_SIZE;

/// Most the reader may allocate at once for `input` bytes of stream: its first 64 KiB step,
/// or twice what has arrived (each step at most doubles the buffer), plus small change.
fn bound(input: usize) -> usize {
    (64 << 10).max(2 * input) + 4096
}

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        MemRange::new(0, 256 * P),
        MemRange::new(1 << 32, 64 * P),
    ])
    .unwrap()
}

/// Parses `bytes` as a whole stream (optionally with the layout preset, as on a data channel),
/// until the first error. Returns how many messages parsed.
fn parse(bytes: &[u8], limits: Limits, preset_layout: bool, with_header: bool) -> usize {
    let mut r = StreamReader::new(bytes, limits);
    if preset_layout {
        r.set_layout(layout());
    }
    if with_header && r.read_header().is_err() {
        return 0;
    }
    let mut n = 0;
    // Every message takes at least 16 bytes, so this ends; the cap is a second guard.
    while n < 10_000 && r.next_message().is_ok() {
        n += 1;
    }
    n
}

/// One message frame, checksummed correctly unless `break_crc`.
fn frame(
    ty: u16,
    flags: u16,
    claimed_len: Option<u64>,
    payload: &[u8],
    break_crc: bool,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&ty.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&claimed_len.unwrap_or(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32(&f) ^ u32::from(break_crc);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// CRC-32 (IEEE), bit by bit: the test's own, so it does not share the code under test.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A plausible frame: a real type (mostly), usually honest length and checksum, a payload
/// that often starts with a small range count.
fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop_oneof![8 => 1u16..=9, 1 => any::<u16>()];
    let flags = prop_oneof![9 => Just(0u16), 1 => any::<u16>()];
    let claimed = prop_oneof![
        8 => Just(None),
        1 => any::<u64>().prop_map(Some),
        1 => (0u64..(128 << 20)).prop_map(Some),
    ];
    let ranges = proptest::collection::vec((0u64..400, 1u64..8), 0..6);
    let payload = (
        ranges,
        proptest::collection::vec(any::<u8>(), 0..300),
        any::<bool>(),
    )
        .prop_map(|(ranges, tail, with_count)| {
            let mut p = Vec::new();
            if with_count {
                p.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                for (page, pages) in ranges {
                    p.extend_from_slice(&(page * P).to_le_bytes());
                    p.extend_from_slice(&(pages * P).to_le_bytes());
                }
            }
            p.extend_from_slice(&tail);
            p
        });
    (ty, flags, claimed, payload, prop::bool::weighted(0.1))
        .prop_map(|(ty, flags, claimed, payload, bad)| frame(ty, flags, claimed, &payload, bad))
}

/// A message the strategies can own (a [`Message`] borrows its bulk data).
#[derive(Clone, Debug)]
enum Owned {
    Pages(Vec<MemRange>, Vec<u8>),
    Zero(Vec<MemRange>),
    Barrier(u64),
    State(Vec<u8>),
    Complete,
    Abandon(String),
    Ack,
    Error(String),
}

impl Owned {
    fn message(&self) -> Message<'_> {
        match self {
            Owned::Pages(r, d) => Message::MemoryPages {
                ranges: Cow::Borrowed(r),
                data: d,
            },
            Owned::Zero(r) => Message::MemoryZero {
                ranges: Cow::Borrowed(r),
            },
            Owned::Barrier(round) => Message::Barrier { round: *round },
            Owned::State(b) => Message::State { blob: b },
            Owned::Complete => Message::Complete,
            Owned::Abandon(r) => Message::Abandon { reason: r },
            Owned::Ack => Message::Ack,
            Owned::Error(m) => Message::Error { message: m },
        }
    }

    /// The message's frame, as the writer makes it.
    fn encode(&self) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), Limits::default());
        w.write_message(&self.message()).unwrap();
        w.into_inner()
    }
}

/// Sorted, disjoint ranges inside [`layout`]: a sparse random set of its pages, coalesced
/// within each region.
fn arb_ranges() -> impl Strategy<Value = Vec<MemRange>> {
    let pages = layout().total_size() / P;
    proptest::collection::vec(prop::bool::weighted(0.04), pages as usize).prop_map(|bits| {
        let mut out: Vec<MemRange> = Vec::new();
        let mut page_gpas = Vec::new();
        for r in layout().regions() {
            for i in 0..r.len / P {
                page_gpas.push((r.gpa + i * P, i == 0));
            }
        }
        for ((gpa, region_start), dirty) in page_gpas.into_iter().zip(bits) {
            if !dirty {
                continue;
            }
            match out.last_mut() {
                Some(last) if !region_start && last.gpa + last.len == gpa => last.len += P,
                _ => out.push(MemRange::new(gpa, P)),
            }
        }
        out
    })
}

/// Any valid message but Start.
fn arb_message() -> impl Strategy<Value = Owned> {
    let text = "[a-z ]{0,40}";
    prop_oneof![
        (arb_ranges(), any::<u8>()).prop_map(|(r, fill)| {
            let len: u64 = r.iter().map(|r| r.len).sum();
            Owned::Pages(r, vec![fill; len as usize])
        }),
        arb_ranges().prop_map(Owned::Zero),
        any::<u64>().prop_map(Owned::Barrier),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(Owned::State),
        Just(Owned::Complete),
        text.prop_map(Owned::Abandon),
        Just(Owned::Ack),
        text.prop_map(Owned::Error),
    ]
}

/// A valid stream of every kind of message.
fn valid_stream() -> Vec<u8> {
    let data = vec![0xa5u8; 2 * P as usize];
    let mut w = StreamWriter::new(Vec::new(), Limits::default());
    w.write_header(&StreamHeader::new(0, 1, 42)).unwrap();
    let msgs = [
        Message::Start(StartInfo {
            layout: layout(),
            vcpus: 1,
            config_json: "{}".into(),
        }),
        Message::MemoryPages {
            ranges: Cow::Owned(vec![MemRange::new(0, P), MemRange::new(1 << 32, P)]),
            data: &data,
        },
        Message::MemoryZero {
            ranges: Cow::Owned(vec![MemRange::new(4 * P, 8 * P)]),
        },
        Message::Barrier { round: 1 },
        Message::State { blob: b"state" },
        Message::Complete,
        Message::Abandon { reason: "r" },
        Message::Ack,
        Message::Error { message: "e" },
    ];
    for m in &msgs {
        w.write_message(m).unwrap();
    }
    w.into_inner()
}

proptest! {
    // No regression files: a failure prints its minimal input, which is the thing to keep.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn migration_parser_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        preset in any::<bool>(),
        with_header in any::<bool>(),
    ) {
        let largest = largest_allocation(|| {
            parse(&bytes, Limits::default(), preset, with_header);
        });
        // Whatever a header claims, the reader allocates in steps of what has arrived.
        prop_assert!(largest <= bound(bytes.len()), "allocated {largest} for {} input bytes", bytes.len());
    }

    #[test]
    fn migration_valid_messages_round_trip(msgs in proptest::collection::vec(arb_message(), 0..10)) {
        let mut bytes = StreamHeader::new(0, 1, 7).encode().to_vec();
        for m in &msgs {
            bytes.extend_from_slice(&m.encode());
        }
        let mut r = StreamReader::new(bytes.as_slice(), Limits::default());
        r.set_layout(layout());
        r.read_header().unwrap();
        for m in &msgs {
            prop_assert_eq!(r.next_message().unwrap(), m.message());
        }
    }

    #[test]
    fn migration_parser_survives_plausible_frames(
        frames in proptest::collection::vec(
            prop_oneof![3 => arb_message().prop_map(|m| m.encode()), 1 => arb_frame()],
            0..12,
        ),
        preset in any::<bool>(),
    ) {
        let mut bytes = StreamHeader::new(0, 1, 7).encode().to_vec();
        for f in &frames {
            bytes.extend_from_slice(f);
        }
        let largest = largest_allocation(|| {
            parse(&bytes, Limits::default(), preset, true);
        });
        prop_assert!(largest <= bound(bytes.len()), "allocated {largest} for {} input bytes", bytes.len());
    }

    #[test]
    fn migration_parser_respects_small_limits(
        frames in proptest::collection::vec(arb_frame(), 0..12),
    ) {
        let limits = Limits {
            max_pages_payload: 2048,
            max_state_payload: 512,
            max_control_payload: 256,
        };
        let mut bytes = StreamHeader::new(0, 1, 7).encode().to_vec();
        for f in &frames {
            bytes.extend_from_slice(f);
        }
        let largest = largest_allocation(|| {
            parse(&bytes, limits, true, true);
        });
        // The payload buffer never outgrows the largest limit; decoded ranges and text are
        // no bigger than the payload they come from.
        prop_assert!(largest <= 2048, "allocated {largest}");
    }

    #[test]
    fn migration_parser_survives_mutated_valid_streams(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let original = valid_stream();
        let mut bytes = original.clone();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] ^= byte | 1,
                1 => bytes.insert(i, byte),
                _ => { bytes.remove(i); }
            }
        }
        let full = 9;
        let n = parse(&bytes, Limits::default(), false, true);
        // Every edit is caught: by the checksums, or because the stream no longer adds up.
        // (An insert and a remove may cancel out.)
        if bytes != original {
            prop_assert!(n < full, "{n} messages parsed from an edited stream");
        }
        let cut = cut.index(bytes.len());
        parse(&bytes[..cut], Limits::default(), false, true);
    }
}

#[test]
fn migration_parser_valid_stream_parses_whole() {
    assert_eq!(parse(&valid_stream(), Limits::default(), false, true), 9);
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
}

#[test]
fn migration_parser_huge_claim_allocates_nothing_big() {
    let mut bytes = StreamHeader::new(0, 1, 7).encode().to_vec();
    bytes.extend_from_slice(&frame(2, 0, Some(1 << 40), &[], false));
    let largest = largest_allocation(|| {
        assert_eq!(parse(&bytes, Limits::default(), true, true), 0);
    });
    assert!(largest < 4096, "allocated {largest}");
}
