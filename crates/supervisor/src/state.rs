//! What the driver and the monitors share on disk.
//!
//! ```text
//! <state_dir>/instances/.staging-*/          written by the driver before a start
//!     params.json   MonitorParams (mode 0600; deleted by the monitor once read)
//!     monitor.log   the monitor's own stderr
//! <state_dir>/instances/<pid>-<start_time>/  renamed so by the monitor once the app runs
//!     instance.json InstanceRecord
//!     exit.json     ExitRecord, once the app's main process has exited
//!     monitor.log
//! <state_dir>/logs/<app>/<environment>/<process>.<slot>.<generation>.log[.N]
//! <state_dir>/logs/<app>/<environment>/tasks/<name>.<unix-ts>.log[.N]
//! ```
//!
//! The instance directory is named after the app's pid and start time,
//! which the [`nonstop_core::driver::Locator`] holds, so a restarted daemon
//! finds it from the handle alone.

use nonstop_core::driver::{ExitStatus, InstanceHandle, Locator};
use nonstop_core::ids::InstanceId;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What a monitor runs, read from `params.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorParams {
    pub app: String,
    pub environment: String,
    /// Set for instances, `None` for tasks.
    pub instance: Option<InstanceId>,
    /// Set for tasks.
    pub task: Option<String>,
    pub command: String,
    pub workdir: PathBuf,
    /// The complete environment of the app.
    pub env: Vec<(String, String)>,
    pub log_path: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// `<state_dir>/instances`, where the monitor moves its directory to.
    pub instances_dir: PathBuf,
    /// The instance's (or task's) own `TMPDIR`, removed by the monitor
    /// once its process group is gone.
    #[serde(default)]
    pub tmpdir: Option<PathBuf>,
}

impl MonitorParams {
    /// `web.1#3` or `task release-task-1`, for messages.
    pub fn label(&self) -> String {
        match (&self.instance, &self.task) {
            (Some(i), _) => i.to_string(),
            (None, Some(t)) => format!("task {t}"),
            (None, None) => "instance".to_string(),
        }
    }
}

/// The single line a monitor prints on its stdout once the app runs (or
/// could not be started). `start` returns when it has read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handshake {
    Started { pid: u32, start_time: u64, monitor_pid: u32, monitor_start_time: u64, dir: PathBuf },
    Failed { reason: String },
}

/// `instance.json`: what runs in an instance directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub app: String,
    pub environment: String,
    pub instance: Option<InstanceId>,
    pub task: Option<String>,
    pub pid: u32,
    pub start_time: u64,
    pub monitor_pid: u32,
    pub monitor_start_time: u64,
    pub log_path: PathBuf,
    /// When the app was started (log timestamp format).
    pub started_at: String,
}

impl InstanceRecord {
    pub fn locator(&self) -> Locator {
        Locator::Local {
            pid: self.pid,
            start_time: self.start_time,
            monitor_pid: self.monitor_pid,
            monitor_start_time: self.monitor_start_time,
        }
    }

    /// The handle of an instance (not of a task). The address is not
    /// recorded here: the store has it.
    pub fn handle(&self) -> Option<InstanceHandle> {
        Some(InstanceHandle { instance: self.instance.clone()?, locator: self.locator(), addr: None })
    }
}

/// `exit.json`: how the app's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub status: ExitStatus,
    /// Unix time in milliseconds.
    pub exited_at_ms: u64,
}

pub const PARAMS_FILE: &str = "params.json";
pub const RECORD_FILE: &str = "instance.json";
pub const EXIT_FILE: &str = "exit.json";
pub const MONITOR_LOG: &str = "monitor.log";
pub const STAGING_PREFIX: &str = ".staging-";

pub fn instance_dir_name(pid: u32, start_time: u64) -> String {
    format!("{pid}-{start_time}")
}

/// Write a file so that readers see either nothing or all of it: temp file,
/// fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        // Created 0600, never through a symbolic link.
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The JSON in `path`; `None` if it cannot be read (or is a symbolic
/// link) or parsed.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = Vec::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
