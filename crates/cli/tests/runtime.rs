//! End-to-end tests of the core runtime with real processes and sockets:
//! the `nonstop` binary, its daemon, the example app under examples/hello.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn web_running_healthy(app: &TestApp, n: usize) -> bool {
    let s = app.status();
    let ok = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["process"] == "web" && i["state"] == "running" && i["health"] == "healthy")
        .count();
    let all = s["instances"].as_array().unwrap().iter().filter(|i| i["process"] == "web").count();
    ok == n && all == n
}

#[test]
fn several_spec_errors_are_reported_with_locations_and_nothing_starts() {
    let app = TestApp::hello();
    app.write_spec(
        r#"app = "hello"

[processes.web]
comand = "python3 app.py"
count = 2
stop_timeout = "ten seconds"

[processes.beat]
kind = "singleton"
command = "python3 beat.py"
count = 2
"#,
    );
    let r = app.run(&["up"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // Each problem names the file, line and column.
    assert!(r.stderr.contains("nonstop.toml:4:1"), "unknown key location:\n{}", r.stderr);
    assert!(r.stderr.contains("comand"), "{}", r.stderr);
    assert!(r.stderr.contains("nonstop.toml:6:"), "bad duration location:\n{}", r.stderr);
    assert!(r.stderr.contains("nonstop.toml:11:"), "singleton count location:\n{}", r.stderr);
    assert!(r.stderr.contains("nothing was changed"), "{}", r.stderr);
    assert!(app.daemon_pid().is_none(), "a bad spec must not start the daemon");
}

#[test]
fn malformed_toml_is_refused_with_its_location() {
    let app = TestApp::hello();
    app.write_spec("app = \"hello\"\n[processes.web\ncommand = \"x\"\n");
    let r = app.run(&["up"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("nonstop.toml:2:"), "{}", r.stderr);
}

#[test]
fn up_serves_scale_up_and_down_and_down_leaves_no_process() {
    let app = TestApp::hello();
    let r = app.up();
    r.ok();
    assert!(r.stdout.contains(&format!("serving on http://{}", app.proxy())), "{}", r.stdout);
    let (code, body) = app.get("/").unwrap();
    assert_eq!(code, 200);
    assert!(body.starts_with("hello from web."), "{body}");
    // X-Forwarded-* reach the app.
    let (_, headers) = app.get("/headers").unwrap();
    assert!(headers.to_ascii_lowercase().contains("x-forwarded-for: 127.0.0.1"), "{headers}");
    assert!(headers.to_ascii_lowercase().contains("x-request-id"), "{headers}");

    let s = app.status();
    let by = |p: &str| s["instances"].as_array().unwrap().iter().filter(|i| i["process"] == p).count();
    assert_eq!((by("web"), by("worker"), by("beat")), (2, 1, 1), "{s:#}");
    for i in s["instances"].as_array().unwrap() {
        assert_eq!(i["state"], "running", "{i}");
        assert!(i["pid"].as_i64().is_some());
    }
    let human = app.run(&["status"]);
    human.ok();
    for col in ["PROCESS", "INSTANCE", "PID", "PORT", "STATE", "HEALTH", "RESTARTS", "UPTIME", "web.1", "healthy"] {
        assert!(human.stdout.contains(col), "missing {col} in\n{}", human.stdout);
    }

    app.run(&["scale", "web=4"]).ok();
    assert!(web_running_healthy(&app, 4));
    // Requests spread over the instances.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (_, body) = app.get("/").unwrap();
        seen.insert(body.split_whitespace().nth(2).unwrap_or("").to_string());
    }
    assert!(seen.len() >= 3, "requests went to {seen:?}");

    app.run(&["scale", "web=1", "worker=2"]).ok();
    assert!(web_running_healthy(&app, 1));
    assert_eq!(app.pids("worker").len(), 2);

    // Every instance's process group, the monitors and the daemon: gone after down.
    let groups: Vec<i32> =
        app.status()["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_i64().unwrap() as i32).collect();
    let daemon = app.daemon_pid().expect("daemon pid");
    app.run(&["down"]).ok();
    for g in &groups {
        assert!(!group_alive(*g), "process group {g} survived `down`");
    }
    assert!(!pid_alive(daemon), "the daemon survived `down`");
    let r = app.run(&["status"]);
    assert_eq!(r.code, 3, "status without a daemon: {}", r.stderr);
    assert!(r.stderr.contains("not running"), "{}", r.stderr);
}

#[test]
fn a_killed_web_instance_loses_no_request_and_is_replaced() {
    let app = TestApp::new("hello", |s| s.replace("count = 2", "count = 3"));
    app.up().ok();
    assert!(web_running_healthy(&app, 3));
    let before = app.pids("web");
    let load = Load::start(app.proxy(), "/", 6);
    // Let load build up, then kill one instance (the whole process, no warning).
    wait_until(T, "some traffic", || app.get("/").is_ok());
    let victim = before[1];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "a replacement web instance", || {
        let now = app.pids("web");
        !now.contains(&victim) && now.len() == 3 && web_running_healthy(&app, 3)
    });
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests of {}: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 50, "only {ok} requests ran");
    let s = app.status();
    let restarts: u64 = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["process"] == "web")
        .map(|i| i["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(restarts, 1, "{s:#}");
}

#[test]
fn rolling_restart_drops_no_request_and_replaces_every_instance() {
    let app = TestApp::hello();
    app.up().ok();
    let before = app.pids("web");
    let load = Load::start(app.proxy(), "/", 4);
    wait_until(T, "some traffic", || app.get("/").is_ok());
    app.run(&["restart", "web"]).ok();
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(ok > 20, "only {ok} requests");
    let after = app.pids("web");
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|p| !before.contains(p)), "before {before:?} after {after:?}");
    for p in before {
        assert!(!group_alive(p), "old instance {p} still running");
    }
}

#[test]
fn a_singleton_never_has_two_instances_even_during_restart() {
    let app = TestApp::hello();
    app.up().ok();
    let lock_log = app.dir.path().join("beat.lock.log");
    let doubled = app.dir.path().join("beat.lock.doubled");
    // Sample status while restarting everything, then the singleton alone.
    let sampler_app_home = app.home.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let dir = app.dir.path().to_path_buf();
    let sampler = std::thread::spawn(move || {
        let mut max = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let out = std::process::Command::new(bin())
                .args(["status", "--json"])
                .current_dir(&dir)
                .env("NONSTOP_HOME", &sampler_app_home)
                .output()
                .unwrap();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let n = v["instances"].as_array().unwrap().iter().filter(|i| i["process"] == "beat").count();
                max = max.max(n);
            }
        }
        max
    });
    app.run(&["restart"]).ok();
    app.run(&["restart", "beat"]).ok();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_seen = sampler.join().unwrap();
    assert!(max_seen <= 1, "status showed {max_seen} beat instances at once");
    assert!(!doubled.exists(), "beat ran twice: {}", std::fs::read_to_string(&doubled).unwrap_or_default());
    // start/stop lines never interleave: start, stop, start, stop, start
    let log = std::fs::read_to_string(&lock_log).unwrap();
    let events: Vec<&str> = log.lines().map(|l| l.split_whitespace().nth(2).unwrap()).collect();
    assert!(events.len() >= 5, "{log}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(*e, if i % 2 == 0 { "start" } else { "stop" }, "overlap in\n{log}");
    }
}

#[test]
fn run_uses_the_app_environment_and_propagates_exit_codes() {
    let app = TestApp::hello();
    app.up().ok();
    let r = app.run(&["run", "--", "echo $GREETING from $NONSTOP_APP in $PWD; exit 7"]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(r.stdout.contains("hello from hello in"), "{}", r.stdout);
    let r = app.run(&["run", "--", "python3", "-c", "import sys; sys.exit(3)"]);
    assert_eq!(r.code, 3);
    let r = app.run(&["run", "--", "no-such-program-xyz"]);
    assert_eq!(r.code, 127, "{}", r.stderr);
    let r = app.run(&["run", "--", "true"]);
    assert_eq!(r.code, 0);
}

#[test]
fn a_daemon_killed_with_sigkill_is_restarted_and_readopts_its_instances() {
    let app = TestApp::hello();
    app.up().ok();
    let before: Vec<(String, i64)> = app.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance"].as_str().unwrap().to_string(), i["pid"].as_i64().unwrap()))
        .collect();
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    // The app's instances are still there.
    for (_, pid) in &before {
        assert!(pid_alive(*pid as i32), "instance {pid} died with the daemon");
    }
    let r = app.up();
    r.ok();
    assert!(r.stdout.contains("nothing changed"), "{}", r.stdout);
    let after: Vec<(String, i64)> = app.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance"].as_str().unwrap().to_string(), i["pid"].as_i64().unwrap()))
        .collect();
    assert_eq!(before, after, "instances were not re-adopted as they were");
    let (code, _) = app.get("/").unwrap();
    assert_eq!(code, 200);
    // Still supervised: a killed instance comes back.
    let victim = after.iter().find(|(i, _)| i == "worker.1").unwrap().1 as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "worker.1 replaced", || {
        let p = app.pids("worker");
        p.len() == 1 && p[0] != victim
    });
}

#[test]
fn down_after_the_daemon_was_killed_stops_the_instances_it_left_running() {
    let app = TestApp::hello();
    app.up().ok();
    let pids: Vec<i32> =
        app.status()["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_i64().unwrap() as i32).collect();
    assert!(!pids.is_empty());
    // The keeper too, or it would start a new daemon at once (see
    // tests/keeper.rs): this is the daemon dead for good.
    let keeper = app.keeper_pid().expect("a keeper");
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the keeper to die", || !pid_alive(keeper));
    // The daemon exits by itself once its data plane (the keeper) is gone;
    // killed if it has not yet.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL);
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    let r = app.run(&["down"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // Either a daemon is started to stop them gracefully, or (when it
    // finds no record of a live instance at first: seen once under a heavy
    // load) they are stopped from their records; stopped they are.
    assert!(
        r.stdout.contains("instance(s) are: starting it to stop them")
            || r.stdout.contains("stopped from the records under instances/"),
        "{}",
        r.stdout
    );
    for pid in &pids {
        wait_until(T, "the instances left running to stop", || !pid_alive(*pid));
    }
    // Nothing left: a second down has nothing to do.
    let r = app.run(&["down"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("nothing to do"), "{}", r.stdout);
}

#[test]
fn a_command_that_does_not_exist_is_refused_before_anything_starts() {
    let app = TestApp::new("hello", |s| s.replace("exec python3 worker.py", "exec no-such-worker-xyz --flag"));
    let r = app.up();
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("`no-such-worker-xyz` was not found"), "{}", r.stderr);
    assert!(r.stderr.contains("processes.worker.command"), "{}", r.stderr);
    let s = app.run(&["status"]);
    assert_ne!(s.code, 0, "nothing should run: {}", s.stdout);
}

#[test]
fn a_web_process_that_never_becomes_healthy_fails_up_with_the_evidence() {
    let app = TestApp::new("hello", |s| {
        s.replace("count = 2", "count = 1")
            + "\n[processes.web.env]\nFAIL_HEALTH_FILE = \"app.py\"\n[processes.web.rollout]\nhealth_timeout = \"4s\"\n"
    });
    let r = app.up();
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("web.1 did not become healthy within 4s"), "{}", r.stderr);
    assert!(r.stderr.contains("500"), "the last checks should be shown: {}", r.stderr);
    // The proxy answers 503 with Retry-After meanwhile.
    let (code, body) = app.get("/").unwrap();
    assert_eq!(code, 503, "{body}");
}

#[test]
fn a_proxy_port_already_taken_is_a_clear_error() {
    let app = TestApp::hello();
    let _squatter = std::net::TcpListener::bind(app.proxy()).unwrap();
    let r = app.up();
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("already in use"), "{}", r.stderr);
    assert!(r.stderr.contains("NONSTOP_PROXY_LISTEN"), "{}", r.stderr);
    let s = app.run(&["status"]);
    assert_ne!(s.code, 0, "nothing should run: {}", s.stdout);
}

#[test]
fn a_second_up_changes_nothing_and_a_concurrent_one_is_refused() {
    let app = TestApp::new("hello", |s| s + "\n[processes.web.rollout]\nhealth_timeout = \"30s\"\n");
    app.up().ok();
    let pids = app.pids("web");
    let r = app.up();
    r.ok();
    assert!(r.stdout.contains("already up; nothing changed"), "{}", r.stdout);
    assert_eq!(app.pids("web"), pids);

    // A slow-booting replacement keeps `restart` busy; an `up` meanwhile is refused.
    std::fs::write(app.dir.path().join("nonstop.toml"), app.spec() + "\n[processes.web.env]\nBOOT_DELAY = \"2\"\n")
        .unwrap();
    let first = app.cmd(&["up"]).spawn().unwrap();
    wait_until(T, "the first up to be in progress", || app.status()["operation"] == "up");
    let second = app.run(&["up"]);
    assert_eq!(second.code, 3, "{}\n{}", second.stdout, second.stderr);
    assert!(second.stderr.contains("another operation (up) is in progress"), "{}", second.stderr);
    let out = wait_output(first, T, "first up");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Apps share the daemon's proxy (see environments.rs for two side by
/// side); two that both answer every host (no `[environments]` of their
/// own) cannot: the second is refused, naming the fix, and nothing of it
/// runs.
#[test]
fn another_app_that_also_answers_every_host_is_refused_naming_the_fix() {
    let app = TestApp::hello();
    app.up().ok();
    app.write_spec(&app.spec().replace("app = \"hello\"", "app = \"other\""));
    let r = app.up();
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("hello/default is already the default environment"), "{}", r.stderr);
    assert!(r.stderr.contains("default = false"), "{}", r.stderr);
    let (code, body) = app.get("/").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("hello"), "{body}");
}

#[test]
fn init_writes_a_spec_from_the_procfile_that_runs() {
    let app = TestApp::hello();
    std::fs::remove_file(app.dir.path().join("nonstop.toml")).unwrap();
    app.run(&["init"]).ok();
    let spec = app.spec();
    assert!(spec.contains("[processes.web]"), "{spec}");
    assert!(spec.contains("singleton"), "beat should be a singleton:\n{spec}");
    let again = app.run(&["init"]);
    assert_eq!(again.code, 2, "init must not overwrite");
    // The generated file is accepted as it is (web health on "/" works for this app).
    app.up().ok();
}

#[test]
fn logs_are_merged_prefixed_and_timestamped() {
    let app = TestApp::hello();
    app.up().ok();
    wait_until(T, "worker output", || app.run(&["logs", "worker"]).stdout.contains("worker started"));
    let r = app.run(&["logs"]);
    r.ok();
    assert!(r.stdout.contains("web.1"), "{}", r.stdout);
    assert!(r.stdout.contains("listening on 127.0.0.1:"), "{}", r.stdout);
    let first = r.stdout.lines().next().unwrap();
    assert!(first.starts_with("20") && first.as_bytes()[10] == b'T', "timestamped: {first}");
    let j = app.run(&["logs", "--json", "-n", "3", "beat"]);
    j.ok();
    for line in j.stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["instance"], "beat.1");
    }
    let bad = app.run(&["logs", "nosuch"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("unknown process type `nosuch`"), "{}", bad.stderr);
}

#[test]
fn the_api_is_private_the_socket_is_0600_and_tcp_needs_the_token() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::hello();
    let home_mode_before = std::fs::metadata(app.home.path()).unwrap().permissions().mode() & 0o777;
    let api_port = free_port();
    let child = app.cmd(&["up"]).env("NONSTOP_API_LISTEN", format!("127.0.0.1:{api_port}")).spawn().unwrap();
    let out = wait_output(child, T, "up");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = std::fs::metadata(app.home.path().join("nonstop.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // An existing home is used as it is (never chmod-ed), being neither
    // group- nor world-writable.
    let home_mode = std::fs::metadata(app.home.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(home_mode, home_mode_before);
    let token = std::fs::read_to_string(app.home.path().join("api-token")).unwrap();
    let token_mode = std::fs::metadata(app.home.path().join("api-token")).unwrap().permissions().mode() & 0o777;
    assert_eq!(token_mode, 0o600);
    let ask_as = |scheme: &str, auth: Option<&str>| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
        let auth = auth.map(|t| format!("Authorization: {scheme} {t}\r\n")).unwrap_or_default();
        write!(s, "GET /v1/status HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    };
    let ask = |auth: Option<&str>| ask_as("Bearer", auth);
    assert!(ask(None).starts_with("HTTP/1.1 401"), "{}", ask(None));
    // The scheme is case-insensitive (RFC 7235).
    for scheme in ["bearer", "BEARER"] {
        let ok = ask_as(scheme, Some(token.trim()));
        assert!(ok.starts_with("HTTP/1.1 200"), "{scheme}: {ok}");
    }
    assert!(ask_as("Basic", Some(token.trim())).starts_with("HTTP/1.1 401"));
    assert!(ask(Some("wrong")).starts_with("HTTP/1.1 401"));
    let ok = ask(Some(token.trim()));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"app\":\"hello\""), "{ok}");
    // A malformed body is refused with what is wrong; nothing happens.
    let post_cancel = |body: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
        write!(
            s,
            "POST /v1/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            token.trim(),
            body.len()
        )
        .unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    };
    let bad = post_cancel("{\"who\": 7}");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert!(bad.contains("invalid cancel request"), "{bad}");
    let long = format!("{{\"who\": \"ann\", \"reason\": \"{}\"}}", "x".repeat(201));
    for (body, says) in
        [(long.as_str(), "201 characters long"), ("{\"who\": \"ann\", \"reason\": \"two\\nlines\"}", "line break")]
    {
        let bad = post_cancel(body);
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert!(bad.contains(says), "{bad}");
    }
    let fine = post_cancel("{\"who\": \"ann\"}");
    assert!(fine.starts_with("HTTP/1.1 200") && fine.contains("nothing to cancel"), "{fine}");
    let fine = post_cancel("{\"who\": \"ann\", \"reason\": \"wrong branch\"}");
    assert!(fine.starts_with("HTTP/1.1 200") && fine.contains("nothing to cancel"), "{fine}");
    assert_eq!(app.status()["operation"], serde_json::Value::Null);
}

#[test]
fn completions_are_generated() {
    let app = TestApp::hello();
    let r = app.run(&["completions", "bash"]);
    r.ok();
    assert!(r.stdout.contains("nonstop") && r.stdout.contains("scale"), "{}", &r.stdout[..200.min(r.stdout.len())]);
}

#[test]
fn the_daemon_upgrades_in_place_under_load_without_a_failed_request() {
    let app = TestApp::hello();
    app.up().ok();
    let instances_before =
        app.status()["instances"].as_array().unwrap().iter().map(|i| i["pid"].clone()).collect::<Vec<_>>();
    let load = Load::start(app.proxy(), "/", 6);
    wait_until(T, "traffic", || app.get("/").is_ok());
    let mut pids = vec![app.daemon_pid().unwrap()];
    for _ in 0..3 {
        let r = app.run(&["upgrade", "--json"]);
        r.ok();
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(v["old_pid"].as_i64().unwrap() as i32, *pids.last().unwrap());
        pids.push(v["new_pid"].as_i64().unwrap() as i32);
    }
    // The same through the documented signal.
    let before_signal = *pids.last().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(before_signal), nix::sys::signal::Signal::SIGUSR2).unwrap();
    wait_until(T, "the SIGUSR2 upgrade", || {
        app.daemon_pid().is_some_and(|p| p != before_signal) && app.run(&["status"]).code == 0
    });
    wait_until(T, "the old daemons to exit", || pids.iter().all(|p| !pid_alive(*p)));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} failed of {}: {:?}", failures.len(), ok, &failures[..failures.len().min(5)]);
    assert!(ok > 50, "only {ok} requests");
    // The app never restarted.
    let instances_after =
        app.status()["instances"].as_array().unwrap().iter().map(|i| i["pid"].clone()).collect::<Vec<_>>();
    assert_eq!(instances_before, instances_after);
    // Still supervised by the new daemon.
    let web = app.pids("web")[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(web), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "web replaced", || !app.pids("web").contains(&web) && app.pids("web").len() == 2);
}

/// A new binary that takes over and then dies must not leave the app
/// without a daemon. The "new version" here is a script that plays a
/// successor until it holds the state lock, then crashes: the old daemon,
/// which went on accepting meanwhile, starts its own version again with
/// the same sockets, and says the upgrade failed. The next upgrade tries
/// the path on disk again.
#[test]
fn an_upgrade_whose_new_daemon_dies_after_taking_over_falls_back_to_the_version_that_ran() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::hello();
    let bin_dir = tempfile::Builder::new().prefix("nonstop-bin-").tempdir().unwrap();
    let installed = bin_dir.path().join("nonstop");
    std::fs::copy(bin(), &installed).unwrap();
    let out = wait_output(app.cmd_with(&installed, &["up"]).spawn().unwrap(), T, "up");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    app.note_daemon();
    let first = app.daemon_pid().unwrap();
    let instances_before =
        app.status()["instances"].as_array().unwrap().iter().map(|i| i["pid"].clone()).collect::<Vec<_>>();

    // Replaced on disk the way package managers do it: a new file renamed
    // over the old one (the running daemon keeps its image).
    let replace = |contents: &dyn Fn(&std::path::Path)| {
        let new = bin_dir.path().join("nonstop.new");
        contents(&new);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&new, &installed).unwrap();
    };
    replace(&|path| {
        let script = format!(
            "#!/bin/sh\n\
             [ \"$1\" = daemon ] || exec '{real}' \"$@\"\n\
             echo $$ > \"$NONSTOP_HOME/.ready.tmp\" && mv \"$NONSTOP_HOME/.ready.tmp\" \"$NONSTOP_HOME/upgrade.ready\"\n\
             flock -w 30 \"$NONSTOP_HOME/daemon.lock\" true\n\
             echo 'broken build: crashing after taking the lock' >&2\n\
             exit 3\n",
            real = bin().display()
        );
        std::fs::write(path, script).unwrap();
    });

    let load = Load::start(app.proxy(), "/", 6);
    wait_until(T, "traffic", || app.get("/").is_ok());
    let r = app.run(&["upgrade"]);
    assert_eq!(r.code, 1, "the upgrade is reported as failed: {} {}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("exited before it served (exit status: 3)")
            && r.stderr.contains("The version that ran before was started again as pid"),
        "{}",
        r.stderr
    );
    let log = std::fs::read_to_string(app.home.path().join("daemon.log")).unwrap();
    assert!(log.contains("broken build: crashing after taking the lock"), "{log}");
    wait_until(T, "the first daemon to exit", || !pid_alive(first));
    let fallback = app.daemon_pid().unwrap();
    assert_ne!(fallback, first);
    assert_eq!(app.run(&["status"]).code, 0);
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} failed of {}: {:?}", failures.len(), ok, &failures[..failures.len().min(5)]);
    assert!(ok > 20, "only {ok} requests");
    let instances_after =
        app.status()["instances"].as_array().unwrap().iter().map(|i| i["pid"].clone()).collect::<Vec<_>>();
    assert_eq!(instances_before, instances_after, "the app never restarted");

    // Supervised by the fallback, whose monitors come from its own image
    // (the file on disk is the broken script).
    let web = app.pids("web")[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(web), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "web replaced", || !app.pids("web").contains(&web) && app.pids("web").len() == 2);
    wait_until(T, "web healthy again", || web_running_healthy(&app, 2));

    // Fixed on disk: the next upgrade starts the path again, not the image.
    replace(&|path| {
        std::fs::copy(bin(), path).unwrap();
    });
    let r = app.run(&["upgrade", "--json"]);
    r.ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["old_pid"].as_i64().unwrap() as i32, fallback);
    let upgraded = v["new_pid"].as_i64().unwrap() as i32;
    let exe = std::fs::read_link(format!("/proc/{upgraded}/exe")).unwrap();
    assert_eq!(exe, installed, "started from the path on disk");
    wait_until(T, "the fallback to exit", || !pid_alive(fallback));
}

#[test]
fn the_systemd_protocol_ready_and_reload_to_a_new_daemon_under_the_same_main_pid() {
    use std::os::unix::net::UnixDatagram;
    let app = TestApp::hello();
    let notify_path = app.home.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification from the daemon");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // As systemd runs it: `nonstop daemon` in the foreground, NOTIFY_SOCKET
    // set. That process is the keeper; it stays the main process.
    let mut keeper = app
        .cmd(&["daemon"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = recv();
    assert!(first.contains("READY=1"), "{first}");
    assert!(!first.contains("MAINPID="), "the keeper is the main process: {first}");
    app.up().ok();
    let daemon = app.daemon_pid().unwrap();
    assert_ne!(daemon, keeper.id() as i32);
    // ExecReload: kill -USR2 $MAINPID → the keeper passes it on, the daemon
    // upgrades in place, and the keeper says READY again.
    let unit = std::fs::read_to_string(repo_root().join("contrib/systemd/nonstop.service")).unwrap();
    assert!(
        unit.contains("ExecReload=/bin/kill -USR2 $MAINPID")
            && unit.contains("Type=notify")
            && unit.contains("NotifyAccess=all")
            && unit.contains("KillMode=process")
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper.id() as i32), nix::sys::signal::Signal::SIGUSR2).unwrap();
    let second = recv();
    assert!(second.contains("READY=1"), "{second}");
    wait_until(T, "the new daemon to answer", || {
        app.daemon_pid().is_some_and(|p| p != daemon) && app.run(&["status"]).code == 0
    });
    wait_until(T, "the old daemon to exit", || !pid_alive(daemon));
    assert!(keeper.try_wait().unwrap().is_none(), "the keeper (main process) exited");
    let (code, _) = app.get("/").unwrap();
    assert_eq!(code, 200);
    // systemctl stop: SIGTERM to the main process ends the keeper and its daemon.
    let new_daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = keeper.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!pid_alive(new_daemon), "the daemon outlived the keeper's SIGTERM");
}

fn write_cert(dir: &std::path::Path, name: &str, host: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    (c, k)
}

fn curl(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn tls_is_terminated_by_sni_plain_http_is_redirected_and_bad_files_are_refused() {
    let app = TestApp::hello();
    let https = free_port();
    let (c, k) = write_cert(app.dir.path(), "site", "site.test");
    let listen_line = app.spec().lines().find(|l| l.starts_with("listen")).unwrap().to_string();
    app.write_spec(&app.spec().replace(
        &listen_line,
        &format!("{listen_line}\nhttps_listen = \"127.0.0.1:{https}\"\n\n[[proxy.tls]]\nhosts = [\"site.test\"]\ncert = \"{}\"\nkey = \"{}\"", c.display(), k.display()),
    ));
    let r = app.up();
    r.ok();
    let resolve = format!("site.test:{https}:127.0.0.1");
    let (code, out) = curl(&["-k", "--resolve", &resolve, &format!("https://site.test:{https}/headers")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.to_ascii_lowercase().contains("x-forwarded-proto: https"), "{out}");
    // HTTP/2 over TLS.
    let (code, out) = curl(&[
        "-k",
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        "--resolve",
        &resolve,
        &format!("https://site.test:{https}/"),
    ]);
    assert_eq!((code, out.trim()), (0, "2"), "{out}");
    // Plain HTTP for a TLS host is redirected.
    let (_, out) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: site.test",
        &format!("http://{}/x?y=1", app.proxy()),
    ]);
    assert!(out.starts_with("308 https://site.test"), "{out}");
    assert!(out.contains("/x?y=1"), "{out}");
    // A broken certificate file: the deploy-time check refuses it, nothing changes.
    std::fs::write(&c, "not a certificate").unwrap();
    app.write_spec(&app.spec().replace("count = 2", "count = 3"));
    let r = app.run(&["up"]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("site.crt"), "the error names the file: {}", r.stderr);
    assert_eq!(app.pids("web").len(), 2, "nothing changed");
    // The running proxy keeps its previous certificate.
    let (code, out) = curl(&["-k", "--resolve", &resolve, &format!("https://site.test:{https}/")]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn the_first_up_starts_the_daemon_with_the_specs_proxy_workers() {
    let app = TestApp::new("hello", |s| s.replace("[proxy]\n", "[proxy]\nworkers = 7\n"));
    assert!(app.spec().contains("workers = 7"), "{}", app.spec());
    app.up().ok();
    // The proxy runs in the data plane: the keeper.
    let pid = app.keeper_pid().expect("a keeper");
    let proxy_threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.starts_with("nonstop-proxy-"))
            .count()
    };
    assert_eq!(proxy_threads(), 7, "one per core would be {:?}", std::thread::available_parallelism());
    let (code, _) = app.get("/").unwrap();
    assert_eq!(code, 200);
    app.run(&["down"]).ok();
}

#[test]
fn a_proxy_worker_count_out_of_range_is_refused_before_the_daemon_starts() {
    let app = TestApp::hello();
    for bad in ["0", "1025", "many"] {
        let r = app.run(&["daemon", "--proxy-workers", bad]);
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains("--proxy-workers"), "{bad}: {}", r.stderr);
        assert!(app.daemon_pid().is_none(), "{bad}: a daemon started");
    }
}

#[test]
fn a_process_named_twice_in_scale_is_refused_before_the_daemon_is_asked() {
    let app = TestApp::hello();
    let r = app.run(&["scale", "web=2", "web=3"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("`web` is given twice (web=2 and web=3)"), "{}", r.stderr);
    assert!(app.daemon_pid().is_none(), "a daemon was started for a refused command");
    // The API refuses it too (a JSON object may repeat a key).
    app.up().ok();
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(app.home.path().join("nonstop.sock"))
        .args(["-H", "content-type: application/json", "-d", r#"{"counts":{"web":1,"web":3}}"#])
        .arg("http://nonstop/v1/scale")
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("process `web` is given twice"), "{body}");
    assert_eq!(app.pids("web").len(), 2, "scaled anyway");
}
