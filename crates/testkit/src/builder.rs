//! A release builder that builds nothing: the release's directory is the
//! source directory, and the content hash is what the test set.

use crate::lock;
use nonstop_core::{AppName, ReleaseId};
use nonstop_engine::{BuildOutput, Builder};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// See the module.
pub struct FakeBuilder {
    hash: Mutex<String>,
    builds: Mutex<Vec<ReleaseId>>,
}

impl Default for FakeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeBuilder {
    /// Content hash `source-1`.
    pub fn new() -> Self {
        Self { hash: Mutex::new("source-1".into()), builds: Mutex::new(Vec::new()) }
    }

    /// The content hash of the source from now on (a new one: a deploy
    /// has something to build).
    pub fn set_hash(&self, hash: &str) {
        *lock(&self.hash) = hash.to_string();
    }

    /// The releases built, in order.
    pub fn builds(&self) -> Vec<ReleaseId> {
        lock(&self.builds).clone()
    }
}

impl Builder for FakeBuilder {
    fn content_hash(&self, _source: &Path) -> Result<String, String> {
        Ok(lock(&self.hash).clone())
    }

    fn build(
        &self,
        _app: &AppName,
        release: ReleaseId,
        source: PathBuf,
        _commands: Vec<String>,
        _env: Vec<(String, String)>,
        _timeout: Duration,
        _cancel: CancellationToken,
        _output: mpsc::UnboundedSender<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BuildOutput, String>> + Send>> {
        lock(&self.builds).push(release);
        let content_hash = lock(&self.hash).clone();
        Box::pin(async move { Ok(BuildOutput { dir: source, content_hash, files: 1, bytes: 1 }) })
    }

    fn prune(&self, _app: &AppName, _keep: &[ReleaseId]) -> Result<Vec<ReleaseId>, String> {
        Ok(Vec::new())
    }
}
