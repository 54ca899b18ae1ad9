//! `environment`, `[base]` and `[environments.NAME]`: what differs between
//! the environments of the app, validated.
//!
//! An environment's overrides are checked where they are written, and
//! again merged with the rest of the file (a `count` of an environment
//! against the process's `[rollout]`, a `[health]` key against the
//! others), with the same rules as the file itself. A problem the file's
//! own check already found at a place is reported once (see
//! [`Diags::extend_new`]).

use crate::database::{
    check_conflicts, file_env_tables, mapping_of, resolve_variable, validate_database, DatabaseTables,
};
use crate::env::EnvLookup;
use crate::error::Diags;
use crate::raw::*;
use crate::suggest::did_you_mean;
use crate::validate::{validate_env, validate_process};
use crate::walk::display_key;
use nonstop_core::database::{DatabaseSpec, UrlError};
use nonstop_core::environment::{
    check_host, default_host, environment_name, parse_postgres_server, suggest_host, BaseSpec, BaseUrlError, HostError,
    RedisUrl, RedisUrlError,
};
use nonstop_core::ids::{AppName, EnvironmentId, ProcessName};
use nonstop_core::process::ProcessSpec;
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::ops::Range;

/// The environments of a file, validated; the problems that depend on
/// nonstop's environment variables are kept per environment.
#[derive(Debug, Default)]
pub(crate) struct Environments {
    /// `environment = "..."`, or `default`.
    pub default_environment: Option<EnvironmentId>,
    /// The default environment first if it has no table, then the tables
    /// in file order.
    pub declared: Vec<EnvironmentId>,
    pub overrides: BTreeMap<EnvironmentId, Override>,
    /// The environment that answers the hosts nobody claims, if any.
    pub catch_all: Option<EnvironmentId>,
    pub base: Option<BaseSpec>,
}

/// `[environments.NAME]`, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct Override {
    /// `[environments.NAME.env]`: over `[env]` and every process's `env`.
    pub env: BTreeMap<String, String>,
    pub processes: BTreeMap<ProcessName, ProcessOverride>,
    /// `None`: `NAME.APP.localhost`.
    pub hosts: Option<Vec<String>>,
    pub protected: bool,
    /// `Some`: the environment has a `[database]` of its own (merged over
    /// the file's); `Err`: its url reads a variable that is unset or wrong
    /// in nonstop's environment (when the file itself is right).
    pub database: Option<Result<DatabaseSpec, Diags>>,
}

/// `[environments.NAME.processes.PROCESS]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessOverride {
    /// The process with the environment's `count`, `[health]` and
    /// `[rollout]` keys merged in; its `env` is the file's.
    pub spec: ProcessSpec,
    /// `[environments.NAME.processes.PROCESS.env]`: over everything.
    pub env: BTreeMap<String, String>,
}

pub(crate) fn validate_environments(raw: &RawSpec, env: &dyn EnvLookup, diags: &mut Diags) -> Environments {
    let mut out = Environments { base: raw.base.as_ref().map(|b| validate_base(b, env, diags)), ..Default::default() };
    // The app's name, for default hosts; its problems are the file's.
    let app = raw.app.as_ref().and_then(|a| AppName::new(a.get_ref().as_str()).ok());
    let mut tables: Vec<(EnvironmentId, &Spanned<RawEnvironment>)> = Vec::new();
    for (name, table) in raw.environments.iter().flat_map(|e| e.get_ref().iter()) {
        match environment_name(name.get_ref()) {
            Ok(id) => {
                let o = validate_override(&id, table, raw, env, diags);
                out.overrides.insert(id.clone(), o);
                tables.push((id, table));
            }
            Err(e) => diags.error(
                name.span(),
                format!("invalid environment name {} in [environments]: {}", display_key(name.get_ref()), e.rule),
                format!("it becomes part of host and database names; for example: [environments.{}]", e.suggestion),
            ),
        }
    }
    let declared_names: Vec<&str> = tables.iter().map(|(id, _)| id.as_str()).collect();
    let default_environment = match &raw.environment {
        None => Some(EnvironmentId::default_env()),
        Some(value) => match environment_name(value.get_ref()) {
            Ok(id) => {
                if !declared_names.contains(&id.as_str()) {
                    if let Some(close) = did_you_mean(id.as_str(), &declared_names) {
                        diags.error(
                            value.span(),
                            format!(
                                "`environment` names {:?}, which no [environments.NAME] table declares",
                                id.as_str()
                            ),
                            format!(
                                "did you mean environment = \"{close}\"? (if {:?} is meant, give it a table, even an empty one: [environments.{}])",
                                id.as_str(),
                                id
                            ),
                        );
                    }
                }
                Some(id)
            }
            Err(e) => {
                diags.error(
                    value.span(),
                    format!("`environment` is not a valid environment name ({:?}): {}", value.get_ref(), e.rule),
                    format!("for example: environment = \"{}\"", e.suggestion),
                );
                None
            }
        },
    };
    if let Some(default) = &default_environment {
        if !tables.iter().any(|(id, _)| id == default) {
            out.declared.push(default.clone());
        }
    }
    out.declared.extend(tables.iter().map(|(id, _)| id.clone()));
    out.catch_all = catch_all(&tables, default_environment.as_ref(), diags);
    out.default_environment = default_environment;
    check_hosts(&out, &tables, app.as_ref(), diags);
    out
}

const BASE_POSTGRES_EXAMPLE: &str = "postgres://ADMIN:PASSWORD@HOST:5432/";

fn validate_base(raw: &Spanned<RawBase>, env: &dyn EnvLookup, diags: &mut Diags) -> BaseSpec {
    let RawBase { postgres, redis } = raw.get_ref();
    // The servers every environment shares: a variable they read that is
    // unset is a problem wherever the file is used, so it is the file's.
    let postgres = postgres.as_ref().and_then(|value| {
        let what = "`postgres` in [base]";
        let (text, var) = variable_or_text(value, "postgres", what, BASE_POSTGRES_EXAMPLE, env, diags)?;
        parse_postgres_server(&text)
            .map_err(|e| {
                let hint = match &e {
                    BaseUrlError::Tls { .. } => "connect without TLS (on a private network): leave sslmode out or set ?sslmode=disable, and drop the ssl* parameters".to_string(),
                    BaseUrlError::Postgres(UrlError::Escape | UrlError::Character) => format!(
                        "percent-encode special characters of the user and password (@ is %40, : is %3A, / is %2F): postgres = \"{BASE_POSTGRES_EXAMPLE}\""
                    ),
                    BaseUrlError::Postgres(_) => format!(
                        "give an administrator's connection to the server that holds the environments' databases: postgres = \"{BASE_POSTGRES_EXAMPLE}\""
                    ),
                };
                // The value is not repeated: it may hold a password.
                diags.error(value.span(), format!("{} is not a usable PostgreSQL URL: {e}", whose(what, var.as_deref())), hint);
            })
            .ok()
    });
    let redis = redis.as_ref().and_then(|value| {
        let what = "`redis` in [base]";
        let (text, var) = variable_or_text(value, "redis", what, "redis://HOST:6379", env, diags)?;
        RedisUrl::parse(&text)
            .map_err(|e| {
                let hint = match e {
                    RedisUrlError::Tls => "connect without TLS (on a private network): redis = \"redis://HOST:6379\"".to_string(),
                    RedisUrlError::Escape | RedisUrlError::Character => {
                        "percent-encode special characters of the password (@ is %40, : is %3A, / is %2F): redis = \"redis://:PASSWORD@HOST:6379\"".to_string()
                    }
                    _ => "for example: redis = \"redis://127.0.0.1:6379\" (or \"redis://:PASSWORD@HOST:6379\")".to_string(),
                };
                diags.error(value.span(), format!("{} is not a usable Redis URL: {e}", whose(what, var.as_deref())), hint);
            })
            .ok()
    });
    BaseSpec { postgres, redis }
}

/// The text of a `[base]` URL, or of the variable it reads. The servers
/// every environment shares: a variable they read that is not set is a
/// problem wherever the file is used, so it is the file's.
fn variable_or_text(
    value: &Spanned<String>,
    key: &str,
    what: &str,
    example: &str,
    env: &dyn EnvLookup,
    diags: &mut Diags,
) -> Option<(String, Option<String>)> {
    let mut unset = Diags::default();
    let resolved = resolve_variable(value, key, what, example, env, diags, &mut unset);
    diags.extend(unset);
    resolved
}

fn whose(what: &str, var: Option<&str>) -> String {
    match var {
        Some(var) => format!("the value of ${var} (read by {what})"),
        None => what.to_string(),
    }
}

fn validate_override(
    id: &EnvironmentId,
    table: &Spanned<RawEnvironment>,
    raw: &RawSpec,
    env: &dyn EnvLookup,
    diags: &mut Diags,
) -> Override {
    let path = format!("environments.{id}");
    let RawEnvironment { hosts, default: _, protected, env: own_env, processes, database } = table.get_ref();
    let mut out = Override {
        hosts: hosts.as_ref().map(|list| validate_hosts(list, &path, diags)),
        protected: protected.as_ref().is_some_and(|p| *p.get_ref()),
        env: own_env.as_ref().map(|e| validate_env(e, &format!("{path}.env"), diags)).unwrap_or_default(),
        ..Default::default()
    };
    let declared: Vec<&str> =
        raw.processes.iter().flat_map(|p| p.get_ref().iter()).map(|(name, _)| name.get_ref().as_str()).collect();
    // Every `env` table the processes of this environment read.
    let mut env_tables = file_env_tables(raw);
    if let Some(e) = own_env {
        env_tables.push((format!("{path}.env"), e));
    }
    for (name, o) in processes.iter().flat_map(|p| p.get_ref().iter()) {
        let n = name.get_ref().as_str();
        let ppath = format!("{path}.processes.{}", display_key(n));
        if let Some(e) = &o.get_ref().env {
            env_tables.push((format!("{ppath}.env"), e));
        }
        let Some((_, base)) = raw.processes.iter().flat_map(|p| p.get_ref().iter()).find(|(b, _)| b.get_ref() == n)
        else {
            let mean = did_you_mean(n, &declared).map(|d| format!("did you mean `{d}`? ")).unwrap_or_default();
            diags.error(
                name.span(),
                format!("[{ppath}] overrides the process {}, which the file does not define", display_key(n)),
                format!(
                    "{mean}an environment changes the settings of the processes of [processes.NAME]: {}",
                    if declared.is_empty() { "(none yet)".to_string() } else { declared.join(", ") }
                ),
            );
            continue;
        };
        let merged = merge_process(base, o.get_ref());
        let mut again = Diags::default();
        let spec = validate_process(n, ProcessName::new(n).ok(), &ppath, &merged, &mut again);
        diags.extend_new(again);
        let own = o.get_ref().env.as_ref().map(|e| validate_env(e, &format!("{ppath}.env"), diags)).unwrap_or_default();
        if let Some(spec) = spec {
            out.processes.insert(spec.name.clone(), ProcessOverride { spec, env: own });
        }
    }
    match (database, &raw.database) {
        (Some(own), file) => {
            let file = file.as_ref().map(|f| f.get_ref());
            let mine = own.get_ref();
            let merged = Spanned::new(
                own.span(),
                RawDatabase {
                    url: mine.url.clone().or_else(|| file.and_then(|f| f.url.clone())),
                    env: mine.env.clone().or_else(|| file.and_then(|f| f.env.clone())),
                },
            );
            let from = |own: bool| if own { format!("{path}.database") } else { "database".to_string() };
            let tables = DatabaseTables {
                table: format!("{path}.database"),
                url_from: from(mine.url.is_some() || file.is_none_or(|f| f.url.is_none())),
                env_from: from(mine.env.is_some()),
                env_tables,
            };
            let (mut again, mut deferred) = (Diags::default(), Diags::default());
            let database = validate_database(&merged, &tables, env, &mut again, &mut deferred);
            diags.extend_new(again);
            out.database = Some(database.ok_or(deferred));
        }
        (None, Some(file)) => {
            // The file's [database] fills its variables here too.
            if let Some(mapping) = mapping_of(file.get_ref()) {
                let own: Vec<_> = env_tables.into_iter().filter(|(t, _)| t.starts_with(&path)).collect();
                check_conflicts(&mapping, "database", &own, diags);
            }
        }
        (None, None) => {}
    }
    out
}

/// The file's process with an environment's keys merged in, key by key.
fn merge_process(base: &Spanned<RawProcess>, o: &RawProcessOverride) -> Spanned<RawProcess> {
    let RawProcessOverride { count, env: _, health, rollout, autoscale } = o;
    let b = base.get_ref();
    Spanned::new(
        base.span(),
        RawProcess {
            count: count.clone().or_else(|| b.count.clone()),
            health: merge_health(b.health.as_ref(), health.as_ref()),
            rollout: merge_rollout(b.rollout.as_ref(), rollout.as_ref()),
            autoscale: merge_autoscale(b.autoscale.as_ref(), autoscale.as_ref()),
            ..b.clone()
        },
    )
}

fn merge_autoscale(
    base: Option<&Spanned<RawAutoscale>>,
    over: Option<&Spanned<RawAutoscale>>,
) -> Option<Spanned<RawAutoscale>> {
    let (Some(b), Some(o)) = (base, over) else { return over.or(base).cloned() };
    // Every key, by name: a key added to the table must be merged too.
    let RawAutoscale {
        min,
        max,
        cpu_percent,
        requests_per_instance,
        p95_ms,
        queue_per_instance,
        scale_out_cooldown,
        scale_in_cooldown,
        scale_in_window,
        max_step,
    } = o.get_ref();
    let b = b.get_ref();
    Some(Spanned::new(
        o.span(),
        RawAutoscale {
            min: pick(min, &b.min),
            max: pick(max, &b.max),
            cpu_percent: pick(cpu_percent, &b.cpu_percent),
            requests_per_instance: pick(requests_per_instance, &b.requests_per_instance),
            p95_ms: pick(p95_ms, &b.p95_ms),
            queue_per_instance: pick(queue_per_instance, &b.queue_per_instance),
            scale_out_cooldown: pick(scale_out_cooldown, &b.scale_out_cooldown),
            scale_in_cooldown: pick(scale_in_cooldown, &b.scale_in_cooldown),
            scale_in_window: pick(scale_in_window, &b.scale_in_window),
            max_step: pick(max_step, &b.max_step),
        },
    ))
}

fn pick<T: Clone>(over: &Option<T>, base: &Option<T>) -> Option<T> {
    over.clone().or_else(|| base.clone())
}

fn merge_health(base: Option<&Spanned<RawHealth>>, over: Option<&Spanned<RawHealth>>) -> Option<Spanned<RawHealth>> {
    let (Some(b), Some(o)) = (base, over) else { return over.or(base).cloned() };
    // Every key, by name: a key added to the table must be merged too.
    let RawHealth { path, interval, timeout, healthy_threshold, unhealthy_threshold, expect_status, host, smoke } =
        o.get_ref();
    let b = b.get_ref();
    Some(Spanned::new(
        o.span(),
        RawHealth {
            path: pick(path, &b.path),
            interval: pick(interval, &b.interval),
            timeout: pick(timeout, &b.timeout),
            healthy_threshold: pick(healthy_threshold, &b.healthy_threshold),
            unhealthy_threshold: pick(unhealthy_threshold, &b.unhealthy_threshold),
            expect_status: pick(expect_status, &b.expect_status),
            host: pick(host, &b.host),
            smoke: pick(smoke, &b.smoke),
        },
    ))
}

fn merge_rollout(
    base: Option<&Spanned<RawRollout>>,
    over: Option<&Spanned<RawRollout>>,
) -> Option<Spanned<RawRollout>> {
    let (Some(b), Some(o)) = (base, over) else { return over.or(base).cloned() };
    let RawRollout {
        max_surge,
        max_unavailable,
        health_timeout,
        canary,
        canary_hold,
        canary_max_5xx_increase,
        canary_max_p95_ratio,
        canary_p95_slack,
        canary_min_requests,
    } = o.get_ref();
    let b = b.get_ref();
    Some(Spanned::new(
        o.span(),
        RawRollout {
            max_surge: pick(max_surge, &b.max_surge),
            max_unavailable: pick(max_unavailable, &b.max_unavailable),
            health_timeout: pick(health_timeout, &b.health_timeout),
            canary: pick(canary, &b.canary),
            canary_hold: pick(canary_hold, &b.canary_hold),
            canary_max_5xx_increase: pick(canary_max_5xx_increase, &b.canary_max_5xx_increase),
            canary_max_p95_ratio: pick(canary_max_p95_ratio, &b.canary_max_p95_ratio),
            canary_p95_slack: pick(canary_p95_slack, &b.canary_p95_slack),
            canary_min_requests: pick(canary_min_requests, &b.canary_min_requests),
        },
    ))
}

fn validate_hosts(list: &Spanned<Vec<Spanned<String>>>, path: &str, diags: &mut Diags) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in list.get_ref() {
        let host = item.get_ref();
        match check_host(host) {
            Ok(()) if out.contains(host) => diags.error(
                item.span(),
                format!("host {host:?} is listed twice in `hosts` of [{path}]"),
                "remove one of them",
            ),
            Ok(()) => out.push(host.clone()),
            Err(e) => {
                let hint = match (suggest_host(host), e) {
                    (Some(fixed), _) => format!("for example: hosts = [\"{fixed}\"]"),
                    (None, HostError::Wildcard) => {
                        "for example: hosts = [\"*.review.example.com\"] (matches pr-1.review.example.com, not a.b.review.example.com)".to_string()
                    }
                    (None, _) => "for example: hosts = [\"staging.example.com\", \"*.review.example.com\"]".to_string(),
                };
                diags.error(item.span(), format!("invalid host {host:?} in `hosts` of [{path}]: {e}"), hint);
            }
        }
    }
    out
}

/// Which environment answers the hosts nobody claims: the one with
/// `default = true`, else the default environment unless its table says
/// `default = false`.
fn catch_all(
    tables: &[(EnvironmentId, &Spanned<RawEnvironment>)],
    default_environment: Option<&EnvironmentId>,
    diags: &mut Diags,
) -> Option<EnvironmentId> {
    let chosen: Vec<(&EnvironmentId, Range<usize>)> = tables
        .iter()
        .filter_map(|(id, t)| t.get_ref().default.as_ref().filter(|d| *d.get_ref()).map(|d| (id, d.span())))
        .collect();
    if chosen.len() > 1 {
        let names: Vec<&str> = chosen.iter().map(|(id, _)| id.as_str()).collect();
        for (id, span) in &chosen {
            diags.error(
                span.clone(),
                format!(
                    "`default = true` in [environments.{id}]: {} environments answer the hosts no environment claims ({})",
                    chosen.len(),
                    names.join(", ")
                ),
                "only one can: keep `default = true` in one of them and remove it from the others",
            );
        }
    }
    if let Some((id, _)) = chosen.first() {
        return Some((*id).clone());
    }
    let default = default_environment?;
    let refused =
        tables.iter().any(|(id, t)| id == default && t.get_ref().default.as_ref().is_some_and(|d| !d.get_ref()));
    (!refused).then(|| default.clone())
}

/// One host an environment answers, and where it is written (`None`: its
/// default host).
struct Claim<'a> {
    environment: &'a EnvironmentId,
    span: Option<Range<usize>>,
}

/// Two environments may not answer one host (an exact host beats a
/// wildcard, so a wildcard and a host it matches are fine).
fn check_hosts(
    out: &Environments,
    tables: &[(EnvironmentId, &Spanned<RawEnvironment>)],
    app: Option<&AppName>,
    diags: &mut Diags,
) {
    let mut claims: BTreeMap<String, Vec<Claim<'_>>> = BTreeMap::new();
    for environment in &out.declared {
        let written = tables.iter().find(|(id, _)| id == environment).and_then(|(_, t)| t.get_ref().hosts.as_ref());
        match written {
            Some(list) => {
                for item in list.get_ref() {
                    if check_host(item.get_ref()).is_ok() {
                        let claim = Claim { environment, span: Some(item.span()) };
                        let all = claims.entry(item.get_ref().clone()).or_default();
                        // Twice in one environment was reported already.
                        if !all.iter().any(|c| c.environment == environment) {
                            all.push(claim);
                        }
                    }
                }
            }
            None => {
                if let Some(app) = app {
                    claims.entry(default_host(environment, app)).or_default().push(Claim { environment, span: None });
                }
            }
        }
    }
    for (host, all) in claims.iter().filter(|(_, all)| all.len() > 1) {
        let names: Vec<String> = all
            .iter()
            .map(|c| match c.span {
                Some(_) => c.environment.to_string(),
                None => format!("{} (its default host)", c.environment),
            })
            .collect();
        let list = match names.as_slice() {
            [a, b] => format!("two environments, {a} and {b}"),
            _ => format!("{} environments: {}", names.len(), names.join(", ")),
        };
        for claim in all {
            if let Some(span) = &claim.span {
                diags.error(
                    span.clone(),
                    format!("host {host:?} is claimed by {list}"),
                    "a host is answered by one environment: remove it from all but one (a wildcard and a host it matches are fine: the exact host wins)",
                );
            }
        }
    }
}
