//! The data plane and the daemon's client in one process, over a real
//! `plane.sock` and real backends on 127.0.0.1: calls added for the
//! live-traffic gate (issue 12) and for environments' hosts (issue 13)
//! round-trip through `DataPlane` and `PlaneClient`.

use super::client::PlaneClient;
use super::server::{read_line, DataPlane};
use super::wire::{self, Answer, PlaneError, Reply};
use crate::home::Home;
use nonstop_core::ingress::{HostsError, Ingress, IngressError};
use nonstop_core::process::{HealthCheck, StatusRange};
use nonstop_core::traffic::{Backend, InitialHealth, RouteKey, Split, Traffic};
use nonstop_core::{InstanceId, ProcessName};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// An instance that answers every request `200 <name>` on keep-alive
/// connections (500 on `/fail`) and counts the requests that are not
/// health checks.
async fn instance(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                        let status = if path == "/fail" { "500 Internal Server Error" } else { "200 OK" };
                        if path != "/health" {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{name}", name.len());
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, hits)
}

fn id(slot: u32) -> InstanceId {
    InstanceId::new(ProcessName::new("web").unwrap(), slot, 1)
}

fn check() -> HealthCheck {
    HealthCheck {
        path: "/health".into(),
        interval: Duration::from_secs(3_600),
        timeout: Duration::from_secs(2),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        expect_status: StatusRange { min: 200, max: 399 },
        host: None,
        smoke: Vec::new(),
    }
}

/// One request to the proxy at `addr` on its own connection: the status.
async fn get(addr: SocketAddr, path: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The client's calls block (as the engine makes them): off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_figures_round_trip_through_the_data_plane() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home { dir: dir.path().to_path_buf() };
    let plane = DataPlane::new(&home, HashMap::new());
    let sock = dir.path().join("plane.sock");
    plane.serve(tokio::net::UnixListener::bind(&sock).unwrap());
    let shutdown = CancellationToken::new();
    let client = PlaneClient::connect(&sock, 1, shutdown.clone()).await.unwrap();
    // Nothing to resync: calls go through from now on.
    let c = Arc::clone(&client);
    blocking(move || c.finish_resync()).await;

    // The data plane's proxy serves a port of ours for the route.
    let route = RouteKey("blog/default".into());
    let proxy = plane.proxy_for_tests();
    proxy.set_default_route(route.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    let serving = CancellationToken::new();
    let (p, s) = (proxy.clone(), serving.clone());
    let served = tokio::spawn(async move { p.serve(listener, s).await });

    let (old_addr, old_hits) = instance("old").await;
    let (new_addr, new_hits) = instance("new").await;
    let (c, r) = (Arc::clone(&client), route.clone());
    blocking(move || {
        c.add(&r, Backend { instance: id(1), addr: old_addr }, check(), InitialHealth::AssumeHealthy);
        c.add(&r, Backend { instance: id(2), addr: new_addr }, check(), InitialHealth::AssumeHealthy);
        c.set_split(&r, Some(&Split { instances: vec![id(2)], percent: 25 }));
    })
    .await;
    for _ in 0..100 {
        assert_eq!(get(front, "/").await, 200);
    }
    assert_eq!(new_hits.load(Ordering::SeqCst), 25, "the split reached the data plane");
    assert_eq!(old_hits.load(Ordering::SeqCst), 75);

    // The split ends: even shares.
    let (c, r) = (Arc::clone(&client), route.clone());
    blocking(move || c.set_split(&r, None)).await;
    for _ in 0..100 {
        assert_eq!(get(front, "/fail").await, 500);
    }
    assert_eq!(new_hits.load(Ordering::SeqCst), 75);

    let (c, r) = (Arc::clone(&client), route.clone());
    let figures = blocking(move || tokio::runtime::Handle::current().block_on(c.figures(&r))).await;
    assert_eq!(figures.iter().map(|f| f.instance.clone()).collect::<Vec<_>>(), vec![id(1), id(2)]);
    assert_eq!((figures[0].requests, figures[0].errors_5xx), (125, 50));
    assert_eq!((figures[1].requests, figures[1].errors_5xx), (75, 50));
    assert!(figures.iter().all(|f| f.latency.total() == f.requests));
    // Another route's figures: none.
    let c = Arc::clone(&client);
    let other = blocking(move || tokio::runtime::Handle::current().block_on(c.figures(&RouteKey("x".into())))).await;
    assert!(other.is_empty());

    serving.cancel();
    let _ = served.await;
    shutdown.cancel();
    plane.stop().await;
}

/// One `GET /` with `Host: host` on its own connection: status and body.
async fn ask(addr: SocketAddr, host: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn hosts(list: &[&str]) -> Vec<String> {
    list.iter().map(|h| h.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_and_route_removal_round_trip_through_the_data_plane() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home { dir: dir.path().to_path_buf() };
    let plane = DataPlane::new(&home, HashMap::new());
    let sock = dir.path().join("plane.sock");
    plane.serve(tokio::net::UnixListener::bind(&sock).unwrap());
    let shutdown = CancellationToken::new();
    let client = PlaneClient::connect(&sock, 1, shutdown.clone()).await.unwrap();
    let c = Arc::clone(&client);
    blocking(move || c.finish_resync()).await;

    let proxy = plane.proxy_for_tests();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    let serving = CancellationToken::new();
    let (p, s) = (proxy.clone(), serving.clone());
    let served = tokio::spawn(async move { p.serve(listener, s).await });

    let (prod, staging) = (RouteKey("blog/production".into()), RouteKey("blog/staging".into()));
    let (prod_addr, _) = instance("production").await;
    let (staging_addr, staging_hits) = instance("staging").await;
    let (c, p2, s2) = (Arc::clone(&client), prod.clone(), staging.clone());
    blocking(move || {
        c.add(&p2, Backend { instance: id(1), addr: prod_addr }, check(), InitialHealth::AssumeHealthy);
        c.add(&s2, Backend { instance: id(2), addr: staging_addr }, check(), InitialHealth::AssumeHealthy);
        c.set_hosts(&p2, &hosts(&["blog.test"]), false).unwrap();
        c.set_hosts(&s2, &hosts(&["staging.blog.test", "*.review.blog.test"]), false).unwrap();
    })
    .await;
    assert_eq!(ask(front, "blog.test").await, (200, "production".into()));
    assert_eq!(ask(front, "Staging.Blog.test:8080").await, (200, "staging".into()));
    assert_eq!(ask(front, "pr-3.review.blog.test").await, (200, "staging".into()));
    let (status, body) = ask(front, "elsewhere.test").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("`elsewhere.test`"), "{body}");

    // A host of another route, and a second default: refused through the
    // protocol, naming the other route, and nothing changed.
    let claims = proxy.host_claims();
    let (c, s2) = (Arc::clone(&client), staging.clone());
    let taken = blocking(move || c.set_hosts(&s2, &hosts(&["blog.test"]), false)).await;
    assert_eq!(
        taken,
        Err(IngressError::Hosts(HostsError::Claimed {
            route: staging.clone(),
            host: "blog.test".into(),
            by: prod.clone()
        }))
    );
    let (c, p2, s2) = (Arc::clone(&client), prod.clone(), staging.clone());
    let second = blocking(move || {
        c.set_hosts(&p2, &hosts(&["blog.test"]), true).unwrap();
        c.set_hosts(&s2, &hosts(&["staging.blog.test"]), true)
    })
    .await;
    let Err(IngressError::Hosts(refusal @ HostsError::SecondDefault { .. })) = second else { panic!("{second:?}") };
    assert!(refusal.to_string().contains("blog/production"), "{refusal}");
    assert_eq!(proxy.host_claims().get(&staging), claims.get(&staging), "the staging claim is as it was");
    assert_eq!(ask(front, "elsewhere.test").await, (200, "production".into()), "production is the default now");

    // The staging route goes: its hosts reach the default, never staging.
    let hits = staging_hits.load(Ordering::SeqCst);
    let (c, s2) = (Arc::clone(&client), staging.clone());
    blocking(move || c.remove_route(&s2)).await;
    assert_eq!(proxy.host_claims().get(&staging), None);
    assert_eq!(ask(front, "staging.blog.test").await, (200, "production".into()));
    assert_eq!(staging_hits.load(Ordering::SeqCst), hits);

    serving.cancel();
    let _ = served.await;
    shutdown.cancel();
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_releases_the_routes_of_environments_it_did_not_restore() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home { dir: dir.path().to_path_buf() };
    let plane = DataPlane::new(&home, HashMap::new());
    let sock = dir.path().join("plane.sock");
    plane.serve(tokio::net::UnixListener::bind(&sock).unwrap());
    let proxy = plane.proxy_for_tests();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    let serving = CancellationToken::new();
    let (p, s) = (proxy.clone(), serving.clone());
    let served = tokio::spawn(async move { p.serve(listener, s).await });

    // The first daemon runs production and staging.
    let (prod, staging) = (RouteKey("blog/production".into()), RouteKey("blog/staging".into()));
    let (prod_addr, _) = instance("production").await;
    let (staging_addr, _) = instance("staging").await;
    let first_stop = CancellationToken::new();
    let first = PlaneClient::connect(&sock, 1, first_stop.clone()).await.unwrap();
    let (c, p2, s2) = (Arc::clone(&first), prod.clone(), staging.clone());
    blocking(move || {
        c.finish_resync();
        c.add(&p2, Backend { instance: id(1), addr: prod_addr }, check(), InitialHealth::AssumeHealthy);
        c.add(&s2, Backend { instance: id(2), addr: staging_addr }, check(), InitialHealth::AssumeHealthy);
        c.set_hosts(&p2, &hosts(&["blog.test"]), false).unwrap();
        c.set_hosts(&s2, &hosts(&["staging.blog.test"]), false).unwrap();
    })
    .await;
    assert_eq!(ask(front, "staging.blog.test").await, (200, "staging".into()));
    first_stop.cancel();
    drop(first);

    // The next one restores production only (staging was brought down
    // while no daemon could tell the data plane): staging's route goes.
    let second_stop = CancellationToken::new();
    let second = PlaneClient::connect(&sock, 1, second_stop.clone()).await.unwrap();
    let (c, p2) = (Arc::clone(&second), prod.clone());
    blocking(move || {
        c.add(&p2, Backend { instance: id(1), addr: prod_addr }, check(), InitialHealth::AssumeHealthy);
        c.set_hosts(&p2, &hosts(&["blog.test"]), false).unwrap();
        c.finish_resync();
    })
    .await;
    assert_eq!(proxy.routes(), vec![prod.clone()]);
    assert_eq!(proxy.host_claims().get(&staging), None);
    assert_eq!(ask(front, "blog.test").await, (200, "production".into()));
    let (status, body) = ask(front, "staging.blog.test").await;
    assert_eq!(status, 404, "{body}");
    // Its hosts are free for another environment.
    let (c, review) = (Arc::clone(&second), RouteKey("blog/review".into()));
    blocking(move || c.set_hosts(&review, &hosts(&["staging.blog.test"]), false)).await.unwrap();

    serving.cancel();
    let _ = served.await;
    second_stop.cancel();
    plane.stop().await;
}

/// What a data plane of the previous nonstop knows: every call but the
/// host calls (only those a client needs to connect are answered here;
/// decoding with the real `wire::decode` gives the real error).
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum OldRequest {
    Hello {
        #[allow(dead_code)]
        version: u32,
        #[allow(dead_code)]
        workers: usize,
    },
    Table,
    Subscribe,
}

#[derive(Debug, serde::Deserialize)]
struct OldCall {
    id: u64,
    request: OldRequest,
}

/// Serve `listener` as an older data plane does: a line it cannot read
/// is answered with id 0 and the connection closed.
async fn old_data_plane(listener: tokio::net::UnixListener) {
    loop {
        let Ok((conn, _)) = listener.accept().await else { return };
        tokio::spawn(async move {
            let (read, mut write) = conn.into_split();
            let mut lines = BufReader::new(read);
            let mut line = String::new();
            loop {
                line.clear();
                if !matches!(read_line(&mut lines, &mut line).await, Ok(n) if n > 0) {
                    return;
                }
                let (id, result) = match wire::decode::<OldCall>(&line) {
                    Ok(OldCall { id, request: OldRequest::Hello { .. } }) => {
                        (id, Ok(Reply::Hello { version: wire::VERSION, pid: 1, backends: Vec::new() }))
                    }
                    Ok(OldCall { id, request: OldRequest::Table }) => {
                        (id, Ok(Reply::Table { backends: Vec::new(), routes: Vec::new() }))
                    }
                    Ok(OldCall { id, request: OldRequest::Subscribe }) => (id, Ok(Reply::Done)),
                    Err(e) => {
                        let _ = write.write_all(wire::encode(&Answer { id: 0, result: Err(e) }).as_bytes()).await;
                        return;
                    }
                };
                let answer: Result<Reply, PlaneError> = result;
                if write.write_all(wire::encode(&Answer { id, result: answer }).as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_calls_to_an_older_data_plane_fail_saying_restart_the_keeper() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("plane.sock");
    let old = tokio::spawn(old_data_plane(tokio::net::UnixListener::bind(&sock).unwrap()));
    let shutdown = CancellationToken::new();
    let client = PlaneClient::connect(&sock, 1, shutdown.clone()).await.unwrap();
    let c = Arc::clone(&client);
    blocking(move || c.finish_resync()).await;

    let c = Arc::clone(&client);
    let route = RouteKey("blog/staging".into());
    let (set, removed_then_set) = blocking(move || {
        let set = c.set_hosts(&route, &hosts(&["staging.test"]), false);
        // Logged, not answered; the next call reconnects and fails the same.
        c.remove_route(&route);
        (set, c.set_hosts(&route, &hosts(&["staging.test"]), true))
    })
    .await;
    for result in [set, removed_then_set] {
        let Err(IngressError::Unavailable(reason)) = result else { panic!("{result:?}") };
        assert!(reason.contains("does not know `hosts`") && reason.contains("restart the keeper"), "{reason}");
    }
    shutdown.cancel();
    old.abort();
}
