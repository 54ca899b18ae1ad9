//! `promote`: the release one environment runs, rolled out in another with
//! that environment's spec and config, nothing built.

use super::*;
use nonstop_core::process::AppSpec;
use nonstop_core::{EnvironmentId, ReleaseId};
use nonstop_engine::{EngineError, EngineHandle, OpReport, PromoteRequest};
use nonstop_store::DeploymentKind;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, within};
use std::path::{Path, PathBuf};

/// The app in environment `env`: what its `[environments.ENV.env]` gives.
fn blog(env: &str) -> AppSpec {
    app("blog").worker("worker", 2).env("WHERE", env).release_tasks(&["migrate"], secs(60)).build()
}

fn tx() -> tokio::sync::mpsc::UnboundedSender<nonstop_engine::Progress> {
    tokio::sync::mpsc::unbounded_channel().0
}

/// A deploy of `source` in `handle`'s environment (the fake builder's
/// release directory is the source directory).
async fn deploy_from(
    f: &Fixture,
    handle: &EngineHandle,
    spec: AppSpec,
    source: &Path,
) -> Result<OpReport, EngineError> {
    within("the deploy", handle.deploy(spec, source.to_path_buf(), f.base_env.clone(), None, "test".into(), tx())).await
}

async fn promote(f: &Fixture, target: &EngineHandle, from: &str, spec: AppSpec) -> Result<OpReport, EngineError> {
    let request = PromoteRequest {
        from: EnvironmentId::new(from).unwrap(),
        spec,
        base_env: f.base_env.clone(),
        message: None,
        who: "ann@host".into(),
    };
    within("the promotion", target.promote(request, tx())).await
}

/// The variables of the last instance of `worker` started in `env`.
fn last_start(f: &Fixture, env: &str) -> nonstop_core::driver::LaunchSpec {
    f.driver
        .starts_of(&pn("worker"))
        .into_iter()
        .rev()
        .find(|s| s.environment.as_str() == env)
        .unwrap_or_else(|| panic!("no worker started in {env}"))
}

fn var(spec: &nonstop_core::driver::LaunchSpec, name: &str) -> Option<String> {
    spec.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn dir_of(f: &Fixture, id: u64) -> PathBuf {
    let app = nonstop_core::AppName::new("blog").unwrap();
    f.store.release(&app, ReleaseId(id)).unwrap().unwrap().dir
}

#[tokio::test(start_paused = true)]
async fn promote_runs_the_release_staging_runs_with_productions_spec_and_nothing_built() {
    let f = Fixture::new();
    let e = f.start();
    let (staging, production) = (e.env(None, "staging"), e.env(None, "production"));
    let (old_src, new_src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Production runs v1 (its own build); staging gets v2.
    f.builder.set_hash("source-1");
    deploy_from(&f, &production, blog("production-1"), old_src.path()).await.unwrap();
    f.builder.set_hash("source-2");
    deploy_from(&f, &staging, blog("staging"), new_src.path()).await.unwrap();
    assert_eq!(staging.status().await.unwrap().release, 2);
    let builds = f.builder.builds();
    let tasks_before = f.driver.task_starts().len();

    let r = promote(&f, &production, "staging", blog("production-2")).await.unwrap();
    assert!(r.summary.contains("v2 is live"), "{}", r.summary);
    settle().await;

    // Exactly staging's release: same number, same directory, not built again.
    assert_eq!(f.builder.builds(), builds, "nothing was built");
    let st = production.status().await.unwrap();
    assert_eq!(st.release, 2);
    assert!(st.instances.iter().all(|i| i.release == 2), "{st:#?}");
    let started = last_start(&f, "production");
    assert_eq!(started.release, ReleaseId(2));
    assert_eq!(started.workdir, dir_of(&f, 2));
    assert_eq!(started.workdir, new_src.path(), "the directory staging's build made");
    // With production's spec, not staging's.
    assert_eq!(var(&started, "WHERE").as_deref(), Some("production-2"));
    assert_eq!(var(&started, "NONSTOP_ENVIRONMENT").as_deref(), Some("production"));
    assert_eq!(var(&last_start(&f, "staging"), "WHERE").as_deref(), Some("staging"), "staging is untouched");
    // Production's release tasks ran, in production.
    let tasks = f.driver.task_starts();
    assert_eq!(tasks.len(), tasks_before + 1, "{tasks:?}");
    let task = f.driver.task_spec(tasks.last().unwrap()).unwrap();
    assert_eq!(
        (task.environment.as_str(), task.release, task.workdir.as_path()),
        ("production", ReleaseId(2), new_src.path())
    );
    assert!(task.env.iter().any(|(k, v)| k == "WHERE" && v == "production-2"), "{:?}", task.env);
    // History says so.
    let history = production.history(10).await.unwrap();
    assert_eq!(
        (history[0].kind, history[0].to_release, history[0].from_release),
        (DeploymentKind::Promote, 2, Some(1))
    );
    assert_eq!(history[0].message.as_deref(), Some("promoted from staging"));
    assert_eq!(serde_json::to_value(history[0].kind).unwrap(), "promote");

    // A rollback in production: production's own v1 with production's
    // own spec of then, never staging's.
    within("the rollback", production.rollback(None, false, "test".into(), tx())).await.unwrap();
    settle().await;
    let back = last_start(&f, "production");
    assert_eq!((back.release, back.workdir.as_path()), (ReleaseId(1), old_src.path()));
    assert_eq!(var(&back, "WHERE").as_deref(), Some("production-1"));
    // And back to v2 the same way: as production ran it.
    within("the rollback", production.rollback(Some(ReleaseId(2)), false, "test".into(), tx())).await.unwrap();
    settle().await;
    assert_eq!(var(&last_start(&f, "production"), "WHERE").as_deref(), Some("production-2"));
}

#[tokio::test(start_paused = true)]
async fn promote_into_an_environment_that_runs_nothing_yet_makes_it() {
    let f = Fixture::new();
    let e = f.start();
    let src = tempfile::tempdir().unwrap();
    deploy_from(&f, &e.env(None, "staging"), blog("staging"), src.path()).await.unwrap();
    let production = e.env(Some("blog"), "production");
    promote(&f, &production, "staging", blog("production")).await.unwrap();
    settle().await;
    let st = production.status().await.unwrap();
    assert_eq!((st.release, st.instances.len()), (1, 2));
    assert_eq!(var(&last_start(&f, "production"), "WHERE").as_deref(), Some("production"));
    assert_eq!(f.builder.builds().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn promoting_what_the_target_runs_with_a_changed_spec_is_a_new_release_of_the_same_build() {
    let f = Fixture::new();
    let e = f.start();
    let src = tempfile::tempdir().unwrap();
    deploy_from(&f, &e.env(None, "staging"), blog("staging"), src.path()).await.unwrap();
    let production = e.env(Some("blog"), "production");
    promote(&f, &production, "staging", blog("production")).await.unwrap();
    // The same again: nothing to do.
    let again = promote(&f, &production, "staging", blog("production")).await.unwrap();
    assert!(!again.changed && again.summary.contains("nothing to promote"), "{}", again.summary);
    // Production's spec changed: v2, the build of v1.
    promote(&f, &production, "staging", blog("production, changed")).await.unwrap();
    settle().await;
    let started = last_start(&f, "production");
    assert_eq!((started.release, started.workdir.as_path()), (ReleaseId(2), src.path()));
    assert_eq!(var(&started, "WHERE").as_deref(), Some("production, changed"));
    assert_eq!(dir_of(&f, 2), dir_of(&f, 1));
    assert_eq!(f.builder.builds().len(), 1, "nothing built");
}

#[tokio::test(start_paused = true)]
async fn what_cannot_be_promoted_is_refused_and_nothing_changes() {
    let f = Fixture::new();
    let e = f.start();
    let src = tempfile::tempdir().unwrap();
    let (staging, production) = (e.env(None, "staging"), e.env(Some("blog"), "production"));
    let refused = |r: Result<OpReport, EngineError>, words: &[&str]| {
        let err = r.unwrap_err();
        assert!(matches!(err, EngineError::CannotPromote { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 2);
        for w in words {
            assert!(err.to_string().contains(w), "{w:?} not in: {err}");
        }
    };
    // Nothing runs anywhere yet.
    refused(promote(&f, &production, "staging", blog("p")).await, &["runs in no environment", "deploy"]);
    // Staging runs `up`'s working directory, not a release.
    e.up_in(&staging, blog("staging")).await.unwrap();
    refused(promote(&f, &production, "staging", blog("p")).await, &["working directory", "nonstop -e staging deploy"]);
    deploy_from(&f, &staging, blog("staging"), src.path()).await.unwrap();
    // A name that is not there, and the target itself.
    refused(promote(&f, &production, "stagng", blog("p")).await, &["no environment `stagng`", "staging", "--from"]);
    refused(promote(&f, &e.env(Some("blog"), "staging"), "staging", blog("p")).await, &["both `staging`"]);
    // A nonstop.toml whose commands changed since the build.
    let mut changed = blog("p");
    changed.processes[0].command = "something else".into();
    refused(
        promote(&f, &production, "staging", changed).await,
        &["[processes.worker] command", "deploy this nonstop.toml to `staging`"],
    );
    // Staging in the middle of a deploy.
    f.driver.set_task_run(nonstop_testkit::TaskRun::UntilEnded);
    f.builder.set_hash("source-2");
    let deploying = e.spawn_deploy_in(&staging, blog("staging"));
    f.driver.wait_for("the task", |d| d.tasks_alive().len() == 1).await;
    refused(promote(&f, &production, "staging", blog("p")).await, &["in the middle of deploy", "once it has ended"]);
    let name = f.driver.tasks_alive()[0].name.clone();
    f.driver.end_task(&name, nonstop_core::driver::ExitStatus::Code(0));
    within("the deploy", deploying).await.unwrap().unwrap();
    f.driver.set_task_run(nonstop_testkit::TaskRun::Instant);
    // A release that is no longer on disk.
    let app = nonstop_core::AppName::new("blog").unwrap();
    let mut rec = f.store.release(&app, ReleaseId(2)).unwrap().unwrap();
    rec.status = nonstop_store::ReleaseStatus::Pruned;
    f.store.put_release(&rec).unwrap();
    refused(promote(&f, &production, "staging", blog("p")).await, &["v2", "pruned", "deploy to `staging` again"]);
    // Staging down: nothing to promote.
    let (tx2, _rx) = tokio::sync::mpsc::unbounded_channel();
    staging.down(tx2).await.unwrap();
    settle().await;
    refused(promote(&f, &production, "staging", blog("p")).await, &["`staging` runs nothing"]);
    // Production was never touched, nor brought into being.
    assert!(matches!(production.status().await, Err(EngineError::UnknownEnvironment { .. })));
    let listed: Vec<String> = e.handle.environments().iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, ["blog/staging"]);
}

/// A daemon that stops while a promotion runs its release task: the next
/// one waits for the task and goes on with the target's spec (recorded
/// with the deployment), not the one the release was built with.
#[tokio::test(start_paused = true)]
async fn a_promotion_interrupted_by_a_daemon_restart_goes_on_with_the_targets_spec() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(nonstop_store::Store::open(&path).unwrap());
    let e = f.start();
    let (old_src, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let production = e.env(Some("blog"), "production");
    deploy_from(&f, &production, blog("production-1"), old_src.path()).await.unwrap();
    f.builder.set_hash("source-2");
    deploy_from(&f, &e.env(None, "staging"), blog("staging"), src.path()).await.unwrap();
    f.driver.set_task_run(nonstop_testkit::TaskRun::UntilEnded);
    let pending = {
        let (f_env, production) = (f.base_env.clone(), production.clone());
        tokio::spawn(async move {
            let request = PromoteRequest {
                from: EnvironmentId::new("staging").unwrap(),
                spec: blog("production"),
                base_env: f_env,
                message: None,
                who: "ann@host".into(),
            };
            production.promote(request, tx()).await
        })
    };
    f.driver.wait_for("the release task", |d| d.tasks_alive().len() == 1).await;
    e.shutdown().await;
    let _ = pending.await;

    let g = f.next_daemon(std::sync::Arc::new(nonstop_store::Store::open(&path).unwrap()));
    let e2 = g.start();
    let production = e2.env(Some("blog"), "production");
    settle().await;
    let name = g.driver.tasks_alive()[0].name.clone();
    assert!(g.driver.end_task(&name, nonstop_core::driver::ExitStatus::Code(0)));
    for _ in 0..100 {
        settle().await;
        tokio::time::sleep(secs(1)).await;
        if production.status().await.is_ok_and(|s| s.operation.is_none() && s.instances.len() == 2) {
            break;
        }
    }
    let st = production.status().await.unwrap();
    assert_eq!((st.release, st.operation.as_deref()), (2, None), "{st:#?}");
    assert_eq!(var(&last_start(&g, "production"), "WHERE").as_deref(), Some("production"));
    let history = production.history(5).await.unwrap();
    assert_eq!(
        (history[0].kind, history[0].status),
        (DeploymentKind::Promote, nonstop_store::DeploymentStatus::Succeeded)
    );
}
