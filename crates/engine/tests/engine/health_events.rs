//! Health as `status` and the events tell it: a web instance counts as
//! ready only while the proxy sends it requests, and a recovery is recorded
//! like the failure before it.

use crate::*;
use nonstop_core::traffic::BackendHealth;
use nonstop_core::EnvironmentId;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, Fixture};

fn event_kinds(f: &Fixture, id: &nonstop_core::InstanceId) -> Vec<String> {
    f.store
        .events(&"blog".parse().unwrap(), &EnvironmentId::default_env(), 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.instance.as_deref() == Some(&id.to_string()))
        .map(|e| e.kind.to_string())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn web_ready_counts_only_instances_in_rotation_and_recoveries_are_events() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).build()).await.unwrap();
    assert_eq!(ready_of(&e.status().await.unwrap(), "web"), (2, 2));
    let web = alive(&f, "web").remove(0);

    assert!(f.traffic.set_health(&web, BackendHealth::Unhealthy, "GET /health -> 500"));
    settle().await;
    let st = e.status().await.unwrap();
    assert_eq!(ready_of(&st, "web"), (1, 2), "an unhealthy instance is not ready: {st:#?}");

    assert!(f.traffic.set_health(&web, BackendHealth::Healthy, "GET /health -> 200"));
    settle().await;
    assert_eq!(ready_of(&e.status().await.unwrap(), "web"), (2, 2));
    let kinds = event_kinds(&f, &web);
    let unhealthy = kinds.iter().position(|k| k == "unhealthy");
    let recovered = kinds.iter().position(|k| k == "recovered");
    assert!(unhealthy.is_some() && unhealthy < recovered, "{kinds:?}");

    // Draining (its main process exited, or a stop began): out of rotation,
    // not ready, even before its exit is seen.
    assert!(f.traffic.set_health(&web, BackendHealth::Draining, "draining"));
    settle().await;
    assert_eq!(ready_of(&e.status().await.unwrap(), "web"), (1, 2));
    e.shutdown().await;
}
