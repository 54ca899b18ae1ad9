//! Issue 14's dashboard, end to end: a real daemon with the hello example,
//! its dashboard listener reached over HTTP (authentication: single-use
//! login links, the session cookie, 401s, CSRF refusals, the API's bearer
//! token; the listener and sessions kept across an upgrade and a daemon
//! crash), and the page itself in
//! Debian's headless Chromium driven through chromedriver by `fantoccini`:
//! it shows the environment, processes, instances and a deployment's
//! timeline, its charts have data points and markers, maintenance is
//! turned on and off from it (checked through the proxy), and a
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

/// One request over a fresh connection.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
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
    Answer { status, head: head.to_string(), body: body.to_string() }
}

/// Log in with a fresh link: the session cookie (`name=value`).
fn log_in(app: &TestApp, addr: SocketAddr) -> String {
    let link = login_link(app);
    let url = link["url"].as_str().unwrap();
    let path = &url[url.find("/login").unwrap()..];
    let a = request(addr, "GET", path, &[], "");
    assert_eq!(a.status, 303, "{}\n{}", a.head, a.body);
    let cookie = a.header("set-cookie").expect("a session cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    cookie.split(';').next().unwrap().to_string()
}

fn csrf(addr: SocketAddr, cookie: &str) -> String {
    let a = request(addr, "GET", "/v1/session", &[("Cookie", cookie)], "");
    assert_eq!(a.status, 200, "{}", a.body);
    let v: Value = serde_json::from_str(&a.body).unwrap();
    v["csrf"].as_str().unwrap().to_string()
}

#[test]
fn the_dashboard_needs_a_login_refuses_forged_changes_and_stays_across_an_upgrade_and_a_crash() {
    let app = TestApp::hello();
    app.up().ok();
    let link = login_link(&app);
    let base = link["base_url"].as_str().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{link:#}");
    assert_eq!(link["expires_in_secs"].as_u64(), Some(120));
    let addr = addr_of(&base);

    // Without a session: 401, saying what to do.
    let a = request(addr, "GET", "/", &[], "");
    assert_eq!(a.status, 401);
    assert!(a.body.contains("nonstop dashboard"), "{}", a.body);
    let a = request(addr, "GET", "/v1/status", &[], "");
    assert_eq!(a.status, 401);
    assert!(a.body.contains("nonstop dashboard"), "{}", a.body);
    // The rest of the API is not there at all.
    assert_eq!(request(addr, "POST", "/v1/down", &[], "{}").status, 404);
    // A made-up token, then a real one twice: the second use is refused.
    assert_eq!(request(addr, "GET", "/login?token=0123", &[], "").status, 401);
    let url = link["url"].as_str().unwrap();
    let path = &url[url.find("/login").unwrap()..];
    let first = request(addr, "GET", path, &[], "");
    assert_eq!(first.status, 303, "{}", first.body);
    let again = request(addr, "GET", path, &[], "");
    assert_eq!(again.status, 401);
    assert!(again.body.contains("already used"), "{}", again.body);

    // With the session: the page and the API's reads.
    let cookie = log_in(&app, addr);
    let page = request(addr, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/dashboard.js"));
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    let status = request(addr, "GET", "/v1/status", &[("Cookie", &cookie)], "");
    assert_eq!(status.status, 200, "{}", status.body);
    // Every asset is the daemon's: nothing is loaded from elsewhere.
    for asset in ["/assets/dashboard.js", "/assets/charts.js", "/assets/dashboard.css", "/favicon.svg"] {
        let a = request(addr, "GET", asset, &[], "");
        assert_eq!(a.status, 200, "{asset}");
        for pattern in ["src=\"http", "href=\"http", "url(http", "import ", "fetch(\"http"] {
            assert!(!a.body.contains(pattern), "{asset} refers to another site: {pattern}");
        }
    }
    for pattern in ["src=\"http", "href=\"http", "//cdn", "https://"] {
        assert!(!page.body.contains(pattern), "the page refers to another site: {pattern}");
    }

    // A change with the session but without the CSRF token, or from
    // another origin, is refused and changes nothing.
    let token = csrf(addr, &cookie);
    let on = r#"{"on": true, "who": "test"}"#;
    let a = request(addr, "POST", "/v1/maintenance", &[("Cookie", &cookie)], on);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("CSRF"), "{}", a.body);
    let a = request(
        addr,
        "POST",
        "/v1/maintenance",
        &[("Cookie", &cookie), ("X-Nonstop-CSRF", &token), ("Origin", "http://evil.example")],
        on,
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let a = request(
        addr,
        "POST",
        "/v1/maintenance",
        &[("Cookie", &cookie), ("X-Nonstop-CSRF", "0".repeat(64).as_str())],
        on,
    );
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(app.status()["maintenance"].is_null(), "nothing changed");
    // With it, the change is made.
    let origin = format!("http://{addr}");
    let headers = [("Cookie", cookie.as_str()), ("X-Nonstop-CSRF", token.as_str()), ("Origin", origin.as_str())];
    let a = request(addr, "POST", "/v1/maintenance", &headers, on);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(!app.status()["maintenance"].is_null());
    let a = request(addr, "POST", "/v1/maintenance", &headers, r#"{"on": false, "who": "test"}"#);
    assert_eq!(a.status, 200, "{}", a.body);

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
    let a = request(addr, "GET", "/v1/status", &[("Cookie", &cookie)], "");
    assert_eq!(a.status, 200, "the session survives the upgrade: {}", a.body);

    // A daemon killed: the keeper holds the listener and hands it to the
    // daemon it starts.
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(60), "another daemon", || {
        app.daemon_pid().is_some_and(|p| p != daemon && pid_alive(p)) && app.run(&["status", "--json"]).code == 0
    });
    let after = login_link(&app);
    assert_eq!(after["base_url"].as_str(), Some(base.as_str()), "the dashboard keeps its address after a crash");
    let a = request(addr, "GET", "/v1/status", &[("Cookie", &cookie)], "");
    assert_eq!(a.status, 200, "the session survives the crash: {}", a.body);
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
        let result = drive(&browser, &url, proxy).await;
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

fn text_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

async fn drive(browser: &fantoccini::Client, url: &str, proxy: SocketAddr) -> Vec<u8> {
    browser.goto(url).await.unwrap();
    page_until(browser, 30, "the page loaded", "document.body.dataset.loaded === 'true'").await;
    // The login link is gone from the address bar.
    let here = browser.current_url().await.unwrap();
    assert!(!here.as_str().contains("token"), "{here}");

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
    page_until(
        browser,
        30,
        "maintenance shown on",
        "document.querySelector('#maintenance-state').innerText.startsWith('on')",
    )
    .await;
    let (code, body) = http_get(proxy, "/").unwrap();
    assert_eq!(code, 503, "maintenance through the proxy: {body}");
    browser.find(fantoccini::Locator::Css("#maintenance-toggle")).await.unwrap().click().await.unwrap();
    browser.accept_alert().await.unwrap();
    page_until(
        browser,
        30,
        "maintenance shown off",
        "document.querySelector('#maintenance-state').innerText.startsWith('off')",
    )
    .await;
    let (code, _) = http_get(proxy, "/").unwrap();
    assert_eq!(code, 200, "maintenance off again");
    let events = text_of(&eval(browser, "document.querySelector('#event-table').innerText").await);
    assert!(events.contains("maintenance"), "{events}");
    screenshot
}
