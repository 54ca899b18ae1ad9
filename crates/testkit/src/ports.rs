//! Fakes of the engine's two small ports: where the proxy listens, and the
//! last log lines of an instance.

use crate::lock;
use nonstop_core::ingress::HostClaims;
use nonstop_core::traffic::RouteKey;
use nonstop_core::{AppName, EnvironmentId, InstanceId};
use nonstop_engine::{Ingress, IngressError, InstanceLogs};
use std::net::SocketAddr;
use std::sync::Mutex;

#[derive(Default)]
struct IngressState {
    fail: Option<String>,
    listening: Option<(SocketAddr, RouteKey)>,
    listens: Vec<(SocketAddr, RouteKey)>,
    closes: usize,
    /// Hosts and default by route, under the proxy's rules.
    claims: HostClaims,
    host_calls: Vec<HostsCall>,
}

/// One call of [`Ingress::set_hosts`] or [`Ingress::remove_route`] on a
/// [`FakeIngress`], with its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostsCall {
    Set { route: RouteKey, hosts: Vec<String>, default: bool, result: Result<(), IngressError> },
    Remove { route: RouteKey },
}

/// An [`Ingress`] that binds nothing. Host claims follow the proxy's
/// rules ([`HostClaims`]: a host claimed by another route, or a second
/// default, is refused and changes nothing), so engine tests can assert
/// both what was asked and what was refused.
#[derive(Default)]
pub struct FakeIngress {
    state: Mutex<IngressState>,
}

impl FakeIngress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every `listen` from now on fails with `reason` (e.g. "address in use").
    pub fn fail_listen(&self, reason: &str) {
        lock(&self.state).fail = Some(reason.to_string());
    }

    pub fn clear_failure(&self) {
        lock(&self.state).fail = None;
    }

    /// Where it listens now, and for which route.
    pub fn listening(&self) -> Option<(SocketAddr, RouteKey)> {
        lock(&self.state).listening.clone()
    }

    /// Every successful `listen`, in order.
    pub fn listens(&self) -> Vec<(SocketAddr, RouteKey)> {
        lock(&self.state).listens.clone()
    }

    pub fn closes(&self) -> usize {
        lock(&self.state).closes
    }

    /// Every `set_hosts` and `remove_route`, in order, refused ones too.
    pub fn host_calls(&self) -> Vec<HostsCall> {
        lock(&self.state).host_calls.clone()
    }

    /// The claims now: `.get(route)` gives a route's normalised hosts and
    /// default flag, `.default_route()` the route unclaimed hosts reach
    /// (the `listen` route while it has no hosts, as in the proxy).
    pub fn claims(&self) -> HostClaims {
        lock(&self.state).claims.clone()
    }
}

impl Ingress for FakeIngress {
    fn listen(&self, proxy: &nonstop_core::process::ProxySpec, route: &RouteKey) -> Result<(), IngressError> {
        let addr = proxy.listen;
        let mut st = lock(&self.state);
        if let Some(reason) = &st.fail {
            return Err(IngressError::Listen(addr.to_string(), reason.clone()));
        }
        st.listening = Some((addr, route.clone()));
        st.listens.push((addr, route.clone()));
        st.claims.set_fallback(Some(route.clone()));
        Ok(())
    }

    fn set_hosts(&self, route: &RouteKey, hosts: &[String], default: bool) -> Result<(), IngressError> {
        let mut st = lock(&self.state);
        let result = st.claims.set(route, hosts, default).map_err(IngressError::from);
        let call = HostsCall::Set { route: route.clone(), hosts: hosts.to_vec(), default, result: result.clone() };
        st.host_calls.push(call);
        result
    }

    fn remove_route(&self, route: &RouteKey) {
        let mut st = lock(&self.state);
        st.claims.remove(route);
        st.host_calls.push(HostsCall::Remove { route: route.clone() });
    }

    fn close(&self) {
        let mut st = lock(&self.state);
        st.listening = None;
        st.closes += 1;
    }
}

/// [`InstanceLogs`] with canned lines: every instance "logged" the same
/// lines, prefixed with its slot name.
#[derive(Default)]
pub struct FakeLogs {
    lines: Mutex<Vec<String>>,
    asked: Mutex<Vec<InstanceId>>,
}

impl FakeLogs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_lines(&self, lines: &[&str]) {
        *lock(&self.lines) = lines.iter().map(|l| l.to_string()).collect();
    }

    /// Instances whose logs were asked for, in order.
    pub fn asked(&self) -> Vec<InstanceId> {
        lock(&self.asked).clone()
    }
}

impl InstanceLogs for FakeLogs {
    fn tail(&self, _app: &AppName, _env: &EnvironmentId, instance: &InstanceId, lines: usize) -> Vec<String> {
        lock(&self.asked).push(instance.clone());
        let all = lock(&self.lines);
        let skip = all.len().saturating_sub(lines);
        all[skip..].iter().map(|l| format!("{}: {l}", instance.slot_name())).collect()
    }
}
