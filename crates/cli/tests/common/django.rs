//! The Django example under test: what it needs, its spec, and clients
//! that load pages and every asset each page references.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Fail (never skip) when what the Django example needs is missing.
pub fn require_services() {
    let py = Command::new("python3").args(["-c", "import django, gunicorn, celery, redis, psycopg"]).output();
    match py {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Django example's Python packages are missing ({}): run ./scripts/setup \
             (or python3 -m pip install -r examples/django/requirements.txt)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("python3 cannot be run ({e}): install Python 3.11+ and run ./scripts/setup"),
    }
    for (what, port) in [("PostgreSQL", 5432), ("Redis", 6379)] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            panic!("{what} is not answering on {addr} ({e}): run ./scripts/setup, which starts it");
        }
    }
}

/// Set `key = value` in `[section]` of the example's simple TOML layout.
pub fn set_in_section(spec: &str, section: &str, key: &str, value: &str) -> String {
    let mut lines: Vec<String> = spec.lines().map(str::to_string).collect();
    let header = format!("[{section}]");
    let start = lines.iter().position(|l| l.trim() == header).unwrap_or_else(|| panic!("no {header} in the spec"));
    let end = (start + 1..lines.len()).find(|&i| lines[i].trim_start().starts_with('[')).unwrap_or(lines.len());
    let line = format!("{key} = {value}");
    match (start + 1..end).find(|&i| lines[i].split('=').next().is_some_and(|k| k.trim() == key)) {
        Some(i) => lines[i] = line,
        None => lines.insert(start + 1, line),
    }
    lines.join("\n") + "\n"
}

/// (status, lower-cased head, body) of one GET on a new connection.
pub fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    fetch_host(addr, "test", path)
}

/// [`fetch`] for `host` (which picks the environment).
pub fn fetch_host(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// Every `href="/static/..."` and `src="/static/..."` of a page.
pub fn asset_refs(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"/static/", "src=\"/static/"] {
        let mut rest = page;
        while let Some(i) = rest.find(attr) {
            let url = &rest[i + attr.len() - "/static/".len()..];
            let end = url.find('"').unwrap_or(url.len());
            out.push(url[..end].to_string());
            rest = &url[end..];
        }
    }
    out
}

/// The APP_VERSION a page shows.
pub fn page_version(page: &str) -> Option<String> {
    let tag = "<strong id=\"app-version\">";
    let i = page.find(tag)? + tag.len();
    Some(page[i..i + page[i..].find('<')?].to_string())
}

#[derive(Default)]
pub struct Seen {
    /// Pages per version shown.
    pub pages: BTreeMap<String, u64>,
    /// Asset URLs per version of the page that referenced them.
    pub assets: BTreeMap<String, BTreeSet<String>>,
    pub asset_requests: u64,
    pub failures: Vec<String>,
}

/// Threads that GET `/` and then every asset the page references, until
/// finished.
pub struct PageLoad {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PageLoad {
    pub fn start(addr: SocketAddr, workers: usize) -> PageLoad {
        PageLoad::start_host(addr, "test", workers)
    }

    /// [`PageLoad::start`] for `host`: its pages and their assets.
    pub fn start_host(addr: SocketAddr, host: &'static str, workers: usize) -> PageLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let threads = (0..workers)
            .map(|_| {
                let (stop, seen) = (stop.clone(), seen.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let page = match fetch_host(addr, host, "/") {
                            Ok((200, _, body)) => body,
                            Ok((code, _, body)) => {
                                seen.lock().unwrap().failures.push(format!("GET / -> {code}: {}", body.trim()));
                                continue;
                            }
                            Err(e) => {
                                seen.lock().unwrap().failures.push(format!("GET / -> {e}"));
                                continue;
                            }
                        };
                        let version = page_version(&page).unwrap_or_else(|| "?".into());
                        let refs = asset_refs(&page);
                        let mut failures = Vec::new();
                        if refs.is_empty() {
                            failures.push(format!("a page of version {version} references no /static/ asset"));
                        }
                        for url in &refs {
                            match fetch_host(addr, host, url) {
                                Ok((200, _, _)) => {}
                                Ok((code, head, _)) => {
                                    failures.push(format!("{url} (page of version {version}) -> {code}\n{head}"))
                                }
                                Err(e) => failures.push(format!("{url} (page of version {version}) -> {e}")),
                            }
                        }
                        let mut s = seen.lock().unwrap();
                        *s.pages.entry(version.clone()).or_default() += 1;
                        s.asset_requests += refs.len() as u64;
                        s.assets.entry(version).or_default().extend(refs);
                        s.failures.extend(failures);
                    }
                })
            })
            .collect();
        PageLoad { stop, seen, threads }
    }

    pub fn pages_of(&self, version: &str) -> u64 {
        self.seen.lock().unwrap().pages.get(version).copied().unwrap_or(0)
    }

    pub fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.seen).ok().unwrap().into_inner().unwrap()
    }
}

pub fn assert_clean(what: &str, seen: &Seen) {
    assert!(
        seen.failures.is_empty(),
        "{what}: {} failure(s) in {} pages and {} asset requests; first ones:\n{}",
        seen.failures.len(),
        seen.pages.values().sum::<u64>(),
        seen.asset_requests,
        seen.failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}
