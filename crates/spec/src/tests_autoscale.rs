//! `[processes.NAME.autoscale]`, `queue` and `[metrics]`: defaults, every
//! key, what `count` means beside them, environments, and every refusal,
//! located.

use super::*;
use nonstop_core::autoscale::{Autoscale, Metric, MetricsSpec, QueueSource, Target};
use nonstop_core::environment::environment_name;
use nonstop_core::ids::ProcessName;
use nonstop_core::process::{ProcessSpec, Quantity};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const FILE: &str = "nonstop.toml";

fn set_of(src: &str) -> Result<SpecSet, SpecErrors> {
    parse_set(src, Path::new(FILE), &BTreeMap::<String, String>::new())
}

#[track_caller]
fn ok(src: &str) -> AppSpec {
    parse(src, Path::new(FILE), &()).unwrap_or_else(|e| panic!("expected a valid spec, got:\n{e}\n---\n{src}"))
}

#[track_caller]
fn errs(src: &str) -> Vec<SpecError> {
    match set_of(src) {
        Ok(s) => panic!("expected errors, got {s:#?}"),
        Err(e) => e.errors,
    }
}

/// Exactly one error, at `line`, whose message holds `message` and whose
/// hint holds `hint`.
#[track_caller]
fn refused(src: &str, line: usize, message: &str, hint: &str) -> SpecError {
    let e = errs(src);
    assert_eq!(e.len(), 1, "expected one error, got:\n{}\n---\n{src}", SpecErrors { errors: e.clone() });
    let e = e.into_iter().next().unwrap();
    assert_eq!(e.line, line, "line of: {e}");
    assert!(e.message.contains(message), "message {:?} lacks {message:?}", e.message);
    let h = e.hint.as_deref().unwrap_or("");
    assert!(h.contains(hint), "hint {h:?} lacks {hint:?}");
    e
}

fn process<'a>(spec: &'a AppSpec, name: &str) -> &'a ProcessSpec {
    spec.process(&ProcessName::new(name).unwrap()).unwrap()
}

/// A web process whose `[processes.web.autoscale]` (line 4) has `lines`
/// (from line 5).
fn web(lines: &str) -> String {
    format!("app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n[processes.web.autoscale]\n{lines}\n")
}

/// `[base] redis` (lines 2-3), a worker with `worker` lines (from line 6),
/// then its `[processes.worker.autoscale]` with `autoscale` lines.
fn worker(worker: &str, autoscale: &str) -> String {
    format!(
        "app = \"blog\"\n[base]\nredis = \"redis://127.0.0.1:6379\"\n[processes.worker]\ncommand = \"celery -A blog worker\"\n{worker}\n[processes.worker.autoscale]\n{autoscale}\n"
    )
}

// ---------------------------------------------------------------- valid files

#[test]
fn defaults_apply_to_the_keys_left_out() {
    let spec = ok(&web("max = 8\ncpu_percent = 70"));
    let w = process(&spec, "web");
    assert_eq!(
        w.autoscale,
        Some(Autoscale {
            min: DEFAULT_AUTOSCALE_MIN,
            max: 8,
            targets: vec![Target { metric: Metric::CpuPercent, value: 70 }],
            scale_out_cooldown: DEFAULT_AUTOSCALE_SCALE_OUT_COOLDOWN,
            scale_in_cooldown: DEFAULT_AUTOSCALE_SCALE_IN_COOLDOWN,
            scale_in_window: DEFAULT_AUTOSCALE_SCALE_IN_WINDOW,
            max_step: DEFAULT_AUTOSCALE_MAX_STEP,
        })
    );
    assert_eq!(
        (DEFAULT_AUTOSCALE_SCALE_OUT_COOLDOWN, DEFAULT_AUTOSCALE_SCALE_IN_COOLDOWN, DEFAULT_AUTOSCALE_SCALE_IN_WINDOW),
        (Duration::from_secs(15), Duration::from_secs(60), Duration::from_secs(120))
    );
    assert_eq!(DEFAULT_AUTOSCALE_MAX_STEP, Quantity::Count(4));
    // Without `count`, it starts at min.
    assert_eq!(w.count, 1);
    assert_eq!((w.queue.as_ref(), spec.metrics.as_ref()), (None, None));
    // Without the table, nothing changes.
    let plain = ok("app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n");
    assert_eq!(process(&plain, "web").autoscale, None);
    let json = serde_json::to_string(&plain).unwrap();
    assert!(!json.contains("autoscale") && !json.contains("queue") && !json.contains("metrics"), "{json}");
}

#[test]
fn every_key_is_read() {
    let spec = ok(&web("min = 3\nmax = 12\ncpu_percent = \"65%\"\nrequests_per_instance = 40\np95_ms = 250.0\n\
         scale_out_cooldown = 0\nscale_in_cooldown = \"90s\"\nscale_in_window = \"1h\"\nmax_step = \"100%\""));
    let a = process(&spec, "web").autoscale.clone().unwrap();
    assert_eq!((a.min, a.max), (3, 12));
    let targets: Vec<(Metric, u32)> = a.targets.iter().map(|t| (t.metric, t.value)).collect();
    assert_eq!(targets, [(Metric::CpuPercent, 65), (Metric::RequestsPerInstance, 40), (Metric::P95Ms, 250)]);
    assert_eq!(
        (a.scale_out_cooldown, a.scale_in_cooldown, a.scale_in_window),
        (Duration::ZERO, Duration::from_secs(90), Duration::from_secs(3600))
    );
    assert_eq!(a.max_step, Quantity::Percent(100));
    assert_eq!(process(&spec, "web").count, 3);
    // The spec a daemon stores reads back the same.
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<AppSpec>(&json).unwrap(), spec);
}

#[test]
fn a_queue_worker_may_scale_to_zero() {
    let spec = ok(&worker("queue = { redis_list = \"celery\" }", "min = 0\nmax = 10\nqueue_per_instance = 20"));
    let w = process(&spec, "worker");
    assert_eq!(w.queue, Some(QueueSource::RedisList("celery".into())));
    let a = w.autoscale.as_ref().unwrap();
    assert_eq!((a.min, a.max, a.target(Metric::QueuePerInstance)), (0, 10, Some(20)));
    assert_eq!(w.count, 0, "starts at min");
    // A [processes.worker.queue] table is the same thing.
    let spec = ok(&worker("[processes.worker.queue]\nredis_list = \"celery\"", "max = 4\nqueue_per_instance = 5"));
    assert_eq!(process(&spec, "worker").queue, Some(QueueSource::RedisList("celery".into())));
    // A queue without autoscaling (for the dashboard).
    let spec = ok("app = \"blog\"\n[env]\nREDIS_URL = \"redis://127.0.0.1:6379/0\"\n[processes.worker]\ncommand = \"celery -A blog worker\"\nqueue = { redis_list = \"celery\" }\n");
    assert_eq!(process(&spec, "worker").queue, Some(QueueSource::RedisList("celery".into())));
}

#[test]
fn count_is_where_autoscaling_starts() {
    assert_eq!(process(&ok(&web("min = 2\nmax = 8\ncpu_percent = 70")), "web").count, 2);
    let src = "app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\ncount = 5\n[processes.web.autoscale]\nmin = 2\nmax = 8\ncpu_percent = 70\n";
    assert_eq!(process(&ok(src), "web").count, 5);
    let e = refused(
        &src.replace("count = 5", "count = 9"),
        4,
        "`count` in [processes.web] is 9, outside the autoscaling bounds of [processes.web.autoscale] (min 2, max 8)",
        "set it from 2 to 8, or leave it out to start at min",
    );
    assert_eq!(e.column, 9);
    refused(&src.replace("count = 5", "count = 1"), 4, "is 1, outside the autoscaling bounds", "from 2 to 8");
}

// ------------------------------------------------------------------ refusals

#[test]
fn bounds_are_refused_when_they_cannot_hold() {
    refused(
        &web("min = 5\nmax = 3\ncpu_percent = 70"),
        6,
        "`min` in [processes.web.autoscale] (5) is greater than `max` (3)",
        "min = 3, max = 5",
    );
    refused(&web("min = 2\ncpu_percent = 70"), 4, "missing `max` in [processes.web.autoscale]", "max = 8");
    refused(
        &web("max = 0\ncpu_percent = 70"),
        5,
        "`max` in [processes.web.autoscale] must be at least 1, not 0",
        "max = 8",
    );
    refused(
        &web("min = -1\nmax = 3\ncpu_percent = 70"),
        5,
        "`min` in [processes.web.autoscale] must be at least 0, not -1",
        "min = 1",
    );
    refused(
        &web("min = 0\nmax = 3\ncpu_percent = 70"),
        5,
        "`min` in [processes.web.autoscale] is 0, but a web process cannot scale to zero",
        "set min = 1",
    );
    refused(
        &worker("", "min = 0\nmax = 3\ncpu_percent = 70"),
        8,
        "only a queue target brings a worker back from zero instances",
        "queue = { redis_list = \"celery\" }",
    );
    refused(
        &web("max = \"8\"\ncpu_percent = 70"),
        5,
        "`max` in [processes.web.autoscale] must be an integer, not a string",
        "max = 8",
    );
}

#[test]
fn targets_must_be_whole_numbers_above_zero() {
    for (line, message) in [
        ("cpu_percent = 0", "`cpu_percent` in [processes.web.autoscale] must be greater than 0, not 0"),
        ("cpu_percent = -20", "must be greater than 0, not -20"),
        (
            "requests_per_instance = 0.0",
            "`requests_per_instance` in [processes.web.autoscale] must be greater than 0, not 0",
        ),
        ("p95_ms = -1.5", "`p95_ms` in [processes.web.autoscale] must be greater than 0, not -1.5"),
        ("cpu_percent = \"0%\"", "must be greater than 0, not 0"),
    ] {
        refused(&web(&format!("max = 4\n{line}")), 6, message, "for example: ");
    }
    refused(
        &web("max = 4\ncpu_percent = 70.5"),
        6,
        "`cpu_percent` in [processes.web.autoscale] must be a whole number, not 70.5",
        "cpu_percent = 71",
    );
    refused(
        &web("max = 4\np95_ms = \"300ms\""),
        6,
        "`p95_ms` in [processes.web.autoscale] must be a number, not a string (\"300ms\")",
        "without quotes: p95_ms = 300",
    );
    refused(
        &web("max = 4\nrequests_per_instance = \"50/s\""),
        6,
        "must be a number, not a string",
        "requests_per_instance = 50",
    );
    refused(
        &web("max = 4\ncpu_percent = \"lots\""),
        6,
        "must be a number, not a string",
        "for example: cpu_percent = 70",
    );
    refused(
        &web("max = 4\ncpu_percent = true"),
        6,
        "`cpu_percent` in [processes.web.autoscale] must be a number greater than 0, not a boolean",
        "cpu_percent = 70",
    );
}

#[test]
fn a_target_must_suit_the_process() {
    refused(
        &worker("", "max = 4\np95_ms = 300"),
        9,
        "`p95_ms` in [processes.worker.autoscale] applies only to web processes: the proxy measures it",
        "track cpu_percent, or queue_per_instance with a queue instead",
    );
    refused(
        &worker("", "max = 4\nrequests_per_instance = 50"),
        9,
        "`requests_per_instance` in [processes.worker.autoscale] applies only to web processes",
        "remove it",
    );
    refused(
        &web("max = 4\nqueue_per_instance = 20"),
        6,
        "`queue_per_instance` in [processes.web.autoscale] applies only to workers",
        "requests_per_instance, p95_ms or cpu_percent",
    );
    refused(
        &worker("", "max = 4\nqueue_per_instance = 20"),
        9,
        "`queue_per_instance` in [processes.worker.autoscale] needs the length of the process's queue, but [processes.worker] has no `queue`",
        "queue = { redis_list = \"celery\" }",
    );
    refused(
        &web("max = 4\nmin = 2"),
        4,
        "[processes.web.autoscale] has no target",
        "cpu_percent = 70, requests_per_instance = 50, p95_ms = 300",
    );
    refused(&worker("", "max = 4"), 7, "[processes.worker.autoscale] has no target", "queue_per_instance = 20");
    let singleton = "app = \"blog\"\n[processes.beat]\ncommand = \"celery beat\"\nkind = \"singleton\"\n[processes.beat.autoscale]\nmax = 2\ncpu_percent = 70\n";
    refused(
        singleton,
        5,
        "[processes.beat.autoscale]: a singleton never runs more than one instance",
        "kind = \"worker\"",
    );
}

#[test]
fn cooldowns_windows_and_steps_are_checked() {
    refused(
        &web("max = 4\ncpu_percent = 70\nscale_in_window = \"2h\""),
        7,
        "`scale_in_window` in [processes.web.autoscale] must be at most 1h, not 2h",
        "scale_in_window = \"2m\"",
    );
    refused(
        &web("max = 4\ncpu_percent = 70\nscale_out_cooldown = -1"),
        7,
        "`scale_out_cooldown` in [processes.web.autoscale] must not be negative",
        "scale_out_cooldown = \"15s\"",
    );
    refused(
        &web("max = 4\ncpu_percent = 70\nscale_in_cooldown = \"soon\""),
        7,
        "`scale_in_cooldown` in [processes.web.autoscale] is not a valid duration",
        "durations are",
    );
    refused(
        &web("max = 4\ncpu_percent = 70\nmax_step = 0"),
        7,
        "`max_step` in [processes.web.autoscale] must be at least 1, not 0",
        "max_step = \"50%\"",
    );
    refused(
        &web("max = 4\ncpu_percent = 70\nmax_step = \"0%\""),
        7,
        "must be from 1% to 1000% of the current count, not 0%",
        "max_step = 4",
    );
    refused(&web("max = 4\ncpu_percent = 70\nmax_step = \"2000%\""), 7, "not 2000%", "max_step = 4");
    refused(
        &web("max = 4\ncpu_percent = 70\nmax_step = \"3\""),
        7,
        "is not a count or a percentage (\"3\")",
        "remove the quotes for a count (max_step = 3)",
    );
    refused(
        &web("max = 4\ncpu_percent = 70\nmax_stpe = 3"),
        7,
        "unknown key `max_stpe` in [processes.web.autoscale]",
        "did you mean `max_step`?",
    );
    refused(
        &web("max = 4\ncpu_percent = 70\nmax_step = 1.5"),
        7,
        "`max_step` in [processes.web.autoscale] must be a count (4) or a percentage (\"50%\")",
        "max_step = 4",
    );
}

#[test]
fn a_queue_is_a_redis_list_of_a_worker() {
    let web_queue = "app = \"blog\"\n[base]\nredis = \"redis://127.0.0.1:6379\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\nqueue = { redis_list = \"celery\" }\n";
    refused(
        web_queue,
        6,
        "`queue` in [processes.web] applies only to workers",
        "requests_per_instance or p95_ms in [processes.web.autoscale]",
    );
    let q = |line: &str| worker(line, "max = 4\ncpu_percent = 70");
    refused(
        &q("queue = \"celery\""),
        6,
        "`queue` in [processes.worker] must be a table that says where the queue is, not a string",
        "queue = { redis_list = \"celery\" }",
    );
    refused(
        &q("queue = {}"),
        6,
        "`queue` in [processes.worker] does not say where the queue is: `redis_list` is missing",
        "queue = { redis_list = \"celery\" }",
    );
    refused(
        &q("queue = { redis_list = \" \" }"),
        6,
        "`redis_list` of `queue` in [processes.worker] is empty",
        "redis_list = \"celery\"",
    );
    refused(&q("queue = { redis_list = \"a\\nb\" }"), 6, "contains control characters", "redis_list");
    refused(
        &q("queue = { redis_lsit = \"celery\" }"),
        6,
        "unknown key `redis_lsit` in [processes.worker.queue]",
        "did you mean `redis_list`?",
    );
    refused(
        &q("queue = 3"),
        6,
        "`queue` in [processes.worker] must be a table, not an integer",
        "queue = { redis_list = \"celery\" }",
    );
}

#[test]
fn a_queue_without_redis_in_the_file_is_valid_the_daemon_checks_the_environment() {
    // REDIS_URL may be a secret or a config variable of the environment,
    // which the file does not show: not the file's error (the daemon
    // refuses to run the process where it has none, `engine/src/queue.rs`).
    let no_redis = "app = \"blog\"\n[processes.worker]\ncommand = \"celery -A blog worker\"\nqueue = { redis_list = \"celery\" }\n";
    assert_eq!(process(&ok(no_redis), "worker").queue, Some(QueueSource::RedisList("celery".into())));
    let envs = format!(
        "environment = \"production\"\n{no_redis}[environments.production.env]\nREDIS_URL = \"redis://10.0.0.5:6379/0\"\n[environments.staging]\nhosts = [\"staging.example.com\"]\n"
    );
    let set = set_of(&envs).unwrap_or_else(|e| panic!("{e}"));
    for name in ["production", "staging", "pr-7"] {
        let spec = set.resolve(&environment_name(name).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(process(&spec, "worker").queue, Some(QueueSource::RedisList("celery".into())), "{name}");
        assert_eq!(spec.env.contains_key("REDIS_URL"), name == "production", "{name}");
    }
}

#[test]
fn metrics_listen_on_an_address_of_their_own() {
    let with = |table: &str| format!("app = \"blog\"\n{table}\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n");
    let spec = ok(&with("[metrics]\nlisten = \"0.0.0.0:9100\""));
    assert_eq!(spec.metrics, Some(MetricsSpec { listen: "0.0.0.0:9100".parse().unwrap() }));
    let spec = ok(&with("[metrics]"));
    assert_eq!(spec.metrics.map(|m| m.listen.to_string()).as_deref(), Some(DEFAULT_METRICS_LISTEN));
    refused(
        &with("[metrics]\nlisten = \"localhost:9100\""),
        3,
        "`listen` in [metrics] is not a valid address (\"localhost:9100\"): a host name is not an address to listen on",
        "127.0.0.1:9100",
    );
    refused(&with("[metrics]\nlisten = \"127.0.0.1:0\""), 3, "port 0 would pick a random port", "127.0.0.1:9464");
    refused(&with("[metrics]\nlisten = \"9100\""), 3, "the IP address is missing", "127.0.0.1:9100");
    refused(
        &with("[metrics]\nlisten = \"127.0.0.1:8080\""),
        3,
        "`listen` in [metrics] (127.0.0.1:8080) takes the port of `listen` in [proxy] (127.0.0.1:8080)",
        "listen = \"127.0.0.1:9464\"",
    );
    refused(
        &with("[proxy]\nlisten = \"0.0.0.0:9000\"\n[metrics]\nlisten = \"127.0.0.1:9000\""),
        5,
        "takes the port of `listen` in [proxy] (0.0.0.0:9000)",
        "a port of its own",
    );
    refused(
        &with("[metrics]\nlisen = \"127.0.0.1:9100\""),
        3,
        "unknown key `lisen` in [metrics]",
        "did you mean `listen`?",
    );
    refused(
        &with("metrics = \"127.0.0.1:9100\""),
        2,
        "`metrics` must be a table, not a string",
        "[metrics]\nlisten = \"127.0.0.1:9464\"",
    );
}

// -------------------------------------------------------------- environments

/// A web process autoscaled 2..8 on CPU (lines 1-7), then `tables`.
fn autoscaled(tables: &str) -> String {
    format!(
        "app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n[processes.web.autoscale]\nmin = 2\nmax = 8\ncpu_percent = 70\n{tables}"
    )
}

#[test]
fn an_environment_changes_autoscale_key_by_key() {
    let set = set_of(&autoscaled(
        "[environments.production]\n[environments.staging.processes.web.autoscale]\nmin = 1\nmax = 2\nmax_step = 1\n[environments.solo.processes.web.autoscale]\nmin = 1\nmax = 1\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let resolve = |name: &str| set.resolve(&environment_name(name).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    let production = resolve("production");
    let staging = resolve("staging");
    let (p, s) = (process(&production, "web"), process(&staging, "web"));
    let (pa, sa) = (p.autoscale.as_ref().unwrap(), s.autoscale.as_ref().unwrap());
    assert_eq!((pa.min, pa.max, pa.max_step), (2, 8, DEFAULT_AUTOSCALE_MAX_STEP));
    assert_eq!((sa.min, sa.max, sa.max_step), (1, 2, Quantity::Count(1)));
    assert_eq!(sa.targets, pa.targets, "the file's targets");
    assert_eq!((p.count, s.count), (2, 1), "each starts at its min");
    // min = max: a fixed count.
    let solo = resolve("solo");
    assert_eq!(process(&solo, "web").autoscale.as_ref().map(|a| (a.min, a.max)), Some((1, 1)));

    // Autoscaling in one environment only.
    let set = set_of(
        "app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\ncount = 2\n[environments.production.processes.web.autoscale]\nmax = 10\np95_ms = 250\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let production = set.resolve(&environment_name("production").unwrap()).unwrap();
    assert_eq!(process(&production, "web").autoscale.as_ref().map(|a| (a.min, a.max)), Some((1, 10)));
    assert_eq!(process(&production, "web").count, 2);
    assert_eq!(process(set.base(), "web").autoscale, None);
}

#[test]
fn an_environment_s_autoscale_is_checked_with_the_file_s() {
    // staging's max under the file's min: at staging's max.
    refused(
        &autoscaled("[environments.staging.processes.web.autoscale]\nmax = 1\n"),
        9,
        "`min` in [environments.staging.processes.web.autoscale] (2) is greater than `max` (1)",
        "min = 1, max = 2",
    );
    // staging's count outside the bounds.
    let e = refused(
        &autoscaled("[environments.staging.processes.web]\ncount = 12\n"),
        9,
        "`count` in [environments.staging.processes.web] is 12, outside the autoscaling bounds",
        "from 2 to 8",
    );
    assert_eq!(e.column, 9);
    refused(
        &autoscaled("[environments.staging.processes.web.autoscale]\np95_ms = 0\n"),
        9,
        "`p95_ms` in [environments.staging.processes.web.autoscale] must be greater than 0, not 0",
        "p95_ms = 300",
    );
    refused(
        &autoscaled("[environments.staging.processes.web.autoscale]\nmaximum = 3\n"),
        9,
        "unknown key `maximum` in [environments.staging.processes.web.autoscale]",
        "valid keys: min, max",
    );
    // The queue is the file's: the same in every environment.
    refused(
        &autoscaled("[environments.staging.processes.web]\nqueue = { redis_list = \"x\" }\n"),
        9,
        "unknown key `queue` in [environments.staging.processes.web]",
        "`queue` is the same in every environment",
    );
    // An environment's table over a process without one is complete by
    // itself.
    let plain = "app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n";
    let e = errs(&format!("{plain}[environments.production.processes.web.autoscale]\nmin = 2\n"));
    let shown: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.message.as_str())).collect();
    assert_eq!(
        shown,
        [
            (4, "missing `max` in [environments.production.processes.web.autoscale]: the most instances autoscaling may run"),
            (4, "[environments.production.processes.web.autoscale] has no target: autoscaling needs at least one metric to follow"),
        ]
    );
    // A problem of the file's own table is reported once, not again for
    // each environment.
    let e = errs(&autoscaled("[environments.staging]\n[environments.production]\n").replace("max = 8", "max = 1"));
    assert_eq!(e.len(), 1, "{}", SpecErrors { errors: e.clone() });
}
