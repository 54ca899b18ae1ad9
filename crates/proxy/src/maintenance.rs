//! Maintenance mode on the request path.
//!
//! [`Proxy::set_maintenance`] compiles a route's
//! [`Maintenance`] into a [`Gate`] (the page as shared `Bytes`, the header
//! values made once) and publishes it with the route table snapshot, so a
//! request sees a route's maintenance and its backends from the same
//! snapshot. The request path checks it before static files and before a
//! backend is chosen, and pays for it only while some route is in
//! maintenance: one relaxed atomic load otherwise. Then: one snapshot load,
//! the route lookup by host, a scan of the allow list; no lock, no
//! allocation (the page's bytes are shared, not copied).
//!
//! The client is the TCP peer; for a peer that is one of
//! `trusted_proxies`, the address its `X-Forwarded-For` names last (the
//! client it saw), when that is an address.
//!
//! Switching is per request: a request that starts after the switch sees
//! it, on a connection already open too; a request in flight finishes as it
//! started; an upgraded connection (a WebSocket) already open stays open.

use crate::body::ProxyBody;
use crate::headers;
use crate::server::{ConnCtx, PhaseGuard};
use crate::{Inner, Proxy};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use ipnet::IpNet;
use nonstop_core::maintenance::Maintenance;
use nonstop_core::traffic::RouteKey;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const HTML: HeaderValue = HeaderValue::from_static("text/html; charset=utf-8");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// A route's maintenance, ready for the request path.
pub(crate) struct Gate {
    page: Bytes,
    retry_after: HeaderValue,
    allow: Box<[IpNet]>,
}

impl Gate {
    fn new(m: &Maintenance) -> Gate {
        Gate {
            page: Bytes::copy_from_slice(m.page_or_default().as_bytes()),
            retry_after: HeaderValue::from(m.retry_after_secs),
            allow: m.allow.clone().into_boxed_slice(),
        }
    }

    fn allows(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.allow.iter().any(|net| net.contains(&addr))
    }

    fn answer(&self, request_id: HeaderValue, phase: PhaseGuard) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(self.page.clone(), Some(phase)));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HTML);
        h.insert(header::RETRY_AFTER, self.retry_after.clone());
        h.insert(header::CACHE_CONTROL, NO_STORE);
        h.insert(headers::X_REQUEST_ID, request_id);
        resp
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("page_bytes", &self.page.len()).field("allow", &self.allow).finish()
    }
}

impl Proxy {
    /// Put `route` in maintenance, or take it out (`None`): see
    /// [`nonstop_core::traffic::Traffic::set_maintenance`]. Effective for
    /// every request that starts after it returns.
    pub fn set_maintenance(&self, route: &RouteKey, maintenance: Option<&Maintenance>) {
        let mut reg = self.registry();
        match maintenance {
            Some(m) => {
                reg.maintenance.insert(route.clone(), Arc::new(Gate::new(m)));
                tracing::info!(route = %route.0, allow = ?m.allow, retry_after = m.retry_after_secs, "maintenance on");
            }
            None => {
                if reg.maintenance.remove(route).is_some() {
                    tracing::info!(route = %route.0, "maintenance off");
                }
            }
        }
        // The snapshot first, then the flag: a request that sees the flag
        // sees the snapshot too; one that does not started before.
        self.publish(&reg);
        self.inner.maintenance_on.store(!reg.maintenance.is_empty(), Ordering::Release);
    }

    /// The routes in maintenance now.
    pub fn maintenance_routes(&self) -> Vec<RouteKey> {
        self.registry().maintenance.keys().cloned().collect()
    }
}

/// The maintenance answer to `req`, if its route is in maintenance and its
/// client is not allowed; otherwise the request id and guard back.
pub(crate) fn check<B>(
    inner: &Inner,
    ctx: &ConnCtx,
    req: &Request<B>,
    request_id: HeaderValue,
    phase: PhaseGuard,
) -> Result<Response<ProxyBody>, (HeaderValue, PhaseGuard)> {
    if !inner.maintenance_on.load(Ordering::Acquire) {
        return Err((request_id, phase));
    }
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers().get(header::HOST).map(HeaderValue::as_bytes),
    };
    let snapshot = inner.table.load();
    let Some(gate) = snapshot.route_for(host).and_then(|r| r.maintenance.as_ref()) else {
        return Err((request_id, phase));
    };
    if gate.allows(client(ctx, req.headers())) {
        return Err((request_id, phase));
    }
    Ok(gate.answer(request_id, phase))
}

/// The client's address: the peer's, or for a trusted proxy the last
/// address in `X-Forwarded-For` (the client that proxy saw).
fn client(ctx: &ConnCtx, h: &HeaderMap) -> IpAddr {
    if ctx.trusted {
        let forwarded = h
            .get_all(headers::X_FORWARDED_FOR)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok());
        if let Some(addr) = forwarded {
            return addr;
        }
    }
    ctx.peer.ip()
}
