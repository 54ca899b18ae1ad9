//! Request and response bodies. The contract between CLI and daemon.

use nonstop_core::process::AppSpec;
use nonstop_engine::{OpReport, Progress};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const API_VERSION: &str = "v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpRequest {
    pub spec: AppSpec,
    pub workdir: PathBuf,
    /// PATH, HOME, LANG... of the shell that ran `up`.
    pub base_env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleRequest {
    /// A process named twice is refused (JSON objects may repeat a key;
    /// taking the last one silently would scale to a count nobody meant).
    #[serde(deserialize_with = "unique_counts")]
    pub counts: BTreeMap<String, u32>,
}

fn unique_counts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u32>, D::Error> {
    struct Counts;
    impl<'de> serde::de::Visitor<'de> for Counts {
        type Value = BTreeMap<String, u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of process name to count")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((name, count)) = map.next_entry::<String, u32>()? {
                if out.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "process `{name}` is given twice; give each process once, e.g. `{name}={count}`"
                    )));
                }
                out.insert(name, count);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Counts)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestartRequest {
    pub process: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping {
    pub pid: u32,
    pub version: String,
    pub home: PathBuf,
}

/// `POST /v1/upgrade`: the daemon handed over to its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgraded {
    pub old_pid: u32,
    pub new_pid: u32,
}

/// An error as the API sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub message: String,
    /// The exit code the CLI should use.
    pub exit_code: i32,
    /// The engine's structured error, when there is one.
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
}

/// One line of an NDJSON operation stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OpLine {
    Progress(Progress),
    Result(OpReport),
    Error(ApiError),
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// RFC 3339, UTC.
    pub ts: String,
    /// `web.1`
    pub instance: String,
    pub generation: u64,
    /// `out` or `err`
    pub stream: String,
    pub text: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsQuery {
    pub process: Option<String>,
    pub tail: Option<usize>,
    #[serde(default)]
    pub follow: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunContextQuery {
    /// A retained release (its number) instead of the current one.
    pub release: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployRequest {
    pub spec: AppSpec,
    /// The app directory to snapshot.
    pub source: PathBuf,
    pub base_env: BTreeMap<String, String>,
    pub message: Option<String>,
    /// `user@host`, recorded in the history.
    pub who: String,
    /// Run `[release] tasks` also when the content is that of a retained
    /// release (rolled to without building).
    #[serde(default)]
    pub run_tasks: bool,
    /// Ship a migration the gate finds breaking through the maintenance
    /// fallback instead of refusing it.
    #[serde(default)]
    pub allow_breaking: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// `None`: the release before the current one.
    pub release: Option<u64>,
    /// Run `[release] tasks` again (off by default).
    #[serde(default)]
    pub run_tasks: bool,
    /// Roll back even to a release that expects a schema the database no
    /// longer has.
    #[serde(default)]
    pub force: bool,
    pub who: String,
}

/// `POST /v1/cancel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelRequest {
    /// `user@host`, recorded in the events and the deployment's reason.
    pub who: String,
    /// Why, in a line of text (at most [`CANCEL_REASON_MAX`] characters),
    /// recorded with `who`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The longest `reason` a [`CancelRequest`] may carry.
pub const CANCEL_REASON_MAX: usize = 200;

/// What is wrong with a [`CancelRequest`]'s reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelReasonError {
    #[error("the cancel reason is {chars} characters long; give at most {CANCEL_REASON_MAX} (one line)")]
    TooLong { chars: usize },
    #[error("the cancel reason contains a line break or another control character; give one line of text")]
    NotOneLine,
}

impl CancelRequest {
    /// The reason, trimmed (`None` when empty), or what is wrong with it.
    pub fn checked_reason(&self) -> Result<Option<String>, CancelReasonError> {
        let Some(reason) = self.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        let chars = reason.chars().count();
        if chars > CANCEL_REASON_MAX {
            return Err(CancelReasonError::TooLong { chars });
        }
        if reason.chars().any(char::is_control) {
            return Err(CancelReasonError::NotOneLine);
        }
        Ok(Some(reason.to_string()))
    }
}

/// `POST /v1/maintenance`: on or off.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MaintenanceRequest {
    pub on: bool,
    /// The page's contents (HTML, UTF-8; at most
    /// [`nonstop_core::maintenance::MAINTENANCE_PAGE_MAX`] bytes); `None`:
    /// the built-in page. Only with `on`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    /// Addresses (`203.0.113.7`) and CIDR networks (`10.0.0.0/8`) let
    /// through. Only with `on`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// `Retry-After` in seconds (default 60). Only with `on`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// `user@host`, recorded in the events.
    pub who: String,
}

/// What is wrong with a [`MaintenanceRequest`].
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceRequestError {
    #[error(
        "a page, an allow list or Retry-After only go with maintenance on; to change them, run `nonstop \
         maintenance on` with the new ones (maintenance stays on)"
    )]
    OnlyWhenOn,
    #[error(transparent)]
    Input(#[from] nonstop_core::maintenance::MaintenanceInputError),
}

impl MaintenanceRequest {
    /// The setting it asks for (`None`: off), or what is wrong with it.
    pub fn checked(&self) -> Result<Option<nonstop_core::maintenance::Maintenance>, MaintenanceRequestError> {
        if !self.on {
            if self.page.is_some() || !self.allow.is_empty() || self.retry_after_secs.is_some() {
                return Err(MaintenanceRequestError::OnlyWhenOn);
            }
            return Ok(None);
        }
        let setting =
            nonstop_core::maintenance::build_maintenance(self.page.clone(), &self.allow, self.retry_after_secs)?;
        Ok(Some(setting))
    }
}

/// `POST /v1/stop` and `POST /v1/start`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopStartRequest {
    /// `user@host`, recorded in the events and shown by `status`.
    pub who: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistoryQuery {
    pub limit: Option<usize>,
    /// One deployment: the answer is it alone, or empty if the
    /// environment has none of that ID.
    pub id: Option<i64>,
}

/// `POST /v1/environments/create`: `nonstop env create` of the app and
/// environment the query names. Answered as an operation (progress lines,
/// then the result once the environment serves).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvCreateRequest {
    /// The spec resolved for the new environment (its `[base]` included).
    pub spec: AppSpec,
    /// The app directory (built unless `from` is given).
    pub source: PathBuf,
    pub base_env: BTreeMap<String, String>,
    /// `user@host`, recorded in the history.
    pub who: String,
    /// Start with the release this environment runs (and, with `[base]
    /// postgres`, a copy of its database).
    #[serde(default)]
    pub from: Option<String>,
}

/// `POST /v1/environments/destroy`: `nonstop env destroy` of the app and
/// environment the query names. Answered as an operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvDestroyRequest {
    /// `user@host`, recorded in the events.
    pub who: String,
    /// `--drop-database`: the environment's database named again.
    #[serde(default)]
    pub drop_database: Option<String>,
    /// `[base] postgres` of the spec (to drop the database on); it may
    /// hold the administrator's password (printed redacted).
    #[serde(default)]
    pub base_postgres: Option<nonstop_core::database::DatabaseUrl>,
    /// `[base] redis` of the spec (to remove the environment's Redis data
    /// on); it may hold the server's password (printed redacted).
    #[serde(default)]
    pub base_redis: Option<nonstop_core::environment::RedisUrl>,
}

/// One environment of one app under the daemon, for `nonstop env list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentInfo {
    pub app: String,
    pub environment: String,
    /// Whether it runs (an environment brought down keeps its records).
    pub running: bool,
    /// The release it runs (0: the working directory, from `up`).
    pub release: Option<u64>,
    pub instances: usize,
    /// Instances that are healthy (web) or ready (others).
    pub ready: usize,
    /// The operation in progress, if any.
    pub operation: Option<String>,
    /// Where its web processes answer (`http://HOST:PORT`), if they do.
    pub urls: Vec<String>,
}

/// `POST /v1/secrets/set`: a new version of a secret of the app and
/// environment the query names. `value` is the secret's clear text: it is
/// never printed (`Debug` shows `[secret]`) and is wiped when the request
/// is dropped.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSetRequest {
    pub name: String,
    pub value: String,
    /// `user@host`, recorded with the version.
    pub who: String,
}

impl std::fmt::Debug for SecretSetRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSetRequest")
            .field("name", &self.name)
            .field("value", &"[secret]")
            .field("who", &self.who)
            .finish()
    }
}

impl Drop for SecretSetRequest {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.value);
    }
}

/// `POST /v1/secrets/unset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretUnsetRequest {
    pub name: String,
    pub who: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_request_never_shows_its_value() {
        let req = SecretSetRequest { name: "API_TOKEN".into(), value: "tok-123456".into(), who: "ann@host".into() };
        let shown = format!("{req:?}");
        assert!(!shown.contains("tok-123456"), "{shown}");
        assert!(shown.contains("API_TOKEN"));
        let json = serde_json::to_string(&req).unwrap();
        let back: SecretSetRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.value, "tok-123456");
        assert!(serde_json::from_str::<SecretSetRequest>(r#"{"name":"A","value":"x","who":"w","extra":1}"#).is_err());
    }

    #[test]
    fn a_scale_request_naming_a_process_twice_is_refused() {
        let err = serde_json::from_str::<ScaleRequest>(r#"{"counts":{"web":2,"web":3}}"#).unwrap_err();
        assert!(err.to_string().contains("process `web` is given twice"), "{err}");
        let ok: ScaleRequest = serde_json::from_str(r#"{"counts":{"web":2,"worker":3}}"#).unwrap();
        assert_eq!(ok.counts.len(), 2);
        // What the CLI sends reads back the same.
        let again: ScaleRequest = serde_json::from_str(&serde_json::to_string(&ok).unwrap()).unwrap();
        assert_eq!(again.counts, ok.counts);
    }
}

/// `GET /v1/metrics?app=&env=[&process=]`: an environment's metrics, per
/// process type, as the daemon's metrics task last recorded them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    pub app: String,
    pub environment: String,
    /// When this was read, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The length of one point of the `recent` series, in seconds.
    pub step_secs: u64,
    /// The window the current rates and quantiles are taken over, in seconds.
    pub window_secs: u64,
    /// Static files the proxy answered for this environment.
    pub static_hits: MetricSeries,
    pub processes: Vec<ProcessMetrics>,
    /// `[metrics] listen` addresses that cannot be served, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen_errors: Vec<String>,
}

/// One process type's metrics. Rates are per second over the report's
/// window; `None` where nothing was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessMetrics {
    pub process: String,
    /// Requests the proxy passed to the process's instances.
    pub requests: MetricSeries,
    /// Latency quantiles in milliseconds over the window.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The p95 of each recent point, in milliseconds.
    pub p95_ms_recent: Vec<Option<f64>>,
    pub responses_2xx: MetricSeries,
    pub responses_4xx: MetricSeries,
    pub responses_5xx: MetricSeries,
    pub upstream_errors: MetricSeries,
    /// Requests in flight (a gauge: `rate` is the average over the window).
    pub in_flight: MetricSeries,
    /// CPU % of the instances' process groups, summed over instances.
    pub cpu_percent: MetricSeries,
    /// Resident memory of the instances' process groups, summed, in bytes.
    pub rss_bytes: MetricSeries,
    /// Running instances.
    pub instances: MetricSeries,
    /// Requests per release (`v7`), over the window.
    pub releases: Vec<ReleaseRequests>,
    /// Items waiting in the process's queue (`queue = { redis_list }`,
    /// `LLEN` on its Redis): a gauge; nothing for a process without one.
    #[serde(default)]
    pub queue_depth: MetricSeries,
    /// Why its queue's depth is not read now (no `REDIS_URL`, Redis not
    /// answering); URLs redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_error: Option<String>,
}

/// A counter or gauge: its value now, its total since it was first
/// recorded (counters), and its recent points (counters per second,
/// gauges' averages), oldest first, `None` where nothing was recorded.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricSeries {
    /// A counter's rate per second over the window, a gauge's last value.
    pub current: Option<f64>,
    /// A counter's total since it was first recorded (kept across daemon
    /// restarts).
    pub total: Option<u64>,
    pub recent: Vec<Option<f64>>,
}

/// The requests of one release of a process type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRequests {
    pub release: u64,
    pub total: u64,
    pub per_second: f64,
}
