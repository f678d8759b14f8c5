//! A VM: built from a [`VmConfig`] one boot step at a time, then run until the guest leaves.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::acpi_power::{AcpiSleepControl, ACPI_SLEEP_PORT};
use devices::bus::{Bus, BusError};
use devices::legacy::i8042::{I8042_BASE, I8042_LEN};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use devices::legacy::{SerialPort, I8042};
use devices::{ExitRequest, VmExitEvent};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{create_acpi_tables, AcpiError};
use crate::boot::{load_payload, BootEntry, BootError};
use crate::config::VmConfig;
use crate::console::{Console, ConsoleError};
use crate::cpu::{configure_vcpu, vcpu_cpuid, CpuError};
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::{create_guest_memory, GuestMemory, MemoryError};
use crate::seccomp::{SeccompMode, ThreadKind};
use crate::vcpu::{
    install_kick_handler, ExitCounters, SharedVcpuFd, Vcpu, VcpuContext, VcpuControl,
};
use crate::virtio_devices::{block_device, net_device, VirtioAttachError, VirtioDevices};
use api::{DeviceInfo, VmInfo, VmState};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened or used.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU set-up.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Console set-up.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Device placement.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A virtio device.
    #[error(transparent)]
    Virtio(#[from] VirtioAttachError),
    /// The operation does not fit the VM's state.
    #[error("cannot {op} a VM that is {state:?}")]
    InvalidState {
        /// What was asked.
        op: &'static str,
        /// The state it is in.
        state: VmState,
    },
    /// vCPUs did not all park in time.
    #[error("vCPUs did not stop within 5 s")]
    PauseTimeout,
    /// Thread, eventfd or signal set-up.
    #[error("{what}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, VmError>;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (treated as an exit, like Cloud Hypervisor without reboot support).
    Reset,
    /// The guest crashed; the text has the vCPU state.
    Crash(String),
}

impl From<ExitRequest> for VmOutcome {
    fn from(req: ExitRequest) -> Self {
        match req {
            ExitRequest::PowerOff => VmOutcome::PowerOff,
            ExitRequest::Reset => VmOutcome::Reset,
            ExitRequest::Crash(msg) => VmOutcome::Crash(msg),
        }
    }
}

/// A VM: built by [`Vm::new`], then booted, paused, resumed and shut down.
///
/// Fields drop in order: KVM's handles first, guest memory last, so KVM never maps memory
/// that is gone (`Drop` has already stopped the vCPU threads).
pub struct Vm {
    pub(crate) fd: Arc<VmFd>,
    pub(crate) vcpu_fds: Vec<SharedVcpuFd>,
    pending: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    pub(crate) kvm: Kvm,
    /// MSRs this KVM can save, probed once (snapshots, migration and checkpoints reuse it).
    pub(crate) msr_list: std::sync::OnceLock<Vec<u32>>,
    pub(crate) config: VmConfig,
    pub(crate) state: VmState,
    control: Arc<VcpuControl>,
    exit: Arc<VmExitEvent>,
    exits: Arc<ExitCounters>,
    pub(crate) virtio: VirtioDevices,
    devices: Vec<DeviceInfo>,
    pub(crate) serial: Arc<Mutex<SerialPort>>,
    pub(crate) memory: GuestMemory,
}

/// How a VM's memory and vCPUs start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Load the kernel and boot it.
    Boot,
    /// Leave memory and vCPUs for a restore to fill in.
    Restore,
}

impl Vm {
    /// Builds the VM: KVM VM, memory, interrupt controllers, devices, payload, vCPUs.
    pub fn new(config: &VmConfig, console: &Console, seccomp: SeccompMode) -> Result<Self> {
        Self::build(config, console, seccomp, Start::Boot)
    }

    /// Builds the VM's hardware; with [`Start::Boot`] also loads the kernel.
    pub fn build(
        config: &VmConfig,
        console: &Console,
        seccomp: SeccompMode,
        start: Start,
    ) -> Result<Self> {
        Self::build_on(config, console, seccomp, start, Vec::new())
    }

    /// [`Self::build`] with the disks' backends given (a COLO secondary's replicas), in
    /// configuration order; an empty list opens the configured images.
    pub fn build_on(
        config: &VmConfig,
        console: &Console,
        seccomp: SeccompMode,
        start: Start,
        disks: Vec<Box<dyn devices::virtio::block::BlockBackend>>,
    ) -> Result<Self> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let fd = create_vm_fd(&kvm)?;
        let memory = create_guest_memory(config.memory.size)?;
        register_memory(&fd, &memory)?;
        create_irqchip(&fd)?;

        let exit = Arc::new(VmExitEvent::new().map_err(io_err("exit eventfd"))?);
        let serial = create_serial(&fd, console)?;
        let pio = Arc::new(create_pio_bus(serial.clone(), exit.clone())?);
        let mut mmio = Bus::new();
        let virtio = create_virtio_devices(&fd, &mut mmio, &memory, config, seccomp, disks)?;
        let mmio = Arc::new(mmio);

        let entry = match start {
            Start::Boot => {
                let rsdp = create_acpi_tables(&memory, config.cpus.boot, virtio.slots())?;
                let mut payload = config.payload.clone();
                for slot in virtio.slots() {
                    payload.cmdline.push(' ');
                    payload.cmdline.push_str(&slot.cmdline_word());
                }
                let entry = load_payload(&memory, &payload, rsdp)?;
                log::info!("boot entry: {entry:?}");
                Some(entry)
            }
            Start::Restore => {
                crate::memory::prefault(&memory);
                None
            }
        };

        let control = Arc::new(VcpuControl::default());
        let exits = Arc::new(ExitCounters::default());
        let ctx = VcpuContext {
            pio,
            mmio,
            exit: exit.clone(),
            control: control.clone(),
            exits: exits.clone(),
            seccomp,
        };
        let (pending, vcpu_fds) = create_vcpus(&kvm, &fd, config.cpus.boot, entry, &ctx)?;
        console.attach(serial.clone());
        let mut devices = vec![DeviceInfo {
            id: "com1".into(),
            kind: "serial".into(),
            base: COM1_BASE.into(),
            irq: Some(COM1_IRQ),
        }];
        devices.extend(virtio.device_info());
        Ok(Self {
            config: config.clone(),
            state: VmState::Created,
            memory,
            pending,
            threads: Vec::new(),
            control,
            exit,
            exits,
            virtio,
            devices,
            serial,
            vcpu_fds,
            kvm,
            msr_list: std::sync::OnceLock::new(),
            fd: Arc::new(fd),
        })
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Becomes readable when the guest powers off, resets or crashes.
    pub fn exit_event(&self) -> &VmExitEvent {
        &self.exit
    }

    /// The VM's virtio devices (the control loop starts them when their drivers are ready).
    pub fn virtio(&self) -> &VirtioDevices {
        &self.virtio
    }

    fn expect_state(&self, op: &'static str, ok: &[VmState]) -> Result<()> {
        if ok.contains(&self.state) {
            Ok(())
        } else {
            Err(VmError::InvalidState {
                op,
                state: self.state,
            })
        }
    }

    /// Starts the vCPUs.
    pub fn boot(&mut self) -> Result<()> {
        self.expect_state("boot", &[VmState::Created])?;
        self.start_vcpu_threads()?;
        self.state = VmState::Running;
        Ok(())
    }

    /// Parks every vCPU outside KVM_RUN; devices keep their state.
    pub fn pause(&mut self) -> Result<()> {
        self.expect_state("pause", &[VmState::Running])?;
        if !self.control.pause(&self.threads) {
            self.control.resume();
            return Err(VmError::PauseTimeout);
        }
        // After the vCPUs, so no new request reaches a device that is stopping.
        self.virtio.pause_all();
        self.state = VmState::Paused;
        Ok(())
    }

    /// Lets a paused (or just restored) VM run again.
    pub fn resume(&mut self) -> Result<()> {
        self.expect_state("resume", &[VmState::Paused])?;
        self.virtio.resume_all();
        if self.pending.is_empty() {
            self.control.resume();
        } else {
            // A restored VM's vCPU threads have not started yet.
            self.start_vcpu_threads()?;
        }
        self.state = VmState::Running;
        Ok(())
    }

    fn start_vcpu_threads(&mut self) -> Result<()> {
        install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
        for vcpu in self.pending.drain(..) {
            self.threads
                .push(vcpu.spawn().map_err(io_err("starting a vCPU thread"))?);
        }
        Ok(())
    }

    /// Stops the vCPUs for good; what the guest asked for, if it asked.
    pub fn shutdown(&mut self) -> Option<VmOutcome> {
        self.control.stop(std::mem::take(&mut self.threads));
        self.pending.clear();
        self.state = VmState::Shutdown;
        log::info!(
            "vCPU exits to the VMM: pio={} mmio={}",
            self.exits.pio.load(Ordering::Relaxed),
            self.exits.mmio.load(Ordering::Relaxed)
        );
        self.exit.pending().map(VmOutcome::from)
    }

    /// `vm.info`.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            config: self.config.clone(),
            state: self.state,
            memory_actual_size: self.config.memory.size,
            devices: self.devices.clone(),
        }
    }

    /// `vm.counters`: per-device I/O counters and the VMM's exit counts.
    pub fn counters(&self) -> serde_json::Value {
        let mut all = self.virtio.counters();
        all.insert(
            "vcpu-exits".to_string(),
            serde_json::json!({
                "pio": self.exits.pio.load(Ordering::Relaxed),
                "mmio": self.exits.mmio.load(Ordering::Relaxed),
            }),
        );
        serde_json::Value::Object(all)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.state != VmState::Shutdown {
            self.shutdown();
        }
    }
}

/// Blocks until one of `fds` is readable.
pub fn wait_readable(fds: &[&EventFd]) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(*fd),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid pollfd array, for the duration of the call.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
}

fn create_vm_fd(kvm: &Kvm) -> Result<VmFd> {
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // Needed by VMX only; other back ends (e.g. kvm_pvm, SVM) may refuse it harmlessly.
    if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
        log::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    if let Err(e) = fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
        log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
    }
    Ok(fd)
}

fn register_memory(fd: &VmFd, memory: &GuestMemory) -> Result<()> {
    set_memory_slots(fd, memory, 0)
}

/// (Re-)registers every RAM region as KVM slot `index` with `flags` (e.g. dirty logging).
pub(crate) fn set_memory_slots(fd: &VmFd, memory: &GuestMemory, flags: u32) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::Kvm {
                what: "guest memory host address",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for the VM's lifetime (`Vm` owns `memory` and drops
        // the VM fd before it), and slots do not overlap.
        unsafe { fd.set_user_memory_region(desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn create_irqchip(fd: &VmFd) -> Result<()> {
    fd.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(())
}

fn create_serial(fd: &VmFd, console: &Console) -> Result<Arc<Mutex<SerialPort>>> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial eventfd"))?;
    fd.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
    let port = SerialPort::new(irq, console.output()?).map_err(io_err("serial eventfd"))?;
    Ok(Arc::new(Mutex::new(port)))
}

fn create_pio_bus(serial: Arc<Mutex<SerialPort>>, exit: Arc<VmExitEvent>) -> Result<Bus> {
    let mut pio = Bus::new();
    pio.insert(serial, COM1_BASE.into(), COM1_LEN.into())?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        I8042_BASE.into(),
        I8042_LEN.into(),
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiSleepControl::new(exit))),
        ACPI_SLEEP_PORT.into(),
        1,
    )?;
    Ok(pio)
}

fn create_virtio_devices(
    fd: &VmFd,
    mmio: &mut Bus,
    memory: &GuestMemory,
    config: &VmConfig,
    seccomp: SeccompMode,
    disks: Vec<Box<dyn devices::virtio::block::BlockBackend>>,
) -> Result<VirtioDevices> {
    let init: devices::virtio::WorkerInit = Arc::new(move |kind: &'static str| {
        let Some(thread) = ThreadKind::from_device(kind) else {
            log::warn!("no seccomp filter for device kind {kind}");
            return;
        };
        if let Err(e) = crate::seccomp::apply(thread, seccomp) {
            // A worker without its filter must not run: stop the process, loudly.
            log::error!("{e}");
            std::process::abort();
        }
    });
    let mut virtio = VirtioDevices::new(Some(init))?;
    let mut backends = disks.into_iter();
    for (i, disk) in config.disks.iter().enumerate() {
        let (dev, meta) = block_device(disk, i, backends.next())?;
        let slot = virtio.attach(fd, mmio, memory, Box::new(dev), meta)?;
        log::info!(
            "disk {} at {:#x} irq {}",
            disk.path.display(),
            slot.base,
            slot.irq
        );
    }
    for net in &config.nets {
        let (dev, meta) = net_device(net)?;
        let slot = virtio.attach(fd, mmio, memory, Box::new(dev), meta)?;
        log::info!(
            "net on tap {} at {:#x} irq {}",
            net.tap,
            slot.base,
            slot.irq
        );
    }
    Ok(virtio)
}

fn create_vcpus(
    kvm: &Kvm,
    fd: &VmFd,
    count: u8,
    entry: Option<BootEntry>,
    ctx: &VcpuContext,
) -> Result<(Vec<Vcpu>, Vec<SharedVcpuFd>)> {
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(count.into());
    let mut fds = Vec::with_capacity(count.into());
    for id in 0..count {
        let vcpu = fd
            .create_vcpu(id.into())
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let boot = entry.filter(|_| id == 0);
        configure_vcpu(&vcpu, id, &vcpu_cpuid(&base_cpuid, id, count), boot)?;
        let shared: SharedVcpuFd = Arc::new(Mutex::new(vcpu));
        fds.push(shared.clone());
        vcpus.push(Vcpu::new(id, shared, ctx.clone()));
    }
    Ok((vcpus, fds))
}
