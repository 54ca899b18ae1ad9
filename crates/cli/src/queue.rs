//! Worker queue depths (issue 14): the metrics task's reads of each
//! `queue = { redis_list = "…" }` (`LLEN`) on the Redis its process gets
//! as `REDIS_URL` (the engine says which: `EngineHandle::queue_reads`).
//!
//! - One connection per Redis URL, kept between steps (a multiplexed
//!   connection: the lists of one server are read over it), dropped on
//!   an error and made again (once within the step, so a server that
//!   restarted costs no sample), and forgotten when no process reads it.
//! - Every wait is bounded: [`CONNECT_TIMEOUT`] to connect, [`READ_TIMEOUT`]
//!   per `LLEN`; the servers are read concurrently, and beside the rest of
//!   the step (`metrics.rs`), so a server that does not answer delays
//!   nothing else and the step by at most those bounds.
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
/// How long one `LLEN` may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(1);

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
            let Ok((url, served)) = joined else { continue };
            let readers = &by_url[&url];
            let shown = redact_url(&url);
            match served {
                Served::Down(why) => {
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
/// still works, else over a new connection.
async fn read_server(url: &str, cached: Option<MultiplexedConnection>, lists: &[String]) -> Served {
    if let Some(connection) = cached {
        if let Served::Read { connection, lists } = read_lists(url, connection, lists).await {
            return Served::Read { connection, lists };
        }
        // It broke (a server restarted, a connection cut): once more, anew.
    }
    match connect(url).await {
        Ok(connection) => read_lists(url, connection, lists).await,
        Err(why) => Served::Down(why),
    }
}

async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url)
        .map_err(|e| format!("REDIS_URL is not a Redis URL nonstop can use ({})", scrub(&e.to_string(), url)))?;
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT).set_response_timeout(READ_TIMEOUT);
    match tokio::time::timeout(
        CONNECT_TIMEOUT + READ_TIMEOUT,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Err(_) => Err(format!("no connection within {}s", (CONNECT_TIMEOUT + READ_TIMEOUT).as_secs())),
        Ok(Err(e)) => Err(scrub(&e.to_string(), url)),
        Ok(Ok(c)) => Ok(c),
    }
}

/// `LLEN` of each list. A server error about one list (`WRONGTYPE`) is
/// that list's; anything else (I/O, a timeout, a refused login) is the
/// server's.
async fn read_lists(url: &str, connection: MultiplexedConnection, lists: &[String]) -> Served {
    let mut out = Vec::with_capacity(lists.len());
    for list in lists {
        let mut c = connection.clone();
        let read = tokio::time::timeout(READ_TIMEOUT, redis::cmd("LLEN").arg(list).query_async::<u64>(&mut c)).await;
        match read {
            Err(_) => return Served::Down(format!("no answer to LLEN within {}s", READ_TIMEOUT.as_secs())),
            Ok(Ok(n)) => out.push(Ok(n)),
            Ok(Err(e)) if list_error(&e) => out.push(Err(scrub(&e.to_string(), url))),
            Ok(Err(e)) => return Served::Down(scrub(&e.to_string(), url)),
        }
    }
    Served::Read { connection, lists: out }
}

/// An error about the list itself (another type of key), not the server.
fn list_error(e: &redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE") || e.kind() == redis::ErrorKind::TypeError
}

/// `url` safe to print: the user info (which may hold a password)
/// replaced by `***`, and a `password=` parameter's value too. Pure.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(a REDIS_URL that is not a URL)".to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") => {
                        format!("{k}=***")
                    }
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// `text` (an error of Redis's client) with `url` and its secrets hidden.
/// Pure.
pub fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    let mut secrets: Vec<&str> = Vec::new();
    if let Some((_, rest)) = url.split_once("://") {
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some((info, _)) = authority.rsplit_once('@') {
            secrets.push(info);
            secrets.extend(info.split_once(':').map(|(_, p)| p));
        }
        let query = rest.split_once('?').map_or("", |(_, q)| q);
        secrets.extend(
            query.split('&').filter_map(|kv| kv.split_once('=')).filter_map(|(k, v)| {
                (k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass")).then_some(v)
            }),
        );
    }
    // Longest first: a password inside the user info is hidden with it.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets.into_iter().filter(|s| s.len() >= 3) {
        out = out.replace(s, "***");
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
        assert_eq!(redact_url("redis://cache/2?password=hunter2&x=1"), "redis://cache/2?password=***&x=1");
        assert_eq!(redact_url("unix:///run/redis.sock?db=2"), "unix:///run/redis.sock?db=2");
        assert_eq!(redact_url("hunter2"), "(a REDIS_URL that is not a URL)");
        let url = "redis://app:p%40ss@cache:6379/1";
        let text = format!("failed to connect to {url}: WRONGPASS p%40ss for app:p%40ss");
        let scrubbed = scrub(&text, url);
        assert!(!scrubbed.contains("p%40ss"), "{scrubbed}");
        assert!(scrubbed.contains("redis://***@cache:6379/1"), "{scrubbed}");
    }

    proptest! {
        #[test]
        fn no_password_is_ever_shown(password in "[A-Z!$*+~]{3,24}", user in "[a-z]{0,8}", db in 0u8..16) {
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
