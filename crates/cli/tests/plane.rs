//! The data plane: with a keeper, the proxy (client connections, health
//! checks, the route table) runs in the keeper, and the daemon drives it
//! over `plane.sock`. A SIGKILLed daemon takes no client connection with
//! it, health checks go on while no daemon runs, and the next daemon
//! resyncs with the data plane's table.

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The data plane's backend table, read over its protocol as a daemon
/// would (a hello, then a table call).
fn plane_table(app: &TestApp) -> Vec<Value> {
    let stream = UnixStream::connect(app.home.path().join("plane.sock")).expect("the keeper serves plane.sock");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut answer = |id: u64, request: Value| -> Value {
        writeln!(writer, "{}", serde_json::json!({"id": id, "request": request})).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], id, "{line}");
        v["result"]["Ok"].clone()
    };
    let hello = answer(1, serde_json::json!({"op": "hello", "version": 1, "workers": 0}));
    assert_eq!(hello["reply"], "hello", "{hello}");
    let table = answer(2, serde_json::json!({"op": "table"}));
    table["backends"].as_array().cloned().unwrap_or_default()
}

/// (instance id, health) of every backend in the data plane.
fn plane_health(app: &TestApp) -> Vec<(String, String)> {
    plane_table(app)
        .iter()
        .map(|b| {
            let i = &b["backend"]["instance"];
            let id = format!("{}.{}#{}", i["process"].as_str().unwrap(), i["slot"], i["generation"]);
            (id, b["status"]["health"].as_str().unwrap().to_string())
        })
        .collect()
}

/// The web instances of `status`: (id, pid, health).
fn web(app: &TestApp) -> Vec<(String, i64, String)> {
    app.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["process"] == "web")
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["pid"].as_i64().unwrap_or(0),
                i["health"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn all_web_healthy(app: &TestApp, n: usize) -> bool {
    let w = web(app);
    w.len() == n && w.iter().all(|(_, _, h)| h == "healthy")
}

/// The data plane holds exactly the web instances `status` shows, once
/// each.
fn assert_plane_matches_status(app: &TestApp) {
    let plane = plane_health(app);
    let ids: Vec<String> = plane.iter().map(|(i, _)| i.clone()).collect();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate backends in the data plane: {plane:?}");
    let status: BTreeSet<String> = web(app).into_iter().map(|(i, _, _)| i).collect();
    assert_eq!(unique, status, "the data plane's backends are not the instances status shows");
}

fn wait_for_new_daemon(app: &TestApp, old: i32) -> i32 {
    wait_until(T, "a new daemon to answer", || {
        app.note_daemon();
        app.daemon_pid().is_some_and(|p| p != old && pid_alive(p))
            && app.run_with_timeout(&["status", "--json"], Duration::from_secs(30)).code == 0
    });
    app.daemon_pid().unwrap()
}

#[test]
fn requests_in_flight_when_the_daemon_is_sigkilled_are_answered() {
    let app = TestApp::hello();
    app.up().ok();
    let keeper = app.keeper_pid().expect("up starts a keeper");
    let daemon = app.daemon_pid().unwrap();
    // Continuous load of slow requests: some are in flight at any moment.
    let load = Load::start(app.proxy(), "/slow?ms=400", 8);
    wait_until(T, "requests in flight in the data plane", || {
        plane_table(&app).iter().map(|b| b["status"]["in_flight"].as_u64().unwrap()).sum::<u64>() > 0
    });
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    let new_daemon = wait_for_new_daemon(&app, daemon);
    // And some more load with the new daemon.
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "requests failed across the daemon's SIGKILL: {failures:?}");
    assert!(ok > 0);
    assert_ne!(new_daemon, daemon);
    assert_eq!(app.keeper_pid(), Some(keeper), "the same keeper (data plane) served throughout");
    assert!(all_web_healthy(&app, 2), "{:?}", web(&app));
    assert_plane_matches_status(&app);
}

#[test]
fn health_checks_go_on_without_a_daemon_and_the_next_one_resyncs() {
    let app = TestApp::hello();
    app.up().ok();
    let daemon = app.daemon_pid().unwrap();
    let before = web(&app);
    assert_eq!(before.len(), 2);
    assert_plane_matches_status(&app);
    // No daemon acts from now on (stopped, then killed).
    kill(Pid::from_raw(daemon), Signal::SIGSTOP).unwrap();
    let load = Load::start(app.proxy(), "/", 4);
    let (victim, victim_pid, _) = before[0].clone();
    kill(Pid::from_raw(victim_pid as i32), Signal::SIGKILL).unwrap();
    // The data plane's own checks take it out of rotation.
    wait_until(T, "the killed instance to leave rotation in the data plane", || {
        plane_health(&app).iter().any(|(i, h)| *i == victim && h == "unhealthy")
    });
    let survivor = &before[1].0;
    assert!(plane_health(&app).iter().any(|(i, h)| i == survivor && h == "healthy"), "{:?}", plane_health(&app));
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "requests failed while no daemon ran: {failures:?}");
    assert!(ok > 0);

    // A new daemon: the survivor is kept as the data plane knows it, the
    // dead instance's backend removed, its slot refilled; no duplicates.
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    wait_for_new_daemon(&app, daemon);
    wait_until(T, "two healthy web instances", || all_web_healthy(&app, 2));
    let after = web(&app);
    assert!(after.iter().any(|(i, _, _)| i == survivor), "the survivor was not re-adopted: {after:?}");
    assert!(!after.iter().any(|(i, _, _)| *i == victim), "the dead instance is still shown: {after:?}");
    assert_plane_matches_status(&app);
    let log = app.log();
    assert!(log.contains("resynced with the data plane: 1 backend(s) kept"), "{log}");
    assert!(log.contains("removing the backend of an instance that is gone"), "{log}");
}

#[test]
fn a_daemon_killed_mid_drain_leaves_the_drain_to_the_data_plane() {
    let app = TestApp::hello();
    app.up().ok();
    let daemon = app.daemon_pid().unwrap();
    // Slow requests on both instances, then a scale-down: one instance is
    // drained while they run.
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let addr = app.proxy();
            std::thread::spawn(move || http_get(addr, "/slow?ms=3000"))
        })
        .collect();
    wait_until(T, "the slow requests to be in flight", || {
        plane_table(&app).iter().map(|b| b["status"]["in_flight"].as_u64().unwrap()).sum::<u64>() >= 6
    });
    let scale = app.cmd(&["scale", "web=1"]).spawn().unwrap();
    wait_until(T, "a backend to drain", || plane_health(&app).iter().any(|(_, h)| h == "draining"));
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    let _ = wait_output(scale, T, "nonstop scale");
    for r in slow {
        let (code, _) = r.join().unwrap().expect("a request in flight through a drain was dropped");
        assert_eq!(code, 200);
    }
    // The next daemon finishes the stop; the data plane ends with one backend.
    wait_for_new_daemon(&app, daemon);
    wait_until(T, "one healthy web instance", || all_web_healthy(&app, 1));
    wait_until(T, "the data plane to hold one backend", || plane_health(&app).len() == 1);
    assert_plane_matches_status(&app);
}

#[test]
fn a_daemon_without_a_keeper_runs_the_proxy_itself() {
    let app = TestApp::hello();
    let daemon = app.cmd(&["daemon", "--no-keeper"]).spawn().unwrap();
    wait_until(T, "the daemon to answer", || !app.run(&["status"]).stderr.contains("is not running"));
    app.note_daemon();
    app.up().ok();
    assert_eq!(app.get("/").unwrap().0, 200);
    assert!(app.keeper_pid().is_none(), "no keeper");
    assert!(!app.home.path().join("plane.sock").exists(), "no data plane");
    app.run(&["down"]).ok();
    let _ = wait_output(daemon, T, "nonstop daemon --no-keeper");
}

#[test]
fn an_upgrade_replaces_the_daemon_and_keeps_the_data_plane() {
    let app = TestApp::hello();
    app.up().ok();
    let keeper = app.keeper_pid().unwrap();
    let daemon = app.daemon_pid().unwrap();
    let load = Load::start(app.proxy(), "/slow?ms=200", 4);
    let r = app.run(&["upgrade", "--json"]);
    r.ok();
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["old_pid"], daemon, "{v}");
    assert_eq!(v["data_plane"]["pid"], keeper, "{v}");
    assert_eq!(v["data_plane"]["upgraded"], false, "the report says the data plane was not replaced: {v}");
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "requests failed during the upgrade: {failures:?}");
    assert!(ok > 0);
    assert_eq!(app.keeper_pid(), Some(keeper));
    assert!(all_web_healthy(&app, 2), "{:?}", web(&app));
    assert_plane_matches_status(&app);
    let text = app.run(&["upgrade"]);
    text.ok();
    assert!(
        text.stdout.contains("the data plane (the proxy, in keeper pid") && text.stdout.contains("not replaced"),
        "{}",
        text.stdout
    );
}

#[test]
fn the_data_plane_refuses_calls_out_of_order_other_versions_and_garbage() {
    let app = TestApp::hello();
    app.up().ok();
    let socket = app.home.path().join("plane.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600, "plane.sock is private");
    let exchange = |lines: &[&str]| -> Vec<Value> {
        let stream = UnixStream::connect(&socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut out = Vec::new();
        for l in lines {
            if writeln!(writer, "{l}").is_err() {
                break; // closed by the data plane
            }
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            out.push(serde_json::from_str(&line).unwrap());
        }
        out
    };
    // Not a hello first.
    let a = exchange(&[r#"{"id":1,"request":{"op":"table"}}"#]);
    assert_eq!(a[0]["result"]["Err"]["error"], "protocol", "{a:?}");
    assert!(a[0]["result"]["Err"]["reason"].as_str().unwrap().contains("hello"), "{a:?}");
    // Another version: refused, naming both.
    let a = exchange(&[r#"{"id":1,"request":{"op":"hello","version":99,"workers":0}}"#]);
    assert_eq!(a[0]["result"]["Err"], serde_json::json!({"error": "version", "plane": 1, "daemon": 99}), "{a:?}");
    // Garbage: an error, then the connection is closed.
    let a = exchange(&["hello there", r#"{"id":2,"request":{"op":"table"}}"#]);
    assert_eq!(a.len(), 1, "the connection stays open after garbage: {a:?}");
    assert_eq!(a[0]["result"]["Err"]["error"], "protocol", "{a:?}");
    // Nothing of this changed what the proxy serves.
    assert_eq!(app.get("/").unwrap().0, 200);
    assert_eq!(plane_table(&app).len(), 2);
}
