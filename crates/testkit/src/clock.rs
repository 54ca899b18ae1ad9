use nonstop_core::Clock;
use std::time::{Duration, SystemTime};

/// A [`Clock`] that reads tokio's time, so that on a paused runtime the
/// engine's `now()` and its `tokio::time::sleep_until` agree, and the test
/// moves both by awaiting. Wall time starts at a fixed date and moves with
/// it.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: tokio::time::Instant,
    wall_start: SystemTime,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl TokioClock {
    /// Create it inside the (paused) runtime of the test.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            wall_start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        }
    }

    /// Virtual time since the clock was created.
    pub fn elapsed(&self) -> Duration {
        tokio::time::Instant::now().duration_since(self.start)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
    fn wall(&self) -> SystemTime {
        self.wall_start + self.elapsed()
    }
}
