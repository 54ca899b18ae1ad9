//! A store that is damaged is refused, never replaced: checks before the
//! store is opened (the file is a whole SQLite database that passes
//! `PRAGMA quick_check`), a fresh store created atomically (so that a file
//! at the store's path always was a complete store), and a consistent
//! backup taken with SQLite's online backup API.

use super::{Result, Store, StoreError};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What is wrong with a store file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Damage {
    /// The file exists but holds nothing (it was truncated).
    Empty,
    /// It does not start with SQLite's header.
    NotSqlite,
    /// Shorter than its header says.
    Truncated { bytes: u64, expected: u64 },
    /// SQLite's own check failed.
    Corrupt { detail: String },
    /// A symbolic link or something else than a regular file.
    NotAFile,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Empty => write!(f, "the file is empty (0 bytes): it was truncated"),
            Damage::NotSqlite => write!(f, "the file is not a SQLite database"),
            Damage::Truncated { bytes, expected } => {
                write!(f, "the file is truncated ({bytes} bytes of {expected})")
            }
            Damage::Corrupt { detail } => write!(f, "its integrity check failed: {detail}"),
            Damage::NotAFile => write!(f, "it is not a regular file (a symbolic link?)"),
        }
    }
}

/// How a store file looks from outside, without changing it.
#[derive(Debug)]
pub enum Inspection {
    /// No file at that path.
    Missing,
    /// A whole database that passes its check.
    Healthy(Store),
    Damaged(Damage),
}

const HEADER: &[u8; 16] = b"SQLite format 3\0";
/// SQLite's extended result codes for a damaged file.
const CORRUPT: i32 = rusqlite::ffi::SQLITE_CORRUPT;
const NOT_A_DB: i32 = rusqlite::ffi::SQLITE_NOTADB;

fn flags(read_only: bool) -> OpenFlags {
    let access = if read_only { OpenFlags::SQLITE_OPEN_READ_ONLY } else { OpenFlags::SQLITE_OPEN_READ_WRITE };
    access | OpenFlags::SQLITE_OPEN_NOFOLLOW | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A SQLite error that means the file is damaged, as a [`Damage`].
fn as_damage(e: &rusqlite::Error) -> Option<Damage> {
    match e.sqlite_error() {
        Some(f) if f.extended_code & 0xff == CORRUPT => Some(Damage::Corrupt { detail: e.to_string() }),
        Some(f) if f.extended_code & 0xff == NOT_A_DB => Some(Damage::NotSqlite),
        _ => None,
    }
}

/// Check the file's size and header (cheap, before SQLite reads it).
fn check_header(path: &Path) -> Result<Option<Damage>> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    if !meta.file_type().is_file() {
        return Ok(Some(Damage::NotAFile));
    }
    if meta.len() == 0 {
        return Ok(Some(Damage::Empty));
    }
    let mut head = Vec::with_capacity(100);
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|f| f.take(100).read_to_end(&mut head))
        .map_err(io_err(path))?;
    if head.len() < HEADER.len() || &head[..16] != HEADER {
        return Ok(Some(Damage::NotSqlite));
    }
    if head.len() < 100 {
        return Ok(Some(Damage::Truncated { bytes: meta.len(), expected: 100 }));
    }
    let page_size = match u16::from_be_bytes([head[16], head[17]]) {
        1 => 65536u64,
        n => u64::from(n),
    };
    let pages = u64::from(u32::from_be_bytes([head[28], head[29], head[30], head[31]]));
    let counter = &head[24..28];
    let valid_for = &head[92..96];
    // The size in the header counts only when it is valid; pages still in
    // the write-ahead log (not checkpointed yet) may be missing from the
    // file, so only a store without one is held to it.
    let wal_len = std::fs::metadata(wal_path(path)).map(|m| m.len()).unwrap_or(0);
    let expected = pages * page_size;
    if pages > 0 && counter == valid_for && wal_len == 0 && meta.len() < expected {
        return Ok(Some(Damage::Truncated { bytes: meta.len(), expected }));
    }
    Ok(None)
}

/// `state.db-wal`.
pub fn wal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// `state.db-shm`.
pub fn shm_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-shm");
    PathBuf::from(s)
}

/// Open an existing store file and run `PRAGMA quick_check` on it.
/// `Err(Damage)` when the file is damaged; other errors (busy, I/O) as
/// errors.
fn open_checked(path: &Path, read_only: bool) -> Result<std::result::Result<Connection, Damage>> {
    if let Some(d) = check_header(path)? {
        return Ok(Err(d));
    }
    let conn = match Connection::open_with_flags(path, flags(read_only)) {
        Ok(c) => c,
        Err(e) => {
            return match as_damage(&e) {
                Some(d) => Ok(Err(d)),
                None => Err(StoreError::Open { path: path.to_path_buf(), source: e }),
            }
        }
    };
    conn.busy_timeout(Duration::from_secs(5))?;
    match quick_check(&conn) {
        Ok(None) => Ok(Ok(conn)),
        Ok(Some(detail)) => Ok(Err(Damage::Corrupt { detail })),
        Err(e) => match as_damage(&e) {
            Some(d) => Ok(Err(d)),
            None => Err(e.into()),
        },
    }
}

/// `None` when SQLite finds nothing wrong, else what it found (the first
/// few problems).
fn quick_check(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
    let rows: Vec<String> = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<_>>()?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(None);
    }
    // One line (it ends up in error messages and logs), not too long.
    let mut detail = rows.join("\n").lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    if detail.chars().count() > 300 {
        detail = detail.chars().take(300).collect::<String>() + "…";
    }
    Ok(Some(detail))
}

/// Create a file 0600, failing if anything (a link included) is there.
fn create_private(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// A sibling of `path` for a temporary file: `<name>.<what>-<pid>`, with
/// whatever an earlier run of this process id left there removed.
fn temp_beside(path: &Path, what: &str) -> Result<PathBuf> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{what}-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    for p in [tmp.clone(), wal_path(&tmp), shm_path(&tmp)] {
        remove_if_exists(&p)?;
    }
    Ok(tmp)
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Open the store at `path`; create a fresh one if no file is there.
    /// A file that is there but damaged (empty, not SQLite, truncated,
    /// failing `PRAGMA quick_check`) is refused with
    /// [`StoreError::Damaged`]: it is never replaced by a fresh store.
    pub fn open(path: &Path) -> Result<Self> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create_fresh(path)?,
            Err(e) => return Err(io_err(path)(e)),
            Ok(_) => {}
        }
        match open_checked(path, false)? {
            Ok(conn) => Self::init(conn, path.to_path_buf()),
            Err(damage) => Err(StoreError::Damaged { path: path.to_path_buf(), damage }),
        }
    }

    /// Look at the store at `path` without changing it: missing, healthy
    /// (opened read-only), or damaged and how.
    pub fn inspect(path: &Path) -> Result<Inspection> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Inspection::Missing),
            Err(e) => return Err(io_err(path)(e)),
            Ok(_) => {}
        }
        Ok(match open_checked(path, true)? {
            Ok(conn) => Inspection::Healthy(Self::wrap(conn, path.to_path_buf())),
            Err(d) => Inspection::Damaged(d),
        })
    }

    /// A fresh store, built beside `path` and renamed into place, so that a
    /// file at `path` always is a complete store.
    fn create_fresh(path: &Path) -> Result<()> {
        let tmp = temp_beside(path, "new")?;
        drop(create_private(&tmp)?);
        let built = (|| {
            let conn = Connection::open_with_flags(&tmp, flags(false))
                .map_err(|source| StoreError::Open { path: tmp.clone(), source })?;
            let store = Self::init(conn, tmp.clone())?;
            // One file, without a write-ahead log beside it, to rename.
            store.conn().pragma_update(None, "journal_mode", "DELETE")?;
            drop(store);
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_dir(path)
    }

    /// A consistent copy of the store at `dest`, taken with SQLite's online
    /// backup API from a connection of its own (the store's writes go on
    /// meanwhile), checked, written beside `dest` (0600) and renamed over
    /// it: `dest` is always a whole, checked backup.
    pub fn backup_to(&self, dest: &Path) -> Result<()> {
        let src = Connection::open_with_flags(&self.path, flags(true))
            .map_err(|source| StoreError::Open { path: self.path.clone(), source })?;
        src.busy_timeout(Duration::from_secs(5))?;
        let tmp = temp_beside(dest, "tmp")?;
        drop(create_private(&tmp)?);
        let written = (|| {
            let mut dst = Connection::open_with_flags(&tmp, flags(false))
                .map_err(|source| StoreError::Open { path: tmp.clone(), source })?;
            {
                // All pages in one step: one read transaction, so one
                // consistent snapshot.
                use rusqlite::backup::StepResult;
                let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    match backup.step(-1)? {
                        StepResult::Done => break,
                        StepResult::More => {}
                        StepResult::Busy | StepResult::Locked if std::time::Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        _ => {
                            return Err(StoreError::Io {
                                path: self.path.clone(),
                                source: std::io::Error::other("the store stayed locked for 10s during a backup"),
                            })
                        }
                    }
                }
            }
            dst.pragma_update(None, "journal_mode", "DELETE")?;
            if let Some(detail) = quick_check(&dst)? {
                return Err(StoreError::Damaged { path: tmp.clone(), damage: Damage::Corrupt { detail } });
            }
            drop(dst);
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
        sync_dir(dest)
    }

    /// How many rows this store's connection has changed since it was
    /// opened: a backup is due when it moved.
    pub fn total_changes(&self) -> u64 {
        self.conn().total_changes()
    }
}

/// Put the backup at `backup` in place as the store at `dest`: checked
/// first, copied beside `dest` (0600), renamed over it. `dest`'s
/// write-ahead log must be gone (set aside with the damaged file): SQLite
/// would replay it into the restored store.
pub fn restore_backup(backup: &Path, dest: &Path) -> Result<()> {
    for side in [wal_path(dest), shm_path(dest)] {
        if std::fs::symlink_metadata(&side).is_ok() {
            return Err(StoreError::Io {
                path: side,
                source: std::io::Error::other("set it aside with the damaged store before restoring a backup"),
            });
        }
    }
    match Store::inspect(backup)? {
        Inspection::Healthy(store) => drop(store),
        Inspection::Missing => {
            return Err(StoreError::Io { path: backup.to_path_buf(), source: std::io::ErrorKind::NotFound.into() })
        }
        Inspection::Damaged(damage) => return Err(StoreError::Damaged { path: backup.to_path_buf(), damage }),
    }
    // Reading the backup (read-only, in DELETE mode) left nothing beside it.
    let tmp = temp_beside(dest, "restore")?;
    let copied = (|| {
        let mut out = create_private(&tmp)?;
        let mut input =
            OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(backup).map_err(io_err(backup))?;
        std::io::copy(&mut input, &mut out).map_err(io_err(&tmp))?;
        out.flush().and_then(|()| out.sync_all()).map_err(io_err(&tmp))
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    sync_dir(dest)
}
