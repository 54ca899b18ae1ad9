//! The API server: parse, forward to the engine, encode. Nothing else.

use crate::dashboard::auth::constant_time_eq;
use crate::wire::*;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nonstop_core::ProcessName;
use nonstop_engine::{EngineError, EngineHandle, OpReport, Progress};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// Any error an implementation reports, kept whole (its source chain
/// included).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a [`LogSource`] could not give the lines asked for.
#[derive(Debug, thiserror::Error)]
pub enum LogSourceError {
    /// The app, environment or process is not a valid name.
    #[error(transparent)]
    Name(#[from] nonstop_core::ids::NameError),
    /// The logs could not be read: the source's own error.
    #[error(transparent)]
    Read(BoxError),
}

/// Where the API gets log lines from (the local driver's files today).
pub trait LogSource: Send + Sync + 'static {
    /// The last `tail` lines of the app's instances (optionally one process
    /// type), oldest first.
    fn tail(&self, app: &str, env: &str, process: Option<&str>, tail: usize) -> Result<Vec<LogEntry>, LogSourceError>;
    /// New lines as they are written, until `cancel` fires or the receiver
    /// is dropped.
    fn follow(
        &self,
        app: &str,
        env: &str,
        process: Option<&str>,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<LogEntry>, LogSourceError>;
}

/// Asks the daemon to hand over to the binary now on disk; the answer is
/// the old and new daemons' pids, or why it could not (the daemon's own
/// error, whose message goes to the client).
/// What the daemon measured (its metrics task): an environment's report,
/// `process` only if given (the engine has checked the names).
pub trait MetricsSource: Send + Sync + 'static {
    fn report(&self, app: &str, env: &str, processes: &[String]) -> MetricsReport;
    /// Whether `/metrics` can be served on `addr` (it is already, or it
    /// is free): the error says what is wrong and what to do.
    fn check_listen(&self, addr: std::net::SocketAddr) -> Result<(), ListenError>;
    /// The dashboard's charts: each process's series over `range`.
    fn charts(
        &self,
        app: &str,
        env: &str,
        processes: &[String],
        range: crate::dashboard::ChartRange,
    ) -> crate::dashboard::ChartsReport;
}

/// A `[metrics] listen` address that cannot be served.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve /metrics on {addr} ({source}): another program listens there (or the address is not this \
     machine's); choose another `[metrics] listen` in nonstop.toml, or stop that program, and run the command again"
)]
pub struct ListenError {
    pub addr: std::net::SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// `up` and `deploy` refuse a spec whose `[metrics] listen` address is
/// taken by another program, before anything changes.
fn check_metrics_listen(s: &ApiState, spec: &nonstop_core::process::AppSpec) -> Option<Response> {
    let (Some(m), Some(source)) = (&spec.metrics, &s.metrics) else { return None };
    source
        .check_listen(m.listen)
        .err()
        .map(|e| error_response(StatusCode::CONFLICT, ApiError { message: e.to_string(), exit_code: 2, detail: None }))
}

pub type UpgradeRequest = tokio::sync::oneshot::Sender<Result<Upgraded, BoxError>>;

#[derive(Clone)]
pub struct ApiState {
    pub engine: EngineHandle,
    pub logs: Arc<dyn LogSource>,
    /// Fired by `POST /v1/shutdown`.
    pub shutdown: CancellationToken,
    pub home: PathBuf,
    /// `POST /v1/upgrade` goes here.
    pub upgrade: Option<mpsc::Sender<UpgradeRequest>>,
    /// `GET /v1/metrics` reads this; `None`: a daemon that measures nothing.
    pub metrics: Option<Arc<dyn MetricsSource>>,
    /// The web dashboard's login tokens and address; `None`: no dashboard.
    pub dashboard: Option<Arc<crate::dashboard::Dashboard>>,
}

/// The engine, addressed to the app and environment the request names
/// (`?app=NAME&env=NAME`, both optional: the environment's one app, the
/// daemon's default environment).
pub struct Scoped(pub EngineHandle);

#[derive(serde::Deserialize)]
struct ScopeQuery {
    app: Option<String>,
    env: Option<String>,
}

impl axum::extract::FromRequestParts<ApiState> for Scoped {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, s: &ApiState) -> Result<Self, Response> {
        let Query(q) =
            Query::<ScopeQuery>::try_from_uri(&parts.uri).map_err(|e| bad_request(format!("invalid query: {e}")))?;
        let app = q
            .app
            .filter(|a| !a.is_empty())
            .map(nonstop_core::AppName::new)
            .transpose()
            .map_err(|e| bad_request(format!("{e} (given as `app`)")))?;
        let env = q
            .env
            .filter(|e| !e.is_empty())
            .map(nonstop_core::EnvironmentId::new)
            .transpose()
            .map_err(|e| bad_request(format!("{e} (given as `env`, from -e/--env or NONSTOP_ENV)")))?;
        Ok(Scoped(s.engine.scoped(app, env)))
    }
}

/// The routes, without authentication (for the 0600 unix socket).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/status", get(status))
        .route("/v1/up", post(up))
        .route("/v1/down", post(down))
        .route("/v1/scale", post(scale))
        .route("/v1/restart", post(restart))
        .route("/v1/run-context", get(run_context))
        .route("/v1/events", get(events))
        .route("/v1/logs", get(logs))
        .route("/v1/metrics", get(metrics))
        .route("/v1/charts", get(crate::dashboard::charts))
        .route("/v1/dashboard/login", post(crate::dashboard::login_link))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/upgrade", post(upgrade))
        .route("/v1/deploy", post(deploy))
        .route("/v1/rollback", post(rollback))
        .route("/v1/cancel", post(cancel))
        .route("/v1/releases", get(releases))
        .route("/v1/history", get(history))
        .route("/v1/environments", get(environments))
        .route("/v1/environments/create", post(env_create))
        .route("/v1/environments/destroy", post(env_destroy))
        // A page of up to 1 MiB, JSON-escaped.
        .route("/v1/maintenance", post(maintenance).layer(axum::extract::DefaultBodyLimit::max(8 << 20)))
        .route("/v1/secrets", get(secrets_list))
        .route("/v1/secrets/set", post(secrets_set))
        .route("/v1/secrets/unset", post(secrets_unset))
        .route("/v1/stop", post(stop))
        .route("/v1/start", post(start))
        .merge(crate::config::routes())
        .fallback(not_found)
        .with_state(state)
}

/// The routes behind `Authorization: Bearer <token>` (for TCP).
pub fn router_with_token(state: ApiState, token: String) -> Router {
    let token: Arc<str> = token.into();
    router(state).layer(middleware::from_fn(move |req: Request, next: Next| {
        let token = token.clone();
        async move {
            let given =
                req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token).unwrap_or("");
            if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                next.run(req).await
            } else {
                let err = ApiError {
                    message: "missing or wrong API token; send `Authorization: Bearer <token>` with the token from $NONSTOP_HOME/api-token".into(),
                    exit_code: 2,
                    detail: None,
                };
                (StatusCode::UNAUTHORIZED, Json(err)).into_response()
            }
        }
    }))
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 7235 §2.1: `bearer` and `BEARER` are `Bearer`),
/// and one or more spaces may follow it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    (!token.is_empty()).then_some(token)
}

fn error_response(status: StatusCode, err: ApiError) -> Response {
    (status, Json(err)).into_response()
}

pub(crate) fn engine_error(e: EngineError) -> Response {
    let status = match e.exit_code() {
        2 => StatusCode::BAD_REQUEST,
        3 => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let status = if matches!(e, EngineError::NotUp) { StatusCode::NOT_FOUND } else { status };
    error_response(status, to_api_error(&e))
}

fn to_api_error(e: &EngineError) -> ApiError {
    ApiError { message: e.to_string(), exit_code: e.exit_code(), detail: serde_json::to_value(e).ok() }
}

pub(crate) fn bad_request(message: String) -> Response {
    error_response(StatusCode::BAD_REQUEST, ApiError { message, exit_code: 2, detail: None })
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        ApiError { message: "no such API endpoint; is the CLI newer than the daemon? run `nonstop down` and `nonstop up` to restart it".into(), exit_code: 2, detail: None },
    )
}

async fn ping(State(s): State<ApiState>) -> Json<Ping> {
    Json(Ping { pid: std::process::id(), version: env!("CARGO_PKG_VERSION").to_string(), home: s.home.clone() })
}

pub(crate) async fn status(Scoped(engine): Scoped) -> Response {
    match engine.status().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

async fn run_context(Scoped(engine): Scoped, Query(q): Query<RunContextQuery>) -> Response {
    match engine.run_context(q.release.map(nonstop_core::ReleaseId)).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

pub(crate) async fn events(Scoped(engine): Scoped, Query(q): Query<EventsQuery>) -> Response {
    match engine.events(q.limit.unwrap_or(50).min(10_000)).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

/// Run an engine operation and stream its progress as NDJSON. The
/// operation goes on if the client goes away.
pub(crate) fn op_stream<F, Fut>(run: F) -> Response
where
    F: FnOnce(mpsc::UnboundedSender<Progress>) -> Fut,
    Fut: Future<Output = Result<OpReport, EngineError>> + Send + 'static,
{
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Progress>();
    let (line_tx, line_rx) = mpsc::unbounded_channel::<Result<bytes::Bytes, std::io::Error>>();
    let fut = run(progress_tx);
    tokio::spawn(async move {
        let forward = {
            let line_tx = line_tx.clone();
            async move {
                while let Some(p) = progress_rx.recv().await {
                    let _ = line_tx.send(Ok(ndjson(&OpLine::Progress(p))));
                }
            }
        };
        let (result, ()) = tokio::join!(fut, forward);
        let last = match result {
            Ok(report) => OpLine::Result(report),
            Err(e) => OpLine::Error(to_api_error(&e)),
        };
        let _ = line_tx.send(Ok(ndjson(&last)));
    });
    let body = Body::from_stream(UnboundedReceiverStream::new(line_rx));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    resp
}

fn ndjson<T: serde::Serialize>(v: &T) -> bytes::Bytes {
    let mut s = serde_json::to_vec(v).unwrap_or_default();
    s.push(b'\n');
    s.into()
}

async fn up(
    State(s): State<ApiState>,
    Scoped(engine): Scoped,
    body: Result<Json<UpRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid up request: {e}")),
    };
    if let Some(r) = check_metrics_listen(&s, &req.spec) {
        return r;
    }
    op_stream(move |p| async move { engine.up(req.spec, req.workdir, req.base_env, p).await })
}

async fn down(Scoped(engine): Scoped) -> Response {
    op_stream(move |p| async move { engine.down(p).await })
}

async fn scale(
    Scoped(engine): Scoped,
    body: Result<Json<ScaleRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid scale request: {e}")),
    };
    let mut counts = BTreeMap::new();
    for (name, n) in req.counts {
        match ProcessName::new(name) {
            Ok(p) => {
                counts.insert(p, n);
            }
            Err(e) => return bad_request(e.to_string()),
        }
    }
    if counts.is_empty() {
        return bad_request("nothing to scale; give PROCESS=COUNT, e.g. `nonstop scale web=4`".into());
    }
    op_stream(move |p| async move { engine.scale(counts, p).await })
}

async fn restart(Scoped(engine): Scoped, body: Option<Json<RestartRequest>>) -> Response {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let process = match req.process.map(ProcessName::new).transpose() {
        Ok(p) => p,
        Err(e) => return bad_request(e.to_string()),
    };
    op_stream(move |p| async move { engine.restart(process, p).await })
}

async fn shutdown(State(s): State<ApiState>) -> Response {
    s.shutdown.cancel();
    (StatusCode::ACCEPTED, Json(serde_json::json!({"shutting_down": true}))).into_response()
}

#[derive(serde::Deserialize)]
pub(crate) struct MetricsQuery {
    process: Option<String>,
}

pub(crate) async fn metrics(
    State(s): State<ApiState>,
    Scoped(engine): Scoped,
    Query(q): Query<MetricsQuery>,
) -> Response {
    let status = match engine.status().await {
        Ok(st) => st,
        Err(e) => return engine_error(e),
    };
    let processes: Vec<String> = match &q.process {
        Some(p) if !status.processes.iter().any(|x| &x.process == p) => {
            let known = status.processes.iter().map(|x| x.process.clone()).collect::<Vec<_>>().join(", ");
            return engine_error(EngineError::UnknownProcess { name: p.clone(), known });
        }
        Some(p) => vec![p.clone()],
        None => status.processes.iter().map(|x| x.process.clone()).collect(),
    };
    let Some(source) = s.metrics.clone() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            ApiError { message: "this daemon does not measure metrics".into(), exit_code: 1, detail: None },
        );
    };
    let (app, env) = (status.app.clone(), status.environment.clone());
    match tokio::task::spawn_blocking(move || source.report(&app, &env, &processes)).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiError { message: format!("reading the metrics failed: {e}"), exit_code: 1, detail: None },
        ),
    }
}

async fn logs(State(s): State<ApiState>, Scoped(engine): Scoped, Query(q): Query<LogsQuery>) -> Response {
    let status = match engine.status().await {
        Ok(st) => st,
        Err(e) => return engine_error(e),
    };
    if let Some(p) = &q.process {
        if !status.processes.iter().any(|x| &x.process == p) {
            let known = status.processes.iter().map(|x| x.process.clone()).collect::<Vec<_>>().join(", ");
            return engine_error(EngineError::UnknownProcess { name: p.clone(), known });
        }
    }
    let tail = q.tail.unwrap_or(if q.follow { 20 } else { 200 }).min(100_000);
    let backlog = match s.logs.tail(&status.app, &status.environment, q.process.as_deref(), tail) {
        Ok(lines) => lines,
        Err(e) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                ApiError { message: e.to_string(), exit_code: 1, detail: None },
            )
        }
    };
    let backlog_stream = tokio_stream::iter(backlog.into_iter().map(|l| Ok::<_, std::io::Error>(ndjson(&l))));
    let body = if q.follow {
        let cancel = s.shutdown.child_token();
        let guard = cancel.clone().drop_guard();
        let rx = match s.logs.follow(&status.app, &status.environment, q.process.as_deref(), cancel) {
            Ok(rx) => rx,
            Err(e) => {
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ApiError { message: e.to_string(), exit_code: 1, detail: None },
                )
            }
        };
        // The guard lives as long as the body stream: a client that goes
        // away stops the follower.
        let live = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |l| {
            let _keep = &guard;
            Ok::<_, std::io::Error>(ndjson(&l))
        });
        Body::from_stream(backlog_stream.chain(live))
    } else {
        Body::from_stream(backlog_stream)
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    resp
}

async fn deploy(
    State(s): State<ApiState>,
    Scoped(engine): Scoped,
    body: Result<Json<DeployRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid deploy request: {e}")),
    };
    if let Some(r) = check_metrics_listen(&s, &req.spec) {
        return r;
    }
    op_stream(move |p| async move {
        let options = nonstop_engine::DeployOptions { run_tasks: req.run_tasks, allow_breaking: req.allow_breaking };
        engine.deploy_with(req.spec, req.source, req.base_env, req.message, req.who, options, p).await
    })
}

async fn rollback(
    Scoped(engine): Scoped,
    body: Result<Json<RollbackRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid rollback request: {e}")),
    };
    op_stream(move |p| async move {
        let options = nonstop_engine::RollbackOptions { run_tasks: req.run_tasks, force: req.force };
        engine.rollback_with(req.release.map(nonstop_core::ReleaseId), options, req.who, p).await
    })
}

async fn cancel(
    Scoped(engine): Scoped,
    body: Result<Json<CancelRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid cancel request: {e}")),
    };
    let reason = match req.checked_reason() {
        Ok(reason) => reason,
        Err(e) => return bad_request(format!("invalid cancel request: {e}")),
    };
    match engine.cancel(req.who, reason).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

pub(crate) async fn maintenance(
    Scoped(engine): Scoped,
    body: Result<Json<MaintenanceRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid maintenance request: {e}")),
    };
    // The same checks as the CLI's: nothing changes on bad input.
    let setting = match req.checked() {
        Ok(setting) => setting,
        Err(e) => return bad_request(e.to_string()),
    };
    match engine.maintenance(setting, req.who).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

async fn stop(
    Scoped(engine): Scoped,
    body: Result<Json<StopStartRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid stop request: {e}")),
    };
    op_stream(move |p| async move { engine.stop(req.who, p).await })
}

async fn start(
    Scoped(engine): Scoped,
    body: Result<Json<StopStartRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid start request: {e}")),
    };
    op_stream(move |p| async move { engine.start(req.who, p).await })
}

/// A secrets request that is not what it should be. The parser's own
/// words are not repeated: they may quote a piece of the body.
fn secrets_body_error(what: &str, shape: &str) -> Response {
    bad_request(format!("invalid {what} request: the body must be the JSON object {shape}"))
}

async fn secrets_set(
    Scoped(engine): Scoped,
    body: Result<Json<SecretSetRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(mut req)) = body else {
        return secrets_body_error("secrets set", r#"{"name": "NAME", "value": "...", "who": "user@host"}"#);
    };
    let name = match nonstop_secrets::SecretName::new(std::mem::take(&mut req.name)) {
        Ok(n) => n,
        Err(e) => return bad_request(e.to_string()),
    };
    let value = match nonstop_secrets::SecretValue::new(std::mem::take(&mut req.value)) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("secret {name}: {e}")),
    };
    let who = std::mem::take(&mut req.who);
    match engine.set_secret(name, value, who).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

async fn secrets_unset(
    Scoped(engine): Scoped,
    body: Result<Json<SecretUnsetRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(req)) = body else {
        return secrets_body_error("secrets unset", r#"{"name": "NAME", "who": "user@host"}"#);
    };
    let name = match nonstop_secrets::SecretName::new(req.name) {
        Ok(n) => n,
        Err(e) => return bad_request(e.to_string()),
    };
    match engine.unset_secret(name, req.who).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

async fn secrets_list(Scoped(engine): Scoped) -> Response {
    match engine.secrets().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

async fn releases(Scoped(engine): Scoped) -> Response {
    match engine.releases().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

pub(crate) async fn history(Scoped(engine): Scoped, Query(q): Query<HistoryQuery>) -> Response {
    if let Some(id) = q.id {
        return match engine.deployment(id).await {
            Ok(d) => Json(d.into_iter().collect::<Vec<_>>()).into_response(),
            Err(e) => engine_error(e),
        };
    }
    match engine.history(q.limit.unwrap_or(20).min(10_000)).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}

/// `nonstop env create`: the environment the query names, deployed new.
async fn env_create(
    Scoped(engine): Scoped,
    body: Result<Json<EnvCreateRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid env create request: {e}")),
    };
    let from = match req.from.map(|f| nonstop_core::environment::environment_name(&f)).transpose() {
        Ok(f) => f,
        Err(e) => return bad_request(format!("{e} (given as --from)")),
    };
    op_stream(move |p| async move {
        let request = nonstop_engine::CreateEnvironment {
            spec: req.spec,
            source: req.source,
            base_env: req.base_env,
            who: req.who,
            from,
        };
        engine.create_environment(request, p).await
    })
}

/// `nonstop env destroy`: the environment the query names, stopped and
/// forgotten.
async fn env_destroy(
    Scoped(engine): Scoped,
    body: Result<Json<EnvDestroyRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid env destroy request: {e}")),
    };
    let request = nonstop_engine::DestroyEnvironment {
        who: req.who,
        drop_database: req.drop_database,
        base: nonstop_core::environment::BaseSpec { postgres: req.base_postgres, redis: req.base_redis },
    };
    op_stream(move |p| async move { engine.destroy_environment(request, p).await })
}

/// Every app and environment the daemon knows, each with its state (from
/// its own controller: one that is busy answers for itself only).
pub(crate) async fn environments(State(s): State<ApiState>) -> Response {
    let mut out = Vec::new();
    for scope in s.engine.environments() {
        let handle = s.engine.scoped(Some(scope.app.clone()), Some(scope.env.clone()));
        let info = match handle.status().await {
            Ok(st) => {
                let port = st.proxy_listen.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default();
                let has_web = st.processes.iter().any(|p| p.kind == nonstop_core::ProcessKind::Web);
                EnvironmentInfo {
                    running: true,
                    release: Some(st.release),
                    ready: st.processes.iter().map(|p| p.ready as usize).sum(),
                    instances: st.instances.len(),
                    operation: st.operation.clone(),
                    urls: if has_web {
                        st.hosts.iter().map(|h| format!("http://{h}:{port}")).collect()
                    } else {
                        Vec::new()
                    },
                    app: st.app,
                    environment: st.environment,
                }
            }
            Err(EngineError::NotUp) => EnvironmentInfo {
                app: scope.app.to_string(),
                environment: scope.env.to_string(),
                running: false,
                release: None,
                instances: 0,
                ready: 0,
                operation: None,
                urls: Vec::new(),
            },
            Err(e) => return engine_error(e),
        };
        out.push(info);
    }
    Json(out).into_response()
}

async fn upgrade(State(s): State<ApiState>) -> Response {
    let Some(tx) = s.upgrade.clone() else {
        return error_response(
            StatusCode::NOT_FOUND,
            ApiError { message: "this daemon cannot upgrade itself".into(), exit_code: 2, detail: None },
        );
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    if tx.send(reply).await.is_err() {
        return engine_error(EngineError::ShuttingDown);
    }
    match rx.await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiError { message: e.to_string(), exit_code: 1, detail: None },
        ),
        Err(_) => engine_error(EngineError::ShuttingDown),
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR abc", "Bearer   abc"] {
            assert_eq!(bearer_token(value), Some("abc"), "{value:?}");
        }
        for value in ["", "Bearer", "Bearer ", "Basic abc", "Bearerabc", "Token abc", "abc"] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
