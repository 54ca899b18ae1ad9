//! What the engine reports: status, progress and operation results. These
//! are serde types so that the API can send them as they are.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where an instance is in its life, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Recorded; the driver is starting it.
    Launching,
    /// Runs; not yet healthy (web) or ready (others).
    Starting,
    /// Healthy (web) or ready (others).
    Running,
    /// Being drained and stopped.
    Stopping,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Launching => "launching",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a slot has no instance right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    /// Waiting out its restart delay.
    Backoff,
    /// Restarted too often: waiting longer, the operation failed.
    CrashLoop,
    /// Its record cannot be written (see `problem`).
    CannotStart,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Backoff => "backoff",
            SlotState::CrashLoop => "crash-loop",
            SlotState::CannotStart => "cannot-start",
        }
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub process: String,
    pub kind: nonstop_core::ProcessKind,
    /// `web.1`
    pub instance: String,
    /// `web.1#7`
    pub id: String,
    pub generation: u64,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub state: InstanceState,
    /// For web instances.
    pub health: Option<nonstop_core::traffic::BackendHealth>,
    pub restarts: u32,
    pub uptime_ms: u64,
    pub release: u64,
    pub last_checks: Vec<String>,
}

/// A slot that has no instance right now because it waits to restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingSlot {
    pub process: String,
    pub instance: String,
    pub state: SlotState,
    pub restarts: u32,
    pub retry_in_ms: u64,
    pub last_exit: Option<String>,
    /// Why it cannot start now, e.g. `store write failed: database or disk
    /// is full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSummary {
    pub process: String,
    pub kind: nonstop_core::ProcessKind,
    pub desired: u32,
    pub ready: u32,
    /// Set when the process is autoscaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleStatus>,
}

/// An autoscaled process: its bounds and the autoscaler's last decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    pub min: u32,
    pub max: u32,
    /// The last decision, as one line ("scale out 2 → 4: cpu_percent 91
    /// (target 70)"), and when it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub app: String,
    pub environment: String,
    pub release: u64,
    pub workdir: PathBuf,
    pub proxy_listen: String,
    /// The hosts this environment answers on (`[environments.NAME] hosts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub operation: Option<String>,
    pub processes: Vec<ProcessSummary>,
    pub instances: Vec<InstanceStatus>,
    pub waiting: Vec<WaitingSlot>,
    /// The store cannot be written (a full disk): what failed and since
    /// when. Events are kept in memory meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Running, or stopped on purpose (`nonstop stop`), or starting again.
    #[serde(default)]
    pub state: AppState,
    /// Set while the app is in maintenance mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceStatus>,
    /// Set while the app is stopped (or starting again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<StoppedStatus>,
}

/// Where the app is: not a failure state; failures show in instances and
/// waiting slots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    #[default]
    Running,
    /// `nonstop stop`: every process at zero, in maintenance.
    Stopped,
    /// `nonstop start`: the counts are back; maintenance goes off once web
    /// is healthy.
    Starting,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Running => "running",
            AppState::Stopped => "stopped",
            AppState::Starting => "starting",
        }
    }
}

/// Who turned maintenance on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceOwner {
    /// `nonstop maintenance on`: goes off with `nonstop maintenance off`.
    User,
    /// `nonstop stop`: goes off when `nonstop start` has web healthy.
    Stop,
    /// `nonstop deploy --allow-breaking`: goes off when the deploy ends.
    Deploy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceStatus {
    pub since_ms: u64,
    pub by: MaintenanceOwner,
    /// Addresses and networks let through.
    pub allow: Vec<String>,
    pub retry_after_secs: u64,
    /// A page was given (otherwise the built-in one is served).
    pub custom_page: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedStatus {
    pub since_ms: u64,
    pub who: String,
    /// The counts `nonstop start` brings back.
    pub counts: BTreeMap<String, u32>,
}

/// A step of a long operation, for progress displays and `--json` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub message: String,
    /// Ready instances / desired instances, over the processes involved.
    pub ready: u32,
    pub desired: u32,
    /// During a deployment: its phase (`building`, `rolling web`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// During a rollout: instances of the new release (ready ones counted in
    /// `ready`) and of the old one still running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<u32>,
    /// Milliseconds since the operation started.
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl Progress {
    /// A message without counts.
    pub fn note(message: impl Into<String>) -> Self {
        Progress { message: message.into(), ready: 0, desired: 0, phase: None, new: None, old: None, elapsed_ms: 0 }
    }
}

/// The result of a successful operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpReport {
    pub summary: String,
    pub changed: bool,
}

/// What a one-off process (`nonstop run`) needs to run like an instance,
/// but its secrets: the client adds those itself
/// ([`EnvironmentSecrets`](crate::EnvironmentSecrets), read from the
/// store with the secrets key), so that no secret value and no generated
/// database password is ever in an answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunContext {
    pub app: String,
    /// The environment it runs in (whose secrets it gets).
    #[serde(default)]
    pub environment: String,
    pub workdir: PathBuf,
    /// The plain variables: the spec's, its `[database]` variables (the
    /// environment's own database without its password), `NONSTOP_*`.
    pub env: BTreeMap<String, String>,
    /// The spec's `[database]`, which the secrets must not override and
    /// which gets the environment's own password.
    #[serde(default)]
    pub database: Option<nonstop_core::database::DatabaseSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEntry {
    pub at_ms: u64,
    pub kind: nonstop_store::EventKind,
    pub instance: Option<String>,
    pub message: String,
}

/// A release, for `nonstop releases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    /// `v3` is 3.
    pub id: u64,
    pub content_hash: String,
    pub status: nonstop_store::ReleaseStatus,
    pub message: Option<String>,
    pub created_at_ms: u64,
    pub build_ms: u64,
    /// The release the app runs now.
    pub current: bool,
    pub dir: PathBuf,
    /// The fingerprint of the database schema its release tasks left (the
    /// migration gate's), if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
}

/// A deployment, for `nonstop history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub id: i64,
    pub kind: nonstop_store::DeploymentKind,
    pub from_release: Option<u64>,
    pub to_release: u64,
    pub status: nonstop_store::DeploymentStatus,
    /// The phase it is in (or ended in).
    pub phase: String,
    pub reason: Option<String>,
    pub who: String,
    pub message: Option<String>,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// What happened, step by step: the phases entered, the gates'
    /// verdicts, the outcome (empty for deployments recorded before
    /// timelines were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineEntry>,
}

/// One step of a deployment's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at_ms: u64,
    pub kind: nonstop_plan::timeline::StepKind,
    pub tone: nonstop_plan::timeline::Tone,
    pub text: String,
}
