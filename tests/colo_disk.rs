//! COLO's block replication end to end on the test guest: a primary and a secondary colovmm
//! in two host namespaces of a [`TwoHostNet`], the guest appending `disk write` records to
//! its disk while protected (each confirmed on the primary's console after its write and a
//! flush):
//!
//! - the initial sync sends only the regions where the secondary's copy differs;
//! - at a checkpoint (both VMs paused after it) the secondary's copy is byte for byte the
//!   PVM's disk, and the FNV the PVM's guest computes over its device (`disk hash`) is the
//!   host's FNV of the secondary's copy;
//! - after a `kill -9` of the primary, the SVM's `disk check` (on its own console) shows every
//!   record the primary's console had confirmed before its last checkpoint began, in order,
//!   none torn, and the copy on the secondary's host holds them;
//! - after a `kill -9` of the secondary, the primary goes on writing and its disk holds every
//!   record it confirmed.
//!
//! Each test takes the [`SERIAL`] lock; the VMMs are SIGKILLed on drop before the namespaces
//! and the scratch directory go.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use integration_tests::colo::{is, path_arg, vmm_with, Events, PairFiles, Side};
use integration_tests::netns::{TwoHostNet, HOST_B_IP};
use integration_tests::{disk_record, fnv1a, wait_for, Console};
use serde_json::Value;

/// Held by every test for its whole run: one COLO pair on the machine at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const PORT: u16 = 9500;
const BOOT: Duration = Duration::from_secs(30);
const PROTECT: Duration = Duration::from_secs(60);
const NOTICE: Duration = Duration::from_secs(20);
/// The guest's disk.
const DISK: usize = 64 << 20;
const MIB: usize = 1 << 20;
const INTERVAL_MS: u64 = 300;

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A protected pair whose guest has one disk: the primary's image and the secondary's copy.
struct Pair {
    primary: Option<Console>,
    secondary: Option<Console>,
    net: TwoHostNet,
    files: PairFiles,
    image: PathBuf,
    copy: PathBuf,
    /// The SVM's console socket (the secondary's `--serial socket=`).
    svm_console: PathBuf,
}

impl Pair {
    /// The primary's image: the first 8 MiB random, the rest zeroes. The secondary's copy is
    /// `copy`'s content (none: absent, so created by the sync).
    /// `layers`: the secondary keeps the replica's layers in files there (else in memory).
    fn start(tag: &str, copy: impl FnOnce(&[u8]) -> Option<Vec<u8>>, layers: Option<&str>) -> Pair {
        let files = PairFiles::new(&format!("colo-disk-{tag}"));
        let image = files.dir.0.join("primary.img");
        let copy_path = files.dir.0.join("secondary-copy.img");
        let mut bytes = vec![0u8; DISK];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for chunk in bytes[MIB..8 * MIB].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        fs::write(&image, &bytes).expect("write the primary's image");
        if let Some(c) = copy(&bytes) {
            fs::write(&copy_path, c).expect("write the secondary's copy");
        }
        let svm_console = files.dir.0.join("svm-console.sock");
        let mut pair = Pair {
            primary: None,
            secondary: None,
            net: TwoHostNet::create(),
            files,
            image,
            copy: copy_path,
            svm_console,
        };
        let mut spec = format!("role=secondary,listen={HOST_B_IP}:{PORT}");
        if let Some(dir) = layers {
            spec.push_str(&format!(
                ",disk-layers={}",
                pair.files.dir.0.join(dir).display()
            ));
        }
        let disk = path_arg("path", &pair.copy);
        let mut args = pair.files.secondary_args(&spec, &["--disk", &disk]);
        // The SVM's console on a socket: after a failover the test types into it.
        if let Some(i) = args.iter().position(|a| a == "--serial") {
            args[i + 1] = path_arg("socket", &pair.svm_console);
        }
        pair.secondary = Some(vmm_with(&pair.net.b, &args));
        wait_for(&pair.files.ssock);
        if pair
            .files
            .sev
            .next(|e| is(e, "started"), Duration::from_secs(10))
            .is_none()
        {
            pair.fail("the secondary never reported COLO started");
        }
        let spec =
            format!("role=primary,peer={HOST_B_IP}:{PORT},checkpoint-interval={INTERVAL_MS}");
        let disk = path_arg("path", &pair.image);
        let args = pair.files.primary_args(&spec, &["--disk", &disk]);
        pair.primary = Some(vmm_with(&pair.net.a, &args));
        pair.p().expect_line("TESTGUEST READY", BOOT);
        wait_for(&pair.files.psock);
        for side in [Side::Primary, Side::Secondary] {
            match pair
                .files
                .events(side)
                .next(|e| is(e, "protected") || is(e, "colo_exit"), PROTECT)
            {
                Some(ev) if is(&ev, "protected") => {}
                Some(ev) => pair.fail(&format!(
                    "the {} ended COLO before it was protected: {ev}",
                    side.role()
                )),
                None => pair.fail(&format!(
                    "the {} never reported protected within {PROTECT:?}",
                    side.role()
                )),
            }
        }
        pair
    }

    fn p(&mut self) -> &mut Console {
        self.primary.as_mut().expect("primary started")
    }

    fn ask(&mut self, cmd: &str, prefix: &str) -> String {
        let line = self.p().ask(cmd, prefix);
        if !line.starts_with(prefix) {
            self.fail(&format!("{cmd:?} answered {line:?}"));
        }
        line
    }

    /// `disk write <seq>` on the primary; the time we read its confirmation.
    fn write_record(&mut self, seq: u64) -> f64 {
        let line = self.ask(&format!("disk write {seq}"), "disk write ");
        if !line.starts_with(&format!("disk write ok seq={seq}")) {
            self.fail(&format!("disk write {seq} answered {line:?}"));
        }
        now_epoch()
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

    fn vm_state(&self, side: Side) -> String {
        self.files.vm_state(side).unwrap_or_else(|e| self.fail(&e))
    }

    fn pid(&self, side: Side) -> i32 {
        let c = match side {
            Side::Primary => &self.primary,
            Side::Secondary => &self.secondary,
        };
        c.as_ref().expect("started").pid() as i32
    }

    fn kill(&self, side: Side) {
        // SAFETY: kill(2) on the pid of a child we own (reaped only when its Console drops).
        let rc = unsafe { libc::kill(self.pid(side), libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 of the {}", side.role());
    }

    fn wait_exit(&mut self, side: Side) -> Value {
        match self.files.events(side).next(|e| is(e, "colo_exit"), NOTICE) {
            Some(ev) => ev["properties"].clone(),
            None => self.fail(&format!("the {} never left COLO", side.role())),
        }
    }

    /// Types `cmd` on the SVM's console; returns the first line starting with `prefix`.
    fn svm_ask(&self, cmd: &str, prefix: &str) -> String {
        let mut s = UnixStream::connect(&self.svm_console)
            .unwrap_or_else(|e| self.fail(&format!("the SVM's console: {e}")));
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        writeln!(s, "{cmd}").unwrap_or_else(|e| self.fail(&format!("the SVM's console: {e}")));
        let mut lines = BufReader::new(s).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.trim_end().starts_with(prefix) => return l.trim_end().to_string(),
                Some(Ok(_)) => {}
                other => self.fail(&format!("the SVM never answered {cmd:?}: {other:?}")),
            }
        }
    }

    fn fail(&self, msg: &str) -> ! {
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        let tail = |text: String, n: usize| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let mut pev = Events::new(self.files.pev.path.clone());
        let mut sev = Events::new(self.files.sev.path.clone());
        pev.poll();
        sev.poll();
        let transcript = self
            .primary
            .as_ref()
            .map(|c| c.transcript[c.transcript.len().saturating_sub(10)..].join("\n"))
            .unwrap_or_default();
        panic!(
            "{msg}\n--- primary events ---\n{}\n--- secondary events ---\n{}\n--- primary console \
             ---\n{transcript}\n--- primary log ---\n{}\n--- secondary log ---\n{}",
            pev.tail(12),
            sev.tail(12),
            tail(read(&self.files.plog), 25),
            tail(read(&self.files.slog), 25)
        )
    }
}

/// The records at the start of `disk`'s log: (count, all of them `disk_record(i + 1, i)`).
fn records_in(disk: &[u8]) -> (u64, bool) {
    let mut n = 0u64;
    let mut in_order = true;
    while let Some(sector) = disk.get(512 * (1 + n as usize)..512 * (2 + n as usize)) {
        if &sector[..8] != b"CLVMREC1" {
            break;
        }
        in_order &= sector == &disk_record(n + 1, n)[..];
        n += 1;
    }
    (n, in_order)
}

/// The last checkpoint `events` report complete (applied, on a secondary).
fn last_checkpoint(events: &mut Events) -> u64 {
    events.poll();
    events
        .all
        .iter()
        .filter(|e| is(e, "checkpoint"))
        .filter_map(|e| e["properties"]["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// When the primary began checkpoint `seq` (paused the PVM for it).
fn began(primary: &mut Events, seq: u64) -> f64 {
    primary.poll();
    primary
        .all
        .iter()
        .find(|e| is(e, "checkpoint-started") && e["properties"]["seq"] == seq)
        .and_then(|e| e["timestamp"].as_f64())
        .unwrap_or(0.0)
}

#[test]
fn disk_records_survive_a_kill_9_of_the_primary() {
    let _serial = one_at_a_time();
    // The secondary holds an old copy: three regions differ.
    // Its layers in files: the failover merges from them (with its journal).
    let mut pair = Pair::start(
        "kill-primary",
        |img| {
            let mut c = img.to_vec();
            for r in [2, 5, 40] {
                c[r * MIB + 12_345] ^= 0x5a;
            }
            Some(c)
        },
        Some("layers"),
    );
    pair.files.pev.poll();
    let sync = pair
        .files
        .pev
        .all
        .iter()
        .rfind(|e| is(e, "disk-sync"))
        .map(|e| e["properties"].clone())
        .unwrap_or_else(|| pair.fail("no disk-sync event"));
    if sync["bytes_sent"] != 3 * MIB as u64
        || sync["regions_differing"] != 3
        || sync["done"] != true
    {
        pair.fail(&format!(
            "the initial sync should send the 3 differing MiB: {sync}"
        ));
    }

    // Records while protected; then a checkpoint with both VMs paused after it: the copy is
    // the PVM's disk, byte for byte.
    let mut seq = 0;
    for _ in 0..20 {
        seq += 1;
        pair.write_record(seq);
    }
    pair.files.pev.skip_to_end();
    pair.ok(Side::Primary, &["colo-checkpoint", "--pause-after"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pair.vm_state(Side::Primary) != "Paused" || pair.vm_state(Side::Secondary) != "Paused" {
        if Instant::now() > deadline {
            pair.fail("the pair never paused after the requested checkpoint");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let image = fs::read(&pair.image).expect("the primary's image");
    let copy = fs::read(&pair.copy).expect("the secondary's copy");
    if image != copy {
        let first = image.iter().zip(&copy).position(|(a, b)| a != b);
        pair.fail(&format!(
            "after a checkpoint the secondary's copy differs from the PVM's disk (first at byte \
             {first:?})"
        ));
    }
    assert_eq!(records_in(&copy), (seq, true), "the copy's log");
    pair.ok(Side::Secondary, &["resume"]);
    pair.ok(Side::Primary, &["resume"]);
    let guest_hash = pair.ask("disk hash", "disk hash=");
    let host_hash = format!("disk hash={:016x}", fnv1a(&copy));
    if guest_hash != host_hash {
        pair.fail(&format!(
            "the PVM's guest hashes its disk as {guest_hash}, the secondary's copy is {host_hash}"
        ));
    }

    // Records go on through interval checkpoints; the primary dies in the middle.
    let mut confirmed = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        seq += 1;
        confirmed.push((pair.write_record(seq), seq));
    }
    // Then a pause in the writing across a checkpoint, and a few records after it: the
    // primary dies before the next checkpoint can take them (300 ms away; they take ~20 ms),
    // so they must not be on the survivor's disk, which must match the SVM's memory.
    pair.files.pev.skip_to_end();
    if pair
        .files
        .pev
        .next(|e| is(e, "checkpoint"), Duration::from_secs(10))
        .is_none()
    {
        pair.fail("no checkpoint while the guest did not write");
    }
    for _ in 0..3 {
        seq += 1;
        confirmed.push((pair.write_record(seq), seq));
    }
    pair.kill(Side::Primary);
    let exit = pair.wait_exit(Side::Secondary);
    if exit["action"] != "continue" {
        pair.fail(&format!("the SVM did not take over: {exit}"));
    }
    // Confirmed (read by us) before the pause of the primary's last completed checkpoint: in
    // the state the SVM goes on from.
    let last = last_checkpoint(&mut pair.files.pev);
    let t_last = began(&mut pair.files.pev, last);
    let before = |t0: f64| {
        confirmed
            .iter()
            .filter(|&&(t, _)| t < t0)
            .map(|&(_, s)| s)
            .max()
            .unwrap_or(20)
    };
    let checkpointed = before(t_last);
    // The SVM goes on from the last checkpoint it applied: records started before that
    // pause, at most one more than those confirmed before it (the one in flight, which the
    // SVM finishes), and none of the PVM's later ones.
    let applied = last_checkpoint(&mut pair.files.sev);
    let at_most = before(began(&mut pair.files.pev, applied)) + 1;
    // The survivor's guest reads its disk: every record up to `checkpointed`, in order.
    let check = pair.svm_ask("disk check", "disk ");
    let Some(n) = check
        .strip_prefix("disk records=")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
    else {
        pair.fail(&format!("the SVM's disk check answered {check:?}"));
    };
    if !check.ends_with(" ok") || check != format!("disk records={n} last={n} ok") {
        pair.fail(&format!("the SVM's disk check: {check:?}"));
    }
    if n < checkpointed || n > at_most {
        pair.fail(&format!(
            "the SVM's disk has {n} records; the primary confirmed {checkpointed} before its last \
             completed checkpoint #{last} began, the SVM applied #{applied} (at most {at_most} \
             records), {seq} in all"
        ));
    }
    // And the copy on the secondary's host has them, each exactly as written.
    let (on_host, in_order) = records_in(&fs::read(&pair.copy).expect("the copy"));
    if on_host != n || !in_order {
        pair.fail(&format!(
            "the secondary's copy holds {on_host} records (in order: {in_order}), the SVM sees {n}"
        ));
    }
    // The merge left its layers empty and no journal behind.
    let layers = pair.files.dir.0.join("layers/disk0");
    if layers.join("merge.journal").exists() {
        pair.fail("a merge journal is left after the failover");
    }
    for layer in ["hidden.index", "active.index"] {
        if !layers.join(layer).exists() {
            pair.fail(&format!("no {layer} in {}", layers.display()));
        }
    }
    eprintln!(
        "   SVM after the failover: {n} records; the primary confirmed {seq}, {checkpointed} \
         before checkpoint #{last}, at most {at_most} by #{applied}"
    );
}

#[test]
fn the_primary_goes_on_with_its_disk_after_a_kill_9_of_the_secondary() {
    let _serial = one_at_a_time();
    // No copy on the secondary: the sync creates it and sends only what is not zero.
    let mut pair = Pair::start("kill-secondary", |_| None, None);
    pair.files.pev.poll();
    let sent = pair
        .files
        .pev
        .all
        .iter()
        .rfind(|e| is(e, "disk-sync"))
        .map(|e| e["properties"]["bytes_sent"].clone());
    if sent != Some(Value::from(7 * MIB as u64)) {
        pair.fail(&format!(
            "the sync of a created copy should send the 7 MiB that are not zero: {sent:?}"
        ));
    }
    let mut seq = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        seq += 1;
        pair.write_record(seq);
    }
    pair.kill(Side::Secondary);
    // Writes in flight when it died complete; the primary leaves COLO and goes on.
    for _ in 0..5 {
        seq += 1;
        pair.write_record(seq);
    }
    let exit = pair.wait_exit(Side::Primary);
    if exit["action"] != "continue" {
        pair.fail(&format!("the primary did not go on: {exit}"));
    }
    for _ in 0..5 {
        seq += 1;
        pair.write_record(seq);
    }
    let check = pair.ask("disk check", "disk ");
    if check != format!("disk records={seq} last={seq} ok") {
        pair.fail(&format!(
            "after {seq} writes the PVM's disk check says {check:?}"
        ));
    }
    let status = pair.json(Side::Primary, &["colo-status"]);
    let mirror = &status["disks"]["disks"][0]["mirror"];
    if mirror["detached"] != true {
        pair.fail(&format!("the mirror should have left the disk: {status}"));
    }
    // The image holds every record as written.
    let (n, in_order) = records_in(&fs::read(&pair.image).expect("the image"));
    if (n, in_order) != (seq, true) {
        pair.fail(&format!(
            "the primary's image holds {n} records (in order: {in_order}) of {seq}"
        ));
    }
}
