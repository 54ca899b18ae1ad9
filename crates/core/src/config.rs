//! `nonstop config`: plain variables an environment gets on top of its
//! `nonstop.toml`, like Heroku's config vars, and what `nonstop promote`
//! may take from the file. Pure: no I/O, no clock (times come in).
//!
//! **Precedence**, lowest first, for every process and task of an
//! environment: the file's `[env]`, then `[processes.P.env]`, then
//! `[environments.E.env]` and `[environments.E.processes.P.env]` (see
//! `nonstop_spec::SpecSet`), then **`config set`** (a config value is that
//! environment's value everywhere, in every process), then **secrets** (a
//! secret of the same name wins: `config set` refuses such a name), then
//! the **`[database]` variables** (`config set` refuses them too). The
//! variables nonstop sets itself (`PORT`, `NONSTOP_*`) cannot be config.
//!
//! **Values are in clear**, in the state database, in `config get` and in
//! the spec of the releases that run them (as `[env]` is): what looks like
//! a credential belongs in `nonstop secrets`.

use crate::process::AppSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The longest config value, in bytes.
pub const MAX_CONFIG_VALUE_BYTES: usize = 32 * 1024;

/// What is wrong with a `config set` or `config unset` argument. Each
/// message names the problem and the fix; nothing is changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum ConfigError {
    #[error(
        "invalid variable name {name:?}: names are letters, digits and '_', and do not start with a digit (for example {suggestion})"
    )]
    InvalidName { name: String, suggestion: String },
    #[error(
        "`PORT` is reserved: nonstop gives each web instance its own port in $PORT (the port users connect to is [proxy] listen in nonstop.toml)"
    )]
    Port,
    #[error("`{name}` is reserved: names starting with NONSTOP_ are set by nonstop; use another name")]
    Reserved { name: String },
    #[error(
        "`{arg}` has no `=`: give NAME=VALUE (for example `nonstop config set {arg}=VALUE`); to remove a variable: `nonstop config unset {arg}`"
    )]
    NoValue { arg: String },
    #[error("the value of {name} contains a NUL character, which no environment variable can hold; remove it")]
    Nul { name: String },
    #[error(
        "the value of {name} is {len} bytes long; a config value is at most {max} bytes: put larger data in a file of the app"
    )]
    TooLong { name: String, len: usize, max: usize },
    #[error("`config unset` takes names, not NAME=VALUE: `nonstop config unset {name}`")]
    ValueInUnset { name: String },
    #[error("{name} is given twice; give each variable once")]
    Duplicate { name: String },
    #[error("nothing to {verb}: give {example}")]
    Empty { verb: &'static str, example: &'static str },
}

/// The name of a config variable: an environment variable's name that
/// nonstop does not set itself (the rules of `[env]` keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConfigName(String);

impl ConfigName {
    pub fn new(name: impl Into<String>) -> Result<Self, ConfigError> {
        let name = name.into();
        let mut chars = name.chars();
        let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(ConfigError::InvalidName { suggestion: suggest_name(&name), name });
        }
        if name == "PORT" {
            return Err(ConfigError::Port);
        }
        if name.starts_with("NONSTOP_") {
            return Err(ConfigError::Reserved { name });
        }
        Ok(ConfigName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn suggest_name(name: &str) -> String {
    let mut fixed: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if fixed.is_empty() || fixed.starts_with(|c: char| c.is_ascii_digit()) {
        fixed.insert(0, '_');
    }
    fixed.to_ascii_uppercase()
}

impl TryFrom<String> for ConfigName {
    type Error = ConfigError;
    fn try_from(value: String) -> Result<Self, ConfigError> {
        Self::new(value)
    }
}

impl From<ConfigName> for String {
    fn from(value: ConfigName) -> String {
        value.0
    }
}

impl fmt::Display for ConfigName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value a variable may hold (any text without NUL, at most
/// [`MAX_CONFIG_VALUE_BYTES`]; empty is a value).
pub fn check_value(name: &ConfigName, value: &str) -> Result<(), ConfigError> {
    if value.contains('\0') {
        return Err(ConfigError::Nul { name: name.to_string() });
    }
    if value.len() > MAX_CONFIG_VALUE_BYTES {
        return Err(ConfigError::TooLong { name: name.to_string(), len: value.len(), max: MAX_CONFIG_VALUE_BYTES });
    }
    Ok(())
}

/// `config set` arguments (`NAME=VALUE`, split at the first `=`: a value
/// may hold more), each name once.
pub fn parse_assignments(args: &[String]) -> Result<BTreeMap<ConfigName, String>, ConfigError> {
    if args.is_empty() {
        return Err(ConfigError::Empty {
            verb: "set",
            example: "NAME=VALUE pairs, e.g. `nonstop config set GREETING=hello`",
        });
    }
    let mut out = BTreeMap::new();
    for arg in args {
        let Some((name, value)) = arg.split_once('=') else {
            // Named as given (a bare word: no value was written).
            return Err(match ConfigName::new(arg.as_str()) {
                Ok(_) => ConfigError::NoValue { arg: arg.clone() },
                Err(e) => e,
            });
        };
        let name = ConfigName::new(name)?;
        check_value(&name, value)?;
        if out.insert(name.clone(), value.to_string()).is_some() {
            return Err(ConfigError::Duplicate { name: name.to_string() });
        }
    }
    Ok(out)
}

/// `config unset` arguments: names, each once.
pub fn parse_names(args: &[String]) -> Result<BTreeSet<ConfigName>, ConfigError> {
    if args.is_empty() {
        return Err(ConfigError::Empty { verb: "unset", example: "the names, e.g. `nonstop config unset GREETING`" });
    }
    let mut out = BTreeSet::new();
    for arg in args {
        if let Some((name, _)) = arg.split_once('=') {
            // The value is not repeated: it may be one that should not be shown.
            return Err(ConfigError::ValueInUnset { name: name.to_string() });
        }
        let name = ConfigName::new(arg.as_str())?;
        if !out.insert(name.clone()) {
            return Err(ConfigError::Duplicate { name: name.to_string() });
        }
    }
    Ok(out)
}

/// One variable of an environment's config, with who set it and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    pub value: String,
    /// `user@host`, as deployments record it.
    pub set_by: String,
    /// Milliseconds since the Unix epoch.
    pub set_at_ms: u64,
}

/// An environment's config: what `config set` gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Config {
    pub vars: BTreeMap<ConfigName, ConfigEntry>,
}

impl Config {
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Name → value.
    pub fn values(&self) -> BTreeMap<String, String> {
        self.vars.iter().map(|(k, e)| (k.to_string(), e.value.clone())).collect()
    }

    /// This config with `set` applied: a variable whose value does not
    /// change keeps its entry (who set it, when).
    pub fn with_set(&self, set: &BTreeMap<ConfigName, String>, who: &str, at_ms: u64) -> Config {
        let mut out = self.clone();
        for (name, value) in set {
            if out.vars.get(name).is_some_and(|e| &e.value == value) {
                continue;
            }
            out.vars
                .insert(name.clone(), ConfigEntry { value: value.clone(), set_by: who.to_string(), set_at_ms: at_ms });
        }
        out
    }

    /// This config without `names` (names it does not have are ignored).
    pub fn without(&self, names: &BTreeSet<ConfigName>) -> Config {
        let mut out = self.clone();
        out.vars.retain(|k, _| !names.contains(k));
        out
    }

    /// Whether the values differ (who set them aside).
    pub fn same_values(&self, other: &Config) -> bool {
        self.values() == other.values()
    }

    /// Put the config into `spec`: each variable into `[env]` and over
    /// every process's own value of it, so that every process gets the
    /// config's value.
    pub fn apply_to(&self, spec: &mut AppSpec) {
        for (name, entry) in &self.vars {
            spec.env.insert(name.to_string(), entry.value.clone());
            for process in &mut spec.processes {
                if let Some(slot) = process.env.get_mut(name.as_str()) {
                    entry.value.clone_into(slot);
                }
            }
        }
    }

    /// [`Config::apply_to`] on a copy.
    pub fn applied(&self, spec: &AppSpec) -> AppSpec {
        let mut out = spec.clone();
        self.apply_to(&mut out);
        out
    }

    /// One line for messages: `set A, B; unset C`.
    pub fn describe_change(before: &Config, after: &Config) -> String {
        let set: Vec<&str> = after
            .vars
            .iter()
            .filter(|(k, e)| before.vars.get(*k).is_none_or(|b| b.value != e.value))
            .map(|(k, _)| k.as_str())
            .collect();
        let unset: Vec<&str> =
            before.vars.keys().filter(|k| !after.vars.contains_key(*k)).map(|k| k.as_str()).collect();
        let mut parts = Vec::new();
        if !set.is_empty() {
            parts.push(format!("set {}", set.join(", ")));
        }
        if !unset.is_empty() {
            parts.push(format!("unset {}", unset.join(", ")));
        }
        if parts.is_empty() {
            "no change".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// What `nonstop promote` would run differently from what the release was
/// built with, in the parts of `nonstop.toml` that are the same in every
/// environment (no `[environments.E]` table can change them): the build,
/// the static mounts, the release tasks and the process types with their
/// kinds and commands. A difference means the file changed since the
/// release was built: promoting it would run that release's code with
/// other commands. Empty: the target's spec may run the release.
pub fn code_differences(built: &AppSpec, target: &AppSpec) -> Vec<String> {
    let mut out = Vec::new();
    if built.app != target.app {
        out.push(format!("app (`{}` here, `{}` in the release)", target.app, built.app));
    }
    if built.build != target.build {
        out.push("build".to_string());
    }
    if built.statics != target.statics {
        out.push("[static]".to_string());
    }
    if built.release.tasks != target.release.tasks {
        out.push("[release] tasks".to_string());
    }
    if built.release.post_tasks != target.release.post_tasks {
        out.push("[release] post_tasks".to_string());
    }
    for p in &target.processes {
        match built.process(&p.name) {
            None => out.push(format!("[processes.{}] (not in the release)", p.name)),
            Some(b) if b.kind != p.kind => out.push(format!("[processes.{}] kind", p.name)),
            Some(b) if b.command != p.command => out.push(format!("[processes.{}] command", p.name)),
            Some(_) => {}
        }
    }
    for b in &built.processes {
        if target.process(&b.name).is_none() {
            out.push(format!("[processes.{}] (only in the release)", b.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ProcessSpec;
    use proptest::prelude::*;

    fn spec_with(app_env: &[(&str, &str)], processes: &[(&str, &[(&str, &str)])]) -> AppSpec {
        use crate::process::{ProcessKind, ProxySpec, ReleaseSpec, RestartPolicy, Rollout, Signal};
        use crate::{AppName, ProcessName};
        use std::time::Duration;
        let map = |vars: &[(&str, &str)]| vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let process = |(name, env): &(&str, &[(&str, &str)])| ProcessSpec {
            name: ProcessName::new(*name).unwrap_or_else(|e| panic!("{e}")),
            kind: ProcessKind::Worker,
            command: "run".into(),
            count: 1,
            stop_signal: Signal::Term,
            stop_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
            ready_after: Duration::from_secs(1),
            health: None,
            restart: RestartPolicy::default(),
            rollout: Rollout::default(),
            env: map(env),
            autoscale: None,
            queue: None,
        };
        AppSpec {
            app: AppName::new("blog").unwrap_or_else(|e| panic!("{e}")),
            env: map(app_env),
            processes: processes.iter().map(process).collect(),
            proxy: ProxySpec::new(([127, 0, 0, 1], 8080).into()),
            build: vec![],
            release: ReleaseSpec::default(),
            statics: vec![],
            database: None,
            hosts: vec![],
            default_host: true,
            protected: false,
            base: None,
            metrics: None,
        }
    }

    /// What a process of `spec` gets: `[env]`, then its own.
    fn effective(spec: &AppSpec, process: usize) -> BTreeMap<String, String> {
        let mut vars = spec.env.clone();
        vars.extend(spec.processes[process].env.clone());
        vars
    }

    fn name(n: &str) -> ConfigName {
        ConfigName::new(n).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn names_follow_the_rules_of_env_keys() {
        assert!(ConfigName::new("GREETING").is_ok());
        assert!(ConfigName::new("_x1").is_ok());
        assert_eq!(ConfigName::new("PORT"), Err(ConfigError::Port));
        assert!(matches!(ConfigName::new("NONSTOP_APP"), Err(ConfigError::Reserved { .. })));
        let e = ConfigName::new("1-bad").unwrap_err();
        assert!(e.to_string().contains("_1_BAD"), "{e}");
        assert!(ConfigName::new("").is_err());
    }

    #[test]
    fn assignments_split_at_the_first_equals_and_refuse_what_is_not_one() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = parse_assignments(&args(&["A=1", "B=x=y", "C="])).unwrap();
        assert_eq!(ok.get(&name("B")).map(String::as_str), Some("x=y"));
        assert_eq!(ok.get(&name("C")).map(String::as_str), Some(""));
        let e = parse_assignments(&args(&["GREETING"])).unwrap_err();
        assert_eq!(e, ConfigError::NoValue { arg: "GREETING".into() });
        assert!(e.to_string().contains("GREETING=VALUE") && e.to_string().contains("config unset GREETING"), "{e}");
        assert!(matches!(parse_assignments(&args(&["A=1", "A=2"])), Err(ConfigError::Duplicate { .. })));
        assert!(matches!(parse_assignments(&args(&["PORT=80"])), Err(ConfigError::Port)));
        assert!(matches!(parse_assignments(&args(&["A=\0"])), Err(ConfigError::Nul { .. })));
        let big = format!("A={}", "x".repeat(MAX_CONFIG_VALUE_BYTES + 1));
        assert!(matches!(parse_assignments(&[big]), Err(ConfigError::TooLong { .. })));
        assert!(matches!(parse_assignments(&[]), Err(ConfigError::Empty { .. })));
        assert_eq!(parse_names(&args(&["A=1"])), Err(ConfigError::ValueInUnset { name: "A".into() }));
        assert!(matches!(parse_names(&args(&["A", "A"])), Err(ConfigError::Duplicate { .. })));
    }

    #[test]
    fn unchanged_values_keep_who_set_them() {
        let c = Config::default().with_set(&[(name("A"), "1".to_string())].into(), "ann", 1);
        let again = c.with_set(&[(name("A"), "1".to_string()), (name("B"), "2".to_string())].into(), "bob", 2);
        assert_eq!(again.vars[&name("A")].set_by, "ann");
        assert_eq!(again.vars[&name("B")].set_by, "bob");
        assert_eq!(Config::describe_change(&c, &again), "set B");
        assert_eq!(Config::describe_change(&again, &c), "unset B");
        assert_eq!(Config::describe_change(&c, &c), "no change");
    }

    #[test]
    fn code_differences_name_what_the_file_changed_since_the_build() {
        let built = spec_with(&[("A", "1")], &[("worker", &[])]);
        let mut target = built.clone();
        target.env.insert("A".into(), "2".into());
        target.processes[0].count = 7;
        target.processes[0].env.insert("B".into(), "x".into());
        assert!(code_differences(&built, &target).is_empty(), "config and counts are the environment's");
        target.build = vec!["make".into()];
        target.processes[0].command = "other".into();
        assert_eq!(code_differences(&built, &target), ["build", "[processes.worker] command"]);
    }

    fn var_name() -> impl Strategy<Value = String> {
        "[A-Z][A-Z0-9_]{0,6}".prop_filter("not reserved", |n| n != "PORT" && !n.starts_with("NONSTOP_"))
    }

    fn env_map() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(var_name(), "[a-z=]{0,4}", 0..5)
    }

    proptest! {
        /// Config wins over the file for every process: whatever `[env]`
        /// and each process's env say, a process gets the config's value;
        /// other variables are untouched; applying twice changes nothing
        /// more; no config changes nothing.
        #[test]
        fn config_wins_everywhere_and_touches_nothing_else(
            app_env in env_map(),
            p1 in env_map(),
            p2 in env_map(),
            set in proptest::collection::btree_map(var_name(), "[a-z=]{0,4}", 0..4),
        ) {
            let p1: Vec<(&str, &str)> = p1.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let p2: Vec<(&str, &str)> = p2.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let a: Vec<(&str, &str)> = app_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let spec = spec_with(&a, &[("web", &p1), ("worker", &p2)]);
            prop_assert_eq!(Config::default().applied(&spec), spec.clone());
            let set: BTreeMap<ConfigName, String> = set.into_iter().map(|(k, v)| (name(&k), v)).collect();
            let config = Config::default().with_set(&set, "t", 0);
            let applied = config.applied(&spec);
            prop_assert_eq!(config.applied(&applied), applied.clone());
            for i in 0..2 {
                let before = effective(&spec, i);
                let after = effective(&applied, i);
                for (k, v) in &after {
                    match set.get(&name(k)) {
                        Some(c) => prop_assert_eq!(v, c),
                        None => prop_assert_eq!(Some(v), before.get(k)),
                    }
                }
                for (k, v) in &set {
                    prop_assert_eq!(after.get(k.as_str()), Some(v));
                }
                prop_assert_eq!(after.len(), before.keys().chain(set.keys().map(|k| &k.0)).collect::<BTreeSet<_>>().len());
            }
            // Unsetting everything that was set gives the config nothing.
            let names: BTreeSet<ConfigName> = set.keys().cloned().collect();
            prop_assert!(config.without(&names).is_empty());
        }

        /// `NAME=VALUE` reads back as given, whatever the value holds.
        #[test]
        fn an_assignment_reads_back(n in var_name(), v in "[ -~]{0,12}") {
            let parsed = parse_assignments(&[format!("{n}={v}")]).unwrap();
            prop_assert_eq!(parsed.get(&name(&n)), Some(&v));
        }
    }
}
