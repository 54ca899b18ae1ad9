//! Spanned TOML document → raw schema types ([`crate::raw`]).
//!
//! Unlike serde, this does not stop at the first problem: an unknown key,
//! a value of the wrong type or a table where a value belongs is recorded
//! with its location, and the walk goes on with the rest of the file.
//! Values that are the right TOML type but wrong (a bad duration, a
//! negative count) are left to `validate.rs`.

use crate::duration::DURATION_FORMS;
use crate::error::Diags;
use crate::raw::*;
use crate::suggest::did_you_mean;
use serde_spanned::Spanned;
use std::ops::Range;
use toml::de::{DeArray, DeTable, DeValue};

type Span = Range<usize>;
type Value<'i> = Spanned<DeValue<'i>>;

/// Walks a whole document.
pub(crate) fn walk(root: &Spanned<DeTable<'_>>, diags: &mut Diags) -> RawSpec {
    let t = Table { entries: root.get_ref(), span: root.span(), path: String::new() };
    t.check_keys(field_names::<RawSpec>(), diags);
    // An `app` inside a table (written after a [table] header) is
    // reported as an unknown key there, with a hint; not twice.
    if t.get("app").is_none()
        && !contains_key_deep(root.get_ref(), "app")
        && !t.has_misspelling_of("app", field_names::<RawSpec>())
    {
        diags.error(
            t.span.clone(),
            "missing `app`: every nonstop.toml names its app",
            "add a line at the top of the file: app = \"blog\" (lowercase letters, digits and '-', starting with a letter)",
        );
    }
    RawSpec {
        app: t.string("app", "app = \"blog\"", diags),
        build: t.string_list("build", "build = [\"pip install -r requirements.txt\"]", diags),
        env: t.env_map("env", diags),
        proxy: t.table("proxy", "listen = \"127.0.0.1:8080\"", diags).map(|p| p.map(walk_proxy, diags)),
        release: t
            .table("release", "tasks = [\"python manage.py migrate --noinput\"]", diags)
            .map(|r| r.map(walk_release, diags)),
        processes: walk_processes(&t, diags),
        statics: walk_statics(&t, diags),
        database: t
            .table("database", "url = \"postgres://blog:PASSWORD@127.0.0.1:5432/blog\"", diags)
            .map(|d| d.map(walk_database, diags)),
        environment: walk_environment_key(&t, diags),
        base: t.table("base", BASE_EXAMPLE, diags).map(|b| b.map(walk_base, diags)),
        environments: walk_environments(&t, diags),
        metrics: t.table("metrics", "listen = \"127.0.0.1:9464\"", diags).map(|m| m.map(walk_metrics, diags)),
    }
}

fn walk_metrics(t: &Table<'_, '_>, diags: &mut Diags) -> RawMetrics {
    t.check_keys(field_names::<RawMetrics>(), diags);
    RawMetrics { listen: t.string("listen", "listen = \"127.0.0.1:9464\"", diags) }
}

const AUTOSCALE_EXAMPLE: &str = "min = 2\nmax = 8\ncpu_percent = 70";

/// `whole`: the table must be complete by itself (it is not merged over
/// another): it needs `max` and a target. A singleton's is refused whole
/// by validation.
fn walk_autoscale(t: &Table<'_, '_>, whole: Option<Shape>, diags: &mut Diags) -> RawAutoscale {
    let fields = field_names::<RawAutoscale>();
    t.check_keys(fields, diags);
    if let Some(shape) = whole.filter(|s| !s.singleton) {
        if t.get("max").is_none() && !t.has_misspelling_of("max", fields) {
            diags.error(
                t.span.clone(),
                format!("missing `max` in {}: the most instances autoscaling may run", t.display()),
                "for example: max = 8",
            );
        }
        let targets = ["cpu_percent", "requests_per_instance", "p95_ms", "queue_per_instance"];
        if targets.iter().all(|k| t.get(k).is_none() && !t.has_misspelling_of(k, fields)) {
            let choices = if shape.web {
                "cpu_percent = 70, requests_per_instance = 50, p95_ms = 300"
            } else {
                "cpu_percent = 70, queue_per_instance = 20 (with queue = { redis_list = \"...\" })"
            };
            diags.error(
                t.span.clone(),
                format!("{} has no target: autoscaling needs at least one metric to follow", t.display()),
                format!("add one or more of: {choices}"),
            );
        }
    }
    let target = "a number greater than 0";
    RawAutoscale {
        min: t.integer("min", "min = 2", diags),
        max: t.integer("max", "max = 8", diags),
        cpu_percent: t.number("cpu_percent", target, "cpu_percent = 70", diags),
        requests_per_instance: t.number("requests_per_instance", target, "requests_per_instance = 50", diags),
        p95_ms: t.number("p95_ms", target, "p95_ms = 300", diags),
        queue_per_instance: t.number("queue_per_instance", target, "queue_per_instance = 20", diags),
        scale_out_cooldown: t.duration("scale_out_cooldown", diags),
        scale_in_cooldown: t.duration("scale_in_cooldown", diags),
        scale_in_window: t.duration("scale_in_window", diags),
        max_step: t.int_or_string("max_step", "a count (4) or a percentage (\"50%\")", "max_step = 4", diags),
    }
}

const QUEUE_EXAMPLE: &str = "queue = { redis_list = \"celery\" }";

/// `queue = { redis_list = "celery" }`: an inline table (or a
/// `[processes.NAME.queue]` one) that names the list.
fn walk_queue(t: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<RawQueue>> {
    let value = t.get("queue")?;
    match value.get_ref() {
        DeValue::Table(entries) => {
            let q = Table { entries, span: value.span(), path: t.child("queue") };
            q.check_keys(field_names::<RawQueue>(), diags);
            if q.get("redis_list").is_none() && !q.has_misspelling_of("redis_list", field_names::<RawQueue>()) {
                diags.error(
                    value.span(),
                    format!("{} does not say where the queue is: `redis_list` is missing", t.describe_key("queue")),
                    format!("name the Redis list the workers read, for example: {QUEUE_EXAMPLE}"),
                );
            }
            Some(q.map(
                |q, diags| RawQueue { redis_list: q.string("redis_list", "redis_list = \"celery\"", diags) },
                diags,
            ))
        }
        DeValue::String(s) => {
            diags.error(
                value.span(),
                format!("{} must be a table that says where the queue is, not a string", t.describe_key("queue")),
                format!("for a Redis list: queue = {{ redis_list = {} }}", toml_quote(s)),
            );
            None
        }
        _ => {
            t.type_error("queue", value, "a table", QUEUE_EXAMPLE, diags);
            None
        }
    }
}

const BASE_EXAMPLE: &str =
    "[base]\npostgres = \"postgres://admin@127.0.0.1:5432/\"\nredis = \"redis://127.0.0.1:6379\"";
const ENVIRONMENT_EXAMPLE: &str = "[environments.staging]\nhosts = [\"staging.example.com\"]";

/// `environment = "production"`: a name, not a table (`[environments.NAME]`
/// is plural).
fn walk_environment_key(t: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<String>> {
    let value = t.get("environment")?;
    match value.get_ref() {
        DeValue::String(s) => Some(Spanned::new(value.span(), s.to_string())),
        DeValue::Table(_) => {
            diags.error(
                value.span(),
                "`environment` must be a string (the environment commands use by default), not a table",
                format!(
                    "the tables of the environments are [environments.NAME] (plural), for example:\n{ENVIRONMENT_EXAMPLE}\n(and environment = \"production\" above the first table names the default one)"
                ),
            );
            None
        }
        _ => {
            t.type_error("environment", value, "a string", "environment = \"production\"", diags);
            None
        }
    }
}

fn walk_base(t: &Table<'_, '_>, diags: &mut Diags) -> RawBase {
    t.check_keys(field_names::<RawBase>(), diags);
    RawBase {
        postgres: t.string("postgres", "postgres = \"postgres://admin@127.0.0.1:5432/\"", diags),
        redis: t.string("redis", "redis = \"redis://127.0.0.1:6379\"", diags),
    }
}

/// `[environments.NAME]` tables, in file order.
fn walk_environments(root: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<RawMap<Spanned<RawEnvironment>>>> {
    let environments = root.table("environments", ENVIRONMENT_EXAMPLE, diags)?;
    let shapes: Vec<(String, Shape)> = match root.get("processes").map(|p| p.get_ref()) {
        Some(DeValue::Table(p)) => p
            .iter()
            .map(|(k, v)| {
                let shape = match v.get_ref() {
                    DeValue::Table(t) => Shape::of(k.get_ref(), t),
                    _ => Shape::default(),
                };
                (k.get_ref().to_string(), shape)
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut entries = Vec::new();
    for (key, value) in environments.entries.iter() {
        let name = Spanned::new(key.span(), key.get_ref().to_string());
        match value.get_ref() {
            DeValue::Table(entries_of) => {
                let t = Table { entries: entries_of, span: value.span(), path: environments.child(key.get_ref()) };
                entries.push((name, Spanned::new(value.span(), walk_environment(&t, &shapes, diags))));
            }
            other => diags.error(
                value.span(),
                format!("{} must be a table, not {}", environments.describe_key(key.get_ref()), describe(other)),
                format!(
                    "write it as a table (an empty one gives the environment the rest of the file as it is):\n[{}]\nhosts = [\"{}.example.com\"]",
                    environments.child(key.get_ref()),
                    key.get_ref()
                ),
            ),
        }
    }
    Some(Spanned::new(environments.span.clone(), RawMap(entries)))
}

/// What the walk of an environment's overrides needs to know of a
/// process of the file.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    web: bool,
    singleton: bool,
    /// It has an `[autoscale]` table of its own.
    autoscale: bool,
}

impl Shape {
    fn of(name: &str, t: &DeTable<'_>) -> Shape {
        let kind = t.iter().find(|(k, _)| k.get_ref() == "kind").and_then(|(_, v)| v.get_ref().as_str());
        Shape {
            web: kind.map_or(name == "web", |k| k == "web"),
            singleton: kind == Some("singleton"),
            autoscale: t.iter().any(|(k, _)| k.get_ref() == "autoscale"),
        }
    }
}

fn walk_environment(t: &Table<'_, '_>, shapes: &[(String, Shape)], diags: &mut Diags) -> RawEnvironment {
    let process_names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    let valid = field_names::<RawEnvironment>();
    t.check_keys_with(valid, diags, |key| {
        let example_process = process_names.first().copied().unwrap_or("web");
        let table_of = |process: &str| format!("{}.processes.{}", t.path, display_key(process));
        if process_names.contains(&key) {
            Some(format!("a process's settings go in [{}]", table_of(key)))
        } else if field_names::<RawProcess>().contains(&key) {
            Some(format!(
                "a process's settings go in its own table, for example:\n[{}]\ncount = 1",
                table_of(example_process)
            ))
        } else if field_names::<RawSpec>().contains(&key) {
            Some(format!("`{key}` is the same in every environment; an environment sets only: {}", valid.join(", ")))
        } else {
            None
        }
    });
    RawEnvironment {
        hosts: t.string_list("hosts", "hosts = [\"staging.example.com\"]", diags),
        default: t.boolean("default", "default = true", diags),
        protected: t.boolean("protected", "protected = true", diags),
        env: t.env_map("env", diags),
        processes: walk_process_overrides(t, shapes, diags),
        database: t
            .table("database", "url = \"postgres://blog:PASSWORD@127.0.0.1:5432/blog_staging\"", diags)
            .map(|d| d.map(walk_database, diags)),
    }
}

fn walk_process_overrides(
    environment: &Table<'_, '_>,
    shapes: &[(String, Shape)],
    diags: &mut Diags,
) -> Option<Spanned<RawMap<Spanned<RawProcessOverride>>>> {
    let example = "[web]\ncount = 1";
    let processes = environment.table("processes", example, diags)?;
    let mut entries = Vec::new();
    for (key, value) in processes.entries.iter() {
        let name = Spanned::new(key.span(), key.get_ref().to_string());
        match value.get_ref() {
            DeValue::Table(entries_of) => {
                let t = Table { entries: entries_of, span: value.span(), path: processes.child(key.get_ref()) };
                let shape = shapes.iter().find(|(n, _)| n == key.get_ref()).map(|(_, s)| *s);
                entries.push((name, t.map(|t, diags| walk_process_override(t, shape, diags), diags)));
            }
            other => diags.error(
                value.span(),
                format!("{} must be a table, not {}", processes.describe_key(key.get_ref()), describe(other)),
                format!("write it as a table:\n[{}]\ncount = 1", processes.child(key.get_ref())),
            ),
        }
    }
    Some(Spanned::new(processes.span.clone(), RawMap(entries)))
}

/// `shape`: the file's process it overrides (`None`: the file has none,
/// which validation reports).
fn walk_process_override(t: &Table<'_, '_>, shape: Option<Shape>, diags: &mut Diags) -> RawProcessOverride {
    let valid = field_names::<RawProcessOverride>();
    t.check_keys_with(valid, diags, |key| {
        field_names::<RawProcess>().contains(&key).then(|| {
            format!(
                "`{key}` is the same in every environment (each runs the same release); an environment may change only: {}",
                valid.join(", ")
            )
        })
    });
    RawProcessOverride {
        count: t.integer("count", "count = 1", diags),
        env: t.env_map("env", diags),
        health: t.table("health", "path = \"/health/\"", diags).map(|h| h.map(walk_health, diags)),
        rollout: t.table("rollout", "max_surge = 1", diags).map(|r| r.map(walk_rollout, diags)),
        // Complete by itself when the file's process has no [autoscale].
        autoscale: t.table("autoscale", AUTOSCALE_EXAMPLE, diags).map(|a| {
            let whole = shape.filter(|s| !s.autoscale);
            a.map(|a, diags| walk_autoscale(a, whole, diags), diags)
        }),
    }
}

fn walk_database(t: &Table<'_, '_>, diags: &mut Diags) -> RawDatabase {
    t.check_keys(field_names::<RawDatabase>(), diags);
    let env = t.table("env", "POSTGRES_NAME = \"name\"\nPOSTGRES_PASSWORD = \"password\"", diags).map(|env| {
        let mut entries = Vec::new();
        for (name, value) in env.entries.iter() {
            match value.get_ref() {
                DeValue::String(s) => entries
                    .push((Spanned::new(name.span(), name.get_ref().to_string()), Spanned::new(value.span(), s.to_string()))),
                other => diags.error(
                    value.span(),
                    format!("{} must be a string, not {}", env.describe_key(name.get_ref()), describe(other)),
                    format!(
                        "name the part of the url it holds: {} = \"name\" (one of url, name, host, port, user, password)",
                        display_key(name.get_ref())
                    ),
                ),
            }
        }
        Spanned::new(env.span.clone(), RawMap(entries))
    });
    RawDatabase { url: t.string("url", "url = \"postgres://blog:PASSWORD@127.0.0.1:5432/blog\"", diags), env }
}

const STATIC_EXAMPLE: &str = "[static]\nurl = \"/static/\"\ndir = \"staticfiles\"";

/// `[static]` (one table) or `[[static]]` (a list of tables).
fn walk_statics(t: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<RawStatics>> {
    let value = t.get("static")?;
    let entry = |entries, span: Span, diags: &mut Diags| {
        let table = Table { entries, span, path: "static".to_string() };
        table.map(walk_static, diags)
    };
    let out = match value.get_ref() {
        DeValue::Table(entries) => vec![entry(entries, value.span(), diags)],
        DeValue::Array(items) => {
            let mut out = Vec::new();
            for item in items.iter() {
                match item.get_ref() {
                    DeValue::Table(entries) => out.push(entry(entries, item.span(), diags)),
                    other => diags.error(
                        item.span(),
                        format!("`static` must contain only tables, not {}", describe(other)),
                        "write one table per mount:\n[[static]]\nurl = \"/static/\"\ndir = \"staticfiles\"",
                    ),
                }
            }
            out
        }
        other => {
            diags.error(
                value.span(),
                format!(
                    "`static` must be a table ([static]) or a list of tables ([[static]]), not {}",
                    describe(other)
                ),
                format!("for example:\n{STATIC_EXAMPLE}"),
            );
            Vec::new()
        }
    };
    Some(Spanned::new(value.span(), RawStatics(out)))
}

fn walk_static(t: &Table<'_, '_>, diags: &mut Diags) -> RawStatic {
    t.check_keys(field_names::<RawStatic>(), diags);
    RawStatic {
        url: t.string("url", "url = \"/static/\"", diags),
        dir: t.string("dir", "dir = \"staticfiles\"", diags),
    }
}

fn walk_proxy(t: &Table<'_, '_>, diags: &mut Diags) -> RawProxy {
    t.check_keys(field_names::<RawProxy>(), diags);
    let size = "a size: bytes (65536) or a string with a unit (\"64KiB\")";
    RawProxy {
        listen: t.string("listen", "listen = \"127.0.0.1:8080\"", diags),
        https_listen: t.string("https_listen", "https_listen = \"0.0.0.0:443\"", diags),
        redirect_http: t.boolean("redirect_http", "redirect_http = true", diags),
        max_header_bytes: t.int_or_string("max_header_bytes", size, "max_header_bytes = \"64KiB\"", diags),
        max_headers: t.integer("max_headers", "max_headers = 100", diags),
        max_request_line: t.int_or_string("max_request_line", size, "max_request_line = \"8KiB\"", diags),
        max_body_bytes: t.int_or_string("max_body_bytes", size, "max_body_bytes = \"100MiB\"", diags),
        header_timeout: t.duration("header_timeout", diags),
        idle_timeout: t.duration("idle_timeout", diags),
        upstream_timeout: t.duration("upstream_timeout", diags),
        body_timeout: t.duration("body_timeout", diags),
        workers: t.integer("workers", "workers = 2 (or leave it out for one per core)", diags),
        tls: walk_tls(t, diags),
        trusted_proxies: t.string_list("trusted_proxies", "trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]", diags),
        body_memory_bytes: t.int_or_string("body_memory_bytes", size, "body_memory_bytes = \"64KiB\"", diags),
        min_upload_rate: t.int_or_string(
            "min_upload_rate",
            "a rate: bytes per second (1024) or a string with a unit per second (\"1KiB/s\")",
            "min_upload_rate = \"1KiB/s\"",
            diags,
        ),
        upload_rate_window: t.duration("upload_rate_window", diags),
        unbuffered_paths: t.string_list("unbuffered_paths", "unbuffered_paths = [\"/upload/\"]", diags),
        // Connection limits.
        max_connections: t.integer(
            "max_connections",
            "max_connections = 10000 (or leave it out to derive it from the file descriptor limit)",
            diags,
        ),
        max_connections_per_client: t.integer(
            "max_connections_per_client",
            "max_connections_per_client = 256 (0: no limit)",
            diags,
        ),
    }
}

const TLS_EXAMPLE: &str = "[[proxy.tls]]\nhosts = [\"example.com\", \"*.example.com\"]\ncert = \"certs/example.com.pem\"\nkey = \"certs/example.com.key\"";

/// `[[proxy.tls]]`: an array of tables. Present (maybe empty) whenever
/// the key is, so that validation knows certificates were meant.
fn walk_tls(t: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<Vec<Spanned<RawTls>>>> {
    let value = t.get("tls")?;
    let items = match value.get_ref() {
        DeValue::Array(items) => items,
        DeValue::Table(_) => {
            diags.error(
                value.span(),
                "`tls` in [proxy] must be a list of tables: write [[proxy.tls]] (two brackets), once per certificate",
                format!("for example:\n{TLS_EXAMPLE}"),
            );
            return Some(Spanned::new(value.span(), Vec::new()));
        }
        other => {
            diags.error(
                value.span(),
                format!("`tls` in [proxy] must be a list of tables, not {}", describe(other)),
                format!("write one table per certificate:\n{TLS_EXAMPLE}"),
            );
            return Some(Spanned::new(value.span(), Vec::new()));
        }
    };
    let mut out = Vec::new();
    for item in items.iter() {
        match item.get_ref() {
            DeValue::Table(entries) => {
                let tls = Table { entries, span: item.span(), path: t.child("tls") };
                out.push(tls.map(walk_tls_entry, diags));
            }
            other => diags.error(
                item.span(),
                format!("`tls` in [proxy] must contain only tables, not {}", describe(other)),
                format!("write one table per certificate:\n{TLS_EXAMPLE}"),
            ),
        }
    }
    Some(Spanned::new(value.span(), out))
}

fn walk_tls_entry(t: &Table<'_, '_>, diags: &mut Diags) -> RawTls {
    t.check_keys(field_names::<RawTls>(), diags);
    for key in ["hosts", "cert", "key"] {
        if t.get(key).is_none() && !t.has_misspelling_of(key, field_names::<RawTls>()) {
            diags.error(
                t.span.clone(),
                format!("missing `{key}` in [[{}]]", t.path),
                format!("every certificate needs hosts, cert and key, for example:\n{TLS_EXAMPLE}"),
            );
        }
    }
    RawTls {
        hosts: t.string_list("hosts", "hosts = [\"example.com\"]", diags),
        cert: t.string("cert", "cert = \"certs/example.com.pem\"", diags),
        key: t.string("key", "key = \"certs/example.com.key\"", diags),
    }
}

fn walk_release(t: &Table<'_, '_>, diags: &mut Diags) -> RawRelease {
    t.check_keys(field_names::<RawRelease>(), diags);
    RawRelease {
        tasks: t.string_list("tasks", "tasks = [\"python manage.py migrate --noinput\"]", diags),
        post_tasks: t.string_list("post_tasks", "post_tasks = [\"python manage.py clearsessions\"]", diags),
        task_timeout: t.duration("task_timeout", diags),
        retain_releases: t.integer("retain_releases", "retain_releases = 5", diags),
        order: t.string_list("order", "order = [\"web\", \"worker\"]", diags),
    }
}

fn walk_processes(root: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<RawMap<Spanned<RawProcess>>>> {
    let example = "[processes.web]\ncommand = \"gunicorn blog.wsgi --bind 127.0.0.1:$PORT\"";
    let none = "no processes: nonstop.toml must define at least one [processes.NAME]";
    if root.get("processes").is_none() {
        diags.error(root.span.clone(), none, format!("add one, for example:\n{example}"));
        return None;
    }
    let processes = root.table("processes", example, diags)?;
    if processes.entries.is_empty() {
        diags.error(processes.span.clone(), none, format!("add one, for example:\n{example}"));
    }
    let mut entries = Vec::new();
    for (key, value) in processes.entries.iter() {
        let name = Spanned::new(key.span(), key.get_ref().to_string());
        match value.get_ref() {
            DeValue::Table(entries_of) => {
                let t = Table { entries: entries_of, span: value.span(), path: processes.child(key.get_ref()) };
                entries.push((name, Spanned::new(value.span(), walk_process(key.get_ref(), &t, diags))));
            }
            DeValue::String(command) => diags.error(
                value.span(),
                format!("{} must be a table, not a string", processes.describe_key(key.get_ref())),
                format!(
                    "write it as a table:\n[{}]\ncommand = {}",
                    processes.child(key.get_ref()),
                    toml_quote(command.as_ref())
                ),
            ),
            other => diags.error(
                value.span(),
                format!("{} must be a table, not {}", processes.describe_key(key.get_ref()), describe(other)),
                format!("write it as a table:\n[{}]\ncommand = \"...\"", processes.child(key.get_ref())),
            ),
        }
    }
    Some(Spanned::new(processes.span.clone(), RawMap(entries)))
}

fn walk_process(name: &str, t: &Table<'_, '_>, diags: &mut Diags) -> RawProcess {
    t.check_keys(field_names::<RawProcess>(), diags);
    // A misspelt `command` is reported as an unknown key, not twice.
    if t.get("command").is_none() && !t.has_misspelling_of("command", field_names::<RawProcess>()) {
        let kind = t.get("kind").and_then(|k| k.get_ref().as_str());
        let web = kind.map_or(name == "web", |k| k == "web");
        diags.error(
            t.span.clone(),
            format!("missing `command` in {}", t.display()),
            format!(
                "add the shell command that starts it, for example: command = \"{}\"",
                if web { "gunicorn blog.wsgi --bind 127.0.0.1:$PORT" } else { "celery -A blog worker" }
            ),
        );
    }
    RawProcess {
        command: t.string("command", "command = \"gunicorn blog.wsgi --bind 127.0.0.1:$PORT\"", diags),
        kind: t.string("kind", "kind = \"worker\"", diags),
        count: t.integer("count", "count = 2", diags),
        stop_signal: t.string("stop_signal", "stop_signal = \"SIGTERM\"", diags),
        stop_timeout: t.duration("stop_timeout", diags),
        drain_timeout: t.duration("drain_timeout", diags),
        ready_after: t.duration("ready_after", diags),
        env: t.env_map("env", diags),
        health: t.table("health", "path = \"/health/\"", diags).map(|h| h.map(walk_health, diags)),
        rollout: t.table("rollout", "max_surge = 1", diags).map(|r| r.map(walk_rollout, diags)),
        restart: t.table("restart", "crash_loop_after = 5", diags).map(|r| r.map(walk_restart, diags)),
        autoscale: t.table("autoscale", AUTOSCALE_EXAMPLE, diags).map(|a| {
            let shape = Shape::of(name, t.entries);
            a.map(|a, diags| walk_autoscale(a, Some(shape), diags), diags)
        }),
        queue: walk_queue(t, diags),
    }
}

fn walk_health(t: &Table<'_, '_>, diags: &mut Diags) -> RawHealth {
    t.check_keys(field_names::<RawHealth>(), diags);
    RawHealth {
        path: t.string("path", "path = \"/health/\"", diags),
        interval: t.duration("interval", diags),
        timeout: t.duration("timeout", diags),
        healthy_threshold: t.integer("healthy_threshold", "healthy_threshold = 2", diags),
        unhealthy_threshold: t.integer("unhealthy_threshold", "unhealthy_threshold = 3", diags),
        expect_status: t.int_or_string(
            "expect_status",
            "an HTTP status (200) or a range (\"200-399\")",
            "expect_status = \"200-399\"",
            diags,
        ),
        host: t.string("host", "host = \"notes.example.com\"", diags),
        smoke: walk_smoke(t, diags),
    }
}

const SMOKE_EXAMPLE: &str = "smoke = [\"/\", { path = \"/notes/\", expect_status = \"200-299\" }]";

/// `smoke`: a list of paths, or of `{ path, expect_status }` tables.
fn walk_smoke(t: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<Vec<Spanned<RawSmoke>>>> {
    let value = t.get("smoke")?;
    let DeValue::Array(items) = value.get_ref() else {
        if let DeValue::String(s) = value.get_ref() {
            diags.error(
                value.span(),
                format!("{} must be a list of paths, not a string", t.describe_key("smoke")),
                format!("put it in a list: smoke = [{}]", toml_quote(s)),
            );
        } else {
            t.type_error("smoke", value, "a list of paths", SMOKE_EXAMPLE, diags);
        }
        return None;
    };
    let mut out = Vec::new();
    for item in items.iter() {
        match item.get_ref() {
            DeValue::String(s) => out.push(Spanned::new(item.span(), RawSmoke::Path(s.to_string()))),
            DeValue::Table(entries) => {
                let entry = Table { entries, span: item.span(), path: t.child("smoke") };
                entry.check_keys(&["path", "expect_status"], diags);
                let path = entry.string("path", "path = \"/\"", diags);
                let expect = entry.int_or_string(
                    "expect_status",
                    "an HTTP status (200) or a range (\"200-399\")",
                    "expect_status = \"200-299\"",
                    diags,
                );
                match path {
                    Some(path) => out.push(Spanned::new(
                        item.span(),
                        RawSmoke::Check(RawSmokeCheck {
                            path: path.into_inner(),
                            expect_status: expect.map(Spanned::into_inner),
                        }),
                    )),
                    None if entry.get("path").is_none() => diags.error(
                        item.span(),
                        format!("an entry of {} has no `path`", t.describe_key("smoke")),
                        format!("for example: {SMOKE_EXAMPLE}"),
                    ),
                    None => {}
                }
            }
            other => diags.error(
                item.span(),
                format!("{} must contain paths or tables, not {}", t.describe_key("smoke"), describe(other)),
                format!("for example: {SMOKE_EXAMPLE}"),
            ),
        }
    }
    Some(Spanned::new(value.span(), out))
}

fn walk_rollout(t: &Table<'_, '_>, diags: &mut Diags) -> RawRollout {
    t.check_keys(field_names::<RawRollout>(), diags);
    let quantity = "a count (1) or a percentage (\"25%\")";
    RawRollout {
        max_surge: t.int_or_string("max_surge", quantity, "max_surge = 1", diags),
        max_unavailable: t.int_or_string("max_unavailable", quantity, "max_unavailable = \"25%\"", diags),
        health_timeout: t.duration("health_timeout", diags),
        canary: walk_canary(t, diags),
        canary_hold: t.duration("canary_hold", diags),
        canary_max_5xx_increase: t.number(
            "canary_max_5xx_increase",
            "a percentage (\"1%\")",
            "canary_max_5xx_increase = \"1%\"",
            diags,
        ),
        canary_max_p95_ratio: t.number("canary_max_p95_ratio", "a number (2.0)", "canary_max_p95_ratio = 2.0", diags),
        canary_p95_slack: t.duration("canary_p95_slack", diags),
        canary_min_requests: t.integer("canary_min_requests", "canary_min_requests = 20", diags),
    }
}

const CANARY_EXAMPLE: &str = "canary = [\"5%\", \"25%\"] (or canary = false for no ramp)";

/// `canary`: a list of percentages, or `false`. The values are checked
/// by `validate.rs` (which also answers a bare `5` with "5%").
fn walk_canary(t: &Table<'_, '_>, diags: &mut Diags) -> Option<Spanned<RawCanary>> {
    let value = t.get("canary")?;
    let what = t.describe_key("canary");
    match value.get_ref() {
        DeValue::Boolean(b) => Some(Spanned::new(value.span(), RawCanary::Switch(*b))),
        DeValue::Array(items) => {
            let mut out = Vec::new();
            for item in items.iter() {
                match item.get_ref() {
                    DeValue::String(s) => out.push(Spanned::new(item.span(), RawNumber::Text(s.to_string()))),
                    DeValue::Integer(_) => {
                        if let Some(i) = integer_value(item, &what, diags) {
                            out.push(Spanned::new(item.span(), RawNumber::Int(i.into_inner())));
                        }
                    }
                    DeValue::Float(f) => match float_value(f.as_str()) {
                        Some(x) => out.push(Spanned::new(item.span(), RawNumber::Float(x))),
                        None => diags.error(
                            item.span(),
                            format!("{what} has a number this platform cannot represent ({})", f.as_str()),
                            format!("for example: {CANARY_EXAMPLE}"),
                        ),
                    },
                    other => diags.error(
                        item.span(),
                        format!("{what} must contain percentages, not {}", describe(other)),
                        format!("for example: {CANARY_EXAMPLE}"),
                    ),
                }
            }
            Some(Spanned::new(value.span(), RawCanary::Steps(out)))
        }
        DeValue::String(s) => {
            let text = s.trim();
            let hint = if matches!(text.to_ascii_lowercase().as_str(), "false" | "off" | "none" | "no" | "") {
                "for no ramp, write it without quotes: canary = false".to_string()
            } else {
                let step = if text.ends_with('%') { text.to_string() } else { format!("{text}%") };
                format!("put it in a list: canary = [{}]", toml_quote(&step))
            };
            diags.error(value.span(), format!("{what} must be a list of percentages, not a string"), hint);
            None
        }
        DeValue::Integer(i) => {
            diags.error(
                value.span(),
                format!("{what} must be a list of percentages, not an integer"),
                format!("did you mean canary = [\"{}%\"]? {CANARY_EXAMPLE}", i.as_str()),
            );
            None
        }
        _ => {
            t.type_error("canary", value, "a list of percentages or false", CANARY_EXAMPLE, diags);
            None
        }
    }
}

/// A TOML float's text (`2.5`, `1e3`, `inf`, `1_000.5`) as an `f64`.
fn float_value(text: &str) -> Option<f64> {
    text.replace('_', "").parse::<f64>().ok()
}

fn walk_restart(t: &Table<'_, '_>, diags: &mut Diags) -> RawRestart {
    t.check_keys(field_names::<RawRestart>(), diags);
    RawRestart {
        backoff_initial: t.duration("backoff_initial", diags),
        backoff_max: t.duration("backoff_max", diags),
        reset_after: t.duration("reset_after", diags),
        crash_loop_after: t.integer("crash_loop_after", "crash_loop_after = 5", diags),
    }
}

/// A table being walked.
struct Table<'a, 'i> {
    entries: &'a DeTable<'i>,
    span: Span,
    /// Dotted path: `""` for the top level, `processes.web`, ...
    path: String,
}

impl<'a, 'i> Table<'a, 'i> {
    /// Walks this table into a raw type, keeping its location.
    fn map<T>(self, walk: impl FnOnce(&Table<'_, '_>, &mut Diags) -> T, diags: &mut Diags) -> Spanned<T> {
        Spanned::new(self.span.clone(), walk(&self, diags))
    }

    /// `[processes.web]`, or "the top level".
    fn display(&self) -> String {
        if self.path.is_empty() {
            "the top level".to_string()
        } else {
            format!("[{}]", self.path)
        }
    }

    /// "`count` in [processes.web]", or "`app`" at the top level.
    fn describe_key(&self, key: &str) -> String {
        if self.path.is_empty() {
            format!("`{}`", display_key(key))
        } else {
            format!("`{}` in [{}]", display_key(key), self.path)
        }
    }

    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            display_key(key)
        } else {
            format!("{}.{}", self.path, display_key(key))
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.entries.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v)
    }

    /// Is one of the unknown keys a misspelling of `key`?
    fn has_misspelling_of(&self, key: &str, valid: &[&str]) -> bool {
        self.entries.iter().any(|(k, _)| {
            let k: &str = k.get_ref();
            !valid.contains(&k) && did_you_mean(k, valid) == Some(key)
        })
    }

    /// Reports every key that is not one of `valid`.
    fn check_keys(&self, valid: &[&str], diags: &mut Diags) {
        self.check_keys_with(valid, diags, |_| None);
    }

    /// [`Self::check_keys`], with a better hint than "did you mean" for
    /// some keys (`special` gives it, or `None`).
    fn check_keys_with(&self, valid: &[&str], diags: &mut Diags, special: impl Fn(&str) -> Option<String>) {
        for (key, _) in self.entries.iter() {
            let key_str: &str = key.get_ref();
            if valid.contains(&key_str) {
                continue;
            }
            let list = valid.join(", ");
            let top_level = ["app", "build"];
            let hint = match did_you_mean(key_str, valid) {
                _ if !self.path.is_empty() && top_level.contains(&key_str) => format!(
                    "`{key_str}` is a top-level key: a key after a [table] header belongs to that table, so move this line above the first [table]"
                ),
                Some(s) if s != key_str.to_ascii_lowercase() && special(key_str).is_some() => {
                    special(key_str).unwrap_or_default()
                }
                Some(s) => format!("did you mean `{s}`? valid keys: {list}"),
                None => special(key_str).unwrap_or_else(|| format!("valid keys: {list}")),
            };
            let message = if self.path.is_empty() {
                format!("unknown key `{}` at the top level", display_key(key_str))
            } else {
                format!("unknown key `{}` in {}", display_key(key_str), self.display())
            };
            diags.error(key.span(), message, hint);
        }
    }

    fn type_error(&self, key: &str, value: &Value<'_>, expected: &str, example: &str, diags: &mut Diags) {
        diags.error(
            value.span(),
            format!("{} must be {expected}, not {}", self.describe_key(key), describe(value.get_ref())),
            format!("for example: {example}"),
        );
    }

    fn string(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Spanned<String>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::String(s) => Some(Spanned::new(value.span(), s.to_string())),
            _ => {
                self.type_error(key, value, "a string", example, diags);
                None
            }
        }
    }

    fn boolean(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Spanned<bool>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Boolean(b) => Some(Spanned::new(value.span(), *b)),
            DeValue::String(s) if matches!(s.trim(), "true" | "false") => {
                diags.error(
                    value.span(),
                    format!("{} must be a boolean, not a string", self.describe_key(key)),
                    format!("remove the quotes: {} = {}", display_key(key), s.trim()),
                );
                None
            }
            _ => {
                self.type_error(key, value, "a boolean (true or false)", example, diags);
                None
            }
        }
    }

    fn integer(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Spanned<i64>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Integer(_) => integer_value(value, &self.describe_key(key), diags),
            DeValue::String(s) if s.trim().parse::<i64>().is_ok() => {
                diags.error(
                    value.span(),
                    format!("{} must be an integer, not a string", self.describe_key(key)),
                    format!("remove the quotes: {} = {}", display_key(key), s.trim()),
                );
                None
            }
            _ => {
                self.type_error(key, value, "an integer", example, diags);
                None
            }
        }
    }

    fn duration(&self, key: &str, diags: &mut Diags) -> Option<Spanned<RawDuration>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Integer(_) => integer_value(value, &self.describe_key(key), diags)
                .map(|i| Spanned::new(i.span(), RawDuration::Seconds(*i.get_ref()))),
            DeValue::String(s) => Some(Spanned::new(value.span(), RawDuration::Text(s.to_string()))),
            DeValue::Float(f) => {
                diags.error(
                    value.span(),
                    format!("{} must be a duration, not a float", self.describe_key(key)),
                    format!(
                        "use a smaller unit instead of a fraction (\"{}ms\" for {}); durations are {DURATION_FORMS}",
                        f.as_str().parse::<f64>().map(|s| (s * 1000.0).round() as i64).unwrap_or(1500),
                        f.as_str()
                    ),
                );
                None
            }
            other => {
                diags.error(
                    value.span(),
                    format!("{} must be a duration, not {}", self.describe_key(key), describe(other)),
                    format!("durations are {DURATION_FORMS}"),
                );
                None
            }
        }
    }

    /// An integer, a float or a string; which ones are right is decided
    /// by `validate.rs`, which knows the fix for each.
    fn number(&self, key: &str, expected: &str, example: &str, diags: &mut Diags) -> Option<Spanned<RawNumber>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Integer(_) => integer_value(value, &self.describe_key(key), diags)
                .map(|i| Spanned::new(i.span(), RawNumber::Int(*i.get_ref()))),
            DeValue::Float(f) => match float_value(f.as_str()) {
                Some(x) => Some(Spanned::new(value.span(), RawNumber::Float(x))),
                None => {
                    self.type_error(key, value, expected, example, diags);
                    None
                }
            },
            DeValue::String(s) => Some(Spanned::new(value.span(), RawNumber::Text(s.to_string()))),
            _ => {
                self.type_error(key, value, expected, example, diags);
                None
            }
        }
    }

    fn int_or_string(
        &self,
        key: &str,
        expected: &str,
        example: &str,
        diags: &mut Diags,
    ) -> Option<Spanned<RawIntOrString>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Integer(_) => integer_value(value, &self.describe_key(key), diags)
                .map(|i| Spanned::new(i.span(), RawIntOrString::Int(*i.get_ref()))),
            DeValue::String(s) => Some(Spanned::new(value.span(), RawIntOrString::Text(s.to_string()))),
            _ => {
                self.type_error(key, value, expected, example, diags);
                None
            }
        }
    }

    fn string_list(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Spanned<Vec<Spanned<String>>>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Array(items) => Some(Spanned::new(value.span(), self.strings_in(key, items, diags))),
            DeValue::String(s) => {
                diags.error(
                    value.span(),
                    format!("{} must be a list of strings, not a string", self.describe_key(key)),
                    format!("put it in a list: {} = [{}]", display_key(key), toml_quote(s)),
                );
                None
            }
            _ => {
                self.type_error(key, value, "a list of strings", example, diags);
                None
            }
        }
    }

    fn strings_in(&self, key: &str, items: &DeArray<'_>, diags: &mut Diags) -> Vec<Spanned<String>> {
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(Spanned::new(item.span(), s.to_string())),
                other => diags.error(
                    item.span(),
                    format!("{} must contain only strings, not {}", self.describe_key(key), describe(other)),
                    "quote each item: [\"first\", \"second\"]",
                ),
            }
        }
        out
    }

    /// A sub-table, or a type error if the key holds something else.
    fn table(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Table<'a, 'i>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Table(entries) => Some(Table { entries, span: value.span(), path: self.child(key) }),
            other => {
                diags.error(
                    value.span(),
                    format!("{} must be a table, not {}", self.describe_key(key), describe(other)),
                    if example.starts_with('[') {
                        format!("write it as a table:\n{example}")
                    } else {
                        format!("write it as a table:\n[{}]\n{example}", self.child(key))
                    },
                );
                None
            }
        }
    }

    /// `[env]`-style table: free-form names, scalar values.
    fn env_map(&self, key: &str, diags: &mut Diags) -> Option<Spanned<RawMap<Spanned<RawScalar>>>> {
        let t = self.table(key, "DJANGO_SETTINGS_MODULE = \"blog.settings\"", diags)?;
        let mut entries = Vec::new();
        for (name, value) in t.entries.iter() {
            let scalar = match value.get_ref() {
                DeValue::String(s) => Some(RawScalar::String(s.to_string())),
                DeValue::Integer(_) => integer_value(value, &t.describe_key(name.get_ref()), diags)
                    .map(|i| RawScalar::Integer(i.into_inner())),
                DeValue::Float(f) => match f.as_str().replace('_', "").parse::<f64>() {
                    Ok(x) => Some(RawScalar::Float(x)),
                    Err(_) => {
                        diags.error(
                            value.span(),
                            format!("{} is not a number this platform can represent", t.describe_key(name.get_ref())),
                            "quote it to pass it through as written",
                        );
                        None
                    }
                },
                DeValue::Boolean(b) => Some(RawScalar::Boolean(*b)),
                other => {
                    let hint = if matches!(other, DeValue::Datetime(_)) {
                        "quote it: environment values are strings".to_string()
                    } else {
                        format!(
                            "environment values are strings, numbers or booleans: {} = \"value\"",
                            display_key(name.get_ref())
                        )
                    };
                    diags.error(
                        value.span(),
                        format!(
                            "{} must be a string, a number or a boolean, not {}",
                            t.describe_key(name.get_ref()),
                            describe(other)
                        ),
                        hint,
                    );
                    None
                }
            };
            if let Some(scalar) = scalar {
                entries
                    .push((Spanned::new(name.span(), name.get_ref().to_string()), Spanned::new(value.span(), scalar)));
            }
        }
        Some(Spanned::new(t.span.clone(), RawMap(entries)))
    }
}

/// Is `key` set in a table below the top level?
fn contains_key_deep(table: &DeTable<'_>, key: &str) -> bool {
    table.iter().any(|(_, v)| match v.get_ref() {
        DeValue::Table(t) => t.iter().any(|(k, _)| k.get_ref() == key) || contains_key_deep(t, key),
        _ => false,
    })
}

/// An integer value, or an error if it does not fit an `i64`.
fn integer_value(value: &Value<'_>, what: &str, diags: &mut Diags) -> Option<Spanned<i64>> {
    let DeValue::Integer(i) = value.get_ref() else {
        return None;
    };
    match i64::from_str_radix(i.as_str(), i.radix()) {
        Ok(n) => Some(Spanned::new(value.span(), n)),
        Err(_) => {
            diags.error(value.span(), format!("{what} is too large"), None);
            None
        }
    }
}

/// "a string", "an integer", ... for messages.
pub(crate) fn describe(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "a list",
        DeValue::Table(_) => "a table",
    }
}

/// A key as it would be written in TOML: bare if possible, else quoted.
pub(crate) fn display_key(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        key.to_string()
    } else {
        toml_quote(key)
    }
}

/// A TOML basic string literal for `s`.
pub(crate) fn toml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_round_trips_through_toml() {
        for s in ["plain", "with \"quotes\"", "back\\slash", "tab\there", "nl\nx", "bell\u{7}", "$PORT 'x'"] {
            let doc = format!("v = {}", toml_quote(s));
            let (table, errors) = DeTable::parse_recoverable(&doc);
            assert!(errors.is_empty(), "{doc}");
            let v = table.get_ref().iter().next().unwrap().1;
            assert_eq!(v.get_ref().as_str(), Some(s));
        }
    }

    #[test]
    fn keys_are_quoted_only_when_needed() {
        assert_eq!(display_key("web"), "web");
        assert_eq!(display_key("celery-beat_2"), "celery-beat_2");
        assert_eq!(display_key("my app"), "\"my app\"");
        assert_eq!(display_key(""), "\"\"");
    }
}
