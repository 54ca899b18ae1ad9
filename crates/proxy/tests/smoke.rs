//! Smoke checks (issue 12): a new backend answers its health check, then
//! its smoke pages, before any client request reaches it. One that fails
//! a smoke page never enters rotation and says why (path, status, the
//! start of the body), with `HealthCause::Smoke` so the engine fails the
//! rollout at once.

mod common;

use common::*;
use nonstop_core::process::{HealthCheck, SmokeCheck, StatusRange};
use nonstop_core::traffic::{BackendHealth, HealthCause, InitialHealth, Traffic};
use std::sync::Arc;

fn smoke(paths: &[&str]) -> HealthCheck {
    HealthCheck {
        smoke: paths
            .iter()
            .map(|p| SmokeCheck { path: p.to_string(), expect_status: StatusRange { min: 200, max: 399 } })
            .collect(),
        ..check(50, 2, 3)
    }
}

/// `/health` answers 200 (the default upstream); `/` answers 500 with a
/// Django-like error page; `/fine` answers 200.
async fn broken_pages() -> Upstream {
    Upstream::with_handler(
        "broken",
        Arc::new(|req, _state| {
            Box::pin(async move {
                match req.uri().path() {
                    "/fine" => text(200, "fine"),
                    _ => text(
                        500,
                        "<html>\n<title>ValueError: Missing staticfiles manifest entry for 'app.css'</title>\n<body>…",
                    ),
                }
            })
        }),
    )
    .await
}

#[tokio::test]
async fn a_backend_failing_a_smoke_page_never_takes_a_request() {
    let good = Upstream::start("good").await;
    let bad = broken_pages().await;
    let running = Running::start(config()).await;
    running.proxy.set_default_route(route());
    let mut events = running.proxy.subscribe();
    running.add(1, good.addr, lazy_check(), InitialHealth::AssumeHealthy);
    let id = running.add(2, bad.addr, smoke(&["/fine", "/"]), InitialHealth::Pending);

    let event = wait_health(&mut events, &id, BackendHealth::Unhealthy).await;
    assert_eq!(event.cause, HealthCause::Smoke);
    assert!(event.detail.contains("GET / -> 500 (expected 200-399)"), "{}", event.detail);
    assert!(event.detail.contains("Missing staticfiles manifest entry"), "{}", event.detail);

    // Clients only ever reach the good backend; the bad one saw the smoke
    // pages and nothing else.
    let hits_after_smoke = bad.hits();
    assert_eq!(hits_after_smoke, 2, "the two smoke pages");
    for _ in 0..50 {
        let reply = get(running.addr, "/").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "good");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(bad.hits(), hits_after_smoke, "no client request and no second smoke run");
    assert_eq!(running.proxy.status(&id).unwrap().health, BackendHealth::Unhealthy);
    running.stop().await;
}

#[tokio::test]
async fn a_backend_passing_its_smoke_pages_enters_rotation() {
    let up = Upstream::start("up").await;
    let running = Running::start(config()).await;
    running.proxy.set_default_route(route());
    let mut events = running.proxy.subscribe();
    let id = running.add(1, up.addr, smoke(&["/", "/about/?q=1"]), InitialHealth::Pending);
    let event = wait_health(&mut events, &id, BackendHealth::Healthy).await;
    assert_eq!(event.cause, HealthCause::Check);
    let log = up.state.log.lock().unwrap().clone();
    let pages: Vec<&String> = log.iter().filter(|l| *l != "health").collect();
    assert_eq!(pages, ["/", "/about/"], "each smoke page once, before rotation");
    assert_eq!(get(running.addr, "/x").await.status, 200);
    running.stop().await;
}

#[tokio::test]
async fn a_readopted_backend_is_not_smoke_checked_again() {
    let bad = broken_pages().await;
    let running = Running::start(config()).await;
    running.proxy.set_default_route(route());
    let id = running.add(1, bad.addr, smoke(&["/"]), InitialHealth::AssumeHealthy);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(running.proxy.status(&id).unwrap().health, BackendHealth::Healthy);
    assert_eq!(bad.hits(), 0);
    running.stop().await;
}
