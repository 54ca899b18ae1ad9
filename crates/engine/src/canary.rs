//! The engine's part of a deploy's live-traffic gate: the canary.
//!
//! When `advance` asks to weigh the web process (`Action::Weigh`), the
//! first time the engine starts a rollout held at its canary (one new
//! instance beside every old one, given its share of the traffic from its
//! first request); once it serves, and at every later step, the engine
//! sets the share and measures a window: every backend's counters are read
//! at its start and then every half second, the new release's (the
//! canary's) and the old release's (everyone else's) are summed, and the
//! window ends when `window_complete` says so. Its figures go back to
//! `advance` as `Event::CanaryWindow`, which judges them. After the last
//! step, `Roll { to: New }` lets the held rollout go on; anything else
//! (a rollback) abandons it.

use super::*;
use nonstop_core::process::Canary;
use nonstop_core::traffic::{BackendFigures, LatencyHistogram, Split};
use nonstop_plan::deployment::{
    judge, window_complete, CanaryVerdict, Event, Margins, RampStep, RollTo, Window, SLOW_WINDOWS_TO_FAIL,
};

/// How often a window's counters are read.
const POLL: Duration = Duration::from_millis(500);

/// The ramp of `canary` as the state machine takes it.
pub(crate) fn ramp_of(canary: &Canary) -> Vec<RampStep> {
    let hold_ms = canary.hold.as_millis() as u64;
    canary.steps.iter().map(|&percent| RampStep { percent, hold_ms }).collect()
}

/// The margins of `canary` as `judge` takes them.
pub(crate) fn margins_of(canary: &Canary) -> Margins {
    Margins {
        error_rate: f64::from(canary.max_5xx_increase_bp) / 10_000.0,
        p95_ratio: f64::from(canary.max_p95_ratio_pct) / 100.0,
        p95_slack_ms: canary.p95_slack.as_secs_f64() * 1000.0,
        min_requests: u64::from(canary.min_requests),
    }
}

/// The figures of one release over a window: the backends `mine` picks,
/// each counted from its reading at the window's start (a backend added
/// since counts from zero).
pub(crate) fn window_of(
    start: &[BackendFigures],
    now: &[BackendFigures],
    mine: impl Fn(&InstanceId) -> bool,
) -> Window {
    let mut requests = 0;
    let mut errors_5xx = 0;
    let mut latency = LatencyHistogram::default();
    for f in now.iter().filter(|f| mine(&f.instance)) {
        let d = match start.iter().find(|s| s.instance == f.instance) {
            Some(s) => f.since(s),
            None => f.clone(),
        };
        requests += d.requests;
        errors_5xx += d.errors_5xx;
        latency.merge(&d.latency);
    }
    let p95_ms = if latency.total() == 0 { 0.0 } else { latency.quantile_ms(0.95) };
    Window { requests, errors_5xx, p95_ms }
}

fn describe(w: &Window) -> String {
    format!("{:.1}% 5xx of {} request(s), p95 {:.0} ms", w.error_rate() * 100.0, w.requests, w.p95_ms)
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Give `instances` `percent` of the app's web traffic.
    pub(crate) fn split_to(&self, instances: &[InstanceId], percent: u8) {
        if let Some(rt) = self.app.as_ref() {
            self.traffic.set_split(&rt.route, Some(&Split { instances: instances.to_vec(), percent }));
        }
    }

    fn clear_split(&self) {
        if let Some(rt) = self.app.as_ref() {
            self.traffic.set_split(&rt.route, None);
        }
    }

    /// `Weigh`: the first step starts the canary; a later one changes its
    /// share and measures again.
    pub(crate) fn weigh(&mut self, process: ProcessName, percent: u8, hold_ms: u64) {
        let held = self
            .app
            .as_ref()
            .and_then(|rt| rt.rollout.as_ref())
            .filter(|ro| ro.process == process)
            .and_then(|ro| ro.canary.as_ref().map(|h| h.ready.clone()));
        match held {
            // Serving: a new share, a new window.
            Some(Some(id)) => {
                if let Some(h) = self.app.as_mut().and_then(|rt| rt.rollout.as_mut()).and_then(|r| r.canary.as_mut()) {
                    h.percent = percent;
                }
                self.split_to(std::slice::from_ref(&id), percent);
                self.measure(vec![id], percent, hold_ms);
            }
            // Still starting: its readiness measures the first window.
            Some(None) => {}
            None => {
                let Some(run) = self.deployment.as_mut() else { return };
                let target = run.to.clone();
                run.active_roll = Some((process.clone(), RollTo::New));
                self.progress(format!(
                    "canary: one new {process} instance of {} beside the old ones, then {percent}% of the traffic",
                    target.id
                ));
                self.start_rollout(&process, Some(target), false);
                if let Some(ro) = self.app.as_mut().and_then(|rt| rt.rollout.as_mut()) {
                    ro.canary = Some(CanaryHold { percent, ready: None });
                }
            }
        }
    }

    /// The canary serves: measure the current step's window.
    pub(crate) fn canary_ready(&mut self, id: InstanceId) {
        let Some(run) = self.deployment.as_ref() else { return };
        let nonstop_plan::deployment::Phase::Canary { step } = run.machine.phase else { return };
        let Some(ramp) = run.machine.shape.ramp.get(step).copied() else { return };
        self.measure(vec![id], ramp.percent, ramp.hold_ms);
    }

    /// Read every backend's counters now and then every [`POLL`] until the
    /// window is complete; its figures come back as
    /// `Internal::CanaryWindow`.
    fn measure(&mut self, canary: Vec<InstanceId>, percent: u8, hold_ms: u64) {
        let Some(run) = self.deployment.as_ref() else { return };
        let nonstop_plan::deployment::Phase::Canary { step } = run.machine.phase else { return };
        let Some(rt) = self.app.as_ref() else { return };
        let (traffic, route, clock) = (self.traffic.clone(), rt.route.clone(), self.clock.clone());
        let (margins, cancel, tx, deployment) =
            (run.machine.margins, run.cancel.clone(), self.events_tx.clone(), run.record.id);
        self.progress(format!(
            "canary: {} serves {percent}% of the requests; comparing it with the old release for up to {}",
            canary.iter().map(|i| i.slot_name()).collect::<Vec<_>>().join(", "),
            fmt_dur(Duration::from_millis(hold_ms))
        ));
        self.tasks.spawn(async move {
            let started = clock.now();
            let start = traffic.figures(&route).await;
            let mine = |i: &InstanceId| canary.contains(i);
            let warm_up = margins.min_requests;
            let mut warm: Option<Vec<BackendFigures>> = None;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    () = cancel.cancelled() => return,
                }
                let now = traffic.figures(&route).await;
                let mut new = window_of(&start, &now, mine);
                let old = window_of(&start, &now, |i| !mine(i));
                // A cold instance (imports, connections, caches) answers
                // its first requests slowly: in the first window its p95
                // counts only once it has answered `warm_up` of them.
                if step == 0 {
                    if warm.is_none() && new.requests >= warm_up {
                        warm = Some(now.clone());
                    }
                    // No answer since warm (or not warm yet): no p95 (0).
                    new.p95_ms = warm.as_ref().map_or(0.0, |w| window_of(w, &now, mine).p95_ms);
                }
                let elapsed = clock.now().saturating_duration_since(started).as_millis() as u64;
                if window_complete(elapsed, hold_ms, &old, &new, &margins) {
                    let _ = tx.send(Internal::CanaryWindow { deployment, step, old, new });
                    return;
                }
            }
        });
    }

    /// A window ended: tell the machine (unless it moved on meanwhile).
    pub(crate) fn deploy_on_canary_window(&mut self, deployment: i64, step: usize, old: Window, new: Window) {
        let Some(run) = self.deployment.as_ref().filter(|r| r.record.id == deployment) else { return };
        if run.machine.phase != (nonstop_plan::deployment::Phase::Canary { step }) {
            return;
        }
        self.progress(format!(
            "canary step {}: new release {}; old release {}",
            step + 1,
            describe(&new),
            describe(&old)
        ));
        let suspect = matches!(judge(&old, &new, &run.machine.margins), CanaryVerdict::Slow { .. })
            && run.machine.slow_windows + 1 < SLOW_WINDOWS_TO_FAIL;
        if suspect {
            self.progress(format!(
                "canary step {}: slower than the margins allow; measuring once more before judging",
                step + 1
            ));
        }
        self.feed(Event::CanaryWindow { step, old, new });
    }

    /// `Roll` while a rollout is held at its canary: the ramp is over.
    /// Rolling the same process to the new release lets the held rollout
    /// go on (the canary is its first new instance); anything else (a
    /// rollback) abandons it, and the next rollout replaces the canary like
    /// any instance of the wrong release. Returns whether the roll was
    /// taken over here.
    pub(crate) fn release_canary(&mut self, process: &ProcessName, to: RollTo) -> bool {
        let held = self.app.as_ref().and_then(|rt| rt.rollout.as_ref()).is_some_and(|ro| ro.canary.is_some());
        if !held {
            return false;
        }
        self.clear_split();
        let Some(rt) = self.app.as_mut() else { return false };
        let continues = rt.rollout.as_ref().is_some_and(|ro| &ro.process == process) && to == RollTo::New;
        if continues {
            if let Some(ro) = rt.rollout.as_mut() {
                ro.canary = None;
            }
            if let Some(run) = self.deployment.as_mut() {
                run.active_roll = Some((process.clone(), to));
            }
            true
        } else {
            rt.rollout = None;
            if let Some(run) = self.deployment.as_mut() {
                run.active_roll = None;
            }
            false
        }
    }
}
