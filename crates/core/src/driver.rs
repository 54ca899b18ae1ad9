//! The driver boundary: whatever actually runs instances. The local
//! supervisor (`nonstop-supervisor`) is the first implementation; an ECS
//! driver is the next. The orchestrator only ever talks to this trait, and
//! nothing here assumes local processes except the `Locator::Local` variant.

use crate::build::BoxError;
use crate::ids::{AppName, EnvironmentId, InstanceId, ReleaseId};
use crate::process::Signal;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a driver needs to start one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub app: AppName,
    pub environment: EnvironmentId,
    pub release: ReleaseId,
    pub instance: InstanceId,
    /// Run through `sh -c`.
    pub command: String,
    /// Working directory (the release's directory).
    pub workdir: PathBuf,
    /// The complete environment of the instance, except `PORT`, which the
    /// driver adds when `wants_port` is set. Includes `NONSTOP_INSTANCE`
    /// and `NONSTOP_PROCESS`.
    pub env: Vec<(String, String)>,
    /// Web processes get a port chosen by the driver.
    pub wants_port: bool,
}

/// Where a started instance lives, as recorded in the store so that a
/// restarted daemon can find it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase")]
pub enum Locator {
    /// A local process group. `start_time` is the process start time in
    /// clock ticks since boot (`/proc/PID/stat` field 22), so a recycled pid
    /// is never mistaken for our instance.
    Local { pid: u32, start_time: u64, monitor_pid: u32, monitor_start_time: u64 },
}

impl Locator {
    pub fn pid(&self) -> Option<u32> {
        match self {
            Locator::Local { pid, .. } => Some(*pid),
        }
    }
}

/// A started instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceHandle {
    pub instance: InstanceId,
    pub locator: Locator,
    /// Where the instance listens, for web processes.
    pub addr: Option<SocketAddr>,
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "value")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// Ended while nobody watched it (e.g. while the daemon was down).
    Unknown,
}

impl ExitStatus {
    pub fn success(self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
            ExitStatus::Unknown => f.write_str("exit status unknown"),
        }
    }
}

/// What a driver knows of a recorded instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// It runs: the very process (or task) that was started.
    Alive,
    /// It has exited, or the record names something else now (a recycled
    /// pid): proven, not guessed.
    Gone,
    /// The driver could not find out (e.g. `/proc` could not be read for
    /// want of file descriptors). Not an exit: the instance is kept as it
    /// is and asked about again later. Says why.
    Unknown(String),
}

impl Liveness {
    /// Proven to run.
    pub fn is_alive(&self) -> bool {
        matches!(self, Liveness::Alive)
    }
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// Exited within the stop timeout after the stop signal.
    Graceful,
    /// Needed SIGKILL after the timeout.
    Killed,
    /// Was already gone.
    AlreadyGone,
}

/// A one-off task (release task, `run`), run to completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub app: AppName,
    pub environment: EnvironmentId,
    pub release: ReleaseId,
    /// A name for logs and records, e.g. `release-task-1`.
    pub name: String,
    pub command: String,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
}

/// What a recorded one-off process is for. Each is recorded in the store
/// before it starts, so that a daemon that died while it ran knows about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A `build` command (run by the release builder, not the driver).
    Build,
    /// One of `[release] tasks` (run before any instance changes).
    ReleaseTask,
    /// One of `[release] post_tasks` (run once the release is live).
    PostTask,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Build => "build",
            TaskKind::ReleaseTask => "release_task",
            TaskKind::PostTask => "post_task",
        }
    }

    pub fn parse(s: &str) -> Option<TaskKind> {
        match s {
            "build" => Some(TaskKind::Build),
            "release_task" => Some(TaskKind::ReleaseTask),
            "post_task" => Some(TaskKind::PostTask),
            _ => None,
        }
    }

    /// `build command`, `release task`, `post task`, for messages.
    pub fn label(self) -> &'static str {
        match self {
            TaskKind::Build => "build command",
            TaskKind::ReleaseTask => "release task",
            TaskKind::PostTask => "post task",
        }
    }
}

/// A started one-off task: where it runs, recorded in the store as soon as
/// it exists, so that a restarted daemon can find it again (and wait for it
/// or stop it) exactly as it finds an instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskHandle {
    /// The task's name ([`TaskSpec::name`]).
    pub name: String,
    pub locator: Locator,
}

/// The result of a one-off task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub status: ExitStatus,
    pub timed_out: bool,
    /// The last lines of combined output, for error reports.
    pub output_tail: Vec<String>,
    #[serde(with = "crate::process::duration_ms")]
    pub duration: Duration,
}

/// Why a driver call failed: what it could not do, and the driver's own
/// error (kept whole, its source chain included), which says why.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("could not start {instance}: {source}")]
    Start {
        instance: String,
        #[source]
        source: BoxError,
    },
    #[error("could not stop {instance}: {source}")]
    Stop {
        instance: String,
        #[source]
        source: BoxError,
    },
    #[error("could not run task {name}: {source}")]
    Task {
        name: String,
        #[source]
        source: BoxError,
    },
}

/// Runs instances. Implementations must make `stop` and `wait_exit` safe to
/// call on an instance that is already gone.
pub trait Driver: Send + Sync + 'static {
    /// Start one instance. Returns once the process exists (not once it is
    /// ready: readiness is the traffic layer's and the orchestrator's call).
    fn start(&self, launch: LaunchSpec) -> impl Future<Output = Result<InstanceHandle, DriverError>> + Send;

    /// Stop gracefully: `signal` to the whole instance (process group), then
    /// SIGKILL after `timeout`. Resolves once nothing of it is left.
    fn stop(
        &self,
        handle: &InstanceHandle,
        signal: Signal,
        timeout: Duration,
    ) -> impl Future<Output = Result<StopOutcome, DriverError>> + Send;

    /// Resolves when the instance's main process has exited and whatever
    /// was left of it has been killed. Cancel-safe.
    fn wait_exit(&self, handle: &InstanceHandle) -> impl Future<Output = ExitStatus> + Send;

    /// Resolves as soon as the instance's main process has exited, possibly
    /// before what is left of it is gone (`wait_exit`): the traffic layer
    /// takes it out of rotation at once. Drivers that cannot tell the two
    /// apart keep this default.
    fn main_exited(&self, handle: &InstanceHandle) -> impl Future<Output = ()> + Send {
        let exit = self.wait_exit(handle);
        async move {
            let _ = exit.await;
        }
    }

    /// Whether a recorded instance is still the same live instance (used to
    /// re-adopt instances after a daemon restart without duplicating them).
    /// `Gone` only on evidence: a driver that cannot find out (out of file
    /// descriptors, an API that does not answer) says `Unknown`.
    fn liveness(&self, handle: &InstanceHandle) -> Liveness;

    /// Start a one-off task (release and post tasks). Returns once its
    /// process exists, with the handle to record; its output goes to the
    /// task's log. Like an instance, a task outlives the daemon.
    fn start_task(&self, task: TaskSpec) -> impl Future<Output = Result<TaskHandle, DriverError>> + Send;

    /// Wait until a task (started by this daemon or an earlier one) has
    /// ended, at most `timeout`: past it the task's process group is
    /// stopped (SIGTERM, then SIGKILL) and the outcome says `timed_out`.
    /// Cancel-safe: dropping the future leaves the task running (a daemon
    /// that stops leaves it to the next one); [`Driver::stop_task`] ends it.
    fn wait_task(
        &self,
        handle: &TaskHandle,
        timeout: Duration,
    ) -> impl Future<Output = Result<TaskOutcome, DriverError>> + Send;

    /// Stop a task: `signal` to its process group, SIGKILL after `timeout`.
    /// Resolves once nothing of it is left. Safe on a task that is gone.
    fn stop_task(
        &self,
        handle: &TaskHandle,
        signal: Signal,
        timeout: Duration,
    ) -> impl Future<Output = Result<StopOutcome, DriverError>> + Send;

    /// Whether a recorded task is still the same live task (pid and start
    /// time, for the local driver); `Gone` only on evidence, as
    /// [`Driver::liveness`].
    fn task_liveness(&self, handle: &TaskHandle) -> Liveness;

    /// How a task that is no longer alive ended, when the driver knows it
    /// (e.g. it ended while no daemon watched it).
    fn task_exit(&self, handle: &TaskHandle) -> Option<ExitStatus>;

    /// Every live task of this app and environment, recorded or not: a
    /// daemon that died between starting a task and recording its handle
    /// finds it here by name.
    fn running_tasks(&self, _app: &AppName, _environment: &EnvironmentId) -> Vec<TaskHandle> {
        Vec::new()
    }

    /// Run a one-off task to completion: [`Driver::start_task`], then
    /// [`Driver::wait_task`] for its timeout. Dropping the future leaves the
    /// task running.
    fn run_task(&self, task: TaskSpec) -> impl Future<Output = Result<TaskOutcome, DriverError>> + Send {
        async move {
            let timeout = task.timeout;
            let handle = self.start_task(task).await?;
            self.wait_task(&handle, timeout).await
        }
    }

    /// Every instance of this app and environment that the driver knows to
    /// be alive, recorded or not: a daemon that died between starting an
    /// instance and recording it finds the orphan here.
    fn running(&self, _app: &AppName, _environment: &EnvironmentId) -> Vec<InstanceHandle> {
        Vec::new()
    }
}
