//! The boundaries that build releases (`Builder`) and read instance logs
//! (`InstanceLogs`), with what they exchange. Implemented by the binary
//! (the local snapshot builder, the supervisor's log files) and faked by
//! the testkit; an image build for ECS later.

use crate::driver::{ExitStatus, Locator, StopOutcome};
use crate::process::StaticMount;
use crate::{AppEnv, AppName, EnvironmentId, InstanceId, ReleaseId};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Any error a builder's implementation reports, kept whole (its source
/// chain included).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a build (or a builder's other work) failed. The message says what
/// went wrong; the source, when there is one, is kept.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("this daemon cannot build releases")]
    Unsupported,
    /// The snapshot, a build command, pruning: the builder's own error.
    #[error(transparent)]
    Release(BoxError),
    /// A `[static]` mount of the built release cannot be indexed: the
    /// indexer's error.
    #[error(transparent)]
    Statics(BoxError),
    /// The work was lost before it could answer (its task panicked or was
    /// cancelled).
    #[error("{what} failed: {source}")]
    Interrupted {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    /// A build command left by an earlier daemon would not go away.
    #[error("its process group was still there after {after}")]
    Lingering { after: String },
}

/// One release whose static files are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveStatics {
    pub release: ReleaseId,
    pub dir: PathBuf,
    pub mounts: Vec<StaticMount>,
}

/// The last log lines of an instance, for error reports.
pub trait InstanceLogs: Send + Sync + 'static {
    fn tail(&self, app: &AppName, env: &EnvironmentId, instance: &InstanceId, lines: usize) -> Vec<String>;
}

/// What a build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// The release's directory (its instances run there).
    pub dir: PathBuf,
    pub content_hash: String,
    pub files: u64,
    pub bytes: u64,
}

/// The go-ahead a spawned build command waits for before its command
/// runs. The builder spawns the command's process held at a gate, reports
/// it with a permit ([`BuildNote::Command`]), and lets the command run only
/// once the permit is granted: the caller grants it after it has recorded
/// the process durably. A daemon that dies between the spawn and the
/// record therefore leaves nothing running: the held process sees its
/// gate close and exits without running the command.
///
/// Refused, or dropped without a grant (every copy of it), the command
/// does not run and the build fails ([`NotPermitted`]). Copies share the
/// one answer: the first grant or refusal counts.
#[derive(Clone)]
pub struct RunPermit {
    answer: Arc<Mutex<Option<Answer>>>,
}

/// Where a [`RunPermit`]'s answer goes: `Err` is the refusal's reason.
type Answer = oneshot::Sender<Result<(), BoxError>>;

/// The builder's side of a [`RunPermit`].
pub struct PermitWait {
    answer: oneshot::Receiver<Result<(), BoxError>>,
}

/// Why a build command was not let run (see [`RunPermit`]).
#[derive(Debug, thiserror::Error)]
pub enum NotPermitted {
    /// Its caller could not record its process (the store's error, say).
    #[error("its process could not be recorded: {0}")]
    Refused(#[source] BoxError),
    /// Nobody answered: the permit was dropped (the daemon is stopping).
    #[error("nobody recorded its process (the daemon is stopping?)")]
    Withdrawn,
}

impl RunPermit {
    /// A permit and the wait for its answer.
    pub fn new() -> (RunPermit, PermitWait) {
        let (tx, rx) = oneshot::channel();
        (RunPermit { answer: Arc::new(Mutex::new(Some(tx))) }, PermitWait { answer: rx })
    }

    fn answer(&self, answer: Result<(), BoxError>) {
        let tx = self.answer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            // The build may have ended meanwhile (cancelled, timed out):
            // then nobody waits for the answer.
            let _ = tx.send(answer);
        }
    }

    /// The process is recorded: its command may run.
    pub fn grant(&self) {
        self.answer(Ok(()));
    }

    /// The process could not be recorded: it is killed, its command never
    /// runs, and the build fails with `why`.
    pub fn refuse(&self, why: BoxError) {
        self.answer(Err(why));
    }

    /// Whether a grant or a refusal was given.
    pub fn answered(&self) -> bool {
        self.answer.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

impl PermitWait {
    /// The answer: resolves when the permit is granted, refused, or
    /// dropped.
    pub async fn answer(self) -> Result<(), NotPermitted> {
        match self.answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(NotPermitted::Refused(why)),
            Err(_) => Err(NotPermitted::Withdrawn),
        }
    }
}

impl std::fmt::Debug for RunPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunPermit").field("answered", &self.answered()).finish()
    }
}

/// Copies of one permit are equal.
impl PartialEq for RunPermit {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.answer, &other.answer)
    }
}

impl Eq for RunPermit {}

/// What a build reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildNote {
    /// A line for the deploy's progress (build output).
    Line(String),
    /// Build command `index` (0-based) runs as this process (group), held
    /// before its command until `permit` is granted: record it, then grant
    /// (see [`RunPermit`]). A daemon that dies mid-build leaves it running,
    /// and the next one kills it ([`Builder::kill_command`]); one that dies
    /// before the record leaves nothing (the command never ran).
    Command { index: usize, process: Locator, permit: RunPermit },
    /// Build command `index` ended by itself.
    CommandEnded { index: usize, status: ExitStatus },
}

/// Builds immutable releases (the local snapshot builder today; an image
/// build for ECS later).
pub trait Builder: Send + Sync + 'static {
    /// The content hash a build of `source` would have (to tell "nothing
    /// changed" without building).
    fn content_hash(&self, source: &std::path::Path) -> Result<String, BuildError>;
    /// Snapshot `source` as release `release` and run `commands` in it.
    /// Each output line, and each command's process as soon as it exists,
    /// goes to `output`; a command runs only once the permit that came
    /// with its process is granted ([`RunPermit`]). A failed build leaves
    /// nothing.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        app: &AppName,
        release: ReleaseId,
        source: PathBuf,
        commands: Vec<String>,
        env: Vec<(String, String)>,
        timeout: Duration,
        cancel: CancellationToken,
        output: mpsc::UnboundedSender<BuildNote>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BuildOutput, BuildError>> + Send>>;
    /// Delete every release of `app` on disk except `keep`.
    fn prune(&self, app: &AppName, keep: &[ReleaseId]) -> Result<Vec<ReleaseId>, BuildError>;
    /// Whether a build command that `build` reported (see
    /// [`BuildNote::Command`]) still runs: a daemon that died during a
    /// build left it.
    fn command_alive(&self, _command: &Locator) -> bool {
        false
    }
    /// Kill such a build command's process group; resolves once it is gone.
    fn kill_command(
        &self,
        _command: &Locator,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<StopOutcome, BuildError>> + Send>> {
        Box::pin(async { Ok(StopOutcome::AlreadyGone) })
    }
    /// Index the `[static]` files of a just built release (blocking: runs
    /// off the engine's task, as part of the build). An error (a mount's
    /// directory missing) fails the build, naming it.
    fn index_statics(&self, _release: &std::path::Path, _mounts: &[StaticMount]) -> Result<(), BuildError> {
        Ok(())
    }
    /// These releases of `scope`'s app are the retained ones whose
    /// `[static]` files the proxy serves to that environment's route from
    /// now on, in precedence order (the first that has a path wins); the
    /// others' files go from that route. Must not block.
    fn serve_statics(&self, _scope: &AppEnv, _live: Vec<LiveStatics>) {}
}

/// A builder for engines that cannot build (tests of other features).
pub struct NoBuilder;

impl Builder for NoBuilder {
    fn content_hash(&self, _: &std::path::Path) -> Result<String, BuildError> {
        Err(BuildError::Unsupported)
    }
    fn build(
        &self,
        _: &AppName,
        _: ReleaseId,
        _: PathBuf,
        _: Vec<String>,
        _: Vec<(String, String)>,
        _: Duration,
        _: CancellationToken,
        _: mpsc::UnboundedSender<BuildNote>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BuildOutput, BuildError>> + Send>> {
        Box::pin(async { Err(BuildError::Unsupported) })
    }
    fn prune(&self, _: &AppName, _: &[ReleaseId]) -> Result<Vec<ReleaseId>, BuildError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_granted_permit_lets_the_command_run() {
        let (permit, wait) = RunPermit::new();
        let copy = permit.clone();
        assert!(!permit.answered());
        copy.grant();
        assert!(permit.answered());
        // The first answer counts.
        permit.refuse("too late".into());
        drop((permit, copy));
        assert!(wait.answer().await.is_ok());
    }

    #[tokio::test]
    async fn a_refused_permit_says_why_and_a_dropped_one_is_withdrawn() {
        let (permit, wait) = RunPermit::new();
        permit.refuse("database or disk is full".into());
        let e = wait.answer().await.unwrap_err();
        assert_eq!(e.to_string(), "its process could not be recorded: database or disk is full");
        assert!(std::error::Error::source(&e).is_some());

        let (permit, wait) = RunPermit::new();
        let copy = permit.clone();
        assert_eq!(permit, copy);
        assert_ne!(permit, RunPermit::new().0);
        drop(permit);
        drop(copy);
        assert!(matches!(wait.answer().await, Err(NotPermitted::Withdrawn)));
    }
}
