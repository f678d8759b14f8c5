//! Thousands of hostile requests at a server with a fake control loop: every reply must be
//! well-formed HTTP with a JSON body (the error shape on errors), the server must still
//! answer afterwards, and its threads, descriptors and memory must not grow.
//!
//! Its own test binary, so nothing else runs in the process while /proc is read.
//! `COLOVMM_FUZZ_SEED` and `COLOVMM_FUZZ_CASES` replay or lengthen a run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::fuzz::{self, proc_stats, FakeVmm, ProcStats};
use api::http::{start_http_server_with, HttpOptions, Limits};

const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits for closing connections to release their descriptors before comparing.
fn settled(baseline: &ProcStats) -> ProcStats {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = proc_stats(None).unwrap();
        if now.fds <= baseline.fds || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn thousands_of_hostile_requests() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("colovmm-api-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let (tx, rx) = api::api_channel().unwrap();
    let vmm = FakeVmm::start(rx);
    let server = start_http_server_with(
        &socket,
        tx,
        HttpOptions {
            limits: Limits::default(),
            ..HttpOptions::default()
        },
    )
    .unwrap();

    let seed = env_or("COLOVMM_FUZZ_SEED", 0xc010_5eed);
    let cases = env_or("COLOVMM_FUZZ_CASES", 3000) as usize;

    // Warm-up: allocator arenas and lazily grown buffers settle before the baseline.
    fuzz::run(&socket, seed ^ 1, 300, EXCHANGE_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let before = settled(&proc_stats(None).unwrap());

    let start = Instant::now();
    let report =
        fuzz::run(&socket, seed, cases, EXCHANGE_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "fuzz: {} cases, {} replies in {:?}; statuses {:?}; shapes {:?}",
        report.cases,
        report.replies,
        start.elapsed(),
        report.by_status,
        report.by_shape
    );
    assert_eq!(report.cases, cases);
    assert_eq!(
        report.by_shape.len(),
        fuzz::generate::SHAPES.len(),
        "every shape was sent"
    );
    for status in [200, 400, 404, 405, 413, 431, 501, 505] {
        assert!(
            report.by_status.contains_key(&status),
            "no {status} seen: {:?}",
            report.by_status
        );
    }

    // Several hostile clients at once: the fixed pool and bounded queue must hold.
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                fuzz::run(&socket, seed.wrapping_add(i + 2), 500, EXCHANGE_TIMEOUT)
            })
        })
        .collect();
    for c in clients {
        let r = c
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("concurrent: {e}"));
        assert_eq!(r.cases, 500);
    }

    let after = settled(&before);
    eprintln!("before {before:?}, after {after:?}");
    assert_eq!(after.threads, before.threads, "thread count changed");
    assert!(
        after.fds <= before.fds,
        "descriptors leaked: {before:?} -> {after:?}"
    );
    assert!(
        after.rss_kib < before.rss_kib + 16 * 1024,
        "RSS grew by {} KiB",
        after.rss_kib.saturating_sub(before.rss_kib)
    );

    let (status, body) = api::client::request(&socket, "GET", "/api/v1/vmm.ping", None).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        vmm.seen().iter().all(|r| matches!(
            r,
            api::ApiRequest::VmmPing
                | api::ApiRequest::VmInfo
                | api::ApiRequest::VmCounters
                | api::ApiRequest::VmMigrationStatus
                | api::ApiRequest::VmColoStatus
                | api::ApiRequest::VmMemoryChecksum
        )),
        "a fuzz case reached the control loop with a state change"
    );

    drop(server);
    drop(vmm);
    assert!(!socket.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
