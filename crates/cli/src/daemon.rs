//! `nonstop daemon`: wires the store, the local driver, the proxy, the
//! engine and the API together, and runs until told to stop. Stopping the
//! daemon (SIGTERM, SIGINT, `POST /v1/shutdown`) leaves the app's instances
//! running; the next daemon re-adopts them.

use crate::home::Home;
use crate::keeper::{KeeperLink, SocketKind};
use anyhow::Context;
use nonstop_api::server::{self, ApiState, LogSource};
use nonstop_api::wire::LogEntry;
use nonstop_core::traffic::RouteKey;
use nonstop_core::ReleaseId;
use nonstop_core::{AppName, EnvironmentId, InstanceId, ProcessName, SystemClock};
use nonstop_engine::{BuildNote, BuildOutput, Builder, Engine, EngineConfig, Ingress, IngressError, InstanceLogs};
use nonstop_proxy::{Proxy, ProxyConfig};
use nonstop_supervisor::{LocalDriver, LocalDriverConfig, LogQuery};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One listening socket of the proxy: its address, the token that stops
/// its accept loop, and a duplicate of the socket to hand to a successor.
struct Listening {
    addr: SocketAddr,
    token: CancellationToken,
    fd: std::os::fd::OwnedFd,
}

/// The proxy's listeners (plain and TLS) and settings, set by the engine
/// from `[proxy]`.
struct ProxyIngress {
    proxy: Proxy,
    plain: Mutex<Option<Listening>>,
    tls: Mutex<Option<Listening>>,
    /// Sockets received from a predecessor, used instead of binding.
    inherited: Mutex<HashMap<SocketAddr, std::net::TcpListener>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// What the spec does not set: where request bodies are buffered
    /// (`$NONSTOP_HOME/bodies`, made 0700 by the proxy).
    base: ProxyConfig,
    /// The keeper, if this daemon has one: it gets a duplicate of every
    /// listening socket, so that the socket outlives a crash.
    keeper: Option<Arc<KeeperLink>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProxyIngress {
    /// Tell the keeper about a new listener (and that an old one on
    /// another address is no longer wanted).
    fn keep(&self, new: &Listening, old: Option<&Listening>) {
        if let Some(k) = &self.keeper {
            use std::os::fd::AsFd;
            k.hold(SocketKind::Proxy, new.fd.as_fd());
            if let Some(old) = old.filter(|o| o.addr != new.addr) {
                k.release(old.addr);
            }
        }
    }

    fn unkeep(&self, old: &Listening) {
        if let Some(k) = &self.keeper {
            k.release(old.addr);
        }
    }

    /// Duplicates of the listening sockets, for a successor.
    fn handover(&self) -> Vec<std::os::fd::OwnedFd> {
        [
            lock(&self.plain).as_ref().and_then(|l| l.fd.try_clone().ok()),
            lock(&self.tls).as_ref().and_then(|l| l.fd.try_clone().ok()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Stop accepting; in-flight requests finish.
    fn stop_accepting(&self) {
        for slot in [&self.plain, &self.tls] {
            if let Some(l) = lock(slot).as_ref() {
                l.token.cancel();
            }
        }
    }

    /// A listening socket on `addr`: the predecessor's, or a new one.
    fn open(&self, addr: SocketAddr) -> Result<(tokio::net::TcpListener, std::os::fd::OwnedFd), IngressError> {
        let err = |e: std::io::Error| {
            IngressError::Listen(
                addr.to_string(),
                match e.kind() {
                    std::io::ErrorKind::AddrInUse => "the address is already in use by another program".to_string(),
                    std::io::ErrorKind::PermissionDenied => {
                        "permission denied (ports below 1024 need privileges)".to_string()
                    }
                    _ => e.to_string(),
                },
            )
        };
        let inherited = lock(&self.inherited).remove(&addr);
        let listener = match inherited {
            Some(l) => {
                l.set_nonblocking(true).map_err(err)?;
                tracing::info!("proxy takes over the listening socket on {addr} from the previous daemon");
                tokio::net::TcpListener::from_std(l).map_err(err)?
            }
            None => {
                let socket =
                    if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
                        .map_err(err)?;
                socket.set_reuseaddr(true).map_err(err)?;
                socket.bind(addr).map_err(err)?;
                socket.listen(1024).map_err(err)?
            }
        };
        let fd = {
            use std::os::fd::AsFd;
            listener.as_fd().try_clone_to_owned().map_err(err)?
        };
        Ok((listener, fd))
    }
}

impl Ingress for ProxyIngress {
    fn listen(&self, spec: &nonstop_core::process::ProxySpec, route: &RouteKey) -> Result<(), IngressError> {
        // Everything that can fail first: bind what is new, check the
        // settings and certificates; only then change anything.
        let plain_addr = spec.listen;
        let new_plain = match lock(&self.plain).as_ref() {
            Some(l) if l.addr == plain_addr => None,
            _ => Some(self.open(plain_addr)?),
        };
        let new_tls = match (spec.https_listen, lock(&self.tls).as_ref()) {
            (Some(a), Some(l)) if l.addr == a => None,
            (Some(a), _) => Some(self.open(a)?),
            (None, _) => None,
        };
        let config = self.base.clone().with_spec(spec).map_err(|e| IngressError::Config(e.to_string()))?;
        match nonstop_proxy::TlsSettings::from_spec(spec) {
            Some(t) => self.proxy.configure_tls(&t).map_err(|e| IngressError::Config(e.to_string()))?,
            None => self.proxy.clear_tls(),
        }
        self.proxy.set_config(config).map_err(|e| IngressError::Config(e.to_string()))?;
        self.proxy.set_default_route(route.clone());

        if let Some((listener, fd)) = new_plain {
            let token = self.shutdown.child_token();
            let (proxy, t) = (self.proxy.clone(), token.clone());
            self.tasks.spawn(async move {
                if let Err(e) = proxy.serve(listener, t).await {
                    tracing::error!("proxy on {plain_addr} stopped: {e}");
                }
            });
            tracing::info!("proxy listening on {plain_addr}");
            let new = Listening { addr: plain_addr, token, fd };
            let mut slot = lock(&self.plain);
            self.keep(&new, slot.as_ref());
            if let Some(old) = slot.replace(new) {
                old.token.cancel();
            }
        }
        match (spec.https_listen, new_tls) {
            (Some(addr), Some((listener, fd))) => {
                let token = self.shutdown.child_token();
                let (proxy, t) = (self.proxy.clone(), token.clone());
                self.tasks.spawn(async move {
                    if let Err(e) = proxy.serve_tls(listener, t).await {
                        tracing::error!("proxy (TLS) on {addr} stopped: {e}");
                    }
                });
                tracing::info!("proxy listening for TLS on {addr}");
                let new = Listening { addr, token, fd };
                let mut slot = lock(&self.tls);
                self.keep(&new, slot.as_ref());
                if let Some(old) = slot.replace(new) {
                    old.token.cancel();
                }
            }
            (None, _) => {
                if let Some(old) = lock(&self.tls).take() {
                    self.unkeep(&old);
                    old.token.cancel();
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn close(&self) {
        for slot in [&self.plain, &self.tls] {
            if let Some(l) = lock(slot).take() {
                tracing::info!("proxy on {} closing", l.addr);
                self.unkeep(&l);
                l.token.cancel();
            }
        }
    }
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

fn query(app: &str, env: &str, process: Option<&str>, tail: usize) -> Result<LogQuery, String> {
    Ok(LogQuery {
        app: AppName::new(app).map_err(|e| e.to_string())?,
        environment: EnvironmentId::new(env).map_err(|e| e.to_string())?,
        process: process.map(ProcessName::new).transpose().map_err(|e| e.to_string())?,
        tail,
    })
}

impl LogSource for DriverLogs {
    fn tail(&self, app: &str, env: &str, process: Option<&str>, tail: usize) -> Result<Vec<LogEntry>, String> {
        let q = query(app, env, process, tail)?;
        Ok(self.driver.logs_tail(&q).map_err(|e| e.to_string())?.into_iter().map(to_entry).collect())
    }

    fn follow(
        &self,
        app: &str,
        env: &str,
        process: Option<&str>,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<LogEntry>, String> {
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
    statics: crate::statics::StaticPublisher,
}

impl ReleasePort {
    fn builder(&self, app: &AppName) -> nonstop_release::ReleaseBuilder {
        nonstop_release::ReleaseBuilder::new(self.home.join("releases").join(app.as_str()))
            .with_excluded(self.home.clone())
    }
}

impl Builder for ReleasePort {
    fn content_hash(&self, source: &std::path::Path) -> Result<String, String> {
        nonstop_release::ReleaseBuilder::new(self.home.join("releases"))
            .with_excluded(self.home.clone())
            .snapshot_hash(source)
            .map(|s| s.content_hash)
            .map_err(|e| e.to_string())
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
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BuildOutput, String>> + Send>> {
        let builder = self.builder(app);
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
            let built = builder
                .build(req, move |ev| match ev {
                    nonstop_release::BuildEvent::Snapshotted(s) => {
                        let _ =
                            out.send(BuildNote::Line(format!("snapshot: {} files, {} KiB", s.files, s.bytes / 1024)));
                    }
                    nonstop_release::BuildEvent::CommandStarted { index, total, command } => {
                        let _ = out.send(BuildNote::Line(format!("[{}/{total}] {command}", index + 1)));
                    }
                    nonstop_release::BuildEvent::CommandSpawned { index, process } => {
                        let _ = out.send(BuildNote::Command { index, process });
                    }
                    nonstop_release::BuildEvent::Output { line, .. } => {
                        let _ = out.send(BuildNote::Line(line));
                    }
                    nonstop_release::BuildEvent::CommandFinished { index, status, .. } => {
                        let _ = out.send(BuildNote::CommandEnded { index, status });
                    }
                })
                .await
                .map_err(|e| e.to_string())?;
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
    ) -> Result<(), String> {
        crate::statics::StaticPublisher::index(release, mounts)
    }

    fn serve_statics(&self, app: &AppName, live: Vec<nonstop_engine::LiveStatics>) {
        self.statics.publish(app, live)
    }

    fn prune(&self, app: &AppName, keep: &[ReleaseId]) -> Result<Vec<ReleaseId>, String> {
        self.builder(app).prune(keep).map_err(|e| e.to_string())
    }

    fn command_alive(&self, command: &nonstop_core::driver::Locator) -> bool {
        nonstop_release::command_alive(command)
    }

    fn kill_command(
        &self,
        command: &nonstop_core::driver::Locator,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<nonstop_core::driver::StopOutcome, String>> + Send>>
    {
        let command = command.clone();
        Box::pin(async move { nonstop_release::kill_command(&command).await })
    }
}

/// A daemon started by the keeper after its predecessor died says so in
/// the events of every running app (`nonstop events`).
fn record_keeper_restart(store: &nonstop_store::Store, why: &str) {
    tracing::warn!("started by the keeper: {why}");
    let message = format!("daemon restarted by the keeper: {why}; running instances are re-adopted");
    for app in store.apps().unwrap_or_default().iter().filter(|a| a.running) {
        let now = std::time::SystemTime::now();
        if let Err(e) = store.add_event(&app.app, &app.environment, now, "daemon", None, &message) {
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

/// Duplicates of the listening sockets to hand to a successor: the
/// proxy's, the API's unix socket and, if any, its TCP listener.
fn handover_sockets(
    ingress: &ProxyIngress,
    api_fd: &std::os::fd::OwnedFd,
    api_tcp_fd: Option<&std::os::fd::OwnedFd>,
) -> Result<Vec<(&'static str, std::os::fd::OwnedFd)>, String> {
    let mut sockets: Vec<(&'static str, std::os::fd::OwnedFd)> =
        ingress.handover().into_iter().map(|fd| ("proxy", fd)).collect();
    sockets.push(("api", api_fd.try_clone().map_err(|e| format!("cannot pass the API socket: {e}"))?));
    if let Some(fd) = api_tcp_fd {
        sockets.push(("api-tcp", fd.try_clone().map_err(|e| format!("cannot pass the API's TCP socket: {e}"))?));
    }
    Ok(sockets)
}

/// After a successor failed past the handover: start this daemon's own
/// image (`/proc/self/exe`, there even when the file on disk was replaced)
/// as the successor instead, with the same sockets; its pid once it serves.
async fn restart_own_version(
    home: &Home,
    upgrade_exe: &std::path::Path,
    api_listen: Option<SocketAddr>,
    ingress: &ProxyIngress,
    api_fd: &std::os::fd::OwnedFd,
    api_tcp_fd: Option<&std::os::fd::OwnedFd>,
) -> Result<u32, String> {
    let sockets = handover_sockets(ingress, api_fd, api_tcp_fd)?;
    let (home2, upgrade_exe) = (Home { dir: home.dir.clone() }, upgrade_exe.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let own = std::path::Path::new("/proc/self/exe");
        crate::upgrade::spawn_successor(own, Some(&upgrade_exe), &home2, api_listen, sockets)?.wait_serving(&home2)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

pub async fn run(home: Home, api_listen: Option<SocketAddr>, proxy_workers: Option<u32>) -> anyhow::Result<()> {
    crate::limits::raise_fd_limit();
    home.create()?;
    let exe = std::env::current_exe().context("cannot find the nonstop executable")?;
    // The binary to start on upgrade: this path, whatever is there by then
    // (or, in a daemon that a failed upgrade started from its predecessor's
    // image, the path that upgrade tried).
    let upgrade_exe =
        std::env::var_os(crate::upgrade::UPGRADE_EXE_VAR).map(std::path::PathBuf::from).unwrap_or_else(|| exe.clone());
    std::env::remove_var(crate::upgrade::UPGRADE_EXE_VAR);
    // Monitors run this very binary; when its file was replaced or removed
    // since it started ("... (deleted)"), /proc/self/exe still is it.
    let monitor_exe = if exe.exists() { exe.clone() } else { std::path::PathBuf::from("/proc/self/exe") };
    let mut inherited = crate::upgrade::take_inherited();
    let successor = std::env::var_os("NONSTOP_UPGRADE").is_some_and(|v| v == "1");
    std::env::remove_var("NONSTOP_UPGRADE");
    let keeper = KeeperLink::from_env().map(Arc::new);
    let restarted_because = std::env::var(crate::keeper::RESTART_VAR).ok();
    std::env::remove_var(crate::keeper::RESTART_VAR);
    // Everything that can fail is done before a predecessor is told to step
    // down (SQLite in WAL mode may be opened by both at once).
    let store = Arc::new(crate::recovery::open_store(&home)?);
    let driver = Arc::new(
        LocalDriver::new(LocalDriverConfig::new(home.path(), crate::home::monitor_command(monitor_exe)))
            .context("cannot set up the local driver")?,
    );
    let api_token_value = match api_listen {
        Some(_) => Some(api_token(&home)?),
        None => None,
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
    // The proxy's worker threads are fixed for the daemon's life: the
    // running app's stored `[proxy] workers`, else `--proxy-workers` (what
    // `up` or `deploy` passes when it starts the daemon for a new app),
    // else one per core. A change by a later `deploy` applies from the
    // next daemon start or upgrade.
    let workers = store
        .apps()
        .ok()
        .and_then(|apps| apps.iter().find(|a| a.running).and_then(|a| a.spec.proxy.workers))
        .or(proxy_workers)
        .map_or(0, |n| n as usize);
    let base = ProxyConfig { body_buffer_dir: Some(home.path().join("bodies")), ..ProxyConfig::default() };
    let proxy = Proxy::new(ProxyConfig { workers, ..base.clone() });
    let tasks = TaskTracker::new();
    crate::recovery::spawn_housekeeping(store.clone(), &home, engine_stop.child_token(), &tasks);
    let ingress = Arc::new(ProxyIngress {
        proxy: proxy.clone(),
        plain: Mutex::new(None),
        tls: Mutex::new(None),
        inherited: Mutex::new(std::mem::take(&mut inherited.proxy)),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        base,
        keeper: keeper.clone(),
    });
    let logs = Arc::new(DriverLogs { driver: driver.clone() });
    let (engine, engine_task) = Engine::spawn(
        EngineConfig {
            environment: EnvironmentId::default_env(),
            clock: Arc::new(SystemClock),
            builder: Arc::new(ReleasePort {
                home: home.dir.clone(),
                statics: crate::statics::StaticPublisher::new(proxy.clone()),
            }),
        },
        driver.clone(),
        Arc::new(proxy.clone()),
        ingress.clone(),
        logs.clone(),
        store,
        engine_stop.clone(),
    );

    let (upgrade_tx, mut upgrade_rx) = mpsc::channel::<server::UpgradeRequest>(4);
    let engine_for_upgrade = engine.clone();
    let state = ApiState {
        engine,
        logs: logs.clone(),
        shutdown: shutdown.clone(),
        home: home.dir.clone(),
        upgrade: Some(upgrade_tx.clone()),
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
    let app = server::router(state.clone());
    let sd = api_stop.clone();
    tasks.spawn(async move {
        let r = axum::serve(listener, app).with_graceful_shutdown(async move { sd.cancelled().await }).await;
        if let Err(e) = r {
            tracing::error!("API server stopped: {e}");
        }
    });
    let mut api_tcp_fd = None;
    if let (Some(addr), Some(token)) = (api_listen, api_token_value) {
        let tcp = match inherited.api_tcp.take() {
            Some(l) => {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)?
            }
            None => tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for the API on {addr}"))?,
        };
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
                        Ok(Ok(v)) => { tracing::info!("handed over: {v}"); break; }
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
        let unused: Vec<String> = lock(&ingress.inherited).keys().map(ToString::to_string).collect();
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
            k.serving();
        }
        None => crate::upgrade::sd_notify(&format!("MAINPID={}\nREADY=1\nSTATUS=serving", std::process::id())),
    }

    // Serve until told to stop, or until a successor takes over.
    let mut handed_over = false;
    let mut engine_died = false;
    let mut engine_task = Some(engine_task);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
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
                if let Ok(status) = engine_for_upgrade.status().await {
                    if let Some(op) = status.operation {
                        let _ = reply.send(Err(format!("{op} is in progress; upgrade the daemon when it has finished")));
                        continue;
                    }
                }
                let sockets = match handover_sockets(&ingress, &api_fd, api_tcp_fd.as_ref()) {
                    Ok(sockets) => sockets,
                    Err(e) => { let _ = reply.send(Err(e)); continue; }
                };
                let (exe2, home2) = (upgrade_exe.clone(), Home { dir: home.dir.clone() });
                let spawned = tokio::task::spawn_blocking(move || crate::upgrade::spawn_successor(&exe2, None, &home2, api_listen, sockets)).await;
                let successor = match spawned {
                    Ok(Ok(successor)) => successor,
                    Ok(Err(e)) => { tracing::error!("upgrade failed, still serving: {e}"); let _ = reply.send(Err(e)); continue; }
                    Err(e) => { let _ = reply.send(Err(e.to_string())); continue; }
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
                let served = tokio::task::spawn_blocking(move || successor.wait_serving(&home2)).await.unwrap_or_else(|e| Err(e.to_string()));
                let result = match served {
                    Ok(new_pid) => Ok(serde_json::json!({"old_pid": std::process::id(), "new_pid": new_pid})),
                    Err(why) => {
                        tracing::error!("upgrade failed after the handover: {why}; starting this daemon's own version again");
                        match restart_own_version(&home, &upgrade_exe, api_listen, &ingress, &api_fd, api_tcp_fd.as_ref()).await {
                            Ok(pid) => {
                                tracing::info!("this daemon's version serves again as pid {pid}");
                                Err(format!("{why}. The version that ran before was started again as pid {pid} and serves; the app kept running"))
                            }
                            Err(again) => {
                                // Nobody else can serve: go on serving the
                                // proxy, and take SIGUSR2 for another try.
                                tracing::error!("starting this daemon's own version again failed: {again}");
                                let _ = reply.send(Err(format!(
                                    "{why}; starting the version that ran before again failed too: {again}. Daemon {pid} goes \
                                     on serving the proxy but no longer manages the app: fix the binary and upgrade again \
                                     with `kill -USR2 {pid}` (or `systemctl reload nonstop`), or stop it and start \
                                     `nonstop daemon`",
                                    pid = std::process::id()
                                )));
                                continue;
                            }
                        }
                    }
                };
                ingress.stop_accepting();
                tracing::info!("handed over; finishing in-flight requests");
                let _ = reply.send(result);
                handed_over = true;
                break;
            }
        }
    }
    // Stopping on purpose: the keeper must not start another daemon. (A
    // handover leaves the successor kept; an engine that died is a crash.)
    if !handed_over && !engine_died {
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
    if engine_died {
        anyhow::bail!("the engine stopped unexpectedly; see {}", home.daemon_log().display());
    }
    Ok(())
}
