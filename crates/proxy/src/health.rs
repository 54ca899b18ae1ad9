//! Active health checks (one task per backend) and the one place where
//! health transitions are published.

use crate::backend::BackendState;
use crate::body::UpBody;
use crate::error::clean_io_message;
use http::{header, Request};
use hyper_util::rt::TokioIo;
use nonstop_core::process::HealthCheck;
use nonstop_core::process::SmokeCheck;
use nonstop_core::traffic::{BackendHealth, HealthCause, HealthEvent};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, Notify};

/// What checkers and the request path share: the event stream and the
/// "something may have become available" signal that 503-bound requests
/// wait on.
pub(crate) struct Shared {
    pub events: broadcast::Sender<HealthEvent>,
    pub changed: Notify,
}

impl Shared {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(1024);
        Self { events, changed: Notify::new() }
    }

    /// Publish a transition decided under `backend.slow()` (still held by the
    /// caller, so events of one backend go out in order).
    pub fn publish(&self, backend: &BackendState, health: BackendHealth, detail: String) {
        self.publish_because(backend, health, detail, HealthCause::Check)
    }

    fn publish_because(&self, backend: &BackendState, health: BackendHealth, detail: String, cause: HealthCause) {
        backend.store_health(health);
        tracing::info!(instance = %backend.instance, addr = %backend.addr, health = health.as_str(), %detail, "backend health changed");
        let _ = self.events.send(HealthEvent { instance: backend.instance.clone(), health, detail, cause });
        if health == BackendHealth::Healthy {
            self.changed.notify_waiters();
        }
    }

    pub fn record_check(&self, backend: &BackendState, verdict: Verdict, result: String) {
        self.record_check_at(backend, verdict, result, Instant::now())
    }

    /// [`Shared::record_check`] at `now`: a pass while an outlier ejection
    /// holds the backend out is not counted.
    pub fn record_check_at(&self, backend: &BackendState, verdict: Verdict, result: String, now: Instant) {
        let mut slow = backend.slow();
        let held = slow.held_until.filter(|until| now < *until);
        let (changed, result) = match verdict {
            Verdict::Pass if held.is_some() => {
                slow.machine.hold();
                let left = held.map_or(0, |until| until.saturating_duration_since(now).as_secs());
                (None, format!("{result} (ejected as an outlier: not counted for {left}s more)"))
            }
            Verdict::Pass => (slow.machine.observe(true), result),
            Verdict::Fail => (slow.machine.observe(false), result),
            // Our own shortage says nothing about the instance: neither a
            // pass nor a failure (the counts in a row go on after it).
            Verdict::Inconclusive => (None, result),
        };
        if held.is_none() {
            slow.held_until = None;
        }
        BackendState::push_check(&mut slow, result.clone());
        if let Some(health) = changed {
            if health == BackendHealth::Healthy {
                slow.ejected = false;
                backend.counters.reset_streak();
            }
            self.publish(backend, health, result);
        }
    }

    /// Eject `backend` as an outlier until `until` (its `ejections`th
    /// time), if it is still in rotation.
    pub fn eject(&self, backend: &BackendState, detail: String, until: Instant, ejections: u32) {
        let mut slow = backend.slow();
        let Some(health) = slow.machine.eject() else { return };
        slow.ejected = true;
        slow.held_until = Some(until);
        slow.last_ejection_end = Some(until);
        slow.ejections = ejections;
        backend.counters.reset_streak();
        BackendState::push_check(&mut slow, format!("requests -> {detail}"));
        self.publish_because(backend, health, detail, HealthCause::Outlier);
    }

    /// A request proved the backend down.
    pub fn passive_failure(&self, backend: &BackendState, detail: String) {
        let mut slow = backend.slow();
        BackendState::push_check(&mut slow, format!("request -> {detail}"));
        if let Some(health) = slow.machine.passive_failure() {
            self.publish(backend, health, detail);
        }
    }

    /// A smoke check failed: the backend leaves (never enters) rotation
    /// for good, and says why.
    pub fn smoke_failed(&self, backend: &BackendState, detail: String) {
        let mut slow = backend.slow();
        BackendState::push_check(&mut slow, detail.clone());
        self.publish_because(backend, BackendHealth::Unhealthy, detail, HealthCause::Smoke);
    }

    pub fn drain(&self, backend: &BackendState) {
        let mut slow = backend.slow();
        if let Some(health) = slow.machine.drain() {
            self.publish(backend, health, "draining".to_string());
        }
    }
}

/// What one check says about the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Fail,
    /// The check could not be made for a shortage of the proxy's own (no
    /// file descriptor, socket memory or local port left,
    /// [`crate::is_local_exhaustion`]): no evidence either way, so it
    /// counts neither towards healthy nor towards unhealthy. An instance
    /// is never taken out of rotation because the daemon ran out of
    /// descriptors.
    Inconclusive,
}

/// Check `backend` every `interval` until its token is cancelled or it is
/// draining. The first check runs at once.
pub(crate) async fn run_checker(backend: Arc<BackendState>, shared: Arc<Shared>) {
    // Whether the last check was inconclusive: one log line when checks
    // become inconclusive, not one per check.
    let mut inconclusive = false;
    // Smoke checks run once, after the first passing health check of an
    // instance that is not in rotation yet (a re-adopted one is).
    let mut smoke_due = !backend.check.smoke.is_empty() && backend.health() == BackendHealth::Pending;
    let mut ticker = tokio::time::interval(backend.check.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = backend.token.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if backend.health() == BackendHealth::Draining {
            return;
        }
        let (verdict, result) = tokio::select! {
            _ = backend.token.cancelled() => return,
            r = check_once(backend.addr, &backend.check) => r,
        };
        if backend.health() == BackendHealth::Draining {
            return;
        }
        tracing::trace!(instance = %backend.instance, %result, "health check");
        let was_inconclusive = std::mem::replace(&mut inconclusive, verdict == Verdict::Inconclusive);
        if inconclusive && !was_inconclusive {
            tracing::warn!(instance = %backend.instance, %result, "health check not made: the proxy is out of file descriptors (or sockets); the instance keeps its health until checks can be made again");
        }
        if verdict == Verdict::Pass && smoke_due {
            let smoke = tokio::select! {
                _ = backend.token.cancelled() => return,
                r = smoke_once(backend.addr, &backend.check) => r,
            };
            match smoke {
                (Verdict::Pass, _) => smoke_due = false,
                // Our own shortage: try again after the next check.
                (Verdict::Inconclusive, _) => continue,
                (Verdict::Fail, words) => {
                    shared.smoke_failed(&backend, format!("smoke check failed: {words}"));
                    return;
                }
            }
        }
        shared.record_check(&backend, verdict, result);
        backend.pool.prune();
    }
}

/// How long one smoke page may take: pages are slower than a health view.
const SMOKE_TIMEOUT_MIN: Duration = Duration::from_secs(10);
/// How much of a failing page's body the reason quotes.
const SMOKE_EXCERPT: usize = 160;

/// Run every smoke check of `check` once, in order; the first one that
/// does not pass stops them.
async fn smoke_once(addr: SocketAddr, check: &HealthCheck) -> (Verdict, String) {
    for smoke in &check.smoke {
        let (verdict, words) = smoke_page(addr, check, smoke).await;
        if verdict != Verdict::Pass {
            return (verdict, words);
        }
    }
    (Verdict::Pass, String::new())
}

/// `GET path` of one smoke check: the verdict, and `GET / -> 500: <body
/// excerpt>` when it fails.
async fn smoke_page(addr: SocketAddr, check: &HealthCheck, smoke: &SmokeCheck) -> (Verdict, String) {
    let timeout = check.timeout.max(SMOKE_TIMEOUT_MIN);
    let path = smoke.path.as_str();
    match tokio::time::timeout(timeout, fetch(addr, path, check.host.as_deref(), "nonstop-smoke-check", true)).await {
        Ok(Ok((status, _))) if smoke.expect_status.contains(status) => (Verdict::Pass, String::new()),
        Ok(Ok((status, body))) => {
            let excerpt = excerpt(&body);
            let expected = if smoke.expect_status.min == smoke.expect_status.max {
                smoke.expect_status.min.to_string()
            } else {
                format!("{}-{}", smoke.expect_status.min, smoke.expect_status.max)
            };
            let excerpt = if excerpt.is_empty() { String::new() } else { format!(": {excerpt}") };
            (Verdict::Fail, format!("GET {path} -> {status} (expected {expected}){excerpt}"))
        }
        Ok(Err(CheckError::Local(_))) => (Verdict::Inconclusive, String::new()),
        Ok(Err(CheckError::Instance(err))) => (Verdict::Fail, format!("GET {path} -> {err}")),
        Err(_) => (Verdict::Fail, format!("GET {path} -> timed out after {}ms", timeout.as_millis())),
    }
}

/// The start of a body as one printable line (HTML tags kept: Django's
/// error pages say what broke in their <title>).
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(SMOKE_EXCERPT * 4)]);
    let mut out = String::new();
    let mut last_space = true;
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        out.push(c);
        if out.chars().count() >= SMOKE_EXCERPT {
            out.push('…');
            break;
        }
    }
    out.trim().to_string()
}

/// One check on a fresh connection (as HAProxy does: it also proves that
/// the instance still accepts connections). Returns the verdict and a
/// summary as in `GET /health/ -> 200 in 3ms`.
pub(crate) async fn check_once(addr: SocketAddr, check: &HealthCheck) -> (Verdict, String) {
    let started = Instant::now();
    let path = if check.path.starts_with('/') { check.path.as_str() } else { "/" };
    match tokio::time::timeout(check.timeout, fetch(addr, path, check.host.as_deref(), "nonstop-health-check", false))
        .await
    {
        Ok(Ok((status, _))) => {
            let verdict = if check.expect_status.contains(status) { Verdict::Pass } else { Verdict::Fail };
            (verdict, format!("GET {path} -> {status} in {}ms", started.elapsed().as_millis()))
        }
        Ok(Err(CheckError::Local(err))) => (Verdict::Inconclusive, format!("GET {path} -> not checked: {err}")),
        Ok(Err(CheckError::Instance(err))) => (Verdict::Fail, format!("GET {path} -> {err}")),
        Err(_) => (Verdict::Fail, format!("GET {path} -> timed out after {}ms", check.timeout.as_millis())),
    }
}

/// Why a check got no status.
enum CheckError {
    /// The proxy could not open a socket or connection (its own shortage).
    Local(String),
    /// The instance (or the connection to it) failed.
    Instance(String),
}

/// `GET path` on a fresh connection: the status, and the first bytes of
/// the body when `body` is asked for.
async fn fetch(
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
    user_agent: &str,
    body: bool,
) -> Result<(u16, Vec<u8>), CheckError> {
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        let message = clean_io_message(&e.to_string()).to_string();
        if crate::limits::is_local_exhaustion(&e) {
            CheckError::Local(format!("the proxy could not open a connection: {message}"))
        } else {
            CheckError::Instance(format!("connect error: {message}"))
        }
    })?;
    let _ = stream.set_nodelay(true);
    let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, UpBody>(TokioIo::new(stream))
        .await
        .map_err(|e| CheckError::Instance(format!("error: {e}")))?;
    let req = Request::get(path)
        .header(header::HOST, host.map_or_else(|| addr.to_string(), str::to_string))
        .header(header::USER_AGENT, user_agent)
        .header(header::CONNECTION, "close")
        .body(UpBody::empty())
        .map_err(|e| CheckError::Instance(format!("error: {e}")))?;
    // Drive the connection here rather than spawning it: nothing outlives
    // the check.
    tokio::pin!(conn);
    let send = tx.send_request(req);
    tokio::pin!(send);
    let res = tokio::select! {
        biased;
        res = &mut send => res,
        res = &mut conn => match res {
            Err(e) => Err(e),
            // The connection may finish in the same poll that delivered the
            // response; the response (or hyper's error) is in `send` then.
            Ok(()) => send.await,
        },
    };
    let resp = res.map_err(|e| CheckError::Instance(format!("error: {}", clean_io_message(&e.to_string()))))?;
    let status = resp.status().as_u16();
    if !body {
        return Ok((status, Vec::new()));
    }
    // The start of the body, for the reason a smoke check failed; the
    // connection is driven while it is read.
    let mut incoming = resp.into_body();
    let mut bytes = Vec::new();
    let read = async {
        use http_body_util::BodyExt;
        while bytes.len() < SMOKE_EXCERPT * 4 {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        bytes.extend_from_slice(&data);
                    }
                }
                _ => break,
            }
        }
    };
    tokio::pin!(read);
    tokio::select! {
        () = &mut read => {}
        // The connection ended: what it delivered is buffered in the body.
        _ = &mut conn => read.await,
    }
    Ok((status, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::process::StatusRange;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One check against a raw listener: the request head it sent.
    async fn head_of_a_check(host: Option<&str>, answer: &str) -> (Verdict, String, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = answer.to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the check closed before its head ended");
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        let check = HealthCheck {
            path: "/health/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            expect_status: StatusRange { min: 200, max: 399 },
            host: host.map(str::to_string),
            smoke: Vec::new(),
        };
        let (verdict, summary) = check_once(addr, &check).await;
        (verdict, summary, server.await.unwrap())
    }

    #[tokio::test]
    async fn checks_send_the_configured_host_or_the_instance_address() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (verdict, summary, head) = head_of_a_check(Some("notes.example.com"), ok).await;
        assert_eq!(verdict, Verdict::Pass, "{summary}");
        assert!(head.starts_with("GET /health/ HTTP/1.1\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("\r\nhost: notes.example.com\r\n"), "{head}");
        let (_, _, head) = head_of_a_check(None, ok).await;
        assert!(head.to_ascii_lowercase().contains("\r\nhost: 127.0.0.1:"), "{head}");
        // What Django answers to a Host it does not allow.
        let refused = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (verdict, summary, _) = head_of_a_check(None, refused).await;
        assert_eq!(verdict, Verdict::Fail);
        assert!(summary.starts_with("GET /health/ -> 400 in "), "{summary}");
    }

    #[test]
    fn checks_that_cannot_be_made_count_neither_way() {
        use crate::backend::{BackendState, Pool};
        use nonstop_core::ids::{InstanceId, ProcessName};
        let check = HealthCheck {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            expect_status: StatusRange { min: 200, max: 399 },
            host: None,
            smoke: Vec::new(),
        };
        let backend = BackendState::new(
            InstanceId::new(ProcessName::new("web").unwrap(), 1, 1),
            "127.0.0.1:9".parse().unwrap(),
            check,
            BackendHealth::Healthy,
            Pool::new(1, 1, Duration::from_secs(1)),
            tokio_util::sync::CancellationToken::new(),
        );
        let shared = Shared::new();
        let mut events = shared.events.subscribe();
        for _ in 0..10 {
            shared.record_check(&backend, Verdict::Inconclusive, "not checked".into());
        }
        assert_eq!(backend.health(), BackendHealth::Healthy);
        assert!(events.try_recv().is_err(), "no health change");
        assert_eq!(backend.status().last_checks.last().map(String::as_str), Some("not checked"));
        // Real failures still count, and in a row across the gaps.
        shared.record_check(&backend, Verdict::Fail, "GET / -> 500".into());
        shared.record_check(&backend, Verdict::Inconclusive, "not checked".into());
        shared.record_check(&backend, Verdict::Fail, "GET / -> 500".into());
        assert_eq!(backend.health(), BackendHealth::Unhealthy);
        for _ in 0..10 {
            shared.record_check(&backend, Verdict::Inconclusive, "not checked".into());
        }
        assert_eq!(backend.health(), BackendHealth::Unhealthy, "nor towards healthy");
    }

    #[test]
    fn an_ejected_outlier_is_held_out_whatever_its_checks_say_then_comes_back_through_them() {
        use crate::backend::{BackendState, Pool};
        use nonstop_core::ids::{InstanceId, ProcessName};
        let check = HealthCheck {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            expect_status: StatusRange { min: 200, max: 399 },
            host: None,
            smoke: Vec::new(),
        };
        let backend = BackendState::new(
            InstanceId::new(ProcessName::new("web").unwrap(), 1, 1),
            "127.0.0.1:9".parse().unwrap(),
            check,
            BackendHealth::Healthy,
            Pool::new(1, 1, Duration::from_secs(1)),
            tokio_util::sync::CancellationToken::new(),
        );
        let shared = Shared::new();
        let mut events = shared.events.subscribe();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(10);
        shared.eject(&backend, "answered 5xx".into(), until, 1);
        let event = events.try_recv().unwrap();
        assert_eq!((event.health, event.cause), (BackendHealth::Unhealthy, HealthCause::Outlier));
        assert!(backend.ejected());
        assert_eq!(backend.ejections(), 1);
        // Passing checks during the ejection do not count.
        for s in 0..10 {
            shared.record_check_at(&backend, Verdict::Pass, "GET / -> 200".into(), t0 + Duration::from_secs(s));
        }
        assert_eq!(backend.health(), BackendHealth::Unhealthy);
        assert!(events.try_recv().is_err());
        // Afterwards, `healthy_threshold` passes bring it back.
        shared.record_check_at(&backend, Verdict::Pass, "GET / -> 200".into(), until);
        assert_eq!(backend.health(), BackendHealth::Unhealthy);
        shared.record_check_at(&backend, Verdict::Pass, "GET / -> 200".into(), until + Duration::from_secs(1));
        assert_eq!(backend.health(), BackendHealth::Healthy);
        assert_eq!(events.try_recv().unwrap().cause, HealthCause::Check);
        assert!(!backend.ejected());
        assert_eq!(backend.ejections(), 1, "the count stays: the next ejection is longer");
        // An ejection of a backend that is not in rotation is no ejection.
        shared.passive_failure(&backend, "connect error".into());
        let _ = events.try_recv();
        shared.eject(&backend, "answered 5xx".into(), until, 2);
        assert!(events.try_recv().is_err());
        assert!(!backend.ejected());
    }

    #[tokio::test]
    async fn a_refused_check_is_a_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let check = HealthCheck {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            expect_status: StatusRange { min: 200, max: 399 },
            host: None,
            smoke: Vec::new(),
        };
        let (verdict, summary) = check_once(addr, &check).await;
        assert_eq!(verdict, Verdict::Fail, "{summary}");
        assert!(summary.contains("connect error"), "{summary}");
    }
}
