//! Plumbing for the COLO protocol tests: a mock VM (guest RAM in two regions, a dirty log,
//! pause/resume, opaque state), a mock secondary host, a recording observer, a TCP proxy that
//! can cut, freeze or corrupt the primary's connections, and a harness that starts a primary
//! and a secondary over loopback TCP. No KVM anywhere.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo::{
    start_primary, start_secondary, ColoExit, Observer, PrimaryConfig, ProtectedVm, Protection,
    SecondaryConfig, SecondaryHost,
};
use migration::{AccessError, DirtyBitmap, GuestMemoryReader, MemRange, PAGE_SIZE};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const HB_INTERVAL: Duration = Duration::from_millis(20);
pub const HB_TIMEOUT: Duration = Duration::from_millis(300);
/// Upper bound on every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Guest RAM of every mock VM: 4 MiB at 0 and 1 MiB at 1 GiB.
pub fn test_regions() -> Vec<MemRange> {
    vec![MemRange::new(0, 4 * MIB), MemRange::new(GIB, MIB)]
}

// ---------------------------------------------------------------------------------------------
// Random numbers (SplitMix64; no crate needed).

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Seeded from the clock and a process-wide counter.
    pub fn seeded() -> Self {
        static N: AtomicU64 = AtomicU64::new(1);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng::new(t ^ N.fetch_add(0x1234_5678_9abc, Ordering::Relaxed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The mock VM.

/// Guest RAM: one buffer per region.
pub struct MockMemory {
    regions: Vec<MemRange>,
    data: Vec<Mutex<Vec<u8>>>,
}

impl MockMemory {
    /// Region index and offset of `gpa..gpa+len`, if it lies inside one region.
    fn locate(&self, gpa: u64, len: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.gpa + r.len))
            .map(|i| (i, (gpa - self.regions[i].gpa) as usize))
    }
}

impl GuestMemoryReader for MockMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let (i, off) = self
            .locate(gpa, buf.len() as u64)
            .ok_or_else(|| format!("read {gpa:#x}+{:#x} outside guest RAM", buf.len()))?;
        let d = lock(&self.data[i]);
        buf.copy_from_slice(&d[off..off + buf.len()]);
        Ok(())
    }
}

#[derive(Default)]
struct Ctl {
    paused: bool,
    logging: bool,
    /// One bitmap per region, bit i = page i.
    dirty: Vec<Vec<u64>>,
    /// Pages the guest wrote (its "vCPU state" moves with it).
    mutations: u64,
    /// Every state `save_state` returned, in order.
    saved: Vec<Vec<u8>>,
    /// Every state `load_state` got, in order.
    loaded: Vec<Vec<u8>>,
    ram_writes: u64,
    ram_writes_since_load: u64,
    pauses: u64,
    resumes: u64,
    /// Calls that broke the ProtectedVm contract.
    violations: Vec<String>,
}

/// A VM with no vCPUs: a guest is simulated by a [`Mutator`] thread writing random pages while
/// the VM runs. `save_state`, `load_state` and `write_ram` refuse to run on a running VM.
pub struct MockVm {
    pub name: String,
    memory: MockMemory,
    ctl: Mutex<Ctl>,
    nic: Mutex<Option<Arc<MockNic>>>,
    /// The disks block replication sees (the PVM's, from [`PRIMARY_DISKS`]).
    pub disks: Vec<colo::vm::ProtectedDisk>,
}

/// A NIC of a mock VM: the filter chain a virtio-net worker would run, driven by the test —
/// `process(Rx)` is a frame from the tap, `process(Tx)` one the guest sends,
/// `next_injected` what the proxy released to the tap (Tx) or the guest (Rx).
pub struct MockNic {
    pub chain: Mutex<devices::virtio::net::FilterChain>,
    protected: colo::vm::ProtectedNic,
}

impl MockNic {
    pub fn new(tap: &str) -> Arc<MockNic> {
        let chain = devices::virtio::net::FilterChain::new().expect("filter chain");
        let protected = colo::vm::ProtectedNic {
            tap: tap.into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            slot: chain.slot(),
        };
        Arc::new(MockNic {
            chain: Mutex::new(chain),
            protected,
        })
    }

    /// Runs `frame` through the chain in `dir`; the verdict and the frame as it left.
    pub fn process(
        &self,
        dir: devices::virtio::net::Direction,
        frame: &[u8],
    ) -> (devices::virtio::net::Verdict, Vec<u8>) {
        let mut pkt = devices::virtio::net::Packet::from_frame(frame);
        let v = lock(&self.chain).process(dir, &mut pkt);
        (v, pkt.frame().to_vec())
    }

    /// The next packet the proxy injected in `dir` (its Ethernet frame).
    pub fn injected(&self, dir: devices::virtio::net::Direction) -> Option<Vec<u8>> {
        lock(&self.chain)
            .next_injected(dir)
            .map(|p| p.frame().to_vec())
    }

    /// Whether a filter is in the chain's slot.
    pub fn filtered(&self) -> bool {
        self.protected.slot.is_armed()
    }
}

thread_local! {
    /// Whether the next VMs made on this thread (the PVM, and the SVM of the next secondary)
    /// have a NIC.
    pub static WITH_NICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl MockVm {
    pub fn new(name: &str, regions: &[MemRange], paused: bool) -> Arc<Self> {
        let data = regions
            .iter()
            .map(|r| Mutex::new(vec![0u8; r.len as usize]))
            .collect();
        let dirty = regions.iter().map(|r| vec![0u64; words(r.len)]).collect();
        Arc::new(MockVm {
            name: name.into(),
            memory: MockMemory {
                regions: regions.to_vec(),
                data,
            },
            ctl: Mutex::new(Ctl {
                paused,
                dirty,
                ..Ctl::default()
            }),
            nic: Mutex::new(None),
            disks: if name == "pvm" {
                PRIMARY_DISKS.with(|d| d.borrow().clone())
            } else {
                Vec::new()
            },
        })
    }

    /// Gives the VM a NIC.
    pub fn add_nic(&self, tap: &str) -> Arc<MockNic> {
        let nic = MockNic::new(tap);
        *lock(&self.nic) = Some(nic.clone());
        nic
    }

    /// The VM's NIC, if it has one.
    pub fn nic(&self) -> Option<Arc<MockNic>> {
        lock(&self.nic).clone()
    }

    /// Fills the first `fraction` of every region with random bytes (the rest stays zero),
    /// bypassing the dirty log (the guest's memory before protection starts).
    pub fn fill_random(&self, rng: &mut Rng, fraction: f64) {
        for (r, d) in self.memory.regions.iter().zip(&self.memory.data) {
            let n = ((r.len as f64 * fraction) as u64 / PAGE_SIZE * PAGE_SIZE) as usize;
            rng.fill(&mut lock(d)[..n]);
        }
    }

    /// The guest writes one random page (one in eight all zeroes) if the VM runs.
    pub fn mutate(&self, rng: &mut Rng) -> bool {
        let mut c = lock(&self.ctl);
        if c.paused {
            return false;
        }
        let total: u64 = self.memory.regions.iter().map(|r| r.len / PAGE_SIZE).sum();
        let mut page = rng.below(total);
        let mut i = 0;
        while page >= self.memory.regions[i].len / PAGE_SIZE {
            page -= self.memory.regions[i].len / PAGE_SIZE;
            i += 1;
        }
        let off = (page * PAGE_SIZE) as usize;
        {
            let mut d = lock(&self.memory.data[i]);
            let p = &mut d[off..off + PAGE_SIZE as usize];
            if rng.below(8) == 0 {
                p.fill(0);
            } else {
                rng.fill(p);
            }
        }
        if c.logging {
            c.dirty[i][(page / 64) as usize] |= 1 << (page % 64);
        }
        c.mutations += 1;
        true
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.ctl).paused
    }

    /// The user resumes the VM (after a checkpoint with pause-after).
    pub fn resume_by_user(&self) {
        lock(&self.ctl).paused = false;
    }

    /// All of guest RAM, one buffer per region (consistent: the guest cannot write meanwhile).
    pub fn ram(&self) -> Vec<Vec<u8>> {
        let _c = lock(&self.ctl);
        self.memory.data.iter().map(|d| lock(d).clone()).collect()
    }

    pub fn saved(&self) -> Vec<Vec<u8>> {
        lock(&self.ctl).saved.clone()
    }

    pub fn loaded(&self) -> Vec<Vec<u8>> {
        lock(&self.ctl).loaded.clone()
    }

    pub fn mutations(&self) -> u64 {
        lock(&self.ctl).mutations
    }

    pub fn ram_writes(&self) -> u64 {
        lock(&self.ctl).ram_writes
    }

    pub fn ram_writes_since_load(&self) -> u64 {
        lock(&self.ctl).ram_writes_since_load
    }

    /// (pauses by COLO that paused a running VM, resumes).
    pub fn pause_counts(&self) -> (u64, u64) {
        let c = lock(&self.ctl);
        (c.pauses, c.resumes)
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.ctl).violations.clone()
    }

    fn refuse_if_running(&self, c: &mut Ctl, what: &str) -> Result<(), String> {
        if c.paused {
            return Ok(());
        }
        let v = format!("{}: {what} while the VM runs", self.name);
        c.violations.push(v.clone());
        Err(v)
    }
}

fn words(len: u64) -> usize {
    (len / PAGE_SIZE).div_ceil(64) as usize
}

impl ProtectedVm for MockVm {
    fn regions(&self) -> Vec<MemRange> {
        self.memory.regions.clone()
    }

    fn memory(&self) -> &dyn GuestMemoryReader {
        &self.memory
    }

    fn start_dirty_log(&self) -> Result<(), String> {
        let mut c = lock(&self.ctl);
        c.logging = true;
        c.dirty.iter_mut().for_each(|w| w.fill(0));
        Ok(())
    }

    fn stop_dirty_log(&self) {
        lock(&self.ctl).logging = false;
    }

    fn take_dirty(&self) -> Result<Vec<DirtyBitmap>, String> {
        let mut c = lock(&self.ctl);
        if !c.logging {
            let v = format!("{}: take_dirty without a dirty log", self.name);
            c.violations.push(v.clone());
            return Err(v);
        }
        let out = self
            .memory
            .regions
            .iter()
            .zip(c.dirty.iter_mut())
            .map(|(r, w)| DirtyBitmap {
                gpa: r.gpa,
                len: r.len,
                words: std::mem::replace(w, vec![0; words(r.len)]),
            })
            .collect();
        Ok(out)
    }

    fn pause(&self) -> Result<bool, String> {
        let mut c = lock(&self.ctl);
        if c.paused {
            return Ok(false);
        }
        c.paused = true;
        c.pauses += 1;
        Ok(true)
    }

    fn save_state(&self) -> Result<Vec<u8>, String> {
        let mut c = lock(&self.ctl);
        self.refuse_if_running(&mut c, "save_state")?;
        // The "vCPU state": how far the guest got, and a tag no other save shares.
        let mut s = b"MOCKSTATE".to_vec();
        s.extend_from_slice(&c.mutations.to_le_bytes());
        s.extend_from_slice(&Rng::seeded().next_u64().to_le_bytes());
        s.extend_from_slice(&(c.saved.len() as u64).to_le_bytes());
        c.saved.push(s.clone());
        Ok(s)
    }

    fn load_state(&self, state: Vec<u8>) -> Result<(), String> {
        let mut c = lock(&self.ctl);
        self.refuse_if_running(&mut c, "load_state")?;
        if !state.starts_with(b"MOCKSTATE") {
            return Err(format!("{}: not a mock state", self.name));
        }
        c.loaded.push(state);
        c.ram_writes_since_load = 0;
        Ok(())
    }

    fn resume(&self, run: bool) -> Result<(), String> {
        if !run {
            return Ok(());
        }
        let mut c = lock(&self.ctl);
        if !c.paused {
            c.violations
                .push(format!("{}: resume of a running VM", self.name));
        }
        c.paused = false;
        c.resumes += 1;
        Ok(())
    }

    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let mut c = lock(&self.ctl);
        self.refuse_if_running(&mut c, "write_ram")?;
        let (i, off) = self
            .memory
            .locate(gpa, data.len() as u64)
            .ok_or_else(|| format!("write {gpa:#x}+{:#x} outside guest RAM", data.len()))?;
        lock(&self.memory.data[i])[off..off + data.len()].copy_from_slice(data);
        c.ram_writes += 1;
        c.ram_writes_since_load += 1;
        Ok(())
    }

    fn nics(&self) -> Vec<colo::vm::ProtectedNic> {
        self.nic()
            .map(|n| vec![n.protected.clone()])
            .unwrap_or_default()
    }

    fn disks(&self) -> Vec<colo::vm::ProtectedDisk> {
        self.disks.clone()
    }
}

/// A guest: writes `per_tick` random pages every millisecond while the VM runs.
pub struct Mutator {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Mutator {
    pub fn start(vm: Arc<MockVm>, seed: u64, per_tick: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("guest-{}", vm.name))
            .spawn(move || {
                let mut rng = Rng::new(seed);
                while !s.load(Ordering::Relaxed) {
                    for _ in 0..per_tick {
                        vm.mutate(&mut rng);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .expect("spawn guest thread");
        Mutator {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Mutator {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The secondary host.

/// What the mock host shares with the test.
#[derive(Default)]
pub struct HostShared {
    pub svm: Mutex<Option<Arc<MockVm>>>,
    pub mutator: Mutex<Option<Mutator>>,
    pub calls: AtomicUsize,
    /// What create_vm got that it did not expect.
    pub errors: Mutex<Vec<String>>,
    /// While set, create_vm waits (at most [`WAIT`]) until it is cleared.
    pub hold: Mutex<bool>,
    pub hold_cv: Condvar,
    /// Set once create_vm is waiting on `hold`.
    pub holding: AtomicBool,
    /// The disks create_vm got (the replicas' handles).
    pub svm_disks: Mutex<Vec<Box<dyn devices::virtio::block::BlockBackend>>>,
}

impl HostShared {
    pub fn svm(&self) -> Option<Arc<MockVm>> {
        lock(&self.svm).clone()
    }

    pub fn release(&self) {
        *lock(&self.hold) = false;
        self.hold_cv.notify_all();
    }

    pub fn stop_mutator(&self) {
        if let Some(mut m) = lock(&self.mutator).take() {
            m.stop();
        }
    }
}

pub struct MockHost {
    pub expected_config: String,
    pub expected_vcpus: u32,
    pub expected_regions: Vec<MemRange>,
    pub svm_mutates: bool,
    pub seed: u64,
    pub nics: bool,
    pub shared: Arc<HostShared>,
}

impl SecondaryHost for MockHost {
    fn create_vm(
        &mut self,
        config_json: &str,
        vcpus: u32,
        regions: &[MemRange],
        disks: Vec<Box<dyn devices::virtio::block::BlockBackend>>,
    ) -> Result<Arc<dyn ProtectedVm>, String> {
        self.shared.calls.fetch_add(1, Ordering::SeqCst);
        *lock(&self.shared.svm_disks) = disks;
        let mut errors = Vec::new();
        if config_json != self.expected_config {
            errors.push(format!(
                "config_json {config_json:?}, expected {:?}",
                self.expected_config
            ));
        }
        if vcpus != self.expected_vcpus {
            errors.push(format!("vcpus {vcpus}, expected {}", self.expected_vcpus));
        }
        if regions != self.expected_regions.as_slice() {
            errors.push(format!(
                "regions {regions:?}, expected {:?}",
                self.expected_regions
            ));
        }
        if !errors.is_empty() {
            let e = errors.join("; ");
            lock(&self.shared.errors).extend(errors);
            return Err(e);
        }
        {
            let deadline = Instant::now() + WAIT;
            let mut held = lock(&self.shared.hold);
            while *held && Instant::now() < deadline {
                self.shared.holding.store(true, Ordering::SeqCst);
                held = self
                    .shared
                    .hold_cv
                    .wait_timeout(held, Duration::from_millis(20))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        // Not running yet: the first checkpoint resumes it.
        let vm = MockVm::new("svm", regions, true);
        if self.nics {
            vm.add_nic("svm-tap");
        }
        *lock(&self.shared.svm) = Some(vm.clone());
        if self.svm_mutates {
            *lock(&self.shared.mutator) = Some(Mutator::start(vm.clone(), self.seed, 2));
        }
        Ok(vm)
    }
}

// ---------------------------------------------------------------------------------------------
// The observer.

#[derive(Clone, Debug)]
pub struct Recorded {
    pub name: String,
    pub props: serde_json::Value,
    pub at: Instant,
}

#[derive(Default)]
struct RecInner {
    events: Vec<Recorded>,
    exit: Option<(ColoExit, Instant)>,
    exit_calls: usize,
}

#[derive(Default)]
pub struct Recorder {
    inner: Mutex<RecInner>,
    cv: Condvar,
}

impl Observer for Recorder {
    fn event(&self, name: &str, properties: serde_json::Value) {
        lock(&self.inner).events.push(Recorded {
            name: name.into(),
            props: properties,
            at: Instant::now(),
        });
        self.cv.notify_all();
    }

    fn exited(&self, exit: ColoExit) {
        let mut i = lock(&self.inner);
        i.exit_calls += 1;
        if i.exit.is_none() {
            i.exit = Some((exit, Instant::now()));
        }
        drop(i);
        self.cv.notify_all();
    }
}

impl Recorder {
    fn wait<T>(&self, timeout: Duration, mut f: impl FnMut(&RecInner) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut i = lock(&self.inner);
        loop {
            if let Some(v) = f(&i) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            i = self
                .cv
                .wait_timeout(i, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The exit and when it was reported, once it is (at most `timeout`).
    pub fn wait_exit(&self, timeout: Duration) -> Option<(ColoExit, Instant)> {
        self.wait(timeout, |i| i.exit.clone())
    }

    pub fn exit(&self) -> Option<ColoExit> {
        lock(&self.inner).exit.clone().map(|e| e.0)
    }

    pub fn exit_calls(&self) -> usize {
        lock(&self.inner).exit_calls
    }

    /// The first event (in order) for which `pred` holds, waiting at most `timeout`.
    pub fn wait_event(
        &self,
        timeout: Duration,
        pred: impl Fn(&Recorded) -> bool,
    ) -> Option<Recorded> {
        self.wait(timeout, |i| i.events.iter().find(|e| pred(e)).cloned())
    }

    pub fn events(&self, name: &str) -> Vec<Recorded> {
        lock(&self.inner)
            .events
            .iter()
            .filter(|e| e.name == name)
            .cloned()
            .collect()
    }
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy between the primary and the secondary.

/// What the proxy does when the next State message (a checkpoint record) passes on channel 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnState {
    /// Flip one byte of the record's state (the message's checksum then disagrees).
    Flip,
    /// Stop forwarding before it, keeping every socket open (a hung secondary).
    Freeze,
    /// Close every connection before it (a dead secondary).
    Cut,
}

struct ProxyShared {
    target: SocketAddr,
    socks: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    cut: AtomicBool,
    frozen: AtomicBool,
    /// Bytes forwarded from the primary to the secondary, all connections.
    down_bytes: AtomicU64,
    cut_after: AtomicU64,
    freeze_after: AtomicU64,
    on_state: Mutex<Option<OnState>>,
    /// What fired (and when): a cut, a freeze or a flip.
    fired: Mutex<Option<(&'static str, Instant)>>,
    conns: AtomicUsize,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyShared {
    fn fire(&self, what: &'static str) {
        let mut f = lock(&self.fired);
        if f.is_none() {
            *f = Some((what, Instant::now()));
        }
    }

    fn do_cut(&self) {
        self.fire("cut");
        self.cut.store(true, Ordering::SeqCst);
        for s in lock(&self.socks).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn do_freeze(&self) {
        self.fire("freeze");
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Forwards every connection made to `addr` to the target, in the order they arrive (the
/// primary opens its heartbeat first, then the channels in order).
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(ProxyShared {
            target,
            socks: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            down_bytes: AtomicU64::new(0),
            cut_after: AtomicU64::new(u64::MAX),
            freeze_after: AtomicU64::new(u64::MAX),
            on_state: Mutex::new(None),
            fired: Mutex::new(None),
            conns: AtomicUsize::new(0),
            pumps: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .unwrap();
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// The secondary dies: every proxied connection closes, new ones are refused.
    pub fn cut(&self) {
        self.shared.do_cut();
    }

    /// The secondary hangs: nothing is forwarded any more, every socket stays open.
    pub fn freeze(&self) {
        self.shared.do_freeze();
    }

    /// Cuts once this many bytes went from the primary to the secondary (counted from 0).
    pub fn cut_after(&self, bytes: u64) {
        self.shared.cut_after.store(bytes, Ordering::SeqCst);
    }

    /// Freezes once this many bytes went from the primary to the secondary.
    pub fn freeze_after(&self, bytes: u64) {
        self.shared.freeze_after.store(bytes, Ordering::SeqCst);
    }

    /// Acts on the next checkpoint record.
    pub fn on_next_state(&self, action: OnState) {
        *lock(&self.shared.on_state) = Some(action);
    }

    /// What fired and when.
    pub fn fired(&self) -> Option<(&'static str, Instant)> {
        *lock(&self.shared.fired)
    }

    pub fn connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in lock(&self.shared.socks).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let pumps = std::mem::take(&mut *lock(&self.shared.pumps));
        for p in pumps {
            let _ = p.join();
        }
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<ProxyShared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => continue,
        };
        if sh.cut.load(Ordering::SeqCst) {
            continue; // a dead peer: the connection closes at once
        }
        let upstream = match TcpStream::connect_timeout(&sh.target, Duration::from_secs(2)) {
            Ok(u) => u,
            Err(_) => continue,
        };
        let setup = |s: &TcpStream| {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_millis(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))
        };
        if setup(&client).is_err() || setup(&upstream).is_err() {
            continue;
        }
        let idx = sh.conns.fetch_add(1, Ordering::SeqCst);
        {
            let mut socks = lock(&sh.socks);
            socks.push(client.try_clone().unwrap());
            socks.push(upstream.try_clone().unwrap());
        }
        let mut pumps = lock(&sh.pumps);
        for (src, dst, down) in [
            (
                client.try_clone().unwrap(),
                upstream.try_clone().unwrap(),
                true,
            ),
            (upstream, client, false),
        ] {
            let sh = sh.clone();
            pumps.push(
                std::thread::Builder::new()
                    .name(format!("proxy-{idx}-{}", if down { "down" } else { "up" }))
                    .spawn(move || pump(sh, src, dst, down, idx))
                    .unwrap(),
            );
        }
    }
}

/// Copies `src` to `dst` until either ends, the proxy is cut or stopped; `down` is the primary
/// to secondary direction, where the byte limits and the State actions apply.
fn pump(sh: Arc<ProxyShared>, mut src: TcpStream, mut dst: TcpStream, down: bool, idx: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    // Connection 0 is the heartbeat (the primary opens it first), connection 1 checkpoint
    // channel 0: State messages travel there.
    let mut parser = (down && idx == 1).then(FrameParser::default);
    loop {
        if sh.stop.load(Ordering::SeqCst) || sh.cut.load(Ordering::SeqCst) {
            return;
        }
        if sh.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let mut n = match src.read(&mut buf) {
            Ok(0) => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => {
                let _ = dst.shutdown(Shutdown::Both);
                return;
            }
        };
        if sh.frozen.load(Ordering::SeqCst) || sh.cut.load(Ordering::SeqCst) {
            continue; // read after the peer "hung" or "died": never delivered
        }
        let mut then: Option<OnState> = None;
        if let Some(p) = parser.as_mut() {
            if let Some((at, action)) = p.feed(&mut buf[..n], &sh) {
                n = at;
                then = Some(action);
            }
        }
        if down {
            let before = sh.down_bytes.fetch_add(n as u64, Ordering::SeqCst);
            let cut = sh.cut_after.load(Ordering::SeqCst);
            let freeze = sh.freeze_after.load(Ordering::SeqCst);
            let limit = cut.min(freeze);
            if before + n as u64 > limit {
                n = limit.saturating_sub(before) as usize;
                then = Some(if cut <= freeze {
                    OnState::Cut
                } else {
                    OnState::Freeze
                });
            }
        }
        if dst.write_all(&buf[..n]).is_err() {
            let _ = src.shutdown(Shutdown::Both);
            return;
        }
        match then {
            Some(OnState::Cut) => sh.do_cut(),
            Some(OnState::Freeze) => sh.do_freeze(),
            Some(OnState::Flip) | None => {}
        }
    }
}

/// Follows channel 0's frames (stream header, then type u16, flags u16, length u64, payload,
/// crc32) to find State messages.
#[derive(Default)]
struct FrameParser {
    stream_header_done: usize,
    hdr: [u8; 12],
    hdr_len: usize,
    in_payload: bool,
    payload_left: u64,
    payload_off: u64,
    crc_left: usize,
    /// Payload offset to flip in the current State message.
    flip_at: Option<u64>,
}

const STATE_TYPE: u16 = 5;
const STREAM_HEADER_LEN: usize = 32;
/// The checkpoint record's header; the VM state follows.
const RECORD_HEADER_LEN: u64 = 28;

impl FrameParser {
    /// Walks `buf`; flips a byte if a Flip is armed. Returns where to stop forwarding and
    /// what to do then, for a Freeze or Cut armed on the State message that begins in `buf`.
    fn feed(&mut self, buf: &mut [u8], sh: &ProxyShared) -> Option<(usize, OnState)> {
        let mut i = 0;
        while i < buf.len() {
            let rem = buf.len() - i;
            if self.stream_header_done < STREAM_HEADER_LEN {
                let k = rem.min(STREAM_HEADER_LEN - self.stream_header_done);
                self.stream_header_done += k;
                i += k;
            } else if self.crc_left > 0 {
                let k = rem.min(self.crc_left);
                self.crc_left -= k;
                i += k;
            } else if self.in_payload {
                let k = (rem as u64).min(self.payload_left);
                if let Some(t) = self.flip_at {
                    if t >= self.payload_off && t < self.payload_off + k {
                        buf[i + (t - self.payload_off) as usize] ^= 0xA5;
                        self.flip_at = None;
                        sh.fire("flip");
                    }
                }
                self.payload_off += k;
                self.payload_left -= k;
                i += k as usize;
                if self.payload_left == 0 {
                    self.in_payload = false;
                    self.crc_left = 4;
                }
            } else {
                let frame_start = i - self.hdr_len.min(i);
                let k = rem.min(12 - self.hdr_len);
                self.hdr[self.hdr_len..self.hdr_len + k].copy_from_slice(&buf[i..i + k]);
                self.hdr_len += k;
                i += k;
                if self.hdr_len < 12 {
                    continue;
                }
                self.hdr_len = 0;
                let ty = u16::from_le_bytes([self.hdr[0], self.hdr[1]]);
                let mut len = [0u8; 8];
                len.copy_from_slice(&self.hdr[4..12]);
                let len = u64::from_le_bytes(len);
                self.payload_left = len;
                self.payload_off = 0;
                self.in_payload = len > 0;
                self.crc_left = if len > 0 { 0 } else { 4 };
                if ty == STATE_TYPE {
                    let action = lock(&sh.on_state).take();
                    match action {
                        Some(OnState::Flip) => {
                            self.flip_at = Some(RECORD_HEADER_LEN.min(len.saturating_sub(1)));
                        }
                        // Stop before the message (the part of its header in an earlier
                        // chunk, if any, already went through; that is harmless).
                        Some(a) => return Some((frame_start, a)),
                        None => {}
                    }
                }
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// A primary and a secondary.

#[derive(Clone, Debug)]
pub struct Setup {
    pub channels: u16,
    pub interval: Duration,
    pub pvm_mutates: bool,
    pub svm_mutates: bool,
    /// Put a proxy between them.
    pub proxy: bool,
    /// create_vm waits until the test calls `host.release()`.
    pub hold_create_vm: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            channels: 1,
            interval: Duration::from_millis(50),
            pvm_mutates: true,
            svm_mutates: true,
            proxy: false,
            hold_create_vm: false,
        }
    }
}

pub struct SecondarySide {
    pub protection: Protection,
    pub obs: Arc<Recorder>,
    pub host: Arc<HostShared>,
    pub addr: SocketAddr,
}

pub fn config_json(rng: &mut Rng) -> String {
    format!(
        "{{\"vcpus\":2,\"memory_mib\":5,\"tag\":\"{:016x}\"}}",
        rng.next_u64()
    )
}

thread_local! {
    /// The key the next primary started on this thread authenticates with (none: no key).
    pub static PRIMARY_PSK: std::cell::RefCell<Option<Arc<colo::auth::Psk>>> =
        const { std::cell::RefCell::new(None) };
    /// The key the next secondary started on this thread expects (none: no key).
    pub static SECONDARY_PSK: std::cell::RefCell<Option<Arc<colo::auth::Psk>>> =
        const { std::cell::RefCell::new(None) };
    /// The bases the next secondary started on this thread replicates disks into.
    pub static SECONDARY_DISKS: std::cell::RefCell<Vec<colo::block::link::DiskTarget>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The disks of the next PVM made on this thread.
    pub static PRIMARY_DISKS: std::cell::RefCell<Vec<colo::vm::ProtectedDisk>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A secondary listening on a free loopback port, expecting `config`.
pub fn start_secondary_side(config: &str, svm_mutates: bool, hold: bool) -> SecondarySide {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let obs = Arc::new(Recorder::default());
    let host = Arc::new(HostShared::default());
    *lock(&host.hold) = hold;
    let protection = start_secondary(
        listener,
        SecondaryConfig {
            listen: addr.to_string(),
            heartbeat_interval: HB_INTERVAL,
            heartbeat_timeout: HB_TIMEOUT,
            psk: SECONDARY_PSK.with(|k| k.borrow().clone()),
            disks: SECONDARY_DISKS.with(|d| d.borrow().clone()),
            layers: colo::block::LayerStore::Memory,
        },
        Box::new(MockHost {
            expected_config: config.into(),
            expected_vcpus: 2,
            expected_regions: test_regions(),
            svm_mutates,
            seed: Rng::seeded().next_u64(),
            nics: WITH_NICS.with(|n| n.get()),
            shared: host.clone(),
        }),
        obs.clone(),
    )
    .expect("start_secondary");
    SecondarySide {
        protection,
        obs,
        host,
        addr,
    }
}

pub struct PrimarySide {
    pub protection: Protection,
    pub obs: Arc<Recorder>,
    pub pvm: Arc<MockVm>,
    pub mutator: Option<Mutator>,
}

/// A primary protecting a fresh PVM (2 MiB of random bytes, the rest zero) towards `peer`.
pub fn start_primary_side(
    peer: SocketAddr,
    config: &str,
    channels: u16,
    interval: Duration,
    mutates: bool,
) -> PrimarySide {
    let mut rng = Rng::seeded();
    let pvm = MockVm::new("pvm", &test_regions(), false);
    if WITH_NICS.with(|n| n.get()) {
        pvm.add_nic("pvm-tap");
    }
    pvm.fill_random(&mut rng, 0.5);
    let mutator = mutates.then(|| Mutator::start(pvm.clone(), rng.next_u64(), 2));
    let obs = Arc::new(Recorder::default());
    let protection = start_primary(
        pvm.clone(),
        PrimaryConfig {
            peer: peer.to_string(),
            channels,
            interval,
            heartbeat_interval: HB_INTERVAL,
            heartbeat_timeout: HB_TIMEOUT,
            config_json: config.into(),
            vcpus: 2,
            psk: PRIMARY_PSK.with(|k| k.borrow().clone()),
            compare_timeout: std::time::Duration::from_secs(3),
            disk_completion: colo::block::mirror::Completion::Replicated,
        },
        obs.clone(),
    )
    .expect("start_primary");
    PrimarySide {
        protection,
        obs,
        pvm,
        mutator,
    }
}

pub struct Pair {
    pub p: PrimarySide,
    pub s: SecondarySide,
    pub proxy: Option<Proxy>,
}

pub fn start_pair(setup: Setup) -> Pair {
    let config = config_json(&mut Rng::seeded());
    let s = start_secondary_side(&config, setup.svm_mutates, setup.hold_create_vm);
    let proxy = setup.proxy.then(|| Proxy::start(s.addr));
    let peer = proxy.as_ref().map_or(s.addr, |p| p.addr);
    let p = start_primary_side(
        peer,
        &config,
        setup.channels,
        setup.interval,
        setup.pvm_mutates,
    );
    Pair { p, s, proxy }
}

impl Pair {
    pub fn pvm(&self) -> &Arc<MockVm> {
        &self.p.pvm
    }

    pub fn svm(&self) -> Arc<MockVm> {
        self.s.host.svm().expect("the SVM exists")
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("a proxy")
    }

    /// Waits until the primary announced protection and the secondary applied the initial
    /// checkpoint.
    pub fn wait_protected(&self) {
        let ev = self.p.obs.wait_event(WAIT, |e| e.name == "protected");
        assert!(
            ev.is_some(),
            "the primary never got protected; exits: primary {:?}, secondary {:?}",
            self.p.obs.exit(),
            self.s.obs.exit()
        );
        assert!(
            wait_until(WAIT, || self.s.protection.status().checkpoints >= 1),
            "the secondary never applied a checkpoint: {:?}",
            self.s.protection.status()
        );
    }

    /// Waits until the primary completed `n` checkpoints (the initial one included).
    pub fn wait_checkpoints(&self, n: u64) {
        assert!(
            wait_until(WAIT, || self.p.protection.status().checkpoints >= n),
            "the primary did not reach {n} checkpoints: {:?}; exits: primary {:?}, secondary {:?}",
            self.p.protection.status(),
            self.p.obs.exit(),
            self.s.obs.exit()
        );
    }

    pub fn stop_guests(&mut self) {
        if let Some(mut m) = self.p.mutator.take() {
            m.stop();
        }
        self.s.host.stop_mutator();
    }

    /// Both exits, each within `timeout`.
    pub fn wait_exits(&self, timeout: Duration) -> ((ColoExit, Instant), (ColoExit, Instant)) {
        let p = self.p.obs.wait_exit(timeout);
        let s = self.s.obs.wait_exit(timeout);
        match (p, s) {
            (Some(p), Some(s)) => (p, s),
            (p, s) => panic!(
                "protection did not end on both sides: primary {p:?} ({:?}), secondary {s:?} ({:?})",
                self.p.protection.status().state,
                self.s.protection.status().state
            ),
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop_guests();
        let _ = self.p.protection.failover();
        let _ = self.s.protection.failover();
        self.s.host.release();
        // Let both workers finish before the proxy goes (bounded).
        let _ = self.p.obs.wait_exit(Duration::from_secs(2));
        if let Some(p) = self.proxy.take() {
            p.cut();
            drop(p);
        }
    }
}

/// Describes where two RAM images differ (first few pages), or None if equal.
pub fn ram_diff(a: &[Vec<u8>], b: &[Vec<u8>], regions: &[MemRange]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} regions vs {}", a.len(), b.len()));
    }
    let mut out = Vec::new();
    let mut count = 0;
    for ((x, y), r) in a.iter().zip(b).zip(regions) {
        if x.len() != y.len() {
            return Some(format!(
                "region {:#x}: {} bytes vs {}",
                r.gpa,
                x.len(),
                y.len()
            ));
        }
        for (p, (px, py)) in x
            .chunks(PAGE_SIZE as usize)
            .zip(y.chunks(PAGE_SIZE as usize))
            .enumerate()
        {
            if px != py {
                count += 1;
                if out.len() < 8 {
                    out.push(format!("{:#x}", r.gpa + p as u64 * PAGE_SIZE));
                }
            }
        }
    }
    (count > 0).then(|| format!("{count} pages differ, first at {}", out.join(", ")))
}

/// Sleeps, in tests that let the guests run for a while.
pub fn run_for(d: Duration) {
    std::thread::sleep(d);
}

/// Reads whatever arrives on `s` within `t` (None: nothing, Some(0): closed).
pub fn read_some(s: &mut TcpStream, t: Duration) -> Option<usize> {
    s.set_read_timeout(Some(t)).ok()?;
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(n) => Some(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(0),
    }
}

pub fn write_garbage(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("write garbage");
    s
}
