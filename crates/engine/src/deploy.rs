//! Deploys and rollbacks: the commands (`deploy`, `rollback`, `cancel`,
//! `releases`, `history`) and the preparation of a deployment. Where a
//! deployment goes from there is `nonstop_plan::deployment::advance`'s
//! decision, carried out by `deployment.rs`.

use super::deployment::{shape_for, stored_deployment, stored_phase_name};
use super::tasks::RecoveredTasks;
use super::*;
use nonstop_core::driver::TaskHandle;
use nonstop_plan::deploy::{rollout_order, TaskFate};
use nonstop_plan::deployment::{
    Deployment, DeploymentKind, Event, GateMode, Margins, Phase as DeploymentPhase, RollTo,
};
use nonstop_store::{DeploymentRecord, DeploymentStatus, ReleaseRecord, ReleaseStatus, TaskRecord};

pub(crate) struct DeployRun {
    pub(crate) record: DeploymentRecord,
    pub(crate) to: ReleaseCtx,
    pub(crate) from: Option<ReleaseCtx>,
    /// Where it is, as `advance` left it (stored in `record.phase`).
    pub(crate) machine: Deployment,
    /// Stops the build or the task in progress.
    pub(crate) cancel: CancellationToken,
    pub(crate) started: Instant,
    pub(crate) base_env: BTreeMap<String, String>,
    /// The rollout the machine asked for, until `kick` starts it (one
    /// rollout runs at a time).
    pub(crate) pending_roll: Option<(ProcessName, RollTo)>,
    /// The rollout running for the machine: its end is the machine's next
    /// event.
    pub(crate) active_roll: Option<(ProcessName, RollTo)>,
    /// The task a previous daemon left running, until `AwaitLeftoverTask`.
    pub(crate) leftover: Option<(TaskRecord, TaskFate, Option<TaskHandle>)>,
    /// What became of its tasks across a daemon restart (waited for,
    /// killed), for its history.
    pub(crate) notes: Vec<String>,
    /// The counts `to` runs (the runtime's, or the toml's where it changed
    /// them), recorded when it goes live.
    pub(crate) counts: super::counts::Counted,
    /// Events waiting for `feed` (one is handled at a time).
    pub(crate) inbox: VecDeque<Event>,
    pub(crate) feeding: bool,
}

/// What `nonstop deploy` asks for.
pub(crate) struct DeployRequest {
    pub(crate) spec: AppSpec,
    /// The app directory.
    pub(crate) source: PathBuf,
    /// The environment the daemon was started with, under the spec's.
    pub(crate) base_env: BTreeMap<String, String>,
    pub(crate) message: Option<String>,
    pub(crate) who: String,
    pub(crate) options: DeployOptions,
}

/// A deploy waiting for the content hash of its app directory, which is
/// computed off the engine's task (a large directory takes seconds);
/// meanwhile the engine is busy for other operations.
pub(crate) struct PendingDeploy {
    pub(crate) request: DeployRequest,
    pub(crate) since: SystemTime,
    progress: ProgressTx,
    reply: Reply<OpReport>,
}

use super::deployment::ms_since_epoch;

/// The operation a deployment of `kind` is, as `status` and `Busy` name it.
pub(crate) fn op_name(kind: nonstop_store::DeploymentKind) -> &'static str {
    match kind {
        nonstop_store::DeploymentKind::Deploy => "deploy",
        nonstop_store::DeploymentKind::Rollback => "rollback",
        nonstop_store::DeploymentKind::Promote => "promote",
        nonstop_store::DeploymentKind::Config => "config",
    }
}

impl DeployRun {
    /// A deployment about to begin: its record is stored, its machine at
    /// the start.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        record: DeploymentRecord,
        to: ReleaseCtx,
        from: Option<ReleaseCtx>,
        kind: DeploymentKind,
        base_env: BTreeMap<String, String>,
        counts: super::counts::Counted,
        cancel: CancellationToken,
        started: Instant,
        gate: GateMode,
    ) -> DeployRun {
        let order = rollout_order(from.as_ref().map(|f| &f.spec), &to.spec);
        let shape = shape_for(kind, &to, from.is_none(), order, gate);
        let margins = to
            .spec
            .processes
            .iter()
            .find(|p| shape.canary.as_ref() == Some(&p.name))
            .map_or_else(Margins::default, |p| super::canary::margins_of(&p.rollout.canary));
        DeployRun {
            record,
            machine: Deployment::new(shape, margins),
            to,
            from,
            cancel,
            started,
            base_env,
            pending_roll: None,
            active_roll: None,
            leftover: None,
            notes: Vec::new(),
            counts,
            inbox: VecDeque::new(),
            feeding: false,
        }
    }
}

/// The migration gate a deploy of `spec` goes through. None for a first
/// release: no running release can break (and its database may not exist
/// yet: a release task may create it).
pub(crate) fn deploy_gate(spec: &AppSpec, options: DeployOptions, first: bool) -> GateMode {
    match (&spec.database, options.allow_breaking) {
        _ if first => GateMode::Off,
        (None, _) => GateMode::Off,
        (Some(_), false) => GateMode::Check,
        (Some(_), true) => GateMode::AllowBreaking,
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    // ------------------------------------------------------------- commands

    pub(crate) fn begin_deploy(&mut self, request: DeployRequest, progress: ProgressTx, reply: Reply<OpReport>) {
        let Some(reply) = self.admit(None, reply) else { return };
        if let Err(e) = self.check_deploy(&request.spec, &request.source) {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(err) = self.task_conflict(&request.spec.app) {
            let _ = reply.send(Err(err));
            return;
        }
        // Its processes and tasks get the secrets as they are now; ones
        // that cannot be decrypted stop it here, before anything is built.
        if let Err(e) = self.refresh_secrets() {
            let _ = reply.send(Err(e));
            return;
        }
        // The environment's database first, if `[base]` asks for one.
        let waiting = super::base::Waiting::Deploy { request: Box::new(request), progress, reply };
        let Some(super::base::Waiting::Deploy { request, progress, reply }) = self.hold_for_base(waiting) else {
            return;
        };
        let request = *request;
        let _ = progress.send(Progress::note(format!("reading {}", request.source.display())));
        let (builder, tx, dir) = (self.builder.clone(), self.events_tx.clone(), request.source.clone());
        self.tasks.spawn(async move {
            let result = tokio::task::spawn_blocking(move || builder.content_hash(&dir)).await.unwrap_or_else(|e| {
                Err(BuildError::Interrupted { what: "hashing the app directory", source: Box::new(e) })
            });
            let _ = tx.send(Internal::Hashed { result });
        });
        let since = self.clock.wall();
        self.pending_deploy = Some(PendingDeploy { request, since, progress, reply });
    }

    /// The app directory of the pending deploy was hashed: go on.
    pub(crate) fn deploy_on_hashed(&mut self, result: Result<String, BuildError>) {
        let Some(PendingDeploy { request, progress, reply, .. }) = self.pending_deploy.take() else {
            return;
        };
        let hash = match result {
            Ok(hash) => hash,
            Err(e) => {
                let reason = format!("cannot read {}: {e}", request.source.display());
                let _ = reply.send(Err(EngineError::CannotDeploy { reason }));
                return;
            }
        };
        match self.prepare_deploy(request, hash) {
            Ok(Some((run, summary))) => {
                let name =
                    if run.record.kind == nonstop_store::DeploymentKind::Rollback { "rollback" } else { "deploy" };
                let lines = run.counts.lines.clone();
                self.begin_op(name, progress, reply, summary, true, VecDeque::new(), false);
                for line in lines {
                    self.progress(line);
                }
                if let Some(op) = self.op.as_mut() {
                    op.who = Some(run.record.who.clone());
                }
                // A retained release with this content: nothing to build.
                if let DeploymentKind::Reuse { run_tasks } = run.machine.shape.kind {
                    if run.machine.shape.has_tasks && !run_tasks {
                        self.progress(format!(
                            "release tasks of {} not run again (`nonstop deploy --run-tasks` runs them)",
                            run.to.id
                        ));
                    }
                }
                self.deployment = Some(run);
                self.feed(Event::Begin);
            }
            Ok(None) => {
                let release = self.app.as_ref().map(|rt| rt.record.release).unwrap_or(ReleaseId(0));
                let _ = reply.send(Ok(OpReport {
                    summary: format!("{release} already has this code and config; nothing to deploy"),
                    changed: false,
                }));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// What can be checked at once, before the app directory is read.
    fn check_deploy(&self, spec: &AppSpec, source: &std::path::Path) -> Result<(), EngineError> {
        if let Some(rt) = &self.app {
            if rt.record.app != spec.app && rt.record.running {
                return Err(EngineError::OtherApp {
                    running: rt.record.app.to_string(),
                    requested: spec.app.to_string(),
                });
            }
        }
        if !source.is_dir() {
            return Err(EngineError::CannotDeploy {
                reason: format!("the app directory {} does not exist", source.display()),
            });
        }
        Ok(())
    }

    /// Checks again (the app may have changed while the directory was
    /// read) and records; `None` when there is nothing to deploy.
    fn prepare_deploy(
        &mut self,
        request: DeployRequest,
        hash: String,
    ) -> Result<Option<(DeployRun, String)>, EngineError> {
        let DeployRequest { spec, source, base_env, message, who, options } = request;
        self.check_deploy(&spec, &source)?;
        if options.allow_breaking && spec.database.is_none() {
            return Err(EngineError::CannotDeploy {
                reason: "--allow-breaking is for a migration the gate finds breaking, and the spec has no \
                         [database] to gate; add [database] url = \"postgres://…\" or drop the flag"
                    .into(),
            });
        }
        let from = self.app.as_ref().filter(|rt| rt.record.running && rt.record.app == spec.app).map(|rt| rt.current());
        // The environment's config goes over the file's spec (`config.rs`).
        let config = self.env_config(&spec.app)?;
        if let Some(from) = &from {
            if from.id.0 > 0 {
                // The same code, run with the same spec and config here.
                let same = match self.store.release(&spec.app, from.id)? {
                    Some(r) if r.content_hash == hash => {
                        let ran = self.run_config_of(&r)?;
                        ran.spec == spec && ran.config.same_values(&config)
                    }
                    _ => false,
                };
                let same_env = self.app.as_ref().is_some_and(|rt| rt.record.base_env == base_env);
                // Changed secrets are rolled out like changed code.
                if same && same_env && !self.secrets_changed_since_live() {
                    return Ok(None);
                }
            }
        }
        // The proxy address must be usable before anything is built.
        self.check_listener(&spec, from.as_ref())?;
        // The release keeps the toml's counts; it runs the runtime's (or
        // the toml's where it changed one).
        let run_config = nonstop_store::RunConfig { spec: spec.clone(), config };
        let mut run_spec = run_config.applied();
        self.check_queue_redis(&run_spec, &base_env)?;
        let counts = self.count_spec(&mut run_spec, nonstop_plan::counts::Apply::Toml)?;
        if let Some(from) = &from {
            if let Some(rec) = self.identical_retained(&spec, &hash, from.id)? {
                return self
                    .prepare_reuse(rec, run_spec, run_config, counts, from.clone(), base_env, message, who, options)
                    .map(Some);
            }
        }
        let now = self.clock.wall();
        let id = self.store.next_release_id(&spec.app)?;
        let release = ReleaseRecord {
            app: spec.app.clone(),
            id,
            content_hash: hash,
            dir: PathBuf::new(),
            spec: spec.clone(),
            message: message.clone(),
            status: ReleaseStatus::Building,
            created_at: now,
            build_ms: 0,
        };
        self.store.put_release(&release)?;
        let record = self.insert_deployment(
            spec.app.clone(),
            nonstop_store::DeploymentKind::Deploy,
            from.as_ref().map(|f| f.id),
            id,
            who,
            message,
            &run_config,
        )?;
        let summary = match &from {
            Some(f) => format!("{} → {id}", f.id),
            None => format!("first release {id}"),
        };
        self.event(
            &spec.app,
            EventKind::Deploy,
            None,
            &format!("deployment #{} started: {summary} by {}", record.id, record.who),
        );
        let to = ReleaseCtx { id, spec: run_spec, workdir: source };
        let (cancel, started) = (self.cancel.child_token(), self.clock.now());
        let gate = deploy_gate(&spec, options, from.is_none());
        let run = DeployRun::new(record, to, from, DeploymentKind::Deploy, base_env, counts, cancel, started, gate);
        Ok(Some((run, summary)))
    }

    /// A retained release that went live with this content and this spec
    /// (not `current`, which `prepare_deploy` handled): the newest one.
    fn identical_retained(
        &self,
        spec: &AppSpec,
        hash: &str,
        current: ReleaseId,
    ) -> Result<Option<ReleaseRecord>, EngineError> {
        for r in self.store.releases(&spec.app)?.into_iter().rev() {
            if r.id == current || r.status != ReleaseStatus::Ready || r.content_hash != hash || !r.dir.is_dir() {
                continue;
            }
            // Went live here, with this spec (what this environment ran it
            // with: the release may have been built by another).
            if self.went_live_here(&spec.app, r.id)? && &self.run_config_of(&r)?.spec == spec {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Whether a deployment made `release` live in this environment.
    fn went_live_here(&self, app: &AppName, release: ReleaseId) -> Result<bool, EngineError> {
        Ok(self
            .store
            .deployments(app, &self.env, 10_000)?
            .iter()
            .any(|d| d.to_release == release && d.status == DeploymentStatus::Succeeded))
    }

    /// The proxy address must be usable before anything is built or
    /// rolled. A running app keeps its listener until the new release is
    /// live; a new address is only probed here; a first release claims
    /// the environment's route (and hosts) now.
    pub(crate) fn check_listener(&mut self, spec: &AppSpec, from: Option<&ReleaseCtx>) -> Result<(), EngineError> {
        if spec.processes.iter().any(|p| p.kind == ProcessKind::Web) {
            let addr = spec.proxy.listen;
            match from {
                Some(f) if f.spec.proxy.listen == addr => {}
                Some(_) => {
                    std::net::TcpListener::bind(addr).map(drop).map_err(|e| EngineError::Listen {
                        addr: addr.to_string(),
                        reason: if e.kind() == std::io::ErrorKind::AddrInUse {
                            "the address is already in use by another program".to_string()
                        } else {
                            e.to_string()
                        },
                    })?;
                }
                None => {
                    let route = route_key(&spec.app, &self.env);
                    self.expose(spec, &route)?;
                }
            }
        }
        Ok(())
    }

    /// A deploy of the content of the retained release `rec`: rolled to as
    /// a rollback is (no build; its release tasks only with `run_tasks`).
    #[allow(clippy::too_many_arguments)]
    fn prepare_reuse(
        &mut self,
        rec: ReleaseRecord,
        run_spec: AppSpec,
        run_config: nonstop_store::RunConfig,
        counts: super::counts::Counted,
        from: ReleaseCtx,
        base_env: BTreeMap<String, String>,
        message: Option<String>,
        who: String,
        options: DeployOptions,
    ) -> Result<(DeployRun, String), EngineError> {
        let target = rec.id;
        let gate = deploy_gate(&run_spec, options, false);
        let to = ReleaseCtx { id: target, spec: run_spec, workdir: rec.dir.clone() };
        let record = self.insert_deployment(
            rec.app.clone(),
            nonstop_store::DeploymentKind::Deploy,
            Some(from.id),
            target,
            who,
            message,
            &run_config,
        )?;
        let summary =
            format!("{} → {target}: content identical to {target}: rolling to {target} without building", from.id);
        self.event(
            &rec.app,
            EventKind::Deploy,
            None,
            &format!("deployment #{} started: {summary} by {}", record.id, record.who),
        );
        let (cancel, started) = (self.cancel.child_token(), self.clock.now());
        let kind = DeploymentKind::Reuse { run_tasks: options.run_tasks };
        Ok((DeployRun::new(record, to, Some(from), kind, base_env, counts, cancel, started, gate), summary))
    }

    pub(crate) fn begin_rollback(
        &mut self,
        release: Option<ReleaseId>,
        options: RollbackOptions,
        who: String,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    ) {
        let Some(reply) = self.admit(None, reply) else { return };
        if let Some(err) = self
            .app
            .as_ref()
            .map(|rt| rt.record.app.clone())
            .filter(|_| options.run_tasks)
            .and_then(|a| self.task_conflict(&a))
        {
            let _ = reply.send(Err(err));
            return;
        }
        if let Err(e) = self.refresh_secrets() {
            let _ = reply.send(Err(e));
            return;
        }
        match self.prepare_rollback(release, options, who.clone()) {
            Ok((run, summary)) => {
                self.begin_op("rollback", progress, reply, summary, true, VecDeque::new(), false);
                if let Some(op) = self.op.as_mut() {
                    op.who = Some(who);
                }
                self.deployment = Some(run);
                self.feed(Event::Begin);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn prepare_rollback(
        &mut self,
        release: Option<ReleaseId>,
        options: RollbackOptions,
        who: String,
    ) -> Result<(DeployRun, String), EngineError> {
        let rt = self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let app = rt.record.app.clone();
        let current = rt.current();
        let releases = self.store.releases(&app)?;
        let deployments = self.store.deployments(&app, &self.env, 10_000)?;
        let went_live =
            |id: ReleaseId| deployments.iter().any(|d| d.to_release == id && d.status == DeploymentStatus::Succeeded);
        let target = match release {
            Some(id) => {
                if id == current.id {
                    return Err(EngineError::NoRollbackTarget { reason: format!("{id} is the release running now") });
                }
                id
            }
            None => deployments
                .iter()
                .find(|d| d.to_release == current.id && d.status == DeploymentStatus::Succeeded)
                .and_then(|d| d.from_release)
                .filter(|r| r.0 > 0)
                .ok_or_else(|| EngineError::NoRollbackTarget {
                    reason: format!("{} has no earlier release to go back to; name one with `nonstop rollback vN` (see `nonstop releases`)", current.id),
                })?,
        };
        let retained: Vec<String> =
            releases.iter().filter(|r| r.status == ReleaseStatus::Ready).map(|r| r.id.to_string()).collect();
        let rec = releases.iter().find(|r| r.id == target).ok_or_else(|| EngineError::NoRollbackTarget {
            reason: format!("there is no release {target}; retained releases: {}", retained.join(", ")),
        })?;
        if rec.status != ReleaseStatus::Ready || !rec.dir.is_dir() {
            return Err(EngineError::NoRollbackTarget {
                reason: format!(
                    "{target} is {} and cannot be run again; retained releases: {}",
                    rec.status.as_str(),
                    retained.join(", ")
                ),
            });
        }
        if !went_live(target) {
            return Err(EngineError::NoRollbackTarget {
                reason: format!("{target} never went live (its deployment failed); deploy a fixed version instead"),
            });
        }
        // The spec and config this environment ran it with (never the
        // release's own, which may be another environment's: `config.rs`);
        // a rollback keeps the runtime's counts.
        let ran = self.run_config_of(rec)?;
        let mut spec = ran.applied();
        let counts = self.count_spec(&mut spec, nonstop_plan::counts::Apply::Rollback)?;
        let to = ReleaseCtx { id: target, spec, workdir: rec.dir.clone() };
        let record = self.insert_deployment(
            app.clone(),
            nonstop_store::DeploymentKind::Rollback,
            Some(current.id),
            target,
            who,
            None,
            &ran,
        )?;
        let summary = format!("{} → {target} (rollback)", current.id);
        self.event(
            &app,
            EventKind::Rollback,
            None,
            &format!("deployment #{} started: {summary} by {}", record.id, record.who),
        );
        let base_env = rt.record.base_env.clone();
        let (cancel, started) = (self.cancel.child_token(), self.clock.now());
        let kind = DeploymentKind::Rollback { run_tasks: options.run_tasks };
        // The target's expected schema is compared with the database's
        // unless forced (nothing recorded: nothing to compare).
        let gate = if to.spec.database.is_some() && !options.force && self.store.release_schema(&app, target)?.is_some()
        {
            GateMode::Check
        } else {
            GateMode::Off
        };
        Ok((DeployRun::new(record, to, Some(current), kind, base_env, counts, cancel, started, gate), summary))
    }

    /// Record a deployment that starts now (its phase is stored by its
    /// first step), with what it rolls out in this environment.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_deployment(
        &self,
        app: AppName,
        kind: nonstop_store::DeploymentKind,
        from_release: Option<ReleaseId>,
        to_release: ReleaseId,
        who: String,
        message: Option<String>,
        run: &nonstop_store::RunConfig,
    ) -> Result<DeploymentRecord, EngineError> {
        let mut record = DeploymentRecord {
            id: 0,
            app,
            environment: self.env.clone(),
            kind,
            from_release,
            to_release,
            phase: serde_json::Value::Null,
            status: DeploymentStatus::Running,
            reason: None,
            who,
            message,
            started_at: self.clock.wall(),
            finished_at: None,
        };
        record.id = self.store.insert_deployment_with(&record, run)?;
        Ok(record)
    }

    pub(crate) fn releases(&self) -> Result<Vec<ReleaseInfo>, EngineError> {
        let rt = self.app.as_ref().ok_or(EngineError::NotUp)?;
        let current = rt.record.release;
        let app = rt.record.app.clone();
        Ok(self
            .store
            .releases(&app)?
            .into_iter()
            .rev()
            .map(|r| ReleaseInfo {
                schema: self.store.release_schema(&app, r.id).ok().flatten().map(|s| s.fingerprint),
                id: r.id.0,
                content_hash: r.content_hash,
                status: r.status,
                message: r.message,
                created_at_ms: ms_since_epoch(r.created_at),
                build_ms: r.build_ms,
                current: r.id == current && rt.record.running,
                dir: r.dir,
            })
            .collect())
    }

    pub(crate) fn history(&self, limit: usize) -> Result<Vec<DeploymentInfo>, EngineError> {
        let rt = self.app.as_ref().ok_or(EngineError::NotUp)?;
        let records = self.store.deployments(&rt.record.app, &self.env, limit)?;
        records.into_iter().map(|d| self.deployment_info(d)).collect()
    }

    /// One deployment of this environment, with its timeline.
    pub(crate) fn deployment(&self, id: i64) -> Result<Option<DeploymentInfo>, EngineError> {
        let rt = self.app.as_ref().ok_or(EngineError::NotUp)?;
        self.store.deployment(&rt.record.app, &self.env, id)?.map(|d| self.deployment_info(d)).transpose()
    }

    fn deployment_info(&self, d: nonstop_store::DeploymentRecord) -> Result<DeploymentInfo, EngineError> {
        let mut timeline = Vec::new();
        for (at, value) in self.store.deployment_steps(d.id)? {
            // A step this version cannot read (written by a newer one) is
            // left out, not the whole history.
            match serde_json::from_value::<nonstop_plan::timeline::Step>(value) {
                Ok(step) => timeline.push(crate::report::TimelineEntry {
                    at_ms: ms_since_epoch(at),
                    kind: step.kind,
                    tone: step.tone,
                    text: step.text,
                }),
                Err(e) => tracing::warn!("deployment #{}: a timeline step left out, not readable: {e}", d.id),
            }
        }
        Ok(DeploymentInfo {
            id: d.id,
            kind: d.kind,
            from_release: d.from_release.map(|r| r.0),
            to_release: d.to_release.0,
            status: d.status,
            phase: stored_phase_name(&d.phase),
            reason: d.reason,
            who: d.who,
            message: d.message,
            started_at_ms: ms_since_epoch(d.started_at),
            finished_at_ms: d.finished_at.map(ms_since_epoch),
            timeline,
        })
    }

    // -------------------------------------------------------------- restart

    /// Called by `restore`: a deployment that was running when the daemon
    /// stopped is failed (nothing changed yet) or rolled back.
    pub(crate) fn recover_deployment(&mut self) -> Result<(), EngineError> {
        let Some(rt) = self.app.as_ref() else { return Ok(()) };
        let app = rt.record.app.clone();
        let base_env = rt.record.base_env.clone();
        let Some(mut record) = self.store.running_deployment(&app, &self.env)? else {
            // Tasks an earlier daemon left to end by themselves.
            self.recover_tasks(&app, None)?;
            return Ok(());
        };
        let to_rec = self.store.release(&app, record.to_release)?;
        let from = record.from_release.map(|_| rt.current());
        let Some(to_rec) = to_rec else {
            record.status = DeploymentStatus::Failed;
            record.reason = Some("its release is gone".into());
            record.finished_at = Some(self.clock.wall());
            self.store.update_deployment(&record)?;
            return Ok(());
        };
        let apply = match record.kind {
            nonstop_store::DeploymentKind::Rollback | nonstop_store::DeploymentKind::Config => {
                nonstop_plan::counts::Apply::Rollback
            }
            nonstop_store::DeploymentKind::Deploy | nonstop_store::DeploymentKind::Promote => {
                nonstop_plan::counts::Apply::Toml
            }
        };
        // What it rolls out here (recorded with it; older records ran
        // their release's own spec).
        let mut spec = match self.store.deployment_config(record.id)? {
            Some(run) => run.applied(),
            None => to_rec.spec.clone(),
        };
        let counts = self.count_spec(&mut spec, apply)?;
        let to = ReleaseCtx { id: to_rec.id, spec, workdir: to_rec.dir.clone() };
        let order = rollout_order(from.as_ref().map(|f| &f.spec), &to.spec);
        // Records written before the state machine stored itself say
        // only their phase; their shape is rebuilt from the release.
        let kind = match record.kind {
            nonstop_store::DeploymentKind::Rollback => DeploymentKind::Rollback { run_tasks: false },
            nonstop_store::DeploymentKind::Deploy => DeploymentKind::Deploy,
            nonstop_store::DeploymentKind::Promote => DeploymentKind::Reuse { run_tasks: true },
            nonstop_store::DeploymentKind::Config => DeploymentKind::Reuse { run_tasks: false },
        };
        let machine = stored_deployment(&record.phase, shape_for(kind, &to, from.is_none(), order, GateMode::Off));
        // The task it was in the middle of (and any other left running).
        let RecoveredTasks { resume, notes } = self.recover_tasks(&app, Some((record.id, &machine.phase.legacy())))?;
        if to_rec.status == ReleaseStatus::Building {
            let mut r = to_rec.clone();
            r.status = ReleaseStatus::Failed;
            self.store.put_release(&r)?;
        }
        tracing::warn!("deployment #{} was {} when the daemon stopped", record.id, machine.phase.name());
        let (progress, _) = mpsc::unbounded_channel();
        let (reply, _) = oneshot::channel();
        self.begin_op(op_name(record.kind), progress, reply, "recovery".into(), true, VecDeque::new(), false);
        if let Some(op) = self.op.as_mut() {
            op.reply = None;
            op.who = Some(format!("{} (recovering after a daemon restart)", record.who));
        }
        let fate = resume.as_ref().map(|(_, fate, _)| *fate);
        self.deployment = Some(DeployRun {
            record,
            to,
            from,
            machine,
            cancel: self.cancel.child_token(),
            started: self.clock.now(),
            base_env,
            pending_roll: None,
            active_roll: None,
            leftover: resume,
            notes,
            counts,
            inbox: VecDeque::new(),
            feeding: false,
        });
        self.feed(Event::Restarted { task: fate });
        Ok(())
    }

    /// A deployment left running by a daemon that died, for an app that does
    /// not run: nothing of it was started; it ends as failed.
    pub(crate) fn fail_stale_deployment(&mut self, app: &AppName) -> Result<(), EngineError> {
        let Some(mut record) = self.store.running_deployment(app, &self.env)? else { return Ok(()) };
        if let Some(mut r) = self.store.release(app, record.to_release)? {
            if r.status == ReleaseStatus::Building {
                r.status = ReleaseStatus::Failed;
                self.store.put_release(&r)?;
            }
        }
        let tasks = self.recover_tasks(app, None)?;
        let mut reason = "the daemon stopped before the release went live; nothing was started".to_string();
        if !tasks.notes.is_empty() {
            reason = format!("{}; {reason}", tasks.notes.join("; "));
        }
        record.status = DeploymentStatus::Failed;
        record.reason = Some(reason);
        record.finished_at = Some(self.clock.wall());
        record.phase =
            serde_json::to_value(nonstop_plan::deploy::DeployPhase::Failed { reason: "daemon stopped".into() })
                .unwrap_or_default();
        self.store.update_deployment(&record)?;
        tracing::warn!("deployment #{} of {app} was interrupted before going live; marked failed", record.id);
        Ok(())
    }

    /// `nonstop cancel`: stop what is in progress, as far as it can be
    /// undone. A deploy or rollback still building or running its release
    /// tasks ends as failed with nothing changed (the running command's
    /// process group is killed); one that is rolling rolls back to the
    /// release that ran before, as a failed rollout would; post tasks are
    /// stopped and the release stays live. A rolling restart stops and
    /// keeps the instances that ran before. Answers at once; the
    /// operation itself answers its own caller when it has ended.
    pub(crate) fn cancel(&mut self, who: &str, reason: Option<&str>) -> Result<OpReport, EngineError> {
        let by = match reason {
            Some(reason) => format!("{who}: {reason}"),
            None => who.to_string(),
        };
        let why = format!("cancelled by {by}");
        if let Some(report) = self.cancel_pending_base(&why) {
            return Ok(report);
        }
        if let Some(p) = self.pending_deploy.take() {
            let _ = p.reply.send(Err(EngineError::DeployFailed { release: "the new release".into(), reason: why }));
            return Ok(OpReport {
                summary: "the deploy was cancelled before anything was built; nothing changed".into(),
                changed: true,
            });
        }
        let Some(run) = self.deployment.as_mut() else {
            return match self.op.as_ref() {
                None => {
                    Ok(OpReport { summary: "nothing to cancel: no operation is in progress".into(), changed: false })
                }
                Some(op) => {
                    let name = op.name;
                    let Some(ro) = self.app.as_mut().and_then(|rt| rt.rollout.as_mut()) else {
                        return Err(EngineError::NotCancellable { operation: name.to_string() });
                    };
                    ro.cancelled = Some(why);
                    let process = ro.process.clone();
                    Ok(OpReport {
                        summary: format!("{name} cancelled: {process} keeps the instances that ran before"),
                        changed: true,
                    })
                }
            };
        };
        let what = format!("{} #{} to {}", run.record.kind, run.record.id, run.to.id);
        if run.machine.stopping.is_some() {
            return Ok(OpReport { summary: format!("{what} is being cancelled already"), changed: false });
        }
        let from = run.from.as_ref().map_or("nothing (its first release)".to_string(), |f| f.id.to_string());
        let summary = match run.machine.phase.clone() {
            DeploymentPhase::Building | DeploymentPhase::MigrationGate | DeploymentPhase::ReleaseTasks => {
                format!("{what} cancelled while {}: nothing changed", run.machine.phase.name())
            }
            DeploymentPhase::Fallback { .. } => {
                format!("{what} cancelled during the maintenance fallback: putting {from} back")
            }
            DeploymentPhase::Canary { .. } => format!("{what} cancelled during the canary: rolling back to {from}"),
            DeploymentPhase::Rolling { index } => {
                let rolling =
                    run.machine.shape.order.get(index).map(|p| format!(" while rolling {p}")).unwrap_or_default();
                format!("{what} cancelled{rolling}: rolling back to {from}")
            }
            DeploymentPhase::PostTasks => format!("{what}: post tasks stopped; {} stays live", run.to.id),
            DeploymentPhase::RollingBack { .. } => {
                return Ok(OpReport { summary: format!("{what} is rolling back already"), changed: false });
            }
            DeploymentPhase::MaintenanceOff { .. } | DeploymentPhase::Done { .. } => {
                return Ok(OpReport { summary: format!("{what} has ended; nothing to cancel"), changed: false });
            }
        };
        self.feed(Event::Cancel { why });
        if let Some(app) = self.app.as_ref().map(|rt| rt.record.app.clone()) {
            self.event(&app, EventKind::Cancel, None, &format!("{summary} (by {by})"));
        }
        self.progress(summary.clone());
        Ok(OpReport { summary, changed: true })
    }

    /// Describe the deployment in progress, for `status`.
    pub(crate) fn deployment_summary(&self) -> Option<String> {
        let run = self.deployment.as_ref()?;
        let detail = match &run.machine.phase {
            DeploymentPhase::Rolling { index } => {
                format!("rolling {}", run.machine.shape.order.get(*index).map(|p| p.as_str()).unwrap_or(""))
            }
            DeploymentPhase::RollingBack { remaining, .. } => {
                format!("rolling back {}", remaining.first().map(|p| p.as_str()).unwrap_or(""))
            }
            p => p.name().to_string(),
        };
        Some(format!("{} #{} {} ({detail})", run.record.kind, run.record.id, run.to.id))
    }
}
