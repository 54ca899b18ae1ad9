//! The web dashboard: a page and its assets, served by the daemon on a
//! loopback TCP listener of its own, and the read endpoints of the API it
//! calls, behind a session cookie or the API's bearer token.
//!
//! Routes on the dashboard's listener ([`router`]):
//! - public: `GET /login?token=T` (a single-use token from `nonstop
//!   dashboard`, exchanged for the session cookie, then a redirect to `/`),
//!   `GET /assets/...` (embedded in the binary: no CDN, no build step);
//! - with a session or `Authorization: Bearer`: `GET /` (the page),
//!   `GET /v1/session` (the CSRF token), the API's `GET /v1/environments`,
//!   `/v1/status`, `/v1/history`, `/v1/events`, `/v1/metrics`,
//!   `/v1/charts`, and `POST /v1/maintenance`, `POST /logout`, which with a
//!   session also need `X-Nonstop-CSRF` and a same-origin request.
//!
//! Nothing else of the API is reachable there: the dashboard changes
//! maintenance only. Every answer carries a strict Content-Security-Policy.

pub mod auth;

use crate::server::{self, ApiState};
use crate::wire::ApiError;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::SystemTime;

pub use auth::Auth;

/// The dashboard as the daemon serves it.
pub struct Dashboard {
    pub auth: Auth,
    /// Where it listens: `http://127.0.0.1:PORT`.
    pub base_url: String,
}

/// `POST /v1/dashboard/login`: a login link for `nonstop dashboard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginLink {
    /// The dashboard's address (`http://127.0.0.1:PORT`).
    pub base_url: String,
    /// The address with a single-use login token.
    pub url: String,
    /// How long the token may wait to be used.
    pub expires_in_secs: u64,
}

/// `GET /v1/session` on the dashboard: what the page needs to make changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Send back in `X-Nonstop-CSRF` with every change.
    pub csrf: String,
    pub version: String,
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
            url: format!("{}/login?token={token}{}", d.base_url, q.query()),
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
const CHARTS_JS: &str = include_str!("../../assets/charts.js");
const APP_CSS: &str = include_str!("../../assets/dashboard.css");
const FAVICON: &str = include_str!("../../assets/favicon.svg");

/// What every answer of the dashboard's listener carries: nothing loads
/// from elsewhere, nothing frames it, no referrer leaks a login link.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The routes of the dashboard's listener.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/", get(index))
        .route("/v1/session", get(session_info))
        .route("/logout", post(logout))
        .route("/v1/environments", get(server::environments))
        .route("/v1/status", get(server::status))
        .route("/v1/history", get(server::history))
        .route("/v1/events", get(server::events))
        .route("/v1/metrics", get(server::metrics))
        .route("/v1/charts", get(charts))
        .route("/v1/maintenance", post(server::maintenance))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .route("/login", get(login))
        .route("/assets/dashboard.js", get(|| asset(APP_JS, "text/javascript; charset=utf-8")))
        .route("/assets/charts.js", get(|| asset(CHARTS_JS, "text/javascript; charset=utf-8")))
        .route("/assets/dashboard.css", get(|| asset(APP_CSS, "text/css; charset=utf-8")))
        .route("/favicon.svg", get(|| asset(FAVICON, "image/svg+xml")))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page on the dashboard", 2) })
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

fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    resp
}

/// The page shown instead of the dashboard, with why.
fn login_page(status: StatusCode, why: &str) -> Response {
    let escaped = why.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    html(status, LOGIN_HTML.replace("{{why}}", &escaped))
}

async fn index() -> Response {
    html(StatusCode::OK, INDEX_HTML.to_string())
}

fn dashboard_of(s: &ApiState) -> Option<&Arc<Dashboard>> {
    s.dashboard.as_ref()
}

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    token: String,
    #[serde(flatten)]
    focus: Focus,
}

/// The app and environment the page opens on (`nonstop -e staging
/// dashboard`): valid names only, so they go into a URL as they are.
#[derive(Deserialize, Default)]
pub(crate) struct Focus {
    app: Option<String>,
    env: Option<String>,
}

impl Focus {
    fn pairs(&self) -> Vec<String> {
        let app = self.app.as_deref().filter(|a| nonstop_core::AppName::new(*a).is_ok()).map(|a| format!("app={a}"));
        let env =
            self.env.as_deref().filter(|e| nonstop_core::EnvironmentId::new(*e).is_ok()).map(|e| format!("env={e}"));
        app.into_iter().chain(env).collect()
    }

    /// `&app=..&env=..` for the login link.
    fn query(&self) -> String {
        self.pairs().iter().map(|p| format!("&{p}")).collect()
    }

    /// Where the login sends the browser.
    fn location(&self) -> String {
        let pairs = self.pairs();
        if pairs.is_empty() {
            "/".to_string()
        } else {
            format!("/#{}", pairs.join("&"))
        }
    }
}

async fn login(State(s): State<ApiState>, Query(q): Query<LoginQuery>) -> Response {
    let Some(d) = dashboard_of(&s) else { return login_page(StatusCode::NOT_FOUND, "no dashboard here") };
    match d.auth.redeem(&q.token, SystemTime::now()) {
        Ok(session) => {
            let cookie = format!(
                "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                d.auth.cookie_name(),
                session.value,
                auth::SESSION_TTL.as_secs()
            );
            let mut resp = StatusCode::SEE_OTHER.into_response();
            let location = HeaderValue::from_str(&q.focus.location()).unwrap_or(HeaderValue::from_static("/"));
            resp.headers_mut().insert(header::LOCATION, location);
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => login_page(StatusCode::UNAUTHORIZED, &e.to_string()),
    }
}

async fn logout(State(s): State<ApiState>) -> Response {
    let Some(d) = dashboard_of(&s) else { return StatusCode::NOT_FOUND.into_response() };
    let cookie = format!("{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0", d.auth.cookie_name());
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn session_info(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let Some(d) = dashboard_of(&s) else { return StatusCode::NOT_FOUND.into_response() };
    // With a bearer token there is no session and no CSRF to guard.
    let csrf = session_cookie(&headers, &d.auth.cookie_name()).map(|v| d.auth.csrf_token(&v)).unwrap_or_default();
    Json(SessionInfo { csrf, version: env!("CARGO_PKG_VERSION").to_string() }).into_response()
}

/// The value of the cookie `name`, if the request has it.
fn session_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether a state-changing request comes from the dashboard's own page:
/// the session's CSRF token, and no sign of another origin.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin_ok = match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        None => true,
        Some(origin) => origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host),
    };
    let fetch_ok = match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        None => true,
        Some(site) => site == "same-origin",
    };
    origin_ok && fetch_ok
}

async fn require_auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(d) = dashboard_of(&s).cloned() else { return StatusCode::NOT_FOUND.into_response() };
    let headers = req.headers();
    let page = req.uri().path() == "/";
    if let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let token = given.split_once(' ').filter(|(s, _)| s.eq_ignore_ascii_case("bearer")).map(|(_, t)| t.trim());
        return match token {
            Some(t) if d.auth.bearer_valid(t) => next.run(req).await,
            _ => error(
                StatusCode::UNAUTHORIZED,
                "wrong API token; send `Authorization: Bearer <token>` with the token from $NONSTOP_HOME/api-token",
                2,
            ),
        };
    }
    let now = SystemTime::now();
    let Some(session) = session_cookie(headers, &d.auth.cookie_name()).filter(|v| d.auth.session_valid(v, now)) else {
        let why = "not logged in, or the session expired: run `nonstop dashboard` and open the link it prints";
        return if page { login_page(StatusCode::UNAUTHORIZED, why) } else { error(StatusCode::UNAUTHORIZED, why, 2) };
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let csrf = headers.get("x-nonstop-csrf").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !d.auth.csrf_valid(&session, csrf) || !same_origin(headers) {
            return error(
                StatusCode::FORBIDDEN,
                "refused: a change from the dashboard needs the page's CSRF token (X-Nonstop-CSRF) and a same-origin \
                 request; reload the dashboard and try again",
                2,
            );
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; nonstop_session_x=v.w.z; b=2"));
        assert_eq!(session_cookie(&h, "nonstop_session_x").as_deref(), Some("v.w.z"));
        assert_eq!(session_cookie(&h, "nonstop_session"), None);
    }

    #[test]
    fn another_origin_is_not_the_dashboard() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:4000"));
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:4000"));
        assert!(same_origin(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
        h.remove("sec-fetch-site");
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(!same_origin(&h));
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
