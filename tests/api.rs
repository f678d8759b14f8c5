//! The HTTP API with a real guest, driven through `colovmm-remote`: create and boot, pause (the
//! guest's counter stops), resume (it goes on), info, counters that move with disk traffic,
//! shutdown; and a few thousand malformed requests while the guest keeps counting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{count_of, remote, remote_ok as ok, testguest, wait_for, Console, Scratch};

/// colovmm with only an API socket, then the test guest created and booted through it.
fn api_vm(dir: &Scratch, disk: Option<&Path>) -> (Console, PathBuf) {
    let sock = dir.0.join("api.sock");
    let events = dir.0.join("events.jsonl");
    let mut vm = Console::colovmm(&[
        "--api-socket",
        &format!("path={}", sock.display()),
        "--event-monitor",
        &format!("path={}", events.display()),
    ]);
    wait_for(&sock);
    ok(&sock, &["ping"]);
    let mut config = serde_json::json!({
        "payload": {"kernel": testguest()},
        "memory": {"size": 256u64 << 20},
        "cpus": {"boot": 2},
    });
    if let Some(d) = disk {
        config["disks"] = serde_json::json!([{"path": d}]);
    }
    let cfg = dir.0.join("vm.json");
    std::fs::write(&cfg, config.to_string()).unwrap();
    ok(&sock, &["create", cfg.to_str().unwrap()]);
    ok(&sock, &["boot"]);
    vm.expect_line("TESTGUEST READY", Duration::from_secs(20));
    (vm, sock)
}

#[test]
fn lifecycle_through_colovmm_remote() {
    let dir = Scratch::new("api");
    let disk = dir.0.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let (mut vm, sock) = api_vm(&dir, Some(&disk));

    let info = ok(&sock, &["info", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    assert!(info["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["kind"] == "virtio-blk"));

    // Pause: the counter stops advancing.
    vm.send("count 20");
    vm.expect_line("count=3", Duration::from_secs(5));
    ok(&sock, &["pause"]);
    let paused = ok(&sock, &["info", "--json"]);
    assert!(paused.contains("\"Paused\""), "{paused}");
    // Drain what was printed before the pause took effect, then expect silence.
    let last_before = std::iter::from_fn(|| {
        vm.wait_line(|l| l.starts_with("count="), Duration::from_millis(300))
    })
    .last()
    .map(|l| count_of(&l))
    .unwrap_or(3);
    assert!(
        vm.wait_line(|l| l.starts_with("count="), Duration::from_millis(600))
            .is_none(),
        "the guest kept counting while paused"
    );
    let (code, _, err) = remote(&sock, &["pause"]);
    assert_ne!(code, 0);
    assert!(err.contains("409"), "{err}");

    // Resume: it goes on from where it was, no repeat.
    ok(&sock, &["resume"]);
    let next = count_of(&vm.expect_line("count=", Duration::from_secs(5)));
    assert!(
        next > last_before,
        "count went from {last_before} to {next}"
    );
    vm.send("count 0");

    // Counters move with disk traffic.
    let before: serde_json::Value =
        serde_json::from_str(&ok(&sock, &["counters", "--json"])).unwrap();
    assert!(vm
        .ask("disk write 1", "disk write")
        .starts_with("disk write ok"));
    let after: serde_json::Value =
        serde_json::from_str(&ok(&sock, &["counters", "--json"])).unwrap();
    let writes = |v: &serde_json::Value| v["disk0"]["write_ops"].as_u64().unwrap();
    assert!(writes(&after) > writes(&before), "{before} -> {after}");
    assert!(ok(&sock, &["counters"]).contains("write_bytes"));

    // Shutdown: the VM stops, the VMM stays until vmm.shutdown.
    ok(&sock, &["shutdown"]);
    assert!(ok(&sock, &["info", "--json"]).contains("\"Shutdown\""));
    let (code, _, err) = remote(&sock, &["resume"]);
    assert_ne!(code, 0, "resume after shutdown");
    assert!(err.contains("409"), "{err}");
    ok(&sock, &["shutdown-vmm"]);
    let status = vm.wait_exit(Duration::from_secs(10)).expect("VMM exits");
    assert!(status.success());
    assert!(!sock.exists(), "the API socket is removed at exit");

    // The event stream told the story, one JSON object per line, in order.
    let events: Vec<(String, String)> = std::fs::read_to_string(dir.0.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["timestamp"].as_f64().unwrap() > 1.6e9, "{l}");
            (
                v["source"].as_str().unwrap().to_string(),
                v["event"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(
        names,
        ["started", "created", "booted", "paused", "resumed", "shutdown", "shutdown"],
        "{events:?}"
    );
    assert_eq!(events.last().unwrap().0, "vmm");
}

#[test]
fn reboot_through_the_api_boots_again() {
    let dir = Scratch::new("apireboot");
    let (mut vm, sock) = api_vm(&dir, None);
    ok(&sock, &["reboot"]);
    vm.expect_line("TESTGUEST READY", Duration::from_secs(20));
    assert_eq!(
        vm.ask("cpus", "cpus="),
        "cpus=2",
        "console follows the new VM"
    );
    ok(&sock, &["shutdown-vmm"]);
    assert!(vm
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
}

#[test]
fn bad_requests_while_the_guest_runs() {
    let dir = Scratch::new("apifuzz");
    let (mut vm, sock) = api_vm(&dir, None);
    vm.send("count 50");
    vm.expect_line("count=2", Duration::from_secs(5));
    let pid = Some(vm.pid());
    // Warm up allocator arenas and worker threads before the baseline.
    api::fuzz::run(&sock, 1, 200, Duration::from_secs(15))
        .expect("warm-up replies are well-formed");
    let base = api::fuzz::proc_stats(pid).unwrap();
    let report = api::fuzz::run(&sock, 0xc0105eed, 3000, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("a malformed request was mishandled: {e}"));
    // Cases that hang up before a reply have none to check; every other reply passed.
    assert_eq!(report.cases, 3000);
    assert!(report.replies > 2000, "{report:?}");
    let after = api::fuzz::proc_stats(pid).unwrap();
    assert_eq!(after.threads, base.threads, "threads leaked");
    assert!(
        after.fds <= base.fds + 2,
        "descriptors leaked: {base:?} -> {after:?}"
    );
    assert!(
        after.rss_kib < base.rss_kib + 16 * 1024,
        "RSS grew from {} to {} KiB",
        base.rss_kib,
        after.rss_kib
    );
    // The guest kept counting throughout, and the API still answers.
    let a = count_of(&vm.expect_line("count=", Duration::from_secs(5)));
    let b = count_of(&vm.expect_line("count=", Duration::from_secs(5)));
    assert!(b > a);
    ok(&sock, &["ping"]);
    ok(&sock, &["shutdown-vmm"]);
    assert!(vm
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
}
