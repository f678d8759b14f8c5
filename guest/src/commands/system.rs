//! Whole-guest commands: CPUs, uptime, power.

use super::{CmdError, CmdResult};
use crate::{Guest, acpi, arch, println, smp, time};
use alloc::string::String;
use core::fmt::Write;

fn no_args(args: &[&str]) -> CmdResult {
    if args.is_empty() {
        Ok(())
    } else {
        Err(CmdError("takes no arguments"))
    }
}

/// `cpus` → `cpus=<online CPUs>`.
pub fn cpus(_: &mut Guest, args: &[&str]) -> CmdResult {
    no_args(args)?;
    println!("cpus={}", smp::online());
    Ok(())
}

/// `uptime` → `uptime_ms=<ms since the PVH entry>`.
pub fn uptime(_: &mut Guest, args: &[&str]) -> CmdResult {
    no_args(args)?;
    println!("uptime_ms={}", time::uptime_ms());
    Ok(())
}

/// `version` → `version=<crate version>`.
pub fn version(_: &mut Guest, args: &[&str]) -> CmdResult {
    no_args(args)?;
    println!("version={}", env!("CARGO_PKG_VERSION"));
    Ok(())
}

/// `memmap` → `memmap=<addr>:<size>:<type>,...` (the loader's memory map, hex, one line).
pub fn memmap(g: &mut Guest, args: &[&str]) -> CmdResult {
    no_args(args)?;
    let mut line = String::from("memmap=");
    for (i, r) in g.boot.regions().iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(line, "{sep}{:#x}:{:#x}:{}", r.addr, r.size, r.kind);
    }
    println!("{line}");
    Ok(())
}

/// `poweroff`: ACPI S5, then the i8042 reset line, then a triple fault.
pub fn poweroff(g: &mut Guest, args: &[&str]) -> CmdResult {
    no_args(args)?;
    println!("poweroff");
    acpi::poweroff(g.acpi.poweroff);
    // Still running: S5 did not take (yet). Give it a moment, then try the other ways.
    let deadline = time::now() + time::ms_to_tsc(100);
    while time::now() < deadline {
        core::hint::spin_loop();
    }
    arch::outb(0x64, 0xfe);
    arch::crash()
}

/// `crash`: triple fault (the VMM should exit non-zero).
pub fn crash(_: &mut Guest, args: &[&str]) -> CmdResult {
    no_args(args)?;
    println!("crash");
    arch::crash()
}

/// `fault [ud|pf|gp]`: raise that exception in ring 3, to test the fatal-exception path
/// (prints `EXCEPTION ...`, then triple faults).
pub fn fault(_: &mut Guest, args: &[&str]) -> CmdResult {
    match args {
        [] | ["ud"] => {
            // SAFETY: deliberately faults; the exception path never returns here.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) }
        }
        ["pf"] => {
            // SAFETY: as above: 64 GiB is outside the identity map, so this read faults.
            unsafe { core::ptr::read_volatile(0x10_0000_0000 as *const u64) };
            Err(CmdError("no page fault"))
        }
        ["gp"] => {
            // SAFETY: as above: cli in ring 3 is a #GP (IOPL is 0).
            unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
            Err(CmdError("no general protection fault"))
        }
        _ => Err(CmdError("usage: fault [ud|pf|gp]")),
    }
}
