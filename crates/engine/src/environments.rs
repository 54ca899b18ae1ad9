//! `nonstop env create` and `nonstop env destroy`: an environment brought
//! into being in one command, and ended in one.
//!
//! **Create.** A new environment is its first deploy: of the app
//! directory, built as any deploy (`deploy.rs`), or with `--from ENV` of
//! the release ENV runs, not built again, with the new environment's
//! config ([`with_config`]: the code, commands, build and release tasks
//! are the release's; variables, counts, checks, hosts and database the
//! new environment's). With `[base] postgres`, its database is made
//! before anything else, as a copy of ENV's with `--from` (`base.rs`). An
//! environment that exists (it has a record, even down, or an operation
//! under way) is refused. One that could not be created leaves no
//! controller behind (`env list` does not show it).
//!
//! **Destroy.** Refused for a `protected` environment and while another
//! operation runs. Every instance is stopped (`down`), its route and host
//! claims go, and, with `--drop-database` naming the environment's
//! database again, its database and role are dropped; then the store
//! forgets what would bring it back ([`nonstop_store::Store::forget_environment`])
//! and the dispatcher forgets its controller. Its deployments, events,
//! releases, secrets and Redis number stay; a database not dropped stays
//! for a later environment of the same name.

use super::base::{BaseServiceError, DroppedDatabase, Waiting};
use super::deploy::{DeployRequest, DeployRun};
use super::*;
use nonstop_core::database::DatabaseUrl;
use nonstop_plan::deployment::{DeploymentKind, Event, GateMode};
use nonstop_store::{ReleaseRecord, ReleaseStatus};

/// `nonstop env create NAME [--from ENV]`.
#[derive(Debug, Clone)]
pub struct CreateEnvironment {
    /// The spec resolved for the new environment (its `[base]` included).
    pub spec: AppSpec,
    /// The app directory (built, without `from`).
    pub source: PathBuf,
    pub base_env: BTreeMap<String, String>,
    pub who: String,
    /// Start with the release this environment runs (its database copied,
    /// with base services).
    pub from: Option<EnvironmentId>,
}

/// `nonstop env destroy NAME --drop-database DATABASE`.
#[derive(Debug, Clone)]
pub struct DropDatabase {
    /// The database's name, typed again.
    pub typed: String,
    /// `[base] postgres`, to drop it on (`None`: the spec has none).
    pub admin: Option<DatabaseUrl>,
}

/// `env` requests, to a controller.
pub(crate) enum EnvRequest {
    Create {
        request: Box<DeployRequest>,
        from: Option<(EnvironmentId, ReleaseId)>,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    /// Answered with the app and environment destroyed (the dispatcher
    /// forgets its controller).
    Destroy {
        who: String,
        drop_database: Option<Box<DropDatabase>>,
        progress: ProgressTx,
        reply: Reply<(OpReport, AppEnv)>,
    },
    /// Whether the environment exists (a record, or an operation under way).
    Exists { reply: Reply<bool> },
}

impl EnvRequest {
    /// The app a create brings.
    pub(crate) fn brings_app(&self) -> Option<&AppName> {
        match self {
            EnvRequest::Create { request, .. } => Some(&request.spec.app),
            _ => None,
        }
    }
}

/// A destroy under way.
pub(crate) struct Destroying {
    who: String,
    since: SystemTime,
    /// Drop the database on this server once every instance is gone.
    drop: Option<DatabaseUrl>,
    progress: ProgressTx,
    reply: Option<Reply<(OpReport, AppEnv)>>,
    stopped: usize,
}

/// The ends of a destroy's steps, back on the controller.
pub(crate) enum EnvEvent {
    Stopped { result: Result<OpReport, EngineError> },
    Dropped { result: Result<DroppedDatabase, BaseServiceError> },
}

/// The spec release `release` (of another environment) runs with in an
/// environment configured by `config`: the release's code and what belongs
/// to it (each process's command and kind, its build and `[release]`
/// tasks, `[static]`), everything else the environment's (variables, each
/// process's count, environment, checks and rollout, the proxy, hosts,
/// database, protection). A process type `config` does not have runs as
/// the release has it. Pure.
pub fn with_config(release: &AppSpec, config: &AppSpec) -> AppSpec {
    let mut spec = config.clone();
    spec.build = release.build.clone();
    spec.release = release.release.clone();
    spec.statics = release.statics.clone();
    spec.processes = release
        .processes
        .iter()
        .map(|p| match config.process(&p.name) {
            Some(c) => ProcessSpec { command: p.command.clone(), kind: p.kind, ..c.clone() },
            None => p.clone(),
        })
        .collect();
    spec
}

impl EngineHandle {
    /// `nonstop env create`: the environment this handle addresses, new,
    /// deployed from `request` (see the module doc); answers once it
    /// serves.
    pub async fn create_environment(
        &self,
        request: CreateEnvironment,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        let CreateEnvironment { spec, source, base_env, who, from } = request;
        let env = self.environment().clone();
        let app = spec.app.clone();
        let target = self.scoped(Some(app.clone()), Some(env.clone()));
        let from = match from {
            None => None,
            Some(from) if from == env => {
                return Err(EngineError::CannotDeploy {
                    reason: format!("an environment cannot be created from itself (`{env}`); name another with --from"),
                })
            }
            Some(from) => {
                let source = self.scoped(Some(app.clone()), Some(from.clone()));
                let release = match source.status().await {
                    Ok(st) if st.release > 0 => ReleaseId(st.release),
                    Ok(_) | Err(EngineError::NotUp) => {
                        return Err(EngineError::CannotDeploy {
                            reason: format!(
                                "environment `{from}` of {app} runs no release to start from (it is down, or was \
                                 started by `up` without a deploy); deploy it first, or create `{env}` without --from"
                            ),
                        })
                    }
                    Err(e) => return Err(e),
                };
                Some((from, release))
            }
        };
        let options = DeployOptions::default();
        let message = from.as_ref().map(|(f, r)| format!("env create {env} --from {f} ({r})"));
        let request = Box::new(DeployRequest { spec, source, base_env, message, who, options });
        let result = target.ask(|reply| Command::Env(EnvRequest::Create { request, from, progress, reply })).await;
        if result.is_err() {
            // One that could not be created leaves no controller behind:
            // the dispatcher forgets one of which nothing was recorded, and
            // this one too if it has only the history of an environment of
            // the same name destroyed before.
            let exists = target.ask(|reply| Command::Env(EnvRequest::Exists { reply })).await;
            if matches!(exists, Ok(false)) {
                target.forget(&AppEnv::new(app, env));
            }
        }
        result
    }

    /// `nonstop env destroy`: stop the environment this handle addresses,
    /// release its hosts, drop its database if asked, and forget it (see
    /// the module doc).
    pub async fn destroy_environment(
        &self,
        who: String,
        drop_database: Option<DropDatabase>,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        let (report, scope) = self
            .ask(|reply| {
                Command::Env(EnvRequest::Destroy { who, drop_database: drop_database.map(Box::new), progress, reply })
            })
            .await?;
        // The controller is done with: the dispatcher forgets it, and it
        // ends with its inbox.
        self.forget(&scope);
        Ok(report)
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    pub(crate) fn on_env(&mut self, request: EnvRequest) {
        match request {
            EnvRequest::Create { request, from, progress, reply } => self.on_create(*request, from, progress, reply),
            EnvRequest::Destroy { who, drop_database, progress, reply } => {
                self.begin_destroy(who, drop_database, progress, reply)
            }
            EnvRequest::Exists { reply } => {
                let _ = reply.send(Ok(self.environment_exists()));
            }
        }
    }

    /// A record (even down), or an operation under way, or a task (of an
    /// earlier daemon) it watches.
    fn environment_exists(&self) -> bool {
        self.app.is_some()
            || self.deployment.is_some()
            || self.pending_deploy.is_some()
            || self.pending_base.is_some()
            || self.op.is_some()
            || !self.live_tasks.is_empty()
    }

    fn on_create(
        &mut self,
        request: DeployRequest,
        from: Option<(EnvironmentId, ReleaseId)>,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    ) {
        if self.environment_exists() {
            let detail = match &self.app {
                Some(rt) if rt.record.running && rt.record.release.0 > 0 => format!(" (running {})", rt.record.release),
                Some(rt) if rt.record.running => " (running)".to_string(),
                Some(_) => " (down)".to_string(),
                None => " (being deployed)".to_string(),
            };
            let _ = reply.send(Err(EngineError::EnvironmentExists {
                app: request.spec.app.to_string(),
                env: self.env.to_string(),
                detail,
            }));
            return;
        }
        let Some((from, release)) = from else {
            let _ = progress
                .send(Progress::note(format!("creating environment {}: deploying the app directory", self.env)));
            self.begin_deploy(request, progress, reply);
            return;
        };
        // What can be checked at once, before the base services make
        // anything.
        let checks = self
            .busy()
            .or_else(|| self.task_conflict(&request.spec.app))
            .map(Err)
            .unwrap_or_else(|| self.refresh_secrets())
            .and_then(|()| self.release_to_start(&request.spec.app, release, &from).map(drop));
        if let Err(e) = checks {
            let _ = reply.send(Err(e));
            return;
        }
        let _ = progress.send(Progress::note(format!(
            "creating environment {} from {from}: {release}, the release {from} runs (no build)",
            self.env
        )));
        let waiting = Waiting::CreateFrom { request, from, release, progress, reply };
        if let Some(Waiting::CreateFrom { request, from, release, progress, reply }) = self.hold_for_base(waiting) {
            self.create_from_release(request, from, release, progress, reply);
        }
    }

    /// A retained, built release that can run here.
    fn release_to_start(
        &self,
        app: &AppName,
        release: ReleaseId,
        from: &EnvironmentId,
    ) -> Result<ReleaseRecord, EngineError> {
        let rec = self.store.release(app, release)?.filter(|r| r.status == ReleaseStatus::Ready && r.dir.is_dir());
        rec.ok_or_else(|| EngineError::CannotDeploy {
            reason: format!(
                "{release}, which `{from}` runs, is not a retained release on disk; deploy the app directory instead \
                 (`nonstop env create {} ` without --from)",
                self.env
            ),
        })
    }

    /// `env create --from`: the first deployment of this environment, to
    /// `release` (not built again) with the spec's config.
    pub(crate) fn create_from_release(
        &mut self,
        request: DeployRequest,
        from: EnvironmentId,
        release: ReleaseId,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    ) {
        match self.prepare_create_from(request, &from, release) {
            Ok((run, summary)) => {
                let lines = run.counts.lines.clone();
                let who = run.record.who.clone();
                self.begin_op("deploy", progress, reply, summary, true, VecDeque::new(), false);
                for line in lines {
                    self.progress(line);
                }
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

    fn prepare_create_from(
        &mut self,
        request: DeployRequest,
        from: &EnvironmentId,
        release: ReleaseId,
    ) -> Result<(DeployRun, String), EngineError> {
        let DeployRequest { spec, base_env, message, who, .. } = request;
        let rec = self.release_to_start(&spec.app, release, from)?;
        let mut run_spec = with_config(&rec.spec, &spec);
        let counts = self.count_spec(&mut run_spec, nonstop_plan::counts::Apply::Toml)?;
        if run_spec.processes.iter().any(|p| p.kind == ProcessKind::Web) {
            let route = route_key(&spec.app, &self.env);
            self.expose(&run_spec, &route)?;
        }
        let record = self.insert_deployment(
            spec.app.clone(),
            nonstop_store::DeploymentKind::Deploy,
            None,
            release,
            who,
            message,
        )?;
        let summary = format!("first release {release}, the one {from} runs (not built again)");
        self.event(
            &spec.app,
            "deploy",
            None,
            &format!("deployment #{} started: {summary} by {}", record.id, record.who),
        );
        let to = ReleaseCtx { id: release, spec: run_spec, workdir: rec.dir.clone() };
        // Its release tasks run (on its own database, which may be a copy).
        let kind = DeploymentKind::Reuse { run_tasks: true };
        let (cancel, started) = (self.cancel.child_token(), self.clock.now());
        let run = DeployRun::new(record, to, None, kind, base_env, counts, cancel, started, GateMode::Off);
        Ok((run, summary))
    }

    /// Starts `env destroy` (a refusal is answered at once).
    fn begin_destroy(
        &mut self,
        who: String,
        drop_database: Option<Box<DropDatabase>>,
        progress: ProgressTx,
        reply: Reply<(OpReport, AppEnv)>,
    ) {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        let refuse = |reply: Reply<(OpReport, AppEnv)>, e: EngineError| {
            let _ = reply.send(Err(e));
        };
        if self.app.as_ref().is_some_and(|rt| rt.record.spec.protected) {
            return refuse(reply, EngineError::Protected { app: app.to_string(), env: env.to_string() });
        }
        if let Some(e) = self.busy() {
            return refuse(reply, e);
        }
        let drop = match drop_database {
            None => None,
            Some(d) => {
                let database = self.base.database_name(&app, &env);
                if d.typed.trim() != database {
                    return refuse(reply, EngineError::DropNotConfirmed { database, typed: d.typed });
                }
                match d.admin {
                    Some(admin) => Some(admin),
                    None => {
                        return refuse(
                            reply,
                            EngineError::Base {
                                reason: format!(
                                    "--drop-database drops {database} on the server [base] postgres names, and the \
                                     spec has no [base] postgres; add it to nonstop.toml (or drop the database \
                                     yourself); nothing was changed"
                                ),
                                bad_input: true,
                            },
                        )
                    }
                }
            }
        };
        let stopped = self.app.as_ref().map_or(0, |rt| rt.instances.len());
        self.destroying = Some(Destroying {
            who: who.clone(),
            since: self.clock.wall(),
            drop,
            progress: progress.clone(),
            reply: Some(reply),
            stopped,
        });
        self.event(&app, "destroy", None, &format!("env destroy by {who}: stopping {stopped} instance(s)"));
        if self.app.is_none() {
            self.on_env_event(EnvEvent::Stopped { result: Ok(OpReport { summary: String::new(), changed: false }) });
            return;
        }
        match self.down() {
            Ok(summary) => {
                let (tx, rx) = oneshot::channel();
                self.begin_op("destroy", progress, tx, summary, true, VecDeque::new(), true);
                let events = self.events_tx.clone();
                self.tasks.spawn(async move {
                    let result = rx.await.unwrap_or(Err(EngineError::ShuttingDown));
                    let _ = events.send(Internal::Env(EnvEvent::Stopped { result }));
                });
            }
            Err(e) => self.destroy_failed(e),
        }
    }

    pub(crate) fn on_env_event(&mut self, event: EnvEvent) {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        match event {
            EnvEvent::Stopped { result: Err(e) } => self.destroy_failed(e),
            EnvEvent::Stopped { result: Ok(_) } => {
                let Some(admin) = self.destroying.as_ref().and_then(|d| d.drop.clone()) else {
                    self.finish_destroy(None);
                    return;
                };
                let database = self.base.database_name(&app, &env);
                if let Some(d) = &self.destroying {
                    let _ = d.progress.send(Progress::note(format!(
                        "env destroy: dropping database {database} and its role on {}:{}",
                        admin.host(),
                        admin.port()
                    )));
                }
                let (services, events, cancel) = (self.base.clone(), self.events_tx.clone(), self.cancel.clone());
                self.tasks.spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        result = services.drop_database(admin, app, env) => {
                            let _ = events.send(Internal::Env(EnvEvent::Dropped { result }));
                        }
                    }
                });
            }
            EnvEvent::Dropped { result: Ok(dropped) } => self.finish_destroy(Some(dropped)),
            EnvEvent::Dropped { result: Err(e) } => {
                let database = self.base.database_name(&app, &env);
                self.destroy_failed(EngineError::Base {
                    reason: format!(
                        "{app} in {env} is stopped and its hosts are released, but dropping database {database} \
                         failed: {e}\nthe environment is kept (down); run `nonstop env destroy {env} \
                         --drop-database {database}` again"
                    ),
                    bad_input: e.bad_input,
                });
            }
        }
    }

    fn destroy_failed(&mut self, e: EngineError) {
        if let Some(reply) = self.destroying.take().and_then(|d| d.reply) {
            let _ = reply.send(Err(e));
        }
    }

    /// Every instance is gone (and the database, if asked): forget the
    /// environment, answer. The controller refuses everything from here
    /// until the dispatcher forgets it.
    fn finish_destroy(&mut self, dropped: Option<DroppedDatabase>) {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        if let Err(e) = self.store.forget_environment(&app, &env) {
            self.destroy_failed(e.into());
            return;
        }
        let kept = self.launch_secrets().ok().and_then(|l| l.base_database_url().map(|u| u.database().to_string()));
        let Some(d) = self.destroying.as_mut() else { return };
        let mut summary = format!(
            "environment {env} of {app} destroyed: {} instance(s) stopped, its routes and hosts released; its \
             history is kept",
            d.stopped
        );
        match (dropped, kept) {
            (Some(dropped), _) => summary.push_str(&format!(
                "; database {} {} and its role {}",
                dropped.database,
                if dropped.database_dropped { "dropped" } else { "was not there" },
                if dropped.role_dropped { "dropped" } else { "was not there" }
            )),
            (None, Some(db)) => summary.push_str(&format!(
                "; database {db} kept (`nonstop env create {env}` uses it again; `--drop-database {db}` drops it)"
            )),
            (None, None) => {}
        }
        let who = d.who.clone();
        let reply = d.reply.take();
        self.event(&app, "destroy", None, &format!("{summary} (by {who})"));
        self.app = None;
        if let Some(reply) = reply {
            let _ = reply.send(Ok((OpReport { summary, changed: true }, self.scope.clone())));
        }
    }

    /// The destroy's part of `busy`: while it runs, and after it (until the
    /// controller ends).
    pub(crate) fn destroy_busy(&self) -> Option<EngineError> {
        let d = self.destroying.as_ref()?;
        Some(EngineError::Busy { operation: format!("env destroy by {}", d.who), since: fmt_wall(d.since) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_testkit::spec::app;
    use proptest::prelude::*;

    #[test]
    fn the_release_brings_its_code_and_the_environment_its_config() {
        let release = app("blog")
            .web("web", 2)
            .worker("worker", 1)
            .with("web", |p| p.command = "gunicorn v1".into())
            .env("STAGE", "staging")
            .release_tasks(&["migrate"], std::time::Duration::from_secs(60))
            .build();
        let config = app("blog")
            .web("web", 4)
            .singleton("beat")
            .with("web", |p| p.command = "gunicorn v2-in-the-directory".into())
            .env("STAGE", "review")
            .database("postgres://blog_review@db/blog_review")
            .build();
        let spec = with_config(&release, &config);
        let names: Vec<&str> = spec.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web", "worker"], "the release's process types");
        assert_eq!((spec.processes[0].command.as_str(), spec.processes[0].count), ("gunicorn v1", 4));
        assert_eq!(spec.processes[1], release.processes[1]);
        assert_eq!(spec.release.tasks, ["migrate"]);
        assert_eq!(spec.env["STAGE"], "review");
        assert_eq!(spec.database, config.database);
    }

    fn process_names() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-d]", 0..4).prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #[test]
        fn code_from_the_release_config_from_the_environment(
            release_names in process_names(),
            config_names in process_names(),
            counts in proptest::collection::vec(0u32..5, 4),
            stage in "[a-z]{1,6}",
        ) {
            let mut r = app("blog").env("STAGE", "release");
            for (i, n) in release_names.iter().enumerate() {
                let command = format!("run-{n}-release");
                r = r.worker(n, counts[i % counts.len()]).with(n, |p| p.command = command);
            }
            let mut c = app("blog").env("STAGE", &stage);
            for n in &config_names {
                c = c.web(n, 7).with(n, |p| p.command = format!("run-{n}-config"));
            }
            let (release, config) = (r.build(), c.build());
            let spec = with_config(&release, &config);
            prop_assert_eq!(spec.processes.len(), release.processes.len());
            for (p, r) in spec.processes.iter().zip(&release.processes) {
                prop_assert_eq!(&p.name, &r.name);
                prop_assert_eq!(&p.command, &r.command);
                prop_assert_eq!(p.kind, r.kind);
                let expected = if config.process(&p.name).is_some() { 7 } else { r.count };
                prop_assert_eq!(p.count, expected);
            }
            prop_assert_eq!(&spec.env, &config.env);
            prop_assert_eq!(&spec.release, &release.release);
            prop_assert_eq!(&spec.hosts, &config.hosts);
        }
    }
}
