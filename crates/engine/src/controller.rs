//! The engine actor. See the crate docs for the shape; the rules:
//!
//! - Only this task mutates control-plane state. Everything slow (starting,
//!   draining, stopping, waiting for exits) runs in tracked tasks that
//!   report back as [`Internal`] events.
//! - Every change is written to the store before it is acted on: an
//!   instance is recorded `launching` before the driver starts it and
//!   `stopping` before it is drained.
//! - Decisions come from `nonstop-plan` (pure); the controller carries them
//!   out.
//!
//! This file is the actor's shell: its state ([`Controller`]), its inbox
//! ([`Command`], [`Internal`]), the loop that dispatches them and runs one
//! `step` after each, the commands that change what runs (`up`, `down`,
//! `scale`, `restart`, behind one guard: `admit`), the operation in
//! progress, events and reads. The runtime is in its modules:
//! `instances.rs` (what runs, and starting, watching and stopping it),
//! `rollout.rs` (rolling replacement), `reconcile.rs` (the reconciler,
//! wake-ups, an operation's convergence) and `restore.rs` (a controller's
//! start); deploys, tasks, the gates and the other commands in theirs.

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
use nonstop_plan::SlotBackoff;
use nonstop_store::{AppRecord, EventKind, InstancePhase, InstanceRecord, Store};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[path = "autoscale.rs"]
pub(crate) mod autoscale;
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
#[path = "instances.rs"]
pub(crate) mod instances;
#[path = "maintenance.rs"]
pub(crate) mod maintenance;
#[path = "promote.rs"]
pub(crate) mod promote;
#[path = "queue.rs"]
pub(crate) mod queue;
#[path = "reconcile.rs"]
pub(crate) mod reconcile;
#[path = "restore.rs"]
pub(crate) mod restore;
#[path = "rollout.rs"]
pub(crate) mod rollout;
#[path = "secrets.rs"]
pub(crate) mod secrets;
#[path = "statics.rs"]
pub(crate) mod statics;
#[path = "stopped.rs"]
pub(crate) mod stopped;
#[path = "tasks.rs"]
pub(crate) mod tasks;
use instances::{
    checks_suffix, last_checks, release_env, route_key, tail_suffix, AppRuntime, DriverCallError, DriverSilent, Inst,
    InstPhase, ReleaseCtx, StartError, DRIVER_START_DEADLINE, DRIVER_STOP_MARGIN, DRIVER_TASK_MARGIN,
};
use rollout::{order_processes, CanaryHold, RolloutResult, RolloutState};
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
    AutoscaleSample {
        process: ProcessName,
        sample: autoscale::AutoscaleSample,
        reply: Reply<Option<String>>,
    },
    /// Where the running processes' queues are read (`queue.rs`).
    QueueReads {
        reply: Reply<Vec<queue::QueueRead>>,
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
    Deployment {
        id: i64,
        reply: Reply<Option<DeploymentInfo>>,
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
    /// A build command's process exists, held before its command: record
    /// it, then grant `permit` (refuse it if the record fails).
    BuildCommand {
        deployment: i64,
        index: usize,
        process: nonstop_core::driver::Locator,
        permit: nonstop_core::build::RunPermit,
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
    /// A measurement of an autoscaled `process` (`autoscale.rs`): the
    /// autoscaler decides, and a change is carried out. The decision, as
    /// one line (`None`: the process is not autoscaled).
    pub async fn autoscale_sample(
        &self,
        process: ProcessName,
        sample: autoscale::AutoscaleSample,
    ) -> Result<Option<String>, EngineError> {
        self.ask(|reply| Command::AutoscaleSample { process, sample, reply }).await
    }
    /// Where the depth of each running process's `queue` is read: the
    /// Redis its instances get (`queue.rs`). For the daemon's metrics
    /// task only: the URLs may hold passwords, and never go through the
    /// API.
    pub async fn queue_reads(&self) -> Result<Vec<queue::QueueRead>, EngineError> {
        self.ask(|reply| Command::QueueReads { reply }).await
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

    /// Deployment `id` of this environment with its timeline (`None`: no
    /// such deployment here).
    pub async fn deployment(&self, id: i64) -> Result<Option<DeploymentInfo>, EngineError> {
        self.ask(|reply| Command::Deployment { id, reply }).await
    }
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
    /// Each autoscaled process's samples and decision state
    /// (`autoscale.rs`).
    pub(crate) autoscaler: autoscale::Autoscaler,
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
            autoscaler: autoscale::Autoscaler::new(config.clock.now()),
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

    // --------------------------------------------------------------- commands

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::RunContext { release, reply } => {
                let _ = reply.send(self.run_context(release));
            }
            Command::AutoscaleSample { process, sample, reply } => {
                let r = self.on_autoscale_sample(&process, sample);
                let _ = reply.send(r);
            }
            Command::QueueReads { reply } => {
                let _ = reply.send(Ok(self.queue_reads()));
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
            Command::Deployment { id, reply } => {
                let _ = reply.send(self.deployment(id));
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
        self.check_queue_redis(&spec, &base_env)?;
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
        self.event(&spec.app, EventKind::Up, None, &summary);
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
        self.event(&app, EventKind::Down, None, &format!("stopping {n} instance(s)"));
        for id in ids {
            self.begin_stop(&id, false);
        }
        Ok(format!("stopping {n} instance(s) of {app}"))
    }

    fn scale(&mut self, counts: BTreeMap<ProcessName, u32>) -> Result<(String, bool), EngineError> {
        self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        self.check_manual_scale(&counts)?;
        let (summary, changed) = self.apply_counts(&counts)?;
        let app = self.scope.app.clone();
        self.event(&app, EventKind::Scale, None, &summary);
        Ok((summary, changed))
    }

    /// Set these processes' counts (the runtime's from now on: deploys and
    /// restarts keep them), in the running spec and a deployment's
    /// targets; the reconciler starts or stops instances.
    pub(crate) fn apply_counts(&mut self, counts: &BTreeMap<ProcessName, u32>) -> Result<(String, bool), EngineError> {
        let rt = self.app.as_mut().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let mut spec = rt.record.spec.clone();
        let mut parts = Vec::new();
        let mut scaled = BTreeMap::new();
        for (name, count) in counts {
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
            Internal::BuildCommand { deployment, index, process, permit } => {
                self.on_build_command(deployment, index, process, permit)
            }
            Internal::BuildCommandEnded { deployment, index, status } => {
                self.on_build_command_ended(deployment, index, status)
            }
            Internal::Exited { id, status } => self.on_exited(id, status),
            Internal::MainExited { id } => self.on_main_exited(id),
            Internal::Stopped { id, label, outcome } => self.on_stopped(id, label, outcome),
        }
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

    // -------------------------------------------------------------- operations

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
                self.event(&app, EventKind::Failed, None, &format!("{}: {err}", op.name));
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
            kind: e.kind,
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
    pub(crate) fn event(&self, app: &AppName, kind: EventKind, instance: Option<&InstanceId>, message: &str) {
        let ev = PendingEvent {
            app: app.clone(),
            at: self.clock.wall(),
            kind,
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
        self.store.add_event(&e.app, &self.env, e.at, e.kind, e.instance.as_deref(), &e.message)
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
            self.event(app, EventKind::CannotStart, None, &msg);
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
                autoscale: p.autoscale.as_ref().map(|policy| self.autoscaler.status(&p.name, policy)),
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
        let (id, spec_env, database, workdir) = match release {
            None => (
                rt.record.release,
                rt.record.spec.env.clone(),
                rt.record.spec.database.clone(),
                rt.record.workdir.clone(),
            ),
            Some(id) => {
                let releases = self.store.releases(&rt.record.app)?;
                let usable = |r: &nonstop_store::ReleaseRecord| {
                    r.status == nonstop_store::ReleaseStatus::Ready && r.dir.is_dir()
                };
                match releases.iter().find(|r| r.id == id).filter(|r| usable(r)) {
                    // As this environment ran it (`config.rs`).
                    Some(r) => {
                        let spec = self.run_config_of(r)?.applied();
                        (r.id, spec.env, spec.database, r.dir.clone())
                    }
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
        // As `release_env` gives every process (`secrets.rs` adds the rest
        // in the client).
        env.extend(database.iter().flat_map(|db| db.env_vars()));
        env.insert("NONSTOP_APP".into(), rt.record.app.to_string());
        env.insert("NONSTOP_ENVIRONMENT".into(), self.env.to_string());
        env.insert("NONSTOP_RELEASE".into(), id.to_string());
        env.insert("NONSTOP_PROCESS".into(), "run".into());
        Ok(RunContext { app: rt.record.app.to_string(), environment: self.env.to_string(), workdir, env, database })
    }
}

/// A store write failed: `status` says so until one works again. (A free
/// function: callers hold a mutable borrow of the app runtime.)
fn store_failed(degraded: &std::sync::Mutex<Degraded>, clock: &dyn Clock, what: &str, e: &nonstop_store::StoreError) {
    degraded.lock().unwrap_or_else(|e| e.into_inner()).write_failed(what, e, clock.wall(), clock.now());
}

fn join(names: &[ProcessName]) -> String {
    names.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
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
