//! Maintenance mode and stopping/starting an app on purpose, end to end:
//! the real binary, its daemon, real app processes, real sockets.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// One request over a fresh connection: (status, headers, body).
fn request(app: &TestApp, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&app.proxy(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    split(&String::from_utf8_lossy(&buf))
}

fn split(text: &str) -> (u16, String, String) {
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn web_healthy(app: &TestApp, n: usize) -> bool {
    let s = app.status();
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["process"] == "web" && i["state"] == "running" && i["health"] == "healthy")
        .count()
        == n
}

/// `POST path` with a JSON body to the daemon's API on its unix socket:
/// (status, body).
fn api_post(app: &TestApp, path: &str, json: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(app.home.path().join("nonstop.sock")).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: nonstop\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (status, _, body) = split(&buf);
    (status, body)
}

#[test]
fn maintenance_answers_503_lets_allowed_addresses_through_keeps_checking_and_survives_a_daemon_restart() {
    let app = TestApp::hello();
    app.up().ok();
    // A keep-alive connection open from before the switch.
    let mut kept = TcpStream::connect(app.proxy()).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut ask_kept = || {
        write!(kept, "GET / HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            kept.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let len: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap();
        let mut body = vec![0u8; len];
        kept.read_exact(&mut body).unwrap();
        (head.split_whitespace().nth(1).unwrap().parse::<u16>().unwrap(), String::from_utf8_lossy(&body).into_owned())
    };
    assert_eq!(ask_kept().0, 200);

    let r = app.run(&["maintenance", "on"]);
    r.ok();
    assert!(r.stdout.contains("maintenance on"), "{}", r.stdout);
    let (code, head, body) = request(&app, "GET", "/", "");
    assert_eq!(code, 503, "{head}{body}");
    assert!(head.contains("retry-after: 60"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
    assert!(body.contains("Down for maintenance"), "{body}");
    // Every request, whatever its method or path.
    assert_eq!(request(&app, "POST", "/anything", "x=1").0, 503);
    // The connection opened before the switch gets it on its next request.
    let (code, body) = ask_kept();
    assert_eq!((code, body.contains("Down for maintenance")), (503, true));
    // Instances keep running and are still checked: a new one becomes
    // healthy and enters rotation behind the maintenance page.
    let s = app.status();
    assert_eq!(s["maintenance"]["by"], "user", "{s}");
    assert_eq!(s["state"], "running");
    app.run(&["scale", "web=3"]).ok();
    assert!(web_healthy(&app, 3));
    let text = app.run(&["status"]).ok().stdout.clone();
    assert!(text.contains("maintenance on since"), "{text}");

    // A page of one's own (relative to the current directory), and the
    // loopback address let through.
    std::fs::write(app.dir.path().join("sorry.html"), "<h1>Back at noon</h1>\n").unwrap();
    app.run(&["maintenance", "on", "--page", "sorry.html", "--allow", "127.0.0.1", "--retry-after", "300"]).ok();
    let (code, _, body) = request(&app, "GET", "/", "");
    assert_eq!(code, 200, "127.0.0.1 is allowed: {body}");
    assert!(body.contains("hello from web."), "{body}");
    app.run(&["maintenance", "on", "--page", "sorry.html", "--allow", "10.0.0.0/8", "--retry-after", "300"]).ok();
    let (code, head, body) = request(&app, "GET", "/", "");
    assert_eq!((code, body.as_str()), (503, "<h1>Back at noon</h1>\n"));
    assert!(head.contains("retry-after: 300"), "{head}");

    // The daemon dies: the next one serves the maintenance page again
    // before anyone touches it.
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    wait_until(T, "a new daemon", || app.daemon_pid().is_some_and(|p| p != daemon) && app.run(&["status"]).code == 0);
    app.note_daemon();
    let (code, _, body) = request(&app, "GET", "/", "");
    assert_eq!((code, body.as_str()), (503, "<h1>Back at noon</h1>\n"), "maintenance did not survive the restart");
    assert_eq!(app.status()["maintenance"]["allow"][0], "10.0.0.0/8");

    let r = app.run(&["maintenance", "off", "--json"]);
    r.ok();
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["changed"], true);
    let (code, _, body) = request(&app, "GET", "/", "");
    assert_eq!(code, 200, "{body}");
    assert!(app.status().get("maintenance").is_none());
    // Off again: harmless.
    assert!(app.run(&["maintenance", "off"]).ok().stdout.contains("already off"));
}

#[test]
fn bad_maintenance_input_is_refused_naming_the_problem_and_changes_nothing() {
    let app = TestApp::hello();
    app.up().ok();
    let unchanged = |app: &TestApp| {
        assert!(app.status().get("maintenance").is_none(), "maintenance changed");
        assert_eq!(request(app, "GET", "/", "").0, 200);
    };
    // A page that does not exist: named, with the directory it was looked
    // for in.
    let r = app.run(&["maintenance", "on", "--page", "missing.html"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("maintenance page missing.html does not exist"), "{}", r.stderr);
    assert!(r.stderr.contains("relative paths are from the current directory"), "{}", r.stderr);
    unchanged(&app);
    // A directory, and a page too large.
    assert_eq!(app.run(&["maintenance", "on", "--page", "."]).code, 2);
    std::fs::write(app.dir.path().join("huge.html"), vec![b'x'; 1024 * 1024 + 1]).unwrap();
    let r = app.run(&["maintenance", "on", "--page", "huge.html"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("at most 1048576"), "{}", r.stderr);
    // An allow-list entry that is not an address or a network.
    let r = app.run(&["maintenance", "on", "--allow", "10.0.0.1", "office"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("allow-list entry `office` is not an IP address or a CIDR network"), "{}", r.stderr);
    assert!(r.stderr.contains("10.0.0.0/8"), "the fix shows the syntax: {}", r.stderr);
    let r = app.run(&["maintenance", "on", "--allow", "10.1.2.3/8", "--json"]);
    assert_eq!(r.code, 2);
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(v["message"].as_str().unwrap().contains("did you mean `10.0.0.0/8`"), "{v}");
    unchanged(&app);

    // The API refuses the same input the same way (a script, another client).
    let (code, body) = api_post(&app, "/v1/maintenance", r#"{"on":true,"allow":["office"],"who":"t"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("allow-list entry `office` is not an IP address or a CIDR network"), "{body}");
    let big = "x".repeat(1024 * 1024 + 1);
    let (code, body) = api_post(&app, "/v1/maintenance", &format!(r#"{{"on":true,"page":"{big}","who":"t"}}"#));
    assert_eq!(code, 400);
    assert!(body.contains("at most 1048576"), "{}", &body[..body.len().min(300)]);
    let (code, body) = api_post(&app, "/v1/maintenance", r#"{"on":false,"allow":["10.0.0.0/8"],"who":"t"}"#);
    assert_eq!(code, 400);
    assert!(body.contains("only go with maintenance on"), "{body}");
    let (code, body) = api_post(&app, "/v1/maintenance", r#"{"on":true,"retry_after_secs":100000,"who":"t"}"#);
    assert_eq!(code, 400);
    assert!(body.contains("more than a day"), "{body}");
    unchanged(&app);
}

const NOTES_TOML: &str = r#"app = "notes"

[proxy]
listen = "127.0.0.1:8080"

[processes.web]
command = "exec python3 notes.py"
kind = "web"
count = 2

[processes.web.health]
path = "/health"
interval = "300ms"
healthy_threshold = 2

[processes.worker]
command = "exec python3 jobs.py"
kind = "worker"
count = 1
ready_after = "1s"
stop_timeout = "20s"
"#;

/// A web process that stores rows in a file of its NONSTOP_DATA_DIR.
const NOTES_PY: &str = r#"import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ["PORT"])
ROWS = os.path.join(os.environ["NONSTOP_DATA_DIR"], "rows")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, code, text):
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/rows":
            try:
                with open(ROWS) as f:
                    return self.send(200, f.read())
            except FileNotFoundError:
                return self.send(200, "")
        return self.send(200, "notes\n")

    def do_POST(self):
        row = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        with open(ROWS, "a") as f:
            f.write(row + "\n")
            f.flush()
            os.fsync(f.fileno())
        return self.send(201, "stored\n")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever(poll_interval=0.05)
"#;

/// A worker whose jobs take a second; on SIGTERM it finishes the job it is
/// doing, then exits.
const JOBS_PY: &str = r#"import os, signal, sys, time

stopping = False


def stop(signum, frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
log = open(os.path.join(os.environ["NONSTOP_DATA_DIR"], "jobs"), "a")
n = 0
while not stopping:
    n += 1
    log.write(f"start {os.getpid()} {n}\n")
    log.flush()
    time.sleep(1.0)  # the job; a signal does not cut it short (PEP 475)
    log.write(f"done {os.getpid()} {n}\n")
    log.flush()
log.write(f"exit {os.getpid()}\n")
log.flush()
sys.exit(0)
"#;

fn notes_app() -> TestApp {
    let app = TestApp::new("hello", |_| NOTES_TOML.to_string());
    std::fs::write(app.dir.path().join("notes.py"), NOTES_PY).unwrap();
    std::fs::write(app.dir.path().join("jobs.py"), JOBS_PY).unwrap();
    app
}

fn data_file(app: &TestApp, process: &str, name: &str) -> String {
    std::fs::read_to_string(app.home.path().join("data/notes").join(process).join(name)).unwrap_or_default()
}

fn instances(app: &TestApp) -> usize {
    app.status()["instances"].as_array().unwrap().len()
}

#[test]
fn stop_and_start_keep_the_data_and_the_counts_and_a_stopped_app_stays_stopped() {
    let app = notes_app();
    app.up().ok();
    app.run(&["scale", "web=3"]).ok();
    for i in 1..=5 {
        assert_eq!(request(&app, "POST", "/rows", &format!("row {i}")).0, 201);
    }
    wait_until(T, "a job done", || data_file(&app, "worker", "jobs").contains("done"));

    let r = app.run(&["stop", "--json"]);
    r.ok();
    let last: Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "result", "{}", r.stdout);
    assert!(r.stdout.contains("web.1") && r.stdout.contains("stopped"), "progress names the instances: {}", r.stdout);
    // Nothing runs, the app is stopped (not failed), in maintenance.
    let s = app.status();
    assert_eq!(s["state"], "stopped", "{s}");
    assert_eq!(s["instances"].as_array().unwrap().len(), 0, "{s}");
    assert_eq!(s["maintenance"]["by"], "stop");
    assert_eq!(s["stopped"]["counts"]["web"], 3, "the scaled count is remembered: {s}");
    let (code, _, body) = request(&app, "GET", "/rows", "");
    assert_eq!(code, 503);
    assert!(body.contains("Down for maintenance"), "{body}");
    let text = app.run(&["status"]).ok().stdout.clone();
    assert!(text.contains("stopped since") && text.contains("web=3"), "{text}");
    // The worker finished the job it was doing when it was told to stop.
    let jobs = data_file(&app, "worker", "jobs");
    let started: Vec<&str> = jobs.lines().filter_map(|l| l.strip_prefix("start ")).collect();
    let done: Vec<&str> = jobs.lines().filter_map(|l| l.strip_prefix("done ")).collect();
    assert_eq!(started, done, "a job was cut short:\n{jobs}");
    assert!(jobs.lines().last().unwrap().starts_with("exit "), "{jobs}");

    // Stopping again, and what would change what runs, are refused or
    // harmless; nothing starts.
    let r = app.run(&["stop"]);
    r.ok();
    assert!(r.stdout.contains("already stopped"), "{}", r.stdout);
    for args in [&["deploy"][..], &["scale", "web=1"], &["restart"], &["up"]] {
        let r = app.run(args);
        assert_eq!(r.code, 3, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("the app is stopped") && r.stderr.contains("run `nonstop start` first"),
            "{}",
            r.stderr
        );
    }
    assert_eq!(instances(&app), 0);

    // A daemon restart keeps it stopped.
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    wait_until(T, "a new daemon", || app.daemon_pid().is_some_and(|p| p != daemon) && app.run(&["status"]).code == 0);
    app.note_daemon();
    let s = app.status();
    assert_eq!((s["state"].as_str(), s["instances"].as_array().unwrap().len()), (Some("stopped"), 0), "{s}");
    assert_eq!(request(&app, "GET", "/", "").0, 503);

    // start: the counts come back, maintenance goes off once web is
    // healthy, and every row written before the stop is there.
    let r = app.run(&["start"]);
    r.ok();
    let s = app.status();
    assert_eq!(s["state"], "running", "{s}");
    assert!(s.get("maintenance").is_none() && s.get("stopped").is_none(), "{s}");
    let counts: Vec<(String, u64)> = s["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["process"].as_str().unwrap().to_string(), p["desired"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts, vec![("web".to_string(), 3), ("worker".to_string(), 1)]);
    assert!(web_healthy(&app, 3));
    let (code, _, rows) = request(&app, "GET", "/rows", "");
    assert_eq!(code, 200);
    assert_eq!(rows, "row 1\nrow 2\nrow 3\nrow 4\nrow 5\n");
    let r = app.run(&["start"]);
    r.ok();
    assert!(r.stdout.contains("not stopped"), "{}", r.stdout);
    // And it deploys again.
    app.run(&["deploy"]).ok();
    assert_eq!(request(&app, "GET", "/rows", "").2, rows);
}

#[test]
fn a_start_whose_web_never_gets_healthy_fails_and_stays_in_maintenance_until_it_is() {
    let app = TestApp::hello();
    let fail = app.dir.path().join("fail-health");
    app.write_spec(&app.spec().replace(
        "drain_timeout = \"10s\"",
        &format!(
            "drain_timeout = \"10s\"\nenv = {{ FAIL_HEALTH_FILE = \"{}\" }}\n\n[processes.web.rollout]\nhealth_timeout = \"3s\"",
            fail.display()
        ),
    ));
    app.up().ok();
    app.run(&["stop"]).ok();
    // The web instances that start will fail their checks.
    std::fs::write(&fail, "").unwrap();
    let r = app.run(&["start"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("start did not finish"), "{}", r.stderr);
    assert!(r.stderr.contains("stays in maintenance"), "{}", r.stderr);
    let s = app.status();
    assert_eq!(s["state"], "starting", "{s}");
    assert_eq!(s["maintenance"]["by"], "stop");
    assert_eq!(request(&app, "GET", "/", "").0, 503);
    // Fixed (a restart is not refused once the app was started): web gets
    // healthy, and maintenance goes off by itself.
    std::fs::remove_file(&fail).unwrap();
    app.run(&["restart", "web"]).ok();
    wait_until(T, "maintenance off once web is healthy", || app.status()["state"] == "running");
    assert!(app.status().get("maintenance").is_none());
    assert_eq!(request(&app, "GET", "/", "").0, 200);
}

#[test]
fn maintenance_turned_on_by_hand_outlives_stop_and_start() {
    let app = TestApp::hello();
    app.up().ok();
    app.run(&["maintenance", "on", "--allow", "10.0.0.0/8"]).ok();
    let r = app.run(&["stop"]);
    r.ok();
    assert!(r.stdout.contains("maintenance stays on"), "{}", r.stdout);
    let r = app.run(&["start"]);
    r.ok();
    assert!(r.stdout.contains("maintenance stays on"), "{}", r.stdout);
    let s = app.status();
    assert_eq!((s["state"].as_str(), s["maintenance"]["by"].as_str()), (Some("running"), Some("user")), "{s}");
    assert!(web_healthy(&app, 2));
    assert_eq!(request(&app, "GET", "/", "").0, 503);
    app.run(&["maintenance", "off"]).ok();
    assert_eq!(request(&app, "GET", "/", "").0, 200);
}
