//! Tests of the net worker: tx and rx paths, batching, back-pressure, filters.

use super::*;
use crate::virtio::net::net_features::{GUEST_CSUM, MRG_RXBUF};
use crate::virtio::net::testutil::{fake_tap, memory, Driver, NEXT, W};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

const RXQ: u64 = 0;
const TXQ: u64 = 0x40000;
const DATA: u64 = 0x100000;

struct Rig<'a> {
    mem: &'a GuestMemory,
    rx: Driver<'a>,
    tx: Driver<'a>,
    w: Worker,
    peer: UnixDatagram,
    irq: EventFd,
    counters: Arc<NetCounters>,
    kill: EventFd,
}

fn rig_with(mem: &GuestMemory, acked: u64, filters: FilterChain) -> Rig<'_> {
    rig_opts(mem, acked, filters, true)
}

fn rig_opts(mem: &GuestMemory, acked: u64, filters: FilterChain, event_idx: bool) -> Rig<'_> {
    let rx = Driver::new(mem, RXQ, 256);
    let tx = Driver::new(mem, TXQ, 256);
    let (tap, peer) = fake_tap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let counters = Arc::new(NetCounters::default());
    let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let active = |d: &Driver| ActiveQueue {
        queue: d.queue(event_idx),
        notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    let setup = WorkerSetup {
        mem: mem.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        rx: active(&rx),
        tx: active(&tx),
        acked_features: acked,
        tap,
        filters,
        counters: counters.clone(),
        kill: kill.try_clone().unwrap(),
    };
    let w = Worker::new(setup).map_err(|e| e.0).unwrap();
    Rig {
        mem,
        rx,
        tx,
        w,
        peer,
        irq,
        counters,
        kill,
    }
}

fn rig(mem: &GuestMemory, acked: u64) -> Rig<'_> {
    rig_with(mem, acked, FilterChain::new().unwrap())
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ tag).collect();
    f[..VNET_HDR_LEN].fill(0);
    f
}

impl Rig<'_> {
    /// The guest queues `bytes` as one tx chain split into pieces of `piece` bytes.
    fn guest_send(&mut self, at: u64, bytes: &[u8], piece: usize) -> u16 {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        let descs: Vec<_> = bytes
            .chunks(piece)
            .scan(at, |a, c| {
                let d = (*a, c.len() as u32, 0);
                *a += c.len() as u64;
                Some(d)
            })
            .collect();
        self.tx.add(&descs)
    }

    fn tap_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; RX_BUFFER_LEN];
        self.peer.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    fn irqs(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    fn guest_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

#[test]
fn tx_chain_reaches_the_tap_byte_for_byte() {
    let mem = memory();
    let mut r = rig(&mem, 0);
    let f = frame(1, 1514 + 12);
    // Header alone in the first descriptor, the rest split unevenly, as drivers do.
    r.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    let head = r.tx.add(&[
        (DATA, 12, 0),
        (DATA + 12, 1000, 0),
        (DATA + 1012, (f.len() - 1012) as u32, 0),
    ]);
    r.w.process_tx();
    assert_eq!(r.tap_recv().unwrap(), f);
    assert_eq!(r.tx.used_idx(), 1);
    assert_eq!(r.tx.used(0), (u32::from(head), 0));
    assert_eq!(r.irqs(), 1, "used_event 0 asks for the first interrupt");
    let s = r.counters.snapshot();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, 1514));
}

#[test]
fn malformed_tx_chains_are_returned_and_the_worker_goes_on() {
    let mem = memory();
    let mut r = rig(&mem, 0);
    let good: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 60 + usize::from(i))).collect();
    let raw = |addr: u64, len: u32, flags: u16, next: u16| {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    };
    let mut bad_heads = Vec::new();
    for (i, g) in good.iter().enumerate() {
        r.guest_send(DATA + 0x10000 * i as u64, g, 32);
        let n = r.tx.next_desc();
        let bad: Vec<RawDescriptor> = match i {
            // Outside guest memory (8 MiB).
            0 => vec![raw(0x4000_0000, 64, 0, 0)],
            // A device-writable descriptor in a tx chain.
            1 => vec![raw(DATA, 12, NEXT, n + 1), raw(DATA, 64, W, 0)],
            // A loop: each descriptor points at the other.
            2 => vec![raw(DATA, 40, NEXT, n + 1), raw(DATA, 40, NEXT, n)],
            // A length no frame can have.
            3 => vec![raw(DATA, 0xffff_ffff, 0, 0)],
            // A link to a descriptor index past the table.
            _ => vec![raw(DATA, 12, NEXT, 999)],
        };
        bad_heads.push(r.tx.add_raw(&bad));
    }
    r.w.process_tx();
    for g in &good {
        assert_eq!(&r.tap_recv().unwrap(), g);
    }
    assert!(r.tap_recv().is_none(), "no malformed frame reached the tap");
    assert_eq!(r.tx.used_idx(), 10);
    for i in 0..10 {
        assert_eq!(r.tx.used(i).1, 0);
    }
    let returned: Vec<u32> = (0..10).map(|i| r.tx.used(i).0).collect();
    for h in bad_heads {
        assert!(returned.contains(&u32::from(h)), "bad chain {h} kept");
    }
    let s = r.counters.snapshot();
    assert_eq!((s.tx_packets, s.tx_bad_chains, s.tx_dropped), (5, 5, 0));

    // Still working afterwards.
    let again = frame(9, 100);
    r.guest_send(DATA + 0x80000, &again, 100);
    r.w.process_tx();
    assert_eq!(r.tap_recv().unwrap(), again);
}

#[test]
fn a_full_tap_holds_the_frame_until_writable() {
    let mem = memory();
    let mut r = rig(&mem, 0);
    // A connected datagram socketpair is bounded by the sender's SO_SNDBUF (~200 KiB):
    // 1 MiB of frames the peer does not read makes the fake tap answer EAGAIN.
    let frames: Vec<Vec<u8>> = (0..64).map(|i| frame(i, 16000)).collect();
    for (i, f) in frames.iter().enumerate() {
        r.guest_send(DATA + 0x4000 * i as u64, f, 4000);
    }
    r.w.process_tx();
    assert!(r.w.tx.pending.is_some(), "expected the fake tap to fill up");
    assert!(r.w.tap_events.contains(EventSet::OUT));
    let consumed = r.tx.used_idx();
    assert!(consumed < 64, "the queue waits behind the held frame");

    let mut got = Vec::new();
    for _ in 0..100 {
        while let Some(f) = r.tap_recv() {
            got.push(f);
        }
        if got.len() == frames.len() {
            break;
        }
        r.w.on_tap(EventSet::OUT);
    }
    assert_eq!(got, frames, "every frame, in order, none dropped");
    assert!(r.w.tx.pending.is_none());
    assert!(!r.w.tap_events.contains(EventSet::OUT));
    assert_eq!(r.counters.snapshot().tx_dropped, 0);
}

#[test]
fn batches_keep_kicks_and_interrupts_well_below_one_per_packet() {
    let mem = memory();
    let mut r = rig(&mem, 0);
    for i in 0..64u64 {
        r.guest_send(DATA + 0x1000 * i, &frame(i as u8, 200), 200);
    }
    // A driver that wants to hear about completions only at the end of its burst.
    r.tx.set_used_event(63);
    r.w.process_tx();
    for _ in 0..64 {
        r.tap_recv().unwrap();
    }
    assert_eq!(r.irqs(), 1, "one interrupt for 64 frames");
    // The guest's next kick is asked for only when it queues past what we consumed.
    assert_eq!(r.tx.avail_event(), 64);
}

fn rx_buffers(r: &mut Rig, n: u64, size: u32) -> Vec<u16> {
    (0..n)
        .map(|i| r.rx.add(&[(DATA + 0x20000 * i, size, W)]))
        .collect()
}

#[test]
fn rx_merges_a_frame_across_two_buffers() {
    let mem = memory();
    let mut r = rig(&mem, MRG_RXBUF);
    let heads = rx_buffers(&mut r, 2, 1000);
    let f = frame(3, 1500);
    r.peer.send(&f).unwrap();
    r.w.on_tap(EventSet::IN);
    assert_eq!(r.rx.used_idx(), 2);
    assert_eq!(r.rx.used(0), (u32::from(heads[0]), 1000));
    assert_eq!(r.rx.used(1), (u32::from(heads[1]), 500));
    let mut got = r.guest_bytes(DATA, 1000);
    got.extend(r.guest_bytes(DATA + 0x20000, 500));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    got[10..12].fill(0);
    assert_eq!(got, f);
    assert_eq!(r.irqs(), 1);
    let s = r.counters.snapshot();
    assert_eq!((s.rx_packets, s.rx_bytes), (1, 1488));
}

#[test]
fn rx_without_buffers_holds_the_frame_and_stops_reading() {
    let mem = memory();
    let mut r = rig(&mem, MRG_RXBUF);
    let (a, b) = (frame(1, 300), frame(2, 400));
    r.peer.send(&a).unwrap();
    r.w.on_tap(EventSet::IN);
    assert!(r.w.rx.pending.is_some());
    assert!(
        !r.w.tap_events.contains(EventSet::IN),
        "no tap reads while the guest has no room"
    );
    // The driver is asked to notify on its next buffer.
    assert_eq!(r.rx.avail_event(), 0);
    r.peer.send(&b).unwrap();

    rx_buffers(&mut r, 1, 2048);
    r.w.on_rx_notify();
    // a went in; b was read next and now waits for the next buffer.
    assert_eq!(r.rx.used_idx(), 1);
    let mut got = r.guest_bytes(DATA, a.len());
    got[10..12].fill(0);
    assert_eq!(got, a);
    assert!(r.w.rx.pending.is_some());
    assert_eq!(r.rx.avail_event(), 1);

    r.rx.add(&[(DATA + 0x20000, 2048, W)]);
    r.w.on_rx_notify();
    assert_eq!(r.rx.used_idx(), 2);
    let mut got = r.guest_bytes(DATA + 0x20000, b.len());
    got[10..12].fill(0);
    assert_eq!(got, b);
    assert!(r.w.rx.pending.is_none());
    assert!(r.w.tap_events.contains(EventSet::IN));
    assert_eq!(r.counters.snapshot().rx_dropped, 0);
}

#[test]
fn without_event_idx_rx_kicks_are_wanted_only_while_waiting_for_buffers() {
    let mem = memory();
    let mut r = rig_opts(&mem, MRG_RXBUF, FilterChain::new().unwrap(), false);
    const NO_NOTIFY: u16 = 1;
    r.w.set_rx_notify(false);
    r.peer.send(&frame(1, 100)).unwrap();
    r.w.on_tap(EventSet::IN);
    assert_eq!(r.rx.used_flags(), 0, "stalled: the driver must kick us");
    rx_buffers(&mut r, 1, 2048);
    r.w.on_rx_notify();
    assert_eq!(r.rx.used_idx(), 1);
    assert_eq!(r.rx.used_flags(), NO_NOTIFY, "not stalled: no rx kicks");
    // Tx: off during the batch, back on (0) once the queue is empty.
    r.guest_send(DATA, &frame(2, 64), 64);
    r.w.process_tx();
    assert_eq!(r.tx.used_flags(), 0);
    assert_eq!(r.irqs(), 2, "one interrupt per batch without used_event");
}

#[test]
fn rx_reserves_partial_buffers_and_gives_them_back_on_exit() {
    let mem = memory();
    let mut r = rig(&mem, MRG_RXBUF);
    rx_buffers(&mut r, 2, 1000);
    r.peer.send(&frame(5, 5000)).unwrap();
    r.w.on_tap(EventSet::IN);
    // Two buffers reserved, not enough: nothing used, the frame waits, and the driver's next
    // buffer (index 2) will notify us.
    assert_eq!(r.rx.used_idx(), 0);
    assert!(r.w.rx.pending.is_some());
    assert_eq!(r.rx.avail_event(), 2);
    let exit = r.w.into_exit();
    assert_eq!(
        exit.queues[0].next_avail(),
        0,
        "reserved buffers are not lost"
    );
}

#[test]
fn rx_without_mrg_drops_what_cannot_fit_and_keeps_the_buffer() {
    let mem = memory();
    let mut r = rig(&mem, GUEST_CSUM);
    let head = rx_buffers(&mut r, 1, 1000)[0];
    let mut big = frame(1, 1500);
    big[0] = 1; // NEEDS_CSUM: kept, the guest negotiated GUEST_CSUM
    let small = {
        let mut s = frame(2, 100);
        s[0] = 1;
        s
    };
    r.peer.send(&big).unwrap();
    r.peer.send(&small).unwrap();
    r.w.on_tap(EventSet::IN);
    assert_eq!(r.rx.used_idx(), 1);
    assert_eq!(r.rx.used(0), (u32::from(head), 100));
    let got = r.guest_bytes(DATA, 100);
    assert_eq!(&got[12..], &small[12..]);
    assert_eq!(got[0], 1);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(r.counters.snapshot().rx_dropped, 1);
}

#[test]
fn rx_header_flags_cleared_without_guest_csum() {
    let mem = memory();
    let mut r = rig(&mem, 0);
    rx_buffers(&mut r, 1, 2048);
    let mut f = frame(1, 100);
    f[0] = 2; // DATA_VALID from the tap
    r.peer.send(&f).unwrap();
    r.w.on_tap(EventSet::IN);
    assert_eq!(r.guest_bytes(DATA, 1)[0], 0);
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mem = memory();
    let mut r = rig(&mem, MRG_RXBUF);
    let readable = r.rx.add(&[(DATA, 2048, 0)]);
    let outside = r.rx.add(&[(0x4000_0000, 2048, W)]);
    let tiny = r.rx.add(&[(DATA, 4, W)]);
    let good = r.rx.add(&[(DATA + 0x20000, 2048, W)]);
    let f = frame(1, 500);
    r.peer.send(&f).unwrap();
    r.w.on_tap(EventSet::IN);
    assert_eq!(r.rx.used_idx(), 4);
    let used: Vec<_> = (0..4).map(|i| r.rx.used(i)).collect();
    for bad in [readable, outside, tiny] {
        assert!(used.contains(&(u32::from(bad), 0)));
    }
    assert!(used.contains(&(u32::from(good), 500)));
    assert_eq!(r.counters.snapshot().rx_bad_chains, 3);
    assert_eq!(r.counters.snapshot().rx_packets, 1);
}

/// Rewrites the last frame byte on tx; drops rx frames whose last byte is 0xdd; holds rx
/// frames whose last byte is 0x11 and injects them back (as received) at once.
struct TestFilter {
    seen: Arc<Mutex<Vec<Direction>>>,
}
impl crate::virtio::net::PacketFilter for TestFilter {
    fn name(&self) -> &str {
        "test"
    }
    fn process(
        &mut self,
        dir: Direction,
        pkt: &mut Packet,
        inject: &crate::virtio::net::Injector,
    ) -> Verdict {
        self.seen.lock().unwrap().push(dir);
        let last = pkt.frame().last().copied();
        match (dir, last) {
            (Direction::Tx, _) => {
                if let Some(b) = pkt.frame_mut().last_mut() {
                    *b = 0xee;
                }
                Verdict::Pass
            }
            (Direction::Rx, Some(0xdd)) => Verdict::Drop,
            (Direction::Rx, Some(0x11)) => {
                inject.inject(Direction::Rx, pkt.take()).unwrap();
                Verdict::Hold
            }
            _ => Verdict::Pass,
        }
    }
}

#[test]
fn filters_modify_drop_hold_and_inject() {
    let mem = memory();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut chain = FilterChain::new().unwrap();
    chain.push(Box::new(TestFilter { seen: seen.clone() }));
    let mut r = rig_with(&mem, MRG_RXBUF, chain);

    let f = frame(1, 80);
    r.guest_send(DATA, &f, 80);
    r.w.process_tx();
    let mut want = f.clone();
    *want.last_mut().unwrap() = 0xee;
    assert_eq!(r.tap_recv().unwrap(), want);

    rx_buffers(&mut r, 4, 2048);
    let mut dropped = frame(2, 90);
    *dropped.last_mut().unwrap() = 0xdd;
    let mut held = frame(3, 90);
    *held.last_mut().unwrap() = 0x11;
    r.peer.send(&dropped).unwrap();
    r.peer.send(&held).unwrap();
    r.w.on_tap(EventSet::IN);
    // The held frame was injected; injected frames do not cross the filters again.
    r.w.on_injected();
    assert_eq!(r.rx.used_idx(), 1);
    let mut got = r.guest_bytes(DATA, 90);
    got[10..12].fill(0);
    assert_eq!(got, held);
    assert_eq!(
        *seen.lock().unwrap(),
        [Direction::Tx, Direction::Rx, Direction::Rx]
    );
    let s = r.counters.snapshot();
    assert_eq!(
        (s.rx_dropped, s.rx_held, s.rx_injected, s.rx_packets),
        (1, 1, 1, 1)
    );
}

#[test]
fn runs_on_a_thread_until_killed() {
    let mem = memory();
    let mut chain = FilterChain::new().unwrap();
    let inj = chain.injector();
    chain.push(Box::new(TestFilter {
        seen: Arc::new(Mutex::new(Vec::new())),
    }));
    let mut r = rig_with(&mem, MRG_RXBUF, chain);
    rx_buffers(&mut r, 2, 2048);
    let Rig {
        w,
        peer,
        kill,
        counters,
        rx,
        ..
    } = r;
    let handle = std::thread::spawn(move || w.run());
    let f = frame(4, 300);
    peer.send(&f).unwrap();
    // Injected from yet another thread, straight to the tap, unfiltered.
    let tx_pkt = frame(5, 64);
    let to_send = tx_pkt.clone();
    std::thread::spawn(move || {
        inj.inject(Direction::Tx, Packet::new(to_send).unwrap())
            .unwrap()
    })
    .join()
    .unwrap();
    peer.set_nonblocking(false).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &tx_pkt[..]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while counters.snapshot().rx_packets < 1 {
        assert!(Instant::now() < deadline, "rx frame never delivered");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(rx.used_idx(), 1);
    kill.write(1).unwrap();
    let exit = handle.join().unwrap();
    assert_eq!(exit.queues.len(), 2);
    assert_eq!(exit.queues[0].next_used(), 1);
    assert_eq!(exit.filters.len(), 1, "the chain comes back");
}
