//! Environments' Redis databases on the real Redis at 127.0.0.1:6379 (no
//! password). Keys are unique to this run, expire on their own and are
//! deleted at the end; an ACL user made by a test is deleted by a guard.
//! What empties databases (`flush_redis`) runs on a private `redis-server`
//! of its own (a free port, nothing saved, stopped by a guard): emptying a
//! database of the shared server would take other tests' keys with it.
//!
//! A test that cannot reach the server fails, saying so.

use nonstop_base::{check_redis, flush_redis, redis_for, Flushed, RedisAssignment, RedisBase, RedisError};
use nonstop_core::environment::RedisUrl;
use nonstop_core::{AppName, EnvironmentId};
use redis::AsyncCommands;

const SERVER: &str = "redis://127.0.0.1:6379";

fn url(text: &str) -> RedisUrl {
    RedisUrl::parse(text).unwrap()
}

async fn base() -> RedisBase {
    check_redis(&url(SERVER))
        .await
        .unwrap_or_else(|e| panic!("is Redis running on 127.0.0.1:6379 without a password? {e}"))
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Deletes an ACL user when dropped.
struct AclUser(String);

impl Drop for AclUser {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(SERVER) {
            if let Ok(mut con) = client.get_connection() {
                let _: Result<i64, _> = redis::cmd("ACL").arg("DELUSER").arg(&self.0).query(&mut con);
            }
        }
    }
}

#[tokio::test]
async fn environments_get_databases_of_their_own() {
    let base = base().await;
    let mut admin = connection(SERVER).await;
    let configured: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("databases").query_async(&mut admin).await.unwrap();
    assert_eq!(base.databases.to_string(), configured[1]);
    assert!(!base.databases_assumed);
    assert!(base.databases >= 3, "the test server needs 3 databases");

    let app = AppName::new(format!("r{}", std::process::id())).unwrap();
    let (staging, production) = (EnvironmentId::new("staging").unwrap(), EnvironmentId::new("production").unwrap());
    let a = redis_for(&base, &[]);
    let b = redis_for(&base, &[a.database()]);
    assert_eq!((a, b), (RedisAssignment::Database(1), RedisAssignment::Database(2)));

    let vars_a = a.env_vars(&base.url, &app, &staging);
    let vars_b = b.env_vars(&base.url, &app, &production);
    assert_eq!(vars_a[1], ("REDIS_URL".to_string(), "redis://127.0.0.1:6379/1".to_string()));
    assert_eq!(vars_b[1].1, b.url(&base.url).expose());

    let key = format!("{}seen", vars_a[0].1);
    let mut con_a = connection(a.url(&base.url).expose()).await;
    let mut con_b = connection(b.url(&base.url).expose()).await;
    let _: () = con_a.set_ex(&key, "yes", 600).await.unwrap();
    let in_a: Option<String> = con_a.get(&key).await.unwrap();
    let in_b: Option<String> = con_b.get(&key).await.unwrap();
    let in_0: Option<String> = admin.get(&key).await.unwrap();
    let _: i64 = con_a.del(&key).await.unwrap();
    assert_eq!((in_a.as_deref(), in_b, in_0), (Some("yes"), None, None));
    assert_eq!(vars_b[0].1, format!("{app}:production:"));
}

#[tokio::test]
async fn a_closed_port_is_a_clear_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let e = check_redis(&url(&format!("redis://:Sup3rSecret@127.0.0.1:{port}"))).await.unwrap_err();
    assert!(matches!(e, RedisError::Unreachable { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&format!("cannot reach the Redis server at 127.0.0.1:{port}")), "{text}");
    assert!(text.contains("check the host and port in [base] redis"), "{text}");
    assert!(!text.contains("Sup3rSecret") && !format!("{e:?}").contains("Sup3rSecret"), "{e:?}");
    assert!(e.is_bad_input());
}

/// A `redis-server` of this test's own on a free port of 127.0.0.1,
/// stopped (by its pid) when dropped.
struct PrivateRedis {
    child: std::process::Child,
    url: String,
}

impl PrivateRedis {
    /// Started with `args` added (`--requirepass ...`); ready once it
    /// answers `PING` (with `password`).
    fn start(args: &[&str], password: Option<&str>) -> PrivateRedis {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (is Redis installed?)");
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        let server = PrivateRedis { child, url: format!("redis://{auth}127.0.0.1:{port}") };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ping = redis::Client::open(server.url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
            if ping.is_ok() {
                return server;
            }
            assert!(std::time::Instant::now() < deadline, "the private redis-server on port {port} never answered");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn con(&self, db: u8) -> redis::Connection {
        redis::Client::open(format!("{}/{db}", self.url)).unwrap().get_connection().unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keys_of(con: &mut redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(con).unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn an_environments_own_database_is_emptied_and_no_other() {
    let server = PrivateRedis::start(&[], None);
    let (app, review) = (AppName::new("blog").unwrap(), EnvironmentId::new("review").unwrap());
    for db in [0u8, 3, 4] {
        let _: () = redis::cmd("MSET").arg(&["a", "1", "b", "2"]).query(&mut server.con(db)).unwrap();
    }
    let flushed = flush_redis(&url(&server.url), RedisAssignment::Database(3), &app, &review).await.unwrap();
    assert_eq!(flushed, Flushed::Database { number: 3, keys: 2 });
    assert!(keys_of(&mut server.con(3)).is_empty(), "database 3 emptied");
    for db in [0u8, 4] {
        assert_eq!(keys_of(&mut server.con(db)), ["a", "b"], "database {db} untouched");
    }
    // Again: nothing more to remove.
    let again = flush_redis(&url(&server.url), RedisAssignment::Database(3), &app, &review).await.unwrap();
    assert_eq!(again, Flushed::Database { number: 3, keys: 0 });
}

#[tokio::test]
async fn in_the_shared_database_only_the_environments_keys_go() {
    let server = PrivateRedis::start(&[], None);
    let (app, review) = (AppName::new("blog").unwrap(), EnvironmentId::new("review").unwrap());
    let mut con = server.con(0);
    let mut mset = redis::cmd("MSET");
    // More than one SCAN's worth of the environment's keys.
    for i in 0..2500 {
        mset.arg(format!("blog:review:k{i}")).arg(i);
    }
    mset.arg(&["blog:reviewer:x", "1", "shop:review:y", "1", "other", "1", "blog:review", "1"]);
    let _: () = mset.query(&mut con).unwrap();
    let _: () = redis::cmd("SET").arg("blog:review:in-3").arg(1).query(&mut server.con(3)).unwrap();

    let flushed = flush_redis(&url(&server.url), RedisAssignment::SharedWithPrefix, &app, &review).await.unwrap();
    assert_eq!(flushed, Flushed::Prefix { prefix: "blog:review:".into(), keys: 2500 });
    assert_eq!(keys_of(&mut con), ["blog:review", "blog:reviewer:x", "other", "shop:review:y"]);
    assert_eq!(keys_of(&mut server.con(3)), ["blog:review:in-3"], "other databases are not looked at");
}

#[tokio::test]
async fn a_flush_with_the_wrong_password_changes_nothing_and_hides_it() {
    let server = PrivateRedis::start(&["--requirepass", "Right-pw-1"], Some("Right-pw-1"));
    let _: () = redis::cmd("SET").arg("a").arg(1).query(&mut server.con(2)).unwrap();
    let wrong = server.url.replace("Right-pw-1", "Wrong-pw-2");
    let (app, env) = (AppName::new("blog").unwrap(), EnvironmentId::new("review").unwrap());
    let e = flush_redis(&url(&wrong), RedisAssignment::Database(2), &app, &env).await.unwrap_err();
    assert!(matches!(e, RedisError::AuthenticationRefused { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains("Wrong-pw-2"), "{e:?}");
    assert!(e.is_bad_input());
    assert_eq!(keys_of(&mut server.con(2)), ["a"]);
    let ok = flush_redis(&url(&server.url), RedisAssignment::Database(2), &app, &env).await.unwrap();
    assert_eq!(ok, Flushed::Database { number: 2, keys: 1 });
}

#[tokio::test]
async fn credentials_are_checked_and_a_closed_config_is_assumed_default() {
    let _ = base().await;
    let name = format!("nonstop_test_{}", std::process::id());
    let user = AclUser(name.clone());
    let mut admin = connection(SERVER).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user.0)
        .arg(&["reset", "on", ">Right-pw-1", "~*", "&*", "+@all", "-config"])
        .query_async(&mut admin)
        .await
        .unwrap();

    let found = check_redis(&url(&format!("redis://{name}:Right-pw-1@127.0.0.1:6379"))).await.unwrap();
    assert!(found.databases_assumed, "{found:?}");
    assert_eq!(found.databases, nonstop_base::redis::ASSUMED_DATABASES);
    assert!(!format!("{found:?}").contains("Right-pw-1"), "{found:?}");

    for wrong in [format!("redis://{name}:Wrong-pw-2@127.0.0.1:6379"), "redis://:Wrong-pw-2@127.0.0.1:6379".into()] {
        let e = check_redis(&url(&wrong)).await.unwrap_err();
        assert!(matches!(e, RedisError::AuthenticationRefused { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("refused the credentials of [base] redis"), "{text}");
        assert!(!text.contains("Wrong-pw-2") && !format!("{e:?}").contains("Wrong-pw-2"), "{e:?}");
    }
    drop(user);
}
