//! The proxy answers `[static]` URLs itself, from the static files of every
//! retained release (the first release of the list it is given that has a
//! path wins: the running one, then the newest), so that a
//! page rendered by any instance of any release finds its hashed assets,
//! during and after a rollout.
//!
//! # Shape
//! - [`StaticRelease::load`] turns a release's persisted
//!   [`StaticIndex`](crate::StaticIndex) into ready-made answers: header
//!   values computed once, and the bytes of small files (and their
//!   variants) in memory. It reads files: call it off the hot path.
//! - [`Proxy::set_static_releases`] merges the releases of a route (an
//!   app's environment) into one table and publishes it with the route
//!   table's snapshot; requests in flight keep the snapshot they started
//!   with. A request finds the table of the route its `Host` picks: one
//!   environment never answers with another's files.
//! - The request path ([`serve`]) does one prefix match per mount, a strict
//!   decode of the rest of the path, and one hash lookup; then it answers
//!   from memory, or opens the file and streams the needed bytes. It never
//!   walks the file system and never builds a path from the request: only
//!   files the index found inside a root can be answered.
//!
//! # Answers
//! - `GET`/`HEAD`; other methods `405` with `Allow: GET, HEAD`.
//! - names with a content hash: `Cache-Control: public, max-age=31536000,
//!   immutable`; others `public, max-age=60`; both with `ETag` (one per
//!   encoding) and `Last-Modified`, and `304` to `If-None-Match` (or, without
//!   it, `If-Modified-Since`).
//! - `Accept-Encoding`: br, then gzip, then identity among the encodings with
//!   the highest q-value that the file has; `Vary: Accept-Encoding` when it
//!   has a variant.
//! - one `Range` (`206`, or `416` with `Content-Range: bytes */LEN`); several
//!   ranges or an `If-Range` that does not match: the whole file (`200`).
//! - a path the index does not have: `404` with `Cache-Control: no-store`;
//!   a path that is not a plain relative path once decoded (`..`, `.`, empty
//!   segments, an encoded `/`, `\`, NUL or control characters, invalid or
//!   overlong UTF-8, a bad escape): `400`, also `no-store`.

use crate::body::ProxyBody;
use crate::server::PhaseGuard;
use crate::static_index::{FileEntry, StaticIndex, Variant};
use crate::{Inner, Proxy};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use nonstop_core::traffic::RouteKey;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

/// Files up to this size (each variant counted alone) are kept in memory.
pub const STATIC_CACHE_FILE_MAX: u64 = 1024 * 1024;
/// At most this many bytes of one release are kept in memory.
pub const STATIC_CACHE_RELEASE_MAX: u64 = 64 * 1024 * 1024;
/// Chunk size when streaming a file from disk.
const CHUNK: usize = 64 * 1024;

const IMMUTABLE: HeaderValue = HeaderValue::from_static("public, max-age=31536000, immutable");
const SHORT: HeaderValue = HeaderValue::from_static("public, max-age=60");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const VARY: HeaderValue = HeaderValue::from_static("Accept-Encoding");
const BYTES: HeaderValue = HeaderValue::from_static("bytes");
const ALLOW: HeaderValue = HeaderValue::from_static("GET, HEAD");

/// One encoding of a file, ready to answer.
struct Repr {
    path: PathBuf,
    len: u64,
    etag: HeaderValue,
    encoding: Option<HeaderValue>,
    /// The whole content, if small enough to keep.
    bytes: Option<Bytes>,
}

/// A file, ready to answer.
pub(crate) struct Asset {
    content_type: HeaderValue,
    cache_control: HeaderValue,
    last_modified: HeaderValue,
    mtime: u64,
    identity: Repr,
    gzip: Option<Repr>,
    br: Option<Repr>,
}

/// The static files of one release, loaded (see the module docs).
pub struct StaticRelease {
    /// The release's number (for logs; precedence is the order
    /// [`Proxy::set_static_releases`] is given).
    number: u64,
    mounts: Vec<(String, HashMap<String, Arc<Asset>>)>,
    files: usize,
    cached_bytes: u64,
}

impl std::fmt::Debug for StaticRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticRelease")
            .field("number", &self.number)
            .field("mounts", &self.mounts.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>())
            .field("files", &self.files)
            .field("cached_bytes", &self.cached_bytes)
            .finish()
    }
}

impl StaticRelease {
    /// Prepare the answers for `index` of the release `number` in
    /// `release_dir`. Reads the small files into memory (a file that cannot
    /// be read is served from disk).
    pub fn load(number: u64, release_dir: &Path, index: &StaticIndex) -> StaticRelease {
        let mut budget = STATIC_CACHE_RELEASE_MAX;
        let mut files = 0;
        let mut mounts = Vec::new();
        for m in &index.mounts {
            let root = release_dir.join(&m.dir);
            let mut map = HashMap::with_capacity(m.files.len());
            for (rel, entry) in &m.files {
                map.insert(rel.clone(), Arc::new(asset(release_dir, &root, rel, entry, &mut budget)));
                files += 1;
            }
            mounts.push((m.url.clone(), map));
        }
        StaticRelease { number, mounts, files, cached_bytes: STATIC_CACHE_RELEASE_MAX - budget }
    }

    /// How many files it serves.
    pub fn files(&self) -> usize {
        self.files
    }

    /// How many bytes of it are kept in memory.
    pub fn cached_bytes(&self) -> u64 {
        self.cached_bytes
    }
}

fn asset(release_dir: &Path, root: &Path, rel: &str, e: &FileEntry, budget: &mut u64) -> Asset {
    let mut load = |path: PathBuf, len: u64, etag: String, encoding: Option<&'static str>| {
        let bytes = (len <= STATIC_CACHE_FILE_MAX && len <= *budget)
            .then(|| std::fs::read(&path).ok())
            .flatten()
            .filter(|b| b.len() as u64 == len)
            .map(|b| {
                *budget -= len;
                Bytes::from(b)
            });
        Repr {
            path,
            len,
            etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"-\"")),
            encoding: encoding.map(HeaderValue::from_static),
            bytes,
        }
    };
    let variant = |v: &Variant| release_dir.join(&v.path);
    let identity = load(root.join(rel), e.size, format!("\"{}\"", e.hash), None);
    let gzip = e.gzip.as_ref().map(|v| load(variant(v), v.size, format!("\"{}-gz\"", e.hash), Some("gzip")));
    let br = e.br.as_ref().map(|v| load(variant(v), v.size, format!("\"{}-br\"", e.hash), Some("br")));
    let when = UNIX_EPOCH + Duration::from_secs(e.mtime);
    Asset {
        content_type: HeaderValue::from_str(&e.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        cache_control: if e.immutable { IMMUTABLE } else { SHORT },
        last_modified: HeaderValue::from_str(&httpdate::fmt_http_date(when)).unwrap_or(HeaderValue::from_static("")),
        mtime: e.mtime,
        identity,
        gzip,
        br,
    }
}

/// What the request path looks into for one route: every mount of its
/// releases, longest URL first.
pub(crate) struct StaticTable {
    mounts: Vec<(String, HashMap<String, Arc<Asset>>)>,
}

impl StaticTable {
    /// Merge `releases` (in precedence order: the first that has a path
    /// wins) into one table; `None` when they serve nothing.
    fn merge(releases: &[Arc<StaticRelease>]) -> Option<StaticTable> {
        let mut merged: BTreeMap<String, HashMap<String, Arc<Asset>>> = BTreeMap::new();
        for release in releases {
            for (url, files) in &release.mounts {
                let into = merged.entry(url.clone()).or_default();
                for (rel, asset) in files {
                    into.entry(rel.clone()).or_insert_with(|| Arc::clone(asset));
                }
            }
        }
        if merged.is_empty() {
            return None;
        }
        let mut mounts: Vec<_> = merged.into_iter().collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        Some(StaticTable { mounts })
    }
}

impl Proxy {
    /// Serve the static files of `releases` (one route's retained
    /// releases, in precedence order: the first that has a path wins) to
    /// the requests routed to `route` from now on, replacing its previous
    /// ones. An empty list removes them. A route's files are answered only
    /// for the hosts it claims (or as the default): an environment never
    /// serves another's assets.
    pub fn set_static_releases(&self, route: &RouteKey, releases: Vec<Arc<StaticRelease>>) {
        let table = StaticTable::merge(&releases);
        let mut reg = self.registry();
        let urls: Vec<String>;
        let files: usize;
        match table {
            Some(table) => {
                urls = table.mounts.iter().map(|(u, _)| u.clone()).collect();
                files = table.mounts.iter().map(|(_, f)| f.len()).sum();
                reg.statics.insert(route.clone(), Arc::new(table));
            }
            None => {
                urls = Vec::new();
                files = 0;
                if reg.statics.remove(route).is_none() {
                    return;
                }
            }
        }
        self.publish(&reg);
        drop(reg);
        tracing::info!(route = %route.0, ?urls, files, "static files served");
    }
}

/// Answer `req` if its path is under a static mount; otherwise hand back
/// what the caller needs to forward it.
pub(crate) async fn serve<B>(
    inner: &Inner,
    req: &Request<B>,
    request_id: HeaderValue,
    phase: PhaseGuard,
) -> Result<Response<ProxyBody>, (HeaderValue, PhaseGuard)> {
    let snapshot = inner.table.load();
    if !snapshot.any_statics {
        return Err((request_id, phase));
    }
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers().get(header::HOST).map(HeaderValue::as_bytes),
    };
    let Some((table, counters)) = snapshot.route_for(host).and_then(|r| Some((r.statics.as_ref()?, &r.counters)))
    else {
        return Err((request_id, phase));
    };
    let path = req.uri().path();
    let Some((url, files)) = table.mounts.iter().find(|(url, _)| path.starts_with(url.as_str())) else {
        return Err((request_id, phase));
    };
    counters.static_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let rest = &path[url.len()..];
    if rest.is_empty() || rest.ends_with('/') {
        // A directory: never listed.
        return Ok(plain(StatusCode::NOT_FOUND, "404 Not Found\n", phase));
    }
    let key = match decode_rest(rest) {
        Ok(key) => key,
        Err(why) => {
            tracing::info!(path, why, "static path refused");
            return Ok(plain(StatusCode::BAD_REQUEST, "400 Bad Request: invalid static file path.\n", phase));
        }
    };
    let Some(asset) = files.get(key.as_ref()).map(Arc::clone) else {
        return Ok(plain(StatusCode::NOT_FOUND, "404 Not Found\n", phase));
    };
    drop(snapshot);
    let head = req.method() == Method::HEAD;
    if !head && req.method() != Method::GET {
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n", phase);
        resp.headers_mut().insert(header::ALLOW, ALLOW);
        return Ok(resp);
    }
    Ok(answer(&asset, req.headers(), head, phase).await)
}

async fn answer(asset: &Asset, h: &HeaderMap, head: bool, phase: PhaseGuard) -> Response<ProxyBody> {
    let accept = h.get(header::ACCEPT_ENCODING).map(HeaderValue::as_bytes);
    let repr = match choose_encoding(accept, asset.gzip.is_some(), asset.br.is_some()) {
        Encoding::Br => asset.br.as_ref(),
        Encoding::Gzip => asset.gzip.as_ref(),
        Encoding::Identity => None,
    }
    .unwrap_or(&asset.identity);

    let mut resp = Response::new(ProxyBody::full(Bytes::new(), None));
    let out = resp.headers_mut();
    out.insert(header::CACHE_CONTROL, asset.cache_control.clone());
    out.insert(header::ETAG, repr.etag.clone());
    out.insert(header::LAST_MODIFIED, asset.last_modified.clone());
    if asset.gzip.is_some() || asset.br.is_some() {
        out.insert(header::VARY, VARY);
    }

    if not_modified(h, repr, asset.mtime) {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.body_mut() = ProxyBody::full(Bytes::new(), Some(phase));
        return resp;
    }
    out.insert(header::CONTENT_TYPE, asset.content_type.clone());
    out.insert(header::ACCEPT_RANGES, BYTES);
    if let Some(enc) = &repr.encoding {
        out.insert(header::CONTENT_ENCODING, enc.clone());
    }

    let range = match h.get(header::RANGE) {
        Some(r) if if_range_holds(h, repr) => parse_range(r.as_bytes(), repr.len),
        _ => RangeAnswer::Full,
    };
    let (start, len) = match range {
        RangeAnswer::Full => (0, repr.len),
        RangeAnswer::Partial { start, end } => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let value = format!("bytes {start}-{end}/{}", repr.len);
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            (start, end - start + 1)
        }
        RangeAnswer::Unsatisfiable => {
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let out = resp.headers_mut();
            out.remove(header::CONTENT_ENCODING);
            out.insert(header::CONTENT_TYPE, TEXT);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", repr.len)) {
                out.insert(header::CONTENT_RANGE, v);
            }
            out.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
            *resp.body_mut() = ProxyBody::full(Bytes::new(), Some(phase));
            return resp;
        }
    };
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if head || len == 0 {
        *resp.body_mut() = ProxyBody::full(Bytes::new(), Some(phase));
        return resp;
    }
    let body = match &repr.bytes {
        Some(bytes) => ProxyBody::full(bytes.slice(start as usize..(start + len) as usize), Some(phase)),
        None => match FileBody::open(&repr.path, start, len).await {
            Ok(file) => ProxyBody::file(file, phase),
            Err(err) => {
                tracing::warn!(path = %repr.path.display(), %err, "static file cannot be read");
                return plain(StatusCode::NOT_FOUND, "404 Not Found\n", phase);
            }
        },
    };
    *resp.body_mut() = body;
    resp
}

fn plain(status: StatusCode, body: &'static str, phase: PhaseGuard) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes()), Some(phase)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, TEXT);
    h.insert(header::CACHE_CONTROL, NO_STORE);
    resp
}

/// `If-None-Match` decides if present; otherwise `If-Modified-Since`.
fn not_modified(h: &HeaderMap, repr: &Repr, mtime: u64) -> bool {
    if let Some(inm) = h.get(header::IF_NONE_MATCH) {
        let want = strip_weak(repr.etag.as_bytes());
        return inm
            .as_bytes()
            .split(|b| *b == b',')
            .map(|t| t.trim_ascii())
            .any(|t| t == b"*" || strip_weak(t) == want);
    }
    if let Some(since) = h.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()) {
        if let Ok(since) = httpdate::parse_http_date(since) {
            let since = since.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            return mtime <= since;
        }
    }
    false
}

fn strip_weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// A `Range` applies unless `If-Range` names another representation (an
/// entity tag that is not this one's, or a date: dates are not strong
/// validators here, so the whole file is sent).
fn if_range_holds(h: &HeaderMap, repr: &Repr) -> bool {
    match h.get(header::IF_RANGE) {
        None => true,
        Some(v) => v.as_bytes() == repr.etag.as_bytes(),
    }
}

/// Content codings the proxy can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Br,
    Gzip,
    Identity,
}

/// The encoding to answer with, given `Accept-Encoding` and the variants
/// the file has: the highest q-value wins, ties go to br, then gzip, then
/// identity. `identity` is acceptable unless refused (`identity;q=0`, or
/// `*;q=0` without naming it); when nothing is acceptable the file goes
/// unencoded anyway (rather than a 406).
pub fn choose_encoding(accept: Option<&[u8]>, has_gzip: bool, has_br: bool) -> Encoding {
    let Some(accept) = accept else { return Encoding::Identity };
    let (mut br, mut gzip, mut identity, mut star) = (None, None, None, None);
    for item in accept.split(|b| *b == b',') {
        let mut parts = item.split(|b| *b == b';');
        let coding = parts.next().unwrap_or_default().trim_ascii();
        let mut q = 1000u32;
        for p in parts {
            let p = p.trim_ascii();
            if let Some(v) = p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q=")) {
                q = parse_q(v).unwrap_or(0);
            }
        }
        let slot = if coding.eq_ignore_ascii_case(b"br") {
            &mut br
        } else if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
            &mut gzip
        } else if coding.eq_ignore_ascii_case(b"identity") {
            &mut identity
        } else if coding == b"*" {
            &mut star
        } else {
            continue;
        };
        *slot = Some(q);
    }
    let br = if has_br { br.or(star).unwrap_or(0) } else { 0 };
    let gzip = if has_gzip { gzip.or(star).unwrap_or(0) } else { 0 };
    let identity = identity.or(star.filter(|q| *q == 0)).unwrap_or(1);
    if br > 0 && br >= gzip && br >= identity {
        Encoding::Br
    } else if gzip > 0 && gzip >= identity {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// A q-value in thousandths (`0.5` → 500); `None` if malformed.
fn parse_q(v: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u32 = match int {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    let frac: u32 = format!("{frac:0<3}").parse().ok()?;
    let q = int * 1000 + frac;
    (q <= 1000).then_some(q)
}

/// How to answer a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable range (malformed, several ranges, not bytes): `200`.
    Full,
    /// `206` with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// `416`.
    Unsatisfiable,
}

/// One `bytes=` range of a representation of `len` bytes.
pub fn parse_range(value: &[u8], len: u64) -> RangeAnswer {
    let Ok(value) = std::str::from_utf8(value) else { return RangeAnswer::Full };
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeAnswer::Full };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeAnswer::Full };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (a.trim(), b.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial { start: len.saturating_sub(n), end: len - 1 },
            None => RangeAnswer::Full,
        },
        (start, "") => match num(start) {
            Some(s) if s < len => RangeAnswer::Partial { start: s, end: len - 1 },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (start, end) => match (num(start), num(end)) {
            (Some(s), Some(e)) if s > e => RangeAnswer::Full,
            (Some(s), Some(_)) if s >= len => RangeAnswer::Unsatisfiable,
            (Some(s), Some(e)) => RangeAnswer::Partial { start: s, end: e.min(len - 1) },
            _ => RangeAnswer::Full,
        },
    }
}

/// The part of a request path after the mount's URL, as an index key: a
/// plain relative path. Refuses (with why) bad escapes, an encoded `/`,
/// `\`, NUL and control characters, invalid UTF-8 (overlong forms such
/// as `%c0%ae` included), and empty, `.` and `..` segments.
pub fn decode_rest(raw: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    let bytes = raw.as_bytes();
    let plain = !bytes.contains(&b'%');
    if plain {
        // The common case: nothing to decode, nothing to allocate.
        if bytes.iter().any(|&b| b == b'\\' || b < 0x20 || b == 0x7f) {
            return Err("a backslash, NUL or control character");
        }
        if raw.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
            return Err("an empty, '.' or '..' segment");
        }
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let decoded = if b == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
            else {
                return Err("a bad percent escape");
            };
            i += 3;
            let d = (h * 16 + l) as u8;
            if d == b'/' {
                return Err("an encoded '/'");
            }
            d
        } else {
            i += 1;
            b
        };
        if decoded == b'\\' {
            return Err("a backslash");
        }
        if decoded < 0x20 || decoded == 0x7f {
            return Err("a NUL or control character");
        }
        out.push(decoded);
    }
    let text = String::from_utf8(out).map_err(|_| "invalid or overlong UTF-8")?;
    if text.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err("an empty, '.' or '..' segment");
    }
    Ok(std::borrow::Cow::Owned(text))
}

/// A file's bytes `start..start+len`, read in chunks as the client takes
/// them.
pub(crate) struct FileBody {
    file: tokio::fs::File,
    left: u64,
    buf: BytesMut,
}

impl FileBody {
    async fn open(path: &Path, start: u64, len: u64) -> std::io::Result<FileBody> {
        use tokio::io::AsyncSeekExt;
        let mut file = tokio::fs::File::open(path).await?;
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start)).await?;
        }
        Ok(FileBody { file, left: len, buf: BytesMut::new() })
    }

    pub(crate) fn left(&self) -> u64 {
        self.left
    }

    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Bytes>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let want = (self.left as usize).min(CHUNK);
        if self.buf.capacity() < want {
            self.buf.reserve(want);
        }
        let mut limited = tokio::io::AsyncReadExt::take(&mut self.file, want as u64);
        match tokio_util::io::poll_read_buf(Pin::new(&mut limited), cx, &mut self.buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(0)) => Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "static file shorter than its index says",
            )))),
            Poll::Ready(Ok(n)) => {
                self.left -= n as u64;
                Poll::Ready(Some(Ok(self.buf.split().freeze())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodings_by_preference_and_q_values() {
        let c = |h: &str, gz, br| choose_encoding(Some(h.as_bytes()), gz, br);
        assert_eq!(choose_encoding(None, true, true), Encoding::Identity);
        assert_eq!(c("gzip, deflate, br, zstd", true, true), Encoding::Br);
        assert_eq!(c("gzip, deflate, br", true, false), Encoding::Gzip);
        assert_eq!(c("gzip, br", false, false), Encoding::Identity);
        assert_eq!(c("br;q=0.5, gzip", true, true), Encoding::Gzip);
        assert_eq!(c("br;q=0, gzip;q=0", true, true), Encoding::Identity);
        assert_eq!(c("*", true, true), Encoding::Br);
        assert_eq!(c("*;q=0.5, identity", true, true), Encoding::Identity);
        assert_eq!(c("identity;q=0, gzip;q=0.1", true, true), Encoding::Gzip);
        assert_eq!(c("BR;Q=1.0", true, true), Encoding::Br);
        assert_eq!(c("br;q=2", true, true), Encoding::Identity);
        assert_eq!(c("deflate", true, true), Encoding::Identity);
    }

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        let r = |h: &str, len| parse_range(h.as_bytes(), len);
        assert_eq!(r("bytes=0-9", 100), Partial { start: 0, end: 9 });
        assert_eq!(r("bytes=90-", 100), Partial { start: 90, end: 99 });
        assert_eq!(r("bytes=-10", 100), Partial { start: 90, end: 99 });
        assert_eq!(r("bytes=-1000", 100), Partial { start: 0, end: 99 });
        assert_eq!(r("bytes=50-1000", 100), Partial { start: 50, end: 99 });
        assert_eq!(r("bytes=100-", 100), Unsatisfiable);
        assert_eq!(r("bytes=-0", 100), Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6", 100), Full);
        assert_eq!(r("bytes=9-1", 100), Full);
        assert_eq!(r("items=0-1", 100), Full);
        assert_eq!(r("bytes=a-b", 100), Full);
    }

    #[test]
    fn decoded_paths() {
        assert_eq!(decode_rest("css/main.abc.css").unwrap(), "css/main.abc.css");
        assert_eq!(decode_rest("a%20b.css").unwrap(), "a b.css");
        assert_eq!(decode_rest("caf%C3%A9.png").unwrap(), "café.png");
        for bad in [
            "../secret",
            "a/../../secret",
            "%2e%2e/secret",
            "%2E%2E%2Fsecret",
            "a%2fb",
            "a%5cb",
            "a\\b",
            "%00",
            "a%0a",
            "%c0%ae%c0%ae/secret",
            "%e0%80%ae",
            "%zz",
            "%4",
            "a//b",
            "./a",
            "",
        ] {
            assert!(decode_rest(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// Whatever is accepted is a plain relative path.
        #[test]
        fn accepted_paths_are_plain(raw in "[a-zA-Z0-9./%\\\\_-]{0,24}") {
            if let Ok(key) = decode_rest(&raw) {
                let p = std::path::Path::new(key.as_ref());
                prop_assert!(p.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{}", key);
                prop_assert!(!key.contains('\\') && !key.contains('\0'));
            }
        }

        #[test]
        fn a_satisfiable_range_stays_inside(len in 1u64..10_000, a in 0u64..20_000, b in 0u64..20_000) {
            if let RangeAnswer::Partial { start, end } = parse_range(format!("bytes={a}-{b}").as_bytes(), len) {
                prop_assert!(start <= end && end < len);
            }
        }
    }
}
