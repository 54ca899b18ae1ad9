//! Per-backend traffic figures (requests, 5xx, a latency histogram) for a
//! deploy's live-traffic gate, and the split that gives a canary its share.
//!
//! Counting is three relaxed atomic adds on the backend the request
//! already holds: no lock, no allocation. The engine reads the counters
//! ([`Proxy::figures`]) at a window's start and end and compares releases.

use crate::Proxy;
use nonstop_core::traffic::{latency_bucket, BackendFigures, LatencyHistogram, RouteKey, Split, LATENCY_BOUNDS_US};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One backend's counters since it was added.
pub(crate) struct Counters {
    requests: AtomicU64,
    errors_5xx: AtomicU64,
    latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors_5xx: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    /// An answer with `status` came `took` after the request was sent.
    pub fn record(&self, status: u16, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if (500..600).contains(&status) {
            self.errors_5xx.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency[latency_bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self, instance: &nonstop_core::InstanceId) -> BackendFigures {
        BackendFigures {
            instance: instance.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            errors_5xx: self.errors_5xx.load(Ordering::Relaxed),
            latency: LatencyHistogram { counts: self.latency.iter().map(|c| c.load(Ordering::Relaxed)).collect() },
        }
    }
}

/// A route's split as the request path uses it: which of the route's
/// backends (same order) are the canary, and its share.
pub(crate) struct RouteSplit {
    pub percent: u8,
    pub members: Box<[bool]>,
    /// Requests routed so far (which one is the canary's: `split_takes`).
    pub n: AtomicU64,
}

impl RouteSplit {
    pub fn new(split: &Split, route_backends: &[std::sync::Arc<crate::backend::BackendState>]) -> Self {
        let members = route_backends.iter().map(|b| split.instances.contains(&b.instance)).collect();
        Self { percent: split.percent, members, n: AtomicU64::new(0) }
    }

    /// Whether the next request should go to the canary group.
    pub fn next_to_canary(&self) -> bool {
        nonstop_core::traffic::split_takes(self.n.fetch_add(1, Ordering::Relaxed), self.percent)
    }
}

impl Proxy {
    /// See [`nonstop_core::traffic::Traffic::set_split`].
    pub fn set_split(&self, route: &RouteKey, split: Option<&Split>) {
        let mut reg = self.registry();
        match split {
            Some(s) => {
                tracing::info!(route = %route.0, percent = s.percent, instances = ?s.instances, "traffic split");
                reg.splits.insert(route.clone(), s.clone());
            }
            None => {
                if reg.splits.remove(route).is_some() {
                    tracing::info!(route = %route.0, "traffic split removed");
                }
            }
        }
        self.publish(&reg);
    }

    /// Every backend of `route` (draining ones included) and its counters.
    pub fn figures(&self, route: &RouteKey) -> Vec<BackendFigures> {
        let reg = self.registry();
        let mut out: Vec<BackendFigures> = reg
            .backends
            .values()
            .filter(|e| &e.route == route)
            .map(|e| e.state.counters.read(&e.state.instance))
            .collect();
        out.sort_by(|a, b| a.instance.cmp(&b.instance));
        out
    }
}
