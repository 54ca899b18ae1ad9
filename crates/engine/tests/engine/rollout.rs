//! Rolling restarts: capacity kept, surge respected, singletons never
//! doubled, a bad new instance aborts the rollout.

use crate::*;
use nonstop_core::driver::ExitStatus;
use nonstop_core::traffic::BackendHealth;
use nonstop_core::InstanceId;
use nonstop_engine::EngineError;
use nonstop_testkit::spec::app;
use nonstop_testkit::{within, AutoHealth, Entry, Fixture, Lifetime, StopBehavior};
use std::collections::BTreeSet;
use tokio::time::Instant;

fn set(ids: &[InstanceId]) -> BTreeSet<InstanceId> {
    ids.iter().cloned().collect()
}

#[tokio::test(start_paused = true)]
async fn rolling_restart_keeps_capacity_and_respects_the_surge() {
    let f = Fixture::new();
    // New instances take a while to pass their checks, drains and stops
    // take a while too, so that the steps overlap as they would for real.
    f.traffic.set_default_auto_health(AutoHealth::After(secs(3)));
    f.traffic.set_drain_delay(secs(2));
    f.driver.set_default_stop_behavior(StopBehavior::After(secs(1)));
    let e = f.start();
    e.up(app("blog").web("web", 3).worker("worker", 1).build()).await.unwrap();
    let old = alive(&f, "web");
    let worker = alive(&f, "worker");
    assert_eq!(f.traffic.healthy_count(&pn("web")), 3);
    f.driver.reset_peaks();
    f.traffic.reset_watermarks();

    let report = e.restart(Some("web")).await.unwrap();
    assert!(report.summary.contains("web"), "{report:?}");

    let new = alive(&f, "web");
    assert_eq!(slots(&new), [1, 2, 3]);
    assert!(set(&new).is_disjoint(&set(&old)), "every old instance replaced: old {old:?}, now {new:?}");
    assert_eq!(set(&f.driver.stops()), set(&old), "exactly the old instances were stopped");
    assert_eq!(alive(&f, "worker"), worker, "other processes are left alone");

    let (fewest, most) = f.traffic.healthy_watermarks(&pn("web"));
    assert_eq!(fewest, 3, "max_unavailable 0: never fewer than 3 web instances in rotation");
    assert_eq!(most, 4);
    assert_eq!(f.driver.peak_alive(&pn("web")), 4, "never more than desired + surge (3 + 1)");

    // Per slot: the new one is healthy before the old one is drained, and
    // the old one is drained before it is stopped.
    for o in &old {
        let n = new.iter().find(|n| n.slot == o.slot).unwrap();
        let healthy = pos(&f, &Entry::Health(n.clone(), BackendHealth::Healthy));
        let drain = pos(&f, &Entry::Drain(o.clone()));
        let stop = pos(&f, &Entry::Stop(o.clone()));
        assert!(healthy < drain && drain < stop, "slot {}: healthy {healthy}, drain {drain}, stop {stop}", o.slot);
    }
    let st = e.status().await.unwrap();
    assert_eq!(ready_of(&st, "web"), (3, 3));
    assert_eq!(set(&new).iter().map(|i| i.to_string()).collect::<Vec<_>>(), status_ids(&st, "web"));
}

#[tokio::test(start_paused = true)]
async fn rolling_restart_with_a_larger_surge_goes_faster_but_stays_within_it() {
    let f = Fixture::new();
    f.traffic.set_default_auto_health(AutoHealth::After(secs(3)));
    let e = f.start();
    e.up(app("blog").web("web", 4).rollout("web", 2, 0, secs(60)).build()).await.unwrap();
    f.driver.reset_peaks();
    f.traffic.reset_watermarks();
    let t0 = Instant::now();
    e.restart(Some("web")).await.unwrap();
    assert_eq!(f.driver.peak_alive(&pn("web")), 6);
    assert_eq!(f.traffic.healthy_watermarks(&pn("web")).0, 4);
    // Two waves of two, each waiting 3 s for health checks.
    assert_eq!(t0.elapsed(), secs(6));
}

#[tokio::test(start_paused = true)]
async fn a_singleton_is_stopped_before_its_replacement_starts() {
    let f = Fixture::new();
    // The old beat takes 4 s to exit after SIGTERM.
    f.driver.set_stop_behavior(&pn("beat"), StopBehavior::After(secs(4)));
    let e = f.start();
    e.up(app("blog").web("web", 2).worker("worker", 2).singleton("beat").build()).await.unwrap();
    let old_beat = alive(&f, "beat").remove(0);
    let old_workers = alive(&f, "worker");
    f.driver.reset_peaks();
    f.traffic.reset_watermarks();

    e.restart(None).await.unwrap();

    assert_eq!(f.driver.peak_alive(&pn("beat")), 1, "two beats ran at once");
    let new_beat = alive(&f, "beat").remove(0);
    assert_ne!(new_beat, old_beat);
    let exited = f.journal.time_of(&Entry::Exit(old_beat.clone(), ExitStatus::Signal(15))).unwrap();
    let started = f.journal.time_of(&Entry::Start(new_beat.clone())).unwrap();
    let stop_asked = f.journal.time_of(&Entry::Stop(old_beat.clone())).unwrap();
    assert_eq!(exited - stop_asked, secs(4));
    assert!(started >= exited, "the new beat started before the old one was gone");

    // Everything was rolled, web first, then workers, then the singleton.
    assert!(set(&alive(&f, "worker")).is_disjoint(&set(&old_workers)));
    assert!(f.driver.peak_alive(&pn("worker")) <= 3);
    assert_eq!(f.traffic.healthy_watermarks(&pn("web")).0, 2);
    let last_web_stop = f.driver.stops().iter().rposition(|i| i.process.as_str() == "web").unwrap();
    let first_worker_stop = f.driver.stops().iter().position(|i| i.process.as_str() == "worker").unwrap();
    let beat_stop = f.driver.stops().iter().position(|i| i == &old_beat).unwrap();
    assert!(last_web_stop < first_worker_stop && first_worker_stop < beat_stop, "{:?}", f.driver.stops());
}

#[tokio::test(start_paused = true)]
async fn a_singleton_that_ignores_sigterm_is_killed_before_the_new_one_starts() {
    let f = Fixture::new();
    f.driver.set_stop_behavior(&pn("beat"), StopBehavior::Hang);
    let e = f.start();
    e.up(app("blog").singleton("beat").with("beat", |p| p.stop_timeout = secs(7)).build()).await.unwrap();
    let old = alive(&f, "beat").remove(0);
    f.driver.reset_peaks();
    e.restart(Some("beat")).await.unwrap();
    assert_eq!(f.driver.exit_status(&old), Some(ExitStatus::Signal(9)));
    let killed = f.journal.time_of(&Entry::Exit(old.clone(), ExitStatus::Signal(9))).unwrap();
    let new = alive(&f, "beat").remove(0);
    assert!(f.journal.time_of(&Entry::Start(new)).unwrap() >= killed);
    assert_eq!(killed - f.journal.time_of(&Entry::Stop(old)).unwrap(), secs(7));
    assert_eq!(f.driver.peak_alive(&pn("beat")), 1);
}

#[tokio::test(start_paused = true)]
async fn a_new_instance_that_never_turns_healthy_aborts_the_rollout_and_keeps_the_old_ones() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).rollout("web", 1, 0, secs(30)).build()).await.unwrap();
    let old = alive(&f, "web");
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    f.traffic.reset_watermarks();
    let t0 = Instant::now();

    let restart = e.spawn_restart(Some("web"));
    f.driver.wait_alive(&pn("web"), 3).await;
    let new = alive(&f, "web").into_iter().find(|i| !old.contains(i)).unwrap();
    f.traffic.wait_added(&new).await;
    f.traffic.set_health(&new, BackendHealth::Unhealthy, "GET /health -> 503");

    let err = within("restart", restart).await.unwrap().unwrap_err();
    assert_eq!(t0.elapsed(), secs(30), "gives up at the rollout's health timeout");
    match &err {
        EngineError::RolloutFailed { process, reason } => {
            assert_eq!(process, "web");
            assert!(reason.contains(&new.slot_name()) && reason.contains("did not become"), "{reason}");
            assert!(reason.contains("GET /health -> 503"), "{reason}");
            assert!(!reason.contains("Host header"), "no hint for other statuses: {reason}");
        }
        other => panic!("expected RolloutFailed, got {other:?}"),
    }
    f.driver.wait_for("the new instance to be stopped", |d| !d.is_instance_alive(&new)).await;
    assert_eq!(f.driver.stops(), vec![new.clone()], "only the new instance is stopped");
    assert_eq!(alive(&f, "web"), old);
    assert_eq!(f.traffic.healthy_watermarks(&pn("web")).0, 2);
    let st = e.status().await.unwrap();
    assert_eq!(ready_of(&st, "web"), (2, 2));
    assert_eq!(status_ids(&st, "web"), old.iter().map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(st.operation, None);

    // And nothing tries again by itself.
    let starts = f.driver.starts().len();
    tokio::time::sleep(secs(300)).await;
    assert_eq!(f.driver.starts().len(), starts);
}

/// Django answers 400 to a Host not in ALLOWED_HOSTS: the failure says so.
#[tokio::test(start_paused = true)]
async fn a_rollout_failing_on_400s_says_the_app_may_refuse_the_checks_host() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 1).rollout("web", 1, 0, secs(30)).build()).await.unwrap();
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    let old = alive(&f, "web");
    let restart = e.spawn_restart(Some("web"));
    f.driver.wait_alive(&pn("web"), 2).await;
    let new = alive(&f, "web").into_iter().find(|i| !old.contains(i)).unwrap();
    f.traffic.wait_added(&new).await;
    f.traffic.set_health(&new, BackendHealth::Unhealthy, "GET /health -> 400 in 2ms");
    let err = within("restart", restart).await.unwrap().unwrap_err();
    let reason = err.to_string();
    assert!(reason.contains("GET /health -> 400 in 2ms"), "{reason}");
    assert!(reason.contains("refused its Host header") && reason.contains("ALLOWED_HOSTS"), "{reason}");
    assert!(reason.contains("set `host`"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn a_new_instance_that_crashes_aborts_the_rollout_with_its_logs() {
    let f = Fixture::new();
    f.logs.set_lines(&["SyntaxError: invalid syntax"]);
    let e = f.start();
    e.up(app("blog").web("web", 2).build()).await.unwrap();
    let old = alive(&f, "web");
    // New instances crash before their first check passes.
    f.traffic.set_auto_health(&pn("web"), AutoHealth::After(secs(2)));
    f.driver.set_lifetime(&pn("web"), Lifetime::ExitAfter(ms(500), ExitStatus::Code(1)));

    let err = e.restart(Some("web")).await.unwrap_err();
    match &err {
        EngineError::RolloutFailed { process, reason } => {
            assert_eq!(process, "web");
            assert!(reason.contains("exited (exit code 1)"), "{reason}");
            assert!(reason.contains("SyntaxError"), "{reason}");
        }
        other => panic!("expected RolloutFailed, got {other:?}"),
    }
    assert_eq!(alive(&f, "web"), old);
    assert!(f.driver.stops().is_empty(), "no old instance was stopped: {:?}", f.driver.stops());
    assert_eq!(f.driver.starts_of(&pn("web")).len(), 3, "one new instance was tried");
}

/// A rollout that fails after some slots were already replaced must not
/// take capacity away: the replaced slots' new instances are as good as
/// the old ones were (same release), so they stay.
#[tokio::test(start_paused = true)]
async fn a_rollout_failing_midway_keeps_the_instances_that_already_serve() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).rollout("web", 1, 0, secs(30)).build()).await.unwrap();
    let old = alive(&f, "web");
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    f.traffic.reset_watermarks();

    let restart = e.spawn_restart(Some("web"));
    // Slot 1 is replaced (its new instance passes its checks); the new
    // instance of slot 2 never does.
    f.driver.wait_alive(&pn("web"), 3).await;
    let new1 = alive(&f, "web").into_iter().find(|i| !old.contains(i)).unwrap();
    assert_eq!(new1.slot, 1);
    f.traffic.wait_added(&new1).await;
    f.traffic.set_health(&new1, BackendHealth::Healthy, "GET /health -> 200");
    f.driver.wait_for("web.1 replaced", |d| !d.is_instance_alive(&old[0])).await;
    assert!(matches!(within("restart", restart).await.unwrap(), Err(EngineError::RolloutFailed { .. })));

    tokio::time::sleep(secs(60)).await;
    let (fewest, _) = f.traffic.healthy_watermarks(&pn("web"));
    assert_eq!(fewest, 2, "capacity dropped below the desired count when the rollout was aborted");
    assert!(f.driver.is_instance_alive(&old[1]), "the old web.2 is kept");
}
