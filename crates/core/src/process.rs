//! The validated app spec: what `nonstop.toml` means once `nonstop-spec`
//! has checked it. Every value here is already valid; consumers never
//! re-check.

use crate::ids::{AppName, ProcessName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How a process type is run and when it counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    /// Gets a `PORT`, is health-checked and routed by the proxy.
    Web,
    /// No port; ready after staying up `ready_after`.
    Worker,
    /// Like a worker, but never more than one instance, ever (celery beat).
    Singleton,
}

impl ProcessKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessKind::Web => "web",
            ProcessKind::Worker => "worker",
            ProcessKind::Singleton => "singleton",
        }
    }
}

/// Signals a user may name as `stop_signal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Signal {
    #[serde(rename = "SIGTERM")]
    Term,
    #[serde(rename = "SIGINT")]
    Int,
    #[serde(rename = "SIGQUIT")]
    Quit,
    #[serde(rename = "SIGHUP")]
    Hup,
    #[serde(rename = "SIGUSR1")]
    Usr1,
    #[serde(rename = "SIGUSR2")]
    Usr2,
    #[serde(rename = "SIGWINCH")]
    Winch,
    #[serde(rename = "SIGKILL")]
    Kill,
}

impl Signal {
    pub const ALL: [Signal; 8] =
        [Signal::Term, Signal::Int, Signal::Quit, Signal::Hup, Signal::Usr1, Signal::Usr2, Signal::Winch, Signal::Kill];
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
            Signal::Quit => "SIGQUIT",
            Signal::Hup => "SIGHUP",
            Signal::Usr1 => "SIGUSR1",
            Signal::Usr2 => "SIGUSR2",
            Signal::Winch => "SIGWINCH",
            Signal::Kill => "SIGKILL",
        }
    }
    /// Accepts `SIGTERM`, `TERM` and `term`.
    pub fn parse(s: &str) -> Option<Signal> {
        let up = s.trim().to_ascii_uppercase();
        let up = up.strip_prefix("SIG").unwrap_or(&up);
        Signal::ALL.into_iter().find(|sig| &sig.name()[3..] == up)
    }
}

/// Which HTTP statuses count as a passing health check (inclusive range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRange {
    pub min: u16,
    pub max: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.min..=self.max).contains(&status)
    }
}

/// Active HTTP health check of a web process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub path: String,
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Consecutive passes before an instance enters rotation.
    pub healthy_threshold: u32,
    /// Consecutive failures before an instance leaves rotation.
    pub unhealthy_threshold: u32,
    pub expect_status: StatusRange,
    /// The `Host` header of the checks; `None`: the instance's own
    /// `127.0.0.1:PORT`. For apps that refuse hosts they do not know
    /// (Django's `ALLOWED_HOSTS`, Rails' host authorization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Pages a new instance must answer (once, after its health check
    /// first passes and before it gets any client request): a release
    /// whose health view answers 200 while its pages answer 500 never
    /// reaches a user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub smoke: Vec<SmokeCheck>,
}

/// One smoke check: `GET path`, answered within `expect_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmokeCheck {
    pub path: String,
    pub expect_status: StatusRange,
}

/// Restart behaviour of the supervisor for crashed instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    #[serde(with = "duration_ms")]
    pub backoff_initial: Duration,
    #[serde(with = "duration_ms")]
    pub backoff_max: Duration,
    /// An instance that stayed up this long resets its backoff.
    #[serde(with = "duration_ms")]
    pub reset_after: Duration,
    /// This many consecutive quick exits mark the slot `crash-loop`.
    pub crash_loop_after: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
            crash_loop_after: 5,
        }
    }
}

/// `max_surge` / `max_unavailable` of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantity {
    Count(u32),
    Percent(u32),
}

impl Quantity {
    /// Resolve against a desired count. Surge rounds up, unavailability
    /// rounds down (as Kubernetes does), so the defaults are safe.
    pub fn resolve(self, of: u32, round_up: bool) -> u32 {
        match self {
            Quantity::Count(n) => n,
            Quantity::Percent(p) => {
                let scaled = u64::from(of) * u64::from(p);
                let v = if round_up { scaled.div_ceil(100) } else { scaled / 100 };
                u32::try_from(v).unwrap_or(u32::MAX)
            }
        }
    }
}

/// How a process type is replaced during a deploy or a rolling restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub max_surge: Quantity,
    pub max_unavailable: Quantity,
    /// How long a new instance may take to become healthy/ready.
    #[serde(with = "duration_ms")]
    pub health_timeout: Duration,
    /// Web only: the live-traffic gate of a deploy.
    #[serde(default)]
    pub canary: Canary,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_surge: Quantity::Count(1),
            max_unavailable: Quantity::Count(0),
            health_timeout: Duration::from_secs(60),
            canary: Canary::default(),
        }
    }
}

/// The live-traffic gate of a web process's deploy (`[processes.web.rollout]`
/// `canary*` keys): one new instance comes up beside the old ones and gets
/// each share of `steps` in turn; after each window (at most `hold`) its 5xx
/// rate and p95 are compared with the old release's over the same window,
/// and the deploy rolls back if they are worse by more than the margins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// Percent of the web traffic (1..=99, rising) the new release gets,
    /// step by step, before the rest of the rollout. Empty: no ramp.
    pub steps: Vec<u8>,
    /// Each step's window at most (it ends sooner once enough requests were
    /// seen, or when none come at all).
    #[serde(with = "duration_ms")]
    pub hold: Duration,
    /// How much higher the new release's 5xx rate may be, in basis points
    /// (100 = one percentage point).
    pub max_5xx_increase_bp: u32,
    /// The new release's p95 may be this many percent of the old one's…
    pub max_p95_ratio_pct: u32,
    /// …plus this (small p95s are noisy).
    #[serde(with = "duration_ms")]
    pub p95_slack: Duration,
    /// Fewer new-release requests than this in a window judge nothing.
    pub min_requests: u32,
}

impl Default for Canary {
    fn default() -> Self {
        Self {
            steps: vec![5, 25],
            hold: Duration::from_secs(10),
            max_5xx_increase_bp: 100,
            max_p95_ratio_pct: 200,
            p95_slack: Duration::from_millis(100),
            min_requests: 20,
        }
    }
}

/// One process type of the app, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub name: ProcessName,
    pub kind: ProcessKind,
    /// Run through `sh -c`; `$PORT` is set for web processes.
    pub command: String,
    /// Desired instances. Always 0 or 1 for a singleton.
    pub count: u32,
    pub stop_signal: Signal,
    #[serde(with = "duration_ms")]
    pub stop_timeout: Duration,
    #[serde(with = "duration_ms")]
    pub drain_timeout: Duration,
    /// Worker/singleton: up this long counts as ready. Web: unused.
    #[serde(with = "duration_ms")]
    pub ready_after: Duration,
    /// Present for web processes, absent otherwise.
    pub health: Option<HealthCheck>,
    pub restart: RestartPolicy,
    pub rollout: Rollout,
    /// Per-process environment, layered over the app's `[env]`.
    pub env: BTreeMap<String, String>,
    /// `[processes.NAME.autoscale]`: the count moves within `[min, max]`
    /// with the load; `count` is the one it starts at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::autoscale::Autoscale>,
    /// `queue`: where the depth of the queue this worker serves is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<crate::autoscale::QueueSource>,
}

/// `[proxy]`. Settings left out of the file are `None` (`tls`: empty):
/// the proxy's own defaults apply (`nonstop_proxy::ProxyConfig`), so that
/// they have one home, and specs stored before a setting existed still
/// read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySpec {
    /// Plain HTTP (HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    /// HTTPS (TLS with HTTP/1.1 and h2 by ALPN). Set whenever `tls` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_listen: Option<SocketAddr>,
    /// Answer plain HTTP for a host that has a certificate with a 308 to
    /// HTTPS. `None`: yes when `tls` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_http: Option<bool>,
    /// Largest request head (request line and headers), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<u64>,
    /// Most header fields in a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<u32>,
    /// Longest request target (URI), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_line: Option<u64>,
    /// Largest request body, in bytes; `Some(0)`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Time a client has to send a request head.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "option_duration_ms")]
    pub header_timeout: Option<Duration>,
    /// Time a keep-alive connection may stay idle between requests.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "option_duration_ms")]
    pub idle_timeout: Option<Duration>,
    /// Time an instance has to send its response head (then 504).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "option_duration_ms")]
    pub upstream_timeout: Option<Duration>,
    /// Longest wait for the next piece of a request body (then 408).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "option_duration_ms")]
    pub body_timeout: Option<Duration>,
    /// Threads that serve clients; `None`: one per core. Read when the
    /// daemon starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// `[[proxy.tls]]`: certificates, one per set of hosts (chosen by SNI;
    /// the first is the default for clients that send no SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsSpec>,
    /// Peers whose `X-Forwarded-Proto` and `X-Forwarded-Host` are kept (a
    /// load balancer or CDN in front that terminates TLS); from anyone
    /// else they are replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    // Request body buffering (issue 15).
    /// Bytes of a request body kept in memory while it is read whole
    /// before an instance is chosen; larger bodies go to a temporary file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_memory_bytes: Option<u64>,
    /// Slowest request body accepted, in bytes per second over
    /// `upload_rate_window` (then 408); `Some(0)`: no minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_upload_rate: Option<u64>,
    /// The window `min_upload_rate` is measured over.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "option_duration_ms")]
    pub upload_rate_window: Option<Duration>,
    /// Path prefixes whose request bodies are streamed to the instance as
    /// they arrive instead of being read whole first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbuffered_paths: Vec<String>,
    // Connection limits (issue 15).
    /// Most client connections open at once; `None`: derived from the
    /// daemon's file descriptor limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// Most client connections open at once from one address (IPv6: one
    /// /64); `Some(0)`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<u32>,
}

impl ProxySpec {
    /// Listen on `listen`, every other setting left to the proxy.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            https_listen: None,
            redirect_http: None,
            max_header_bytes: None,
            max_headers: None,
            max_request_line: None,
            max_body_bytes: None,
            header_timeout: None,
            idle_timeout: None,
            upstream_timeout: None,
            body_timeout: None,
            workers: None,
            tls: Vec::new(),
            trusted_proxies: Vec::new(),
            body_memory_bytes: None,
            min_upload_rate: None,
            upload_rate_window: None,
            unbuffered_paths: Vec::new(),
            max_connections: None,
            max_connections_per_client: None,
        }
    }

    /// Whether plain HTTP requests for hosts with a certificate are
    /// redirected to HTTPS (default: yes when TLS is configured).
    pub fn redirects_http(&self) -> bool {
        !self.tls.is_empty() && self.redirect_http.unwrap_or(true)
    }
}

/// `[[proxy.tls]]`: one certificate and its key, served for `hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSpec {
    /// Lowercase host names; `*.example.com` matches one label below.
    pub hosts: Vec<String>,
    /// PEM certificate chain, leaf first. Absolute.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Absolute.
    pub key: PathBuf,
}

/// `[release]` (used by deploys).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReleaseSpec {
    /// Run once per deploy, after the build, before any instance changes.
    pub tasks: Vec<String>,
    /// Run once after a successful deploy.
    pub post_tasks: Vec<String>,
    #[serde(with = "duration_ms")]
    pub task_timeout: Duration,
    /// Releases kept on disk (the running one is never pruned).
    pub retain_releases: u32,
    /// Order in which process types are rolled; unnamed ones follow in
    /// the default order (web, worker, singleton).
    pub order: Vec<ProcessName>,
}

/// A whole `nonstop.toml`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub app: AppName,
    /// Plain environment variables (`[env]`).
    pub env: BTreeMap<String, String>,
    /// In declaration order.
    pub processes: Vec<ProcessSpec>,
    pub proxy: ProxySpec,
    /// Build commands run once per release (deploys).
    pub build: Vec<String>,
    pub release: ReleaseSpec,
    /// `[static]` / `[[static]]` mounts served by the proxy from the
    /// releases' own files, in file order (empty: the app serves its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statics: Vec<StaticMount>,
    /// `[database]`: the app's PostgreSQL database (for the migration gate
    /// and the variables every process gets), if the spec names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<crate::database::DatabaseSpec>,
    /// The hosts this environment answers (lowercase; `*.example.com`
    /// matches one label), as the spec resolved them for one environment:
    /// its `hosts`, or `ENV.APP.localhost`. Empty in specs stored before
    /// environments existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// This environment also answers every host no environment claims. At
    /// most one environment of an app does. Specs stored before
    /// environments existed (one environment per app) did: `true` when
    /// absent.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub default_host: bool,
    /// `protected = true`: commands that destroy the environment or drop
    /// its data refuse it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub protected: bool,
    /// `[base]`: the servers the environment's own database (and Redis
    /// database) are made on, as the file gives them (an administrator's
    /// URL, maybe with its password). It travels with a deploy or `up` to
    /// the daemon, which provisions from it and takes it off the spec: a
    /// stored spec never holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<crate::environment::BaseSpec>,
    /// `[metrics]`: the Prometheus endpoint, if the file asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<crate::autoscale::MetricsSpec>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One `[static]` mount: requests for `url*` are answered by the proxy
/// from `dir` inside each retained release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticMount {
    /// URL prefix, starting and ending with `/` (`"/static/"`).
    pub url: String,
    /// Relative to the release directory, without `..` (`"staticfiles"`).
    pub dir: PathBuf,
}

impl AppSpec {
    pub fn process(&self, name: &ProcessName) -> Option<&ProcessSpec> {
        self.processes.iter().find(|p| &p.name == name)
    }
}

/// Optional durations, as milliseconds.
pub mod option_duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Durations are stored as milliseconds in JSON and the store.
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_in_any_spelling() {
        assert_eq!(Signal::parse("SIGTERM"), Some(Signal::Term));
        assert_eq!(Signal::parse("quit"), Some(Signal::Quit));
        assert_eq!(Signal::parse("Int"), Some(Signal::Int));
        assert_eq!(Signal::parse("SIGFOO"), None);
    }

    #[test]
    fn proxy_specs_stored_before_the_hardening_settings_read_back() {
        let old: ProxySpec = serde_json::from_str(r#"{"listen":"127.0.0.1:8080"}"#).unwrap();
        assert_eq!(old, ProxySpec::new("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(serde_json::to_string(&old).unwrap(), r#"{"listen":"127.0.0.1:8080"}"#);
        let mut full = old.clone();
        full.https_listen = Some("127.0.0.1:8443".parse().unwrap());
        full.body_timeout = Some(Duration::from_millis(1500));
        full.max_body_bytes = Some(0);
        full.tls =
            vec![TlsSpec { hosts: vec!["example.test".into()], cert: "/etc/c.pem".into(), key: "/etc/k.pem".into() }];
        let json = serde_json::to_string(&full).unwrap();
        assert!(json.contains(r#""body_timeout":1500"#), "{json}");
        assert_eq!(serde_json::from_str::<ProxySpec>(&json).unwrap(), full);
        assert!(full.redirects_http());
        full.redirect_http = Some(false);
        assert!(!full.redirects_http());
        assert!(!old.redirects_http());
    }

    #[test]
    fn app_specs_stored_before_environments_answer_every_host() {
        let json = r#"{"app":"blog","env":{},"processes":[],"proxy":{"listen":"127.0.0.1:8080"},"build":[],
            "release":{"tasks":[],"post_tasks":[],"task_timeout":600000,"retain_releases":5,"order":[]}}"#;
        let old: AppSpec = serde_json::from_str(json).unwrap();
        assert!(old.hosts.is_empty() && old.default_host && !old.protected);
        // Written back, it is the same text: the new fields are left out.
        let again = serde_json::to_value(&old).unwrap();
        assert_eq!(again, serde_json::from_str::<serde_json::Value>(json).unwrap());
        let mut staging = old;
        staging.hosts = vec!["staging.blog.localhost".into()];
        staging.default_host = false;
        staging.protected = true;
        let json = serde_json::to_string(&staging).unwrap();
        assert!(json.contains(r#""hosts":["staging.blog.localhost"],"default_host":false,"protected":true"#), "{json}");
        assert_eq!(serde_json::from_str::<AppSpec>(&json).unwrap(), staging);
    }

    #[test]
    fn quantities_round_safely() {
        assert_eq!(Quantity::Percent(25).resolve(3, true), 1);
        assert_eq!(Quantity::Percent(25).resolve(3, false), 0);
        assert_eq!(Quantity::Percent(100).resolve(4, false), 4);
        assert_eq!(Quantity::Count(2).resolve(10, false), 2);
    }
}
