//! The request path: route, pick, send (with at most one retry), answer.
//!
//! # Retry rule
//! A request is sent at most twice, the second time on a fresh connection
//! and, if any other is healthy, to another instance:
//! - when nothing reached the instance (connect failed, or hyper handed the
//!   request back from a dead pooled connection): any method, any body;
//! - when the instance died after the request was sent but before a
//!   response head came back: only `GET`, `HEAD`, `OPTIONS`, `PUT`,
//!   `DELETE`, `TRACE`, and only if the body is empty or was buffered.
//!   Bodies are read whole (buffered, in memory or a temporary file) before
//!   an instance is chosen, so any body can be sent again; except on
//!   `ProxyConfig::unbuffered_paths`, where a body is buffered only for
//!   those methods and only up to `ProxyConfig::retry_body_limit` (by
//!   `Content-Length`), and larger or chunked bodies are streamed: such
//!   requests are not retried once sent.
//!
//! A response-head timeout (504) is never retried: the instance may still
//! be working on it.

use crate::backend::{BackendState, InFlight};
use crate::body::{ClientBody, Lease, ProxyBody, UpBody};
use crate::config::ProxyConfig;
use crate::error::{ErrorKind, ProxyError, Retry, Side};
use crate::headers;
use crate::limits::Event;
use crate::rate::LogLimit;
use crate::server::{ConnCtx, PhaseGuard, DUPLICATE_CONTENT_LENGTH, SAW_CONTENT_LENGTH, SAW_TRANSFER_ENCODING};
use crate::upstream::{Failed, Upstream, UpstreamBody};
use crate::Inner;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const PAGE_503: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>503 Service Unavailable</title></head>\n<body><h1>Service unavailable</h1>\n<p>No healthy instance of this app is available right now. Please try again in a moment.</p></body></html>\n";
const BODY_502: &str = "502 Bad Gateway: the app instance failed to answer.\n";
const BODY_504: &str = "504 Gateway Timeout: the app did not answer in time.\n";
const BODY_400: &str = "400 Bad Request: the request body could not be read.\n";
const BODY_408: &str = "408 Request Timeout: the request body stopped arriving, or came too slowly.\n";
const BODY_413: &str = "413 Content Too Large: the request body is larger than this server accepts.\n";
const BODY_500: &str = "500 Internal Server Error: proxy error.\n";

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

pub(crate) async fn handle(inner: Arc<Inner>, ctx: &Arc<ConnCtx>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let http2 = req.version() == Version::HTTP_2;
    let phase = ctx.begin_request(http2);
    let request_id = headers::request_id(req.headers());
    let config = &*ctx.config;
    if let Err(reject) = check_request(ctx, &req, http2) {
        return reject.respond(ctx, &req, request_id, phase);
    }
    if !ctx.tls && inner.redirect_http.load(Ordering::Relaxed) {
        if let Some(location) = crate::tls::redirect_location(&inner, &req) {
            return redirect(location, request_id, phase);
        }
    }
    // A host no route claims, while no route is the default: the proxy's
    // own 404, never another environment's app or static files.
    let (request_id, phase) = match unclaimed_host(&inner, ctx, &req, request_id, phase) {
        Ok(answer) => return answer,
        Err(back) => back,
    };
    // A route in maintenance answers 503 before static files and routing
    // (`maintenance.rs`).
    let (request_id, phase) = match crate::maintenance::check(&inner, ctx, &req, request_id, phase) {
        Ok(answer) => return answer,
        Err(back) => back,
    };
    // `[static]` URLs are answered by the proxy itself (`statics.rs`).
    let (request_id, phase) = match crate::statics::serve(&inner, &req, request_id, phase).await {
        Ok(answer) => return answer,
        Err(back) => back,
    };
    let upgrade = !http2 && headers::is_upgrade(req.headers());
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    // Origin-form towards the instance; an absolute-form target (or h2's
    // :authority) names the host.
    if parts.uri.authority().is_some() {
        if let Some(authority) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(header::HOST, authority);
        }
        parts.uri = parts.uri.path_and_query().map(|pq| Uri::from(pq.clone())).unwrap_or_else(|| Uri::from_static("/"));
    }
    let host = parts.headers.get(header::HOST).cloned();
    // HTTP/1.0 allows a request without Host; an app (Django's
    // ALLOWED_HOSTS) may not: it gets the Host of the chosen instance's
    // health checks (see `BackendState::default_host`).
    let needs_host = host.is_none();
    headers::prepare_request(&mut parts.headers, &ctx.peer_ip, &request_id, upgrade, ctx.tls, ctx.trusted);
    parts.version = Version::HTTP_11;

    // Decide the body's fate: empty, buffered (replayable), or streamed.
    let idempotent = is_idempotent(&parts.method);
    // An empty or buffered body can be sent again: the request comes back
    // from a failed send (`upstream::Failed`) instead of being copied
    // beforehand (a copy of its headers was 1,400 instructions per request).
    let body = if body.is_end_stream() {
        // (TimedStream marked an HTTP/1 request without a body as read
        // whole when it saw the end of its head.)
        UpBody::empty()
    } else {
        let exact = body.size_hint().exact();
        let mut body = ClientBody::new(body, &ctx.config);
        if !http2 && exact.is_none() {
            body = body.watching_chunk_sizes(ctx);
        }
        let buffer = !config.streams_body(parts.uri.path());
        if buffer || (idempotent && exact.is_some_and(|n| n <= config.retry_body_limit as u64)) {
            // Read whole before an instance is chosen (see `spool.rs`).
            let memory = if buffer { config.body_memory_bytes } else { usize::MAX };
            match crate::spool::read_whole(&mut body, memory, || config.body_dir()).await {
                Ok(buffered) => {
                    if !http2 {
                        ctx.request_read_whole();
                    }
                    UpBody::buffered(buffered)
                }
                Err(err) => {
                    let err = ProxyError::new(err.kind(), err.side(), Retry::Never).with_source(err);
                    return client_failed(ctx, &err, request_id, phase);
                }
            }
        } else {
            UpBody::Stream(body)
        }
    };

    let mut req = Request::from_parts(parts, body);
    let mut avoid: Option<Arc<BackendState>> = None;
    let mut attempt = 0u8;
    // Write to the instance together with the other requests read in
    // this batch of events (see `workers::batch_end`).
    crate::workers::batch_end().await;
    loop {
        let Some(in_flight) = acquire(&inner, config, host.as_ref(), avoid.as_ref()).await else {
            if let Some(route) = inner.table.load().route_for(host.as_ref().map(HeaderValue::as_bytes)) {
                route.counters.no_backend.fetch_add(1, Ordering::Relaxed);
            }
            return error_response(&ProxyError::no_healthy_backend(), request_id, phase, false);
        };
        if needs_host {
            req.headers_mut().insert(header::HOST, in_flight.backend().default_host.clone());
        }
        let forwarded = std::time::Instant::now();
        match send(config, &in_flight, req, attempt > 0).await {
            Ok((resp, conn)) => {
                count_answer(&inner, config, host.as_ref(), in_flight.backend(), forwarded, resp.status(), false);
                // The same for the response to the client.
                crate::workers::batch_end().await;
                return respond(ctx, resp, conn, in_flight, request_id, on_upgrade, phase);
            }
            Err((err, returned)) => {
                let backend = Arc::clone(in_flight.backend());
                drop(in_flight);
                if err.side != Side::Upstream {
                    // The client's body failed (or its temporary file):
                    // the instance is not to blame and nothing is retried.
                    return client_failed(ctx, &err, request_id, phase);
                }
                if err.marks_unhealthy() {
                    inner.shared.passive_failure(&backend, err.detail());
                }
                attempt += 1;
                let next = if attempt >= 2 {
                    None
                } else {
                    match err.retry {
                        Retry::Unsent => returned,
                        Retry::IfIdempotent => returned.filter(|_| idempotent),
                        Retry::Never => None,
                    }
                };
                // A failed attempt is an answer of the instance's, a 502
                // or 504, when the client gets it, or when the request had
                // reached the instance (a retry on another hides it from
                // the client, not from the instance's figures). Not when
                // nothing was sent and a retry follows (a pooled
                // connection the instance had closed), nor for the proxy's
                // own shortage of descriptors.
                if err.kind != ErrorKind::LocalExhaustion && (next.is_none() || err.retry != Retry::Unsent) {
                    count_answer(&inner, config, host.as_ref(), &backend, forwarded, err.status(), true);
                }
                match next {
                    Some(again) => {
                        tracing::debug!(instance = %backend.instance, error = %err, "retrying request on another instance");
                        req = again;
                        avoid = Some(backend);
                    }
                    None if err.kind == ErrorKind::LocalExhaustion => {
                        // One line per interval, not one per request.
                        inner.refusals.count(Event::RequestWithoutFd, Some(ctx.peer), inner.limits(), None);
                        return error_response(&err, request_id, phase, false);
                    }
                    None => {
                        tracing::warn!(instance = %backend.instance, error = %err, status = err.status().as_u16(), "request failed");
                        return error_response(&err, request_id, phase, false);
                    }
                }
            }
        }
    }
}

/// Count an answer of `backend` (a response head, or a failed attempt)
/// in its figures, and feed a 5xx to the outlier detection.
#[inline]
fn count_answer(
    inner: &Inner,
    config: &ProxyConfig,
    host: Option<&HeaderValue>,
    backend: &Arc<BackendState>,
    forwarded: std::time::Instant,
    status: StatusCode,
    failed: bool,
) {
    let after = backend.counters.answered(forwarded.elapsed(), status.as_u16(), failed, config.outlier_consecutive_5xx);
    if after != crate::outlier::After5xx::Nothing {
        crate::outlier::after_5xx(inner, config.outlier_policy(), host.map(HeaderValue::as_bytes), backend, after);
    }
}

/// A request refused before anything was sent upstream.
pub(crate) struct Reject {
    status: StatusCode,
    reason: &'static str,
}

impl Reject {
    fn new(status: StatusCode, reason: &'static str) -> Self {
        Self { status, reason }
    }

    fn bad(reason: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }

    /// One log line, then the answer. HTTP/1 connections are closed after
    /// it: what follows a malformed request cannot be trusted.
    fn respond(
        self,
        ctx: &ConnCtx,
        req: &Request<Incoming>,
        request_id: HeaderValue,
        phase: PhaseGuard,
    ) -> Response<ProxyBody> {
        tracing::info!(
            client = %ctx.peer,
            status = self.status.as_u16(),
            reason = self.reason,
            method = %req.method(),
            "request rejected"
        );
        let body =
            format!("{} {}: {}.\n", self.status.as_u16(), self.status.canonical_reason().unwrap_or(""), self.reason);
        let close = req.version() != Version::HTTP_2;
        text_response(self.status, body.into(), request_id, phase, close)
    }
}

/// What hyper lets through and the proxy does not (see the crate docs for
/// what hyper itself rejects). Only reads what is parsed already.
fn check_request(ctx: &ConnCtx, req: &Request<Incoming>, http2: bool) -> Result<(), Reject> {
    let config = &*ctx.config;
    let headers = req.headers();
    let uri = req.uri();
    let mut hosts = headers.get_all(header::HOST).iter();
    let (host, more_hosts) = (hosts.next(), hosts.next().is_some());
    let target_len = if !http2 {
        let flags = ctx.take_head_flags();
        if flags & DUPLICATE_CONTENT_LENGTH != 0 {
            return Err(Reject::bad("more than one Content-Length header"));
        }
        if flags & SAW_CONTENT_LENGTH != 0 && flags & SAW_TRANSFER_ENCODING != 0 {
            return Err(Reject::bad("Content-Length together with Transfer-Encoding"));
        }
        // hyper accepts any codings before a final chunked; the proxy would
        // drop them (it re-frames the body), so only `chunked` itself goes.
        let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
        if let Some(first) = te.next() {
            if te.next().is_some() || !first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Reject::new(StatusCode::NOT_IMPLEMENTED, "Transfer-Encoding other than chunked"));
            }
        }
        if host.is_none() && req.version() == Version::HTTP_11 {
            return Err(Reject::bad("missing Host header (required by HTTP/1.1)"));
        }
        let path = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(a)) => scheme.len() + 3 + a.as_str().len() + path,
            (None, Some(a)) => a.as_str().len() + path,
            _ => path,
        }
    } else {
        // hyper counts HTTP/1 fields itself.
        if headers.len() > config.max_headers {
            return Err(Reject::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "more header fields than max_headers",
            ));
        }
        if uri.authority().is_none() && host.is_none() {
            return Err(Reject::bad("missing :authority"));
        }
        uri.path_and_query().map_or(0, |pq| pq.as_str().len())
    };
    if let Some(host) = host {
        if more_hosts {
            return Err(Reject::bad("more than one Host header"));
        }
        if !headers::valid_host(host.as_bytes()) {
            return Err(Reject::bad("invalid Host header"));
        }
    }
    if let Some(authority) = uri.authority() {
        if !headers::valid_host(authority.as_str().as_bytes()) {
            return Err(Reject::bad("invalid host in the request target"));
        }
    }
    if target_len > config.max_request_line {
        return Err(Reject::new(StatusCode::URI_TOO_LONG, "request target longer than max_request_line"));
    }
    if req.method() == Method::CONNECT {
        return Err(Reject::new(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported by a reverse proxy"));
    }
    if let (Some(authority), Some(host)) = (uri.authority(), headers.get(header::HOST)) {
        if !same_authority(authority, uri.scheme_str(), host) {
            return Err(Reject::bad("the request target and Host name different hosts"));
        }
    }
    if req.body().size_hint().exact().is_some_and(|n| n > config.max_body_bytes) {
        return Err(Reject::new(StatusCode::PAYLOAD_TOO_LARGE, "Content-Length larger than max_body_bytes"));
    }
    if !http2 && ctx.declared_body_too_large() {
        // Seen by the chunk scan in what came with the head.
        return Err(Reject::new(StatusCode::PAYLOAD_TOO_LARGE, "chunk size larger than max_body_bytes"));
    }
    Ok(())
}

/// `authority` (of an absolute-form target) and a `Host` header name the
/// same host and port (ignoring case; a missing port is the scheme's).
fn same_authority(authority: &http::uri::Authority, scheme: Option<&str>, host: &HeaderValue) -> bool {
    let Ok(host) = host.to_str() else {
        return false;
    };
    let default_port = if scheme == Some("https") { 443 } else { 80 };
    let (name, port) = match host.rfind(':') {
        Some(colon) if !host[colon..].contains(']') => (&host[..colon], Some(&host[colon + 1..])),
        _ => (host, None),
    };
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) => p,
            Err(_) => return false,
        },
    };
    name.eq_ignore_ascii_case(authority.host()) && authority.port_u16().unwrap_or(default_port) == port
}

/// Slow uploads logged per second at most (an attack makes many).
static SLOW_UPLOAD_LOG: LogLimit = LogLimit::new(10);

/// A client whose body failed: one log line, then 400, 408 or 413, and the
/// connection closed (HTTP/1). A temporary file the proxy could not use: a
/// warning and 500.
fn client_failed(ctx: &ConnCtx, err: &ProxyError, request_id: HeaderValue, phase: PhaseGuard) -> Response<ProxyBody> {
    let status = err.status().as_u16();
    match err.kind {
        ErrorKind::Internal => {
            tracing::warn!(client = %ctx.peer, status, error = %err.detail(), "request failed");
        }
        ErrorKind::ClientTooSlow => {
            static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            let second = EPOCH.get_or_init(std::time::Instant::now).elapsed().as_secs();
            if let Some(left_out) = SLOW_UPLOAD_LOG.allow(second) {
                if left_out > 0 {
                    tracing::info!(client = %ctx.peer, status, reason = %err.detail(), slow_uploads_not_logged = left_out, "request rejected");
                } else {
                    tracing::info!(client = %ctx.peer, status, reason = %err.detail(), "request rejected");
                }
            }
        }
        _ => tracing::info!(client = %ctx.peer, status, reason = %err.detail(), "request rejected"),
    }
    error_response(err, request_id, phase, !ctx.is_multiplexed())
}

fn redirect(location: String, request_id: HeaderValue, phase: PhaseGuard) -> Response<ProxyBody> {
    let body = format!("308 Permanent Redirect: {location}\n");
    let mut resp = text_response(StatusCode::PERMANENT_REDIRECT, body.into(), request_id, phase, false);
    if let Ok(value) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, value);
    }
    resp
}

/// The answer to a request for a host no route claims while no route is
/// the default: `404` naming the host, as kamal-proxy and Traefik answer
/// a host they do not serve (`421 Misdirected Request` would make HTTP/2
/// browsers retry on a new connection, to the same answer). Otherwise the
/// request id and guard back. One snapshot load while some route is the
/// default (one app) or none claims a host; a host lookup otherwise.
fn unclaimed_host<B>(
    inner: &Inner,
    ctx: &ConnCtx,
    req: &Request<B>,
    request_id: HeaderValue,
    phase: PhaseGuard,
) -> Result<Response<ProxyBody>, (HeaderValue, PhaseGuard)> {
    let snapshot = inner.table.load();
    if snapshot.answers_every_host() {
        return Err((request_id, phase));
    }
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers().get(header::HOST).map(HeaderValue::as_bytes),
    };
    if snapshot.route_for(host).is_some() {
        return Err((request_id, phase));
    }
    drop(snapshot);
    let name = host.and_then(crate::hosts::host_name).unwrap_or("");
    tracing::debug!(client = %ctx.peer, host = name, "no route for this host");
    let body = if name.is_empty() {
        "404 Not Found: this request names no host, and no app on this server answers every host.\n".to_string()
    } else {
        format!(
            "404 Not Found: no app on this server answers for host `{name}`.\nIf one should, add the host to one of \
             its environments, or make an environment the default.\n"
        )
    };
    Ok(text_response(StatusCode::NOT_FOUND, body.into(), request_id, phase, false))
}

/// A healthy backend of the request's route, counted in flight. When none
/// is healthy, wait up to `no_backend_wait` for one.
async fn acquire(
    inner: &Inner,
    config: &ProxyConfig,
    host: Option<&HeaderValue>,
    avoid: Option<&Arc<BackendState>>,
) -> Option<InFlight> {
    let pick = || {
        let snapshot = inner.table.load();
        snapshot.route_for(host.map(HeaderValue::as_bytes))?.pick(avoid)
    };
    if let Some(found) = pick() {
        return Some(found);
    }
    let wait = config.no_backend_wait;
    if wait.is_zero() {
        return None;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = inner.shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(found) = pick() {
            return Some(found);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return pick();
        }
    }
}

type Sent = (Response<UpstreamBody>, Upstream);

/// One exchange up to the response head. On failure, the request comes
/// back if it never reached the instance.
async fn send(config: &ProxyConfig, in_flight: &InFlight, req: Request<UpBody>, fresh: bool) -> Result<Sent, Failed> {
    let backend = in_flight.backend();
    let mut conn = match checkout(config, backend, fresh).await {
        Ok(conn) => conn,
        Err(err) => return Err((err, Some(req))),
    };
    // On a timeout or a failure, dropping `conn` closes the connection.
    let resp = conn.send(req, config.upstream_timeout).await?;
    Ok((resp, conn))
}

/// A pooled connection that is ready, else a new one.
async fn checkout(config: &ProxyConfig, backend: &BackendState, fresh: bool) -> Result<Upstream, ProxyError> {
    if !fresh {
        while let Some(mut conn) = backend.pool.take() {
            // Not if the instance closed it while it sat in the pool.
            if conn.ready() {
                return Ok(conn);
            }
        }
    }
    Upstream::connect(backend.addr, config.connect_timeout).await
}

fn respond(
    ctx: &Arc<ConnCtx>,
    resp: Response<UpstreamBody>,
    conn: Upstream,
    in_flight: InFlight,
    request_id: HeaderValue,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    phase: PhaseGuard,
) -> Response<ProxyBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = on_upgrade else {
            let err = ProxyError::new(ErrorKind::UpstreamProtocol, Side::Upstream, Retry::Never);
            tracing::warn!(instance = %in_flight.backend().instance, "instance switched protocols without being asked");
            return error_response(&err, request_id, phase, false);
        };
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, true);
        ctx.upgraded();
        drop(phase);
        spawn_tunnel(ctx, in_flight, client_upgrade, conn.into_upgraded());
        return Response::from_parts(parts, ProxyBody::full(Bytes::new(), None));
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    if !parts.headers.contains_key(headers::X_REQUEST_ID) {
        parts.headers.insert(headers::X_REQUEST_ID, request_id);
    }
    Response::from_parts(parts, ProxyBody::upstream(body, Lease { in_flight, conn: Some(conn) }, Some(phase)))
}

/// Copy bytes both ways between the client and the instance once both
/// sides have switched protocols. Counted in flight while open; closed when
/// the backend is forgotten or the shutdown grace period ends.
fn spawn_tunnel(
    ctx: &Arc<ConnCtx>,
    in_flight: InFlight,
    client: hyper::upgrade::OnUpgrade,
    (mut upstream, early): (tokio::net::TcpStream, Bytes),
) {
    let conn = Arc::clone(ctx);
    ctx.tasks.spawn(async move {
        let backend_gone = in_flight.backend().token.clone();
        let instance = in_flight.backend().instance.clone();
        let run = async {
            let mut client = TokioIo::new(client.await.map_err(|e| e.to_string())?);
            // What the instance sent right after its 101 head.
            if !early.is_empty() {
                tokio::io::AsyncWriteExt::write_all(&mut client, &early).await.map_err(|e| e.to_string())?;
            }
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await.map_err(|e| e.to_string())
        };
        tokio::select! {
            result = run => match result {
                Ok((up, down)) => tracing::debug!(%instance, up, down, "upgraded connection closed"),
                Err(err) => tracing::debug!(%instance, error = %err, "upgraded connection failed"),
            },
            _ = backend_gone.cancelled() => tracing::debug!(%instance, "upgraded connection closed: backend removed"),
            _ = conn.signal.forced() => tracing::debug!(%instance, "upgraded connection closed: shutdown"),
        }
        drop(in_flight);
        conn.unregister();
    });
}

fn error_response(err: &ProxyError, request_id: HeaderValue, phase: PhaseGuard, close: bool) -> Response<ProxyBody> {
    let status = err.status();
    let body = match status {
        StatusCode::SERVICE_UNAVAILABLE => {
            let mut resp = text_response(status, Bytes::from_static(PAGE_503.as_bytes()), request_id, phase, close);
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
        StatusCode::GATEWAY_TIMEOUT => BODY_504,
        StatusCode::BAD_GATEWAY => BODY_502,
        StatusCode::BAD_REQUEST => BODY_400,
        StatusCode::PAYLOAD_TOO_LARGE => BODY_413,
        StatusCode::REQUEST_TIMEOUT => BODY_408,
        _ => BODY_500,
    };
    text_response(status, Bytes::from_static(body.as_bytes()), request_id, phase, close)
}

/// A plain-text answer of the proxy's own. `close` asks an HTTP/1 client's
/// connection to close after it.
fn text_response(
    status: StatusCode,
    body: Bytes,
    request_id: HeaderValue,
    phase: PhaseGuard,
    close: bool,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body, Some(phase)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(headers::X_REQUEST_ID, request_id);
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
