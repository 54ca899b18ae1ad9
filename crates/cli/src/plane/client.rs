//! The daemon's side: [`PlaneClient`], the traffic layer, ingress and
//! static files of a daemon whose proxy runs in the data plane.
//!
//! Calls go over one blocking connection, one at a time, each answered
//! before the next is sent (so they apply in the order the engine made
//! them) and each bounded by [`CALL_TIMEOUT`]: the engine's calls on the
//! `Traffic` and `Ingress` traits are synchronous, and these are a local
//! round trip. A second connection carries the event stream: health
//! changes (kept in a mirror of the table for `status`, and passed on to
//! the engine) and finished drains. When it ends, the data plane is gone:
//! [`PlaneClient::lost`] fires and the daemon exits.
//!
//! From connecting until [`PlaneClient::finish_resync`] (called once the
//! engine has restored), backends the engine adds are collected, not sent;
//! then `resync::decide` says what to keep, add and remove.

use super::resync::{self, Action, Adopted};
use super::server::read_line;
use super::wire::{self, Answer, Call, Event, LiveRelease, PlaneBackend, PlaneError, Reply, Request};
use nonstop_core::process::HealthCheck;
use nonstop_core::traffic::{
    Backend, BackendFigures, BackendHealth, BackendStatus, DrainOutcome, HealthEvent, InitialHealth, RouteFigures,
    RouteKey, Split, Traffic,
};
use nonstop_core::{AppEnv, AppName, InstanceId};
use nonstop_engine::{Ingress, IngressError};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

/// The longest a call may take (binding and loading certificates
/// included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the mirror's in-flight counts and last checks are refreshed.
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// A drain's outcome is awaited this much longer than its timeout.
const DRAIN_MARGIN: Duration = Duration::from_secs(10);
/// Last checks kept per backend in the mirror between refreshes.
const LAST_CHECKS: usize = 5;

struct Conn {
    reader: std::io::BufReader<UnixStream>,
    writer: UnixStream,
}

struct Resync {
    adopted: Vec<Adopted>,
    touched: BTreeSet<InstanceId>,
    /// Routes the engine set up or took down meanwhile (listen, hosts,
    /// static files, maintenance, removal): the others the data plane
    /// holds belong to no environment that runs.
    routes: BTreeSet<RouteKey>,
}

pub struct PlaneClient {
    path: PathBuf,
    workers: usize,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
    /// The table as this daemon knows it: from the data plane at connect,
    /// then its own calls, health events and refreshes.
    mirror: Mutex<HashMap<InstanceId, BackendStatus>>,
    /// What the data plane held when this daemon connected.
    table: Mutex<HashMap<InstanceId, PlaneBackend>>,
    events: broadcast::Sender<HealthEvent>,
    drains: Mutex<HashMap<u64, oneshot::Sender<DrainOutcome>>>,
    resync: Mutex<Option<Resync>>,
    lost: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unreachable(path: &Path, e: impl std::fmt::Display) -> PlaneError {
    PlaneError::Unreachable { reason: format!("{}: {e}", path.display()) }
}

/// A blocking connection that has said hello: the data plane's pid and table.
fn open(path: &Path, workers: usize) -> Result<(Conn, u32, Vec<PlaneBackend>), PlaneError> {
    let stream = UnixStream::connect(path).map_err(|e| unreachable(path, e))?;
    stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| unreachable(path, e))?;
    stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(|e| unreachable(path, e))?;
    let writer = stream.try_clone().map_err(|e| unreachable(path, e))?;
    let mut conn = Conn { reader: std::io::BufReader::new(stream), writer };
    match exchange(path, &mut conn, 0, Request::Hello { version: wire::VERSION, workers })? {
        Reply::Hello { pid, backends, .. } => Ok((conn, pid, backends)),
        other => Err(PlaneError::Protocol { reason: format!("a hello answered with {other:?}") }),
    }
}

fn exchange(path: &Path, conn: &mut Conn, id: u64, request: Request) -> Result<Reply, PlaneError> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    conn.writer.write_all(wire::encode(&Call { id, request }).as_bytes()).map_err(|e| unreachable(path, e))?;
    loop {
        let mut line = String::new();
        let n = (&mut conn.reader)
            .take(wire::MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .map_err(|e| unreachable(path, format!("no answer within {}s ({e})", CALL_TIMEOUT.as_secs())))?;
        if n == 0 {
            return Err(unreachable(path, "it closed the connection"));
        }
        let answer: Answer = wire::decode(&line)?;
        if answer.id == id {
            return answer.result;
        }
        // A line the data plane could not read is answered with id 0,
        // then it closes: that error is this call's.
        if answer.id == 0 {
            if let Err(e @ PlaneError::Protocol { .. }) = answer.result {
                return Err(e);
            }
        }
        // The answer to a call that timed out before: skip it.
        if Instant::now() > deadline {
            return Err(unreachable(path, format!("no answer within {}s", CALL_TIMEOUT.as_secs())));
        }
    }
}

impl PlaneClient {
    /// Connect to the data plane at `path` (`workers`: the proxy's worker
    /// threads, if this daemon is the first): subscribe to its events, read
    /// its table, and start collecting the engine's adoptions.
    /// Its background tasks (the event stream, the refresh) end with
    /// `shutdown`.
    pub async fn connect(
        path: &Path,
        workers: usize,
        shutdown: CancellationToken,
    ) -> Result<Arc<PlaneClient>, PlaneError> {
        // The event stream first, so that nothing happens unseen after the
        // table is read.
        let stream = tokio::time::timeout(CALL_TIMEOUT, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| unreachable(path, "connecting timed out"))?
            .map_err(|e| unreachable(path, e))?;
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        for (id, request) in [(0, Request::Hello { version: wire::VERSION, workers }), (1, Request::Subscribe)] {
            write.write_all(wire::encode(&Call { id, request }).as_bytes()).await.map_err(|e| unreachable(path, e))?;
            let mut line = String::new();
            let n = tokio::time::timeout(CALL_TIMEOUT, read_line(&mut read, &mut line))
                .await
                .map_err(|_| unreachable(path, "no answer"))?
                .map_err(|e| unreachable(path, e))?;
            if n == 0 {
                return Err(unreachable(path, "it closed the connection"));
            }
            wire::decode::<Answer>(&line)?.result?;
        }
        let p = path.to_path_buf();
        let (conn, plane_pid, backends) =
            tokio::task::spawn_blocking(move || open(&p, workers)).await.map_err(|e| unreachable(path, e))??;
        let client = Arc::new(PlaneClient {
            path: path.to_path_buf(),
            workers,
            conn: Mutex::new(Some(conn)),
            next_id: AtomicU64::new(1),
            mirror: Mutex::new(backends.iter().map(|b| (b.backend.instance.clone(), b.status.clone())).collect()),
            table: Mutex::new(backends.into_iter().map(|b| (b.backend.instance.clone(), b)).collect()),
            events: broadcast::channel(1024).0,
            drains: Mutex::new(HashMap::new()),
            resync: Mutex::new(Some(Resync { adopted: Vec::new(), touched: BTreeSet::new(), routes: BTreeSet::new() })),
            lost: CancellationToken::new(),
        });
        tracing::info!(
            "connected to the data plane (pid {plane_pid}) holding {} backend(s)",
            lock(&client.table).len()
        );
        let stop = shutdown.clone();
        let c = Arc::clone(&client);
        tokio::spawn(async move {
            // The write half stays open as long as the stream is read:
            // closing it ends the subscription.
            let _write = write;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = c.read_events(read) => {}
            }
            // Whatever waits for a drain: it ended unseen.
            lock(&c.drains).clear();
            c.lost.cancel();
        });
        let c = Arc::clone(&client);
        tokio::spawn(async move { c.refresh_loop(stop).await });
        Ok(client)
    }

    /// Fires when the data plane is gone.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn read_events(&self, mut read: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>) {
        let mut line = String::new();
        loop {
            line.clear();
            match read_line(&mut read, &mut line).await {
                Ok(0) => {
                    tracing::error!("the data plane closed its event stream");
                    return;
                }
                Err(e) => {
                    tracing::error!("the data plane's event stream failed: {e}");
                    return;
                }
                Ok(_) => {}
            }
            match wire::decode::<Event>(&line) {
                Ok(Event::Health { change }) => self.on_health(change),
                Ok(Event::Drained { drain, instance, outcome }) => {
                    lock(&self.mirror).remove(&instance);
                    if let Some(tx) = lock(&self.drains).remove(&drain) {
                        let _ = tx.send(outcome);
                    }
                }
                Err(e) => tracing::warn!("data plane event: {e}"),
            }
        }
    }

    fn on_health(&self, change: HealthEvent) {
        if let Some(st) = lock(&self.mirror).get_mut(&change.instance) {
            st.health = change.health;
            if !change.detail.is_empty() {
                st.last_checks.push(change.detail.clone());
                let excess = st.last_checks.len().saturating_sub(LAST_CHECKS);
                st.last_checks.drain(..excess);
            }
        }
        let _ = self.events.send(change);
    }

    /// In-flight counts and last checks, for `status` (health comes from
    /// the events, in order).
    async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.lost.cancelled() => return,
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            let c = Arc::clone(&self);
            let Ok(Ok((backends, _))) = tokio::task::spawn_blocking(move || c.table_now()).await else { continue };
            let mut mirror = lock(&self.mirror);
            for b in backends {
                if let Some(st) = mirror.get_mut(&b.backend.instance) {
                    st.in_flight = b.status.in_flight;
                    st.last_checks = b.status.last_checks;
                }
            }
        }
    }

    fn table_now(&self) -> Result<(Vec<PlaneBackend>, Vec<RouteKey>), PlaneError> {
        match self.call(Request::Table)? {
            Reply::Table { backends, routes } => Ok((backends, routes)),
            other => Err(PlaneError::Protocol { reason: format!("a table call answered with {other:?}") }),
        }
    }

    /// One call, answered (reconnecting if the last one broke).
    fn call(&self, request: Request) -> Result<Reply, PlaneError> {
        let mut slot = lock(&self.conn);
        if slot.is_none() {
            *slot = Some(open(&self.path, self.workers)?.0);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = slot.as_mut().expect("connected above");
        let r = exchange(&self.path, conn, id, request);
        if matches!(r, Err(PlaneError::Unreachable { .. } | PlaneError::Protocol { .. })) {
            *slot = None;
        }
        r
    }

    fn call_logged(&self, what: &str, request: Request) {
        if let Err(e) = self.call(request) {
            tracing::error!("data plane: {what}: {e}");
        }
    }

    /// The engine has restored: keep, add and remove backends so that the
    /// data plane holds what the engine adopted (see `resync.rs`).
    pub fn finish_resync(&self) {
        let Some(Resync { adopted, touched, routes: claimed }) = lock(&self.resync).take() else { return };
        let (table, routes) = match self.table_now() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("data plane: cannot read the table to resync ({e}); adding every adopted backend");
                (Vec::new(), Vec::new())
            }
        };
        // A route no restored environment claimed (its environment was
        // brought down or destroyed while no daemon could tell the data
        // plane): its hosts would answer 503 and refuse to another
        // environment, its static files would stay loaded.
        for route in routes.into_iter().filter(|r| !claimed.contains(r)) {
            tracing::info!(route = %route.0, "data plane: releasing a route no environment runs on");
            self.remove_route(&route);
            let app = AppName::new(route.0.split('/').next().unwrap_or_default()).ok();
            if let Some(app) = app {
                self.call_logged(
                    "static files",
                    Request::Statics { app, live: Vec::new(), route: Some(route.clone()) },
                );
            }
            self.call_logged("maintenance", Request::Maintenance { route, maintenance: None });
        }
        let actions = resync::decide(&table, &adopted, &touched);
        let (mut kept, mut added, mut removed) = (0, 0, 0);
        for action in actions {
            match action {
                Action::Keep { instance, health } => {
                    kept += 1;
                    if let Some(b) = table.iter().find(|b| b.backend.instance == instance) {
                        lock(&self.mirror).insert(instance.clone(), b.status.clone());
                    }
                    // The engine learns the health the data plane knows.
                    if health != BackendHealth::Pending {
                        let detail = format!("{} in the data plane when this daemon started", health.as_str());
                        let _ = self.events.send(HealthEvent { instance, health, detail, cause: Default::default() });
                    }
                }
                Action::Add(a) => {
                    added += 1;
                    self.send_add(a.route, a.backend, a.check, a.initial);
                }
                Action::Remove(instance) => {
                    removed += 1;
                    tracing::info!(%instance, "data plane: removing the backend of an instance that is gone");
                    lock(&self.mirror).remove(&instance);
                    self.call_logged("remove", Request::Remove { instance });
                }
            }
        }
        tracing::info!("resynced with the data plane: {kept} backend(s) kept, {added} added, {removed} removed");
    }

    /// The backends' and the route's figures, in one call. Empty (and
    /// logged) when the data plane cannot say.
    fn figures_now(&self, route: &RouteKey) -> (Vec<BackendFigures>, RouteFigures) {
        match self.call(Request::Figures { route: route.clone() }) {
            Ok(Reply::Figures { backends, route }) => (backends, route),
            Ok(other) => {
                tracing::error!("data plane: a figures call answered with {other:?}");
                Default::default()
            }
            Err(e) => {
                tracing::error!("data plane: figures: {}", e.too_old("figures"));
                Default::default()
            }
        }
    }

    /// While resyncing: the engine set `route` up (or took it down).
    fn claimed(&self, route: &RouteKey) {
        if let Some(r) = lock(&self.resync).as_mut() {
            r.routes.insert(route.clone());
        }
    }

    fn send_add(&self, route: RouteKey, backend: Backend, check: HealthCheck, initial: InitialHealth) {
        let health = match initial {
            InitialHealth::Pending => BackendHealth::Pending,
            InitialHealth::AssumeHealthy => BackendHealth::Healthy,
        };
        lock(&self.mirror).insert(
            backend.instance.clone(),
            BackendStatus {
                instance: backend.instance.clone(),
                addr: backend.addr,
                health,
                in_flight: 0,
                last_checks: Vec::new(),
            },
        );
        self.call_logged("add", Request::Add { route, backend, check, initial });
    }

    /// Drain: out of rotation now (in the data plane), the outcome later.
    pub fn drain_remote(
        &self,
        instance: &InstanceId,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = DrainOutcome> + Send>> {
        if let Some(r) = lock(&self.resync).as_mut() {
            r.adopted.retain(|a| &a.backend.instance != instance);
            r.touched.insert(instance.clone());
        }
        let drain = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        lock(&self.drains).insert(drain, tx);
        if let Some(st) = lock(&self.mirror).get_mut(instance) {
            st.health = BackendHealth::Draining;
        }
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if let Err(e) = self.call(Request::Drain { drain, instance: instance.clone(), timeout_ms }) {
            tracing::error!(%instance, "data plane: drain: {e}");
            lock(&self.drains).remove(&drain);
            return Box::pin(std::future::ready(DrainOutcome::Unknown));
        }
        let instance = instance.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout + DRAIN_MARGIN, rx).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => {
                    tracing::error!(%instance, "the data plane went away during the drain");
                    DrainOutcome::Unknown
                }
                Err(_) => {
                    tracing::error!(%instance, "the data plane did not report the end of the drain");
                    DrainOutcome::Unknown
                }
            }
        })
    }

    pub fn publish_statics(&self, scope: &AppEnv, live: Vec<nonstop_engine::LiveStatics>) {
        let live: Vec<LiveRelease> = live.into_iter().map(Into::into).collect();
        self.claimed(&scope.route());
        let (app, route) = (scope.app.clone(), Some(scope.route()));
        self.call_logged("static files", Request::Statics { app, live, route });
    }
}

impl Traffic for PlaneClient {
    fn add(&self, route: &RouteKey, backend: Backend, check: HealthCheck, initial: InitialHealth) {
        {
            let mut resync = lock(&self.resync);
            if let Some(r) = resync.as_mut() {
                // Decided with the table once the engine has restored.
                if let Some(b) = lock(&self.table).get(&backend.instance) {
                    lock(&self.mirror).insert(backend.instance.clone(), b.status.clone());
                }
                r.touched.remove(&backend.instance);
                r.adopted.push(Adopted { route: route.clone(), backend, check, initial });
                return;
            }
        }
        self.send_add(route.clone(), backend, check, initial);
    }

    fn drain(
        &self,
        instance: &InstanceId,
        timeout: Duration,
    ) -> impl std::future::Future<Output = DrainOutcome> + Send {
        self.drain_remote(instance, timeout)
    }

    fn set_maintenance(&self, route: &RouteKey, maintenance: Option<&nonstop_core::maintenance::Maintenance>) {
        self.claimed(route);
        let request = Request::Maintenance { route: route.clone(), maintenance: maintenance.cloned() };
        self.call_logged("maintenance", request);
    }

    fn set_split(&self, route: &RouteKey, split: Option<&Split>) {
        let request = Request::Split { route: route.clone(), split: split.cloned() };
        if let Err(e) = self.call(request) {
            tracing::error!("data plane: split: {}", e.too_old("split"));
        }
    }

    /// A local round trip made at the call, as the other calls are; the
    /// future is ready. Empty (and logged) when the data plane cannot say.
    fn figures(&self, route: &RouteKey) -> impl std::future::Future<Output = Vec<BackendFigures>> + Send {
        std::future::ready(self.figures_now(route).0)
    }

    fn route_figures(&self, route: &RouteKey) -> impl std::future::Future<Output = RouteFigures> + Send {
        std::future::ready(self.figures_now(route).1)
    }

    fn remove(&self, instance: &InstanceId) {
        if let Some(r) = lock(&self.resync).as_mut() {
            r.adopted.retain(|a| &a.backend.instance != instance);
            r.touched.insert(instance.clone());
        }
        lock(&self.mirror).remove(instance);
        self.call_logged("remove", Request::Remove { instance: instance.clone() });
    }

    fn status(&self, instance: &InstanceId) -> Option<BackendStatus> {
        lock(&self.mirror).get(instance).cloned()
    }

    fn subscribe(&self) -> broadcast::Receiver<HealthEvent> {
        self.events.subscribe()
    }
}

impl Ingress for PlaneClient {
    fn listen(&self, spec: &nonstop_core::process::ProxySpec, route: &RouteKey) -> Result<(), IngressError> {
        self.claimed(route);
        match self.call(Request::Listen { spec: Box::new(spec.clone()), route: route.clone() }) {
            Ok(_) => Ok(()),
            Err(PlaneError::Listen { addr, reason }) => Err(IngressError::Listen(addr, reason)),
            Err(PlaneError::Config { reason }) => Err(IngressError::Config(reason)),
            Err(e) => Err(IngressError::Config(e.to_string())),
        }
    }

    fn set_hosts(&self, route: &RouteKey, hosts: &[String], default: bool) -> Result<(), IngressError> {
        self.claimed(route);
        match self.call(Request::Hosts { route: route.clone(), hosts: hosts.to_vec(), default }) {
            Ok(_) => Ok(()),
            Err(PlaneError::Hosts { refusal }) => Err(IngressError::Hosts(refusal)),
            Err(e) => Err(IngressError::Unavailable(e.too_old("hosts").to_string())),
        }
    }

    fn remove_route(&self, route: &RouteKey) {
        self.claimed(route);
        if let Err(e) = self.call(Request::RemoveRoute { route: route.clone() }) {
            tracing::error!(route = %route.0, "data plane: remove route: {}", e.too_old("remove_route"));
        }
    }

    fn close(&self) {
        self.call_logged("close", Request::Close);
    }
}
