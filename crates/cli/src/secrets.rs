//! `nonstop secrets set|unset|list`: the client side.
//!
//! A value is never taken from the command line (it would land in the
//! shell's history and in `ps` for every user of the machine): it comes
//! from stdin, a file (`--from-file`), or, when stdin is a terminal, a
//! prompt that does not echo. Every check the daemon makes on the name and
//! the value is made here first, so a mistake is named before anything is
//! sent.
//!
//! The app is the one `--app` names, else the one of `./nonstop.toml`
//! (secrets are usually set in the app's directory, before its first
//! deploy), else the environment's one app.

use crate::cli::SecretsAction;
use crate::commands::{emit, ensure_daemon, fmt_time, scoped_app, scoped_env, who};
use crate::home::Home;
use crate::output;
use nonstop_api::client::{Client, ClientError};
use nonstop_api::wire::{SecretSetRequest, SecretUnsetRequest};
use nonstop_engine::{SecretReport, SecretsList};
use nonstop_secrets::{KeyOrigin, SecretName, SecretValue, SecretsKey, KEY_ENV, MAX_VALUE_BYTES, MIN_REDACTED_LEN};
use std::io::{IsTerminal, Read};
use std::path::Path;
use zeroize::{Zeroize, Zeroizing};

/// What to say when a value is given on the command line.
pub(crate) const VALUE_ON_ARGV: &str = "secret values are never taken from the command line (shell history, ps); \
pipe it: printf %s \"$VALUE\" | nonstop secrets set NAME";

pub(crate) async fn secrets(home: &Home, action: SecretsAction) -> anyhow::Result<i32> {
    match action {
        SecretsAction::Set { name, from_file, json, rest } => set(home, name, from_file.as_deref(), rest, json).await,
        SecretsAction::Unset { name, json } => unset(home, name, json).await,
        SecretsAction::List { json } => list(home, json).await,
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

/// The app the command is about, when the command line or the current
/// directory says.
fn named_app() -> Option<String> {
    scoped_app()
}

fn secrets_client(home: &Home, app: Option<&str>) -> Client {
    Client::new(home.socket()).scoped(app, scoped_env().as_deref())
}

/// An error from the daemon, with a hint when no app could be told.
fn daemon_error(e: ClientError, app: Option<&str>, json: bool) -> anyhow::Result<i32> {
    let not_up =
        matches!(&e, ClientError::Api(a) if a.detail.as_ref().and_then(|d| d["error"].as_str()) == Some("not_up"));
    match e {
        ClientError::Api(a) if json => {
            emit(&serde_json::json!({"type": "error", "exit_code": a.exit_code, "message": a.message}).to_string());
            Ok(a.exit_code)
        }
        ClientError::Api(a) if not_up && app.is_none() => {
            eprintln!(
                "error: no app is named: run the command in the app's directory (its nonstop.toml names the app), or \
                 give `--app NAME`"
            );
            Ok(a.exit_code)
        }
        e => Err(e.into()),
    }
}

/// Read a value: at most `MAX_VALUE_BYTES` (and a newline), UTF-8.
fn read_value(source: &mut dyn Read, what: &str, strip_newline: bool) -> Result<SecretValue, String> {
    let mut bytes = Zeroizing::new(Vec::new());
    source
        .take(MAX_VALUE_BYTES as u64 + 3)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the value from {what}: {e}"))?;
    if strip_newline {
        // `echo "$VALUE" |` adds one; a value never ends with it.
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
    }
    if bytes.is_empty() {
        return Err(format!(
            "the value from {what} is empty (nothing was piped in?): a secret needs a value; to remove one, use \
             `nonstop secrets unset NAME`"
        ));
    }
    let text = match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => text,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            e.into_bytes().zeroize();
            return Err(format!(
                "the value from {what} is not UTF-8 text (byte {at}): a process receives it as an environment \
                 variable; encode binary data, e.g. in base64"
            ));
        }
    };
    SecretValue::new(text).map_err(|e| e.to_string())
}

/// A key given to this command in `NONSTOP_SECRETS_KEY` must at least be
/// a key (the daemon reads its own environment, not this one's).
fn check_env_key() -> Result<bool, String> {
    match std::env::var(KEY_ENV) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            SecretsKey::parse(&text, KeyOrigin::Env).map(|_| true).map_err(|e| e.to_string())
        }
        Err(_) => Ok(false),
    }
}

async fn set(
    home: &Home,
    name: String,
    from_file: Option<&Path>,
    rest: Vec<String>,
    json: bool,
) -> anyhow::Result<i32> {
    if name.contains('=') || !rest.is_empty() {
        let mut message = VALUE_ON_ARGV.to_string();
        message.push_str(
            "\nnothing was stored; if that was a real value it may now be in your shell's history: consider it \
             exposed and rotate it",
        );
        return Ok(refuse(&message, json));
    }
    let name = match SecretName::new(name) {
        Ok(n) => n,
        Err(e) => return Ok(refuse(&e.to_string(), json)),
    };
    let env_key = match check_env_key() {
        Ok(set) => set,
        Err(e) => return Ok(refuse(&e, json)),
    };
    let value = match from_file {
        Some(path) => match std::fs::File::open(path) {
            // A file's bytes as they are (a PEM key keeps its newline).
            Ok(mut f) => read_value(&mut f, &path.display().to_string(), false),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        },
        None if std::io::stdin().is_terminal() => prompt(&name),
        None => read_value(&mut std::io::stdin().lock(), "stdin", true),
    };
    let value = match value {
        Ok(v) => v,
        Err(e) => return Ok(refuse(&format!("secret {name}: {e}"), json)),
    };
    let app = named_app();
    ensure_daemon(home, None).await?;
    let c = secrets_client(home, app.as_deref());
    let request = SecretSetRequest { name: name.to_string(), value: value.expose().to_string(), who: who() };
    let r: SecretReport = match c.post("/v1/secrets/set", &request).await {
        Ok(r) => r,
        Err(e) => return daemon_error(e, app.as_deref(), json),
    };
    drop(request);
    if json {
        emit(&serde_json::to_string(&r)?);
    } else {
        emit(&r.summary);
    }
    for note in &r.notes {
        eprintln!("note: {note}");
    }
    if r.key_created {
        eprintln!(
            "note: created the secrets key {}: back it up, apart from the state directory; the secrets cannot be \
             read without it (or give the key to the daemon in {KEY_ENV})",
            r.key.as_deref().unwrap_or("secrets.key")
        );
    }
    if env_key && r.key.as_deref() != Some(KEY_ENV) {
        eprintln!(
            "warning: {KEY_ENV} is set here, but the daemon used {} (the daemon reads {KEY_ENV} from its own \
             environment: set it where the daemon starts)",
            r.key.as_deref().unwrap_or("its key file")
        );
    }
    if value.len() < MIN_REDACTED_LEN {
        eprintln!(
            "warning: the value is {} byte(s) long: values shorter than {MIN_REDACTED_LEN} bytes are not hidden in \
             task and build output (they occur everywhere), and are easy to guess",
            value.len()
        );
    }
    Ok(0)
}

/// Ask on the terminal, without echo.
fn prompt(name: &SecretName) -> Result<SecretValue, String> {
    let text = Zeroizing::new(
        rpassword::prompt_password(format!("value of {name} (input hidden, Enter to end): "))
            .map_err(|e| format!("cannot read the value from the terminal: {e}"))?,
    );
    if text.is_empty() {
        return Err("no value was typed; to remove a secret, use `nonstop secrets unset NAME`".into());
    }
    SecretValue::new(text.to_string()).map_err(|e| e.to_string())
}

async fn unset(home: &Home, name: String, json: bool) -> anyhow::Result<i32> {
    let name = match SecretName::new(name) {
        Ok(n) => n,
        Err(e) => return Ok(refuse(&e.to_string(), json)),
    };
    let app = named_app();
    let c = secrets_client(home, app.as_deref());
    let r: SecretReport =
        match c.post("/v1/secrets/unset", &SecretUnsetRequest { name: name.to_string(), who: who() }).await {
            Ok(r) => r,
            Err(e) => return daemon_error(e, app.as_deref(), json),
        };
    if json {
        emit(&serde_json::to_string(&r)?);
    } else {
        emit(&r.summary);
    }
    Ok(0)
}

async fn list(home: &Home, json: bool) -> anyhow::Result<i32> {
    let app = named_app();
    let c = secrets_client(home, app.as_deref());
    let l: SecretsList = match c.get("/v1/secrets").await {
        Ok(l) => l,
        Err(e) => return daemon_error(e, app.as_deref(), json),
    };
    if json {
        emit(&serde_json::to_string_pretty(&l)?);
        return Ok(0);
    }
    if l.secrets.is_empty() {
        emit(&format!("no secrets are set for {} in {}", l.app, l.environment));
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = l
        .secrets
        .iter()
        .map(|s| vec![s.name.clone(), format!("v{}", s.version), fmt_time(s.set_at_ms), s.set_by.clone()])
        .collect();
    emit(&format!("secrets of {} in {} (values are never shown)", l.app, l.environment));
    emit(output::table(&["NAME", "VERSION", "SET (UTC)", "BY"], &rows).trim_end());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], strip: bool) -> Result<String, String> {
        read_value(&mut &bytes[..], "stdin", strip).map(|v| v.expose().to_string())
    }

    #[test]
    fn stdin_loses_one_trailing_newline_and_files_keep_theirs() {
        assert_eq!(read(b"tok-123\n", true).unwrap(), "tok-123");
        assert_eq!(read(b"tok-123\r\n", true).unwrap(), "tok-123");
        assert_eq!(read(b"tok-123\n\n", true).unwrap(), "tok-123\n");
        assert_eq!(read(b"tok-123", true).unwrap(), "tok-123");
        assert_eq!(read(b"-----KEY-----\n", false).unwrap(), "-----KEY-----\n");
    }

    #[test]
    fn empty_binary_and_oversized_values_are_refused_without_showing_them() {
        assert!(read(b"", true).unwrap_err().contains("is empty"));
        assert!(read(b"\n", true).unwrap_err().contains("is empty"));
        let e = read(b"ab\xffcd-hidden", true).unwrap_err();
        assert!(e.contains("not UTF-8 text (byte 2)") && !e.contains("hidden"), "{e}");
        let e = read(b"a\0b-hidden", true).unwrap_err();
        assert!(e.contains("NUL") && !e.contains("hidden"), "{e}");
        let big = vec![b'x'; MAX_VALUE_BYTES + 10];
        assert!(read(&big, true).unwrap_err().contains("at most"));
        let max = vec![b'x'; MAX_VALUE_BYTES];
        assert_eq!(read(&max, true).unwrap().len(), MAX_VALUE_BYTES);
    }
}

// ------------------------------------------------------------ nonstop run

/// Why `nonstop run` could not give its command the environment's
/// secrets (it then runs nothing).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunSecretsError {
    #[error("the daemon did not say which environment `nonstop run` runs in (it is older than this nonstop): run `nonstop upgrade`, then run the command again")]
    NoEnvironment,
    #[error("the daemon named app `{app}` in environment `{env}`, which are not valid names: {reason}")]
    BadNames { app: String, env: String, reason: String },
    #[error("the state database {} is not there, so the secrets of {app} in {env} cannot be read; run `nonstop run` with the NONSTOP_HOME the daemon uses", path.display())]
    NoStore { path: std::path::PathBuf, app: String, env: String },
    #[error("the state database {} is damaged ({damage}); run `nonstop doctor`", path.display())]
    Damaged { path: std::path::PathBuf, damage: nonstop_store::Damage },
    #[error("cannot open the state database {}: {source}", path.display())]
    Store {
        path: std::path::PathBuf,
        #[source]
        source: nonstop_store::StoreError,
    },
    #[error("the secrets of {app} in {env} cannot be read, so nothing was run: {source}{}", read_hint(source.as_ref()))]
    Read {
        app: String,
        env: String,
        #[source]
        source: Box<nonstop_engine::SecretsReadError>,
    },
}

/// What to do when the key is the problem: `nonstop run` reads it itself.
fn read_hint(e: &nonstop_engine::SecretsReadError) -> String {
    use nonstop_engine::SecretsReadError as R;
    match e {
        R::Key(_) | R::Crypto(nonstop_secrets::CryptoError::WrongKey { .. }) | R::NoHome => format!(
            " (`nonstop run` decrypts the environment's secrets itself, with the key the daemon uses: run it as the \
             daemon's user with the daemon's NONSTOP_HOME, and, if the daemon is given its key in {KEY_ENV}, with \
             {KEY_ENV} set to that key here too)"
        ),
        _ => String::new(),
    }
}

/// Adds to `vars` (the run context's plain variables) what a process of
/// the environment gets beyond them, read here from the store with the
/// secrets key, as the daemon does for its processes
/// ([`nonstop_engine::EnvironmentSecrets`]): the secrets, and the base
/// services' database password and `REDIS_URL`. Nothing of it goes through
/// the API.
pub(crate) fn add_run_secrets(
    home: &Home,
    ctx: &nonstop_engine::RunContext,
    vars: &mut std::collections::BTreeMap<String, String>,
) -> Result<(), RunSecretsError> {
    if ctx.environment.is_empty() {
        return Err(RunSecretsError::NoEnvironment);
    }
    let bad = |reason: String| RunSecretsError::BadNames { app: ctx.app.clone(), env: ctx.environment.clone(), reason };
    let app = nonstop_core::AppName::new(ctx.app.clone()).map_err(|e| bad(e.to_string()))?;
    let env = nonstop_core::EnvironmentId::new(ctx.environment.clone()).map_err(|e| bad(e.to_string()))?;
    let path = home.database();
    let store = match nonstop_store::Store::inspect(&path) {
        Ok(nonstop_store::Inspection::Healthy(store)) => store,
        Ok(nonstop_store::Inspection::Missing) => {
            return Err(RunSecretsError::NoStore { path, app: app.to_string(), env: env.to_string() })
        }
        Ok(nonstop_store::Inspection::Damaged(damage)) => return Err(RunSecretsError::Damaged { path, damage }),
        Err(source) => return Err(RunSecretsError::Store { path, source }),
    };
    let key = nonstop_engine::SecretsKeyConfig::new(home.path().to_path_buf(), std::env::var(KEY_ENV).ok());
    let secrets = nonstop_engine::EnvironmentSecrets::read(&store, &key, &app, &env).map_err(|source| {
        RunSecretsError::Read { app: app.to_string(), env: env.to_string(), source: Box::new(source) }
    })?;
    secrets.add_to(vars, ctx.database.as_ref());
    Ok(())
}
