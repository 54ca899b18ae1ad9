//! Worker queue depths (issue 14): the metrics task's reads of each
//! `queue = { redis_list = "…" }` (`LLEN`) on the Redis its process gets
//! as `REDIS_URL` (the engine says which: `EngineHandle::queue_reads`).
//!
//! - One connection per Redis URL, kept between steps (a multiplexed
//!   connection: the lists of one server are read over it), dropped on
//!   an error and made again (once within the step, so a server that
//!   restarted costs no sample), and forgotten when no process reads it.
//! - Every wait is bounded: [`CONNECT_TIMEOUT`] to connect, [`READ_TIMEOUT`]
//!   for the `LLEN`s (sent together over the one connection), and
//!   [`SERVER_BUDGET`] for the whole of one server's read (a retry
//!   included; a cached connection that timed out is not retried within
//!   the step). The servers are read concurrently, and beside the rest of
//!   the step (`metrics.rs`), which takes its time and CPU sample before
//!   waiting for them: a server that does not answer delays no other
//!   measure, and the step by at most [`SERVER_BUDGET`].
//! - A list that cannot be read gives no sample (never a zero: the
//!   autoscaler would scale in on it). A server that does not answer is
//!   logged once per outage (and once when it answers again); a process
//!   with no `REDIS_URL` once until it has one. URLs are shown redacted
//!   ([`redact_url`]), and Redis's error texts are scrubbed of them.

use nonstop_core::autoscale::QueueSource;
use nonstop_core::{AppEnv, ProcessName};
use nonstop_engine::{QueueRead, QueueRedis};
use redis::aio::MultiplexedConnection;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::task::JoinSet;

/// How long a connection to a Redis server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the `LLEN`s of one server may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the whole read of one server may take (connecting, reading,
/// and a retry over a new connection).
pub const SERVER_BUDGET: Duration = Duration::from_secs(2);

/// A process's queue, in an environment.
pub type QueueKey = (AppEnv, ProcessName);

/// What a step read.
#[derive(Debug, Default)]
pub struct Depths {
    /// Items waiting, per process that could be read.
    pub depths: BTreeMap<QueueKey, u64>,
    /// Why a process's queue could not be read (redacted).
    pub problems: BTreeMap<QueueKey, String>,
}

/// The reader the metrics task keeps between steps.
#[derive(Default)]
pub struct QueueReader {
    /// By URL (the exposed text: it stays in this process's memory, as the
    /// connection's own copy does).
    connections: HashMap<String, MultiplexedConnection>,
    /// Servers that did not answer at their last read, with why (logged
    /// when they stopped answering).
    down: HashMap<String, String>,
    /// Problems of a process that are not a server's (no `REDIS_URL`, a
    /// list of another type), as last logged.
    noted: HashMap<QueueKey, String>,
}

/// What one server gave.
enum Served {
    /// It could not be reached (or stopped answering): no list was read.
    Down(String),
    /// It did not answer in time: no list was read (and no new connection
    /// is tried within the step).
    TimedOut(String),
    Read {
        connection: MultiplexedConnection,
        lists: Vec<Result<u64, String>>,
    },
}

impl QueueReader {
    /// Read every queue of `wanted`, concurrently per server, within the
    /// timeouts. Logs what changed (a server down, back, a process without
    /// Redis).
    pub async fn read(&mut self, wanted: Vec<(AppEnv, QueueRead)>) -> Depths {
        let mut out = Depths::default();
        // By URL: the processes that read it and their lists.
        let mut by_url: BTreeMap<String, Vec<(QueueKey, String)>> = BTreeMap::new();
        let mut noted_now: HashMap<QueueKey, String> = HashMap::new();
        for (scope, read) in wanted {
            let key = (scope, read.process);
            let QueueSource::RedisList(list) = read.source;
            match read.redis {
                QueueRedis::Url(url) => by_url.entry(url.expose().to_string()).or_default().push((key, list)),
                QueueRedis::Missing => {
                    let why = format!(
                        "its processes get no REDIS_URL (unset since the deploy?); set it (`nonstop -e {} secrets \
                         set REDIS_URL` or `config set`) or give the environment a Redis with [base] redis",
                        key.0.env
                    );
                    noted_now.insert(key, why);
                }
                QueueRedis::Unusable => {
                    let why = format!(
                        "its REDIS_URL holds a NUL byte, which no process can be given; set it again (`nonstop -e {} \
                         secrets set REDIS_URL` or `config set`)",
                        key.0.env
                    );
                    noted_now.insert(key, why);
                }
                QueueRedis::SecretsUnavailable(e) => {
                    noted_now.insert(key, format!("the environment's secrets cannot be read: {e}"));
                }
            }
        }
        // Servers no process reads any more are forgotten.
        self.connections.retain(|url, _| by_url.contains_key(url));
        self.down.retain(|url, _| by_url.contains_key(url));

        let mut reads = JoinSet::new();
        for (url, lists) in &by_url {
            let cached = self.connections.get(url).cloned();
            let (url, names) = (url.clone(), lists.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>());
            reads.spawn(async move {
                let served = read_server(&url, cached, &names).await;
                (url, served)
            });
        }
        while let Some(joined) = reads.join_next().await {
            let (url, served) = match joined {
                Ok(done) => done,
                Err(e) => {
                    tracing::warn!("metrics: a queue read failed: {e}");
                    continue;
                }
            };
            let readers = &by_url[&url];
            let shown = redact_url(&url);
            match served {
                Served::Down(why) | Served::TimedOut(why) => {
                    self.connections.remove(&url);
                    if !self.down.contains_key(&url) {
                        let who: Vec<String> =
                            readers.iter().map(|((scope, p), list)| format!("{scope} {p} ({list:?})")).collect();
                        tracing::warn!(
                            "metrics: Redis at {shown} does not answer ({why}): no queue depth for {} until it does",
                            who.join(", ")
                        );
                        self.down.insert(url.clone(), why.clone());
                    }
                    for (key, _) in readers {
                        out.problems.insert(key.clone(), format!("Redis at {shown} does not answer: {why}"));
                    }
                }
                Served::Read { connection, lists } => {
                    if self.down.remove(&url).is_some() {
                        tracing::info!("metrics: Redis at {shown} answers again; queue depths are read");
                    }
                    self.connections.insert(url.clone(), connection);
                    for ((key, list), result) in readers.iter().zip(lists) {
                        match result {
                            Ok(n) => {
                                out.depths.insert(key.clone(), n);
                            }
                            Err(e) => {
                                noted_now.insert(key.clone(), format!("cannot read the list {list:?} on {shown}: {e}"));
                            }
                        }
                    }
                }
            }
        }
        for (key, why) in &noted_now {
            if self.noted.get(key) != Some(why) {
                tracing::warn!("metrics: no queue depth for {} {}: {why}", key.0, key.1);
            }
        }
        for key in self.noted.keys() {
            if !noted_now.contains_key(key) && out.depths.contains_key(key) {
                tracing::info!("metrics: the queue depth of {} {} is read again", key.0, key.1);
            }
        }
        out.problems.extend(noted_now.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.noted = noted_now;
        out
    }
}

/// The lengths of `lists` on the server of `url`: over `cached` if it
/// still works, else over a new connection; within [`SERVER_BUDGET`].
async fn read_server(url: &str, cached: Option<MultiplexedConnection>, lists: &[String]) -> Served {
    let read = async {
        if let Some(connection) = cached {
            match read_lists(url, connection, lists).await {
                Served::Down(_) => {} // It broke (a server restarted, a connection cut): once more, anew.
                served => return served,
            }
        }
        match connect(url).await {
            Ok(connection) => read_lists(url, connection, lists).await,
            Err(why) => Served::Down(why),
        }
    };
    match tokio::time::timeout(SERVER_BUDGET, read).await {
        Ok(Served::TimedOut(why)) => Served::Down(why),
        Ok(served) => served,
        Err(_) => Served::Down(format!("no answer within {}s", SERVER_BUDGET.as_secs())),
    }
}

async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url)
        .map_err(|e| format!("REDIS_URL is not a Redis URL nonstop can use ({})", scrub(&e.to_string(), url)))?;
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT).set_response_timeout(READ_TIMEOUT);
    match tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection_with_config(&config)).await {
        Err(_) => Err(format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(scrub(&e.to_string(), url)),
        Ok(Ok(c)) => Ok(c),
    }
}

/// `LLEN` of each list, sent together (the multiplexed connection
/// pipelines them), answered within [`READ_TIMEOUT`]. A server error
/// about one list (`WRONGTYPE`) is that list's; anything else (I/O, a
/// refused login) is the server's.
async fn read_lists(url: &str, connection: MultiplexedConnection, lists: &[String]) -> Served {
    let mut reads = JoinSet::new();
    for (i, list) in lists.iter().enumerate() {
        let mut c = connection.clone();
        let list = list.clone();
        reads.spawn(async move { (i, redis::cmd("LLEN").arg(&list).query_async::<u64>(&mut c).await) });
    }
    let mut out: Vec<Result<u64, String>> = vec![Err("its read was lost (a task failed)".to_string()); lists.len()];
    let all = async {
        while let Some(joined) = reads.join_next().await {
            let Ok((i, read)) = joined else { continue }; // Its list keeps the "lost" error.
            match read {
                Ok(n) => out[i] = Ok(n),
                Err(e) if list_error(&e) => out[i] = Err(scrub(&e.to_string(), url)),
                Err(e) => return Err(scrub(&e.to_string(), url)),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(READ_TIMEOUT, all).await {
        Err(_) => Served::TimedOut(format!("no answer to LLEN within {}s", READ_TIMEOUT.as_secs())),
        Ok(Err(why)) => Served::Down(why),
        Ok(Ok(())) => Served::Read { connection, lists: out },
    }
}

/// An error about the list itself (another type of key), not the server.
fn list_error(e: &redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE") || e.kind() == redis::ErrorKind::TypeError
}

/// Where `rest` (a URL after `scheme://`) splits into user info and the
/// rest: at its **last** `@`, wherever it is. A password may hold `/`, `?`
/// or `#` unencoded (a parser would not take it, but it must not be shown
/// either); an `@` later in a path or query only hides more than needed.
fn split_user_info(rest: &str) -> (Option<&str>, &str) {
    match rest.rsplit_once('@') {
        Some((info, after)) => (Some(info), after),
        None => (None, rest),
    }
}

/// `url` safe to print: the user info (which may hold a password)
/// replaced by `***`, and a `password=` parameter's value too (with any
/// parameter after it). A URL that does not parse is not shown, nor one
/// whose printed form would still hold what may be its password read
/// another way (an unencoded `?` or `@` in a password moves where a
/// parser thinks the host is). Pure.
pub fn redact_url(url: &str) -> String {
    let hidden = || match url.split_once("://") {
        Some((scheme, _)) if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+') => {
            format!("{scheme}://(a URL that does not parse as one, not shown)")
        }
        _ => "(a REDIS_URL that is not a URL)".to_string(),
    };
    let Ok(parsed) = url::Url::parse(url) else { return hidden() };
    let shown = shown_parts(&parsed);
    if secret_candidates(url).iter().any(|s| shown.contains(s.as_str())) {
        return hidden();
    }
    shown
}

/// Scheme, `***@` for any user info, host, port, path, and the query up
/// to a password parameter.
fn shown_parts(parsed: &url::Url) -> String {
    let mut out = format!("{}://", parsed.scheme());
    if !parsed.username().is_empty() || parsed.password().is_some() {
        out.push_str("***@");
    }
    if let Some(host) = parsed.host_str() {
        out.push_str(host);
    }
    if let Some(port) = parsed.port() {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(parsed.path());
    if let Some(query) = parsed.query() {
        let mut params: Vec<String> = Vec::new();
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some((k, _)) if is_password_param(k) => {
                    params.push(format!("{k}=***"));
                    break;
                }
                _ => params.push(kv.to_string()),
            }
        }
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

fn is_password_param(key: &str) -> bool {
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("pass")
}

/// The values of the password parameters of `query`: each as far as the
/// next `&`, and as far as the end (a password with an unencoded `&`).
fn password_params(query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    for kv in query.split('&') {
        if let Some((k, v)) = kv.split_once('=') {
            if is_password_param(k) {
                out.push(v.to_string());
                out.push(query[from + k.len() + 1..].to_string());
            }
        }
        from += kv.len() + 1;
    }
    out
}

/// What in `url` may be a secret, read every way it can be: the user info
/// (up to the last `@`, wherever it is), its password, `password=`
/// parameters (to the next `&` and to the end), each also percent-decoded
/// (the form a client prints); only those of 3 characters or more (shorter
/// ones would hide half of every message).
fn secret_candidates(url: &str) -> Vec<String> {
    let mut secrets: Vec<String> = Vec::new();
    if let Some((_, rest)) = url.split_once("://") {
        let (info, after) = split_user_info(rest);
        if let Some(info) = info {
            secrets.push(info.to_string());
            secrets.extend(info.split_once(':').map(|(_, p)| p.to_string()));
        }
        // The query as read both ways: after the user info, and (an `@`
        // in the query itself) after the first `?`.
        secrets.extend(password_params(after.split_once('?').map_or("", |(_, q)| q)));
        secrets.extend(password_params(rest.split_once('?').map_or("", |(_, q)| q)));
    }
    if let Ok(parsed) = url::Url::parse(url) {
        secrets.extend(parsed.password().map(str::to_string));
        secrets.extend(parsed.query_pairs().filter(|(k, _)| is_password_param(k)).map(|(_, v)| v.into_owned()));
    }
    let decoded: Vec<String> = secrets
        .iter()
        .filter_map(|s| percent_encoding::percent_decode_str(s).decode_utf8().ok())
        .map(|d| d.into_owned())
        .collect();
    secrets.extend(decoded);
    secrets.retain(|s| s.len() >= 3);
    // Longest first: a password inside the user info is hidden with it.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// `text` (an error of Redis's client) with `url` and its secrets hidden.
/// Pure.
pub fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    for s in secret_candidates(url) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls_are_shown_without_their_secrets() {
        assert_eq!(redact_url("redis://127.0.0.1:6379/3"), "redis://127.0.0.1:6379/3");
        assert_eq!(redact_url("redis://:hunter2@cache:6380/1"), "redis://***@cache:6380/1");
        assert_eq!(redact_url("redis://app:hunter2@cache"), "redis://***@cache");
        assert_eq!(redact_url("redis://cache/2?x=1&password=hunter2&y=2"), "redis://cache/2?x=1&password=***");
        assert_eq!(redact_url("unix:///run/redis.sock?db=2"), "unix:///run/redis.sock?db=2");
        assert_eq!(redact_url("hunter2"), "(a REDIS_URL that is not a URL)");
        // A password with `/`, `?` or `#` unencoded: hidden all the same.
        assert_eq!(redact_url("redis://:pa/ss@cache:6379/0"), "redis://(a URL that does not parse as one, not shown)");
        assert_eq!(redact_url("redis://u:a?b#c@cache"), "redis://(a URL that does not parse as one, not shown)");
        assert_eq!(redact_url("redis://:p@ss@cache"), "redis://***@cache");
        let url = "redis://:p%2Fss@cache/0";
        assert!(!scrub("bad password p/ss", url).contains("p/ss"), "decoded too");
        let url = "redis://app:p%40ss@cache:6379/1";
        let text = format!("failed to connect to {url}: WRONGPASS p%40ss for app:p%40ss");
        let scrubbed = scrub(&text, url);
        assert!(!scrubbed.contains("p%40ss"), "{scrubbed}");
        assert!(scrubbed.contains("redis://***@cache:6379/1"), "{scrubbed}");
    }

    proptest! {
        #[test]
        fn no_password_is_ever_shown(password in "[\\x21-\\x7e]{3,24}", user in "[a-z]{0,8}", db in 0u8..16) {
            for url in [
                format!("redis://{user}:{password}@h.example:6379/{db}"),
                format!("redis://h.example:6379/{db}?password={password}"),
            ] {
                prop_assert!(!redact_url(&url).contains(&password), "{}", redact_url(&url));
                let text = format!("error with {url} and {password}");
                prop_assert!(!scrub(&text, &url).contains(&password), "{}", scrub(&text, &url));
            }
        }
    }
}
