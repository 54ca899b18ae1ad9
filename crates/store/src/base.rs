//! What the store keeps of environments' base services and of their end:
//!
//! - **Redis assignments**: which database number of a `[base] redis`
//!   server each app's environment holds (0: the shared database, with a
//!   key prefix). Decided once per environment and kept, also when the
//!   environment is destroyed (its keys stay in that database, so it is
//!   never handed to another). A number is held by one environment of a
//!   server at most ([`Store::assign_redis`] refuses a second).
//! - [`Store::forget_environment`]: an environment destroyed by `env
//!   destroy` leaves nothing a daemon would bring back (its app record,
//!   instances, counts, maintenance and stop), and keeps its history
//!   (deployments, events, tasks), its releases, its secrets and its
//!   Redis number.
//!
//! The role's password of an environment's database is a secret (sealed
//! by the engine, kept in `secrets`), never here.

use super::{AppName, EnvironmentId, Result, Store, StoreError};
use rusqlite::{params, OptionalExtension, TransactionBehavior};

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
"#;

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

    /// Forget an environment that `env destroy` ended: its app record,
    /// instances, counts, maintenance and stop go, in one transaction; its
    /// deployments, events, tasks, releases, secrets, Redis number and
    /// generation counters (an instance id is never reused) stay.
    pub fn forget_environment(&self, app: &AppName, env: &EnvironmentId) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["apps", "instances", "process_counts", "app_controls"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE app = ?1 AND environment = ?2"),
                params![app.as_str(), env.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
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

    #[test]
    fn forgetting_an_environment_keeps_its_history_secrets_and_number() {
        let store = Store::in_memory().unwrap();
        let (app, env) = ids("blog", "review");
        store.assign_redis("cache:6379", &app, &env, 3).unwrap();
        store.add_event(&app, &env, std::time::SystemTime::now(), "deploy", None, "kept").unwrap();
        let web = nonstop_core::ProcessName::new("web").unwrap();
        let before = store.next_generation(&app, &env, &web).unwrap();
        store.forget_environment(&app, &env).unwrap();
        assert_eq!(store.redis_assignment("cache:6379", &app, &env).unwrap(), Some(3));
        assert_eq!(store.events(&app, &env, 10).unwrap().len(), 1);
        assert!(store.next_generation(&app, &env, &web).unwrap() > before, "generations are never reused");
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
