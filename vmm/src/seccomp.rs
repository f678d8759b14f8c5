//! seccomp filters, one per kind of thread, each allowed syscall with the reason it is needed.
//!
//! Filters stack: the VMM's (main) thread installs the broad `vmm` list first, so every thread
//! inherits it; each vCPU, device and API thread then adds its own narrower list at its start.
//! vCPU threads never create threads (device activation runs on the control loop), which keeps
//! their list short. A forbidden syscall raises SIGSYS; the handler names the thread and the
//! syscall on stderr and exits with status 31.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What `--seccomp` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Forbidden syscalls kill the VMM (with a message).
    Enforce,
    /// Forbidden syscalls are allowed and logged by the kernel (audit).
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "false" => Ok(SeccompMode::Off),
            _ => Err(format!("expected true, false or log, not '{s}'")),
        }
    }
}

/// The kinds of thread that get their own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: control loop, VM creation, device activation; inherited by all.
    Vmm,
    /// The HTTP API server.
    Api,
    /// A vCPU.
    Vcpu,
    /// A virtio-blk worker.
    Block,
    /// A virtio-net worker.
    Net,
}

impl ThreadKind {
    /// The device kind names the devices crate passes to its worker-init hook.
    pub fn from_device(kind: &str) -> Option<ThreadKind> {
        match kind {
            "virtio-blk" => Some(ThreadKind::Block),
            "virtio-net" => Some(ThreadKind::Net),
            _ => None,
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules.
    #[error("building the {kind:?} seccomp filter: {source}")]
    Build {
        /// Which filter.
        kind: ThreadKind,
        /// Why.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("installing the {kind:?} seccomp filter: {source}")]
    Install {
        /// Which filter.
        kind: ThreadKind,
        /// Why.
        source: seccompiler::Error,
    },
}

type Allow = &'static [(i64, &'static str)];

/// Every Rust thread: allocator, logging, thread exit, timers, abort.
const COMMON: Allow = &[
    (libc::SYS_read, "eventfds, files, sockets"),
    (libc::SYS_write, "eventfds, logging, console output"),
    (libc::SYS_futex, "mutexes, condvars, channels"),
    (libc::SYS_mmap, "allocator"),
    (libc::SYS_munmap, "allocator, thread stacks"),
    (libc::SYS_mremap, "allocator (realloc)"),
    (libc::SYS_madvise, "allocator (free), thread exit"),
    (libc::SYS_mprotect, "allocator arenas grow"),
    (libc::SYS_brk, "allocator"),
    (libc::SYS_rt_sigreturn, "return from the vCPU kick handler"),
    (libc::SYS_rt_sigprocmask, "thread start/exit, abort"),
    (libc::SYS_sigaltstack, "thread start/exit"),
    (libc::SYS_exit, "thread exit"),
    (libc::SYS_exit_group, "process exit"),
    (libc::SYS_sched_yield, "spin-wait back-off"),
    (
        libc::SYS_clock_gettime,
        "timestamps when the vDSO is unavailable",
    ),
    (libc::SYS_clock_nanosleep, "thread::sleep"),
    (libc::SYS_nanosleep, "thread::sleep"),
    (libc::SYS_getrandom, "HashMap seeds"),
    (libc::SYS_getpid, "abort"),
    (libc::SYS_gettid, "abort"),
    (libc::SYS_tgkill, "abort; vCPU kicks"),
    (libc::SYS_close, "dropping descriptors"),
];

const VCPU: Allow = &[
    (
        libc::SYS_ioctl,
        "KVM_RUN and register reads for crash reports",
    ),
    (libc::SYS_writev, "console output"),
    (libc::SYS_sendto, "console output to a socket client"),
];

const BLOCK: Allow = &[
    (libc::SYS_epoll_wait, "waiting for queue notifications"),
    (libc::SYS_epoll_pwait, "waiting for queue notifications"),
    (libc::SYS_epoll_ctl, "registering the worker's eventfds"),
    (libc::SYS_epoll_create1, "the worker's epoll"),
    (libc::SYS_pread64, "disk reads"),
    (libc::SYS_pwrite64, "disk writes"),
    (libc::SYS_preadv, "disk reads into guest buffers"),
    (libc::SYS_pwritev, "disk writes from guest buffers"),
    (libc::SYS_preadv2, "disk reads into guest buffers"),
    (libc::SYS_pwritev2, "disk writes from guest buffers"),
    (libc::SYS_fdatasync, "FLUSH requests"),
    (libc::SYS_fsync, "FLUSH requests"),
    (libc::SYS_fallocate, "DISCARD and WRITE_ZEROES"),
    (libc::SYS_lseek, "disk size"),
    (
        libc::SYS_sendto,
        "COLO: a primary's disk writes to the secondary (from the write slot's hook)",
    ),
];

const NET: Allow = &[
    (libc::SYS_epoll_wait, "waiting for the tap and the queues"),
    (libc::SYS_epoll_pwait, "waiting for the tap and the queues"),
    (libc::SYS_epoll_ctl, "tap write-readiness on and off"),
    (libc::SYS_epoll_create1, "the worker's epoll"),
    (libc::SYS_readv, "frames from the tap"),
    (libc::SYS_writev, "frames to the tap"),
    (libc::SYS_ioctl, "tap offload settings (TUNSETOFFLOAD)"),
];

const API: Allow = &[
    (libc::SYS_accept4, "API connections"),
    (libc::SYS_accept, "API connections"),
    (libc::SYS_recvfrom, "requests"),
    (libc::SYS_sendto, "replies"),
    (libc::SYS_writev, "replies"),
    (libc::SYS_poll, "connection timeouts"),
    (libc::SYS_ppoll, "connection timeouts"),
    (libc::SYS_epoll_wait, "waiting for connections"),
    (libc::SYS_epoll_pwait, "waiting for connections"),
    (libc::SYS_epoll_ctl, "waiting for connections"),
    (libc::SYS_epoll_create1, "waiting for connections"),
    (libc::SYS_setsockopt, "per-connection timeouts"),
    (libc::SYS_getsockopt, "socket errors"),
    (libc::SYS_fcntl, "non-blocking sockets"),
    (libc::SYS_shutdown, "closing connections"),
    (libc::SYS_ioctl, "FIONBIO on sockets"),
    (libc::SYS_clone3, "connection threads"),
    (libc::SYS_clone, "connection threads"),
    (libc::SYS_set_robust_list, "new threads"),
    (libc::SYS_rseq, "new threads"),
    (libc::SYS_prctl, "thread names"),
    (libc::SYS_sched_getaffinity, "thread pools"),
    (libc::SYS_statx, "socket path checks"),
    (libc::SYS_newfstatat, "socket path checks"),
];

const VMM: Allow = &[
    (libc::SYS_ioctl, "KVM, tap and terminal control"),
    (
        libc::SYS_openat,
        "/dev/kvm, /dev/net/tun, images, kernels, log and serial files",
    ),
    (libc::SYS_open, "files"),
    (libc::SYS_statx, "file sizes"),
    (libc::SYS_newfstatat, "file sizes"),
    (libc::SYS_fstat, "file sizes"),
    (libc::SYS_lseek, "kernel loading"),
    (libc::SYS_pread64, "kernel loading"),
    (libc::SYS_pwrite64, "disk writes"),
    (libc::SYS_readv, "tap reads"),
    (libc::SYS_writev, "tap writes, console output"),
    (libc::SYS_preadv, "disk reads"),
    (libc::SYS_pwritev, "disk writes"),
    (libc::SYS_preadv2, "disk reads"),
    (libc::SYS_pwritev2, "disk writes"),
    (libc::SYS_fdatasync, "disk flushes"),
    (libc::SYS_fsync, "disk flushes"),
    (libc::SYS_fallocate, "disk discards"),
    (libc::SYS_eventfd2, "queue, interrupt and exit eventfds"),
    (libc::SYS_epoll_create1, "device workers' epolls"),
    (libc::SYS_epoll_ctl, "device workers' epolls"),
    (libc::SYS_epoll_wait, "device workers"),
    (libc::SYS_epoll_pwait, "device workers"),
    (libc::SYS_poll, "control loop"),
    (libc::SYS_ppoll, "control loop"),
    (libc::SYS_clone3, "vCPU, device, API and console threads"),
    (libc::SYS_clone, "threads"),
    (libc::SYS_set_robust_list, "new threads"),
    (libc::SYS_rseq, "new threads"),
    (libc::SYS_prctl, "thread names, no_new_privs before seccomp"),
    (libc::SYS_seccomp, "each thread installs its own filter"),
    (libc::SYS_sched_getaffinity, "thread pools"),
    (libc::SYS_rt_sigaction, "the vCPU kick handler"),
    (
        libc::SYS_socket,
        "tap address configuration; API and console sockets",
    ),
    (libc::SYS_bind, "API, console and migration sockets"),
    (libc::SYS_connect, "migration to another colovmm"),
    (libc::SYS_getsockname, "migration listener address"),
    (libc::SYS_listen, "API and console sockets"),
    (libc::SYS_accept4, "API and console connections"),
    (libc::SYS_accept, "console connections"),
    (libc::SYS_recvfrom, "API and console input"),
    (libc::SYS_sendto, "API replies, console output"),
    (libc::SYS_setsockopt, "socket timeouts"),
    (libc::SYS_getsockopt, "socket errors"),
    (libc::SYS_shutdown, "closing connections"),
    (libc::SYS_fcntl, "non-blocking descriptors, dup"),
    (libc::SYS_dup, "duplicated file handles (serial output)"),
    (libc::SYS_unlink, "replacing stale socket files"),
    (libc::SYS_unlinkat, "replacing stale socket files"),
    (libc::SYS_chmod, "API socket mode 0600"),
    (libc::SYS_fchmod, "API socket mode 0600"),
    (libc::SYS_fchmodat, "API socket mode 0600"),
    (libc::SYS_getcwd, "relative paths"),
    (libc::SYS_mkdir, "snapshot directories"),
    (libc::SYS_mkdirat, "snapshot directories"),
    (libc::SYS_rename, "snapshot state written atomically"),
    (libc::SYS_renameat, "snapshot state written atomically"),
    (libc::SYS_renameat2, "snapshot state written atomically"),
    (libc::SYS_ftruncate, "snapshot files"),
    (libc::SYS_access, "paths"),
    (libc::SYS_faccessat, "paths"),
    (libc::SYS_faccessat2, "paths"),
    (libc::SYS_readlink, "paths"),
    (libc::SYS_uname, "std feature detection"),
];

fn allowed(kind: ThreadKind) -> Vec<(i64, &'static str)> {
    let own = match kind {
        ThreadKind::Vmm => VMM,
        ThreadKind::Api => API,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Block => BLOCK,
        ThreadKind::Net => NET,
    };
    COMMON.iter().chain(own).copied().collect()
}

/// Whether `kind`'s threads never open files. A library call that tries anyway gets EACCES
/// from a second filter instead of killing the VMM: glibc's malloc reads
/// /proc/sys/vm/overcommit_memory the first time a thread's arena shrinks (a net worker
/// copying frames for COLO's proxy does that) and /sys/devices/system/cpu/online when it first
/// needs another arena, and copes with either failing.
fn refuses_opens(kind: ThreadKind) -> bool {
    matches!(kind, ThreadKind::Vcpu | ThreadKind::Block | ThreadKind::Net)
}

const OPENS: [i64; 2] = [libc::SYS_open, libc::SYS_openat];

/// The filter answering EACCES to every open (see [`refuses_opens`]).
fn open_refusal(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        OPENS.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { kind, source })
}

/// The compiled filter for `kind`, or None when seccomp is off.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|(nr, _why)| (nr, Vec::new()))
        .collect();
    if refuses_opens(kind) && mode == SeccompMode::Enforce {
        // Passed here, refused by `open_refusal` (installed first): ERRNO outranks ALLOW.
        for nr in OPENS {
            rules.insert(nr, Vec::new());
        }
    }
    // Every thread may ask whether a descriptor is open — std's debug builds do before closing
    // one (`OwnedFd::drop`), e.g. a net worker dropping the eventfds it was started with — and
    // read its own name, which the SIGSYS handler reports.
    for (nr, arg, value) in [
        (libc::SYS_fcntl, 1, libc::F_GETFD as u64),
        (libc::SYS_prctl, 0, libc::PR_GET_NAME as u64),
    ] {
        if let std::collections::btree_map::Entry::Vacant(e) = rules.entry(nr) {
            let only = seccompiler::SeccompCondition::new(
                arg,
                seccompiler::SeccompCmpArgLen::Dword,
                seccompiler::SeccompCmpOp::Eq,
                value,
            )
            .and_then(|c| seccompiler::SeccompRule::new(vec![c]))
            .map_err(|source| SeccompError::Build { kind, source })?;
            e.insert(vec![only]);
        }
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build { kind, source })?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(|source| SeccompError::Build { kind, source })
}

/// Installs `kind`'s filter on the calling thread.
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if let Some(bpf) = filter(kind, mode)? {
        install_sigsys_handler();
        if refuses_opens(kind) && mode == SeccompMode::Enforce {
            // First: once the main filter is on, seccomp(2) itself is not allowed.
            seccompiler::apply_filter(&open_refusal(kind)?)
                .map_err(|source| SeccompError::Install { kind, source })?;
        }
        seccompiler::apply_filter(&bpf).map_err(|source| SeccompError::Install { kind, source })?;
    }
    Ok(())
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe calls here: format by hand, write(2), _exit(2).
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall sits after the common
    // header (signo, errno, code) and the call address.
    let nr = unsafe {
        let base = info as *const u8;
        *(base.add(16 + 8) as *const libc::c_int)
    };
    let mut buf = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(b"colovmm: seccomp: thread '");
    let mut name = [0u8; 16];
    // SAFETY: prctl(PR_GET_NAME) writes at most 16 bytes into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    put(&name[..name.iter().position(|b| *b == 0).unwrap_or(16)]);
    put(b"' made forbidden syscall ");
    let mut digits = [0u8; 12];
    let (mut n, mut i) = (nr.unsigned_abs(), digits.len());
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b"\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; buf holds `len` initialised bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(31);
    }
}

fn install_sigsys_handler() {
    if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys) {
        log::warn!("cannot install the SIGSYS handler: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_lists_reasons() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::Block,
            ThreadKind::Net,
        ] {
            assert!(filter(kind, SeccompMode::Enforce).unwrap().is_some());
            assert!(allowed(kind).iter().all(|(_, why)| !why.is_empty()));
        }
        assert!(filter(ThreadKind::Vcpu, SeccompMode::Off)
            .unwrap()
            .is_none());
    }

    #[test]
    fn vcpu_threads_cannot_open_files_or_create_threads() {
        let vcpu: Vec<i64> = allowed(ThreadKind::Vcpu).iter().map(|(n, _)| *n).collect();
        for nr in [
            libc::SYS_openat,
            libc::SYS_clone3,
            libc::SYS_socket,
            libc::SYS_execve,
        ] {
            assert!(!vcpu.contains(&nr), "vCPU list allows {nr}");
        }
    }

    /// Run in a child process: a net worker that opens a file (as glibc's malloc does) gets
    /// EACCES and lives on.
    #[test]
    fn a_device_thread_that_opens_a_file_is_refused_not_killed() {
        if std::env::var("COLOVMM_SECCOMP_CHILD_OPEN").is_ok() {
            let t = std::thread::Builder::new()
                .name("net-open".into())
                .spawn(|| {
                    apply(ThreadKind::Net, SeccompMode::Enforce).unwrap();
                    std::fs::File::open("/proc/sys/vm/overcommit_memory")
                        .map(|_| "opened".to_string())
                        .unwrap_or_else(|e| format!("{:?}", e.raw_os_error()))
                })
                .unwrap();
            let got = t.join().unwrap();
            eprintln!("open -> {got}");
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::a_device_thread_that_opens_a_file_is_refused_not_killed",
                "--nocapture",
            ])
            .env("COLOVMM_SECCOMP_CHILD_OPEN", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(
            err.contains(&format!("open -> Some({})", libc::EACCES)),
            "{err}"
        );
    }

    /// Run in a child process (the filter would otherwise stay on the test harness's thread):
    /// an API thread calling socket(2), which its list does not allow, is stopped there.
    #[test]
    fn api_thread_is_refused_a_syscall_outside_its_list() {
        if std::env::var("COLOVMM_SECCOMP_CHILD").is_ok() {
            let t = std::thread::Builder::new()
                .name("api-test".into())
                .spawn(|| {
                    apply(ThreadKind::Api, SeccompMode::Enforce).unwrap();
                    // SAFETY: plain syscall; the filter must stop it before it does anything.
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                })
                .unwrap();
            let _ = t.join();
            std::process::exit(0); // reached only if socket(2) was allowed
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::api_thread_is_refused_a_syscall_outside_its_list",
                "--nocapture",
            ])
            .env("COLOVMM_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(31), "{err}");
        assert!(
            err.contains(&format!(
                "thread 'api-test' made forbidden syscall {}",
                libc::SYS_socket
            )),
            "{err}"
        );
    }

    /// A net worker may ask whether a descriptor is open (std's debug builds do before every
    /// close) but not change a descriptor's flags.
    #[test]
    fn fcntl_is_allowed_only_to_ask_whether_a_descriptor_is_open() {
        if std::env::var("COLOVMM_SECCOMP_CHILD_FCNTL").is_ok() {
            let t = std::thread::Builder::new()
                .name("net-test".into())
                .spawn(|| {
                    apply(ThreadKind::Net, SeccompMode::Enforce).unwrap();
                    // SAFETY: plain syscalls on stdin's descriptor, which stays open.
                    let flags = unsafe { libc::fcntl(0, libc::F_GETFD) };
                    eprintln!("F_GETFD -> {flags}");
                    // SAFETY: as above; the filter must stop it.
                    unsafe { libc::fcntl(0, libc::F_SETFL, libc::O_NONBLOCK) };
                })
                .unwrap();
            let _ = t.join();
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::fcntl_is_allowed_only_to_ask_whether_a_descriptor_is_open",
                "--nocapture",
            ])
            .env("COLOVMM_SECCOMP_CHILD_FCNTL", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("F_GETFD -> "), "{err}");
        assert!(!err.contains("F_GETFD -> -1"), "{err}");
        assert_eq!(out.status.code(), Some(31), "{err}");
        assert!(
            err.contains(&format!(
                "thread 'net-test' made forbidden syscall {}",
                libc::SYS_fcntl
            )),
            "{err}"
        );
    }
}
