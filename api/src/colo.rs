//! COLO wire types: the replication configuration (the `--colo` option and `vm.colo-start`),
//! the `vm.colo-set` and `vm.colo-checkpoint` bodies, and `vm.memory-checksum`'s reply.
//!
//! The rules [`ColoConfig::validate`] applies:
//! - `role` `primary` needs `peer` (the secondary's `HOST:PORT`) and refuses `listen`;
//!   `secondary` needs `listen` (`ADDR:PORT`) and refuses `peer`. HOST is a name, an IPv4
//!   address or a bracketed IPv6 address (`[::1]:9000`); PORT is 1..=65535.
//! - `checkpoint_interval_ms` 10..=3600000 (default 500), `channels` 1..=16 (default 1),
//!   `heartbeat_interval_ms` 10..=10000 (default 100), `heartbeat_timeout_ms` 50..=60000
//!   (default 1000) and at least twice the heartbeat interval (defaults included).
//! - `key_file`, when given, is a non-empty path: the pre-shared key both sides authenticate
//!   every connection with (the file itself is read and checked when COLO starts).
//! - `compare_timeout_ms` 10..=600000 and `disk_completion` are the primary's only;
//!   `disk_layers` (a non-empty directory path) is the secondary's only.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{parse_kv_unique, ConfigError};
use crate::http::validate::{in_range, parse_host_port, url_error};
use crate::ValidationError;

/// Accepted `checkpoint_interval_ms`.
pub const CHECKPOINT_INTERVAL_MS: RangeInclusive<u64> = 10..=3_600_000;
/// `checkpoint_interval_ms` when unset.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 500;
/// Accepted `channels`.
pub const CHANNELS: RangeInclusive<u32> = 1..=16;
/// `channels` when unset.
pub const DEFAULT_CHANNELS: u32 = 1;
/// Accepted `heartbeat_interval_ms`.
pub const HEARTBEAT_INTERVAL_MS: RangeInclusive<u64> = 10..=10_000;
/// `heartbeat_interval_ms` when unset.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Accepted `heartbeat_timeout_ms` (also at least twice the heartbeat interval).
pub const HEARTBEAT_TIMEOUT_MS: RangeInclusive<u64> = 50..=60_000;
/// `heartbeat_timeout_ms` when unset.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 1000;

/// Accepted `compare_timeout_ms`.
pub const COMPARE_TIMEOUT_MS: RangeInclusive<u64> = 10..=600_000;
/// `compare_timeout_ms` when unset (QEMU colo-compare's).
pub const DEFAULT_COMPARE_TIMEOUT_MS: u64 = 3000;

/// The option name in CLI errors (`--colo`).
const OPTION: &str = "colo";
/// CLI keys and the JSON fields they set.
const KEYS: &[(&str, &str)] = &[
    ("role", "role"),
    ("peer", "peer"),
    ("listen", "listen"),
    ("checkpoint-interval", "checkpoint_interval_ms"),
    ("channels", "channels"),
    ("heartbeat-interval", "heartbeat_interval_ms"),
    ("heartbeat-timeout", "heartbeat_timeout_ms"),
    ("key-file", "key_file"),
    ("compare-timeout", "compare_timeout_ms"),
    ("disk-completion", "disk_completion"),
    ("disk-layers", "disk_layers"),
];
const CLI_KEYS: &[&str] = &[
    "role",
    "peer",
    "listen",
    "checkpoint-interval",
    "channels",
    "heartbeat-interval",
    "heartbeat-timeout",
    "key-file",
    "compare-timeout",
    "disk-completion",
    "disk-layers",
];

/// When a protected VM's disk write completes (primary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCompletion {
    /// Once the secondary holds the write too (the default).
    #[default]
    Replicated,
    /// Once the primary's image holds it: lower latency; the writes still in flight when a
    /// checkpoint pauses make that checkpoint wait for them.
    Local,
}

/// Which side of a COLO pair this VMM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColoRole {
    /// Runs the guest that serves clients and sends checkpoints to the secondary.
    Primary,
    /// Runs the replica and takes over when the primary fails.
    Secondary,
}

impl ColoRole {
    /// `primary` or `secondary`, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ColoRole::Primary => "primary",
            ColoRole::Secondary => "secondary",
        }
    }
}

impl fmt::Display for ColoRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// COLO replication settings: `--colo role=...` and the `vm.colo-start` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColoConfig {
    /// Primary or secondary.
    pub role: ColoRole,
    /// Primary only: the secondary's `HOST:PORT`.
    #[serde(default)]
    pub peer: Option<String>,
    /// Secondary only: the `ADDR:PORT` to listen on.
    #[serde(default)]
    pub listen: Option<String>,
    /// Longest time between checkpoints, in ms (default 500).
    #[serde(default)]
    pub checkpoint_interval_ms: Option<u64>,
    /// Parallel connections for checkpoint memory (default 1).
    #[serde(default)]
    pub channels: Option<u32>,
    /// Heartbeat period, in ms (default 100).
    #[serde(default)]
    pub heartbeat_interval_ms: Option<u64>,
    /// Silence after which the peer is declared dead, in ms (default 1000).
    #[serde(default)]
    pub heartbeat_timeout_ms: Option<u64>,
    /// A file holding the pre-shared key both sides authenticate their connections with
    /// (hex, at least 16 bytes, or a passphrase of at least 20 characters; mode 0600).
    #[serde(default)]
    pub key_file: Option<String>,
    /// Primary only: how long a packet of the PVM may wait for the SVM's before a checkpoint
    /// is taken, in ms (default 3000).
    #[serde(default)]
    pub compare_timeout_ms: Option<u64>,
    /// Primary only: when the guest's disk writes complete (default replicated).
    #[serde(default)]
    pub disk_completion: Option<DiskCompletion>,
    /// Secondary only: a directory for the replicas' hidden and active layers (sparse
    /// files); unset keeps them in memory.
    #[serde(default)]
    pub disk_layers: Option<String>,
}

impl ColoConfig {
    /// Parses `--colo role=primary,peer=HOST:PORT[,checkpoint-interval=MS][,channels=N]
    /// [,heartbeat-interval=MS][,heartbeat-timeout=MS]` or `role=secondary,listen=ADDR:PORT,...`,
    /// then validates it.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let kv = parse_kv_unique(OPTION, s, CLI_KEYS)?;
        let invalid = |key: &'static str, value: &str, why: &str| ConfigError::InvalidValue {
            option: OPTION,
            key,
            value: value.to_string(),
            why: why.to_string(),
        };
        let role = match kv.get("role").map(String::as_str) {
            Some("primary") => ColoRole::Primary,
            Some("secondary") => ColoRole::Secondary,
            Some(other) => return Err(invalid("role", other, "expected primary or secondary")),
            None => {
                return Err(ConfigError::MissingKey {
                    option: OPTION,
                    key: "role",
                    why: "expected role=primary or role=secondary".into(),
                })
            }
        };
        let ms = |key: &'static str| -> Result<Option<u64>, ConfigError> {
            kv.get(key)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| invalid(key, v, "expected a number of milliseconds"))
                })
                .transpose()
        };
        let channels = kv
            .get("channels")
            .map(|v| {
                v.parse::<u32>().map_err(|_| {
                    invalid(
                        "channels",
                        v,
                        &format!("expected {} to {}", CHANNELS.start(), CHANNELS.end()),
                    )
                })
            })
            .transpose()?;
        let config = Self {
            role,
            peer: kv.get("peer").cloned(),
            listen: kv.get("listen").cloned(),
            checkpoint_interval_ms: ms("checkpoint-interval")?,
            channels,
            heartbeat_interval_ms: ms("heartbeat-interval")?,
            heartbeat_timeout_ms: ms("heartbeat-timeout")?,
            key_file: kv.get("key-file").cloned(),
            compare_timeout_ms: ms("compare-timeout")?,
            disk_completion: match kv.get("disk-completion").map(String::as_str) {
                None => None,
                Some("replicated") => Some(DiskCompletion::Replicated),
                Some("local") => Some(DiskCompletion::Local),
                Some(other) => {
                    return Err(invalid(
                        "disk-completion",
                        other,
                        "expected replicated or local",
                    ))
                }
            },
            disk_layers: kv.get("disk-layers").cloned(),
        };
        config.validate().map_err(|e| config.cli_error(e))?;
        Ok(config)
    }

    /// Checks the role's address and the ranges (see the [module rules](self)).
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self.role {
            ColoRole::Primary => {
                check_address(
                    "peer",
                    self.peer.as_deref(),
                    "required with role primary: the secondary's HOST:PORT",
                )?;
                if self.listen.is_some() {
                    return Err(ValidationError::Field {
                        field: "listen",
                        why: "not allowed with role primary: only a secondary listens".into(),
                    });
                }
                in_range(
                    "compare_timeout_ms",
                    self.compare_timeout_ms,
                    &COMPARE_TIMEOUT_MS,
                )?;
                if self.disk_layers.is_some() {
                    return Err(ValidationError::Field {
                        field: "disk_layers",
                        why: "not allowed with role primary: the secondary keeps the layers".into(),
                    });
                }
            }
            ColoRole::Secondary => {
                if self.peer.is_some() {
                    return Err(ValidationError::Field {
                        field: "peer",
                        why: "not allowed with role secondary: it listens, the primary connects"
                            .into(),
                    });
                }
                if self.compare_timeout_ms.is_some() {
                    return Err(ValidationError::Field {
                        field: "compare_timeout_ms",
                        why: "not allowed with role secondary: the primary compares".into(),
                    });
                }
                if self.disk_completion.is_some() {
                    return Err(ValidationError::Field {
                        field: "disk_completion",
                        why: "not allowed with role secondary: the primary's writes complete"
                            .into(),
                    });
                }
                if self.disk_layers.as_deref().is_some_and(str::is_empty) {
                    return Err(ValidationError::Field {
                        field: "disk_layers",
                        why: "must be a directory path".into(),
                    });
                }
                check_address(
                    "listen",
                    self.listen.as_deref(),
                    "required with role secondary: the ADDR:PORT to listen on",
                )?;
            }
        }
        in_range(
            "checkpoint_interval_ms",
            self.checkpoint_interval_ms,
            &CHECKPOINT_INTERVAL_MS,
        )?;
        in_range("channels", self.channels, &CHANNELS)?;
        in_range(
            "heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            &HEARTBEAT_INTERVAL_MS,
        )?;
        in_range(
            "heartbeat_timeout_ms",
            self.heartbeat_timeout_ms,
            &HEARTBEAT_TIMEOUT_MS,
        )?;
        if self.key_file.as_deref().is_some_and(str::is_empty) {
            return Err(ValidationError::Field {
                field: "key_file",
                why: "must be a path".into(),
            });
        }
        let interval = self
            .heartbeat_interval_ms
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS);
        let timeout = self
            .heartbeat_timeout_ms
            .unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT_MS);
        if timeout < interval.saturating_mul(2) {
            return Err(match self.heartbeat_timeout_ms {
                Some(_) => ValidationError::Field {
                    field: "heartbeat_timeout_ms",
                    why: format!(
                        "{timeout} ms is less than twice the heartbeat interval ({interval} ms)"
                    ),
                },
                None => ValidationError::Field {
                    field: "heartbeat_interval_ms",
                    why: format!(
                        "{interval} ms is more than half the default heartbeat timeout \
                         ({timeout} ms); give a longer timeout too"
                    ),
                },
            });
        }
        Ok(())
    }

    /// The peer (primary) or listen (secondary) address, if set.
    pub fn address(&self) -> Option<&str> {
        match self.role {
            ColoRole::Primary => self.peer.as_deref(),
            ColoRole::Secondary => self.listen.as_deref(),
        }
    }

    /// Longest time between checkpoints, [`DEFAULT_CHECKPOINT_INTERVAL_MS`] when unset.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(
            self.checkpoint_interval_ms
                .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL_MS),
        )
    }

    /// Connections for checkpoint memory, [`DEFAULT_CHANNELS`] when unset.
    pub fn channel_count(&self) -> u16 {
        u16::try_from(self.channels.unwrap_or(DEFAULT_CHANNELS)).unwrap_or(u16::MAX)
    }

    /// Heartbeat period, [`DEFAULT_HEARTBEAT_INTERVAL_MS`] when unset.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(
            self.heartbeat_interval_ms
                .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS),
        )
    }

    /// Peer silence that counts as its death, [`DEFAULT_HEARTBEAT_TIMEOUT_MS`] when unset.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(
            self.heartbeat_timeout_ms
                .unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT_MS),
        )
    }

    /// The primary's compare timeout, [`DEFAULT_COMPARE_TIMEOUT_MS`] when unset.
    pub fn compare_timeout(&self) -> Duration {
        Duration::from_millis(
            self.compare_timeout_ms
                .unwrap_or(DEFAULT_COMPARE_TIMEOUT_MS),
        )
    }

    /// The value given for a JSON field, as the CLI would show it (`None` if unset).
    fn field_value(&self, field: &str) -> Option<String> {
        let n = |v: Option<u64>| v.map(|v| v.to_string());
        match field {
            "peer" => self.peer.clone(),
            "listen" => self.listen.clone(),
            "checkpoint_interval_ms" => n(self.checkpoint_interval_ms),
            "channels" => n(self.channels.map(u64::from)),
            "heartbeat_interval_ms" => n(self.heartbeat_interval_ms),
            "heartbeat_timeout_ms" => n(self.heartbeat_timeout_ms),
            "key_file" => self.key_file.clone(),
            "compare_timeout_ms" => n(self.compare_timeout_ms),
            "disk_completion" => self.disk_completion.map(|c| {
                match c {
                    DiskCompletion::Replicated => "replicated",
                    DiskCompletion::Local => "local",
                }
                .to_string()
            }),
            "disk_layers" => self.disk_layers.clone(),
            _ => Some(self.role.to_string()),
        }
    }

    /// A validation error reworded for the CLI: its key names, the value as typed.
    fn cli_error(&self, e: ValidationError) -> ConfigError {
        let (field, why) = match e {
            ValidationError::OutOfRange {
                field, min, max, ..
            } => (field, format!("expected {min} to {max}")),
            ValidationError::Url { field, why, .. } | ValidationError::Field { field, why } => {
                (field, why)
            }
            other @ ValidationError::NothingToSet { .. } => ("role", other.to_string()),
        };
        let key = KEYS
            .iter()
            .find(|(_, f)| *f == field)
            .map_or("role", |(k, _)| *k);
        match self.field_value(field) {
            Some(value) => ConfigError::InvalidValue {
                option: OPTION,
                key,
                value,
                why,
            },
            None => ConfigError::MissingKey {
                option: OPTION,
                key,
                why,
            },
        }
    }
}

/// Checks a required `HOST:PORT` field.
fn check_address(
    field: &'static str,
    value: Option<&str>,
    missing: &str,
) -> Result<(), ValidationError> {
    let value = value.ok_or_else(|| ValidationError::Field {
        field,
        why: missing.to_string(),
    })?;
    if value.starts_with("tcp:") || value.starts_with("unix:") || value.contains("://") {
        return Err(url_error(
            field,
            value,
            "expected HOST:PORT, without a scheme",
        ));
    }
    parse_host_port(value, "")
        .map(drop)
        .map_err(|why| url_error(field, value, why))
}

/// `vm.colo-set` body: settings changed on a running COLO pair (at least one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColoSetData {
    /// New longest time between checkpoints, in ms (10..=3600000).
    #[serde(default)]
    pub checkpoint_interval_ms: Option<u64>,
}

impl ColoSetData {
    /// Checks that something is set, and the ranges.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.checkpoint_interval_ms.is_none() {
            return Err(ValidationError::NothingToSet {
                fields: "checkpoint_interval_ms",
            });
        }
        in_range(
            "checkpoint_interval_ms",
            self.checkpoint_interval_ms,
            &CHECKPOINT_INTERVAL_MS,
        )
    }

    /// The new checkpoint interval, if one is set.
    pub fn checkpoint_interval(&self) -> Option<Duration> {
        self.checkpoint_interval_ms.map(Duration::from_millis)
    }
}

/// `vm.colo-checkpoint` body (an empty body means the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColoCheckpointData {
    /// Test hook: once this checkpoint completes, both VMs stay paused (to compare memory).
    #[serde(default)]
    pub pause_after: bool,
}

/// `vm.memory-checksum` reply: a CRC-32 over all guest RAM, to compare two VMs' memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryChecksum {
    /// CRC-32 (IEEE) of guest RAM, in guest-physical order.
    pub crc32: u32,
    /// Bytes covered.
    pub bytes: u64,
}

impl fmt::Display for MemoryChecksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "crc32={:#010x} bytes={}", self.crc32, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(peer: &str) -> ColoConfig {
        ColoConfig {
            role: ColoRole::Primary,
            peer: Some(peer.into()),
            listen: None,
            checkpoint_interval_ms: None,
            channels: None,
            heartbeat_interval_ms: None,
            heartbeat_timeout_ms: None,
            key_file: None,
            compare_timeout_ms: None,
            disk_completion: None,
            disk_layers: None,
        }
    }

    #[test]
    fn parses_the_cli_syntax() {
        let c = ColoConfig::parse(
            "role=primary,peer=10.0.0.2:9000,checkpoint-interval=600,channels=4,\
             heartbeat-interval=100,heartbeat-timeout=1000",
        )
        .unwrap();
        assert_eq!(
            c,
            ColoConfig {
                role: ColoRole::Primary,
                peer: Some("10.0.0.2:9000".into()),
                listen: None,
                checkpoint_interval_ms: Some(600),
                channels: Some(4),
                heartbeat_interval_ms: Some(100),
                heartbeat_timeout_ms: Some(1000),
                key_file: None,
                compare_timeout_ms: None,
                disk_completion: None,
                disk_layers: None,
            }
        );
        assert_eq!(c.checkpoint_interval(), Duration::from_millis(600));
        assert_eq!(c.channel_count(), 4);
        assert_eq!(c.address(), Some("10.0.0.2:9000"));

        let s = ColoConfig::parse("role=secondary,listen=0.0.0.0:9000").unwrap();
        assert_eq!(s.role, ColoRole::Secondary);
        assert_eq!(s.listen.as_deref(), Some("0.0.0.0:9000"));
        assert_eq!(s.address(), Some("0.0.0.0:9000"));
        assert_eq!(
            (
                s.checkpoint_interval(),
                s.channel_count(),
                s.heartbeat_interval(),
                s.heartbeat_timeout()
            ),
            (
                Duration::from_millis(500),
                1,
                Duration::from_millis(100),
                Duration::from_millis(1000)
            )
        );
        for ok in [
            "role=primary,peer=[::1]:9000",
            "role=primary,peer=backup.example:1",
            "peer=h:65535,role=primary",
            "role=secondary,listen=[::]:9000,channels=16,checkpoint-interval=10",
            "role=secondary,listen=h:1,heartbeat-interval=10000,heartbeat-timeout=60000",
            "role=secondary,listen=h:1,heartbeat-interval=25,heartbeat-timeout=50",
            "role=secondary,listen=h:1,disk-layers=/dev/shm/colo",
        ] {
            assert!(ColoConfig::parse(ok).is_ok(), "{ok}");
        }
        let c = ColoConfig::parse("role=primary,peer=h:1,disk-completion=local").unwrap();
        assert_eq!(c.disk_completion, Some(DiskCompletion::Local));
    }

    #[test]
    fn cli_errors_name_the_key() {
        for (bad, want) in [
            ("", "--colo: missing role: expected role=primary or role=secondary"),
            ("peer=h:1", "missing role"),
            ("role=tertiary,peer=h:1", "invalid role 'tertiary': expected primary or secondary"),
            ("role=primary,peer=h:1,bogus=1", "unknown key 'bogus'"),
            ("role=primary,peer=h:1,checkpoint_interval=5", "unknown key 'checkpoint_interval'"),
            ("role=primary,peer=a:1,peer=b:1", "--colo: key 'peer' given more than once"),
            ("role=primary,role=primary,peer=a:1", "key 'role' given more than once"),
            ("role=primary,peer", "'peer' is not key=value"),
            ("role=primary", "--colo: missing peer: required with role primary"),
            ("role=secondary", "missing listen: required with role secondary"),
            ("role=primary,peer=h:1,disk-completion=later", "invalid disk-completion 'later'"),
            ("role=primary,peer=h:1,disk-layers=/tmp", "disk-layers"),
            ("role=secondary,listen=h:1,disk-completion=local", "disk-completion"),
            ("role=primary,peer=h:1,listen=h:2", "invalid listen 'h:2': not allowed with role primary"),
            ("role=secondary,listen=h:1,peer=h:2", "invalid peer 'h:2': not allowed with role secondary"),
            ("role=primary,peer=h", "invalid peer 'h': expected HOST:PORT; the :PORT is missing"),
            ("role=primary,peer=h:0", "invalid peer 'h:0': the port \"0\" is not a number in 1..=65535"),
            ("role=primary,peer=h:65536", "1..=65535"),
            ("role=primary,peer=:9000", "the HOST is missing"),
            ("role=primary,peer=::1:9000", "brackets: [ADDR]:PORT"),
            ("role=primary,peer=[zz]:9000", "not an IPv6 address"),
            ("role=primary,peer=a b:1", "not a host name"),
            ("role=primary,peer=", "invalid peer ''"),
            ("role=primary,peer=h:1,checkpoint-interval=abc", "invalid checkpoint-interval 'abc': expected a number of milliseconds"),
            ("role=primary,peer=h:1,checkpoint-interval=-1", "invalid checkpoint-interval '-1'"),
            ("role=primary,peer=h:1,checkpoint-interval=9", "invalid checkpoint-interval '9': expected 10 to 3600000"),
            ("role=primary,peer=h:1,checkpoint-interval=3600001", "expected 10 to 3600000"),
            ("role=primary,peer=h:1,channels=0", "invalid channels '0': expected 1 to 16"),
            ("role=primary,peer=h:1,channels=17", "invalid channels '17': expected 1 to 16"),
            ("role=primary,peer=h:1,channels=x", "invalid channels 'x': expected 1 to 16"),
            ("role=primary,peer=h:1,heartbeat-interval=9", "invalid heartbeat-interval '9': expected 10 to 10000"),
            ("role=primary,peer=h:1,heartbeat-timeout=49", "invalid heartbeat-timeout '49': expected 50 to 60000"),
            ("role=primary,peer=h:1,heartbeat-interval=100,heartbeat-timeout=150", "invalid heartbeat-timeout '150': 150 ms is less than twice the heartbeat interval (100 ms)"),
            ("role=primary,peer=h:1,heartbeat-interval=600", "invalid heartbeat-interval '600': 600 ms is more than half the default heartbeat timeout (1000 ms)"),
        ] {
            let e = ColoConfig::parse(bad).map(|c| panic!("{bad:?} accepted: {c:?}")).unwrap_err();
            assert!(e.to_string().contains(want), "{bad:?}: {e}");
        }
        assert!(matches!(
            ColoConfig::parse("role=primary,peer=a:1,peer=a:1"),
            Err(ConfigError::DuplicateKey { key: "peer", .. })
        ));
        assert!(matches!(
            ColoConfig::parse("role=secondary"),
            Err(ConfigError::MissingKey { key: "listen", .. })
        ));
    }

    #[test]
    fn validate_uses_the_json_field_names() {
        assert!(primary("h:1").validate().is_ok());
        let e = primary("h").validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"peer "h": expected HOST:PORT; the :PORT is missing"#
        );
        let mut c = primary("h:1");
        c.channels = Some(0);
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "channels 0 is out of range 1..=16"
        );
        let mut c = primary("h:1");
        c.heartbeat_timeout_ms = Some(150);
        c.heartbeat_interval_ms = Some(100);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("heartbeat_timeout_ms: 150 ms is less than twice"));
        c.heartbeat_timeout_ms = Some(200);
        assert!(c.validate().is_ok());
        let mut c = primary("h:1");
        c.peer = None;
        assert!(matches!(
            c.validate(),
            Err(ValidationError::Field { field: "peer", .. })
        ));
        c.role = ColoRole::Secondary;
        c.listen = Some("[::1]:9000".into());
        assert!(c.validate().is_ok());
        c.checkpoint_interval_ms = Some(3_600_001);
        assert!(matches!(
            c.validate(),
            Err(ValidationError::OutOfRange {
                field: "checkpoint_interval_ms",
                ..
            })
        ));
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let c = ColoConfig::parse("role=primary,peer=[::1]:9000,channels=2").unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["role"], "primary");
        assert_eq!(json["listen"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<ColoConfig>(json).unwrap(), c);
        let minimal: ColoConfig =
            serde_json::from_str(r#"{"role":"secondary","listen":"0.0.0.0:9000"}"#).unwrap();
        assert_eq!(minimal.channels, None);
        for bad in [
            r#"{"role":"secondary","listen":"h:1","bogus":1}"#,
            r#"{"role":"Primary","peer":"h:1"}"#,
            r#"{"peer":"h:1"}"#,
            r#"{"role":"primary","peer":"h:1","channels":-1}"#,
        ] {
            assert!(serde_json::from_str::<ColoConfig>(bad).is_err(), "{bad}");
        }

        let set: ColoSetData = serde_json::from_str(r#"{"checkpoint_interval_ms":250}"#).unwrap();
        assert!(set.validate().is_ok());
        assert_eq!(set.checkpoint_interval(), Some(Duration::from_millis(250)));
        assert!(serde_json::from_str::<ColoSetData>(r#"{"channels":2}"#).is_err());
        let empty: ColoSetData = serde_json::from_str("{}").unwrap();
        assert_eq!(
            empty.validate().unwrap_err().to_string(),
            "nothing to set: give at least one of checkpoint_interval_ms"
        );
        let e = ColoSetData {
            checkpoint_interval_ms: Some(5),
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "checkpoint_interval_ms 5 is out of range 10..=3600000"
        );

        let cp: ColoCheckpointData = serde_json::from_str("{}").unwrap();
        assert_eq!(cp, ColoCheckpointData::default());
        let cp: ColoCheckpointData = serde_json::from_str(r#"{"pause_after":true}"#).unwrap();
        assert!(cp.pause_after);
        assert!(serde_json::from_str::<ColoCheckpointData>(r#"{"pause":true}"#).is_err());
        assert!(serde_json::from_str::<ColoCheckpointData>(r#"{"pause_after":1}"#).is_err());

        let sum = MemoryChecksum {
            crc32: 0xbeef,
            bytes: 4096,
        };
        assert_eq!(sum.to_string(), "crc32=0x0000beef bytes=4096");
        let json = serde_json::to_string(&sum).unwrap();
        assert_eq!(json, r#"{"crc32":48879,"bytes":4096}"#);
        assert_eq!(serde_json::from_str::<MemoryChecksum>(&json).unwrap(), sum);
    }
}
