//! Live migration between two colovmm processes in two network namespaces, with the test guest
//! counting, dirtying memory, holding records on disk and serving a client's open TCP
//! connection; and the failure paths: a destination killed mid-way, a corrupted stream.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use integration_tests::netns::{wait_for_ping, TwoHostNet, GUEST_IP, HOST_B_IP};
use integration_tests::{
    colovmm_bin, count_of, remote, remote_ok as ok, testguest, wait_for, Console, Scratch,
};

fn vmm_in(ns: &str, args: &[&str]) -> Console {
    let mut cmd = TwoHostNet::cmd_in(ns, colovmm_bin().to_str().unwrap());
    cmd.args(args);
    Console::spawn(cmd)
}

/// A TCP connection from the client namespace, kept open across the migration.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn connect(net: &TwoHostNet) -> Client {
        // One line in, its echo out, for every line: the connection itself never closes.
        let code = format!(
            r#"
import socket, sys
s = socket.create_connection(("{GUEST_IP}", 7), timeout=60)
for line in sys.stdin:
    s.sendall(line.encode())
    got = b""
    while not got.endswith(b"\n"):
        got += s.recv(4096)
    print(got.decode().strip(), flush=True)
"#
        );
        let mut child = TwoHostNet::cmd_in(&net.client, "python3")
            .args(["-u", "-c", &code])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Client {
            child,
            stdin,
            stdout,
        }
    }

    fn echo(&mut self, text: &str) -> String {
        writeln!(self.stdin, "{text}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_busy_guest_migrates_with_its_disk_and_tcp_connection() {
    let net = TwoHostNet::create();
    let dir = Scratch::new("mig");
    let disk = dir.0.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let (src_sock, dst_sock) = (dir.0.join("src.sock"), dir.0.join("dst.sock"));

    let mut dst = vmm_in(
        &net.b,
        &["--api-socket", &format!("path={}", dst_sock.display())],
    );
    let mut src = vmm_in(
        &net.a,
        &[
            "--kernel",
            testguest().to_str().unwrap(),
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "--disk",
            &format!("path={}", disk.display()),
            "--net",
            "tap=tap0",
            "--api-socket",
            &format!("path={}", src_sock.display()),
        ],
    );
    src.expect_line("TESTGUEST READY", Duration::from_secs(20));
    wait_for(&src_sock);
    wait_for(&dst_sock);
    wait_for_ping(&net.client, Duration::from_secs(15));

    let mut client = Client::connect(&net);
    assert_eq!(client.echo("before the move"), "before the move");
    assert!(src
        .ask("disk write 1", "disk write")
        .starts_with("disk write ok"));
    // The dirtier works in [64, 320) MiB; [400, 464) MiB stays untouched.
    let untouched = src.ask("hash 400 64", "hash=");
    assert_eq!(src.ask("dirty 200 256", "dirty"), "dirty ok");
    src.send("count 50");
    src.expect_line("count=5", Duration::from_secs(5));

    ok(
        &dst_sock,
        &["receive-migration", &format!("tcp:{HOST_B_IP}:7777")],
    );
    let summary = ok(
        &src_sock,
        &["send-migration", &format!("tcp:{HOST_B_IP}:7777"), "--wait"],
    );
    assert!(summary.contains("completed"), "{summary}");

    // The last count the source printed, then the first one the destination prints.
    let mut last = 5;
    while let Some(l) = src.wait_line(|l| l.starts_with("count="), Duration::from_millis(300)) {
        last = count_of(&l);
    }
    let first = count_of(&dst.expect_line("count=", Duration::from_secs(10)));
    assert_eq!(first, last + 1, "no gap and no repeat across the move");

    assert!(
        ok(&src_sock, &["info", "--json"]).contains("\"Shutdown\""),
        "source stopped"
    );
    assert!(ok(&dst_sock, &["info", "--json"]).contains("\"Running\""));
    let status = ok(&src_sock, &["migration-status", "--json"]);
    assert!(status.contains("\"completed\""), "{status}");

    assert_eq!(dst.ask("dirty 0 0", "dirty"), "dirty ok");
    assert_eq!(
        dst.ask("hash 400 64", "hash="),
        untouched,
        "untouched memory moved intact"
    );
    assert_eq!(dst.ask("disk check", "disk "), "disk records=1 last=1 ok");
    assert!(dst
        .ask("disk write 2", "disk write")
        .starts_with("disk write ok"));
    // The same TCP connection, now answered by the guest on host B.
    assert_eq!(client.echo("after the move"), "after the move");

    ok(&dst_sock, &["shutdown-vmm"]);
    ok(&src_sock, &["shutdown-vmm"]);
    assert!(dst
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
    assert!(src
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
}

#[test]
fn killing_the_destination_leaves_the_source_running() {
    let net = TwoHostNet::create();
    let dir = Scratch::new("migkill");
    let (src_sock, dst_sock) = (dir.0.join("src.sock"), dir.0.join("dst.sock"));
    let dst = vmm_in(
        &net.b,
        &["--api-socket", &format!("path={}", dst_sock.display())],
    );
    let mut src = vmm_in(
        &net.a,
        &[
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            "size=1G",
            "--api-socket",
            &format!("path={}", src_sock.display()),
        ],
    );
    src.expect_line("TESTGUEST READY", Duration::from_secs(20));
    wait_for(&dst_sock);
    // A working set dirtied faster than it can be sent keeps precopy going for a while.
    assert_eq!(src.ask("dirty 2000 768", "dirty"), "dirty ok");
    src.send("count 50");
    src.expect_line("count=2", Duration::from_secs(5));
    ok(
        &dst_sock,
        &["receive-migration", &format!("tcp:{HOST_B_IP}:7778")],
    );
    ok(
        &src_sock,
        &["send-migration", &format!("tcp:{HOST_B_IP}:7778")],
    );
    std::thread::sleep(Duration::from_millis(400));
    drop(dst); // SIGKILL mid-migration

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = ok(&src_sock, &["migration-status", "--json"]);
        if s.contains("\"failed\"") || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.contains("\"failed\""), "{status}");
    assert!(ok(&src_sock, &["info", "--json"]).contains("\"Running\""));
    // The guest never stopped for good: its counter goes on on the source.
    let a = count_of(&src.expect_line("count=", Duration::from_secs(5)));
    let b = count_of(&src.expect_line("count=", Duration::from_secs(5)));
    assert!(b > a);
    assert_eq!(src.ask("dirty 0 0", "dirty"), "dirty ok");
    ok(&src_sock, &["shutdown-vmm"]);
    assert!(src
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
}

#[test]
fn a_corrupted_stream_is_refused_and_the_receiver_survives() {
    let dir = Scratch::new("migbad");
    let sock = dir.0.join("dst.sock");
    let mig = dir.0.join("mig.sock");
    let mut dst = Console::colovmm(&["--api-socket", &format!("path={}", sock.display())]);
    wait_for(&sock);
    for junk in [
        b"CLVMMIG1 this is not a header at all, just bytes".to_vec(),
        vec![0u8; 3],
        (0..4096u32).map(|i| (i * 7 % 251) as u8).collect(),
    ] {
        ok(
            &sock,
            &["receive-migration", &format!("unix:{}", mig.display())],
        );
        wait_for(&mig);
        let mut s = std::os::unix::net::UnixStream::connect(&mig).unwrap();
        let _ = s.write_all(&junk);
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            let st = ok(&sock, &["migration-status", "--json"]);
            if st.contains("\"failed\"") || Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.contains("\"failed\""), "{status}");
        ok(&sock, &["ping"]);
    }
    let (code, _, err) = remote(&sock, &["info"]);
    assert_ne!(code, 0, "no VM was created from garbage: {err}");
    ok(&sock, &["shutdown-vmm"]);
    assert!(dst
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
}
