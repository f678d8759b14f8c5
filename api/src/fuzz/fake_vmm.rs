//! A stand-in for the VMM's control loop: a thread that answers each [`ApiRequest`] with
//! fixed data, so the server can be tested without a VM.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::{
    ApiError, ApiReceiver, ApiRequest, ApiResponse, DeviceInfo, VmConfig, VmInfo, VmState,
    VmmPingResponse,
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
    /// Serves `rx` with [`fixed_answer`].
    pub fn start(rx: ApiReceiver) -> Self {
        Self::with_answer(rx, Box::new(fixed_answer))
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

/// The fixed answers: ping and info and counters get sample data, `VmCreate` of a kernel
/// named `/conflict` gets 409, everything else succeeds with no content.
pub fn fixed_answer(req: &ApiRequest) -> ApiResponse {
    let to_json = |v: Result<serde_json::Value, serde_json::Error>| {
        v.map_err(|e| ApiError::new(500, format!("fake VMM: {e}")))
    };
    match req {
        ApiRequest::VmmPing => to_json(serde_json::to_value(VmmPingResponse {
            version: "0.1.0-fake".into(),
            pid: std::process::id(),
        })),
        ApiRequest::VmInfo => to_json(serde_json::to_value(sample_vm_info()?)),
        ApiRequest::VmCounters => Ok(sample_counters()),
        ApiRequest::VmCreate(c) if c.payload.kernel.as_os_str() == "/conflict" => Err(ApiError {
            status: 409,
            error: "a VM already exists".into(),
            causes: vec!["created earlier".into()],
        }),
        _ => Ok(serde_json::Value::Null),
    }
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
