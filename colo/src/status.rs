//! What `vm.colo-status` reports: role, state, checkpoint counts and reasons, pause and phase
//! times, bytes per checkpoint, and how protection ended.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::block::link::DisksStatus;
use crate::proxy::link::ProxyStatus;
use crate::record::Reason;

/// Pause samples kept for the percentile (the last this many checkpoints).
const WINDOW: usize = 4096;

/// Which side this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the PVM, sends checkpoints.
    Primary,
    /// Runs the SVM, receives checkpoints.
    Secondary,
}

impl Role {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// Where protection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColoState {
    /// Connecting and copying the whole VM (secondary: waiting for the primary).
    Syncing,
    /// Both VMs run; checkpoints follow.
    Protected,
    /// A checkpoint is under way.
    Checkpointing,
    /// The peer was lost; this side runs alone.
    FailedOver,
    /// Protection ended without a failover (stopped, or never started).
    Stopped,
}

/// What the surviving side does once protection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitAction {
    /// The VM runs on as a normal, unprotected VM.
    Continue,
    /// The VM must stop: the secondary's SVM when the primary ended protection (the PVM
    /// lives on), or an SVM that never received a complete checkpoint.
    Stop,
}

/// How protection ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ColoExit {
    /// This side's role.
    pub role: Role,
    /// Why.
    pub reason: String,
    /// Whether a checkpoint was under way (it was abandoned or finished first).
    pub during_checkpoint: bool,
    /// Complete checkpoints before the end.
    pub after_checkpoints: u64,
    /// What the VM does now.
    pub action: ExitAction,
}

/// Pause statistics, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PauseStats {
    /// Last checkpoint.
    pub last: f64,
    /// Mean over the window.
    pub mean: f64,
    /// 99th percentile over the window.
    pub p99: f64,
    /// Largest over the window.
    pub max: f64,
}

/// One checkpoint, as measured on this side.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CheckpointReport {
    /// Checkpoint number.
    pub seq: u64,
    /// Page bytes moved (zero pages count as their size).
    pub bytes: u64,
    /// Pages moved.
    pub pages: u64,
    /// Milliseconds per phase. Primary: pause, collect, transfer, secondary (flush and load
    /// there, plus the ack), resume. Secondary: pause, flush, load, resume.
    pub phases_ms: BTreeMap<String, f64>,
}

/// Heartbeat settings and liveness.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeartbeatStatus {
    /// Beat period.
    pub interval_ms: u64,
    /// Silence that means the peer is lost.
    pub timeout_ms: u64,
    /// Milliseconds since the peer's last beat (none yet: null).
    pub last_seen_ms_ago: Option<f64>,
}

/// The status document.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColoStatus {
    /// This side's role.
    pub role: Role,
    /// Where protection is.
    pub state: ColoState,
    /// The other side's address.
    pub peer: Option<String>,
    /// Time between checkpoints.
    pub checkpoint_interval_ms: u64,
    /// Parallel checkpoint channels.
    pub channels: u32,
    /// Complete checkpoints, the initial sync included.
    pub checkpoints: u64,
    /// Why the last one was taken.
    pub last_reason: Option<Reason>,
    /// Checkpoints per reason.
    pub reasons: BTreeMap<String, u64>,
    /// VM pause per checkpoint (the initial sync's excluded).
    pub pause_ms: PauseStats,
    /// The last checkpoint.
    pub last_checkpoint: Option<CheckpointReport>,
    /// Mean page bytes per checkpoint (the initial sync's excluded).
    pub mean_bytes: u64,
    /// Mean pages per checkpoint (the initial sync's excluded).
    pub mean_pages: u64,
    /// Mean milliseconds per phase (the initial sync's excluded).
    pub phases_mean_ms: BTreeMap<String, f64>,
    /// How protection ended, once it has.
    pub exit: Option<ColoExit>,
    /// Heartbeat.
    pub heartbeat: HeartbeatStatus,
    /// Milliseconds since the initial sync completed.
    pub protected_ms: Option<u64>,
    /// The network proxy, once its channel is up.
    pub proxy: Option<ProxyStatus>,
    #[serde(skip)]
    proxy_source: Option<Live<ProxyStatus>>,
    /// Block replication, once its channel is up.
    pub disks: Option<DisksStatus>,
    #[serde(skip)]
    disks_source: Option<Live<DisksStatus>>,
    #[serde(skip)]
    pauses: VecDeque<f64>,
    #[serde(skip)]
    totals: Totals,
    #[serde(skip)]
    protected_since: Option<Instant>,
    #[serde(skip)]
    seen: Option<crate::heartbeat::LastSeen>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Totals {
    count: u64,
    bytes: u64,
    pages: u64,
    phases: BTreeMap<String, f64>,
}

impl ColoStatus {
    /// A fresh status.
    pub fn new(role: Role, peer: Option<String>, interval: Duration, channels: u16) -> Self {
        ColoStatus {
            role,
            state: ColoState::Syncing,
            peer,
            checkpoint_interval_ms: interval.as_millis() as u64,
            channels: channels.into(),
            checkpoints: 0,
            last_reason: None,
            reasons: BTreeMap::new(),
            pause_ms: PauseStats::default(),
            last_checkpoint: None,
            mean_bytes: 0,
            mean_pages: 0,
            phases_mean_ms: BTreeMap::new(),
            exit: None,
            heartbeat: HeartbeatStatus::default(),
            protected_ms: None,
            proxy: None,
            proxy_source: None,
            disks: None,
            disks_source: None,
            pauses: VecDeque::new(),
            totals: Totals::default(),
            protected_since: None,
            seen: None,
        }
    }

    /// Reports the peer's heartbeat from now on.
    pub fn watch_heartbeat(&mut self, seen: crate::heartbeat::LastSeen) {
        self.seen = Some(seen);
    }

    /// Reports the proxy's live counters from now on.
    pub fn watch_proxy(&mut self, source: Arc<dyn Fn() -> ProxyStatus + Send + Sync>) {
        self.proxy_source = Some(Live(source));
    }

    /// Keeps `last` as the proxy's final counters (its channel has closed).
    pub fn proxy_ended(&mut self, last: ProxyStatus) {
        self.proxy_source = None;
        self.proxy = Some(last);
    }

    /// Reports block replication's live counters from now on.
    pub fn watch_disks(&mut self, source: Arc<dyn Fn() -> DisksStatus + Send + Sync>) {
        self.disks_source = Some(Live(source));
    }

    /// Keeps `last` as block replication's final counters (its channel has closed).
    pub fn disks_ended(&mut self, last: DisksStatus) {
        self.disks_source = None;
        self.disks = Some(last);
    }

    /// Records a complete checkpoint and its pause.
    pub fn record(&mut self, reason: Reason, pause: Duration, report: CheckpointReport) {
        self.checkpoints += 1;
        self.last_reason = Some(reason);
        *self.reasons.entry(reason.as_str().into()).or_default() += 1;
        if reason == Reason::Initial {
            self.protected_since = Some(Instant::now());
        } else {
            let t = &mut self.totals;
            t.count += 1;
            t.bytes += report.bytes;
            t.pages += report.pages;
            for (k, v) in &report.phases_ms {
                *t.phases.entry(k.clone()).or_default() += v;
            }
            self.mean_bytes = t.bytes / t.count;
            self.mean_pages = t.pages / t.count;
            let n = t.count as f64;
            self.phases_mean_ms = t.phases.iter().map(|(k, v)| (k.clone(), v / n)).collect();
            if self.pauses.len() == WINDOW {
                self.pauses.pop_front();
            }
            self.pauses.push_back(ms(pause));
            self.pause_ms = pause_stats(&self.pauses);
        }
        self.last_checkpoint = Some(report);
    }

    /// The status as the API shows it now.
    pub fn snapshot(&self) -> ColoStatus {
        let mut s = self.clone();
        s.protected_ms = self.protected_since.map(|t| t.elapsed().as_millis() as u64);
        if self.exit.is_none() {
            s.heartbeat.last_seen_ms_ago = self.seen.as_ref().and_then(|l| l.ms_ago());
        }
        if let Some(src) = &self.proxy_source {
            s.proxy = Some((src.0)());
        }
        if let Some(src) = &self.disks_source {
            s.disks = Some((src.0)());
        }
        s
    }
}

/// Where live counters come from (a closure into the proxy's or the disks' link).
struct Live<T>(Arc<dyn Fn() -> T + Send + Sync>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl<T> PartialEq for Live<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

fn pause_stats(window: &VecDeque<f64>) -> PauseStats {
    let mut sorted: Vec<f64> = window.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return PauseStats::default();
    }
    // Nearest-rank percentile.
    let rank = ((0.99 * n as f64).ceil() as usize).clamp(1, n);
    PauseStats {
        last: window.back().copied().unwrap_or_default(),
        mean: sorted.iter().sum::<f64>() / n as f64,
        p99: sorted[rank - 1],
        max: sorted[n - 1],
    }
}

/// Milliseconds of a duration, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The status shared between the COLO worker and the API.
#[derive(Clone)]
pub struct SharedStatus(Arc<Mutex<ColoStatus>>);

impl SharedStatus {
    /// Shares `status`.
    pub fn new(status: ColoStatus) -> Self {
        SharedStatus(Arc::new(Mutex::new(status)))
    }

    /// Locks it (a panicked holder leaves consistent data: every update is one assignment).
    pub fn lock(&self) -> MutexGuard<'_, ColoStatus> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current status.
    pub fn get(&self) -> ColoStatus {
        self.lock().snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_exclude_the_initial_sync() {
        let mut s = ColoStatus::new(Role::Primary, None, Duration::from_millis(100), 1);
        s.record(
            Reason::Initial,
            Duration::from_millis(500),
            CheckpointReport {
                seq: 1,
                bytes: 1 << 30,
                ..Default::default()
            },
        );
        for i in 1..=100u64 {
            let mut phases = BTreeMap::new();
            phases.insert("transfer".to_string(), 2.0);
            s.record(
                Reason::Interval,
                Duration::from_millis(i),
                CheckpointReport {
                    seq: i + 1,
                    bytes: 4096 * i,
                    pages: i,
                    phases_ms: phases,
                },
            );
        }
        assert_eq!(s.checkpoints, 101);
        assert_eq!(s.reasons["initial"], 1);
        assert_eq!(s.reasons["interval"], 100);
        assert_eq!(s.pause_ms.last, 100.0);
        assert_eq!(s.pause_ms.max, 100.0);
        assert_eq!(s.pause_ms.p99, 99.0);
        assert!((s.pause_ms.mean - 50.5).abs() < 1e-9);
        assert_eq!(s.mean_pages, 50);
        assert_eq!(s.phases_mean_ms["transfer"], 2.0);
        let json = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(json["role"], "primary");
        assert_eq!(json["state"], "syncing");
        assert_eq!(json["last_reason"], "interval");
        assert!(json.get("pauses").is_none());
    }
}
