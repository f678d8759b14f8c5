//! COLO end to end on the test guest: a primary and a secondary colovmm, each in its own host
//! namespace of a [`TwoHostNet`] (the secondary listening on `HOST_B_IP`), driven the way a
//! user would — console, event files, `colovmm-remote`:
//!
//! - `kill -9` of either side, between checkpoints or during one, with 1 and 4 channels: the
//!   survivor reports a `colo_exit` and its guest runs on (the secondary's from the last
//!   checkpoint, not from scratch and not from the future);
//! - a hung (SIGSTOPped) peer: failover by hand with `colo-failover`, or by heartbeat timeout;
//! - both VMs' RAM is identical after a checkpoint taken with `colo-checkpoint --pause-after`;
//! - a guest dirtying 200 MiB/s stays protected at a 100 ms interval with a bounded pause;
//! - garbage on the secondary's port, bad `colo-start` specs, `colo-status` without COLO.
//!
//! Each test takes the [`SERIAL`] lock, so they run one after the other: every case boots two
//! VMMs on a two-core machine, and the timing-sensitive ones need the CPUs to themselves.
//! Every process is a [`Console`] (SIGKILLed on drop) inside a [`Pair`], and the namespaces
//! belong to the same `Pair`, so a failing case leaves nothing behind.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use integration_tests::colo::{is, path_arg, vmm_with, Events, PairFiles, Side};
use integration_tests::netns::{TwoHostNet, HOST_B_IP};
use integration_tests::{count_of, remote, testguest, wait_for, Console, Scratch};
use serde_json::{json, Value};

/// Held by every test for its whole run: one COLO pair on the machine at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next one still runs.
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The secondary's port (each pair has namespaces of its own, so it never clashes).
const PORT: u16 = 9400;
/// The guest's `count` period.
const COUNT_MS: u64 = 100;
/// Boot to READY (ring-0 code is emulated here).
const BOOT: Duration = Duration::from_secs(30);
/// Boot, connect and initial sync of a 256M guest (~1-3 s normally).
const PROTECT: Duration = Duration::from_secs(60);
/// Noticing a dead peer (immediate for kill -9; generous for a loaded machine).
const NOTICE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Event files

fn colo_ev(name: &'static str) -> impl Fn(&Value) -> bool {
    move |e| is(e, name)
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// A primary and a secondary

#[derive(Clone, Copy, Debug)]
struct Setup {
    interval_ms: u64,
    channels: u32,
    /// (heartbeat-interval, heartbeat-timeout) in ms, on both sides; the defaults otherwise.
    heartbeat: Option<(u64, u64)>,
}

impl Setup {
    fn new(interval_ms: u64, channels: u32) -> Setup {
        Setup {
            interval_ms,
            channels,
            heartbeat: None,
        }
    }

    fn hb(&self) -> String {
        self.heartbeat
            .map(|(i, t)| format!(",heartbeat-interval={i},heartbeat-timeout={t}"))
            .unwrap_or_default()
    }
}

/// A COLO pair in its own [`TwoHostNet`]. Fields drop in order: both VMMs are SIGKILLed (also
/// a SIGSTOPped one) before the namespaces and the scratch directory go.
struct Pair {
    primary: Option<Console>,
    secondary: Option<Console>,
    net: TwoHostNet,
    setup: Setup,
    files: PairFiles,
}

impl Pair {
    /// The namespaces and the secondary, listening (no primary yet).
    fn secondary_only(tag: &str, setup: Setup) -> Pair {
        let mut pair = Pair {
            primary: None,
            secondary: None,
            net: TwoHostNet::create(),
            setup,
            files: PairFiles::new(&format!("colo-{tag}")),
        };
        let spec = format!("role=secondary,listen={HOST_B_IP}:{PORT}{}", setup.hb());
        pair.secondary = Some(vmm_with(
            &pair.net.b,
            &pair.files.secondary_args(&spec, &[]),
        ));
        wait_for(&pair.files.ssock);
        if pair
            .files
            .sev
            .next(
                |e| is(e, "started") && e["properties"]["role"] == "secondary",
                Duration::from_secs(10),
            )
            .is_none()
        {
            pair.fail("the secondary never reported COLO started");
        }
        pair
    }

    /// Starts the primary on the test guest and waits until both sides are protected.
    fn start_primary(&mut self) {
        let spec = format!(
            "role=primary,peer={HOST_B_IP}:{PORT},checkpoint-interval={},channels={}{}",
            self.setup.interval_ms,
            self.setup.channels,
            self.setup.hb()
        );
        self.primary = Some(vmm_with(&self.net.a, &self.files.primary_args(&spec, &[])));
        self.p().expect_line("TESTGUEST READY", BOOT);
        wait_for(&self.files.psock);
        // Protected, or protection ended before it began (then say why at once).
        for side in [Side::Primary, Side::Secondary] {
            let ev = self
                .events(side)
                .next(|e| is(e, "protected") || is(e, "colo_exit"), PROTECT);
            match ev {
                Some(ev) if is(&ev, "protected") => {}
                Some(ev) => self.fail(&format!(
                    "the {} ended COLO before it was protected: {ev}",
                    side.role()
                )),
                None => self.fail(&format!(
                    "the {} never reported protected within {PROTECT:?}",
                    side.role()
                )),
            }
        }
    }

    /// Both sides, protected.
    fn start(tag: &str, setup: Setup) -> Pair {
        let mut pair = Pair::secondary_only(tag, setup);
        pair.start_primary();
        pair
    }

    /// The primary's console.
    fn p(&mut self) -> &mut Console {
        self.primary.as_mut().expect("primary started")
    }

    fn events(&mut self, side: Side) -> &mut Events {
        self.files.events(side)
    }

    fn pid(&self, side: Side) -> i32 {
        let c = match side {
            Side::Primary => &self.primary,
            Side::Secondary => &self.secondary,
        };
        c.as_ref().expect("started").pid() as i32
    }

    /// Sends `sig` to that side's colovmm.
    fn signal(&self, side: Side, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we own (not yet reaped: the Console waits
        // for it only on drop).
        let rc = unsafe { libc::kill(self.pid(side), sig) };
        assert_eq!(rc, 0, "kill({:?}, {sig})", side);
    }

    /// Sends a console command to the primary's guest; returns the answer line.
    fn ask(&mut self, cmd: &str, prefix: &str) -> String {
        let line = self.p().ask(cmd, prefix);
        if !line.starts_with(prefix) {
            self.fail(&format!("{cmd:?} answered {line:?}"));
        }
        line
    }

    /// Runs colovmm-remote against `side`; must succeed.
    fn ok(&self, side: Side, args: &[&str]) -> String {
        self.files
            .remote(side, args)
            .unwrap_or_else(|e| self.fail(&e))
    }

    /// A `--json` command's reply.
    fn json(&self, side: Side, args: &[&str]) -> Value {
        self.files
            .remote_json(side, args)
            .unwrap_or_else(|e| self.fail(&e))
    }

    fn colo_status(&self, side: Side) -> Value {
        self.json(side, &["colo-status"])
    }

    fn vm_state(&self, side: Side) -> String {
        self.files.vm_state(side).unwrap_or_else(|e| self.fail(&e))
    }

    /// Waits for `n` more `checkpoint` events from `side`; returns the last.
    fn wait_checkpoints(&mut self, side: Side, n: usize) -> Value {
        let timeout =
            Duration::from_secs(30) + Duration::from_millis(self.setup.interval_ms) * 2 * n as u32;
        let mut last = Value::Null;
        for i in 0..n {
            match self.events(side).next(colo_ev("checkpoint"), timeout) {
                Some(ev) => last = ev,
                None => self.fail(&format!(
                    "only {i} of {n} checkpoints on the {} within {timeout:?}",
                    side.role()
                )),
            }
        }
        last
    }

    /// Count values from the primary's console that arrived so far (non-blocking), each with
    /// the time we read it (seconds since the epoch, the clock of the event files): it was
    /// printed no later than that.
    fn drain_counts(&mut self, out: &mut Vec<(f64, u64)>) {
        if let Some(c) = self.primary.as_mut() {
            while let Some(l) = c.wait_line(|l| l.starts_with("count="), Duration::ZERO) {
                out.push((now_epoch(), count_of(&l)));
            }
        }
    }

    /// The SVM's console file (lossy text).
    fn svm_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.files.svm).unwrap_or_default()).into_owned()
    }

    fn svm_len(&self) -> usize {
        fs::metadata(&self.files.svm).map_or(0, |m| m.len() as usize)
    }

    /// The complete lines the SVM printed from byte `from` on; a line already begun at `from`
    /// is left out.
    fn svm_lines_from(&self, from: usize) -> Vec<String> {
        let bytes = fs::read(&self.files.svm).unwrap_or_default();
        if from > bytes.len() {
            return Vec::new();
        }
        let mut start = from;
        if from > 0 && bytes[from - 1] != b'\n' {
            match bytes[from..].iter().position(|&b| b == b'\n') {
                Some(nl) => start = from + nl + 1,
                None => return Vec::new(),
            }
        }
        let rest = &bytes[start..];
        let complete = match rest.iter().rposition(|&b| b == b'\n') {
            Some(i) => &rest[..=i],
            None => &[][..],
        };
        String::from_utf8_lossy(complete)
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }

    /// Waits until the SVM printed at least `n` complete lines after byte `from`, all of them
    /// `count=` lines; returns their values.
    fn svm_counts_after(&self, from: usize, n: usize) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let lines = self.svm_lines_from(from);
            if let Some(bad) = lines.iter().find(|l| !l.starts_with("count=")) {
                self.fail(&format!(
                    "the SVM printed {bad:?} after the failover, not a count line"
                ));
            }
            if lines.len() >= n {
                return lines.iter().map(|l| count_of(l)).collect();
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "the SVM printed only {} count lines after the failover: {lines:?}",
                    lines.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
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
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        let mut pev = Events::new(self.files.pev.path.clone());
        let mut sev = Events::new(self.files.sev.path.clone());
        pev.poll();
        sev.poll();
        format!(
            "--- primary events ---\n{}\n--- secondary events ---\n{}\n--- primary console ---\n{}\n\
             --- SVM console ---\n{}\n--- primary log ---\n{}\n--- secondary log ---\n{}",
            pev.tail(12),
            sev.tail(12),
            transcript,
            tail(self.svm_text(), 15),
            tail(read(&self.files.plog), 25),
            tail(read(&self.files.slog), 25),
        )
    }
}

/// The message of a caught panic.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(panic without a message)".into())
}

/// Runs `f` (one sub-case) and turns a panic into a failure line, so the other sub-cases run.
fn sub_case(name: &str, failures: &mut Vec<String>, f: impl FnOnce()) {
    let t = Instant::now();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => eprintln!("== {name}: ok ({:.1} s)", t.elapsed().as_secs_f64()),
        Err(p) => {
            eprintln!("== {name}: FAILED ({:.1} s)", t.elapsed().as_secs_f64());
            failures.push(format!("{name}: {}", panic_text(p)));
        }
    }
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} sub-case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n========\n\n")
    );
}

/// The survivor's `colo_exit` event (waits for it).
fn wait_exit(pair: &mut Pair, side: Side, within: Duration) -> Value {
    match pair.events(side).next(colo_ev("colo_exit"), within) {
        Some(ev) => ev["properties"].clone(),
        None => pair.fail(&format!(
            "no colo_exit from the {} within {within:?}",
            side.role()
        )),
    }
}

/// The survivor's checks common to every failover: its `colo_exit` says it goes on, the status
/// says failed-over, the VM runs.
fn check_survivor_exit(pair: &Pair, side: Side, exit: &Value) {
    if exit["role"] != side.role() || exit["action"] != "continue" {
        pair.fail(&format!(
            "the {} should go on alone (role {}, action continue): {exit}",
            side.role(),
            side.role()
        ));
    }
    let status = pair.colo_status(side);
    if status["state"] != "failed-over" || status["exit"] != *exit {
        pair.fail(&format!(
            "the {}'s colo-status should be failed-over with that exit: {status}",
            side.role()
        ));
    }
    let state = pair.vm_state(side);
    if state != "Running" {
        pair.fail(&format!("the {}'s VM is {state}, not Running", side.role()));
    }
}

/// The primary survived: its counter keeps printing on its console and it answers commands.
fn check_primary_runs_on(pair: &mut Pair) {
    pair.drain_counts(&mut Vec::new());
    let mut next = Vec::new();
    for _ in 0..3 {
        match pair
            .p()
            .wait_line(|l| l.starts_with("count="), Duration::from_secs(5))
        {
            Some(l) => next.push(count_of(&l)),
            None => pair.fail("the surviving primary's guest stopped counting"),
        }
    }
    if next.windows(2).any(|w| w[1] != w[0] + 1) {
        pair.fail(&format!("the primary's counter skips or repeats: {next:?}"));
    }
    pair.ask("uptime", "uptime_ms=");
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 of either side, idle or during a checkpoint, 1 or 4 channels

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// Right after a checkpoint completed, well before the next one.
    Idle,
    /// On `checkpoint-started`: the checkpoint is under way.
    InCheckpoint,
}

/// What a kill case found, when it did not fail outright.
enum Outcome {
    Pass,
    /// The kill was meant to land in a checkpoint but the survivor says it did not.
    MissedCheckpoint(String),
}

fn kill_case(victim: Side, when: When, channels: u32) -> Outcome {
    let setup = Setup::new(300, channels);
    let survivor = victim.other();
    let mut pair = Pair::start(&format!("kill-{}", victim.role()), setup);
    pair.ask("count 100", "count ok");
    pair.wait_checkpoints(Side::Primary, 3);
    // How long after `checkpoint-started` the checkpoint's first bytes leave the primary: its
    // pause, collect and resume phases. A primary killed before that has sent nothing of the
    // checkpoint, so its secondary rightly saw none under way; kill it once bytes flow.
    let mut first_bytes_after = Duration::ZERO;
    if when == When::InCheckpoint {
        // ~15 MiB dirtied per 300 ms interval: checkpoints take tens of ms.
        pair.ask("dirty 50 64", "dirty ok");
        let last = pair.wait_checkpoints(Side::Primary, 2);
        if victim == Side::Primary {
            let phase = |k: &str| last["properties"]["phases_ms"][k].as_f64().unwrap_or(0.0);
            let ms = phase("pause") + phase("collect") + phase("resume") + 2.0;
            first_bytes_after = Duration::from_secs_f64(ms / 1000.0);
        }
    }

    // Watch the primary's console and its events together; kill the victim on the trigger.
    // `printed`: the count values the primary printed, with when we read them.
    let mut printed = Vec::new();
    pair.files.pev.skip_to_end();
    let deadline = Instant::now() + Duration::from_secs(30);
    let trigger_on = match when {
        When::Idle => "checkpoint",
        When::InCheckpoint => "checkpoint-started",
    };
    let trigger = loop {
        pair.drain_counts(&mut printed);
        if let Some(ev) = pair.files.pev.next_now(&|e| is(e, trigger_on)) {
            std::thread::sleep(first_bytes_after);
            pair.signal(victim, libc::SIGKILL);
            break ev;
        }
        if Instant::now() > deadline {
            pair.fail(&format!(
                "no {trigger_on} event to time the kill on within 30 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let killed_at = now_epoch();
    let lag_ms = (killed_at - trigger["timestamp"].as_f64().unwrap_or(killed_at)) * 1000.0;
    let seq = trigger["properties"]["seq"].as_u64().unwrap_or(0);

    let exit = wait_exit(&mut pair, survivor, NOTICE);
    // Where the SVM's console stood when its side reported the failover.
    let svm_mark = pair.svm_len();
    // Everything the primary printed before it died (or so far, if it survived).
    if victim == Side::Primary {
        while let Some(l) = pair
            .p()
            .wait_line(|l| l.starts_with("count="), Duration::from_secs(2))
        {
            printed.push((now_epoch(), count_of(&l)));
        }
    } else {
        pair.drain_counts(&mut printed);
    }
    let during = when == When::InCheckpoint;
    let story = format!(
        "kill -9 of the {} {:.1} ms after the primary's {} #{seq}; {}'s colo_exit: {exit}",
        victim.role(),
        lag_ms,
        trigger["event"].as_str().unwrap_or("?"),
        survivor.role()
    );
    eprintln!("   {story}");
    if exit["during_checkpoint"] != during {
        if during && exit["during_checkpoint"] == false {
            return Outcome::MissedCheckpoint(format!("{story}\n{}", pair.diag()));
        }
        pair.fail(&format!("during_checkpoint should be {during}: {story}"));
    }
    check_survivor_exit(&pair, survivor, &exit);
    match survivor {
        Side::Primary => check_primary_runs_on(&mut pair),
        Side::Secondary => {
            let counts = pair.svm_counts_after(svm_mark, 6);
            if counts.windows(2).any(|w| w[1] != w[0] + 1) {
                pair.fail(&format!(
                    "after the failover the SVM's counter must go up by one: {counts:?}"
                ));
            }
            let first = counts[0];
            // The highest count the primary printed before it died.
            let died_at = printed.iter().map(|&(_, v)| v).max().unwrap_or(0);
            // The highest count it had printed before its last completed checkpoint began:
            // read by us before that checkpoint-started event was written, so printed before
            // the PVM paused for it, so part of the state the SVM goes on from.
            pair.files.pev.poll();
            let last_done = pair
                .files
                .pev
                .all
                .iter()
                .filter(|e| is(e, "checkpoint"))
                .filter_map(|e| e["properties"]["seq"].as_u64())
                .max()
                .unwrap_or(0);
            let began = pair
                .files
                .pev
                .all
                .iter()
                .find(|e| is(e, "checkpoint-started") && e["properties"]["seq"] == last_done)
                .and_then(|e| e["timestamp"].as_f64())
                .unwrap_or(0.0);
            let checkpointed = printed
                .iter()
                .filter(|&&(t, _)| t < began)
                .map(|&(_, v)| v)
                .max()
                .unwrap_or(0);
            // Between checkpoints the SVM runs on by itself, in parallel with the PVM, so at
            // the moment of the failover it may be up to an interval's worth of counts away
            // from what the PVM printed last; the +2 covers the line the PVM had in flight
            // and the one the SVM prints while the failover is being reported.
            let slack = setup.interval_ms / COUNT_MS + 2;
            if first > died_at + slack {
                pair.fail(&format!(
                    "the SVM's first count after the failover ({first}) is from the future: the \
                     primary printed up to {died_at} (allowed up to {})",
                    died_at + slack
                ));
            }
            // It goes on from the last checkpoint, not from scratch; it should print
            // `checkpointed + 1` or later, the slack of 2 allows for a count line the guest
            // had begun but not finished when the PVM paused.
            if first + 2 < checkpointed {
                pair.fail(&format!(
                    "the SVM's first count after the failover ({first}) is behind what the \
                     primary had printed before its last completed checkpoint ({checkpointed})"
                ));
            }
            eprintln!(
                "   SVM after failover: {counts:?} (primary printed up to {died_at}; {checkpointed} \
                 before its last completed checkpoint #{last_done} began)"
            );
        }
    }
    Outcome::Pass
}

#[test]
fn kill_9_of_either_side_fails_over_to_the_other() {
    let _serial = one_at_a_time();
    let mut failures = Vec::new();
    for victim in [Side::Secondary, Side::Primary] {
        for when in [When::Idle, When::InCheckpoint] {
            for channels in [1, 4] {
                let name = format!(
                    "{} survives, {} killed {}, {channels} channel(s)",
                    victim.other().role(),
                    victim.role(),
                    match when {
                        When::Idle => "between checkpoints",
                        When::InCheckpoint => "during a checkpoint",
                    }
                );
                // A kill meant for the middle of a checkpoint can land just outside it:
                // then the case is run again (up to 3 more times); the assertion stays.
                let mut missed = Vec::new();
                sub_case(&name, &mut failures, || loop {
                    match kill_case(victim, when, channels) {
                        Outcome::Pass => return,
                        Outcome::MissedCheckpoint(why) => {
                            eprintln!(
                                "   the kill missed the checkpoint (attempt {})",
                                missed.len() + 1
                            );
                            missed.push(why);
                            if missed.len() == 4 {
                                panic!(
                                    "during_checkpoint stayed false in 4 attempts; the last:\n{}",
                                    missed.last().unwrap()
                                );
                            }
                        }
                    }
                });
            }
        }
    }
    report(failures);
}

// ---------------------------------------------------------------------------------------------
// 2. A hung peer (SIGSTOP): failover by hand, or by heartbeat timeout

fn hung_peer_failed_over_by_hand(victim: Side) {
    let survivor = victim.other();
    let mut pair = Pair::start(
        &format!("hung-{}", victim.role()),
        Setup {
            interval_ms: 300,
            channels: 1,
            heartbeat: Some((100, 60_000)),
        },
    );
    pair.ask("count 100", "count ok");
    pair.wait_checkpoints(Side::Primary, 3);
    pair.signal(victim, libc::SIGSTOP);
    // With a 60 s heartbeat timeout a hung host goes unnoticed: nothing happens by itself.
    std::thread::sleep(Duration::from_millis(1500));
    if let Some(ev) = pair.events(survivor).next_now(&colo_ev("colo_exit")) {
        pair.fail(&format!(
            "failed over by itself within 1.5 s of a SIGSTOP: {ev}"
        ));
    }
    let status = pair.colo_status(survivor);
    if !status["exit"].is_null()
        || !matches!(
            status["state"].as_str(),
            Some("protected" | "checkpointing")
        )
    {
        pair.fail(&format!("still protecting before colo-failover: {status}"));
    }

    pair.ok(survivor, &["colo-failover"]);
    let exit = wait_exit(&mut pair, survivor, NOTICE);
    let svm_mark = pair.svm_len();
    if !exit["reason"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase()
        .contains("api")
    {
        pair.fail(&format!(
            "the reason should say the failover came through the API: {exit}"
        ));
    }
    check_survivor_exit(&pair, survivor, &exit);
    let check_runs = |pair: &mut Pair, from: usize| match survivor {
        Side::Primary => check_primary_runs_on(pair),
        Side::Secondary => {
            let counts = pair.svm_counts_after(from, 5);
            if counts.windows(2).any(|w| w[1] != w[0] + 1) {
                pair.fail(&format!("the SVM's counter must go up by one: {counts:?}"));
            }
        }
    };
    check_runs(&mut pair, svm_mark);

    // The hung host is dead for good now; the survivor does not care.
    pair.signal(victim, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    let mark = pair.svm_len();
    let status = pair.colo_status(survivor);
    if status["state"] != "failed-over" || pair.vm_state(survivor) != "Running" {
        pair.fail(&format!(
            "after the SIGKILL of the hung {}: {status}",
            victim.role()
        ));
    }
    check_runs(&mut pair, mark);
}

fn hung_primary_noticed_by_heartbeat_timeout() {
    let mut pair = Pair::start(
        "hb-timeout",
        Setup {
            interval_ms: 300,
            channels: 1,
            heartbeat: Some((100, 500)),
        },
    );
    pair.ask("count 100", "count ok");
    pair.wait_checkpoints(Side::Primary, 3);
    pair.signal(Side::Primary, libc::SIGSTOP);
    let stopped = Instant::now();
    let exit = wait_exit(&mut pair, Side::Secondary, NOTICE);
    let after = stopped.elapsed();
    let svm_mark = pair.svm_len();
    let reason = exit["reason"].as_str().unwrap_or_default().to_lowercase();
    if !(reason.contains("heartbeat") || reason.contains("timeout")) {
        pair.fail(&format!(
            "the reason should name the heartbeat timeout: {exit}"
        ));
    }
    // Not before the timeout (the last beat came at most one 100 ms interval before the
    // SIGSTOP), and not long after it.
    if after < Duration::from_millis(300) || after > Duration::from_secs(10) {
        pair.fail(&format!(
            "failover {after:?} after the SIGSTOP with a 500 ms heartbeat timeout"
        ));
    }
    eprintln!("   the secondary failed over {after:?} after the primary was SIGSTOPped");
    check_survivor_exit(&pair, Side::Secondary, &exit);
    let counts = pair.svm_counts_after(svm_mark, 5);
    if counts.windows(2).any(|w| w[1] != w[0] + 1) {
        pair.fail(&format!("the SVM's counter must go up by one: {counts:?}"));
    }
    pair.signal(Side::Primary, libc::SIGKILL);
}

#[test]
fn a_hung_peer_is_failed_over_by_hand_or_by_heartbeat_timeout() {
    let _serial = one_at_a_time();
    let mut failures = Vec::new();
    sub_case(
        "secondary hung (SIGSTOP), colo-failover on the primary",
        &mut failures,
        || hung_peer_failed_over_by_hand(Side::Secondary),
    );
    sub_case(
        "primary hung (SIGSTOP), colo-failover on the secondary",
        &mut failures,
        || hung_peer_failed_over_by_hand(Side::Primary),
    );
    sub_case(
        "primary hung (SIGSTOP), the secondary fails over after a 500 ms heartbeat timeout",
        &mut failures,
        hung_primary_noticed_by_heartbeat_timeout,
    );
    report(failures);
}

/// A guest the user powers off on the primary stays off: the primary tells the secondary
/// (farewell) before it exits, so the SVM stops instead of taking over.
fn primary_guest_powers_off() {
    let mut pair = Pair::start("poweroff", Setup::new(300, 1));
    pair.ask("count 100", "count ok");
    pair.wait_checkpoints(Side::Primary, 3);
    pair.p().send("poweroff");
    let exit = wait_exit(&mut pair, Side::Secondary, NOTICE);
    if exit["action"] != "stop" {
        pair.fail(&format!(
            "the secondary must stop when the primary's guest powered off: {exit}"
        ));
    }
    if pair.p().wait_exit(Duration::from_secs(20)).is_none() {
        pair.fail("the primary's colovmm did not exit after the guest powered off");
    }
}

#[test]
fn a_guest_powered_off_on_the_primary_stays_off() {
    let _serial = one_at_a_time();
    let mut failures = Vec::new();
    sub_case(
        "poweroff on the primary's console",
        &mut failures,
        primary_guest_powers_off,
    );
    report(failures);
}

// ---------------------------------------------------------------------------------------------
// 3. Both VMs' memory is identical after a checkpoint

fn memory_equal_after_checkpoints(channels: u32) {
    let mut pair = Pair::start(&format!("mem-{channels}"), Setup::new(300, channels));
    pair.ask("count 100", "count ok");
    pair.ask("dirty 50 64", "dirty ok");
    pair.wait_checkpoints(Side::Primary, 2);
    let mut previous: Option<Value> = None;
    for round in 1..=3 {
        // Let the guest dirty memory (and interval checkpoints happen) in between.
        std::thread::sleep(Duration::from_millis(700));
        pair.files.pev.skip_to_end();
        pair.ok(Side::Primary, &["colo-checkpoint", "--pause-after"]);
        let ev = match pair.files.pev.next(
            |e| is(e, "checkpoint") && e["properties"]["reason"] == "request",
            Duration::from_secs(30),
        ) {
            Some(ev) => ev,
            None => pair.fail("the requested checkpoint never completed on the primary"),
        };
        let seq = ev["properties"]["seq"].as_u64().unwrap_or(u64::MAX);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = pair.vm_state(Side::Primary);
            let s = pair.vm_state(Side::Secondary);
            let applied = pair.colo_status(Side::Secondary)["checkpoints"]
                .as_u64()
                .unwrap_or(0);
            if p == "Paused" && s == "Paused" && applied >= seq {
                break;
            }
            if Instant::now() > deadline {
                pair.fail(&format!(
                    "round {round}: after checkpoint #{seq} with --pause-after: primary {p}, \
                     secondary {s} with {applied} checkpoints applied"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let a = pair.json(Side::Primary, &["memory-checksum"]);
        let b = pair.json(Side::Secondary, &["memory-checksum"]);
        if a != b || a["bytes"] != json!(256u64 << 20) {
            pair.fail(&format!(
                "round {round}, checkpoint #{seq}: primary RAM {a}, secondary RAM {b}"
            ));
        }
        // The guest really changed its memory since the last round: the comparison is not
        // between two stale copies.
        if previous.as_ref() == Some(&a) {
            pair.fail(&format!(
                "round {round}: RAM unchanged since the last round: {a}"
            ));
        }
        eprintln!("   round {round}: checkpoint #{seq}, both RAMs {a}");
        previous = Some(a);
        pair.ok(Side::Secondary, &["resume"]);
        pair.ok(Side::Primary, &["resume"]);
        for side in [Side::Primary, Side::Secondary] {
            let st = pair.vm_state(side);
            if st != "Running" {
                pair.fail(&format!("the {} is {st} after resume", side.role()));
            }
        }
    }
    // Protection went on through it all.
    pair.wait_checkpoints(Side::Secondary, 2);
    let status = pair.colo_status(Side::Primary);
    if !status["exit"].is_null() {
        pair.fail(&format!("protection ended: {status}"));
    }
}

#[test]
fn both_vms_have_the_same_memory_after_a_checkpoint() {
    let _serial = one_at_a_time();
    let mut failures = Vec::new();
    for channels in [1, 4] {
        sub_case(
            &format!("memory equal after --pause-after checkpoints, {channels} channel(s)"),
            &mut failures,
            || memory_equal_after_checkpoints(channels),
        );
    }
    report(failures);
}

// ---------------------------------------------------------------------------------------------
// 4. A guest dirtying 200 MiB/s at a 100 ms interval

#[test]
fn a_guest_dirtying_200_mib_s_stays_protected_at_100_ms() {
    let _serial = one_at_a_time();
    let mut pair = Pair::start("fast", Setup::new(100, 1));
    pair.ask("dirty 200 128", "dirty ok");
    // The dirtier's pages reach the checkpoints from the next one on.
    pair.wait_checkpoints(Side::Primary, 2);
    pair.files.pev.skip_to_end();
    let t0 = Instant::now();
    let mut pauses = Vec::new();
    let mut bytes = Vec::new();
    let mut last_seq = 0;
    let mut next_status = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        while let Some(ev) = pair
            .files
            .pev
            .next_now(&|e| is(e, "checkpoint") || is(e, "colo_exit"))
        {
            if is(&ev, "colo_exit") {
                pair.fail(&format!("protection ended under load: {ev}"));
            }
            pauses.push(ev["properties"]["pause_ms"].as_f64().unwrap_or(f64::NAN));
            bytes.push(ev["properties"]["bytes"].as_u64().unwrap_or(0));
            last_seq = ev["properties"]["seq"].as_u64().unwrap_or(0);
        }
        if Instant::now() >= next_status {
            for side in [Side::Primary, Side::Secondary] {
                let s = pair.colo_status(side);
                if !s["exit"].is_null()
                    || !matches!(s["state"].as_str(), Some("protected" | "checkpointing"))
                {
                    pair.fail(&format!("the {} is no longer protected: {s}", side.role()));
                }
            }
            next_status = Instant::now() + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = pauses.len();
    if n < 20 {
        pair.fail(&format!(
            "only {n} checkpoints in 10 s at a 100 ms interval: {pauses:?}"
        ));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    // The load is real: 200 MiB/s is 20 MiB per 100 ms; ask for a fifth of that.
    let mib = bytes.iter().sum::<u64>() as f64 / n as f64 / (1 << 20) as f64;
    if mib < 4.0 {
        pair.fail(&format!(
            "checkpoints carry only {mib:.1} MiB on average: is the guest dirtying?"
        ));
    }
    let (first, last) = (mean(&pauses[..n / 3]), mean(&pauses[n - n / 3..]));
    eprintln!(
        "   {n} checkpoints in 10 s, {mib:.1} MiB each on average; mean pause {first:.1} ms in the first third, {last:.1} ms \
         in the last; all: {pauses:.1?}"
    );
    if last.is_nan() || first.is_nan() || last > 2.0 * first + 20.0 {
        pair.fail(&format!(
            "the pause grows: {first:.1} ms mean over the first third, {last:.1} ms over the \
             last ({pauses:.1?})"
        ));
    }
    // The secondary applied them too, and the guest still answers.
    let applied = pair.colo_status(Side::Secondary)["checkpoints"]
        .as_u64()
        .unwrap_or(0);
    if applied + 1 < last_seq {
        pair.fail(&format!(
            "the secondary applied {applied} checkpoints, the primary completed #{last_seq}"
        ));
    }
    pair.ask("uptime", "uptime_ms=");
}

// ---------------------------------------------------------------------------------------------
// 5. Bad input

/// Runs `f` on a thread that entered network namespace `ns` (only that thread moves).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on a namespace file we hold open; it affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| panic!("in {ns}: {}", panic_text(p)))
}

/// CRC-32 (IEEE), as the migration stream header carries it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (!(crc & 1)).wrapping_add(1));
        }
    }
    !crc
}

/// Deterministic junk.
fn junk(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Connects from host A to the secondary's port and sends each payload on its own
/// connection, then holds one silent connection open for a while.
fn throw_garbage(pair: &Pair, payloads: Vec<Vec<u8>>) {
    let addr: SocketAddr = format!("{HOST_B_IP}:{PORT}").parse().unwrap();
    in_netns(&pair.net.a, move || {
        for p in payloads {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect to the secondary: {e}"));
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            let _ = s.write_all(&p);
            let mut sink = [0u8; 256];
            let _ = s.read(&mut sink);
        }
        let silent = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to the secondary: {e}"));
        std::thread::sleep(Duration::from_secs(1));
        drop(silent);
    });
}

/// After the garbage the secondary still runs and waits, and a real primary protects with it.
fn secondary_survives(mut pair: Pair, what: &str) {
    // Give it time to read and refuse what it got.
    std::thread::sleep(Duration::from_secs(2));
    if let Some(status) = pair
        .secondary
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_millis(200))
    {
        pair.fail(&format!("the secondary exited ({status}) after {what}"));
    }
    pair.ok(Side::Secondary, &["ping"]);
    let status = pair.colo_status(Side::Secondary);
    if status["state"] != "syncing" || !status["exit"].is_null() {
        pair.fail(&format!(
            "the secondary stopped waiting for a primary after {what}: {status}"
        ));
    }
    pair.start_primary();
    pair.ask("count 100", "count ok");
    pair.wait_checkpoints(Side::Secondary, 3);
    for side in [Side::Primary, Side::Secondary] {
        let s = pair.colo_status(side);
        if !s["exit"].is_null() {
            pair.fail(&format!("the {} ended protection: {s}", side.role()));
        }
    }
}

fn garbage_then_a_real_primary() {
    let pair = Pair::secondary_only("garbage", Setup::new(300, 1));
    throw_garbage(
        &pair,
        vec![
            junk(4096, 0x1234_5678),
            vec![0u8; 64 << 10],
            b"GET / HTTP/1.1\r\nHost: secondary\r\n\r\n".to_vec(),
            Vec::new(),
            b"CLVM-MIG this is not a stream header".to_vec(),
            b"HB\x01\x00\x00\x00\x00\x00".to_vec(),
            junk(1 << 20, 0x9abc_def0),
        ],
    );
    secondary_survives(pair, "garbage connections");
}

fn a_stream_header_then_garbage_then_a_real_primary() {
    let pair = Pair::secondary_only("header", Setup::new(300, 1));
    // A well-formed migration stream header (channel 0 of 1) as the primary sends it, then
    // junk where the first message should be.
    let mut h = Vec::new();
    h.extend_from_slice(b"CLVM-MIG");
    h.extend_from_slice(&1u16.to_le_bytes()); // version
    h.extend_from_slice(&0u16.to_le_bytes()); // flags
    h.extend_from_slice(&0u16.to_le_bytes()); // channel
    h.extend_from_slice(&1u16.to_le_bytes()); // channels
    h.extend_from_slice(&0x5eed_5eed_5eed_5eedu64.to_le_bytes()); // session
    h.extend_from_slice(&0u32.to_le_bytes()); // reserved
    let crc = crc32(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&junk(4096, 42));
    throw_garbage(&pair, vec![h]);
    secondary_survives(pair, "a stream header followed by garbage");
}

#[test]
fn garbage_on_the_secondary_port_does_not_stop_it() {
    let _serial = one_at_a_time();
    let mut failures = Vec::new();
    sub_case(
        "garbage connections, then a real primary",
        &mut failures,
        garbage_then_a_real_primary,
    );
    sub_case(
        "a valid stream header then garbage, then a real primary",
        &mut failures,
        a_stream_header_then_garbage_then_a_real_primary,
    );
    report(failures);
}

#[test]
fn bad_colo_specs_and_colo_status_without_colo_are_errors() {
    let _serial = one_at_a_time();
    let dir = Scratch::new("colo-specs");
    let sock = dir.0.join("vmm.sock");
    let kernel = testguest();
    let mut vmm = Console::colovmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "size=256M",
        "--api-socket",
        &path_arg("path", &sock),
    ]);
    vmm.expect_line("TESTGUEST READY", BOOT);
    wait_for(&sock);

    // colo-status before any COLO: an error, and the VMM is still there.
    for args in [
        &["colo-status"][..],
        &["colo-status", "--json"],
        &["colo-failover"],
        &["colo-checkpoint"],
        &["colo-set", "--checkpoint-interval", "100"],
    ] {
        let (code, out, err) = remote(&sock, args);
        assert_ne!(code, 0, "{args:?} without COLO succeeded: {out}");
        assert!(
            err.contains("COLO"),
            "{args:?}: the error should say COLO is not running: {err}"
        );
    }

    // Specs colovmm-remote refuses, each naming the key at fault.
    let peer = format!("{HOST_B_IP}:{PORT}");
    let bad: Vec<(String, &str)> = vec![
        ("role=primary".into(), "peer"),
        ("role=secondary".into(), "listen"),
        ("".into(), "role"),
        (format!("role=tertiary,peer={peer}"), "role"),
        (format!("role=primary,peer={peer},channels=0"), "channels"),
        (format!("role=primary,peer={peer},channels=17"), "channels"),
        (
            format!("role=primary,peer={peer},channels=four"),
            "channels",
        ),
        (
            format!("role=primary,peer={peer},checkpoint-interval=5"),
            "checkpoint-interval",
        ),
        (
            format!("role=primary,peer={peer},heartbeat-interval=100,heartbeat-timeout=150"),
            "heartbeat-timeout",
        ),
        (
            format!("role=primary,peer={peer},heartbeat-interval=5"),
            "heartbeat-interval",
        ),
        ("role=primary,peer=no-port-here".into(), "peer"),
        ("role=primary,peer=192.168.100.11:99999".into(), "peer"),
        (format!("role=primary,peer={peer},colour=blue"), "colour"),
        (format!("role=primary,peer={peer},peer={peer}"), "peer"),
        (format!("role=secondary,listen={peer},peer={peer}"), "peer"),
        (format!("role=primary,peer={peer},listen={peer}"), "listen"),
    ];
    for (spec, key) in &bad {
        let (code, out, err) = remote(&sock, &["colo-start", spec]);
        assert_ne!(code, 0, "colo-start {spec:?} succeeded: {out}");
        assert!(
            err.contains(key),
            "colo-start {spec:?}: the error should name {key:?}: {err}"
        );
    }

    // The same checks on the API itself (another client than colovmm-remote).
    let api_bad: Vec<(Value, &str)> = vec![
        (json!({"role": "primary"}), "peer"),
        (json!({"role": "secondary"}), "listen"),
        (
            json!({"role": "primary", "peer": peer, "channels": 99}),
            "channels",
        ),
        (
            json!({"role": "primary", "peer": peer, "checkpoint_interval_ms": 1}),
            "checkpoint_interval_ms",
        ),
        (
            json!({"role": "primary", "peer": peer, "colour": "blue"}),
            "colour",
        ),
        // serde names the unknown value rather than the field here.
        (json!({"role": "tertiary", "peer": peer}), "tertiary"),
    ];
    for (body, key) in &api_bad {
        let (code, reply) = api::client::request(
            &sock,
            "PUT",
            "/api/v1/vm.colo-start",
            Some(body.to_string().as_bytes()),
        )
        .unwrap_or_else(|e| panic!("vm.colo-start {body}: {e}"));
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(code, 400, "vm.colo-start {body}: {reply}");
        assert!(
            reply.contains(key),
            "vm.colo-start {body}: the error should name {key:?}: {reply}"
        );
    }

    // A valid spec in the wrong place: this VMM runs a VM, so it cannot be a secondary.
    let (code, _, err) = remote(
        &sock,
        &["colo-start", "role=secondary,listen=127.0.0.1:9401"],
    );
    assert_ne!(code, 0, "a VMM running a VM became a secondary");
    assert!(err.contains("secondary"), "{err}");

    // None of it started COLO or hurt the VM.
    let (code, _, err) = remote(&sock, &["colo-status"]);
    assert_ne!(code, 0, "COLO started from a bad spec");
    assert!(err.contains("COLO"), "{err}");
    let (code, out, err) = remote(&sock, &["info", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"Running\""), "{out}");
    assert!(vmm.ask("uptime", "uptime_ms=").starts_with("uptime_ms="));

    // A VMM with no VM at all.
    let sock2 = dir.0.join("empty.sock");
    let mut empty = Console::colovmm(&["--api-socket", &path_arg("path", &sock2)]);
    wait_for(&sock2);
    let (code, out, err) = remote(&sock2, &["colo-status"]);
    assert_ne!(
        code, 0,
        "colo-status on a VMM without a VM succeeded: {out}"
    );
    assert!(!err.is_empty());
    let (code, _, err) = remote(&sock2, &["colo-start", "role=primary,peer=127.0.0.1:9402"]);
    assert_ne!(code, 0, "a VMM without a VM became a primary");
    assert!(!err.is_empty());
    let (code, _, err) = remote(&sock2, &["ping"]);
    assert_eq!(code, 0, "the VMM without a VM died: {err}");
    assert!(empty.wait_exit(Duration::from_millis(100)).is_none());
    assert!(vmm.wait_exit(Duration::from_millis(100)).is_none());
}
