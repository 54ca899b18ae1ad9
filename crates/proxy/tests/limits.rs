//! Connection limits and file descriptor exhaustion (issue 15): beyond
//! `max_connections` in all or `max_connections_per_client` from one
//! address, new connections are closed at once, with one log line per
//! interval; out of descriptors, waiting connections are shed the same way
//! and health checks that cannot be made do not take instances out of
//! rotation.

mod common;

use common::*;
use nonstop_core::traffic::{BackendHealth, InitialHealth, Traffic};
use nonstop_proxy::ProxyConfig;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n";

/// A connection to `addr` from `from` (any free port), or from a port of
/// 127.0.0.1 no other connection of this process used.
async fn connect(addr: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    match from {
        None => connect_own_port(addr).await,
        Some(ip) => {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        }
    }
}

/// A keep-alive connection that got its answer (and stays open).
async fn served(addr: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    let mut s = connect(addr, from).await;
    s.write_all(GET).await.unwrap();
    let reply = read_response(&mut s).await.expect("an answer on an admitted connection");
    assert_eq!(reply.status, 200, "{}", reply.head);
    s
}

/// A connection closed without an answer (read_response fails the test
/// if it is left open for 10 s instead). Returns its local address.
async fn refused(addr: SocketAddr, from: Option<IpAddr>) -> SocketAddr {
    let mut s = connect(addr, from).await;
    let local = s.local_addr().unwrap();
    // The proxy may have closed it already: writing can fail.
    let _ = s.write_all(GET).await;
    assert!(read_response(&mut s).await.is_none(), "a refused connection gets no answer");
    local
}

/// Wait (bounded) until a new connection from `from` is served again,
/// once the proxy has seen a connection close.
async fn served_again(addr: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect(addr, from).await;
        let _ = s.write_all(GET).await;
        if let Some(reply) = read_response(&mut s).await {
            assert_eq!(reply.status, 200, "{}", reply.head);
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no connection admitted again within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn limited(config: ProxyConfig) -> (Running, Upstream) {
    logs::capture();
    let up = Upstream::start("up").await;
    let p = Running::start(config).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);
    (p, up)
}

#[tokio::test]
async fn beyond_max_connections_new_connections_are_closed_at_once_and_logged_once() {
    let (p, _up) = limited(ProxyConfig { max_connections: Some(3), max_connections_per_client: 0, ..config() }).await;
    assert_eq!(p.proxy.max_connections(), 3);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(served(p.addr, None).await);
    }
    let mut refused_clients = Vec::new();
    for _ in 0..20 {
        refused_clients.push(refused(p.addr, None).await);
    }
    // The admitted ones are still served.
    for s in &mut open {
        s.write_all(GET).await.unwrap();
        assert_eq!(read_response(s).await.unwrap().status, 200);
    }
    // One line for the burst (the first refusal), not one per refusal.
    let lines: Vec<String> = logs::lines_with("client connections refused")
        .into_iter()
        .filter(|line| refused_clients.iter().any(|c| line.contains(&format!("last_client={c}"))))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("at_max_connections=1") && lines[0].contains("max_connections=3"), "{}", lines[0]);
    // Room again once one closes.
    drop(open.pop());
    open.push(served_again(p.addr, None).await);
    p.stop().await;
}

#[tokio::test]
async fn beyond_max_connections_per_client_that_address_is_refused_and_others_are_not() {
    let trusted: IpAddr = "127.0.0.3".parse().unwrap();
    let (p, _up) = limited(ProxyConfig {
        max_connections_per_client: 2,
        trusted_proxies: vec!["127.0.0.3/32".parse().unwrap()],
        ..config()
    })
    .await;
    let one: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let mut from_one = vec![served(p.addr, Some(one)).await, served(p.addr, Some(one)).await];
    refused(p.addr, Some(one)).await;
    refused(p.addr, Some(one)).await;
    // Another address is not limited by the first one's connections.
    let _from_other = [served(p.addr, Some(other)).await, served(p.addr, Some(other)).await];
    refused(p.addr, Some(other)).await;
    // A trusted proxy (a load balancer in front) is not limited per client.
    let _from_trusted: Vec<TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(served(p.addr, Some(trusted)).await);
        }
        v
    };
    // Room again for the first address once one of its connections closes.
    drop(from_one.pop());
    from_one.push(served_again(p.addr, Some(one)).await);
    p.stop().await;
}

/// A client that closes a connection and opens the next at once can be a
/// connection ahead of the proxy (the other worker has not yet seen the
/// close): the new connection waits for a moment instead of being refused.
#[tokio::test]
async fn a_connection_over_the_per_client_limit_waits_a_moment_for_one_to_close() {
    let (p, _up) = limited(ProxyConfig { max_connections_per_client: 2, ..config() }).await;
    let one: IpAddr = "127.0.0.1".parse().unwrap();
    let mut open = vec![served(p.addr, Some(one)).await, served(p.addr, Some(one)).await];
    let mut third = connect(p.addr, Some(one)).await;
    third.write_all(GET).await.unwrap();
    // Within the grace (50 ms), one of the address's connections closes.
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(open.pop());
    let reply = read_response(&mut third).await.expect("admitted once the other connection closed");
    assert_eq!(reply.status, 200, "{}", reply.head);
    // Still over the limit after the grace: closed without an answer.
    let started = std::time::Instant::now();
    refused(p.addr, Some(one)).await;
    assert!(started.elapsed() >= Duration::from_millis(40), "refused only after the grace: {:?}", started.elapsed());
    assert!(
        logs::lines_with("client connections refused").iter().any(|l| l.contains("over_max_connections_per_client=1")),
        "the refusal after the grace is logged"
    );
    drop(open);
    p.stop().await;
}

#[tokio::test]
async fn idle_connections_closed_by_the_header_timeout_are_logged_in_one_line() {
    let (p, _up) = limited(ProxyConfig { header_read_timeout: Duration::from_millis(200), ..config() }).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(connect(p.addr, None).await);
    }
    let clients: Vec<SocketAddr> = idle.iter().map(|s| s.local_addr().unwrap()).collect();
    for s in &mut idle {
        assert!(closes(s, Duration::from_secs(5)).await, "an idle connection is closed after header_read_timeout");
    }
    let lines: Vec<String> = logs::lines_with("for not sending a complete request head")
        .into_iter()
        .filter(|line| clients.iter().any(|c| line.contains(&format!("last_client={c}"))))
        .collect();
    assert_eq!(lines.len(), 1, "one line for 20 idle connections: {lines:#?}");
    let per_connection: Vec<String> =
        clients.iter().flat_map(|c| logs::for_client(*c)).filter(|l| l.contains("connection closed")).collect();
    assert!(per_connection.is_empty(), "{per_connection:#?}");
    p.stop().await;
}

#[tokio::test]
async fn the_default_limit_follows_the_file_descriptor_limit() {
    let p = Running::start(config()).await;
    let soft = nonstop_proxy::soft_fd_limit();
    assert_eq!(p.proxy.max_connections(), nonstop_proxy::derived_max_connections(soft));
    assert_eq!(ProxyConfig::default().max_connections_per_client, 256);
    p.proxy.set_config(ProxyConfig { max_connections: Some(7), ..config() }).unwrap();
    assert_eq!(p.proxy.max_connections(), 7);
    assert!(p.proxy.set_config(ProxyConfig { max_connections: Some(0), ..config() }).is_err());
    p.stop().await;
}

// ------------------------------------------------------- out of descriptors

/// Set in the child process of the test below: the instance's address.
const CHILD_ENV: &str = "NONSTOP_PROXY_TEST_FD_CHILD";
const CHILD_TEST: &str = "out_of_file_descriptors_connections_are_shed_and_instances_stay_in_rotation";

/// The proxy runs in a child process (this test binary again) that uses
/// up its file descriptors; the instance and the clients are here. With
/// no descriptor left: the instance stays healthy (its checks cannot be
/// made, which is not its fault), and a client's connection is closed at
/// once rather than left waiting in the queue. Once descriptors are free
/// again, requests are served at once.
#[tokio::test]
async fn out_of_file_descriptors_connections_are_shed_and_instances_stay_in_rotation() {
    if let Ok(instance) = std::env::var(CHILD_ENV) {
        return exhausted_proxy(instance.parse().unwrap()).await;
    }
    let up = Upstream::start("up").await;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, up.addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let proxy: SocketAddr = wait_for(&mut lines, "EXHAUSTED").await.parse().unwrap();
    for _ in 0..20 {
        refused(proxy, None).await;
    }
    stdin.write_all(b"release\n").await.unwrap();
    wait_for(&mut lines, "RELEASED").await;
    let reply = get(proxy, "/").await;
    assert_eq!(reply.status, 200, "served again once descriptors are free");
    stdin.write_all(b"done\n").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "the child's checks failed (its output is above)");
}

/// What follows `prefix` on the first line of the child's that has it.
async fn wait_for(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>, prefix: &str) -> String {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.unwrap().unwrap_or_else(|| panic!("child ended before {prefix}"));
            // (libtest's "test NAME ... " may come first on the line.)
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_string();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {prefix} from the child within 30 s"))
}

/// The child's side: a proxy whose process runs out of descriptors.
async fn exhausted_proxy(instance: SocketAddr) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    logs::capture();
    // The parent's lines, read by a thread started before the descriptors
    // run out.
    let (tx, mut from_parent) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut read_line = async || from_parent.recv().await.expect("a line from the parent");
    // The limit is set high so that only the descriptors run out.
    let p = Running::start(ProxyConfig { max_connections: Some(100_000), workers: 1, ..config() }).await;
    p.proxy.set_default_route(route());
    let mut events = p.proxy.subscribe();
    let id = p.add(1, instance, check(50, 1, 1), InitialHealth::AssumeHealthy);
    let checks = || p.proxy.status(&id).unwrap().last_checks;
    wait_until("a check to pass", || checks().iter().any(|c| c.contains("-> 200"))).await;

    // Use up every descriptor (under a lower soft limit, to be quick).
    let limit = getrlimit(Resource::Nofile);
    setrlimit(Resource::Nofile, Rlimit { current: Some(256), maximum: limit.maximum }).unwrap();
    let mut hogs = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hogs.push(f),
            Err(e) => {
                assert!(nonstop_proxy::is_local_exhaustion(&e), "{e}");
                break;
            }
        }
    }
    // Several checks in a row cannot be made (one failure would take it
    // out with unhealthy_threshold = 1).
    wait_until("checks that cannot be made", || checks().iter().filter(|c| c.contains("not checked")).count() >= 3)
        .await;
    println!("EXHAUSTED {}", p.addr);
    assert_eq!(read_line().await, "release");
    let health = p.proxy.status(&id).unwrap().health;
    drop(hogs);
    setrlimit(Resource::Nofile, limit).unwrap();
    assert_eq!(health, BackendHealth::Healthy, "out of descriptors, the instance stayed healthy: {:?}", checks());
    if let Ok(event) = events.try_recv() {
        panic!("no health change while out of descriptors: {event:?}");
    }
    wait_until("a check to pass again", || checks().last().is_some_and(|c| c.contains("-> 200"))).await;
    println!("RELEASED");
    assert_eq!(read_line().await, "done");
    // 20 clients were shed: one log line for them (the first refusal).
    let refused = logs::lines_with("client connections refused");
    assert!(!refused.is_empty() && refused.len() <= 2, "{refused:#?}");
    assert!(refused[0].contains("no_file_descriptor=1"), "{}", refused[0]);
    let not_checked = logs::lines_with("health check not made");
    assert_eq!(not_checked.len(), 1, "one line when checks could not be made: {not_checked:#?}");
    p.stop().await;
}
