//! A release builder that builds nothing: the release's directory is the
//! source directory, and the content hash is what the test set.

use crate::lock;
use nonstop_core::{AppName, ReleaseId};
use nonstop_engine::{BuildOutput, Builder};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// See the module.
pub struct FakeBuilder {
    hash: Mutex<String>,
    builds: Mutex<Vec<ReleaseId>>,
    /// While true, `content_hash` blocks (as reading a large directory).
    hold: Mutex<bool>,
    released: Condvar,
}

impl Default for FakeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeBuilder {
    /// Content hash `source-1`.
    pub fn new() -> Self {
        Self {
            hash: Mutex::new("source-1".into()),
            builds: Mutex::new(Vec::new()),
            hold: Mutex::new(false),
            released: Condvar::new(),
        }
    }

    /// From now on `content_hash` blocks its (blocking) thread until
    /// [`FakeBuilder::release_hashing`].
    pub fn hold_hashing(&self) {
        *lock(&self.hold) = true;
    }

    pub fn release_hashing(&self) {
        *lock(&self.hold) = false;
        self.released.notify_all();
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
        let mut held = lock(&self.hold);
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        drop(held);
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
