//! Secrets through the real store: sealed by `nonstop-secrets`, kept in a
//! SQLite file, read back; the file never holds a clear value.

use nonstop_core::{AppName, EnvironmentId};
use nonstop_secrets::{CheckedKey, CryptoError, KeyCheck, KeyError, SecretAddress, SecretValue, SecretsKey, KEY_FILE};
use nonstop_store::{NewSecretVersion, Store};
use std::path::Path;
use std::time::SystemTime;

const DB_PASSWORD: &str = "pg-Zq8v3-correct-horse";
const API_TOKEN: &str = "tok_live_9f8e7d6c5b4a39281706";

fn ids() -> (AppName, EnvironmentId) {
    (AppName::new("blog").unwrap(), EnvironmentId::new("production").unwrap())
}

/// `nonstop secrets set`, as the daemon is meant to do it.
fn set(store: &Store, home: &Path, app: &AppName, env: &EnvironmentId, name: &str, value: &str) -> u64 {
    let key = SecretsKey::load_or_create(home, None).unwrap();
    let stored = store.put_secrets_key_check_if_absent(key.key_check().unwrap().as_bytes(), SystemTime::now()).unwrap();
    let key = key.verify(&KeyCheck::from_bytes(stored)).unwrap();
    put(store, &key, app, env, name, value)
}

fn put(store: &Store, key: &CheckedKey<'_>, app: &AppName, env: &EnvironmentId, name: &str, value: &str) -> u64 {
    let version = store.next_secret_version(app, env, name).unwrap();
    let at = SecretAddress { app, environment: env, name, version };
    let sealed = key.seal(&at, &SecretValue::new(value.to_string()).unwrap()).unwrap();
    store
        .put_secret(&NewSecretVersion {
            app,
            environment: env,
            name,
            version,
            nonce: &sealed.nonce,
            ciphertext: &sealed.ciphertext,
            created_by: "ada",
            created_at: SystemTime::now(),
        })
        .unwrap();
    version
}

/// What a deploy does: the current values, decrypted with a checked key.
fn read_all(
    store: &Store,
    key: &SecretsKey,
    app: &AppName,
    env: &EnvironmentId,
) -> Result<Vec<(String, SecretValue)>, CryptoError> {
    let check = store.secrets_key_check().unwrap().expect("a key check beside the secrets");
    let key = key.verify(&KeyCheck::from_bytes(check))?;
    store
        .current_secrets(app, env)
        .unwrap()
        .into_iter()
        .map(|row| {
            let at = SecretAddress { app, environment: env, name: &row.name, version: row.version };
            Ok((row.name.clone(), key.open(&at, &row.nonce, &row.ciphertext)?))
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

#[test]
fn round_trip_through_a_real_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let (app, env) = ids();
    {
        let store = Store::open(&db).unwrap();
        assert_eq!(set(&store, dir.path(), &app, &env, "DB_PASSWORD", "first"), 1);
        assert_eq!(set(&store, dir.path(), &app, &env, "DB_PASSWORD", DB_PASSWORD), 2);
        assert_eq!(set(&store, dir.path(), &app, &env, "API_TOKEN", API_TOKEN), 1);
    }
    let store = Store::open(&db).unwrap();
    let key = SecretsKey::load(dir.path(), None).unwrap();
    let values = read_all(&store, &key, &app, &env).unwrap();
    let shown: Vec<_> = values.iter().map(|(n, v)| (n.as_str(), v.expose())).collect();
    assert_eq!(shown, vec![("API_TOKEN", API_TOKEN), ("DB_PASSWORD", DB_PASSWORD)]);
    // The same key given as NONSTOP_SECRETS_KEY reads them too.
    let text = std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
    let from_env = SecretsKey::load(Path::new("/nonexistent"), Some(&text)).unwrap();
    assert_eq!(read_all(&store, &from_env, &app, &env).unwrap().len(), 2);
}

#[test]
fn the_database_file_and_its_wal_never_hold_a_clear_value() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let wal = nonstop_store::wal_path(&db);
    let shm = nonstop_store::shm_path(&db);
    let (app, env) = ids();
    let canary = "plain-canary-event-7c1e";
    let store = Store::open(&db).unwrap();
    set(&store, dir.path(), &app, &env, "DB_PASSWORD", DB_PASSWORD);
    set(&store, dir.path(), &app, &env, "API_TOKEN", API_TOKEN);
    // Something written in clear the same way, to show the search works.
    store.add_event(&app, &env, SystemTime::now(), nonstop_store::EventKind::Secrets, None, canary).unwrap();

    let (db_bytes, wal_bytes, shm_bytes) = (file_bytes(&db), file_bytes(&wal), file_bytes(&shm));
    assert!(!wal_bytes.is_empty(), "the writes are in the write-ahead log while the store is open");
    assert!(contains(&wal_bytes, canary) || contains(&db_bytes, canary), "the search finds clear text");
    for bytes in [&db_bytes, &wal_bytes, &shm_bytes] {
        for value in [DB_PASSWORD, API_TOKEN, "Zq8v3", "9f8e7d6c5b4a"] {
            assert!(!contains(bytes, value), "{value} found in clear");
        }
    }

    // After a checkpoint into the main file (the store closed), too.
    drop(store);
    let db_bytes = file_bytes(&db);
    assert!(contains(&db_bytes, canary));
    for bytes in [&db_bytes, &file_bytes(&wal)] {
        for value in [DB_PASSWORD, API_TOKEN] {
            assert!(!contains(bytes, value), "{value} found in clear");
        }
    }
}

#[test]
fn a_wrong_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let other_home = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).unwrap();
    let (app, env) = ids();
    set(&store, dir.path(), &app, &env, "DB_PASSWORD", DB_PASSWORD);

    let wrong = SecretsKey::load_or_create(other_home.path(), None).unwrap();
    let e = read_all(&store, &wrong, &app, &env).unwrap_err();
    assert!(matches!(e, CryptoError::WrongKey { .. }), "{e}");
    assert!(e.to_string().starts_with("the secrets key does not match the one these secrets were written with"));
    // Nor can it write: the stored check stays the first key's.
    let stored = store.put_secrets_key_check_if_absent(wrong.key_check().unwrap().as_bytes(), SystemTime::now());
    assert!(matches!(wrong.verify(&KeyCheck::from_bytes(stored.unwrap())), Err(CryptoError::WrongKey { .. })));
    // A wrong NONSTOP_SECRETS_KEY alike.
    let wrong_env = SecretsKey::load(dir.path(), Some(&"ab".repeat(32))).unwrap();
    let e = read_all(&store, &wrong_env, &app, &env).unwrap_err();
    assert!(e.to_string().contains("(the key used: NONSTOP_SECRETS_KEY)"), "{e}");
}

#[test]
fn a_missing_key_file_with_secrets_present_says_how_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).unwrap();
    let (app, env) = ids();
    set(&store, dir.path(), &app, &env, "DB_PASSWORD", DB_PASSWORD);
    let key_file = dir.path().join(KEY_FILE);
    std::fs::remove_file(&key_file).unwrap();

    assert!(store.secrets_key_check().unwrap().is_some(), "secrets exist");
    let e = SecretsKey::load(dir.path(), None).unwrap_err();
    assert!(matches!(e, KeyError::Missing { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "the secrets key is missing: restore {} from your backup or set NONSTOP_SECRETS_KEY",
            key_file.display()
        )
    );
    assert!(!key_file.exists(), "reading never creates a key");
    // A key made anew is a different key: refused, the secrets untouched.
    let fresh = SecretsKey::load_or_create(dir.path(), None).unwrap();
    assert!(matches!(read_all(&store, &fresh, &app, &env), Err(CryptoError::WrongKey { .. })));
    assert_eq!(store.current_secrets(&app, &env).unwrap().len(), 1);
}

#[test]
fn ciphertexts_moved_or_altered_in_the_file_do_not_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let store = Store::open(&db).unwrap();
    let (app, env) = ids();
    let staging = EnvironmentId::new("staging").unwrap();
    set(&store, dir.path(), &app, &env, "DB_PASSWORD", DB_PASSWORD);
    let row = store.current_secrets(&app, &env).unwrap().remove(0);

    // Copied to another name, and to another environment.
    for (env_to, name_to) in [(&env, "OTHER"), (&staging, "DB_PASSWORD")] {
        store
            .put_secret(&NewSecretVersion {
                app: &app,
                environment: env_to,
                name: name_to,
                version: 1,
                nonce: &row.nonce,
                ciphertext: &row.ciphertext,
                created_by: "mallory",
                created_at: SystemTime::now(),
            })
            .unwrap();
    }
    let key = SecretsKey::load(dir.path(), None).unwrap();
    let e = read_all(&store, &key, &app, &env).unwrap_err();
    assert!(matches!(&e, CryptoError::Tampered { name, .. } if name == "OTHER"), "{e}");
    assert!(e.to_string().contains("set it again with `nonstop secrets set OTHER`"), "{e}");
    let e = read_all(&store, &key, &app, &staging).unwrap_err();
    assert!(matches!(&e, CryptoError::Tampered { environment, .. } if *environment == staging), "{e}");

    // One bit changed in the file itself.
    drop(store);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE secrets SET ciphertext = ?1 WHERE app = 'blog' AND environment = 'production' AND name = 'DB_PASSWORD'",
        [{
            let mut c = row.ciphertext.clone();
            c[3] ^= 0x10;
            c
        }],
    )
    .unwrap();
    drop(conn);
    let store = Store::open(&db).unwrap();
    let check = store.secrets_key_check().unwrap().unwrap();
    let key = key.verify(&KeyCheck::from_bytes(check)).unwrap();
    let row = store.current_secrets(&app, &env).unwrap().into_iter().find(|r| r.name == "DB_PASSWORD").unwrap();
    let at = SecretAddress { app: &app, environment: &env, name: &row.name, version: row.version };
    assert!(matches!(key.open(&at, &row.nonce, &row.ciphertext), Err(CryptoError::Tampered { .. })));
}
