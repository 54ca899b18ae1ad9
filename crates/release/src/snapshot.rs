//! Walking the app directory: which files belong to a release, their
//! content hash, and copying them into a release directory.
//!
//! One walk serves both purposes (hash only, or hash and copy), so the hash
//! of a built release is exactly the hash of what was copied.

use crate::{ReleaseError, SnapshotStats};
use ignore::{DirEntry, WalkBuilder};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// The name of per-directory ignore files of nonstop (gitignore syntax).
pub const NONSTOPIGNORE: &str = ".nonstopignore";

/// The directory, at the top of a release, where nonstop keeps its own
/// files (`build.log`). A `.nonstop/` at the top of the app directory is
/// therefore never copied.
pub const META_DIR: &str = ".nonstop";

/// The hash is sha256 of this domain tag followed by, for each entry in
/// ascending byte order of its relative `/`-separated path: the type (`d`,
/// `f` or `l`), the owner-executable bit (0 or 1), the path's length (u64
/// little-endian) and bytes, then the payload's length and bytes, where the
/// payload is nothing for a directory, the sha256 of the content for a
/// file, and the target for a symlink. A test pins one value.
///
/// Bumped if the hash encoding ever changes, so old and new hashes never
/// collide by accident.
const HASH_DOMAIN: &[u8] = b"nonstop-snapshot-v1\0";

const COPY_BUF: usize = 256 * 1024;

/// What the walk found at one path.
enum Kind {
    Dir,
    /// A regular file: sha256 of its content.
    File {
        digest: [u8; 32],
    },
    Symlink {
        target: Vec<u8>,
    },
}

struct Item {
    /// Relative path, `/`-separated, as bytes (paths need not be UTF-8).
    rel: Vec<u8>,
    exec: bool,
    kind: Kind,
}

/// Whether a path (relative to the app directory) is always left out,
/// whatever the ignore files say.
pub(crate) fn always_skipped(rel: &Path, is_dir: bool, excluded: &[PathBuf]) -> bool {
    let Some(name) = rel.file_name() else {
        return false;
    };
    let name = name.as_bytes();
    // `.git` is a directory in a repository and a file in a worktree or a
    // submodule: never part of a release either way.
    if name == b".git" {
        return true;
    }
    if is_dir && name == b"__pycache__" {
        return true;
    }
    if !is_dir && name.ends_with(b".pyc") {
        return true;
    }
    if name == b".cache" && rel.parent().and_then(Path::file_name).map(OsStrExt::as_bytes) == Some(b"node_modules") {
        return true;
    }
    if rel == Path::new(META_DIR) {
        return true;
    }
    excluded.iter().any(|e| e == rel)
}

/// Walk `source` (already canonical), hashing every entry and, when `dest`
/// is given, copying it there. `dest` must exist and be empty.
pub(crate) fn snapshot(
    source: &Path,
    dest: Option<&Path>,
    excluded: &[PathBuf],
    cancel: Option<&CancellationToken>,
) -> Result<SnapshotStats, ReleaseError> {
    let root_meta = fs::metadata(source).map_err(|e| read_err(source, e))?;
    if let Some(dest) = dest {
        // Owner rwx always, so that build commands and cleanup can work in it.
        set_mode(dest, root_meta.permissions().mode() | 0o700)?;
    }

    let excluded_in_filter = excluded.to_vec();
    let source_in_filter = source.to_path_buf();
    let mut walker = WalkBuilder::new(source);
    walker
        // Only what is written in the app directory counts: no global
        // gitignore, no ignore files above the app directory, no `.ignore`.
        .standard_filters(false)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .require_git(false)
        .add_custom_ignore_filename(NONSTOPIGNORE)
        .follow_links(false)
        .filter_entry(move |entry| {
            let Ok(rel) = entry.path().strip_prefix(&source_in_filter) else {
                return true;
            };
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            !always_skipped(rel, is_dir, &excluded_in_filter)
        });

    let mut items: Vec<Item> = Vec::new();
    let mut stats = SnapshotStats { files: 0, bytes: 0, content_hash: String::new() };
    let mut buf = vec![0u8; COPY_BUF];

    for entry in walker.build() {
        if cancel.is_some_and(CancellationToken::is_cancelled) {
            return Err(ReleaseError::Interrupted);
        }
        let entry = entry.map_err(|e| ReleaseError::Walk { source_dir: source.to_path_buf(), error: e })?;
        if let Some(err) = entry.error() {
            // A bad line in an ignore file: git ignores it too; say so.
            tracing::warn!(path = %entry.path().display(), "ignore file problem: {err}");
        }
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry.path().strip_prefix(source).expect("walk stays under its root").to_path_buf();
        if let Some(item) = visit(&entry, &rel, dest, &mut buf, &mut stats)? {
            items.push(item);
        }
    }

    items.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    let mut hasher = Sha256::new();
    hasher.update(HASH_DOMAIN);
    for item in &items {
        let (tag, payload): (u8, &[u8]) = match &item.kind {
            Kind::Dir => (b'd', &[]),
            Kind::File { digest } => (b'f', digest),
            Kind::Symlink { target } => (b'l', target),
        };
        hasher.update([tag, u8::from(item.exec)]);
        hasher.update((item.rel.len() as u64).to_le_bytes());
        hasher.update(&item.rel);
        hasher.update((payload.len() as u64).to_le_bytes());
        hasher.update(payload);
    }
    stats.content_hash = hex(&hasher.finalize());
    Ok(stats)
}

/// Hash (and copy) one entry. `None` for entries that are skipped (sockets,
/// fifos, devices).
fn visit(
    entry: &DirEntry,
    rel: &Path,
    dest: Option<&Path>,
    buf: &mut [u8],
    stats: &mut SnapshotStats,
) -> Result<Option<Item>, ReleaseError> {
    let path = entry.path();
    let meta = fs::symlink_metadata(path).map_err(|e| read_err(path, e))?;
    let ft = meta.file_type();
    let mode = meta.permissions().mode();
    let rel_bytes = rel_bytes(rel);
    let target_path = dest.map(|d| d.join(rel));

    if ft.is_dir() {
        if let Some(to) = &target_path {
            fs::create_dir(to).map_err(|e| write_err(to, e))?;
            set_mode(to, (mode & 0o7777) | 0o700)?;
        }
        return Ok(Some(Item { rel: rel_bytes, exec: false, kind: Kind::Dir }));
    }
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(|e| read_err(path, e))?;
        if let Some(to) = &target_path {
            symlink(&target, to).map_err(|e| write_err(to, e))?;
        }
        stats.files += 1;
        let target = target.as_os_str().as_bytes().to_vec();
        return Ok(Some(Item { rel: rel_bytes, exec: false, kind: Kind::Symlink { target } }));
    }
    if ft.is_file() {
        let mut src = File::open(path).map_err(|e| read_err(path, e))?;
        let mut out = match &target_path {
            Some(to) => Some(OpenOptions::new().write(true).create_new(true).open(to).map_err(|e| write_err(to, e))?),
            None => None,
        };
        let mut hasher = Sha256::new();
        loop {
            let n = match src.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(path, e)),
            };
            hasher.update(&buf[..n]);
            stats.bytes += n as u64;
            if let (Some(out), Some(to)) = (out.as_mut(), &target_path) {
                out.write_all(&buf[..n]).map_err(|e| write_err(to, e))?;
            }
        }
        if let (Some(out), Some(to)) = (out, &target_path) {
            // Permissions as in the source (setuid/setgid/sticky dropped),
            // set explicitly so the umask does not change them; mtime kept
            // for tools that compare timestamps.
            out.set_permissions(Permissions::from_mode(mode & 0o777)).map_err(|e| write_err(to, e))?;
            if let Ok(mtime) = meta.modified() {
                let _ = out.set_modified(mtime);
            }
        }
        stats.files += 1;
        let digest: [u8; 32] = hasher.finalize().into();
        return Ok(Some(Item { rel: rel_bytes, exec: mode & 0o100 != 0, kind: Kind::File { digest } }));
    }
    let what = if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "device file"
    };
    tracing::debug!(path = %path.display(), "skipping {what}: not part of a release");
    Ok(None)
}

fn rel_bytes(rel: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in rel.components().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        if let Component::Normal(s) = c {
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ReleaseError> {
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|e| write_err(path, e))
}

pub(crate) fn read_err(path: &Path, error: std::io::Error) -> ReleaseError {
    ReleaseError::Read { path: path.to_path_buf(), error }
}

pub(crate) fn write_err(path: &Path, error: std::io::Error) -> ReleaseError {
    ReleaseError::Write { path: path.to_path_buf(), error }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_skipped_names() {
        let none: &[PathBuf] = &[];
        assert!(always_skipped(Path::new(".git"), true, none));
        assert!(always_skipped(Path::new("sub/.git"), false, none));
        assert!(always_skipped(Path::new("a/__pycache__"), true, none));
        assert!(!always_skipped(Path::new("a/__pycache__"), false, none));
        assert!(always_skipped(Path::new("a/b.pyc"), false, none));
        assert!(always_skipped(Path::new("node_modules/.cache"), true, none));
        assert!(always_skipped(Path::new("web/node_modules/.cache"), true, none));
        assert!(!always_skipped(Path::new(".cache"), true, none));
        assert!(always_skipped(Path::new(".nonstop"), true, none));
        assert!(!always_skipped(Path::new("sub/.nonstop"), true, none));
        assert!(always_skipped(Path::new("state"), true, &[PathBuf::from("state")]));
        assert!(!always_skipped(Path::new("app.py"), false, none));
    }

    #[test]
    fn relative_paths_use_slashes() {
        assert_eq!(rel_bytes(Path::new("a/b/c.txt")), b"a/b/c.txt");
    }
}
