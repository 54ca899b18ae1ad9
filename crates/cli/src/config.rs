//! `nonstop config set|unset|get`: the client side.
//!
//! Every check the daemon makes on names and values is made here first
//! (names, `NAME=VALUE`, values that look like credentials), so that a
//! mistake is named before anything is sent. `get` shows the effective
//! variables of the environment and where each comes from; it reads the
//! `nonstop.toml` of the current directory (when it is the app's) to tell
//! `[env]` from `[environments.ENV.env]`.

use crate::commands::{client, emit, ensure_daemon, fmt_time, run_op_waiting, scoped_app, who};
use crate::home::Home;
use nonstop_api::client::ClientError;
use nonstop_api::config::{ConfigSetRequest, ConfigUnsetRequest};
use nonstop_core::config::{parse_assignments, parse_names};
use nonstop_engine::ConfigReport;
use serde::Serialize;
use std::collections::BTreeMap;

/// `nonstop config set|unset|get`.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigAction {
    /// Set variables: a new release of the running build with them, rolled
    /// out with zero downtime (nothing is rebuilt). The environment's
    /// processes get them over nonstop.toml's `[env]`; secrets and
    /// `[database]` win over them. Values are stored and shown in clear:
    /// a value that looks like a credential is refused (use `nonstop
    /// secrets set`), unless --force. When the environment runs nothing
    /// yet, the values are stored for its next up, deploy or promote.
    #[command(
        after_help = "Examples:\n  nonstop config set GREETING=hello\n  nonstop config set -e production WEB_CONCURRENCY=4 FEATURE_X=on\n  nonstop config set 'MOTD=a value with spaces and = signs'"
    )]
    Set {
        /// NAME=VALUE pairs (split at the first `=`; an empty value is a value).
        #[arg(required = true, value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Keep a value that looks like a credential as plain config.
        #[arg(long)]
        force: bool,
        /// If another operation is running, wait for it instead of failing.
        #[arg(long)]
        wait: bool,
        /// Print progress events and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Unset variables set by `config set`: a new release of the running
    /// build without them (nonstop.toml's value, if it has one, applies
    /// again), rolled out with zero downtime.
    #[command(
        after_help = "Examples:\n  nonstop config unset GREETING\n  nonstop config unset -e staging FEATURE_X FEATURE_Y"
    )]
    Unset {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// If another operation is running, wait for it instead of failing.
        #[arg(long)]
        wait: bool,
        /// Print progress events and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// The variables the environment's processes get, and where each comes
    /// from: nonstop.toml's `[env]`, its `[environments.ENV.env]`, a
    /// process's own env, `config set`, a secret (value never shown) or
    /// `[database]`. With NAME: that variable's value alone.
    #[command(
        after_help = "Examples:\n  nonstop config get\n  nonstop config get -e production --json\n  nonstop config get GREETING"
    )]
    Get {
        /// One variable: print its value.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Bad input: said, nothing sent; exit code 2.
fn refuse(message: &str, json: bool) -> i32 {
    if json {
        emit(&serde_json::json!({"type": "error", "exit_code": 2, "message": message}).to_string());
    } else {
        eprintln!("error: {message}");
    }
    2
}

pub(crate) async fn config(home: &Home, action: ConfigAction) -> anyhow::Result<i32> {
    match action {
        ConfigAction::Set { vars, force, wait, json } => set(home, vars, force, wait, json).await,
        ConfigAction::Unset { names, wait, json } => unset(home, names, wait, json).await,
        ConfigAction::Get { name, json } => get(home, name, json).await,
    }
}

async fn set(home: &Home, vars: Vec<String>, force: bool, wait: bool, json: bool) -> anyhow::Result<i32> {
    let vars = match parse_assignments(&vars) {
        Ok(v) => v,
        Err(e) => return Ok(refuse(&e.to_string(), json)),
    };
    if !force {
        if let Some(reason) = vars.iter().find_map(|(n, v)| nonstop_engine::credential_refusal(n, v)) {
            return Ok(refuse(&reason, json));
        }
    }
    // Config may be set before the environment's first deploy: the
    // daemon keeps it.
    ensure_daemon(home, None).await?;
    let request =
        ConfigSetRequest { vars: vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), force, who: who() };
    run_op_waiting(&client(home), "/v1/config/set", &request, wait, json).await
}

async fn unset(home: &Home, names: Vec<String>, wait: bool, json: bool) -> anyhow::Result<i32> {
    let names = match parse_names(&names) {
        Ok(n) => n,
        Err(e) => return Ok(refuse(&e.to_string(), json)),
    };
    let request = ConfigUnsetRequest { names: names.into_iter().map(|n| n.to_string()).collect(), who: who() };
    run_op_waiting(&client(home), "/v1/config/unset", &request, wait, json).await
}

/// One variable as `config get` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Row {
    pub name: String,
    /// A process type whose own value this is (`None`: every process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// `None` when it is not shown (a secret, `[database]`).
    pub value: Option<String>,
    pub source: String,
}

/// What the `nonstop.toml` here says for the environment.
pub(crate) struct FileView {
    pub environment: String,
    /// `[env]` as the file has it.
    pub base: BTreeMap<String, String>,
    /// The app-wide variables of the environment (`[env]` with the
    /// environment's table over it).
    pub resolved: BTreeMap<String, String>,
    /// Each process's own variables, as the file gives them for the environment.
    pub processes: BTreeMap<String, BTreeMap<String, String>>,
}

/// The rows of `config get` (pure). `file`: the `nonstop.toml` here, if
/// it is the app's.
pub(crate) fn rows(report: &ConfigReport, file: Option<&FileView>) -> Vec<Row> {
    let config: BTreeMap<&str, &str> = report.config.iter().map(|(k, e)| (k.as_str(), e.value.as_str())).collect();
    // What the processes get now; with nothing running, what the next
    // start would get (the file here, config over it).
    let effective: BTreeMap<String, String> = match (&report.env, file) {
        (Some(env), _) => env.clone(),
        (None, Some(f)) => {
            let mut vars = f.resolved.clone();
            vars.extend(config.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            vars
        }
        (None, None) => config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    let deployed = report.file_env.as_ref().or(file.map(|f| &f.resolved));
    let file_source = |name: &str, value: &str| -> String {
        if let Some(f) = file.filter(|f| f.resolved.get(name).map(String::as_str) == Some(value)) {
            if f.base.get(name).map(String::as_str) == Some(value) {
                return "nonstop.toml [env]".to_string();
            }
            return format!("nonstop.toml [environments.{}.env]", f.environment);
        }
        if file.is_some() {
            "nonstop.toml as last deployed (the file now differs: `nonstop deploy` applies it)".to_string()
        } else {
            "nonstop.toml".to_string()
        }
    };
    let mut out = Vec::new();
    for (name, value) in &effective {
        let source = match report.config.get(name) {
            Some(e) if &e.value == value => format!("config set by {} {}", e.set_by, fmt_time(e.set_at_ms)),
            _ if deployed.is_some_and(|d| d.get(name) == Some(value)) || report.env.is_none() => {
                file_source(name, value)
            }
            _ => "nonstop.toml as last deployed".to_string(),
        };
        if report.secrets.contains(name) {
            out.push(Row {
                name: name.clone(),
                process: None,
                value: None,
                source: format!("secret (hides {source})"),
            });
        } else {
            out.push(Row { name: name.clone(), process: None, value: Some(value.clone()), source });
        }
    }
    for secret in report.secrets.iter().filter(|s| !effective.contains_key(*s)) {
        out.push(Row { name: secret.clone(), process: None, value: None, source: "secret".to_string() });
    }
    for name in &report.database {
        out.push(Row { name: name.clone(), process: None, value: None, source: "[database] url".to_string() });
    }
    let processes = if report.env.is_some() {
        report.processes.clone()
    } else {
        file.map(|f| f.processes.clone()).unwrap_or_default()
    };
    for (process, vars) in &processes {
        for (name, value) in vars {
            if effective.get(name) == Some(value) || report.secrets.contains(name) {
                continue;
            }
            let from_file = file.and_then(|f| f.processes.get(process)).and_then(|p| p.get(name)) == Some(value);
            let source = if from_file {
                format!("nonstop.toml [processes.{process}.env]")
            } else {
                format!("nonstop.toml [processes.{process}.env] as last deployed")
            };
            out.push(Row { name: name.clone(), process: Some(process.clone()), value: Some(value.clone()), source });
        }
    }
    out.sort_by(|a, b| (&a.name, &a.process).cmp(&(&b.name, &b.process)));
    out
}

/// The `nonstop.toml` of the current directory, resolved for `env`, if it
/// is `app`'s.
fn file_view(app: &str, env: &str) -> Option<FileView> {
    let path = std::path::Path::new("nonstop.toml");
    if !path.is_file() {
        return None;
    }
    let set = nonstop_spec::load_set(path).ok()?;
    if set.app().as_str() != app {
        return None;
    }
    let environment = nonstop_core::EnvironmentId::new(env).ok()?;
    let resolved = set.resolve(&environment).ok()?;
    Some(FileView {
        environment: env.to_string(),
        base: set.base().env.clone(),
        processes: resolved.processes.iter().map(|p| (p.name.to_string(), p.env.clone())).collect(),
        resolved: resolved.env,
    })
}

async fn get(home: &Home, name: Option<String>, json: bool) -> anyhow::Result<i32> {
    let report: ConfigReport = match client(home).get("/v1/config").await {
        Ok(r) => r,
        Err(ClientError::Api(a)) if json => {
            emit(&serde_json::json!({"type": "error", "exit_code": a.exit_code, "message": a.message}).to_string());
            return Ok(a.exit_code);
        }
        Err(ClientError::Api(a))
            if scoped_app().is_none() && a.detail.as_ref().and_then(|d| d["error"].as_str()) == Some("not_up") =>
        {
            eprintln!(
                "error: no app is named: run the command in the app's directory (its nonstop.toml names the app), or \
                 give `--app NAME`"
            );
            return Ok(a.exit_code);
        }
        Err(e) => return Err(e.into()),
    };
    let file = file_view(&report.app, &report.environment);
    let all = rows(&report, file.as_ref());
    if let Some(name) = name {
        let found: Vec<&Row> = all.iter().filter(|r| r.name == name && r.process.is_none()).collect();
        let Some(row) = found.first() else {
            let names: Vec<&str> = all.iter().filter(|r| r.process.is_none()).map(|r| r.name.as_str()).collect();
            return Ok(refuse(
                &format!(
                    "{name} is not set for {} in {scope} (its variables: {}); set it with `nonstop config set \
                     {name}=VALUE`",
                    report.app,
                    if names.is_empty() { "none".to_string() } else { names.join(", ") },
                    scope = report.environment,
                ),
                json,
            ));
        };
        if json {
            emit(&serde_json::to_string(row)?);
            return Ok(0);
        }
        match &row.value {
            Some(v) => emit(v),
            None => return Ok(refuse(&format!("{name} comes from {}: its value is never shown", row.source), false)),
        }
        return Ok(0);
    }
    if json {
        let doc = serde_json::json!({
            "app": report.app,
            "environment": report.environment,
            "release": report.release,
            "variables": all,
            "config": report.config,
        });
        emit(&serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    let what = match report.release {
        Some(0) => "running the working directory".to_string(),
        Some(r) => format!("running v{r}"),
        None => "running nothing: what its next start gets".to_string(),
    };
    emit(&format!("{} in {} ({what})", report.app, report.environment));
    if all.is_empty() {
        emit("no variables");
        return Ok(0);
    }
    let table: Vec<Vec<String>> = all
        .iter()
        .map(|r| {
            let name = match &r.process {
                Some(p) => format!("{} ({p} only)", r.name),
                None => r.name.clone(),
            };
            let value = r.value.clone().unwrap_or_else(|| "[hidden]".to_string());
            vec![name, value, r.source.clone()]
        })
        .collect();
    emit(crate::output::table(&["NAME", "VALUE", "SOURCE"], &table).trim_end());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::config::ConfigEntry;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn report(env: Option<&[(&str, &str)]>) -> ConfigReport {
        ConfigReport {
            app: "hello".into(),
            environment: "production".into(),
            release: env.map(|_| 4),
            config: [(
                "GREETING".to_string(),
                ConfigEntry { value: "hi".into(), set_by: "ann@h".into(), set_at_ms: 0 },
            )]
            .into(),
            env: env.map(map),
            processes: [("web".to_string(), map(&[("WORKERS", "4"), ("GREETING", "hi")]))].into(),
            file_env: env.map(|_| map(&[("GREETING", "hello"), ("COLOR", "blue"), ("DEBUG", "0")])),
            secrets: vec!["API_TOKEN".into()],
            database: vec!["DATABASE_URL".into()],
        }
    }

    fn file() -> FileView {
        FileView {
            environment: "production".into(),
            base: map(&[("GREETING", "hello"), ("COLOR", "blue"), ("DEBUG", "1")]),
            resolved: map(&[("GREETING", "hello"), ("COLOR", "blue"), ("DEBUG", "0")]),
            processes: [("web".to_string(), map(&[("WORKERS", "4")]))].into(),
        }
    }

    fn source<'a>(rows: &'a [Row], name: &str) -> &'a str {
        rows.iter().find(|r| r.name == name && r.process.is_none()).map(|r| r.source.as_str()).unwrap_or("-")
    }

    #[test]
    fn each_variable_says_where_it_comes_from() {
        let running = report(Some(&[("GREETING", "hi"), ("COLOR", "blue"), ("DEBUG", "0")]));
        let rows = rows(&running, Some(&file()));
        assert!(source(&rows, "GREETING").starts_with("config set by ann@h"), "{rows:#?}");
        assert_eq!(source(&rows, "COLOR"), "nonstop.toml [env]");
        assert_eq!(source(&rows, "DEBUG"), "nonstop.toml [environments.production.env]");
        assert_eq!(source(&rows, "API_TOKEN"), "secret");
        assert_eq!(source(&rows, "DATABASE_URL"), "[database] url");
        let secret = rows.iter().find(|r| r.name == "API_TOKEN").unwrap();
        assert_eq!(secret.value, None, "a secret's value is never shown");
        let workers = rows.iter().find(|r| r.name == "WORKERS").unwrap();
        assert_eq!(
            (workers.process.as_deref(), workers.source.as_str()),
            (Some("web"), "nonstop.toml [processes.web.env]")
        );
        assert!(
            !rows.iter().any(|r| r.name == "GREETING" && r.process.is_some()),
            "the same value everywhere: one row"
        );
        // Without the file here, nothing finer than nonstop.toml.
        let rows = super::rows(&running, None);
        assert_eq!(source(&rows, "COLOR"), "nonstop.toml");
    }

    #[test]
    fn a_file_changed_since_the_deploy_is_said_and_nothing_running_shows_the_next_start() {
        let mut running = report(Some(&[("GREETING", "hi"), ("COLOR", "red"), ("DEBUG", "0")]));
        running.file_env = Some(map(&[("COLOR", "red"), ("DEBUG", "0")]));
        let rows = rows(&running, Some(&file()));
        assert!(source(&rows, "COLOR").contains("the file now differs"), "{rows:#?}");
        let idle = report(None);
        let rows = super::rows(&idle, Some(&file()));
        let greeting = rows.iter().find(|r| r.name == "GREETING").unwrap();
        assert_eq!(greeting.value.as_deref(), Some("hi"), "config wins over the file");
        assert_eq!(source(&rows, "COLOR"), "nonstop.toml [env]");
    }
}
