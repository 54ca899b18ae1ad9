//! `nonstop cancel`: what is in progress stops as far as it can be undone.

use crate::*;
use nonstop_engine::EngineError;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, within, AutoHealth, Fixture};

#[tokio::test(start_paused = true)]
async fn nothing_in_progress_is_nothing_to_cancel() {
    let f = Fixture::new();
    let e = f.start();
    let r = e.handle.cancel("ann".into(), None).await.unwrap();
    assert!(!r.changed);
    assert!(r.summary.contains("nothing to cancel"), "{}", r.summary);
}

#[tokio::test(start_paused = true)]
async fn a_deploy_cancelled_during_its_release_tasks_changes_nothing() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").worker("worker", 2).build()).await.unwrap();
    let before = alive(&f, "worker");
    f.builder.set_hash("source-2");
    f.driver.set_unresponsive(true); // the migration hangs
    let deploy =
        e.spawn_deploy(app("blog").worker("worker", 2).release_tasks(&["migrate"], secs(600)).build(), "ann@laptop");
    wait_operation(&e, "release tasks").await;

    let r = e.handle.cancel("bob@ops".into(), Some("the migration locks the orders table".into())).await.unwrap();
    assert!(r.changed);
    assert!(r.summary.contains("cancelled while release tasks: nothing changed"), "{}", r.summary);
    let err = within("the deploy", deploy).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, EngineError::DeployFailed { reason, .. }
            if reason == "cancelled by bob@ops: the migration locks the orders table"),
        "{err}"
    );
    let history = e.handle.history(5).await.unwrap();
    assert!(
        history[0].reason.as_deref().is_some_and(|r| r.contains("bob@ops: the migration locks the orders table")),
        "{history:#?}"
    );
    f.driver.set_unresponsive(false);
    assert_eq!(alive(&f, "worker"), before);
    assert_eq!(e.status().await.unwrap().operation, None);
    let events = e.handle.events(50).await.unwrap();
    assert!(
        events.iter().any(|ev| ev.kind == "cancel" && ev.message.contains("by bob@ops: the migration locks")),
        "{events:#?}"
    );
    // A second cancel finds nothing.
    assert!(!e.handle.cancel("bob@ops".into(), None).await.unwrap().changed);
}

#[tokio::test(start_paused = true)]
async fn a_deploy_cancelled_while_rolling_rolls_back_and_keeps_the_old_instances() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).rollout("web", 1, 0, secs(600)).build()).await.unwrap();
    let old = alive(&f, "web");
    f.builder.set_hash("source-2");
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    f.traffic.reset_watermarks();
    let t0 = tokio::time::Instant::now();
    let deploy = e.spawn_deploy(app("blog").web("web", 2).rollout("web", 1, 0, secs(600)).build(), "ann@laptop");
    f.driver.wait_alive(&pn("web"), 3).await;
    let new = alive(&f, "web").into_iter().find(|i| !old.contains(i)).unwrap();
    f.traffic.wait_added(&new).await;

    let r = e.handle.cancel("ann".into(), None).await.unwrap();
    assert!(r.summary.contains("cancelled while rolling web: rolling back to"), "{}", r.summary);
    let err = within("the deploy", deploy).await.unwrap().unwrap_err();
    assert!(matches!(&err, EngineError::RolledBack { reason, .. } if reason.contains("cancelled by ann")), "{err}");
    assert!(t0.elapsed() < secs(60), "not at the health timeout: {:?}", t0.elapsed());
    f.driver.wait_for("the new instance to be stopped", |d| !d.is_instance_alive(&new)).await;
    assert_eq!(alive(&f, "web"), old);
    assert_eq!(f.traffic.healthy_watermarks(&pn("web")).0, 2, "capacity never dropped");
}

#[tokio::test(start_paused = true)]
async fn a_deploy_cancelled_while_its_directory_is_read_builds_nothing() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").worker("worker", 1).build()).await.unwrap();
    f.builder.hold_hashing();
    f.builder.set_hash("source-2");
    let deploy = e.spawn_deploy(app("blog").worker("worker", 1).build(), "ann@laptop");
    wait_operation(&e, "reading the app directory").await;
    let r = e.handle.cancel("ann".into(), None).await.unwrap();
    assert!(r.summary.contains("before anything was built"), "{}", r.summary);
    let err = within("the deploy", deploy).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("cancelled by ann"), "{err}");
    f.builder.release_hashing();
    settle().await;
    assert!(f.builder.builds().is_empty());
    assert_eq!(e.status().await.unwrap().operation, None);
}

#[tokio::test(start_paused = true)]
async fn a_rolling_restart_can_be_cancelled_but_a_scale_cannot() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).rollout("web", 1, 0, secs(600)).build()).await.unwrap();
    let old = alive(&f, "web");
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    let restart = e.spawn_restart(Some("web"));
    f.driver.wait_alive(&pn("web"), 3).await;
    let r = e.handle.cancel("ann".into(), None).await.unwrap();
    assert!(r.summary.contains("restart cancelled: web keeps the instances that ran before"), "{}", r.summary);
    let err = within("the restart", restart).await.unwrap().unwrap_err();
    assert!(matches!(&err, EngineError::RolloutFailed { reason, .. } if reason.contains("cancelled by ann")), "{err}");
    f.driver.wait_for("back to the old instances", |d| d.alive_of(&pn("web")).len() == 2).await;
    assert_eq!(alive(&f, "web"), old);

    // A scale waiting for new instances to be ready: not cancellable.
    let scale = e.spawn_scale(&[("web", 3)]);
    f.driver.wait_alive(&pn("web"), 3).await;
    let err = e.handle.cancel("ann".into(), None).await.unwrap_err();
    assert!(matches!(err, EngineError::NotCancellable { .. }), "{err}");
    assert!(err.to_string().contains("cannot be cancelled"), "{err}");
    assert_eq!(err.exit_code(), 3);
    scale.abort();
}
