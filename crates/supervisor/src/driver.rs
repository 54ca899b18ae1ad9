//! `LocalDriver`: runs instances as local process groups, each watched by
//! its own monitor process (see [`crate::monitor`]), so that instances
//! outlive the daemon and a restarted daemon re-adopts them.

use crate::logfile::Stream;
use crate::logs::{self, LogLine, LogQuery};
use crate::procinfo;
use crate::state::{
    instance_dir_name, read_json, unix_ms_now, ExitRecord, Handshake, InstanceRecord, MonitorParams, EXIT_FILE,
    MONITOR_LOG, PARAMS_FILE, RECORD_FILE, STAGING_PREFIX,
};
use nix::errno::Errno;
use nix::sys::signal::Signal as NixSignal;
use nonstop_core::driver::{
    Driver, DriverError, ExitStatus, InstanceHandle, LaunchSpec, Liveness, Locator, StopOutcome, TaskHandle,
    TaskOutcome, TaskSpec,
};
use nonstop_core::ids::{AppName, EnvironmentId, InstanceId};
use nonstop_core::process::Signal;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Where instance directories live, under the state directory.
const INSTANCES_DIR: &str = "instances";
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Default size at which a log file is rotated.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default number of rotated log files kept per instance.
pub const DEFAULT_LOG_KEEP: u32 = 3;
/// Lines of output kept in a [`TaskOutcome`].
pub const TASK_TAIL_LINES: usize = 50;

/// How long `start` waits for the monitor's handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Liveness polling of instances this process did not start.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often [`LocalDriver`] looks for an instance's exit record when it
/// cannot watch the main process through a pidfd.
const MAIN_EXIT_POLL: Duration = Duration::from_millis(50);
/// The same with a pidfd: only a safety net then.
const MAIN_EXIT_POLL_WATCHED: Duration = Duration::from_secs(1);
/// Every how many of those polls it also reads `/proc` (once a second
/// when polling every 50 ms).
const MAIN_EXIT_PROC_EVERY: u32 = 20;
/// Between SIGTERM and SIGKILL for a task that ran out of time.
const TASK_TERM_GRACE: Duration = Duration::from_secs(5);

/// Configuration of the local driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDriverConfig {
    /// Instance records and logs live here (`instances/`, `logs/`).
    pub state_dir: PathBuf,
    /// How to run a monitor, e.g. `["/usr/bin/nonstop", "__monitor"]`; the
    /// staging directory is appended.
    pub monitor_command: Vec<OsString>,
    /// A log file is rotated before it would grow past this.
    pub log_max_bytes: u64,
    /// Rotated files kept (`.1` ... `.N`).
    pub log_keep: u32,
}

impl LocalDriverConfig {
    /// With the default log rotation (10 MiB, 3 files).
    pub fn new(state_dir: impl Into<PathBuf>, monitor_command: Vec<OsString>) -> Self {
        Self {
            state_dir: state_dir.into(),
            monitor_command,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            log_keep: DEFAULT_LOG_KEEP,
        }
    }
}

/// Errors of the supervisor outside the [`Driver`] trait.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(
        "the monitor command is empty: set LocalDriverConfig.monitor_command to the nonstop binary and its \
         `__monitor` subcommand"
    )]
    EmptyMonitorCommand,
    #[error(
        "could not use the state directory {path}: {source}; check that it is writable by this user, or choose \
         another state directory"
    )]
    StateDir { path: PathBuf, source: io::Error },
    #[error("could not read the logs in {path}: {source}")]
    Logs { path: PathBuf, source: io::Error },
}

/// Why [`LocalDriver`] could not start an instance or a task: the source
/// of [`DriverError::Start`] and [`DriverError::Task`].
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the task has no name; give it one such as `release-task-1`")]
    TaskUnnamed,
    #[error("workdir {} is not a directory", .0.display())]
    WorkdirNotDir(PathBuf),
    #[error("workdir {} does not exist; check the release directory", .0.display())]
    WorkdirMissing(PathBuf),
    #[error("workdir {} is not usable: {source}", path.display())]
    WorkdirUnusable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not find a free port on 127.0.0.1: {0}")]
    NoPort(#[source] io::Error),
    #[error("invalid environment variable name {0:?}: names cannot be empty or contain '='")]
    EnvName(String),
    #[error("environment variable {0} contains a NUL byte")]
    EnvNul(String),
    /// The instance's data or temporary directory.
    #[error("could not create {}: {source}; check the free space and permissions of the state directory", path.display())]
    AppDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory of the driver's own under the state directory.
    #[error("could not create {}: {source}; check the state directory", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not create {}: {source}", path.display())]
    TaskLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not find a free log file name for task {name} in {}", dir.display())]
    TaskLogName { name: String, dir: PathBuf },
    #[error("could not write to {}: {source}; check the state directory", path.display())]
    Staging {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run the monitor {program:?}: {source}; check LocalDriverConfig.monitor_command")]
    MonitorSpawn {
        program: OsString,
        #[source]
        source: io::Error,
    },
    /// The monitor did not report a started app; `said`: the end of what
    /// it wrote to its own log (with its pid), when that adds anything.
    #[error("{handshake}{}", said.as_ref().map(|(pid, tail)| format!(" (monitor pid {pid} said: {tail})")).unwrap_or_default())]
    Monitor {
        #[source]
        handshake: HandshakeError,
        said: Option<(u32, String)>,
    },
}

/// What went wrong with a monitor's start handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The monitor could not start the app: its own words (it runs in
    /// another process).
    #[error("{0}")]
    Failed(String),
    #[error("the monitor sent an unreadable handshake ({source}): {line:?}")]
    Unreadable {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the monitor exited without a handshake")]
    Missing,
    #[error("could not read the monitor's handshake: {0}")]
    Read(#[source] io::Error),
    #[error("the monitor did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

/// Why [`LocalDriver`] could not stop an instance or a task: the source
/// of [`DriverError::Stop`].
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// `/proc` could not be read, so the pid is not proven the instance's.
    #[error(
        "could not read /proc/{pid}/stat: {source}; nothing was signalled, as pid {pid} is not proven to be this \
         instance any more (out of file descriptors? check `ls /proc/{daemon}/fd | wc -l` against `ulimit -n`)"
    )]
    ProcUnreadable {
        pid: u32,
        /// This process, whose descriptors may have run out.
        daemon: u32,
        #[source]
        source: io::Error,
    },
    #[error("its monitor (pid {monitor_pid}) is still cleaning up after {}s; check `ps -o pid,stat,wchan:20,cmd -g {pid}`", after.as_secs())]
    MonitorLingers { monitor_pid: u32, pid: u32, after: Duration },
    #[error("could not signal process group {pid}: {source}; is it running as another user?")]
    Signal {
        pid: u32,
        #[source]
        source: Errno,
    },
    #[error(
        "still running {}s after SIGKILL; a process may be stuck in uninterruptible I/O: check \
         `ps -o pid,stat,wchan:20,cmd -g {pid}`",
        after.as_secs()
    )]
    Unkillable { pid: u32, after: Duration },
}

/// The local process supervisor. Cheap to clone.
#[derive(Clone)]
pub struct LocalDriver {
    inner: Arc<Inner>,
}

struct Inner {
    config: LocalDriverConfig,
    instances_dir: PathBuf,
    /// Monitors this process spawned, keyed by (pid, start time); the
    /// value turns `true` once the monitor has exited and been reaped.
    children: Arc<Mutex<Children>>,
    seq: AtomicU64,
}

/// Monitor (pid, start time) → turns `true` once reaped.
type Children = HashMap<(u32, u64), watch::Receiver<bool>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pid: u32,
    start_time: u64,
    monitor_pid: u32,
    monitor_start_time: u64,
}

impl From<&Locator> for Loc {
    fn from(l: &Locator) -> Self {
        match *l {
            Locator::Local { pid, start_time, monitor_pid, monitor_start_time } => {
                Loc { pid, start_time, monitor_pid, monitor_start_time }
            }
        }
    }
}

impl std::fmt::Debug for LocalDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDriver").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl LocalDriver {
    /// Create the state directory if needed. Instances recorded there by an
    /// earlier daemon are found again from their handles.
    pub fn new(mut config: LocalDriverConfig) -> Result<Self, SupervisorError> {
        if config.monitor_command.is_empty() || config.monitor_command[0].is_empty() {
            return Err(SupervisorError::EmptyMonitorCommand);
        }
        let state_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SupervisorError::StateDir { path, source }
        };
        std::fs::create_dir_all(&config.state_dir).map_err(state_err(&config.state_dir))?;
        config.state_dir = config.state_dir.canonicalize().map_err(state_err(&config.state_dir))?;
        let instances_dir = config.state_dir.join(INSTANCES_DIR);
        let logs_dir = config.state_dir.join("logs");
        for dir in [&instances_dir, &logs_dir] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(state_err(dir))?;
        }
        Ok(LocalDriver {
            inner: Arc::new(Inner { config, instances_dir, children: Arc::default(), seq: AtomicU64::new(0) }),
        })
    }

    pub fn config(&self) -> &LocalDriverConfig {
        &self.inner.config
    }

    /// The (canonical) state directory.
    pub fn state_dir(&self) -> &Path {
        &self.inner.config.state_dir
    }

    /// Where an instance's output goes.
    pub fn instance_log_path(&self, app: &AppName, environment: &EnvironmentId, instance: &InstanceId) -> PathBuf {
        logs::logs_dir(self.state_dir(), app, environment)
            .join(format!("{}.{}.{}.log", instance.process, instance.slot, instance.generation))
    }

    fn instance_dir(&self, loc: Loc) -> PathBuf {
        self.inner.instances_dir.join(instance_dir_name(loc.pid, loc.start_time))
    }

    /// The record a monitor wrote for this instance.
    pub fn instance_record(&self, handle: &InstanceHandle) -> Option<InstanceRecord> {
        read_json(&self.instance_dir(Loc::from(&handle.locator)).join(RECORD_FILE))
    }

    /// The exit status recorded by the instance's monitor, if it has exited.
    pub fn recorded_exit(&self, handle: &InstanceHandle) -> Option<ExitStatus> {
        self.recorded_exit_loc(Loc::from(&handle.locator))
    }

    fn recorded_exit_loc(&self, loc: Loc) -> Option<ExitStatus> {
        read_json::<ExitRecord>(&self.instance_dir(loc).join(EXIT_FILE)).map(|r| r.status)
    }

    /// Everything (instances and tasks) whose monitor still runs, whoever
    /// started it: lets a restarted daemon find instances it has no record
    /// of (e.g. it died in the middle of a `start`).
    pub fn running(&self) -> Vec<InstanceRecord> {
        running_in(&self.inner.instances_dir)
    }

    /// Delete the state of instances and tasks that ended more than
    /// `max_age` ago, and of starts that never completed. Returns how many
    /// directories were removed.
    pub fn prune_state(&self, max_age: Duration) -> io::Result<usize> {
        let now = std::time::SystemTime::now();
        let older = |p: &Path, age: Duration| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|a| a >= age)
        };
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.inner.instances_dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if name.starts_with(STAGING_PREFIX) {
                older(&path, max_age.max(HANDSHAKE_TIMEOUT * 6))
            } else {
                match read_json::<InstanceRecord>(&path.join(RECORD_FILE)) {
                    // Kept while its monitor runs, or might (an unreadable `/proc`).
                    Some(r) if procinfo::running_or_unknown(r.monitor_pid, r.monitor_start_time) => false,
                    Some(_) => {
                        let exit = path.join(EXIT_FILE);
                        older(if exit.exists() { &exit } else { &path }, max_age)
                    }
                    None => older(&path, max_age.max(HANDSHAKE_TIMEOUT * 6)),
                }
            };
            if stale && std::fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The last `query.tail` lines of the matching instances, oldest first.
    pub fn logs_tail(&self, query: &LogQuery) -> Result<Vec<LogLine>, SupervisorError> {
        logs::tail(self.state_dir(), query)
    }

    /// The last `query.tail` lines, then new lines as they are written,
    /// until `cancel` fires or the receiver is dropped. Needs a tokio
    /// runtime.
    pub fn logs_follow(&self, query: LogQuery, cancel: CancellationToken) -> mpsc::Receiver<LogLine> {
        logs::follow(self.state_dir(), query, cancel)
    }

    /// Delete the log files of ended instances beyond the newest `keep` per
    /// process type (and of tasks beyond the newest `keep` per task name).
    /// Files of running instances are never deleted. Returns the number of
    /// files deleted.
    pub fn prune_logs(
        &self,
        app: &AppName,
        environment: &EnvironmentId,
        keep: usize,
    ) -> Result<usize, SupervisorError> {
        let live: HashSet<PathBuf> = self.running().into_iter().map(|r| r.log_path).collect();
        logs::prune(self.state_dir(), app, environment, keep, &live)
    }

    /// Spawn a monitor for `params` and wait for its handshake.
    async fn spawn_monitor(&self, params: &MonitorParams) -> Result<(Loc, PathBuf), LaunchError> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let staging =
            self.inner.instances_dir.join(format!("{STAGING_PREFIX}{}-{seq}-{}", std::process::id(), unix_ms_now()));
        let cleanup = |staging: &Path| {
            let _ = std::fs::remove_dir_all(staging);
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|source| LaunchError::StateDir { path: staging.clone(), source })?;
        let prepared = (|| -> io::Result<std::fs::File> {
            let mut f =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(staging.join(PARAMS_FILE))?;
            f.write_all(&serde_json::to_vec(params).map_err(io::Error::other)?)?;
            f.sync_all()?;
            std::fs::File::create(staging.join(MONITOR_LOG))
        })();
        let monitor_log = match prepared {
            Ok(f) => f,
            Err(source) => {
                cleanup(&staging);
                return Err(LaunchError::Staging { path: staging, source });
            }
        };

        let cmd = &self.inner.config.monitor_command;
        let mut command = tokio::process::Command::new(&cmd[0]);
        command.args(&cmd[1..]).arg(&staging).env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(monitor_log).kill_on_drop(false);
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(source) => {
                cleanup(&staging);
                return Err(LaunchError::MonitorSpawn { program: cmd[0].clone(), source });
            }
        };
        let monitor_pid = child.id().unwrap_or(0);
        let mut line = String::new();
        let read = match child.stdout.take() {
            Some(out) => tokio::time::timeout(HANDSHAKE_TIMEOUT, BufReader::new(out).read_line(&mut line)).await,
            None => Ok(Ok(0)),
        };
        let handshake = match read {
            Ok(Ok(n)) if n > 0 => serde_json::from_str::<Handshake>(line.trim())
                .map_err(|source| HandshakeError::Unreadable { line: line.clone(), source }),
            Ok(Ok(_)) => Err(HandshakeError::Missing),
            Ok(Err(e)) => Err(HandshakeError::Read(e)),
            Err(_) => Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT)),
        };
        match handshake {
            Ok(Handshake::Started { pid, start_time, monitor_pid: mpid, monitor_start_time, dir }) => {
                let loc = Loc { pid, start_time, monitor_pid: mpid, monitor_start_time };
                self.watch_child(loc, child);
                Ok((loc, dir))
            }
            other => {
                let handshake = match other {
                    Ok(Handshake::Failed { reason }) => HandshakeError::Failed(reason),
                    Ok(Handshake::Started { .. }) => unreachable!(),
                    Err(e) => e,
                };
                let _ = child.start_kill();
                let _ = tokio::time::timeout(KILL_WAIT, child.wait()).await;
                let mut said = None;
                if let Ok(log) = std::fs::read_to_string(staging.join(MONITOR_LOG)) {
                    let log = log.trim();
                    if !log.is_empty() && !handshake.to_string().contains(log) {
                        let tail: String = log.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
                        said = Some((monitor_pid, tail));
                    }
                }
                cleanup(&staging);
                Err(LaunchError::Monitor { handshake, said })
            }
        }
    }

    /// Reap a monitor we spawned, and let waiters know when it is gone.
    fn watch_child(&self, loc: Loc, mut child: tokio::process::Child) {
        let key = (loc.monitor_pid, loc.monitor_start_time);
        let (tx, rx) = watch::channel(false);
        let children = Arc::clone(&self.inner.children);
        children.lock().unwrap().insert(key, rx);
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = tx.send(true);
            children.lock().unwrap().remove(&key);
        });
    }

    /// Resolves once the monitor has exited (it exits only after the app's
    /// process group is empty).
    async fn wait_monitor_gone(&self, loc: Loc) {
        let key = (loc.monitor_pid, loc.monitor_start_time);
        let rx = self.inner.children.lock().unwrap().get(&key).cloned();
        if let Some(mut rx) = rx {
            if rx.wait_for(|done| *done).await.is_ok() {
                return;
            }
        }
        while procinfo::running_or_unknown(loc.monitor_pid, loc.monitor_start_time) {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Monitor gone and app gone (the app outlives its monitor only if the
    /// monitor itself was killed).
    async fn wait_gone(&self, loc: Loc) {
        self.wait_monitor_gone(loc).await;
        while procinfo::running_or_unknown(loc.pid, loc.start_time) {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// What is known of an instance: `Gone` only on evidence (its monitor
    /// reaped by us, or `/proc` showing no such process, a zombie or
    /// another start time); `Unknown` when `/proc` cannot be read.
    fn liveness_loc(&self, loc: Loc) -> Liveness {
        let key = (loc.monitor_pid, loc.monitor_start_time);
        let reaped = self.inner.children.lock().unwrap().get(&key).map(|rx| *rx.borrow());
        let monitor = match reaped {
            // A monitor this process spawned: its exit is seen directly.
            Some(reaped) => Ok(!reaped),
            None => procinfo::is_running(loc.monitor_pid, loc.monitor_start_time),
        };
        let main = procinfo::is_running(loc.pid, loc.start_time);
        match (main, monitor) {
            (Ok(true), Ok(true)) => Liveness::Alive,
            (Ok(false), _) | (_, Ok(false)) => Liveness::Gone,
            (Err(err), _) | (_, Err(err)) => {
                procinfo::log_unknown(loc.pid, &err);
                Liveness::Unknown(format!("could not read /proc/{}/stat: {err}", loc.pid))
            }
        }
    }

    /// Send `signal` to the instance's process group. `Ok(false)`: gone.
    /// An unreadable `/proc` (e.g. out of file descriptors) is an error:
    /// nothing is signalled while the pid is not proven ours.
    fn signal_instance(&self, loc: Loc, signal: NixSignal) -> Result<bool, SignalError> {
        // Only while the pid is provably ours: same start time. While the
        // main process exists (even as a zombie) its pid, and so the
        // group id, cannot be reused.
        let stat = match procinfo::stat(loc.pid) {
            Ok(Some(stat)) if stat.start_time == loc.start_time => stat,
            Ok(_) => return Ok(false),
            Err(err) => return Err(SignalError::Proc(err)),
        };
        let mut sent = procinfo::signal_group(loc.pid, signal).map_err(SignalError::Signal)?;
        if stat.pgrp != i32::try_from(loc.pid).unwrap_or(-1) {
            // It moved itself to another group: signal it directly too.
            sent |= procinfo::signal_process(loc.pid, signal).map_err(SignalError::Signal)?;
        }
        Ok(sent)
    }

    async fn stop_loc(
        &self,
        loc: Loc,
        label: &str,
        signal: Signal,
        timeout: Duration,
    ) -> Result<StopOutcome, DriverError> {
        let stop_err = |e: StopError| DriverError::Stop { instance: label.to_string(), source: Box::new(e) };
        let app_running =
            procinfo::is_running(loc.pid, loc.start_time).map_err(|e| stop_err(proc_unreadable(loc, e)))?;
        if !app_running {
            // Exited on its own: its monitor may still be killing leftovers.
            // (Without a recorded exit the handle is not one of ours.)
            let exited = self.instance_dir(loc).join(EXIT_FILE).exists();
            if exited
                && procinfo::running_or_unknown(loc.monitor_pid, loc.monitor_start_time)
                && tokio::time::timeout(timeout + KILL_WAIT, self.wait_monitor_gone(loc)).await.is_err()
            {
                return Err(stop_err(StopError::MonitorLingers {
                    monitor_pid: loc.monitor_pid,
                    pid: loc.pid,
                    after: timeout + KILL_WAIT,
                }));
            }
            return Ok(StopOutcome::AlreadyGone);
        }
        let not_permitted = |e: SignalError| match e {
            SignalError::Signal(source) => stop_err(StopError::Signal { pid: loc.pid, source }),
            SignalError::Proc(e) => stop_err(proc_unreadable(loc, e)),
        };
        match self.signal_instance(loc, procinfo::to_nix(signal)) {
            Ok(true) => {}
            Ok(false) => {
                // Exited between the check and the signal.
                let _ = tokio::time::timeout(timeout + KILL_WAIT, self.wait_gone(loc)).await;
                return Ok(StopOutcome::AlreadyGone);
            }
            Err(e) => return Err(not_permitted(e)),
        }
        if tokio::time::timeout(timeout, self.wait_gone(loc)).await.is_ok() {
            return Ok(StopOutcome::Graceful);
        }
        self.signal_instance(loc, NixSignal::SIGKILL).map_err(not_permitted)?;
        if tokio::time::timeout(KILL_WAIT, self.wait_gone(loc)).await.is_ok() {
            return Ok(StopOutcome::Killed);
        }
        Err(stop_err(StopError::Unkillable { pid: loc.pid, after: KILL_WAIT }))
    }

    async fn wait_exit_loc(&self, loc: Loc, label: &str) -> ExitStatus {
        self.wait_monitor_gone(loc).await;
        // The monitor is gone (that much is known); whether the app still
        // runs is asked until `/proc` answers.
        let app_running = loop {
            match procinfo::is_running(loc.pid, loc.start_time) {
                Ok(running) => break running,
                Err(err) => {
                    procinfo::log_unknown(loc.pid, &err);
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        };
        if app_running {
            // The monitor was killed while the app runs: nobody collects its
            // output or its exit status any more. End it, so that it can be
            // replaced.
            tracing::warn!(
                instance = label,
                pid = loc.pid,
                "the monitor of {label} is gone but the app still runs; killing its process group"
            );
            let _ = self.signal_instance(loc, NixSignal::SIGKILL);
            let _ = tokio::time::timeout(KILL_WAIT, async {
                while procinfo::running_or_unknown(loc.pid, loc.start_time) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
        }
        self.recorded_exit_loc(loc).unwrap_or(ExitStatus::Unknown)
    }

    /// `tasks/<name>.<unix-ts>.log`, created empty so that two runs of a
    /// task in the same second never share a file (the later one takes the
    /// next free second).
    fn new_task_log(&self, task: &TaskSpec) -> Result<PathBuf, LaunchError> {
        let dir = logs::logs_dir(self.state_dir(), &task.app, &task.environment).join("tasks");
        std::fs::create_dir_all(&dir).map_err(|source| LaunchError::StateDir { path: dir.clone(), source })?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let name = sanitize_file_name(&task.name);
        for ts in now..now + 1000 {
            let path = dir.join(format!("{name}.{ts}.log"));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(LaunchError::TaskLog { path, source }),
            }
        }
        Err(LaunchError::TaskLogName { name, dir })
    }

    /// The persistent `NONSTOP_DATA_DIR` of `process` (shared by all the
    /// releases of the app: `<state_dir>/data/APP/PROCESS`) and a new
    /// `TMPDIR` of its own for one instance or task
    /// (`<state_dir>/tmp/NAME-N`), both created 0700 and set in `env`.
    /// Returns the `TMPDIR`, which the monitor removes once the instance
    /// is gone.
    fn app_dirs(
        &self,
        app: &nonstop_core::AppName,
        process: &str,
        tmp_name: &str,
        env: &mut Vec<(String, String)>,
    ) -> Result<PathBuf, LaunchError> {
        let root = &self.inner.config.state_dir;
        let data = root.join("data").join(sanitize_file_name(app.as_str())).join(sanitize_file_name(process));
        let create = |dir: &Path, recursive: bool| {
            std::fs::DirBuilder::new()
                .recursive(recursive)
                .mode(0o700)
                .create(dir)
                .map_err(|source| LaunchError::AppDir { path: dir.to_path_buf(), source })
        };
        create(&data, true)?;
        create(&root.join("tmp"), true)?;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = root.join("tmp").join(format!("{}-{}-{seq}", sanitize_file_name(tmp_name), unix_ms_now()));
        create(&tmp, false)?;
        for (key, dir) in [("NONSTOP_DATA_DIR", &data), ("TMPDIR", &tmp)] {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), dir.to_string_lossy().into_owned()));
        }
        Ok(tmp)
    }

    async fn start_task_inner(&self, task: TaskSpec) -> Result<TaskHandle, DriverError> {
        let task_err = |e: LaunchError| DriverError::Task { name: task.name.clone(), source: Box::new(e) };
        if task.name.trim().is_empty() {
            return Err(task_err(LaunchError::TaskUnnamed));
        }
        check_workdir(&task.workdir).map_err(task_err)?;
        let mut env = app_env(&task.env, None).map_err(task_err)?;
        // A task's data directory is named after its NONSTOP_PROCESS
        // (`release-task`, `post-task`).
        let process = env.iter().find(|(k, _)| k == "NONSTOP_PROCESS").map_or("task".to_string(), |(_, v)| v.clone());
        let tmp_name = format!("{}.{}.{}", task.app, task.environment, task.name);
        let tmpdir = self.app_dirs(&task.app, &process, &tmp_name, &mut env).map_err(task_err)?;
        let log_path = self.new_task_log(&task).map_err(task_err)?;
        let params = MonitorParams {
            app: task.app.to_string(),
            environment: task.environment.to_string(),
            instance: None,
            task: Some(task.name.clone()),
            command: task.command.clone(),
            workdir: task.workdir.clone(),
            env,
            log_path,
            log_max_bytes: self.inner.config.log_max_bytes,
            log_keep: self.inner.config.log_keep,
            instances_dir: self.inner.instances_dir.clone(),
            tmpdir: Some(tmpdir.clone()),
        };
        let (loc, _dir) = self.spawn_monitor(&params).await.map_err(|e| {
            let _ = crate::monitor::remove_tree(&tmpdir);
            task_err(e)
        })?;
        Ok(TaskHandle { name: task.name, locator: loc.locator() })
    }

    /// Works for a task an earlier daemon started as well: its monitor
    /// recorded where its log is and how it ended.
    async fn wait_task_inner(&self, handle: &TaskHandle, timeout: Duration) -> Result<TaskOutcome, DriverError> {
        let loc = Loc::from(&handle.locator);
        let started = Instant::now();
        let timed_out = tokio::time::timeout(timeout, self.wait_gone(loc)).await.is_err();
        if timed_out {
            let label = format!("task {}", handle.name);
            self.stop_loc(loc, &label, Signal::Term, TASK_TERM_GRACE).await?;
        }
        let status = self.recorded_exit_loc(loc).unwrap_or(ExitStatus::Unknown);
        let log_path = read_json::<InstanceRecord>(&self.instance_dir(loc).join(RECORD_FILE)).map(|r| r.log_path);
        let output_tail = log_path
            .and_then(|p| logs::last_texts(&p, TASK_TAIL_LINES, &[Stream::Out, Stream::Err]).ok())
            .unwrap_or_default();
        Ok(TaskOutcome { status, timed_out, output_tail, duration: started.elapsed() })
    }
}

/// Why an instance could not be signalled.
#[derive(Debug)]
enum SignalError {
    /// `/proc` could not be read, so the pid is not proven ours.
    Proc(io::Error),
    /// The signal itself failed (`EPERM`).
    Signal(Errno),
}

/// The error for an instance whose `/proc` entry could not be read.
fn proc_unreadable(loc: Loc, source: io::Error) -> StopError {
    StopError::ProcUnreadable { pid: loc.pid, daemon: std::process::id(), source }
}

impl Loc {
    fn locator(self) -> Locator {
        Locator::Local {
            pid: self.pid,
            start_time: self.start_time,
            monitor_pid: self.monitor_pid,
            monitor_start_time: self.monitor_start_time,
        }
    }
}

fn check_workdir(workdir: &Path) -> Result<(), LaunchError> {
    match std::fs::metadata(workdir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(LaunchError::WorkdirNotDir(workdir.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(LaunchError::WorkdirMissing(workdir.to_path_buf())),
        Err(source) => Err(LaunchError::WorkdirUnusable { path: workdir.to_path_buf(), source }),
    }
}

/// The app's environment: exactly what was given, plus `PORT`, plus PATH,
/// HOME, LANG and TERM from the daemon when not given.
fn app_env(given: &[(String, String)], port: Option<u16>) -> Result<Vec<(String, String)>, LaunchError> {
    for (k, v) in given {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(LaunchError::EnvName(k.clone()));
        }
        if v.contains('\0') {
            return Err(LaunchError::EnvNul(k.clone()));
        }
    }
    let mut env: Vec<(String, String)> =
        given.iter().filter(|(k, _)| !(port.is_some() && k == "PORT")).cloned().collect();
    for key in ["PATH", "HOME", "LANG", "TERM"] {
        if !env.iter().any(|(k, _)| k == key) {
            let value =
                std::env::var(key).ok().or_else(|| (key == "PATH").then(|| "/usr/local/bin:/usr/bin:/bin".into()));
            if let Some(v) = value {
                env.push((key.to_string(), v));
            }
        }
    }
    if let Some(port) = port {
        env.push(("PORT".to_string(), port.to_string()));
    }
    Ok(env)
}

fn sanitize_file_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') { c } else { '_' }).take(100).collect()
}

/// * `start` returns once the monitor reports the app's pid (not once it is
///   ready); web processes get a free port on 127.0.0.1 as `PORT`, from
///   outside the kernel's ephemeral range (see [`crate::ports`]).
/// * `stop` signals the app's process group (only while its pid still has
///   the recorded start time), waits for the monitor to have emptied the
///   group, then SIGKILLs it.
/// * `wait_exit` works for instances started by an earlier daemon too
///   (it polls `/proc` every 100 ms for those) and returns the status the
///   monitor recorded, or `Unknown`.
/// * `liveness` is `Alive` while both the app's main process and its monitor
///   are the recorded processes and not zombies: an app whose monitor was
///   killed is unmanaged (its output goes nowhere), and `wait_exit` /
///   `stop` end it.
impl Driver for LocalDriver {
    async fn start(&self, launch: LaunchSpec) -> Result<InstanceHandle, DriverError> {
        let label = launch.instance.slot_name();
        let start_err = |e: LaunchError| DriverError::Start { instance: label.clone(), source: Box::new(e) };
        check_workdir(&launch.workdir).map_err(start_err)?;
        let port = if launch.wants_port {
            Some(crate::ports::free_port().map_err(|e| start_err(LaunchError::NoPort(e)))?)
        } else {
            None
        };
        let mut env = app_env(&launch.env, port).map_err(start_err)?;
        let tmp_name = format!("{}.{}.{}", launch.app, launch.environment, launch.instance);
        let tmpdir =
            self.app_dirs(&launch.app, launch.instance.process.as_str(), &tmp_name, &mut env).map_err(start_err)?;
        let params = MonitorParams {
            app: launch.app.to_string(),
            environment: launch.environment.to_string(),
            instance: Some(launch.instance.clone()),
            task: None,
            command: launch.command.clone(),
            workdir: launch.workdir.clone(),
            env,
            log_path: self.instance_log_path(&launch.app, &launch.environment, &launch.instance),
            log_max_bytes: self.inner.config.log_max_bytes,
            log_keep: self.inner.config.log_keep,
            instances_dir: self.inner.instances_dir.clone(),
            tmpdir: Some(tmpdir.clone()),
        };
        let (loc, _dir) = self.spawn_monitor(&params).await.map_err(|e| {
            let _ = crate::monitor::remove_tree(&tmpdir);
            start_err(e)
        })?;
        Ok(InstanceHandle {
            instance: launch.instance,
            locator: Locator::Local {
                pid: loc.pid,
                start_time: loc.start_time,
                monitor_pid: loc.monitor_pid,
                monitor_start_time: loc.monitor_start_time,
            },
            addr: port.map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
        })
    }

    async fn stop(
        &self,
        handle: &InstanceHandle,
        signal: Signal,
        timeout: Duration,
    ) -> Result<StopOutcome, DriverError> {
        self.stop_loc(Loc::from(&handle.locator), &handle.instance.slot_name(), signal, timeout).await
    }

    async fn wait_exit(&self, handle: &InstanceHandle) -> ExitStatus {
        self.wait_exit_loc(Loc::from(&handle.locator), &handle.instance.to_string()).await
    }

    fn liveness(&self, handle: &InstanceHandle) -> Liveness {
        self.liveness_loc(Loc::from(&handle.locator))
    }

    async fn start_task(&self, task: TaskSpec) -> Result<TaskHandle, DriverError> {
        self.start_task_inner(task).await
    }

    async fn wait_task(&self, handle: &TaskHandle, timeout: Duration) -> Result<TaskOutcome, DriverError> {
        self.wait_task_inner(handle, timeout).await
    }

    async fn stop_task(
        &self,
        handle: &TaskHandle,
        signal: Signal,
        timeout: Duration,
    ) -> Result<StopOutcome, DriverError> {
        self.stop_loc(Loc::from(&handle.locator), &format!("task {}", handle.name), signal, timeout).await
    }

    fn task_liveness(&self, handle: &TaskHandle) -> Liveness {
        self.liveness_loc(Loc::from(&handle.locator))
    }

    fn task_exit(&self, handle: &TaskHandle) -> Option<ExitStatus> {
        self.recorded_exit_loc(Loc::from(&handle.locator))
    }

    fn running_tasks(&self, app: &AppName, environment: &EnvironmentId) -> Vec<TaskHandle> {
        LocalDriver::running(self)
            .into_iter()
            .filter(|r| r.app == app.as_str() && r.environment == environment.as_str())
            .filter_map(|r| Some(TaskHandle { name: r.task.clone()?, locator: r.locator() }))
            .collect()
    }

    async fn main_exited(&self, handle: &InstanceHandle) {
        // The main process is watched through a pidfd (Linux 5.3+), which
        // turns readable the moment it exits, whoever its parent is: the
        // proxy stops sending it requests within a millisecond. That
        // matters: what is left of the group (gunicorn's workers) stops
        // accepting soon after (at once for servers whose workers follow
        // their master; after the monitor's `LEFTOVER_SELF_EXIT` at the
        // latest), and a request sent later waits in the listening socket's
        // queue until it is reset, unanswered. Without a pidfd (an older
        // kernel, a seccomp filter), the exit record the monitor writes is
        // looked for every 50 ms (one failed open). `/proc` (two reads) only matters for a monitor
        // that died without writing it: once every 20 polls, or at once for
        // a monitor this daemon started (its exit is seen directly).
        let loc = Loc::from(&handle.locator);
        let key = (loc.monitor_pid, loc.monitor_start_time);
        let mut monitor_exit = self.inner.children.lock().unwrap().get(&key).cloned();
        let main = procinfo::PidFd::open(loc.pid, loc.start_time);
        let main = match main {
            Ok(Some(pidfd)) => Some(pidfd),
            Ok(None) => return, // not running any more
            Err(err) => {
                tracing::debug!(pid = loc.pid, error = %err, "no pidfd for the main process; polling its exit");
                None
            }
        };
        let poll_every = if main.is_some() { MAIN_EXIT_POLL_WATCHED } else { MAIN_EXIT_POLL };
        let mut polls: u32 = 0;
        loop {
            if self.recorded_exit(handle).is_some() {
                return;
            }
            // Only evidence ends the wait: an unreadable `/proc` (out of
            // file descriptors) is asked again at the next poll.
            if (main.is_some() || polls.is_multiple_of(MAIN_EXIT_PROC_EVERY)) && self.liveness(handle) == Liveness::Gone
            {
                return;
            }
            polls = polls.wrapping_add(1);
            let main_ended = async {
                match &main {
                    Some(pidfd) => {
                        tokio::select! {
                            () = tokio::time::sleep(poll_every) => false,
                            () = pidfd.exited() => true,
                        }
                    }
                    None => {
                        tokio::time::sleep(poll_every).await;
                        false
                    }
                }
            };
            let monitor_ended = match monitor_exit.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        ended = main_ended => if ended { return } else { false },
                        _ = rx.wait_for(|done| *done) => true,
                    }
                }
                None => {
                    if main_ended.await {
                        return;
                    }
                    false
                }
            };
            if monitor_ended {
                // The monitor exited (or its watcher is gone): look at
                // once, then poll as for an adopted instance.
                monitor_exit = None;
                polls = 0;
            }
        }
    }

    fn running(&self, app: &AppName, environment: &EnvironmentId) -> Vec<InstanceHandle> {
        LocalDriver::running(self)
            .into_iter()
            .filter(|r| r.app == app.as_str() && r.environment == environment.as_str())
            .filter_map(|r| r.handle())
            .collect()
    }
}

/// Everything (instances and tasks) whose monitor still runs under the
/// state directory `state_dir`, read without a [`LocalDriver`] (and without
/// creating anything): e.g. `nonstop down` when the daemon is gone.
pub fn running_under(state_dir: &Path) -> Vec<InstanceRecord> {
    running_in(&state_dir.join(INSTANCES_DIR))
}

fn running_in(instances_dir: &Path) -> Vec<InstanceRecord> {
    let Ok(entries) = std::fs::read_dir(instances_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| read_json::<InstanceRecord>(&e.path().join(RECORD_FILE)))
        // A monitor whose `/proc` cannot be read may run: listed (`down`
        // stops it; a caller that waits for it asks again).
        .filter(|r| procinfo::running_or_unknown(r.monitor_pid, r.monitor_start_time))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_is_exactly_what_was_given_plus_defaults() {
        let given = vec![("A".to_string(), "1".to_string()), ("PORT".to_string(), "1".to_string())];
        let env = app_env(&given, Some(5000)).unwrap();
        assert!(env.contains(&("A".to_string(), "1".to_string())));
        assert!(env.contains(&("PORT".to_string(), "5000".to_string())));
        assert_eq!(env.iter().filter(|(k, _)| k == "PORT").count(), 1);
        assert!(env.iter().any(|(k, _)| k == "PATH"));
        let mine = vec![("PATH".to_string(), "/x".to_string())];
        let env = app_env(&mine, None).unwrap();
        assert_eq!(
            env.iter().filter(|(k, _)| k == "PATH").collect::<Vec<_>>(),
            vec![&("PATH".to_string(), "/x".to_string())]
        );
        assert!(app_env(&[("A=B".to_string(), String::new())], None).is_err());
    }

    #[test]
    fn task_names_become_safe_file_names() {
        assert_eq!(sanitize_file_name("release-task-1"), "release-task-1");
        assert_eq!(sanitize_file_name("../x y"), "___x_y");
    }
}
