//! PostgreSQL connections as nonstop opens them: the migration gate's
//! (`nonstop-schema`) and the base services' (`nonstop-base`), one way.
//!
//! - [`connect`]: a URL read as tokio-postgres reads it, refused when it
//!   asks for TLS (nonstop does not speak TLS to PostgreSQL yet), a
//!   connection opened within a timeout, its driver on a task of its own
//!   that ends with the client;
//! - [`ConnectError`]: why not, classified (unreachable, a timeout, the
//!   login refused, the database missing), with the driver's error kept as
//!   the source. Each caller words it for its own input (`[database] url`,
//!   `[base] postgres`) by mapping the variants into its own error type;
//! - [`server_of`] (pure): `host:port`, as servers appear in messages;
//!   [`quote_ident`] (pure): an SQL identifier.
//!
//! Messages never contain a password: URLs appear as `host:port`, and a
//! URL tokio-postgres cannot read is reported redacted.
#![forbid(unsafe_code)]

use nonstop_core::database::DatabaseUrl;
use std::time::Duration;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// How a connection is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// To reach the server and log in.
    pub timeout: Duration,
    /// `application_name`, as the server's `pg_stat_activity` shows it.
    pub application_name: &'static str,
}

/// The TLS a URL asks for, which nonstop does not speak yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `sslmode=require`.
    Require,
    /// `sslmode=verify-ca` or `verify-full` (or a mode tokio-postgres
    /// adds later).
    Verify,
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Require => "require",
            TlsMode::Verify => "verify",
        })
    }
}

/// Why no connection was opened. Callers map each variant into their own
/// error (whose message names the setting to fix), keeping the source.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// tokio-postgres cannot read the URL (`reason` is redacted).
    #[error("the URL cannot be used: {reason}")]
    BadUrl { reason: String },
    #[error("the URL asks for TLS (sslmode={mode}), which nonstop does not speak to PostgreSQL yet")]
    TlsNotSupported { mode: TlsMode },
    #[error("cannot reach the PostgreSQL server at {server}")]
    Unreachable {
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the PostgreSQL server at {server} did not answer within {}s", after.as_secs())]
    Timeout { server: String, after: Duration },
    #[error("the PostgreSQL server at {server} refused user `{user}`")]
    AuthenticationRefused {
        server: String,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database `{database}` does not exist on the PostgreSQL server at {server}")]
    DatabaseMissing {
        server: String,
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Anything else the server or the driver said while connecting.
    #[error("connecting to the PostgreSQL server at {server} failed")]
    Failed {
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// `host:port`, with brackets for IPv6: how servers appear in messages.
/// Pure.
pub fn server_of(url: &DatabaseUrl) -> String {
    if url.host().contains(':') {
        format!("[{}]:{}", url.host(), url.port())
    } else {
        format!("{}:{}", url.host(), url.port())
    }
}

/// `name` as an SQL identifier (`"a""b"`). Pure.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `url` as a tokio-postgres configuration: refused when it asks for TLS
/// (only `sslmode=prefer`, the default, and `disable` connect without
/// it). Pure.
pub fn config_of(url: &DatabaseUrl, opts: &ConnectOptions) -> Result<Config, ConnectError> {
    let mut config: Config = url
        .expose()
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectError::BadUrl { reason: url.redact_in(&e.to_string()) })?;
    match config.get_ssl_mode() {
        SslMode::Prefer | SslMode::Disable => {}
        SslMode::Require => return Err(ConnectError::TlsNotSupported { mode: TlsMode::Require }),
        _ => return Err(ConnectError::TlsNotSupported { mode: TlsMode::Verify }),
    }
    config.connect_timeout(opts.timeout);
    config.application_name(opts.application_name);
    Ok(config)
}

/// Opens a connection to `url`'s database within `opts.timeout`. The
/// connection's driver runs on a task that ends with the client.
pub async fn connect(url: &DatabaseUrl, opts: &ConnectOptions) -> Result<Client, ConnectError> {
    let config = config_of(url, opts)?;
    let server = server_of(url);
    // tokio-postgres's own timeout covers each address it tries; this one
    // the whole attempt.
    let attempt = tokio::time::timeout(opts.timeout + Duration::from_secs(1), config.connect(NoTls)).await;
    let (client, connection) = match attempt {
        Err(_) => return Err(ConnectError::Timeout { server, after: opts.timeout }),
        Ok(Err(e)) => return Err(classify(e, url, server)),
        Ok(Ok(pair)) => pair,
    };
    let name = opts.application_name;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("{name}: connection ended: {e}");
        }
    });
    Ok(client)
}

/// What a failed connection attempt means.
fn classify(source: tokio_postgres::Error, url: &DatabaseUrl, server: String) -> ConnectError {
    let user = url.user().unwrap_or("(the default user)").to_string();
    if let Some(db) = source.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            return ConnectError::AuthenticationRefused { server, user, source };
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return ConnectError::DatabaseMissing { server, database: url.database().to_string(), source };
        }
        return ConnectError::Failed { server, source };
    }
    let text = source.to_string();
    if text.contains("password missing") {
        return ConnectError::AuthenticationRefused { server, user, source };
    }
    if std::error::Error::source(&source).is_some_and(|s| s.is::<std::io::Error>()) || text.contains("connecting") {
        return ConnectError::Unreachable { server, source };
    }
    ConnectError::Failed { server, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: ConnectOptions = ConnectOptions { timeout: Duration::from_secs(3), application_name: "nonstop-test" };

    fn url(text: &str) -> DatabaseUrl {
        DatabaseUrl::parse(text).unwrap()
    }

    #[test]
    fn servers_and_identifiers() {
        assert_eq!(server_of(&url("postgres://u@db.internal:6543/x")), "db.internal:6543");
        assert_eq!(server_of(&url("postgres://u@[::1]/x")), "[::1]:5432");
        assert_eq!(quote_ident("blog_staging"), "\"blog_staging\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn tls_is_refused_and_the_rest_configured() {
        let e = config_of(&url("postgres://u:pw@h/x?sslmode=require"), &OPTS).unwrap_err();
        assert!(matches!(e, ConnectError::TlsNotSupported { mode: TlsMode::Require }), "{e:?}");
        // A mode this tokio-postgres does not know is a URL it cannot read.
        let e = config_of(&url("postgres://u:Sup3rSecret@h/x?sslmode=verify-full"), &OPTS).unwrap_err();
        assert!(matches!(&e, ConnectError::BadUrl { .. }) && !e.to_string().contains("Sup3rSecret"), "{e:?}");
        let config = config_of(&url("postgres://u:pw@h:5433/x?sslmode=disable"), &OPTS).unwrap();
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(config.get_application_name(), Some("nonstop-test"));
        assert_eq!(config.get_dbname(), Some("x"));
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_and_names_the_server_only() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let e = connect(&url(&format!("postgres://u:Sup3rSecret@127.0.0.1:{port}/x")), &OPTS).await.unwrap_err();
        assert!(matches!(&e, ConnectError::Unreachable { server, .. } if *server == format!("127.0.0.1:{port}")));
        assert!(std::error::Error::source(&e).is_some(), "the driver's error is kept");
        assert!(!format!("{e} {e:?}").contains("Sup3rSecret"));
    }
}
