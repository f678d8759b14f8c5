//! What the integration tests share: finding the binaries and images, and driving a running
//! colovmm (or QEMU) through its serial console.

pub mod colo;
pub mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The colovmm binary built in the same profile as this test (`target/<profile>/colovmm`),
/// or `$COLOVMM_BIN`.
pub fn colovmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("COLOVMM_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test> -> target/<profile>/colovmm
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("colovmm"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} is missing: build it first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// `colovmm-remote`, next to colovmm.
pub fn remote_bin() -> PathBuf {
    let bin = colovmm_bin().with_file_name("colovmm-remote");
    assert!(bin.exists(), "{} is missing: build it first", bin.display());
    bin
}

/// The test guest kernel built by scripts/build-guest.sh.
pub fn testguest() -> PathBuf {
    let p = repo_root().join("target/guest/testguest");
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-guest.sh",
        p.display()
    );
    p
}

/// A Debian kernel image from scripts/fetch-linux.sh (`vmlinux` or `bzImage`).
pub fn linux_image(name: &str) -> PathBuf {
    let p = repo_root().join("target/linux").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-linux.sh",
        p.display()
    );
    p
}

/// True when the host CPU has VMX or SVM (then stock kernels boot to userspace).
pub fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// A running VMM whose console is our stdin/stdout pipes; killed when dropped.
pub struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line seen so far, for failure messages.
    pub transcript: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Console {
    /// Starts `cmd` with piped stdio.
    pub fn spawn(mut cmd: Command) -> Console {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn VMM");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = err_text.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            if let Ok(mut e) = sink.lock() {
                e.push_str(&s);
            }
        });
        Console {
            stdin: child.stdin.take(),
            child,
            lines,
            transcript: Vec::new(),
            stderr: err_text,
        }
    }

    /// Starts colovmm with these arguments.
    pub fn colovmm(args: &[&str]) -> Console {
        let mut cmd = Command::new(colovmm_bin());
        cmd.args(args);
        Console::spawn(cmd)
    }

    /// Starts colovmm on the test guest with `cpus` vCPUs and `mem` of RAM.
    pub fn testguest(cpus: u8, mem: &str, cmdline: &str) -> Console {
        let kernel = testguest();
        Console::colovmm(&[
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--cpus",
            &format!("boot={cpus}"),
            "--memory",
            &format!("size={mem}"),
            "--cmdline",
            cmdline,
        ])
    }

    /// Waits for a line containing `needle`; returns it. Panics with the transcript on timeout.
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        match self.wait_line(|l| l.contains(needle), timeout) {
            Some(l) => l,
            None => panic!(
                "no line containing {needle:?} within {timeout:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                self.transcript.join("\n"),
                self.stderr()
            ),
        }
    }

    /// Waits for a line matching `pred`, or None at the deadline or when the VMM exits.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.transcript.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Sends one console command line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("write to console");
    }

    /// Sends `cmd` and returns the first answer line starting with `prefix`.
    pub fn ask(&mut self, cmd: &str, prefix: &str) -> String {
        self.send(cmd);
        self.expect_line(prefix, Duration::from_secs(10))
    }

    /// Waits for the process to exit; None on timeout (it is then killed on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// What the VMM wrote to stderr so far (complete once it has exited).
    pub fn stderr(&self) -> String {
        // Give the reader thread a moment to collect the tail after an exit.
        std::thread::sleep(Duration::from_millis(50));
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh, empty directory named after `tag` and this process.
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("colovmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }

    /// A zero-filled file of `bytes` in it.
    pub fn image(&self, name: &str, bytes: usize) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, vec![0u8; bytes]).expect("write image");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `colovmm-remote --api-socket SOCK args...`: (exit code, stdout, stderr).
pub fn remote(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(remote_bin())
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run colovmm-remote");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`remote`], and the command must succeed; returns its stdout.
pub fn remote_ok(sock: &Path, args: &[&str]) -> String {
    let (code, out, err) = remote(sock, args);
    assert_eq!(code, 0, "colovmm-remote {args:?}: {err}");
    out
}

/// Waits up to 10 s for `path` to exist (an API socket, say).
pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number in a `count=<k>` line.
pub fn count_of(line: &str) -> u64 {
    line.trim_start_matches("count=")
        .parse()
        .unwrap_or_else(|_| panic!("not a count line: {line:?}"))
}

// The guest's disk record (guest/README.md "Disk record log"), rebuilt here independently.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`, as the guest's `disk hash` computes it over a device.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The 512-byte record `disk write <seq>` puts at log position `index` (sector 1 + index).
pub fn disk_record(seq: u64, index: u64) -> Vec<u8> {
    let mut r = vec![0u8; 512];
    r[0..8].copy_from_slice(b"CLVMREC1");
    r[8..16].copy_from_slice(&seq.to_le_bytes());
    r[16..24].copy_from_slice(&index.to_le_bytes());
    for k in 0..60u64 {
        let w = seq.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ k.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let at = 24 + 8 * k as usize;
        r[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    let sum = fnv1a(&r[..504]);
    r[504..].copy_from_slice(&sum.to_le_bytes());
    r
}
