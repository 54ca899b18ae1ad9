//! A damaged store is refused (never replaced by a fresh one), a fresh one
//! is created whole, and a backup is consistent and restorable.

use nonstop_core::process::{AppSpec, ProxySpec, ReleaseSpec};
use nonstop_core::{AppName, EnvironmentId, ReleaseId};
use nonstop_store::{restore_backup, wal_path, AppRecord, Damage, Inspection, Store, StoreError};
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

fn record(name: &str) -> AppRecord {
    AppRecord {
        app: AppName::new(name).unwrap(),
        environment: EnvironmentId::default_env(),
        spec: AppSpec {
            app: AppName::new(name).unwrap(),
            env: BTreeMap::new(),
            processes: vec![],
            proxy: ProxySpec::new("127.0.0.1:8080".parse().unwrap()),
            build: vec![],
            release: ReleaseSpec::default(),
            statics: vec![],
            database: None,
            hosts: vec![],
            default_host: true,
            protected: false,
            base: None,
            metrics: None,
        },
        workdir: PathBuf::from("/srv/app"),
        release: ReleaseId(0),
        base_env: BTreeMap::new(),
        running: true,
    }
}

/// A store with an app and enough events to span many pages, closed (so
/// that everything is in the file, not in the write-ahead log).
fn populated(dir: &Path) -> PathBuf {
    let path = dir.join("state.db");
    let store = Store::open(&path).unwrap();
    store.put_app(&record("blog"), SystemTime::now()).unwrap();
    let (app, env) = (AppName::new("blog").unwrap(), EnvironmentId::default_env());
    for i in 0..400 {
        store
            .add_event(
                &app,
                &env,
                SystemTime::now(),
                nonstop_store::EventKind::Start,
                None,
                &format!("event {i} {}", "x".repeat(200)),
            )
            .unwrap();
    }
    drop(store);
    assert!(!wal_path(&path).exists(), "closing the store checkpoints its log");
    path
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn damage_of(r: Result<Store, StoreError>) -> Damage {
    match r {
        Err(StoreError::Damaged { damage, .. }) => damage,
        Err(e) => panic!("expected a damaged store, got error {e}"),
        Ok(_) => panic!("a damaged store was opened"),
    }
}

#[test]
fn a_fresh_store_is_created_whole_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = Store::open(&path).unwrap();
    assert!(store.apps().unwrap().is_empty());
    drop(store);
    assert_eq!(mode(&path), 0o600);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["state.db".to_string()], "no temporary file left");
    assert!(matches!(Store::inspect(&path).unwrap(), Inspection::Healthy(_)));
}

#[test]
fn a_store_truncated_to_zero_bytes_is_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path());
    std::fs::File::create(&path).unwrap(); // truncate
    let err = Store::open(&path).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("empty (0 bytes)"), "{err}");
    assert_eq!(damage_of(Store::open(&path)), Damage::Empty);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it was found");
    assert!(matches!(Store::inspect(&path).unwrap(), Inspection::Damaged(Damage::Empty)));
}

#[test]
fn a_file_that_is_not_sqlite_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    std::fs::write(&path, b"this is not a database, just some text that got here\n".repeat(100)).unwrap();
    assert_eq!(damage_of(Store::open(&path)), Damage::NotSqlite);
}

#[test]
fn a_truncated_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path());
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    match damage_of(Store::open(&path)) {
        Damage::Truncated { bytes, expected } => assert_eq!((bytes, expected), (len / 2, len)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_in_the_middle_fails_the_integrity_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path());
    let len = std::fs::metadata(&path).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.write_all(&[0xA5; 8192]).unwrap();
    drop(f);
    match damage_of(Store::open(&path)) {
        Damage::Corrupt { detail } => assert!(!detail.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_backup_is_consistent_private_and_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path());
    let backup = dir.path().join("state.db.backup");
    let store = Store::open(&path).unwrap();
    store.put_app(&record("shop"), SystemTime::now()).unwrap();
    let before = store.total_changes();
    store.backup_to(&backup).unwrap();
    assert_eq!(store.total_changes(), before, "a backup changes nothing in the store");
    drop(store);
    assert_eq!(mode(&backup), 0o600);
    assert!(!wal_path(&backup).exists(), "the backup is one file");

    // The store is lost; the backup comes back with both apps.
    std::fs::write(&path, b"").unwrap();
    assert!(restore_backup(&backup, &path).is_ok());
    assert_eq!(mode(&path), 0o600);
    let store = Store::open(&path).unwrap();
    let apps: Vec<String> = store.apps().unwrap().iter().map(|a| a.app.to_string()).collect();
    assert_eq!(apps, vec!["blog".to_string(), "shop".to_string()]);
    assert_eq!(store.events(&AppName::new("blog").unwrap(), &EnvironmentId::default_env(), 1000).unwrap().len(), 400);
}

#[test]
fn a_restore_is_refused_over_a_leftover_write_ahead_log_or_from_a_damaged_backup() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path());
    let backup = dir.path().join("state.db.backup");
    Store::open(&path).unwrap().backup_to(&backup).unwrap();
    std::fs::write(wal_path(&path), b"old log").unwrap();
    let err = restore_backup(&backup, &path).unwrap_err().to_string();
    assert!(err.contains("-wal") && err.contains("aside"), "{err}");
    std::fs::remove_file(wal_path(&path)).unwrap();
    std::fs::write(&backup, b"").unwrap();
    let err = restore_backup(&backup, &path).unwrap_err().to_string();
    assert!(err.contains("backup") && err.contains("empty"), "{err}");
}
