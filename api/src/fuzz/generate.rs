//! Hostile and malformed requests, each with the reply it must get.
//!
//! No case ever changes the VMM's state: a candidate that the server would turn into a
//! `PUT` for the control loop (say, a mutation that happens to spell a valid `vm.pause`, a
//! `vm.snapshot` / `vm.send-migration` / `vm.colo-start` body that parses and validates, or
//! a `vm.colo-checkpoint` with an empty body) is thrown away, using the server's own parser,
//! route table and body checks to decide. So the generator is safe to fire at a colovmm
//! running a real guest: at worst it reads `vm.info`, `vm.counters`, `vm.migration-status`,
//! `vm.colo-status` or `vm.memory-checksum`.
//!
//! Expected statuses assume the server's default [`Limits`](crate::http::Limits).

use super::rng::Rng;
use crate::http::request::{parse_head, Limits};
use crate::http::routes::{self, Action, Method, ROUTES};

/// The kind of abuse a case is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// Uniformly random bytes.
    RandomBytes,
    /// A request cut short, then a half-close.
    Truncated,
    /// Request line or a header past the 16 KiB head cap.
    HugeHead,
    /// More header fields than the parser takes.
    ManyHeaders,
    /// A `Content-Length` past the 1 MiB body cap.
    HugeBody,
    /// A route that takes a body (`vm.create`, `vm.snapshot`, `vm.send-migration`...) with
    /// one it refuses.
    BadJson,
    /// A known route with a method it does not take.
    WrongMethod,
    /// A path that is no route.
    UnknownRoute,
    /// Non-UTF-8 or NUL bytes in the method, path, header names or body.
    InvalidUtf8,
    /// A harmless request followed by more requests and garbage on the same connection.
    Pipelined,
    /// Unparseable or conflicting `Content-Length`.
    BadLength,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Not HTTP/1.0 or 1.1.
    BadVersion,
    /// A request with random bytes flipped, inserted or deleted.
    Mutated,
    /// `Expect: 100-continue` with a bad body.
    ExpectContinue,
    /// A valid read-only request (every `GET` route).
    ReadOnly,
    /// Sends part or all of a request, then closes without reading.
    Disconnect,
    /// Sends a request, reads a few bytes of the reply, then closes.
    DisconnectMidReply,
    /// Connects and sends nothing.
    Empty,
}

/// Every shape, for uniform picking.
pub const SHAPES: &[Shape] = &[
    Shape::RandomBytes,
    Shape::Truncated,
    Shape::HugeHead,
    Shape::ManyHeaders,
    Shape::HugeBody,
    Shape::BadJson,
    Shape::WrongMethod,
    Shape::UnknownRoute,
    Shape::InvalidUtf8,
    Shape::Pipelined,
    Shape::BadLength,
    Shape::Chunked,
    Shape::BadVersion,
    Shape::Mutated,
    Shape::ExpectContinue,
    Shape::ReadOnly,
    Shape::Disconnect,
    Shape::DisconnectMidReply,
    Shape::Empty,
];

/// What the client does after sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Half-closes and reads the whole reply.
    Read,
    /// Closes at once.
    Disconnect,
    /// Reads a few bytes, then closes.
    ReadSome,
}

/// What the reply must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this status.
    Status(u16),
    /// Some 4xx or 5xx.
    Error,
    /// Any well-formed reply.
    Any,
}

/// One generated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// Its kind.
    pub shape: Shape,
    /// The bytes sent.
    pub bytes: Vec<u8>,
    /// What the client does next.
    pub after: After,
    /// The reply it must get (when it reads one).
    pub expect: Expect,
}

const UNKNOWN_PATHS: &[&str] = &[
    "/",
    "/api",
    "/api/v1",
    "/api/v1/",
    "/api/v1/vm.nope",
    "/api/v2/vm.info",
    "/api/v1/vm.info/extra",
    "/api/v1//vm.info",
    "/API/V1/VM.INFO",
    "/api/v1/vm%2Einfo",
    "*",
    "/../../etc/passwd",
];
const BAD_BODIES: &[&[u8]] = &[
    b"",
    b"{",
    b"null",
    b"[]",
    b"{}",
    b"\"payload\"",
    br#"{"payload":{"kernel":"/k"},"bogus":1}"#,
    br#"{"payload":{"kernel":"/k"},"memory":{"size":0}}"#,
    br#"{"payload":{"kernel":"/k"},"cpus":{"boot":0}}"#,
    br#"{"payload":{"kernel":""}}"#,
    br#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t","mac":"zz"}]}"#,
    br#"{"payload":{"kernel":"/k"},"memory":{"size":1e400}}"#,
    br#"{"payload":{"kernel":"/k"},"memory":{"size":-1}}"#,
    b"{\"payload\":{\"kernel\":\"\xff\xfe\"}}",
    b"{\"payload\":{\"kernel\":\"/k\"}}\x00",
    br#"{"payload":{"kernel":"/k"}} {"payload":{"kernel":"/k"}}"#,
];
const VALID_CONFIG: &[u8] = br#"{"payload":{"kernel":"/k","cmdline":"console=ttyS0"}}"#;
/// Refused bodies for the snapshot, migration and COLO routes: each is bad for every one of
/// them (wrong or unknown field, bad URL scheme, out-of-range number, not an object), except
/// `""` and `{}`, which `vm.colo-checkpoint` (its body is optional) takes.
const BAD_STATE_BODIES: &[&[u8]] = &[
    b"",
    b"{",
    b"{}",
    b"[]",
    b"null",
    br#"{"destination_url":"http://10.0.0.2:6000"}"#,
    br#"{"destination_url":"tcp://10.0.0.2:6000"}"#,
    br#"{"destination_url":"tcp:10.0.0.2:0"}"#,
    br#"{"destination_url":"tcp:10.0.0.2:6000","downtime_ms":0}"#,
    br#"{"destination_url":"tcp:10.0.0.2:6000","downtime_ms":60001}"#,
    br#"{"destination_url":"tcp:10.0.0.2:6000","channels":0}"#,
    br#"{"destination_url":"tcp:10.0.0.2:6000","channels":17}"#,
    br#"{"destination_url":"unix:relative.sock","channels":1}"#,
    br#"{"destination_url":"file://snapshots/a"}"#,
    br#"{"destination_url":"file:///"}"#,
    br#"{"source_url":"snapshot"}"#,
    br#"{"source_url":"tcp:h:1"}"#,
    br#"{"receiver_url":"tcp:[::1:6000"}"#,
    br#"{"receiver_url":"unix:"}"#,
    br#"{"destination_url":"file:///s","bogus":1}"#,
    br#"{"source_url":"file:///s","source_url":"file:///t"}"#,
    b"{\"destination_url\":\"file:///s\0\"}",
    br#"{"role":"primary"}"#,
    br#"{"role":"primary","peer":"10.0.0.2:0"}"#,
    br#"{"role":"primary","peer":"10.0.0.2:9000","listen":"0.0.0.0:9000"}"#,
    br#"{"role":"secondary","peer":"10.0.0.2:9000"}"#,
    br#"{"role":"secondary","listen":"tcp:0.0.0.0:9000"}"#,
    br#"{"role":"observer","listen":"0.0.0.0:9000"}"#,
    br#"{"role":"primary","peer":"h:1","channels":17}"#,
    br#"{"role":"primary","peer":"h:1","checkpoint_interval_ms":9}"#,
    br#"{"role":"primary","peer":"h:1","heartbeat_interval_ms":600}"#,
    br#"{"role":"primary","peer":"h:1","heartbeat_timeout_ms":60001}"#,
    br#"{"checkpoint_interval_ms":null}"#,
    br#"{"checkpoint_interval_ms":3600001}"#,
    br#"{"checkpoint_interval_ms":-5}"#,
    br#"{"pause_after":1}"#,
    br#"{"pause_after":true,"bogus":1}"#,
];
/// Valid snapshot and migration requests (mutation templates only: never sent as such).
const STATE_TEMPLATES: &[(&str, &[u8])] = &[
    (
        "/api/v1/vm.snapshot",
        br#"{"destination_url":"file:///var/snap"}"#,
    ),
    (
        "/api/v1/vm.restore",
        br#"{"source_url":"file:///var/snap"}"#,
    ),
    (
        "/api/v1/vm.send-migration",
        br#"{"destination_url":"tcp:10.0.0.2:6000","downtime_ms":300,"channels":2}"#,
    ),
    (
        "/api/v1/vm.receive-migration",
        br#"{"receiver_url":"unix:/run/m.sock"}"#,
    ),
    (
        "/api/v1/vm.colo-start",
        br#"{"role":"primary","peer":"10.0.0.2:9000","checkpoint_interval_ms":500,"channels":2}"#,
    ),
    (
        "/api/v1/vm.colo-start",
        br#"{"role":"secondary","listen":"[::]:9000"}"#,
    ),
    ("/api/v1/vm.colo-set", br#"{"checkpoint_interval_ms":250}"#),
    ("/api/v1/vm.colo-checkpoint", br#"{"pause_after":true}"#),
];

/// Builds a request with a `Content-Length` matching `body` (when non-empty).
fn req(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        s.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    s.push_str("\r\n");
    let mut out = s.into_bytes();
    out.extend_from_slice(body);
    out
}

fn route_path(rng: &mut Rng) -> &'static str {
    rng.pick(ROUTES).map_or("/api/v1/vmm.ping", |r| r.path)
}

/// A route that takes a JSON body.
fn body_route(rng: &mut Rng) -> &'static routes::Route {
    let with_body: Vec<&'static routes::Route> = ROUTES
        .iter()
        .filter(|r| r.action.body().is_some())
        .collect();
    rng.pick(&with_body)
        .copied()
        .unwrap_or_else(|| Action::VmCreate.route())
}

/// A body `route` refuses with a 400.
fn bad_body_for(rng: &mut Rng, route: &routes::Route) -> Vec<u8> {
    for _ in 0..100 {
        let body = if route.action == Action::VmCreate || rng.chance(25) {
            bad_body(rng)
        } else {
            rng.pick(BAD_STATE_BODIES).copied().unwrap_or(b"{").to_vec()
        };
        // `vm.colo-checkpoint` takes an empty body, and `{}`.
        if route.action.request(&body).is_err() {
            return body;
        }
    }
    b"{".to_vec()
}

fn read_only_path(rng: &mut Rng) -> &'static str {
    let gets: Vec<&'static str> = ROUTES
        .iter()
        .filter(|r| r.method == Method::Get)
        .map(|r| r.path)
        .collect();
    rng.pick(&gets).copied().unwrap_or("/api/v1/vmm.ping")
}

fn bad_body(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => rng.bytes_in(1, 512),
        // serde_json stops at 128 levels; the server must answer, not overflow its stack.
        1 => b"[".repeat(rng.range(200, 20_000)),
        2 => {
            let cut = rng.range(1, VALID_CONFIG.len());
            VALID_CONFIG.get(..cut).unwrap_or_default().to_vec()
        }
        _ => rng.pick(BAD_BODIES).copied().unwrap_or(b"{").to_vec(),
    }
}

/// A well-formed request of any kind, including state-changing ones (mutation templates).
fn template(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => req("PUT", "/api/v1/vm.create", &[], VALID_CONFIG),
        1 => req("GET", read_only_path(rng), &[("Accept", "*/*")], b""),
        2 => req("PUT", route_path(rng), &[], b""),
        3 => {
            let (path, body) = rng
                .pick(STATE_TEMPLATES)
                .copied()
                .unwrap_or(("/api/v1/vm.create", VALID_CONFIG));
            req("PUT", path, &[], body)
        }
        _ => {
            let route = body_route(rng);
            let body = bad_body_for(rng, route);
            req("PUT", route.path, &[], &body)
        }
    }
}

/// A complete request that is refused before reaching the control loop, or only reads.
fn harmless(rng: &mut Rng) -> (Vec<u8>, Expect) {
    match rng.below(3) {
        0 => (req("GET", read_only_path(rng), &[], b""), Expect::Any),
        1 => (
            req("DELETE", route_path(rng), &[], b""),
            Expect::Status(405),
        ),
        _ => (
            req(
                "PUT",
                rng.pick(UNKNOWN_PATHS).copied().unwrap_or("/"),
                &[],
                b"{}",
            ),
            Expect::Status(404),
        ),
    }
}

fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.range(1, 9) {
        let at = rng.below(bytes.len() + 1);
        let byte = rng.next_u64() as u8;
        match rng.below(4) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 => bytes.insert(at, byte),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => {
                let end = (at + rng.range(1, 16)).min(bytes.len());
                let piece = bytes.get(at..end).unwrap_or_default().to_vec();
                bytes.splice(at..at, piece);
            }
        }
    }
    bytes
}

fn build(shape: Shape, rng: &mut Rng) -> Case {
    let case = |bytes, expect| Case {
        shape,
        bytes,
        after: After::Read,
        expect,
    };
    match shape {
        Shape::RandomBytes => case(rng.bytes_in(1, 4096), Expect::Any),
        Shape::Truncated => {
            let full = template(rng);
            let cut = rng.below(full.len());
            case(
                full.get(..cut).unwrap_or_default().to_vec(),
                Expect::Status(400),
            )
        }
        Shape::HugeHead => {
            let big = "a".repeat(rng.range(17 << 10, 96 << 10));
            let bytes = if rng.chance(50) {
                req("GET", "/api/v1/vmm.ping", &[("X-Big", &big)], b"")
            } else {
                req("GET", &format!("/api/v1/{big}"), &[], b"")
            };
            case(bytes, Expect::Status(431))
        }
        Shape::ManyHeaders => {
            let n = rng.range(65, 400);
            let names: Vec<String> = (0..n).map(|i| format!("X-H{i}")).collect();
            let headers: Vec<(&str, &str)> = names.iter().map(|h| (h.as_str(), "v")).collect();
            case(
                req("GET", "/api/v1/vmm.ping", &headers, b""),
                Expect::Status(431),
            )
        }
        Shape::HugeBody => {
            let len = match rng.below(3) {
                0 => (1u64 << 20) + 1,
                1 => rng.next_u64() % 1_000_000_000_000 + (1 << 20) + 1,
                _ => 9_999_999_999_999_999_999,
            };
            let mut bytes = format!(
                "PUT {} HTTP/1.1\r\nContent-Length: {len}\r\n\r\n",
                route_path(rng)
            )
            .into_bytes();
            let body = rng.bytes_in(0, 8192);
            bytes.extend_from_slice(&body);
            case(bytes, Expect::Status(413))
        }
        Shape::BadJson => {
            let route = body_route(rng);
            let body = bad_body_for(rng, route);
            case(req("PUT", route.path, &[], &body), Expect::Status(400))
        }
        Shape::WrongMethod => {
            let route = rng.pick(ROUTES).copied().unwrap_or(ROUTES[0]);
            let wrong: &[&str] = match route.method {
                Method::Get => &["PUT", "POST", "DELETE", "HEAD", "OPTIONS", "get", "PATCH"],
                Method::Put => &["GET", "POST", "DELETE", "HEAD", "OPTIONS", "put", "PATCH"],
            };
            let m = rng.pick(wrong).copied().unwrap_or("POST");
            case(req(m, route.path, &[], b""), Expect::Status(405))
        }
        Shape::UnknownRoute => {
            let m = rng.pick(&["GET", "PUT", "POST"]).copied().unwrap_or("GET");
            let p = rng.pick(UNKNOWN_PATHS).copied().unwrap_or("/");
            case(req(m, p, &[], b""), Expect::Status(404))
        }
        Shape::InvalidUtf8 => {
            let bytes = match rng.below(5) {
                0 => b"GET /api/v1/vm.\xc3\x28info HTTP/1.1\r\n\r\n".to_vec(),
                1 => b"G\xffT /api/v1/vm.info HTTP/1.1\r\n\r\n".to_vec(),
                2 => b"GET /api/v1/vm.info HTTP/1.1\r\nX-\xfe: a\r\n\r\n".to_vec(),
                3 => b"GET /api/v1/vm\x00.info HTTP/1.1\r\n\r\n".to_vec(),
                _ => b"PUT /api/v1/vm.c\xffreate HTTP/1.1\r\nX-Note: \xff\xfe\r\n\r\n".to_vec(),
            };
            case(bytes, Expect::Error)
        }
        Shape::Pipelined => {
            let (mut bytes, expect) = harmless(rng);
            for _ in 0..rng.range(1, 6) {
                if rng.chance(50) {
                    bytes.extend(rng.bytes_in(1, 256));
                } else {
                    bytes.extend(harmless(rng).0);
                }
            }
            case(bytes, expect)
        }
        Shape::BadLength => {
            let bytes = match rng.below(3) {
                0 => {
                    let v = rng
                        .pick(&["-1", "abc", "1.5", "0x10", "", "1 2", "+4", "99999999999999999999"])
                        .copied()
                        .unwrap_or("x");
                    req("PUT", "/api/v1/vm.create", &[("Content-Length", v)], b"")
                }
                1 => b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}}".to_vec(),
                _ => b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: \xff\r\n\r\n".to_vec(),
            };
            case(bytes, Expect::Status(400))
        }
        Shape::Chunked => {
            let mut bytes =
                b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            bytes.extend_from_slice(b"5\r\n{\"a\":\r\n0\r\n\r\n");
            case(bytes, Expect::Status(501))
        }
        Shape::BadVersion => {
            let v = rng
                .pick(&[
                    "HTTP/2.0",
                    "HTTP/1.2",
                    "HTTP/0.9",
                    "HTTP/1.1x",
                    "HTTP/11",
                    "http/1.1",
                    "",
                ])
                .copied()
                .unwrap_or("HTTP/9");
            let sp = if v.is_empty() { "" } else { " " };
            case(
                format!("GET /api/v1/vmm.ping{sp}{v}\r\n\r\n").into_bytes(),
                Expect::Error,
            )
        }
        Shape::Mutated => {
            let t = template(rng);
            case(mutate(rng, t), Expect::Any)
        }
        Shape::ExpectContinue => {
            let route = body_route(rng);
            let body = bad_body_for(rng, route);
            case(
                req("PUT", route.path, &[("Expect", "100-continue")], &body),
                Expect::Status(400),
            )
        }
        Shape::ReadOnly => {
            let path = read_only_path(rng);
            let bytes = match rng.below(3) {
                0 => format!("GET {path} HTTP/1.0\r\n\r\n").into_bytes(),
                1 => format!("GET {path}?x=1 HTTP/1.1\n\n").into_bytes(),
                _ => req("GET", path, &[("Connection", "keep-alive")], b""),
            };
            case(bytes, Expect::Any)
        }
        Shape::Disconnect => {
            let full = template(rng);
            let cut = rng.range(0, full.len() + 1);
            Case {
                after: After::Disconnect,
                ..case(full.get(..cut).unwrap_or_default().to_vec(), Expect::Any)
            }
        }
        Shape::DisconnectMidReply => Case {
            after: After::ReadSome,
            ..case(harmless(rng).0, Expect::Any)
        },
        Shape::Empty => case(Vec::new(), Expect::Status(400)),
    }
}

/// Whether the server would hand these bytes to the control loop as a state-changing
/// request (decided with the server's own parser and route table).
pub fn changes_state(bytes: &[u8]) -> bool {
    // The server parses the head only once it is complete; an error or an incomplete head
    // is refused without reaching the control loop.
    let Ok(Some((head, used))) = parse_head(bytes) else {
        return false;
    };
    let Some(route) = routes::find(&head.target) else {
        return false;
    };
    if head.method != route.method.as_str() || route.method == Method::Get {
        return false;
    }
    // The server refuses an oversized body before routing, and dispatches only once the
    // whole body is in; a client that stops short gets a 400.
    if head.content_length > Limits::default().max_body as u64 {
        return false;
    }
    let Ok(len) = usize::try_from(head.content_length) else {
        return false;
    };
    let Some(body) = bytes.get(used..).and_then(|rest| rest.get(..len)) else {
        return false;
    };
    // A route with a body (vm.create, vm.snapshot, vm.send-migration...) reaches the loop
    // only with one that parses and validates; the others ignore theirs.
    route.action.request(body).is_ok()
}

/// Whether the server reads these bytes as a `HEAD` request (its reply then has no body).
pub fn is_head_request(bytes: &[u8]) -> bool {
    matches!(parse_head(bytes), Ok(Some((head, _))) if head.method == "HEAD")
}

/// One random case that is safe to send to a running VM.
pub fn generate(rng: &mut Rng) -> Case {
    for _ in 0..1000 {
        let shape = rng.pick(SHAPES).copied().unwrap_or(Shape::Empty);
        let case = build(shape, rng);
        if !changes_state(&case.bytes) {
            return case;
        }
    }
    build(Shape::Empty, rng)
}

#[cfg(test)]
mod tests {
    use super::super::quote;
    use super::*;

    /// Bodies from [`BAD_STATE_BODIES`] that `vm.colo-checkpoint`, whose body is optional,
    /// takes.
    const OPTIONAL_BODY_ACCEPTS: &[&[u8]] = &[b"", b"{}"];

    #[test]
    fn never_changes_state() {
        let mut rng = Rng::new(1);
        let mut shapes = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            let c = generate(&mut rng);
            assert!(!changes_state(&c.bytes), "{c:?}");
            shapes.insert(c.shape);
        }
        assert_eq!(shapes.len(), SHAPES.len(), "every shape shows up");
    }

    #[test]
    fn bad_state_bodies_are_refused_everywhere() {
        for r in ROUTES.iter().filter(|r| r.action.body().is_some()) {
            for body in BAD_STATE_BODIES {
                let accepted = !r.action.body_required() && OPTIONAL_BODY_ACCEPTS.contains(body);
                assert_eq!(
                    r.action.request(body).is_ok(),
                    accepted,
                    "{} {}",
                    r.path,
                    quote(body)
                );
            }
        }
        for (path, body) in STATE_TEMPLATES {
            let route = routes::find(path).unwrap();
            assert!(route.action.request(body).is_ok(), "{path}");
        }
    }

    #[test]
    fn the_filter_catches_state_changes() {
        assert!(changes_state(b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\n"));
        assert!(changes_state(
            b"PUT /api/v1/vmm.shutdown?x HTTP/1.0\r\n\r\n"
        ));
        assert!(changes_state(&req(
            "PUT",
            "/api/v1/vm.create",
            &[],
            VALID_CONFIG
        )));
        assert!(!changes_state(&req("PUT", "/api/v1/vm.create", &[], b"{")));
        for (path, body) in STATE_TEMPLATES {
            assert!(changes_state(&req("PUT", path, &[], body)), "{path}");
            let optional = routes::find(path).is_some_and(|r| !r.action.body_required());
            assert_eq!(
                changes_state(&req("PUT", path, &[], b"{}")),
                optional,
                "{path}"
            );
        }
        for put in ["vm.colo-failover", "vm.colo-checkpoint"] {
            let bytes = format!("PUT /api/v1/{put} HTTP/1.1\r\n\r\n");
            assert!(changes_state(bytes.as_bytes()), "{put}");
        }
        assert!(!changes_state(&req(
            "PUT",
            "/api/v1/vm.colo-start",
            &[],
            br#"{"role":"primary","peer":"10.0.0.2:9000","listen":"0.0.0.0:1"}"#
        )));
        assert!(!changes_state(
            b"GET /api/v1/vm.colo-status HTTP/1.1\r\n\r\n"
        ));
        assert!(!changes_state(
            b"GET /api/v1/vm.memory-checksum HTTP/1.1\r\n\r\n"
        ));
        assert!(!changes_state(&req(
            "PUT",
            "/api/v1/vm.send-migration",
            &[],
            br#"{"destination_url":"tcp:h:1","channels":99}"#
        )));
        assert!(!changes_state(&req(
            "PUT",
            "/api/v1/vm.snapshot",
            &[],
            br#"{"destination_url":"tcp:h:1"}"#
        )));
        assert!(!changes_state(
            b"GET /api/v1/vm.migration-status HTTP/1.1\r\n\r\n"
        ));
        assert!(!changes_state(b"PUT /api/v1/vm.pause HTTP/1.1\r\n"));
        assert!(!changes_state(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n"));
        assert!(!changes_state(b"put /api/v1/vm.pause HTTP/1.1\r\n\r\n"));
        assert!(!changes_state(
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"
        ));
        assert!(!changes_state(
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
        ));
        assert!(!changes_state(
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
    }
}
