//! `hash` and `dirty`: reading and writing guest-physical memory, for checking that two
//! VMs hold the same memory and for generating a controlled dirty-page rate.
//! Physical memory is accessed with volatile operations: it is mostly outside any Rust
//! allocation (and may start at address 0), which volatile accesses allow.

use super::{CmdError, CmdResult, arg_u64};
use crate::memory::{MAPPED_END, MemoryLayout};
use crate::{Guest, println, time};
use alloc::vec::Vec;

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
const LANES: usize = 8;

/// Eight independent multiply-xor lanes (the multiply latency, not memory, is the limit). Each step
/// `lane = rotl((lane ^ word) * K1)` is a bijection of the lane for a fixed word, so
/// changing any single word always changes the result.
struct Hasher {
    lanes: [u64; LANES],
    bytes: u64,
}

fn step(lane: u64, word: u64) -> u64 {
    (lane ^ word).wrapping_mul(K1).rotate_left(31)
}

impl Hasher {
    fn new() -> Self {
        Hasher {
            lanes: core::array::from_fn(|i| K1.rotate_left(8 * i as u32) ^ K2),
            bytes: 0,
        }
    }

    /// Hashes physical `start..end` (8-byte aligned ends), keyed by its address.
    fn physical(&mut self, start: u64, end: u64) {
        self.lanes[0] = step(self.lanes[0], start);
        let read = |a: u64| {
            // SAFETY: callers pass RAM inside the identity map; see the module comment.
            unsafe { core::ptr::read_volatile(a as *const u64) }
        };
        let mut a = start;
        while a + 8 * LANES as u64 <= end {
            for i in 0..LANES {
                self.lanes[i] = step(self.lanes[i], read(a + 8 * i as u64));
            }
            a += 8 * LANES as u64;
        }
        let mut i = 0;
        while a + 8 <= end {
            self.lanes[i] = step(self.lanes[i], read(a));
            a += 8;
            i += 1;
        }
        self.bytes += end - start;
    }

    fn finish(&self) -> u64 {
        let mut h = self.lanes.iter().fold(self.bytes ^ K2, |h, &l| step(h, l));
        // Final avalanche (the murmur3 fmix64 constants).
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// `hash <start_mib> <len_mib>`: hash of the RAM in that range. Holes in the memory map
/// (e.g. 640 KiB-1 MiB) are skipped; the range must end inside mapped RAM.
pub fn hash(g: &mut Guest, args: &[&str]) -> CmdResult {
    if args.len() != 2 {
        return Err(CmdError("usage: hash <start_mib> <len_mib>"));
    }
    let start = arg_u64(args[0])?
        .checked_mul(1 << 20)
        .ok_or(CmdError("bad start"))?;
    let len = arg_u64(args[1])?
        .checked_mul(1 << 20)
        .ok_or(CmdError("bad length"))?;
    let end = start.checked_add(len).ok_or(CmdError("bad length"))?;
    if len == 0 {
        return Err(CmdError("empty range"));
    }
    if end > MAPPED_END {
        return Err(CmdError("range above 4 GiB is not mapped"));
    }
    let mut pieces: Vec<(u64, u64)> = g
        .boot
        .ram()
        .map(|r| (r.addr.max(start) & !7, r.end().min(end) & !7))
        .filter(|(s, e)| s < e)
        .collect();
    let ram_end = g.boot.ram().map(|r| r.end()).max().unwrap_or(0);
    if pieces.is_empty() || end > ram_end {
        return Err(CmdError("range outside RAM"));
    }
    pieces.sort_unstable();
    let mut h = Hasher::new();
    for (s, e) in pieces {
        h.physical(s, e);
    }
    println!("hash={:016x}", h.finish());
    Ok(())
}

/// Writes one u64 per 4 KiB page of a working set at a TSC-paced rate, cycling through it.
pub struct Dirtier {
    base: u64,
    pages: u64,
    pages_per_sec: u64,
    start_tsc: u64,
    done: u64,
    cursor: u64,
    /// Bumped on every pass and never reset, so each write differs from the page's content.
    generation: u64,
}

/// How often the dirtier wakes up while active.
const DIRTY_TICK_MS: u64 = 2;
/// Backlog (after the VM was paused) is only caught up to this much time's worth.
const MAX_BACKLOG_MS: u64 = 100;

impl Dirtier {
    /// An idle dirtier.
    pub const fn new() -> Self {
        Dirtier {
            base: 0,
            pages: 0,
            pages_per_sec: 0,
            start_tsc: 0,
            done: 0,
            cursor: 0,
            generation: 0,
        }
    }

    /// Writes the pages that are due by `now`; returns the next wake-up.
    pub fn poll(&mut self, now: u64) -> Option<u64> {
        if self.pages_per_sec == 0 {
            return None;
        }
        let hz = time::tsc_hz() as u128;
        let due = ((now - self.start_tsc) as u128 * self.pages_per_sec as u128 / hz) as u64;
        let max_backlog = self.pages_per_sec * MAX_BACKLOG_MS / 1000 + 1;
        if due > self.done + max_backlog {
            self.done = due - max_backlog;
        }
        while self.done < due {
            if self.cursor == 0 {
                self.generation += 1;
            }
            let addr = self.base + (self.cursor << 12);
            let value = self.generation.wrapping_mul(K1) ^ self.cursor;
            // SAFETY: addr is inside the workload area, which nothing else uses.
            unsafe { core::ptr::write_volatile(addr as *mut u64, value) };
            self.cursor = (self.cursor + 1) % self.pages;
            self.done += 1;
        }
        Some(now + time::ms_to_tsc(DIRTY_TICK_MS))
    }

    fn start(&mut self, layout: &MemoryLayout, mib_per_s: u64, ws_mib: u64) -> CmdResult {
        if mib_per_s == 0 {
            self.pages_per_sec = 0;
            return Ok(());
        }
        let (base, limit) = layout.workload;
        let bytes = ws_mib
            .checked_mul(1 << 20)
            .ok_or(CmdError("working set too big"))?;
        if ws_mib == 0 {
            return Err(CmdError("working set must be at least 1 MiB"));
        }
        if bytes > limit - base {
            return Err(CmdError("working set does not fit in free RAM"));
        }
        let pages_per_sec = mib_per_s
            .checked_mul(256)
            .ok_or(CmdError("rate too high"))?;
        *self = Dirtier {
            base,
            pages: bytes >> 12,
            pages_per_sec,
            start_tsc: time::now(),
            done: 0,
            cursor: 0,
            generation: self.generation,
        };
        Ok(())
    }
}

/// `dirty <mib_per_s> <working_set_mib>`: start (or with rate 0, stop) dirtying memory.
pub fn dirty(g: &mut Guest, args: &[&str]) -> CmdResult {
    if args.len() != 2 {
        return Err(CmdError("usage: dirty <mib_per_s> <working_set_mib>"));
    }
    let (rate, ws) = (arg_u64(args[0])?, arg_u64(args[1])?);
    g.dirty.start(&g.layout, rate, ws)?;
    println!("dirty ok");
    Ok(())
}
