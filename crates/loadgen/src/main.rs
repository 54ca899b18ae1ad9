//! `nonstop-loadgen`: a closed-loop HTTP/1.1 load generator for nonstop's
//! benchmarks (`bench/zero-downtime`).
//!
//! N connections, each with at most one request in flight, send a weighted
//! mix of requests (`get=/:6,post=/notes/:3,static=AUTO:1`) over keep-alive
//! connections until a duration has passed or a stop file appears. Every
//! request is recorded (start time, latency, kind, outcome, status or error,
//! the id a POST wrote) into `--out` (CSV, or NDJSON if the name ends in
//! `.ndjson`/`.jsonl`), and one JSON summary line is printed at the end.
//!
//! With `--assets /static/`, every 2xx `get` is followed, on the same
//! connection, by a GET of each `href="/static/..."` and `src="/static/..."`
//! the page references (kind `asset`), then of one asset that an earlier
//! page referenced and this one does not: another release's (kind
//! `asset_prev`). Assets are recorded with their path, and summed apart
//! from the pages (`assets` in the summary): the top-level counts and
//! percentiles are those of the mix's requests alone, comparable with a run
//! without `--assets`.
//!
//! Outcomes: `ok` (2xx), `non_2xx` (any other HTTP status), `failed` (no
//! HTTP response: connect error, reset or close after the request was sent,
//! timeout, broken body). A keep-alive connection that the server closed
//! cleanly between two requests is not a failure: the next request opens a
//! new connection (only requests that hyper hands back unsent are retried).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(name = "nonstop-loadgen", about = "Closed-loop HTTP/1.1 load with every request recorded")]
struct Args {
    /// Base URL, e.g. http://127.0.0.1:8080 (plain HTTP only).
    #[arg(long)]
    url: String,
    /// Concurrent keep-alive connections (one request in flight on each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop when this file exists (checked every 50 ms).
    #[arg(long)]
    until_file: Option<PathBuf>,
    /// Weighted mix KIND=PATH:WEIGHT,...; KIND is get, post (form body
    /// `text=...`, records the JSON `id`) or static (GET; PATH `AUTO` means
    /// the first /static/...css URL found in the page at `/`).
    #[arg(long, default_value = "get=/:1")]
    mix: String,
    /// The static path to use when AUTO finds none in the page.
    #[arg(long)]
    static_fallback: Option<String>,
    /// After each 2xx `get`, fetch every asset under this URL prefix that
    /// the page references (`href="PREFIX..."`, `src="PREFIX..."`), then one
    /// asset an earlier page referenced and this one does not, e.g. /static/.
    #[arg(long, value_name = "PREFIX")]
    assets: Option<String>,
    /// Where every request is written (CSV; NDJSON if it ends in .ndjson or .jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A request without a complete response after this many seconds failed.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Pace the load to about this many requests per second in all (each
    /// connection waits for its turn; still never more than one in flight).
    #[arg(long)]
    rate: Option<f64>,
    /// Written (with the run's start as Unix ms) once the load has started.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Get,
    Post,
    Static,
    /// An asset the page just fetched references (`--assets`).
    Asset,
    /// An asset an earlier page referenced and this one does not (`--assets`).
    AssetPrev,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Get => "get",
            Kind::Post => "post",
            Kind::Static => "static",
            Kind::Asset => "asset",
            Kind::AssetPrev => "asset_prev",
        }
    }

    fn is_asset(self) -> bool {
        matches!(self, Kind::Asset | Kind::AssetPrev)
    }
}

#[derive(Clone, Debug)]
struct MixEntry {
    kind: Kind,
    path: String,
    weight: u32,
}

fn parse_mix(s: &str) -> anyhow::Result<Vec<MixEntry>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, rest) =
            part.split_once('=').with_context(|| format!("mix entry `{part}`: expected KIND=PATH:WEIGHT"))?;
        let (path, weight) = match rest.rsplit_once(':') {
            Some((p, w)) if w.chars().all(|c| c.is_ascii_digit()) && !w.is_empty() => (p, w.parse::<u32>()?),
            _ => (rest, 1),
        };
        let kind = match kind.trim() {
            "get" => Kind::Get,
            "post" => Kind::Post,
            "static" => Kind::Static,
            k => bail!("mix entry `{part}`: unknown kind `{k}` (get, post, static)"),
        };
        if path != "AUTO" && !path.starts_with('/') {
            bail!("mix entry `{part}`: the path must start with `/` (or be AUTO)");
        }
        if weight > 0 {
            out.push(MixEntry { kind, path: path.to_string(), weight });
        }
    }
    if out.is_empty() {
        bail!("the mix is empty");
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Non2xx,
    Failed,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Non2xx => "non_2xx",
            Outcome::Failed => "failed",
        }
    }
}

struct Record {
    start_us: u64,
    latency_us: u64,
    kind: Kind,
    outcome: Outcome,
    status: u16,
    error: Option<String>,
    id: Option<i64>,
    conn: usize,
    /// The URL of an asset request.
    path: Option<String>,
}

struct Target {
    host: String,
    port: u16,
    authority: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let uri: Uri = url.parse().with_context(|| format!("`{url}` is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("`{url}`: only http:// URLs are supported");
    }
    let auth = uri.authority().with_context(|| format!("`{url}` has no host"))?;
    Ok(Target {
        host: auth.host().trim_matches(['[', ']']).to_string(),
        port: auth.port_u16().unwrap_or(80),
        authority: auth.to_string(),
    })
}

/// One client connection: reconnects when the server closed it between requests.
struct Conn {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
    connects: u64,
}

enum ReqError {
    /// No HTTP response; the request may have reached the server.
    Failed(String),
}

impl Conn {
    fn new(target: Arc<Target>) -> Self {
        Self { target, sender: None, connects: 0 }
    }

    async fn connect(&mut self) -> Result<(), String> {
        let stream = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        self.connects += 1;
        Ok(())
    }

    /// Send one request; a request hyper hands back unsent (the connection
    /// was closed between requests) goes out again on a new connection.
    async fn send(&mut self, build: &(dyn Fn() -> Request<Full<Bytes>> + Sync)) -> Result<(u16, Bytes), ReqError> {
        let mut req = build();
        for _attempt in 0..3 {
            // A connection the server closed (e.g. `Connection: close`) is replaced before sending.
            let usable = match self.sender.as_mut() {
                Some(s) if !s.is_closed() => s.ready().await.is_ok(),
                _ => false,
            };
            if !usable {
                self.sender = None;
                self.connect().await.map_err(ReqError::Failed)?;
            }
            let sender = self.sender.as_mut().expect("connected");
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.map_err(|e| {
                        self.sender = None;
                        ReqError::Failed(format!("body: {}", err_chain(&e)))
                    })?;
                    return Ok((status, body.to_bytes()));
                }
                Err(mut e) => {
                    self.sender = None;
                    match e.take_message() {
                        // Never written: the connection closed before it could be sent.
                        Some(unsent) => req = unsent,
                        None => return Err(ReqError::Failed(err_chain(e.error()))),
                    }
                }
            }
        }
        Err(ReqError::Failed("connection closed before the request could be sent, 3 times".into()))
    }
}

fn err_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The first `/static/...css` URL in a page.
fn find_static_css(page: &str) -> Option<String> {
    let mut rest = page;
    while let Some(i) = rest.find("/static/") {
        let cand = &rest[i..];
        let end = cand
            .find(|c: char| c == '"' || c == '\'' || c == '<' || c == '>' || c.is_whitespace() || c == ')')
            .unwrap_or(cand.len());
        let url = &cand[..end];
        let path_only = url.split(['?', '#']).next().unwrap_or(url);
        if path_only.ends_with(".css") {
            return Some(url.to_string());
        }
        rest = &cand["/static/".len()..];
    }
    None
}

/// Every `href="PREFIX..."` and `src="PREFIX..."` of a page (either
/// quote), without repeats.
fn asset_refs(page: &str, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for attr in ["href=", "src="] {
        for quote in ['"', '\''] {
            let pattern = format!("{attr}{quote}{prefix}");
            let mut rest = page;
            while let Some(i) = rest.find(&pattern) {
                let url = &rest[i + attr.len() + 1..];
                let end = url.find(quote).unwrap_or(url.len());
                if !out.iter().any(|u| u == &url[..end]) {
                    out.push(url[..end].to_string());
                }
                rest = &url[end..];
            }
        }
    }
    out
}

/// Every asset URL any page referenced, in the order first seen, shared by
/// all connections (`--assets`).
#[derive(Default)]
struct SeenAssets {
    list: Vec<String>,
    set: std::collections::HashSet<String>,
}

impl SeenAssets {
    fn add(&mut self, refs: &[String]) {
        for r in refs {
            if self.set.insert(r.clone()) {
                self.list.push(r.clone());
            }
        }
    }

    /// A seen asset not in `refs`, the `turn`-th such one in round robin.
    fn other_than(&self, refs: &[String], turn: usize) -> Option<String> {
        let others: Vec<&String> = self.list.iter().filter(|u| !refs.contains(u)).collect();
        (!others.is_empty()).then(|| others[turn % others.len()].clone())
    }
}

fn build_request(target: &Target, kind: Kind, path: &str, body: Option<String>) -> Request<Full<Bytes>> {
    let method = if kind == Kind::Post { Method::POST } else { Method::GET };
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, &target.authority)
        .header(header::USER_AGENT, "nonstop-loadgen");
    let body = match body {
        Some(text) => {
            b = b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            Full::new(Bytes::from(text))
        }
        None => Full::new(Bytes::new()),
    };
    b.body(body).expect("valid request")
}

fn post_id(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(body).ok()?.get("id")?.as_i64()
}

/// When connection `conn_idx` of `connections`, paced at one request per
/// `interval` each, takes its first turn: spread evenly over one interval.
fn first_turn(interval: Duration, conn_idx: usize, connections: usize) -> Duration {
    interval.mul_f64(conn_idx as f64 / connections.max(1) as f64)
}

struct Shared {
    stop: AtomicBool,
    started: Instant,
    timeout: Duration,
    interval: Option<Duration>,
    connections: usize,
    seq: AtomicU64,
    /// `--assets`: the URL prefix, and every asset seen so far.
    assets: Option<(String, std::sync::Mutex<SeenAssets>)>,
}

/// One request, timed and recorded.
async fn timed(
    shared: &Shared,
    conn: &mut Conn,
    conn_idx: usize,
    kind: Kind,
    build: &(dyn Fn() -> Request<Full<Bytes>> + Sync),
) -> (Record, Option<Bytes>) {
    let t0 = Instant::now();
    let res = tokio::time::timeout(shared.timeout, conn.send(build)).await;
    let latency_us = t0.elapsed().as_micros() as u64;
    let start_us = t0.duration_since(shared.started).as_micros() as u64;
    let mut rec = Record {
        start_us,
        latency_us,
        kind,
        outcome: Outcome::Failed,
        status: 0,
        error: None,
        id: None,
        conn: conn_idx,
        path: None,
    };
    let mut ok_body = None;
    match res {
        Err(_) => {
            conn.sender = None; // the connection may still deliver a late response: never reuse it
            rec.error = Some(format!("timeout after {:.1}s", shared.timeout.as_secs_f64()));
        }
        Ok(Err(ReqError::Failed(e))) => rec.error = Some(e),
        Ok(Ok((status, body))) => {
            rec.status = status;
            if (200..300).contains(&status) {
                rec.outcome = Outcome::Ok;
                if kind == Kind::Post {
                    rec.id = post_id(&body);
                    if rec.id.is_none() {
                        rec.error = Some("2xx without a JSON id".into());
                    }
                }
                ok_body = Some(body);
            } else {
                rec.outcome = Outcome::Non2xx;
                let snippet: String = String::from_utf8_lossy(&body).chars().take(120).collect();
                rec.error =
                    Some(format!("HTTP {status}: {}", snippet.split_whitespace().collect::<Vec<_>>().join(" ")));
            }
        }
    }
    (rec, ok_body)
}

async fn worker(
    shared: Arc<Shared>,
    target: Arc<Target>,
    schedule: Arc<Vec<(Kind, String)>>,
    conn_idx: usize,
) -> (Vec<Record>, u64) {
    let mut conn = Conn::new(target.clone());
    let mut records = Vec::new();
    // Each connection starts at its own place in the weighted cycle.
    let mut pos = (conn_idx * 7) % schedule.len();
    // Paced: the connections take their first turns spread over one
    // interval. All at once, 64 connections at 5 req/s sent a burst of 64
    // requests at the start and none for the next 12.8 s (bench/autoscale's
    // p99_ms_before was that burst's queue, about 1.7 s).
    let mut next_at = tokio::time::Instant::now()
        + shared.interval.map_or(Duration::ZERO, |iv| first_turn(iv, conn_idx, shared.connections));
    let mut turn = conn_idx;
    while !shared.stop.load(Ordering::Relaxed) {
        if let Some(iv) = shared.interval {
            let now = tokio::time::Instant::now();
            if next_at > now {
                tokio::time::sleep_until(next_at).await;
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
            } else if now - next_at > iv {
                next_at = now; // behind: no burst to catch up
            }
            next_at += iv;
        }
        let (kind, path) = &schedule[pos];
        pos = (pos + 1) % schedule.len();
        let body = (*kind == Kind::Post).then(|| {
            let n = shared.seq.fetch_add(1, Ordering::Relaxed);
            format!("text=loadgen+note+{n}+from+connection+{conn_idx}")
        });
        let build = || build_request(&target, *kind, path, body.clone());
        let (rec, ok_body) = timed(&shared, &mut conn, conn_idx, *kind, &build).await;
        records.push(rec);
        if let (Kind::Get, Some(page), Some((prefix, seen))) = (kind, ok_body, shared.assets.as_ref()) {
            let refs = asset_refs(&String::from_utf8_lossy(&page), prefix);
            let prev = {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                let prev = seen.other_than(&refs, turn);
                seen.add(&refs);
                prev
            };
            turn += 1;
            let fetches = refs.into_iter().map(|u| (Kind::Asset, u)).chain(prev.map(|u| (Kind::AssetPrev, u)));
            for (asset_kind, url) in fetches {
                let build = || build_request(&target, Kind::Get, &url, None);
                let (mut rec, _) = timed(&shared, &mut conn, conn_idx, asset_kind, &build).await;
                rec.path = Some(url);
                records.push(rec);
            }
        }
    }
    (records, conn.connects)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    round3(sorted[rank - 1] as f64 / 1000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_records(path: &PathBuf, records: &[Record]) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let ndjson = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e == "ndjson" || e == "jsonl");
    if !ndjson {
        writeln!(w, "start_ms,latency_us,kind,outcome,status,error,id,conn,path")?;
    }
    for r in records {
        let start_ms = r.start_us as f64 / 1000.0;
        if ndjson {
            let v = serde_json::json!({
                "start_ms": start_ms, "latency_us": r.latency_us, "kind": r.kind.name(), "outcome": r.outcome.name(),
                "status": (r.status != 0).then_some(r.status), "error": r.error, "id": r.id, "conn": r.conn,
                "path": r.path,
            });
            writeln!(w, "{v}")?;
        } else {
            writeln!(
                w,
                "{start_ms:.3},{},{},{},{},{},{},{},{}",
                r.latency_us,
                r.kind.name(),
                r.outcome.name(),
                if r.status == 0 { String::new() } else { r.status.to_string() },
                csv_field(r.error.as_deref().unwrap_or("")),
                r.id.map(|i| i.to_string()).unwrap_or_default(),
                r.conn,
                csv_field(r.path.as_deref().unwrap_or(""))
            )?;
        }
    }
    w.flush()?;
    Ok(())
}

fn summary(
    records: &[Record],
    duration: Duration,
    args: &Args,
    start_unix_ms: u128,
    static_path: Option<&str>,
    connects: u64,
) -> serde_json::Value {
    // The mix's requests; assets are summed apart (`assets`).
    let (assets, records): (Vec<&Record>, Vec<&Record>) = records.iter().partition(|r| r.kind.is_asset());
    let mut lat: Vec<u64> = records.iter().map(|r| r.latency_us).collect();
    lat.sort_unstable();
    let count = |o: Outcome| records.iter().filter(|r| r.outcome == o).count();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in records.iter().chain(&assets).filter(|r| r.outcome != Outcome::Ok) {
        // Group by the message without note numbers and the like.
        let key: String = r.error.as_deref().unwrap_or("?").chars().take(100).collect();
        *errors.entry(format!("{}: {key}", r.kind.name())).or_default() += 1;
    }
    let mut by_kind = serde_json::Map::new();
    for kind in [Kind::Get, Kind::Post, Kind::Static, Kind::Asset, Kind::AssetPrev] {
        let rs: Vec<&Record> = records.iter().chain(&assets).filter(|r| r.kind == kind).copied().collect();
        if rs.is_empty() {
            continue;
        }
        let mut l: Vec<u64> = rs.iter().map(|r| r.latency_us).collect();
        l.sort_unstable();
        by_kind.insert(
            kind.name().into(),
            serde_json::json!({
                "requests": rs.len(),
                "failed": rs.iter().filter(|r| r.outcome == Outcome::Failed).count(),
                "non_2xx": rs.iter().filter(|r| r.outcome == Outcome::Non2xx).count(),
                "p50_ms": pct(&l, 0.5), "p99_ms": pct(&l, 0.99),
            }),
        );
    }
    let secs = duration.as_secs_f64();
    let mut asset_lat: Vec<u64> = assets.iter().map(|r| r.latency_us).collect();
    asset_lat.sort_unstable();
    let asset_summary = args.assets.as_ref().map(|prefix| {
        serde_json::json!({
            "prefix": prefix,
            "requests": assets.len(),
            "prev_requests": assets.iter().filter(|r| r.kind == Kind::AssetPrev).count(),
            "ok": assets.iter().filter(|r| r.outcome == Outcome::Ok).count(),
            "not_found": assets.iter().filter(|r| r.status == 404).count(),
            "non_2xx": assets.iter().filter(|r| r.outcome == Outcome::Non2xx).count(),
            "failed": assets.iter().filter(|r| r.outcome == Outcome::Failed).count(),
            "p50_ms": pct(&asset_lat, 0.5), "p99_ms": pct(&asset_lat, 0.99),
        })
    });
    serde_json::json!({
        "requests": records.len(),
        "ok": count(Outcome::Ok),
        "failed": count(Outcome::Failed),
        "non_2xx": count(Outcome::Non2xx),
        "rows_written": records.iter().filter(|r| r.id.is_some()).count(),
        "p50_ms": pct(&lat, 0.5),
        "p90_ms": pct(&lat, 0.9),
        "p99_ms": pct(&lat, 0.99),
        "max_ms": pct(&lat, 1.0),
        "rps": if secs > 0.0 { round3(records.len() as f64 / secs) } else { 0.0 },
        "duration_s": round3(secs),
        "connections": args.connections,
        "connects": connects,
        "start_unix_ms": start_unix_ms as u64,
        "static_path": static_path,
        "by_kind": by_kind,
        "assets": asset_summary,
        "errors": errors,
        "out": args.out.as_ref().map(|p| p.display().to_string()),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.duration.is_none() && args.until_file.is_none() {
        bail!("give --duration SECONDS or --until-file PATH");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.assets.as_ref().is_some_and(|p| !p.starts_with('/')) {
        bail!("--assets: the URL prefix must start with `/` (e.g. /static/)");
    }
    let target = Arc::new(parse_url(&args.url)?);
    let mix = parse_mix(&args.mix)?;
    let timeout = Duration::from_secs_f64(args.timeout);

    // static=AUTO: the stylesheet the page links to (hashed by the app's build).
    let mut static_path = None;
    if mix.iter().any(|m| m.kind == Kind::Static && m.path == "AUTO") {
        let mut c = Conn::new(target.clone());
        let build = || build_request(&target, Kind::Get, "/", None);
        let found = match tokio::time::timeout(timeout, c.send(&build)).await {
            Ok(Ok((200..=299, body))) => find_static_css(&String::from_utf8_lossy(&body)),
            _ => None,
        };
        static_path = found.or_else(|| args.static_fallback.clone());
        if static_path.is_none() {
            bail!("static=AUTO: no /static/...css URL in the page at / and no --static-fallback");
        }
    }
    let schedule: Vec<(Kind, String)> = mix
        .iter()
        .flat_map(|m| {
            let path =
                if m.kind == Kind::Static && m.path == "AUTO" { static_path.clone().unwrap() } else { m.path.clone() };
            std::iter::repeat_n((m.kind, path), m.weight as usize)
        })
        .collect();
    // Interleave so that one connection's cycle mixes kinds: spread entries
    // evenly (a stable sort by fractional position).
    let schedule = interleave(schedule, &mix);

    let started = Instant::now();
    let start_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        started,
        timeout,
        interval: args.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(args.connections as f64 / r)),
        connections: args.connections,
        seq: AtomicU64::new(start_unix_ms as u64 % 1_000_000_000),
        assets: args.assets.clone().map(|prefix| (prefix, std::sync::Mutex::new(SeenAssets::default()))),
    });
    let schedule = Arc::new(schedule);
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        tasks.push(tokio::spawn(worker(shared.clone(), target.clone(), schedule.clone(), i)));
    }
    if let Some(p) = &args.ready_file {
        std::fs::write(p, format!("{start_unix_ms}\n")).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) || args.until_file.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    let mut connects = 0;
    for t in tasks {
        let (r, c) = t.await.context("a connection task panicked")?;
        records.extend(r);
        connects += c;
    }
    let duration = started.elapsed();
    records.sort_by_key(|r| r.start_us);
    if let Some(out) = &args.out {
        write_records(out, &records)?;
    }
    println!("{}", summary(&records, duration, &args, start_unix_ms, static_path.as_deref(), connects));
    Ok(())
}

/// Order the weighted cycle so that kinds alternate: entry j of kind k (of
/// weight w) sits at (j + 0.5) / w of the way through the cycle.
fn interleave(schedule: Vec<(Kind, String)>, mix: &[MixEntry]) -> Vec<(Kind, String)> {
    let mut keyed: Vec<(f64, usize, (Kind, String))> = Vec::new();
    let mut i = 0;
    for (mi, m) in mix.iter().enumerate() {
        for j in 0..m.weight as usize {
            keyed.push(((j as f64 + 0.5) / m.weight as f64, mi, schedule[i].clone()));
            i += 1;
        }
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().map(|(_, _, e)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_kinds_paths_and_weights() {
        let m = parse_mix("get=/:6,post=/notes/:3,static=AUTO:1").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].kind, m[0].path.as_str(), m[0].weight), (Kind::Get, "/", 6));
        assert_eq!((m[1].kind, m[1].path.as_str(), m[1].weight), (Kind::Post, "/notes/", 3));
        assert_eq!((m[2].kind, m[2].path.as_str(), m[2].weight), (Kind::Static, "AUTO", 1));
        assert_eq!(parse_mix("get=/health/").unwrap()[0].weight, 1);
        assert!(parse_mix("put=/:1").is_err());
        assert!(parse_mix("get=x:1").is_err());
    }

    #[test]
    fn finds_the_hashed_stylesheet() {
        let page = r#"<script src="/static/notes/app.1a2b.js"></script><link rel="stylesheet" href="/static/notes/app.3c4d.css">"#;
        assert_eq!(find_static_css(page).as_deref(), Some("/static/notes/app.3c4d.css"));
        assert_eq!(find_static_css("<p>none</p>"), None);
    }

    #[test]
    fn finds_every_asset_a_page_references() {
        let page = r#"<link rel="stylesheet" href="/static/notes/app.3c4d.css">
<script src="/static/notes/app.1a2b.js" defer></script><a href="/admin/">admin</a>
<img src='/static/logo.png'><link href="/static/notes/app.3c4d.css"> /static/in-text.css"#;
        assert_eq!(
            asset_refs(page, "/static/"),
            ["/static/notes/app.3c4d.css", "/static/notes/app.1a2b.js", "/static/logo.png"]
        );
        assert!(asset_refs("<p>none</p>", "/static/").is_empty());
    }

    #[test]
    fn a_previous_asset_is_one_this_page_does_not_reference() {
        let mut seen = SeenAssets::default();
        let v1 = vec!["/static/a.1.css".to_string(), "/static/a.1.js".to_string()];
        let v2 = vec!["/static/a.2.css".to_string(), "/static/a.1.js".to_string()];
        assert_eq!(seen.other_than(&v1, 0), None);
        seen.add(&v1);
        seen.add(&v1);
        assert_eq!(seen.other_than(&v1, 3), None, "nothing but this page's own");
        assert_eq!(seen.other_than(&v2, 0).as_deref(), Some("/static/a.1.css"));
        seen.add(&v2);
        assert_eq!(seen.other_than(&v1, 0).as_deref(), Some("/static/a.2.css"));
        let turns: Vec<_> = (0..2).map(|t| seen.other_than(&[], t).unwrap()).collect();
        assert_eq!(turns, ["/static/a.1.css", "/static/a.1.js"]);
    }

    #[test]
    fn interleaving_spreads_kinds() {
        let mix = parse_mix("get=/:2,post=/p:2").unwrap();
        let sched: Vec<(Kind, String)> =
            mix.iter().flat_map(|m| std::iter::repeat_n((m.kind, m.path.clone()), m.weight as usize)).collect();
        let kinds: Vec<Kind> = interleave(sched, &mix).into_iter().map(|e| e.0).collect();
        assert_eq!(kinds, [Kind::Get, Kind::Post, Kind::Get, Kind::Post]);
    }

    #[test]
    fn paced_connections_take_their_first_turns_spread_over_one_interval() {
        // 64 connections at 5 req/s: one request each every 12.8 s.
        let iv = Duration::from_secs_f64(64.0 / 5.0);
        let firsts: Vec<Duration> = (0..64).map(|i| first_turn(iv, i, 64)).collect();
        assert_eq!(firsts[0], Duration::ZERO);
        assert!(firsts.windows(2).all(|w| w[1] > w[0]), "one after the other");
        assert!(firsts[63] < iv, "all within the first interval");
        // Any one second of the first interval holds about 5 first turns, not 64.
        let in_first_second = firsts.iter().filter(|d| **d < Duration::from_secs(1)).count();
        assert_eq!(in_first_second, 5);
        assert_eq!(first_turn(iv, 0, 0), Duration::ZERO);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
    }
}
