//! A deployment's progress as one pure function:
//! [`advance`]`(deployment, event, now) -> (deployment, actions)`.
//!
//! Every phase a deploy or a rollback goes through (build, migration gate,
//! maintenance fallback, release tasks, canary ramp, rolling per process
//! type, post tasks, rolling back) and every event that moves it on (a
//! build or task exit, a gate verdict, a rollout's end, a canary window,
//! a cancel, a timeout, a daemon restart) is an enum. The engine persists
//! the deployment that `advance` returns, then carries out its actions,
//! then feeds back what happened as the next event. Nothing here reads a
//! clock or touches the world: `now` (milliseconds of wall time) comes in,
//! deadlines go out inside the deployment.
//!
//! Invariants (property-tested below over random event sequences):
//! - every path ends in [`Outcome::Succeeded`], [`Outcome::Failed`] or
//!   [`Outcome::RolledBack`], and nothing is asked of the engine after;
//! - the release tasks are started at most once per deployment (a restart
//!   waits for the one found running instead of starting it again);
//! - without the maintenance fallback, no action stops a process type
//!   without replacing it (capacity is the rollout's business, see
//!   [`crate::rollout`], which keeps the running release above its
//!   minimum and never doubles a singleton);
//! - the new release is promoted (made the app's record) at most once,
//!   and only once every process type runs it;
//! - maintenance switched on by the fallback is switched off on every path
//!   that ends with a release serving;
//! - a restart at any point resumes (a task found running or ended) or
//!   rolls back what was touched.

use crate::deploy::{DeployPhase, TaskFate};
use nonstop_core::ProcessName;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How long aborted work (a killed build or task, a stopped rollout) is
/// given to report its end before the deployment goes on without it.
pub const STOP_GRACE_MS: u64 = 120_000;

/// What kind of deployment this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    /// A new release: built, gated, tasks run.
    Deploy,
    /// Back to a retained release: nothing built; its release tasks only
    /// if asked.
    Rollback { run_tasks: bool },
    /// Content identical to a retained release: rolled like a rollback;
    /// tasks run only if asked.
    Reuse { run_tasks: bool },
}

/// How the migration gate treats this deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMode {
    /// No `[database]`, or no release tasks (a rollback: no schema
    /// recorded for its target, or `--force`): no gate.
    Off,
    /// Run the tasks on a scratch copy first; refuse a breaking change. (A
    /// rollback: refuse a target that expects a schema the database no
    /// longer has.)
    Check,
    /// Breaking changes allowed: maintenance on, old release stopped,
    /// tasks run, new release started, maintenance off.
    AllowBreaking,
}

/// One step of the canary ramp: the new release gets `percent` of the web
/// traffic for `hold_ms`, then its figures are compared with the old
/// release's over the same window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RampStep {
    pub percent: u8,
    pub hold_ms: u64,
}

/// The time limits of the phases the engine cannot bound by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub build_ms: u64,
    pub gate_ms: u64,
    /// For the whole list of release (or post) tasks.
    pub tasks_ms: u64,
    /// For one process type's rollout.
    pub rollout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { build_ms: 3_600_000, gate_ms: 3_600_000, tasks_ms: 3_600_000, rollout_ms: 3_600_000 }
    }
}

/// What is fixed when a deployment starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub kind: DeploymentKind,
    /// No release ran before: nothing to roll back to (a rollback stops).
    pub first: bool,
    /// The process types in rollout order (see [`crate::deploy::rollout_order`]).
    pub order: Vec<ProcessName>,
    pub gate: GateMode,
    /// `[release] tasks` exist.
    pub has_tasks: bool,
    /// `[release] post_tasks` exist.
    pub has_post_tasks: bool,
    /// The web process type rolled through the canary ramp, and its steps
    /// (empty: no ramp).
    pub canary: Option<ProcessName>,
    pub ramp: Vec<RampStep>,
    pub limits: Limits,
}

impl Shape {
    fn builds(&self) -> bool {
        self.kind == DeploymentKind::Deploy
    }

    fn runs_tasks(&self) -> bool {
        self.has_tasks && matches!(self.kind, DeploymentKind::Deploy | DeploymentKind::Reuse { run_tasks: true })
    }

    /// A deploy's gate runs its tasks on a scratch copy (or takes the
    /// maintenance fallback); a rollback's compares the schema the target
    /// expects with the database's (never a fallback: a rollback runs no
    /// migration that could need one).
    fn gated(&self) -> GateMode {
        match self.kind {
            DeploymentKind::Rollback { .. } if self.gate == GateMode::Check => GateMode::Check,
            DeploymentKind::Rollback { .. } => GateMode::Off,
            _ if self.runs_tasks() => self.gate,
            _ => GateMode::Off,
        }
    }
}

/// Why a deployment did not succeed (or succeeded with a note).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    Build,
    /// The gate found changes that break the running release.
    Breaking,
    /// The gate could not run (database unreachable, copy failed…).
    Gate,
    Task,
    PostTask,
    /// A new instance failed its health check, its smoke checks, or exited.
    Rollout,
    /// The canary ramp's figures were worse than the old release's.
    LiveGate,
    Cancelled,
    Timeout,
    /// The daemon stopped while the deployment ran.
    DaemonStopped,
    /// Putting the previous release back failed too.
    RollbackFailed,
}

/// A failure: its kind, and the evidence for people (path, status, figures).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Failure {
        Failure { kind, detail: detail.into() }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The migration gate's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum GateVerdict {
    /// Every schema change is safe while the old release runs.
    Safe,
    /// Some change breaks the running release; `report` names each.
    Breaking { report: String },
    /// The gate could not run.
    Error { detail: String },
}

/// Where the maintenance fallback is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackStage {
    /// Maintenance asked on; waiting for it to apply.
    MaintenanceOn,
    /// Stopping the old release's processes, `index` into the order.
    StoppingOld { index: usize },
}

/// Where the deployment is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Building,
    /// Release tasks running on a scratch copy of the database.
    MigrationGate,
    /// The seeds' fallback for a breaking migration.
    Fallback {
        stage: FallbackStage,
    },
    ReleaseTasks,
    /// The canary process's new instances serve `ramp[step].percent` of
    /// its traffic, until `until_ms`.
    Canary {
        step: usize,
    },
    /// Rolling `order[index]` to the new release.
    Rolling {
        index: usize,
    },
    PostTasks,
    /// Putting the previous release back on `remaining` (last touched
    /// first).
    RollingBack {
        failure: Failure,
        remaining: Vec<ProcessName>,
    },
    /// Switching maintenance off before the end (`then` is how it ends).
    MaintenanceOff {
        then: Box<Outcome>,
    },
    Done {
        outcome: Outcome,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Building => "building",
            Phase::MigrationGate => "migration gate",
            Phase::Fallback { stage: FallbackStage::MaintenanceOn } => "maintenance on",
            Phase::Fallback { stage: FallbackStage::StoppingOld { .. } } => "stopping the old release",
            Phase::ReleaseTasks => "release tasks",
            Phase::Canary { .. } => "canary",
            Phase::Rolling { .. } => "rolling",
            Phase::PostTasks => "post tasks",
            Phase::RollingBack { .. } => "rolling back",
            Phase::MaintenanceOff { .. } => "maintenance off",
            Phase::Done { outcome } => outcome.name(),
        }
    }

    /// The phase as the deployment record stored it before this state
    /// machine existed, for `history` and for old daemons' records.
    pub fn legacy(&self) -> DeployPhase {
        match self {
            Phase::Building | Phase::MigrationGate => DeployPhase::Building,
            Phase::Fallback { .. } | Phase::ReleaseTasks => DeployPhase::ReleaseTasks,
            Phase::Canary { .. } => DeployPhase::Rolling { index: 0 },
            Phase::Rolling { index } => DeployPhase::Rolling { index: *index },
            Phase::PostTasks => DeployPhase::PostTasks,
            Phase::RollingBack { failure, remaining } => {
                DeployPhase::RollingBack { reason: failure.detail.clone(), remaining: remaining.clone() }
            }
            Phase::MaintenanceOff { then } => then.legacy(),
            Phase::Done { outcome } => outcome.legacy(),
        }
    }
}

/// How a deployment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The new release is live; `note` says what went wrong after that
    /// (a post task that failed).
    Succeeded { note: Option<Failure> },
    /// Nothing (or nothing more) could be done; what was touched stays as
    /// it is (`rollback_failed`: some process type could not go back).
    Failed { failure: Failure },
    /// The previous release runs again everywhere.
    RolledBack { failure: Failure },
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::RolledBack { .. } => "rolled back",
        }
    }

    fn legacy(&self) -> DeployPhase {
        match self {
            Outcome::Succeeded { .. } => DeployPhase::Succeeded,
            Outcome::Failed { failure } => DeployPhase::Failed { reason: failure.detail.clone() },
            Outcome::RolledBack { failure } => DeployPhase::RolledBack { reason: failure.detail.clone() },
        }
    }
}

/// Which release a rollout puts on a process type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollTo {
    /// The deployment's release.
    New,
    /// The release that ran before.
    Previous,
    /// None: the process type's instances are stopped.
    Nothing,
}

/// What the engine must do, in order. `AdoptFirst`, `Promote`,
/// `SetMaintenance` and `Abort` are idempotent: a restarted daemon may be
/// asked to do them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Snapshot and build the release (answer: [`Event::Built`]).
    Build,
    /// Run the release tasks against a scratch copy of the database and
    /// diff its schema (answer: [`Event::Gate`]).
    RunGate,
    /// Switch maintenance mode (answer: [`Event::MaintenanceSet`]).
    SetMaintenance { on: bool },
    /// Run `[release] tasks`, or `post_tasks` (answer: [`Event::TasksEnded`]).
    RunTasks { post: bool },
    /// Wait for a task a previous daemon left running (answer:
    /// [`Event::TasksEnded`]); never start it again.
    AwaitLeftoverTask { post: bool },
    /// Make the first release the app's record, before its processes start.
    AdoptFirst,
    /// Roll a process type (answer: [`Event::RolloutDone`] or
    /// [`Event::RolloutFailed`]).
    Roll { process: ProcessName, to: RollTo },
    /// Give the new release `percent` of `process`'s traffic and start
    /// counting both releases' requests from now (answer, after `hold_ms`:
    /// [`Event::CanaryWindow`]). 100 means its full share.
    Weigh { process: ProcessName, percent: u8, hold_ms: u64 },
    /// Every process type runs the new release: make it the app's record.
    Promote,
    /// Stop whatever runs for this deployment (build, gate, tasks,
    /// rollout): it was cancelled or timed out.
    Abort,
    /// The deployment ended: record it and answer the operation.
    Finish { outcome: Outcome },
}

/// A canary window's figures for one release.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Window {
    pub requests: u64,
    pub errors_5xx: u64,
    /// 95th percentile latency in milliseconds.
    pub p95_ms: f64,
}

impl Window {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors_5xx as f64 / self.requests as f64
        }
    }
}

/// How much worse than the old release the new one may be during the ramp.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Margins {
    /// The new release's 5xx rate may exceed the old one's by this much
    /// (absolute, 0.01 = one point).
    pub error_rate: f64,
    /// The new release's p95 may be this many times the old one's…
    pub p95_ratio: f64,
    /// …plus this many milliseconds (small p95s are noisy).
    pub p95_slack_ms: f64,
    /// Fewer new-release requests than this: the window judges nothing.
    pub min_requests: u64,
}

impl Default for Margins {
    fn default() -> Self {
        Margins { error_rate: 0.01, p95_ratio: 2.0, p95_slack_ms: 100.0, min_requests: 20 }
    }
}

/// The live gate's verdict on one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum CanaryVerdict {
    Pass,
    /// Too few requests reached the new release to judge it.
    Inconclusive,
    /// Slower than the margins allow. Latency is noisy (a fresh instance on
    /// a busy machine, a burst of slow pages): one slow window is a
    /// suspicion, [`SLOW_WINDOWS_TO_FAIL`] in a row at the same step a
    /// failure.
    Slow {
        why: String,
    },
    /// More 5xx than the margin allows: a failure at once.
    Fail {
        why: String,
    },
}

/// Slow windows in a row (at one step) that fail the live gate; after a
/// single one the step is measured again.
pub const SLOW_WINDOWS_TO_FAIL: u8 = 2;

/// Compare the new release's window with the old one's.
pub fn judge(old: &Window, new: &Window, margins: &Margins) -> CanaryVerdict {
    if new.requests < margins.min_requests {
        return CanaryVerdict::Inconclusive;
    }
    let (old_rate, new_rate) = (old.error_rate(), new.error_rate());
    if new_rate > old_rate + margins.error_rate {
        return CanaryVerdict::Fail {
            why: format!(
                "the new release answered 5xx to {:.1}% of {} requests, the old one to {:.1}% of {} (margin {:.1} points)",
                new_rate * 100.0,
                new.requests,
                old_rate * 100.0,
                old.requests,
                margins.error_rate * 100.0
            ),
        };
    }
    if old.requests > 0 && new.p95_ms > old.p95_ms * margins.p95_ratio + margins.p95_slack_ms {
        return CanaryVerdict::Slow {
            why: format!(
                "the new release's p95 is {:.0} ms, the old one's {:.0} ms (allowed: {}× + {:.0} ms)",
                new.p95_ms, old.p95_ms, margins.p95_ratio, margins.p95_slack_ms
            ),
        };
    }
    CanaryVerdict::Pass
}

/// With no request at all on the route for this long, a window ends:
/// nobody is there to protect, and waiting tells nothing.
pub const IDLE_WINDOW_MS: u64 = 2_000;

/// Whether a canary window can be judged now, `elapsed_ms` after it
/// began: at its `hold_ms`; sooner once the new release answered enough
/// requests to be judged with confidence (five times the minimum), or
/// failed clearly (its 5xx rate beyond the margin over the minimum
/// requests), or when no request came at all.
pub fn window_complete(elapsed_ms: u64, hold_ms: u64, old: &Window, new: &Window, margins: &Margins) -> bool {
    if elapsed_ms >= hold_ms {
        return true;
    }
    if new.requests >= margins.min_requests.saturating_mul(5) {
        return true;
    }
    if new.requests >= margins.min_requests && matches!(judge(old, new, margins), CanaryVerdict::Fail { .. }) {
        return true;
    }
    elapsed_ms >= IDLE_WINDOW_MS && old.requests == 0 && new.requests == 0
}

/// Why work the engine carried out for a deployment (its build, its
/// release or post tasks) failed: the words people see (which the
/// deployment records in its [`Failure`]; the engine has taken any secret
/// value out of them) and the engine's own error, kept whole as the
/// [`source`](std::error::Error::source). The machine reads only the words.
#[derive(Debug, Clone)]
pub struct WorkError {
    words: String,
    source: Arc<dyn std::error::Error + Send + Sync + 'static>,
}

impl WorkError {
    pub fn new(words: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> WorkError {
        WorkError { words: words.into(), source: Arc::new(source) }
    }

    /// The error, worded by itself (nothing to redact).
    pub fn of(source: impl std::error::Error + Send + Sync + 'static) -> WorkError {
        WorkError::new(source.to_string(), source)
    }
}

impl std::fmt::Display for WorkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words)
    }
}

impl std::error::Error for WorkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Equal when they say the same: what the machine can tell apart.
impl PartialEq for WorkError {
    fn eq(&self, other: &Self) -> bool {
        self.words == other.words
    }
}

/// What happened. Events are not stored: the deployment they produce is.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Start the deployment.
    Begin,
    Built {
        result: Result<(), WorkError>,
    },
    Gate {
        verdict: GateVerdict,
    },
    MaintenanceSet {
        on: bool,
    },
    TasksEnded {
        post: bool,
        result: Result<(), WorkError>,
    },
    RolloutDone {
        process: ProcessName,
    },
    RolloutFailed {
        process: ProcessName,
        why: String,
    },
    /// A canary step's window ended: both releases' figures over it.
    CanaryWindow {
        step: usize,
        old: Window,
        new: Window,
    },
    Cancel {
        why: String,
    },
    /// Time passed: deadlines are checked.
    Tick,
    /// The daemon restarted and found the deployment in its phase, and
    /// what became of a task it was running, if any.
    Restarted {
        task: Option<TaskFate>,
    },
}

/// A deployment in progress (or ended), as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub shape: Shape,
    pub phase: Phase,
    /// Wall time the current phase must end by (timeouts, canary holds).
    pub deadline_ms: Option<u64>,
    /// A stop asked (a cancel, a timeout) while work was in progress: the
    /// work was aborted, and its end (which the engine reports as usual)
    /// ends the phase with this failure. A build's result, a task's exit,
    /// a rollout's end are never lost this way.
    pub stopping: Option<Failure>,
    /// Maintenance was switched on by this deployment.
    pub maintenance: bool,
    /// Promoted already (the new release is the app's record).
    pub promoted: bool,
    pub margins: Margins,
    /// Slow canary windows in a row at the current step
    /// ([`CanaryVerdict::Slow`]).
    #[serde(default)]
    pub slow_windows: u8,
}

impl Deployment {
    pub fn new(shape: Shape, margins: Margins) -> Deployment {
        Deployment {
            shape,
            phase: Phase::Building,
            deadline_ms: None,
            stopping: None,
            maintenance: false,
            promoted: false,
            margins,
            slow_windows: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }
}

/// Move the deployment on by one event.
pub fn advance(mut d: Deployment, event: Event, now: u64) -> (Deployment, Vec<Action>) {
    let mut actions = Vec::new();
    if d.is_done() {
        return (d, actions);
    }
    match event {
        Event::Begin => d.start(now, &mut actions),
        Event::Restarted { task } => d.restarted(task, now, &mut actions),
        Event::Cancel { why } => d.cancel(why, now, &mut actions),
        Event::Tick => d.tick(now, &mut actions),
        event => d.step(event, now, &mut actions),
    }
    (d, actions)
}

impl Deployment {
    fn enter(&mut self, phase: Phase, deadline: Option<u64>) {
        self.phase = phase;
        self.deadline_ms = deadline;
    }

    fn start(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.shape.builds() {
            self.enter(Phase::Building, Some(now + self.shape.limits.build_ms));
            out.push(Action::Build);
        } else {
            self.after_build(now, out);
        }
    }

    fn after_build(&mut self, now: u64, out: &mut Vec<Action>) {
        match self.shape.gated() {
            GateMode::Check => {
                self.enter(Phase::MigrationGate, Some(now + self.shape.limits.gate_ms));
                out.push(Action::RunGate);
            }
            GateMode::AllowBreaking if !self.shape.first => {
                self.enter(Phase::Fallback { stage: FallbackStage::MaintenanceOn }, None);
                self.maintenance = true;
                out.push(Action::SetMaintenance { on: true });
            }
            _ => self.release_tasks(now, out),
        }
    }

    fn release_tasks(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.shape.runs_tasks() {
            self.enter(Phase::ReleaseTasks, Some(now + self.shape.limits.tasks_ms));
            out.push(Action::RunTasks { post: false });
        } else {
            self.roll(0, now, out);
        }
    }

    /// Roll `order[index]` (or go on to the post tasks when all are done).
    fn roll(&mut self, index: usize, now: u64, out: &mut Vec<Action>) {
        if index == 0 && self.shape.first {
            out.push(Action::AdoptFirst);
        }
        let Some(process) = self.shape.order.get(index).cloned() else {
            return self.post_tasks(now, out);
        };
        let ramped = self.shape.canary.as_ref() == Some(&process) && !self.shape.ramp.is_empty();
        if ramped && !self.shape.first && !self.maintenance {
            // The canary: new instances come up beside the old ones, then
            // take a growing share.
            let step = self.shape.ramp[0];
            self.enter(Phase::Canary { step: 0 }, Some(now + step.hold_ms + self.shape.limits.rollout_ms));
            out.push(Action::Weigh { process, percent: step.percent, hold_ms: step.hold_ms });
        } else {
            self.enter(Phase::Rolling { index }, Some(now + self.shape.limits.rollout_ms));
            out.push(Action::Roll { process, to: RollTo::New });
        }
    }

    fn post_tasks(&mut self, now: u64, out: &mut Vec<Action>) {
        if !self.promoted {
            self.promoted = true;
            out.push(Action::Promote);
        }
        if self.shape.has_post_tasks {
            self.enter(Phase::PostTasks, Some(now + self.shape.limits.tasks_ms));
            out.push(Action::RunTasks { post: true });
        } else {
            self.end(Outcome::Succeeded { note: None }, out);
        }
    }

    /// End, switching maintenance off first if this deployment switched it
    /// on and a release serves.
    fn end(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        if self.maintenance {
            self.enter(Phase::MaintenanceOff { then: Box::new(outcome) }, None);
            out.push(Action::SetMaintenance { on: false });
            return;
        }
        self.finish(outcome, out);
    }

    fn finish(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        self.enter(Phase::Done { outcome: outcome.clone() }, None);
        out.push(Action::Finish { outcome });
    }

    /// Process types touched so far, last touched first: the ones to put
    /// back.
    fn touched(&self, through: usize) -> Vec<ProcessName> {
        let n = (through + 1).min(self.shape.order.len());
        self.shape.order[..n].iter().rev().cloned().collect()
    }

    /// Put the previous release back on what was touched, or fail if
    /// nothing was.
    fn back_out(&mut self, failure: Failure, through: Option<usize>, out: &mut Vec<Action>) {
        let remaining = through.map(|i| self.touched(i)).unwrap_or_default();
        if remaining.is_empty() {
            return self.end(Outcome::Failed { failure }, out);
        }
        self.rolling_back(failure, remaining, out);
    }

    fn rolling_back(&mut self, failure: Failure, remaining: Vec<ProcessName>, out: &mut Vec<Action>) {
        let Some(process) = remaining.first().cloned() else {
            let outcome = if failure.kind == FailureKind::RollbackFailed {
                Outcome::Failed { failure }
            } else {
                Outcome::RolledBack { failure }
            };
            return self.end(outcome, out);
        };
        let to = if self.shape.first { RollTo::Nothing } else { RollTo::Previous };
        out.push(Action::Roll { process, to });
        self.enter(Phase::RollingBack { failure, remaining }, None);
    }

    fn step(&mut self, event: Event, now: u64, out: &mut Vec<Action>) {
        let phase = self.phase.clone();
        match (phase, event) {
            (Phase::Building, Event::Built { result }) => match (result, self.stopping.take()) {
                (_, Some(failure)) => self.end(Outcome::Failed { failure }, out),
                (Ok(()), None) => self.after_build(now, out),
                (Err(e), None) => self.end(
                    Outcome::Failed { failure: Failure::new(FailureKind::Build, format!("the build failed: {e}")) },
                    out,
                ),
            },
            (Phase::MigrationGate, Event::Gate { verdict }) => match (verdict, self.stopping.take()) {
                (_, Some(failure)) => self.end(Outcome::Failed { failure }, out),
                (GateVerdict::Safe, None) => self.release_tasks(now, out),
                (GateVerdict::Breaking { report }, None) => self.end(
                    Outcome::Failed {
                        failure: Failure::new(
                            FailureKind::Breaking,
                            format!("refused before anything changed: {report}"),
                        ),
                    },
                    out,
                ),
                (GateVerdict::Error { detail }, None) => self.end(
                    Outcome::Failed {
                        failure: Failure::new(FailureKind::Gate, format!("the migration gate could not run: {detail}")),
                    },
                    out,
                ),
            },
            (Phase::Fallback { stage: FallbackStage::MaintenanceOn }, Event::MaintenanceSet { on: true }) => {
                self.stop_old(0, out)
            }
            (Phase::Fallback { stage: FallbackStage::StoppingOld { index } }, Event::RolloutDone { process })
                if self.shape.order.get(index) == Some(&process) =>
            {
                self.stop_old(index + 1, out)
            }
            (Phase::Fallback { stage: FallbackStage::StoppingOld { index } }, Event::RolloutFailed { why, .. }) => {
                // The old release could not be stopped everywhere: put back
                // what was stopped and give up before any task ran.
                let failure = Failure::new(FailureKind::Rollout, format!("stopping the old release failed: {why}"));
                self.back_out(failure, Some(index), out)
            }
            (Phase::ReleaseTasks, Event::TasksEnded { post: false, result }) => {
                let stopped = if self.maintenance { Some(self.shape.order.len() - 1) } else { None };
                match (result, self.stopping.take()) {
                    (Ok(()), None) => self.roll(0, now, out),
                    (_, Some(failure)) => self.back_out(failure, stopped, out),
                    (Err(e), None) => self.back_out(
                        Failure::new(FailureKind::Task, format!("a release task failed: {e}")),
                        stopped,
                        out,
                    ),
                }
            }
            (Phase::Canary { step }, Event::CanaryWindow { step: s, old, new }) if s == step => {
                let index = self.index_of_canary();
                let process = self.shape.order[index].clone();
                match judge(&old, &new, &self.margins) {
                    CanaryVerdict::Fail { why } => {
                        self.back_out(Failure::new(FailureKind::LiveGate, why), Some(index), out)
                    }
                    CanaryVerdict::Slow { why } if self.slow_windows + 1 >= SLOW_WINDOWS_TO_FAIL => {
                        let why = format!("{why}, in {SLOW_WINDOWS_TO_FAIL} windows in a row");
                        self.back_out(Failure::new(FailureKind::LiveGate, why), Some(index), out)
                    }
                    CanaryVerdict::Slow { .. } => {
                        // Once is a suspicion: the same step, a new window.
                        self.slow_windows += 1;
                        let here = self.shape.ramp[step];
                        self.enter(Phase::Canary { step }, Some(now + here.hold_ms + self.shape.limits.rollout_ms));
                        out.push(Action::Weigh { process, percent: here.percent, hold_ms: here.hold_ms });
                    }
                    CanaryVerdict::Pass | CanaryVerdict::Inconclusive => {
                        self.slow_windows = 0;
                        match self.shape.ramp.get(step + 1).copied() {
                            Some(next) => {
                                self.enter(
                                    Phase::Canary { step: step + 1 },
                                    Some(now + next.hold_ms + self.shape.limits.rollout_ms),
                                );
                                out.push(Action::Weigh { process, percent: next.percent, hold_ms: next.hold_ms });
                            }
                            None => {
                                self.enter(Phase::Rolling { index }, Some(now + self.shape.limits.rollout_ms));
                                out.push(Action::Roll { process, to: RollTo::New });
                            }
                        }
                    }
                }
            }
            (Phase::Canary { .. }, Event::RolloutFailed { why, process }) => {
                let index = self.index_of_canary();
                self.back_out(Failure::new(FailureKind::Rollout, format!("{process}: {why}")), Some(index), out)
            }
            (Phase::Rolling { index }, Event::RolloutDone { process })
                if self.shape.order.get(index) == Some(&process) =>
            {
                match self.stopping.take() {
                    Some(failure) => self.back_out(failure, Some(index), out),
                    None => self.roll(index + 1, now, out),
                }
            }
            (Phase::Rolling { index }, Event::RolloutFailed { process, why })
                if self.shape.order.get(index) == Some(&process) =>
            {
                self.back_out(Failure::new(FailureKind::Rollout, format!("{process}: {why}")), Some(index), out)
            }
            (Phase::PostTasks, Event::TasksEnded { post: true, result }) => {
                let note =
                    result.err().map(|e| Failure::new(FailureKind::PostTask, format!("a post task failed: {e}")));
                let note = self.stopping.take().or(note);
                self.end(Outcome::Succeeded { note }, out)
            }
            (Phase::RollingBack { failure, mut remaining }, Event::RolloutDone { process })
                if remaining.first() == Some(&process) =>
            {
                remaining.remove(0);
                self.rolling_back(failure, remaining, out)
            }
            (Phase::RollingBack { failure, mut remaining }, Event::RolloutFailed { process, why })
                if remaining.first() == Some(&process) =>
            {
                remaining.remove(0);
                let failure = Failure::new(
                    FailureKind::RollbackFailed,
                    format!(
                        "{failure}; rolling {process} back failed too ({why}), so {process} stays on the new release"
                    ),
                );
                self.rolling_back(failure, remaining, out)
            }
            (Phase::MaintenanceOff { then }, Event::MaintenanceSet { on: false }) => {
                self.maintenance = false;
                self.finish(*then, out)
            }
            // Anything else is stale (an answer to an action of an earlier
            // phase, or a duplicate): ignored.
            _ => {}
        }
    }

    fn stop_old(&mut self, index: usize, out: &mut Vec<Action>) {
        if let Some(failure) = self.stopping.take() {
            // Put back what was stopped; nothing else ran.
            return self.back_out(failure, index.checked_sub(1), out);
        }
        match self.shape.order.get(index).cloned() {
            Some(process) => {
                self.enter(Phase::Fallback { stage: FallbackStage::StoppingOld { index } }, None);
                out.push(Action::Roll { process, to: RollTo::Nothing });
            }
            None => {
                self.enter(Phase::ReleaseTasks, None);
                out.push(Action::RunTasks { post: false });
            }
        }
    }

    fn index_of_canary(&self) -> usize {
        self.shape.canary.as_ref().and_then(|c| self.shape.order.iter().position(|p| p == c)).unwrap_or(0)
    }

    /// Abort the work in progress; its end ends the phase with `failure`.
    /// If it does not end within [`STOP_GRACE_MS`], the phase ends anyway.
    fn request_stop(&mut self, failure: Failure, now: u64, out: &mut Vec<Action>) {
        if self.stopping.is_none() {
            self.stopping = Some(failure);
            self.deadline_ms = Some(now + STOP_GRACE_MS);
            out.push(Action::Abort);
        }
    }

    /// The work in progress did not end after being aborted: go on without
    /// its answer.
    fn give_up_waiting(&mut self, failure: Failure, out: &mut Vec<Action>) {
        match self.phase.clone() {
            Phase::Building | Phase::MigrationGate => self.end(Outcome::Failed { failure }, out),
            Phase::ReleaseTasks => {
                let through = if self.maintenance { Some(self.shape.order.len() - 1) } else { None };
                self.back_out(failure, through, out)
            }
            Phase::Rolling { index } => self.back_out(failure, Some(index), out),
            Phase::PostTasks => self.end(Outcome::Succeeded { note: Some(failure) }, out),
            _ => self.deadline_ms = None,
        }
    }

    fn cancel(&mut self, why: String, now: u64, out: &mut Vec<Action>) {
        let failure = Failure::new(FailureKind::Cancelled, why);
        match self.phase.clone() {
            // The work in progress is stopped (the build's or task's
            // process group, the rollout's next steps); its end decides
            // what follows: nothing changed yet (build, gate, release
            // tasks: failed), roll back (rolling), or the release stays
            // live (post tasks).
            Phase::Building | Phase::MigrationGate | Phase::ReleaseTasks | Phase::Rolling { .. } | Phase::PostTasks => {
                self.request_stop(failure, now, out)
            }
            // The fallback's stops run to their end, then put back.
            Phase::Fallback { .. } => {
                self.stopping.get_or_insert(failure);
            }
            Phase::Canary { .. } => {
                let index = self.index_of_canary();
                out.push(Action::Abort);
                self.back_out(failure, Some(index), out)
            }
            // Already going back or ending: a cancel changes nothing.
            Phase::RollingBack { .. } | Phase::MaintenanceOff { .. } | Phase::Done { .. } => {}
        }
    }

    fn tick(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(deadline) = self.deadline_ms else { return };
        if now < deadline {
            return;
        }
        if let Some(failure) = self.stopping.take() {
            return self.give_up_waiting(failure, out);
        }
        let timeout = |what: String| Failure::new(FailureKind::Timeout, format!("{what} took too long"));
        match self.phase.clone() {
            Phase::Building => self.request_stop(timeout("the build".into()), now, out),
            Phase::MigrationGate => self.request_stop(timeout("the migration gate".into()), now, out),
            Phase::ReleaseTasks => self.request_stop(timeout("the release tasks".into()), now, out),
            Phase::PostTasks => self.request_stop(timeout("the post tasks".into()), now, out),
            Phase::Rolling { index } => {
                let what = format!("rolling {}", self.shape.order[index]);
                self.request_stop(timeout(what), now, out)
            }
            Phase::Canary { .. } => {
                let index = self.index_of_canary();
                out.push(Action::Abort);
                self.back_out(timeout("the canary".into()), Some(index), out)
            }
            _ => self.deadline_ms = None,
        }
    }

    fn restarted(&mut self, task: Option<TaskFate>, now: u64, out: &mut Vec<Action>) {
        let stopped = |why: &str| Failure::new(FailureKind::DaemonStopped, format!("the daemon stopped during {why}"));
        match self.phase.clone() {
            Phase::Building | Phase::MigrationGate => {
                let why = stopped(self.phase.name());
                self.end(Outcome::Failed { failure: why }, out)
            }
            Phase::ReleaseTasks | Phase::PostTasks if task.is_some_and(|t| t.resumes()) => {
                let post = self.phase == Phase::PostTasks;
                self.deadline_ms = Some(now + self.shape.limits.tasks_ms);
                out.push(Action::AwaitLeftoverTask { post });
            }
            Phase::ReleaseTasks => {
                let through = if self.maintenance { Some(self.shape.order.len() - 1) } else { None };
                self.back_out(stopped("the release tasks"), through, out)
            }
            Phase::PostTasks => {
                // Promote again: the previous daemon may have stored the
                // phase and died before it carried the promotion out.
                out.push(Action::Promote);
                self.end(Outcome::Succeeded { note: None }, out)
            }
            Phase::Fallback { stage: FallbackStage::MaintenanceOn } => {
                // Maintenance may or may not be on: switch it off (nothing
                // was stopped yet).
                self.end(Outcome::Failed { failure: stopped("the maintenance fallback") }, out)
            }
            Phase::Fallback { stage: FallbackStage::StoppingOld { index } } => {
                self.back_out(stopped("the maintenance fallback"), Some(index), out)
            }
            Phase::Canary { .. } => {
                let index = self.index_of_canary();
                self.back_out(stopped("the canary"), Some(index), out)
            }
            Phase::Rolling { index } => self.back_out(stopped("the rollout"), Some(index), out),
            Phase::RollingBack { failure, remaining } => self.rolling_back(failure, remaining, out),
            Phase::MaintenanceOff { then } => {
                self.enter(Phase::MaintenanceOff { then: then.clone() }, None);
                out.push(Action::SetMaintenance { on: false });
            }
            Phase::Done { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests;
