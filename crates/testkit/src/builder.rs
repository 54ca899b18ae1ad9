//! A release builder that builds nothing: the release's directory is the
//! source directory, and the content hash is what the test set.

use crate::lock;
use nonstop_core::build::RunPermit;
use nonstop_core::driver::{Locator, StopOutcome};
use nonstop_core::{AppName, ReleaseId};
use nonstop_engine::{BuildError, BuildNote, BuildOutput, Builder};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
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
    /// The next build's command runs as this process and never ends by
    /// itself: the build waits for its cancel.
    hang: Mutex<Option<Locator>>,
    /// While set, a hung build's process is spawned but not reported until
    /// it is opened (`report_spawn`).
    report_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// Build command processes spawned and held before their command (not
    /// granted yet).
    held: Arc<Mutex<Vec<Locator>>>,
    /// Build command processes alive (of hung builds, until killed):
    /// only ever after their permit was granted.
    alive: Arc<Mutex<Vec<Locator>>>,
    /// Why permits were refused (or "withdrawn" when dropped).
    refusals: Arc<Mutex<Vec<String>>>,
    kills: Mutex<Vec<Locator>>,
    /// The `keep` list of every `prune`, in order.
    prunes: Mutex<Vec<Vec<ReleaseId>>>,
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
            hang: Mutex::new(None),
            report_gate: Mutex::new(None),
            held: Arc::new(Mutex::new(Vec::new())),
            alive: Arc::new(Mutex::new(Vec::new())),
            refusals: Arc::new(Mutex::new(Vec::new())),
            kills: Mutex::new(Vec::new()),
            prunes: Mutex::new(Vec::new()),
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

    /// The next build's first command is spawned as `process`, reported to
    /// the engine with its permit and, once that is granted, runs and
    /// never ends, cancel or not; the process stays alive until
    /// [`Builder::kill_command`] (what a daemon killed mid-build leaves). A
    /// refused permit ends the build with the refusal, the command unrun.
    pub fn hang_next_build(&self, process: Locator) {
        *lock(&self.hang) = Some(process);
    }

    /// The next hung build's process is spawned (held before its command,
    /// see [`FakeBuilder::held`]) but reported to the engine only at
    /// [`FakeBuilder::report_spawn`]: a daemon that stops meanwhile is the
    /// one killed between a build command's spawn and its record.
    pub fn hold_next_report(&self) {
        *lock(&self.report_gate) = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// Report the held spawn (see [`FakeBuilder::hold_next_report`]).
    pub fn report_spawn(&self) {
        if let Some(gate) = lock(&self.report_gate).take() {
            gate.add_permits(1);
        }
    }

    /// Build command processes spawned and waiting for their permit.
    pub fn held(&self) -> Vec<Locator> {
        lock(&self.held).clone()
    }

    /// Build command processes whose command ran (permit granted) and that
    /// were not killed.
    pub fn alive(&self) -> Vec<Locator> {
        lock(&self.alive).clone()
    }

    /// Why permits were refused, in order, as `NotPermitted` words it.
    pub fn refusals(&self) -> Vec<String> {
        lock(&self.refusals).clone()
    }

    /// Resolve once the engine has killed `process` (polling on the
    /// test's clock).
    pub async fn wait_killed(&self, process: &Locator) {
        crate::within("the build command to be killed", async {
            while !lock(&self.kills).contains(process) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Build command processes the engine killed.
    pub fn kills(&self) -> Vec<Locator> {
        lock(&self.kills).clone()
    }

    /// The `keep` list of every prune so far (the releases whose
    /// directories the engine keeps), in order.
    pub fn prunes(&self) -> Vec<Vec<ReleaseId>> {
        lock(&self.prunes).clone()
    }

    /// The releases built, in order.
    pub fn builds(&self) -> Vec<ReleaseId> {
        lock(&self.builds).clone()
    }
}

impl Builder for FakeBuilder {
    fn content_hash(&self, _source: &Path) -> Result<String, BuildError> {
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
        cancel: CancellationToken,
        output: mpsc::UnboundedSender<BuildNote>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BuildOutput, BuildError>> + Send>> {
        lock(&self.builds).push(release);
        let content_hash = lock(&self.hash).clone();
        if let Some(process) = lock(&self.hang).take() {
            let gate = lock(&self.report_gate).clone();
            let (held, alive, refusals) = (self.held.clone(), self.alive.clone(), self.refusals.clone());
            return Box::pin(async move {
                let _ = output.send(BuildNote::Line("building...".into()));
                lock(&held).push(process.clone());
                if let Some(gate) = gate {
                    let _ = gate.acquire().await;
                }
                let (permit, answer) = RunPermit::new();
                let _ = output.send(BuildNote::Command { index: 0, process: process.clone(), permit });
                let answer = answer.answer().await;
                lock(&held).retain(|p| p != &process);
                if let Err(refused) = answer {
                    lock(&refusals).push(refused.to_string());
                    return Err(BuildError::Release(Box::new(refused)));
                }
                lock(&alive).push(process);
                // Never answers, not even a cancel: a daemon killed
                // mid-build hears nothing more of it.
                drop(cancel);
                std::future::pending().await
            });
        }
        Box::pin(async move { Ok(BuildOutput { dir: source, content_hash, files: 1, bytes: 1 }) })
    }

    fn command_alive(&self, command: &Locator) -> bool {
        lock(&self.alive).contains(command)
    }

    fn kill_command(
        &self,
        command: &Locator,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<StopOutcome, BuildError>> + Send>> {
        let mut alive = lock(&self.alive);
        let outcome = match alive.iter().position(|c| c == command) {
            Some(i) => {
                alive.remove(i);
                lock(&self.kills).push(command.clone());
                StopOutcome::Killed
            }
            None => StopOutcome::AlreadyGone,
        };
        Box::pin(async move { Ok(outcome) })
    }

    fn prune(&self, _app: &AppName, keep: &[ReleaseId]) -> Result<Vec<ReleaseId>, BuildError> {
        lock(&self.prunes).push(keep.to_vec());
        Ok(Vec::new())
    }
}
