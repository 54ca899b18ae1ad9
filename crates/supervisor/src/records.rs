//! The instance records under `<state_dir>/instances/` as a whole, read
//! without a [`crate::LocalDriver`]: what runs there (whoever started it,
//! whatever the store says), stopping it, and pruning the records of what
//! ended long ago. Used by `nonstop down` (which stops everything it finds
//! there), `nonstop doctor`, and the daemon's housekeeping.
//!
//! Liveness here is conservative: a process whose `/proc` entry cannot be
//! read for another reason than its absence (out of file descriptors, say)
//! counts as alive, so that its record is never pruned by mistake.

use crate::procinfo;
use crate::state::{read_json, ExitRecord, InstanceRecord, EXIT_FILE, RECORD_FILE, STAGING_PREFIX};
use nix::sys::signal::Signal;
use nonstop_core::driver::StopOutcome;
use serde::Serialize;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Under the state directory.
pub const INSTANCES_DIR: &str = "instances";

/// Records of ended instances and tasks are pruned once they ended this
/// long ago...
pub const PRUNE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// ... and beyond this many (the newest are kept).
pub const PRUNE_KEEP: usize = 500;
/// A staging directory whose monitor never took it over (the handshake
/// waits 10 s) is removed after this long: it may hold the environment.
const STAGING_MAX_AGE: Duration = Duration::from_secs(3600);
/// After SIGKILL, how long to wait for the processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Whether a recorded process still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// The process with that pid and start time runs (not a zombie).
    Running,
    /// No such process (or the pid now names another one, or a zombie).
    Gone,
    /// `/proc` could not tell (an error other than "no such process").
    Unknown,
}

/// Whether the process `pid` that started at `start_time` still runs.
pub fn liveness(pid: u32, start_time: u64) -> Liveness {
    if pid == 0 {
        return Liveness::Gone;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(content) => match procinfo::parse_stat(&content) {
            Some(s) if s.start_time == start_time && !s.is_zombie() => Liveness::Running,
            Some(_) => Liveness::Gone,
            None => Liveness::Unknown,
        },
        // ESRCH: it exited while being read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ESRCH) => Liveness::Gone,
        Err(_) => Liveness::Unknown,
    }
}

/// One directory of `instances/` with its record.
#[derive(Debug, Clone, Serialize)]
pub struct RecordEntry {
    pub dir: PathBuf,
    pub record: InstanceRecord,
    /// `exit.json`, once the main process has exited.
    pub exit: Option<ExitRecord>,
    pub main: Liveness,
    pub monitor: Liveness,
}

impl RecordEntry {
    /// The app's process or its monitor may still run.
    pub fn is_live(&self) -> bool {
        self.main != Liveness::Gone || self.monitor != Liveness::Gone
    }

    /// `web.1#3` or `task release-3-1`.
    pub fn label(&self) -> String {
        match (&self.record.instance, &self.record.task) {
            (Some(i), _) => i.to_string(),
            (None, Some(t)) => format!("task {t}"),
            (None, None) => "instance".to_string(),
        }
    }
}

/// Every record under `<state_dir>/instances/`, live or not, oldest first.
pub fn records(state_dir: &Path) -> Vec<RecordEntry> {
    let Ok(entries) = std::fs::read_dir(state_dir.join(INSTANCES_DIR)) else {
        return Vec::new();
    };
    let mut out: Vec<RecordEntry> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let dir = e.path();
            let record = read_json::<InstanceRecord>(&dir.join(RECORD_FILE))?;
            let exit = read_json::<ExitRecord>(&dir.join(EXIT_FILE));
            let main = liveness(record.pid, record.start_time);
            let monitor = liveness(record.monitor_pid, record.monitor_start_time);
            Some(RecordEntry { dir, record, exit, main, monitor })
        })
        .collect();
    out.sort_by(|a, b| a.record.started_at.cmp(&b.record.started_at));
    out
}

/// The records whose app process or monitor may still run.
pub fn live_records(state_dir: &Path) -> Vec<RecordEntry> {
    records(state_dir).into_iter().filter(RecordEntry::is_live).collect()
}

fn age(path: &Path, now: SystemTime) -> Option<Duration> {
    let modified = std::fs::symlink_metadata(path).and_then(|m| m.modified()).ok()?;
    Some(now.duration_since(modified).unwrap_or_default())
}

/// Delete the records of instances and tasks that ended more than
/// `max_age` ago or beyond the newest `keep` ended ones, and staging
/// directories no monitor took over. Records of anything that may still
/// run are never deleted. Returns how many directories were removed.
pub fn prune_records(state_dir: &Path, max_age: Duration, keep: usize, now: SystemTime) -> io::Result<usize> {
    let dir = state_dir.join(INSTANCES_DIR);
    let mut ended: Vec<(Duration, PathBuf)> = Vec::new();
    let mut doomed: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(STAGING_PREFIX) {
            if age(&path, now).is_some_and(|a| a >= STAGING_MAX_AGE) {
                doomed.push(path);
            }
            continue;
        }
        match read_json::<InstanceRecord>(&path.join(RECORD_FILE)) {
            Some(r) => {
                let gone = liveness(r.pid, r.start_time) == Liveness::Gone
                    && liveness(r.monitor_pid, r.monitor_start_time) == Liveness::Gone;
                if !gone {
                    continue;
                }
                let exit = path.join(EXIT_FILE);
                let since = age(&if exit.exists() { exit } else { path.join(RECORD_FILE) }, now);
                ended.push((since.unwrap_or(Duration::MAX), path));
            }
            // A start that never completed (the monitor died before it
            // wrote its record), or something else: only once old.
            None => {
                if age(&path, now).is_some_and(|a| a >= max_age) {
                    doomed.push(path);
                }
            }
        }
    }
    let ages: Vec<Duration> = ended.iter().map(|(since, _)| *since).collect();
    for ((_, path), prune) in ended.into_iter().zip(prunable(&ages, max_age, keep)) {
        if prune {
            doomed.push(path);
        }
    }
    let mut removed = 0;
    for path in doomed {
        if std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Which records of ended instances to delete, given how long ago each
/// ended (`true` at the same index): those that ended `max_age` ago or
/// more, and all but the `keep` most recent.
pub fn prunable(ages: &[Duration], max_age: Duration, keep: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..ages.len()).collect();
    order.sort_by_key(|&i| ages[i]);
    let mut out = vec![true; ages.len()];
    for &i in order.iter().take(keep) {
        out[i] = ages[i] >= max_age;
    }
    out
}

/// Why [`stop_recorded`] could not stop what a record names.
#[derive(Debug, thiserror::Error)]
pub enum StopRecordedError {
    #[error("could not signal process group {pid}: {source}")]
    Signal {
        pid: u32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error(
        "pid {pid} (monitor {monitor_pid}) still runs {}s after SIGKILL; check `ps -o pid,stat,wchan:20,cmd -g {pid}`",
        after.as_secs()
    )]
    Unkillable { pid: u32, monitor_pid: u32, after: Duration },
}

/// Stop what a record names, whoever started it: `signal` to the app's
/// process group, SIGKILL (group and monitor) after `timeout`, and wait
/// until both the app and its monitor are gone. For `nonstop down` and
/// `nonstop doctor --repair`, when no daemon knows the instance.
pub async fn stop_recorded(
    rec: &InstanceRecord,
    signal: Signal,
    timeout: Duration,
) -> Result<StopOutcome, StopRecordedError> {
    let main_running = || liveness(rec.pid, rec.start_time) != Liveness::Gone;
    let monitor_running = || liveness(rec.monitor_pid, rec.monitor_start_time) != Liveness::Gone;
    let all_gone = || !main_running() && !monitor_running();
    if all_gone() {
        return Ok(StopOutcome::AlreadyGone);
    }
    let wait = |limit: Duration| async move {
        let deadline = Instant::now() + limit;
        while !all_gone() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    };
    // Only while the pid is provably the recorded one (same start time):
    // then its group id cannot have been reused either.
    let send = |sig: Signal| -> Result<(), StopRecordedError> {
        if matches!(procinfo::stat(rec.pid), Ok(Some(s)) if s.start_time == rec.start_time) {
            procinfo::signal_group(rec.pid, sig)
                .and_then(|_| procinfo::signal_process(rec.pid, sig))
                .map_err(|source| StopRecordedError::Signal { pid: rec.pid, source })?;
        }
        Ok(())
    };
    if main_running() {
        send(signal)?;
        // The monitor ends the rest of the group and exits by itself.
        if wait(timeout).await {
            return Ok(StopOutcome::Graceful);
        }
    } else if wait(timeout).await {
        // Only the monitor was left, finishing its cleanup.
        return Ok(StopOutcome::AlreadyGone);
    }
    send(Signal::SIGKILL)?;
    if matches!(procinfo::stat(rec.monitor_pid), Ok(Some(s)) if s.start_time == rec.monitor_start_time) {
        let _ = procinfo::signal_process(rec.monitor_pid, Signal::SIGKILL);
    }
    if wait(KILL_WAIT).await {
        return Ok(StopOutcome::Killed);
    }
    Err(StopRecordedError::Unkillable { pid: rec.pid, monitor_pid: rec.monitor_pid, after: KILL_WAIT })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{write_atomic, ExitRecord};
    use nonstop_core::driver::ExitStatus;

    fn record(pid: u32, start_time: u64, monitor_pid: u32, monitor_start_time: u64) -> InstanceRecord {
        InstanceRecord {
            app: "hello".into(),
            environment: "default".into(),
            instance: None,
            task: Some("t".into()),
            pid,
            start_time,
            monitor_pid,
            monitor_start_time,
            log_path: PathBuf::from("/nonexistent"),
            started_at: "2026-01-01T00:00:00.000000Z".into(),
        }
    }

    fn put(state: &Path, name: &str, rec: &InstanceRecord, exited: bool) -> PathBuf {
        let dir = state.join(INSTANCES_DIR).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_atomic(&dir.join(RECORD_FILE), &serde_json::to_vec(rec).unwrap()).unwrap();
        if exited {
            let exit = ExitRecord { status: ExitStatus::Code(0), exited_at_ms: 0 };
            write_atomic(&dir.join(EXIT_FILE), &serde_json::to_vec(&exit).unwrap()).unwrap();
        }
        dir
    }

    proptest::proptest! {
        #[test]
        fn prunable_keeps_at_most_keep_of_the_youngest_and_nothing_old(
            ages in proptest::collection::vec(0u64..100, 0..40),
            max_age in 0u64..120,
            keep in 0usize..50,
        ) {
            let ages: Vec<Duration> = ages.into_iter().map(Duration::from_secs).collect();
            let max_age = Duration::from_secs(max_age);
            let prune = prunable(&ages, max_age, keep);
            proptest::prop_assert_eq!(prune.len(), ages.len());
            let kept: Vec<Duration> = ages.iter().zip(&prune).filter(|(_, p)| !**p).map(|(a, _)| *a).collect();
            proptest::prop_assert!(kept.len() <= keep);
            proptest::prop_assert!(kept.iter().all(|a| *a < max_age), "an old record is kept");
            // Nothing younger than a kept record goes unless the bound
            // forced it: the kept ones are the youngest of the young.
            let young = ages.iter().filter(|a| **a < max_age).count();
            proptest::prop_assert_eq!(kept.len(), young.min(keep));
            let oldest_kept = kept.iter().max();
            for (a, p) in ages.iter().zip(&prune) {
                if *p && *a < max_age {
                    proptest::prop_assert_eq!(kept.len(), keep, "a young record went with room left");
                    proptest::prop_assert!(oldest_kept.is_none_or(|k| k <= a), "a younger record went first");
                }
            }
        }
    }

    #[test]
    fn pruning_keeps_live_records_and_the_newest_ended_ones() {
        let state = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let my_start = procinfo::self_start_time().unwrap();
        // Live: this test process plays the app (its monitor is gone).
        let live = put(state.path(), "live", &record(me, my_start, 999_999_999, 1), false);
        // Live: only its monitor runs.
        let live_monitor = put(state.path(), "live-monitor", &record(999_999_998, 1, me, my_start), true);
        // Ended: the pid names another process now (start time differs).
        let ended: Vec<PathBuf> = (0..5)
            .map(|i| put(state.path(), &format!("ended-{i}"), &record(me, my_start + 1, me, my_start + 1), true))
            .collect();
        // Nothing is old yet: only the count bound applies (keep 2).
        let removed = prune_records(state.path(), PRUNE_AFTER, 2, SystemTime::now()).unwrap();
        assert_eq!(removed, 3);
        assert!(live.exists() && live_monitor.exists());
        assert_eq!(ended.iter().filter(|d| d.exists()).count(), 2);
        // A day later every ended record goes; the live ones stay.
        let later = SystemTime::now() + PRUNE_AFTER + Duration::from_secs(1);
        assert_eq!(prune_records(state.path(), PRUNE_AFTER, PRUNE_KEEP, later).unwrap(), 2);
        assert!(live.exists() && live_monitor.exists());
        assert_eq!(live_records(state.path()).len(), 2);
        // A staging directory nobody took over goes after an hour.
        let staging = state.path().join(INSTANCES_DIR).join(format!("{STAGING_PREFIX}1-2-3"));
        std::fs::create_dir(&staging).unwrap();
        assert_eq!(prune_records(state.path(), PRUNE_AFTER, PRUNE_KEEP, SystemTime::now()).unwrap(), 0);
        assert_eq!(prune_records(state.path(), PRUNE_AFTER, PRUNE_KEEP, later).unwrap(), 1);
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn stop_recorded_ends_a_process_group_nobody_else_knows() {
        use std::os::unix::process::CommandExt;
        let mut child =
            std::process::Command::new("sh").arg("-c").arg("sleep 1000 & wait").process_group(0).spawn().unwrap();
        let pid = child.id();
        let start = procinfo::start_time(pid).unwrap();
        let rec = record(pid, start, 999_999_999, 1);
        let reaper = std::thread::spawn(move || child.wait());
        let outcome = stop_recorded(&rec, Signal::SIGTERM, Duration::from_secs(10)).await.unwrap();
        assert_eq!(outcome, StopOutcome::Graceful);
        reaper.join().unwrap().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while procinfo::group_exists(pid) {
            assert!(Instant::now() < deadline, "the sleep in its group is gone too");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            stop_recorded(&rec, Signal::SIGTERM, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::AlreadyGone
        );
    }
}
