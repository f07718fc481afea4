//! Rate limiting of repetitive log lines (refusals, handshake failures): at most one line per
//! interval, carrying the number of lines suppressed since the last one.

use std::time::{Duration, Instant};

/// One throttled log line's state: lets a line through at most once per [`LogThrottle::INTERVAL`]
/// and counts the ones it held back, so hostile input cannot flood the log.
///
/// ```
/// use std::time::{Duration, Instant};
/// let mut throttle = plexus::LogThrottle::new();
/// let now = Instant::now();
/// assert_eq!(throttle.allow(now), Some(0));
/// assert_eq!(throttle.allow(now + Duration::from_millis(5)), None);
/// assert_eq!(throttle.allow(now + Duration::from_secs(1)), Some(1));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// Lines of one kind are logged at most once per this interval.
    pub const INTERVAL: Duration = Duration::from_secs(1);

    /// A throttle that lets the next line through.
    pub const fn new() -> Self {
        LogThrottle {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed)` when a line may be logged now (with how many were dropped since
    /// the last one), `None` when this one is to be dropped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Self::INTERVAL)
        {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_suppressed_count() {
        let t0 = Instant::now();
        let mut throttle = LogThrottle::new();
        assert_eq!(throttle.allow(t0), Some(0));
        assert_eq!(throttle.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(throttle.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(throttle.allow(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(throttle.allow(t0 + Duration::from_secs(3)), Some(0));
    }
}
