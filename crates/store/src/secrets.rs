//! Secrets at rest: the ciphertexts of `nonstop secrets`, version by
//! version, and the key check.
//!
//! The store never sees a clear value: it keeps the bytes it is given
//! (`nonstop-secrets` seals and opens them). Every `set` adds a version
//! (1, 2, ...) of a name in an app's environment; an `unset` adds a
//! tombstone version (no ciphertext), so the history stays. The current
//! value of a name is its newest version unless that is a tombstone.
//!
//! The key check (one row) is a constant encrypted with the key: it lets
//! the reader tell a wrong key from damaged data. It is written before
//! the first ciphertext ([`Store::put_secret`] refuses to write without
//! it), so a store with secrets always has one.
//!
//! Secrets are not removed with an app's records ([`Store::delete_app`],
//! `nonstop down`): they are configuration, like a release's spec. They
//! go, every version, when `env destroy` forgets their environment
//! ([`Store::forget_environment`]): an environment created again under
//! that name starts without them. Backups of the state database carry the
//! ciphertexts, never the key.

use super::{from_ms, ms, AppName, EnvironmentId, Result, Store, StoreError};
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use std::time::SystemTime;

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS secrets (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    ciphertext BLOB,
    nonce BLOB,
    removed INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (app, environment, name, version),
    CHECK ((removed = 0 AND ciphertext IS NOT NULL AND nonce IS NOT NULL)
        OR (removed = 1 AND ciphertext IS NULL AND nonce IS NULL))
);
CREATE TABLE IF NOT EXISTS secrets_key_check (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    check_value BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"#;

/// A new version of a secret, as sealed by `nonstop-secrets`.
#[derive(Debug, Clone, Copy)]
pub struct NewSecretVersion<'a> {
    pub app: &'a AppName,
    pub environment: &'a EnvironmentId,
    pub name: &'a str,
    /// From [`Store::next_secret_version`]: the version the ciphertext
    /// was sealed for.
    pub version: u64,
    pub nonce: &'a [u8],
    pub ciphertext: &'a [u8],
    /// Who set it (the CLI's user, as the deployments' `who`).
    pub created_by: &'a str,
    pub created_at: SystemTime,
}

/// The current version of a secret, with its ciphertext.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretCiphertext {
    pub name: String,
    pub version: u64,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: SystemTime,
    pub created_by: String,
}

impl std::fmt::Debug for SecretCiphertext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretCiphertext")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("bytes", &self.ciphertext.len())
            .field("created_at", &self.created_at)
            .field("created_by", &self.created_by)
            .finish()
    }
}

/// A version of a secret, without its ciphertext (`nonstop secrets list`,
/// history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersionInfo {
    pub name: String,
    pub version: u64,
    /// A tombstone: `unset` wrote this version.
    pub removed: bool,
    pub created_at: SystemTime,
    pub created_by: String,
}

fn version_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn version_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The newest version of each name of (app, environment), tombstones too.
const NEWEST: &str = "SELECT s.name, s.version, s.removed, s.created_at_ms, s.created_by, s.nonce, s.ciphertext
     FROM secrets s
     JOIN (SELECT name, MAX(version) AS version FROM secrets WHERE app = ?1 AND environment = ?2 GROUP BY name) n
       ON s.name = n.name AND s.version = n.version
     WHERE s.app = ?1 AND s.environment = ?2
     ORDER BY s.name";

impl Store {
    /// The version a new value of `name` gets (1 for the first): seal the
    /// value for it, then [`Store::put_secret`] it.
    pub fn next_secret_version(&self, app: &AppName, env: &EnvironmentId, name: &str) -> Result<u64> {
        let next: i64 = self.conn().query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM secrets WHERE app = ?1 AND environment = ?2 AND name = ?3",
            params![app.as_str(), env.as_str(), name],
            |r| r.get(0),
        )?;
        Ok(version_u64(next))
    }

    /// Record a new version of a secret. Refused when that version exists
    /// already ([`StoreError::SecretVersionTaken`]: another command set the
    /// secret meanwhile; seal again for the next version), or when no key
    /// check is stored ([`StoreError::SecretsKeyCheckMissing`]).
    pub fn put_secret(&self, new: &NewSecretVersion<'_>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_check: bool = tx.query_row("SELECT COUNT(*) > 0 FROM secrets_key_check", [], |r| r.get(0))?;
        if !has_check {
            return Err(StoreError::SecretsKeyCheckMissing);
        }
        let newest: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM secrets WHERE app = ?1 AND environment = ?2 AND name = ?3",
            params![new.app.as_str(), new.environment.as_str(), new.name],
            |r| r.get(0),
        )?;
        if version_i64(new.version) != newest + 1 {
            return Err(StoreError::SecretVersionTaken { name: new.name.to_string(), version: new.version });
        }
        tx.execute(
            "INSERT INTO secrets (app, environment, name, version, ciphertext, nonce, removed, created_at_ms, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8)",
            params![
                new.app.as_str(),
                new.environment.as_str(),
                new.name,
                version_i64(new.version),
                new.ciphertext,
                new.nonce,
                ms(new.created_at),
                new.created_by,
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Unset a secret: a tombstone version after the current one. `None`
    /// (and nothing written) when it is not set.
    pub fn unset_secret(
        &self,
        app: &AppName,
        env: &EnvironmentId,
        name: &str,
        created_by: &str,
        now: SystemTime,
    ) -> Result<Option<u64>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let newest: Option<(i64, bool)> = tx
            .query_row(
                "SELECT version, removed FROM secrets WHERE app = ?1 AND environment = ?2 AND name = ?3
                 ORDER BY version DESC LIMIT 1",
                params![app.as_str(), env.as_str(), name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((version, false)) = newest else { return Ok(None) };
        tx.execute(
            "INSERT INTO secrets (app, environment, name, version, ciphertext, nonce, removed, created_at_ms, created_by)
             VALUES (?1, ?2, ?3, ?4, NULL, NULL, 1, ?5, ?6)",
            params![app.as_str(), env.as_str(), name, version + 1, ms(now), created_by],
        )?;
        tx.commit()?;
        Ok(Some(version_u64(version + 1)))
    }

    /// The current value of every secret of (app, environment) that is
    /// set, by name.
    pub fn current_secrets(&self, app: &AppName, env: &EnvironmentId) -> Result<Vec<SecretCiphertext>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(NEWEST)?;
        let rows = stmt.query_map(params![app.as_str(), env.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<Vec<u8>>>(5)?,
                r.get::<_, Option<Vec<u8>>>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, version, removed, created, created_by, nonce, ciphertext) = row?;
            if let (false, Some(nonce), Some(ciphertext)) = (removed, nonce, ciphertext) {
                out.push(SecretCiphertext {
                    name,
                    version: version_u64(version),
                    nonce,
                    ciphertext,
                    created_at: from_ms(created),
                    created_by,
                });
            }
        }
        Ok(out)
    }

    /// The secrets of (app, environment) that are set, by name: their
    /// current version, when and by whom it was set; no ciphertext.
    pub fn list_secrets(&self, app: &AppName, env: &EnvironmentId) -> Result<Vec<SecretVersionInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(NEWEST)?;
        let rows = stmt.query_map(params![app.as_str(), env.as_str()], info)?;
        let mut out = Vec::new();
        for row in rows {
            let row = row?;
            if !row.removed {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// Every version of one secret, oldest first, tombstones included.
    pub fn secret_history(&self, app: &AppName, env: &EnvironmentId, name: &str) -> Result<Vec<SecretVersionInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, version, removed, created_at_ms, created_by FROM secrets
             WHERE app = ?1 AND environment = ?2 AND name = ?3 ORDER BY version",
        )?;
        let rows = stmt.query_map(params![app.as_str(), env.as_str(), name], info)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The stored key check, if a secret was ever written.
    pub fn secrets_key_check(&self) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row("SELECT check_value FROM secrets_key_check WHERE id = 1", [], |r| r.get(0))
            .optional()?)
    }

    /// Store `check` as the key check unless one is stored already, and
    /// return the one stored (this one, or the earlier one, which the key
    /// must then be verified against).
    pub fn put_secrets_key_check_if_absent(&self, check: &[u8], now: SystemTime) -> Result<Vec<u8>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO secrets_key_check (id, check_value, created_at_ms) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO NOTHING",
            params![check, ms(now)],
        )?;
        let stored: Vec<u8> =
            tx.query_row("SELECT check_value FROM secrets_key_check WHERE id = 1", [], |r| r.get(0))?;
        tx.commit()?;
        Ok(stored)
    }
}

fn info(r: &rusqlite::Row<'_>) -> rusqlite::Result<SecretVersionInfo> {
    Ok(SecretVersionInfo {
        name: r.get(0)?,
        version: version_u64(r.get(1)?),
        removed: r.get(2)?,
        created_at: from_ms(r.get(3)?),
        created_by: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn ids() -> (AppName, EnvironmentId) {
        (AppName::new("blog").unwrap(), EnvironmentId::new("production").unwrap())
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn put(store: &Store, app: &AppName, env: &EnvironmentId, name: &str, bytes: &[u8], s: u64) -> Result<u64> {
        let version = store.next_secret_version(app, env, name)?;
        store.put_secret(&NewSecretVersion {
            app,
            environment: env,
            name,
            version,
            nonce: &[s as u8; 24],
            ciphertext: bytes,
            created_by: "ada",
            created_at: at(s),
        })?;
        Ok(version)
    }

    #[test]
    fn versions_current_values_and_history() {
        let store = Store::in_memory().unwrap();
        let (app, env) = ids();
        let staging = EnvironmentId::new("staging").unwrap();
        assert_eq!(store.secrets_key_check().unwrap(), None);
        assert!(matches!(put(&store, &app, &env, "A", b"x", 0), Err(StoreError::SecretsKeyCheckMissing)));
        assert_eq!(store.put_secrets_key_check_if_absent(b"check-1", at(0)).unwrap(), b"check-1");
        // A second check never replaces the first.
        assert_eq!(store.put_secrets_key_check_if_absent(b"check-2", at(1)).unwrap(), b"check-1");
        assert_eq!(store.secrets_key_check().unwrap().unwrap(), b"check-1");

        assert_eq!(put(&store, &app, &env, "DB", b"db-1", 1).unwrap(), 1);
        assert_eq!(put(&store, &app, &env, "DB", b"db-2", 2).unwrap(), 2);
        assert_eq!(put(&store, &app, &env, "API", b"api-1", 3).unwrap(), 1);
        assert_eq!(put(&store, &app, &staging, "DB", b"staging-db", 4).unwrap(), 1);

        let current = store.current_secrets(&app, &env).unwrap();
        let names: Vec<_> = current.iter().map(|s| (s.name.as_str(), s.version, s.ciphertext.as_slice())).collect();
        assert_eq!(names, vec![("API", 1, &b"api-1"[..]), ("DB", 2, &b"db-2"[..])]);
        assert_eq!(current[1].nonce, vec![2u8; 24]);
        assert_eq!(current[1].created_at, at(2));
        assert_eq!(current[1].created_by, "ada");
        assert!(!format!("{:?}", current[1]).contains("db-2"), "Debug shows no ciphertext");
        assert_eq!(store.current_secrets(&app, &staging).unwrap().len(), 1);

        // Unset writes a tombstone; setting again continues the versions.
        assert_eq!(store.unset_secret(&app, &env, "DB", "bob", at(5)).unwrap(), Some(3));
        assert_eq!(store.unset_secret(&app, &env, "DB", "bob", at(6)).unwrap(), None);
        assert_eq!(store.unset_secret(&app, &env, "NEVER", "bob", at(6)).unwrap(), None);
        let listed = store.list_secrets(&app, &env).unwrap();
        assert_eq!(
            listed,
            vec![SecretVersionInfo {
                name: "API".into(),
                version: 1,
                removed: false,
                created_at: at(3),
                created_by: "ada".into()
            }]
        );
        assert_eq!(store.current_secrets(&app, &env).unwrap().len(), 1);
        assert_eq!(put(&store, &app, &env, "DB", b"db-4", 7).unwrap(), 4);
        let history: Vec<_> =
            store.secret_history(&app, &env, "DB").unwrap().into_iter().map(|h| (h.version, h.removed)).collect();
        assert_eq!(history, vec![(1, false), (2, false), (3, true), (4, false)]);
        // The staging secret was never touched.
        assert_eq!(store.current_secrets(&app, &staging).unwrap()[0].ciphertext, b"staging-db");
    }

    #[test]
    fn a_version_taken_meanwhile_is_refused() {
        let store = Store::in_memory().unwrap();
        let (app, env) = ids();
        store.put_secrets_key_check_if_absent(b"check", at(0)).unwrap();
        let version = store.next_secret_version(&app, &env, "DB").unwrap();
        put(&store, &app, &env, "DB", b"other", 1).unwrap();
        let new = NewSecretVersion {
            app: &app,
            environment: &env,
            name: "DB",
            version,
            nonce: &[0; 24],
            ciphertext: b"mine",
            created_by: "ada",
            created_at: at(2),
        };
        let e = store.put_secret(&new).unwrap_err();
        assert!(matches!(&e, StoreError::SecretVersionTaken { version: 1, .. }), "{e}");
        assert!(e.to_string().contains("run the command again"), "{e}");
        // Nor can a version be skipped.
        let e = store.put_secret(&NewSecretVersion { version: 5, ..new }).unwrap_err();
        assert!(matches!(e, StoreError::SecretVersionTaken { version: 5, .. }));
        assert_eq!(store.current_secrets(&app, &env).unwrap()[0].ciphertext, b"other");
    }

    #[test]
    fn delete_app_keeps_secrets() {
        let store = Store::in_memory().unwrap();
        let (app, env) = ids();
        store.put_secrets_key_check_if_absent(b"check", at(0)).unwrap();
        put(&store, &app, &env, "DB", b"x", 1).unwrap();
        store.delete_app(&app, &env).unwrap();
        assert_eq!(store.current_secrets(&app, &env).unwrap().len(), 1);
    }
}
