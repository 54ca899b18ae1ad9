//! Giving memory back to the system once a burst of load is over.
//!
//! glibc's malloc keeps what a burst freed in its arenas (one per thread
//! that allocated: every proxy worker) instead of returning it. Measured by
//! `bench/idle-rss` (hello example, 256 connections for 20 s): the daemon's
//! RSS went 12.9 MB idle → 22 MB under load → 21.8 MB 30 s after, and
//! stayed there; `malloc_trim(0)` once the proxy's idle upstream
//! connections had expired brought it to 14 MB.
//!
//! So the daemon calls `malloc_trim(0)` while it is idle after having been
//! busy ([`TrimPolicy`]): at each idle check for [`TRIM_WINDOW`] after the
//! last busy one, as memory keeps being freed after the load ends (idle
//! upstream connections expire after 30 s). Idle means the daemon used
//! less than [`IDLE_CPU`] of a core since the previous check.
//!
//! Why not jemalloc or mimalloc, which return memory by themselves (decay)?
//! They would change the allocator of the proxy's hot path, which
//! `bench/proxy` measures against HAProxy and nginx; a trim while idle
//! costs the hot path nothing, and a few milliseconds of one thread when
//! nothing else happens.

use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the daemon's CPU use is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// For how long after the last busy check an idle check trims.
pub const TRIM_WINDOW: Duration = Duration::from_secs(60);
/// Below this share of one core since the previous check, the daemon is idle.
pub const IDLE_CPU: f64 = 0.02;

/// When to trim: a pure decision over CPU use and time.
#[derive(Debug, Default, Clone)]
pub struct TrimPolicy {
    last_busy: Option<Instant>,
}

impl TrimPolicy {
    /// Called at each check with the share of one core used since the
    /// previous one (`None`: unknown, counted as busy); `true`: trim now.
    pub fn on_check(&mut self, cpu: Option<f64>, now: Instant) -> bool {
        match cpu {
            Some(c) if c < IDLE_CPU => self.last_busy.is_some_and(|t| now.saturating_duration_since(t) <= TRIM_WINDOW),
            _ => {
                self.last_busy = Some(now);
                false
            }
        }
    }
}

/// The CPU time (user + system) this process has used.
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_time_of(&stat)
}

/// utime + stime (fields 14 and 15, in clock ticks) of a `/proc/PID/stat`.
fn cpu_time_of(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // fields[0] is field 3, so field N is fields[N - 3].
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64))
}

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc`'s times (100 almost always).
fn clock_ticks_per_second() -> u64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf takes an integer and returns one; no memory involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|hz| *hz > 0).unwrap_or(100)
}

/// Return the free memory of every malloc arena to the system. Returns
/// whether any was returned. A no-op without glibc.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    {
        // SAFETY: malloc_trim takes no pointers; it only walks and locks
        // glibc's own arenas, and is safe to call from any thread.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Check the daemon's CPU use every [`CHECK_EVERY`] and [`trim`] as
/// [`TrimPolicy`] says, until `shutdown`.
pub async fn trim_when_idle(shutdown: CancellationToken) {
    let mut policy = TrimPolicy::default();
    let mut prev = (Instant::now(), cpu_time());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let now = (Instant::now(), cpu_time());
        let share = match (prev.1, now.1) {
            (Some(a), Some(b)) => {
                let wall = now.0.saturating_duration_since(prev.0).as_secs_f64();
                (wall > 0.0).then(|| b.saturating_sub(a).as_secs_f64() / wall)
            }
            _ => None,
        };
        prev = now;
        if policy.on_check(share, now.0) {
            let returned = trim();
            tracing::debug!(returned, "idle after load: free malloc memory given back to the system");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trims_while_idle_within_the_window_after_load_only() {
        let t0 = Instant::now();
        let mut p = TrimPolicy::default();
        assert!(!p.on_check(Some(0.0), t0), "idle from the start: nothing to give back");
        assert!(!p.on_check(Some(0.5), t0 + CHECK_EVERY), "never under load");
        assert!(!p.on_check(None, t0 + CHECK_EVERY * 2), "unknown counts as busy");
        let busy = t0 + CHECK_EVERY * 2;
        assert!(p.on_check(Some(0.001), busy + CHECK_EVERY));
        assert!(p.on_check(Some(0.001), busy + TRIM_WINDOW));
        assert!(!p.on_check(Some(0.001), busy + TRIM_WINDOW + CHECK_EVERY), "long idle: done");
    }

    proptest! {
        #[test]
        fn a_trim_follows_a_busy_check_within_the_window_and_never_happens_under_load(
            checks in proptest::collection::vec((0u64..120, proptest::option::of(0.0f64..1.0)), 1..50)
        ) {
            let t0 = Instant::now();
            let mut p = TrimPolicy::default();
            let mut at = t0;
            let mut last_busy: Option<Instant> = None;
            for (gap, cpu) in checks {
                at += Duration::from_secs(gap);
                let trimmed = p.on_check(cpu, at);
                let idle = cpu.is_some_and(|c| c < IDLE_CPU);
                if trimmed {
                    prop_assert!(idle);
                    prop_assert!(last_busy.is_some_and(|b| at - b <= TRIM_WINDOW));
                } else if idle {
                    prop_assert!(last_busy.is_none_or(|b| at - b > TRIM_WINDOW));
                }
                if !idle {
                    last_busy = Some(at);
                }
            }
        }
    }

    #[test]
    fn reads_cpu_time_and_trims() {
        let before = cpu_time().expect("cpu time of this process");
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_time().unwrap() >= before);
        let line = "1 (a) b) S 1 1 1 0 -1 0 0 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        let hz = clock_ticks_per_second() as f64;
        assert_eq!(cpu_time_of(line), Some(Duration::from_secs_f64(300.0 / hz)));
        // Freed memory is there to give back after a burst of allocations.
        let blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 1000]).collect();
        drop(blocks);
        trim();
    }
}
