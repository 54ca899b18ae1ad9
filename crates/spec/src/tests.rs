//! Every rule of `nonstop.toml`, valid and invalid.

use super::*;
use crate::raw::RawSpec;
use nonstop_core::autoscale::{Metric, QueueSource};
use nonstop_core::ids::{AppName, ProcessName};
use nonstop_core::process::{ProcessKind, Quantity, Signal, StatusRange};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const FILE: &str = "nonstop.toml";

fn ok(src: &str) -> AppSpec {
    parse(src, Path::new(FILE), &()).unwrap_or_else(|e| panic!("expected a valid spec, got:\n{e}"))
}

fn errs_with(src: &str, env: &[(&str, &str)]) -> Vec<SpecError> {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    match parse(src, Path::new(FILE), &env) {
        Ok(spec) => panic!("expected errors, got {spec:#?}"),
        Err(e) => {
            assert!(!e.is_empty());
            e.errors
        }
    }
}

fn errs(src: &str) -> Vec<SpecError> {
    errs_with(src, &[])
}

/// Exactly one error, returned.
#[track_caller]
fn one(src: &str) -> SpecError {
    let mut e = errs(src);
    assert_eq!(e.len(), 1, "expected one error, got:\n{}", SpecErrors { errors: e.clone() });
    e.remove(0)
}

#[track_caller]
fn assert_err(e: &SpecError, line: usize, column: usize, message: &str, hint: &str) {
    assert_eq!((e.line, e.column), (line, column), "location of: {e}");
    assert!(e.message.contains(message), "message {:?} lacks {message:?}", e.message);
    let h = e.hint.as_deref().unwrap_or("");
    assert!(h.contains(hint), "hint {h:?} lacks {hint:?}");
}

const WEB: &str = "app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n";

/// `WEB` plus extra lines in [processes.web] (starting on line 4).
fn web_with(lines: &str) -> String {
    format!("{WEB}{lines}")
}

/// Top-level tables (starting on line 2) before a minimal web process.
fn top(tables: &str) -> String {
    format!("app = \"blog\"\n{tables}[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n")
}

fn web(spec: &AppSpec) -> &nonstop_core::process::ProcessSpec {
    spec.process(&ProcessName::new("web").unwrap()).unwrap()
}

// ---------------------------------------------------------------- valid files

#[test]
fn minimal_file_gets_every_default() {
    let spec = ok(WEB);
    assert_eq!(spec.app, AppName::new("blog").unwrap());
    assert!(spec.env.is_empty());
    assert!(spec.build.is_empty());
    assert_eq!(spec.proxy.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(spec.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
    assert!(spec.release.tasks.is_empty());
    assert!(spec.release.post_tasks.is_empty());
    assert_eq!(spec.release.task_timeout, Duration::from_secs(600));
    assert_eq!(spec.release.retain_releases, 5);
    assert!(spec.release.order.is_empty());

    let p = web(&spec);
    assert_eq!(p.kind, ProcessKind::Web);
    assert_eq!(p.command, "gunicorn blog.wsgi");
    assert_eq!(p.count, 1);
    assert_eq!(p.stop_signal, Signal::Term);
    assert_eq!(p.stop_timeout, Duration::from_secs(10));
    assert_eq!(p.drain_timeout, Duration::from_secs(30));
    assert_eq!(p.ready_after, Duration::from_secs(2));
    assert!(p.env.is_empty());
    let h = p.health.as_ref().expect("web processes always have a health check");
    assert_eq!(h.path, "/");
    assert_eq!(h.interval, Duration::from_secs(1));
    assert_eq!(h.timeout, Duration::from_secs(2));
    assert_eq!(h.healthy_threshold, 2);
    assert_eq!(h.unhealthy_threshold, 3);
    assert_eq!(h.expect_status, StatusRange { min: 200, max: 399 });
    assert_eq!(p.rollout.max_surge, Quantity::Count(1));
    assert_eq!(p.rollout.max_unavailable, Quantity::Count(0));
    assert_eq!(p.rollout.health_timeout, Duration::from_secs(60));
    assert_eq!(p.restart.backoff_initial, Duration::from_millis(100));
    assert_eq!(p.restart.backoff_max, Duration::from_secs(30));
    assert_eq!(p.restart.reset_after, Duration::from_secs(30));
    assert_eq!(p.restart.crash_loop_after, 5);
}

/// The example of the file-format contract, every key set.
pub(crate) const FULL: &str = r#"app = "blog"
build = ["pip install -r requirements.txt", "python manage.py collectstatic --noinput"]
environment = "production"

[env]
DJANGO_SETTINGS_MODULE = "blog.settings"
WORKERS = 4
RATIO = 0.5
DEBUG = false

[proxy]
listen = "0.0.0.0:9000"
https_listen = "0.0.0.0:9443"
redirect_http = false
max_header_bytes = "32KiB"
max_headers = 50
max_request_line = 4096
max_body_bytes = "10MiB"
header_timeout = "5s"
idle_timeout = "2m"
upstream_timeout = 30
body_timeout = "20s"
workers = 4
trusted_proxies = ["10.0.0.0/8"]
body_memory_bytes = "256KiB"
min_upload_rate = "2KiB/s"
upload_rate_window = "20s"
unbuffered_paths = ["/upload/"]
max_connections = 5000
max_connections_per_client = 0

[[proxy.tls]]
hosts = ["blog.example.com", "*.Blog.example.com"]
cert = "certs/blog.pem"
key = "/etc/ssl/blog.key"

[[proxy.tls]]
hosts = ["other.example"]
cert = "other.pem"
key = "other.key"

[release]
tasks = ["python manage.py migrate --noinput"]
post_tasks = ["python manage.py clearsessions"]
task_timeout = "15m"
retain_releases = 3
order = ["worker", "web", "beat"]

[[static]]
url = "/static/"
dir = "staticfiles"

[[static]]
url = "/media/"
dir = "./public/media"

[processes.web]
command = "gunicorn blog.wsgi --bind 127.0.0.1:$PORT"
kind = "web"
count = 2
stop_signal = "SIGQUIT"
stop_timeout = "20s"
drain_timeout = "45s"

[processes.web.env]
WEB_CONCURRENCY = 3

[processes.web.health]
path = "/health/"
interval = "2s"
timeout = "1500ms"
healthy_threshold = 3
unhealthy_threshold = 4
expect_status = "200-299"
host = "notes.example.com"
smoke = ["/", { path = "/notes/", expect_status = "200-299" }]

[processes.web.rollout]
max_surge = "50%"
max_unavailable = 1
health_timeout = "90s"
canary = ["10%", "50%"]
canary_hold = "30s"
canary_max_5xx_increase = "0.5%"
canary_max_p95_ratio = 1.5
canary_p95_slack = "100ms"
canary_min_requests = 50

[processes.web.restart]
backoff_initial = "200ms"
backoff_max = "1m"
reset_after = "2m"
crash_loop_after = 7

[processes.web.autoscale]
min = 2
max = 8
cpu_percent = 70
requests_per_instance = 50
p95_ms = 300
scale_out_cooldown = "20s"
scale_in_cooldown = "2m"
scale_in_window = "3m"
max_step = "50%"

[processes.worker]
command = "celery -A blog worker"
count = 3
ready_after = "5s"
stop_timeout = 30
queue = { redis_list = "celery" }

[processes.worker.autoscale]
min = 0
max = 6
queue_per_instance = 20

[processes.beat]
command = "celery -A blog beat"
kind = "singleton"
stop_signal = "term"

[database]
url = "postgres://blog:PASSWORD@127.0.0.1:5432/blog"

[database.env]
POSTGRES_NAME = "name"
POSTGRES_SERVICE_HOST = "host"
POSTGRES_PASSWORD = "password"

[base]
postgres = "postgres://admin:PASSWORD@127.0.0.1:5432/"
redis = "redis://127.0.0.1:6379"

[metrics]
listen = "127.0.0.1:9464"

[environments.production]
hosts = ["blog.example.com", "www.blog.example.com"]
default = true
protected = true

[environments.staging]
hosts = ["staging.blog.example.com", "*.review.blog.example.com"]
protected = false

[environments.staging.env]
DEBUG = true

[environments.staging.processes.web]
count = 1

[environments.staging.processes.web.env]
WEB_CONCURRENCY = 1

[environments.staging.processes.web.health]
interval = "1s"

[environments.staging.processes.web.rollout]
canary = false

[environments.staging.processes.web.autoscale]
min = 1
max = 2

[environments.staging.database]
url = "postgres://blog:PASSWORD@127.0.0.1:5432/blog_staging"

[environments.staging.database.env]
POSTGRES_NAME = "name"
"#;

#[test]
fn full_file_sets_every_key() {
    let spec = ok(FULL);
    assert_eq!(spec.build, ["pip install -r requirements.txt", "python manage.py collectstatic --noinput"]);
    let env: Vec<(&str, &str)> = spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        env,
        [("DEBUG", "false"), ("DJANGO_SETTINGS_MODULE", "blog.settings"), ("RATIO", "0.5"), ("WORKERS", "4")]
    );
    assert_eq!(spec.proxy.listen, "0.0.0.0:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(spec.release.tasks, ["python manage.py migrate --noinput"]);
    assert_eq!(spec.release.post_tasks, ["python manage.py clearsessions"]);
    assert_eq!(spec.release.task_timeout, Duration::from_secs(900));
    assert_eq!(spec.release.retain_releases, 3);
    let order: Vec<&str> = spec.release.order.iter().map(|n| n.as_str()).collect();
    assert_eq!(order, ["worker", "web", "beat"]);

    let names: Vec<&str> = spec.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web", "worker", "beat"]);

    let w = web(&spec);
    assert_eq!(w.count, 2);
    assert_eq!(w.stop_signal, Signal::Quit);
    assert_eq!(w.stop_timeout, Duration::from_secs(20));
    assert_eq!(w.drain_timeout, Duration::from_secs(45));
    assert_eq!(w.env.get("WEB_CONCURRENCY").map(String::as_str), Some("3"));
    let h = w.health.as_ref().unwrap();
    assert_eq!(h.path, "/health/");
    assert_eq!(h.interval, Duration::from_secs(2));
    assert_eq!(h.timeout, Duration::from_millis(1500));
    assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (3, 4));
    assert_eq!(h.expect_status, StatusRange { min: 200, max: 299 });
    assert_eq!(h.host.as_deref(), Some("notes.example.com"));
    assert_eq!(w.rollout.max_surge, Quantity::Percent(50));
    assert_eq!(w.rollout.max_unavailable, Quantity::Count(1));
    assert_eq!(w.rollout.health_timeout, Duration::from_secs(90));
    let c = &w.rollout.canary;
    assert_eq!(c.steps, [10, 50]);
    assert_eq!((c.hold, c.p95_slack), (Duration::from_secs(30), Duration::from_millis(100)));
    assert_eq!((c.max_5xx_increase_bp, c.max_p95_ratio_pct, c.min_requests), (50, 150, 50));
    assert_eq!(w.restart.backoff_initial, Duration::from_millis(200));
    assert_eq!(w.restart.backoff_max, Duration::from_secs(60));
    assert_eq!(w.restart.reset_after, Duration::from_secs(120));
    assert_eq!(w.restart.crash_loop_after, 7);
    let a = w.autoscale.as_ref().unwrap();
    assert_eq!((a.min, a.max, a.max_step), (2, 8, Quantity::Percent(50)));
    let targets: Vec<(Metric, u32)> = a.targets.iter().map(|t| (t.metric, t.value)).collect();
    assert_eq!(targets, [(Metric::CpuPercent, 70), (Metric::RequestsPerInstance, 50), (Metric::P95Ms, 300)]);
    assert_eq!(
        (a.scale_out_cooldown, a.scale_in_cooldown, a.scale_in_window),
        (Duration::from_secs(20), Duration::from_secs(120), Duration::from_secs(180))
    );
    assert_eq!(w.queue, None);
    assert_eq!(spec.metrics.as_ref().map(|m| m.listen), Some("127.0.0.1:9464".parse().unwrap()));

    let worker = &spec.processes[1];
    assert_eq!(worker.kind, ProcessKind::Worker);
    assert_eq!(worker.count, 3);
    assert_eq!(worker.ready_after, Duration::from_secs(5));
    assert_eq!(worker.stop_timeout, Duration::from_secs(30));
    assert!(worker.health.is_none());
    assert_eq!(worker.rollout.max_surge, Quantity::Count(1));
    assert_eq!(worker.queue, Some(QueueSource::RedisList("celery".into())));
    let a = worker.autoscale.as_ref().unwrap();
    assert_eq!((a.min, a.max, a.target(Metric::QueuePerInstance)), (0, 6, Some(20)));

    let beat = &spec.processes[2];
    assert_eq!(beat.kind, ProcessKind::Singleton);
    assert_eq!(beat.count, 1);
    assert_eq!(beat.stop_signal, Signal::Term);
    assert!(beat.health.is_none());
    assert_eq!(beat.rollout.max_surge, DEFAULT_SINGLETON_MAX_SURGE);
    assert_eq!(beat.rollout.max_unavailable, DEFAULT_SINGLETON_MAX_UNAVAILABLE);
}

#[test]
fn the_walk_agrees_with_serde_on_the_schema() {
    // Every key of the schema is set in FULL; if the walk forgot one, it
    // would be None here and Some in serde's result.
    let (doc, syntax) = toml::de::DeTable::parse_recoverable(FULL);
    assert!(syntax.is_empty());
    let mut diags = Diags::default();
    let walked = walk::walk(&doc, &mut diags);
    assert!(diags.is_empty());
    let serde: RawSpec = toml::from_str(FULL).unwrap();
    assert_eq!(walked, serde);
    // And serde's schema refuses unknown keys, as the walk does.
    let err = toml::from_str::<RawSpec>(&FULL.replace("count = 3", "cuont = 3")).unwrap_err();
    assert!(err.to_string().contains("unknown field `cuont`"), "{err}");
}

#[test]
fn every_schema_key_is_set_in_the_full_example() {
    use crate::raw::*;
    let doc: toml::Table = toml::from_str(FULL).unwrap();
    let keys_of = |v: &toml::Value| -> Vec<String> { v.as_table().unwrap().keys().cloned().collect() };
    let web = &doc["processes"]["web"];
    for (fields, table) in [
        (field_names::<RawSpec>(), toml::Value::Table(doc.clone())),
        (field_names::<RawRelease>(), doc["release"].clone()),
        (field_names::<RawProcess>(), {
            let mut both = web.as_table().unwrap().clone();
            both.extend(doc["processes"]["worker"].as_table().unwrap().clone());
            toml::Value::Table(both)
        }),
        (field_names::<RawHealth>(), web["health"].clone()),
        (field_names::<RawRollout>(), web["rollout"].clone()),
        (field_names::<RawRestart>(), web["restart"].clone()),
        (field_names::<RawAutoscale>(), {
            let mut both = web["autoscale"].as_table().unwrap().clone();
            both.extend(doc["processes"]["worker"]["autoscale"].as_table().unwrap().clone());
            toml::Value::Table(both)
        }),
        (field_names::<RawQueue>(), doc["processes"]["worker"]["queue"].clone()),
        (field_names::<RawMetrics>(), doc["metrics"].clone()),
        (field_names::<RawProxy>(), doc["proxy"].clone()),
        (field_names::<RawTls>(), doc["proxy"]["tls"][0].clone()),
        (field_names::<RawStatic>(), doc["static"][0].clone()),
        (field_names::<RawDatabase>(), doc["database"].clone()),
        (field_names::<RawBase>(), doc["base"].clone()),
        (field_names::<RawEnvironment>(), {
            let mut both = doc["environments"]["production"].as_table().unwrap().clone();
            both.extend(doc["environments"]["staging"].as_table().unwrap().clone());
            toml::Value::Table(both)
        }),
        (field_names::<RawProcessOverride>(), doc["environments"]["staging"]["processes"]["web"].clone()),
    ] {
        let present = keys_of(&table);
        for f in fields {
            assert!(present.iter().any(|k| k == f), "FULL does not set `{f}`");
        }
    }
}

#[test]
fn processes_keep_declaration_order() {
    let spec = ok(r#"app = "a"
[processes.zeta]
command = "z"
[processes.alpha]
command = "a"
[processes.web]
command = "w"
[processes.mid]
command = "m"
"#);
    let names: Vec<&str> = spec.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha", "web", "mid"]);
}

#[test]
fn kind_defaults_to_web_only_for_the_process_named_web() {
    let spec = ok(r#"app = "a"
[processes.web]
command = "w"
[processes.api]
command = "x"
[processes.clock]
command = "c"
kind = "singleton"
"#);
    let kinds: Vec<ProcessKind> = spec.processes.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, [ProcessKind::Web, ProcessKind::Worker, ProcessKind::Singleton]);
    // A web process may have another name.
    let spec = ok("app = \"a\"\n[processes.frontend]\ncommand = \"x\"\nkind = \"web\"\n");
    assert_eq!(spec.processes[0].kind, ProcessKind::Web);
    assert!(spec.processes[0].health.is_some());
    // And `web` can be made a worker.
    let spec = ok("app = \"a\"\n[processes.web]\ncommand = \"x\"\nkind = \"worker\"\n");
    assert_eq!(spec.processes[0].kind, ProcessKind::Worker);
    assert!(spec.processes[0].health.is_none());
}

#[test]
fn env_values_of_every_scalar_type_become_strings() {
    let spec = ok(r#"app = "a"
[env]
S = "text"
I = 42
H = 0x1F
U = 1_000
F = 1.0
E = 2.5e3
T = true
_lower_ok = "x"
[processes.web]
command = "w"
[processes.web.env]
S = "override"
EXTRA = false
"#);
    let get = |k: &str| spec.env.get(k).map(String::as_str);
    assert_eq!(get("S"), Some("text"));
    assert_eq!(get("I"), Some("42"));
    assert_eq!(get("H"), Some("31"));
    assert_eq!(get("U"), Some("1000"));
    assert_eq!(get("F"), Some("1.0"));
    assert_eq!(get("E"), Some("2500.0"));
    assert_eq!(get("T"), Some("true"));
    assert_eq!(get("_lower_ok"), Some("x"));
    let w = web(&spec);
    assert_eq!(w.env.get("S").map(String::as_str), Some("override"));
    assert_eq!(w.env.get("EXTRA").map(String::as_str), Some("false"));
    assert_eq!(w.env.len(), 2, "the process env holds only its own layer");
}

#[test]
fn inline_tables_and_dotted_keys_work() {
    let spec = ok(r#"app = "a"
[processes]
worker.command = "celery worker"
web = { command = "gunicorn x", count = 2, health = { path = "/up" } }
"#);
    assert_eq!(spec.processes.len(), 2);
    assert_eq!(web(&spec).count, 2);
    assert_eq!(web(&spec).health.as_ref().unwrap().path, "/up");
}

#[test]
fn every_duration_form_is_accepted() {
    for (written, expected) in [
        ("10", Duration::from_secs(10)),
        ("\"250ms\"", Duration::from_millis(250)),
        ("\"2s\"", Duration::from_secs(2)),
        ("\"1m\"", Duration::from_secs(60)),
        ("\"1h\"", Duration::from_secs(3600)),
        ("\"1m30s\"", Duration::from_secs(90)),
    ] {
        let spec = ok(&web_with(&format!("stop_timeout = {written}\n")));
        assert_eq!(web(&spec).stop_timeout, expected, "{written}");
    }
}

#[test]
fn zero_is_allowed_where_it_means_something() {
    let spec = ok(&web_with("drain_timeout = 0\n[processes.worker]\ncommand = \"x\"\nready_after = \"0s\"\n"));
    assert_eq!(web(&spec).drain_timeout, Duration::ZERO);
    assert_eq!(spec.processes[1].ready_after, Duration::ZERO);
    let e = one(&web_with("stop_timeout = 0\n"));
    assert_err(&e, 4, 16, "`stop_timeout` in [processes.web] must be longer than 0s", "stop_timeout = \"10s\"");
    let e = one(&web_with("[processes.web.health]\ninterval = \"0ms\"\n"));
    assert_err(&e, 5, 12, "`interval` in [processes.web.health] must be longer than 0s", "interval = \"1s\"");
}

#[test]
fn stop_signals_in_any_spelling() {
    for (written, sig) in [
        ("SIGTERM", Signal::Term),
        ("TERM", Signal::Term),
        ("term", Signal::Term),
        ("SIGINT", Signal::Int),
        ("usr1", Signal::Usr1),
        ("SIGKILL", Signal::Kill),
    ] {
        let spec = ok(&web_with(&format!("stop_signal = \"{written}\"\n")));
        assert_eq!(web(&spec).stop_signal, sig);
    }
    let e = one(&web_with("stop_signal = \"SIGFOO\"\n"));
    assert_err(
        &e,
        4,
        15,
        "unknown `stop_signal` \"SIGFOO\" in [processes.web]",
        "SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGKILL",
    );
}

// ------------------------------------------------------- several errors at once

/// Unknown key, bad duration and a missing command: three errors, each
/// where it is, and the full text a user sees.
#[test]
fn several_errors_are_reported_together_with_their_locations() {
    let src = r#"app = "blog"

[processes.web]
command = "gunicorn blog.wsgi"
stop_timout = "10s"
drain_timeout = "10 sec"

[processes.worker]
count = -1
"#;
    let e = errs(src);
    assert_eq!(e.len(), 4, "{}", SpecErrors { errors: e.clone() });
    let rendered = SpecErrors { errors: e }.to_string();
    let expected = r#"nonstop.toml:5:1: error: unknown key `stop_timout` in [processes.web]
  hint: did you mean `stop_timeout`? valid keys: command, kind, count, stop_signal, stop_timeout, drain_timeout, ready_after, env, health, rollout, restart, autoscale, queue

nonstop.toml:6:17: error: `drain_timeout` in [processes.web] is not a valid duration ("10 sec"): it contains a space
  hint: durations are a whole number of seconds (10) or a string with units: "250ms", "2s", "1m", "1h", "1m30s"

nonstop.toml:8:1: error: missing `command` in [processes.worker]
  hint: add the shell command that starts it, for example: command = "celery -A blog worker"

nonstop.toml:9:9: error: `count` in [processes.worker] must be at least 0, not -1
  hint: for example: count = 1"#;
    assert_eq!(rendered, expected);
}

#[test]
fn errors_come_out_in_file_order_whatever_found_them() {
    // `order` is checked after the processes but is earlier in the file.
    let src = r#"app = "a"
[release]
order = ["wbe"]
[processes.web]
command = ""
"#;
    let e = errs(src);
    assert_eq!(e.len(), 2);
    assert_err(
        &e[0],
        3,
        10,
        "`order` in [release] names \"wbe\", which is not a process",
        "did you mean `web`? processes: web",
    );
    assert_err(&e[1], 5, 11, "`command` in [processes.web] has an empty command", "write the shell command");
}

#[test]
fn json_form_of_the_errors() {
    let err = parse("app = 1\n[processes.web]\ncommand = \"x\"\n", Path::new("x/nonstop.toml"), &()).unwrap_err();
    assert_eq!(err.len(), 1);
    let json = serde_json::to_value(&err).unwrap();
    assert_eq!(json["errors"][0]["file"], "x/nonstop.toml");
    assert_eq!(json["errors"][0]["line"], 1);
    assert_eq!(json["errors"][0]["column"], 7);
    assert_eq!(json["errors"][0]["message"], "`app` must be a string, not an integer");
    assert_eq!(json["errors"][0]["hint"], "for example: app = \"blog\"");
}

// ------------------------------------------------------------- unknown keys

#[test]
fn unknown_keys_at_every_level_get_suggestions() {
    let cases: &[(&str, (usize, usize), &str, &str)] = &[
        ("apps = \"x\"\n", (4, 1), "unknown key `apps` at the top level", "did you mean `app`? valid keys: app, build, env, proxy, release, processes"),
        ("[proxy]\nlisen = \"127.0.0.1:1\"\n", (5, 1), "unknown key `lisen` in [proxy]", "did you mean `listen`? valid keys: listen"),
        ("[proxy]\nport = 80\n", (5, 1), "unknown key `port` in [proxy]", "did you mean `listen`?"),
        ("[proxy]\nworker = 2\n", (5, 1), "unknown key `worker` in [proxy]", "did you mean `workers`?"),
        ("[proxy]\nthreads = 2\n", (5, 1), "unknown key `threads` in [proxy]", "valid keys: listen"),
        ("[release]\ntask = []\n", (5, 1), "unknown key `task` in [release]", "did you mean `tasks`? valid keys: tasks, post_tasks, task_timeout, retain_releases, order"),
        ("replicas = 2\n", (4, 1), "unknown key `replicas` in [processes.web]", "did you mean `count`?"),
        ("[processes.web.healthcheck]\npath = \"/\"\n", (4, 16), "unknown key `healthcheck` in [processes.web]", "did you mean `health`?"),
        ("[processes.web.health]\npaht = \"/\"\n", (5, 1), "unknown key `paht` in [processes.web.health]", "did you mean `path`? valid keys: path, interval, timeout, healthy_threshold, unhealthy_threshold, expect_status, host"),
        ("[processes.web.rollout]\nmax_surge_pct = 1\n", (5, 1), "unknown key `max_surge_pct` in [processes.web.rollout]", "did you mean `max_surge`? valid keys: max_surge, max_unavailable, health_timeout"),
        ("[processes.web.restart]\nbackoff = \"1s\"\n", (5, 1), "unknown key `backoff` in [processes.web.restart]", "valid keys: backoff_initial, backoff_max, reset_after, crash_loop_after"),
        ("Command = \"x\"\n", (4, 1), "unknown key `Command` in [processes.web]", "did you mean `command`?"),
        ("zzz = 1\n", (4, 1), "unknown key `zzz` in [processes.web]", "valid keys: command, kind"),
    ];
    for (extra, (line, column), message, hint) in cases {
        let src = if extra.starts_with('[') && !extra.starts_with("[processes") {
            // Top-level tables go before [processes.web].
            format!("app = \"blog\"\n\n\n{extra}[processes.web]\ncommand = \"x\"\n")
        } else if extra.starts_with("apps") {
            format!("app = \"blog\"\n[processes.web]\ncommand = \"x\"\n{extra}")
        } else {
            web_with(extra)
        };
        let src = if extra.starts_with("apps") {
            // Keys after a table header belong to it: put this one first.
            format!("\n\n\n{extra}app = \"blog\"\n[processes.web]\ncommand = \"x\"\n")
        } else {
            src
        };
        let e = one(&src);
        assert_err(&e, *line, *column, message, hint);
        if !hint.contains("did you mean") {
            assert!(!e.hint.as_deref().unwrap().contains("did you mean"), "{e}");
        }
    }
}

#[test]
fn env_tables_accept_any_valid_name() {
    let spec = ok(&web_with("[processes.web.env]\nANYTHING_GOES = 1\ncomand = \"lowercase is fine\"\n"));
    assert_eq!(web(&spec).env.len(), 2);
}

// --------------------------------------------------------------- wrong types

#[test]
fn values_of_the_wrong_type() {
    let e = one(&web_with("count = \"2\"\n"));
    assert_err(&e, 4, 9, "`count` in [processes.web] must be an integer, not a string", "remove the quotes: count = 2");
    let e = one(&web_with("count = 1.5\n"));
    assert_err(&e, 4, 9, "must be an integer, not a float", "for example: count = 2");
    let e = one("app = \"a\"\n[processes.web]\ncommand = [\"gunicorn\", \"x\"]\n");
    assert_err(&e, 3, 11, "`command` in [processes.web] must be a string, not a list", "for example: command = ");
    let e = one(&format!("build = \"make\"\n{WEB}"));
    assert_err(&e, 1, 9, "`build` must be a list of strings, not a string", "put it in a list: build = [\"make\"]");
    let e = one(&format!("build = [\"make\", 2]\n{WEB}"));
    assert_err(&e, 1, 18, "`build` must contain only strings, not an integer", "quote each item");
    let e = one(&web_with("health = \"/up\"\n"));
    assert_err(
        &e,
        4,
        10,
        "`health` in [processes.web] must be a table, not a string",
        "write it as a table:\n[processes.web.health]\npath = \"/health/\"",
    );
    let e = one("app = \"a\"\n[processes]\nweb = \"gunicorn x\"\n");
    assert_err(
        &e,
        3,
        7,
        "`web` in [processes] must be a table, not a string",
        "[processes.web]\ncommand = \"gunicorn x\"",
    );
    let e = one("app = \"a\"\n[[processes]]\ncommand = \"x\"\n");
    assert_err(&e, 2, 1, "`processes` must be a table, not a list", "[processes.web]\ncommand = ");
    let e = one(&format!("env = \"X=1\"\n{WEB}"));
    assert_err(&e, 1, 7, "`env` must be a table, not a string", "[env]\nDJANGO_SETTINGS_MODULE");
    let e = one(&top("[env]\nWHEN = 1979-05-27\n"));
    assert_err(&e, 3, 8, "`WHEN` in [env] must be a string, a number or a boolean, not a date-time", "quote it");
    let e = errs(&top("[env]\nWHEN = 1979-05-27\nLIST = []\n"));
    assert_eq!(e.len(), 2);
    assert_err(&e[1], 4, 8, "`LIST` in [env] must be a string, a number or a boolean, not a list", "LIST = \"value\"");
    let e = one(&web_with("stop_timeout = 1.5\n"));
    assert_err(&e, 4, 16, "`stop_timeout` in [processes.web] must be a duration, not a float", "\"1500ms\" for 1.5");
    let e = one(&web_with("stop_timeout = true\n"));
    assert_err(&e, 4, 16, "must be a duration, not a boolean", "durations are a whole number of seconds");
    let e = one(&web_with("count = 99999999999999999999\n"));
    assert_err(&e, 4, 9, "`count` in [processes.web] is too large", "");
    let e = one(&web_with("count = 0x7fffffffffffffff\n"));
    assert_err(&e, 4, 9, "`count` in [processes.web] is too large (at most 4294967295)", "");
}

// ------------------------------------------------------------------- durations

#[test]
fn bad_durations_say_which_forms_are_accepted() {
    let cases = [
        ("\"10 sec\"", "is not a valid duration (\"10 sec\"): it contains a space", "durations are a whole number of seconds (10) or a string with units: \"250ms\", \"2s\", \"1m\", \"1h\", \"1m30s\""),
        ("\"10sec\"", "the unit is not one of ms, s, m, h", "\"1m30s\""),
        ("\"10\"", "the unit is missing", "add a unit (\"10s\") or drop the quotes to mean seconds (10)"),
        ("\"1.5s\"", "fractions are not accepted", "durations are"),
        ("\"30s1m\"", "largest first", "durations are"),
        ("\"\"", "it is empty", "durations are"),
        ("-5", "`stop_timeout` in [processes.web] must not be negative", "for example: stop_timeout = \"10s\""),
    ];
    for (written, message, hint) in cases {
        let e = one(&web_with(&format!("stop_timeout = {written}\n")));
        assert_err(&e, 4, 16, message, hint);
    }
}

#[test]
fn every_duration_field_is_checked() {
    let fields = [
        ("[release]\ntask_timeout", "`task_timeout` in [release]"),
        ("[processes.web]\ncommand = \"x\"\nstop_timeout", "`stop_timeout` in [processes.web]"),
        ("[processes.web]\ncommand = \"x\"\ndrain_timeout", "`drain_timeout` in [processes.web]"),
        ("[processes.w]\ncommand = \"x\"\nready_after", "`ready_after` in [processes.w]"),
        ("[processes.web.health]\ninterval", "`interval` in [processes.web.health]"),
        ("[processes.web.health]\ntimeout", "`timeout` in [processes.web.health]"),
        ("[processes.web.rollout]\nhealth_timeout", "`health_timeout` in [processes.web.rollout]"),
        ("[processes.web.restart]\nbackoff_initial", "`backoff_initial` in [processes.web.restart]"),
        ("[processes.web.restart]\nbackoff_max", "`backoff_max` in [processes.web.restart]"),
        ("[processes.web.restart]\nreset_after", "`reset_after` in [processes.web.restart]"),
    ];
    for (key, what) in fields {
        let mut src = format!("app = \"a\"\n{key} = \"soon\"\n");
        if !key.starts_with("[processes.web]") {
            src.push_str("[processes.web.env]\n");
        }
        if !src.contains("command") || !key.starts_with("[processes.web") {
            // Give `web` its command (dotted, valid in any order).
            src = src.replacen("app = \"a\"\n", "app = \"a\"\nprocesses.web.command = \"x\"\n", 1);
        }
        let e = errs(&src);
        assert_eq!(e.len(), 1, "{src}\n{}", SpecErrors { errors: e.clone() });
        assert!(e[0].message.starts_with(&format!("{what} is not a valid duration")), "{key}: {}", e[0]);
    }
}

// ---------------------------------------------------------------- app, names

#[test]
fn app_is_required_and_checked() {
    let e = one("[processes.web]\ncommand = \"x\"\n");
    assert_err(&e, 1, 1, "missing `app`", "app = \"blog\"");
    for (bad, suggestion) in [("My App", "my-app"), ("my_app", "my-app"), ("1blog", "app-1blog"), ("", "app")] {
        let e = one(&format!("app = \"{bad}\"\n[processes.web]\ncommand = \"x\"\n"));
        assert_err(&e, 1, 7, &format!("invalid app name {bad:?}"), &format!("for example: app = \"{suggestion}\""));
    }
    ok("app = \"my-app-2\"\n[processes.web]\ncommand = \"x\"\n");
}

#[test]
fn process_names_follow_the_core_rules() {
    let e = one("app = \"a\"\n[processes.Web]\ncommand = \"x\"\n");
    assert_err(&e, 2, 12, "invalid process name Web: use 1 to 63 characters", "for example: [processes.web]");
    let e = one("app = \"a\"\n[processes.\"my web\"]\ncommand = \"x\"\n");
    assert_err(&e, 2, 12, "invalid process name \"my web\"", "[processes.my-web]");
    ok("app = \"a\"\n[processes.celery_beat]\ncommand = \"x\"\n");
}

#[test]
fn at_least_one_process_is_required() {
    let e = one("app = \"a\"\n");
    assert_err(&e, 1, 1, "no processes", "[processes.web]\ncommand = ");
    let e = one("app = \"a\"\n\n[processes]\n");
    assert_err(&e, 3, 1, "no processes", "add one, for example");
}

#[test]
fn a_misspelt_required_key_is_reported_once() {
    let e = one("app = \"a\"\n[processes.web]\ncomand = \"x\"\n");
    assert_err(&e, 3, 1, "unknown key `comand` in [processes.web]", "did you mean `command`?");
    let e = one("ap = \"a\"\n[processes.web]\ncommand = \"x\"\n");
    assert_err(&e, 1, 1, "unknown key `ap` at the top level", "did you mean `app`?");
    // `app` written after a table header.
    let e = one("[processes.web]\ncommand = \"x\"\napp = \"a\"\n");
    assert_err(&e, 3, 1, "unknown key `app` in [processes.web]", "`app` is a top-level key: a key after a [table] header belongs to that table, so move this line above the first [table]");
}

#[test]
fn command_is_required_and_not_empty() {
    let e = one("app = \"a\"\n[processes.worker]\ncount = 1\n");
    assert_err(&e, 2, 1, "missing `command` in [processes.worker]", "command = \"celery -A blog worker\"");
    let e = one("app = \"a\"\n[processes.web]\ncommand = \"   \"\n");
    assert_err(&e, 3, 11, "`command` in [processes.web] has an empty command", "");
    let e = one(&format!("build = [\"make\", \"\"]\n{WEB}"));
    assert_err(&e, 1, 18, "`build` has an empty command", "");
    let e = one(&top("[release]\ntasks = [\"\"]\n"));
    assert_err(&e, 3, 10, "`tasks` in [release] has an empty command", "");
    let e = one(&top("[release]\npost_tasks = [\"a\\u0000b\"]\n"));
    assert_err(&e, 3, 15, "`post_tasks` in [release] has a command with a NUL character", "");
}

#[test]
fn unknown_kinds_get_suggestions() {
    let e = one("app = \"a\"\n[processes.w]\ncommand = \"x\"\nkind = \"wroker\"\n");
    assert_err(&e, 4, 8, "unknown kind \"wroker\" in [processes.w]", "did you mean `worker`? kinds are: web");
    // Kind-specific rules are not applied to an unknown kind.
    let e = one("app = \"a\"\n[processes.w]\ncommand = \"x\"\nkind = \"cron\"\ndrain_timeout = 1\n");
    assert!(!e.hint.unwrap().contains("did you mean"));
}

#[test]
fn only_one_web_process() {
    let e = one("app = \"a\"\n[processes.web]\ncommand = \"x\"\n[processes.api]\ncommand = \"y\"\nkind = \"web\"\n");
    assert_err(
        &e,
        4,
        12,
        "only one process can be of kind web, and [processes.web] already is",
        "set kind = \"worker\" in [processes.api]",
    );
}

// ------------------------------------------------------------------ per kind

#[test]
fn singletons_run_at_most_once() {
    let base = "app = \"a\"\n[processes.beat]\ncommand = \"celery beat\"\nkind = \"singleton\"\n";
    for n in [0, 1] {
        assert_eq!(ok(&format!("{base}count = {n}\n")).processes[0].count, n);
    }
    let e = one(&format!("{base}count = 2\n"));
    assert_err(
        &e,
        5,
        9,
        "`count` in [processes.beat] is 2, but a singleton runs 0 or 1 instances",
        "set count = 1 (or 0 to stop it); if several instances are fine, set kind = \"worker\"",
    );
    let e = one(&format!("{base}[processes.beat.rollout]\nmax_surge = 1\n"));
    assert_err(
        &e,
        6,
        13,
        "`max_surge` in [processes.beat.rollout] must be 0: a singleton never runs two instances",
        "remove max_surge",
    );
    let e = one(&format!("{base}[processes.beat.rollout]\nmax_unavailable = 0\n"));
    assert_err(
        &e,
        6,
        19,
        "both resolve to 0 with count = 1",
        "a singleton is stopped before it is replaced: set max_unavailable = 1",
    );
    let spec = ok(&format!("{base}[processes.beat.rollout]\nmax_surge = 0\nmax_unavailable = \"100%\"\n"));
    assert_eq!(spec.processes[0].rollout.max_unavailable, Quantity::Percent(100));
}

#[test]
fn web_only_and_worker_only_settings() {
    let worker = "app = \"a\"\n[processes.worker]\ncommand = \"celery worker\"\n";
    let e = one(&format!("{worker}[processes.worker.health]\npath = \"/\"\n"));
    assert_err(
        &e,
        4,
        1,
        "[processes.worker.health] applies only to web processes",
        "a worker has no port to check: remove the table, or set ready_after in [processes.worker]",
    );
    let e = one(&format!("{worker}drain_timeout = \"5s\"\n"));
    assert_err(
        &e,
        4,
        17,
        "`drain_timeout` in [processes.worker] applies only to web processes",
        "or set kind = \"web\"",
    );
    let singleton = "app = \"a\"\n[processes.beat]\ncommand = \"celery beat\"\nkind = \"singleton\"\n";
    let e = one(&format!("{singleton}health = {{ path = \"/\" }}\n"));
    assert_err(&e, 5, 10, "[processes.beat.health] applies only to web processes", "");
    let e = one(&web_with("ready_after = \"1s\"\n"));
    assert_err(
        &e,
        4,
        15,
        "`ready_after` in [processes.web] applies only to workers and singletons",
        "configure [processes.web.health] instead",
    );
}

// -------------------------------------------------------------- environment

#[test]
fn reserved_and_invalid_env_names() {
    let e = errs(&top("[env]\nPORT = 8000\nNONSTOP_TOKEN = \"x\"\nFOO-BAR = 1\n1ST = 2\nOK_1 = 3\n"));
    assert_eq!(e.len(), 4, "{}", SpecErrors { errors: e.clone() });
    assert_err(
        &e[0],
        3,
        1,
        "`PORT` in [env] is reserved: nonstop gives each web instance its own port in $PORT",
        "bind your server to $PORT",
    );
    assert_err(
        &e[1],
        4,
        1,
        "`NONSTOP_TOKEN` in [env] is reserved: names starting with NONSTOP_ are set by nonstop",
        "rename it",
    );
    assert_err(
        &e[2],
        5,
        1,
        "invalid environment variable name FOO-BAR in [env]",
        "names are letters, digits and '_', and do not start with a digit: FOO_BAR",
    );
    assert_err(&e[3], 6, 1, "invalid environment variable name 1ST in [env]", ": _1ST");
    // The same rules in a process's env.
    let e = one(&web_with("[processes.web.env]\nPORT = \"8000\"\n"));
    assert_err(&e, 5, 1, "`PORT` in [processes.web.env] is reserved", "");
    let e = one(&web_with("[processes.web.env]\nNONSTOP_X = \"1\"\n"));
    assert_err(&e, 5, 1, "`NONSTOP_X` in [processes.web.env] is reserved", "");
    let e = one(&web_with("[processes.web.env]\n\"A B\" = \"1\"\n"));
    assert_err(&e, 5, 1, "invalid environment variable name \"A B\" in [processes.web.env]", "A_B");
    let e = one(&web_with("[processes.web.env]\nA = \"x\\u0000\"\n"));
    assert_err(&e, 5, 5, "contains a NUL character", "");
}

// -------------------------------------------------------------------- proxy

#[test]
fn proxy_listen_from_the_file_and_the_environment() {
    let with_listen = top("[proxy]\nlisten = \"0.0.0.0:80\"\n");
    assert_eq!(ok(&with_listen).proxy.listen, "0.0.0.0:80".parse::<SocketAddr>().unwrap());
    let ipv6 = top("[proxy]\nlisten = \"[::1]:8080\"\n");
    assert_eq!(ok(&ipv6).proxy.listen, "[::1]:8080".parse::<SocketAddr>().unwrap());

    let env: BTreeMap<String, String> = [(PROXY_LISTEN_ENV.to_string(), "127.0.0.1:9999".to_string())].into();
    let spec = parse(&with_listen, Path::new(FILE), &env).unwrap();
    assert_eq!(spec.proxy.listen, "127.0.0.1:9999".parse::<SocketAddr>().unwrap(), "the environment wins");
    let spec = parse(WEB, Path::new(FILE), &env).unwrap();
    assert_eq!(spec.proxy.listen.port(), 9999);
}

#[test]
fn a_bad_listen_override_names_the_variable() {
    let e = errs_with(WEB, &[(PROXY_LISTEN_ENV, "localhost:80")]);
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].line, e[0].column), (0, 0));
    assert_eq!(
        e[0].to_string(),
        "nonstop.toml: error: environment variable NONSTOP_PROXY_LISTEN is not a valid listen address (\"localhost:80\"): a host name is not an address to listen on\n  hint: use an IP address: 127.0.0.1:80; or unset NONSTOP_PROXY_LISTEN to use [proxy] listen from this file"
    );
    let e = errs_with(WEB, &[(PROXY_LISTEN_ENV, "")]);
    assert_err(
        &e[0],
        0,
        0,
        "NONSTOP_PROXY_LISTEN is not a valid listen address (\"\"): it is empty",
        "unset NONSTOP_PROXY_LISTEN",
    );
    // Reported along with the file's own errors, and with syntax errors.
    let e = errs_with("app = \"a\"\n", &[(PROXY_LISTEN_ENV, "nope")]);
    assert_eq!(e.len(), 2);
    assert!(e[0].message.contains(PROXY_LISTEN_ENV));
    let e = errs_with("app = \n", &[(PROXY_LISTEN_ENV, "nope")]);
    assert_eq!(e.len(), 2);
    assert!(e[0].message.contains(PROXY_LISTEN_ENV));
    assert!(e[1].message.starts_with("invalid TOML"));
}

#[test]
fn bad_listen_addresses_in_the_file() {
    let cases = [
        ("localhost:8080", "a host name is not an address to listen on", "use an IP address: 127.0.0.1:8080"),
        ("example.com:80", "a host name", "0.0.0.0:80"),
        (
            "8080",
            "the IP address is missing",
            "write 127.0.0.1:8080 (this machine only) or 0.0.0.0:8080 (every interface)",
        ),
        (":8080", "the IP address is missing", "127.0.0.1:8080"),
        ("0.0.0.0:0", "port 0 would pick a random port", "choose a port, such as 0.0.0.0:8080"),
        ("127.0.0.1", "it is not IP:PORT", "such as 127.0.0.1:8080"),
        ("127.0.0.1:99999", "it is not IP:PORT", ""),
    ];
    for (listen, message, hint) in cases {
        let e = one(&top(&format!("[proxy]\nlisten = \"{listen}\"\n")));
        assert_err(&e, 3, 10, &format!("`listen` in [proxy] is not a valid address ({listen:?}): {message}"), hint);
    }
}

#[test]
fn proxy_settings_from_the_full_file() {
    let spec = ok(FULL);
    let p = &spec.proxy;
    assert_eq!(p.https_listen, Some("0.0.0.0:9443".parse().unwrap()));
    assert_eq!(p.redirect_http, Some(false));
    assert!(!p.redirects_http());
    assert_eq!(p.max_header_bytes, Some(32 * 1024));
    assert_eq!(p.max_headers, Some(50));
    assert_eq!(p.max_request_line, Some(4096));
    assert_eq!(p.max_body_bytes, Some(10 << 20));
    assert_eq!(p.header_timeout, Some(Duration::from_secs(5)));
    assert_eq!(p.idle_timeout, Some(Duration::from_secs(120)));
    assert_eq!(p.upstream_timeout, Some(Duration::from_secs(30)));
    assert_eq!(p.body_timeout, Some(Duration::from_secs(20)));
    assert_eq!(p.workers, Some(4));
    assert_eq!(p.trusted_proxies, vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]);
    assert_eq!(p.max_connections, Some(5000));
    assert_eq!(p.max_connections_per_client, Some(0), "0: no limit");
    assert_eq!(p.tls.len(), 2);
    assert_eq!(p.tls[0].hosts, ["blog.example.com", "*.blog.example.com"]);
    // Relative to the file's directory (here: as given, relative).
    assert_eq!(p.tls[0].cert, Path::new("certs/blog.pem"));
    assert_eq!(p.tls[0].key, Path::new("/etc/ssl/blog.key"));

    let spec = parse(FULL, Path::new("/srv/blog/nonstop.toml"), &()).unwrap();
    assert_eq!(spec.proxy.tls[0].cert, Path::new("/srv/blog/certs/blog.pem"));
    assert_eq!(spec.proxy.tls[0].key, Path::new("/etc/ssl/blog.key"));
    assert_eq!(spec.proxy.tls[1].key, Path::new("/srv/blog/other.key"));
}

#[test]
fn proxy_settings_left_out_stay_unset() {
    let p = ok(WEB).proxy;
    assert_eq!(p, nonstop_core::process::ProxySpec::new(DEFAULT_PROXY_LISTEN.parse().unwrap()));
    assert_eq!(p.workers, None, "left out: one worker thread per core");
    assert_eq!(p.max_connections, None, "left out: derived from the file descriptor limit");
    assert_eq!(p.max_connections_per_client, None, "left out: the proxy's default");
    // Sizes as integers and nginx units; 0: no body limit; redirects on
    // by default with certificates.
    let p = ok(&top(
        "[proxy]\nmax_header_bytes = 16384\nmax_body_bytes = 0\nmax_request_line = \"2k\"\nhttps_listen = \"127.0.0.1:8443\"\n[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
    ))
    .proxy;
    assert_eq!(p.max_header_bytes, Some(16384));
    assert_eq!(p.max_body_bytes, Some(0));
    assert_eq!(p.max_request_line, Some(2048));
    assert!(p.redirects_http());
}

#[test]
fn proxy_connection_limits_within_bounds_are_kept() {
    for n in [1, 384, MAX_PROXY_MAX_CONNECTIONS] {
        let p = ok(&top(&format!("[proxy]\nmax_connections = {n}\nmax_connections_per_client = {n}\n"))).proxy;
        assert_eq!(p.max_connections, Some(n));
        assert_eq!(p.max_connections_per_client.map(u64::from), Some(n));
    }
    let p = ok(&top("[proxy]\nmax_connections_per_client = 0\n")).proxy;
    assert_eq!(p.max_connections_per_client, Some(0));
    assert_eq!(DEFAULT_PROXY_MAX_CONNECTIONS_PER_CLIENT, 256);
}

#[test]
fn proxy_workers_within_bounds_are_kept() {
    for n in [MIN_PROXY_WORKERS, 2, MAX_PROXY_WORKERS] {
        let p = ok(&top(&format!("[proxy]\nworkers = {n}\n"))).proxy;
        assert_eq!(p.workers, Some(n));
    }
}

#[test]
fn load_makes_certificate_paths_absolute() {
    let dir = std::env::temp_dir().join(format!("nonstop-spec-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nonstop.toml");
    std::fs::write(
        &file,
        top("[proxy]\nhttps_listen = \"127.0.0.1:8443\"\n[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"certs/a.pem\"\nkey = \"../a.key\"\n"),
    )
    .unwrap();
    let spec = load(&file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(spec.proxy.tls[0].cert, dir.join("certs/a.pem"));
    assert_eq!(spec.proxy.tls[0].key, dir.join("../a.key"));
    assert!(spec.proxy.tls[0].cert.is_absolute());
}

#[test]
fn bad_proxy_settings_are_located() {
    let tls = "[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
    let cases: Vec<(String, (usize, usize), &str, &str)> = vec![
        (
            "[proxy]\nmax_header_bytes = \"1KiB\"\n".into(),
            (3, 20),
            "`max_header_bytes` in [proxy] must be at least 8KiB, not 1KiB",
            "for example: max_header_bytes = \"64KiB\"",
        ),
        (
            "[proxy]\nmax_header_bytes = \"64\"\n".into(),
            (3, 20),
            "`max_header_bytes` in [proxy] is not a valid size (\"64\"): the unit is missing",
            "add a unit (\"64KiB\") or drop the quotes to mean bytes (64)",
        ),
        (
            "[proxy]\nmax_body_bytes = \"1.5GiB\"\n".into(),
            (3, 18),
            "is not a valid size (\"1.5GiB\"): fractions are not allowed",
            "sizes are a whole number of bytes",
        ),
        (
            "[proxy]\nmax_body_bytes = -1\n".into(),
            (3, 18),
            "`max_body_bytes` in [proxy] must not be negative",
            "for example: max_body_bytes = \"100MiB\"",
        ),
        (
            "[proxy]\nmax_body_bytes = true\n".into(),
            (3, 18),
            "`max_body_bytes` in [proxy] must be a size: bytes (65536) or a string with a unit (\"64KiB\"), not a boolean",
            "for example: max_body_bytes = \"100MiB\"",
        ),
        (
            "[proxy]\nmax_headers = 0\n".into(),
            (3, 15),
            "`max_headers` in [proxy] must be at least 1, not 0",
            "for example: max_headers = 100",
        ),
        (
            "[proxy]\nmax_headers = 100000\n".into(),
            (3, 15),
            "`max_headers` in [proxy] is too large (at most 10000)",
            "",
        ),
        (
            "[proxy]\nworkers = 0\n".into(),
            (3, 11),
            "`workers` in [proxy] must be between 1 and 1024, not 0",
            "leave it out for one thread per core (the default), or set a count, for example: workers = 2",
        ),
        (
            "[proxy]\nworkers = -1\n".into(),
            (3, 11),
            "`workers` in [proxy] must be between 1 and 1024, not -1",
            "leave it out for one thread per core (the default)",
        ),
        (
            "[proxy]\nworkers = 5000\n".into(),
            (3, 11),
            "`workers` in [proxy] must be between 1 and 1024, not 5000",
            "leave it out for one thread per core (the default)",
        ),
        (
            "[proxy]\nworkers = \"auto\"\n".into(),
            (3, 11),
            "`workers` in [proxy] must be an integer, not a string",
            "for example: workers = 2 (or leave it out for one per core)",
        ),
        (
            "[proxy]\nworkers = \"4\"\n".into(),
            (3, 11),
            "`workers` in [proxy] must be an integer, not a string",
            "remove the quotes: workers = 4",
        ),
        (
            "[proxy]\nworkers = 2.5\n".into(),
            (3, 11),
            "`workers` in [proxy] must be an integer, not a float",
            "for example: workers = 2",
        ),
        (
            "[proxy]\nmax_request_line = \"128KiB\"\n".into(),
            (3, 20),
            "`max_request_line` in [proxy] (128KiB) is larger than `max_header_bytes` (64KiB)",
            "raise max_header_bytes to at least \"128KiB\"",
        ),
        (
            "[proxy]\nmax_connections = 0\n".into(),
            (3, 19),
            "`max_connections` in [proxy] must be between 1 and 10000000, not 0",
            "leave it out to derive it from the daemon's file descriptor limit (the default), or set a count, for example: max_connections = 10000",
        ),
        (
            "[proxy]\nmax_connections = 20000000\n".into(),
            (3, 19),
            "`max_connections` in [proxy] must be between 1 and 10000000, not 20000000",
            "leave it out to derive it from the daemon's file descriptor limit",
        ),
        (
            "[proxy]\nmax_connections = \"10000\"\n".into(),
            (3, 19),
            "`max_connections` in [proxy] must be an integer, not a string",
            "remove the quotes: max_connections = 10000",
        ),
        (
            "[proxy]\nmax_connections = \"auto\"\n".into(),
            (3, 19),
            "`max_connections` in [proxy] must be an integer, not a string",
            "for example: max_connections = 10000 (or leave it out to derive it from the file descriptor limit)",
        ),
        (
            "[proxy]\nmax_connections_per_client = -1\n".into(),
            (3, 30),
            "`max_connections_per_client` in [proxy] must be between 0 (no limit) and 10000000, not -1",
            "for example: max_connections_per_client = 256 (the default), or 0 for no limit",
        ),
        (
            "[proxy]\nmax_connections_per_client = 1.5\n".into(),
            (3, 30),
            "`max_connections_per_client` in [proxy] must be an integer, not a float",
            "for example: max_connections_per_client = 256 (0: no limit)",
        ),
        (
            "[proxy]\nbody_timeout = \"0s\"\n".into(),
            (3, 16),
            "`body_timeout` in [proxy] must be longer than 0s",
            "for example: body_timeout = \"30s\"",
        ),
        (
            "[proxy]\nheader_timeout = \"10\"\n".into(),
            (3, 18),
            "`header_timeout` in [proxy] is not a valid duration",
            "add a unit (\"10s\")",
        ),
        (
            "[proxy]\nredirect_http = \"true\"\n".into(),
            (3, 17),
            "`redirect_http` in [proxy] must be a boolean, not a string",
            "remove the quotes: redirect_http = true",
        ),
        (
            "[proxy]\nredirect_http = true\n".into(),
            (3, 17),
            "`redirect_http` in [proxy] redirects to HTTPS, which needs [[proxy.tls]] certificates",
            "[[proxy.tls]]",
        ),
        (
            format!("[proxy]\nhttps_listen = \"localhost:443\"\n{tls}"),
            (3, 16),
            "`https_listen` in [proxy] is not a valid address (\"localhost:443\"): a host name",
            "use an IP address: 127.0.0.1:443",
        ),
        (
            format!("[proxy]\nlisten = \"127.0.0.1:8080\"\nhttps_listen = \"127.0.0.1:8080\"\n{tls}"),
            (4, 16),
            "`https_listen` in [proxy] is the same address as `listen` (127.0.0.1:8080)",
            "https_listen = \"127.0.0.1:443\"",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n".into(),
            (3, 16),
            "`https_listen` in [proxy] needs certificates: there is no [[proxy.tls]]",
            "hosts = [\"example.com\", \"*.example.com\"]",
        ),
        (
            tls.to_string(),
            (2, 1),
            "[[proxy.tls]] certificates need an HTTPS address: `https_listen` in [proxy] is missing",
            "https_listen = \"0.0.0.0:443\"",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[proxy.tls]\nhosts = [\"a.test\"]\ncert = \"c\"\nkey = \"k\"\n".into(),
            (4, 1),
            "`tls` in [proxy] must be a list of tables: write [[proxy.tls]] (two brackets)",
            "[[proxy.tls]]",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"c.pem\"\n".into(),
            (4, 1),
            "missing `key` in [[proxy.tls]]",
            "every certificate needs hosts, cert and key",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\nchain = \"x\"\n".into(),
            (8, 1),
            "unknown key `chain` in [proxy.tls]",
            "valid keys: hosts, cert, key",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"a.test:443\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n".into(),
            (5, 10),
            "invalid host \"a.test:443\" in [[proxy.tls]]",
            "leave out the port: \"a.test\"",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"https://a.test/\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n".into(),
            (5, 10),
            "invalid host \"https://a.test/\" in [[proxy.tls]]",
            "write the host name alone: \"a.test\"",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"a.*.test\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n".into(),
            (5, 10),
            "invalid host \"a.*.test\" in [[proxy.tls]]",
            "a wildcard is `*.` before the rest of the name",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = []\ncert = \"c.pem\"\nkey = \"k.pem\"\n".into(),
            (5, 9),
            "`hosts` in [[proxy.tls]] is empty",
            "name the hosts",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[[proxy.tls]]\nhosts = [\"A.test\"]\ncert = \"d.pem\"\nkey = \"e.pem\"\n".into(),
            (9, 10),
            "host \"a.test\" has two certificates in [[proxy.tls]] (number 1 and number 2)",
            "a host is served one certificate",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"both.pem\"\nkey = \"both.pem\"\n".into(),
            (7, 7),
            "`key` in [[proxy.tls]] is the same file as `cert`",
            "point key at the private key file",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\n[[proxy.tls]]\nhosts = [\"a.test\"]\ncert = \"\"\nkey = \"k.pem\"\n".into(),
            (6, 8),
            "`cert` in [[proxy.tls]] is empty",
            "relative to nonstop.toml or absolute",
        ),
        (
            "[proxy]\nhttps_listen = \"0.0.0.0:443\"\ntls = \"c.pem\"\n".into(),
            (4, 7),
            "`tls` in [proxy] must be a list of tables, not a string",
            "write one table per certificate",
        ),
    ];
    for (tables, (line, column), message, hint) in cases {
        let e = one(&top(&tables));
        assert_err(&e, line, column, message, hint);
    }
}

// ------------------------------------------------------------------ release

#[test]
fn release_settings_are_checked() {
    let e = one(&top("[release]\nretain_releases = 0\n"));
    assert_err(
        &e,
        3,
        19,
        "`retain_releases` in [release] must be at least 1, not 0",
        "for example: retain_releases = 5",
    );
    let e = one(&top("[release]\ntask_timeout = \"0s\"\n"));
    assert_err(&e, 3, 16, "`task_timeout` in [release] must be longer than 0s", "task_timeout = \"10m\"");
    let spec = ok(&top("[release]\nretain_releases = 1\ntask_timeout = 30\n"));
    assert_eq!(spec.release.retain_releases, 1);
    assert_eq!(spec.release.task_timeout, Duration::from_secs(30));
}

#[test]
fn release_order_names_defined_processes_once() {
    let procs = "[processes.web]\ncommand = \"w\"\n[processes.worker]\ncommand = \"c\"\n";
    let spec = ok(&format!("app = \"a\"\n[release]\norder = [\"worker\"]\n{procs}"));
    assert_eq!(spec.release.order, [ProcessName::new("worker").unwrap()]);
    let e = errs(&format!("app = \"a\"\n[release]\norder = [\"web\", \"wrker\", \"web\", \"db\"]\n{procs}"));
    assert_eq!(e.len(), 3, "{}", SpecErrors { errors: e.clone() });
    assert_err(
        &e[0],
        3,
        17,
        "names \"wrker\", which is not a process",
        "did you mean `worker`? processes: web, worker",
    );
    assert_err(&e[1], 3, 26, "`order` in [release] names `web` twice", "remove the second one");
    assert_err(&e[2], 3, 33, "names \"db\", which is not a process", "processes: web, worker");
    assert!(!e[2].hint.as_deref().unwrap().contains("did you mean"));
    // A process that is itself invalid is not reported a second time.
    let e = one("app = \"a\"\n[release]\norder = [\"w\"]\n[processes.w]\ncommand = \"x\"\nkind = \"nope\"\n");
    assert!(e.message.starts_with("unknown kind"));
}

// ------------------------------------------------------------------- health

#[test]
fn health_check_rules() {
    let h = |lines: &str| web_with(&format!("[processes.web.health]\n{lines}"));
    let e = one(&h("path = \"health\"\n"));
    assert_err(
        &e,
        5,
        8,
        "`path` in [processes.web.health] must be a URL path starting with '/'",
        "for example: path = \"/health\"",
    );
    let e = one(&h("path = \"/a b\"\n"));
    assert_err(&e, 5, 8, "without spaces", "path = \"/ab\"");
    assert_eq!(web(&ok(&h("path = \"/up?full=1\"\n"))).health.as_ref().unwrap().path, "/up?full=1");
    let e = one(&h("healthy_threshold = 0\n"));
    assert_err(
        &e,
        5,
        21,
        "`healthy_threshold` in [processes.web.health] must be at least 1, not 0",
        "healthy_threshold = 2",
    );
    let e = one(&h("unhealthy_threshold = 0\n"));
    assert_err(&e, 5, 23, "must be at least 1", "unhealthy_threshold = 3");
    // A timeout longer than the interval is fine: probes do not overlap.
    let spec = ok(&h("interval = \"1s\"\ntimeout = \"5s\"\n"));
    assert_eq!(web(&spec).health.as_ref().unwrap().timeout, Duration::from_secs(5));
}

#[test]
fn trusted_proxies_are_addresses_or_ranges() {
    let proxy = |lines: &str| format!("app = \"a\"\n[proxy]\n{lines}\n[processes.web]\ncommand = \"x\"\n");
    let spec = ok(&proxy("trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\", \"fd00::/8\", \"192.168.1.7/24\"]"));
    let nets: Vec<String> = spec.proxy.trusted_proxies.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8", "192.168.1.0/24"]);
    assert!(ok(&proxy("")).proxy.trusted_proxies.is_empty(), "default: the proxy is the edge");
    let e = one(&proxy("trusted_proxies = [\"10.0.0.0/8\", \"lb.internal\"]"));
    assert_err(
        &e,
        3,
        34,
        "\"lb.internal\" in `trusted_proxies` of [proxy] is not an IP address or a CIDR range",
        "for example: trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]",
    );
    let e = one(&proxy("trusted_proxies = [\"10.0.0.0/33\"]"));
    assert!(e.message.contains("is not an IP address or a CIDR range"), "{}", e.message);
    let e = one(&proxy("trusted_proxies = \"10.0.0.0/8\""));
    assert!(e.message.contains("must be a list") || e.message.contains("array"), "{}", e.message);
}

#[test]
fn the_health_check_host() {
    let host = |written: &str| {
        let spec = ok(&web_with(&format!("[processes.web.health]\nhost = {written}\n")));
        web(&spec).health.as_ref().unwrap().host.clone()
    };
    assert_eq!(web(&ok(&web_with(""))).health.as_ref().unwrap().host, None, "default: the instance's address");
    for good in ["notes.example.com", "localhost", "127.0.0.1:8000", "[::1]", "[::1]:8000", "a-b.c"] {
        assert_eq!(host(&format!("\"{good}\"")).as_deref(), Some(good));
    }
    let bad = |written: &str| one(&web_with(&format!("[processes.web.health]\nhost = {written}\n")));
    for wrong in [
        "\"\"",
        "\"http://notes.example.com\"",
        "\"notes.example.com/\"",
        "\"a b\"",
        "\"x:99999\"",
        "\"-a.com\"",
        "\"[nope]\"",
        "\"a..b\"",
    ] {
        assert_err(
            &bad(wrong),
            5,
            8,
            "`host` in [processes.web.health] must be a host name or address, optionally with a port",
            "for example: host = \"notes.example.com\"",
        );
    }
    assert_err(&bad("8000"), 5, 8, "must be a string", "host = \"notes.example.com\"");
}

#[test]
fn expect_status_forms() {
    let status = |written: &str| {
        let spec = ok(&web_with(&format!("[processes.web.health]\nexpect_status = {written}\n")));
        web(&spec).health.as_ref().unwrap().expect_status
    };
    assert_eq!(status("200"), StatusRange { min: 200, max: 200 });
    assert_eq!(status("\"204\""), StatusRange { min: 204, max: 204 });
    assert_eq!(status("\"200-399\""), StatusRange { min: 200, max: 399 });
    assert_eq!(status("\"200 - 299\""), StatusRange { min: 200, max: 299 });
    let bad = |written: &str| one(&web_with(&format!("[processes.web.health]\nexpect_status = {written}\n")));
    assert_err(&bad("\"399-200\""), 5, 17, "is an empty range: 399 is greater than 200", "\"200-399\"");
    assert_err(&bad("600"), 5, 17, "must be HTTP statuses between 100 and 599", "\"200-399\"");
    assert_err(&bad("\"2xx\""), 5, 17, "is not a status or a range of statuses", "one status (200)");
    assert_err(&bad("true"), 5, 17, "must be an HTTP status (200) or a range (\"200-399\"), not a boolean", "");
}

#[test]
fn a_new_instance_must_be_able_to_pass_in_time() {
    let e = one(&web_with("[processes.web.health]\ninterval = \"30s\"\nhealthy_threshold = 3\n"));
    assert_err(
        &e,
        4,
        1,
        "`health_timeout` in [processes.web.rollout] (1m) is shorter than 3 health checks 30s apart (1m30s)",
        "raise health_timeout to at least \"1m30s\"",
    );
    let e = one(&web_with("[processes.web.health]\ntimeout = \"2m\"\ninterval = \"3m\"\nhealthy_threshold = 1\n[processes.web.rollout]\nhealth_timeout = \"2m30s\"\n"));
    assert_err(&e, 9, 18, "is shorter than 1 health checks 3m apart", "");
    let e = one(&web_with("[processes.web.health]\ntimeout = \"90s\"\n"));
    assert_err(&e, 4, 1, "is shorter than one health check timing out (1m30s)", "at least \"1m30s\"");
    let e = one("app = \"a\"\n[processes.w]\ncommand = \"x\"\nready_after = \"1m\"\n");
    assert_err(&e, 4, 15, "(1m) is not longer than `ready_after` (1m)", "make health_timeout longer than ready_after");
}

// ------------------------------------------------------------------ rollout

#[test]
fn rollout_quantities() {
    let r = |lines: &str| {
        let spec = ok(&web_with(&format!("count = 4\n[processes.web.rollout]\n{lines}")));
        web(&spec).rollout.clone()
    };
    let rollout = r("max_surge = \"25%\"\nmax_unavailable = \"50%\"\n");
    assert_eq!((rollout.max_surge, rollout.max_unavailable), (Quantity::Percent(25), Quantity::Percent(50)));
    let rollout = r("max_surge = 0\nmax_unavailable = 1\n");
    assert_eq!((rollout.max_surge, rollout.max_unavailable), (Quantity::Count(0), Quantity::Count(1)));
    // 50% of 4 rounds down to 2: fine.
    r("max_surge = 0\nmax_unavailable = \"50%\"\n");

    let bad = |lines: &str| one(&web_with(&format!("[processes.web.rollout]\n{lines}")));
    assert_err(
        &bad("max_surge = 0\n"),
        5,
        13,
        "both resolve to 0 with count = 1",
        "allow one extra instance (max_surge = 1) or one missing instance (max_unavailable = 1)",
    );
    assert_err(&bad("max_surge = \"0%\"\nmax_unavailable = 0\n"), 6, 19, "both resolve to 0", "");
    // 50% of 1 rounds down to 0.
    assert_err(&bad("max_surge = 0\nmax_unavailable = \"50%\"\n"), 6, 19, "both resolve to 0 with count = 1", "");
    assert_err(&bad("max_surge = \"150%\"\n"), 5, 13, "must be at most 100%, not 150%", "\"25%\"");
    assert_err(&bad("max_surge = -1\n"), 5, 13, "`max_surge` in [processes.web.rollout] must not be negative", "");
    assert_err(
        &bad("max_surge = \"2\"\n"),
        5,
        13,
        "is not a count or a percentage (\"2\")",
        "remove the quotes for a count (2) or add % for a percentage (\"2%\")",
    );
    assert_err(
        &bad("max_unavailable = \"a lot\"\n"),
        5,
        19,
        "is not a count or a percentage",
        "use a count (1) or a percentage",
    );
    assert_err(
        &bad("health_timeout = 0\n"),
        5,
        18,
        "`health_timeout` in [processes.web.rollout] must be longer than 0s",
        "",
    );
}

// ------------------------------------------------------------------ restart

#[test]
fn restart_policy_rules() {
    let r = |lines: &str| web_with(&format!("[processes.web.restart]\n{lines}"));
    let e = one(&r("backoff_initial = \"10s\"\nbackoff_max = \"1s\"\n"));
    assert_err(
        &e,
        6,
        15,
        "`backoff_max` in [processes.web.restart] (1s) is shorter than `backoff_initial` (10s)",
        "make backoff_max at least backoff_initial",
    );
    let e = one(&r("backoff_initial = \"1m\"\n"));
    assert_err(&e, 5, 19, "(30s) is shorter than `backoff_initial` (1m)", "");
    let e = one(&r("crash_loop_after = 0\n"));
    assert_err(
        &e,
        5,
        20,
        "`crash_loop_after` in [processes.web.restart] must be at least 1, not 0",
        "crash_loop_after = 5",
    );
}

// -------------------------------------------------------------- TOML syntax

#[test]
fn malformed_toml_is_located() {
    let e = one(&web_with("stop_signal = SIGTERM\n"));
    assert_err(&e, 4, 15, "invalid TOML: string values must be quoted", "put the value in double quotes");
    let e = one(&web_with("kind = worker\n"));
    assert_err(&e, 4, 8, "invalid TOML: string values must be quoted", "");
    let e = one(&web_with("stop_signal = term\n"));
    assert_err(&e, 4, 15, "invalid TOML: invalid boolean", "strings go in double quotes");
    let e = one(&web_with("count = 1\ncount = 2\n"));
    assert_err(&e, 5, 1, "invalid TOML: duplicate key `count`", "may appear only once");
    let e = one(&format!("{WEB}[processes.web]\ncount = 2\n"));
    assert_err(&e, 4, 12, "invalid TOML: duplicate key `web`", "");
    let e = one("app = \"blog\n[processes.web]\ncommand = \"x\"\n");
    assert_err(&e, 1, 12, "invalid TOML: invalid basic string", "close the string on the same line");
    let e = one("app = \"a\"\n[processes.web\ncommand = \"x\"\n");
    assert_err(&e, 2, 15, "invalid TOML: unclosed table", "[processes.web], on a line of its own");
    let e = one(&format!("{WEB}count = 2 2\n"));
    assert_err(&e, 4, 9, "invalid TOML: string values must be quoted", "");
    let e = one(&format!("{WEB}= 2\n"));
    assert_err(&e, 4, 1, "invalid TOML: unquoted keys cannot be empty", "`key = value` lines");
}

#[test]
fn several_syntax_errors_one_per_line() {
    let src = "app = \"a\"\nbuild = [\"x\"\nfoo = 1\n[processes.web]\ncommand = gunicorn\n";
    let e = errs(src);
    let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
    let mut unique = lines.clone();
    unique.dedup();
    assert_eq!(lines, unique, "one error per line: {}", SpecErrors { errors: e.clone() });
    assert!(e.iter().all(|e| e.message.starts_with("invalid TOML")));
    assert!(e.iter().any(|e| e.line == 5), "the later error is reported too");
}

#[test]
fn a_byte_order_mark_is_not_a_column() {
    let e = one("\u{feff}app = 1\n[processes.web]\ncommand = \"x\"\n");
    assert_eq!((e.line, e.column), (1, 7));
}

// --------------------------------------------------------------------- load

#[test]
fn load_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SPEC_FILE);
    std::fs::write(&path, WEB).unwrap();
    let spec = load(&path).unwrap();
    assert_eq!(spec.app.as_str(), "blog");

    std::fs::write(&path, "app = 1\n[processes.web]\ncommand = \"x\"\n").unwrap();
    let e = load(&path).unwrap_err();
    assert_eq!(e.errors[0].file, path);
    assert!(e.to_string().starts_with(&format!("{}:1:7: error:", path.display())), "{e}");
}

#[test]
fn a_missing_file_says_to_run_init() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SPEC_FILE);
    let e = load(&path).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(
        e.to_string(),
        format!(
            "{}: error: no such file\n  hint: run `nonstop init` to create it (from your Procfile, if the app has one)",
            path.display()
        )
    );
    let e = load(dir.path()).unwrap_err();
    assert!(e.errors[0].message.contains("directory") || e.errors[0].message.contains("cannot read"), "{e}");
    std::fs::write(&path, b"app = \"\xff\"\n").unwrap();
    let e = load(&path).unwrap_err();
    assert_eq!(e.errors[0].message, "the file is not UTF-8 text");
}

// --------------------------------------------------------------------- init

const DJANGO_PROCFILE: &str = "\
# Heroku Procfile
web: gunicorn x.wsgi
worker: celery -A x worker
beat: celery -A x beat

release: python manage.py migrate
";

#[test]
fn init_round_trips_a_django_procfile() {
    let toml = init_toml("x", Some(DJANGO_PROCFILE)).unwrap();
    let spec = parse(&toml, Path::new(FILE), &()).unwrap_or_else(|e| panic!("{e}\n---\n{toml}"));
    assert_eq!(spec.app.as_str(), "x");
    let summary: Vec<(&str, ProcessKind, &str, u32)> =
        spec.processes.iter().map(|p| (p.name.as_str(), p.kind, p.command.as_str(), p.count)).collect();
    assert_eq!(
        summary,
        [
            ("web", ProcessKind::Web, "gunicorn x.wsgi", 1),
            ("worker", ProcessKind::Worker, "celery -A x worker", 1),
            ("beat", ProcessKind::Singleton, "celery -A x beat", 1),
        ]
    );
    assert_eq!(spec.release.tasks, ["python manage.py migrate"]);
    assert_eq!(spec.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
    // Everything else is the default: the commented-out values are right
    // (the environments are an example, not defaults).
    let uncommented = without_environments(&toml)
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with("[processes.")
                    || (rest.contains(" = ")
                        && !rest.starts_with("build")
                        && !rest.starts_with("DJANGO")
                        && !rest.starts_with("order")
                        && !rest.starts_with("url")
                        && !rest.starts_with("post_tasks")
                        && !rest.starts_with("smoke")) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let again = parse(&uncommented, Path::new(FILE), &()).unwrap_or_else(|e| panic!("{e}\n---\n{uncommented}"));
    assert_eq!(again, spec, "the commented-out defaults are the defaults");
    // The web command lacks $PORT: kept as is, with a note.
    assert!(toml.contains("command = \"gunicorn x.wsgi\"\n# NOTE: this command does not mention $PORT."), "{toml}");
}

#[test]
fn init_notes_a_fixed_port() {
    let toml = init_toml("blog", Some("web: python manage.py runserver 0.0.0.0:8000\n")).unwrap();
    assert!(toml.contains("# NOTE: this command binds a fixed port (8000)."), "{toml}");
    ok_round_trip(&toml);
    let toml = init_toml("blog", Some("web: gunicorn x.wsgi --bind 127.0.0.1:$PORT\n")).unwrap();
    assert!(!toml.contains("NOTE"), "{toml}");
    ok_round_trip(&toml);
}

/// `init`'s output without its commented example of environments (at the
/// end).
fn without_environments(toml: &str) -> &str {
    &toml[..toml.find(crate::init::ENVIRONMENTS_HEADING).expect("init writes an example of environments")]
}

#[test]
fn init_s_example_of_environments_works_once_uncommented() {
    for procfile in [Some(DJANGO_PROCFILE), None] {
        let toml = init_toml("blog", procfile).unwrap();
        let start = toml.find(crate::init::ENVIRONMENTS_HEADING).unwrap();
        let example: String = toml[start..]
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut filled = format!("{}{example}\n", &toml[..start]);
        if procfile.is_none() {
            filled = filled
                .replace("# [processes.web]\n", "[processes.web]\n")
                .replace("# command = \"gunicorn", "command = \"gunicorn");
        }
        let env: BTreeMap<String, String> =
            [("STAGING_DATABASE_URL".to_string(), "postgres://blog@127.0.0.1:5432/blog_staging".to_string())].into();
        let set = parse_set(&filled, Path::new(FILE), &env).unwrap_or_else(|e| panic!("{e}\n---\n{filled}"));
        let staging = set.resolve(&nonstop_core::environment::environment_name("staging").unwrap()).unwrap();
        assert_eq!(staging.hosts, ["staging.blog.example.com"]);
        assert_eq!(web(&staging).count, 1);
        assert_eq!(staging.env.get("LOG_LEVEL").map(String::as_str), Some("debug"));
        assert_eq!(staging.database.unwrap().url.database(), "blog_staging");
        assert!(set.base_services().unwrap().redis.is_some());
        // The default environment is the file as it is.
        assert_eq!(set.resolve(set.default_environment()).unwrap().database, None);
    }
}

fn ok_round_trip(toml: &str) -> AppSpec {
    parse(toml, Path::new(FILE), &()).unwrap_or_else(|e| panic!("{e}\n---\n{toml}"))
}

#[test]
fn init_keeps_tricky_commands_intact() {
    let procfile = r#"web: gunicorn "x.wsgi:application" --bind 127.0.0.1:$PORT --access-logfile -
worker: sh -c 'celery -A x worker --concurrency=${CONC:-2}' \# not a comment
clock: python clock.py
scheduler_2: bin/run "a\b"
"#;
    let spec = ok_round_trip(&init_toml("tricky", Some(procfile)).unwrap());
    assert_eq!(spec.processes[0].command, r#"gunicorn "x.wsgi:application" --bind 127.0.0.1:$PORT --access-logfile -"#);
    assert_eq!(spec.processes[1].command, r#"sh -c 'celery -A x worker --concurrency=${CONC:-2}' \# not a comment"#);
    assert_eq!(spec.processes[1].kind, ProcessKind::Worker);
    assert_eq!(spec.processes[2].kind, ProcessKind::Singleton);
    assert_eq!(spec.processes[3].kind, ProcessKind::Singleton);
    assert_eq!(spec.processes[3].command, r#"bin/run "a\b""#);
}

#[test]
fn init_without_a_procfile_is_a_template_to_fill_in() {
    let toml = init_toml("blog", None).unwrap();
    // It is valid TOML whose only problem is the missing process.
    let e = parse(&toml, Path::new(FILE), &()).unwrap_err();
    assert_eq!(e.len(), 1, "{e}");
    assert!(e.errors[0].message.starts_with("no processes"), "{e}");
    // Uncommenting the web process gives a working file.
    let start = toml.find("# [processes.web]").unwrap();
    let end = toml[start..].find("\n\n").map(|i| start + i).unwrap();
    let block: String = toml[start..end].lines().map(|l| l.strip_prefix("# ").unwrap()).collect::<Vec<_>>().join("\n");
    let filled = format!("{}{}{}", &toml[..start], block, &toml[end..]);
    let spec = ok_round_trip(&filled);
    assert_eq!(spec.processes.len(), 1);
    assert_eq!(web(&spec).count, 2);
    assert_eq!(web(&spec).command, "gunicorn blog.wsgi --bind 127.0.0.1:$PORT");
    // So does uncommenting all three.
    let all: String = without_environments(&toml)
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with("[processes")
                    || rest.starts_with("kind")
                    || rest.starts_with("command")
                    || rest.starts_with("count") =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let spec = ok_round_trip(&all);
    let kinds: Vec<ProcessKind> = spec.processes.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, [ProcessKind::Web, ProcessKind::Worker, ProcessKind::Singleton]);
}

#[test]
fn init_output_is_stable() {
    let toml = init_toml("x", Some("web: gunicorn x.wsgi\nrelease: python manage.py migrate\n")).unwrap();
    let expected = r#"# nonstop.toml for x, generated by `nonstop init` from the Procfile.
# Durations are seconds (10) or strings with units ("250ms", "2s", "1m30s").
# A commented-out key shows its default.

app = "x"
# The environment commands use without -e or NONSTOP_ENV (see [environments] at the end).
# environment = "default"

# Commands run once per release, in order (deploys).
# build = ["pip install -r requirements.txt", "python manage.py collectstatic --noinput"]

# Plain environment variables for every process ($PORT and NONSTOP_* are reserved).
[env]
# DJANGO_SETTINGS_MODULE = "blog.settings"

[proxy]
# Where the proxy listens for HTTP; the NONSTOP_PROXY_LISTEN environment variable overrides it.
listen = "127.0.0.1:8080"

[release]
# Run once per deploy, after the build and before any instance is replaced.
tasks = ["python manage.py migrate"]  # the Procfile's release: line
# Run once after a successful deploy.
# post_tasks = []
# task_timeout = "10m"
# retain_releases = 5
# Rollout order of the process types (by default: web, then workers, then singletons).
# order = ["web", "worker"]

# The app's PostgreSQL database. Every process and task gets DATABASE_URL (or the
# variables [database.env] maps), and each deploy runs the release tasks on a scratch
# copy of the schema first: a migration that breaks the running release (a renamed or
# dropped column...) is refused before it touches the database.
# [database]
# url = "${DATABASE_URL}"

[processes.web]
# Gets its own port in $PORT, is health-checked and receives HTTP from the proxy.
kind = "web"
command = "gunicorn x.wsgi"
# NOTE: this command does not mention $PORT. Each web instance gets its own port in $PORT
# and must listen on it: gunicorn does so by itself; other servers need, for example,
# --bind 127.0.0.1:$PORT
count = 1
# stop_signal = "SIGTERM"
# stop_timeout = "10s"
# drain_timeout = "30s"  # time in-flight requests get before the instance is stopped

# [processes.web.health]
# path = "/"
# interval = "1s"
# timeout = "2s"
# healthy_threshold = 2
# unhealthy_threshold = 3
# expect_status = "200-399"
# Pages (and a static file) every new instance must serve (2xx/3xx) before it gets a
# client request: a health view that skips the database and the templates answers 200
# for a release whose pages answer 500. Paths under a [static] url are checked in the
# built release's files instead (a build that forgot collectstatic).
# smoke = ["/", "/static/admin/css/base.css"]

# [processes.web.rollout]
# max_surge = 1        # a count or a percentage such as "25%"
# max_unavailable = 0
# health_timeout = "1m"
# A new release first gets these shares of the requests, and is rolled back if its
# 5xx rate or p95 is worse than the old release's by more than the margins (false: no ramp).
# canary = ["5%", "25%"]
# canary_hold = "10s"
# canary_max_5xx_increase = "1%"
# canary_max_p95_ratio = 2.0
# canary_p95_slack = "100ms"
# canary_min_requests = 20

# Environments: the same releases deployed more than once (`nonstop deploy -e staging`,
# or NONSTOP_ENV=staging). A table below changes the settings above for one environment;
# an environment without one (one created later for a branch, say) gets them as they are.
# Without `hosts`, an environment answers on NAME.x.localhost.
# [environments.staging]
# hosts = ["staging.x.example.com"]  # "*.x.example.com": any one label in front
# protected = false  # true: commands that destroy it or drop its data refuse it
# default = false    # true: it also answers the hosts no environment claims
# [environments.staging.env]  # over [env], and over each process's env
# LOG_LEVEL = "debug"
# [environments.staging.processes.web]  # count, env, health and rollout keys
# count = 1
# [environments.staging.database]
# url = "${STAGING_DATABASE_URL}"
#
# Servers the environments share (one PostgreSQL server with a database per environment).
# [base]
# postgres = "postgres://admin@127.0.0.1:5432/"
# redis = "redis://127.0.0.1:6379"
"#;
    assert_eq!(toml, expected);
}

// ------------------------------------------------------------ app name

#[test]
fn directory_names_become_valid_app_names() {
    for (dir, name) in [
        ("blog", "blog"),
        ("My Blog", "my-blog"),
        ("my_blog.v2", "my-blog-v2"),
        ("--weird--", "weird"),
        ("2048", "app-2048"),
        ("café", "caf"),
        ("", "app"),
        ("___", "app"),
        ("Ünïcode Only", "n-code-only"),
    ] {
        assert_eq!(sanitize_app_name(dir), name, "{dir:?}");
    }
    let long = "a-".repeat(50);
    let name = sanitize_app_name(&long);
    assert!(name.len() <= 63 && !name.ends_with('-'), "{name}");
    for dir in ["blog", "My Blog", "2048", "", "x".repeat(100).as_str(), "-a-", "Z_9", "ÄÖÜ", "a b c d"] {
        let name = sanitize_app_name(dir);
        assert!(AppName::new(&name).is_ok() && !name.contains('_'), "{dir:?} → {name:?}");
        assert!(init_toml(&name, None).is_ok());
    }
}

// ------------------------------------------------- [proxy] request bodies

#[test]
fn proxy_body_buffering_settings() {
    let p = ok(&top(
        "[proxy]\nbody_memory_bytes = \"1MiB\"\nmin_upload_rate = \"2KiB/s\"\nupload_rate_window = \"20s\"\nunbuffered_paths = [\"/upload/\", \"/api/files\"]\n",
    ))
    .proxy;
    assert_eq!(p.body_memory_bytes, Some(1 << 20));
    assert_eq!(p.min_upload_rate, Some(2048));
    assert_eq!(p.upload_rate_window, Some(Duration::from_secs(20)));
    assert_eq!(p.unbuffered_paths, ["/upload/", "/api/files"]);
    let p = ok(FULL).proxy;
    assert_eq!(p.body_memory_bytes, Some(256 * 1024));
    assert_eq!((p.min_upload_rate, p.upload_rate_window), (Some(2048), Some(Duration::from_secs(20))));
    assert_eq!(p.unbuffered_paths, ["/upload/"]);
    // Bytes per second as an integer; 0 turns the minimum off; 0 bytes in
    // memory sends every body to a file.
    let p = ok(&top("[proxy]\nmin_upload_rate = 0\nbody_memory_bytes = 0\n")).proxy;
    assert_eq!((p.min_upload_rate, p.body_memory_bytes), (Some(0), Some(0)));
    let p = ok(&top("[proxy]\nmin_upload_rate = 500\n")).proxy;
    assert_eq!(p.min_upload_rate, Some(500));
    // Left out: the proxy's defaults.
    let p = ok(WEB).proxy;
    assert_eq!((p.body_memory_bytes, p.min_upload_rate, p.upload_rate_window), (None, None, None));
    assert!(p.unbuffered_paths.is_empty());
}

#[test]
fn bad_proxy_body_settings_are_located_with_a_fix() {
    let cases: Vec<(&str, (usize, usize), &str, &str)> = vec![
        (
            "[proxy]\nmin_upload_rate = \"1KiB\"\n",
            (3, 19),
            "`min_upload_rate` in [proxy] is not a rate (\"1KiB\"): it does not end with \"/s\"",
            "write a size per second, such as \"1KiB/s\"",
        ),
        (
            "[proxy]\nmin_upload_rate = \"fast/s\"\n",
            (3, 19),
            "`min_upload_rate` in [proxy] is not a valid rate (\"fast/s\"): it does not start with a number",
            "a rate is a size per second",
        ),
        ("[proxy]\nmin_upload_rate = -5\n", (3, 19), "`min_upload_rate` in [proxy] must not be negative", "1KiB/s"),
        (
            "[proxy]\nmin_upload_rate = 1.5\n",
            (3, 19),
            "`min_upload_rate` in [proxy] must be a rate: bytes per second (1024) or a string with a unit per second (\"1KiB/s\")",
            "for example: min_upload_rate = \"1KiB/s\"",
        ),
        (
            "[proxy]\nupload_rate_window = \"500ms\"\n",
            (3, 22),
            "`upload_rate_window` in [proxy] must be at least 1s, not 500ms: a shorter window judges a pause, not a rate",
            "for example: upload_rate_window = \"15s\"",
        ),
        (
            "[proxy]\nbody_memory_bytes = \"2GiB\"\n",
            (3, 21),
            "`body_memory_bytes` in [proxy] must be at most 1GiB, not 2GiB",
            "for example: body_memory_bytes = \"64KiB\"",
        ),
        (
            "[proxy]\nunbuffered_paths = [\"upload/\"]\n",
            (3, 21),
            "\"upload/\" in `unbuffered_paths` of [proxy] does not start with '/'",
            "unbuffered_paths = [\"/upload/\", \"/api/files\"]",
        ),
        (
            "[proxy]\nunbuffered_paths = [\"/up?x=1\"]\n",
            (3, 21),
            "contains a query or fragment ('?' or '#'): only the path is matched",
            "write path prefixes",
        ),
        ("[proxy]\nunbuffered_paths = [\"/a\", \"/a\"]\n", (3, 27), "\"/a\" is twice in `unbuffered_paths`", "remove one"),
        ("[proxy]\nunbuffered_paths = \"/upload/\"\n", (3, 20), "`unbuffered_paths` in [proxy] must be a list", ""),
    ];
    for (tables, (line, column), message, hint) in cases {
        let e = one(&top(tables));
        assert_err(&e, line, column, message, hint);
    }
}
