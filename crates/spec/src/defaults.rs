//! Every default of `nonstop.toml`, named, and how they compare with the
//! tools our users come from.

use nonstop_core::process::{Quantity, Signal, StatusRange};
use std::time::Duration;

/// `[proxy] listen`: loopback only, so a fresh install exposes nothing.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
/// Environment variable that overrides `[proxy] listen`.
pub const PROXY_LISTEN_ENV: &str = "NONSTOP_PROXY_LISTEN";

/// `[proxy] max_header_bytes`: the whole request head (as an ALB).
pub const DEFAULT_PROXY_MAX_HEADER_BYTES: u64 = 64 * 1024;
/// Smallest `max_header_bytes` (the HTTP/1 parser's smallest buffer).
pub const MIN_PROXY_MAX_HEADER_BYTES: u64 = 8 * 1024;
/// Largest `max_header_bytes`.
pub const MAX_PROXY_MAX_HEADER_BYTES: u64 = 16 * 1024 * 1024;
/// `[proxy] max_headers`.
pub const DEFAULT_PROXY_MAX_HEADERS: u32 = 100;
/// Largest `max_headers`.
pub const MAX_PROXY_MAX_HEADERS: u32 = 10_000;
/// `[proxy] max_request_line`: the request target (URI).
pub const DEFAULT_PROXY_MAX_REQUEST_LINE: u64 = 8 * 1024;
/// Smallest `max_request_line`.
pub const MIN_PROXY_MAX_REQUEST_LINE: u64 = 256;
/// `[proxy] max_body_bytes` (`0`: no limit).
pub const DEFAULT_PROXY_MAX_BODY_BYTES: u64 = 100 * 1024 * 1024;
/// `[proxy] header_timeout`: a complete request head within it.
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `[proxy] idle_timeout`: keep-alive connections between requests.
pub const DEFAULT_PROXY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `[proxy] upstream_timeout`: the instance's response head within it.
pub const DEFAULT_PROXY_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// `[proxy] body_timeout`: the longest pause in a request body.
pub const DEFAULT_PROXY_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest `[proxy] workers` (left out: one per core).
pub const MIN_PROXY_WORKERS: u32 = 1;
/// Largest `[proxy] workers`.
pub const MAX_PROXY_WORKERS: u32 = 1024;
// Connection limits.
/// `[proxy] max_connections_per_client`: per IPv4 address or IPv6 /64
/// (`0`: no limit).
pub const DEFAULT_PROXY_MAX_CONNECTIONS_PER_CLIENT: u32 = 256;
/// Largest `[proxy] max_connections` and `max_connections_per_client`.
pub const MAX_PROXY_MAX_CONNECTIONS: u64 = 10_000_000;
/// File descriptors the daemon keeps for itself at least when it derives
/// `[proxy] max_connections` from its limit (the store, logs, health
/// checks, instance starts, the API).
pub const PROXY_FD_RESERVE_MIN: u64 = 256;

/// `[proxy] redirect_http`, when `[[proxy.tls]]` is set.
pub const DEFAULT_REDIRECT_HTTP: bool = true;
/// `[proxy] body_memory_bytes`: a request body is read whole before an
/// instance is chosen; this much in memory, the rest in a temporary file.
pub const DEFAULT_PROXY_BODY_MEMORY_BYTES: u64 = 64 * 1024;
/// Largest `[proxy] body_memory_bytes` (held per connection).
pub const MAX_PROXY_BODY_MEMORY_BYTES: u64 = 1 << 30;
/// `[proxy] min_upload_rate`, bytes per second (`0`: no minimum).
pub const DEFAULT_PROXY_MIN_UPLOAD_RATE: u64 = 1024;
/// `[proxy] upload_rate_window`: what `min_upload_rate` is measured over.
pub const DEFAULT_PROXY_UPLOAD_RATE_WINDOW: Duration = Duration::from_secs(15);
/// Shortest `[proxy] upload_rate_window`.
pub const MIN_PROXY_UPLOAD_RATE_WINDOW: Duration = Duration::from_secs(1);

/// `[static] url`: Django's `STATIC_URL`.
pub const DEFAULT_STATIC_URL: &str = "/static/";
/// `[static] dir`: Django's usual `STATIC_ROOT` (what `collectstatic` fills).
pub const DEFAULT_STATIC_DIR: &str = "staticfiles";

/// `[release] task_timeout`: migrations on a big table take minutes.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(600);
/// `[release] retain_releases`.
pub const DEFAULT_RETAIN_RELEASES: u32 = 5;
/// Smallest `retain_releases`: the running release is always kept.
pub const MIN_RETAIN_RELEASES: u32 = 1;

/// `count` of a process.
pub const DEFAULT_COUNT: u32 = 1;
/// `stop_signal`: what gunicorn, celery and puma expect for a graceful stop.
pub const DEFAULT_STOP_SIGNAL: Signal = Signal::Term;
/// `stop_timeout`: time between the stop signal and SIGKILL. Web instances
/// are drained first, so requests are finished before the signal is sent.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `drain_timeout` (web): time in-flight requests get once an instance has
/// left the rotation.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `ready_after` (worker, singleton): up this long counts as ready.
pub const DEFAULT_READY_AFTER: Duration = Duration::from_secs(2);

/// `[health] path`: every app answers `/` (Rails' `/up` does not exist in
/// Django).
pub const DEFAULT_HEALTH_PATH: &str = "/";
/// `[health] interval`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// `[health] timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// `[health] healthy_threshold`.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// `[health] unhealthy_threshold`.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// `[health] expect_status`: redirects count as healthy (Django answers
/// `/` with a 301 or a 302 to the login page).
pub const DEFAULT_EXPECT_STATUS: StatusRange = StatusRange { min: 200, max: 399 };

/// `[rollout] max_surge`: start one new instance before stopping an old one.
pub const DEFAULT_MAX_SURGE: Quantity = Quantity::Count(1);
/// `[rollout] max_unavailable`: never drop below the desired count.
pub const DEFAULT_MAX_UNAVAILABLE: Quantity = Quantity::Count(0);
/// A singleton never runs twice, so it is stopped before it is replaced.
pub const DEFAULT_SINGLETON_MAX_SURGE: Quantity = Quantity::Count(0);
/// See [`DEFAULT_SINGLETON_MAX_SURGE`].
pub const DEFAULT_SINGLETON_MAX_UNAVAILABLE: Quantity = Quantity::Count(1);
/// `[rollout] health_timeout`: how long a new instance may take to become
/// healthy (web) or ready (others) before the rollout fails.
pub const DEFAULT_ROLLOUT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// `[rollout] canary` (web): the new release gets 5% of the traffic, then
/// 25%, before the rest of the rollout; `[]`/`false`: no ramp.
pub const DEFAULT_CANARY_STEPS: [u8; 2] = [5, 25];
/// Most `canary` steps: each one holds the deploy up to `canary_hold`.
pub const MAX_CANARY_STEPS: usize = 5;
/// `[rollout] canary_hold`: each step's window, at most.
pub const DEFAULT_CANARY_HOLD: Duration = Duration::from_secs(10);
/// Shortest `canary_hold`: a shorter window sees too few requests.
pub const MIN_CANARY_HOLD: Duration = Duration::from_secs(1);
/// Longest `canary_hold`.
pub const MAX_CANARY_HOLD: Duration = Duration::from_secs(600);
/// `[rollout] canary_max_5xx_increase`, basis points (100 = one
/// percentage point of the 5xx rate).
pub const DEFAULT_CANARY_MAX_5XX_INCREASE_BP: u32 = 100;
/// Largest `canary_max_5xx_increase` (`"100%"`: never judged on 5xx).
pub const MAX_CANARY_MAX_5XX_INCREASE_BP: u32 = 10_000;
/// `[rollout] canary_max_p95_ratio`, percent (`2.0` = 200).
pub const DEFAULT_CANARY_MAX_P95_RATIO_PCT: u32 = 200;
/// Smallest `canary_max_p95_ratio` (`1.0`: no slower than the old one).
pub const MIN_CANARY_MAX_P95_RATIO_PCT: u32 = 100;
/// Largest `canary_max_p95_ratio` (`100.0`).
pub const MAX_CANARY_MAX_P95_RATIO_PCT: u32 = 10_000;
/// `[rollout] canary_p95_slack`: added to the allowed p95 (small p95s are
/// noisy).
pub const DEFAULT_CANARY_P95_SLACK: Duration = Duration::from_millis(100);
/// Longest `canary_p95_slack`.
pub const MAX_CANARY_P95_SLACK: Duration = Duration::from_secs(60);
/// `[rollout] canary_min_requests`: fewer new-release requests in a window
/// judge nothing.
pub const DEFAULT_CANARY_MIN_REQUESTS: u32 = 20;
/// Largest `canary_min_requests`.
pub const MAX_CANARY_MIN_REQUESTS: u32 = 100_000;

/// `[autoscale] min`: one instance at least, unless the file says 0 (a
/// worker with a queue target).
pub const DEFAULT_AUTOSCALE_MIN: u32 = 1;
/// `[autoscale] scale_out_cooldown`: long enough for new instances to
/// start and take their share before the next scale-out is judged.
pub const DEFAULT_AUTOSCALE_SCALE_OUT_COOLDOWN: Duration = Duration::from_secs(15);
/// `[autoscale] scale_in_cooldown`: after any change of the count.
pub const DEFAULT_AUTOSCALE_SCALE_IN_COOLDOWN: Duration = Duration::from_secs(60);
/// `[autoscale] scale_in_window`: the scale-in stabilisation window
/// (Kubernetes' HPA: 300 s; a single machine's apps start in seconds).
pub const DEFAULT_AUTOSCALE_SCALE_IN_WINDOW: Duration = Duration::from_secs(120);
/// `[autoscale] max_step`: instances added or removed by one decision
/// (HPA adds up to 4 pods, or 100%, per 15 s).
pub const DEFAULT_AUTOSCALE_MAX_STEP: Quantity = Quantity::Count(4);
/// Longest `scale_out_cooldown`, `scale_in_cooldown` and `scale_in_window`.
pub const MAX_AUTOSCALE_DURATION: Duration = Duration::from_secs(3600);
/// Largest `max_step` percentage (`"1000%"`: up to eleven times as many).
pub const MAX_AUTOSCALE_STEP_PERCENT: u32 = 1000;
/// Longest `redis_list` name of a `queue`.
pub const MAX_QUEUE_NAME_BYTES: usize = 1024;
/// `[metrics] listen`: loopback only, on the port of OpenTelemetry's
/// Prometheus exporter.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `[restart] backoff_initial`.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// `[restart] backoff_max`.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// `[restart] reset_after`.
pub const DEFAULT_RESET_AFTER: Duration = Duration::from_secs(30);
/// `[restart] crash_loop_after`.
pub const DEFAULT_CRASH_LOOP_AFTER: u32 = 5;

/// The health-check and rollout defaults next to those of ECS + ALB and of
/// Kamal 2 / kamal-proxy, as a Markdown table (the README includes it).
pub fn defaults_doc() -> &'static str {
    DEFAULTS_DOC
}

/// See [`defaults_doc`].
pub const DEFAULTS_DOC: &str = "\
| setting | nonstop | ECS + ALB | Kamal 2 / kamal-proxy | why ours |
| --- | --- | --- | --- | --- |
| `health.path` | `/` | `/` (target group) | `/up` | every app answers `/`; `/up` is a Rails convention |
| `health.interval` | `1s` | `30s` (target group) | `1s` | probes are local and cheap; a rollout on one machine should take seconds, not minutes |
| `health.timeout` | `2s` | `5s` (target group) | `5s` | a local app that needs more than 2s to answer a health check is not healthy; probes of one instance never overlap, so a timeout longer than the interval is allowed |
| `health.healthy_threshold` | `2` | `5` | `1` (first success) | one lucky answer during boot is not proof; a second one costs a second |
| `health.unhealthy_threshold` | `3` | `2` | `1` | one slow answer under load should not pull an instance out of rotation; three in a row (3s) should |
| `health.expect_status` | `200-399` | `200` (matcher) | `200-299` | Django answers `/` with redirects (trailing slash, login page) and is healthy |
| `rollout.health_timeout` | `60s` | none per task (grace period `0s`, circuit breaker) | `30s` (`deploy_timeout`) | Django boots with imports and checks that can pass 30s on a small machine |
| `rollout.max_surge` / `max_unavailable` | `1` / `0` | `maximumPercent` 200 / `minimumHealthyPercent` 100 | one new container, then the old one stops | never drop below the desired count; one extra instance fits on one machine |
| `rollout.canary` (web) | `5%`, `25%` | none when rolling (the default); strategy `CANARY`: `canaryPercent` 5.0, then the rest (CodeDeploy: `CodeDeployDefault.ECSCanary10Percent5Minutes`) | none (kamal-proxy's `rollout set --percent` is a split set by hand, judged by nobody) | a bad release meets a few percent of the traffic for seconds, not all of it, and is rolled back; Heroku has none either (preboot only); `[]` or `false`: no ramp |
| `rollout.canary_hold` | `10s` | `canaryBakeTimeInMinutes` 10 | none | a step ends sooner once enough requests were seen; a deploy on one machine should take seconds, not minutes |
| `rollout.canary_max_5xx_increase` | `1%` | none built in (CloudWatch alarms you write roll back) | none | compared with the old release over the same window, not with a fixed threshold: one point more 5xx is a regression |
| `rollout.canary_max_p95_ratio` / `canary_p95_slack` | `2.0` / `100ms` | none built in (CloudWatch alarms) | none | twice as slow is a regression worth a rollback; the slack keeps a 3ms to 8ms p95 (or a fresh instance's first pages) from counting, and a slow window is measured again before it fails |
| `rollout.canary_min_requests` | `20` | none | none | fewer new-release requests in a window prove nothing either way: a quiet app is not held back |
| `drain_timeout` | `30s` | `300s` (deregistration delay) | `30s` (`drain_timeout`; kamal-proxy alone: `10s`) | long enough for slow requests and uploads, short enough for a quick rollout |
| `stop_timeout` | `10s` | `30s` (`stopTimeout`) | `10s` (docker stop) | requests have drained before the signal; this only bounds the app's own shutdown |
| `ready_after` (workers) | `2s` | none (running = ready) | `7s` (`readiness_delay`) | a worker that crashes on a bad import does so within a second or two |
";

/// The `[proxy]` defaults next to nginx's and HAProxy's, as a Markdown
/// table (for the README's proxy section).
pub fn proxy_defaults_doc() -> &'static str {
    PROXY_DEFAULTS_DOC
}

/// See [`proxy_defaults_doc`].
pub const PROXY_DEFAULTS_DOC: &str = "\
| setting | nonstop | nginx | HAProxy | why ours |
| --- | --- | --- | --- | --- |
| `proxy.max_header_bytes` | `64KiB` | 4 buffers of `8k` (`large_client_header_buffers`) | `16KiB` for the whole head (`tune.bufsize`) | the ALB's limit: large cookies and tokens fit; larger heads get 431 |
| `proxy.max_headers` | `100` | no limit | `101` (`tune.http.maxhdr`) | no real client sends more; more gets 431 |
| `proxy.max_request_line` | `8KiB` | `8k` (one header buffer) | within `tune.bufsize` | long query strings fit; a longer target gets 414 |
| `proxy.max_body_bytes` | `100MiB` | `1m` (`client_max_body_size`) | no limit | uploads to a Django app work out of the box; larger ones get 413 (`0`: no limit) |
| `proxy.header_timeout` | `10s` | `60s` (`client_header_timeout`) | none (`timeout http-request`) | a slowloris client holds a connection for 10s, not a minute |
| `proxy.idle_timeout` | `60s` | `75s` (`keepalive_timeout`) | none (`timeout http-keep-alive`) | the ALB's idle timeout |
| `proxy.upstream_timeout` | `60s` | `60s` (`proxy_read_timeout`) | none (`timeout server`) | an instance that has not started answering in a minute gets a 504 |
| `proxy.body_timeout` | `30s` | `60s` (`client_body_timeout`) | none (`timeout client`) | a pause of 30s in an upload is a stalled client; it gets 408 and the instance's request is aborted |
| `proxy.workers` | one per core | `1` (`worker_processes`; packaged configs: `auto`, one per core) | one per core (`nbthread`) | a thread per core serves the most with the least switching; lower it on a machine whose cores the apps need; fixed while the data plane runs (the keeper; the daemon itself with `--no-keeper`): the first `up` starts it with this value, a later change applies when the keeper is restarted (with `--no-keeper`: after `nonstop upgrade` or a daemon restart) |
| `proxy.redirect_http` | `true` when `tls` is set | a `return 301` to write | a `redirect scheme https` to write | plain HTTP to a host with a certificate gets a 308 (method and body kept) |
| `proxy.body_memory_bytes` | `64KiB` | `16k` (`client_body_buffer_size`) | no buffering: bodies stream | a request body is read whole before an instance is chosen (larger ones into an unlinked temporary file), so a slow upload holds no app worker |
| `proxy.min_upload_rate` | `1KiB/s` | none: `client_body_timeout` between two reads only | none | a body slower than this over `upload_rate_window` gets 408: a 1 byte/s drip ends after 15s, a slow phone is never hurt; `0`: no minimum |
| `proxy.upload_rate_window` | `15s` | none | none | a body that ends within one window is never judged |
| `proxy.unbuffered_paths` | none | `proxy_request_buffering off` in a `location` | (streams everything) | path prefixes (`\"/upload/\"`) whose bodies stream to the app as they arrive, for large uploads read as a stream; `body_timeout` and `min_upload_rate` still apply |
| `proxy.max_connections` | from the file descriptor limit: what is left after a reserve of `max(256, limit / 8)`, halved (384 at a limit of 1024; the daemon raises its soft limit to the hard one at start) | `512` per worker (`worker_connections`) | from the file descriptor limit (`maxconn` from `ulimit -n`) | client connections beyond it are closed at once and counted in one log line per 10s, so that running out of descriptors never starves health checks, the store or instance starts; each client connection may hold an upstream one |
| `proxy.max_connections_per_client` | `256` per IPv4 address or IPv6 /64 (`0`: no limit; `trusted_proxies` are not limited) | no limit (`limit_conn` to configure) | no limit (stick tables to configure) | one client cannot take every connection; 256 is far above what browsers open (6 per host), but a large office behind one NAT address may need more |
";

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::process::{RestartPolicy, Rollout};

    #[test]
    fn the_proxy_doc_table_states_our_defaults() {
        let doc = proxy_defaults_doc();
        let cols = doc.lines().next().unwrap().matches('|').count();
        assert!(doc.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
        assert!(doc.lines().all(|l| l.matches('|').count() == cols), "ragged table");
        let cell = |key: &str| -> String {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `proxy.{key}` |")))
                .unwrap_or_else(|| panic!("no row for {key}"));
            row.split('|').nth(2).unwrap().trim().to_string()
        };
        let size = |key| crate::size::parse_size(cell(key).trim_matches('`'));
        let d = |key| crate::duration::parse_duration(cell(key).trim_matches('`'));
        assert_eq!(size("max_header_bytes"), Ok(DEFAULT_PROXY_MAX_HEADER_BYTES));
        assert_eq!(size("max_request_line"), Ok(DEFAULT_PROXY_MAX_REQUEST_LINE));
        assert_eq!(size("max_body_bytes"), Ok(DEFAULT_PROXY_MAX_BODY_BYTES));
        assert_eq!(cell("max_headers"), format!("`{DEFAULT_PROXY_MAX_HEADERS}`"));
        assert_eq!(d("header_timeout"), Ok(DEFAULT_PROXY_HEADER_TIMEOUT));
        assert_eq!(d("idle_timeout"), Ok(DEFAULT_PROXY_IDLE_TIMEOUT));
        assert_eq!(d("upstream_timeout"), Ok(DEFAULT_PROXY_UPSTREAM_TIMEOUT));
        assert_eq!(d("body_timeout"), Ok(DEFAULT_PROXY_BODY_TIMEOUT));
        assert!(cell("redirect_http").starts_with(&format!("`{DEFAULT_REDIRECT_HTTP}`")));
        assert_eq!(cell("workers"), "one per core");
        assert_eq!(size("body_memory_bytes"), Ok(DEFAULT_PROXY_BODY_MEMORY_BYTES));
        assert_eq!(
            cell("min_upload_rate").trim_matches('`').strip_suffix("/s").map(crate::size::parse_size),
            Some(Ok(DEFAULT_PROXY_MIN_UPLOAD_RATE))
        );
        assert_eq!(d("upload_rate_window"), Ok(DEFAULT_PROXY_UPLOAD_RATE_WINDOW));
        assert_eq!(cell("unbuffered_paths"), "none");
        assert!(
            cell("max_connections_per_client").starts_with(&format!("`{DEFAULT_PROXY_MAX_CONNECTIONS_PER_CLIENT}`"))
        );
        assert!(cell("max_connections").contains(&format!("`max({PROXY_FD_RESERVE_MIN}, limit / 8)`")));
    }

    #[test]
    fn defaults_agree_with_core() {
        let restart = RestartPolicy::default();
        assert_eq!(restart.backoff_initial, DEFAULT_BACKOFF_INITIAL);
        assert_eq!(restart.backoff_max, DEFAULT_BACKOFF_MAX);
        assert_eq!(restart.reset_after, DEFAULT_RESET_AFTER);
        assert_eq!(restart.crash_loop_after, DEFAULT_CRASH_LOOP_AFTER);
        let rollout = Rollout::default();
        assert_eq!(rollout.max_surge, DEFAULT_MAX_SURGE);
        assert_eq!(rollout.max_unavailable, DEFAULT_MAX_UNAVAILABLE);
        assert_eq!(rollout.health_timeout, DEFAULT_ROLLOUT_HEALTH_TIMEOUT);
        let canary = nonstop_core::process::Canary::default();
        assert_eq!(canary.steps, DEFAULT_CANARY_STEPS);
        assert_eq!(canary.hold, DEFAULT_CANARY_HOLD);
        assert_eq!(canary.max_5xx_increase_bp, DEFAULT_CANARY_MAX_5XX_INCREASE_BP);
        assert_eq!(canary.max_p95_ratio_pct, DEFAULT_CANARY_MAX_P95_RATIO_PCT);
        assert_eq!(canary.p95_slack, DEFAULT_CANARY_P95_SLACK);
        assert_eq!(canary.min_requests, DEFAULT_CANARY_MIN_REQUESTS);
        assert_eq!(rollout.canary, canary);
    }

    #[test]
    fn the_doc_table_states_our_defaults() {
        let doc = defaults_doc();
        assert!(doc.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
        let cols = doc.lines().next().unwrap().matches('|').count();
        assert!(doc.lines().all(|l| l.matches('|').count() == cols), "ragged table");
        use crate::duration::parse_duration as d;
        let cell = |key: &str| -> String {
            let row = doc.lines().find(|l| l.starts_with(&format!("| {key} |"))).unwrap();
            row.split('|').nth(2).unwrap().trim().trim_matches('`').to_string()
        };
        assert_eq!(cell("`health.path`"), DEFAULT_HEALTH_PATH);
        assert_eq!(d(&cell("`health.interval`")), Ok(DEFAULT_HEALTH_INTERVAL));
        assert_eq!(d(&cell("`health.timeout`")), Ok(DEFAULT_HEALTH_TIMEOUT));
        assert_eq!(cell("`health.healthy_threshold`"), DEFAULT_HEALTHY_THRESHOLD.to_string());
        assert_eq!(cell("`health.unhealthy_threshold`"), DEFAULT_UNHEALTHY_THRESHOLD.to_string());
        let status = format!("{}-{}", DEFAULT_EXPECT_STATUS.min, DEFAULT_EXPECT_STATUS.max);
        assert_eq!(cell("`health.expect_status`"), status);
        assert_eq!(d(&cell("`rollout.health_timeout`")), Ok(DEFAULT_ROLLOUT_HEALTH_TIMEOUT));
        assert_eq!(cell("`rollout.max_surge` / `max_unavailable`"), "1` / `0");
        assert_eq!((DEFAULT_MAX_SURGE, DEFAULT_MAX_UNAVAILABLE), (Quantity::Count(1), Quantity::Count(0)));
        let steps: Vec<String> = DEFAULT_CANARY_STEPS.iter().map(|n| format!("{n}%")).collect();
        assert_eq!(cell("`rollout.canary` (web)"), steps.join("`, `"));
        assert_eq!(d(&cell("`rollout.canary_hold`")), Ok(DEFAULT_CANARY_HOLD));
        assert_eq!(
            crate::canary::basis_points(&cell("`rollout.canary_max_5xx_increase`")),
            Ok(DEFAULT_CANARY_MAX_5XX_INCREASE_BP)
        );
        let p95 = cell("`rollout.canary_max_p95_ratio` / `canary_p95_slack`");
        let (ratio, slack) = p95.split_once("` / `").unwrap();
        assert_eq!(ratio.parse::<f64>().map(crate::canary::ratio_percent), Ok(Ok(DEFAULT_CANARY_MAX_P95_RATIO_PCT)));
        assert_eq!(d(slack), Ok(DEFAULT_CANARY_P95_SLACK));
        assert_eq!(cell("`rollout.canary_min_requests`"), DEFAULT_CANARY_MIN_REQUESTS.to_string());
        assert_eq!(d(&cell("`drain_timeout`")), Ok(DEFAULT_DRAIN_TIMEOUT));
        assert_eq!(d(&cell("`stop_timeout`")), Ok(DEFAULT_STOP_TIMEOUT));
        assert_eq!(d(&cell("`ready_after` (workers)")), Ok(DEFAULT_READY_AFTER));
    }
}
