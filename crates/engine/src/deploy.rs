//! Deploys and rollbacks: the deployment state machine of
//! `nonstop_plan::deploy` carried out by the engine actor.
//!
//! building → release tasks → rolling (web, workers, singletons) → post
//! tasks → succeeded; a failed build or task ends as failed with nothing
//! changed; a rollout whose new instances do not become ready rolls every
//! touched process type back to the previous release (rolled back). The
//! phase is written to the store before it is carried out; a daemon that
//! finds a deployment in progress at start fails it (before any instance
//! changed) or rolls it back.

use super::*;
use nonstop_plan::deploy::{rollout_order, DeployPhase};
use nonstop_store::{DeploymentRecord, DeploymentStatus, ReleaseRecord, ReleaseStatus};

pub(crate) struct DeployRun {
    pub(crate) record: DeploymentRecord,
    pub(crate) to: ReleaseCtx,
    pub(crate) from: Option<ReleaseCtx>,
    pub(crate) phase: DeployPhase,
    pub(crate) order: Vec<ProcessName>,
    pub(crate) run_tasks: bool,
    pub(crate) cancel: CancellationToken,
    pub(crate) started: Instant,
    pub(crate) base_env: BTreeMap<String, String>,
    /// A post task failed: the release is live, the operation still fails.
    pub(crate) post_failure: Option<String>,
    /// Some process type could not be rolled back.
    pub(crate) rollback_failed: bool,
    /// `nonstop cancel`: why, once asked.
    pub(crate) cancelled: Option<String>,
    /// What became of its tasks across a daemon restart (waited for,
    /// killed), for its history.
    pub(crate) notes: Vec<String>,
    /// The counts `to` runs (the runtime's, or the toml's where it changed
    /// them), recorded when it goes live.
    pub(crate) counts: super::counts::Counted,
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
    /// Run the release tasks of a reused retained release again.
    pub(crate) run_tasks: bool,
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

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Engine<D, T, I, L> {
    // ------------------------------------------------------------- commands

    pub(crate) fn begin_deploy(&mut self, request: DeployRequest, progress: ProgressTx, reply: Reply<OpReport>) {
        if let Some(err) = self.busy() {
            let _ = reply.send(Err(err));
            return;
        }
        if let Err(e) = self.check_deploy(&request.spec, &request.source) {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(err) = self.task_conflict(&request.spec.app) {
            let _ = reply.send(Err(err));
            return;
        }
        let _ = progress.send(Progress::note(format!("reading {}", request.source.display())));
        let (builder, tx, dir) = (self.builder.clone(), self.events_tx.clone(), request.source.clone());
        self.tasks.spawn(async move {
            let result = tokio::task::spawn_blocking(move || builder.content_hash(&dir))
                .await
                .unwrap_or_else(|e| Err(format!("hashing the app directory failed: {e}")));
            let _ = tx.send(Internal::Hashed { result });
        });
        let since = self.clock.wall();
        self.pending_deploy = Some(PendingDeploy { request, since, progress, reply });
    }

    /// The app directory of the pending deploy was hashed: go on.
    pub(crate) fn deploy_on_hashed(&mut self, result: Result<String, String>) {
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
                let name = if run.record.kind == "rollback" { "rollback" } else { "deploy" };
                let lines = run.counts.lines.clone();
                // A retained release with this content: nothing to build.
                let reused = run.record.kind == "deploy" && run.phase != DeployPhase::Building;
                self.begin_op(name, progress, reply, summary, true, VecDeque::new(), false);
                for line in lines {
                    self.progress(line);
                }
                if let Some(op) = self.op.as_mut() {
                    op.who = Some(run.record.who.clone());
                }
                if reused {
                    let tasks = !run.to.spec.release.tasks.is_empty();
                    let run_tasks = run.run_tasks && tasks;
                    if tasks && !run_tasks {
                        self.progress(format!(
                            "release tasks of {} not run again (`nonstop deploy --run-tasks` runs them)",
                            run.to.id
                        ));
                    }
                    self.deployment = Some(run);
                    if run_tasks {
                        self.set_phase(DeployPhase::ReleaseTasks);
                        self.spawn_tasks(false);
                    } else {
                        self.set_phase(DeployPhase::Rolling { index: 0 });
                    }
                    return;
                }
                self.deployment = Some(run);
                self.spawn_build();
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
        let DeployRequest { spec, source, base_env, message, who, run_tasks } = request;
        self.check_deploy(&spec, &source)?;
        let from = self.app.as_ref().filter(|rt| rt.record.running && rt.record.app == spec.app).map(|rt| rt.current());
        if let Some(from) = &from {
            if from.id.0 > 0 {
                let same =
                    self.store.release(&spec.app, from.id)?.is_some_and(|r| r.content_hash == hash && r.spec == spec);
                let same_env = self.app.as_ref().is_some_and(|rt| rt.record.base_env == base_env);
                if same && same_env {
                    return Ok(None);
                }
            }
        }
        // The proxy address must be usable before anything is built. A
        // running app keeps its listener until the new release is live; a
        // new address is only probed here.
        if spec.processes.iter().any(|p| p.kind == ProcessKind::Web) {
            let addr = spec.proxy.listen;
            match &from {
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
                    self.ingress.listen(&spec.proxy, &route).map_err(IngressError::into_engine)?;
                }
            }
        }
        // The release keeps the toml's counts; it runs the runtime's (or
        // the toml's where it changed one).
        let mut run_spec = spec.clone();
        let counts = self.count_spec(&mut run_spec, nonstop_plan::counts::Apply::Toml)?;
        if let Some(from) = &from {
            if let Some(rec) = self.identical_retained(&spec, &hash, from.id)? {
                return self
                    .prepare_reuse(rec, run_spec, counts, from.clone(), base_env, message, who, run_tasks)
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
        let order = rollout_order(from.as_ref().map(|f| &f.spec), &run_spec);
        let mut record = DeploymentRecord {
            id: 0,
            app: spec.app.clone(),
            environment: self.env.clone(),
            kind: "deploy".into(),
            from_release: from.as_ref().map(|f| f.id),
            to_release: id,
            phase: serde_json::to_value(DeployPhase::Building).unwrap_or_default(),
            status: DeploymentStatus::Running,
            reason: None,
            who,
            message,
            started_at: now,
            finished_at: None,
        };
        record.id = self.store.insert_deployment(&record)?;
        let summary = match &from {
            Some(f) => format!("{} → {id}", f.id),
            None => format!("first release {id}"),
        };
        self.event(
            &spec.app,
            "deploy",
            None,
            &format!("deployment #{} started: {summary} by {}", record.id, record.who),
        );
        let run = DeployRun {
            record,
            to: ReleaseCtx { id, spec: run_spec, workdir: source },
            from,
            phase: DeployPhase::Building,
            order,
            run_tasks: true,
            cancel: self.cancel.child_token(),
            started: self.clock.now(),
            base_env,
            post_failure: None,
            rollback_failed: false,
            cancelled: None,
            notes: Vec::new(),
            counts,
        };
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
        let deployments = self.store.deployments(&spec.app, &self.env, 10_000)?;
        let went_live =
            |id: ReleaseId| deployments.iter().any(|d| d.to_release == id && d.status == DeploymentStatus::Succeeded);
        Ok(self.store.releases(&spec.app)?.into_iter().rev().find(|r| {
            r.id != current
                && r.status == ReleaseStatus::Ready
                && r.content_hash == hash
                && &r.spec == spec
                && r.dir.is_dir()
                && went_live(r.id)
        }))
    }

    /// A deploy of the content of the retained release `rec`: rolled to as
    /// a rollback is (no build; its release tasks only with `run_tasks`).
    #[allow(clippy::too_many_arguments)]
    fn prepare_reuse(
        &mut self,
        rec: ReleaseRecord,
        run_spec: AppSpec,
        counts: super::counts::Counted,
        from: ReleaseCtx,
        base_env: BTreeMap<String, String>,
        message: Option<String>,
        who: String,
        run_tasks: bool,
    ) -> Result<(DeployRun, String), EngineError> {
        let target = rec.id;
        let to = ReleaseCtx { id: target, spec: run_spec, workdir: rec.dir.clone() };
        let order = rollout_order(Some(&from.spec), &to.spec);
        let phase = DeployPhase::Rolling { index: 0 };
        let now = self.clock.wall();
        let mut record = DeploymentRecord {
            id: 0,
            app: rec.app.clone(),
            environment: self.env.clone(),
            kind: "deploy".into(),
            from_release: Some(from.id),
            to_release: target,
            phase: serde_json::to_value(&phase).unwrap_or_default(),
            status: DeploymentStatus::Running,
            reason: None,
            who,
            message,
            started_at: now,
            finished_at: None,
        };
        record.id = self.store.insert_deployment(&record)?;
        let summary =
            format!("{} → {target}: content identical to {target}: rolling to {target} without building", from.id);
        self.event(
            &rec.app,
            "deploy",
            None,
            &format!("deployment #{} started: {summary} by {}", record.id, record.who),
        );
        Ok((
            DeployRun {
                record,
                to,
                from: Some(from),
                phase,
                order,
                run_tasks,
                cancel: self.cancel.child_token(),
                started: self.clock.now(),
                base_env,
                post_failure: None,
                rollback_failed: false,
                cancelled: None,
                notes: Vec::new(),
                counts,
            },
            summary,
        ))
    }

    pub(crate) fn begin_rollback(
        &mut self,
        release: Option<ReleaseId>,
        run_tasks: bool,
        who: String,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    ) {
        if let Some(err) = self.busy() {
            let _ = reply.send(Err(err));
            return;
        }
        if let Some(err) =
            self.app.as_ref().map(|rt| rt.record.app.clone()).filter(|_| run_tasks).and_then(|a| self.task_conflict(&a))
        {
            let _ = reply.send(Err(err));
            return;
        }
        match self.prepare_rollback(release, run_tasks, who.clone()) {
            Ok((run, summary)) => {
                self.begin_op("rollback", progress, reply, summary, true, VecDeque::new(), false);
                if let Some(op) = self.op.as_mut() {
                    op.who = Some(who);
                }
                let tasks = run.run_tasks && !run.to.spec.release.tasks.is_empty();
                self.deployment = Some(run);
                if tasks {
                    self.set_phase(DeployPhase::ReleaseTasks);
                    self.spawn_tasks(false);
                } else {
                    self.set_phase(DeployPhase::Rolling { index: 0 });
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn prepare_rollback(
        &mut self,
        release: Option<ReleaseId>,
        run_tasks: bool,
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
                    status_word(rec.status),
                    retained.join(", ")
                ),
            });
        }
        if !went_live(target) {
            return Err(EngineError::NoRollbackTarget {
                reason: format!("{target} never went live (its deployment failed); deploy a fixed version instead"),
            });
        }
        // A rollback keeps the runtime's counts.
        let mut spec = rec.spec.clone();
        let counts = self.count_spec(&mut spec, nonstop_plan::counts::Apply::Rollback)?;
        let to = ReleaseCtx { id: target, spec, workdir: rec.dir.clone() };
        let order = rollout_order(Some(&current.spec), &to.spec);
        let now = self.clock.wall();
        let mut record = DeploymentRecord {
            id: 0,
            app: app.clone(),
            environment: self.env.clone(),
            kind: "rollback".into(),
            from_release: Some(current.id),
            to_release: target,
            phase: serde_json::to_value(DeployPhase::Rolling { index: 0 }).unwrap_or_default(),
            status: DeploymentStatus::Running,
            reason: None,
            who,
            message: None,
            started_at: now,
            finished_at: None,
        };
        record.id = self.store.insert_deployment(&record)?;
        let summary = format!("{} → {target} (rollback)", current.id);
        self.event(&app, "rollback", None, &format!("deployment #{} started: {summary} by {}", record.id, record.who));
        let base_env = rt.record.base_env.clone();
        Ok((
            DeployRun {
                record,
                to,
                from: Some(current),
                phase: DeployPhase::Rolling { index: 0 },
                order,
                run_tasks,
                cancel: self.cancel.child_token(),
                started: self.clock.now(),
                base_env,
                post_failure: None,
                rollback_failed: false,
                cancelled: None,
                notes: Vec::new(),
                counts,
            },
            summary,
        ))
    }

    pub(crate) fn releases(&self) -> Result<Vec<ReleaseInfo>, EngineError> {
        let rt = self.app.as_ref().ok_or(EngineError::NotUp)?;
        let current = rt.record.release;
        Ok(self
            .store
            .releases(&rt.record.app)?
            .into_iter()
            .rev()
            .map(|r| ReleaseInfo {
                id: r.id.0,
                content_hash: r.content_hash,
                status: status_word(r.status).to_string(),
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
        Ok(self
            .store
            .deployments(&rt.record.app, &self.env, limit)?
            .into_iter()
            .map(|d| DeploymentInfo {
                id: d.id,
                kind: d.kind,
                from_release: d.from_release.map(|r| r.0),
                to_release: d.to_release.0,
                status: d.status.as_str().to_string(),
                phase: serde_json::from_value::<DeployPhase>(d.phase).map(|p| p.name().to_string()).unwrap_or_default(),
                reason: d.reason,
                who: d.who,
                message: d.message,
                started_at_ms: ms_since_epoch(d.started_at),
                finished_at_ms: d.finished_at.map(ms_since_epoch),
            })
            .collect())
    }

    // ------------------------------------------------------------ the steps

    /// Store the new phase, then make it the current one.
    fn set_phase(&mut self, phase: DeployPhase) {
        let Some(run) = self.deployment.as_mut() else { return };
        run.record.phase = serde_json::to_value(&phase).unwrap_or_default();
        if let Err(e) = self.store.update_deployment(&run.record) {
            tracing::error!("could not record deployment #{} phase: {e}", run.record.id);
        }
        run.phase = phase;
    }

    fn spawn_build(&mut self) {
        // Every build command is recorded before the build starts, and
        // with its process as soon as that exists (see `tasks.rs`).
        if let Err(reason) = self.record_build_commands() {
            self.finish_deploy(DeployPhase::Failed { reason });
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
                                    ..Progress::note(format!("build | {line}"))
                                });
                            }
                        }
                        BuildNote::Command { index, process } => {
                            let _ = notes.send(Internal::BuildCommand { deployment: id, index, process });
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

    pub(crate) fn deploy_on_built(&mut self, deployment: i64, result: Result<BuildOutput, String>) {
        self.finish_build_commands(deployment, result.as_ref().err());
        let Some(run) = self.deployment.as_mut().filter(|r| r.record.id == deployment) else { return };
        let app = run.to.spec.app.clone();
        let release = run.to.id;
        let build_ms = self.clock.now().saturating_duration_since(run.started).as_millis() as u64;
        let mut rec = match self.store.release(&app, release) {
            Ok(Some(r)) => r,
            _ => {
                self.finish_deploy(DeployPhase::Failed { reason: format!("the record of {release} is gone") });
                return;
            }
        };
        let cancelled = run.cancelled.clone();
        match result {
            Ok(out) if cancelled.is_none() => {
                rec.status = ReleaseStatus::Ready;
                rec.dir = out.dir.clone();
                rec.content_hash = out.content_hash.clone();
                rec.build_ms = build_ms;
                if let Err(e) = self.store.put_release(&rec) {
                    self.finish_deploy(DeployPhase::Failed { reason: format!("cannot record {release}: {e}") });
                    return;
                }
                run.to.workdir = out.dir.clone();
                let path_var =
                    run.base_env.get("PATH").cloned().unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
                let problems = crate::preflight::check_commands(&run.to.spec, &out.dir, &path_var);
                self.progress(format!(
                    "built {release}: {} files, {} KiB in {}",
                    out.files,
                    out.bytes / 1024,
                    fmt_dur(Duration::from_millis(build_ms))
                ));
                if !problems.is_empty() {
                    self.finish_deploy(DeployPhase::Failed {
                        reason: format!("{release} cannot run as specified:\n  {}", problems.join("\n  ")),
                    });
                    return;
                }
                self.publish_statics(&app);
                self.set_phase(DeployPhase::ReleaseTasks);
                self.spawn_tasks(false);
            }
            Ok(out) => {
                // Built, but cancelled meanwhile: kept on disk as a
                // release nothing runs (pruned in turn).
                rec.status = ReleaseStatus::Ready;
                rec.dir = out.dir;
                rec.content_hash = out.content_hash;
                rec.build_ms = build_ms;
                let _ = self.store.put_release(&rec);
                self.finish_deploy(DeployPhase::Failed { reason: cancelled.unwrap_or_default() });
            }
            Err(reason) => {
                rec.status = ReleaseStatus::Failed;
                let _ = self.store.put_release(&rec);
                let reason = cancelled.unwrap_or_else(|| format!("the build failed: {reason}"));
                self.finish_deploy(DeployPhase::Failed { reason });
            }
        }
    }

    /// Run `[release] tasks` (or `post_tasks`) one at a time through the
    /// driver, each recorded before it starts (see `tasks.rs`).
    fn spawn_tasks(&mut self, post: bool) {
        self.start_task(post, 0);
    }

    pub(crate) fn deploy_on_tasks(&mut self, deployment: i64, post: bool, result: Result<(), String>) {
        if self.deployment.as_ref().is_none_or(|r| r.record.id != deployment) {
            return;
        }
        let cancelled = self.deployment.as_ref().and_then(|r| r.cancelled.clone());
        match (post, result) {
            (false, _) if cancelled.is_some() => {
                self.finish_deploy(DeployPhase::Failed { reason: cancelled.unwrap_or_default() })
            }
            (false, Ok(())) => self.set_phase(DeployPhase::Rolling { index: 0 }),
            (false, Err(reason)) => self.finish_deploy(DeployPhase::Failed { reason }),
            (true, Ok(())) => self.finish_deploy(DeployPhase::Succeeded),
            (true, Err(reason)) => {
                // The release is live; report the failure without undoing it.
                if let Some(run) = self.deployment.as_mut() {
                    run.post_failure = Some(cancelled.unwrap_or(reason));
                }
                self.finish_deploy(DeployPhase::Succeeded);
            }
        }
    }

    /// Start what the current phase needs (called when no rollout runs).
    pub(crate) fn deploy_kick(&mut self) -> bool {
        let Some(run) = self.deployment.as_ref() else { return false };
        match run.phase.clone() {
            DeployPhase::Rolling { index } => {
                if index == 0 && run.from.is_none() {
                    // First release of this app: it becomes the app's record
                    // now, so that its processes have a home.
                    self.adopt_first_release();
                }
                let Some(run) = self.deployment.as_ref() else { return false };
                if index < run.order.len() {
                    let process = run.order[index].clone();
                    let to = run.to.clone();
                    self.start_rollout(&process, Some(to), false);
                    true
                } else {
                    self.set_phase(DeployPhase::PostTasks);
                    self.promote_target();
                    self.spawn_tasks(true);
                    true
                }
            }
            DeployPhase::RollingBack { reason, remaining } => {
                let Some(process) = remaining.first().cloned() else {
                    if run.rollback_failed {
                        self.finish_deploy(DeployPhase::Failed { reason });
                    } else {
                        self.finish_deploy(DeployPhase::RolledBack { reason });
                    }
                    return true;
                };
                match run.from.clone() {
                    Some(from) => self.start_rollout(&process, Some(from), false),
                    None => {
                        // A first deploy has nothing to go back to: stop it.
                        if let Some(rt) = self.app.as_mut() {
                            rt.record.running = false;
                            let _ = self.store.put_app(&rt.record, self.clock.wall());
                        }
                        self.start_rollout(&process, None, true);
                    }
                }
                true
            }
            _ => false,
        }
    }

    pub(crate) fn deploy_on_rollout(&mut self, result: RolloutResult) {
        let Some(run) = self.deployment.as_ref() else { return };
        match (run.phase.clone(), result) {
            (DeployPhase::Rolling { index }, RolloutResult::Done(p)) => match run.cancelled.clone() {
                // Finished just as it was cancelled: back from here.
                Some(reason) => {
                    let remaining: Vec<ProcessName> =
                        run.order[..(index + 1).min(run.order.len())].iter().rev().cloned().collect();
                    self.progress(format!("{p} rolled, but the {} was cancelled: rolling back", run.record.kind));
                    self.set_phase(DeployPhase::RollingBack { reason, remaining });
                }
                None => self.set_phase(DeployPhase::Rolling { index: index + 1 }),
            },
            (DeployPhase::Rolling { index }, RolloutResult::Failed(process, reason)) => {
                let remaining: Vec<ProcessName> =
                    run.order[..(index + 1).min(run.order.len())].iter().rev().cloned().collect();
                let reason = format!("{process}: {reason}");
                self.progress(format!("rolling back: {reason}"));
                self.set_phase(DeployPhase::RollingBack { reason, remaining });
            }
            (DeployPhase::RollingBack { reason, mut remaining }, RolloutResult::Done(p)) => {
                remaining.retain(|r| r != &p);
                self.set_phase(DeployPhase::RollingBack { reason, remaining });
            }
            (DeployPhase::RollingBack { reason, mut remaining }, RolloutResult::Failed(p, why)) => {
                // The previous release does not come up for this process
                // type either: it stays on the new release (which at least
                // started), the others go on rolling back, and the
                // deployment ends as failed, saying so.
                let to = run.to.clone();
                if let Some(rt) = self.app.as_mut() {
                    rt.targets.insert(p.clone(), to.clone());
                }
                self.progress(format!("rolling {p} back failed ({why}); it stays on {}", to.id));
                remaining.retain(|r| r != &p);
                let reason = format!("{reason}; rolling {p} back failed too ({why}), so {p} stays on {}", to.id);
                if let Some(run) = self.deployment.as_mut() {
                    run.rollback_failed = true;
                }
                self.set_phase(DeployPhase::RollingBack { reason, remaining });
            }
            _ => {}
        }
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
    }

    /// Every process now runs the new release: make it the app's record.
    fn promote_target(&mut self) {
        let Some(run) = self.deployment.as_ref() else { return };
        let to = run.to.clone();
        let base_env = run.base_env.clone();
        let Some(rt) = self.app.as_mut() else { return };
        if to.spec.processes.iter().any(|p| p.kind == ProcessKind::Web) && rt.record.spec.proxy != to.spec.proxy {
            if let Err(e) = self.ingress.listen(&to.spec.proxy, &rt.route) {
                tracing::error!("the proxy keeps its previous settings: {}", e.into_engine());
            }
        }
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
    }

    /// End the deployment in `phase`, answer the operation.
    fn finish_deploy(&mut self, phase: DeployPhase) {
        let Some(mut run) = self.deployment.take() else { return };
        run.cancel.cancel();
        let took = self.clock.now().saturating_duration_since(run.started);
        let (status, reason) = match &phase {
            DeployPhase::Succeeded => {
                (DeploymentStatus::Succeeded, run.post_failure.as_ref().map(|r| format!("live, but {r}")))
            }
            DeployPhase::RolledBack { reason } => (DeploymentStatus::RolledBack, Some(reason.clone())),
            DeployPhase::Failed { reason } => (DeploymentStatus::Failed, Some(reason.clone())),
            _ => (DeploymentStatus::Failed, Some("ended in an unexpected phase".to_string())),
        };
        let reason = run.reason_with_notes(reason);
        run.record.phase = serde_json::to_value(&phase).unwrap_or_default();
        run.record.status = status;
        run.record.reason = reason.clone();
        run.record.finished_at = Some(self.clock.wall());
        if let Err(e) = self.store.update_deployment(&run.record) {
            tracing::error!("could not record the end of deployment #{}: {e}", run.record.id);
        }
        let app = run.to.spec.app.clone();
        let release = run.to.id.to_string();
        match phase {
            DeployPhase::Succeeded => {
                if self.app.as_ref().is_some_and(|rt| rt.record.release != run.to.id) {
                    // Recovered after a restart during post tasks, before the
                    // record moved to the new release.
                    self.deployment = Some(run);
                    self.promote_target();
                    run = self.deployment.take().expect("just put back");
                }
                self.prune_releases(&app, &run);
                self.event(
                    &app,
                    "deployed",
                    None,
                    &format!("{release} is live ({} in {})", run.record.kind, fmt_dur(took)),
                );
                if let Some(op) = self.op.as_mut() {
                    op.summary = format!("{release} is live ({} took {})", run.record.kind, fmt_dur(took));
                }
                match run.post_failure.take() {
                    Some(reason) => self.fail_op(EngineError::PostTaskFailed { release, reason }),
                    None => self.finish_op(),
                }
            }
            DeployPhase::RolledBack { reason } => {
                if let Some(rt) = self.app.as_mut() {
                    rt.targets.clear();
                }
                self.publish_statics(&app);
                self.event(&app, "rolled-back", None, &format!("{release}: {reason}"));
                self.fail_op(EngineError::RolledBack { release, reason, first: run.from.is_none() });
            }
            DeployPhase::Failed { reason } => {
                if let Some(rt) = self.app.as_mut() {
                    if !run.rollback_failed {
                        rt.targets.clear();
                    }
                }
                self.publish_statics(&app);
                self.event(&app, "deploy-failed", None, &format!("{release}: {reason}"));
                self.fail_op(EngineError::DeployFailed { release, reason });
            }
            _ => {}
        }
    }

    /// Keep the newest `retain_releases` built releases, the running one and
    /// the one before it; delete the others from disk.
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
        let doomed: Vec<ReleaseRecord> =
            all.into_iter().filter(|r| r.status == ReleaseStatus::Ready && !keep.contains(&r.id)).collect();
        for mut r in doomed {
            r.status = ReleaseStatus::Pruned;
            if let Err(e) = self.store.put_release(&r) {
                tracing::warn!("could not record release {} as pruned, so it stays on disk: {e}", r.id);
                keep.push(r.id);
            }
        }
        self.publish_statics(app);
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
        let phase: DeployPhase = serde_json::from_value(record.phase.clone()).unwrap_or(DeployPhase::Building);
        let from = record.from_release.map(|_| rt.current());
        let Some(to_rec) = to_rec else {
            record.status = DeploymentStatus::Failed;
            record.reason = Some("its release is gone".into());
            record.finished_at = Some(self.clock.wall());
            self.store.update_deployment(&record)?;
            return Ok(());
        };
        let apply = if record.kind == "rollback" {
            nonstop_plan::counts::Apply::Rollback
        } else {
            nonstop_plan::counts::Apply::Toml
        };
        let mut spec = to_rec.spec.clone();
        let counts = self.count_spec(&mut spec, apply)?;
        let to = ReleaseCtx { id: to_rec.id, spec, workdir: to_rec.dir.clone() };
        let order = rollout_order(from.as_ref().map(|f| &f.spec), &to.spec);
        // The task it was in the middle of (and any other left running).
        let tasks = self.recover_tasks(&app, Some((record.id, &phase)))?;
        let next = phase.on_restart(&order, tasks.resume.as_ref().map(|(_, fate, _)| fate));
        if to_rec.status == ReleaseStatus::Building {
            let mut r = to_rec.clone();
            r.status = ReleaseStatus::Failed;
            self.store.put_release(&r)?;
        }
        tracing::warn!("deployment #{} was {} when the daemon stopped: now {}", record.id, phase.name(), next.name());
        let (progress, _) = mpsc::unbounded_channel();
        let (reply, _) = oneshot::channel();
        self.begin_op(
            if record.kind == "rollback" { "rollback" } else { "deploy" },
            progress,
            reply,
            "recovery".into(),
            true,
            VecDeque::new(),
            false,
        );
        if let Some(op) = self.op.as_mut() {
            op.reply = None;
            op.who = Some(format!("{} (recovering after a daemon restart)", record.who));
        }
        self.deployment = Some(DeployRun {
            record,
            to,
            from,
            phase: phase.clone(),
            order,
            run_tasks: false,
            cancel: self.cancel.child_token(),
            started: self.clock.now(),
            base_env,
            post_failure: None,
            rollback_failed: false,
            cancelled: None,
            notes: tasks.notes,
            counts,
        });
        match (next, tasks.resume) {
            (DeployPhase::Failed { reason }, _) => self.finish_deploy(DeployPhase::Failed { reason }),
            (DeployPhase::Succeeded, _) => self.finish_deploy(DeployPhase::Succeeded),
            (DeployPhase::ReleaseTasks | DeployPhase::PostTasks, Some((task, fate, handle))) => {
                self.resume_task(task, fate, handle)
            }
            (other, _) => self.set_phase(other),
        }
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
            serde_json::to_value(DeployPhase::Failed { reason: "daemon stopped".into() }).unwrap_or_default();
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
        if run.cancelled.is_some() {
            return Ok(OpReport { summary: format!("{what} is being cancelled already"), changed: false });
        }
        let summary = match run.phase.clone() {
            DeployPhase::Building | DeployPhase::ReleaseTasks => {
                run.cancelled = Some(why);
                run.cancel.cancel();
                format!("{what} cancelled while {}: nothing changed", run.phase.name())
            }
            DeployPhase::Rolling { index } => {
                run.cancelled = Some(why.clone());
                let from = run.from.as_ref().map_or("nothing (its first release)".to_string(), |f| f.id.to_string());
                let order = run.order.clone();
                let rolling = order.get(index).cloned();
                let ro = self.app.as_mut().and_then(|rt| rt.rollout.as_mut());
                match ro {
                    Some(ro) => ro.cancelled = Some(why),
                    None => {
                        // Between two process types: back from the last one.
                        let remaining: Vec<ProcessName> =
                            order[..index.min(order.len())].iter().rev().cloned().collect();
                        self.set_phase(DeployPhase::RollingBack { reason: why, remaining });
                    }
                }
                let rolling = rolling.map(|p| format!(" while rolling {p}")).unwrap_or_default();
                format!("{what} cancelled{rolling}: rolling back to {from}")
            }
            DeployPhase::PostTasks => {
                run.cancelled = Some(why);
                run.cancel.cancel();
                format!("{what}: post tasks stopped; {} stays live", run.to.id)
            }
            DeployPhase::RollingBack { .. } => {
                return Ok(OpReport { summary: format!("{what} is rolling back already"), changed: false });
            }
            DeployPhase::Succeeded | DeployPhase::Failed { .. } | DeployPhase::RolledBack { .. } => {
                return Ok(OpReport { summary: format!("{what} has ended; nothing to cancel"), changed: false });
            }
        };
        if let Some(app) = self.app.as_ref().map(|rt| rt.record.app.clone()) {
            self.event(&app, "cancel", None, &format!("{summary} (by {by})"));
        }
        self.progress(summary.clone());
        Ok(OpReport { summary, changed: true })
    }

    /// Describe the deployment in progress, for `status`.
    pub(crate) fn deployment_summary(&self) -> Option<String> {
        let run = self.deployment.as_ref()?;
        let detail = match run.phase.clone() {
            DeployPhase::Rolling { index } => {
                format!("rolling {}", run.order.get(index).map(|p| p.as_str()).unwrap_or(""))
            }
            DeployPhase::RollingBack { remaining, .. } => {
                format!("rolling back {}", remaining.first().map(|p| p.as_str()).unwrap_or(""))
            }
            p => p.name().to_string(),
        };
        Some(format!("{} #{} {} ({detail})", run.record.kind, run.record.id, run.to.id))
    }
}

fn status_word(s: ReleaseStatus) -> &'static str {
    match s {
        ReleaseStatus::Building => "building",
        ReleaseStatus::Ready => "ready",
        ReleaseStatus::Failed => "failed",
        ReleaseStatus::Pruned => "pruned",
    }
}
