//! Application processors: started from ring 3 with a broadcast INIT-SIPI-SIPI. Each AP
//! runs the trampoline (real mode), the ring-0 long-mode path shared with the BSP (which
//! picks its index, TSS and stacks), then `ap_main` in ring 3, where it idles in halt.

use crate::arch;
use crate::interrupts;
use crate::time;
use core::sync::atomic::{AtomicU32, Ordering};

static ONLINE: AtomicU32 = AtomicU32::new(1);

/// CPUs that reached ring 3 (the BSP included).
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// Starts the APs and waits (up to ~0.5 s) until `expected` CPUs are online. Needs the
/// calibration countdown running (for delays) and the IDT filled.
pub fn start_aps(expected: u32) {
    let expected = expected.min(arch::MAX_CPUS as u32);
    if expected <= 1 {
        return;
    }
    let code = arch::trampoline_code();
    // SAFETY: TRAMPOLINE is low RAM that nothing uses after boot info and ACPI were parsed.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), arch::TRAMPOLINE as *mut u8, code.len())
    };

    let sipi = 0x4600 | (arch::TRAMPOLINE >> 12) as u32; // assert, start-up, vector
    interrupts::ipi_all_but_self(0x4500); // assert, INIT
    time::lapic_delay(100_000);
    interrupts::ipi_all_but_self(sipi);
    time::lapic_delay(200_000);
    interrupts::ipi_all_but_self(sipi); // ignored by APs that already started
    for _ in 0..5000 {
        if online() >= expected {
            return;
        }
        time::lapic_delay(100_000);
    }
}

/// Ring-3 main loop of an AP: nothing to do yet, so sleep through every wake-up.
pub fn ap_main(cpu: usize) -> ! {
    interrupts::lapic_enable();
    ONLINE.fetch_add(1, Ordering::AcqRel);
    loop {
        interrupts::take_pending(cpu);
        arch::halt();
    }
}
