//! Time as the store sees it: timestamps passed in by the caller (nothing
//! here reads a clock) and the two resolutions series are kept at.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_millis(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    pub const fn from_secs(s: u64) -> Timestamp {
        Timestamp(s.saturating_mul(1000))
    }

    /// A wall-clock time (one before the epoch is the epoch). The caller
    /// reads the clock; this only converts.
    pub fn from_system_time(t: SystemTime) -> Timestamp {
        let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn minus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }

    /// How long after `earlier` this is (zero if it is not after).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// A resolution series are kept at: a step and how many steps are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// 5 s points, the last hour (720 points).
    FiveSeconds,
    /// 1 min points, the last day (1,440 points), each the merge of the
    /// twelve 5 s points of its minute.
    OneMinute,
}

impl Resolution {
    /// Both, finest first.
    pub const ALL: [Resolution; 2] = [Resolution::FiveSeconds, Resolution::OneMinute];

    /// The length of one point.
    pub const fn step(self) -> Duration {
        Duration::from_millis(self.step_ms())
    }

    pub const fn step_ms(self) -> u64 {
        match self {
            Resolution::FiveSeconds => 5_000,
            Resolution::OneMinute => 60_000,
        }
    }

    /// How many points a series keeps at this resolution.
    pub const fn capacity(self) -> usize {
        match self {
            Resolution::FiveSeconds => 720,
            Resolution::OneMinute => 1_440,
        }
    }

    /// How far back points are kept: `capacity × step`.
    pub const fn retention(self) -> Duration {
        Duration::from_millis(self.step_ms() * self.capacity() as u64)
    }

    /// The number of the step `t` falls in (steps counted from the epoch).
    pub(crate) const fn slot(self, t: Timestamp) -> u64 {
        t.0 / self.step_ms()
    }

    /// When step `slot` starts.
    pub(crate) const fn start(self, slot: u64) -> Timestamp {
        Timestamp(slot.saturating_mul(self.step_ms()))
    }

    /// The finest resolution whose retention still covers `since`..`now`.
    pub fn covering(since: Timestamp, now: Timestamp) -> Resolution {
        if now.since(since) <= Resolution::FiveSeconds.retention() {
            Resolution::FiveSeconds
        } else {
            Resolution::OneMinute
        }
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resolution::FiveSeconds => "5s",
            Resolution::OneMinute => "1m",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_cover_an_hour_and_a_day() {
        assert_eq!(Resolution::FiveSeconds.retention(), Duration::from_secs(3600));
        assert_eq!(Resolution::OneMinute.retention(), Duration::from_secs(86_400));
        // A minute is a whole number of fine steps, so every 5 s point
        // lies in exactly one 1 min point.
        assert_eq!(Resolution::OneMinute.step_ms() % Resolution::FiveSeconds.step_ms(), 0);
    }

    #[test]
    fn slots_and_starts() {
        let r = Resolution::FiveSeconds;
        assert_eq!(r.slot(Timestamp::from_millis(4_999)), 0);
        assert_eq!(r.slot(Timestamp::from_millis(5_000)), 1);
        assert_eq!(r.start(3), Timestamp::from_secs(15));
        assert_eq!(Resolution::covering(Timestamp::from_secs(0), Timestamp::from_secs(3600)), r);
        assert_eq!(Resolution::covering(Timestamp::from_secs(0), Timestamp::from_secs(3601)), Resolution::OneMinute);
    }

    #[test]
    fn timestamps_saturate() {
        let t = Timestamp::from_secs(10);
        assert_eq!(t.minus(Duration::from_secs(20)), Timestamp::from_millis(0));
        assert_eq!(Timestamp::from_millis(u64::MAX).plus(Duration::from_secs(1)), Timestamp::from_millis(u64::MAX));
        assert_eq!(Timestamp::from_secs(5).since(t), Duration::ZERO);
        assert_eq!(Timestamp::from_system_time(UNIX_EPOCH + Duration::from_millis(1234)).as_millis(), 1234);
        assert_eq!(Timestamp::from_millis(1234).to_string(), "1.234");
    }
}
