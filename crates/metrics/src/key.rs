//! What a series is about: a small typed label set and its [`Metric`].
//!
//! Labels are nonstop's own validated identifiers (lowercase names,
//! release numbers, slot numbers), so their number is bounded by what the
//! daemon runs, never by what clients send: no path, host, client address
//! or status code (only its class) is ever a label.

use nonstop_core::{AppName, EnvironmentId, ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The class of an HTTP status: `1xx` to `5xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusClass {
    /// 1xx.
    Informational,
    /// 2xx.
    Success,
    /// 3xx.
    Redirection,
    /// 4xx.
    ClientError,
    /// 5xx.
    ServerError,
}

impl StatusClass {
    /// Every class, in order.
    pub const ALL: [StatusClass; 5] = [
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirection,
        StatusClass::ClientError,
        StatusClass::ServerError,
    ];

    /// The class of `status`, or `None` outside 100..=599.
    pub fn of(status: u16) -> Option<StatusClass> {
        match status {
            100..=199 => Some(StatusClass::Informational),
            200..=299 => Some(StatusClass::Success),
            300..=399 => Some(StatusClass::Redirection),
            400..=499 => Some(StatusClass::ClientError),
            500..=599 => Some(StatusClass::ServerError),
            _ => None,
        }
    }

    /// `1xx` .. `5xx`.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
        }
    }
}

impl fmt::Display for StatusClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a metric's samples combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Increments (`Sample::Count`): a point holds the sum of the
    /// increments in its step; the series keeps a running total.
    Counter,
    /// Readings (`Sample::Gauge`): a point holds their sum, count and
    /// maximum (so its average and peak); the series keeps the last one.
    Gauge,
    /// Latency histograms (`Sample::Histogram`): a point holds the
    /// bucket-wise sum of the histograms in its step; the series keeps a
    /// running total.
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Gauge: CPU used by an instance's whole process group, in percent
    /// of one CPU (200 = two CPUs busy), over the sampling interval.
    CpuPercent,
    /// Gauge: resident memory of an instance's whole process group, in
    /// bytes (shared pages counted once per process).
    RssBytes,
    /// Counter: requests answered (from the proxy).
    Requests,
    /// Gauge: requests in flight (from the proxy).
    InFlight,
    /// Histogram: latency from forwarding a request to its response head
    /// (from the proxy).
    Latency,
    /// Counter: responses of one status class.
    Responses(StatusClass),
    /// Counter: requests that failed at the upstream (connect, reset,
    /// timeout) and were answered by the proxy.
    UpstreamErrors,
    /// Counter: requests answered with a static file.
    StaticHits,
    /// Gauge: jobs waiting in a worker's queue (read from Redis).
    QueueDepth,
    /// Gauge: running instances of a process type.
    Instances,
}

impl Metric {
    /// Every metric, in a fixed order (the exposition's).
    pub const ALL: [Metric; 14] = [
        Metric::CpuPercent,
        Metric::RssBytes,
        Metric::Requests,
        Metric::InFlight,
        Metric::Latency,
        Metric::Responses(StatusClass::Informational),
        Metric::Responses(StatusClass::Success),
        Metric::Responses(StatusClass::Redirection),
        Metric::Responses(StatusClass::ClientError),
        Metric::Responses(StatusClass::ServerError),
        Metric::UpstreamErrors,
        Metric::StaticHits,
        Metric::QueueDepth,
        Metric::Instances,
    ];

    /// How its samples combine.
    pub fn kind(self) -> Kind {
        match self {
            Metric::Requests | Metric::Responses(_) | Metric::UpstreamErrors | Metric::StaticHits => Kind::Counter,
            Metric::CpuPercent | Metric::RssBytes | Metric::InFlight | Metric::QueueDepth | Metric::Instances => {
                Kind::Gauge
            }
            Metric::Latency => Kind::Histogram,
        }
    }

    /// A short name for people (`nonstop metrics`): `cpu`, `rss`,
    /// `requests`, `in_flight`, `latency`, `responses_2xx`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::CpuPercent => "cpu",
            Metric::RssBytes => "rss",
            Metric::Requests => "requests",
            Metric::InFlight => "in_flight",
            Metric::Latency => "latency",
            Metric::Responses(StatusClass::Informational) => "responses_1xx",
            Metric::Responses(StatusClass::Success) => "responses_2xx",
            Metric::Responses(StatusClass::Redirection) => "responses_3xx",
            Metric::Responses(StatusClass::ClientError) => "responses_4xx",
            Metric::Responses(StatusClass::ServerError) => "responses_5xx",
            Metric::UpstreamErrors => "upstream_errors",
            Metric::StaticHits => "static_hits",
            Metric::QueueDepth => "queue_depth",
            Metric::Instances => "instances",
        }
    }

    /// Its code in the persisted file (stable: never reuse a number).
    pub(crate) fn code(self) -> u8 {
        match self {
            Metric::CpuPercent => 1,
            Metric::RssBytes => 2,
            Metric::Requests => 3,
            Metric::InFlight => 4,
            Metric::Latency => 5,
            Metric::Responses(StatusClass::Informational) => 6,
            Metric::Responses(StatusClass::Success) => 7,
            Metric::Responses(StatusClass::Redirection) => 8,
            Metric::Responses(StatusClass::ClientError) => 9,
            Metric::Responses(StatusClass::ServerError) => 10,
            Metric::UpstreamErrors => 11,
            Metric::StaticHits => 12,
            Metric::QueueDepth => 13,
            Metric::Instances => 14,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.code() == code)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One series: where (app, environment, and optionally process type,
/// release and instance slot) and what ([`Metric`]).
///
/// Built with [`SeriesKey::environment`], [`SeriesKey::process`] or
/// [`SeriesKey::instance`] (then [`SeriesKey::with_release`]), so a slot
/// always comes with its process type. The slot is the instance's place
/// (`web.2`), not its generation (`web.2#7`): a restarted instance goes on
/// in the same series, and the number of series stays bounded by the
/// scale rather than growing with every restart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesKey {
    app: AppName,
    environment: EnvironmentId,
    process: Option<ProcessName>,
    release: Option<ReleaseId>,
    slot: Option<u32>,
    metric: Metric,
}

impl SeriesKey {
    /// A series of a whole environment (e.g. static hits).
    pub fn environment(app: AppName, environment: EnvironmentId, metric: Metric) -> SeriesKey {
        SeriesKey { app, environment, process: None, release: None, slot: None, metric }
    }

    /// A series of one process type (e.g. the proxy's figures of `web`,
    /// the queue depth of `worker`, the instance count).
    pub fn process(app: AppName, environment: EnvironmentId, process: ProcessName, metric: Metric) -> SeriesKey {
        SeriesKey { app, environment, process: Some(process), release: None, slot: None, metric }
    }

    /// A series of one instance slot (`web.2`: CPU, memory).
    pub fn instance(
        app: AppName,
        environment: EnvironmentId,
        process: ProcessName,
        slot: u32,
        metric: Metric,
    ) -> SeriesKey {
        SeriesKey { app, environment, process: Some(process), release: None, slot: Some(slot), metric }
    }

    /// The same series, of `release` only.
    pub fn with_release(mut self, release: ReleaseId) -> SeriesKey {
        self.release = Some(release);
        self
    }

    /// The same labels, another metric.
    pub fn with_metric(mut self, metric: Metric) -> SeriesKey {
        self.metric = metric;
        self
    }

    pub fn app(&self) -> &AppName {
        &self.app
    }
    pub fn environment_id(&self) -> &EnvironmentId {
        &self.environment
    }
    pub fn process_name(&self) -> Option<&ProcessName> {
        self.process.as_ref()
    }
    pub fn release(&self) -> Option<ReleaseId> {
        self.release
    }
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }
    /// `web.2`, for a series of an instance slot.
    pub fn slot_name(&self) -> Option<String> {
        match (&self.process, self.slot) {
            (Some(p), Some(s)) => Some(format!("{p}.{s}")),
            _ => None,
        }
    }
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Rebuild from parts (the persisted file): a slot without a process
    /// is refused.
    pub(crate) fn from_parts(
        app: AppName,
        environment: EnvironmentId,
        process: Option<ProcessName>,
        release: Option<ReleaseId>,
        slot: Option<u32>,
        metric: Metric,
    ) -> Option<SeriesKey> {
        if slot.is_some() && process.is_none() {
            return None;
        }
        Some(SeriesKey { app, environment, process, release, slot, metric })
    }
}

impl fmt::Display for SeriesKey {
    /// `blog/staging web.2 v7 cpu`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.environment)?;
        match (self.slot_name(), &self.process) {
            (Some(slot), _) => write!(f, " {slot}")?,
            (None, Some(p)) => write!(f, " {p}")?,
            (None, None) => {}
        }
        if let Some(r) = self.release {
            write!(f, " {r}")?;
        }
        write!(f, " {}", self.metric)
    }
}

/// Which series to show (`nonstop metrics -e ENV PROCESS`): every field
/// that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub app: Option<AppName>,
    pub environment: Option<EnvironmentId>,
    pub process: Option<ProcessName>,
}

impl Filter {
    pub fn matches(&self, key: &SeriesKey) -> bool {
        self.app.as_ref().is_none_or(|a| *a == key.app)
            && self.environment.as_ref().is_none_or(|e| *e == key.environment)
            && self.process.as_ref().is_none_or(|p| key.process.as_ref() == Some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(99), None);
        assert_eq!(StatusClass::of(100), Some(StatusClass::Informational));
        assert_eq!(StatusClass::of(204), Some(StatusClass::Success));
        assert_eq!(StatusClass::of(302), Some(StatusClass::Redirection));
        assert_eq!(StatusClass::of(499), Some(StatusClass::ClientError));
        assert_eq!(StatusClass::of(503), Some(StatusClass::ServerError));
        assert_eq!(StatusClass::of(600), None);
        assert_eq!(StatusClass::ServerError.to_string(), "5xx");
    }

    #[test]
    fn metric_codes_are_unique_and_round_trip() {
        let mut codes: Vec<u8> = Metric::ALL.iter().map(|m| m.code()).collect();
        for m in Metric::ALL {
            assert_eq!(Metric::from_code(m.code()), Some(m));
        }
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Metric::ALL.len());
        assert_eq!(Metric::from_code(0), None);
        assert_eq!(Metric::from_code(200), None);
    }

    #[test]
    fn keys_render_and_filter() {
        let app = AppName::new("blog").unwrap();
        let env = EnvironmentId::new("staging").unwrap();
        let web = ProcessName::new("web").unwrap();
        let key = SeriesKey::instance(app.clone(), env.clone(), web.clone(), 2, Metric::CpuPercent)
            .with_release(ReleaseId(7));
        assert_eq!(key.to_string(), "blog/staging web.2 v7 cpu");
        assert_eq!(key.slot_name().as_deref(), Some("web.2"));
        let env_key = SeriesKey::environment(app.clone(), env.clone(), Metric::StaticHits);
        assert_eq!(env_key.to_string(), "blog/staging static_hits");

        let by_process = Filter { process: Some(web), ..Filter::default() };
        assert!(by_process.matches(&key));
        assert!(!by_process.matches(&env_key));
        let other_env = Filter { environment: Some(EnvironmentId::new("production").unwrap()), ..Filter::default() };
        assert!(!other_env.matches(&key));
        assert!(Filter::default().matches(&env_key));
        assert!(SeriesKey::from_parts(app, env, None, None, Some(1), Metric::CpuPercent).is_none());
    }
}
