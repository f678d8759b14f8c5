//! docs/api.yaml must describe exactly the routes in `api::http::ROUTES`, and its schemas the
//! fields the Rust types put on the wire.

use std::collections::BTreeSet;
use std::path::Path;

use api::http::ROUTES;
use serde_yaml::Value as Yaml;

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn spec() -> Yaml {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path:?} is not YAML: {e}"))
}

/// `/api/v1` from `servers[0].url`.
fn base_path(spec: &Yaml) -> String {
    let url = spec["servers"][0]["url"].as_str().expect("servers[0].url");
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme.find('/').map_or(String::new(), |i| {
        after_scheme[i..].trim_end_matches('/').to_string()
    })
}

/// Diff of two sets, for a failure message that says what to fix.
fn diff(spec: &BTreeSet<String>, code: &BTreeSet<String>) -> String {
    format!(
        "in the route table but not docs/api.yaml: {:?}\nin docs/api.yaml but not the route table: {:?}",
        code.difference(spec).collect::<Vec<_>>(),
        spec.difference(code).collect::<Vec<_>>()
    )
}

#[test]
fn spec_and_route_table_agree() {
    let spec = spec();
    assert_eq!(spec["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    let base = base_path(&spec);
    let paths = spec["paths"].as_mapping().expect("paths");
    let mut in_spec = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().expect("path keys are strings");
        let item = item.as_mapping().expect("path item");
        for (key, _) in item {
            let key = key.as_str().unwrap_or_default();
            if METHODS.contains(&key) {
                in_spec.insert(format!("{} {base}{path}", key.to_uppercase()));
            }
        }
    }
    let in_code: BTreeSet<String> = ROUTES
        .iter()
        .map(|r| format!("{} {}", r.method.as_str(), r.path))
        .collect();
    assert_eq!(in_spec, in_code, "\n{}", diff(&in_spec, &in_code));
}

#[test]
fn every_operation_documents_errors() {
    let spec = spec();
    for (path, item) in spec["paths"].as_mapping().expect("paths") {
        for (method, op) in item.as_mapping().expect("path item") {
            let responses = &op["responses"];
            assert!(
                responses.get("default").is_some(),
                "{path:?} {method:?} has no default (error) response"
            );
            assert!(op["operationId"].as_str().is_some(), "{path:?} {method:?}");
        }
    }
}

/// Every `$ref` in the document points at something that exists.
#[test]
fn refs_resolve() {
    let spec = spec();
    fn walk(v: &Yaml, root: &Yaml, refs: &mut usize) {
        match v {
            Yaml::Mapping(m) => {
                if let Some(r) = m.get("$ref").and_then(Yaml::as_str) {
                    let mut target = root;
                    for part in r.trim_start_matches("#/").split('/') {
                        target = target
                            .get(part)
                            .unwrap_or_else(|| panic!("dangling $ref {r}"));
                    }
                    *refs += 1;
                }
                m.values().for_each(|x| walk(x, root, refs));
            }
            Yaml::Sequence(s) => s.iter().for_each(|x| walk(x, root, refs)),
            _ => {}
        }
    }
    let mut refs = 0;
    walk(&spec, &spec, &mut refs);
    assert!(refs > 10, "{refs}");
}

fn spec_properties(spec: &Yaml, schema: &str) -> BTreeSet<String> {
    spec["components"]["schemas"][schema]["properties"]
        .as_mapping()
        .unwrap_or_else(|| panic!("schema {schema} has no properties"))
        .keys()
        .filter_map(|k| k.as_str().map(String::from))
        .collect()
}

fn json_keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().expect("an object").keys().cloned().collect()
}

/// The schemas list exactly the fields serde writes (every field serialises, `None` as null).
#[test]
fn schemas_match_the_wire_types() {
    let spec = spec();
    let config: api::VmConfig = serde_json::from_value(serde_json::json!({
        "payload": {"kernel": "/k"},
        "disks": [{"path": "/d"}],
        "nets": [{"tap": "t0"}]
    }))
    .expect("a minimal config with one disk and one net");
    let config = serde_json::to_value(&config).unwrap();
    let info = serde_json::to_value(api::VmInfo {
        config: serde_json::from_value(config.clone()).unwrap(),
        state: api::VmState::Running,
        memory_actual_size: 1,
        devices: vec![api::DeviceInfo {
            id: "d".into(),
            kind: "k".into(),
            base: 0,
            irq: None,
        }],
    })
    .unwrap();
    let ping = serde_json::to_value(api::VmmPingResponse {
        version: "v".into(),
        pid: 1,
    })
    .unwrap();
    let error = serde_json::to_value(api::ApiError::new(400, "e")).unwrap();
    let snapshot = serde_json::to_value(api::VmSnapshotConfig {
        destination_url: "file:///s".into(),
    })
    .unwrap();
    let restore = serde_json::to_value(api::VmRestoreConfig {
        source_url: "file:///s".into(),
    })
    .unwrap();
    let send = serde_json::to_value(api::SendMigrationData {
        destination_url: "tcp:h:1".into(),
        downtime_ms: None,
        channels: None,
    })
    .unwrap();
    let receive = serde_json::to_value(api::ReceiveMigrationData {
        receiver_url: "unix:/m".into(),
    })
    .unwrap();
    let status = serde_json::to_value(api::MigrationStatus::idle()).unwrap();
    let colo_config =
        serde_json::to_value(api::ColoConfig::parse("role=primary,peer=h:1").unwrap()).unwrap();
    let colo_set = serde_json::to_value(api::ColoSetData {
        checkpoint_interval_ms: Some(100),
    })
    .unwrap();
    let colo_checkpoint = serde_json::to_value(api::ColoCheckpointData::default()).unwrap();
    let checksum = serde_json::to_value(api::fuzz::fake_vmm::SAMPLE_CHECKSUM).unwrap();
    let cases = [
        ("VmConfig", &config),
        ("PayloadConfig", &config["payload"]),
        ("MemoryConfig", &config["memory"]),
        ("CpusConfig", &config["cpus"]),
        ("DiskConfig", &config["disks"][0]),
        ("NetConfig", &config["nets"][0]),
        ("VmInfo", &info),
        ("DeviceInfo", &info["devices"][0]),
        ("VmmPingResponse", &ping),
        ("ErrorBody", &error),
        ("VmSnapshotConfig", &snapshot),
        ("VmRestoreConfig", &restore),
        ("SendMigrationData", &send),
        ("ReceiveMigrationData", &receive),
        ("MigrationStatus", &status),
        ("ColoConfig", &colo_config),
        ("ColoSetData", &colo_set),
        ("ColoCheckpointData", &colo_checkpoint),
        ("MemoryChecksum", &checksum),
    ];
    for (schema, value) in cases {
        let in_spec = spec_properties(&spec, schema);
        let on_wire = json_keys(value);
        assert_eq!(
            in_spec,
            on_wire,
            "schema {schema}:\n{}",
            diff(&in_spec, &on_wire)
        );
    }
    let states: BTreeSet<String> = spec["components"]["schemas"]["VmState"]["enum"]
        .as_sequence()
        .expect("VmState enum")
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let wire_states: BTreeSet<String> = [
        api::VmState::Created,
        api::VmState::Running,
        api::VmState::Paused,
        api::VmState::Shutdown,
    ]
    .iter()
    .map(|s| {
        serde_json::to_value(s)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    })
    .collect();
    assert_eq!(states, wire_states);

    let phases = enum_values(&spec, "MigrationPhase");
    let wire_phases: BTreeSet<String> = [
        api::MigrationPhase::Idle,
        api::MigrationPhase::Active,
        api::MigrationPhase::Completed,
        api::MigrationPhase::Failed,
    ]
    .iter()
    .map(|p| {
        serde_json::to_value(p)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    })
    .collect();
    assert_eq!(phases, wire_phases);

    let roles = enum_values(&spec, "ColoRole");
    let wire_roles: BTreeSet<String> = [api::ColoRole::Primary, api::ColoRole::Secondary]
        .iter()
        .map(|r| {
            serde_json::to_value(r)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(roles, wire_roles);
}

/// `ColoStatus` is built by the VMM as JSON: the fake VMM's sample (which the remote's
/// output is tested against) has exactly the documented fields, nested ones included.
#[test]
fn colo_status_schema_matches_the_sample() {
    let spec = spec();
    let sample = api::fuzz::fake_vmm::sample_colo_status();
    let schema = &spec["components"]["schemas"]["ColoStatus"];
    let keys = |s: &Yaml| -> BTreeSet<String> {
        s["properties"]
            .as_mapping()
            .unwrap_or_else(|| panic!("no properties in {s:?}"))
            .keys()
            .filter_map(|k| k.as_str().map(String::from))
            .collect()
    };
    let required = |s: &Yaml| -> BTreeSet<String> {
        s["required"]
            .as_sequence()
            .map(|r| {
                r.iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(keys(schema), json_keys(&sample));
    assert_eq!(required(schema), json_keys(&sample));
    let mut exited = sample.clone();
    exited["exit"] = serde_json::json!({
        "reason": "peer heartbeat lost", "during_checkpoint": true, "after_checkpoints": 3
    });
    for nested in ["pause_ms", "last_checkpoint", "exit", "heartbeat"] {
        let s = &schema["properties"][nested];
        assert_eq!(keys(s), json_keys(&exited[nested]), "ColoStatus.{nested}");
        assert_eq!(required(s), keys(s), "ColoStatus.{nested}");
    }
    let enum_of = |field: &str| -> BTreeSet<String> {
        schema["properties"][field]["enum"]
            .as_sequence()
            .unwrap_or_else(|| panic!("ColoStatus.{field} enum"))
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    };
    assert!(enum_of("state").contains(sample["state"].as_str().unwrap()));
    assert!(enum_of("last_reason").contains(sample["last_reason"].as_str().unwrap()));
    for reason in sample["reasons"].as_object().unwrap().keys() {
        assert!(enum_of("last_reason").contains(reason), "{reason}");
    }
}

fn enum_values(spec: &Yaml, schema: &str) -> BTreeSet<String> {
    spec["components"]["schemas"][schema]["enum"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{schema} enum"))
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

/// A route takes a request body in the spec exactly when the server parses one, of the same
/// schema, and that schema refuses unknown fields as serde does.
#[test]
fn request_bodies_match_the_routes() {
    let spec = spec();
    let base = base_path(&spec);
    for r in ROUTES {
        let path = r
            .path
            .strip_prefix(base.as_str())
            .expect("under the base path");
        let op = &spec["paths"][path][r.method.as_str().to_lowercase()];
        let schema_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .map(|s| s.trim_start_matches("#/components/schemas/").to_string());
        assert_eq!(
            schema_ref.as_deref(),
            r.action.body(),
            "{} {}",
            r.method.as_str(),
            r.path
        );
        if let Some(schema) = r.action.body() {
            assert_eq!(
                op["requestBody"]["required"].as_bool(),
                Some(r.action.body_required()),
                "{}",
                r.path
            );
            assert_eq!(
                spec["components"]["schemas"][schema]["additionalProperties"].as_bool(),
                Some(false),
                "{schema} must refuse unknown fields"
            );
            assert!(
                op["responses"].get("400").is_some(),
                "{} documents its 400",
                r.path
            );
        }
    }
}
