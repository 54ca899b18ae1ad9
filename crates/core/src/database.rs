//! `[database]`: the app's PostgreSQL database, as the spec gives it.
//!
//! [`DatabaseUrl`] holds a `postgres://` URL that may carry a password: its
//! `Debug` and `Display` print it with the password replaced by `***`
//! ([`DatabaseUrl::redacted`]), so that a spec, an error or a log line that
//! shows it never shows the password. Only [`DatabaseUrl::expose`] gives the
//! real text (to connect, or to fill a process's environment). It is
//! serialized whole: the spec travels to the daemon and into its store, like
//! `[env]` does.
//!
//! Pure: parsing and rebuilding URLs, no I/O.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// What stands in for a password in anything printed.
pub const REDACTED: &str = "***";

/// The variable an app reads its database from when `[database] env` is
/// left out.
pub const DEFAULT_DATABASE_VAR: &str = "DATABASE_URL";

/// `[database]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseSpec {
    pub url: DatabaseUrl,
    /// Which variables the app reads, and which part of the URL each
    /// holds. Never empty: `{DATABASE_URL = url}` when the spec says
    /// nothing.
    pub env: BTreeMap<String, UrlPart>,
}

impl DatabaseSpec {
    /// The spec with the default mapping (`DATABASE_URL`).
    pub fn new(url: DatabaseUrl) -> Self {
        Self { url, env: BTreeMap::from([(DEFAULT_DATABASE_VAR.to_string(), UrlPart::Url)]) }
    }

    /// The variables every process and task gets: each variable of `env`
    /// with the part of the URL it holds, sorted by name. They hold the
    /// password: they go to processes, never to a log or a report.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        env_for(&self.url, &self.env)
    }
}

/// The variables that point an app at `url`: each variable of `mapping`
/// with the part of the URL it holds, sorted by name (the migration gate
/// points them at its scratch copy).
pub fn env_for(url: &DatabaseUrl, mapping: &BTreeMap<String, UrlPart>) -> Vec<(String, String)> {
    mapping.iter().map(|(var, part)| (var.clone(), url.part(*part))).collect()
}

/// A part of a database URL that a variable can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UrlPart {
    /// The whole URL.
    Url,
    /// The database name (Django's `NAME`).
    Name,
    /// The host name or address (without brackets for IPv6).
    Host,
    /// The port (5432 when the URL gives none).
    Port,
    /// The user name (empty when the URL gives none).
    User,
    /// The password (empty when the URL gives none).
    Password,
}

impl UrlPart {
    pub const ALL: [UrlPart; 6] =
        [UrlPart::Url, UrlPart::Name, UrlPart::Host, UrlPart::Port, UrlPart::User, UrlPart::Password];

    /// The spelling in `nonstop.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            UrlPart::Url => "url",
            UrlPart::Name => "name",
            UrlPart::Host => "host",
            UrlPart::Port => "port",
            UrlPart::User => "user",
            UrlPart::Password => "password",
        }
    }

    pub fn parse(text: &str) -> Option<UrlPart> {
        UrlPart::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

impl fmt::Display for UrlPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The port PostgreSQL listens on when a URL names none.
pub const DEFAULT_PORT: u16 = 5432;

/// Why a text is not a database URL nonstop can use. Messages never
/// contain the URL itself (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("the URL does not start with postgres:// or postgresql://{}", found.as_ref().map(|s| format!(" (its scheme is `{s}`)")).unwrap_or_default())]
    Scheme { found: Option<String> },
    #[error("the URL names no host")]
    NoHost,
    #[error("the URL names several hosts; the migration gate needs one")]
    SeveralHosts,
    #[error("the URL's port is not a number from 1 to 65535")]
    Port,
    #[error("the URL names no database (the path after the host is empty)")]
    NoDatabase,
    #[error("the URL has a bad percent-escape (`%` must be followed by two hex digits)")]
    Escape,
    #[error("the URL contains a space or a control character; percent-encode it (a space is %20)")]
    Character,
    /// `?dbname=`, `?service=`: the database would not be the one the
    /// path names, and the gate's scratch copy is named in the path.
    #[error("the URL sets `{key}` in its parameters; name the database in the path only (postgres://HOST:5432/NAME)")]
    Parameter { key: String },
}

/// Query parameters that would choose another database than the path's.
const FORBIDDEN_PARAMETERS: [&str; 4] = ["dbname", "service", "host", "hostaddr"];

/// A parsed `postgres://` URL. Equality is on the text.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    text: String,
    parts: Parts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Parts {
    /// `postgres` or `postgresql`, as written.
    scheme: String,
    /// Raw (still escaped) user info, without the `@`.
    userinfo: Option<String>,
    user: Option<String>,
    password: Option<String>,
    /// Raw host text, `[::1]` with its brackets.
    host_raw: String,
    /// Decoded host, without brackets.
    host: String,
    port: Option<u16>,
    name: String,
    /// Raw query, without the `?`.
    query: Option<String>,
}

impl DatabaseUrl {
    /// Parses a URL of the form
    /// `postgres[ql]://[user[:password]@]host[:port]/name[?params]`, with
    /// percent-escapes in user, password, host and name.
    pub fn parse(text: &str) -> Result<DatabaseUrl, UrlError> {
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::Character);
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            let found = text.split_once(':').map(|(s, _)| s.to_string()).filter(|s| !s.is_empty());
            return Err(UrlError::Scheme { found });
        };
        if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
            return Err(UrlError::Scheme { found: Some(scheme.to_string()) });
        }
        // A fragment means nothing to PostgreSQL; libpq refuses one too.
        let rest = rest.split('#').next().unwrap_or("");
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q.to_string())),
            None => (rest, None),
        };
        // The user info ends at the last '@' (a password may hold a '/').
        let (userinfo, hostpath) = match before_query.rfind('@') {
            Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
            None => (None, before_query),
        };
        let (hostport, path) = match hostpath.split_once('/') {
            Some((h, p)) => (h, p),
            None => (hostpath, ""),
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
        if hostport.contains(',') {
            return Err(UrlError::SeveralHosts);
        }
        let (host_raw, port) = split_authority(hostport).map_err(|e| match e {
            AuthorityError::NoHost => UrlError::NoHost,
            AuthorityError::Port => UrlError::Port,
        })?;
        let host = decode(host_raw.trim_start_matches('[').trim_end_matches(']'))?;
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let name = decode(path)?;
        if name.is_empty() {
            return Err(UrlError::NoDatabase);
        }
        if let Some(q) = &query {
            for kv in q.split('&') {
                let key = decode(kv.split('=').next().unwrap_or(""))?;
                if FORBIDDEN_PARAMETERS.contains(&key.as_str()) {
                    return Err(UrlError::Parameter { key });
                }
            }
        }
        let parts = Parts {
            scheme: scheme.to_string(),
            userinfo: userinfo.map(str::to_string),
            user,
            password,
            host_raw: host_raw.to_string(),
            host,
            port,
            name,
            query,
        };
        Ok(DatabaseUrl { text: text.to_string(), parts })
    }

    /// The real URL, password included: to connect, or to put in a
    /// process's environment. Never print it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The URL with its password (and any `password=` parameter) replaced
    /// by `***`: safe to print.
    pub fn redacted(&self) -> String {
        self.rebuild(&self.parts.name, true, true)
    }

    /// The URL without its password (for a client that is given the
    /// password another way, e.g. `PGPASSWORD`).
    pub fn without_password(&self) -> String {
        self.rebuild(&self.parts.name, false, false)
    }

    /// The same URL with `password` (percent-encoded) as its password, in
    /// place of any it had: for a URL stored without its password, which
    /// is given to processes only. A URL without a user gets none (a
    /// password needs a user in a URL): it is returned as it is.
    pub fn with_password(&self, password: &str) -> DatabaseUrl {
        let Some(info) = self.parts.userinfo.as_deref() else { return self.clone() };
        let user_raw = info.split_once(':').map(|(u, _)| u).unwrap_or(info);
        let stripped = self.without_password();
        let rest = stripped.split_once("://").map(|(_, r)| r).unwrap_or("");
        let after_user = rest.strip_prefix(user_raw).unwrap_or(rest);
        let text = format!("{}://{user_raw}:{}{after_user}", self.parts.scheme, encode(password));
        DatabaseUrl::parse(&text).unwrap_or_else(|_| self.clone())
    }

    /// The same server, user and parameters, another database.
    pub fn with_database(&self, name: &str) -> DatabaseUrl {
        let text = self.rebuild(name, true, false);
        DatabaseUrl::parse(&text).expect("a URL rebuilt from a valid one is valid")
    }

    pub fn database(&self) -> &str {
        &self.parts.name
    }
    pub fn host(&self) -> &str {
        &self.parts.host
    }
    pub fn port(&self) -> u16 {
        self.parts.port.unwrap_or(DEFAULT_PORT)
    }
    pub fn user(&self) -> Option<&str> {
        self.parts.user.as_deref()
    }
    /// The password, if the URL has one. Never print it.
    pub fn password(&self) -> Option<&str> {
        self.parts.password.as_deref()
    }

    /// The value of one part, as [`UrlPart`] documents.
    pub fn part(&self, part: UrlPart) -> String {
        match part {
            UrlPart::Url => self.text.clone(),
            UrlPart::Name => self.parts.name.clone(),
            UrlPart::Host => self.parts.host.clone(),
            UrlPart::Port => self.port().to_string(),
            UrlPart::User => self.parts.user.clone().unwrap_or_default(),
            UrlPart::Password => self.parts.password.clone().unwrap_or_default(),
        }
    }

    /// Replaces every occurrence of this URL's password in `text` by
    /// `***` (for output of commands that were given the URL).
    pub fn redact_in(&self, text: &str) -> String {
        let mut out = text.replace(&self.text, &self.redacted());
        if let Some(p) = self.parts.password.as_deref().filter(|p| !p.is_empty()) {
            out = out.replace(p, REDACTED);
            let raw = encode(p);
            if raw != p {
                out = out.replace(&raw, REDACTED);
            }
        }
        out
    }

    fn rebuild(&self, name: &str, with_password: bool, redact: bool) -> String {
        let p = &self.parts;
        let mut out = format!("{}://", p.scheme);
        if let Some(info) = &p.userinfo {
            let user_raw = info.split_once(':').map(|(u, _)| u).unwrap_or(info);
            out.push_str(user_raw);
            if p.password.is_some() && with_password {
                out.push(':');
                if redact {
                    out.push_str(REDACTED);
                } else {
                    out.push_str(info.split_once(':').map(|(_, p)| p).unwrap_or(""));
                }
            }
            out.push('@');
        }
        out.push_str(&p.host_raw);
        if let Some(port) = p.port {
            out.push(':');
            out.push_str(&port.to_string());
        }
        out.push('/');
        out.push_str(&encode(name));
        if let Some(q) = &p.query {
            out.push('?');
            if redact || !with_password {
                let params: Vec<String> = q
                    .split('&')
                    .filter(|kv| with_password || !kv.starts_with("password="))
                    .map(|kv| if kv.starts_with("password=") { format!("password={REDACTED}") } else { kv.to_string() })
                    .collect();
                out.push_str(&params.join("&"));
            } else {
                out.push_str(q);
            }
        }
        out
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DatabaseUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What is wrong with a URL's `host:port`.
pub(crate) enum AuthorityError {
    NoHost,
    Port,
}

/// `host:port` or `[v6]:port` of a URL: the host as written (brackets
/// kept, still percent-encoded) and the port (1 to 65535), if given.
pub(crate) fn split_authority(hostport: &str) -> Result<(&str, Option<u16>), AuthorityError> {
    let (host, port_text) = if let Some(inner) = hostport.strip_prefix('[') {
        let Some(end) = inner.find(']') else { return Err(AuthorityError::NoHost) };
        let after = &inner[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(AuthorityError::Port),
        };
        (&hostport[..end + 2], port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port_text {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(AuthorityError::Port)?),
    };
    Ok((host, port))
}

pub(crate) fn decode(text: &str) -> Result<String, UrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UrlError::Escape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| UrlError::Escape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UrlError::Escape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::Escape)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_put_back_into_a_url_stored_without_it() {
        let stored =
            DatabaseUrl::parse("postgres://blog_staging@db.internal:6543/blog_staging?sslmode=disable").unwrap();
        let url = stored.with_password("p/w:x@y");
        assert_eq!(url.expose(), "postgres://blog_staging:p%2Fw%3Ax%40y@db.internal:6543/blog_staging?sslmode=disable");
        assert_eq!(url.password(), Some("p/w:x@y"));
        assert_eq!(url.without_password(), stored.expose());
        // A password it had is replaced; a URL without a user stays as it is.
        let had = DatabaseUrl::parse("postgresql://u:old@[::1]/d").unwrap().with_password("new");
        assert_eq!(had.expose(), "postgresql://u:new@[::1]/d");
        let anonymous = DatabaseUrl::parse("postgres://db/d").unwrap();
        assert_eq!(anonymous.with_password("pw"), anonymous);
    }

    proptest::proptest! {
        #[test]
        fn with_password_round_trips(user in "[a-z][a-z0-9_]{0,10}", password in "[ -~]{1,20}", db in "[a-z]{1,8}") {
            let url = DatabaseUrl::parse(&format!("postgres://{user}@h:5432/{db}")).unwrap();
            let with = url.with_password(&password);
            proptest::prop_assert_eq!(with.password(), Some(password.as_str()));
            proptest::prop_assert_eq!(with.user(), Some(user.as_str()));
            proptest::prop_assert_eq!(with.database(), db.as_str());
            proptest::prop_assert_eq!(with.without_password(), url.expose().to_string());
        }
    }

    #[test]
    fn parts_are_read_and_decoded() {
        let u = DatabaseUrl::parse("postgres://blog:p%40ss%2Fw@db.example.com:6543/blog%20db?sslmode=disable").unwrap();
        assert_eq!(u.user(), Some("blog"));
        assert_eq!(u.password(), Some("p@ss/w"));
        assert_eq!(u.host(), "db.example.com");
        assert_eq!(u.port(), 6543);
        assert_eq!(u.database(), "blog db");
        let v6 = DatabaseUrl::parse("postgresql://[::1]/x").unwrap();
        assert_eq!((v6.host(), v6.port(), v6.user(), v6.password()), ("::1", 5432, None, None));
    }

    #[test]
    fn the_password_is_never_displayed() {
        let u = DatabaseUrl::parse("postgres://u:hunter2@h/d?password=hunter2&sslmode=disable").unwrap();
        for shown in [u.to_string(), format!("{u:?}"), u.redacted(), u.without_password()] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert_eq!(u.redacted(), "postgres://u:***@h/d?password=***&sslmode=disable");
        assert_eq!(u.without_password(), "postgres://u@h/d?sslmode=disable");
        assert_eq!(
            u.redact_in("DATABASE_URL=postgres://u:hunter2@h/d hunter2"),
            "DATABASE_URL=postgres://u:***@h/d ***"
        );
        // Serialized whole: the daemon needs it.
        assert!(serde_json::to_string(&u).unwrap().contains("hunter2"));
    }

    #[test]
    fn another_database_keeps_the_rest() {
        let u = DatabaseUrl::parse("postgres://u:p%3Aw@[::1]:5433/app?sslmode=disable").unwrap();
        let s = u.with_database("nonstop_gate_app_1");
        assert_eq!(s.expose(), "postgres://u:p%3Aw@[::1]:5433/nonstop_gate_app_1?sslmode=disable");
        assert_eq!(s.password(), Some("p:w"));
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for (text, err) in [
            ("mysql://u:secret@h/d", UrlError::Scheme { found: Some("mysql".into()) }),
            ("h/d", UrlError::Scheme { found: None }),
            ("postgres://u:secret@/d", UrlError::NoHost),
            ("postgres://u:secret@h:99999/d", UrlError::Port),
            ("postgres://u:secret@h:5432", UrlError::NoDatabase),
            ("postgres://u:secret@h:5432/", UrlError::NoDatabase),
            ("postgres://u:secret@a,b/d", UrlError::SeveralHosts),
            ("postgres://u:se%zzcret@h/d", UrlError::Escape),
            ("postgres://u:se cret@h/d", UrlError::Character),
            ("postgres://u:secret@h/d?dbname=other", UrlError::Parameter { key: "dbname".into() }),
            ("postgres://u:secret@h/d?sslmode=disable&service=x", UrlError::Parameter { key: "service".into() }),
            ("postgres://u:secret@h/d?host=/var/run/postgresql", UrlError::Parameter { key: "host".into() }),
        ] {
            let e = DatabaseUrl::parse(text).unwrap_err();
            assert_eq!(e, err, "{text}");
            assert!(!e.to_string().contains("secret"));
        }
    }

    #[test]
    fn parts_parse_from_their_spelling() {
        for p in UrlPart::ALL {
            assert_eq!(UrlPart::parse(p.as_str()), Some(p));
        }
        assert_eq!(UrlPart::parse("hostname"), None);
    }
}
