//! `nonstop.toml`: parsing, validation and `nonstop init`.
//!
//! [`parse`] turns the text of a spec file into a validated
//! [`AppSpec`], or into [`SpecErrors`]:
//! every problem of the file at once, each with file:line:column, what is
//! wrong and how to fix it. Nothing here does I/O except [`load`].
//!
//! How it works: the file is parsed into a spanned TOML document
//! (`toml::de::DeTable`, which keeps every key's and value's location and
//! recovers from syntax errors); `walk` fills the raw schema types of
//! [`raw`] from it, reporting unknown keys (with "did you mean") and values
//! of the wrong type without stopping; `validate` then checks every rule
//! and builds the core types. The raw types also derive serde's
//! `Deserialize` with `deny_unknown_fields`: they are the documented
//! schema, and the valid-key lists in messages are read from them.
#![forbid(unsafe_code)]

mod autoscale;
mod canary;
mod database;
mod defaults;
mod duration;
mod env;
mod environments;
mod error;
mod init;
pub mod raw;
mod set;
mod size;
mod statics;
mod suggest;
mod validate;
mod walk;

pub use defaults::*;
pub use duration::{format_duration, parse_duration, DurationError, DURATION_FORMS};
pub use env::{EnvLookup, ProcessEnv};
pub use error::{SpecError, SpecErrors};
pub use init::{init_toml, InitError};
pub use set::{Choice, ChoiceSource, ChooseError, SpecSet};
pub use size::{format_size, parse_size, SizeError, SIZE_FORMS};

use error::{Diags, LineIndex};
use nonstop_core::ids::EnvironmentId;
use nonstop_core::process::AppSpec;
use std::path::Path;

/// The file name `load` is usually given.
pub const SPEC_FILE: &str = "nonstop.toml";

/// At most this many syntax errors are reported: after the first few, a
/// TOML parser mostly reports the consequences of the first.
const MAX_SYNTAX_ERRORS: usize = 10;

/// Parses and validates the text of a spec file into the spec of its
/// default environment (`environment = "..."`, or `default`): a file
/// without environments gives its app's spec, as it always did. `file` is
/// used in messages, and its directory to resolve relative paths in the
/// file (`[[proxy.tls]]` certificates; they stay relative if `file` is);
/// `env` supplies overrides such as `NONSTOP_PROXY_LISTEN`. For another
/// environment: [`parse_set`], then [`SpecSet::resolve`].
pub fn parse(source: &str, file: &Path, env: &dyn EnvLookup) -> Result<AppSpec, SpecErrors> {
    let base = file.parent().unwrap_or(Path::new(""));
    parse_in(source, file, base, env)
}

/// [`parse`], with relative paths resolved against `base`.
pub fn parse_in(source: &str, file: &Path, base: &Path, env: &dyn EnvLookup) -> Result<AppSpec, SpecErrors> {
    let set = parse_set_in(source, file, base, env)?;
    set.resolve(set.default_environment())
}

/// Parses and validates the text of a spec file with all of its
/// environments (see [`parse`] for the arguments). Every problem of the
/// file is reported at once; a `[database]` url that reads a variable
/// unset (or wrong) in `env` is only a problem for the environments that
/// use it, reported by [`SpecSet::resolve`] (and here too when the file
/// has other problems, for its default environment).
pub fn parse_set(source: &str, file: &Path, env: &dyn EnvLookup) -> Result<SpecSet, SpecErrors> {
    let base = file.parent().unwrap_or(Path::new(""));
    parse_set_in(source, file, base, env)
}

/// [`parse_set`], with relative paths resolved against `base`.
pub fn parse_set_in(source: &str, file: &Path, base: &Path, env: &dyn EnvLookup) -> Result<SpecSet, SpecErrors> {
    let mut diags = Diags::default();
    let (doc, syntax_errors) = toml::de::DeTable::parse_recoverable(source);
    if !syntax_errors.is_empty() {
        // The document is incomplete: checking it would report the
        // consequences of the syntax errors as if they were problems.
        report_syntax_errors(source, &syntax_errors, &mut diags);
        validate::check_proxy_env(env, &mut diags);
        return Err(diags.into_errors(source, file));
    }
    let raw = walk::walk(&doc, &mut diags);
    let mut deferred = Diags::default();
    let spec = validate::validate(&raw, env, base, &mut diags, &mut deferred);
    let environments = environments::validate_environments(&raw, env, &mut diags);
    let spec = match spec {
        Some(spec) if diags.is_empty() => spec,
        _ => {
            // With the problems of the environment used by default.
            let default = environments.default_environment.clone().unwrap_or_else(EnvironmentId::default_env);
            match environments.overrides.get(&default).and_then(|o| o.database.as_ref()) {
                Some(Err(own)) => diags.extend(own.clone()),
                Some(Ok(_)) => {}
                None => diags.extend(deferred),
            }
            return Err(diags.into_errors(source, file));
        }
    };
    let errors = |d: Diags| d.into_errors(source, file);
    let base_database = if deferred.is_empty() { Ok(spec.database.clone()) } else { Err(errors(deferred)) };
    Ok(SpecSet::new(spec, base_database, environments, errors))
}

/// Reads and parses a spec file, with the process environment, into the
/// spec of its default environment. Relative paths in the file become
/// absolute (against the file's directory).
pub fn load(file: &Path) -> Result<AppSpec, SpecErrors> {
    let set = load_set(file)?;
    set.resolve(set.default_environment())
}

/// Reads and parses a spec file with all of its environments, with the
/// process environment. Relative paths in the file become absolute.
pub fn load_set(file: &Path) -> Result<SpecSet, SpecErrors> {
    let source = read(file)?;
    let absolute = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let base = absolute.parent().unwrap_or(Path::new(""));
    parse_set_in(&source, file, base, &ProcessEnv)
}

fn read(file: &Path) -> Result<String, SpecErrors> {
    let error = |message: String, hint: &str| SpecError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        message,
        hint: Some(hint.to_string()),
    };
    std::fs::read_to_string(file).map_err(|err| {
        SpecErrors::from(match err.kind() {
            std::io::ErrorKind::NotFound => error(
                "no such file".to_string(),
                "run `nonstop init` to create it (from your Procfile, if the app has one)",
            ),
            std::io::ErrorKind::InvalidData => error("the file is not UTF-8 text".to_string(), "save it as UTF-8"),
            std::io::ErrorKind::IsADirectory => {
                error("this is a directory, not a file".to_string(), "give the path of nonstop.toml itself")
            }
            _ => error(format!("cannot read the file: {err}"), "check that it exists and that you may read it"),
        })
    })
}

fn report_syntax_errors(source: &str, errors: &[toml::de::Error], diags: &mut Diags) {
    let index = LineIndex::new(source);
    let mut lines = Vec::new();
    for error in errors {
        let span = error.span().unwrap_or(0..0);
        // One error per line: the others on it are usually the same one.
        let line = index.position(span.start).0;
        if lines.contains(&line) {
            continue;
        }
        lines.push(line);
        if lines.len() > MAX_SYNTAX_ERRORS {
            break;
        }
        let text = source.get(span.clone()).unwrap_or("");
        let raw = error.message().trim();
        let (message, hint) = if raw.starts_with("duplicate key") {
            (
                format!("invalid TOML: duplicate key `{text}`"),
                "a key or a [table] may appear only once: merge the two or remove one",
            )
        } else if raw.starts_with("string values must be quoted") {
            (
                "invalid TOML: string values must be quoted".to_string(),
                "put the value in double quotes, for example: command = \"gunicorn blog.wsgi\"",
            )
        } else if raw.contains("basic string") || raw.contains("literal string") {
            (
                format!("invalid TOML: {raw}"),
                "close the string on the same line; use \"\"\"...\"\"\" for a string over several lines",
            )
        } else if raw.starts_with("invalid boolean") {
            (
                format!("invalid TOML: {raw}"),
                "strings go in double quotes (\"gunicorn blog.wsgi\"); booleans are true or false",
            )
        } else if raw.contains("array") {
            (format!("invalid TOML: {raw}"), "lists are written [\"a\", \"b\"], with commas between the items")
        } else if raw.starts_with("unclosed table") {
            (format!("invalid TOML: {raw}"), "a table header is written [processes.web], on a line of its own")
        } else {
            (
                format!("invalid TOML: {raw}"),
                "nonstop.toml is TOML: `key = value` lines, strings in double quotes, [table] headers",
            )
        };
        diags.error(span, message, hint);
    }
}

/// Turns a directory name into a valid app name: lowercase, runs of other
/// characters become one '-', at most 63 characters, starting with a
/// letter (`app-` is put before a leading digit; an empty result is
/// `app`). `nonstop init` uses it on the current directory's name.
pub fn sanitize_app_name(dir_name: &str) -> String {
    let mut out = String::new();
    for c in dir_name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut name = out.trim_matches('-').to_string();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert_str(0, "app-");
    }
    let mut name: String = name.chars().take(63).collect();
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        "app".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_autoscale;
#[cfg(test)]
mod tests_canary;
#[cfg(test)]
mod tests_database;
#[cfg(test)]
mod tests_environments;
#[cfg(test)]
mod tests_smoke;
#[cfg(test)]
mod tests_static;
