//! `[database]` → [`DatabaseSpec`]: the app's PostgreSQL database, for the
//! migration gate and the variables every process gets.
//!
//! The URL may hold a password: no message here ever contains it (nor the
//! URL). `url = "${NAME}"` reads it from nonstop's environment, so that
//! the password need not be written in the file.

use crate::env::EnvLookup;
use crate::error::Diags;
use crate::raw::{RawDatabase, RawMap, RawSpec};
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

pub(crate) fn validate_database(
    raw: &Spanned<RawDatabase>,
    spec: &RawSpec,
    env: &dyn EnvLookup,
    diags: &mut Diags,
) -> Option<DatabaseSpec> {
    let RawDatabase { url, env: mapping } = raw.get_ref();
    let url = match url {
        None => {
            diags.error(
                raw.span(),
                "missing `url` in [database]",
                format!("give the app's PostgreSQL database: {URL_EXAMPLE} (or url = \"${{DATABASE_URL}}\" to read it from nonstop's environment)"),
            );
            None
        }
        Some(u) => validate_url(u, env, diags),
    };
    let mapping = match mapping {
        None => Some(BTreeMap::from([(DEFAULT_DATABASE_VAR.to_string(), UrlPart::Url)])),
        Some(m) => validate_mapping(m, diags),
    };
    if let Some(m) = &mapping {
        check_conflicts(m, spec, diags);
    }
    Some(DatabaseSpec { url: url?, env: mapping? })
}

fn validate_url(value: &Spanned<String>, env: &dyn EnvLookup, diags: &mut Diags) -> Option<DatabaseUrl> {
    let text = value.get_ref().trim();
    let (resolved, from) = match text.strip_prefix("${").and_then(|t| t.strip_suffix('}')) {
        Some(var) => {
            if !is_env_name(var) {
                diags.error(
                    value.span(),
                    format!("`url` in [database] reads ${{{var}}}, which is not a valid variable name"),
                    format!("names are letters, digits and '_': url = \"${{{}}}\"", fix_env_name(var)),
                );
                return None;
            }
            match env.get(var) {
                Some(v) => (v, Some(var)),
                None => {
                    diags.error(
                        value.span(),
                        format!("`url` in [database] reads ${{{var}}}, which is not set in nonstop's environment"),
                        format!("export {var}=postgres://USER:PASSWORD@HOST:5432/NAME before running nonstop, or write the url itself"),
                    );
                    return None;
                }
            }
        }
        None => (text.to_string(), None),
    };
    match DatabaseUrl::parse(resolved.trim()) {
        Ok(url) => Some(url),
        Err(e) => {
            let whose = match from {
                Some(var) => format!("the value of ${var} (read by `url` in [database])"),
                None => "`url` in [database]".to_string(),
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
            diags.error(value.span(), format!("{whose} is not a usable PostgreSQL URL: {e}"), hint);
            None
        }
    }
}

fn validate_mapping(
    mapping: &Spanned<RawMap<Spanned<String>>>,
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
                format!("invalid environment variable name {} in [database.env]", display_key(n)),
                format!("names are letters, digits and '_', and do not start with a digit: {}", fix_env_name(n)),
            );
        } else if n == "PORT" || n.starts_with("NONSTOP_") {
            diags.error(
                name.span(),
                format!("`{n}` in [database.env] is reserved: nonstop sets it"),
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
                    format!("`{}` in [database.env] must be one of {list}, not {v:?}", display_key(n)),
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
            "[database.env] is empty: no variable would tell the release tasks where the database is",
            "leave [database.env] out for DATABASE_URL, or map the variables your app reads, such as POSTGRES_NAME = \"name\"",
        );
    } else if !out.is_empty() && !out.values().any(|p| matches!(p, UrlPart::Url | UrlPart::Name)) {
        // The gate points the tasks at its scratch copy by changing the
        // database's name: without it they would migrate the real one.
        diags.error(
            mapping.span(),
            "[database.env] gives the app neither the `name` nor the `url`, so the migration gate could not point the release tasks at its scratch copy",
            "map the variable your app reads the database name from, such as POSTGRES_NAME = \"name\"",
        );
    }
    (diags.len() == before).then_some(out)
}

/// A variable filled from [database] may not be set by hand as well.
fn check_conflicts(out: &BTreeMap<String, UrlPart>, spec: &RawSpec, diags: &mut Diags) {
    let mut tables = vec![("env".to_string(), spec.env.as_ref())];
    if let Some(processes) = &spec.processes {
        for (pname, p) in processes.get_ref().iter() {
            tables.push((format!("processes.{}.env", display_key(pname.get_ref())), p.get_ref().env.as_ref()));
        }
    }
    for (table, env) in tables {
        let Some(env) = env else { continue };
        for (key, _) in env.get_ref().iter() {
            if let Some(part) = out.get(key.get_ref()) {
                diags.error(
                    key.span(),
                    format!("`{}` in [{table}] is also filled by [database] (with its {part})", display_key(key.get_ref())),
                    "remove it from [".to_string() + &table + "]: nonstop sets it from [database] url, and points it at the scratch copy while the migration gate runs",
                );
            }
        }
    }
}
