//! Embedded, crash-safe state: SQLite in WAL mode with `synchronous=FULL`,
//! so a committed change survives a crash of the daemon or the machine.
//!
//! The store knows rows, not policies: the engine decides what to write
//! and writes it *before* acting on it. Every row carries the app and the
//! environment, so that environments (roadmap) need no migration of keys.

#![forbid(unsafe_code)]

mod base;
mod config;
pub use base::PendingDestroy;
pub use config::RunConfig;
mod health;
pub use health::{restore_backup, shm_path, wal_path, Damage, Inspection};
mod secrets;
pub use secrets::{NewSecretVersion, SecretCiphertext, SecretVersionInfo};

use nonstop_core::driver::{InstanceHandle, Locator, TaskKind};
use nonstop_core::maintenance::{MaintenanceState, StoppedState};
use nonstop_core::process::AppSpec;
use nonstop_core::{AppEnv, AppName, CountSource, EnvironmentId, InstanceId, ProcessName, ReleaseId, RuntimeCount};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database {path} is damaged: {damage}")]
    Damaged { path: PathBuf, damage: Damage },
    #[error("state database {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "state database holds a record that cannot be read ({what}): {source}; it was written by a newer nonstop?"
    )]
    Decode { what: &'static str, source: serde_json::Error },
    #[error("state database holds an unknown {what} {value:?}; it was written by a newer nonstop? upgrade nonstop (nothing was changed)")]
    UnknownValue { what: &'static str, value: String },
    #[error(
        "state database schema version {found} is newer than this nonstop understands ({supported}); upgrade nonstop"
    )]
    TooNew { found: i64, supported: i64 },
    #[error(
        "secret {name} was set meanwhile by another command (version {version} is not the next one); run the command again"
    )]
    SecretVersionTaken { name: String, version: u64 },
    #[error("a secret must not be stored before the secrets key check (a bug in nonstop): store the key check first")]
    SecretsKeyCheckMissing,
    #[error("Redis database {number} on {server} is held by environment {holder}; another was given it meanwhile: run the command again")]
    RedisNumberTaken { server: String, number: u8, holder: String },
    #[error("environment {env} holds Redis database {number} on {server} already (it keeps its number)")]
    RedisAssigned { server: String, env: String, number: u8 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    workdir TEXT NOT NULL,
    release INTEGER NOT NULL,
    base_env_json TEXT NOT NULL,
    running INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, environment)
);
CREATE TABLE IF NOT EXISTS instances (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    process TEXT NOT NULL,
    slot INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    release INTEGER NOT NULL,
    handle_json TEXT,
    phase TEXT NOT NULL,
    was_healthy INTEGER NOT NULL DEFAULT 0,
    started_at_ms INTEGER NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, environment, process, slot, generation)
);
CREATE TABLE IF NOT EXISTS generations (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    process TEXT NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (app, environment, process)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    kind TEXT NOT NULL,
    instance TEXT,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_app ON events (app, environment, id);
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL,
    id INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    dir TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    message TEXT,
    status TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    build_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, id)
);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_release INTEGER,
    to_release INTEGER NOT NULL,
    phase_json TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    who TEXT NOT NULL,
    message TEXT,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS deployments_by_app ON deployments (app, environment, id);
CREATE TABLE IF NOT EXISTS deployment_steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    step_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deployment_steps_by_deployment ON deployment_steps (deployment, id);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    deployment INTEGER NOT NULL,
    kind TEXT NOT NULL,
    idx INTEGER NOT NULL,
    total INTEGER NOT NULL,
    name TEXT NOT NULL,
    command TEXT NOT NULL,
    locator_json TEXT,
    state TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_app ON tasks (app, environment, state);
CREATE TABLE IF NOT EXISTS process_counts (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    process TEXT NOT NULL,
    count INTEGER NOT NULL,
    source TEXT NOT NULL,
    toml_at_apply INTEGER NOT NULL,
    PRIMARY KEY (app, environment, process)
);
CREATE TABLE IF NOT EXISTS release_schemas (
    app TEXT NOT NULL,
    release INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    schema_json TEXT NOT NULL,
    gate_ms INTEGER NOT NULL,
    PRIMARY KEY (app, release)
);
CREATE TABLE IF NOT EXISTS app_controls (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    maintenance_json TEXT,
    stopped_json TEXT,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, environment)
);
"#;

/// What the operator switched for an app in an environment, beside its
/// spec: maintenance mode (`nonstop maintenance`), and whether it was
/// stopped on purpose (`nonstop stop`), with the counts to restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Controls {
    pub maintenance: Option<MaintenanceState>,
    pub stopped: Option<StoppedState>,
}

/// The recorded state of an app in an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub app: AppName,
    pub environment: EnvironmentId,
    pub spec: AppSpec,
    pub workdir: PathBuf,
    pub release: ReleaseId,
    /// Variables taken from the environment of the `up` that started the
    /// app (PATH, HOME, LANG...), under the spec's `[env]`.
    pub base_env: BTreeMap<String, String>,
    /// `up` sets it, `down` clears it. A restarted daemon brings back the
    /// apps that are running.
    pub running: bool,
}

/// Where an instance is in its life, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstancePhase {
    /// Recorded before the driver is asked to start it (no handle yet).
    Launching,
    /// Started; the handle is known.
    Running,
    /// Being stopped (recorded before the stop signal is sent).
    Stopping,
}

impl InstancePhase {
    fn as_str(self) -> &'static str {
        match self {
            InstancePhase::Launching => "launching",
            InstancePhase::Running => "running",
            InstancePhase::Stopping => "stopping",
        }
    }
    fn parse(s: &str) -> Option<InstancePhase> {
        match s {
            "launching" => Some(InstancePhase::Launching),
            "running" => Some(InstancePhase::Running),
            "stopping" => Some(InstancePhase::Stopping),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub app: AppName,
    pub environment: EnvironmentId,
    pub id: InstanceId,
    pub release: ReleaseId,
    pub handle: Option<InstanceHandle>,
    pub phase: InstancePhase,
    pub was_healthy: bool,
    pub started_at: SystemTime,
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: i64,
    pub at: SystemTime,
    pub kind: EventKind,
    pub instance: Option<String>,
    pub message: String,
}

/// Where a release is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Being built (recorded before the build starts).
    Building,
    /// Built; can be deployed.
    Ready,
    /// The build failed; nothing of it is on disk.
    Failed,
    /// Deleted from disk by retention.
    Pruned,
}

impl ReleaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseStatus::Building => "building",
            ReleaseStatus::Ready => "ready",
            ReleaseStatus::Failed => "failed",
            ReleaseStatus::Pruned => "pruned",
        }
    }
    fn parse(s: &str) -> Option<ReleaseStatus> {
        match s {
            "building" => Some(ReleaseStatus::Building),
            "ready" => Some(ReleaseStatus::Ready),
            "failed" => Some(ReleaseStatus::Failed),
            "pruned" => Some(ReleaseStatus::Pruned),
            _ => None,
        }
    }
}

impl std::fmt::Display for ReleaseStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An immutable release: a built snapshot of the app plus the spec (and so
/// the config) it was built with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub app: AppName,
    pub id: ReleaseId,
    pub content_hash: String,
    pub dir: PathBuf,
    pub spec: AppSpec,
    pub message: Option<String>,
    pub status: ReleaseStatus,
    pub created_at: SystemTime,
    pub build_ms: u64,
}

/// The database schema a release expects: the one its release tasks left
/// on the migration gate's scratch copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseSchema {
    pub fingerprint: String,
    /// The catalog snapshot (`nonstop_schema::Schema`), kept as JSON so the
    /// store does not depend on the gate.
    pub schema: serde_json::Value,
    /// What the gate cost.
    pub gate_ms: u64,
}

/// How a deployment ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    Running,
    Succeeded,
    Failed,
    RolledBack,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Running => "running",
            DeploymentStatus::Succeeded => "succeeded",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::RolledBack => "rolled_back",
        }
    }
    fn parse(s: &str) -> Option<DeploymentStatus> {
        match s {
            "running" => Some(DeploymentStatus::Running),
            "succeeded" => Some(DeploymentStatus::Succeeded),
            "failed" => Some(DeploymentStatus::Failed),
            "rolled_back" => Some(DeploymentStatus::RolledBack),
            _ => None,
        }
    }
}

impl std::fmt::Display for DeploymentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an event is about. Stored and shown as its kebab-case name
/// (`start-failed`); an unknown stored name is an error, never a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// `up` started or changed the app.
    Up,
    /// `down` stopped it.
    Down,
    /// `scale` changed a count.
    Scale,
    /// an instance started.
    Start,
    /// an instance was stopped.
    Stop,
    /// an instance exited.
    Exit,
    /// an instance exited while no daemon ran.
    Gone,
    /// a process no record knew was stopped.
    Orphan,
    /// the daemon started, stopped or was upgraded.
    Daemon,
    /// an instance became healthy.
    Healthy,
    /// an instance became unhealthy.
    Unhealthy,
    /// an instance recovered from a crash loop.
    Recovered,
    /// an instance could not start.
    StartFailed,
    /// a start was held back (the store cannot write).
    CannotStart,
    /// a new instance failed its smoke checks.
    SmokeFailed,
    /// an operation failed.
    Failed,
    /// a deployment started.
    Deploy,
    /// a deployment went live.
    Deployed,
    /// a deployment failed.
    DeployFailed,
    /// a rollout failed.
    RolloutFailed,
    /// a rollback started.
    Rollback,
    /// a deployment was rolled back.
    RolledBack,
    /// an operation was cancelled.
    Cancel,
    /// a release task or build command.
    Task,
    /// the config changed.
    Config,
    /// a promotion started.
    Promote,
    /// a secret was set or unset.
    Secrets,
    /// maintenance turned on or off.
    Maintenance,
    /// the store could not write, or could again.
    Store,
    /// the environment is being destroyed.
    Destroy,
    /// the autoscaler decided a count.
    Autoscale,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Up => "up",
            EventKind::Down => "down",
            EventKind::Scale => "scale",
            EventKind::Start => "start",
            EventKind::Stop => "stop",
            EventKind::Exit => "exit",
            EventKind::Gone => "gone",
            EventKind::Orphan => "orphan",
            EventKind::Daemon => "daemon",
            EventKind::Healthy => "healthy",
            EventKind::Unhealthy => "unhealthy",
            EventKind::Recovered => "recovered",
            EventKind::StartFailed => "start-failed",
            EventKind::CannotStart => "cannot-start",
            EventKind::SmokeFailed => "smoke-failed",
            EventKind::Failed => "failed",
            EventKind::Deploy => "deploy",
            EventKind::Deployed => "deployed",
            EventKind::DeployFailed => "deploy-failed",
            EventKind::RolloutFailed => "rollout-failed",
            EventKind::Rollback => "rollback",
            EventKind::RolledBack => "rolled-back",
            EventKind::Cancel => "cancel",
            EventKind::Task => "task",
            EventKind::Config => "config",
            EventKind::Promote => "promote",
            EventKind::Secrets => "secrets",
            EventKind::Maintenance => "maintenance",
            EventKind::Store => "store",
            EventKind::Destroy => "destroy",
            EventKind::Autoscale => "autoscale",
        }
    }
    pub fn parse(s: &str) -> Option<EventKind> {
        match s {
            "up" => Some(EventKind::Up),
            "down" => Some(EventKind::Down),
            "scale" => Some(EventKind::Scale),
            "start" => Some(EventKind::Start),
            "stop" => Some(EventKind::Stop),
            "exit" => Some(EventKind::Exit),
            "gone" => Some(EventKind::Gone),
            "orphan" => Some(EventKind::Orphan),
            "daemon" => Some(EventKind::Daemon),
            "healthy" => Some(EventKind::Healthy),
            "unhealthy" => Some(EventKind::Unhealthy),
            "recovered" => Some(EventKind::Recovered),
            "start-failed" => Some(EventKind::StartFailed),
            "cannot-start" => Some(EventKind::CannotStart),
            "smoke-failed" => Some(EventKind::SmokeFailed),
            "failed" => Some(EventKind::Failed),
            "deploy" => Some(EventKind::Deploy),
            "deployed" => Some(EventKind::Deployed),
            "deploy-failed" => Some(EventKind::DeployFailed),
            "rollout-failed" => Some(EventKind::RolloutFailed),
            "rollback" => Some(EventKind::Rollback),
            "rolled-back" => Some(EventKind::RolledBack),
            "cancel" => Some(EventKind::Cancel),
            "task" => Some(EventKind::Task),
            "config" => Some(EventKind::Config),
            "promote" => Some(EventKind::Promote),
            "secrets" => Some(EventKind::Secrets),
            "maintenance" => Some(EventKind::Maintenance),
            "store" => Some(EventKind::Store),
            "destroy" => Some(EventKind::Destroy),
            "autoscale" => Some(EventKind::Autoscale),
            _ => None,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What a deployment does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    /// A new (or retained) release rolled out by `deploy`.
    Deploy,
    /// Back to a retained release, by `rollback`.
    Rollback,
    /// The release another environment runs, by `promote`.
    Promote,
    /// The running build with a changed config, by `config set|unset`.
    Config,
}

impl DeploymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentKind::Deploy => "deploy",
            DeploymentKind::Rollback => "rollback",
            DeploymentKind::Promote => "promote",
            DeploymentKind::Config => "config",
        }
    }
    fn parse(s: &str) -> Option<DeploymentKind> {
        match s {
            "deploy" => Some(DeploymentKind::Deploy),
            "rollback" => Some(DeploymentKind::Rollback),
            "promote" => Some(DeploymentKind::Promote),
            "config" => Some(DeploymentKind::Config),
            _ => None,
        }
    }
}

impl std::fmt::Display for DeploymentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A deployment (deploy or rollback) and where it is. `phase` is the
/// engine's own serialized state machine, stored before each step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: i64,
    pub app: AppName,
    pub environment: EnvironmentId,
    pub kind: DeploymentKind,
    pub from_release: Option<ReleaseId>,
    pub to_release: ReleaseId,
    pub phase: serde_json::Value,
    pub status: DeploymentStatus,
    pub reason: Option<String>,
    pub who: String,
    pub message: Option<String>,
    pub started_at: SystemTime,
    pub finished_at: Option<SystemTime>,
}

/// Where a recorded task (build command, release or post task) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Recorded before it is started (no process known yet).
    Starting,
    /// Its process exists; the locator is recorded.
    Running,
    /// Ended (how: `outcome`).
    Finished,
}

impl TaskState {
    fn as_str(self) -> &'static str {
        match self {
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Finished => "finished",
        }
    }
    fn parse(s: &str) -> Option<TaskState> {
        match s {
            "starting" => Some(TaskState::Starting),
            "running" => Some(TaskState::Running),
            "finished" => Some(TaskState::Finished),
            _ => None,
        }
    }
}

/// A one-off process of a deployment, recorded before it starts, with its
/// process once it runs, and finished with how it ended: a restarted
/// daemon finds the ones that were running (see the engine's recovery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: i64,
    pub app: AppName,
    pub environment: EnvironmentId,
    pub deployment: i64,
    pub kind: TaskKind,
    /// 0-based position among the deployment's tasks of this kind.
    pub index: u32,
    /// How many tasks of this kind the deployment runs.
    pub total: u32,
    /// The driver's task name (`release-3-1`), or `build-3-1`.
    pub name: String,
    pub command: String,
    pub locator: Option<Locator>,
    pub state: TaskState,
    pub started_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    /// How it ended, in words (`exit code 0`, `killed by the daemon
    /// that found it running after a restart`).
    pub outcome: Option<String>,
}

impl TaskRecord {
    /// `release task 1/2 `python manage.py migrate``, for messages.
    pub fn describe(&self) -> String {
        format!("{} {}/{} `{}`", self.kind.label(), self.index + 1, self.total, self.command)
    }
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// A stored enum value, or the error naming it: an unknown value is never
/// read as some default.
fn known<T>(what: &'static str, value: &str, parse: impl FnOnce(&str) -> Option<T>) -> Result<T> {
    parse(value).ok_or_else(|| StoreError::UnknownValue { what, value: value.to_string() })
}

fn ms(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

/// Insert `rec` into `deployments` on `conn` (a transaction, possibly);
/// returns its id.
fn insert_deployment_on(conn: &Connection, rec: &DeploymentRecord) -> Result<i64> {
    conn.execute(
        "INSERT INTO deployments (app, environment, kind, from_release, to_release, phase_json, status, reason, who,
            message, started_at_ms, finished_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            rec.app.as_str(),
            rec.environment.as_str(),
            rec.kind.as_str(),
            rec.from_release.map(|r| i64::try_from(r.0).unwrap_or(i64::MAX)),
            i64::try_from(rec.to_release.0).unwrap_or(i64::MAX),
            rec.phase.to_string(),
            rec.status.as_str(),
            rec.reason,
            rec.who,
            rec.message,
            ms(rec.started_at),
            rec.finished_at.map(ms),
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StoreError::Decode { what, source })
}

fn encode<T: Serialize>(v: &T) -> String {
    // Our own types always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

impl Store {
    /// A private in-memory store, for tests.
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?, PathBuf::from(":memory:"))
    }

    /// A store on a connection as it is (read-only inspection).
    fn wrap(conn: Connection, path: PathBuf) -> Self {
        Self { conn: Mutex::new(conn), path }
    }

    fn init(conn: Connection, path: PathBuf) -> Result<Self> {
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(secrets::SCHEMA)?;
        conn.execute_batch(config::SCHEMA)?;
        conn.execute_batch(base::SCHEMA)?;
        let found: Option<String> =
            conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).optional()?;
        match found.and_then(|v| v.parse::<i64>().ok()) {
            Some(v) if v > SCHEMA_VERSION => return Err(StoreError::TooNew { found: v, supported: SCHEMA_VERSION }),
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )?;
            }
        }
        Ok(Self { conn: Mutex::new(conn), path })
    }

    /// Make every write to the instance, generation, event, control and
    /// task tables fail
    /// with `message` (a temporary trigger: nothing is written to the
    /// file), as on a full disk, until called with `None`. For tests of
    /// what the engine does when the store cannot be written.
    #[doc(hidden)]
    pub fn fail_writes_for_tests(&self, message: Option<&str>) -> Result<()> {
        let conn = self.conn();
        for table in ["instances", "generations", "events", "app_controls", "tasks"] {
            for op in ["INSERT", "UPDATE", "DELETE"] {
                let name = format!("fail_{}_{}", table, op.to_lowercase());
                conn.execute_batch(&format!("DROP TRIGGER IF EXISTS temp.{name}"))?;
                if let Some(message) = message {
                    let message = message.replace('\'', "''");
                    conn.execute_batch(&format!(
                        "CREATE TEMP TRIGGER {name} BEFORE {op} ON main.{table} BEGIN SELECT RAISE(ABORT, '{message}'); END"
                    ))?;
                }
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put_app(&self, rec: &AppRecord, now: SystemTime) -> Result<()> {
        self.conn().execute(
            "INSERT INTO apps (app, environment, spec_json, workdir, release, running, updated_at_ms, base_env_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (app, environment) DO UPDATE SET spec_json = ?3, workdir = ?4, release = ?5,
               running = ?6, updated_at_ms = ?7, base_env_json = ?8",
            params![
                rec.app.as_str(),
                rec.environment.as_str(),
                encode(&rec.spec),
                rec.workdir.to_string_lossy(),
                i64::try_from(rec.release.0).unwrap_or(i64::MAX),
                rec.running,
                ms(now),
                encode(&rec.base_env)
            ],
        )?;
        Ok(())
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT app, environment, spec_json, workdir, release, running, base_env_json FROM apps ORDER BY app, environment",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (app, env, spec, workdir, release, running, base_env) = row?;
            out.push(AppRecord {
                app: decode("app name", &encode(&app))?,
                environment: decode("environment", &encode(&env))?,
                spec: decode("app spec", &spec)?,
                workdir: PathBuf::from(workdir),
                release: ReleaseId(u64::try_from(release).unwrap_or(0)),
                base_env: decode("base environment", &base_env)?,
                running,
            });
        }
        Ok(out)
    }

    /// Allocate the next generation number for a process (persisted, so an
    /// instance id is never reused, even across daemon restarts).
    pub fn next_generation(&self, app: &AppName, env: &EnvironmentId, process: &ProcessName) -> Result<u64> {
        // One sequence per process name across every app and environment:
        // instances of two environments never share an id (`web.1#7`), so
        // the traffic layer, which keys backends by id, cannot mix them up.
        let conn = self.conn();
        let next: i64 = conn.query_row(
            "INSERT INTO generations (app, environment, process, next)
             VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(next), 1) FROM generations WHERE process = ?3) + 1)
             ON CONFLICT (app, environment, process)
               DO UPDATE SET next = (SELECT MAX(next) FROM generations WHERE process = ?3) + 1
             RETURNING next - 1",
            params![app.as_str(), env.as_str(), process.as_str()],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(next).unwrap_or(1))
    }

    pub fn put_instance(&self, rec: &InstanceRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO instances (app, environment, process, slot, generation, release, handle_json, phase,
                was_healthy, started_at_ms, restarts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (app, environment, process, slot, generation) DO UPDATE SET release = ?6,
               handle_json = ?7, phase = ?8, was_healthy = ?9, started_at_ms = ?10, restarts = ?11",
            params![
                rec.app.as_str(),
                rec.environment.as_str(),
                rec.id.process.as_str(),
                rec.id.slot,
                i64::try_from(rec.id.generation).unwrap_or(i64::MAX),
                i64::try_from(rec.release.0).unwrap_or(i64::MAX),
                rec.handle.as_ref().map(encode),
                rec.phase.as_str(),
                rec.was_healthy,
                ms(rec.started_at),
                rec.restarts,
            ],
        )?;
        Ok(())
    }

    /// Forget an app entirely (its instances and generation counters too).
    pub fn delete_app(&self, app: &AppName, env: &EnvironmentId) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["apps", "instances", "generations", "process_counts", "app_controls"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE app = ?1 AND environment = ?2"),
                params![app.as_str(), env.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn delete_instance(&self, app: &AppName, env: &EnvironmentId, id: &InstanceId) -> Result<()> {
        self.conn().execute(
            "DELETE FROM instances WHERE app = ?1 AND environment = ?2 AND process = ?3 AND slot = ?4 AND generation = ?5",
            params![
                app.as_str(),
                env.as_str(),
                id.process.as_str(),
                id.slot,
                i64::try_from(id.generation).unwrap_or(i64::MAX)
            ],
        )?;
        Ok(())
    }

    pub fn instances(&self, app: &AppName, env: &EnvironmentId) -> Result<Vec<InstanceRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT process, slot, generation, release, handle_json, phase, was_healthy, started_at_ms, restarts
             FROM instances WHERE app = ?1 AND environment = ?2 ORDER BY process, slot, generation",
        )?;
        let rows = stmt.query_map(params![app.as_str(), env.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, bool>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, u32>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (process, slot, generation, release, handle, phase, was_healthy, started, restarts) = row?;
            let process: ProcessName = decode("process name", &encode(&process))?;
            out.push(InstanceRecord {
                app: app.clone(),
                environment: env.clone(),
                id: InstanceId::new(process, slot, u64::try_from(generation).unwrap_or(0)),
                release: ReleaseId(u64::try_from(release).unwrap_or(0)),
                handle: handle.as_deref().map(|h| decode("instance handle", h)).transpose()?,
                phase: known("instance phase", &phase, InstancePhase::parse)?,
                was_healthy,
                started_at: from_ms(started),
                restarts,
            });
        }
        Ok(out)
    }

    pub fn add_event(
        &self,
        app: &AppName,
        env: &EnvironmentId,
        now: SystemTime,
        kind: EventKind,
        instance: Option<&str>,
        message: &str,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO events (at_ms, app, environment, kind, instance, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![ms(now), app.as_str(), env.as_str(), kind.as_str(), instance, message],
        )?;
        Ok(())
    }

    /// The newest `limit` events, oldest first.
    pub fn events(&self, app: &AppName, env: &EnvironmentId, limit: usize) -> Result<Vec<EventRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, at_ms, kind, instance, message FROM events WHERE app = ?1 AND environment = ?2
             ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![app.as_str(), env.as_str(), i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?))
            })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, kind, instance, message) = row?;
            out.push(EventRecord {
                id,
                at: from_ms(at),
                kind: known("event kind", &kind, EventKind::parse)?,
                instance,
                message,
            });
        }
        out.reverse();
        Ok(out)
    }
}

impl Store {
    /// The next release number of an app (1 for the first).
    pub fn next_release_id(&self, app: &AppName) -> Result<ReleaseId> {
        let n: i64 = self.conn().query_row(
            "SELECT COALESCE(MAX(id), 0) + 1 FROM releases WHERE app = ?1",
            params![app.as_str()],
            |r| r.get(0),
        )?;
        Ok(ReleaseId(u64::try_from(n).unwrap_or(1)))
    }

    pub fn put_release(&self, rec: &ReleaseRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO releases (app, id, content_hash, dir, spec_json, message, status, created_at_ms, build_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (app, id) DO UPDATE SET content_hash = ?3, dir = ?4, spec_json = ?5, message = ?6,
               status = ?7, build_ms = ?9",
            params![
                rec.app.as_str(),
                i64::try_from(rec.id.0).unwrap_or(i64::MAX),
                rec.content_hash,
                rec.dir.to_string_lossy(),
                encode(&rec.spec),
                rec.message,
                rec.status.as_str(),
                ms(rec.created_at),
                i64::try_from(rec.build_ms).unwrap_or(i64::MAX),
            ],
        )?;
        Ok(())
    }

    /// Every release of an app, oldest first.
    pub fn releases(&self, app: &AppName) -> Result<Vec<ReleaseRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, content_hash, dir, spec_json, message, status, created_at_ms, build_ms
             FROM releases WHERE app = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![app.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, hash, dir, spec, message, status, created, build) = row?;
            out.push(ReleaseRecord {
                app: app.clone(),
                id: ReleaseId(u64::try_from(id).unwrap_or(0)),
                content_hash: hash,
                dir: PathBuf::from(dir),
                spec: decode("release spec", &spec)?,
                message,
                status: known("release status", &status, ReleaseStatus::parse)?,
                created_at: from_ms(created),
                build_ms: u64::try_from(build).unwrap_or(0),
            });
        }
        Ok(out)
    }

    pub fn release(&self, app: &AppName, id: ReleaseId) -> Result<Option<ReleaseRecord>> {
        Ok(self.releases(app)?.into_iter().find(|r| r.id == id))
    }

    /// Record the schema `release` expects (replacing an earlier one).
    pub fn put_release_schema(&self, app: &AppName, release: ReleaseId, schema: &ReleaseSchema) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO release_schemas (app, release, fingerprint, schema_json, gate_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (app, release) DO UPDATE SET fingerprint = ?3, schema_json = ?4, gate_ms = ?5",
            params![
                app.as_str(),
                i64::try_from(release.0).unwrap_or(i64::MAX),
                schema.fingerprint,
                schema.schema.to_string(),
                i64::try_from(schema.gate_ms).unwrap_or(i64::MAX),
            ],
        )?;
        Ok(())
    }

    /// The schema `release` expects, if the gate recorded one.
    pub fn release_schema(&self, app: &AppName, release: ReleaseId) -> Result<Option<ReleaseSchema>> {
        let conn = self.conn();
        let row: Option<(String, String, i64)> = conn
            .query_row(
                "SELECT fingerprint, schema_json, gate_ms FROM release_schemas WHERE app = ?1 AND release = ?2",
                params![app.as_str(), i64::try_from(release.0).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        row.map(|(fingerprint, schema, gate_ms)| {
            Ok(ReleaseSchema {
                fingerprint,
                schema: decode("release schema", &schema)?,
                gate_ms: gate_ms.max(0) as u64,
            })
        })
        .transpose()
    }

    /// Record a new deployment; returns its id.
    pub fn insert_deployment(&self, rec: &DeploymentRecord) -> Result<i64> {
        insert_deployment_on(&self.conn(), rec)
    }

    /// Store a deployment's new phase/status (before acting on it).
    pub fn update_deployment(&self, rec: &DeploymentRecord) -> Result<()> {
        self.conn().execute(
            "UPDATE deployments SET phase_json = ?2, status = ?3, reason = ?4, finished_at_ms = ?5 WHERE id = ?1",
            params![rec.id, rec.phase.to_string(), rec.status.as_str(), rec.reason, rec.finished_at.map(ms)],
        )?;
        Ok(())
    }

    /// Add a step to a deployment's timeline: `step` is the engine's own
    /// serialized step (`nonstop_plan::timeline::Step`).
    pub fn add_deployment_step(&self, deployment: i64, at: SystemTime, step: &serde_json::Value) -> Result<()> {
        self.conn().execute(
            "INSERT INTO deployment_steps (deployment, at_ms, step_json) VALUES (?1, ?2, ?3)",
            params![deployment, ms(at), step.to_string()],
        )?;
        Ok(())
    }

    /// A deployment's timeline, oldest first: when, and the step as stored.
    pub fn deployment_steps(&self, deployment: i64) -> Result<Vec<(SystemTime, serde_json::Value)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT at_ms, step_json FROM deployment_steps WHERE deployment = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![deployment], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (at, json) = row?;
            let value = serde_json::from_str(&json)
                .map_err(|_| StoreError::UnknownValue { what: "deployment step", value: json.clone() })?;
            out.push((from_ms(at), value));
        }
        Ok(out)
    }

    /// The newest `limit` deployments, newest first.
    pub fn deployments(&self, app: &AppName, env: &EnvironmentId, limit: usize) -> Result<Vec<DeploymentRecord>> {
        self.deployments_matching(app, env, limit, None)
    }

    /// Deployment `id`, if it is one of this app and environment.
    pub fn deployment(&self, app: &AppName, env: &EnvironmentId, id: i64) -> Result<Option<DeploymentRecord>> {
        Ok(self.deployments_matching(app, env, 1, Some(id))?.pop())
    }

    fn deployments_matching(
        &self,
        app: &AppName,
        env: &EnvironmentId,
        limit: usize,
        id: Option<i64>,
    ) -> Result<Vec<DeploymentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, kind, from_release, to_release, phase_json, status, reason, who, message, started_at_ms, finished_at_ms
             FROM deployments WHERE app = ?1 AND environment = ?2 AND (?4 IS NULL OR id = ?4) ORDER BY id DESC LIMIT ?3",
        )?;
        let rows =
            stmt.query_map(params![app.as_str(), env.as_str(), i64::try_from(limit).unwrap_or(i64::MAX), id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, Option<i64>>(10)?,
                ))
            })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kind, from, to, phase, status, reason, who, message, started, finished) = row?;
            out.push(DeploymentRecord {
                id,
                app: app.clone(),
                environment: env.clone(),
                kind: known("deployment kind", &kind, DeploymentKind::parse)?,
                from_release: from.map(|f| ReleaseId(u64::try_from(f).unwrap_or(0))),
                to_release: ReleaseId(u64::try_from(to).unwrap_or(0)),
                phase: serde_json::from_str(&phase).unwrap_or(serde_json::Value::Null),
                status: known("deployment status", &status, DeploymentStatus::parse)?,
                reason,
                who,
                message,
                started_at: from_ms(started),
                finished_at: finished.map(from_ms),
            });
        }
        Ok(out)
    }

    /// Apps with a deployment still marked running in this environment.
    pub fn apps_with_running_deployments(&self, env: &EnvironmentId) -> Result<Vec<AppName>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT DISTINCT app FROM deployments WHERE environment = ?1 AND status = 'running' ORDER BY app",
        )?;
        let rows = stmt.query_map(params![env.as_str()], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(decode("app name", &encode(&row?))?);
        }
        Ok(out)
    }

    /// Every app and environment with a deployment still running.
    pub fn scopes_with_running_deployments(&self) -> Result<Vec<AppEnv>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT DISTINCT app, environment FROM deployments WHERE status = 'running' ORDER BY app, environment",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (app, env) = row?;
            out.push(AppEnv::new(decode("app name", &encode(&app))?, decode("environment", &encode(&env))?));
        }
        Ok(out)
    }

    /// The deployment still running for this app and environment, if any.
    pub fn running_deployment(&self, app: &AppName, env: &EnvironmentId) -> Result<Option<DeploymentRecord>> {
        Ok(self.deployments(app, env, 50)?.into_iter().find(|d| d.status == DeploymentStatus::Running))
    }
}

impl Store {
    /// Record a task before it starts; returns its id.
    pub fn insert_task(&self, rec: &TaskRecord) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO tasks (app, environment, deployment, kind, idx, total, name, command, locator_json, state,
                started_at_ms, finished_at_ms, outcome)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                rec.app.as_str(),
                rec.environment.as_str(),
                rec.deployment,
                rec.kind.as_str(),
                rec.index,
                rec.total,
                rec.name,
                rec.command,
                rec.locator.as_ref().map(encode),
                rec.state.as_str(),
                ms(rec.started_at),
                rec.finished_at.map(ms),
                rec.outcome,
            ],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Store a task's process, state and outcome.
    pub fn update_task(&self, rec: &TaskRecord) -> Result<()> {
        self.conn().execute(
            "UPDATE tasks SET locator_json = ?2, state = ?3, finished_at_ms = ?4, outcome = ?5 WHERE id = ?1",
            params![rec.id, rec.locator.as_ref().map(encode), rec.state.as_str(), rec.finished_at.map(ms), rec.outcome],
        )?;
        Ok(())
    }

    /// Tasks of this app and environment not recorded as finished, oldest first.
    pub fn unfinished_tasks(&self, app: &AppName, env: &EnvironmentId) -> Result<Vec<TaskRecord>> {
        self.query_tasks("WHERE app = ?1 AND environment = ?2 AND state != 'finished' ORDER BY id", app, env, i64::MAX)
    }

    /// The newest `limit` tasks of this app and environment, oldest first.
    pub fn tasks(&self, app: &AppName, env: &EnvironmentId, limit: usize) -> Result<Vec<TaskRecord>> {
        let mut out = self.query_tasks(
            "WHERE app = ?1 AND environment = ?2 ORDER BY id DESC",
            app,
            env,
            i64::try_from(limit).unwrap_or(i64::MAX),
        )?;
        out.reverse();
        Ok(out)
    }

    fn query_tasks(&self, filter: &str, app: &AppName, env: &EnvironmentId, limit: i64) -> Result<Vec<TaskRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, deployment, kind, idx, total, name, command, locator_json, state, started_at_ms,
               finished_at_ms, outcome FROM tasks {filter} LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![app.as_str(), env.as_str(), limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, Option<i64>>(10)?,
                r.get::<_, Option<String>>(11)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, deployment, kind, index, total, name, command, locator, state, started, finished, outcome) = row?;
            let kind = known("task kind", &kind, TaskKind::parse)?;
            out.push(TaskRecord {
                id,
                app: app.clone(),
                environment: env.clone(),
                deployment,
                kind,
                index,
                total,
                name,
                command,
                locator: locator.as_deref().map(|l| decode("task locator", l)).transpose()?,
                state: known("task state", &state, TaskState::parse)?,
                started_at: from_ms(started),
                finished_at: finished.map(from_ms),
                outcome,
            });
        }
        Ok(out)
    }

    /// The runtime count of every process type of an app that has one.
    pub fn process_counts(&self, app: &AppName, env: &EnvironmentId) -> Result<BTreeMap<ProcessName, RuntimeCount>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT process, count, source, toml_at_apply FROM process_counts WHERE app = ?1 AND environment = ?2",
        )?;
        let rows = stmt.query_map(params![app.as_str(), env.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?, r.get::<_, String>(2)?, r.get::<_, u32>(3)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (process, count, source, toml_at_apply) = row?;
            let source = CountSource::parse(&source).ok_or_else(|| StoreError::Decode {
                what: "count source",
                source: serde::de::Error::custom(format!("unknown count source {source:?}")),
            })?;
            out.insert(decode("process name", &encode(&process))?, RuntimeCount { count, source, toml_at_apply });
        }
        Ok(out)
    }

    /// Record runtime counts; with `exactly`, process types not in
    /// `counts` lose theirs (they are no longer in the app), in the same
    /// transaction.
    pub fn put_process_counts(
        &self,
        app: &AppName,
        env: &EnvironmentId,
        counts: &BTreeMap<ProcessName, RuntimeCount>,
        exactly: bool,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if exactly {
            tx.execute(
                "DELETE FROM process_counts WHERE app = ?1 AND environment = ?2",
                params![app.as_str(), env.as_str()],
            )?;
        }
        for (process, c) in counts {
            upsert_count(&tx, app, env, process, c)?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl Store {
    /// The app's controls (maintenance, stopped); the default when none
    /// was ever set.
    pub fn controls(&self, app: &AppName, env: &EnvironmentId) -> Result<Controls> {
        let conn = self.conn();
        let row: Option<(Option<String>, Option<String>)> = conn
            .query_row(
                "SELECT maintenance_json, stopped_json FROM app_controls WHERE app = ?1 AND environment = ?2",
                params![app.as_str(), env.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((maintenance, stopped)) = row else { return Ok(Controls::default()) };
        Ok(Controls {
            maintenance: maintenance.map(|m| decode("maintenance", &m)).transpose()?,
            stopped: stopped.map(|s| decode("stopped app", &s)).transpose()?,
        })
    }

    /// Record the app's controls as a whole and, in the same transaction,
    /// `counts` if given (as [`Store::put_process_counts`] without
    /// `exactly`): a stop's zero counts and its remembered ones land
    /// together, or not at all.
    pub fn put_controls(
        &self,
        app: &AppName,
        env: &EnvironmentId,
        controls: &Controls,
        counts: Option<&BTreeMap<ProcessName, RuntimeCount>>,
        now: SystemTime,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if controls.maintenance.is_none() && controls.stopped.is_none() {
            tx.execute(
                "DELETE FROM app_controls WHERE app = ?1 AND environment = ?2",
                params![app.as_str(), env.as_str()],
            )?;
        } else {
            tx.execute(
                "INSERT INTO app_controls (app, environment, maintenance_json, stopped_json, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (app, environment) DO UPDATE SET maintenance_json = ?3, stopped_json = ?4,
                 updated_at_ms = ?5",
                params![
                    app.as_str(),
                    env.as_str(),
                    controls.maintenance.as_ref().map(encode),
                    controls.stopped.as_ref().map(encode),
                    ms(now)
                ],
            )?;
        }
        for (process, c) in counts.into_iter().flatten() {
            upsert_count(&tx, app, env, process, c)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Record one process type's runtime count (inside a transaction).
fn upsert_count(
    tx: &rusqlite::Transaction<'_>,
    app: &AppName,
    env: &EnvironmentId,
    process: &ProcessName,
    c: &RuntimeCount,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO process_counts (app, environment, process, count, source, toml_at_apply)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (app, environment, process) DO UPDATE SET count = ?4, source = ?5, toml_at_apply = ?6",
        params![app.as_str(), env.as_str(), process.as_str(), c.count, c.source.as_str(), c.toml_at_apply],
    )
}

#[cfg(test)]
mod tests;
