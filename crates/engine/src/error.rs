use serde::Serialize;

/// What went wrong with a command, worded for the person who ran it: what
/// happened and what to do about it.
#[derive(Debug, Clone, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum EngineError {
    #[error("no app is up in this nonstop home; run `nonstop up` in the app directory")]
    NotUp,
    #[error("this nonstop home already runs app `{running}`, not `{requested}`; run `nonstop down` there first, or use another NONSTOP_HOME")]
    OtherApp { running: String, requested: String },
    #[error("several apps run in environment `{env}` ({}); name one (`--app NAME`, or run the command in the app's directory)", apps.join(", "))]
    AmbiguousApp { env: String, apps: Vec<String> },
    #[error("app `{app}` has no environment `{env}` here (it has: {}); check the name, or deploy to it to create it", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownEnvironment { app: String, env: String, known: Vec<String> },
    #[error("another operation ({operation}) is in progress since {since}; wait for it to finish and try again (a deploy, rollback or rolling restart can be stopped with `nonstop cancel`)")]
    Busy { operation: String, since: String },
    #[error("{task} of deployment #{deployment} still runs (pid {pid}), started by a daemon that stopped; the tasks of two deployments never run at once: wait until it has ended (`nonstop history` says how it ended), or stop it with `kill -TERM -{pid}`, and deploy again")]
    TaskRunning { task: String, pid: u32, deployment: i64 },
    #[error(
        "{operation} cannot be cancelled: it ends by itself once its instances are ready, or at their health timeout"
    )]
    NotCancellable { operation: String },
    #[error("the spec cannot run as written:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Preflight { problems: Vec<String> },
    #[error("the proxy cannot listen on {addr}: {reason}; free the port or set [proxy] listen in nonstop.toml (or NONSTOP_PROXY_LISTEN)")]
    Listen { addr: String, reason: String },
    #[error("the proxy settings cannot be used: {reason}; fix [proxy] in nonstop.toml")]
    ProxyConfig { reason: String },
    /// A host (or the default) another environment holds: `reason` names it.
    #[error("{reason}")]
    HostConflict { reason: String },
    /// The data plane (the keeper's proxy) could not do what was asked.
    #[error("the proxy did not take the change: {reason}")]
    DataPlane { reason: String },
    #[error("unknown process type `{name}`; this app has: {known}")]
    UnknownProcess { name: String, known: String },
    #[error("{process} is a singleton: it runs 0 or 1 instance, not {requested}")]
    SingletonCount { process: String, requested: u32 },
    #[error("{process}: {reason}")]
    OutsideAutoscaleBounds { process: String, reason: String },
    #[error("{instance} did not become {what} within {timeout_s}s{}{}\nthe app stays up as it is; fix the problem and run the command again, or `nonstop down`", fmt_block("last health checks", checks), fmt_block("last log lines", logs))]
    NotReady { instance: String, what: String, timeout_s: u64, checks: Vec<String>, logs: Vec<String> },
    #[error("{instance} keeps exiting ({exit}) and is crash-looping{}\nthe app stays up as it is; fix the command and run the command again, or `nonstop down`", fmt_block("last log lines", logs))]
    CrashLoop { instance: String, exit: String, logs: Vec<String> },
    #[error("rolling restart of {process} stopped: {reason}; the instances that were running before are kept")]
    RolloutFailed { process: String, reason: String },
    #[error("deploy of {release} failed: {reason}\nnothing that was running changed")]
    DeployFailed { release: String, reason: String },
    #[error("deploy of {release} was rolled back: {reason}\n{}", if *first { "nothing runs now: this was the app's first release" } else { "the previous release keeps serving" })]
    RolledBack { release: String, reason: String, first: bool },
    #[error("post task of {release} failed: {reason}\n{release} is live")]
    PostTaskFailed { release: String, reason: String },
    #[error("cannot roll back: {reason}")]
    NoRollbackTarget { reason: String },
    #[error("cannot deploy: {reason}")]
    CannotDeploy { reason: String },
    #[error("cannot promote: {reason}")]
    CannotPromote { reason: String },
    /// A `config set|unset` that is refused; `reason` names the fix.
    #[error("{reason}")]
    InvalidConfig { reason: String },
    #[error("{release} is not a retained release; retained releases: {retained} (see `nonstop releases`)")]
    UnknownRelease { release: String, retained: String },
    #[error("the app is stopped (since {since}, by {who}): `{operation}` would change what runs; run `nonstop start` first (it brings back {counts})")]
    Stopped { operation: String, since: String, who: String, counts: String },
    #[error("start did not finish: {reason}\nthe counts are back and the app stays in maintenance until web is healthy (then maintenance goes off by itself); fix the problem (a deploy or `nonstop restart` works now) and check `nonstop status`, or `nonstop maintenance off` to open the app as it is")]
    StartFailed { reason: String },
    #[error("{reason}")]
    Secrets { reason: String },
    #[error("secret {name} cannot be unset in environment `{env}`: its processes need it, and nothing was changed:\n{}\nchange it instead (`nonstop -e {env} secrets set {name}`), or give them another in nonstop.toml ([env] {name}, or [base] redis) and deploy, or deploy without the `queue` that reads it", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    SecretInUse { name: String, env: String, problems: Vec<String> },
    #[error("secret {name} is not set for {app} in {env} ({}); nothing changed", if known.is_empty() { "it has no secrets".to_string() } else { format!("its secrets: {}", known.join(", ")) })]
    UnknownSecret { name: String, app: String, env: String, known: Vec<String> },
    /// The base services (`[base]`) refused or failed: `reason` says why
    /// and what changed.
    #[error("{reason}")]
    Base { reason: String, bad_input: bool },
    #[error("app `{app}` already has environment `{env}`{detail}; choose another name, or change it with `nonstop -e {env} deploy` (`nonstop env destroy {env}` removes it)")]
    EnvironmentExists { app: String, env: String, detail: String },
    #[error("environment `{env}` of `{app}` is protected (`protected = true` in [environments.{env}] of nonstop.toml): `env destroy` refuses it, and nothing was changed; take `protected = true` out and deploy it first if it really is to go")]
    Protected { app: String, env: String },
    #[error("environment `{env}` of `{app}` is being destroyed: the `env destroy` {who} began at {since}{} did not finish, so nothing else is done there; finish it with `nonstop env destroy {env}` (in the app's directory: its [base] names the servers), then create it again if it is to come back", if *drop_data { " (with --drop-database)" } else { "" })]
    Destroying { app: String, env: String, who: String, since: String, drop_data: bool },
    #[error("--drop-database needs the environment's database named again: type `{database}` (you typed `{typed}`); nothing was changed (without --drop-database, env destroy keeps the database)")]
    DropNotConfirmed { database: String, typed: String },
    #[error("state store: {source}")]
    Store {
        /// Shared: an `EngineError` is cloned to every waiter of an
        /// operation, and `StoreError` (rusqlite's, io's) is not `Clone`.
        #[serde(rename = "reason", serialize_with = "display")]
        source: std::sync::Arc<nonstop_store::StoreError>,
    },
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// Serializes an error as its message (`--json` and the API's `detail`).
fn display<S: serde::Serializer, E: std::fmt::Display>(value: &E, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn fmt_block(title: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = format!("\n{title}:");
    for l in lines {
        s.push_str("\n  ");
        s.push_str(l);
    }
    s
}

impl From<nonstop_store::StoreError> for EngineError {
    fn from(e: nonstop_store::StoreError) -> Self {
        EngineError::Store { source: std::sync::Arc::new(e) }
    }
}

impl From<nonstop_core::ingress::IngressError> for EngineError {
    fn from(e: nonstop_core::ingress::IngressError) -> Self {
        use nonstop_core::ingress::{HostsError, IngressError};
        match e {
            IngressError::Listen(addr, reason) => EngineError::Listen { addr, reason },
            IngressError::Config(reason) => EngineError::ProxyConfig { reason },
            IngressError::Hosts(e @ HostsError::Invalid { .. }) => {
                EngineError::Preflight { problems: vec![e.to_string()] }
            }
            IngressError::Hosts(e) => EngineError::HostConflict { reason: e.to_string() },
            IngressError::Unavailable(reason) => EngineError::DataPlane { reason },
        }
    }
}

impl EngineError {
    /// Exit code for the CLI: 1 = the operation failed, 2 = bad input, 3 = conflict.
    pub fn exit_code(&self) -> i32 {
        match self {
            EngineError::Preflight { .. }
            | EngineError::UnknownProcess { .. }
            | EngineError::SingletonCount { .. }
            | EngineError::OutsideAutoscaleBounds { .. }
            | EngineError::Listen { .. }
            | EngineError::ProxyConfig { .. }
            | EngineError::NoRollbackTarget { .. }
            | EngineError::CannotDeploy { .. }
            | EngineError::CannotPromote { .. }
            | EngineError::InvalidConfig { .. }
            | EngineError::UnknownRelease { .. }
            | EngineError::AmbiguousApp { .. }
            | EngineError::UnknownSecret { .. }
            | EngineError::SecretInUse { .. }
            | EngineError::Protected { .. }
            | EngineError::DropNotConfirmed { .. }
            | EngineError::Base { bad_input: true, .. }
            | EngineError::UnknownEnvironment { .. } => 2,
            EngineError::OtherApp { .. }
            | EngineError::Busy { .. }
            | EngineError::TaskRunning { .. }
            | EngineError::NotUp
            | EngineError::HostConflict { .. }
            | EngineError::Stopped { .. }
            | EngineError::EnvironmentExists { .. }
            | EngineError::Destroying { .. }
            | EngineError::NotCancellable { .. } => 3,
            _ => 1,
        }
    }
}
