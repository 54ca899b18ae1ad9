//! The web dashboard: a page and its assets, served by the daemon on a
//! loopback TCP listener of its own, and the read endpoints of the API it
//! calls, behind a session token or the API's bearer token.
//!
//! Routes on the dashboard's listener ([`router`]):
//! - public, static, holding no data: `GET /` (the page), `GET /login`
//!   (the login page), `GET /assets/...`, `GET /favicon.svg` (embedded in
//!   the binary: no CDN, no build step);
//! - `POST /login` `{"token": T}`: a single-use login token from `nonstop
//!   dashboard` (which the link carries in its fragment, `/login#token=T`,
//!   so it reaches no server log and no `Referer`) exchanged for a session
//!   token, which the page keeps in `sessionStorage`;
//! - with `Authorization: Session <session>` or `Authorization: Bearer
//!   <API token>`: the API's `GET /v1/environments`, `/v1/status`,
//!   `/v1/history`, `/v1/events`, `/v1/metrics`, `/v1/charts`, the
//!   dashboard's own `POST /v1/maintenance` (`{"on": bool}` and nothing
//!   else), and `POST /logout` (ends every session: see [`Dashboard`]).
//!
//! Every request must name the listener in `Host` (DNS rebinding: a page
//! of another site whose name resolves to 127.0.0.1 is refused with 421),
//! and every request that is not GET/HEAD must come from the listener's
//! own origin (`Origin`, `Sec-Fetch-Site`). Nothing else of the API is
//! reachable there. Every answer carries a strict Content-Security-Policy.

pub mod auth;

use crate::server::{self, ApiState};
use crate::wire::{ApiError, MaintenanceRequest};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

pub use auth::{Auth, Epoch};

/// The file in `$NONSTOP_HOME` that keeps the session epoch.
pub const EPOCH_FILE: &str = "dashboard-epoch";

/// The dashboard as the daemon serves it.
///
/// Sessions last [`auth::SESSION_TTL`] from their login and survive
/// daemon restarts and upgrades; a logout ends every session at once, for
/// good: it replaces the session epoch, which is kept in
/// `$NONSTOP_HOME/dashboard-epoch` (0600) so that a restarted daemon
/// refuses the old sessions too.
pub struct Dashboard {
    pub auth: Auth,
    /// Where it listens: `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// What requests may name in `Host`.
    hosts: Vec<String>,
    /// Where the session epoch is kept (`None`: in memory only).
    epoch_file: Option<PathBuf>,
}

impl Dashboard {
    /// The dashboard listening on `addr` (a loopback address), its sessions
    /// signed with a key derived from `api_token`, the session epoch kept
    /// in `epoch_file` (read, or made there if it is missing or damaged).
    pub fn new(api_token: &str, addr: SocketAddr, epoch_file: Option<PathBuf>) -> std::io::Result<Dashboard> {
        let epoch = match &epoch_file {
            Some(path) => load_epoch(path)?,
            None => Epoch::random().map_err(std::io::Error::other)?,
        };
        let hosts = listener_hosts(addr);
        Ok(Dashboard { auth: Auth::new(api_token, epoch), base_url: format!("http://{}", hosts[0]), hosts, epoch_file })
    }

    /// Ends every session: a new epoch, written down before it is used
    /// by the caller's answer.
    fn revoke_sessions(&self) -> Result<(), RevokeError> {
        let epoch = self.auth.revoke_all().map_err(RevokeError::Epoch)?;
        match &self.epoch_file {
            Some(path) => {
                write_epoch(path, epoch).map_err(|source| RevokeError::Persist { path: path.clone(), source })
            }
            None => Ok(()),
        }
    }

    /// Whether `host` (from `Host` or the request's URI) names this
    /// listener.
    fn host_allowed(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Whether an `Origin` is this listener's.
    fn origin_allowed(&self, origin: &str) -> bool {
        origin.strip_prefix("http://").is_some_and(|rest| self.host_allowed(rest))
    }
}

/// The `Host` values that name a listener on `addr`: `IP:PORT` first (the
/// base URL's), and `localhost:PORT` for 127.0.0.1 and ::1.
pub fn listener_hosts(addr: SocketAddr) -> Vec<String> {
    let ip = match addr.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let mut hosts = vec![format!("{ip}:{}", addr.port())];
    let localhost: std::net::IpAddr = match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    if addr.ip() == localhost {
        hosts.push(format!("localhost:{}", addr.port()));
    }
    hosts
}

/// The session epoch in `path`; a missing or damaged file gets a new
/// random one, written there (the sessions of an epoch nobody knows are
/// refused: that fails closed).
pub fn load_epoch(path: &Path) -> std::io::Result<Epoch> {
    match std::fs::read_to_string(path) {
        Ok(text) => match Epoch::parse(&text) {
            Some(e) => return Ok(e),
            None => tracing::warn!("{} is damaged: every dashboard session ends; a new one is made", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot read {} ({e}): make it readable, or remove it to end every session", path.display()),
            ))
        }
    }
    let epoch = Epoch::random().map_err(std::io::Error::other)?;
    write_epoch(path, epoch)?;
    Ok(epoch)
}

/// Write the epoch to `path` (0600, replaced at once: written beside it,
/// synced, renamed).
/// Why a logout did not end every session for good.
#[derive(Debug, thiserror::Error)]
enum RevokeError {
    #[error("cannot make a new session epoch: {0}")]
    Epoch(#[source] getrandom::Error),
    #[error(
        "every session of this daemon is logged out, but writing {} failed ({source}); a daemon restarted before it \
         is written would accept the old sessions again until they expire: make it writable and log out again",
        path.display()
    )]
    Persist {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn write_epoch(path: &Path, epoch: Epoch) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?; // O_EXCL: never through a symbolic link
    f.write_all(format!("{}\n", epoch.to_text()).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `POST /v1/dashboard/login`: a login link for `nonstop dashboard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginLink {
    /// The dashboard's address (`http://127.0.0.1:PORT`).
    pub base_url: String,
    /// The address with a single-use login token (in the fragment:
    /// `/login#token=...`).
    pub url: String,
    /// How long the token may wait to be used.
    pub expires_in_secs: u64,
}

/// `POST /login` on the dashboard: the login token from the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub token: String,
}

/// The answer to `POST /login`: the session, to send back in
/// `Authorization: Session <session>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionGrant {
    pub session: String,
    pub expires_in_secs: u64,
}

/// `POST /v1/maintenance` on the dashboard: on or off, nothing else (no
/// page, allow list or Retry-After; the events say `dashboard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceToggle {
    pub on: bool,
}

/// The range of the dashboard's charts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ChartRange {
    /// 15 minutes of 5 s points.
    #[default]
    #[serde(rename = "15m")]
    FifteenMinutes,
    /// An hour of 5 s points.
    #[serde(rename = "1h")]
    Hour,
    /// Six hours of 1 min points.
    #[serde(rename = "6h")]
    SixHours,
    /// A day of 1 min points.
    #[serde(rename = "24h")]
    Day,
}

impl ChartRange {
    /// The step of its points in seconds, and how many there are.
    pub fn points(self) -> (u64, usize) {
        match self {
            ChartRange::FifteenMinutes => (5, 180),
            ChartRange::Hour => (5, 720),
            ChartRange::SixHours => (60, 360),
            ChartRange::Day => (60, 1440),
        }
    }
}

/// `GET /v1/charts?app=&env=[&range=15m|1h|6h|24h]`: an environment's time
/// series, per process type, point by point (`None`: nothing measured).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChartsReport {
    pub app: String,
    pub environment: String,
    pub range: ChartRange,
    /// The start of the first point, in milliseconds since the Unix epoch.
    pub start_ms: u64,
    pub step_secs: u64,
    pub processes: Vec<ProcessCharts>,
}

/// One process type's series; all as long as the range has points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessCharts {
    pub process: String,
    pub requests_per_second: Vec<Option<f64>>,
    pub p95_ms: Vec<Option<f64>>,
    /// 5xx answers as a fraction of the requests (`None` without requests).
    pub error_rate: Vec<Option<f64>>,
    /// CPU % of the instances' process groups, summed.
    pub cpu_percent: Vec<Option<f64>>,
    /// Running instances.
    pub instances: Vec<Option<f64>>,
}

#[derive(Deserialize)]
pub(crate) struct ChartsQuery {
    #[serde(default)]
    range: ChartRange,
}

/// The charts of the app and environment the query names.
pub(crate) async fn charts(
    State(s): State<ApiState>,
    server::Scoped(engine): server::Scoped,
    q: Query<ChartsQuery>,
) -> Response {
    let status = match engine.status().await {
        Ok(st) => st,
        Err(e) => return server::engine_error(e),
    };
    let Some(source) = s.metrics.clone() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this daemon does not measure metrics", 1);
    };
    let processes: Vec<String> = status.processes.iter().map(|p| p.process.clone()).collect();
    let (app, env, range) = (status.app, status.environment, q.range);
    match tokio::task::spawn_blocking(move || source.charts(&app, &env, &processes, range)).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("reading the metrics failed: {e}"), 1),
    }
}

/// `POST /v1/dashboard/login` (on the API's own listeners): a single-use
/// login link to the dashboard.
pub(crate) async fn login_link(State(s): State<ApiState>, Query(q): Query<Focus>) -> Response {
    let Some(d) = s.dashboard.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "this daemon serves no dashboard (it was started with `--dashboard-listen off` or \
             NONSTOP_DASHBOARD_LISTEN=off); start it without that to have one",
            2,
        );
    };
    match d.auth.issue_login(SystemTime::now()) {
        Ok(token) => Json(LoginLink {
            url: format!("{}/login#token={token}{}", d.base_url, q.query()),
            base_url: d.base_url.clone(),
            expires_in_secs: auth::LOGIN_TTL.as_secs(),
        })
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot make a login token: {e}"), 1),
    }
}

fn error(status: StatusCode, message: &str, exit_code: i32) -> Response {
    (status, Json(ApiError { message: message.to_string(), exit_code, detail: None })).into_response()
}

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const LOGIN_HTML: &str = include_str!("../../assets/login.html");
const APP_JS: &str = include_str!("../../assets/dashboard.js");
const LOGIN_JS: &str = include_str!("../../assets/login.js");
const CHARTS_JS: &str = include_str!("../../assets/charts.js");
const APP_CSS: &str = include_str!("../../assets/dashboard.css");
const FAVICON: &str = include_str!("../../assets/favicon.svg");

/// What every answer of the dashboard's listener carries: nothing loads
/// from elsewhere, nothing frames it, no referrer leaks an address.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The routes of the dashboard's listener.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/logout", post(logout))
        .route("/v1/environments", get(server::environments))
        .route("/v1/status", get(server::status))
        .route("/v1/history", get(server::history))
        .route("/v1/events", get(server::events))
        .route("/v1/metrics", get(server::metrics))
        .route("/v1/charts", get(charts))
        .route("/v1/maintenance", post(maintenance))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .route("/", get(|| page(INDEX_HTML)))
        .route("/login", get(|| page(LOGIN_HTML)).post(login))
        .route("/assets/dashboard.js", get(|| asset(APP_JS, "text/javascript; charset=utf-8")))
        .route("/assets/login.js", get(|| asset(LOGIN_JS, "text/javascript; charset=utf-8")))
        .route("/assets/charts.js", get(|| asset(CHARTS_JS, "text/javascript; charset=utf-8")))
        .route("/assets/dashboard.css", get(|| asset(APP_CSS, "text/css; charset=utf-8")))
        .route("/favicon.svg", get(|| asset(FAVICON, "image/svg+xml")))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page on the dashboard", 2) })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    resp
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn page(body: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    resp
}

fn dashboard_of(s: &ApiState) -> Option<&Arc<Dashboard>> {
    s.dashboard.as_ref()
}

/// The app and environment the page opens on (`nonstop -e staging
/// dashboard`): valid names only, so they go into a URL as they are.
#[derive(Deserialize, Default)]
pub(crate) struct Focus {
    app: Option<String>,
    env: Option<String>,
}

impl Focus {
    /// `&app=..&env=..` for the login link's fragment.
    fn query(&self) -> String {
        let app = self.app.as_deref().filter(|a| nonstop_core::AppName::new(*a).is_ok()).map(|a| format!("&app={a}"));
        let env =
            self.env.as_deref().filter(|e| nonstop_core::EnvironmentId::new(*e).is_ok()).map(|e| format!("&env={e}"));
        app.into_iter().chain(env).collect()
    }
}

async fn login(
    State(s): State<ApiState>,
    body: Result<Json<LoginRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(d) = dashboard_of(&s) else { return StatusCode::NOT_FOUND.into_response() };
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid login request: {e}"), 2),
    };
    match d.auth.redeem(&req.token, SystemTime::now()) {
        Ok(session) => {
            Json(SessionGrant { session: session.value, expires_in_secs: auth::SESSION_TTL.as_secs() }).into_response()
        }
        Err(e) => error(StatusCode::UNAUTHORIZED, &e.to_string(), 2),
    }
}

async fn logout(State(s): State<ApiState>) -> Response {
    let Some(d) = dashboard_of(&s) else { return StatusCode::NOT_FOUND.into_response() };
    match d.revoke_sessions() {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(why) => error(StatusCode::INTERNAL_SERVER_ERROR, &why.to_string(), 1),
    }
}

/// The dashboard's maintenance switch: `{"on": bool}` only.
async fn maintenance(
    server::Scoped(engine): server::Scoped,
    body: Result<Json<MaintenanceToggle>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(toggle) = match body {
        Ok(b) => b,
        Err(e) => {
            return server::bad_request(format!(
                "invalid maintenance request: {e}; the dashboard takes {{\"on\": true}} or {{\"on\": false}} only \
                 (a page, an allow list or Retry-After: `nonstop maintenance on`)"
            ))
        }
    };
    let who = "dashboard".to_string();
    let req = MaintenanceRequest { on: toggle.on, page: None, allow: Vec::new(), retry_after_secs: None, who };
    let setting = match req.checked() {
        Ok(setting) => setting,
        Err(e) => return server::bad_request(e.to_string()),
    };
    match engine.maintenance(setting, req.who).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => server::engine_error(e),
    }
}

/// Whether a request's headers show another origin: an `Origin` that is
/// not the listener's, or a `Sec-Fetch-Site` other than `same-origin`.
fn cross_origin(d: &Dashboard, headers: &HeaderMap) -> bool {
    let origin_bad = headers.get(header::ORIGIN).is_some_and(|o| o.to_str().map_or(true, |o| !d.origin_allowed(o)));
    let fetch_bad =
        headers.get("sec-fetch-site").is_some_and(|v| v.to_str().map_or(true, |site| site != "same-origin"));
    origin_bad || fetch_bad
}

/// Every request: it names this listener (`Host`, and the URI's authority
/// if it has one), and a change comes from its own origin.
async fn guard(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(d) = dashboard_of(&s).cloned() else { return StatusCode::NOT_FOUND.into_response() };
    let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("?"));
    let authority = req.uri().authority().map(|a| a.as_str());
    let named = [host, authority];
    if named.iter().all(Option::is_none) || named.iter().flatten().any(|h| !d.host_allowed(h)) {
        let given = host.or(authority).unwrap_or("nothing");
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "refused: this is the nonstop dashboard at {}, and the request names {given} as its host (a page \
                 of another site whose name resolves to this machine is refused); open {} itself, as `nonstop \
                 dashboard` prints it",
                d.base_url, d.base_url
            ),
            2,
        );
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) && cross_origin(&d, req.headers()) {
        return error(
            StatusCode::FORBIDDEN,
            &format!(
                "refused: a change on the dashboard must come from its own page at {}; open it there and try again",
                d.base_url
            ),
            2,
        );
    }
    next.run(req).await
}

/// What a request authenticates with.
#[derive(Debug, PartialEq, Eq)]
enum Credential<'a> {
    Bearer(&'a str),
    Session(&'a str),
    Other,
    Nothing,
}

fn credential(headers: &HeaderMap) -> Credential<'_> {
    let Some(given) = headers.get(header::AUTHORIZATION) else { return Credential::Nothing };
    let Some((scheme, value)) = given.to_str().ok().and_then(|g| g.split_once(' ')) else { return Credential::Other };
    match scheme {
        s if s.eq_ignore_ascii_case("bearer") => Credential::Bearer(value.trim()),
        s if s.eq_ignore_ascii_case("session") => Credential::Session(value.trim()),
        _ => Credential::Other,
    }
}

async fn require_auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(d) = dashboard_of(&s).cloned() else { return StatusCode::NOT_FOUND.into_response() };
    let ok = match credential(req.headers()) {
        Credential::Bearer(t) if d.auth.bearer_valid(t) => true,
        Credential::Bearer(_) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "wrong API token; send `Authorization: Bearer <token>` with the token from $NONSTOP_HOME/api-token",
                2,
            )
        }
        Credential::Session(t) => d.auth.session_valid(t, SystemTime::now()),
        Credential::Other | Credential::Nothing => false,
    };
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "not logged in, or the session ended (it lasts 12 hours, in the tab it was opened in, until a logout): \
             run `nonstop dashboard` and open the link it prints",
            2,
        );
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dashboard(addr: &str) -> Dashboard {
        Dashboard::new("api-token", addr.parse().unwrap(), None).unwrap()
    }

    #[test]
    fn the_listener_is_named_by_its_address_and_localhost() {
        let d = dashboard("127.0.0.1:4000");
        assert_eq!(d.base_url, "http://127.0.0.1:4000");
        for ok in ["127.0.0.1:4000", "localhost:4000", "LOCALHOST:4000"] {
            assert!(d.host_allowed(ok), "{ok}");
        }
        for bad in ["127.0.0.1:4001", "localhost", "127.0.0.1", "evil.example:4000", "127.0.0.1:4000.evil", ""] {
            assert!(!d.host_allowed(bad), "{bad}");
        }
        let d = dashboard("[::1]:4000");
        assert_eq!(d.base_url, "http://[::1]:4000");
        assert!(d.host_allowed("[::1]:4000") && d.host_allowed("localhost:4000"));
        assert!(!d.host_allowed("127.0.0.1:4000"));
        // Another loopback address is not `localhost`.
        let d = dashboard("127.0.0.2:4000");
        assert_eq!(listener_hosts("127.0.0.2:4000".parse().unwrap()), vec!["127.0.0.2:4000".to_string()]);
        assert!(!d.host_allowed("localhost:4000"));
    }

    #[test]
    fn another_origin_is_not_the_dashboard() {
        let d = dashboard("127.0.0.1:4000");
        let mut h = HeaderMap::new();
        // The Host is not what the origin is compared to.
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(!cross_origin(&d, &h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:4000"));
        assert!(!cross_origin(&d, &h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_origin(&d, &h));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_origin(&d, &h));
        h.remove("sec-fetch-site");
        for bad in ["http://evil.example", "https://127.0.0.1:4000", "http://127.0.0.1:4001", "null"] {
            h.insert(header::ORIGIN, HeaderValue::from_static(bad));
            assert!(cross_origin(&d, &h), "{bad}");
        }
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(cross_origin(&d, &h), "an Origin equal to the Host is not enough");
    }

    #[test]
    fn credentials_are_read_by_scheme() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h), Credential::Nothing);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Session abc"));
        assert_eq!(credential(&h), Credential::Session("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer xyz"));
        assert_eq!(credential(&h), Credential::Bearer("xyz"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(credential(&h), Credential::Other);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("xyz"));
        assert_eq!(credential(&h), Credential::Other);
    }

    #[test]
    fn the_dashboards_maintenance_takes_on_or_off_only() {
        assert_eq!(
            serde_json::from_str::<MaintenanceToggle>(r#"{"on": true}"#).unwrap(),
            MaintenanceToggle { on: true }
        );
        for bad in [
            r#"{"on": true, "who": "mallory"}"#,
            r#"{"on": true, "page": "<h1>"}"#,
            r#"{"on": true, "allow": []}"#,
            "{}",
        ] {
            assert!(serde_json::from_str::<MaintenanceToggle>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_epoch_is_kept_in_a_private_file_and_a_damaged_one_is_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EPOCH_FILE);
        let first = load_epoch(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_epoch(&path).unwrap(), first, "read back, not made anew");
        let d = Dashboard::new("api-token", "127.0.0.1:4000".parse().unwrap(), Some(path.clone())).unwrap();
        assert_eq!(d.auth.epoch(), first);
        d.revoke_sessions().unwrap();
        let second = load_epoch(&path).unwrap();
        assert_ne!(second, first);
        assert_eq!(d.auth.epoch(), second);
        std::fs::write(&path, "damaged").unwrap();
        let third = load_epoch(&path).unwrap();
        assert!(third != second && third != first);
        assert_eq!(load_epoch(&path).unwrap(), third);
    }

    proptest! {
        #[test]
        fn only_the_listeners_own_names_are_accepted(port in 1u16.., other in 1u16.., name in "[a-z0-9.-]{1,30}") {
            let d = dashboard(&format!("127.0.0.1:{port}"));
            let (own, local) = (format!("127.0.0.1:{port}"), format!("localhost:{port}"));
            prop_assert!(d.host_allowed(&own) && d.host_allowed(&local));
            let local_origin = format!("http://{local}");
            prop_assert!(d.origin_allowed(&local_origin));
            let other_port = format!("127.0.0.1:{other}");
            prop_assert_eq!(d.host_allowed(&other_port), other == port);
            let (named, named_origin) = (format!("{name}:{port}"), format!("http://{name}:{port}"));
            let ours = name == "localhost" || name == "127.0.0.1";
            prop_assert_eq!(d.host_allowed(&named), ours);
            prop_assert_eq!(d.origin_allowed(&named_origin), ours);
        }
    }

    #[test]
    fn chart_ranges_read_as_the_page_writes_them() {
        for (text, range) in [
            ("15m", ChartRange::FifteenMinutes),
            ("1h", ChartRange::Hour),
            ("6h", ChartRange::SixHours),
            ("24h", ChartRange::Day),
        ] {
            assert_eq!(serde_json::from_str::<ChartRange>(&format!("\"{text}\"")).unwrap(), range);
        }
    }
}
