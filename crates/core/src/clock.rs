//! Time as a parameter. Pure decisions take `now` as an argument; the I/O
//! shells get it from a [`Clock`], which tests replace with a manual one.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub trait Clock: Send + Sync + 'static {
    /// Monotonic time, for timeouts, backoff and hysteresis.
    fn now(&self) -> Instant;
    /// Wall-clock time, for records shown to people.
    fn wall(&self) -> SystemTime;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to. For tests.
#[derive(Debug)]
pub struct ManualClock {
    inner: Mutex<(Instant, SystemTime)>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self { inner: Mutex::new((Instant::now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))) }
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += by;
        g.1 += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0
    }
    fn wall(&self) -> SystemTime {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}
