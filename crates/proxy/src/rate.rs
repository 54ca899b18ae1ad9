//! The minimum upload rate (`[proxy] min_upload_rate` over
//! `upload_rate_window`): a pure decision over (time, bytes received), with
//! the clock as a parameter.
//!
//! # Rule
//! A request body is *too slow* at time `now` when it has been awaited for
//! at least a whole window and fewer than `rate × window` bytes arrived in
//! the last window. Time is the time the proxy spent waiting for the
//! client's body ([`crate::body::ClientBody`] counts only that): an
//! instance slow to read a streamed upload does not make its client slow.
//! A body that ends within its first window is never judged, whatever its
//! size; a 1 byte/s drip is ended one window after it started.
//!
//! # How, in bounded memory
//! The bytes of the last window are measured from *marks* (time, bytes
//! received by then), one kept at most every `window / SLOTS`. The base of
//! the measure is the newest mark at least one window old, so the interval
//! measured is the window plus less than one step:
//! - never unfair: a body judged too slow did receive fewer than
//!   `rate × window` bytes in the exact last window (the measured interval
//!   contains it);
//! - prompt: with an observation at every arrival and at [`RateWindow::next_check`]
//!   while waiting, a body is judged too slow at any observation `t` where
//!   fewer than `rate × window` bytes arrived in `(t - window - step, t]`.
//!
//! Both are property-tested below.

use std::time::Duration;

/// Marks per window.
const SLOTS: u32 = 8;
/// At most one base mark and the marks of one window (see `observe`).
const CAP: usize = SLOTS as usize + 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// Time (awaited) of the observation.
    at: Duration,
    /// Bytes received by then.
    bytes: u64,
}

/// The state of one request body's rate check.
#[derive(Debug, Clone)]
pub(crate) struct RateWindow {
    /// Bytes that must arrive per window.
    need: u64,
    window: Duration,
    /// Least time between two marks.
    step: Duration,
    marks: [Mark; CAP],
    len: usize,
}

impl RateWindow {
    /// `rate` bytes per second over `window`. `rate` must be above 0 and
    /// `window` at least 1 ms (the configuration guarantees both).
    pub fn new(rate: u64, window: Duration) -> Self {
        let window = window.max(Duration::from_millis(1));
        let need = ((u128::from(rate.max(1)) * window.as_nanos()) / 1_000_000_000).clamp(1, u128::from(u64::MAX));
        let first = Mark { at: Duration::ZERO, bytes: 0 };
        Self { need: need as u64, window, step: window / SLOTS, marks: [first; CAP], len: 1 }
    }

    /// Bytes that must arrive per window.
    pub fn need(&self) -> u64 {
        self.need
    }

    /// `received` bytes had arrived by time `now` (both never decreasing
    /// from one call to the next). Whether the body is too slow at `now`.
    pub fn observe(&mut self, now: Duration, received: u64) -> bool {
        // Keep one mark at least a window old: the newest such.
        while self.len >= 2 && self.marks[1].at + self.window <= now {
            self.marks.copy_within(1..self.len, 0);
            self.len -= 1;
        }
        let base = self.marks[0];
        let too_slow =
            now >= self.window && base.at + self.window <= now && received - base.bytes.min(received) < self.need;
        let last = self.marks[self.len - 1];
        // The marks younger than a window are at least a step apart: at
        // most SLOTS + 1 of them, so `CAP` is never reached; were it, a
        // mark left out only makes the measure longer (more lenient).
        if now >= last.at + self.step && self.len < CAP {
            self.marks[self.len] = Mark { at: now, bytes: received };
            self.len += 1;
        }
        too_slow
    }

    /// When to observe again if nothing more arrives (`received` bytes so
    /// far): the time from which the body is too slow with the marks as
    /// they are, or sooner, when bytes not recorded in a mark yet can be
    /// (so that they become a base one window later). May be in the past:
    /// then observing now says "too slow".
    pub fn next_check(&self, received: u64) -> Duration {
        let mut check = None;
        for mark in &self.marks[..self.len] {
            if received - mark.bytes.min(received) < self.need {
                check = Some((mark.at + self.window).max(self.window));
                break;
            }
        }
        let last = self.marks[self.len - 1];
        let record = (received > last.bytes).then_some(last.at + self.step);
        match (check, record) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            // Every mark is `need` bytes or more behind `received`, so
            // `received > last.bytes`: `record` is set. Defensive: a
            // window on.
            (None, None) => last.at + self.window,
        }
    }
}

/// At most `per_second` log lines per second for one kind of event, with
/// the number left out reported on the next line that is logged.
pub(crate) struct LogLimit {
    per_second: u32,
    state: std::sync::Mutex<(u64, u32, u64)>,
}

impl LogLimit {
    pub const fn new(per_second: u32) -> Self {
        Self { per_second, state: std::sync::Mutex::new((u64::MAX, 0, 0)) }
    }

    /// `Some(left_out)`: log this one, saying that `left_out` lines were
    /// left out before it; `None`: leave it out. `second` is the current
    /// second on any monotonic clock.
    pub fn allow(&self, second: u64) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (current, count, left_out) = &mut *state;
        if *current != second {
            *current = second;
            *count = 0;
        }
        if *count >= self.per_second {
            *left_out += 1;
            return None;
        }
        *count += 1;
        Some(std::mem::take(left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Bytes that arrived in `(from, to]`.
    fn arrived(arrivals: &[(Duration, u64)], from: Duration, to: Duration) -> u64 {
        arrivals.iter().filter(|(t, _)| *t > from && *t <= to).map(|(_, n)| n).sum()
    }

    /// Arrivals: (gap since the previous one in ms, bytes).
    fn schedule() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0u64..6_000, 0u64..3_000), 0..60)
    }

    /// (time, bytes received, too slow).
    type Observed = (Duration, u64, bool);

    /// Runs the check as `ClientBody` does: an observation at every
    /// arrival, and at `next_check` while waiting for the next one. Every
    /// observation is (time, received, verdict); stops at the first "too
    /// slow" or `end`.
    fn simulate(
        rate: u64,
        window: Duration,
        gaps: &[(u64, u64)],
        end: Duration,
    ) -> (Vec<Observed>, Vec<(Duration, u64)>) {
        let mut w = RateWindow::new(rate, window);
        let mut arrivals = Vec::new();
        let mut t = Duration::ZERO;
        for &(gap, n) in gaps {
            t += ms(gap);
            arrivals.push((t, n));
        }
        let mut seen = Vec::new();
        let mut received = 0;
        let mut now = Duration::ZERO;
        let mut next = 0;
        loop {
            let arrival = arrivals.get(next).map(|a| a.0).unwrap_or(Duration::MAX);
            let check = w.next_check(received).max(now);
            let at = arrival.min(check).min(end);
            now = at;
            if arrival == at {
                received += arrivals[next].1;
                next += 1;
            }
            let verdict = w.observe(now, received);
            seen.push((now, received, verdict));
            if verdict || now >= end {
                return (seen, arrivals);
            }
        }
    }

    proptest! {
        /// Never unfair: "too slow" only when the exact last window had
        /// fewer bytes than needed.
        #[test]
        fn a_body_judged_too_slow_was_slower_than_the_rate(
            rate in 1u64..4_000,
            window_ms in 1_000u64..20_000,
            gaps in schedule(),
        ) {
            let window = ms(window_ms);
            let (seen, arrivals) = simulate(rate, window, &gaps, Duration::from_secs(200));
            let need = RateWindow::new(rate, window).need();
            for (now, _, verdict) in seen {
                if verdict {
                    prop_assert!(now >= window);
                    prop_assert!(arrived(&arrivals, now - window, now) < need, "judged at {now:?}");
                }
            }
        }

        /// Prompt: at every observation where fewer bytes than needed came
        /// in the window plus one step, the body is judged too slow.
        #[test]
        fn a_body_slower_than_the_rate_is_judged_so(
            rate in 1u64..4_000,
            window_ms in 1_000u64..20_000,
            gaps in schedule(),
        ) {
            let window = ms(window_ms);
            let step = window / SLOTS;
            let (seen, arrivals) = simulate(rate, window, &gaps, Duration::from_secs(200));
            let need = RateWindow::new(rate, window).need();
            for (now, received, verdict) in seen {
                if now >= window {
                    // Bytes in (now - window - step, now], or all of them
                    // (those of time 0 too) in the first window and step.
                    let recent = if now >= window + step {
                        arrived(&arrivals, now - window - step, now)
                    } else {
                        received
                    };
                    if recent < need {
                        prop_assert!(verdict, "not judged at {now:?}");
                    }
                }
            }
        }

        /// Once nothing more arrives, the body is ended within a window and
        /// a step of its last byte (and never before its first window).
        #[test]
        fn a_stalled_body_is_ended_within_a_window_and_a_step(
            rate in 1u64..4_000,
            window_ms in 1_000u64..20_000,
            gaps in schedule(),
        ) {
            let window = ms(window_ms);
            let step = window / SLOTS;
            let (seen, arrivals) = simulate(rate, window, &gaps, Duration::from_secs(10_000));
            let &(end, _, verdict) = seen.last().unwrap();
            prop_assert!(verdict, "never ended");
            let last = arrivals.last().map_or(Duration::ZERO, |a| a.0);
            prop_assert!(end >= window);
            prop_assert!(end <= (last + window + step).max(window), "ended at {end:?}, last byte at {last:?}");
        }

        /// `next_check` agrees with `observe`: at the time it names, with
        /// nothing more received, observing says "too slow" unless a mark
        /// was due.
        #[test]
        fn next_check_is_when_the_verdict_can_change(
            rate in 1u64..4_000,
            window_ms in 1_000u64..20_000,
            gaps in schedule(),
        ) {
            let window = ms(window_ms);
            let mut w = RateWindow::new(rate, window);
            let mut now = Duration::ZERO;
            let mut received = 0;
            for (gap, n) in gaps {
                now += ms(gap);
                received += n;
                if w.observe(now, received) {
                    break;
                }
                let check = w.next_check(received);
                let mut probe = w.clone();
                // Just before it, nothing changes.
                if check > now + ms(1) {
                    prop_assert!(!probe.clone().observe(check - ms(1), received));
                }
                let due = received > w.marks[w.len - 1].bytes;
                prop_assert!(probe.observe(check.max(now), received) || due);
            }
        }
    }

    #[test]
    fn a_drip_of_one_byte_a_second_ends_after_one_window() {
        let window = Duration::from_secs(15);
        let mut w = RateWindow::new(1024, window);
        for s in 1..15 {
            assert!(!w.observe(Duration::from_secs(s), s), "second {s}");
        }
        assert!(w.observe(Duration::from_secs(15), 15));
    }

    #[test]
    fn a_steady_slow_client_above_the_rate_is_never_judged() {
        // 2 KiB/s against 1 KiB/s, in 100 ms pieces, for 10 minutes.
        let mut w = RateWindow::new(1024, Duration::from_secs(15));
        let mut received = 0;
        for tenth in 1..6_000u64 {
            received += 205;
            assert!(!w.observe(ms(tenth * 100), received));
        }
    }

    #[test]
    fn a_burst_then_a_pause_longer_than_the_window_is_too_slow() {
        // Window 10 s: a mark every 1.25 s at most.
        let mut w = RateWindow::new(1024, Duration::from_secs(10));
        assert!(!w.observe(Duration::from_secs(1), 1_000_000));
        // The burst is not in a mark yet: the next check records it.
        assert_eq!(w.next_check(1_000_000), ms(1250));
        assert!(!w.observe(ms(1250), 1_000_000));
        // Then nothing: too slow one window after that mark.
        assert_eq!(w.next_check(1_000_000), ms(11_250));
        assert!(!w.observe(ms(11_249), 1_000_000), "within the window of the burst");
        assert!(w.observe(ms(11_250), 1_000_000));
    }

    #[test]
    fn log_limit_counts_what_it_leaves_out() {
        let limit = LogLimit::new(2);
        assert_eq!(limit.allow(5), Some(0));
        assert_eq!(limit.allow(5), Some(0));
        assert_eq!(limit.allow(5), None);
        assert_eq!(limit.allow(5), None);
        assert_eq!(limit.allow(6), Some(2));
        assert_eq!(limit.allow(6), Some(0));
    }
}
