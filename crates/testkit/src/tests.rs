//! The fakes are test infrastructure: a wrong fake makes a wrong test pass.

use crate::*;
use nonstop_core::driver::{Driver, ExitStatus, LaunchSpec, Liveness, StopOutcome};
use nonstop_core::traffic::{Backend, BackendHealth, DrainOutcome, InitialHealth, RouteKey, Traffic};
use nonstop_core::{AppName, EnvironmentId, InstanceId, ReleaseId, Signal};
use std::time::Duration;
use tokio::time::Instant;

fn id(process: &str, slot: u32, generation: u64) -> InstanceId {
    InstanceId::new(pn(process), slot, generation)
}

fn launch(i: &InstanceId) -> LaunchSpec {
    LaunchSpec {
        app: AppName::new("blog").unwrap(),
        environment: EnvironmentId::default_env(),
        release: ReleaseId(0),
        instance: i.clone(),
        command: "sleep infinity".into(),
        workdir: "/".into(),
        env: Vec::new(),
        wants_port: i.process.as_str() == "web",
    }
}

#[tokio::test(start_paused = true)]
async fn counted_start_failures_run_out() {
    let d = FakeDriver::default();
    d.fail_next_starts(&pn("web"), 2, "no");
    assert!(d.start(launch(&id("web", 1, 1))).await.is_err());
    assert!(d.start(launch(&id("web", 1, 2))).await.is_err());
    let a = d.start(launch(&id("web", 1, 3))).await.unwrap();
    let b = d.start(launch(&id("web", 2, 4))).await.unwrap();
    let w = d.start(launch(&id("worker", 1, 1))).await.unwrap();
    assert_ne!(a.addr, b.addr);
    assert!(a.addr.is_some() && w.addr.is_none());
    assert_eq!(d.alive(), [id("web", 1, 3), id("web", 2, 4), id("worker", 1, 1)]);
    assert_eq!(d.starts().len(), 5);
    assert!(d.liveness(&a).is_alive());
}

#[tokio::test(start_paused = true)]
async fn stops_behave_as_configured() {
    let d = FakeDriver::default();
    let h = d.start(launch(&id("web", 1, 1))).await.unwrap();
    let t0 = Instant::now();
    assert_eq!(d.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap(), StopOutcome::Graceful);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(d.wait_exit(&h).await, ExitStatus::Signal(15));
    assert_eq!(d.liveness(&h), Liveness::Gone);
    assert_eq!(d.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap(), StopOutcome::AlreadyGone);

    d.set_stop_behavior(&pn("web"), StopBehavior::After(Duration::from_secs(2)));
    let h = d.start(launch(&id("web", 1, 2))).await.unwrap();
    let t0 = Instant::now();
    assert_eq!(d.stop(&h, Signal::Int, Duration::from_secs(10)).await.unwrap(), StopOutcome::Graceful);
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(d.exit_status(&h.instance), Some(ExitStatus::Signal(2)));

    d.set_stop_behavior(&pn("web"), StopBehavior::Hang);
    let h = d.start(launch(&id("web", 1, 3))).await.unwrap();
    let t0 = Instant::now();
    assert_eq!(d.stop(&h, Signal::Term, Duration::from_secs(5)).await.unwrap(), StopOutcome::Killed);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(d.wait_exit(&h).await, ExitStatus::Signal(9));

    // A hanging stop ends when the test makes the instance exit.
    let h = d.start(launch(&id("web", 1, 4))).await.unwrap();
    let d2 = d.clone();
    let i = h.instance.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        d2.exit(&i, ExitStatus::Code(0));
    });
    let t0 = Instant::now();
    assert_eq!(d.stop(&h, Signal::Term, Duration::from_secs(5)).await.unwrap(), StopOutcome::Graceful);
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(d.exit_status(&h.instance), Some(ExitStatus::Code(0)));
}

#[tokio::test(start_paused = true)]
async fn lifetimes_and_peaks() {
    let d = FakeDriver::default();
    d.set_lifetime(&pn("worker"), Lifetime::ExitAfter(Duration::from_millis(50), ExitStatus::Code(3)));
    let w = d.start(launch(&id("worker", 1, 1))).await.unwrap();
    assert_eq!(d.wait_exit(&w).await, ExitStatus::Code(3));
    let t = d.journal().time_of(&Entry::Exit(w.instance.clone(), ExitStatus::Code(3))).unwrap();
    assert_eq!(t - d.journal().time_of(&Entry::Start(w.instance.clone())).unwrap(), Duration::from_millis(50));

    let a = d.start(launch(&id("web", 1, 1))).await.unwrap();
    d.start(launch(&id("web", 2, 2))).await.unwrap();
    d.exit(&a.instance, ExitStatus::Code(1));
    d.start(launch(&id("web", 1, 3))).await.unwrap();
    assert_eq!(d.peak_alive(&pn("web")), 2);
    d.reset_peaks();
    d.start(launch(&id("web", 3, 4))).await.unwrap();
    assert_eq!(d.peak_alive(&pn("web")), 3);
    assert_eq!(d.peak_alive(&pn("worker")), 0);
    assert_eq!(d.snapshot().peak_total, 3);
}

#[tokio::test(start_paused = true)]
async fn traffic_health_drains_and_watermarks() {
    let t = FakeTraffic::default();
    t.set_auto_health(&pn("web"), AutoHealth::After(Duration::from_secs(2)));
    t.set_auto_health(&pn("bad"), AutoHealth::Never);
    let mut events = t.subscribe();
    let route = RouteKey("blog/default".into());
    let web = id("web", 1, 1);
    let bad = id("bad", 1, 1);
    let check = crate::spec::health_check();
    for (i, port) in [(&web, 1), (&bad, 2)] {
        let backend = Backend { instance: i.clone(), addr: ([127, 0, 0, 1], port).into() };
        t.add(&route, backend, check.clone(), InitialHealth::Pending);
    }
    let t0 = Instant::now();
    let ev = events.recv().await.unwrap();
    assert_eq!((ev.instance, ev.health), (web.clone(), BackendHealth::Healthy));
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(t.health_of(&bad), Some(BackendHealth::Pending));
    assert!(!t.set_health(&id("web", 9, 9), BackendHealth::Healthy, "x"), "unknown backend");

    t.reset_watermarks();
    t.set_drain_delay(Duration::from_secs(3));
    assert_eq!(t.drain(&web, Duration::from_secs(1)).await, DrainOutcome::TimedOut { in_flight: 1 });
    assert_eq!(t.health_of(&web), None);
    assert_eq!(t.healthy_watermarks(&pn("web")), (0, 1));
    assert_eq!(t.drain(&web, Duration::from_secs(1)).await, DrainOutcome::Unknown);
    let reused = Backend { instance: web.clone(), addr: ([127, 0, 0, 1], 1).into() };
    t.add(&route, reused, check, InitialHealth::AssumeHealthy);
    assert_eq!(t.healthy_count(&pn("web")), 1);
    assert_eq!(t.status(&web).unwrap().health, BackendHealth::Healthy);
}

#[test]
fn logs_and_ingress() {
    use nonstop_engine::{Ingress, InstanceLogs};
    let logs = FakeLogs::new();
    logs.set_lines(&["a", "b", "c"]);
    let i = id("web", 2, 7);
    let tail = logs.tail(&AppName::new("blog").unwrap(), &EnvironmentId::default_env(), &i, 2);
    assert_eq!(tail, ["web.2: b", "web.2: c"]);
    assert_eq!(logs.asked(), [i]);

    let ingress = FakeIngress::new();
    let route = RouteKey("blog/default".into());
    ingress.fail_listen("address in use");
    let proxy = nonstop_core::process::ProxySpec::new(spec::LISTEN.parse().unwrap());
    assert_eq!(
        ingress.listen(&proxy, &route),
        Err(nonstop_engine::IngressError::Listen(spec::LISTEN.to_string(), "address in use".to_string()))
    );
    assert_eq!(ingress.listening(), None);
    ingress.clear_failure();
    ingress.listen(&proxy, &route).unwrap();
    assert!(ingress.listening().is_some());
    ingress.close();
    assert_eq!((ingress.listening(), ingress.closes()), (None, 1));
}

#[test]
fn fake_ingress_records_host_claims_and_refuses_what_the_proxy_refuses() {
    use crate::HostsCall;
    use nonstop_core::ingress::HostsError;
    use nonstop_engine::{Ingress, IngressError};
    let ingress = FakeIngress::new();
    let (prod, staging) = (RouteKey("blog/production".into()), RouteKey("blog/staging".into()));
    let proxy = nonstop_core::process::ProxySpec::new(spec::LISTEN.parse().unwrap());
    ingress.listen(&proxy, &prod).unwrap();
    assert_eq!(ingress.claims().default_route(), Some(&prod), "the listen route takes every host");

    ingress.set_hosts(&prod, &["Blog.test".into()], true).unwrap();
    ingress.set_hosts(&staging, &["staging.blog.test".into()], false).unwrap();
    let before = ingress.claims();
    let taken = ingress.set_hosts(&staging, &["blog.test".into()], false);
    assert_eq!(
        taken,
        Err(IngressError::Hosts(HostsError::Claimed {
            route: staging.clone(),
            host: "blog.test".into(),
            by: prod.clone()
        }))
    );
    let second = ingress.set_hosts(&staging, &["staging.blog.test".into()], true);
    assert_eq!(
        second,
        Err(IngressError::Hosts(HostsError::SecondDefault { route: staging.clone(), by: prod.clone() }))
    );
    assert_eq!(ingress.claims(), before, "a refusal changes nothing");
    assert_eq!(ingress.claims().get(&prod).unwrap().hosts, ["blog.test"]);

    ingress.remove_route(&prod);
    assert_eq!(ingress.claims().default_route(), None);
    ingress.set_hosts(&staging, &["blog.test".into()], true).unwrap();
    let calls = ingress.host_calls();
    assert_eq!(calls.len(), 6);
    assert_eq!(
        calls[2],
        HostsCall::Set { route: staging.clone(), hosts: vec!["blog.test".into()], default: false, result: taken }
    );
    assert_eq!(calls[4], HostsCall::Remove { route: prod });
}
