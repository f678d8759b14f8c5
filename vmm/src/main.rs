//! `colovmm`: parse the command line, build the VM, run it, exit with what happened.
//!
//! Exit codes: 0 the guest powered off or reset; 1 bad input or a VMM failure; 2 the guest
//! crashed (triple fault, emulation failure).

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;
use vmm::{Vm, VmOutcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = run(&cli);
    vmm::console::restore_terminal();
    code
}

fn run(cli: &Cli) -> ExitCode {
    if let Err(e) = vmm::logger::init(cli.v, cli.log_file.as_deref()) {
        eprintln!("colovmm: cannot open log file: {e}");
        return ExitCode::from(1);
    }
    let config = match cli.vm_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("colovmm: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = Vm::new(&config).and_then(Vm::run);
    match outcome {
        Ok(VmOutcome::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(VmOutcome::Reset) => {
            log::info!("guest reset");
            ExitCode::SUCCESS
        }
        Ok(VmOutcome::Crash(msg)) => {
            eprintln!("colovmm: guest crashed: {msg}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("colovmm: {e}");
            ExitCode::from(1)
        }
    }
}
