//! What the store keeps of environments' base services and of their end:
//!
//! - **Redis assignments**: which database number of a `[base] redis`
//!   server each app's environment holds (0: the shared database, with a
//!   key prefix). Decided once per environment and kept, also when the
//!   environment is destroyed without `--drop-database` (its keys stay in
//!   that database, so it is never handed to another; an environment of
//!   the same name gets it back); freed only by a destroy that emptied it.
//!   A number is held by one environment of a server at most
//!   ([`Store::assign_redis`] refuses a second).
//! - **Destroys under way** (`destroys`): written by `env destroy` before
//!   it changes anything ([`Store::begin_destroy`]), with whether it drops
//!   the environment's data, so that a destroy that failed half way (or
//!   whose daemon died) is known, and finished by the next one.
//! - [`Store::forget_environment`]: the end of a destroy, in one
//!   transaction: nothing a daemon or a new environment of the same name
//!   would bring back is left (its app record, instances, counts,
//!   maintenance and stop, its secrets and config, the destroy record, and
//!   its Redis numbers if the destroy emptied them); its history
//!   (deployments with what each rolled out, events, tasks) and its
//!   releases stay.
//!
//! The role's password of an environment's database is a secret (sealed
//! by the engine, kept in `secrets`), never here.

use super::{from_ms, ms, AppName, EnvironmentId, Result, Store, StoreError};
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use std::time::SystemTime;

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS redis_assignments (
    server TEXT NOT NULL,
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    number INTEGER NOT NULL CHECK (number BETWEEN 0 AND 255),
    PRIMARY KEY (server, app, environment)
);
CREATE UNIQUE INDEX IF NOT EXISTS redis_assignments_number
    ON redis_assignments (server, number) WHERE number > 0;
CREATE TABLE IF NOT EXISTS destroys (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    drop_data INTEGER NOT NULL CHECK (drop_data IN (0, 1)),
    who TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, environment)
);
"#;

/// An `env destroy` begun and not finished ([`Store::begin_destroy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDestroy {
    /// `--drop-database` was confirmed: the environment's database is
    /// dropped and its Redis data removed, by whichever destroy finishes.
    pub drop_data: bool,
    /// Who began it, and when.
    pub who: String,
    pub started_at: SystemTime,
}

impl Store {
    /// The Redis database number (app, env) holds on `server` (`host:port`),
    /// if it was given one: 0 is the shared database.
    pub fn redis_assignment(&self, server: &str, app: &AppName, env: &EnvironmentId) -> Result<Option<u8>> {
        let n: Option<i64> = self
            .conn()
            .query_row(
                "SELECT number FROM redis_assignments WHERE server = ?1 AND app = ?2 AND environment = ?3",
                params![server, app.as_str(), env.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.and_then(|n| u8::try_from(n).ok()))
    }

    /// The database numbers (1 and up) other environments, of every app,
    /// hold on `server`.
    pub fn redis_numbers_taken(&self, server: &str) -> Result<Vec<u8>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT number FROM redis_assignments WHERE server = ?1 AND number > 0 ORDER BY number")?;
        let rows = stmt.query_map(params![server], |r| r.get::<_, i64>(0))?;
        let mut out = Vec::new();
        for n in rows {
            if let Ok(n) = u8::try_from(n?) {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// Record that (app, env) uses database `number` of `server`. The same
    /// assignment again is fine; a number another environment of this
    /// server holds is refused ([`StoreError::RedisNumberTaken`]), and so
    /// is a second number for one environment ([`StoreError::RedisAssigned`]).
    pub fn assign_redis(&self, server: &str, app: &AppName, env: &EnvironmentId, number: u8) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mine: Option<i64> = tx
            .query_row(
                "SELECT number FROM redis_assignments WHERE server = ?1 AND app = ?2 AND environment = ?3",
                params![server, app.as_str(), env.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        match mine {
            Some(n) if n == i64::from(number) => return Ok(()),
            Some(n) => {
                return Err(StoreError::RedisAssigned {
                    server: server.to_string(),
                    env: format!("{app}/{env}"),
                    number: u8::try_from(n).unwrap_or(0),
                })
            }
            None => {}
        }
        if number > 0 {
            let holder: Option<(String, String)> = tx
                .query_row(
                    "SELECT app, environment FROM redis_assignments WHERE server = ?1 AND number = ?2",
                    params![server, i64::from(number)],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((a, e)) = holder {
                return Err(StoreError::RedisNumberTaken {
                    server: server.to_string(),
                    number,
                    holder: format!("{a}/{e}"),
                });
            }
        }
        tx.execute(
            "INSERT INTO redis_assignments (server, app, environment, number) VALUES (?1, ?2, ?3, ?4)",
            params![server, app.as_str(), env.as_str(), i64::from(number)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Record that `env destroy` of (app, env) begins (before it changes
    /// anything), and return the destroy under way: this one, or the one
    /// begun before that did not finish, which keeps its start and whose
    /// `drop_data` stays once confirmed.
    pub fn begin_destroy(
        &self,
        app: &AppName,
        env: &EnvironmentId,
        drop_data: bool,
        who: &str,
        now: SystemTime,
    ) -> Result<PendingDestroy> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO destroys (app, environment, drop_data, who, started_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (app, environment) DO UPDATE SET drop_data = MAX(drop_data, excluded.drop_data)",
            params![app.as_str(), env.as_str(), drop_data, who, ms(now)],
        )?;
        let pending = pending_on(&tx, app, env)?.ok_or_else(|| StoreError::Io {
            path: self.path().to_path_buf(),
            source: std::io::Error::other("the destroy just recorded is not there"),
        })?;
        tx.commit()?;
        Ok(pending)
    }

    /// The `env destroy` of (app, env) begun and not finished, if any.
    pub fn pending_destroy(&self, app: &AppName, env: &EnvironmentId) -> Result<Option<PendingDestroy>> {
        pending_on(&self.conn(), app, env)
    }

    /// Every app and environment whose `env destroy` did not finish (a
    /// daemon that starts gives each a controller, which the next destroy
    /// finishes).
    pub fn scopes_being_destroyed(&self) -> Result<Vec<nonstop_core::AppEnv>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT app, environment FROM destroys ORDER BY app, environment")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (app, env) = row?;
            let app =
                AppName::new(app.clone()).map_err(|_| StoreError::UnknownValue { what: "app name", value: app })?;
            let env = EnvironmentId::new(env.clone())
                .map_err(|_| StoreError::UnknownValue { what: "environment", value: env })?;
            out.push(nonstop_core::AppEnv::new(app, env));
        }
        Ok(out)
    }

    /// Forget an environment that `env destroy` ended, in one transaction:
    /// its app record, instances, counts, maintenance and stop, its
    /// secrets and config, the record of the destroy, and its Redis number
    /// on each server of `freed_redis` (those the destroy emptied; on the
    /// others it stays reserved for the environment's name). Its
    /// deployments (and what each rolled out), events, tasks, releases and
    /// generation counters (an instance id is never reused) stay.
    pub fn forget_environment(&self, app: &AppName, env: &EnvironmentId, freed_redis: &[String]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for table in ["apps", "instances", "process_counts", "app_controls", "secrets", "config", "destroys"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE app = ?1 AND environment = ?2"),
                params![app.as_str(), env.as_str()],
            )?;
        }
        for server in freed_redis {
            tx.execute(
                "DELETE FROM redis_assignments WHERE server = ?1 AND app = ?2 AND environment = ?3",
                params![server, app.as_str(), env.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The Redis numbers (app, env) holds, by server.
    pub fn redis_assignments_of(&self, app: &AppName, env: &EnvironmentId) -> Result<Vec<(String, u8)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT server, number FROM redis_assignments WHERE app = ?1 AND environment = ?2 ORDER BY server",
        )?;
        let rows =
            stmt.query_map(params![app.as_str(), env.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (server, n) = row?;
            if let Ok(n) = u8::try_from(n) {
                out.push((server, n));
            }
        }
        Ok(out)
    }
}

fn pending_on(conn: &rusqlite::Connection, app: &AppName, env: &EnvironmentId) -> Result<Option<PendingDestroy>> {
    Ok(conn
        .query_row(
            "SELECT drop_data, who, started_at_ms FROM destroys WHERE app = ?1 AND environment = ?2",
            params![app.as_str(), env.as_str()],
            |r| Ok(PendingDestroy { drop_data: r.get(0)?, who: r.get(1)?, started_at: from_ms(r.get(2)?) }),
        )
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(a: &str, e: &str) -> (AppName, EnvironmentId) {
        (AppName::new(a).unwrap(), EnvironmentId::new(e).unwrap())
    }

    #[test]
    fn a_number_belongs_to_one_environment_of_a_server() {
        let store = Store::in_memory().unwrap();
        let (blog, staging) = ids("blog", "staging");
        let (shop, prod) = ids("shop", "production");
        assert_eq!(store.redis_assignment("cache:6379", &blog, &staging).unwrap(), None);
        store.assign_redis("cache:6379", &blog, &staging, 1).unwrap();
        store.assign_redis("cache:6379", &blog, &staging, 1).unwrap();
        assert_eq!(store.redis_assignment("cache:6379", &blog, &staging).unwrap(), Some(1));
        let e = store.assign_redis("cache:6379", &shop, &prod, 1).unwrap_err();
        assert!(e.to_string().contains("blog/staging"), "{e}");
        let e = store.assign_redis("cache:6379", &blog, &staging, 2).unwrap_err();
        assert!(matches!(e, StoreError::RedisAssigned { number: 1, .. }), "{e}");
        // Another server is another set of numbers; 0 is shared.
        store.assign_redis("other:6379", &shop, &prod, 1).unwrap();
        store.assign_redis("cache:6379", &shop, &prod, 0).unwrap();
        let (x, y) = ids("x", "y");
        store.assign_redis("cache:6379", &x, &y, 0).unwrap();
        assert_eq!(store.redis_numbers_taken("cache:6379").unwrap(), vec![1]);
        assert_eq!(store.redis_numbers_taken("other:6379").unwrap(), vec![1]);
    }

    fn seal_one(store: &Store, app: &AppName, env: &EnvironmentId, name: &str) {
        let version = store.next_secret_version(app, env, name).unwrap();
        store
            .put_secret(&crate::NewSecretVersion {
                app,
                environment: env,
                name,
                version,
                nonce: &[1; 24],
                ciphertext: b"sealed",
                created_by: "ann",
                created_at: std::time::SystemTime::now(),
            })
            .unwrap();
    }

    #[test]
    fn forgetting_an_environment_removes_its_secrets_and_config_and_keeps_its_history() {
        let store = Store::in_memory().unwrap();
        let (app, env) = ids("blog", "review");
        let (_, other) = ids("blog", "staging");
        store.put_secrets_key_check_if_absent(b"check", std::time::SystemTime::now()).unwrap();
        for e in [&env, &other] {
            seal_one(&store, &app, e, "API_TOKEN");
            let set = std::collections::BTreeMap::from([(
                nonstop_core::config::ConfigName::new("GREETING").unwrap(),
                "hi".to_string(),
            )]);
            let config = nonstop_core::config::Config::default().with_set(&set, "ann", 1);
            store.put_config(&app, e, &config, std::time::SystemTime::now()).unwrap();
        }
        store.assign_redis("cache:6379", &app, &env, 3).unwrap();
        store.assign_redis("other:6379", &app, &env, 1).unwrap();
        store.add_event(&app, &env, std::time::SystemTime::now(), crate::EventKind::Deploy, None, "kept").unwrap();
        let web = nonstop_core::ProcessName::new("web").unwrap();
        let before = store.next_generation(&app, &env, &web).unwrap();
        store.begin_destroy(&app, &env, false, "ann", std::time::SystemTime::now()).unwrap();

        store.forget_environment(&app, &env, &[]).unwrap();
        assert!(store.current_secrets(&app, &env).unwrap().is_empty(), "its secrets go");
        assert!(store.secret_history(&app, &env, "API_TOKEN").unwrap().is_empty(), "with their history");
        assert!(store.config(&app, &env).unwrap().vars.is_empty(), "its config goes");
        assert_eq!(store.pending_destroy(&app, &env).unwrap(), None);
        assert_eq!(store.redis_assignment("cache:6379", &app, &env).unwrap(), Some(3), "the number stays reserved");
        assert_eq!(store.events(&app, &env, 10).unwrap().len(), 1);
        assert!(store.next_generation(&app, &env, &web).unwrap() > before, "generations are never reused");
        // Another environment's are untouched.
        assert_eq!(store.current_secrets(&app, &other).unwrap().len(), 1);
        assert_eq!(store.config(&app, &other).unwrap().vars.len(), 1);

        // A destroy that emptied its Redis database on a server frees that
        // number only.
        store.forget_environment(&app, &env, &["cache:6379".to_string()]).unwrap();
        assert_eq!(store.redis_assignment("cache:6379", &app, &env).unwrap(), None);
        assert!(store.redis_numbers_taken("cache:6379").unwrap().is_empty());
        assert_eq!(store.redis_assignment("other:6379", &app, &env).unwrap(), Some(1));
        let (shop, prod) = ids("shop", "production");
        store.assign_redis("cache:6379", &shop, &prod, 3).unwrap();
    }

    #[test]
    fn a_destroy_under_way_keeps_its_start_and_a_confirmed_drop() {
        let store = Store::in_memory().unwrap();
        let (app, env) = ids("blog", "review");
        let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + s);
        assert_eq!(store.pending_destroy(&app, &env).unwrap(), None);
        let first = store.begin_destroy(&app, &env, true, "ann", at(1)).unwrap();
        assert_eq!(first, PendingDestroy { drop_data: true, who: "ann".into(), started_at: at(1) });
        // Again without --drop-database: still dropping, still ann's.
        let again = store.begin_destroy(&app, &env, false, "bob", at(2)).unwrap();
        assert_eq!(again, first);
        assert_eq!(store.pending_destroy(&app, &env).unwrap(), Some(first));
        assert_eq!(store.scopes_being_destroyed().unwrap(), [nonstop_core::AppEnv::new(app.clone(), env.clone())]);
        let (_, other) = ids("blog", "staging");
        assert!(!store.begin_destroy(&app, &other, false, "bob", at(3)).unwrap().drop_data);
        assert_eq!(store.redis_assignments_of(&app, &env).unwrap(), vec![]);
        store.assign_redis("b:1", &app, &env, 2).unwrap();
        store.assign_redis("a:1", &app, &env, 0).unwrap();
        assert_eq!(store.redis_assignments_of(&app, &env).unwrap(), vec![("a:1".into(), 0), ("b:1".into(), 2)]);
    }

    proptest! {
        #[test]
        fn assignments_never_share_a_number(ops in proptest::collection::vec((0u8..4, 0u8..4, 0u8..5), 0..40)) {
            let store = Store::in_memory().unwrap();
            for (a, e, n) in ops {
                let (app, env) = ids(&format!("a{a}"), &format!("e{e}"));
                let _ = store.assign_redis("s:1", &app, &env, n);
            }
            let taken = store.redis_numbers_taken("s:1").unwrap();
            let mut unique = taken.clone();
            unique.dedup();
            prop_assert_eq!(taken, unique);
        }
    }
}
