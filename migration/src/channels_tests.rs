//! Tests of multi-channel transfers: byte-exact transfers over socketpairs, loopback TCP and a
//! file; repeated checkpoints; and channels that die or hang, which must fail both ends
//! within the timeout.

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::channels::*;
use super::memory::dirty_ranges;
use super::protocol::StartInfo;
use super::ranges::{MemRange, MemoryLayout, PAGE_SIZE};
use super::testutil::{Fault, Faulty, VecMemory};
use super::transport::{accept_tcp, connect_tcp, Transport};
use super::GuestMemoryWriter;

const MIB: u64 = 1 << 20;

/// One end of each of a transfer's channels.
type Streams = Vec<Box<dyn Transport>>;

/// 2 MiB below a hole, 2 MiB above it.
fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        MemRange::new(0, 2 * MIB),
        MemRange::new(16 * MIB, 2 * MIB),
    ])
    .unwrap()
}

fn start_info() -> StartInfo {
    StartInfo {
        layout: layout(),
        vcpus: 2,
        config_json: "{}".to_owned(),
    }
}

/// Small batches, so even a few MiB spread over many messages and all channels.
fn sender_opts(io_timeout: Duration) -> SenderOptions {
    SenderOptions {
        batch_bytes: 64 * 1024,
        io_timeout,
        ack_timeout: io_timeout,
        ..SenderOptions::default()
    }
}

fn receiver_opts(io_timeout: Duration) -> ReceiverOptions {
    ReceiverOptions {
        io_timeout,
        idle_timeout: 4 * io_timeout,
        ..ReceiverOptions::default()
    }
}

/// `n` socketpairs: (source ends, destination ends).
fn socketpairs(n: usize) -> (Streams, Streams) {
    let mut src: Vec<Box<dyn Transport>> = Vec::new();
    let mut dst: Vec<Box<dyn Transport>> = Vec::new();
    for _ in 0..n {
        let (a, b) = UnixStream::pair().unwrap();
        src.push(Box::new(a));
        dst.push(Box::new(b));
    }
    (src, dst)
}

/// `n` loopback TCP connections: (source ends, destination ends).
fn tcp_pairs(n: u16) -> (Streams, Streams) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = Duration::from_secs(5);
    let connect = thread::spawn(move || connect_tcp(addr, n, t).unwrap());
    let dst = accept_tcp(&l, n, t).unwrap();
    (connect.join().unwrap(), dst)
}

/// Every page of the layout.
fn all_pages() -> Vec<MemRange> {
    layout().regions().to_vec()
}

/// Pages 3..10 and 100 of each region: a second, sparse round.
fn some_pages() -> Vec<MemRange> {
    let mut out = Vec::new();
    for r in layout().regions() {
        let mut bitmap = vec![0u64; (r.len / PAGE_SIZE / 64) as usize];
        bitmap[0] = 0b11_1111_1000;
        bitmap[1] = 1 << (100 - 64);
        dirty_ranges(*r, &bitmap, &mut out).unwrap();
    }
    out
}

/// Source side of a migration: two rounds (full, then sparse after the guest "ran"), state,
/// Complete and Ack.
fn migrate(
    streams: Vec<Box<dyn Transport>>,
    src: Arc<VecMemory>,
    opts: SenderOptions,
) -> Result<Vec<RoundStats>, ChannelError> {
    let mut tx = Sender::new(streams, new_session_id(), opts)?;
    tx.send_start(&start_info())?;
    let mut stats = vec![tx.send_round(&all_pages(), &*src)?];
    for r in some_pages() {
        src.write(r.gpa, &vec![0xee; r.len as usize]).unwrap();
    }
    stats.push(tx.send_round(&some_pages(), &*src)?);
    tx.send_state(b"vcpu and device state")?;
    tx.complete()?;
    Ok(stats)
}

/// Destination side: everything up to Complete, then Ack. Returns the state.
fn receive(
    streams: Vec<Box<dyn Transport>>,
    dst: Arc<VecMemory>,
    opts: ReceiverOptions,
) -> Result<Vec<u8>, ChannelError> {
    let mut rx = Receiver::new(streams, opts)?;
    let start = rx.recv_start()?;
    assert_eq!(start, start_info());
    rx.start_applying(dst)?;
    assert_eq!(rx.next_event()?, Event::RoundDone { round: 1 });
    assert_eq!(rx.next_event()?, Event::RoundDone { round: 2 });
    let Event::State(state) = rx.next_event()? else {
        panic!("expected State")
    };
    assert_eq!(rx.next_event()?, Event::Complete);
    rx.ack()?;
    Ok(state)
}

/// Runs a whole migration and checks the destination ends byte-exact.
fn transfer(src_streams: Vec<Box<dyn Transport>>, dst_streams: Vec<Box<dyn Transport>>) {
    let t = Duration::from_secs(5);
    let src = Arc::new(VecMemory::patterned(&layout(), 1, 5));
    let dst = Arc::new(VecMemory::new(&layout()));
    // Garbage everywhere, so zero pages that were not really written would show.
    dst.write(0, &vec![0x5a; 2 * MIB as usize]).unwrap();
    dst.write(16 * MIB, &vec![0x5a; 2 * MIB as usize]).unwrap();
    let s = Arc::clone(&src);
    let sender = thread::spawn(move || migrate(src_streams, s, sender_opts(t)));
    let state = receive(dst_streams, Arc::clone(&dst), receiver_opts(t)).unwrap();
    let stats = sender.join().unwrap().unwrap();
    assert_eq!(state, b"vcpu and device state");
    assert!(src.snapshot() == dst.snapshot(), "destination differs");
    // Round 1: every fifth page was zero and went as a zero range.
    let p = stats[0].pages;
    assert_eq!(p.data_bytes + p.zero_bytes, 4 * MIB);
    assert!(p.zero_bytes >= 4 * MIB / 5 - 2 * PAGE_SIZE, "{p:?}");
    assert_eq!(stats[1].pages.data_bytes, 16 * PAGE_SIZE);
}

#[test]
fn migration_socketpair_1_channel_is_byte_exact() {
    let (s, d) = socketpairs(1);
    transfer(s, d);
}

#[test]
fn migration_socketpair_4_channels_is_byte_exact() {
    let (s, d) = socketpairs(4);
    transfer(s, d);
}

#[test]
fn migration_tcp_1_channel_is_byte_exact() {
    let (s, d) = tcp_pairs(1);
    transfer(s, d);
}

#[test]
fn migration_tcp_4_channels_is_byte_exact() {
    let (s, d) = tcp_pairs(4);
    // Accept order is arbitrary: the receiver sorts by the headers' channel numbers.
    let d = d.into_iter().rev().collect();
    transfer(s, d);
}

#[test]
fn migration_checkpoints_repeat_over_the_same_channels() {
    let t = Duration::from_secs(5);
    let (s, d) = socketpairs(3);
    let src = Arc::new(VecMemory::patterned(&layout(), 2, 0));
    let dst = Arc::new(VecMemory::new(&layout()));
    let s_mem = Arc::clone(&src);
    let sender = thread::spawn(move || -> Result<(), ChannelError> {
        let mut tx = Sender::new(s, 7, sender_opts(t))?;
        tx.send_start(&start_info())?;
        tx.send_round(&all_pages(), &*s_mem)?;
        tx.send_state(b"checkpoint 1")?;
        tx.complete()?;
        for k in 2..5u8 {
            for r in some_pages() {
                s_mem.write(r.gpa, &vec![k; r.len as usize]).unwrap();
            }
            tx.send_round(&some_pages(), &*s_mem)?;
            tx.send_state(format!("checkpoint {k}").as_bytes())?;
            tx.complete()?;
        }
        Ok(())
    });
    let mut rx = Receiver::new(d, receiver_opts(t)).unwrap();
    assert_eq!(rx.session(), 7);
    rx.recv_start().unwrap();
    rx.start_applying(Arc::clone(&dst) as Arc<dyn GuestMemoryWriter>)
        .unwrap();
    for k in 1..5u64 {
        assert_eq!(rx.next_event().unwrap(), Event::RoundDone { round: k });
        let Event::State(state) = rx.next_event().unwrap() else {
            panic!("expected State")
        };
        // All of this checkpoint's pages are in place when its state arrives.
        assert!(src.snapshot() == dst.snapshot(), "checkpoint {k}");
        assert_eq!(state, format!("checkpoint {k}").as_bytes());
        assert_eq!(rx.next_event().unwrap(), Event::Complete);
        rx.ack().unwrap();
    }
    sender.join().unwrap().unwrap();
    assert!(rx.stats().data_bytes >= 4 * MIB);
}

#[test]
fn migration_snapshot_to_file_and_back() {
    let dir = std::env::temp_dir().join(format!("colovmm-mig-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("snapshot");
    let src = VecMemory::patterned(&layout(), 3, 7);
    {
        let f = std::fs::File::create(&path).unwrap();
        let mut tx = Sender::new(vec![Box::new(f)], 1, SenderOptions::default()).unwrap();
        tx.send_start(&start_info()).unwrap();
        tx.send_round(&all_pages(), &src).unwrap();
        tx.send_state(b"state").unwrap();
        tx.send_complete().unwrap();
    }
    let dst = Arc::new(VecMemory::new(&layout()));
    let f = std::fs::File::open(&path).unwrap();
    let mut rx = Receiver::new(vec![Box::new(f)], ReceiverOptions::default()).unwrap();
    rx.recv_start().unwrap();
    rx.start_applying(Arc::clone(&dst) as Arc<dyn GuestMemoryWriter>)
        .unwrap();
    assert_eq!(rx.next_event().unwrap(), Event::RoundDone { round: 1 });
    assert_eq!(rx.next_event().unwrap(), Event::State(b"state".to_vec()));
    assert_eq!(rx.next_event().unwrap(), Event::Complete);
    assert!(src.snapshot() == dst.snapshot());
    // A snapshot cut short is refused.
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 10).unwrap();
    let mut rx = Receiver::new(
        vec![Box::new(std::fs::File::open(&path).unwrap())],
        ReceiverOptions::default(),
    )
    .unwrap();
    rx.recv_start().unwrap();
    rx.start_applying(Arc::new(VecMemory::new(&layout())))
        .unwrap();
    assert_eq!(rx.next_event().unwrap(), Event::RoundDone { round: 1 });
    assert_eq!(rx.next_event().unwrap(), Event::State(b"state".to_vec()));
    let err = rx.next_event().unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a migration in which source channel `bad` suffers `fault` after `after` bytes, and
/// checks that both ends fail within a few timeouts. Which batches a channel gets is up to the
/// scheduler, so `after` must be small enough to strike on every channel: each writes its
/// 32-byte header, then at least two 24-byte barriers; channel 0 also a 66-byte Start and
/// the 37-byte State.
fn broken_channel(bad: usize, after: u64, fault: Fault) -> (ChannelError, ChannelError) {
    let t = Duration::from_millis(500);
    let (mut s, d) = socketpairs(4);
    let real = s.remove(bad);
    s.insert(bad, Box::new(Faulty::new(real, after, fault)));
    let src = Arc::new(VecMemory::patterned(&layout(), 4, 0));
    let dst = Arc::new(VecMemory::new(&layout()));
    let t0 = Instant::now();
    let sender = thread::spawn(move || {
        let r = migrate(s, src, sender_opts(t));
        (r, t0.elapsed())
    });
    let rx_err = receive(d, dst, receiver_opts(t)).unwrap_err();
    let rx_time = t0.elapsed();
    let (tx, tx_time) = sender.join().unwrap();
    let tx_err = tx.unwrap_err();
    assert!(rx_time < 6 * t, "receiver took {rx_time:?}: {rx_err}");
    assert!(tx_time < 6 * t, "sender took {tx_time:?}: {tx_err}");
    (tx_err, rx_err)
}

#[test]
fn migration_killed_channel_fails_both_ends() {
    let (tx, rx) = broken_channel(2, 70, Fault::Kill);
    // The destination sees streams end early; which one it notices first is a race, since
    // the source shuts them all down when one fails.
    let rx_text = rx.to_string();
    assert!(
        rx_text.contains("truncated") || rx_text.contains("closed"),
        "{rx_text}"
    );
    // The source reports its own dead channel, or the destination's reason.
    let tx_text = tx.to_string();
    assert!(
        tx_text.contains("channel 2") || tx_text.contains("killed"),
        "{tx_text}"
    );
}

#[test]
fn migration_killed_control_channel_fails_both_ends() {
    broken_channel(0, 150, Fault::Kill);
}

#[test]
fn migration_hung_channel_times_out_on_both_ends() {
    let (tx, rx) = broken_channel(3, 70, Fault::Hang);
    assert!(rx.to_string().contains("timed out"), "{rx}");
    // The destination's Error reached the source, as the answer to Complete or next to the
    // source's own error.
    let tx_text = tx.to_string();
    assert!(tx_text.contains("destination"), "{tx_text}");
    assert!(
        tx_text.contains("channel 3: migration stream timed out"),
        "{tx_text}"
    );
}

#[test]
fn migration_destination_death_fails_the_source() {
    let t = Duration::from_millis(500);
    let (s, d) = socketpairs(4);
    let src = Arc::new(VecMemory::patterned(&layout(), 5, 0));
    let t0 = Instant::now();
    let sender = thread::spawn(move || migrate(s, src, sender_opts(t)));
    {
        let mut rx = Receiver::new(d, receiver_opts(t)).unwrap();
        rx.recv_start().unwrap();
        // Dropped here without reading a page: the destination process died.
    }
    assert!(sender.join().unwrap().is_err());
    assert!(t0.elapsed() < 6 * t);
}

#[test]
fn migration_rejected_state_reaches_the_source() {
    let t = Duration::from_secs(5);
    let (s, d) = socketpairs(2);
    let src = Arc::new(VecMemory::patterned(&layout(), 6, 0));
    let sender = thread::spawn(move || migrate(s, src, sender_opts(t)));
    let mut rx = Receiver::new(d, receiver_opts(t)).unwrap();
    rx.recv_start().unwrap();
    rx.start_applying(Arc::new(VecMemory::new(&layout())))
        .unwrap();
    while !matches!(rx.next_event().unwrap(), Event::Complete) {}
    rx.reject("state does not load");
    let err = sender.join().unwrap().unwrap_err();
    assert!(
        matches!(err, ChannelError::Remote(ref m) if m == "state does not load"),
        "{err}"
    );
    assert!(matches!(rx.ack(), Err(ChannelError::AlreadyFailed)));
}

#[test]
fn migration_abandon_is_reported() {
    let t = Duration::from_secs(5);
    let (s, d) = socketpairs(2);
    let sender = thread::spawn(move || {
        let mut tx = Sender::new(s, 1, sender_opts(t)).unwrap();
        tx.send_start(&start_info()).unwrap();
        tx.abandon("cancelled by the operator");
        assert!(matches!(
            tx.send_state(b"x"),
            Err(ChannelError::AlreadyFailed)
        ));
    });
    let mut rx = Receiver::new(d, receiver_opts(t)).unwrap();
    rx.recv_start().unwrap();
    assert_eq!(
        rx.next_event().unwrap(),
        Event::Abandoned("cancelled by the operator".to_owned())
    );
    sender.join().unwrap();
}

#[test]
fn migration_streams_of_different_transfers_are_refused() {
    let t = Duration::from_secs(1);
    // Two senders with different sessions, one channel of each offered as one transfer.
    let (s1, d1) = socketpairs(2);
    let (s2, d2) = socketpairs(2);
    let _a = Sender::new(s1, 1, sender_opts(t)).unwrap();
    let _b = Sender::new(s2, 2, sender_opts(t)).unwrap();
    let mut d1 = d1.into_iter();
    let mut d2 = d2.into_iter();
    let mixed = vec![d1.next().unwrap(), d2.nth(1).unwrap()];
    assert!(matches!(
        Receiver::new(mixed, receiver_opts(t)),
        Err(ChannelError::Mismatch(_))
    ));
    // Channel count disagrees with the streams given.
    assert!(matches!(
        Receiver::new(vec![d1.next().unwrap()], receiver_opts(t)),
        Err(ChannelError::Mismatch(_))
    ));
    assert!(matches!(
        Sender::new(Vec::new(), 1, sender_opts(t)),
        Err(ChannelError::ChannelCount(0))
    ));
    let too_big = SenderOptions {
        batch_bytes: 64 << 20,
        ..SenderOptions::default()
    };
    let (s, _d) = socketpairs(1);
    assert!(matches!(
        Sender::new(s, 1, too_big),
        Err(ChannelError::Options(_))
    ));
}

#[test]
fn migration_pages_before_start_applying_are_refused() {
    let t = Duration::from_secs(2);
    let (s, d) = socketpairs(1);
    let src = VecMemory::patterned(&layout(), 8, 0);
    let mut tx = Sender::new(s, 1, sender_opts(t)).unwrap();
    tx.send_start(&start_info()).unwrap();
    // One small batch fits in the socket buffer, so the sender does not block.
    tx.send_round(&[MemRange::new(0, PAGE_SIZE)], &src).unwrap();
    let mut rx = Receiver::new(d, receiver_opts(t)).unwrap();
    rx.recv_start().unwrap();
    assert!(matches!(rx.next_event(), Err(ChannelError::NotStarted)));
}

#[test]
fn migration_quiet_spells_between_checkpoints_are_not_failures() {
    let t = Duration::from_millis(200);
    let (s, d) = socketpairs(3);
    let src = Arc::new(VecMemory::patterned(&layout(), 9, 0));
    let sender = thread::spawn(move || -> Result<(), ChannelError> {
        let mut tx = Sender::new(s, 1, sender_opts(t))?;
        tx.send_start(&start_info())?;
        for _ in 0..2 {
            // Longer than the I/O timeout: every channel sits idle at a message boundary.
            thread::sleep(3 * t);
            tx.send_round(&some_pages(), &*src)?;
            tx.send_state(b"s")?;
            tx.complete()?;
        }
        Ok(())
    });
    let mut rx = Receiver::new(d, receiver_opts(t)).unwrap();
    rx.recv_start().unwrap();
    rx.start_applying(Arc::new(VecMemory::new(&layout())))
        .unwrap();
    for round in 1..3 {
        assert_eq!(rx.next_event().unwrap(), Event::RoundDone { round });
        assert_eq!(rx.next_event().unwrap(), Event::State(b"s".to_vec()));
        assert_eq!(rx.next_event().unwrap(), Event::Complete);
        rx.ack().unwrap();
    }
    sender.join().unwrap().unwrap();
}

#[test]
fn migration_silent_source_hits_the_idle_timeout() {
    let t = Duration::from_millis(100);
    let (s, d) = socketpairs(2);
    let mut tx = Sender::new(s, 1, sender_opts(t)).unwrap();
    tx.send_start(&start_info()).unwrap();
    let mut rx = Receiver::new(d, receiver_opts(t)).unwrap();
    rx.recv_start().unwrap();
    rx.start_applying(Arc::new(VecMemory::new(&layout())))
        .unwrap();
    let t0 = Instant::now();
    assert!(matches!(rx.next_event(), Err(ChannelError::Idle(_))));
    let waited = t0.elapsed();
    assert!(waited >= 4 * t && waited < 10 * t, "{waited:?}");
    // The source learns at its next step.
    assert!(tx
        .send_round(&some_pages(), &VecMemory::new(&layout()))
        .is_err());
}

/// Throughput of one full round over loopback TCP into fresh (mmap) guest memory, 1 and 4
/// channels, with and without zero-page detection, for guest memory full of data and all
/// zero. Not run by default (it moves a lot of bytes); run with
/// `cargo test -p vmm --lib migration_throughput -- --ignored --nocapture`
/// (`MIGRATION_BENCH_MIB` sets the guest size, default 256).
#[test]
#[ignore]
fn migration_throughput_tcp() {
    use crate::guest::GuestMemory;
    use vm_memory::GuestAddress;
    let ram_ranges = |size: u64| vec![(GuestAddress(0), size as usize)];
    let create_guest_memory = |size: u64| GuestMemory::from_ranges(&ram_ranges(size));
    let mib: u64 = std::env::var("MIGRATION_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mib * MIB;
    let layout = MemoryLayout::new(
        ram_ranges(size)
            .iter()
            .map(|(a, l)| MemRange::new(a.0, *l as u64))
            .collect(),
    )
    .unwrap();
    let full = create_guest_memory(size).unwrap();
    // Every page different and non-zero: zero detection scans a little of each, skips none.
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for r in layout.regions() {
        for i in 0..r.len / PAGE_SIZE {
            page.fill((i % 251) as u8 + 1);
            page[..8].copy_from_slice(&i.to_le_bytes());
            GuestMemoryWriter::write(&full, r.gpa + i * PAGE_SIZE, &page).unwrap();
        }
    }
    let zero = create_guest_memory(size).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for r in layout.regions() {
        // Fault the zero guest's pages in, as a running guest's would be.
        for off in (0..r.len).step_by(MIB as usize) {
            super::GuestMemoryReader::read(&zero, r.gpa + off, &mut buf).unwrap();
        }
    }
    let (full, zero) = (Arc::new(full), Arc::new(zero));
    let run = |src: &Arc<GuestMemory>, channels: u16, detect: bool| -> f64 {
        let dst: Arc<dyn GuestMemoryWriter> = Arc::new(create_guest_memory(size).unwrap());
        let (s, d) = tcp_pairs(channels);
        let ranges = layout.regions().to_vec();
        let start = StartInfo {
            layout: layout.clone(),
            vcpus: 1,
            config_json: "{}".into(),
        };
        let src = Arc::clone(src);
        let t0 = Instant::now();
        let sender = thread::spawn(move || {
            let opts = SenderOptions {
                detect_zero_pages: detect,
                ..SenderOptions::default()
            };
            let mut tx = Sender::new(s, 1, opts).unwrap();
            tx.send_start(&start).unwrap();
            tx.send_round(&ranges, &*src).unwrap();
            tx.complete().unwrap();
        });
        let mut rx = Receiver::new(d, ReceiverOptions::default()).unwrap();
        rx.recv_start().unwrap();
        rx.start_applying(dst).unwrap();
        assert_eq!(rx.next_event().unwrap(), Event::RoundDone { round: 1 });
        assert_eq!(rx.next_event().unwrap(), Event::Complete);
        rx.ack().unwrap();
        sender.join().unwrap();
        t0.elapsed().as_secs_f64()
    };
    run(&full, 1, false); // Warm-up: the first transfer of a process runs slower.
    for (name, src) in [("data", &full), ("zero", &zero)] {
        for channels in [1u16, 4] {
            for detect in [false, true] {
                let secs = run(src, channels, detect);
                eprintln!(
                    "{mib} MiB {name} pages, {channels} channel(s), zero detection {detect}: \
                     {secs:.3} s, {:.0} MB/s",
                    size as f64 / secs / 1e6
                );
            }
        }
    }
}
