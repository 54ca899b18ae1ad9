//! The autoscaler's decision: how many instances a process with
//! `[processes.NAME.autoscale]` should run now.
//!
//! [`decide`]`(policy, samples, current, state, now) -> (Decision, State)`
//! is pure: the caller measures (the proxy's counters, each instance's
//! CPU, the queue's length), keeps the [`State`] between calls, and
//! carries the decision out. `now` is monotonic time since an origin the
//! caller keeps fixed (its start, say); nothing here reads a clock.
//!
//! How a decision is made, as Kubernetes' HPA does:
//!
//! - **Per metric, target tracking.** Each target's metric gives a
//!   recommendation of `ceil(current × value / target)` (for the totals,
//!   requests and queue depth, that is `ceil(total / target)`: the count at
//!   which each instance gets its target), where the value is the higher
//!   of two readings: the mean of the samples of the last [`SAMPLE_WINDOW`],
//!   and the newest sample alone. The newest sample lets a step in the
//!   load scale out at the first measurement that shows it (each sample is
//!   already a mean over the caller's interval, not one request), while
//!   the mean keeps a single low sample from recommending fewer. Within
//!   [`TOLERANCE`] of the target (±10%) a metric recommends the current
//!   count: small wobbles change nothing.
//! - **The highest recommendation wins**, and is the decision's reason
//!   (metric, value, target). A metric without a sample in the window
//!   recommends nothing, and forbids a scale-in: a missing measure is no
//!   evidence that fewer instances will do. No data at all holds.
//! - **Per-instance measures are loads of the instances measured.** CPU
//!   and p95 come with the number of instances they were taken over
//!   ([`Sample::measured_instances`]: those in rotation); their load is
//!   the value times that number, and the recommendation the count at
//!   which that load meets the target. Instances still booting after a
//!   scale-out are therefore not read as already sharing the load.
//! - **Only samples of the current count.** A sample measured before the
//!   count last changed (by a decision or by hand) is not read: its CPU
//!   and p95 belong to another number of instances, and read against the
//!   new count they would recommend too many (then too few: a flap).
//!   Until a sample of the new count comes, the decision holds.
//! - **Bounds.** The recommendation is clamped to `[min, max]`; a count
//!   outside the bounds (a spec that changed them) is brought back at once.
//! - **Scale-out** goes to the recommendation at once, unless a scale-out
//!   happened less than `scale_out_cooldown` ago (the new instances must
//!   first start and take their share). It never waits for anything else:
//!   not the scale-in window, not the scale-in cooldown.
//! - **Scale-in** goes down only to the *highest* recommendation of the
//!   last `scale_in_window` (stabilisation: a dip in the load does not
//!   remove instances the load needs again a minute later), and only once
//!   `scale_in_cooldown` has passed since the count last changed (by a
//!   decision, or by hand: [`State::scaled_by_hand`]). A fresh state has no
//!   history: until it has a whole window of it, the unknown past counts
//!   as recommending the current count, so a daemon that just started does
//!   not scale in on its first sample.
//! - **Step.** One decision adds or removes at most `max_step` instances
//!   (a count, or a percentage of the current count; at least 1).
//!
//! Under a steady load the count therefore moves in one direction and
//! stops: it never goes out and back in, or in and back out (the property
//! tests simulate it, with a fake clock).

use nonstop_core::autoscale::{Autoscale, Metric};
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// Samples older than this (before `now`) are not looked at.
pub const SAMPLE_WINDOW: Duration = Duration::from_secs(10);

/// A metric within this fraction of its target (either way) recommends
/// the current count (Kubernetes' `--horizontal-pod-autoscaler-tolerance`).
pub const TOLERANCE: f64 = 0.1;

/// One measurement of a process, at `at` (on the caller's clock, as
/// `now`). A value is `None` when it was not measured (no instance was
/// ready, the queue could not be read); negative, infinite or NaN values
/// count as not measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub at: Duration,
    /// Mean CPU use of the ready instances, in percent of one core.
    pub cpu_percent: Option<f64>,
    /// Requests per second to the whole process (every instance).
    pub requests_per_second: Option<f64>,
    /// The 95th percentile of response times, in milliseconds.
    pub p95_ms: Option<f64>,
    /// Items waiting in the process's queue (the whole queue).
    pub queue_depth: Option<f64>,
    /// How many instances the per-instance measures (CPU, p95) were taken
    /// over: those in rotation then. `None`: the current count. New
    /// instances still booting are not in it, so their load is not read
    /// as if they already shared it (which would scale out again).
    pub measured_instances: Option<u32>,
}

impl Sample {
    /// The raw value this sample holds for `metric` (a total for requests
    /// and the queue), if measured.
    fn raw(&self, metric: Metric) -> Option<f64> {
        let v = match metric {
            Metric::CpuPercent => self.cpu_percent,
            Metric::RequestsPerInstance => self.requests_per_second,
            Metric::P95Ms => self.p95_ms,
            Metric::QueuePerInstance => self.queue_depth,
        }?;
        (v.is_finite() && v >= 0.0).then_some(v)
    }
}

/// What the autoscaler remembers between decisions: recent
/// recommendations (for the scale-in window) and when the count last
/// changed (for the cooldowns). The caller keeps it; [`State::new`] when
/// the process starts being autoscaled (a daemon start, a new policy).
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// When this state began: before it, nothing is known.
    since: Duration,
    /// `(at, recommendation)`, oldest first, at most one window old.
    recommendations: VecDeque<(Duration, u32)>,
    last_scale_out: Option<Duration>,
    last_change: Option<Duration>,
}

impl State {
    /// No history, at `now`.
    pub fn new(now: Duration) -> State {
        State { since: now, recommendations: VecDeque::new(), last_scale_out: None, last_change: None }
    }

    /// `nonstop scale` set the count (within `[min, max]`, see
    /// [`check_manual`]) at `now`. The count holds until the next decision
    /// moves it: a scale-out may follow at once, a scale-in only after
    /// `scale_in_cooldown`.
    pub fn scaled_by_hand(mut self, now: Duration) -> State {
        self.last_change = Some(now);
        self
    }

    /// When the autoscaler last added instances.
    pub fn last_scale_out(&self) -> Option<Duration> {
        self.last_scale_out
    }

    /// When the count last changed (a decision, or by hand).
    pub fn last_change(&self) -> Option<Duration> {
        self.last_change
    }

    /// The recommendations of the scale-in window, oldest first.
    pub fn recommendations(&self) -> impl Iterator<Item = (Duration, u32)> + '_ {
        self.recommendations.iter().copied()
    }

    fn record(&mut self, now: Duration, recommendation: u32, window: Duration) {
        self.recommendations.push_back((now, recommendation));
        while self.recommendations.front().is_some_and(|(at, _)| now.saturating_sub(*at) > window) {
            self.recommendations.pop_front();
        }
    }

    /// The highest recommendation of the window ending at `now`; the
    /// unknown past before [`State::since`] counts as `current`.
    fn highest(&self, now: Duration, window: Duration, current: u32) -> u32 {
        let recorded = self.recommendations.iter().filter(|(at, _)| now.saturating_sub(*at) <= window).map(|(_, r)| *r);
        let known = now.saturating_sub(self.since) >= window;
        recorded.chain((!known).then_some(current)).max().unwrap_or(current)
    }

    fn changed(&mut self, now: Duration, out: bool) {
        self.last_change = Some(now);
        if out {
            self.last_scale_out = Some(now);
        }
    }
}

/// One metric's reading: its value (per instance, or the p95) against its
/// target, and the count it recommends (not yet clamped to the bounds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub metric: Metric,
    /// The mean over the window: per instance for CPU, requests and queue
    /// (with no instance, the total), the p95 itself for `p95_ms`.
    pub value: f64,
    pub target: u32,
    pub recommends: u32,
}

/// Why a decision is what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// The metric whose recommendation was the highest.
    Metric(Reading),
    /// The count was outside `[min, max]` (the bounds changed).
    Bounds { min: u32, max: u32 },
    /// No metric has a sample in the window.
    NoData,
}

/// Why the count stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The recommendation is the current count.
    AtTarget,
    /// More are recommended, but the count is at `max`.
    AtMax,
    /// Fewer are recommended, but the count is at `min`.
    AtMin,
    /// No metric has data yet.
    NoData,
    /// Fewer would do by the metrics that have data, but this one has
    /// none: no scale-in on a missing measure.
    MissingData(Metric),
    /// Fewer would do now, but the scale-in window recommended `highest`
    /// (not fewer than now).
    Stabilizing { highest: u32 },
    /// A change is recommended, but its cooldown lasts until `until`.
    Cooldown { until: Duration },
}

/// What a decision does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ScaleOut,
    ScaleIn,
    Hold(Hold),
}

/// A decision: the count to run (`desired`, always within `[min, max]`),
/// what it does, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The count it was made at.
    pub current: u32,
    pub desired: u32,
    pub kind: Kind,
    pub reason: Reason,
}

impl fmt::Display for Decision {
    /// One line for events and logs: "scale out 2 → 4: cpu_percent 91.5
    /// (target 70)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Decision { current, desired, kind, reason } = *self;
        match kind {
            Kind::ScaleOut => write!(f, "scale out {current} → {desired}")?,
            Kind::ScaleIn => write!(f, "scale in {current} → {desired}")?,
            Kind::Hold(hold) => {
                write!(f, "hold at {current}")?;
                match hold {
                    Hold::AtTarget => {}
                    Hold::AtMax => f.write_str(" (at max)")?,
                    Hold::AtMin => f.write_str(" (at min)")?,
                    Hold::NoData => {}
                    Hold::MissingData(metric) => write!(f, " (no {metric} data: no scale-in without it)")?,
                    Hold::Stabilizing { highest } => write!(f, " (the scale-in window recommended up to {highest})")?,
                    Hold::Cooldown { until } => write!(f, " (cooling down until {}s)", until.as_secs())?,
                }
            }
        }
        match reason {
            Reason::Metric(r) => {
                write!(f, ": {} {} (target {}", r.metric, number(r.value), r.target)?;
                if r.recommends != current {
                    write!(f, ", recommends {}", r.recommends)?;
                }
                f.write_str(")")
            }
            Reason::Bounds { min, max } => write!(f, ": outside min {min}, max {max}"),
            Reason::NoData => f.write_str(": no metrics yet"),
        }
    }
}

/// `91.456` → `91.5`, `70.0` → `70`.
fn number(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// The decision for a process running `current` instances (the count it
/// was last given), at `now`, with the `samples` measured lately (any
/// order; those outside the last [`SAMPLE_WINDOW`] are ignored), and the
/// `state` the previous decision returned. The state returned assumes the
/// decision is carried out; a caller that cannot (a deploy holds the
/// count) keeps the one it passed in.
pub fn decide(policy: &Autoscale, samples: &[Sample], current: u32, state: State, now: Duration) -> (Decision, State) {
    let mut state = state;
    let decision = |desired, kind, reason| Decision { current, desired, kind, reason };
    // A sample taken with another count than `current` would be read as
    // if `current` instances had shared its load: overshoot, then flap.
    let measured_since = state.last_change;
    let samples: Vec<Sample> =
        samples.iter().filter(|s| measured_since.is_none_or(|changed| s.at > changed)).copied().collect();
    let readings: Vec<(Metric, Option<Reading>)> =
        policy.targets.iter().map(|t| (t.metric, reading(t.metric, t.value, &samples, current, now))).collect();
    let best =
        readings.iter().filter_map(|(_, r)| *r).reduce(|best, r| if r.recommends > best.recommends { r } else { best });
    let missing = readings.iter().find(|(_, r)| r.is_none()).map(|(m, _)| *m);

    // Outside the bounds: back inside at once.
    let bounds = Reason::Bounds { min: policy.min, max: policy.max };
    if current < policy.min {
        state.changed(now, true);
        return (decision(policy.min, Kind::ScaleOut, bounds), state);
    }
    if current > policy.max {
        state.changed(now, false);
        return (decision(policy.max, Kind::ScaleIn, bounds), state);
    }
    let Some(best) = best else {
        return (decision(current, Kind::Hold(Hold::NoData), Reason::NoData), state);
    };
    let reason = Reason::Metric(best);

    // A missing measure never lets the count go down.
    let wanted = match missing {
        Some(_) => best.recommends.max(current),
        None => best.recommends,
    };
    let recommendation = wanted.clamp(policy.min, policy.max);
    state.record(now, recommendation, policy.scale_in_window);
    let step = policy.step(current);

    if recommendation > current {
        if let Some(until) = state.last_scale_out.map(|at| at.saturating_add(policy.scale_out_cooldown)) {
            if now < until {
                return (decision(current, Kind::Hold(Hold::Cooldown { until }), reason), state);
            }
        }
        let desired = recommendation.min(current.saturating_add(step));
        state.changed(now, true);
        return (decision(desired, Kind::ScaleOut, reason), state);
    }
    if recommendation < current {
        let highest = state.highest(now, policy.scale_in_window, current);
        if highest >= current {
            return (decision(current, Kind::Hold(Hold::Stabilizing { highest }), reason), state);
        }
        if let Some(until) = state.last_change.map(|at| at.saturating_add(policy.scale_in_cooldown)) {
            if now < until {
                return (decision(current, Kind::Hold(Hold::Cooldown { until }), reason), state);
            }
        }
        let desired = highest.max(current.saturating_sub(step));
        state.changed(now, false);
        return (decision(desired, Kind::ScaleIn, reason), state);
    }
    let hold = match missing {
        Some(metric) if best.recommends < current => Hold::MissingData(metric),
        _ if best.recommends > current && current == policy.max => Hold::AtMax,
        _ if best.recommends < current && current == policy.min => Hold::AtMin,
        _ => Hold::AtTarget,
    };
    (decision(current, Kind::Hold(hold), reason), state)
}

/// One metric over the window, and the count it recommends; `None`
/// without a sample of it in the window. Of the window's mean and its
/// newest sample, the reading that recommends more (the mean on a tie).
fn reading(metric: Metric, target: u32, samples: &[Sample], current: u32, now: Duration) -> Option<Reading> {
    let in_window = samples.iter().filter(|s| s.at <= now && now - s.at <= SAMPLE_WINDOW);
    // Each value with its load: a total (requests, the queue), or the
    // value per instance times the instances it was measured over.
    let total = matches!(metric, Metric::RequestsPerInstance | Metric::QueuePerInstance);
    let (mut sum, mut sum_load, mut n) = (0.0, 0.0, 0u32);
    let mut newest: Option<(Duration, f64, f64)> = None;
    for s in in_window {
        let Some(v) = s.raw(metric) else { continue };
        let load = if total { v } else { v * f64::from(s.measured_instances.unwrap_or(current)) };
        sum += v;
        sum_load += load;
        n += 1;
        if newest.is_none_or(|(at, _, _)| s.at >= at) {
            newest = Some((s.at, v, load));
        }
    }
    let (_, latest, latest_load) = newest?;
    let n = f64::from(n);
    let mean = reading_of(metric, target, sum / n, sum_load / n, current);
    let latest = reading_of(metric, target, latest, latest_load, current);
    Some(if latest.recommends > mean.recommends { latest } else { mean })
}

/// The reading of one `raw` value of `metric` (a total for requests and
/// the queue, else per instance) whose `load` (the total, or the value
/// times the instances measured) `current` instances now share.
fn reading_of(metric: Metric, target: u32, raw: f64, load: f64, current: u32) -> Reading {
    let target_f = f64::from(target.max(1));
    let total = matches!(metric, Metric::RequestsPerInstance | Metric::QueuePerInstance);
    let (value, recommends) = if current == 0 {
        // Nothing runs: the count at which each instance gets its target.
        (raw, count_of(load / target_f))
    } else {
        let value = if total { raw / f64::from(current) } else { raw };
        let ratio = load / (f64::from(current) * target_f);
        let recommends = if (ratio - 1.0).abs() <= TOLERANCE + 1e-9 { current } else { count_of(load / target_f) };
        (value, recommends)
    };
    Reading { metric, value, target, recommends }
}

/// `ceil(x)` as a count, forgiving the last bits of float error
/// (`3 × 70 / 70` is 3, not 4).
fn count_of(x: f64) -> u32 {
    let c = (x - 1e-9).ceil();
    if c <= 0.0 {
        0
    } else if c >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        c as u32
    }
}

/// `nonstop scale` of an autoscaled process to `count` outside its
/// bounds. Nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{count} is outside the autoscaling bounds (min {min}, max {max}): choose a count from {min} to {max}, or change min and max in [processes.NAME.autoscale] and deploy"
)]
pub struct OutsideBounds {
    pub count: u32,
    pub min: u32,
    pub max: u32,
}

/// Whether `nonstop scale` may set an autoscaled process to `count`:
/// within `[min, max]` it holds until the next decision
/// ([`State::scaled_by_hand`]); outside, it is refused naming the bounds.
pub fn check_manual(policy: &Autoscale, count: u32) -> Result<(), OutsideBounds> {
    if policy.allows(count) {
        Ok(())
    } else {
        Err(OutsideBounds { count, min: policy.min, max: policy.max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::autoscale::Target;
    use nonstop_core::process::Quantity;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy(min: u32, max: u32, targets: &[(Metric, u32)]) -> Autoscale {
        Autoscale {
            min,
            max,
            targets: targets.iter().map(|&(metric, value)| Target { metric, value }).collect(),
            scale_out_cooldown: S(15),
            scale_in_cooldown: S(60),
            scale_in_window: S(120),
            max_step: Quantity::Count(2),
        }
    }

    fn cpu(at: u64, v: f64) -> Sample {
        Sample { at: S(at), cpu_percent: Some(v), ..Sample::default() }
    }

    /// A state begun an hour before `now` (or at 0): a whole window of
    /// history behind it from `now` = 120 s on, no cooldown.
    fn old_state(now: u64) -> State {
        State::new(S(now).saturating_sub(S(3600)))
    }

    fn reason_metric(d: &Decision) -> Reading {
        match d.reason {
            Reason::Metric(r) => r,
            other => panic!("no metric reason: {other:?}"),
        }
    }

    #[test]
    fn target_tracking_per_metric() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        // 4 instances at 90%: ceil(4 × 90 / 50) = 8, two at a time.
        let (d, _) = decide(&p, &[cpu(100, 90.0)], 4, old_state(100), S(100));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 6));
        let r = reason_metric(&d);
        assert_eq!((r.metric, r.value, r.target, r.recommends), (Metric::CpuPercent, 90.0, 50, 8));
        assert_eq!(d.to_string(), "scale out 4 → 6: cpu_percent 90 (target 50, recommends 8)");

        // Requests are a total: 900/s for a target of 100 per instance is 9.
        let p = policy(1, 20, &[(Metric::RequestsPerInstance, 100)]);
        let s = Sample { at: S(5), requests_per_second: Some(900.0), ..Sample::default() };
        let (d, _) = decide(&Autoscale { max_step: Quantity::Count(10), ..p }, &[s], 3, old_state(5), S(5));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 9));
        assert_eq!(reason_metric(&d).value, 300.0, "the value is per instance");

        // The mean over the window; older samples do not count.
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        let samples = [cpu(0, 500.0), cpu(95, 60.0), cpu(100, 40.0)];
        let (d, _) = decide(&p, &samples, 4, old_state(100), S(100));
        assert_eq!(d.kind, Kind::Hold(Hold::AtTarget), "{d}");
        assert_eq!(reason_metric(&d).value, 50.0);
    }

    #[test]
    fn instances_still_booting_do_not_count_as_sharing_the_load() {
        // 2 → 4 for 100% CPU on 2 (target 50). The next sample is taken
        // while the 2 new ones boot: still 100% on the 2 in rotation. Read
        // against 4 it would ask for 8; over the 2 measured, it is the 4
        // that already run.
        let p = Autoscale { scale_out_cooldown: S(0), ..policy(1, 20, &[(Metric::CpuPercent, 50)]) };
        let on =
            |at, v, n| Sample { at: S(at), cpu_percent: Some(v), measured_instances: Some(n), ..Sample::default() };
        let (d, state) = decide(&p, &[on(100, 100.0, 2)], 2, old_state(100), S(100));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 4), "{d}");
        let (d, state) = decide(&p, &[on(100, 100.0, 2), on(105, 100.0, 2)], 4, state, S(105));
        assert_eq!((d.kind, d.desired), (Kind::Hold(Hold::AtTarget), 4), "{d}");
        assert_eq!(reason_metric(&d).value, 100.0, "the value shown is the one measured");
        // Once all 4 are in rotation at 50%: still 4.
        let (d, _) = decide(&p, &[on(110, 50.0, 4)], 4, state, S(110));
        assert_eq!((d.kind, d.desired), (Kind::Hold(Hold::AtTarget), 4), "{d}");
    }

    #[test]
    fn a_step_scales_out_at_the_first_sample_that_shows_it() {
        // Two quiet samples and a loaded one: the mean (40) is under the
        // target, the newest (100) is twice it. Out at once, on the newest.
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        let samples = [cpu(90, 10.0), cpu(95, 10.0), cpu(100, 100.0)];
        let (d, _) = decide(&p, &samples, 2, old_state(100), S(100));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 4), "{d}");
        assert_eq!(reason_metric(&d).value, 100.0);
        // The samples may come in any order: the newest is the latest `at`.
        let shuffled = [cpu(100, 100.0), cpu(90, 10.0), cpu(95, 10.0)];
        assert_eq!(decide(&p, &shuffled, 2, old_state(100), S(100)).0, d);

        // But one low sample after a busy window recommends no scale-in:
        // the mean (70) still wants 3.
        let samples = [cpu(90, 100.0), cpu(95, 100.0), cpu(100, 10.0)];
        let (d, _) = decide(&p, &samples, 2, old_state(100), S(100));
        assert_eq!(d.kind, Kind::ScaleOut, "{d}");
        assert_eq!(reason_metric(&d).value, 70.0);
    }

    #[test]
    fn within_the_tolerance_nothing_moves() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 70)]);
        for v in [63.0, 70.0, 77.0] {
            let (d, _) = decide(&p, &[cpu(10, v)], 5, old_state(10), S(10));
            assert_eq!((d.kind, d.desired), (Kind::Hold(Hold::AtTarget), 5), "{v}");
        }
        let (d, _) = decide(&p, &[cpu(10, 78.0)], 5, old_state(10), S(10));
        assert_eq!(d.kind, Kind::ScaleOut);
    }

    #[test]
    fn the_highest_recommendation_wins() {
        let p = policy(1, 50, &[(Metric::CpuPercent, 50), (Metric::RequestsPerInstance, 100), (Metric::P95Ms, 200)]);
        let p = Autoscale { max_step: Quantity::Percent(100), ..p };
        let s = Sample {
            at: S(1),
            cpu_percent: Some(75.0),           // → 6
            requests_per_second: Some(1000.0), // → 10
            p95_ms: Some(300.0),               // → 6
            queue_depth: None,
            measured_instances: None,
        };
        let (d, _) = decide(&p, &[s], 4, old_state(1), S(1));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 8), "{d}");
        assert_eq!(reason_metric(&d).metric, Metric::RequestsPerInstance);
        assert_eq!(reason_metric(&d).recommends, 10);
    }

    #[test]
    fn scale_in_takes_the_highest_of_the_window() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        let mut state = old_state(1000);
        // At 8 instances, a recommendation of 6 at t=1000, then 2 at
        // t=1070.
        let (d, s) = decide(&p, &[cpu(1000, 37.5)], 8, state, S(1000));
        assert_eq!((d.kind, d.desired), (Kind::ScaleIn, 6), "{d}");
        state = s;
        let (d, s) = decide(&p, &[cpu(1070, 10.0)], 6, state, S(1070));
        // 6 was recommended 70 s ago: 2 now does not go below it.
        assert_eq!(d.kind, Kind::Hold(Hold::Stabilizing { highest: 6 }), "{d}");
        assert_eq!(
            d.to_string(),
            "hold at 6 (the scale-in window recommended up to 6): cpu_percent 10 (target 50, recommends 2)"
        );
        state = s;
        // Past the window (120 s after the 6), down by the step.
        let (d, _) = decide(&p, &[cpu(1130, 10.0)], 6, state, S(1130));
        assert_eq!((d.kind, d.desired), (Kind::ScaleIn, 4), "{d}");
    }

    #[test]
    fn a_fresh_state_holds_scale_in_for_a_window() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        let (d, state) = decide(&p, &[cpu(1000, 5.0)], 8, State::new(S(1000)), S(1000));
        assert_eq!(d.kind, Kind::Hold(Hold::Stabilizing { highest: 8 }));
        let (d, _) = decide(&p, &[cpu(1120, 5.0)], 8, state, S(1120));
        assert_eq!((d.kind, d.desired), (Kind::ScaleIn, 6));
        // Scale-out does not wait.
        let (d, _) = decide(&p, &[cpu(1000, 95.0)], 8, State::new(S(1000)), S(1000));
        assert_eq!(d.kind, Kind::ScaleOut);
    }

    #[test]
    fn cooldowns() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        let (d, state) = decide(&p, &[cpu(0, 100.0)], 2, old_state(0), S(0));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 4));
        // Still hot 10 s later: the scale-out cooldown (15 s) holds.
        let (d, state) = decide(&p, &[cpu(10, 100.0)], 4, state, S(10));
        assert_eq!(d.kind, Kind::Hold(Hold::Cooldown { until: S(15) }), "{d}");
        assert_eq!(d.to_string(), "hold at 4 (cooling down until 15s): cpu_percent 100 (target 50, recommends 8)");
        let (d, state) = decide(&p, &[cpu(15, 100.0)], 4, state, S(15));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 6));
        assert_eq!(state.last_scale_out(), Some(S(15)));
        // Load gone: the window still holds 8s, then the scale-in cooldown
        // counts from the last change.
        let (d, state) = decide(&p, &[cpu(140, 1.0)], 6, state, S(140));
        assert_eq!((d.kind, d.desired), (Kind::ScaleIn, 4), "{d}");
        let (d, _) = decide(&p, &[cpu(160, 1.0)], 4, state, S(160));
        assert_eq!(d.kind, Kind::Hold(Hold::Cooldown { until: S(200) }), "{d}");
    }

    #[test]
    fn a_scale_in_cooldown_never_delays_a_scale_out() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        let (d, state) = decide(&p, &[cpu(500, 5.0)], 6, old_state(500), S(500));
        assert_eq!(d.kind, Kind::ScaleIn);
        let (d, _) = decide(&p, &[cpu(501, 5.0), cpu(502, 200.0)], 4, state, S(502));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 6), "{d}");
    }

    #[test]
    fn bounds() {
        let p = policy(2, 5, &[(Metric::CpuPercent, 50)]);
        let (d, _) = decide(&p, &[], 1, old_state(0), S(0));
        assert_eq!((d.kind, d.desired, d.reason), (Kind::ScaleOut, 2, Reason::Bounds { min: 2, max: 5 }));
        let (d, _) = decide(&p, &[cpu(0, 500.0)], 9, old_state(0), S(0));
        assert_eq!((d.kind, d.desired), (Kind::ScaleIn, 5));
        assert_eq!(d.to_string(), "scale in 9 → 5: outside min 2, max 5");
        let (d, _) = decide(&p, &[cpu(0, 500.0)], 5, old_state(0), S(0));
        assert_eq!((d.kind, d.desired), (Kind::Hold(Hold::AtMax), 5));
        let (d, _) = decide(&p, &[cpu(0, 1.0)], 2, old_state(0), S(0));
        assert_eq!((d.kind, d.desired), (Kind::Hold(Hold::AtMin), 2));
        assert_eq!(check_manual(&p, 3), Ok(()));
        let refused = check_manual(&p, 7).unwrap_err();
        assert_eq!(refused, OutsideBounds { count: 7, min: 2, max: 5 });
        assert!(refused.to_string().starts_with("7 is outside the autoscaling bounds (min 2, max 5)"), "{refused}");
    }

    #[test]
    fn missing_data_holds() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 50), (Metric::QueuePerInstance, 10)]);
        let (d, _) = decide(&p, &[], 6, old_state(0), S(0));
        assert_eq!((d.kind, d.reason), (Kind::Hold(Hold::NoData), Reason::NoData));
        assert_eq!(d.to_string(), "hold at 6: no metrics yet");
        // CPU says 1 would do, but the queue was not read.
        let (d, _) = decide(&p, &[cpu(0, 1.0)], 6, old_state(0), S(0));
        assert_eq!(d.kind, Kind::Hold(Hold::MissingData(Metric::QueuePerInstance)), "{d}");
        // It may still scale out.
        let (d, _) = decide(&p, &[cpu(0, 100.0)], 6, old_state(0), S(0));
        assert_eq!(d.kind, Kind::ScaleOut);
        // Bad values are no data.
        let bad = Sample { at: S(0), cpu_percent: Some(f64::NAN), queue_depth: Some(-1.0), ..Sample::default() };
        let (d, _) = decide(&p, &[bad], 6, old_state(0), S(0));
        assert_eq!(d.kind, Kind::Hold(Hold::NoData));
        // Samples from the future or too old are no data either.
        let (d, _) = decide(&p, &[cpu(11, 100.0), cpu(1, 1.0)], 6, old_state(11), S(10) + S(1) / 2);
        assert_eq!(d.kind, Kind::Hold(Hold::MissingData(Metric::QueuePerInstance)));
        let (d, _) = decide(&p, &[cpu(0, 1.0)], 6, old_state(11), S(11));
        assert_eq!(d.kind, Kind::Hold(Hold::NoData));
    }

    #[test]
    fn a_queue_worker_starts_from_zero_and_goes_back() {
        let p = Autoscale { max_step: Quantity::Count(10), ..policy(0, 8, &[(Metric::QueuePerInstance, 20)]) };
        let q = |at, depth| Sample { at: S(at), queue_depth: Some(depth), ..Sample::default() };
        let (d, _) = decide(&p, &[q(0, 0.0)], 0, old_state(0), S(0));
        assert_eq!(d.kind, Kind::Hold(Hold::AtTarget));
        let (d, state) = decide(&p, &[q(0, 50.0)], 0, old_state(0), S(0));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 3), "{d}");
        assert_eq!(reason_metric(&d).value, 50.0);
        let (d, _) = decide(&p, &[q(300, 0.0)], 3, state, S(300));
        assert_eq!((d.kind, d.desired), (Kind::ScaleIn, 0), "{d}");
    }

    #[test]
    fn a_manual_scale_holds_until_the_next_decision() {
        let p = policy(1, 20, &[(Metric::CpuPercent, 50)]);
        // Scaled to 10 by hand at t=1000 with little load: no scale-in
        // for scale_in_cooldown, then one.
        let state = old_state(1000).scaled_by_hand(S(1000));
        let (d, state) = decide(&p, &[cpu(1030, 5.0)], 10, state, S(1030));
        assert_eq!(d.kind, Kind::Hold(Hold::Cooldown { until: S(1060) }));
        let (d, _) = decide(&p, &[cpu(1060, 5.0)], 10, state, S(1060));
        assert_eq!((d.kind, d.desired), (Kind::ScaleIn, 8));
        // Scaled down by hand under load: the next decision scales out.
        let state = old_state(1000).scaled_by_hand(S(1000));
        let (d, _) = decide(&p, &[cpu(1001, 100.0)], 2, state, S(1001));
        assert_eq!((d.kind, d.desired), (Kind::ScaleOut, 4));
    }

    #[test]
    fn percent_steps_round_up() {
        let p = Autoscale { max_step: Quantity::Percent(50), ..policy(1, 100, &[(Metric::CpuPercent, 10)]) };
        let (d, _) = decide(&p, &[cpu(1000, 100.0)], 3, old_state(1000), S(1000));
        assert_eq!(d.desired, 5, "3 + ceil(1.5)");
        let (d, _) = decide(&p, &[cpu(1000, 1.0)], 9, old_state(1000), S(1000));
        assert_eq!(d.desired, 4, "9 - ceil(4.5)");
    }

    // ------------------------------------------------------------ properties

    /// The load a simulated process is under: how much work each metric
    /// has in all, shared by the instances.
    #[derive(Debug, Clone, Copy)]
    struct Load {
        /// CPU percent of all instances together.
        cpu: f64,
        requests: f64,
        /// The p95 is proportional to the load per instance: this much
        /// with one instance.
        p95_one: f64,
        queue: f64,
    }

    impl Load {
        /// What a sample at `at` measures with `count` instances.
        fn sample(&self, at: Duration, count: u32) -> Sample {
            let per = |total: f64| (count > 0).then(|| total / f64::from(count));
            Sample {
                at,
                cpu_percent: per(self.cpu),
                requests_per_second: Some(self.requests),
                p95_ms: per(self.p95_one),
                queue_depth: Some(self.queue),
                measured_instances: Some(count),
            }
        }
    }

    fn policies() -> impl Strategy<Value = Autoscale> {
        let targets = proptest::sample::subsequence(Metric::ALL.to_vec(), 1..=4)
            .prop_flat_map(|metrics| {
                let n = metrics.len();
                (Just(metrics), proptest::collection::vec(1u32..500, n))
            })
            .prop_map(|(metrics, values)| {
                metrics.into_iter().zip(values).map(|(metric, value)| Target { metric, value }).collect::<Vec<_>>()
            });
        let step = prop_oneof![(1u32..5).prop_map(Quantity::Count), (1u32..=200).prop_map(Quantity::Percent)];
        (0u32..4, 1u32..30, targets, 0u64..40, 0u64..200, 0u64..300, step).prop_map(
            |(min, span, targets, out_cd, in_cd, window, max_step)| {
                let queue = targets.iter().any(|t: &Target| t.metric == Metric::QueuePerInstance);
                let min = if queue { min } else { min.max(1) };
                Autoscale {
                    min,
                    max: min + span,
                    targets,
                    scale_out_cooldown: S(out_cd),
                    scale_in_cooldown: S(in_cd),
                    scale_in_window: S(window),
                    max_step,
                }
            },
        )
    }

    fn loads() -> impl Strategy<Value = Load> {
        (0.0..20_000.0f64, 0.0..50_000.0f64, 0.0..20_000.0f64, 0.0..20_000.0f64)
            .prop_map(|(cpu, requests, p95_one, queue)| Load { cpu, requests, p95_one, queue })
    }

    /// Arbitrary samples: any metric missing, any value.
    fn samples() -> impl Strategy<Value = Vec<Sample>> {
        let value = || {
            proptest::option::of(prop_oneof![
                0.0..10.0f64,
                0.0..1_000.0f64,
                0.0..100_000.0f64,
                Just(f64::NAN),
                Just(-1.0)
            ])
        };
        proptest::collection::vec(
            (0u64..30, value(), value(), value(), value(), proptest::option::of(0u32..40)).prop_map(
                |(ago, c, r, p, q, measured)| Sample {
                    at: S(ago),
                    cpu_percent: c,
                    requests_per_second: r,
                    p95_ms: p,
                    queue_depth: q,
                    measured_instances: measured,
                },
            ),
            0..6,
        )
    }

    /// Runs the autoscaler every `tick` under `load` from `start`
    /// instances, carrying out each decision; every decision, in order.
    fn simulate(policy: &Autoscale, load: Load, start: u32, tick: u64, ticks: usize) -> Vec<Decision> {
        let mut state = State::new(S(0));
        let mut count = start;
        let mut out = Vec::new();
        // What the engine passes: the samples of the last two windows,
        // each measured with the count of its time.
        let mut samples: Vec<Sample> = Vec::new();
        for i in 0..ticks {
            let now = S(i as u64 * tick);
            samples.retain(|s| now - s.at <= SAMPLE_WINDOW * 2);
            samples.push(load.sample(now, count));
            let (d, next) = decide(policy, &samples, count, state, now);
            state = next;
            count = d.desired;
            out.push(d);
        }
        out
    }

    proptest! {
        /// Whatever the samples, the history and the count it starts at,
        /// a decision is within [min, max], and moves a count within the
        /// bounds by at most max_step.
        #[test]
        fn never_outside_the_bounds_nor_past_the_step(
            policy in policies(),
            rounds in proptest::collection::vec((samples(), 1u64..90), 1..25),
            start in 0u32..40,
        ) {
            let mut state = State::new(S(0));
            let mut count = start;
            let mut now = S(0);
            for (samples, gap) in rounds {
                now += S(gap);
                let samples: Vec<Sample> =
                    samples.into_iter().map(|s| Sample { at: now.saturating_sub(s.at), ..s }).collect();
                let (d, next) = decide(&policy, &samples, count, state, now);
                prop_assert!(policy.allows(d.desired), "{d:?} outside {}..={}", policy.min, policy.max);
                if policy.allows(count) {
                    prop_assert!(d.desired.abs_diff(count) <= policy.step(count), "{d:?} past the step");
                }
                prop_assert_eq!(d.current, count);
                match d.kind {
                    Kind::ScaleOut => prop_assert!(d.desired > count),
                    Kind::ScaleIn => prop_assert!(d.desired < count),
                    Kind::Hold(_) => prop_assert_eq!(d.desired, count),
                }
                state = next;
                count = d.desired;
            }
        }

        /// A metric without data never lets the count go down (but for
        /// a count above max).
        #[test]
        fn missing_data_never_scales_in(
            policy in policies(),
            samples in samples(),
            start in 0u32..40,
            history in 0u64..1000,
        ) {
            let now = S(1000);
            let samples: Vec<Sample> =
                samples.into_iter().map(|s| Sample { at: now.saturating_sub(s.at), ..s }).collect();
            let missing = policy.targets.iter().any(|t| reading(t.metric, t.value, &samples, start, now).is_none());
            prop_assume!(missing && start <= policy.max);
            let (d, _) = decide(&policy, &samples, start, State::new(S(history)), now);
            prop_assert!(d.desired >= start, "{d:?}");
        }

        /// Under a steady load the count moves in one direction only (no
        /// flap: never out then in, nor in then out) and settles; then
        /// it holds.
        #[test]
        fn steady_load_converges_without_flapping(
            policy in policies(),
            load in loads(),
            start in 0u32..40,
            tick in 1u64..20,
        ) {
            let start = start.clamp(policy.min, policy.max);
            // Each change waits at most one cooldown and one window; it
            // moves by one at least, over at most max - min.
            let per_change = policy.scale_out_cooldown.max(policy.scale_in_cooldown + policy.scale_in_window).as_secs()
                + tick;
            let ticks = ((u64::from(policy.max - policy.min) + 2) * per_change / tick + 10) as usize;
            let decisions = simulate(&policy, load, start, tick, ticks);
            let changes: Vec<&Decision> = decisions.iter().filter(|d| d.desired != d.current).collect();
            let outs = changes.iter().filter(|d| d.kind == Kind::ScaleOut).count();
            prop_assert!(outs == 0 || outs == changes.len(), "flapped: {:?}", changes);
            // Settled: the last stretch holds.
            let tail = per_change / tick + 1;
            let settled = &decisions[decisions.len() - tail as usize..];
            prop_assert!(settled.iter().all(|d| matches!(d.kind, Kind::Hold(_))), "not settled: {:?}", settled);
        }

        /// A high sample scales out at once, whatever the scale-in window
        /// holds, subject only to the scale-out cooldown.
        #[test]
        fn scale_out_is_never_delayed_by_the_scale_in_window(
            policy in policies(),
            low in loads(),
            start in 0u32..40,
            tick in 1u64..20,
            ticks in 1usize..60,
            after in 0u64..60,
        ) {
            prop_assume!(policy.max > policy.min);
            // Some history under a light load (scale-ins, holds).
            let light = Load { cpu: low.cpu / 100.0, requests: low.requests / 100.0, p95_one: low.p95_one / 100.0, queue: low.queue / 100.0 };
            let start = start.clamp(policy.min, policy.max);
            let mut state = State::new(S(0));
            let mut count = start;
            for i in 0..ticks {
                let now = S(i as u64 * tick);
                let (d, next) = decide(&policy, &[light.sample(now, count)], count, state, now);
                state = next;
                count = d.desired;
            }
            prop_assume!(count < policy.max);
            // Then every metric far above its target.
            let now = S(ticks as u64 * tick + after);
            let hot = Sample {
                at: now,
                cpu_percent: Some(1e6),
                requests_per_second: Some(1e9),
                p95_ms: Some(1e6),
                queue_depth: Some(1e9),
                measured_instances: None,
            };
            let cooling = state.last_scale_out().is_some_and(|at| now < at + policy.scale_out_cooldown);
            let (d, _) = decide(&policy, &[hot], count, state, now);
            if cooling {
                prop_assert!(matches!(d.kind, Kind::Hold(Hold::Cooldown { .. })), "{d:?}");
            } else {
                prop_assert_eq!(d.kind, Kind::ScaleOut, "{:?}", d);
                prop_assert_eq!(d.desired, policy.max.min(count + policy.step(count)));
            }
        }

        /// Cooldowns: two scale-outs are at least scale_out_cooldown apart;
        /// a scale-in comes at least scale_in_cooldown after any change,
        /// and never below a recommendation of the scale-in window.
        #[test]
        fn cooldowns_and_the_window_are_honoured(
            policy in policies(),
            loads in proptest::collection::vec(loads(), 1..40),
            start in 0u32..40,
            tick in 1u64..30,
        ) {
            let mut state = State::new(S(0));
            let mut count = start.clamp(policy.min, policy.max);
            let (mut last_out, mut last_change): (Option<Duration>, Option<Duration>) = (None, None);
            for (i, load) in loads.iter().enumerate() {
                let now = S(i as u64 * tick);
                let (d, next) = decide(&policy, &[load.sample(now, count)], count, state, now);
                match d.kind {
                    Kind::ScaleOut => {
                        if let Some(at) = last_out {
                            prop_assert!(now >= at + policy.scale_out_cooldown, "{d:?} at {now:?}");
                        }
                        last_out = Some(now);
                        last_change = Some(now);
                    }
                    Kind::ScaleIn => {
                        if let Some(at) = last_change {
                            prop_assert!(now >= at + policy.scale_in_cooldown, "{d:?} at {now:?}");
                        }
                        for (at, r) in next.recommendations() {
                            prop_assert!(now - at > policy.scale_in_window || d.desired >= r, "{d:?} below {r} of {at:?}");
                        }
                        prop_assert!(now >= policy.scale_in_window, "{d:?} at {now:?} without a whole window");
                        last_change = Some(now);
                    }
                    Kind::Hold(_) => {}
                }
                state = next;
                count = d.desired;
            }
        }
    }
}
