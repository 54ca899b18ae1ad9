//! The daemon's base services: `nonstop-base`'s PostgreSQL and Redis
//! provisioning behind the engine's [`BaseServices`] boundary.
//!
//! `prepare` checks every server before it changes anything: the
//! PostgreSQL server (reachable, the login accepted, PostgreSQL 10+,
//! `CREATEDB` and `CREATEROLE`), the Redis server (`PING`), and for a copy
//! that the source database is nonstop's and the target has none yet.
//! Only then is the role and database made (and filled, for a copy: a
//! copy that fails drops what was just made, so nothing is left).

use nonstop_base::{
    check_copy, check_redis, copy_postgres, database_name, drop_postgres, flush_redis, generate_password, preflight,
    provision_postgres_with, redis_for, BaseError, Flushed, Password, RedisAssignment, RedisError, RoleRights,
};
use nonstop_core::database::DatabaseUrl;
use nonstop_core::environment::RedisUrl;
use nonstop_core::{AppName, EnvironmentId};
use nonstop_engine::{
    BaseFuture, BaseReady, BaseRequest, BaseServiceError, BaseServices, CopiedDatabase, DroppedDatabase, FlushedRedis,
    ProvisionedDatabase, RedisShare,
};
use nonstop_secrets::SecretValue;

pub struct PgBaseServices;

fn pg(e: BaseError) -> BaseServiceError {
    BaseServiceError::new(e.is_bad_input(), e)
}

fn redis(e: RedisError) -> BaseServiceError {
    BaseServiceError::new(e.is_bad_input(), e)
}

fn server(url: &DatabaseUrl) -> String {
    if url.host().contains(':') {
        format!("[{}]:{}", url.host(), url.port())
    } else {
        format!("{}:{}", url.host(), url.port())
    }
}

impl BaseServices for PgBaseServices {
    fn new_password(&self) -> Result<SecretValue, BaseServiceError> {
        let password = generate_password().map_err(pg)?;
        SecretValue::new(password.expose().to_string()).map_err(|e| BaseServiceError::new(false, e))
    }

    fn database_name(&self, app: &AppName, env: &EnvironmentId) -> String {
        database_name(app, env)
    }

    fn prepare(&self, request: BaseRequest) -> BaseFuture<BaseReady> {
        Box::pin(async move {
            let BaseRequest { app, env, postgres, redis: redis_request } = request;
            // Every check first: a refusal changes nothing.
            if let Some(p) = &postgres {
                preflight(&p.admin).await.map_err(pg)?;
            }
            let redis_server = match &redis_request {
                Some(r) => Some(check_redis(&r.url).await.map_err(redis)?),
                None => None,
            };
            if let Some(from) = postgres.as_ref().and_then(|p| p.copy_from.as_ref()) {
                let admin = &postgres.as_ref().expect("checked").admin;
                check_copy(admin, &app, from, &env).await.map_err(pg)?;
            }
            let database = match postgres {
                None => None,
                Some(p) => {
                    let password = Password::new(p.password.expose());
                    let rights = RoleRights { create_db: p.create_db };
                    let made = provision_postgres_with(&p.admin, &app, &env, &password, rights).await.map_err(pg)?;
                    let copied = match &p.copy_from {
                        None => None,
                        Some(from) => match copy_postgres(&p.admin, &app, from, &made.url).await {
                            Ok(c) => Some(CopiedDatabase {
                                from_database: c.from_database,
                                method: c.method.to_string(),
                                seconds: c.seconds,
                            }),
                            Err(e) => {
                                // Leave nothing of a copy that failed.
                                if made.created_database && made.created_role {
                                    if let Err(undo) = drop_postgres(&p.admin, &app, &env).await {
                                        tracing::warn!(
                                            "base: could not drop {} after a failed copy: {undo}",
                                            made.database
                                        );
                                    }
                                }
                                return Err(pg(e));
                            }
                        },
                    };
                    Some(ProvisionedDatabase {
                        server: server(&p.admin),
                        url: made.url,
                        database: made.database,
                        role: made.role,
                        created_role: made.created_role,
                        created_database: made.created_database,
                        copied,
                    })
                }
            };
            let redis_share = match (redis_request, redis_server) {
                (Some(r), Some(base)) => {
                    let assignment = match r.assigned {
                        Some(0) => RedisAssignment::SharedWithPrefix,
                        Some(n) => RedisAssignment::Database(n),
                        None => redis_for(&base, &r.taken),
                    };
                    let url = assignment.url(&base.url);
                    Some(RedisShare {
                        number: assignment.database(),
                        url: SecretValue::new(url.expose().to_string()).map_err(|e| BaseServiceError::new(false, e))?,
                        shown: url.to_string(),
                        key_prefix: nonstop_base::key_prefix(&app, &env),
                    })
                }
                _ => None,
            };
            Ok(BaseReady { postgres: database, redis: redis_share })
        })
    }

    fn drop_database(&self, admin: DatabaseUrl, app: AppName, env: EnvironmentId) -> BaseFuture<DroppedDatabase> {
        Box::pin(async move {
            let dropped = drop_postgres(&admin, &app, &env).await.map_err(pg)?;
            Ok(DroppedDatabase {
                database: database_name(&app, &env),
                database_dropped: dropped.database,
                role_dropped: dropped.role,
            })
        })
    }

    fn flush_redis(&self, url: RedisUrl, number: u8, app: AppName, env: EnvironmentId) -> BaseFuture<FlushedRedis> {
        Box::pin(async move {
            let assignment = match number {
                0 => RedisAssignment::SharedWithPrefix,
                n => RedisAssignment::Database(n),
            };
            let keys = match flush_redis(&url, assignment, &app, &env).await.map_err(redis)? {
                Flushed::Database { keys, .. } | Flushed::Prefix { keys, .. } => keys,
            };
            Ok(FlushedRedis { server: url.server(), number, keys })
        })
    }
}
