//! What can go wrong with an environment's base services. Every message
//! says what went wrong and how to fix it, and none contains a password:
//! servers appear as `host:port`, URLs redacted (`postgres://admin:***@db/`),
//! and role passwords are sent to PostgreSQL as SCRAM verifiers, so not even
//! a server's error can echo one.

use std::fmt;
use std::time::Duration;

/// A right the `[base] postgres` user needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Right {
    /// To create each environment's database.
    CreateDb,
    /// To create each environment's login role.
    CreateRole,
}

impl Right {
    /// The role attribute's SQL spelling.
    pub fn as_sql(self) -> &'static str {
        match self {
            Right::CreateDb => "CREATEDB",
            Right::CreateRole => "CREATEROLE",
        }
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_sql())
    }
}

/// A PostgreSQL object of an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Role,
    Database,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Role => "role",
            ObjectKind::Database => "database",
        })
    }
}

fn rights_sql(missing: &[Right]) -> String {
    missing.iter().map(|r| r.as_sql()).collect::<Vec<_>>().join(" ")
}

fn rights_words(missing: &[Right]) -> String {
    missing
        .iter()
        .map(|r| match r {
            Right::CreateDb => "create databases",
            Right::CreateRole => "create roles",
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Why an environment's PostgreSQL database could not be checked, made,
/// found or dropped. The checks (URL, server, rights, names taken by
/// objects nonstop did not make) all run before anything is changed: an
/// error from one of them means nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("[base] postgres is not a URL nonstop can use: {reason}; write it as postgres://USER:PASSWORD@HOST:5432/")]
    BadUrl { reason: String },

    #[error("[base] postgres asks for TLS (sslmode={mode}), which nonstop does not speak to PostgreSQL yet; use sslmode=prefer or sslmode=disable for a server on a private network")]
    TlsNotSupported { mode: String },

    #[error("cannot reach the PostgreSQL server at {server}: {}; check the host and port in [base] postgres and that the server runs and accepts TCP connections there", chain(source))]
    Unreachable {
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("the PostgreSQL server at {server} did not answer within {}s; check the host and port in [base] postgres (a firewall that drops packets looks like this)", after.as_secs())]
    ConnectTimeout { server: String, after: Duration },

    #[error("the PostgreSQL server at {server} refused user `{user}`: {}; fix the user or password in [base] postgres, or allow it in the server's pg_hba.conf", chain(source))]
    AuthenticationRefused {
        server: String,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("database `{database}`, which [base] postgres connects to, does not exist on the PostgreSQL server at {server}; name an existing one in the URL's path (postgres://USER@HOST/postgres)")]
    DatabaseMissing {
        server: String,
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("the PostgreSQL server at {server} is version {version}; nonstop needs 10 or newer (for SCRAM passwords); upgrade the server or point [base] postgres at a newer one")]
    ServerTooOld { server: String, version: String },

    #[error("user `{user}` may not {} on the PostgreSQL server at {server}, and nonstop makes a database and a login role for each environment; allow it as a superuser (ALTER ROLE \"{}\" {}) or point [base] postgres at a user that may", rights_words(missing), user.replace('"', "\"\""), rights_sql(missing))]
    MissingRights { server: String, user: String, missing: Vec<Right> },

    #[error("a {kind} named `{name}` already exists on the PostgreSQL server at {server}, and nonstop did not make it for app `{app}` environment `{env}`, so nothing was changed; rename or drop that {kind}, or hand it to nonstop by running as a superuser: {handover} (nonstop then sets the role's password; objects in a database keep their owners)")]
    NotManaged {
        server: String,
        kind: ObjectKind,
        name: String,
        app: String,
        env: String,
        /// The SQL that hands the object to nonstop (see
        /// [`crate::postgres`]'s invariants): the mark on the role, the
        /// role as the database's owner.
        handover: String,
    },

    #[error("the password given for environment `{env}` is empty; PostgreSQL refuses an empty password: generate one (nonstop_base::generate_password)")]
    EmptyPassword { env: String },

    #[error("the operating system's random number generator failed ({source}), so no password was made; nothing was created")]
    NoRandomness {
        #[source]
        source: getrandom::Error,
    },

    #[error("--drop-database needs the database's name typed again: type `{database}` (you typed `{typed}`); without --drop-database, env destroy keeps the database")]
    DropNotConfirmed { database: String, typed: String },

    #[error("{what} on the PostgreSQL server at {server} failed: {}", chain(source))]
    Sql {
        what: String,
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("{what} on the PostgreSQL server at {server} did not finish within {}s", after.as_secs())]
    Timeout { what: String, server: String, after: Duration },

    #[error("environment `{env}` has no database of its own made by nonstop on the PostgreSQL server at {server} (no `{database}`), so there is nothing to copy; create the new environment without --from, or deploy `{env}` with [base] postgres first")]
    NoSourceDatabase { server: String, env: String, database: String },

    #[error("database `{database}` of environment `{env}` already exists on the PostgreSQL server at {server} (kept by an earlier `env destroy`?), and --from never overwrites one; nothing was changed. Create the environment without --from to use that database as it is, or drop it first (`nonstop env destroy {env} --drop-database {database}` once it exists again, or DROP DATABASE as an administrator)")]
    TargetExists { server: String, env: String, database: String },

    #[error("copying database {from} into {to} failed: {stage} ended with {status}{}; the new database was left empty", if stderr_tail.is_empty() { String::new() } else { format!(":\n{stderr_tail}") })]
    CopyFailed { from: String, to: String, stage: crate::copy::CopyStage, status: String, stderr_tail: String },

    #[error("copying database {from} into {to} on the PostgreSQL server at {server} did not finish within {}s; the new database was left empty", after.as_secs())]
    CopyTimeout { from: String, to: String, server: String, after: Duration },

    #[error("cannot run {program}: {source}; install the PostgreSQL client programs (pg_dump, psql; e.g. apt-get install postgresql-client), no older than the server")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// An error and its sources, `: `-separated (tokio-postgres's own text is
/// only "db error" or "error connecting to server").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

impl BaseError {
    /// Is this the user's input (URL, server, rights, a name taken, a
    /// confirmation) rather than a failure along the way? The CLI's exit
    /// code 2 ("bad input") vs 1.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            BaseError::BadUrl { .. }
                | BaseError::TlsNotSupported { .. }
                | BaseError::Unreachable { .. }
                | BaseError::ConnectTimeout { .. }
                | BaseError::AuthenticationRefused { .. }
                | BaseError::DatabaseMissing { .. }
                | BaseError::ServerTooOld { .. }
                | BaseError::MissingRights { .. }
                | BaseError::NotManaged { .. }
                | BaseError::EmptyPassword { .. }
                | BaseError::DropNotConfirmed { .. }
                | BaseError::NoSourceDatabase { .. }
                | BaseError::TargetExists { .. }
                | BaseError::Spawn { .. }
        )
    }
}

impl From<nonstop_pg::ConnectError> for BaseError {
    /// A connection to `[base] postgres` that could not be opened, worded
    /// for it (the driver's error kept as the source).
    fn from(e: nonstop_pg::ConnectError) -> Self {
        use nonstop_pg::ConnectError as C;
        match e {
            C::BadUrl { reason } => BaseError::BadUrl { reason },
            C::TlsNotSupported { mode } => BaseError::TlsNotSupported { mode: mode.to_string() },
            C::Unreachable { server, source } => BaseError::Unreachable { server, source },
            C::Timeout { server, after } => BaseError::ConnectTimeout { server, after },
            C::AuthenticationRefused { server, user, source } => {
                BaseError::AuthenticationRefused { server, user, source }
            }
            C::DatabaseMissing { server, database, source } => BaseError::DatabaseMissing { server, database, source },
            C::Failed { server, source } => BaseError::Sql { what: "connecting".into(), server, source },
        }
    }
}

/// Why the `[base] redis` server cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("[base] redis is not a URL nonstop can use: {reason}; write it as redis://[:PASSWORD@]HOST:6379")]
    BadUrl { reason: String },

    #[error("cannot reach the Redis server at {server}: {source}; check the host and port in [base] redis and that the server runs and accepts TCP connections there")]
    Unreachable {
        server: String,
        #[source]
        source: redis::RedisError,
    },

    #[error("the Redis server at {server} did not answer within {}s; check the host and port in [base] redis (a firewall that drops packets looks like this)", after.as_secs())]
    Timeout { server: String, after: Duration },

    #[error("the Redis server at {server} refused the credentials of [base] redis: {source}; fix the user or password in the URL (redis://:PASSWORD@HOST:6379, or redis://USER:PASSWORD@HOST:6379 with ACLs)")]
    AuthenticationRefused {
        server: String,
        #[source]
        source: redis::RedisError,
    },

    #[error("{what} on the Redis server at {server} failed: {source}")]
    Command {
        what: String,
        server: String,
        #[source]
        source: redis::RedisError,
    },
}

impl RedisError {
    /// Is this the user's input (URL, server, credentials)? See
    /// [`BaseError::is_bad_input`].
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, RedisError::Command { .. })
    }
}
