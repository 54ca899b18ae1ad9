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
    /// Passive outlier detection: the instance answered 5xx to its last
    /// requests while its peers in the same route did not. It is out of
    /// rotation for a while (longer at each ejection), whatever its health
    /// checks say, then comes back through them.
    Outlier,
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

/// Upper bounds (inclusive, microseconds) of [`LatencyHistogram`]'s
/// buckets: 100 µs, then steps of 1.25× (rounded up) until past 60 s. A
/// last bucket (not listed) counts what is slower than the last bound.
pub const LATENCY_BOUNDS_US: [u64; LATENCY_BUCKETS] = latency_bounds();

/// How many bounds [`LATENCY_BOUNDS_US`] has.
pub const LATENCY_BUCKETS: usize = count_latency_bounds();

const LATENCY_FIRST_US: u64 = 100;
const LATENCY_LAST_US: u64 = 60_000_000;

const fn next_latency_bound(b: u64) -> u64 {
    // ×1.25, rounded up.
    (b * 5).div_ceil(4)
}

const fn count_latency_bounds() -> usize {
    let mut n = 1;
    let mut b = LATENCY_FIRST_US;
    while b < LATENCY_LAST_US {
        b = next_latency_bound(b);
        n += 1;
    }
    n
}

const fn latency_bounds() -> [u64; LATENCY_BUCKETS] {
    let mut out = [0u64; LATENCY_BUCKETS];
    let mut b = LATENCY_FIRST_US;
    let mut i = 0;
    while i < LATENCY_BUCKETS {
        out[i] = b;
        b = next_latency_bound(b);
        i += 1;
    }
    out
}

/// The bucket of [`LatencyHistogram::counts`] a latency of `us`
/// microseconds falls in: the first whose bound is at least `us`, else the
/// overflow bucket (`LATENCY_BUCKETS`).
pub fn latency_bucket(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&bound| bound < us)
}

/// Latency histogram with fixed, log-spaced bucket bounds
/// ([`LATENCY_BOUNDS_US`]: 100 µs to 60 s in steps of 1.25×, plus
/// overflow). `counts[i]` counts the latencies in `(bound[i-1], bound[i]]`;
/// the last, those above the last bound. A histogram read with another
/// length (another version's bounds) is read as far as it goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub counts: Vec<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { counts: vec![0; LATENCY_BUCKETS + 1] }
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one latency.
    pub fn record(&mut self, latency: std::time::Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_n(latency_bucket(us), 1);
    }

    /// Count `n` latencies in bucket `bucket` (the overflow bucket if past
    /// it).
    pub fn record_n(&mut self, bucket: usize, n: u64) {
        let bucket = bucket.min(LATENCY_BUCKETS);
        if self.counts.len() <= bucket {
            self.counts.resize(LATENCY_BUCKETS + 1, 0);
        }
        self.counts[bucket] = self.counts[bucket].saturating_add(n);
    }

    /// How many latencies were counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |sum, &c| sum.saturating_add(c))
    }

    /// The `q` quantile (0 ≤ q ≤ 1, clamped) in milliseconds: the upper
    /// bound of the bucket that holds the sample of rank ⌈q·total⌉ (at
    /// least the first), so never below the exact sample quantile and at
    /// most one bucket (×1.25) above it. Past the last bound: the last
    /// bound (60 s and more). 0 for an empty histogram.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        // The rank of the sample, 1-based; q·total computed in f64 is exact
        // enough: totals are far below 2^53.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen >= rank {
                return Self::bound_ms(i);
            }
        }
        Self::bound_ms(LATENCY_BUCKETS)
    }

    /// The upper bound of bucket `i` in milliseconds (the overflow bucket:
    /// the last bound).
    pub fn bound_ms(i: usize) -> f64 {
        LATENCY_BOUNDS_US[i.min(LATENCY_BUCKETS - 1)] as f64 / 1000.0
    }

    /// What was counted after `earlier` (an earlier reading of the same
    /// counters): per bucket, saturating at zero.
    pub fn since(&self, earlier: &Self) -> Self {
        let len = self.counts.len().max(earlier.counts.len()).max(LATENCY_BUCKETS + 1);
        let get = |h: &Self, i: usize| h.counts.get(i).copied().unwrap_or(0);
        Self { counts: (0..len).map(|i| get(self, i).saturating_sub(get(earlier, i))).collect() }
    }

    /// Add `other`'s counts to these.
    pub fn merge(&mut self, other: &Self) {
        if self.counts.len() < other.counts.len().max(LATENCY_BUCKETS + 1) {
            self.counts.resize(other.counts.len().max(LATENCY_BUCKETS + 1), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
    }
}

/// One backend's counters since the traffic layer added it (monotonic; the
/// engine diffs two readings with [`BackendFigures::since`]).
///
/// `requests`: answers — a response head received from the instance, or
/// an error the proxy answered for it (a failed attempt: 502, 504);
/// `errors_5xx`: those with a 5xx status (the instance's own, or the
/// proxy's for a failed attempt on it); `latency`: from forwarding to the
/// response head (or the failure), one sample per answer. By status class:
/// `responses_1xx`, `responses_3xx`, `responses_4xx` and `errors_5xx`; the
/// rest of `requests` are 2xx ([`BackendFigures::responses_2xx`]).
/// `upstream_errors`: failed attempts (the instance refused, reset, or did
/// not answer in time), counted in `errors_5xx` too. A traffic layer that
/// predates the class counters reports them as zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendFigures {
    pub instance: InstanceId,
    pub requests: u64,
    pub errors_5xx: u64,
    pub latency: LatencyHistogram,
    #[serde(default)]
    pub responses_1xx: u64,
    #[serde(default)]
    pub responses_3xx: u64,
    #[serde(default)]
    pub responses_4xx: u64,
    #[serde(default)]
    pub upstream_errors: u64,
}

impl BackendFigures {
    /// Zero counters for `instance`.
    pub fn new(instance: InstanceId) -> Self {
        Self {
            instance,
            requests: 0,
            errors_5xx: 0,
            latency: LatencyHistogram::new(),
            responses_1xx: 0,
            responses_3xx: 0,
            responses_4xx: 0,
            upstream_errors: 0,
        }
    }

    /// The 2xx answers: those of no other class.
    pub fn responses_2xx(&self) -> u64 {
        self.requests
            .saturating_sub(self.errors_5xx)
            .saturating_sub(self.responses_1xx)
            .saturating_sub(self.responses_3xx)
            .saturating_sub(self.responses_4xx)
    }

    /// What happened after `earlier` (saturating at zero).
    pub fn since(&self, earlier: &BackendFigures) -> BackendFigures {
        BackendFigures {
            instance: self.instance.clone(),
            requests: self.requests.saturating_sub(earlier.requests),
            errors_5xx: self.errors_5xx.saturating_sub(earlier.errors_5xx),
            latency: self.latency.since(&earlier.latency),
            responses_1xx: self.responses_1xx.saturating_sub(earlier.responses_1xx),
            responses_3xx: self.responses_3xx.saturating_sub(earlier.responses_3xx),
            responses_4xx: self.responses_4xx.saturating_sub(earlier.responses_4xx),
            upstream_errors: self.upstream_errors.saturating_sub(earlier.upstream_errors),
        }
    }
}

/// What the traffic layer answered itself for a route, counted in no
/// backend's figures (monotonic, since the route was first set up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteFigures {
    /// Requests for `[static]` URLs, answered from the static files
    /// (200, 304, 206, or 404/400 for a name that is not there).
    pub static_hits: u64,
    /// Requests answered 503 because no instance was healthy in time.
    pub no_backend: u64,
}

/// A share of a route's requests given to some of its backends (a canary):
/// `percent` (0 to 100; more is read as 100) of them to `instances`, the
/// rest to the others.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Split {
    pub instances: Vec<InstanceId>,
    pub percent: u8,
}

impl Split {
    /// Whether request number `n` (counted from 0, per route) goes to the
    /// listed group, for a split of `percent`%: spread evenly, so that any
    /// 100 consecutive numbers give exactly `percent` of them to the group
    /// (`⌊(n+1)·p/100⌋ > ⌊n·p/100⌋`).
    pub fn takes(percent: u8, n: u64) -> bool {
        let p = u64::from(percent.min(100));
        // In u128: no overflow for any n.
        let (n, p) = (u128::from(n), u128::from(p));
        (n + 1) * p / 100 > n * p / 100
    }
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

    /// Give the backends in `split.instances` `percent`% of `route`'s new
    /// requests and the others the rest (`None`: no split, every
    /// in-rotation backend its even share). Only in-rotation backends
    /// count: if no listed backend is in rotation, or no unlisted one,
    /// every request goes to the group that has one (a split never makes a
    /// request fail). Instances listed before they are added are kept.
    /// Applies to requests that start after the call.
    fn set_split(&self, route: &RouteKey, split: Option<&Split>);

    /// Every backend of `route` and its counters since it was added.
    fn figures(&self, route: &RouteKey) -> impl Future<Output = Vec<BackendFigures>> + Send;

    /// What the traffic layer answered itself for `route` (static files,
    /// no instance): zeros from one that cannot say.
    fn route_figures(&self, _route: &RouteKey) -> impl Future<Output = RouteFigures> + Send {
        std::future::ready(RouteFigures::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn bounds_rise_by_a_quarter_from_100us_past_60s() {
        assert_eq!(LATENCY_BOUNDS_US[0], 100);
        assert!(LATENCY_BOUNDS_US[LATENCY_BUCKETS - 1] >= 60_000_000);
        assert!(LATENCY_BOUNDS_US[LATENCY_BUCKETS - 2] < 60_000_000);
        for w in LATENCY_BOUNDS_US.windows(2) {
            assert!(w[1] > w[0] && w[1] <= w[0] * 5 / 4 + 1, "{w:?}");
        }
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(100), 0);
        assert_eq!(latency_bucket(101), 1);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
        assert_eq!(LatencyHistogram::new().counts.len(), LATENCY_BUCKETS + 1);
    }

    #[test]
    fn a_slow_instance_shows_its_latency() {
        let mut h = LatencyHistogram::new();
        for _ in 0..95 {
            h.record(Duration::from_millis(2));
        }
        for _ in 0..5 {
            h.record(Duration::from_millis(200));
        }
        assert_eq!(h.total(), 100);
        let p95 = h.quantile_ms(0.95);
        assert!((2.0..2.5).contains(&p95), "{p95}");
        let p99 = h.quantile_ms(0.99);
        assert!((200.0..250.0).contains(&p99), "{p99}");
        assert_eq!(LatencyHistogram::new().quantile_ms(0.5), 0.0);
        let mut over = LatencyHistogram::new();
        over.record(Duration::from_secs(600));
        assert_eq!(over.quantile_ms(1.0), LatencyHistogram::bound_ms(LATENCY_BUCKETS));
    }

    #[test]
    fn figures_and_splits_round_trip_as_json() {
        let id = InstanceId::new(crate::ProcessName::new("web").unwrap(), 1, 2);
        let mut f = BackendFigures::new(id.clone());
        f.requests = 3;
        f.errors_5xx = 1;
        f.latency.record(Duration::from_millis(5));
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<BackendFigures>(&json).unwrap(), f);
        let split = Split { instances: vec![id], percent: 5 };
        let json = serde_json::to_string(&split).unwrap();
        assert_eq!(serde_json::from_str::<Split>(&json).unwrap(), split);
        assert_eq!(serde_json::to_string(&HealthCause::Outlier).unwrap(), "\"outlier\"");
    }

    #[test]
    fn a_split_is_exact_over_any_hundred_requests() {
        for percent in [0u8, 1, 5, 25, 33, 50, 99, 100, 200] {
            let want = u64::from(percent.min(100));
            for start in [0u64, 1, 7, 19, 99, 1_000_003, u64::MAX - 200] {
                let got = (start..start + 100).filter(|&n| Split::takes(percent, n)).count() as u64;
                assert_eq!(got, want, "percent {percent} from {start}");
            }
        }
    }

    fn histogram() -> impl Strategy<Value = LatencyHistogram> {
        proptest::collection::vec(0u64..1_000, LATENCY_BUCKETS + 1).prop_map(|counts| LatencyHistogram { counts })
    }

    proptest! {
        #[test]
        fn quantiles_rise_with_q(h in histogram(), a in 0.0f64..=1.0, b in 0.0f64..=1.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(h.quantile_ms(lo) <= h.quantile_ms(hi));
        }

        #[test]
        fn since_undoes_merge(a in histogram(), b in histogram()) {
            let mut sum = a.clone();
            sum.merge(&b);
            prop_assert_eq!(sum.total(), a.total() + b.total());
            prop_assert_eq!(sum.since(&a), b.clone());
            prop_assert_eq!(sum.since(&b), a);
        }

        #[test]
        fn since_saturates(a in histogram(), b in histogram()) {
            let d = a.since(&b);
            for (i, c) in d.counts.iter().enumerate() {
                prop_assert_eq!(*c, a.counts[i].saturating_sub(b.counts[i]));
            }
        }

        #[test]
        fn a_quantile_is_within_one_bucket_of_the_exact_one(
            samples in proptest::collection::vec(0u64..70_000_000, 1..300),
            q in 0.0f64..=1.0,
        ) {
            let mut h = LatencyHistogram::new();
            for &us in &samples {
                h.record(Duration::from_micros(us));
            }
            let mut sorted = samples.clone();
            sorted.sort_unstable();
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            let exact_us = sorted[rank - 1];
            let got_us = h.quantile_ms(q) * 1000.0;
            let bucket = latency_bucket(exact_us);
            if bucket < LATENCY_BUCKETS {
                // The exact sample's bucket's bound: at or above it, and
                // less than one step of 1.25× above the bucket's floor.
                prop_assert_eq!(got_us.round() as u64, LATENCY_BOUNDS_US[bucket]);
                prop_assert!(got_us >= exact_us as f64);
                let floor = if bucket == 0 { 0 } else { LATENCY_BOUNDS_US[bucket - 1] };
                prop_assert!(got_us <= (floor as f64 * 1.25).ceil() + 1.0 || bucket == 0);
            } else {
                prop_assert_eq!(got_us.round() as u64, LATENCY_BOUNDS_US[LATENCY_BUCKETS - 1]);
            }
        }

        #[test]
        fn figures_since_undo_growth(r in 0u64..1_000, e in 0u64..1_000, dr in 0u64..1_000, de in 0u64..1_000, a in histogram(), b in histogram()) {
            let id = InstanceId::new(crate::ProcessName::new("web").unwrap(), 1, 1);
            let earlier = BackendFigures { requests: r, errors_5xx: e, latency: a.clone(), responses_4xx: e, ..BackendFigures::new(id.clone()) };
            let mut later_latency = a;
            later_latency.merge(&b);
            let later = BackendFigures { requests: r + dr, errors_5xx: e + de, latency: later_latency, responses_4xx: e + dr, ..BackendFigures::new(id.clone()) };
            prop_assert_eq!(later.since(&earlier), BackendFigures { requests: dr, errors_5xx: de, latency: b, responses_4xx: dr, ..BackendFigures::new(id) });
        }
    }
}
