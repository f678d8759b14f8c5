//! Checks on the snapshot and migration bodies. The server runs them before a request
//! reaches the control loop (a refusal is a 400), `colovmm-remote` before it sends one, and
//! the VMM can use the parsed forms ([`MigrationUrl`], [`parse_file_url`]) to act on them.
//!
//! The rules:
//! - `vm.snapshot` / `vm.restore`: `file:///DIR`, an absolute path after `file://` (no
//!   host), not `/` alone, no NUL; the path is taken literally (no percent-decoding).
//! - `vm.send-migration` / `vm.receive-migration`: `tcp:HOST:PORT` (HOST a name, an IPv4
//!   address or a bracketed IPv6 address; PORT 1..=65535) or `unix:PATH` (absolute, at most
//!   107 bytes, the `sun_path` limit, no NUL).
//! - `downtime_ms` 1..=60000 (default 300), `channels` 1..=16 (default 1).
//!
//! The COLO bodies' rules are in [`crate::colo`], which uses the helpers here.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ReceiveMigrationData, SendMigrationData, VmRestoreConfig, VmSnapshotConfig};

/// Accepted `downtime_ms`.
pub const DOWNTIME_MS: RangeInclusive<u64> = 1..=60_000;
/// `downtime_ms` when the body has none.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Accepted `channels`.
pub const CHANNELS: RangeInclusive<u32> = 1..=16;
/// `channels` when the body has none.
pub const DEFAULT_CHANNELS: u32 = 1;
/// Longest `unix:` path in bytes (`sun_path` holds 108 with the terminating NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// Longest piece of a client's URL quoted back in an error.
const ECHO_MAX: usize = 200;

/// Why a snapshot or migration body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A URL of the wrong scheme or shape.
    #[error("{field} {url}: {why}")]
    Url {
        /// The body field.
        field: &'static str,
        /// The URL as given (quoted, shortened).
        url: String,
        /// What is wrong and what is expected.
        why: String,
    },
    /// A number outside its range.
    #[error("{field} {value} is out of range {min}..={max}")]
    OutOfRange {
        /// The body field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A field missing, not allowed, or inconsistent with another (COLO bodies).
    #[error("{field}: {why}")]
    Field {
        /// The body field.
        field: &'static str,
        /// What is wrong and what is expected.
        why: String,
    },
    /// A body that sets nothing.
    #[error("nothing to set: give at least one of {fields}")]
    NothingToSet {
        /// The fields the body may carry.
        fields: &'static str,
    },
}

pub(crate) fn url_error(field: &'static str, url: &str, why: impl Into<String>) -> ValidationError {
    let mut shown: String = url.chars().take(ECHO_MAX).collect();
    if shown.len() < url.len() {
        shown.push_str("...");
    }
    ValidationError::Url {
        field,
        url: format!("{shown:?}"),
        why: why.into(),
    }
}

pub(crate) fn in_range<T: Copy + PartialOrd + Into<u64>>(
    field: &'static str,
    value: Option<T>,
    range: &RangeInclusive<T>,
) -> Result<(), ValidationError> {
    match value {
        Some(v) if !range.contains(&v) => Err(ValidationError::OutOfRange {
            field,
            value: v.into(),
            min: (*range.start()).into(),
            max: (*range.end()).into(),
        }),
        _ => Ok(()),
    }
}

/// The directory of a `file:///DIR` URL; `Err` says why it is not one.
pub fn parse_file_url(url: &str) -> Result<PathBuf, String> {
    const EXPECTED: &str = "expected file:///DIR (an absolute directory path)";
    let Some(rest) = url.strip_prefix("file://") else {
        return Err(EXPECTED.into());
    };
    if !rest.starts_with('/') {
        return Err(format!(
            "{EXPECTED}; a host or a relative path is not allowed"
        ));
    }
    if rest.trim_end_matches('/').is_empty() {
        return Err("the root directory cannot hold a snapshot".into());
    }
    if rest.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    Ok(PathBuf::from(rest))
}

/// Where a migration goes to or listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// `tcp:HOST:PORT`.
    Tcp {
        /// A host name, an IPv4 address, or an IPv6 address (without its brackets).
        host: String,
        /// 1..=65535.
        port: u16,
    },
    /// `unix:PATH`, an absolute socket path.
    Unix(PathBuf),
}

impl MigrationUrl {
    /// Parses `tcp:HOST:PORT` or `unix:PATH`; `Err` says why the URL is not one.
    pub fn parse(url: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected tcp:HOST:PORT or unix:PATH";
        if let Some(rest) = url.strip_prefix("tcp:") {
            return parse_tcp(rest);
        }
        if let Some(path) = url.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err("expected unix:PATH with an absolute PATH".into());
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "the socket path is {} bytes, more than a Unix socket takes ({MAX_UNIX_PATH})",
                    path.len()
                ));
            }
            if path.contains('\0') {
                return Err("the path contains a NUL byte".into());
            }
            return Ok(MigrationUrl::Unix(PathBuf::from(path)));
        }
        Err(EXPECTED.into())
    }

    /// `HOST:PORT` for `ToSocketAddrs` (IPv6 in brackets), or `None` for a Unix socket.
    pub fn socket_addr(&self) -> Option<String> {
        match self {
            MigrationUrl::Tcp { host, port } if host.contains(':') => {
                Some(format!("[{host}]:{port}"))
            }
            MigrationUrl::Tcp { host, port } => Some(format!("{host}:{port}")),
            MigrationUrl::Unix(_) => None,
        }
    }
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.socket_addr()) {
            (MigrationUrl::Unix(p), _) => write!(f, "unix:{}", p.display()),
            (_, addr) => write!(f, "tcp:{}", addr.unwrap_or_default()),
        }
    }
}

fn parse_tcp(rest: &str) -> Result<MigrationUrl, String> {
    if rest.starts_with("//") {
        return Err("expected tcp:HOST:PORT, without // after tcp:".into());
    }
    let (host, port) = parse_host_port(rest, "tcp:")?;
    Ok(MigrationUrl::Tcp { host, port })
}

/// Splits `HOST:PORT` (HOST a name, an IPv4 address or a bracketed IPv6 address; PORT
/// 1..=65535) into the host, without brackets, and the port. `scheme` (`"tcp:"` or `""`)
/// prefixes the expected shape in the messages.
pub(crate) fn parse_host_port(s: &str, scheme: &str) -> Result<(String, u16), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("expected {scheme}HOST:PORT; the :PORT is missing"));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("the port {port:?} is not a number in 1..=65535")),
    };
    let host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("[{inner}] is not an IPv6 address"))?;
        inner
    } else if host.contains(':') {
        return Err(format!(
            "an IPv6 address goes in brackets: {scheme}[ADDR]:PORT"
        ));
    } else {
        host
    };
    if host.is_empty() {
        return Err(format!("expected {scheme}HOST:PORT; the HOST is missing"));
    }
    let name_ok = |h: &str| {
        h.len() <= 253
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if !host.contains(':') && host.parse::<Ipv4Addr>().is_err() && !name_ok(host) {
        return Err(format!("{host:?} is not a host name or an IP address"));
    }
    Ok((host.to_string(), port))
}

impl VmSnapshotConfig {
    /// Checks the body (see the [module rules](self)).
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.destination_dir().map(drop)
    }

    /// The directory to write to.
    pub fn destination_dir(&self) -> Result<PathBuf, ValidationError> {
        parse_file_url(&self.destination_url)
            .map_err(|why| url_error("destination_url", &self.destination_url, why))
    }
}

impl VmRestoreConfig {
    /// Checks the body (see the [module rules](self)).
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.source_dir().map(drop)
    }

    /// The directory to read from.
    pub fn source_dir(&self) -> Result<PathBuf, ValidationError> {
        parse_file_url(&self.source_url)
            .map_err(|why| url_error("source_url", &self.source_url, why))
    }
}

impl SendMigrationData {
    /// Checks the body (see the [module rules](self)).
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.destination()?;
        in_range("downtime_ms", self.downtime_ms, &DOWNTIME_MS)?;
        in_range("channels", self.channels, &CHANNELS)
    }

    /// Where to send.
    pub fn destination(&self) -> Result<MigrationUrl, ValidationError> {
        MigrationUrl::parse(&self.destination_url)
            .map_err(|why| url_error("destination_url", &self.destination_url, why))
    }

    /// The pause budget, [`DEFAULT_DOWNTIME_MS`] when unset.
    pub fn downtime(&self) -> Duration {
        Duration::from_millis(self.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS))
    }

    /// The connection count, [`DEFAULT_CHANNELS`] when unset.
    pub fn channel_count(&self) -> u32 {
        self.channels.unwrap_or(DEFAULT_CHANNELS)
    }
}

impl ReceiveMigrationData {
    /// Checks the body (see the [module rules](self)).
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.receiver().map(drop)
    }

    /// Where to listen.
    pub fn receiver(&self) -> Result<MigrationUrl, ValidationError> {
        MigrationUrl::parse(&self.receiver_url)
            .map_err(|why| url_error("receiver_url", &self.receiver_url, why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(url: &str, downtime_ms: Option<u64>, channels: Option<u32>) -> SendMigrationData {
        SendMigrationData {
            destination_url: url.into(),
            downtime_ms,
            channels,
        }
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            parse_file_url("file:///var/snap").unwrap(),
            PathBuf::from("/var/snap")
        );
        assert_eq!(
            parse_file_url("file:///a%20b/").unwrap(),
            PathBuf::from("/a%20b/")
        );
        for bad in [
            "",
            "/var/snap",
            "file:/var/snap",
            "file://var/snap",
            "file://host/var/snap",
            "file://",
            "file:///",
            "file:////",
            "http:///var/snap",
            "FILE:///var/snap",
            "file:///a\0b",
        ] {
            assert!(parse_file_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn migration_urls() {
        let tcp = |h: &str, p| MigrationUrl::Tcp {
            host: h.into(),
            port: p,
        };
        for (url, want) in [
            ("tcp:10.0.0.2:6000", tcp("10.0.0.2", 6000)),
            ("tcp:dest.example:1", tcp("dest.example", 1)),
            ("tcp:0.0.0.0:65535", tcp("0.0.0.0", 65535)),
            ("tcp:[::1]:6000", tcp("::1", 6000)),
            (
                "unix:/run/mig.sock",
                MigrationUrl::Unix("/run/mig.sock".into()),
            ),
        ] {
            let got = MigrationUrl::parse(url).unwrap();
            assert_eq!(got, want, "{url}");
            assert_eq!(got.to_string(), url, "display round-trips");
        }
        assert_eq!(
            tcp("::1", 6000).socket_addr().as_deref(),
            Some("[::1]:6000")
        );
        let long = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH));
        for (bad, why) in [
            ("tcp://h:1", "without //"),
            ("tcp:h", ":PORT is missing"),
            ("tcp:h:0", "1..=65535"),
            ("tcp:h:65536", "1..=65535"),
            ("tcp:h:x", "1..=65535"),
            ("tcp::1", "HOST is missing"),
            ("tcp:::1:6000", "brackets"),
            ("tcp:[zz]:6000", "not an IPv6"),
            ("tcp:a b:1", "not a host name"),
            ("tcp:a..b:1", "not a host name"),
            ("unix:", "absolute"),
            ("unix:rel.sock", "absolute"),
            (long.as_str(), "more than a Unix socket takes"),
            ("unix:/a\0", "NUL"),
            ("file:///x", "expected tcp:HOST:PORT or unix:PATH"),
            ("http://h:1", "expected tcp:HOST:PORT or unix:PATH"),
            ("", "expected tcp:HOST:PORT or unix:PATH"),
        ] {
            let e = MigrationUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bodies() {
        assert!(send("tcp:h:1", None, None).validate().is_ok());
        assert!(send("unix:/s", Some(1), Some(1)).validate().is_ok());
        assert!(send("unix:/s", Some(60_000), Some(16)).validate().is_ok());
        let e = send("tcp:h:1", Some(0), None).validate().unwrap_err();
        assert_eq!(e.to_string(), "downtime_ms 0 is out of range 1..=60000");
        let e = send("tcp:h:1", Some(60_001), None).validate().unwrap_err();
        assert!(matches!(
            e,
            ValidationError::OutOfRange {
                field: "downtime_ms",
                ..
            }
        ));
        let e = send("tcp:h:1", None, Some(0)).validate().unwrap_err();
        assert_eq!(e.to_string(), "channels 0 is out of range 1..=16");
        let e = send("tcp:h:1", None, Some(17)).validate().unwrap_err();
        assert!(matches!(
            e,
            ValidationError::OutOfRange {
                field: "channels",
                ..
            }
        ));
        let e = send("file:///x", None, None).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"destination_url "file:///x": expected tcp:HOST:PORT or unix:PATH"#
        );
        let d = send("tcp:h:1", None, None);
        assert_eq!(
            (d.downtime(), d.channel_count()),
            (Duration::from_millis(300), 1)
        );

        let snap = VmSnapshotConfig {
            destination_url: "tcp:h:1".into(),
        };
        assert!(snap
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with(r#"destination_url "tcp:h:1": expected file:///DIR"#));
        let restore = VmRestoreConfig {
            source_url: "file:///s".into(),
        };
        assert_eq!(restore.source_dir().unwrap(), PathBuf::from("/s"));
        let recv = ReceiveMigrationData {
            receiver_url: "unix:x".into(),
        };
        assert!(recv
            .validate()
            .unwrap_err()
            .to_string()
            .contains("receiver_url"));

        let huge = "tcp:".to_string() + &"h".repeat(10_000);
        let e = send(&huge, None, None).validate().unwrap_err().to_string();
        assert!(e.len() < 400, "the URL is shortened: {e}");
    }
}
