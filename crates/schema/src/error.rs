//! What can go wrong in the migration gate. Every message says what went
//! wrong and how to fix it, and never contains a password: URLs appear
//! redacted (`postgres://blog:***@db/blog`) or as `host:port`.

use std::time::Duration;

/// A release task that failed against the scratch copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("release task `{command}` {}; the last lines of its output:\n{output_tail}", match status { Some(c) => format!("exited with status {c}"), None => "was killed by a signal".to_string() })]
pub struct TasksFailed {
    pub command: String,
    /// The exit code; `None` when a signal ended it.
    pub status: Option<i32>,
    /// The end of its output (stdout and stderr), passwords redacted.
    pub output_tail: String,
}

/// Why the gate could not give a verdict. Nothing real was changed in any
/// of these cases: the source database is only ever read.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(
        "[database] url is not one the gate can use: {reason}; fix the url (postgres://USER:PASSWORD@HOST:5432/NAME)"
    )]
    BadUrl { reason: String },

    #[error("[database] url asks for TLS (sslmode={mode}), which the migration gate does not speak yet; use sslmode=prefer or sslmode=disable for a server on a private network, or leave [database] out")]
    TlsNotSupported { mode: String },

    #[error("cannot reach the PostgreSQL server at {server}: {source}; check the host and port in [database] url and that the server runs and accepts TCP connections there")]
    Unreachable {
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("the PostgreSQL server at {server} did not answer within {}s; check the host and port in [database] url (a firewall that drops packets looks like this)", after.as_secs())]
    ConnectTimeout { server: String, after: Duration },

    #[error("the PostgreSQL server at {server} refused user `{user}`: {source}; fix the user or password in [database] url, or allow it in the server's pg_hba.conf")]
    AuthenticationRefused {
        server: String,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("database `{database}` does not exist on the PostgreSQL server at {server}; create it (createdb {database}) or fix the name in [database] url")]
    DatabaseMissing {
        server: String,
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("user `{user}` may not create databases on {server}, and the migration gate copies the schema into a scratch database; allow it (ALTER ROLE \"{user}\" CREATEDB) or leave [database] out")]
    NoCreateDb { server: String, user: String },

    #[error("`{program}` was not found ({source}); the migration gate copies the schema with pg_dump and psql: install the PostgreSQL client tools of the server's version (Debian: apt-get install postgresql-client-{server_major})")]
    ToolMissing {
        program: String,
        server_major: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{program}` is version {tool_version}, older than the PostgreSQL server ({server_version}), which pg_dump refuses to dump; install the client tools of version {server_major} or newer (Debian: apt-get install postgresql-client-{server_major})")]
    ToolTooOld { program: String, tool_version: String, server_version: String, server_major: String },

    #[error(
        "`{program} --version` printed {output:?}, which is not a version; check that it is PostgreSQL's {program}"
    )]
    ToolVersion { program: String, output: String },

    #[error("pg_dump --schema-only of the source database failed ({status}):\n{stderr_tail}")]
    DumpFailed { status: String, stderr_tail: String },

    #[error("the source database uses extension `{extension}`, which the PostgreSQL server cannot install in the scratch copy (it is not available there):\n{stderr_tail}\ninstall the extension's package on the database server (e.g. postgresql-contrib, or postgresql-15-postgis-3 for postgis), then deploy again")]
    ExtensionMissing { extension: String, stderr_tail: String },

    #[error("user `{user}` may not create extension `{extension}` in the scratch copy:\n{stderr_tail}\nallow it (make the extension trusted, or give the user the rights to create it), then deploy again")]
    ExtensionNotPermitted { user: String, extension: String, stderr_tail: String },

    #[error("restoring the schema into the scratch copy failed ({status}):\n{stderr_tail}\nthe source's schema uses something the scratch database cannot have; fix it on the server, or leave [database] out")]
    RestoreFailed { status: String, stderr_tail: String },

    #[error("copying the schema into the scratch copy took more than {}s and was stopped", after.as_secs())]
    CopyTimedOut { after: Duration },

    #[error("the release tasks failed against the scratch copy of the database (nothing real changed): {0}")]
    TasksFailed(#[source] TasksFailed),

    #[error("the release tasks ran for more than {}s against the scratch copy and were stopped (nothing real changed); raise [release] task_timeout if they need longer", after.as_secs())]
    TasksTimedOut { after: Duration },

    #[error("the real database's schema changed while the release tasks ran against the scratch copy ({}); the tasks probably do not read their database from the variables [database.env] gives them (DATABASE_URL by default): check that mapping before deploying again, or find what else migrated the database", changes.join("; "))]
    SourceChanged { changes: Vec<String> },

    #[error("the scratch connection reached database `{found}` instead of `{expected}`; nothing was run")]
    NotScratch { expected: String, found: String },

    #[error("the release tasks' runner panicked: {message}")]
    TasksPanicked { message: String },

    #[error("could not start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} on {server} failed: {source}")]
    Sql {
        what: String,
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("{what} on {server} did not finish within {}s", after.as_secs())]
    Timeout { what: String, server: String, after: Duration },
}

impl GateError {
    /// Is this the user's input (url, rights, tools, the tasks
    /// themselves) rather than a failure of the gate? The CLI's exit code
    /// 2 ("bad input") vs 1.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            GateError::BadUrl { .. }
                | GateError::TlsNotSupported { .. }
                | GateError::AuthenticationRefused { .. }
                | GateError::DatabaseMissing { .. }
                | GateError::NoCreateDb { .. }
                | GateError::ToolMissing { .. }
                | GateError::ToolTooOld { .. }
                | GateError::ExtensionMissing { .. }
                | GateError::ExtensionNotPermitted { .. }
        )
    }
}

impl From<nonstop_pg::ConnectError> for GateError {
    /// A connection to `[database] url` that could not be opened, worded
    /// for it (the driver's error kept as the source).
    fn from(e: nonstop_pg::ConnectError) -> Self {
        use nonstop_pg::ConnectError as C;
        match e {
            C::BadUrl { reason } => GateError::BadUrl { reason },
            C::TlsNotSupported { mode } => GateError::TlsNotSupported { mode: mode.to_string() },
            C::Unreachable { server, source } => GateError::Unreachable { server, source },
            C::Timeout { server, after } => GateError::ConnectTimeout { server, after },
            C::AuthenticationRefused { server, user, source } => {
                GateError::AuthenticationRefused { server, user, source }
            }
            C::DatabaseMissing { server, database, source } => GateError::DatabaseMissing { server, database, source },
            C::Failed { server, source } => GateError::Sql { what: "connecting".into(), server, source },
        }
    }
}
