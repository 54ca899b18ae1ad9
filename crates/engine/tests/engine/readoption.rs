//! A restarted daemon finds its instances again through the store: it
//! neither duplicates the live ones nor keeps the dead ones.

use crate::*;
use nonstop_core::driver::ExitStatus;
use nonstop_core::traffic::{BackendHealth, InitialHealth};
use nonstop_core::InstanceId;
use nonstop_store::Store;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, within, AutoHealth, Entry, Fixture, StopBehavior};
use std::path::Path;
use std::sync::Arc;

fn open(path: &Path) -> Store {
    Store::open(path).unwrap()
}

fn blog() -> nonstop_core::process::AppSpec {
    app("blog").web("web", 2).worker("worker", 1).singleton("beat").build()
}

fn ids(st: &nonstop_engine::StatusReport) -> Vec<String> {
    st.instances.iter().map(|i| i.id.clone()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_readopts_live_instances_without_starting_any() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    let e = f.start();
    e.up(blog()).await.unwrap();
    let before = e.status().await.unwrap();
    let alive_before = f.driver.snapshot().alive;
    let starts_before = f.driver.starts().len();
    e.shutdown().await;
    assert_eq!(f.driver.snapshot().alive, alive_before, "a daemon shutdown leaves the instances running");

    tokio::time::sleep(secs(5)).await;
    let g = f.next_daemon(Arc::new(open(&path)));
    let e2 = g.start();
    let after = e2.status().await.unwrap();
    settle().await;

    assert_eq!(f.driver.starts().len(), starts_before, "re-adoption starts nothing");
    assert!(f.driver.stops().is_empty(), "re-adoption stops nothing");
    assert_eq!(ids(&after), ids(&before));
    for p in ["web", "worker", "beat"] {
        let (ready, desired) = ready_of(&after, p);
        assert_eq!(ready, desired, "{p} ready after re-adoption: {after:#?}");
    }
    for (a, b) in after.instances.iter().zip(&before.instances) {
        assert_eq!((a.pid, a.port), (b.pid, b.port));
        assert!(a.uptime_ms >= b.uptime_ms + 5000, "uptime survives the restart: {a:?}");
    }
    // The new proxy knows the web instances again, in rotation at once.
    let adds = g.traffic.adds();
    assert_eq!(adds.len(), 2, "{adds:#?}");
    for add in &adds {
        assert_eq!(add.backend.instance.process.as_str(), "web");
        assert_eq!(add.initial, InitialHealth::AssumeHealthy);
        assert_eq!(Some(add.backend.addr), f.driver.handle_of(&add.backend.instance).unwrap().addr);
    }
    assert_eq!(g.traffic.healthy_count(&pn("web")), 2);
    assert!(g.ingress.listening().is_some(), "the new daemon's proxy listens again");

    // The same `up` again is a no-op, and the re-adopted instances are
    // watched: a crash is noticed and restarted.
    let report = e2.up(blog()).await.unwrap();
    assert!(!report.changed, "{report:?}");
    assert_eq!(f.driver.starts().len(), starts_before);
    let worker = alive(&f, "worker").remove(0);
    f.driver.exit(&worker, CRASH);
    f.driver.wait_starts(&pn("worker"), 2).await;
    assert_eq!(alive(&f, "worker").len(), 1);
    assert_ne!(alive(&f, "worker")[0], worker);
}

#[tokio::test(start_paused = true)]
async fn instances_that_died_while_the_daemon_was_down_are_forgotten_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    let e = f.start();
    e.up(blog()).await.unwrap();
    let webs = alive(&f, "web");
    let worker = alive(&f, "worker").remove(0);
    let beat = alive(&f, "beat").remove(0);
    e.shutdown().await;

    // Killed (by the OOM killer, say) while nobody watched.
    assert!(f.driver.exit(&webs[1], ExitStatus::Signal(9)));
    assert!(f.driver.exit(&beat, ExitStatus::Signal(9)));
    f.driver.reset_peaks();

    let store = Arc::new(open(&path));
    let g = f.next_daemon(store.clone());
    let e2 = g.start();
    f.driver.wait_starts(&pn("beat"), 2).await;
    f.driver.wait_starts(&pn("web"), 3).await;
    let new_web = f.driver.starts_of(&pn("web")).pop().unwrap().instance;
    g.traffic
        .wait_for("the replacement web.2 to be healthy", |t| t.health_of(&new_web) == Some(BackendHealth::Healthy))
        .await;
    settle().await;

    assert_eq!(new_web.slot, 2);
    assert!(new_web.generation > webs[1].generation);
    assert_eq!(alive(&f, "web"), vec![webs[0].clone(), new_web.clone()]);
    assert_eq!(alive(&f, "worker"), vec![worker.clone()], "the live worker is kept, not restarted");
    assert_eq!(f.driver.starts_of(&pn("worker")).len(), 1);
    assert_eq!(f.driver.peak_alive(&pn("beat")), 1);
    assert_eq!(f.driver.peak_alive(&pn("web")), 2);

    let st = e2.status().await.unwrap();
    let listed: Vec<String> = ids(&st);
    assert!(!listed.contains(&webs[1].to_string()) && !listed.contains(&beat.to_string()), "{listed:?}");
    assert!(listed.contains(&webs[0].to_string()) && listed.contains(&new_web.to_string()));
    let app = nonstop_core::AppName::new("blog").unwrap();
    let recorded: Vec<InstanceId> =
        store.instances(&app, &nonstop_core::EnvironmentId::default_env()).unwrap().into_iter().map(|r| r.id).collect();
    assert!(!recorded.contains(&webs[1]) && !recorded.contains(&beat), "dead instances are forgotten: {recorded:?}");
    assert_eq!(recorded.len(), 4);
    // Only the live web instance was re-added as healthy; its replacement
    // had to pass its checks.
    let adds = g.traffic.adds();
    let initial_of = |id: &InstanceId| adds.iter().find(|a| &a.backend.instance == id).map(|a| a.initial);
    assert_eq!(initial_of(&webs[0]), Some(InitialHealth::AssumeHealthy));
    assert_eq!(initial_of(&webs[1]), None);
    assert_eq!(initial_of(&new_web), Some(InitialHealth::Pending));
}

#[tokio::test(start_paused = true)]
async fn a_web_instance_that_was_not_healthy_yet_must_pass_its_checks_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    let e = f.start();
    let up = e.spawn_up(app("blog").web("web", 1).build());
    f.driver.wait_alive(&pn("web"), 1).await;
    let web = alive(&f, "web").remove(0);
    f.traffic.wait_added(&web).await;
    e.shutdown().await;
    assert!(matches!(within("up", up).await.unwrap(), Err(nonstop_engine::EngineError::ShuttingDown)));

    let g = f.next_daemon(Arc::new(open(&path)));
    g.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    let e2 = g.start();
    g.traffic.wait_added(&web).await;
    assert_eq!(g.traffic.adds()[0].initial, InitialHealth::Pending);
    let st = e2.status().await.unwrap();
    assert_eq!(ready_of(&st, "web"), (0, 1));
    assert_eq!(st.instances[0].state, nonstop_engine::InstanceState::Starting);
    g.traffic.set_health(&web, BackendHealth::Healthy, "GET /health -> 200");
    settle().await;
    assert_eq!(ready_of(&e2.status().await.unwrap(), "web"), (1, 1));
    assert_eq!(f.driver.starts().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_under_way_when_the_daemon_stopped_is_finished_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    // Web instances take long to stop: the daemon goes away meanwhile.
    f.driver.set_stop_behavior(&pn("web"), StopBehavior::Hang);
    let e = f.start();
    e.up(app("blog").web("web", 2).with("web", |p| p.stop_timeout = secs(60)).build()).await.unwrap();
    let webs = alive(&f, "web");
    let scale = e.spawn_scale(&[("web", 1)]);
    f.driver.wait_for("web.2 to be asked to stop", |d| d.stops().contains(&webs[1])).await;
    e.shutdown().await;
    let _ = within("scale", scale).await;
    assert!(f.driver.is_instance_alive(&webs[1]), "still stopping");

    let g = f.next_daemon(Arc::new(open(&path)));
    let e2 = g.start();
    f.driver.wait_for("web.2 to be stopped again", |d| d.stops().iter().filter(|i| *i == &webs[1]).count() == 2).await;
    assert!(g.traffic.health_of(&webs[1]).is_none(), "a stopping instance is not put back in rotation");
    assert!(pos(&f, &Entry::Add(webs[0].clone(), InitialHealth::AssumeHealthy)) > 0);
    // It ignores SIGTERM: killed at the stop timeout, then forgotten.
    f.driver.wait_for("web.2 to be gone", |d| !d.is_instance_alive(&webs[1])).await;
    settle().await;
    let st = e2.status().await.unwrap();
    assert_eq!(status_ids(&st, "web"), [webs[0].to_string()]);
    assert_eq!(ready_of(&st, "web"), (1, 1));
    assert_eq!(f.driver.starts().len(), 2, "no replacement for a slot scaled away");
}

#[tokio::test(start_paused = true)]
async fn an_instance_nobody_recorded_is_stopped_by_the_next_daemon() {
    use nonstop_core::driver::{Driver, LaunchSpec};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    let e = f.start();
    e.up(blog()).await.unwrap();
    let known = f.driver.snapshot().alive;
    e.shutdown().await;

    // A daemon died between starting this one and recording it.
    let orphan = InstanceId::new(pn("web"), 3, 99);
    let launch = f.driver.launch_of(&known[0]).unwrap();
    f.driver.start(LaunchSpec { instance: orphan.clone(), ..launch }).await.unwrap();
    // Another app's instance is none of this daemon's business.
    let other = InstanceId::new(pn("web"), 1, 1);
    let mut foreign = f.driver.launch_of(&known[0]).unwrap();
    foreign.app = nonstop_core::AppName::new("shop").unwrap();
    foreign.instance = other.clone();
    let foreign_handle = f.driver.start(foreign).await.unwrap();

    let g = f.next_daemon(Arc::new(open(&path)));
    let e2 = g.start();
    f.driver.wait_for("the orphan to be stopped", |d| !d.is_instance_alive(&orphan)).await;
    settle().await;
    assert_eq!(f.driver.stops(), vec![orphan.clone()], "only the orphan is stopped");
    assert!(f.driver.liveness(&foreign_handle).is_alive());
    let st = e2.status().await.unwrap();
    assert_eq!(ids(&st), known.iter().map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(g.traffic.health_of(&orphan).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_that_cannot_tell_whether_instances_live_keeps_them() {
    // Out of file descriptors, the driver cannot read /proc: `Unknown` is
    // not an exit. The instances are adopted (not forgotten, not started
    // again); their exits are watched like any other's.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(open(&path));
    let e = f.start();
    e.up(blog()).await.unwrap();
    let before = e.status().await.unwrap();
    let starts_before = f.driver.starts().len();
    e.shutdown().await;

    f.driver.set_liveness_unknown(Some("could not read /proc/1000/stat: Too many open files (os error 24)"));
    let g = f.next_daemon(Arc::new(open(&path)));
    let e2 = g.start();
    let after = e2.status().await.unwrap();
    settle().await;
    assert_eq!(ids(&after), ids(&before), "{after:#?}");
    assert_eq!(f.driver.starts().len(), starts_before, "nothing was started twice");
    assert!(f.driver.stops().is_empty(), "nothing was stopped");
    assert_eq!(g.traffic.adds().len(), 2, "the web instances are back in the proxy");
    f.driver.set_liveness_unknown(None);

    // And a real exit of one of them is still seen and restarted.
    let web = alive(&f, "web").remove(0);
    f.driver.exit(&web, CRASH);
    f.driver.wait_starts(&pn("web"), 3).await;
    e2.shutdown().await;
}
