//! A real engine wired to the fakes.

use crate::{FakeBuilder, FakeDriver, FakeIngress, FakeLogs, FakeTraffic, Journal, TokioClock};
use nonstop_core::process::AppSpec;
use nonstop_core::{EnvironmentId, ProcessName};
use nonstop_engine::{Engine, EngineConfig, EngineError, EngineHandle, OpReport, Progress, StatusReport};
use nonstop_store::Store;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Everything an engine needs, faked. Create it inside the test's runtime
/// (the clock reads tokio's time).
pub struct Fixture {
    pub journal: Journal,
    pub driver: Arc<FakeDriver>,
    pub traffic: Arc<FakeTraffic>,
    pub ingress: Arc<FakeIngress>,
    pub logs: Arc<FakeLogs>,
    pub builder: Arc<FakeBuilder>,
    pub schema_gate: Arc<crate::FakeSchemaGate>,
    pub base: Arc<crate::FakeBaseServices>,
    pub store: Arc<Store>,
    pub clock: Arc<TokioClock>,
    /// The app directory `up` passes (exists, so preflight passes).
    pub workdir: PathBuf,
    /// The environment `up` passes.
    pub base_env: BTreeMap<String, String>,
    /// Where the engine's secrets key is (none unless a test sets one).
    pub secrets: nonstop_engine::SecretsKeyConfig,
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    /// Fakes and an in-memory store.
    pub fn new() -> Self {
        Self::with_store(Store::in_memory().unwrap_or_else(|e| panic!("in-memory store: {e}")))
    }

    pub fn with_store(store: Store) -> Self {
        let journal = Journal::new();
        Self {
            driver: Arc::new(FakeDriver::new(journal.clone())),
            traffic: Arc::new(FakeTraffic::new(journal.clone())),
            ingress: Arc::new(FakeIngress::new()),
            logs: Arc::new(FakeLogs::new()),
            builder: Arc::new(FakeBuilder::new()),
            schema_gate: Arc::new(crate::FakeSchemaGate::default()),
            base: Arc::new(crate::FakeBaseServices::default()),
            store: Arc::new(store),
            clock: Arc::new(TokioClock::new()),
            workdir: std::env::temp_dir(),
            base_env: [("PATH", "/usr/local/bin:/usr/bin:/bin"), ("LANG", "C.UTF-8")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            journal,
            secrets: nonstop_engine::SecretsKeyConfig::none(),
        }
    }

    /// What a restarted daemon on the same machine has: the same driver
    /// (the instances kept running), clock and `store` (opened anew by
    /// the caller, or this one), but a new proxy (traffic and ingress) and
    /// logs.
    pub fn next_daemon(&self, store: Arc<Store>) -> Fixture {
        Fixture {
            journal: self.journal.clone(),
            driver: self.driver.clone(),
            traffic: Arc::new(FakeTraffic::new(self.journal.clone())),
            ingress: Arc::new(FakeIngress::new()),
            logs: Arc::new(FakeLogs::new()),
            builder: self.builder.clone(),
            schema_gate: self.schema_gate.clone(),
            base: self.base.clone(),
            store,
            clock: self.clock.clone(),
            workdir: self.workdir.clone(),
            base_env: self.base_env.clone(),
            secrets: self.secrets.clone(),
        }
    }

    /// Spawn an engine on the fakes (it restores from the store first).
    pub fn start(&self) -> RunningEngine {
        let shutdown = CancellationToken::new();
        let (handle, join) = Engine::spawn(
            EngineConfig {
                builder: self.builder.clone(),
                schema_gate: self.schema_gate.clone(),
                secrets: self.secrets.clone(),
                base: self.base.clone(),
                ..EngineConfig::new(EnvironmentId::default_env(), self.clock.clone())
            },
            self.driver.clone(),
            self.traffic.clone(),
            self.ingress.clone(),
            self.logs.clone(),
            self.store.clone(),
            shutdown.clone(),
        );
        RunningEngine { handle, shutdown, join, workdir: self.workdir.clone(), base_env: self.base_env.clone() }
    }
}

/// An operation running in a task of its own (`RunningEngine::spawn_*`).
pub type Pending = tokio::task::JoinHandle<Result<OpReport, EngineError>>;

/// A spawned engine and shortcuts to its commands.
pub struct RunningEngine {
    pub handle: EngineHandle,
    shutdown: CancellationToken,
    join: tokio::task::JoinHandle<()>,
    workdir: PathBuf,
    base_env: BTreeMap<String, String>,
}

fn drain_progress(mut rx: mpsc::UnboundedReceiver<Progress>) -> Vec<Progress> {
    let mut out = Vec::new();
    while let Ok(p) = rx.try_recv() {
        out.push(p);
    }
    out
}

impl RunningEngine {
    /// The handle of app `app` (or the environment's one app) in
    /// environment `env`, under this same engine.
    pub fn env(&self, app: Option<&str>, env: &str) -> EngineHandle {
        let app = app.map(|a| nonstop_core::AppName::new(a).unwrap_or_else(|e| panic!("{e}")));
        let env = EnvironmentId::new(env).unwrap_or_else(|e| panic!("{e}"));
        self.handle.scoped(app, Some(env))
    }

    /// `up` through `handle` (another environment's).
    pub async fn up_in(&self, handle: &EngineHandle, spec: AppSpec) -> Result<OpReport, EngineError> {
        let (tx, _rx) = mpsc::unbounded_channel();
        handle.up(spec, self.workdir.clone(), self.base_env.clone(), tx).await
    }

    /// A deploy through `handle` (another environment's), in a task.
    pub fn spawn_deploy_in(&self, handle: &EngineHandle, spec: AppSpec) -> Pending {
        let (handle, workdir, base_env) = (handle.clone(), self.workdir.clone(), self.base_env.clone());
        tokio::spawn(async move {
            let (tx, _rx) = mpsc::unbounded_channel();
            handle.deploy(spec, workdir, base_env, None, "test".into(), tx).await
        })
    }

    /// `env create ENV [--from FROM]` of `spec` (resolved for ENV), and
    /// the progress it reported.
    pub async fn create_env(
        &self,
        env: &str,
        spec: AppSpec,
        from: Option<&str>,
    ) -> (Result<OpReport, EngineError>, Vec<Progress>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = self.env(Some(spec.app.as_str()), env);
        let request = nonstop_engine::CreateEnvironment {
            spec,
            source: self.workdir.clone(),
            base_env: self.base_env.clone(),
            who: "test".into(),
            from: from.map(|f| EnvironmentId::new(f).unwrap_or_else(|e| panic!("{e}"))),
        };
        let r = handle.create_environment(request, tx).await;
        (r, drain_progress(rx))
    }

    /// `env destroy ENV [--drop-database TYPED]` of app `app`, in the
    /// directory of a nonstop.toml whose `[base]` is `postgres =
    /// "postgres://admin@db.test:5432/"` and `redis =
    /// "redis://cache.test:6379"`.
    pub async fn destroy_env(&self, app: &str, env: &str, drop: Option<&str>) -> Result<OpReport, EngineError> {
        let base = nonstop_core::environment::BaseSpec {
            postgres: Some(
                nonstop_core::database::DatabaseUrl::parse("postgres://admin@db.test:5432/postgres")
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
            redis: Some(
                nonstop_core::environment::RedisUrl::parse("redis://cache.test:6379").unwrap_or_else(|e| panic!("{e}")),
            ),
        };
        self.destroy_env_with(app, env, drop, base).await.0
    }

    /// [`RunningEngine::destroy_env`] with `base` as the file's `[base]`,
    /// and the progress it reported.
    pub async fn destroy_env_with(
        &self,
        app: &str,
        env: &str,
        drop: Option<&str>,
        base: nonstop_core::environment::BaseSpec,
    ) -> (Result<OpReport, EngineError>, Vec<Progress>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let request =
            nonstop_engine::DestroyEnvironment { who: "test".into(), drop_database: drop.map(str::to_string), base };
        let r = self.env(Some(app), env).destroy_environment(request, tx).await;
        (r, drain_progress(rx))
    }

    pub async fn up(&self, spec: AppSpec) -> Result<OpReport, EngineError> {
        self.up_with_progress(spec).await.0
    }

    /// `up`, and the progress it reported.
    pub async fn up_with_progress(&self, spec: AppSpec) -> (Result<OpReport, EngineError>, Vec<Progress>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let r = self.handle.up(spec, self.workdir.clone(), self.base_env.clone(), tx).await;
        (r, drain_progress(rx))
    }

    /// `deploy` of the fixture's app directory (built by the
    /// [`FakeBuilder`](crate::FakeBuilder)), and the progress it reported.
    pub async fn deploy_with_progress(&self, spec: AppSpec) -> (Result<OpReport, EngineError>, Vec<Progress>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let r = self.handle.deploy(spec, self.workdir.clone(), self.base_env.clone(), None, "test".into(), tx).await;
        (r, drain_progress(rx))
    }

    pub async fn down(&self) -> Result<OpReport, EngineError> {
        let (tx, _rx) = mpsc::unbounded_channel();
        self.handle.down(tx).await
    }

    pub async fn scale(&self, counts: &[(&str, u32)]) -> Result<OpReport, EngineError> {
        let counts: BTreeMap<ProcessName, u32> = counts.iter().map(|(p, n)| (crate::pn(p), *n)).collect();
        let (tx, _rx) = mpsc::unbounded_channel();
        self.handle.scale(counts, tx).await
    }

    pub async fn restart(&self, process: Option<&str>) -> Result<OpReport, EngineError> {
        let (tx, _rx) = mpsc::unbounded_channel();
        self.handle.restart(process.map(crate::pn), tx).await
    }

    pub async fn status(&self) -> Result<StatusReport, EngineError> {
        self.handle.status().await
    }

    /// `up` in a task of its own, for a test that acts while it runs.
    pub fn spawn_up(&self, spec: AppSpec) -> Pending {
        let (handle, workdir, base_env) = (self.handle.clone(), self.workdir.clone(), self.base_env.clone());
        tokio::spawn(async move {
            let (tx, _rx) = mpsc::unbounded_channel();
            handle.up(spec, workdir, base_env, tx).await
        })
    }

    /// `scale` in a task of its own, for a test that acts while it runs.
    pub fn spawn_scale(&self, counts: &[(&str, u32)]) -> Pending {
        let counts: BTreeMap<ProcessName, u32> = counts.iter().map(|(p, n)| (crate::pn(p), *n)).collect();
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let (tx, _rx) = mpsc::unbounded_channel();
            handle.scale(counts, tx).await
        })
    }

    /// `restart` in a task of its own.
    pub fn spawn_restart(&self, process: Option<&str>) -> Pending {
        let (handle, process) = (self.handle.clone(), process.map(crate::pn));
        tokio::spawn(async move {
            let (tx, _rx) = mpsc::unbounded_channel();
            handle.restart(process, tx).await
        })
    }

    /// `deploy` with `options`, and the progress it reported.
    pub async fn deploy_with_options(
        &self,
        spec: AppSpec,
        options: nonstop_engine::DeployOptions,
    ) -> (Result<OpReport, EngineError>, Vec<Progress>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let r = self
            .handle
            .deploy_with(spec, self.workdir.clone(), self.base_env.clone(), None, "test".into(), options, tx)
            .await;
        (r, drain_progress(rx))
    }

    /// `rollback` with `options`.
    pub async fn rollback_with(
        &self,
        options: nonstop_engine::RollbackOptions,
    ) -> (Result<OpReport, EngineError>, Vec<Progress>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let r = self.handle.rollback_with(None, options, "test".into(), tx).await;
        (r, drain_progress(rx))
    }

    /// `deploy` of the fixture's app directory by `who`, in a task of its
    /// own.
    pub fn spawn_deploy(&self, spec: AppSpec, who: &str) -> Pending {
        let (tx, _rx) = mpsc::unbounded_channel();
        self.spawn_deploy_by(spec, who, tx)
    }

    /// [`Self::spawn_deploy`], its progress sent to `progress`.
    pub fn spawn_deploy_with_progress(&self, spec: AppSpec, progress: mpsc::UnboundedSender<Progress>) -> Pending {
        self.spawn_deploy_by(spec, "test", progress)
    }

    fn spawn_deploy_by(&self, spec: AppSpec, who: &str, progress: mpsc::UnboundedSender<Progress>) -> Pending {
        let (handle, workdir, base_env, who) =
            (self.handle.clone(), self.workdir.clone(), self.base_env.clone(), who.to_string());
        tokio::spawn(async move { handle.deploy(spec, workdir, base_env, None, who, progress).await })
    }

    /// Shut the engine down as a daemon stop does (instances keep running)
    /// and wait until it is gone.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Err(e) = self.join.await {
            panic!("the engine task failed: {e}");
        }
    }
}

/// Let every task that can run, run (without moving time), so that events
/// the fakes just produced reach the engine before the next command.
pub async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// Await `fut`, failing the test if it takes more than
/// [`crate::WAIT_LIMIT`] of (virtual) time. On paused time a future that
/// waits for nothing would otherwise hang the test for real.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(crate::WAIT_LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}
