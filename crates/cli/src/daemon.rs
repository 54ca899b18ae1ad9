//! `nonstop daemon`: wires the store, the local driver, the traffic layer
//! (the data plane in the keeper, or the proxy in this process without
//! one: `plane`), the engine and the API together, and runs until told to
//! stop. Stopping the daemon (SIGTERM, SIGINT, `POST /v1/shutdown`) leaves
//! the app's instances running; the next daemon re-adopts them.

use crate::home::Home;
use crate::keeper::{KeeperLink, SocketKind};
use crate::plane::client::PlaneClient;
use crate::plane::ingress::ProxyIngress;
use crate::plane::{PlaneIngress, PlaneStatics};
use crate::upgrade::SuccessorError;
use anyhow::Context;
use nonstop_api::server::{self, ApiState, LogSource, LogSourceError};
use nonstop_api::wire::{LogEntry, Upgraded};
use nonstop_core::ids::NameError;
use nonstop_core::ReleaseId;
use nonstop_core::{AppEnv, AppName, EnvironmentId, InstanceId, ProcessName, SystemClock};
use nonstop_engine::{BuildError, BuildNote, BuildOutput, Builder, Engine, EngineConfig, InstanceLogs};
use nonstop_proxy::{Proxy, ProxyConfig};
use nonstop_supervisor::{LocalDriver, LocalDriverConfig, LogQuery};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where the daemon's traffic goes: the proxy in this process (no
/// keeper, or a keeper without a data plane), or the keeper's data plane.
enum Layer {
    Local(Proxy, Arc<ProxyIngress>),
    Remote(Arc<PlaneClient>),
}

struct DriverLogs {
    driver: Arc<LocalDriver>,
}

fn to_entry(l: nonstop_supervisor::LogLine) -> LogEntry {
    LogEntry {
        ts: l.ts,
        instance: l.instance,
        generation: l.generation,
        stream: l.stream.as_str().to_string(),
        text: l.text,
    }
}

fn query(app: &str, env: &str, process: Option<&str>, tail: usize) -> Result<LogQuery, NameError> {
    Ok(LogQuery {
        app: AppName::new(app)?,
        environment: EnvironmentId::new(env)?,
        process: process.map(ProcessName::new).transpose()?,
        tail,
    })
}

impl LogSource for DriverLogs {
    fn tail(&self, app: &str, env: &str, process: Option<&str>, tail: usize) -> Result<Vec<LogEntry>, LogSourceError> {
        let q = query(app, env, process, tail)?;
        let lines = self.driver.logs_tail(&q).map_err(|e| LogSourceError::Read(Box::new(e)))?;
        Ok(lines.into_iter().map(to_entry).collect())
    }

    fn follow(
        &self,
        app: &str,
        env: &str,
        process: Option<&str>,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<LogEntry>, LogSourceError> {
        let q = query(app, env, process, 0)?;
        let mut rx = self.driver.logs_follow(q, cancel.clone());
        let (tx, out) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    l = rx.recv() => match l {
                        Some(l) => if tx.send(to_entry(l)).await.is_err() { break },
                        None => break,
                    },
                }
            }
        });
        Ok(out)
    }
}

impl InstanceLogs for DriverLogs {
    fn tail(&self, app: &AppName, env: &EnvironmentId, instance: &InstanceId, lines: usize) -> Vec<String> {
        let path = self.driver.instance_log_path(app, env, instance);
        nonstop_supervisor::logs::last_texts(
            &path,
            lines,
            &[nonstop_supervisor::Stream::Out, nonstop_supervisor::Stream::Err],
        )
        .unwrap_or_default()
    }
}

/// Builds releases under `$NONSTOP_HOME/releases/<app>/v<N>`.
struct ReleasePort {
    home: std::path::PathBuf,
    statics: PlaneStatics,
    /// [`UNRECORDED_BUILD_VAR`]: for tests only.
    unrecorded: Option<ReleaseId>,
}

/// For tests only (the end-to-end test of a daemon killed between a build
/// command's spawn and its record): `NONSTOP_TEST_UNRECORDED_BUILD=N` in
/// the daemon's environment makes the build of release vN spawn its first
/// command's process and never report it to the engine, so it is never
/// recorded: the process waits at its gate, its permit held unanswered,
/// until the build times out or is cancelled, or the daemon dies (the case
/// under test). The daemon logs the held process's pid. Never set it
/// outside tests.
const UNRECORDED_BUILD_VAR: &str = "NONSTOP_TEST_UNRECORDED_BUILD";

fn unrecorded_build() -> Option<ReleaseId> {
    let value = std::env::var(UNRECORDED_BUILD_VAR).ok()?;
    match value.trim().trim_start_matches('v').parse() {
        Ok(n) => {
            tracing::warn!("{UNRECORDED_BUILD_VAR}={value}: the build of v{n} will hold its first command unrecorded (for tests only)");
            Some(ReleaseId(n))
        }
        Err(_) => {
            tracing::warn!("{UNRECORDED_BUILD_VAR}={value:?} is not a release number; ignored");
            None
        }
    }
}

impl ReleasePort {
    fn builder(&self, app: &AppName) -> nonstop_release::ReleaseBuilder {
        nonstop_release::ReleaseBuilder::new(self.home.join("releases").join(app.as_str()))
            .with_excluded(self.home.clone())
    }
}

impl Builder for ReleasePort {
    fn content_hash(&self, source: &std::path::Path) -> Result<String, BuildError> {
        nonstop_release::ReleaseBuilder::new(self.home.join("releases"))
            .with_excluded(self.home.clone())
            .snapshot_hash(source)
            .map(|s| s.content_hash)
            .map_err(|e| BuildError::Release(Box::new(e)))
    }

    fn build(
        &self,
        app: &AppName,
        release: ReleaseId,
        source: std::path::PathBuf,
        commands: Vec<String>,
        env: Vec<(String, String)>,
        timeout: Duration,
        cancel: CancellationToken,
        output: mpsc::UnboundedSender<BuildNote>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BuildOutput, BuildError>> + Send>> {
        let builder = self.builder(app);
        let hold = self.unrecorded == Some(release);
        Box::pin(async move {
            // What crashed builds left (possibly large trees), off the
            // async threads.
            let cleaner = builder.clone();
            let _ = tokio::task::spawn_blocking(move || cleaner.clean_staging()).await;
            let req = nonstop_release::BuildRequest {
                source: &source,
                release,
                build_commands: &commands,
                env: &env,
                timeout,
                cancel,
            };
            let out = output.clone();
            // The test-only hook's permits, held unanswered while the
            // build lives.
            let mut held = Vec::new();
            let built = builder
                .build(req, move |ev| match ev {
                    nonstop_release::BuildEvent::Snapshotted(s) => {
                        let _ =
                            out.send(BuildNote::Line(format!("snapshot: {} files, {} KiB", s.files, s.bytes / 1024)));
                    }
                    nonstop_release::BuildEvent::CommandStarted { index, total, command } => {
                        let _ = out.send(BuildNote::Line(format!("[{}/{total}] {command}", index + 1)));
                    }
                    nonstop_release::BuildEvent::CommandSpawned { index, process, permit } => {
                        if hold && held.is_empty() {
                            tracing::warn!(
                                "{UNRECORDED_BUILD_VAR}: build command {} of {release} spawned as pid {}; not recorded, \
                                 held at its gate (for tests only)",
                                index + 1,
                                process.pid().unwrap_or(0)
                            );
                            held.push(permit);
                        } else {
                            // The engine grants it once recorded.
                            let _ = out.send(BuildNote::Command { index, process, permit });
                        }
                    }
                    nonstop_release::BuildEvent::Output { line, .. } => {
                        let _ = out.send(BuildNote::Line(line));
                    }
                    nonstop_release::BuildEvent::CommandFinished { index, status, .. } => {
                        let _ = out.send(BuildNote::CommandEnded { index, status });
                    }
                })
                .await
                .map_err(|e| BuildError::Release(Box::new(e)))?;
            Ok(BuildOutput {
                dir: built.dir,
                content_hash: built.stats.content_hash,
                files: built.stats.files,
                bytes: built.stats.bytes,
            })
        })
    }

    fn index_statics(
        &self,
        release: &std::path::Path,
        mounts: &[nonstop_core::process::StaticMount],
    ) -> Result<(), BuildError> {
        crate::statics::StaticPublisher::index(release, mounts).map_err(|e| BuildError::Statics(Box::new(e)))
    }

    fn serve_statics(&self, scope: &AppEnv, live: Vec<nonstop_engine::LiveStatics>) {
        self.statics.publish(scope, live)
    }

    fn prune(&self, app: &AppName, keep: &[ReleaseId]) -> Result<Vec<ReleaseId>, BuildError> {
        self.builder(app).prune(keep).map_err(|e| BuildError::Release(Box::new(e)))
    }

    fn command_alive(&self, command: &nonstop_core::driver::Locator) -> bool {
        nonstop_release::command_alive(command)
    }

    fn kill_command(
        &self,
        command: &nonstop_core::driver::Locator,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<nonstop_core::driver::StopOutcome, BuildError>> + Send>,
    > {
        let command = command.clone();
        Box::pin(
            async move { nonstop_release::kill_command(&command).await.map_err(|e| BuildError::Release(e.into())) },
        )
    }
}

/// A daemon started by the keeper after its predecessor died says so in
/// the events of every running app (`nonstop events`).
fn record_keeper_restart(store: &nonstop_store::Store, why: &str) {
    tracing::warn!("started by the keeper: {why}");
    let message = format!("daemon restarted by the keeper: {why}; running instances are re-adopted");
    for app in store.apps().unwrap_or_default().iter().filter(|a| a.running) {
        let now = std::time::SystemTime::now();
        if let Err(e) =
            store.add_event(&app.app, &app.environment, now, nonstop_store::EventKind::Daemon, None, &message)
        {
            tracing::warn!("cannot record the restart in the events: {e}");
        }
    }
}

fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn api_token(home: &Home) -> anyhow::Result<String> {
    use std::io::Read;
    let mut t = String::new();
    let read = crate::home::open_private(&home.token(), std::fs::OpenOptions::new().read(true))
        .and_then(|mut f| f.read_to_string(&mut t));
    if read.is_ok() && !t.trim().is_empty() {
        return Ok(t.trim().to_string());
    }
    let token = random_token()?;
    crate::home::write_private(&home.token(), token.as_bytes())
        .with_context(|| format!("cannot write {}", home.token().display()))?;
    Ok(token)
}

/// Wait for the state lock. A successor waits (bounded) for its
/// predecessor to release it; a normal start fails at once.
pub(crate) fn take_lock(
    home: &Home,
    path: &std::path::Path,
    wait: bool,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let file =
            crate::home::open_private(path, std::fs::OpenOptions::new().create(true).truncate(false).write(true))
                .map_err(|e| anyhow::anyhow!("cannot open {}: {}", path.display(), crate::home::nofollow_hint(&e)))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err(_) if wait && std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => anyhow::bail!(
                "another nonstop daemon already runs for {} (lock {} is held); use it, or stop it with `nonstop down`",
                home.path().display(),
                path.display()
            ),
        }
    }
}

/// Why the daemon did not hand over to a successor (`nonstop upgrade`,
/// SIGUSR2); the client gets its words.
#[derive(Debug, thiserror::Error)]
enum UpgradeFailed {
    #[error("{operation} is in progress; upgrade the daemon when it has finished")]
    Busy { operation: String },
    /// A listening socket could not be duplicated for the successor.
    #[error("cannot pass the {what}: {source}")]
    Socket {
        /// `API socket`, `API's TCP socket`.
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Successor(#[from] SuccessorError),
    /// It failed past the handover; this daemon's own version was started
    /// again and serves, as `pid`.
    #[error("{why}. The version that ran before was started again as pid {pid} and serves; the app kept running")]
    Restarted {
        #[source]
        why: SuccessorError,
        pid: u32,
    },
    /// It failed past the handover, and so did starting this daemon's own
    /// version again: this daemon (`pid`) only serves the proxy now.
    #[error(
        "{why}; starting the version that ran before again failed too: {again}. Daemon {pid} goes on serving the \
         proxy but no longer manages the app: fix the binary and upgrade again with `kill -USR2 {pid}` (or \
         `systemctl reload nonstop`), or stop it and start `nonstop daemon`"
    )]
    RestartFailed {
        #[source]
        why: SuccessorError,
        again: Box<UpgradeFailed>,
        pid: u32,
    },
}

/// Duplicates of the listening sockets to hand to a successor: the
/// proxy's, the API's unix socket and, if any, its TCP listener.
fn handover_sockets(
    ingress: Option<&ProxyIngress>,
    api_fd: &std::os::fd::OwnedFd,
    api_tcp_fd: Option<&std::os::fd::OwnedFd>,
    dashboard_fd: Option<&std::os::fd::OwnedFd>,
) -> Result<Vec<(&'static str, std::os::fd::OwnedFd)>, UpgradeFailed> {
    let mut sockets: Vec<(&'static str, std::os::fd::OwnedFd)> =
        ingress.map(ProxyIngress::handover).unwrap_or_default().into_iter().map(|fd| ("proxy", fd)).collect();
    let dup = |fd: &std::os::fd::OwnedFd, what| fd.try_clone().map_err(|source| UpgradeFailed::Socket { what, source });
    sockets.push(("api", dup(api_fd, "API socket")?));
    if let Some(fd) = api_tcp_fd {
        sockets.push(("api-tcp", dup(fd, "API's TCP socket")?));
    }
    if let Some(fd) = dashboard_fd {
        sockets.push(("dashboard", dup(fd, "dashboard's socket")?));
    }
    Ok(sockets)
}

/// After a successor failed past the handover: start this daemon's own
/// image (`/proc/self/exe`, there even when the file on disk was replaced)
/// as the successor instead, with the same sockets; its pid once it serves.
async fn restart_own_version(
    home: &Home,
    upgrade_exe: &std::path::Path,
    listen: crate::upgrade::Listen,
    ingress: Option<&ProxyIngress>,
    api_fd: &std::os::fd::OwnedFd,
    api_tcp_fd: Option<&std::os::fd::OwnedFd>,
    dashboard_fd: Option<&std::os::fd::OwnedFd>,
) -> Result<u32, UpgradeFailed> {
    let sockets = handover_sockets(ingress, api_fd, api_tcp_fd, dashboard_fd)?;
    let (home2, upgrade_exe) = (Home { dir: home.dir.clone() }, upgrade_exe.to_path_buf());
    let pid = tokio::task::spawn_blocking(move || {
        let own = std::path::Path::new("/proc/self/exe");
        crate::upgrade::spawn_successor(own, Some(&upgrade_exe), &home2, listen, sockets)?.wait_serving(&home2)
    })
    .await
    .unwrap_or_else(|e| Err(e.into()))?;
    Ok(pid)
}

pub async fn run(
    home: Home,
    api_listen: Option<SocketAddr>,
    dashboard_listen: crate::cli::DashboardListen,
    proxy_workers: Option<u32>,
) -> anyhow::Result<()> {
    crate::limits::raise_fd_limit();
    // What a successor (upgrade) is told, whether it came from the flags
    // or the variables.
    let listen = crate::upgrade::Listen { api: api_listen, dashboard: dashboard_listen };
    home.create()?;
    let exe = std::env::current_exe().context("cannot find the nonstop executable")?;
    // The binary to start on upgrade: this path, whatever is there by then
    // (or, in a daemon that a failed upgrade started from its predecessor's
    // image, the path that upgrade tried).
    let start = crate::start_env::get();
    let upgrade_exe = start.upgrade_exe.clone().unwrap_or_else(|| exe.clone());
    // Monitors run this very binary; when its file was replaced or removed
    // since it started ("... (deleted)"), /proc/self/exe still is it.
    let monitor_exe = if exe.exists() { exe.clone() } else { std::path::PathBuf::from("/proc/self/exe") };
    let mut inherited = start.take_inherited();
    for warning in &inherited.warnings {
        tracing::warn!("{warning}");
    }
    let successor = start.upgrade_successor;
    let keeper = KeeperLink::from_env().map(Arc::new);
    let plane_socket = crate::plane::from_env();
    let restarted_because = start.keeper_restart.clone();
    // Everything that can fail is done before a predecessor is told to step
    // down (SQLite in WAL mode may be opened by both at once).
    let store = Arc::new(crate::recovery::open_store(&home)?);
    let driver = Arc::new(
        LocalDriver::new(LocalDriverConfig::new(home.path(), crate::home::monitor_command(monitor_exe)))
            .context("cannot set up the local driver")?,
    );
    let dashboard_on = dashboard_listen != crate::cli::DashboardListen::Off;
    let api_token_value = match api_listen.is_some() || dashboard_on {
        true => Some(api_token(&home)?),
        false => None,
    };
    if successor {
        crate::upgrade::announce_ready(&home)?;
        tracing::info!(
            "taking over from the previous daemon ({} socket(s) inherited)",
            inherited.proxy.len() + usize::from(inherited.api.is_some())
        );
    }
    // One daemon per home: an exclusive lock held for our whole life (or
    // until we hand over to a successor).
    let state_lock = {
        let home2 = Home { dir: home.dir.clone() };
        tokio::task::spawn_blocking(move || take_lock(&home2, &home2.lock(), successor)).await??
    };
    let mut state_lock = Some(state_lock);
    crate::home::write_private(&home.pid_file(), std::process::id().to_string().as_bytes())?;
    if let Some(why) = &restarted_because {
        record_keeper_restart(&store, why);
    }

    let shutdown = CancellationToken::new();
    let engine_stop = shutdown.child_token();
    let api_stop = shutdown.child_token();
    // The proxy's worker threads are fixed for the life of the process
    // that runs it (the data plane: set by the first daemon that says
    // hello; without one, this daemon): the running app's stored `[proxy]
    // workers`, else `--proxy-workers` (what `up` or `deploy` passes when
    // it starts the daemon for a new app), else one per core. A change by a
    // later `deploy` applies from the next start of that process.
    let workers = store
        .apps()
        .ok()
        .and_then(|apps| apps.iter().find(|a| a.running).and_then(|a| a.spec.proxy.workers))
        .or(proxy_workers)
        .map_or(0, |n| n as usize);
    let tasks = TaskTracker::new();
    // The traffic layer: the data plane the keeper runs (client
    // connections live there and survive this process), else the proxy in
    // this process.
    let layer = match plane_socket {
        Some(path) => {
            let client = PlaneClient::connect(path, workers, shutdown.child_token())
                .await
                .with_context(|| format!("cannot use the data plane on {}", path.display()))?;
            if !inherited.proxy.is_empty() {
                tracing::warn!(
                    "{} proxy socket(s) handed to this daemon are not used: the data plane listens",
                    inherited.proxy.len()
                );
            }
            Layer::Remote(client)
        }
        None => {
            let base = ProxyConfig { body_buffer_dir: Some(home.path().join("bodies")), ..ProxyConfig::default() };
            let proxy = Proxy::new(ProxyConfig { workers, ..base.clone() });
            let ingress = Arc::new(ProxyIngress::new(
                proxy.clone(),
                std::mem::take(&mut inherited.proxy),
                shutdown.clone(),
                tasks.clone(),
                base,
                keeper.clone(),
            ));
            Layer::Local(proxy, ingress)
        }
    };
    let (local, client) = match &layer {
        Layer::Local(_, ingress) => (Some(ingress.clone()), None),
        Layer::Remote(client) => (None, Some(client.clone())),
    };
    crate::recovery::spawn_housekeeping(store.clone(), &home, engine_stop.child_token(), &tasks);
    let logs = Arc::new(DriverLogs { driver: driver.clone() });
    let statics = match &layer {
        Layer::Local(proxy, _) => {
            // Static files before the proxy accepts (the engine's restore
            // starts it): a restarted or upgraded daemon must not pass
            // `/static/` requests to the app while it loads them. (The data
            // plane keeps its own across daemon restarts.)
            let publisher = crate::statics::StaticPublisher::new(proxy.clone());
            match nonstop_engine::live_statics_at_start(&store) {
                Ok(all) => {
                    for (scope, live) in all.into_iter().filter(|(_, live)| !live.is_empty()) {
                        publisher.publish_now(&scope.route(), live).await;
                    }
                }
                Err(e) => tracing::warn!("cannot read the releases, static files are loaded later: {e}"),
            }
            PlaneStatics::Local(publisher)
        }
        Layer::Remote(client) => PlaneStatics::Remote(client.clone()),
    };
    let config = EngineConfig {
        environment: EnvironmentId::default_env(),
        clock: Arc::new(SystemClock),
        builder: Arc::new(ReleasePort { home: home.dir.clone(), statics, unrecorded: unrecorded_build() }),
        schema_gate: Arc::new(crate::schema_gate::PgSchemaGate),
        // The key is read when needed, from the variable this daemon was
        // started with (the shell or service that started it), else the
        // file; it is never kept.
        secrets: nonstop_engine::SecretsKeyConfig::new(home.dir.clone(), std::env::var(nonstop_secrets::KEY_ENV).ok()),
        base: Arc::new(crate::base_services::PgBaseServices),
    };
    // Metrics: loaded before the engine starts, measured by a task of
    // their own once it runs (stopped and saved with the engine).
    let metrics = crate::metrics::Metrics::load(home.path().join("metrics"));
    let metrics_store = store.clone();
    let (engine, engine_task) = match layer {
        Layer::Local(proxy, ingress) => {
            let proxy = Arc::new(proxy);
            let (engine, task) = Engine::spawn(
                config,
                driver.clone(),
                proxy.clone(),
                Arc::new(PlaneIngress::Local(ingress)),
                logs.clone(),
                store,
                engine_stop.clone(),
            );
            crate::metrics::spawn(
                metrics.clone(),
                engine.clone(),
                proxy,
                metrics_store,
                engine_stop.child_token(),
                &tasks,
            );
            (engine, task)
        }
        Layer::Remote(client) => {
            let (engine, task) = Engine::spawn(
                config,
                driver.clone(),
                client.clone(),
                Arc::new(PlaneIngress::Remote(client.clone())),
                logs.clone(),
                store,
                engine_stop.clone(),
            );
            crate::metrics::spawn(
                metrics.clone(),
                engine.clone(),
                client,
                metrics_store,
                engine_stop.child_token(),
                &tasks,
            );
            (engine, task)
        }
    };
    // Once the engine has restored every environment (a controller answers
    // commands only then), the data plane is brought in line with what
    // they re-adopted: before, another environment's backends would look
    // gone and be removed.
    let plane_lost = match &client {
        Some(c) => {
            let (c2, e) = (c.clone(), engine.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(120), e.restored()).await {
                    Ok(_) => {
                        let _ = tokio::task::spawn_blocking(move || c2.finish_resync()).await;
                    }
                    Err(_) => {
                        tracing::error!("the engine did not restore within 120s; the data plane is left as it is")
                    }
                }
            });
            c.lost()
        }
        None => CancellationToken::new(),
    };

    // The web dashboard's listener (an inherited one first: its address
    // stays the same across upgrades and daemon restarts under a keeper),
    // before anything is served.
    let dashboard_listener = match (dashboard_listen, inherited.dashboard.take()) {
        (crate::cli::DashboardListen::Off, _) => None,
        (crate::cli::DashboardListen::At(_), Some(l)) => {
            l.set_nonblocking(true)?;
            Some(tokio::net::TcpListener::from_std(l)?)
        }
        (crate::cli::DashboardListen::At(addr), None) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen for the dashboard on {addr}: choose another address with `nonstop daemon \
                     --dashboard-listen ADDR` (or NONSTOP_DASHBOARD_LISTEN), or `off` for none"
                )
            })?)
        }
    };
    let dashboard = match (&dashboard_listener, &api_token_value) {
        (Some(l), Some(token)) => {
            let epoch_file = home.path().join(nonstop_api::dashboard::EPOCH_FILE);
            Some(Arc::new(
                nonstop_api::dashboard::Dashboard::new(token, l.local_addr()?, Some(epoch_file))
                    .context("cannot set up the dashboard's sessions")?,
            ))
        }
        _ => None,
    };
    let (upgrade_tx, mut upgrade_rx) = mpsc::channel::<server::UpgradeRequest>(4);
    let engine_for_upgrade = engine.clone();
    let state = ApiState {
        engine,
        logs: logs.clone(),
        shutdown: shutdown.clone(),
        home: home.dir.clone(),
        upgrade: Some(upgrade_tx.clone()),
        metrics: Some(metrics),
        dashboard: dashboard.clone(),
    };

    // The unix socket, private to the user (or the one we inherited).
    let socket = home.socket();
    let listener = match inherited.api.take() {
        Some(l) => {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)?
        }
        None => {
            let _ = std::fs::remove_file(&socket); // stale, since we hold the lock
            let l =
                tokio::net::UnixListener::bind(&socket).with_context(|| format!("cannot bind {}", socket.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
            l
        }
    };
    let api_fd = {
        use std::os::fd::AsFd;
        listener.as_fd().try_clone_to_owned()?
    };
    // The TCP listener, if asked for, before anything is served: a daemon
    // that cannot have it exits before a client could start an operation.
    let tcp_listener = match (api_listen, inherited.api_tcp.take()) {
        (None, _) => None,
        (Some(_), Some(l)) => {
            l.set_nonblocking(true)?;
            Some(tokio::net::TcpListener::from_std(l)?)
        }
        (Some(addr), None) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for the API on {addr}"))?,
        ),
    };
    let app = server::router(state.clone());
    let sd = api_stop.clone();
    tasks.spawn(async move {
        let r = axum::serve(listener, app).with_graceful_shutdown(async move { sd.cancelled().await }).await;
        if let Err(e) = r {
            tracing::error!("API server stopped: {e}");
        }
    });
    let mut dashboard_fd = None;
    if let (Some(listener), Some(d)) = (dashboard_listener, &dashboard) {
        dashboard_fd = {
            use std::os::fd::AsFd;
            Some(listener.as_fd().try_clone_to_owned()?)
        };
        let app = nonstop_api::dashboard::router(state.clone());
        let sd = api_stop.clone();
        tasks.spawn(async move {
            let r = axum::serve(listener, app).with_graceful_shutdown(async move { sd.cancelled().await }).await;
            if let Err(e) = r {
                tracing::error!("dashboard server stopped: {e}");
            }
        });
        tracing::info!("dashboard on {} (`nonstop dashboard` prints a login link)", d.base_url);
    }
    let mut api_tcp_fd = None;
    if let (Some(addr), Some(token), Some(tcp)) = (api_listen, api_token_value, tcp_listener) {
        api_tcp_fd = {
            use std::os::fd::AsFd;
            Some(tcp.as_fd().try_clone_to_owned()?)
        };
        let app = server::router_with_token(state, token);
        let sd = api_stop.clone();
        tasks.spawn(async move {
            let r = axum::serve(tcp, app).with_graceful_shutdown(async move { sd.cancelled().await }).await;
            if let Err(e) = r {
                tracing::error!("TCP API server stopped: {e}");
            }
        });
        tracing::info!("API also on http://{addr} (token in {})", home.token().display());
    }

    tokio::spawn(nonstop_supervisor::memory::trim_when_idle(shutdown.clone()));

    // Signals: SIGTERM/SIGINT stop the daemon (instances keep running);
    // SIGUSR2 upgrades it in place.
    let sd = shutdown.clone();
    let up_tx = upgrade_tx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut usr2)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::user_defined2()))
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping the daemon (instances keep running)"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: stopping the daemon (instances keep running)"); break; }
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: upgrading the daemon in place");
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    if up_tx.send(reply).await.is_err() { break; }
                    match rx.await {
                        Ok(Ok(v)) => { tracing::info!("handed over: pid {} to pid {}", v.old_pid, v.new_pid); break; }
                        Ok(Err(e)) => tracing::error!("upgrade failed, still serving: {e}"),
                        Err(_) => break,
                    }
                }
                _ = sd.cancelled() => return,
            }
        }
        sd.cancel();
    });
    if successor {
        // The predecessor accepts until this daemon says it serves: the app
        // restored and every proxy socket it handed over in use again. A
        // successor that cannot say so exits, and the predecessor starts
        // its own version again (see upgrade.rs).
        match tokio::time::timeout(Duration::from_secs(30), engine_for_upgrade.status()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("taking over failed: the engine did not start: {e}"),
            Err(_) => anyhow::bail!("taking over failed: the engine did not answer within 30s of its start"),
        }
        let unused: Vec<String> = local.as_ref().map(|i| i.unused_inherited()).unwrap_or_default();
        if !unused.is_empty() {
            anyhow::bail!(
                "taking over failed: the proxy socket(s) {} handed over are not served (the stored app was not \
                 restored; see the errors above)",
                unused.join(", ")
            );
        }
        crate::upgrade::announce_serving(&home).context("taking over failed: cannot write upgrade.serving")?;
    }
    tracing::info!("nonstop daemon {} ready on {}", std::process::id(), socket.display());
    match &keeper {
        Some(k) => {
            // The keeper is the main process systemd knows; it says READY
            // when it hears that we serve.
            use std::os::fd::AsFd;
            k.hold(SocketKind::Api, api_fd.as_fd());
            if let Some(fd) = &api_tcp_fd {
                k.hold(SocketKind::ApiTcp, fd.as_fd());
            }
            if let Some(fd) = &dashboard_fd {
                k.hold(SocketKind::Dashboard, fd.as_fd());
            }
            k.serving();
        }
        None => crate::upgrade::sd_notify(&format!("MAINPID={}\nREADY=1\nSTATUS=serving", std::process::id())),
    }

    // Serve until told to stop, or until a successor takes over.
    let mut handed_over = false;
    let mut engine_died = false;
    let mut plane_gone = false;
    let mut engine_task = Some(engine_task);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = plane_lost.cancelled() => {
                // The keeper that ran the data plane is gone: nothing serves
                // the app's traffic through this daemon any more. Exit as a
                // crash (the app keeps running; whatever restarts the keeper
                // starts a daemon that re-adopts it).
                tracing::error!("the data plane is gone (its keeper died?); the daemon exits");
                plane_gone = true;
                break;
            }
            r = async { match engine_task.as_mut() { Some(t) => t.await, None => std::future::pending().await } } => {
                // The engine ended while we were not stopping: a bug. Exit
                // non-zero so that a supervisor restarts us (the app keeps
                // running and is re-adopted).
                engine_task = None;
                if !shutdown.is_cancelled() {
                    tracing::error!("the engine stopped unexpectedly ({r:?}); the daemon exits so that it can be restarted");
                    engine_died = true;
                }
                break;
            }
            Some(reply) = upgrade_rx.recv() => {
                // Not in the middle of an operation: a deploy's release task
                // would be cut off.
                let refuse = |reply: server::UpgradeRequest, e: UpgradeFailed| {
                    let _ = reply.send(Err(Box::new(e)));
                };
                if let Ok(status) = engine_for_upgrade.status().await {
                    if let Some(operation) = status.operation {
                        refuse(reply, UpgradeFailed::Busy { operation });
                        continue;
                    }
                }
                let sockets = match handover_sockets(local.as_deref(), &api_fd, api_tcp_fd.as_ref(), dashboard_fd.as_ref()) {
                    Ok(sockets) => sockets,
                    Err(e) => { refuse(reply, e); continue; }
                };
                let (exe2, home2) = (upgrade_exe.clone(), Home { dir: home.dir.clone() });
                let spawned = tokio::task::spawn_blocking(move || crate::upgrade::spawn_successor(&exe2, None, &home2, listen, sockets)).await;
                let successor = match spawned {
                    Ok(Ok(successor)) => successor,
                    Ok(Err(e)) => { tracing::error!("upgrade failed, still serving: {e}"); refuse(reply, e.into()); continue; }
                    Err(e) => { refuse(reply, SuccessorError::from(e).into()); continue; }
                };
                // It has the sockets. Stop deciding (its engine takes over the
                // same store), leave the API to it (requests queue until it
                // serves) and release the lock; go on accepting proxy
                // connections until it serves.
                engine_stop.cancel();
                if let Some(t) = engine_task.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
                }
                api_stop.cancel();
                drop(state_lock.take());
                let home2 = Home { dir: home.dir.clone() };
                let served = tokio::task::spawn_blocking(move || successor.wait_serving(&home2)).await.unwrap_or_else(|e| Err(e.into()));
                let result: Result<Upgraded, server::BoxError> = match served {
                    Ok(new_pid) => Ok(Upgraded { old_pid: std::process::id(), new_pid }),
                    Err(why) => {
                        tracing::error!("upgrade failed after the handover: {why}; starting this daemon's own version again");
                        match restart_own_version(&home, &upgrade_exe, listen, local.as_deref(), &api_fd, api_tcp_fd.as_ref(), dashboard_fd.as_ref()).await {
                            Ok(pid) => {
                                tracing::info!("this daemon's version serves again as pid {pid}");
                                Err(Box::new(UpgradeFailed::Restarted { why, pid }))
                            }
                            Err(again) => {
                                // Nobody else can serve: go on serving the
                                // proxy, and take SIGUSR2 for another try.
                                tracing::error!("starting this daemon's own version again failed: {again}");
                                let again = Box::new(again);
                                refuse(reply, UpgradeFailed::RestartFailed { why, again, pid: std::process::id() });
                                continue;
                            }
                        }
                    }
                };
                if let Some(i) = &local {
                    i.stop_accepting();
                }
                tracing::info!("handed over; finishing in-flight requests");
                let _ = reply.send(result);
                handed_over = true;
                break;
            }
        }
    }
    // Stopping on purpose: the keeper must not start another daemon. (A
    // handover leaves the successor kept; an engine that died is a crash.)
    if !handed_over && !engine_died && !plane_gone {
        if let Some(k) = &keeper {
            k.stopping();
        }
    }
    shutdown.cancel();
    if let Some(t) = engine_task.take() {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(35), tasks.wait()).await.is_err() {
        tracing::warn!("some connections did not finish within 35s");
    }
    if !handed_over {
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(home.dir.join("daemon.pid"));
    }
    tracing::info!("daemon {} stopped", std::process::id());
    if plane_gone {
        anyhow::bail!("the data plane is gone; see {}", home.daemon_log().display());
    }
    if engine_died {
        anyhow::bail!("the engine stopped unexpectedly; see {}", home.daemon_log().display());
    }
    Ok(())
}
