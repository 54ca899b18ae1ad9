//! Environments' databases on the real PostgreSQL at 127.0.0.1:5432 (user
//! postgres, trust auth). Every test uses app names unique to this run and
//! drops every database and role it made, through guards, also when it
//! fails.
//!
//! Trust auth lets any role in without its password, so that a password
//! was set is checked against the SCRAM verifier the server stores, and
//! isolation between environments by the `CONNECT` right, which trust auth
//! does not bypass.
//!
//! A test that cannot reach the server fails, saying so.

use base64::Engine;
use nonstop_base::{
    database_name, drop_postgres, exists, generate_password, preflight, provision_postgres, role_name, BaseError,
    Dropped, ObjectKind, Password, Presence, Right,
};
use nonstop_core::database::DatabaseUrl;
use nonstop_core::{AppName, EnvironmentId};
use sha2::{Digest, Sha256};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin() -> DatabaseUrl {
    DatabaseUrl::parse(ADMIN).unwrap()
}

fn psql(sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", ADMIN, "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql -c {sql:?} failed (is PostgreSQL running on 127.0.0.1:5432 with trust auth for postgres?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique app name for this run and test; its databases and roles (and
/// any extra role) are dropped when the guard goes.
struct Guard {
    app: AppName,
    envs: Vec<EnvironmentId>,
    roles: Vec<String>,
}

impl Guard {
    fn new(prefix: &str, envs: &[&str]) -> Guard {
        let app = format!("{prefix}{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let guard = Guard {
            app: AppName::new(app).unwrap(),
            envs: envs.iter().map(|e| EnvironmentId::new(*e).unwrap()).collect(),
            roles: Vec::new(),
        };
        guard.clean();
        guard
    }

    fn env(&self, i: usize) -> &EnvironmentId {
        &self.envs[i]
    }

    /// A login role made by the test (dropped at the end).
    fn extra_role(&mut self, tag: &str, attributes: &str) -> String {
        let name = format!("{}_{tag}", self.app.as_str().replace('-', "_"));
        psql(&format!("DROP ROLE IF EXISTS \"{name}\""));
        psql(&format!("CREATE ROLE \"{name}\" LOGIN {attributes}"));
        self.roles.push(name.clone());
        name
    }

    fn clean(&self) {
        for env in &self.envs {
            let (db, role) = (database_name(&self.app, env), role_name(&self.app, env));
            psql(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"));
            psql(&format!("DROP ROLE IF EXISTS \"{role}\""));
        }
        for role in &self.roles {
            psql(&format!("DROP OWNED BY \"{role}\" CASCADE"));
            psql(&format!("DROP ROLE IF EXISTS \"{role}\""));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let clean = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.clean()));
        if clean.is_err() && !std::thread::panicking() {
            panic!("cleaning up after {} failed", self.app);
        }
    }
}

async fn connect(url: &DatabaseUrl) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url.expose(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).chain(message.iter().copied()).collect();
    let inner = Sha256::digest(&inner);
    let outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).chain(inner.iter().copied()).collect();
    Sha256::digest(&outer).into()
}

/// Does the SCRAM-SHA-256 verifier PostgreSQL stores for `role` match
/// `password` (RFC 5802: StoredKey = H(HMAC(Hi(password, salt, i), "Client Key")))?
fn password_matches(role: &str, password: &Password) -> bool {
    let stored = psql(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"));
    let rest = stored.strip_prefix("SCRAM-SHA-256$").unwrap_or_else(|| panic!("not a SCRAM verifier: {stored:?}"));
    let (params, keys) = rest.split_once('$').unwrap();
    let (iterations, salt) = params.split_once(':').unwrap();
    let (stored_key, _server_key) = keys.split_once(':').unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b64.decode(salt).unwrap();
    let mut u = hmac(password.expose().as_bytes(), &[salt.as_slice(), &1u32.to_be_bytes()].concat());
    let mut salted = u;
    for _ in 1..iterations.parse::<u32>().unwrap() {
        u = hmac(password.expose().as_bytes(), &u);
        salted.iter_mut().zip(u.iter()).for_each(|(s, x)| *s ^= x);
    }
    let client_key = hmac(&salted, b"Client Key");
    b64.encode(Sha256::digest(client_key)) == stored_key
}

#[tokio::test]
async fn two_environments_are_isolated_and_provisioning_is_idempotent() {
    let guard = Guard::new("bi", &["staging", "production"]);
    let (app, staging, production) = (&guard.app, guard.env(0), guard.env(1));
    let info = preflight(&admin()).await.unwrap();
    assert!(info.superuser && info.version_num >= 100_000, "{info:?}");

    let (pw_s, pw_p) = (generate_password().unwrap(), generate_password().unwrap());
    let s = provision_postgres(&admin(), app, staging, &pw_s).await.unwrap();
    let p = provision_postgres(&admin(), app, production, &pw_p).await.unwrap();
    assert_eq!(s.database, format!("{app}_staging"));
    assert_eq!(
        (s.role.as_str(), s.url.user(), s.url.database()),
        (s.database.as_str(), Some(s.role.as_str()), s.database.as_str())
    );
    assert_eq!((s.url.host(), s.url.port(), s.url.password()), ("127.0.0.1", 5432, Some(pw_s.expose())));
    assert!(s.created_role && s.created_database && p.created_role && p.created_database);
    assert!(!format!("{s:?}").contains(pw_s.expose()), "{s:?}");
    assert_eq!(exists(&admin(), app, staging).await.unwrap(), Presence { database: true, role: true, managed: true });

    // The role has its password and no right beyond logging in; PUBLIC
    // may not connect.
    assert!(password_matches(&s.role, &pw_s));
    assert!(!password_matches(&s.role, &pw_p));
    assert_eq!(
        psql(&format!(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls FROM pg_roles WHERE rolname = '{}'",
            s.role
        )),
        "t|f|f|f|f|f"
    );
    assert_eq!(psql(&format!("SELECT has_database_privilege('public', '{}', 'CONNECT')", s.database)), "f");
    assert_eq!(
        psql(&format!("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{}'", s.database)),
        s.role
    );

    // Each role works in its own database...
    let client = connect(&s.url).await.unwrap();
    let row = client.query_one("SELECT current_user::text, current_database()::text", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), (s.role.clone(), s.database.clone()));
    client.batch_execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')").await.unwrap();
    let prod_client = connect(&p.url).await.unwrap();
    prod_client.batch_execute("CREATE TABLE orders (id int)").await.unwrap();

    // ... and cannot connect to the other's.
    for (url, other) in [(&s.url, &p.database), (&p.url, &s.database)] {
        let e = connect(&url.with_database(other)).await.expect_err("another environment's database is closed");
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
        assert_eq!(*db.code(), tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE, "{e}");
    }

    // Again, with a new password: the same database and data, the new
    // password.
    let pw_s2 = generate_password().unwrap();
    let again = provision_postgres(&admin(), app, staging, &pw_s2).await.unwrap();
    assert!(!again.created_role && !again.created_database);
    assert_eq!(again.database, s.database);
    assert_eq!(again.url.password(), Some(pw_s2.expose()));
    assert!(password_matches(&s.role, &pw_s2) && !password_matches(&s.role, &pw_s));
    let kept = client.query_one("SELECT body FROM notes", &[]).await.unwrap();
    assert_eq!(kept.get::<_, String>(0), "kept");

    // Dropping ends the sessions, drops database and role; a second drop
    // is fine.
    let dropped = drop_postgres(&admin(), app, staging).await.unwrap();
    assert_eq!(dropped, Dropped { database: true, role: true });
    assert!(client.simple_query("SELECT 1").await.is_err(), "the session was ended");
    assert_eq!(exists(&admin(), app, staging).await.unwrap(), Presence { database: false, role: false, managed: true });
    assert_eq!(drop_postgres(&admin(), app, staging).await.unwrap(), Dropped::default());
    // The other environment is untouched.
    prod_client.batch_execute("INSERT INTO orders VALUES (1)").await.unwrap();
    assert!(exists(&admin(), app, production).await.unwrap().complete());
}

#[tokio::test]
async fn a_hashed_name_and_a_role_without_a_database_are_provisioned() {
    let guard = Guard::new("b-h", &["pr-7"]);
    let (app, env) = (&guard.app, guard.env(0));
    let name = database_name(app, env);
    assert!(name.contains("__"), "{name}");
    // A crash after the role was made, before its database: the next call
    // finishes the work.
    let first = provision_postgres(&admin(), app, env, &Password::new("first-pw")).await.unwrap();
    psql(&format!("DROP DATABASE \"{name}\""));
    assert_eq!(exists(&admin(), app, env).await.unwrap(), Presence { database: false, role: true, managed: true });
    let second = provision_postgres(&admin(), app, env, &Password::new("second-pw")).await.unwrap();
    assert!(first.created_role && !second.created_role && second.created_database);
    let client = connect(&second.url).await.unwrap();
    client.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    drop(client);
    assert_eq!(drop_postgres(&admin(), app, env).await.unwrap(), Dropped { database: true, role: true });
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = DatabaseUrl::parse(&format!("postgres://admin:Sup3rSecret@127.0.0.1:{port}/postgres")).unwrap();
    let app = AppName::new("blog").unwrap();
    let env = EnvironmentId::new("staging").unwrap();
    let errors = [
        preflight(&url).await.unwrap_err(),
        provision_postgres(&url, &app, &env, &Password::new("pw-xyz-123")).await.unwrap_err(),
        drop_postgres(&url, &app, &env).await.unwrap_err(),
        exists(&url, &app, &env).await.unwrap_err(),
    ];
    for e in errors {
        assert!(matches!(e, BaseError::Unreachable { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&format!("cannot reach the PostgreSQL server at 127.0.0.1:{port}")), "{text}");
        assert!(text.contains("check the host and port in [base] postgres"), "{text}");
        assert!(!text.contains("Sup3rSecret") && !format!("{e:?}").contains("Sup3rSecret"), "{e:?}");
        assert!(!text.contains("pw-xyz-123"));
        assert!(e.is_bad_input());
    }
}

#[tokio::test]
async fn a_missing_admin_database_or_user_is_a_clear_error() {
    let missing_db = DatabaseUrl::parse("postgres://postgres@127.0.0.1:5432/nonstop_no_such_db").unwrap();
    let e = preflight(&missing_db).await.unwrap_err();
    assert!(matches!(e, BaseError::DatabaseMissing { .. }), "{e:?}");
    assert!(e.to_string().contains("`nonstop_no_such_db`"), "{e}");
    let missing_user = DatabaseUrl::parse("postgres://nonstop_no_such_user:pw@127.0.0.1:5432/postgres").unwrap();
    let e = preflight(&missing_user).await.unwrap_err();
    assert!(matches!(e, BaseError::AuthenticationRefused { .. }), "{e:?}");
    assert!(e.to_string().contains("refused user `nonstop_no_such_user`"), "{e}");
}

#[tokio::test]
async fn an_admin_without_rights_is_refused_before_anything_changes() {
    let mut guard = Guard::new("br", &["staging"]);
    let plain = guard.extra_role("plain", "NOCREATEDB NOCREATEROLE");
    let db_only = guard.extra_role("dbonly", "CREATEDB NOCREATEROLE");
    let (app, env) = (guard.app.clone(), guard.env(0).clone());
    for (role, missing, fix) in [
        (&plain, vec![Right::CreateDb, Right::CreateRole], "CREATEDB CREATEROLE"),
        (&db_only, vec![Right::CreateRole], "CREATEROLE"),
    ] {
        let url = DatabaseUrl::parse(&format!("postgres://{role}@127.0.0.1:5432/postgres")).unwrap();
        let e = preflight(&url).await.unwrap_err();
        match &e {
            BaseError::MissingRights { user, missing: m, .. } => assert_eq!((user, m), (role, &missing)),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains(&format!("ALTER ROLE \"{role}\" {fix})")), "{e}");
        let e = provision_postgres(&url, &app, &env, &Password::new("pw")).await.unwrap_err();
        assert!(matches!(e, BaseError::MissingRights { .. }), "{e:?}");
        assert_eq!(exists(&url, &app, &env).await.unwrap(), Presence { database: false, role: false, managed: true });
    }
}

#[tokio::test]
async fn an_admin_with_createdb_and_createrole_needs_no_superuser() {
    let mut guard = Guard::new("bn", &["staging", "production"]);
    let adm = guard.extra_role("adm", "NOSUPERUSER CREATEDB CREATEROLE");
    let url = DatabaseUrl::parse(&format!("postgres://{adm}@127.0.0.1:5432/postgres")).unwrap();
    let info = preflight(&url).await.unwrap();
    assert!(!info.superuser);
    let app = guard.app.clone();
    let (s, p) = (guard.env(0).clone(), guard.env(1).clone());
    let staging = provision_postgres(&url, &app, &s, &Password::new("pw-one")).await.unwrap();
    let production = provision_postgres(&url, &app, &p, &Password::new("pw-two")).await.unwrap();
    let again = provision_postgres(&url, &app, &s, &Password::new("pw-three")).await.unwrap();
    assert!(!again.created_role && password_matches(&staging.role, &Password::new("pw-three")));
    let client = connect(&staging.url).await.unwrap();
    client.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    let e = connect(&staging.url.with_database(&production.database)).await.err().unwrap();
    assert_eq!(*e.as_db_error().unwrap().code(), tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE);
    assert_eq!(drop_postgres(&url, &app, &s).await.unwrap(), Dropped { database: true, role: true });
    assert!(client.simple_query("SELECT 1").await.is_err());
    assert_eq!(drop_postgres(&url, &app, &p).await.unwrap(), Dropped { database: true, role: true });
}

/// The SQL an error's message says to run to hand an object over.
fn handover(message: &str) -> &str {
    let sql = message.split("by running as a superuser: ").nth(1).unwrap_or_else(|| panic!("{message}"));
    sql.split(" (nonstop then").next().unwrap()
}

#[tokio::test]
async fn names_nonstop_did_not_make_are_left_alone() {
    let guard = Guard::new("bm", &["staging", "production"]);
    let (app, staging, production) = (&guard.app, guard.env(0), guard.env(1));

    // A role of the environment's name, made by hand.
    let role = role_name(app, staging);
    psql(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'by-hand'"));
    let before = psql(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"));
    let e = provision_postgres(&admin(), app, staging, &Password::new("new-pw")).await.unwrap_err();
    match &e {
        BaseError::NotManaged { kind: ObjectKind::Role, name, .. } => assert_eq!(name, &role),
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    assert!(text.contains("nothing was changed") && text.contains("COMMENT ON ROLE"), "{text}");
    assert_eq!(psql(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")), before);
    assert!(matches!(drop_postgres(&admin(), app, staging).await, Err(BaseError::NotManaged { .. })));
    assert_eq!(exists(&admin(), app, staging).await.unwrap(), Presence { database: false, role: true, managed: false });
    assert_eq!(psql(&format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'")), "1");

    // Handed over as the message says: provisioned.
    psql(handover(&text));
    let p = provision_postgres(&admin(), app, staging, &Password::new("new-pw")).await.unwrap();
    assert!(!p.created_role && p.created_database);

    // A database of the environment's name, made by hand (owned by postgres).
    let db = database_name(app, production);
    psql(&format!("CREATE DATABASE \"{db}\""));
    let e = provision_postgres(&admin(), app, production, &Password::new("pw")).await.unwrap_err();
    assert!(matches!(e, BaseError::NotManaged { kind: ObjectKind::Database, .. }), "{e:?}");
    assert_eq!(psql(&format!("SELECT count(*) FROM pg_roles WHERE rolname = '{}'", role_name(app, production))), "0");
    assert!(matches!(drop_postgres(&admin(), app, production).await, Err(BaseError::NotManaged { .. })));
    assert_eq!(psql(&format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'")), "1");
    assert_eq!(
        exists(&admin(), app, production).await.unwrap(),
        Presence { database: true, role: false, managed: false }
    );

    // Handed over as the message says (role, mark, owner): provisioned.
    psql(handover(&e.to_string()));
    let p = provision_postgres(&admin(), app, production, &Password::new("pw")).await.unwrap();
    assert!(!p.created_role && !p.created_database);
    assert!(password_matches(&p.role, &Password::new("pw")));
    connect(&p.url).await.unwrap();
}

#[tokio::test]
async fn the_keyword_list_covers_the_servers() {
    let words = psql("SELECT word FROM pg_get_keywords() WHERE word LIKE '%\\_%' AND catcode <> 'U' ORDER BY 1");
    for word in words.lines().filter(|w| !w.is_empty()) {
        assert!(nonstop_base::naming::KEYWORDS.contains(&word), "{word} is a keyword the names must avoid");
    }
}

#[tokio::test]
async fn the_gates_right_to_create_databases_is_given_and_taken_back() {
    let guard = Guard::new("bg", &["staging"]);
    let (app, staging) = (&guard.app, guard.env(0));
    let pw = generate_password().unwrap();
    let rights = nonstop_base::RoleRights { create_db: true };
    let s = nonstop_base::provision_postgres_with(&admin(), app, staging, &pw, rights).await.unwrap();
    let attributes =
        || psql(&format!("SELECT rolcreatedb, rolcreaterole, rolsuper FROM pg_roles WHERE rolname = '{}'", s.role));
    assert_eq!(attributes(), "t|f|f");
    provision_postgres(&admin(), app, staging, &pw).await.unwrap();
    assert_eq!(attributes(), "f|f|f", "a provisioning without it takes it back");
}

#[tokio::test]
async fn a_copy_holds_the_sources_data_owned_by_the_new_role_and_never_overwrites() {
    let guard = Guard::new("bc", &["staging", "review", "nowhere"]);
    let (app, staging, review, nowhere) = (&guard.app, guard.env(0), guard.env(1), guard.env(2));
    let s = provision_postgres(&admin(), app, staging, &generate_password().unwrap()).await.unwrap();
    let client = connect(&s.url).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL); INSERT INTO notes (body) VALUES ('kept'); \
             CREATE VIEW bodies AS SELECT body FROM notes",
        )
        .await
        .unwrap();

    // Nothing to copy from an environment without a database.
    let e = nonstop_base::check_copy(&admin(), app, nowhere, review).await.unwrap_err();
    assert!(matches!(e, BaseError::NoSourceDatabase { .. }), "{e}");
    assert!(e.is_bad_input() && e.to_string().contains("without --from"), "{e}");

    nonstop_base::check_copy(&admin(), app, staging, review).await.unwrap();
    let r = provision_postgres(&admin(), app, review, &generate_password().unwrap()).await.unwrap();
    let copied = nonstop_base::copy_postgres(&admin(), app, staging, &r.url).await.unwrap();
    assert_eq!(
        (copied.from_database.as_str(), copied.to_database.as_str()),
        (s.database.as_str(), r.database.as_str())
    );
    assert_eq!(copied.method.to_string(), "pg_dump | psql");

    // The data, every object owned by the new role (which can change it),
    // and the sequence goes on where the source's was.
    let copy = connect(&r.url).await.unwrap();
    let row = copy.query_one("SELECT body FROM bodies", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "kept");
    for (kind, owner) in [
        ("table", psql_in(&r.database, "SELECT tableowner FROM pg_tables WHERE tablename = 'notes'")),
        ("view", psql_in(&r.database, "SELECT viewowner FROM pg_views WHERE viewname = 'bodies'")),
    ] {
        assert_eq!(owner, r.role, "the {kind}'s owner");
    }
    copy.batch_execute("ALTER TABLE notes ADD COLUMN title text; INSERT INTO notes (body) VALUES ('new')")
        .await
        .unwrap();
    let ids: Vec<i32> =
        copy.query("SELECT id FROM notes ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1, 2]);
    // The source was only read.
    assert_eq!(client.query_one("SELECT count(*) FROM notes", &[]).await.unwrap().get::<_, i64>(0), 1);

    // A database that exists is never overwritten.
    let e = nonstop_base::check_copy(&admin(), app, staging, review).await.unwrap_err();
    assert!(matches!(e, BaseError::TargetExists { .. }), "{e}");
    assert!(e.to_string().contains("nothing was changed"), "{e}");
}

/// `sql` through psql on database `db`.
fn psql_in(db: &str, sql: &str) -> String {
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let out = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", &url, "-c", sql])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "psql -c {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
