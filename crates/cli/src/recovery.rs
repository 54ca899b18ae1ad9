//! A damaged or lost store, and what is left when it happens.
//!
//! - [`open_store`]: the daemon's start refuses a damaged store, and a
//!   missing one when the home shows that there was one (instance records,
//!   releases, a backup): "no store yet" is not "store lost".
//! - [`spawn_housekeeping`]: the daemon keeps `state.db.backup`, a
//!   consistent copy of the store (SQLite's online backup) refreshed after
//!   changes, and prunes the records of long-ended instances.
//! - [`stop_leftovers`]: `nonstop down` stops whatever `instances/` says
//!   still runs, known to the store or not.
//! - [`doctor`]: `nonstop doctor [--repair]`.

use crate::home::{Home, HomeProblem, Refused};
use anyhow::Context;
use nonstop_core::driver::StopOutcome;
use nonstop_store::{Inspection, Store, StoreError};
use nonstop_supervisor::records::{self, Liveness, RecordEntry};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the daemon looks whether the store changed since its last
/// backup. It backs up once the store has been quiet for that long (an
/// operation finished), or, under constant change, every
/// [`BACKUP_AT_MOST_EVERY`].
const BACKUP_CHECK: Duration = Duration::from_secs(2);
const BACKUP_AT_MOST_EVERY: Duration = Duration::from_secs(10);
/// How often it prunes `instances/` (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long a process found running gets to stop after SIGTERM when no
/// spec says otherwise (the spec's default `stop_timeout`).
const LEFTOVER_STOP_TIMEOUT: Duration = nonstop_spec::DEFAULT_STOP_TIMEOUT;

pub fn backup_path(home: &Home) -> PathBuf {
    home.dir.join("state.db.backup")
}

const REPAIR_HINT: &str = "run `nonstop doctor` to see what is left, then `nonstop doctor --repair`";

/// What in the home shows that a store existed: instance records, releases,
/// a backup. Empty for a new home.
fn traces_of_a_store(home: &Home) -> Vec<String> {
    let mut out = Vec::new();
    // Records of ended instances only are history, not something a fresh
    // store would leave unmanaged.
    let live = records::live_records(home.path()).len();
    if live > 0 {
        out.push(format!("{live} running instance(s) or task(s) recorded under instances/"));
    }
    let releases = std::fs::read_dir(home.dir.join("releases")).map(|d| d.flatten().count()).unwrap_or(0);
    if releases > 0 {
        out.push(format!("the releases of {releases} app(s) under releases/"));
    }
    if std::fs::symlink_metadata(backup_path(home)).is_ok() {
        out.push("a backup (state.db.backup)".to_string());
    }
    out
}

/// The daemon's store: opened if healthy, created if this is a new home;
/// refused (nothing started) if damaged, or missing from a home that had
/// one.
pub fn open_store(home: &Home) -> anyhow::Result<Store> {
    let path = home.database();
    if std::fs::symlink_metadata(&path).is_err() {
        let traces = traces_of_a_store(home);
        if !traces.is_empty() {
            return Err(Refused(format!(
                "the state database {} is missing, but this home holds {}: the store was lost. Nothing was \
                 started; {REPAIR_HINT}",
                path.display(),
                traces.join(", ")
            ))
            .into());
        }
    }
    match Store::open(&path) {
        Ok(store) => Ok(store),
        Err(e @ StoreError::Damaged { .. }) => Err(Refused(format!(
            "{e}. Nothing was started; {REPAIR_HINT} (it restores the backup, or stops the instances the store \
             knew about)"
        ))
        .into()),
        Err(e) => Err(e.into()),
    }
}

// ------------------------------------------------------------ housekeeping

/// The daemon's background upkeep of its home, until `stop`: a backup of
/// the store at start, after changes (once quiet for 2 s, at most 10 s
/// late: a copy of a store this small costs a few milliseconds), and once
/// more at stop if it changed; pruning of `instances/` at
/// start and every hour.
pub fn spawn_housekeeping(store: Arc<Store>, home: &Home, stop: CancellationToken, tasks: &TaskTracker) {
    let backup = backup_path(home);
    let state_dir = home.dir.clone();
    tasks.spawn(async move {
        let mut backed_up_at: Option<u64> = None;
        let mut last_backup = tokio::time::Instant::now();
        let mut seen: Option<u64> = None;
        let mut last_error: Option<String> = None;
        let mut next_prune = tokio::time::Instant::now();
        loop {
            let changes = store.total_changes();
            let quiet = seen == Some(changes);
            seen = Some(changes);
            let due =
                backed_up_at.is_none() || stop.is_cancelled() || quiet || last_backup.elapsed() >= BACKUP_AT_MOST_EVERY;
            if backed_up_at != Some(changes) && due {
                last_backup = tokio::time::Instant::now();
                let (s, b) = (store.clone(), backup.clone());
                match tokio::task::spawn_blocking(move || s.backup_to(&b)).await {
                    Ok(Ok(())) => {
                        backed_up_at = Some(changes);
                        if last_error.take().is_some() {
                            tracing::info!("the store is backed up again to {}", backup.display());
                        }
                    }
                    Ok(Err(e)) => {
                        let e = e.to_string();
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!("cannot back up the store to {}: {e}", backup.display());
                            last_error = Some(e);
                        }
                    }
                    Err(e) => tracing::warn!("the store's backup task failed: {e}"),
                }
            }
            if stop.is_cancelled() {
                break;
            }
            if tokio::time::Instant::now() >= next_prune {
                next_prune += PRUNE_EVERY;
                let dir = state_dir.clone();
                let pruned = tokio::task::spawn_blocking(move || {
                    records::prune_records(&dir, records::PRUNE_AFTER, records::PRUNE_KEEP, SystemTime::now())
                })
                .await;
                match pruned {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!("pruned {n} record(s) of ended instances and tasks under instances/"),
                    Ok(Err(e)) => tracing::warn!("cannot prune {}/instances: {e}", state_dir.display()),
                    Err(e) => tracing::warn!("pruning instances/ failed: {e}"),
                }
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(BACKUP_CHECK) => {}
            }
        }
    });
}

// -------------------------------------------------------------- leftovers

/// One process stopped (or not) by [`stop_leftovers`].
#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    pub label: String,
    pub app: String,
    pub pid: u32,
    /// `stopped`, `killed (...)`, `already gone`, or why not.
    pub outcome: String,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} (pid {}): {}", self.label, self.app, self.pid, self.outcome)
    }
}

/// Stop everything `instances/` says still runs (SIGTERM to each process
/// group, SIGKILL after the default stop timeout), all at once.
pub async fn stop_leftovers(home: &Home, only: impl Fn(&RecordEntry) -> bool) -> Vec<Stopped> {
    let live: Vec<RecordEntry> = records::live_records(home.path()).into_iter().filter(|r| only(r)).collect();
    let handles: Vec<_> = live
        .into_iter()
        .map(|entry| {
            tokio::spawn(async move {
                let signal = nix::sys::signal::Signal::SIGTERM;
                let outcome = match records::stop_recorded(&entry.record, signal, LEFTOVER_STOP_TIMEOUT).await {
                    Ok(StopOutcome::Graceful) => "stopped".to_string(),
                    Ok(StopOutcome::Killed) => {
                        format!("killed (still running {}s after SIGTERM)", LEFTOVER_STOP_TIMEOUT.as_secs())
                    }
                    Ok(StopOutcome::AlreadyGone) => "already gone".to_string(),
                    Err(e) => format!("NOT stopped: {e}"),
                };
                Stopped { label: entry.label(), app: entry.record.app.clone(), pid: entry.record.pid, outcome }
            })
        })
        .collect();
    let mut done = Vec::new();
    for h in handles {
        if let Ok(s) = h.await {
            done.push(s);
        }
    }
    done
}

// ------------------------------------------------------------------ doctor

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum StoreState {
    /// No store and no sign there was one.
    New,
    Healthy,
    Damaged,
    /// No store, but instance records, releases or a backup.
    Lost,
    /// Could not be read (I/O error, lock).
    Unreadable,
}

#[derive(Debug, Serialize)]
struct StoreReport {
    path: PathBuf,
    state: StoreState,
    detail: Option<String>,
    /// Apps recorded, `name (running|stopped)`.
    apps: Vec<String>,
    /// Instances recorded for the apps, by pid.
    instance_pids: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct BackupReport {
    path: PathBuf,
    usable: bool,
    detail: Option<String>,
    age_secs: Option<u64>,
    apps: Vec<String>,
}

#[derive(Debug, Serialize)]
struct InstanceReport {
    label: String,
    app: String,
    environment: String,
    pid: u32,
    main: Liveness,
    monitor: Liveness,
    /// The store records it (`None` when the store cannot be read).
    known_to_store: Option<bool>,
    dir: PathBuf,
}

#[derive(Debug, Serialize)]
struct DoctorReport {
    home: PathBuf,
    home_problems: Vec<HomeProblem>,
    daemon_pid: Option<u32>,
    store: StoreReport,
    backup: BackupReport,
    running: Vec<InstanceReport>,
    ended_records: usize,
    problems: Vec<String>,
    advice: Vec<String>,
}

fn describe_store(store: &Store) -> (Vec<String>, Vec<u32>) {
    let mut apps = Vec::new();
    let mut pids = Vec::new();
    for a in store.apps().unwrap_or_default() {
        apps.push(format!("{} ({})", a.app, if a.running { "running" } else { "stopped" }));
        for i in store.instances(&a.app, &a.environment).unwrap_or_default() {
            if let Some(h) = i.handle {
                let nonstop_core::driver::Locator::Local { pid, .. } = h.locator;
                pids.push(pid);
            }
        }
    }
    (apps, pids)
}

fn inspect_store(home: &Home) -> StoreReport {
    let path = home.database();
    let mut report =
        StoreReport { path: path.clone(), state: StoreState::New, detail: None, apps: vec![], instance_pids: vec![] };
    match Store::inspect(&path) {
        Ok(Inspection::Missing) => {
            let traces = traces_of_a_store(home);
            if !traces.is_empty() {
                report.state = StoreState::Lost;
                report.detail = Some(format!("missing, but this home holds {}", traces.join(", ")));
            }
        }
        Ok(Inspection::Healthy(store)) => {
            report.state = StoreState::Healthy;
            (report.apps, report.instance_pids) = describe_store(&store);
        }
        Ok(Inspection::Damaged(d)) => {
            report.state = StoreState::Damaged;
            report.detail = Some(d.to_string());
        }
        Err(e) => {
            report.state = StoreState::Unreadable;
            report.detail = Some(e.to_string());
        }
    }
    report
}

fn inspect_backup(home: &Home) -> BackupReport {
    let path = backup_path(home);
    let age_secs = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default().as_secs());
    let mut report = BackupReport { path: path.clone(), usable: false, detail: None, age_secs, apps: vec![] };
    match Store::inspect(&path) {
        Ok(Inspection::Missing) => report.detail = Some("none yet".into()),
        Ok(Inspection::Healthy(store)) => {
            report.usable = true;
            report.apps = describe_store(&store).0;
        }
        Ok(Inspection::Damaged(d)) => report.detail = Some(d.to_string()),
        Err(e) => report.detail = Some(e.to_string()),
    }
    report
}

/// The daemon's pid if one holds the state lock.
fn daemon_holding_lock(home: &Home) -> Option<u32> {
    let file = crate::home::open_private(&home.lock(), std::fs::OpenOptions::new().read(true)).ok()?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_) => None,
        Err(_) => Some(std::fs::read_to_string(home.pid_file()).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(0)),
    }
}

fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86400),
    }
}

fn examine(home: &Home) -> DoctorReport {
    let home_problems = home.problems();
    let daemon_pid = daemon_holding_lock(home);
    let store = inspect_store(home);
    let backup = inspect_backup(home);
    let all = records::records(home.path());
    let ended_records = all.iter().filter(|r| !r.is_live()).count();
    let known = |pid: u32| (store.state == StoreState::Healthy).then(|| store.instance_pids.contains(&pid));
    let running: Vec<InstanceReport> = all
        .iter()
        .filter(|r| r.is_live())
        .map(|r| InstanceReport {
            label: r.label(),
            app: r.record.app.clone(),
            environment: r.record.environment.clone(),
            pid: r.record.pid,
            main: r.main,
            monitor: r.monitor,
            // Tasks are not in the store's instance table.
            known_to_store: if r.record.instance.is_some() { known(r.record.pid) } else { None },
            dir: r.dir.clone(),
        })
        .collect();

    let mut problems = Vec::new();
    let mut advice = Vec::new();
    for p in &home_problems {
        problems.push(p.to_string());
    }
    if !home_problems.is_empty() {
        advice.push(
            "fix the home first, as each problem above says (doctor never changes owners or modes), then run \
             `nonstop doctor` again"
                .to_string(),
        );
    }
    let orphans: Vec<&InstanceReport> = running.iter().filter(|r| r.known_to_store == Some(false)).collect();
    match store.state {
        StoreState::New | StoreState::Healthy => {
            if daemon_pid.is_none() && !orphans.is_empty() {
                problems.push(format!(
                    "{} instance(s) run that the store does not know: {}",
                    orphans.len(),
                    orphans.iter().map(|o| format!("{} (pid {})", o.label, o.pid)).collect::<Vec<_>>().join(", ")
                ));
                advice.push(
                    "`nonstop doctor --repair` stops them (so does `nonstop down`; a daemon started by `nonstop up` \
                     stops those of its app)"
                        .to_string(),
                );
            }
        }
        StoreState::Damaged | StoreState::Lost | StoreState::Unreadable => {
            problems.push(format!(
                "the store {} is {}: {}",
                store.path.display(),
                match store.state {
                    StoreState::Damaged => "damaged",
                    StoreState::Lost => "lost",
                    _ => "unreadable",
                },
                store.detail.clone().unwrap_or_default()
            ));
            if store.state == StoreState::Unreadable {
                advice.push("check the error above (permissions, disk) and run `nonstop doctor` again".to_string());
            } else if daemon_pid.is_some() {
                advice.push("a daemon still holds the state lock: stop it (`nonstop down`) before repairing".into());
            } else if backup.usable {
                advice.push(format!(
                    "`nonstop doctor --repair` keeps the damaged store aside, restores the backup (taken {}) and \
                     starts the daemon, which takes over the {} running instance(s) it knows and stops the others",
                    backup.age_secs.map(ago).unwrap_or_else(|| "at an unknown time".into()),
                    running.len()
                ));
            } else {
                advice.push(format!(
                    "there is no usable backup: `nonstop doctor --repair` keeps the damaged store aside, stops the {} \
                     running instance(s) and task(s) cleanly, starts a fresh store, and sets releases/ aside; then \
                     run `nonstop up` (or `nonstop deploy`) in the app's directory",
                    running.len()
                ));
            }
        }
    }
    if store.state == StoreState::Healthy && !backup.usable && backup.age_secs.is_some() {
        problems.push(format!(
            "the backup {} is not usable ({}); the daemon writes a new one after the next change",
            backup.path.display(),
            backup.detail.clone().unwrap_or_default()
        ));
    }
    DoctorReport {
        home: home.dir.clone(),
        home_problems,
        daemon_pid,
        store,
        backup,
        running,
        ended_records,
        problems,
        advice,
    }
}

fn print_report(r: &DoctorReport) {
    use crate::commands::emit;
    let home_state = if r.home_problems.is_empty() { "ok".to_string() } else { "UNSAFE (see below)".to_string() };
    emit(&format!("home     {}: {home_state}", r.home.display()));
    emit(&format!(
        "daemon   {}",
        match r.daemon_pid {
            Some(0) => "running (pid unknown)".to_string(),
            Some(p) => format!("running (pid {p})"),
            None => "not running".to_string(),
        }
    ));
    let store = match r.store.state {
        StoreState::New => "none yet (a new home)".to_string(),
        StoreState::Healthy => format!(
            "ok{}",
            if r.store.apps.is_empty() { String::new() } else { format!(", apps: {}", r.store.apps.join(", ")) }
        ),
        StoreState::Damaged => format!("DAMAGED: {}", r.store.detail.clone().unwrap_or_default()),
        StoreState::Lost => format!("LOST: {}", r.store.detail.clone().unwrap_or_default()),
        StoreState::Unreadable => format!("UNREADABLE: {}", r.store.detail.clone().unwrap_or_default()),
    };
    emit(&format!("store    {}: {store}", r.store.path.display()));
    let backup = if r.backup.usable {
        format!(
            "ok, taken {}{}",
            r.backup.age_secs.map(ago).unwrap_or_else(|| "at an unknown time".into()),
            if r.backup.apps.is_empty() { String::new() } else { format!(", apps: {}", r.backup.apps.join(", ")) }
        )
    } else {
        format!("not usable: {}", r.backup.detail.clone().unwrap_or_default())
    };
    emit(&format!("backup   {}: {backup}", r.backup.path.display()));
    emit(&format!("records  {} running, {} ended (kept for a day)", r.running.len(), r.ended_records));
    for i in &r.running {
        let known = match i.known_to_store {
            Some(true) => "known to the store",
            Some(false) => "NOT known to the store",
            None => "",
        };
        let monitor = if i.monitor == Liveness::Gone { ", its monitor is gone" } else { "" };
        emit(format!("         {} of {} pid {}{monitor} {known}", i.label, i.app, i.pid).trim_end());
    }
    if r.problems.is_empty() {
        emit("\nnothing is wrong");
        return;
    }
    emit("\nproblems:");
    for p in &r.problems {
        emit(&format!("  - {p}"));
    }
    if !r.advice.is_empty() {
        emit("what to do:");
        for a in &r.advice {
            emit(&format!("  - {a}"));
        }
    }
}

/// `state.db.damaged-20261206T072512Z`.
fn aside_name(path: &Path, what: &str) -> PathBuf {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let stamp: String = crate::commands::fmt_time(now).chars().filter(char::is_ascii_digit).collect();
    let stamp = format!("{}T{}Z", &stamp[..8], &stamp[8..]);
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{what}-{stamp}"));
    path.with_file_name(name)
}

/// Move the store and its write-ahead log aside; the new name of the store.
fn set_store_aside(home: &Home) -> anyhow::Result<Option<PathBuf>> {
    let db = home.database();
    let aside = aside_name(&db, "damaged");
    let mut moved = None;
    for (from, suffix) in
        [(db.clone(), ""), (nonstop_store::wal_path(&db), "-wal"), (nonstop_store::shm_path(&db), "-shm")]
    {
        if std::fs::symlink_metadata(&from).is_err() {
            continue;
        }
        let mut to = aside.as_os_str().to_owned();
        to.push(suffix);
        std::fs::rename(&from, &to).with_context(|| format!("cannot move {} aside", from.display()))?;
        if suffix.is_empty() {
            moved = Some(PathBuf::from(to));
        }
    }
    Ok(moved)
}

/// `nonstop doctor [--repair] [--json]`.
pub async fn doctor(home: &Home, repair: bool, json: bool) -> anyhow::Result<i32> {
    let report = examine(home);
    if !repair {
        if json {
            crate::commands::emit(&serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&report);
        }
        return Ok(if report.problems.is_empty() { 0 } else { 1 });
    }
    let mut done: Vec<String> = Vec::new();
    let result = repair_home(home, &report, &mut done).await;
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["repair"] = serde_json::json!({
            "done": done,
            "error": result.as_ref().err().map(|e| format!("{e:#}")),
        });
        crate::commands::emit(&serde_json::to_string_pretty(&v)?);
    } else {
        print_report(&report);
        if !done.is_empty() {
            crate::commands::emit("\nrepaired:");
            for d in &done {
                crate::commands::emit(&format!("  - {d}"));
            }
        }
    }
    match result {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(1)
        }
    }
}

async fn repair_home(home: &Home, report: &DoctorReport, done: &mut Vec<String>) -> anyhow::Result<()> {
    if !report.home_problems.is_empty() {
        anyhow::bail!("the home is not safe to use: fix it first as the problems above say; nothing was changed");
    }
    if std::fs::symlink_metadata(&home.dir).is_err() {
        done.push("nothing to repair: the home does not exist yet".into());
        return Ok(());
    }
    // No daemon may start (or run) while the store is replaced.
    let lock =
        crate::home::open_private(&home.lock(), std::fs::OpenOptions::new().create(true).truncate(false).write(true))
            .with_context(|| format!("cannot open {}", home.lock().display()))?;
    let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err(_) => anyhow::bail!(
            "a nonstop daemon runs for {} (it holds {}); nothing was changed. If the store is damaged, stop it with \
             `nonstop down` and repair again",
            home.dir.display(),
            home.lock().display()
        ),
    };
    match report.store.state {
        StoreState::Unreadable => {
            anyhow::bail!(
                "the store cannot be read ({}); nothing was changed",
                report.store.detail.clone().unwrap_or_default()
            )
        }
        StoreState::New | StoreState::Healthy => {
            // The store is fine: only processes it does not know are left
            // to end (a daemon would do the same for its app).
            let unknown: Vec<u32> =
                report.running.iter().filter(|r| r.known_to_store == Some(false)).map(|r| r.pid).collect();
            if unknown.is_empty() {
                done.push("nothing to repair in the store".into());
            } else {
                for s in stop_leftovers(home, |r| unknown.contains(&r.record.pid)).await {
                    done.push(format!("stopped {s} (not known to the store)"));
                }
            }
            drop(lock);
            return Ok(());
        }
        StoreState::Damaged | StoreState::Lost => {}
    }
    if let Some(aside) = set_store_aside(home)? {
        done.push(format!("kept the damaged store as {}", aside.display()));
    }
    let backup = backup_path(home);
    if report.backup.usable {
        nonstop_store::restore_backup(&backup, &home.database()).context("restoring the backup failed")?;
        done.push(format!(
            "restored the backup taken {} into {}",
            report.backup.age_secs.map(ago).unwrap_or_else(|| "at an unknown time".into()),
            home.database().display()
        ));
        // What the restored store does not run at all is stopped here; the
        // instances of the app it runs are the daemon's: it takes over those
        // it knows and stops the others.
        let store = Store::open(&home.database()).context("the restored store cannot be opened")?;
        let running_apps: Vec<(String, String)> = store
            .apps()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.running)
            .map(|a| (a.app.to_string(), a.environment.to_string()))
            .collect();
        drop(store);
        let foreign = |r: &RecordEntry| !running_apps.contains(&(r.record.app.clone(), r.record.environment.clone()));
        for s in stop_leftovers(home, foreign).await {
            done.push(format!("stopped {s} (its app is not running in the backup)"));
        }
        drop(lock);
        if running_apps.is_empty() {
            done.push("no app runs in the backup: start yours with `nonstop up` in its directory".into());
            return Ok(());
        }
        let client = crate::commands::ensure_daemon(home, None)
            .await
            .context("the daemon did not start on the restored store")?;
        let ping = client.ping().await?;
        let status: nonstop_engine::StatusReport = client.get("/v1/status").await?;
        done.push(format!(
            "started the daemon (pid {}): app {} with {} instance(s) (running ones it knew were taken over, the \
             others are being stopped and replaced); see `nonstop status`",
            ping.pid,
            status.app,
            status.instances.len()
        ));
        return Ok(());
    }
    // No usable backup: the store's knowledge is gone. Stop what runs,
    // cleanly, rather than leave it unmanaged.
    for s in stop_leftovers(home, |_| true).await {
        done.push(format!("stopped {s}"));
    }
    let releases = home.dir.join("releases");
    if std::fs::read_dir(&releases).map(|d| d.flatten().count()).unwrap_or(0) > 0 {
        let aside = aside_name(&releases, "lost");
        std::fs::rename(&releases, &aside).with_context(|| format!("cannot move {} aside", releases.display()))?;
        done.push(format!(
            "set the releases the store knew aside as {} (delete it once the app runs again)",
            aside.display()
        ));
    }
    drop(Store::open(&home.database()).context("cannot create a fresh store")?);
    done.push(format!(
        "created a fresh store {}: run `nonstop up` (or `nonstop deploy`) in the app's directory to start it again",
        home.database().display()
    ));
    drop(lock);
    Ok(())
}
