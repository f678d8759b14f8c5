//! The route table: every endpoint's path, method and the [`ApiRequest`] it becomes.
//!
//! The dispatcher, `colovmm-remote`, the fuzz generator and the OpenAPI test all read
//! [`ROUTES`], so a route exists in exactly one place.

use serde::de::DeserializeOwned;

use super::validate::ValidationError;
use crate::config::ConfigError;
use crate::{
    ApiError, ApiRequest, ColoCheckpointData, ColoConfig, ColoSetData, ReceiveMigrationData,
    SendMigrationData, VmConfig, VmRestoreConfig, VmSnapshotConfig,
};

/// Every route lives under this prefix (Cloud Hypervisor's).
pub const API_PREFIX: &str = "/api/v1";

/// The HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Reads state.
    Get,
    /// Changes state.
    Put,
}

impl Method {
    /// The method as it appears on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// What a route asks of the control loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `vmm.ping`.
    VmmPing,
    /// `vmm.shutdown`.
    VmmShutdown,
    /// `vm.create` (the body is a [`VmConfig`]).
    VmCreate,
    /// `vm.boot`.
    VmBoot,
    /// `vm.pause`.
    VmPause,
    /// `vm.resume`.
    VmResume,
    /// `vm.shutdown`.
    VmShutdown,
    /// `vm.reboot`.
    VmReboot,
    /// `vm.info`.
    VmInfo,
    /// `vm.counters`.
    VmCounters,
    /// `vm.snapshot` (the body is a [`VmSnapshotConfig`]).
    VmSnapshot,
    /// `vm.restore` (the body is a [`VmRestoreConfig`]).
    VmRestore,
    /// `vm.send-migration` (the body is a [`SendMigrationData`]).
    VmSendMigration,
    /// `vm.receive-migration` (the body is a [`ReceiveMigrationData`]).
    VmReceiveMigration,
    /// `vm.migration-status`.
    VmMigrationStatus,
    /// `vm.colo-start` (the body is a [`ColoConfig`]).
    VmColoStart,
    /// `vm.colo-status`.
    VmColoStatus,
    /// `vm.colo-failover`.
    VmColoFailover,
    /// `vm.colo-set` (the body is a [`ColoSetData`]).
    VmColoSet,
    /// `vm.colo-checkpoint` (the body, optional, is a [`ColoCheckpointData`]).
    VmColoCheckpoint,
    /// `vm.memory-checksum`.
    VmMemoryChecksum,
}

/// One endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Full path, e.g. `/api/v1/vm.boot`.
    pub path: &'static str,
    /// The one method it accepts.
    pub method: Method,
    /// What it asks of the control loop.
    pub action: Action,
}

/// Every endpoint the server answers.
pub const ROUTES: &[Route] = &[
    Route {
        path: "/api/v1/vmm.ping",
        method: Method::Get,
        action: Action::VmmPing,
    },
    Route {
        path: "/api/v1/vmm.shutdown",
        method: Method::Put,
        action: Action::VmmShutdown,
    },
    Route {
        path: "/api/v1/vm.create",
        method: Method::Put,
        action: Action::VmCreate,
    },
    Route {
        path: "/api/v1/vm.boot",
        method: Method::Put,
        action: Action::VmBoot,
    },
    Route {
        path: "/api/v1/vm.pause",
        method: Method::Put,
        action: Action::VmPause,
    },
    Route {
        path: "/api/v1/vm.resume",
        method: Method::Put,
        action: Action::VmResume,
    },
    Route {
        path: "/api/v1/vm.shutdown",
        method: Method::Put,
        action: Action::VmShutdown,
    },
    Route {
        path: "/api/v1/vm.reboot",
        method: Method::Put,
        action: Action::VmReboot,
    },
    Route {
        path: "/api/v1/vm.info",
        method: Method::Get,
        action: Action::VmInfo,
    },
    Route {
        path: "/api/v1/vm.counters",
        method: Method::Get,
        action: Action::VmCounters,
    },
    Route {
        path: "/api/v1/vm.snapshot",
        method: Method::Put,
        action: Action::VmSnapshot,
    },
    Route {
        path: "/api/v1/vm.restore",
        method: Method::Put,
        action: Action::VmRestore,
    },
    Route {
        path: "/api/v1/vm.send-migration",
        method: Method::Put,
        action: Action::VmSendMigration,
    },
    Route {
        path: "/api/v1/vm.receive-migration",
        method: Method::Put,
        action: Action::VmReceiveMigration,
    },
    Route {
        path: "/api/v1/vm.migration-status",
        method: Method::Get,
        action: Action::VmMigrationStatus,
    },
    Route {
        path: "/api/v1/vm.colo-start",
        method: Method::Put,
        action: Action::VmColoStart,
    },
    Route {
        path: "/api/v1/vm.colo-status",
        method: Method::Get,
        action: Action::VmColoStatus,
    },
    Route {
        path: "/api/v1/vm.colo-failover",
        method: Method::Put,
        action: Action::VmColoFailover,
    },
    Route {
        path: "/api/v1/vm.colo-set",
        method: Method::Put,
        action: Action::VmColoSet,
    },
    Route {
        path: "/api/v1/vm.colo-checkpoint",
        method: Method::Put,
        action: Action::VmColoCheckpoint,
    },
    Route {
        path: "/api/v1/vm.memory-checksum",
        method: Method::Get,
        action: Action::VmMemoryChecksum,
    },
];

/// Why a request body was refused (always a 400).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, not the route's body type, or a field the type does not know.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// The body type ([`Action::body`]).
        what: &'static str,
        /// serde's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// Well-formed but refused by `VmConfig::validate()`.
    #[error("invalid VmConfig: {0}")]
    Invalid(#[from] ConfigError),
    /// A snapshot, migration or COLO body refused by its `validate()` (see [`super::validate`]
    /// and [`crate::colo`]).
    #[error("invalid {what}: {source}")]
    Rejected {
        /// The body type ([`Action::body`]).
        what: &'static str,
        /// What is wrong.
        #[source]
        source: ValidationError,
    },
}

/// Parses `body` as the `what` body type, a JSON object, then runs its `check`.
fn parse_body<T: DeserializeOwned>(
    what: &'static str,
    body: &[u8],
    check: fn(&T) -> Result<(), ValidationError>,
) -> Result<T, BodyError> {
    // serde also reads a struct from an array of its fields in order: `[]` would pass for a
    // body whose fields all have defaults.
    if body.trim_ascii_start().first() == Some(&b'[') {
        return Err(BodyError::Json {
            what,
            source: serde::de::Error::custom("expected a JSON object, not an array"),
        });
    }
    let value: T =
        serde_json::from_slice(body).map_err(|source| BodyError::Json { what, source })?;
    check(&value).map_err(|source| BodyError::Rejected { what, source })?;
    Ok(value)
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        ApiError::new(400, e.to_string())
    }
}

impl Action {
    /// The route that carries this action.
    pub fn route(self) -> &'static Route {
        // Every action has exactly one route; the table test checks it, and the fallback
        // keeps this total without a panic path.
        ROUTES
            .iter()
            .find(|r| r.action == self)
            .unwrap_or(&ROUTES[0])
    }

    /// The schema name of the JSON body the route requires, or `None` if it ignores its body.
    pub fn body(self) -> Option<&'static str> {
        match self {
            Action::VmCreate => Some("VmConfig"),
            Action::VmSnapshot => Some("VmSnapshotConfig"),
            Action::VmRestore => Some("VmRestoreConfig"),
            Action::VmSendMigration => Some("SendMigrationData"),
            Action::VmReceiveMigration => Some("ReceiveMigrationData"),
            Action::VmColoStart => Some("ColoConfig"),
            Action::VmColoSet => Some("ColoSetData"),
            Action::VmColoCheckpoint => Some("ColoCheckpointData"),
            Action::VmmPing
            | Action::VmmShutdown
            | Action::VmBoot
            | Action::VmPause
            | Action::VmResume
            | Action::VmShutdown
            | Action::VmReboot
            | Action::VmInfo
            | Action::VmCounters
            | Action::VmMigrationStatus
            | Action::VmColoStatus
            | Action::VmColoFailover
            | Action::VmMemoryChecksum => None,
        }
    }

    /// Whether the route refuses a request without a body; `vm.colo-checkpoint` takes an
    /// empty one as the defaults.
    pub fn body_required(self) -> bool {
        self.body().is_some() && self != Action::VmColoCheckpoint
    }

    /// Builds the control-loop request, parsing and validating `body` where the route takes one.
    pub fn request(self, body: &[u8]) -> Result<ApiRequest, BodyError> {
        Ok(match self {
            Action::VmmPing => ApiRequest::VmmPing,
            Action::VmmShutdown => ApiRequest::VmmShutdown,
            Action::VmCreate => {
                let config: VmConfig =
                    serde_json::from_slice(body).map_err(|source| BodyError::Json {
                        what: "VmConfig",
                        source,
                    })?;
                config.validate()?;
                ApiRequest::VmCreate(Box::new(config))
            }
            Action::VmBoot => ApiRequest::VmBoot,
            Action::VmPause => ApiRequest::VmPause,
            Action::VmResume => ApiRequest::VmResume,
            Action::VmShutdown => ApiRequest::VmShutdown,
            Action::VmReboot => ApiRequest::VmReboot,
            Action::VmInfo => ApiRequest::VmInfo,
            Action::VmCounters => ApiRequest::VmCounters,
            Action::VmSnapshot => ApiRequest::VmSnapshot(parse_body(
                "VmSnapshotConfig",
                body,
                VmSnapshotConfig::validate,
            )?),
            Action::VmRestore => ApiRequest::VmRestore(parse_body(
                "VmRestoreConfig",
                body,
                VmRestoreConfig::validate,
            )?),
            Action::VmSendMigration => ApiRequest::VmSendMigration(parse_body(
                "SendMigrationData",
                body,
                SendMigrationData::validate,
            )?),
            Action::VmReceiveMigration => ApiRequest::VmReceiveMigration(parse_body(
                "ReceiveMigrationData",
                body,
                ReceiveMigrationData::validate,
            )?),
            Action::VmMigrationStatus => ApiRequest::VmMigrationStatus,
            Action::VmColoStart => {
                ApiRequest::VmColoStart(parse_body("ColoConfig", body, ColoConfig::validate)?)
            }
            Action::VmColoStatus => ApiRequest::VmColoStatus,
            Action::VmColoFailover => ApiRequest::VmColoFailover,
            Action::VmColoSet => {
                ApiRequest::VmColoSet(parse_body("ColoSetData", body, ColoSetData::validate)?)
            }
            Action::VmColoCheckpoint if body.iter().all(u8::is_ascii_whitespace) => {
                ApiRequest::VmColoCheckpoint(ColoCheckpointData::default())
            }
            Action::VmColoCheckpoint => {
                ApiRequest::VmColoCheckpoint(parse_body("ColoCheckpointData", body, |_| Ok(()))?)
            }
            Action::VmMemoryChecksum => ApiRequest::VmMemoryChecksum,
        })
    }
}

/// Strips a query string and an `http://host` prefix (absolute-form targets) from a target.
pub fn normalize_target(target: &str) -> &str {
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    target.split(['?', '#']).next().unwrap_or(target)
}

/// The route for a request target, whatever the method.
pub fn find(target: &str) -> Option<&'static Route> {
    let path = normalize_target(target);
    ROUTES.iter().find(|r| r.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert!(r.path.starts_with(API_PREFIX), "{}", r.path);
            assert_eq!(r.action.route(), r, "each action has one route");
            assert!(
                ROUTES[..i].iter().all(|o| o.path != r.path),
                "duplicate {}",
                r.path
            );
        }
    }

    #[test]
    fn targets() {
        assert_eq!(
            find("/api/v1/vm.info").map(|r| r.action),
            Some(Action::VmInfo)
        );
        assert_eq!(
            find("/api/v1/vm.info?x=1").map(|r| r.action),
            Some(Action::VmInfo)
        );
        assert_eq!(
            find("http://localhost/api/v1/vm.boot").map(|r| r.action),
            Some(Action::VmBoot)
        );
        assert!(find("/api/v1/vm.info/").is_none());
        assert!(find("/api/v1/").is_none());
        assert!(find("http://localhost").is_none());
    }

    #[test]
    fn create_body() {
        assert!(matches!(
            Action::VmCreate.request(br#"{"payload":{"kernel":"/k"}}"#),
            Ok(ApiRequest::VmCreate(_))
        ));
        let e = Action::VmCreate.request(b"{").unwrap_err();
        assert!(e.to_string().starts_with("invalid VmConfig JSON"), "{e}");
        let e = Action::VmCreate
            .request(br#"{"payload":{"kernel":"/k"},"bogus":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Action::VmCreate
            .request(br#"{"payload":{"kernel":"/k"},"memory":{"size":0}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        assert_eq!(
            Action::VmBoot.request(b"ignored").ok(),
            Some(ApiRequest::VmBoot)
        );
    }

    #[test]
    fn body_types_match_the_errors() {
        for r in ROUTES {
            match r.action.body() {
                Some(what) => {
                    assert_eq!(r.method, Method::Put, "{}", r.path);
                    let e = r.action.request(b"{").unwrap_err().to_string();
                    assert!(e.starts_with(&format!("invalid {what} JSON")), "{e}");
                    assert_eq!(
                        r.action.request(b"").is_err(),
                        r.action.body_required(),
                        "{}",
                        r.path
                    );
                }
                None => assert!(r.action.request(b"{").is_ok(), "{}", r.path),
            }
        }
    }

    #[test]
    fn snapshot_and_migration_bodies() {
        let ok = |a: Action, body: &str| {
            a.request(body.as_bytes())
                .unwrap_or_else(|e| panic!("{body}: {e}"))
        };
        let refused = |a: Action, body: &str| {
            a.request(body.as_bytes())
                .map(|r| panic!("{body} accepted as {r:?}"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            ok(Action::VmSnapshot, r#"{"destination_url":"file:///s"}"#),
            ApiRequest::VmSnapshot(VmSnapshotConfig {
                destination_url: "file:///s".into()
            })
        );
        assert!(matches!(
            ok(Action::VmRestore, r#"{"source_url":"file:///s"}"#),
            ApiRequest::VmRestore(_)
        ));
        assert_eq!(
            ok(
                Action::VmSendMigration,
                r#"{"destination_url":"tcp:10.0.0.2:6000","downtime_ms":500,"channels":4}"#
            ),
            ApiRequest::VmSendMigration(SendMigrationData {
                destination_url: "tcp:10.0.0.2:6000".into(),
                downtime_ms: Some(500),
                channels: Some(4),
            })
        );
        assert!(matches!(
            ok(
                Action::VmSendMigration,
                r#"{"destination_url":"unix:/m.sock","downtime_ms":null}"#
            ),
            ApiRequest::VmSendMigration(SendMigrationData {
                downtime_ms: None,
                channels: None,
                ..
            })
        ));
        assert!(matches!(
            ok(
                Action::VmReceiveMigration,
                r#"{"receiver_url":"tcp:0.0.0.0:6000"}"#
            ),
            ApiRequest::VmReceiveMigration(_)
        ));
        assert_eq!(
            ok(Action::VmMigrationStatus, ""),
            ApiRequest::VmMigrationStatus
        );

        let e = refused(
            Action::VmSnapshot,
            r#"{"destination_url":"file:///s","x":1}"#,
        );
        assert!(e.contains("unknown field `x`"), "{e}");
        let e = refused(Action::VmSnapshot, r#"{"destination_url":"tcp:h:1"}"#);
        assert!(
            e.starts_with("invalid VmSnapshotConfig: destination_url"),
            "{e}"
        );
        let e = refused(Action::VmRestore, r#"{"source_url":"/s"}"#);
        assert!(e.contains("expected file:///DIR"), "{e}");
        let e = refused(Action::VmRestore, r#"{}"#);
        assert!(e.contains("missing field `source_url`"), "{e}");
        let e = refused(
            Action::VmSendMigration,
            r#"{"destination_url":"tcp:h:1","downtime_ms":0}"#,
        );
        assert_eq!(
            e,
            "invalid SendMigrationData: downtime_ms 0 is out of range 1..=60000"
        );
        let e = refused(
            Action::VmSendMigration,
            r#"{"destination_url":"tcp:h:1","channels":17}"#,
        );
        assert!(e.ends_with("channels 17 is out of range 1..=16"), "{e}");
        let e = refused(
            Action::VmSendMigration,
            r#"{"destination_url":"tcp:h:1","channels":-1}"#,
        );
        assert!(e.starts_with("invalid SendMigrationData JSON"), "{e}");
        let e = refused(
            Action::VmSendMigration,
            r#"{"destination_url":"file:///x"}"#,
        );
        assert!(e.contains("expected tcp:HOST:PORT or unix:PATH"), "{e}");
        let e = refused(Action::VmReceiveMigration, r#"{"receiver_url":"tcp:h"}"#);
        assert!(
            e.starts_with("invalid ReceiveMigrationData: receiver_url"),
            "{e}"
        );
    }

    #[test]
    fn colo_routes_and_bodies() {
        let ok = |a: Action, body: &str| {
            a.request(body.as_bytes())
                .unwrap_or_else(|e| panic!("{body}: {e}"))
        };
        let refused = |a: Action, body: &str| {
            a.request(body.as_bytes())
                .map(|r| panic!("{body} accepted as {r:?}"))
                .unwrap_err()
                .to_string()
        };
        for (path, method, action) in [
            ("vm.colo-start", Method::Put, Action::VmColoStart),
            ("vm.colo-status", Method::Get, Action::VmColoStatus),
            ("vm.colo-failover", Method::Put, Action::VmColoFailover),
            ("vm.colo-set", Method::Put, Action::VmColoSet),
            ("vm.colo-checkpoint", Method::Put, Action::VmColoCheckpoint),
            ("vm.memory-checksum", Method::Get, Action::VmMemoryChecksum),
        ] {
            let r = find(&format!("{API_PREFIX}/{path}")).unwrap();
            assert_eq!((r.method, r.action), (method, action), "{path}");
        }

        assert_eq!(
            ok(
                Action::VmColoStart,
                r#"{"role":"primary","peer":"10.0.0.2:9000","checkpoint_interval_ms":600}"#
            ),
            ApiRequest::VmColoStart(ColoConfig {
                role: crate::ColoRole::Primary,
                peer: Some("10.0.0.2:9000".into()),
                listen: None,
                checkpoint_interval_ms: Some(600),
                channels: None,
                heartbeat_interval_ms: None,
                heartbeat_timeout_ms: None,
                key_file: None,
                compare_timeout_ms: None,
                disk_completion: None,
                disk_layers: None,
            })
        );
        assert!(matches!(
            ok(
                Action::VmColoStart,
                r#"{"role":"secondary","listen":"[::]:9000","channels":null}"#
            ),
            ApiRequest::VmColoStart(ColoConfig { channels: None, .. })
        ));
        assert_eq!(ok(Action::VmColoStatus, "x"), ApiRequest::VmColoStatus);
        assert_eq!(ok(Action::VmColoFailover, ""), ApiRequest::VmColoFailover);
        assert_eq!(
            ok(Action::VmMemoryChecksum, ""),
            ApiRequest::VmMemoryChecksum
        );
        assert_eq!(
            ok(Action::VmColoSet, r#"{"checkpoint_interval_ms":250}"#),
            ApiRequest::VmColoSet(ColoSetData {
                checkpoint_interval_ms: Some(250)
            })
        );
        let default = ApiRequest::VmColoCheckpoint(ColoCheckpointData::default());
        for empty in ["", " \r\n", "{}", r#"{"pause_after":false}"#] {
            assert_eq!(ok(Action::VmColoCheckpoint, empty), default, "{empty:?}");
        }
        assert_eq!(
            ok(Action::VmColoCheckpoint, r#"{"pause_after":true}"#),
            ApiRequest::VmColoCheckpoint(ColoCheckpointData { pause_after: true })
        );

        for (action, body, want) in [
            (Action::VmColoStart, "", "invalid ColoConfig JSON"),
            (
                Action::VmColoStart,
                r#"{"peer":"h:1"}"#,
                "invalid ColoConfig JSON: missing field `role`",
            ),
            (
                Action::VmColoStart,
                r#"{"role":"primary","peer":"h:1","bogus":1}"#,
                "invalid ColoConfig JSON: unknown field `bogus`",
            ),
            (
                Action::VmColoStart,
                r#"{"role":"leader","peer":"h:1"}"#,
                "invalid ColoConfig JSON: unknown variant `leader`",
            ),
            (
                Action::VmColoStart,
                r#"{"role":"primary"}"#,
                "invalid ColoConfig: peer: required with role primary",
            ),
            (
                Action::VmColoStart,
                r#"{"role":"secondary","listen":"h:1","peer":"h:2"}"#,
                "invalid ColoConfig: peer: not allowed with role secondary",
            ),
            (
                Action::VmColoStart,
                r#"{"role":"primary","peer":"tcp:h:1"}"#,
                r#"invalid ColoConfig: peer "tcp:h:1": expected HOST:PORT, without a scheme"#,
            ),
            (
                Action::VmColoStart,
                r#"{"role":"primary","peer":"h:1","channels":17}"#,
                "invalid ColoConfig: channels 17 is out of range 1..=16",
            ),
            (
                Action::VmColoStart,
                r#"{"role":"primary","peer":"h:1","heartbeat_timeout_ms":100}"#,
                "invalid ColoConfig: heartbeat_timeout_ms: 100 ms is less than twice",
            ),
            (Action::VmColoSet, "", "invalid ColoSetData JSON"),
            (
                Action::VmColoSet,
                "{}",
                "invalid ColoSetData: nothing to set: give at least one of checkpoint_interval_ms",
            ),
            (
                Action::VmColoSet,
                r#"{"checkpoint_interval_ms":null}"#,
                "invalid ColoSetData: nothing to set",
            ),
            (
                Action::VmColoSet,
                r#"{"checkpoint_interval_ms":9}"#,
                "invalid ColoSetData: checkpoint_interval_ms 9 is out of range 10..=3600000",
            ),
            (
                Action::VmColoSet,
                r#"{"channels":2}"#,
                "invalid ColoSetData JSON: unknown field `channels`",
            ),
            (
                Action::VmColoCheckpoint,
                r#"{"pause":true}"#,
                "invalid ColoCheckpointData JSON: unknown field `pause`",
            ),
            (
                Action::VmColoCheckpoint,
                r#"{"pause_after":"yes"}"#,
                "invalid ColoCheckpointData JSON: invalid type",
            ),
            (
                Action::VmColoCheckpoint,
                "null",
                "invalid ColoCheckpointData JSON",
            ),
            (
                Action::VmColoCheckpoint,
                " [true]",
                "invalid ColoCheckpointData JSON: expected a JSON object, not an array",
            ),
            (
                Action::VmColoStart,
                r#"["primary","h:1"]"#,
                "invalid ColoConfig JSON: expected a JSON object",
            ),
        ] {
            let e = refused(action, body);
            assert!(e.starts_with(want), "{body}: {e}");
        }
    }
}
