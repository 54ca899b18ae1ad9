//! Failures of `up`: refused before anything changes, or reported with the
//! evidence after trying.

use crate::*;
use nonstop_core::driver::ExitStatus;
use nonstop_core::traffic::BackendHealth;
use nonstop_engine::EngineError;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, within, AutoHealth, Fixture, Lifetime};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn preflight_failure_changes_nothing() {
    let f = Fixture::new();
    let e = f.start();
    let spec = app("blog")
        .web("web", 2)
        .worker("worker", 1)
        .with("worker", |p| p.command = "definitely-not-installed-xyz -A blog worker".into())
        .build();

    let err = e.up(spec).await.unwrap_err();
    match &err {
        EngineError::Preflight { problems } => {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains("processes.worker.command"), "{}", problems[0]);
            assert!(problems[0].contains("definitely-not-installed-xyz"), "{}", problems[0]);
        }
        other => panic!("expected Preflight, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 2);
    settle().await;
    assert!(f.driver.calls().is_empty(), "{:?}", f.driver.calls());
    assert!(f.ingress.listens().is_empty());
    assert!(f.store.apps().unwrap().is_empty());
    assert!(matches!(e.status().await, Err(EngineError::NotUp)));
}

#[tokio::test(start_paused = true)]
async fn preflight_failure_on_a_running_app_keeps_it_as_it_is() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).build()).await.unwrap();
    let calls = f.driver.calls().len();
    let bad = app("blog").web("web", 4).with("web", |p| p.command = "./bin/missing-server".into()).build();

    assert!(matches!(e.up(bad).await, Err(EngineError::Preflight { .. })));
    settle().await;
    assert_eq!(f.driver.calls().len(), calls);
    let recorded = &f.store.apps().unwrap()[0].spec;
    assert_eq!((recorded.processes[0].count, recorded.processes[0].command.as_str()), (2, "sleep infinity"));
    assert_eq!(ready_of(&e.status().await.unwrap(), "web"), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_proxy_address_in_use_changes_nothing() {
    let f = Fixture::new();
    f.ingress.fail_listen("Address already in use (os error 98)");
    let e = f.start();

    let err = e.up(app("blog").web("web", 2).build()).await.unwrap_err();
    match &err {
        EngineError::Listen { addr, reason } => {
            assert_eq!(addr, "127.0.0.1:8080");
            assert!(reason.contains("in use"), "{reason}");
        }
        other => panic!("expected Listen, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 2);
    settle().await;
    assert!(f.driver.calls().is_empty());
    assert!(f.store.apps().unwrap().is_empty());
    assert!(matches!(e.status().await, Err(EngineError::NotUp)));

    // A worker-only app needs no proxy.
    e.up(app("blog").worker("worker", 1).build()).await.unwrap();
    assert_eq!(alive(&f, "worker").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn another_app_in_the_same_environment_runs_beside_the_first() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 1).build()).await.unwrap();
    // Two apps can't both answer every host: the second claims its own.
    let mut shop_spec = app("shop").web("web", 2).build();
    (shop_spec.hosts, shop_spec.default_host) = (vec!["shop.test".into()], false);
    e.up(shop_spec).await.unwrap();
    settle().await;

    // Each is addressed by name; unnamed, the environment is ambiguous.
    let env = e.handle.environment().to_string();
    let (blog, shop) = (e.env(Some("blog"), &env), e.env(Some("shop"), &env));
    assert_eq!(blog.status().await.unwrap().instances.len(), 1);
    assert_eq!(shop.status().await.unwrap().instances.len(), 2);
    match e.status().await {
        Err(EngineError::AmbiguousApp { apps, .. }) => assert_eq!(apps, ["blog", "shop"]),
        other => panic!("expected AmbiguousApp, got {other:?}"),
    }
    // Down of one leaves the other running.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    shop.down(tx).await.unwrap();
    settle().await;
    assert_eq!(blog.status().await.unwrap().instances.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn up_fails_with_not_ready_and_the_evidence_when_web_never_turns_healthy() {
    let f = Fixture::new();
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    f.logs.set_lines(&["Booting worker with pid: 42", "django.db.utils.OperationalError: could not connect"]);
    let e = f.start();
    let spec = app("blog").web("web", 1).rollout("web", 1, 0, secs(20)).build();
    let t0 = Instant::now();
    let up = e.spawn_up(spec);
    f.driver.wait_alive(&pn("web"), 1).await;
    let web = alive(&f, "web").remove(0);
    f.traffic.wait_added(&web).await;
    tokio::time::sleep(secs(2)).await;
    f.traffic.set_health(&web, BackendHealth::Unhealthy, "GET /health -> 500");
    tokio::time::sleep(secs(2)).await;
    f.traffic.set_health(&web, BackendHealth::Unhealthy, "GET /health -> connection refused");

    let err = within("up", up).await.unwrap().unwrap_err();
    assert_eq!(t0.elapsed(), secs(20), "fails at the health timeout");
    match &err {
        EngineError::NotReady { instance, what, timeout_s, checks, logs } => {
            assert_eq!(instance, "web.1");
            assert_eq!(what, "healthy");
            assert_eq!(*timeout_s, 20);
            assert_eq!(checks, &["GET /health -> 500", "GET /health -> connection refused"]);
            assert!(logs.iter().any(|l| l.contains("OperationalError")), "{logs:?}");
        }
        other => panic!("expected NotReady, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("GET /health -> 500") && msg.contains("OperationalError"), "{msg}");
    // The app stays up as it is.
    assert!(f.driver.is_instance_alive(&web));
    assert_eq!(e.status().await.unwrap().operation, None);
}

#[tokio::test(start_paused = true)]
async fn up_fails_with_crash_loop_and_the_last_exit_and_log_lines() {
    let f = Fixture::new();
    f.driver.set_lifetime(&pn("worker"), Lifetime::ExitAfter(ms(50), ExitStatus::Code(3)));
    f.logs.set_lines(&["Traceback (most recent call last):", "ModuleNotFoundError: No module named 'blog'"]);
    let e = f.start();
    let spec = app("blog").web("web", 1).worker("worker", 1).build();

    let err = e.up(spec).await.unwrap_err();
    match &err {
        EngineError::CrashLoop { instance, exit, logs } => {
            assert_eq!(instance, "worker.1");
            assert_eq!(exit, "exit code 3");
            assert!(logs.iter().any(|l| l.contains("ModuleNotFoundError")), "{logs:?}");
        }
        other => panic!("expected CrashLoop, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    // crash_loop_after is 5 by default: five starts, five exits, then the verdict.
    assert_eq!(f.driver.starts_of(&pn("worker")).len(), 5);
    let st = e.status().await.unwrap();
    let waiting = st.waiting.iter().find(|w| w.instance == "worker.1").unwrap_or_else(|| panic!("{st:#?}"));
    assert_eq!(waiting.state, nonstop_engine::SlotState::CrashLoop);
    assert_eq!(waiting.last_exit.as_deref(), Some("exit code 3"));
    assert_eq!(ready_of(&st, "web"), (1, 1), "the rest of the app is up");
}

/// An operation must not fail because of a crash loop that is over: once
/// the slot runs again, later operations succeed.
#[tokio::test(start_paused = true)]
async fn a_crash_loop_that_recovered_does_not_fail_later_operations() {
    let f = Fixture::new();
    f.driver.set_lifetime(&pn("worker"), Lifetime::ExitAfter(ms(50), ExitStatus::Code(3)));
    let e = f.start();
    let spec = app("blog").web("web", 1).worker("worker", 1).build();
    assert!(matches!(e.up(spec).await, Err(EngineError::CrashLoop { .. })));

    // The database came back: the next start of the worker stays up.
    f.driver.set_lifetime(&pn("worker"), nonstop_testkit::Lifetime::Forever);
    f.driver.wait_alive(&pn("worker"), 1).await;
    tokio::time::sleep(secs(5)).await;
    let st = e.status().await.unwrap();
    assert_eq!(ready_of(&st, "worker"), (1, 1));
    assert!(st.waiting.is_empty(), "{st:#?}");

    e.scale(&[("web", 2)]).await.unwrap();
}

/// The error says "fix the command and run the command again": doing so
/// must work, not fail again on the crash loop that was just fixed.
#[tokio::test(start_paused = true)]
async fn up_again_after_fixing_a_crash_loop_succeeds() {
    let f = Fixture::new();
    f.driver.set_lifetime(&pn("worker"), Lifetime::ExitAfter(ms(50), ExitStatus::Code(3)));
    let e = f.start();
    let broken = app("blog").web("web", 1).worker("worker", 1).build();
    assert!(matches!(e.up(broken).await, Err(EngineError::CrashLoop { .. })));

    f.driver.set_lifetime(&pn("worker"), Lifetime::Forever);
    let fixed =
        app("blog").web("web", 1).worker("worker", 1).with("worker", |p| p.command = "exec sleep 7200".into()).build();
    let report = e.up(fixed).await.unwrap();
    assert!(report.changed);
    let worker = alive(&f, "worker");
    assert_eq!(worker.len(), 1);
    assert_eq!(f.driver.launch_of(&worker[0]).unwrap().command, "exec sleep 7200");
}

/// A crash-looping slot that is scaled away is no reason to fail.
#[tokio::test(start_paused = true)]
async fn scaling_a_crash_looping_slot_away_succeeds() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").worker("worker", 2).build()).await.unwrap();
    for n in 1..=5 {
        let w2 = alive(&f, "worker").into_iter().find(|i| i.slot == 2).unwrap();
        f.driver.exit(&w2, CRASH);
        f.driver.wait_starts(&pn("worker"), 2 + n).await;
    }
    let w2 = alive(&f, "worker").into_iter().find(|i| i.slot == 2).unwrap();
    f.driver.exit(&w2, CRASH);
    settle().await;
    let st = e.status().await.unwrap();
    assert_eq!(
        st.waiting.iter().map(|w| (w.instance.as_str(), w.state.as_str())).collect::<Vec<_>>(),
        [("worker.2", "crash-loop")]
    );

    e.scale(&[("worker", 1)]).await.unwrap();
    tokio::time::sleep(secs(60)).await;
    assert_eq!(slots(&alive(&f, "worker")), [1]);
    assert!(e.status().await.unwrap().waiting.is_empty());
}

/// Reading a large app directory (its content hash) takes seconds: the
/// engine answers meanwhile, and other operations are told it is busy.
#[tokio::test(start_paused = true)]
async fn the_engine_answers_while_a_deploy_reads_the_app_directory() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").worker("worker", 1).build()).await.unwrap();
    f.builder.hold_hashing();
    f.builder.set_hash("source-2");
    let deploy = e.spawn_deploy(app("blog").worker("worker", 1).build(), "ann");
    wait_operation(&e, "reading the app directory").await;
    assert_eq!(
        e.status().await.unwrap().operation.as_deref(),
        Some("deploy (reading the app directory)"),
        "status answers while the directory is read, and says so"
    );
    match e.scale(&[("worker", 2)]).await {
        Err(EngineError::Busy { operation, .. }) => assert_eq!(operation, "deploy by ann"),
        other => panic!("expected Busy, got {other:?}"),
    }
    f.builder.release_hashing();
    let report = within("the deploy", deploy).await.unwrap().unwrap();
    assert!(report.changed, "{report:?}");
    assert_eq!(f.builder.builds().len(), 1);
}
