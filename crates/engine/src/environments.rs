//! `nonstop env create` and `nonstop env destroy`: an environment brought
//! into being in one command, and ended in one.
//!
//! **Create.** A new environment is its first deploy: of the app
//! directory, built as any deploy (`deploy.rs`), or with `--from ENV` a
//! promotion (`promote.rs`) of the release ENV runs, not built again, with
//! the new environment's spec and config. With `[base] postgres`, its
//! database is made before anything else, as a copy of ENV's with `--from`
//! (`base.rs`). An environment that exists (it has a record, even down, or
//! an operation under way) is refused. One that could not be created
//! leaves no controller behind (`env list` does not show it).
//!
//! **Destroy.** Refused for a `protected` environment and while another
//! operation runs. Persist, then act: the destroy is recorded first
//! ([`nonstop_store::Store::begin_destroy`], with whether it drops the
//! environment's data); then every instance is stopped (`down`: the app
//! record says down before anything stops), its route and host claims go,
//! and, with `--drop-database` naming the environment's database again,
//! its database and role are dropped and its Redis data removed (its own
//! database emptied, or its keys in the shared one deleted); then, in one
//! transaction, the store forgets what would bring it back: its app
//! record, its secrets and config, the destroy's record, and the Redis
//! numbers it emptied ([`nonstop_store::Store::forget_environment`]); the
//! dispatcher forgets its controller. Every step can be done again, so a
//! destroy that failed half way (or whose daemon died) is finished by the
//! next `env destroy`, which goes on with the drop that was confirmed;
//! until then the environment refuses everything else
//! ([`EngineError::Destroying`]). Its deployments, events and releases
//! stay; without `--drop-database` its database stays for a later
//! environment of the same name, and so does its Redis number (with its
//! data).

use super::base::{BaseServiceError, DroppedDatabase, FlushedRedis, Waiting};
use super::deploy::DeployRequest;
use super::promote::{check_build, PromoteCommand, PromoteRequest};
use super::*;
use nonstop_core::database::DatabaseUrl;
use nonstop_core::environment::{BaseSpec, RedisUrl};

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

/// `nonstop env destroy NAME [--drop-database DATABASE]`.
#[derive(Debug, Clone)]
pub struct DestroyEnvironment {
    pub who: String,
    /// `--drop-database`: the environment's database named again.
    pub drop_database: Option<String>,
    /// `[base]` of the app's nonstop.toml: the servers its database is
    /// dropped and its Redis data removed on (with `--drop-database`, or
    /// to finish a destroy begun with it).
    pub base: BaseSpec,
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
    Destroy { request: Box<DestroyEnvironment>, progress: ProgressTx, reply: Reply<(OpReport, AppEnv)> },
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
    /// Once every instance is gone: drop the database on this server...
    drop_postgres: Option<DatabaseUrl>,
    /// ...and remove the Redis data: database `number` of this server.
    flush_redis: Option<(RedisUrl, u8)>,
    progress: ProgressTx,
    reply: Option<Reply<(OpReport, AppEnv)>>,
    stopped: usize,
    /// What the steps did, for the summary.
    dropped: Option<DroppedDatabase>,
    flushed: Option<FlushedRedis>,
}

/// The ends of a destroy's steps, back on the controller.
pub(crate) enum EnvEvent {
    Stopped { result: Result<OpReport, EngineError> },
    Dropped { result: Result<DroppedDatabase, BaseServiceError> },
    Flushed { result: Result<FlushedRedis, BaseServiceError> },
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
                // The release the source runs, as `promote` asks for it
                // (refused when it runs none, or is between two); checked
                // against this spec before the new environment is asked
                // for (which would bring it into being).
                let source = self.scoped(Some(app.clone()), Some(from.clone()));
                let built = source.ask(|reply| Command::Promote(Box::new(PromoteCommand::Source { reply }))).await?;
                check_build(&built, &spec, &from)?;
                Some((from, built.id))
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
    /// release its hosts, drop its data if asked, and forget it (see the
    /// module doc).
    pub async fn destroy_environment(
        &self,
        request: DestroyEnvironment,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        let (report, scope) =
            self.ask(|reply| Command::Env(EnvRequest::Destroy { request: Box::new(request), progress, reply })).await?;
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
            EnvRequest::Destroy { request, progress, reply } => self.begin_destroy(*request, progress, reply),
            EnvRequest::Exists { reply } => {
                let _ = reply.send(Ok(self.environment_exists()));
            }
        }
    }

    /// A record (even down), or an operation under way, or a task (of an
    /// earlier daemon) it watches, or a destroy to finish.
    fn environment_exists(&self) -> bool {
        self.app.is_some()
            || matches!(self.destroy_busy(), Some(EngineError::Destroying { .. }))
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
        if let Some(e @ EngineError::Destroying { .. }) = self.destroy_busy() {
            let _ = reply.send(Err(e));
            return;
        }
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
            .and_then(|()| {
                let rec =
                    self.store.release(&request.spec.app, release)?.ok_or_else(|| EngineError::CannotPromote {
                        reason: format!(
                            "the record of {release}, which `{from}` runs, is gone; deploy to `{from}` again"
                        ),
                    })?;
                check_build(&rec, &request.spec, &from)
            });
        if let Err(e) = checks {
            let _ = reply.send(Err(e));
            return;
        }
        let _ = progress.send(Progress::note(format!(
            "creating environment {} from {from}: {release}, the release {from} runs (not built again)",
            self.env
        )));
        let DeployRequest { spec, base_env, message, who, .. } = request;
        let request = Box::new(PromoteRequest { from, spec, base_env, message, who });
        let waiting = Waiting::Promote { release, request, copy: true, progress, reply };
        if let Some(Waiting::Promote { release, request, progress, reply, .. }) = self.hold_for_base(waiting) {
            self.begin_promote(release, *request, progress, reply);
        }
    }

    /// Starts `env destroy` (a refusal is answered at once), or goes on
    /// with one that did not finish.
    fn begin_destroy(&mut self, request: DestroyEnvironment, progress: ProgressTx, reply: Reply<(OpReport, AppEnv)>) {
        match self.plan_destroy(request, &progress) {
            Ok(destroying) => self.start_destroy(destroying, progress, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The checks (nothing changed when one refuses), then the destroy
    /// recorded: what it stops and drops.
    fn plan_destroy(&mut self, request: DestroyEnvironment, progress: &ProgressTx) -> Result<Destroying, EngineError> {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        let DestroyEnvironment { who, drop_database, base } = request;
        if self.app.as_ref().is_some_and(|rt| rt.record.spec.protected) {
            return Err(EngineError::Protected { app: app.to_string(), env: env.to_string() });
        }
        match self.busy() {
            // An unfinished destroy is what this one finishes.
            None | Some(EngineError::Destroying { .. }) => {}
            Some(e) => return Err(e),
        }
        let database = self.base.database_name(&app, &env);
        if let Some(typed) = &drop_database {
            if typed.trim() != database {
                return Err(EngineError::DropNotConfirmed { database, typed: typed.clone() });
            }
        }
        let pending = self.store.pending_destroy(&app, &env)?;
        let drop = drop_database.is_some() || pending.as_ref().is_some_and(|p| p.drop_data);
        if drop && base.postgres.is_none() && base.redis.is_none() {
            let why = match (&drop_database, &pending) {
                (None, Some(p)) => format!(
                    "the destroy {} began at {} drops the environment's database and Redis data",
                    p.who,
                    fmt_wall(p.started_at)
                ),
                _ => format!("--drop-database drops {database} and the environment's Redis data"),
            };
            return Err(EngineError::Base {
                reason: format!(
                    "{why} on the servers [base] names, and no [base] postgres or redis was given; run the \
                     command in the app's directory (or give -f FILE), or drop them yourself; nothing was changed"
                ),
                bad_input: true,
            });
        }
        let flush_redis = match base.redis.filter(|_| drop) {
            None => None,
            Some(url) => self.store.redis_assignment(&url.server(), &app, &env)?.map(|n| (url, n)),
        };
        // Persist, then act.
        let begun = self.store.begin_destroy(&app, &env, drop, &who, self.clock.wall())?;
        if pending.is_some() {
            let _ = progress.send(Progress::note(format!(
                "env destroy: finishing the destroy {} began at {}{}",
                begun.who,
                fmt_wall(begun.started_at),
                if begun.drop_data { " (with --drop-database)" } else { "" }
            )));
        }
        Ok(Destroying {
            who,
            since: self.clock.wall(),
            drop_postgres: base.postgres.filter(|_| drop),
            flush_redis,
            progress: progress.clone(),
            reply: None,
            stopped: self.app.as_ref().map_or(0, |rt| rt.instances.len()),
            dropped: None,
            flushed: None,
        })
    }

    /// Stop every instance, then go on with [`Self::next_destroy_step`].
    fn start_destroy(&mut self, mut destroying: Destroying, progress: ProgressTx, reply: Reply<(OpReport, AppEnv)>) {
        let app = self.scope.app.clone();
        destroying.reply = Some(reply);
        let (who, stopped) = (destroying.who.clone(), destroying.stopped);
        self.destroying = Some(destroying);
        self.event(&app, EventKind::Destroy, None, &format!("env destroy by {who}: stopping {stopped} instance(s)"));
        if self.app.is_none() {
            self.next_destroy_step();
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
        let again = format!(
            "the environment is kept (down), its destroy recorded; run `nonstop env destroy {env}` again (in the \
             app's directory) to finish it"
        );
        match event {
            EnvEvent::Stopped { result: Err(e) } => self.destroy_failed(e),
            EnvEvent::Stopped { result: Ok(_) } => self.next_destroy_step(),
            EnvEvent::Dropped { result: Ok(dropped) } => {
                if let Some(d) = self.destroying.as_mut() {
                    d.dropped = Some(dropped);
                }
                self.next_destroy_step();
            }
            EnvEvent::Dropped { result: Err(e) } => {
                let database = self.base.database_name(&app, &env);
                self.destroy_failed(EngineError::Base {
                    reason: format!(
                        "{app} in {env} is stopped and its hosts are released, but dropping database {database} \
                         failed: {e}\n{again}"
                    ),
                    bad_input: e.bad_input,
                });
            }
            EnvEvent::Flushed { result: Ok(flushed) } => {
                if let Some(d) = self.destroying.as_mut() {
                    d.flushed = Some(flushed);
                }
                self.next_destroy_step();
            }
            EnvEvent::Flushed { result: Err(e) } => self.destroy_failed(EngineError::Base {
                reason: format!(
                    "{app} in {env} is stopped and its hosts are released, but removing its Redis data failed: \
                     {e}\n{again}"
                ),
                bad_input: e.bad_input,
            }),
        }
    }

    /// Every instance is gone: drop the database, then remove the Redis
    /// data (each a step off the controller that reports back), then
    /// forget the environment.
    fn next_destroy_step(&mut self) {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        let Some(d) = self.destroying.as_mut() else { return };
        let (services, events, cancel) = (self.base.clone(), self.events_tx.clone(), self.cancel.clone());
        if let Some(admin) = d.drop_postgres.take() {
            let database = services.database_name(&app, &env);
            let _ = d.progress.send(Progress::note(format!(
                "env destroy: dropping database {database} and its role on {}:{}",
                admin.host(),
                admin.port()
            )));
            self.tasks.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    result = services.drop_database(admin, app, env) => {
                        let _ = events.send(Internal::Env(EnvEvent::Dropped { result }));
                    }
                }
            });
            return;
        }
        if let Some((url, number)) = d.flush_redis.take() {
            let what = match number {
                0 => format!("deleting the keys {app}:{env}:* of the shared Redis database 0"),
                n => format!("emptying Redis database {n}"),
            };
            let _ = d.progress.send(Progress::note(format!("env destroy: {what} on {}", url.server())));
            self.tasks.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    result = services.flush_redis(url, number, app, env) => {
                        let _ = events.send(Internal::Env(EnvEvent::Flushed { result }));
                    }
                }
            });
            return;
        }
        self.finish_destroy();
    }

    fn destroy_failed(&mut self, e: EngineError) {
        if let Some(reply) = self.destroying.take().and_then(|d| d.reply) {
            let _ = reply.send(Err(e));
        }
    }

    /// Every instance is gone (and the data, if asked): forget the
    /// environment, answer. The controller refuses everything from here
    /// until the dispatcher forgets it.
    fn finish_destroy(&mut self) {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        // What stays, read before it is forgotten.
        let kept_database =
            self.launch_secrets().ok().and_then(|l| l.base_database_url().map(|u| u.database().to_string()));
        let numbers = match self.store.redis_assignments_of(&app, &env) {
            Ok(n) => n,
            Err(e) => return self.destroy_failed(e.into()),
        };
        let Some(d) = self.destroying.as_ref() else { return };
        let freed: Vec<String> = d.flushed.iter().map(|f| f.server.clone()).collect();
        if let Err(e) = self.store.forget_environment(&app, &env, &freed) {
            self.destroy_failed(e.into());
            return;
        }
        let Some(d) = self.destroying.as_mut() else { return };
        let mut summary = format!(
            "environment {env} of {app} destroyed: {} instance(s) stopped, its routes and hosts released, its \
             secrets and config removed; its history is kept",
            d.stopped
        );
        match (&d.dropped, kept_database) {
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
        if let Some(f) = &d.flushed {
            summary.push_str(&match f.number {
                0 => format!("; its {} Redis keys {app}:{env}:* deleted from the shared database 0", f.keys),
                n => format!("; Redis database {n} on {} emptied ({} keys) and freed", f.server, f.keys),
            });
        }
        for (server, number) in numbers.iter().filter(|(s, _)| !freed.contains(s)) {
            summary.push_str(&match number {
                0 => format!("; its Redis keys {app}:{env}:* on {server} kept"),
                n => format!("; Redis database {n} on {server} kept with its data, reserved for `{env}`"),
            });
        }
        let who = d.who.clone();
        let reply = d.reply.take();
        self.event(&app, EventKind::Destroy, None, &format!("{summary} (by {who})"));
        self.app = None;
        if let Some(reply) = reply {
            let _ = reply.send(Ok((OpReport { summary, changed: true }, self.scope.clone())));
        }
    }

    /// The destroy's part of `busy`: while it runs, and after it (until the
    /// controller ends); and one that did not finish
    /// ([`EngineError::Destroying`]), which only `env destroy` goes on with.
    pub(crate) fn destroy_busy(&self) -> Option<EngineError> {
        if let Some(d) = self.destroying.as_ref() {
            return Some(EngineError::Busy {
                operation: format!("env destroy by {}", d.who),
                since: fmt_wall(d.since),
            });
        }
        let pending = match self.store.pending_destroy(&self.scope.app, &self.env) {
            Ok(p) => p?,
            Err(e) => {
                tracing::warn!("cannot read whether {}/{} is being destroyed: {e}", self.scope.app, self.env);
                return None;
            }
        };
        Some(EngineError::Destroying {
            app: self.scope.app.to_string(),
            env: self.env.to_string(),
            who: pending.who,
            since: fmt_wall(pending.started_at),
            drop_data: pending.drop_data,
        })
    }
}
