//! The boundaries that build releases (`Builder`) and read instance logs
//! (`InstanceLogs`), with what they exchange. Implemented by the binary
//! (the local snapshot builder, the supervisor's log files) and faked by
//! the testkit; an image build for ECS later.

use crate::driver::{ExitStatus, Locator, StopOutcome};
use crate::process::StaticMount;
use crate::{AppEnv, AppName, EnvironmentId, InstanceId, ReleaseId};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
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

/// What a build reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildNote {
    /// A line for the deploy's progress (build output).
    Line(String),
    /// Build command `index` (0-based) runs as this process (group), to be
    /// recorded: a daemon that dies mid-build leaves it running, and the
    /// next one kills it ([`Builder::kill_command`]).
    Command { index: usize, process: Locator },
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
    /// goes to `output`. A failed build leaves nothing.
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
