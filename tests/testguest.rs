//! The test guest under colovmm: boot, SMP, the console contract, power-off and crash paths.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use integration_tests::{testguest, Console};

const BOOT: Duration = Duration::from_secs(20);

fn value(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

fn boot(cpus: u8, mem: &str) -> Console {
    let mut vm = Console::testguest(cpus, mem, "");
    vm.expect_line("TESTGUEST READY", BOOT);
    vm
}

#[test]
fn ready_with_one_vcpu() {
    let mut vm = Console::testguest(1, "256M", "");
    let ready = vm.expect_line("TESTGUEST READY", BOOT);
    assert_eq!(value(&ready, "cpus"), "1", "{ready}");
    assert_eq!(value(&ready, "mem_mib"), "256", "{ready}");
    assert_eq!(vm.ask("cpus", "cpus="), "cpus=1");
}

#[test]
fn ready_with_two_vcpus() {
    let mut vm = Console::testguest(2, "512M", "");
    let ready = vm.expect_line("TESTGUEST READY", BOOT);
    assert_eq!(value(&ready, "cpus"), "2", "{ready}");
    assert_eq!(value(&ready, "mem_mib"), "512", "{ready}");
    assert_eq!(vm.ask("cpus", "cpus="), "cpus=2");
}

#[test]
fn uptime_advances_with_wall_clock() {
    let mut vm = boot(1, "128M");
    let a: u64 = value(&vm.ask("uptime", "uptime_ms="), "uptime_ms")
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let b: u64 = value(&vm.ask("uptime", "uptime_ms="), "uptime_ms")
        .parse()
        .unwrap();
    assert!(
        b >= a + 400 && b < a + 5000,
        "uptime {a} then {b} after 500 ms"
    );
}

#[test]
fn hash_is_stable_until_memory_is_dirtied() {
    let mut vm = boot(2, "256M");
    // The dirtier's working set sits in free RAM above the guest's image and heap.
    let h1 = vm.ask("hash 64 128", "hash=");
    let h2 = vm.ask("hash 64 128", "hash=");
    assert_eq!(h1, h2, "an untouched range must hash the same twice");
    assert_eq!(vm.ask("dirty 100 32", "dirty"), "dirty ok");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.ask("dirty 0 0", "dirty"), "dirty ok");
    let h3 = vm.ask("hash 64 128", "hash=");
    assert_ne!(h1, h3, "dirtying must change the hash");
    // Stopped dirtier: stable again.
    assert_eq!(h3, vm.ask("hash 64 128", "hash="));
    assert!(vm.ask("hash 250 100", "error").starts_with("error"));
}

#[test]
fn count_strictly_increases() {
    let mut vm = boot(1, "128M");
    assert_eq!(vm.ask("count 50", "count ok"), "count ok");
    let mut last = 0u64;
    let start = Instant::now();
    for _ in 0..8 {
        let line = vm.expect_line("count=", Duration::from_secs(5));
        let k: u64 = value(&line, "count").parse().unwrap();
        assert!(k > last, "count went from {last} to {k}");
        last = k;
    }
    // 8 ticks at 50 ms: well under the 5 s a stalled guest would take.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    vm.send("count 0");
    vm.expect_line("count ok", Duration::from_secs(5));
}

#[test]
fn poweroff_exits_zero_quickly() {
    let mut vm = boot(2, "128M");
    vm.send("poweroff");
    let start = Instant::now();
    let status = vm
        .wait_exit(Duration::from_secs(10))
        .expect("colovmm exits");
    assert!(status.success(), "exit {status:?}: {}", vm.stderr());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn crash_exits_nonzero_with_registers() {
    let mut vm = boot(2, "128M");
    vm.send("crash");
    let status = vm
        .wait_exit(Duration::from_secs(10))
        .expect("colovmm exits, no hang");
    assert_eq!(status.code(), Some(2), "{}", vm.stderr());
    let err = vm.stderr();
    assert!(
        err.contains("triple fault") && err.contains("rip="),
        "{err}"
    );
}

#[test]
fn serial_to_a_file() {
    let dir = std::env::temp_dir().join(format!("colovmm-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("console.log");
    let kernel = testguest();
    let vm = Console::colovmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "size=128M",
        "--serial",
        &format!("file={}", log.display()),
    ]);
    let deadline = Instant::now() + BOOT;
    let mut text = String::new();
    while Instant::now() < deadline && !text.contains("TESTGUEST READY") {
        std::thread::sleep(Duration::from_millis(50));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    drop(vm);
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        text.contains("TESTGUEST READY cpus=1 mem_mib=128"),
        "{text}"
    );
}

#[test]
fn serial_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("colovmm-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("console.sock");
    let mut vm = Console::colovmm(&[
        "--kernel",
        testguest().to_str().unwrap(),
        "--memory",
        "size=128M",
        "--serial",
        &format!("socket={}", sock.display()),
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    stream.set_read_timeout(Some(BOOT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    // READY may have been printed before we connected; a command proves the path both ways.
    let mut answer = String::new();
    let start = Instant::now();
    while !answer.starts_with("cpus=") && start.elapsed() < BOOT {
        writer.write_all(b"cpus\n").unwrap();
        answer.clear();
        loop {
            answer.clear();
            if reader.read_line(&mut answer).unwrap_or(0) == 0 || answer.starts_with("cpus=") {
                break;
            }
        }
    }
    assert_eq!(answer.trim_end(), "cpus=1");
    writer.write_all(b"poweroff\n").unwrap();
    let status = vm.wait_exit(Duration::from_secs(10)).expect("exits");
    std::fs::remove_dir_all(&dir).ok();
    assert!(status.success());
}
