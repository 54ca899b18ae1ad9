//! up, scale, down, and one operation at a time.

use crate::*;
use nonstop_core::traffic::{BackendHealth, InitialHealth, RouteKey};
use nonstop_engine::EngineError;
use nonstop_testkit::spec::{app, LISTEN};
use nonstop_testkit::{settle, within, AutoHealth, Entry, Fixture};
use std::collections::BTreeMap;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn up_starts_the_desired_counts_and_routes_the_web_ones() {
    let f = Fixture::new();
    let e = f.start();
    let spec = app("blog").web("web", 2).worker("worker", 3).singleton("beat").build();

    let report = e.up(spec).await.unwrap();
    assert!(report.changed, "{report:?}");

    let mut started: Vec<String> = f.driver.starts().iter().map(|l| l.instance.slot_name()).collect();
    started.sort();
    assert_eq!(started, ["beat.1", "web.1", "web.2", "worker.1", "worker.2", "worker.3"]);
    assert_eq!(f.driver.snapshot().alive.len(), 6);

    // Web instances are routed on the app's route, with their own address
    // and the spec's health check, and start pending.
    let adds = f.traffic.adds();
    assert_eq!(adds.len(), 2, "only web instances get backends: {adds:#?}");
    for add in &adds {
        assert_eq!(add.backend.instance.process.as_str(), "web");
        assert_eq!(add.route, RouteKey("blog/default".into()));
        assert_eq!(add.initial, InitialHealth::Pending);
        assert_eq!(add.check.path, "/health");
        assert_eq!(Some(add.backend.addr), f.driver.handle_of(&add.backend.instance).unwrap().addr);
    }
    assert_ne!(adds[0].backend.addr, adds[1].backend.addr);
    assert_eq!(f.ingress.listening(), Some((LISTEN.parse().unwrap(), RouteKey("blog/default".into()))));

    let st = e.status().await.unwrap();
    assert_eq!(ready_of(&st, "web"), (2, 2));
    assert_eq!(ready_of(&st, "worker"), (3, 3));
    assert_eq!(ready_of(&st, "beat"), (1, 1));
    assert_eq!(st.operation, None);
    assert!(st.waiting.is_empty());
    for i in &st.instances {
        assert_eq!(i.state, nonstop_engine::InstanceState::Running, "{i:?}");
        if i.kind == nonstop_core::ProcessKind::Web {
            assert_eq!(i.health, Some(nonstop_core::traffic::BackendHealth::Healthy));
            assert!(i.port.is_some());
        } else {
            assert_eq!(i.health, None);
            assert_eq!(i.port, None);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn up_waits_until_every_web_instance_is_healthy() {
    let f = Fixture::new();
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    let e = f.start();
    let up = e.spawn_up(app("blog").web("web", 2).worker("worker", 1).build());

    f.driver.wait_alive(&pn("web"), 2).await;
    let webs = alive(&f, "web");
    for id in &webs {
        f.traffic.wait_added(id).await;
    }
    // Well past the worker's ready_after: only the web instances hold it up.
    tokio::time::sleep(secs(10)).await;
    assert!(!up.is_finished(), "up returned before any web instance was healthy");
    assert!(f.traffic.set_health(&webs[0], BackendHealth::Healthy, "GET /health -> 200"));
    settle().await;
    assert!(!up.is_finished(), "up returned with one of two web instances healthy");
    let st = e.status().await.unwrap();
    assert_eq!(st.operation.as_deref(), Some("up"));
    assert_eq!(ready_of(&st, "web"), (1, 2));
    assert_eq!(ready_of(&st, "worker"), (1, 1));

    assert!(f.traffic.set_health(&webs[1], BackendHealth::Healthy, "GET /health -> 200"));
    within("up", up).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn up_waits_for_workers_to_stay_up_for_ready_after() {
    let f = Fixture::new();
    let e = f.start();
    let spec = app("blog").web("web", 1).worker("worker", 2).with("worker", |p| p.ready_after = secs(5)).build();
    let t0 = Instant::now();
    e.up(spec).await.unwrap();
    assert_eq!(t0.elapsed(), secs(5), "up returns as the workers turn ready, not before, not later");
}

#[tokio::test(start_paused = true)]
async fn instances_get_their_identity_and_the_app_environment() {
    let f = Fixture::new();
    let e = f.start();
    let spec = app("blog")
        .web("web", 2)
        .worker("worker", 1)
        .env("DJANGO_SETTINGS_MODULE", "blog.settings")
        .env("LOG_LEVEL", "info")
        .with("worker", |p| {
            p.env.insert("LOG_LEVEL".into(), "debug".into());
            p.command = "exec sleep 3600".into();
        })
        .build();
    e.up(spec).await.unwrap();

    let env_of = |slot: &str| -> BTreeMap<String, String> {
        let l = f.driver.starts().into_iter().find(|l| l.instance.slot_name() == slot).unwrap();
        l.env.into_iter().collect()
    };
    let web2 = env_of("web.2");
    assert_eq!(web2["NONSTOP_INSTANCE"], "web.2");
    assert_eq!(web2["NONSTOP_PROCESS"], "web");
    assert_eq!(web2["NONSTOP_APP"], "blog");
    assert_eq!(web2["DJANGO_SETTINGS_MODULE"], "blog.settings");
    assert_eq!(web2["LOG_LEVEL"], "info");
    assert_eq!(web2["PATH"], f.base_env["PATH"], "the base environment is passed on");
    assert!(!web2.contains_key("PORT"), "the driver adds PORT, not the engine");

    let worker = env_of("worker.1");
    assert_eq!(worker["NONSTOP_INSTANCE"], "worker.1");
    assert_eq!(worker["NONSTOP_PROCESS"], "worker");
    assert_eq!(worker["LOG_LEVEL"], "debug", "process env overrides app env");

    for l in f.driver.starts() {
        assert_eq!(l.wants_port, l.instance.process.as_str() == "web", "{l:?}");
        assert_eq!(l.workdir, f.workdir);
        assert_eq!(l.app.as_str(), "blog");
        let want = if l.instance.process.as_str() == "worker" { "exec sleep 3600" } else { "sleep infinity" };
        assert_eq!(l.command, want);
    }
}

#[tokio::test(start_paused = true)]
async fn scale_down_drains_then_stops_the_highest_slots() {
    let f = Fixture::new();
    f.traffic.set_drain_delay(secs(2));
    let e = f.start();
    e.up(app("blog").web("web", 3).worker("worker", 3).build()).await.unwrap();
    let before = f.driver.snapshot();

    let report = e.scale(&[("web", 1), ("worker", 1)]).await.unwrap();
    assert!(report.changed);
    assert!(report.summary.contains("web 3→1"), "{report:?}");

    assert_eq!(slots(&alive(&f, "web")), [1]);
    assert_eq!(slots(&alive(&f, "worker")), [1]);
    let mut stopped = f.driver.stops();
    stopped.sort();
    assert_eq!(slots(&stopped), [2, 2, 3, 3]);
    assert_eq!(f.driver.snapshot().starts, before.starts, "scale down starts nothing");

    for id in stopped {
        if id.process.as_str() == "web" {
            let drained = pos(&f, &Entry::Drain(id.clone()));
            let stop = pos(&f, &Entry::Stop(id.clone()));
            assert!(drained < stop, "{id} stopped before it was drained");
            let waited = f.journal.time_of(&Entry::Stop(id.clone())).unwrap()
                - f.journal.time_of(&Entry::Drain(id.clone())).unwrap();
            assert_eq!(waited, secs(2), "{id}: the stop waits for the drain to finish");
        } else {
            assert!(f.journal.position(&Entry::Drain(id.clone())).is_none(), "workers have nothing to drain");
        }
    }
    let st = e.status().await.unwrap();
    assert_eq!(ready_of(&st, "web"), (1, 1));
    assert_eq!(st.instances.len(), 2, "{st:#?}");
    assert!(f.traffic.backends().keys().all(|i| i.slot == 1));
}

#[tokio::test(start_paused = true)]
async fn scale_up_fills_the_new_slots() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 1).worker("worker", 1).build()).await.unwrap();
    let web1 = alive(&f, "web");

    e.scale(&[("web", 3)]).await.unwrap();
    assert_eq!(slots(&alive(&f, "web")), [1, 2, 3]);
    assert!(alive(&f, "web").contains(&web1[0]), "the running instance is kept");
    assert!(f.driver.stops().is_empty());
    assert_eq!(f.traffic.healthy_count(&pn("web")), 3);

    let again = e.scale(&[("web", 3)]).await.unwrap();
    assert!(!again.changed, "{again:?}");
}

#[tokio::test(start_paused = true)]
async fn scale_refuses_unknown_processes_and_doubled_singletons() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 1).singleton("beat").build()).await.unwrap();
    let calls = f.driver.calls().len();

    match e.scale(&[("beat", 2)]).await {
        Err(EngineError::SingletonCount { process, requested: 2 }) => assert_eq!(process, "beat"),
        other => panic!("expected SingletonCount, got {other:?}"),
    }
    match e.scale(&[("wrker", 2)]).await {
        Err(EngineError::UnknownProcess { name, known }) => {
            assert_eq!(name, "wrker");
            assert!(known.contains("web") && known.contains("beat"), "{known}");
        }
        other => panic!("expected UnknownProcess, got {other:?}"),
    }
    settle().await;
    assert_eq!(f.driver.calls().len(), calls, "refused commands change nothing");
    assert_eq!(alive(&f, "beat").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn down_drains_and_stops_everything_and_closes_the_proxy() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).worker("worker", 1).singleton("beat").build()).await.unwrap();
    let webs = alive(&f, "web");

    e.down().await.unwrap();
    assert!(f.driver.snapshot().alive.is_empty(), "{:?}", f.driver.snapshot());
    assert_eq!(f.driver.stops().len(), 4);
    for id in &webs {
        assert!(pos(&f, &Entry::Drain(id.clone())) < pos(&f, &Entry::Stop(id.clone())));
    }
    assert!(f.traffic.backends().is_empty());
    assert_eq!(f.ingress.listening(), None);
    assert_eq!(f.ingress.closes(), 1);
    assert!(matches!(e.status().await, Err(EngineError::NotUp)));
    let apps = f.store.apps().unwrap();
    assert_eq!(apps.len(), 1);
    assert!(!apps[0].running, "a restarted daemon must not bring it back");
    assert!(f.store.instances(&apps[0].app, &apps[0].environment).unwrap().is_empty());

    // Nothing comes back by itself afterwards.
    tokio::time::sleep(secs(120)).await;
    assert!(f.driver.snapshot().alive.is_empty());
    // A second `down` has nothing left to do.
    e.down().await.unwrap();
    assert_eq!(f.driver.stops().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_second_operation_while_one_runs_is_busy() {
    let f = Fixture::new();
    f.traffic.set_auto_health(&pn("web"), AutoHealth::Never);
    let e = f.start();
    let up = e.spawn_up(app("blog").web("web", 1).build());
    f.driver.wait_alive(&pn("web"), 1).await;
    let web = alive(&f, "web").remove(0);
    f.traffic.wait_added(&web).await;
    let calls = f.driver.calls().len();

    for r in [e.scale(&[("web", 3)]).await, e.restart(None).await, e.down().await] {
        match r {
            Err(EngineError::Busy { operation, .. }) => assert_eq!(operation, "up"),
            other => panic!("expected Busy, got {other:?}"),
        }
    }
    match e.up(app("blog").web("web", 5).build()).await {
        Err(e @ EngineError::Busy { .. }) => assert_eq!(e.exit_code(), 3),
        other => panic!("expected Busy, got {other:?}"),
    }
    settle().await;
    assert_eq!(f.driver.calls().len(), calls, "a refused command changes nothing");
    assert_eq!(f.store.apps().unwrap()[0].spec.processes[0].count, 1);

    f.traffic.set_health(&web, BackendHealth::Healthy, "GET /health -> 200");
    within("up", up).await.unwrap().unwrap();
    // And once it is done, the next one runs.
    f.traffic.set_auto_health(&pn("web"), AutoHealth::After(secs(1)));
    e.scale(&[("web", 2)]).await.unwrap();
    assert_eq!(alive(&f, "web").len(), 2);
}
