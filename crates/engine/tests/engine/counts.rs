//! A count set by `nonstop scale` is owned by the runtime: deploys,
//! rollbacks, an `up` of an unchanged spec and daemon restarts keep it;
//! changing `count` in the toml applies the new one, and the plan says
//! which applies and why.

use crate::*;
use nonstop_core::process::AppSpec;
use nonstop_core::{AppName, CountSource, EnvironmentId, ReleaseId};
use nonstop_engine::Progress;
use nonstop_store::Store;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, Fixture, RunningEngine};
use std::sync::Arc;

fn v(version: &str, workers: u32) -> AppSpec {
    app("blog").worker("worker", workers).env("V", version).build()
}

fn said(progress: &[Progress], text: &str) -> bool {
    progress.iter().any(|p| p.message.contains(text))
}

async fn deploy(f: &Fixture, e: &RunningEngine, spec: AppSpec, hash: &str) -> Vec<Progress> {
    f.builder.set_hash(hash);
    let (r, progress) = e.deploy_with_progress(spec).await;
    r.unwrap_or_else(|err| panic!("deploy: {err}: {progress:#?}"));
    progress
}

async fn rollback(e: &RunningEngine, to: u64) {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    e.handle.rollback(Some(ReleaseId(to)), false, "test".into(), tx).await.unwrap();
}

async fn workers(f: &Fixture, e: &RunningEngine, n: usize) {
    settle().await;
    f.driver.wait_alive(&process("worker"), n).await;
    let st = e.status().await.unwrap();
    assert_eq!(ready_of(&st, "worker").1, n as u32, "{st:#?}");
    assert_eq!(alive(f, "worker").len(), n);
}

#[tokio::test(start_paused = true)]
async fn a_scaled_count_survives_deploys_rollbacks_and_restarts_and_a_toml_change_applies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(Store::open(&path).unwrap());
    let e = f.start();
    deploy(&f, &e, v("1", 2), "source-1").await;
    workers(&f, &e, 2).await;
    e.scale(&[("worker", 3)]).await.unwrap();
    workers(&f, &e, 3).await;
    let (app, env) = (AppName::new("blog").unwrap(), EnvironmentId::default_env());
    let rec = f.store.process_counts(&app, &env).unwrap()[&process("worker")];
    assert_eq!((rec.count, rec.source, rec.toml_at_apply), (3, CountSource::Scale, 2));

    // A deploy of the same toml count keeps the runtime's, and says so.
    let progress = deploy(&f, &e, v("2", 2), "source-2").await;
    assert!(said(&progress, "worker: 3 instances (set by `nonstop scale`; nonstop.toml says 2)"), "{progress:#?}");
    assert!(!said(&progress, "2 wanted"), "{progress:#?}");
    workers(&f, &e, 3).await;

    // A rollback keeps it.
    rollback(&e, 1).await;
    workers(&f, &e, 3).await;

    // So does a daemon restart.
    e.shutdown().await;
    let g = f.next_daemon(Arc::new(Store::open(&path).unwrap()));
    let e = g.start();
    workers(&g, &e, 3).await;
    let starts = g.driver.starts().len();

    // Back to v2 (a rollback the other way), still 3, nothing else started.
    rollback(&e, 2).await;
    workers(&g, &e, 3).await;
    assert_eq!(g.driver.starts().len(), starts + 3, "only the three replacements started");

    // The toml's count changes: it applies, and the plan says so.
    let progress = deploy(&g, &e, v("3", 4), "source-3").await;
    assert!(
        said(
            &progress,
            "worker: count 3 → 4 (changed in nonstop.toml from 2; replaces the count set by `nonstop scale`)"
        ),
        "{progress:#?}"
    );
    workers(&g, &e, 4).await;
    let rec = g.store.process_counts(&app, &env).unwrap()[&process("worker")];
    assert_eq!((rec.count, rec.source, rec.toml_at_apply), (4, CountSource::Toml, 4));

    // A plain change of the toml count: "count 4 → 1".
    let progress = deploy(&g, &e, v("4", 1), "source-4").await;
    assert!(said(&progress, "worker: count 4 → 1 (changed in nonstop.toml)"), "{progress:#?}");
    workers(&g, &e, 1).await;
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_deploy_that_changed_the_toml_count_leaves_the_runtime_count() {
    let f = Fixture::new();
    let e = f.start();
    deploy(&f, &e, v("1", 2), "source-1").await;
    e.scale(&[("worker", 3)]).await.unwrap();
    workers(&f, &e, 3).await;
    f.builder.set_hash("source-2");
    f.driver.fail_starts(&process("worker"), "no such module");
    let (r, _) = e.deploy_with_progress(v("2", 5)).await;
    assert!(r.is_err(), "{r:?}");
    f.driver.clear_failures();
    workers(&f, &e, 3).await;
    let (app, env) = (AppName::new("blog").unwrap(), EnvironmentId::default_env());
    let rec = f.store.process_counts(&app, &env).unwrap()[&process("worker")];
    assert_eq!(
        (rec.count, rec.source, rec.toml_at_apply),
        (3, CountSource::Scale, 2),
        "the failed deploy recorded nothing"
    );
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn up_of_an_unchanged_spec_keeps_a_scaled_count_and_a_changed_one_applies() {
    let f = Fixture::new();
    let e = f.start();
    e.up(v("1", 2)).await.unwrap();
    workers(&f, &e, 2).await;
    e.scale(&[("worker", 3)]).await.unwrap();
    workers(&f, &e, 3).await;
    let r = e.up(v("1", 2)).await.unwrap();
    assert!(!r.changed, "{r:?}");
    assert!(r.summary.contains("worker: 3 instances (set by `nonstop scale`; nonstop.toml says 2)"), "{r:?}");
    workers(&f, &e, 3).await;
    let r = e.up(v("1", 5)).await.unwrap();
    assert!(r.summary.contains("worker: count 3 → 5"), "{r:?}");
    workers(&f, &e, 5).await;
    e.shutdown().await;
}

/// Deploying content identical to a retained release rolls to it as a
/// rollback does: nothing built, its tasks not run again unless asked.
#[tokio::test(start_paused = true)]
async fn deploying_the_content_of_a_retained_release_reuses_it() {
    use nonstop_testkit::TaskRun;
    let f = Fixture::new();
    let e = f.start();
    f.driver.set_task_run(TaskRun::Instant);
    let v =
        |version: &str| app("blog").worker("worker", 1).env("V", version).release_tasks(&["migrate"], secs(60)).build();
    deploy(&f, &e, v("1"), "source-1").await;
    deploy(&f, &e, v("2"), "source-2").await;
    assert_eq!(f.builder.builds().len(), 2);
    assert_eq!(f.driver.task_starts().len(), 2);

    let progress = deploy(&f, &e, v("1"), "source-1").await;
    assert!(said(&progress, "v2 → v1: content identical to v1: rolling to v1 without building"), "{progress:#?}");
    assert!(said(&progress, "release tasks of v1 not run again"), "{progress:#?}");
    assert_eq!(f.builder.builds().len(), 2, "nothing built");
    assert_eq!(f.driver.task_starts().len(), 2, "no task run");
    let st = e.status().await.unwrap();
    assert!(st.instances.iter().all(|i| i.release == 1), "{st:#?}");
    let h = e.handle.history(1).await.unwrap();
    assert_eq!((h[0].kind.as_str(), h[0].status.as_str()), ("deploy", "succeeded"), "{h:#?}");

    // Asked for: its tasks run again.
    f.builder.set_hash("source-2");
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    e.handle
        .deploy_with_tasks(v("2"), f.workdir.clone(), f.base_env.clone(), None, "test".into(), true, tx)
        .await
        .unwrap();
    assert_eq!(f.builder.builds().len(), 2, "nothing built");
    assert_eq!(f.driver.task_starts().len(), 3, "its release task ran again");
    // Other content still builds.
    deploy(&f, &e, v("3"), "source-3").await;
    assert_eq!(f.builder.builds().len(), 3);
    e.shutdown().await;
}

/// Progress and events name instances with their release and, during a
/// rollout, old or new: "worker.1 (v2, new) started … worker.1 (v1, old)
/// stopped", never two different instances as plain "worker.1".
#[tokio::test(start_paused = true)]
async fn progress_names_instances_with_their_release_and_old_or_new() {
    let f = Fixture::new();
    let e = f.start();
    deploy(&f, &e, v("1", 1), "source-1").await;
    let progress = deploy(&f, &e, v("2", 1), "source-2").await;
    let lines: Vec<&str> = progress.iter().map(|p| p.message.as_str()).collect();
    let started = lines.iter().find(|l| l.contains(" started")).unwrap_or_else(|| panic!("{lines:#?}"));
    let stopped = lines.iter().find(|l| l.ends_with(" stopped")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(started.starts_with("worker.") && started.contains(" (v2, new) started (pid "), "{lines:#?}");
    assert!(stopped.starts_with("worker.") && stopped.ends_with(" (v1, old) stopped"), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains(" (v2, new) ready")), "{lines:#?}");
    let events = e.handle.events(50).await.unwrap();
    assert!(events.iter().any(|ev| ev.kind == "stop" && ev.message.contains("(v1, old) stopped")), "{events:#?}");
    assert!(events.iter().any(|ev| ev.kind == "start" && ev.message.contains("(v2, new) started")), "{events:#?}");
    e.shutdown().await;
}
