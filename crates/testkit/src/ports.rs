//! Fakes of the engine's two small ports: where the proxy listens, and the
//! last log lines of an instance.

use crate::lock;
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
}

/// An [`Ingress`] that binds nothing.
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
        Ok(())
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
