//! `[static]` end to end: the real daemon indexes each built release's
//! static files and its proxy serves those of every retained release; a
//! static directory missing after the build fails the deploy before any
//! instance changes.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);
/// A daemon that loads 4,000 files, on a busy machine.
const SLOW: Duration = Duration::from_secs(240);

/// The hello app; each release's build writes `staticfiles/css/main-vN.css`
/// (its own asset, named after the release) and a Django-style hashed file,
/// unless `ASSETS = "none"` in [env]. Its release task fails when
/// `APP_VERSION = "bad"`.
fn app_with_statics() -> TestApp {
    let app = TestApp::new("hello", |s| s);
    let build = concat!(
        "build = [\"if [ \\\"$ASSETS\\\" != none ]; then mkdir -p staticfiles/css && ",
        "echo \\\"body {} /* $NONSTOP_RELEASE */\\\" > staticfiles/css/main-$NONSTOP_RELEASE.css && ",
        "echo shared-$NONSTOP_RELEASE > staticfiles/robots.txt && ",
        "echo hashed > staticfiles/css/base.0123456789ab.css; fi\"]"
    );
    let spec = app.spec().replace(
        "app = \"hello\"",
        &format!("app = \"hello\"\n{build}\n\n[static]\nurl = \"/static/\"\n\n[release]\ntasks = [\"test $APP_VERSION != bad\"]\nretain_releases = 2"),
    );
    let spec = spec.replace("GREETING = \"hello\"", "GREETING = \"hello\"\nAPP_VERSION = \"1\"\nASSETS = \"yes\"");
    app.write_spec(&spec);
    app
}

fn set_env(app: &TestApp, key: &str, value: &str) {
    let spec = app.spec();
    let start = spec.find(&format!("{key} = \"")).unwrap();
    let end = start + spec[start..].find('\n').unwrap();
    app.write_spec(&format!("{}{key} = \"{value}\"{}", &spec[..start], &spec[end..]));
}

/// (status, head, body) of one GET.
fn fetch(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn status_of(app: &TestApp, path: &str) -> u16 {
    fetch(app.proxy(), path).0
}

#[test]
fn the_proxy_serves_the_static_files_of_every_retained_release() {
    let app = app_with_statics();
    app.run(&["deploy"]).ok();
    wait_until(T, "v1's assets", || status_of(&app, "/static/css/main-v1.css") == 200);
    let (_, head, body) = fetch(app.proxy(), "/static/css/base.0123456789ab.css");
    assert!(head.contains("cache-control: public, max-age=31536000, immutable"), "{head}");
    assert_eq!(body, "hashed\n");
    let (_, head, _) = fetch(app.proxy(), "/static/css/main-v1.css");
    assert!(head.contains("cache-control: public, max-age=60") && head.contains("etag:"), "{head}");
    let (code, head, _) = fetch(app.proxy(), "/static/css/main-v9.css");
    assert_eq!(code, 404);
    assert!(head.contains("cache-control: no-store"), "{head}");
    // Everything else still reaches the app.
    assert_eq!(app.get("/").unwrap().0, 200);
    // The index was persisted inside the release.
    assert!(app.home.path().join("releases/hello/v1/.nonstop-static/index.json").is_file());

    set_env(&app, "APP_VERSION", "2");
    app.run(&["deploy"]).ok();
    // Both releases' assets: a page of either finds its own.
    assert_eq!(status_of(&app, "/static/css/main-v2.css"), 200);
    assert_eq!(status_of(&app, "/static/css/main-v1.css"), 200);
    // A name in both: the running release's file.
    wait_until(T, "v2's robots.txt", || fetch(app.proxy(), "/static/robots.txt").2 == "shared-v2\n");

    // v1 pruned (retain_releases = 2): its assets go with it.
    set_env(&app, "APP_VERSION", "3");
    app.run(&["deploy"]).ok();
    wait_until(T, "v1's assets gone", || status_of(&app, "/static/css/main-v1.css") == 404);
    assert_eq!(status_of(&app, "/static/css/main-v2.css"), 200);
    assert_eq!(status_of(&app, "/static/css/main-v3.css"), 200);

    // A restarted daemon serves the same from the persisted indexes.
    let pid = app.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "daemon gone", || !pid_alive(pid));
    app.up().ok();
    wait_until(T, "v2 and v3 assets after a restart", || {
        status_of(&app, "/static/css/main-v2.css") == 200 && status_of(&app, "/static/css/main-v3.css") == 200
    });
    assert_eq!(status_of(&app, "/static/css/main-v1.css"), 404);
    app.run(&["down"]).ok();
}

#[test]
fn a_static_dir_missing_after_the_build_fails_the_deploy_before_anything_changes() {
    let app = app_with_statics();
    app.run(&["deploy"]).ok();
    let before = app.status()["instances"].clone();
    set_env(&app, "ASSETS", "none");
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("`staticfiles`"), "{}", r.stderr);
    assert!(r.stderr.contains("collectstatic"), "{}", r.stderr);
    let pids = |v: &serde_json::Value| {
        v.as_array().unwrap().iter().map(|i| (i["instance"].clone(), i["pid"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(pids(&before), pids(&app.status()["instances"]));
    let h: Vec<serde_json::Value> = serde_json::from_str(&app.run(&["history", "--json"]).stdout).unwrap();
    assert_eq!(h[0]["status"], "failed", "{h:#?}");
    // v1's assets are still served.
    assert_eq!(status_of(&app, "/static/css/main-v1.css"), 200);
    app.run(&["down"]).ok();
}

#[test]
fn a_release_whose_deploy_failed_does_not_win_a_path() {
    let app = app_with_statics();
    app.run(&["deploy"]).ok();
    wait_until(T, "v1's assets", || status_of(&app, "/static/css/main-v1.css") == 200);
    set_env(&app, "APP_VERSION", "bad");
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    // v2 was built (and indexed) but its release task failed: the running
    // v1's files are served, not v2's.
    wait_until(T, "v2's assets withdrawn", || status_of(&app, "/static/css/main-v2.css") == 404);
    assert_eq!(fetch(app.proxy(), "/static/robots.txt").2, "shared-v1\n");
    assert_eq!(status_of(&app, "/static/css/main-v1.css"), 200);
    app.run(&["down"]).ok();
}

#[test]
fn after_a_rollback_the_running_release_wins_and_the_newer_ones_files_stay() {
    let app = app_with_statics();
    app.run(&["deploy"]).ok();
    set_env(&app, "APP_VERSION", "2");
    app.run(&["deploy"]).ok();
    wait_until(T, "v2's robots.txt", || fetch(app.proxy(), "/static/robots.txt").2 == "shared-v2\n");
    let r = app.run(&["rollback"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // An unhashed name both releases have: the running v1's, although v2
    // is newer and retained.
    wait_until(T, "v1's robots.txt", || fetch(app.proxy(), "/static/robots.txt").2 == "shared-v1\n");
    // v2 went live: pages it rendered (still open) keep finding its files.
    assert_eq!(status_of(&app, "/static/css/main-v2.css"), 200);
    assert_eq!(status_of(&app, "/static/css/main-v1.css"), 200);
    // Rolled forward again: v2 wins once more.
    let r = app.run(&["rollback", "v2"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    wait_until(T, "v2's robots.txt again", || fetch(app.proxy(), "/static/robots.txt").2 == "shared-v2\n");
    app.run(&["down"]).ok();
}

/// Threads GETting `path` on new connections until stopped; every answer
/// that is not 200 with `want` (one the app gave, say) is kept.
struct StaticLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl StaticLoad {
    fn start(addr: SocketAddr, path: &'static str, want: &'static str, workers: usize) -> StaticLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut wrong) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // A connection the killed daemon had accepted dies
                        // with it (a known gap, see bench/zero-downtime):
                        // not what this test is about.
                        let Ok((code, _, body)) = try_fetch(addr, path) else { continue };
                        if code == 200 && body == want {
                            ok += 1;
                        } else {
                            wrong.push(format!("{code}: {body:?}"));
                        }
                    }
                    (ok, wrong)
                })
            })
            .collect();
        StaticLoad { stop, threads }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut wrong) = (0, Vec::new());
        for t in self.threads {
            let (o, w) = t.join().unwrap();
            ok += o;
            wrong.extend(w);
        }
        (ok, wrong)
    }
}

fn try_fetch(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no head"))?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

#[test]
fn a_new_daemon_serves_static_files_from_its_first_request() {
    // Many files, so that loading them takes a while.
    let app = app_with_statics();
    let spec = app.spec().replace(
        "build = [\"",
        "build = [\"mkdir -p staticfiles/many && python3 -c \\\"[open(f'staticfiles/many/{i}.txt', 'w').write(str(i) * 2000) for i in range(4000)]\\\"\", \"",
    );
    app.write_spec(&spec);
    app.run(&["deploy"]).ok();
    wait_until(SLOW, "v1's assets", || status_of(&app, "/static/css/base.0123456789ab.css") == 200);
    let load = StaticLoad::start(app.proxy(), "/static/css/base.0123456789ab.css", "hashed\n", 4);

    // An upgrade: the successor's proxy accepts on the same socket.
    let before = app.daemon_pid().unwrap();
    app.run(&["upgrade"]).ok();
    wait_until(SLOW, "the successor", || app.daemon_pid().is_some_and(|p| p != before));
    // A SIGKILL: the keeper starts a new daemon on the socket it holds.
    let victim = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(SLOW, "a new daemon", || app.daemon_pid().is_some_and(|p| p != victim && pid_alive(p)));
    wait_until(SLOW, "the new daemon answers", || app.run(&["status"]).code == 0);
    let (ok, wrong) = load.finish();
    assert!(ok > 0);
    assert!(
        wrong.is_empty(),
        "{} of {} answers were not the static file (the app answered, or a 404), first: {:?}",
        wrong.len(),
        ok + wrong.len() as u64,
        &wrong[..wrong.len().min(5)]
    );
    app.run(&["down"]).ok();
}
