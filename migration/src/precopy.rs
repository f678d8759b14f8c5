//! Precopy convergence as pure functions: from what each round sent, how long it took and how
//! much the guest dirtied meanwhile, decide between another round and stop-and-copy, and
//! predict the downtime.

use std::time::Duration;

/// Limits of a precopy migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrecopyConfig {
    /// Longest acceptable pause of the guest.
    pub downtime_budget: Duration,
    /// Most rounds before stop-and-copy regardless.
    pub max_rounds: u32,
    /// Longest precopy phase before stop-and-copy regardless.
    pub max_duration: Duration,
    /// Downtime paid besides the last pages: pausing vCPUs, saving, sending and loading
    /// device state, resuming. Measure it for the VM at hand.
    pub fixed_downtime: Duration,
    /// Stop when the dirty set has not shrunk for this many rounds in a row.
    pub stall_rounds: u32,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            downtime_budget: Duration::from_millis(300),
            max_rounds: 30,
            max_duration: Duration::from_secs(600),
            fixed_downtime: Duration::from_millis(50),
            stall_rounds: 3,
        }
    }
}

/// One finished precopy round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundReport {
    /// Page data bytes it sent. Leave zero pages out: they cost a range entry on the wire,
    /// and counting them would overstate the bandwidth.
    pub bytes_sent: u64,
    /// How long it took.
    pub duration: Duration,
    /// Bytes dirty when it ended: what the next round, or stop-and-copy, must send.
    pub dirty_after: u64,
}

/// Why precopy stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The rest fits in the downtime budget.
    Converged,
    /// [`PrecopyConfig::max_rounds`] reached.
    RoundLimit,
    /// [`PrecopyConfig::max_duration`] reached.
    TimeLimit,
    /// The guest dirties memory as fast as it is sent: more rounds would not help.
    NotConverging,
}

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Collect the dirty log and send another round while the guest runs.
    AnotherRound,
    /// Pause the guest, send the remaining dirty pages and the state.
    StopAndCopy {
        /// Why now.
        reason: StopReason,
        /// Expected guest pause.
        predicted_downtime: Duration,
        /// Whether that fits the budget; if not, the caller may still go ahead, throttle the
        /// vCPUs and retry, or cancel.
        within_budget: bool,
    },
}

/// Rounds the bandwidth estimate looks back over.
const BANDWIDTH_WINDOW: usize = 3;

/// Transfer rate in bytes per second over the last few rounds, weighted by bytes (a tiny
/// round is mostly latency and says little about bandwidth). `None` without data.
pub fn bandwidth(history: &[RoundReport]) -> Option<f64> {
    let recent = &history[history.len().saturating_sub(BANDWIDTH_WINDOW)..];
    let bytes: u64 = recent.iter().map(|r| r.bytes_sent).sum();
    let secs: f64 = recent.iter().map(|r| r.duration.as_secs_f64()).sum();
    (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs)
}

/// Bytes per second the guest dirtied during `round`. `None` for a zero-length round.
pub fn dirty_rate(round: &RoundReport) -> Option<f64> {
    let secs = round.duration.as_secs_f64();
    (secs > 0.0).then(|| round.dirty_after as f64 / secs)
}

/// Guest pause to send `remaining` bytes at `bandwidth` bytes/s plus the fixed part.
/// Saturates at `Duration::MAX` for a zero or unknown bandwidth.
pub fn predict_downtime(remaining: u64, bandwidth: f64, fixed: Duration) -> Duration {
    if remaining == 0 {
        return fixed;
    }
    if bandwidth.is_nan() || bandwidth <= 0.0 {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(remaining as f64 / bandwidth)
        .map(|d| d.saturating_add(fixed))
        .unwrap_or(Duration::MAX)
}

/// Rounds until the dirty set is at most `target` bytes, if it shrinks at all: each round
/// sends `r` bytes in `r / bandwidth` seconds, while the guest dirties `dirty_rate` bytes/s,
/// so the next dirty set is `r * dirty_rate / bandwidth`.
pub fn rounds_to_converge(
    remaining: u64,
    bandwidth: f64,
    dirty_rate: f64,
    target: u64,
) -> Option<u32> {
    if remaining <= target {
        return Some(0);
    }
    if bandwidth.is_nan() || dirty_rate.is_nan() || bandwidth <= 0.0 {
        return None;
    }
    let ratio = dirty_rate / bandwidth;
    if ratio >= 1.0 {
        return None;
    }
    if ratio <= 0.0 {
        return Some(1);
    }
    // remaining * ratio^n <= max(target, 1): n = ceil(ln(target/remaining) / ln(ratio)).
    let n = ((target.max(1) as f64 / remaining as f64).ln() / ratio.ln()).ceil();
    (n.is_finite() && n <= f64::from(u32::MAX)).then_some(n as u32)
}

/// Decides what follows the rounds in `history` (oldest first).
pub fn decide(cfg: &PrecopyConfig, history: &[RoundReport]) -> Decision {
    let Some(last) = history.last() else {
        // Nothing sent yet: the first round is the full copy.
        return Decision::AnotherRound;
    };
    let remaining = last.dirty_after;
    let predicted = match bandwidth(history) {
        Some(bw) => predict_downtime(remaining, bw, cfg.fixed_downtime),
        None if remaining == 0 => cfg.fixed_downtime,
        None => Duration::MAX,
    };
    let within_budget = predicted <= cfg.downtime_budget;
    let stop = |reason| Decision::StopAndCopy {
        reason,
        predicted_downtime: predicted,
        within_budget,
    };
    if within_budget {
        return stop(StopReason::Converged);
    }
    if history.len() >= cfg.max_rounds as usize {
        return stop(StopReason::RoundLimit);
    }
    let elapsed: Duration = history.iter().map(|r| r.duration).sum();
    if elapsed >= cfg.max_duration {
        return stop(StopReason::TimeLimit);
    }
    if not_converging(cfg, history) {
        return stop(StopReason::NotConverging);
    }
    Decision::AnotherRound
}

/// Whether more rounds look useless: the guest dirties faster than we send (judged from the
/// second round on: the first, full copy says little about the working set), or the dirty
/// set has stopped shrinking.
fn not_converging(cfg: &PrecopyConfig, history: &[RoundReport]) -> bool {
    if history.len() >= 2 {
        if let (Some(bw), Some(rate)) = (bandwidth(history), history.last().and_then(dirty_rate)) {
            if rate >= bw {
                return true;
            }
        }
    }
    let growing = history
        .windows(2)
        .rev()
        .take_while(|w| w[1].dirty_after >= w[0].dirty_after)
        .count();
    cfg.stall_rounds > 0 && growing >= cfg.stall_rounds as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn round(mb_sent: u64, ms: u64, mb_dirty: u64) -> RoundReport {
        RoundReport {
            bytes_sent: mb_sent * MB,
            duration: Duration::from_millis(ms),
            dirty_after: mb_dirty * MB,
        }
    }

    fn reason(d: Decision) -> Option<StopReason> {
        match d {
            Decision::StopAndCopy { reason, .. } => Some(reason),
            Decision::AnotherRound => None,
        }
    }

    #[test]
    fn first_round_always_runs() {
        assert_eq!(
            decide(&PrecopyConfig::default(), &[]),
            Decision::AnotherRound
        );
    }

    #[test]
    fn idle_guest_converges_after_the_full_copy() {
        // 1000 MB at 1000 MB/s, 20 MB dirtied: 20 ms + 50 ms fixed.
        let d = decide(&PrecopyConfig::default(), &[round(1000, 1000, 20)]);
        assert_eq!(
            d,
            Decision::StopAndCopy {
                reason: StopReason::Converged,
                predicted_downtime: Duration::from_millis(70),
                within_budget: true,
            }
        );
    }

    #[test]
    fn busy_guest_gets_more_rounds_until_it_fits() {
        let cfg = PrecopyConfig {
            downtime_budget: Duration::from_millis(100),
            ..PrecopyConfig::default()
        };
        // 1000 MB/s, the guest dirties 400 MB/s: each round's dirty set is 0.4x the last.
        let mut h = vec![round(1000, 1000, 400)];
        assert_eq!(decide(&cfg, &h), Decision::AnotherRound);
        h.push(round(400, 400, 160));
        assert_eq!(decide(&cfg, &h), Decision::AnotherRound);
        h.push(round(160, 160, 64));
        assert_eq!(decide(&cfg, &h), Decision::AnotherRound);
        h.push(round(64, 64, 26)); // 26 ms of pages + 50 ms fixed fits 100 ms.
        assert_eq!(reason(decide(&cfg, &h)), Some(StopReason::Converged));
        // The model agrees: from 400 MB, three rounds reach the budget's 50 MB of pages.
        let (bw, rate) = (1000.0 * MB as f64, 400.0 * MB as f64);
        assert_eq!(rounds_to_converge(400 * MB, bw, rate, 50 * MB), Some(3));
    }

    #[test]
    fn dirtying_faster_than_the_link_stops_early() {
        let cfg = PrecopyConfig::default();
        // 100 MB/s link, guest dirties 150 MB/s.
        let h = [round(1000, 10_000, 1000), round(1000, 10_000, 1500)];
        let d = decide(&cfg, &h);
        assert_eq!(reason(d), Some(StopReason::NotConverging));
        let Decision::StopAndCopy {
            predicted_downtime,
            within_budget,
            ..
        } = d
        else {
            unreachable!()
        };
        assert!(!within_budget);
        assert_eq!(predicted_downtime, Duration::from_millis(15_050));
        assert_eq!(rounds_to_converge(1000, 100.0, 150.0, 10), None);
    }

    #[test]
    fn stalled_dirty_set_stops() {
        let cfg = PrecopyConfig {
            stall_rounds: 2,
            ..PrecopyConfig::default()
        };
        // The guest dirties slower than the link, yet the dirty set stays at 1000 MB.
        let mut h = vec![round(4000, 4000, 1000), round(1000, 2000, 1000)];
        assert_eq!(decide(&cfg, &h), Decision::AnotherRound);
        h.push(round(1000, 2000, 1000));
        assert_eq!(reason(decide(&cfg, &h)), Some(StopReason::NotConverging));
    }

    #[test]
    fn round_and_time_limits() {
        let cfg = PrecopyConfig {
            max_rounds: 2,
            ..PrecopyConfig::default()
        };
        let h = [round(1000, 1000, 800), round(800, 800, 700)];
        assert_eq!(reason(decide(&cfg, &h)), Some(StopReason::RoundLimit));
        let cfg = PrecopyConfig {
            max_duration: Duration::from_secs(1),
            ..PrecopyConfig::default()
        };
        assert_eq!(
            reason(decide(&cfg, &[round(1000, 1500, 800)])),
            Some(StopReason::TimeLimit)
        );
    }

    #[test]
    fn predictions_handle_degenerate_numbers() {
        let fixed = Duration::from_millis(5);
        assert_eq!(predict_downtime(0, 0.0, fixed), fixed);
        assert_eq!(predict_downtime(1, 0.0, fixed), Duration::MAX);
        assert_eq!(predict_downtime(1, f64::NAN, fixed), Duration::MAX);
        assert_eq!(predict_downtime(u64::MAX, 1e-300, fixed), Duration::MAX);
        assert_eq!(
            predict_downtime(1000, 1000.0, fixed),
            Duration::from_millis(1005)
        );
        assert_eq!(bandwidth(&[round(0, 0, 0)]), None);
        assert_eq!(dirty_rate(&round(1, 0, 1)), None);
        // A zero-length round that left dirty pages cannot be judged: keep going.
        assert_eq!(
            decide(&PrecopyConfig::default(), &[round(0, 0, 5)]),
            Decision::AnotherRound
        );
        assert_eq!(rounds_to_converge(10, 1.0, 0.0, 1), Some(1));
        assert_eq!(rounds_to_converge(1, 1.0, 0.5, 1), Some(0));
        // 1024 -> 512 -> 256 -> 128 -> 64: four halvings to get under 100.
        assert_eq!(rounds_to_converge(1024, 2.0, 1.0, 100), Some(4));
    }

    #[test]
    fn simulated_migrations_terminate_within_limits() {
        let cfg = PrecopyConfig::default();
        // (bandwidth MB/s, dirty MB/s, working set MB), 4 GB guest.
        for (bw, rate, wss) in [
            (1000.0, 0.0, 0.0),
            (1000.0, 300.0, 2000.0),
            (1000.0, 900.0, 300.0),
            (100.0, 500.0, 4000.0),
        ] {
            let mut remaining = 4000.0_f64;
            let mut h: Vec<RoundReport> = Vec::new();
            let decision = loop {
                let secs: f64 = remaining / bw;
                let dirty = (rate * secs).min(wss);
                h.push(RoundReport {
                    bytes_sent: (remaining * MB as f64) as u64,
                    duration: Duration::from_secs_f64(secs),
                    dirty_after: (dirty * MB as f64) as u64,
                });
                remaining = dirty;
                match decide(&cfg, &h) {
                    Decision::AnotherRound => assert!(h.len() < 100, "no decision for {bw}/{rate}"),
                    d => break d,
                }
            };
            let Decision::StopAndCopy {
                predicted_downtime, ..
            } = decision
            else {
                unreachable!()
            };
            let expected = Duration::from_secs_f64(remaining / bw) + cfg.fixed_downtime;
            let err = predicted_downtime.abs_diff(expected);
            assert!(
                err < Duration::from_millis(1),
                "{bw}/{rate}: {predicted_downtime:?} vs {expected:?}"
            );
        }
    }
}
