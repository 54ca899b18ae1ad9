//! Release and post tasks are fenced like instances: a daemon that stops
//! while one runs leaves it running, and the next daemon waits for it (and
//! goes on with the deployment from its exit) instead of running another
//! one alongside it.

use crate::*;
use nonstop_core::driver::ExitStatus;
use nonstop_engine::{DeploymentInfo, EngineError};
use nonstop_store::DeploymentStatus;
use nonstop_store::{Store, TaskState};
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, within, Entry, Fixture, RunningEngine, TaskRun};
use std::path::Path;
use std::sync::Arc;

fn open(path: &Path) -> Store {
    Store::open(path).unwrap()
}

fn v2_with_tasks(tasks: &[&str]) -> nonstop_core::process::AppSpec {
    app("blog").worker("worker", 1).env("V", "2").release_tasks(tasks, secs(600)).build()
}

/// The newest deployment once it has ended.
async fn ended(e: &RunningEngine) -> DeploymentInfo {
    within("the deployment to end", async {
        loop {
            let h = e.handle.history(5).await.unwrap();
            if h.first().is_some_and(|d| d.status != DeploymentStatus::Running) {
                return h[0].clone();
            }
            tokio::time::sleep(ms(100)).await;
        }
    })
    .await
}

/// Up v1 (one worker), then a deploy of `spec` whose first release task is
/// caught running; the daemon stops (as a SIGKILL would leave it: nothing
/// is cleaned up) and the next one starts on the same store.
async fn daemon_stops_during_the_task(
    spec: nonstop_core::process::AppSpec,
    wait_for: &str,
) -> (tempfile::TempDir, Fixture, Fixture, RunningEngine) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    let e = f.start();
    e.up(app("blog").worker("worker", 1).build()).await.unwrap();
    f.builder.set_hash("source-2");
    f.driver.set_task_run(TaskRun::UntilEnded);
    let deploy = e.spawn_deploy(spec, "ann@laptop");
    f.driver.wait_for("the task to run", |d| d.task_starts().iter().any(|t| t == wait_for)).await;
    // Its handle is recorded as soon as it runs.
    within("the task's pid to be recorded", async {
        loop {
            let rec = f.store.unfinished_tasks(&nonstop_core::AppName::new("blog").unwrap(), &env()).unwrap();
            if rec.iter().any(|r| r.name == wait_for && r.state == TaskState::Running && r.locator.is_some()) {
                break;
            }
            settle().await;
            tokio::time::sleep(ms(1)).await;
        }
    })
    .await;
    e.shutdown().await;
    let _ = within("the interrupted deploy", deploy).await;
    assert_eq!(f.driver.tasks_alive().len(), 1, "a stopping daemon leaves the task running");
    assert!(f.driver.task_stops().is_empty(), "nothing stopped it");
    let g = f.next_daemon(Arc::new(open(&path)));
    let e2 = g.start();
    (dir, f, g, e2)
}

fn env() -> nonstop_core::EnvironmentId {
    nonstop_core::EnvironmentId::default_env()
}

#[tokio::test(start_paused = true)]
async fn a_release_task_left_running_is_waited_for_and_the_deploy_goes_on_from_its_exit() {
    let (_dir, f, _g, e2) = daemon_stops_during_the_task(v2_with_tasks(&["migrate", "seed"]), "release-1-1").await;
    settle().await;
    // Waited for: not killed, not run again, and nothing else runs alongside.
    assert_eq!(f.driver.tasks_alive().len(), 1);
    assert!(f.driver.task_stops().is_empty(), "{:?}", f.driver.task_stops());
    assert_eq!(f.driver.task_starts(), ["release-1-1"]);
    let st = e2.status().await.unwrap();
    assert!(st.operation.as_deref().is_some_and(|o| o.contains("release tasks")), "{st:#?}");
    // Another deploy meanwhile is refused.
    f.builder.set_hash("source-3");
    let (r, _) = e2.deploy_with_progress(v2_with_tasks(&["migrate"])).await;
    let pid = f.driver.tasks_alive()[0].locator.pid().unwrap();
    match r {
        Err(EngineError::Busy { operation, .. }) => assert!(
            operation.contains("(recovering after a daemon restart), running release task 1/2 `migrate` (pid ")
                && operation.contains(&format!("(pid {pid})")),
            "{operation}"
        ),
        other => panic!("{other:?}"),
    }

    tokio::time::sleep(secs(20)).await;
    assert!(f.driver.end_task("release-1-1", ExitStatus::Code(0)));
    // The deployment goes on: the next task, then the rollout.
    f.driver.wait_for("the second task", |d| d.task_starts().len() == 2).await;
    assert!(f.driver.end_task("release-1-2", ExitStatus::Code(0)));
    let d = ended(&e2).await;
    assert_eq!(d.status, DeploymentStatus::Succeeded, "{d:#?}");
    let reason = d.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("release task 1/2 `migrate` (pid ")
            && reason.contains("was left running by the previous daemon: waited for it: exit code 0"),
        "{d:#?}"
    );
    assert_eq!(f.driver.peak_tasks_alive(), 1, "two tasks never ran at once");
    let first_end = pos(&f, &Entry::TaskExit("release-1-1".into(), ExitStatus::Code(0)));
    let second = pos(&f, &Entry::RunTask("release-1-2".into()));
    assert!(first_end < second, "the second task started before the first ended");
    let st = e2.status().await.unwrap();
    assert!(st.instances.iter().all(|i| i.release == 1), "{st:#?}");
    let events = e2.handle.events(100).await.unwrap();
    assert!(
        events.iter().any(|ev| ev.kind == "task" && ev.message.contains("waited for it: exit code 0")),
        "{events:#?}"
    );
    let app = nonstop_core::AppName::new("blog").unwrap();
    assert!(f.store.unfinished_tasks(&app, &env()).unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_release_task_left_running_that_fails_fails_the_deploy_and_changes_nothing() {
    let (_dir, f, _g, e2) = daemon_stops_during_the_task(v2_with_tasks(&["migrate"]), "release-1-1").await;
    let before = alive(&f, "worker");
    settle().await;
    assert!(f.driver.end_task("release-1-1", ExitStatus::Code(3)));
    let d = ended(&e2).await;
    assert_eq!(d.status, DeploymentStatus::Failed, "{d:#?}");
    let reason = d.reason.unwrap_or_default();
    assert!(reason.contains("waited for it: exit code 3"), "{reason}");
    assert!(reason.contains("release task 1/1 `migrate` failed (exit code 3)"), "{reason}");
    assert_eq!(alive(&f, "worker"), before, "nothing changed");
    assert_eq!(f.driver.task_starts(), ["release-1-1"]);
}

#[tokio::test(start_paused = true)]
async fn a_release_task_that_ended_while_no_daemon_watched_decides_from_its_exit() {
    for (code, status) in [(0, "succeeded"), (2, "failed")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let f = Fixture::with_store(open(&path));
        let e = f.start();
        e.up(app("blog").worker("worker", 1).build()).await.unwrap();
        f.builder.set_hash("source-2");
        f.driver.set_task_run(TaskRun::UntilEnded);
        let deploy = e.spawn_deploy(v2_with_tasks(&["migrate"]), "ann");
        f.driver.wait_for("the task", |d| d.tasks_alive().len() == 1).await;
        settle().await;
        e.shutdown().await;
        let _ = within("deploy", deploy).await;
        // It finishes while no daemon runs.
        assert!(f.driver.end_task("release-1-1", ExitStatus::Code(code)));
        let g = f.next_daemon(Arc::new(open(&path)));
        let e2 = g.start();
        let d = ended(&e2).await;
        assert_eq!(d.status.as_str(), status, "{d:#?}");
        let reason = d.reason.unwrap_or_default();
        assert!(reason.contains(&format!("ended while no daemon watched: exit code {code}")), "{reason}");
        assert_eq!(f.driver.task_starts(), ["release-1-1"], "never run twice");
        let release = if code == 0 { 1 } else { 0 };
        let st = e2.status().await.unwrap();
        assert!(st.instances.iter().all(|i| i.release == release), "{st:#?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_post_task_left_running_is_waited_for_with_the_release_live() {
    let spec = app("blog").worker("worker", 1).env("V", "2").post_tasks(&["warm"]).build();
    let (_dir, f, _g, e2) = daemon_stops_during_the_task(spec, "post-1-1").await;
    settle().await;
    assert!(f.driver.task_stops().is_empty());
    assert!(f.driver.end_task("post-1-1", ExitStatus::Code(0)));
    let d = ended(&e2).await;
    assert_eq!(d.status, DeploymentStatus::Succeeded, "{d:#?}");
    assert!(d.reason.unwrap_or_default().contains("post task 1/1 `warm` (pid "), "history says what happened");
    assert_eq!(f.driver.task_starts(), ["post-1-1"]);
}

/// A first deploy (the app never ran, so its deployment cannot go on) is
/// failed at once, but its live task is neither killed nor overlapped: a
/// new deploy is refused, naming the task and its pid, until it has ended.
#[tokio::test(start_paused = true)]
async fn no_deploy_runs_its_tasks_while_a_task_of_an_earlier_one_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    let e = f.start();
    f.driver.set_task_run(TaskRun::UntilEnded);
    let deploy = e.spawn_deploy(v2_with_tasks(&["migrate"]), "ann");
    f.driver.wait_for("the task", |d| d.tasks_alive().len() == 1).await;
    settle().await;
    e.shutdown().await;
    let _ = within("deploy", deploy).await;
    let pid = f.driver.tasks_alive()[0].locator.pid().unwrap();

    let g = f.next_daemon(Arc::new(open(&path)));
    let e2 = g.start();
    // The restarted daemon recorded the first deployment as failed.
    // (`status` answers once it has restored.)
    let _ = e2.status().await;
    let app = nonstop_core::AppName::new("blog").unwrap();
    let first = g.store.deployments(&app, &env(), 10).unwrap().pop().unwrap();
    assert_eq!(first.status, nonstop_store::DeploymentStatus::Failed, "{first:#?}");
    settle().await;
    f.builder.set_hash("source-3");
    let (r, _) = e2.deploy_with_progress(v2_with_tasks(&["migrate"])).await;
    let err = r.unwrap_err();
    assert!(matches!(err, EngineError::TaskRunning { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("release task 1/1 `migrate` of deployment #1 still runs (pid {pid})")), "{msg}");
    assert_eq!(err.exit_code(), 3);
    assert_eq!(f.driver.task_starts().len(), 1, "the refused deploy ran nothing");
    assert!(f.driver.task_stops().is_empty(), "the migration is not killed half way");

    assert!(f.driver.end_task("release-1-1", ExitStatus::Code(0)));
    settle().await;
    f.driver.set_task_run(TaskRun::Instant);
    let (r, _) = e2.deploy_with_progress(v2_with_tasks(&["migrate"])).await;
    r.unwrap();
    assert_eq!(f.driver.peak_tasks_alive(), 1, "two tasks never ran at once");
    let store = open(&path);
    let tasks = store.tasks(&app, &env(), 10).unwrap();
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
    assert!(tasks[0].outcome.as_deref().is_some_and(|o| o.contains("exit code 0")), "{tasks:#?}");
    let first = store.deployments(&app, &env(), 10).unwrap().pop().unwrap();
    assert!(
        first.reason.as_deref().is_some_and(|r| r.contains("was left running by the previous daemon: waited for")),
        "{first:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_deploy_stops_its_running_release_task() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").worker("worker", 1).build()).await.unwrap();
    f.builder.set_hash("source-2");
    f.driver.set_task_run(TaskRun::UntilEnded);
    let deploy = e.spawn_deploy(v2_with_tasks(&["migrate"]), "ann");
    f.driver.wait_for("the task", |d| d.tasks_alive().len() == 1).await;
    e.handle.cancel("bob".into(), None).await.unwrap();
    let err = within("deploy", deploy).await.unwrap().unwrap_err();
    assert!(matches!(err, EngineError::DeployFailed { .. }), "{err}");
    assert_eq!(f.driver.task_stops(), [("release-1-1".to_string(), nonstop_core::Signal::Term)]);
    assert!(f.driver.tasks_alive().is_empty());
}

/// The start the build-command tests share: `blog` up with one worker on
/// a store in a temporary directory (for a next daemon), then a deploy
/// spawned whose build runs `commands`, the first of them hanging as
/// process `pid`; with `held`, the builder holds the report of its spawn
/// (the command waits for its permit), and the deploy is caught there.
struct HangingBuild {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    f: Fixture,
    e: RunningEngine,
    before: Vec<nonstop_core::InstanceId>,
    process: nonstop_core::driver::Locator,
    spec: nonstop_core::process::AppSpec,
    deploy: nonstop_testkit::Pending,
}

async fn hanging_build(pid: u32, commands: &[&str], held: bool) -> HangingBuild {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    let e = f.start();
    e.up(app("blog").worker("worker", 1).build()).await.unwrap();
    let before = alive(&f, "worker");
    f.builder.set_hash("source-2");
    let process = nonstop_core::driver::Locator::Local {
        pid,
        start_time: u64::from(pid) * 10,
        monitor_pid: 0,
        monitor_start_time: 0,
    };
    f.builder.hang_next_build(process.clone());
    if held {
        f.builder.hold_next_report();
    }
    let mut spec = app("blog").worker("worker", 1).env("V", "2").build();
    spec.build = commands.iter().map(|c| c.to_string()).collect();
    let deploy = e.spawn_deploy(spec.clone(), "ann");
    if held {
        within("the build command to be spawned", async {
            while f.builder.held().is_empty() {
                settle().await;
                tokio::time::sleep(ms(1)).await;
            }
        })
        .await;
    }
    HangingBuild { _dir: dir, path, f, e, before, process, spec, deploy }
}

/// The next daemon on the store at `path`, after the first stopped
/// mid-build: the deployment it finds has failed; with the reason given.
async fn next_daemon_fails_the_deploy(f: &Fixture, path: &Path) -> (Fixture, RunningEngine, String) {
    let g = f.next_daemon(Arc::new(open(path)));
    let e2 = g.start();
    let d = ended(&e2).await;
    assert_eq!(d.status, DeploymentStatus::Failed, "{d:#?}");
    (g, e2, d.reason.unwrap_or_default())
}

/// The next deploy of `spec` (a new build) goes live.
async fn next_deploy_goes_live(f: &Fixture, e: &RunningEngine, spec: nonstop_core::process::AppSpec) {
    f.builder.set_hash("source-3");
    let (r, _) = e.deploy_with_progress(spec).await;
    r.unwrap();
}

/// A build command runs as a child of the daemon: a daemon killed
/// mid-build leaves it running with nobody to read its output. The next
/// daemon kills its process group from the recorded pid and start time,
/// and the deployment fails, saying so.
#[tokio::test(start_paused = true)]
async fn a_build_command_left_running_is_killed_and_its_deploy_fails() {
    let HangingBuild { _dir, path, f, e, before, process, spec, deploy } =
        hanging_build(7001, &["make assets"], false).await;
    let blog = nonstop_core::AppName::new("blog").unwrap();
    within("the build command's pid to be recorded", async {
        loop {
            let recs = f.store.unfinished_tasks(&blog, &env()).unwrap();
            if recs.iter().any(|r| r.locator.as_ref() == Some(&process) && r.state == TaskState::Running) {
                break;
            }
            settle().await;
            tokio::time::sleep(ms(1)).await;
        }
    })
    .await;
    e.shutdown().await;
    let _ = within("the interrupted deploy", deploy).await;
    assert!(f.builder.kills().is_empty());

    let (g, e2, reason) = next_daemon_fails_the_deploy(&f, &path).await;
    assert!(
        reason.contains(
            "build command 1/1 `make assets` (pid 7001) was left running by the previous daemon: killed its process group"
        ),
        "{reason}"
    );
    f.builder.wait_killed(&process).await;
    assert_eq!(f.builder.kills(), std::slice::from_ref(&process));
    settle().await;
    let tasks = g.store.tasks(&blog, &env(), 10).unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert_eq!(tasks[0].state, TaskState::Finished);
    assert_eq!(tasks[0].outcome.as_deref(), Some("left running by the previous daemon: killed"));
    assert_eq!(alive(&f, "worker"), before, "nothing changed");
    next_deploy_goes_live(&f, &e2, spec).await;
}

/// Until the build command's process is recorded, its command does not
/// run (the builder holds it until the engine grants its permit). A daemon
/// killed between the spawn and the record leaves nothing running: the
/// next daemon has nothing to kill, and the deployment fails, saying the
/// command had not run.
#[tokio::test(start_paused = true)]
async fn a_build_command_spawned_but_not_recorded_never_ran_and_its_deploy_fails() {
    let HangingBuild { _dir, path, f, e, before, spec, deploy, .. } =
        hanging_build(7002, &["make assets", "make docs"], true).await;
    let blog = nonstop_core::AppName::new("blog").unwrap();
    let recs = f.store.unfinished_tasks(&blog, &env()).unwrap();
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert!(recs.iter().all(|r| r.locator.is_none() && r.state == TaskState::Starting), "{recs:#?}");
    // The daemon dies here: spawned, not recorded.
    e.shutdown().await;
    let _ = within("the interrupted deploy", deploy).await;
    assert!(f.builder.alive().is_empty(), "the command ran unrecorded");

    let (g, e2, reason) = next_daemon_fails_the_deploy(&f, &path).await;
    assert!(
        reason.starts_with(
            "build command 1/2 `make assets` had not run: the daemon stopped before its process was recorded (a \
             build command runs only once it is), so nothing of it was left running; "
        ),
        "{reason}"
    );
    assert!(!reason.contains("2/2"), "one note, for the command that was spawned: {reason}");
    settle().await;
    assert!(f.builder.kills().is_empty());
    let tasks = g.store.tasks(&blog, &env(), 10).unwrap();
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
    for t in &tasks {
        assert_eq!(t.state, TaskState::Finished, "{t:#?}");
        assert_eq!(t.outcome.as_deref(), Some("not run: the daemon stopped before its process was recorded"));
    }
    assert_eq!(alive(&f, "worker"), before, "nothing changed");
    next_deploy_goes_live(&f, &e2, spec).await;
}

/// A build command whose process cannot be recorded (a full disk) is not
/// run: its permit is refused and the deploy fails, saying why.
#[tokio::test(start_paused = true)]
async fn a_build_command_whose_process_cannot_be_recorded_is_not_run() {
    let HangingBuild { f, deploy, .. } = hanging_build(7003, &["make assets"], true).await;
    f.store.fail_writes_for_tests(Some("database or disk is full")).unwrap();
    f.builder.report_spawn();
    let err = within("the deploy", deploy).await.unwrap().unwrap_err();
    f.store.fail_writes_for_tests(None).unwrap();
    assert!(matches!(err, EngineError::DeployFailed { .. }), "{err}");
    assert!(err.to_string().contains("its process could not be recorded: "), "{err}");
    assert!(err.to_string().contains("database or disk is full"), "{err}");
    assert!(f.builder.alive().is_empty(), "the command ran unrecorded");
    assert_eq!(f.builder.refusals().len(), 1, "{:?}", f.builder.refusals());
}
