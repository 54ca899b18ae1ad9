//! An environment's share of the `[base] redis` server: its own database
//! number, or, past the server's databases, a key prefix.
//!
//! `[base] redis` is a [`RedisUrl`] (`nonstop_core::environment`, parsed
//! with the spec; printed redacted); an environment's database of it is a
//! [`RedisDatabaseUrl`] ([`RedisUrl::with_database`]).
//!
//! - [`check_redis`] (I/O): the server answers `PING` with these
//!   credentials; how many databases it has (`CONFIG GET databases`, or
//!   [`ASSUMED_DATABASES`] when the server does not allow it; 1 for a
//!   cluster, which has only database 0);
//! - [`redis_for`] (pure): the database number of a new environment;
//! - [`RedisAssignment::env_vars`] (pure): `REDIS_URL` and
//!   `REDIS_KEY_PREFIX` for its processes;
//! - [`flush_redis`] (I/O): an environment's data removed (`env destroy
//!   --drop-database`): its own database emptied, or its keys in the
//!   shared one deleted.
//!
//! **Database 0 is never an environment's.** It is where every client
//! lands that names no database (`redis-cli`, an app not given
//! `REDIS_URL`, other tools on the same server), so an environment there
//! would share its keys with all of them. Environments get 1, 2, ... up to
//! the server's `databases` - 1 (15 with Redis's default of 16); one that
//! finds them all taken shares database 0 and must keep to its key prefix
//! `APP:ENV:` (`REDIS_KEY_PREFIX`, given in both cases so that an app can
//! always use it).

use crate::error::RedisError;
use nonstop_core::environment::{RedisDatabaseUrl, RedisUrl};
use nonstop_core::{AppName, EnvironmentId};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

/// The databases a server is taken to have when it will not say (`CONFIG`
/// disabled or renamed, as on managed services): Redis's default.
pub const ASSUMED_DATABASES: u32 = 16;
/// The variable that holds the environment's Redis URL.
pub const REDIS_URL_VAR: &str = "REDIS_URL";
/// The variable that holds the environment's key prefix.
pub const REDIS_KEY_PREFIX_VAR: &str = "REDIS_KEY_PREFIX";
/// How long to wait for the server to accept a connection, and for an
/// answer.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(10);
/// How many keys one `SCAN` of [`flush_redis`] asks for.
const SCAN_COUNT: usize = 1000;

/// A `[base] redis` server as [`check_redis`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisBase {
    pub url: RedisUrl,
    /// How many databases the server has (0 to `databases` - 1).
    pub databases: u32,
    /// `databases` is [`ASSUMED_DATABASES`]: the server would not say.
    pub databases_assumed: bool,
}

impl RedisBase {
    /// A server with `databases` databases (from a stored check, or a test).
    pub fn new(url: RedisUrl, databases: u32) -> RedisBase {
        RedisBase { url, databases, databases_assumed: false }
    }
}

/// Where an environment's keys live. The caller stores it with the
/// environment: it is decided once, when the environment is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisAssignment {
    /// A database of its own, 1 or more.
    Database(u8),
    /// Database 0, shared: the environment keeps to its key prefix.
    SharedWithPrefix,
}

impl RedisAssignment {
    /// The database number (0 when shared).
    pub fn database(self) -> u8 {
        match self {
            RedisAssignment::Database(n) => n,
            RedisAssignment::SharedWithPrefix => 0,
        }
    }

    /// The environment's `REDIS_URL`: `base` with its database number.
    pub fn url(self, base: &RedisUrl) -> RedisDatabaseUrl {
        base.with_database(self.database())
    }

    /// The variables of the environment's processes, sorted by name:
    /// `REDIS_KEY_PREFIX` ([`key_prefix`]) and `REDIS_URL` (with the
    /// password, if `base` has one: for processes, never for a log).
    pub fn env_vars(self, base: &RedisUrl, app: &AppName, env: &EnvironmentId) -> Vec<(String, String)> {
        vec![
            (REDIS_KEY_PREFIX_VAR.to_string(), key_prefix(app, env)),
            (REDIS_URL_VAR.to_string(), self.url(base).expose().to_string()),
        ]
    }
}

/// `APP:ENV:`, the environment's key prefix (`:` is in no app or
/// environment name, so two prefixes never overlap).
pub fn key_prefix(app: &AppName, env: &EnvironmentId) -> String {
    format!("{app}:{env}:")
}

/// The database of a new environment on `base`: the lowest number from 1
/// up that is not in `taken` (the numbers the other environments, of every
/// app, hold on this server) and that the server has; past them (or on a
/// server with only database 0, such as a cluster),
/// [`RedisAssignment::SharedWithPrefix`]. Numbers above 255 are not used.
/// Pure.
pub fn redis_for(base: &RedisBase, taken: &[u8]) -> RedisAssignment {
    let limit = base.databases.min(256);
    (1..limit)
        .filter_map(|n| u8::try_from(n).ok())
        .find(|n| !taken.contains(n))
        .map(RedisAssignment::Database)
        .unwrap_or(RedisAssignment::SharedWithPrefix)
}

/// Checks, changing nothing, that `url`'s server can hold environments:
/// it answers `PING` with these credentials. Reads how many databases it
/// has (`CONFIG GET databases`; [`ASSUMED_DATABASES`] when `CONFIG` is not
/// allowed; 1 for a cluster).
pub async fn check_redis(url: &RedisUrl) -> Result<RedisBase, RedisError> {
    let server = url.server();
    let mut con = connect(url, 0).await?;
    let cluster =
        tokio::time::timeout(REDIS_TIMEOUT, redis::cmd("INFO").arg("cluster").query_async::<String>(&mut con))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|info| info.lines().any(|l| l.trim() == "cluster_enabled:1"));
    if cluster {
        return Ok(RedisBase { url: url.clone(), databases: 1, databases_assumed: false });
    }
    let configured = tokio::time::timeout(
        REDIS_TIMEOUT,
        redis::cmd("CONFIG").arg("GET").arg("databases").query_async::<Vec<String>>(&mut con),
    )
    .await;
    let databases = match configured {
        Ok(Ok(pair)) => parse_databases(&pair),
        Ok(Err(e)) => {
            tracing::debug!("base: CONFIG GET databases on {server} refused ({e}); assuming {ASSUMED_DATABASES}");
            None
        }
        Err(_) => None,
    };
    Ok(match databases {
        Some(databases) => RedisBase { url: url.clone(), databases, databases_assumed: false },
        None => RedisBase { url: url.clone(), databases: ASSUMED_DATABASES, databases_assumed: true },
    })
}

/// What [`flush_redis`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flushed {
    /// The environment's own database, emptied; it held `keys` keys.
    Database { number: u8, keys: u64 },
    /// The environment's keys (`prefix*`) in the shared database 0,
    /// deleted: `keys` of them.
    Prefix { prefix: String, keys: u64 },
}

/// Removes an environment's data from the `[base] redis` server at `url`
/// (`env destroy --drop-database`): its own database emptied (`FLUSHDB
/// ASYNC`); in the shared database 0, only the keys under its prefix
/// `APP:ENV:` (`SCAN` and `UNLINK`), never another's. What is gone
/// already is fine: a second call removes nothing more. Redis 4.0 or
/// newer (`ASYNC`, `UNLINK`).
pub async fn flush_redis(
    url: &RedisUrl,
    assignment: RedisAssignment,
    app: &AppName,
    env: &EnvironmentId,
) -> Result<Flushed, RedisError> {
    let server = url.server();
    match assignment {
        RedisAssignment::Database(number) if number > 0 => {
            let mut con = connect(url, number).await?;
            let what = format!("emptying database {number}");
            let keys: u64 = timed(&what, &server, redis::cmd("DBSIZE").query_async(&mut con)).await?;
            timed::<()>(&what, &server, redis::cmd("FLUSHDB").arg("ASYNC").query_async(&mut con)).await?;
            tracing::info!("base: emptied Redis database {number} on {server} ({keys} keys) for {app}/{env}");
            Ok(Flushed::Database { number, keys })
        }
        // Database 0 is shared: only the environment's own keys go.
        _ => {
            let prefix = key_prefix(app, env);
            let mut con = connect(url, 0).await?;
            let what = format!("deleting the keys {prefix}* of database 0");
            let pattern = format!("{}*", glob_escape(&prefix));
            let (mut cursor, mut keys) = (0u64, 0u64);
            loop {
                let (next, batch): (u64, Vec<String>) = timed(
                    &what,
                    &server,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(&mut con),
                )
                .await?;
                if !batch.is_empty() {
                    let n: u64 = timed(&what, &server, redis::cmd("UNLINK").arg(&batch).query_async(&mut con)).await?;
                    keys += n;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            tracing::info!("base: deleted {keys} keys {prefix}* of Redis database 0 on {server}");
            Ok(Flushed::Prefix { prefix, keys })
        }
    }
}

/// `text` with Redis's glob characters escaped (a key prefix matched as it
/// is).
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A connection to database `number` of `url`'s server, its credentials
/// checked (`PING`).
async fn connect(url: &RedisUrl, number: u8) -> Result<MultiplexedConnection, RedisError> {
    let server = url.server();
    let target = url.with_database(number);
    let client = redis::Client::open(target.expose())
        .map_err(|e| RedisError::BadUrl { reason: redact_in(url, &e.to_string()) })?;
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(REDIS_TIMEOUT).set_response_timeout(REDIS_TIMEOUT);
    let attempt = tokio::time::timeout(
        REDIS_TIMEOUT + Duration::from_secs(1),
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await;
    let mut con = match attempt {
        Err(_) => return Err(RedisError::Timeout { server, after: REDIS_TIMEOUT }),
        Ok(Err(e)) => return Err(connect_error(e, server)),
        Ok(Ok(con)) => con,
    };
    let pong = tokio::time::timeout(REDIS_TIMEOUT, redis::cmd("PING").query_async::<String>(&mut con)).await;
    match pong {
        Err(_) => Err(RedisError::Timeout { server, after: REDIS_TIMEOUT }),
        Ok(Err(e)) => Err(connect_error(e, server)),
        Ok(Ok(_)) => Ok(con),
    }
}

/// A command, within [`REDIS_TIMEOUT`].
async fn timed<T>(
    what: &str,
    server: &str,
    command: impl Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(REDIS_TIMEOUT, command).await {
        Err(_) => Err(RedisError::Timeout { server: server.to_string(), after: REDIS_TIMEOUT }),
        Ok(Err(source)) => Err(RedisError::Command { what: what.to_string(), server: server.to_string(), source }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// `text` with `url` and its password hidden.
fn redact_in(url: &RedisUrl, text: &str) -> String {
    let mut out = text.replace(url.expose(), &url.redacted());
    if let Some(password) = url.password().filter(|p| !p.is_empty()) {
        out = out.replace(password, "***");
    }
    out
}

/// `["databases", "16"]` → 16.
fn parse_databases(pair: &[String]) -> Option<u32> {
    match pair {
        [name, value] if name == "databases" => value.parse().ok().filter(|n| *n > 0),
        _ => None,
    }
}

fn connect_error(source: redis::RedisError, server: String) -> RedisError {
    let auth = source.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(source.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
    if auth {
        RedisError::AuthenticationRefused { server, source }
    } else if source.is_timeout() {
        RedisError::Timeout { server, after: REDIS_TIMEOUT }
    } else if source.is_io_error() {
        RedisError::Unreachable { server, source }
    } else {
        RedisError::Command { what: "PING".into(), server, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn url(text: &str) -> RedisUrl {
        RedisUrl::parse(text).unwrap()
    }

    #[test]
    fn errors_and_patterns_hide_and_escape() {
        let u = url("redis://:hunter2@cache.internal:6380");
        assert_eq!(
            redact_in(&u, "oops redis://:hunter2@cache.internal:6380 hunter2"),
            "oops redis://:***@cache.internal:6380 ***"
        );
        assert_eq!(redact_in(&url("redis://h"), "x redis://h y"), "x redis://h y");
        assert_eq!(glob_escape("blog:pr-1:"), "blog:pr-1:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn assignments_give_the_url_and_the_prefix() {
        let base = url("redis://:pw@cache:6379/");
        let (app, env) = (AppName::new("blog").unwrap(), EnvironmentId::new("staging").unwrap());
        assert_eq!(
            RedisAssignment::Database(4).env_vars(&base, &app, &env),
            vec![
                ("REDIS_KEY_PREFIX".to_string(), "blog:staging:".to_string()),
                ("REDIS_URL".to_string(), "redis://:pw@cache:6379/4".to_string())
            ]
        );
        assert_eq!(RedisAssignment::SharedWithPrefix.url(&base).expose(), "redis://:pw@cache:6379/0");
        assert_eq!(serde_json::to_string(&RedisAssignment::Database(4)).unwrap(), r#"{"database":4}"#);
        assert_eq!(serde_json::to_string(&RedisAssignment::SharedWithPrefix).unwrap(), r#""shared_with_prefix""#);
    }

    #[test]
    fn allocation_skips_zero_and_the_taken() {
        let base = |n| RedisBase::new(url("redis://h"), n);
        assert_eq!(redis_for(&base(16), &[]), RedisAssignment::Database(1));
        assert_eq!(redis_for(&base(16), &[1, 2, 4]), RedisAssignment::Database(3));
        assert_eq!(redis_for(&base(16), &(1..16).collect::<Vec<u8>>()), RedisAssignment::SharedWithPrefix);
        assert_eq!(redis_for(&base(1), &[]), RedisAssignment::SharedWithPrefix);
        assert_eq!(redis_for(&base(10_000), &(1..=254).collect::<Vec<u8>>()), RedisAssignment::Database(255));
        assert_eq!(redis_for(&base(10_000), &(1..=255).collect::<Vec<u8>>()), RedisAssignment::SharedWithPrefix);
        assert_eq!(parse_databases(&["databases".into(), "32".into()]), Some(32));
        assert_eq!(parse_databases(&[]), None);
    }

    proptest! {
        #[test]
        fn an_assignment_is_the_lowest_free_number_the_server_has(
            databases in 0u32..300,
            taken in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let got = redis_for(&RedisBase::new(url("redis://h"), databases), &taken);
            match got {
                RedisAssignment::Database(n) => {
                    prop_assert!(n >= 1);
                    prop_assert!(u32::from(n) < databases);
                    prop_assert!(!taken.contains(&n));
                    prop_assert!((1..n).all(|m| taken.contains(&m)), "a lower number was free");
                }
                RedisAssignment::SharedWithPrefix => {
                    let limit = databases.min(256);
                    prop_assert!((1..limit).all(|m| taken.contains(&(m as u8))), "a number was free");
                }
            }
        }

        #[test]
        fn prefixes_of_different_pairs_never_overlap(
            a1 in "[a-z][a-z0-9_-]{0,10}", e1 in "[a-z][a-z0-9_-]{0,10}",
            a2 in "[a-z][a-z0-9_-]{0,10}", e2 in "[a-z][a-z0-9_-]{0,10}",
        ) {
            prop_assume!((&a1, &e1) != (&a2, &e2));
            let p1 = key_prefix(&AppName::new(a1).unwrap(), &EnvironmentId::new(e1).unwrap());
            let p2 = key_prefix(&AppName::new(a2).unwrap(), &EnvironmentId::new(e2).unwrap());
            prop_assert!(!p1.starts_with(&p2) && !p2.starts_with(&p1), "{} {}", p1, p2);
        }
    }
}
