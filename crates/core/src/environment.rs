//! Environments: several deployments of one app (production, staging, ad
//! hoc ones), described by one `nonstop.toml`.
//!
//! What lives here is the vocabulary every crate shares, all pure:
//!
//! - environment names ([`environment_name`]): a DNS label of at most
//!   [`MAX_ENVIRONMENT_NAME_LEN`] characters, since a name becomes part of
//!   a host (`staging.blog.localhost`) and of a database name;
//! - hosts ([`check_host`], [`host_match`], [`answering`]): which
//!   environment answers a request's `Host`. An exact host beats a
//!   wildcard (`*.example.com`, one label), which beats the one
//!   environment that answers every host no environment claims;
//! - [`BaseSpec`] (`[base]`): the servers environments share (one
//!   PostgreSQL server with a database per environment, one Redis), with
//!   [`RedisUrl`], redacted when printed like
//!   [`DatabaseUrl`](crate::database::DatabaseUrl).
//!
//! The per-environment overrides themselves are parsed and resolved into
//! an [`AppSpec`](crate::process::AppSpec) by `nonstop-spec`.

use crate::database::{decode, split_authority, AuthorityError, DatabaseUrl, UrlError, REDACTED};
use crate::ids::{AppName, EnvironmentId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The environment of a spec that names none (and of every record written
/// before environments existed).
pub const DEFAULT_ENVIRONMENT: &str = "default";

/// The environment variable that chooses the environment of a command
/// when `-e` does not.
pub const ENVIRONMENT_VAR: &str = "NONSTOP_ENV";

/// Longest environment name: it becomes part of a database name
/// (`APP_ENV`, at most 63 bytes in PostgreSQL) and of a host.
pub const MAX_ENVIRONMENT_NAME_LEN: usize = 32;

/// The domain of the hosts an environment answers when its spec names
/// none: `ENV.APP.localhost` (browsers and systemd-resolved send every
/// `*.localhost` name to the loopback address).
pub const DEFAULT_HOST_DOMAIN: &str = "localhost";

const ENVIRONMENT_NAME_RULE: &str =
    "use 1 to 32 characters: lowercase letters, digits and '-', starting with a letter and not ending with '-'";

/// Why a text is not an environment name, with a valid name close to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid environment name {value:?}: {rule} (for example {suggestion:?})")]
pub struct EnvironmentNameError {
    pub value: String,
    pub rule: &'static str,
    /// A valid name made from `value` (`Staging_2` → `staging-2`).
    pub suggestion: String,
}

/// Whether `name` is a valid environment name: a DNS label (lowercase
/// letters, digits and '-', starting with a letter, not ending with '-') of
/// at most 32 characters.
pub fn is_environment_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_ENVIRONMENT_NAME_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// The environment named `name`, if it is a valid environment name (which
/// is stricter than what [`EnvironmentId::new`] accepts: no '_', at most
/// 32 characters).
pub fn environment_name(name: &str) -> Result<EnvironmentId, EnvironmentNameError> {
    if is_environment_name(name) {
        if let Ok(id) = EnvironmentId::new(name) {
            return Ok(id);
        }
    }
    Err(EnvironmentNameError {
        value: name.to_string(),
        rule: ENVIRONMENT_NAME_RULE,
        suggestion: suggest_environment_name(name),
    })
}

/// A valid environment name made from `text`: lowercase, runs of other
/// characters become one '-', `env-` before a leading digit, at most 32
/// characters; `staging` when nothing is left.
pub fn suggest_environment_name(text: &str) -> String {
    let mut out = String::new();
    for c in text.trim().chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "env-");
    }
    let mut name: String = out.chars().take(MAX_ENVIRONMENT_NAME_LEN).collect();
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        "staging".to_string()
    } else {
        name
    }
}

/// The host an environment answers when its spec names none:
/// `staging.blog.localhost`.
pub fn default_host(environment: &EnvironmentId, app: &AppName) -> String {
    format!("{environment}.{app}.{DEFAULT_HOST_DOMAIN}")
}

/// Why a text is not a host an environment can answer. Where the intent is
/// clear, [`suggest_host`] gives the fixed host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("it is empty")]
    Empty,
    #[error("it is a URL; write the host name alone")]
    Url,
    #[error("it has a port; hosts are matched without their port")]
    Port,
    #[error("it has upper-case letters; write host names in lower case")]
    Uppercase,
    #[error("it ends with a dot")]
    TrailingDot,
    #[error("a wildcard is `*.` in front of the rest of the name (one label), as in \"*.example.com\"")]
    Wildcard,
    #[error(
        "host names are labels of lowercase letters, digits and '-' (not at either end of a label), separated by dots"
    )]
    Characters,
    #[error("it is longer than 253 characters")]
    TooLong,
}

/// Checks a host an environment answers: a lowercase DNS name (an IPv4
/// address is one too), optionally with one leading `*.` (which matches
/// exactly one label), without a scheme, a path or a port.
pub fn check_host(text: &str) -> Result<(), HostError> {
    if text.trim().is_empty() {
        return Err(HostError::Empty);
    }
    if text.contains("://") || text.contains('/') {
        return Err(HostError::Url);
    }
    if let Some((_, port)) = text.rsplit_once(':') {
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HostError::Port);
        }
    }
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(HostError::Uppercase);
    }
    if text.len() > 1 && text.ends_with('.') && !text.ends_with("..") {
        return Err(HostError::TrailingDot);
    }
    let name = text.strip_prefix("*.").unwrap_or(text);
    if name.contains('*') {
        return Err(HostError::Wildcard);
    }
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(HostError::Characters)
    }
}

/// The valid host `text` most likely means (scheme, path, port and a
/// trailing dot removed, lower case, '-' for '_'), if that is valid and
/// differs.
pub fn suggest_host(text: &str) -> Option<String> {
    let mut host = text.trim();
    if let Some((_, rest)) = host.split_once("://") {
        host = rest;
    }
    host = host.split(['/', '?', '#']).next().unwrap_or("");
    host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if let Some((name, port)) = host.rsplit_once(':') {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            host = name;
        }
    }
    let fixed = host.trim_end_matches('.').to_ascii_lowercase().replace('_', "-");
    (fixed != text && check_host(&fixed).is_ok()).then_some(fixed)
}

/// How a host pattern matches a host: an exact host beats a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostMatch {
    /// `*.example.com` matched `a.example.com`.
    Wildcard,
    /// The same host.
    Exact,
}

/// Whether `pattern` (a host as [`check_host`] accepts it) matches `host`
/// (lowercase, without its port). `*.example.com` matches exactly one label
/// in front of `example.com`: not `example.com`, not `a.b.example.com`.
pub fn host_match(pattern: &str, host: &str) -> Option<HostMatch> {
    if pattern == host {
        return Some(HostMatch::Exact);
    }
    let suffix = pattern.strip_prefix("*.")?;
    let label = host.strip_suffix(suffix)?.strip_suffix('.')?;
    (!label.is_empty() && !label.contains('.')).then_some(HostMatch::Wildcard)
}

/// Which environment answers `host` (lowercase, without its port), given
/// each environment's hosts and whether it answers the hosts nobody claims
/// (`AppSpec::hosts` and `AppSpec::default_host`): the one with the host
/// itself, else the one with a matching wildcard, else the catch-all. A
/// valid set of environments has at most one of each (the spec refuses two
/// environments with one host, and two catch-alls); the first wins
/// otherwise.
pub fn answering<'a, H: AsRef<str> + 'a>(
    environments: impl IntoIterator<Item = (&'a EnvironmentId, &'a [H], bool)>,
    host: &str,
) -> Option<&'a EnvironmentId> {
    let mut wildcard = None;
    let mut catch_all = None;
    for (environment, hosts, default_host) in environments {
        for pattern in hosts {
            match host_match(pattern.as_ref(), host) {
                Some(HostMatch::Exact) => return Some(environment),
                Some(HostMatch::Wildcard) => {
                    wildcard.get_or_insert(environment);
                }
                None => {}
            }
        }
        if default_host {
            catch_all.get_or_insert(environment);
        }
    }
    wildcard.or(catch_all)
}

/// `[base]`: the servers every environment of the app shares. An
/// environment gets its own database on `postgres` (and its own Redis
/// database or keys on `redis`): how is the provisioner's business.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BaseSpec {
    /// An administrator's connection to the PostgreSQL server; its database
    /// is the one connected to in order to create the others
    /// ([`POSTGRES_MAINTENANCE_DATABASE`] when the URL names none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<DatabaseUrl>,
    /// The Redis server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisUrl>,
}

/// The database a `[base] postgres` URL that names none connects to.
pub const POSTGRES_MAINTENANCE_DATABASE: &str = "postgres";

/// `sslmode` values a connection without TLS honours.
const PLAIN_SSLMODES: [&str; 2] = ["disable", "prefer"];

/// Why a `[base]` URL cannot be used. Messages never contain the URL (it
/// may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    #[error(transparent)]
    Postgres(#[from] UrlError),
    /// `sslmode=require`, `sslrootcert=...`: nonstop connects without TLS.
    #[error("the URL asks for TLS (`{key}`), which nonstop's PostgreSQL connections do not speak yet")]
    Tls { key: String },
}

/// Parses `[base] postgres`: a `postgres://` URL as
/// [`DatabaseUrl::parse`] accepts it, whose path may be empty
/// (`postgres://admin@127.0.0.1:5432/`: then it names
/// [`POSTGRES_MAINTENANCE_DATABASE`]), and without TLS parameters (an
/// `sslmode` other than `disable` or `prefer`, `sslcert`, `sslrootcert`...).
/// For a text it accepts, the same URL as `nonstop_base::admin_url`.
pub fn parse_postgres_server(text: &str) -> Result<DatabaseUrl, BaseUrlError> {
    // A fragment means nothing to PostgreSQL (nor to `nonstop-base`).
    let text = text.split('#').next().unwrap_or("");
    let (before_query, query) = match text.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (text, None),
    };
    // Only when the text is a URL with a host: otherwise `parse` says
    // what is wrong with it.
    let names_none = before_query.split_once("://").is_some_and(|(_, rest)| {
        let hostpath = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let (host, path) = hostpath.split_once('/').unwrap_or((hostpath, ""));
        !host.is_empty() && path.is_empty()
    });
    let url = if names_none {
        let mut filled = before_query.to_string();
        if !filled.ends_with('/') {
            filled.push('/');
        }
        filled.push_str(POSTGRES_MAINTENANCE_DATABASE);
        if let Some(q) = query {
            filled.push('?');
            filled.push_str(q);
        }
        DatabaseUrl::parse(&filled)?
    } else {
        DatabaseUrl::parse(text)?
    };
    for kv in query.into_iter().flat_map(|q| q.split('&')) {
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        let key = decode(key).unwrap_or_else(|_| key.to_string());
        let value = decode(value).unwrap_or_else(|_| value.to_string());
        let tls = match key.as_str() {
            "sslmode" => !PLAIN_SSLMODES.contains(&value.as_str()),
            other => other.starts_with("ssl") && other != "sslnegotiation",
        };
        if tls {
            let shown = if key == "sslmode" { format!("sslmode={value}") } else { key };
            return Err(BaseUrlError::Tls { key: shown });
        }
    }
    Ok(url)
}

/// The port Redis listens on when a URL names none.
pub const DEFAULT_REDIS_PORT: u16 = 6379;

/// Why a text is not a Redis URL nonstop can use. Messages never contain
/// the URL itself (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisUrlError {
    #[error("the URL does not start with redis://{}", found.as_ref().map(|s| format!(" (its scheme is `{s}`)")).unwrap_or_default())]
    Scheme { found: Option<String> },
    /// `rediss://`: TLS, which nonstop does not speak yet.
    #[error("the URL asks for TLS (rediss://), which nonstop's Redis connections do not speak yet")]
    Tls,
    #[error("the URL names no host")]
    NoHost,
    #[error("the URL's port is not a number from 1 to 65535")]
    Port,
    /// A database number: each environment gets one of its own.
    #[error("the URL names database `{path}`; leave the number out (redis://HOST:6379): nonstop gives each environment a database of its own")]
    Database { path: String },
    #[error(
        "the URL sets `{key}` in its parameters; leave it out: nonstop gives each environment a database of its own"
    )]
    Parameter { key: String },
    #[error("the URL has a bad percent-escape (`%` must be followed by two hex digits)")]
    Escape,
    #[error("the URL contains a space or a control character; percent-encode it (a space is %20)")]
    Character,
}

/// A parsed `redis://[[user]:password@]host[:port][/0][?params]` URL: a
/// server, without a database number (each environment gets its own).
/// Whatever it accepts, `nonstop-base`'s parser accepts too. Equality is
/// on the text; `Display` and `Debug` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    text: String,
    user: Option<String>,
    password: Option<String>,
    /// Raw host text, `[::1]` with its brackets.
    host_raw: String,
    host: String,
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
        if scheme.eq_ignore_ascii_case("rediss") {
            return Err(RedisUrlError::Tls);
        }
        if !scheme.eq_ignore_ascii_case("redis") {
            return Err(RedisUrlError::Scheme { found: Some(scheme.to_string()) });
        }
        let rest = rest.split('#').next().unwrap_or("");
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q).filter(|q| !q.is_empty())),
            None => (rest, None),
        };
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            let key = decode(kv.split('=').next().unwrap_or(""))?;
            if key == "db" {
                return Err(RedisUrlError::Parameter { key });
            }
        }
        let (userinfo, hostpath) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            Some(info) => {
                let (u, p) = match info.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (info, None),
                };
                (Some(decode(u)?).filter(|u| !u.is_empty()), p.map(decode).transpose()?)
            }
            None => (None, None),
        };
        let (hostport, path) = match hostpath.split_once('/') {
            Some((h, p)) => (h, Some(p)),
            None => (hostpath, None),
        };
        let (host_raw, port) = split_authority(hostport).map_err(|e| match e {
            AuthorityError::NoHost => RedisUrlError::NoHost,
            AuthorityError::Port => RedisUrlError::Port,
        })?;
        let host = decode(host_raw.trim_start_matches('[').trim_end_matches(']'))?;
        if host.is_empty() {
            return Err(RedisUrlError::NoHost);
        }
        match path {
            None | Some("" | "0") => {}
            Some(p) => return Err(RedisUrlError::Database { path: p.to_string() }),
        }
        let query = query.map(str::to_string);
        Ok(RedisUrl { text: text.to_string(), user, password, host_raw: host_raw.to_string(), host, port, query })
    }

    /// The real URL, password included. Never print it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The URL with its password replaced by `***`: safe to print.
    pub fn redacted(&self) -> String {
        self.render(None, true)
    }

    /// `host:port` (brackets around an IPv6 address): how the server
    /// appears in messages, and what tells two servers apart when their
    /// database numbers are handed out.
    pub fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port())
        } else {
            format!("{}:{}", self.host, self.port())
        }
    }

    /// The same server and credentials, database `number`: an
    /// environment's `REDIS_URL`.
    pub fn with_database(&self, number: u8) -> RedisDatabaseUrl {
        RedisDatabaseUrl { text: self.render(Some(number), false), shown: self.render(Some(number), true), number }
    }

    /// The URL (its user info as written, or redacted), with `database`.
    fn render(&self, database: Option<u8>, redact: bool) -> String {
        let mut out = "redis://".to_string();
        if !redact {
            // The user info as written (percent-escapes included).
            let rest = self.text.split_once("://").map_or("", |(_, r)| r);
            let rest = rest.split(['#', '?']).next().unwrap_or("");
            if let Some((info, _)) = rest.rsplit_once('@') {
                out.push_str(info);
                out.push('@');
            }
        } else if self.user.is_some() || self.password.is_some() {
            out.push_str(&self.user.as_deref().map(crate::database::encode).unwrap_or_default());
            if self.password.is_some() {
                out.push(':');
                out.push_str(REDACTED);
            }
            out.push('@');
        }
        out.push_str(&self.host_raw);
        if let Some(port) = self.port {
            out.push(':');
            out.push_str(&port.to_string());
        }
        if let Some(n) = database {
            out.push('/');
            out.push_str(&n.to_string());
        }
        if let Some(q) = &self.query {
            let params: Vec<String> = q
                .split('&')
                .map(|kv| match kv.strip_prefix("password=") {
                    Some(_) if redact => format!("password={REDACTED}"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push('?');
            out.push_str(&params.join("&"));
        }
        out
    }

    /// The host name or address (without brackets for IPv6).
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_REDIS_PORT)
    }
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    /// The password, if the URL has one. Never print it.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
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

/// One database of a `[base] redis` server: the URL an environment's
/// processes get as `REDIS_URL` ([`RedisUrl::with_database`]). `Display`
/// and `Debug` hide the password; only [`RedisDatabaseUrl::expose`] gives
/// the text.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisDatabaseUrl {
    text: String,
    shown: String,
    number: u8,
}

impl RedisDatabaseUrl {
    /// The real URL, password included. Never print it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The database number.
    pub fn number(&self) -> u8 {
        self.number
    }
}

impl fmt::Display for RedisDatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for RedisDatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisDatabaseUrl({:?})", self.shown)
    }
}

impl From<UrlError> for RedisUrlError {
    /// Only the percent-decoding errors are shared.
    fn from(e: UrlError) -> Self {
        match e {
            UrlError::Character => RedisUrlError::Character,
            _ => RedisUrlError::Escape,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(name: &str) -> EnvironmentId {
        environment_name(name).unwrap()
    }

    #[test]
    fn environment_names_are_short_dns_labels() {
        for good in ["default", "production", "staging", "pr-42", "a", "qa2", &"a".repeat(32)] {
            assert!(environment_name(good).is_ok(), "{good}");
        }
        for (bad, suggestion) in [
            ("", "staging"),
            ("Staging", "staging"),
            ("pr_42", "pr-42"),
            ("42", "env-42"),
            ("-x", "x"),
            ("x-", "x"),
            ("review app", "review-app"),
            ("wéb", "w-b"),
        ] {
            let e = environment_name(bad).unwrap_err();
            assert_eq!(e.suggestion, suggestion, "{bad}");
            assert!(e.to_string().contains("at most") || e.to_string().contains("1 to 32"), "{e}");
        }
        let long = "a".repeat(33);
        assert_eq!(environment_name(&long).unwrap_err().suggestion, "a".repeat(32));
    }

    proptest! {
        #[test]
        fn every_suggested_name_is_valid(text in ".{0,50}") {
            let s = suggest_environment_name(&text);
            prop_assert!(is_environment_name(&s), "{:?} -> {:?}", text, s);
        }

        #[test]
        fn every_suggested_host_is_valid(text in "[a-zA-Z0-9.:/*-]{0,40}") {
            if let Some(fixed) = suggest_host(&text) {
                prop_assert!(check_host(&fixed).is_ok(), "{:?} -> {:?}", text, fixed);
            }
        }
    }

    #[test]
    fn default_hosts_are_under_localhost() {
        assert_eq!(default_host(&env("staging"), &AppName::new("blog").unwrap()), "staging.blog.localhost");
    }

    #[test]
    fn hosts_are_lowercase_names_with_one_optional_wildcard() {
        for good in ["example.com", "*.review.example.com", "localhost", "10.0.0.5", "a-b.c0"] {
            assert_eq!(check_host(good), Ok(()), "{good}");
        }
        for (bad, err, fix) in [
            ("", HostError::Empty, None),
            ("https://staging.example.com/", HostError::Url, Some("staging.example.com")),
            ("staging.example.com:8080", HostError::Port, Some("staging.example.com")),
            ("Staging.Example.com", HostError::Uppercase, Some("staging.example.com")),
            ("example.com.", HostError::TrailingDot, Some("example.com")),
            ("a.*.example.com", HostError::Wildcard, None),
            ("*", HostError::Wildcard, None),
            ("**.example.com", HostError::Wildcard, None),
            ("-a.example.com", HostError::Characters, None),
            ("under_score.example.com", HostError::Characters, Some("under-score.example.com")),
            ("a..example.com", HostError::Characters, None),
            ("ex ample.com", HostError::Characters, None),
            ("[::1]", HostError::Characters, None),
        ] {
            assert_eq!(check_host(bad), Err(err), "{bad}");
            assert_eq!(suggest_host(bad).as_deref(), fix, "{bad}");
        }
        assert_eq!(check_host(&format!("{}.com", "a.".repeat(130))), Err(HostError::TooLong));
    }

    #[test]
    fn wildcards_match_one_label() {
        assert_eq!(host_match("example.com", "example.com"), Some(HostMatch::Exact));
        assert_eq!(host_match("*.example.com", "a.example.com"), Some(HostMatch::Wildcard));
        assert_eq!(host_match("*.example.com", "*.example.com"), Some(HostMatch::Exact));
        for host in ["example.com", "a.b.example.com", ".example.com", "aexample.com"] {
            assert_eq!(host_match("*.example.com", host), None, "{host}");
        }
        assert!(HostMatch::Exact > HostMatch::Wildcard);
    }

    #[test]
    fn an_exact_host_beats_a_wildcard_which_beats_the_catch_all() {
        let (prod, review, pr) = (env("production"), env("review"), env("pr-1"));
        let prod_hosts = ["example.com".to_string()];
        let review_hosts = ["*.review.example.com".to_string()];
        let pr_hosts = ["pr-1.review.example.com".to_string()];
        let all = || [(&prod, &prod_hosts[..], true), (&review, &review_hosts[..], false), (&pr, &pr_hosts[..], false)];
        assert_eq!(answering(all(), "example.com"), Some(&prod));
        assert_eq!(answering(all(), "pr-2.review.example.com"), Some(&review));
        assert_eq!(answering(all(), "pr-1.review.example.com"), Some(&pr));
        assert_eq!(answering(all(), "unknown.test"), Some(&prod));
        let no_catch_all = [(&review, &review_hosts[..], false)];
        assert_eq!(answering(no_catch_all, "unknown.test"), None);
    }

    #[test]
    fn base_postgres_urls_name_a_server() {
        let u = parse_postgres_server("postgres://admin:s3cret@db.internal:5432/").unwrap();
        assert_eq!((u.host(), u.port(), u.database()), ("db.internal", 5432, "postgres"));
        assert_eq!(u.password(), Some("s3cret"));
        assert_eq!(u.to_string(), "postgres://admin:***@db.internal:5432/postgres");
        let u = parse_postgres_server("postgres://admin@127.0.0.1?sslmode=disable").unwrap();
        assert_eq!(u.expose(), "postgres://admin@127.0.0.1/postgres?sslmode=disable");
        let u = parse_postgres_server("postgresql://admin@h/template1").unwrap();
        assert_eq!(u.database(), "template1");
        assert!(parse_postgres_server("postgres://h/?sslmode=prefer").is_ok());
        for (text, err) in [
            ("mysql://u:s3cret@h/", BaseUrlError::Postgres(UrlError::Scheme { found: Some("mysql".into()) })),
            ("127.0.0.1:5432", BaseUrlError::Postgres(UrlError::Scheme { found: Some("127.0.0.1".into()) })),
            ("postgres://u:s3cret@/", BaseUrlError::Postgres(UrlError::NoHost)),
            ("postgres://u:s3cret@h/?sslmode=require", BaseUrlError::Tls { key: "sslmode=require".into() }),
            ("postgres://h/x?sslmode=verify-full", BaseUrlError::Tls { key: "sslmode=verify-full".into() }),
            ("postgres://h/?sslrootcert=/etc/ca.pem", BaseUrlError::Tls { key: "sslrootcert".into() }),
            ("postgres://h/?dbname=x", BaseUrlError::Postgres(UrlError::Parameter { key: "dbname".into() })),
        ] {
            let e = parse_postgres_server(text).unwrap_err();
            assert_eq!(e, err, "{text}");
            assert!(!e.to_string().contains("s3cret"));
        }
    }

    #[test]
    fn redis_urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!((u.host(), u.port(), u.user(), u.password()), ("127.0.0.1", 6379, None, None));
        let u = RedisUrl::parse("redis://:p%40ss@cache.internal/0?protocol=3&password=p%40ss").unwrap();
        assert_eq!((u.host(), u.port(), u.password()), ("cache.internal", 6379, Some("p@ss")));
        assert_eq!(u.to_string(), "redis://:***@cache.internal?protocol=3&password=***");
        assert_eq!(format!("{u:?}"), "RedisUrl(\"redis://:***@cache.internal?protocol=3&password=***\")");
        let u = RedisUrl::parse("redis://app:pw@[::1]:6380/").unwrap();
        assert_eq!((u.host(), u.port()), ("::1", 6380));
        assert_eq!(u.redacted(), "redis://app:***@[::1]:6380");
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"redis://app:pw@[::1]:6380/\"");
        assert_eq!(serde_json::from_str::<RedisUrl>("\"redis://app:pw@[::1]:6380/\"").unwrap(), u);
        for (text, err) in [
            ("rediss://:s3cret@h:6380", RedisUrlError::Tls),
            ("http://h", RedisUrlError::Scheme { found: Some("http".into()) }),
            ("127.0.0.1:6379", RedisUrlError::Scheme { found: Some("127.0.0.1".into()) }),
            ("redis://:s3cret@", RedisUrlError::NoHost),
            ("redis://h:0", RedisUrlError::Port),
            ("redis://h:x", RedisUrlError::Port),
            ("redis://h/3", RedisUrlError::Database { path: "3".into() }),
            ("redis://h/zero", RedisUrlError::Database { path: "zero".into() }),
            ("redis://:s3%zcret@h", RedisUrlError::Escape),
            ("redis://h ost", RedisUrlError::Character),
            ("redis://h?db=1", RedisUrlError::Parameter { key: "db".into() }),
        ] {
            let e = RedisUrl::parse(text).unwrap_err();
            assert_eq!(e, err, "{text}");
            assert!(!e.to_string().contains("s3cret"));
        }
    }

    #[test]
    fn a_servers_databases_keep_its_credentials_and_hide_them() {
        let u = RedisUrl::parse("redis://app:p%40ss@cache.internal:6380/?protocol=resp3&password=p%40ss").unwrap();
        assert_eq!(u.server(), "cache.internal:6380");
        let db = u.with_database(3);
        assert_eq!(db.expose(), "redis://app:p%40ss@cache.internal:6380/3?protocol=resp3&password=p%40ss");
        assert_eq!(db.number(), 3);
        for shown in [db.to_string(), format!("{db:?}")] {
            assert!(shown.contains("redis://app:***@cache.internal:6380/3?protocol=resp3&password=***"), "{shown}");
            assert!(!shown.contains("p%40ss") && !shown.contains("p@ss"), "{shown}");
        }
        let plain = RedisUrl::parse("redis://127.0.0.1").unwrap();
        assert_eq!(plain.with_database(0).expose(), "redis://127.0.0.1/0");
        assert_eq!(plain.server(), "127.0.0.1:6379");
        let v6 = RedisUrl::parse("redis://:pw@[::1]:6390").unwrap();
        assert_eq!(v6.server(), "[::1]:6390");
        assert_eq!(v6.with_database(12).expose(), "redis://:pw@[::1]:6390/12");
        assert_eq!(v6.with_database(12).to_string(), "redis://:***@[::1]:6390/12");
    }

    #[test]
    fn base_specs_round_trip_and_hide_passwords() {
        let base = BaseSpec {
            postgres: Some(parse_postgres_server("postgres://admin:s3cret@h/").unwrap()),
            redis: Some(RedisUrl::parse("redis://:s3cret@h").unwrap()),
        };
        let json = serde_json::to_string(&base).unwrap();
        assert_eq!(serde_json::from_str::<BaseSpec>(&json).unwrap(), base);
        assert!(!format!("{base:?}").contains("s3cret"));
        assert_eq!(serde_json::from_str::<BaseSpec>("{}").unwrap(), BaseSpec::default());
    }
}
