//! The engine side of a deployment: it persists what
//! `nonstop_plan::deployment::advance` decides, carries out the actions,
//! and feeds back what happened as the next event.
//!
//! Nothing here decides where a deployment goes next: every transition is
//! `advance`'s. The engine's part is the I/O: building, running tasks,
//! rolling a process type (one rollout at a time, started from `kick`),
//! promoting the release, recording the end. The deployment (shape,
//! phase, deadlines) is written to the store before its actions are
//! carried out, so a restarted daemon finds exactly where it stopped and
//! feeds `Restarted`.

use super::deploy::DeployRun;
use super::*;
use nonstop_plan::deploy::DeployPhase;
use nonstop_plan::deployment::{
    advance, Action as DeployAction, Deployment, DeploymentKind, Event, Failure, FailureKind, GateMode, Limits,
    Margins, Outcome, Phase as DeploymentPhase, RollTo, Shape, WorkError,
};
use nonstop_store::{DeploymentStatus, ReleaseRecord, ReleaseStatus};

/// Why a deployment's build failed: what the deployment records after
/// "the build failed: ".
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum BuildFailed {
    #[error(transparent)]
    NotRecorded(#[from] super::tasks::NotRecorded),
    /// The release's record could not be read back (or is missing).
    #[error("the record of {release} is gone")]
    RecordGone {
        release: ReleaseId,
        #[source]
        source: Option<Arc<nonstop_store::StoreError>>,
    },
    /// The builder's own error.
    #[error(transparent)]
    Build(Arc<BuildError>),
    #[error("cannot record {release}: {source}")]
    Record {
        release: ReleaseId,
        #[source]
        source: Arc<nonstop_store::StoreError>,
    },
    /// Built, but its commands cannot run from the release's directory.
    #[error("{release} cannot run as specified:\n  {}", problems.join("\n  "))]
    CannotRun { release: ReleaseId, problems: Vec<String> },
}

pub(crate) fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The shape of a deployment to `to` (from `from`, if anything ran).
pub(crate) fn shape_for(
    kind: DeploymentKind,
    to: &ReleaseCtx,
    first: bool,
    order: Vec<ProcessName>,
    gate: GateMode,
) -> Shape {
    let release = &to.spec.release;
    // The live-traffic gate weighs the first web process type with a ramp
    // on a deploy (a rollback goes back to a release that served before:
    // no ramp to hold it up).
    let canary = to
        .spec
        .processes
        .iter()
        .find(|p| p.kind == ProcessKind::Web && p.count > 0 && !p.rollout.canary.steps.is_empty())
        .filter(|_| !matches!(kind, DeploymentKind::Rollback { .. }));
    // Safety nets only: the builder, the driver and the rollout bound
    // their own work (task_timeout, health_timeout); these catch a phase
    // that nothing ends.
    let task_ms = release.task_timeout.as_millis() as u64;
    let margin = 10 * 60 * 1000;
    let limits = Limits {
        build_ms: task_ms.saturating_mul(to.spec.build.len().max(1) as u64).saturating_add(margin),
        gate_ms: task_ms.saturating_mul(release.tasks.len().max(1) as u64).saturating_add(margin),
        tasks_ms: task_ms
            .saturating_mul(release.tasks.len().max(release.post_tasks.len()).max(1) as u64)
            .saturating_add(margin),
        rollout_ms: Limits::default().rollout_ms,
    };
    Shape {
        kind,
        first,
        order,
        gate,
        has_tasks: !release.tasks.is_empty(),
        has_post_tasks: !release.post_tasks.is_empty(),
        canary: canary.map(|p| p.name.clone()),
        ramp: canary.map(|p| super::canary::ramp_of(&p.rollout.canary)).unwrap_or_default(),
        limits,
    }
}

/// The deployment a record stores: the state machine's own value, or (a
/// record written before it existed) one rebuilt from the phase stored.
pub(crate) fn stored_deployment(value: &serde_json::Value, shape: Shape) -> Deployment {
    if let Ok(d) = serde_json::from_value::<Deployment>(value.clone()) {
        return d;
    }
    let legacy: DeployPhase = serde_json::from_value(value.clone()).unwrap_or(DeployPhase::Building);
    let mut d = Deployment::new(shape, Margins::default());
    d.phase = match legacy {
        DeployPhase::Building => DeploymentPhase::Building,
        DeployPhase::ReleaseTasks => DeploymentPhase::ReleaseTasks,
        DeployPhase::Rolling { index } => DeploymentPhase::Rolling { index },
        DeployPhase::PostTasks => DeploymentPhase::PostTasks,
        DeployPhase::RollingBack { reason, remaining } => {
            DeploymentPhase::RollingBack { failure: Failure::new(FailureKind::Rollout, reason), remaining }
        }
        DeployPhase::Succeeded => DeploymentPhase::Done { outcome: Outcome::Succeeded { note: None } },
        DeployPhase::Failed { reason } => {
            DeploymentPhase::Done { outcome: Outcome::Failed { failure: Failure::new(FailureKind::Rollout, reason) } }
        }
        DeployPhase::RolledBack { reason } => DeploymentPhase::Done {
            outcome: Outcome::RolledBack { failure: Failure::new(FailureKind::Rollout, reason) },
        },
    };
    d
}

/// The name of a stored deployment's phase, for `history`.
pub(crate) fn stored_phase_name(value: &serde_json::Value) -> String {
    if let Ok(d) = serde_json::from_value::<Deployment>(value.clone()) {
        return d.phase.name().to_string();
    }
    serde_json::from_value::<DeployPhase>(value.clone()).map(|p| p.name().to_string()).unwrap_or_default()
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Move the deployment on by `event`: store where it goes, then do
    /// what that asks. An action answered at once (maintenance switched)
    /// feeds its answer back through the same queue, after the rest of
    /// its batch: events are handled one at a time, in order.
    pub(crate) fn feed(&mut self, event: Event) {
        let Some(run) = self.deployment.as_mut() else { return };
        run.inbox.push_back(event);
        if run.feeding {
            return;
        }
        run.feeding = true;
        while let Some(event) = self.deployment.as_mut().and_then(|r| r.inbox.pop_front()) {
            let now = ms_since_epoch(self.clock.wall());
            let Some(run) = self.deployment.as_mut() else { return };
            let (machine, actions) = advance(run.machine.clone(), event.clone(), now);
            // The timeline (history, the dashboard): what this move means.
            let steps = nonstop_plan::timeline::steps(&run.machine, &event, &machine);
            run.machine = machine;
            for step in steps {
                let value = serde_json::to_value(&step).unwrap_or_default();
                if let Err(e) = self.store.add_deployment_step(run.record.id, self.clock.wall(), &value) {
                    tracing::warn!("could not record a step of deployment #{}: {e}", run.record.id);
                }
            }
            if !run.machine.is_done() {
                run.record.phase = serde_json::to_value(&run.machine).unwrap_or_default();
                if let Err(e) = self.store.update_deployment(&run.record) {
                    tracing::error!("could not record deployment #{} phase: {e}", run.record.id);
                }
            }
            for action in actions {
                self.carry_out(action);
            }
        }
        if let Some(run) = self.deployment.as_mut() {
            run.feeding = false;
        }
    }

    fn carry_out(&mut self, action: DeployAction) {
        match action {
            DeployAction::Build => self.spawn_build(),
            DeployAction::RunGate => self.spawn_gate(),
            DeployAction::SetMaintenance { on } => self.deploy_maintenance(on),
            DeployAction::RunTasks { post } => self.start_task(post, 0),
            DeployAction::AwaitLeftoverTask { .. } => {
                if let Some((task, fate, handle)) = self.deployment.as_mut().and_then(|r| r.leftover.take()) {
                    self.resume_task(task, fate, handle);
                }
            }
            DeployAction::AdoptFirst => self.adopt_first_release(),
            DeployAction::Roll { process, to } => {
                if self.release_canary(&process, to) {
                    return;
                }
                if let Some(run) = self.deployment.as_mut() {
                    run.pending_roll = Some((process, to));
                }
            }
            DeployAction::Promote => self.promote_target(),
            DeployAction::Abort => self.abort_deployment_work(),
            DeployAction::Finish { outcome } => self.finish_deploy(outcome),
            DeployAction::Weigh { process, percent, hold_ms } => self.weigh(process, percent, hold_ms),
        }
    }

    /// The maintenance fallback switches maintenance on (the built-in page)
    /// before it stops the old release, and off when the deploy ends.
    /// Maintenance someone else turned on stays as it is, and on.
    fn deploy_maintenance(&mut self, on: bool) {
        use nonstop_core::maintenance::{Maintenance, MaintenanceBy};
        let owner = self.controls.maintenance.as_ref().map(|m| m.by);
        let result = match (on, owner) {
            (true, None) => {
                self.progress("maintenance on: requests get 503 with Retry-After until the app serves again".into());
                self.switch_maintenance(Some((
                    Maintenance { page: None, allow: Vec::new(), retry_after_secs: 30 },
                    MaintenanceBy::Deploy,
                )))
            }
            (false, Some(MaintenanceBy::Deploy)) => {
                self.progress("maintenance off: requests reach the app again".into());
                self.switch_maintenance(None)
            }
            // Already on (by `nonstop maintenance on` or `stop`), or not
            // this deploy's to switch off.
            _ => Ok(()),
        };
        if let Err(e) = result {
            // Not stored: the fallback must not stop the old release
            // without the page up. Maintenance stays as it was; the
            // deployment ends (or stops switching) with it.
            tracing::error!("maintenance could not be switched {}: {e}", if on { "on" } else { "off" });
            if on {
                // Stopped before the fallback stops anything: the machine
                // backs out as soon as it hears maintenance answered.
                self.feed(Event::Cancel { why: format!("maintenance could not be switched on: {e}") });
            } else {
                self.progress(format!("maintenance could not be switched off ({e}): `nonstop maintenance off`"));
            }
        }
        self.feed(Event::MaintenanceSet { on });
    }

    /// Stop what the deployment's current step runs: the build or task
    /// (its process group), or the rollout (no further steps; it reports
    /// its end as usual).
    fn abort_deployment_work(&mut self) {
        let why = self
            .deployment
            .as_ref()
            .and_then(|r| r.machine.stopping.as_ref())
            .map_or_else(|| "stopped".to_string(), |f| f.detail.clone());
        match self.app.as_mut().and_then(|rt| rt.rollout.as_mut()) {
            Some(ro) => ro.cancelled = Some(why),
            None => {
                if let Some(run) = self.deployment.as_ref() {
                    run.cancel.cancel();
                }
            }
        }
    }

    /// Start the rollout the deployment asked for (called when no rollout
    /// runs).
    pub(crate) fn deploy_kick(&mut self) -> bool {
        let Some(run) = self.deployment.as_mut() else { return false };
        let Some((process, to)) = run.pending_roll.take() else { return false };
        run.active_roll = Some((process.clone(), to));
        // The maintenance fallback stopped the app (see
        // `roll_to_nothing`); a release runs again from here.
        if to != RollTo::Nothing {
            if let Some(rt) = self.app.as_mut().filter(|rt| !rt.record.running) {
                rt.record.running = true;
                let _ = self.store.put_app(&rt.record, self.clock.wall());
            }
        }
        match to {
            RollTo::New => {
                let target = run.to.clone();
                self.start_rollout(&process, Some(target), false);
            }
            RollTo::Previous => match run.from.clone() {
                Some(from) => self.start_rollout(&process, Some(from), false),
                None => self.roll_to_nothing(&process),
            },
            RollTo::Nothing => self.roll_to_nothing(&process),
        }
        true
    }

    /// Stop every instance of `process`: a first release's undoing, or the
    /// maintenance fallback stopping the old release. The app is recorded
    /// as not running meanwhile (a daemon restarted now starts nothing).
    fn roll_to_nothing(&mut self, process: &ProcessName) {
        if let Some(rt) = self.app.as_mut() {
            rt.record.running = false;
            let _ = self.store.put_app(&rt.record, self.clock.wall());
        }
        self.start_rollout(process, None, true);
    }

    /// A rollout the deployment started ended.
    pub(crate) fn deploy_on_rollout(&mut self, result: RolloutResult) {
        let Some(run) = self.deployment.as_mut() else { return };
        let Some((process, to)) = run.active_roll.take() else { return };
        // The answer must be the one the machine waits for: a rollout
        // aborted because the deployment moved on (a timeout) ends too,
        // and its end is not the next rollout's.
        if let RolloutResult::CanaryReady(p, id) = result {
            // The held rollout goes on running: its end is still awaited.
            run.active_roll = Some((process, to));
            if run.machine.shape.canary.as_ref() == Some(&p) {
                self.canary_ready(id);
            }
            return;
        }
        let expected = match &run.machine.phase {
            DeploymentPhase::Canary { .. } => to == RollTo::New && run.machine.shape.canary.as_ref() == Some(&process),
            DeploymentPhase::Rolling { index } => {
                to == RollTo::New && run.machine.shape.order.get(*index) == Some(&process)
            }
            DeploymentPhase::RollingBack { remaining, .. } => to != RollTo::New && remaining.first() == Some(&process),
            DeploymentPhase::Fallback { .. } => to == RollTo::Nothing,
            _ => false,
        };
        if !expected {
            return;
        }
        match result {
            RolloutResult::Done(p) => self.feed(Event::RolloutDone { process: p }),
            RolloutResult::CanaryReady(..) => {}
            RolloutResult::Failed(p, why) => {
                if matches!(run.machine.phase, DeploymentPhase::RollingBack { .. }) {
                    // The previous release does not come up for this
                    // process type either: it stays on the new release.
                    let to = run.to.clone();
                    self.progress(format!("rolling {p} back failed ({why}); it stays on {}", to.id));
                    if let Some(rt) = self.app.as_mut() {
                        rt.targets.insert(p.clone(), to);
                    }
                } else {
                    self.progress(format!("rolling back: {p}: {why}"));
                }
                self.feed(Event::RolloutFailed { process: p, why })
            }
        }
    }

    /// Feed a timeout check when the deployment's deadline has passed.
    pub(crate) fn deploy_tick(&mut self) {
        let now = ms_since_epoch(self.clock.wall());
        if self.deployment.as_ref().and_then(|r| r.machine.deadline_ms).is_some_and(|d| now >= d) {
            self.feed(Event::Tick);
        }
    }

    /// When the deployment's deadline falls, as a monotonic instant.
    pub(crate) fn deploy_wake(&self) -> Option<Instant> {
        let deadline = self.deployment.as_ref()?.machine.deadline_ms?;
        let now = ms_since_epoch(self.clock.wall());
        Some(self.clock.now() + Duration::from_millis(deadline.saturating_sub(now)))
    }

    // ------------------------------------------------------------ the steps

    fn spawn_build(&mut self) {
        // Every build command is recorded before the build starts, and
        // with its process as soon as that exists, before its command may
        // run (see `tasks.rs`).
        if let Err(e) = self.record_build_commands() {
            self.built(Err(e.into()));
            return;
        }
        let Some(run) = self.deployment.as_ref() else { return };
        let app = run.to.spec.app.clone();
        let env: Vec<(String, String)> = release_env(&run.base_env, &run.to, &self.env).into_iter().collect();
        let commands = run.to.spec.build.clone();
        let timeout = run.to.spec.release.task_timeout;
        let (release, source, cancel, id) = (run.to.id, run.to.workdir.clone(), run.cancel.clone(), run.record.id);
        let mounts = run.to.spec.statics.clone();
        let builder = self.builder.clone();
        let tx = self.events_tx.clone();
        let progress = self.op.as_ref().map(|o| o.progress.clone());
        let redactor = self.redactor();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<BuildNote>();
        self.progress(format!("building {release}: {} build command(s)", commands.len()));
        self.tasks.spawn(async move {
            let notes = tx.clone();
            let forward = async move {
                while let Some(note) = out_rx.recv().await {
                    match note {
                        BuildNote::Line(line) => {
                            if let Some(p) = &progress {
                                let _ = p.send(Progress {
                                    phase: Some("building".into()),
                                    ..Progress::note(format!("build | {}", redactor.redact(&line)))
                                });
                            }
                        }
                        BuildNote::Command { index, process, permit } => {
                            // Granted once recorded (dropped with the
                            // message if the controller is gone: then the
                            // command never runs).
                            let _ = notes.send(Internal::BuildCommand { deployment: id, index, process, permit });
                        }
                        BuildNote::CommandEnded { index, status } => {
                            let _ = notes.send(Internal::BuildCommandEnded { deployment: id, index, status });
                        }
                    }
                }
            };
            let build = builder.build(&app, release, source, commands, env, timeout, cancel, out_tx);
            let (result, ()) = tokio::join!(build, forward);
            let result = statics::index_built(builder, result, mounts).await;
            let _ = tx.send(Internal::Built { deployment: id, result });
        });
    }

    pub(crate) fn deploy_on_built(&mut self, deployment: i64, result: Result<BuildOutput, BuildError>) {
        self.finish_build_commands(deployment, result.as_ref().err());
        let Some(run) = self.deployment.as_mut().filter(|r| r.record.id == deployment) else { return };
        let app = run.to.spec.app.clone();
        let release = run.to.id;
        let build_ms = self.clock.now().saturating_duration_since(run.started).as_millis() as u64;
        let mut rec = match self.store.release(&app, release) {
            Ok(Some(r)) => r,
            Ok(None) => return self.built(Err(BuildFailed::RecordGone { release, source: None })),
            Err(e) => return self.built(Err(BuildFailed::RecordGone { release, source: Some(Arc::new(e)) })),
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                rec.status = ReleaseStatus::Failed;
                let _ = self.store.put_release(&rec);
                self.built(Err(BuildFailed::Build(Arc::new(e))));
                return;
            }
        };
        // Built (even if cancelled meanwhile: then it is kept on disk as a
        // release nothing runs, pruned in turn).
        rec.status = ReleaseStatus::Ready;
        rec.dir = out.dir.clone();
        rec.content_hash = out.content_hash.clone();
        rec.build_ms = build_ms;
        if let Err(e) = self.store.put_release(&rec) {
            self.built(Err(BuildFailed::Record { release, source: Arc::new(e) }));
            return;
        }
        run.to.workdir = out.dir.clone();
        let path_var = run.base_env.get("PATH").cloned().unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let mut problems = crate::preflight::check_commands(&run.to.spec, &out.dir, &path_var);
        problems.extend(crate::preflight::check_smoke_assets(&run.to.spec, &out.dir));
        if run.machine.stopping.is_none() {
            self.progress(format!(
                "built {release}: {} files, {} KiB in {}",
                out.files,
                out.bytes / 1024,
                fmt_dur(Duration::from_millis(build_ms))
            ));
        }
        if !problems.is_empty() {
            self.built(Err(BuildFailed::CannotRun { release, problems }));
            return;
        }
        self.publish_statics(&app);
        self.built(Ok(()));
    }

    /// The build's end, to the machine.
    fn built(&mut self, result: Result<(), BuildFailed>) {
        let result = result.map_err(|e| self.work_error(e));
        self.feed(Event::Built { result });
    }

    pub(crate) fn deploy_on_tasks(
        &mut self,
        deployment: i64,
        post: bool,
        result: Result<(), super::tasks::TasksError>,
    ) {
        if self.deployment.as_ref().is_none_or(|r| r.record.id != deployment) {
            return;
        }
        let result = result.map_err(|e| self.work_error(e));
        self.feed(Event::TasksEnded { post, result });
    }

    /// An error of the deployment's work as the machine records it: its
    /// words without any secret value (a build's or task's output may
    /// show one), the error itself kept as the source.
    fn work_error(&self, e: impl std::error::Error + Send + Sync + 'static) -> WorkError {
        WorkError::new(self.redact(&e.to_string()), e)
    }

    fn adopt_first_release(&mut self) {
        let Some(run) = self.deployment.as_ref() else { return };
        let to = run.to.clone();
        let base_env = run.base_env.clone();
        let record = AppRecord {
            app: to.spec.app.clone(),
            environment: self.env.clone(),
            spec: to.spec.clone(),
            workdir: to.workdir.clone(),
            release: to.id,
            base_env,
            running: true,
        };
        if let Err(e) = self.store.put_app(&record, self.clock.wall()) {
            tracing::error!("could not record the app: {e}");
        }
        if let Err(e) = self.record_counts(&to.spec.app, &run.counts) {
            tracing::error!("could not record the process counts: {e}");
        }
        self.install_record(record);
        self.mark_secrets_live();
    }

    /// Every process now runs the new release: make it the app's record.
    /// Idempotent (a restarted daemon may be asked again).
    fn promote_target(&mut self) {
        let Some(run) = self.deployment.as_ref() else { return };
        let to = run.to.clone();
        let base_env = run.base_env.clone();
        let Some(rt) = self.app.as_mut() else { return };
        let exposure = |s: &AppSpec| (s.proxy.clone(), s.hosts.clone(), s.default_host);
        if to.spec.processes.iter().any(|p| p.kind == ProcessKind::Web)
            && exposure(&rt.record.spec) != exposure(&to.spec)
        {
            let route = rt.route.clone();
            if let Err(e) = self.expose(&to.spec, &route) {
                tracing::error!("the proxy keeps its previous settings: {e}");
            }
        }
        let Some(rt) = self.app.as_mut() else { return };
        rt.record.spec = to.spec.clone();
        rt.record.workdir = to.workdir.clone();
        rt.record.release = to.id;
        rt.record.base_env = base_env;
        rt.record.running = true;
        rt.targets.clear();
        if let Err(e) = self.store.put_app(&rt.record, self.clock.wall()) {
            tracing::error!("could not record the new release: {e}");
        }
        if let Err(e) = self.record_counts(&to.spec.app, &run.counts) {
            tracing::error!("could not record the process counts: {e}");
        }
        // The new release is the running one: its files win from now on.
        self.publish_statics(&to.spec.app);
        self.mark_secrets_live();
    }

    /// End the deployment with `outcome`, answer the operation.
    fn finish_deploy(&mut self, outcome: Outcome) {
        let Some(mut run) = self.deployment.take() else { return };
        // A canary's share ends with the deployment, whatever its end.
        if let Some(rt) = self.app.as_ref() {
            self.traffic.set_split(&rt.route, None);
        }
        run.cancel.cancel();
        let took = self.clock.now().saturating_duration_since(run.started);
        let rollback_failed =
            matches!(&outcome, Outcome::Failed { failure } if failure.kind == FailureKind::RollbackFailed);
        let (status, reason) = match &outcome {
            Outcome::Succeeded { note } => {
                (DeploymentStatus::Succeeded, note.as_ref().map(|n| format!("live, but {n}")))
            }
            Outcome::RolledBack { failure } => (DeploymentStatus::RolledBack, Some(failure.detail.clone())),
            Outcome::Failed { failure } => (DeploymentStatus::Failed, Some(failure.detail.clone())),
        };
        let reason = run.reason_with_notes(reason);
        run.record.phase = serde_json::to_value(&run.machine).unwrap_or_default();
        run.record.status = status;
        run.record.reason = reason.clone();
        run.record.finished_at = Some(self.clock.wall());
        if let Err(e) = self.store.update_deployment(&run.record) {
            tracing::error!("could not record the end of deployment #{}: {e}", run.record.id);
        }
        let app = run.to.spec.app.clone();
        let release = run.to.id.to_string();
        match outcome {
            Outcome::Succeeded { note } => {
                // Its config is the environment's now (`config.rs`).
                self.config_went_live(run.record.id, &app);
                self.prune_releases(&app, &run);
                self.event(
                    &app,
                    EventKind::Deployed,
                    None,
                    &format!("{release} is live ({} in {})", run.record.kind, fmt_dur(took)),
                );
                if let Some(op) = self.op.as_mut() {
                    op.summary = format!("{release} is live ({} took {})", run.record.kind, fmt_dur(took));
                }
                match note {
                    Some(note) => self.fail_op(EngineError::PostTaskFailed { release, reason: note.detail }),
                    None => self.finish_op(),
                }
            }
            Outcome::RolledBack { failure } => {
                if let Some(rt) = self.app.as_mut() {
                    rt.targets.clear();
                }
                self.publish_statics(&app);
                let reason = failure.detail;
                self.event(&app, EventKind::RolledBack, None, &format!("{release}: {reason}"));
                self.fail_op(EngineError::RolledBack { release, reason, first: run.from.is_none() });
            }
            Outcome::Failed { failure } => {
                if let Some(rt) = self.app.as_mut() {
                    if !rollback_failed {
                        rt.targets.clear();
                    }
                }
                self.publish_statics(&app);
                let reason = failure.detail;
                self.event(&app, EventKind::DeployFailed, None, &format!("{release}: {reason}"));
                self.fail_op(EngineError::DeployFailed { release, reason });
            }
        }
    }

    /// The releases of `app` that some environment runs, or moves from or
    /// to in a deployment not yet ended.
    fn releases_in_use(&self, app: &AppName) -> Result<Vec<ReleaseId>, EngineError> {
        let mut ids: Vec<ReleaseId> =
            self.store.apps()?.into_iter().filter(|r| &r.app == app).map(|r| r.release).collect();
        for scope in self.store.scopes_with_running_deployments()?.into_iter().filter(|s| &s.app == app) {
            for d in self.store.deployments(app, &scope.env, 50)? {
                if d.status == nonstop_store::DeploymentStatus::Running {
                    ids.push(d.to_release);
                    ids.extend(d.from_release);
                }
            }
        }
        Ok(ids)
    }

    /// Keep the newest `retain_releases` built releases, the running one and
    /// the one before it, and every release another environment of the app
    /// uses; delete the others from disk.
    ///
    /// The store first: a release recorded as pruned is no longer a
    /// rollback target, so nothing can start from a directory being
    /// deleted. The deletion itself runs off the engine's task (a release
    /// with its own virtualenv is thousands of files); one that fails
    /// leaves directories that the next prune removes.
    fn prune_releases(&mut self, app: &AppName, run: &DeployRun) {
        let Ok(all) = self.store.releases(app) else { return };
        let retain = run.to.spec.release.retain_releases.max(1) as usize;
        let mut keep: Vec<ReleaseId> =
            all.iter().rev().filter(|r| r.status == ReleaseStatus::Ready).take(retain).map(|r| r.id).collect();
        keep.push(run.to.id);
        if let Some(f) = &run.from {
            keep.push(f.id);
        }
        // Releases are the app's, shared by its environments: what any
        // environment runs (or could start again), rolls between or is
        // building now stays.
        let Ok(others) = self.releases_in_use(app) else { return };
        keep.extend(others);
        keep.extend(all.iter().filter(|r| r.status == ReleaseStatus::Building).map(|r| r.id));
        let doomed: Vec<ReleaseRecord> =
            all.iter().filter(|r| r.status == ReleaseStatus::Ready && !keep.contains(&r.id)).cloned().collect();
        for mut r in doomed {
            r.status = ReleaseStatus::Pruned;
            if let Err(e) = self.store.put_release(&r) {
                tracing::warn!("could not record release {} as pruned, so it stays on disk: {e}", r.id);
                keep.push(r.id);
            }
        }
        self.publish_statics(app);
        // A release of a config change or a promotion may run the
        // directory of an earlier one (the same build): a directory stays
        // while any release kept uses it.
        let kept_dirs: Vec<PathBuf> = all
            .iter()
            .filter(|r| keep.contains(&r.id))
            .map(|r| r.dir.clone())
            .filter(|d| !d.as_os_str().is_empty())
            .collect();
        let owners: Vec<ReleaseId> = all.iter().filter(|r| kept_dirs.contains(&r.dir)).map(|r| r.id).collect();
        keep.extend(owners);
        let (builder, app) = (self.builder.clone(), app.clone());
        self.tasks.spawn(async move {
            match tokio::task::spawn_blocking(move || builder.prune(&app, &keep)).await {
                Ok(Ok(pruned)) if !pruned.is_empty() => tracing::info!(?pruned, "old releases deleted"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("could not delete old releases: {e}"),
                Err(e) => tracing::warn!("deleting old releases failed: {e}"),
            }
        });
    }
}
