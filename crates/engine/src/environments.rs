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
//! operation runs. Every instance is stopped (`down`), its route and host
//! claims go, and, with `--drop-database` naming the environment's
//! database again, its database and role are dropped; then the store
//! forgets what would bring it back ([`nonstop_store::Store::forget_environment`])
//! and the dispatcher forgets its controller. Its deployments, events,
//! releases, secrets and Redis number stay; a database not dropped stays
//! for a later environment of the same name.

use super::base::{BaseServiceError, DroppedDatabase, Waiting};
use super::deploy::DeployRequest;
use super::promote::{check_build, PromoteCommand, PromoteRequest};
use super::*;
use nonstop_core::database::DatabaseUrl;

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
