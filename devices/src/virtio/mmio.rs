//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2).
//!
//! Queue notifications normally arrive through a KVM ioeventfd on `QUEUE_NOTIFY` (the VMM
//! registers [`MmioTransport::queue_notify_fds`]), so the vCPU never waits for the device;
//! a write that does reach us is forwarded to the same eventfd.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::queue::QueueSnapshot;
use super::{features, ActivateContext, ActiveQueue, Interrupt, VirtioDevice, WorkerInit};
use crate::bus::BusDevice;
use crate::state::{ComponentState, StateError, Stateful};
use crate::GuestMemory;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue-notify register (the VMM puts an ioeventfd here).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4f4c_4f43; // "COLO"
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: start the data path.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Where the device is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceLifecycle {
    /// Not yet started by the driver (or reset).
    Inactive,
    /// DRIVER_OK seen; the VMM's control loop will start the data path.
    Activating,
    /// DRIVER_OK seen and the data path running.
    Active,
    /// Data path stopped by the VMM (VM paused, snapshot); the guest sees it as running.
    Paused,
    /// Activation failed; waits for the driver to reset it.
    Failed,
}

/// Transport registers that are not queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TransportState {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_select: u32,
    interrupt_status: u32,
    config_generation: u32,
    lifecycle: DeviceLifecycle,
    queues: Vec<QueueSnapshot>,
    device: ComponentState,
}

const STATE_KIND: &str = "virtio-mmio";
const STATE_VERSION: u32 = 1;

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    lifecycle: DeviceLifecycle,
    activate_evt: Option<EventFd>,
    worker_init: Option<WorkerInit>,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue size the device asked for is invalid.
    #[error("invalid queue size: {0:?}")]
    Queue(virtio_queue::Error),
    /// Creating a notification eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd registered as the device's irqfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: EventFd,
    ) -> Result<Self, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(TransportError::Queue))
            .collect::<Result<Vec<_>, _>>()?;
        let notify = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            lifecycle: DeviceLifecycle::Inactive,
            activate_evt: None,
            worker_init: None,
        })
    }

    /// Starts the data path from the VMM's control loop instead of the vCPU thread that wrote
    /// DRIVER_OK: `evt` is written, and the loop calls [`MmioTransport::activate_pending`].
    /// vCPU threads then never create threads, so their seccomp filter stays narrow.
    pub fn defer_activation(&mut self, evt: EventFd) {
        self.activate_evt = Some(evt);
    }

    /// Runs on every worker thread the device starts.
    pub fn set_worker_init(&mut self, init: WorkerInit) {
        self.worker_init = Some(init);
    }

    /// Stops the data path without the guest noticing, taking back the queues with their ring
    /// positions: nothing touches guest memory until [`MmioTransport::resume_device`].
    pub fn pause_device(&mut self) {
        if self.lifecycle != DeviceLifecycle::Active {
            return;
        }
        let queues = self.device.reset();
        if queues.len() == self.queues.len() {
            self.queues = queues;
        } else {
            log::error!(
                "virtio: device type {} returned {} of {} queues on pause",
                self.device.device_type(),
                queues.len(),
                self.queues.len()
            );
        }
        self.lifecycle = DeviceLifecycle::Paused;
    }

    /// Restarts a paused data path where it stopped.
    pub fn resume_device(&mut self) {
        if self.lifecycle == DeviceLifecycle::Paused {
            self.activate();
        }
    }

    /// Starts the device if DRIVER_OK arrived since the last call.
    pub fn activate_pending(&mut self) {
        if self.lifecycle == DeviceLifecycle::Activating {
            self.activate();
        }
    }

    /// The eventfd of each queue, for the VMM to register as ioeventfds (datamatch = index).
    pub fn queue_notify_fds(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device's lifecycle state.
    pub fn lifecycle(&self) -> DeviceLifecycle {
        self.lifecycle
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.lifecycle != DeviceLifecycle::Inactive {
            // Queue registers are frozen once the device runs.
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn device_features_word(&self) -> u32 {
        let all = self.device.avail_features() | features::VERSION_1;
        match self.device_features_sel {
            0 => all as u32,
            1 => (all >> 32) as u32,
            _ => 0,
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.acked_features = (self.acked_features & !mask) | (u64::from(value) << shift);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & status::FAILED != 0 && self.status & status::FAILED == 0 {
            log::warn!(
                "virtio: the driver gave up on device type {}",
                self.device.device_type()
            );
        }
        if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.avail_features() | features::VERSION_1;
            let acceptable = self.acked_features & !offered == 0
                && self.acked_features & features::VERSION_1 != 0;
            if !acceptable {
                // Leaving FEATURES_OK clear tells the driver we refuse this feature set.
                log::warn!(
                    "virtio: driver asked for unsupported features {:#x}",
                    self.acked_features
                );
                value &= !status::FEATURES_OK;
            }
        }
        let newly_ok = value & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = value;
        if newly_ok && self.status & status::FEATURES_OK != 0 {
            match &self.activate_evt {
                Some(evt) => {
                    self.lifecycle = DeviceLifecycle::Activating;
                    if let Err(e) = evt.write(1) {
                        log::error!("virtio: cannot request activation: {e}");
                        self.fail();
                    }
                }
                None => self.activate(),
            }
        }
    }

    fn activate(&mut self) {
        let mut active = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let notify = match self.notify[i].try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    log::error!("virtio: cannot clone queue eventfd: {e}");
                    return self.fail();
                }
            };
            // Queue has no Clone; the snapshot is the exact copy (registers stay readable here).
            let mut queue = match QueueSnapshot::of(q).to_queue() {
                Ok(q) => q,
                Err(e) => {
                    log::error!("virtio: queue {i} is unusable: {e:?}");
                    return self.fail();
                }
            };
            queue.set_event_idx(self.acked_features & features::RING_EVENT_IDX != 0);
            active.push(ActiveQueue { queue, notify });
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues: active,
            acked_features: self.acked_features,
            worker_init: self.worker_init.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.lifecycle = DeviceLifecycle::Active,
            Err(e) => {
                log::error!("virtio: device activation failed: {e}");
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.lifecycle = DeviceLifecycle::Failed;
        self.status |= status::NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal(super::INT_CONFIG);
    }

    fn reset(&mut self) {
        if self.lifecycle == DeviceLifecycle::Active {
            // The driver's reset discards ring positions, so the returned queues are not needed.
            self.device.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_select = 0;
        self.interrupt.set_status(0);
        self.lifecycle = DeviceLifecycle::Inactive;
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_select as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => self.device_features_word(),
            0x34 => q.map_or(0, |q| q.max_size().into()),
            0x44 => q.map_or(0, |q| q.ready().into()),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => self.write_driver_features(v),
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_select = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY_OFFSET => {
                if let Some(fd) = self.notify.get(v as usize) {
                    let _ = fd.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32-bit only (virtio 1.2 §4.2.2).
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
        } else if let Ok(word) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(word));
        }
    }
}

impl Stateful for MmioTransport {
    fn save_state(&self) -> Result<ComponentState, StateError> {
        let state = TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            lifecycle: self.lifecycle,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            device: self.device.save_state()?,
        };
        ComponentState::encode(STATE_KIND, STATE_VERSION, &state)
    }

    fn restore_state(&mut self, state: &ComponentState) -> Result<(), StateError> {
        let s: TransportState = state.decode(STATE_KIND, STATE_VERSION)?;
        let mismatch = |why: String| StateError::Mismatch {
            kind: STATE_KIND.to_string(),
            why,
        };
        if s.queues.len() != self.queues.len() {
            return Err(mismatch(format!(
                "{} queues saved, device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let queues = s
            .queues
            .iter()
            .map(|q| q.to_queue().map_err(|e| mismatch(format!("queue: {e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        self.device.restore_state(&s.device)?;
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        self.lifecycle = DeviceLifecycle::Inactive;
        if matches!(
            s.lifecycle,
            DeviceLifecycle::Active | DeviceLifecycle::Activating | DeviceLifecycle::Paused
        ) {
            // Started by resume_device once the whole VM is restored.
            self.lifecycle = DeviceLifecycle::Paused;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{read_config_bytes, ActivateError};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    struct Dummy {
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        config: [u8; 8],
        fail: bool,
    }

    impl Stateful for Dummy {
        fn save_state(&self) -> Result<ComponentState, StateError> {
            ComponentState::encode("dummy", 1, &self.config)
        }
        fn restore_state(&mut self, s: &ComponentState) -> Result<(), StateError> {
            self.config = s.decode("dummy", 1)?;
            Ok(())
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            features::VERSION_1 | features::RING_EVENT_IDX | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data)
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            assert_eq!(ctx.queues.len(), 2);
            assert!(ctx.queues[0].queue.event_idx_enabled());
            self.activations.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(ActivateError::Worker("test".into()));
            }
            Ok(())
        }
        fn reset(&mut self) -> Vec<Queue> {
            self.resets.fetch_add(1, Ordering::SeqCst);
            Vec::new()
        }
    }

    fn transport(fail: bool) -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let a = Arc::new(AtomicUsize::new(0));
        let r = Arc::new(AtomicUsize::new(0));
        let dev = Dummy {
            activations: a.clone(),
            resets: r.clone(),
            config: *b"configok",
            fail,
        };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (MmioTransport::new(Box::new(dev), mem, irq).unwrap(), a, r)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queues(t: &mut MmioTransport) {
        for (i, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            wr(t, 0x30, i);
            wr(t, 0x38, 16);
            wr(t, 0x80, base);
            wr(t, 0x90, base + 0x100);
            wr(t, 0xa0, base + 0x200);
            wr(t, 0x44, 1);
        }
    }

    fn driver_init(t: &mut MmioTransport, features_hi: u32) {
        wr(t, 0x70, status::ACKNOWLEDGE);
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x24, 0);
        wr(t, 0x20, 1 << 29);
        wr(t, 0x24, 1);
        wr(t, 0x20, features_hi);
        wr(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identity_and_config() {
        let (mut t, _, _) = transport(false);
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 2);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 in the high word");
        let mut cfg = [0u8; 2];
        t.read(0x100 + 6, &mut cfg);
        assert_eq!(&cfg, b"ok");
        t.read(0x100 + 7, &mut cfg);
        assert_eq!(cfg, [b'k', 0], "past the end reads 0");
    }

    #[test]
    fn full_init_activates_once_and_reset_stops() {
        let (mut t, act, resets) = transport(false);
        setup_queues(&mut t);
        driver_init(&mut t, 1);
        assert_ne!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        wr(&mut t, 0x70, all);
        wr(&mut t, 0x70, all);
        assert_eq!(act.load(Ordering::SeqCst), 1);
        assert_eq!(t.lifecycle(), DeviceLifecycle::Active);
        // Queue registers are frozen while active.
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 8);
        assert_eq!(QueueSnapshot::of(&t.queues[0]).size, 16);
        wr(&mut t, 0x70, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(t.lifecycle(), DeviceLifecycle::Inactive);
    }

    #[test]
    fn deferred_activation_waits_for_the_control_loop() {
        let (mut t, act, _) = transport(false);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        t.defer_activation(evt.try_clone().unwrap());
        setup_queues(&mut t);
        driver_init(&mut t, 1);
        wr(&mut t, 0x70, 0xf);
        assert_eq!(t.lifecycle(), DeviceLifecycle::Activating);
        assert_eq!(act.load(Ordering::SeqCst), 0, "not on the vCPU thread");
        assert_eq!(evt.read().unwrap(), 1);
        t.activate_pending();
        assert_eq!(t.lifecycle(), DeviceLifecycle::Active);
        t.activate_pending();
        assert_eq!(act.load(Ordering::SeqCst), 1, "once");
    }

    #[test]
    fn refuses_legacy_or_unknown_features() {
        let (mut t, _, _) = transport(false);
        driver_init(&mut t, 0); // no VERSION_1
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        let (mut t, _, _) = transport(false);
        driver_init(&mut t, 1 | 2); // a bit the device never offered
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
    }

    #[test]
    fn failed_activation_asks_for_reset() {
        let (mut t, _, _) = transport(true);
        setup_queues(&mut t);
        driver_init(&mut t, 1);
        wr(&mut t, 0x70, 0xf);
        assert_eq!(t.lifecycle(), DeviceLifecycle::Failed);
        assert_ne!(rd(&mut t, 0x70) & status::NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, 0x60) & crate::virtio::INT_CONFIG, 0);
    }

    #[test]
    fn notify_write_reaches_the_queue_eventfd() {
        let (mut t, _, _) = transport(false);
        wr(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(t.queue_notify_fds()[1].read().unwrap(), 1);
        wr(&mut t, QUEUE_NOTIFY_OFFSET, 7); // no such queue: ignored
    }

    #[test]
    fn odd_sized_register_access_is_harmless() {
        let (mut t, _, _) = transport(false);
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x70, &[1, 2]);
        assert_eq!(rd(&mut t, 0x70), 0);
    }

    #[test]
    fn state_round_trip() {
        let (mut t, _, _) = transport(false);
        setup_queues(&mut t);
        driver_init(&mut t, 1);
        wr(&mut t, 0x30, 1);
        let saved = t.save_state().unwrap();
        let (mut fresh, act, _) = transport(false);
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state().unwrap(), saved);
        assert_eq!(act.load(Ordering::SeqCst), 0, "not active when saved");

        // A running device pauses, saves, and comes back active on the other side.
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        wr(&mut t, 0x70, all);
        assert_eq!(t.lifecycle(), DeviceLifecycle::Active);
        t.pause_device();
        assert_eq!(t.lifecycle(), DeviceLifecycle::Paused);
        let running = t.save_state().unwrap();
        let (mut other, act2, _) = transport(false);
        other.restore_state(&running).unwrap();
        assert_eq!(other.lifecycle(), DeviceLifecycle::Paused);
        assert_eq!(
            act2.load(Ordering::SeqCst),
            0,
            "restore does not start workers"
        );
        other.resume_device();
        assert_eq!(other.lifecycle(), DeviceLifecycle::Active);
        assert_eq!(act2.load(Ordering::SeqCst), 1);

        let mut wrong = saved.clone();
        wrong.version = 99;
        assert!(fresh.restore_state(&wrong).is_err());
    }
}
