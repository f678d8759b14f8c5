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
