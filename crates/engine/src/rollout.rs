//! Rolling replacement of one process type at a time: new instances
//! started and old ones stopped as `nonstop_plan::rollout` says (capacity
//! kept, a singleton never doubled), held at its canary during the
//! live-traffic gate; what an operation or a deployment rolls next
//! (`kick`), and what becomes of a rollout's end.

use super::*;

pub(crate) enum RolloutResult {
    Done(ProcessName),
    Failed(ProcessName, String),
    /// A canary rollout's instance serves (the rollout waits, holding it).
    CanaryReady(ProcessName, InstanceId),
}

/// A rollout held at its canary: one new instance beside every old one,
/// given `percent` of the traffic, until the deployment's ramp ends.
#[derive(Debug, Clone)]
pub(crate) struct CanaryHold {
    pub(crate) percent: u8,
    /// Reported ready (once).
    pub(crate) ready: Option<InstanceId>,
}

pub(crate) struct RolloutState {
    pub(crate) process: ProcessName,
    /// The release new instances run.
    pub(crate) release: ReleaseId,
    pub(crate) params: RolloutParams,
    pub(crate) old: BTreeSet<InstanceId>,
    pub(crate) new: BTreeMap<u32, InstanceId>,
    /// Why a new instance failed, if one did.
    pub(crate) failure: Option<String>,
    /// `nonstop cancel`: fail at the next step with this reason.
    pub(crate) cancelled: Option<String>,
    /// Held at its canary (a deploy's live-traffic gate).
    pub(crate) canary: Option<CanaryHold>,
}

/// Roll web first, then workers, then singletons, unless `[release] order`
/// says otherwise (named processes first, in that order).
pub(crate) fn order_processes(spec: &AppSpec, names: Vec<ProcessName>) -> VecDeque<ProcessName> {
    let rank = |n: &ProcessName| {
        if let Some(i) = spec.release.order.iter().position(|o| o == n) {
            return (0, i);
        }
        let kind = spec.process(n).map(|p| p.kind);
        let k = match kind {
            Some(ProcessKind::Web) => 0,
            Some(ProcessKind::Worker) => 1,
            _ => 2,
        };
        (1, k)
    };
    let mut names = names;
    names.sort_by_key(|n| rank(n));
    names.dedup();
    names.into()
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Begin rolling `process` to the release of `target` (its current
    /// release for a restart). `replace_all`: every existing instance is old
    /// (restart); otherwise only those of another release are.
    pub(crate) fn start_rollout(&mut self, process: &ProcessName, target: Option<ReleaseCtx>, replace_all: bool) {
        let Some(rt) = self.app.as_mut() else { return };
        if let Some(t) = target {
            rt.targets.insert(process.clone(), t);
        }
        let ctx = rt.ctx_for(process);
        let spec = rt.process_spec(process);
        let (kind, count, rollout) = match &spec {
            Some(s) => (s.kind, if rt.record.running { s.count } else { 0 }, s.rollout.clone()),
            None => (ProcessKind::Worker, 0, nonstop_core::process::Rollout::default()),
        };
        let old: BTreeSet<InstanceId> = rt
            .instances
            .values()
            .filter(|i| &i.id.process == process && (replace_all || i.release != ctx.id))
            .map(|i| i.id.clone())
            .collect();
        let params = RolloutParams::resolve(kind, count, &rollout);
        // Instances that already run the target release (started by the
        // reconciler, or by an interrupted rollout) count as new ones, so a
        // singleton is never started next to one of them.
        let mut new: BTreeMap<u32, InstanceId> = BTreeMap::new();
        let mut old = old;
        if !replace_all {
            for i in rt
                .instances
                .values()
                .filter(|i| &i.id.process == process && i.release == ctx.id && i.phase != InstPhase::Stopping)
            {
                if i.id.slot <= params.desired && new.get(&i.id.slot).is_none_or(|n| n.generation < i.id.generation) {
                    if let Some(prev) = new.insert(i.id.slot, i.id.clone()) {
                        old.insert(prev);
                    }
                } else {
                    old.insert(i.id.clone());
                }
            }
        }
        let n_old = old.len();
        rt.rollout = Some(RolloutState {
            process: process.clone(),
            release: ctx.id,
            params,
            old,
            new,
            failure: None,
            cancelled: None,
            canary: None,
        });
        self.progress(format!("rolling {process} to {}: {n_old} old instance(s), {count} wanted", ctx.id));
    }

    /// Carry the active rollout one step further. Returns its result once it
    /// has finished or failed.
    pub(crate) fn advance_rollout(&mut self, now: Instant) -> Option<RolloutResult> {
        let rt = self.app.as_mut()?;
        let ro = rt.rollout.as_ref()?;
        let health_timeout =
            rt.process_spec(&ro.process).map(|s| s.rollout.health_timeout).unwrap_or(Duration::from_secs(60));
        // Describe every slot.
        let mut slot_numbers: BTreeSet<u32> = (1..=ro.params.desired).collect();
        slot_numbers.extend(ro.old.iter().filter(|i| rt.instances.contains_key(i)).map(|i| i.slot));
        slot_numbers.extend(ro.new.keys().copied());
        let mut failure = ro.failure.clone();
        let cancelled = ro.cancelled.clone();
        let slots: Vec<RolloutSlot> = slot_numbers
            .iter()
            .map(|&slot| {
                let old = ro.old.iter().filter(|i| i.slot == slot).find_map(|i| rt.instances.get(i)).map(|inst| {
                    match inst.phase {
                        InstPhase::Stopping => OldPhase::Stopping,
                        InstPhase::Ready => OldPhase::Ready,
                        _ => OldPhase::NotReady,
                    }
                });
                let new = ro.new.get(&slot).map(|id| match rt.instances.get(id) {
                    None => NewPhase::Failed,
                    // Out of rotation for answering only 5xx (its health
                    // check may well pass): the release fails under traffic.
                    Some(inst) if inst.phase == InstPhase::Ready && inst.ejected.is_some() => {
                        failure.get_or_insert_with(|| {
                            format!(
                                "new instance {} was taken out of rotation: it {}",
                                id.slot_name(),
                                inst.ejected.as_deref().unwrap_or("answered only 5xx")
                            )
                        });
                        NewPhase::Failed
                    }
                    // Ready once, then failing its checks: not a release to keep.
                    Some(inst) if inst.phase == InstPhase::Ready && inst.health == Some(BackendHealth::Unhealthy) => {
                        if failure.is_none() {
                            let checks = last_checks(&*self.traffic, inst);
                            failure = Some(format!(
                                "new instance {} became unhealthy after passing its checks{}",
                                id.slot_name(),
                                checks_suffix(&checks)
                            ));
                        }
                        NewPhase::Failed
                    }
                    Some(inst) if inst.phase == InstPhase::Ready => NewPhase::Ready,
                    Some(inst) if inst.phase == InstPhase::Stopping => NewPhase::Failed,
                    // Healthy, but a page it must serve is broken: before
                    // any client saw it.
                    Some(inst) if inst.smoke_failure.is_some() => {
                        failure.get_or_insert_with(|| {
                            format!(
                                "new instance {} {}; no client request reached it",
                                id.slot_name(),
                                inst.smoke_failure.as_deref().unwrap_or("failed a smoke check")
                            )
                        });
                        NewPhase::Failed
                    }
                    Some(inst) => {
                        if now.saturating_duration_since(inst.started) >= health_timeout {
                            if failure.is_none() {
                                let checks = last_checks(&*self.traffic, inst);
                                let logs =
                                    secrets::log_tail(&*self.logs, &self.secrets, &rt.record.app, &self.env, id, 10);
                                failure = Some(format!(
                                    "new instance {} did not become {} within {}{}{}",
                                    id.slot_name(),
                                    if inst.kind == ProcessKind::Web { "healthy" } else { "ready" },
                                    fmt_dur(health_timeout),
                                    checks_suffix(&checks),
                                    tail_suffix(&logs)
                                ));
                            }
                            NewPhase::Failed
                        } else {
                            NewPhase::Starting
                        }
                    }
                });
                RolloutSlot { slot, old, new }
            })
            .collect();
        let params = ro.params;
        let process = ro.process.clone();
        let canary = ro.canary.clone();
        let step = match (cancelled, &canary) {
            (Some(why), _) => {
                failure = Some(why);
                RolloutStep::Failed { slot: 0 }
            }
            // Held at the canary: its one new instance, no old one stopped.
            (None, Some(hold)) => match nonstop_plan::rollout::canary_step(&slots) {
                CanaryStep::Start(slot) => RolloutStep::Act(vec![RolloutAction::StartNew(slot)]),
                CanaryStep::Wait => RolloutStep::Wait,
                CanaryStep::Failed(slot) => RolloutStep::Failed { slot },
                CanaryStep::Ready(slot) => match (&hold.ready, ro.new.get(&slot).cloned()) {
                    (None, Some(id)) => {
                        if let Some(h) = rt.rollout.as_mut().and_then(|r| r.canary.as_mut()) {
                            h.ready = Some(id.clone());
                        }
                        return Some(RolloutResult::CanaryReady(process, id));
                    }
                    _ => RolloutStep::Wait,
                },
            },
            (None, None) => rollout_step(&slots, params),
        };
        match step {
            RolloutStep::Wait => None,
            RolloutStep::Done => {
                let release = rt.rollout.as_ref().map(|r| r.release).unwrap_or_default();
                rt.rollout = None;
                self.progress(format!("{process} rolled to {release}"));
                Some(RolloutResult::Done(process))
            }
            RolloutStep::Failed { .. } => {
                let reason = failure.unwrap_or_else(|| "a new instance failed".to_string());
                // Remove the new instances that are not serving; ready ones
                // stay until whatever comes next replaces them, so capacity
                // never drops.
                let ro = rt.rollout.take();
                let not_ready: Vec<InstanceId> = ro
                    .map(|r| {
                        r.new
                            .into_values()
                            .filter(|id| rt.instances.get(id).is_some_and(|i| i.phase != InstPhase::Ready))
                            .collect()
                    })
                    .unwrap_or_default();
                for id in not_ready {
                    self.begin_stop(&id, false);
                }
                let app = self.app.as_ref().map(|rt| rt.record.app.clone());
                if let Some(app) = app {
                    self.event(&app, EventKind::RolloutFailed, None, &reason);
                }
                Some(RolloutResult::Failed(process, reason))
            }
            RolloutStep::Act(actions) => {
                for a in actions {
                    match a {
                        RolloutAction::StartNew(slot) => {
                            if let Some(id) = self.start_instance(&process, slot) {
                                // A canary gets its share from its first
                                // request on (never an even one).
                                if let Some(hold) = &canary {
                                    self.split_to(std::slice::from_ref(&id), hold.percent);
                                }
                                if let Some(ro) = self.app.as_mut().and_then(|rt| rt.rollout.as_mut()) {
                                    ro.new.insert(slot, id);
                                }
                            }
                        }
                        RolloutAction::StopOld(slot) => {
                            let old: Vec<InstanceId> = self
                                .app
                                .as_ref()
                                .and_then(|rt| rt.rollout.as_ref())
                                .map(|ro| ro.old.iter().filter(|i| i.slot == slot).cloned().collect())
                                .unwrap_or_default();
                            for id in old {
                                self.begin_stop(&id, false);
                            }
                        }
                    }
                }
                None
            }
        }
    }

    /// Start the next rollout an operation wants, if none runs.
    pub(crate) fn kick(&mut self) -> bool {
        if self.app.as_ref().is_some_and(|rt| rt.rollout.is_some()) {
            return false;
        }
        if self.deployment.is_some() {
            return self.deploy_kick();
        }
        if self.app.is_none() {
            return false;
        }
        let Some(op) = self.op.as_mut() else { return false };
        let Some(process) = op.queue.pop_front() else { return false };
        self.start_rollout(&process, None, true);
        true
    }

    pub(crate) fn on_rollout_result(&mut self, result: RolloutResult) {
        if self.deployment.is_some() {
            self.deploy_on_rollout(result);
            return;
        }
        if let RolloutResult::Failed(process, reason) = result {
            if let Some(op) = self.op.as_mut() {
                op.queue.clear();
            }
            self.fail_op(EngineError::RolloutFailed { process: process.to_string(), reason });
        }
    }
}
