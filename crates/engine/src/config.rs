//! Config in the engine: `nonstop config set|unset|get`, answered by the
//! addressed environment's controller, and what an environment runs a
//! release with.
//!
//! **A config change is a release.** `config set` or `unset` in an
//! environment that runs a deployed release records a new release of the
//! *same build* (same content hash, same directory: nothing is hashed,
//! copied or built) and rolls it out as a deployment of kind `config`,
//! with the rolling mechanics and the live-traffic gate of a deploy (its
//! release tasks are not run: the code did not change). The environment's
//! stored config becomes the new one only when that release is live: a
//! change that fails its rollout (or is cancelled) changes nothing. In an
//! environment that runs nothing (or `nonstop up`'s working directory), the
//! config is stored at once and the next `up`, `deploy` or `promote`
//! applies it.
//!
//! **What an environment runs a release with** (the decision behind
//! `promote` and `rollback`). A release is the app's, shared by its
//! environments; its record keeps the spec it was *built* with (the
//! environment that built it). What an environment *runs* it with is that
//! environment's spec from `nonstop.toml` and its config, recorded with each
//! deployment (`nonstop_store::RunConfig`, in the same transaction) and
//! never in the release. So:
//!
//! - a deploy, promote or config change applies the environment's own
//!   config over its own spec ([`Config::apply_to`]);
//! - a rollback (and a restarted daemon's recovery of a deployment) takes
//!   the target's spec and config from the last deployment that made it
//!   live *in this environment* ([`Controller::run_config_of`]), never
//!   from the release record (another environment's spec) and never from
//!   another environment; a rollback that goes live also makes that config
//!   the environment's config again (the change it rolls back is undone);
//! - records from before this existed have none: the release's own spec,
//!   without config, is what they ran (they were built where they ran).
//!
//! Precedence for a process: the file (`[env]`, process env, the
//! environment's tables) < config < secrets < `[database]` variables. A
//! config name that a secret or `[database]` sets would be hidden: refused.

use super::*;
use nonstop_core::config::{Config, ConfigEntry, ConfigName};
use nonstop_store::{ReleaseRecord, ReleaseStatus, RunConfig};
use std::collections::BTreeSet;

/// `nonstop config ...`, to a controller.
pub(crate) enum ConfigRequest {
    Set {
        vars: BTreeMap<ConfigName, String>,
        /// Store values that look like credentials all the same.
        force: bool,
        who: String,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Unset {
        names: BTreeSet<ConfigName>,
        who: String,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Get {
        reply: Reply<ConfigReport>,
    },
}

/// `config get`: the environment's config and what its processes get.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigReport {
    pub app: String,
    pub environment: String,
    /// The release it runs (0: `nonstop up`'s working directory); `None`
    /// when it runs nothing.
    pub release: Option<u64>,
    /// What `config set` gave it, by name.
    pub config: BTreeMap<String, ConfigEntry>,
    /// The app-wide variables its processes get from the spec, config
    /// applied (`None` when it runs nothing).
    pub env: Option<BTreeMap<String, String>>,
    /// Each process type's own variables, over `env`.
    #[serde(default)]
    pub processes: BTreeMap<String, BTreeMap<String, String>>,
    /// The app-wide variables of `nonstop.toml` as the running release got
    /// them (before config), to tell the file's values from config.
    pub file_env: Option<BTreeMap<String, String>>,
    /// Names of the secrets that are set (they win over config).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Names `[database]` sets for every process (they win over all).
    #[serde(default)]
    pub database: Vec<String>,
}

/// Why `name = value` may not be plain config: it looks like a credential
/// (see `nonstop_secrets::looks_like_credential`). The value is never
/// shown. `None`: fine.
pub fn credential_refusal(name: &ConfigName, value: &str) -> Option<String> {
    let hint = nonstop_secrets::looks_like_credential(name.as_str(), value)?;
    let why = match &hint.reason {
        nonstop_secrets::HintReason::PasswordInUrl { scheme } if scheme.is_empty() => {
            "its URL holds a password".to_string()
        }
        nonstop_secrets::HintReason::PasswordInUrl { scheme } => format!("its {scheme}:// URL holds a password"),
        nonstop_secrets::HintReason::KnownFormat { what } => format!("its value looks like {what}"),
        nonstop_secrets::HintReason::SensitiveName { word } => format!("its name says {word}"),
    };
    Some(format!(
        "{name} looks like a credential ({why}); config values are stored and shown in clear: store it with \
         `printf %s \"$VALUE\" | nonstop secrets set {name}`, or give --force to keep it plain config; nothing \
         was changed"
    ))
}

impl EngineHandle {
    /// `nonstop config set`: a new release of the running build with these
    /// values, rolled out (or, when the environment runs nothing, stored
    /// for its next start). Named explicitly (`scoped(Some(app), ..)`), an
    /// app may get config in an environment before its first deploy.
    pub async fn set_config(
        &self,
        vars: BTreeMap<ConfigName, String>,
        force: bool,
        who: String,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        let app = self.named_app().cloned();
        self.ask(|reply| Command::Config {
            app,
            request: Box::new(ConfigRequest::Set { vars, force, who, progress, reply }),
        })
        .await
    }

    /// `nonstop config unset`: as [`Self::set_config`], without `names`.
    pub async fn unset_config(
        &self,
        names: BTreeSet<ConfigName>,
        who: String,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        let app = self.named_app().cloned();
        self.ask(|reply| Command::Config {
            app,
            request: Box::new(ConfigRequest::Unset { names, who, progress, reply }),
        })
        .await
    }

    /// `nonstop config get`.
    pub async fn config(&self) -> Result<ConfigReport, EngineError> {
        let app = self.named_app().cloned();
        self.ask(|reply| Command::Config { app, request: Box::new(ConfigRequest::Get { reply }) }).await
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    pub(crate) fn on_config(&mut self, request: ConfigRequest) {
        match request {
            ConfigRequest::Set { vars, force, who, progress, reply } => {
                let change = |old: &Config, at_ms| old.with_set(&vars, &who, at_ms);
                let checked = self.check_config_names(vars.keys()).and_then(|()| {
                    match vars.iter().find_map(|(n, v)| credential_refusal(n, v).filter(|_| !force)) {
                        Some(reason) => Err(EngineError::InvalidConfig { reason }),
                        None => Ok(()),
                    }
                });
                match checked {
                    Ok(()) => self.change_config(change, &who, progress, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            ConfigRequest::Unset { names, who, progress, reply } => {
                let current = match self.store.config(&self.scope.app, &self.env) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                };
                if let Some(missing) = names.iter().find(|n| !current.vars.contains_key(*n)) {
                    let known: Vec<String> = current.vars.keys().map(|k| k.to_string()).collect();
                    let _ = reply.send(Err(EngineError::InvalidConfig {
                        reason: format!(
                            "{missing} is not set by `config set` for {} in {} ({}); nothing changed (a variable of \
                             nonstop.toml is changed in the file)",
                            self.scope.app,
                            self.env,
                            if known.is_empty() {
                                "it has no config".to_string()
                            } else {
                                format!("its config: {}", known.join(", "))
                            }
                        ),
                    }));
                    return;
                }
                self.change_config(|old: &Config, _| old.without(&names), &who, progress, reply);
            }
            ConfigRequest::Get { reply } => {
                let _ = reply.send(self.config_report());
            }
        }
    }

    /// Refuse names whose value a secret or `[database]` would hide.
    fn check_config_names<'a>(&self, names: impl Iterator<Item = &'a ConfigName>) -> Result<(), EngineError> {
        let secrets: BTreeSet<String> =
            self.store.list_secrets(&self.scope.app, &self.env)?.into_iter().map(|s| s.name).collect();
        let database = self.database_names();
        for name in names {
            if secrets.contains(name.as_str()) {
                return Err(EngineError::InvalidConfig {
                    reason: format!(
                        "{name} is a secret of {} in {}, which wins over config: a config value would never be \
                         seen; change the secret (`nonstop secrets set {name}`), or `nonstop secrets unset {name}` \
                         first; nothing changed",
                        self.scope.app, self.env
                    ),
                });
            }
            if database.contains(name.as_str()) {
                return Err(EngineError::InvalidConfig {
                    reason: format!(
                        "{name} is set by [database] for every process, which wins over config; change [database] \
                         in nonstop.toml instead; nothing changed"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The variables `[database]` of the running spec sets.
    fn database_names(&self) -> BTreeSet<String> {
        self.app
            .as_ref()
            .and_then(|rt| rt.record.spec.database.as_ref())
            .map(|db| db.env.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Apply a change to the environment's config: rolled out as a new
    /// release of the running build, or stored for the next start.
    fn change_config(
        &mut self,
        change: impl FnOnce(&Config, u64) -> Config,
        who: &str,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    ) {
        let Some(reply) = self.admit(Some(nonstop_plan::stopped::Gated::Deploy), reply) else { return };
        let app = self.scope.app.clone();
        let now = self.clock.wall();
        let old = match self.store.config(&app, &self.env) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let new = change(&old, deployment::ms_since_epoch(now));
        let what = Config::describe_change(&old, &new);
        if old.same_values(&new) {
            let _ = reply.send(Ok(OpReport {
                summary: format!("{app} in {} already has this config; nothing changed", self.env),
                changed: false,
            }));
            return;
        }
        let runs_release =
            self.app.as_ref().is_some_and(|rt| rt.record.running && rt.record.app == app && rt.record.release.0 > 0);
        if !runs_release {
            let result = self.store.put_config(&app, &self.env, &new, now).map_err(EngineError::from).map(|()| {
                let when = match self.app.as_ref().filter(|rt| rt.record.app == app) {
                    Some(rt) if rt.record.running => "the next `nonstop up` applies it (this environment runs the \
                        working directory, not a deployed release)"
                        .to_string(),
                    Some(rt) if rt.record.release.0 > 0 => format!(
                        "the next `nonstop deploy` or `promote` applies it (`nonstop up` starts {} again as it ran)",
                        rt.record.release
                    ),
                    _ => "its next `nonstop up`, `deploy` or `promote` applies it".to_string(),
                };
                self.event(&app, EventKind::Config, None, &format!("config: {what} by {who}"));
                OpReport { summary: format!("config of {app} in {}: {what}; {when}", self.env), changed: true }
            });
            let _ = reply.send(result);
            return;
        }
        if let Err(e) = self.refresh_secrets() {
            let _ = reply.send(Err(e));
            return;
        }
        match self.prepare_config_change(new, &what, who) {
            Ok((run, summary)) => {
                let lines = run.counts.lines.clone();
                self.begin_op("config", progress, reply, summary, true, VecDeque::new(), false);
                for line in lines {
                    self.progress(line);
                }
                if let Some(op) = self.op.as_mut() {
                    op.who = Some(who.to_string());
                }
                self.deployment = Some(run);
                self.feed(nonstop_plan::deployment::Event::Begin);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The release of the running build with `config`, recorded, and its
    /// deployment.
    fn prepare_config_change(
        &mut self,
        config: Config,
        what: &str,
        who: &str,
    ) -> Result<(deploy::DeployRun, String), EngineError> {
        let rt = self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let app = rt.record.app.clone();
        let current = rt.current();
        let base_env = rt.record.base_env.clone();
        let built =
            self.store.release(&app, current.id)?.filter(|r| r.status == ReleaseStatus::Ready && r.dir.is_dir());
        let Some(built) = built else {
            return Err(EngineError::CannotDeploy {
                reason: format!(
                    "the build of {} (running now) is no longer on disk; deploy again (`nonstop deploy`) to change \
                     the config",
                    current.id
                ),
            });
        };
        let ran = self.run_config_of(&built)?;
        // A config change that would leave a queue without its Redis
        // (`config unset REDIS_URL`) is refused before it is recorded.
        let checked = RunConfig { spec: ran.spec.clone(), config: config.clone() };
        self.check_queue_redis(&checked.applied(), &base_env)?;
        let message = format!("config: {what} (the build of {})", current.id);
        let rec = self.record_rebuilt_release(&built, message.clone())?;
        let run_config = RunConfig { spec: ran.spec, config };
        let record = self.insert_deployment(
            app.clone(),
            nonstop_store::DeploymentKind::Config,
            Some(current.id),
            rec.id,
            who.to_string(),
            Some(message),
            &run_config,
        )?;
        let mut spec = run_config.applied();
        let counts = self.count_spec(&mut spec, nonstop_plan::counts::Apply::Rollback)?;
        let summary = format!("{} → {} ({what}; same build, nothing rebuilt)", current.id, rec.id);
        self.event(&app, EventKind::Config, None, &format!("deployment #{} started: {summary} by {who}", record.id));
        let to = ReleaseCtx { id: rec.id, spec, workdir: rec.dir.clone() };
        let (cancel, started) = (self.cancel.child_token(), self.clock.now());
        let kind = nonstop_plan::deployment::DeploymentKind::Reuse { run_tasks: false };
        let run = deploy::DeployRun::new(
            record,
            to,
            Some(current),
            kind,
            base_env,
            counts,
            cancel,
            started,
            nonstop_plan::deployment::GateMode::Off,
        );
        Ok((run, summary))
    }

    /// A new release record of `built`'s build: same content hash, same
    /// directory, same build spec, ready at once.
    pub(crate) fn record_rebuilt_release(
        &self,
        built: &ReleaseRecord,
        message: String,
    ) -> Result<ReleaseRecord, EngineError> {
        let id = self.store.next_release_id(&built.app)?;
        let rec = ReleaseRecord {
            app: built.app.clone(),
            id,
            content_hash: built.content_hash.clone(),
            dir: built.dir.clone(),
            spec: built.spec.clone(),
            message: Some(message),
            status: ReleaseStatus::Ready,
            created_at: self.clock.wall(),
            build_ms: 0,
        };
        self.store.put_release(&rec)?;
        Ok(rec)
    }

    /// What this environment last made `release` live with, if that was
    /// recorded.
    pub(crate) fn ran_with(&self, app: &AppName, release: ReleaseId) -> Result<Option<RunConfig>, EngineError> {
        let went_live = self
            .store
            .deployments(app, &self.env, 10_000)?
            .into_iter()
            .find(|d| d.to_release == release && d.status == nonstop_store::DeploymentStatus::Succeeded);
        match went_live {
            Some(d) => Ok(self.store.deployment_config(d.id)?),
            None => Ok(None),
        }
    }

    /// What this environment runs (or ran) `rec` with: its own record,
    /// else the release's build spec without config.
    pub(crate) fn run_config_of(&self, rec: &ReleaseRecord) -> Result<RunConfig, EngineError> {
        Ok(self
            .ran_with(&rec.app, rec.id)?
            .unwrap_or_else(|| RunConfig { spec: rec.spec.clone(), config: Config::default() }))
    }

    /// The environment's config (what a deploy or promote applies).
    pub(crate) fn env_config(&self, app: &AppName) -> Result<Config, EngineError> {
        Ok(self.store.config(app, &self.env)?)
    }

    /// A deployment went live: its config is the environment's from now
    /// on (a config change, or a rollback to a release that ran with
    /// another config).
    pub(crate) fn config_went_live(&self, deployment: i64, app: &AppName) {
        match self.store.deployment_config(deployment) {
            Ok(Some(run)) => {
                if let Err(e) = self.store.put_config(app, &self.env, &run.config, self.clock.wall()) {
                    tracing::error!("could not record the config of deployment #{deployment}: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("could not read the config of deployment #{deployment}: {e}"),
        }
    }

    fn config_report(&self) -> Result<ConfigReport, EngineError> {
        let app = self.scope.app.clone();
        let config = self.store.config(&app, &self.env)?;
        let rt = self.app.as_ref().filter(|rt| rt.record.running && rt.record.app == app);
        let file_env = match rt {
            Some(rt) if rt.record.release.0 > 0 => match self.store.release(&app, rt.record.release)? {
                Some(rec) => Some(self.run_config_of(&rec)?.spec.env),
                None => None,
            },
            _ => None,
        };
        Ok(ConfigReport {
            app: app.to_string(),
            environment: self.env.to_string(),
            release: rt.map(|rt| rt.record.release.0),
            config: config.vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            env: rt.map(|rt| rt.record.spec.env.clone()),
            processes: rt
                .map(|rt| {
                    rt.record
                        .spec
                        .processes
                        .iter()
                        .filter(|p| !p.env.is_empty())
                        .map(|p| (p.name.to_string(), p.env.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            file_env,
            secrets: self.store.list_secrets(&app, &self.env)?.into_iter().map(|s| s.name).collect(),
            database: self.database_names().into_iter().collect(),
        })
    }
}
