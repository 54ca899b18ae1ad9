//! `stop`, `start` and maintenance as engine operations, against the fakes:
//! persisted before acted on, kept across a daemon restart, refusals while
//! stopped.

use crate::*;
use nonstop_core::maintenance::{build_maintenance, MaintenanceBy, StopPhase};
use nonstop_core::traffic::RouteKey;
use nonstop_core::{AppName, EnvironmentId};
use nonstop_engine::{AppState, EngineError, OpReport, Progress};
use nonstop_store::Store;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, Entry, Fixture, RunningEngine};
use std::sync::Arc;

fn route() -> RouteKey {
    RouteKey("blog/default".into())
}

fn ids() -> (AppName, EnvironmentId) {
    (AppName::new("blog").unwrap(), EnvironmentId::default_env())
}

async fn op(
    e: &RunningEngine,
    run: impl FnOnce(nonstop_engine::EngineHandle, String, tokio::sync::mpsc::UnboundedSender<Progress>) -> Pending,
) -> (Result<OpReport, EngineError>, Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = run(e.handle.clone(), "ann@host".into(), tx).await.unwrap();
    let mut lines = Vec::new();
    while let Ok(p) = rx.try_recv() {
        lines.push(p.message);
    }
    (r, lines)
}

type Pending = tokio::task::JoinHandle<Result<OpReport, EngineError>>;

fn stop(h: nonstop_engine::EngineHandle, who: String, tx: tokio::sync::mpsc::UnboundedSender<Progress>) -> Pending {
    tokio::spawn(async move { h.stop(who, tx).await })
}

fn start(h: nonstop_engine::EngineHandle, who: String, tx: tokio::sync::mpsc::UnboundedSender<Progress>) -> Pending {
    tokio::spawn(async move { h.start(who, tx).await })
}

#[tokio::test(start_paused = true)]
async fn stop_remembers_the_counts_and_a_restarted_daemon_keeps_the_app_stopped_until_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(Store::open(&path).unwrap());
    let e = f.start();
    e.up(app("blog").web("web", 2).worker("worker", 1).build()).await.unwrap();
    e.scale(&[("worker", 3)]).await.unwrap();

    let (r, lines) = op(&e, stop).await;
    let r = r.unwrap();
    assert!(r.summary.contains("web=2, worker=3"), "{r:?}");
    assert!(lines.iter().any(|l| l.contains("web.1") && l.contains("stopped")), "{lines:#?}");
    assert!(f.driver.alive().is_empty(), "{:?}", f.driver.alive());
    assert_eq!(f.traffic.maintenance(&route()).map(|m| m.page), Some(None), "the built-in page");
    let (name, env) = ids();
    let stored = f.store.controls(&name, &env).unwrap();
    let stopped = stored.stopped.unwrap();
    assert_eq!((stopped.phase, stopped.counts[&pn("worker")].count), (StopPhase::Stopped, 3));
    assert_eq!(stored.maintenance.unwrap().by, MaintenanceBy::Stop);
    let st = e.status().await.unwrap();
    assert_eq!((st.state, st.stopped.as_ref().unwrap().counts["worker"]), (AppState::Stopped, 3));

    // Harmless twice; refusals name the way out.
    let (r, _) = op(&e, stop).await;
    assert!(!r.unwrap().changed);
    let err = e.scale(&[("web", 4)]).await.unwrap_err();
    assert!(matches!(err, EngineError::Stopped { .. }), "{err}");
    assert!(err.to_string().contains("run `nonstop start` first (it brings back web=2, worker=3)"), "{err}");
    assert_eq!(err.exit_code(), 3);
    assert!(matches!(e.restart(None).await.unwrap_err(), EngineError::Stopped { .. }));
    let (r, _) = e.deploy_with_progress(app("blog").web("web", 2).worker("worker", 1).build()).await;
    assert!(matches!(r.unwrap_err(), EngineError::Stopped { .. }));

    // A new daemon: maintenance given to the proxy again, nothing started.
    e.shutdown().await;
    let g = f.next_daemon(Arc::new(Store::open(&path).unwrap()));
    let starts = g.driver.starts().len();
    let e = g.start();
    settle().await;
    assert_eq!(e.status().await.unwrap().state, AppState::Stopped);
    assert!(g.traffic.maintenance(&route()).is_some(), "maintenance not applied again after the restart");
    assert_eq!(g.driver.starts().len(), starts, "a stopped app started instances");

    let (r, lines) = op(&e, start).await;
    r.unwrap();
    assert!(lines.iter().any(|l| l.contains("maintenance off")), "{lines:#?}");
    assert_eq!(alive(&g, "web").len(), 2);
    assert_eq!(alive(&g, "worker").len(), 3);
    // Off only after web was healthy: the last call, after every web start.
    assert_eq!(g.traffic.maintenance_calls().last(), Some(&(route(), false)));
    assert!(g.traffic.maintenance(&route()).is_none());
    let st = e.status().await.unwrap();
    assert_eq!((st.state, st.maintenance.is_none(), st.stopped.is_none()), (AppState::Running, true, true));
    assert_eq!(g.store.controls(&name, &env).unwrap(), Default::default());
    let (r, _) = op(&e, start).await;
    assert!(r.unwrap().summary.contains("not stopped"));
}

#[tokio::test(start_paused = true)]
async fn a_stop_the_store_cannot_record_changes_nothing() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).build()).await.unwrap();
    f.store.fail_writes_for_tests(Some("database or disk is full")).unwrap();
    let (r, _) = op(&e, stop).await;
    assert!(matches!(r, Err(EngineError::Store { .. })), "{r:?}");
    settle().await;
    assert_eq!(alive(&f, "web").len(), 2, "instances were stopped without the stop on record");
    assert!(f.traffic.maintenance_calls().iter().all(|(_, on)| !on), "maintenance went on without its record");
    let err = e
        .handle
        .maintenance(Some(build_maintenance::<&str>(None, &[], None).unwrap()), "ann".into())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Store { .. }), "{err}");
    // The cause is kept, and `--json` / the API's detail carry its words.
    let cause = std::error::Error::source(&err).expect("the store's error is kept as the source");
    assert!(cause.to_string().contains("database or disk is full"), "{cause}");
    let json = serde_json::to_value(&err).expect("a store error serializes");
    assert_eq!(json["error"], "store", "{json}");
    assert!(json["reason"].as_str().is_some_and(|r| r.contains("database or disk is full")), "{json}");
    assert!(f.traffic.maintenance(&route()).is_none());
    f.store.fail_writes_for_tests(None).unwrap();
    e.handle
        .maintenance(Some(build_maintenance::<&str>(None, &["10.0.0.0/8"], None).unwrap()), "ann".into())
        .await
        .unwrap();
    assert_eq!(f.traffic.maintenance(&route()).unwrap().allow.len(), 1);
    // Maintenance is not an operation: it changes nothing that runs.
    assert_eq!(alive(&f, "web").len(), 2);
    e.handle.maintenance(None, "ann".into()).await.unwrap();
    assert!(f.traffic.maintenance(&route()).is_none());
}

#[tokio::test(start_paused = true)]
async fn down_of_a_stopped_app_gives_the_next_up_its_counts_back() {
    let f = Fixture::new();
    let e = f.start();
    let spec = app("blog").web("web", 2).worker("worker", 1).build();
    e.up(spec.clone()).await.unwrap();
    e.scale(&[("worker", 2)]).await.unwrap();
    op(&e, stop).await.0.unwrap();
    e.down().await.unwrap();
    assert!(f.traffic.maintenance(&route()).is_none(), "maintenance of the stop went with it");
    e.up(spec).await.unwrap();
    settle().await;
    assert_eq!(alive(&f, "web").len(), 2);
    assert_eq!(alive(&f, "worker").len(), 2, "the scaled count came back");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_puts_maintenance_back_before_any_instance_is_in_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(Store::open(&path).unwrap());
    let e = f.start();
    e.up(app("blog").web("web", 2).build()).await.unwrap();
    e.handle
        .maintenance(Some(build_maintenance::<&str>(Some("<p>x</p>".into()), &[], None).unwrap()), "ann".into())
        .await
        .unwrap();
    e.shutdown().await;
    let before = f.journal.entries().len();
    let g = f.next_daemon(Arc::new(Store::open(&path).unwrap()));
    assert!(g.ingress.listening().is_none());
    let e = g.start();
    settle().await;
    let after: Vec<Entry> = g.journal.entries().split_off(before);
    let on = after.iter().position(|x| *x == Entry::Maintenance(true)).unwrap_or_else(|| panic!("{after:#?}"));
    let first_add = after.iter().position(|x| matches!(x, Entry::Add(..))).unwrap_or_else(|| panic!("{after:#?}"));
    assert!(on < first_add, "a re-adopted instance was in rotation before maintenance: {after:#?}");
    assert_eq!(g.traffic.maintenance(&route()).unwrap().page.as_deref(), Some("<p>x</p>"));
    assert_eq!(alive(&g, "web").len(), 2, "instances keep running in maintenance");
    assert!(e.status().await.unwrap().maintenance.is_some());
}
