//! The release gates in a deployment, on fakes: the migration gate (a
//! breaking verdict refuses the deploy before any task runs; safe goes on;
//! `--allow-breaking` goes through maintenance; a rollback behind the
//! schema is refused unless forced) and the live-traffic gate (a canary
//! held at its share, judged on the figures the traffic layer reports).

use super::*;
use nonstop_core::driver::ExitStatus;
use nonstop_core::traffic::{BackendFigures, LatencyHistogram, RouteKey};
use nonstop_engine::{DeployOptions, EngineError, RollbackOptions};
use nonstop_testkit::spec::app;
use nonstop_testkit::{gate_outcome, within};

const DB: &str = "postgres://blog:secret@127.0.0.1:5432/blog";

fn route() -> RouteKey {
    RouteKey("blog/default".into())
}

fn with_db(v: &str) -> nonstop_core::process::AppSpec {
    app("blog").web("web", 2).env("V", v).database(DB).release_tasks(&["migrate"], secs(600)).build()
}

#[tokio::test(start_paused = true)]
async fn a_breaking_migration_is_refused_before_any_task_runs_and_processes_get_the_database() {
    let f = Fixture::new();
    let e = f.start();
    e.up(with_db("1")).await.unwrap();
    let before = alive(&f, "web");
    // Every process gets `[database]`'s variable.
    let launch = f.driver.launch_of(&before[0]).unwrap();
    assert!(launch.env.iter().any(|(k, v)| k == "DATABASE_URL" && v == DB), "{:?}", launch.env);

    f.builder.set_hash("source-2");
    f.schema_gate.answer_check(Ok(gate_outcome(true, "  BREAKING  column notes.title renamed", "v2")));
    let tasks_before = f.driver.task_starts().len();
    let (r, progress) = e.deploy_with_progress(with_db("2")).await;
    let err = r.unwrap_err();
    assert!(
        matches!(&err, EngineError::DeployFailed { reason, .. }
            if reason.contains("refused before anything changed") && reason.contains("notes.title")
                && reason.contains("--allow-breaking")),
        "{err}"
    );
    assert_eq!(f.driver.task_starts().len(), tasks_before, "no release task ran");
    assert_eq!(alive(&f, "web"), before, "nothing changed");
    let check = &f.schema_gate.checks()[0];
    assert_eq!(check.tasks, ["migrate"]);
    assert!(check.env.iter().any(|(k, _)| k == "DATABASE_URL"), "the gate repoints the app's variables");
    assert!(progress.iter().any(|p| p.message.contains("migration gate")), "{progress:#?}");
    // The password never shows.
    assert!(!err.to_string().contains("secret") && !progress.iter().any(|p| p.message.contains("secret")));
}

#[tokio::test(start_paused = true)]
async fn allow_breaking_goes_through_maintenance_and_ends_serving_the_new_release() {
    let f = Fixture::new();
    let e = f.start();
    e.up(with_db("1")).await.unwrap();
    let before = alive(&f, "web");
    f.builder.set_hash("source-2");
    let at_start = f.traffic.maintenance_calls().len();
    let options = DeployOptions { allow_breaking: true, ..DeployOptions::default() };
    let (r, _) = e.deploy_with_options(with_db("2"), options).await;
    r.unwrap();
    assert!(f.schema_gate.checks().is_empty(), "the fallback needs no scratch run");
    assert_eq!(f.traffic.maintenance_calls()[at_start..], [(route(), true), (route(), false)]);
    let now = alive(&f, "web");
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|i| !before.contains(i)), "{now:?}");
    assert!(e.status().await.unwrap().maintenance.is_none());
}

#[tokio::test(start_paused = true)]
async fn allow_breaking_whose_tasks_fail_starts_the_old_release_again() {
    let f = Fixture::new();
    let e = f.start();
    e.up(with_db("1")).await.unwrap();
    f.builder.set_hash("source-2");
    f.driver.set_task_status(ExitStatus::Code(1));
    let at_start = f.traffic.maintenance_calls().len();
    let options = DeployOptions { allow_breaking: true, ..DeployOptions::default() };
    let (r, _) = e.deploy_with_options(with_db("2"), options).await;
    let err = r.unwrap_err();
    assert!(matches!(&err, EngineError::RolledBack { reason, .. } if reason.contains("release task")), "{err}");
    assert_eq!(alive(&f, "web").len(), 2, "the old release runs again");
    assert_eq!(f.traffic.maintenance_calls()[at_start..], [(route(), true), (route(), false)]);
    let st = e.status().await.unwrap();
    assert!(st.maintenance.is_none(), "{st:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_rollback_behind_the_schema_is_refused_unless_forced() {
    let f = Fixture::new();
    let e = f.start();
    e.up(with_db("1")).await.unwrap();
    f.builder.set_hash("source-2");
    e.deploy_with_progress(with_db("2")).await.0.unwrap();
    f.builder.set_hash("source-3");
    e.deploy_with_progress(with_db("3")).await.0.unwrap();
    let before = alive(&f, "web");
    f.schema_gate.answer_behind(Ok(Some("  BREAKING  column notes.title dropped\n".into())));
    let (r, _) = e.rollback_with(RollbackOptions::default()).await;
    let err = r.unwrap_err();
    assert!(
        matches!(&err, EngineError::DeployFailed { reason, .. }
            if reason.contains("expects a schema the database no longer has") && reason.contains("--force")),
        "{err}"
    );
    assert_eq!(alive(&f, "web"), before);
    let (r, _) = e.rollback_with(RollbackOptions { force: true, ..RollbackOptions::default() }).await;
    r.unwrap();
    assert_eq!(f.schema_gate.behinds(), 1, "forced: not compared");
}

/// Two web instances ramped 5 % then 25 %, 10 s windows.
fn ramped(v: &str) -> nonstop_core::process::AppSpec {
    app("blog").web("web", 2).env("V", v).canary("web", &[5, 25], secs(10)).build()
}

fn figures(instance: &InstanceId, requests: u64, errors_5xx: u64) -> BackendFigures {
    slow_figures(instance, requests, errors_5xx, 5)
}

fn slow_figures(instance: &InstanceId, requests: u64, errors_5xx: u64, each_ms: u64) -> BackendFigures {
    let mut latency = LatencyHistogram::default();
    for _ in 0..requests {
        latency.record(ms(each_ms));
    }
    BackendFigures { requests, errors_5xx, latency, ..BackendFigures::new(instance.clone()) }
}

#[tokio::test(start_paused = true)]
async fn a_canary_answering_5xx_is_rolled_back_with_the_figures() {
    let f = Fixture::new();
    let e = f.start();
    e.up(ramped("1")).await.unwrap();
    let old = alive(&f, "web");
    f.builder.set_hash("source-2");
    let deploy = e.spawn_deploy(ramped("2"), "ann");
    // The canary gets its share from its start.
    f.driver.wait_for("the canary", |d| d.alive_of(&pn("web")).len() == 3).await;
    let canary = alive(&f, "web").into_iter().find(|i| !old.contains(i)).unwrap();
    let splits = f.traffic.split_calls();
    assert_eq!(splits[0].1.as_ref().map(|s| (s.instances.clone(), s.percent)), Some((vec![canary.clone()], 5)));
    // Traffic flows: the old release answers, the canary fails.
    let traffic = f.traffic.clone();
    let (c, o) = (canary.clone(), old.clone());
    let feeder = tokio::spawn(async move {
        for n in 1..=200u64 {
            traffic.set_figures(figures(&c, n, n));
            for i in &o {
                traffic.set_figures(figures(i, 20 * n, 0));
            }
            tokio::time::sleep(ms(50)).await;
        }
    });
    let err = within("the deploy", deploy).await.unwrap().unwrap_err();
    feeder.abort();
    assert!(
        matches!(&err, EngineError::RolledBack { reason, .. } if reason.contains("the new release answered 5xx to 100.0%")),
        "{err}"
    );
    f.driver.wait_for("the canary stopped", |d| !d.is_instance_alive(&canary)).await;
    assert_eq!(alive(&f, "web"), old, "the old instances were never replaced");
    assert_eq!(f.traffic.split_calls().last().map(|s| s.1.clone()), Some(None), "the split ends with the deploy");
}

#[tokio::test(start_paused = true)]
async fn a_healthy_canary_ramps_then_the_rollout_goes_on() {
    let f = Fixture::new();
    let e = f.start();
    e.up(ramped("1")).await.unwrap();
    let old = alive(&f, "web");
    f.builder.set_hash("source-2");
    f.traffic.reset_watermarks();
    // No traffic at all: each window ends after the idle time.
    let (r, progress) = e.deploy_with_progress(ramped("2")).await;
    r.unwrap();
    let percents: Vec<u8> = f.traffic.split_calls().iter().filter_map(|s| s.1.as_ref().map(|s| s.percent)).collect();
    assert_eq!(percents, [5, 25]);
    assert_eq!(f.traffic.split_calls().last().map(|s| s.1.clone()), Some(None));
    let now = alive(&f, "web");
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|i| !old.contains(i)));
    assert!(progress.iter().any(|p| p.message.contains("canary step 2")), "{progress:#?}");
    assert_eq!(f.traffic.healthy_watermarks(&pn("web")).0, 2, "capacity never dropped");
}

#[tokio::test(start_paused = true)]
async fn a_canary_slower_in_two_windows_in_a_row_is_rolled_back() {
    let f = Fixture::new();
    let e = f.start();
    e.up(ramped("1")).await.unwrap();
    let old = alive(&f, "web");
    f.builder.set_hash("source-2");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let deploy = e.spawn_deploy_with_progress(ramped("2"), tx);
    f.driver.wait_for("the canary", |d| d.alive_of(&pn("web")).len() == 3).await;
    let canary = alive(&f, "web").into_iter().find(|i| !old.contains(i)).unwrap();
    // Every page of the canary takes 500 ms, the old ones' 5 ms; no errors.
    let traffic = f.traffic.clone();
    let (c, o) = (canary.clone(), old.clone());
    let feeder = tokio::spawn(async move {
        for n in 1..=1_000u64 {
            traffic.set_figures(slow_figures(&c, n, 0, 500));
            for i in &o {
                traffic.set_figures(figures(i, 20 * n, 0));
            }
            tokio::time::sleep(ms(50)).await;
        }
    });
    let err = within("the deploy", deploy).await.unwrap().unwrap_err();
    feeder.abort();
    assert!(
        matches!(&err, EngineError::RolledBack { reason, .. }
            if reason.contains("p95") && reason.contains("2 windows in a row")),
        "{err}"
    );
    let mut progress = Vec::new();
    while let Ok(p) = rx.try_recv() {
        progress.push(p.message);
    }
    assert_eq!(
        progress.iter().filter(|p| p.contains("measuring once more")).count(),
        1,
        "one suspicion, then the failure: {progress:#?}"
    );
    let percents: Vec<u8> = f.traffic.split_calls().iter().filter_map(|s| s.1.as_ref().map(|s| s.percent)).collect();
    assert_eq!(percents, [5, 5], "measured twice at the first step, never ramped");
    f.driver.wait_for("the canary stopped", |d| !d.is_instance_alive(&canary)).await;
    assert_eq!(alive(&f, "web"), old, "the old instances were never replaced");
}
