//! Log lines a guest can provoke at will, at most a few per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Allows `per_second` events per wall-clock second and counts the ones it suppressed.
pub struct RateLimit {
    per_second: u64,
    second: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limiter allowing `per_second` events each second.
    pub const fn new(per_second: u64) -> Self {
        Self {
            per_second,
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// True if this event may be logged; when a new second starts, also returns how many
    /// events were suppressed in the previous one (through `suppressed`).
    pub fn allow(&self, suppressed: &mut u64) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        *suppressed = 0;
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
            *suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.per_second {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// `log::warn!` through a [`RateLimit`] (a static one per call site).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::rate_limit::RateLimit = $crate::rate_limit::RateLimit::new(5);
        let mut suppressed = 0;
        if LIMIT.allow(&mut suppressed) {
            if suppressed > 0 {
                log::warn!("({suppressed} similar messages suppressed)");
            }
            log::warn!($($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_events_within_a_second() {
        let l = RateLimit::new(3);
        let mut s = 0;
        let allowed = (0..100).filter(|_| l.allow(&mut s)).count();
        // Crossing a second boundary mid-loop can allow one more batch, never more.
        assert!((3..=6).contains(&allowed), "{allowed}");
    }
}
