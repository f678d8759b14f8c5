//! Bad command lines get one clear line on stderr and a non-zero exit, before any VM exists.

use std::process::Command;

use integration_tests::colovmm_bin;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(colovmm_bin())
        .args(args)
        .output()
        .expect("run colovmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn no_kernel() {
    let (code, err) = run(&["--memory", "size=64M"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no kernel"), "{err}");
}

#[test]
fn zero_memory() {
    let (code, err) = run(&["--kernel", "/bin/true", "--memory", "size=0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--memory") && err.contains("size"), "{err}");
}

#[test]
fn unknown_key() {
    let (code, err) = run(&["--kernel", "/bin/true", "--cpus", "boot=1,bogus=2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown key 'bogus'"), "{err}");
}

#[test]
fn not_a_kernel() {
    let dir = std::env::temp_dir().join(format!("colovmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.img");
    std::fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    let (code, err) = run(&["--kernel", junk.to_str().unwrap(), "--serial", "off"]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a kernel"), "{err}");
}

#[test]
fn missing_kernel_file() {
    let (code, err) = run(&["--kernel", "/nonexistent/vmlinux", "--serial", "off"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn bad_serial_mode() {
    let (code, err) = run(&["--kernel", "/bin/true", "--serial", "pty"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--serial"), "{err}");
}

#[test]
fn errors_are_one_line() {
    let (_, err) = run(&["--kernel", "/bin/true", "--memory", "size=12Q"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
