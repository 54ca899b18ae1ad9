//! The index of a release's static files (`[static]` mounts): made once,
//! right after the release is built, and persisted inside the release so a
//! restarted daemon loads it without walking the tree again.
//!
//! Building walks each mount's directory once. Only regular files are
//! indexed; a symlink is followed only if it resolves to a regular file
//! inside the mount's root (anything else is skipped, as are FIFOs,
//! sockets and devices, and names that are not UTF-8). Each file gets its
//! size, modification time, an `ETag` from its SHA-256, a content type (by
//! extension), whether its name carries a content hash ([`is_hashed_name`]),
//! and precompressed variants: the build's own `NAME.gz` / `NAME.br` if
//! present (WhiteNoise's `CompressedManifestStaticFilesStorage` writes
//! them), otherwise gzip and brotli made here for compressible types of at
//! least [`COMPRESS_MIN_BYTES`], kept only when smaller than 95 % of the
//! original. Made variants and the index (`index.json`) live in
//! `RELEASE/.nonstop-static/`.

use nonstop_core::process::StaticMount;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// Directory inside a release holding the index and the made variants.
pub const STATIC_INDEX_DIR: &str = ".nonstop-static";
const INDEX_FILE: &str = "index.json";
const INDEX_VERSION: u32 = 1;
/// Smaller files are not worth compressing (a TCP segment either way).
pub const COMPRESS_MIN_BYTES: u64 = 1024;
/// A variant is kept only if it is at most this share of the original.
const KEEP_RATIO: f64 = 0.95;

/// Why a release's static files could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum StaticIndexError {
    #[error("the static directory `{dir}` of [static] url {url:?} does not exist in the release after the build ({path}); make the build fill it, e.g. run `python manage.py collectstatic --noinput` in `build`, or fix `dir`")]
    MissingDir { url: String, dir: String, path: PathBuf },
    #[error("the static directory `{dir}` of [static] url {url:?} is not a directory inside the release ({path})")]
    NotInside { url: String, dir: String, path: PathBuf },
    #[error("cannot index static files at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the static index {path} is damaged: {source}")]
    Damaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StaticIndexError + '_ {
    move |source| StaticIndexError::Io { path: path.to_path_buf(), source }
}

/// The persisted index of one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticIndex {
    pub version: u32,
    pub mounts: Vec<MountIndex>,
}

/// One mount of one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountIndex {
    pub url: String,
    /// As in the spec, relative to the release.
    pub dir: PathBuf,
    /// By path relative to the mount's root, `/`-separated (`css/main.css`).
    pub files: BTreeMap<String, FileEntry>,
}

/// One file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: u64,
    /// Hex SHA-256 prefix of the content (the `ETag` without quotes).
    pub hash: String,
    pub content_type: String,
    /// The name carries a content hash: cached for a year, immutable.
    pub immutable: bool,
    pub gzip: Option<Variant>,
    pub br: Option<Variant>,
}

/// A precompressed copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// Relative to the release directory.
    pub path: PathBuf,
    pub size: u64,
}

impl StaticIndex {
    /// The index of `release` for `mounts`: the persisted one if it was made
    /// for the same mounts, otherwise a new one (built and persisted).
    pub fn load_or_build(release: &Path, mounts: &[StaticMount]) -> Result<StaticIndex, StaticIndexError> {
        if let Some(index) = Self::load(release)? {
            let same = index.mounts.len() == mounts.len()
                && index.mounts.iter().zip(mounts).all(|(a, b)| a.url == b.url && a.dir == b.dir);
            if same && index.version == INDEX_VERSION {
                return Ok(index);
            }
        }
        // Releases are read-only once built: the owner may give the top
        // directory its write bit back for the time it takes to add the
        // index, which is made read-only in turn.
        writable_for(release, || {
            let index = Self::build(release, mounts)?;
            index.save(release)?;
            let dir = release.join(STATIC_INDEX_DIR);
            read_only(&dir).map_err(io_err(&dir))?;
            Ok(index)
        })
    }

    /// The persisted index, if there is one.
    pub fn load(release: &Path) -> Result<Option<StaticIndex>, StaticIndexError> {
        let path = release.join(STATIC_INDEX_DIR).join(INDEX_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| StaticIndexError::Damaged { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StaticIndexError::Io { path, source: e }),
        }
    }

    /// Write `index.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, release: &Path) -> Result<(), StaticIndexError> {
        let dir = release.join(STATIC_INDEX_DIR);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(INDEX_FILE);
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
        let json =
            serde_json::to_vec(self).map_err(|e| StaticIndexError::Io { path: path.clone(), source: e.into() })?;
        tmp.write_all(&json).map_err(io_err(&path))?;
        tmp.as_file().sync_all().map_err(io_err(&path))?;
        tmp.persist(&path).map_err(|e| StaticIndexError::Io { path: path.clone(), source: e.error })?;
        Ok(())
    }

    /// Walk every mount of `release` and make the variants. Checks first
    /// that every mount's directory exists (the whole index fails, naming
    /// the first missing one).
    pub fn build(release: &Path, mounts: &[StaticMount]) -> Result<StaticIndex, StaticIndexError> {
        let release_real = release.canonicalize().map_err(io_err(release))?;
        let mut roots = Vec::new();
        for m in mounts {
            roots.push(mount_root(&release_real, m)?);
        }
        let mut out = Vec::new();
        for (n, (m, root)) in mounts.iter().zip(roots).enumerate() {
            let mut files = BTreeMap::new();
            let made = release_real.join(STATIC_INDEX_DIR).join(n.to_string());
            let mut found = Vec::new();
            walk(&root, &root, String::new(), &mut found)?;
            let names: std::collections::HashSet<&str> = found.iter().map(|(rel, _)| rel.as_str()).collect();
            for (rel, path) in &found {
                let entry = index_file(&release_real, &root, &made, rel, path, &names)?;
                files.insert(rel.clone(), entry);
            }
            out.push(MountIndex { url: m.url.clone(), dir: m.dir.clone(), files });
        }
        Ok(StaticIndex { version: INDEX_VERSION, mounts: out })
    }
}

/// Run `f` with the owner's write bit on `dir`, restoring its mode after.
fn writable_for<T>(dir: &Path, f: impl FnOnce() -> Result<T, StaticIndexError>) -> Result<T, StaticIndexError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(dir).map_err(io_err(dir))?.permissions().mode() & 0o7777;
    if mode & 0o200 != 0 {
        return f();
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o200)).map_err(io_err(dir))?;
    let out = f();
    let restored = fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err(dir));
    let out = out?;
    restored?;
    Ok(out)
}

/// Write bits off, recursively (directories last, so that their entries
/// can still be changed).
fn read_only(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            read_only(&entry?.path())?;
        }
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o222 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o222))?;
    }
    Ok(())
}

/// The real path of a mount's directory, which must be a directory inside
/// the release.
fn mount_root(release_real: &Path, m: &StaticMount) -> Result<PathBuf, StaticIndexError> {
    let dir_text = m.dir.display().to_string();
    let path = release_real.join(&m.dir);
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StaticIndexError::MissingDir { url: m.url.clone(), dir: dir_text, path })
        }
        Err(e) => return Err(StaticIndexError::Io { path, source: e }),
    };
    let is_dir = fs::metadata(&real).map(|md| md.is_dir()).unwrap_or(false);
    if !is_dir || !real.starts_with(release_real) || real == release_real {
        return Err(StaticIndexError::NotInside { url: m.url.clone(), dir: dir_text, path });
    }
    Ok(real)
}

/// Every servable regular file under `dir`: (path relative to the root,
/// `/`-separated; real path). Symlinked directories are not entered.
fn walk(root: &Path, dir: &Path, prefix: String, out: &mut Vec<(String, PathBuf)>) -> Result<(), StaticIndexError> {
    let mut entries: Vec<fs::DirEntry> =
        fs::read_dir(dir).map_err(io_err(dir))?.collect::<Result<_, _>>().map_err(io_err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            tracing::warn!(path = %path.display(), "static file skipped: its name is not UTF-8");
            continue;
        };
        if prefix.is_empty() && name == STATIC_INDEX_DIR {
            continue;
        }
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let ft = entry.file_type().map_err(io_err(&path))?;
        if ft.is_dir() {
            walk(root, &path, rel, out)?;
        } else if ft.is_file() {
            out.push((rel, path));
        } else if ft.is_symlink() {
            // Followed only to a regular file inside the root.
            match path.canonicalize() {
                Ok(real) if real.starts_with(root) && fs::metadata(&real).is_ok_and(|m| m.is_file()) => {
                    out.push((rel, real))
                }
                _ => {
                    tracing::warn!(path = %path.display(), "static file skipped: a symlink that does not lead to a file inside the static directory")
                }
            }
        }
        // FIFOs, sockets, devices: skipped.
    }
    Ok(())
}

fn index_file(
    release_real: &Path,
    root: &Path,
    made: &Path,
    rel: &str,
    path: &Path,
    names: &std::collections::HashSet<&str>,
) -> Result<FileEntry, StaticIndexError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let content = fs::read(path).map_err(io_err(path))?;
    let size = content.len() as u64;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0);
    let digest = Sha256::digest(&content);
    let hash: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    let content_type = content_type_of(rel).to_string();
    let file_name = rel.rsplit('/').next().unwrap_or(rel);
    let compressible = is_compressible(&content_type) && size >= COMPRESS_MIN_BYTES;
    let relative = |p: &Path| p.strip_prefix(release_real).map(Path::to_path_buf).unwrap_or_else(|_| p.to_path_buf());
    let variant = |ext: &str, make: fn(&[u8]) -> io::Result<Vec<u8>>| -> Result<Option<Variant>, StaticIndexError> {
        if !compressible {
            return Ok(None);
        }
        // The build's own copy, if a regular file of the index.
        let theirs = format!("{rel}.{ext}");
        if names.contains(theirs.as_str()) {
            let p = root.join(&theirs);
            let vsize = fs::metadata(&p).map_err(io_err(&p))?.len();
            return Ok((vsize < size).then(|| Variant { path: relative(&p), size: vsize }));
        }
        let packed = make(&content).map_err(io_err(path))?;
        if (packed.len() as f64) > size as f64 * KEEP_RATIO {
            return Ok(None);
        }
        let out = made.join(format!("{rel}.{ext}"));
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::write(&out, &packed).map_err(io_err(&out))?;
        Ok(Some(Variant { path: relative(&out), size: packed.len() as u64 }))
    };
    let gzip = variant("gz", gzip)?;
    let br = variant("br", brotli)?;
    Ok(FileEntry { size, mtime, hash, content_type, immutable: is_hashed_name(file_name), gzip, br })
}

fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 3), flate2::Compression::best());
    enc.write_all(data)?;
    enc.finish()
}

fn brotli(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 3);
    let params = brotli::enc::BrotliEncoderParams { quality: 11, lgwin: 22, ..Default::default() };
    brotli::BrotliCompress(&mut &data[..], &mut out, &params)?;
    Ok(out)
}

/// Content types by extension (lowercase), `application/octet-stream`
/// otherwise.
pub fn content_type_of(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "eot" => "application/vnd.ms-fontobject",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "webmanifest" => "application/manifest+json",
        "gz" => "application/gzip",
        "br" => "application/x-brotli",
        _ => "application/octet-stream",
    }
}

fn is_compressible(content_type: &str) -> bool {
    content_type.starts_with("text/")
        || matches!(
            content_type,
            "application/json"
                | "application/xml"
                | "image/svg+xml"
                | "image/x-icon"
                | "font/ttf"
                | "font/otf"
                | "application/vnd.ms-fontobject"
                | "application/wasm"
                | "application/manifest+json"
        )
}

/// Whether a file name carries a content hash, so that its content never
/// changes under that name. The stem (the name without its extension, and
/// without a second one such as `.css.map` or `.js.gz`) ends with:
/// - Django's `ManifestStaticFilesStorage`: `.<12 lowercase hex>`;
/// - Rails (Sprockets `-<64 hex>`, Propshaft `-<40 hex>`), webpack
///   (`.<hex>`): `.` or `-` then at least 8 lowercase hex digits with a
///   digit and a letter among them;
/// - Vite/Rollup/esbuild: `-` then exactly 8 of `[A-Za-z0-9_-]` with a
///   digit and an uppercase letter among them.
///
/// Plain words (`bootstrap-datepicker.js`), versions (`jquery-3.7.1.js`),
/// dates and build numbers are not hashes. A miss only costs a shorter
/// cache lifetime; a false hit would pin a changed file in browsers for a
/// year, so the rule leans towards "not hashed".
pub fn is_hashed_name(file_name: &str) -> bool {
    let Some((stem, _ext)) = file_name.rsplit_once('.') else { return false };
    if stem_has_hash(stem) {
        return true;
    }
    match stem.rsplit_once('.') {
        Some((inner, second))
            if !second.is_empty() && second.len() <= 4 && second.bytes().all(|b| b.is_ascii_lowercase()) =>
        {
            stem_has_hash(inner)
        }
        _ => false,
    }
}

fn stem_has_hash(stem: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let has_digit = |s: &str| s.bytes().any(|b| b.is_ascii_digit());
    if let Some(pos) = stem.rfind(['.', '-']) {
        let part = &stem[pos + 1..];
        if pos > 0 && hex(part) {
            let django = part.len() == 12 && stem.as_bytes()[pos] == b'.';
            if django || (part.len() >= 8 && has_digit(part) && part.bytes().any(|b| b.is_ascii_alphabetic())) {
                return true;
            }
        }
    }
    if stem.len() > 9 {
        let (name, tail) = stem.split_at(stem.len() - 9);
        if let Some(h) = tail.strip_prefix('-') {
            if !name.is_empty()
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && has_digit(h)
                && h.bytes().any(|b| b.is_ascii_uppercase())
            {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hashed_names_of_the_usual_tools() {
        for name in [
            "main.3f2a9c1b7e4d.css", // Django manifest
            "admin.0123456789ab.js", // Django, all digits but b
            "base.abcdefabcdef.css", // Django, no digit at all
            "application-6f1d2b9c0a7e4f3d8b5a6c1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a.css", // Sprockets
            "app-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b.js", // Propshaft
            "main.8e2c41f9.js",      // webpack [contenthash:8]
            "index-BPvgi06w.js",     // Vite
            "index-D-1wXzq_.js",     // Vite, '-' and '_' in the hash
            "chunk-5GZ7NBTH.js",     // esbuild
            "main.3f2a9c1b7e4d.css.map", // a source map of a hashed file
            "main.3f2a9c1b7e4d.css.gz",
        ] {
            assert!(is_hashed_name(name), "{name}");
        }
    }

    #[test]
    fn plain_names_are_not_hashed() {
        for name in [
            "main.css",
            "robots.txt",
            "favicon.ico",
            "bootstrap-datepicker.js",
            "bootstrap-datepicker-2x.css",
            "jquery-3.7.1.min.js",
            "font-awesome-4.7.0.css",
            "app-20240101.js",
            "README",
            ".htaccess",
            "main.min.css",
            "bootstrap-DateTime.js",
            "bootstrap-Datepicker2.css",
            "main.12345678.js",
            "a-aaaaaa-0.0.css",
            "jquery.validate.unobtrusive.js",
        ] {
            assert!(!is_hashed_name(name), "{name}");
        }
    }

    proptest! {
        #[test]
        fn django_manifest_names_are_hashed(name in "[a-z][a-z_]{0,12}", hash in "[0-9a-f]{12}", ext in "(css|js|png|svg|woff2)") {
            let file = format!("{name}.{hash}.{ext}");
            prop_assert!(is_hashed_name(&file), "{}", file);
        }

        #[test]
        fn hex_fingerprints_are_hashed(name in "[a-z][a-z_-]{0,12}", hash in "[0-9][a-f][0-9a-f]{6,62}", sep in "[.-]", ext in "(css|js|css\\.map|js\\.gz)") {
            let file = format!("{name}{sep}{hash}.{ext}");
            prop_assert!(is_hashed_name(&file), "{}", file);
        }

        #[test]
        fn vite_fingerprints_are_hashed(name in "[a-z][a-z_-]{0,12}", a in "[A-Za-z0-9_-]{0,6}", ext in "(js|css)") {
            let hash = format!("{a}Z7{}", "x".repeat(6 - a.len()));
            let file = format!("{name}-{hash}.{ext}");
            prop_assert!(is_hashed_name(&file), "{}", file);
        }

        #[test]
        fn names_made_of_words_and_versions_are_not(words in prop::collection::vec("[a-z]{1,12}", 1..4), version in prop::option::of("[0-9]{1,2}\\.[0-9]{1,2}"), ext in "(css|js|png)") {
            let mut file = words.join("-");
            if let Some(v) = version { file = format!("{file}-{v}"); }
            let file = format!("{file}.{ext}");
            prop_assert!(!is_hashed_name(&file), "{}", file);
        }
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type_of("a/b.CSS"), "text/css; charset=utf-8");
        assert_eq!(content_type_of("x.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type_of("x.woff2"), "font/woff2");
        assert_eq!(content_type_of("noext"), "application/octet-stream");
        assert!(is_compressible("text/css; charset=utf-8") && !is_compressible("image/png"));
    }
}
