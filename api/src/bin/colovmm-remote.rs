//! `colovmm-remote`: drives a running colovmm through its API socket.
//!
//! Exit codes: 0 success, 1 the server refused (its error and causes on stderr) or a
//! migration waited for with `send-migration --wait` failed, 2 bad usage, an invalid URL or
//! value, or an unreadable config file, 3 the server could not be reached or answered
//! something that is not a reply.

#[path = "colovmm-remote/colo.rs"]
mod colo;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::client::{self, ClientError};
use api::http::{Action, Route};
use api::{
    ApiError, ColoCheckpointData, ColoConfig, ColoSetData, MemoryChecksum, MigrationPhase,
    MigrationStatus, ReceiveMigrationData, SendMigrationData, VmInfo, VmRestoreConfig,
    VmSnapshotConfig, VmmPingResponse,
};
use clap::{Parser, Subcommand};

/// How often `send-migration --wait` asks for the status.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long `--wait` accepts an idle status before deciding no migration runs.
const IDLE_GRACE: Duration = Duration::from_secs(5);

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
    /// Save the paused VM's state to a directory (vm.snapshot).
    Snapshot {
        /// `file:///DIR`: created if missing, must be empty.
        url: String,
    },
    /// Replace the VM by one restored from a snapshot; it comes up paused (vm.restore).
    Restore {
        /// `file:///DIR` written by `snapshot`.
        url: String,
    },
    /// Live-migrate the running VM to a receiving colovmm (vm.send-migration).
    SendMigration {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        url: String,
        /// Pause budget for the final round, 1..=60000 (the VMM's default: 300).
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Parallel connections for memory, 1..=16 (the VMM's default: 1).
        #[arg(long, value_name = "N")]
        channels: Option<u32>,
        /// Follow the migration (a progress line on stderr) until it completes or fails.
        #[arg(long)]
        wait: bool,
    },
    /// Wait for an incoming migration; this colovmm must have no VM (vm.receive-migration).
    ReceiveMigration {
        /// `tcp:ADDR:PORT` or `unix:PATH` to listen on.
        url: String,
    },
    /// Show the progress of the current or last migration (vm.migration-status).
    MigrationStatus,
    /// Start COLO replication (vm.colo-start).
    ColoStart {
        /// `role=primary,peer=HOST:PORT[,...]` or `role=secondary,listen=ADDR:PORT[,...]`,
        /// the syntax of colovmm's `--colo` (also `checkpoint-interval=MS`, `channels=N`,
        /// `heartbeat-interval=MS`, `heartbeat-timeout=MS`).
        spec: String,
    },
    /// Show COLO role, state and checkpoint statistics (vm.colo-status).
    ColoStatus,
    /// Stop replicating and carry on alone (vm.colo-failover).
    ColoFailover,
    /// Change settings of the running COLO pair (vm.colo-set).
    ColoSet {
        /// Longest time between checkpoints, 10..=3600000.
        #[arg(long, value_name = "MS")]
        checkpoint_interval: Option<u64>,
    },
    /// Take a COLO checkpoint now (vm.colo-checkpoint).
    ColoCheckpoint {
        /// Leave both VMs paused once it completes (to compare their memory).
        #[arg(long)]
        pause_after: bool,
    },
    /// CRC-32 over all guest RAM, to compare two VMs (vm.memory-checksum).
    MemoryChecksum,
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
            Command::Snapshot { .. } => Action::VmSnapshot,
            Command::Restore { .. } => Action::VmRestore,
            Command::SendMigration { .. } => Action::VmSendMigration,
            Command::ReceiveMigration { .. } => Action::VmReceiveMigration,
            Command::MigrationStatus => Action::VmMigrationStatus,
            Command::ColoStart { .. } => Action::VmColoStart,
            Command::ColoStatus => Action::VmColoStatus,
            Command::ColoFailover => Action::VmColoFailover,
            Command::ColoSet { .. } => Action::VmColoSet,
            Command::ColoCheckpoint { .. } => Action::VmColoCheckpoint,
            Command::MemoryChecksum => Action::VmMemoryChecksum,
        }
    }

    /// What to say when an action succeeds with no content.
    fn done(&self) -> String {
        match self {
            Command::ShutdownVmm => "VMM shutting down".into(),
            Command::Create { .. } => "VM created".into(),
            Command::Boot => "VM booted".into(),
            Command::Pause => "VM paused".into(),
            Command::Resume => "VM resumed".into(),
            Command::Shutdown => "VM shut down".into(),
            Command::Reboot => "VM rebooted".into(),
            Command::Snapshot { url } => format!("VM snapshot written to {url}"),
            Command::Restore { url } => format!("VM restored from {url} (paused)"),
            Command::SendMigration { url, .. } => format!("migration to {url} started"),
            Command::ReceiveMigration { url } => format!("waiting for a migration on {url}"),
            Command::ColoStart { spec } => colo::started(spec),
            Command::ColoFailover => "COLO failed over: the VM runs on alone".into(),
            Command::ColoSet {
                checkpoint_interval,
            } => match checkpoint_interval {
                Some(ms) => format!("COLO checkpoint interval set to {ms} ms"),
                None => "COLO settings unchanged".into(),
            },
            Command::ColoCheckpoint { pause_after: false } => "COLO checkpoint taken".into(),
            Command::ColoCheckpoint { pause_after: true } => {
                "COLO checkpoint taken; both VMs stay paused".into()
            }
            Command::Ping
            | Command::Info
            | Command::Counters
            | Command::MigrationStatus
            | Command::ColoStatus
            | Command::MemoryChecksum => "done".into(),
        }
    }

    /// The JSON body to send, checked as the server will check it.
    fn body(&self) -> Result<Option<Vec<u8>>, String> {
        fn encode<T: serde::Serialize>(
            body: &T,
            check: Result<(), api::ValidationError>,
        ) -> Result<Option<Vec<u8>>, String> {
            check.map_err(|e| format!("invalid argument: {e}"))?;
            serde_json::to_vec(body)
                .map(Some)
                .map_err(|e| e.to_string())
        }
        match self {
            Command::Create { config } => read_config(config).map(Some),
            Command::Snapshot { url } => {
                let b = VmSnapshotConfig {
                    destination_url: url.clone(),
                };
                encode(&b, b.validate())
            }
            Command::Restore { url } => {
                let b = VmRestoreConfig {
                    source_url: url.clone(),
                };
                encode(&b, b.validate())
            }
            Command::SendMigration {
                url,
                downtime_ms,
                channels,
                ..
            } => {
                let b = SendMigrationData {
                    destination_url: url.clone(),
                    downtime_ms: *downtime_ms,
                    channels: *channels,
                };
                encode(&b, b.validate())
            }
            Command::ReceiveMigration { url } => {
                let b = ReceiveMigrationData {
                    receiver_url: url.clone(),
                };
                encode(&b, b.validate())
            }
            Command::ColoStart { spec } => {
                let b = ColoConfig::parse(spec).map_err(|e| format!("invalid argument: {e}"))?;
                encode(&b, b.validate())
            }
            Command::ColoSet {
                checkpoint_interval: None,
            } => Err("colo-set: nothing to set: give --checkpoint-interval MS".into()),
            Command::ColoSet {
                checkpoint_interval,
            } => {
                let b = ColoSetData {
                    checkpoint_interval_ms: *checkpoint_interval,
                };
                encode(&b, b.validate())
            }
            Command::ColoCheckpoint { pause_after } => {
                let b = ColoCheckpointData {
                    pause_after: *pause_after,
                };
                encode(&b, Ok(()))
            }
            _ => Ok(None),
        }
    }
}

/// One request to the server; `Err` is the exit code, the error already reported.
fn call(cli: &Cli, action: Action, body: Option<&[u8]>) -> Result<Vec<u8>, ExitCode> {
    let route: &Route = action.route();
    let reply = client::request_with_timeout(
        &cli.api_socket,
        route.method.as_str(),
        route.path,
        body,
        Duration::from_secs(cli.timeout),
    );
    match reply {
        Ok((status, body)) if status < 400 => Ok(body),
        Ok((status, body)) => {
            report_error(&client::api_error(status, &body));
            Err(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("colovmm-remote: {}", chain(&e));
            Err(ExitCode::from(3))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let body = match cli.command.body() {
        Ok(b) => b,
        Err(msg) => {
            eprintln!("colovmm-remote: {msg}");
            return ExitCode::from(2);
        }
    };
    let body = match call(&cli, cli.command.action(), body.as_deref()) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if let Command::SendMigration { wait: true, .. } = cli.command {
        return wait_for_migration(&cli);
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
        return cmd.done();
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
        Command::MigrationStatus => serde_json::from_slice::<MigrationStatus>(body)
            .ok()
            .map(|s| migration_table(&s)),
        Command::ColoStatus => serde_json::from_slice(body)
            .ok()
            .and_then(|v| colo::status_table(&v)),
        Command::MemoryChecksum => serde_json::from_slice::<MemoryChecksum>(body)
            .ok()
            .map(|c| c.to_string()),
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

/// Bytes in binary units with one decimal (`512.0 MiB`), or plain below 1 KiB.
fn bytes_h(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Milliseconds as `850 ms`, `3.2s` or `4m05s`.
fn ms_h(ms: u64) -> String {
    match ms {
        m if m < 1000 => format!("{m} ms"),
        m if m < 60_000 => format!("{:.1}s", m as f64 / 1000.0),
        m => format!("{}m{:02}s", m / 60_000, (m % 60_000) / 1000),
    }
}

fn phase_name(p: MigrationPhase) -> &'static str {
    match p {
        MigrationPhase::Idle => "idle",
        MigrationPhase::Active => "active",
        MigrationPhase::Completed => "completed",
        MigrationPhase::Failed => "failed",
    }
}

/// Share of guest RAM sent, 0..=100 (later rounds resend pages, so it is capped).
fn percent(s: &MigrationStatus) -> u64 {
    match s.total_bytes {
        0 => 0,
        t => (u128::from(s.bytes) * 100 / u128::from(t)).min(100) as u64,
    }
}

fn migration_table(s: &MigrationStatus) -> String {
    let mut rows = vec![vec!["phase".to_string(), phase_name(s.phase).into()]];
    if s.phase != MigrationPhase::Idle {
        rows.extend([
            vec!["round".into(), s.round.to_string()],
            vec![
                "transferred".into(),
                format!(
                    "{} of {} ({}%)",
                    bytes_h(s.bytes),
                    bytes_h(s.total_bytes),
                    percent(s)
                ),
            ],
            vec!["dirty rate".into(), format!("{}/s", bytes_h(s.dirty_rate))],
        ]);
        if s.phase == MigrationPhase::Active {
            rows.push(vec!["eta".into(), ms_h(s.eta_ms)]);
        }
        if let Some(d) = s.downtime_ms {
            rows.push(vec!["downtime".into(), format!("{d:.1} ms")]);
        }
        rows.push(vec!["elapsed".into(), ms_h(s.elapsed_ms)]);
    }
    if let Some(e) = &s.error {
        rows.push(vec!["error".into(), e.clone()]);
    }
    table(&rows, "")
}

/// The one-line progress bar: `[#####-----]  50%  round 1  256.0 MiB/512.0 MiB ...`.
fn progress_line(s: &MigrationStatus) -> String {
    const WIDTH: u64 = 24;
    if s.phase == MigrationPhase::Idle {
        return "migration: waiting for it to start".into();
    }
    let pct = percent(s);
    let filled = (pct * WIDTH / 100) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    let eta = match s.phase {
        MigrationPhase::Active => format!("ETA {}", ms_h(s.eta_ms)),
        p => phase_name(p).to_string(),
    };
    format!(
        "migration [{bar}] {pct:>3}%  round {}  {}/{}  dirty {}/s  {eta}",
        s.round,
        bytes_h(s.bytes),
        bytes_h(s.total_bytes),
        bytes_h(s.dirty_rate)
    )
}

/// Draws the progress on stderr: redrawn in place on a terminal; elsewhere (a log, a pipe)
/// one line per round or phase change.
struct Progress {
    tty: bool,
    drawn: bool,
    last: Option<(MigrationPhase, u32)>,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            drawn: false,
            last: None,
        }
    }

    fn draw(&mut self, s: &MigrationStatus) {
        let mut line = progress_line(s);
        if self.tty {
            // A line that wraps could not be redrawn in place: cut it to the terminal.
            if let Some(cols) = stderr_columns() {
                line.truncate(line.len().min(cols.saturating_sub(1)));
            }
            eprint!("\r{line}\x1b[K");
            self.drawn = true;
        } else if self.last != Some((s.phase, s.round)) {
            eprintln!("{line}");
        }
        self.last = Some((s.phase, s.round));
    }

    /// Ends the redrawn line, so what follows starts on a fresh one.
    fn finish(&mut self) {
        if std::mem::take(&mut self.drawn) {
            eprintln!();
        }
    }
}

/// The width of the terminal on stderr, if it is one that says.
fn stderr_columns() -> Option<usize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize`, and `ws` is a live one.
    let r = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// `send-migration --wait`: polls `vm.migration-status` until completed (exit 0) or failed
/// (exit 1). With `--json`, every status is printed on stdout as one line of JSON.
fn wait_for_migration(cli: &Cli) -> ExitCode {
    let mut progress = Progress::new();
    let mut idle_since = None;
    loop {
        let body = match call(cli, Action::VmMigrationStatus, None) {
            Ok(b) => b,
            Err(code) => {
                progress.finish();
                return code;
            }
        };
        let status: MigrationStatus = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => {
                progress.finish();
                eprintln!("colovmm-remote: unexpected vm.migration-status reply: {e}");
                return ExitCode::from(3);
            }
        };
        if cli.json {
            println!("{}", String::from_utf8_lossy(&body));
        } else {
            progress.draw(&status);
        }
        match status.phase {
            MigrationPhase::Completed => {
                progress.finish();
                if !cli.json {
                    println!("{}", completed_line(&status));
                }
                return ExitCode::SUCCESS;
            }
            MigrationPhase::Failed => {
                progress.finish();
                let why = status.error.as_deref().unwrap_or("no reason given");
                eprintln!("colovmm-remote: migration failed: {why}");
                return ExitCode::from(1);
            }
            MigrationPhase::Idle => {
                let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= IDLE_GRACE {
                    progress.finish();
                    eprintln!("colovmm-remote: the VMM reports no migration running");
                    return ExitCode::from(1);
                }
            }
            MigrationPhase::Active => idle_since = None,
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn completed_line(s: &MigrationStatus) -> String {
    let rounds = if s.round == 1 { "round" } else { "rounds" };
    let downtime = s
        .downtime_ms
        .map(|d| format!(", downtime {d:.1} ms"))
        .unwrap_or_default();
    format!(
        "migration completed: {} sent in {} {rounds}, {}{downtime}",
        bytes_h(s.bytes),
        s.round,
        ms_h(s.elapsed_ms)
    )
}
