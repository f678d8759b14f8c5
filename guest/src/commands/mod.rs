//! The console command set: one command per line, one answer line per command.
//! To add a command group, add a module and its entries to `COMMANDS`.

mod count;
mod mem;
mod system;

pub use count::Counter;
pub use mem::Dirtier;

use crate::{println, Guest};

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

/// `help` → the command names on one line.
fn help(_: &mut Guest, _: &[&str]) -> CmdResult {
    let mut names = [""; COMMANDS.len()];
    for (i, (name, _)) in COMMANDS.iter().enumerate() {
        names[i] = name;
    }
    println!("commands: {}", names.join(" "));
    Ok(())
}
