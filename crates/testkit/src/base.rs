//! [`FakeBaseServices`]: the base services' boundary over an in-memory
//! "server": databases by name, Redis numbers handed out like the real
//! allocation, every call recorded; a server that does not answer on
//! demand.

use nonstop_core::database::DatabaseUrl;
use nonstop_core::environment::RedisUrl;
use nonstop_core::{AppName, EnvironmentId};
use nonstop_engine::{
    BaseFuture, BaseReady, BaseRequest, BaseServiceError, BaseServices, CopiedDatabase, DroppedDatabase, FlushedRedis,
    ProvisionedDatabase, RedisShare,
};
use nonstop_secrets::SecretValue;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The host of the fake PostgreSQL server.
pub const FAKE_DB_SERVER: &str = "db.test:5432";

#[derive(Default)]
pub struct FakeBaseServices {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    requests: Vec<BaseRequest>,
    drops: Vec<(AppName, EnvironmentId)>,
    /// Databases that exist, with the password their role has.
    databases: BTreeMap<String, String>,
    /// Copies made: (from, to).
    copies: Vec<(String, String)>,
    passwords: u32,
    /// `Some`: every call fails as an unreachable server, with this text.
    unreachable: Option<String>,
    /// How many databases the Redis server has (16 unless set).
    redis_databases: Option<u8>,
    /// Keys in each Redis database, by (server, number): `(key, value)`.
    redis_keys: BTreeMap<(String, u8), BTreeMap<String, String>>,
    /// Every `flush_redis`: (server, number, app, env).
    flushes: Vec<(String, u8, AppName, EnvironmentId)>,
    /// `Some`: `flush_redis` fails as an unreachable Redis, with this text.
    redis_unreachable: Option<String>,
}

impl FakeBaseServices {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, the servers do not answer (`None`: they do again).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.state().unreachable = unreachable.then(|| {
            "cannot reach the PostgreSQL server at 127.0.0.1:1: error connecting to server: Connection refused; \
             check the host and port in [base] postgres and that the server runs and accepts TCP connections there"
                .to_string()
        });
    }

    /// The Redis server has `n` databases (0 to n-1).
    pub fn set_redis_databases(&self, n: u8) {
        self.state().redis_databases = Some(n);
    }

    /// Every `prepare` asked for, in order.
    pub fn requests(&self) -> Vec<BaseRequest> {
        self.state().requests.clone()
    }

    /// Every database that exists, by name, with its role's password.
    pub fn databases(&self) -> BTreeMap<String, String> {
        self.state().databases.clone()
    }

    /// Copies made, `(from, to)`.
    pub fn copies(&self) -> Vec<(String, String)> {
        self.state().copies.clone()
    }

    /// Every `drop_database`.
    pub fn drops(&self) -> Vec<(AppName, EnvironmentId)> {
        self.state().drops.clone()
    }

    /// From now on, `flush_redis` fails as on a Redis server that does not
    /// answer (`false`: it works again).
    pub fn set_redis_unreachable(&self, unreachable: bool) {
        self.state().redis_unreachable =
            unreachable.then(|| "cannot reach the Redis server at cache.test:6379: Connection refused".to_string());
    }

    /// Writes `key` into database `number` of the fake Redis `server`
    /// (`host:port`), as an app would.
    pub fn redis_set(&self, server: &str, number: u8, key: &str, value: &str) {
        self.state().redis_keys.entry((server.to_string(), number)).or_default().insert(key.into(), value.into());
    }

    /// The keys of database `number` of `server`.
    pub fn redis_keys(&self, server: &str, number: u8) -> Vec<String> {
        self.state()
            .redis_keys
            .get(&(server.to_string(), number))
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every `flush_redis`: (server, number, app, env).
    pub fn flushes(&self) -> Vec<(String, u8, AppName, EnvironmentId)> {
        self.state().flushes.clone()
    }
}

fn name(app: &AppName, env: &EnvironmentId) -> String {
    format!("{app}_{env}")
}

fn refused(message: &str) -> BaseServiceError {
    BaseServiceError::new(true, message.to_string())
}

impl BaseServices for FakeBaseServices {
    fn new_password(&self) -> Result<SecretValue, BaseServiceError> {
        let mut st = self.state();
        st.passwords += 1;
        SecretValue::new(format!("generated-password-{}", st.passwords)).map_err(|e| BaseServiceError::new(false, e))
    }

    fn database_name(&self, app: &AppName, env: &EnvironmentId) -> String {
        name(app, env)
    }

    fn prepare(&self, request: BaseRequest) -> BaseFuture<BaseReady> {
        let mut st = self.state();
        st.requests.push(request.clone());
        let answer = (|| {
            if let Some(message) = &st.unreachable {
                return Err(refused(message));
            }
            let target = name(&request.app, &request.env);
            let postgres = match &request.postgres {
                None => None,
                Some(pg) => {
                    let source = pg.copy_from.as_ref().map(|from| name(&request.app, from));
                    if let Some(source) = &source {
                        if !st.databases.contains_key(source) {
                            return Err(refused(&format!("environment has no database of its own ({source})")));
                        }
                        if st.databases.contains_key(&target) {
                            return Err(refused(&format!("database `{target}` already exists")));
                        }
                    }
                    let created = st.databases.insert(target.clone(), pg.password.expose().to_string()).is_none();
                    let copied = source.map(|from| {
                        st.copies.push((from.clone(), target.clone()));
                        CopiedDatabase { from_database: from, method: "pg_dump | psql".into(), seconds: 0.5 }
                    });
                    let url = DatabaseUrl::parse(&format!(
                        "postgres://{target}:{}@{FAKE_DB_SERVER}/{target}",
                        pg.password.expose()
                    ))
                    .map_err(|e| BaseServiceError::new(false, e))?;
                    Some(ProvisionedDatabase {
                        url,
                        database: target.clone(),
                        role: target.clone(),
                        created_role: created,
                        created_database: created,
                        server: FAKE_DB_SERVER.to_string(),
                        copied,
                    })
                }
            };
            let redis = request.redis.as_ref().map(|r| {
                let databases = st.redis_databases.unwrap_or(16);
                let number = r.assigned.unwrap_or_else(|| (1..databases).find(|n| !r.taken.contains(n)).unwrap_or(0));
                let text = format!("{}/{number}", r.url.expose().trim_end_matches('/'));
                RedisShare {
                    number,
                    url: SecretValue::new(text).unwrap_or_else(|e| panic!("{e}")),
                    shown: format!("{}/{number}", r.url.redacted()),
                    key_prefix: format!("{}:{}:", request.app, request.env),
                }
            });
            Ok(BaseReady { postgres, redis })
        })();
        Box::pin(async move { answer })
    }

    fn drop_database(&self, _admin: DatabaseUrl, app: AppName, env: EnvironmentId) -> BaseFuture<DroppedDatabase> {
        let mut st = self.state();
        st.drops.push((app.clone(), env.clone()));
        let answer = match &st.unreachable {
            Some(message) => Err(refused(message)),
            None => {
                let database = name(&app, &env);
                let was = st.databases.remove(&database).is_some();
                Ok(DroppedDatabase { database, database_dropped: was, role_dropped: was })
            }
        };
        Box::pin(async move { answer })
    }

    fn flush_redis(&self, url: RedisUrl, number: u8, app: AppName, env: EnvironmentId) -> BaseFuture<FlushedRedis> {
        let mut st = self.state();
        let server = url.server();
        st.flushes.push((server.clone(), number, app.clone(), env.clone()));
        let answer = match &st.redis_unreachable {
            Some(message) => Err(refused(message)),
            None => {
                let keys = st.redis_keys.entry((server.clone(), number)).or_default();
                let before = keys.len();
                // The shared database 0: only the environment's own keys.
                let prefix = format!("{app}:{env}:");
                if number == 0 {
                    keys.retain(|k, _| !k.starts_with(&prefix));
                } else {
                    keys.clear();
                }
                Ok(FlushedRedis { server, number, keys: (before - keys.len()) as u64 })
            }
        };
        Box::pin(async move { answer })
    }
}
