//! `colovmm`: parse the command line, build the VM, run it, exit with what happened.
//!
//! Exit codes: 0 the guest powered off or reset, or `vmm.shutdown`; 1 bad input or a VMM
//! failure; 2 the guest crashed (triple fault, emulation failure).

use std::process::ExitCode;

use api::{EventMonitor, EventMonitorConfig};
use clap::Parser;
use vmm::cli::Cli;
use vmm::config::{DiskConfig, NetConfig, SerialConfig};
use vmm::seccomp::{self, ThreadKind};
use vmm::{VmOutcome, Vmm, VmmExit};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = run(&cli);
    vmm::console::restore_terminal();
    code
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("colovmm: {msg}");
    ExitCode::from(1)
}

fn run(cli: &Cli) -> ExitCode {
    if let Err(e) = vmm::logger::init(cli.v, cli.log_file.as_deref()) {
        return fail(format_args!("cannot open log file: {e}"));
    }
    let (config, api_path, restore) =
        match (cli.vm_config(), cli.api_socket_path(), cli.restore_url()) {
            (Ok(c), Ok(p), Ok(r)) => (c, p, r),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return fail(e),
        };
    let local_nets: Result<Vec<_>, _> = cli.net.iter().map(|n| NetConfig::parse(n)).collect();
    let local_disks: Result<Vec<_>, _> = cli.disk.iter().map(|d| DiskConfig::parse(d)).collect();
    let colo = match (
        cli.colo_config(),
        SerialConfig::parse(&cli.serial),
        local_nets,
        local_disks,
    ) {
        (Ok(c), Ok(serial), Ok(nets), Ok(disks)) => c.map(|c| (c, serial, nets, disks)),
        (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
            return fail(e)
        }
    };
    // Every thread created from here on inherits the VMM's filter.
    if let Err(e) = seccomp::apply(ThreadKind::Vmm, cli.seccomp) {
        return fail(e);
    }
    let events = match cli.event_monitor.as_deref().map(EventMonitorConfig::parse) {
        None => EventMonitor::disabled(),
        Some(Ok(c)) => match EventMonitor::open(&c) {
            Ok(m) => m,
            Err(e) => return fail(e),
        },
        Some(Err(e)) => return fail(e),
    };
    let (receiver, server) = match api_path {
        Some(path) => match vmm::api_server::start(&path, cli.seccomp) {
            Ok((receiver, server)) => (Some(receiver), Some(server)),
            Err(e) => return fail(e),
        },
        None => (None, None),
    };
    let mut vmm = match Vmm::new(receiver, cli.seccomp, events) {
        Ok(v) => v,
        Err(e) => return fail(format_args!("control loop: {e}")),
    };
    let code = run_vmm(&mut vmm, config, restore, colo);
    vmm.flush_events();
    // The control loop's receiver goes first, so the server's pending calls fail at once.
    drop(vmm);
    drop(server);
    code
}

fn run_vmm(
    vmm: &mut Vmm,
    config: Option<vmm::config::VmConfig>,
    restore: Option<String>,
    colo: Option<(
        api::ColoConfig,
        SerialConfig,
        Vec<NetConfig>,
        Vec<DiskConfig>,
    )>,
) -> ExitCode {
    if let Some(url) = restore {
        if let Err(e) = vmm.restore_vm(&url).and_then(|()| vmm.resume()) {
            let causes: String = e.causes.iter().map(|c| format!(": {c}")).collect();
            return fail(format_args!("{}{causes}", e.error));
        }
    }
    if let Some(config) = config {
        if let Err(e) = vmm.create_vm(&config).and_then(|()| vmm.boot_vm()) {
            let causes: String = e.causes.iter().map(|c| format!(": {c}")).collect();
            return fail(format_args!("{}{causes}", e.error));
        }
    }
    if let Some((cfg, serial, nets, disks)) = colo {
        vmm.set_local_serial(serial);
        vmm.set_local_nets(nets);
        vmm.set_local_disks(disks);
        if let Err(e) = vmm.start_colo(&cfg) {
            let causes: String = e.causes.iter().map(|c| format!(": {c}")).collect();
            return fail(format_args!("{}{causes}", e.error));
        }
    }
    match vmm.run() {
        VmmExit::Guest(VmOutcome::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        VmmExit::Guest(VmOutcome::Reset) => {
            log::info!("guest reset");
            ExitCode::SUCCESS
        }
        VmmExit::Guest(VmOutcome::Crash(msg)) => {
            eprintln!("colovmm: guest crashed: {msg}");
            ExitCode::from(2)
        }
        VmmExit::Shutdown => {
            log::info!("VMM shut down through the API");
            ExitCode::SUCCESS
        }
    }
}
