//! The `colovmm` command line (Cloud Hypervisor's syntax), turned into a [`VmConfig`].

use std::path::PathBuf;

use clap::Parser;

use crate::config::{
    ConfigError, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, SerialConfig,
    VmConfig,
};

/// colovmm: a KVM virtual machine monitor with COLO replication.
#[derive(Parser, Debug)]
#[command(name = "colovmm", version, about)]
pub struct Cli {
    /// Kernel: an ELF vmlinux with a PVH note, or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to pass to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest RAM: size=<bytes>[K|M|G].
    #[arg(long, default_value = "size=512M")]
    pub memory: String,
    /// vCPUs: boot=<n>.
    #[arg(long, default_value = "boot=1")]
    pub cpus: String,
    /// COM1: tty | off | file=PATH | socket=PATH.
    #[arg(long, default_value = "tty")]
    pub serial: String,
    /// virtio-blk disks: path=FILE[,readonly=on][,id=NAME] (repeatable).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub disk: Vec<String>,
    /// virtio-net cards: tap=NAME[,mac=MAC][,ip=ADDR,mask=MASK] (repeatable).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub net: Vec<String>,
    /// Restore a snapshot instead of booting: source_url=file:///DIR. The VM resumes at once.
    #[arg(long, value_name = "source_url=URL", conflicts_with = "kernel")]
    pub restore: Option<String>,
    /// COLO protection: role=primary,peer=HOST:PORT[,checkpoint-interval=MS][,channels=N]
    /// [,heartbeat-interval=MS,heartbeat-timeout=MS] protects the booted VM;
    /// role=secondary,listen=ADDR:PORT waits for a primary (no --kernel: the VM comes from it).
    #[arg(long, value_name = "role=...")]
    pub colo: Option<String>,
    /// HTTP API on a Unix socket: path=FILE. With only this, the VMM waits for vm.create.
    #[arg(long, value_name = "path=FILE")]
    pub api_socket: Option<String>,
    /// Lifecycle events as JSON lines: path=FILE or fd=N.
    #[arg(long, value_name = "path=FILE|fd=N")]
    pub event_monitor: Option<String>,
    /// seccomp filters per thread: true (enforce), log (allow and log), false (off).
    #[arg(long, default_value = "true", value_name = "true|false|log")]
    pub seccomp: crate::seccomp::SeccompMode,
    /// Write the VMM's log here instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// More log output (repeat for more).
    #[arg(short, action = clap::ArgAction::Count)]
    pub v: u8,
}

impl Cli {
    /// The snapshot URL of `--restore source_url=URL`.
    pub fn restore_url(&self) -> Result<Option<String>, ConfigError> {
        let Some(raw) = &self.restore else {
            return Ok(None);
        };
        match raw.strip_prefix("source_url=") {
            Some(url) if !url.is_empty() => Ok(Some(url.to_string())),
            _ => Err(ConfigError::InvalidValue {
                option: "restore",
                key: "source_url",
                value: raw.clone(),
                why: "expected source_url=file:///DIR".to_string(),
            }),
        }
    }

    /// The API socket's path, from `path=FILE`.
    pub fn api_socket_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        let Some(raw) = &self.api_socket else {
            return Ok(None);
        };
        api::parse_api_socket(raw)
            .map(Some)
            .map_err(|e| ConfigError::InvalidValue {
                option: "api-socket",
                key: "path",
                value: raw.clone(),
                why: e.to_string(),
            })
    }

    /// The `--colo` setting, validated.
    pub fn colo_config(&self) -> Result<Option<api::ColoConfig>, ConfigError> {
        self.colo.as_deref().map(api::ColoConfig::parse).transpose()
    }

    /// Validates the options into a VM configuration; `None` when no kernel is given but an
    /// API socket is (the VM will come from `vm.create`), or for a COLO secondary (its VM
    /// comes from the primary).
    pub fn vm_config(&self) -> Result<Option<VmConfig>, ConfigError> {
        let secondary = self
            .colo_config()?
            .is_some_and(|c| c.role == api::ColoRole::Secondary);
        let Some(kernel) = self.kernel.clone() else {
            return match (&self.api_socket, &self.restore) {
                _ if secondary => Ok(None),
                (Some(_), _) | (_, Some(_)) => Ok(None),
                (None, None) => Err(ConfigError::MissingKernel),
            };
        };
        if secondary {
            return Err(ConfigError::InvalidValue {
                option: "colo",
                key: "role",
                value: "secondary".into(),
                why: "a secondary takes its VM from the primary: drop --kernel".into(),
            });
        }
        Ok(Some(VmConfig {
            payload: PayloadConfig {
                kernel,
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
            },
            memory: MemoryConfig::parse(&self.memory)?,
            cpus: CpusConfig::parse(&self.cpus)?,
            serial: SerialConfig::parse(&self.serial)?,
            disks: self
                .disk
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<_, _>>()?,
            nets: self
                .net
                .iter()
                .map(|n| NetConfig::parse(n))
                .collect::<Result<_, _>>()?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, ConfigError> {
        Cli::try_parse_from(std::iter::once("colovmm").chain(args.iter().copied()))
            .unwrap()
            .vm_config()
            .map(|c| c.expect("a kernel was given"))
    }

    #[test]
    fn api_socket_alone_defers_the_vm() {
        let cli = Cli::try_parse_from(["colovmm", "--api-socket", "path=/tmp/a.sock"]).unwrap();
        assert_eq!(cli.vm_config(), Ok(None));
        assert_eq!(cli.api_socket_path().unwrap(), Some("/tmp/a.sock".into()));
        let bad = Cli::try_parse_from(["colovmm", "--api-socket", "fd=3"]).unwrap();
        assert!(bad.api_socket_path().is_err());
    }

    #[test]
    fn full_command_line() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--memory",
            "size=1G",
            "--cpus",
            "boot=2",
            "--serial",
            "off",
            "--cmdline",
            "a=b",
        ])
        .unwrap();
        assert_eq!(c.memory.size, 1 << 30);
        assert_eq!(c.cpus.boot, 2);
        assert_eq!(c.serial, SerialConfig::Off);
        assert_eq!(c.payload.cmdline, "a=b");
    }

    #[test]
    fn several_disks_and_nets() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--disk",
            "path=/a",
            "path=/b,readonly=on",
            "--net",
            "tap=t0",
            "--disk",
            "path=/c",
        ])
        .unwrap();
        assert_eq!(c.disks.len(), 3);
        assert!(c.disks[1].readonly);
        assert_eq!(c.nets.len(), 1);
    }

    #[test]
    fn colo_roles() {
        let cli = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("colovmm").chain(args.iter().copied())).unwrap()
        };
        let secondary = cli(&["--colo", "role=secondary,listen=0.0.0.0:9000"]);
        assert_eq!(secondary.vm_config(), Ok(None), "no kernel needed");
        assert!(cli(&[
            "--kernel",
            "/k",
            "--colo",
            "role=secondary,listen=0.0.0.0:9000"
        ])
        .vm_config()
        .is_err());
        let primary = cli(&[
            "--kernel",
            "/k",
            "--colo",
            "role=primary,peer=h:1,channels=4",
        ]);
        let c = primary.colo_config().unwrap().unwrap();
        assert_eq!(c.channel_count(), 4);
        assert!(primary.vm_config().unwrap().is_some());
        assert!(cli(&["--kernel", "/k", "--colo", "role=primary"])
            .colo_config()
            .is_err());
    }

    #[test]
    fn kernel_is_required() {
        assert_eq!(parse(&[]), Err(ConfigError::MissingKernel));
    }
}
