//! Tests of the virtio-blk worker with I/O helpers: large requests served in parallel, every
//! request completed exactly once, nothing lost when the worker stops.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::backend::RawFile;
use crate::virtio::block::request::status;
use crate::virtio::net::testutil::{Driver, W};

const QUEUE: u64 = 0;
/// 32 bytes per request: 16-byte header, status byte at +16.
const HDRS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const IMAGE: usize = 8 << 20;

fn image(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("colovmm-blkw-{tag}-{}", std::process::id()));
    let bytes: Vec<u8> = (0..IMAGE).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

struct Rig<'a> {
    mem: &'a GuestMemory,
    drv: Driver<'a>,
    notify: EventFd,
    irq: EventFd,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
    requests: u16,
}

fn rig<'a>(mem: &'a GuestMemory, path: &std::path::Path) -> Rig<'a> {
    rig_with(mem, Box::new(RawFile::open(path, false).unwrap()))
}

fn rig_with(mem: &GuestMemory, backend: Box<dyn BlockBackend>) -> Rig<'_> {
    let drv = Driver::new(mem, QUEUE, 256);
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let counters = Arc::new(BlockCounters::default());
    let worker = Worker::new(
        WorkerSetup {
            mem: mem.clone(),
            queue: ActiveQueue {
                queue: drv.queue(true),
                notify: notify.try_clone().unwrap(),
            },
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            backend,
            id: b"w".to_vec(),
            readonly: false,
            counters: counters.clone(),
            worker_init: None,
        },
        "blk-test",
    );
    Rig {
        mem,
        drv,
        notify,
        irq,
        counters,
        worker: Some(worker),
        requests: 0,
    }
}

impl Rig<'_> {
    /// Queues a read (`write` false) or write of `len` bytes at `sector` with data at `data`.
    fn request(&mut self, write: bool, sector: u64, data: u64, len: u32) {
        let hdr = HDRS + 32 * u64::from(self.requests);
        self.mem
            .write_obj(u32::from(write), GuestAddress(hdr))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(hdr + 16)).unwrap();
        let data_flags = if write { 0 } else { W };
        self.drv
            .add(&[(hdr, 16, 0), (data, len, data_flags), (hdr + 16, 1, W)]);
        self.requests += 1;
    }

    fn status(&self, i: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(HDRS + 32 * u64::from(i) + 16))
            .unwrap()
    }

    fn wait_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.drv.used_idx() != n {
            assert!(
                Instant::now() < deadline,
                "only {} used",
                self.drv.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Large reads and writes go to the helper, small ones stay on the worker; every byte lands
/// where it should, every request is on the used ring once, and the counters add up.
#[test]
fn large_requests_are_served_in_parallel_and_all_complete() {
    let path = image("par");
    let file = std::fs::read(&path).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let mut r = rig(&mem, &path);
    assert!(
        r.worker.as_ref().unwrap().pool.is_some(),
        "a raw file clones: helpers run"
    );
    const BIG: u32 = 512 << 10;
    // 8 big reads, 4 small reads, 2 big writes.
    for i in 0..8u64 {
        r.request(false, i * 1024, DATA + i * u64::from(BIG), BIG);
    }
    for i in 0..4u64 {
        r.request(false, 9000 + i * 8, DATA + (8 << 20) + i * 4096, 4096);
    }
    let wdata: Vec<u8> = (0..BIG as usize * 2).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&wdata, GuestAddress(DATA + (12 << 20)))
        .unwrap();
    for i in 0..2u64 {
        let at = DATA + (12 << 20) + i * u64::from(BIG);
        r.request(true, 12000 + i * 1024, at, BIG);
    }
    let total = r.requests;
    let worker = r.worker.take().unwrap();
    let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kill_worker = kill.try_clone().unwrap();
    let handle = std::thread::spawn(move || worker.run(kill_worker));
    r.notify.write(1).unwrap();
    r.wait_used(total);

    for i in 0..total {
        assert_eq!(r.status(i), status::OK, "request {i}");
    }
    let heads: std::collections::HashSet<u32> = (0..total).map(|i| r.drv.used(i).0).collect();
    assert_eq!(
        heads.len(),
        usize::from(total),
        "each request completed once"
    );
    for i in 0..8u64 {
        let mut got = vec![0u8; BIG as usize];
        mem.read_slice(&mut got, GuestAddress(DATA + i * u64::from(BIG)))
            .unwrap();
        let off = (i * 1024 * 512) as usize;
        assert!(got == file[off..off + BIG as usize], "big read {i}");
    }
    for i in 0..4u64 {
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA + (8 << 20) + i * 4096))
            .unwrap();
        let off = ((9000 + i * 8) * 512) as usize;
        assert!(got == file[off..off + 4096], "small read {i}");
    }
    assert!(r.irq.read().unwrap() >= 1);

    kill.write(1).unwrap();
    let (_backend, queue) = handle.join().unwrap();
    assert_eq!(queue.next_used(), total);
    assert_eq!(queue.next_avail(), total);
    let written = std::fs::read(&path).unwrap();
    let off = 12000 * 512;
    assert!(written[off..off + wdata.len()] == wdata[..]);
    let c = &r.counters;
    assert_eq!(c.read_ops.load(Ordering::Relaxed), 12);
    assert_eq!(
        c.read_bytes.load(Ordering::Relaxed),
        8 * u64::from(BIG) + 4 * 4096
    );
    assert_eq!(c.write_ops.load(Ordering::Relaxed), 2);
    assert_eq!(c.errors.load(Ordering::Relaxed), 0);
    std::fs::remove_file(&path).unwrap();
}

/// Stopping while helpers still work: whatever the worker took off the avail ring is on the
/// used ring when it hands the queue back (a saved queue must not lose requests).
#[test]
fn stopping_completes_what_helpers_hold() {
    let path = image("stop");
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let mut r = rig(&mem, &path);
    for i in 0..8u64 {
        r.request(false, i * 2048, DATA + i * (1 << 20), 1 << 20);
    }
    let worker = r.worker.take().unwrap();
    let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kill_worker = kill.try_clone().unwrap();
    let handle = std::thread::spawn(move || worker.run(kill_worker));
    r.notify.write(1).unwrap();
    // Stop right away, most likely in the middle of the batch.
    kill.write(1).unwrap();
    let (_backend, queue) = handle.join().unwrap();
    assert_eq!(queue.next_used(), queue.next_avail());
    assert_eq!(r.drv.used_idx(), queue.next_used());
    for i in 0..queue.next_used() {
        assert_eq!(r.status(i), status::OK);
    }
    std::fs::remove_file(&path).unwrap();
}

/// A disk that logs what it does and takes 1 ms per 32 KiB written; clones share the log.
#[derive(Clone)]
struct SlowDisk(Arc<std::sync::Mutex<Vec<&'static str>>>);

impl BlockBackend for SlowDisk {
    fn size(&self) -> u64 {
        IMAGE as u64
    }
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn write_at(&mut self, _: u64, buf: &[u8]) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(buf.len() as u64 >> 15));
        self.0.lock().unwrap().push("write");
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().push("flush");
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn try_clone(&self) -> Option<Box<dyn BlockBackend>> {
        Some(Box::new(self.clone()))
    }
}

/// A flush waits for the writes a helper still holds: it covers everything queued before it.
#[test]
fn flush_waits_for_helper_writes() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut r = rig_with(&mem, Box::new(SlowDisk(log.clone())));
    let worker = r.worker.take().unwrap();
    assert!(worker.pool.is_some());
    r.request(true, 0, DATA, 1 << 20); // to the helper, slow
    r.request(true, 2048, DATA, 4096); // on the worker, quick
                                       // A flush: header and status only.
    let hdr = HDRS + 32 * u64::from(r.requests);
    mem.write_obj(FLUSH, GuestAddress(hdr)).unwrap();
    mem.write_obj(0u64, GuestAddress(hdr + 8)).unwrap();
    r.drv.add(&[(hdr, 16, 0), (hdr + 16, 1, W)]);
    r.requests += 1;
    let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kill_worker = kill.try_clone().unwrap();
    let handle = std::thread::spawn(move || worker.run(kill_worker));
    r.wait_used(3);
    kill.write(1).unwrap();
    handle.join().unwrap();
    assert_eq!(*log.lock().unwrap(), ["write", "write", "flush"]);
}

/// A disk whose writes complete only when settled: it logs each write and each settle with
/// how many used entries the guest could see at that moment.
struct SettledDisk {
    log: Arc<std::sync::Mutex<Vec<String>>>,
    used: Arc<dyn Fn() -> u16 + Send + Sync>,
}

impl BlockBackend for SettledDisk {
    fn size(&self) -> u64 {
        IMAGE as u64
    }
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
        let used = (self.used)();
        self.log.lock().unwrap().push(format!("write used={used}"));
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn needs_settle(&self) -> bool {
        true
    }
    fn settle(&mut self) {
        let used = (self.used)();
        self.log.lock().unwrap().push(format!("settle used={used}"));
    }
}

/// A backend that completes at settle: a batch of writes is served, settled once, and only
/// then put on the used ring (COLO's mirror: one round trip per batch, and the guest never
/// hears of a write before the secondary holds it).
#[test]
fn a_settling_backend_completes_a_batch_after_one_settle() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    // The used ring's idx as the guest reads it; its address is known once the rig exists.
    let at = Arc::new(std::sync::OnceLock::<GuestAddress>::new());
    let (probe_mem, probe_at) = (mem.clone(), at.clone());
    let probe: Arc<dyn Fn() -> u16 + Send + Sync> = Arc::new(move || {
        let a = *probe_at.get().expect("set before the worker runs");
        probe_mem.read_obj(a).unwrap()
    });
    let mut r = rig_with(
        &mem,
        Box::new(SettledDisk {
            log: log.clone(),
            used: probe,
        }),
    );
    at.set(r.drv.used_idx_addr()).unwrap();
    for i in 0..4u64 {
        r.request(true, i * 8, DATA + i * 4096, 4096);
    }
    let worker = r.worker.take().unwrap();
    let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kill_worker = kill.try_clone().unwrap();
    let handle = std::thread::spawn(move || worker.run(kill_worker));
    r.notify.write(1).unwrap();
    r.wait_used(4);
    kill.write(1).unwrap();
    handle.join().unwrap();
    let log = log.lock().unwrap().clone();
    // Every write served with nothing on the used ring, then one settle, still nothing on it.
    assert_eq!(
        log,
        [
            "write used=0",
            "write used=0",
            "write used=0",
            "write used=0",
            "settle used=0"
        ]
    );
}
