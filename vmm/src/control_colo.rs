//! The control loop's COLO part: starting protection in either role, and serving what the
//! COLO worker asks of the VM (pause, state, resume, building the SVM, the end).

use std::sync::Arc;

use api::{ApiError, ColoConfig, ColoRole, VmState};

use crate::colo_host::{parts_of, ColoObserver, ColoRequest, ColoSecondaryHost, ColoVm};
use crate::config::{DiskConfig, NetConfig, SerialConfig};
use crate::control::Vmm;
use crate::snapshot::VmSnapshot;
use crate::vm::Start;

impl Vmm {
    /// The current or last protection (`vm.colo-*`).
    pub(crate) fn protection(&self) -> Result<&colo::Protection, ApiError> {
        self.colo
            .as_ref()
            .ok_or_else(|| ApiError::new(409, "COLO has not been started (vm.colo-start)"))
    }

    /// Sets the console the SVM will use (the secondary's own `--serial`).
    pub fn set_local_serial(&mut self, serial: SerialConfig) {
        self.local_serial = Some(serial);
    }

    /// Sets the taps the SVM's NICs will use (the secondary's own `--net`), in order.
    pub fn set_local_nets(&mut self, nets: Vec<NetConfig>) {
        self.local_nets = nets;
    }

    /// Sets this host's copies of the primary's disks (the secondary's own `--disk`), in
    /// order: the SVM runs on them, block replication keeps them equal to the primary's.
    pub fn set_local_disks(&mut self, disks: Vec<DiskConfig>) {
        self.local_disks = disks;
    }

    /// Starts COLO in `cfg.role` (`--colo`, `vm.colo-start`).
    pub fn start_colo(&mut self, cfg: &ColoConfig) -> Result<(), ApiError> {
        cfg.validate().map_err(|e| ApiError::from_error(400, &e))?;
        if self.colo.as_ref().is_some_and(colo::Protection::active) {
            return Err(ApiError::new(409, "COLO protection is already running"));
        }
        if self.migration_active() {
            return Err(ApiError::new(409, "a migration is running"));
        }
        let observer = Arc::new(ColoObserver {
            events: self.events.clone(),
            link: self.link.clone(),
        });
        let address = cfg.address().unwrap_or_default().to_string();
        let psk = cfg
            .key_file
            .as_deref()
            .map(|f| colo::auth::Psk::from_file(std::path::Path::new(f)).map(Arc::new))
            .transpose()
            .map_err(|e| ApiError::new(400, format!("COLO key file: {e}")))?;
        let protection = match cfg.role {
            ColoRole::Primary => {
                let vm = self.vm()?;
                if vm.state() != VmState::Running {
                    return Err(ApiError::new(
                        409,
                        format!(
                            "only a running VM can be protected (it is {:?})",
                            vm.state()
                        ),
                    ));
                }
                if vm.config().nets.len() > 1 {
                    return Err(ApiError::new(
                        400,
                        format!(
                            "COLO's proxy protects one NIC; this VM has {}",
                            vm.config().nets.len()
                        ),
                    ));
                }
                let pcfg = colo::PrimaryConfig {
                    peer: address.clone(),
                    channels: cfg.channel_count(),
                    interval: cfg.checkpoint_interval(),
                    heartbeat_interval: cfg.heartbeat_interval(),
                    heartbeat_timeout: cfg.heartbeat_timeout(),
                    config_json: serde_json::to_string(vm.config())
                        .map_err(|e| ApiError::from_error(500, &e))?,
                    vcpus: vm.config().cpus.boot.into(),
                    psk,
                    compare_timeout: cfg.compare_timeout(),
                    disk_completion: match cfg.disk_completion.unwrap_or_default() {
                        api::DiskCompletion::Replicated => {
                            colo::block::mirror::Completion::Replicated
                        }
                        api::DiskCompletion::Local => colo::block::mirror::Completion::Local,
                    },
                };
                let pvm = Arc::new(ColoVm::new(parts_of(vm), self.link.clone()));
                colo::start_primary(pvm, pcfg, observer)
            }
            ColoRole::Secondary => {
                if self
                    .vm
                    .as_ref()
                    .is_some_and(|vm| vm.state() != VmState::Shutdown)
                {
                    return Err(ApiError::new(
                        409,
                        "the secondary must not run a VM: the SVM comes from the primary",
                    ));
                }
                let listener = std::net::TcpListener::bind(&address)
                    .map_err(|e| ApiError::new(400, format!("listen on {address}: {e}")))?;
                let scfg = colo::SecondaryConfig {
                    listen: address.clone(),
                    heartbeat_interval: cfg.heartbeat_interval(),
                    heartbeat_timeout: cfg.heartbeat_timeout(),
                    psk,
                    disks: self
                        .local_disks
                        .iter()
                        .map(|d| colo::block::link::DiskTarget {
                            path: d.path.clone(),
                        })
                        .collect(),
                    layers: match &cfg.disk_layers {
                        Some(dir) => colo::block::LayerStore::Files(dir.into()),
                        None => colo::block::LayerStore::Memory,
                    },
                };
                self.finish_merges(&scfg)?;
                let host = Box::new(ColoSecondaryHost {
                    link: self.link.clone(),
                });
                colo::start_secondary(listener, scfg, host, observer)
            }
        }
        .map_err(|e| ApiError::from_error(500, &e))?;
        self.colo = Some(protection);
        self.events.emit(
            "colo",
            "started",
            serde_json::json!({
                "role": cfg.role.as_str(),
                "address": address,
                "authenticated": cfg.key_file.is_some(),
            }),
        );
        Ok(())
    }

    /// Finishes the failover merges a crash of this secondary cut short (their journals are in
    /// the layers' directory): a copy is whole again before anything else uses it.
    fn finish_merges(&self, scfg: &colo::SecondaryConfig) -> Result<(), ApiError> {
        let colo::block::LayerStore::Files(dir) = &scfg.layers else {
            return Ok(());
        };
        let finished = colo::block::link::finish_merges(&scfg.disks, dir).map_err(|e| {
            ApiError::new(
                500,
                format!("a copy's failover merge was cut short and cannot be finished: {e}"),
            )
        })?;
        for path in finished {
            self.events.emit(
                "colo",
                "disk-merge-finished",
                serde_json::json!({"disk": path.display().to_string()}),
            );
        }
        Ok(())
    }

    /// Serves one request of the COLO worker.
    pub(crate) fn handle_colo(&mut self, req: ColoRequest) {
        match req {
            ColoRequest::Pause(reply) => {
                self.colo_hold = true;
                let r = self
                    .vm()
                    .map_err(|e| e.error)
                    .and_then(|vm| match vm.state() {
                        VmState::Paused => Ok(false),
                        _ => vm.pause().map(|()| true).map_err(|e| e.to_string()),
                    });
                let paused_it = matches!(r, Ok(true));
                if reply.send(r).is_err() {
                    // The worker gave up waiting: nobody will resume what was paused here.
                    self.colo_hold = false;
                    if paused_it {
                        if let Ok(vm) = self.vm() {
                            let _ = vm.resume();
                        }
                    }
                }
            }
            ColoRequest::Save(reply) => {
                let r = self.vm().map_err(|e| e.error).and_then(|vm| {
                    let snap = vm.save_snapshot().map_err(|e| e.to_string())?;
                    serde_json::to_vec(&snap).map_err(|e| e.to_string())
                });
                let _ = reply.send(r);
            }
            ColoRequest::Load(blob, reply) => {
                let r = serde_json::from_slice::<VmSnapshot>(&blob)
                    .map_err(|e| format!("the checkpoint's VM state does not parse: {e}"))
                    .and_then(|snap| {
                        let vm = self.vm().map_err(|e| e.error)?;
                        vm.apply_snapshot(&snap).map_err(|e| e.to_string())
                    });
                let _ = reply.send(r);
            }
            ColoRequest::Resume(run, reply) => {
                self.colo_hold = false;
                let r = match self.vm() {
                    Ok(vm) if run => vm.resume().map_err(|e| e.to_string()),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.error),
                };
                let _ = reply.send(r);
            }
            ColoRequest::CreateVm(mut config, disks, reply) => {
                if let Some(serial) = &self.local_serial {
                    config.serial = serial.clone();
                }
                let r = if let Err(e) = self.localize_nets(&mut config) {
                    Err(e)
                } else if let Err(e) = self.localize_disks(&mut config, disks.len()) {
                    Err(e)
                } else {
                    self.build_vm_on(&config, Start::Restore, disks)
                        .map_err(|e| e.error)
                        .and_then(|()| self.vm().map(|vm| parts_of(vm)).map_err(|e| e.error))
                };
                // The SVM must not run before its first checkpoint is loaded: the worker's
                // first resume releases it.
                self.colo_hold = r.is_ok();
                let _ = reply.send(r);
            }
            ColoRequest::Exited(exit) => self.colo_exited(exit),
        }
    }

    /// Puts the SVM's NICs on this host's taps (`--net`), keeping the guest's MAC addresses:
    /// the SVM is the same machine, which after a failover answers on this host's network.
    fn localize_nets(&self, config: &mut crate::config::VmConfig) -> Result<(), String> {
        if config.nets.len() != self.local_nets.len() {
            return Err(format!(
                "the primary's VM has {} NIC(s) and this secondary was given {} --net: give \
                 the secondary one --net tap=NAME per NIC of the primary",
                config.nets.len(),
                self.local_nets.len()
            ));
        }
        for (net, local) in config.nets.iter_mut().zip(&self.local_nets) {
            let mac =
                net.mac
                    .unwrap_or(crate::config::MacAddr(crate::virtio_devices::default_mac(
                        &net.tap,
                    )));
            *net = NetConfig {
                mac: Some(mac),
                ..local.clone()
            };
        }
        Ok(())
    }

    /// Puts the SVM's disks on this host's copies (`--disk`, one per disk of the primary, in
    /// order), which block replication opened as the replicas' bases (`replicas` of them).
    fn localize_disks(
        &self,
        config: &mut crate::config::VmConfig,
        replicas: usize,
    ) -> Result<(), String> {
        if config.disks.len() != self.local_disks.len() || replicas != config.disks.len() {
            return Err(format!(
                "the primary's VM has {} disk(s) and this secondary was given {} --disk                  ({} replicated): give the secondary one --disk path=COPY per disk of the primary",
                config.disks.len(),
                self.local_disks.len(),
                replicas
            ));
        }
        for (disk, local) in config.disks.iter_mut().zip(&self.local_disks) {
            // The guest sees the primary's disk (its id and mode) on this host's copy.
            disk.path = local.path.clone();
        }
        Ok(())
    }

    /// Refuses what would replace or share the protected VM (a migration, a reboot, a new
    /// VM) while COLO runs: the COLO worker keeps handles on this VM's memory and dirty log.
    pub(crate) fn check_not_protected(&self) -> Result<(), ApiError> {
        if self.colo.as_ref().is_some_and(colo::Protection::active) {
            return Err(ApiError::new(
                409,
                "COLO protection is running: end it first (vm.colo-failover)",
            ));
        }
        Ok(())
    }

    /// Ends protection before this VMM stops its VM or exits, telling the peer, so that a
    /// secondary does not bring back a guest that powered off (or a VMM that was shut down).
    pub(crate) fn end_colo(&self, reason: &str) {
        if let Some(p) = &self.colo {
            p.end(reason);
        }
    }

    /// Refuses a user's pause or resume while a checkpoint holds the VM (its state is being
    /// saved or loaded): checkpoints pause for milliseconds, so a retry succeeds.
    pub(crate) fn check_not_held(&self) -> Result<(), ApiError> {
        if self.colo_hold {
            return Err(ApiError::new(
                409,
                "a COLO checkpoint holds the VM right now; retry",
            ));
        }
        Ok(())
    }

    fn colo_exited(&mut self, exit: colo::ColoExit) {
        self.colo_hold = false;
        log::warn!(
            "COLO {} ended after {} checkpoints: {} ({:?})",
            exit.role.as_str(),
            exit.after_checkpoints,
            exit.reason,
            exit.action
        );
        self.events.emit(
            "colo",
            "colo_exit",
            serde_json::to_value(&exit).unwrap_or_default(),
        );
        match exit.action {
            colo::ExitAction::Stop => {
                if let Some(vm) = self.vm.as_mut() {
                    if vm.state() != VmState::Shutdown {
                        vm.shutdown();
                        self.emit(
                            "shutdown",
                            serde_json::json!({"reason": "COLO secondary stopped"}),
                        );
                    }
                }
                if let Some(c) = &self.console {
                    c.detach();
                }
            }
            colo::ExitAction::Continue => {
                if let Some(vm) = self.vm.as_ref() {
                    // The survivor's NICs now carry the guest's traffic.
                    vm.virtio().announce();
                }
            }
        }
    }
}
