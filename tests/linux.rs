//! Debian's stock kernel boots under colovmm as far as the host allows: through PVH (vmlinux)
//! and through the 64-bit boot protocol (bzImage). It must print its banner, echo our command
//! line and list a memory map that matches `--memory`. On a host with VMX/SVM it must also reach
//! userspace (a busybox initramfs prints a marker and powers off). Under kvm_pvm (no VMX/SVM) the
//! kernel's ring-0 code is emulated and stops on an unsupported instruction, minutes in.

use std::process::Command;
use std::time::Duration;

use integration_tests::{host_has_hw_virt, linux_image, repo_root, Console};

const MARKER: &str = "COLOVMM-INITRAMFS-USERSPACE-OK";

fn initramfs() -> String {
    let out = repo_root().join("target/linux/initramfs.cpio.gz");
    let status = Command::new("bash")
        .arg(repo_root().join("scripts/build-initramfs.sh"))
        .arg(&out)
        .status()
        .expect("run build-initramfs.sh");
    assert!(status.success(), "build-initramfs.sh failed");
    out.to_string_lossy().into_owned()
}

fn boot_linux(image: &str, memory_mib: u64, early_timeout: Duration) {
    let kernel = linux_image(image);
    let cmdline =
        format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 colovmm.test={image}");
    let hw = host_has_hw_virt();
    let initrd = hw.then(initramfs);
    let mut args = vec![
        "--kernel".to_string(),
        kernel.to_string_lossy().into_owned(),
        "--memory".to_string(),
        format!("size={memory_mib}M"),
        "--cpus".to_string(),
        "boot=2".to_string(),
        "--cmdline".to_string(),
        cmdline.clone(),
    ];
    if let Some(i) = &initrd {
        args.extend(["--initramfs".to_string(), i.clone()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Console::colovmm(&arg_refs);

    vm.expect_line("Linux version", early_timeout);
    let echoed = vm.expect_line("Command line:", Duration::from_secs(30));
    assert!(echoed.ends_with(&cmdline), "kernel echoed {echoed:?}");
    // The last usable e820 range must end exactly at the top of --memory.
    let top = format!("-{:#018x}] usable", (memory_mib << 20) - 1);
    let e820 = vm.expect_line(&top, Duration::from_secs(30));
    assert!(
        e820.contains("BIOS-e820: [mem 0x0000000000100000"),
        "{e820}"
    );

    if hw {
        vm.expect_line(MARKER, Duration::from_secs(120));
        let status = vm
            .wait_exit(Duration::from_secs(60))
            .expect("guest powers off");
        assert!(status.success(), "exit {status:?}: {}", vm.stderr());
    } else {
        eprintln!("no VMX/SVM on this host: the stock kernel is checked up to its memory map");
    }
}

#[test]
fn debian_vmlinux_boots_through_pvh() {
    boot_linux("vmlinux", 256, Duration::from_secs(60));
}

#[test]
fn debian_bzimage_boots_through_the_linux_boot_protocol() {
    // The bzImage decompresses itself in ring 0, which kvm_pvm emulates: about 90 s here.
    boot_linux("bzImage", 192, Duration::from_secs(600));
}
