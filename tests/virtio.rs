//! virtio-blk and virtio-net with the test guest: bytes on the guest's disk as the host reads
//! them, and a client in another network namespace talking to the guest's services.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::netns::{wait_for_ping, TestNet, GUEST_IP};
use integration_tests::{colovmm_bin, disk_record as record, testguest, Console, Scratch};

const BOOT: Duration = Duration::from_secs(20);

fn boot_with_disks(a: &Path, b: &Path) -> Console {
    let mut vm = Console::colovmm(&[
        "--kernel",
        testguest().to_str().unwrap(),
        "--memory",
        "size=256M",
        "--disk",
        &format!("path={}", a.display()),
        &format!("path={},readonly=on", b.display()),
    ]);
    vm.expect_line("TESTGUEST READY", BOOT);
    vm
}

#[test]
fn disk_records_reach_the_image_survive_a_reboot_and_readonly_refuses() {
    let dir = Scratch::new("blk");
    let a = dir.image("a.img", 4 << 20);
    let b = dir.image("b.img", 1 << 20);

    let mut vm = boot_with_disks(&a, &b);
    assert_eq!(vm.ask("disks", "disks="), "disks=2 0:8192 1:2048:ro");
    for seq in [100u64, 101, 102] {
        let ok = vm.ask(&format!("disk write {seq}"), "disk write");
        assert!(ok.starts_with(&format!("disk write ok seq={seq}")), "{ok}");
    }
    assert_eq!(vm.ask("disk check", "disk "), "disk records=3 last=102 ok");
    let refused = vm.ask("disk write 7 1", "error");
    assert!(refused.starts_with("error io"), "{refused}");
    vm.send("poweroff");
    assert!(vm
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());

    // The host sees exactly the records the guest wrote, one per sector from sector 1.
    let image = std::fs::read(&a).unwrap();
    for (index, seq) in [100u64, 101, 102].iter().enumerate() {
        let at = 512 * (1 + index);
        assert_eq!(
            &image[at..at + 512],
            &record(*seq, index as u64)[..],
            "record {index}"
        );
    }
    assert!(
        image[512 * 4..].iter().all(|b| *b == 0),
        "nothing past the log"
    );
    assert!(
        std::fs::read(&b).unwrap().iter().all(|b| *b == 0),
        "read-only disk untouched"
    );

    // A new boot finds the log and appends to it.
    let mut vm = boot_with_disks(&a, &b);
    assert_eq!(vm.ask("disk check", "disk "), "disk records=3 last=102 ok");
    assert!(vm
        .ask("disk write 103", "disk write")
        .starts_with("disk write ok seq=103"));
    assert_eq!(vm.ask("disk check", "disk "), "disk records=4 last=103 ok");
    let h1 = vm.ask("disk hash", "disk hash=");
    vm.send("poweroff");
    assert!(vm
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
    assert_eq!(
        &std::fs::read(&a).unwrap()[512 * 4..512 * 5],
        &record(103, 3)[..]
    );
    assert!(h1.len() > "disk hash=".len());
}

#[test]
fn a_corrupted_record_is_reported() {
    let dir = Scratch::new("blkbad");
    let a = dir.image("a.img", 1 << 20);
    let b = dir.image("b.img", 1 << 20);
    let mut vm = boot_with_disks(&a, &b);
    for seq in 1..=3 {
        vm.ask(&format!("disk write {seq}"), "disk write ok");
    }
    vm.send("poweroff");
    assert!(vm
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xff], 512 * 2 + 100).unwrap(); // inside record 1's payload
    drop(f);
    let mut vm = boot_with_disks(&a, &b);
    let check = vm.ask("disk check", "disk ");
    assert!(check.contains("bad sector=2"), "{check}");
}

/// colovmm on the test guest with one NIC on the namespace's tap.
fn boot_with_net(net: &TestNet) -> Console {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.host])
        .arg(colovmm_bin())
        .args(["--kernel", testguest().to_str().unwrap()])
        .args(["--memory", "size=512M", "--cpus", "boot=2"])
        .args(["--net", &format!("tap={}", net.tap)]);
    let mut vm = Console::spawn(cmd);
    vm.expect_line("TESTGUEST READY", BOOT);
    vm
}

fn client_output(net: &TestNet, program: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = net
        .client_cmd(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn client_reaches_echo_http_and_redis() {
    let net = TestNet::create();
    let mut vm = boot_with_net(&net);
    wait_for_ping(&net.client, Duration::from_secs(10));
    client_output(
        &net,
        "ping",
        &["-c", "5", "-i", "0.2", "-W", "2", GUEST_IP],
        b"",
    );

    let echoed = client_output(
        &net,
        "nc",
        &["-N", "-w", "5", GUEST_IP, "7"],
        b"hello colo\n",
    );
    assert_eq!(echoed, b"hello colo\n");

    let page = client_output(
        &net,
        "curl",
        &["-sS", "--max-time", "10", &format!("http://{GUEST_IP}/")],
        b"",
    );
    assert!(String::from_utf8_lossy(&page).contains("testguest"));

    // 64 MiB: byte i is i % 251 (guest/README.md).
    let n = 64u64 << 20;
    let body = client_output(
        &net,
        "curl",
        &[
            "-sS",
            "--max-time",
            "120",
            &format!("http://{GUEST_IP}/bytes/{n}"),
        ],
        b"",
    );
    assert_eq!(body.len() as u64, n);
    let bad = body
        .iter()
        .enumerate()
        .position(|(i, b)| *b != (i % 251) as u8);
    assert_eq!(bad, None, "first wrong byte");

    let redis = |args: &[&str]| {
        let mut a = vec!["-h", GUEST_IP, "-p", "6379"];
        a.extend_from_slice(args);
        String::from_utf8(client_output(&net, "redis-cli", &a, b"")).unwrap()
    };
    assert_eq!(redis(&["PING"]).trim(), "PONG");
    assert_eq!(redis(&["SET", "colo", "replicated"]).trim(), "OK");
    assert_eq!(redis(&["GET", "colo"]).trim(), "replicated");
    assert_eq!(redis(&["INCR", "hits"]).trim(), "1");
    assert_eq!(redis(&["INCR", "hits"]).trim(), "2");
    let kv = client_output(
        &net,
        "curl",
        &["-sS", &format!("http://{GUEST_IP}/kv/colo")],
        b"",
    );
    assert_eq!(kv, b"replicated");
    assert_eq!(redis(&["DEL", "colo"]).trim(), "1");

    // The console kept answering throughout.
    assert_eq!(vm.ask("cpus", "cpus="), "cpus=2");
}

#[test]
fn an_rx_flood_does_not_wedge_the_vmm() {
    let net = TestNet::create();
    let mut vm = boot_with_net(&net);
    wait_for_ping(&net.client, Duration::from_secs(10));
    // 3 s of back-to-back UDP at the guest's echo port from the client: bounded in time.
    let flood = r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
end = time.time() + 3
payload = b"x" * 1400
sent = 0
while time.time() < end:
    try:
        s.sendto(payload, ("192.168.100.2", 7)); sent += 1
    except BlockingIOError:
        pass
print(sent)
"#;
    let out = client_output(&net, "python3", &["-c", flood], b"");
    let sent: u64 = String::from_utf8_lossy(&out).trim().parse().unwrap();
    assert!(sent > 1000, "the flood sent only {sent} datagrams");
    // Afterwards: the guest still serves TCP and the console, and the VMM is alive.
    let echoed = client_output(
        &net,
        "nc",
        &["-N", "-w", "5", GUEST_IP, "7"],
        b"still here\n",
    );
    assert_eq!(echoed, b"still here\n");
    assert_eq!(vm.ask("cpus", "cpus="), "cpus=2");
    let stats = vm.ask("net", "mac=");
    assert!(stats.contains("rx_packets="), "{stats}");
}
