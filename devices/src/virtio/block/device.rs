//! The virtio-blk device: configuration space, features, and its worker thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlockBackend;
use super::request::SECTOR_SIZE;
use super::worker::{Worker, WorkerExit, WorkerSetup};
use crate::state::{ComponentState, StateError, Stateful};
use crate::virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// What the user configured for one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Refuse guest writes.
    pub readonly: bool,
    /// GET_ID answer (at most 20 bytes are used).
    pub id: String,
}

/// Per-disk I/O counters.
#[derive(Default, Debug)]
pub struct BlockCounters {
    /// Completed read requests.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Completed write requests.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
}

impl BlockCounters {
    /// The counters as a JSON object (for `vm.counters`).
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "read_ops": get(&self.read_ops),
            "read_bytes": get(&self.read_bytes),
            "write_ops": get(&self.write_ops),
            "write_bytes": get(&self.write_bytes),
            "errors": get(&self.errors),
        })
    }
}

enum Lifecycle {
    Idle(Box<dyn BlockBackend>),
    Running {
        kill: EventFd,
        thread: JoinHandle<WorkerExit>,
    },
    /// The worker panicked and took the backend with it.
    Broken,
}

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    size: u64,
    lifecycle: Lifecycle,
    counters: Arc<BlockCounters>,
}

#[derive(Serialize, Deserialize)]
struct BlockState {
    capacity_sectors: u64,
    readonly: bool,
}

const STATE_KIND: &str = "virtio-blk";
const STATE_VERSION: u32 = 1;

impl Block {
    /// A device serving `backend`.
    pub fn new(backend: Box<dyn BlockBackend>, config: BlockConfig) -> Self {
        Self {
            size: backend.size(),
            config,
            lifecycle: Lifecycle::Idle(backend),
            counters: Arc::new(BlockCounters::default()),
        }
    }

    /// I/O counters, updated by the worker.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&(self.size / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&u32::MAX.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        c[48..52].copy_from_slice(&u32::MAX.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::RING_EVENT_IDX
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH;
        if self.config.readonly {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let Lifecycle::Idle(_) = self.lifecycle else {
            return Err(ActivateError::Worker("device already active".into()));
        };
        let mut queues = ctx.queues.into_iter();
        let queue = queues.next().ok_or(ActivateError::QueueNotReady(0))?;
        if !queue.queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        let kill =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ActivateError::Worker(e.to_string()))?;
        let kill_worker = kill
            .try_clone()
            .map_err(|e| ActivateError::Worker(e.to_string()))?;
        let Lifecycle::Idle(backend) = std::mem::replace(&mut self.lifecycle, Lifecycle::Broken)
        else {
            return Err(ActivateError::Worker("device already active".into()));
        };
        let name = format!("blk-{}", self.config.id);
        let init = ctx.worker_init.clone();
        let worker = Worker::new(
            WorkerSetup {
                mem: ctx.mem,
                queue,
                interrupt: ctx.interrupt,
                backend,
                id: self.config.id.as_bytes().to_vec(),
                readonly: self.config.readonly,
                counters: self.counters.clone(),
                worker_init: ctx.worker_init,
            },
            &name,
        );
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(init) = init {
                    init("virtio-blk");
                }
                worker.run(kill_worker)
            })
            .map_err(|e| ActivateError::Worker(e.to_string()))?;
        self.lifecycle = Lifecycle::Running { kill, thread };
        Ok(())
    }

    fn reset(&mut self) -> Vec<Queue> {
        match std::mem::replace(&mut self.lifecycle, Lifecycle::Broken) {
            Lifecycle::Running { kill, thread } => {
                let _ = kill.write(1);
                match thread.join() {
                    Ok((backend, queue)) => {
                        self.lifecycle = Lifecycle::Idle(backend);
                        vec![queue]
                    }
                    Err(_) => {
                        log::error!("virtio-blk {}: worker panicked", self.config.id);
                        Vec::new()
                    }
                }
            }
            other => {
                self.lifecycle = other;
                Vec::new()
            }
        }
    }
}

impl Stateful for Block {
    fn save_state(&self) -> Result<ComponentState, StateError> {
        let s = BlockState {
            capacity_sectors: self.size / SECTOR_SIZE,
            readonly: self.config.readonly,
        };
        ComponentState::encode(STATE_KIND, STATE_VERSION, &s)
    }

    fn restore_state(&mut self, state: &ComponentState) -> Result<(), StateError> {
        let s: BlockState = state.decode(STATE_KIND, STATE_VERSION)?;
        if s.capacity_sectors != self.size / SECTOR_SIZE || s.readonly != self.config.readonly {
            return Err(StateError::Mismatch {
                kind: STATE_KIND.into(),
                why: format!(
                    "saved disk has {} sectors (readonly={}), this one {} (readonly={})",
                    s.capacity_sectors,
                    s.readonly,
                    self.size / SECTOR_SIZE,
                    self.config.readonly
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::request::{execute, status, DiskInfo};
    use crate::virtio::{ActiveQueue, Interrupt, INT_VRING};
    use crate::GuestMemory;
    use std::io;
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// A disk in memory, shared with the test.
    #[derive(Clone)]
    struct MemDisk(Arc<Mutex<Vec<u8>>>);

    impl BlockBackend for MemDisk {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            let d = self.0.lock().unwrap();
            let end = off as usize + buf.len();
            buf.copy_from_slice(
                d.get(off as usize..end)
                    .ok_or(io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        }
        fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            let end = off as usize + buf.len();
            d.get_mut(off as usize..end)
                .ok_or(io::ErrorKind::UnexpectedEof)?
                .copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&mut self, off: u64, len: u64) -> io::Result<()> {
            self.write_zeroes(off, len)
        }
        fn write_zeroes(&mut self, off: u64, len: u64) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            d[off as usize..(off + len) as usize].fill(0);
            Ok(())
        }
    }

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }

    fn header(mem: &GuestMemory, type_: u32, sector: u64) {
        mem.write_obj(type_, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn run(mem: &GuestMemory, disk: &mut MemDisk, descs: &[RawDescriptor], readonly: bool) -> u32 {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let info = DiskInfo {
            readonly,
            id: b"disk-under-test",
        };
        execute(mem, chain, disk, &info).used_len
    }

    fn disk() -> MemDisk {
        MemDisk(Arc::new(Mutex::new(
            (0..64 * 1024).map(|i| (i / 512) as u8).collect(),
        )))
    }

    fn status_byte(mem: &GuestMemory) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Data split over several descriptors (and odd sizes) arrives in order both ways, and
    /// what a read puts in guest memory (data and status) is in the dirty bitmap.
    #[test]
    fn multi_descriptor_data_and_dirty_pages() {
        let mem = mem();
        let mut d = disk();
        let dirty = |addr: u64| {
            let (r, off) =
                vm_memory::GuestMemoryBackend::to_region_addr(&mem, GuestAddress(addr)).unwrap();
            std::ops::Deref::deref(r)
                .bitmap()
                .is_addr_set(off.0 as usize)
        };
        header(&mem, 0, 2);
        for r in vm_memory::GuestMemoryBackend::iter(&mem) {
            std::ops::Deref::deref(r).bitmap().reset();
        }
        let len = run(
            &mem,
            &mut d,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 100, VRING_DESC_F_WRITE),
                desc(DATA + 0x10000, 412, VRING_DESC_F_WRITE),
                desc(DATA + 0x20000, 1024, VRING_DESC_F_WRITE),
                desc(STATUS, 1, VRING_DESC_F_WRITE),
            ],
            false,
        );
        assert_eq!((len, status_byte(&mem)), (1537, status::OK));
        let mut got = vec![0u8; 1536];
        mem.read_slice(&mut got[..100], GuestAddress(DATA)).unwrap();
        mem.read_slice(&mut got[100..512], GuestAddress(DATA + 0x10000))
            .unwrap();
        mem.read_slice(&mut got[512..], GuestAddress(DATA + 0x20000))
            .unwrap();
        assert_eq!(got, d.0.lock().unwrap()[2 * 512..5 * 512]);
        for page in [DATA, DATA + 0x10000, DATA + 0x20000, STATUS] {
            assert!(dirty(page), "{page:#x} not marked dirty");
        }
        assert!(!dirty(HDR), "the header is only read");

        // And back out: a write whose header and data share descriptors in odd places.
        let out: Vec<u8> = (0..1024).map(|i| (i % 199) as u8).collect();
        mem.write_slice(&out[..500], GuestAddress(HDR + 16))
            .unwrap();
        mem.write_slice(&out[500..], GuestAddress(DATA)).unwrap();
        header(&mem, 1, 20);
        let len = run(
            &mem,
            &mut d,
            &[
                desc(HDR, 16 + 500, 0),
                desc(DATA, 524, 0),
                desc(STATUS, 1, VRING_DESC_F_WRITE),
            ],
            false,
        );
        assert_eq!((len, status_byte(&mem)), (1, status::OK));
        assert_eq!(d.0.lock().unwrap()[20 * 512..22 * 512], out[..]);
    }

    #[test]
    fn read_write_flush_and_id() {
        let mem = mem();
        let mut d = disk();
        header(&mem, 0, 3);
        let len = run(
            &mem,
            &mut d,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 1024, VRING_DESC_F_WRITE),
                desc(STATUS, 1, VRING_DESC_F_WRITE),
            ],
            false,
        );
        assert_eq!(len, 1025);
        assert_eq!(status_byte(&mem), status::OK);
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 3) && buf[512..].iter().all(|b| *b == 4));

        header(&mem, 1, 10);
        mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        let len = run(
            &mem,
            &mut d,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, 0),
                desc(STATUS, 1, VRING_DESC_F_WRITE),
            ],
            false,
        );
        assert_eq!((len, status_byte(&mem)), (1, status::OK));
        assert!(d.0.lock().unwrap()[10 * 512..11 * 512]
            .iter()
            .all(|b| *b == 0xee));

        header(&mem, 8, 0);
        let len = run(
            &mem,
            &mut d,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 20, VRING_DESC_F_WRITE),
                desc(STATUS, 1, VRING_DESC_F_WRITE),
            ],
            false,
        );
        assert_eq!(len, 21);
        let mut id = [0u8; 15];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk-under-test");
    }

    #[test]
    fn readonly_and_out_of_range_fail_the_request_only() {
        let mem = mem();
        let mut d = disk();
        header(&mem, 1, 0);
        let chain = [
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ];
        assert_eq!(run(&mem, &mut d, &chain, true), 1);
        assert_eq!(status_byte(&mem), status::IOERR);
        assert_eq!(d.0.lock().unwrap()[0], 0, "read-only disk unchanged");

        header(&mem, 0, 127); // last sector + 1 more
        let chain = [
            desc(HDR, 16, 0),
            desc(DATA, 1024, VRING_DESC_F_WRITE),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ];
        assert_eq!(run(&mem, &mut d, &chain, false), 1);
        assert_eq!(status_byte(&mem), status::IOERR);

        header(&mem, 0, u64::MAX / 2); // sector * 512 overflows
        assert_eq!(run(&mem, &mut d, &chain, false), 1);
        assert_eq!(status_byte(&mem), status::IOERR);

        header(&mem, 99, 0);
        assert_eq!(run(&mem, &mut d, &chain, false), 1);
        assert_eq!(status_byte(&mem), status::UNSUPP);
    }

    #[test]
    fn malformed_chains_fail_without_panicking() {
        let mem = mem();
        let mut d = disk();
        header(&mem, 0, 0);
        // Data buffer outside guest memory.
        let outside = [
            desc(HDR, 16, 0),
            desc(64 << 20, 512, VRING_DESC_F_WRITE),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ];
        assert_eq!(run(&mem, &mut d, &outside, false), 0);
        // No writable descriptor at all: nowhere to put a status.
        let no_status = [desc(HDR, 16, 0), desc(DATA, 512, 0)];
        assert_eq!(run(&mem, &mut d, &no_status, false), 0);
        // Absurd length that wraps the address space.
        let absurd = [
            desc(HDR, 16, 0),
            desc(DATA, u32::MAX, VRING_DESC_F_WRITE),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ];
        assert_eq!(run(&mem, &mut d, &absurd, false), 0);
        // Header too short.
        let short = [desc(HDR, 8, 0), desc(STATUS, 1, VRING_DESC_F_WRITE)];
        assert_eq!(run(&mem, &mut d, &short, false), 1);
        assert_eq!(status_byte(&mem), status::IOERR);
    }

    #[test]
    fn descriptor_loop_terminates() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        header(&mem, 0, 0);
        // 0 -> 1 -> 0 -> ...: the chain iterator must stop on its own.
        let looped = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                DATA,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                0,
            )),
        ];
        let chain = vq.build_multiple_desc_chains(&looped).unwrap();
        let mut d = disk();
        let info = DiskInfo {
            readonly: false,
            id: b"",
        };
        // Whatever it returns, it returns.
        let _ = execute(&mem, chain, &mut d, &info);
    }

    #[test]
    fn worker_serves_the_queue_and_signals() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        header(&mem, 0, 1);
        let descs = [
            desc(HDR, 16, 0),
            desc(DATA, 512, VRING_DESC_F_WRITE),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ];
        vq.build_desc_chain(&descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_ready(true);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Block::new(
            Box::new(disk()),
            BlockConfig {
                readonly: false,
                id: "w".into(),
            },
        );
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            queues: vec![ActiveQueue {
                queue,
                notify: notify.try_clone().unwrap(),
            }],
            acked_features: dev.avail_features(),
            worker_init: None,
        })
        .unwrap();
        notify.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while vq.used().idx().load() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(status_byte(&mem), status::OK);
        let queues = dev.reset();
        assert_eq!(queues.len(), 1);
        assert_eq!(queues[0].next_used(), 1);
        assert_eq!(dev.counters().read_bytes.load(Ordering::Relaxed), 512);
        assert_ne!(interrupt.status() & INT_VRING, 0);
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn state_refuses_a_different_disk() {
        let a = Block::new(
            Box::new(disk()),
            BlockConfig {
                readonly: false,
                id: "a".into(),
            },
        );
        let saved = a.save_state().unwrap();
        let mut same = Block::new(
            Box::new(disk()),
            BlockConfig {
                readonly: false,
                id: "b".into(),
            },
        );
        same.restore_state(&saved).unwrap();
        let small = MemDisk(Arc::new(Mutex::new(vec![0; 4096])));
        let mut other = Block::new(
            Box::new(small),
            BlockConfig {
                readonly: false,
                id: "c".into(),
            },
        );
        assert!(matches!(
            other.restore_state(&saved),
            Err(StateError::Mismatch { .. })
        ));
    }
}
