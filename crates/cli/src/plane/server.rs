//! The data plane's side: the proxy (`nonstop_proxy::Proxy`, unchanged),
//! its listeners (`ProxyIngress`) and its static files, run in the keeper,
//! driven by daemons over `plane.sock` (see `wire.rs`).
//!
//! The data plane is passive: it does what a daemon asks and streams what
//! happens (health changes, finished drains) to whoever subscribed. A
//! daemon that goes away changes nothing here: requests in flight finish,
//! health checks go on (an instance that dies leaves rotation by its
//! failed checks and refused connections), drains run to their end or
//! their timeout. The next daemon reads the table and resyncs.

use super::ingress::ProxyIngress;
use super::wire::{self, Answer, Call, Event, PlaneBackend, PlaneError, Reply, Request};
use crate::home::Home;
use crate::statics::StaticPublisher;
use nonstop_core::process::HealthCheck;
use nonstop_core::traffic::{Backend, RouteKey, Traffic};
use nonstop_core::{AppEnv, EnvironmentId, InstanceId};
use nonstop_engine::{Ingress, IngressError};
use nonstop_proxy::{Proxy, ProxyConfig};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the data plane gives in-flight requests when it stops (as the
/// daemon did when it ran the proxy).
const STOP_GRACE: Duration = Duration::from_secs(35);

/// The proxy and what goes with it, made by the first daemon's hello (its
/// worker count is fixed for the data plane's life).
struct Running {
    proxy: Proxy,
    ingress: Arc<ProxyIngress>,
    statics: StaticPublisher,
}

pub struct DataPlane {
    bodies: std::path::PathBuf,
    running: OnceLock<Running>,
    /// Listening sockets systemd passed to the keeper, until the proxy
    /// takes them.
    inherited: Mutex<Option<HashMap<SocketAddr, std::net::TcpListener>>>,
    /// What each backend was added with (the proxy knows its state).
    table: Mutex<BTreeMap<InstanceId, (RouteKey, Backend, HealthCheck)>>,
    drained: broadcast::Sender<Event>,
    shutdown: CancellationToken,
    /// The listeners' serve loops and client connections.
    tasks: TaskTracker,
    /// Connections from daemons and drains.
    control: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DataPlane {
    pub fn new(home: &Home, inherited: HashMap<SocketAddr, std::net::TcpListener>) -> Arc<DataPlane> {
        Arc::new(DataPlane {
            bodies: home.path().join("bodies"),
            running: OnceLock::new(),
            inherited: Mutex::new(Some(inherited)),
            table: Mutex::new(BTreeMap::new()),
            drained: broadcast::channel(1024).0,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            control: TaskTracker::new(),
        })
    }

    fn running(&self, workers: usize) -> &Running {
        self.running.get_or_init(|| {
            let base = ProxyConfig { body_buffer_dir: Some(self.bodies.clone()), ..ProxyConfig::default() };
            let proxy = Proxy::new(ProxyConfig { workers, ..base.clone() });
            let inherited = lock(&self.inherited).take().unwrap_or_default();
            let ingress = Arc::new(ProxyIngress::new(
                proxy.clone(),
                inherited,
                self.shutdown.clone(),
                self.tasks.clone(),
                base,
                None,
            ));
            tracing::info!("data plane: proxy started ({} worker thread(s) asked, 0: one per core)", workers);
            Running { statics: StaticPublisher::new(proxy.clone()), proxy, ingress }
        })
    }

    /// The proxy (started with one worker if no daemon said hello yet).
    #[cfg(test)]
    pub(crate) fn proxy_for_tests(&self) -> Proxy {
        self.running(1).proxy.clone()
    }

    /// Accept daemons on `listener` until [`DataPlane::stop`].
    pub fn serve(self: &Arc<Self>, listener: tokio::net::UnixListener) {
        let plane = Arc::clone(self);
        self.control.spawn(async move {
            loop {
                tokio::select! {
                    _ = plane.shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((conn, _)) => {
                            let p = Arc::clone(&plane);
                            plane.control.spawn(async move { p.connection(conn).await });
                        }
                        Err(e) => {
                            tracing::warn!("data plane: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
        });
    }

    /// Stop: close the listeners, let requests in flight finish (up to
    /// 35 s), stop the health checks.
    pub async fn stop(&self) {
        if let Some(r) = self.running.get() {
            r.ingress.close();
        }
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(STOP_GRACE, self.tasks.wait()).await.is_err() {
            tracing::warn!("data plane: some connections did not finish within {}s", STOP_GRACE.as_secs());
        }
        if let Some(r) = self.running.get() {
            r.proxy.close().await;
        }
        self.control.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.control.wait()).await;
    }

    /// The backend table, forgetting what the proxy forgot (finished drains).
    fn backends(&self) -> Vec<PlaneBackend> {
        let Some(r) = self.running.get() else { return Vec::new() };
        let mut table = lock(&self.table);
        let mut out = Vec::new();
        table.retain(|id, (route, backend, check)| match r.proxy.status(id) {
            Some(status) => {
                out.push(PlaneBackend { route: route.clone(), backend: backend.clone(), check: check.clone(), status });
                true
            }
            None => false,
        });
        out
    }

    async fn connection(self: Arc<Self>, conn: tokio::net::UnixStream) {
        // The socket is 0600 in a 0700 directory; a peer of another user
        // cannot connect. Say who, for the log.
        let pid = rustix::net::sockopt::socket_peercred(&conn).map(|c| c.pid.as_raw_nonzero().get()).unwrap_or(0);
        let (read, mut write) = conn.into_split();
        let mut lines = BufReader::new(read);
        let mut hello = false;
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                n = read_line(&mut lines, &mut line) => n,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let call: Call = match wire::decode(&line) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("data plane: daemon {pid}: {e}; closing its connection");
                    let _ = write.write_all(wire::encode(&Answer { id: 0, result: Err(e) }).as_bytes()).await;
                    return;
                }
            };
            let subscribe = matches!(call.request, Request::Subscribe);
            let result = match (&call.request, hello) {
                (Request::Hello { .. }, _) => {
                    let r = self.handle(call.request, pid);
                    hello = r.is_ok();
                    r
                }
                (_, false) => Err(PlaneError::Protocol { reason: "the first call must be a hello".into() }),
                (Request::Drain { drain, instance, timeout_ms }, true) => {
                    self.start_drain(*drain, instance.clone(), Duration::from_millis(*timeout_ms)).await
                }
                (Request::Figures { route }, true) => {
                    let proxy = &self.running(0).proxy;
                    let backends = proxy.figures(route).await;
                    Ok(Reply::Figures { backends, route: proxy.route_figures(route).await })
                }
                (_, true) => self.handle(call.request, pid),
            };
            let ok = result.is_ok();
            let answer = wire::encode(&Answer { id: call.id, result });
            if write.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            if subscribe && ok {
                self.stream_events(pid, lines, write).await;
                return;
            }
        }
    }

    /// Out of rotation before the answer; the rest runs here to its end
    /// (or its timeout), whether or not the daemon that asked still lives,
    /// and is reported as [`Event::Drained`].
    async fn start_drain(&self, drain: u64, instance: InstanceId, timeout: Duration) -> Result<Reply, PlaneError> {
        let proxy = self.running(0).proxy.clone();
        let events = self.drained.clone();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        self.control.spawn(async move {
            // The drain's first (synchronous) part takes the backend out of
            // rotation when it is called.
            let fut = proxy.drain(&instance, timeout);
            let _ = started_tx.send(());
            let outcome = fut.await;
            tracing::debug!(%instance, ?outcome, "data plane: drain {drain} ended");
            let _ = events.send(Event::Drained { drain, instance, outcome });
        });
        match started.await {
            Ok(()) => Ok(Reply::Done),
            Err(_) => Err(PlaneError::Protocol { reason: "the data plane is stopping".into() }),
        }
    }

    fn handle(&self, request: Request, pid: i32) -> Result<Reply, PlaneError> {
        match request {
            Request::Hello { version, workers } => {
                if version != wire::VERSION {
                    tracing::error!("data plane: daemon {pid} speaks protocol {version}, not {}", wire::VERSION);
                    return Err(PlaneError::Version { plane: wire::VERSION, daemon: version });
                }
                self.running(workers);
                tracing::debug!("data plane: daemon {pid} connected");
                Ok(Reply::Hello { version: wire::VERSION, pid: std::process::id(), backends: self.backends() })
            }
            Request::Table => {
                let routes = self.running.get().map(|r| r.proxy.routes()).unwrap_or_default();
                Ok(Reply::Table { backends: self.backends(), routes })
            }
            Request::Add { route, backend, check, initial } => {
                let r = self.running(0);
                lock(&self.table).insert(backend.instance.clone(), (route.clone(), backend.clone(), check.clone()));
                r.proxy.add(&route, backend, check, initial);
                Ok(Reply::Done)
            }
            Request::Remove { instance } => {
                let r = self.running(0);
                r.proxy.remove(&instance);
                lock(&self.table).remove(&instance);
                Ok(Reply::Done)
            }
            Request::Drain { .. } => {
                Err(PlaneError::Protocol { reason: "a drain is started by the connection's loop".into() })
            }
            Request::Listen { spec, route } => {
                let r = self.running(0);
                r.ingress.listen(&spec, &route).map_err(plane_error)?;
                Ok(Reply::Done)
            }
            Request::Hosts { route, hosts, default } => {
                let r = self.running(0);
                r.ingress.set_hosts(&route, &hosts, default).map_err(plane_error)?;
                Ok(Reply::Done)
            }
            Request::RemoveRoute { route } => {
                if let Some(r) = self.running.get() {
                    r.ingress.remove_route(&route);
                }
                Ok(Reply::Done)
            }
            Request::Close => {
                if let Some(r) = self.running.get() {
                    r.ingress.close();
                }
                Ok(Reply::Done)
            }
            Request::Statics { app, live, route } => {
                let r = self.running(0);
                let route = route.unwrap_or_else(|| AppEnv::new(app, EnvironmentId::default_env()).route());
                r.statics.publish(&route, live.into_iter().map(Into::into).collect());
                Ok(Reply::Done)
            }
            Request::Maintenance { route, maintenance } => {
                let r = self.running(0);
                r.proxy.set_maintenance(&route, maintenance.as_ref());
                Ok(Reply::Done)
            }
            Request::Split { route, split } => {
                let r = self.running(0);
                r.proxy.set_split(&route, split.as_ref());
                Ok(Reply::Done)
            }
            Request::Figures { .. } => {
                Err(PlaneError::Protocol { reason: "figures are read by the connection's loop".into() })
            }
            Request::Subscribe => Ok(Reply::Done),
        }
    }

    /// Health changes and finished drains, as they happen, until the
    /// daemon closes its end. A subscriber that fell behind gets every
    /// backend's current health again.
    async fn stream_events(
        &self,
        pid: i32,
        mut lines: BufReader<tokio::net::unix::OwnedReadHalf>,
        mut write: tokio::net::unix::OwnedWriteHalf,
    ) {
        let Some(r) = self.running.get() else { return };
        let mut health = r.proxy.subscribe();
        let mut drained = self.drained.subscribe();
        let mut ignored = String::new();
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                n = read_line(&mut lines, &mut ignored) => {
                    // Nothing is expected: the daemon closed, or broke the protocol.
                    if !matches!(n, Ok(n) if n > 0) {
                        tracing::debug!("data plane: daemon {pid} disconnected");
                        return;
                    }
                    ignored.clear();
                    continue;
                }
                e = health.recv() => match e {
                    Ok(change) => vec![Event::Health { change }],
                    Err(broadcast::error::RecvError::Lagged(_)) => self
                        .backends()
                        .into_iter()
                        .map(|b| Event::Health {
                            change: nonstop_core::traffic::HealthEvent {
                                instance: b.backend.instance,
                                health: b.status.health,
                                detail: b.status.last_checks.last().cloned().unwrap_or_default(),
                                // What the cause was is not kept per backend.
                                cause: Default::default(),
                            },
                        })
                        .collect(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                e = drained.recv() => match e {
                    Ok(e) => vec![e],
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("data plane: daemon {pid} missed {n} drain outcome(s)");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            for e in event {
                if write.write_all(wire::encode(&e).as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// An ingress refusal as the protocol carries it.
fn plane_error(e: IngressError) -> PlaneError {
    match e {
        IngressError::Listen(addr, reason) => PlaneError::Listen { addr, reason },
        IngressError::Config(reason) | IngressError::Unavailable(reason) => PlaneError::Config { reason },
        IngressError::Hosts(refusal) => PlaneError::Hosts { refusal },
    }
}

/// One line of at most [`wire::MAX_LINE`] bytes (a longer one is an error).
pub(crate) async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut String,
) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut limited = reader.take(wire::MAX_LINE as u64 + 1);
    let n = limited.read_line(line).await?;
    if n > wire::MAX_LINE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long"));
    }
    Ok(n)
}
