//! Issue 14's dashboard, end to end: a real daemon with the hello example,
//! its dashboard listener reached over HTTP (authentication: single-use
//! login links with the token in the fragment, exchanged for a session
//! token sent in `Authorization` and never a cookie, 401s, logout ending
//! every session for good, the `Host` of another name refused, changes
//! from another origin refused, the dashboard's maintenance taking
//! `{"on": bool}` only, the API's bearer token; the listener and sessions
//! kept across an upgrade and a daemon crash; non-loopback addresses
//! refused; `--open` keeping the token off xdg-open's command line), and
//! the page itself in Debian's headless Chromium driven through
//! chromedriver by `fantoccini`: it logs in from the link, shows the
//! environment, processes, instances and a deployment's timeline, its
//! charts have data points and markers, maintenance is turned on and off
//! from it (checked through the proxy) and a late answer of an older
//! refresh does not overwrite it, logging out ends the session, and a
//! screenshot is saved under `target/dashboard-e2e/`.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `nonstop dashboard --json`.
fn login_link(app: &TestApp) -> Value {
    let r = app.run(&["dashboard", "--json"]);
    r.ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("dashboard --json is not JSON ({e}):\n{}", r.stdout))
}

/// The login token of a link: `http://127.0.0.1:PORT/login#token=T[&...]`.
fn token_of(url: &str) -> String {
    let (_, fragment) = url.split_once("/login#token=").unwrap_or_else(|| panic!("no token in the fragment: {url}"));
    fragment.split('&').next().unwrap().to_string()
}

fn addr_of(base_url: &str) -> SocketAddr {
    base_url.trim_start_matches("http://").parse().unwrap_or_else(|e| panic!("{base_url}: {e}"))
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One request over a fresh connection (`Host` the address unless
/// `headers` has one).
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let answer = Answer { status, head: head.to_string(), body: body.to_string() };
    assert!(answer.header("set-cookie").is_none(), "the dashboard sets no cookie: {}", answer.head);
    answer
}

/// `POST /login` with a login token.
fn post_login(addr: SocketAddr, token: &str) -> Answer {
    request(addr, "POST", "/login", &[], &serde_json::json!({ "token": token }).to_string())
}

/// Log in with a fresh link: `Session <token>`, for `Authorization`.
fn log_in(app: &TestApp, addr: SocketAddr) -> String {
    let link = login_link(app);
    let a = post_login(addr, &token_of(link["url"].as_str().unwrap()));
    assert_eq!(a.status, 200, "{}\n{}", a.head, a.body);
    let v: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["expires_in_secs"].as_u64(), Some(12 * 3600), "{v}");
    format!("Session {}", v["session"].as_str().expect("a session"))
}

#[test]
fn the_dashboard_needs_a_login_refuses_other_hosts_origins_and_fields_and_stays_across_an_upgrade_and_a_crash() {
    let app = TestApp::hello();
    app.up().ok();
    let link = login_link(&app);
    let base = link["base_url"].as_str().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{link:#}");
    assert_eq!(link["expires_in_secs"].as_u64(), Some(120));
    let url = link["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{base}/login#token=")), "the token is in the fragment: {url}");
    assert!(!url.contains('?'), "nothing of it in the query: {url}");
    let addr = addr_of(&base);

    // The page, the login page and the assets are static and public: they
    // hold no data. Everything else without a session: 401, saying what
    // to do.
    let page = request(addr, "GET", "/", &[], "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/dashboard.js") && !page.body.contains("hello"), "{}", page.body);
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    let login_page = request(addr, "GET", "/login", &[], "");
    assert_eq!(login_page.status, 200);
    assert!(login_page.body.contains("nonstop dashboard") && login_page.body.contains("/assets/login.js"));
    for (method, path) in [
        ("GET", "/v1/status"),
        ("GET", "/v1/environments"),
        ("GET", "/v1/charts"),
        ("GET", "/v1/events"),
        ("POST", "/v1/maintenance"),
        ("POST", "/logout"),
    ] {
        let a = request(addr, method, path, &[], if method == "POST" { r#"{"on": true}"# } else { "" });
        assert_eq!(a.status, 401, "{method} {path}: {}", a.body);
        assert!(a.body.contains("nonstop dashboard"), "{}", a.body);
    }
    // A cookie is nothing to it.
    assert_eq!(request(addr, "GET", "/v1/status", &[("Cookie", "nonstop_session=x")], "").status, 401);
    // The rest of the API is not there at all.
    assert_eq!(request(addr, "POST", "/v1/down", &[], "{}").status, 404);
    // A made-up token, then a real one twice: the second use is refused.
    assert_eq!(post_login(addr, "0123").status, 401);
    let token = token_of(url);
    let first = post_login(addr, &token);
    assert_eq!(first.status, 200, "{}", first.body);
    let again = post_login(addr, &token);
    assert_eq!(again.status, 401);
    assert!(again.body.contains("already used"), "{}", again.body);
    // The login token is not a session.
    let a = request(addr, "GET", "/v1/status", &[("Authorization", &format!("Session {token}"))], "");
    assert_eq!(a.status, 401);

    // With the session: the API's reads.
    let session = log_in(&app, addr);
    let status = request(addr, "GET", "/v1/status", &[("Authorization", &session)], "");
    assert_eq!(status.status, 200, "{}", status.body);
    // Every asset is the daemon's: nothing is loaded from elsewhere.
    for asset in
        ["/assets/dashboard.js", "/assets/login.js", "/assets/charts.js", "/assets/dashboard.css", "/favicon.svg"]
    {
        let a = request(addr, "GET", asset, &[], "");
        assert_eq!(a.status, 200, "{asset}");
        for pattern in ["src=\"http", "href=\"http", "url(http", "import ", "fetch(\"http"] {
            assert!(!a.body.contains(pattern), "{asset} refers to another site: {pattern}");
        }
    }
    for pattern in ["src=\"http", "href=\"http", "//cdn", "https://"] {
        assert!(!page.body.contains(pattern), "the page refers to another site: {pattern}");
    }

    // DNS rebinding: a request naming another host is refused, whatever
    // it carries; the listener's own names are not.
    let port = addr.port();
    for host in [format!("evil.example:{port}"), "evil.example".to_string(), format!("127.0.0.1:{}", port + 1)] {
        for (method, path, body) in
            [("GET", "/v1/status", ""), ("GET", "/", ""), ("POST", "/login", r#"{"token": "x"}"#)]
        {
            let a = request(addr, method, path, &[("Host", &host), ("Authorization", &session)], body);
            assert_eq!(a.status, 421, "{method} {path} for {host}: {}", a.body);
            assert!(a.body.contains(&base), "names the address to use: {}", a.body);
        }
    }
    let localhost = format!("localhost:{port}");
    let a = request(addr, "GET", "/v1/status", &[("Host", &localhost), ("Authorization", &session)], "");
    assert_eq!(a.status, 200, "{}", a.body);

    // A change with the session from another origin is refused (the
    // Origin is compared to the listener's, not to the Host), and so is
    // one that sends more than on/off; neither changes anything.
    let on = r#"{"on": true}"#;
    let own = format!("http://{addr}");
    for headers in [
        vec![("Authorization", session.as_str()), ("Origin", "http://evil.example")],
        vec![("Authorization", session.as_str()), ("Origin", "http://evil.example"), ("Host", "evil.example")],
        vec![("Authorization", session.as_str()), ("Origin", own.as_str()), ("Sec-Fetch-Site", "cross-site")],
    ] {
        let a = request(addr, "POST", "/v1/maintenance", &headers, on);
        assert!(a.status == 403 || a.status == 421, "{headers:?}: {} {}", a.status, a.body);
    }
    let headers = [("Authorization", session.as_str()), ("Origin", own.as_str())];
    for extra in [
        r#"{"on": true, "who": "mallory"}"#,
        r#"{"on": true, "page": "<script>alert(1)</script>"}"#,
        r#"{"on": true, "allow": ["0.0.0.0/0"]}"#,
        r#"{"on": true, "retry_after_secs": 1}"#,
        "{}",
    ] {
        let a = request(addr, "POST", "/v1/maintenance", &headers, extra);
        assert_eq!(a.status, 400, "{extra}: {}", a.body);
        let message = serde_json::from_str::<Value>(&a.body).unwrap()["message"].as_str().unwrap().to_string();
        assert!(message.contains(r#"{"on": true} or {"on": false} only"#), "names what it takes: {message}");
    }
    assert!(app.status()["maintenance"].is_null(), "nothing changed");
    // On and off, recorded as the dashboard's.
    let a = request(addr, "POST", "/v1/maintenance", &headers, on);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(!app.status()["maintenance"].is_null());
    let events = request(addr, "GET", "/v1/events", &[("Authorization", &session)], "").body;
    assert!(events.contains("(by dashboard)") && !events.contains("mallory"), "{events}");
    let a = request(addr, "POST", "/v1/maintenance", &headers, r#"{"on": false}"#);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(app.status()["maintenance"].is_null());

    // The API's bearer token works there too; a wrong one does not.
    let api_token = std::fs::read_to_string(app.home.path().join("api-token")).unwrap();
    let bearer = format!("Bearer {}", api_token.trim());
    assert_eq!(request(addr, "GET", "/v1/charts", &[("Authorization", &bearer)], "").status, 200);
    assert_eq!(request(addr, "GET", "/v1/charts", &[("Authorization", "Bearer nope")], "").status, 401);

    // An upgrade hands the listener over: the same address, the same
    // session.
    let r = app.run(&["upgrade"]);
    r.ok();
    let after = login_link(&app);
    assert_eq!(after["base_url"].as_str(), Some(base.as_str()), "the dashboard keeps its address");
    let a = request(addr, "GET", "/v1/status", &[("Authorization", &session)], "");
    assert_eq!(a.status, 200, "the session survives the upgrade: {}", a.body);

    // A logout ends every session (this one and another), not the ones
    // opened after it.
    let other = log_in(&app, addr);
    let a = request(addr, "POST", "/logout", &[("Authorization", &other), ("Origin", &own)], "");
    assert_eq!(a.status, 204, "{}", a.body);
    for s in [&session, &other] {
        let a = request(addr, "GET", "/v1/status", &[("Authorization", s)], "");
        assert_eq!(a.status, 401, "logged out: {}", a.body);
    }
    let epoch = app.home.path().join("dashboard-epoch");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&epoch).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", epoch.display());
    let fresh = log_in(&app, addr);
    assert_eq!(request(addr, "GET", "/v1/status", &[("Authorization", &fresh)], "").status, 200);

    // A daemon killed: the keeper holds the listener and hands it to the
    // daemon it starts, which accepts the session opened after the logout
    // and still refuses those before it.
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(60), "another daemon", || {
        app.daemon_pid().is_some_and(|p| p != daemon && pid_alive(p)) && app.run(&["status", "--json"]).code == 0
    });
    let after = login_link(&app);
    assert_eq!(after["base_url"].as_str(), Some(base.as_str()), "the dashboard keeps its address after a crash");
    let a = request(addr, "GET", "/v1/status", &[("Authorization", &fresh)], "");
    assert_eq!(a.status, 200, "the session survives the crash: {}", a.body);
    let a = request(addr, "GET", "/v1/status", &[("Authorization", &session)], "");
    assert_eq!(a.status, 401, "a logged-out session stays out after a restart: {}", a.body);

    // `--open` gives xdg-open a private page that goes on to the link,
    // not the link itself (any local user can read a command line).
    let fake = tempfile::tempdir().unwrap();
    let script = fake.path().join("xdg-open");
    std::fs::write(
        &script,
        "#!/bin/sh\nd=$(dirname \"$0\")\nprintf '%s\\n' \"$@\" > \"$d/args\"\ncat \"$1\" > \"$d/page\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fake.path().display(), std::env::var("PATH").unwrap_or_default());
    let out = wait_output(app.cmd(&["dashboard", "--open"]).env("PATH", path).spawn().unwrap(), T, "dashboard --open");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let token = token_of(&printed);
    let args = std::fs::read_to_string(fake.path().join("args")).unwrap();
    assert!(!args.contains(&token), "the token is not on xdg-open's command line: {args}");
    let opened = PathBuf::from(args.trim());
    assert_eq!(opened, app.home.path().join("dashboard-open.html"), "{args}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&opened).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let page = std::fs::read_to_string(fake.path().join("page")).unwrap();
    assert!(page.contains(&format!("url={}", printed.replace('&', "&amp;"))), "{page}");
    assert_eq!(post_login(addr, &token).status, 200, "the page's link logs in");
}

const T: Duration = Duration::from_secs(120);

#[test]
fn the_dashboard_listens_on_loopback_only() {
    let app = TestApp::hello();
    for addr in ["0.0.0.0:8900", "[::]:8900", "192.0.2.1:8900"] {
        let r = app.run(&["daemon", "--no-keeper", "--dashboard-listen", addr]);
        assert_eq!(r.code, 2, "{addr} refused: {}", r.stderr);
        assert!(r.stderr.contains("not a loopback address") && r.stderr.contains("127.0.0.1:PORT"), "{}", r.stderr);
        let out = wait_output(
            app.cmd(&["daemon", "--no-keeper"]).env("NONSTOP_DASHBOARD_LISTEN", addr).spawn().unwrap(),
            T,
            "nonstop daemon",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr} from the environment refused: {stderr}");
        assert!(stderr.contains("not a loopback address"), "{stderr}");
    }
    assert!(app.daemon_pid().is_none(), "no daemon started");
}

#[test]
fn an_upgraded_daemon_keeps_the_dashboard_choice_of_its_flag() {
    // `--dashboard-listen off` on the command line (not in the
    // environment): the successor is told, and serves no dashboard either.
    let app = TestApp::hello();
    let daemon = app.cmd(&["daemon", "--no-keeper", "--dashboard-listen", "off"]).spawn().unwrap();
    wait_until(T, "the daemon to answer", || !app.run(&["status"]).stderr.contains("is not running"));
    app.note_daemon();
    app.up().ok();
    let before = app.daemon_pid();
    let no_dashboard = |app: &TestApp| {
        let r = app.run(&["dashboard"]);
        assert_ne!(r.code, 0, "{}", r.stdout);
        assert!(r.stderr.contains("serves no dashboard"), "{}", r.stderr);
    };
    no_dashboard(&app);
    app.run(&["upgrade"]).ok();
    assert_ne!(app.daemon_pid(), before, "another daemon");
    no_dashboard(&app);
    app.run(&["down"]).ok();
    let _ = wait_output(daemon, T, "the first daemon to exit after the upgrade");
}

// --------------------------------------------------------------- Chromium

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(program)).find(|p| p.is_file())
}

fn start_chromedriver() -> (Driver, PathBuf) {
    let missing = |what: &str| {
        panic!(
            "{what} is not installed: the dashboard's end-to-end test needs Debian's `chromium` and \
             `chromium-driver`; run ./scripts/setup (or `apt-get install -y chromium chromium-driver`)"
        )
    };
    let chromium = which("chromium").unwrap_or_else(|| missing("chromium"));
    let chromedriver = which("chromedriver").unwrap_or_else(|| missing("chromedriver"));
    let port = free_port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver { child, port };
    wait_until(Duration::from_secs(30), "chromedriver listening", || {
        TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
    });
    (driver, chromium)
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    target.join("dashboard-e2e")
}

/// Width and height from a PNG's IHDR, if it is a PNG.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let n = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    Some((n(16), n(20)))
}

#[test]
fn the_dashboard_in_chromium_shows_the_app_charts_with_data_and_toggles_maintenance() {
    let (driver, chromium) = start_chromedriver();
    let app = TestApp::hello();
    app.up().ok();
    // A deployment, for the history and its timeline, and a marker.
    app.run(&["deploy", "-m", "dashboard test"]).ok();
    // Load over more than two metrics steps, so the charts have points.
    let load = Load::start(app.proxy(), "/", 4);
    wait_until(Duration::from_secs(60), "requests measured", || {
        let raw = app.api_get("/v1/charts");
        let charts: Value = serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
        charts["processes"].as_array().unwrap().iter().any(|p| {
            p["process"] == "web"
                && p["requests_per_second"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|v| v.as_f64().is_some_and(|r| r > 0.0))
                    .count()
                    >= 2
        })
    });
    let (ok, failures) = load.finish();
    assert!(ok > 0 && failures.is_empty(), "{ok} answered, failures: {failures:?}");
    let link = login_link(&app);
    let url = link["url"].as_str().unwrap().to_string();
    let dashboard = addr_of(link["base_url"].as_str().unwrap());
    let proxy = app.proxy();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let shot = rt.block_on(async move {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,2200", "--no-first-run", "--no-default-browser-check"]
            }),
        );
        let browser = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap_or_else(|e| panic!("cannot start headless Chromium through chromedriver: {e}"));
        let result = drive(&browser, &url, proxy, dashboard).await;
        let _ = browser.close().await;
        drop(driver);
        result
    });

    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dashboard.png");
    std::fs::write(&path, &shot).unwrap();
    let (w, h) = png_size(&shot).unwrap_or_else(|| panic!("{} is not a PNG", path.display()));
    assert!(w >= 800 && h >= 600, "{w}x{h}");
    assert!(shot.len() > 30_000, "a screenshot of {} bytes shows next to nothing", shot.len());
    eprintln!("screenshot: {} ({w}x{h}, {} bytes)", path.display(), shot.len());
}

/// Evaluate `script` (an expression) in the page.
async fn eval(browser: &fantoccini::Client, script: &str) -> Value {
    browser.execute(&format!("return {script};"), vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Wait (at most `secs`) until `script` is true in the page.
async fn page_until(browser: &fantoccini::Client, secs: u64, what: &str, script: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if eval(browser, script).await == Value::Bool(true) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let body = eval(browser, "document.body.innerText").await;
            panic!(
                "timed out after {secs}s waiting for {what} ({script}); the page shows:\n{}",
                body.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Click the page's maintenance switch, accept its confirmation, and wait
/// until the page shows maintenance `state` ("on" or "off").
async fn toggle_maintenance(browser: &fantoccini::Client, state: &str) {
    browser.find(fantoccini::Locator::Css("#maintenance-toggle")).await.unwrap().click().await.unwrap();
    browser.accept_alert().await.unwrap();
    maintenance_shown(browser, state).await;
}

/// Wait (30 s at most) until the page shows maintenance `state`.
async fn maintenance_shown(browser: &fantoccini::Client, state: &str) {
    page_until(
        browser,
        30,
        &format!("maintenance shown {state}"),
        &format!("document.querySelector('#maintenance-state').innerText.startsWith('{state}')"),
    )
    .await;
}

fn text_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

async fn drive(browser: &fantoccini::Client, url: &str, proxy: SocketAddr, dashboard: SocketAddr) -> Vec<u8> {
    browser.goto(url).await.unwrap();
    page_until(browser, 30, "the page loaded", "document.body.dataset.loaded === 'true'").await;
    // The login link is gone from the address bar; the session is in this
    // tab's sessionStorage, and no cookie.
    let here = browser.current_url().await.unwrap();
    assert!(!here.as_str().contains("token") && here.path() == "/", "{here}");
    let session = text_of(&eval(browser, "sessionStorage.getItem('nonstop-session')").await);
    assert!(!session.is_empty(), "a session in sessionStorage");
    assert_eq!(eval(browser, "document.cookie").await, Value::String(String::new()), "no cookie");
    let session = format!("Session {session}");

    // Environments, processes, instances.
    let envs = text_of(&eval(browser, "document.querySelector('#env-table').innerText").await);
    assert!(envs.contains("hello") && envs.contains("default") && envs.contains("v1"), "{envs}");
    assert!(envs.contains("http://"), "the environment's URL: {envs}");
    let processes = text_of(&eval(browser, "document.querySelector('#process-table').innerText").await);
    for p in ["web", "worker", "beat"] {
        assert!(processes.contains(p), "{p} in {processes}");
    }
    page_until(
        browser,
        30,
        "both web instances healthy",
        "document.querySelectorAll('#instance-table .pill.good').length >= 4",
    )
    .await;
    let instances = text_of(&eval(browser, "document.querySelector('#instance-table').innerText").await);
    assert!(instances.contains("web.1") && instances.contains("healthy"), "{instances}");

    // The deployment and its timeline.
    let history = text_of(&eval(browser, "document.querySelector('#deployments').innerText").await);
    assert!(history.contains("#") && history.contains("v1") && history.contains("succeeded"), "{history}");
    assert!(history.contains("building") && history.contains("rolling web"), "the timeline: {history}");
    assert!(history.contains("dashboard test"), "the deploy's message: {history}");

    // The charts have data points, and the deploy shows as markers.
    page_until(
        browser,
        30,
        "request chart with data",
        "Number(document.querySelector('#chart-requests svg')?.dataset.points) >= 2",
    )
    .await;
    for chart in ["requests", "p95", "errors", "cpu", "instances"] {
        let points =
            eval(browser, &format!("Number(document.querySelector('#chart-{chart} svg').dataset.points)")).await;
        assert!(points.as_f64().is_some_and(|n| n >= 1.0), "chart {chart} has {points} points");
    }
    let markers = eval(browser, "Number(document.querySelector('#chart-requests svg').dataset.markers)").await;
    assert!(markers.as_f64().is_some_and(|n| n >= 1.0), "deploy markers: {markers}");
    let screenshot = browser.screenshot().await.unwrap();

    // Maintenance on from the page (after the confirmation), seen through
    // the proxy, then off again.
    let (code, _) = http_get(proxy, "/").unwrap();
    assert_eq!(code, 200);
    browser.find(fantoccini::Locator::Css("#maintenance-toggle")).await.unwrap().click().await.unwrap();
    let question = browser.get_alert_text().await.unwrap();
    assert!(question.contains("maintenance ON"), "{question}");
    browser.accept_alert().await.unwrap();
    maintenance_shown(browser, "on").await;
    let (code, body) = http_get(proxy, "/").unwrap();
    assert_eq!(code, 503, "maintenance through the proxy: {body}");
    toggle_maintenance(browser, "off").await;
    let (code, _) = http_get(proxy, "/").unwrap();
    assert_eq!(code, 200, "maintenance off again");
    let events = text_of(&eval(browser, "document.querySelector('#event-table').innerText").await);
    assert!(events.contains("maintenance"), "{events}");

    // A late answer of an older refresh does not overwrite a newer one:
    // the page's status reads are held (answered while maintenance is
    // off), maintenance is turned on, and only then are they let through.
    browser
        .execute(
            "window.__held = []; window.__hold = true; const real = window.fetch.bind(window); \
             window.fetch = (url, opts) => { const p = real(url, opts); \
               if (!window.__hold || !String(url).startsWith('/v1/status')) return p; \
               return new Promise(resolve => window.__held.push(() => resolve(p))); };",
            vec![],
        )
        .await
        .unwrap();
    browser.find(fantoccini::Locator::Css(".ranges button[data-range='15m']")).await.unwrap().click().await.unwrap();
    page_until(browser, 30, "a status read held", "window.__held.length >= 1").await;
    eval(browser, "(window.__hold = false)").await;
    toggle_maintenance(browser, "on").await;
    let dropped = eval(browser, "Number(document.body.dataset.dropped || 0)").await.as_f64().unwrap();
    eval(browser, "window.__held.splice(0).forEach(release => release()) || true").await;
    page_until(
        browser,
        30,
        "the late answer dropped (or shown)",
        &format!(
            "Number(document.body.dataset.dropped) > {dropped} || \
             document.querySelector('#maintenance-state').innerText.startsWith('off')"
        ),
    )
    .await;
    let shown = text_of(&eval(browser, "document.querySelector('#maintenance-state').innerText").await);
    assert!(shown.starts_with("on"), "the late answer (maintenance off) overwrote the page: {shown}");
    let (code, _) = http_get(proxy, "/").unwrap();
    assert_eq!(code, 503);
    toggle_maintenance(browser, "off").await;

    // Logging out ends the session on the daemon, and the tab shows the
    // login page.
    let a = request(dashboard, "GET", "/v1/status", &[("Authorization", &session)], "");
    assert_eq!(a.status, 200, "{}", a.body);
    browser.find(fantoccini::Locator::Css("#logout")).await.unwrap().click().await.unwrap();
    page_until(
        browser,
        30,
        "the login page",
        "location.pathname === '/login' && !!document.querySelector('#login-why')",
    )
    .await;
    assert_eq!(eval(browser, "sessionStorage.getItem('nonstop-session')").await, Value::Null);
    let a = request(dashboard, "GET", "/v1/status", &[("Authorization", &session)], "");
    assert_eq!(a.status, 401, "the session ended on the daemon: {}", a.body);
    screenshot
}
