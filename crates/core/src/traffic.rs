//! The traffic boundary: whatever routes requests to web instances and
//! health-checks them. nonstop's own proxy implements it locally; an ALB
//! target group would implement it on ECS.

use crate::ids::InstanceId;
use crate::process::HealthCheck;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// Which route table entry a backend belongs to. Routes are keyed by host
/// (per environment, later); the default route takes every host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteKey(pub String);

/// A web instance as the traffic layer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub instance: InstanceId,
    pub addr: SocketAddr,
}

/// What the traffic layer should assume before the first check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialHealth {
    /// New instance: no traffic until `healthy_threshold` checks pass.
    Pending,
    /// Re-adopted instance that was healthy before a daemon restart: keep
    /// serving, and let the checks (and passive failures) take it out.
    AssumeHealthy,
}

/// Health as the traffic layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendHealth {
    /// Not yet passed `healthy_threshold` checks: gets no traffic.
    Pending,
    /// In rotation.
    Healthy,
    /// Failed `unhealthy_threshold` checks or a connection: out of rotation,
    /// still checked, comes back after `healthy_threshold` passes.
    Unhealthy,
    /// Removed from rotation for good; in-flight requests finishing.
    Draining,
}

impl BackendHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendHealth::Pending => "pending",
            BackendHealth::Healthy => "healthy",
            BackendHealth::Unhealthy => "unhealthy",
            BackendHealth::Draining => "draining",
        }
    }
}

/// What a change of health was decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCause {
    /// The active health checks (or a drain, or a passive failure).
    #[default]
    Check,
    /// A smoke check failed: the instance answered its health check but
    /// not one of its pages. It never enters rotation.
    Smoke,
}

/// A change of health, with the evidence (for status and rollback reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthEvent {
    pub instance: InstanceId,
    pub health: BackendHealth,
    /// E.g. `GET /health/ -> 500` or `connect: connection refused`.
    pub detail: String,
    #[serde(default)]
    pub cause: HealthCause,
}

/// A backend's current state, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub instance: InstanceId,
    pub addr: SocketAddr,
    pub health: BackendHealth,
    pub in_flight: u64,
    /// The last few check results, newest last.
    pub last_checks: Vec<String>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainOutcome {
    /// Every in-flight request finished.
    Drained,
    /// `timeout` passed with this many requests still in flight.
    TimedOut { in_flight: u64 },
    /// The backend was not known.
    Unknown,
}

pub trait Traffic: Send + Sync + 'static {
    /// Add a backend and start health-checking it. It enters rotation once
    /// healthy (or at once with `AssumeHealthy`).
    fn add(&self, route: &RouteKey, backend: Backend, check: HealthCheck, initial: InitialHealth);

    /// Take a backend out of rotation now, wait for its in-flight requests
    /// (and upgraded connections) up to `timeout`, then forget it.
    fn drain(&self, instance: &InstanceId, timeout: Duration) -> impl Future<Output = DrainOutcome> + Send;

    /// Forget a backend at once (its process is already gone).
    fn remove(&self, instance: &InstanceId);

    /// Current state of one backend.
    fn status(&self, instance: &InstanceId) -> Option<BackendStatus>;

    /// Health changes, in order. A receiver that lags should re-read
    /// `status` for the instances it cares about.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<HealthEvent>;

    /// Put `route` in maintenance (`Some`: every request to it, static
    /// files included, gets `503` with the page and `Retry-After`, except
    /// from allowed addresses) or take it out (`None`). Applies to every
    /// request that starts after the call, on open connections too;
    /// requests in flight finish as they started. Backends, rotation and
    /// health checks are not affected.
    fn set_maintenance(&self, route: &RouteKey, maintenance: Option<&crate::maintenance::Maintenance>);

    /// Give the backends in `split.instances` `split.percent` % of
    /// `route`'s new requests and the others the rest (`None`: every
    /// in-rotation backend its even share). Only in-rotation backends
    /// count: if no listed one is in rotation, or no other one, every
    /// request goes to the group that has one (a split never makes a
    /// request fail). Instances listed before they are added are kept.
    fn set_split(&self, route: &RouteKey, split: Option<&Split>);

    /// Every backend of `route` and its counters since it was added.
    fn figures(&self, route: &RouteKey) -> impl Future<Output = Vec<BackendFigures>> + Send;
}

/// Upper bounds (microseconds) of the latency histogram's buckets:
/// roughly ×1.25 steps from 100 µs to 60 s; one more bucket takes the rest.
pub const LATENCY_BOUNDS_US: [u64; 62] = {
    let mut b = [0u64; 62];
    let mut v: u64 = 100;
    let mut i = 0;
    while i < 62 {
        b[i] = v;
        // ×1.25, at least +1.
        let next = v + v / 4;
        v = if next > v { next } else { v + 1 };
        i += 1;
    }
    b
};

/// The bucket of a latency of `us` microseconds.
pub fn latency_bucket(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&b| b < us)
}

/// Latencies counted in the fixed buckets of [`LATENCY_BOUNDS_US`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// `LATENCY_BOUNDS_US.len() + 1` counts.
    pub counts: Vec<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { counts: vec![0; LATENCY_BOUNDS_US.len() + 1] }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, us: u64) {
        self.counts[latency_bucket(us)] += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1) in milliseconds: the upper bound of the
    /// bucket it falls in (the last bucket: its lower bound). 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let us = LATENCY_BOUNDS_US.get(i).copied().unwrap_or(LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1]);
                return us as f64 / 1000.0;
            }
        }
        LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1] as f64 / 1000.0
    }

    /// Counts since `earlier` (a reading of the same counters), per bucket.
    pub fn since(&self, earlier: &Self) -> Self {
        let counts =
            self.counts.iter().enumerate().map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)));
        Self { counts: counts.collect() }
    }

    pub fn merge(&mut self, other: &Self) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (i, c) in other.counts.iter().enumerate() {
            self.counts[i] += c;
        }
    }
}

/// One backend's counters since the traffic layer added it (monotonic:
/// the engine diffs two readings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendFigures {
    pub instance: InstanceId,
    /// Answers (a response head, or an error the proxy answered for it).
    pub requests: u64,
    /// 5xx answers that came from it (the proxy's own 502/504 for a failed
    /// attempt on it included).
    pub errors_5xx: u64,
    /// From forwarding to the response head.
    pub latency: LatencyHistogram,
}

impl BackendFigures {
    pub fn since(&self, earlier: &BackendFigures) -> BackendFigures {
        BackendFigures {
            instance: self.instance.clone(),
            requests: self.requests.saturating_sub(earlier.requests),
            errors_5xx: self.errors_5xx.saturating_sub(earlier.errors_5xx),
            latency: self.latency.since(&earlier.latency),
        }
    }
}

/// A share of a route's requests given to some of its backends (a
/// canary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub instances: Vec<InstanceId>,
    /// 0..=100.
    pub percent: u8,
}

/// Whether request number `n` of a route goes to a split's group: spreads
/// `percent` of every 100 consecutive requests evenly (Bresenham).
pub fn split_takes(n: u64, percent: u8) -> bool {
    let p = u64::from(percent.min(100));
    ((n + 1) * p) / 100 > (n * p) / 100
}

#[cfg(test)]
mod figures_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_rise_and_cover_a_minute() {
        assert!(LATENCY_BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
        assert!(LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1] >= 60_000_000);
    }

    proptest! {
        #[test]
        fn quantiles_rise_with_q_and_stay_within_a_bucket(samples in proptest::collection::vec(1u64..70_000_000, 1..300), q in 0.01f64..1.0) {
            let mut h = LatencyHistogram::default();
            for s in &samples { h.record(*s); }
            prop_assert_eq!(h.total(), samples.len() as u64);
            prop_assert!(h.quantile_ms(q / 2.0) <= h.quantile_ms(q));
            let mut sorted = samples.clone();
            sorted.sort();
            let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
            let exact_ms = sorted[rank - 1] as f64 / 1000.0;
            let got = h.quantile_ms(q);
            // The bucket's upper bound: at or above the sample, less than 1.26× it
            // (the overflow bucket reports its lower bound).
            if sorted[rank - 1] <= LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1] {
                prop_assert!(got >= exact_ms && got <= exact_ms * 1.26 + 0.001, "{} vs {}", got, exact_ms);
            }
        }

        #[test]
        fn since_undoes_merge(a in proptest::collection::vec(1u64..1_000_000, 0..50), b in proptest::collection::vec(1u64..1_000_000, 0..50)) {
            let (mut ha, mut hb) = (LatencyHistogram::default(), LatencyHistogram::default());
            for s in &a { ha.record(*s); }
            for s in &b { hb.record(*s); }
            let mut both = ha.clone();
            both.merge(&hb);
            prop_assert_eq!(both.since(&ha), hb);
        }

        #[test]
        fn a_split_gives_its_share_of_every_hundred(percent in 0u8..=100, start in 0u64..1_000_000) {
            let taken = (start..start + 100).filter(|&n| split_takes(n, percent)).count() as i64;
            prop_assert!((taken - i64::from(percent)).abs() <= 1, "{} of 100 for {}%", taken, percent);
        }
    }
}
