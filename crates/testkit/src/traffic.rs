//! A traffic layer whose backends are rows in a table and whose health the
//! test decides.

use crate::journal::{Entry, Journal};
use crate::lock;
use nonstop_core::process::HealthCheck;
use nonstop_core::traffic::{
    Backend, BackendFigures, BackendHealth, BackendStatus, DrainOutcome, HealthEvent, InitialHealth, RouteKey, Split,
    Traffic,
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
    /// Splits in force now.
    splits: BTreeMap<RouteKey, Split>,
    /// Every `set_split` call, in order.
    split_calls: Vec<(RouteKey, Option<Split>)>,
    /// Counters the test set, by instance (kept after the backend goes,
    /// reported only while it is a backend of the route asked).
    figures: BTreeMap<InstanceId, BackendFigures>,
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
                    splits: BTreeMap::new(),
                    split_calls: Vec::new(),
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

    fn set_split(&self, route: &RouteKey, split: Option<&Split>) {
        {
            let mut st = self.state();
            st.split_calls.push((route.clone(), split.cloned()));
            match split {
                Some(s) => st.splits.insert(route.clone(), s.clone()),
                None => st.splits.remove(route),
            };
        }
        self.inner.journal.bump();
    }

    async fn figures(&self, route: &RouteKey) -> Vec<BackendFigures> {
        let st = self.state();
        st.backends
            .iter()
            .filter(|(_, b)| &b.route == route)
            .map(|(id, _)| st.figures.get(id).cloned().unwrap_or_else(|| BackendFigures::new(id.clone())))
            .collect()
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
}

impl FakeTraffic {
    /// The split of `route` now.
    pub fn split(&self, route: &RouteKey) -> Option<Split> {
        self.state().splits.get(route).cloned()
    }

    /// Every `set_split` call so far, in order.
    pub fn split_calls(&self) -> Vec<(RouteKey, Option<Split>)> {
        self.state().split_calls.clone()
    }

    /// Set an instance's counters as [`Traffic::figures`] reports them
    /// (while it is a backend), replacing what was set before.
    pub fn set_figures(&self, figures: BackendFigures) {
        self.state().figures.insert(figures.instance.clone(), figures);
        self.inner.journal.bump();
    }

    /// Count `requests` more answers of `instance`, `errors_5xx` of them
    /// 5xx, each taking `latency`.
    pub fn record_requests(&self, instance: &InstanceId, requests: u64, errors_5xx: u64, latency: Duration) {
        {
            let mut st = self.state();
            let f = st.figures.entry(instance.clone()).or_insert_with(|| BackendFigures::new(instance.clone()));
            f.requests += requests;
            f.errors_5xx += errors_5xx.min(requests);
            let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            f.latency.record_n(nonstop_core::traffic::latency_bucket(us), requests);
        }
        self.inner.journal.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::process::StatusRange;

    fn check() -> HealthCheck {
        HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            expect_status: StatusRange { min: 200, max: 399 },
            host: None,
            smoke: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn splits_are_recorded_and_figures_are_what_the_test_set() {
        let t = FakeTraffic::default();
        let route = RouteKey("blog/default".into());
        let web = |slot| InstanceId::new(ProcessName::new("web").unwrap(), slot, 1);
        for slot in 1..=2 {
            let backend = Backend { instance: web(slot), addr: format!("127.0.0.1:{}", 5000 + slot).parse().unwrap() };
            t.add(&route, backend, check(), InitialHealth::AssumeHealthy);
        }
        let split = Split { instances: vec![web(2)], percent: 5 };
        t.set_split(&route, Some(&split));
        assert_eq!(t.split(&route), Some(split.clone()));
        t.set_split(&route, None);
        assert_eq!(t.split(&route), None);
        assert_eq!(t.split_calls(), vec![(route.clone(), Some(split)), (route.clone(), None)]);

        // Backends without figures set report zeros; set ones add up.
        assert_eq!(t.figures(&route).await, vec![BackendFigures::new(web(1)), BackendFigures::new(web(2))]);
        t.record_requests(&web(2), 20, 3, Duration::from_millis(250));
        t.record_requests(&web(2), 80, 0, Duration::from_millis(5));
        let figures = t.figures(&route).await;
        assert_eq!((figures[1].requests, figures[1].errors_5xx), (100, 3));
        assert!(figures[1].latency.quantile_ms(0.95) >= 250.0);
        assert!(figures[1].latency.quantile_ms(0.5) < 10.0);
        // Another route, or a backend gone: not reported.
        assert!(t.figures(&RouteKey("other".into())).await.is_empty());
        t.remove(&web(2));
        assert_eq!(t.figures(&route).await.len(), 1);
    }
}
