//! The client side of every command: talk to the daemon, print results.

use crate::cli::{Cli, Command};
use crate::home::Home;
use crate::output::{self, ProgressView};
use anyhow::Context;
use nonstop_api::client::{Client, ClientError};
use nonstop_api::wire::*;
use nonstop_engine::{DeploymentInfo, EventEntry, OpReport, ReleaseInfo, RunContext, StatusReport};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Print a line to stdout; a closed pipe (`nonstop status | head -1`) ends
/// the command quietly instead of panicking.
pub(crate) fn emit(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(141);
    }
}

macro_rules! outln {
    ($($t:tt)*) => { emit(&format!($($t)*)) };
}

pub async fn dispatch(cli: Cli) -> i32 {
    set_scope(|s| {
        s.app_flag = cli.app.clone().filter(|a| !a.is_empty());
        s.env_flag = cli.env.clone().filter(|e| !e.trim().is_empty());
        s.env_var = std::env::var(nonstop_core::environment::ENVIRONMENT_VAR).ok().filter(|v| !v.trim().is_empty());
    });
    if !matches!(cli.command, Command::Init { .. } | Command::Completions { .. } | Command::Daemon { .. }) {
        scope_from_cwd();
    }
    let home = match Home::resolve(cli.home) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    // Every command that uses the state directory refuses an unsafe one
    // (`doctor` reports it; `daemon` checks it as it creates it).
    if !matches!(
        cli.command,
        Command::Init { .. } | Command::Completions { .. } | Command::Doctor { .. } | Command::Daemon { .. }
    ) {
        if let Err(e) = home.verify() {
            eprintln!("error: {e:#}");
            return 2;
        }
    }
    let result = match cli.command {
        Command::Daemon { api_listen, dashboard_listen, proxy_workers, no_keeper } => {
            let dashboard_listen = dashboard_listen.unwrap_or_default();
            init_daemon_logging();
            if std::env::var_os("NONSTOP_DETACH").is_some_and(|v| v == "1") {
                // Started by `up`: leave the caller's session and process
                // group, so that signals meant for the CLI (Ctrl-C, a CI
                // timeout) do not reach the daemon.
                if let Err(e) = nix::unistd::setsid() {
                    tracing::warn!("could not detach into a new session: {e}");
                }
            }
            // A successor started by an upgrade (`NONSTOP_UPGRADE`, also
            // from a version without keepers) is never a keeper itself.
            let start = crate::start_env::get();
            if !no_keeper && !start.upgrade_successor && start.keeper_socket.is_none() {
                let args = crate::keeper::DaemonArgs { api_listen, dashboard_listen, proxy_workers };
                return match crate::keeper::run(home, args).await {
                    Ok(code) => code,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        eprintln!("error: {e:#}");
                        if e.downcast_ref::<crate::home::Refused>().is_some() {
                            2
                        } else {
                            1
                        }
                    }
                };
            }
            match crate::daemon::run(home, api_listen, dashboard_listen, proxy_workers).await {
                Ok(()) => Ok(0),
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    // 2: it refuses its state directory; starting it again
                    // changes nothing until someone acts.
                    Ok(if e.downcast_ref::<crate::home::Refused>().is_some() { 2 } else { 1 })
                }
            }
        }
        Command::Init { force, name } => init(force, name),
        Command::Up { file, json } => up(&home, &file, json).await,
        Command::Down { json } => down(&home, json).await,
        Command::Status { json } => status(&home, json).await,
        Command::Scale { counts, json } => scale(&home, counts, json).await,
        Command::Run { release, command } => run(&home, release, command).await,
        Command::Logs { process, follow, tail, json } => logs(&home, process, follow, tail, json).await,
        Command::Restart { process, json } => restart(&home, process, json).await,
        Command::Events { limit, json } => events(&home, limit, json).await,
        Command::Deploy { message, file, wait, run_tasks, allow_breaking, json } => {
            deploy(&home, &file, message, wait, (run_tasks, allow_breaking), json).await
        }
        Command::Rollback { release, run_tasks, force, wait, json } => {
            rollback(&home, release, (run_tasks, force), wait, json).await
        }
        Command::History { id, limit, json } => history(&home, id, limit, json).await,
        Command::Maintenance { switch } => crate::maintenance::maintenance(&home, switch).await,
        Command::Secrets { action } => crate::secrets::secrets(&home, action).await,
        Command::Config { action } => crate::config::config(&home, action).await,
        Command::Promote(args) => crate::promote::promote(&home, cli.env.as_deref(), args).await,
        Command::Stop { json } => crate::maintenance::stop(&home, json).await,
        Command::Start { json } => crate::maintenance::start(&home, json).await,
        Command::Cancel { reason, json } => cancel(&home, reason, json).await,
        Command::Releases { json } => releases(&home, json).await,
        Command::Metrics { process, json } => metrics(&home, process, json).await,
        Command::Dashboard { open, json } => dashboard(&home, open, json).await,
        Command::Env { command } => crate::env::env(&home, command).await,
        Command::Upgrade { json } => upgrade(&home, json).await,
        Command::Doctor { repair, json } => crate::recovery::doctor(&home, repair, json).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "nonstop", &mut buf);
            outln!("{}", String::from_utf8_lossy(&buf).trim_end());
            Ok(0)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<ClientError>() {
                eprintln!("error: {ce}");
                return ce.exit_code();
            }
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn init_daemon_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NONSTOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log that cannot be written (a full disk) is not reported on stderr:
    // that is the same file, and a failed `eprintln!` panics.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false)
        .log_internal_errors(false)
        .try_init();
}

/// The app and environment a command is about, for every request to the
/// daemon: `--app` and `-e`, else `NONSTOP_ENV`, else what nonstop.toml
/// (the one the command loads, or the one in the current directory) says;
/// whatever is still unknown is the daemon's choice.
#[derive(Debug, Clone, Default)]
struct Scope {
    /// `--app` (or `NONSTOP_APP`).
    app_flag: Option<String>,
    /// `-e/--env`.
    env_flag: Option<String>,
    /// `NONSTOP_ENV`.
    env_var: Option<String>,
    /// From the spec, once read.
    app: Option<String>,
    env: Option<String>,
}

static SCOPE: std::sync::Mutex<Option<Scope>> = std::sync::Mutex::new(None);

fn scope() -> Scope {
    SCOPE.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
}

fn set_scope(f: impl FnOnce(&mut Scope)) {
    let mut guard = SCOPE.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Scope::default));
}

/// The app requests are about: `--app`, else the spec's (read or in the
/// current directory).
pub(crate) fn scoped_app() -> Option<String> {
    let s = scope();
    s.app_flag.or(s.app)
}

/// The environment requests are about: `-e`, else `NONSTOP_ENV`, else the
/// spec's.
pub(crate) fn scoped_env() -> Option<String> {
    let s = scope();
    s.env_flag.or(s.env_var).or(s.env)
}

pub(crate) fn client(home: &Home) -> Client {
    let (app, env) = (scoped_app(), scoped_env());
    client_for(home, app.as_deref(), env.as_deref())
}

/// A client addressing `app` in `env`.
pub(crate) fn client_for(home: &Home, app: Option<&str>, env: Option<&str>) -> Client {
    Client::new(home.socket()).scoped(app, env)
}

/// The app and default environment of the nonstop.toml in the current
/// directory, if there is a valid one: commands that read no spec still
/// address that app (quietly: a broken file is `up`'s to report).
fn scope_from_cwd() {
    let file = Path::new("nonstop.toml");
    if !file.is_file() {
        return;
    }
    if let Ok(set) = nonstop_spec::load_set(file) {
        let env = set.default_environment().to_string();
        let app = set.app().to_string();
        set_scope(|s| {
            s.app = Some(app);
            s.env = Some(env);
        });
    }
}

// ------------------------------------------------------------------- init

fn init(force: bool, name: Option<String>) -> anyhow::Result<i32> {
    let dir = std::env::current_dir()?;
    let target = dir.join("nonstop.toml");
    if target.exists() && !force {
        eprintln!("error: {} already exists; edit it, or run `nonstop init --force` to overwrite it", target.display());
        return Ok(2);
    }
    let name = name
        .unwrap_or_else(|| nonstop_spec::sanitize_app_name(dir.file_name().and_then(|n| n.to_str()).unwrap_or("app")));
    let procfile = match std::fs::read_to_string(dir.join("Procfile")) {
        Ok(p) => Some(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("cannot read Procfile"),
    };
    let text = match nonstop_spec::init_toml(&name, procfile.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    std::fs::write(&target, text)?;
    let from = if procfile.is_some() { " from Procfile" } else { "" };
    outln!("wrote {}{from}; review it, then run `nonstop up`", target.display());
    Ok(0)
}

// --------------------------------------------------------------------- up

const BASE_ENV: &[&str] =
    &["PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV"];

pub(crate) fn base_env() -> BTreeMap<String, String> {
    std::env::vars().filter(|(k, _)| BASE_ENV.contains(&k.as_str()) || k.starts_with("LC_")).collect()
}

/// Start the daemon in the background unless one answers; a daemon
/// started here gets the `[proxy] workers` of the spec about to be sent
/// (it has no stored app to read it from yet).
pub(crate) async fn ensure_daemon(home: &Home, proxy_workers: Option<u32>) -> anyhow::Result<Client> {
    let c = client(home);
    if c.ping().await.is_ok() {
        return Ok(c);
    }
    home.create()?;
    let log = home.open_daemon_log()?;
    let exe = std::env::current_exe()?;
    let mut command = std::process::Command::new(exe);
    command.arg("daemon");
    if let Some(n) = proxy_workers {
        command.arg("--proxy-workers").arg(n.to_string());
    }
    let mut child = command
        .env("NONSTOP_HOME", home.path())
        .env("NONSTOP_DETACH", "1")
        .env(crate::home::APP_UMASK_VAR, format!("{:04o}", crate::home::app_umask()))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the nonstop daemon")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if c.ping().await.is_ok() {
            // Reaped by a detached waiter so that no zombie is left.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(c);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(home.daemon_log()).unwrap_or_default();
            let last: Vec<&str> = tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
            anyhow::bail!(
                "the nonstop daemon exited at start ({status}):\n  {}\n(see {})",
                last.join("\n  "),
                home.daemon_log().display()
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!("the nonstop daemon did not answer within 15s; see {}", home.daemon_log().display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn print_spec_errors(file: &Path, errors: &nonstop_spec::SpecErrors, json: bool) {
    if json {
        outln!(
            "{}",
            serde_json::json!({"type": "error", "exit_code": 2, "message": errors.to_string(), "errors": errors.errors})
        );
    } else {
        eprintln!("{errors}");
        let n = errors.errors.len();
        eprintln!("error: {} has {n} problem{}; nothing was changed", file.display(), if n == 1 { "" } else { "s" });
    }
}

pub(crate) async fn run_op<B: serde::Serialize>(c: &Client, path: &str, body: &B, json: bool) -> anyhow::Result<i32> {
    let view = (!json).then(ProgressView::new);
    let r = c
        .op(path, body, |p| {
            if json {
                outln!("{}", serde_json::to_string(&OpLine::Progress(p.clone())).unwrap_or_default());
            } else if let Some(v) = &view {
                v.update(p);
            }
        })
        .await;
    if let Some(v) = &view {
        v.finish();
    }
    match r {
        Ok(report) => {
            print_report(&report, json);
            Ok(0)
        }
        Err(ClientError::Api(e)) if json => {
            outln!("{}", serde_json::to_string(&OpLine::Error(e.clone())).unwrap_or_default());
            Ok(e.exit_code)
        }
        Err(e) => Err(e.into()),
    }
}

fn print_report(r: &OpReport, json: bool) {
    if json {
        outln!("{}", serde_json::to_string(&OpLine::Result(r.clone())).unwrap_or_default());
    } else {
        outln!("{}", r.summary);
    }
}

/// The spec at `file` and the app directory it describes (the file's
/// directory); `Err(2)` after printing the spec's errors.
fn load_app(file: &Path, json: bool) -> anyhow::Result<Result<(nonstop_core::process::AppSpec, PathBuf), i32>> {
    let set = match nonstop_spec::load_set(file) {
        Ok(s) => s,
        Err(errors) => {
            print_spec_errors(file, &errors, json);
            return Ok(Err(2));
        }
    };
    // The environment: -e, else NONSTOP_ENV, else the file's.
    let s = scope();
    if let Some(app) = s.app_flag.as_deref().filter(|a| *a != set.app().as_str()) {
        eprintln!(
            "error: --app {app} (or NONSTOP_APP) names another app than {} ({}); drop it, or run the command in {app}'s directory",
            file.display(),
            set.app()
        );
        return Ok(Err(2));
    }
    let choice = match set.choose(s.env_flag.as_deref(), s.env_var.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}: {}", e.error);
            return Ok(Err(2));
        }
    };
    let spec = match set.resolve(&choice.environment) {
        Ok(s) => s,
        Err(errors) => {
            print_spec_errors(file, &errors, json);
            return Ok(Err(2));
        }
    };
    set_scope(|s| {
        s.app = Some(spec.app.to_string());
        s.env = Some(choice.environment.to_string());
        // The choice made here wins over the current directory's file.
        if s.env_flag.is_none() && s.env_var.is_none() {
            s.env_flag = Some(choice.environment.to_string());
        }
    });
    warn_plain_credentials(&spec);
    let file = if file.is_absolute() { file.to_path_buf() } else { std::env::current_dir()?.join(file) };
    let dir: PathBuf = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let dir = dir.canonicalize().unwrap_or(dir);
    Ok(Ok((spec, dir)))
}

/// `[env]` variables (the app's and its processes') that look like
/// credentials: a warning each, on stderr (never an error; the value is
/// never shown).
pub(crate) fn warn_plain_credentials(spec: &nonstop_core::process::AppSpec) {
    let vars = spec.env.iter().chain(spec.processes.iter().flat_map(|p| p.env.iter()));
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in vars {
        if let Some(hint) = nonstop_secrets::looks_like_credential(name, value) {
            if seen.insert(name.clone()) {
                eprintln!("warning: {hint}");
            }
        }
    }
}

/// After a successful `up` or `deploy`: where the app is served.
pub(crate) fn say_serving(spec: &nonstop_core::process::AppSpec, code: i32, json: bool) {
    if code == 0 && !json && spec.processes.iter().any(|p| p.kind == nonstop_core::ProcessKind::Web) {
        outln!("serving on http://{}", spec.proxy.listen);
    }
}

async fn up(home: &Home, file: &Path, json: bool) -> anyhow::Result<i32> {
    let (spec, workdir) = match load_app(file, json)? {
        Ok(app) => app,
        Err(code) => return Ok(code),
    };
    let c = ensure_daemon(home, spec.proxy.workers).await?;
    let code = run_op(&c, "/v1/up", &UpRequest { spec: spec.clone(), workdir, base_env: base_env() }, json).await?;
    say_serving(&spec, code, json);
    Ok(code)
}

pub(crate) async fn env_list(home: &Home, json: bool) -> anyhow::Result<i32> {
    let envs: Vec<nonstop_api::wire::EnvironmentInfo> = client(home).get("/v1/environments").await?;
    if json {
        outln!("{}", serde_json::to_string(&envs)?);
        return Ok(0);
    }
    if envs.is_empty() {
        outln!("no environment yet: `nonstop up` or `nonstop deploy` in an app directory creates one");
        return Ok(0);
    }
    let mut rows = vec![["APP", "ENV", "STATE", "RELEASE", "READY", "URL"].map(String::from).to_vec()];
    for e in &envs {
        let state = match (&e.operation, e.running) {
            (Some(op), _) => op.clone(),
            (None, true) => "running".to_string(),
            (None, false) => "down".to_string(),
        };
        rows.push(vec![
            e.app.clone(),
            e.environment.clone(),
            state,
            e.release.map(|r| format!("v{r}")).unwrap_or_else(|| "-".into()),
            format!("{}/{}", e.ready, e.instances),
            e.urls.first().cloned().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", line.join("  ").trim_end());
    }
    Ok(0)
}

/// Whether another app or environment than the one addressed still runs
/// under the daemon (then `down` leaves the daemon up).
async fn others_running(c: &Client) -> Vec<String> {
    let s = scope();
    let (app, env) = (s.app_flag.or(s.app), s.env_flag.or(s.env_var).or(s.env));
    let envs: Vec<nonstop_api::wire::EnvironmentInfo> = c.get("/v1/environments").await.unwrap_or_default();
    envs.into_iter()
        .filter(|e| e.running)
        .filter(|e| !(app.as_deref().is_none_or(|a| a == e.app) && env.as_deref().is_none_or(|v| v == e.environment)))
        .map(|e| format!("{}/{}", e.app, e.environment))
        .collect()
}

async fn down(home: &Home, json: bool) -> anyhow::Result<i32> {
    let mut c = client(home);
    let mut note: Option<String> = None;
    if matches!(c.ping().await, Err(ClientError::NotRunning { .. })) {
        let left = instances_left_running(home);
        if left > 0 {
            // The daemon died (kill -9, OOM) and its instances kept running,
            // as they do so that a new daemon re-adopts them: start one to
            // stop them the usual way (drain, stop signal, grace period).
            if !json {
                outln!("the nonstop daemon is not running but {left} instance(s) are: starting it to stop them");
            }
            match ensure_daemon(home, None).await {
                Ok(started) => c = started,
                // A daemon that cannot start (a damaged store) must not
                // leave the app running: stopped from their records below.
                Err(e) => note = Some(format!("the daemon could not start ({e:#})")),
            }
        }
    }
    let (code, summary) = match c.ping().await {
        Err(ClientError::NotRunning { .. }) => (0, None),
        Err(e) => return Err(e.into()),
        Ok(ping) => {
            // No app up: stop the daemon all the same. Anything else (another
            // operation in progress) stops here, daemon and app as they are: a
            // daemon stopped mid-deploy would leave the app running and the
            // deployment to the next daemon.
            let code = match c.op("/v1/down", &serde_json::json!({}), |_| {}).await {
                Ok(_) => 0,
                Err(ClientError::Api(e)) if e.detail.as_ref().and_then(|d| d["error"].as_str()) == Some("not_up") => 0,
                Err(e) => return Err(e.into()),
            };
            // Other apps or environments still run: the daemon stays.
            let others = others_running(&c).await;
            if !others.is_empty() {
                let summary = format!("stopped; the daemon keeps running {}", others.join(", "));
                if json {
                    outln!("{}", serde_json::json!({"type": "result", "summary": summary, "changed": true}));
                } else {
                    outln!("{summary}");
                }
                return Ok(code);
            }
            // Then the daemon itself, and wait for it to be gone.
            let _: Result<serde_json::Value, _> = c.post("/v1/shutdown", &serde_json::json!({})).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{}", ping.pid)).exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // And its keeper, which exits once the daemon stopped on purpose.
            let keeper =
                std::fs::read_to_string(crate::keeper::pid_path(home)).ok().and_then(|p| p.trim().parse::<u32>().ok());
            if let Some(pid) = keeper {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            (code, Some("stopped the app and the daemon".to_string()))
        }
    };
    // Whatever the records say still runs (instances the store did not know,
    // tasks, everything when the daemon could not start): stopped as well.
    let leftovers = crate::recovery::stop_leftovers(home, |_| true).await;
    let summary = match (summary, leftovers.is_empty()) {
        (None, true) => {
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"type": "result", "summary": "the daemon was not running", "changed": false})
                );
            } else {
                outln!("nothing to do: the nonstop daemon is not running");
            }
            return Ok(code);
        }
        (summary, _) => {
            let mut parts: Vec<String> = summary.into_iter().collect();
            if let Some(n) = note {
                parts.push(n);
            }
            if !leftovers.is_empty() {
                let list: Vec<String> = leftovers.iter().map(ToString::to_string).collect();
                parts.push(format!("stopped from the records under instances/: {}", list.join("; ")));
            }
            parts.join("; ")
        }
    };
    let failed = leftovers.iter().any(|s| s.outcome.starts_with("NOT"));
    print_report(&OpReport { summary, changed: true }, json);
    Ok(if failed { 1 } else { code })
}

/// Instances and tasks of this home that may still run (the supervisor's
/// own records of them, as a restarted daemon reads them).
fn instances_left_running(home: &Home) -> usize {
    nonstop_supervisor::records::live_records(home.path()).len()
}

async fn status(home: &Home, json: bool) -> anyhow::Result<i32> {
    let s: StatusReport = client(home).get("/v1/status").await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        outln!("{}", output::status_text(&s).trim_end());
    }
    Ok(0)
}

async fn scale(home: &Home, pairs: Vec<String>, json: bool) -> anyhow::Result<i32> {
    let counts = match scale_counts(&pairs) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    run_op(&client(home), "/v1/scale", &ScaleRequest { counts }, json).await
}

/// `PROCESS=COUNT` arguments as counts; each process at most once.
fn scale_counts(pairs: &[String]) -> Result<BTreeMap<String, u32>, String> {
    let mut counts = BTreeMap::new();
    for pair in pairs {
        let Some((name, n)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not PROCESS=COUNT; e.g. `nonstop scale web=4 worker=2`"));
        };
        let Ok(n) = n.trim().parse::<u32>() else {
            return Err(format!("in `{pair}`, `{n}` is not a count; use a whole number like web=4"));
        };
        let name = name.trim().to_string();
        if let Some(first) = counts.insert(name.clone(), n) {
            return Err(format!(
                "`{name}` is given twice ({name}={first} and {name}={n}); give each process once, e.g. \
                 `nonstop scale {name}={n}`"
            ));
        }
    }
    Ok(counts)
}

async fn restart(home: &Home, process: Option<String>, json: bool) -> anyhow::Result<i32> {
    run_op(&client(home), "/v1/restart", &RestartRequest { process }, json).await
}

async fn events(home: &Home, limit: usize, json: bool) -> anyhow::Result<i32> {
    let evs: Vec<EventEntry> = client(home).get(&format!("/v1/events?limit={limit}")).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&evs)?);
        return Ok(0);
    }
    for e in evs {
        let secs = e.at_ms / 1000;
        let t = format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        outln!("{t}  {:<14} {:<12} {}", e.kind, e.instance.unwrap_or_default(), e.message);
    }
    Ok(0)
}

// -------------------------------------------------------------------- run

async fn run(home: &Home, release: Option<String>, command: Vec<String>) -> anyhow::Result<i32> {
    let path = match release.as_deref().map(|r| (r, parse_release(r))) {
        None => "/v1/run-context".to_string(),
        Some((_, Some(n))) => format!("/v1/run-context?release={n}"),
        Some((r, None)) => {
            eprintln!("error: `{r}` is not a release; give one like v3 (see `nonstop releases`)");
            return Ok(2);
        }
    };
    let ctx: RunContext = client(home).get(&path).await?;
    // The secrets, and the base services' database password: read here,
    // never sent by the daemon.
    let mut vars = ctx.env.clone();
    if let Err(e) = crate::secrets::add_run_secrets(home, &ctx, &mut vars) {
        eprintln!("error: {e}");
        return Ok(1);
    }
    let mut cmd = if command.len() == 1 {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(&command[0]);
        c
    } else {
        let mut c = std::process::Command::new(&command[0]);
        c.args(&command[1..]);
        c
    };
    // Like an instance: a persistent NONSTOP_DATA_DIR of its own (`run`)
    // and a TMPDIR removed when the command ends (the release is read-only).
    let data = home.path().join("data").join(&ctx.app).join("run");
    let tmp = home.path().join("tmp").join(format!("{}.run-{}", ctx.app, std::process::id()));
    for (dir, recursive) in [(&data, true), (&home.path().join("tmp"), true), (&tmp, false)] {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(recursive)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _tmp = RemoveOnDrop(tmp.clone());
    cmd.env_clear().envs(&vars).env("NONSTOP_DATA_DIR", &data).env("TMPDIR", &tmp).current_dir(&ctx.workdir);
    // The child shares our terminal: Ctrl-C goes to it; we only wait.
    use tokio::signal::unix::{signal, SignalKind};
    let _int = signal(SignalKind::interrupt());
    let _quit = signal(SignalKind::quit());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "error: `{}` was not found (PATH={}); install it or fix the command",
                command[0],
                vars.get("PATH").cloned().unwrap_or_default()
            );
            return Ok(127);
        }
        Err(e) => return Err(e).context(format!("cannot run `{}`", command.join(" "))),
    };
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

// ------------------------------------------------------------------- logs

async fn logs(
    home: &Home,
    process: Option<String>,
    follow: bool,
    tail: Option<usize>,
    json: bool,
) -> anyhow::Result<i32> {
    let mut path = format!("/v1/logs?follow={follow}");
    if let Some(p) = &process {
        path.push_str(&format!("&process={p}"));
    }
    if let Some(t) = tail {
        path.push_str(&format!("&tail={t}"));
    }
    let mut lines = client(home).stream(&path).await?;
    use std::io::Write;
    let stdout = std::io::stdout();
    while let Some(raw) = lines.next_line().await? {
        let mut out = stdout.lock();
        if json {
            out.write_all(&raw)?;
            out.write_all(b"\n")?;
        } else {
            let Ok(l) = serde_json::from_slice::<LogEntry>(&raw) else { continue };
            // 2026-11-22T01:02:03.456789Z -> 2026-11-22T01:02:03.456Z
            let ts = if l.ts.len() >= 27 { format!("{}Z", &l.ts[..23]) } else { l.ts.clone() };
            let mark = if l.stream == "err" { "!" } else { "|" };
            if writeln!(out, "{ts} {:<10} {mark} {}", l.instance, l.text).is_err() {
                break; // stdout closed (e.g. `| head`)
            }
        }
        let _ = out.flush();
    }
    Ok(0)
}

// ----------------------------------------------------------------- deploy

pub(crate) fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .or_else(|| nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name))
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

/// Run an operation; with `wait`, retry while another one holds the app.
pub(crate) async fn run_op_waiting<B: serde::Serialize>(
    c: &Client,
    path: &str,
    body: &B,
    wait: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut said = false;
    loop {
        // Probe first so that a refused request prints nothing.
        if wait {
            let status: Result<StatusReport, _> = c.get("/v1/status").await;
            if let Ok(s) = &status {
                if let Some(op) = &s.operation {
                    if !said && !json {
                        eprintln!("waiting: another operation ({op}) is in progress…");
                        said = true;
                    }
                    if Instant::now() > deadline {
                        anyhow::bail!("gave up waiting after 1h for the operation ({op}) in progress");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let code = run_op(c, path, body, json).await;
        match &code {
            Err(e) if wait => {
                if let Some(ClientError::Api(ApiError { exit_code: 3, message, .. })) = e.downcast_ref::<ClientError>()
                {
                    if message.contains("in progress") {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            Ok(3) if wait => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            _ => {}
        }
        return code;
    }
}

async fn deploy(
    home: &Home,
    file: &Path,
    message: Option<String>,
    wait: bool,
    (run_tasks, allow_breaking): (bool, bool),
    json: bool,
) -> anyhow::Result<i32> {
    let (spec, source) = match load_app(file, json)? {
        Ok(app) => app,
        Err(code) => return Ok(code),
    };
    let c = ensure_daemon(home, spec.proxy.workers).await?;
    let req = DeployRequest {
        spec: spec.clone(),
        source,
        base_env: base_env(),
        message,
        who: who(),
        run_tasks,
        allow_breaking,
    };
    let code = run_op_waiting(&c, "/v1/deploy", &req, wait, json).await?;
    say_serving(&spec, code, json);
    Ok(code)
}

fn parse_release(s: &str) -> Option<u64> {
    s.trim().trim_start_matches(['v', 'V']).parse().ok()
}

async fn rollback(
    home: &Home,
    release: Option<String>,
    (run_tasks, force): (bool, bool),
    wait: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let release = match release.as_deref().map(|r| (r, parse_release(r))) {
        None => None,
        Some((_, Some(n))) => Some(n),
        Some((r, None)) => {
            eprintln!("error: `{r}` is not a release; give one like v3 (see `nonstop releases`)");
            return Ok(2);
        }
    };
    let c = client(home);
    run_op_waiting(&c, "/v1/rollback", &RollbackRequest { release, run_tasks, force, who: who() }, wait, json).await
}

pub(crate) fn fmt_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}

async fn cancel(home: &Home, reason: Option<String>, json: bool) -> anyhow::Result<i32> {
    let request = CancelRequest { who: who(), reason };
    // Checked here too, so that a bad reason is refused before the daemon
    // is asked (the daemon checks it the same way).
    if let Err(e) = request.checked_reason() {
        eprintln!("error: {e}");
        return Ok(2);
    }
    let r: OpReport = client(home).post("/v1/cancel", &request).await?;
    if json {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        outln!("{}", r.summary);
    }
    Ok(0)
}

async fn history(home: &Home, id: Option<i64>, limit: usize, json: bool) -> anyhow::Result<i32> {
    if let Some(id) = id {
        return deployment(home, id, json).await;
    }
    let deps: Vec<DeploymentInfo> = client(home).get(&format!("/v1/history?limit={limit}")).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&deps)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = deps
        .iter()
        .map(|d| {
            let dur = d
                .finished_at_ms
                .map(|f| format!("{:.1}s", (f.saturating_sub(d.started_at_ms)) as f64 / 1000.0))
                .unwrap_or_else(|| "…".into());
            vec![
                format!("#{}", d.id),
                d.kind.to_string(),
                format!(
                    "{} → v{}",
                    d.from_release.map(|f| format!("v{f}")).unwrap_or_else(|| "-".into()),
                    d.to_release
                ),
                if d.status == nonstop_store::DeploymentStatus::Running {
                    format!("running ({})", d.phase)
                } else {
                    d.status.to_string()
                },
                fmt_time(d.started_at_ms),
                dur,
                d.who.clone(),
                d.reason
                    .clone()
                    .or_else(|| d.message.clone())
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            ]
        })
        .collect();
    outln!(
        "{}",
        output::table(&["ID", "KIND", "RELEASE", "STATUS", "STARTED (UTC)", "TOOK", "WHO", "NOTE"], &rows).trim_end()
    );
    Ok(0)
}

/// `nonstop history ID`: one deployment and its timeline.
async fn deployment(home: &Home, id: i64, json: bool) -> anyhow::Result<i32> {
    let deps: Vec<DeploymentInfo> = client(home).get(&format!("/v1/history?id={id}")).await?;
    let Some(d) = deps.into_iter().find(|d| d.id == id) else {
        anyhow::bail!("no deployment #{id} in this environment's history: `nonstop history` lists them (`-e ENV` for another environment)");
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(0);
    }
    outln!("{}", deployment_text(&d).trim_end());
    Ok(0)
}

/// A deployment's header and its timeline, one step a line with its time
/// since the start.
pub(crate) fn deployment_text(d: &DeploymentInfo) -> String {
    let from = d.from_release.map(|f| format!("v{f}")).unwrap_or_else(|| "-".into());
    let took = d
        .finished_at_ms
        .map(|f| format!(", took {:.1}s", f.saturating_sub(d.started_at_ms) as f64 / 1000.0))
        .unwrap_or_default();
    let mut out = format!(
        "#{} {} {from} → v{}: {}\nstarted {} UTC by {}{took}\n",
        d.id,
        d.kind,
        d.to_release,
        d.status,
        fmt_time(d.started_at_ms),
        d.who
    );
    if let Some(m) = &d.message {
        out.push_str(&format!("note: {m}\n"));
    }
    if let Some(r) = &d.reason {
        out.push_str(&format!("reason: {r}\n"));
    }
    if d.timeline.is_empty() {
        out.push_str("\n(no timeline: recorded before nonstop kept them)\n");
        return out;
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = d
        .timeline
        .iter()
        .map(|t| {
            vec![
                format!("+{:.1}s", t.at_ms.saturating_sub(d.started_at_ms) as f64 / 1000.0),
                t.kind.as_str().to_string(),
                t.text.clone(),
            ]
        })
        .collect();
    out.push_str(&output::table(&["AT", "STEP", "WHAT"], &rows));
    out
}

async fn metrics(home: &Home, process: Option<String>, json: bool) -> anyhow::Result<i32> {
    let mut path = "/v1/metrics".to_string();
    if let Some(p) = &process {
        path.push_str(&format!("?process={p}"));
    }
    let report: nonstop_api::wire::MetricsReport = client(home).get(&path).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("{}", crate::metrics::table(&report).trim_end());
    }
    Ok(0)
}

/// The page `nonstop dashboard --open` writes in NONSTOP_HOME (0600) for
/// the browser.
const DASHBOARD_OPEN_PAGE: &str = "dashboard-open.html";

/// A page that sends the browser on to `url` at once.
fn redirect_page(url: &str) -> String {
    let url = url.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;");
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\">\n\
         <meta http-equiv=\"refresh\" content=\"0;url={url}\"><title>nonstop dashboard</title></head>\n\
         <body><p><a href=\"{url}\">Open the nonstop dashboard</a></p></body></html>\n"
    )
}

/// `nonstop dashboard`: a login link from the daemon.
async fn dashboard(home: &Home, open: bool, json: bool) -> anyhow::Result<i32> {
    let link: nonstop_api::dashboard::LoginLink =
        client(home).post("/v1/dashboard/login", &serde_json::json!({})).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&link)?);
    } else {
        outln!("{}", link.url);
        eprintln!(
            "Open this link within {} s; it works once and logs that browser tab in for 12 hours (or until a \
             logout). The dashboard is at {}.",
            link.expires_in_secs, link.base_url
        );
    }
    if open {
        // Not the link itself on xdg-open's command line, which any local
        // user can read in /proc: a private page that goes on to it.
        let page = home.path().join(DASHBOARD_OPEN_PAGE);
        let _ = std::fs::remove_file(&page);
        {
            use std::io::Write;
            let mut f = crate::home::open_private(&page, std::fs::OpenOptions::new().write(true).create_new(true))
                .with_context(|| format!("cannot write {}; open the link yourself", page.display()))?;
            f.write_all(redirect_page(&link.url).as_bytes())
                .with_context(|| format!("cannot write {}; open the link yourself", page.display()))?;
        }
        let status = std::process::Command::new("xdg-open")
            .arg(&page)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => anyhow::bail!("`xdg-open` could not open the link ({s}); open it in a browser yourself"),
            Err(e) => anyhow::bail!("cannot run `xdg-open` ({e}); open the link in a browser yourself"),
        }
    }
    Ok(0)
}

async fn releases(home: &Home, json: bool) -> anyhow::Result<i32> {
    let rels: Vec<ReleaseInfo> = client(home).get("/v1/releases").await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rels)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = rels
        .iter()
        .map(|r| {
            vec![
                format!("{}v{}", if r.current { "* " } else { "  " }, r.id),
                r.status.to_string(),
                r.content_hash.chars().take(12).collect(),
                fmt_time(r.created_at_ms),
                format!("{:.1}s", r.build_ms as f64 / 1000.0),
                r.schema.as_deref().map_or_else(|| "-".to_string(), |s| s.chars().take(12).collect()),
                r.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    outln!(
        "{}",
        output::table(&["RELEASE", "STATUS", "CONTENT", "CREATED (UTC)", "BUILD", "SCHEMA", "MESSAGE"], &rows)
            .trim_end()
    );
    Ok(0)
}

// ---------------------------------------------------------------- upgrade

async fn upgrade(home: &Home, json: bool) -> anyhow::Result<i32> {
    let c = client(home);
    let before = c.ping().await?;
    let r: nonstop_api::wire::Upgraded = c.post("/v1/upgrade", &serde_json::json!({})).await?;
    let new_pid = r.new_pid;
    // The socket is the same; wait until the successor answers on it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        match c.ping().await {
            Ok(p) if p.pid == new_pid => break p,
            _ if Instant::now() > deadline => anyhow::bail!(
                "the new daemon (pid {new_pid}) did not answer within 60s; see {}",
                home.daemon_log().display()
            ),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    // The data plane (the keeper's proxy) is not replaced by an upgrade.
    let keeper = std::fs::read_to_string(crate::keeper::pid_path(home))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    if json {
        outln!(
            "{}",
            serde_json::json!({"old_pid": before.pid, "new_pid": after.pid, "old_version": before.version, "new_version": after.version,
                "data_plane": keeper.map(|pid| serde_json::json!({"pid": pid, "upgraded": false}))})
        );
    } else {
        outln!(
            "nonstop daemon upgraded: pid {} ({}) → pid {} ({}); the app kept running",
            before.pid,
            before.version,
            after.pid,
            after.version
        );
        if let Some(pid) = keeper {
            outln!(
                "the data plane (the proxy, in keeper pid {pid}) was not replaced: it runs the binary it was started \
                 from until the keeper restarts (`systemctl restart nonstop`, or `nonstop down` then `nonstop up`)"
            );
        }
    }
    Ok(0)
}
