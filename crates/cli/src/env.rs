//! `nonstop env create` and `nonstop env destroy`: the client side.
//!
//! Everything that can be checked here is, before the daemon is asked:
//! the name (a DNS label), the spec (resolved for the new environment),
//! a host the file gives another environment, `protected = true`, and the
//! database name `--drop-database` must repeat. A refusal changes
//! nothing (exit 2). `env destroy` sends the file's `[base]` (the servers
//! to drop the database and the Redis data on, with `--drop-database` or
//! to finish a destroy begun with it).

use crate::cli::EnvCommand;
use crate::commands::{
    base_env, emit, ensure_daemon, print_spec_errors, run_op, scoped_app, warn_plain_credentials, who,
};
use crate::home::Home;
use nonstop_api::client::Client;
use nonstop_api::wire::{EnvCreateRequest, EnvDestroyRequest};
use nonstop_core::environment::environment_name;
use nonstop_core::{EnvironmentId, ProcessKind};
use nonstop_spec::SpecSet;
use std::path::{Path, PathBuf};

pub(crate) async fn env(home: &Home, command: EnvCommand) -> anyhow::Result<i32> {
    match command {
        EnvCommand::List { json } => crate::commands::env_list(home, json).await,
        EnvCommand::Create { name, from, file, json } => create(home, &name, from.as_deref(), &file, json).await,
        EnvCommand::Destroy { name, drop_database, file, json } => {
            destroy(home, &name, drop_database, &file, json).await
        }
    }
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

fn name_of(text: &str, what: &str, json: bool) -> Result<EnvironmentId, i32> {
    environment_name(text.trim()).map_err(|e| refuse(&format!("{e} (given as {what})"), json))
}

/// The spec file, loaded; its errors printed (`Err(2)`).
fn load(file: &Path, json: bool) -> Result<SpecSet, i32> {
    nonstop_spec::load_set(file).map_err(|errors| {
        print_spec_errors(file, &errors, json);
        2
    })
}

/// `--app` names another app than the file.
fn other_app(set: &SpecSet, file: &Path, json: bool) -> Option<i32> {
    let app = scoped_app().filter(|a| a != set.app().as_str())?;
    Some(refuse(
        &format!(
            "--app {app} (or NONSTOP_APP) names another app than {} ({}); drop it, or run the command in {app}'s directory",
            file.display(),
            set.app()
        ),
        json,
    ))
}

fn app_dir(file: &Path) -> anyhow::Result<PathBuf> {
    let file = if file.is_absolute() { file.to_path_buf() } else { std::env::current_dir()?.join(file) };
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    Ok(dir.canonicalize().unwrap_or(dir))
}

async fn create(home: &Home, name: &str, from: Option<&str>, file: &Path, json: bool) -> anyhow::Result<i32> {
    let name = match name_of(name, "NAME", json) {
        Ok(n) => n,
        Err(code) => return Ok(code),
    };
    let from = match from.map(|f| name_of(f, "--from", json)).transpose() {
        Ok(f) => f,
        Err(code) => return Ok(code),
    };
    if from.as_ref() == Some(&name) {
        return Ok(refuse(&format!("--from names `{name}` itself; name the environment to start from"), json));
    }
    let set = match load(file, json) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    if let Some(code) = other_app(&set, file, json) {
        return Ok(code);
    }
    let spec = match set.resolve(&name) {
        Ok(s) => s,
        Err(errors) => {
            print_spec_errors(file, &errors, json);
            return Ok(2);
        }
    };
    // An environment the file does not name answers NAME.APP.localhost: a
    // host the file gives another environment (a wildcard) is refused here.
    if !set.is_declared(&name) {
        for host in &spec.hosts {
            if let Some(other) = set.claimed_by(host) {
                return Ok(refuse(
                    &format!(
                        "the new environment `{name}` would answer {host}, which {} gives environment `{other}`; \
                         give it hosts of its own in [environments.{name}] hosts = [...], or choose another name",
                        file.display()
                    ),
                    json,
                ));
            }
        }
    }
    warn_plain_credentials(&spec);
    let source = app_dir(file)?;
    ensure_daemon(home, spec.proxy.workers).await?;
    let c = Client::new(home.socket()).scoped(Some(spec.app.as_str()), Some(name.as_str()));
    if !json {
        let how = match &from {
            Some(f) => format!("with the release `{f}` runs"),
            None => format!("from {}", source.display()),
        };
        eprintln!("creating environment {name} of {} {how}", spec.app);
    }
    let req = EnvCreateRequest {
        spec: spec.clone(),
        source,
        base_env: base_env(),
        who: who(),
        from: from.map(|f| f.to_string()),
    };
    let code = run_op(&c, "/v1/environments/create", &req, json).await?;
    if code == 0 && !json && spec.processes.iter().any(|p| p.kind == ProcessKind::Web) {
        let port = spec.proxy.listen.port();
        match spec.hosts.first() {
            Some(host) => emit(&format!("serving {name} on http://{host}:{port}")),
            None => emit(&format!("serving {name} on http://{}", spec.proxy.listen)),
        }
    }
    Ok(code)
}

async fn destroy(
    home: &Home,
    name: &str,
    drop_database: Option<String>,
    file: &Path,
    json: bool,
) -> anyhow::Result<i32> {
    let name = match name_of(name, "NAME", json) {
        Ok(n) => n,
        Err(code) => return Ok(code),
    };
    // The file says whether the environment is protected, and where its
    // database is; without one, the daemon's record decides what it can.
    let set = if file.is_file() {
        match load(file, json) {
            Ok(s) => Some(s),
            Err(code) => return Ok(code),
        }
    } else {
        None
    };
    if let Some(set) = &set {
        if let Some(code) = other_app(set, file, json) {
            return Ok(code);
        }
        if set.is_protected(&name) {
            return Ok(refuse(
                &format!(
                    "environment `{name}` of `{}` is protected (`protected = true` in [environments.{name}] of {}): \
                     `env destroy` refuses it, and nothing was changed; take `protected = true` out and deploy it \
                     first if it really is to go",
                    set.app(),
                    file.display()
                ),
                json,
            ));
        }
    }
    let app = set.as_ref().map(|s| s.app().to_string()).or_else(scoped_app);
    let base = set.as_ref().and_then(|s| s.base_services()).cloned().unwrap_or_default();
    if let Some(typed) = &drop_database {
        let Some(set) = &set else {
            return Ok(refuse(
                "--drop-database needs the app's nonstop.toml (its [base] names the servers to drop the \
                 environment's database and Redis data on); run the command in the app's directory or give -f \
                 FILE; nothing was changed",
                json,
            ));
        };
        if base.postgres.is_none() && base.redis.is_none() {
            return Ok(refuse(
                &format!(
                    "--drop-database drops the environment's database and Redis data on the servers [base] names, \
                     and {} has no [base] postgres or redis; nothing was changed",
                    file.display()
                ),
                json,
            ));
        }
        if let Err(e) = nonstop_base::confirm_drop(set.app(), &name, typed) {
            return Ok(refuse(&format!("{e}; nothing was changed"), json));
        }
    }
    let c = Client::new(home.socket()).scoped(app.as_deref(), Some(name.as_str()));
    let req = EnvDestroyRequest { who: who(), drop_database, base_postgres: base.postgres, base_redis: base.redis };
    run_op(&c, "/v1/environments/destroy", &req, json).await
}
