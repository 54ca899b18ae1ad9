//! Maintenance mode in the proxy: real listener, real upstreams, real
//! sockets.

mod common;

use common::*;
use nonstop_core::maintenance::{build_maintenance, Maintenance};
use nonstop_core::process::StaticMount;
use nonstop_core::traffic::{BackendHealth, InitialHealth, RouteKey, Traffic};
use nonstop_proxy::{StaticIndex, StaticRelease};
use std::path::PathBuf;
use std::sync::Arc;

fn on(allow: &[&str]) -> Maintenance {
    build_maintenance(Some("<h1>Back soon</h1>".into()), allow, Some(120)).unwrap()
}

async fn raw_get(addr: std::net::SocketAddr, method: &str, path: &str, extra: &str) -> RawReply {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n");
    let (reply, _, _) = raw_request(addr, head.as_bytes()).await;
    reply.expect("a response")
}

#[tokio::test]
async fn every_request_static_files_included_gets_the_page_and_health_checks_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let release = tmp.path().join("v1");
    std::fs::create_dir_all(release.join("staticfiles")).unwrap();
    std::fs::write(release.join("staticfiles/app.css"), "body{}").unwrap();
    let mounts = vec![StaticMount { url: "/static/".into(), dir: PathBuf::from("staticfiles") }];
    let index = StaticIndex::load_or_build(&release, &mounts).unwrap();

    let up = Upstream::start("one").await;
    let p = Running::serving(&[up.addr]).await;
    p.proxy.set_static_releases(&route(), vec![Arc::new(StaticRelease::load(1, &release, &index))]);
    assert_eq!(raw_get(p.addr, "GET", "/static/app.css", "").await.status, 200);
    let mut keep_alive = Client::new(p.addr);
    assert_eq!(keep_alive.get("/").await.text(), "one");

    p.proxy.set_maintenance(&route(), Some(&on(&[])));
    assert_eq!(p.proxy.maintenance_routes(), vec![route()]);
    let hits = up.hits();
    for (method, path) in [("GET", "/"), ("GET", "/static/app.css"), ("POST", "/login"), ("GET", "/static/missing.js")]
    {
        let r = raw_get(p.addr, method, path, "").await;
        assert_eq!(r.status, 503, "{method} {path}: {}", r.head);
        assert_eq!(r.header("retry-after").as_deref(), Some("120"));
        assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
        assert_eq!(r.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
        assert!(r.header("x-request-id").is_some(), "{}", r.head);
        assert_eq!(r.body, b"<h1>Back soon</h1>");
    }
    let (reply, _, _) = raw_request(p.addr, b"HEAD / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(reply.expect("a response").status, 503);
    // A connection opened before the switch gets it on its next request.
    let r = keep_alive.get("/").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "<h1>Back soon</h1>"));
    assert_eq!(up.hits(), hits, "a request reached the instance during maintenance");

    // Health checks go on: a new instance becomes healthy behind the page.
    let mut events = p.proxy.subscribe();
    let second = Upstream::start("two").await;
    let id = p.add(2, second.addr, check(20, 2, 2), InitialHealth::Pending);
    wait_health(&mut events, &id, BackendHealth::Healthy).await;

    p.proxy.set_maintenance(&route(), None);
    assert!(p.proxy.maintenance_routes().is_empty());
    assert_eq!(keep_alive.get("/").await.status.as_u16(), 200);
    assert_eq!(raw_get(p.addr, "GET", "/static/app.css", "").await.status, 200);
    p.stop().await;
}

#[tokio::test]
async fn allowed_addresses_get_through_and_a_trusted_proxy_names_the_client() {
    let up = Upstream::start("one").await;
    let mut cfg = config();
    cfg.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let p = Running::start(cfg.clone()).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);

    p.proxy.set_maintenance(&route(), Some(&on(&["127.0.0.1"])));
    assert_eq!(raw_get(p.addr, "GET", "/", "").await.status, 200, "the peer is allowed");
    // Behind a trusted load balancer, the client it names is the one that
    // counts (the last address of its X-Forwarded-For).
    p.proxy.set_maintenance(&route(), Some(&on(&["203.0.113.0/24"])));
    assert_eq!(raw_get(p.addr, "GET", "/", "").await.status, 503);
    let from = |chain: &str| format!("X-Forwarded-For: {chain}\r\n");
    assert_eq!(raw_get(p.addr, "GET", "/", &from("198.51.100.1, 203.0.113.7")).await.status, 200);
    assert_eq!(raw_get(p.addr, "GET", "/", &from("203.0.113.7, 198.51.100.1")).await.status, 503);
    assert_eq!(raw_get(p.addr, "GET", "/", &from("not-an-address")).await.status, 503);
    // From a peer that is not trusted, X-Forwarded-For is a claim, not an address.
    cfg.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    p.proxy.set_config(cfg).unwrap();
    assert_eq!(raw_get(p.addr, "GET", "/", &from("203.0.113.7")).await.status, 503);
    p.stop().await;
}

#[tokio::test]
async fn maintenance_is_per_route() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let p = Running::start(config()).await;
    let (ra, rb) = (RouteKey("a/default".into()), RouteKey("b/default".into()));
    p.proxy.set_hosts(&ra, &["a.test".into()], false).unwrap();
    p.proxy.set_hosts(&rb, &["b.test".into()], false).unwrap();
    p.proxy.add(
        &ra,
        nonstop_core::traffic::Backend { instance: instance(1), addr: a.addr },
        lazy_check(),
        InitialHealth::AssumeHealthy,
    );
    p.proxy.add(
        &rb,
        nonstop_core::traffic::Backend { instance: instance(2), addr: b.addr },
        lazy_check(),
        InitialHealth::AssumeHealthy,
    );
    p.proxy.set_maintenance(&ra, Some(&on(&[])));
    let ask = |host: &'static str| {
        let addr = p.addr;
        async move {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            raw_request(addr, head.as_bytes()).await.0.expect("a response")
        }
    };
    assert_eq!(ask("a.test").await.status, 503);
    let r = ask("b.test").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"b"[..]));
    p.proxy.set_maintenance(&ra, None);
    assert_eq!(ask("a.test").await.body, b"a");
    p.stop().await;
}
