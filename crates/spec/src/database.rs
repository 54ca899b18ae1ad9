//! `[database]` → [`DatabaseSpec`]: the app's PostgreSQL database, for the
//! migration gate and the variables every process gets.
//!
//! The URL may hold a password: no message here ever contains it (nor the
//! URL). `url = "${NAME}"` reads it from nonstop's environment, so that
//! the password need not be written in the file.

use crate::env::EnvLookup;
use crate::error::Diags;
use crate::raw::{RawDatabase, RawMap, RawScalar, RawSpec};
use crate::suggest::did_you_mean;
use crate::validate::{fix_env_name, is_env_name};
use crate::walk::display_key;
use nonstop_core::database::{DatabaseSpec, DatabaseUrl, UrlError, UrlPart, DEFAULT_DATABASE_VAR};
use serde_spanned::Spanned;
use std::collections::BTreeMap;

const URL_EXAMPLE: &str = "url = \"postgres://blog:PASSWORD@127.0.0.1:5432/blog\"";
const PARTS: [&str; 6] = ["url", "name", "host", "port", "user", "password"];

/// What people call the parts elsewhere (Django, libpq, docker images).
const PART_ALIASES: &[(&str, UrlPart)] = &[
    ("database", UrlPart::Name),
    ("db", UrlPart::Name),
    ("dbname", UrlPart::Name),
    ("database_name", UrlPart::Name),
    ("hostname", UrlPart::Host),
    ("server", UrlPart::Host),
    ("username", UrlPart::User),
    ("login", UrlPart::User),
    ("pass", UrlPart::Password),
    ("passwd", UrlPart::Password),
    ("pwd", UrlPart::Password),
    ("uri", UrlPart::Url),
    ("dsn", UrlPart::Url),
    ("database_url", UrlPart::Url),
];

/// Where a `[database]` table's parts come from, for messages and for the
/// variables it may not share with an `env` table.
pub(crate) struct DatabaseTables<'a> {
    /// The table that fills the variables: `database`, or
    /// `environments.staging.database`.
    pub table: String,
    /// The table `url` was read from.
    pub url_from: String,
    /// The table `[….env]` was read from.
    pub env_from: String,
    /// Every `env` table whose variables the processes get with it.
    pub env_tables: Vec<(String, &'a Spanned<RawMap<Spanned<RawScalar>>>)>,
}

impl<'a> DatabaseTables<'a> {
    /// `[database]` of the file itself, with `[env]` and every
    /// `[processes.NAME.env]`.
    pub(crate) fn of_file(spec: &'a RawSpec) -> Self {
        Self {
            table: "database".to_string(),
            url_from: "database".to_string(),
            env_from: "database".to_string(),
            env_tables: file_env_tables(spec),
        }
    }
}

/// `[env]` and every `[processes.NAME.env]` of the file.
pub(crate) fn file_env_tables(spec: &RawSpec) -> Vec<(String, &Spanned<RawMap<Spanned<RawScalar>>>)> {
    let mut tables = Vec::new();
    if let Some(env) = &spec.env {
        tables.push(("env".to_string(), env));
    }
    if let Some(processes) = &spec.processes {
        for (pname, p) in processes.get_ref().iter() {
            if let Some(env) = &p.get_ref().env {
                tables.push((format!("processes.{}.env", display_key(pname.get_ref())), env));
            }
        }
    }
    tables
}

/// Problems with the value of a `${VAR}` go to `deferred`: they are about
/// the environment nonstop runs in, not about the file, and only matter
/// for the environments that use this table.
pub(crate) fn validate_database(
    raw: &Spanned<RawDatabase>,
    tables: &DatabaseTables<'_>,
    env: &dyn EnvLookup,
    diags: &mut Diags,
    deferred: &mut Diags,
) -> Option<DatabaseSpec> {
    let RawDatabase { url, env: mapping } = raw.get_ref();
    let url = match url {
        None => {
            diags.error(
                raw.span(),
                format!("missing `url` in [{}]", tables.table),
                format!("give the app's PostgreSQL database: {URL_EXAMPLE} (or url = \"${{DATABASE_URL}}\" to read it from nonstop's environment)"),
            );
            None
        }
        Some(u) => validate_url(u, &tables.url_from, env, diags, deferred),
    };
    let mapping = match mapping {
        None => Some(BTreeMap::from([(DEFAULT_DATABASE_VAR.to_string(), UrlPart::Url)])),
        Some(m) => validate_mapping(m, &tables.env_from, diags),
    };
    if let Some(m) = &mapping {
        check_conflicts(m, &tables.table, &tables.env_tables, diags);
    }
    Some(DatabaseSpec { url: url?, env: mapping? })
}

/// The variables a valid `[database]` fills (its `[database.env]`, or
/// `DATABASE_URL`); `None` if its mapping is not valid.
pub(crate) fn mapping_of(raw: &RawDatabase) -> Option<BTreeMap<String, UrlPart>> {
    match &raw.env {
        None => Some(BTreeMap::from([(DEFAULT_DATABASE_VAR.to_string(), UrlPart::Url)])),
        Some(m) => validate_mapping(m, "database", &mut Diags::default()),
    }
}

/// A URL written in the file, or read from nonstop's environment
/// (`"${NAME}"`).
enum UrlSource<'a> {
    Written,
    Variable(&'a str),
}

/// `${NAME}` → the variable's name, if `text` is one.
pub(crate) fn variable_of(text: &str) -> Option<&str> {
    text.trim().strip_prefix("${").and_then(|t| t.strip_suffix('}'))
}

/// The text of a URL key that may read `${NAME}` from nonstop's
/// environment; `None` after reporting why not (to `diags` if the file is
/// wrong, to `deferred` if the environment is).
pub(crate) fn resolve_variable(
    value: &Spanned<String>,
    key: &str,
    what: &str,
    example: &str,
    env: &dyn EnvLookup,
    diags: &mut Diags,
    deferred: &mut Diags,
) -> Option<(String, Option<String>)> {
    let text = value.get_ref().trim();
    match variable_of(text) {
        Some(var) => {
            if !is_env_name(var) {
                diags.error(
                    value.span(),
                    format!("{what} reads ${{{var}}}, which is not a valid variable name"),
                    format!("names are letters, digits and '_': {key} = \"${{{}}}\"", fix_env_name(var)),
                );
                return None;
            }
            match env.get(var) {
                Some(v) => Some((v.trim().to_string(), Some(var.to_string()))),
                None => {
                    deferred.error(
                        value.span(),
                        format!("{what} reads ${{{var}}}, which is not set in nonstop's environment"),
                        format!("export {var}={example} before running nonstop, or write the url itself"),
                    );
                    None
                }
            }
        }
        None => Some((text.to_string(), None)),
    }
}

fn validate_url(
    value: &Spanned<String>,
    url_from: &str,
    env: &dyn EnvLookup,
    diags: &mut Diags,
    deferred: &mut Diags,
) -> Option<DatabaseUrl> {
    let key = format!("`url` in [{url_from}]");
    let (resolved, var) =
        resolve_variable(value, "url", &key, "postgres://USER:PASSWORD@HOST:5432/NAME", env, diags, deferred)?;
    let from = match &var {
        Some(var) => UrlSource::Variable(var),
        None => UrlSource::Written,
    };
    match DatabaseUrl::parse(&resolved) {
        Ok(url) => Some(url),
        Err(e) => {
            let whose = match from {
                UrlSource::Variable(var) => format!("the value of ${var} (read by {key})"),
                UrlSource::Written => key.clone(),
            };
            let hint = match e {
                UrlError::Scheme { .. } => {
                    "nonstop's database support is PostgreSQL: postgres://USER:PASSWORD@HOST:5432/NAME".to_string()
                }
                UrlError::Escape | UrlError::Character => format!(
                    "percent-encode special characters of the user and password (@ is %40, : is %3A, / is %2F, a space is %20): {URL_EXAMPLE}"
                ),
                UrlError::NoDatabase => {
                    "put the database's name after the host: postgres://USER:PASSWORD@HOST:5432/NAME".to_string()
                }
                UrlError::SeveralHosts => {
                    "give one host (the primary): postgres://USER:PASSWORD@HOST:5432/NAME".to_string()
                }
                UrlError::NoHost | UrlError::Port => format!("for example: {URL_EXAMPLE}"),
                UrlError::Parameter { .. } => {
                    "the migration gate points the release tasks at its scratch copy by the name in the path: postgres://USER:PASSWORD@HOST:5432/NAME?sslmode=disable".to_string()
                }
            };
            // The value is not repeated: it may hold a password.
            let message = format!("{whose} is not a usable PostgreSQL URL: {e}");
            match from {
                UrlSource::Variable(_) => deferred.error(value.span(), message, hint),
                UrlSource::Written => diags.error(value.span(), message, hint),
            }
            None
        }
    }
}

fn validate_mapping(
    mapping: &Spanned<RawMap<Spanned<String>>>,
    table: &str,
    diags: &mut Diags,
) -> Option<BTreeMap<String, UrlPart>> {
    let before = diags.len();
    // Entries the walk refused (not strings) are not in the map: then
    // whether the map says enough is only judged once they are fixed.
    let walk_refused = diags.any_after(mapping.span().start);
    let mut out = BTreeMap::new();
    for (name, value) in mapping.get_ref().iter() {
        let n = name.get_ref().as_str();
        if !is_env_name(n) {
            diags.error(
                name.span(),
                format!("invalid environment variable name {} in [{table}.env]", display_key(n)),
                format!("names are letters, digits and '_', and do not start with a digit: {}", fix_env_name(n)),
            );
        } else if n == "PORT" || n.starts_with("NONSTOP_") {
            diags.error(
                name.span(),
                format!("`{n}` in [{table}.env] is reserved: nonstop sets it"),
                "use the name your app reads its database setting from, such as POSTGRES_PORT",
            );
        }
        let v = value.get_ref().trim();
        match UrlPart::parse(v) {
            Some(part) => {
                out.insert(n.to_string(), part);
            }
            None => {
                let lower = v.to_ascii_lowercase();
                let suggestion = PART_ALIASES
                    .iter()
                    .find(|(alias, _)| *alias == lower)
                    .map(|(_, p)| p.as_str())
                    .or_else(|| did_you_mean(v, &PARTS));
                let list = PARTS.join(", ");
                diags.error(
                    value.span(),
                    format!("`{}` in [{table}.env] must be one of {list}, not {v:?}", display_key(n)),
                    match suggestion {
                        Some(s) => format!("did you mean {} = \"{s}\"?", display_key(n)),
                        None => format!("name the part of the url it holds, such as {} = \"name\"", display_key(n)),
                    },
                );
            }
        }
    }
    if walk_refused {
        return None;
    }
    if mapping.get_ref().is_empty() {
        diags.error(
            mapping.span(),
            format!("[{table}.env] is empty: no variable would tell the release tasks where the database is"),
            format!("leave [{table}.env] out for DATABASE_URL, or map the variables your app reads, such as POSTGRES_NAME = \"name\""),
        );
    } else if !out.is_empty() && !out.values().any(|p| matches!(p, UrlPart::Url | UrlPart::Name)) {
        // The gate points the tasks at its scratch copy by changing the
        // database's name: without it they would migrate the real one.
        diags.error(
            mapping.span(),
            format!("[{table}.env] gives the app neither the `name` nor the `url`, so the migration gate could not point the release tasks at its scratch copy"),
            "map the variable your app reads the database name from, such as POSTGRES_NAME = \"name\"",
        );
    }
    (diags.len() == before).then_some(out)
}

/// A variable filled from a `[database]` table may not be set by hand as
/// well.
pub(crate) fn check_conflicts(
    out: &BTreeMap<String, UrlPart>,
    table: &str,
    env_tables: &[(String, &Spanned<RawMap<Spanned<RawScalar>>>)],
    diags: &mut Diags,
) {
    for (env_table, env) in env_tables {
        for (key, _) in env.get_ref().iter() {
            if let Some(part) = out.get(key.get_ref()) {
                diags.error(
                    key.span(),
                    format!(
                        "`{}` in [{env_table}] is also filled by [{table}] (with its {part})",
                        display_key(key.get_ref())
                    ),
                    format!("remove it from [{env_table}]: nonstop sets it from [{table}] url, and points it at the scratch copy while the migration gate runs"),
                );
            }
        }
    }
}
