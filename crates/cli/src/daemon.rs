//! `nonstop daemon`: wires the store, the local driver, the proxy, the
//! engine and the API together, and runs until told to stop. Stopping the
//! daemon (SIGTERM, SIGINT, `POST /v1/shutdown`) leaves the app's instances
//! running; the next daemon re-adopts them.

use crate::home::Home;
use anyhow::Context;
use nonstop_api::server::{self, ApiState, LogSource};
use nonstop_api::wire::LogEntry;
use nonstop_core::traffic::RouteKey;
use nonstop_core::{AppName, EnvironmentId, InstanceId, ProcessName, SystemClock};
use nonstop_core::ReleaseId;
use nonstop_engine::{BuildOutput, Builder, Engine, EngineConfig, Ingress, InstanceLogs};
use nonstop_proxy::{Proxy, ProxyConfig};
use nonstop_supervisor::{LocalDriver, LocalDriverConfig, LogQuery};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The proxy's listener, moved and closed by the engine.
struct ProxyIngress {
    proxy: Proxy,
    current: Mutex<Option<(SocketAddr, CancellationToken)>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Ingress for ProxyIngress {
    fn listen(&self, addr: SocketAddr, route: &RouteKey) -> Result<(), String> {
        self.proxy.set_default_route(route.clone());
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(a, _)| *a == addr) {
            return Ok(());
        }
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .map_err(|e| e.to_string())?;
        socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
        socket.bind(addr).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => "the address is already in use by another program".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied (ports below 1024 need privileges)".to_string(),
            _ => e.to_string(),
        })?;
        let listener = socket.listen(1024).map_err(|e| e.to_string())?;
        let token = self.shutdown.child_token();
        let proxy = self.proxy.clone();
        let t = token.clone();
        self.tasks.spawn(async move {
            if let Err(e) = proxy.serve(listener, t).await {
                tracing::error!("proxy on {addr} stopped: {e}");
            }
        });
        tracing::info!("proxy listening on {addr}");
        if let Some((_, old)) = current.replace((addr, token)) {
            old.cancel();
        }
        Ok(())
    }

    fn close(&self) {
        if let Some((addr, token)) = self.current.lock().unwrap_or_else(|e| e.into_inner()).take() {
            tracing::info!("proxy on {addr} closing");
            token.cancel();
        }
    }
}

struct DriverLogs {
    driver: Arc<LocalDriver>,
}

fn to_entry(l: nonstop_supervisor::LogLine) -> LogEntry {
    LogEntry { ts: l.ts, instance: l.instance, generation: l.generation, stream: l.stream.as_str().to_string(), text: l.text }
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
        nonstop_supervisor::logs::last_texts(&path, lines, &[nonstop_supervisor::Stream::Out, nonstop_supervisor::Stream::Err])
            .unwrap_or_default()
    }
}

/// Builds releases under `$NONSTOP_HOME/releases/<app>/v<N>`.
struct ReleasePort {
    home: std::path::PathBuf,
}

impl ReleasePort {
    fn builder(&self, app: &AppName) -> nonstop_release::ReleaseBuilder {
        nonstop_release::ReleaseBuilder::new(self.home.join("releases").join(app.as_str())).with_excluded(self.home.clone())
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
        output: mpsc::UnboundedSender<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BuildOutput, String>> + Send>> {
        let builder = self.builder(app);
        Box::pin(async move {
            let _ = builder.clean_staging();
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
                        let _ = out.send(format!("snapshot: {} files, {} KiB", s.files, s.bytes / 1024));
                    }
                    nonstop_release::BuildEvent::CommandStarted { index, total, command } => {
                        let _ = out.send(format!("[{}/{total}] {command}", index + 1));
                    }
                    nonstop_release::BuildEvent::Output { line, .. } => {
                        let _ = out.send(line);
                    }
                    nonstop_release::BuildEvent::CommandFinished { .. } => {}
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

    fn prune(&self, app: &AppName, keep: &[ReleaseId]) -> Result<Vec<ReleaseId>, String> {
        self.builder(app).prune(keep).map_err(|e| e.to_string())
    }
}

fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn api_token(home: &Home) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(t) = std::fs::read_to_string(home.token()) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let token = random_token()?;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(home.token())?;
    f.write_all(token.as_bytes())?;
    Ok(token)
}

pub async fn run(home: Home, api_listen: Option<SocketAddr>) -> anyhow::Result<()> {
    home.create()?;
    // One daemon per home: an exclusive lock held for our whole life.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.lock())
        .with_context(|| format!("cannot open {}", home.lock().display()))?;
    let _lock = match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err(_) => anyhow::bail!(
            "another nonstop daemon already runs for {} (lock {} is held); use it, or stop it with `nonstop down`",
            home.path().display(),
            home.lock().display()
        ),
    };
    std::fs::write(home.dir.join("daemon.pid"), std::process::id().to_string())?;

    let shutdown = CancellationToken::new();
    let store = Arc::new(nonstop_store::Store::open(&home.database())?);
    let exe = std::env::current_exe().context("cannot find the nonstop executable")?;
    let driver = Arc::new(
        LocalDriver::new(LocalDriverConfig::new(home.path(), vec![exe.into_os_string(), "__monitor".into()]))
            .context("cannot set up the local driver")?,
    );
    let proxy = Proxy::new(ProxyConfig::default());
    let tasks = TaskTracker::new();
    let ingress = Arc::new(ProxyIngress {
        proxy: proxy.clone(),
        current: Mutex::new(None),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });
    let logs = Arc::new(DriverLogs { driver: driver.clone() });
    let (engine, engine_task) = Engine::spawn(
        EngineConfig {
            environment: EnvironmentId::default_env(),
            clock: Arc::new(SystemClock),
            builder: Arc::new(ReleasePort { home: home.dir.clone() }),
        },
        driver.clone(),
        Arc::new(proxy.clone()),
        ingress.clone(),
        logs.clone(),
        store,
        shutdown.clone(),
    );

    let state = ApiState { engine, logs: logs.clone(), shutdown: shutdown.clone(), home: home.dir.clone() };

    // The unix socket, private to the user.
    let socket = home.socket();
    let _ = std::fs::remove_file(&socket); // stale, since we hold the lock
    let listener = tokio::net::UnixListener::bind(&socket).with_context(|| format!("cannot bind {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let app = server::router(state.clone());
    let sd = shutdown.clone();
    tasks.spawn(async move {
        let r = axum::serve(listener, app).with_graceful_shutdown(async move { sd.cancelled().await }).await;
        if let Err(e) = r {
            tracing::error!("API server stopped: {e}");
        }
    });
    if let Some(addr) = api_listen {
        let token = api_token(&home)?;
        let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for the API on {addr}"))?;
        let app = server::router_with_token(state, token);
        let sd = shutdown.clone();
        tasks.spawn(async move {
            let r = axum::serve(tcp, app).with_graceful_shutdown(async move { sd.cancelled().await }).await;
            if let Err(e) = r {
                tracing::error!("TCP API server stopped: {e}");
            }
        });
        tracing::info!("API also on http://{addr} (token in {})", home.token().display());
    }

    // Signals: stop the daemon, leave the instances running.
    let sd = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the daemon (instances keep running)"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the daemon (instances keep running)"),
            _ = sd.cancelled() => {}
        }
        sd.cancel();
    });
    tracing::info!("nonstop daemon {} ready on {}", std::process::id(), socket.display());
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), engine_task).await;
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await.is_err() {
        tracing::warn!("some connections did not finish within 10s");
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(home.dir.join("daemon.pid"));
    tracing::info!("daemon stopped");
    Ok(())
}
