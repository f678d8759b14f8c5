//! A vCPU thread: KVM_RUN in a loop, routing port and MMIO exits to the buses and turning the
//! exits that end a VM into exit requests.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::{ExitRequest, VmExitEvent};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler; idempotent. Without a handler the signal would kill us.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Exits to the VMM, counted because each one costs ~30 µs under some hypervisors (kvm_pvm):
/// benchmarks report them per request.
#[derive(Default, Debug)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
}

/// What a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where guest-initiated exits are reported.
    pub exit: Arc<VmExitEvent>,
    /// Whether vCPUs run, park or leave.
    pub control: Arc<VcpuControl>,
    /// Exit counts for all vCPUs.
    pub exits: Arc<ExitCounters>,
    /// seccomp for vCPU threads.
    pub seccomp: SeccompMode,
}

/// A vCPU's KVM handle. Its thread holds the lock while it runs guest code and releases it
/// when parked, so the VMM can read and write the vCPU's state while the VM is paused.
pub type SharedVcpuFd = Arc<Mutex<VcpuFd>>;

/// One vCPU and its run loop.
pub struct Vcpu {
    id: u8,
    fd: SharedVcpuFd,
    ctx: VcpuContext,
}

impl Vcpu {
    /// A vCPU ready to run.
    pub fn new(id: u8, fd: SharedVcpuFd, ctx: VcpuContext) -> Self {
        Self { id, fd, ctx }
    }

    /// Starts the run loop on its own thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run())
    }

    fn run(self) {
        if let Err(e) = seccomp::apply(ThreadKind::Vcpu, self.ctx.seccomp) {
            self.ctx
                .exit
                .request(ExitRequest::Crash(format!("vCPU {}: {e}", self.id)));
            return;
        }
        loop {
            match self.ctx.control.state() {
                RunState::Running => {}
                RunState::Paused => {
                    self.ctx.control.park();
                    continue;
                }
                RunState::Stopping => return,
            }
            let mut fd = match self.fd.lock() {
                Ok(fd) => fd,
                Err(p) => p.into_inner(),
            };
            // Keep the lock across exits while running; a kick ends the inner loop.
            let mut stop = None;
            let mut io_pending = false;
            while self.ctx.control.state() == RunState::Running {
                match self.run_once(&mut fd) {
                    Step::Stop(req) => {
                        stop = Some(req);
                        break;
                    }
                    step => io_pending = step == Step::Io,
                }
            }
            // Left after a kick (the usual pause), nothing is pending: no extra KVM_RUN.
            if stop.is_none() && io_pending {
                stop = self.settle(&mut fd);
            }
            if let Some(req) = stop {
                drop(fd);
                self.ctx.exit.request(req);
                // Stay parked until the VMM decides what happens next (it will stop us).
                self.ctx.control.park_until_stopped();
                return;
            }
        }
    }

    /// Finishes the last port or MMIO access before the thread parks. KVM completes such an
    /// access (the value read into its register, RIP past the instruction) only when KVM_RUN
    /// is entered again, and that pending work is invisible to KVM_GET_REGS: a snapshot or a
    /// COLO checkpoint taken meanwhile would hold a half-executed instruction, and a state
    /// *loaded* meanwhile (the COLO secondary) would have KVM finish the old instruction on
    /// top of the new registers — RIP back in old code, in the new privilege level. KVM_RUN
    /// with `immediate_exit` set completes it and returns EINTR before any guest instruction.
    fn settle(&self, fd: &mut VcpuFd) -> Option<ExitRequest> {
        // An access may complete into another exit (a string instruction's next element).
        for _ in 0..16 {
            fd.set_kvm_immediate_exit(1);
            match self.run_once(fd) {
                // run_once cleared the flag.
                Step::Kicked => return None,
                Step::Io => {}
                // Another exit: the access itself has completed; the run loop takes what
                // follows once the VM runs again.
                Step::Other => break,
                Step::Stop(req) => {
                    fd.set_kvm_immediate_exit(0);
                    return Some(req);
                }
            }
        }
        fd.set_kvm_immediate_exit(0);
        None
    }

    /// One KVM_RUN and what came of it.
    fn run_once(&self, fd: &mut VcpuFd) -> Step {
        let ctx = &self.ctx;
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.exits.pio.fetch_add(1, Ordering::Relaxed);
                if !ctx.pio.read(port.into(), data) {
                    data.fill(0xff);
                }
                Step::Io
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.exits.pio.fetch_add(1, Ordering::Relaxed);
                ctx.pio.write(port.into(), data);
                Step::Io
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.exits.mmio.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
                Step::Io
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.exits.mmio.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.write(addr, data);
                Step::Io
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => Step::Other,
            Ok(VcpuExit::Shutdown) => {
                Step::Stop(self.crash(fd, "triple fault (KVM_EXIT_SHUTDOWN)"))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Step::Stop(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitRequest::PowerOff,
                KVM_SYSTEM_EVENT_RESET => ExitRequest::Reset,
                KVM_SYSTEM_EVENT_CRASH => self.crash(fd, "guest reported a crash"),
                other => self.crash(fd, &format!("unknown system event {other}")),
            }),
            Ok(VcpuExit::InternalError) => {
                Step::Stop(self.crash(fd, "KVM internal error (instruction emulation failed)"))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Stop(self.crash(
                fd,
                &format!("VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"),
            )),
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                Step::Stop(self.crash(fd, &what))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear KVM's immediate-exit flag and look at the run state again.
                fd.set_kvm_immediate_exit(0);
                Step::Kicked
            }
            Err(e) => Step::Stop(self.crash(fd, &format!("KVM_RUN failed: {e}"))),
        }
    }

    /// A crash request carrying the vCPU's registers, so the user sees where it died.
    fn crash(&self, fd: &VcpuFd, what: &str) -> ExitRequest {
        let mut msg = format!("vCPU {}: {what}", self.id);
        match (fd.get_regs(), fd.get_sregs()) {
            (Ok(r), Ok(s)) => msg.push_str(&format!(
                "\n  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  cs={:#06x} ss={:#06x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
                s.cs.selector, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            )),
            (Err(e), _) | (_, Err(e)) => msg.push_str(&format!(" (registers unavailable: {e})")),
        }
        ExitRequest::Crash(msg)
    }
}

/// What one KVM_RUN came to.
#[derive(Debug, PartialEq)]
enum Step {
    /// A port or MMIO access, served; KVM completes it on the next KVM_RUN.
    Io,
    /// Kicked out (EINTR): the run state may have changed.
    Kicked,
    /// Another exit that needs nothing (HLT, interrupt window).
    Other,
    /// The VM must stop.
    Stop(ExitRequest),
}

/// What vCPU threads should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Running guest code.
    Running,
    /// Parked outside KVM_RUN (vm.pause).
    Paused,
    /// Leaving their loop for good.
    Stopping,
}

/// Run, park and stop for a VM's vCPU threads.
///
/// The state is read on every exit (one atomic load); parking uses a condvar. A kick is a
/// signal that makes KVM_RUN return EINTR; one can land just before a thread enters KVM_RUN
/// and be lost, so kicks are repeated until every thread has acknowledged.
pub struct VcpuControl {
    state: AtomicU8,
    parked: AtomicUsize,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(RunState::Running as u8),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cond: Condvar::new(),
        }
    }
}

impl VcpuControl {
    /// The current state.
    pub fn state(&self) -> RunState {
        match self.state.load(Ordering::Acquire) {
            0 => RunState::Running,
            1 => RunState::Paused,
            _ => RunState::Stopping,
        }
    }

    fn set(&self, state: RunState) {
        let _guard = self.lock.lock();
        self.state.store(state as u8, Ordering::Release);
        self.cond.notify_all();
    }

    /// Called by a vCPU thread: waits while the state is Paused.
    fn park(&self) {
        self.parked.fetch_add(1, Ordering::AcqRel);
        let mut guard = match self.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        while self.state() == RunState::Paused {
            guard = match self.cond.wait(guard) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        drop(guard);
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }

    /// Called by a vCPU thread whose guest asked to stop: waits for Stopping.
    fn park_until_stopped(&self) {
        self.parked.fetch_add(1, Ordering::AcqRel);
        let mut guard = match self.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        while self.state() != RunState::Stopping {
            guard = match self.cond.wait(guard) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// Parks every thread in `threads`; true once all of them are parked (5 s at most).
    pub fn pause(&self, threads: &[JoinHandle<()>]) -> bool {
        self.set(RunState::Paused);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.parked.load(Ordering::Acquire)
            < threads.iter().filter(|t| !t.is_finished()).count()
        {
            if Instant::now() > deadline {
                return false;
            }
            kick(threads);
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Lets parked threads run again.
    pub fn resume(&self) {
        self.set(RunState::Running);
    }

    /// Stops and joins every thread.
    pub fn stop(&self, threads: Vec<JoinHandle<()>>) {
        self.set(RunState::Stopping);
        let deadline = Instant::now() + Duration::from_secs(5);
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                kick(std::slice::from_ref(&t));
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("a vCPU thread did not stop within 5 s");
            }
        }
    }
}

fn kick(threads: &[JoinHandle<()>]) {
    for t in threads.iter().filter(|t| !t.is_finished()) {
        if let Err(e) = t.kill(kick_signal()) {
            log::debug!("kick failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let spins = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (c, n) = (control.clone(), spins.clone());
                std::thread::spawn(move || loop {
                    match c.state() {
                        RunState::Running => {
                            n.fetch_add(1, Ordering::Relaxed);
                            std::thread::yield_now();
                        }
                        RunState::Paused => c.park(),
                        RunState::Stopping => return,
                    }
                })
            })
            .collect();
        assert!(control.pause(&threads));
        let frozen = spins.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            spins.load(Ordering::Relaxed),
            frozen,
            "paused threads do not run"
        );
        control.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert!(spins.load(Ordering::Relaxed) > frozen);
        control.stop(threads);
    }
}
