//! Several routes (environments) behind one listener, chosen by `Host`:
//! real listener, real upstreams, real sockets.

mod common;

use common::*;
use nonstop_core::ingress::HostsError;
use nonstop_core::process::StaticMount;
use nonstop_core::traffic::{Backend, InitialHealth, RouteKey, Traffic};
use nonstop_proxy::{StaticIndex, StaticRelease};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

fn hosts(list: &[&str]) -> Vec<String> {
    list.iter().map(|h| h.to_string()).collect()
}

/// One `GET path` with `Host: host` on its own connection.
async fn ask(addr: SocketAddr, host: &str, path: &str) -> RawReply {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    raw_request(addr, head.as_bytes()).await.0.expect("a response")
}

/// The body of the answer for `host`, with its status.
async fn who(addr: SocketAddr, host: &str) -> (u16, String) {
    let r = ask(addr, host, "/").await;
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

fn add(p: &Running, route: &RouteKey, slot: u32, addr: SocketAddr) {
    p.proxy.add(route, Backend { instance: instance(slot), addr }, lazy_check(), InitialHealth::AssumeHealthy);
}

#[tokio::test]
async fn each_route_answers_its_hosts_and_an_unclaimed_host_gets_a_404() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let p = Running::start(config()).await;
    let (ra, rb) = (RouteKey("blog/production".into()), RouteKey("blog/staging".into()));
    p.proxy.set_hosts(&ra, &hosts(&["a.test"]), false).unwrap();
    p.proxy.set_hosts(&rb, &hosts(&["b.test", "*.b.test"]), false).unwrap();
    add(&p, &ra, 1, a.addr);
    add(&p, &rb, 2, b.addr);

    assert_eq!(who(p.addr, "a.test").await, (200, "a".into()));
    assert_eq!(who(p.addr, "A.Test:8080").await, (200, "a".into()), "case and port ignored");
    assert_eq!(who(p.addr, "b.test").await, (200, "b".into()));
    assert_eq!(who(p.addr, "pr-7.b.test").await, (200, "b".into()), "wildcard");
    let (a_hits, b_hits) = (a.hits(), b.hits());

    // No route claims it and none is the default: the proxy's own page.
    let r = ask(p.addr, "unknown.test", "/").await;
    assert_eq!(r.status, 404, "{}", r.head);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("`unknown.test`") && body.contains("default"), "{body}");
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert!(r.header("x-request-id").is_some());
    // A request without Host (HTTP/1.0) has no route either.
    let (r, _, _) = raw_request(p.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.expect("a response").status, 404);
    assert_eq!((a.hits(), b.hits()), (a_hits, b_hits), "no app saw the unclaimed host");

    // One route becomes the default: unclaimed hosts go there, claimed
    // ones stay where they are.
    p.proxy.set_hosts(&rb, &hosts(&["b.test", "*.b.test"]), true).unwrap();
    assert_eq!(who(p.addr, "unknown.test").await, (200, "b".into()));
    assert_eq!(who(p.addr, "a.test").await, (200, "a".into()));
    p.stop().await;
}

#[tokio::test]
async fn a_conflicting_claim_is_refused_and_changes_nothing() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let p = Running::start(config()).await;
    let (ra, rb) = (RouteKey("blog/production".into()), RouteKey("shop/production".into()));
    p.proxy.set_hosts(&ra, &hosts(&["a.test"]), false).unwrap();
    p.proxy.set_hosts(&rb, &hosts(&["b.test"]), true).unwrap();
    add(&p, &ra, 1, a.addr);
    add(&p, &rb, 2, b.addr);
    let claims = p.proxy.host_claims();

    // b.test is shop's: refused, naming shop; a keeps a.test alone.
    let err = p.proxy.set_hosts(&ra, &hosts(&["a.test", "B.test"]), false).unwrap_err();
    assert_eq!(err, HostsError::Claimed { route: ra.clone(), host: "b.test".into(), by: rb.clone() });
    assert!(err.to_string().contains("shop/production"), "{err}");
    // A second default: refused, naming the first.
    let err = p.proxy.set_hosts(&ra, &hosts(&["a.test", "c.test"]), true).unwrap_err();
    assert_eq!(err, HostsError::SecondDefault { route: ra.clone(), by: rb.clone() });
    // Not a host: refused.
    assert!(matches!(p.proxy.set_hosts(&ra, &hosts(&["a.test", "*"]), false), Err(HostsError::Invalid { .. })));
    assert_eq!(p.proxy.host_claims(), claims, "nothing changed");
    assert_eq!(who(p.addr, "a.test").await, (200, "a".into()));
    assert_eq!(who(p.addr, "b.test").await, (200, "b".into()));
    assert_eq!(who(p.addr, "c.test").await, (200, "b".into()), "still shop's default");

    // Once shop's route is removed, its host and its default are free.
    p.proxy.remove_route(&rb);
    assert_eq!(ask(p.addr, "b.test", "/").await.status, 404);
    assert_eq!(ask(p.addr, "c.test", "/").await.status, 404);
    p.proxy.set_hosts(&ra, &hosts(&["a.test", "b.test"]), true).unwrap();
    assert_eq!(who(p.addr, "b.test").await, (200, "a".into()));
    assert_eq!(who(p.addr, "c.test").await, (200, "a".into()));
    p.stop().await;
}

#[tokio::test]
async fn the_listen_route_answers_every_host_until_it_has_hosts_of_its_own() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let p = Running::start(config()).await;
    let (ra, rb) = (RouteKey("blog/default".into()), RouteKey("blog/staging".into()));
    // What `Ingress::listen` does today: one route for every host.
    p.proxy.set_default_route(ra.clone());
    add(&p, &ra, 1, a.addr);
    assert_eq!(who(p.addr, "anything.test").await, (200, "a".into()));

    // Another environment claims its host; the rest still goes to a.
    p.proxy.set_hosts(&rb, &hosts(&["staging.test"]), false).unwrap();
    add(&p, &rb, 2, b.addr);
    assert_eq!(who(p.addr, "staging.test").await, (200, "b".into()));
    assert_eq!(who(p.addr, "anything.test").await, (200, "a".into()));

    // Once a has hosts of its own (and is not the default), no route
    // answers the rest.
    p.proxy.set_hosts(&ra, &hosts(&["blog.test"]), false).unwrap();
    assert_eq!(who(p.addr, "blog.test").await, (200, "a".into()));
    assert_eq!(ask(p.addr, "anything.test", "/").await.status, 404);
    p.stop().await;
}

#[tokio::test]
async fn a_route_with_hosts_and_no_instance_is_503_not_404() {
    let p = Running::start(config()).await;
    p.proxy.set_hosts(&RouteKey("blog/staging".into()), &hosts(&["staging.test"]), false).unwrap();
    assert_eq!(ask(p.addr, "staging.test", "/").await.status, 503);
    assert_eq!(ask(p.addr, "other.test", "/").await.status, 404);
    p.stop().await;
}

#[tokio::test]
async fn an_unclaimed_host_gets_no_static_files() {
    let tmp = tempfile::tempdir().unwrap();
    let release = tmp.path().join("v1");
    std::fs::create_dir_all(release.join("staticfiles")).unwrap();
    std::fs::write(release.join("staticfiles/app.css"), "body{}").unwrap();
    let mounts = vec![StaticMount { url: "/static/".into(), dir: PathBuf::from("staticfiles") }];
    let index = StaticIndex::load_or_build(&release, &mounts).unwrap();

    let p = Running::start(config()).await;
    let production = RouteKey("blog/production".into());
    p.proxy.set_hosts(&production, &hosts(&["blog.test"]), false).unwrap();
    p.proxy.set_static_releases(&production, vec![Arc::new(StaticRelease::load(1, &release, &index))]);
    assert_eq!(ask(p.addr, "blog.test", "/static/app.css").await.status, 200);
    let r = ask(p.addr, "other.test", "/static/app.css").await;
    assert_eq!(r.status, 404);
    assert!(String::from_utf8_lossy(&r.body).contains("`other.test`"));
    p.stop().await;
}

/// A release directory with `staticfiles/` holding `files`, indexed.
fn static_release(root: &std::path::Path, name: &str, files: &[(&str, &str)]) -> Arc<StaticRelease> {
    let release = root.join(name);
    for (path, body) in files {
        let path = release.join("staticfiles").join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    let mounts = vec![StaticMount { url: "/static/".into(), dir: PathBuf::from("staticfiles") }];
    let index = StaticIndex::load_or_build(&release, &mounts).unwrap();
    Arc::new(StaticRelease::load(1, &release, &index))
}

#[tokio::test]
async fn each_environment_serves_its_own_static_files() {
    let tmp = tempfile::tempdir().unwrap();
    let production = RouteKey("blog/production".into());
    let staging = RouteKey("blog/staging".into());
    let p = Running::start(config()).await;
    p.proxy.set_hosts(&production, &hosts(&["blog.test"]), true).unwrap();
    p.proxy.set_hosts(&staging, &hosts(&["staging.blog.test"]), false).unwrap();
    let v1 = static_release(tmp.path(), "v1", &[("app.css", "body{color:black}"), ("old.js", "old()")]);
    let v2 = static_release(tmp.path(), "v2", &[("app.css", "body{color:red}"), ("new.js", "new()")]);
    p.proxy.set_static_releases(&production, vec![v1]);
    p.proxy.set_static_releases(&staging, vec![v2]);

    let css = ask(p.addr, "blog.test", "/static/app.css").await;
    assert_eq!((css.status, css.body.as_slice()), (200, b"body{color:black}".as_slice()));
    let css = ask(p.addr, "staging.blog.test", "/static/app.css").await;
    assert_eq!((css.status, css.body.as_slice()), (200, b"body{color:red}".as_slice()));
    // A file only the other environment has is not found here.
    assert_eq!(ask(p.addr, "blog.test", "/static/new.js").await.status, 404);
    assert_eq!(ask(p.addr, "staging.blog.test", "/static/old.js").await.status, 404);
    // The default route's files answer the hosts nobody claims.
    assert_eq!(ask(p.addr, "other.test", "/static/old.js").await.status, 200);

    // Each route counts the static requests it answered.
    assert_eq!(p.proxy.route_figures(&production).await.static_hits, 3);
    assert_eq!(p.proxy.route_figures(&staging).await.static_hits, 2);

    // Withdrawing staging's files leaves production's alone; staging's
    // static URLs then go to its app (no instance: 503).
    p.proxy.set_static_releases(&staging, vec![]);
    assert_eq!(ask(p.addr, "blog.test", "/static/app.css").await.status, 200);
    assert_eq!(ask(p.addr, "staging.blog.test", "/static/app.css").await.status, 503);
    p.stop().await;
}
