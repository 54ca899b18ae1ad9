//! An environment's PostgreSQL database on the `[base] postgres` server:
//! checked ([`preflight`]), made or brought back in line
//! ([`provision_postgres`]), looked up ([`exists`]) and dropped
//! ([`drop_postgres`]).
//!
//! Invariants:
//! - **checks before changes**: server, login, version, rights and the
//!   names (a role or database of the environment's name that nonstop did
//!   not make) are all checked before the first statement that changes
//!   anything; such an error means nothing changed;
//! - **nonstop touches only what it made**: the role it creates carries a
//!   comment naming the app and environment ([`crate::marker`]); a role
//!   without it is never altered or dropped, and a database is the
//!   environment's only if that role owns it;
//! - **the role is made whole or not at all**: `CREATE ROLE`, its comment
//!   and the admin's membership are one transaction (`CREATE DATABASE`
//!   cannot be in one; a database left by a crash is found again by its
//!   owner);
//! - **no password in clear on the wire or in the server's logs**: the
//!   role's password is sent as a SCRAM-SHA-256 verifier computed here;
//! - **every wait has a timeout** ([`CONNECT_TIMEOUT`],
//!   [`STATEMENT_TIMEOUT`]).
//!
//! The admin user needs `CREATEDB` and `CREATEROLE` (or superuser). A
//! non-superuser admin is made a member of each role it creates (needed to
//! make it a database's owner, and to end its sessions and drop it later).

use crate::error::{BaseError, ObjectKind, Right};
use crate::naming::{database_name, marker, role_name};
use crate::password::Password;
use nonstop_core::database::{encode, DatabaseUrl, UrlError};
use nonstop_core::{AppName, EnvironmentId};
pub(crate) use nonstop_pg::server_of;
use nonstop_pg::{quote_ident, ConnectOptions};
use std::future::Future;
use std::time::Duration;
use tokio_postgres::Client;

/// How long to wait for the server to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one statement may take (`CREATE DATABASE` copies a template).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The oldest server nonstop provisions on (SCRAM verifiers: PostgreSQL 10).
pub const MIN_SERVER_VERSION: u32 = 100_000;
/// The database an admin URL without one connects to.
pub const ADMIN_DEFAULT_DATABASE: &str = "postgres";

/// What [`preflight`] found out about the server and the admin user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 150020.
    pub version_num: u32,
    /// `server_version`, e.g. `15.20 (Debian 15.20-0+deb12u1)`.
    pub version: String,
    /// The user the admin URL logs in as.
    pub user: String,
    pub superuser: bool,
}

/// An environment's database, ready for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// `postgres://ROLE:PASSWORD@HOST:PORT/DATABASE`, with the admin URL's
    /// host, port and parameters (`sslmode`, ...; not its user or
    /// password): give it to the app with
    /// [`nonstop_core::database::env_for`]. Printed redacted.
    pub url: DatabaseUrl,
    pub database: String,
    pub role: String,
    /// This call made the role (else it reset the password of the one
    /// nonstop made before).
    pub created_role: bool,
    /// This call made the database (else it was there, owned by the role).
    pub created_database: bool,
}

/// What [`exists`] found of an environment's database and role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Presence {
    pub database: bool,
    pub role: bool,
    /// Whatever of them exists is nonstop's for this app and environment
    /// (true when neither exists). False: a role or database of that name
    /// that nonstop did not make; provisioning or dropping it would refuse.
    pub managed: bool,
}

impl Presence {
    /// Both the database and its role exist, and they are nonstop's.
    pub fn complete(&self) -> bool {
        self.database && self.role && self.managed
    }
}

/// What [`drop_postgres`] dropped (false: it was not there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dropped {
    pub database: bool,
    pub role: bool,
}

/// Reads `[base] postgres` as a URL to connect with: a URL without a
/// database (`postgres://admin@db.internal/`) connects to
/// [`ADMIN_DEFAULT_DATABASE`]. Pure.
pub fn admin_url(text: &str) -> Result<DatabaseUrl, UrlError> {
    match DatabaseUrl::parse(text) {
        Err(UrlError::NoDatabase) => {
            let text = text.split('#').next().unwrap_or("");
            let (before, query) = match text.split_once('?') {
                Some((b, q)) => (b, Some(q)),
                None => (text, None),
            };
            let before = before.strip_suffix('/').unwrap_or(before);
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            DatabaseUrl::parse(&format!("{before}/{ADMIN_DEFAULT_DATABASE}{query}"))
        }
        other => other,
    }
}

/// Checks, changing nothing, that environments can be provisioned with
/// `admin`: the server answers, takes the login, is PostgreSQL 10 or newer,
/// and the user is a superuser or has `CREATEDB` and `CREATEROLE`. Each
/// failure is its own [`BaseError`] variant, naming the fix.
pub async fn preflight(admin: &DatabaseUrl) -> Result<ServerInfo, BaseError> {
    let client = connect(admin).await?;
    check_rights(&client, admin).await
}

/// Makes `app`'s database for `env`, or brings an existing one back in
/// line; idempotent. Creates (or, for one nonstop made before, alters) the
/// login role [`role_name`] with `password` and no other right (no
/// superuser, `CREATEDB` or `CREATEROLE`; [`provision_postgres_with`] may
/// allow `CREATEDB`), creates the database
/// [`database_name`] owned by it, and takes `CONNECT` and `TEMPORARY` on it
/// away from `PUBLIC`, so that no other environment's role can connect.
/// A second call resets the role's password to `password` (rotation) and
/// keeps the data.
///
/// Refuses, changing nothing, when the server cannot be used
/// ([`preflight`]'s errors) or when a role or database of those names
/// exists that nonstop did not make for this pair
/// ([`BaseError::NotManaged`]).
pub async fn provision_postgres(
    admin: &DatabaseUrl,
    app: &AppName,
    env: &EnvironmentId,
    password: &Password,
) -> Result<Provisioned, BaseError> {
    provision_postgres_with(admin, app, env, password, RoleRights::default()).await
}

/// What the login role of an environment may do beyond logging in and
/// owning its database. Nothing, by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoleRights {
    /// `CREATEDB`: what the migration gate needs to make its scratch copy
    /// of the database (as the app's own role, so that the release tasks
    /// it runs there own what they create). Taken away again (`NOCREATEDB`)
    /// by a provisioning without it.
    pub create_db: bool,
}

impl RoleRights {
    fn as_sql(self) -> &'static str {
        if self.create_db {
            "CREATEDB"
        } else {
            "NOCREATEDB"
        }
    }
}

/// [`provision_postgres`] with `rights` for the role (see [`RoleRights`]).
pub async fn provision_postgres_with(
    admin: &DatabaseUrl,
    app: &AppName,
    env: &EnvironmentId,
    password: &Password,
    rights: RoleRights,
) -> Result<Provisioned, BaseError> {
    if password.expose().is_empty() {
        return Err(BaseError::EmptyPassword { env: env.to_string() });
    }
    let server = server_of(admin);
    let mut client = connect(admin).await?;
    let info = check_rights(&client, admin).await?;
    let (database, role) = (database_name(app, env), role_name(app, env));
    let found = look(&client, &server, &database, &role).await?;
    found.check(&server, app, env, &database, &role)?;
    let url = env_url(admin, &role, password, &database)?;

    // The verifier is computed here: the password never reaches the
    // server (nor its statement log) in clear.
    let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
    let (qrole, qdb) = (quote_ident(&role), quote_ident(&database));
    let mut sql = match &found.role {
        None => format!(
            "CREATE ROLE {qrole} LOGIN NOSUPERUSER {} NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT PASSWORD {}; \
             COMMENT ON ROLE {qrole} IS {};",
            rights.as_sql(),
            quote_literal(&verifier),
            quote_literal(&marker(app, env)),
        ),
        // SUPERUSER/REPLICATION/BYPASSRLS can only be changed by a
        // superuser, and nonstop never sets them.
        Some(_) => format!(
            "ALTER ROLE {qrole} WITH LOGIN {} NOCREATEROLE PASSWORD {};",
            rights.as_sql(),
            quote_literal(&verifier)
        ),
    };
    if !info.superuser && !found.role.as_ref().is_some_and(|r| r.admin_is_member) {
        sql.push_str(&format!(" GRANT {qrole} TO CURRENT_USER;"));
    }
    let what = format!("making role {role}");
    let tx = timed(&what, &server, client.transaction()).await?;
    timed(&what, &server, tx.batch_execute(&sql)).await?;
    timed(&what, &server, tx.commit()).await?;
    let created_role = found.role.is_none();
    if created_role {
        tracing::info!("base: created role {role} on {server}");
    }

    let created_database = found.database.is_none();
    if created_database {
        timed(
            &format!("creating database {database}"),
            &server,
            client.batch_execute(&format!("CREATE DATABASE {qdb} OWNER {qrole}")),
        )
        .await?;
        tracing::info!("base: created database {database} on {server}");
    }
    timed(
        &format!("restricting access to database {database}"),
        &server,
        client.batch_execute(&format!(
            "REVOKE ALL ON DATABASE {qdb} FROM PUBLIC; GRANT ALL ON DATABASE {qdb} TO {qrole};"
        )),
    )
    .await?;
    Ok(Provisioned { url, database, role, created_role, created_database })
}

/// Drops `app`'s database for `env` and then its role: ends the sessions
/// on the database first (`WITH (FORCE)`, or `pg_terminate_backend` before
/// PostgreSQL 13). What is not there is fine ([`Dropped`] says what was).
/// Refuses, changing nothing, a role or database of those names that
/// nonstop did not make for this pair ([`BaseError::NotManaged`]).
///
/// The caller asks for confirmation first ([`crate::confirm_drop`]).
pub async fn drop_postgres(admin: &DatabaseUrl, app: &AppName, env: &EnvironmentId) -> Result<Dropped, BaseError> {
    let server = server_of(admin);
    let client = connect(admin).await?;
    let info = check_rights(&client, admin).await?;
    let (database, role) = (database_name(app, env), role_name(app, env));
    let found = look(&client, &server, &database, &role).await?;
    found.check(&server, app, env, &database, &role)?;
    let (qrole, qdb) = (quote_ident(&role), quote_ident(&database));
    if found.database.is_some() {
        let what = format!("dropping database {database}");
        if info.version_num >= 130_000 {
            timed(&what, &server, client.batch_execute(&format!("DROP DATABASE IF EXISTS {qdb} WITH (FORCE)"))).await?;
        } else {
            timed(
                &what,
                &server,
                client.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&database],
                ),
            )
            .await?;
            timed(&what, &server, client.batch_execute(&format!("DROP DATABASE IF EXISTS {qdb}"))).await?;
        }
        tracing::info!("base: dropped database {database} on {server}");
    }
    if found.role.is_some() {
        timed(&format!("dropping role {role}"), &server, client.batch_execute(&format!("DROP ROLE IF EXISTS {qrole}")))
            .await?;
        tracing::info!("base: dropped role {role} on {server}");
    }
    Ok(Dropped { database: found.database.is_some(), role: found.role.is_some() })
}

/// Whether `app`'s database and role for `env` exist (for `env list` and
/// `env destroy`). Needs only a login, no rights.
pub async fn exists(admin: &DatabaseUrl, app: &AppName, env: &EnvironmentId) -> Result<Presence, BaseError> {
    let server = server_of(admin);
    let client = connect(admin).await?;
    let (database, role) = (database_name(app, env), role_name(app, env));
    let found = look(&client, &server, &database, &role).await?;
    let managed = found.check(&server, app, env, &database, &role).is_ok();
    Ok(Presence { database: found.database.is_some(), role: found.role.is_some(), managed })
}

/// The role and database of an environment's names, as found.
struct Found {
    role: Option<FoundRole>,
    database: Option<FoundDatabase>,
}

struct FoundRole {
    comment: Option<String>,
    admin_is_member: bool,
}

struct FoundDatabase {
    owner: String,
}

impl Found {
    /// Refuses a role or database of the environment's names that nonstop
    /// did not make for this very pair.
    fn check(
        &self,
        server: &str,
        app: &AppName,
        env: &EnvironmentId,
        database: &str,
        role: &str,
    ) -> Result<(), BaseError> {
        let mark = marker(app, env);
        let (qrole, qdb) = (quote_ident(role), quote_ident(database));
        let comment = format!("COMMENT ON ROLE {qrole} IS {}", quote_literal(&mark));
        let refuse = |kind, name: &str, handover: String| BaseError::NotManaged {
            server: server.to_string(),
            kind,
            name: name.to_string(),
            app: app.to_string(),
            env: env.to_string(),
            handover,
        };
        let role_ours = match &self.role {
            Some(r) if r.comment.as_deref() != Some(mark.as_str()) => {
                return Err(refuse(ObjectKind::Role, role, format!("{comment};")))
            }
            Some(_) => true,
            None => false,
        };
        if let Some(db) = &self.database {
            if !role_ours || db.owner != role {
                let owner = format!("ALTER DATABASE {qdb} OWNER TO {qrole};");
                let handover = if role_ours { owner } else { format!("CREATE ROLE {qrole} LOGIN; {comment}; {owner}") };
                return Err(refuse(ObjectKind::Database, database, handover));
            }
        }
        Ok(())
    }
}

async fn look(client: &Client, server: &str, database: &str, role: &str) -> Result<Found, BaseError> {
    let what = format!("looking up role and database {database}");
    let role = timed(
        &what,
        server,
        client.query_opt(
            "SELECT shobj_description(oid, 'pg_authid'), pg_has_role(current_user, oid, 'MEMBER') \
             FROM pg_roles WHERE rolname = $1",
            &[&role],
        ),
    )
    .await?
    .map(|row| FoundRole { comment: row.get(0), admin_is_member: row.get(1) });
    let database = timed(
        &what,
        server,
        client.query_opt("SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1", &[&database]),
    )
    .await?
    .map(|row| FoundDatabase { owner: row.get(0) });
    Ok(Found { role, database })
}

async fn check_rights(client: &Client, admin: &DatabaseUrl) -> Result<ServerInfo, BaseError> {
    let server = server_of(admin);
    let row = timed(
        "reading the server's version and the user's rights",
        &server,
        client.query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('server_version'), current_user::text, \
                    r.rolsuper, r.rolcreatedb, r.rolcreaterole \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        ),
    )
    .await?;
    let info = ServerInfo {
        version_num: row.get::<_, i32>(0) as u32,
        version: row.get(1),
        user: row.get(2),
        superuser: row.get(3),
    };
    if info.version_num < MIN_SERVER_VERSION {
        return Err(BaseError::ServerTooOld { server, version: info.version });
    }
    let (createdb, createrole): (bool, bool) = (row.get(4), row.get(5));
    let missing: Vec<Right> = [(createdb, Right::CreateDb), (createrole, Right::CreateRole)]
        .into_iter()
        .filter(|(has, _)| !info.superuser && !has)
        .map(|(_, right)| right)
        .collect();
    if !missing.is_empty() {
        return Err(BaseError::MissingRights { server, user: info.user, missing });
    }
    Ok(info)
}

/// The environment's URL: the admin's host, port and parameters (less any
/// `user` or `password`), the role, its password and its database.
fn env_url(admin: &DatabaseUrl, role: &str, password: &Password, database: &str) -> Result<DatabaseUrl, BaseError> {
    let host = if admin.host().contains(':') {
        format!("[{}]", admin.host().replace('%', "%25"))
    } else {
        encode(admin.host())
    };
    let query = admin
        .without_password()
        .split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter(|kv| !matches!(kv.split('=').next().unwrap_or(""), "" | "user" | "password"))
                .collect::<Vec<_>>()
                .join("&")
        })
        .filter(|q| !q.is_empty())
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let text = format!(
        "postgres://{}:{}@{host}:{}/{}{query}",
        encode(role),
        encode(password.expose()),
        admin.port(),
        encode(database)
    );
    DatabaseUrl::parse(&text).map_err(|e| BaseError::BadUrl { reason: e.to_string() })
}

/// A SQL string literal (with `standard_conforming_strings`, on since 9.1;
/// `E''` would read backslashes).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// How base services connect (`nonstop-pg`, as the migration gate does).
const CONNECT: ConnectOptions = ConnectOptions { timeout: CONNECT_TIMEOUT, application_name: "nonstop-base" };

/// Opens a connection to `url`'s database; failures are worded for
/// `[base] postgres`.
async fn connect(url: &DatabaseUrl) -> Result<Client, BaseError> {
    Ok(nonstop_pg::connect(url, &CONNECT).await?)
}

async fn timed<T>(
    what: &str,
    server: &str,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, BaseError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
        Err(_) => {
            Err(BaseError::Timeout { what: what.to_string(), server: server.to_string(), after: STATEMENT_TIMEOUT })
        }
        Ok(Err(source)) => Err(BaseError::Sql { what: what.to_string(), server: server.to_string(), source }),
        Ok(Ok(v)) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_url_without_a_database_connects_to_postgres() {
        for (text, expected) in [
            ("postgres://admin@db.internal/", "postgres://admin@db.internal/postgres"),
            ("postgres://admin@db.internal", "postgres://admin@db.internal/postgres"),
            (
                "postgres://admin:p%2Fw@db:5433/?sslmode=disable",
                "postgres://admin:p%2Fw@db:5433/postgres?sslmode=disable",
            ),
            ("postgres://admin@[::1]:5433", "postgres://admin@[::1]:5433/postgres"),
            ("postgres://admin@db/template1", "postgres://admin@db/template1"),
        ] {
            assert_eq!(admin_url(text).unwrap().expose(), expected, "{text}");
        }
        assert_eq!(admin_url("postgres://u:secret@/").unwrap_err(), UrlError::NoHost);
        assert!(matches!(admin_url("mysql://u@h/"), Err(UrlError::Scheme { .. })));
    }

    #[test]
    fn the_env_url_has_the_admins_server_and_parameters_and_the_roles_credentials() {
        let admin = DatabaseUrl::parse(
            "postgres://admin:adminpw@db.internal:6543/postgres?sslmode=disable&user=admin&password=adminpw&connect_timeout=5",
        )
        .unwrap();
        let url = env_url(&admin, "blog_staging", &Password::new("p/w:x@y"), "blog_staging").unwrap();
        assert_eq!(
            url.expose(),
            "postgres://blog_staging:p%2Fw%3Ax%40y@db.internal:6543/blog_staging?sslmode=disable&connect_timeout=5"
        );
        assert_eq!(url.password(), Some("p/w:x@y"));
        assert!(!url.expose().contains("adminpw"));
        let v6 = env_url(&DatabaseUrl::parse("postgresql://[::1]/postgres").unwrap(), "r", &Password::new("pw"), "d")
            .unwrap();
        assert_eq!(v6.expose(), "postgres://r:pw@[::1]:5432/d");
    }

    #[test]
    fn sql_quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn provisioned_debug_shows_no_password() {
        let url = env_url(&DatabaseUrl::parse("postgres://h/postgres").unwrap(), "r", &Password::new("s3cretpw"), "d")
            .unwrap();
        let p = Provisioned { url, database: "d".into(), role: "r".into(), created_role: true, created_database: true };
        let shown = format!("{p:?}");
        assert!(!shown.contains("s3cretpw"), "{shown}");
        assert!(shown.contains("postgres://r:***@h:5432/d"), "{shown}");
    }
}
