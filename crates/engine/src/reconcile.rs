//! Keeping what runs as wanted: the reconciler (`nonstop_plan::reconcile`:
//! missing slots started after their backoff, surplus ones stopped, for
//! every process type not under a rollout), when the loop must wake next,
//! and whether the operation in progress (`up`, `scale`, `restart`,
//! `down`, `stop`, `start`) has converged or failed (a crash loop, an
//! instance not ready in its health timeout).

use super::*;
use nonstop_plan::{reconcile, Action, Observed, ObservedInstance, Phase};

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    pub(crate) fn run_reconcile(&mut self, now: Instant) {
        let Some(rt) = self.app.as_ref() else { return };
        let desired: Vec<ProcessSpec> = rt.desired();
        let observed = Observed {
            instances: rt
                .instances
                .values()
                .map(|i| ObservedInstance {
                    id: i.id.clone(),
                    phase: match i.phase {
                        InstPhase::Stopping => Phase::Stopping,
                        InstPhase::Ready => Phase::Ready,
                        _ => Phase::Starting,
                    },
                })
                .collect(),
            backoff: rt.backoff.clone(),
            rolling: rt.rollout.iter().map(|r| r.process.clone()).collect(),
        };
        let decision = reconcile(&desired, &observed, now);
        for action in decision.actions {
            match action {
                Action::Start { process, slot } => {
                    self.start_instance(&process, slot);
                }
                Action::Stop { instance } => self.begin_stop(&instance, false),
            }
        }
    }

    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let rt = self.app.as_ref()?;
        let mut wake: Option<Instant> = None;
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(t) = self.degraded().next_wake(self.clock.now()) {
            at(t);
        }
        if let Some(t) = self.deploy_wake() {
            at(t);
        }
        for b in rt.backoff.values() {
            if let Some(t) = b.retry_at {
                if t > self.clock.now() {
                    at(t);
                }
            }
        }
        // Readiness deadlines of started instances. A launching one (the
        // driver has not answered `start` yet) waits for that answer, an
        // event, and has no deadline here: its times would pass while it
        // waits and wake the loop at once, over and over.
        let now = self.clock.now();
        for inst in rt.instances.values() {
            if inst.phase == InstPhase::Starting {
                if let Some(spec) = rt.process_spec(&inst.id.process) {
                    let far = inst.started + Duration::from_secs(86_400);
                    let mut due = |t: Instant| {
                        if t > now {
                            at(t)
                        }
                    };
                    if inst.kind != ProcessKind::Web {
                        due(inst.started.checked_add(spec.ready_after).unwrap_or(far));
                    }
                    due(inst.started.checked_add(spec.rollout.health_timeout).unwrap_or(far));
                }
            }
        }
        wake
    }

    pub(crate) fn check_op(&mut self, now: Instant) {
        let Some(op) = self.op.as_ref() else { return };
        if self.deployment.is_some() {
            return; // the deployment answers the operation itself
        }
        let Some(rt) = self.app.as_ref() else {
            self.finish_op();
            return;
        };
        if self.deployment.is_some() {
            return; // the deployment answers the operation itself
        }
        if op.down {
            if rt.instances.is_empty() {
                self.ingress.remove_route(&rt.route);
                // Its static files go with its route (an `up` gives them back).
                self.builder.serve_statics(&self.scope, Vec::new());
                self.ingress.close();
                self.finish_op();
            }
            return;
        }
        if rt.rollout.is_some() || !op.queue.is_empty() {
            return;
        }
        // Failures: a crash-looping slot, or an instance that never became ready.
        // A slot counts as crash-looping as `status` shows it: still wanted
        // and waiting to restart. Its failure count outlives a recovery (it
        // resets only on the next exit), so without this a slot that runs
        // again, or was scaled away, would fail every later operation.
        for (key, b) in &rt.backoff {
            let spec = rt.process_spec(&key.0);
            let wanted = rt.record.running && spec.as_ref().is_some_and(|p| key.1 <= p.count);
            let occupied = rt
                .instances
                .values()
                .any(|i| i.id.process == key.0 && i.id.slot == key.1 && i.phase != InstPhase::Stopping);
            if wanted && !occupied && b.crash_loop(&spec.map(|p| p.restart).unwrap_or_default()) {
                let (id, exit) = rt
                    .last_exit
                    .get(key)
                    .cloned()
                    .unwrap_or((InstanceId::new(key.0.clone(), key.1, 0), ExitStatus::Unknown));
                let logs = secrets::log_tail(&*self.logs, &self.secrets, &rt.record.app, &self.env, &id, 10);
                self.fail_op(EngineError::CrashLoop { instance: id.slot_name(), exit: exit.to_string(), logs });
                return;
            }
        }
        for inst in rt.instances.values() {
            if matches!(inst.phase, InstPhase::Starting | InstPhase::Launching) {
                if let Some(spec) = rt.process_spec(&inst.id.process) {
                    let timeout = spec.rollout.health_timeout;
                    if now.saturating_duration_since(inst.started) >= timeout {
                        let logs =
                            secrets::log_tail(&*self.logs, &self.secrets, &rt.record.app, &self.env, &inst.id, 10);
                        let what = if inst.kind == ProcessKind::Web { "healthy" } else { "ready" };
                        let err = EngineError::NotReady {
                            instance: inst.id.slot_name(),
                            what: what.to_string(),
                            timeout_s: timeout.as_secs(),
                            checks: last_checks(&*self.traffic, inst),
                            logs,
                        };
                        self.fail_op(err);
                        return;
                    }
                }
            }
        }
        let (ready, desired, converged) = convergence(rt);
        let left = rt.instances.len();
        let op = self.op.as_mut().expect("checked");
        if op.last_progress != Some((ready, desired)) {
            op.last_progress = Some((ready, desired));
            // Everything going to zero (`stop`, `scale` to 0): what is left.
            let message = if desired == 0 && left > 0 {
                format!("{left} instance(s) still stopping")
            } else {
                format!("{ready}/{desired} instance(s) ready")
            };
            let _ = op.progress.send(Progress { ready, desired, ..Progress::note(message) });
        }
        if converged {
            self.finish_op();
        }
    }
}

/// Ready/desired over all processes, and whether the app runs exactly as
/// specified (no extra, starting or stopping instances).
fn convergence(rt: &AppRuntime) -> (u32, u32, bool) {
    let mut ready = 0;
    let mut desired = 0;
    let mut converged = true;
    let specs = rt.desired();
    for p in &specs {
        let want = if p.kind == ProcessKind::Singleton { p.count.min(1) } else { p.count };
        desired += want;
        let mut slots = BTreeSet::new();
        for inst in rt.instances.values().filter(|i| i.id.process == p.name) {
            if inst.phase == InstPhase::Ready && inst.id.slot <= want && slots.insert(inst.id.slot) {
                ready += 1;
            } else {
                converged = false;
            }
        }
        if (slots.len() as u32) < want {
            converged = false;
        }
    }
    if rt.instances.values().any(|i| !specs.iter().any(|p| p.name == i.id.process)) {
        converged = false;
    }
    (ready, desired, converged)
}
