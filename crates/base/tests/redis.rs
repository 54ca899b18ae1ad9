//! Environments' Redis databases on the real Redis at 127.0.0.1:6379 (no
//! password). Keys are unique to this run, expire on their own and are
//! deleted at the end; an ACL user made by a test is deleted by a guard.
//!
//! A test that cannot reach the server fails, saying so.

use nonstop_base::{check_redis, redis_for, RedisAssignment, RedisBase, RedisError, RedisUrl};
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

async fn connection(url: &RedisUrl) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url.expose()).unwrap().get_multiplexed_async_connection().await.unwrap()
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
    let mut admin = connection(&url(SERVER)).await;
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
    let mut con_a = connection(&a.url(&base.url)).await;
    let mut con_b = connection(&b.url(&base.url)).await;
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

#[tokio::test]
async fn tls_is_refused_before_connecting() {
    let e = check_redis(&url("rediss://:pw@127.0.0.1:6379")).await.unwrap_err();
    assert!(matches!(e, RedisError::TlsNotSupported), "{e:?}");
}

#[tokio::test]
async fn credentials_are_checked_and_a_closed_config_is_assumed_default() {
    let _ = base().await;
    let name = format!("nonstop_test_{}", std::process::id());
    let user = AclUser(name.clone());
    let mut admin = connection(&url(SERVER)).await;
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
