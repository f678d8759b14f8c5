//! The console command set: one command per line, one answer line per command.
//! To add a command group, add a module and its entries to `COMMANDS`.

mod count;
mod disk;
mod mem;
mod system;

pub use count::Counter;
pub use disk::Disk;
pub use mem::Dirtier;

use crate::{Guest, println};

/// Why a command failed; printed as `error <reason>`.
pub struct CmdError(pub &'static str);

/// What a command handler returns (its answer is printed by the handler itself).
pub type CmdResult = Result<(), CmdError>;

type Handler = fn(&mut Guest, &[&str]) -> CmdResult;

const COMMANDS: &[(&str, Handler)] = &[
    ("cpus", system::cpus),
    ("uptime", system::uptime),
    ("hash", mem::hash),
    ("dirty", mem::dirty),
    ("count", count::count),
    ("poweroff", system::poweroff),
    ("crash", system::crash),
    ("fault", system::fault),
    ("version", system::version),
    ("memmap", system::memmap),
    ("net", net),
    ("disks", disk::disks),
    ("disk", disk::disk),
    ("virtio", virtio),
    ("help", help),
];

const MAX_ARGS: usize = 8;

/// Runs one input line.
pub fn run(g: &mut Guest, line: &str) {
    let mut words = line.split_ascii_whitespace();
    let Some(name) = words.next() else { return };
    let mut args = [""; MAX_ARGS];
    let mut n = 0;
    for w in words {
        if n == MAX_ARGS {
            println!("error too many arguments");
            return;
        }
        args[n] = w;
        n += 1;
    }
    match COMMANDS.iter().find(|(c, _)| *c == name) {
        Some((_, handler)) => {
            if let Err(CmdError(reason)) = handler(g, &args[..n]) {
                println!("error {reason}");
            }
        }
        None => println!("error unknown command"),
    }
}

/// Parses a decimal argument.
fn arg_u64(s: &str) -> Result<u64, CmdError> {
    s.parse().map_err(|_| CmdError("bad number"))
}

/// `net` → `mac=.. ip=.. rx_packets=.. tx_packets=..`.
fn net(g: &mut Guest, args: &[&str]) -> CmdResult {
    if !args.is_empty() {
        return Err(CmdError("takes no arguments"));
    }
    match &g.net {
        Some(n) => println!("{}", n.status()),
        None => return Err(CmdError("no network device")),
    }
    Ok(())
}

/// `virtio` → per-device counters: notifications sent, interrupts taken, bogus used
/// entries (`virtio blk0:<base>:kicks=..:irqs=..:bogus=..[:failed] net:<base>:...`).
fn virtio(g: &mut Guest, args: &[&str]) -> CmdResult {
    use alloc::format;
    if !args.is_empty() {
        return Err(CmdError("takes no arguments"));
    }
    let mut line = alloc::string::String::from("virtio");
    for (i, d) in g.disks.iter().enumerate() {
        let b = &d.blk;
        line += &format!(
            " blk{i}:{:#x}:kicks={}:irqs={}:bogus={}",
            b.base,
            b.kicks,
            b.irqs,
            b.bogus()
        );
        if b.failed {
            line += ":failed";
        }
    }
    if let Some(n) = &g.net {
        line += " ";
        line += &n.device_stats();
    }
    println!("{line}");
    Ok(())
}

/// `help` → the command names on one line.
fn help(_: &mut Guest, _: &[&str]) -> CmdResult {
    let mut names = [""; COMMANDS.len()];
    for (i, (name, _)) in COMMANDS.iter().enumerate() {
        names[i] = name;
    }
    println!("commands: {}", names.join(" "));
    Ok(())
}
