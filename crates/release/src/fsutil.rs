//! File system helpers: locked work directories, durable renames, removal
//! of trees whatever their permissions.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A directory held under an exclusive `flock` for as long as this value
/// lives, so that another process (or another call in this one) can tell it
/// is in use. Never removed on drop.
pub(crate) struct LockedDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl LockedDir {
    /// A new directory `<root>/<prefix><random>`, locked.
    pub(crate) fn create(root: &Path, prefix: &str) -> io::Result<Self> {
        for _ in 0..5 {
            let path = tempfile::Builder::new().prefix(prefix).tempdir_in(root)?.keep();
            // `clean_staging` may have removed it between creation and
            // locking: then take another one.
            if let Some(locked) = Self::try_lock(&path) {
                if path.exists() {
                    return Ok(locked);
                }
            }
        }
        Err(io::Error::other(format!("cannot create and lock a work directory in {}", root.display())))
    }

    /// Lock an existing directory, or `None` if someone holds it (or it is
    /// gone).
    pub(crate) fn try_lock(path: &Path) -> Option<Self> {
        let lock = try_flock(path).ok()??;
        Some(Self { path: path.to_path_buf(), _lock: lock })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// `path` (a directory or a file) opened and under an exclusive `flock`;
/// `Ok(None)` when someone else holds the lock or `path` is gone.
pub(crate) fn try_flock(path: &Path) -> io::Result<Option<Flock<File>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
}

/// Remove a tree, also when build commands left directories without write
/// permission in it. A missing tree is fine.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_dirs_writable(path);
            match fs::remove_dir_all(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
    }
}

fn make_dirs_writable(dir: &Path) {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(dir, Permissions::from_mode((meta.permissions().mode() & 0o7777) | 0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_dirs_writable(&entry.path());
            }
        }
    }
}

/// Take every write permission bit off a tree (files and directories;
/// symbolic links are not followed): a published release is read-only, so
/// an app that writes into its working directory fails at once instead of
/// keeping state that the next deploy loses. (A process with
/// `CAP_DAC_OVERRIDE`, root, is not stopped by permission bits.)
pub(crate) fn make_read_only(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            make_read_only(&entry?.path())?;
        }
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o222 != 0 {
        fs::set_permissions(path, Permissions::from_mode(mode & !0o222))?;
    }
    Ok(())
}

/// Give the owner write permission on a directory again (a read-only
/// release must be writable to be renamed into the trash: the move
/// updates its `..`).
pub(crate) fn make_owner_writable(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        fs::set_permissions(dir, Permissions::from_mode((meta.permissions().mode() & 0o7777) | 0o200))?;
    }
    Ok(())
}

/// fsync a directory (after creating, renaming or removing entries in it).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flush everything written under `path` to disk: one `syncfs` for the
/// file system instead of an fsync per file.
pub(crate) fn sync_filesystem(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::fd::AsRawFd;
        nix::unistd::syncfs(dir.as_raw_fd())?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        drop(dir);
        nix::unistd::sync();
    }
    Ok(())
}
