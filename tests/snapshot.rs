//! Snapshot and restore with the test guest: pause, snapshot, kill the VMM, restore in a new
//! one; the guest's counter continues with no gap and no repeat, its uptime did not restart,
//! its disk keeps working; bad snapshots are refused with a clear error.

use std::process::Command;
use std::time::Duration;

use integration_tests::{count_of, remote, remote_ok, testguest, wait_for, Console, Scratch};

fn uptime(vm: &mut Console) -> u64 {
    vm.ask("uptime", "uptime_ms=")
        .trim_start_matches("uptime_ms=")
        .parse()
        .unwrap()
}

#[test]
fn restored_guest_continues_where_it_stopped() {
    let dir = Scratch::new("snap");
    let disk = dir.0.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let sock = dir.0.join("api.sock");
    let snap_url = format!("file://{}", dir.0.join("snap").display());
    let mut vm = Console::colovmm(&[
        "--kernel",
        testguest().to_str().unwrap(),
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M",
        "--disk",
        &format!("path={}", disk.display()),
        "--api-socket",
        &format!("path={}", sock.display()),
    ]);
    vm.expect_line("TESTGUEST READY", Duration::from_secs(20));
    assert!(vm
        .ask("disk write 1", "disk write")
        .starts_with("disk write ok"));
    let up_before = uptime(&mut vm);
    let hash_before = vm.ask("hash 64 64", "hash=");
    vm.send("count 50");
    vm.expect_line("count=3", Duration::from_secs(5));
    remote_ok(&sock, &["pause"]);
    // Everything the guest printed before the pause took effect.
    let mut last = 3;
    while let Some(l) = vm.wait_line(|l| l.starts_with("count="), Duration::from_millis(300)) {
        last = count_of(&l);
    }
    remote_ok(&sock, &["snapshot", &snap_url]);
    drop(vm); // SIGKILL: the snapshot is all that is left

    let sock2 = dir.0.join("api2.sock");
    let mut vm = Console::colovmm(&[
        "--restore",
        &format!("source_url={snap_url}"),
        "--api-socket",
        &format!("path={}", sock2.display()),
    ]);
    let next = count_of(&vm.expect_line("count=", Duration::from_secs(20)));
    assert_eq!(
        next,
        last + 1,
        "the counter must continue with no gap and no repeat"
    );
    vm.send("count 0");
    vm.expect_line("count ok", Duration::from_secs(5));
    let up_after = uptime(&mut vm);
    assert!(
        up_after >= up_before && up_after < up_before + 10_000,
        "uptime {up_before} ms before, {up_after} ms after the restore"
    );
    assert_eq!(
        vm.ask("hash 64 64", "hash="),
        hash_before,
        "memory came back intact"
    );
    assert_eq!(vm.ask("disk check", "disk "), "disk records=1 last=1 ok");
    assert!(vm
        .ask("disk write 2", "disk write")
        .starts_with("disk write ok"));
    assert_eq!(vm.ask("cpus", "cpus="), "cpus=2");
    wait_for(&sock2);
    remote_ok(&sock2, &["shutdown-vmm"]);
    assert!(vm
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
}

#[test]
fn a_running_vm_cannot_be_snapshotted_and_bad_snapshots_are_refused() {
    let dir = Scratch::new("snapbad");
    let sock = dir.0.join("api.sock");
    let mut vm = Console::colovmm(&[
        "--kernel",
        testguest().to_str().unwrap(),
        "--memory",
        "size=128M",
        "--api-socket",
        &format!("path={}", sock.display()),
    ]);
    vm.expect_line("TESTGUEST READY", Duration::from_secs(20));
    let url = format!("file://{}", dir.0.join("s").display());
    let (code, _, err) = remote(&sock, &["snapshot", &url]);
    assert_ne!(code, 0);
    assert!(err.contains("409") && err.contains("paused"), "{err}");
    remote_ok(&sock, &["pause"]);
    remote_ok(&sock, &["snapshot", &url]);
    let (code, _, err) = remote(&sock, &["snapshot", &url]);
    assert_ne!(code, 0, "a second snapshot into the same directory");
    assert!(err.contains("already holds a snapshot"), "{err}");
    remote_ok(&sock, &["resume"]);
    assert_eq!(vm.ask("cpus", "cpus="), "cpus=1", "the VM runs on");
    drop(vm);

    // A truncated memory file and a corrupted state file: clear errors, exit 1.
    let snap = dir.0.join("s");
    let mem = snap.join("memory");
    let len = std::fs::metadata(&mem).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(len - 4096).unwrap();
    let out = Command::new(integration_tests::colovmm_bin())
        .args(["--restore", &format!("source_url={url}"), "--serial", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("memory file is"), "{err}");
    std::fs::write(snap.join("state.json"), b"{\"version\": 1, \"config\": 7}").unwrap();
    let out = Command::new(integration_tests::colovmm_bin())
        .args(["--restore", &format!("source_url={url}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a colovmm snapshot"), "{err}");
}
