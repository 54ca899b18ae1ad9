//! A traffic layer whose backends are rows in a table and whose health the
//! test decides.

use crate::journal::{Entry, Journal};
use crate::lock;
use nonstop_core::process::HealthCheck;
use nonstop_core::traffic::{
    Backend, BackendHealth, BackendStatus, DrainOutcome, HealthEvent, InitialHealth, RouteKey, Traffic,
};
use nonstop_core::{InstanceId, ProcessName};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// A call of [`Traffic::add`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCall {
    pub route: RouteKey,
    pub backend: Backend,
    pub check: HealthCheck,
    pub initial: InitialHealth,
}

/// Whether a new (pending) backend turns healthy by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoHealth {
    /// Healthy this long after it was added.
    After(Duration),
    /// Stays pending until the test says otherwise.
    Never,
}

struct BackendEntry {
    route: RouteKey,
    addr: SocketAddr,
    health: BackendHealth,
    last_checks: Vec<String>,
}

struct State {
    backends: BTreeMap<InstanceId, BackendEntry>,
    adds: Vec<AddCall>,
    drains: Vec<(InstanceId, Duration)>,
    removes: Vec<InstanceId>,
    auto: BTreeMap<ProcessName, AutoHealth>,
    default_auto: AutoHealth,
    drain_delay: Duration,
    /// (fewest, most) healthy backends per process since the last reset.
    watermarks: BTreeMap<ProcessName, (usize, usize)>,
    /// Routes in maintenance now.
    maintenance: BTreeMap<RouteKey, nonstop_core::maintenance::Maintenance>,
    /// Every `set_maintenance` call, in order (`true`: on).
    maintenance_calls: Vec<(RouteKey, bool)>,
    /// Every `set_split` call, in order.
    splits: Vec<(RouteKey, Option<nonstop_core::traffic::Split>)>,
    /// What `figures` answers, per instance (set by tests).
    figures: BTreeMap<InstanceId, nonstop_core::traffic::BackendFigures>,
}

impl State {
    fn healthy(&self, process: &ProcessName) -> usize {
        self.backends.iter().filter(|(id, b)| &id.process == process && b.health == BackendHealth::Healthy).count()
    }

    fn update_watermarks(&mut self, process: &ProcessName) {
        let n = self.healthy(process);
        let w = self.watermarks.entry(process.clone()).or_insert((n, n));
        w.0 = w.0.min(n);
        w.1 = w.1.max(n);
    }
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<HealthEvent>,
    journal: Journal,
}

/// A [`Traffic`] that routes nothing. Clones share the same table.
#[derive(Clone)]
pub struct FakeTraffic {
    inner: Arc<Inner>,
}

impl Default for FakeTraffic {
    fn default() -> Self {
        Self::new(Journal::new())
    }
}

impl FakeTraffic {
    /// New backends turn healthy at once unless told otherwise.
    pub fn new(journal: Journal) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    backends: BTreeMap::new(),
                    adds: Vec::new(),
                    drains: Vec::new(),
                    removes: Vec::new(),
                    auto: BTreeMap::new(),
                    default_auto: AutoHealth::After(Duration::ZERO),
                    drain_delay: Duration::ZERO,
                    watermarks: BTreeMap::new(),
                    maintenance: BTreeMap::new(),
                    maintenance_calls: Vec::new(),
                    splits: Vec::new(),
                    figures: BTreeMap::new(),
                }),
                events: broadcast::channel(1024).0,
                journal,
            }),
        }
    }

    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    // ------------------------------------------------------------ behaviour

    /// Whether new backends of `process` turn healthy by themselves.
    pub fn set_auto_health(&self, process: &ProcessName, auto: AutoHealth) {
        self.state().auto.insert(process.clone(), auto);
    }

    /// The same, for processes without their own setting.
    pub fn set_default_auto_health(&self, auto: AutoHealth) {
        self.state().default_auto = auto;
    }

    /// `drain` takes this long (at most its timeout; longer ends in
    /// `TimedOut`).
    pub fn set_drain_delay(&self, delay: Duration) {
        self.state().drain_delay = delay;
    }

    /// Set a backend's health as the checks would, with the evidence, and
    /// tell subscribers. Returns false (and tells nobody) for an unknown
    /// backend.
    pub fn set_health(&self, id: &InstanceId, health: BackendHealth, detail: &str) -> bool {
        {
            let mut st = self.state();
            let Some(b) = st.backends.get_mut(id) else {
                return false;
            };
            b.health = health;
            if !detail.is_empty() {
                b.last_checks.push(detail.to_string());
                if b.last_checks.len() > 5 {
                    b.last_checks.remove(0);
                }
            }
            st.update_watermarks(&id.process);
        }
        self.inner.journal.push(Entry::Health(id.clone(), health));
        let _ = self.inner.events.send(HealthEvent {
            instance: id.clone(),
            health,
            detail: detail.to_string(),
            cause: Default::default(),
        });
        true
    }

    /// Start counting the fewest/most healthy backends again from now.
    pub fn reset_watermarks(&self) {
        let mut st = self.state();
        let processes: Vec<ProcessName> =
            st.backends.keys().map(|i| i.process.clone()).chain(st.watermarks.keys().cloned()).collect();
        st.watermarks.clear();
        for p in processes {
            let n = st.healthy(&p);
            st.watermarks.insert(p, (n, n));
        }
    }

    // ------------------------------------------------------------- reading

    pub fn adds(&self) -> Vec<AddCall> {
        self.state().adds.clone()
    }

    pub fn drains(&self) -> Vec<InstanceId> {
        self.state().drains.iter().map(|(i, _)| i.clone()).collect()
    }

    pub fn drain_calls(&self) -> Vec<(InstanceId, Duration)> {
        self.state().drains.clone()
    }

    pub fn removes(&self) -> Vec<InstanceId> {
        self.state().removes.clone()
    }

    /// The backends known now, with their health.
    pub fn backends(&self) -> BTreeMap<InstanceId, BackendHealth> {
        self.state().backends.iter().map(|(id, b)| (id.clone(), b.health)).collect()
    }

    pub fn health_of(&self, id: &InstanceId) -> Option<BackendHealth> {
        self.state().backends.get(id).map(|b| b.health)
    }

    pub fn route_of(&self, id: &InstanceId) -> Option<RouteKey> {
        self.state().backends.get(id).map(|b| b.route.clone())
    }

    /// Healthy (in rotation) backends of `process` now.
    pub fn healthy_count(&self, process: &ProcessName) -> usize {
        self.state().healthy(process)
    }

    /// The fewest and most healthy backends of `process` at any moment
    /// since the start or the last [`FakeTraffic::reset_watermarks`].
    pub fn healthy_watermarks(&self, process: &ProcessName) -> (usize, usize) {
        let st = self.state();
        st.watermarks.get(process).copied().unwrap_or_else(|| {
            let n = st.healthy(process);
            (n, n)
        })
    }

    /// Resolve once `cond` holds (re-checked after every change).
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&FakeTraffic) -> bool) {
        self.inner.journal.wait_for(what, || cond(self)).await
    }

    /// Resolve once a backend for `id` exists.
    pub async fn wait_added(&self, id: &InstanceId) {
        let what = format!("a backend for {id}");
        self.wait_for(&what, |t| t.health_of(id).is_some()).await
    }
}

impl Traffic for FakeTraffic {
    fn add(&self, route: &RouteKey, backend: Backend, check: HealthCheck, initial: InitialHealth) {
        let id = backend.instance.clone();
        let auto = {
            let mut st = self.state();
            st.adds.push(AddCall { route: route.clone(), backend: backend.clone(), check: check.clone(), initial });
            let health = match initial {
                InitialHealth::Pending => BackendHealth::Pending,
                InitialHealth::AssumeHealthy => BackendHealth::Healthy,
            };
            st.backends.insert(
                id.clone(),
                BackendEntry { route: route.clone(), addr: backend.addr, health, last_checks: Vec::new() },
            );
            st.update_watermarks(&id.process);
            if initial == InitialHealth::Pending {
                st.auto.get(&id.process).copied().unwrap_or(st.default_auto)
            } else {
                AutoHealth::Never
            }
        };
        self.inner.journal.push(Entry::Add(id.clone(), initial));
        if let AutoHealth::After(delay) = auto {
            let me = self.clone();
            let detail = format!("GET {} -> 200", check.path);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if me.health_of(&id) == Some(BackendHealth::Pending) {
                    me.set_health(&id, BackendHealth::Healthy, &detail);
                }
            });
        }
    }

    async fn drain(&self, instance: &InstanceId, timeout: Duration) -> DrainOutcome {
        let delay = {
            let mut st = self.state();
            st.drains.push((instance.clone(), timeout));
            st.drain_delay
        };
        self.inner.journal.push(Entry::Drain(instance.clone()));
        if !self.set_health(instance, BackendHealth::Draining, "") {
            return DrainOutcome::Unknown;
        }
        let outcome = if delay > timeout {
            tokio::time::sleep(timeout).await;
            DrainOutcome::TimedOut { in_flight: 1 }
        } else {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            DrainOutcome::Drained
        };
        let forgot = {
            let mut st = self.state();
            let forgot = st.backends.remove(instance).is_some();
            st.update_watermarks(&instance.process);
            forgot
        };
        if forgot {
            self.inner.journal.bump();
        }
        outcome
    }

    fn remove(&self, instance: &InstanceId) {
        {
            let mut st = self.state();
            st.removes.push(instance.clone());
            st.backends.remove(instance);
            st.update_watermarks(&instance.process);
        }
        self.inner.journal.push(Entry::Remove(instance.clone()));
    }

    fn status(&self, instance: &InstanceId) -> Option<BackendStatus> {
        let st = self.state();
        let b = st.backends.get(instance)?;
        Some(BackendStatus {
            instance: instance.clone(),
            addr: b.addr,
            health: b.health,
            in_flight: 0,
            last_checks: b.last_checks.clone(),
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<HealthEvent> {
        self.inner.events.subscribe()
    }

    fn set_split(&self, route: &RouteKey, split: Option<&nonstop_core::traffic::Split>) {
        self.state().splits.push((route.clone(), split.cloned()));
    }

    fn figures(
        &self,
        route: &RouteKey,
    ) -> impl std::future::Future<Output = Vec<nonstop_core::traffic::BackendFigures>> + Send {
        let _ = route;
        let st = self.state();
        let figures = st
            .backends
            .keys()
            .map(|id| {
                st.figures.get(id).cloned().unwrap_or_else(|| nonstop_core::traffic::BackendFigures {
                    instance: id.clone(),
                    requests: 0,
                    errors_5xx: 0,
                    latency: Default::default(),
                })
            })
            .collect();
        std::future::ready(figures)
    }

    fn set_maintenance(&self, route: &RouteKey, maintenance: Option<&nonstop_core::maintenance::Maintenance>) {
        {
            let mut st = self.state();
            st.maintenance_calls.push((route.clone(), maintenance.is_some()));
            match maintenance {
                Some(m) => st.maintenance.insert(route.clone(), m.clone()),
                None => st.maintenance.remove(route),
            };
        }
        self.inner.journal.push(Entry::Maintenance(maintenance.is_some()));
    }
}

impl FakeTraffic {
    /// The maintenance setting of `route` now.
    pub fn maintenance(&self, route: &RouteKey) -> Option<nonstop_core::maintenance::Maintenance> {
        self.state().maintenance.get(route).cloned()
    }

    /// Every `set_maintenance` call so far (`true`: on), in order.
    pub fn maintenance_calls(&self) -> Vec<(RouteKey, bool)> {
        self.state().maintenance_calls.clone()
    }

    /// Every `set_split` call, in order.
    pub fn splits(&self) -> Vec<(RouteKey, Option<nonstop_core::traffic::Split>)> {
        self.state().splits.clone()
    }

    /// Make `figures` answer these counters for `figures.instance`.
    pub fn set_figures(&self, figures: nonstop_core::traffic::BackendFigures) {
        self.state().figures.insert(figures.instance.clone(), figures);
    }
}
