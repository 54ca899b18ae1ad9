//! The engine actor. See the crate docs for the shape; the rules:
//!
//! - Only this task mutates control-plane state. Everything slow (starting,
//!   draining, stopping, waiting for exits) runs in tracked tasks that
//!   report back as [`Internal`] events.
//! - Every change is written to the store before it is acted on: an
//!   instance is recorded `launching` before the driver starts it and
//!   `stopping` before it is drained.
//! - Decisions come from `nonstop-plan` (pure); this file carries them out.

use crate::degraded::{Degraded, PendingEvent};
pub use crate::engine::EngineHandle;
use crate::error::EngineError;
use crate::report::*;
use nonstop_core::driver::{Driver, DriverError, ExitStatus, InstanceHandle, LaunchSpec, Liveness, StopOutcome};
use nonstop_core::process::{AppSpec, ProcessKind, ProcessSpec};
use nonstop_core::traffic::{Backend, BackendHealth, HealthCause, HealthEvent, InitialHealth, RouteKey, Traffic};
use nonstop_core::{AppEnv, AppName, Clock, EnvironmentId, InstanceId, ProcessName, ReleaseId};
use nonstop_plan::rollout::{
    rollout_step, CanaryStep, NewPhase, OldPhase, RolloutAction, RolloutParams, RolloutSlot, RolloutStep,
};
use nonstop_plan::stopped::Gated;
use nonstop_plan::{reconcile, Action, Observed, ObservedInstance, Phase, SlotBackoff};
use nonstop_store::{AppRecord, InstancePhase, InstanceRecord, Store};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[path = "base.rs"]
pub mod base;
#[path = "canary.rs"]
pub(crate) mod canary;
#[path = "config.rs"]
pub(crate) mod config;
#[path = "counts.rs"]
pub(crate) mod counts;
#[path = "deploy.rs"]
pub(crate) mod deploy;
#[path = "deployment.rs"]
pub(crate) mod deployment;
#[path = "environments.rs"]
pub mod environments;
#[path = "gate.rs"]
pub mod gate;
#[path = "maintenance.rs"]
pub(crate) mod maintenance;
#[path = "promote.rs"]
pub(crate) mod promote;
#[path = "secrets.rs"]
pub(crate) mod secrets;
#[path = "statics.rs"]
pub(crate) mod statics;
#[path = "stopped.rs"]
pub(crate) mod stopped;
#[path = "tasks.rs"]
pub(crate) mod tasks;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use nonstop_core::ingress::{Ingress, IngressError};

/// `IngressError::into_engine` at the call sites (the error lives in
/// `nonstop-core`; the mapping is `From<IngressError> for EngineError`).
pub(crate) trait IntoEngine {
    fn into_engine(self) -> EngineError;
}

impl IntoEngine for IngressError {
    fn into_engine(self) -> EngineError {
        EngineError::from(self)
    }
}

pub use nonstop_core::build::{BuildError, BuildNote, BuildOutput, Builder, InstanceLogs, NoBuilder};

#[derive(Clone)]
pub struct EngineConfig {
    /// The environment of requests that name none.
    pub environment: EnvironmentId,
    pub clock: Arc<dyn Clock>,
    pub builder: Arc<dyn Builder>,
    /// The migration gate for apps with a `[database]`.
    pub schema_gate: Arc<dyn gate::SchemaGate>,
    /// Where the secrets key is (`secrets.rs`).
    pub secrets: secrets::SecretsKeyConfig,
    /// The servers of `[base]` (`base.rs`).
    pub base: Arc<dyn base::BaseServices>,
}

impl EngineConfig {
    /// An engine without a release builder (`deploy` answers with an error)
    /// and without a migration gate.
    pub fn new(environment: EnvironmentId, clock: Arc<dyn Clock>) -> Self {
        Self {
            environment,
            clock,
            builder: Arc::new(NoBuilder),
            schema_gate: Arc::new(gate::NoSchemaGate),
            secrets: secrets::SecretsKeyConfig::none(),
            base: Arc::new(base::NoBaseServices),
        }
    }
}

/// How `nonstop deploy` may go about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeployOptions {
    /// Run `[release] tasks` also when the content is that of a retained
    /// release (which is then reused, not rebuilt).
    pub run_tasks: bool,
    /// Ship a migration the gate finds breaking through the maintenance
    /// fallback (maintenance on, old release stopped, tasks, new release
    /// started, maintenance off) instead of refusing it.
    pub allow_breaking: bool,
}

/// How `nonstop rollback` may go about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RollbackOptions {
    /// Run the target release's `[release] tasks` again.
    pub run_tasks: bool,
    /// Roll back even to a release that expects a schema the database no
    /// longer has.
    pub force: bool,
}

pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Answer a command with an error.
pub(crate) fn refuse<T>(reply: Reply<T>, err: EngineError) {
    let _ = reply.send(Err(err));
}
pub type ProgressTx = mpsc::UnboundedSender<Progress>;

/// Requests to a controller: a closed set.
pub(crate) enum Command {
    Up {
        spec: Box<AppSpec>,
        workdir: PathBuf,
        base_env: BTreeMap<String, String>,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Down {
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Scale {
        counts: BTreeMap<ProcessName, u32>,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Restart {
        process: Option<ProcessName>,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Status {
        reply: Reply<StatusReport>,
    },
    RunContext {
        /// A retained release instead of the current one.
        release: Option<ReleaseId>,
        reply: Reply<RunContext>,
    },
    Events {
        limit: usize,
        reply: Reply<Vec<EventEntry>>,
    },
    Deploy {
        spec: Box<AppSpec>,
        source: PathBuf,
        base_env: BTreeMap<String, String>,
        message: Option<String>,
        who: String,
        options: DeployOptions,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    /// Stop the deploy, rollback or rolling restart in progress.
    Cancel {
        who: String,
        reason: Option<String>,
        reply: Reply<OpReport>,
    },
    Rollback {
        release: Option<ReleaseId>,
        options: RollbackOptions,
        who: String,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Releases {
        reply: Reply<Vec<ReleaseInfo>>,
    },
    History {
        limit: usize,
        reply: Reply<Vec<DeploymentInfo>>,
    },
    /// Maintenance on (`Some`) or off; not an operation: allowed at any
    /// time (`maintenance.rs`).
    Maintenance {
        setting: Option<nonstop_core::maintenance::Maintenance>,
        who: String,
        reply: Reply<OpReport>,
    },
    /// `nonstop stop` (`stopped.rs`).
    Stop {
        who: String,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    /// `nonstop start` (`stopped.rs`).
    Start {
        who: String,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    /// `nonstop secrets ...` (`secrets.rs`); `app`: the app named by the
    /// request, which may get secrets before it runs here.
    Secrets {
        app: Option<AppName>,
        request: secrets::SecretsRequest,
    },
    /// `nonstop config ...` (`config.rs`); `app` as for `Secrets`.
    Config {
        app: Option<AppName>,
        request: Box<config::ConfigRequest>,
    },
    /// `nonstop promote`, to its source or its target (`promote.rs`).
    Promote(Box<promote::PromoteCommand>),
    /// `nonstop env create|destroy` (`environments.rs`).
    Env(environments::EnvRequest),
}

impl Command {
    /// The app an `up` or `deploy` brings (its spec names it): the one
    /// request that may start a controller.
    pub(crate) fn brings_app(&self) -> Option<&AppName> {
        match self {
            Command::Up { spec, .. } | Command::Deploy { spec, .. } => Some(&spec.app),
            Command::Secrets { app, .. } | Command::Config { app, .. } => app.as_ref(),
            Command::Promote(p) => p.brings_app(),
            Command::Env(request) => request.brings_app(),
            _ => None,
        }
    }
}

/// Results of the engine's own background tasks.
pub(crate) enum Internal {
    Started {
        id: InstanceId,
        result: Result<InstanceHandle, StartError>,
    },
    Exited {
        id: InstanceId,
        status: ExitStatus,
    },
    Stopped {
        id: InstanceId,
        /// `web.1 (v2, old)`, as it was when the stop began.
        label: String,
        outcome: Result<StopOutcome, DriverCallError>,
    },
    /// The main process ended; the rest of the instance may still be
    /// finishing (its exit comes as `Exited`).
    MainExited {
        id: InstanceId,
    },
    Built {
        deployment: i64,
        result: Result<BuildOutput, BuildError>,
    },
    GateChecked {
        deployment: i64,
        answer: gate::GateAnswer,
    },
    CanaryWindow {
        deployment: i64,
        step: usize,
        old: nonstop_plan::deployment::Window,
        new: nonstop_plan::deployment::Window,
    },
    TasksDone {
        deployment: i64,
        post: bool,
        result: Result<(), tasks::TasksError>,
    },
    /// A release or post task's process exists: record its handle.
    TaskStarted {
        task: i64,
        handle: nonstop_core::driver::TaskHandle,
    },
    /// A release or post task ended (or could not run, or was stopped).
    TaskEnded {
        task: i64,
        result: Result<nonstop_core::driver::TaskOutcome, tasks::TaskError>,
    },
    /// A build command's process exists: record it.
    BuildCommand {
        deployment: i64,
        index: usize,
        process: nonstop_core::driver::Locator,
    },
    BuildCommandEnded {
        deployment: i64,
        index: usize,
        status: ExitStatus,
    },
    /// A task left running by an earlier daemon was killed (or could not be).
    TaskKilled {
        task: i64,
        result: Result<StopOutcome, tasks::KillError>,
    },
    /// The content hash of a pending deploy's app directory.
    Hashed {
        result: Result<String, BuildError>,
    },
    /// The base services answered (`base.rs`).
    Base(Box<base::BaseAnswer>),
    /// A step of `env destroy` ended (`environments.rs`).
    Env(environments::EnvEvent),
}

/// The commands, each answered by the addressed environment's controller.
impl EngineHandle {
    pub async fn up(
        &self,
        spec: AppSpec,
        workdir: PathBuf,
        base_env: BTreeMap<String, String>,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Up { spec: Box::new(spec), workdir, base_env, progress, reply }).await
    }
    pub async fn down(&self, progress: ProgressTx) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Down { progress, reply }).await
    }
    pub async fn scale(
        &self,
        counts: BTreeMap<ProcessName, u32>,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Scale { counts, progress, reply }).await
    }
    pub async fn restart(&self, process: Option<ProcessName>, progress: ProgressTx) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Restart { process, progress, reply }).await
    }
    pub async fn status(&self) -> Result<StatusReport, EngineError> {
        self.ask(|reply| Command::Status { reply }).await
    }
    /// The code, directory and environment a one-off command runs with:
    /// the current release's, or those of the retained `release`.
    pub async fn run_context(&self, release: Option<ReleaseId>) -> Result<RunContext, EngineError> {
        self.ask(|reply| Command::RunContext { release, reply }).await
    }
    pub async fn events(&self, limit: usize) -> Result<Vec<EventEntry>, EngineError> {
        self.ask(|reply| Command::Events { limit, reply }).await
    }
    #[allow(clippy::too_many_arguments)]
    pub async fn deploy(
        &self,
        spec: AppSpec,
        source: PathBuf,
        base_env: BTreeMap<String, String>,
        message: Option<String>,
        who: String,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        self.deploy_with_tasks(spec, source, base_env, message, who, false, progress).await
    }
    /// `deploy`; with `run_tasks`, a deploy whose content is that of a
    /// retained release (rolled to without building) runs its release
    /// tasks again.
    #[allow(clippy::too_many_arguments)]
    pub async fn deploy_with_tasks(
        &self,
        spec: AppSpec,
        source: PathBuf,
        base_env: BTreeMap<String, String>,
        message: Option<String>,
        who: String,
        run_tasks: bool,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        let options = DeployOptions { run_tasks, ..DeployOptions::default() };
        self.deploy_with(spec, source, base_env, message, who, options, progress).await
    }
    /// `deploy` with every option.
    #[allow(clippy::too_many_arguments)]
    pub async fn deploy_with(
        &self,
        spec: AppSpec,
        source: PathBuf,
        base_env: BTreeMap<String, String>,
        message: Option<String>,
        who: String,
        options: DeployOptions,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Deploy {
            spec: Box::new(spec),
            source,
            base_env,
            message,
            who,
            options,
            progress,
            reply,
        })
        .await
    }
    pub async fn rollback(
        &self,
        release: Option<ReleaseId>,
        run_tasks: bool,
        who: String,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        self.rollback_with(release, RollbackOptions { run_tasks, force: false }, who, progress).await
    }
    /// `rollback` with every option.
    pub async fn rollback_with(
        &self,
        release: Option<ReleaseId>,
        options: RollbackOptions,
        who: String,
        progress: ProgressTx,
    ) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Rollback { release, options, who, progress, reply }).await
    }
    /// Stop the deploy, rollback or rolling restart in progress (see
    /// `Engine::cancel`); answers at once, the operation ends by itself.
    /// `reason`: a line of text recorded with `who`, if given.
    pub async fn cancel(&self, who: String, reason: Option<String>) -> Result<OpReport, EngineError> {
        match self.ask(|reply| Command::Cancel { who, reason, reply }).await {
            // No app here at all: nothing can be in progress.
            Err(EngineError::NotUp) => {
                Ok(OpReport { summary: "nothing to cancel: no operation is in progress".into(), changed: false })
            }
            other => other,
        }
    }
    pub async fn releases(&self) -> Result<Vec<ReleaseInfo>, EngineError> {
        self.ask(|reply| Command::Releases { reply }).await
    }
    pub async fn history(&self, limit: usize) -> Result<Vec<DeploymentInfo>, EngineError> {
        self.ask(|reply| Command::History { limit, reply }).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstPhase {
    Launching,
    Starting,
    Ready,
    Stopping,
}

pub(crate) struct Inst {
    id: InstanceId,
    kind: ProcessKind,
    release: ReleaseId,
    handle: Option<InstanceHandle>,
    phase: InstPhase,
    started: Instant,
    started_wall: SystemTime,
    health: Option<BackendHealth>,
    last_checks: VecDeque<String>,
    /// A stop was asked for while it was still launching.
    stop_requested: bool,
    /// It answered its health check but failed a smoke check (the
    /// proxy's words): it never takes traffic, and a rollout fails on it.
    smoke_failure: Option<String>,
    /// The proxy took it out of rotation as an outlier (the proxy's
    /// words): it answered only 5xx while its peers did not.
    ejected: Option<String>,
}

impl Inst {
    fn new(
        id: InstanceId,
        kind: ProcessKind,
        release: ReleaseId,
        handle: Option<InstanceHandle>,
        phase: InstPhase,
        started: (Instant, SystemTime),
    ) -> Self {
        Inst {
            id,
            kind,
            release,
            handle,
            phase,
            started: started.0,
            started_wall: started.1,
            health: None,
            last_checks: VecDeque::new(),
            stop_requested: false,
            smoke_failure: None,
            ejected: None,
        }
    }
}

/// A release as the engine runs it: its spec and its directory.
#[derive(Debug, Clone)]
pub(crate) struct ReleaseCtx {
    pub(crate) id: ReleaseId,
    pub(crate) spec: AppSpec,
    pub(crate) workdir: PathBuf,
}

impl ReleaseCtx {
    /// The process spec in this release, or a zero-count copy of `fallback`
    /// when the release no longer has that process type.
    fn process_or_zero(&self, name: &ProcessName, fallback: Option<&ProcessSpec>) -> Option<ProcessSpec> {
        match self.spec.process(name) {
            Some(p) => Some(p.clone()),
            None => fallback.map(|f| ProcessSpec { count: 0, ..f.clone() }),
        }
    }
}

pub(crate) enum RolloutResult {
    Done(ProcessName),
    Failed(ProcessName, String),
    /// A canary rollout's instance serves (the rollout waits, holding it).
    CanaryReady(ProcessName, InstanceId),
}

/// A rollout held at its canary: one new instance beside every old one,
/// given `percent` of the traffic, until the deployment's ramp ends.
#[derive(Debug, Clone)]
pub(crate) struct CanaryHold {
    pub(crate) percent: u8,
    /// Reported ready (once).
    pub(crate) ready: Option<InstanceId>,
}

struct RolloutState {
    process: ProcessName,
    /// The release new instances run.
    release: ReleaseId,
    params: RolloutParams,
    old: BTreeSet<InstanceId>,
    new: BTreeMap<u32, InstanceId>,
    /// Why a new instance failed, if one did.
    failure: Option<String>,
    /// `nonstop cancel`: fail at the next step with this reason.
    cancelled: Option<String>,
    /// Held at its canary (a deploy's live-traffic gate).
    pub(crate) canary: Option<CanaryHold>,
}

pub(crate) struct Op {
    name: &'static str,
    since: SystemTime,
    progress: ProgressTx,
    reply: Option<Reply<OpReport>>,
    /// Processes still to roll, in order.
    queue: VecDeque<ProcessName>,
    summary: String,
    changed: bool,
    /// `down`: done when nothing is left.
    down: bool,
    last_progress: Option<(u32, u32)>,
    /// Who asked (deploys and rollbacks).
    who: Option<String>,
}

pub(crate) struct AppRuntime {
    record: AppRecord,
    route: RouteKey,
    instances: BTreeMap<InstanceId, Inst>,
    backoff: BTreeMap<(ProcessName, u32), SlotBackoff>,
    last_exit: BTreeMap<(ProcessName, u32), (InstanceId, ExitStatus)>,
    rollout: Option<RolloutState>,
    /// During a deployment: the release each process type it touched runs.
    targets: BTreeMap<ProcessName, ReleaseCtx>,
}

/// The proxy route of an app in an environment.
pub(crate) fn route_key(app: &AppName, env: &EnvironmentId) -> RouteKey {
    AppEnv::new(app.clone(), env.clone()).route()
}

impl AppRuntime {
    fn new(record: AppRecord) -> Self {
        let route = route_key(&record.app, &record.environment);
        AppRuntime {
            record,
            route,
            instances: BTreeMap::new(),
            backoff: BTreeMap::new(),
            last_exit: BTreeMap::new(),
            rollout: None,
            targets: BTreeMap::new(),
        }
    }

    /// Restarts of the slot `id` fills.
    fn restarts(&self, id: &InstanceId) -> u32 {
        self.backoff.get(&(id.process.clone(), id.slot)).map(|b| b.restarts).unwrap_or(0)
    }

    /// What the store keeps of `inst`, in `phase`.
    fn record_of(&self, inst: &Inst, phase: InstancePhase, was_healthy: bool) -> InstanceRecord {
        InstanceRecord {
            app: self.record.app.clone(),
            environment: self.record.environment.clone(),
            id: inst.id.clone(),
            release: inst.release,
            handle: inst.handle.clone(),
            phase,
            was_healthy,
            started_at: inst.started_wall,
            restarts: self.restarts(&inst.id),
        }
    }

    fn current(&self) -> ReleaseCtx {
        ReleaseCtx { id: self.record.release, spec: self.record.spec.clone(), workdir: self.record.workdir.clone() }
    }

    /// The release a process type runs now.
    fn ctx_for(&self, process: &ProcessName) -> ReleaseCtx {
        self.targets.get(process).cloned().unwrap_or_else(|| self.current())
    }

    /// The spec of a process type as it should run now (a target release
    /// that dropped it gives a zero count).
    fn process_spec(&self, process: &ProcessName) -> Option<ProcessSpec> {
        match self.targets.get(process) {
            Some(t) => t.process_or_zero(process, self.record.spec.process(process)),
            None => self.record.spec.process(process).cloned(),
        }
    }

    /// Every process type that should run, with its spec.
    fn desired(&self) -> Vec<ProcessSpec> {
        if !self.record.running {
            return Vec::new();
        }
        let mut out: Vec<ProcessSpec> = Vec::new();
        for p in &self.record.spec.processes {
            if let Some(spec) = self.process_spec(&p.name) {
                out.push(spec);
            }
        }
        for (name, t) in &self.targets {
            if self.record.spec.process(name).is_none() {
                if let Some(p) = t.spec.process(name) {
                    out.push(p.clone());
                }
            }
        }
        out
    }
}

/// One environment of one app: its runtime, its operation and its
/// deployment. An actor: only its own task touches this.
pub struct Controller<D, T, I, L> {
    /// The app and environment this controller owns.
    scope: AppEnv,
    env: EnvironmentId,
    clock: Arc<dyn Clock>,
    driver: Arc<D>,
    traffic: Arc<T>,
    ingress: Arc<I>,
    logs: Arc<L>,
    store: Arc<Store>,
    app: Option<AppRuntime>,
    op: Option<Op>,
    events_tx: mpsc::UnboundedSender<Internal>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    pub(crate) builder: Arc<dyn Builder>,
    pub(crate) schema_gate: Arc<dyn gate::SchemaGate>,
    pub(crate) deployment: Option<deploy::DeployRun>,
    /// A deploy whose app directory is being hashed (off this task).
    pub(crate) pending_deploy: Option<deploy::PendingDeploy>,
    /// What could not be written to the store (a full disk): blocked
    /// starts retried soon, events kept in memory. A mutex only so that
    /// `event(&self)` can keep one.
    degraded: std::sync::Mutex<Degraded>,
    /// Release and post tasks this engine runs or waits for, by record id.
    pub(crate) live_tasks: BTreeMap<i64, tasks::LiveTask>,
    /// The app's maintenance and stopped state, as stored.
    pub(crate) controls: nonstop_store::Controls,
    /// The decrypted secrets its processes get (`secrets.rs`).
    pub(crate) secrets: secrets::SecretsState,
    /// The servers of `[base]`, and a command held while they make the
    /// environment's database (`base.rs`).
    pub(crate) base: Arc<dyn base::BaseServices>,
    pub(crate) pending_base: Option<base::PendingBase>,
    /// `env destroy` under way or done (`environments.rs`).
    pub(crate) destroying: Option<environments::Destroying>,
}

const CHECK_HISTORY: usize = 5;

/// The engine's own deadlines on driver calls, on top of the timeouts the
/// driver is given and enforces: a driver (a remote API behind it) that
/// never answers must not hold an instance slot, a stop or a deploy
/// forever. A call past its deadline is abandoned (dropped) and reported
/// as failed: [`DriverSilent`].
///
/// `start` returns once the process exists, not once it is ready.
pub(crate) const DRIVER_START_DEADLINE: Duration = Duration::from_secs(120);
/// On top of the drain and stop timeouts.
pub(crate) const DRIVER_STOP_MARGIN: Duration = Duration::from_secs(30);
/// On top of a task's own timeout.
pub(crate) const DRIVER_TASK_MARGIN: Duration = Duration::from_secs(60);

/// A driver call abandoned at its deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the driver did not answer `{call}` within {} and was given up on; check the machine (or the cloud API) it \
     drives",
    fmt_dur(*deadline)
)]
pub(crate) struct DriverSilent {
    pub(crate) call: &'static str,
    pub(crate) deadline: Duration,
}

/// A driver call that failed, or that was given up on. Clone: it comes
/// back to the controller in an event.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum DriverCallError {
    #[error(transparent)]
    Failed(Arc<DriverError>),
    #[error(transparent)]
    Silent(#[from] DriverSilent),
}

impl From<DriverError> for DriverCallError {
    fn from(e: DriverError) -> Self {
        DriverCallError::Failed(Arc::new(e))
    }
}

/// Why an instance did not start.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsUnavailable),
    #[error(transparent)]
    Driver(#[from] DriverCallError),
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// The controller of `scope`: restores its state from the store
    /// (re-adopting live instances), then runs until `shutdown` fires.
    /// Instances keep running when it stops.
    pub(crate) fn spawn(
        scope: AppEnv,
        config: &EngineConfig,
        parts: &crate::engine::Parts<D, T, I, L>,
        shutdown: CancellationToken,
    ) -> (mpsc::Sender<Command>, tokio::task::JoinHandle<()>) {
        let (driver, traffic, ingress, logs, store) = (
            parts.driver.clone(),
            parts.traffic.clone(),
            parts.ingress.clone(),
            parts.logs.clone(),
            parts.store.clone(),
        );
        let (tx, rx) = mpsc::channel(64);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let health = traffic.subscribe();
        let controller = Controller {
            env: scope.env.clone(),
            scope,
            clock: config.clock.clone(),
            driver,
            traffic,
            ingress,
            logs,
            store,
            app: None,
            op: None,
            events_tx,
            tasks: TaskTracker::new(),
            cancel: shutdown.child_token(),
            builder: config.builder.clone(),
            schema_gate: config.schema_gate.clone(),
            deployment: None,
            pending_deploy: None,
            degraded: std::sync::Mutex::new(Degraded::default()),
            live_tasks: BTreeMap::new(),
            controls: nonstop_store::Controls::default(),
            secrets: secrets::SecretsState::new(config.secrets.clone()),
            base: config.base.clone(),
            pending_base: None,
            destroying: None,
        };
        let join = tokio::spawn(controller.run(rx, events_rx, health, shutdown));
        (tx, join)
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
        mut health: broadcast::Receiver<HealthEvent>,
        shutdown: CancellationToken,
    ) {
        if let Err(e) = self.restore() {
            tracing::error!("could not restore state: {e}");
        }
        self.step();
        loop {
            let wake = self.next_wake().map(tokio::time::Instant::from_std);
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some(ev) = internal.recv() => self.on_internal(ev),
                h = health.recv() => match h {
                    Ok(ev) => self.on_health(ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => self.resync_health(),
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                _ = sleep => {}
            }
            self.step();
        }
        // Daemon shutdown, not `down`: instances keep running and the next
        // daemon re-adopts them. Background waits are abandoned.
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        if let Some(op) = self.op.take() {
            if let Some(reply) = op.reply {
                let _ = reply.send(Err(EngineError::ShuttingDown));
            }
        }
    }

    /// Serve `spec`'s web processes on `route`: the proxy listens as the
    /// spec says and the route claims the environment's hosts (and the
    /// hosts no one claims, if it is the default). A host another
    /// environment holds is refused, naming it, and nothing changes.
    pub(crate) fn expose(&self, spec: &AppSpec, route: &RouteKey) -> Result<(), EngineError> {
        self.ingress.listen(&spec.proxy, route).map_err(IngressError::into_engine)?;
        match self.ingress.set_hosts(route, &spec.hosts, spec.default_host) {
            // A data plane older than host routing (kept across `nonstop
            // upgrade`): the route answers every host, as it did.
            Err(IngressError::Unavailable(why)) => {
                tracing::warn!(
                    "{}: hosts not set ({why}); it answers every host until the keeper is restarted",
                    route.0
                );
                Ok(())
            }
            other => other.map_err(IngressError::into_engine),
        }
    }

    // ---------------------------------------------------------------- restore

    fn restore(&mut self) -> Result<(), EngineError> {
        let scope = self.scope.clone();
        let mine = move |r: &AppRecord| r.app == scope.app && r.environment == scope.env && r.running;
        let records = self.store.apps()?;
        // A deployment of this app that does not run (a first deploy
        // interrupted while building): nothing was started, end it as failed.
        let runs = records.iter().any(&mine);
        let stale = self.store.apps_with_running_deployments(&self.env)?.contains(&self.scope.app);
        if stale && !runs {
            let app = self.scope.app.clone();
            self.fail_stale_deployment(&app)?;
        }
        let Some(mut record) = records.into_iter().find(|r| mine(r)) else {
            return Ok(());
        };
        self.restore_counts(&mut record)?;
        let route = route_key(&record.app, &record.environment);
        // Maintenance (and a stop) survive the daemon: given to the proxy
        // again before it listens and before any instance is in rotation.
        self.load_controls(&record.app, &route)?;
        if record.spec.processes.iter().any(|p| p.kind == ProcessKind::Web) {
            if let Err(e) = self.expose(&record.spec, &route) {
                tracing::error!("the proxy cannot be set up: {}", e);
            }
        }
        let now = self.clock.now();
        let wall = self.clock.wall();
        let mut rt = AppRuntime::new(record);
        let recorded = self.store.instances(&rt.record.app, &self.env)?;
        let mut adopted = 0;
        for rec in recorded {
            let spec = rt.record.spec.process(&rec.id.process).cloned();
            // Forgotten only when proven gone: one the driver cannot tell
            // about now (out of file descriptors) is adopted, and its exit
            // watched like any other's.
            let liveness = rec.handle.as_ref().map(|h| self.driver.liveness(h));
            if let Some(Liveness::Unknown(why)) = &liveness {
                tracing::warn!("{} is adopted although its liveness is unknown ({why}); its exit is watched", rec.id);
            }
            let alive = matches!(liveness, Some(Liveness::Alive | Liveness::Unknown(_)));
            let (Some(handle), true) = (rec.handle.clone(), alive) else {
                if rec.phase == InstancePhase::Launching {
                    tracing::warn!("{} was being launched when the daemon stopped; forgetting it", rec.id);
                }
                if let Some(h) = rec.handle.clone() {
                    // Its monitor is gone, but its process may not be: the
                    // driver kills what is left (and does nothing if nothing is).
                    let driver = self.driver.clone();
                    self.tasks.spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(30),
                            driver.stop(&h, nonstop_core::Signal::Kill, Duration::from_secs(5)),
                        )
                        .await;
                    });
                }
                self.store.delete_instance(&rt.record.app, &self.env, &rec.id)?;
                self.event(&rt.record.app, "gone", Some(&rec.id), "exited while the daemon was down");
                continue;
            };
            let kind = spec.as_ref().map(|s| s.kind).unwrap_or(ProcessKind::Worker);
            let age = wall.duration_since(rec.started_at).unwrap_or_default();
            let started = now.checked_sub(age).unwrap_or(now);
            let phase = match (rec.phase, kind) {
                (InstancePhase::Stopping, _) => InstPhase::Stopping,
                (_, ProcessKind::Web) if rec.was_healthy => InstPhase::Ready,
                (_, ProcessKind::Web) => InstPhase::Starting,
                _ => InstPhase::Starting, // workers: ready_after is checked in step()
            };
            if kind == ProcessKind::Web && phase != InstPhase::Stopping {
                if let (Some(addr), Some(check)) = (handle.addr, spec.as_ref().and_then(|s| s.health.clone())) {
                    let check = crate::preflight::instance_check(check, &rt.ctx_for(&rec.id.process).spec.statics);
                    let initial = if rec.was_healthy { InitialHealth::AssumeHealthy } else { InitialHealth::Pending };
                    self.traffic.add(&rt.route, Backend { instance: rec.id.clone(), addr }, check, initial);
                }
            }
            rt.backoff.insert(
                (rec.id.process.clone(), rec.id.slot),
                SlotBackoff { consecutive_failures: 0, restarts: rec.restarts, retry_at: None },
            );
            self.watch_exit(handle.clone());
            rt.instances.insert(
                rec.id.clone(),
                Inst::new(rec.id.clone(), kind, rec.release, Some(handle), phase, (started, rec.started_at)),
            );
            adopted += 1;
        }
        // Instances the driver runs that no record knows: a daemon died
        // between starting them and recording them. They are stopped, and
        // tracked as stopping until gone, so that a singleton's replacement
        // waits for them.
        for orphan in self.driver.running(&rt.record.app, &self.env) {
            if rt.instances.contains_key(&orphan.instance) {
                continue;
            }
            tracing::warn!("stopping {}: it runs, but no record of it survived the daemon's restart", orphan.instance);
            self.event(
                &rt.record.app,
                "orphan",
                Some(&orphan.instance),
                "stopped: started by a daemon that died before recording it",
            );
            let kind = rt.record.spec.process(&orphan.instance.process).map(|s| s.kind).unwrap_or(ProcessKind::Worker);
            self.watch_exit(orphan.clone());
            let release = rt.record.release;
            rt.instances.insert(
                orphan.instance.clone(),
                Inst::new(orphan.instance.clone(), kind, release, Some(orphan), InstPhase::Stopping, (now, wall)),
            );
        }
        tracing::info!("restored app {} with {adopted} running instance(s)", rt.record.app);
        self.event(
            &rt.record.app,
            "daemon",
            None,
            &format!("daemon started; re-adopted {adopted} running instance(s)"),
        );
        // Finish stops that were under way.
        let stopping: Vec<InstanceId> =
            rt.instances.values().filter(|i| i.phase == InstPhase::Stopping).map(|i| i.id.clone()).collect();
        self.app = Some(rt);
        for id in stopping {
            self.begin_stop(&id, true);
        }
        self.recover_deployment()?;
        if let Some(app) = self.app.as_ref().map(|rt| rt.record.app.clone()) {
            self.publish_statics(&app);
        }
        Ok(())
    }

    // --------------------------------------------------------------- commands

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::RunContext { release, reply } => {
                let _ = reply.send(self.run_context(release));
            }
            Command::Events { limit, reply } => {
                let r = match &self.app {
                    None => Err(EngineError::NotUp),
                    Some(rt) => self.events(&rt.record.app, limit),
                };
                let _ = reply.send(r);
            }
            Command::Deploy { spec, source, base_env, message, who, options, progress, reply } => {
                // Busy is `begin_deploy`'s to check (after `[base]` too).
                let Some(reply) = self.admit_if_stopped(Some(Gated::Deploy), reply) else { return };
                let request = deploy::DeployRequest { spec: *spec, source, base_env, message, who, options };
                self.begin_deploy(request, progress, reply);
            }
            Command::Rollback { release, options, who, progress, reply } => {
                let Some(reply) = self.admit_if_stopped(Some(Gated::Rollback), reply) else { return };
                self.begin_rollback(release, options, who, progress, reply);
            }
            Command::Cancel { who, reason, reply } => {
                let _ = reply.send(self.cancel(&who, reason.as_deref()));
            }
            Command::Releases { reply } => {
                let _ = reply.send(self.releases());
            }
            Command::History { limit, reply } => {
                let _ = reply.send(self.history(limit));
            }
            Command::Maintenance { setting, who, reply } => {
                let _ = reply.send(self.maintenance_command(setting, &who));
            }
            Command::Stop { who, progress, reply } => self.on_stop_command(who, progress, reply),
            Command::Start { who, progress, reply } => self.on_start_command(who, progress, reply),
            Command::Secrets { request, .. } => self.on_secrets(request),
            Command::Config { request, .. } => self.on_config(*request),
            Command::Promote(command) => self.on_promote(*command),
            Command::Env(request) => self.on_env(request),
            Command::Up { spec, workdir, base_env, progress, reply } => {
                // The environment's database first, if `[base]` asks for one.
                let waiting = base::Waiting::Up { spec, workdir, base_env, progress, reply };
                let Some(base::Waiting::Up { spec, workdir, base_env, progress, reply }) = self.hold_for_base(waiting)
                else {
                    return;
                };
                let same_app = self.app.as_ref().is_some_and(|rt| rt.record.app == spec.app);
                // Refused while stopped only for the app that is stopped;
                // while busy, answered below.
                let Some(reply) = self.admit_if_stopped(same_app.then_some(Gated::Up), reply) else { return };
                if let Some(err) = self.busy() {
                    // A deployed app that runs needs nothing from `up`; say
                    // what is going on instead of refusing.
                    if let (Some(rt), Some(op)) = (self.app.as_ref(), self.deployment_summary()) {
                        if rt.record.app == spec.app && rt.record.running && rt.record.release.0 > 0 {
                            let _ = reply.send(Ok(OpReport {
                                summary: format!("already up ({}); in progress: {op}", rt.record.release),
                                changed: false,
                            }));
                            return;
                        }
                    }
                    return refuse(reply, err);
                }
                let runs = self.app.as_ref().is_some_and(|rt| rt.record.running && same_app);
                if !runs {
                    if let Err(e) = self.refresh_secrets() {
                        return refuse(reply, e);
                    }
                }
                match self.up(*spec, workdir, base_env) {
                    Ok((summary, changed, queue)) => {
                        self.begin_op("up", progress, reply, summary, changed, queue, false)
                    }
                    Err(e) => refuse(reply, e),
                }
            }
            Command::Down { progress, reply } => {
                let Some(reply) = self.admit(None, reply) else { return };
                match self.down() {
                    Ok(summary) => self.begin_op("down", progress, reply, summary, true, VecDeque::new(), true),
                    Err(e) => refuse(reply, e),
                }
            }
            Command::Scale { counts, progress, reply } => {
                let Some(reply) = self.admit(Some(Gated::Scale), reply) else { return };
                match self.scale(counts) {
                    Ok((summary, changed)) => {
                        self.begin_op("scale", progress, reply, summary, changed, VecDeque::new(), false)
                    }
                    Err(e) => refuse(reply, e),
                }
            }
            Command::Restart { process, progress, reply } => {
                let Some(reply) = self.admit(Some(Gated::Restart), reply) else { return };
                if let Err(e) = self.refresh_secrets() {
                    return refuse(reply, e);
                }
                match self.restart_queue(process) {
                    Ok(queue) => {
                        let names: Vec<String> = queue.iter().map(|p| p.to_string()).collect();
                        let summary = format!("restarted {} (rolling)", names.join(", "));
                        self.begin_op("restart", progress, reply, summary, true, queue, false)
                    }
                    Err(e) => refuse(reply, e),
                }
            }
        }
    }

    /// The guard of a command that changes what runs: refused while the
    /// app is stopped (for `stopped`, the operation as `nonstop stop`
    /// gates it; `None`: not checked) or while another operation holds
    /// this controller, the reply getting why. Gives the reply back when
    /// the command may go on.
    pub(crate) fn admit<R>(&self, stopped: Option<Gated>, reply: Reply<R>) -> Option<Reply<R>> {
        let reply = self.admit_if_stopped(stopped, reply)?;
        match self.busy() {
            Some(err) => {
                refuse(reply, err);
                None
            }
            None => Some(reply),
        }
    }

    /// [`Controller::admit`]'s first half: refused while the app is
    /// stopped, busy or not.
    pub(crate) fn admit_if_stopped<R>(&self, stopped: Option<Gated>, reply: Reply<R>) -> Option<Reply<R>> {
        match stopped.and_then(|op| self.refuse_if_stopped(op)) {
            Some(err) => {
                refuse(reply, err);
                None
            }
            None => Some(reply),
        }
    }

    pub(crate) fn busy(&self) -> Option<EngineError> {
        if let Some(e) = self.destroy_busy().or_else(|| self.base_busy()) {
            return Some(e);
        }
        if let Some(p) = &self.pending_deploy {
            return Some(EngineError::Busy {
                operation: format!("deploy by {}", p.request.who),
                since: fmt_wall(p.since),
            });
        }
        // The task it runs (or waits for), named with its pid.
        let task = self
            .live_tasks
            .values()
            .filter(|t| t.record.state == nonstop_store::TaskState::Running)
            .filter(|t| self.deployment.as_ref().is_some_and(|r| r.record.id == t.record.deployment))
            .find_map(|t| {
                Some(format!(", running {} (pid {})", t.record.describe(), t.record.locator.as_ref()?.pid()?))
            })
            .unwrap_or_default();
        self.op.as_ref().map(|op| EngineError::Busy {
            operation: match &op.who {
                Some(who) => format!("{} by {who}{task}", op.name),
                None => format!("{}{task}", op.name),
            },
            since: fmt_wall(op.since),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn begin_op(
        &mut self,
        name: &'static str,
        progress: ProgressTx,
        reply: Reply<OpReport>,
        summary: String,
        changed: bool,
        queue: VecDeque<ProcessName>,
        down: bool,
    ) {
        let _ = progress.send(Progress::note(format!("{name}: {summary}")));
        self.op = Some(Op {
            name,
            since: self.clock.wall(),
            progress,
            reply: Some(reply),
            queue,
            summary,
            changed,
            down,
            last_progress: None,
            who: None,
        });
    }

    fn up(
        &mut self,
        spec: AppSpec,
        workdir: PathBuf,
        base_env: BTreeMap<String, String>,
    ) -> Result<(String, bool, VecDeque<ProcessName>), EngineError> {
        if let Some(rt) = &self.app {
            if rt.record.app != spec.app && rt.record.running {
                return Err(EngineError::OtherApp {
                    running: rt.record.app.to_string(),
                    requested: spec.app.to_string(),
                });
            }
        }
        // An app that runs deployed releases is changed by `deploy`, not `up`.
        if let Some(rt) = self.app.as_mut().filter(|rt| rt.record.app == spec.app && rt.record.release.0 > 0) {
            let release = rt.record.release;
            if rt.record.running {
                return Ok((
                    format!("already up ({release}); nothing changed. To roll out changes in this directory, run `nonstop deploy`"),
                    false,
                    VecDeque::new(),
                ));
            }
            let has_web = rt.record.spec.processes.iter().any(|p| p.kind == ProcessKind::Web);
            let route = rt.route.clone();
            let app = rt.record.app.clone();
            let spec = rt.record.spec.clone();
            self.load_controls(&app, &route)?;
            if has_web {
                self.expose(&spec, &route)?;
            }
            let rt = self.app.as_mut().expect("checked");
            rt.record.running = true;
            self.store.put_app(&rt.record, self.clock.wall())?;
            self.publish_statics(&app);
            return Ok((format!("starting {release} again"), true, VecDeque::new()));
        }
        // The environment's config over the file (`config.rs`); the
        // runtime's counts, unless the toml changed one.
        let mut spec = spec;
        self.store.config(&spec.app, &self.env)?.apply_to(&mut spec);
        let counted = self.count_spec(&mut spec, nonstop_plan::counts::Apply::Toml)?;
        // Checks first: nothing changes if any fails.
        let path_var = base_env.get("PATH").cloned().unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let problems = crate::preflight::check_commands(&spec, &workdir, &path_var);
        if !problems.is_empty() {
            return Err(EngineError::Preflight { problems });
        }
        let route = route_key(&spec.app, &self.env);
        self.load_controls(&spec.app, &route)?;
        if spec.processes.iter().any(|p| p.kind == ProcessKind::Web) {
            self.expose(&spec, &route)?;
        }

        let record = AppRecord {
            app: spec.app.clone(),
            environment: self.env.clone(),
            spec: spec.clone(),
            workdir: workdir.clone(),
            release: ReleaseId(0),
            base_env: base_env.clone(),
            running: true,
        };
        let (summary, changed, queue) = match &mut self.app {
            Some(rt) if rt.record.running => {
                let d = nonstop_plan::diff::diff(&rt.record.spec, &spec);
                let env_changed = rt.record.base_env != base_env || rt.record.workdir != workdir;
                if d.is_empty() && !env_changed {
                    let mut summary = "already up; nothing changed".to_string();
                    for line in &counted.lines {
                        summary.push_str(&format!("; {line}"));
                    }
                    (summary, false, VecDeque::new())
                } else {
                    let mut replaced: Vec<ProcessName> = if env_changed {
                        spec.processes.iter().map(|p| p.name.clone()).collect()
                    } else {
                        d.replaced.clone()
                    };
                    replaced.retain(|p| spec.process(p).is_some());
                    let mut parts = Vec::new();
                    if !d.added.is_empty() {
                        parts.push(format!("added {}", join(&d.added)));
                    }
                    if !d.removed.is_empty() {
                        parts.push(format!("removed {}", join(&d.removed)));
                    }
                    if !replaced.is_empty() {
                        parts.push(format!("rolling {}", join(&replaced)));
                    }
                    parts.extend(counted.lines.iter().cloned());
                    for (p, a, b) in &d.rescaled {
                        if !counted.lines.iter().any(|l| l.starts_with(&format!("{p}: "))) {
                            parts.push(format!("{p} {a}→{b}"));
                        }
                    }
                    if d.listen_changed {
                        parts.push(format!("proxy now on {}", spec.proxy.listen));
                    }
                    let queue = order_processes(&spec, replaced);
                    (parts.join(", "), true, queue)
                }
            }
            _ => {
                let total: u32 = spec.processes.iter().map(|p| p.count).sum();
                (format!("starting {} with {total} instance(s)", spec.app), true, VecDeque::new())
            }
        };
        self.store.put_app(&record, self.clock.wall())?;
        self.record_counts(&spec.app, &counted)?;
        self.event(&spec.app, "up", None, &summary);
        if let Some(rt) = self.app.as_mut().filter(|rt| !rt.record.running) {
            // A fresh start: earlier crash loops are history.
            rt.backoff.clear();
            rt.last_exit.clear();
        }
        self.install_record(record);
        Ok((summary, changed, queue))
    }

    fn down(&mut self) -> Result<String, EngineError> {
        self.app.as_ref().ok_or(EngineError::NotUp)?;
        // A stopped app's counts come back for the next `up`.
        self.forget_stop()?;
        let rt = self.app.as_mut().ok_or(EngineError::NotUp)?;
        rt.record.running = false;
        self.store.put_app(&rt.record, self.clock.wall())?;
        let n = rt.instances.len();
        let app = rt.record.app.clone();
        rt.rollout = None;
        let ids: Vec<InstanceId> = rt.instances.keys().cloned().collect();
        self.event(&app, "down", None, &format!("stopping {n} instance(s)"));
        for id in ids {
            self.begin_stop(&id, false);
        }
        Ok(format!("stopping {n} instance(s) of {app}"))
    }

    fn scale(&mut self, counts: BTreeMap<ProcessName, u32>) -> Result<(String, bool), EngineError> {
        let rt = self.app.as_mut().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let mut spec = rt.record.spec.clone();
        let mut parts = Vec::new();
        let mut scaled = BTreeMap::new();
        for (name, count) in &counts {
            let known = spec.processes.iter().map(|p| p.name.to_string()).collect::<Vec<_>>().join(", ");
            let p = spec
                .processes
                .iter_mut()
                .find(|p| &p.name == name)
                .ok_or_else(|| EngineError::UnknownProcess { name: name.to_string(), known })?;
            if p.kind == ProcessKind::Singleton && *count > 1 {
                return Err(EngineError::SingletonCount { process: name.to_string(), requested: *count });
            }
            if p.count != *count {
                parts.push(format!("{name} {}→{count}", p.count));
            }
            scaled.insert(name.clone(), (p.count, *count));
            p.count = *count;
        }
        let changed = !parts.is_empty();
        let summary = if changed { parts.join(", ") } else { "nothing to change".to_string() };
        let app = rt.record.app.clone();
        // The runtime owns the count from here: deploys and restarts keep it.
        self.record_scaled(&app, &scaled)?;
        let rt = self.app.as_mut().expect("checked");
        rt.record.spec = spec;
        for (name, t) in rt.targets.iter_mut() {
            if let (Some(count), Some(p)) = (counts.get(name), t.spec.processes.iter_mut().find(|p| &p.name == name)) {
                p.count = *count;
            }
        }
        self.store.put_app(&rt.record, self.clock.wall())?;
        self.event(&app, "scale", None, &summary);
        Ok((summary, changed))
    }

    fn restart_queue(&self, process: Option<ProcessName>) -> Result<VecDeque<ProcessName>, EngineError> {
        let rt = self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let spec = &rt.record.spec;
        let names: Vec<ProcessName> = match process {
            Some(p) => {
                if spec.process(&p).is_none() {
                    let known = spec.processes.iter().map(|p| p.name.to_string()).collect::<Vec<_>>().join(", ");
                    return Err(EngineError::UnknownProcess { name: p.to_string(), known });
                }
                vec![p]
            }
            None => spec.processes.iter().map(|p| p.name.clone()).collect(),
        };
        Ok(order_processes(spec, names))
    }

    // ----------------------------------------------------------------- events

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Started { id, result } => self.on_started(id, result),
            Internal::Built { deployment, result } => self.deploy_on_built(deployment, result),
            Internal::GateChecked { deployment, answer } => self.deploy_on_gate(deployment, answer),
            Internal::CanaryWindow { deployment, step, old, new } => {
                self.deploy_on_canary_window(deployment, step, old, new)
            }
            Internal::Hashed { result } => self.deploy_on_hashed(result),
            Internal::Base(answer) => self.on_base_answer(*answer),
            Internal::Env(event) => self.on_env_event(event),
            Internal::TasksDone { deployment, post, result } => self.deploy_on_tasks(deployment, post, result),
            Internal::TaskStarted { task, handle } => self.on_task_started(task, handle),
            Internal::TaskEnded { task, result } => self.on_task_ended(task, result),
            Internal::TaskKilled { task, result } => self.on_task_killed(task, result),
            Internal::BuildCommand { deployment, index, process } => self.on_build_command(deployment, index, process),
            Internal::BuildCommandEnded { deployment, index, status } => {
                self.on_build_command_ended(deployment, index, status)
            }
            Internal::Exited { id, status } => self.on_exited(id, status),
            Internal::MainExited { id } => {
                // Out of rotation now: what is left of it finishes its
                // requests, no new one is sent to it.
                let web =
                    self.app.as_ref().and_then(|rt| rt.instances.get(&id)).is_some_and(|i| i.kind == ProcessKind::Web);
                if web {
                    drop(self.traffic.drain(&id, Duration::ZERO));
                }
            }
            Internal::Stopped { id, label, outcome } => {
                let msg = match outcome {
                    Ok(StopOutcome::Graceful) => "stopped".to_string(),
                    Ok(StopOutcome::Killed) => "killed after its stop timeout".to_string(),
                    Ok(StopOutcome::AlreadyGone) => "already gone".to_string(),
                    Err(e) => format!("stop failed: {e}"),
                };
                if let Some(app) = self.app.as_ref().map(|rt| rt.record.app.clone()) {
                    self.event(&app, "stop", Some(&id), &format!("{label} {msg}"));
                }
                self.progress(format!("{label} {msg}"));
            }
        }
    }

    /// How progress and events name an instance: its slot, its release
    /// and, while its process type is being rolled, whether it is an old
    /// or a new one: `web.1 (v3, new)`, `web.1 (v2, old)`, `worker.1 (v2)`.
    fn instance_label(&self, id: &InstanceId) -> String {
        let Some(rt) = self.app.as_ref() else { return id.slot_name() };
        let Some(inst) = rt.instances.get(id) else { return id.slot_name() };
        let role = match rt.rollout.as_ref().filter(|ro| ro.process == id.process) {
            Some(ro) if ro.new.values().any(|n| n == id) || (inst.release == ro.release && !ro.old.contains(id)) => {
                Some("new")
            }
            Some(_) => Some("old"),
            None => None,
        };
        // Release 0: an app started by `up` alone, without releases.
        let release = (inst.release.0 > 0).then(|| inst.release.to_string());
        match (release, role) {
            (Some(release), Some(role)) => format!("{} ({release}, {role})", id.slot_name()),
            (Some(release), None) => format!("{} ({release})", id.slot_name()),
            (None, Some(role)) => format!("{} ({role})", id.slot_name()),
            (None, None) => id.slot_name(),
        }
    }

    fn on_started(&mut self, id: InstanceId, result: Result<InstanceHandle, StartError>) {
        let (now, wall) = (self.clock.now(), self.clock.wall());
        let Some(rt) = self.app.as_mut() else { return };
        let Some(inst) = rt.instances.get_mut(&id) else { return };
        match result {
            Ok(handle) => {
                // Readiness (`ready_after`, `health_timeout`) and uptime
                // count from here, when the process exists: not from the
                // call to the driver, however long that took.
                (inst.started, inst.started_wall) = (now, wall);
                inst.handle = Some(handle.clone());
                let stop_now = inst.stop_requested;
                inst.phase = InstPhase::Starting;
                let rec = rt.record_of(&rt.instances[&id], InstancePhase::Running, false);
                if let Err(e) = self.store.put_instance(&rec) {
                    tracing::error!("could not record {id}: {e}");
                    store_failed(&self.degraded, &*self.clock, &format!("the record of {id}"), &e);
                }
                let spec = rt.process_spec(&id.process);
                let statics = rt.ctx_for(&id.process).spec.statics;
                let route = rt.route.clone();
                let app = rt.record.app.clone();
                self.watch_exit(handle.clone());
                let detail = match (handle.locator.pid(), handle.addr) {
                    (Some(pid), Some(addr)) => format!("started (pid {pid}, port {})", addr.port()),
                    (Some(pid), None) => format!("started (pid {pid})"),
                    _ => "started".to_string(),
                };
                let label = self.instance_label(&id);
                self.event(&app, "start", Some(&id), &format!("{label} {detail}"));
                self.progress(format!("{label} {detail}"));
                if stop_now {
                    self.begin_stop(&id, false);
                    return;
                }
                if let (Some(spec), Some(addr)) = (spec, handle.addr) {
                    if let Some(check) = spec.health {
                        let check = crate::preflight::instance_check(check, &statics);
                        self.traffic.add(&route, Backend { instance: id.clone(), addr }, check, InitialHealth::Pending);
                    }
                }
            }
            Err(reason) => {
                let app = rt.record.app.clone();
                let label = self.instance_label(&id);
                self.event(&app, "start-failed", Some(&id), &reason.to_string());
                self.progress(format!("{label} could not start: {reason}"));
                self.on_exited(id, ExitStatus::Code(127));
            }
        }
    }

    fn on_exited(&mut self, id: InstanceId, status: ExitStatus) {
        let now = self.clock.now();
        let label = self.instance_label(&id);
        let Some(rt) = self.app.as_mut() else { return };
        let Some(inst) = rt.instances.remove(&id) else { return };
        self.traffic.remove(&id);
        if let Err(e) = self.store.delete_instance(&rt.record.app, &self.env, &id) {
            tracing::error!("could not forget {id}: {e}");
            store_failed(&self.degraded, &*self.clock, &format!("the exit of {id}"), &e);
        }
        let app = rt.record.app.clone();
        if inst.phase == InstPhase::Stopping {
            self.event(&app, "exit", Some(&id), &format!("{label} stopped ({status})"));
            return;
        }
        // An unplanned exit: back off, then the reconciler restarts the slot.
        let key = (id.process.clone(), id.slot);
        let policy = rt.process_spec(&id.process).map(|p| p.restart).unwrap_or_default();
        let uptime = now.saturating_duration_since(inst.started);
        let b = rt.backoff.get(&key).copied().unwrap_or_default().after_exit(uptime, &policy, now);
        rt.backoff.insert(key.clone(), b);
        rt.last_exit.insert(key, (id.clone(), status));
        let delay = b.retry_at.map(|at| at.saturating_duration_since(now)).unwrap_or_default();
        let msg = format!("exited unexpectedly ({status}) after {}; restarting in {}", fmt_dur(uptime), fmt_dur(delay));
        tracing::warn!("{id} {msg}");
        if let Some(ro) = rt.rollout.as_mut() {
            if ro.new.values().any(|n| n == &id) && ro.failure.is_none() {
                let logs = secrets::log_tail(&*self.logs, &self.secrets, &app, &self.env, &id, 10);
                ro.failure = Some(format!("new instance {} exited ({status}){}", id.slot_name(), tail_suffix(&logs)));
            }
        }
        self.event(&app, "exit", Some(&id), &format!("{label} {msg}"));
        self.progress(format!("{label} {msg}"));
    }

    fn on_health(&mut self, ev: HealthEvent) {
        let Some(rt) = self.app.as_mut() else { return };
        let Some(inst) = rt.instances.get_mut(&ev.instance) else { return };
        let was = inst.health.replace(ev.health);
        if !ev.detail.is_empty() {
            inst.last_checks.push_back(ev.detail.clone());
            while inst.last_checks.len() > CHECK_HISTORY {
                inst.last_checks.pop_front();
            }
        }
        if ev.cause == HealthCause::Smoke && inst.phase == InstPhase::Starting {
            inst.smoke_failure = Some(ev.detail.clone());
        }
        match (ev.cause, ev.health) {
            (HealthCause::Outlier, BackendHealth::Unhealthy) => inst.ejected = Some(ev.detail.clone()),
            (_, BackendHealth::Healthy) => inst.ejected = None,
            _ => {}
        }
        let became_ready = ev.health == BackendHealth::Healthy && inst.phase == InstPhase::Starting;
        if became_ready {
            inst.phase = InstPhase::Ready;
        }
        let app = rt.record.app.clone();
        // Transitions only: a resync after a lagged broadcast repeats
        // what is already known.
        if became_ready {
            self.persist_ready(&ev.instance);
            self.event(&app, "healthy", Some(&ev.instance), &ev.detail);
            let label = self.instance_label(&ev.instance);
            self.progress(format!("{label} healthy"));
        } else if ev.cause == HealthCause::Smoke {
            self.event(&app, "smoke-failed", Some(&ev.instance), &ev.detail);
            let label = self.instance_label(&ev.instance);
            self.progress(format!("{label} {}", ev.detail));
        } else if ev.health == BackendHealth::Unhealthy && was != Some(BackendHealth::Unhealthy) {
            self.event(&app, "unhealthy", Some(&ev.instance), &ev.detail);
        } else if ev.health == BackendHealth::Healthy && was == Some(BackendHealth::Unhealthy) {
            self.event(&app, "recovered", Some(&ev.instance), &format!("healthy again: {}", ev.detail));
        }
    }

    fn resync_health(&mut self) {
        let Some(rt) = self.app.as_ref() else { return };
        let ids: Vec<InstanceId> = rt.instances.keys().cloned().collect();
        for id in ids {
            if let Some(st) = self.traffic.status(&id) {
                self.on_health(HealthEvent {
                    instance: id,
                    health: st.health,
                    detail: st.last_checks.last().cloned().unwrap_or_default(),
                    cause: Default::default(),
                });
            }
        }
    }

    fn persist_ready(&mut self, id: &InstanceId) {
        let Some(rt) = self.app.as_ref() else { return };
        let Some(inst) = rt.instances.get(id) else { return };
        let rec = rt.record_of(inst, InstancePhase::Running, true);
        if let Err(e) = self.store.put_instance(&rec) {
            tracing::error!("could not record {id}: {e}");
            self.store_failed(&format!("the record of {id}"), &e);
        }
    }

    // ---------------------------------------------------------------- actions

    pub(crate) fn start_instance(&mut self, process: &ProcessName, slot: u32) -> Option<InstanceId> {
        if self.degraded().holds(&(process.clone(), slot), self.clock.now()) {
            return None; // its record could not be written; retried soon
        }
        let rt = self.app.as_mut()?;
        let ctx = rt.ctx_for(process);
        let spec = rt.process_spec(process)?;
        let generation = match self.store.next_generation(&rt.record.app, &self.env, process) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("cannot start {process}.{slot}: {e}; retrying soon");
                let app = rt.record.app.clone();
                self.start_blocked(&app, process, slot, &e);
                return None;
            }
        };
        let id = InstanceId::new(process.clone(), slot, generation);
        let inst =
            Inst::new(id.clone(), spec.kind, ctx.id, None, InstPhase::Launching, (self.clock.now(), self.clock.wall()));
        let rec = rt.record_of(&inst, InstancePhase::Launching, false);
        if let Err(e) = self.store.put_instance(&rec) {
            // Never started without its record; retried soon (`degraded`).
            tracing::error!("cannot record {id} before starting it: {e}; not started, retrying soon");
            let app = rt.record.app.clone();
            self.start_blocked(&app, process, slot, &e);
            return None;
        }
        let was_blocked = {
            let mut d = self.degraded();
            let was = d.blocked(&(process.clone(), slot)).is_some();
            d.start_recorded(&(process.clone(), slot));
            was
        };
        // Nothing starts without its secrets: a start that cannot have
        // them fails as a start does (backoff, `status`, events).
        let secrets = self.launch_secrets();
        let rt = self.app.as_mut()?;
        let launch = secrets.map(|secrets| LaunchSpec {
            app: rt.record.app.clone(),
            environment: self.env.clone(),
            release: ctx.id,
            instance: id.clone(),
            command: spec.command.clone(),
            workdir: ctx.workdir.clone(),
            env: secrets::with_secrets(
                instance_env(&rt.record.base_env, &ctx, &spec, &id, &self.env),
                &secrets,
                ctx.spec.database.as_ref(),
            ),
            wants_port: spec.kind == ProcessKind::Web,
        });
        rt.instances.insert(id.clone(), inst);
        if was_blocked {
            let app = rt.record.app.clone();
            self.event(&app, "store", Some(&id), "the store takes writes again: starting it");
        }
        let driver = self.driver.clone();
        let tx = self.events_tx.clone();
        let id2 = id.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let launch = match launch {
                Ok(launch) => launch,
                Err(reason) => {
                    let _ = tx.send(Internal::Started { id: id2, result: Err(reason.into()) });
                    return;
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = tokio::time::timeout(DRIVER_START_DEADLINE, driver.start(launch)) => {
                    let result = match r {
                        Ok(r) => r.map_err(|e| DriverCallError::from(e).into()),
                        Err(_) => Err(DriverCallError::from(DriverSilent { call: "start", deadline: DRIVER_START_DEADLINE }).into()),
                    };
                    let _ = tx.send(Internal::Started { id: id2, result });
                }
            }
        });
        Some(id)
    }

    fn watch_exit(&self, handle: InstanceHandle) {
        let driver = self.driver.clone();
        let tx = self.events_tx.clone();
        let cancel = self.cancel.clone();
        {
            let (driver, tx, cancel, handle) = (driver.clone(), tx.clone(), cancel.clone(), handle.clone());
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    () = driver.main_exited(&handle) => {
                        let _ = tx.send(Internal::MainExited { id: handle.instance.clone() });
                    }
                }
            });
        }
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                status = driver.wait_exit(&handle) => {
                    let _ = tx.send(Internal::Exited { id: handle.instance.clone(), status });
                }
            }
        });
    }

    /// Drain (web) and stop one instance. `resume` continues a stop that a
    /// previous daemon had recorded.
    /// Make `record` the app's (a new runtime if there was none).
    pub(crate) fn install_record(&mut self, record: AppRecord) {
        match self.app.as_mut() {
            Some(rt) => {
                rt.route = route_key(&record.app, &record.environment);
                rt.record = record;
            }
            None => self.app = Some(AppRuntime::new(record)),
        }
    }

    pub(crate) fn begin_stop(&mut self, id: &InstanceId, resume: bool) {
        let Some(rt) = self.app.as_mut() else { return };
        let spec = rt.process_spec(&id.process).or_else(|| rt.record.spec.process(&id.process).cloned());
        let Some(inst) = rt.instances.get_mut(id) else { return };
        if inst.phase == InstPhase::Stopping && !resume {
            return;
        }
        let Some(handle) = inst.handle.clone() else {
            inst.stop_requested = true;
            return;
        };
        inst.phase = InstPhase::Stopping;
        let (signal, stop_timeout, drain_timeout) = spec
            .as_ref()
            .map(|s| (s.stop_signal, s.stop_timeout, s.drain_timeout))
            .unwrap_or((nonstop_core::Signal::Term, Duration::from_secs(10), Duration::from_secs(30)));
        let is_web = inst.kind == ProcessKind::Web;
        let rec = rt.record_of(&rt.instances[id], InstancePhase::Stopping, false);
        if let Err(e) = self.store.put_instance(&rec) {
            tracing::error!("could not record the stop of {id}: {e}");
            self.store_failed(&format!("the stop of {id}"), &e);
        }
        let driver = self.driver.clone();
        let traffic = self.traffic.clone();
        let tx = self.events_tx.clone();
        let cancel = self.cancel.clone();
        let id2 = id.clone();
        let label = self.instance_label(id);
        self.tasks.spawn(async move {
            let work = async {
                if is_web {
                    traffic.drain(&id2, drain_timeout).await;
                }
                driver.stop(&handle, signal, stop_timeout).await
            };
            let deadline = drain_timeout + stop_timeout + DRIVER_STOP_MARGIN;
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = tokio::time::timeout(deadline, work) => {
                    let outcome = match r {
                        Ok(r) => r.map_err(DriverCallError::from),
                        Err(_) => Err(DriverSilent { call: "stop", deadline }.into()),
                    };
                    let _ = tx.send(Internal::Stopped { id: id2, label, outcome });
                }
            }
        });
    }

    // -------------------------------------------------------------- the loop

    /// After every event: advance readiness, the rollout, the reconciler,
    /// and the operation in progress.
    fn step(&mut self) {
        let now = self.clock.now();
        self.retry_degraded(now);
        self.deploy_tick();
        self.advance_readiness(now);
        // Rollouts (and deployments) move as far as they can right now.
        for _ in 0..64 {
            let mut moved = self.kick();
            if let Some(result) = self.advance_rollout(now) {
                self.on_rollout_result(result);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        self.run_reconcile(now);
        self.settle_start();
        self.check_op(now);
    }

    fn advance_readiness(&mut self, now: Instant) {
        let Some(rt) = self.app.as_mut() else { return };
        let mut ready = Vec::new();
        let ready_after: BTreeMap<ProcessName, Duration> =
            rt.desired().into_iter().map(|p| (p.name.clone(), p.ready_after)).collect();
        for inst in rt.instances.values_mut() {
            if inst.phase == InstPhase::Starting && inst.kind != ProcessKind::Web {
                let after = ready_after.get(&inst.id.process).copied().unwrap_or_default();
                if now.saturating_duration_since(inst.started) >= after {
                    inst.phase = InstPhase::Ready;
                    ready.push(inst.id.clone());
                }
            }
        }
        for id in ready {
            self.persist_ready(&id);
            let label = self.instance_label(&id);
            self.progress(format!("{label} ready"));
        }
    }

    /// Begin rolling `process` to the release of `target` (its current
    /// release for a restart). `replace_all`: every existing instance is old
    /// (restart); otherwise only those of another release are.
    pub(crate) fn start_rollout(&mut self, process: &ProcessName, target: Option<ReleaseCtx>, replace_all: bool) {
        let Some(rt) = self.app.as_mut() else { return };
        if let Some(t) = target {
            rt.targets.insert(process.clone(), t);
        }
        let ctx = rt.ctx_for(process);
        let spec = rt.process_spec(process);
        let (kind, count, rollout) = match &spec {
            Some(s) => (s.kind, if rt.record.running { s.count } else { 0 }, s.rollout.clone()),
            None => (ProcessKind::Worker, 0, nonstop_core::process::Rollout::default()),
        };
        let old: BTreeSet<InstanceId> = rt
            .instances
            .values()
            .filter(|i| &i.id.process == process && (replace_all || i.release != ctx.id))
            .map(|i| i.id.clone())
            .collect();
        let params = RolloutParams::resolve(kind, count, &rollout);
        // Instances that already run the target release (started by the
        // reconciler, or by an interrupted rollout) count as new ones, so a
        // singleton is never started next to one of them.
        let mut new: BTreeMap<u32, InstanceId> = BTreeMap::new();
        let mut old = old;
        if !replace_all {
            for i in rt
                .instances
                .values()
                .filter(|i| &i.id.process == process && i.release == ctx.id && i.phase != InstPhase::Stopping)
            {
                if i.id.slot <= params.desired && new.get(&i.id.slot).is_none_or(|n| n.generation < i.id.generation) {
                    if let Some(prev) = new.insert(i.id.slot, i.id.clone()) {
                        old.insert(prev);
                    }
                } else {
                    old.insert(i.id.clone());
                }
            }
        }
        let n_old = old.len();
        rt.rollout = Some(RolloutState {
            process: process.clone(),
            release: ctx.id,
            params,
            old,
            new,
            failure: None,
            cancelled: None,
            canary: None,
        });
        self.progress(format!("rolling {process} to {}: {n_old} old instance(s), {count} wanted", ctx.id));
    }

    /// Carry the active rollout one step further. Returns its result once it
    /// has finished or failed.
    fn advance_rollout(&mut self, now: Instant) -> Option<RolloutResult> {
        let rt = self.app.as_mut()?;
        let ro = rt.rollout.as_ref()?;
        let health_timeout =
            rt.process_spec(&ro.process).map(|s| s.rollout.health_timeout).unwrap_or(Duration::from_secs(60));
        // Describe every slot.
        let mut slot_numbers: BTreeSet<u32> = (1..=ro.params.desired).collect();
        slot_numbers.extend(ro.old.iter().filter(|i| rt.instances.contains_key(i)).map(|i| i.slot));
        slot_numbers.extend(ro.new.keys().copied());
        let mut failure = ro.failure.clone();
        let cancelled = ro.cancelled.clone();
        let slots: Vec<RolloutSlot> = slot_numbers
            .iter()
            .map(|&slot| {
                let old = ro.old.iter().filter(|i| i.slot == slot).find_map(|i| rt.instances.get(i)).map(|inst| {
                    match inst.phase {
                        InstPhase::Stopping => OldPhase::Stopping,
                        InstPhase::Ready => OldPhase::Ready,
                        _ => OldPhase::NotReady,
                    }
                });
                let new = ro.new.get(&slot).map(|id| match rt.instances.get(id) {
                    None => NewPhase::Failed,
                    // Out of rotation for answering only 5xx (its health
                    // check may well pass): the release fails under traffic.
                    Some(inst) if inst.phase == InstPhase::Ready && inst.ejected.is_some() => {
                        failure.get_or_insert_with(|| {
                            format!(
                                "new instance {} was taken out of rotation: it {}",
                                id.slot_name(),
                                inst.ejected.as_deref().unwrap_or("answered only 5xx")
                            )
                        });
                        NewPhase::Failed
                    }
                    // Ready once, then failing its checks: not a release to keep.
                    Some(inst) if inst.phase == InstPhase::Ready && inst.health == Some(BackendHealth::Unhealthy) => {
                        if failure.is_none() {
                            let checks = last_checks(&*self.traffic, inst);
                            failure = Some(format!(
                                "new instance {} became unhealthy after passing its checks{}",
                                id.slot_name(),
                                checks_suffix(&checks)
                            ));
                        }
                        NewPhase::Failed
                    }
                    Some(inst) if inst.phase == InstPhase::Ready => NewPhase::Ready,
                    Some(inst) if inst.phase == InstPhase::Stopping => NewPhase::Failed,
                    // Healthy, but a page it must serve is broken: before
                    // any client saw it.
                    Some(inst) if inst.smoke_failure.is_some() => {
                        failure.get_or_insert_with(|| {
                            format!(
                                "new instance {} {}; no client request reached it",
                                id.slot_name(),
                                inst.smoke_failure.as_deref().unwrap_or("failed a smoke check")
                            )
                        });
                        NewPhase::Failed
                    }
                    Some(inst) => {
                        if now.saturating_duration_since(inst.started) >= health_timeout {
                            if failure.is_none() {
                                let checks = last_checks(&*self.traffic, inst);
                                let logs =
                                    secrets::log_tail(&*self.logs, &self.secrets, &rt.record.app, &self.env, id, 10);
                                failure = Some(format!(
                                    "new instance {} did not become {} within {}{}{}",
                                    id.slot_name(),
                                    if inst.kind == ProcessKind::Web { "healthy" } else { "ready" },
                                    fmt_dur(health_timeout),
                                    checks_suffix(&checks),
                                    tail_suffix(&logs)
                                ));
                            }
                            NewPhase::Failed
                        } else {
                            NewPhase::Starting
                        }
                    }
                });
                RolloutSlot { slot, old, new }
            })
            .collect();
        let params = ro.params;
        let process = ro.process.clone();
        let canary = ro.canary.clone();
        let step = match (cancelled, &canary) {
            (Some(why), _) => {
                failure = Some(why);
                RolloutStep::Failed { slot: 0 }
            }
            // Held at the canary: its one new instance, no old one stopped.
            (None, Some(hold)) => match nonstop_plan::rollout::canary_step(&slots) {
                CanaryStep::Start(slot) => RolloutStep::Act(vec![RolloutAction::StartNew(slot)]),
                CanaryStep::Wait => RolloutStep::Wait,
                CanaryStep::Failed(slot) => RolloutStep::Failed { slot },
                CanaryStep::Ready(slot) => match (&hold.ready, ro.new.get(&slot).cloned()) {
                    (None, Some(id)) => {
                        if let Some(h) = rt.rollout.as_mut().and_then(|r| r.canary.as_mut()) {
                            h.ready = Some(id.clone());
                        }
                        return Some(RolloutResult::CanaryReady(process, id));
                    }
                    _ => RolloutStep::Wait,
                },
            },
            (None, None) => rollout_step(&slots, params),
        };
        match step {
            RolloutStep::Wait => None,
            RolloutStep::Done => {
                let release = rt.rollout.as_ref().map(|r| r.release).unwrap_or_default();
                rt.rollout = None;
                self.progress(format!("{process} rolled to {release}"));
                Some(RolloutResult::Done(process))
            }
            RolloutStep::Failed { .. } => {
                let reason = failure.unwrap_or_else(|| "a new instance failed".to_string());
                // Remove the new instances that are not serving; ready ones
                // stay until whatever comes next replaces them, so capacity
                // never drops.
                let ro = rt.rollout.take();
                let not_ready: Vec<InstanceId> = ro
                    .map(|r| {
                        r.new
                            .into_values()
                            .filter(|id| rt.instances.get(id).is_some_and(|i| i.phase != InstPhase::Ready))
                            .collect()
                    })
                    .unwrap_or_default();
                for id in not_ready {
                    self.begin_stop(&id, false);
                }
                let app = self.app.as_ref().map(|rt| rt.record.app.clone());
                if let Some(app) = app {
                    self.event(&app, "rollout-failed", None, &reason);
                }
                Some(RolloutResult::Failed(process, reason))
            }
            RolloutStep::Act(actions) => {
                for a in actions {
                    match a {
                        RolloutAction::StartNew(slot) => {
                            if let Some(id) = self.start_instance(&process, slot) {
                                // A canary gets its share from its first
                                // request on (never an even one).
                                if let Some(hold) = &canary {
                                    self.split_to(std::slice::from_ref(&id), hold.percent);
                                }
                                if let Some(ro) = self.app.as_mut().and_then(|rt| rt.rollout.as_mut()) {
                                    ro.new.insert(slot, id);
                                }
                            }
                        }
                        RolloutAction::StopOld(slot) => {
                            let old: Vec<InstanceId> = self
                                .app
                                .as_ref()
                                .and_then(|rt| rt.rollout.as_ref())
                                .map(|ro| ro.old.iter().filter(|i| i.slot == slot).cloned().collect())
                                .unwrap_or_default();
                            for id in old {
                                self.begin_stop(&id, false);
                            }
                        }
                    }
                }
                None
            }
        }
    }

    /// Start the next rollout an operation wants, if none runs.
    fn kick(&mut self) -> bool {
        if self.app.as_ref().is_some_and(|rt| rt.rollout.is_some()) {
            return false;
        }
        if self.deployment.is_some() {
            return self.deploy_kick();
        }
        if self.app.is_none() {
            return false;
        }
        let Some(op) = self.op.as_mut() else { return false };
        let Some(process) = op.queue.pop_front() else { return false };
        self.start_rollout(&process, None, true);
        true
    }

    fn on_rollout_result(&mut self, result: RolloutResult) {
        if self.deployment.is_some() {
            self.deploy_on_rollout(result);
            return;
        }
        if let RolloutResult::Failed(process, reason) = result {
            if let Some(op) = self.op.as_mut() {
                op.queue.clear();
            }
            self.fail_op(EngineError::RolloutFailed { process: process.to_string(), reason });
        }
    }

    fn run_reconcile(&mut self, now: Instant) {
        let Some(rt) = self.app.as_ref() else { return };
        let desired: Vec<ProcessSpec> = rt.desired();
        let observed = Observed {
            instances: rt
                .instances
                .values()
                .map(|i| ObservedInstance {
                    id: i.id.clone(),
                    phase: match i.phase {
                        InstPhase::Stopping => Phase::Stopping,
                        InstPhase::Ready => Phase::Ready,
                        _ => Phase::Starting,
                    },
                })
                .collect(),
            backoff: rt.backoff.clone(),
            rolling: rt.rollout.iter().map(|r| r.process.clone()).collect(),
        };
        let decision = reconcile(&desired, &observed, now);
        for action in decision.actions {
            match action {
                Action::Start { process, slot } => {
                    self.start_instance(&process, slot);
                }
                Action::Stop { instance } => self.begin_stop(&instance, false),
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let rt = self.app.as_ref()?;
        let mut wake: Option<Instant> = None;
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(t) = self.degraded().next_wake(self.clock.now()) {
            at(t);
        }
        if let Some(t) = self.deploy_wake() {
            at(t);
        }
        for b in rt.backoff.values() {
            if let Some(t) = b.retry_at {
                if t > self.clock.now() {
                    at(t);
                }
            }
        }
        // Readiness deadlines of started instances. A launching one (the
        // driver has not answered `start` yet) waits for that answer, an
        // event, and has no deadline here: its times would pass while it
        // waits and wake the loop at once, over and over.
        let now = self.clock.now();
        for inst in rt.instances.values() {
            if inst.phase == InstPhase::Starting {
                if let Some(spec) = rt.process_spec(&inst.id.process) {
                    let far = inst.started + Duration::from_secs(86_400);
                    let mut due = |t: Instant| {
                        if t > now {
                            at(t)
                        }
                    };
                    if inst.kind != ProcessKind::Web {
                        due(inst.started.checked_add(spec.ready_after).unwrap_or(far));
                    }
                    due(inst.started.checked_add(spec.rollout.health_timeout).unwrap_or(far));
                }
            }
        }
        wake
    }

    // -------------------------------------------------------------- operations

    fn check_op(&mut self, now: Instant) {
        let Some(op) = self.op.as_ref() else { return };
        if self.deployment.is_some() {
            return; // the deployment answers the operation itself
        }
        let Some(rt) = self.app.as_ref() else {
            self.finish_op();
            return;
        };
        if self.deployment.is_some() {
            return; // the deployment answers the operation itself
        }
        if op.down {
            if rt.instances.is_empty() {
                self.ingress.remove_route(&rt.route);
                // Its static files go with its route (an `up` gives them back).
                self.builder.serve_statics(&self.scope, Vec::new());
                self.ingress.close();
                self.finish_op();
            }
            return;
        }
        if rt.rollout.is_some() || !op.queue.is_empty() {
            return;
        }
        // Failures: a crash-looping slot, or an instance that never became ready.
        // A slot counts as crash-looping as `status` shows it: still wanted
        // and waiting to restart. Its failure count outlives a recovery (it
        // resets only on the next exit), so without this a slot that runs
        // again, or was scaled away, would fail every later operation.
        for (key, b) in &rt.backoff {
            let spec = rt.process_spec(&key.0);
            let wanted = rt.record.running && spec.as_ref().is_some_and(|p| key.1 <= p.count);
            let occupied = rt
                .instances
                .values()
                .any(|i| i.id.process == key.0 && i.id.slot == key.1 && i.phase != InstPhase::Stopping);
            if wanted && !occupied && b.crash_loop(&spec.map(|p| p.restart).unwrap_or_default()) {
                let (id, exit) = rt
                    .last_exit
                    .get(key)
                    .cloned()
                    .unwrap_or((InstanceId::new(key.0.clone(), key.1, 0), ExitStatus::Unknown));
                let logs = secrets::log_tail(&*self.logs, &self.secrets, &rt.record.app, &self.env, &id, 10);
                self.fail_op(EngineError::CrashLoop { instance: id.slot_name(), exit: exit.to_string(), logs });
                return;
            }
        }
        for inst in rt.instances.values() {
            if matches!(inst.phase, InstPhase::Starting | InstPhase::Launching) {
                if let Some(spec) = rt.process_spec(&inst.id.process) {
                    let timeout = spec.rollout.health_timeout;
                    if now.saturating_duration_since(inst.started) >= timeout {
                        let logs =
                            secrets::log_tail(&*self.logs, &self.secrets, &rt.record.app, &self.env, &inst.id, 10);
                        let what = if inst.kind == ProcessKind::Web { "healthy" } else { "ready" };
                        let err = EngineError::NotReady {
                            instance: inst.id.slot_name(),
                            what: what.to_string(),
                            timeout_s: timeout.as_secs(),
                            checks: last_checks(&*self.traffic, inst),
                            logs,
                        };
                        self.fail_op(err);
                        return;
                    }
                }
            }
        }
        let (ready, desired, converged) = convergence(rt);
        let left = rt.instances.len();
        let op = self.op.as_mut().expect("checked");
        if op.last_progress != Some((ready, desired)) {
            op.last_progress = Some((ready, desired));
            // Everything going to zero (`stop`, `scale` to 0): what is left.
            let message = if desired == 0 && left > 0 {
                format!("{left} instance(s) still stopping")
            } else {
                format!("{ready}/{desired} instance(s) ready")
            };
            let _ = op.progress.send(Progress { ready, desired, ..Progress::note(message) });
        }
        if converged {
            self.finish_op();
        }
    }

    pub(crate) fn finish_op(&mut self) {
        if let Some(mut op) = self.op.take() {
            if let Some(reply) = op.reply.take() {
                let _ = reply.send(Ok(OpReport { summary: op.summary.clone(), changed: op.changed }));
            }
        }
    }

    pub(crate) fn fail_op(&mut self, err: EngineError) {
        if let Some(mut op) = self.op.take() {
            // A start that fails leaves the app in maintenance: say so.
            let err = if op.name == "start" { EngineError::StartFailed { reason: err.to_string() } } else { err };
            if let Some(app) = self.app.as_ref().map(|rt| rt.record.app.clone()) {
                self.event(&app, "failed", None, &format!("{}: {err}", op.name));
            }
            if let Some(reply) = op.reply.take() {
                let _ = reply.send(Err(err));
            }
        }
    }

    pub(crate) fn progress(&self, message: String) {
        let Some(op) = &self.op else { return };
        let (mut ready, mut desired) = op.last_progress.unwrap_or((0, 0));
        let mut p = Progress::note(message);
        p.elapsed_ms = self.clock.wall().duration_since(op.since).unwrap_or_default().as_millis() as u64;
        p.phase = self.deployment_summary();
        if let Some(ro) = self.app.as_ref().and_then(|rt| rt.rollout.as_ref().map(|ro| (rt, ro))) {
            let (rt, ro) = ro;
            let alive = |id: &InstanceId| rt.instances.get(id).is_some_and(|i| i.phase != InstPhase::Stopping);
            ready =
                ro.new.values().filter(|id| rt.instances.get(*id).is_some_and(|i| i.phase == InstPhase::Ready)).count()
                    as u32;
            desired = ro.params.desired;
            p.new = Some(ro.new.values().filter(|id| alive(id)).count() as u32);
            p.old = Some(ro.old.iter().filter(|id| alive(id)).count() as u32);
        }
        p.ready = ready;
        p.desired = desired;
        let _ = op.progress.send(p);
    }

    /// The newest `limit` events, oldest first: the store's, then those
    /// kept in memory while it could not take them (always the newer).
    fn events(&self, app: &AppName, limit: usize) -> Result<Vec<EventEntry>, EngineError> {
        let at_ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let mut out: Vec<EventEntry> = self
            .store
            .events(app, &self.env, limit)?
            .into_iter()
            .map(|e| EventEntry { at_ms: at_ms(e.at), kind: e.kind, instance: e.instance, message: e.message })
            .collect();
        out.extend(self.degraded().pending_events().filter(|e| &e.app == app).map(|e| EventEntry {
            at_ms: at_ms(e.at),
            kind: e.kind.clone(),
            instance: e.instance.clone(),
            message: format!("{} (not yet in the store: it cannot be written)", e.message),
        }));
        let skip = out.len().saturating_sub(limit);
        out.drain(..skip);
        Ok(out)
    }

    /// Record an event. One the store does not take (a full disk) is kept
    /// in memory, shown by `events`, and written once the store works
    /// again, after those kept before it.
    pub(crate) fn event(&self, app: &AppName, kind: &str, instance: Option<&InstanceId>, message: &str) {
        let ev = PendingEvent {
            app: app.clone(),
            at: self.clock.wall(),
            kind: kind.to_string(),
            instance: instance.map(|i| i.to_string()),
            message: message.to_string(),
        };
        let mut d = self.degraded();
        let flushed = d.flush_events(|e| self.write_event(e));
        let written = flushed.and_then(|()| self.write_event(&ev));
        if let Err(e) = written {
            tracing::error!("could not record event ({kind}: {message}): {e}; kept in memory");
            d.keep_event(ev);
            d.write_failed("an event", &e, self.clock.wall(), self.clock.now());
        }
    }

    fn write_event(&self, e: &PendingEvent) -> Result<(), nonstop_store::StoreError> {
        self.store.add_event(&e.app, &self.env, e.at, &e.kind, e.instance.as_deref(), &e.message)
    }

    fn degraded(&self) -> std::sync::MutexGuard<'_, Degraded> {
        self.degraded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A store write failed: `status` says so until one works again.
    fn store_failed(&self, what: &str, e: &nonstop_store::StoreError) {
        store_failed(&self.degraded, &*self.clock, what, e);
    }

    /// The launch record of `process.slot` could not be written, so it was
    /// not started: retried soon; an event (kept in memory if need be)
    /// the first time.
    fn start_blocked(&self, app: &AppName, process: &ProcessName, slot: u32, e: &nonstop_store::StoreError) {
        let first = {
            let mut d = self.degraded();
            let first = d.blocked(&(process.clone(), slot)).is_none();
            d.start_blocked((process.clone(), slot), e, self.clock.wall(), self.clock.now());
            first
        };
        if first {
            let msg = format!(
                "{process}.{slot} cannot start: store write failed: {e}; nothing is started without its record, \
                 retrying every {}s at most",
                crate::degraded::RETRY_MAX.as_secs()
            );
            self.event(app, "cannot-start", None, &msg);
        }
    }

    /// A retry of what the store did not take is due: kept events first
    /// (blocked starts are retried by the reconciler in this step).
    fn retry_degraded(&mut self, now: Instant) {
        let due = self.degraded().due(now);
        if !due {
            return;
        }
        let mut d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        match d.flush_events(|e| self.write_event(e)) {
            Ok(()) => d.write_worked(),
            Err(e) => d.write_failed("an event", &e, self.clock.wall(), now),
        }
        // Slots no longer wanted are not waited for.
        match self.app.as_ref() {
            Some(rt) => {
                let desired: BTreeMap<ProcessName, u32> =
                    rt.desired().into_iter().map(|p| (p.name.clone(), p.count)).collect();
                d.forget_slots(|(p, n)| desired.get(p).is_some_and(|c| n <= c));
            }
            None => d.forget_slots(|_| false),
        }
    }

    // ----------------------------------------------------------------- reads

    fn status(&self) -> Result<StatusReport, EngineError> {
        let rt =
            self.app.as_ref().filter(|rt| rt.record.running || !rt.instances.is_empty()).ok_or(EngineError::NotUp)?;
        let now = self.clock.now();
        let spec = &rt.record.spec;
        let mut instances = Vec::new();
        for inst in rt.instances.values() {
            let health = self.traffic.status(&inst.id);
            let last_checks = last_checks(&*self.traffic, inst);
            instances.push(InstanceStatus {
                process: inst.id.process.to_string(),
                kind: inst.kind,
                instance: inst.id.slot_name(),
                id: inst.id.to_string(),
                generation: inst.id.generation,
                pid: inst.handle.as_ref().and_then(|h| h.locator.pid()),
                port: inst.handle.as_ref().and_then(|h| h.addr).map(|a| a.port()),
                state: match inst.phase {
                    InstPhase::Launching => InstanceState::Launching,
                    InstPhase::Starting => InstanceState::Starting,
                    InstPhase::Ready => InstanceState::Running,
                    InstPhase::Stopping => InstanceState::Stopping,
                },
                health: if inst.kind == ProcessKind::Web {
                    Some(health.map(|h| h.health).or(inst.health).unwrap_or(BackendHealth::Pending))
                } else {
                    None
                },
                restarts: rt.restarts(&inst.id),
                uptime_ms: now.saturating_duration_since(inst.started).as_millis() as u64,
                release: inst.release.0,
                last_checks,
            });
        }
        let mut waiting = Vec::new();
        let (state, stopped) = self.stopped_status();
        let degraded = self.degraded();
        let mut slots: BTreeMap<(ProcessName, u32), SlotBackoff> = rt.backoff.clone();
        for slot in degraded.blocked_slots() {
            slots.entry(slot.clone()).or_default();
        }
        for ((process, slot), b) in &slots {
            let occupied = rt
                .instances
                .values()
                .any(|i| &i.id.process == process && i.id.slot == *slot && i.phase != InstPhase::Stopping);
            let wanted = spec.process(process).is_some_and(|p| *slot <= p.count) && rt.record.running;
            if occupied || !wanted {
                continue;
            }
            let policy = spec.process(process).map(|p| p.restart.clone()).unwrap_or_default();
            let problem = degraded.blocked(&(process.clone(), *slot)).map(str::to_string);
            let state = match &problem {
                Some(_) => SlotState::CannotStart,
                None if b.crash_loop(&policy) => SlotState::CrashLoop,
                None => SlotState::Backoff,
            };
            let retry_at = match &problem {
                Some(_) => degraded.next_wake(now),
                None => b.retry_at,
            };
            waiting.push(WaitingSlot {
                process: process.to_string(),
                instance: format!("{process}.{slot}"),
                state,
                restarts: b.restarts,
                retry_in_ms: retry_at.map(|t| t.saturating_duration_since(now).as_millis() as u64).unwrap_or(0),
                last_exit: rt.last_exit.get(&(process.clone(), *slot)).map(|(_, e)| e.to_string()),
                problem,
            });
        }
        let processes = spec
            .processes
            .iter()
            .map(|p| ProcessSummary {
                process: p.name.to_string(),
                kind: p.kind,
                desired: if rt.record.running { p.count } else { 0 },
                ready: rt.instances.values().filter(|i| i.id.process == p.name && self.takes_work(i)).count() as u32,
            })
            .collect();
        Ok(StatusReport {
            app: rt.record.app.to_string(),
            environment: self.env.to_string(),
            release: rt.record.release.0,
            workdir: rt.record.workdir.clone(),
            proxy_listen: spec.proxy.listen.to_string(),
            hosts: spec.hosts.clone(),
            operation: self
                .deployment_summary()
                .or_else(|| self.pending_deploy.as_ref().map(|_| "deploy (reading the app directory)".to_string()))
                .or_else(|| self.base_summary())
                .or_else(|| self.op.as_ref().map(|o| o.name.to_string())),
            processes,
            instances,
            waiting,
            store_error: degraded.status_line(self.clock.wall()),
            state,
            maintenance: self.maintenance_status(),
            stopped,
        })
    }

    /// Ready as `status` counts it: a web instance only while the proxy
    /// sends it requests (healthy; not pending, unhealthy or draining).
    fn takes_work(&self, inst: &Inst) -> bool {
        if inst.phase != InstPhase::Ready {
            return false;
        }
        if inst.kind != ProcessKind::Web {
            return true;
        }
        match self.traffic.status(&inst.id) {
            Some(st) => st.health == BackendHealth::Healthy,
            // Not in the proxy (no health check configured): as the engine sees it.
            None => inst.health.is_none_or(|h| h == BackendHealth::Healthy),
        }
    }

    fn run_context(&self, release: Option<ReleaseId>) -> Result<RunContext, EngineError> {
        let rt = self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let (id, spec_env, workdir) = match release {
            None => (rt.record.release, rt.record.spec.env.clone(), rt.record.workdir.clone()),
            Some(id) => {
                let releases = self.store.releases(&rt.record.app)?;
                let usable = |r: &nonstop_store::ReleaseRecord| {
                    r.status == nonstop_store::ReleaseStatus::Ready && r.dir.is_dir()
                };
                match releases.iter().find(|r| r.id == id).filter(|r| usable(r)) {
                    // As this environment ran it (`config.rs`).
                    Some(r) => (r.id, self.run_config_of(r)?.applied().env, r.dir.clone()),
                    None => {
                        let retained: Vec<String> =
                            releases.iter().filter(|r| usable(r)).map(|r| r.id.to_string()).collect();
                        return Err(EngineError::UnknownRelease {
                            release: id.to_string(),
                            retained: if retained.is_empty() { "none".to_string() } else { retained.join(", ") },
                        });
                    }
                }
            }
        };
        let mut env: BTreeMap<String, String> = rt.record.base_env.clone();
        env.extend(spec_env);
        env.insert("NONSTOP_APP".into(), rt.record.app.to_string());
        env.insert("NONSTOP_ENVIRONMENT".into(), self.env.to_string());
        env.insert("NONSTOP_RELEASE".into(), id.to_string());
        env.insert("NONSTOP_PROCESS".into(), "run".into());
        Ok(RunContext { app: rt.record.app.to_string(), workdir, env })
    }
}

/// A store write failed: `status` says so until one works again. (A free
/// function: callers hold a mutable borrow of the app runtime.)
fn store_failed(degraded: &std::sync::Mutex<Degraded>, clock: &dyn Clock, what: &str, e: &nonstop_store::StoreError) {
    degraded.lock().unwrap_or_else(|e| e.into_inner()).write_failed(what, e, clock.wall(), clock.now());
}

/// Ready/desired over all processes, and whether the app runs exactly as
/// specified (no extra, starting or stopping instances).
fn convergence(rt: &AppRuntime) -> (u32, u32, bool) {
    let mut ready = 0;
    let mut desired = 0;
    let mut converged = true;
    let specs = rt.desired();
    for p in &specs {
        let want = if p.kind == ProcessKind::Singleton { p.count.min(1) } else { p.count };
        desired += want;
        let mut slots = BTreeSet::new();
        for inst in rt.instances.values().filter(|i| i.id.process == p.name) {
            if inst.phase == InstPhase::Ready && inst.id.slot <= want && slots.insert(inst.id.slot) {
                ready += 1;
            } else {
                converged = false;
            }
        }
        if (slots.len() as u32) < want {
            converged = false;
        }
    }
    if rt.instances.values().any(|i| !specs.iter().any(|p| p.name == i.id.process)) {
        converged = false;
    }
    (ready, desired, converged)
}

/// Roll web first, then workers, then singletons, unless `[release] order`
/// says otherwise (named processes first, in that order).
fn order_processes(spec: &AppSpec, names: Vec<ProcessName>) -> VecDeque<ProcessName> {
    let rank = |n: &ProcessName| {
        if let Some(i) = spec.release.order.iter().position(|o| o == n) {
            return (0, i);
        }
        let kind = spec.process(n).map(|p| p.kind);
        let k = match kind {
            Some(ProcessKind::Web) => 0,
            Some(ProcessKind::Worker) => 1,
            _ => 2,
        };
        (1, k)
    };
    let mut names = names;
    names.sort_by_key(|n| rank(n));
    names.dedup();
    names.into()
}

pub(crate) fn release_env(
    base_env: &BTreeMap<String, String>,
    ctx: &ReleaseCtx,
    env: &EnvironmentId,
) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = base_env.clone();
    vars.extend(ctx.spec.env.clone());
    // `[database]` fills its variables for every process and task (the
    // spec refuses the same names in `[env]`).
    if let Some(db) = &ctx.spec.database {
        vars.extend(db.env_vars());
    }
    vars.insert("NONSTOP_APP".into(), ctx.spec.app.to_string());
    vars.insert("NONSTOP_ENVIRONMENT".into(), env.to_string());
    vars.insert("NONSTOP_RELEASE".into(), ctx.id.to_string());
    vars
}

fn instance_env(
    base_env: &BTreeMap<String, String>,
    ctx: &ReleaseCtx,
    spec: &ProcessSpec,
    id: &InstanceId,
    env: &EnvironmentId,
) -> Vec<(String, String)> {
    let mut vars = release_env(base_env, ctx, env);
    vars.extend(spec.env.clone());
    vars.insert("NONSTOP_PROCESS".into(), id.process.to_string());
    vars.insert("NONSTOP_INSTANCE".into(), id.slot_name());
    vars.into_iter().collect()
}

fn join(names: &[ProcessName]) -> String {
    names.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

pub(crate) fn tail_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last log lines:\n  {}", lines.join("\n  "))
    }
}

/// The last health checks of an instance: the traffic layer's, or the ones
/// the engine saw in health events if it has none.
fn last_checks<T: Traffic>(traffic: &T, inst: &Inst) -> Vec<String> {
    traffic
        .status(&inst.id)
        .map(|st| st.last_checks)
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| inst.last_checks.iter().cloned().collect())
}

fn checks_suffix(checks: &[String]) -> String {
    if checks.is_empty() {
        return String::new();
    }
    // A 400 to a bare GET is nearly always the app refusing the Host.
    let hint = if checks.iter().any(|c| c.contains(" -> 400 ")) {
        " (a 400 to a health check usually means the app refused its Host header, `127.0.0.1:PORT` unless \
         `host` is set in the process's [health]: allow it, e.g. in Django's ALLOWED_HOSTS, or set `host` to a \
         name the app accepts)"
    } else {
        ""
    };
    format!("; last health checks: {}{hint}", checks.join("; "))
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(120) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

pub(crate) fn fmt_wall(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    // UTC HH:MM:SS is enough to tell "since when" at a glance.
    format!("{:02}:{:02}:{:02} UTC", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}
