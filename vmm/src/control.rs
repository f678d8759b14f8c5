//! The VMM's control loop: owns the (single) VM, answers API requests, and notices when the
//! guest leaves. Runs on the main thread; vCPUs, devices and the API server have their own.

use api::{ApiError, ApiReceiver, ApiRequest, ApiResponse, EventMonitor, VmState, VmmPingResponse};

use crate::config::VmConfig;
use crate::console::Console;
use crate::live_migration::{
    idle_status, start_destination, start_source, Listener, LoopLink, SourcePlan, StatusCell,
    WorkerRequest,
};
use crate::migration::MemRange;
use crate::seccomp::SeccompMode;
use crate::snapshot::{self, SnapshotError, VmSnapshot};
use crate::vm::Start;
use crate::vm::{Vm, VmError, VmOutcome};

/// Why the control loop returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest powered off, reset or crashed.
    Guest(VmOutcome),
    /// `vmm.shutdown`.
    Shutdown,
}

/// The VMM: at most one VM, its console, and the API's receiving end.
pub struct Vmm {
    pub(crate) vm: Option<Vm>,
    pub(crate) console: Option<Console>,
    api: Option<ApiReceiver>,
    seccomp: SeccompMode,
    pub(crate) events: EventMonitor,
    migration: StatusCell,
    pub(crate) link: LoopLink,
    link_rx: std::sync::mpsc::Receiver<WorkerRequest>,
    link_evt: std::sync::Arc<vmm_sys_util::eventfd::EventFd>,
    /// The current or last COLO protection.
    pub(crate) colo: Option<colo::Protection>,
    /// The secondary's own serial setting (the SVM's console is local, not the primary's).
    pub(crate) local_serial: Option<crate::config::SerialConfig>,
    /// A COLO secondary's own taps for the SVM (`--net`).
    pub(crate) local_nets: Vec<crate::config::NetConfig>,
    /// The secondary's copies of the primary's disks (`--disk`), for the SVM.
    pub(crate) local_disks: Vec<crate::config::DiskConfig>,
    /// A COLO checkpoint holds the VM (between its pause and its resume).
    pub(crate) colo_hold: bool,
}

fn api_error(e: &VmError) -> ApiError {
    let status = match e {
        VmError::InvalidState { .. } => 409,
        VmError::Boot(_) | VmError::Virtio(_) | VmError::Console(_) => 400,
        _ => 500,
    };
    ApiError::from_error(status, e)
}

fn no_vm() -> ApiError {
    ApiError::new(409, "no VM has been created (PUT /api/v1/vm.create first)")
}

impl Vmm {
    /// A VMM serving `api`, if any; its VMs' threads get `seccomp` filters.
    pub fn new(
        api: Option<ApiReceiver>,
        seccomp: SeccompMode,
        events: EventMonitor,
    ) -> std::io::Result<Self> {
        events.emit(
            "vmm",
            "started",
            serde_json::json!({"pid": std::process::id()}),
        );
        let (link, link_rx, link_evt) = LoopLink::new()?;
        Ok(Self {
            vm: None,
            console: None,
            api,
            seccomp,
            events,
            migration: std::sync::Arc::new(std::sync::Mutex::new(idle_status())),
            link,
            link_rx,
            link_evt,
            colo: None,
            local_serial: None,
            local_nets: Vec::new(),
            local_disks: Vec::new(),
            colo_hold: false,
        })
    }

    pub(crate) fn emit(&self, event: &str, properties: serde_json::Value) {
        self.events.emit("vm", event, properties);
    }

    /// Writes out queued events (before the process exits).
    pub fn flush_events(&self) {
        self.events.flush(std::time::Duration::from_secs(2));
    }

    /// Builds the VM (`vm.create`).
    pub fn create_vm(&mut self, config: &VmConfig) -> Result<(), ApiError> {
        self.build_vm(config, Start::Boot)
    }

    pub(crate) fn build_vm(&mut self, config: &VmConfig, start: Start) -> Result<(), ApiError> {
        self.build_vm_on(config, start, Vec::new())
    }

    /// [`Self::build_vm`] on the given disk backends (see [`Vm::build_on`]).
    pub(crate) fn build_vm_on(
        &mut self,
        config: &VmConfig,
        start: Start,
        disks: Vec<Box<dyn devices::virtio::block::BlockBackend>>,
    ) -> Result<(), ApiError> {
        if let Some(vm) = &self.vm {
            if vm.state() != VmState::Shutdown {
                return Err(ApiError::new(
                    409,
                    format!("a VM already exists and is {:?}", vm.state()),
                ));
            }
        }
        config
            .validate()
            .map_err(|e| ApiError::from_error(400, &e))?;
        // The console outlives VMs: one per VMM, opened for the first VM's serial setting.
        if self.console.is_none() {
            let console =
                Console::open(&config.serial).map_err(|e| ApiError::from_error(400, &e))?;
            self.console = Some(console);
        }
        let console = self.console.as_ref().ok_or_else(no_vm)?;
        self.vm = None;
        self.vm = Some(
            Vm::build_on(config, console, self.seccomp, start, disks).map_err(|e| api_error(&e))?,
        );
        self.emit(
            "created",
            serde_json::json!({"vcpus": config.cpus.boot, "memory": config.memory.size}),
        );
        Ok(())
    }

    /// Boots the created VM (`vm.boot`).
    pub fn boot_vm(&mut self) -> Result<(), ApiError> {
        let vm = self.vm.as_mut().ok_or_else(no_vm)?;
        vm.boot().map_err(|e| api_error(&e))?;
        self.emit("booted", serde_json::json!({}));
        Ok(())
    }

    pub(crate) fn vm(&mut self) -> Result<&mut Vm, ApiError> {
        self.vm.as_mut().ok_or_else(no_vm)
    }

    fn handle(&mut self, req: ApiRequest) -> (ApiResponse, bool) {
        let done = |r: Result<(), ApiError>| r.map(|()| serde_json::Value::Null);
        let resp = match req {
            ApiRequest::VmmPing => Ok(serde_json::json!(VmmPingResponse {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
            })),
            ApiRequest::VmmShutdown => {
                self.end_colo("the VMM was shut down");
                if let Some(vm) = self.vm.as_mut() {
                    vm.shutdown();
                }
                self.events.emit("vmm", "shutdown", serde_json::json!({}));
                return (Ok(serde_json::Value::Null), true);
            }
            ApiRequest::VmCreate(config) => done(
                self.check_not_protected()
                    .and_then(|()| self.create_vm(&config)),
            ),
            ApiRequest::VmBoot => done(self.boot_vm()),
            ApiRequest::VmInfo => self.vm().and_then(|vm| {
                serde_json::to_value(vm.info()).map_err(|e| ApiError::from_error(500, &e))
            }),
            ApiRequest::VmPause => done(self.check_not_held().and_then(|()| self.pause_vm())),
            ApiRequest::VmResume => done(self.check_not_held().and_then(|()| self.resume_vm())),
            ApiRequest::VmShutdown => done(self.shutdown_vm()),
            ApiRequest::VmReboot => done(self.check_not_protected().and_then(|()| self.reboot())),
            ApiRequest::VmCounters => self.vm().map(|vm| vm.counters()),
            ApiRequest::VmSnapshot(cfg) => done(self.snapshot_vm(&cfg.destination_url)),
            ApiRequest::VmRestore(cfg) => done(
                self.check_not_protected()
                    .and_then(|()| self.restore_vm(&cfg.source_url)),
            ),
            ApiRequest::VmSendMigration(data) => done(
                self.check_not_protected()
                    .and_then(|()| self.send_migration(&data)),
            ),
            ApiRequest::VmReceiveMigration(data) => done(
                self.check_not_protected()
                    .and_then(|()| self.receive_migration(&data)),
            ),
            ApiRequest::VmColoStart(cfg) => done(self.start_colo(&cfg)),
            ApiRequest::VmColoStatus => self.protection().and_then(|p| {
                serde_json::to_value(p.status()).map_err(|e| ApiError::from_error(500, &e))
            }),
            ApiRequest::VmColoFailover => self
                .protection()
                .and_then(|p| p.failover().map_err(|e| ApiError::from_error(409, &e)))
                .map(|()| serde_json::Value::Null),
            ApiRequest::VmColoSet(data) => self
                .protection()
                .and_then(|p| match data.checkpoint_interval() {
                    Some(d) => p.set_interval(d).map_err(|e| ApiError::from_error(409, &e)),
                    None => Ok(()),
                })
                .map(|()| serde_json::Value::Null),
            ApiRequest::VmColoCheckpoint(data) => self
                .protection()
                .and_then(|p| {
                    p.checkpoint(data.pause_after)
                        .map_err(|e| ApiError::from_error(409, &e))
                })
                .map(|()| serde_json::Value::Null),
            ApiRequest::VmMemoryChecksum => self.vm().and_then(|vm| {
                serde_json::to_value(crate::colo_host::memory_checksum(vm.memory()))
                    .map_err(|e| ApiError::from_error(500, &e))
            }),
            ApiRequest::VmMigrationStatus => self
                .migration
                .lock()
                .map_err(|_| ApiError::new(500, "migration status unavailable"))
                .and_then(|s| serde_json::to_value(&*s).map_err(|e| ApiError::from_error(500, &e))),
        };
        (resp, false)
    }

    pub(crate) fn migration_active(&self) -> bool {
        self.migration
            .lock()
            .is_ok_and(|s| s.phase == api::MigrationPhase::Active)
    }

    fn send_migration(&mut self, data: &api::SendMigrationData) -> Result<(), ApiError> {
        if self.migration_active() {
            return Err(ApiError::new(409, "a migration is already running"));
        }
        let url = data
            .destination()
            .map_err(|e| ApiError::from_error(400, &e))?;
        let vm = self.vm()?;
        if vm.state() != VmState::Running {
            return Err(ApiError::new(
                409,
                format!("only a running VM can migrate (it is {:?})", vm.state()),
            ));
        }
        let plan = SourcePlan {
            url,
            channels: data.channel_count().try_into().unwrap_or(1),
            downtime: data.downtime(),
            memory: vm.memory().clone(),
            dirty: vm.dirty_tracker(),
            regions: vm
                .memory_ranges()
                .into_iter()
                .map(|r| MemRange {
                    gpa: r.gpa,
                    len: r.len,
                })
                .collect(),
            vcpus: vm.config().cpus.boot.into(),
            config_json: serde_json::to_string(vm.config())
                .map_err(|e| ApiError::from_error(500, &e))?,
            events: self.events.clone(),
        };
        if let Ok(mut s) = self.migration.lock() {
            *s = idle_status();
            s.phase = api::MigrationPhase::Active;
        }
        start_source(plan, self.link.clone(), self.migration.clone())
            .map_err(|e| ApiError::from_error(500, &e))?;
        self.events.emit(
            "vm",
            "migration-started",
            serde_json::json!({"destination_url": data.destination_url}),
        );
        Ok(())
    }

    fn receive_migration(&mut self, data: &api::ReceiveMigrationData) -> Result<(), ApiError> {
        if self.migration_active() {
            return Err(ApiError::new(409, "a migration is already running"));
        }
        if let Some(vm) = &self.vm {
            if vm.state() != VmState::Shutdown {
                return Err(ApiError::new(
                    409,
                    format!("a VM already exists and is {:?}", vm.state()),
                ));
            }
        }
        let url = data.receiver().map_err(|e| ApiError::from_error(400, &e))?;
        let listener = Listener::bind(&url).map_err(|e| ApiError::new(400, e))?;
        if let Ok(mut s) = self.migration.lock() {
            *s = idle_status();
            s.phase = api::MigrationPhase::Active;
        }
        start_destination(listener, self.link.clone(), self.migration.clone())
            .map_err(|e| ApiError::from_error(500, &e))?;
        self.events.emit(
            "vm",
            "migration-listening",
            serde_json::json!({"receiver_url": data.receiver_url}),
        );
        Ok(())
    }

    /// Serves what a migration worker asks; true when the VMM should report an exit.
    fn handle_worker(&mut self, req: WorkerRequest) {
        match req {
            WorkerRequest::PauseAndSave(reply) => {
                let result = self.pause_and_save();
                let _ = reply.send(result);
            }
            WorkerRequest::SourceDone(Ok(())) => {
                // The guest runs on the destination now; this copy must never run again.
                if let Some(vm) = self.vm.as_mut() {
                    vm.shutdown();
                }
                if let Some(c) = &self.console {
                    c.detach();
                }
                let status = self
                    .migration
                    .lock()
                    .ok()
                    .and_then(|s| serde_json::to_value(&*s).ok())
                    .unwrap_or_default();
                self.emit(
                    "migrated",
                    serde_json::json!({"direction": "out", "status": status}),
                );
            }
            WorkerRequest::SourceDone(Err(e)) => {
                log::warn!("migration failed: {e}; the VM keeps running here");
                if let Ok(mut s) = self.migration.lock() {
                    s.phase = api::MigrationPhase::Failed;
                    s.error = Some(e.clone());
                }
                if let Some(vm) = self.vm.as_mut() {
                    if vm.state() == VmState::Paused {
                        if let Err(e) = vm.resume() {
                            log::error!("cannot resume after a failed migration: {e}");
                        }
                    }
                }
                self.emit("migration-failed", serde_json::json!({"error": e}));
            }
            WorkerRequest::CreateVm(config, reply) => {
                let result = self
                    .build_vm(&config, Start::Restore)
                    .map_err(|e| e.error)
                    .and_then(|()| {
                        self.vm
                            .as_ref()
                            .map(|vm| vm.memory().clone())
                            .ok_or_else(|| "no VM".to_string())
                    });
                let _ = reply.send(result);
            }
            WorkerRequest::ApplyState(blob, reply) => {
                let t = std::time::Instant::now();
                let result = serde_json::from_slice::<VmSnapshot>(&blob)
                    .map_err(|e| format!("the VM state does not parse: {e}"))
                    .and_then(|snap| {
                        let vm = self.vm.as_mut().ok_or("no VM")?;
                        vm.apply_snapshot(&snap).map_err(|e| e.to_string())
                    });
                log::info!("migration: state applied in {:?}", t.elapsed());
                let _ = reply.send(result);
            }
            WorkerRequest::Resume(reply) => {
                let result = self.resume_vm().map_err(|e| e.error);
                if let Some(vm) = &self.vm {
                    vm.virtio().announce();
                }
                let _ = reply.send(result);
            }
            WorkerRequest::DestinationDone(Ok(())) => {
                self.emit("migrated", serde_json::json!({"direction": "in"}));
            }
            WorkerRequest::Colo(req) => self.handle_colo(req),
            WorkerRequest::DestinationDone(Err(e)) => {
                log::warn!("incoming migration failed: {e}");
                if let Some(vm) = self.vm.as_mut() {
                    vm.shutdown();
                }
                self.vm = None;
                self.emit("migration-failed", serde_json::json!({"error": e}));
            }
        }
    }

    fn pause_and_save(&mut self) -> Result<Vec<u8>, String> {
        let vm = self.vm.as_mut().ok_or("no VM")?;
        let t = std::time::Instant::now();
        vm.pause().map_err(|e| e.to_string())?;
        let paused = t.elapsed();
        let snap = vm.save_snapshot().map_err(|e| e.to_string());
        let saved = t.elapsed();
        let blob = snap.and_then(|s| serde_json::to_vec(&s).map_err(|e| e.to_string()));
        log::info!(
            "migration: paused in {paused:?}, state saved at {saved:?}, encoded at {:?}",
            t.elapsed()
        );
        if blob.is_err() {
            let _ = vm.resume();
        }
        blob
    }

    fn snapshot_vm(&mut self, url: &str) -> Result<(), ApiError> {
        let vm = self.vm()?;
        let status = |e: &SnapshotError| match e {
            SnapshotError::NotPaused(_) | SnapshotError::NotEmpty(_) => 409,
            SnapshotError::Url(_) => 400,
            _ => 500,
        };
        vm.snapshot_to(url)
            .map_err(|e| ApiError::from_error(status(&e), &e))?;
        self.emit("snapshot", serde_json::json!({"destination_url": url}));
        Ok(())
    }

    /// Replaces any shut-down VM by one restored from `url` (paused until `vm.resume`).
    pub fn restore_vm(&mut self, url: &str) -> Result<(), ApiError> {
        if let Some(vm) = &self.vm {
            if vm.state() != VmState::Shutdown {
                return Err(ApiError::new(
                    409,
                    format!("a VM already exists and is {:?}", vm.state()),
                ));
            }
        }
        let dir = snapshot::url_dir(url).map_err(|e| ApiError::from_error(400, &e))?;
        // The console follows the snapshot's serial setting, opened once per VMM.
        if self.console.is_none() {
            let config = snapshot::read_config(&dir).map_err(|e| ApiError::from_error(400, &e))?;
            let console =
                Console::open(&config.serial).map_err(|e| ApiError::from_error(400, &e))?;
            self.console = Some(console);
        }
        let console = self.console.as_ref().ok_or_else(no_vm)?;
        self.vm = None;
        let vm = Vm::restore_from(url, console, self.seccomp).map_err(|e| {
            let status = match e {
                SnapshotError::Url(_)
                | SnapshotError::Format { .. }
                | SnapshotError::Version { .. }
                | SnapshotError::Mismatch(_)
                | SnapshotError::Io { .. } => 400,
                _ => 500,
            };
            ApiError::from_error(status, &e)
        })?;
        self.vm = Some(vm);
        self.emit("restored", serde_json::json!({"source_url": url}));
        Ok(())
    }

    /// Resumes the VM after a restore from the command line, announcing its NICs.
    pub fn resume(&mut self) -> Result<(), ApiError> {
        self.resume_vm()?;
        if let Some(vm) = &self.vm {
            vm.virtio().announce();
        }
        Ok(())
    }

    fn pause_vm(&mut self) -> Result<(), ApiError> {
        self.vm()?.pause().map_err(|e| api_error(&e))?;
        self.emit("paused", serde_json::json!({}));
        Ok(())
    }

    fn resume_vm(&mut self) -> Result<(), ApiError> {
        self.vm()?.resume().map_err(|e| api_error(&e))?;
        self.emit("resumed", serde_json::json!({}));
        Ok(())
    }

    fn shutdown_vm(&mut self) -> Result<(), ApiError> {
        let vm = self.vm()?;
        if vm.state() == VmState::Shutdown {
            return Err(ApiError::new(409, "the VM is already shut down"));
        }
        self.end_colo("the VM was shut down through the API");
        let vm = self.vm()?;
        vm.shutdown();
        if let Some(c) = &self.console {
            c.detach();
        }
        self.emit("shutdown", serde_json::json!({"reason": "api"}));
        Ok(())
    }

    fn reboot(&mut self) -> Result<(), ApiError> {
        let vm = self.vm()?;
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(ApiError::new(
                409,
                format!("cannot reboot a VM that is {:?}", vm.state()),
            ));
        }
        let config = vm.config().clone();
        vm.shutdown();
        self.emit("rebooting", serde_json::json!({}));
        self.create_vm(&config)?;
        self.boot_vm()
    }

    /// Serves requests until the guest leaves or `vmm.shutdown`.
    pub fn run(&mut self) -> VmmExit {
        loop {
            let mut fds = Vec::with_capacity(4);
            fds.push(pollfd(&self.link_evt));
            if let Some(api) = &self.api {
                fds.push(pollfd(api.eventfd()));
            }
            let vm_live = self
                .vm
                .as_ref()
                .is_some_and(|vm| matches!(vm.state(), VmState::Running | VmState::Paused));
            if let Some(vm) = self.vm.as_ref().filter(|_| vm_live) {
                fds.push(pollfd(vm.exit_event().fd()));
                fds.push(pollfd(vm.virtio().activation_eventfd()));
            }
            let colo_active = self.colo.as_ref().is_some_and(colo::Protection::active);
            if self.api.is_none() && !vm_live && !colo_active {
                // No API and no running VM: nothing can ever happen.
                return VmmExit::Shutdown;
            }
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            let _ = self.link_evt.read();
            while let Ok(req) = self.link_rx.try_recv() {
                self.handle_worker(req);
            }

            if let Some(vm) = self.vm.as_mut().filter(|_| vm_live) {
                vm.virtio().activate_pending();
                if vm.exit_event().pending().is_some() {
                    let _ = vm.exit_event().fd().read();
                    if let Some(outcome) = vm.shutdown() {
                        if let Some(c) = &self.console {
                            c.detach();
                        }
                        let (event, props) = match &outcome {
                            VmOutcome::PowerOff => {
                                ("shutdown", serde_json::json!({"reason": "guest power-off"}))
                            }
                            VmOutcome::Reset => {
                                ("shutdown", serde_json::json!({"reason": "guest reset"}))
                            }
                            VmOutcome::Crash(msg) => {
                                ("crashed", serde_json::json!({"message": msg}))
                            }
                        };
                        self.emit(event, props);
                        self.end_colo(&format!("the guest stopped ({event})"));
                        return VmmExit::Guest(outcome);
                    }
                }
            }
            while let Some((req, reply)) = self.api.as_ref().and_then(ApiReceiver::try_recv) {
                log::info!("API request: {req:?}");
                let (resp, stop) = self.handle(req);
                if let Err(e) = &resp {
                    log::warn!("API request failed: {} ({})", e.error, e.status);
                }
                // The API thread may have given up waiting; nothing to do then.
                let _ = reply.send(resp);
                if stop {
                    return VmmExit::Shutdown;
                }
            }
        }
    }
}

fn pollfd(fd: &vmm_sys_util::eventfd::EventFd) -> libc::pollfd {
    libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(fd),
        events: libc::POLLIN,
        revents: 0,
    }
}
