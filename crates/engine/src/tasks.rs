//! Release and post tasks, fenced like instances.
//!
//! A task is recorded in the store (`starting`) before the driver is asked
//! to start it, with its handle (`running`) as soon as its process exists,
//! and `finished` with how it ended. A daemon that stops leaves a running
//! task running, as it leaves instances: the next one finds the record and
//! decides with `nonstop_plan::deploy::task_on_restart` whether to wait for
//! it (and then go on with the deployment as after a normal exit) or to
//! kill it, and says which in the deployment's history and the events. A
//! deploy is refused while a task recorded for an earlier deployment still
//! lives, so the tasks of two deployments never run at once.

use super::deploy::DeployRun;
use super::*;
use nonstop_core::driver::{Liveness, TaskHandle, TaskKind, TaskOutcome, TaskSpec};
use nonstop_plan::deploy::{task_on_restart, DeployPhase, TaskFate, TaskOwner, TaskSeen};
use nonstop_store::{TaskRecord, TaskState};

/// A task that a stopped (or cancelled) deployment's task is given to end
/// after SIGTERM, before SIGKILL.
const TASK_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a builder is given to kill a build command left by a dead
/// daemon.
const BUILD_KILL_DEADLINE: Duration = Duration::from_secs(30);

/// A task this engine runs or waits for.
pub(crate) struct LiveTask {
    pub(crate) record: TaskRecord,
    /// How it came to this daemon, when an earlier one started it: the
    /// words for history (`was left running by the previous daemon: waited
    /// for it`).
    pub(crate) inherited: Option<&'static str>,
}

/// What `recover_tasks` found.
#[derive(Default)]
pub(crate) struct RecoveredTasks {
    /// The task the recovered deployment was in the middle of, when it
    /// can go on from it.
    pub(crate) resume: Option<(TaskRecord, TaskFate, Option<TaskHandle>)>,
    /// What happened to the others, for the deployment's history.
    pub(crate) notes: Vec<String>,
}

fn pid_words(rec: &TaskRecord) -> String {
    match rec.locator.as_ref().and_then(|l| l.pid()) {
        Some(pid) => format!(" (pid {pid})"),
        None => String::new(),
    }
}

/// How a release or post task's run went wrong, other than by its own
/// exit.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum TaskError {
    /// Its deployment was stopped (cancel, timeout) and stopped it.
    #[error("cancelled{}", stop_words(stop))]
    Cancelled { stop: Option<DriverCallError> },
    #[error("could not run: {0}")]
    Start(#[source] Arc<DriverError>),
    #[error("could not be waited for: {0}")]
    Wait(#[source] Arc<DriverError>),
    /// A driver call was given up on (then the task was stopped, if it
    /// had started).
    #[error("{silent}{}", stop_words(stop))]
    Silent {
        #[source]
        silent: DriverSilent,
        stop: Option<DriverCallError>,
    },
    /// Recorded, but its process could not be found again after a
    /// restart.
    #[error("its process could not be found")]
    Lost,
}

/// How the stop that followed went, when it failed.
fn stop_words(stop: &Option<DriverCallError>) -> String {
    match stop {
        None => String::new(),
        Some(DriverCallError::Failed(e)) => format!("; stopping it failed: {e}"),
        Some(silent @ DriverCallError::Silent(_)) => format!("; {silent}"),
    }
}

/// A task (or build command) not started because its record could not
/// be written: nothing runs unrecorded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{task} was not started: it could not be recorded ({source})")]
pub(crate) struct NotRecorded {
    /// `release task 1/2`, as `TaskRecord::describe` says.
    task: String,
    #[source]
    source: Arc<nonstop_store::StoreError>,
}

/// Why a deployment's release (or post) tasks failed: what the deployment
/// records after "a release task failed: ".
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum TasksError {
    /// `task`: `release task 1/2`.
    #[error("{task} {source}")]
    Secrets {
        task: String,
        #[source]
        source: secrets::SecretsUnavailable,
    },
    #[error(transparent)]
    NotRecorded(#[from] NotRecorded),
    /// It ran and failed (its output tail already redacted).
    #[error("{task} failed ({}){}", outcome_words(outcome, *timeout), tail_suffix(&outcome.output_tail))]
    Failed { task: String, outcome: TaskOutcome, timeout: Duration },
    #[error("{task}{}{source}", if matches!(source, TaskError::Start(_)) { " " } else { ": " })]
    Ended {
        task: String,
        #[source]
        source: TaskError,
    },
    /// The deployment was stopped after its task had ended well.
    #[error("cancelled")]
    Cancelled,
}

/// A build command reported by the builder that its deployment has no
/// record of (its build was stopped meanwhile): it is not run.
#[derive(Debug, Clone, thiserror::Error)]
#[error("deployment #{deployment} has no record of build command {} to write its process to (its build was stopped)", index + 1)]
pub(crate) struct NoBuildRecord {
    deployment: i64,
    index: usize,
}

/// Why a task or build command an earlier daemon left running could not
/// be killed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KillError {
    #[error(transparent)]
    Build(BuildError),
    #[error(transparent)]
    Driver(#[from] DriverCallError),
}

fn outcome_words(o: &TaskOutcome, timeout: Duration) -> String {
    if o.timed_out {
        format!("timed out after {}", fmt_dur(timeout))
    } else {
        o.status.to_string()
    }
}

/// Wait for a started task, for its (remaining) timeout and the engine's
/// margin. `None`: the daemon is stopping; the task is left running for
/// the next one. A cancelled deployment stops its task.
async fn watch_task<D: Driver>(
    driver: Arc<D>,
    handle: TaskHandle,
    timeout: Duration,
    cancel: CancellationToken,
    shutdown: CancellationToken,
) -> Option<Result<TaskOutcome, TaskError>> {
    let deadline = timeout + crate::controller::DRIVER_TASK_MARGIN;
    // How stopping it went: `None` if it did.
    let stop = || {
        let (driver, handle) = (driver.clone(), handle.clone());
        async move {
            let grace = TASK_STOP_GRACE + DRIVER_STOP_MARGIN;
            match tokio::time::timeout(grace, driver.stop_task(&handle, nonstop_core::Signal::Term, TASK_STOP_GRACE))
                .await
            {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(DriverCallError::from(e)),
                Err(_) => Some(DriverSilent { call: "stop_task", deadline: grace }.into()),
            }
        }
    };
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        _ = cancel.cancelled() => {
            if shutdown.is_cancelled() {
                return None;
            }
            Some(Err(TaskError::Cancelled { stop: stop().await }))
        }
        r = tokio::time::timeout(deadline, driver.wait_task(&handle, timeout)) => match r {
            Ok(Ok(outcome)) => Some(Ok(outcome)),
            Ok(Err(e)) => Some(Err(TaskError::Wait(Arc::new(e)))),
            Err(_) => Some(Err(TaskError::Silent {
                silent: DriverSilent { call: "wait_task", deadline },
                stop: stop().await,
            })),
        },
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Run task `index` of `[release] tasks` (or `post_tasks`): recorded
    /// first, then started; its end comes back as `Internal::TaskEnded`.
    /// Past the last task: the phase is done.
    pub(crate) fn start_task(&mut self, post: bool, index: usize) {
        let Some(run) = self.deployment.as_ref() else { return };
        let commands = if post { &run.to.spec.release.post_tasks } else { &run.to.spec.release.tasks };
        let deployment = run.record.id;
        let Some(command) = commands.get(index).cloned() else {
            let _ = self.events_tx.send(Internal::TasksDone { deployment, post, result: Ok(()) });
            return;
        };
        let total = commands.len();
        let kind = if post { TaskKind::PostTask } else { TaskKind::ReleaseTask };
        let secrets = match self.launch_secrets() {
            Ok(s) => s,
            Err(source) => {
                let task = format!("{} {}/{total}", kind.label(), index + 1);
                let result = Err(TasksError::Secrets { task, source });
                let _ = self.events_tx.send(Internal::TasksDone { deployment, post, result });
                return;
            }
        };
        let Some(run) = self.deployment.as_ref() else { return };
        let mut env = release_env(&run.base_env, &run.to, &self.env);
        secrets::add_secrets(&mut env, &secrets, run.to.spec.database.as_ref());
        env.insert("NONSTOP_PROCESS".into(), if post { "post-task" } else { "release-task" }.into());
        let timeout = run.to.spec.release.task_timeout;
        let spec = TaskSpec {
            app: run.to.spec.app.clone(),
            environment: self.env.clone(),
            release: run.to.id,
            name: format!("{}-{}-{}", if post { "post" } else { "release" }, run.to.id.0, index + 1),
            command: command.clone(),
            workdir: run.to.workdir.clone(),
            env: env.into_iter().collect(),
            timeout,
        };
        let mut record = TaskRecord {
            id: 0,
            app: spec.app.clone(),
            environment: self.env.clone(),
            deployment,
            kind,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            total: u32::try_from(total).unwrap_or(u32::MAX),
            name: spec.name.clone(),
            command: command.clone(),
            locator: None,
            state: TaskState::Starting,
            started_at: self.clock.wall(),
            finished_at: None,
            outcome: None,
        };
        // Persist, then act: a task nobody recorded could outlive the
        // daemon unseen.
        match self.store.insert_task(&record) {
            Ok(id) => record.id = id,
            Err(e) => {
                let result = Err(NotRecorded { task: record.describe(), source: Arc::new(e) }.into());
                let _ = self.events_tx.send(Internal::TasksDone { deployment, post, result });
                return;
            }
        }
        self.task_progress(kind, format!("{} {}/{total}: {command}", kind.label(), index + 1));
        let task = record.id;
        self.live_tasks.insert(task, LiveTask { record, inherited: None });
        let (driver, tx, cancel, shutdown) =
            (self.driver.clone(), self.events_tx.clone(), run.cancel.clone(), self.cancel.clone());
        self.tasks.spawn(async move {
            let started = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = cancel.cancelled() => Err(TaskError::Cancelled { stop: None }),
                r = tokio::time::timeout(DRIVER_START_DEADLINE, driver.start_task(spec)) => match r {
                    Ok(Ok(handle)) => Ok(handle),
                    Ok(Err(e)) => Err(TaskError::Start(Arc::new(e))),
                    Err(_) => Err(TaskError::Silent {
                        silent: DriverSilent { call: "start_task", deadline: DRIVER_START_DEADLINE },
                        stop: None,
                    }),
                },
            };
            let handle = match started {
                Ok(handle) => handle,
                Err(e) => {
                    if !shutdown.is_cancelled() {
                        let _ = tx.send(Internal::TaskEnded { task, result: Err(e) });
                    }
                    return;
                }
            };
            let _ = tx.send(Internal::TaskStarted { task, handle: handle.clone() });
            if let Some(result) = watch_task(driver, handle, timeout, cancel, shutdown).await {
                let _ = tx.send(Internal::TaskEnded { task, result });
            }
        });
    }

    fn task_progress(&self, kind: TaskKind, message: String) {
        if let Some(op) = &self.op {
            let _ = op
                .progress
                .send(Progress { phase: Some(kind.label().replace(" command", "")), ..Progress::note(message) });
        }
    }

    pub(crate) fn on_task_started(&mut self, task: i64, handle: TaskHandle) {
        let Some(live) = self.live_tasks.get_mut(&task) else { return };
        live.record.locator = Some(handle.locator);
        live.record.state = TaskState::Running;
        if let Err(e) = self.store.update_task(&live.record) {
            tracing::error!("could not record the process of {}: {e}", live.record.describe());
        }
    }

    /// A task ended: record how, then go on with the deployment (the next
    /// task, or the end of the phase) or fail it.
    pub(crate) fn on_task_ended(&mut self, task: i64, result: Result<TaskOutcome, TaskError>) {
        let Some(LiveTask { mut record, inherited }) = self.live_tasks.remove(&task) else { return };
        let timeout = self.deployment.as_ref().map(|r| r.to.spec.release.task_timeout).unwrap_or_default();
        let ok = matches!(&result, Ok(o) if o.status.success() && !o.timed_out);
        let words = match &result {
            Ok(o) => outcome_words(o, timeout),
            Err(e) => e.to_string(),
        };
        record.state = TaskState::Finished;
        record.finished_at = Some(self.clock.wall());
        record.outcome = Some(words.clone());
        if let Err(e) = self.store.update_task(&record) {
            tracing::error!("could not record the end of {}: {e}", record.describe());
        }
        let what = record.describe();
        let note = inherited.map(|how| format!("{what}{} {how}: {words}", pid_words(&record)));
        if let Some(note) = &note {
            self.event(&record.app, EventKind::Task, None, note);
        }
        let post = record.kind == TaskKind::PostTask;
        let Some(run) = self.deployment.as_mut().filter(|r| r.record.id == record.deployment) else { return };
        run.notes.extend(note);
        let deployment = run.record.id;
        let index = record.index as usize;
        let n = record.total;
        if ok {
            let took = result.as_ref().map(|o| o.duration).unwrap_or_default();
            self.task_progress(
                record.kind,
                format!("{} {}/{n} done in {}", record.kind.label(), index + 1, fmt_dur(took)),
            );
            if self.deployment.as_ref().is_some_and(|r| r.machine.stopping.is_some()) {
                self.deploy_on_tasks(deployment, post, Err(TasksError::Cancelled));
            } else {
                self.start_task(post, index + 1);
            }
            return;
        }
        let reason = match result {
            Ok(mut outcome) => {
                // Its output may show a secret it was given.
                outcome.output_tail = outcome.output_tail.iter().map(|line| self.redact(line)).collect();
                TasksError::Failed { task: what, outcome, timeout }
            }
            Err(source) => TasksError::Ended { task: what, source },
        };
        self.deploy_on_tasks(deployment, post, Err(reason));
    }

    pub(crate) fn on_task_killed(&mut self, task: i64, result: Result<StopOutcome, KillError>) {
        let Some(LiveTask { mut record, .. }) = self.live_tasks.remove(&task) else { return };
        let words = match result {
            Ok(StopOutcome::AlreadyGone) => "it had ended meanwhile".to_string(),
            Ok(_) => "killed".to_string(),
            Err(e) => format!("killing it failed: {e}"),
        };
        record.state = TaskState::Finished;
        record.finished_at = Some(self.clock.wall());
        record.outcome = Some(format!("left running by the previous daemon: {words}"));
        if let Err(e) = self.store.update_task(&record) {
            tracing::error!("could not record the end of {}: {e}", record.describe());
        }
        let note = format!("{}{} left running by the previous daemon: {words}", record.describe(), pid_words(&record));
        self.event(&record.app, EventKind::Task, None, &note);
    }

    /// The task recorded for an earlier deployment that still runs, if any:
    /// a new deployment's tasks must not run alongside it.
    pub(crate) fn task_conflict(&self, app: &AppName) -> Option<EngineError> {
        let records = match self.store.unfinished_tasks(app, &self.env) {
            Ok(r) => r,
            Err(e) => return Some(e.into()),
        };
        for rec in records {
            if let Some((locator, true)) = self.observe(&rec).map(|(h, seen)| (h.locator, seen == TaskSeen::Running)) {
                return Some(EngineError::TaskRunning {
                    task: rec.describe(),
                    pid: locator.pid().unwrap_or(0),
                    deployment: rec.deployment,
                });
            }
        }
        None
    }

    /// Where a recorded task's process is and what is seen of it. A task
    /// recorded as starting (the daemon died before it learnt the handle)
    /// is looked for by name among the driver's tasks.
    fn observe(&self, rec: &TaskRecord) -> Option<(TaskHandle, TaskSeen)> {
        if rec.kind == TaskKind::Build {
            let locator = rec.locator.clone()?;
            let seen = if self.builder.command_alive(&locator) { TaskSeen::Running } else { TaskSeen::Gone };
            return Some((TaskHandle { name: rec.name.clone(), locator }, seen));
        }
        let handle = match &rec.locator {
            Some(locator) => TaskHandle { name: rec.name.clone(), locator: locator.clone() },
            None => self.driver.running_tasks(&rec.app, &rec.environment).into_iter().find(|h| h.name == rec.name)?,
        };
        let seen = match self.driver.task_liveness(&handle) {
            // Not known to have ended: it may still run, so it is treated
            // as running (waited for, never run again alongside).
            Liveness::Alive | Liveness::Unknown(_) => TaskSeen::Running,
            Liveness::Gone => match self.driver.task_exit(&handle) {
                Some(status) => TaskSeen::Exited(status),
                None => TaskSeen::Gone,
            },
        };
        Some((handle, seen))
    }

    /// At start: what becomes of every task of `app` that an earlier daemon
    /// left unfinished (`task_on_restart` decides). The one that deployment
    /// `resumable` (being recovered) was in the middle of is returned when
    /// the deployment can go on from it; the others are waited for or
    /// killed here, or recorded as ended.
    pub(crate) fn recover_tasks(
        &mut self,
        app: &AppName,
        resumable: Option<(i64, &DeployPhase)>,
    ) -> Result<RecoveredTasks, EngineError> {
        let mut out = RecoveredTasks::default();
        let records = self.store.unfinished_tasks(app, &self.env)?;
        // Deployments whose build was in a command, as far as the records
        // tell: one with a recorded process says it; for the others the
        // first unrecorded command is the one that had been spawned, or
        // was about to be.
        let mut build_told: std::collections::HashSet<i64> =
            records.iter().filter(|r| r.kind == TaskKind::Build && r.locator.is_some()).map(|r| r.deployment).collect();
        for mut rec in records {
            let observed = self.observe(&rec);
            let (handle, seen) = match observed {
                Some((h, seen)) => (Some(h), seen),
                None => (None, TaskSeen::Gone),
            };
            if let (Some(h), None) = (&handle, &rec.locator) {
                rec.locator = Some(h.locator.clone());
                rec.state = TaskState::Running;
            }
            let in_phase = |phase: &DeployPhase| {
                matches!(
                    (rec.kind, phase),
                    (TaskKind::Build, DeployPhase::Building)
                        | (TaskKind::ReleaseTask, DeployPhase::ReleaseTasks)
                        | (TaskKind::PostTask, DeployPhase::PostTasks)
                )
            };
            let owner = match resumable {
                Some((id, phase)) if id == rec.deployment && in_phase(phase) => TaskOwner::Resumable,
                _ => TaskOwner::Ended,
            };
            if rec.kind == TaskKind::Build && rec.locator.is_none() {
                // A build command whose process was not recorded never ran
                // (it runs only once recorded; a process spawned for it
                // waited at its gate, which closed with the daemon): there
                // is nothing of it to find or kill.
                if build_told.insert(rec.deployment) {
                    let note = format!(
                        "{} had not run: the daemon stopped before its process was recorded (a build command runs \
                         only once it is), so nothing of it was left running",
                        rec.describe()
                    );
                    tracing::warn!("{note}");
                    out.notes.push(note);
                }
                self.finish_record(rec, "not run: the daemon stopped before its process was recorded".into());
                continue;
            }
            let fate = task_on_restart(rec.kind, seen, owner);
            let what = format!("{}{}", rec.describe(), pid_words(&rec));
            tracing::warn!("{what} was {:?} when the daemon started: {fate:?}", rec.state);
            match fate {
                _ if owner == TaskOwner::Resumable && fate.resumes() => {
                    out.resume = Some((rec, fate, handle));
                }
                TaskFate::WaitThenFail => {
                    let Some(handle) = handle else { continue };
                    out.notes.push(format!(
                        "{what} was left running by the previous daemon: waited for (not killed half way); no \
                         other deployment's task starts before it has ended"
                    ));
                    self.adopt_task(rec, handle, "was left running by the previous daemon: waited for it", None);
                }
                TaskFate::Kill => {
                    let Some(handle) = handle else { continue };
                    out.notes.push(format!("{what} was left running by the previous daemon: killed its process group"));
                    self.kill_task(rec, handle);
                }
                _ => {
                    let words = match seen {
                        TaskSeen::Exited(status) => format!("ended while no daemon watched: {status}"),
                        _ => "gone when the daemon started again; how it ended is unknown".to_string(),
                    };
                    out.notes.push(format!("{what} {words}"));
                    rec.state = TaskState::Finished;
                    rec.finished_at = Some(self.clock.wall());
                    rec.outcome = Some(words);
                    self.store.update_task(&rec)?;
                }
            }
        }
        for note in &out.notes {
            self.event(app, EventKind::Task, None, note);
        }
        Ok(out)
    }

    /// Wait for a task an earlier daemon started, for what is left of its
    /// timeout; its end comes back as `Internal::TaskEnded` (and goes on
    /// with its deployment if that is the one in progress).
    fn adopt_task(
        &mut self,
        mut record: TaskRecord,
        handle: TaskHandle,
        how: &'static str,
        deployment: Option<(Duration, CancellationToken)>,
    ) {
        record.locator = Some(handle.locator.clone());
        record.state = TaskState::Running;
        if let Err(e) = self.store.update_task(&record) {
            tracing::error!("could not record {}: {e}", record.describe());
        }
        let task = record.id;
        let (timeout, cancel) = match deployment {
            Some((timeout, cancel)) => {
                let ran = self.clock.wall().duration_since(record.started_at).unwrap_or_default();
                (timeout.saturating_sub(ran), cancel)
            }
            // Nobody goes on from it: it only has to end (a migration left
            // to finish), within a day at most.
            None => (Duration::from_secs(24 * 3600), CancellationToken::new()),
        };
        self.live_tasks.insert(task, LiveTask { record, inherited: Some(how) });
        let (driver, tx, shutdown) = (self.driver.clone(), self.events_tx.clone(), self.cancel.clone());
        self.tasks.spawn(async move {
            if let Some(result) = watch_task(driver, handle, timeout, cancel, shutdown).await {
                let _ = tx.send(Internal::TaskEnded { task, result });
            }
        });
    }

    fn kill_task(&mut self, record: TaskRecord, handle: TaskHandle) {
        let task = record.id;
        let build = record.kind == TaskKind::Build;
        self.live_tasks.insert(task, LiveTask { record, inherited: Some("was left running by the previous daemon") });
        let (driver, builder, tx) = (self.driver.clone(), self.builder.clone(), self.events_tx.clone());
        self.tasks.spawn(async move {
            let result = if build {
                match tokio::time::timeout(BUILD_KILL_DEADLINE, builder.kill_command(&handle.locator)).await {
                    Ok(r) => r.map_err(KillError::Build),
                    Err(_) => Err(KillError::Build(BuildError::Lingering { after: fmt_dur(BUILD_KILL_DEADLINE) })),
                }
            } else {
                let deadline = TASK_STOP_GRACE + DRIVER_STOP_MARGIN;
                match tokio::time::timeout(
                    deadline,
                    driver.stop_task(&handle, nonstop_core::Signal::Kill, TASK_STOP_GRACE),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| DriverCallError::from(e).into()),
                    Err(_) => Err(DriverCallError::from(DriverSilent { call: "stop_task", deadline }).into()),
                }
            };
            let _ = tx.send(Internal::TaskKilled { task, result });
        });
    }

    /// The recovered deployment goes on from the task it was in the middle
    /// of: waits for it, or takes the exit it had while no daemon watched.
    pub(crate) fn resume_task(&mut self, record: TaskRecord, fate: TaskFate, handle: Option<TaskHandle>) {
        let Some(run) = self.deployment.as_ref() else { return };
        let (timeout, cancel) = (run.to.spec.release.task_timeout, run.cancel.clone());
        match (fate, handle) {
            (TaskFate::WaitThenDecide, Some(handle)) => {
                let what = format!("{}{}", record.describe(), pid_words(&record));
                self.progress(format!("{what} was left running by the previous daemon: waiting for it"));
                self.event(
                    &record.app,
                    EventKind::Task,
                    None,
                    &format!("{what} was left running by the previous daemon: waiting for it"),
                );
                let how = "was left running by the previous daemon: waited for it";
                self.adopt_task(record, handle, how, Some((timeout, cancel)));
            }
            (TaskFate::Decide(status), _) => {
                let task = record.id;
                self.live_tasks.insert(task, LiveTask { record, inherited: Some("ended while no daemon watched") });
                let outcome =
                    TaskOutcome { status, timed_out: false, output_tail: Vec::new(), duration: Duration::ZERO };
                self.on_task_ended(task, Ok(outcome));
            }
            _ => {
                let task = record.id;
                self.live_tasks.insert(task, LiveTask { record, inherited: Some("could not be found again") });
                self.on_task_ended(task, Err(TaskError::Lost));
            }
        }
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Record the deployment's build commands (`starting`) before the build
    /// starts.
    pub(crate) fn record_build_commands(&mut self) -> Result<(), NotRecorded> {
        let Some(run) = self.deployment.as_ref() else { return Ok(()) };
        let commands = run.to.spec.build.clone();
        let total = u32::try_from(commands.len()).unwrap_or(u32::MAX);
        let (app, deployment, release) = (run.to.spec.app.clone(), run.record.id, run.to.id);
        for (index, command) in commands.into_iter().enumerate() {
            let mut record = TaskRecord {
                id: 0,
                app: app.clone(),
                environment: self.env.clone(),
                deployment,
                kind: TaskKind::Build,
                index: u32::try_from(index).unwrap_or(u32::MAX),
                total,
                name: format!("build-{}-{}", release.0, index + 1),
                command,
                locator: None,
                state: TaskState::Starting,
                started_at: self.clock.wall(),
                finished_at: None,
                outcome: None,
            };
            record.id = self
                .store
                .insert_task(&record)
                .map_err(|e| NotRecorded { task: record.describe(), source: Arc::new(e) })?;
            self.live_tasks.insert(record.id, LiveTask { record, inherited: None });
        }
        Ok(())
    }

    fn build_command(&mut self, deployment: i64, index: usize) -> Option<&mut LiveTask> {
        self.live_tasks.values_mut().find(|t| {
            t.record.kind == TaskKind::Build && t.record.deployment == deployment && t.record.index as usize == index
        })
    }

    /// A build command's process exists, held before its command runs:
    /// record it, and only then let it run. A daemon that dies before the
    /// record is written leaves nothing running (the held process exits
    /// when the daemon's end of its gate closes); one that dies after it
    /// leaves a command the next daemon finds from the record and kills.
    /// A record that cannot be written refuses the permit: the command is
    /// killed unrun and the build fails, saying why.
    pub(crate) fn on_build_command(
        &mut self,
        deployment: i64,
        index: usize,
        process: nonstop_core::driver::Locator,
        permit: nonstop_core::build::RunPermit,
    ) {
        let Some(live) = self.build_command(deployment, index) else {
            permit.refuse(Box::new(NoBuildRecord { deployment, index }));
            return;
        };
        let before = (live.record.locator.clone(), live.record.state);
        live.record.locator = Some(process);
        live.record.state = TaskState::Running;
        let record = live.record.clone();
        match self.store.update_task(&record) {
            Ok(()) => {
                tracing::info!("recorded the process of {}", record.describe());
                permit.grant();
            }
            Err(e) => {
                tracing::error!("could not record the process of {}: {e}; it is not run", record.describe());
                // Not running: what is recorded stays true.
                if let Some(live) = self.build_command(deployment, index) {
                    (live.record.locator, live.record.state) = before;
                }
                permit.refuse(Box::new(e));
            }
        }
    }

    pub(crate) fn on_build_command_ended(&mut self, deployment: i64, index: usize, status: ExitStatus) {
        let Some(live) = self.build_command(deployment, index) else { return };
        let id = live.record.id;
        if let Some(LiveTask { record, .. }) = self.live_tasks.remove(&id) {
            self.finish_record(record, status.to_string());
        }
    }

    /// The build ended: its commands still recorded as starting or running
    /// end with it.
    pub(crate) fn finish_build_commands(&mut self, deployment: i64, error: Option<&BuildError>) {
        let ids: Vec<i64> = self
            .live_tasks
            .values()
            .filter(|t| t.record.kind == TaskKind::Build && t.record.deployment == deployment)
            .map(|t| t.record.id)
            .collect();
        for id in ids {
            let Some(LiveTask { record, .. }) = self.live_tasks.remove(&id) else { continue };
            let words = match (record.state, error) {
                (TaskState::Starting, _) => "not run".to_string(),
                (_, None) => "done".to_string(),
                (_, Some(e)) => format!("stopped: {}", e.to_string().lines().next().unwrap_or_default()),
            };
            self.finish_record(record, words);
        }
    }

    fn finish_record(&mut self, mut record: TaskRecord, outcome: String) {
        record.state = TaskState::Finished;
        record.finished_at = Some(self.clock.wall());
        record.outcome = Some(outcome);
        if let Err(e) = self.store.update_task(&record) {
            tracing::error!("could not record the end of {}: {e}", record.describe());
        }
    }
}

impl DeployRun {
    /// The deployment's reason as recorded, with what happened to its
    /// tasks across a daemon restart first.
    pub(crate) fn reason_with_notes(&self, reason: Option<String>) -> Option<String> {
        if self.notes.is_empty() {
            return reason;
        }
        let notes = self.notes.join("; ");
        Some(match reason {
            Some(r) => format!("{notes}; {r}"),
            None => notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Arc<DriverError> {
        Arc::new(DriverError::Task { name: "release-2-1".into(), source: "no such file".into() })
    }

    fn ended(source: TaskError) -> TasksError {
        TasksError::Ended { task: "release task 1/2".into(), source }
    }

    #[test]
    fn a_task_that_did_not_end_by_itself_is_worded_after_its_name() {
        assert_eq!(
            ended(TaskError::Start(refused())).to_string(),
            "release task 1/2 could not run: could not run task release-2-1: no such file"
        );
        assert_eq!(ended(TaskError::Cancelled { stop: None }).to_string(), "release task 1/2: cancelled");
        assert_eq!(
            ended(TaskError::Cancelled { stop: Some(DriverCallError::Failed(refused())) }).to_string(),
            "release task 1/2: cancelled; stopping it failed: could not run task release-2-1: no such file"
        );
        let silent = DriverSilent { call: "wait_task", deadline: Duration::from_secs(90) };
        let stop = DriverSilent { call: "stop_task", deadline: Duration::from_secs(35) };
        assert_eq!(
            ended(TaskError::Silent { silent, stop: Some(stop.into()) }).to_string(),
            "release task 1/2: the driver did not answer `wait_task` within 90.0s and was given up on; check the \
             machine (or the cloud API) it drives; the driver did not answer `stop_task` within 35.0s and was given \
             up on; check the machine (or the cloud API) it drives"
        );
        assert_eq!(ended(TaskError::Lost).to_string(), "release task 1/2: its process could not be found");
    }

    #[test]
    fn the_driver_error_stays_the_source() {
        let e = ended(TaskError::Wait(refused()));
        let task = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<TaskError>());
        assert!(matches!(task, Some(TaskError::Wait(_))), "{e:?}");
        let driver = task.and_then(std::error::Error::source).and_then(|s| s.downcast_ref::<Arc<DriverError>>());
        assert!(matches!(driver.map(|d| &**d), Some(DriverError::Task { .. })), "{e:?}");
    }
}
