//! Time: the TSC is the clock (native rdtsc in ring 3), calibrated once at boot against the
//! LAPIC timer, which KVM runs at a 1 GHz bus clock with divide-by-1 (1 tick = 1 ns; the
//! PIT may not exist under every VMM, the in-kernel LAPIC always does). The LAPIC one-shot
//! timer then provides wake-ups at TSC deadlines.

use crate::arch;
use crate::interrupts::{self, TIMER_BIT};
use core::sync::atomic::{AtomicU64, Ordering};

/// LAPIC timer ticks per second (KVM's fixed 1 ns bus cycle).
const LAPIC_HZ: u64 = 1_000_000_000;
/// Calibration window. Each sample is bracketed by rdtsc to within ~2.5 µs (one LAPIC read
/// exit), so 5 ms gives ~0.02% worst case (measured spread: 0.01%), and keeps boot short.
const CALIBRATION_NS: u32 = 5_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// A (tsc, lapic count) pair taken as close together as possible.
#[derive(Clone, Copy)]
pub struct Sample {
    tsc: u64,
    count: u32,
}

fn sample() -> Sample {
    // The LAPIC read exits to KVM; keep the tightest of a few rdtsc brackets around it.
    let mut best = (u64::MAX, Sample { tsc: 0, count: 0 });
    for _ in 0..4 {
        let t0 = arch::rdtsc();
        let count = interrupts::lapic_timer_current();
        let t1 = arch::rdtsc();
        if t1 - t0 < best.0 {
            best = (
                t1 - t0,
                Sample {
                    tsc: t0 + (t1 - t0) / 2,
                    count,
                },
            );
        }
    }
    best.1
}

/// Starts the free-running (masked) LAPIC countdown used for calibration and early delays.
pub fn calibration_begin() -> Sample {
    interrupts::lapic_timer_setup(true);
    interrupts::lapic_timer_start(u32::MAX);
    sample()
}

/// Busy-waits `ns` nanoseconds on the LAPIC countdown started by `calibration_begin`.
pub fn lapic_delay(ns: u32) {
    let start = interrupts::lapic_timer_current();
    while start - interrupts::lapic_timer_current() < ns {
        core::hint::spin_loop();
    }
}

/// Finishes calibration (waiting out the rest of the window), then readies the timer for
/// deadline use.
pub fn calibration_end(begin: Sample) {
    while begin.count - interrupts::lapic_timer_current() < CALIBRATION_NS {
        core::hint::spin_loop();
    }
    let end = sample();
    let ticks = (begin.count - end.count) as u64;
    let hz = (end.tsc - begin.tsc) as u128 * LAPIC_HZ as u128 / ticks as u128;
    TSC_HZ.store(hz as u64, Ordering::Relaxed);
    interrupts::lapic_timer_start(0);
    interrupts::lapic_timer_setup(false);
}

/// Calibrated TSC frequency.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Current TSC.
pub fn now() -> u64 {
    arch::rdtsc()
}

/// TSC ticks in `ms` milliseconds.
pub fn ms_to_tsc(ms: u64) -> u64 {
    (ms as u128 * tsc_hz() as u128 / 1000) as u64
}

/// Milliseconds since the PVH entry point.
pub fn uptime_ms() -> u64 {
    ((now() - arch::boot_tsc()) as u128 * 1000 / tsc_hz() as u128) as u64
}

/// Wake-up at the earliest requested TSC deadline, through the LAPIC one-shot timer.
pub struct Alarm {
    armed: Option<u64>,
}

impl Alarm {
    /// A disarmed alarm (the timer must have been set up by `calibration_end`).
    pub const fn new() -> Self {
        Alarm { armed: None }
    }

    /// Notes an event word taken elsewhere: a timer event means the one-shot has fired.
    pub fn fired(&mut self, pending: u64) {
        if pending & TIMER_BIT != 0 {
            self.armed = None;
        }
    }

    /// Arms for `deadline` (or stops the timer for `None`). `pending` is this loop's event
    /// word: a timer event means the previous one-shot has fired.
    pub fn set(&mut self, deadline: Option<u64>, pending: u64) {
        if pending & TIMER_BIT != 0 {
            self.armed = None;
        }
        match deadline {
            None if self.armed.is_some() => {
                interrupts::lapic_timer_start(0);
                self.armed = None;
            }
            Some(d) if self.armed != Some(d) => {
                let delta = d.saturating_sub(now()) as u128;
                // Round up so we do not wake just before the deadline and arm again.
                let ticks = (delta * LAPIC_HZ as u128).div_ceil(tsc_hz() as u128) + 1;
                interrupts::lapic_timer_start(ticks.min(u32::MAX as u128) as u32);
                self.armed = Some(d);
            }
            _ => {}
        }
    }
}
