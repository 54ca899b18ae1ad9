//! nonstop's reverse proxy and load balancer: the local implementation of
//! [`Traffic`].
//!
//! # Shape
//! - The control plane ([`Traffic::add`], [`Traffic::drain`],
//!   [`Proxy::set_hosts`], ...) edits a registry under a mutex and publishes
//!   an immutable route snapshot through one `ArcSwap`.
//! - Clients are served by the proxy's own worker threads, one
//!   single-threaded runtime each (see `workers.rs`); a connection and the
//!   upstream connections it uses stay on one thread. Workers share the
//!   listening socket and balance accepts by open connections
//!   (`accept.rs`); client sockets join the worker's epoll set only when
//!   they have to wait (`lazy.rs`); the writes a batch of events causes go
//!   out together (`workers::batch_end`).
//! - The request path loads the snapshot (no lock), takes the route's
//!   next Healthy backend in round-robin order unless it has more than
//!   twice the requests in flight of the least loaded one (then that one;
//!   atomics, see `table::round_robin_fits`), takes an idle upstream connection
//!   from that backend's pool (a push/pop under the worker's own share of
//!   it) or opens one, and speaks HTTP/1 to the instance itself from the
//!   client connection's task (see `upstream.rs`; hyper serves the
//!   clients), streaming both bodies through.
//! - A request's route is chosen by its `Host` in the snapshot
//!   (`hosts.rs`: an exact name beats a wildcard, the longest wildcard
//!   wins, case and port are ignored; no allocation). Each route claims
//!   its hosts and at most one is the default ([`Proxy::set_hosts`],
//!   [`Proxy::remove_route`]; the rules are `nonstop_core::ingress`'s);
//!   a host no route claims, with no default, gets the proxy's own `404`
//!   naming it, before maintenance and static files.
//! - A route in maintenance ([`Proxy::set_maintenance`]) answers every
//!   request with its page (503, `Retry-After`) before static files and
//!   routing, except for allowed client addresses; its gate is part of the
//!   route snapshot, and a request looks for it only while some route is in
//!   maintenance (one atomic load otherwise; see `maintenance.rs`).
//! - One checker task per backend runs the active health checks; requests
//!   report refused connections (passive checks). Health has hysteresis and
//!   every change is broadcast as a [`HealthEvent`].
//! - A route's traffic split ([`Traffic::set_split`], a canary's share) is
//!   part of its snapshot: two groups with their own round-robin cursors
//!   and a request counter that spreads the share evenly (`table.rs`).
//!   Every answer of a backend is counted on it (relaxed atomics: its
//!   latency bucket, a 5xx, its 5xx streak; [`Traffic::figures`]); a
//!   backend answering nothing but 5xx while its peers answer well is
//!   ejected as an outlier for a while (`outlier.rs`).
//!
//! # Invariants
//! - A request is counted in flight *before* its backend's health is checked
//!   and a drain marks the backend Draining *before* it reads the count: no
//!   request reaches a draining backend, and a drain never misses one.
//! - A request body is read whole before an instance is chosen (in memory
//!   up to `body_memory_bytes`, then in an unlinked temporary file; see
//!   `spool.rs`), so a slow client never holds an app worker, and is sent
//!   with a `Content-Length`; except on `unbuffered_paths`, where only an
//!   idempotent request body of at most `retry_body_limit` bytes is
//!   buffered (so that it can be retried, see `forward.rs`) and the rest
//!   streams. Responses are never buffered.
//! - Every task (checkers, client connections, upgraded tunnels and their
//!   upstream connections) stops on a cancellation token and is tracked;
//!   the worker threads stop when the proxy is dropped.
//!
//! [`Traffic::add`] starts its checker on the current tokio runtime, or on
//! the one [`Proxy::new`] ran in.
//!
//! # Clients
//! Client connections are limited in all (`max_connections`, by default
//! derived from the file descriptor limit, keeping a reserve for the
//! daemon) and per client address (`max_connections_per_client`); beyond
//! either, and when `accept` finds no descriptor left, a new connection is
//! closed at once, with one log line per interval (`limits.rs`). A health
//! check or an upstream connection that fails for want of a descriptor
//! is not held against the instance (`health::Verdict::Inconclusive`,
//! `ErrorKind::LocalExhaustion`, answered 503). An HTTP/1.0 request
//! without `Host` reaches its instance with the `Host` of its health
//! checks.
//!
//! [`Proxy::serve`] speaks HTTP/1.1 and h2c (prior knowledge);
//! [`Proxy::serve_tls`] terminates TLS (rustls, certificates by SNI from
//! PEM files, reloaded when they change: see `tls.rs`) and speaks HTTP/1.1
//! or h2 by ALPN. Instances always get HTTP/1.1, with
//! `X-Forwarded-Proto` saying how the client came.
//!
//! What an instance answers reaches the client as written, except: hop-by-
//! hop headers (removed); interim answers (`100 Continue`, `103 Early
//! Hints`: skipped, the final answer follows; hyper's server cannot send
//! them); trailers of a chunked body (read and dropped). A reason phrase
//! other than the canonical one ("200 Okay") is passed on to HTTP/1
//! clients.
//!
//! # Hostile input
//! hyper's HTTP/1 parser already refuses (and closes the connection):
//! malformed request lines, methods and versions; header names and values
//! with invalid bytes (spaces before the colon, control characters, bare
//! CR); obsolete line folding; invalid or conflicting `Content-Length`;
//! `Transfer-Encoding` whose last coding is not `chunked`, or in HTTP/1.0;
//! invalid chunk sizes (mid-body, which aborts the upstream request); heads
//! larger than `max_header_bytes` or with more than `max_headers` fields
//! (431). What it lets through, the proxy refuses before anything is sent
//! upstream (`forward::check_request`): `Content-Length` with
//! `Transfer-Encoding` and repeated equal `Content-Length` (found by a
//! scan of the raw head in `server.rs`, since hyper merges them), codings
//! other than a lone `chunked` (501), a missing `Host` in HTTP/1.1 or two
//! of them, an absolute-form target naming another host than `Host`,
//! `CONNECT` (405), a `Host` (or absolute-form authority) that is not
//! `host[:port]` by RFC 9110 §7.2 (400, as nginx: no path, user info,
//! spaces, empty labels, or port above 65535; `headers::valid_host`),
//! targets longer than `max_request_line` (414), bodies
//! announced larger than `max_body_bytes` (413). Every refusal logs one
//! line with the client's address and the reason, and closes an HTTP/1
//! connection. Bodies are counted (413 past the limit, or as soon as a
//! chunk declares a size past it) and timed (408 after `body_timeout`
//! without progress, or below `min_upload_rate` over `upload_rate_window`:
//! `rate.rs`; those log lines are limited to 10 a second); for a streamed
//! body either aborts the upstream request. An upstream that breaks mid-response makes the client
//! connection close before the declared length, or without the last
//! chunk; a client that leaves drops its upstream exchange (the upstream
//! connection is closed, never pooled).
// Three `unsafe` blocks in the crate: registering the owned listening
// socket with tokio (`accept.rs`), which tokio marks unsafe for fds it
// cannot know are owned; setting `TCP_DEFER_ACCEPT` on it (`accept.rs`),
// which no socket crate of ours wraps; and telling tokio's `ReadBuf` how
// many bytes a direct `recv(2)` into uninitialised memory filled
// (`sockio.rs`).
#![deny(unsafe_code)]

mod accept;
mod backend;
mod body;
mod config;
mod deadline;
mod error;
mod forward;
mod headers;
mod health;
mod hosts;
mod lazy;
mod limits;
mod maintenance;
mod outlier;
mod rate;
mod server;
mod sockio;
mod spool;
mod static_index;
mod statics;
mod table;
mod tls;
mod upstream;
mod workers;

pub use body::ProxyBody;
pub use config::*;
pub use error::{ErrorKind, ProxyError, Retry, Side};
pub use limits::{derived_max_connections, is_local_exhaustion, soft_fd_limit, FD_RESERVE_MIN};
pub use outlier::MAX_EJECTION as MAX_OUTLIER_EJECTION;
pub use static_index::{
    is_hashed_name, FileEntry, MountIndex, StaticIndex, StaticIndexError, Variant, STATIC_INDEX_DIR,
};
pub use statics::{StaticRelease, STATIC_CACHE_FILE_MAX, STATIC_CACHE_RELEASE_MAX};
pub use tls::{CertStatus, TlsCert, TlsError, TlsSettings, TlsStatus, DEFAULT_TLS_RELOAD_INTERVAL};

use arc_swap::{ArcSwap, ArcSwapOption};
use backend::{BackendState, Pool};
use health::Shared;
use nonstop_core::ids::InstanceId;
use nonstop_core::ingress::{HostClaims, HostsError};
use nonstop_core::process::HealthCheck;
use nonstop_core::traffic::{
    Backend, BackendFigures, BackendHealth, BackendStatus, DrainOutcome, HealthEvent, InitialHealth, RouteFigures,
    RouteKey, Split, Traffic,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use table::{Entry, Registry, Snapshot};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The proxy. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Read once per accepted connection (and when a backend is added).
    pub config: ArcSwap<ProxyConfig>,
    /// Certificates for TLS listeners, if configured.
    pub tls: ArcSwapOption<tls::TlsState>,
    /// Whether plain-HTTP requests may be redirected to HTTPS (`tls` is set
    /// and asks for it): one relaxed load per plain request otherwise.
    pub redirect_http: AtomicBool,
    pub table: ArcSwap<Snapshot>,
    /// Some route is in maintenance (`maintenance.rs`): set after the
    /// snapshot that says which, so the request path looks only then.
    pub maintenance_on: AtomicBool,
    registry: Mutex<Registry>,
    pub shared: Arc<Shared>,
    /// Held while an outlier is judged (`outlier.rs`): one at a time.
    pub outliers: Mutex<()>,
    /// Parent of every backend's token; cancelled by [`Proxy::close`].
    pub root: CancellationToken,
    /// Checkers, TLS reloads, and the connections to instances that switched
    /// protocols (upgrades).
    pub tasks: TaskTracker,
    /// The runtime `new` ran in, for `add` called from outside one.
    runtime: Option<tokio::runtime::Handle>,
    /// How many worker threads serve clients (`ProxyConfig::workers` when
    /// the proxy was made).
    worker_count: usize,
    /// Started with the first listener; stopped when this is dropped.
    workers: Mutex<Option<workers::Workers>>,
    /// `config.max_connections`, or the limit derived from the file
    /// descriptor limit when the configuration was set (`limits.rs`).
    pub max_connections: std::sync::atomic::AtomicUsize,
    /// Refused client connections, for the rate-limited log line.
    pub refusals: limits::RefusalLog,
    /// Whether `limits::report_loop` was started (with the first listener).
    pub reporting: AtomicBool,
}

impl Inner {
    /// The worker threads' runtimes, started on first use.
    /// With them, every worker's count of open client connections.
    pub(crate) fn worker_handles(&self) -> std::io::Result<(Vec<tokio::runtime::Handle>, Arc<accept::Loads>)> {
        let mut slot = self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let workers = match &mut *slot {
            Some(workers) => workers,
            empty => empty.insert(workers::Workers::start(self.worker_count)?),
        };
        Ok((workers.handles().to_vec(), Arc::clone(workers.loads())))
    }
}

impl Inner {
    /// `max_connections` and `max_connections_per_client` now, for log
    /// lines.
    pub(crate) fn limits(&self) -> (usize, u32) {
        self.admission(&self.config.load()).limits()
    }

    /// The limits a new connection is admitted under with `config`.
    pub(crate) fn admission(&self, config: &config::ProxyConfig) -> accept::Admission {
        accept::Admission {
            max_total: self.max_connections.load(Ordering::Relaxed),
            per_client: config.max_connections_per_client,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Self {
        let worker_count = workers::resolve(config.workers);
        Self {
            inner: Arc::new(Inner {
                worker_count,
                workers: Mutex::new(None),
                max_connections: std::sync::atomic::AtomicUsize::new(resolve_max_connections(&config)),
                refusals: limits::RefusalLog::new(),
                reporting: AtomicBool::new(false),
                config: ArcSwap::from_pointee(config),
                tls: ArcSwapOption::empty(),
                redirect_http: AtomicBool::new(false),
                table: ArcSwap::from_pointee(Snapshot::default()),
                maintenance_on: AtomicBool::new(false),
                registry: Mutex::new(Registry::default()),
                shared: Arc::new(Shared::new()),
                outliers: Mutex::new(()),
                root: CancellationToken::new(),
                tasks: TaskTracker::new(),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Open client connections per worker thread, in worker order (empty
    /// until the first listener started the workers).
    pub fn connections_per_worker(&self) -> Vec<usize> {
        let workers = self.inner.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        workers.as_ref().map(|w| w.loads().snapshot()).unwrap_or_default()
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.inner.config.load_full()
    }

    /// Replace the configuration (limits, timeouts). Applies to client
    /// connections accepted from now on and to backends added from now on;
    /// open connections keep the one they started with.
    pub fn set_config(&self, config: ProxyConfig) -> Result<(), ConfigError> {
        config.validate()?;
        self.inner.max_connections.store(resolve_max_connections(&config), Ordering::Relaxed);
        self.inner.config.store(Arc::new(config));
        Ok(())
    }

    /// The most client connections open at once: `max_connections`, or
    /// the limit derived from the file descriptor limit when the
    /// configuration was set.
    pub fn max_connections(&self) -> usize {
        self.inner.max_connections.load(Ordering::Relaxed)
    }

    /// Load the certificates of `settings` and serve them on every TLS
    /// listener ([`Proxy::serve_tls`]) from the next handshake on; watch
    /// their files and reload a pair when its files change (a pair that
    /// fails to load then keeps its previous certificate, and the failure
    /// is logged and shown by [`Proxy::tls_status`]). Replaces any previous
    /// TLS configuration. On error (naming the file and the problem)
    /// nothing changes. Reads files: call it outside the hot path.
    pub fn configure_tls(&self, settings: &TlsSettings) -> Result<(), TlsError> {
        let state = Arc::new(tls::TlsState::load(settings, self.inner.root.child_token())?);
        self.inner.redirect_http.store(state.redirects(), Ordering::Relaxed);
        if let Some(old) = self.inner.tls.swap(Some(Arc::clone(&state))) {
            old.token.cancel();
        }
        let hosts: Vec<&str> = settings.certs.iter().flat_map(|c| c.hosts.iter().map(String::as_str)).collect();
        tracing::info!(?hosts, redirect_http = settings.redirect_http, "TLS certificates loaded");
        let reloader = tls::reload_loop(state, settings.reload_interval);
        match tokio::runtime::Handle::try_current().ok().or_else(|| self.inner.runtime.clone()) {
            Some(handle) => {
                self.inner.tasks.spawn_on(reloader, &handle);
            }
            None => tracing::error!("no tokio runtime: TLS certificates are never reloaded"),
        }
        Ok(())
    }

    /// Stop serving TLS (handshakes on TLS listeners fail) and redirecting.
    pub fn clear_tls(&self) {
        self.inner.redirect_http.store(false, Ordering::Relaxed);
        if let Some(old) = self.inner.tls.swap(None) {
            old.token.cancel();
        }
    }

    /// The configured certificates, their reload counts and last errors.
    pub fn tls_status(&self) -> Option<TlsStatus> {
        self.inner.tls.load().as_ref().map(|t| t.status())
    }

    /// Serve HTTPS on `listener` with the certificates of
    /// [`Proxy::configure_tls`] (HTTP/1.1 or h2 by ALPN), otherwise as
    /// [`Proxy::serve`]. Connections that arrive while no certificate is
    /// configured are closed. Requests reach instances with
    /// `X-Forwarded-Proto: https`.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        server::serve(Arc::clone(&self.inner), listener, shutdown, server::Mode::Tls).await
    }

    /// Serve HTTP/1.1 and h2c (HTTP/2 with prior knowledge) clients on
    /// `listener` until `shutdown` is cancelled.
    /// Then stop accepting, let requests in flight (and upgraded
    /// connections) finish within `shutdown_grace`, close the rest and
    /// return. Several `serve` calls may run at once (e.g. while the
    /// listener moves to a new address); routes, backends and health
    /// checks belong to the `Proxy`, not to a listener, and keep running:
    /// stop them with [`Proxy::close`] (or by dropping every clone).
    pub async fn serve(&self, listener: tokio::net::TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        server::serve(Arc::clone(&self.inner), listener, shutdown, server::Mode::Plain).await
    }

    /// Stop every health checker, close idle upstream connections and wait
    /// (up to 5 s) for those tasks to end. Backends added afterwards are
    /// never checked, so never enter rotation unless `AssumeHealthy`.
    /// Dropping the last clone of the proxy also stops the checkers (without
    /// waiting).
    pub async fn close(&self) {
        self.inner.root.cancel();
        for entry in self.registry().backends.values() {
            entry.state.pool.clear();
        }
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await.is_err() {
            tracing::warn!("proxy tasks still running 5s after close");
        }
    }

    /// Requests for hosts no route claims go to `route` while it has no
    /// hosts set ([`Proxy::set_hosts`]) and no route claimed the default:
    /// what `Ingress::listen` gives (one app, every host).
    pub fn set_default_route(&self, route: RouteKey) {
        let mut reg = self.registry();
        reg.claims.set_fallback(Some(route));
        self.publish(&reg);
    }

    /// Route requests for `hosts` to `route` (replacing its previous
    /// hosts), and, with `default`, every host no route claims. Matching
    /// ignores case, port and a trailing dot; an exact name beats a
    /// wildcard, and `*.example.com` matches any host below `example.com`
    /// (the longest matching wildcard wins). A host another route claims,
    /// a second default, or an invalid host is refused, naming the other
    /// route, and nothing changes. Without any default, a host no route
    /// claims is answered `404` by the proxy.
    pub fn set_hosts(&self, route: &RouteKey, hosts: &[String], default: bool) -> Result<(), HostsError> {
        let mut reg = self.registry();
        reg.claims.set(route, hosts, default)?;
        let claimed = reg.claims.get(route).map(|c| c.hosts.clone()).unwrap_or_default();
        self.publish(&reg);
        drop(reg);
        tracing::info!(route = %route.0, hosts = ?claimed, default, "route hosts set");
        Ok(())
    }

    /// Release `route`'s hosts and default claim (and its place as the
    /// default from [`Proxy::set_default_route`]). Its backends stay until
    /// they are removed.
    pub fn remove_route(&self, route: &RouteKey) {
        let mut reg = self.registry();
        if reg.claims.remove(route) {
            self.publish(&reg);
            drop(reg);
            tracing::info!(route = %route.0, "route hosts released");
        }
    }

    /// Every route that claims hosts, is the default, or has static files
    /// or maintenance set: what a restarted daemon compares with the
    /// environments it restored (a route none of them claims is stale).
    pub fn routes(&self) -> Vec<RouteKey> {
        let reg = self.registry();
        let mut routes: Vec<RouteKey> = reg
            .claims
            .route_keys()
            .chain(reg.claims.default_route())
            .chain(reg.statics.keys())
            .chain(reg.maintenance.keys())
            .cloned()
            .collect();
        routes.sort();
        routes.dedup();
        routes
    }

    /// Which route claims which host, and the default, as set now.
    pub fn host_claims(&self) -> HostClaims {
        self.registry().claims.clone()
    }

    /// Every known backend, by instance.
    pub fn backends(&self) -> Vec<BackendStatus> {
        let mut all: Vec<BackendStatus> = self.registry().backends.values().map(|e| e.state.status()).collect();
        all.sort_by(|a, b| a.instance.cmp(&b.instance));
        all
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.inner.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Swap in a new snapshot of `reg` (called with the registry locked, so
    /// snapshots are published in order) and wake requests waiting for a
    /// backend.
    fn publish(&self, reg: &Registry) {
        self.inner.table.store(Arc::new(reg.snapshot()));
        self.inner.shared.changed.notify_waiters();
    }

    /// Forget `state` if it is still the registered backend of `instance`.
    fn forget(&self, instance: &InstanceId, state: &Arc<BackendState>) {
        let mut reg = self.registry();
        if reg.backends.get(instance).is_some_and(|e| Arc::ptr_eq(&e.state, state)) {
            reg.backends.remove(instance);
            self.publish(&reg);
        }
        drop(reg);
        state.token.cancel();
        state.pool.clear();
    }
}

/// `config.max_connections`, else derived from the soft `RLIMIT_NOFILE`;
/// a configured value above what the descriptors allow is kept, with a
/// warning (what the reserve cannot absorb is then refused by `accept`
/// failing, see `limits.rs`).
fn resolve_max_connections(config: &ProxyConfig) -> usize {
    let fds = limits::soft_fd_limit();
    let derived = limits::derived_max_connections(fds);
    match config.max_connections {
        None => derived,
        Some(set) => {
            if set > derived {
                tracing::warn!(
                    max_connections = set,
                    fd_limit = fds,
                    "[proxy] max_connections is more than the file descriptor limit leaves room for ({derived}); \
                     raise the limit (LimitNOFILE= in the systemd unit) or lower max_connections"
                );
            }
            set
        }
    }
}

impl Traffic for Proxy {
    fn add(&self, route: &RouteKey, backend: Backend, check: HealthCheck, initial: InitialHealth) {
        let health = match initial {
            InitialHealth::Pending => BackendHealth::Pending,
            InitialHealth::AssumeHealthy => BackendHealth::Healthy,
        };
        let config = self.inner.config.load();
        let state = Arc::new(BackendState::new(
            backend.instance.clone(),
            backend.addr,
            check,
            health,
            Pool::new(
                workers::slots(self.inner.worker_count),
                config.max_idle_per_backend,
                config.upstream_idle_timeout,
            ),
            self.inner.root.child_token(),
        ));
        let mut reg = self.registry();
        let entry = Entry { route: route.clone(), state: Arc::clone(&state), in_rotation: true };
        if let Some(old) = reg.backends.insert(backend.instance.clone(), entry) {
            tracing::warn!(instance = %backend.instance, "backend added twice; replacing the previous one");
            old.state.retire();
            old.state.token.cancel();
        }
        self.publish(&reg);
        drop(reg);
        tracing::debug!(instance = %backend.instance, addr = %backend.addr, route = %route.0, initial = health.as_str(), "backend added");
        let checker = health::run_checker(state, Arc::clone(&self.inner.shared));
        match tokio::runtime::Handle::try_current().ok().or_else(|| self.inner.runtime.clone()) {
            Some(handle) => {
                self.inner.tasks.spawn_on(checker, &handle);
            }
            None => {
                tracing::error!(instance = %backend.instance, "no tokio runtime: backend added but never checked")
            }
        }
    }

    fn drain(
        &self,
        instance: &InstanceId,
        timeout: Duration,
    ) -> impl std::future::Future<Output = DrainOutcome> + Send {
        let state = {
            let mut reg = self.registry();
            let state = reg.backends.get_mut(instance).map(|entry| {
                entry.in_rotation = false;
                Arc::clone(&entry.state)
            });
            if let Some(state) = &state {
                // Draining first (no new request is counted on it), then out
                // of the snapshot.
                self.inner.shared.drain(state);
                self.publish(&reg);
            }
            state
        };
        let instance = instance.clone();
        let proxy = self.clone();
        async move {
            let Some(state) = state else {
                return DrainOutcome::Unknown;
            };
            let deadline = tokio::time::Instant::now() + timeout;
            let left = state.wait_idle(deadline).await;
            proxy.forget(&instance, &state);
            if left == 0 {
                tracing::debug!(%instance, "backend drained");
                DrainOutcome::Drained
            } else {
                tracing::info!(%instance, in_flight = left, "drain timed out");
                DrainOutcome::TimedOut { in_flight: left }
            }
        }
    }

    fn remove(&self, instance: &InstanceId) {
        let mut reg = self.registry();
        if let Some(entry) = reg.backends.remove(instance) {
            entry.state.retire();
            self.publish(&reg);
            drop(reg);
            entry.state.token.cancel();
            tracing::debug!(%instance, "backend removed");
        }
    }

    fn status(&self, instance: &InstanceId) -> Option<BackendStatus> {
        self.registry().backends.get(instance).map(|e| e.state.status())
    }

    fn subscribe(&self) -> broadcast::Receiver<HealthEvent> {
        self.inner.shared.events.subscribe()
    }

    fn set_maintenance(&self, route: &RouteKey, maintenance: Option<&nonstop_core::maintenance::Maintenance>) {
        Proxy::set_maintenance(self, route, maintenance)
    }

    fn set_split(&self, route: &RouteKey, split: Option<&Split>) {
        let mut reg = self.registry();
        match split {
            Some(split) => {
                let counter = reg.splits.remove(route).map(|(_, counter)| counter).unwrap_or_default();
                reg.splits.insert(route.clone(), (split.clone(), counter));
                tracing::info!(route = %route.0, percent = split.percent, instances = ?split.instances, "traffic split");
            }
            None => {
                if reg.splits.remove(route).is_some() {
                    tracing::info!(route = %route.0, "traffic split ended");
                }
            }
        }
        self.publish(&reg);
    }

    fn figures(&self, route: &RouteKey) -> impl std::future::Future<Output = Vec<BackendFigures>> + Send {
        let mut figures: Vec<BackendFigures> = self
            .registry()
            .backends
            .iter()
            .filter(|(_, entry)| &entry.route == route)
            .map(|(instance, entry)| entry.state.counters.figures(instance))
            .collect();
        figures.sort_by(|a, b| a.instance.cmp(&b.instance));
        std::future::ready(figures)
    }

    fn route_figures(&self, route: &RouteKey) -> impl std::future::Future<Output = RouteFigures> + Send {
        let reg = self.registry();
        let counters = reg.counters.lock().unwrap_or_else(|p| p.into_inner());
        std::future::ready(counters.get(route).map(|c| c.figures()).unwrap_or_default())
    }
}
