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
}
