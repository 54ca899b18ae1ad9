//! End-to-end tests of deploys, rollbacks and their failure paths, with the
//! real binary, real processes and the hello example.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// The hello app with a build command, a release task that logs each run,
/// and a beat lock shared by every release (so doubles are caught across
/// release directories).
fn deployable() -> TestApp {
    let app = TestApp::new("hello", |s| s);
    let dir = app.dir.path().display().to_string();
    let spec = app.spec().replace(
        "app = \"hello\"",
        &format!(
            "app = \"hello\"\nbuild = [\"echo built-$NONSTOP_RELEASE > build-marker.txt\"]\n\n[release]\ntasks = [\"echo migrated $NONSTOP_RELEASE >> {dir}/migrations.log\"]\nretain_releases = 2"
        ),
    );
    let spec = spec.replace(
        "GREETING = \"hello\"",
        &format!("GREETING = \"hello\"\nBEAT_LOCK = \"{dir}/beat.lock\"\nAPP_VERSION = \"1\""),
    );
    app.write_spec(&spec);
    // What the app and the release task write there is not part of a release.
    let gi = app.dir.path().join(".gitignore");
    let mut ignore = std::fs::read_to_string(&gi).unwrap_or_default();
    ignore.push_str("migrations.log\n");
    std::fs::write(gi, ignore).unwrap();
    app
}

fn set_version(app: &TestApp, v: &str) {
    let spec = app.spec();
    let start = spec.find("APP_VERSION = \"").unwrap();
    let end = start + spec[start..].find('\n').unwrap();
    app.write_spec(&format!("{}APP_VERSION = \"{v}\"{}", &spec[..start], &spec[end..]));
}

fn history(app: &TestApp) -> Vec<serde_json::Value> {
    let r = app.run(&["history", "--json"]);
    r.ok();
    serde_json::from_str::<Vec<serde_json::Value>>(&r.stdout).unwrap()
}

/// `app` built by `sh build.sh`, with `script` as build.sh.
fn build_with_script(app: &TestApp, script: &str) {
    std::fs::write(app.dir.path().join("build.sh"), script).unwrap();
    let spec =
        app.spec().replace("build = [\"echo built-$NONSTOP_RELEASE > build-marker.txt\"]", "build = [\"sh build.sh\"]");
    assert!(spec.contains("sh build.sh"), "{spec}");
    app.write_spec(&spec);
}

/// After the daemon was SIGKILLed: wait (15 s at most) for the keeper to
/// start a new one, or start one with `up`.
fn daemon_back(app: &TestApp) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if app.run(&["status"]).code == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    app.up().ok();
}

fn instances(app: &TestApp) -> Vec<serde_json::Value> {
    app.status()["instances"].as_array().unwrap().clone()
}

#[test]
fn a_deploy_builds_once_runs_tasks_once_and_rolls_without_dropping_a_request() {
    let app = deployable();
    let r = app.run(&["deploy", "-m", "first"]);
    r.ok();
    assert!(r.stdout.contains("v1 is live"), "{}", r.stdout);
    let load = Load::start(app.proxy(), "/", 4);
    wait_until(T, "traffic", || app.get("/").is_ok());
    set_version(&app, "2");
    let r = app.run(&["deploy", "-m", "second", "--json"]);
    r.ok();
    // --json: progress events, then the result.
    let lines: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["type"] == "progress"), "{}", r.stdout);
    assert_eq!(lines.last().unwrap()["type"], "result", "{}", r.stdout);
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} failed of {}: {:?}", failures.len(), ok, &failures[..failures.len().min(5)]);
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 2"), "{body}");

    // Built once, into the release directory; instances run from there.
    let releases = app.home.path().join("releases/hello");
    assert_eq!(std::fs::read_to_string(releases.join("v2/build-marker.txt")).unwrap().trim(), "built-v2");
    assert!(!app.dir.path().join("build-marker.txt").exists(), "the build ran in the app directory");
    let pid = app.pids("web")[0];
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, releases.join("v2").canonicalize().unwrap());
    // Release tasks ran exactly once per deploy.
    let log = std::fs::read_to_string(app.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log.lines().collect::<Vec<_>>(), ["migrated v1", "migrated v2"]);
    // Every instance runs v2; the beat never ran twice at once.
    assert!(instances(&app).iter().all(|i| i["release"] == 2), "{:#?}", instances(&app));
    assert!(!app.dir.path().join("beat.lock.doubled").exists());
    let h = history(&app);
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|d| d["status"] == "succeeded"), "{h:#?}");
    assert_eq!(h[0]["message"], "second");
    // One deployment, step by step: its timeline, in text and JSON.
    let id = h[0]["id"].as_i64().unwrap();
    let r = app.run(&["history", &format!("#{id}")]);
    r.ok();
    assert!(r.stdout.contains(&format!("#{id} deploy v1 → v2: succeeded")), "{}", r.stdout);
    assert!(r.stdout.contains("note: second") && r.stdout.contains("phase"), "{}", r.stdout);
    assert!(r.stdout.trim_end().lines().last().unwrap().contains("outcome"), "{}", r.stdout);
    let one: serde_json::Value =
        serde_json::from_str(&app.run(&["history", &id.to_string(), "--json"]).stdout).unwrap();
    assert_eq!(one["id"], id);
    assert_eq!(one["timeline"].as_array().unwrap().last().unwrap()["kind"], "outcome", "{one:#}");
    let r = app.run(&["history", "99"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no deployment #99") && r.stderr.contains("nonstop history"), "{}", r.stderr);
    let r = app.run(&["history", "v2"]);
    assert_eq!(r.code, 2, "clap refuses it");
    assert!(r.stderr.contains("not a deployment ID"), "{}", r.stderr);
    // Unchanged code and config: nothing to deploy.
    let r = app.run(&["deploy"]);
    r.ok();
    assert!(r.stdout.contains("nothing to deploy"), "{}", r.stdout);
    // Retention: 2 kept, never the running one.
    set_version(&app, "3");
    app.run(&["deploy"]).ok();
    let rel: Vec<serde_json::Value> = serde_json::from_str(&app.run(&["releases", "--json"]).stdout).unwrap();
    let on_disk: Vec<u64> = rel.iter().filter(|r| r["status"] == "ready").map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(on_disk, [3, 2], "{rel:#?}");
    // Recorded at once, deleted in the background.
    wait_until(T, "v1 deleted", || !releases.join("v1").exists());
    assert!(rel[0]["current"].as_bool().unwrap());
}

#[test]
fn a_failing_release_task_changes_nothing_and_shows_its_output() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    let before = instances(&app);
    app.write_spec(
        &app.spec().replace("tasks = [\"echo migrated", "tasks = [\"echo boom-output; exit 3\", \"echo migrated"),
    );
    set_version(&app, "2");
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("release task 1/2"), "{}", r.stderr);
    assert!(r.stderr.contains("exit code 3"), "{}", r.stderr);
    assert!(r.stderr.contains("boom-output"), "{}", r.stderr);
    assert!(r.stderr.contains("nothing that was running changed"), "{}", r.stderr);
    let after = instances(&app);
    let pids = |v: &[serde_json::Value]| v.iter().map(|i| i["pid"].clone()).collect::<Vec<_>>();
    assert_eq!(pids(&before), pids(&after));
    assert_eq!(history(&app)[0]["status"], "failed");
    let log = std::fs::read_to_string(app.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log.lines().count(), 1, "the second task must not run after the first failed");
}

#[test]
fn a_release_that_never_becomes_healthy_is_rolled_back_and_capacity_is_kept() {
    let app = deployable();
    app.write_spec(&(app.spec() + "\n[processes.web.rollout]\nhealth_timeout = \"3s\"\n"));
    app.run(&["deploy"]).ok();
    let before: Vec<i32> = app.pids("web");
    let load = Load::start(app.proxy(), "/", 4);
    wait_until(T, "traffic", || app.get("/").is_ok());
    // The new release fails its health checks.
    app.write_spec(&app.spec().replace("APP_VERSION = \"1\"", "APP_VERSION = \"2\"\nFAIL_HEALTH_FILE = \"app.py\""));
    let r = app.run(&["deploy"]);
    let (ok, failures) = load.finish();
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("rolled back"), "{}", r.stderr);
    assert!(r.stderr.contains("did not become healthy within 3.0s"), "{}", r.stderr);
    assert!(r.stderr.contains("-> 500"), "the evidence (last checks): {}", r.stderr);
    assert!(r.stderr.contains("the previous release keeps serving"), "{}", r.stderr);
    assert!(failures.is_empty(), "{} failed of {ok}: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert_eq!(app.pids("web"), before, "the old instances were never replaced");
    assert!(instances(&app).iter().all(|i| i["release"] == 1));
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 1"), "{body}");
    let h = history(&app);
    assert_eq!(h[0]["status"], "rolled_back");
    assert!(h[0]["reason"].as_str().unwrap().contains("web.1"), "{h:#?}");
    // Rollback never targets the release that just failed.
    let r = app.run(&["rollback", "v2"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("never went live"), "{}", r.stderr);
}

#[test]
fn rollback_returns_to_the_previous_release_without_rebuilding() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    set_version(&app, "2");
    app.run(&["deploy"]).ok();
    let load = Load::start(app.proxy(), "/", 3);
    wait_until(T, "traffic", || app.get("/").is_ok());
    let r = app.run(&["rollback"]);
    r.ok();
    assert!(r.stdout.contains("v1 is live"), "{}", r.stdout);
    let (_, failures) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 1"), "{body}");
    assert!(instances(&app).iter().all(|i| i["release"] == 1));
    // No new release was built; release tasks did not run again.
    let rel: Vec<serde_json::Value> = serde_json::from_str(&app.run(&["releases", "--json"]).stdout).unwrap();
    assert_eq!(rel.len(), 2);
    let log = std::fs::read_to_string(app.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log.lines().count(), 2);
    assert_eq!(history(&app)[0]["kind"], "rollback");
    // With --run-tasks they do.
    app.run(&["rollback", "v2", "--run-tasks"]).ok();
    let log = std::fs::read_to_string(app.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log.lines().last().unwrap(), "migrated v2");
    let r = app.run(&["rollback", "v9"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("there is no release v9"), "{}", r.stderr);
}

/// Each release with its own virtualenv: the build makes one and a
/// console script in it (a `#!` naming the venv's python by absolute path,
/// as pip writes them), and the web process runs that script. It works
/// because the build runs at the path the release runs from; rollback
/// brings the old release's venv back.
#[test]
fn releases_with_their_own_virtualenv_deploy_and_roll_back() {
    let app = deployable();
    let spec = app
        .spec()
        .replace(
            "build = [\"echo built-$NONSTOP_RELEASE > build-marker.txt\"]",
            "build = [\"python3 -m venv --without-pip .venv\", \"printf '#!%s/.venv/bin/python\\\\n' \\\"$(pwd)\\\" | cat - app.py > .venv/bin/hello-web && chmod +x .venv/bin/hello-web\"]",
        )
        .replace("command = \"exec python3 app.py\"", "command = \"exec .venv/bin/hello-web\"");
    assert!(spec.contains("hello-web"), "{spec}");
    app.write_spec(&spec);
    let r = app.run(&["deploy"]);
    r.ok();
    assert!(r.stdout.contains("v1 is live"), "{} {}", r.stdout, r.stderr);
    set_version(&app, "2");
    app.run(&["deploy"]).ok();
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 2"), "{body}");
    let release_dir = |v: u32| app.home.path().join("releases/hello").join(format!("v{v}")).canonicalize().unwrap();
    let script = std::fs::read_to_string(release_dir(2).join(".venv/bin/hello-web")).unwrap();
    assert!(script.starts_with(&format!("#!{}/.venv/bin/python", release_dir(2).display())), "{script}");
    for pid in app.pids("web") {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert_eq!(cwd, release_dir(2));
    }
    app.run(&["rollback"]).ok();
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 1"), "{body}");
}

/// `nonstop cancel` during a slow migration: the deploy ends saying who
/// cancelled it, the task's processes are gone, v1 keeps serving; `down`
/// during a deploy points at `cancel`.
#[test]
fn a_deploy_cancelled_during_a_slow_release_task_changes_nothing() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    let dir = app.dir.path().display().to_string();
    let pid_file = app.home.path().join("task.pid");
    let spec = app.spec().replace(
        &format!("tasks = [\"echo migrated $NONSTOP_RELEASE >> {dir}/migrations.log\"]"),
        &format!("tasks = [\"echo $$ > {}; sleep 300\"]", pid_file.display()),
    );
    assert!(spec.contains("sleep 300"), "{spec}");
    app.write_spec(&spec);
    set_version(&app, "2");
    let deploy = app.cmd(&["deploy"]).spawn().unwrap();
    wait_until(T, "the release task to run", || std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')));
    let task: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();

    let r = app.run(&["down"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("`nonstop cancel`"), "{}", r.stderr);
    // A reason that cannot be recorded is refused before anything stops.
    let r = app.run(&["cancel", "--reason", &"x".repeat(201)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("at most 200"), "{}", r.stderr);
    assert!(pid_alive(task), "the release task was stopped by a refused cancel");
    let r = app.run(&["cancel", "--reason", "locks the orders table"]);
    r.ok();
    assert!(r.stdout.contains("cancelled while release tasks: nothing changed"), "{}", r.stdout);
    let out = wait_output(deploy, T, "the cancelled deploy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("deploy of v2 failed: cancelled by "), "{stderr}");
    assert!(stderr.contains(": locks the orders table"), "{stderr}");
    wait_until(T, "the task's process to be gone", || !pid_alive(task));
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 1"), "{body}");
    assert_eq!(history(&app)[0]["status"], "failed");
    let r = app.run(&["cancel", "--json"]);
    r.ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["changed"], false);
}

#[test]
fn a_daemon_killed_mid_deploy_rolls_back_on_restart_and_leaves_nothing_behind() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    let v1: Vec<i32> = app.pids("web");
    // v2 boots slowly so that the rollout is caught in the middle.
    app.write_spec(&app.spec().replace("APP_VERSION = \"1\"", "APP_VERSION = \"2\"\nBOOT_DELAY = \"2\""));
    let deploy = app.cmd(&["deploy"]).spawn().unwrap();
    wait_until(T, "the rollout of web to start", || {
        app.status()["operation"].as_str().is_some_and(|o| o.contains("rolling web"))
            && instances(&app).iter().any(|i| i["release"] == 2 && i["pid"].is_number())
    });
    let v2: Vec<i32> = instances(&app)
        .iter()
        .filter(|i| i["release"] == 2)
        .filter_map(|i| i["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    let out = wait_output(deploy, T, "the interrupted deploy");
    assert!(!out.status.success(), "a deploy whose daemon died must not report success");
    // A new daemon recovers: the deployment is rolled back.
    let r = app.up();
    r.ok();
    wait_until(T, "the recovery to finish", || app.status()["operation"].is_null());
    let h = history(&app);
    assert_eq!(h[0]["status"], "rolled_back", "{h:#?}");
    assert!(h[0]["reason"].as_str().unwrap().contains("daemon stopped"), "{h:#?}");
    let now = instances(&app);
    assert!(now.iter().all(|i| i["release"] == 1), "{now:#?}");
    assert_eq!(now.iter().filter(|i| i["process"] == "web").count(), 2);
    for p in v2 {
        wait_until(T, "v2 instances to be gone", || !group_alive(p));
    }
    // The v1 instances that were never touched are still the same.
    let web_now = app.pids("web");
    assert!(v1.iter().filter(|p| web_now.contains(p)).count() >= 1, "v1 {v1:?} now {web_now:?}");
    let (code, body) = app.get("/").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("version 1"), "{body}");
}

#[test]
fn bad_deploys_are_refused_before_anything_is_built() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    let releases = app.home.path().join("releases/hello");
    // An invalid spec: refused, nothing built.
    let good = app.spec();
    app.write_spec(&good.replace("count = 2", "count = \"two\""));
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("nonstop.toml:"), "{}", r.stderr);
    assert!(!releases.join("v2").exists());
    // A failing build: no half release.
    app.write_spec(&good.replace("build = [\"echo built", "build = [\"echo compiling; exit 4\", \"echo built"));
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("exit code 4"), "{}", r.stderr);
    assert!(r.stderr.contains("compiling"), "{}", r.stderr);
    let entries: Vec<String> =
        std::fs::read_dir(&releases).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, ["v1"], "only v1 may be on disk");
    assert!(instances(&app).iter().all(|i| i["release"] == 1));
    // A concurrent deploy is refused with who and since when; --wait waits.
    app.write_spec(&good.replace("APP_VERSION = \"1\"", "APP_VERSION = \"2\"\nBOOT_DELAY = \"1\""));
    let first = app.cmd(&["deploy"]).spawn().unwrap();
    wait_until(T, "the first deploy to run", || {
        app.status()["operation"].as_str().is_some_and(|o| o.starts_with("deploy"))
    });
    let second = app.run(&["deploy"]);
    assert_eq!(second.code, 3, "{}\n{}", second.stdout, second.stderr);
    assert!(second.stderr.contains("another operation (deploy by "), "{}", second.stderr);
    assert!(second.stderr.contains(" since "), "{}", second.stderr);
    app.write_spec(&good.replace("APP_VERSION = \"1\"", "APP_VERSION = \"3\""));
    let waited = app.run(&["deploy", "--wait"]);
    waited.ok();
    let out = wait_output(first, T, "first deploy");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 3"), "{body}");
}

#[test]
fn post_tasks_run_after_the_rollout_and_their_failure_is_reported_with_the_release_live() {
    let app = deployable();
    let dir = app.dir.path().display().to_string();
    app.write_spec(&app.spec().replace(
        "retain_releases = 2",
        &format!("retain_releases = 2\npost_tasks = [\"echo warmed $NONSTOP_RELEASE >> {dir}/post.log\"]"),
    ));
    let gi = app.dir.path().join(".gitignore");
    std::fs::write(&gi, std::fs::read_to_string(&gi).unwrap() + "post.log\n").unwrap();
    app.run(&["deploy"]).ok();
    assert_eq!(std::fs::read_to_string(app.dir.path().join("post.log")).unwrap().trim(), "warmed v1");
    app.write_spec(
        &app.spec().replace("post_tasks = [\"echo warmed", "post_tasks = [\"echo cache-down; exit 5\", \"echo warmed"),
    );
    set_version(&app, "2");
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("post task 1/2"), "{}", r.stderr);
    assert!(r.stderr.contains("cache-down"), "{}", r.stderr);
    assert!(r.stderr.contains("v2 is live"), "{}", r.stderr);
    assert!(instances(&app).iter().all(|i| i["release"] == 2));
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 2"), "{body}");
}

/// Issue 15: a daemon SIGKILLed during a 30 s release task left the task
/// running unobserved; the next daemon recorded the deployment as failed
/// and the next deploy's task ran alongside it. Now the restarted daemon
/// waits for it, goes on with the deployment from its exit, and no other
/// release task starts while it lives.
#[test]
fn a_daemon_killed_during_a_release_task_waits_for_it_and_never_runs_another_alongside() {
    let app = deployable();
    let dir = app.dir.path().display().to_string();
    // Each run of the task logs its start and end (nanoseconds).
    std::fs::write(
        app.dir.path().join("task.sh"),
        format!(
            "echo \"start $NONSTOP_RELEASE $(date +%s%N)\" >> {dir}/tasks.log\nsleep $TASK_SECONDS\necho \"end $NONSTOP_RELEASE $(date +%s%N)\" >> {dir}/tasks.log\n"
        ),
    )
    .unwrap();
    let spec = app.spec().replace(
        &format!("tasks = [\"echo migrated $NONSTOP_RELEASE >> {dir}/migrations.log\"]"),
        "tasks = [\"sh task.sh\"]",
    );
    let spec = spec.replace("APP_VERSION = \"1\"", "APP_VERSION = \"1\"\nTASK_SECONDS = \"0\"");
    assert!(spec.contains("sh task.sh") && spec.contains("TASK_SECONDS"), "{spec}");
    app.write_spec(&spec);
    let gi = app.dir.path().join(".gitignore");
    std::fs::write(&gi, std::fs::read_to_string(&gi).unwrap() + "tasks.log\n").unwrap();
    app.run(&["deploy"]).ok();
    let tasks_log = app.dir.path().join("tasks.log");
    let runs = || -> Vec<(String, String, u128)> {
        std::fs::read_to_string(&tasks_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.to_string(), w.next()?.parse().ok()?))
            })
            .collect()
    };

    // v2's release task runs 30 s; the daemon is killed in the middle of it.
    app.write_spec(&app.spec().replace("TASK_SECONDS = \"0\"", "TASK_SECONDS = \"30\""));
    set_version(&app, "2");
    let deploy = app.cmd(&["deploy"]).spawn().unwrap();
    wait_until(T, "v2's release task to start", || runs().iter().any(|(what, r, _)| what == "start" && r == "v2"));
    let task_pid = std::fs::read_dir(app.home.path().join("instances"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("instance.json")).ok())
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        .find(|r| r["task"] == "release-2-1")
        .and_then(|r| r["pid"].as_i64())
        .expect("the task's monitor record") as i32;
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    let out = wait_output(deploy, T, "the interrupted deploy");
    assert!(!out.status.success(), "a deploy whose daemon died must not report success");
    assert!(pid_alive(task_pid), "the release task died with the daemon");

    daemon_back(&app);

    // The next deploy is refused while v2's task lives, then goes through.
    app.write_spec(&app.spec().replace("TASK_SECONDS = \"30\"", "TASK_SECONDS = \"0\""));
    set_version(&app, "3");
    let mut refusals = Vec::new();
    let started = std::time::Instant::now();
    loop {
        let r = app.run(&["deploy"]);
        if r.code == 0 {
            break;
        }
        assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
        refusals.push(r.stderr);
        assert!(started.elapsed() < Duration::from_secs(120), "the deploy was refused for 2 minutes: {refusals:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(!refusals.is_empty(), "a deploy went through while v2's release task still ran");
    assert!(
        refusals.iter().any(|r| r.contains(&format!("running release task 1/1 `sh task.sh` (pid {task_pid})"))),
        "the refusal names the task and its pid: {refusals:?}"
    );
    assert!(!pid_alive(task_pid));

    // Never two release tasks at once: v2's ran once, v3's after it ended.
    let runs = runs();
    let v2: Vec<_> = runs.iter().filter(|(_, r, _)| r == "v2").collect();
    assert_eq!(v2.len(), 2, "v2's task ran once, start and end: {runs:?}");
    let mut intervals: Vec<(u128, u128, &str)> = Vec::new();
    for (what, release, at) in &runs {
        match what.as_str() {
            "start" => intervals.push((*at, u128::MAX, release)),
            _ => {
                let open = intervals.iter_mut().rev().find(|i| i.2 == release).unwrap();
                open.1 = *at;
            }
        }
    }
    intervals.sort();
    for pair in intervals.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "release tasks overlapped: {pair:?} in {runs:?}");
    }
    assert_eq!(intervals.len(), 3, "{runs:?}");

    // History says what happened to v2's deployment.
    let h = history(&app);
    assert_eq!(h[0]["to_release"], 3, "{h:#?}");
    assert_eq!(h[0]["status"], "succeeded", "{h:#?}");
    assert_eq!(h[1]["to_release"], 2, "{h:#?}");
    assert_eq!(h[1]["status"], "succeeded", "{h:#?}");
    let note = h[1]["reason"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!("release task 1/1 `sh task.sh` (pid {task_pid}) was left running by the previous daemon: waited for it: exit code 0")),
        "{h:#?}"
    );
    let table = app.run(&["history"]);
    table.ok();
    assert!(table.stdout.contains("waited for it"), "{}", table.stdout);
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 3"), "{body}");
}

/// Issue 15: a build command was orphaned the same way as a release task.
/// The restarted daemon kills its process group (recorded by pid and start
/// time), fails the deployment saying so, and the next deploy builds
/// cleanly (the half-built release directory is gone).
#[test]
fn a_daemon_killed_during_a_build_kills_the_build_command_when_it_comes_back() {
    let app = deployable();
    let dir = app.dir.path().display().to_string();
    build_with_script(
        &app,
        &format!("echo $$ > {dir}/build.pid\nsleep $BUILD_SECONDS\necho built-$NONSTOP_RELEASE > build-marker.txt\n"),
    );
    let spec = app.spec().replace("APP_VERSION = \"1\"", "APP_VERSION = \"1\"\nBUILD_SECONDS = \"0\"");
    assert!(spec.contains("BUILD_SECONDS"), "{spec}");
    app.write_spec(&spec);
    let gi = app.dir.path().join(".gitignore");
    std::fs::write(&gi, std::fs::read_to_string(&gi).unwrap() + "build.pid\n").unwrap();
    app.run(&["deploy"]).ok();
    let pid_file = app.dir.path().join("build.pid");
    std::fs::remove_file(&pid_file).unwrap();

    app.write_spec(&app.spec().replace("BUILD_SECONDS = \"0\"", "BUILD_SECONDS = \"600\""));
    set_version(&app, "2");
    let deploy = app.cmd(&["deploy"]).spawn().unwrap();
    wait_until(T, "v2's build command to run", || std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n')));
    // Its pid is recorded by the daemon once the builder reports it (and
    // only then does the command run): wait for the record. (A daemon
    // killed before it is the next test's.)
    // (v1's build was recorded the same way: the second record is v2's.)
    wait_until(T, "the build command's process to be recorded", || {
        app.log().matches("recorded the process of build command 1/1").count() >= 2
    });
    let build_pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    let _ = wait_output(deploy, T, "the interrupted deploy");
    assert!(pid_alive(build_pid), "the build command died with the daemon");

    daemon_back(&app);
    wait_until(T, "the orphaned build command to be killed", || !pid_alive(build_pid));
    wait_until(T, "the deployment to end", || history(&app)[0]["status"] != "running");
    let h = history(&app);
    assert_eq!(h[0]["to_release"], 2, "{h:#?}");
    assert_eq!(h[0]["status"], "failed", "{h:#?}");
    let note = h[0]["reason"].as_str().unwrap_or_default();
    assert!(
        note.contains("build command 1/1 `sh build.sh` (pid ")
            && note.contains("was left running by the previous daemon: killed its process group"),
        "{h:#?}"
    );

    // The next deploy builds v3 cleanly; nothing of v2 is left on disk.
    app.write_spec(&app.spec().replace("BUILD_SECONDS = \"600\"", "BUILD_SECONDS = \"0\""));
    set_version(&app, "3");
    app.run(&["deploy"]).ok();
    let releases = app.home.path().join("releases/hello");
    let mut entries: Vec<String> =
        std::fs::read_dir(&releases).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    entries.sort();
    assert_eq!(entries, ["v1", "v3"], "a half-built v2 was left behind");
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 3"), "{body}");
}

/// The live processes (zombies left out) of process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the command's `)`: state, ppid, pgrp.
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

/// A build command runs only once its process is recorded. A daemon
/// SIGKILLed between a build command's spawn and its record leaves nothing
/// running: the spawned process, held at its gate, exits by itself when
/// the gate closes with the daemon, having run nothing of the command;
/// the next daemon fails the deployment, saying the command had not run.
/// The window is made deterministic by the test-only
/// `NONSTOP_TEST_UNRECORDED_BUILD=2`, which keeps v2's first build command
/// from being reported to the engine (so never recorded).
#[test]
fn a_daemon_killed_before_a_build_command_is_recorded_leaves_nothing_running() {
    let app = deployable();
    let dir = app.dir.path().display().to_string();
    build_with_script(
        &app,
        &format!("echo $NONSTOP_RELEASE >> {dir}/build-runs.log\necho built-$NONSTOP_RELEASE > build-marker.txt\n"),
    );
    let gi = app.dir.path().join(".gitignore");
    std::fs::write(&gi, std::fs::read_to_string(&gi).unwrap() + "build-runs.log\n").unwrap();
    let runs = || std::fs::read_to_string(app.dir.path().join("build-runs.log")).unwrap_or_default();
    // This deploy starts the keeper and the daemon, with the hook.
    let first = app.cmd(&["deploy"]).env("NONSTOP_TEST_UNRECORDED_BUILD", "2").spawn().unwrap();
    let out = wait_output(first, T, "the first deploy");
    app.note_daemon();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(runs(), "v1\n");

    set_version(&app, "2");
    let deploy = app.cmd(&["deploy"]).spawn().unwrap();
    let said = "NONSTOP_TEST_UNRECORDED_BUILD: build command 1 of v2 spawned as pid ";
    wait_until(T, "v2's build command to be spawned", || app.log().contains(said));
    let log = app.log();
    let held: i32 = log[log.find(said).unwrap() + said.len()..].split(';').next().unwrap().trim().parse().unwrap();
    assert!(pid_alive(held), "the held build command is not there");
    let cmdline = std::fs::read(format!("/proc/{held}/cmdline")).unwrap_or_default();
    assert!(String::from_utf8_lossy(&cmdline).contains("read -r go"), "not held at its gate: {cmdline:?}");
    assert_eq!(runs(), "v1\n", "v2's build command ran before its process was recorded");

    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    let _ = wait_output(deploy, T, "the interrupted deploy");
    // Its gate closed with the daemon: it exits without running anything.
    wait_until(T, "the held build command to exit by itself", || !pid_alive(held));
    assert_eq!(group_members(held), Vec::<i32>::new(), "something of the build command's group is left");
    assert_eq!(runs(), "v1\n", "v2's build command ran unrecorded");

    daemon_back(&app);
    wait_until(T, "the deployment to end", || history(&app)[0]["status"] != "running");
    let h = history(&app);
    assert_eq!(h[0]["to_release"], 2, "{h:#?}");
    assert_eq!(h[0]["status"], "failed", "{h:#?}");
    let note = h[0]["reason"].as_str().unwrap_or_default();
    assert!(
        note.contains(
            "build command 1/1 `sh build.sh` had not run: the daemon stopped before its process was recorded"
        ) && note.contains("nothing of it was left running"),
        "{h:#?}"
    );
    let events = app.run(&["events"]);
    assert!(events.stdout.contains("build command 1/1 `sh build.sh` had not run"), "{}", events.stdout);
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 1"), "v1 still serves: {body}");

    // The next deploy builds v3 cleanly; nothing of v2 is left on disk.
    set_version(&app, "3");
    app.run(&["deploy"]).ok();
    assert_eq!(runs(), "v1\nv3\n");
    let releases = app.home.path().join("releases/hello");
    let mut entries: Vec<String> =
        std::fs::read_dir(&releases).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    entries.sort();
    assert_eq!(entries, ["v1", "v3"], "a half-built v2 was left behind");
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 3"), "{body}");
}

/// `nonstop scale` owns the count: a deploy of the same toml, a rollback
/// and a daemon killed and restarted keep it (and the deploy says why);
/// changing `count` in nonstop.toml applies the new one.
#[test]
fn a_scaled_count_survives_deploy_rollback_and_a_daemon_restart_and_a_toml_change_applies() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    let workers = |app: &TestApp| instances(app).iter().filter(|i| i["process"] == "worker").count();
    let desired = |app: &TestApp| {
        app.status()["processes"].as_array().unwrap().iter().find(|p| p["process"] == "worker").unwrap()["desired"]
            .as_u64()
            .unwrap()
    };
    app.run(&["scale", "worker=3"]).ok();
    wait_until(T, "three workers", || workers(&app) == 3);

    set_version(&app, "2");
    let r = app.run(&["deploy"]);
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(out.contains("worker: 3 instances (set by `nonstop scale`; nonstop.toml says 1)"), "{out}");
    assert!(out.contains("v2 is live"), "{out}");
    assert_eq!((desired(&app), workers(&app)), (3, 3));

    app.run(&["rollback"]).ok();
    assert_eq!((desired(&app), workers(&app)), (3, 3));
    assert!(instances(&app).iter().all(|i| i["release"] == 1));

    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
    app.up().ok();
    assert_ne!(app.daemon_pid(), Some(daemon));
    assert_eq!((desired(&app), workers(&app)), (3, 3));

    // The toml's count goes 1 → 2: it applies.
    app.write_spec(&app.spec().replace(
        "command = \"exec python3 worker.py\"\nkind = \"worker\"\ncount = 1",
        "command = \"exec python3 worker.py\"\nkind = \"worker\"\ncount = 2",
    ));
    assert!(app.spec().contains("worker.py\"\nkind = \"worker\"\ncount = 2"));
    let r = app.run(&["deploy"]);
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(out.contains("worker: count 3 → 2 (changed in nonstop.toml from 1"), "{out}");
    wait_until(T, "two workers", || workers(&app) == 2);
    assert_eq!(desired(&app), 2);
}

/// Every file and directory under `dir` without a write bit.
fn writable_entries(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.permissions().mode() & 0o222 != 0 {
            out.push(p.display().to_string());
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

/// A command that writes into the working directory, as the user the
/// daemon runs as, without root's power to ignore permission bits
/// (`setpriv` takes CAP_DAC_OVERRIDE out of the bounding set when the
/// tests run as root).
fn write_probe_args() -> Vec<&'static str> {
    let probe = "echo x > probe-file";
    if nix::unistd::Uid::effective().is_root() {
        vec!["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "sh", "-c", probe]
    } else {
        vec!["sh", "-c", probe]
    }
}

/// Releases are read-only once built; each process type has a persistent
/// NONSTOP_DATA_DIR shared by its releases, each instance its own TMPDIR,
/// removed once it is gone; `nonstop run` gets both too; pruning still
/// deletes read-only releases.
#[test]
fn releases_are_read_only_and_processes_keep_their_data_in_nonstop_data_dir() {
    use std::os::unix::fs::PermissionsExt;
    let app = deployable();
    let spec = app.spec().replace(
        "command = \"exec python3 worker.py\"\nkind = \"worker\"\ncount = 1",
        "command = 'echo \"$NONSTOP_RELEASE\" >> \"$NONSTOP_DATA_DIR/seen\"; echo \"$TMPDIR\" > \"$NONSTOP_DATA_DIR/tmp-$NONSTOP_INSTANCE\"; exec python3 worker.py'\nkind = \"worker\"\ncount = 2",
    );
    assert!(spec.contains("NONSTOP_DATA_DIR/seen"), "{spec}");
    app.write_spec(&spec);
    app.run(&["deploy"]).ok();
    let v1 = app.home.path().join("releases/hello/v1");
    let left = writable_entries(&v1);
    assert!(left.is_empty(), "writable in the release: {left:?}");

    // A write into the release fails (EACCES), whoever runs there.
    let r = app.run(&write_probe_args().iter().copied().fold(vec!["run"], |mut a, s| {
        a.push(s);
        a
    }));
    assert_ne!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
    assert!(!v1.join("probe-file").exists());

    // The data directory: one per process type, 0700, shared by releases.
    let data = app.home.path().join("data/hello/worker");
    wait_until(T, "both workers to write", || data.join("tmp-worker.1").exists() && data.join("tmp-worker.2").exists());
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    let tmp1 = std::fs::read_to_string(data.join("tmp-worker.1")).unwrap().trim().to_string();
    let tmp2 = std::fs::read_to_string(data.join("tmp-worker.2")).unwrap().trim().to_string();
    assert_ne!(tmp1, tmp2, "each instance has its own TMPDIR");
    for t in [&tmp1, &tmp2] {
        assert!(std::path::Path::new(t).is_dir(), "{t} exists while its instance runs");
        assert!(t.starts_with(&app.home.path().join("tmp").display().to_string()), "{t}");
    }

    set_version(&app, "2");
    app.run(&["deploy"]).ok();
    let seen = std::fs::read_to_string(data.join("seen")).unwrap();
    assert!(seen.lines().any(|l| l == "v1") && seen.lines().any(|l| l == "v2"), "{seen}");
    // The replaced instances' TMPDIRs went with them.
    for t in [&tmp1, &tmp2] {
        wait_until(T, "the old TMPDIR to be removed", || !std::path::Path::new(t).exists());
    }

    // `nonstop run`: the data directory `run`, a TMPDIR of its own.
    let r = app.run(&["run", "sh", "-c", "echo ok > \"$NONSTOP_DATA_DIR/run-file\" && echo \"$TMPDIR\""]);
    r.ok();
    assert!(app.home.path().join("data/hello/run/run-file").exists());
    assert!(!std::path::Path::new(r.stdout.trim()).exists(), "the run's TMPDIR is removed: {}", r.stdout);

    // Read-only releases are still pruned (retain_releases = 2).
    set_version(&app, "3");
    app.run(&["deploy"]).ok();
    set_version(&app, "4");
    app.run(&["deploy"]).ok();
    wait_until(T, "v1 to be pruned", || !v1.exists());
}

/// `nonstop run --release vN` runs with a retained release's code and
/// config; an unknown one is refused (exit 2) naming the retained ones,
/// and nothing runs.
#[test]
fn run_with_a_retained_release_uses_its_code_and_config() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    set_version(&app, "2");
    app.run(&["deploy"]).ok();
    let r = app.run(&["run", "--release", "v1", "sh", "-c", "echo \"$NONSTOP_RELEASE $APP_VERSION $(pwd)\""]);
    r.ok();
    let v1 = app.home.path().join("releases/hello/v1").canonicalize().unwrap();
    assert_eq!(r.stdout.trim(), format!("v1 1 {}", v1.display()));
    let r = app.run(&["run", "sh", "-c", "echo \"$NONSTOP_RELEASE $APP_VERSION\""]);
    r.ok();
    assert_eq!(r.stdout.trim(), "v2 2");

    let marker = app.dir.path().join("ran-anyway");
    let touch = format!("touch {}", marker.display());
    let r = app.run(&["run", "--release", "v9", "sh", "-c", &touch]);
    assert_eq!(r.code, 2, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("v9 is not a retained release; retained releases: v1, v2"), "{}", r.stderr);
    let r = app.run(&["run", "--release", "latest", "sh", "-c", &touch]);
    assert_eq!(r.code, 2, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("`latest` is not a release"), "{}", r.stderr);
    assert!(!marker.exists(), "nothing ran");
}

/// Deploying the content of a retained release rolls to it without a
/// build; its release tasks run again only with `--run-tasks`.
#[test]
fn deploying_the_content_of_a_retained_release_rolls_to_it_without_building() {
    let app = deployable();
    app.run(&["deploy"]).ok();
    set_version(&app, "2");
    app.run(&["deploy"]).ok();
    set_version(&app, "1");
    let r = app.run(&["deploy"]);
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(out.contains("content identical to v1: rolling to v1 without building"), "{out}");
    assert!(out.contains("v1 is live"), "{out}");
    let rel: Vec<serde_json::Value> = serde_json::from_str(&app.run(&["releases", "--json"]).stdout).unwrap();
    assert_eq!(rel.len(), 2, "no copy built: {rel:#?}");
    assert!(instances(&app).iter().all(|i| i["release"] == 1));
    let (_, body) = app.get("/").unwrap();
    assert!(body.contains("version 1"), "{body}");
    let log = std::fs::read_to_string(app.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "tasks not run again: {log}");
    set_version(&app, "2");
    app.run(&["deploy", "--run-tasks"]).ok();
    let log = std::fs::read_to_string(app.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log.lines().last(), Some("migrated v2"), "{log}");
    assert_eq!(log.lines().count(), 3, "{log}");
}

/// Issue 12: a release whose health view answers 200 while its pages answer
/// 500 is stopped by its smoke check before any client request reaches it.
#[test]
fn a_release_failing_its_smoke_check_is_rolled_back_before_any_client_saw_it() {
    let app = deployable();
    let spec = app.spec().replace("path = \"/health\"", "path = \"/health\"\nsmoke = [\"/\", \"/pid\"]");
    assert!(spec.contains("smoke = "), "{spec}");
    app.write_spec(&spec);
    app.run(&["deploy"]).ok();
    let before: Vec<i32> = app.pids("web");
    let load = Load::start(app.proxy(), "/", 4);
    wait_until(T, "traffic", || app.get("/").is_ok());
    app.write_spec(&app.spec().replace("APP_VERSION = \"1\"", "APP_VERSION = \"2\"\nBROKEN_PAGES = \"1\""));
    let r = app.run(&["deploy"]);
    let (ok, failures) = load.finish();
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("rolled back"), "{}", r.stderr);
    assert!(r.stderr.contains("smoke check failed: GET / -> 500"), "{}", r.stderr);
    assert!(r.stderr.contains("Missing staticfiles manifest entry"), "the body excerpt: {}", r.stderr);
    assert!(r.stderr.contains("no client request reached it"), "{}", r.stderr);
    // Not one client saw the broken release.
    assert!(ok > 0);
    assert!(failures.is_empty(), "{} failed of {ok}: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert_eq!(app.pids("web"), before, "the old instances were never replaced");
    let h = history(&app);
    assert_eq!(h[0]["status"], "rolled_back");
    assert!(h[0]["reason"].as_str().unwrap().contains("smoke check failed: GET / -> 500"), "{h:#?}");
}

#[test]
fn a_release_whose_pages_500_under_load_is_rolled_back_by_the_live_gate() {
    // No smoke check: the live-traffic gate (the default ramp, 5 % then
    // 25 %) is what must catch a release whose health check lies.
    let app = deployable();
    app.run(&["deploy"]).ok();
    let before: Vec<i32> = app.pids("web");
    let load = Load::start(app.proxy(), "/", 4);
    wait_until(T, "traffic", || app.get("/").is_ok());
    app.write_spec(&app.spec().replace("APP_VERSION = \"1\"", "APP_VERSION = \"2\"\nBROKEN_PAGES = \"1\""));
    let r = app.run(&["deploy"]);
    let (ok, failures) = load.finish();
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("rolled back"), "{}", r.stderr);
    assert!(r.stderr.contains("canary"), "{}", r.stderr);
    assert!(r.stderr.contains("answered 5xx"), "the evidence is the reason: {}", r.stderr);
    // Caught by whichever sees it first: the canary window's figures (5xx
    // rate against the old release's), or the proxy's passive ejection of
    // an instance answering only 5xx while its peers do not.
    let reason = history(&app)[0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("the new release answered 5xx")
            || reason.contains("was taken out of rotation: it answered 5xx"),
        "{reason}"
    );
    assert!(r.stderr.contains(&reason[..reason.len().min(60)]), "{}", r.stderr);
    assert_eq!(history(&app)[0]["status"], "rolled_back");
    // Only the canary's share saw the broken release, and only until the
    // window had enough of it: a few percent of the deploy's requests.
    let total = ok + failures.len() as u64;
    assert!(ok > 0);
    assert!(
        (failures.len() as u64) * 100 <= total * 5,
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(failures.iter().all(|f| f.contains("HTTP 500")), "{:?}", &failures[..failures.len().min(3)]);
    assert_eq!(app.pids("web"), before, "the old instances were never replaced");
}
