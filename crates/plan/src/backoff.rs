//! Restart backoff and crash-loop detection for one slot.

use nonstop_core::process::RestartPolicy;
use serde::Serialize;
use std::time::{Duration, Instant};

/// What the engine remembers about a slot's recent exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SlotBackoff {
    /// Exits in a row of instances that lived less than `reset_after`.
    pub consecutive_failures: u32,
    /// All restarts of this slot since the app was brought up.
    pub restarts: u32,
    /// Not before this instant may the slot be started again.
    #[serde(skip)]
    pub retry_at: Option<Instant>,
}

impl SlotBackoff {
    /// The state after an instance of this slot exited on its own after
    /// `uptime`. An instance that lived at least `reset_after` resets the
    /// count, so a process that crashes once a day restarts at once.
    pub fn after_exit(self, uptime: Duration, policy: &RestartPolicy, now: Instant) -> SlotBackoff {
        let failures = if uptime >= policy.reset_after { 1 } else { self.consecutive_failures.saturating_add(1) };
        SlotBackoff {
            consecutive_failures: failures,
            restarts: self.restarts.saturating_add(1),
            retry_at: Some(now.checked_add(delay(failures, policy)).unwrap_or(now + Duration::from_secs(86_400))),
        }
    }

    /// Whether the slot counts as crash-looping (shown in `status`; the
    /// engine keeps retrying at `backoff_max`).
    pub fn crash_loop(&self, policy: &RestartPolicy) -> bool {
        self.consecutive_failures >= policy.crash_loop_after
    }

    /// Whether the slot may be started at `now`.
    pub fn may_start(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }
}

/// `backoff_initial * 2^(failures-1)`, capped at `backoff_max`.
pub fn delay(failures: u32, policy: &RestartPolicy) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    policy.backoff_initial.saturating_mul(1u32 << exp).min(policy.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            reset_after: Duration::from_secs(30),
            crash_loop_after: 4,
        }
    }

    #[test]
    fn delays_double_and_cap() {
        let p = policy();
        let got: Vec<_> = (1..=9).map(|f| delay(f, &p).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(delay(u32::MAX, &p), Duration::from_secs(5));
    }

    #[test]
    fn quick_exits_accumulate_into_a_crash_loop() {
        let p = policy();
        let now = Instant::now();
        let mut b = SlotBackoff::default();
        for i in 1..=4 {
            assert!(!b.crash_loop(&p));
            b = b.after_exit(Duration::from_millis(10), &p, now);
            assert_eq!(b.consecutive_failures, i);
        }
        assert!(b.crash_loop(&p));
        assert_eq!(b.restarts, 4);
        assert!(!b.may_start(now));
        assert!(b.may_start(now + Duration::from_millis(800)));
    }

    #[test]
    fn a_long_life_resets_the_backoff() {
        let p = policy();
        let now = Instant::now();
        let b = SlotBackoff { consecutive_failures: 6, restarts: 6, retry_at: None };
        let b = b.after_exit(Duration::from_secs(31), &p, now);
        assert_eq!(b.consecutive_failures, 1);
        assert_eq!(b.restarts, 7);
        assert_eq!(b.retry_at, Some(now + Duration::from_millis(100)));
    }
}
