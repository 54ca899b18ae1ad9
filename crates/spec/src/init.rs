//! `nonstop init`: a commented `nonstop.toml` from a Heroku/Dokku Procfile
//! (or a template without one).

use crate::defaults::*;
use crate::duration::format_duration;
use crate::walk::toml_quote;
use nonstop_core::environment::{DEFAULT_ENVIRONMENT, DEFAULT_HOST_DOMAIN, ENVIRONMENT_VAR};
use nonstop_core::ids::{AppName, ProcessName};
use std::fmt::Write as _;

/// Why `init_toml` could not produce a file. Each names the Procfile line
/// (1-based) and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("invalid app name {name:?}: use 1 to 63 characters: lowercase letters, digits and '-', starting with a letter (for example {suggestion:?})")]
    InvalidAppName { name: String, suggestion: String },
    #[error("Procfile line {line}: {reason}: {text:?} (lines are `name: command`; comments start with #)")]
    InvalidLine { line: usize, text: String, reason: String },
    #[error("Procfile line {line}: invalid process name {name:?}: {rule} (rename it, for example to {suggestion:?})")]
    InvalidProcessName { line: usize, name: String, rule: &'static str, suggestion: String },
    #[error("Procfile line {line}: `{name}` is defined twice (first on line {first}); keep one of them")]
    Duplicate { line: usize, name: String, first: usize },
    #[error("the Procfile defines no process (only comments, blank lines or a release: line); add one such as `web: gunicorn blog.wsgi`")]
    NoProcesses,
}

/// One `name: command` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    line: usize,
    name: String,
    command: String,
}

fn parse_procfile(procfile: &str) -> Result<Vec<Entry>, InitError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, raw_line) in procfile.lines().enumerate() {
        let line = i + 1;
        let text = raw_line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let invalid =
            |reason: &str| InitError::InvalidLine { line, text: text.to_string(), reason: reason.to_string() };
        let Some((name, command)) = text.split_once(':') else {
            return Err(invalid("there is no ':' after the process name"));
        };
        let (name, command) = (name.trim(), command.trim());
        if name.is_empty() {
            return Err(invalid("the process name is missing"));
        }
        if name.chars().any(char::is_whitespace) {
            return Err(invalid("the process name contains a space"));
        }
        if command.is_empty() {
            return Err(invalid("the command is empty"));
        }
        if name != "release" {
            if let Err(err) = ProcessName::new(name) {
                return Err(InitError::InvalidProcessName {
                    line,
                    name: name.to_string(),
                    rule: err.rule,
                    suggestion: crate::sanitize_app_name(name),
                });
            }
        }
        if let Some(first) = entries.iter().find(|e| e.name == name) {
            return Err(InitError::Duplicate { line, name: name.to_string(), first: first.line });
        }
        entries.push(Entry { line, name: name.to_string(), command: command.to_string() });
    }
    Ok(entries)
}

/// Does the command mention `$PORT`?
fn uses_port_variable(command: &str) -> bool {
    command.contains("$PORT") || command.contains("${PORT")
}

/// A port number the command binds explicitly (`--bind 0.0.0.0:8000`,
/// `runserver 8000`, `-p 3000`), if any.
fn fixed_port(command: &str) -> Option<u16> {
    let tokens: Vec<&str> = command.split(|c: char| c.is_whitespace() || c == '=').filter(|t| !t.is_empty()).collect();
    for (i, token) in tokens.iter().enumerate() {
        let token = token.trim_matches(|c| c == '"' || c == '\'');
        let previous = i.checked_sub(1).map(|p| tokens[p]);
        let port_flag = matches!(previous, Some("-p" | "--port" | "-P" | "runserver" | "--listen" | "-l"));
        if port_flag {
            if let Ok(port) = token.parse::<u16>() {
                return Some(port);
            }
        }
        let address = token.rsplit("://").next().unwrap_or(token);
        if let Some((host, port)) = address.rsplit_once(':') {
            let host_like = host.is_empty()
                || host == "localhost"
                || host.starts_with('[')
                || host.parse::<std::net::Ipv4Addr>().is_ok();
            if host_like && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(port) = port.parse::<u16>() {
                    return Some(port);
                }
            }
        }
    }
    None
}

/// A scheduler must run exactly once: celery beat, clock processes.
fn looks_like_scheduler(name: &str, command: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let lower = command.to_ascii_lowercase();
    let words: Vec<&str> = command.split_whitespace().collect();
    ["beat", "clock", "scheduler", "cron"].iter().any(|k| name.contains(k))
        || (lower.contains("celery")
            && (lower.split_whitespace().any(|w| w == "beat" || w == "--beat") || words.contains(&"-B")))
        || lower.contains("clockwork")
        || lower.contains("rqscheduler")
}

const HEADER_TAIL: &str = "\
# Durations are seconds (10) or strings with units (\"250ms\", \"2s\", \"1m30s\").
# A commented-out key shows its default.
";

/// Generates a commented `nonstop.toml`.
///
/// With a Procfile: `web` becomes a web process (health-checked, gets
/// `$PORT`); `release:` becomes `[release] tasks`; schedulers (`beat`,
/// `clock`, `scheduler`, celery with beat) become singletons; the rest
/// are workers. Without one: a template whose web process is commented
/// out, to be filled in.
///
/// The output always parses; with a Procfile it also validates.
pub fn init_toml(app_name: &str, procfile: Option<&str>) -> Result<String, InitError> {
    if AppName::new(app_name).is_err() || app_name.contains('_') {
        return Err(InitError::InvalidAppName {
            name: app_name.to_string(),
            suggestion: crate::sanitize_app_name(app_name),
        });
    }
    let entries = match procfile {
        Some(p) => Some(parse_procfile(p)?),
        None => None,
    };
    let mut out = String::new();
    let source = if entries.is_some() { "from the Procfile" } else { "without a Procfile" };
    let _ = writeln!(out, "# nonstop.toml for {app_name}, generated by `nonstop init` {source}.");
    out.push_str(HEADER_TAIL);
    let _ = writeln!(out, "\napp = {}", toml_quote(app_name));
    let _ = writeln!(
        out,
        "# The environment commands use without -e or {ENVIRONMENT_VAR} (see [environments] at the end).\n\
         # environment = {}",
        toml_quote(DEFAULT_ENVIRONMENT)
    );
    out.push_str(
        "\n# Commands run once per release, in order (deploys).\n\
         # build = [\"pip install -r requirements.txt\", \"python manage.py collectstatic --noinput\"]\n",
    );
    out.push_str(
        "\n# Plain environment variables for every process ($PORT and NONSTOP_* are reserved).\n\
         [env]\n\
         # DJANGO_SETTINGS_MODULE = \"blog.settings\"\n",
    );
    let _ = write!(
        out,
        "\n[proxy]\n\
         # Where the proxy listens for HTTP; the NONSTOP_PROXY_LISTEN environment variable overrides it.\n\
         listen = {}\n",
        toml_quote(DEFAULT_PROXY_LISTEN)
    );

    let release = entries.iter().flatten().find(|e| e.name == "release");
    out.push_str("\n[release]\n# Run once per deploy, after the build and before any instance is replaced.\n");
    match release {
        Some(e) => {
            let _ = writeln!(out, "tasks = [{}]  # the Procfile's release: line", toml_quote(&e.command));
        }
        None => out.push_str("# tasks = [\"python manage.py migrate --noinput\"]\n"),
    }
    let _ = write!(
        out,
        "# Run once after a successful deploy.\n\
         # post_tasks = []\n\
         # task_timeout = \"{}\"\n\
         # retain_releases = {DEFAULT_RETAIN_RELEASES}\n\
         # Rollout order of the process types (by default: web, then workers, then singletons).\n\
         # order = [\"web\", \"worker\"]\n",
        format_duration(DEFAULT_TASK_TIMEOUT)
    );
    out.push_str(
        "\n# The app's PostgreSQL database. Every process and task gets DATABASE_URL (or the\n\
         # variables [database.env] maps), and each deploy runs the release tasks on a scratch\n\
         # copy of the schema first: a migration that breaks the running release (a renamed or\n\
         # dropped column...) is refused before it touches the database.\n\
         # [database]\n\
         # url = \"${DATABASE_URL}\"\n",
    );

    let first = match entries {
        None => {
            out.push_str(TEMPLATE_PROCESSES);
            "web".to_string()
        }
        Some(entries) => {
            let processes: Vec<&Entry> = entries.iter().filter(|e| e.name != "release").collect();
            if processes.is_empty() {
                return Err(InitError::NoProcesses);
            }
            for e in &processes {
                write_process(&mut out, e);
            }
            processes.iter().find(|e| e.name == "web").unwrap_or(&processes[0]).name.clone()
        }
    };
    write_environments(&mut out, app_name, &first);
    Ok(out)
}

/// The start of the commented `[environments]` example.
pub(crate) const ENVIRONMENTS_HEADING: &str = "\n# Environments: the same releases deployed";

/// A commented example of an environment, overriding `process`.
fn write_environments(out: &mut String, app: &str, process: &str) {
    let _ = write!(
        out,
        "{ENVIRONMENTS_HEADING} more than once (`nonstop deploy -e staging`,\n\
         # or {ENVIRONMENT_VAR}=staging). A table below changes the settings above for one environment;\n\
         # an environment without one (one created later for a branch, say) gets them as they are.\n\
         # Without `hosts`, an environment answers on NAME.{app}.{DEFAULT_HOST_DOMAIN}.\n\
         # [environments.staging]\n\
         # hosts = [\"staging.{app}.example.com\"]  # \"*.{app}.example.com\": any one label in front\n\
         # protected = false  # true: commands that destroy it or drop its data refuse it\n\
         # default = false    # true: it also answers the hosts no environment claims\n\
         # [environments.staging.env]  # over [env], and over each process's env\n\
         # LOG_LEVEL = \"debug\"\n\
         # [environments.staging.processes.{process}]  # count, env, health and rollout keys\n\
         # count = 1\n\
         # [environments.staging.database]\n\
         # url = \"${{STAGING_DATABASE_URL}}\"\n\
         #\n\
         # Servers the environments share (one PostgreSQL server with a database per environment).\n\
         # [base]\n\
         # postgres = \"postgres://admin@127.0.0.1:5432/\"\n\
         # redis = \"redis://127.0.0.1:6379\"\n",
    );
}

/// The smoke paths `init` suggests: the home page, and for a Django app
/// (a WSGI/ASGI server or manage.py) a static file every Django project
/// with the admin has after `collectstatic`.
fn smoke_suggestion(command: &str) -> &'static str {
    let django = ["wsgi", "asgi", "manage.py"].iter().any(|w| command.contains(w));
    if django {
        "\"/\", \"/static/admin/css/base.css\""
    } else {
        "\"/\""
    }
}

fn write_process(out: &mut String, e: &Entry) {
    let _ = writeln!(out, "\n[processes.{}]", e.name);
    if e.name == "web" {
        out.push_str("# Gets its own port in $PORT, is health-checked and receives HTTP from the proxy.\n");
        out.push_str("kind = \"web\"\n");
        let _ = writeln!(out, "command = {}", toml_quote(&e.command));
        if let Some(port) = fixed_port(&e.command).filter(|_| !uses_port_variable(&e.command)) {
            let _ = writeln!(
                out,
                "# NOTE: this command binds a fixed port ({port}). During a deploy old and new instances run\n\
                 # side by side, each on its own $PORT, so a fixed port makes the second one fail to start.\n\
                 # Listen on $PORT instead, for example: --bind 127.0.0.1:$PORT"
            );
        } else if !uses_port_variable(&e.command) {
            out.push_str(
                "# NOTE: this command does not mention $PORT. Each web instance gets its own port in $PORT\n\
                 # and must listen on it: gunicorn does so by itself; other servers need, for example,\n\
                 # --bind 127.0.0.1:$PORT\n",
            );
        }
        let _ = write!(
            out,
            "count = {DEFAULT_COUNT}\n\
             # stop_signal = \"{}\"\n\
             # stop_timeout = \"{}\"\n\
             # drain_timeout = \"{}\"  # time in-flight requests get before the instance is stopped\n\
             \n\
             # [processes.web.health]\n\
             # path = \"{DEFAULT_HEALTH_PATH}\"\n\
             # interval = \"{}\"\n\
             # timeout = \"{}\"\n\
             # healthy_threshold = {DEFAULT_HEALTHY_THRESHOLD}\n\
             # unhealthy_threshold = {DEFAULT_UNHEALTHY_THRESHOLD}\n\
             # expect_status = \"{}-{}\"\n\
             # Pages (and a static file) every new instance must serve (2xx/3xx) before it gets a\n\
             # client request: a health view that skips the database and the templates answers 200\n\
             # for a release whose pages answer 500. Paths under a [static] url are checked in the\n\
             # built release's files instead (a build that forgot collectstatic).\n\
             # smoke = [{}]\n\
             \n\
             # [processes.web.rollout]\n\
             # max_surge = 1        # a count or a percentage such as \"25%\"\n\
             # max_unavailable = 0\n\
             # health_timeout = \"{}\"\n\
             # A new release first gets these shares of the requests, and is rolled back if its\n\
             # 5xx rate or p95 is worse than the old release's by more than the margins (false: no ramp).\n\
             # canary = [{}]\n\
             # canary_hold = \"{}\"\n\
             # canary_max_5xx_increase = \"{}\"\n\
             # canary_max_p95_ratio = {:.1}\n\
             # canary_p95_slack = \"{}\"\n\
             # canary_min_requests = {DEFAULT_CANARY_MIN_REQUESTS}\n",
            DEFAULT_STOP_SIGNAL.name(),
            format_duration(DEFAULT_STOP_TIMEOUT),
            format_duration(DEFAULT_DRAIN_TIMEOUT),
            format_duration(DEFAULT_HEALTH_INTERVAL),
            format_duration(DEFAULT_HEALTH_TIMEOUT),
            DEFAULT_EXPECT_STATUS.min,
            DEFAULT_EXPECT_STATUS.max,
            smoke_suggestion(&e.command),
            format_duration(DEFAULT_ROLLOUT_HEALTH_TIMEOUT),
            DEFAULT_CANARY_STEPS.iter().map(|n| format!("\"{n}%\"")).collect::<Vec<_>>().join(", "),
            format_duration(DEFAULT_CANARY_HOLD),
            crate::canary::format_basis_points(DEFAULT_CANARY_MAX_5XX_INCREASE_BP),
            f64::from(DEFAULT_CANARY_MAX_P95_RATIO_PCT) / 100.0,
            format_duration(DEFAULT_CANARY_P95_SLACK),
        );
    } else if looks_like_scheduler(&e.name, &e.command) {
        out.push_str(
            "# A singleton: never more than one instance, not even during a deploy\n\
             # (two schedulers would run every scheduled task twice).\n\
             kind = \"singleton\"\n",
        );
        let _ = write!(
            out,
            "command = {}\n\
             count = 1  # 0 or 1\n\
             # ready_after = \"{}\"\n",
            toml_quote(&e.command),
            format_duration(DEFAULT_READY_AFTER)
        );
    } else {
        let _ = write!(
            out,
            "# A worker: no port; ready once it has stayed up for ready_after.\n\
             kind = \"worker\"\n\
             command = {}\n\
             count = {DEFAULT_COUNT}\n\
             # ready_after = \"{}\"\n\
             # stop_timeout = \"{}\"\n",
            toml_quote(&e.command),
            format_duration(DEFAULT_READY_AFTER),
            format_duration(DEFAULT_STOP_TIMEOUT),
        );
    }
}

/// Processes of the template without a Procfile: commented out, since we
/// cannot guess the commands. Each line starts with "# " exactly, so that
/// removing it gives a working example.
pub(crate) const TEMPLATE_PROCESSES: &str = "
# No Procfile was found, so no process is defined yet: at least one is required.
# Uncomment and adapt the web process below (and the others you need).
# Each web instance gets its own port in $PORT and must listen on it.

# [processes.web]
# kind = \"web\"
# command = \"gunicorn blog.wsgi --bind 127.0.0.1:$PORT\"
# count = 2

# [processes.worker]
# kind = \"worker\"
# command = \"celery -A blog worker\"

# [processes.beat]
# kind = \"singleton\"
# command = \"celery -A blog beat\"
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procfile_lines_are_parsed() {
        let entries = parse_procfile("# comment\n\n  web: gunicorn x.wsgi  \r\nworker:celery -A x worker\n").unwrap();
        assert_eq!(
            entries,
            vec![
                Entry { line: 3, name: "web".into(), command: "gunicorn x.wsgi".into() },
                Entry { line: 4, name: "worker".into(), command: "celery -A x worker".into() },
            ]
        );
        // The command may contain colons.
        let entries = parse_procfile("web: gunicorn --bind 0.0.0.0:$PORT x:app").unwrap();
        assert_eq!(entries[0].command, "gunicorn --bind 0.0.0.0:$PORT x:app");
    }

    #[test]
    fn invalid_procfile_lines_are_named() {
        let err = parse_procfile("web: ok\njust a command\n").unwrap_err();
        assert_eq!(
            err,
            InitError::InvalidLine {
                line: 2,
                text: "just a command".into(),
                reason: "there is no ':' after the process name".into()
            }
        );
        assert!(err.to_string().starts_with("Procfile line 2: there is no ':'"), "{err}");
        assert!(matches!(parse_procfile(": x"), Err(InitError::InvalidLine { line: 1, .. })));
        assert!(
            matches!(parse_procfile("web:   "), Err(InitError::InvalidLine { line: 1, ref reason, .. }) if reason == "the command is empty")
        );
        assert!(matches!(parse_procfile("my web: x"), Err(InitError::InvalidLine { line: 1, .. })));
        let err = parse_procfile("\nWeb: x").unwrap_err();
        assert!(
            matches!(err, InitError::InvalidProcessName { line: 2, ref suggestion, .. } if suggestion == "web"),
            "{err:?}"
        );
        let err = parse_procfile("web: a\nworker: b\nweb: c").unwrap_err();
        assert_eq!(err, InitError::Duplicate { line: 3, name: "web".into(), first: 1 });
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn ports_are_detected() {
        assert_eq!(fixed_port("gunicorn x.wsgi --bind 0.0.0.0:8000"), Some(8000));
        assert_eq!(fixed_port("gunicorn x.wsgi -b :5000"), Some(5000));
        assert_eq!(fixed_port("gunicorn x.wsgi --bind=127.0.0.1:8000"), Some(8000));
        assert_eq!(fixed_port("python manage.py runserver 0.0.0.0:8000"), Some(8000));
        assert_eq!(fixed_port("python manage.py runserver 8000"), Some(8000));
        assert_eq!(fixed_port("bundle exec puma -p 3000"), Some(3000));
        assert_eq!(fixed_port("puma -b tcp://0.0.0.0:3000"), Some(3000));
        assert_eq!(fixed_port("uvicorn app.main:app --port 8000"), Some(8000));
        assert_eq!(fixed_port("uvicorn app.main:app"), None);
        assert_eq!(fixed_port("gunicorn x.wsgi"), None);
        assert_eq!(fixed_port("gunicorn x.wsgi --bind 0.0.0.0:$PORT"), None);
        assert!(uses_port_variable("x --bind 127.0.0.1:$PORT"));
        assert!(uses_port_variable("x --port ${PORT:-8000}"));
        assert!(!uses_port_variable("gunicorn x.wsgi"));
    }

    #[test]
    fn schedulers_are_detected() {
        assert!(looks_like_scheduler("beat", "celery -A x beat"));
        assert!(looks_like_scheduler("celerybeat", "whatever"));
        assert!(looks_like_scheduler("clock", "python clock.py"));
        assert!(looks_like_scheduler("scheduler", "python manage.py run_scheduler"));
        assert!(looks_like_scheduler("jobs", "celery -A x beat -l info"));
        assert!(looks_like_scheduler("worker", "celery -A x worker -B"));
        assert!(looks_like_scheduler("worker", "celery -A x worker --beat"));
        assert!(looks_like_scheduler("sched", "bundle exec clockwork clock.rb"));
        assert!(!looks_like_scheduler("worker", "celery -A x worker"));
        assert!(!looks_like_scheduler("worker", "celery -A beatles worker -b redis://"));
        assert!(!looks_like_scheduler("worker", "rq worker"));
    }

    #[test]
    fn bad_app_names_are_refused() {
        let err = init_toml("My App", None).unwrap_err();
        assert_eq!(err, InitError::InvalidAppName { name: "My App".into(), suggestion: "my-app".into() });
        assert!(init_toml("my_app", None).is_err());
    }

    #[test]
    fn a_procfile_without_processes_is_refused() {
        assert_eq!(init_toml("blog", Some("# nothing\n")), Err(InitError::NoProcesses));
        assert_eq!(init_toml("blog", Some("release: python manage.py migrate\n")), Err(InitError::NoProcesses));
    }

    #[test]
    fn a_django_app_gets_a_page_and_an_asset_as_smoke_suggestions() {
        let django = init_toml("blog", Some("web: gunicorn blog.wsgi\n")).unwrap();
        assert!(django.contains("# smoke = [\"/\", \"/static/admin/css/base.css\"]"), "{django}");
        let other = init_toml("api", Some("web: ./server --port $PORT\n")).unwrap();
        assert!(other.contains("# smoke = [\"/\"]"), "{other}");
        // Uncommented, the suggestion is valid.
        let uncommented =
            django.replace("# [processes.web.health]", "[processes.web.health]").replace("# smoke = ", "smoke = ");
        crate::parse(&uncommented, std::path::Path::new("nonstop.toml"), &()).unwrap();
    }
}
