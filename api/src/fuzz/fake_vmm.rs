//! A stand-in for the VMM's control loop: a thread that answers each [`ApiRequest`] with
//! fixed data, so the server can be tested without a VM, plus a simulated migration
//! ([`simulated_answer`]) whose status moves on at each `vm.migration-status` poll and a
//! COLO pair that `vm.colo-failover` and `vm.colo-set` change.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::{
    ApiError, ApiReceiver, ApiRequest, ApiResponse, DeviceInfo, MemoryChecksum, MigrationPhase,
    MigrationStatus, VmConfig, VmInfo, VmState, VmmPingResponse,
};

/// How a fake loop answers.
pub type Answer = dyn Fn(&ApiRequest) -> ApiResponse + Send + 'static;

/// A running fake control loop; dropping it stops the thread and drops the receiver.
pub struct FakeVmm {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<ApiRequest>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeVmm {
    /// Serves `rx` with [`simulated_answer`] (the fixed answers plus a simulated migration).
    pub fn start(rx: ApiReceiver) -> Self {
        Self::with_answer(rx, simulated_answer())
    }

    /// Serves `rx` with `answer`.
    pub fn with_answer(rx: ApiReceiver, answer: Box<Answer>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (t_stop, t_seen) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::Builder::new()
            .name("fake-vmm".into())
            .spawn(move || {
                while !t_stop.load(Ordering::SeqCst) {
                    wait_readable(&rx);
                    while let Some((req, reply)) = rx.try_recv() {
                        let answer = answer(&req);
                        t_seen
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(req);
                        let _ = reply.send(answer);
                    }
                }
            })
            .ok();
        Self { stop, seen, thread }
    }

    /// The requests answered so far, in order.
    pub fn seen(&self) -> Vec<ApiRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for the eventfd, but at most 20 ms so stop is noticed (and a wakeup the channel's
/// eventfd protocol might lose is retried).
fn wait_readable(rx: &ApiReceiver) {
    let mut fd = libc::pollfd {
        fd: rx.eventfd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fd` is one live pollfd and the count passed is 1.
    unsafe { libc::poll(&mut fd, 1, 20) };
}

fn to_json<T: serde::Serialize>(v: &T) -> ApiResponse {
    serde_json::to_value(v).map_err(|e| ApiError::new(500, format!("fake VMM: {e}")))
}

/// The fixed answers: ping, info, counters, `vm.colo-status` and `vm.memory-checksum` get
/// sample data, `vm.migration-status` an idle status, `VmCreate` of a kernel named
/// `/conflict`, `VmSnapshot` to `file:///conflict` and `VmColoStart` with a peer or listen
/// address on host `conflict` get 409, everything else succeeds with no content.
pub fn fixed_answer(req: &ApiRequest) -> ApiResponse {
    match req {
        ApiRequest::VmmPing => to_json(&VmmPingResponse {
            version: "0.1.0-fake".into(),
            pid: std::process::id(),
        }),
        ApiRequest::VmInfo => to_json(&sample_vm_info()?),
        ApiRequest::VmCounters => Ok(sample_counters()),
        ApiRequest::VmMigrationStatus => to_json(&idle_migration()),
        ApiRequest::VmColoStatus => Ok(sample_colo_status()),
        ApiRequest::VmMemoryChecksum => to_json(&SAMPLE_CHECKSUM),
        ApiRequest::VmColoStart(c) if c.address().is_some_and(|a| a.starts_with("conflict:")) => {
            Err(ApiError {
                status: 409,
                error: "COLO is already running".into(),
                causes: vec!["started earlier as primary".into()],
            })
        }
        ApiRequest::VmCreate(c) if c.payload.kernel.as_os_str() == "/conflict" => Err(ApiError {
            status: 409,
            error: "a VM already exists".into(),
            causes: vec!["created earlier".into()],
        }),
        ApiRequest::VmSnapshot(s) if s.destination_url == "file:///conflict" => Err(ApiError {
            status: 409,
            error: "the VM must be paused to snapshot it".into(),
            causes: vec!["it is Running".into()],
        }),
        _ => Ok(serde_json::Value::Null),
    }
}

/// Guest RAM of the fake VM (as [`sample_vm_info`] reports it).
pub const FAKE_RAM: u64 = 512 << 20;

/// The status before any migration.
pub fn idle_migration() -> MigrationStatus {
    MigrationStatus::idle()
}

/// The migration the fake loop pretends to run: `step` counts status polls since the start.
struct FakeMigration {
    step: u32,
    fail: bool,
}

/// Polls from the start of a simulated migration to its end.
pub const FAKE_MIGRATION_POLLS: u32 = 4;

impl FakeMigration {
    /// The status at `self.step`: round 1 copies all memory in two polls, round 2 resends
    /// 32 MiB of dirtied pages, round 3 (the paused final round) completes it. A destination
    /// URL containing `fail` fails during round 2 instead.
    fn status(&self) -> MigrationStatus {
        const MIB: u64 = 1 << 20;
        // A failing migration stops where round 2 began.
        let step = match self.fail {
            true => self.step.min(FAKE_MIGRATION_POLLS - 1),
            false => self.step,
        };
        let (round, bytes, dirty_rate, eta_ms) = match step {
            0 => (1, 0, 0, 1600),
            1 => (1, FAKE_RAM / 2, 64 * MIB, 800),
            2 => (1, FAKE_RAM, 64 * MIB, 400),
            3 => (2, FAKE_RAM + 32 * MIB, 16 * MIB, 100),
            _ => (3, FAKE_RAM + 36 * MIB, 16 * MIB, 0),
        };
        let mut st = MigrationStatus {
            phase: MigrationPhase::Active,
            round,
            bytes,
            total_bytes: FAKE_RAM,
            dirty_rate,
            eta_ms,
            downtime_ms: None,
            elapsed_ms: u64::from(self.step) * 200,
            error: None,
        };
        if self.fail && self.step >= FAKE_MIGRATION_POLLS {
            st.phase = MigrationPhase::Failed;
            st.eta_ms = 0;
            st.error = Some("sending round 2: connection reset by peer".into());
        } else if self.step >= FAKE_MIGRATION_POLLS {
            st.phase = MigrationPhase::Completed;
            st.downtime_ms = Some(12.5);
        }
        st
    }
}

/// [`fixed_answer`] plus a migration that advances one step per `vm.migration-status` poll:
/// `vm.send-migration` starts it (409 while one is active), the [`FAKE_MIGRATION_POLLS`]th
/// poll after that sees it completed (or failed, for a destination URL containing `fail`).
/// The COLO pair of [`sample_colo_status`] takes `vm.colo-set`'s interval, and after
/// `vm.colo-failover` reports `failed-over` with an exit.
pub fn simulated_answer() -> Box<Answer> {
    let migration: Mutex<Option<FakeMigration>> = Mutex::new(None);
    let colo = Mutex::new(sample_colo_status());
    Box::new(move |req| {
        let mut m = migration.lock().unwrap_or_else(PoisonError::into_inner);
        let mut colo = colo.lock().unwrap_or_else(PoisonError::into_inner);
        match req {
            ApiRequest::VmColoStatus => Ok(colo.clone()),
            ApiRequest::VmColoSet(d) => {
                if let Some(ms) = d.checkpoint_interval_ms {
                    colo["checkpoint_interval_ms"] = ms.into();
                }
                Ok(serde_json::Value::Null)
            }
            ApiRequest::VmColoFailover if colo["state"] == "failed-over" => {
                Err(ApiError::new(409, "COLO has already failed over"))
            }
            ApiRequest::VmColoFailover => {
                colo["state"] = "failed-over".into();
                colo["exit"] = serde_json::json!({
                    "reason": "failover requested",
                    "during_checkpoint": false,
                    "after_checkpoints": colo["checkpoints"].clone(),
                });
                Ok(serde_json::Value::Null)
            }
            ApiRequest::VmSendMigration(_)
                if m.as_ref()
                    .is_some_and(|m| matches!(m.status().phase, MigrationPhase::Active)) =>
            {
                Err(ApiError::new(409, "a migration is already running"))
            }
            ApiRequest::VmSendMigration(d) => {
                *m = Some(FakeMigration {
                    step: 0,
                    fail: d.destination_url.contains("fail"),
                });
                Ok(serde_json::Value::Null)
            }
            ApiRequest::VmMigrationStatus => match m.as_mut() {
                Some(m) => {
                    m.step = m.step.saturating_add(1);
                    to_json(&m.status())
                }
                None => fixed_answer(req),
            },
            _ => fixed_answer(req),
        }
    })
}

/// A plausible `vm.info`.
pub fn sample_vm_info() -> Result<VmInfo, ApiError> {
    // Built from JSON so fields added to the config later do not break this helper.
    let config: VmConfig = serde_json::from_value(serde_json::json!({
        "payload": {"kernel": "/boot/vmlinux", "cmdline": "console=ttyS0"},
        "memory": {"size": 536_870_912u64},
        "cpus": {"boot": 2},
        "disks": [{"path": "/img/root.raw", "id": "root"}]
    }))
    .map_err(|e| ApiError::new(500, format!("fake VMM config: {e}")))?;
    Ok(VmInfo {
        memory_actual_size: config.memory.size,
        config,
        state: VmState::Running,
        devices: vec![
            DeviceInfo {
                id: "com1".into(),
                kind: "serial".into(),
                base: 0x3f8,
                irq: Some(4),
            },
            DeviceInfo {
                id: "root".into(),
                kind: "virtio-blk".into(),
                base: 0xd000_0000,
                irq: Some(5),
            },
        ],
    })
}

/// A plausible `vm.counters`.
pub fn sample_counters() -> serde_json::Value {
    serde_json::json!({
        "root": {"read_bytes": 4096, "write_bytes": 0, "read_ops": 1, "write_ops": 0},
        "net0": {"rx_bytes": 1500, "tx_bytes": 60, "rx_frames": 1, "tx_frames": 1}
    })
}

/// What the fake `vm.memory-checksum` answers.
pub const SAMPLE_CHECKSUM: MemoryChecksum = MemoryChecksum {
    crc32: 0x1234_abcd,
    bytes: FAKE_RAM,
};

/// A plausible `vm.colo-status` of a protected primary (the spec's `ColoStatus`, every
/// field present).
pub fn sample_colo_status() -> serde_json::Value {
    serde_json::json!({
        "role": "primary",
        "state": "protected",
        "peer": "10.0.0.2:9000",
        "checkpoint_interval_ms": 500,
        "channels": 2,
        "checkpoints": 42,
        "last_reason": "divergence",
        "reasons": {"initial": 1, "interval": 30, "request": 1, "divergence": 10},
        "pause_ms": {"last": 12.5, "mean": 10.25, "p99": 25.0, "max": 31.0},
        "last_checkpoint": {
            "seq": 42,
            "bytes": 3_276_800u64,
            "pages": 800,
            "phases_ms": {"pause": 0.5, "dirty_log": 1.5, "send": 8.0, "ack": 2.5}
        },
        "mean_bytes": 4_404_019u64,
        "mean_pages": 1075,
        "phases_mean_ms": {"pause": 0.4, "dirty_log": 1.2, "send": 6.8, "ack": 1.85},
        "exit": null,
        "heartbeat": {"interval_ms": 100, "timeout_ms": 1000, "last_seen_ms_ago": 20.0},
        "protected_ms": 61_250u64,
        "proxy": {
            "nic": "tap0",
            "primary": {
                "compare": {"primary_packets": 5120, "secondary_packets": 5118,
                            "compared_bytes": 1_048_576u64, "released": 5119, "flushed": 12,
                            "mismatches": 10, "timeouts": 0, "overflows": 0},
                "mirrored": 4800, "pvm_epoch": 42, "svm_epoch": 42, "checkpoint_done": 42
            },
            "last_divergence": "mismatch: tcp 10.0.0.9:40000 <-> 10.0.0.5:80: payload differs",
            "link": {"frames_sent": 4842, "frames_received": 5160, "outbox_dropped": 0,
                     "backlog": 0, "inject_dropped": 0, "broken": null}
        },
        "disks": {
            "disks": [{"disk": 0, "name": "root", "size": 1_073_741_824u64, "synced": true,
                "sync": {"bytes_total": 3_145_728u64, "bytes_sent": 3_145_728u64,
                         "regions": 1024, "regions_total": 3, "regions_sent": 3},
                "mirror": {"replicated": 812, "bytes": 415_744u64, "unreplicated": 0,
                           "detached": false}}],
            "writes": 815, "acked": 815,
            "link": {"frames_sent": 816, "frames_received": 816, "outbox_dropped": 0,
                     "backlog": 0, "inject_dropped": 0, "broken": null}
        }
    })
}
