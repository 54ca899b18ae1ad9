//! The keeper (`nonstop daemon` as `up` starts it): it holds the listening
//! sockets and starts a new daemon when the one it keeps dies, so the
//! public port never refuses a connection.

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn instance_pids(app: &TestApp) -> Vec<(String, i64)> {
    app.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance"].as_str().unwrap().to_string(), i["pid"].as_i64().unwrap()))
        .collect()
}

#[test]
fn a_killed_daemon_is_started_again_and_the_public_port_answers_meanwhile() {
    let app = TestApp::hello();
    app.up().ok();
    let before = instance_pids(&app);
    let keeper = app.keeper_pid().expect("up starts a keeper");
    let daemon = app.daemon_pid().expect("a daemon");
    assert_ne!(keeper, daemon);

    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    // Nobody runs a command: requests sent now wait in the backlog of the
    // socket the keeper holds, and are served by the daemon it starts.
    let started = Instant::now();
    let load = Load::start(app.proxy(), "/", 4);
    let (code, _) = app.get("/").expect("the public port refused or dropped a request while the daemon was down");
    assert_eq!(code, 200);
    let first_answer = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "requests failed while the daemon was restarted: {failures:?}");
    assert!(ok > 0);

    let new_daemon = app.daemon_pid().unwrap();
    assert_ne!(new_daemon, daemon, "a new daemon serves");
    assert!(pid_alive(new_daemon));
    assert_eq!(app.keeper_pid(), Some(keeper), "the same keeper");
    // The app was re-adopted as it was, not restarted.
    assert_eq!(instance_pids(&app), before, "instances were not re-adopted as they were");
    let events = app.run(&["events", "--json"]);
    events.ok();
    assert!(
        events.stdout.contains("daemon restarted by the keeper") && events.stdout.contains("killed by signal 9"),
        "the events say what happened: {}",
        events.stdout
    );
    eprintln!("first answer {first_answer:?} after the kill; {ok} requests, none failed");

    // `down` stops the app, the daemon and the keeper.
    app.run(&["down"]).ok();
    assert!(!pid_alive(keeper), "the keeper survived `down`");
    assert!(!pid_alive(new_daemon), "the daemon survived `down`");
    assert!(std::net::TcpStream::connect(app.proxy()).is_err(), "the public port is closed after `down`");
}

#[test]
fn sigterm_to_the_keeper_stops_the_daemon_and_leaves_the_app_running() {
    let app = TestApp::hello();
    app.up().ok();
    let before = instance_pids(&app);
    let keeper = app.keeper_pid().unwrap();
    let daemon = app.daemon_pid().unwrap();
    kill(Pid::from_raw(keeper), Signal::SIGTERM).unwrap();
    wait_until(T, "the keeper to exit", || !pid_alive(keeper));
    assert!(!pid_alive(daemon), "the daemon outlived its keeper's SIGTERM");
    for (_, pid) in &before {
        assert!(pid_alive(*pid as i32), "instance {pid} stopped with the daemon");
    }
    // Not a crash: nothing came back by itself.
    assert!(app.daemon_pid().is_none_or(|p| !pid_alive(p)), "a daemon was started again after a stop on purpose");
    let r = app.up();
    r.ok();
    assert_eq!(instance_pids(&app), before, "the next daemon re-adopts the app");
}

#[test]
fn a_daemon_that_fails_at_start_is_reported_not_restarted_forever() {
    let app = TestApp::hello();
    // The API's TCP address is taken: the daemon cannot start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let child = app.cmd(&["up"]).env("NONSTOP_API_LISTEN", &addr).spawn().unwrap();
    let out = wait_output(child, T, "nonstop up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exited at start"), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen for the API on {addr}")), "{stderr}");
    // `up` returned because the keeper it started gave up (and cleaned up).
    assert!(app.keeper_pid().is_none(), "the keeper is still there");
    assert!(app.log().contains("before it served; the keeper gives up"), "{}", app.log());
}

#[test]
fn a_client_cut_off_by_a_dying_daemon_is_not_told_about_versions() {
    let app = TestApp::hello();
    app.up().ok();
    // `logs --follow` holds a stream open; the daemon dies under it.
    let follow = app.cmd(&["logs", "--follow"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let daemon = app.daemon_pid().unwrap();
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    let out = wait_output(follow, T, "nonstop logs --follow");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("same version"), "{stderr}");
    assert!(stderr.contains("stopped answering") && stderr.contains("crashed"), "{stderr}");
}
