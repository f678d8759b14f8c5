//! `colovmm-remote` against a server with a fake control loop: output, exit codes, errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use api::fuzz::FakeVmm;
use api::{start_http_server, HttpServer};

struct Setup {
    dir: PathBuf,
    socket: PathBuf,
    _server: HttpServer,
    _vmm: FakeVmm,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("colovmm-remote-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let (tx, rx) = api::api_channel().unwrap();
    Setup {
        _vmm: FakeVmm::start(rx),
        _server: start_http_server(&socket, tx).unwrap(),
        socket,
        dir,
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn remote(socket: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_colovmm-remote"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn human_output() {
    let s = setup("human");
    let o = remote(&s.socket, &["ping"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.starts_with("colovmm 0.1.0-fake is up (pid "),
        "{}",
        o.stdout
    );

    let o = remote(&s.socket, &["info"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for want in [
        "state    Running",
        "memory   512 MiB",
        "vcpus    2",
        "disk     root: /img/root.raw (rw)",
        "  ID    KIND        BASE        IRQ",
        "  com1  serial      0x3f8       4",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in\n{}", o.stdout);
    }

    let o = remote(&s.socket, &["counters"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("DEVICE  COUNTER"), "{}", o.stdout);
    assert!(
        o.stdout.contains("root    read_bytes   4096"),
        "{}",
        o.stdout
    );

    for (cmd, msg) in [
        ("boot", "VM booted"),
        ("pause", "VM paused"),
        ("resume", "VM resumed"),
        ("reboot", "VM rebooted"),
        ("shutdown", "VM shut down"),
        ("shutdown-vmm", "VMM shutting down"),
    ] {
        let o = remote(&s.socket, &[cmd], None);
        assert_eq!((o.code, o.stdout.trim()), (0, msg), "{}", o.stderr);
    }
}

#[test]
fn json_output() {
    let s = setup("json");
    let o = remote(&s.socket, &["--json", "info"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let info: api::VmInfo = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(info.state, api::VmState::Running);
    let o = remote(&s.socket, &["boot", "--json"], None);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""));
}

#[test]
fn create_from_file_and_stdin() {
    let s = setup("create");
    let file = s.dir.join("vm.json");
    std::fs::write(&file, r#"{"payload":{"kernel":"/k"},"cpus":{"boot":2}}"#).unwrap();
    let o = remote(&s.socket, &["create", file.to_str().unwrap()], None);
    assert_eq!((o.code, o.stdout.trim()), (0, "VM created"), "{}", o.stderr);

    let o = remote(
        &s.socket,
        &["create", "-"],
        Some(r#"{"payload":{"kernel":"/k"}}"#),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);

    let o = remote(&s.socket, &["create", "-"], Some(r#"{"payload":{}}"#));
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("invalid VmConfig JSON") && o.stderr.contains("(HTTP 400)"),
        "{}",
        o.stderr
    );

    let o = remote(
        &s.socket,
        &["create", "-"],
        Some(r#"{"payload":{"kernel":"/conflict"}}"#),
    );
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("a VM already exists (HTTP 409)"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("caused by: created earlier"),
        "{}",
        o.stderr
    );

    let o = remote(&s.socket, &["create", "/nonexistent.json"], None);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("/nonexistent.json"), "{}", o.stderr);
}

#[test]
fn unreachable_server_and_bad_usage() {
    let o = remote(Path::new("/nonexistent/api.sock"), &["ping"], None);
    assert_eq!(o.code, 3);
    assert!(o.stderr.contains("cannot connect"), "{}", o.stderr);
    let o = remote(Path::new("/x"), &["frobnicate"], None);
    assert_eq!(o.code, 2);
}

#[test]
fn snapshot_restore_and_receive() {
    let s = setup("snapshot");
    for (args, msg) in [
        (
            ["snapshot", "file:///var/snap"],
            "VM snapshot written to file:///var/snap",
        ),
        (
            ["restore", "file:///var/snap"],
            "VM restored from file:///var/snap (paused)",
        ),
        (
            ["receive-migration", "tcp:0.0.0.0:6000"],
            "waiting for a migration on tcp:0.0.0.0:6000",
        ),
    ] {
        let o = remote(&s.socket, &args, None);
        assert_eq!((o.code, o.stdout.trim()), (0, msg), "{}", o.stderr);
    }

    let o = remote(&s.socket, &["snapshot", "file:///conflict"], None);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("the VM must be paused to snapshot it (HTTP 409)"),
        "{}",
        o.stderr
    );

    let o = remote(&s.socket, &["migration-status"], None);
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, "phase  idle"),
        "{}",
        o.stderr
    );
    let o = remote(&s.socket, &["migration-status", "--json"], None);
    let st: api::MigrationStatus = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(st.phase, api::MigrationPhase::Idle);
}

#[test]
fn bad_urls_and_values_are_refused_before_sending() {
    let s = setup("badargs");
    for (args, want) in [
        (
            &["snapshot", "/var/snap"][..],
            r#"invalid argument: destination_url "/var/snap": expected file:///DIR"#,
        ),
        (&["restore", "tcp:h:1"][..], r#"source_url "tcp:h:1""#),
        (
            &["send-migration", "file:///x"][..],
            "expected tcp:HOST:PORT or unix:PATH",
        ),
        (
            &["send-migration", "tcp:h:1", "--downtime-ms", "0"][..],
            "downtime_ms 0 is out of range 1..=60000",
        ),
        (
            &["send-migration", "tcp:h:1", "--channels", "17"][..],
            "channels 17 is out of range 1..=16",
        ),
        (&["receive-migration", "unix:m.sock"][..], "absolute PATH"),
    ] {
        let o = remote(&s.socket, args, None);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains(want), "{args:?}: {}", o.stderr);
    }
    let o = remote(
        &s.socket,
        &["send-migration", "tcp:h:1", "--channels", "-1"],
        None,
    );
    assert_eq!(o.code, 2, "clap refuses it: {}", o.stderr);
    let o = remote(&s.socket, &["migration-status"], None);
    assert_eq!(o.stdout.trim(), "phase  idle", "nothing was started");
}

#[test]
fn send_migration_without_waiting() {
    let s = setup("send");
    let o = remote(
        &s.socket,
        &[
            "send-migration",
            "unix:/run/m.sock",
            "--downtime-ms",
            "500",
            "--channels",
            "4",
        ],
        None,
    );
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, "migration to unix:/run/m.sock started"),
        "{}",
        o.stderr
    );
    let o = remote(&s.socket, &["send-migration", "tcp:10.0.0.2:6000"], None);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("a migration is already running (HTTP 409)"),
        "{}",
        o.stderr
    );
    let o = remote(&s.socket, &["migration-status"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for want in [
        "phase        active",
        "round        1",
        "transferred  256.0 MiB of 512.0 MiB (50%)",
        "dirty rate   64.0 MiB/s",
        "eta          800 ms",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in\n{}", o.stdout);
    }
}

#[test]
fn send_migration_waits_until_completed() {
    let s = setup("wait-ok");
    let start = std::time::Instant::now();
    let o = remote(
        &s.socket,
        &["send-migration", "tcp:10.0.0.2:6000", "--wait"],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.trim(),
        "migration completed: 548.0 MiB sent in 3 rounds, 800 ms, downtime 12.5 ms"
    );
    // Not a terminal: one progress line per round or phase change.
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", o.stderr);
    assert!(
        lines[0].starts_with("migration [############------------]  50%  round 1"),
        "{}",
        o.stderr
    );
    assert!(lines[0].contains("256.0 MiB/512.0 MiB  dirty 64.0 MiB/s  ETA 800 ms"));
    assert!(lines[1].contains("100%  round 2"), "{}", o.stderr);
    assert!(lines[2].ends_with("round 3  548.0 MiB/512.0 MiB  dirty 16.0 MiB/s  completed"));
    // Four polls, 200 ms apart.
    assert!(start.elapsed() >= std::time::Duration::from_millis(600));
}

#[test]
fn send_migration_waits_until_failed() {
    let s = setup("wait-fail");
    let o = remote(
        &s.socket,
        &["send-migration", "tcp:fail.example:6000", "--wait"],
        None,
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_eq!(o.stdout, "");
    assert!(
        o.stderr.trim_end().ends_with(
            "colovmm-remote: migration failed: sending round 2: connection reset by peer"
        ),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("round 2"), "{}", o.stderr);
    assert!(o.stderr.contains("failed"), "{}", o.stderr);
}

#[test]
fn send_migration_wait_json() {
    let s = setup("wait-json");
    let o = remote(
        &s.socket,
        &["--json", "send-migration", "unix:/run/m.sock", "--wait"],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stderr, "", "no progress bar with --json");
    let statuses: Vec<api::MigrationStatus> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(statuses.len(), 4);
    assert!(statuses[..3]
        .iter()
        .all(|s| s.phase == api::MigrationPhase::Active));
    let last = statuses.last().unwrap();
    assert_eq!(last.phase, api::MigrationPhase::Completed);
    assert_eq!(last.downtime_ms, Some(12.5));

    let s = setup("wait-json-fail");
    let o = remote(
        &s.socket,
        &["send-migration", "--json", "unix:/run/fail.sock", "--wait"],
        None,
    );
    assert_eq!(o.code, 1);
    let last: api::MigrationStatus =
        serde_json::from_str(o.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last.phase, api::MigrationPhase::Failed);
    assert!(
        o.stderr.contains("migration failed: sending round 2"),
        "{}",
        o.stderr
    );
}

#[test]
fn colo_commands() {
    let s = setup("colo");
    for (args, msg) in [
        (
            &["colo-start", "role=primary,peer=10.0.0.2:9000,channels=4"][..],
            "COLO started as primary, replicating to 10.0.0.2:9000",
        ),
        (
            &["colo-start", "role=secondary,listen=[::]:9000"][..],
            "COLO started as secondary, listening on [::]:9000",
        ),
        (
            &["colo-set", "--checkpoint-interval", "250"][..],
            "COLO checkpoint interval set to 250 ms",
        ),
        (&["colo-checkpoint"][..], "COLO checkpoint taken"),
        (
            &["colo-checkpoint", "--pause-after"][..],
            "COLO checkpoint taken; both VMs stay paused",
        ),
        (&["memory-checksum"][..], "crc32=0x1234abcd bytes=536870912"),
    ] {
        let o = remote(&s.socket, args, None);
        assert_eq!(
            (o.code, o.stdout.trim()),
            (0, msg),
            "{args:?}: {}",
            o.stderr
        );
    }

    let o = remote(&s.socket, &["colo-status"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for want in [
        "role            primary",
        "state           protected",
        "peer            10.0.0.2:9000",
        "checkpoints     42 (interval 30, divergence 10, initial 1, request 1)",
        "last reason     divergence",
        "interval        250 ms apart, 2 channels",
        "pause           last 12.5 ms, mean 10.2 ms, p99 25.0 ms, max 31.0 ms",
        "per checkpoint  mean 4.2 MiB (1075 pages); last #42 3.1 MiB (800 pages)",
        "phases (mean)   ack 1.9 ms, dirty_log 1.2 ms, pause 0.4 ms, send 6.8 ms",
        "phases (last)   ack 2.5 ms, dirty_log 1.5 ms, pause 0.5 ms, send 8.0 ms",
        "heartbeat       every 100 ms, timeout 1000 ms, last seen 20 ms ago",
        "proxy nic       tap0",
        "proxy           4800 mirrored; PVM 5120 / SVM 5118 packets, 1.0 MiB compared, 5119 \
         released (12 unmatched at a checkpoint), 10 mismatches, 0 timeouts, 0 overflows",
        "divergence      mismatch: tcp 10.0.0.9:40000 <-> 10.0.0.5:80: payload differs",
        "proxy channel   4842 frames sent, 5160 received, 0 dropped (queue full), 0 not injected",
        "disk 0          root, 1.0 GiB; sync done, 3.0 MiB of 3.0 MiB (3 of 1024 regions \
         differed); 812 writes replicated (406.0 KiB), 0 not",
        "disk channel    815 writes, 815 acknowledged; 816 frames sent, 816 received",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in\n{}", o.stdout);
    }
    assert!(!o.stdout.contains("exit"), "{}", o.stdout);

    let o = remote(&s.socket, &["colo-failover"], None);
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, "COLO failed over: the VM runs on alone"),
        "{}",
        o.stderr
    );
    let o = remote(&s.socket, &["colo-failover"], None);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("COLO has already failed over (HTTP 409)"),
        "{}",
        o.stderr
    );
    let o = remote(&s.socket, &["colo-status"], None);
    assert!(
        o.stdout.contains("state           failed-over"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains(
            "exit            failover requested, between checkpoints, after 42 checkpoints"
        ),
        "{}",
        o.stdout
    );

    let o = remote(&s.socket, &["--json", "colo-status"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["state"], "failed-over");
    let o = remote(&s.socket, &["memory-checksum", "--json"], None);
    let sum: api::MemoryChecksum = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(sum, api::fuzz::fake_vmm::SAMPLE_CHECKSUM);
    let o = remote(&s.socket, &["--json", "colo-checkpoint"], None);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""));

    let o = remote(
        &s.socket,
        &["colo-start", "role=secondary,listen=conflict:9000"],
        None,
    );
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("COLO is already running (HTTP 409)")
            && o.stderr.contains("caused by: started earlier as primary"),
        "{}",
        o.stderr
    );
}

#[test]
fn bad_colo_arguments_are_refused_before_sending() {
    let s = setup("colo-bad");
    for (args, want) in [
        (
            &["colo-start", "role=primary"][..],
            "invalid argument: --colo: missing peer: required with role primary",
        ),
        (
            &["colo-start", "role=primary,peer=h:1,peer=h:2"][..],
            "key 'peer' given more than once",
        ),
        (
            &["colo-start", "role=primary,peer=h:1,interval=5"][..],
            "unknown key 'interval'",
        ),
        (
            &["colo-start", "role=secondary,listen=h"][..],
            "invalid listen 'h': expected HOST:PORT; the :PORT is missing",
        ),
        (
            &["colo-start", "role=primary,peer=h:1,channels=99"][..],
            "invalid channels '99': expected 1 to 16",
        ),
        (
            &["colo-set"][..],
            "colo-set: nothing to set: give --checkpoint-interval MS",
        ),
        (
            &["colo-set", "--checkpoint-interval", "5"][..],
            "invalid argument: checkpoint_interval_ms 5 is out of range 10..=3600000",
        ),
    ] {
        let o = remote(&s.socket, args, None);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains(want), "{args:?}: {}", o.stderr);
    }
    let o = remote(&s.socket, &["colo-checkpoint", "--pause-after=yes"], None);
    assert_eq!(o.code, 2, "clap refuses it: {}", o.stderr);
    let o = remote(&s.socket, &["colo-status"], None);
    assert!(
        o.stdout.contains("interval        500 ms apart"),
        "nothing was set: {}",
        o.stdout
    );
}
