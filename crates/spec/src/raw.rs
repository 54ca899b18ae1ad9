//! The schema of `nonstop.toml`, as written: every table, every key, every
//! accepted value shape, before any checking.
//!
//! These types derive `Deserialize` with `deny_unknown_fields` and are the
//! documented schema: the key lists in error messages are read from them.
//! The parser does not stop at serde's first error, though: it walks a
//! spanned TOML document and fills these types itself, collecting every
//! problem with its location (see `walk.rs`). A test checks that the walk
//! and `toml::from_str` agree on valid files.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::fmt;

/// A whole `nonstop.toml`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    /// Required. Lowercase letters, digits and '-', starting with a letter.
    pub app: Option<Spanned<String>>,
    /// Build commands run once per release, in order.
    pub build: Option<Spanned<Vec<Spanned<String>>>>,
    /// `[env]`: plain variables for every process.
    pub env: Option<Spanned<RawMap<Spanned<RawScalar>>>>,
    /// `[proxy]`.
    pub proxy: Option<Spanned<RawProxy>>,
    /// `[release]`.
    pub release: Option<Spanned<RawRelease>>,
    /// `[processes.NAME]`, in file order. At least one is required.
    pub processes: Option<Spanned<RawMap<Spanned<RawProcess>>>>,
    /// `[static]` (one mount) or `[[static]]` (several).
    #[serde(rename = "static")]
    pub statics: Option<Spanned<RawStatics>>,
    /// `[database]`: the app's PostgreSQL database.
    pub database: Option<Spanned<RawDatabase>>,
    /// The environment commands use when neither `-e` nor `NONSTOP_ENV`
    /// names one. Left out: `default`.
    pub environment: Option<Spanned<String>>,
    /// `[base]`: the servers the environments share.
    pub base: Option<Spanned<RawBase>>,
    /// `[environments.NAME]`: what differs in each environment, in file
    /// order.
    pub environments: Option<Spanned<RawMap<Spanned<RawEnvironment>>>>,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: Option<Spanned<RawMetrics>>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `"IP:PORT"` of the Prometheus `/metrics` endpoint.
    pub listen: Option<Spanned<String>>,
}

/// `[base]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBase {
    /// `"postgres://ADMIN:PASSWORD@HOST:5432/"`, or `"${VAR}"`.
    pub postgres: Option<Spanned<String>>,
    /// `"redis://HOST:6379"`, or `"${VAR}"`.
    pub redis: Option<Spanned<String>>,
}

/// `[environments.NAME]`: overrides of the rest of the file for one
/// environment.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnvironment {
    /// Host names (`"*.example.com"` for one label below). Left out:
    /// `NAME.APP.localhost`.
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    /// Also answer every host no environment claims.
    pub default: Option<Spanned<bool>>,
    /// Commands that destroy the environment or drop its data refuse it.
    pub protected: Option<Spanned<bool>>,
    /// `[environments.NAME.env]`, merged over `[env]`.
    pub env: Option<Spanned<RawMap<Spanned<RawScalar>>>>,
    /// `[environments.NAME.processes.PROCESS]`.
    pub processes: Option<Spanned<RawMap<Spanned<RawProcessOverride>>>>,
    /// `[environments.NAME.database]`, merged over `[database]`.
    pub database: Option<Spanned<RawDatabase>>,
}

/// `[environments.NAME.processes.PROCESS]`: what may differ between
/// environments. The rest (command, kind, ...) is the same everywhere:
/// the same release runs in each.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcessOverride {
    pub count: Option<Spanned<i64>>,
    /// Merged over the process's `env` (and the environment's `env`).
    pub env: Option<Spanned<RawMap<Spanned<RawScalar>>>>,
    /// Merged key by key over the process's `[health]`.
    pub health: Option<Spanned<RawHealth>>,
    /// Merged key by key over the process's `[rollout]`.
    pub rollout: Option<Spanned<RawRollout>>,
    /// Merged key by key over the process's `[autoscale]`.
    pub autoscale: Option<Spanned<RawAutoscale>>,
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// `"postgres://USER:PASSWORD@HOST:5432/NAME"`, or `"${VAR}"` to read
    /// it from nonstop's environment.
    pub url: Option<Spanned<String>>,
    /// `[database.env]`: variable name → URL part (`url`, `name`, `host`,
    /// `port`, `user`, `password`). Left out: `DATABASE_URL = "url"`.
    pub env: Option<Spanned<RawMap<Spanned<String>>>>,
}

/// `[static]` or `[[static]]`: the mounts, in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawStatics(pub Vec<Spanned<RawStatic>>);

/// One `[static]` mount.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatic {
    /// URL prefix, `"/static/"`.
    pub url: Option<Spanned<String>>,
    /// Directory inside the release, `"staticfiles"`.
    pub dir: Option<Spanned<String>>,
}

impl<'de> Deserialize<'de> for RawStatics {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StaticsVisitor;
        impl<'de> Visitor<'de> for StaticsVisitor {
            type Value = RawStatics;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table or a list of tables")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawStatics, A::Error> {
                // (No location for a lone table on this path; `Spanned`
                // compares values only.)
                let one = RawStatic::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawStatics(vec![Spanned::new(0..0, one)]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawStatics, A::Error> {
                let mut all = Vec::new();
                while let Some(one) = seq.next_element()? {
                    all.push(one);
                }
                Ok(RawStatics(all))
            }
        }
        deserializer.deserialize_any(StaticsVisitor)
    }
}

/// `[proxy]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// `"IP:PORT"`; overridden by `NONSTOP_PROXY_LISTEN`.
    pub listen: Option<Spanned<String>>,
    /// `"IP:PORT"` for HTTPS; required with `[[proxy.tls]]`.
    pub https_listen: Option<Spanned<String>>,
    /// Redirect plain HTTP to HTTPS for hosts with a certificate.
    pub redirect_http: Option<Spanned<bool>>,
    /// A size: bytes (`65536`) or `"64KiB"`.
    pub max_header_bytes: Option<Spanned<RawIntOrString>>,
    pub max_headers: Option<Spanned<i64>>,
    /// A size: bytes (`8192`) or `"8KiB"`.
    pub max_request_line: Option<Spanned<RawIntOrString>>,
    /// A size: bytes or `"100MiB"`; `0` means no limit.
    pub max_body_bytes: Option<Spanned<RawIntOrString>>,
    pub header_timeout: Option<Spanned<RawDuration>>,
    pub idle_timeout: Option<Spanned<RawDuration>>,
    pub upstream_timeout: Option<Spanned<RawDuration>>,
    pub body_timeout: Option<Spanned<RawDuration>>,
    /// Threads that serve clients, 1 to 1024; left out: one per core.
    pub workers: Option<Spanned<i64>>,
    /// `[[proxy.tls]]`, in file order.
    pub tls: Option<Spanned<Vec<Spanned<RawTls>>>>,
    /// Addresses or CIDR ranges (`"10.0.0.0/8"`).
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    // Request bodies: read whole before an instance is chosen.
    /// A size: bytes or `"64KiB"`; held in memory, the rest in a file.
    pub body_memory_bytes: Option<Spanned<RawIntOrString>>,
    /// Bytes per second (`1024`) or `"1KiB/s"`; `0`: no minimum.
    pub min_upload_rate: Option<Spanned<RawIntOrString>>,
    pub upload_rate_window: Option<Spanned<RawDuration>>,
    /// Path prefixes (`"/upload/"`) whose bodies are streamed.
    pub unbuffered_paths: Option<Spanned<Vec<Spanned<String>>>>,
    // Connection limits.
    /// Client connections open at once, 1 to 10,000,000; left out: derived
    /// from the daemon's file descriptor limit.
    pub max_connections: Option<Spanned<i64>>,
    /// Client connections open at once from one address; `0`: no limit.
    pub max_connections_per_client: Option<Spanned<i64>>,
}

/// `[[proxy.tls]]`: one certificate.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Host names served with it (`"*.example.com"` for one label below).
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    /// PEM certificate chain; relative to the spec file's directory.
    pub cert: Option<Spanned<String>>,
    /// PEM private key; relative to the spec file's directory.
    pub key: Option<Spanned<String>>,
}

/// `[release]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelease {
    pub tasks: Option<Spanned<Vec<Spanned<String>>>>,
    pub post_tasks: Option<Spanned<Vec<Spanned<String>>>>,
    pub task_timeout: Option<Spanned<RawDuration>>,
    pub retain_releases: Option<Spanned<i64>>,
    /// Process names, in rollout order.
    pub order: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[processes.NAME]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcess {
    /// Required; run with `sh -c`.
    pub command: Option<Spanned<String>>,
    /// `web`, `worker` or `singleton`.
    pub kind: Option<Spanned<String>>,
    pub count: Option<Spanned<i64>>,
    /// `SIGTERM`, `TERM` or `term`.
    pub stop_signal: Option<Spanned<String>>,
    pub stop_timeout: Option<Spanned<RawDuration>>,
    /// Web only.
    pub drain_timeout: Option<Spanned<RawDuration>>,
    /// Worker and singleton only.
    pub ready_after: Option<Spanned<RawDuration>>,
    /// `[processes.NAME.env]`, layered over `[env]`.
    pub env: Option<Spanned<RawMap<Spanned<RawScalar>>>>,
    /// Web only.
    pub health: Option<Spanned<RawHealth>>,
    pub rollout: Option<Spanned<RawRollout>>,
    pub restart: Option<Spanned<RawRestart>>,
    /// `[processes.NAME.autoscale]`.
    pub autoscale: Option<Spanned<RawAutoscale>>,
    /// Workers: `queue = { redis_list = "celery" }`.
    pub queue: Option<Spanned<RawQueue>>,
}

/// `[processes.NAME.autoscale]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAutoscale {
    /// Fewest instances (left out: 1).
    pub min: Option<Spanned<i64>>,
    /// Most instances; required.
    pub max: Option<Spanned<i64>>,
    /// Targets, at least one: mean CPU per instance, percent of one core.
    pub cpu_percent: Option<Spanned<RawNumber>>,
    /// Web only: requests per second per instance.
    pub requests_per_instance: Option<Spanned<RawNumber>>,
    /// Web only: the 95th percentile of response times, milliseconds.
    pub p95_ms: Option<Spanned<RawNumber>>,
    /// Workers with a `queue`: items waiting per instance.
    pub queue_per_instance: Option<Spanned<RawNumber>>,
    pub scale_out_cooldown: Option<Spanned<RawDuration>>,
    pub scale_in_cooldown: Option<Spanned<RawDuration>>,
    /// Scale-in goes only down to the highest recommendation of this
    /// window.
    pub scale_in_window: Option<Spanned<RawDuration>>,
    /// A count (`4`) or a percentage of the current count (`"50%"`).
    pub max_step: Option<Spanned<RawIntOrString>>,
}

/// `queue = { redis_list = "celery" }`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    /// A Redis list in the environment's Redis (`REDIS_URL`).
    pub redis_list: Option<Spanned<String>>,
}

/// `[processes.NAME.health]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<RawDuration>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub healthy_threshold: Option<Spanned<i64>>,
    pub unhealthy_threshold: Option<Spanned<i64>>,
    /// `200` or `"200-399"`.
    pub expect_status: Option<Spanned<RawIntOrString>>,
    pub host: Option<Spanned<String>>,
    /// `["/", "/notes/"]`, or `[{ path = "/", expect_status = "200-299" }]`.
    pub smoke: Option<Spanned<Vec<Spanned<RawSmoke>>>>,
}

/// One entry of `smoke`: a path, or a path with its expected statuses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawSmoke {
    Path(String),
    Check(RawSmokeCheck),
}

/// `{ path = "/", expect_status = "200-299" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmokeCheck {
    pub path: String,
    pub expect_status: Option<RawIntOrString>,
}

/// `[processes.NAME.rollout]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// A count (`1`) or a percentage of `count` (`"25%"`).
    pub max_surge: Option<Spanned<RawIntOrString>>,
    /// A count (`0`) or a percentage of `count` (`"25%"`).
    pub max_unavailable: Option<Spanned<RawIntOrString>>,
    pub health_timeout: Option<Spanned<RawDuration>>,
    /// Web only. Shares of the traffic the new release gets, step by
    /// step: `["5%", "25%"]`; `[]` or `false`: no ramp.
    pub canary: Option<Spanned<RawCanary>>,
    /// Each step's window, at most.
    pub canary_hold: Option<Spanned<RawDuration>>,
    /// Percentage points: `"1%"`, `"0.5%"`.
    pub canary_max_5xx_increase: Option<Spanned<RawNumber>>,
    /// A factor: `2.0` (or `2`).
    pub canary_max_p95_ratio: Option<Spanned<RawNumber>>,
    pub canary_p95_slack: Option<Spanned<RawDuration>>,
    pub canary_min_requests: Option<Spanned<i64>>,
}

/// `canary`: a list of steps, or a switch (`false`: no ramp).
#[derive(Debug, Clone, PartialEq)]
pub enum RawCanary {
    Switch(bool),
    Steps(Vec<Spanned<RawNumber>>),
}

impl<'de> Deserialize<'de> for RawCanary {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // By hand, not `untagged`: an untagged enum buffers its input,
        // which loses the location of each step.
        struct CanaryVisitor;
        impl<'de> Visitor<'de> for CanaryVisitor {
            type Value = RawCanary;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of percentages or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawCanary, E> {
                Ok(RawCanary::Switch(v))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawCanary, A::Error> {
                let mut all = Vec::new();
                while let Some(one) = seq.next_element()? {
                    all.push(one);
                }
                Ok(RawCanary::Steps(all))
            }
        }
        deserializer.deserialize_any(CanaryVisitor)
    }
}

/// A number or a string (`2.0`, `"1%"`), as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawNumber {
    Int(i64),
    Float(f64),
    Text(String),
}

/// `[processes.NAME.restart]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    pub backoff_initial: Option<Spanned<RawDuration>>,
    pub backoff_max: Option<Spanned<RawDuration>>,
    pub reset_after: Option<Spanned<RawDuration>>,
    pub crash_loop_after: Option<Spanned<i64>>,
}

/// A duration as written: seconds, or a string with units.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(i64),
    Text(String),
}

/// A count or a string (`"25%"`, `"200-399"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawIntOrString {
    Int(i64),
    Text(String),
}

/// An environment value; numbers and booleans become strings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawScalar {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
}

impl RawScalar {
    /// The value a process sees. Floats keep a decimal point (`1.0`).
    pub fn to_env_string(&self) -> String {
        match self {
            RawScalar::String(s) => s.clone(),
            RawScalar::Integer(i) => i.to_string(),
            RawScalar::Float(f) if f.is_nan() => "nan".to_string(),
            RawScalar::Float(f) => format!("{f:?}"),
            RawScalar::Boolean(b) => b.to_string(),
        }
    }
}

/// A TOML table with free-form keys, in file order, keeping each key's
/// location.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawMap<V>(pub Vec<(Spanned<String>, V)>);

impl<V> RawMap<V> {
    pub fn iter(&self) -> impl Iterator<Item = &(Spanned<String>, V)> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for RawMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = RawMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMap<V>, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(RawMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

/// The field names serde knows for a struct, in declaration order: the
/// valid keys of a table.
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("field name probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_come_from_the_schema() {
        assert_eq!(field_names::<RawProxy>()[0], "listen");
        assert_eq!(field_names::<RawTls>(), &["hosts", "cert", "key"]);
        assert_eq!(
            field_names::<RawSpec>(),
            &[
                "app",
                "build",
                "env",
                "proxy",
                "release",
                "processes",
                "static",
                "database",
                "environment",
                "base",
                "environments",
                "metrics"
            ]
        );
        assert_eq!(field_names::<RawProcess>()[0], "command");
    }

    #[test]
    fn env_values_become_strings() {
        assert_eq!(RawScalar::String("x".into()).to_env_string(), "x");
        assert_eq!(RawScalar::Integer(-3).to_env_string(), "-3");
        assert_eq!(RawScalar::Float(1.0).to_env_string(), "1.0");
        assert_eq!(RawScalar::Float(0.25).to_env_string(), "0.25");
        assert_eq!(RawScalar::Float(f64::INFINITY).to_env_string(), "inf");
        assert_eq!(RawScalar::Float(f64::NAN).to_env_string(), "nan");
        assert_eq!(RawScalar::Boolean(true).to_env_string(), "true");
    }
}
