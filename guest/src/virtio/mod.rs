//! virtio over MMIO (virtio 1.x "modern", MMIO version 2): device discovery, the transport
//! (status, feature negotiation, queue setup, interrupt acknowledgement), and the block and
//! network drivers built on it. Every register access is an exit to the VMM (~30 µs), so the
//! drivers touch registers only at set-up, to kick (when the device asked for it) and to
//! acknowledge interrupts; everything else is shared memory.

pub mod blk;
pub mod net;
pub mod queue;

use crate::acpi::AcpiInfo;
use crate::arch;
use crate::boot::BootInfo;
use alloc::vec::Vec;

pub use queue::{Buf, Queue};

const MAGIC: u32 = 0x7472_6976; // "virt"

const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_INTERRUPT_STATUS: usize = 0x060;
const REG_INTERRUPT_ACK: usize = 0x064;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC: usize = 0x080;
const REG_QUEUE_DRIVER: usize = 0x090;
const REG_QUEUE_DEVICE: usize = 0x0a0;
const REG_CONFIG: usize = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// Feature bits common to all device types.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// Modern device (mandatory here).
pub const F_VERSION_1: u64 = 1 << 32;

/// Device IDs we drive.
pub const ID_NET: u32 = 1;
/// Block device.
pub const ID_BLK: u32 = 2;

/// Where a virtio-mmio device is and which interrupt it raises.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Location {
    /// MMIO base.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// GSI.
    pub irq: u32,
    /// Active-low line (from ACPI; the command line has no polarity: high).
    pub active_low: bool,
}

/// Parses a number with an optional 0x prefix and an optional K/M/G suffix (Linux memparse).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    v.checked_mul(1 << shift)
}

/// Parses a `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` value.
pub fn parse_cmdline_device(v: &str) -> Option<Location> {
    let (size, rest) = v.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let irq = rest.split(':').next()?;
    Some(Location {
        base: parse_size(base)?,
        size: parse_size(size)?,
        irq: irq.parse().ok()?,
        active_low: false,
    })
}

/// All virtio-mmio devices the platform names: `virtio_mmio.device=` words on the command
/// line (colovmm; QEMU microvm with `acpi=off`) and `LNRO0005` devices in the DSDT (QEMU
/// microvm with ACPI). Duplicates (same base) are dropped; bad words are reported.
pub fn discover(boot: &BootInfo, acpi: &AcpiInfo) -> Vec<Location> {
    let mut found: Vec<Location> = Vec::new();
    for v in boot.cmdline_values("virtio_mmio.device") {
        match parse_cmdline_device(v) {
            Some(loc) if !found.iter().any(|l| l.base == loc.base) => found.push(loc),
            Some(_) => {}
            None => crate::println!("virtio: bad command-line word virtio_mmio.device={v}"),
        }
    }
    for loc in acpi.virtio_mmio() {
        if !found.iter().any(|l| l.base == loc.base) {
            found.push(loc);
        }
    }
    found
}

/// A virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    fn read(&self, reg: usize) -> u32 {
        arch::mmio_read32(self.base + reg)
    }

    fn write(&self, reg: usize, v: u32) {
        arch::mmio_write32(self.base + reg, v)
    }

    /// Reads a config-space byte.
    pub fn config8(&self, off: usize) -> u8 {
        // SAFETY: device config space inside the MMIO window (identity mapped, uncached).
        unsafe { core::ptr::read_volatile((self.base + REG_CONFIG + off) as *const u8) }
    }

    /// Reads a config-space u32.
    pub fn config32(&self, off: usize) -> u32 {
        self.read(REG_CONFIG + off)
    }

    /// Reads a config-space u64 as two u32 (little endian).
    pub fn config64(&self, off: usize) -> u64 {
        self.config32(off) as u64 | (self.config32(off + 4) as u64) << 32
    }

    /// Notifies the device about queue `q`.
    pub fn notify(&self, q: u16) {
        self.write(REG_QUEUE_NOTIFY, q as u32)
    }

    /// Reads and acknowledges InterruptStatus (call before polling the rings, so an event
    /// that arrives meanwhile raises a new edge). Returns the bits that were set.
    pub fn ack_irq(&self) -> u32 {
        let s = self.read(REG_INTERRUPT_STATUS);
        if s != 0 {
            self.write(REG_INTERRUPT_ACK, s);
        }
        s
    }

    /// Resets the device: it stops using every buffer it was given.
    pub fn reset(&self) {
        self.write(REG_STATUS, 0);
    }

    /// Marks the device failed (after resetting it).
    pub fn fail(&self) {
        self.reset();
        self.write(REG_STATUS, STATUS_FAILED);
    }

    /// Sets up queue `index` with at most `max` entries (event_idx as negotiated).
    pub fn setup_queue(
        &self,
        index: u16,
        max: u16,
        event_idx: bool,
    ) -> Result<Queue, &'static str> {
        self.write(REG_QUEUE_SEL, index as u32);
        if self.read(REG_QUEUE_READY) != 0 {
            return Err("queue already live");
        }
        let dev_max = self.read(REG_QUEUE_NUM_MAX);
        if dev_max == 0 {
            return Err("queue not available");
        }
        // Split rings need not be powers of two on the device side, but ours are.
        let mut size = max.min(dev_max.min(32768) as u16);
        while !size.is_power_of_two() {
            size &= size - 1;
        }
        let q = Queue::new(size, event_idx);
        let (d, a, u) = q.addresses();
        self.write(REG_QUEUE_NUM, size as u32);
        for (reg, addr) in [
            (REG_QUEUE_DESC, d),
            (REG_QUEUE_DRIVER, a),
            (REG_QUEUE_DEVICE, u),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
        Ok(q)
    }

    /// Final step of initialisation.
    pub fn driver_ok(&self) {
        self.write(REG_STATUS, self.read(REG_STATUS) | STATUS_DRIVER_OK);
    }
}

/// A device that answered with the right magic, version 2 and a non-zero ID.
pub struct Found {
    /// Register window.
    pub mmio: Mmio,
    /// Where it is.
    pub loc: Location,
    /// Device type.
    pub id: u32,
}

/// Reads the identification registers. Empty slots (device ID 0) give `Ok(None)`; anything
/// we cannot drive gives an error text for the console.
pub fn probe(loc: Location) -> Result<Option<Found>, alloc::string::String> {
    use alloc::format;
    if loc.base >= crate::memory::MAPPED_END || loc.base < 0xc000_0000 || loc.size < 0x200 {
        return Err(format!(
            "virtio: {:#x} is outside the uncached MMIO range, ignored",
            loc.base
        ));
    }
    let mmio = Mmio {
        base: loc.base as usize,
    };
    let magic = mmio.read(REG_MAGIC);
    if magic != MAGIC {
        return Err(format!(
            "virtio: {:#x} bad magic {magic:#x}, ignored",
            loc.base
        ));
    }
    let version = mmio.read(REG_VERSION);
    let id = mmio.read(REG_DEVICE_ID);
    if id == 0 {
        return Ok(None);
    }
    if version != 2 {
        return Err(format!(
            "virtio: {:#x} device id={id} is legacy (mmio version {version}); only version 2 is supported, ignored",
            loc.base
        ));
    }
    Ok(Some(Found { mmio, loc, id }))
}

/// Resets the device and negotiates features: VERSION_1 is required, `wanted` are taken
/// if offered. Returns the accepted set (FEATURES_OK confirmed).
pub fn negotiate(mmio: &Mmio, wanted: u64) -> Result<u64, &'static str> {
    mmio.reset();
    mmio.write(REG_STATUS, STATUS_ACKNOWLEDGE);
    mmio.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    let mut offered = 0u64;
    for sel in 0..2 {
        mmio.write(REG_DEVICE_FEATURES_SEL, sel);
        offered |= (mmio.read(REG_DEVICE_FEATURES) as u64) << (32 * sel);
    }
    if offered & F_VERSION_1 == 0 {
        mmio.fail();
        return Err("device does not offer VERSION_1");
    }
    let accepted = offered & (wanted | F_VERSION_1);
    for sel in 0..2 {
        mmio.write(REG_DRIVER_FEATURES_SEL, sel);
        mmio.write(REG_DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
    }
    mmio.write(
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    if mmio.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
        mmio.fail();
        return Err("device refused our features");
    }
    Ok(accepted)
}
