//! Autoscaling: the controller's side of `nonstop_plan::autoscale`.
//!
//! The daemon's metrics loop measures each autoscaled process every few
//! seconds and hands the controller a [`Sample`]
//! ([`EngineHandle::autoscale_sample`]). The controller keeps the recent
//! samples and the decision state per process, asks the pure
//! [`decide`](nonstop_plan::autoscale::decide), and carries a scale-out or
//! scale-in out through the same path as `nonstop scale` (the count is the
//! runtime's from then on, so a deploy keeps it; new web instances get
//! traffic once healthy and smoke-checked; instances taken away drain
//! first), without holding an operation: decisions run beside deploys.
//!
//! - A decision that changes the count is recorded as an `autoscale` event
//!   with its reason (metric, value, target); the last decision of each
//!   process shows in `status`.
//! - During a deployment a scale-out goes ahead (the new release's
//!   instances are counted too); a scale-in waits until it ends. While
//!   another operation runs (a restart, a scale by hand), or the app is
//!   stopped, nothing changes and the state is kept as it was.
//! - `nonstop scale` of an autoscaled process inside `[min, max]` holds
//!   until the next decision moves it; outside, it is refused naming the
//!   bounds ([`check_manual`](nonstop_plan::autoscale::check_manual)).

use super::*;
use nonstop_plan::autoscale::{decide, Kind, Sample, State, SAMPLE_WINDOW};
use std::collections::VecDeque;

/// What the controller keeps per autoscaled process.
#[derive(Debug)]
pub(crate) struct Tracked {
    state: State,
    samples: VecDeque<Sample>,
    /// The last decision as one line (with why it waits, if it does),
    /// and when.
    last: Option<(String, SystemTime)>,
}

/// The autoscaler's memory: a monotonic origin for its clock, and each
/// autoscaled process's state.
#[derive(Debug)]
pub(crate) struct Autoscaler {
    origin: Instant,
    processes: BTreeMap<ProcessName, Tracked>,
}

impl Autoscaler {
    pub(crate) fn new(origin: Instant) -> Autoscaler {
        Autoscaler { origin, processes: BTreeMap::new() }
    }

    fn now(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    fn tracked(&mut self, process: &ProcessName, now: Duration) -> &mut Tracked {
        self.processes.entry(process.clone()).or_insert_with(|| Tracked {
            state: State::new(now),
            samples: VecDeque::new(),
            last: None,
        })
    }

    /// `status`'s view of `process` under `policy`.
    pub(crate) fn status(&self, process: &ProcessName, policy: &nonstop_core::autoscale::Autoscale) -> AutoscaleStatus {
        let last = self.processes.get(process).and_then(|t| t.last.as_ref());
        AutoscaleStatus {
            min: policy.min,
            max: policy.max,
            last_decision: last.map(|(line, _)| line.clone()),
            decided_at_ms: last
                .map(|(_, at)| at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64),
        }
    }
}

/// The measurement of a process the daemon gives the controller. Times are
/// the controller's: the sample is taken as measured now.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct AutoscaleSample {
    pub cpu_percent: Option<f64>,
    pub requests_per_second: Option<f64>,
    pub p95_ms: Option<f64>,
    pub queue_depth: Option<f64>,
    /// The instances CPU and p95 were measured over (those in rotation);
    /// `None`: the current count.
    #[serde(default)]
    pub measured_instances: Option<u32>,
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// A measurement of `process`: decide, and carry out a change. The
    /// decision is returned as one line (`None` when the process is not
    /// autoscaled).
    pub(crate) fn on_autoscale_sample(
        &mut self,
        process: &ProcessName,
        sample: AutoscaleSample,
    ) -> Result<Option<String>, EngineError> {
        let rt = self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let Some(spec) = rt.record.spec.process(process) else {
            let known = rt.record.spec.processes.iter().map(|p| p.name.to_string()).collect::<Vec<_>>().join(", ");
            return Err(EngineError::UnknownProcess { name: process.to_string(), known });
        };
        let Some(policy) = spec.autoscale.clone() else { return Ok(None) };
        let current = spec.count;
        let now = self.autoscaler.now(self.clock.now());
        let tracked = self.autoscaler.tracked(process, now);
        tracked.samples.push_back(Sample {
            at: now,
            cpu_percent: sample.cpu_percent,
            requests_per_second: sample.requests_per_second,
            p95_ms: sample.p95_ms,
            queue_depth: sample.queue_depth,
            measured_instances: sample.measured_instances,
        });
        while tracked.samples.front().is_some_and(|s| now.saturating_sub(s.at) > SAMPLE_WINDOW * 2) {
            tracked.samples.pop_front();
        }
        let samples: Vec<Sample> = tracked.samples.iter().copied().collect();
        let (decision, state) = decide(&policy, &samples, current, tracked.state.clone(), now);
        let changes = matches!(decision.kind, Kind::ScaleOut | Kind::ScaleIn);
        // What may not change the count now keeps the state it had.
        let held = if !changes {
            None
        } else if self.refuse_if_stopped(Gated::Scale).is_some() {
            Some("the app is stopped")
        } else if self.deployment.is_some() && decision.kind == Kind::ScaleIn {
            Some("scale-in waits for the deployment to end")
        } else if self.deployment.is_none() && self.op.is_some() {
            Some("another operation is running")
        } else {
            None
        };
        let wall = self.clock.wall();
        let line = match held {
            Some(why) => format!("{decision}; not now: {why}"),
            None => decision.to_string(),
        };
        let tracked = self.autoscaler.tracked(process, now);
        tracked.last = Some((line.clone(), wall));
        if held.is_some() {
            tracing::debug!(%process, "autoscale: {line}");
            return Ok(Some(line));
        }
        tracked.state = state;
        if !changes {
            return Ok(Some(line));
        }
        let counts = BTreeMap::from([(process.clone(), decision.desired)]);
        let (summary, _) = self.apply_counts(&counts)?;
        let app = self.scope.app.clone();
        self.event(&app, EventKind::Autoscale, None, &format!("{process}: {decision}"));
        tracing::info!(%process, %summary, "autoscale: {decision}");
        Ok(Some(line))
    }

    /// `nonstop scale` of autoscaled processes: refused outside their
    /// bounds (naming them); inside, the count holds until the next
    /// decision.
    pub(crate) fn check_manual_scale(&mut self, counts: &BTreeMap<ProcessName, u32>) -> Result<(), EngineError> {
        let Some(rt) = self.app.as_ref() else { return Ok(()) };
        for (name, count) in counts {
            if let Some(policy) = rt.record.spec.process(name).and_then(|p| p.autoscale.as_ref()) {
                nonstop_plan::autoscale::check_manual(policy, *count).map_err(|e| {
                    EngineError::OutsideAutoscaleBounds { process: name.to_string(), reason: e.to_string() }
                })?;
            }
        }
        let now = self.autoscaler.now(self.clock.now());
        let autoscaled: Vec<ProcessName> = counts
            .keys()
            .filter(|name| rt.record.spec.process(name).is_some_and(|p| p.autoscale.is_some()))
            .cloned()
            .collect();
        for name in autoscaled {
            let tracked = self.autoscaler.tracked(&name, now);
            tracked.state = tracked.state.clone().scaled_by_hand(now);
        }
        Ok(())
    }
}
