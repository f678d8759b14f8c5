//! The VM's configuration: what the CLI (and later the API) builds, and its validation.
//!
//! Option strings follow Cloud Hypervisor's `key=value,key=value` syntax.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A configuration problem, worded for the user who typed it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--kernel` is required to boot.
    #[error("no kernel given: use --kernel PATH")]
    MissingKernel,
    /// A key the option does not know.
    #[error("--{option}: unknown key '{key}' (known: {known})")]
    UnknownKey {
        /// The option (e.g. "memory").
        option: &'static str,
        /// The key that was given.
        key: String,
        /// The keys the option accepts.
        known: String,
    },
    /// A `key=value` word without `=` or with an empty key.
    #[error("--{option}: '{word}' is not key=value")]
    NotKeyValue {
        /// The option.
        option: &'static str,
        /// The offending word.
        word: String,
    },
    /// A key given twice where the option takes it once.
    #[error("--{option}: key '{key}' given more than once")]
    DuplicateKey {
        /// The option.
        option: &'static str,
        /// The repeated key.
        key: &'static str,
    },
    /// A key the option needs (alone, or with the other keys given).
    #[error("--{option}: missing {key}: {why}")]
    MissingKey {
        /// The option.
        option: &'static str,
        /// The key that is needed.
        key: &'static str,
        /// When and why it is needed.
        why: String,
    },
    /// A value that does not parse or is out of range.
    #[error("--{option}: invalid {key} '{value}': {why}")]
    InvalidValue {
        /// The option.
        option: &'static str,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it was refused.
        why: String,
    },
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Splits `a=1,b=2` into a map, refusing unknown keys (a repeated key keeps its last value).
fn parse_kv(
    option: &'static str,
    input: &str,
    known: &'static [&'static str],
) -> Result<BTreeMap<&'static str, String>> {
    split_kv(option, input, known, false)
}

/// [`parse_kv`] that also refuses a key given twice.
pub(crate) fn parse_kv_unique(
    option: &'static str,
    input: &str,
    known: &'static [&'static str],
) -> Result<BTreeMap<&'static str, String>> {
    split_kv(option, input, known, true)
}

fn split_kv(
    option: &'static str,
    input: &str,
    known: &'static [&'static str],
    unique: bool,
) -> Result<BTreeMap<&'static str, String>> {
    let mut out = BTreeMap::new();
    for word in input.split(',').filter(|w| !w.is_empty()) {
        let (key, value) = word
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| ConfigError::NotKeyValue {
                option,
                word: word.to_string(),
            })?;
        let known_key =
            known
                .iter()
                .find(|k| **k == key)
                .ok_or_else(|| ConfigError::UnknownKey {
                    option,
                    key: key.to_string(),
                    known: known.join(", "),
                })?;
        if out.insert(*known_key, value.to_string()).is_some() && unique {
            return Err(ConfigError::DuplicateKey {
                option,
                key: known_key,
            });
        }
    }
    Ok(out)
}

/// Parses sizes like `512M`, `1G`, `4096K` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// Guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of RAM.
    pub size: u64,
}

/// Smallest and largest RAM we accept: the boot structures need the first MiB, and the
/// layout keeps everything under 1 TiB.
pub const MIN_MEMORY: u64 = 16 << 20;
const MAX_MEMORY: u64 = 1 << 40;

impl MemoryConfig {
    /// Parses `--memory size=512M`.
    pub fn parse(s: &str) -> Result<Self> {
        let kv = parse_kv("memory", s, &["size"])?;
        let Some(raw) = kv.get("size") else {
            return Ok(Self::default());
        };
        let invalid = |why: &str| ConfigError::InvalidValue {
            option: "memory",
            key: "size",
            value: raw.clone(),
            why: why.to_string(),
        };
        let size = parse_size(raw).ok_or_else(|| invalid("expected a size such as 512M or 2G"))?;
        let config = Self { size };
        config.validate()?;
        Ok(config)
    }

    /// Checks the size is one we can give a guest.
    pub fn validate(&self) -> Result<()> {
        let why = if self.size < MIN_MEMORY {
            "at least 16M is needed"
        } else if self.size > MAX_MEMORY {
            "at most 1T is supported"
        } else if !self.size.is_multiple_of(4096) {
            "must be a multiple of 4K"
        } else {
            return Ok(());
        };
        Err(ConfigError::InvalidValue {
            option: "memory",
            key: "size",
            value: self.size.to_string(),
            why: why.to_string(),
        })
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { size: 512 << 20 }
    }
}

/// Virtual CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    pub boot: u8,
}

/// Upper bound on vCPUs: APIC ids must fit the xAPIC's 8 bits and the MADT's u8 uids.
pub const MAX_VCPUS: u8 = 254;

impl CpusConfig {
    /// Parses `--cpus boot=N`.
    pub fn parse(s: &str) -> Result<Self> {
        let kv = parse_kv("cpus", s, &["boot"])?;
        let Some(raw) = kv.get("boot") else {
            return Ok(Self::default());
        };
        let boot = raw.parse::<u8>().unwrap_or(0);
        let config = Self { boot };
        config.validate().map_err(|_| ConfigError::InvalidValue {
            option: "cpus",
            key: "boot",
            value: raw.clone(),
            why: format!("expected 1 to {MAX_VCPUS}"),
        })?;
        Ok(config)
    }

    /// Checks the vCPU count.
    pub fn validate(&self) -> Result<()> {
        if (1..=MAX_VCPUS).contains(&self.boot) {
            return Ok(());
        }
        Err(ConfigError::InvalidValue {
            option: "cpus",
            key: "boot",
            value: self.boot.to_string(),
            why: format!("expected 1 to {MAX_VCPUS}"),
        })
    }
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self { boot: 1 }
    }
}

/// Where COM1 is connected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", content = "path", rename_all = "lowercase")]
pub enum SerialConfig {
    /// colovmm's stdin/stdout.
    #[default]
    Tty,
    /// Output to a file (no input).
    File(PathBuf),
    /// A Unix socket: output to, and input from, the connected client.
    Socket(PathBuf),
    /// Not connected (the UART is still there).
    Off,
}

impl SerialConfig {
    /// Parses `--serial tty|off|file=PATH|socket=PATH`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tty" => return Ok(Self::Tty),
            "off" | "null" => return Ok(Self::Off),
            _ => {}
        }
        let kv = parse_kv("serial", s, &["file", "socket"])?;
        match (kv.get("file"), kv.get("socket")) {
            (Some(f), None) if !f.is_empty() => Ok(Self::File(f.into())),
            (None, Some(p)) if !p.is_empty() => Ok(Self::Socket(p.into())),
            _ => Err(ConfigError::InvalidValue {
                option: "serial",
                key: "mode",
                value: s.to_string(),
                why: "expected tty, off, file=PATH or socket=PATH".to_string(),
            }),
        }
    }
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// An ELF vmlinux with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// An optional initramfs.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// Name, also the GET_ID answer (defaults to `disk<N>`).
    #[serde(default)]
    pub id: Option<String>,
}

fn parse_on_off(option: &'static str, key: &'static str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::InvalidValue {
            option,
            key,
            value: v.to_string(),
            why: "expected on or off".to_string(),
        }),
    }
}

impl DiskConfig {
    /// Parses `--disk path=FILE[,readonly=on][,id=NAME]`.
    pub fn parse(s: &str) -> Result<Self> {
        let kv = parse_kv("disk", s, &["path", "readonly", "id"])?;
        let path =
            kv.get("path")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| ConfigError::InvalidValue {
                    option: "disk",
                    key: "path",
                    value: s.to_string(),
                    why: "path=FILE is required".to_string(),
                })?;
        let readonly = match kv.get("readonly") {
            Some(v) => parse_on_off("disk", "readonly", v)?,
            None => false,
        };
        let config = Self {
            path: path.into(),
            readonly,
            id: kv.get("id").cloned(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the path and the id.
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::InvalidValue {
                option: "disk",
                key: "path",
                value: String::new(),
                why: "path=FILE is required".to_string(),
            });
        }
        if let Some(id) = &self.id {
            if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::InvalidValue {
                    option: "disk",
                    key: "id",
                    value: id.clone(),
                    why: "1 to 20 printable characters".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// One virtio-net card on a tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap interface name (created if missing).
    pub tap: String,
    /// Guest MAC (defaults to a locally administered one derived from the tap name).
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Host-side IPv4 address of the tap.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Netmask of `ip`.
    #[serde(default)]
    pub mask: Option<Ipv4Addr>,
}

/// A MAC address; `aa:bb:cc:dd:ee:ff` in JSON and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_mac(&s)
            .map(MacAddr)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid MAC address '{s}'")))
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    /// Parses `--net tap=NAME[,mac=MAC][,ip=A.B.C.D,mask=A.B.C.D]`.
    pub fn parse(s: &str) -> Result<Self> {
        let kv = parse_kv("net", s, &["tap", "mac", "ip", "mask"])?;
        let invalid = |key: &'static str, value: &str, why: &str| ConfigError::InvalidValue {
            option: "net",
            key,
            value: value.to_string(),
            why: why.to_string(),
        };
        let tap = kv
            .get("tap")
            .cloned()
            .ok_or_else(|| invalid("tap", s, "tap=NAME is required"))?;
        if tap.is_empty() || tap.len() > 15 || tap.contains(['/', ' ', '\0']) {
            return Err(invalid(
                "tap",
                &tap,
                "an interface name of 1 to 15 characters",
            ));
        }
        let mac = match kv.get("mac") {
            Some(m) => Some(
                parse_mac(m)
                    .filter(|m| m[0] & 1 == 0)
                    .map(MacAddr)
                    .ok_or_else(|| invalid("mac", m, "expected a unicast aa:bb:cc:dd:ee:ff"))?,
            ),
            None => None,
        };
        let ip = |key: &'static str| -> Result<Option<std::net::Ipv4Addr>> {
            kv.get(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| invalid(key, v, "expected an IPv4 address"))
                })
                .transpose()
        };
        let (ip, mask) = match (ip("ip")?, ip("mask")?) {
            (Some(a), m) => (Some(a), Some(m.unwrap_or(Ipv4Addr::new(255, 255, 255, 0)))),
            (None, Some(m)) => return Err(invalid("mask", &m.to_string(), "mask needs ip")),
            (None, None) => (None, None),
        };
        let config = Self { tap, mac, ip, mask };
        config.validate()?;
        Ok(config)
    }

    /// Checks the tap name and that the MAC is unicast.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &'static str, value: String, why: &str| ConfigError::InvalidValue {
            option: "net",
            key,
            value,
            why: why.to_string(),
        };
        let tap = &self.tap;
        if tap.is_empty() || tap.len() > 15 || tap.contains(['/', ' ', '\0']) {
            return Err(invalid(
                "tap",
                tap.clone(),
                "an interface name of 1 to 15 characters",
            ));
        }
        if let Some(mac) = self.mac.filter(|m| m.0[0] & 1 != 0) {
            return Err(invalid("mac", mac.to_string(), "must be a unicast address"));
        }
        if self.mask.is_some() && self.ip.is_none() {
            return Err(invalid("mask", format!("{:?}", self.mask), "mask needs ip"));
        }
        Ok(())
    }
}

impl VmConfig {
    /// Checks every part (the CLI parsers already do; JSON from the API needs it).
    pub fn validate(&self) -> Result<()> {
        if self.payload.kernel.as_os_str().is_empty() {
            return Err(ConfigError::MissingKernel);
        }
        self.memory.validate()?;
        self.cpus.validate()?;
        self.disks.iter().try_for_each(DiskConfig::validate)?;
        self.nets.iter().try_for_each(NetConfig::validate)
    }
}

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, initramfs, command line.
    pub payload: PayloadConfig,
    /// RAM.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// COM1.
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-blk disks, in guest order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards, in guest order.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999G"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn memory_option() {
        assert_eq!(MemoryConfig::parse("size=1G").unwrap().size, 1 << 30);
        assert!(matches!(
            MemoryConfig::parse("size=0"),
            Err(ConfigError::InvalidValue { .. })
        ));
        assert!(matches!(
            MemoryConfig::parse("sise=1G"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            MemoryConfig::parse("1G"),
            Err(ConfigError::NotKeyValue { .. })
        ));
        let msg = MemoryConfig::parse("size=0").unwrap_err().to_string();
        assert!(msg.contains("--memory") && msg.contains("size"), "{msg}");
    }

    #[test]
    fn cpus_option() {
        assert_eq!(CpusConfig::parse("boot=2").unwrap().boot, 2);
        assert!(CpusConfig::parse("boot=0").is_err());
        assert!(CpusConfig::parse("boot=255").is_err());
        assert!(CpusConfig::parse("max=2").is_err());
    }

    #[test]
    fn disk_option() {
        let d = DiskConfig::parse("path=/a.img,readonly=on,id=root").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("root"));
        assert!(!DiskConfig::parse("path=/b").unwrap().readonly);
        assert!(DiskConfig::parse("readonly=on").is_err());
        assert!(DiskConfig::parse("path=/a,readonly=maybe").is_err());
        assert!(DiskConfig::parse("path=/a,id=much-too-long-an-identifier").is_err());
    }

    #[test]
    fn net_option() {
        let n =
            NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56,ip=192.168.100.1,mask=255.255.255.0")
                .unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(n.ip, Some(Ipv4Addr::new(192, 168, 100, 1)));
        assert!(NetConfig::parse("mac=52:54:00:12:34:56").is_err());
        assert!(
            NetConfig::parse("tap=t,mac=53:54:00:12:34:56").is_err(),
            "multicast"
        );
        assert!(NetConfig::parse("tap=t,mac=52:54:00:12:34").is_err());
        assert!(NetConfig::parse("tap=t,ip=300.1.1.1").is_err());
        assert!(NetConfig::parse("tap=this-name-is-too-long").is_err());
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let c = VmConfig {
            payload: PayloadConfig {
                kernel: "/k".into(),
                initramfs: None,
                cmdline: "a=b".into(),
            },
            memory: MemoryConfig { size: 1 << 30 },
            cpus: CpusConfig { boot: 2 },
            serial: SerialConfig::File("/tmp/s".into()),
            disks: vec![DiskConfig::parse("path=/d,readonly=on").unwrap()],
            nets: vec![NetConfig::parse("tap=t0,mac=52:54:00:00:00:01,ip=10.0.0.1").unwrap()],
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"52:54:00:00:00:01\""), "{json}");
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
        let minimal: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(minimal.cpus.boot, 1);
        assert!(
            serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"/k"},"bogus":1}"#).is_err()
        );
        let zero_mem: VmConfig =
            serde_json::from_str(r#"{"payload":{"kernel":"/k"},"memory":{"size":0}}"#).unwrap();
        assert!(zero_mem.validate().is_err());
        assert!(minimal.validate().is_ok());
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t","mac":"zz"}]}"#
        )
        .is_err());
    }

    #[test]
    fn serial_option() {
        assert_eq!(SerialConfig::parse("tty").unwrap(), SerialConfig::Tty);
        assert_eq!(SerialConfig::parse("off").unwrap(), SerialConfig::Off);
        assert_eq!(
            SerialConfig::parse("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert_eq!(
            SerialConfig::parse("socket=/tmp/s").unwrap(),
            SerialConfig::Socket("/tmp/s".into())
        );
        assert!(SerialConfig::parse("pty").is_err());
        assert!(SerialConfig::parse("file=").is_err());
    }
}
