//! An environment's share of the `[base] redis` server: its own database
//! number, or, past the server's databases, a key prefix.
//!
//! - [`RedisUrl`] (pure): `[base] redis`, parsed; printed redacted;
//! - [`check_redis`] (I/O): the server answers `PING` with these
//!   credentials; how many databases it has (`CONFIG GET databases`, or
//!   [`ASSUMED_DATABASES`] when the server does not allow it; 1 for a
//!   cluster, which has only database 0);
//! - [`redis_for`] (pure): the database number of a new environment;
//! - [`RedisAssignment::env_vars`] (pure): `REDIS_URL` and
//!   `REDIS_KEY_PREFIX` for its processes.
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
use nonstop_core::{AppName, EnvironmentId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// The port Redis listens on when a URL names none.
pub const DEFAULT_REDIS_PORT: u16 = 6379;
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

/// Why a text is not a Redis URL nonstop can use. Messages never contain
/// the URL (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisUrlError {
    #[error("the URL does not start with redis:// or rediss://{}", found.as_ref().map(|s| format!(" (its scheme is `{s}`)")).unwrap_or_default())]
    Scheme { found: Option<String> },
    #[error("the URL names no host")]
    NoHost,
    #[error("the URL's port is not a number from 1 to 65535")]
    Port,
    #[error("the URL names database `{path}`; leave the number out (redis://HOST:6379): nonstop gives each environment a database of its own")]
    Database { path: String },
    #[error(
        "the URL sets `{key}` in its parameters; leave it out: nonstop gives each environment a database of its own"
    )]
    Parameter { key: String },
    #[error("the URL contains a space or a control character; percent-encode it (a space is %20)")]
    Character,
}

/// `[base] redis`: `redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/0][?params]`,
/// without a database number. `Debug` and `Display` print it with the
/// password replaced by `***`; only [`RedisUrl::expose`] gives the text.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    text: String,
    tls: bool,
    /// Raw user info, without the `@`.
    userinfo: Option<String>,
    /// Raw host, `[::1]` with its brackets.
    host_raw: String,
    port: Option<u16>,
    /// Raw query, without the `?`.
    query: Option<String>,
}

impl RedisUrl {
    pub fn parse(text: &str) -> Result<RedisUrl, RedisUrlError> {
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(RedisUrlError::Character);
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            let found = text.split_once(':').map(|(s, _)| s.to_string()).filter(|s| !s.is_empty());
            return Err(RedisUrlError::Scheme { found });
        };
        let tls = if scheme.eq_ignore_ascii_case("redis") {
            false
        } else if scheme.eq_ignore_ascii_case("rediss") {
            true
        } else {
            return Err(RedisUrlError::Scheme { found: Some(scheme.to_string()) });
        };
        let rest = rest.split('#').next().unwrap_or("");
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q.to_string()).filter(|q| !q.is_empty())),
            None => (rest, None),
        };
        let (userinfo, hostpath) = match before_query.rfind('@') {
            Some(at) => (Some(before_query[..at].to_string()), &before_query[at + 1..]),
            None => (None, before_query),
        };
        let (hostport, path) = hostpath.split_once('/').unwrap_or((hostpath, ""));
        let (host_raw, port_text) = if let Some(inner) = hostport.strip_prefix('[') {
            let Some(end) = inner.find(']') else { return Err(RedisUrlError::NoHost) };
            let after = &inner[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(RedisUrlError::Port),
            };
            (&hostport[..end + 2], port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host_raw.trim_start_matches('[').trim_end_matches(']').is_empty() {
            return Err(RedisUrlError::NoHost);
        }
        let port = match port_text {
            None => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(RedisUrlError::Port)?),
        };
        if !path.is_empty() && path != "0" {
            return Err(RedisUrlError::Database { path: path.to_string() });
        }
        if let Some(q) = &query {
            for kv in q.split('&') {
                let key = kv.split('=').next().unwrap_or("");
                if key == "db" {
                    return Err(RedisUrlError::Parameter { key: key.to_string() });
                }
            }
        }
        Ok(RedisUrl { text: text.to_string(), tls, userinfo, host_raw: host_raw.to_string(), port, query })
    }

    /// The real URL, password included. Never print it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// `rediss://`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host as written (`[::1]` with brackets).
    pub fn host(&self) -> &str {
        &self.host_raw
    }

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_REDIS_PORT)
    }

    /// `host:port`: how the server appears in messages, and what tells two
    /// `[base] redis` URLs apart when counting the numbers taken.
    pub fn server(&self) -> String {
        format!("{}:{}", self.host_raw, self.port())
    }

    /// The same server and credentials, database `number`.
    pub fn with_database(&self, number: u8) -> RedisUrl {
        let text = self.rebuild(Some(number), false);
        RedisUrl { text, ..self.clone() }
    }

    /// The URL with its password replaced by `***`: safe to print.
    pub fn redacted(&self) -> String {
        let database = self.text_database();
        self.rebuild(database, true)
    }

    fn text_database(&self) -> Option<u8> {
        let path = self.text.split_once("://").map(|(_, r)| r).unwrap_or("");
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.rsplit_once('@').map(|(_, h)| h).unwrap_or(path);
        path.split_once('/').and_then(|(_, n)| n.parse().ok())
    }

    fn rebuild(&self, database: Option<u8>, redact: bool) -> String {
        let mut out = String::from(if self.tls { "rediss://" } else { "redis://" });
        if let Some(info) = &self.userinfo {
            match info.split_once(':') {
                Some((user, _)) if redact => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                _ => out.push_str(info),
            }
            out.push('@');
        }
        out.push_str(&self.host_raw);
        if let Some(port) = self.port {
            out.push_str(&format!(":{port}"));
        }
        if let Some(n) = database {
            out.push_str(&format!("/{n}"));
        }
        if let Some(q) = &self.query {
            out.push('?');
            if redact {
                let params: Vec<String> = q
                    .split('&')
                    .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
                    .collect();
                out.push_str(&params.join("&"));
            } else {
                out.push_str(q);
            }
        }
        out
    }

    /// Replaces this URL and its password in `text` by their redacted forms.
    fn redact_in(&self, text: &str) -> String {
        let mut out = text.replace(&self.text, &self.redacted());
        if let Some((_, password)) = self.userinfo.as_deref().and_then(|i| i.split_once(':')) {
            if !password.is_empty() {
                out = out.replace(password, "***");
            }
        }
        out
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RedisUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

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
    pub fn url(self, base: &RedisUrl) -> RedisUrl {
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
    if url.is_tls() {
        return Err(RedisError::TlsNotSupported);
    }
    let server = url.server();
    let client = redis::Client::open(url.with_database(0).expose())
        .map_err(|e| RedisError::BadUrl { reason: url.redact_in(&e.to_string()) })?;
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
        Err(_) => return Err(RedisError::Timeout { server, after: REDIS_TIMEOUT }),
        Ok(Err(e)) => return Err(connect_error(e, server)),
        Ok(Ok(_)) => {}
    }
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
    fn urls_are_read_and_redacted() {
        let u = url("redis://:hunter2@cache.internal:6380");
        assert_eq!((u.host(), u.port(), u.server()), ("cache.internal", 6380, "cache.internal:6380".to_string()));
        for shown in [u.to_string(), format!("{u:?}"), u.redacted(), u.with_database(3).to_string()] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert_eq!(u.redacted(), "redis://:***@cache.internal:6380");
        assert_eq!(u.with_database(3).expose(), "redis://:hunter2@cache.internal:6380/3");
        assert_eq!(u.with_database(3).to_string(), "redis://:***@cache.internal:6380/3");
        let acl = url("redis://app:pw@[::1]/0?protocol=resp3");
        assert_eq!((acl.host(), acl.port()), ("[::1]", 6379));
        assert_eq!(acl.with_database(2).expose(), "redis://app:pw@[::1]/2?protocol=resp3");
        assert_eq!(acl.redacted(), "redis://app:***@[::1]/0?protocol=resp3");
        assert!(url("rediss://h").is_tls());
        assert_eq!(url("redis://h").redact_in("x redis://h y"), "x redis://h y");
        assert_eq!(u.redact_in("oops hunter2"), "oops ***");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for (text, err) in [
            ("http://:secret@h", RedisUrlError::Scheme { found: Some("http".into()) }),
            ("h:6379", RedisUrlError::Scheme { found: Some("h".into()) }),
            ("redis://:secret@", RedisUrlError::NoHost),
            ("redis://:secret@h:0", RedisUrlError::Port),
            ("redis://:secret@h:x", RedisUrlError::Port),
            ("redis://:secret@h/3", RedisUrlError::Database { path: "3".into() }),
            ("redis://:secret@h/?db=2", RedisUrlError::Parameter { key: "db".into() }),
            ("redis://:sec ret@h", RedisUrlError::Character),
        ] {
            let e = RedisUrl::parse(text).unwrap_err();
            assert_eq!(e, err, "{text}");
            assert!(!e.to_string().contains("secret"));
        }
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
