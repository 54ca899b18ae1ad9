//! `nonstop promote --from SOURCE --to TARGET`: roll out, in the target
//! environment, exactly the release the source environment runs.
//!
//! The dispatcher asks the source's controller which release it runs
//! (refused when it runs none, runs `nonstop up`'s working directory, or is
//! in the middle of a deployment), then sends the target's controller the
//! release with the target's spec (resolved from `nonstop.toml` by the
//! CLI). The target rolls it out as a deployment of kind `promote`: no
//! hashing, no build, the release's own directory (byte-identical code),
//! with the target's config and secrets, through the target's gates
//! (migration gate, live-traffic canary) and release tasks. The spec and
//! config it runs with are recorded with the deployment (`config.rs`), so
//! a rollback in the target goes back to the target's own previous
//! release and config, never to the source's.
//!
//! The target's spec must agree with the spec the release was built with
//! on what no environment can change (build, static mounts, release tasks,
//! process types and commands: `nonstop_core::config::code_differences`):
//! otherwise `nonstop.toml` changed since the build, and the release would
//! run with commands it was not built for; refused, naming what differs.
//!
//! When the target runs that release already with another spec or config,
//! a new release of the same build is recorded for it (a rollout to the
//! release that runs would replace nothing): the target then runs the
//! same directory under a new number.

use super::*;
use nonstop_core::config::code_differences;
use nonstop_store::{ReleaseRecord, ReleaseStatus, RunConfig};

/// What `nonstop promote` asks of the target environment.
#[derive(Debug, Clone)]
pub struct PromoteRequest {
    /// The environment whose release is promoted.
    pub from: EnvironmentId,
    /// The target environment's spec, as `nonstop.toml` resolves it.
    pub spec: AppSpec,
    /// PATH, HOME, LANG... of the shell that ran `promote`.
    pub base_env: BTreeMap<String, String>,
    pub message: Option<String>,
    /// `user@host`, recorded in the history.
    pub who: String,
}

/// The two halves of a promotion, one per controller.
pub(crate) enum PromoteCommand {
    /// To the source: the release it runs (its record: the spec it was
    /// built with, its directory).
    Source { reply: Reply<ReleaseRecord> },
    /// To the target: roll `release` out.
    Roll { release: ReleaseId, request: Box<PromoteRequest>, progress: ProgressTx, reply: Reply<OpReport> },
}

impl PromoteCommand {
    /// The app a promotion brings to its target (which may not exist yet).
    pub(crate) fn brings_app(&self) -> Option<&AppName> {
        match self {
            PromoteCommand::Source { .. } => None,
            PromoteCommand::Roll { request, .. } => Some(&request.spec.app),
        }
    }
}

fn refused(reason: String) -> EngineError {
    EngineError::CannotPromote { reason }
}

impl EngineHandle {
    /// Promote the release `request.from` runs to this handle's
    /// environment (see the module).
    pub async fn promote(&self, request: PromoteRequest, progress: ProgressTx) -> Result<OpReport, EngineError> {
        let app = request.spec.app.clone();
        let target_env = self.environment().clone();
        if let Some(named) = self.named_app().filter(|n| **n != app) {
            return Err(refused(format!(
                "--app names `{named}` but nonstop.toml is app `{app}`; drop --app, or run the command in {named}'s \
                 directory"
            )));
        }
        if request.from == target_env {
            return Err(refused(format!(
                "--from and --to are both `{target_env}`: promote rolls out what one environment runs in another; \
                 to roll out this directory, use `nonstop -e {target_env} deploy`"
            )));
        }
        let from = request.from.clone();
        let source = self.scoped(Some(app.clone()), Some(from.clone()));
        let built = match source.ask(|reply| Command::Promote(Box::new(PromoteCommand::Source { reply }))).await {
            Ok(built) => built,
            Err(EngineError::UnknownEnvironment { known, .. }) => {
                return Err(refused(format!(
                    "app `{app}` has no environment `{from}` here (it has: {}); check --from; nothing changed",
                    known.join(", ")
                )))
            }
            Err(EngineError::NotUp) => {
                return Err(refused(format!(
                    "app `{app}` runs in no environment under this daemon, so `{from}` has nothing to promote; \
                     deploy to it first (`nonstop -e {from} deploy`)"
                )))
            }
            Err(e) => return Err(e),
        };
        // What can be told from the source is refused before the target
        // is asked (which would bring it into being); the target checks
        // again.
        check_build(&built, &request.spec, &from)?;
        let release = built.id;
        let target = self.scoped(Some(app), Some(target_env));
        target
            .ask(|reply| {
                Command::Promote(Box::new(PromoteCommand::Roll {
                    release,
                    request: Box::new(request),
                    progress,
                    reply,
                }))
            })
            .await
    }
}

/// The release `built` can run with `spec`: still on disk, and built from
/// the same commands (see the module).
pub(crate) fn check_build(built: &ReleaseRecord, spec: &AppSpec, from: &EnvironmentId) -> Result<(), EngineError> {
    let release = built.id;
    if built.status != ReleaseStatus::Ready || !built.dir.is_dir() {
        return Err(refused(format!(
            "{release}, which `{from}` runs, is {} and no longer on disk; deploy to `{from}` again, then promote",
            if built.status == ReleaseStatus::Ready { "recorded" } else { built.status.as_str() }
        )));
    }
    let differs = code_differences(&built.spec, spec);
    if !differs.is_empty() {
        return Err(refused(format!(
            "nonstop.toml differs from the one {release} was built with in: {}; promote runs {release} exactly as \
             built, so deploy this nonstop.toml to `{from}` first (or promote from a checkout of what `{from}` runs); \
             nothing changed",
            differs.join(", ")
        )));
    }
    Ok(())
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    pub(crate) fn on_promote(&mut self, command: PromoteCommand) {
        match command {
            PromoteCommand::Source { reply } => {
                let release = self.promotable_release().and_then(|id| {
                    let rec = self.store.release(&self.scope.app, id)?;
                    rec.ok_or_else(|| {
                        refused(format!("the record of {id}, which `{}` runs, is gone; deploy to it again", self.env))
                    })
                });
                let _ = reply.send(release);
            }
            PromoteCommand::Roll { release, request, progress, reply } => {
                // The target's own database first, if `[base]` asks for one.
                let waiting = base::Waiting::Promote { release, request, copy: false, progress, reply };
                if let Some(base::Waiting::Promote { release, request, progress, reply, .. }) =
                    self.hold_for_base(waiting)
                {
                    self.begin_promote(release, *request, progress, reply)
                }
            }
        }
    }

    /// The release this (source) environment runs, if it can be promoted.
    fn promotable_release(&self) -> Result<ReleaseId, EngineError> {
        let env = &self.env;
        let rt = self.app.as_ref().filter(|rt| rt.record.running && rt.record.app == self.scope.app);
        let Some(rt) = rt else {
            return Err(refused(format!(
                "`{env}` runs nothing (it is down): there is no release to promote; deploy to it first \
                 (`nonstop -e {env} deploy`)"
            )));
        };
        if let Some(run) = &self.deployment {
            return Err(refused(format!(
                "`{env}` is in the middle of {} #{} to {} ({}): what it runs is about to change; promote once it has \
                 ended (`nonstop -e {env} status`); nothing changed",
                run.record.kind,
                run.record.id,
                run.to.id,
                run.machine.phase.name()
            )));
        }
        if self.pending_deploy.is_some() {
            return Err(refused(format!(
                "`{env}` is starting a deploy (reading its app directory): promote once it has ended \
                 (`nonstop -e {env} status`); nothing changed"
            )));
        }
        if rt.record.release.0 == 0 {
            return Err(refused(format!(
                "`{env}` runs `nonstop up`'s working directory, not a release: `nonstop -e {env} deploy` makes one \
                 that can be promoted"
            )));
        }
        Ok(rt.record.release)
    }

    pub(crate) fn begin_promote(
        &mut self,
        release: ReleaseId,
        request: PromoteRequest,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    ) {
        let Some(reply) = self.admit(Some(nonstop_plan::stopped::Gated::Deploy), reply) else { return };
        if let Some(rt) = self.app.as_ref().filter(|rt| rt.record.running && rt.record.app != request.spec.app) {
            let _ = reply.send(Err(EngineError::OtherApp {
                running: rt.record.app.to_string(),
                requested: request.spec.app.to_string(),
            }));
            return;
        }
        if let Some(err) = self.task_conflict(&request.spec.app) {
            let _ = reply.send(Err(err));
            return;
        }
        // The target's secrets, as they are now; unreadable ones stop it
        // here, before anything changes.
        if let Err(e) = self.refresh_secrets() {
            let _ = reply.send(Err(e));
            return;
        }
        let who = request.who.clone();
        match self.prepare_promote(release, request) {
            Ok(Some((run, summary))) => {
                let lines = run.counts.lines.clone();
                self.begin_op("promote", progress, reply, summary, true, VecDeque::new(), false);
                for line in lines {
                    self.progress(line);
                }
                if let Some(op) = self.op.as_mut() {
                    op.who = Some(who);
                }
                self.deployment = Some(run);
                self.feed(nonstop_plan::deployment::Event::Begin);
            }
            Ok(None) => {
                let _ = reply.send(Ok(OpReport {
                    summary: format!(
                        "{} already runs {release} with this spec and config; nothing to promote",
                        self.env
                    ),
                    changed: false,
                }));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Check and record the promotion; `None` when the target runs
    /// exactly that already.
    fn prepare_promote(
        &mut self,
        release: ReleaseId,
        request: PromoteRequest,
    ) -> Result<Option<(deploy::DeployRun, String)>, EngineError> {
        let PromoteRequest { from, spec, base_env, message, who } = request;
        let app = spec.app.clone();
        let rec = self.store.release(&app, release)?.ok_or_else(|| {
            refused(format!("the record of {release}, which `{from}` runs, is gone; deploy to `{from}` again"))
        })?;
        check_build(&rec, &spec, &from)?;
        let config = self.env_config(&app)?;
        let run_config = RunConfig { spec: spec.clone(), config };
        self.check_queue_redis(&run_config.applied(), &base_env)?;
        let current = self.app.as_ref().filter(|rt| rt.record.running && rt.record.app == app).map(|rt| rt.current());
        let mut target = rec.clone();
        if let Some(current) = current.as_ref().filter(|c| c.id == release) {
            let ran = self.run_config_of(&rec)?;
            let same_env = self.app.as_ref().is_some_and(|rt| rt.record.base_env == base_env);
            if ran.spec == spec
                && ran.config.same_values(&run_config.config)
                && same_env
                && !self.secrets_changed_since_live()
            {
                return Ok(None);
            }
            target = self.record_rebuilt_release(
                &rec,
                format!("{} promoted from {from} again, with {}'s spec or config changed", current.id, self.env),
            )?;
        }
        self.check_listener(&spec, current.as_ref())?;
        let mut run_spec = run_config.applied();
        let counts = self.count_spec(&mut run_spec, nonstop_plan::counts::Apply::Toml)?;
        let path_var = base_env.get("PATH").cloned().unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let mut problems = crate::preflight::check_commands(&run_spec, &rec.dir, &path_var);
        problems.extend(crate::preflight::check_smoke_assets(&run_spec, &rec.dir));
        if !problems.is_empty() {
            return Err(EngineError::Preflight { problems });
        }
        let record = self.insert_deployment(
            app.clone(),
            nonstop_store::DeploymentKind::Promote,
            current.as_ref().map(|c| c.id),
            target.id,
            who,
            Some(message.unwrap_or_else(|| format!("promoted from {from}"))),
            &run_config,
        )?;
        let same = if target.id == release { String::new() } else { format!(", the build of {release}") };
        let summary = match &current {
            Some(c) => format!("{} → {} (from {from}{same}; nothing built)", c.id, target.id),
            None => format!("first release {} (from {from}{same}; nothing built)", target.id),
        };
        self.event(
            &app,
            EventKind::Promote,
            None,
            &format!("deployment #{} started: {summary} by {}", record.id, record.who),
        );
        let gate = deploy::deploy_gate(&spec, DeployOptions::default(), current.is_none());
        let to = ReleaseCtx { id: target.id, spec: run_spec, workdir: rec.dir.clone() };
        let (cancel, started) = (self.cancel.child_token(), self.clock.now());
        let kind = nonstop_plan::deployment::DeploymentKind::Reuse { run_tasks: true };
        let run = deploy::DeployRun::new(record, to, current, kind, base_env, counts, cancel, started, gate);
        Ok(Some((run, summary)))
    }
}
