//! Hostile and broken clients and upstreams, on raw sockets: limits,
//! request smuggling, framing, truncated responses, cancellation, body
//! timeouts. Every rejection gets the right status, one log line, and a
//! closed connection; nothing hangs.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use nonstop_core::traffic::InitialHealth;
use nonstop_proxy::ProxyConfig;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that reads the whole request body and answers with what it
/// saw; a body that fails is recorded as `body error` in the log.
fn body_handler() -> Handler {
    Arc::new(|req, state| {
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let te = req.headers().get("transfer-encoding").map(|v| v.to_str().unwrap_or("?").to_string());
            match req.into_body().collect().await {
                Ok(body) => {
                    let n = body.to_bytes().len();
                    text(200, format!("{path} got {n} bytes (te={te:?})"))
                }
                Err(_) => {
                    state.log.lock().unwrap().push("body error".into());
                    text(500, "body error")
                }
            }
        })
    })
}

async fn proxy_with(config: ProxyConfig, handler: Handler) -> (Running, Upstream) {
    logs::capture();
    let up = Upstream::with_handler("up", handler).await;
    let p = Running::start(config).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);
    (p, up)
}

/// Exactly one log line about `client`, containing `needle`.
#[track_caller]
fn logged_once(client: SocketAddr, needle: &str) {
    let lines = logs::for_client(client);
    assert_eq!(lines.len(), 1, "expected one log line for {client}, got {lines:#?}");
    assert!(lines[0].contains(needle), "{needle:?} not in {:?}", lines[0]);
}

/// Wait (bounded) for the log line of a connection that just closed.
async fn wait_logged(client: SocketAddr) {
    wait_until("the rejection to be logged", || !logs::for_client(client).is_empty()).await;
}

// ------------------------------------------------------------------- limits

#[tokio::test]
async fn oversized_heads_get_431_and_long_targets_414() {
    let (p, up) = proxy_with(
        ProxyConfig { max_header_bytes: 16 * 1024, max_headers: 20, max_request_line: 1024, ..config() },
        body_handler(),
    )
    .await;
    let mut many = String::from("GET / HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let big_header = format!("GET / HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n\r\n", "c".repeat(20 * 1024));
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: app.test\r\n\r\n", "p".repeat(2000));
    for (what, request, status, log) in [
        ("too many headers", many, 431, "status=431"),
        ("a 20 KiB header", big_header, 431, "status=431"),
        ("a 2000-byte target", long_target, 414, "request target longer than max_request_line"),
    ] {
        let (reply, client, mut s) = raw_request(p.addr, request.as_bytes()).await;
        let reply = reply.unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(reply.status, status, "{what}: {}", reply.head);
        assert!(closes(&mut s, Duration::from_secs(5)).await, "{what}: left open");
        wait_logged(client).await;
        logged_once(client, log);
    }
    assert_eq!(up.hits(), 0, "nothing reached the instance");

    // Just under the limits is fine.
    let mut ok = String::from("GET /ok HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..18 {
        ok.push_str(&format!("X-H{i}: v\r\n"));
    }
    ok.push_str("Connection: close\r\n\r\n");
    let (reply, _, _) = raw_request(p.addr, ok.as_bytes()).await;
    assert_eq!(reply.unwrap().status, 200);
    p.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_up_front() {
    let (p, up) = proxy_with(ProxyConfig { max_body_bytes: 1000, ..config() }, body_handler()).await;
    // Announced too large: answered at once, without reading the body.
    let (reply, client, mut s) =
        raw_request(p.addr, b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5000\r\n\r\n").await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 413, "{}", reply.head);
    assert_eq!(reply.header("connection").as_deref(), Some("close"));
    assert!(closes(&mut s, Duration::from_secs(5)).await);
    logged_once(client, "Content-Length larger than max_body_bytes");
    assert_eq!(up.hits(), 0);

    // At the limit: fine.
    let body = "x".repeat(1000);
    let (reply, _, _) = raw_request(
        p.addr,
        format!("POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{body}")
            .as_bytes(),
    )
    .await;
    assert_eq!(reply.unwrap().status, 200);
    p.stop().await;
}

#[tokio::test]
async fn a_chunked_body_growing_past_the_limit_aborts_the_upstream_request() {
    // Streamed (other bodies are read whole first: see bodies.rs).
    let streamed = ProxyConfig { max_body_bytes: 1000, unbuffered_paths: vec!["/".into()], ..config() };
    let (p, up) = proxy_with(streamed, body_handler()).await;
    // Under the limit, chunked: streamed through.
    let mut small = String::from(
        "POST /small HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for _ in 0..3 {
        small.push_str(&format!("12c\r\n{}\r\n", "s".repeat(300)));
    }
    small.push_str("0\r\n\r\n");
    let (reply, _, _) = raw_request(p.addr, small.as_bytes()).await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 200);
    assert!(String::from_utf8_lossy(&reply.body).contains("got 900 bytes"));

    // Over it: 4 × 300 bytes, the end never sent. The fourth once the
    // request reached the instance (a chunk size past the limit that comes
    // with the head is refused before anything is sent: bodies.rs).
    let mut s = connect_own_port(p.addr).await;
    let client = s.local_addr().unwrap();
    s.write_all(b"POST /big HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    for i in 0..4 {
        if i == 3 {
            wait_until("the request to reach the instance", || {
                up.state.log.lock().unwrap().iter().any(|l| l == "/big")
            })
            .await;
        }
        let chunk = format!("12c\r\n{}\r\n", "b".repeat(300));
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    // A 413 if the instance had not answered yet; the connection closes
    // either way (its rest cannot be read).
    if let Some(reply) = read_response(&mut s).await {
        assert_eq!(reply.status, 413, "{}", reply.head);
    }
    assert!(closes(&mut s, Duration::from_secs(5)).await);
    wait_until("the instance to see its request aborted", || {
        up.state.log.lock().unwrap().iter().any(|l| l == "body error")
    })
    .await;
    wait_logged(client).await;
    logged_once(client, "larger than max_body_bytes");
    p.stop().await;
}

// ---------------------------------------------------------------- smuggling

/// Requests hyper or the proxy must refuse before anything reaches the
/// instance: (what, request, status, a word of the log line).
const REFUSED: &[(&str, &str, u16, &str)] = &[
    // What hyper refuses by itself.
    (
        "conflicting Content-Length",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
        "status=400",
    ),
    ("Content-Length list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", 400, "status=400"),
    ("non-numeric Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400, "status=400"),
    ("negative Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400, "status=400"),
    ("signed Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", 400, "status=400"),
    (
        "overflowing Content-Length",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        400,
        "status=400",
    ),
    ("obsolete line folding", "GET / HTTP/1.1\r\nHost: a\r\nX-A: one\r\n two\r\n\r\n", 400, "status=400"),
    (
        "Transfer-Encoding not chunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        400,
        "status=400",
    ),
    (
        "chunked not last",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        400,
        "status=400",
    ),
    (
        "Transfer-Encoding in HTTP/1.0",
        "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "status=400",
    ),
    ("space in a header name", "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400, "status=400"),
    ("space before the colon", "GET / HTTP/1.1\r\nHost: a\r\nX-A : x\r\n\r\n", 400, "status=400"),
    ("control byte in a name", "GET / HTTP/1.1\r\nHost: a\r\nX-\x01A: x\r\n\r\n", 400, "status=400"),
    ("NUL in a value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: x\x00y\r\n\r\n", 400, "status=400"),
    ("DEL in a value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: x\x7fy\r\n\r\n", 400, "status=400"),
    ("bare CR in a value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: x\ry\r\n\r\n", 400, "status=400"),
    ("space in the target", "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "status=400"),
    ("unknown version", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400, "status=400"),
    // What the proxy adds.
    (
        "Content-Length then Transfer-Encoding",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "Content-Length together with Transfer-Encoding",
    ),
    (
        "Transfer-Encoding then Content-Length",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
        "Content-Length together with Transfer-Encoding",
    ),
    (
        "repeated equal Content-Length",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello",
        400,
        "more than one Content-Length header",
    ),
    (
        "a coding before chunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "Transfer-Encoding other than chunked",
    ),
    (
        "chunked twice",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
        "Transfer-Encoding other than chunked",
    ),
    ("no Host in HTTP/1.1", "GET / HTTP/1.1\r\n\r\n", 400, "missing Host header"),
    ("two Host headers", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host header"),
    // Host syntax (RFC 9110 §7.2, as nginx checks it).
    ("a path in Host", "GET / HTTP/1.1\r\nHost: evil.test/x\r\n\r\n", 400, "invalid Host header"),
    ("a space in Host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "invalid Host header"),
    ("user info in Host", "GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n", 400, "invalid Host header"),
    ("an empty Host", "GET / HTTP/1.1\r\nHost: \r\n\r\n", 400, "invalid Host header"),
    ("an empty label in Host", "GET / HTTP/1.1\r\nHost: a..test\r\n\r\n", 400, "invalid Host header"),
    ("a port out of range", "GET / HTTP/1.1\r\nHost: a.test:65536\r\n\r\n", 400, "invalid Host header"),
    ("a port that is not a number", "GET / HTTP/1.1\r\nHost: a.test:8o\r\n\r\n", 400, "invalid Host header"),
    ("two ports", "GET / HTTP/1.1\r\nHost: a.test:80:80\r\n\r\n", 400, "invalid Host header"),
    ("a bad IPv6 literal", "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400, "invalid Host header"),
    ("an invalid Host in HTTP/1.0", "GET / HTTP/1.0\r\nHost: a\\b\r\n\r\n", 400, "invalid Host header"),
    (
        "user info in the target",
        "GET http://user@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        400,
        "invalid host in the request target",
    ),
    (
        "absolute target naming another host",
        "GET http://evil.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        400,
        "the request target and Host name different hosts",
    ),
    (
        "absolute target with another port",
        "GET http://a.test:81/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        400,
        "the request target and Host name different hosts",
    ),
    ("CONNECT", "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", 405, "CONNECT is not supported"),
];

#[tokio::test]
async fn malformed_and_smuggling_requests_are_refused_and_closed() {
    let (p, up) = proxy_with(config(), body_handler()).await;
    for (what, request, status, log) in REFUSED {
        let (reply, client, mut s) = raw_request(p.addr, request.as_bytes()).await;
        let reply = reply.unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(reply.status, *status, "{what}: {}", reply.head);
        assert!(closes(&mut s, Duration::from_secs(5)).await, "{what}: connection left open");
        wait_logged(client).await;
        logged_once(client, log);
    }
    assert_eq!(up.hits(), 0, "nothing reached the instance");

    // The same connection is not reused after a refusal, even if the
    // client sent another request behind it.
    let (reply, _, mut s) = raw_request(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(reply.unwrap().status, 400);
    assert!(closes(&mut s, Duration::from_secs(5)).await);
    assert_eq!(up.hits(), 0, "the smuggled request never ran");

    // What is fine: an absolute target that agrees with Host (default
    // port, any case), a lone chunked body.
    for request in [
        "GET http://A.test/ok HTTP/1.1\r\nHost: a.test:80\r\nConnection: close\r\n\r\n",
        "POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let (reply, _, _) = raw_request(p.addr, request.as_bytes()).await;
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200, "{request:?}: {}", reply.head);
    }
    p.stop().await;
}

#[tokio::test]
async fn invalid_chunk_sizes_abort_the_upstream_request() {
    let (p, up) = proxy_with(config(), body_handler()).await;
    for (i, size) in ["zz", "-5", "fffffffffffffffff1", "5 5"].iter().enumerate() {
        let request = format!(
            "POST /chunks HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
        );
        let (reply, client, mut s) = raw_request(p.addr, request.as_bytes()).await;
        let reply = reply.unwrap_or_else(|| panic!("{size}: no answer"));
        assert_eq!(reply.status, 400, "{size}: {}", reply.head);
        assert!(closes(&mut s, Duration::from_secs(5)).await, "{size}");
        wait_logged(client).await;
        logged_once(client, "status=400");
        // Bodies stream: the instance may have got the head, but then
        // only an aborted body, never a complete request.
        wait_until("every request the instance saw to be aborted", || {
            let log = up.state.log.lock().unwrap();
            let seen = log.iter().filter(|l| *l == "/chunks").count();
            let aborted = log.iter().filter(|l| *l == "body error").count();
            seen == aborted && seen <= i + 1
        })
        .await;
    }
    p.stop().await;
}

// --------------------------------------------------------- HTTP/1.0, close

/// `/stream`: a body of unknown length ("hello world"); anything else: a
/// fixed-length one.
fn framing_handler() -> Handler {
    Arc::new(|req, _state| {
        Box::pin(async move {
            if req.uri().path() == "/stream" {
                let (tx, body) = channel_body(None);
                tokio::spawn(async move {
                    let _ = tx.send(Bytes::from_static(b"hello ")).await;
                    let _ = tx.send(Bytes::from_static(b"world")).await;
                });
                return http::Response::new(body);
            }
            text(200, "fixed")
        })
    })
}

#[tokio::test]
async fn http10_clients_get_framing_they_understand() {
    let (p, _up) = proxy_with(config(), framing_handler()).await;
    // HTTP/1.0 cannot take chunked: the body ends with the connection.
    let (reply, _, mut s) = raw_request(p.addr, b"GET /stream HTTP/1.0\r\nHost: app.test\r\n\r\n").await;
    let reply = reply.unwrap();
    assert!(reply.head.starts_with("HTTP/1.0 200"), "{}", reply.head);
    assert!(reply.header("transfer-encoding").is_none(), "{}", reply.head);
    assert_eq!(reply.body, b"hello world");
    assert!(closes(&mut s, Duration::from_secs(5)).await);

    // HTTP/1.0 without keep-alive: closed after a fixed-length answer too.
    let (reply, _, mut s) = raw_request(p.addr, b"GET /fixed HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.unwrap().body, b"fixed");
    assert!(closes(&mut s, Duration::from_secs(5)).await);

    // HTTP/1.0 asking for keep-alive keeps its connection.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /fixed HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
        let reply = read_response(&mut s).await.unwrap();
        assert_eq!(reply.body, b"fixed");
        assert!(reply.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("keep-alive")));
    }
    assert!(!closes(&mut s, Duration::from_millis(300)).await);
    p.stop().await;
}

/// Answers with the `Host` it got.
fn host_handler() -> Handler {
    Arc::new(|req, _state| {
        Box::pin(async move {
            let hosts: Vec<String> =
                req.headers().get_all("host").iter().map(|v| v.to_str().unwrap_or("?").to_string()).collect();
            text(200, format!("host={}", hosts.join(",")))
        })
    })
}

#[tokio::test]
async fn http10_without_host_reaches_the_instance_with_the_host_its_checks_use() {
    // With a configured check host (what Django's ALLOWED_HOSTS lists).
    logs::capture();
    let up = Upstream::with_handler("up", host_handler()).await;
    let p = Running::start(config()).await;
    p.proxy.set_default_route(route());
    let named = nonstop_core::process::HealthCheck { host: Some("notes.example.com".into()), ..lazy_check() };
    p.add(1, up.addr, named, InitialHealth::AssumeHealthy);
    let (reply, _, _) = raw_request(p.addr, b"GET /h HTTP/1.0\r\n\r\n").await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.body, b"host=notes.example.com");
    // A Host the client sent is kept, in HTTP/1.0 too.
    let (reply, _, _) = raw_request(p.addr, b"GET /h HTTP/1.0\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(reply.unwrap().body, b"host=app.test");
    p.stop().await;

    // Without one: the instance's address, as its checks send.
    let (p, up) = proxy_with(config(), host_handler()).await;
    let (reply, _, _) = raw_request(p.addr, b"GET /h HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.unwrap().body, format!("host={}", up.addr).into_bytes());
    p.stop().await;
}

#[tokio::test]
async fn keep_alive_is_honoured_until_connection_close() {
    let (p, up) = proxy_with(config(), framing_handler()).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    for path in ["/fixed", "/stream", "/fixed"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes()).await.unwrap();
        let reply = read_response(&mut s).await.unwrap();
        assert_eq!(reply.status, 200);
        assert!(reply.header("connection").is_none(), "{}", reply.head);
    }
    // A chunked answer, then the close the client asked for.
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let reply = read_response(&mut s).await.unwrap();
    assert_eq!(reply.header("connection").as_deref(), Some("close"));
    assert_eq!(reply.body, b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n");
    assert!(closes(&mut s, Duration::from_secs(5)).await);
    assert_eq!(up.hits(), 4);
    p.stop().await;
}

// ------------------------------------------------------- broken upstreams

/// A raw upstream: answers `/health` properly and any other request with
/// `response`, then resets the connection (RST) after a moment.
async fn resetting_upstream(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /health ") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
                    return;
                }
                let _ = s.write_all(response).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Reset, not a clean end. (A zero linger never blocks.)
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
                drop(s);
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_upstream_reset_mid_response_never_looks_complete() {
    logs::capture();
    for (what, response) in [
        ("content-length", &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"[..]),
        ("chunked", &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"[..]),
    ] {
        let (addr, task) = resetting_upstream(response).await;
        let p = Running::serving(&[addr]).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET /data HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
        let reply = read_response(&mut s).await.expect("the head went through");
        assert_eq!(reply.status, 200, "{what}");
        match what {
            "content-length" => {
                assert_eq!(reply.header("content-length").as_deref(), Some("100"));
                assert!(reply.body.len() < 100, "{what}: the declared length was reached");
            }
            _ => {
                assert_eq!(reply.header("transfer-encoding").as_deref(), Some("chunked"));
                assert!(
                    !reply.body.ends_with(b"0\r\n\r\n"),
                    "{what}: the last chunk was sent: {:?}",
                    String::from_utf8_lossy(&reply.body)
                );
                assert!(reply.body.starts_with(b"5\r\nhello\r\n"));
            }
        }
        assert!(closes(&mut s, Duration::from_secs(5)).await, "{what}: the client connection stays open");
        p.stop().await;
        task.abort();
    }
}

// ----------------------------------------------------------- cancellation

struct Cancellable {
    started: Arc<tokio::sync::Notify>,
    dropped: Arc<tokio::sync::Notify>,
    drops: Arc<AtomicUsize>,
}

/// `/hang`: never answers; `/forever`: streams a chunk every 20 ms, never
/// ends. Both drop a `DropSignal` when the upstream gives up on them.
fn cancellable_handler(c: &Cancellable) -> Handler {
    let (started, dropped, drops) = (c.started.clone(), c.dropped.clone(), c.drops.clone());
    Arc::new(move |req, _state| {
        let guard = DropSignal(dropped.clone(), drops.clone());
        let started = started.clone();
        Box::pin(async move {
            if req.uri().path() == "/hang" {
                started.notify_waiters();
                let _guard = guard;
                std::future::pending::<()>().await;
                unreachable!()
            }
            let (tx, body) = channel_body(Some(guard));
            tokio::spawn(async move {
                while tx.send(Bytes::from_static(b"tick\n")).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            started.notify_waiters();
            http::Response::new(body)
        })
    })
}

#[tokio::test]
async fn a_client_leaving_cancels_the_upstream_request() {
    let c = Cancellable {
        started: Arc::new(tokio::sync::Notify::new()),
        dropped: Arc::new(tokio::sync::Notify::new()),
        drops: Arc::new(AtomicUsize::new(0)),
    };
    let (p, _up) = proxy_with(config(), cancellable_handler(&c)).await;

    // Before the response head: the instance is still working on it.
    let started = c.started.notified();
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), started).await.expect("the request reached the instance");
    drop(s);
    wait_until("the instance to see the request cancelled", || c.drops.load(Ordering::SeqCst) == 1).await;

    // In the middle of the response body.
    let started = c.started.notified();
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /forever HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), started).await.expect("the request reached the instance");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(n > 0);
    drop(s);
    wait_until("the instance to see the response abandoned", || c.drops.load(Ordering::SeqCst) == 2).await;
    p.stop().await;
}

// ------------------------------------------------------------ body timeout

#[tokio::test]
async fn a_client_trickling_its_body_gets_408() {
    // Streamed (other bodies are read whole first: see bodies.rs).
    let streamed =
        ProxyConfig { body_timeout: Duration::from_millis(300), unbuffered_paths: vec!["/".into()], ..config() };
    let (p, up) = proxy_with(streamed, body_handler()).await;
    for (what, head, first_part) in [
        // Streamed to the instance (POST).
        ("streamed", "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n", "0123456789"),
        // Buffered for a retry (small PUT): never reaches the instance.
        ("buffered", "PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n", "0123456789"),
        ("chunked", "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", "a\r\n0123456789\r\n"),
    ] {
        let started = Instant::now();
        let mut s = connect_own_port(p.addr).await;
        let client = s.local_addr().unwrap();
        s.write_all(format!("{head}{first_part}").as_bytes()).await.unwrap();
        let reply = read_response(&mut s).await.unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(reply.status, 408, "{what}: {}", reply.head);
        assert_eq!(reply.header("connection").as_deref(), Some("close"));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "{what}: {waited:?}");
        assert!(closes(&mut s, Duration::from_secs(5)).await, "{what}");
        logged_once(client, "body_timeout");
    }
    // The streamed requests were aborted upstream; the buffered one never
    // reached it.
    wait_until("both streamed requests aborted upstream", || {
        up.state.log.lock().unwrap().iter().filter(|l| *l == "body error").count() == 2
    })
    .await;
    assert_eq!(up.hits(), 2);

    // A slow but steady body is fine: the timeout is between two reads.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"5\r\nhello\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let reply = read_response(&mut s).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert!(String::from_utf8_lossy(&reply.body).contains("got 30 bytes"));
    p.stop().await;
}
