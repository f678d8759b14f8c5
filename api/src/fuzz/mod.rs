//! Robustness testing for the API server (the `fuzz` feature): a generator of hostile
//! requests that never change VM state, a strict reply checker, a fake control loop, and
//! /proc readings to spot leaks. Shared by this crate's tests and the VMM-level
//! integration tests, which fire [`run`] at a real colovmm with a running guest.

pub mod check;
pub mod exchange;
pub mod fake_vmm;
pub mod generate;
pub mod proc_stats;
pub mod rng;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub use check::{check_reply, check_reply_to, CheckError, Reply};
pub use exchange::{exchange, ExchangeError};
pub use fake_vmm::FakeVmm;
pub use generate::{generate, is_head_request, After, Case, Expect, Shape};
pub use proc_stats::{proc_stats, ProcStats};
pub use rng::Rng;

/// Longest excerpt of a request or reply quoted in an error.
const QUOTE: usize = 300;

/// A case the server got wrong.
#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    /// The connection itself failed (server down, hung, or babbling).
    #[error("case {index} ({shape:?}, seed {seed}): {source}; request: {request}")]
    Exchange {
        /// Position in the run.
        index: usize,
        /// The run's seed, to replay it.
        seed: u64,
        /// The case's kind.
        shape: Shape,
        /// The request, escaped and shortened.
        request: String,
        /// What failed.
        #[source]
        source: ExchangeError,
    },
    /// The reply was malformed, or not the expected status.
    #[error("case {index} ({shape:?}, seed {seed}): {why}; request: {request}; reply: {reply}")]
    Reply {
        /// Position in the run.
        index: usize,
        /// The run's seed.
        seed: u64,
        /// The case's kind.
        shape: Shape,
        /// What is wrong.
        why: String,
        /// The request, escaped and shortened.
        request: String,
        /// The reply, escaped and shortened.
        reply: String,
    },
}

/// What a run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Cases sent.
    pub cases: usize,
    /// Replies read and checked.
    pub replies: usize,
    /// Replies per status.
    pub by_status: BTreeMap<u16, usize>,
    /// Cases per shape.
    pub by_shape: BTreeMap<Shape, usize>,
}

/// Escapes and shortens bytes for an error message.
pub fn quote(bytes: &[u8]) -> String {
    let mut s: String = bytes
        .iter()
        .take(QUOTE)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > QUOTE {
        s.push_str(&format!("...({} bytes)", bytes.len()));
    }
    s
}

/// Sends `count` generated cases from `seed`, one connection each, in sequence; stops at
/// the first one the server mishandles. `timeout` bounds each exchange.
pub fn run(socket: &Path, seed: u64, count: usize, timeout: Duration) -> Result<Report, FuzzError> {
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    for index in 0..count {
        let case = generate(&mut rng);
        report.cases += 1;
        *report.by_shape.entry(case.shape).or_default() += 1;
        let raw = exchange(socket, &case.bytes, case.after, timeout).map_err(|source| {
            FuzzError::Exchange {
                index,
                seed,
                shape: case.shape,
                request: quote(&case.bytes),
                source,
            }
        })?;
        let Some(raw) = raw else { continue };
        let fail = |why: String| FuzzError::Reply {
            index,
            seed,
            shape: case.shape,
            why,
            request: quote(&case.bytes),
            reply: quote(&raw),
        };
        let reply =
            check_reply_to(&raw, is_head_request(&case.bytes)).map_err(|e| fail(e.to_string()))?;
        let status_ok = match case.expect {
            Expect::Status(s) => reply.status == s,
            Expect::Error => reply.status >= 400,
            Expect::Any => true,
        };
        if !status_ok {
            return Err(fail(format!(
                "expected {:?}, got {}",
                case.expect, reply.status
            )));
        }
        report.replies += 1;
        *report.by_status.entry(reply.status).or_default() += 1;
    }
    Ok(report)
}

/// Opens `count` connections that send nothing, then reads each one's reply: every one must
/// get a well-formed error (408 once the server's request timeout passes, or 503 when its
/// queue is full). Returns the replies per status.
pub fn idle_burst(
    socket: &Path,
    count: usize,
    timeout: Duration,
) -> Result<BTreeMap<u16, usize>, FuzzError> {
    let fail = |index, why: String, reply: &[u8]| FuzzError::Reply {
        index,
        seed: 0,
        shape: Shape::Empty,
        why,
        request: String::new(),
        reply: quote(reply),
    };
    let mut streams = Vec::with_capacity(count);
    for index in 0..count {
        let s = std::os::unix::net::UnixStream::connect(socket)
            .map_err(|e| fail(index, format!("connect: {e}"), b""))?;
        streams.push(s);
    }
    let mut by_status = BTreeMap::new();
    for (index, mut s) in streams.into_iter().enumerate() {
        use std::io::Read;
        let _ = s.set_read_timeout(Some(timeout));
        let mut raw = Vec::new();
        // Read to EOF without half-closing: the server must end an idle connection itself.
        if let Err(e) = s.by_ref().take(1 << 20).read_to_end(&mut raw) {
            if e.kind() != std::io::ErrorKind::ConnectionReset {
                return Err(fail(index, format!("read: {e}"), &raw));
            }
        }
        let reply = check_reply(&raw).map_err(|e| fail(index, e.to_string(), &raw))?;
        if reply.status != 408 && reply.status != 503 {
            return Err(fail(index, format!("status {}", reply.status), &raw));
        }
        *by_status.entry(reply.status).or_default() += 1;
    }
    Ok(by_status)
}
