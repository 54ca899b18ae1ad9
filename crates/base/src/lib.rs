//! Base services of an environment: what nonstop makes for each app and
//! environment on the servers `[base]` names, before its release tasks run.
//!
//! - [`naming`] (pure): the database and role names (`APP_ENV`, or a stem
//!   and a hash), the mark on the roles nonstop makes, the confirmation of
//!   a drop;
//! - [`password`]: role passwords from the OS's random number generator,
//!   never printed;
//! - [`postgres`] (I/O, tokio-postgres): [`preflight`] (server, login,
//!   rights), [`provision_postgres`] (role + database, idempotent, rotates
//!   the password; [`provision_postgres_with`] may let the role create
//!   databases, as the migration gate needs), [`exists`], [`drop_postgres`];
//! - [`copy`] (I/O): a new environment's database as a copy of another's
//!   ([`check_copy`], [`copy_postgres`]: `pg_dump | psql`, restored by the
//!   new role);
//! - [`redis`]: [`check_redis`] (I/O: `PING`, the number of databases),
//!   [`redis_for`] (pure: a database number per environment, 0 never;
//!   past the server's count, a key prefix), [`flush_redis`] (I/O: an
//!   environment's data removed);
//!
//! PostgreSQL connections are opened by `nonstop-pg` (as the migration
//! gate's are). The URL types are `nonstop_core`'s:
//! `database::DatabaseUrl` and `environment::RedisUrl` (`[base] redis`);
//! give the app [`Provisioned::url`] with `nonstop_core::database::env_for`
//! (its own variable names, `DATABASE_URL` by default), and
//! [`RedisAssignment::env_vars`].
#![forbid(unsafe_code)]

pub mod copy;
mod error;
pub mod naming;
pub mod password;
pub mod postgres;
pub mod redis;

pub use copy::{check_copy, copy_postgres, Copied, CopyMethod, CopyStage};
pub use error::{BaseError, ObjectKind, RedisError, Right};
pub use naming::{confirm_drop, database_name, marker, role_name};
pub use password::{generate_password, Password};
pub use postgres::{
    admin_url, drop_postgres, exists, preflight, provision_postgres, provision_postgres_with, Dropped, Presence,
    Provisioned, RoleRights, ServerInfo,
};
pub use redis::{check_redis, flush_redis, key_prefix, redis_for, Flushed, RedisAssignment, RedisBase};
