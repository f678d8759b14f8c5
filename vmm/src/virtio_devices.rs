//! Places virtio devices on the MMIO bus: one 4 KiB window and one IRQ each, allocated here
//! and only here, with queue notifications wired as ioeventfds and interrupts as irqfds.
//! The guest finds the devices both in the DSDT (LNRO0005, for stock kernels) and as
//! `virtio_mmio.device=` words on the command line (for the test guest and custom kernels).

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::state::{ComponentState, StateError, Stateful};
use devices::virtio::block::{Block, BlockBackend, BlockConfig, Hooked, RawFile, WriteSlot};
use devices::virtio::mmio::{MmioTransport, TransportError, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::{Direction, FilterChain, FilterSlot, Injector, Net, Packet, Tap};
use devices::virtio::VirtioDevice;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DiskConfig, NetConfig};
use crate::memory::GuestMemory;

/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// First IRQ for virtio devices (0-4 are the PC's: timer, keyboard, cascade, COM2, COM1).
const FIRST_IRQ: u32 = 5;
/// Last IRQ the IOAPIC has (24 pins).
const LAST_IRQ: u32 = 23;

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioAttachError {
    /// All IRQs are taken.
    #[error("too many devices: only {} virtio devices fit", LAST_IRQ - FIRST_IRQ + 1)]
    OutOfIrqs,
    /// A disk image could not be opened.
    #[error("cannot open disk {path}: {source}")]
    Disk {
        /// The image.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A tap could not be opened or configured.
    #[error("tap {tap}: {source}")]
    Tap {
        /// The tap name.
        tap: String,
        /// Why.
        source: devices::virtio::net::TapError,
    },
    /// The net device refused its configuration.
    #[error("net device on {tap}: {source}")]
    Net {
        /// The tap name.
        tap: String,
        /// Why.
        source: devices::virtio::net::NetError,
    },
    /// A disk image whose size is not a whole number of sectors.
    #[error("disk {path} is {size} bytes, not a multiple of 512")]
    DiskSize {
        /// The image.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The transport could not be created.
    #[error("virtio transport: {0}")]
    Transport(#[from] TransportError),
    /// A KVM registration failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which registration.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The packet-filter chain could not be set up.
    #[error("packet filters: {0}")]
    Filters(String),
    /// The bus refused the window.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Where one virtio device sits, as the guest must be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base of its register window.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Its IRQ (GSI).
    pub irq: u32,
}

impl VirtioSlot {
    /// Linux's command-line form: `virtio_mmio.device=<size>@<base>:<irq>`.
    pub fn cmdline_word(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.size / 1024,
            self.base,
            self.irq
        )
    }
}

/// Reads a device's I/O counters as JSON.
pub type CounterReader = Box<dyn Fn() -> serde_json::Value + Send>;

/// How a device is known to the user.
pub struct DeviceMeta {
    /// Name (disk id, tap name).
    pub id: String,
    /// Kind ("virtio-blk", "virtio-net").
    pub kind: &'static str,
    /// Its counters.
    pub counters: CounterReader,
    /// For NICs: how to send frames as the guest, and the guest's MAC.
    pub announce: Option<(Injector, [u8; 6])>,
    /// For NICs: the filter slot COLO's proxy goes into.
    pub slot: Option<FilterSlot>,
    /// For disks: COLO's view of it (its image and the write slot of its backend).
    pub disk: Option<colo::vm::ProtectedDisk>,
}

/// A RARP "I am here" frame from `mac`, as QEMU sends after a migration, so switches learn
/// the guest's new port before the guest itself says anything.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0); // minimum Ethernet frame
    f
}

/// The virtio devices of a VM and the addresses/IRQs they got.
pub struct VirtioDevices {
    activate_evt: EventFd,
    worker_init: Option<devices::virtio::WorkerInit>,
    next: u32,
    slots: Vec<VirtioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    meta: Vec<DeviceMeta>,
}

impl VirtioDevices {
    /// No devices yet; `worker_init` runs first on every device worker thread.
    pub fn new(
        worker_init: Option<devices::virtio::WorkerInit>,
    ) -> Result<Self, VirtioAttachError> {
        Ok(Self {
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioAttachError::EventFd)?,
            worker_init,
            next: 0,
            slots: Vec::new(),
            transports: Vec::new(),
            meta: Vec::new(),
        })
    }

    /// Readable when a driver set DRIVER_OK: call [`VirtioDevices::activate_pending`].
    pub fn activation_eventfd(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Stops every device's data path (VM pause, snapshot); the guest does not notice.
    pub fn pause_all(&self) {
        for t in &self.transports {
            match t.lock() {
                Ok(mut t) => t.pause_device(),
                Err(p) => p.into_inner().pause_device(),
            }
        }
    }

    /// Restarts what [`VirtioDevices::pause_all`] stopped (or a restore left paused).
    pub fn resume_all(&self) {
        for t in &self.transports {
            match t.lock() {
                Ok(mut t) => t.resume_device(),
                Err(p) => p.into_inner().resume_device(),
            }
        }
    }

    /// The NICs, for COLO's proxy.
    pub fn nics(&self) -> Vec<colo::vm::ProtectedNic> {
        self.meta
            .iter()
            .filter_map(|m| {
                let (_, mac) = m.announce.as_ref()?;
                Some(colo::vm::ProtectedNic {
                    tap: m.id.clone(),
                    mac: *mac,
                    slot: m.slot.clone()?,
                })
            })
            .collect()
    }

    /// The disks, for COLO's block replication, in configuration order.
    pub fn disks(&self) -> Vec<colo::vm::ProtectedDisk> {
        self.meta.iter().filter_map(|m| m.disk.clone()).collect()
    }

    /// Every transport's state, in slot order.
    pub fn save_all(&self) -> Result<Vec<ComponentState>, StateError> {
        self.transports
            .iter()
            .map(|t| match t.lock() {
                Ok(t) => t.save_state(),
                Err(p) => p.into_inner().save_state(),
            })
            .collect()
    }

    /// Restores every transport from `states` (same devices, same order).
    pub fn restore_all(&self, states: &[ComponentState]) -> Result<(), StateError> {
        if states.len() != self.transports.len() {
            return Err(StateError::Mismatch {
                kind: "virtio devices".into(),
                why: format!(
                    "{} saved, {} configured",
                    states.len(),
                    self.transports.len()
                ),
            });
        }
        for (t, s) in self.transports.iter().zip(states) {
            match t.lock() {
                Ok(mut t) => t.restore_state(s)?,
                Err(p) => p.into_inner().restore_state(s)?,
            }
        }
        Ok(())
    }

    /// Starts the data path of every device whose driver became ready (control-loop thread).
    pub fn activate_pending(&self) {
        let _ = self.activate_evt.read();
        for t in &self.transports {
            match t.lock() {
                Ok(mut t) => t.activate_pending(),
                Err(p) => p.into_inner().activate_pending(),
            }
        }
    }

    /// The devices as `vm.info` lists them.
    pub fn device_info(&self) -> Vec<api::DeviceInfo> {
        self.slots
            .iter()
            .zip(&self.meta)
            .map(|(slot, meta)| api::DeviceInfo {
                id: meta.id.clone(),
                kind: meta.kind.to_string(),
                base: slot.base,
                irq: Some(slot.irq),
            })
            .collect()
    }

    /// Announces every NIC's MAC on its tap (after the VM moved: migration, restore).
    pub fn announce(&self) {
        for (inj, mac) in self.meta.iter().filter_map(|m| m.announce.as_ref()) {
            // Three, like QEMU: one may be lost while the new port comes up.
            for _ in 0..3 {
                let pkt = Packet::from_frame(&rarp_announce(*mac));
                if let Err(e) = inj.inject(Direction::Tx, pkt) {
                    log::warn!("announce: {e:?}");
                }
            }
        }
    }

    /// Every device's counters, keyed by device id.
    pub fn counters(&self) -> serde_json::Map<String, serde_json::Value> {
        self.meta
            .iter()
            .map(|m| (m.id.clone(), (m.counters)()))
            .collect()
    }

    /// The slots handed out, in order.
    pub fn slots(&self) -> &[VirtioSlot] {
        &self.slots
    }

    /// The transports, in slot order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    fn allocate(&mut self) -> Result<VirtioSlot, VirtioAttachError> {
        let irq = FIRST_IRQ + self.next;
        if irq > LAST_IRQ {
            return Err(VirtioAttachError::OutOfIrqs);
        }
        let slot = VirtioSlot {
            base: VIRTIO_MMIO_START + u64::from(self.next) * MMIO_WINDOW,
            size: MMIO_WINDOW,
            irq,
        };
        self.next += 1;
        Ok(slot)
    }

    /// Puts `device` behind a transport at the next free slot.
    pub fn attach(
        &mut self,
        vm: &VmFd,
        mmio: &mut Bus,
        mem: &GuestMemory,
        device: Box<dyn VirtioDevice>,
        meta: DeviceMeta,
    ) -> Result<VirtioSlot, VirtioAttachError> {
        let slot = self.allocate()?;
        let kvm = |what| move |source| VirtioAttachError::Kvm { what, source };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioAttachError::EventFd)?;
        vm.register_irqfd(&irq, slot.irq)
            .map_err(kvm("KVM_IRQFD (virtio)"))?;
        let mut transport = MmioTransport::new(device, mem.clone(), irq)?;
        transport.defer_activation(
            self.activate_evt
                .try_clone()
                .map_err(VirtioAttachError::EventFd)?,
        );
        if let Some(init) = &self.worker_init {
            transport.set_worker_init(init.clone());
        }
        for (index, fd) in transport.queue_notify_fds().iter().enumerate() {
            let addr = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
            vm.register_ioevent(fd, &addr, index as u32)
                .map_err(kvm("KVM_IOEVENTFD (virtio queue notify)"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), slot.base, slot.size)?;
        self.slots.push(slot);
        self.transports.push(transport);
        self.meta.push(meta);
        Ok(slot)
    }
}

/// Builds the virtio-blk device of `disk` over `backend` (its image opened when `None`);
/// `index` names it by default. The backend sits behind a write slot (for COLO's mirror).
pub fn block_device(
    disk: &DiskConfig,
    index: usize,
    backend: Option<Box<dyn BlockBackend>>,
) -> Result<(Block, DeviceMeta), VirtioAttachError> {
    let path = disk.path.display().to_string();
    let backend = match backend {
        Some(b) => b,
        None => Box::new(RawFile::open(&disk.path, disk.readonly).map_err(|source| {
            VirtioAttachError::Disk {
                path: path.clone(),
                source,
            }
        })?),
    };
    let size = backend.size();
    if size % devices::virtio::block::SECTOR_SIZE != 0 {
        return Err(VirtioAttachError::DiskSize { path, size });
    }
    let id = disk.id.clone().unwrap_or_else(|| format!("disk{index}"));
    let write_slot = WriteSlot::new();
    let block = Block::new(
        Box::new(Hooked::new(backend, write_slot.clone())),
        BlockConfig {
            readonly: disk.readonly,
            id: id.clone(),
        },
    );
    let counters = block.counters();
    let meta = DeviceMeta {
        id: id.clone(),
        kind: "virtio-blk",
        counters: Box::new(move || counters.to_json()),
        announce: None,
        slot: None,
        disk: Some(colo::vm::ProtectedDisk {
            id,
            path: disk.path.clone(),
            size,
            slot: write_slot,
        }),
    };
    Ok((block, meta))
}

/// A locally administered MAC derived from the tap name, stable across runs.
pub(crate) fn default_mac(tap: &str) -> [u8; 6] {
    // FNV-1a: any stable spread will do; 52:54:00 is the usual virtual-NIC prefix.
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Opens (or creates) the tap, sets its host address if asked, and builds the virtio-net device.
pub fn net_device(net: &NetConfig) -> Result<(Net, DeviceMeta), VirtioAttachError> {
    let tap_err = |source| VirtioAttachError::Tap {
        tap: net.tap.clone(),
        source,
    };
    let tap = Tap::open(&net.tap).map_err(tap_err)?;
    if let (Some(ip), Some(mask)) = (net.ip, net.mask) {
        tap.set_ipv4(ip, mask).map_err(tap_err)?;
    }
    tap.set_link_up().map_err(tap_err)?;
    let mac = net
        .mac
        .map(|m| m.0)
        .unwrap_or_else(|| default_mac(&net.tap));
    let net_err = |source| VirtioAttachError::Net {
        tap: net.tap.clone(),
        source,
    };
    let filters = FilterChain::new().map_err(|e| VirtioAttachError::Filters(e.to_string()))?;
    let dev = Net::new(tap, mac, filters).map_err(net_err)?;
    let counters = dev.counters();
    let meta = DeviceMeta {
        id: net.tap.clone(),
        kind: "virtio-net",
        counters: Box::new(move || serde_json::to_value(counters.snapshot()).unwrap_or_default()),
        announce: Some((dev.injector(), mac)),
        slot: Some(dev.filter_slot()),
        disk: None,
    };
    Ok((dev, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_macs_are_unicast_local_and_stable() {
        let a = default_mac("tap0");
        assert_eq!(a, default_mac("tap0"));
        assert_ne!(a, default_mac("tap1"));
        assert_eq!(a[0] & 1, 0);
    }

    #[test]
    fn rarp_frames_are_well_formed() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_announce(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[22..28], &mac);
    }

    #[test]
    fn cmdline_words() {
        let s = VirtioSlot {
            base: 0xd000_1000,
            size: 0x1000,
            irq: 6,
        };
        assert_eq!(s.cmdline_word(), "virtio_mmio.device=4K@0xd0001000:6");
    }

    #[test]
    fn slots_are_distinct_and_bounded() {
        let mut d = VirtioDevices::new(None).unwrap();
        let mut seen = Vec::new();
        while let Ok(s) = d.allocate() {
            assert!(!seen
                .iter()
                .any(|o: &VirtioSlot| o.base == s.base || o.irq == s.irq));
            assert!(s.base + s.size <= crate::layout::IOAPIC_START);
            seen.push(s);
        }
        assert_eq!(seen.len(), 19);
    }
}
