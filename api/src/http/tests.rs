//! Server tests against a fake control loop: every route, every status path, the socket's
//! life cycle and the limits.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::fuzz::fake_vmm::{fixed_answer, simulated_answer, Answer, FAKE_MIGRATION_POLLS};
use crate::fuzz::{check_reply, exchange, idle_burst, After, FakeVmm, Reply};
use crate::{api_channel, ApiError, ApiRequest, MigrationPhase, MigrationStatus, VmInfo};

const T: Duration = Duration::from_secs(10);

struct Harness {
    dir: PathBuf,
    socket: PathBuf,
    server: Option<HttpServer>,
    vmm: Option<FakeVmm>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.take();
        self.vmm.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("colovmm-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn harness_with(name: &str, options: HttpOptions, answer: Option<Box<Answer>>) -> Harness {
    let dir = temp_dir(name);
    let socket = dir.join("api.sock");
    let (tx, rx) = api_channel().unwrap();
    let vmm = FakeVmm::with_answer(rx, answer.unwrap_or_else(|| Box::new(fixed_answer)));
    let server = start_http_server_with(&socket, tx, options).unwrap();
    Harness {
        dir,
        socket,
        server: Some(server),
        vmm: Some(vmm),
    }
}

fn harness(name: &str) -> Harness {
    harness_with(name, HttpOptions::default(), None)
}

impl Harness {
    fn raw(&self, bytes: &[u8]) -> Reply {
        let raw = exchange(&self.socket, bytes, After::Read, T)
            .unwrap()
            .unwrap();
        check_reply(&raw).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&raw)))
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
        } else {
            req.push_str("\r\n");
        }
        self.raw(req.as_bytes())
    }

    fn seen(&self) -> Vec<ApiRequest> {
        self.vmm.as_ref().map(FakeVmm::seen).unwrap_or_default()
    }
}

fn error_of(r: &Reply) -> String {
    r.json["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn every_route_succeeds() {
    let h = harness("routes");
    let ping = h.call("GET", "/api/v1/vmm.ping", None);
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json["version"], "0.1.0-fake");

    let create = h.call(
        "PUT",
        "/api/v1/vm.create",
        Some(r#"{"payload":{"kernel":"/k"},"memory":{"size":268435456}}"#),
    );
    assert_eq!(create.status, 204);
    for ep in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.reboot",
        "vm.shutdown",
    ] {
        assert_eq!(
            h.call("PUT", &format!("/api/v1/{ep}"), None).status,
            204,
            "{ep}"
        );
    }
    let info = h.call("GET", "/api/v1/vm.info", None);
    assert_eq!(info.status, 200);
    let info: VmInfo = serde_json::from_value(info.json).unwrap();
    assert_eq!(info.devices.len(), 2);
    let counters = h.call("GET", "/api/v1/vm.counters", None);
    assert_eq!(counters.status, 200);
    assert_eq!(counters.json["root"]["read_bytes"], 4096);
    for (ep, body) in [
        ("vm.snapshot", r#"{"destination_url":"file:///var/snap"}"#),
        ("vm.restore", r#"{"source_url":"file:///var/snap"}"#),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:10.0.0.2:6000","downtime_ms":300,"channels":2}"#,
        ),
        (
            "vm.receive-migration",
            r#"{"receiver_url":"unix:/run/m.sock"}"#,
        ),
    ] {
        let r = h.call("PUT", &format!("/api/v1/{ep}"), Some(body));
        assert_eq!(r.status, 204, "{ep}: {}", r.json);
    }
    let status = h.call("GET", "/api/v1/vm.migration-status", None);
    assert_eq!(status.status, 200);
    let status: MigrationStatus = serde_json::from_value(status.json).unwrap();
    assert_eq!(status.phase, MigrationPhase::Idle);
    assert_eq!(h.call("PUT", "/api/v1/vmm.shutdown", None).status, 204);

    let seen = h.seen();
    assert!(matches!(&seen[1], ApiRequest::VmCreate(c) if c.memory.size == 256 << 20));
    assert!(matches!(
        &seen[11],
        ApiRequest::VmSendMigration(d)
            if d.destination_url == "tcp:10.0.0.2:6000"
                && d.downtime_ms == Some(300)
                && d.channels == Some(2)
    ));
    assert_eq!(
        seen.iter().map(std::mem::discriminant).collect::<Vec<_>>(),
        [
            ApiRequest::VmmPing,
            ApiRequest::VmCreate(Box::new(
                serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap()
            )),
            ApiRequest::VmBoot,
            ApiRequest::VmPause,
            ApiRequest::VmResume,
            ApiRequest::VmReboot,
            ApiRequest::VmShutdown,
            ApiRequest::VmInfo,
            ApiRequest::VmCounters,
            ApiRequest::VmSnapshot(serde_json::from_str(r#"{"destination_url":""}"#).unwrap()),
            ApiRequest::VmRestore(serde_json::from_str(r#"{"source_url":""}"#).unwrap()),
            ApiRequest::VmSendMigration(serde_json::from_str(r#"{"destination_url":""}"#).unwrap()),
            ApiRequest::VmReceiveMigration(serde_json::from_str(r#"{"receiver_url":""}"#).unwrap()),
            ApiRequest::VmMigrationStatus,
            ApiRequest::VmmShutdown,
        ]
        .iter()
        .map(std::mem::discriminant)
        .collect::<Vec<_>>()
    );
}

#[test]
fn bad_configs_are_400_and_never_reach_the_loop() {
    let h = harness("create400");
    let r = h.call("PUT", "/api/v1/vm.create", Some("{"));
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("invalid VmConfig JSON"), "{}", r.json);

    let r = h.call(
        "PUT",
        "/api/v1/vm.create",
        Some(r#"{"payload":{"kernel":"/k"},"bogus":1}"#),
    );
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("unknown field `bogus`"), "{}", r.json);

    let r = h.call(
        "PUT",
        "/api/v1/vm.create",
        Some(r#"{"payload":{"kernel":"/k"},"memory":{"size":0}}"#),
    );
    assert_eq!(r.status, 400);
    assert!(
        error_of(&r).contains("--memory: invalid size"),
        "{}",
        r.json
    );

    let r = h.call("PUT", "/api/v1/vm.create", None);
    assert_eq!(r.status, 400, "an empty body is no config");
    let r = h.raw(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 11\r\n\r\n\xff\xfe{}{}{}{}{");
    assert_eq!(r.status, 400);
    assert!(h.seen().is_empty(), "{:?}", h.seen());
}

#[test]
fn bad_snapshot_and_migration_bodies_are_400_and_never_reach_the_loop() {
    let h = harness("state400");
    let cases: &[(&str, &str, &str)] = &[
        // Unknown fields.
        (
            "vm.snapshot",
            r#"{"destination_url":"file:///s","compress":true}"#,
            "unknown field `compress`",
        ),
        (
            "vm.restore",
            r#"{"source_url":"file:///s","prefault":true}"#,
            "unknown field `prefault`",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:h:1","local":true}"#,
            "unknown field `local`",
        ),
        (
            "vm.receive-migration",
            r#"{"receiver_url":"tcp:h:1","destination_url":"tcp:h:1"}"#,
            "unknown field `destination_url`",
        ),
        // Missing bodies and fields.
        ("vm.snapshot", "", "invalid VmSnapshotConfig JSON"),
        (
            "vm.restore",
            "{}",
            "invalid VmRestoreConfig JSON: missing field `source_url`",
        ),
        (
            "vm.send-migration",
            r#"{"downtime_ms":5}"#,
            "missing field `destination_url`",
        ),
        // Bad URL schemes.
        (
            "vm.snapshot",
            r#"{"destination_url":"tcp:h:1"}"#,
            "invalid VmSnapshotConfig: destination_url \"tcp:h:1\": expected file:///DIR",
        ),
        (
            "vm.snapshot",
            r#"{"destination_url":"file://relative/dir"}"#,
            "a host or a relative path is not allowed",
        ),
        (
            "vm.restore",
            r#"{"source_url":"/var/snap"}"#,
            "invalid VmRestoreConfig: source_url \"/var/snap\": expected file:///DIR",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"file:///x"}"#,
            "invalid SendMigrationData: destination_url \"file:///x\": expected tcp:HOST:PORT or unix:PATH",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp://h:6000"}"#,
            "without // after tcp:",
        ),
        (
            "vm.receive-migration",
            r#"{"receiver_url":"unix:m.sock"}"#,
            "invalid ReceiveMigrationData: receiver_url \"unix:m.sock\": expected unix:PATH with an absolute PATH",
        ),
        (
            "vm.receive-migration",
            r#"{"receiver_url":"tcp:0.0.0.0:70000"}"#,
            "not a number in 1..=65535",
        ),
        // Out-of-range numbers.
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:h:1","downtime_ms":0}"#,
            "invalid SendMigrationData: downtime_ms 0 is out of range 1..=60000",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:h:1","downtime_ms":60001}"#,
            "downtime_ms 60001 is out of range 1..=60000",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:h:1","channels":0}"#,
            "channels 0 is out of range 1..=16",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:h:1","channels":17}"#,
            "channels 17 is out of range 1..=16",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:h:1","channels":4294967296}"#,
            "invalid SendMigrationData JSON",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:h:1","downtime_ms":-1}"#,
            "invalid SendMigrationData JSON",
        ),
    ];
    for (ep, body, want) in cases {
        let r = h.call("PUT", &format!("/api/v1/{ep}"), Some(body));
        assert_eq!(r.status, 400, "{ep} {body}: {}", r.json);
        assert!(error_of(&r).contains(want), "{ep} {body}: {}", r.json);
    }
    // The right body on the wrong route is refused too.
    let r = h.call(
        "PUT",
        "/api/v1/vm.restore",
        Some(r#"{"destination_url":"file:///s"}"#),
    );
    assert_eq!(r.status, 400);
    let r = h.call("GET", "/api/v1/vm.snapshot", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("PUT")));
    let r = h.call("PUT", "/api/v1/vm.migration-status", Some("{}"));
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    assert!(h.seen().is_empty(), "{:?}", h.seen());
}

#[test]
fn colo_routes_reach_the_loop_and_bad_bodies_do_not() {
    let h = harness_with("colo", HttpOptions::default(), Some(simulated_answer()));
    let cases: &[(&str, &str, &str)] = &[
        ("vm.colo-start", "", "invalid ColoConfig JSON"),
        (
            "vm.colo-start",
            r#"{"role":"primary","peer":"h:1","mode":"fast"}"#,
            "invalid ColoConfig JSON: unknown field `mode`",
        ),
        (
            "vm.colo-start",
            r#"{"role":"secondary"}"#,
            "invalid ColoConfig: listen: required with role secondary",
        ),
        (
            "vm.colo-start",
            r#"{"role":"primary","peer":"[::1]:99999"}"#,
            r#"invalid ColoConfig: peer "[::1]:99999": the port "99999" is not a number in 1..=65535"#,
        ),
        (
            "vm.colo-start",
            r#"{"role":"primary","peer":"h:1","heartbeat_interval_ms":5}"#,
            "invalid ColoConfig: heartbeat_interval_ms 5 is out of range 10..=10000",
        ),
        (
            "vm.colo-set",
            "{}",
            "invalid ColoSetData: nothing to set: give at least one of checkpoint_interval_ms",
        ),
        (
            "vm.colo-set",
            r#"{"checkpoint_interval_ms":0}"#,
            "invalid ColoSetData: checkpoint_interval_ms 0 is out of range 10..=3600000",
        ),
        (
            "vm.colo-checkpoint",
            r#"{"pause_after":"yes"}"#,
            "invalid ColoCheckpointData JSON: invalid type",
        ),
        (
            "vm.colo-checkpoint",
            "[]",
            "invalid ColoCheckpointData JSON: expected a JSON object",
        ),
    ];
    for (ep, body, want) in cases {
        let r = h.call("PUT", &format!("/api/v1/{ep}"), Some(body));
        assert_eq!(r.status, 400, "{ep} {body}: {}", r.json);
        assert!(error_of(&r).starts_with(want), "{ep} {body}: {}", r.json);
    }
    let r = h.call("GET", "/api/v1/vm.colo-failover", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("PUT")));
    let r = h.call("PUT", "/api/v1/vm.memory-checksum", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    assert!(h.seen().is_empty(), "{:?}", h.seen());

    let start = r#"{"role":"primary","peer":"10.0.0.2:9000","channels":4}"#;
    assert_eq!(
        h.call("PUT", "/api/v1/vm.colo-start", Some(start)).status,
        204
    );
    let conflict = r#"{"role":"secondary","listen":"conflict:9000"}"#;
    let r = h.call("PUT", "/api/v1/vm.colo-start", Some(conflict));
    assert_eq!(
        (r.status, error_of(&r).as_str()),
        (409, "COLO is already running")
    );
    // No body at all (no Content-Length), an empty one, and an explicit one.
    assert_eq!(
        h.call("PUT", "/api/v1/vm.colo-checkpoint", None).status,
        204
    );
    assert_eq!(
        h.call("PUT", "/api/v1/vm.colo-checkpoint", Some("")).status,
        204
    );
    let paused = r#"{"pause_after":true}"#;
    assert_eq!(
        h.call("PUT", "/api/v1/vm.colo-checkpoint", Some(paused))
            .status,
        204
    );
    let set = r#"{"checkpoint_interval_ms":250}"#;
    assert_eq!(h.call("PUT", "/api/v1/vm.colo-set", Some(set)).status, 204);
    let r = h.call("GET", "/api/v1/vm.colo-status", None);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(
        (
            r.json["state"].as_str(),
            r.json["checkpoint_interval_ms"].as_u64()
        ),
        (Some("protected"), Some(250))
    );
    let r = h.call("GET", "/api/v1/vm.memory-checksum", None);
    assert_eq!(r.status, 200);
    let sum: crate::MemoryChecksum = serde_json::from_value(r.json).unwrap();
    assert_eq!(sum, crate::fuzz::fake_vmm::SAMPLE_CHECKSUM);
    assert_eq!(h.call("PUT", "/api/v1/vm.colo-failover", None).status, 204);
    assert_eq!(h.call("PUT", "/api/v1/vm.colo-failover", None).status, 409);
    let r = h.call("GET", "/api/v1/vm.colo-status", None);
    assert_eq!(r.json["state"], "failed-over");
    assert_eq!(r.json["exit"]["after_checkpoints"], 42);

    let seen = h.seen();
    assert!(matches!(
        &seen[0],
        ApiRequest::VmColoStart(c) if c.channel_count() == 4 && c.peer.as_deref() == Some("10.0.0.2:9000")
    ));
    let default = crate::ColoCheckpointData::default();
    assert_eq!(seen[2], ApiRequest::VmColoCheckpoint(default.clone()));
    assert_eq!(seen[3], ApiRequest::VmColoCheckpoint(default));
    assert_eq!(
        seen[4],
        ApiRequest::VmColoCheckpoint(crate::ColoCheckpointData { pause_after: true })
    );
    assert_eq!(
        seen.iter().map(std::mem::discriminant).collect::<Vec<_>>(),
        [
            ApiRequest::VmColoStart(crate::ColoConfig::parse("role=primary,peer=h:1").unwrap()),
            ApiRequest::VmColoStart(crate::ColoConfig::parse("role=primary,peer=h:1").unwrap()),
            ApiRequest::VmColoCheckpoint(crate::ColoCheckpointData::default()),
            ApiRequest::VmColoCheckpoint(crate::ColoCheckpointData::default()),
            ApiRequest::VmColoCheckpoint(crate::ColoCheckpointData::default()),
            ApiRequest::VmColoSet(crate::ColoSetData {
                checkpoint_interval_ms: None
            }),
            ApiRequest::VmColoStatus,
            ApiRequest::VmMemoryChecksum,
            ApiRequest::VmColoFailover,
            ApiRequest::VmColoFailover,
            ApiRequest::VmColoStatus,
        ]
        .iter()
        .map(std::mem::discriminant)
        .collect::<Vec<_>>()
    );
}

#[test]
fn a_simulated_migration_runs_to_its_end() {
    let h = harness_with("migrate", HttpOptions::default(), Some(simulated_answer()));
    let status = |h: &Harness| -> MigrationStatus {
        let r = h.call("GET", "/api/v1/vm.migration-status", None);
        assert_eq!(r.status, 200, "{}", r.json);
        serde_json::from_value(r.json).unwrap()
    };
    assert_eq!(status(&h).phase, MigrationPhase::Idle);
    let send = |h: &Harness, url: &str| {
        h.call(
            "PUT",
            "/api/v1/vm.send-migration",
            Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
        )
    };
    assert_eq!(send(&h, "tcp:10.0.0.2:6000").status, 204);
    let r = send(&h, "tcp:10.0.0.2:6000");
    assert_eq!(r.status, 409);
    assert_eq!(error_of(&r), "a migration is already running");
    let mut last = status(&h);
    assert_eq!((last.phase, last.round), (MigrationPhase::Active, 1));
    for _ in 1..FAKE_MIGRATION_POLLS {
        let next = status(&h);
        assert!(next.bytes >= last.bytes && next.round >= last.round);
        last = next;
    }
    assert_eq!(last.phase, MigrationPhase::Completed);
    assert_eq!(last.downtime_ms, Some(12.5));
    assert_eq!(status(&h).phase, MigrationPhase::Completed, "it stays so");

    assert_eq!(
        send(&h, "unix:/run/fail.sock").status,
        204,
        "a new one may start"
    );
    let mut end = status(&h);
    for _ in 1..FAKE_MIGRATION_POLLS {
        assert_eq!(end.phase, MigrationPhase::Active);
        end = status(&h);
    }
    assert_eq!(end.phase, MigrationPhase::Failed);
    assert!(end.error.unwrap().contains("connection reset"));
}

#[test]
fn unknown_routes_and_wrong_methods() {
    let h = harness("404405");
    for p in [
        "/api/v1/vm.nope",
        "/",
        "/api/v1/",
        "/api/v2/vm.info",
        "/api/v1/vm.info/x",
    ] {
        let r = h.call("GET", p, None);
        assert_eq!(r.status, 404, "{p}");
        assert!(error_of(&r).contains(p), "{}", r.json);
    }
    let r = h.call("GET", "/api/v1/vm.boot", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("PUT")));
    let r = h.call("PUT", "/api/v1/vm.info", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    let r = h.call("put", "/api/v1/vm.boot", None);
    assert_eq!(r.status, 405, "methods are case-sensitive");
    assert_eq!(
        h.call("GET", "/api/v1/vmm.ping?verbose=1", None).status,
        200
    );
    assert!(h.seen().len() == 1);
}

#[test]
fn control_loop_errors_keep_their_status() {
    let h = harness("loop-errors");
    let r = h.call(
        "PUT",
        "/api/v1/vm.create",
        Some(r#"{"payload":{"kernel":"/conflict"}}"#),
    );
    assert_eq!(r.status, 409);
    assert_eq!(error_of(&r), "a VM already exists");
    assert_eq!(r.json["causes"][0], "created earlier");

    let odd = harness_with(
        "loop-odd",
        HttpOptions::default(),
        Some(Box::new(|req: &ApiRequest| match req {
            ApiRequest::VmBoot => Err(ApiError::new(200, "not really an error code")),
            ApiRequest::VmPause => Err(ApiError::new(503, "vCPUs busy")),
            _ => Ok(serde_json::json!([1, 2])),
        })),
    );
    assert_eq!(odd.call("PUT", "/api/v1/vm.boot", None).status, 500);
    assert_eq!(odd.call("PUT", "/api/v1/vm.pause", None).status, 503);
    let r = odd.call("GET", "/api/v1/vm.info", None);
    assert_eq!((r.status, r.json.clone()), (200, serde_json::json!([1, 2])));
}

#[test]
fn a_dead_control_loop_is_503() {
    let mut h = harness("loop-gone");
    h.vmm.take(); // drops the receiver
    let r = h.call("GET", "/api/v1/vmm.ping", None);
    assert_eq!(r.status, 503);
    assert!(error_of(&r).contains("control loop"), "{}", r.json);
}

#[test]
fn limits_give_the_right_status() {
    let h = harness_with(
        "limits",
        HttpOptions {
            limits: Limits {
                timeout: Duration::from_millis(300),
                ..Limits::default()
            },
            ..HttpOptions::default()
        },
        None,
    );
    let big = "a".repeat(20 << 10);
    let r = h.raw(format!("GET /api/v1/vmm.ping HTTP/1.1\r\nX: {big}\r\n\r\n").as_bytes());
    assert_eq!(r.status, 431);
    let many: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
    let r = h.raw(format!("GET /api/v1/vmm.ping HTTP/1.1\r\n{many}\r\n").as_bytes());
    assert_eq!(r.status, 431);
    let r = h.raw(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n{");
    assert_eq!(r.status, 413);
    assert!(error_of(&r).contains("1048577"), "{}", r.json);
    let r = h.raw(b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_eq!(r.status, 501);
    assert_eq!(h.raw(b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n").status, 505);
    assert_eq!(h.raw(b"GET /api/v1/vmm.ping HTTP/1.1\r\n").status, 400);
    assert_eq!(
        h.raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            .status,
        400
    );

    // Slowloris: one byte at a time, never finishing, is cut off at the deadline.
    let mut s = UnixStream::connect(&h.socket).unwrap();
    let start = Instant::now();
    let mut raw = Vec::new();
    for b in b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: "
        .iter()
        .cycle()
        .take(40)
    {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.read_to_end(&mut raw);
    assert_eq!(check_reply(&raw).unwrap().status, 408);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(h.call("GET", "/api/v1/vmm.ping", None).status, 200);
}

#[test]
fn http10_and_expect_continue() {
    let h = harness("proto");
    let r = h.raw(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200);

    // The client waits for 100 Continue before sending the body, as curl does.
    let body = br#"{"payload":{"kernel":"/k"}}"#;
    let mut s = UnixStream::connect(&h.socket).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(check_reply(&rest).unwrap().status, 204);
}

#[test]
fn socket_is_private_and_replaces_only_stale_files() {
    let dir = temp_dir("socket");
    let path = dir.join("api.sock");
    // A stale socket: bound, then its listener dropped without removing the file.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());

    let (tx, _rx) = api_channel().unwrap();
    let server = start_http_server(&path, tx).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let (tx2, _rx2) = api_channel().unwrap();
    let e = start_http_server(&path, tx2).err().unwrap();
    assert!(matches!(e, HttpError::Socket(SocketError::InUse(_))), "{e}");

    server.join();
    assert!(!path.exists(), "join removes the socket");

    std::fs::write(&path, b"precious").unwrap();
    let (tx3, _rx3) = api_channel().unwrap();
    let e = start_http_server(&path, tx3).err().unwrap();
    assert!(
        matches!(e, HttpError::Socket(SocketError::NotASocket(_))),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    let long = dir.join("x".repeat(120));
    let (tx4, _rx4) = api_channel().unwrap();
    let e = start_http_server(&long, tx4).err().unwrap();
    assert!(
        matches!(e, HttpError::Socket(SocketError::BadPath(_))),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stopping_cuts_idle_clients_short() {
    let mut h = harness("stop");
    // Idle clients on every worker; the default request timeout is 10 s.
    let idle: Vec<UnixStream> = (0..6)
        .map(|_| UnixStream::connect(&h.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    if let Some(server) = h.server.take() {
        server.stop();
        server.join();
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(!h.socket.exists());
    drop(idle);
}

#[test]
fn a_full_queue_is_answered_503() {
    let h = harness_with(
        "busy",
        HttpOptions {
            limits: Limits {
                timeout: Duration::from_millis(300),
                ..Limits::default()
            },
            workers: 1,
            max_pending: 2,
        },
        None,
    );
    let by_status = idle_burst(&h.socket, 20, T).unwrap();
    assert!(
        by_status.get(&503).copied().unwrap_or(0) > 0,
        "{by_status:?}"
    );
    assert!(
        by_status.get(&408).copied().unwrap_or(0) > 0,
        "{by_status:?}"
    );
    assert_eq!(h.call("GET", "/api/v1/vmm.ping", None).status, 200);
}

#[test]
fn a_client_vanishing_mid_reply_is_harmless() {
    let h = harness("vanish");
    for after in [After::Disconnect, After::ReadSome] {
        for _ in 0..50 {
            let r = exchange(&h.socket, b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n", after, T);
            assert!(matches!(r, Ok(None)));
        }
    }
    assert_eq!(h.call("GET", "/api/v1/vmm.ping", None).status, 200);
}

#[test]
fn the_client_talks_to_the_server() {
    let h = harness("client");
    let (status, body) =
        crate::client::request(&h.socket, "GET", "/api/v1/vmm.ping", None).unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["version"], "0.1.0-fake");
    let (status, body) = crate::client::request(&h.socket, "PUT", "/api/v1/vm.boot", None).unwrap();
    assert_eq!((status, body.len()), (204, 0));
    let big = vec![b'x'; 2 << 20];
    let (status, body) =
        crate::client::request(&h.socket, "PUT", "/api/v1/vm.create", Some(&big)).unwrap();
    assert_eq!(status, 413);
    assert!(crate::client::api_error(status, &body)
        .error
        .contains("exceeds"));
}

#[allow(dead_code)]
fn assert_send_sync<T: Send + Sync>(_: &T) {}

#[test]
fn the_server_handle_can_move_between_threads() {
    let h = harness("send");
    if let Some(s) = &h.server {
        assert_send_sync(s);
        assert_eq!(s.path(), Path::new(&h.socket));
    }
}
