//! The validated `[processes.NAME.autoscale]`, `queue` and `[metrics]`
//! of a spec: what `nonstop-spec` has checked and `nonstop-plan`'s
//! autoscaler decides with. Every value here is already valid.

use crate::process::{duration_ms, Quantity};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// A metric an autoscaled process can track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Mean CPU use per instance, in percent of one core.
    CpuPercent,
    /// Requests per second per instance (web only).
    RequestsPerInstance,
    /// The 95th percentile of response times, in milliseconds (web only).
    P95Ms,
    /// Items waiting in the process's queue per instance (a `queue` is
    /// needed).
    QueuePerInstance,
}

impl Metric {
    /// Every metric, in the order of the keys of `[processes.NAME.autoscale]`.
    pub const ALL: [Metric; 4] =
        [Metric::CpuPercent, Metric::RequestsPerInstance, Metric::P95Ms, Metric::QueuePerInstance];

    /// The key that sets its target in `[processes.NAME.autoscale]`.
    pub fn key(self) -> &'static str {
        match self {
            Metric::CpuPercent => "cpu_percent",
            Metric::RequestsPerInstance => "requests_per_instance",
            Metric::P95Ms => "p95_ms",
            Metric::QueuePerInstance => "queue_per_instance",
        }
    }

    /// Whether only web processes have it (the proxy measures it).
    pub fn web_only(self) -> bool {
        matches!(self, Metric::RequestsPerInstance | Metric::P95Ms)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// One target: the value of `metric` (per instance, or the p95) the
/// autoscaler keeps the process at. Always at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub metric: Metric,
    pub value: u32,
}

/// `[processes.NAME.autoscale]`, validated: `min <= max`, at least one
/// target and at most one per metric (in [`Metric::ALL`] order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Autoscale {
    /// Fewest instances. 0 only for a worker with a queue target (the
    /// queue is what brings it back from none).
    pub min: u32,
    /// Most instances, at least 1.
    pub max: u32,
    pub targets: Vec<Target>,
    /// After a scale-out, the next one waits this long (the new instances
    /// first have to start and take their share).
    #[serde(with = "duration_ms")]
    pub scale_out_cooldown: Duration,
    /// After any change of the count, a scale-in waits this long.
    #[serde(with = "duration_ms")]
    pub scale_in_cooldown: Duration,
    /// Scale-in stabilisation: the count goes down only to the highest
    /// recommendation over this window (Kubernetes' HPA
    /// `stabilizationWindowSeconds`). Scale-out never waits for it.
    #[serde(with = "duration_ms")]
    pub scale_in_window: Duration,
    /// Most instances added or removed by one decision: a count, or a
    /// percentage of the current count (rounded up); at least 1 either way.
    pub max_step: Quantity,
}

impl Autoscale {
    /// The target set for `metric`, if any.
    pub fn target(&self, metric: Metric) -> Option<u32> {
        self.targets.iter().find(|t| t.metric == metric).map(|t| t.value)
    }

    /// The most instances one decision may add or remove from `current`.
    pub fn step(&self, current: u32) -> u32 {
        self.max_step.resolve(current, true).max(1)
    }

    /// Whether `count` is within `[min, max]`.
    pub fn allows(&self, count: u32) -> bool {
        (self.min..=self.max).contains(&count)
    }
}

/// `queue = { redis_list = "celery" }`: where a worker's queue depth is
/// read, in the environment's Redis (its `REDIS_URL`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueSource {
    /// The length of a Redis list (`LLEN`), such as Celery's default
    /// `celery` queue on a Redis broker.
    RedisList(String),
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSpec {
    /// Where `/metrics` is served (an IP address and a port).
    pub listen: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_step: Quantity) -> Autoscale {
        Autoscale {
            min: 1,
            max: 10,
            targets: vec![Target { metric: Metric::CpuPercent, value: 70 }],
            scale_out_cooldown: Duration::from_secs(15),
            scale_in_cooldown: Duration::from_secs(60),
            scale_in_window: Duration::from_secs(120),
            max_step,
        }
    }

    #[test]
    fn a_step_is_at_least_one() {
        assert_eq!(policy(Quantity::Count(2)).step(7), 2);
        assert_eq!(policy(Quantity::Percent(50)).step(3), 2);
        assert_eq!(policy(Quantity::Percent(50)).step(0), 1);
        assert_eq!(policy(Quantity::Percent(100)).step(4), 4);
    }

    #[test]
    fn metrics_are_named_by_their_keys() {
        let keys: Vec<&str> = Metric::ALL.iter().map(|m| m.key()).collect();
        assert_eq!(keys, ["cpu_percent", "requests_per_instance", "p95_ms", "queue_per_instance"]);
        for m in Metric::ALL {
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        assert_eq!(
            serde_json::to_string(&QueueSource::RedisList("celery".into())).unwrap(),
            r#"{"redis_list":"celery"}"#
        );
        let p = policy(Quantity::Count(2));
        assert_eq!(serde_json::from_str::<Autoscale>(&serde_json::to_string(&p).unwrap()).unwrap(), p);
        assert!(p.allows(1) && p.allows(10) && !p.allows(0) && !p.allows(11));
    }
}
