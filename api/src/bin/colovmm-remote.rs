//! `colovmm-remote`: drives a running colovmm through its API socket.
//!
//! Exit codes: 0 success, 1 the server refused (its error and causes on stderr), 2 bad
//! usage or an unreadable config file, 3 the server could not be reached or answered
//! something that is not a reply.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::client::{self, ClientError};
use api::http::{Action, Route};
use api::{ApiError, VmInfo, VmmPingResponse};
use clap::{Parser, Subcommand};

/// Control a running colovmm through its API socket.
#[derive(Parser, Debug)]
#[command(name = "colovmm-remote", version)]
struct Cli {
    /// The socket colovmm was started with (`--api-socket path=FILE`).
    #[arg(long, value_name = "FILE")]
    api_socket: PathBuf,
    /// Print the server's JSON as is instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the reply.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = client::DEFAULT_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
enum Command {
    /// Check that the VMM answers (vmm.ping).
    Ping,
    /// Stop the VM, if any, and exit the VMM (vmm.shutdown).
    ShutdownVmm,
    /// Define the VM from a VmConfig JSON file, `-` for stdin (vm.create).
    Create {
        /// The JSON file.
        config: PathBuf,
    },
    /// Boot the created VM (vm.boot).
    Boot,
    /// Pause the vCPUs (vm.pause).
    Pause,
    /// Resume paused vCPUs (vm.resume).
    Resume,
    /// Stop the VM; the VMM stays up (vm.shutdown).
    Shutdown,
    /// Shut down and boot again (vm.reboot).
    Reboot,
    /// Show state, memory, vCPUs and devices (vm.info).
    Info,
    /// Show per-device I/O counters (vm.counters).
    Counters,
}

impl Command {
    fn action(&self) -> Action {
        match self {
            Command::Ping => Action::VmmPing,
            Command::ShutdownVmm => Action::VmmShutdown,
            Command::Create { .. } => Action::VmCreate,
            Command::Boot => Action::VmBoot,
            Command::Pause => Action::VmPause,
            Command::Resume => Action::VmResume,
            Command::Shutdown => Action::VmShutdown,
            Command::Reboot => Action::VmReboot,
            Command::Info => Action::VmInfo,
            Command::Counters => Action::VmCounters,
        }
    }

    /// What to say when an action succeeds with no content.
    fn done(&self) -> &'static str {
        match self {
            Command::ShutdownVmm => "VMM shutting down",
            Command::Create { .. } => "VM created",
            Command::Boot => "VM booted",
            Command::Pause => "VM paused",
            Command::Resume => "VM resumed",
            Command::Shutdown => "VM shut down",
            Command::Reboot => "VM rebooted",
            Command::Ping | Command::Info | Command::Counters => "done",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let body = match &cli.command {
        Command::Create { config } => match read_config(config) {
            Ok(b) => Some(b),
            Err(msg) => {
                eprintln!("colovmm-remote: {msg}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let route: &Route = cli.command.action().route();
    let reply = client::request_with_timeout(
        &cli.api_socket,
        route.method.as_str(),
        route.path,
        body.as_deref(),
        Duration::from_secs(cli.timeout),
    );
    let (status, body) = match reply {
        Ok(r) => r,
        Err(e) => {
            eprintln!("colovmm-remote: {}", chain(&e));
            return ExitCode::from(3);
        }
    };
    if status >= 400 {
        report_error(&client::api_error(status, &body));
        return ExitCode::from(1);
    }
    if cli.json {
        if !body.is_empty() {
            println!("{}", String::from_utf8_lossy(&body));
        }
    } else {
        println!("{}", human(&cli.command, &body));
    }
    ExitCode::SUCCESS
}

fn read_config(path: &PathBuf) -> Result<Vec<u8>, String> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading the config from stdin: {e}"))?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// An error and its sources on one line.
fn chain(e: &ClientError) -> String {
    let mut out = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(&format!(": {s}"));
        src = s.source();
    }
    out
}

fn report_error(e: &ApiError) {
    eprintln!("colovmm-remote: {} (HTTP {})", e.error, e.status);
    for c in &e.causes {
        eprintln!("  caused by: {c}");
    }
}

/// The default, human-readable rendering of a successful reply.
fn human(cmd: &Command, body: &[u8]) -> String {
    if body.is_empty() {
        return cmd.done().to_string();
    }
    let rendered = match cmd {
        Command::Ping => serde_json::from_slice::<VmmPingResponse>(body)
            .ok()
            .map(|p| format!("colovmm {} is up (pid {})", p.version, p.pid)),
        Command::Info => serde_json::from_slice::<VmInfo>(body)
            .ok()
            .map(|i| info_table(&i)),
        Command::Counters => serde_json::from_slice(body)
            .ok()
            .and_then(|v| counters_table(&v)),
        _ => None,
    };
    // A reply of an unexpected shape is still shown, as pretty JSON.
    rendered.unwrap_or_else(|| {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
    })
}

fn size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b % MIB == 0 => format!("{} MiB", b / MIB),
        b => format!("{b} bytes"),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>], indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            format!("{indent}{}", cells.join("  ").trim_end())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn info_table(i: &VmInfo) -> String {
    let c = &i.config;
    let mut rows = vec![
        vec!["state".into(), format!("{:?}", i.state)],
        vec!["memory".into(), size(i.memory_actual_size)],
        vec!["vcpus".into(), c.cpus.boot.to_string()],
        vec!["kernel".into(), c.payload.kernel.display().to_string()],
    ];
    if !c.payload.cmdline.is_empty() {
        rows.push(vec!["cmdline".into(), c.payload.cmdline.clone()]);
    }
    for (n, d) in c.disks.iter().enumerate() {
        let id = d.id.clone().unwrap_or_else(|| format!("disk{n}"));
        let mode = if d.readonly { "ro" } else { "rw" };
        rows.push(vec![
            "disk".into(),
            format!("{id}: {} ({mode})", d.path.display()),
        ]);
    }
    for n in &c.nets {
        let mac = n.mac.map(|m| format!(" mac {m}")).unwrap_or_default();
        rows.push(vec!["net".into(), format!("tap {}{mac}", n.tap)]);
    }
    let mut out = table(&rows, "");
    if !i.devices.is_empty() {
        let mut devs = vec![vec![
            "ID".to_string(),
            "KIND".into(),
            "BASE".into(),
            "IRQ".into(),
        ]];
        devs.extend(i.devices.iter().map(|d| {
            vec![
                d.id.clone(),
                d.kind.clone(),
                format!("{:#x}", d.base),
                d.irq.map_or_else(|| "-".into(), |q| q.to_string()),
            ]
        }));
        out.push_str("\ndevices\n");
        out.push_str(&table(&devs, "  "));
    }
    out
}

/// `{"dev": {"counter": n}}` as DEVICE / COUNTER / VALUE rows; `None` for any other shape.
fn counters_table(v: &serde_json::Value) -> Option<String> {
    let mut rows = vec![vec!["DEVICE".to_string(), "COUNTER".into(), "VALUE".into()]];
    for (dev, counters) in v.as_object()? {
        for (name, value) in counters.as_object()? {
            rows.push(vec![dev.clone(), name.clone(), value.as_u64()?.to_string()]);
        }
    }
    Some(table(&rows, ""))
}
