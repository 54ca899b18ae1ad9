//! `[static]` files answered by the proxy itself: real files indexed the
//! way a deploy does it, served through a real listener, read back over raw
//! sockets (so that hostile targets reach the proxy as written).

mod common;

use common::*;
use nonstop_core::process::StaticMount;
use nonstop_proxy::{StaticIndex, StaticRelease, STATIC_CACHE_FILE_MAX, STATIC_INDEX_DIR};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CSS: &str = "css/main.0123456789ab.css";

fn mounts() -> Vec<StaticMount> {
    vec![StaticMount { url: "/static/".into(), dir: PathBuf::from("staticfiles") }]
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Compressible text of about `len` bytes.
fn text_of(len: usize, seed: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("/* {seed} */ .rule-{i} {{ color: #{:06x}; margin: {}px; }}\n", i * 7919 % 0xffffff, i % 17)
                .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// Bytes that do not compress.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A release directory as a build leaves it, plus things that must never
/// be served: a secret beside the static root, a symlink out, a FIFO.
fn release(root: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = root.join(name);
    let statics = dir.join("staticfiles");
    for (rel, bytes) in files {
        write(&statics.join(rel), bytes);
    }
    write(&dir.join("settings.py"), b"SECRET_KEY = 'do-not-serve'\n");
    std::os::unix::fs::symlink("../settings.py", statics.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", statics.join("passwd")).unwrap();
    std::os::unix::fs::symlink(CSS, statics.join("alias.css")).unwrap_or(());
    let fifo = statics.join("pipe.css");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
    assert!(status.success(), "mkfifo {}", fifo.display());
    dir
}

fn load(order: u64, dir: &Path) -> Arc<StaticRelease> {
    let index = StaticIndex::load_or_build(dir, &mounts()).unwrap();
    Arc::new(StaticRelease::load(order, dir, &index))
}

struct Site {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    running: Running,
    css: Vec<u8>,
    js: Vec<u8>,
    big: Vec<u8>,
}

async fn site() -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let css = text_of(1500, "v1");
    let js = text_of(100 * 1024, "app");
    let big = noise(STATIC_CACHE_FILE_MAX as usize + 300_000);
    let dir = release(
        tmp.path(),
        "v1",
        &[
            (CSS, css.clone()),
            ("app.js", js.clone()),
            ("robots.txt", b"User-agent: *\n".to_vec()),
            ("media/big.bin", big.clone()),
            ("caf\u{e9}.txt", b"accent".to_vec()),
        ],
    );
    let running = Running::start(config()).await;
    // Static files belong to a route: the one every host goes to here.
    running.proxy.set_default_route(route());
    running.proxy.set_static_releases(&route(), vec![load(1, &dir)]);
    Site { _tmp: tmp, dir, running, css, js, big }
}

async fn raw(addr: SocketAddr, head: &str) -> RawReply {
    let (reply, _, _) = raw_request(addr, head.as_bytes()).await;
    reply.expect("a response")
}

async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> RawReply {
    raw(addr, &format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n{headers}Connection: close\r\n\r\n")).await
}

#[tokio::test]
async fn hashed_and_plain_names_get_their_cache_headers() {
    let s = site().await;
    let r = get_with(s.running.addr, "/static/css/main.0123456789ab.css", "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("cache-control").as_deref(), Some("public, max-age=31536000, immutable"));
    assert_eq!(r.header("content-type").as_deref(), Some("text/css; charset=utf-8"));
    assert_eq!(r.header("content-length"), Some(s.css.len().to_string()));
    assert!(r.header("etag").is_some_and(|e| e.starts_with('"')), "{}", r.head);
    assert!(r.header("content-encoding").is_none());
    assert_eq!(r.body, s.css);

    let r = get_with(s.running.addr, "/static/robots.txt?v=3", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control").as_deref(), Some("public, max-age=60"));
    assert!(r.header("last-modified").is_some() && r.header("etag").is_some(), "{}", r.head);
    assert_eq!(r.body, b"User-agent: *\n");

    // A percent-encoded name is decoded before the lookup.
    let r = get_with(s.running.addr, "/static/caf%C3%A9.txt", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"accent"[..]), "{}", r.head);
    // A symlink inside the root is followed.
    let r = get_with(s.running.addr, "/static/alias.css", "").await;
    assert_eq!((r.status, &r.body), (200, &s.css));
    s.running.stop().await;
}

#[tokio::test]
async fn conditional_requests_answer_304() {
    let s = site().await;
    let addr = s.running.addr;
    let first = get_with(addr, "/static/robots.txt", "").await;
    let etag = first.header("etag").unwrap();
    let modified = first.header("last-modified").unwrap();

    let r = get_with(addr, "/static/robots.txt", &format!("If-None-Match: \"nope\", {etag}\r\n")).await;
    assert_eq!(r.status, 304, "{}", r.head);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.clone()));
    assert_eq!(r.header("cache-control").as_deref(), Some("public, max-age=60"));
    assert_eq!(get_with(addr, "/static/robots.txt", &format!("If-None-Match: W/{etag}\r\n")).await.status, 304);
    assert_eq!(get_with(addr, "/static/robots.txt", "If-None-Match: *\r\n").await.status, 304);
    assert_eq!(get_with(addr, "/static/robots.txt", "If-None-Match: \"other\"\r\n").await.status, 200);

    assert_eq!(get_with(addr, "/static/robots.txt", &format!("If-Modified-Since: {modified}\r\n")).await.status, 304);
    let r = get_with(addr, "/static/robots.txt", "If-Modified-Since: Thu, 01 Jan 1970 00:00:01 GMT\r\n").await;
    assert_eq!(r.status, 200);
    // If-None-Match decides when both are there.
    let r =
        get_with(addr, "/static/robots.txt", &format!("If-None-Match: \"other\"\r\nIf-Modified-Since: {modified}\r\n"))
            .await;
    assert_eq!(r.status, 200);
    s.running.stop().await;
}

#[tokio::test]
async fn brotli_gzip_or_identity_by_accept_encoding() {
    let s = site().await;
    let addr = s.running.addr;
    // Variants were made once, inside the release.
    assert!(s.dir.join(STATIC_INDEX_DIR).join("0/app.js.br").is_file());
    assert!(s.dir.join(STATIC_INDEX_DIR).join("0/app.js.gz").is_file());
    assert!(!s.dir.join(STATIC_INDEX_DIR).join("0/robots.txt.gz").exists(), "too small to compress");

    let r = get_with(addr, "/static/app.js", "Accept-Encoding: gzip, deflate, br\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding").as_deref(), Some("br"));
    assert_eq!(r.header("vary").as_deref(), Some("Accept-Encoding"));
    assert!(r.body.len() < s.js.len() / 4, "br body {} bytes", r.body.len());
    let mut plain = Vec::new();
    brotli::Decompressor::new(r.body.as_slice(), 4096).read_to_end(&mut plain).unwrap();
    assert_eq!(plain, s.js);
    let br_tag = r.header("etag").unwrap();

    let r = get_with(addr, "/static/app.js", "Accept-Encoding: gzip, br;q=0.5\r\n").await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(r.body.as_slice()).read_to_end(&mut plain).unwrap();
    assert_eq!(plain, s.js);
    assert_ne!(r.header("etag").unwrap(), br_tag, "each encoding has its own ETag");

    let r = get_with(addr, "/static/app.js", "").await;
    assert!(r.header("content-encoding").is_none());
    assert_eq!(r.header("vary").as_deref(), Some("Accept-Encoding"));
    assert_eq!(r.body, s.js);
    let r = get_with(addr, "/static/app.js", "Accept-Encoding: br;q=0, gzip;q=0\r\n").await;
    assert!(r.header("content-encoding").is_none());
    // A file without variants has no Vary.
    let r = get_with(addr, "/static/robots.txt", "Accept-Encoding: br\r\n").await;
    assert!(r.header("content-encoding").is_none() && r.header("vary").is_none(), "{}", r.head);
    // 304 for the br representation's tag.
    let r = get_with(addr, "/static/app.js", &format!("Accept-Encoding: br\r\nIf-None-Match: {br_tag}\r\n")).await;
    assert_eq!(r.status, 304);
    s.running.stop().await;
}

#[tokio::test]
async fn head_and_ranges() {
    let s = site().await;
    let addr = s.running.addr;
    let mut conn = connect_own_port(addr).await;
    tokio::io::AsyncWriteExt::write_all(&mut conn, b"HEAD /static/app.js HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let r = read_head_response(&mut conn).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(s.js.len().to_string()));
    assert!(r.body.is_empty());
    // The connection is still usable: the HEAD answer had no body.
    tokio::io::AsyncWriteExt::write_all(&mut conn, b"GET /static/robots.txt HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut conn).await.unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"User-agent: *\n"[..]));

    let r = get_with(addr, "/static/app.js", "Range: bytes=10-19\r\n").await;
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(r.header("content-range"), Some(format!("bytes 10-19/{}", s.js.len())));
    assert_eq!(r.body, &s.js[10..20]);
    let r = get_with(addr, "/static/app.js", "Range: bytes=-5\r\n").await;
    assert_eq!((r.status, r.body.as_slice()), (206, &s.js[s.js.len() - 5..]));
    let r = get_with(addr, "/static/app.js", "Range: bytes=999999-\r\n").await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some(format!("bytes */{}", s.js.len())));
    let r = get_with(addr, "/static/app.js", "Range: bytes=0-1, 5-6\r\n").await;
    assert_eq!((r.status, r.body.len()), (200, s.js.len()));
    let r = get_with(addr, "/static/app.js", "Range: bytes=0-1\r\nIf-Range: \"stale\"\r\n").await;
    assert_eq!(r.status, 200);

    // A file too large for the memory cache is streamed from disk, whole
    // or in part.
    let r = get_with(addr, "/static/media/big.bin", "").await;
    assert_eq!(r.status, 200);
    assert!(r.body == s.big, "big file differs ({} bytes of {})", r.body.len(), s.big.len());
    let r = get_with(addr, "/static/media/big.bin", "Range: bytes=1048000-1048999\r\n").await;
    assert_eq!(r.status, 206);
    assert!(r.body == s.big[1_048_000..1_049_000]);
    s.running.stop().await;
}

#[tokio::test]
async fn misses_are_404_no_store_and_other_methods_405() {
    let s = site().await;
    let addr = s.running.addr;
    for path in ["/static/css/main.ffffffffffff.css", "/static/", "/static/css", "/static/css/", "/static/pipe.css"] {
        let r = get_with(addr, path, "").await;
        assert_eq!(r.status, 404, "{path}: {}", r.head);
        assert_eq!(r.header("cache-control").as_deref(), Some("no-store"), "{path}");
    }
    let r =
        raw(addr, "POST /static/app.js HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("GET, HEAD"));
    s.running.stop().await;
}

#[tokio::test]
async fn no_request_reaches_a_file_outside_the_static_root() {
    let s = site().await;
    let addr = s.running.addr;
    for path in [
        "/static/../settings.py",
        "/static/css/../../settings.py",
        "/static/%2e%2e/settings.py",
        "/static/%2E%2E%2Fsettings.py",
        "/static/.%2e/settings.py",
        "/static/css%2f..%2f..%2fsettings.py",
        "/static/..%5csettings.py",
        "/static/..\\settings.py",
        "/static/%00../settings.py",
        "/static/robots.txt%00.css",
        "/static/%c0%ae%c0%ae/settings.py",
        "/static/%c0%af../settings.py",
        "/static/%e0%80%ae%e0%80%ae/settings.py",
        "/static//etc/passwd",
        "/static/./robots.txt",
        "/static/leak.txt",
        "/static/passwd",
        "/static/.nonstop-static/index.json",
        "/static/%zz",
    ] {
        let r = get_with(addr, path, "").await;
        assert!(r.status == 400 || r.status == 404, "{path}: {}", r.head);
        assert_eq!(r.header("cache-control").as_deref(), Some("no-store"), "{path}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(!body.contains("SECRET_KEY") && !body.contains("root:"), "{path} leaked: {body}");
    }
    s.running.stop().await;
}

#[tokio::test]
async fn other_paths_still_reach_the_app_and_without_static_nothing_changes() {
    let up = Upstream::start("web").await;
    let running = Running::serving(&[up.addr]).await;
    // No [static]: /static/ is the app's (WhiteNoise).
    let r = get_with(running.addr, "/static/app.js", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"web"[..]));

    let tmp = tempfile::tempdir().unwrap();
    let dir = release(tmp.path(), "v1", &[("app.js", b"static".to_vec())]);
    running.proxy.set_static_releases(&route(), vec![load(1, &dir)]);
    let r = get_with(running.addr, "/static/app.js", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"static"[..]));
    for path in ["/", "/staticx/app.js", "/static", "/admin/static/app.js"] {
        let r = get_with(running.addr, path, "").await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"web"[..]), "{path}");
    }
    // Removing the group gives /static/ back to the app.
    running.proxy.set_static_releases(&route(), vec![]);
    let r = get_with(running.addr, "/static/app.js", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"web"[..]));
    running.stop().await;
    drop(up);
}

#[tokio::test]
async fn every_retained_release_is_served_and_the_first_given_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let old = release(
        tmp.path(),
        "v1",
        &[("css/main.111111111111.css", b"old css".to_vec()), ("robots.txt", b"old robots".to_vec())],
    );
    let new = release(
        tmp.path(),
        "v2",
        &[("css/main.222222222222.css", b"new css".to_vec()), ("robots.txt", b"new robots".to_vec())],
    );
    let running = Running::start(config()).await;
    // Static files belong to a route: the one every host goes to here.
    running.proxy.set_default_route(route());
    let addr = running.addr;
    let (v1, v2) = (load(1, &old), load(2, &new));
    // v2 runs: given first, it wins a name both have.
    running.proxy.set_static_releases(&route(), vec![Arc::clone(&v2), Arc::clone(&v1)]);
    let r = get_with(addr, "/static/css/main.111111111111.css", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"old css"[..]));
    let r = get_with(addr, "/static/css/main.222222222222.css", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"new css"[..]));
    let r = get_with(addr, "/static/robots.txt", "").await;
    assert_eq!(r.body, b"new robots");

    // Rolled back to v1: given first, v1 wins although v2 is newer, and
    // v2's hashed files are still served.
    running.proxy.set_static_releases(&route(), vec![Arc::clone(&v1), Arc::clone(&v2)]);
    let r = get_with(addr, "/static/robots.txt", "").await;
    assert_eq!(r.body, b"old robots");
    let r = get_with(addr, "/static/css/main.222222222222.css", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"new css"[..]));

    // v1 pruned: its assets go with it.
    running.proxy.set_static_releases(&route(), vec![v2]);
    let r = get_with(addr, "/static/css/main.111111111111.css", "").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let r = get_with(addr, "/static/css/main.222222222222.css", "").await;
    assert_eq!(r.status, 200);
    running.stop().await;
}

#[test]
fn the_index_is_persisted_and_reloaded_without_walking_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = release(tmp.path(), "v1", &[(CSS, text_of(3000, "x")), ("a/b/c.txt", b"c".to_vec())]);
    let built = StaticIndex::load_or_build(&dir, &mounts()).unwrap();
    let files: Vec<&str> = built.mounts[0].files.keys().map(String::as_str).collect();
    assert_eq!(files, ["a/b/c.txt", "alias.css", CSS], "symlinks out, FIFOs and the index itself are not indexed");
    assert!(built.mounts[0].files[CSS].immutable && !built.mounts[0].files["a/b/c.txt"].immutable);
    // A new file after indexing is not picked up: the persisted index is
    // what is served (releases are immutable once built).
    write(&dir.join("staticfiles/late.txt"), b"late");
    assert_eq!(StaticIndex::load_or_build(&dir, &mounts()).unwrap(), built);
    // Other mounts: indexed again.
    let other = vec![StaticMount { url: "/assets/".into(), dir: PathBuf::from("staticfiles") }];
    assert!(StaticIndex::load_or_build(&dir, &other).unwrap().mounts[0].files.contains_key("late.txt"));
}

#[test]
fn reuses_the_builds_own_compressed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let css = text_of(4000, "w");
    let mut gz = Vec::new();
    std::io::Write::write_all(&mut flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast()), &css).unwrap();
    let dir = release(tmp.path(), "v1", &[("site.css", css), ("site.css.gz", gz.clone())]);
    let index = StaticIndex::load_or_build(&dir, &mounts()).unwrap();
    let entry = &index.mounts[0].files["site.css"];
    assert_eq!(entry.gzip.as_ref().unwrap().path, PathBuf::from("staticfiles/site.css.gz"));
    assert_eq!(entry.gzip.as_ref().unwrap().size, gz.len() as u64);
    assert!(entry.br.as_ref().unwrap().path.starts_with(STATIC_INDEX_DIR));
}

#[test]
fn a_missing_or_escaping_static_dir_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    std::fs::create_dir_all(&dir).unwrap();
    let err = StaticIndex::load_or_build(&dir, &mounts()).unwrap_err().to_string();
    assert!(err.contains("`staticfiles`") && err.contains("\"/static/\"") && err.contains("collectstatic"), "{err}");
    std::os::unix::fs::symlink("/etc", dir.join("staticfiles")).unwrap();
    let err = StaticIndex::load_or_build(&dir, &mounts()).unwrap_err().to_string();
    assert!(err.contains("not a directory inside the release"), "{err}");
}

#[test]
fn a_read_only_release_gets_its_index_and_stays_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = release(tmp.path(), "v1", &[("app.js", text_of(5000, "ro"))]);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let index = StaticIndex::load_or_build(&dir, &mounts()).unwrap();
    assert!(index.mounts[0].files["app.js"].br.is_some());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o555, "the release's mode is restored");
    let made = dir.join(STATIC_INDEX_DIR);
    assert_eq!(mode(&made) & 0o222, 0, "the index directory is read-only");
    assert_eq!(mode(&made.join("index.json")) & 0o222, 0);
    assert_eq!(mode(&made.join("0/app.js.br")) & 0o222, 0);
    // Loaded again without writing.
    assert_eq!(StaticIndex::load_or_build(&dir, &mounts()).unwrap(), index);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::process::Command::new("chmod").args(["-R", "u+w"]).arg(&dir).status();
}
