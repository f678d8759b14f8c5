//! Disk commands on the virtio-blk devices: `disks`, `disk write|check|hash|bench`.
//!
//! The record log (its layout is a contract with host-side tests; see README.md): record i
//! lives in sector 1 + i, sector 0 is never touched, and the log ends at the first sector
//! without the magic. A sector with the magic that fails a check is a bad record.
//!
//! Commands wait for their requests; while waiting they keep the network going and sleep
//! until an interrupt (or a timeout, after which the device is reset and not used again).

use super::{CmdError, CmdResult, arg_u64};
use crate::interrupts::{self, TIMER_BIT};
use crate::net::Net;
use crate::virtio::blk::{Blk, Op, S_IOERR, S_OK, S_UNSUPP, SECTOR};
use crate::{Guest, arch, println, time};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Record magic (bytes 0..8).
pub const MAGIC: [u8; 8] = *b"CLVMREC1";
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// A request that makes no progress for this long fails the device.
const IO_TIMEOUT_MS: u64 = 5000;

/// A virtio-blk device and what we know about its record log.
pub struct Disk {
    /// The driver.
    pub blk: Blk,
    /// Its interrupt's pending bit.
    pub irq: u64,
    /// (records, last seq) once the log was scanned.
    log: Option<(u64, Option<u64>)>,
}

impl Disk {
    /// Wraps an initialised device.
    pub fn new(blk: Blk, irq: u64) -> Disk {
        Disk {
            blk,
            irq,
            log: None,
        }
    }
}

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

/// The 512-byte record for `seq` at log position `index`.
pub fn record(seq: u64, index: u64) -> [u8; 512] {
    let mut r = [0u8; 512];
    r[0..8].copy_from_slice(&MAGIC);
    r[8..16].copy_from_slice(&seq.to_le_bytes());
    r[16..24].copy_from_slice(&index.to_le_bytes());
    for k in 0..60u64 {
        let w = seq.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ k.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let at = 24 + 8 * k as usize;
        r[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    let sum = fnv1a(FNV_OFFSET, &r[..504]);
    r[504..512].copy_from_slice(&sum.to_le_bytes());
    r
}

/// What a sector holds.
enum Sector {
    /// No magic: the end of the log.
    End,
    /// A valid record with this seq.
    Record(u64),
    /// Magic present but something is wrong.
    Bad(&'static str),
}

fn classify(s: &[u8], index: u64) -> Sector {
    if s[0..8] != MAGIC {
        return Sector::End;
    }
    let u64_at = |at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    if fnv1a(FNV_OFFSET, &s[..504]) != u64_at(504) {
        return Sector::Bad("checksum");
    }
    if u64_at(16) != index {
        return Sector::Bad("index");
    }
    let seq = u64_at(8);
    if s[..] != record(seq, index)[..] {
        return Sector::Bad("payload");
    }
    Sector::Record(seq)
}

/// What an I/O command failed with (printed as `error io <text>`).
struct IoError(String);

/// Sleeps for the disk while keeping the network going.
struct Waiter<'a> {
    net: &'a mut Option<Net>,
    net_irq: u64,
    alarm: &'a mut time::Alarm,
}

impl Waiter<'_> {
    /// Until an interrupt or `deadline`. Acknowledges the disk's interrupt if it fired;
    /// other devices' events are handled or kept for the event loop.
    fn wait(&mut self, blk: &mut Blk, irq: u64, deadline: u64) {
        if blk.enable_irq() {
            return;
        }
        let mut next = deadline;
        if let Some(net) = self.net.as_mut()
            && let Some(d) = net.poll(false)
        {
            next = next.min(d);
        }
        if blk.enable_irq() {
            return;
        }
        self.alarm.set(Some(next), 0);
        arch::halt();
        let bits = interrupts::take_pending(0);
        self.alarm.fired(bits);
        if bits & irq != 0 {
            blk.ack_irq();
        }
        if bits & self.net_irq != 0
            && let Some(net) = self.net.as_mut()
        {
            net.poll(true);
        }
        interrupts::defer(bits & !(irq | self.net_irq | TIMER_BIT));
    }
}

/// One request.
#[derive(Clone, Copy)]
struct Req {
    op: Op,
    sector: u64,
    buf: u64,
    len: u32,
}

/// Runs the requests `next` yields with at most `depth` in flight; returns how many
/// completed. The first failure stops submitting; a stall of IO_TIMEOUT_MS gives up on
/// the device.
fn run(
    d: &mut Disk,
    w: &mut Waiter,
    depth: usize,
    next: &mut dyn FnMut() -> Option<Req>,
) -> Result<u64, IoError> {
    let blk = &mut d.blk;
    if blk.failed {
        return Err(IoError(format!("device {:#x} failed earlier", blk.base)));
    }
    let mut tags: Vec<Option<Req>> = vec![None; 1024];
    let (mut in_flight, mut done) = (0usize, 0u64);
    let mut held: Option<Req> = None;
    let mut exhausted = false;
    let mut err: Option<IoError> = None;
    let timeout = time::ms_to_tsc(IO_TIMEOUT_MS);
    let mut last_progress = time::now();
    loop {
        while !exhausted && err.is_none() && in_flight < depth {
            let Some(r) = held.take().or_else(&mut *next) else {
                exhausted = true;
                break;
            };
            if r.op != Op::Flush && (r.sector + (r.len as u64).div_ceil(SECTOR) > blk.capacity) {
                err = Some(IoError(format!("beyond end of disk sector={}", r.sector)));
                break;
            }
            match blk.submit(r.op, r.sector, r.buf, r.len) {
                Some(tag) => {
                    tags[tag as usize] = Some(r);
                    in_flight += 1;
                }
                None => {
                    held = Some(r);
                    break;
                }
            }
        }
        blk.kick();
        let mut progressed = false;
        while let Some((tag, status)) = blk.poll() {
            let Some(r) = tags.get_mut(tag as usize).and_then(Option::take) else {
                continue;
            };
            in_flight -= 1;
            done += 1;
            progressed = true;
            if status != S_OK && err.is_none() {
                let what = match status {
                    S_IOERR => "error",
                    S_UNSUPP => "unsupported",
                    _ => "bad status",
                };
                err = Some(IoError(format!("{what} op={:?} sector={}", r.op, r.sector)));
            }
        }
        let now = time::now();
        if progressed {
            last_progress = now;
            continue;
        }
        if in_flight == 0 && (exhausted || err.is_some()) {
            break;
        }
        if now - last_progress > timeout {
            blk.give_up();
            return Err(IoError(format!(
                "timeout device={:#x} in_flight={in_flight}",
                blk.base
            )));
        }
        w.wait(blk, d.irq, last_progress + timeout);
    }
    match err {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Reads `count` sectors from `sector` into `buf`, in chunks of at most `max_request`.
fn read_into(d: &mut Disk, w: &mut Waiter, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
    let chunk = d.blk.max_request as usize;
    let base = buf.as_mut_ptr() as u64;
    let len = buf.len();
    let mut off = 0usize;
    run(d, w, 8, &mut || {
        if off >= len {
            return None;
        }
        let n = chunk.min(len - off);
        let r = Req {
            op: Op::Read,
            sector: sector + (off as u64) / SECTOR,
            buf: base + off as u64,
            len: n as u32,
        };
        off += n;
        Some(r)
    })?;
    Ok(())
}

/// What a log scan found: valid records, the last one's seq, the first bad (sector, reason).
type ScanResult = (u64, Option<u64>, Option<(u64, &'static str)>);

/// Scans the log from sector 1.
fn scan(d: &mut Disk, w: &mut Waiter) -> Result<ScanResult, IoError> {
    const CHUNK: u64 = 128; // sectors per read
    let mut buf = vec![0u8; (CHUNK * SECTOR) as usize];
    let (mut n, mut last) = (0u64, None);
    let mut sector = 1u64;
    while sector < d.blk.capacity {
        let count = CHUNK.min(d.blk.capacity - sector);
        let bytes = &mut buf[..(count * SECTOR) as usize];
        read_into(d, w, sector, bytes)?;
        for s in bytes.chunks(SECTOR as usize) {
            match classify(s, sector - 1) {
                Sector::End => return Ok((n, last, None)),
                Sector::Bad(reason) => return Ok((n, last, Some((sector, reason)))),
                Sector::Record(seq) => {
                    n += 1;
                    last = Some(seq);
                }
            }
            sector += 1;
        }
    }
    Ok((n, last, None))
}

/// The disk named by an optional argument (default 0), and the other parts of the guest
/// an I/O command needs.
fn target<'a>(
    g: &'a mut Guest,
    arg: Option<&&str>,
) -> Result<(&'a mut Disk, Waiter<'a>), CmdError> {
    let dev = match arg {
        Some(a) => arg_u64(a)? as usize,
        None => 0,
    };
    let Guest {
        disks,
        net,
        net_irq,
        alarm,
        ..
    } = g;
    let disk = disks.get_mut(dev).ok_or(CmdError("no such disk"))?;
    Ok((
        disk,
        Waiter {
            net,
            net_irq: *net_irq,
            alarm,
        },
    ))
}

/// `disks` → `disks=<n> <i>:<sectors>[:ro] ...`.
pub fn disks(g: &mut Guest, args: &[&str]) -> CmdResult {
    if !args.is_empty() {
        return Err(CmdError("takes no arguments"));
    }
    let mut line = format!("disks={}", g.disks.len());
    for (i, d) in g.disks.iter().enumerate() {
        line += &format!(
            " {i}:{}{}",
            d.blk.capacity,
            if d.blk.read_only { ":ro" } else { "" }
        );
    }
    println!("{line}");
    Ok(())
}

/// `disk write|check|hash|bench ...`.
pub fn disk(g: &mut Guest, args: &[&str]) -> CmdResult {
    let result = match args {
        ["write", seq, rest @ ..] if rest.len() <= 1 => {
            let seq = arg_u64(seq)?;
            let (d, mut w) = target(g, rest.first())?;
            write(d, &mut w, seq)
        }
        ["check", rest @ ..] if rest.len() <= 1 => {
            let (d, mut w) = target(g, rest.first())?;
            check(d, &mut w)
        }
        ["hash", rest @ ..] if rest.len() <= 1 => {
            let (d, mut w) = target(g, rest.first())?;
            hash(d, &mut w)
        }
        ["bench", kind, n, rest @ ..] if rest.len() <= 1 => {
            let n = arg_u64(n)?;
            let kind = match *kind {
                "read" | "write" | "randread" | "randwrite" => *kind,
                _ => {
                    return Err(CmdError(
                        "usage: disk bench <read|write|randread|randwrite> <mib_or_ops> [dev]",
                    ));
                }
            };
            if n == 0 || n > 1 << 24 {
                return Err(CmdError("bad size"));
            }
            let (d, mut w) = target(g, rest.first())?;
            bench(d, &mut w, kind, n)
        }
        _ => {
            return Err(CmdError(
                "usage: disk write <seq> [dev] | check [dev] | hash [dev] | bench <kind> <n> [dev]",
            ));
        }
    };
    if let Err(IoError(e)) = result {
        println!("error io {e}");
    }
    Ok(())
}

fn refuse_read_only(d: &Disk) -> Result<(), IoError> {
    if d.blk.read_only {
        return Err(IoError(format!("read-only disk {:#x}", d.blk.base)));
    }
    Ok(())
}

fn flush(d: &mut Disk, w: &mut Waiter) -> Result<(), IoError> {
    if d.blk.flush {
        let mut once = Some(Req {
            op: Op::Flush,
            sector: 0,
            buf: 0,
            len: 0,
        });
        run(d, w, 1, &mut || once.take())?;
    }
    Ok(())
}

fn write(d: &mut Disk, w: &mut Waiter, seq: u64) -> Result<(), IoError> {
    refuse_read_only(d)?;
    let (n, last) = match d.log {
        Some(l) => l,
        None => {
            let (n, last, _) = scan(d, w)?;
            (n, last)
        }
    };
    d.log = Some((n, last));
    let sector = 1 + n;
    if sector >= d.blk.capacity {
        return Err(IoError(format!("disk full records={n}")));
    }
    // The record, and a zeroed sector after it (if there is one): the log then always ends
    // right after the newest record, even where older records lay beyond it.
    let sectors = if sector + 1 < d.blk.capacity { 2 } else { 1 };
    let mut buf = vec![0u8; (sectors * SECTOR) as usize];
    buf[..SECTOR as usize].copy_from_slice(&record(seq, n));
    let len = buf.len() as u32;
    let mut once = Some(Req {
        op: Op::Write,
        sector,
        buf: buf.as_ptr() as u64,
        len,
    });
    let written = run(d, w, 1, &mut || once.take());
    if written.is_err() {
        d.log = None; // unknown what landed: rescan next time
    }
    written?;
    flush(d, w)?;
    d.log = Some((n + 1, Some(seq)));
    println!("disk write ok seq={seq} sector={sector}");
    drop(buf);
    Ok(())
}

fn check(d: &mut Disk, w: &mut Waiter) -> Result<(), IoError> {
    let (n, last, bad) = scan(d, w)?;
    d.log = Some((n, last));
    match bad {
        None => match last {
            Some(seq) => println!("disk records={n} last={seq} ok"),
            None => println!("disk records=0 last=none ok"),
        },
        Some((sector, reason)) => println!("disk records={n} bad sector={sector} reason={reason}"),
    }
    Ok(())
}

fn hash(d: &mut Disk, w: &mut Waiter) -> Result<(), IoError> {
    const BATCH: u64 = 4 << 20;
    let mut buf = vec![0u8; BATCH as usize];
    let total = d.blk.capacity * SECTOR;
    let mut h = FNV_OFFSET;
    let mut off = 0u64;
    while off < total {
        let n = BATCH.min(total - off) as usize;
        read_into(d, w, off / SECTOR, &mut buf[..n])?;
        h = fnv1a(h, &buf[..n]);
        off += n as u64;
    }
    println!("disk hash={h:016x}");
    Ok(())
}

fn bench(d: &mut Disk, w: &mut Waiter, kind: &str, n: u64) -> Result<(), IoError> {
    let writes = kind.ends_with("write");
    if writes {
        refuse_read_only(d)?;
    }
    // The upper half of the disk, so the record log (from sector 1) survives write benches.
    let region_start = d.blk.capacity / 2;
    let region = d.blk.capacity - region_start;
    let op = if writes { Op::Write } else { Op::Read };
    let random = kind.starts_with("rand");
    let (req_len, count, depth) = if random {
        (4096u64, n, 32)
    } else {
        let req = (d.blk.max_request as u64).min(1 << 20);
        let total = n << 20;
        (req, total.div_ceil(req), 8)
    };
    if region * SECTOR < req_len {
        return Err(IoError(String::from("disk too small to benchmark")));
    }
    let buf = vec![0xa5u8; req_len as usize];
    let (base, slots) = (buf.as_ptr() as u64, region * SECTOR / req_len);
    let mut issued = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let start = time::now();
    let done = run(d, w, depth, &mut || {
        if issued == count {
            return None;
        }
        let slot = if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % slots
        } else {
            issued % slots
        };
        issued += 1;
        Some(Req {
            op,
            sector: region_start + slot * req_len / SECTOR,
            buf: base,
            len: req_len as u32,
        })
    })?;
    if writes {
        flush(d, w)?;
    }
    let ticks = time::now() - start;
    drop(buf);
    let bytes = done * req_len;
    let us = (ticks as u128 * 1_000_000 / time::tsc_hz() as u128).max(1) as u64;
    let mb_s_x10 = bytes * 10 / us; // bytes per µs = MB/s
    let iops = done * 1_000_000 / us;
    println!(
        "disk bench {kind} bytes={bytes} ms={}.{} mb_s={}.{} iops={iops}",
        us / 1000,
        us % 1000 / 100,
        mb_s_x10 / 10,
        mb_s_x10 % 10
    );
    Ok(())
}
