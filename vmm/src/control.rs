//! The VMM's control loop: owns the (single) VM, answers API requests, and notices when the
//! guest leaves. Runs on the main thread; vCPUs, devices and the API server have their own.

use api::{ApiError, ApiReceiver, ApiRequest, ApiResponse, EventMonitor, VmState, VmmPingResponse};

use crate::config::VmConfig;
use crate::console::Console;
use crate::seccomp::SeccompMode;
use crate::snapshot::{self, SnapshotError};
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
    vm: Option<Vm>,
    console: Option<Console>,
    api: Option<ApiReceiver>,
    seccomp: SeccompMode,
    events: EventMonitor,
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
    pub fn new(api: Option<ApiReceiver>, seccomp: SeccompMode, events: EventMonitor) -> Self {
        events.emit(
            "vmm",
            "started",
            serde_json::json!({"pid": std::process::id()}),
        );
        Self {
            vm: None,
            console: None,
            api,
            seccomp,
            events,
        }
    }

    fn emit(&self, event: &str, properties: serde_json::Value) {
        self.events.emit("vm", event, properties);
    }

    /// Writes out queued events (before the process exits).
    pub fn flush_events(&self) {
        self.events.flush(std::time::Duration::from_secs(2));
    }

    /// Builds the VM (`vm.create`).
    pub fn create_vm(&mut self, config: &VmConfig) -> Result<(), ApiError> {
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
        self.vm = Some(Vm::new(config, console, self.seccomp).map_err(|e| api_error(&e))?);
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

    fn vm(&mut self) -> Result<&mut Vm, ApiError> {
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
                if let Some(vm) = self.vm.as_mut() {
                    vm.shutdown();
                }
                self.events.emit("vmm", "shutdown", serde_json::json!({}));
                return (Ok(serde_json::Value::Null), true);
            }
            ApiRequest::VmCreate(config) => done(self.create_vm(&config)),
            ApiRequest::VmBoot => done(self.boot_vm()),
            ApiRequest::VmInfo => self.vm().and_then(|vm| {
                serde_json::to_value(vm.info()).map_err(|e| ApiError::from_error(500, &e))
            }),
            ApiRequest::VmPause => done(self.pause_vm()),
            ApiRequest::VmResume => done(self.resume_vm()),
            ApiRequest::VmShutdown => done(self.shutdown_vm()),
            ApiRequest::VmReboot => done(self.reboot()),
            ApiRequest::VmCounters => self.vm().map(|vm| vm.counters()),
            ApiRequest::VmSnapshot(cfg) => done(self.snapshot_vm(&cfg.destination_url)),
            ApiRequest::VmRestore(cfg) => done(self.restore_vm(&cfg.source_url)),
            ApiRequest::VmSendMigration(_)
            | ApiRequest::VmReceiveMigration(_)
            | ApiRequest::VmMigrationStatus => {
                Err(ApiError::new(501, "live migration is not implemented yet"))
            }
        };
        (resp, false)
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

    /// Resumes the VM (after a restore from the command line).
    pub fn resume(&mut self) -> Result<(), ApiError> {
        self.resume_vm()
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
            let mut fds = Vec::with_capacity(2);
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
            if fds.is_empty() {
                // No API and no running VM: nothing can ever happen.
                return VmmExit::Shutdown;
            }
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };

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
