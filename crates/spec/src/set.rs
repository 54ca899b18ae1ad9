//! [`SpecSet`]: a loaded `nonstop.toml` with all of its environments, and
//! the spec of each one ([`SpecSet::resolve`]).

use crate::environments::{Environments, Override, ProcessOverride};
use crate::error::{Diags, SpecErrors};
use nonstop_core::database::DatabaseSpec;
use nonstop_core::environment::{
    answering, default_host, environment_name, BaseSpec, EnvironmentNameError, ENVIRONMENT_VAR,
};
use nonstop_core::ids::{AppName, EnvironmentId, ProcessName};
use nonstop_core::process::AppSpec;
use std::collections::BTreeMap;
use std::fmt;

/// A valid `nonstop.toml`: the app's spec as the file gives it (the base)
/// and what each environment changes, like Terraform's `*.tfvars` over
/// its variables.
///
/// Resolving an environment ([`SpecSet::resolve`]), pure:
///
/// - `[env]`, then `[environments.E.env]` over it; the environment's
///   variables also win over each process's own `[processes.P.env]` (a
///   value set for an environment is that environment's everywhere), and
///   `[environments.E.processes.P.env]` wins over all. A variable set to
///   `""` is set, to the empty string: an environment cannot remove a
///   variable of the file (move it to the environments that need it);
/// - a process's `count`, and its `[health]`, `[rollout]` and `[autoscale]` keys one by
///   one, from `[environments.E.processes.P]`;
/// - `[environments.E.database]` key by key over `[database]` (its `url`,
///   its `[env]` mapping);
/// - `base`: `[base]`, the same for every environment;
/// - `hosts`: the environment's, or `E.APP.localhost`; `default_host`:
///   whether it answers the hosts no environment claims (the one with
///   `default = true`, else the default environment, unless its table says
///   `default = false`); `protected`.
///
/// An environment without a table (one created later, ad hoc) gets the
/// base with its default host. Everything else (`[proxy]`, `build`,
/// `[release]`, `[static]`, commands and kinds) is the same everywhere:
/// every environment runs the same releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecSet {
    base: AppSpec,
    /// `Err`: the file's `[database]` url reads a variable that is unset
    /// or wrong here; only the environments that use it fail.
    base_database: Result<Option<DatabaseSpec>, SpecErrors>,
    default_environment: EnvironmentId,
    declared: Vec<EnvironmentId>,
    overrides: BTreeMap<EnvironmentId, Resolved>,
    catch_all: Option<EnvironmentId>,
    services: Option<BaseSpec>,
}

/// An environment's overrides (see `environments::Override`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    env: BTreeMap<String, String>,
    processes: BTreeMap<ProcessName, ProcessOverride>,
    hosts: Option<Vec<String>>,
    protected: bool,
    /// `Some` when it has a `[database]` of its own; `Err` when that reads
    /// a variable that is unset or wrong here.
    database: Option<Result<DatabaseSpec, SpecErrors>>,
}

/// Where the environment of a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChoiceSource {
    /// `-e NAME` / `--env NAME`.
    Flag,
    /// The `NONSTOP_ENV` environment variable.
    Variable,
    /// `environment = "..."` in the file, or `default`.
    Spec,
}

impl fmt::Display for ChoiceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChoiceSource::Flag => f.write_str("-e/--env"),
            ChoiceSource::Variable => f.write_str(ENVIRONMENT_VAR),
            ChoiceSource::Spec => f.write_str("`environment` in nonstop.toml"),
        }
    }
}

/// The environment a command works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub environment: EnvironmentId,
    /// Whether the file names it (a table, or `environment`). An
    /// environment it does not name may exist all the same (created ad
    /// hoc): whether to accept it is for the caller, who knows which exist.
    pub declared: bool,
    pub source: ChoiceSource,
}

/// `-e` or `NONSTOP_ENV` is not a valid environment name. Nothing was
/// looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given_by} names an invalid environment")]
pub struct ChooseError {
    pub given_by: ChoiceSource,
    #[source]
    pub error: EnvironmentNameError,
}

impl SpecSet {
    /// `errors` turns the problems found while validating into located
    /// errors.
    pub(crate) fn new(
        base: AppSpec,
        base_database: Result<Option<DatabaseSpec>, SpecErrors>,
        environments: Environments,
        errors: impl Fn(Diags) -> SpecErrors,
    ) -> SpecSet {
        let Environments { default_environment, declared, overrides, catch_all, base: services } = environments;
        let overrides = overrides
            .into_iter()
            .map(|(id, o)| {
                let Override { env, processes, hosts, protected, database } = o;
                let database = database.map(|db| db.map_err(&errors));
                (id, Resolved { env, processes, hosts, protected, database })
            })
            .collect();
        // Every environment's spec carries `[base]` to the daemon, which
        // provisions from it (and never stores it).
        let mut base = base;
        base.base = services.clone();
        SpecSet {
            base,
            base_database,
            default_environment: default_environment.unwrap_or_else(EnvironmentId::default_env),
            declared,
            overrides,
            catch_all,
            services,
        }
    }

    /// The app's name.
    pub fn app(&self) -> &AppName {
        &self.base.app
    }

    /// The spec as the file gives it, for no environment: no hosts, not
    /// the catch-all, not protected; no database when `[database]` reads a
    /// variable that is not usable here.
    pub fn base(&self) -> &AppSpec {
        &self.base
    }

    /// `[base]`: the servers the environments share, if the file has it.
    pub fn base_services(&self) -> Option<&BaseSpec> {
        self.services.as_ref()
    }

    /// `environment = "..."`, or `default`: what commands use when neither
    /// `-e` nor `NONSTOP_ENV` names one.
    pub fn default_environment(&self) -> &EnvironmentId {
        &self.default_environment
    }

    /// The environments the file names: the default one first unless it
    /// has a table, then the `[environments.NAME]` tables in file order.
    /// Never empty.
    pub fn environments(&self) -> &[EnvironmentId] {
        &self.declared
    }

    /// Whether the file names `environment`.
    pub fn is_declared(&self, environment: &EnvironmentId) -> bool {
        self.declared.contains(environment)
    }

    /// The environment that answers every host no environment claims.
    pub fn catch_all(&self) -> Option<&EnvironmentId> {
        self.catch_all.as_ref()
    }

    /// Whether `environment` is `protected = true`.
    pub fn is_protected(&self, environment: &EnvironmentId) -> bool {
        self.overrides.get(environment).is_some_and(|r| r.protected)
    }

    /// The hosts `environment` answers: its `hosts`, or its default host
    /// (`ENV.APP.localhost`); an environment the file does not name gets
    /// its default host.
    pub fn hosts(&self, environment: &EnvironmentId) -> Vec<String> {
        match self.overrides.get(environment).and_then(|r| r.hosts.clone()) {
            Some(hosts) => hosts,
            None => vec![default_host(environment, &self.base.app)],
        }
    }

    /// The declared environment whose hosts (exact, or else a wildcard)
    /// match `host` (lowercase, without its port); the catch-all does not
    /// count. For checking that an ad hoc environment's host is free.
    pub fn claimed_by(&self, host: &str) -> Option<&EnvironmentId> {
        let hosts: Vec<(&EnvironmentId, Vec<String>)> = self.declared.iter().map(|e| (e, self.hosts(e))).collect();
        answering(hosts.iter().map(|(e, h)| (*e, h.as_slice(), false)), host)
            .and_then(|e| self.declared.iter().find(|d| *d == e))
    }

    /// The environment a command works on: `-e` (`flag`) wins over
    /// `NONSTOP_ENV` (`variable`; empty counts as unset), which wins over
    /// the file's default. Surrounding spaces are ignored. An environment
    /// the file does not name is no error here ([`Choice::declared`]).
    pub fn choose(&self, flag: Option<&str>, variable: Option<&str>) -> Result<Choice, ChooseError> {
        let variable = variable.map(str::trim).filter(|v| !v.is_empty());
        let (text, source) = match (flag, variable) {
            (Some(flag), _) => (flag.trim(), ChoiceSource::Flag),
            (None, Some(variable)) => (variable, ChoiceSource::Variable),
            (None, None) => {
                return Ok(Choice {
                    environment: self.default_environment.clone(),
                    declared: true,
                    source: ChoiceSource::Spec,
                })
            }
        };
        let environment = environment_name(text).map_err(|error| ChooseError { given_by: source, error })?;
        Ok(Choice { declared: self.is_declared(&environment), environment, source })
    }

    /// The spec of `environment`: the base with the environment's
    /// overrides (see [`SpecSet`]), its hosts, whether it is the catch-all
    /// and whether it is protected. An environment the file does not name
    /// gets the base. Fails only when the database it uses reads a
    /// variable (`url = "${NAME}"`) that is unset or wrong in this process's
    /// environment: the errors say which, where.
    pub fn resolve(&self, environment: &EnvironmentId) -> Result<AppSpec, SpecErrors> {
        let own = self.overrides.get(environment);
        let mut spec = self.base.clone();
        spec.database = match own.and_then(|r| r.database.as_ref()) {
            Some(db) => Some(db.clone()?),
            None => self.base_database.clone()?,
        };
        if let Some(o) = own {
            spec.env.extend(o.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            for process in &mut spec.processes {
                let changed = o.processes.get(&process.name);
                if let Some(changed) = changed {
                    *process = changed.spec.clone();
                }
                for (key, value) in &o.env {
                    if let Some(slot) = process.env.get_mut(key) {
                        value.clone_into(slot);
                    }
                }
                if let Some(changed) = changed {
                    process.env.extend(changed.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        spec.hosts = self.hosts(environment);
        spec.default_host = self.catch_all.as_ref() == Some(environment);
        spec.protected = self.is_protected(environment);
        Ok(spec)
    }
}
