//! COLO's network proxy end to end on the test guest: a primary and a secondary colovmm, each
//! with a NIC on the `tap0` of its own host namespace of a [`TwoHostNet`], and real client
//! tools (redis-benchmark, redis-cli, curl, a Python script) talking to the guest from the
//! client namespace, as a user's clients would:
//!
//! - deterministic services (redis, HTTP downloads) run through the compare with correct
//!   answers and hardly any divergence checkpoints;
//! - a deliberately nondeterministic reply (`GET /uptime`, the guest's TSC) makes the compare
//!   find a mismatch and ask for a checkpoint, while the client only ever sees the primary's
//!   answers;
//! - TCP connections the client holds open (a redis INCR loop on one connection, a long
//!   download) survive a `kill -9` of the primary (the SVM takes over the network) and of the
//!   secondary (the primary goes on unprotected): no reset, no lost or repeated INCR, not a
//!   byte of the download wrong.
//!
//! Each test takes the [`SERIAL`] lock: every case boots two VMMs on a small machine. Every
//! process (VMMs and clients) is SIGKILLed on drop, clients first, then the VMMs, then the
//! namespaces go, so a failing case leaves nothing behind.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration_tests::colo::{is, vmm_with, Events, PairFiles, Side};
use integration_tests::netns::{TwoHostNet, GUEST_IP, HOST_B_IP};
use integration_tests::{remote, wait_for, Console};
use serde_json::Value;

/// Held by every test for its whole run: one COLO pair on the machine at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next one still runs.
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The secondary's port (each pair has namespaces of its own, so it never clashes).
const PORT: u16 = 9400;
/// Boot to READY (the guest's ring-0 code is emulated on some machines: 10-30 s).
const BOOT: Duration = Duration::from_secs(90);
/// From READY to protected on both sides: connect, initial sync of a 256M guest.
const PROTECT: Duration = Duration::from_secs(90);
/// Until the client namespace reaches the guest through the proxy.
const REACH: Duration = Duration::from_secs(60);
/// Noticing a dead peer (immediate for kill -9; generous for a loaded machine).
const NOTICE: Duration = Duration::from_secs(30);
/// A client tool that should have finished long ago.
const CLIENT: Duration = Duration::from_secs(300);
/// `GET /bytes/` downloads: 64 MiB.
const BIG: u64 = 64 << 20;
/// Period of the `/bytes/` pattern: byte i is `i % 251`.
const PERIOD: u64 = 251;

// ---------------------------------------------------------------------------------------------
// Event files

// ---------------------------------------------------------------------------------------------
// Client processes

/// A process in the client namespace, SIGKILLed on drop; its stderr is collected.
struct Spawned {
    what: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Spawned {
    /// Starts `program args` in namespace `ns` with stdout piped (for the caller to read)
    /// and stderr collected.
    fn start(ns: &str, program: &str, args: &[&str]) -> Spawned {
        let mut cmd = TwoHostNet::cmd_in(ns, program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // `ip netns exec` execs the program, so the pid is the client's own.
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{program}: {e}"));
        let mut err = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Spawned {
            what: format!("{program} {}", args.join(" ")),
            child,
            stderr,
        }
    }

    fn stdout(&mut self) -> impl Read + Send + 'static {
        self.child.stdout.take().expect("stdout")
    }

    /// Whether it is still running.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for it to exit; None on timeout (it is then killed on drop).
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers collect the tail.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client printing progress lines on stdout (the INCR loop).
struct LineClient {
    proc: Spawned,
    lines: Arc<Mutex<Vec<String>>>,
}

impl LineClient {
    fn start(ns: &str, program: &str, args: &[&str]) -> LineClient {
        let mut proc = Spawned::start(ns, program, args);
        let out = proc.stdout();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut v) = sink.lock() {
                    v.push(line);
                }
            }
        });
        LineClient { proc, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// What it printed and complained about, for failure messages.
    fn report(&self) -> String {
        let lines = self.lines();
        let from = lines.len().saturating_sub(10);
        format!(
            "--- {} (last stdout lines) ---\n{}\n--- its stderr ---\n{}",
            self.proc.what,
            lines[from..].join("\n"),
            self.proc.stderr()
        )
    }
}

/// `curl` downloading `GET /bytes/<len>`, the body checked against the pattern as it arrives.
struct Download {
    proc: Spawned,
    len: u64,
    /// Bytes received so far.
    got: Arc<AtomicU64>,
    /// Offset of the first byte that is not `offset % 251`.
    first_bad: Arc<Mutex<Option<u64>>>,
    /// The body reader saw end of file.
    eof: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Download {
    /// Starts the download; `rate` is curl's `--limit-rate` (e.g. "2M").
    fn start(ns: &str, len: u64, rate: Option<&str>) -> Download {
        let url = format!("http://{GUEST_IP}/bytes/{len}");
        let mut args = vec!["-sS", "--max-time", "300"];
        if let Some(r) = rate {
            args.extend_from_slice(&["--limit-rate", r]);
        }
        args.push(&url);
        let mut proc = Spawned::start(ns, "curl", &args);
        let mut out = proc.stdout();
        let got = Arc::new(AtomicU64::new(0));
        let first_bad = Arc::new(Mutex::new(None));
        let eof = Arc::new(AtomicBool::new(false));
        let (g, fb, e) = (got.clone(), first_bad.clone(), eof.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let mut off = 0u64;
            loop {
                let n = match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut bad = fb.lock().unwrap_or_else(|p| p.into_inner());
                if bad.is_none() {
                    if let Some(i) = buf[..n]
                        .iter()
                        .enumerate()
                        .position(|(i, &b)| u64::from(b) != (off + i as u64) % PERIOD)
                    {
                        *bad = Some(off + i as u64);
                    }
                }
                drop(bad);
                off += n as u64;
                g.store(off, Ordering::Relaxed);
            }
            e.store(true, Ordering::Relaxed);
        });
        Download {
            proc,
            len,
            got,
            first_bad,
            eof,
            reader: Some(reader),
        }
    }

    fn got(&self) -> u64 {
        self.got.load(Ordering::Relaxed)
    }

    /// Waits for curl to exit and its body to be read; None if the body is complete and
    /// right, the complaint otherwise.
    /// Fails at once if a VMM of `pair` that should run dies meanwhile.
    fn finish(&mut self, timeout: Duration, pair: &mut Pair) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.proc.wait(Duration::from_secs(1)) {
                break status;
            }
            pair.check_alive("during the download");
            if Instant::now() > deadline {
                return Some(format!(
                    "the download did not finish within {timeout:?} ({} of {} bytes)",
                    self.got(),
                    self.len
                ));
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.eof.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let got = self.got();
        let bad = *self.first_bad.lock().unwrap_or_else(|p| p.into_inner());
        let mut problems = Vec::new();
        if !status.success() {
            problems.push(format!("curl failed ({status}): {}", self.proc.stderr()));
        }
        if got != self.len {
            problems.push(format!("got {got} bytes of {}", self.len));
        }
        if let Some(at) = bad {
            problems.push(format!("byte {at} is not {} (i % 251)", at % PERIOD));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

// ---------------------------------------------------------------------------------------------
// A primary and a secondary, each with a NIC

/// A COLO pair in its own [`TwoHostNet`]. Fields drop in order: both VMMs are SIGKILLed
/// before the namespaces and the scratch directory go.
struct Pair {
    primary: Option<Console>,
    secondary: Option<Console>,
    net: TwoHostNet,
    /// The side this test killed on purpose.
    killed: Option<Side>,
    files: PairFiles,
}

impl Pair {
    /// The namespaces, the secondary listening with its NIC on host B's tap, then the primary
    /// on the test guest with its NIC on host A's tap; returns once both are protected and
    /// the client reaches the guest.
    fn start(tag: &str, interval_ms: u64) -> Pair {
        let mut pair = Pair {
            primary: None,
            secondary: None,
            net: TwoHostNet::create(),
            killed: None,
            files: PairFiles::new(&format!("colonet-{tag}")),
        };
        let spec = format!("role=secondary,listen={HOST_B_IP}:{PORT}");
        pair.secondary = Some(vmm_with(
            &pair.net.b,
            &pair.files.secondary_args(&spec, &["--net", "tap=tap0"]),
        ));
        wait_for(&pair.files.ssock);
        if pair
            .files
            .sev
            .next(
                |e| is(e, "started") && e["properties"]["role"] == "secondary",
                Duration::from_secs(20),
            )
            .is_none()
        {
            pair.fail("the secondary never reported COLO started");
        }

        let spec =
            format!("role=primary,peer={HOST_B_IP}:{PORT},checkpoint-interval={interval_ms}");
        pair.primary = Some(vmm_with(
            &pair.net.a,
            &pair.files.primary_args(&spec, &["--net", "tap=tap0"]),
        ));
        if pair
            .p()
            .wait_line(|l| l.contains("TESTGUEST READY"), BOOT)
            .is_none()
        {
            pair.fail(&format!(
                "the primary's guest was not READY within {BOOT:?}"
            ));
        }
        wait_for(&pair.files.psock);
        // Protected, or protection ended before it began, or a VMM died (then say why at once).
        let deadline = Instant::now() + PROTECT;
        let mut protected = [false; 2];
        while protected != [true; 2] {
            for (i, side) in [Side::Primary, Side::Secondary].into_iter().enumerate() {
                if protected[i] {
                    continue;
                }
                let ev = pair
                    .events(side)
                    .next(|e| is(e, "protected") || is(e, "colo_exit"), Duration::ZERO);
                match ev {
                    Some(ev) if is(&ev, "protected") => protected[i] = true,
                    Some(ev) => pair.fail(&format!(
                        "the {} ended COLO before it was protected: {ev}",
                        side.role()
                    )),
                    None => {}
                }
            }
            pair.check_alive("before both sides were protected");
            if protected != [true; 2] && Instant::now() > deadline {
                pair.fail(&format!(
                    "not protected within {PROTECT:?} (primary {}, secondary {})",
                    protected[0], protected[1]
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pair.wait_reachable();
        pair
    }

    /// The primary's console.
    fn p(&mut self) -> &mut Console {
        self.primary.as_mut().expect("primary started")
    }

    fn sock(&self, side: Side) -> &Path {
        self.files.sock(side)
    }

    fn events(&mut self, side: Side) -> &mut Events {
        self.files.events(side)
    }

    /// Fails if a VMM that should run has exited (with its exit status; the diagnostics
    /// carry its stderr).
    fn check_alive(&mut self, when: &str) {
        for side in [Side::Primary, Side::Secondary] {
            if self.killed == Some(side) {
                continue;
            }
            let c = match side {
                Side::Primary => self.primary.as_mut(),
                Side::Secondary => self.secondary.as_mut(),
            };
            if let Some(status) = c.and_then(|c| c.wait_exit(Duration::from_millis(1))) {
                self.fail(&format!(
                    "the {} colovmm exited ({status}) {when}",
                    side.role()
                ));
            }
        }
    }

    /// `kill -9` of that side's colovmm.
    fn kill(&mut self, side: Side) {
        let c = match side {
            Side::Primary => &self.primary,
            Side::Secondary => &self.secondary,
        };
        let pid = c.as_ref().expect("started").pid() as i32;
        // SAFETY: kill(2) on the pid of a child we own (not yet reaped: the Console waits
        // for it only on drop).
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 of the {}", side.role());
        self.killed = Some(side);
    }

    /// `colo-status --json` of `side`, or the reason there is none.
    fn try_status(&self, side: Side) -> Result<Value, String> {
        let (code, out, err) = remote(self.sock(side), &["colo-status", "--json"]);
        if code != 0 {
            return Err(format!("colovmm-remote colo-status failed ({code}): {err}"));
        }
        serde_json::from_str(&out).map_err(|e| format!("colo-status: not JSON ({e}): {out}"))
    }

    fn status(&self, side: Side) -> Value {
        self.try_status(side)
            .unwrap_or_else(|e| self.fail(&format!("the {}: {e}", side.role())))
    }

    /// Waits until the guest answers ping from the client namespace.
    fn wait_reachable(&self) {
        let deadline = Instant::now() + REACH;
        while Instant::now() < deadline {
            let ok = TwoHostNet::cmd_in(&self.net.client, "ping")
                .args(["-c", "1", "-W", "1", GUEST_IP])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
        }
        self.fail(&format!(
            "the guest never answered ping from the client within {REACH:?}"
        ));
    }

    /// Runs a client tool to completion in the client namespace; it must exit 0 within
    /// `timeout`. Returns its output.
    fn client(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        let mut proc = Spawned::start(&self.net.client, program, args);
        let mut out = proc.stdout();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let Some(status) = proc.wait(timeout) else {
            drop(proc); // kills it, which ends the reader
            let _ = reader.join();
            self.fail(&format!(
                "`{program} {}` did not finish within {timeout:?}",
                args.join(" ")
            ));
        };
        let stdout = reader.join().unwrap_or_default();
        let stderr = proc.stderr().into_bytes();
        let out = Output {
            status,
            stdout,
            stderr,
        };
        if !out.status.success() {
            self.fail(&format!(
                "`{program} {}` failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        out
    }

    /// `redis-cli -h GUEST_IP args...`, its reply trimmed.
    fn redis(&self, args: &[&str]) -> String {
        let mut a = vec!["-h", GUEST_IP, "-p", "6379"];
        a.extend_from_slice(args);
        let out = self.client("redis-cli", &a, Duration::from_secs(60));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits for the `colo_exit` of `side`; returns its properties.
    fn wait_exit(&mut self, side: Side, within: Duration) -> Value {
        match self.events(side).next(|e| is(e, "colo_exit"), within) {
            Some(ev) => ev["properties"].clone(),
            None => self.fail(&format!(
                "no colo_exit from the {} within {within:?}",
                side.role()
            )),
        }
    }

    /// Panics with `msg` and everything a reader needs to see why.
    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.diag())
    }

    fn diag(&self) -> String {
        let tail = |text: String, n: usize| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let transcript = self
            .primary
            .as_ref()
            .map(|c| c.transcript[c.transcript.len().saturating_sub(15)..].join("\n"))
            .unwrap_or_default();
        let read =
            |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
        let status = |side: Side| match self.try_status(side) {
            Ok(v) => v.to_string(),
            Err(e) => e,
        };
        let stderr = |c: &Option<Console>| match c {
            Some(c) => format!("({})\n{}", exit_of(c.pid()), tail(c.stderr(), 15)),
            None => "(not started)".to_string(),
        };
        let mut pev = Events::new(self.files.pev.path.clone());
        let mut sev = Events::new(self.files.sev.path.clone());
        pev.poll();
        sev.poll();
        format!(
            "--- primary colo-status ---\n{}\n--- secondary colo-status ---\n{}\n\
             --- primary events ---\n{}\n--- secondary events ---\n{}\n--- primary console ---\n{}\n\
             --- SVM console ---\n{}\n--- primary log ---\n{}\n--- secondary log ---\n{}\n\
             --- primary process, stderr ---\n{}\n--- secondary process, stderr ---\n{}",
            status(Side::Primary),
            status(Side::Secondary),
            pev.tail(12),
            sev.tail(12),
            transcript,
            tail(read(&self.files.svm), 15),
            tail(read(&self.files.plog), 30),
            tail(read(&self.files.slog), 30),
            stderr(&self.primary),
            stderr(&self.secondary),
        )
    }
}

/// How child `pid` ended, without reaping it (the Console does that on drop).
fn exit_of(pid: u32) -> String {
    // SAFETY: an all-zero siginfo_t is valid; waitid(2) with WNOWAIT only reads the state of
    // our own child and leaves it waitable.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc != 0 {
            return format!("waitid: {}", std::io::Error::last_os_error());
        }
        if info.si_pid() == 0 {
            return "still running".to_string();
        }
        match info.si_code {
            libc::CLD_EXITED => format!("exited with status {}", info.si_status()),
            libc::CLD_KILLED | libc::CLD_DUMPED => format!("killed by signal {}", info.si_status()),
            c => format!("ended (si_code {c}, status {})", info.si_status()),
        }
    }
}

/// The number at `pointer` in a colo-status, failing with the status if it is missing.
fn num(pair: &Pair, status: &Value, pointer: &str) -> u64 {
    status
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| pair.fail(&format!("colo-status has no number at {pointer}: {status}")))
}

/// Both sides still protected.
fn check_protected(pair: &Pair) {
    for side in [Side::Primary, Side::Secondary] {
        let s = pair.status(side);
        if s["state"] != "protected" || !s["exit"].is_null() {
            pair.fail(&format!("the {} is no longer protected: {s}", side.role()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Deterministic services

/// The `requests per second` figure redis-benchmark `-q` printed for `test`.
fn rps(out: &str, test: &str) -> Option<f64> {
    out.split(['\r', '\n']).find_map(|l| {
        let rest = l.trim().strip_prefix(test)?.strip_prefix(": ")?;
        let (n, after) = rest.split_once(' ')?;
        after
            .starts_with("requests per second")
            .then(|| n.parse::<f64>().ok())
            .flatten()
    })
}

#[test]
fn deterministic_services_through_compare() {
    let _serial = one_at_a_time();
    let mut pair = Pair::start("deterministic", 1000);

    // `-r`: random keys from a large space. Without it all 50 connections INCR one shared
    // counter, and the replies then depend on the order the guest happens to serve the
    // connections in, which differs between the two replicas (a real divergence, resolved by
    // a checkpoint per mismatch — not the deterministic case this test is about).
    let out = pair.client(
        "redis-benchmark",
        &[
            "-h",
            GUEST_IP,
            "-p",
            "6379",
            "-r",
            "100000000",
            "-t",
            "set,get,incr",
            "-n",
            "20000",
            "-q",
        ],
        CLIENT,
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for test in ["SET", "GET", "INCR"] {
        match rps(&text, test) {
            Some(r) if r > 0.0 => eprintln!("   redis-benchmark {test}: {r} requests per second"),
            _ => pair.fail(&format!(
                "redis-benchmark printed no requests per second for {test}:\n{text}"
            )),
        }
    }
    if text.contains("ERR") || text.contains("rror") {
        pair.fail(&format!("redis-benchmark saw errors:\n{text}"));
    }

    let t = Instant::now();
    let mut dl = Download::start(&pair.net.client, BIG, None);
    if let Some(problem) = dl.finish(CLIENT, &mut pair) {
        pair.fail(&format!("GET /bytes/{BIG}: {problem}"));
    }
    eprintln!("   64 MiB download: {:.1} s", t.elapsed().as_secs_f64());

    assert_eq!(pair.redis(&["PING"]), "PONG");
    assert_eq!(pair.redis(&["SET", "colo", "replicated"]), "OK");
    assert_eq!(pair.redis(&["GET", "colo"]), "replicated");
    assert_eq!(pair.redis(&["INCR", "hits"]), "1");
    assert_eq!(pair.redis(&["INCR", "hits"]), "2");
    let kv = pair.client(
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            &format!("http://{GUEST_IP}/kv/colo"),
        ],
        Duration::from_secs(90),
    );
    assert_eq!(String::from_utf8_lossy(&kv.stdout), "replicated");
    assert_eq!(pair.redis(&["DEL", "colo"]), "1");
    assert_eq!(pair.redis(&["GET", "colo"]), "");

    check_protected(&pair);
    let p = pair.status(Side::Primary);
    let s = pair.status(Side::Secondary);
    let mirrored = num(&pair, &p, "/proxy/primary/mirrored");
    let injected = num(&pair, &s, "/proxy/secondary/injected");
    let checkpoints = num(&pair, &p, "/checkpoints");
    let divergence = p
        .pointer("/reasons/divergence")
        .map_or(0, |v| v.as_u64().unwrap_or(u64::MAX));
    eprintln!(
        "   {checkpoints} checkpoints, {divergence} for divergence; {mirrored} frames mirrored, \
         {injected} injected into the SVM"
    );
    if mirrored == 0 || injected == 0 {
        pair.fail(&format!(
            "the client's packets were not mirrored to the SVM (mirrored {mirrored}, \
             injected {injected})"
        ));
    }
    // Identical guests fed identical packets answer alike: a divergence is the exception.
    let allowed = checkpoints / 20 + 3;
    if divergence > allowed {
        pair.fail(&format!(
            "{divergence} of {checkpoints} checkpoints were for divergence (at most {allowed} \
             expected for deterministic services)"
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A nondeterministic reply

#[test]
fn nondeterministic_replies_trigger_checkpoints() {
    let _serial = one_at_a_time();
    // A long interval, so that checkpoints come from the mismatches, not the timer.
    let pair = Pair::start("nondeterministic", 30_000);
    let before = pair.status(Side::Primary);
    let div0 = before
        .pointer("/reasons/divergence")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let mis0 = num(&pair, &before, "/proxy/primary/compare/mismatches");

    let mut values = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        // Well below the 30 s interval: a reply held until the next interval checkpoint
        // would time out here.
        let out = pair.client(
            "curl",
            &[
                "-sS",
                "--max-time",
                "20",
                &format!("http://{GUEST_IP}/uptime"),
            ],
            Duration::from_secs(40),
        );
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = body
            .strip_prefix("uptime-tsc ")
            .and_then(|v| v.strip_suffix('\n'))
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| pair.fail(&format!("request {i}: malformed reply {body:?}")));
        eprintln!(
            "   /uptime #{i}: {value} ({:.2} s)",
            t.elapsed().as_secs_f64()
        );
        values.push(value);
    }
    // The client sees only the primary's replies (the SVM's are compared, never sent), and
    // the primary's TSC only goes forward; two sequential requests cannot read the same TSC.
    if values.windows(2).any(|w| w[1] <= w[0]) {
        pair.fail(&format!(
            "the /uptime values the client saw do not increase: {values:?}"
        ));
    }

    // The divergence checkpoint is counted once done; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pair.status(Side::Primary);
        let div = p
            .pointer("/reasons/divergence")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mis = num(&pair, &p, "/proxy/primary/compare/mismatches");
        if div > div0 && mis > mis0 {
            eprintln!("   divergence checkpoints {div0} -> {div}, mismatches {mis0} -> {mis}");
            break;
        }
        if Instant::now() > deadline {
            pair.fail(&format!(
                "10 differing /uptime replies: divergence checkpoints {div0} -> {div}, \
                 mismatches {mis0} -> {mis}; each should have gone up"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    check_protected(&pair);
}

// ---------------------------------------------------------------------------------------------
// 3, 4. Open TCP connections across a failover

/// The INCR loop: one connection, one `INCR <key>` at a time, each reply must be the previous
/// plus one (the first 1). Prints `incr <n>` every 10 replies and `done <n> maxgap_ms <ms>` at
/// the end; exits 1 with `FAIL ...` on a wrong reply, a reset, a close, or 30 s without a
/// reply. Stops when the stop file exists or after `limit` increments.
/// Arguments: host port key stop-file limit.
const INCR_LOOP: &str = r#"
import os, socket, sys, time
host, port, key, stop, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
def fail(msg):
    print("FAIL " + msg, flush=True)
    sys.exit(1)
try:
    s = socket.create_connection((host, port), timeout=30)
except OSError as e:
    fail("connect: %r" % (e,))
s.settimeout(30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
k = key.encode()
cmd = b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(k), k)
buf = b""
prev = 0
maxgap = 0.0
while prev < limit and not os.path.exists(stop):
    t = time.monotonic()
    try:
        s.sendall(cmd)
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                fail("connection closed by the guest after %d replies" % prev)
            buf += chunk
    except socket.timeout:
        fail("no reply within 30 s after %d replies" % prev)
    except OSError as e:
        fail("%r after %d replies" % (e, prev))
    maxgap = max(maxgap, time.monotonic() - t)
    line, buf = buf.split(b"\r\n", 1)
    if buf:
        fail("unexpected bytes after reply %d: %r" % (prev + 1, buf))
    want = b":%d" % (prev + 1)
    if line != want:
        fail("reply %r, expected %r" % (line, want))
    prev += 1
    if prev % 10 == 0:
        print("incr %d" % prev, flush=True)
s.close()
print("done %d maxgap_ms %d" % (prev, maxgap * 1000), flush=True)
"#;

/// The highest `incr <n>` the loop printed so far.
fn incr_progress(c: &LineClient) -> u64 {
    c.lines()
        .iter()
        .filter_map(|l| l.strip_prefix("incr ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits until the INCR loop reached `target` while it (and the download, if given) keeps
/// running; `what` names the phase for failure messages.
fn wait_incr(
    pair: &mut Pair,
    incr: &mut LineClient,
    dl: &mut Download,
    target: u64,
    min_download: u64,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = incr_progress(incr);
        if n >= target && dl.got() >= min_download {
            return;
        }
        if !incr.proc.running() {
            std::thread::sleep(Duration::from_millis(100));
            pair.fail(&format!(
                "{what}: the INCR loop ended early\n{}",
                incr.report()
            ));
        }
        if dl.got() < min_download && !dl.proc.running() {
            std::thread::sleep(Duration::from_millis(100));
            pair.fail(&format!(
                "{what}: the download ended after {} bytes: {}",
                dl.got(),
                dl.proc.stderr()
            ));
        }
        pair.check_alive(what);
        if Instant::now() > deadline {
            pair.fail(&format!(
                "{what}: after 120 s the INCR loop is at {n} (waiting for {target}), the \
                 download at {} bytes (waiting for {min_download})\n{}",
                dl.got(),
                incr.report()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connections_survive_kill(victim: Side) {
    let survivor = victim.other();
    let mut pair = Pair::start(&format!("kill-{}", victim.role()), 1000);
    let stop = pair.files.dir.0.join("stop-incr");
    let stop_arg = stop.to_str().expect("utf-8 path").to_string();

    let mut incr = LineClient::start(
        &pair.net.client,
        "python3",
        &[
            "-c",
            INCR_LOOP,
            GUEST_IP,
            "6379",
            "colo:incr",
            &stop_arg,
            "100000000",
        ],
    );
    // ~32 s at 2 MiB/s: still under way when the victim dies.
    let mut dl = Download::start(&pair.net.client, BIG, Some("2M"));
    wait_incr(
        &mut pair,
        &mut incr,
        &mut dl,
        200,
        4 << 20,
        "before the kill",
    );
    let at_kill = (incr_progress(&incr), dl.got());
    if at_kill.1 >= BIG {
        pair.fail("the download was complete before the kill: it would test nothing");
    }

    pair.kill(victim);
    let t = Instant::now();
    let exit = pair.wait_exit(survivor, NOTICE);
    if exit["role"] != survivor.role() || exit["action"] != "continue" {
        pair.fail(&format!(
            "the {} should go on alone (role {}, action continue): {exit}",
            survivor.role(),
            survivor.role()
        ));
    }
    let after_exit = incr_progress(&incr);
    eprintln!(
        "   kill -9 of the {} at INCR {} / {} bytes downloaded; {}'s colo_exit after {:.2} s: \
         {exit}",
        victim.role(),
        at_kill.0,
        at_kill.1,
        survivor.role(),
        t.elapsed().as_secs_f64()
    );

    // The same connections go on, now served by the survivor alone.
    wait_incr(
        &mut pair,
        &mut incr,
        &mut dl,
        after_exit.max(at_kill.0) + 200,
        0,
        "after the failover",
    );
    if let Err(e) = fs::write(&stop, b"") {
        panic!("{}: {e}", stop.display());
    }
    match incr.proc.wait(Duration::from_secs(60)) {
        Some(status) if status.success() => {}
        Some(status) => pair.fail(&format!(
            "the INCR loop failed ({status}) across the failover\n{}",
            incr.report()
        )),
        None => pair.fail(&format!(
            "the INCR loop did not stop within 60 s of the stop file\n{}",
            incr.report()
        )),
    }
    let lines = incr.lines();
    let done = lines
        .iter()
        .find_map(|l| l.strip_prefix("done "))
        .unwrap_or_else(|| pair.fail(&format!("the INCR loop said no `done`\n{}", incr.report())))
        .to_string();
    let last: u64 = done
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| pair.fail(&format!("bad `done` line: {done}")));
    eprintln!("   INCR loop: done {done} (kill at {})", at_kill.0);

    if let Some(problem) = dl.finish(CLIENT, &mut pair) {
        pair.fail(&format!(
            "the download across the failover (GET /bytes/{BIG}, {} bytes in at the kill): \
             {problem}",
            at_kill.1
        ));
    }

    // A new connection sees the same counter: nothing lost, nothing counted twice.
    let value = pair.redis(&["GET", "colo:incr"]);
    if value != last.to_string() {
        pair.fail(&format!(
            "after the failover GET colo:incr is {value:?}, the INCR loop's last reply was {last}"
        ));
    }
    let s = pair.status(survivor);
    if s["state"] != "failed-over" {
        pair.fail(&format!(
            "the {}'s colo-status should say failed-over: {s}",
            survivor.role()
        ));
    }
}

#[test]
fn tcp_connections_survive_primary_kill() {
    let _serial = one_at_a_time();
    connections_survive_kill(Side::Primary);
}

#[test]
fn tcp_connections_survive_secondary_kill() {
    let _serial = one_at_a_time();
    connections_survive_kill(Side::Secondary);
}
