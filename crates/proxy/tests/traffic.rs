//! The live-traffic gate's data plane (issue 12): a traffic split between a
//! route's backends, every backend's counters (answers, 5xx, latency), and
//! passive outlier ejection. Real sockets, real upstreams on 127.0.0.1.

mod common;

use common::*;
use nonstop_core::traffic::{BackendHealth, HealthCause, InitialHealth, Split, Traffic};
use nonstop_proxy::ProxyConfig;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An upstream that answers 500 to everything but its health check (which
/// passes: it lies).
async fn all_500(name: &str) -> Upstream {
    Upstream::with_handler(name, Arc::new(|_req, _state| Box::pin(async move { text(500, "boom") }))).await
}

#[tokio::test]
async fn a_five_percent_split_gives_the_listed_backend_five_percent() {
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    let running = Running::serving(&[old.addr, new.addr]).await;
    running.proxy.set_split(&route(), Some(&Split { instances: vec![instance(2)], percent: 5 }));
    let mut client = Client::new(running.addr);
    for _ in 0..2_000 {
        assert_eq!(client.get("/").await.status, 200);
    }
    let to_new = new.hits();
    assert!((98..=102).contains(&to_new), "the listed backend got {to_new} of 2000");
    assert_eq!(old.hits() + to_new, 2_000);

    // No split: even shares again.
    running.proxy.set_split(&route(), None);
    let (old_before, new_before) = (old.hits(), new.hits());
    for _ in 0..200 {
        assert_eq!(client.get("/").await.status, 200);
    }
    assert_eq!(old.hits() - old_before, 100);
    assert_eq!(new.hits() - new_before, 100);
    running.stop().await;
}

#[tokio::test]
async fn a_split_never_sends_to_a_backend_out_of_rotation_nor_fails_a_request() {
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    new.set_health(500);
    let running = Running::start(config()).await;
    running.proxy.set_default_route(route());
    running.add(1, old.addr, lazy_check(), InitialHealth::AssumeHealthy);
    // Listed before it is added; it never passes its checks.
    running.proxy.set_split(&route(), Some(&Split { instances: vec![instance(2)], percent: 50 }));
    running.add(2, new.addr, check(20, 1, 1), InitialHealth::Pending);
    wait_until("the new backend was checked", || new.state.checks.load(Ordering::SeqCst) >= 2).await;
    let mut client = Client::new(running.addr);
    for _ in 0..200 {
        let reply = client.get("/").await;
        assert_eq!((reply.status.as_u16(), reply.text()), (200, "old".to_string()));
    }
    assert_eq!(new.hits(), 0);

    // Once it passes, it is in its group: half of the requests.
    let mut events = running.proxy.subscribe();
    new.set_health(200);
    wait_health(&mut events, &instance(2), BackendHealth::Healthy).await;
    for _ in 0..200 {
        assert_eq!(client.get("/").await.status, 200);
    }
    assert_eq!(new.hits(), 100);

    // A split that lists every backend (no other group): all of them serve.
    running.proxy.set_split(&route(), Some(&Split { instances: vec![instance(1), instance(2)], percent: 5 }));
    let (old_before, new_before) = (old.hits(), new.hits());
    for _ in 0..100 {
        assert_eq!(client.get("/").await.status, 200);
    }
    assert_eq!(old.hits() - old_before + new.hits() - new_before, 100);
    assert!(old.hits() > old_before && new.hits() > new_before);
    running.stop().await;
}

#[tokio::test]
async fn figures_count_answers_5xx_and_latency_per_backend() {
    // One answers 500 on /fail, the other takes 200 ms on everything.
    let fails = Arc::new(AtomicUsize::new(0));
    let flaky = {
        let fails = Arc::clone(&fails);
        Upstream::with_handler(
            "flaky",
            Arc::new(move |req, _state| {
                let fails = Arc::clone(&fails);
                Box::pin(async move {
                    if req.uri().path() == "/fail" {
                        fails.fetch_add(1, Ordering::SeqCst);
                        text(500, "fail")
                    } else {
                        text(200, "ok")
                    }
                })
            }),
        )
        .await
    };
    let slow = Upstream::with_handler(
        "slow",
        Arc::new(|_req, _state| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                text(200, "slow")
            })
        }),
    )
    .await;
    let running = Running::serving(&[flaky.addr, slow.addr]).await;
    assert_eq!(running.proxy.figures(&route()).await.iter().map(|f| f.requests).sum::<u64>(), 0);
    let mut client = Client::new(running.addr);
    let mut got_500 = 0;
    for i in 0..40 {
        let path = if i % 4 == 0 { "/fail" } else { "/" };
        if client.get(path).await.status == 500 {
            got_500 += 1;
        }
    }
    let figures = running.proxy.figures(&route()).await;
    assert_eq!(figures.len(), 2);
    let (f, s) = (&figures[0], &figures[1]);
    assert_eq!((&f.instance, &s.instance), (&instance(1), &instance(2)));
    assert_eq!(f.requests as usize, flaky.hits());
    assert_eq!(s.requests as usize, slow.hits());
    assert_eq!(f.requests + s.requests, 40);
    assert_eq!(f.errors_5xx as usize, fails.load(Ordering::SeqCst));
    assert_eq!(f.errors_5xx, got_500);
    assert_eq!(s.errors_5xx, 0);
    assert_eq!(f.latency.total(), f.requests);
    assert_eq!(s.latency.total(), s.requests);
    let p95 = s.latency.quantile_ms(0.95);
    assert!(p95 >= 200.0, "the slow backend's p95 is {p95} ms");

    // Monotonic: a later reading minus an earlier one is what came between.
    let _ = client.get("/fail").await;
    let later = running.proxy.figures(&route()).await;
    let between: u64 = later.iter().zip(&figures).map(|(l, e)| l.since(e).requests).sum();
    assert_eq!(between, 1);
    running.stop().await;
}

#[tokio::test]
async fn the_proxys_own_502_for_a_failed_attempt_counts_against_the_backend() {
    // Closes every connection without answering (health checks pass).
    let closer = Closer::start().await;
    let running = Running::serving(&[closer.addr]).await;
    let mut client = Client::new(running.addr);
    for _ in 0..3 {
        // Not idempotent: not retried once sent.
        let reply = client.send(request("POST", "/", "x")).await.unwrap();
        assert_eq!(reply.status, 502);
    }
    let figures = running.proxy.figures(&route()).await;
    assert_eq!(figures.len(), 1);
    assert_eq!((figures[0].requests, figures[0].errors_5xx), (3, 3));
    running.stop().await;
}

#[tokio::test]
async fn an_all_500_backend_beside_healthy_peers_is_ejected_as_an_outlier() {
    let good = Upstream::start("good").await;
    let bad = all_500("bad").await;
    // Checked every 20 ms, and they pass: an ejection of an hour holds it
    // out whatever they say.
    let config = ProxyConfig { outlier_base_ejection: Duration::from_secs(3_600), ..config() };
    let running = Running::start(config).await;
    running.proxy.set_default_route(route());
    let mut events = running.proxy.subscribe();
    running.add(1, good.addr, lazy_check(), InitialHealth::AssumeHealthy);
    let bad_id = running.add(2, bad.addr, check(20, 1, 3), InitialHealth::AssumeHealthy);
    let mut client = Client::new(running.addr);
    let mut sent = 0;
    let event = loop {
        let _ = client.get("/").await;
        sent += 1;
        assert!(sent <= 200, "no ejection after {sent} requests");
        match events.try_recv() {
            Ok(e) if e.instance == bad_id && e.health == BackendHealth::Unhealthy => break e,
            _ => continue,
        }
    };
    assert_eq!(event.cause, HealthCause::Outlier);
    assert_eq!(event.detail, "answered 5xx to its last 10 requests while its peers answered 2xx/3xx/4xx");
    assert_eq!(running.proxy.status(&bad_id).unwrap().health, BackendHealth::Unhealthy);

    // Its health checks go on passing; it stays out.
    let checks = bad.state.checks.load(Ordering::SeqCst);
    wait_until("five more checks of the ejected backend", || bad.state.checks.load(Ordering::SeqCst) >= checks + 5)
        .await;
    let status = running.proxy.status(&bad_id).unwrap();
    assert_eq!(status.health, BackendHealth::Unhealthy);
    assert!(status.last_checks.last().unwrap().contains("ejected as an outlier"), "{:?}", status.last_checks);
    let hits = bad.hits();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.status, 200);
    }
    assert_eq!(bad.hits(), hits);
    running.stop().await;
}

#[tokio::test]
async fn a_route_where_every_backend_answers_500_ejects_none() {
    let a = all_500("a").await;
    let b = all_500("b").await;
    let c = all_500("c").await;
    let running = Running::serving(&[a.addr, b.addr, c.addr]).await;
    let mut events = running.proxy.subscribe();
    let mut client = Client::new(running.addr);
    for _ in 0..150 {
        assert_eq!(client.get("/").await.status, 500);
    }
    assert!(events.try_recv().is_err(), "no health change");
    for slot in 1..=3 {
        assert_eq!(running.proxy.status(&instance(slot)).unwrap().health, BackendHealth::Healthy);
    }
    let figures = running.proxy.figures(&route()).await;
    assert_eq!(figures.iter().map(|f| f.errors_5xx).collect::<Vec<_>>(), vec![50, 50, 50]);
    running.stop().await;
}

#[tokio::test]
async fn figures_count_status_classes_upstream_errors_and_the_routes_own_answers() {
    // Answers with the status its path names: /s/404 is a 404, and so on.
    let app = Upstream::with_handler(
        "app",
        Arc::new(|req, _state| {
            let status: u16 = req.uri().path().trim_start_matches("/s/").parse().unwrap_or(200);
            Box::pin(async move { text(status, "x") })
        }),
    )
    .await;
    // Closes every connection without answering: the proxy answers 502.
    let closer = Closer::start().await;
    let running = Running::serving(&[app.addr]).await;
    let mut client = Client::new(running.addr);
    let plan = [(200, 5), (204, 2), (301, 3), (404, 4), (101, 0), (500, 1), (503, 2)];
    for (status, times) in plan {
        for _ in 0..times {
            assert_eq!(client.get(&format!("/s/{status}")).await.status, status);
        }
    }
    let f = &running.proxy.figures(&route()).await[0];
    assert_eq!(f.requests, 17);
    assert_eq!((f.responses_2xx(), f.responses_3xx, f.responses_4xx, f.errors_5xx), (7, 3, 4, 3));
    assert_eq!((f.responses_1xx, f.upstream_errors), (0, 0));

    // A backend that fails: its failed attempts are upstream errors (and
    // 5xx), counted on it; no healthy backend left: the route's own 503s.
    running.proxy.remove(&instance(1));
    running.add(2, closer.addr, lazy_check(), InitialHealth::AssumeHealthy);
    // Not idempotent: not retried once sent.
    assert_eq!(client.send(request("POST", "/", "x")).await.unwrap().status, 502);
    let f = &running.proxy.figures(&route()).await[0];
    assert_eq!((f.requests, f.errors_5xx, f.upstream_errors), (1, 1, 1));
    running.proxy.remove(&instance(2));
    for _ in 0..3 {
        assert_eq!(client.get("/").await.status, 503);
    }
    let own = running.proxy.route_figures(&route()).await;
    assert_eq!(own, nonstop_core::traffic::RouteFigures { static_hits: 0, no_backend: 3 });
    running.stop().await;
}
