//! `count <period_ms>`: print `count=<k>` every period, driven by TSC deadlines.

use super::{CmdError, CmdResult, arg_u64};
use crate::{Guest, println, time};

/// The periodic counter (idle when `period` is 0).
pub struct Counter {
    period: u64,
    next: u64,
    k: u64,
}

impl Counter {
    /// An idle counter.
    pub const fn new() -> Self {
        Counter {
            period: 0,
            next: 0,
            k: 0,
        }
    }

    /// Prints the count if its deadline passed; returns the next deadline.
    pub fn poll(&mut self, now: u64) -> Option<u64> {
        if self.period == 0 {
            return None;
        }
        if now >= self.next {
            self.k += 1;
            println!("count={}", self.k);
            // Stay on the original grid unless we fell a whole period behind (e.g. the VM
            // was paused); then restart the grid rather than print a burst.
            self.next += self.period;
            if self.next <= now {
                self.next = now + self.period;
            }
        }
        Some(self.next)
    }
}

/// `count <period_ms>` (0 stops).
pub fn count(g: &mut Guest, args: &[&str]) -> CmdResult {
    if args.len() != 1 {
        return Err(CmdError("usage: count <period_ms>"));
    }
    let ms = arg_u64(args[0])?;
    if ms > 24 * 3600 * 1000 {
        return Err(CmdError("period too long"));
    }
    let period = time::ms_to_tsc(ms);
    g.counter = Counter {
        period,
        next: time::now() + period,
        k: 0,
    };
    println!("count ok");
    Ok(())
}
