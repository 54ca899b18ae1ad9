//! Immutable releases on disk, built once.
//!
//! A release is a snapshot of the app directory plus the output of the
//! spec's `build` commands, stored as `<root>/v<N>` (the root is typically
//! `$NONSTOP_HOME/releases/<app>`). It is identified by a sequence number
//! that the caller allocates and persists, and by the content hash of the
//! snapshot ([`SnapshotStats::content_hash`]).
//!
//! # What goes into a snapshot
//! Everything in the app directory except:
//! - what `.gitignore` files exclude (nested ones too), and
//!   `.git/info/exclude`, whether or not the directory is a git repository;
//! - what `.nonstopignore` files (same syntax, nested ones too) exclude;
//! - always: `.git` (directory or file), `__pycache__/`, `*.pyc`,
//!   `node_modules/.cache/`, a `.nonstop/` at the top (reserved for nonstop's
//!   own files in a release), the releases root and any directory given to
//!   [`ReleaseBuilder::with_excluded`] (the state directory) when they are
//!   inside the app directory;
//! - sockets, fifos and device files.
//!
//! Only ignore files inside the app directory count: not a global gitignore,
//! not one in a parent directory, so the same directory gives the same
//! release on every machine. Symlinks are copied as symlinks (never
//! followed, wherever they point). File permissions are kept (the
//! executable bit matters); directories always get owner `rwx` so that build
//! commands can write into them.
//!
//! # The content hash
//! sha256 over the sorted list of (relative path, type, owner-executable
//! bit, content or symlink target). Modification times, owners and the other
//! permission bits do not count, so two directories with the same content
//! hash the same on any machine; any change to a file's bytes, a path, a
//! symlink target or the executable bit changes it.
//!
//! # Building
//! [`ReleaseBuilder::build`] builds in place, in `<root>/v<N>`: the path the
//! release's instances will run in, so that what build commands produce may
//! hold its own absolute path (a `python -m venv .venv` with its scripts'
//! `#!.../v<N>/.venv/bin/python`, `.pth` files, compiled paths). Before
//! the directory is created, a marker `<root>/.building-v<N>` is created,
//! synced and locked (`flock`) for the whole build; a `v<N>` whose marker
//! exists is not a release ([`ReleaseBuilder::list`] skips it). The build
//! copies the snapshot in, runs the build commands there one at a time
//! (`sh -c`, in their own process group, with exactly the environment
//! given, output timestamped into `.nonstop/build.log` and streamed as
//! [`BuildEvent::Output`]), syncs the file system, and only then removes
//! the marker and syncs the root: publishing. Each command's process is
//! spawned held at a gate, and its pid and start time are reported with a
//! [`RunPermit`] ([`BuildEvent::CommandSpawned`]); the command runs only
//! once the caller, having recorded the process, grants it. A daemon that
//! dies before the record leaves nothing running (the held process exits
//! when its gate closes, without running the command); one that died
//! after it left the command running, and the next one kills its group
//! from the record ([`kill_command`]). A build that fails, times out
//! or is cancelled leaves nothing behind: no `v<N>`, no marker, no
//! process; one that crashed leaves both, which
//! [`ReleaseBuilder::clean_staging`] (or the next build of that number)
//! removes once no live build holds the marker's lock.
//!
//! # Immutability
//! A built release directory is immutable **by convention**: nonstop never
//! writes into it after it is published, never rebuilds it, and refuses to
//! build a release number that exists. It stays writable because apps
//! (Django, for example) may write caches into their own directory.
#![forbid(unsafe_code)]

mod command;
mod fsutil;
mod leftover;
mod snapshot;

pub use leftover::{command_alive, kill_command, KillError};

pub use command::TAIL_LINES;
pub use nonstop_core::build::{NotPermitted, RunPermit};
pub use nonstop_core::driver::ExitStatus;
pub use snapshot::{META_DIR, NONSTOPIGNORE};

use command::{BuildLog, Ended, Run};
use fsutil::{remove_tree, sync_dir, LockedDir};
use nix::fcntl::{Flock, FlockArg};
use nonstop_core::ReleaseId;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The build log, relative to a release directory.
pub const BUILD_LOG: &str = ".nonstop/build.log";

/// Leftovers of builds by earlier versions, which built elsewhere and
/// renamed.
const STAGING_PREFIX: &str = ".staging-";
const TRASH_PREFIX: &str = ".trash-";
/// `<root>/.building-v<N>`: `v<N>` is being built (see the crate docs).
const BUILDING_PREFIX: &str = ".building-";

/// What a snapshot contains.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotStats {
    /// Regular files and symlinks.
    pub files: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Lowercase hex sha256; see the crate documentation.
    pub content_hash: String,
}

/// Which stream a line of build output came from (the build log has the
/// line format of every nonstop log).
pub use nonstop_core::logline::Stream;

/// One build.
#[derive(Debug, Clone)]
pub struct BuildRequest<'a> {
    /// The app directory.
    pub source: &'a Path,
    /// The release number, allocated (and persisted) by the caller.
    pub release: ReleaseId,
    /// Run with `sh -c` in the release directory, one at a time, in order.
    pub build_commands: &'a [String],
    /// The complete environment of the build commands (nothing is
    /// inherited): the caller adds `PATH`, `NONSTOP_RELEASE` and the rest.
    pub env: &'a [(String, String)],
    /// Per command.
    pub timeout: Duration,
    /// Cancels the build: the running command's process group is killed
    /// and nothing is left on disk.
    pub cancel: CancellationToken,
}

/// Progress of a build, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// The app directory was copied into the release directory.
    Snapshotted(SnapshotStats),
    /// `index` is 0-based into `build_commands`; `total` is their number.
    CommandStarted { index: usize, total: usize, command: String },
    /// The command's process exists, as the leader of its own process
    /// group: its pid and start time, to record (see [`kill_command`]). It
    /// waits before running anything of the command until `permit` is
    /// granted: record the process, then grant it (refused or dropped, the
    /// command never runs and the build fails with
    /// [`ReleaseError::NotRecorded`]).
    CommandSpawned { index: usize, process: nonstop_core::driver::Locator, permit: RunPermit },
    /// One line of a command's output (without the line end).
    Output { index: usize, stream: Stream, line: String },
    /// Sent for every command that exited by itself, successful or not (not
    /// for one killed on timeout or cancel: the build's error says that).
    CommandFinished { index: usize, status: ExitStatus, duration: Duration },
}

/// A published release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltRelease {
    pub release: ReleaseId,
    /// `<root>/v<N>`.
    pub dir: PathBuf,
    pub stats: SnapshotStats,
    /// `<dir>/.nonstop/build.log`.
    pub build_log: PathBuf,
    /// Snapshot plus build commands.
    pub duration: Duration,
}

/// Why a release could not be built, listed or pruned. Each message names
/// the problem and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("app directory {0} does not exist; run the command in the app directory or pass the right path")]
    SourceMissing(PathBuf),

    #[error("app directory {0} is not a directory; pass the directory that holds nonstop.toml")]
    SourceNotDir(PathBuf),

    #[error("release {release} already exists at {path}; releases are immutable: build the next release number, or prune this one first")]
    ReleaseExists { release: ReleaseId, path: PathBuf },

    #[error(
        "cannot read {path}: {error}; fix its permissions, or list it in .nonstopignore to leave it out of releases"
    )]
    Read { path: PathBuf, error: std::io::Error },

    #[error(
        "cannot list the app directory {source_dir}: {error}; fix the permissions, or list the path in .nonstopignore"
    )]
    Walk { source_dir: PathBuf, error: ignore::Error },

    #[error("cannot write {path}: {error}; check the free space and permissions of the releases directory")]
    Write { path: PathBuf, error: std::io::Error },

    #[error("build command {} of {total} `{command}` could not be started: {error}", index + 1)]
    Spawn { index: usize, total: usize, command: String, error: std::io::Error },

    #[error(
        "build command {} of {total} `{command}` failed with {status}; last output:{}",
        index + 1,
        fmt_tail(output_tail)
    )]
    BuildFailed { index: usize, total: usize, command: String, status: ExitStatus, output_tail: Vec<String> },

    #[error(
        "build command {} of {total} `{command}` timed out after {} and was killed with its process group; make it faster or raise the build timeout; last output:{}",
        index + 1,
        command::fmt_duration(*timeout),
        fmt_tail(output_tail)
    )]
    BuildTimedOut { index: usize, total: usize, command: String, timeout: Duration, output_tail: Vec<String> },

    #[error("build command {} of {total} `{command}` was not run: {source}", index + 1)]
    NotRecorded {
        index: usize,
        total: usize,
        command: String,
        #[source]
        source: NotPermitted,
    },

    #[error(
        "build command {} of {total} `{command}` was not run: the start time of its process {pid} could not be read \
         from /proc/{pid}/stat, so it could not be recorded (nothing could find it again after a daemon restart); \
         check that /proc is mounted and readable",
        index + 1
    )]
    Unlocatable { index: usize, total: usize, command: String, pid: u32 },

    #[error("build of release {release} was cancelled {stage}; nothing was published")]
    Cancelled { release: ReleaseId, stage: String },

    /// Internal: the snapshot walk saw the cancel token (mapped to
    /// `Cancelled` before it reaches callers).
    #[doc(hidden)]
    #[error("interrupted")]
    Interrupted,
}

impl ReleaseError {
    /// The last lines of output of a failed build command.
    pub fn output_tail(&self) -> Option<&[String]> {
        match self {
            ReleaseError::BuildFailed { output_tail, .. } | ReleaseError::BuildTimedOut { output_tail, .. } => {
                Some(output_tail)
            }
            _ => None,
        }
    }
}

fn fmt_tail(tail: &[String]) -> String {
    if tail.is_empty() {
        return " (none)".to_string();
    }
    let mut s = String::new();
    for line in tail {
        s.push_str("\n    ");
        s.push_str(line);
    }
    s
}

/// Builds, lists and prunes the releases of one app under one root.
#[derive(Debug, Clone)]
pub struct ReleaseBuilder {
    root: PathBuf,
    excluded: Vec<PathBuf>,
}

impl ReleaseBuilder {
    /// `root` holds the releases (`<root>/v1`, `<root>/v2`, ...); it is
    /// created by the first build. Nothing is read or written here.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), excluded: Vec::new() }
    }

    /// Also leave `dir` out of snapshots when it is inside the app directory
    /// (pass the state directory, `$NONSTOP_HOME`). The releases root is
    /// always left out.
    pub fn with_excluded(mut self, dir: impl Into<PathBuf>) -> Self {
        self.excluded.push(dir.into());
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The content hash of an app directory as it is now, without copying
    /// anything (to tell "nothing changed since the last release"). Leaves
    /// out only what the ignore rules leave out; see
    /// [`ReleaseBuilder::snapshot_hash`] for this builder's exclusions too.
    pub fn content_hash(source: &Path) -> Result<SnapshotStats, ReleaseError> {
        let source = canonical_source(source)?;
        snapshot::snapshot(&source, None, &[], None)
    }

    /// Like [`ReleaseBuilder::content_hash`], also leaving out the releases
    /// root and the directories given to [`ReleaseBuilder::with_excluded`]:
    /// exactly what [`ReleaseBuilder::build`] would snapshot. Blocking.
    pub fn snapshot_hash(&self, source: &Path) -> Result<SnapshotStats, ReleaseError> {
        let source = canonical_source(source)?;
        snapshot::snapshot(&source, None, &self.excluded_within(&source), None)
    }

    /// `<root>/v<N>`.
    pub fn path_of(&self, release: ReleaseId) -> PathBuf {
        self.root.join(release.to_string())
    }

    /// `<root>/.building-v<N>`.
    fn marker_of(&self, release: ReleaseId) -> PathBuf {
        self.root.join(format!("{BUILDING_PREFIX}{release}"))
    }

    /// The releases present on disk, in ascending order. Directories being
    /// built (or whose build crashed) and half-deleted ones are not
    /// releases.
    pub fn list(&self) -> Vec<ReleaseId> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<ReleaseId> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| parse_release_name(e.file_name().to_str()?))
            .filter(|release| self.marker_of(*release).symlink_metadata().is_err())
            .collect();
        out.sort_unstable();
        out
    }

    /// Delete every release not in `keep`; returns the deleted ones in
    /// ascending order. Each is first renamed out of the way, so a crash
    /// mid-way never leaves a half release that looks whole.
    pub fn prune(&self, keep: &[ReleaseId]) -> Result<Vec<ReleaseId>, ReleaseError> {
        let mut removed = Vec::new();
        for release in self.list() {
            if keep.contains(&release) {
                continue;
            }
            let trash = LockedDir::create(&self.root, &format!("{TRASH_PREFIX}{release}-"))
                .map_err(|e| snapshot::write_err(&self.root, e))?;
            let from = self.path_of(release);
            let to = trash.path().join(release.to_string());
            fsutil::make_owner_writable(&from).map_err(|e| snapshot::write_err(&from, e))?;
            std::fs::rename(&from, &to).map_err(|e| snapshot::write_err(&from, e))?;
            sync_dir(&self.root).map_err(|e| snapshot::write_err(&self.root, e))?;
            remove_tree(trash.path()).map_err(|e| snapshot::write_err(trash.path(), e))?;
            removed.push(release);
        }
        Ok(removed)
    }

    /// Remove what crashed builds and prunes left behind (a `v<N>` with its
    /// `.building-v<N>` marker, `.trash-*`, and the `.staging-*` of earlier
    /// versions). What a build or a prune (of this or another process) still
    /// holds is left alone, so this is safe to call at any time; call it
    /// when the daemon starts. Returns what was removed.
    pub fn clean_staging(&self) -> Result<Vec<PathBuf>, ReleaseError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(snapshot::read_err(&self.root, e)),
        };
        let mut removed = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(release) = name.strip_prefix(BUILDING_PREFIX).and_then(parse_release_name) {
                if let Some(building) = Building::take_over(self, release)? {
                    let dir = building.dir.clone();
                    building.remove().map_err(|e| snapshot::write_err(&dir, e))?;
                    removed.push(dir);
                }
                continue;
            }
            if !(name.starts_with(STAGING_PREFIX) || name.starts_with(TRASH_PREFIX)) {
                continue;
            }
            let path = entry.path();
            // Held by a live build or prune: not ours to remove.
            let Some(_lock) = LockedDir::try_lock(&path) else {
                continue;
            };
            remove_tree(&path).map_err(|e| snapshot::write_err(&path, e))?;
            removed.push(path);
        }
        Ok(removed)
    }

    /// Build release `req.release`: snapshot, build commands, publish.
    /// `events` sees the progress. On any failure nothing is left on disk.
    pub async fn build(
        &self,
        req: BuildRequest<'_>,
        mut events: impl FnMut(BuildEvent) + Send,
    ) -> Result<BuiltRelease, ReleaseError> {
        let started = Instant::now();
        let release = req.release;
        let source = canonical_source(req.source)?;
        let final_dir = self.path_of(release);
        std::fs::create_dir_all(&self.root).map_err(|e| snapshot::write_err(&self.root, e))?;
        let excluded = self.excluded_within(&source);
        let cancelled = |stage: &str| ReleaseError::Cancelled { release, stage: stage.to_string() };

        let building = Building::start(self, release, req.cancel.child_token())?;

        // 1. Snapshot, off the async threads. The walk checks the token
        //    between entries.
        let stats = {
            let (src, dst, token) = (source.clone(), building.dir.clone(), building.token.clone());
            let joined =
                tokio::task::spawn_blocking(move || snapshot::snapshot(&src, Some(&dst), &excluded, Some(&token)))
                    .await;
            match joined {
                Ok(Ok(stats)) => stats,
                Ok(Err(ReleaseError::Interrupted)) => {
                    building.discard().await;
                    return Err(cancelled("while copying the app directory"));
                }
                Ok(Err(e)) => {
                    building.discard().await;
                    return Err(e);
                }
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            }
        };
        events(BuildEvent::Snapshotted(stats.clone()));

        // 2. Build commands, in the release directory.
        let meta = building.dir.join(META_DIR);
        let log_path = building.dir.join(BUILD_LOG);
        let mut log = match std::fs::create_dir(&meta).and_then(|()| BuildLog::create(&log_path)) {
            Ok(log) => log,
            Err(e) => {
                building.discard().await;
                return Err(snapshot::write_err(&log_path, e));
            }
        };
        let total = req.build_commands.len();
        for (index, command) in req.build_commands.iter().enumerate() {
            if req.cancel.is_cancelled() {
                building.discard().await;
                return Err(cancelled(&format!("before build command {} of {total}", index + 1)));
            }
            events(BuildEvent::CommandStarted { index, total, command: command.clone() });
            let run = Run {
                index,
                total,
                command,
                dir: &building.dir,
                env: req.env,
                timeout: req.timeout,
                cancel: &req.cancel,
            };
            let ended = command::run(run, &mut log, &mut events).await;
            let failure = match ended {
                Ok(Ended::Exited { status, tail, duration }) => {
                    events(BuildEvent::CommandFinished { index, status, duration });
                    if status.success() {
                        continue;
                    }
                    ReleaseError::BuildFailed { index, total, command: command.clone(), status, output_tail: tail }
                }
                Ok(Ended::TimedOut { tail }) => ReleaseError::BuildTimedOut {
                    index,
                    total,
                    command: command.clone(),
                    timeout: req.timeout,
                    output_tail: tail,
                },
                Ok(Ended::Cancelled) => cancelled(&format!("during build command {} of {total}", index + 1)),
                Ok(Ended::NotRun(source)) => {
                    ReleaseError::NotRecorded { index, total, command: command.clone(), source }
                }
                Ok(Ended::Unlocatable { pid }) => {
                    ReleaseError::Unlocatable { index, total, command: command.clone(), pid }
                }
                Err(error) => ReleaseError::Spawn { index, total, command: command.clone(), error },
            };
            drop(log);
            building.discard().await;
            return Err(failure);
        }
        log.sync();
        drop(log);
        if req.cancel.is_cancelled() {
            building.discard().await;
            return Err(cancelled("after the build commands"));
        }

        // 3. Read-only from here: what the app writes at run time goes to
        //    NONSTOP_DATA_DIR or TMPDIR, never into the release.
        let dir = building.dir.clone();
        let read_only = tokio::task::spawn_blocking(move || fsutil::make_read_only(&dir))
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
        if let Err(e) = read_only {
            let dir = building.dir.clone();
            building.discard().await;
            return Err(snapshot::write_err(&dir, e));
        }

        // 4. Publish: everything on disk first, then the marker goes.
        if let Err(e) = building.publish().await {
            return Err(snapshot::write_err(&final_dir, e));
        }

        Ok(BuiltRelease {
            release,
            build_log: final_dir.join(BUILD_LOG),
            dir: final_dir,
            stats,
            duration: started.elapsed(),
        })
    }

    /// The releases root and the extra exclusions, relative to `source`,
    /// for those inside it.
    fn excluded_within(&self, source: &Path) -> Vec<PathBuf> {
        std::iter::once(&self.root)
            .chain(&self.excluded)
            .filter_map(|dir| {
                let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                let rel = dir.strip_prefix(source).ok()?;
                (!rel.as_os_str().is_empty()).then(|| rel.to_path_buf())
            })
            .collect()
    }
}

fn canonical_source(source: &Path) -> Result<PathBuf, ReleaseError> {
    match source.canonicalize() {
        Ok(p) if p.is_dir() => Ok(p),
        Ok(_) => Err(ReleaseError::SourceNotDir(source.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ReleaseError::SourceMissing(source.to_path_buf())),
        Err(e) => Err(snapshot::read_err(source, e)),
    }
}

/// `v12` → 12. Only the canonical spelling (no sign, no leading zero).
fn parse_release_name(name: &str) -> Option<ReleaseId> {
    let digits = name.strip_prefix('v')?;
    let n: u64 = digits.parse().ok()?;
    (digits.bytes().all(|b| b.is_ascii_digit()) && n.to_string() == digits).then_some(ReleaseId(n))
}

/// One release directory being built in place: `dir` (`<root>/v<N>`) and
/// its marker (`<root>/.building-v<N>`), locked while this value lives.
/// Both are removed unless published.
struct Building {
    dir: PathBuf,
    marker: PathBuf,
    root: PathBuf,
    _lock: Flock<File>,
    /// Cancels the snapshot walk when the build is dropped or fails.
    token: CancellationToken,
    armed: bool,
}

impl Building {
    /// Create and lock the marker (synced before the directory exists),
    /// then the directory. A leftover of a crashed build of this number is
    /// removed first; a finished release or a live build of it is
    /// [`ReleaseError::ReleaseExists`].
    fn start(builder: &ReleaseBuilder, release: ReleaseId, token: CancellationToken) -> Result<Self, ReleaseError> {
        let root = &builder.root;
        let dir = builder.path_of(release);
        let marker = builder.marker_of(release);
        let exists = || ReleaseError::ReleaseExists { release, path: dir.clone() };
        let write_err = |path: &Path, e| snapshot::write_err(path, e);
        let mut building = None;
        for _ in 0..5 {
            match File::options().write(true).create_new(true).open(&marker) {
                Ok(file) => {
                    if dir.symlink_metadata().is_ok() {
                        // A published release (its marker was removed).
                        let _ = std::fs::remove_file(&marker);
                        return Err(exists());
                    }
                    let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                        // `clean_staging` took it as a leftover meanwhile.
                        continue;
                    };
                    if marker.symlink_metadata().is_err() {
                        continue; // ... and removed it.
                    }
                    building = Some(lock);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match Self::take_over(builder, release)? {
                    Some(leftover) => leftover.remove().map_err(|e| write_err(&dir, e))?,
                    None => return Err(exists()), // a live build
                },
                Err(e) => return Err(write_err(&marker, e)),
            }
        }
        let lock = building.ok_or_else(|| {
            write_err(&marker, std::io::Error::other("the build marker kept disappearing (another process removes it)"))
        })?;
        let mut building = Building { dir: dir.clone(), marker, root: root.clone(), _lock: lock, token, armed: true };
        // The marker file itself, then its directory entry.
        let created =
            building._lock.sync_all().and_then(|()| sync_dir(root)).and_then(|()| std::fs::create_dir(&building.dir));
        if let Err(e) = created {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                // Not ours: keep it, drop only the marker.
                building.armed = false;
                let _ = std::fs::remove_file(&building.marker);
                return Err(exists());
            }
            return Err(write_err(&building.dir, e));
        }
        Ok(building)
    }

    /// The leftover of a crashed build of `release` (its marker, locked by
    /// no one: now by us), or `None` when a live build holds it or there
    /// is none.
    fn take_over(builder: &ReleaseBuilder, release: ReleaseId) -> Result<Option<Self>, ReleaseError> {
        let marker = builder.marker_of(release);
        let Some(lock) = fsutil::try_flock(&marker).map_err(|e| snapshot::read_err(&marker, e))? else {
            return Ok(None);
        };
        Ok(Some(Building {
            dir: builder.path_of(release),
            marker,
            root: builder.root.clone(),
            _lock: lock,
            token: CancellationToken::new(),
            armed: false,
        }))
    }

    /// Remove the directory, then the marker (so a crash in between leaves
    /// a marked leftover, never an unmarked half release).
    fn remove(mut self) -> std::io::Result<()> {
        self.armed = false;
        remove_tree(&self.dir)?;
        match std::fs::remove_file(&self.marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        sync_dir(&self.root)
    }

    /// Remove everything, off the async threads.
    async fn discard(mut self) {
        self.armed = false;
        self.token.cancel();
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || self.remove()).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(dir = %dir.display(), "cannot remove a release that was not published: {e}");
        }
    }

    /// Everything in the directory on disk first, then the marker removed
    /// and the root synced. On an error the build is discarded.
    async fn publish(mut self) -> std::io::Result<()> {
        self.armed = false;
        tokio::task::spawn_blocking(move || {
            let published = fsutil::sync_filesystem(&self.dir)
                .and_then(|()| std::fs::remove_file(&self.marker))
                .and_then(|()| sync_dir(&self.root));
            if published.is_err() && self.marker.symlink_metadata().is_ok() {
                self.token.cancel();
                let _ = self.remove();
            }
            published
        })
        .await
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        if self.armed {
            // The build future was dropped mid-way.
            self.armed = false;
            self.token.cancel();
            let _ = remove_tree(&self.dir);
            let _ = std::fs::remove_file(&self.marker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_names() {
        assert_eq!(parse_release_name("v1"), Some(ReleaseId(1)));
        assert_eq!(parse_release_name("v120"), Some(ReleaseId(120)));
        for bad in ["v", "v01", "v+1", "1", "v1x", ".staging-v1-abc", "V1"] {
            assert_eq!(parse_release_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn error_messages_name_the_command_and_the_tail() {
        let e = ReleaseError::BuildFailed {
            index: 1,
            total: 3,
            command: "python manage.py collectstatic".into(),
            status: ExitStatus::Code(1),
            output_tail: vec!["boom".into()],
        };
        assert_eq!(
            e.to_string(),
            "build command 2 of 3 `python manage.py collectstatic` failed with exit code 1; last output:\n    boom"
        );
    }
}
